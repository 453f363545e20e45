"""What a run tells the world while it trains (rank 0): train_log.jsonl (one JSON object per logged step
or evaluation: what tests, plots and `mycodist.train.curves` read), TensorBoard, the tqdm bar."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from mycodist.train.board import Board

LOG_FILE = "train_log.jsonl"


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class RunLog:
    def __init__(self, run_dir: Path, is_main: bool, tensorboard: bool) -> None:
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.board = Board(self.run_dir / "tb" if is_main and tensorboard else None)
        self.bar: Any = None

    def line(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.run_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def open_bar(self, step: int, total: int) -> None:
        if self.is_main and step < total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def train_step(self, record: dict[str, Any], phase_s: dict[str, float]) -> None:
        """One logged train point: the JSON line, the TensorBoard scalars, the bar's postfix."""
        self.line({"kind": "train", **record})
        self.board.scalars(record["step"], {
            "train/loss": record["loss"], "train/lr": record["lr"], "train/grad_norm": record["grad_norm"],
            "perf/images_per_s": record["images_per_s"], "perf/data_wait_frac": record["data_wait_frac"],
            "perf/mem_gb": record["mem_gb"], "data/bad_samples": record["bad_samples"],
            **{f"perf/{k}_s": v for k, v in phase_s.items()},
        })
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
