"""Profiling overhead: DDP step time of a small ViT on 2 gloo ranks, profiler on in its default window
(profile.every=100, steps=5) against the baseline of the same loop with the profiler off, in one run.

Run: OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/profile_overhead.py [STEPS] [ROUNDS]
Wall time swings with other load on a shared machine, so rank 0's CPU time per step (all its threads)
is reported too. Last line: JSON with both step times (best round of each) and the ratio (profiled / baseline), plus the
median of the per-round ratios (rounds alternate, so load drift on a shared machine hits both alike).

Real-trainer mode: `.venv/bin/python benchmarks/profile_overhead.py trainer [--steps 25 --blocks 8]` starts
2 ranks that each build two `mycodist.train.Trainer`s on the same synth shards (engine torchrun-ddp, same
seed): one with profile.enabled=false, one with profiling on in its default window (every=100, steps=5,
start=10, its DDP comm hook attached). Blocks of steps alternate between them; per step, wall time comes
from the trainer's step hooks and CPU time (rank 0, all threads) from process_time between hooks (a
block's first step from the block's start). Evaluation and checkpoints run between blocks and are not
counted, nor in CPU is the other trainer's block (both share the process, so process_time would see it).
Last line: JSON with the ratios profiled / baseline (CPU and wall: medians per step, per block pair, all
counted steps summed, and the profiled window steps against the same steps of the baseline).
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


class EndlessLoader:
    """The trainer's real loader, epoch after epoch without end, so a timed block never hits an epoch end
    (and its evaluation/checkpoint)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.bad_samples = getattr(loader, "bad_samples", {})

    def __len__(self) -> int:
        return 10**9

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        epoch = 0
        while True:
            self.loader.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def trainer_worker(shards: str, out: str, steps: int, blocks: int, batch: int, img: int) -> None:
    """Two real trainers, profiling off / on, alternating blocks of `steps` optimizer steps."""
    import statistics

    from mycodist.config import load_config
    from mycodist.train.trainer import Trainer

    base = [f"data.shards={shards}", f"model.img_size={img}", f"train.batch_size={batch}", "train.export=false",
            "train.resume=none", "data.workers=0", "train.ckpt_every=0", "train.keep_last=1", "train.eval_every=0",
            "train.warmup_steps=1", "train.max_steps=1", "train.log_every=1000000", "train.tb=false",
            "train.engine=torchrun-ddp"]
    trainers, walls, cpus, by_step = {}, {}, {}, {}
    marks: dict[str, float] = {}  # per trainer: process_time at its previous step's end (or its block's start)
    for name, enabled in (("baseline", "false"), ("profiled", "true")):
        cfg = load_config(None, [*base, f"train.output_dir={out}/{name}", f"profile.enabled={enabled}"])
        tr = Trainer(cfg)
        tr.train_loader = EndlessLoader(tr.train_loader)
        tr.steps_per_epoch = 10**9  # no epoch-end evaluation inside a timed block
        walls[name], cpus[name], by_step[name] = [], [], {}

        def hook(step: int, phase: dict, name: str = name) -> None:
            now = time.process_time()
            cpus[name][-1].append(now - marks[name])
            by_step[name][step - 1] = now - marks[name]  # the hook gets the next step's index
            walls[name][-1].append(phase["total"])
            marks[name] = now

        tr.step_hooks.append(hook)
        trainers[name] = tr
    for block in range(blocks + 1):  # block 0 (5 steps) warms both up and is not counted
        for name, tr in trainers.items():
            walls[name].append([])
            cpus[name].append([])
            tr.total_steps = tr.step + (steps if block else 5)  # counted: steps 5.. (windows 10-14, 110-114)
            # A block's CPU clock starts here, not at the previous block's last step: the gap holds the other
            # trainer's whole block and this one's end-of-run evaluation and checkpoint (all one process).
            marks[name] = time.process_time()
            tr.train_loop()
    summaries = {name: tr.profiler.close() for name, tr in trainers.items()}
    if dist.get_rank() == 0:
        med = {k: {"wall": statistics.median([x for b in walls[k][1:] for x in b]),
                   "cpu": statistics.median([x for b in cpus[k][1:] for x in b])} for k in trainers}
        pair_wall = [sum(p) / sum(b) for b, p in zip(walls["baseline"][1:], walls["profiled"][1:], strict=True)]
        pair_cpu = [sum(p) / sum(b) for b, p in zip(cpus["baseline"][1:], cpus["profiled"][1:], strict=True)]
        prof = summaries["profiled"] or {}
        windows = [s for s in prof.get("profiled_steps", []) if s in by_step["baseline"]]
        print(f"baseline (profile off): {med['baseline']['wall'] * 1e3:.2f} ms/step wall, "
              f"{med['baseline']['cpu'] * 1e3:.2f} ms CPU; profiled trainer: {med['profiled']['wall'] * 1e3:.2f} / "
              f"{med['profiled']['cpu'] * 1e3:.2f}; profiled steps {prof.get('profiled_steps')}")
        print(json.dumps({
            "benchmark": "profile_overhead_trainer", "world_size": dist.get_world_size(), "steps_per_block": steps,
            "blocks": blocks, "batch_per_rank": batch, "img_size": img,
            "profiled_steps": prof.get("profiled_steps"), "measured_over_theory": prof.get("measured_over_theory"),
            "baseline_wall_ms_per_step": med["baseline"]["wall"] * 1e3,
            "profiled_wall_ms_per_step": med["profiled"]["wall"] * 1e3,
            "wall_ratio": med["profiled"]["wall"] / med["baseline"]["wall"],
            "median_block_wall_ratio": statistics.median(pair_wall),
            "baseline_cpu_ms_per_step": med["baseline"]["cpu"] * 1e3,
            "profiled_cpu_ms_per_step": med["profiled"]["cpu"] * 1e3,
            "cpu_ratio": med["profiled"]["cpu"] / med["baseline"]["cpu"],
            "median_block_cpu_ratio": statistics.median(pair_cpu),
            # all counted steps summed: includes the profiled windows' own cost at their 5 % duty cycle
            "total_wall_ratio": sum(map(sum, walls["profiled"][1:])) / sum(map(sum, walls["baseline"][1:])),
            "total_cpu_ratio": sum(map(sum, cpus["profiled"][1:])) / sum(map(sum, cpus["baseline"][1:])),
            "block_wall_ratios": pair_wall, "block_cpu_ratios": pair_cpu,
            # the profiled steps alone: their CPU against the same steps of the baseline trainer
            "window_steps": windows, "window_cpu_ms": {k: [round(by_step[k][s] * 1e3, 1) for s in windows]
                                                       for k in trainers},
            "window_cpu_ratio": sum(by_step["profiled"][s] for s in windows)
            / sum(by_step["baseline"][s] for s in windows) if windows else None}),
            flush=True)
    for tr in trainers.values():
        tr.engine.model = tr.engine.module = tr.engine.optimizer = None
    trainers["baseline"].engine.close()


