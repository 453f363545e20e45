"""Loader throughput: 224-px training crops from ~500-900 px JPEG shards, several ways, same data, same run.

(a) mycodist's train loader (crop chosen first, scaled JPEG decode, batching in the workers), with its
    default decoder (`data.decoder=auto`: region decoding where mycodist's C extension is built, else
    simplejpeg), (a') the same with uint8 output, (a-sj) with `data.decoder=simplejpeg` (whole-image decode,
    the previous default) and (a'') with `data.decoder=pillow` (the Pillow path);
(b) baseline: a plain webdataset pipeline, `.decode("pil")` + RandomResizedCrop done the usual way
    (crop and resize the fully decoded image) + flip + normalise, batched in the workers;
(c) a class-folder Dataset over the same JPEGs (PIL full decode, same usual crop) with a DataLoader;
(d) decode bounds: decoding alone, bytes in memory, at the scale each of (a)'s crops needs, in the same
    number of processes, several ways: simplejpeg decoding the whole image at the power-of-two scale
    (1/8..1) that covers the crop; simplejpeg at the exact k/8 scale the crop needs; Pillow's draft
    (1/2, 1/4, 1/8; the old bound); and region decoding at the power-of-two scale, i.e. only the rows and
    columns (a)'s resize reads, as `data.decoder=auto` does it (crops covering >= 90 % of the image are
    decoded whole by simplejpeg, which is as fast there).
    `decode_bound` is the fastest of them in this run: "the fastest decoder's decode-only rate at the scale
    each crop needs" (issue 15), the most demanding denominator; `decode_bound_is` names it and
    `decode_bounds` lists every one;
    (d2) also Pillow's draft to 224 px on the shorter side, which no RandomResizedCrop pipeline can reach;
    (d3) crop bounds: the decode plus the one bilinear resize of each crop box to 224 px, i.e. the pixel
    work any pipeline producing these crops must do, with no I/O, batching or normalisation (region
    decoding, simplejpeg whole-image, and Pillow's draft, with mycodist's C resize where built and, for
    region decoding, also with Pillow's; `crop_bound` is the fastest).
(a-pr) mycodist with `data.resize=pillow` (Pillow's resize after region decoding, the previous default):
    `speedup_vs_pillow_resize` is what mycodist/data/_resample.c buys in the loader.
`fraction_of_decode_bound` is (a) over `decode_bound`; `fraction_of_<name>_decode_bound` over each of the
others; `fraction_of_crop_bound` says how much of the remaining gap is pipeline overhead rather than the
unavoidable resize.

Every variant uses the same worker count and batch size and runs whole epochs (worker start-up
included), interleaved, `--repeats` times. Two figures per variant, best run kept:
- images/s per core = images / CPU seconds of the main process and all its workers (getrusage of
  self + reaped children): what one core delivers, robust when other jobs share the machine;
- wall images/s with `--workers` processes (only meaningful on an otherwise idle machine).
Last line: JSON with both for each variant, `ratio_vs_wds` and `fraction_of_decode_bound` (per core).

    .venv/bin/python benchmarks/loader.py [--images 800] [--workers 2] [--repeats 3] [--scale-probe]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mycodist.catalog import Species
from mycodist.config import load_config
from mycodist.data import DataSpec, make_train_loader
from mycodist.data.decode import (
    REGION_MAX_AREA,
    SCALES,
    _region,
    _window,
    decode_crop,
    decode_scaled,
    jpeg_size,
    pick_scale,
    region_available,
    resample_available,
    scale_request,
)
from mycodist.data.transforms import ImageConfig, crop_box
from mycodist.shards import DatasetWriter, WriterSettings

SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
LABELS = [f"species_{i:02d}" for i in range(10)]


def photo_like(rng: np.random.Generator) -> bytes:
    """A smooth colour field with texture, 500-900 px a side, JPEG q90 (~compresses like a photo)."""
    w, h = int(rng.integers(500, 901)), int(rng.integers(500, 901))
    low = rng.integers(0, 256, (int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.normal(0, 5, (h, w, 1)).astype(np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_data(root: Path, n: int, per_shard: int) -> tuple[Path, Path, list[bytes]]:
    shards, folders = root / "shards", root / "folders"
    rng = np.random.default_rng(0)
    jpgs = [photo_like(rng) for _ in range(n)]
    cfg = load_config(None, [f"shards.max_samples={per_shard}"])
    with DatasetWriter(shards, LABELS, [Species(lab, lab, lab) for lab in LABELS], WriterSettings.from_config(cfg), source="bench") as w:
        for i, jpg in enumerate(jpgs):
            w.write("train", f"img{i:05d}", jpg, LABELS[i % len(LABELS)], {"url": None})
    for i, jpg in enumerate(jpgs):
        d = folders / LABELS[i % len(LABELS)]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:05d}.jpg").write_bytes(jpg)
    return shards, folders, jpgs


def usual_crop(img: Image.Image, rng: random.Random) -> torch.Tensor:
    """RandomResizedCrop + flip + ToTensor + Normalize as torchvision does them, on a decoded image."""
    img = img.convert("RGB")
    x, y, w, h = crop_box(img.size[0], img.size[1], rng, (0.08, 1.0), (3 / 4, 4 / 3))
    out = img.crop((x, y, x + w, y + h)).resize((SIZE, SIZE), Image.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    arr = (np.asarray(out, np.float32) / 255 - MEAN) / STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def collate(samples):
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def cpu_seconds() -> float:
    """CPU time of this process plus every child it has reaped (finished DataLoader/Pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(loader) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    it = iter(loader)
    for images, _ in it:
        n += images.shape[0]
    del it  # workers are joined here, so their CPU time is counted
    return time.perf_counter() - t0, n


def run_mycodist(shards: Path, workers: int, batch: int, output: str, decoder: str = "auto",
                 resize: str = "auto") -> tuple[float, int]:
    cfg = load_config(None, [f"data.shards={shards}", f"data.workers={workers}", f"train.batch_size={batch}",
                             f"data.output={output}", "data.epoch_remainder=wrap", f"data.decoder={decoder}",
                             f"data.resize={resize}"])
    return time_loader(make_train_loader(cfg, 0, 1, spec=DataSpec.from_config(cfg)))


def run_wds(shards: Path, workers: int, batch: int) -> tuple[float, int]:
    urls = sorted(str(p) for p in shards.glob("train-*.tar"))
    rng = random.Random(0)
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(1000).decode("pil")
          .to_tuple("jpg", "cls").map_tuple(lambda im: usual_crop(im, rng), int).batched(batch, collation_fn=collate))
    return time_loader(DataLoader(ds, batch_size=None, num_workers=workers))


