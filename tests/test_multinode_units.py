"""The multi-node pieces on their own, cheaply: the watchdog's line from a timed-out collective and from one
that never returns, rank 0's resume decision shared by both ranks, and launch/slurm.sbatch's per-node commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mycodist.train.cli import free_port
from mycodist.train.watchdog import EXIT_STALLED, Watchdog

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def two_ranks(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), str(REPO / "tests" / "consensus_worker.py"), *args]
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout)


def make_ckpt(run: Path, step: int) -> Path:
    d = run / "ckpt" / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step}))
    return d


@pytest.mark.slow
def test_every_rank_loads_the_checkpoint_rank_0_chose(tmp_path):
    chosen = make_ckpt(tmp_path / "rank0", 3)
    make_ckpt(tmp_path / "rank1", 9)  # what rank 1 would have picked by itself
    proc = two_ranks("resume", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    for out in outs:
        assert out["auto"] == str(chosen) and out["none"] == "None"
    for out in outs:
        assert "rank 1 on" in out["invisible"] and "cannot see checkpoint ckpt/step-00000003" in out["invisible"], out
        assert "rank 0 on" not in out["invisible"], out


@pytest.mark.slow
def test_a_timed_out_barrier_gives_the_line_and_exit_75(tmp_path):
    start = time.time()
    proc = two_ranks("stall", str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "mycodist watchdog: rank 0 on" in out and "in barrier from main (consensus_worker.py:" in out, out[-3000:]
    assert "at step 7 (train.dist_timeout=3 s)" in out and f"exitcode  : {EXIT_STALLED}" in out, out[-3000:]
    assert time.time() - start < 60


def test_a_collective_that_never_returns_is_caught_by_the_thread():
    code = ("import time\nfrom mycodist.train.watchdog import Watchdog\n"
            "wd = Watchdog(1.0, rank=3, poll_s=0.05, grace_s=0.5)\nwd.step = 12\n"
            "with wd.watch('forward (ZeRO-3 parameter all-gather)'):\n    time.sleep(30)\n")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=30)
    assert proc.returncode == EXIT_STALLED
    assert time.time() - start < 20
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("mycodist watchdog: rank 3 on ") and "in forward (ZeRO-3 parameter all-gather) at step 12" in line
    assert "[the collective did not return]" in line


def test_an_error_that_is_not_a_timeout_passes_through():
    wd = Watchdog(100.0)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        with wd.watch("backward (DDP gradient all-reduce)"):
            raise RuntimeError("Connection closed by peer")


def slurm_lines(tmp_path: Path, **extra_env: str) -> list[str]:
    """srun and scontrol stand in for SLURM's (one task per node with its SLURM_NODEID); PYTHON=echo prints
    the command each node would run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nfor n in 0 1; do SLURM_NODEID=$n "$@"; done\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64", "PYTHON": "echo", **extra_env}
    out = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "train.output_dir=/shared/r", "train.epochs=3"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2, out
    return out


def test_slurm_script_starts_one_torchrun_per_node_rendezvousing_on_the_first(tmp_path):
    out = slurm_lines(tmp_path)
    for n, line in enumerate(out):
        assert line.startswith("-m torch.distributed.run --nnodes 2 --nproc_per_node 8 "), line
        assert f"--node_rank {n} --master_addr gpu-a --master_port 29500 launch/train.py" in line, line
        assert line.endswith("train.output_dir=/shared/r train.epochs=3"), line


def test_dist_timeout_defaults_per_device_and_refuses_negatives():
    from mycodist.config import load_config
    from mycodist.errors import UsageError
    from mycodist.train.watchdog import dist_timeout_s

    assert dist_timeout_s(load_config(None, []), "cuda") == 600 and dist_timeout_s(load_config(None, []), "cpu") == 300
    assert dist_timeout_s(load_config(None, ["train.dist_timeout=45"]), "cuda") == 45
    with pytest.raises(UsageError, match="train.dist_timeout"):
        dist_timeout_s(load_config(None, ["train.dist_timeout=-1"]), "cpu")


