"""Pretrained weights from local files only: timm .safetensors/.pth, the original project's checkpoints
(pre_logits.fc + head), and the original JAX .npz. Nothing is unpickled beyond tensors (weights_only=True
or safetensors) and nothing is downloaded.

Adapting a checkpoint to the model: position embeddings are resampled to the model's grid, a head whose
shape differs (other class count) is left freshly initialised, and a pre-logits layer the model does not
have is dropped together with the head (the original project's fine-tuning rule). Anything else that does
not fit is an error listing the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mycodist.errors import UsageError
from mycodist.models.jax_npz import read_jax_npz
from mycodist.models.vit import VisionTransformer, resample_pos_embed

log = logging.getLogger("mycodist.models")

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "model_ema", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class LoadReport:
    """What load_pretrained changed, for the log and for tests."""

    path: str
    head_reset: bool = False
    pos_embed_resized: tuple | None = None
    dropped: list[str] = field(default_factory=list)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict in a training checkpoint ({'model': ...}, {'state_dict': ...}, ...)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
    raise UsageError(f"{path}: no state dict of tensors found (looked at the top level and {_CONTAINER_KEYS})")


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP/torch.compile prefixes ('module.', '_orig_mod.') when every key carries them."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if state and all(k.startswith(p) for k in state):
                state = {k[len(p) :]: v for k, v in state.items()}
                changed = True
    return state


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A checkpoint file → (timm-named state dict, keys that could not be converted)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"pretrained weights '{path}' do not exist (model.pretrained takes a local file)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return _strip_wrappers(load_file(str(path), device="cpu")), []
    if suffix == ".npz":
        try:
            return read_jax_npz(path)
        except (ValueError, KeyError) as e:
            raise UsageError(f"{path}: not a JAX ViT .npz ({e})") from None
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UsageError(
                f"{path}: refusing to unpickle non-tensor objects (weights_only=True): {str(e).splitlines()[0]}; "
                "re-save it as a plain state dict or .safetensors"
            ) from None
        return _strip_wrappers(_unwrap(obj, path)), []
    raise UsageError(f"{path}: unknown weight format '{suffix}'; use .safetensors, .pth/.pt/.bin or .npz")


def _old_grid(n_patches: int, path: str) -> tuple[int, int]:
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise UsageError(f"{path}: pos_embed has {n_patches} patch positions, not a square grid")
    return (side, side)


def adapt_state_dict(
    state: dict[str, torch.Tensor], model: VisionTransformer, report: LoadReport
) -> dict[str, torch.Tensor]:
    """Fit a checkpoint to `model`: resample pos_embed, drop a head of another shape or an unused pre-logits."""
    state = dict(state)
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        pos = state["pos_embed"]
        old = _old_grid(pos.shape[1] - prefix, report.path)
        new = model.patch_embed.grid_size
        state["pos_embed"] = resample_pos_embed(pos, new, old, prefix)
        report.pos_embed_resized = (old, new)
        log.info("%s: position embeddings resampled from grid %s to %s", report.path, old, new)
    if any(k.startswith("pre_logits.") for k in state) and not any(k.startswith("pre_logits.") for k in own):
        drop = [k for k in state if k.startswith(("pre_logits.", "head."))]
        report.dropped += drop
        report.head_reset = True
        for k in drop:
            del state[k]
        log.info("%s: checkpoint has a pre-logits layer the model does not use; dropped it and the head", report.path)
    head_keys = [k for k in state if k.startswith("head.")]
    if head_keys and any(k not in own or own[k].shape != state[k].shape for k in head_keys):
        report.dropped += head_keys
        report.head_reset = True
        for k in head_keys:
            del state[k]
        log.info("%s: head shape differs from the model's (%d classes); head freshly initialised",
                 report.path, model.num_classes)
    return state


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained(
    model: VisionTransformer, path: str | os.PathLike, num_classes: int | None = None
) -> LoadReport:
    """Load local weights into `model` in place (see module doc for the adaptation rules). With
    `num_classes` given and different from the model's, the head is replaced first."""
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    report = LoadReport(path=str(path))
    state, unconverted = read_state_dict(path)
    state = adapt_state_dict(state, model, report)
    own = model.state_dict()
    allowed_missing = {k for k in own if k.startswith("head.")} if report.head_reset else set()
    missing = sorted(k for k in own if k not in state and k not in allowed_missing)
    unexpected = sorted(unconverted + [k for k in state if k not in own])
    shape = sorted(
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if shape:
            parts.append(f"shape mismatches: {_listing(shape)}")
        raise UsageError(
            f"{path} does not fit this model ({'; '.join(parts)}); check model.name, reg_tokens, class_token, "
            "pre_logits and init_values match the checkpoint"
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    log.info("loaded %s (%d tensors)%s", path, len(state), " with a fresh head" if report.head_reset else "")
    return report
