"""Optimizer parameter groups with layer-wise LR decay (BEiT/timm rule) and the usual weight-decay split.

Layer ids: the embedding stem (patch_embed, cls/reg tokens, pos_embed) is 0, blocks.i is i + 1, everything
after the blocks (norm, fc_norm, pre_logits, head) is depth + 1. A group's LR is base_lr * lr_scale with
lr_scale = layer_decay ** (depth + 1 - layer_id): the head trains at the full LR, early layers slower.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_STEM = ("patch_embed.", "cls_token", "reg_token", "pos_embed")


def layer_id(name: str, depth: int) -> int:
    """Which layer a parameter belongs to for LR decay."""
    if name.startswith(_STEM):
        return 0
    m = _BLOCK.match(name)
    return int(m[1]) + 1 if m else depth + 1


def param_groups_layer_decay(
    model: nn.Module, weight_decay: float, layer_decay: float, lr: float | None = None
) -> list[dict[str, Any]]:
    """Param groups for torch optimizers. No weight decay for 1-D params (norms, biases, LayerScale) and
    model.no_weight_decay() (pos_embed, tokens). Each group has `lr_scale` (multiply your schedule's LR by
    it every step); with `lr` given, `lr` is also set to lr * lr_scale."""
    depth = len(model.blocks)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name in skip)
        lid = layer_id(name, depth)
        g = groups.get((lid, decay))
        if g is None:
            scale = layer_decay ** (depth + 1 - lid)
            g = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale, "layer_id": lid}
            if lr is not None:
                g["lr"] = lr * scale
            groups[(lid, decay)] = g
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]
