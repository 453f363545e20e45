"""`mycodist ingest folder DIR --out OUT`: a class-folder image tree (the Kaggle layout) → shards.

Every file is decoded with Pillow (any type it reads), turned upright by its EXIF orientation, flattened
to RGB (transparency onto white) and re-encoded as JPEG, which also drops EXIF/GPS metadata. Files that
cannot be read are skipped and counted with a reason; one bad file never stops the run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import re
import sys
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from mycodist.atomic import atomic_write_json
from mycodist.catalog import Species, load_species, slugify
from mycodist.errors import UsageError
from mycodist.shards.writer import DatasetWriter, WriterSettings, assign_splits

SOURCE = "folder"
REPORT = "ingest_report.json"
_BINOMIAL = re.compile(r"^[A-Z][a-z]+ [a-z][a-z\-]+( .*)?$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ingest_source", metavar="SOURCE", required=True)
    p = sub.add_parser("folder", help="one sub-folder of images per species (the Kaggle layout)")
    p.add_argument("dir", metavar="DIR", help="folder whose sub-folders are the classes")
    p.add_argument("--out", required=True, help="data-set folder to write (an existing data set there is replaced)")
    p.add_argument("--species", metavar="FILE", help="species.json with known facts per label (others stay unknown)")
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="YAML merged over the defaults")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ---- one image (runs in worker processes) ----
def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit/float greyscale: scale, don't clip
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def prepare_image(path: str, quality: int, max_side: int) -> tuple[bytes, dict[str, Any]] | str:
    """Re-encoded JPEG bytes and json fields for one file, or the reason it is skipped."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"unreadable file: {e.strerror or e}"
    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.load()  # full decode: truncated or corrupt data fails here, not in a training worker
                orig_size = im.size
                im = ImageOps.exif_transpose(im)
                im = _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "too many pixels (decompression-bomb guard)"
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"truncated or corrupt image: {e}"
    except Exception as e:  # a plugin bug must not end the run either
        return f"cannot decode: {type(e).__name__}: {e}"
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "source": SOURCE, "url": None, "file": "",
            "orig_format": fmt, "orig_width": orig_size[0], "orig_height": orig_size[1]}
    return buf.getvalue(), meta


def _prepare_star(job: tuple[str, int, int]) -> tuple[bytes, dict[str, Any]] | str:
    return prepare_image(*job)


# ---- the folder ----
def scan_folder(root: Path, out: Path) -> tuple[dict[str, tuple[str, list[Path]]], list[tuple[str, str]]]:
    """label → (folder name, files), plus files skipped before decoding (path, reason)."""
    if not root.is_dir():
        raise UsageError(f"'{root}' is not a folder; give the folder whose sub-folders are the species")
    out_resolved = out.resolve()
    if out_resolved == root.resolve() or out_resolved.is_relative_to(root.resolve()):
        raise UsageError(f"--out '{out}' is inside '{root}', where it would be read as a class; put it elsewhere")
    classes: dict[str, tuple[str, list[Path]]] = {}
    skipped: list[tuple[str, str]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            skipped.append((entry.name, "not inside a class folder"))
            continue
        if not entry.is_dir():
            continue
        label = slugify(entry.name)
        if label in classes:
            raise UsageError(f"folders '{classes[label][0]}' and '{entry.name}' both give the label '{label}'; "
                             "rename one of them")
        files = sorted(p for p in entry.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(entry).parts))
        classes[label] = (entry.name, files)
    if not classes:
        raise UsageError(f"'{root}' has no class sub-folders; expected DIR/<species name>/<images>")
    return classes, skipped


def species_for(label: str, folder: str, known: dict[str, Species]) -> Species:
    """Known facts when given, else a record that states only what the folder name says."""
    if label in known:
        return known[label]
    binomial = bool(_BINOMIAL.match(folder.strip()))
    return Species(label=label, scientific_name=folder.strip() if binomial else "",
                   common_name="" if binomial else folder.strip(), source=SOURCE, facts={"folder": folder})


