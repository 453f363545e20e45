"""Shared helpers of the crawl tests: read shards back and compare them with what the mock site serves."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image

from mycodist.config import load_config


def pixel_hash(jpg: bytes) -> str:
    with Image.open(io.BytesIO(jpg)) as im:
        return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()


def read_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                assert key not in samples or ext not in samples[key], f"{key}.{ext} written twice"
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return samples


def content(out: Path) -> Counter[tuple[str, str]]:
    """(label, pixel hash) of every sample, checking cls against class_indices.json on the way."""
    classes = json.loads((out / "class_indices.json").read_text())
    got: Counter[tuple[str, str]] = Counter()
    for key, s in read_samples(out).items():
        meta = json.loads(s["json"])
        assert classes[s["cls"].decode()] == meta["label"], key
        assert meta["sha256"] and meta["url"].startswith("http"), key
        got[(meta["label"], pixel_hash(s["jpg"]))] += 1
    return got


def expected_content(site) -> Counter[tuple[str, str]]:
    return Counter((label, pixel_hash(b)) for label, photos in site.photos.items() for b in photos)


def crawl_cfg(base_url: str, *items: str):
    return load_config(None, [f"crawl.base_url={base_url}", f"crawl.wildfooduk_url={base_url}/wildfooduk/mushroom-guide/",
                              "crawl.backoff_base=0.02", "crawl.processes=1", "crawl.progress=false",
                              "shards.max_samples=4", *items])
