"""One exception type for bad input, so every CLI can print it as a one-line error and exit 2."""


class UsageError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""
