"""What every rank runs under `accelerate launch`, `deepspeed` or `torchrun`: parse our arguments and
the ones the launchers add (`--local_rank`, `--deepspeed_config`), load the config, train; then rank 0 runs
the export stage on the device it trained on. A composition root (like cli.py): it joins the train and
export stages, which never import each other downstream."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mycodist.config import load_config, split_overrides
from mycodist.errors import UsageError


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="launch/train.py", description="one training rank (started by a launcher)",
                                epilog="Trailing key=value items override config keys (docs/training.md).")
    p.add_argument("--config", metavar="FILE", help="YAML merged over configs/default.yaml")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--deepspeed", action="store_true", help="use the DeepSpeed engine (same as train.engine=deepspeed)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   help="a DeepSpeed JSON (same as train.deepspeed_config=...)")
    return p.parse_args(rest), overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.local_rank is not None:  # the deepspeed launcher passes it; torch reads LOCAL_RANK
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        os.environ.setdefault("MYCODIST_LAUNCHER", "deepspeed")
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    if args.deepspeed:
        overrides.append("train.engine=deepspeed")
    try:
        cfg = load_config(args.config, overrides)
        from mycodist.train.trainer import run_training

        outcome = run_training(cfg)
        if outcome.is_main and cfg.train.export:
            from mycodist.export import export_run

            out = export_run(Path(cfg.train.output_dir), device=outcome.device)  # rank 0's GPU, not its CPU
            print(f"exported {out}", flush=True)
            print(f"TensorBoard: tensorboard --logdir {Path(cfg.train.output_dir) / 'tb'} --host 127.0.0.1 "
                  "--port 6006", flush=True)
        return 0
    except UsageError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
