"""Per-rank model-state bytes under DeepSpeed ZeRO stages 0-3, measured on 2 CPU ranks, against the ZeRO
paper's formulas (mixed precision + Adam, Ψ parameters, N ranks: 16Ψ; 4Ψ+12Ψ/N; 2Ψ+14Ψ/N; 16Ψ/N),
then the formulas extrapolated to 8 and 64 ranks for ViT-B/L/H/g.

    .venv/bin/python benchmarks/zero_memory.py [--model vit_small_patch16 --img 32]

Measured = every distinct tensor storage reachable from the DeepSpeed engine and its optimizer during the
second bf16 step, after backward and before the optimizer step (parameters, gradients, fp32 master
weights, Adam moments), deduplicated by storage. Communication buckets are set to 1M elements (2 MB) so
they do not drown the figure; activations are not model state and are not counted. The baseline of the
formula table is `stage 0`; DeepSpeed's bf16 optimizer already partitions the fp32 master weights and
Adam moments at stage 0, so the measured stage 0 sits near the stage-1 formula, not at 16Ψ.
Last line: JSON with the measured and formula bytes per stage and the ratios.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET = 1_000_000
VIT_PARAMS = {"ViT-B/16": 86.6e6, "ViT-L/16": 304.3e6, "ViT-H/14": 632.0e6, "ViT-g/14": 1011.0e6}


def formula_bytes(stage: int, psi: float, n: int) -> float:
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]


def reachable_bytes(root: object, max_depth: int = 10) -> int:
    """Bytes of distinct tensor storages reachable from `root` through attributes, lists and dicts."""
    import torch

    seen_obj: set[int] = set()
    storages: dict[int, int] = {}

    def walk(obj: object, depth: int) -> None:
        if id(obj) in seen_obj or depth > max_depth:
            return
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            for t in (obj, getattr(obj, "ds_tensor", None), obj.grad if obj.is_leaf else None):
                if isinstance(t, torch.Tensor) and t.numel() > 0:
                    s = t.untyped_storage()
                    storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
            return
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                walk(p, depth + 1)
            for b in obj.buffers():
                walk(b, depth + 1)
            if not type(obj).__module__.startswith("deepspeed"):  # the engine is a Module holding the optimizer
                return
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            items = list(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
            items = list(vars(obj).values())
        else:
            return
        for v in items:
            walk(v, depth + 1)

    walk(root, 0)
    return sum(storages.values())


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.nn.functional as F

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # not needed on gloo
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    from mycodist.models import create_model

    results = {}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=10, img_size=args.img)
        psi = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
               # communication buckets at 1M elements, so the measurement is the model state, not bucket sizes
               "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET,
                                     "stage3_prefetch_bucket_size": BUCKET, "stage3_param_persistence_threshold": 0}, "bf16": {"enabled": True}, "steps_per_print": 1 << 30,
               "zero_force_ds_cpu_optimizer": False}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        for i in range(2):
            x = torch.randn(2, 3, args.img, args.img, dtype=torch.bfloat16)
            loss = F.cross_entropy(engine(x).float(), torch.randint(0, 10, (2,)))
            engine.backward(loss)
            if i == 1:  # optimizer states exist (one step done) and this step's gradients are still held
                measured = reachable_bytes(engine)
            engine.step()
        all_measured = [None] * world
        torch.distributed.all_gather_object(all_measured, measured)
        results[stage] = {"psi": psi, "measured_per_rank": all_measured,
                          "formula": formula_bytes(stage, psi, world)}
        engine.destroy()
        del engine, model, opt
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if rank == 0:
        print(json.dumps({"world_size": world, "model": args.model, "stages": results}), flush=True)


def table(result: dict) -> tuple[str, dict]:
    world = result["world_size"]
    lines = [f"Measured on {world} CPU ranks, {result['model']} (Ψ = {result['stages']['0']['psi'] / 1e6:.1f} M), bf16 + AdamW:",
             "", "| stage | measured per rank (MB) | formula (MB) | measured / formula |", "|---|---|---|---|"]
    summary = {}
    for stage in ("0", "1", "2", "3"):
        r = result["stages"][stage]
        m = max(r["measured_per_rank"])
        lines.append(f"| {stage} | {m / 1e6:.1f} | {r['formula'] / 1e6:.1f} | {m / r['formula']:.2f} |")
        summary[f"stage{stage}_measured_mb"] = round(m / 1e6, 2)
        summary[f"stage{stage}_formula_mb"] = round(r["formula"] / 1e6, 2)
        summary[f"stage{stage}_ratio"] = round(m / r["formula"], 3)
    lines += ["", "Formula extrapolation, model-state GB per rank (activations excluded):", "",
              "| model | Ψ | ranks | stage 0 | stage 1 | stage 2 | stage 3 |", "|---|---|---|---|---|---|---|"]
    for name, psi in VIT_PARAMS.items():
        for n in (8, 64):
            cells = " | ".join(f"{formula_bytes(s, psi, n) / 1e9:.2f}" for s in range(4))
            lines.append(f"| {name} | {psi / 1e6:.0f} M | {n} | {cells} |")
    return "\n".join(lines), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--worker", f"--model={args.model}", f"--img={args.img}"]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-6000:])
        sys.exit(out.returncode)
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    text, summary = table(result)
    print(text)
    print(json.dumps({"benchmark": "zero_memory", "world_size": result["world_size"], "model": args.model, **summary}))


if __name__ == "__main__":
    main()
