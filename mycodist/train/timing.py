"""Where a training step's time goes, without making the step wait for it.

On the CPU a phase is wall-clock time. On CUDA the host only queues kernels, so host timers would measure
launch time; the clock records CUDA events at phase boundaries instead and reads them back in `window()`,
which the loop calls at log steps only: timing adds no host sync to the other steps. The "data" phase then
measures how long the GPU sat idle waiting for the next batch, which is what data-wait should mean.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

PHASES = ("data", "forward", "backward", "step")


class PhaseClock:
    """`mark(name)` closes the open phase and opens `name`; `stop()` closes it (what follows is not timed);
    `window()` returns the seconds per phase (and `total`) since the previous window."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._open: tuple[str, object] | None = None
        self._spans: list[tuple[str, object, object]] = []
        self._host: dict[str, float] = defaultdict(float)

    def _now(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    def mark(self, name: str | None) -> None:
        now = self._now()
        if self._open is not None:
            self._spans.append((self._open[0], self._open[1], now))
        self._open = (name, now) if name is not None else None

    def stop(self) -> None:
        self.mark(None)

    def window(self) -> dict[str, float]:
        """Seconds per phase since the last window; on CUDA this waits for the last recorded event."""
        out = dict.fromkeys(PHASES, 0.0)
        if self.cuda and self._spans:
            self._spans[-1][2].synchronize()
        for name, start, end in self._spans:
            secs = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            out[name] = out.get(name, 0.0) + secs
        self._spans.clear()
        out["total"] = sum(out[k] for k in out)
        return out
