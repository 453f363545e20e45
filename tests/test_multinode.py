"""Two nodes on loopback, each started by its launcher's own multi-node means, as a user would on two hosts:
torchrun --nnodes 2, accelerate --num_machines 2 (flags and configs/accelerate/2nodes.yaml), DeepSpeed's
launcher with a hostfile in its no-ssh mode. One process per node (world size 2): trained together,
checkpointed, resumed; a stalled peer (SIGSTOP) turns into the watchdog's line within 90 s and a relaunch
continues with the losses of an uninterrupted run; a run folder that is not shared fails at start-up."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multinode_util import BASE_ENV, Nodes, rank_pids, run_nodes, wait_for
from train_util import REPO, TINY, assert_trained_together, train_losses

from mycodist.train.cli import free_port

pytestmark = pytest.mark.slow
WATCHDOG_LINE = re.compile(r"mycodist watchdog: rank 0 on \S+ \(node 0\) waited \d+ s in (.+?) at step (\d+) "
                           r"\(train\.dist_timeout=30 s\)")
RUN = ("train.epochs=2", "train.ckpt_every=3", "train.export=false")


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """torchrun, 2 nodes, 8 steps uninterrupted: world size 2, equal parameters, the losses to match."""
    run = tmp_path_factory.mktemp("mn_ref") / "run"
    run_nodes("torchrun", shards, run, *RUN, port=free_port())
    assert_trained_together(run)
    assert sorted(train_losses(run)) == list(range(1, 9))
    return run


def assert_same_losses_after(run: Path, reference: Path, resumed_at: int) -> None:
    ours, ref = train_losses(run), train_losses(reference)
    later = [s for s in sorted(ref) if s > resumed_at]
    assert later and all(s in ours for s in later), (sorted(ours), later)
    for s in later:
        assert ours[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), (s, ours[s], ref[s])


def resumed_step(out: str) -> int:
    m = re.search(r"resumed from \S+step-(\d+) at step (\d+)", out)
    assert m, out[-3000:]
    return int(m.group(2))


def test_stalled_peer_gives_one_clear_line_and_a_relaunch_resumes(shards, reference, tmp_path):
    run = tmp_path / "run"
    nodes = Nodes("torchrun", shards, run, *RUN, "train.dist_timeout=30", port=free_port(), log_dir=tmp_path / "logs")
    hung = None
    try:
        wait_for(run / "ckpt" / "step-00000003" / "meta.json", nodes)
        hung = nodes.worker_pid(1)
        os.kill(hung, signal.SIGSTOP)  # node 1 hangs without closing its sockets
        stopped = time.time()
        rc0 = nodes.procs[0].wait(timeout=90)
        waited = time.time() - stopped
    finally:
        nodes.kill()
        if hung is not None:  # torchrun runs its workers in their own sessions: the launcher's group misses it
            try:
                os.kill(hung, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = nodes.out(0)
    assert rc0 != 0, out[-3000:]
    lines = WATCHDOG_LINE.findall(out)
    assert len(lines) == 1, out[-4000:]  # one line from the one surviving rank
    assert waited < 90
    assert "train.resume=auto" in out
    # relaunch both nodes: rank 0 picks the last complete checkpoint, every rank loads it
    resumed = run_nodes("torchrun", shards, run, *RUN, "train.dist_timeout=30", port=free_port())
    at = resumed_step(resumed.out(0))
    assert at >= 3
    assert_trained_together(run)
    assert_same_losses_after(run, reference, at)


def test_accelerate_two_machines_flags_then_resume_through_2nodes_yaml(shards, tmp_path):
    run = tmp_path / "run"
    run_nodes("accelerate", shards, run, "train.epochs=1", "train.export=false", port=free_port())
    assert_trained_together(run)
    resumed = run_nodes("accelerate", shards, run, "train.epochs=2", "train.export=false", port=free_port(),
                        config_file="configs/accelerate/2nodes.yaml")
    assert resumed_step(resumed.out(0)) == 4
    assert_trained_together(run)
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < 0.8 * losses[1], losses


def test_deepspeed_launcher_hostfile_no_ssh(shards, tmp_path):
    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    common = ("train.engine=deepspeed", "train.zero_stage=2", "train.export=false")
    run_nodes("deepspeed", shards, run, "train.epochs=1", *common, port=free_port(), hostfile=hostfile)
    assert_trained_together(run)
    resumed = run_nodes("deepspeed", shards, run, "train.epochs=2", *common, port=free_port(), hostfile=hostfile)
    assert resumed_step(resumed.out(0)) == 4
    assert_trained_together(run)
    assert (sorted((run / "ckpt").glob("step-*"))[-1] / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare --mount as root")
def test_a_run_folder_that_is_not_shared_fails_fast_naming_the_node(shards, tmp_path):
    """Node 1 gets a private tmpfs over the run folder's parent (its own "local disk"): both nodes exit
    non-zero within seconds, and the message names node 1."""
    private = tmp_path / "private"
    private.mkdir()
    wrap = {1: ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs none "{private}" && exec "$@"', "sh"]}
    nodes = Nodes("torchrun", shards, private / "run", "train.epochs=1", "train.export=false", port=free_port(),
                  log_dir=tmp_path / "logs", wrap=wrap)
    try:
        rcs = nodes.wait(timeout=120)
    finally:
        nodes.kill()
    assert rcs[0] != 0 and rcs[1] != 0, rcs
    for r in range(2):
        out = nodes.out(r)
        assert "rank 1 on" in out and "(node 1)" in out and "not the same folder as on rank 0" in out, out[-3000:]
    assert not (private / "run" / "ckpt").exists()


def test_print_command_shows_the_per_node_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mycodist", "train", "--print-command", "--nnodes", "2", "--node-rank", "1",
                          "--master-addr", "10.1.2.3", "--nproc", "4", "--launcher", "torchrun",
                          "train.master_port=29400"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert "--nnodes 2" in out and "--node_rank 1" in out and "--master_addr 10.1.2.3" in out, out
    assert "--nproc_per_node 4" in out and "--master_port 29400" in out, out


def _kill_one_rank_after_a_checkpoint(run: Path, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Once step 3's checkpoint is complete, kill -9 one rank (the launchers stay): a crashed worker."""
    deadline = time.time() + 180
    while not (run / "ckpt" / "step-00000003" / "meta.json").exists():
        for p, log in zip(procs, logs, strict=True):
            assert p.poll() is None, f"ended early (rc {p.returncode}):\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, "no checkpoint at step 3"
        time.sleep(0.02)
    ranks = [pid for p in procs for pid in rank_pids(p.pid)]
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGKILL)


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> str:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    outs = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}" for log in logs)
    assert [p.returncode for p in procs] == [0] * len(procs), outs
    return outs


