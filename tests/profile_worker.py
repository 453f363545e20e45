"""One rank of the profiler's multi-process tests (run under torchrun by tests/test_profile_dist.py).

`python profile_worker.py ddp OUT`: DDP on a small ViT with and without the profiler, a timing check, and
FSDP2; `python profile_worker.py zero OUT`: DeepSpeed ZeRO-1, 2 and 3. Rank 0 writes OUT/result-<mode>.json.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mycodist.models import create_model
from mycodist.profile import Profiler

STEPS = 7
WINDOW = {"enabled": True, "start": 2, "every": 3, "steps": 2, "tensorboard": True, "plots": True}  # 2,3,5,6


def small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16", num_classes=4, img_size=32, depth=2, embed_dim=96, num_heads=3)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def trainable(model: torch.nn.Module) -> list[int]:
    return [p.numel() for p in model.parameters() if p.requires_grad]


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_ddp(out: Path, profile: bool) -> tuple[str, dict | None, dict]:
    model = small_vit()
    numels = trainable(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    prof = Profiler(WINDOW if profile else {"enabled": False}, out / "ddp", dist.get_rank(), dist.get_world_size(),
                    engine="ddp", param_numels=numels)
    prof.attach_ddp(ddp)
    installed = {}
    for step, (x, y) in enumerate(batches(STEPS)):
        with prof.step(step):
            installed[step] = hasattr(dist.all_reduce, "__mycodist_original__")
            with prof.phase("forward"):
                loss = F.cross_entropy(ddp(x), y)
            with prof.phase("backward"):
                loss.backward()
            with prof.phase("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        installed[f"after{step}"] = hasattr(dist.all_reduce, "__mycodist_original__")
    summary = prof.close()
    return digest(model), summary, installed


def timing_check() -> list[dict]:
    """The same collective timed by the profiler and, independently, around the call from outside."""
    prof = Profiler({"enabled": True, "start": 0, "every": 1, "steps": 1, "tensorboard": False, "plots": False},
                    None, dist.get_rank(), dist.get_world_size())
    x = torch.ones(2 ** 20)  # 4 MiB
    out = []
    for step in range(6):
        async_op = step % 2 == 1
        dist.barrier()
        with prof.step(step):
            t0 = time.perf_counter()
            work = dist.all_reduce(x, async_op=async_op)
            if async_op:
                work.wait()
            t1 = time.perf_counter()
        rec = prof.profiles[-1].records
        out.append({"async": async_op, "independent_s": t1 - t0, "profiler_s": rec[0].duration_s,
                    "n": len(rec), "busbw": rec[0].busbw, "algbw": rec[0].algbw})
    prof.close()
    return out


def train_fsdp(out: Path) -> dict | None:
    from torch.distributed.fsdp import fully_shard

    model = small_vit()
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    in_blocks = {id(p) for p in model.blocks.parameters()}
    n = dist.get_world_size()
    root = sum(-(-p.shape[0] // n) * n * (p.numel() // p.shape[0])  # root params, dim 0 padded like FSDP2
               for p in model.parameters() if id(p) not in in_blocks)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prof = Profiler(WINDOW, out / "fsdp", dist.get_rank(), dist.get_world_size(), engine="fsdp",
                    param_numels=shapes, resident_numel=root)
    for step, (x, y) in enumerate(batches(STEPS)):
        with prof.step(step):
            with prof.phase("forward"):
                loss = F.cross_entropy(model(x), y)
            with prof.phase("backward"):
                loss.backward()
            with prof.phase("optimizer"):
                opt.step()
                opt.zero_grad()
    return prof.close()


def train_zero(out: Path, stage: int) -> dict | None:
    import deepspeed

    model = small_vit()
    numels = trainable(model)
    zero = {"stage": stage}
    if stage == 3:  # release parameters between forward and backward, partition all: the theory's case
        zero.update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "zero_optimization": zero}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    prof = Profiler(WINDOW, out / f"zero{stage}", dist.get_rank(), dist.get_world_size(), engine=f"zero{stage}",
                    param_numels=numels, persistence_threshold=0)
    for step, (x, y) in enumerate(batches(STEPS)):
        with prof.step(step):
            with prof.phase("forward"):
                loss = F.cross_entropy(engine(x), y)
            with prof.phase("backward"):
                engine.backward(loss)
            with prof.phase("optimizer"):
                engine.step()
    summary = prof.close()
    del engine
    gc.collect()
    return summary


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result: dict = {"world_size": dist.get_world_size()}
    if mode == "ddp":
        plain, _, _ = train_ddp(out, profile=False)
        profiled, summary, installed = train_ddp(out, profile=True)
        digests: list = [None] * dist.get_world_size()
        dist.all_gather_object(digests, profiled)
        result.update(plain=plain, profiled=profiled, digests=digests, ddp=summary, installed=installed,
                      timing=timing_check(), fsdp=train_fsdp(out))
    else:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None  # not needed; slow
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        for stage in (1, 2, 3):
            result[f"zero{stage}"] = train_zero(out, stage)
    if dist.get_rank() == 0:
        (out / f"result-{mode}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
