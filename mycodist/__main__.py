from mycodist.cli import entry

entry()
