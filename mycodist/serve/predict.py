"""`mycodist predict --model EXPORT_DIR IMAGE...`: one JSON line per image, the same answer as the API.

Images go through the same decoder, eval transform, model, calibration and safety rules as
`mycodist serve`, in batches of `serve.max_batch`. An unreadable image gives a JSON line with `error`
(and exit status 1 at the end) instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mycodist.errors import UsageError
from mycodist.serve.inference import Predictor
from mycodist.serve.preprocess import BadImage, decode_image, original_size
from mycodist.serve.wiring import make_predictor
from mycodist.verdict import WARNING

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="EXPORT_DIR", help="export folder (`mycodist export`)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (searched recursively)")
    parser.add_argument("--top-k", type=int, help="species per answer (default serve.top_k)")


def iter_images(paths: list[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            yield p
        else:
            raise UsageError(f"'{p}' is neither an image file nor a folder")


def predict_files(predictor: Predictor, files: list[Path], max_pixels: int, max_bytes: int,
                  batch_size: int) -> Iterator[dict[str, Any]]:
    """Answers in input order; bad files give {"file", "error"} lines."""
    tf = predictor.export.transform
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        answers: list[dict[str, Any] | None] = [None] * len(chunk)
        tensors, where = [], []
        for i, f in enumerate(chunk):
            try:
                if f.stat().st_size > max_bytes:
                    raise BadImage(f"larger than serve.max_upload_bytes={max_bytes:,}", 413)
                img = decode_image(f.read_bytes(), max_pixels, tf)
            except (BadImage, OSError) as e:
                answers[i] = {"file": str(f), "error": str(e), "warning": WARNING}
                continue
            tensors.append(tf(img))
            where.append((i, original_size(img)))
        if tensors:
            for (i, (w, h)), ans in zip(where, predictor.predict(tensors), strict=True):
                answers[i] = {"file": str(chunk[i]), **ans, "image": {"width": w, "height": h}}
        yield from (a for a in answers if a is not None)


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    serve = cfg.serve
    top_k = int(serve.top_k if args.top_k is None else args.top_k)
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    files = list(iter_images(args.images))
    if not files:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {' '.join(args.images)}")
    predictor = make_predictor(args.model, serve, top_k=top_k)  # serve/wiring.py, shared with serve
    failed = 0
    for answer in predict_files(predictor, files, int(serve.max_pixels), int(serve.max_upload_bytes),
                                int(serve.max_batch)):
        failed += "error" in answer
        print(json.dumps(answer, ensure_ascii=False), flush=True)
    if failed:
        print(f"mycodist predict: {failed} of {len(files)} images could not be read", file=sys.stderr)
    return 1 if failed else 0
