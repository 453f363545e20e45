"""`mycodist data plan SHARDS --world-size W [--workers K] [--epochs E]`: check a layout before a big job."""

from __future__ import annotations

import argparse
import json

from omegaconf import DictConfig, OmegaConf

from mycodist.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    plan = sub.add_parser("plan", help="simulate W ranks reading the shards; report batches, coverage, bad data",
                          description="Runs the real loaders for W simulated ranks (separate processes, no "
                                      "training) and prints a table and a JSON last line.")
    plan.add_argument("shards", metavar="SHARDS", nargs="?", help="data set folder, manifest or pattern "
                      "(default: data.shards)")
    plan.add_argument("--world-size", "-W", type=int, required=True, help="number of ranks to simulate")
    plan.add_argument("--workers", "-K", type=int, help="DataLoader workers per rank (default: data.workers)")
    plan.add_argument("--epochs", "-E", type=int, default=1, help="epochs to run (default 1)")
    plan.add_argument("--batch-size", type=int, help="per-rank batch (default: train.batch_size)")
    plan.add_argument("--img-size", type=int, default=16,
                      help="decode crops at this size: small is fast and still finds undecodable JPEGs (default 16)")
    plan.add_argument("--parallel", type=int, help="ranks simulated at once (default: CPU count)")


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    if getattr(args, "action", None) != "plan":
        raise UsageError("choose an action: `mycodist data plan SHARDS --world-size W`")
    if args.world_size < 1 or args.epochs < 1:
        raise UsageError("--world-size and --epochs must be at least 1")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if args.shards:
        cfg.data.shards = args.shards
    if args.workers is not None:
        if args.workers < 0:
            raise UsageError("--workers must be >= 0")
        cfg.data.workers = args.workers
    if args.batch_size is not None:
        cfg.train.batch_size = args.batch_size
    cfg.data.img_size = args.img_size
    cfg.data.mixup_alpha = cfg.data.cutmix_alpha = cfg.data.color_jitter = 0.0
    cfg.data.max_bad_fraction = 1.0  # a plan reports bad data instead of stopping on it

    from mycodist.data.plan import format_table, run_plan  # torch loads only when the command runs
    from mycodist.data.spec import DataSpec

    spec = DataSpec.from_config(cfg)
    result = run_plan(cfg, spec, args.world_size, args.epochs, args.parallel)
    print(format_table(result))
    print(json.dumps(result))
    return 0 if result["ok"] else 1
