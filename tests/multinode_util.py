"""Two "nodes" on one machine, started the way a user starts them on two hosts: one launcher process per
node (torchrun --nnodes 2 --node_rank R, accelerate --num_machines 2 --machine_rank R, deepspeed --no_ssh
--node_rank R), rendezvous on 127.0.0.1. Each node runs in its own session so a test can kill it whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from train_util import REPO, TINY

SCRIPT = str(REPO / "launch" / "train.py")
LAUNCHERS = ("torch.distributed.run", "accelerate.commands", "deepspeed.launcher")  # not "accelerate": train.engine=accelerate


def rank_pids(pid: int) -> list[int]:
    """The processes under `pid` running launch/train.py themselves (the ranks, not a launcher)."""
    found, todo = [], [pid]
    while todo:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())], capture_output=True, text=True).stdout
        for child in map(int, out.split()):
            todo.append(child)
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "launch/train.py" in cmd and not any(x in cmd for x in LAUNCHERS):
                found.append(child)
    return found
# OMP: the launchers leave it unset for multi-node (each rank would take every core); GLOO_SOCKET_IFNAME: the
# ranks' own connections stay on loopback too, not only the rendezvous
BASE_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu",
            "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def node_argv(launcher: str, rank: int, port: int, hostfile: Path | None = None, config_file: str | None = None,
              extra: tuple[str, ...] = ()) -> list[str]:
    py = sys.executable
    if launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                "--master_addr", "127.0.0.1", "--master_port", str(port), *extra, SCRIPT]
    if launcher == "accelerate":
        conf = ["--config_file", config_file] if config_file else ["--multi_gpu", "--num_machines", "2"]
        return [py, "-m", "accelerate.commands.launch", *conf, "--num_processes", "2", "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
                "--dynamo_backend", "no", *extra, SCRIPT]
    if launcher == "deepspeed":
        return [py, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                "--master_addr", "127.0.0.1", "--master_port", str(port), *extra, SCRIPT]
    raise ValueError(launcher)


class Nodes:
    """Both nodes of one launch; `wait()` collects exit codes and logs, `kill()` ends every process of both."""

    def __init__(self, launcher: str, shards: Path, run_dir: Path, *overrides: str, port: int, log_dir: Path,
                 wrap: dict[int, list[str]] | None = None, **kw) -> None:
        self.logs = [log_dir / f"node{r}.log" for r in range(2)]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs = []
        for r in range(2):
            argv = node_argv(launcher, r, port, **kw) + [f"data.shards={shards}", f"train.output_dir={run_dir}",
                                                         *TINY, "train.tb=false", *overrides]
            argv = (wrap or {}).get(r, []) + argv
            with open(self.logs[r], "w") as log:
                self.procs.append(subprocess.Popen(argv, cwd=REPO, env={**os.environ, **BASE_ENV}, stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True))

    def out(self, r: int) -> str:
        return self.logs[r].read_text(errors="replace")

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        for p in self.procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        """End every process of every node, also a (SIGSTOPped) worker whose launcher has already exited: the
        process group outlives its leader, so kill the group whether or not the launcher is still there."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # SIGKILL also ends a SIGSTOPped worker
            except ProcessLookupError:
                pass
            p.wait()

    def worker_pid(self, r: int) -> int:
        """The rank process of node r (the child running launch/train.py, not a launcher)."""
        found = rank_pids(self.procs[r].pid)
        assert len(found) == 1, found
        return found[0]


def run_nodes(launcher: str, shards: Path, run_dir: Path, *overrides: str, port: int, timeout: float = 300,
              **kw) -> Nodes:
    """Launch both nodes and wait; fails with both logs when either node fails."""
    nodes = Nodes(launcher, shards, run_dir, *overrides, port=port, log_dir=run_dir.parent / f"logs-{run_dir.name}",
                  **kw)
    try:
        rcs = nodes.wait(timeout)
    finally:
        nodes.kill()
    assert rcs == [0, 0], f"rc {rcs}\n--- node0\n{nodes.out(0)[-5000:]}\n--- node1\n{nodes.out(1)[-5000:]}"
    return nodes


def wait_for(path: Path, nodes: Nodes, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        for r, p in enumerate(nodes.procs):
            assert p.poll() is None, f"node {r} ended early (rc {p.returncode}):\n{nodes.out(r)[-4000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)