class FolderDataset(Dataset):
    def __init__(self, root: Path):
        self.items = sorted((p, LABELS.index(p.parent.name)) for p in root.glob("*/*.jpg"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with Image.open(path) as im:
            return usual_crop(im, random.Random(i)), label


def run_folder(folders: Path, workers: int, batch: int) -> tuple[float, int]:
    loader = DataLoader(FolderDataset(folders), batch_size=batch, shuffle=True, num_workers=workers,
                        collate_fn=collate)
    return time_loader(loader)


_JPGS: list[bytes] = []


def _decode_with_crop_draft(i: int) -> int:
    data = _JPGS[i]
    with Image.open(io.BytesIO(data)) as im:
        x, y, w, h = crop_box(im.size[0], im.size[1], random.Random(i), (0.08, 1.0), (3 / 4, 4 / 3))
        im.draft("RGB", (math.ceil(im.size[0] * SIZE / w), math.ceil(im.size[1] * SIZE / h)))
        im.load()
        return im.size[0]


def _turbo_request(i: int) -> tuple[int, int, tuple[int, int, int, int], tuple[int, int]]:
    w, h = jpeg_size(_JPGS[i])
    x, y, bw, bh = crop_box(w, h, random.Random(i), (0.08, 1.0), (3 / 4, 4 / 3))
    box = (x, y, x + bw, y + bh)
    return w, h, box, scale_request(w, h, box, SIZE)


def _decode_turbo_pow2(i: int) -> int:
    w, h, _, need = _turbo_request(i)
    return decode_scaled(_JPGS[i], w, h, *need).shape[1]


def _decode_turbo_k8(i: int) -> int:
    w, h, _, need = _turbo_request(i)
    return decode_scaled(_JPGS[i], w, h, *need, scales=tuple(range(1, 9))).shape[1]


def _decode_region(i: int, scales: tuple[int, ...] = SCALES) -> int:
    """Decode only the rows and columns of the crop's window (what the resize reads), as decode_crop does:
    crops whose window covers >= REGION_MAX_AREA of the scaled image are decoded whole (as fast there)."""
    w, h, box, need = _turbo_request(i)
    k = pick_scale(w, h, *need, scales)
    sw, sh = -(-w * k // 8), -(-h * k // 8)
    sx, sy = sw / w, sh / h
    x0, y0, x1, y1 = _window((box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), SIZE, sw, sh)
    if (x1 - x0) * (y1 - y0) >= REGION_MAX_AREA * sw * sh:
        return decode_scaled(_JPGS[i], w, h, sw, sh, scales=(k,)).shape[1]
    return _region().decode_region(_JPGS[i], k, x0 - 1, y0, x1 + 1, y1)[3]


def _crop(i: int, path: str, fast_resize: bool = True) -> int:
    w, h, box, _ = _turbo_request(i)
    return decode_crop(_JPGS[i], (w, h), box, SIZE, 2.0, path, fast_resize=fast_resize).shape[0]


def _crop_simplejpeg(i: int) -> int:
    return _crop(i, "simplejpeg")


def _crop_region(i: int) -> int:
    return _crop(i, "region")


def _crop_region_pillow_resize(i: int) -> int:
    return _crop(i, "region", fast_resize=False)


def _decode_and_crop(i: int) -> int:
    with Image.open(io.BytesIO(_JPGS[i])) as im:
        x, y, w, h = crop_box(im.size[0], im.size[1], random.Random(i), (0.08, 1.0), (3 / 4, 4 / 3))
        width, height = im.size
        im.draft("RGB", (math.ceil(width * SIZE / w), math.ceil(height * SIZE / h)))
        sx, sy = im.size[0] / width, im.size[1] / height
        out = im.resize((SIZE, SIZE), Image.BILINEAR, box=(x * sx, y * sy, (x + w) * sx, (y + h) * sy))
        return out.size[0]


def _decode_with_fixed_draft(i: int) -> int:
    with Image.open(io.BytesIO(_JPGS[i])) as im:
        s = SIZE / min(im.size)
        im.draft("RGB", (math.ceil(im.size[0] * s), math.ceil(im.size[1] * s)))
        im.load()
        return im.size[0]


def run_decode(jpgs: list[bytes], workers: int, fn) -> tuple[float, int]:
    global _JPGS
    _JPGS = jpgs
    t0 = time.perf_counter()
    pool = mp.get_context("fork").Pool(max(workers, 1))
    pool.map(fn, range(len(jpgs)), chunksize=16)
    pool.close()
    pool.join()  # reaped, so their CPU time is counted
    return time.perf_counter() - t0, len(jpgs)


def scale_probe(jpgs: list[bytes], rounds: int = 3) -> dict[str, float]:
    """CPU ms per image for simplejpeg decoding whole photos at each k/8: which scales are worth using."""
    out = {}
    sizes = [jpeg_size(j) for j in jpgs]
    for k in range(1, 9):
        best = math.inf
        for _ in range(rounds):
            c0 = time.process_time()
            for j, (w, h) in zip(jpgs, sizes, strict=True):
                decode_scaled(j, w, h, math.ceil(w * k / 8), math.ceil(h * k / 8), scales=(k,))
            best = min(best, (time.process_time() - c0) / len(jpgs) * 1e3)
        out[f"{k}/8"] = round(best, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale-probe", action="store_true", help="also time simplejpeg at each k/8 scale")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ImageConfig().check()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards, folders, jpgs = make_data(Path(tmp), args.images, args.per_shard)
        mean_px = float(np.mean([Image.open(io.BytesIO(j)).size for j in jpgs]))
        print(f"data: {len(jpgs)} JPEGs, mean side {mean_px:.0f} px, {sum(map(len, jpgs)) / len(jpgs) / 1024:.0f} KiB "
              f"mean, made in {time.perf_counter() - t0:.1f} s")
        region = region_available()
        variants = {
            "mycodist": lambda: run_mycodist(shards, args.workers, args.batch, "float"),
            "mycodist_uint8": lambda: run_mycodist(shards, args.workers, args.batch, "uint8"),
            "mycodist_simplejpeg": lambda: run_mycodist(shards, args.workers, args.batch, "float", "simplejpeg"),
            "mycodist_pillow": lambda: run_mycodist(shards, args.workers, args.batch, "float", "pillow"),
            "mycodist_pillow_resize": lambda: run_mycodist(shards, args.workers, args.batch, "float", resize="pillow"),
            "webdataset_plain": lambda: run_wds(shards, args.workers, args.batch),
            "class_folder": lambda: run_folder(folders, args.workers, args.batch),
            "decode_region_pow2": lambda: run_decode(jpgs, args.workers, _decode_region),
            "decode_simplejpeg_pow2": lambda: run_decode(jpgs, args.workers, _decode_turbo_pow2),
            "decode_simplejpeg_k8": lambda: run_decode(jpgs, args.workers, _decode_turbo_k8),
            "decode_bound_pillow": lambda: run_decode(jpgs, args.workers, _decode_with_crop_draft),
            "decode_draft_224": lambda: run_decode(jpgs, args.workers, _decode_with_fixed_draft),
            "crop_region": lambda: run_decode(jpgs, args.workers, _crop_region),
            "crop_region_pillow_resize": lambda: run_decode(jpgs, args.workers, _crop_region_pillow_resize),
            "crop_simplejpeg": lambda: run_decode(jpgs, args.workers, _crop_simplejpeg),
            "crop_bound_pillow": lambda: run_decode(jpgs, args.workers, _decode_and_crop),
        }
        if not region:
            print("mycodist/data/_jpegregion.c is not built: no region-decoding variants")
            for name in ("decode_region_pow2", "crop_region", "crop_region_pillow_resize"):
                del variants[name]
        if not resample_available():
            print("mycodist/data/_resample.c is not built: Pillow resizes in every variant")
            del variants["mycodist_pillow_resize"], variants["crop_region_pillow_resize"]
        probe = scale_probe(jpgs[:100]) if args.scale_probe else None
        if probe:
            print("simplejpeg CPU ms per image by scale:", probe)
        per_core: dict[str, float] = {}
        wall: dict[str, float] = {}
        for r in range(args.repeats):
            for name, fn in variants.items():
                c0 = cpu_seconds()
                secs, n = fn()
                cpu = cpu_seconds() - c0
                per_core[name] = max(per_core.get(name, 0.0), n / cpu)
                wall[name] = max(wall.get(name, 0.0), n / secs)
                print(f"repeat {r} {name:>18}: {n} images, {secs:.2f} s wall = {n / secs:.0f} img/s, "
                      f"{cpu:.2f} CPU s = {n / cpu:.0f} img/s per core")
    decoders = [k for k in ("decode_region_pow2", "decode_simplejpeg_pow2", "decode_simplejpeg_k8",
                            "decode_bound_pillow") if k in per_core]
    fastest = max(decoders, key=per_core.__getitem__)
    per_core["decode_bound"], wall["decode_bound"] = per_core[fastest], wall[fastest]
    crops = [k for k in ("crop_region", "crop_simplejpeg", "crop_region_pillow_resize") if k in per_core]
    fastest_crop = max(crops, key=per_core.__getitem__)
    per_core["crop_bound"], wall["crop_bound"] = per_core[fastest_crop], wall[fastest_crop]
    result: dict[str, object] = {f"{k}_img_s_per_core": round(v, 1) for k, v in per_core.items()}
    result.update({f"{k}_wall_img_s": round(v, 1) for k, v in wall.items()})
    result["decode_bound_is"] = fastest
    result["decode_bounds"] = {k: round(per_core[k], 1) for k in decoders}
    result["crop_bound_is"] = fastest_crop
    result["region_decoder"] = region
    result["c_resize"] = resample_available()
    if "mycodist_pillow_resize" in per_core:
        result["speedup_vs_pillow_resize"] = round(per_core["mycodist"] / per_core["mycodist_pillow_resize"], 3)
        result["fraction_of_pillow_resize_crop_bound"] = round(
            per_core["mycodist"] / per_core["crop_region_pillow_resize"], 2)
    if probe:
        result["simplejpeg_ms_by_scale"] = probe
    result.update({
        "workers": args.workers, "batch": args.batch, "images": args.images, "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 1),
        "ratio_vs_wds": round(per_core["mycodist"] / per_core["webdataset_plain"], 2),
        "ratio_vs_class_folder": round(per_core["mycodist"] / per_core["class_folder"], 2),
        "fraction_of_decode_bound": round(per_core["mycodist"] / per_core["decode_bound"], 2),
        **{f"fraction_of_{k.removeprefix('decode_').removesuffix('_pow2').removeprefix('bound_')}_decode_bound":
           round(per_core["mycodist"] / per_core[k], 2) for k in decoders},
        "fraction_of_crop_bound": round(per_core["mycodist"] / per_core["crop_bound"], 2),
        "fraction_of_pillow_crop_bound": round(per_core["mycodist"] / per_core["crop_bound_pillow"], 2),
        "pillow_path_ratio_vs_wds": round(per_core["mycodist_pillow"] / per_core["webdataset_plain"], 2),
        "speedup_vs_pillow_path": round(per_core["mycodist"] / per_core["mycodist_pillow"], 3),
        "speedup_vs_simplejpeg_path": round(per_core["mycodist"] / per_core["mycodist_simplejpeg"], 3),
        "simplejpeg_path_ratio_vs_wds": round(per_core["mycodist_simplejpeg"] / per_core["webdataset_plain"], 2),
        "uint8_ratio_vs_wds": round(per_core["mycodist_uint8"] / per_core["webdataset_plain"], 2),
        "uint8_fraction_of_decode_bound": round(per_core["mycodist_uint8"] / per_core["decode_bound"], 2),
        "wall_ratio_vs_wds": round(wall["mycodist"] / wall["webdataset_plain"], 2),
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
