"""Attention masks on the ViT token layout ([prefix tokens..., patch tokens in row-major order]).

One mask_mod per kind serves every backend: FlexAttention turns it into a BlockMask (and skips empty
blocks, which is where block-sparse attention saves work); math and SDPA use the same predicate as a
dense boolean mask, so a sparse model can be checked against the reference exactly. Prefix tokens (class,
registers) stay global in every kind: they attend to everything and everything attends to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MASK_KINDS = ("dense", "local", "block_sparse")


@dataclass(frozen=True)
class MaskSpec:
    """What the user asked for (model.flex_* keys); the token layout comes from the model at forward time."""

    kind: str = "dense"
    window: int = 3  # local: attend within +-window rows and columns of the patch grid
    density: float = 0.25  # block_sparse: share of (query block, key block) pairs kept
    block: int = 128  # block_sparse pattern granularity and the flex kernel's block size
    seed: int = 0  # block_sparse: which blocks are kept (fixed, so every rank and every step agree)

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"unknown attention mask '{self.kind}'; choose one of {', '.join(MASK_KINDS)}")
        if self.kind == "local" and self.window < 0:
            raise ValueError(f"flex_window must be >= 0, got {self.window}")
        if self.kind == "block_sparse" and not 0.0 < self.density <= 1.0:
            raise ValueError(f"flex_density must be in (0, 1], got {self.density}")
        if self.block < 1:
            raise ValueError(f"flex_block must be >= 1, got {self.block}")


def block_keep_table(num_blocks: int, density: float, seed: int) -> torch.Tensor:
    """(nb, nb) bool: which (query block, key block) pairs are computed. The diagonal is always kept so
    every token sees itself; the rest are drawn without replacement up to round(density * nb²) pairs."""
    keep = torch.eye(num_blocks, dtype=torch.bool)
    target = max(num_blocks, round(density * num_blocks * num_blocks))
    off = (~keep).flatten().nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    chosen = off[torch.randperm(off.numel(), generator=gen)[: target - num_blocks]]
    keep.view(-1)[chosen] = True
    return keep


@dataclass
class TokenMask:
    """A mask for one token layout: `num_prefix` global tokens then a `grid` of patches."""

    spec: MaskSpec
    num_prefix: int
    grid: tuple[int, int]
    _block_masks: dict = field(default_factory=dict, repr=False)
    _dense: dict = field(default_factory=dict, repr=False)

    @property
    def seq_len(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1]

    @property
    def is_dense(self) -> bool:
        return self.spec.kind == "dense"

    def mask_mod(self, device: torch.device | str = "cpu") -> Callable | None:
        """The flex mask_mod(b, h, q_idx, kv_idx) -> bool tensor, or None for full attention."""
        p, (_, gw) = self.num_prefix, self.grid
        if self.spec.kind == "dense":
            return None
        if self.spec.kind == "local":
            w = self.spec.window

            def local(b, h, q_idx, kv_idx):
                qp, kp = q_idx - p, kv_idx - p
                near = ((qp // gw - kp // gw).abs() <= w) & ((qp % gw - kp % gw).abs() <= w)
                return (q_idx < p) | (kv_idx < p) | near

            return local
        bs = self.spec.block
        nb = -(-self.seq_len // bs)
        table = block_keep_table(nb, self.spec.density, self.spec.seed).to(device)

        def block_sparse(b, h, q_idx, kv_idx):
            return (q_idx < p) | (kv_idx < p) | table[q_idx // bs, kv_idx // bs]

        return block_sparse

    def dense(self, device: torch.device | str) -> torch.Tensor | None:
        """(N, N) bool, True = attend; what math and SDPA apply (and the CPU flex backward). None if dense."""
        if self.is_dense:
            return None
        key = str(device)
        if key not in self._dense:
            n = self.seq_len
            q = torch.arange(n, device=device).view(n, 1)
            kv = torch.arange(n, device=device).view(1, n)
            self._dense[key] = self.mask_mod(device)(None, None, q, kv)
        return self._dense[key]

    def block_mask(self, device: torch.device | str):
        """The flex BlockMask (cached per device); None means full attention without a mask."""
        if self.is_dense:
            return None
        key = str(device)
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            n = self.seq_len
            self._block_masks[key] = create_block_mask(
                self.mask_mod(device), None, None, n, n, device=device, BLOCK_SIZE=self.spec.block
            )
        return self._block_masks[key]

    def density(self) -> float:
        """Share of (query, key) pairs attended: what the sparse study reports beside accuracy."""
        m = self.dense("cpu")
        return 1.0 if m is None else m.float().mean().item()


class MaskCache:
    """One TokenMask per (prefix count, grid): masks are rebuilt only when the resolution changes."""

    def __init__(self, spec: MaskSpec) -> None:
        self.spec = spec
        self._masks: dict[tuple[int, tuple[int, int]], TokenMask] = {}

    def get(self, num_prefix: int, grid: tuple[int, int]) -> TokenMask:
        key = (num_prefix, tuple(grid))
        if key not in self._masks:
            self._masks[key] = TokenMask(self.spec, num_prefix, tuple(grid))
        return self._masks[key]