def trainer_main(argv: list[str]) -> None:
    """Parent of the real-trainer mode: synth shards, then torchrun on this file's trainer-worker."""
    import argparse
    import os
    import subprocess
    from pathlib import Path

    p = argparse.ArgumentParser(prog="profile_overhead.py trainer")
    p.add_argument("--steps", type=int, default=25, help="steps per block")
    p.add_argument("--blocks", type=int, default=8, help="timed blocks per trainer (8 x 25 steps: windows 10-14 and 110-114, 5%% of steps)")
    p.add_argument("--batch", type=int, default=32, help="images per rank")
    p.add_argument("--img", type=int, default=32)
    args = p.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        subprocess.run([sys.executable, "-m", "mycodist", "synth", "--out", str(shards), "--quiet",
                        "synth.species=4", "synth.per_species=30", "synth.size=48"], check=True, cwd=repo)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "trainer-worker", str(shards), str(Path(tmp) / "run"), str(args.steps), str(args.blocks),
               str(args.batch), str(args.img)]
        out = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stdout[-3000:] + out.stderr[-6000:])
            sys.exit(out.returncode)
        lines = [line for line in out.stdout.splitlines() if line.startswith(("baseline", "{"))]
        print("\n".join(lines[-2:]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "trainer":
        trainer_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "trainer-worker":
        torch.set_num_threads(1)
        shards, out, steps, blocks, batch, img = sys.argv[2:8]
        trainer_worker(shards, out, int(steps), int(blocks), int(batch), int(img))
        return
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
