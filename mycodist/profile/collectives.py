"""What one collective call moves: canonical op names, message sizes and the nccl-tests bus-bandwidth factors.

The size of a record follows nccl-tests: the whole buffer the op works on (all_gather: the gathered output;
reduce_scatter: the input before scattering; all_reduce/broadcast/reduce: the tensor). algbw = size / time;
busbw = algbw × factor, which makes numbers comparable across ops and world sizes because it equals what
each rank sends on a ring. `wire_bytes` = size × factor is that per-rank send volume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

# torch.distributed function name → canonical op name (several spellings of one collective).
CANONICAL_OPS: dict[str, str] = {
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_gather": "all_gather",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "all_gather_coalesced": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "all_to_all": "all_to_all",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
    "_broadcast_coalesced": "broadcast",
    "reduce": "reduce",
    "gather": "gather",
    "scatter": "scatter",
    "barrier": "barrier",
}

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "gather", "scatter", "barrier")


def busbw_factor(op: str, n: int) -> float:
    """nccl-tests' factor from algorithm bandwidth to bus bandwidth for `n` ranks (doc: PERFORMANCE.md)."""
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        return (n - 1) / n
    if op in ("broadcast", "reduce"):
        return 1.0
    return 0.0  # barrier: no payload


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        out: list[torch.Tensor] = []
        for item in x:
            out.extend(_tensors(item))
        return out
    return []


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def message(fn_name: str, args: tuple, kwargs: dict, group_size: int) -> tuple[str, torch.dtype | None, int, int]:
    """(canonical op, dtype, numel, bytes) of a torch.distributed call, from its arguments alone.

    Reads the buffer nccl-tests would count; never touches tensor data, so it costs no synchronisation.
    """
    op = CANONICAL_OPS.get(fn_name, fn_name)

    def arg(i: int, *names: str) -> Any:
        for n in names:
            if n in kwargs:
                return kwargs[n]
        return args[i] if len(args) > i else None

    scale = 1
    if op == "barrier":
        ts: list[torch.Tensor] = []
    elif fn_name == "_broadcast_coalesced":  # (process_group, tensors, buffer_size, src): DDP's buffer sync
        ts = _tensors(args[1] if len(args) > 1 else kwargs.get("tensors"))
    elif fn_name in ("all_gather", "all_to_all"):  # list forms: the gathered / received list
        ts = _tensors(arg(0, "tensor_list", "output_tensor_list"))
    elif fn_name == "gather":  # only the destination holds the list: count tensor × ranks everywhere
        ts, scale = _tensors(arg(0, "tensor")), group_size
    elif fn_name == "scatter":
        ts, scale = _tensors(arg(0, "tensor")), group_size
    elif fn_name == "reduce_scatter":  # list form: the inputs before reduction
        ts = _tensors(arg(1, "input_list"))
    elif op == "all_gather":  # *_single / into_tensor / _base / coalesced: the output buffer(s)
        ts = _tensors(arg(0, "output_tensor", "output_tensors"))
    elif op in ("reduce_scatter", "all_to_all"):  # tensor forms: the input buffer
        ts = _tensors(arg(1, "input"))
    else:  # all_reduce, broadcast, reduce (+ coalesced lists)
        ts = _tensors(arg(0, "tensor", "tensors"))
    dtype = ts[0].dtype if ts else None
    return op, dtype, scale * sum(t.numel() for t in ts), scale * _nbytes(ts)


@dataclass
class CommRecord:
    """One collective as recorded: what, how big, on how many ranks, how long, from where."""

    op: str
    fn: str
    dtype: str | None
    numel: int
    bytes: int
    group_size: int
    start_s: float  # seconds from the start of the step (host or device clock)
    duration_s: float | None  # None: not timeable (e.g. issued inside a coalescing manager)
    async_op: bool
    source: str  # "torch.distributed", "ddp_bucket", ...
    phase: str | None
    step: int

    @property
    def wire_bytes(self) -> float:
        return self.bytes * busbw_factor(self.op, self.group_size)

    @property
    def algbw(self) -> float | None:
        """Bytes per second of the message (nccl-tests algbw)."""
        if not self.duration_s:
            return None
        return self.bytes / self.duration_s

    @property
    def busbw(self) -> float | None:
        a = self.algbw
        return None if a is None else a * busbw_factor(self.op, self.group_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(wire_bytes=self.wire_bytes, algbw=self.algbw, busbw=self.busbw)
        return d
