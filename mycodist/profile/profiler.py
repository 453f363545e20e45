"""The one object a training loop talks to: windows, phases, collectives, outputs (see package docstring)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from mycodist.profile.recorder import CommRecorder, make_clock
from mycodist.profile.report import log_tensorboard, plot_bandwidth, plot_breakdown, summarize, write_summary
from mycodist.profile.steps import StepProfile, in_window
from mycodist.profile.theory import theory_bytes_per_step

_NULL = contextlib.nullcontext()


def _get(cfg: Any, key: str, default: Any) -> Any:
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except Exception:
        value = default
    return default if value is None else value


class Profiler:
    """Profiles S steps every K (`profile.every`, `profile.steps`, from `profile.start`); nil cost elsewhere.

    `param_numels` (trainable parameter element counts or shapes) and `engine` give the theory column
    (extra keywords go to `theory_bytes_per_step`); without them
    only measurements are reported. Rank 0 writes RUN_DIR/profile/; every rank records (no extra collectives).
    """

    def __init__(self, cfg: Any, run_dir: str | Path | None, rank: int = 0, world_size: int = 1,
                 engine: str = "ddp", param_numels: Iterable[int] | None = None, dtype_bytes: int = 4,
                 persistence_threshold: int = 0, device: str | None = None, tb_writer: Any = None,
                 **theory_kwargs: Any) -> None:
        self.enabled = bool(_get(cfg, "enabled", False))
        self.every = int(_get(cfg, "every", 100))
        self.steps = int(_get(cfg, "steps", 5))
        self.start = int(_get(cfg, "start", 0))
        self.trace = bool(_get(cfg, "trace", False))
        self.want_tensorboard = bool(_get(cfg, "tensorboard", True))
        self.want_plots = bool(_get(cfg, "plots", True))
        self.rank, self.world_size, self.engine = rank, world_size, engine
        self.out_dir = Path(run_dir) / "profile" if run_dir is not None else None
        self.param_numels = list(param_numels) if param_numels is not None else None
        self.dtype_bytes, self.persistence_threshold = dtype_bytes, persistence_threshold
        self.theory_kwargs = theory_kwargs  # e.g. resident_numel (FSDP2), group_numels (DeepSpeed)
        self.clock = make_clock(device)
        self.recorder = CommRecorder(clock=self.clock, phase_of=lambda: self._phase)
        self.profiles: list[StepProfile] = []
        self._phase: str | None = None
        self._phases: list[tuple[str, Any, Any]] | None = None  # open only inside a profiled step
        self._tb = tb_writer
        self._own_tb = False
        self._torch_prof: Any = None
        self._traced = False

    # -- hooks for the training loop -----------------------------------------------------------------
    def active(self, step: int) -> bool:
        return self.enabled and in_window(step, self.every, self.steps, self.start)

    def attach_ddp(self, ddp_model: Any) -> Any:
        """Route DDP's bucket all-reduces through Python so they are seen (only when profiling is enabled)."""
        if self.enabled:
            ddp_model.register_comm_hook(None, self.recorder.ddp_comm_hook)
        return ddp_model

    def step(self, step: int) -> contextlib.AbstractContextManager:
        """Context around one optimizer step; records it when `step` falls in a window."""
        if not self.active(step):
            return _NULL
        return self._profiled_step(step)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Context around one part of a step: "data", "forward", "backward", "optimizer" (any name works)."""
        if self._phases is None:
            return _NULL
        return self._timed_phase(name)

    @contextlib.contextmanager
    def _timed_phase(self, name: str) -> Iterator[None]:
        prev, self._phase = self._phase, name
        t0 = self.clock.mark()
        try:
            yield
        finally:
            t1 = self.clock.mark()
            self._phase = prev
            if self._phases is not None:
                self._phases.append((name, t0, t1))

    @contextlib.contextmanager
    def _profiled_step(self, step: int) -> Iterator[None]:
        self.recorder.start()
        self._start_trace()
        self.recorder.discard()
        self._phases = []
        origin = self.clock.mark()
        ok = False
        try:
            yield
            ok = True
        finally:
            end = self.clock.mark()
            phases, self._phases = self._phases, None
            if ok:
                self._finish_step(step, origin, end, phases)
            else:
                self.recorder.discard()
            if not self.active(step + 1):
                self.recorder.stop()
                self._stop_trace()

    def _finish_step(self, step: int, origin: Any, end: Any, phases: list) -> None:
        sec = self.clock.seconds
        records = self.recorder.resolve(origin, step)
        profile = StepProfile(step, sec(origin, end) or 0.0,
                              [(n, sec(origin, a) or 0.0, sec(origin, b) or 0.0) for n, a, b in phases], records,
                              self.recorder.resolve_waits(origin))
        self.profiles.append(profile)  # TensorBoard is written at close(): its start-up stays out of the loop

    # -- outputs ---------------------------------------------------------------------------------------
    def theory(self) -> dict | None:
        if self.param_numels is None:
            return None
        return theory_bytes_per_step(self.engine, self.param_numels, self.world_size, self.dtype_bytes,
                                     self.persistence_threshold, **self.theory_kwargs)

    def summary(self) -> dict:
        meta = {"engine": self.engine, "world_size": self.world_size, "rank": self.rank,
                "clock": self.clock.device, "window": {"every": self.every, "steps": self.steps, "start": self.start}}
        return summarize(self.profiles, self.theory(), meta)

    def close(self) -> dict | None:
        """Stop recording; on rank 0 write summary.json and the plots. Returns the summary (None if nothing)."""
        self.recorder.stop()
        self._stop_trace()
        if not self.enabled or not self.profiles:
            return None
        if self.rank == 0 and self.out_dir is not None and self.want_tensorboard:
            writer = self._writer()
            for profile in self.profiles:
                log_tensorboard(writer, profile)
            writer.flush()
            if self._own_tb:
                writer.close()
        summary = self.summary()
        if self.rank == 0 and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_summary(summary, self.out_dir)
            if self.want_plots:
                plot_bandwidth(summary["bandwidth"], self.out_dir / "bandwidth.png",
                               f"{self.engine}, {self.world_size} ranks: busbw per collective")
                plot_breakdown(summary["step_breakdown"]["steps"], self.out_dir / "step_breakdown.png")
        return summary

    def _writer(self) -> Any:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            self._own_tb = True
        return self._tb

    def _start_trace(self) -> None:
        """torch.profiler over the first window only (Chrome trace per rank): big files, so once."""
        if not self.trace or self._traced or self._torch_prof is not None or self.out_dir is None:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.clock.device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._torch_prof = torch.profiler.profile(activities=acts, record_shapes=True)
        self._torch_prof.__enter__()

    def _stop_trace(self) -> None:
        if self._torch_prof is None:
            return
        prof, self._torch_prof = self._torch_prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        final = self.out_dir / f"trace-rank{self.rank}.json"
        tmp = self.out_dir / f".tmp-{final.name}"
        prof.export_chrome_trace(str(tmp))  # torch writes by path: write beside, then rename (atomic)
        os.replace(tmp, final)
        self._traced = True
