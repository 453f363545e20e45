"""Helpers for the shard tests: tiny real JPEGs made with Pillow and a small real data set."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from mycodist.catalog import Species
from mycodist.config import load_config
from mycodist.shards import DatasetWriter, WriterSettings, assign_splits

LABELS = ["amanita_pallida", "boletus_bonus", "cantharellus_aureus"]
SPECIES = [
    Species("amanita_pallida", "Amanita pallida", "Pale death cap", family="Amanitaceae", edibility="deadly",
            lookalikes=["boletus_bonus"]),
    Species("boletus_bonus", "Boletus bonus", "Good bolete", family="Boletaceae", edibility="choice"),
    Species("cantharellus_aureus", "Cantharellus aureus", "Golden chanterelle", family="Cantharellaceae",
            edibility="edible"),
]
COLOURS = {"amanita_pallida": (230, 230, 200), "boletus_bonus": (120, 70, 30), "cantharellus_aureus": (240, 170, 20)}


def jpeg(colour=(200, 100, 50), size=(48, 32), quality=90, noise_seed: int | None = None) -> bytes:
    im = Image.new("RGB", size, colour)
    if noise_seed is not None:  # vary bytes (and size) between samples
        im.putpixel((noise_seed % size[0], (noise_seed // size[0]) % size[1]), (noise_seed % 256, 0, 255))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def config(*overrides: str):
    return load_config(None, list(overrides))


def make_dataset(out: Path, per_label: int = 8, overrides: tuple[str, ...] = ("shards.max_samples=5",),
                 **writer_kwargs) -> dict:
    """A real 3-class data set written through DatasetWriter; returns its manifest."""
    cfg = config(*overrides)
    keys = {lab: [f"{lab}-{i:04d}" for i in range(per_label)] for lab in LABELS}
    splits = assign_splits(keys, float(cfg.shards.val_fraction))
    with DatasetWriter(out, LABELS, SPECIES, WriterSettings.from_config(cfg), source="test", **writer_kwargs) as w:
        for lab, ks in keys.items():
            for i, k in enumerate(ks):
                w.write(splits[k], k, jpeg(COLOURS[lab], noise_seed=i), lab, {"url": f"http://127.0.0.1/{k}.jpg"})
    return json.loads((out / "manifest.json").read_text())
