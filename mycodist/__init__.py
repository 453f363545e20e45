"""mycodist: crawl, shard, stream, train and serve a mushroom photo classifier."""

__version__ = "0.1.0"
