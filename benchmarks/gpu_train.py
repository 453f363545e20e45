"""Training throughput and MFU of our step on one GPU: ViT-B/16, bf16, 224 px, in-memory batches (so
the figure is the model step, not JPEG decoding), through the same Trainer loop as real runs.

    python benchmarks/gpu_train.py [--model vit_base_patch16 --batch 256 --steps 40 --peak-tflops 989]

MFU = (3 × forward FLOPs per image × images/s) / peak dense bf16 FLOP/s of the device (H100/H200 SXM:
989 TFLOP/s). Last line: JSON with images/s, step ms, achieved TFLOP/s and MFU, plus the same for a
bare loop (plain module, AdamW, autocast) in the same run, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--attention", default="auto")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak dense bf16 TFLOP/s")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the validation script's dry run")
    p.add_argument("--compile", action="store_true", help="torch.compile both loops (ours: train.compile=true)")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F
    from train_overhead import MemoryLoader

    from mycodist.config import load_config
    from mycodist.models import build_model
    from mycodist.models.flops import model_stats
    from mycodist.train.trainer import Trainer

    cuda = args.device == "cuda"
    assert torch.cuda.is_available() or not cuda, "needs a CUDA device (or --device cpu)"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        subprocess.run([sys.executable, "-m", "mycodist", "synth", "--out", str(shards), "--quiet",
                        "synth.species=8", "synth.per_species=20", "synth.size=64"], check=True, cwd=REPO)
        cfg = load_config(None, [f"data.shards={shards}", f"model.name={args.model}", f"model.img_size={args.img}",
                                 f"model.attention={args.attention}", "train.batch_size=8",
                                 "train.precision=auto", f"train.output_dir={Path(tmp) / 'run'}", "train.export=false",
                                 f"train.compile={str(args.compile).lower()}",
                                 "train.resume=none", "data.workers=0", "train.ckpt_every=0", "train.max_steps=1",
                                 "train.log_every=10", "train.tb=false"])
        trainer = Trainer(cfg)  # the real loader needs a batch the tiny shards can fill; ours replace it
        dev = trainer.engine.device
        n_cls = trainer.num_classes
        batches = [(torch.randn(args.batch, 3, args.img, args.img, device=dev),
                    torch.randint(0, n_cls, (args.batch,), device=dev)) for _ in range(4)]
        trainer.train_loader = MemoryLoader(batches * ((args.steps + 10) // 4 + 1))
        trainer.steps_per_epoch = 10**9
        ours: list[float] = []

        def timed(step: int, phase: dict) -> None:
            sync()
            ours.append(time.perf_counter())

        trainer.step_hooks.append(timed)
        trainer.total_steps = 10  # warm-up (kernels, allocator)
        trainer.train_loop()
        ours.clear()
        trainer.total_steps = 10 + args.steps
        trainer.train_loop()
        ours_step = statistics.median(b - a for a, b in zip(ours, ours[1:], strict=False))

        torch.manual_seed(0)
        bare = build_model(cfg.model, n_cls).to(dev)
        opt = torch.optim.AdamW(bare.parameters(), lr=1e-4)
        if args.compile:
            bare = torch.compile(bare)
        precision = trainer.engine.precision
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and precision == "bf16")
        times = []
        for i in range(10 + args.steps):
            x, y = batches[i % 4]
            with autocast:
                loss = F.cross_entropy(bare(x).float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter())
        bare_step = statistics.median(b - a for a, b in zip(times[10:], times[11:], strict=False))
        trainer.engine.close()

    gflops = model_stats(args.model, args.img, n_cls)["gflops"]
    out = {"benchmark": "gpu_train", "device": torch.cuda.get_device_name(0) if cuda else "cpu", "model": args.model,
           "img": args.img, "batch": args.batch, "precision": precision, "attention": args.attention,
           "compile": args.compile, "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    for name, step in (("ours", ours_step), ("bare", bare_step)):
        ips = args.batch / step
        tflops = 3 * gflops * ips / 1e3
        out.update({f"{name}_step_ms": round(step * 1e3, 2), f"{name}_images_per_s": round(ips, 1),
                    f"{name}_tflops": round(tflops, 1), f"{name}_mfu": round(tflops / args.peak_tflops, 4)})
    out["ratio"] = round(ours_step / bare_step, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
