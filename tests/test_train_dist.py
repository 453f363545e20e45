"""Real 2-rank training on CPU (gloo) through every launcher path: Accelerate DDP, DeepSpeed ZeRO 1-3
in fp32 and bf16, Accelerate + its DeepSpeed plugin, and resume after `kill -9` of one rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_util import REPO, TINY, assert_export_matches_live, assert_trained_together, train, train_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def ddp_run(shards, tmp_path_factory) -> Path:
    """Accelerate DDP, 3 epochs (12 steps), checkpoint every 3 steps; also the uninterrupted reference
    run of the resume test."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    train(shards, run, "train.epochs=3", "train.ckpt_every=3")
    return run


def assert_loss_went_down(run: Path) -> None:
    losses = train_losses(run)
    steps = sorted(losses)
    first, last = losses[steps[0]], sum(losses[s] for s in steps[-2:]) / 2
    assert last < 0.8 * first, losses


def test_accelerate_ddp(ddp_run):
    assert_trained_together(ddp_run)
    assert_loss_went_down(ddp_run)
    assert_export_matches_live(ddp_run, atol=1e-4)
    meta = json.loads((sorted((ddp_run / "ckpt").glob("step-*"))[-1] / "meta.json").read_text())
    assert meta["engine"] == "accelerate" and meta["step"] == 12
    assert len(list((ddp_run / "ckpt").glob("step-*"))) == 3  # keep_last
    assert list((ddp_run / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16"), (1, "bf16"), (2, "fp32")])
def test_deepspeed_zero(shards, tmp_path, stage, precision):
    run = tmp_path / "run"
    # torchrun (one launcher process) for most; the deepspeed launcher for one, so both entries stay working
    launcher = None if (stage, precision) == (3, "bf16") else "torchrun"
    train(shards, run, "train.epochs=2", f"train.zero_stage={stage}", f"train.precision={precision}",
          "train.engine=deepspeed" if launcher else "train.engine=auto", launcher=launcher)
    reports = json.loads((run / "ranks" / "rank0.json").read_text())
    assert reports["engine"] == "deepspeed" and reports["zero_stage"] == stage
    assert_trained_together(run)
    assert_loss_went_down(run)
    # bf16: the live model ran with bf16 weights, the export is the fp32 master copy
    assert_export_matches_live(run, atol=1e-4 if precision == "fp32" else 0.15)


def test_accelerate_deepspeed_plugin(shards, tmp_path):
    run = tmp_path / "run"
    train(shards, run, "train.epochs=2", "train.engine=accelerate", "train.zero_stage=3", "train.precision=bf16")
    report = json.loads((run / "ranks" / "rank0.json").read_text())
    assert report["engine"] == "accelerate" and report["zero_stage"] == 3
    assert (sorted((run / "ckpt").glob("step-*"))[-1] / "pytorch_model").is_dir()  # DeepSpeed's shards
    assert_trained_together(run)
    assert_loss_went_down(run)
    assert_export_matches_live(run, atol=0.15)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _rank_pids(launcher_pid: int) -> list[int]:
    """`mycodist train` → accelerate → torchrun agent → ranks: the processes running launch/train.py."""
    found, todo = [], [launcher_pid]
    while todo:
        pid = todo.pop()
        for child in _children(pid):
            todo.append(child)
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "launch/train.py" in cmd and "accelerate" not in cmd and "torch.distributed.run" not in cmd:
                found.append(child)
    return found


def test_resume_after_kill_matches_uninterrupted(shards, ddp_run, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "mycodist", "train", "--nproc", "2", f"data.shards={shards}",
            f"train.output_dir={run}", *TINY, "train.epochs=3", "train.ckpt_every=3"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    target = run / "ckpt" / "step-00000003" / "meta.json"  # mid-epoch (4 steps per epoch)
    deadline = time.time() + 180
    try:
        while not target.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0, "the run survived a killed rank"
    assert not (run / "export").exists()
    steps_before = set(train_losses(run))
    assert 12 not in steps_before

    resumed = train(shards, run, "train.epochs=3", "train.ckpt_every=3", "train.resume=auto")
    assert "resumed from" in resumed.stdout
    assert_trained_together(run)
    ours, reference = train_losses(run), train_losses(ddp_run)
    after = [s for s in sorted(reference) if s > 3]
    assert after == list(range(4, 13))
    for s in after:
        assert ours[s] == pytest.approx(reference[s], rel=1e-5, abs=1e-6), (s, ours[s], reference[s])


def test_torchrun_ddp_with_accumulation_and_ema(shards, tmp_path):
    run = tmp_path / "run"
    train(shards, run, "train.epochs=3", "train.engine=torchrun-ddp", "train.grad_accum=2", "train.ema_decay=0.9")
    report = json.loads((run / "ranks" / "rank0.json").read_text())
    assert report["engine"] == "torchrun-ddp" and report["steps"] == 6  # 4 batches per epoch / 2 per step
    assert_trained_together(run)
    assert_loss_went_down(run)
    live = torch.load(run / "eval" / "final_logits.pt", weights_only=False)
    assert live["which"] == "ema"
    assert json.loads((run / "export" / "calibration.json").read_text())["weights"] == "ema"
    assert_export_matches_live(run, atol=1e-4)


def test_resume_into_a_run_of_another_model_is_a_clear_error(shards, ddp_run, tmp_path):
    """`train.resume=auto` in a folder whose checkpoints hold another model: exit 2 with the differing keys,
    not a state_dict traceback from every rank."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    proc = train(shards, run, "train.epochs=4", "model.img_size=48", "train.resume=auto", check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "another model config" in out and "model.img_size: 32 → 48" in out, out[-3000:]


def test_compile_with_ema_and_layer_decay_on_two_ranks_exports_strictly(shards, tmp_path):
    """train.compile=true after groups/EMA/engine (issue: `_orig_mod.` names broke groups, EMA and export).
    A near-zero EMA decay makes the EMA track the weights, so EMA == the trained weights is checkable."""
    from safetensors.torch import load_file

    from mycodist.train import checkpoint as ck
    from mycodist.train.checkpoint import consolidated_state_dict

    run = tmp_path / "run"
    train(shards, run, "train.epochs=1", "train.compile=true", "train.ema_decay=1e-9", "train.layer_decay=0.75",
          timeout=420)
    assert_trained_together(run)
    exported = load_file(str(run / "export" / "model.safetensors"))
    assert not any("_orig_mod" in k or k.startswith("module.") for k in exported)
    weights = consolidated_state_dict(ck.complete_checkpoints(run)[-1])
    assert set(weights) == set(exported)
    for k, v in weights.items():
        assert torch.allclose(exported[k], v, atol=1e-6), k
    assert json.loads((run / "export" / "calibration.json").read_text())["weights"] == "ema"
    assert_export_matches_live(run, atol=1e-4)
