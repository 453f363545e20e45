"""Turn profiled steps into the outputs people read: summary.json, TensorBoard scalars and two PNG plots."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from mycodist.atomic import atomic_open, atomic_write_json
from mycodist.profile.steps import StepProfile

MB = 1e6
GB = 1e9


def bandwidth_table(profiles: list[StepProfile]) -> list[dict]:
    """Per (op, message size): count, median time, algbw, busbw — the data of the bandwidth plot."""
    groups: dict[tuple[str, int, int], list] = defaultdict(list)
    for p in profiles:
        for r in p.records:
            if r.duration_s and r.bytes:
                groups[(r.op, r.bytes, r.group_size)].append(r)
    rows = []
    for (op, nbytes, n), recs in sorted(groups.items()):
        t = statistics.median(r.duration_s for r in recs)
        factor = recs[0].busbw / recs[0].algbw if recs[0].algbw else 0.0
        rows.append({"op": op, "bytes": nbytes, "group_size": n, "count": len(recs), "median_s": t,
                     "algbw_GBps": nbytes / t / GB, "busbw_GBps": nbytes / t / GB * factor})
    return rows


def summarize(profiles: list[StepProfile], theory: dict | None, meta: dict) -> dict:
    """The summary.json document: measured vs theory bytes per step, step breakdown, bandwidths."""
    steps = [p.to_dict() for p in profiles]
    n = max(len(steps), 1)
    ops = sorted({op for s in steps for op in s["by_op"]})
    measured = {op: sum(s["by_op"].get(op, {}).get("bytes", 0) for s in steps) / n for op in ops}
    wire = {op: sum(s["by_op"].get(op, {}).get("wire_bytes", 0) for s in steps) / n for op in ops}
    phases = sorted({k for s in steps for k in s["phases_s"]})
    mean = {
        "wall_s": sum(s["wall_s"] for s in steps) / n,
        "phases_s": {k: sum(s["phases_s"].get(k, 0.0) for s in steps) / n for k in phases},
        "comm_s": sum(s["comm_s"] for s in steps) / n,
        "comm_busy_s": sum(s["comm_busy_s"] for s in steps) / n,
        "exposed_comm_s": sum(s["exposed_comm_s"] for s in steps) / n,
    }
    mean["exposed_fraction"] = mean["exposed_comm_s"] / mean["wall_s"] if mean["wall_s"] else 0.0
    out: dict[str, Any] = dict(meta)
    out["profiled_steps"] = [s["step"] for s in steps]
    out["measured_bytes_per_step"] = {"total": sum(measured.values()), "by_op": measured}
    out["measured_wire_bytes_per_step"] = {"total": sum(wire.values()), "by_op": wire}
    if theory is not None:
        out["theory_bytes_per_step"] = {"total": theory["total"], "by_op": theory["by_op"]}
        out["theory_wire_bytes_per_step"] = {"total": theory["wire_total"], "by_op": theory["wire_by_op"]}
        out["measured_over_theory"] = (out["measured_bytes_per_step"]["total"] / theory["total"]
                                       if theory["total"] else None)
    out["step_breakdown"] = {"mean": mean, "steps": steps}
    out["bandwidth"] = bandwidth_table(profiles)
    return out


def write_summary(summary: dict, out_dir: Path) -> Path:
    path = out_dir / "summary.json"
    atomic_write_json(path, summary)
    return path


def log_tensorboard(writer: Any, profile: StepProfile) -> None:
    """Scalars for one profiled step: MB by op, busbw by op, exposed-comm fraction, phase ms."""
    d = profile.to_dict()
    for op, v in d["by_op"].items():
        writer.add_scalar(f"profile/MB_per_step/{op}", v["bytes"] / MB, profile.step)
        if v["seconds"] > 0:
            from mycodist.profile.collectives import busbw_factor

            n = next(r.group_size for r in profile.records if r.op == op)
            writer.add_scalar(f"profile/busbw_GBps/{op}", v["bytes"] / v["seconds"] / GB * busbw_factor(op, n),
                              profile.step)
    writer.add_scalar("profile/exposed_comm_fraction", d["exposed_fraction"], profile.step)
    writer.add_scalar("profile/step_ms/total", d["wall_s"] * 1e3, profile.step)
    for name, s in d["phases_s"].items():
        writer.add_scalar(f"profile/step_ms/{name}", s * 1e3, profile.step)


def _save(fig: Any, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def plot_bandwidth(rows: list[dict], path: Path, title: str = "bus bandwidth vs message size") -> Path:
    """busbw (GB/s) against message size, one line per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for op in sorted({r["op"] for r in rows}):
        pts = sorted((r["bytes"], r["busbw_GBps"]) for r in rows if r["op"] == op)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=op)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_breakdown(steps: list[dict], path: Path) -> Path:
    """Stacked bars per profiled step: each phase's time, then exposed comm outside phases' compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = sorted({k for s in steps for k in s["phases_s"]})
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(steps) + 3), 4.2))
    x = list(range(len(steps)))
    bottom = [0.0] * len(steps)
    for name in phases:
        vals = [s["phases_s"].get(name, 0.0) * 1e3 for s in steps]
        ax.bar(x, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    exposed = [s["exposed_comm_s"] * 1e3 for s in steps]
    ax.scatter(x, exposed, color="black", marker="_", s=200, zorder=3, label="exposed comm (ms)")
    ax.set_xticks(x, [str(s["step"]) for s in steps], rotation=90 if len(steps) > 20 else 0)
    ax.set_xlabel("step")
    ax.set_ylabel("ms")
    ax.set_title("step time breakdown")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path
