"""Two real gloo ranks under torchrun: bytes per collective and per step equal the theory for DDP, FSDP2
and DeepSpeed ZeRO-1/2/3 on a small ViT; the profiler's timing agrees with an outside timing; windows
switch recording on and off; parameters are bit-identical with and without the profiler; bench-comm."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("profile_worker.py")
pytestmark = pytest.mark.slow


def _torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _torchrun([str(WORKER), "ddp", str(out)])
    return json.loads((out / "result-ddp.json").read_text()), out


def _assert_matches_theory(summary: dict) -> None:
    measured, theory = summary["measured_bytes_per_step"], summary["theory_bytes_per_step"]
    assert measured["total"] == pytest.approx(theory["total"], rel=0.05)
    assert set(measured["by_op"]) == set(theory["by_op"])
    for op, b in theory["by_op"].items():
        assert measured["by_op"][op] == pytest.approx(b, rel=0.05), op
    for step in summary["step_breakdown"]["steps"]:  # every profiled step, not only on average
        assert step["bytes"] == pytest.approx(theory["total"], rel=0.05)
    wire_m, wire_t = summary["measured_wire_bytes_per_step"], summary["theory_wire_bytes_per_step"]
    assert wire_m["total"] == pytest.approx(wire_t["total"], rel=0.05)


def test_ddp_bytes_equal_theory_and_world_is_two(ddp_result):
    result, out = ddp_result
    assert result["world_size"] == 2
    summary = result["ddp"]
    _assert_matches_theory(summary)
    assert summary["measured_over_theory"] == pytest.approx(1.0, abs=1e-9)  # deterministic: exact here
    # per collective: DDP's buckets together hold every gradient, once
    for step in summary["step_breakdown"]["steps"]:
        assert set(step["by_op"]) == {"all_reduce"}
    assert all(r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * 2 * (2 - 1) / 2) for r in summary["bandwidth"])
    files = {p.name for p in (out / "ddp" / "profile").iterdir()}
    assert {"summary.json", "bandwidth.png", "step_breakdown.png", "tensorboard"} <= files


def test_windows_switch_recording_on_and_off(ddp_result):
    result, _ = ddp_result
    assert result["ddp"]["profiled_steps"] == [2, 3, 5, 6]
    installed = result["installed"]
    assert [s for s in range(7) if installed[str(s)]] == [2, 3, 5, 6]
    assert not installed["after3"] and not installed["after6"] and not installed["after1"]


def test_profiler_changes_no_parameter(ddp_result):
    result, _ = ddp_result
    assert result["plain"] == result["profiled"]  # bit-identical with and without the profiler
    assert result["digests"][0] == result["digests"][1]  # and ranks agree: gradients really were synced


def test_profiler_timing_agrees_with_outside_timing(ddp_result):
    result, _ = ddp_result
    timing = result["timing"]
    assert all(t["n"] == 1 for t in timing)
    for t in timing:  # the profiler's interval lies inside the outside one
        assert 0 < t["profiler_s"] <= t["independent_s"] * 1.001 + 1e-5
    sync = [t["profiler_s"] / t["independent_s"] for t in timing if not t["async"]]
    assert statistics.median(sync) > 0.9  # blocking calls: the same interval up to Python overhead
    assert all(t["busbw"] == pytest.approx(4 * 2 ** 20 / t["profiler_s"]) for t in timing)  # 2 ranks: factor 1


def test_fsdp2_bytes_equal_theory(ddp_result):
    result, _ = ddp_result
    summary = result["fsdp"]
    _assert_matches_theory(summary)
    assert set(summary["measured_bytes_per_step"]["by_op"]) == {"all_gather", "reduce_scatter"}


def test_deepspeed_zero_stages_bytes_equal_theory(tmp_path):
    _torchrun([str(WORKER), "zero", str(tmp_path)])
    result = json.loads((tmp_path / "result-zero.json").read_text())
    assert result["world_size"] == 2
    for stage in (1, 2, 3):
        summary = result[f"zero{stage}"]
        assert summary["profiled_steps"] == [2, 3, 5, 6]
        _assert_matches_theory(summary)
    z3 = result["zero3"]["measured_wire_bytes_per_step"]["total"]
    z1 = result["zero1"]["measured_wire_bytes_per_step"]["total"]
    assert z3 == pytest.approx(z1, rel=0.01)  # both 3 x (n-1)/n x Psi on this DeepSpeed (see theory.py)


def test_bench_comm_two_ranks(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mycodist", "bench-comm", "--nproc", "2", "--out", str(tmp_path),
           "profile.bench_max_bytes=16384", "profile.bench_repeats=2", "profile.bench_warmup=1",
           "profile.bench_ops=[all_reduce,all_gather,reduce_scatter,broadcast,all_to_all]"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["world_size"] == 2 and last["backend"] == "gloo"
    rows = last["results"]
    assert [r["bytes"] for r in rows if r["op"] == "all_reduce"] == [1024, 2048, 4096, 8192, 16384]
    factors = {"all_reduce": 1.0, "all_gather": 0.5, "reduce_scatter": 0.5, "broadcast": 1.0, "all_to_all": 0.5}
    for r in rows:
        assert r["median_s"] > 0
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * factors[r["op"]])
    assert "busbw (GB/s)" in proc.stdout
    assert json.loads((tmp_path / "bench_comm.json").read_text())["results"] == rows
    assert (tmp_path / "bench_comm.png").exists()


def test_bench_comm_rejects_bad_config():
    proc = subprocess.run([sys.executable, "-m", "mycodist", "bench-comm", "profile.bench_min_bytes=4096",
                           "profile.bench_max_bytes=1024"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "bench_min_bytes" in proc.stderr
