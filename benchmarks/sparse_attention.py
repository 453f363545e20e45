"""Block-sparse attention study: what FlexAttention's masks cost in accuracy, beside what they save.

The demo recipe (ViT-Tiny/8, lr 0.008 at 512, crops >= 50 %, same seed, same steps) is trained once per
attention mask, at a token count where sparsity matters (default 96 px / 8-px patches = 144 patches + class
token), and evaluated on the validation split. Variants: `dense` (the named baseline, in the same run),
`local` at two window sizes and `block_sparse` at two densities; by default the windows (5, 3) are chosen
so the local masks attend about the same share of pairs as the block-sparse ones (0.5, 0.25).

Per variant the table gives val top-1 / top-5 / macro-F1 / loss, the share of (query, key) pairs attended
(`TokenMask.density()`), the share of flex blocks computed (partial + full blocks of the BlockMask), attention FLOPs per
image (QKᵀ and P·V scaled by the attended share) and the whole forward's FLOPs, then the forward+backward
time (median wall and CPU time) and peak memory of one training step of the model with `flex` (compiled, the
kernel that skips empty blocks) and with `sdpa` (the same predicate as a dense boolean mask).

Training uses `model.attention=sdpa` for every variant: the mask predicate is the same for every backend
(tests/test_models_attention.py checks flex, sdpa and math agree to 1e-5), SDPA needs no compilation, and
the flex backward on CPU recomputes with SDPA anyway (docs/models.md), so accuracy does not depend on it.

    python benchmarks/sparse_attention.py --shards demo/shards [--steps 64] [--img-size 96]
    python benchmarks/sparse_attention.py --timing-only --device cuda --timing-batch 64    # GPU figures

Runs resume: a variant whose `OUT/<variant>/summary.json` already has `--steps` steps is not retrained, and
its cost row (`OUT/<variant>/cost-<device>.json`, same settings) is not re-measured, so `--only` can split the
variants over several invocations (e.g. two at once) and a last plain run assembles the table.
Last line: JSON with every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from attention import PeakMemory  # noqa: E402  (re-execs with glibc returning big blocks, for RSS peaks)

from mycodist.atomic import atomic_write_json  # noqa: E402
from mycodist.models import create_model  # noqa: E402
from mycodist.models.flops import vit_forward_flops  # noqa: E402
from mycodist.models.masks import MaskSpec  # noqa: E402

RECIPE = ("data.scale=[0.5,1.0]", "data.workers=1", "train.tb=false", "train.export=false",
          "model.attention=sdpa", "train.log_every=10")


def variants(windows: list[int], densities: list[float], block: int) -> dict[str, MaskSpec]:
    out = {"dense": MaskSpec("dense", block=block)}
    out.update({f"local_w{w}": MaskSpec("local", window=w, block=block) for w in windows})
    out.update({f"block_sparse_{d:g}": MaskSpec("block_sparse", density=d, block=block) for d in densities})
    return out


def mask_overrides(spec: MaskSpec) -> list[str]:
    return [f"model.flex_mask={spec.kind}", f"model.flex_window={spec.window}", f"model.flex_density={spec.density}",
            f"model.flex_block={spec.block}", f"model.flex_seed={spec.seed}"]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train(name: str, spec: MaskSpec, args: argparse.Namespace) -> dict:
    """One training run as `mycodist train` does it; returns its final eval and cost."""
    run = args.out / name
    summary = run / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("steps") == args.steps:
        print(f"{name}: reusing {summary}", flush=True)
        done = json.loads(summary.read_text())
        return {**done["final_eval"]["model"], "train_wall_s": done.get("study_wall_s"),
                "train_cpu_s": done.get("study_cpu_s")}
    cmd = [sys.executable, "-m", "mycodist", "train", "--nproc", str(args.nproc), f"data.shards={args.shards}",
           f"train.output_dir={run}", f"model.name={args.model}", f"model.img_size={args.img_size}",
           f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", f"train.lr={args.lr}",
           f"train.warmup_steps={args.warmup_steps}", f"seed={args.seed}", f"data.seed={args.seed}", *RECIPE,
           *mask_overrides(spec)]
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # train with normal malloc
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    print(f"{name}: training: {' '.join(cmd[3:])}", flush=True)
    c0, t0 = children_cpu(), time.perf_counter()
    with open(args.out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    if rc != 0:
        raise SystemExit(f"{name}: training failed with exit code {rc}; see {args.out / (name + '.log')}")
    done = json.loads(summary.read_text())
    done.update(study_wall_s=round(wall, 1), study_cpu_s=round(cpu, 1))
    atomic_write_json(summary, done)
    return {**done["final_eval"]["model"], "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1)}


def cached_cost(name: str, spec: MaskSpec, args: argparse.Namespace, num_classes: int) -> dict:
    """`cost`, reused from OUT/<variant>/cost-<device>.json when it was measured with the same settings."""
    path = args.out / name / f"cost-{args.device}.json"
    key = {"model": args.model, "img_size": args.img_size, "timing_batch": args.timing_batch,
           "repeats": args.repeats, "threads": torch.get_num_threads(), "spec": repr(spec)}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            print(f"{name}: reusing {path}", flush=True)
            return saved["row"]
    row = cost(spec, args, num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "row": row})
    return row


def mask_stats(spec: MaskSpec, args: argparse.Namespace, num_classes: int) -> dict:
    """What the mask keeps: pairs attended, flex blocks computed (partial + full, of all block pairs), FLOPs."""
    with torch.device("meta"):
        model = create_model(args.model, num_classes=num_classes, img_size=args.img_size, mask=spec)
    grid = (args.img_size // model.patch_embed.patch_size[0],) * 2
    tm = model.masks.get(model.num_prefix_tokens, grid)
    n, dim, depth = tm.seq_len, model.embed_dim, len(model.blocks)
    attended, blocks = tm.density(), 1.0
    if not tm.is_dense:
        bm = tm.block_mask("cpu")
        kept = bm.kv_num_blocks.sum() + (bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None else 0)
        blocks = float(kept) / (bm.kv_num_blocks.shape[-1] * bm.kv_indices.shape[-1])
    return {"tokens": n, "pairs_attended": round(attended, 4), "flex_blocks_computed": round(blocks, 4),
            "attn_gflops_per_image": round(depth * 4 * n * n * dim * attended / 1e9, 4),
            "fwd_gflops_per_image": round(vit_forward_flops(
                args.img_size, model.patch_embed.patch_size[0], dim, depth, model.blocks[0].mlp.fc1.out_features,
                num_classes, prefix=model.num_prefix_tokens, attended_fraction=attended) / 1e9, 4)}


def cost(spec: MaskSpec, args: argparse.Namespace, num_classes: int) -> dict:
    """Forward+backward time (median wall and CPU) and peak memory of one training step, flex and sdpa."""
    model = create_model(args.model, num_classes=num_classes, img_size=args.img_size, mask=spec)
    row: dict = {}
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.timing_batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (args.timing_batch,), generator=gen).to(device)
    for backend in ("flex", "sdpa"):
        for blk in model.blocks:
            blk.attn.backend = backend
        model.to(device).train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        step()  # warm-up (compiles flex)
        row[f"{backend}_first_s"] = round(time.perf_counter() - t0, 1)
        walls, cpus = [], []
        for _ in range(args.repeats):
            gc.collect()
            w, c = time.perf_counter(), time.process_time()
            step()
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        model.zero_grad(set_to_none=True)
        gc.collect()
        with PeakMemory(device.type) as mem:
            step()
        row.update({f"{backend}_fwdbwd_ms": round(statistics.median(walls) * 1e3, 1),
                    f"{backend}_fwdbwd_cpu_ms": round(statistics.median(cpus) * 1e3, 1),
                    f"{backend}_peak_mib": round(mem.mib, 1)})
    torch._dynamo.reset()  # a fresh compile cache per mask: dynamo recompiles only a few times per function
    return row


def markdown_table(rows: list[dict]) -> str:
    """The study's table as docs/models.md shows it (missing figures, e.g. accuracy with --timing-only, as –)."""

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f} %"

    def num(v, fmt="{:.3f}"):
        return "–" if v is None else fmt.format(v)

    head = ["mask", "val top-1", "val top-5", "macro-F1", "val loss", "pairs attended", "flex blocks computed",
            "attention GFLOPs / image (fwd)", "model GFLOPs / image (fwd)", "fwd+bwd flex ms (CPU ms)",
            "flex peak MiB", "fwd+bwd sdpa ms (CPU ms)", "sdpa peak MiB", "training CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], pct(r.get("top1")), pct(r.get("top5")), num(r.get("macro_f1")), num(r.get("loss")),
                 pct(r["pairs_attended"]), pct(r["flex_blocks_computed"]), num(r["attn_gflops_per_image"]),
                 num(r["fwd_gflops_per_image"]),
                 f"{r['flex_fwdbwd_ms']:.0f} ({r['flex_fwdbwd_cpu_ms']:.0f})", num(r["flex_peak_mib"], "{:.0f}"),
                 f"{r['sdpa_fwdbwd_ms']:.0f} ({r['sdpa_fwdbwd_cpu_ms']:.0f})", num(r["sdpa_peak_mib"], "{:.0f}"),
                 num(r.get("train_cpu_s"), "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=None, help="the demo shards (make demo, or its crawl step)")
    p.add_argument("--out", type=Path, default=Path("/tmp/mycodist-sparse-study"), help="run folders and logs")
    p.add_argument("--model", default="vit_tiny_patch8")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--steps", type=int, default=64, help="optimizer steps per variant (the demo: 248 at 48 px)")
    p.add_argument("--batch", type=int, default=32, help="per rank (the demo: 2 ranks x 32)")
    p.add_argument("--warmup-steps", type=int, default=-1, help="linear warmup (default: 10%% of --steps)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.008)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, nargs="+", default=[5, 3])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--block", type=int, default=16, help="flex block size in tokens (also the block-sparse grain)")
    p.add_argument("--timing-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads for the timing (0 = torch default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the timing runs")
    p.add_argument("--timing-only", action="store_true", help="skip training (e.g. on a GPU machine)")
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT", help="run these variants only")
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.timing_only and (args.shards is None or not (args.shards / "manifest.json").exists()):
        p.error(f"--shards {args.shards} has no manifest.json; create the demo shards first (make demo)")
    if args.img_size % 8 or args.steps < 1 or args.batch < 1 or args.block < 1 or args.repeats < 1:
        p.error("--img-size must be a multiple of the patch, --steps/--batch/--block/--repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args.shards = args.shards.resolve() if args.shards else None
    args.out = args.out.resolve()
    if args.warmup_steps < 0:
        args.warmup_steps = max(1, round(args.steps / 10))
    return args


def num_classes_of(shards: Path) -> int:
    return int(json.loads((shards / "manifest.json").read_text())["num_classes"])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    specs = variants(args.windows, args.densities, args.block)
    if args.only:
        unknown = sorted(set(args.only) - set(specs))
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {unknown}; choose from {list(specs)}")
        specs = {k: v for k, v in specs.items() if k in args.only}
    classes = num_classes_of(args.shards) if args.shards and (args.shards / "manifest.json").exists() else 24
    start, load0, cpu0 = time.perf_counter(), os.getloadavg()[0], time.process_time()
    rows = []
    for name, spec in specs.items():
        row = {"variant": name}
        if not args.timing_only:
            ev = train(name, spec, args)
            row.update({k: ev.get(k) for k in ("top1", "top5", "macro_f1", "loss", "samples", "train_wall_s",
                                              "train_cpu_s")})
        row.update(cached_cost(name, spec, args, classes))
        row.update(mask_stats(spec, args, classes))  # after: cost rows cached by older versions carried these
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["variant"] == "dense"), None)
    for r in rows:
        for b in ("flex", "sdpa"):
            if base is not None:
                r[f"{b}_cpu_time_vs_dense_flex"] = round(r[f"{b}_fwdbwd_cpu_ms"] / base["flex_fwdbwd_cpu_ms"], 3)
    print(markdown_table(rows))
    wall = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "sparse_attention", "baseline": "dense", "model": args.model, "img_size": args.img_size,
        "steps": args.steps, "warmup_steps": args.warmup_steps, "batch": args.batch, "nproc": args.nproc, "seed": args.seed, "block": args.block,
        "timing_batch": args.timing_batch, "device": args.device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "study_wall_s": round(wall, 1),
        "study_cpu_s": round(time.process_time() - cpu0 + sum(r.get("train_cpu_s") or 0 for r in rows), 1),
        "loadavg_1m_start": round(load0, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2), "rows": rows,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
