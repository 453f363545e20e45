"""The one description of a ViT's architecture, passed whole (as nanoGPT passes `GPTConfig`) and saved
with every checkpoint and export; and the attention runtime, which is not part of it.

`ViTConfig` holds what gives the weights their meaning: sizes, tokens, pooling, regularisation and the
attention mask (a mask changes what the model computes). `AttentionRuntime` holds how attention is
computed (flash-attn, SDPA, flex, math: the same results): a choice made where the model runs, resolved
once at build time (as timm's `fused_attn`), never a saved hyperparameter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mycodist.models.masks import MaskSpec

CONFIG_VERSION = 1


@dataclass(frozen=True)
class AttentionRuntime:
    backend: str = "auto"  # auto | flash_attn | sdpa | flex | math
    sdpa_kernel: str = "auto"  # auto | flash | efficient | cudnn | math
    flex_compile: bool = True  # torch.compile flex_attention (eager flex materialises the scores)


@dataclass(frozen=True)
class ViTConfig:
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_token: bool = True
    reg_tokens: int = 0
    global_pool: str = ""  # "" = token with a class token, else avg
    no_embed_class: bool | None = None  # None = True with register tokens (timm's reg models)
    pre_logits: int = 0
    init_values: float = 0.0  # LayerScale init; 0 = none
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mask: MaskSpec = field(default_factory=MaskSpec)

    def __post_init__(self) -> None:
        img = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
        object.__setattr__(self, "img_size", img)
        if isinstance(self.mask, dict):
            object.__setattr__(self, "mask", MaskSpec(**self.mask))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed dim {self.embed_dim} is not divisible by {self.num_heads} heads")
        if img[0] % self.patch_size or img[1] % self.patch_size:
            shown = img[0] if img[0] == img[1] else img
            raise ValueError(f"img_size={shown} is not a multiple of the patch size {self.patch_size}")
        pool = self.pool
        if pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got '{self.global_pool}'")
        if pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without it")

    @property
    def pool(self) -> str:
        return self.global_pool or ("token" if self.class_token else "avg")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with a version: what checkpoints and exports store."""
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        return {"version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(f"model config version {version} is newer than this mycodist reads ({CONFIG_VERSION}); "
                             "upgrade mycodist")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**{**d, "img_size": tuple(d.get("img_size", (224, 224)))})
