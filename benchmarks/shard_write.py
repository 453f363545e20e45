"""Shard writing and checking throughput: DatasetWriter (contract checks, atomic renames, manifest scan)
against the baseline `webdataset.ShardWriter` writing the same pre-encoded samples with no checks.

Usage: python benchmarks/shard_write.py [--samples N] [--size PX]
Prints a JSON object as its last line.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from mycodist.catalog import Species
from mycodist.config import load_config
from mycodist.shards import DatasetWriter, WriterSettings, read_manifest
from mycodist.shards.verify import verify_dataset

CLASSES = 8


def make_samples(n: int, size: int) -> list[tuple[str, bytes, str, dict]]:
    """Photo-like JPEGs (smooth gradients plus mild noise), so sizes resemble real ~size px photos."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        base = np.stack([xx * rng.uniform(60, 200), yy * rng.uniform(60, 200), (xx + yy) * rng.uniform(30, 120)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=85)
        label = f"species_{i % CLASSES}"
        out.append((f"s{i:06d}", buf.getvalue(), label, {"url": None, "source": "bench"}))
    return out


def bench_baseline(samples, out: Path, maxcount: int) -> float:
    out.mkdir()
    t0 = time.perf_counter()
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for key, jpg, label, meta in samples:
            rec = dict(meta, label=label, width=0, height=0)
            sink.write({"__key__": key, "jpg": jpg, "cls": str(int(label.rsplit("_", 1)[1])).encode(),
                        "json": json.dumps(rec, sort_keys=True).encode()})
    return time.perf_counter() - t0


def bench_writer(samples, out: Path, maxcount: int) -> tuple[float, float]:
    labels = [f"species_{c}" for c in range(CLASSES)]
    species = [Species(lab, f"Species {c}", "", edibility="unknown") for c, lab in enumerate(labels)]
    cfg = load_config(None, [f"shards.max_samples={maxcount}"])
    t0 = time.perf_counter()
    w = DatasetWriter(out, labels, species, WriterSettings.from_config(cfg), source="bench")
    for key, jpg, label, meta in samples:
        w.write("train", key, jpg, label, meta)
    t1 = time.perf_counter()
    w.close()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--maxcount", type=int, default=500)
    args = ap.parse_args()
    samples = make_samples(args.samples, args.size)
    mb = sum(len(s[1]) for s in samples) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_s = min(bench_baseline(samples, tmp / f"b{r}", args.maxcount) for r in range(2))
        runs = [bench_writer(samples, tmp / f"w{r}", args.maxcount) for r in range(2)]
        ours_s, close_s = min(runs)
        t0 = time.perf_counter()
        read_manifest(tmp / "w0")
        manifest_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        problems = verify_dataset(tmp / "w0")
        verify_s = time.perf_counter() - t0
        assert problems == [], problems
        t0 = time.perf_counter()
        verify_dataset(tmp / "w0", decode=False)
        verify_nodecode_s = time.perf_counter() - t0
    result = {
        "samples": args.samples, "image_px": args.size, "jpeg_mib": round(mb, 1),
        "baseline": "webdataset.ShardWriter, same bytes, no checks",
        "baseline_samples_per_s": round(args.samples / base_s),
        "datasetwriter_samples_per_s": round(args.samples / ours_s),
        "datasetwriter_over_baseline": round(base_s / ours_s, 3),
        "close_with_manifest_scan_s": round(close_s, 3),
        "verify_full_decode_samples_per_s": round(args.samples / verify_s),
        "verify_no_decode_samples_per_s": round(args.samples / verify_nodecode_s),
        "read_manifest_ms": round(manifest_ms, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
