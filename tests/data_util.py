"""Helpers for the loader tests: real data sets with chosen shard sizes, written by DatasetWriter."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from mycodist.catalog import Species
from mycodist.config import load_config
from mycodist.shards import DatasetWriter, WriterSettings

LABELS = ["amanita_pallida", "boletus_bonus", "cantharellus_aureus", "morchella_esculenta"]
SPECIES = [Species(lab, lab.replace("_", " ").capitalize(), lab) for lab in LABELS]


def noise_jpeg(seed: int, size: tuple[int, int] = (48, 40), quality: int = 85) -> bytes:
    """A small JPEG whose pixels depend on `seed` (so crops and keys can be told apart)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def config(*overrides: str):
    return load_config(None, list(overrides))


def make_shards(out: Path, train: list[int], val: list[int] = (), size: tuple[int, int] = (48, 40),
                corrupt: frozenset[int] = frozenset(), label_of=lambda n: n % len(LABELS)) -> list[str]:
    """Shards of exactly the given sample counts (train-000000 has train[0] samples, ...); returns all keys.

    DatasetWriter closes shards at a fixed size, so each shard is one resumed write with its own limit.
    Samples numbered in `corrupt` get a JPEG cut in half: a readable header, undecodable pixels."""
    keys: list[str] = []
    n = 0
    shard_sizes = [("train", c) for c in train] + [("val", c) for c in val]
    for i, (split, count) in enumerate(shard_sizes):
        cfg = config(f"shards.max_samples={count}")
        with DatasetWriter(out, LABELS, SPECIES, WriterSettings.from_config(cfg), source="test", resume=i > 0) as w:
            for _ in range(count):
                key = f"s{n:05d}"
                jpg = noise_jpeg(n, size)
                w.write(split, key, jpg[: len(jpg) // 2] if n in corrupt else jpg, LABELS[label_of(n)],
                        {"url": None})
                keys.append(key)
                n += 1
    return keys


def loader_config(shards: Path, *overrides: str):
    """Small, fast defaults for tests: 32 px crops, small batches and buffers."""
    base = [f"data.shards={shards}", "data.img_size=32", "train.batch_size=4", "data.shuffle_buffer=16",
            "data.workers=0", "data.timeout=60"]
    return config(*base, *overrides)
