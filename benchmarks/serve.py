"""Serving throughput and latency per runtime: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8,
each against its own compute bound, same run, same machine.

Starts one `mycodist serve` process per mode on one export of the chosen architecture (random weights:
speed does not depend on them) and drives them from this process with N concurrent clients, each sending
a real 640x480 JPEG back to back. The servers are up at the same time and driven in alternating rounds,
so a change in background load hits all alike; throughput is the median over rounds. Baseline: the
PyTorch eager server (serve.runtime=torch). Compute bound: offline batched forward passes (batch =
serve.max_batch, preprocessed tensors, same runtime, same thread count) in this process, sampled in every
round right after that runtime's server was driven, so both see the same background load. Verdict
agreement and top-1 drop of int8 need a trained model: pass `--agreement-export` an export made with
`mycodist export RUN_DIR --onnx` (e.g. the demo's); without it they are null.

    .venv/bin/python benchmarks/serve.py                      # ViT-S/16, 224 px, 8 clients
    .venv/bin/python benchmarks/serve.py --agreement-export demo/run/export --int8 dynamic

Last line: JSON. Per mode p50/p99 latency (ms), requests/s, server CPU ms per request, offline img/s and
`served_vs_offline` (also in CPU time: offline CPU per image / server CPU per request); `onnx_ratio` = ONNX fp32 / torch req/s, `int8_ratio` = int8 / torch req/s (and the
same ratios of CPU per request, which hold even when other jobs share the cores and wall figures do not).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from mycodist.catalog import Species, save_class_indices, save_species
from mycodist.config import load_config, save_config
from mycodist.export import onnx as onnx_export
from mycodist.models import create_model
from mycodist.serve.inference import load_export
from mycodist.serve.onnx_runtime import build_predictor, int8_agreement, ort_session
from mycodist.serve.preprocess import EvalTransform, decode_image
from mycodist.verdict import SafetyRules

MODES = {  # name → serve overrides
    "torch": ["serve.runtime=torch"],
    "onnx_fp32": ["serve.runtime=onnxruntime", "serve.precision=fp32"],
    # random weights: the int8 agreement of this export means nothing, it is measured on --agreement-export
    "onnx_int8": ["serve.runtime=onnxruntime", "serve.precision=int8", "serve.int8_min_agreement=0"],
}


def make_export(folder: Path, model: str, img_size: int, classes: int) -> tuple[Path, torch.nn.Module]:
    cfg = load_config(None, [f"model.name={model}", f"model.img_size={img_size}"])
    net = create_model(model, classes, img_size=img_size).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    save_config(cfg, folder)
    labels = [f"species_{i:03d}" for i in range(classes)]
    save_class_indices(folder / "class_indices.json", labels)
    save_species(folder / "species.json", [Species(lab, lab, lab, edibility="edible") for lab in labels])
    # a calibrated export (serve refuses one without OOD statistics); the rule never fires: speed is measured
    (folder / "calibration.json").write_text(json.dumps({"temperature": 1.0, "ood": {"score": "max_logit", "threshold": -1e9}}))
    return folder, net


def photo(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((480, 640, 3)) * 60 + np.linspace(60, 190, 640)[None, :, None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def start_server(export: Path, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mycodist", "serve", "--model", str(export), "--port", "0", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"open (http://\S+/) in a browser", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError(f"server exited with {proc.wait()}: {''.join(lines[-5:])}")


async def drive(url: str, data: bytes, clients: int, requests: int) -> tuple[list[float], float]:
    """`clients` concurrent clients, `requests` in all; returns per-request latencies (s) and wall time."""
    async def one(session: aiohttp.ClientSession) -> float:
        form = aiohttp.FormData()
        form.add_field("image", data, filename="p.jpg", content_type="image/jpeg")
        t0 = time.perf_counter()
        async with session.post(url + "api/v1/predict", data=form) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")
        return time.perf_counter() - t0

    async def client(session: aiohttp.ClientSession, n: int) -> list[float]:
        return [await one(session) for _ in range(n)]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        per = max(1, requests // clients)
        t0 = time.perf_counter()
        lat = [x for res in await asyncio.gather(*(client(session, per) for _ in range(clients))) for x in res]
        return lat, time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): robust to other load on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def health(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(url + "healthz") as r:
        return await r.json()


class Offline:
    """The compute bound of one runtime: back-to-back batched forward passes of preprocessed images in this
    process, sampled in every round right after that runtime's server was driven (same background load).
    They run in one worker thread, as the server's model thread runs them: on a crowded machine PyTorch's
    OpenMP pool called from the main thread measured many times slower than from a worker thread."""

    def __init__(self, run_batch, batch: torch.Tensor) -> None:
        self.run_batch, self.batch = run_batch, batch
        self.rates: list[float] = []
        self.cpu = 0.0
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offline")
        self.thread.submit(run_batch, batch).result()  # warm-up

    def _loop(self, repeats: int) -> list[float]:
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.run_batch(self.batch)
            rates.append(len(self.batch) / (time.perf_counter() - t0))
        return rates

    def sample(self, repeats: int) -> None:
        c0 = own_cpu()
        self.rates += self.thread.submit(self._loop, repeats).result()
        self.cpu += own_cpu() - c0

    def summary(self) -> dict:
        return {"img_s": round(float(np.median(self.rates)), 2), "img_s_samples": [round(r, 2) for r in self.rates],
                "cpu_ms_per_img": round(1000 * self.cpu / (len(self.rates) * len(self.batch)), 1)}


def summary(lat: list[float], rps: list[float], cpu: float, served: dict) -> dict:
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "rps": round(float(np.median(rps)), 2),
            "rps_rounds": [round(x, 2) for x in rps], "mean_batch": round(served["queue"]["mean_batch"], 2),
            "server_cpu_ms_per_request": round(1000 * cpu / max(1, len(lat)), 1),
            "model": served["model"]}


def agreement(export_dir: str) -> dict:
    """int8 vs fp32 verdicts on the export's validation photos under the default serve settings: the rate the
    export recorded (or serve's start-up recount for an export made before it recorded one)."""
    cfg = load_config(None, ["serve.runtime=onnxruntime", "serve.precision=fp32"])
    ex = load_export(export_dir)
    pred = build_predictor(ex, export_dir, SafetyRules.from_config(cfg.serve), cfg.serve)
    meta = json.loads((Path(export_dir) / onnx_export.ONNX_META).read_text())
    out = int8_agreement(pred, Path(export_dir), meta)
    return {"export": str(export_dir), "model": ex.info["name"], "img_size": ex.info["img_size"],
            "int8_method": meta["int8"]["method"], "fp32_max_abs_diff": meta["fp32"]["max_abs_diff_logits"],
            "top1_fp32": meta["fp32"]["top1"], "top1_int8": meta["int8"]["top1"], **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=24)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=96, help="measured requests per mode")
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over the modes")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="intra-op threads of every server and of the offline runs (serve.torch_threads)")
    p.add_argument("--int8", choices=["dynamic", "static"], default="dynamic", help="quantisation served")
    p.add_argument("--offline-repeats", type=int, default=2, help="offline batches per mode per round")
    p.add_argument("--agreement-export", nargs="*", default=[],
                   help="exports made with --onnx of a trained model; the first with the served --int8 "
                        "method gives int8_verdict_agreement and int8_top1_drop")
    args = p.parse_args()
    data = photo()
    load_before = os.getloadavg()[0]
    agree = [agreement(d) for d in args.agreement_export]
    with tempfile.TemporaryDirectory() as tmp:
        export, net = make_export(Path(tmp), args.model, args.img_size, args.classes)
        tf = EvalTransform.from_config(load_config(None, [f"model.img_size={args.img_size}"]))
        batch = torch.stack([tf(decode_image(photo(i), 64_000_000, tf)) for i in range(args.max_batch)])
        t0 = time.perf_counter()
        onnx_export.write_onnx(export, net, torch.cat([batch, batch.flip(-1)]), int8=args.int8,
                               batch=args.max_batch)
        onnx_build_s = time.perf_counter() - t0
        # the offline runners exist before the servers start: ONNX Runtime sessions as the server builds them
        torch.set_num_threads(args.threads)

        def torch_batch(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return net(x)

        bound = {"torch": Offline(torch_batch, batch)}
        other = "static" if args.int8 == "dynamic" else "dynamic"
        alt = export / f"model.int8.{other}.onnx"
        onnx_export.quantize(export / onnx_export.ONNX_FILE, alt, other, torch.cat([batch, batch.flip(-1)]),
                             args.max_batch)
        for mode, path in (("onnx_fp32", export / onnx_export.ONNX_FILE), ("onnx_int8", export / onnx_export.INT8_FILE),
                           (f"onnx_int8_{other}", alt)):
            sess = ort_session(path, args.threads)
            bound[mode] = Offline(lambda x, s=sess: s.run(None, {"images": x.numpy()}), batch)
        common = ["serve.ood=false", f"serve.max_wait_ms={args.max_wait_ms}", f"serve.max_batch={args.max_batch}",
                  f"serve.torch_threads={args.threads}"]
        servers = {mode: start_server(export, [*common, *extra]) for mode, extra in MODES.items()}
        try:
            lat: dict[str, list[float]] = {m: [] for m in servers}
            rps: dict[str, list[float]] = {m: [] for m in servers}
            cpu = dict.fromkeys(servers, 0.0)
            client_cpu, walls = dict.fromkeys(servers, 0.0), dict.fromkeys(servers, 0.0)  # the load generator's share
            for _, url in servers.values():
                asyncio.run(drive(url, data, args.clients, args.warmup))
            for _ in range(args.rounds):
                for mode, (proc, url) in servers.items():
                    c0, own0 = cpu_seconds(proc.pid), own_cpu()
                    got, wall = asyncio.run(drive(url, data, args.clients, args.requests // args.rounds))
                    cpu[mode] += cpu_seconds(proc.pid) - c0
                    client_cpu[mode] += own_cpu() - own0
                    walls[mode] += wall
                    lat[mode] += got
                    rps[mode].append(len(got) / wall)
                    bound[mode].sample(args.offline_repeats)
                bound[f"onnx_int8_{other}"].sample(args.offline_repeats)
            served = {mode: asyncio.run(health(url)) for mode, (_, url) in servers.items()}
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                proc.wait(60)
    modes = {m: {**summary(lat[m], rps[m], cpu[m], served[m]), "offline": bound[m].summary()} for m in servers}
    cores = len(os.sched_getaffinity(0))
    for name, m in modes.items():
        n = max(1, m["requests"])
        # the clients run on the same cores: their CPU is what the wall ratio pays beyond the server's own
        m["client_cpu_ms_per_request"] = round(1000 * client_cpu[name] / n, 1)
        m["cores_busy_frac"] = round((cpu[name] + client_cpu[name]) / max(walls[name] * cores, 1e-9), 3)
    for m in modes.values():
        m["served_vs_offline"] = round(m["rps"] / m["offline"]["img_s"], 3)
        # the same comparison in CPU time, which other jobs on the machine do not distort
        m["served_vs_offline_cpu"] = round(m["offline"]["cpu_ms_per_img"] / m["server_cpu_ms_per_request"], 3)
    chosen = next((a for a in agree if a["int8_method"] == args.int8), None)
    drop = None if chosen is None else chosen["top1_drop"]
    t, o, q = modes["torch"], modes["onnx_fp32"], modes["onnx_int8"]
    result = {"benchmark": "serve", "model": args.model, "img_size": args.img_size, "clients": args.clients,
              "threads": args.threads, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
              "int8_method": args.int8, "onnx_build_s": round(onnx_build_s, 1), "modes": modes,
              "offline_int8_other_method": {"method": other, **bound[f"onnx_int8_{other}"].summary()},
              "onnx_ratio": round(o["rps"] / t["rps"], 3), "int8_ratio": round(q["rps"] / t["rps"], 3),
              "onnx_cpu_ratio": round(t["server_cpu_ms_per_request"] / o["server_cpu_ms_per_request"], 3),
              "int8_cpu_ratio": round(t["server_cpu_ms_per_request"] / q["server_cpu_ms_per_request"], 3),
              "served_vs_offline": {m: v["served_vs_offline"] for m, v in modes.items()},
              "served_vs_offline_cpu": {m: v["served_vs_offline_cpu"] for m, v in modes.items()},
              "int8_verdict_agreement": None if chosen is None else round(chosen["verdict_agreement"], 4),
              "int8_top1_drop": None if drop is None else round(drop, 4),
              "agreement": agree,
              "goals": {"onnx_ratio": 1.3, "int8_ratio": 2.0, "int8_verdict_agreement": 0.99,
                        "int8_top1_drop": 0.005, "served_vs_offline": 0.9},
              "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2)}
    for name, m in modes.items():
        print(f"{name}: p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms, {m['rps']} req/s, offline {m['offline']['img_s']} "
              f"img/s (served/offline {m['served_vs_offline']}), mean batch {m['mean_batch']}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
