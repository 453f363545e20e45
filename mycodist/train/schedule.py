"""LR as a pure function of the optimizer step: nothing to checkpoint but the step, and every engine
(DeepSpeed wraps the optimizer) gets the same value written into its param groups."""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr(self, step: int) -> float:
        """LR for optimizer step `step` (0-based): linear warmup to peak, then cosine to min_lr."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * progress))


def scaled_lr(cfg: DictConfig, global_batch: int) -> float:
    """Linear scaling rule: train.lr is quoted for train.lr_base_batch images per optimizer step."""
    base = int(cfg.train.lr_base_batch)
    return float(cfg.train.lr) * (global_batch / base if base > 0 else 1.0)


def make_schedule(cfg: DictConfig, global_batch: int, steps_per_epoch: int, total_steps: int) -> Schedule:
    t = cfg.train
    warmup = int(t.warmup_steps) if t.warmup_steps > 0 else round(float(t.warmup_epochs) * steps_per_epoch)
    peak = scaled_lr(cfg, global_batch)
    return Schedule(peak_lr=peak, min_lr=min(float(t.min_lr), peak), warmup_steps=min(warmup, total_steps),
                    total_steps=total_steps)
