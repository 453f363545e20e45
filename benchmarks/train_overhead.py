"""Our training step vs a bare hand-written DDP loop: same model, same in-memory batches, same 2 ranks,
same run. Blocks of steps alternate between the two so machine noise hits both alike.

    .venv/bin/python benchmarks/train_overhead.py [--steps 20 --blocks 4 --batch 32 --img 32]

The parent starts `torchrun --nproc_per_node 2` on this file; ranks time each optimizer step (ours via
the trainer's step hooks: data wait + forward + backward + optimizer step, excluding evaluation and
checkpoints, which run between blocks). Last line: JSON with both step times and `ratio` = ours / bare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class MemoryLoader:
    """The TrainLoader interface over fixed tensors, so both loops see identical data at no cost."""

    def __init__(self, batches):
        self.batches = batches
        self.bad_samples: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from mycodist.config import load_config
    from mycodist.models import build_model
    from mycodist.train.trainer import Trainer

    overrides = [f"data.shards={args.shards}", f"model.img_size={args.img}", f"train.batch_size={args.batch}",
                 f"train.output_dir={args.out}", "train.export=false", "train.resume=none", "data.workers=0",
                 "train.ckpt_every=0", "train.keep_last=1", "train.warmup_steps=1", "train.max_steps=1"]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    e = trainer.engine
    g = torch.Generator().manual_seed(e.rank)
    n_cls = trainer.num_classes
    batches = [(torch.randn(args.batch, 3, args.img, args.img, generator=g),
                torch.randint(0, n_cls, (args.batch,), generator=g)) for _ in range(args.steps * args.blocks + 1)]
    trainer.train_loader = MemoryLoader(batches)
    trainer.steps_per_epoch = 10**9  # no epoch-end evaluation inside a timed block
    ours: list[float] = []
    trainer.step_hooks.append(lambda step, phase: ours.append(phase["total"]))

    torch.manual_seed(0)
    bare_model = build_model(cfg.model, n_cls)
    ddp = torch.nn.parallel.DistributedDataParallel(bare_model)
    opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-3, weight_decay=0.05)
    bare: list[float] = []

    def bare_block() -> None:
        for images, targets in batches[: args.steps]:
            t0 = time.perf_counter()
            loss = F.cross_entropy(ddp(images), targets, label_smoothing=0.1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bare_model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bare.append(time.perf_counter() - t0)

    bare_block()  # warm-up of both paths, not counted
    trainer.total_steps = trainer.step + args.steps
    trainer.train_loop()
    bare.clear()
    ours.clear()
    for _ in range(args.blocks):
        bare_block()
        trainer.total_steps = trainer.step + args.steps
        trainer.train_loop()
    e.close()
    if e.rank == 0:
        b, o = statistics.median(bare), statistics.median(ours)
        print(json.dumps({"benchmark": "train_overhead", "world_size": e.world_size, "engine": e.name,
                          "model": cfg.model.name, "img_size": args.img, "batch_per_rank": args.batch,
                          "steps_each": len(bare), "bare_ddp_step_ms": round(b * 1e3, 2),
                          "ours_step_ms": round(o * 1e3, 2), "bare_steps_per_s": round(1 / b, 2),
                          "ours_steps_per_s": round(1 / o, 2), "ratio": round(o / b, 4)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="images per rank")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        subprocess.run([sys.executable, "-m", "mycodist", "synth", "--out", str(shards), "--quiet",
                        "synth.species=4", "synth.per_species=30", "synth.size=48"], check=True, cwd=REPO)
        threads = max(1, (os.cpu_count() or 1) // args.nproc)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ACCELERATE_USE_CPU": "true"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               __file__, "--worker", f"--shards={shards}", f"--out={Path(tmp) / 'run'}", f"--steps={args.steps}",
               f"--blocks={args.blocks}", f"--batch={args.batch}", f"--img={args.img}"]
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stdout[-3000:] + out.stderr[-6000:])
            sys.exit(out.returncode)
        result = [line for line in out.stdout.splitlines() if line.startswith("{")][-1]
        print(result)


if __name__ == "__main__":
    main()
