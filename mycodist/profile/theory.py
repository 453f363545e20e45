"""Bytes a training step must move, from the parameter count, dtype and world size alone.

Sizes are nccl-tests message sizes (all-reduce: the tensor; all-gather: the gathered output;
reduce-scatter: the input), summed per op; `wire` multiplies each by its bus-bandwidth factor, which is
what every rank sends on a ring. With Ψ elements of b bytes and n ranks (ZeRO paper, Rajbhandari et al.
2020, §7): DDP all-reduces Ψ (wire 2(n−1)/n·Ψb); ZeRO-1/2 as in the paper reduce-scatter the gradients and
all-gather the updated parameters (same wire as DDP); ZeRO-3 all-gathers parameters in forward and again
in backward and reduce-scatters gradients (1.5× DDP's wire).

What DeepSpeed 0.19.8 actually sends differs, and the default engine theory follows DeepSpeed (the test
checks it against measurement):
- ZeRO-1/2 (`use_multi_rank_bucket_allreduce`, on by default) ALL-REDUCE the gradient buckets (Ψ, no
  padding) instead of reducing them to their owners, then all-gather the parameter partitions (flat group
  padded to a multiple of 2n elements); plus one fp32 element per optimizer parameter group all-reduced
  (the overflow check / norm; measured: 28 groups → 28 × 4 bytes).
  Wire: 2(n−1)/n·Ψb + (n−1)/n·Ψb = 1.5× DDP.
- ZeRO-3 all-gathers each partitioned parameter (padded to a multiple of n elements) in forward and in
  backward, and reduce-scatters the padded gradients; parameters of at most `stage3_param_persistence_threshold`
  elements stay whole on every rank and are all-gathered once after the optimizer step (their gradients are
reduce-scattered like the rest); one fp64 element
  (the gradient norm) per optimizer parameter group is all-reduced. With `stage3_max_reuse_distance: 0` parameters are released between
  forward and backward and gathered twice. DeepSpeed's default (1e9 elements) keeps a gathered parameter
  while its next use lies within that many elements of the module trace; the next use of any parameter
  lies within 2Ψ (rest of forward + backward up to it), so with a distance ≥ 2Ψ nothing is gathered again
  in backward (all-gather 1×). Between 0 and 2Ψ only some are kept: the 2× figure is then an upper bound.
- FSDP2 (`fully_shard` per block and on the root) pads dim 0 of each parameter to a multiple of n, gathers
  in forward and again in backward, except the root module's own parameters, which it keeps after forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from mycodist.profile.collectives import busbw_factor

ENGINES = ("ddp", "zero0", "zero1", "zero2", "zero3", "fsdp", "zero1_paper", "zero2_paper")


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def _numel(x: int | Sequence[int]) -> int:
    return int(x) if isinstance(x, int) else math.prod(int(d) for d in x)


def _fsdp_padded(x: int | Sequence[int], n: int) -> int:
    """FSDP2 shards dim 0 in n equal chunks: dim 0 is padded up to a multiple of n (a bare count: whole)."""
    if isinstance(x, int) or len(x) == 0:
        return _ceil_to(_numel(x), n)
    return _ceil_to(int(x[0]), n) * (_numel(x) // max(int(x[0]), 1))


def theory_bytes_per_step(engine: str, param_numels: Iterable[int | Sequence[int]], world_size: int,
                          dtype_bytes: int = 4, persistence_threshold: int = 0,
                          group_numels: Iterable[int] | None = None, resident_numel: int = 0,
                          max_reuse_distance: int = 0, reduce_bytes: int | None = None) -> dict:
    """Expected {"by_op": {op: bytes}, "total", "wire_by_op", "wire_total"} for one optimizer step.

    `param_numels`: element count (or shape) of every trainable parameter; `group_numels`: DeepSpeed's
    optimizer parameter groups (default: one group of everything); `dtype_bytes`: bytes per element on the
    wire; `resident_numel`: FSDP2 elements kept unsharded after forward (the root module's own parameters);
    `max_reuse_distance`: ZeRO-3's stage3_max_reuse_distance (see the module docstring); `reduce_bytes`:
    bytes per element of the FSDP2 gradient reduce-scatter when it differs from the parameters' (bf16
    parameters with fp32 `reduce_dtype`: 4).
    """
    shapes = list(param_numels)
    numels = [_numel(x) for x in shapes]
    n = int(world_size)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    psi = sum(numels)
    by_op: dict[str, int] = {}
    if n > 1:
        if engine in ("ddp", "zero0"):
            by_op["all_reduce"] = psi * dtype_bytes
        elif engine in ("zero1", "zero2"):
            groups = list(group_numels) if group_numels is not None else [psi]
            by_op["all_reduce"] = psi * dtype_bytes + 4 * len(groups)  # gradient buckets + one fp32 per group
            by_op["all_gather"] = sum(_ceil_to(g, 2 * n) for g in groups) * dtype_bytes
        elif engine in ("zero1_paper", "zero2_paper"):
            by_op["reduce_scatter"] = psi * dtype_bytes
            by_op["all_gather"] = psi * dtype_bytes
        elif engine == "zero3":
            padded = [_ceil_to(x, n) for x in numels]
            # DeepSpeed keeps a parameter whole when ds_numel <= stage3_param_persistence_threshold
            persistent = sum(p for p, x in zip(padded, numels, strict=True) if x <= persistence_threshold)
            partitioned = sum(p for p, x in zip(padded, numels, strict=True) if x > persistence_threshold)
            gathers = 1 if max_reuse_distance >= 2 * psi else 2  # forward, and again in backward unless kept
            by_op["all_gather"] = (gathers * partitioned + persistent) * dtype_bytes
            by_op["reduce_scatter"] = (partitioned + persistent) * dtype_bytes
            n_groups = len(list(group_numels)) if group_numels is not None else 1
            by_op["all_reduce"] = 8 * n_groups  # the fp64 gradient norm, one per optimizer parameter group
        elif engine == "fsdp":  # FSDP2 FULL_SHARD: gather in forward, again in backward except the root's
            padded = sum(_fsdp_padded(x, n) for x in shapes)
            by_op["all_gather"] = (2 * padded - resident_numel) * dtype_bytes
            by_op["reduce_scatter"] = padded * (reduce_bytes or dtype_bytes)
    wire = {op: b * busbw_factor(op, n) for op, b in by_op.items()}
    return {"engine": engine, "world_size": n, "params": psi, "dtype_bytes": dtype_bytes,
            "by_op": by_op, "total": sum(by_op.values()), "wire_by_op": wire, "wire_total": sum(wire.values())}
