"""Exponential moving average of the weights, kept in fp32 on each rank (every rank updates the same
copy from identical weights, so nothing is communicated). Built from the plain module, before any
compile, so its names are the model's own and it loads strictly into a fresh model."""

from __future__ import annotations

import torch

from mycodist.errors import UsageError


class WeightEma:
    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int) -> None:
        if zero_stage == 3:
            raise UsageError("train.ema_decay needs whole weights on each rank; it does not work with "
                             "train.zero_stage=3 (use stage 2, or set train.ema_decay=0)")
        self.decay = decay
        # every entry, so a fresh model loads it with strict=True; integer buffers are copied, not averaged
        self.shadow = {k: (v.detach().float() if v.dtype.is_floating_point else v.detach()).clone()
                       for k, v in module.state_dict().items()}

    def decay_at(self, step: int) -> float:
        """Warm up the decay so early weights (random init) fade out quickly."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if s.dtype.is_floating_point:
                s.mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise UsageError(f"the checkpoint's EMA does not match this model (missing {missing[:5]}, "
                             f"unexpected {extra[:5]}); resume with the same model config or train.resume=none")
        for k, v in state.items():
            self.shadow[k].copy_(v)
