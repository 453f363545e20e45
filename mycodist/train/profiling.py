"""Wiring the collective profiler (mycodist.profile) to a run: the engine says what it sends, so the
theory column of RUN_DIR/profile/summary.json follows the run's engine and precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mycodist.profile import Profiler


def make_profiler(cfg: DictConfig, engine: Any, run_dir: Path, param_numels: list[int],
                  group_numels: list[int]) -> Profiler:
    e = engine
    facts = e.comm_profile() if cfg.profile.enabled else {"engine": "ddp", "dtype_bytes": 4}
    extra: dict[str, Any] = {}
    if facts["engine"] in ("zero1", "zero2", "zero3"):
        extra["group_numels"] = group_numels  # padding (ZeRO-1/2) and one small all-reduce per group
    if facts["engine"] == "zero3":
        extra["max_reuse_distance"] = facts["max_reuse_distance"]
    if facts["engine"] == "fsdp":  # FSDP2 pads dim 0 of each parameter: the theory needs shapes
        param_numels, extra["resident_numel"] = facts["param_shapes"], facts["resident_numel"]
        extra["reduce_bytes"] = facts["reduce_bytes"]
    prof = Profiler(cfg.profile, run_dir, e.rank, e.world_size, engine=facts["engine"],
                    param_numels=param_numels, dtype_bytes=facts["dtype_bytes"],
                    persistence_threshold=facts.get("persistence_threshold", 0),
                    device="cuda" if e.device.type == "cuda" else "cpu", **extra)
    if facts.get("ddp") is not None:
        prof.attach_ddp(facts["ddp"])  # before the first forward: DDP takes a comm hook only then
    reuse = facts.get("max_reuse_distance", 0)
    if cfg.profile.enabled and e.is_main and 0 < reuse < 2 * sum(param_numels):
        print(f"profile: ZeRO-3 stage3_max_reuse_distance={reuse} keeps only some parameters gathered from "
              "forward into backward; the theory's all-gather bytes are an upper bound (docs/profiling.md)",
              flush=True)
    return prof


def close_profiler(profiler: Profiler, is_main: bool, run_dir: Path) -> None:
    """Rank 0 writes RUN_DIR/profile/ (summary.json, PNGs); the scalars go into the run's TensorBoard."""
    summary = profiler.close()
    if summary is None or not is_main:
        return
    measured, theory = summary["measured_bytes_per_step"]["total"], summary.get("theory_bytes_per_step")
    line = f"profile: {len(summary['profiled_steps'])} step(s), {measured / 1e6:.3f} MB/step measured"
    if theory:
        line += f", {theory['total'] / 1e6:.3f} MB theory ({summary['engine']}, ratio {summary['measured_over_theory']:.4f})"
    exposed = summary["step_breakdown"]["mean"]["exposed_fraction"]
    print(f"{line}; exposed comm {exposed:.1%} of the step; {run_dir / 'profile'}", flush=True)