def test_max_restarts_one_node_a_killed_worker_restarts_and_resumes(shards, reference, tmp_path):
    """`mycodist train --max-restarts 1` (torchrun, one agent, its shared store): a rank killed mid-run is
    restarted by torchrun with its peer, the new group connects (the per-attempt store prefix), both resume
    from the last complete checkpoint and log the losses of an uninterrupted run."""
    run, log = tmp_path / "run", tmp_path / "train.log"
    argv = [sys.executable, "-m", "mycodist", "train", "--nproc", "2", "--launcher", "torchrun", "--max-restarts", "1",
            f"data.shards={shards}", f"train.output_dir={run}", *TINY, "train.tb=false", *RUN]
    with open(log, "w") as f:
        procs = [subprocess.Popen(argv, cwd=REPO, env={**os.environ, **BASE_ENV}, stdout=f, stderr=subprocess.STDOUT,
                                  start_new_session=True)]
    _kill_one_rank_after_a_checkpoint(run, procs, [log])
    out = _finish(procs, [log])
    assert "--max-restarts 1" in out and "mycodist/attempt" not in out, out  # the prefix is internal
    assert resumed_step(out) >= 3
    assert_trained_together(run)
    assert_same_losses_after(run, reference, resumed_step(out))


def test_max_restarts_two_nodes_c10d_fresh_store_each_attempt(shards, reference, tmp_path):
    """Two nodes from `mycodist train --nnodes 2 --max-restarts 1`'s per-node commands (c10d rendezvous,
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): node 1's worker is killed; both agents restart their workers
    (node 0's without counting a restart of its own: the counts differ, which is why no per-attempt prefix
    is used there) and the run resumes with the reference losses."""
    from mycodist.config import load_config
    from mycodist.train.cli import launch_command

    run = tmp_path / "run"
    script_args = [f"data.shards={shards}", f"train.output_dir={run}", *TINY, "train.tb=false", *RUN]
    cfg, port = load_config(None, script_args), free_port()
    procs, logs = [], [tmp_path / f"node{r}.log" for r in range(2)]
    for r in range(2):
        argv, env = launch_command(cfg, 1, 0, port, script_args, "torchrun", 2, r, "127.0.0.1", max_restarts=1)
        assert env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1" and "c10d" in argv, argv
        with open(logs[r], "w") as f:
            procs.append(subprocess.Popen(argv, cwd=REPO, env={**os.environ, **BASE_ENV, **env, "OMP_NUM_THREADS": "1"},
                                          stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    _kill_one_rank_after_a_checkpoint(run, procs, logs)
    out = _finish(procs, logs)
    assert resumed_step(out) >= 3
    assert_trained_together(run)
    assert_same_losses_after(run, reference, resumed_step(out))
