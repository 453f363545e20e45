"""FSDP2, the third engine, on 2 CPU ranks (gloo) like the others: full-shard under torchrun and
shard-grad-op through `accelerate launch` with configs/accelerate/cpu2_fsdp.yaml. Parameters identical after
gathering, loss down, sharded checkpoints (one file per rank), export of the consolidated fp32 weights that
reproduces the live logits, kill -9 and resume with the same later losses, and the profiler's measured bytes
within 5% of the FSDP byte theory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multinode_util import rank_pids
from train_util import REPO, TINY, assert_export_matches_live, assert_trained_together, train, train_losses

from mycodist.config import load_config
from mycodist.models import build_model
from mycodist.profile import theory_bytes_per_step
from mycodist.train.cli import free_port

pytestmark = pytest.mark.slow
FSDP = ("train.engine=fsdp", "train.epochs=2", "train.ckpt_every=3")
PROFILE = ("profile.enabled=true", "profile.start=2", "profile.every=100", "profile.steps=2")


@pytest.fixture(scope="module")
def full_shard_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    train(shards, run, *FSDP, *PROFILE)
    return run


def fsdp_theory(shard_grad_op: bool, n: int = 2, **kw) -> dict:
    """The byte theory from the model alone: shapes (FSDP2 pads dim 0 to a multiple of n) and what stays
    gathered from forward into backward (root's own parameters; all of them under shard-grad-op)."""
    cfg = load_config(None, ["model.img_size=32"])
    model = build_model(cfg.model, 4)
    params = [p for p in model.parameters() if p.requires_grad]
    in_blocks = {id(p) for p in model.blocks.parameters()}

    def padded(p):
        return -(-p.shape[0] // n) * n * (p.numel() // p.shape[0]) if p.dim() else n

    kept = sum(padded(p) for p in params if shard_grad_op or id(p) not in in_blocks)
    return theory_bytes_per_step("fsdp", [tuple(p.shape) for p in params], n, resident_numel=kept, **kw)


def assert_bytes_match(run: Path, theory: dict) -> None:
    summary = json.loads((run / "profile" / "summary.json").read_text())
    assert summary["engine"] == "fsdp" and summary["theory_bytes_per_step"]["total"] == theory["total"]
    measured = summary["measured_bytes_per_step"]
    assert measured["total"] == pytest.approx(theory["total"], rel=0.05), (measured, theory["by_op"])
    for op in ("all_gather", "reduce_scatter"):
        assert measured["by_op"][op] == pytest.approx(theory["by_op"][op], rel=0.05), (op, measured, theory["by_op"])


def test_fsdp_full_shard_trains_together_exports_and_measures_its_bytes(full_shard_run):
    run = full_shard_run
    report = json.loads((run / "ranks" / "rank0.json").read_text())
    assert report["engine"] == "fsdp" and report["steps"] == 8
    assert_trained_together(run)
    losses = train_losses(run)
    assert (losses[7] + losses[8]) / 2 < 0.8 * losses[1], losses
    last = sorted((run / "ckpt").glob("step-*"))[-1]
    for part in ("model", "optim"):  # sharded: one file per rank
        assert sorted(p.name for p in (last / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert_export_matches_live(run, atol=1e-4)
    assert_bytes_match(run, fsdp_theory(shard_grad_op=False))


def test_fsdp_resume_after_kill_matches_uninterrupted(shards, full_shard_run, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "mycodist", "train", "--nproc", "2", f"data.shards={shards}",
            f"train.output_dir={run}", *TINY, *FSDP, *PROFILE]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    target = run / "ckpt" / "step-00000003" / "meta.json"
    deadline = time.time() + 240
    try:
        while not target.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        workers = rank_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0
    resumed = train(shards, run, *FSDP, *PROFILE)
    assert "resumed from" in resumed.stdout
    assert_trained_together(run)
    ours, reference = train_losses(run), train_losses(full_shard_run)
    assert sorted(reference) == list(range(1, 9))
    for s in range(4, 9):
        assert ours[s] == pytest.approx(reference[s], rel=1e-5, abs=1e-6), (s, ours[s], reference[s])


def accelerate_fsdp(shards: Path, run: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu2_fsdp.yaml",
            *flags, "--main_process_port", str(free_port()), "launch/train.py",
            f"data.shards={shards}", f"train.output_dir={run}", *TINY, "train.epochs=1", "train.export=false", *PROFILE]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("ACCELERATE_USE_CPU", None)
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_fsdp_shard_grad_op_through_accelerate_launch(shards, full_shard_run, tmp_path):
    """Shard-grad-op with accelerate's activation checkpointing: the same losses as full shard without it
    (recomputing a block is exact), the same bytes as shard-grad-op's theory (no extra all-gather)."""
    run = tmp_path / "run"
    proc = accelerate_fsdp(shards, run, "--fsdp_reshard_after_forward", "false",
                           "--fsdp_activation_checkpointing", "true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "engine fsdp, 2 rank(s)" in proc.stdout
    assert_trained_together(run)
    assert json.loads((run / "ranks" / "rank0.json").read_text())["grad_checkpointing"] is True
    ours, reference = train_losses(run), train_losses(full_shard_run)
    for s in range(1, 5):
        assert ours[s] == pytest.approx(reference[s], rel=1e-5, abs=1e-6), (s, ours[s], reference[s])
    assert_bytes_match(run, fsdp_theory(shard_grad_op=True))
    # shard-grad-op gathers once per step, full shard twice (but the root's parameters)
    assert fsdp_theory(True)["by_op"]["all_gather"] < fsdp_theory(False)["by_op"]["all_gather"]


def test_fsdp_bf16_gathers_bf16_and_reduce_scatters_fp32_as_the_theory_says(shards, tmp_path):
    """bf16 parameters on the wire for the all-gathers (2 bytes), fp32 gradients for the reduce-scatter (4):
    the MixedPrecisionPolicy's reduce_dtype, which the byte theory must count (gloo runs both on CPU)."""
    run = tmp_path / "run"
    train(shards, run, "train.engine=fsdp", "train.epochs=1", "train.precision=bf16", "train.export=false", *PROFILE)
    assert json.loads((run / "ranks" / "rank0.json").read_text())["precision"] == "bf16"
    theory = fsdp_theory(shard_grad_op=False, dtype_bytes=2, reduce_bytes=4)
    fp32 = fsdp_theory(shard_grad_op=False)["by_op"]
    assert theory["by_op"] == {"all_gather": fp32["all_gather"] // 2, "reduce_scatter": fp32["reduce_scatter"]}
    assert_bytes_match(run, theory)


def test_accelerate_fsdp_offload_is_refused_not_ignored(shards, tmp_path):
    proc = accelerate_fsdp(shards, tmp_path / "run", "--fsdp_offload_params", "true")
    assert proc.returncode != 0
    assert "fsdp_offload_params: true" in proc.stdout + proc.stderr and "train.offload=cpu" in proc.stdout + proc.stderr
