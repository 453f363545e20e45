"""`mycodist train --nproc N [key=value...]`: start launch/train.py under the launcher that fits the
engine, with the environment and flags that avoid the silent CPU traps (docs/training.md):
accelerate needs --multi_gpu plus ACCELERATE_USE_CPU=true to start N real ranks on CPU, the deepspeed
launcher needs --num_gpus, an explicit free --master_port and OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from mycodist.errors import UsageError
from mycodist.train.elastic import NO_SHARED_STORE
from mycodist.train.engines import LAUNCHER_OF, configured_engine, resolve_precision

LAUNCHERS = ("accelerate", "deepspeed", "torchrun")


def entry_script() -> Path:
    """launch/train.py in a source checkout; the same entry inside the package otherwise."""
    repo_script = Path(__file__).resolve().parents[2] / "launch" / "train.py"
    return repo_script if repo_script.is_file() else Path(__file__).resolve().parents[1] / "rank_entry.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_count() -> int:
    """GPUs torch can use; skips importing torch (seconds) on a machine with no GPU device nodes."""
    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_launcher(cfg: DictConfig) -> str:
    return LAUNCHER_OF[configured_engine(cfg)]


def launch_command(cfg: DictConfig, nproc: int, gpus: int, port: int, script_args: list[str],
                   launcher: str | None = None, nnodes: int = 1, node_rank: int = 0,
                   master_addr: str = "127.0.0.1", max_restarts: int = 0) -> tuple[list[str], dict[str, str]]:
    """The argv and the extra environment that start `nproc` ranks of launch/train.py on this node; with
    `nnodes` > 1 it is node `node_rank`'s command (run one per node, rendezvous at `master_addr`). With
    `max_restarts` the launcher restarts failed workers, which resume from the last checkpoint; several nodes
    then rendezvous through c10d with a fresh store per attempt (mycodist/train/elastic.py says why)."""
    launcher = launcher or pick_launcher(cfg)
    if launcher not in LAUNCHERS:
        raise UsageError(f"--launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    cpu = gpus == 0
    precision = resolve_precision(str(cfg.train.precision), "cpu" if cpu else "cuda")
    env: dict[str, str] = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))} if cpu else {}
    py = sys.executable
    script = str(entry_script())
    if launcher == "torchrun":
        if cpu:
            env.update(ACCELERATE_USE_CPU="true", DS_ACCELERATOR="cpu")
        argv = [py, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc)]
        if max_restarts and nnodes > 1:  # c10d, not static: the only rendezvous that can renew its store
            env[NO_SHARED_STORE] = "1"
            argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master_addr}:{port}", "--rdzv-id", f"mycodist-{port}"]
        else:
            argv += ["--node_rank", str(node_rank)] if nnodes > 1 else []
            argv += ["--master_addr", master_addr, "--master_port", str(port)]
        argv += ["--max-restarts", str(max_restarts)] if max_restarts else []
    elif launcher == "deepspeed":
        if max_restarts:
            raise UsageError("--max-restarts: DeepSpeed's launcher does not restart workers; use --launcher torchrun "
                             "(train.engine=deepspeed runs under torchrun too)")
        if cpu:
            env["DS_ACCELERATOR"] = "cpu"
        argv = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port)]
        if nnodes > 1:  # no ssh: the same command on every node, its rank given (hostfile: `host slots=N` lines)
            argv = [py, "-m", "deepspeed.launcher.runner", "--hostfile", "hostfile", "--no_ssh", "--node_rank",
                    str(node_rank), "--master_addr", master_addr, "--master_port", str(port)]
        script_args = [*script_args, "train.engine=deepspeed"] if cfg.train.engine == "auto" else script_args
    else:
        argv = [py, "-m", "accelerate.commands.launch", "--num_processes", str(nproc * nnodes), "--num_machines",
                str(nnodes), "--mixed_precision", "no" if precision == "fp32" else precision, "--dynamo_backend", "no",
                "--main_process_port", str(port)]
        argv += ["--machine_rank", str(node_rank), "--main_process_ip", master_addr] if nnodes > 1 else []
        if max_restarts and nnodes > 1:
            raise UsageError("--max-restarts on several nodes: accelerate's static rendezvous keeps one store for every "
                             "attempt (mycodist/train/elastic.py); use --launcher torchrun")
        argv += ["--max_restarts", str(max_restarts)] if max_restarts else []
        if cfg.train.deepspeed_config:  # accelerate reads the JSON itself; "auto" fields come from us
            argv += ["--use_deepspeed", "--deepspeed_config_file", str(cfg.train.deepspeed_config)]
            script_args = [*script_args, "train.engine=accelerate"]
        elif cfg.train.zero_stage > 0:
            argv += ["--use_deepspeed", "--zero_stage", str(cfg.train.zero_stage),
                     "--gradient_accumulation_steps", str(cfg.train.grad_accum),
                     "--gradient_clipping", str(cfg.train.clip_grad),
                     "--offload_optimizer_device", cfg.train.offload]
            script_args = [*script_args, "train.engine=accelerate"]
        else:
            if cpu:
                env["ACCELERATE_USE_CPU"] = "true"  # without it --multi_gpu starts N lone rank-0s
            if nproc * nnodes > 1:
                argv.append("--multi_gpu")
            elif cpu:
                argv.append("--cpu")
    return [*argv, script, *script_args], env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes on this machine (default train.nproc; 0 = one per GPU, 2 on CPU)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default=None,
                        help="override the launcher chosen from train.engine / train.zero_stage")
    parser.add_argument("--print-command", action="store_true", help="print the launch command and exit")
    parser.add_argument("--nnodes", type=int, default=1,
                        help="nodes of a multi-node run: the command is this node's (run it on each node)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1 (with --nnodes)")
    parser.add_argument("--master-addr", default="127.0.0.1",
                        help="address of node 0, where the ranks rendezvous (with --nnodes)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart failed workers up to N times; they resume from the last checkpoint "
                             "(torchrun and accelerate launchers)")


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    gpus = gpu_count()
    nproc = args.nproc if args.nproc is not None else int(cfg.train.nproc)
    if nproc < 0:
        raise UsageError(f"--nproc {nproc} must be at least 1 (or 0 for one per GPU / 2 on CPU)")
    if nproc == 0:
        nproc = gpus or 2
    if gpus and nproc > gpus:
        raise UsageError(f"--nproc {nproc} exceeds the {gpus} GPU(s) of this machine")
    nnodes, node_rank = int(getattr(args, "nnodes", 1)), int(getattr(args, "node_rank", 0))
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UsageError(f"--nnodes {nnodes} --node-rank {node_rank}: need nnodes >= 1 and 0 <= node-rank < nnodes")
    if nnodes > 1 and not int(cfg.train.master_port):
        raise UsageError("a multi-node run needs the same port on every node: set train.master_port=PORT")
    max_restarts = int(getattr(args, "max_restarts", 0))
    if max_restarts < 0:
        raise UsageError(f"--max-restarts {max_restarts} must be 0 or more")
    if max_restarts and str(cfg.train.resume) == "none":
        raise UsageError("--max-restarts with train.resume=none: restarted workers would start from step 0; "
                         "use train.resume=auto (the default)")
    port = int(cfg.train.master_port) or free_port()
    script_args = ([f"--config={args.config}"] if args.config else []) + list(args.overrides)
    argv, env = launch_command(cfg, nproc, gpus, port, script_args, args.launcher, nnodes, node_rank,
                               getattr(args, "master_addr", "127.0.0.1"), max_restarts)
    shown = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(argv)
    print(f"launch: {shown.strip()}", flush=True)
    if args.print_command:
        return 0
    proc = subprocess.Popen(argv, env={**os.environ, **env}, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        os.killpg(proc.pid, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc != 0:
        print(f"mycodist train: the launcher exited with status {rc}", file=sys.stderr)
    return rc
