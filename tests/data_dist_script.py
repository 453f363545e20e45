"""Run by test_data_dist.py under torchrun: every rank consumes its loaders with an all-reduce per step.

If any rank yielded one batch more or fewer than another, the all-reduce would wait forever and the
test's timeout would fail it."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from mycodist.config import load_config
from mycodist.data import make_eval_loader, make_train_loader


def main() -> None:
    shards, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, [f"data.shards={shards}", "data.img_size=16", "train.batch_size=4", "data.workers=1",
                             "data.shuffle_buffer=8", "data.timeout=60"])
    loader = make_train_loader(cfg, rank, world)
    steps, keys = 0, []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for images, _ in loader:
            t = images.float().mean().reshape(1)
            dist.all_reduce(t)  # one collective per step, as DDP does
            steps += 1
            if epoch == 0:
                keys += loader.last_keys
    ev = make_eval_loader(cfg, rank, world)
    val_total = torch.zeros(1)
    for _, _, batch_keys in ev:
        n = torch.tensor([float(len(batch_keys))])
        dist.all_reduce(n)  # per-batch gather, as accelerate's gather_for_metrics does
        val_total += n
    dist.barrier()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": world, "steps": steps, "len": len(loader), "keys": keys,
                   "val_total": int(val_total.item())}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
