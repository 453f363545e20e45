"""Model names → architectures, and the one place the `model` config group becomes a model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mycodist.errors import UsageError
from mycodist.models.masks import MaskSpec
from mycodist.models.vit import VisionTransformer
from mycodist.models.vit_config import AttentionRuntime, ViTConfig

if TYPE_CHECKING:  # omegaconf is not needed to build models (the GPU benchmark runs without it)
    from omegaconf import DictConfig


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


# timm's widths and depths (vision_transformer.py): ViT-Ti/S/B/L/H and ViT-g ("little g", mlp 6144).
SIZES: dict[str, ViTSize] = {
    "tiny": ViTSize(192, 12, 3),
    "small": ViTSize(384, 12, 6),
    "base": ViTSize(768, 12, 12),
    "large": ViTSize(1024, 24, 16),
    "huge": ViTSize(1280, 32, 16),
    "giant": ViTSize(1408, 40, 16, 48 / 11),
}
PATCHES = (8, 14, 16)
_NAME = re.compile(r"^vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)$")


def model_names() -> list[str]:
    return [f"vit_{s}_patch{p}" for s in SIZES for p in PATCHES]


def parse_name(name: str) -> tuple[ViTSize, int]:
    """'vit_base_patch16' → (size, 16); also accepts timm's '_224' style suffixes by ignoring them."""
    base = re.sub(r"_\d+$", "", name) if re.search(r"_patch\d+_\d+$", name) else name
    m = _NAME.match(base)
    if not m or m["size"] not in SIZES or int(m["patch"]) not in PATCHES:
        raise UsageError(
            f"unknown model '{name}'; names are vit_{{{','.join(SIZES)}}}_patch{{{','.join(map(str, PATCHES))}}}, "
            f"e.g. vit_tiny_patch16"
        )
    return SIZES[m["size"]], int(m["patch"])


RUNTIME_KEYS = ("sdpa_kernel", "flex_compile")


def vit_config(name: str, num_classes: int = 1000, img_size: int | tuple[int, int] = 224, **arch: Any) -> ViTConfig:
    """A named size (vit_{size}_patch{p}) as a ViTConfig; `arch` overrides any field (tests use tiny ones)."""
    size, patch = parse_name(name)
    base = dict(embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads, mlp_ratio=size.mlp_ratio,
                patch_size=patch)
    try:
        return ViTConfig(img_size=img_size, num_classes=num_classes, **{**base, **arch})
    except ValueError as e:
        raise UsageError(f"model: {e}") from None


def create_model(
    name: str,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] = 224,
    attention: str = "auto",
    **kw: Any,
) -> VisionTransformer:
    """A ViT by name. `kw` takes any ViTConfig field (embed_dim, depth, reg_tokens, mask, drop_path_rate, ...)
    and the attention runtime's `sdpa_kernel` / `flex_compile`."""
    runtime = AttentionRuntime(backend=attention, **{k: kw.pop(k) for k in RUNTIME_KEYS if k in kw})
    return VisionTransformer(vit_config(name, num_classes, img_size, **kw), runtime)


def _get(cfg: DictConfig | dict, key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def model_config(cfg: DictConfig | dict, num_classes: int) -> ViTConfig:
    """The `model` config group → the architecture (what checkpoints and exports store). Bad values are
    UsageErrors naming the key."""
    try:
        mask = MaskSpec(
            kind=str(_get(cfg, "flex_mask", "dense")),
            window=int(_get(cfg, "flex_window", 3)),
            density=float(_get(cfg, "flex_density", 0.25)),
            block=int(_get(cfg, "flex_block", 128)),
            seed=int(_get(cfg, "flex_seed", 0)),
        )
    except ValueError as e:
        raise UsageError(f"model.flex_*: {e}") from None
    for key, low, high in (("drop_path_rate", 0, 1), ("drop_rate", 0, 1), ("attn_drop_rate", 0, 1)):
        v = float(_get(cfg, key, 0.0))
        if not low <= v < high:
            raise UsageError(f"model.{key}={v} must be in [{low}, {high})")
    return vit_config(
        str(_get(cfg, "name", "vit_tiny_patch16")),
        num_classes=num_classes,
        img_size=int(_get(cfg, "img_size", 224)),
        drop_path_rate=float(_get(cfg, "drop_path_rate", 0.0)),
        mask=mask,
        drop_rate=float(_get(cfg, "drop_rate", 0.0)),
        attn_drop_rate=float(_get(cfg, "attn_drop_rate", 0.0)),
        init_values=float(_get(cfg, "init_values", 0.0)),
        reg_tokens=int(_get(cfg, "reg_tokens", 0)),
        class_token=bool(_get(cfg, "class_token", True)),
        pre_logits=int(_get(cfg, "pre_logits", 0)),
    )


def attention_runtime(cfg: DictConfig | dict) -> AttentionRuntime:
    """The `model` group's runtime keys: how attention is computed where the model runs."""
    return AttentionRuntime(backend=str(_get(cfg, "attention", "auto")), sdpa_kernel=str(_get(cfg, "sdpa_kernel", "auto")),
                            flex_compile=bool(_get(cfg, "flex_compile", True)))


def build_model(cfg: DictConfig | dict, num_classes: int, runtime: AttentionRuntime | None = None) -> VisionTransformer:
    """The `model` config group → a ready model: pretrained weights loaded (head reset to `num_classes`),
    gradient checkpointing and channels-last applied. `runtime` overrides the group's attention keys."""
    model = VisionTransformer(model_config(cfg, num_classes), runtime or attention_runtime(cfg))
    pretrained = str(_get(cfg, "pretrained", ""))
    if pretrained:
        from mycodist.models.weights import load_pretrained

        load_pretrained(model, pretrained, num_classes=num_classes)
    model.set_grad_checkpointing(bool(_get(cfg, "grad_checkpointing", False)))
    if bool(_get(cfg, "channels_last", False)):
        model = model.to(memory_format=torch.channels_last)
    return model
