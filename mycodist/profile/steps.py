"""Windows, and what one profiled step's timeline says: phase times, comm busy time and the exposed part.

Exposed communication is comm time during which the host is not computing. The host counts as computing
inside a phase (data/forward/backward/optimizer) except while it is blocked on communication: inside a
blocking collective, inside `Work.wait()` of an async one, or in DDP's bucket tail (from the last bucket
all-reduce issued in a phase to that phase's end: DDP waits for its buckets in C++, unseen). Comm outside
every phase counts as exposed. On GPU the same rules run on CUDA-event timestamps of the compute stream.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from mycodist.profile.collectives import CommRecord

Interval = tuple[float, float]


def in_window(step: int, every: int, steps: int, start: int = 0) -> bool:
    """True when `step` is one of the `steps` profiled steps opening each period of `every`, from `start`."""
    if step < start or steps <= 0:
        return False
    return (step - start) % max(every, 1) < steps


def union(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def length(intervals: list[Interval]) -> float:
    return sum(b - a for a, b in union(intervals))


def subtract(base: list[Interval], cut: list[Interval]) -> list[Interval]:
    """`base` minus `cut`, both as unions."""
    out: list[Interval] = []
    cut = union(cut)
    for a, b in union(base):
        cur = a
        for c, d in cut:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


@dataclass
class StepProfile:
    """Everything measured about one profiled step (times in seconds from the step's start)."""

    step: int
    wall_s: float
    phases: list[tuple[str, float, float]] = field(default_factory=list)
    records: list[CommRecord] = field(default_factory=list)
    waits: list[Interval] = field(default_factory=list)

    def phase_seconds(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for name, a, b in self.phases:
            out[name] += b - a
        return dict(out)

    def comm_intervals(self) -> list[Interval]:
        return [(r.start_s, r.start_s + r.duration_s) for r in self.records if r.duration_s is not None]

    def blocked_intervals(self) -> list[Interval]:
        blocked = [(r.start_s, r.start_s + r.duration_s) for r in self.records
                   if not r.async_op and r.duration_s is not None]
        blocked += self.waits
        for _name, a, b in self.phases:
            issues = [r.start_s for r in self.records if r.source == "ddp_bucket" and a <= r.start_s <= b]
            if issues:
                blocked.append((max(issues), b))
        return blocked

    def exposed_comm_s(self) -> float:
        compute = subtract([(a, b) for _, a, b in self.phases], self.blocked_intervals())
        return length(subtract(self.comm_intervals(), compute))

    def by_op(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for r in self.records:
            d = out.setdefault(r.op, {"count": 0, "bytes": 0, "wire_bytes": 0.0, "seconds": 0.0})
            d["count"] += 1
            d["bytes"] += r.bytes
            d["wire_bytes"] += r.wire_bytes
            d["seconds"] += r.duration_s or 0.0
        return out

    def to_dict(self) -> dict:
        ops = self.by_op()
        exposed = self.exposed_comm_s()
        return {
            "step": self.step,
            "wall_s": self.wall_s,
            "phases_s": self.phase_seconds(),
            "comm_s": sum(d["seconds"] for d in ops.values()),
            "comm_busy_s": length(self.comm_intervals()),
            "exposed_comm_s": exposed,
            "exposed_fraction": exposed / self.wall_s if self.wall_s > 0 else 0.0,
            "bytes": sum(d["bytes"] for d in ops.values()),
            "wire_bytes": sum(d["wire_bytes"] for d in ops.values()),
            "by_op": ops,
        }
