"""Model names → architectures, and the one place the `model` config group becomes a model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mycodist.errors import UsageError
from mycodist.models.masks import MaskSpec
from mycodist.models.vit import VisionTransformer

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
ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size")


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


def create_model(
    name: str,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] = 224,
    attention: str = "auto",
    drop_path_rate: float = 0.0,
    **kw: Any,
) -> VisionTransformer:
    """A ViT by name. `kw` may override the architecture (embed_dim, depth, num_heads, mlp_ratio,
    patch_size; tests use tiny ones) and pass any VisionTransformer option (reg_tokens, mask, ...)."""
    size, patch = parse_name(name)
    arch = dict(embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads, mlp_ratio=size.mlp_ratio)
    arch["patch_size"] = patch
    arch.update({k: kw.pop(k) for k in ARCH_KEYS if k in kw})
    img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if img[0] % arch["patch_size"] or img[1] % arch["patch_size"]:
        raise UsageError(f"model.img_size={img_size} is not a multiple of the patch size {arch['patch_size']}")
    return VisionTransformer(
        img_size=img, num_classes=num_classes, attention=attention, drop_path_rate=drop_path_rate, **arch, **kw
    )


def _get(cfg: DictConfig | dict, key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def build_model(cfg: DictConfig | dict, num_classes: int) -> VisionTransformer:
    """The `model` config group → a ready model: pretrained weights loaded (head reset to `num_classes`),
    gradient checkpointing and channels-last applied. Bad values are UsageErrors naming the key."""
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
    for key, low, high in (("drop_path_rate", 0, 1), ("drop_rate", 0, 1), ("attn_drop", 0, 1)):
        v = float(_get(cfg, key, 0.0))
        if not low <= v < high:
            raise UsageError(f"model.{key}={v} must be in [{low}, {high})")
    try:
        model = create_model(
            str(_get(cfg, "name", "vit_tiny_patch16")),
            num_classes=num_classes,
            img_size=int(_get(cfg, "img_size", 224)),
            attention=str(_get(cfg, "attention", "auto")),
            drop_path_rate=float(_get(cfg, "drop_path_rate", 0.0)),
            sdpa_kernel=str(_get(cfg, "sdpa_kernel", "auto")),
            mask=mask,
            flex_compile=bool(_get(cfg, "flex_compile", True)),
            drop_rate=float(_get(cfg, "drop_rate", 0.0)),
            attn_drop_rate=float(_get(cfg, "attn_drop", 0.0)),
            init_values=float(_get(cfg, "layer_scale_init", 0.0)),
            reg_tokens=int(_get(cfg, "reg_tokens", 0)),
            class_token=bool(_get(cfg, "class_token", True)),
            pre_logits=int(_get(cfg, "pre_logits", 0)),
        )
    except ValueError as e:
        raise UsageError(f"model: {e}") from None
    pretrained = str(_get(cfg, "pretrained", ""))
    if pretrained:
        from mycodist.models.weights import load_pretrained

        load_pretrained(model, pretrained, num_classes=num_classes)
    model.set_grad_checkpointing(bool(_get(cfg, "grad_checkpointing", False)))
    if bool(_get(cfg, "channels_last", False)):
        model = model.to(memory_format=torch.channels_last)
    return model