def test_accelerate_with_an_fsdp_config_selects_the_fsdp_engine_and_its_sharding(monkeypatch):
    from mycodist.config import load_config
    from mycodist.errors import UsageError
    from mycodist.train.engines import choose_engine
    from mycodist.train.fsdp import fsdp_sharding

    cfg = load_config(None, [])
    for k, v in {"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true",
                 "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}.items():
        monkeypatch.setenv(k, v)
    assert choose_engine(cfg) == "fsdp" and fsdp_sharding(cfg) == "shard_grad_op"
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    assert fsdp_sharding(cfg) == "full_shard"
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UsageError, match="fsdp_version 1"):
        fsdp_sharding(cfg)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert choose_engine(cfg) == "accelerate"
    assert fsdp_sharding(load_config(None, ["train.fsdp_sharding=shard_grad_op"])) == "shard_grad_op"
    with pytest.raises(UsageError, match="fsdp_sharding"):
        fsdp_sharding(load_config(None, ["train.fsdp_sharding=hybrid"]))


ELASTIC = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_RESTART_COUNT": "1",
           "GROUP_WORLD_SIZE": "1"}


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),  # not under torchrun
    ({**ELASTIC, "TORCHELASTIC_MAX_RESTARTS": "0"}, None),  # no restarts: torch's own set-up is right
    ({**ELASTIC, "TORCHELASTIC_USE_AGENT_STORE": "False"}, None),  # a fresh store every attempt
    (ELASTIC, "mycodist/attempt_1"),  # one agent, restarts, its store kept across attempts
])
def test_restart_prefix_only_where_the_agent_store_outlives_an_attempt(monkeypatch, env, expected):
    from mycodist.train.elastic import restart_prefix

    for k in ELASTIC:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert restart_prefix() == expected


def test_restarts_on_several_nodes_with_a_shared_store_are_refused_with_the_fix(monkeypatch):
    from mycodist.errors import UsageError
    from mycodist.train.elastic import restart_prefix

    for k, v in {**ELASTIC, "GROUP_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UsageError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        restart_prefix()


def test_max_restarts_commands_per_launcher():
    from mycodist.config import load_config
    from mycodist.errors import UsageError
    from mycodist.train.cli import launch_command

    cfg = load_config(None, [])
    one, env = launch_command(cfg, 2, 0, 29400, [], "torchrun", max_restarts=3)
    assert "--max-restarts" in one and one[one.index("--max-restarts") + 1] == "3" and "--master_port" in one
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env  # one agent: the per-attempt prefix does it
    two, env = launch_command(cfg, 1, 0, 29400, [], "torchrun", 2, 1, "10.0.0.1", max_restarts=1)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert two[two.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400" and "--node_rank" not in two
    acc, _ = launch_command(cfg, 2, 0, 29400, [], "accelerate", max_restarts=1)
    assert acc[acc.index("--max_restarts") + 1] == "1"
    with pytest.raises(UsageError, match="torchrun"):
        launch_command(cfg, 2, 0, 29400, [], "deepspeed", max_restarts=1)
    with pytest.raises(UsageError, match="torchrun"):
        launch_command(cfg, 1, 0, 29400, [], "accelerate", 2, 0, "10.0.0.1", max_restarts=1)


def test_max_restarts_cli_refuses_resume_none():
    out = subprocess.run([sys.executable, "-m", "mycodist", "train", "--print-command", "--max-restarts", "1",
                          "train.resume=none"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.returncode != 0 and "train.resume=auto" in out.stderr, out.stderr


def test_slurm_script_with_restarts_uses_c10d_and_a_fresh_store(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "echo-env").write_text('#!/bin/sh\necho "store=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE $*"\n')
    (tmp_path / "bin" / "echo-env").chmod(0o755)
    out = slurm_lines(tmp_path, MAX_RESTARTS="2", SLURM_JOB_ID="77", PYTHON=str(tmp_path / "bin" / "echo-env"))
    for line in out:
        assert line.startswith("store=1 -m torch.distributed.run --nnodes 2 --nproc_per_node 8 "), line
        assert "--rdzv-backend c10d --rdzv-endpoint gpu-a:29500 --rdzv-id 77 --max-restarts 2 launch/train.py" in line
        assert "--node_rank" not in line and line.endswith("train.output_dir=/shared/r train.epochs=3"), line
