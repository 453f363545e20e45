"""DatasetWriter: samples in, complete WebDataset shards + side files + manifest out (docs/shards.md).

Every producer (synth, ingest, crawl, merge) writes through this one class, so the shard contract is
enforced in one place: keys, labels, class numbers, the json fields, shard limits and atomic renames.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from mycodist.atomic import TMP_PREFIX
from mycodist.catalog import (
    CLASS_INDICES,
    EDIBILITY,
    SPECIES,
    Species,
    load_class_indices,
    save_class_indices,
    save_species,
    slugify,
)
from mycodist.config import save_config, to_dict
from mycodist.lookalikes import load_references, merge_catalogue, reference_from_config
from mycodist.shards.manifest import MANIFEST, build_manifest, write_manifest
from mycodist.shards.tarshard import (
    KEY_RE,
    SPLIT_RE,
    ShardFile,
    iter_keys,
    list_shards,
    parse_shard_name,
    sample_bytes,
    shard_name,
)

REQUIRED_META = ("label", "scientific_name", "common_name", "source", "url", "sha256", "width", "height",
                 "edibility")
ShardCallback = Callable[[str, Path, list[str]], None]


def _plain(value: Any) -> Any:
    """JSON for numpy scalars/arrays and paths that producers may pass in meta."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"meta value {value!r} of type {type(value).__name__} is not JSON-serialisable")


class DuplicateKeyError(ValueError):
    """A sample key was written before (in this run or, with resume, in a kept shard)."""


def jpeg_size(jpg: bytes) -> tuple[int, int]:
    """(width, height) of RGB JPEG bytes, reading the header only; ValueError for anything else."""
    try:
        with Image.open(io.BytesIO(jpg)) as im:
            if im.format != "JPEG" or im.mode != "RGB":
                raise ValueError(f"sample image must be an RGB JPEG, got {im.format} {im.mode}")
            return im.size
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"sample image is not a readable JPEG: {e}") from None


@dataclass(frozen=True)
class WriterSettings:
    """What the writer needs, built at the command's edge: shard size limits (`shards.*`), the lookalike
    reference every catalogue is joined with (`catalog.references`), and the resolved config to record
    beside the output as provenance (config.yaml and the manifest's `config`)."""

    max_samples: int = 1000
    max_bytes: int = 268435456
    reference: Any = None  # a lookalikes.Reference; None = the packaged one
    record: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> WriterSettings:
        s = cls(max_samples=int(cfg.shards.max_samples), max_bytes=int(cfg.shards.max_bytes),
                reference=reference_from_config(cfg), record=to_dict(cfg))
        if s.max_samples < 1 or s.max_bytes < 1:
            raise ValueError("shards.max_samples and shards.max_bytes must be positive")
        return s


