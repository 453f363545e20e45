"""See every collective a step issues, at the Python boundary where all engines meet, without syncing.

Why here: DeepSpeed's `deepspeed.comm` (its TorchBackend), FSDP (1 and 2) and user code all end in the
`torch.distributed` functions, so wrapping those (in `torch.distributed` and `distributed_c10d`, where the
aliases call each other) sees them all once. DDP is the exception: its C++ reducer calls the ProcessGroup
directly, so `ddp_comm_hook` replaces DDP's built-in bucket all-reduce with the same all-reduce issued from
Python (gradients pre-scaled by 1/world like the built-in path), which the wrappers then see.
`Work.wait()` is timed too: that is where the host stalls on an async collective (exposed comm).

Timing never adds a synchronisation: a blocking call is timed around the call; an async one from issue
to its future's completion (host clock on CPU; CUDA events on GPU, read at the end of the step). Wrappers
are installed only while a profiling window is open, so outside a window the cost is nil.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from mycodist.profile.collectives import CANONICAL_OPS, CommRecord, message

_WRAPPED_ATTR = "__mycodist_original__"
# DeepSpeed's TorchBackend caches these two functions at start-up; repoint them too while recording.
_DS_CACHED = ("all_gather_function", "reduce_scatter_function")


class HostClock:
    """Seconds on the host (perf_counter): the right clock for CPU backends, whose work the host waits on."""

    device = "cpu"

    def mark(self) -> float:
        return time.perf_counter()

    def async_end(self, work: Any) -> Any:
        holder: list[float] = []
        fut = work.get_future()
        fut.add_done_callback(lambda _f: holder.append(time.perf_counter()))
        return (holder, fut)

    def seconds(self, origin: Any, token: Any) -> float | None:
        if isinstance(token, tuple):  # async: (holder, future)
            holder, fut = token
            if not holder:
                fut.wait()  # by step end the engine has waited anyway; this only collects the callback
                for _ in range(1000):  # the callback may run a hair after wait() returns
                    if holder:
                        break
                    time.sleep(1e-5)
            return holder[0] - origin if holder else None
        return token - origin


class CudaClock:
    """CUDA events on the current stream: device time of NCCL kernels, read without syncing mid-step."""

    device = "cuda"

    def mark(self) -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def async_end(self, work: Any) -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        # NCCL futures run callbacks on a stream that waits for the collective: the event marks its end.
        work.get_future().then(lambda _f: ev.record())
        return ev

    def seconds(self, origin: Any, token: Any) -> float | None:
        token.synchronize()
        return origin.elapsed_time(token) / 1000.0


def make_clock(device: str | None = None) -> HostClock | CudaClock:
    use_cuda = (device == "cuda") if device else (torch.cuda.is_available() and dist.is_initialized()
                                                   and dist.get_backend() == "nccl")
    return CudaClock() if use_cuda else HostClock()


@dataclass
class _Pending:
    fn: str
    op: str
    dtype: str | None
    numel: int
    nbytes: int
    group_size: int
    start: Any
    end: Any
    async_op: bool
    source: str
    phase: str | None


@dataclass
class CommRecorder:
    """Collects `CommRecord`s while `start()`ed; `resolve(origin, step)` turns them into timed records."""

    clock: HostClock | CudaClock = field(default_factory=HostClock)
    phase_of: Callable[[], str | None] = lambda: None
    _pending: list[_Pending] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _local: threading.local = field(default_factory=threading.local)
    _patched: list[tuple[Any, str, Any]] = field(default_factory=list)
    _waits: list[tuple[Any, Any]] = field(default_factory=list)
    active: bool = False

    # -- installing -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Wrap the collectives (idempotent). Call at a window's first step."""
        if self.active:
            return
        originals: dict[int, Any] = {}
        for module in (dist, c10d):
            for name in CANONICAL_OPS:
                fn = getattr(module, name, None)
                if fn is None or hasattr(fn, _WRAPPED_ATTR):
                    continue
                wrapper = self._wrap(name, fn)
                originals[id(fn)] = wrapper
                setattr(module, name, wrapper)
                self._patched.append((module, name, fn))
        wait = dist.Work.wait
        if not hasattr(wait, _WRAPPED_ATTR):
            dist.Work.wait = self._wrap_wait(wait)
            self._patched.append((dist.Work, "wait", wait))
        cdb = _deepspeed_backend()
        if cdb is not None:
            for attr in _DS_CACHED:
                fn = getattr(cdb, attr, None)
                if fn is not None and id(fn) in originals:
                    setattr(cdb, attr, originals[id(fn)])
                    self._patched.append((cdb, attr, fn))
        self.active = True

    def stop(self) -> None:
        """Put every original back (in reverse, so a function patched twice ends as it began)."""
        for obj, name, fn in reversed(self._patched):
            setattr(obj, name, fn)
        self._patched.clear()
        self.active = False

    # -- recording --------------------------------------------------------------------------------------
    def _wrap(self, name: str, fn: Callable) -> Callable:
        recorder = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            local = recorder._local
            if getattr(local, "depth", 0):  # an alias calling the real op: count the outermost call once
                return fn(*args, **kwargs)
            group = kwargs.get("group")
            if group is None:
                group = _group_arg(name, args)
            try:
                n = dist.get_world_size(group)
            except Exception:  # not a member / not initialised: let the real call raise its own error
                return fn(*args, **kwargs)
            op, dtype, numel, nbytes = message(name, args, kwargs, n)
            async_op = bool(kwargs.get("async_op", _async_arg(name, args)))
            clock = recorder.clock
            local.depth = 1
            try:
                start = clock.mark()
                result = fn(*args, **kwargs)
                if async_op:
                    end = clock.async_end(result) if _timeable(result) else None
                else:
                    end = clock.mark()
            finally:
                local.depth = 0
            pending = _Pending(name, op, str(dtype).replace("torch.", "") if dtype else None, numel, nbytes, n,
                               start, end, async_op, getattr(local, "source", "torch.distributed"),
                               recorder.phase_of())
            with recorder._lock:
                recorder._pending.append(pending)
            return result

        setattr(wrapper, _WRAPPED_ATTR, fn)
        wrapper.__name__ = name
        wrapper.__doc__ = fn.__doc__
        return wrapper

    def _wrap_wait(self, wait: Callable) -> Callable:
        """Time `Work.wait()`: the host (or, on GPU, the compute stream) stalls there for an async op."""
        recorder = self

        def timed_wait(work: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(recorder._local, "depth", 0):  # the wait inside a blocking collective: already timed
                return wait(work, *args, **kwargs)
            t0 = recorder.clock.mark()
            try:
                return wait(work, *args, **kwargs)
            finally:
                t1 = recorder.clock.mark()
                with recorder._lock:
                    recorder._waits.append((t0, t1))

        setattr(timed_wait, _WRAPPED_ATTR, wait)
        return timed_wait

    def resolve_waits(self, origin: Any) -> list[tuple[float, float]]:
        """Intervals spent in `Work.wait()` since the last call, relative to `origin`."""
        with self._lock:
            waits, self._waits = self._waits, []
        return [(self.clock.seconds(origin, a) or 0.0, self.clock.seconds(origin, b) or 0.0) for a, b in waits]

    def resolve(self, origin: Any, step: int) -> list[CommRecord]:
        """Timed records of everything issued since the last call, start times relative to `origin`."""
        with self._lock:
            pending, self._pending = self._pending, []
        out = []
        for p in pending:
            start = self.clock.seconds(origin, p.start)
            end = self.clock.seconds(origin, p.end) if p.end is not None else None
            duration = None if end is None or start is None else max(end - start, 0.0)
            out.append(CommRecord(p.op, p.fn, p.dtype, p.numel, p.nbytes, p.group_size, start or 0.0, duration,
                                  p.async_op, p.source, p.phase, step))
        return out

    def discard(self) -> None:
        with self._lock:
            self._pending = []
            self._waits = []

    # -- DDP ----------------------------------------------------------------------------------------------
    def ddp_comm_hook(self, process_group, bucket):  # no annotations: DDP rejects string ones here
        """DDP comm hook equal to DDP's built-in path: grads × (1/world), then a sum all-reduce of the bucket.

        Registered with `ddp_model.register_comm_hook(None, recorder.ddp_comm_hook)`; the all-reduce goes
        through `torch.distributed.all_reduce`, so it is recorded (source "ddp_bucket") inside windows.
        """
        group = process_group if process_group is not None else dist.group.WORLD
        tensor = bucket.buffer()
        tensor.mul_(1.0 / dist.get_world_size(group))
        local = self._local
        local.source = "ddp_bucket"
        try:
            work = dist.all_reduce(tensor, group=group, async_op=True)
        finally:
            local.source = "torch.distributed"
        return work.get_future().then(lambda fut: fut.value()[0])


def _group_arg(name: str, args: tuple) -> Any:
    """The positional `group` argument of the torch.distributed signatures we wrap (None when absent)."""
    pos = {"all_reduce": 2, "broadcast": 2, "reduce": 3, "all_gather": 2, "all_gather_single": 2,
           "all_gather_into_tensor": 2, "_all_gather_base": 2, "reduce_scatter": 3, "reduce_scatter_single": 3,
           "reduce_scatter_tensor": 3, "_reduce_scatter_base": 3, "all_to_all": 2, "all_to_all_single": 4,
           "barrier": 0, "gather": 3, "scatter": 3, "all_reduce_coalesced": 2, "all_gather_coalesced": 2,
           "_broadcast_coalesced": 0}.get(name)
    if pos is None or len(args) <= pos:
        return None
    g = args[pos]
    return g if isinstance(g, dist.ProcessGroup) else None


def _async_arg(name: str, args: tuple) -> bool:
    pos = {"all_reduce": 3, "broadcast": 3, "reduce": 4, "all_gather": 3, "all_gather_single": 3,
           "all_gather_into_tensor": 3, "_all_gather_base": 3, "reduce_scatter": 4, "reduce_scatter_single": 4,
           "reduce_scatter_tensor": 4, "_reduce_scatter_base": 4, "all_to_all": 3, "all_to_all_single": 5,
           "barrier": 1, "gather": 4, "scatter": 4, "all_reduce_coalesced": 3, "all_gather_coalesced": 3}.get(name)
    return bool(pos is not None and len(args) > pos and args[pos] is True)


def _timeable(result: Any) -> bool:
    """A real Work (not None, not the placeholder a coalescing manager hands out)."""
    return isinstance(result, dist.Work) and type(result).__name__ != "_IllegalWork"


def _deepspeed_backend() -> Any:
    import sys

    comm = sys.modules.get("deepspeed.comm.comm")
    return getattr(comm, "cdb", None) if comm is not None else None
