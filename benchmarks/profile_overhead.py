"""Profiling overhead: DDP step time of a small ViT on 2 gloo ranks, profiler on in its default window
(profile.every=100, steps=5) against the baseline of the same loop with the profiler off, in one run.

Run: OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/profile_overhead.py [STEPS] [ROUNDS]
Wall time swings with other load on a shared machine, so rank 0's CPU time per step (all its threads)
is reported too. Last line: JSON with both step times (best round of each) and the ratio (profiled / baseline), plus the
median of the per-round ratios (rounds alternate, so load drift on a shared machine hits both alike).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mycodist.models import create_model
from mycodist.profile import Profiler


def run(steps: int, profile: bool, run_dir: str) -> tuple[float, float]:
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16", num_classes=4, img_size=64, depth=4)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    cfg = {"enabled": profile, "every": 100, "steps": 5, "start": 10}
    prof = Profiler(cfg, run_dir, dist.get_rank(), dist.get_world_size(), "ddp",
                    [p.numel() for p in model.parameters()])
    prof.attach_ddp(ddp)
    g = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 4, (8,), generator=g)
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        with prof.step(step):
            with prof.phase("data"):
                xb, yb = x.clone(), y.clone()
            with prof.phase("forward"):
                loss = F.cross_entropy(ddp(xb), yb)
            with prof.phase("backward"):
                loss.backward()
            with prof.phase("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
    cpu = time.process_time() - c0  # this rank's CPU seconds (all its threads): robust to other load
    dist.barrier()
    elapsed = time.perf_counter() - t0
    prof.close()
    return elapsed / steps, cpu / steps


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base, prof, base_cpu, prof_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        run(20, False, tmp)  # warm-up
        for _ in range(rounds):  # interleaved so drift on a shared machine hits both alike
            for profile, wall, cpu in ((False, base, base_cpu), (True, prof, prof_cpu)):
                w, c = run(steps, profile, tmp)
                wall.append(w)
                cpu.append(c)
    if dist.get_rank() == 0:
        b, p = min(base), min(prof)
        paired = sorted(q / a for a, q in zip(base, prof, strict=True))  # each round's own ratio
        median_paired = paired[len(paired) // 2] if len(paired) % 2 else sum(paired[len(paired) // 2 - 1:][:2]) / 2
        print(f"baseline (profiler off): {b * 1e3:.2f} ms/step; profiler on (every=100, steps=5): {p * 1e3:.2f}")
        print(json.dumps({"benchmark": "profile_overhead", "steps": steps, "rounds": rounds,
                          "baseline_ms_per_step": b * 1e3, "profiled_ms_per_step": p * 1e3,
                          "ratio": p / b, "overhead_pct": (p / b - 1) * 100, "median_paired_ratio": median_paired,
                          "cpu_baseline_ms_per_step": min(base_cpu) * 1e3, "cpu_profiled_ms_per_step": min(prof_cpu) * 1e3,
                          "cpu_ratio": min(prof_cpu) / min(base_cpu),
                          "all_baseline_ms": [v * 1e3 for v in base], "all_profiled_ms": [v * 1e3 for v in prof]}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