class DatasetWriter:
    """Write samples into `{split}-{index:06d}.tar` shards in `out_dir`, then the side files and manifest.

    Shards close at `settings.max_samples` samples or before passing `settings.max_bytes` bytes
    (a single larger sample still gets its own shard). Without `resume`, a data set already in `out_dir`
    is replaced (its manifest is removed first, so it is never half-valid). With `resume`, complete
    shards are kept, their keys count as written, and new shards are numbered after them.
    """

    def __init__(self, out_dir: str | os.PathLike, labels: list[str], species: Iterable[Species],
                 settings: WriterSettings, *, source: str = "", on_shard_closed: ShardCallback | None = None,
                 resume: bool = False):
        self.out_dir = Path(out_dir)
        self.labels = list(labels)
        self.settings = settings
        self.source = source
        self.on_shard_closed = on_shard_closed
        self.max_samples, self.max_bytes = settings.max_samples, settings.max_bytes
        if self.max_samples < 1 or self.max_bytes < 1:
            raise ValueError("shards.max_samples and shards.max_bytes must be positive")
        self.class_of = self._check_labels(self.labels)
        # every data set's catalogue is joined with the lookalike reference (docs/lookalikes.md)
        reference = settings.reference if settings.reference is not None else load_references([])
        self.species = self._check_species(merge_catalogue(species, reference).values())
        self._open: dict[str, ShardFile] = {}
        self._next_index: dict[str, int] = {}
        self._keys: set[str] = set()
        self.written: dict[str, int] = {}  # samples written by this writer, per split
        self.closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._prepare(resume)

    # ---- setup ----
    @staticmethod
    def _check_labels(labels: list[str]) -> dict[str, int]:
        if not labels:
            raise ValueError("a data set needs at least one label")
        for lab in labels:
            if not isinstance(lab, str) or not lab or slugify(lab) != lab:
                raise ValueError(f"label {lab!r} is not a slug like 'agaricus_arvensis' (use catalog.slugify)")
        if len(set(labels)) != len(labels):
            raise ValueError("labels contain duplicates")
        return {lab: i for i, lab in enumerate(labels)}

    def _check_species(self, species: Iterable[Species]) -> dict[str, Species]:
        by_label = {s.label: s for s in species}
        missing = [lab for lab in self.labels if lab not in by_label]
        if missing:
            raise ValueError(f"no species record for labels {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                             "give a Species (facts may be unknown) for every label")
        return {lab: by_label[lab] for lab in self.labels}

    def _prepare(self, resume: bool) -> None:
        indices = self.out_dir / CLASS_INDICES
        if resume and indices.is_file() and load_class_indices(indices) != self.labels:
            raise ValueError(f"cannot resume in '{self.out_dir}': its {CLASS_INDICES} holds other labels "
                             "than this writer's (same labels in the same order are needed)")
        for p in self.out_dir.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_file():
                p.unlink()  # leftovers of a killed writer: never part of a data set
        (self.out_dir / MANIFEST).unlink(missing_ok=True)  # the data set is incomplete from now on
        save_class_indices(indices, self.labels)  # early, so a resumed run can check it
        for path in list_shards(self.out_dir):
            split, index = parse_shard_name(path.name)  # type: ignore[misc]
            if resume:
                self._keys.update(iter_keys(path))
                self._next_index[split] = max(self._next_index.get(split, 0), index + 1)
            else:
                path.unlink()

    # ---- writing ----
    def __contains__(self, key: str) -> bool:
        return key in self._keys

    @property
    def keys(self) -> frozenset[str]:
        """Every key written so far, including those of shards kept by resume."""
        return frozenset(self._keys)

    def write(self, split: str, key: str, jpg: bytes, label: str, meta: dict[str, Any]) -> None:
        """Add one sample. `meta` holds the other json fields; label and cls are added here, names and
        edibility filled from the catalogue when missing, width/height read from the JPEG."""
        if self.closed:
            raise RuntimeError("DatasetWriter is closed")
        if not SPLIT_RE.match(split):
            raise ValueError(f"split {split!r} must be lower-case letters/digits, like 'train' or 'val'")
        if not KEY_RE.match(key):
            raise ValueError(f"key {key!r} must be 1-200 characters of letters, digits, '_' or '-' "
                             "(no dots or slashes: webdataset splits member names at the first dot)")
        if key in self._keys:
            raise DuplicateKeyError(f"key {key!r} was already written")
        if label not in self.class_of:
            raise ValueError(f"unknown label {label!r}; the data set's labels are fixed when the writer is made")
        record = self._json_record(jpg, label, meta)
        members = {"cls": str(self.class_of[label]).encode("ascii"), "jpg": jpg,
                   "json": json.dumps(record, sort_keys=True, ensure_ascii=False, default=_plain).encode("utf-8")}
        shard = self._shard_for(split, sample_bytes(members))
        shard.add(key, members)
        self._keys.add(key)
        self.written[split] = self.written.get(split, 0) + 1
        if len(shard.keys) >= self.max_samples:
            self._close_shard(split)

    def _json_record(self, jpg: bytes, label: str, meta: dict[str, Any]) -> dict[str, Any]:
        sp = self.species[label]
        rec = dict(meta)
        for reserved in ("label", "cls"):
            if reserved in rec and rec[reserved] != (label if reserved == "label" else self.class_of[label]):
                raise ValueError(f"meta[{reserved!r}]={rec[reserved]!r} disagrees with the sample's label {label!r}")
        rec["label"] = label
        rec.pop("cls", None)
        for name in ("scientific_name", "common_name", "edibility"):
            if rec.get(name) in (None, ""):
                rec[name] = getattr(sp, name)
        if rec.get("source") in (None, ""):
            rec["source"] = self.source or sp.source
        rec.setdefault("url", None)
        if rec.get("sha256") in (None, ""):
            rec["sha256"] = hashlib.sha256(jpg).hexdigest()
        width, height = jpeg_size(jpg)
        for name, actual in (("width", width), ("height", height)):
            if rec.get(name) is None:
                rec[name] = actual
            elif rec[name] != actual:
                raise ValueError(f"meta[{name!r}]={rec[name]} but the JPEG is {width}x{height}; width/height "
                                 "describe the stored image (keep original sizes under other names)")
        if rec["edibility"] not in EDIBILITY:
            raise ValueError(f"edibility {rec['edibility']!r} is not one of {EDIBILITY}")
        missing = [k for k in REQUIRED_META if k not in rec]
        if missing:
            raise ValueError(f"sample json lacks {missing}")
        return rec

    def _shard_for(self, split: str, nbytes: int) -> ShardFile:
        shard = self._open.get(split)
        if shard is not None and shard.keys and shard.predicted_size(nbytes) > self.max_bytes:
            self._close_shard(split)
            shard = None
        if shard is None:
            index = self._next_index.get(split, 0)
            self._next_index[split] = index + 1
            shard = self._open[split] = ShardFile(self.out_dir / shard_name(split, index))
        return shard

    def _close_shard(self, split: str) -> None:
        shard = self._open.pop(split)
        path = shard.commit()
        if self.on_shard_closed is not None:
            self.on_shard_closed(split, path, list(shard.keys))

    # ---- finishing ----
    def close(self) -> dict[str, Any]:
        """Close open shards, write class_indices.json, species.json, config.yaml, then manifest.json."""
        if self.closed:
            raise RuntimeError("DatasetWriter is already closed")
        for split in sorted(self._open):
            self._close_shard(split)
        self.closed = True
        save_class_indices(self.out_dir / CLASS_INDICES, self.labels)
        save_species(self.out_dir / SPECIES, self.species.values())
        save_config(OmegaConf.create(self.settings.record), self.out_dir)
        manifest = build_manifest(self.out_dir, config=dict(self.settings.record), source=self.source)
        write_manifest(self.out_dir, manifest)
        return manifest

    def abort(self) -> None:
        """Drop open (incomplete) shards; complete ones stay for a later resume, and no manifest is written."""
        for shard in self._open.values():
            shard.abort()
        self._open.clear()
        self.closed = True

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self.closed:
                self.close()
        else:
            self.abort()


def assign_splits(keys_by_label: dict[str, list[str]], val_fraction: float) -> dict[str, str]:
    """key → "train" | "val", deterministic by key hash and stratified per label.

    Each label's keys are ranked by sha256(key); the first round(n * val_fraction) go to val, clamped so a
    label with >= 2 keys has at least one in each split (when val_fraction > 0). Input order never matters.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out: dict[str, str] = {}
    for keys in keys_by_label.values():
        ranked = sorted(set(keys), key=lambda k: (hashlib.sha256(k.encode("utf-8")).digest(), k))
        n = len(ranked)
        n_val = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        elif n < 2:
            n_val = 0
        for i, k in enumerate(ranked):
            if k in out:
                raise ValueError(f"key {k!r} appears under two labels")
            out[k] = "val" if i < n_val else "train"
    return out
