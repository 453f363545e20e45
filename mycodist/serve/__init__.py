"""Inference for `mycodist predict` and `mycodist serve`: export loading, safety verdicts, the web app."""
