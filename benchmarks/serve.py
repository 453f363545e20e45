"""Serving latency and throughput: micro-batching on vs off (batch of 1), same run, same machine.

Starts `mycodist serve` as its own process on an export of the chosen architecture (random weights:
speed does not depend on them) and drives it from this process with N concurrent clients, each
sending a real 640x480 JPEG back to back. Baseline: a second server with serve.max_batch=1, up at
the same time; the two are driven in alternating rounds so background load hits both alike.

    .venv/bin/python benchmarks/serve.py                      # ViT-S/16, 224 px, 8 clients
    .venv/bin/python benchmarks/serve.py --model vit_tiny_patch16 --requests 80

Last line: JSON with p50/p99 latency (ms), requests/s and server CPU ms per request per mode; `ratio` =
batched / unbatched requests/s, `cpu_ratio` = unbatched / batched CPU per request (the efficiency gain,
which holds even when other jobs share the cores and wall-clock figures do not).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from mycodist.catalog import Species, save_class_indices, save_species
from mycodist.config import load_config, save_config
from mycodist.models import create_model


def make_export(folder: Path, model: str, img_size: int, classes: int) -> Path:
    cfg = load_config(None, [f"model.name={model}", f"model.img_size={img_size}"])
    net = create_model(model, classes, img_size=img_size)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    save_config(cfg, folder)
    labels = [f"species_{i:03d}" for i in range(classes)]
    save_class_indices(folder / "class_indices.json", labels)
    save_species(folder / "species.json", [Species(lab, lab, lab, edibility="edible") for lab in labels])
    (folder / "calibration.json").write_text(json.dumps({"temperature": 1.0}))
    return folder


def photo() -> bytes:
    rng = np.random.default_rng(0)
    arr = (rng.random((480, 640, 3)) * 60 + np.linspace(60, 190, 640)[None, :, None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def start_server(export: Path, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mycodist", "serve", "--model", str(export), "--port", "0", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = re.search(r"open (http://\S+/) in a browser", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError(f"server exited with {proc.wait()}")


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


async def mean_batch(url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "healthz") as r:
        return (await r.json())["queue"]["mean_batch"]


def summary(lat: list[float], rps: list[float], batch: float, cpu: float) -> dict:
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "rps": round(float(np.median(rps)), 2),
            "rps_rounds": [round(x, 2) for x in rps], "mean_batch": round(batch, 2),
            "server_cpu_ms_per_request": round(1000 * cpu / max(1, len(lat)), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=24)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=160, help="measured requests per mode")
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="alternating off/on rounds")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    args = p.parse_args()
    data = photo()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        export = make_export(Path(tmp), args.model, args.img_size, args.classes)
        common = ["serve.ood=false", f"serve.max_wait_ms={args.max_wait_ms}"]
        # Both servers stay up and the modes alternate round by round, so a change in background load
        # hits both alike; throughput is the median over rounds.
        servers = {"off": start_server(export, [*common, "serve.max_batch=1"]),
                   "on": start_server(export, [*common, f"serve.max_batch={args.max_batch}"])}
        try:
            lat: dict[str, list[float]] = {"off": [], "on": []}
            rps: dict[str, list[float]] = {"off": [], "on": []}
            cpu = {"off": 0.0, "on": 0.0}
            for _, url in servers.values():
                asyncio.run(drive(url, data, args.clients, args.warmup))
            for _ in range(args.rounds):
                for mode, (proc, url) in servers.items():
                    c0 = cpu_seconds(proc.pid)
                    got, wall = asyncio.run(drive(url, data, args.clients, args.requests // args.rounds))
                    cpu[mode] += cpu_seconds(proc.pid) - c0
                    lat[mode] += got
                    rps[mode].append(len(got) / wall)
            batches = {mode: asyncio.run(mean_batch(url)) for mode, (_, url) in servers.items()}
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                proc.wait(60)
    off = summary(lat["off"], rps["off"], batches["off"], cpu["off"])
    on = summary(lat["on"], rps["on"], batches["on"], cpu["on"])
    result = {"benchmark": "serve", "model": args.model, "img_size": args.img_size, "clients": args.clients,
              "torch_threads": torch.get_num_threads(), "batching_off": off, "batching_on": on,
              "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
              "ratio": round(on["rps"] / off["rps"], 3),
              # CPU time per request does not depend on how busy the rest of the machine is
              "cpu_ratio": round(off["server_cpu_ms_per_request"] / on["server_cpu_ms_per_request"], 3),
              "p99_goal_ms": 150, "p99_goal_met": on["p99_ms"] <= 150,
              "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2)}
    print(f"batch 1: p50 {off['p50_ms']} ms, p99 {off['p99_ms']} ms, {off['rps']} req/s | "
          f"batch ≤{args.max_batch}: p50 {on['p50_ms']} ms, p99 {on['p99_ms']} ms, {on['rps']} req/s "
          f"(mean batch {on['mean_batch']})", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
