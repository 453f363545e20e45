"""`mycodist export RUN_DIR [--checkpoint CKPT]`: the export stage as a command (docs/training.md, "Export")."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import DictConfig

from mycodist.config import CONFIG_FILENAME, load_config
from mycodist.errors import UsageError
from mycodist.export.build import export_run
from mycodist.train import checkpoint as ck


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run folder (train.output_dir)")
    parser.add_argument("--checkpoint", help="a checkpoint folder to export instead of the newest complete one")
    parser.add_argument("--device", default=None, help="where the calibration forwards run (default: a GPU if any)")
    parser.add_argument("--onnx", action="store_true",
                        help="also write ONNX graphs (fp32 + int8) for serve.runtime=onnxruntime (= export.onnx=true)")


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_FILENAME).is_file():
        raise UsageError(f"'{run_dir}' is not a training run folder (no {CONFIG_FILENAME}); "
                         "pass the train.output_dir of a run")
    run_cfg = load_config(run_dir / CONFIG_FILENAME, args.overrides)
    if args.onnx:
        run_cfg.export.onnx = True
    ckpt = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        if not (ckpt / ck.META).is_file():
            raise UsageError(f"--checkpoint '{ckpt}' is not a complete checkpoint folder (no {ck.META})")
    print(export_run(run_dir, ckpt, run_cfg, device=args.device))
    return 0
