"""Exponential moving average of the weights, kept in fp32 on each rank (every rank updates the same
copy from identical weights, so nothing is communicated)."""

from __future__ import annotations

import torch

from mycodist.errors import UsageError


class WeightEma:
    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int) -> None:
        if zero_stage == 3:
            raise UsageError("train.ema_decay needs whole weights on each rank; it does not work with "
                             "train.zero_stage=3 (use stage 2, or set train.ema_decay=0)")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                       if v.dtype.is_floating_point}

    def decay_at(self, step: int) -> float:
        """Warm up the decay so early weights (random init) fade out quickly."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
