"""A stalled peer (hung GPU, frozen host, network partition) keeps its sockets open, so the other ranks
wait inside a collective until the process group's time-out (torch's default: 30 minutes or more) and then
die with a backend traceback, or not at all. The watchdog knows what this rank is waiting in — the step
loop's phase and the Engine's collective helpers record "in X at step S since t" (two attribute writes,
no host sync) — and turns a time-out into one clear line per surviving rank, then exits non-zero.

Two paths lead to the line: the collective raises after `train.dist_timeout` (gloo; NCCL with
TORCH_NCCL_ASYNC_ERROR_HANDLING), or, when it never returns, a daemon thread notices the record is older
than the time-out (plus a short grace). Either way the process exits with `EXIT_STALLED` without a
teardown that could itself wait on the stalled peer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from mycodist.errors import UsageError

EXIT_STALLED = 75  # what a surviving rank exits with (EX_TEMPFAIL: relaunch with train.resume=auto)
DEFAULT_TIMEOUT_S = {"cuda": 600.0, "cpu": 300.0}
PREFIX = "mycodist watchdog:"


def dist_timeout_s(cfg: Any, device_type: str) -> float:
    """`train.dist_timeout` in seconds; 0 = the default for the device (600 on CUDA, 300 on CPU)."""
    group = cfg.train if hasattr(cfg, "train") else cfg  # a whole config, or the engine's settings
    value = float(group.get("dist_timeout", 0) or 0)
    if value < 0:
        raise UsageError(f"train.dist_timeout={value} must be >= 0 seconds (0 = 600 on CUDA, 300 on CPU)")
    return value or DEFAULT_TIMEOUT_S.get(device_type, DEFAULT_TIMEOUT_S["cpu"])


def node_name() -> str:
    """This host and its node rank, as the launchers set it (torchrun/accelerate GROUP_RANK, DeepSpeed
    CROSS_RANK, SLURM_NODEID)."""
    for key in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID", "NODE_RANK"):
        if key in os.environ:
            return f"{socket.gethostname()} (node {os.environ[key]})"
    return socket.gethostname()


class Watchdog:
    """One per process. `watch(what)` brackets a wait on the peers; `step` is the loop's current step."""

    def __init__(self, timeout_s: float, rank: int = 0, poll_s: float | None = None, grace_s: float | None = None) -> None:
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.step: int | None = None
        self.poll_s = poll_s if poll_s is not None else min(1.0, self.timeout_s / 20)
        self.grace_s = grace_s if grace_s is not None else min(30.0, 0.25 * self.timeout_s)
        self._current: tuple[str, int | None, float] | None = None
        self._fired = threading.Lock()
        self._thread: threading.Thread | None = None

    # --- the record ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Inside, this rank waits on its peers in `what`. A time-out raised from inside becomes the line."""
        if self._thread is None:
            self._start()
        outer = self._current
        self._current = (what, self.step, time.monotonic())
        try:
            yield
        except Exception as err:
            current = self._current
            if current is not None and _looks_like_timeout(err, time.monotonic() - current[2], self.timeout_s):
                self.fire(current, cause=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            raise
        finally:
            self._current = outer

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mycodist-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            current = self._current
            if current is not None and time.monotonic() - current[2] > self.timeout_s + self.grace_s:
                self.fire(current, cause="the collective did not return")

    # --- the line -------------------------------------------------------------------------------------
    def line(self, what: str, step: int | None, waited_s: float) -> str:
        at = f" at step {step}" if step is not None else ""
        return (f"{PREFIX} rank {self.rank} on {node_name()} waited {waited_s:.0f} s in {what}{at} "
                f"(train.dist_timeout={self.timeout_s:g} s): a peer rank stopped answering without closing its "
                "connection. Check that every node and rank process is alive and not stopped (hung GPU: nvidia-smi; "
                "frozen host; network partition or firewall between the nodes' MASTER_PORT and NCCL/gloo ports), "
                "read the other ranks' logs, then relaunch every node: train.resume=auto continues from the last "
                "complete checkpoint")

    def fire(self, current: tuple[str, int | None, float], cause: str) -> None:
        """Print the line once and leave at once: a clean teardown would wait on the stalled peer again."""
        if not self._fired.acquire(blocking=False):
            return
        what, step, since = current
        print(f"{self.line(what, step, time.monotonic() - since)} [{cause}]", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(EXIT_STALLED)


def _looks_like_timeout(err: BaseException, waited_s: float, timeout_s: float) -> bool:
    """gloo says "Timed out"/"timeout", NCCL's watchdog "Watchdog caught collective operation timeout"; a
    peer that died instead (connection reset) is not a stall and keeps its own, already clear, error."""
    text = str(err).lower()
    return "timed out" in text or "timeout" in text or waited_s >= 0.95 * timeout_s
