"""One prepared check of the GPU path on one GPU (docs/training.md, "GPU checklist"; docs/performance.md).

    bash benchmarks/gpu_validate.sh             # on the GPU machine: <= 8 minutes, <= 8 files under $OUT
    bash benchmarks/gpu_validate.sh --dry-run   # the same stages on the CPU at toy sizes (the test suite runs it)

Stages, each writing OUT/<stage>.json and appending its output to OUT/validate.log:
  env        torch / CUDA / NCCL versions, flash-attn, deepspeed, timm, torchvision importable; bf16 matmul peak
  nccl       a one-rank NCCL group through torchrun: the engine's collectives on device tensors, and proof that
             the group rejects a CPU tensor (why the helpers issue collectives at world size 1 too)
  attention  every backend in bf16 (SDPA kernels, flash-attn, compiled flex dense/local/block-sparse) against
             fp32 math, outputs and gradients; throughput at N = 197, 1024, 4096 against the matmul peak
  train      ViT-B/16 bf16 224 px under accelerate, DeepSpeed ZeRO-3 and torchrun-DDP (compiled), each
             train → checkpoint → resume → export; img/s, MFU, data-wait share, peak memory; ours vs bare loop
  timm       the timm parity tests (they skip on CPU machines, which cannot import torchvision beside torch)
  decode     torchvision's GPU JPEG decode rate beside the shipped CPU loader's, to size the data path for 8 GPUs
The last line of stdout (and OUT/summary.json) is one JSON object: every stage's status and headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # benchmarks/attention.py would re-exec to set it
STAGES = ("env", "nccl", "attention", "train", "timm", "decode")


class Run:
    """The output folder, the log, and the toy-or-real sizes."""

    def __init__(self, out: Path, dry: bool) -> None:
        self.out, self.dry = out, dry
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "validate.log", "a", buffering=1)  # noqa: SIM115
        self.device = "cpu" if dry else "cuda"
        self.peak_tflops: float | None = None
        self.results: dict[str, dict] = {}

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        self.log.write(msg + "\n")

    def sh(self, argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        self.say("$ " + " ".join(argv))
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.log.write(proc.stdout[-20000:] + proc.stderr[-20000:])
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-1500:] or proc.stdout[-1500:]}")
        return proc

    def save(self, stage: str, result: dict) -> None:
        self.results[stage] = result
        tmp = self.out / f".{stage}.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(self.out / f"{stage}.json")


# --- env -----------------------------------------------------------------------------------------------------
def stage_env(run: Run) -> dict:
    import torch
    from attention import matmul_peak_tflops

    def importable(name: str) -> str | None:
        try:
            mod = __import__(name)
            return getattr(mod, "__version__", "yes")
        except Exception as e:  # noqa: BLE001 - record why, go on
            return f"no ({type(e).__name__})"

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
            **{name: importable(name) for name in ("flash_attn", "deepspeed", "accelerate", "timm", "torchvision",
                                                   "omegaconf", "webdataset")}}
    dtype = torch.float32 if run.dry else torch.bfloat16
    run.peak_tflops = matmul_peak_tflops(run.device, dtype, size=512 if run.dry else 8192, repeats=3 if run.dry else 20)
    info["matmul_peak_tflops"] = round(run.peak_tflops, 2)
    info["matmul_dtype"] = str(dtype)
    return info


# --- nccl: one-rank group, the engine's own collectives --------------------------------------------------------
def nccl_probe() -> None:
    """Runs under torchrun --nproc_per_node 1: the real TorchDDPEngine, its helpers, and the raw group."""
    import torch
    import torch.distributed as dist

    from mycodist.config import load_config
    from mycodist.train.engines import TorchDDPEngine

    e = TorchDDPEngine(load_config(None, ["train.engine=torchrun-ddp"]))
    out = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "device": str(e.device)}
    s = e.all_reduce_sum(torch.tensor([2.0, 1.0], dtype=torch.float64, device=e.device))
    out["all_reduce_on_device"] = s.tolist()
    out["all_gather_object"] = e.all_gather_object({"rank": e.rank})
    e.barrier()
    try:
        e.all_reduce_sum(torch.zeros(2, device="cpu"))
        out["helper_rejects_cpu_tensor"] = e.device.type == "cpu"  # on CPU a CPU tensor is right
    except RuntimeError as err:
        out["helper_rejects_cpu_tensor"] = "needs tensors on" in str(err)
    if e.device.type == "cuda":  # what NCCL itself does with a CPU tensor: the crash the helpers now prevent
        try:
            dist.all_reduce(torch.zeros(2))
            out["nccl_rejects_cpu_tensor"] = False
        except Exception as err:  # noqa: BLE001
            out["nccl_rejects_cpu_tensor"] = True
            out["nccl_error"] = str(err).splitlines()[0][:200]
    e.close()
    print("NCCL_PROBE " + json.dumps(out), flush=True)


def stage_nccl(run: Run) -> dict:
    proc = run.sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   str(Path(__file__).resolve()), "--nccl-probe"], timeout=120)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("NCCL_PROBE "))
    res = json.loads(line[len("NCCL_PROBE "):])
    assert res["world_size"] == 1 and res["all_reduce_on_device"] == [2.0, 1.0], res
    assert res["helper_rejects_cpu_tensor"], res
    return res


# --- attention -----------------------------------------------------------------------------------------------
def stage_attention(run: Run) -> dict:
    import torch
    from attention import attention_flops, make_backends, measure_interleaved

    from mycodist.models.attention import flex_attention_any_device, math_attention
    from mycodist.models.masks import MaskSpec, TokenMask

    dev = run.device
    low = torch.float32 if run.dry else torch.bfloat16
    b, h, d = (2, 2, 16) if run.dry else (8, 12, 64)
    res: dict = {"dtype": str(low), "accuracy": {}, "throughput": {}}
    # accuracy: low precision against fp32 math, outputs and gradients, at a ViT token count
    n = 65 if run.dry else 197
    side = round((n - 1) ** 0.5)
    g = torch.Generator(device="cpu").manual_seed(0)
    q32, k32, v32 = (torch.randn(b, h, n, d, generator=g).to(dev) for _ in range(3))
    masks = {"dense": None, "local": TokenMask(MaskSpec("local", window=3), 1, (side, side)),
             "block_sparse": TokenMask(MaskSpec("block_sparse", density=0.5, block=128), 1, (side, side))}

    def grads(fn, q, k, v):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fn(q, k, v)
        out.float().square().sum().backward()
        return out.float(), [t.grad.float() for t in (q, k, v)]

    cands = {name: fn for name, fn in make_backends(dev, n, 0.5)[0].items() if not name.startswith("flex")}
    for kind, mask in masks.items():
        dense = mask.dense(dev) if mask is not None else None
        ref_out, ref_grads = grads(lambda q, k, v, dm=dense: math_attention(q, k, v, attn_mask=dm), q32, k32, v32)
        cases = {f"flex_{kind}": (lambda q, k, v, m=mask: flex_attention_any_device(q, k, v, m, compiled=not run.dry))}
        if kind == "dense":
            cases.update(cands)
        for name, fn in cases.items():
            try:
                out, gs = grads(fn, *(t.to(low) for t in (q32, k32, v32)))
            except Exception as e:  # noqa: BLE001 - a kernel that cannot run this dtype/shape: record why
                res["accuracy"][name] = f"cannot run: {type(e).__name__}: {str(e)[:120]}"
                continue
            res["accuracy"][name] = {"out_max_abs": (out - ref_out).abs().max().item(),
                                     "grad_max_abs": max((a - r).abs().max().item() for a, r in zip(gs, ref_grads, strict=True))}
    # throughput against the measured matmul peak
    for n in ((65, 257) if run.dry else (197, 1024, 4096)):
        fns, _ = make_backends(dev, n, 0.25)
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=low) for _ in range(3))
        if run.dry:
            fns = {k_: f for k_, f in fns.items() if not k_.startswith("flex")}  # inductor on CPU: minutes
        meas = measure_interleaved(fns, q, k, v, backward=True, repeats=2 if run.dry else 5, device=dev)
        row = {}
        for name, r in meas.items():
            if isinstance(r, Exception):
                row[name] = f"cannot run: {type(r).__name__}"
                continue
            attended = 0.25 if "block_sparse" in name else 1.0
            tflops = attention_flops(b, h, n, d, True, attended) / (r["ms"] / 1e3) / 1e12
            row[name] = {"fwd_bwd_ms": round(r["ms"], 3), "tflops": round(tflops, 2),
                         "of_matmul_peak": round(tflops / run.peak_tflops, 3) if run.peak_tflops else None}
        res["throughput"][str(n)] = row
    bad = {k_: v_ for k_, v_ in res["accuracy"].items()
           if isinstance(v_, dict) and v_["out_max_abs"] > (1e-4 if run.dry else 5e-2)}
    assert not bad, f"attention backends disagree with fp32 math: {bad}"
    return res


# --- train -----------------------------------------------------------------------------------------------------
def _log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def stage_train(run: Run) -> dict:
    from mycodist.models.flops import model_stats

    work = run.out.parent / (run.out.name + "-work") if run.dry else Path("/tmp/mycodist-validate")
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        size = ["synth.species=4", "synth.per_species=24", "synth.size=48"] if run.dry else \
               ["synth.species=8", "synth.per_species=400", "synth.size=256"]
        run.sh([sys.executable, "-m", "mycodist", "synth", "--out", str(shards), "--quiet", *size], timeout=300)
    model, img, batch = ("vit_tiny_patch16", 32, 8) if run.dry else ("vit_base_patch16", 224, 128)
    steps_a, steps_b = (4, 6) if run.dry else (40, 50)
    common = [f"data.shards={shards}", f"model.name={model}", f"model.img_size={img}", f"train.batch_size={batch}",
              "train.precision=auto", "train.log_every=2" if run.dry else "train.log_every=10", "train.epochs=1000",
              "train.tb=false", "train.lr_base_batch=0", "train.warmup_steps=2"]
    if run.dry:
        common += ["data.workers=0"]
    flops = model_stats(model, img, 8)["gflops"]
    res: dict = {"model": model, "img": img, "batch": batch, "gflops_per_image": flops, "runs": {}}
    def one(launcher: str, extra: list[str]) -> dict | str:
        out_dir = work / f"run-{launcher}"
        args = [sys.executable, "-m", "mycodist", "train", "--nproc", "1", "--launcher", launcher, *common, *extra,
                f"train.output_dir={out_dir}"]
        t0 = time.perf_counter()
        try:
            run.sh([*args, f"train.max_steps={steps_a}", "train.export=false", "train.resume=none"], timeout=240)
            run.sh([*args, f"train.max_steps={steps_b}", "train.export=true", "train.resume=auto"], timeout=240)
        except Exception as e:  # noqa: BLE001 - one engine failing must not hide the others' figures
            return f"failed: {str(e)[-600:]}"
        recs = _log_records(out_dir)
        train = [r for r in recs if r["kind"] == "train"]
        steady = train[1:] or train  # the first window holds warm-up and compilation
        ips = sorted(r["images_per_s"] for r in steady)[len(steady) // 2]
        mfu = 3 * flops * 1e9 * ips / (run.peak_tflops * 1e12) if run.peak_tflops else None
        return {
            "images_per_s": round(ips, 1), "mfu_vs_measured_peak": round(mfu, 4) if mfu else None,
            "data_wait_frac": round(sorted(r["data_wait_frac"] for r in steady)[len(steady) // 2], 4),
            "peak_mem_gb": round(max(r["mem_gb"] for r in train), 2),
            "resumed": any(r["step"] == steps_a + (2 if run.dry else 10) for r in train),
            "exported": (out_dir / "export" / "model.safetensors").is_file(),
            "final_top1": next((r["top1"] for r in reversed(recs) if r["kind"] in ("eval", "eval_ema")), None),
            "wall_s": round(time.perf_counter() - t0, 1)}

    launchers = {"accelerate": [], "deepspeed": ["train.zero_stage=3"],
                 "torchrun": ["train.engine=torchrun-ddp", "train.compile=true"]}
    # On the GPU one engine at a time (its figures are timings); the CPU dry run overlaps them, since most of
    # its time is single-threaded start-up (imports, launchers) and the test suite's budget is tight.
    with ThreadPoolExecutor(max_workers=len(launchers) if run.dry else 1) as pool:
        done = {name: pool.submit(one, name, extra) for name, extra in launchers.items()}
        res["runs"] = {name: fut.result() for name, fut in done.items()}
    # our loop against a bare loop on the same in-memory data
    argv = [sys.executable, str(REPO / "benchmarks" / "gpu_train.py"), "--model", model, "--img", str(img),
            "--batch", str(batch), "--steps", "6" if run.dry else "40", "--device", run.device]
    if run.peak_tflops:
        argv += ["--peak-tflops", str(run.peak_tflops)]
    try:
        res["ours_vs_bare"] = json.loads(run.sh(argv, timeout=240).stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        res["ours_vs_bare"] = f"failed: {str(e)[-600:]}"
    failed = [k for k, v in res["runs"].items() if not isinstance(v, dict) or not (v["resumed"] and v["exported"])]
    assert not failed, f"train → checkpoint → resume → export failed for {failed}: {res['runs']}"
    return res


# --- timm parity -------------------------------------------------------------------------------------------------
def stage_timm(run: Run) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "timm",
                           "tests/test_models_weights.py", "tests/test_models_vit.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    run.log.write(proc.stdout[-20000:] + proc.stderr[-5000:])
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"timm parity tests failed: {tail}")
    return {"summary": tail, **counts}


# --- decode -------------------------------------------------------------------------------------------------------
def stage_decode(run: Run) -> dict:
    import torch

    from mycodist.config import load_config
    from mycodist.data import make_train_loader
    from mycodist.data.decode import region_available, resample_available, simplejpeg_available
    from mycodist.data.loaders import resolve_workers

    work = run.out.parent / (run.out.name + "-work") if run.dry else Path("/tmp/mycodist-validate")
    shards = work / "shards"
    jpegs = []
    for tar in sorted(shards.glob("*.tar"))[:2]:
        with tarfile.open(tar) as tf:
            jpegs += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    res: dict = {"photos": len(jpegs)}
    img = 32 if run.dry else 224
    cfg = load_config(None, [f"data.shards={shards}", f"model.img_size={img}", "train.batch_size=64" if not run.dry
                             else "train.batch_size=8", f"data.workers={0 if run.dry else -1}"])
    loader = make_train_loader(cfg, 0, 1, pin_memory=torch.cuda.is_available())
    n, t0 = 0, time.perf_counter()
    for i, (x, _) in enumerate(loader):
        if i == 0:
            t0 = time.perf_counter()  # after the workers' start
            continue
        n += x.shape[0]
        if n >= (64 if run.dry else 2048):
            break
    res["cpu_loader_img_s"] = round(n / (time.perf_counter() - t0), 1)
    res["cpu_loader_decoding"] = {"region_decoder": region_available(), "simplejpeg": simplejpeg_available(),
                                  "c_resize": resample_available()}
    res["cpu_loader_workers"] = resolve_workers(int(cfg.data.workers))
    loader.close()
    try:
        import torchvision
        from torchvision.io import decode_jpeg

        if run.dry:
            raise RuntimeError("dry run: GPU decode not measured")
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs[:512]]
        decode_jpeg(data[:8], device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            decode_jpeg(data, device="cuda")
        torch.cuda.synchronize()
        res["gpu_decode_img_s"] = round(3 * len(data) / (time.perf_counter() - t0), 1)
        res["torchvision"] = torchvision.__version__
    except Exception as e:  # noqa: BLE001
        res["gpu_decode"] = f"not measured: {type(e).__name__}: {str(e)[:160]}"
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-validate-out"))
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at toy sizes")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.nccl_probe:
        nccl_probe()
        return 0
    run = Run(Path(args.out), args.dry_run)
    fns = {"env": stage_env, "nccl": stage_nccl, "attention": stage_attention, "train": stage_train,
           "timm": stage_timm, "decode": stage_decode}
    status: dict[str, str] = {}
    t_all = time.perf_counter()
    for stage in STAGES:
        if stage not in args.stages:
            continue
        t0 = time.perf_counter()
        run.say(f"== {stage}")
        try:
            result = fns[stage](run)
            status[stage] = "ok"
        except Exception as e:  # noqa: BLE001 - every stage reports, the summary says which failed
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            status[stage] = "failed"
        result["seconds"] = round(time.perf_counter() - t0, 1)
        run.save(stage, result)
        run.say(f"{stage}: {status[stage]} in {result['seconds']} s")
    r = run.results
    summary = {"benchmark": "gpu_validate", "dry_run": args.dry_run, "status": status,
               "device": r.get("env", {}).get("device"), "matmul_peak_tflops": r.get("env", {}).get("matmul_peak_tflops"),
               "train": {k: (v if isinstance(v, str) else {m: v.get(m) for m in ("images_per_s", "mfu_vs_measured_peak",
                                                                                "data_wait_frac", "peak_mem_gb")})
                         for k, v in r.get("train", {}).get("runs", {}).items()},
               "ours_over_bare": (r.get("train", {}).get("ours_vs_bare") or {}).get("ratio")
               if isinstance(r.get("train", {}).get("ours_vs_bare"), dict) else None,
               "seconds": round(time.perf_counter() - t_all, 1)}
    run.save("summary", summary)
    print(json.dumps(summary), flush=True)
    return 0 if all(v == "ok" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
