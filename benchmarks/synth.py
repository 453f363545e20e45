"""Synthetic photo generator: images/s on ONE core at 256 px, against two baselines in the same run.

- `generator`: mycodist.synth as shipped (half-resolution ground, each fruit-body part computed only over
  its own bounding box).
- `baseline_full_frame`: the same renderer with both shortcuts off (ground at full resolution, every part
  computed over the whole frame): the straightforward numpy version.
- `floor_noise_jpeg`: full-frame random noise + blur + JPEG encode only: what a 256 px JPEG costs at least.

The process is pinned to one CPU core. Run: `.venv/bin/python benchmarks/synth.py [--photos N] [--size S]`.
The last line is a JSON object with the figures and the ratio generator / baseline_full_frame (per CPU-second,
which other load on a shared machine does not distort; wall-clock rates are printed too).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image, ImageFilter

from mycodist.synth.render import render_photo
from mycodist.synth.species import make_catalogue


def _rate(fn, n: int) -> tuple[float, float]:
    """(photos per wall-clock second, photos per CPU second of this process)."""
    fn(0)  # warm caches (noise bank, vignette) outside the timing
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=240, help="photos per variant")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="best of this many rounds (other load on the machine)")
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cat = make_catalogue(24, 0)

    def generator(i: int, fast: bool = True) -> bytes:
        return render_photo(cat[i % len(cat)].traits, np.random.default_rng([0, i]), args.size, fast=fast)

    def floor(i: int) -> bytes:
        rng = np.random.default_rng([1, i])
        img = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.filter(ImageFilter.GaussianBlur(1.0)).save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    rounds: dict[str, list[tuple[float, float]]] = {"generator": [], "baseline_full_frame": [], "floor_noise_jpeg": []}
    for _ in range(args.repeats):  # interleaved, so a burst of load hits every variant alike
        rounds["generator"].append(_rate(generator, args.photos))
        rounds["baseline_full_frame"].append(_rate(lambda i: generator(i, fast=False), max(args.photos // 4, 8)))
        rounds["floor_noise_jpeg"].append(_rate(floor, args.photos))
    wall = {k: round(max(r[0] for r in v), 1) for k, v in rounds.items()}
    cpu = {k: round(max(r[1] for r in v), 1) for k, v in rounds.items()}
    for k in rounds:
        print(f"{k:>20}: {wall[k]:7.1f} img/s wall, {cpu[k]:7.1f} img per CPU-second")
    # On a shared machine the wall-clock rate includes waiting for the core; img per CPU-second does not.
    print(json.dumps({
        "benchmark": "synth", "size": args.size, "cores": 1, "photos": args.photos,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "generator_img_s": wall["generator"], "generator_img_per_cpu_s": cpu["generator"],
        "baseline_full_frame_img_s": wall["baseline_full_frame"],
        "baseline_full_frame_img_per_cpu_s": cpu["baseline_full_frame"],
        "floor_noise_jpeg_img_s": wall["floor_noise_jpeg"], "floor_noise_jpeg_img_per_cpu_s": cpu["floor_noise_jpeg"],
        "ratio_vs_baseline": round(cpu["generator"] / cpu["baseline_full_frame"], 2),
        "goal_img_s": 50, "meets_goal": cpu["generator"] >= 50,
    }))


if __name__ == "__main__":
    main()
