"""The Vision Transformer, with timm's parameter names so timm and original-project checkpoints load as is.

Layout: patch_embed.proj (conv) → [cls_token, reg_token..., patches] + pos_embed → blocks → norm → pool →
fc_norm → pre_logits (optional Linear+Tanh, the original JAX representation layer) → head.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mycodist.models.attention import Attention
from mycodist.models.masks import MaskCache, TokenMask
from mycodist.models.vit_config import AttentionRuntime, ViTConfig


def to_2tuple(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix: int
) -> torch.Tensor:
    """Bicubic (antialiased) resize of the patch part of (1, P + h*w, D) position embeddings; the P prefix
    positions are kept. Same rule as timm, so a resized checkpoint matches theirs."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv; accepts any size divisible by the patch (channels-last too)."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        p = self.patch_size[0]
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}; resize or crop to a multiple")
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch, rescaling the survivors."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0, runtime: AttentionRuntime | None = None) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(cfg, runtime)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, cfg.mlp_hidden, cfg.drop_rate)
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: TokenMask | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT classifier built from one `ViTConfig`. `pool='token'` uses the class token, `'avg'` averages
    patch tokens (then fc_norm instead of norm, as timm does). With register tokens the position embedding
    skips the prefix tokens (`no_embed_class`, as in timm's reg models) unless told otherwise. The attention
    runtime (kernel choice) is separate: it changes how, not what, the model computes."""

    def __init__(self, cfg: ViTConfig, runtime: AttentionRuntime | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.pool
        self.embed_dim = self.num_features = cfg.embed_dim
        self.num_reg_tokens = cfg.reg_tokens
        self.num_prefix_tokens = int(cfg.class_token) + cfg.reg_tokens
        self.no_embed_class = cfg.reg_tokens > 0 if cfg.no_embed_class is None else cfg.no_embed_class
        self.grad_checkpointing = False
        embed_dim = cfg.embed_dim

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, embed_dim)) if cfg.reg_tokens else None
        embed_len = self.patch_embed.num_patches + (0 if self.no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.masks = MaskCache(cfg.mask)

        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, as timm
        self.blocks = nn.ModuleList(Block(cfg, dpr[i], runtime) for i in range(cfg.depth))
        use_fc_norm = self.global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        if cfg.pre_logits:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(embed_dim, cfg.pre_logits), act=nn.Tanh()))
            self.num_features = cfg.pre_logits
        else:
            self.pre_logits = nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's default ViT init: normal(0.02) for linears and pos_embed, tiny prefix tokens. (timm calls
        trunc_normal_ with bounds ±2, i.e. 100σ: the same distribution, and plain normal_ is ~3× faster.)"""
        nn.init.normal_(self.pos_embed, std=0.02)
        for t in (self.cls_token, self.reg_token):
            if t is not None:
                nn.init.normal_(t, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.normal_(w, std=math.sqrt(1.0 / w[0].numel()))  # lecun normal, like the JAX original

    # -- API the trainer and server use ---------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {n for n in ("pos_embed", "cls_token", "reg_token") if getattr(self, n) is not None}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward: activation memory O(1 block) instead of O(depth)."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.cfg = self.cfg.replace(num_classes=num_classes)
        device = self.pos_embed.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def resolve_attention(self, device_type: str, dtype: torch.dtype) -> str:
        """Fix every block's attention kernel for this device and compute dtype (call after choosing where the
        model runs, before torch.compile); returns the kernel. `model.attention=auto` logs its choice here."""
        grid = self.patch_embed.grid_size
        mask = self.token_mask(grid)
        kernels = {blk.attn.resolve(device_type, dtype, mask) for blk in self.blocks}
        return kernels.pop() if len(kernels) == 1 else ",".join(sorted(kernels))

    def token_mask(self, grid: tuple[int, int]) -> TokenMask | None:
        """The attention mask for this resolution (None for full attention)."""
        mask = self.masks.get(self.num_prefix_tokens, grid)
        return None if mask.is_dense else mask

    # -- forward ----------------------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        embedded_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        pos = resample_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, embedded_prefix)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, prefix + patches, D) normalised tokens."""
        x, grid = self.patch_embed(x)
        x = self._pos_embed(x, grid)
        mask = self.token_mask(grid)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens → pooled features (pre_logits=True: what the head sees) or logits."""
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.pre_logits(self.fc_norm(x))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
