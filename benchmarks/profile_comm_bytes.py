"""Comm bytes per step for ViT-Ti/S/B (24 classes, 224 px): measured on 2 gloo ranks (one profiled step
each) under DDP and, with `--zero`, DeepSpeed ZeRO-1/2/3, against the theory (the baseline); and the theory
extrapolated to 8 and 64 ranks (per-rank wire bytes: what each rank sends on a ring).

Run: OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 \
         benchmarks/profile_comm_bytes.py [--zero]
Last line: JSON with measured and theory bytes per model and engine, and the worst ratio.
"""

from __future__ import annotations

import importlib
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mycodist.models import create_model
from mycodist.profile import Profiler, theory_bytes_per_step

MODELS = ("vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16")


WINDOW = {"enabled": True, "start": 2, "every": 100, "steps": 1, "plots": False, "tensorboard": False}


def measure(name: str, engine: str) -> tuple[list[int], dict]:
    """One profiled step (the third: past DDP's bucket rebuild and ZeRO-3's tracing) of `engine`."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=24, img_size=224)
    numels = [p.numel() for p in model.parameters() if p.requires_grad]
    x, y = torch.randn(2, 3, 224, 224), torch.randint(0, 24, (2,))
    prof = Profiler(WINDOW, None, dist.get_rank(), dist.get_world_size(), engine, numels)
    if engine == "ddp":
        ddp = prof.attach_ddp(torch.nn.parallel.DistributedDataParallel(model))
        for step in range(3):
            with prof.step(step):
                with prof.phase("forward"):
                    loss = F.cross_entropy(ddp(x), y)
                with prof.phase("backward"):
                    loss.backward()
            ddp.zero_grad(set_to_none=True)
        return numels, prof.close()
    import deepspeed

    zero = {"stage": int(engine[-1])}
    if engine == "zero3":
        zero.update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    cfg = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9, "zero_optimization": zero,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    ds, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    for step in range(3):
        with prof.step(step):
            with prof.phase("forward"):
                loss = F.cross_entropy(ds(x), y)
            with prof.phase("backward"):
                ds.backward(loss)
            with prof.phase("optimizer"):
                ds.step()
    return numels, prof.close()


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    engines = ["ddp"]
    if "--zero" in sys.argv:
        engines += ["zero1", "zero2", "zero3"]
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None  # unused, slow
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    out = {"benchmark": "profile_comm_bytes", "world_size_measured": dist.get_world_size(), "models": {}}
    for name in MODELS:
        row = {"measured": {}}
        for engine in engines:
            numels, summary = measure(name, engine)
            m, t = summary["measured_bytes_per_step"]["total"], summary["theory_bytes_per_step"]["total"]
            row["measured"][engine] = {"measured_bytes": m, "theory_bytes": t, "ratio": m / t,
                                       "wire_bytes": summary["measured_wire_bytes_per_step"]["total"],
                                       "comm_s": summary["step_breakdown"]["mean"]["comm_s"],
                                       "step_s": summary["step_breakdown"]["mean"]["wall_s"]}
            if dist.get_rank() == 0:
                print(f"{name} {engine}: measured {m / 1e6:.2f} MB/step, theory {t / 1e6:.2f} MB (ratio {m / t:.4f}), "
                      f"comm {row['measured'][engine]['comm_s']:.2f} s of {row['measured'][engine]['step_s']:.2f} s",
                      flush=True)
        psi = sum(numels)
        row["params"] = psi
        row["theory_wire_MB_per_rank"] = {
            engine: {n: round(theory_bytes_per_step(engine, numels, n)["wire_total"] / 1e6, 2) for n in (2, 8, 64)}
            for engine in ("ddp", "zero2_paper", "zero1", "zero3")}
        out["models"][name] = row
        if dist.get_rank() == 0:
            print(f"{name}: {psi / 1e6:.2f} M params; theory wire MB/rank {row['theory_wire_MB_per_rank']}")
    if dist.get_rank() == 0:
        ratios = [e["ratio"] for r in out["models"].values() for e in r["measured"].values()]
        out["ratio"] = max(ratios, key=lambda v: abs(v - 1))  # the worst agreement
        print(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
