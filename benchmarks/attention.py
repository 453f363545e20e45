"""Attention kernels head to head: time and peak memory of forward and forward+backward per backend and
sequence length, as ratios to the `math` reference (the named baseline) measured in the same run.

    python benchmarks/attention.py            # CPU, N in 197 577 1024 2048 4096, fp32 (a few minutes)
    python benchmarks/attention.py --quick    # N in 197 1024, one repeat
    python benchmarks/attention.py --device cuda --dtype bf16 --batch 8 --heads 12 --matmul-peak  (GPU)

Timing: one warm-up per backend (it also compiles flex), then `--repeats` rounds in which every backend runs
once in turn (interleaved, so a burst of load from other jobs hits all backends alike); medians of wall time
and of process CPU time (the goal is wall time; CPU time is the cross-check when the cores are shared).
Memory on CPU is the peak resident-set growth over the inputs (VmHWM after resetting it through
/proc/self/clear_refs; glibc is told to return every allocation >= 64 KiB to the OS so freed memory does not
hide growth). On CUDA it is torch.cuda.max_memory_allocated over the inputs. The last line is JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
if sys.platform.startswith("linux") and _MMAP_ENV not in os.environ and "--no-reexec" not in sys.argv:
    # glibc reads this at start-up only: re-exec so big buffers are mmapped and given back when freed
    os.environ[_MMAP_ENV] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv, "--no-reexec"])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mycodist.models.attention import (  # noqa: E402
    flash_attn_qkvpacked,
    flex_attention_any_device,
    math_attention,
)
from mycodist.models.masks import MaskSpec, TokenMask  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- memory -----------------------------------------------------------------------------------------------
def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory growth (MiB) while the block runs, over what was live when it started."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.mib = 0.0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _rss_mib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self.mib = _rss_mib("VmHWM") - self.base
        return False


# -- backends ---------------------------------------------------------------------------------------------
def make_backends(device: str, n: int, sparse_density: float) -> dict:
    """name → fn(q, k, v) on (B, H, N, D). Sparse variants use the ViT token layout (1 class token)."""
    side = round((n - 1) ** 0.5)
    grid = (side, side) if side * side == n - 1 else (1, n - 1)
    sparse = TokenMask(MaskSpec("block_sparse", density=sparse_density, block=128), 1, grid)
    backends = {
        "math": lambda q, k, v: math_attention(q, k, v),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "flex": lambda q, k, v: flex_attention_any_device(q, k, v, None, compiled=True),
        f"flex_block_sparse_{sparse_density:g}": lambda q, k, v: flex_attention_any_device(
            q, k, v, sparse, compiled=True),
    }
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, kern in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                           ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def forced(q, k, v, kern=kern):
                with sdpa_kernel([kern]):
                    return F.scaled_dot_product_attention(q, k, v)

            backends[f"sdpa_{name}"] = forced
        fa = flash_attn_qkvpacked()
        if fa is not None:
            backends["flash_attn"] = lambda q, k, v: fa(torch.stack([q, k, v], 2).transpose(1, 3)).transpose(1, 2)
    return backends, sparse.density()


# -- timing -----------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _once(fn, q, k, v, backward: bool) -> None:
    if backward:
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        out.backward(torch.ones_like(out))
        return
    with torch.no_grad():
        fn(q, k, v)


def measure_interleaved(fns: dict, q, k, v, backward: bool, repeats: int, device: str) -> dict:
    """name → result (or the exception it raised). One warm-up each (which also compiles), then `repeats`
    rounds that run every backend once in turn, so a change in machine load hits all of them alike instead of
    whichever ran during the busy minute. Each timed call starts after gc.collect(). Reports the median wall
    time and the median process CPU time (all threads, user + system: less sensitive than wall time to other
    jobs on the cores, though spin-waiting threads count too), then peak memory in a separate call."""
    out: dict = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        try:
            _once(fn, q, k, v, backward)
            _sync(device)
        except Exception as e:  # a kernel that cannot run this shape/dtype: record why, go on
            out[name] = e
            continue
        out[name] = {"first_ms": (time.perf_counter() - t0) * 1e3, "wall": [], "cpu": []}
    for _ in range(repeats):
        for name in [n for n in fns if isinstance(out[n], dict)]:
            gc.collect()
            w, c = time.perf_counter(), time.process_time()
            try:
                _once(fns[name], q, k, v, backward)
                _sync(device)
            except Exception as e:  # e.g. out of memory only once others' buffers are cached: drop this backend
                out[name] = e
                continue
            out[name]["wall"].append(time.perf_counter() - w)
            out[name]["cpu"].append(time.process_time() - c)
    for name in [n for n in fns if isinstance(out[n], dict)]:
        r = out[name]
        gc.collect()
        try:
            with PeakMemory(device) as mem:
                _once(fns[name], q, k, v, backward)
        except Exception as e:
            out[name] = e
            continue
        r["ms"] = statistics.median(r.pop("wall")) * 1e3
        r["cpu_ms"] = statistics.median(r.pop("cpu")) * 1e3
        r["peak_mib"] = mem.mib
    return out


def attention_flops(b: int, h: int, n: int, d: int, backward: bool, attended: float = 1.0) -> float:
    """QKᵀ and P·V: 4·B·H·N²·D forward; backward is 2.5× forward (FlashAttention's convention)."""
    fwd = 4.0 * b * h * n * n * d * attended
    return fwd * 3.5 if backward else fwd


def matmul_peak_tflops(device: str, dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    """Measured dense matmul throughput: the realistic ceiling to compare attention kernels against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq", type=int, nargs="+", default=[197, 577, 1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=None, help="subset of backends to run (math always runs)")
    p.add_argument("--sparse-density", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--matmul-peak", action="store_true", help="measure a bf16/fp16 matmul peak for TFLOP/s ratios")
    p.add_argument("--quick", action="store_true", help="N in 197 1024, one repeat")
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.repeats = [197, 1024], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    dtype = DTYPES[args.dtype]
    peak = matmul_peak_tflops(args.device, dtype) if args.matmul_peak else None
    if peak:
        print(f"measured {args.dtype} matmul peak: {peak:.1f} TFLOP/s")
    load_start = os.getloadavg()[0]
    results = []
    for n in args.seq:
        torch._dynamo.reset()  # a fresh compile cache per N: 5 lengths x 2 masks would pass dynamo's recompile limit
        gen = torch.Generator(device=args.device).manual_seed(n)
        q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim, device=args.device, dtype=dtype,
                               generator=gen) for _ in range(3))
        backends, sparse_density = make_backends(args.device, n, args.sparse_density)
        names = ["math"] + [b for b in backends if b != "math" and (args.backends is None or b in args.backends)]
        rows = {name: {"backend": name, "N": n} for name in names}
        for mode, backward in (("fwd", False), ("fwdbwd", True)):
            got = measure_interleaved({name: backends[name] for name in names}, q, k, v, backward, args.repeats,
                                      args.device)
            base = got["math"] if isinstance(got["math"], dict) else None
            for name in names:
                row, r = rows[name], got[name]
                if not isinstance(r, dict):
                    row[f"{mode}_error"] = f"{type(r).__name__}: {str(r).splitlines()[0][:160]}"
                    continue
                attended = sparse_density if "sparse" in name else 1.0
                tflops = attention_flops(args.batch, args.heads, n, args.head_dim, backward, attended) / r["ms"] / 1e9
                row.update({f"{mode}_ms": round(r["ms"], 3), f"{mode}_cpu_ms": round(r["cpu_ms"], 3),
                            f"{mode}_first_ms": round(r["first_ms"], 1), f"{mode}_peak_mib": round(r["peak_mib"], 1),
                            f"{mode}_tflops": round(tflops, 4)})
                if peak:
                    row[f"{mode}_of_matmul_peak"] = round(tflops / peak, 4)
                if base is not None and name != "math":
                    row[f"{mode}_time_vs_math"] = round(r["ms"] / base["ms"], 4)
                    row[f"{mode}_cpu_time_vs_math"] = round(r["cpu_ms"] / base["cpu_ms"], 4)
                    row[f"{mode}_mem_vs_math"] = round(r["peak_mib"] / max(base["peak_mib"], 1e-3), 4)
        for name in names:
            results.append(rows[name])
            print(" ".join(f"{k}={v}" for k, v in rows[name].items()), flush=True)
        del q, k, v

    summary = {}
    largest = max(args.seq)
    sdpa = next((r for r in results if r["backend"] == "sdpa" and r["N"] == largest), None)
    if sdpa and "fwdbwd_time_vs_math" in sdpa:
        summary = {
            "N": largest,
            "sdpa_fwd_time_vs_math": sdpa.get("fwd_time_vs_math"),
            "sdpa_fwdbwd_time_vs_math": sdpa["fwdbwd_time_vs_math"],
            "sdpa_fwd_mem_vs_math": sdpa.get("fwd_mem_vs_math"),
            "sdpa_fwdbwd_mem_vs_math": sdpa["fwdbwd_mem_vs_math"],
            "sdpa_fwd_cpu_time_vs_math": sdpa.get("fwd_cpu_time_vs_math"),
            "sdpa_fwdbwd_cpu_time_vs_math": sdpa.get("fwdbwd_cpu_time_vs_math"),
        }
        summary["goal_mem_le_0.1_time_le_0.5"] = all(
            summary[f"sdpa_{m}_mem_vs_math"] <= 0.1 and summary[f"sdpa_{m}_time_vs_math"] <= 0.5
            for m in ("fwd", "fwdbwd")
        )
    print(json.dumps({
        "benchmark": "attention", "baseline": "math", "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "loadavg_1m_start": round(load_start, 2),
        "loadavg_1m_end": round(os.getloadavg()[0], 2), "torch": torch.__version__, "dtype": args.dtype,
        "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "repeats": args.repeats,
        "matmul_peak_tflops": round(peak, 2) if peak else None, "summary": summary, "results": results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
