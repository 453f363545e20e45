"""Streaming train/eval pipelines over the WebDataset shards (docs/data.md).

    spec = DataSpec.from_config(cfg)
    train = make_train_loader(cfg, rank, world_size, spec=spec)   # len(train) equal on every rank
    ev = make_eval_loader(cfg, rank, world_size, spec=spec)       # every val sample exactly once
"""

from mycodist.data.loaders import (
    BadDataError,
    EvalLoader,
    TrainLoader,
    make_eval_loader,
    make_train_loader,
)
from mycodist.data.spec import DataSpec, ShardInfo
from mycodist.data.transforms import ImageConfig, normalize

__all__ = [
    "BadDataError",
    "DataSpec",
    "EvalLoader",
    "ImageConfig",
    "ShardInfo",
    "TrainLoader",
    "make_eval_loader",
    "make_train_loader",
    "normalize",
]
