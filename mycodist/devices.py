"""Which CUDA device a process uses: one rule for training and the communication benchmark (shared base)."""

from __future__ import annotations

import os

from mycodist.errors import UsageError


def pick_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of this process. A scheduler that gives each task its own GPU through
    CUDA_VISIBLE_DEVICES leaves one visible device whatever LOCAL_RANK says: use device 0 then."""
    if visible < 1:
        raise RuntimeError("no CUDA device is visible to this process (check CUDA_VISIBLE_DEVICES)")
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise UsageError(f"LOCAL_RANK={local_rank} but this process sees {visible} GPUs "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
                         f"one process per visible GPU on each node")
    return local_rank


def set_local_cuda_device() -> int:
    """Select this process's GPU (before the NCCL group is made, so its collectives land there)."""
    import torch

    index = pick_device_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
    torch.cuda.set_device(index)
    return index
