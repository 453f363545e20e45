"""`mycodist bench-comm`: an nccl-tests analogue — time, algbw and busbw of each collective by message size.

Under a launcher (RANK/WORLD_SIZE set) it runs as one rank; `--nproc N` starts itself on N local processes
with torchrun, gloo on CPU and nccl on GPU (one GPU per rank). Sizes follow nccl-tests: the whole buffer
(all_gather: the gathered output; reduce_scatter: the input). Each size gets `bench_warmup` untimed and
`bench_repeats` timed runs, each between barriers; the reported time is the slowest rank's median.
Rank 0 prints a table and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mycodist.errors import UsageError

BENCH_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=0,
                        help="start N local ranks with torchrun (default: run as one rank of the current launch)")
    parser.add_argument("--out", default=None, help="folder for bench_comm.json and bench_comm.png "
                        "(default: profile.bench_out; empty = print only)")


def sizes(lo: int, hi: int) -> list[int]:
    """Doubling message sizes from `lo` to `hi` bytes (both included when hi is lo × a power of two)."""
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 2
    return out


def _check(cfg: DictConfig) -> tuple[list[str], list[int], int, int, str]:
    p = cfg.profile
    ops = list(p.bench_ops)
    bad = [o for o in ops if o not in BENCH_OPS]
    if bad or not ops:
        raise UsageError(f"profile.bench_ops has {bad or 'nothing'}; choose from {', '.join(BENCH_OPS)}")
    lo, hi = int(p.bench_min_bytes), int(p.bench_max_bytes)
    if lo < 4 or hi < lo:
        raise UsageError(f"need 4 <= profile.bench_min_bytes <= profile.bench_max_bytes, got {lo} and {hi}")
    if hi > 2 ** 31:
        raise UsageError(f"profile.bench_max_bytes={hi} is over 2 GiB; each rank holds up to 3× that in memory")
    if int(p.bench_repeats) < 1 or int(p.bench_warmup) < 0:
        raise UsageError("profile.bench_repeats must be >= 1 and profile.bench_warmup >= 0")
    if str(p.bench_dtype) not in ("float32", "float16", "bfloat16", "float64"):
        raise UsageError(f"profile.bench_dtype={p.bench_dtype}; choose float32, float16, bfloat16 or float64")
    return ops, sizes(lo, hi), int(p.bench_warmup), int(p.bench_repeats), str(p.bench_dtype)


def _relaunch(args: argparse.Namespace) -> int:
    """Start N copies of this command under torchrun (free port via --standalone)."""
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "mycodist", "bench-comm"]
    if args.config:
        cmd += ["--config", args.config]
    if args.out is not None:
        cmd += ["--out", args.out]
    cmd += list(args.overrides)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    return subprocess.call(cmd, env=env)


def _make_op(op: str, nbytes: int, n: int, dtype: Any, device: Any) -> tuple[Callable[[], Any], int]:
    """A closure running one collective of message size `nbytes`, and the exact size it moves."""
    import torch
    import torch.distributed as dist

    elt = torch.empty((), dtype=dtype, device="cpu").element_size()
    count = max(nbytes // elt // n, 1) * n  # divisible by n for the scatter/gather forms
    if op == "all_reduce":
        t = torch.ones(count, dtype=dtype, device=device)
        return (lambda: dist.all_reduce(t)), count * elt
    if op == "broadcast":
        t = torch.ones(count, dtype=dtype, device=device)
        return (lambda: dist.broadcast(t, src=0)), count * elt
    if op == "all_gather":
        out, inp = torch.empty(count, dtype=dtype, device=device), torch.ones(count // n, dtype=dtype, device=device)
        return (lambda: dist.all_gather_into_tensor(out, inp)), count * elt
    if op == "reduce_scatter":
        out, inp = torch.empty(count // n, dtype=dtype, device=device), torch.ones(count, dtype=dtype, device=device)
        return (lambda: dist.reduce_scatter_tensor(out, inp)), count * elt
    if op == "all_to_all":
        out, inp = torch.empty(count, dtype=dtype, device=device), torch.ones(count, dtype=dtype, device=device)
        return (lambda: dist.all_to_all_single(out, inp)), count * elt
    raise ValueError(op)


def run_rank(cfg: DictConfig) -> list[dict]:
    """Benchmark every op × size on this rank; every rank returns the same (max-over-ranks) table."""
    import torch
    import torch.distributed as dist

    from mycodist.profile.collectives import busbw_factor

    ops, size_list, warmup, repeats, dtype_name = _check(cfg)
    dtype = getattr(torch, dtype_name)
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    n = dist.get_world_size()
    rows = []
    for op in ops:
        for nbytes in size_list:
            fn, actual = _make_op(op, nbytes, n, dtype, device)
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                dist.barrier()
                if use_cuda:  # device time of the kernel: one GPU cannot show more (no host wait inside)
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) / 1e3)
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
            med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
            dist.all_reduce(med, op=dist.ReduceOp.MAX)
            t = float(med.item())
            algbw = actual / t if t > 0 else 0.0
            rows.append({"op": op, "bytes": actual, "dtype": dtype_name, "median_s": t, "algbw_GBps": algbw / 1e9,
                         "busbw_GBps": algbw * busbw_factor(op, n) / 1e9})
            del fn
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':<15}{'size (B)':>12}{'time (us)':>13}{'algbw (GB/s)':>14}{'busbw (GB/s)':>14}"]
    for r in rows:
        lines.append(f"{r['op']:<15}{r['bytes']:>12}{r['median_s'] * 1e6:>13.1f}{r['algbw_GBps']:>14.3f}"
                     f"{r['busbw_GBps']:>14.3f}")
    return "\n".join(lines)


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    _check(cfg)  # bad config fails before any process starts
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.nproc and not launched:
        return _relaunch(args)
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not launched:  # a plain single process: a world of one (no transfer; shows per-call overhead)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if backend == "nccl":
        from mycodist.devices import set_local_cuda_device

        set_local_cuda_device()  # before the group: its barriers and collectives use this GPU
    dist.init_process_group(backend)
    try:
        rows = run_rank(cfg)
        n = dist.get_world_size()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        result = {"benchmark": "bench-comm", "backend": backend, "world_size": n,
                  "device": torch.cuda.get_device_name() if backend == "nccl" else "cpu",
                  "timing": "cuda events (device time)" if backend == "nccl" else "host perf_counter",
                  "peak_busbw_GBps": {op: max(r["busbw_GBps"] for r in rows if r["op"] == op)
                                      for op in dict.fromkeys(r["op"] for r in rows)},
                  "results": rows}
        out = args.out if args.out is not None else str(cfg.profile.bench_out)
        if out:
            _write(result, Path(out), cfg)
        print(format_table(rows))
        print(json.dumps(result), flush=True)
    return 0


def _write(result: dict, out: Path, cfg: DictConfig) -> None:
    from mycodist.atomic import atomic_write_json
    from mycodist.config import save_config
    from mycodist.profile.report import plot_bandwidth

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench_comm.json", result)
    plot_bandwidth(result["results"], out / "bench_comm.png",
                   f"bench-comm: {result['backend']}, {result['world_size']} ranks")
    save_config(cfg, out)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
