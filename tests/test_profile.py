"""Profiler parts in one process: message sizes, busbw factors, windows, interval maths, theory, outputs,
and the recorder on a real one-rank gloo group (wrapping, nesting, timing, restoring)."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
import torch.distributed as dist

from mycodist.profile import Profiler, busbw_factor, in_window, theory_bytes_per_step
from mycodist.profile.collectives import CommRecord, message
from mycodist.profile.report import plot_bandwidth, plot_breakdown, summarize
from mycodist.profile.steps import StepProfile, length, subtract, union


def test_busbw_factors_follow_nccl_tests():
    assert busbw_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert busbw_factor(op, 4) == pytest.approx(3 / 4)
    assert busbw_factor("broadcast", 8) == 1.0 and busbw_factor("reduce", 3) == 1.0
    assert busbw_factor("all_reduce", 1) == 0.0
    rec = CommRecord("all_reduce", "all_reduce", "float32", 1024, 4096, 4, 0.0, 1e-3, False, "t", None, 0)
    assert rec.algbw == pytest.approx(4096 / 1e-3)
    assert rec.busbw == pytest.approx(4096 / 1e-3 * 1.5)
    assert rec.wire_bytes == pytest.approx(4096 * 1.5)


def test_message_sizes_count_the_nccl_tests_buffer():
    t = torch.zeros(10)
    assert message("all_reduce", (t,), {}, 2) == ("all_reduce", torch.float32, 10, 40)
    out, inp = torch.zeros(20), torch.zeros(10)
    assert message("all_gather_into_tensor", (out, inp), {}, 2)[3] == 80  # gathered output
    assert message("all_gather", ([inp, inp], inp), {}, 2)[3] == 80
    assert message("reduce_scatter_tensor", (inp, out), {}, 2)[3] == 80  # input before scattering
    assert message("reduce_scatter", (inp, [inp, inp]), {}, 2)[3] == 80
    assert message("all_to_all_single", (out, out), {}, 2)[3] == 80
    assert message("broadcast", (), {"tensor": t.half(), "src": 0}, 2) == ("broadcast", torch.float16, 10, 20)
    assert message("barrier", (), {}, 2)[3] == 0
    assert message("gather", (t,), {}, 3)[3] == 120


def test_windows():
    hits = [s for s in range(30) if in_window(s, every=10, steps=3, start=2)]
    assert hits == [2, 3, 4, 12, 13, 14, 22, 23, 24]
    assert not any(in_window(s, 10, 0) for s in range(30))
    assert [s for s in range(4) if in_window(s, 1, 1)] == [0, 1, 2, 3]


def test_interval_maths():
    assert union([(0, 1), (0.5, 2), (3, 4)]) == [(0, 2), (3, 4)]
    assert length([(0, 1), (0.5, 2)]) == 2
    assert subtract([(0, 10)], [(2, 3), (5, 6)]) == [(0, 2), (3, 5), (6, 10)]


def _rec(start, dur, async_op=False, source="torch.distributed", op="all_reduce", nbytes=100):
    return CommRecord(op, op, "float32", nbytes // 4, nbytes, 2, start, dur, async_op, source, None, 0)


def test_exposed_comm_counts_blocking_waits_and_ddp_tail_only():
    # forward 0-4 with a blocking collective 1-2; backward 4-10 with DDP buckets issued at 5 and 8
    # (each running 3 s), the last finishing at 11 > 10: everything after 8 in backward is the tail.
    p = StepProfile(0, 12.0, [("forward", 0, 4), ("backward", 4, 10), ("optimizer", 10.5, 12)],
                    [_rec(1, 1), _rec(5, 3, True, "ddp_bucket"), _rec(8, 3, True, "ddp_bucket")])
    # blocking 1-2 (1 s) + tail 8-10 (2 s) + outside phases 10-10.5 (0.5 s); 5-8 hidden behind backward
    assert p.exposed_comm_s() == pytest.approx(3.5)
    # an async op whose Work.wait() blocks 2-3 is exposed only there
    q = StepProfile(0, 5.0, [("forward", 0, 5)], [_rec(1, 2.5, True)], waits=[(2.0, 3.5)])
    assert q.exposed_comm_s() == pytest.approx(1.5)


def test_theory_matches_the_zero_paper_ratios():
    psi, n = 1_000_000, 8
    ddp = theory_bytes_per_step("ddp", [psi], n)
    z3 = theory_bytes_per_step("zero3", [psi], n)
    paper = theory_bytes_per_step("zero2_paper", [psi], n)
    assert ddp["total"] == 4 * psi and ddp["wire_total"] == pytest.approx(2 * 7 / 8 * 4 * psi)
    assert paper["wire_total"] == pytest.approx(ddp["wire_total"])  # ZeRO-1/2 as in the paper: same as DDP
    assert z3["wire_total"] == pytest.approx(1.5 * ddp["wire_total"], rel=1e-5)  # ZeRO-3: 1.5x
    z1 = theory_bytes_per_step("zero1", [psi + 3], n)  # DeepSpeed: all-reduce + all-gather padded to 2n
    assert z1["by_op"]["all_reduce"] == 4 * (psi + 3) + 4
    assert z1["by_op"]["all_gather"] == 4 * 1_000_016
    assert theory_bytes_per_step("zero3", [5, 3], 4)["by_op"]["reduce_scatter"] == 4 * (8 + 4)
    persist = theory_bytes_per_step("zero3", [10, 1000], 2, persistence_threshold=100)["by_op"]
    assert persist["all_gather"] == 4 * (2 * 1000 + 10)
    fsdp = theory_bytes_per_step("fsdp", [(3, 4), (2,)], 2, resident_numel=2)["by_op"]
    assert fsdp == {"all_gather": 4 * (2 * (16 + 2) - 2), "reduce_scatter": 4 * 18}
    assert theory_bytes_per_step("ddp", [psi], 1)["total"] == 0
    with pytest.raises(ValueError):
        theory_bytes_per_step("zero4", [1], 2)


def test_summary_and_plots(tmp_path):
    steps = [StepProfile(s, 0.01, [("forward", 0, 0.004), ("backward", 0.004, 0.009)],
                         [_rec(0.005, 0.002, True, "ddp_bucket", nbytes=4000)]) for s in (3, 4)]
    theory = theory_bytes_per_step("ddp", [1000], 2)
    s = summarize(steps, theory, {"engine": "ddp"})
    assert s["measured_bytes_per_step"] == {"total": 4000, "by_op": {"all_reduce": 4000}}
    assert s["theory_bytes_per_step"]["total"] == 4000 and s["measured_over_theory"] == 1.0
    assert s["step_breakdown"]["mean"]["phases_s"]["forward"] == pytest.approx(0.004)
    assert s["bandwidth"][0]["busbw_GBps"] == pytest.approx(4000 / 0.002 / 1e9)
    for path in (plot_bandwidth(s["bandwidth"], tmp_path / "bw.png"),
                 plot_breakdown(s["step_breakdown"]["steps"], tmp_path / "steps.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_recorder_on_a_real_group(one_rank_group, tmp_path):
    original = dist.all_reduce
    cfg = {"enabled": True, "start": 1, "every": 2, "steps": 1, "trace": True}
    prof = Profiler(cfg, tmp_path, 0, 1, engine="ddp", param_numels=[8])
    x, out = torch.ones(8), torch.zeros(8)
    for step in range(4):
        with prof.step(step):
            assert (dist.all_reduce is not original) == (step in (1, 3))
            with prof.phase("forward"):
                dist.all_reduce(x)
                dist.all_gather_into_tensor(out, x)  # an alias of all_gather_single: one record, not two
                work = dist.all_reduce(x, async_op=True)
                time.sleep(0.01)
                work.wait()
        assert dist.all_reduce is original  # wrappers removed between windows
    assert [p.step for p in prof.profiles] == [1, 3]
    recs = prof.profiles[0].records
    assert [(r.op, r.fn, r.bytes, r.async_op, r.phase) for r in recs] == [
        ("all_reduce", "all_reduce", 32, False, "forward"),
        ("all_gather", "all_gather_into_tensor", 32, False, "forward"),
        ("all_reduce", "all_reduce", 32, True, "forward")]
    assert all(r.duration_s is not None and 0 <= r.duration_s < 1 for r in recs)
    assert len(prof.profiles[0].waits) == 1
    summary = prof.close()
    assert dist.all_reduce is original and dist.Work.wait.__name__ == "wait"
    on_disk = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert on_disk["measured_bytes_per_step"] == summary["measured_bytes_per_step"]
    assert (tmp_path / "profile" / "trace-rank0.json").stat().st_size > 0
    assert list((tmp_path / "profile" / "tensorboard").iterdir())


def test_disabled_profiler_costs_nothing(one_rank_group, tmp_path):
    prof = Profiler({"enabled": False}, tmp_path, 0, 1)
    original = dist.all_reduce
    with prof.step(0), prof.phase("forward"):
        assert dist.all_reduce is original
    assert prof.step(5) is prof.phase("x")  # the shared null context: no allocation per step
    assert prof.close() is None and not (tmp_path / "profile").exists()
