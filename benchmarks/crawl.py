"""Crawler throughput: mycodist's crawler vs img2dataset on the same URL list, in the same run.

A local aiohttp server (its own process) serves N photo-sized JPEGs (500–900 px). Both tools fetch
every URL, resize so the longest side is --size (never upscaling), re-encode JPEG quality 90 and write
webdataset shards, with --processes worker processes each. img2dataset pins old dependencies, so it
lives in its own virtual environment (--venv, created on first use). Figures are end to end (process
start to exit), best of --rounds alternating runs since other work may share the cores; CPU time of
the whole process tree per image is reported too, as it does not depend on what else runs.

    .venv/bin/python benchmarks/crawl.py [--images 2000] [--rounds 2] [--venv /tmp/mycodist-bench/i2d-venv]

The last line printed is a JSON object with images/s of both and their ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
I2D_VERSION = "1.47.0"


def make_photo(i: int) -> bytes:
    """A unique, photo-like JPEG (smooth colour fields + shapes + grain), 500–900 px."""
    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(500, 901, 2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.003, 0.02, 2).tolist() + [float(rng.uniform(0, 6))]
        arr[..., c] = 128 + 90 * np.sin(fx * x + ph) * np.cos(fy * y + i)
    arr += rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=88)
    return buf.getvalue()


def ensure_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(n) if not (folder / f"{i:05d}.jpg").exists()]
    if missing:
        with multiprocessing.Pool() as pool:
            for i, data in zip(missing, pool.imap(make_photo, missing, chunksize=16), strict=True):
                (folder / f"{i:05d}.jpg").write_bytes(data)
    return [folder / f"{i:05d}.jpg" for i in range(n)]


def serve(folder: str, port_file: str) -> None:
    """The photo server: every file from memory, 404 for robots.txt (so everything is allowed)."""
    from aiohttp import web

    files = {p.name: p.read_bytes() for p in Path(folder).glob("*.jpg")}

    async def photo(request: web.Request) -> web.Response:
        body = files.get(request.match_info["name"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="image/jpeg")

    async def start() -> None:
        app = web.Application()
        app.router.add_get("/img/{name}", photo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        Path(port_file).write_text(str(runner.addresses[0][1]))
        import asyncio

        await asyncio.Event().wait()

    import asyncio

    asyncio.run(start())


def ensure_venv(venv: Path) -> Path:
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        print(f"creating {venv} with img2dataset=={I2D_VERSION} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"], check=True)
    return exe


def count_samples(folder: Path) -> int:
    keys = set()
    for tar in folder.glob("*.tar"):
        with tarfile.open(tar) as tf:
            keys.update(m.name.split(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".jpg"))
    return len(keys)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # every finished descendant (tools' workers too)
    return r.ru_utime + r.ru_stime


def run_timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process tree)."""
    c0, t0 = _cpu(), time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return dt, _cpu() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--threads", type=int, default=64, help="img2dataset threads per process = our concurrency")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "crawl"))
    ap.add_argument("--venv", default="/tmp/mycodist-bench/i2d-venv")
    args = ap.parse_args()

    out = Path(args.out)
    paths = ensure_images(out / "images", args.images)
    i2d = ensure_venv(Path(args.venv))
    port_file = out / "port"
    port_file.unlink(missing_ok=True)
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(str(out / "images"), str(port_file)),
                                                          daemon=True)
    server.start()
    while not port_file.exists():
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port_file.read_text()}"
    urls = out / "urls.csv"
    urls.write_text("url,label\n" + "".join(f"{base}/img/{p.name},species_{i % 20}\n" for i, p in enumerate(paths)))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results: dict[str, list[float]] = {"mycodist": [], "img2dataset": []}
    cpu: dict[str, list[float]] = {"mycodist": [], "img2dataset": []}  # CPU ms per image
    counts: dict[str, int] = {}
    try:
        for _ in range(args.rounds):
            dst = out / "img2dataset-out"
            shutil.rmtree(dst, ignore_errors=True)
            dt, c = run_timed([str(i2d), "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
                            "--caption_col", "label", "--output_format", "webdataset", "--output_folder", str(dst),
                            "--processes_count", str(args.processes), "--thread_count", str(args.threads),
                            "--image_size", str(args.size), "--resize_mode", "keep_ratio_largest",
                            "--resize_only_if_bigger", "True", "--encode_quality", "90",
                            "--number_sample_per_shard", "1000", "--enable_wandb", "False", "--retries", "0"],
                           env, out)
            counts["img2dataset"] = count_samples(dst)
            results["img2dataset"].append(counts["img2dataset"] / dt)
            cpu["img2dataset"].append(1000 * c / counts["img2dataset"])

            dst = out / "mycodist-out"
            shutil.rmtree(dst, ignore_errors=True)
            dt, c = run_timed([sys.executable, "-m", "mycodist", "crawl", f"manifest:{urls}", "--out", str(dst),
                            f"crawl.max_side={args.size}", "crawl.jpeg_quality=90", f"crawl.processes={args.processes}",
                            f"crawl.concurrency={args.threads}", f"crawl.per_host={args.threads}",
                            "crawl.progress=false", "shards.max_samples=1000", "shards.val_fraction=0.0"], env, out)
            counts["mycodist"] = count_samples(dst)
            results["mycodist"].append(counts["mycodist"] / dt)
            cpu["mycodist"].append(1000 * c / counts["mycodist"])
    finally:
        server.terminate()
    ours, theirs = max(results["mycodist"]), max(results["img2dataset"])
    our_cpu, their_cpu = min(cpu["mycodist"]), min(cpu["img2dataset"])
    print(f"images: {args.images} of 500-900 px -> longest side {args.size}; processes {args.processes}; "
          f"samples written: {counts}; img/s per round: {json.dumps({k: [round(v, 1) for v in vs] for k, vs in results.items()})}"
          f"; CPU ms/img per round: {json.dumps({k: [round(v, 2) for v in vs] for k, vs in cpu.items()})}")
    print(json.dumps({"benchmark": "crawl", "images": args.images, "size": args.size, "processes": args.processes,
                      "samples": counts, "mycodist_img_s": round(ours, 1), "img2dataset_img_s": round(theirs, 1),
                      "mycodist_cpu_ms_per_img": round(our_cpu, 2), "img2dataset_cpu_ms_per_img": round(their_cpu, 2),
                      "img2dataset_version": I2D_VERSION, "ratio": round(ours / theirs, 2),
                      "cpu_efficiency_ratio": round(their_cpu / our_cpu, 2)}))


if __name__ == "__main__":
    main()