def ingest_folder(root: Path, out: Path, cfg: DictConfig, *, species_file: str | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Ingest `root` into a data set at `out`; returns the ingest report (also saved as ingest_report.json)."""
    classes, skipped = scan_folder(root, out)
    known = load_species(species_file) if species_file else {}
    quality = int(cfg.shards.ingest_jpeg_quality)
    max_side = int(cfg.shards.ingest_max_side)
    if not 1 <= quality <= 100:
        raise UsageError(f"shards.ingest_jpeg_quality must be 1..100, got {quality}")
    workers = int(cfg.shards.ingest_workers) or os.cpu_count() or 1
    jobs = [(label, f) for label, (_, files) in classes.items() for f in files]
    out.mkdir(parents=True, exist_ok=True)
    keys_by_label: dict[str, list[str]] = {}
    offsets: dict[str, int] = {}
    first_of_hash: dict[str, str] = {}
    # Pass 1 decodes each image once and spools the result, so splits can be stratified over the
    # images that really are valid without holding every JPEG in memory.
    with tempfile.TemporaryFile(dir=out) as spool:
        args = [(str(f), quality, max_side) for _, f in jobs]
        pool = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None
        try:
            results = pool.map(_prepare_star, args, chunksize=8) if pool else map(_prepare_star, args)
            for (label, f), res in tqdm(zip(jobs, results, strict=True), total=len(jobs), unit="img", desc="ingest",
                                        disable=not progress, file=sys.stderr):
                rel = str(f.relative_to(root))
                if isinstance(res, str):
                    skipped.append((rel, res))
                    continue
                jpg, meta = res
                if meta["sha256"] in first_of_hash:
                    skipped.append((rel, f"duplicate of {first_of_hash[meta['sha256']]}"))
                    continue
                first_of_hash[meta["sha256"]] = rel
                meta["file"] = rel
                key = f"{label[:150]}-{meta['sha256'][:16]}"
                offsets[key] = spool.tell()
                pickle.dump((label, jpg, meta), spool, protocol=pickle.HIGHEST_PROTOCOL)
                keys_by_label.setdefault(label, []).append(key)
        finally:
            if pool:
                pool.shutdown()
        if not offsets:
            raise UsageError(f"no readable images under '{root}' ({len(skipped)} files skipped); nothing written")
        labels = sorted(keys_by_label)
        empty = sorted(set(classes) - set(labels))
        splits = assign_splits(keys_by_label, float(cfg.shards.val_fraction))
        report = {
            "dir": str(root), "images": len(offsets), "classes": len(labels),
            "per_split": dict(Counter(splits.values())),
            "skipped": len(skipped), "skipped_by_reason": dict(Counter(_reason_kind(r) for _, r in skipped)),
            "empty_classes": [classes[lab][0] for lab in empty],
            "skipped_files": [{"file": f, "reason": r} for f, r in skipped],
        }
        species = [species_for(lab, classes[lab][0], known) for lab in labels]
        # Shuffled (by key hash) rather than class by class, so a loader's shuffle buffer mixes classes.
        order = sorted(offsets, key=lambda k: hashlib.sha256(k.encode()).digest())
        with DatasetWriter(out, labels, species, WriterSettings.from_config(cfg), source=SOURCE) as writer:
            for key in order:
                spool.seek(offsets[key])
                label, jpg, meta = pickle.load(spool)
                writer.write(splits[key], key, jpg, label, meta)
            atomic_write_json(out / REPORT, report)
    return report


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].split(" of ", 1)[0]


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    root, out = Path(args.dir), Path(args.out)
    report = ingest_folder(root, out, cfg, species_file=args.species, progress=not args.quiet)
    split_text = ", ".join(f"{k} {v}" for k, v in sorted(report["per_split"].items()))
    print(f"ingested {report['images']} images in {report['classes']} classes ({split_text}) → {out}")
    if report["skipped"]:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(report["skipped_by_reason"].items()))
        print(f"skipped {report['skipped']} files: {kinds} (list in {out / REPORT})")
    if report["empty_classes"]:
        print(f"no usable image in: {', '.join(report['empty_classes'])} (left out of the classes)")
    return 0
