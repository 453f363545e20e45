"""manifest.json: what a complete data set holds, built by scanning the finished shards on disk.

It is written last, after every shard and side file is in place, so its presence marks a complete data
set; `read_manifest` is the check a loader runs before trusting any shard (docs/shards.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mycodist import __version__
from mycodist.atomic import atomic_write_json
from mycodist.catalog import CLASS_INDICES, SPECIES, load_class_indices
from mycodist.config import CONFIG_FILENAME
from mycodist.errors import UsageError
from mycodist.shards.tarshard import list_shards, parse_shard_name, split_member

MANIFEST = "manifest.json"
FORMAT = "mycodist-webdataset"
FORMAT_VERSION = 1
SIDE_FILES = (CLASS_INDICES, SPECIES, CONFIG_FILENAME)
SHARD_FIELDS = {"file": str, "split": str, "index": int, "samples": int, "bytes": int, "sha256": str}
_CHUNK = 1 << 20


class ManifestError(UsageError):
    """The data set is incomplete or does not match its manifest; the message lists every problem."""


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def scan_shard(path: Path) -> dict[str, Any]:
    """One manifest entry (file, split, index, samples, bytes, sha256) plus per-class counts."""
    parsed = parse_shard_name(path.name)
    if parsed is None:
        raise ValueError(f"'{path.name}' is not a shard name like train-000000.tar")
    size, digest = file_digest(path)
    keys: set[str] = set()
    classes: Counter[str] = Counter()
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_member(info.name) or (info.name, "")
            keys.add(key)
            if ext == "cls":
                f = tar.extractfile(info)
                classes[(f.read() if f else b"").decode("ascii", "replace").strip()] += 1
    return {"file": path.name, "split": parsed[0], "index": parsed[1], "samples": len(keys), "bytes": size,
            "sha256": digest, "class_counts": dict(classes)}


def build_manifest(root: str | os.PathLike, config: dict | None = None, source: str = "",
                   extra: dict | None = None) -> dict[str, Any]:
    """Scan the complete shards and side files in `root` and return the manifest (not yet written)."""
    root = Path(root)
    labels = load_class_indices(root / CLASS_INDICES)
    shards, totals = [], {}
    for path in list_shards(root):
        entry = scan_shard(path)
        counts = entry.pop("class_counts")
        shards.append(entry)
        t = totals.setdefault(entry["split"], {"shards": 0, "samples": 0, "bytes": 0, "class_counts": Counter()})
        t["shards"] += 1
        t["samples"] += entry["samples"]
        t["bytes"] += entry["bytes"]
        t["class_counts"].update(counts)
    for t in totals.values():
        t["class_counts"] = {k: t["class_counts"][k] for k in sorted(t["class_counts"], key=_class_sort_key)}
    files = {}
    for name in SIDE_FILES:
        if (root / name).is_file():
            size, digest = file_digest(root / name)
            files[name] = {"bytes": size, "sha256": digest}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mycodist_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
        "num_classes": len(labels),
        "samples": sum(t["samples"] for t in totals.values()),
        "bytes": sum(t["bytes"] for t in totals.values()),
        "totals": totals,
        "shards": shards,
        "files": files,
        "config": config or {},
    }
    if extra:
        manifest.update(extra)
    return manifest


def _class_sort_key(k: str) -> tuple[int, str]:
    return (int(k), "") if k.isdigit() else (1 << 30, k)


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(root) / MANIFEST
    atomic_write_json(path, manifest)
    return path


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    split: str
    index: int
    samples: int
    bytes: int
    sha256: str

    @property
    def file(self) -> str:
        return self.path.name


@dataclass
class Manifest:
    """A checked manifest: its raw JSON, the class labels and the shard list with absolute paths."""

    root: Path
    data: dict[str, Any]
    labels: list[str]
    shards: list[ShardInfo] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def splits(self) -> list[str]:
        return sorted({s.split for s in self.shards})

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def paths(self, split: str) -> list[str]:
        """Shard paths of one split, in index order: what a WebDataset pipeline is given."""
        return [str(s.path) for s in self.shards_of(split)]

    def samples(self, split: str | None = None) -> int:
        return sum(s.samples for s in self.shards if split is None or s.split == split)

    def class_counts(self, split: str) -> dict[int, int]:
        raw = self.data["totals"].get(split, {}).get("class_counts", {})
        return {int(k): int(v) for k, v in raw.items()}


def check_manifest(root: str | os.PathLike, *, check_files: bool = True,
                   check_hashes: bool = False) -> tuple[Manifest | None, list[str]]:
    """Parse and check a data set's manifest; returns it (None when unusable) and a list of problems.

    check_files: every listed shard and side file exists with the listed size (cheap, a stat each);
    check_hashes: also re-hash every file (reads all bytes; `mycodist verify` does this).
    """
    root = Path(root)
    if not root.is_dir():
        return None, [f"'{root}' is not a folder"]
    path = root / MANIFEST
    if not path.is_file():
        return None, [f"no {MANIFEST} in '{root}': not a complete data set (a writer may have been interrupted; "
                      "rerun it, with resume if it supports it)"]
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"{MANIFEST} cannot be parsed: {e}"]
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None, [f"{MANIFEST} is not a {FORMAT} manifest"]
    if data.get("format_version") != FORMAT_VERSION:
        return None, [f"{MANIFEST} has format_version {data.get('format_version')!r}; this mycodist reads "
                      f"{FORMAT_VERSION}"]
    problems: list[str] = []
    try:
        labels = load_class_indices(root / CLASS_INDICES)
    except UsageError as e:
        return None, [str(e)]
    if data.get("num_classes") != len(labels):
        problems.append(f"{MANIFEST} says {data.get('num_classes')} classes, {CLASS_INDICES} has {len(labels)}")
    shards: list[ShardInfo] = []
    seen: set[str] = set()
    for i, entry in enumerate(data.get("shards") or []):
        bad = [k for k, t in SHARD_FIELDS.items() if not isinstance(entry.get(k) if isinstance(entry, dict) else None, t)]
        if bad:
            problems.append(f"{MANIFEST} shard entry {i} lacks or mistypes {', '.join(bad)}")
            continue
        name = entry["file"]
        if parse_shard_name(name) != (entry["split"], entry["index"]):
            problems.append(f"{MANIFEST} shard entry {i}: file '{name}' does not match split/index")
            continue
        if name in seen:
            problems.append(f"{MANIFEST} lists '{name}' twice")
            continue
        seen.add(name)
        shards.append(ShardInfo(root / name, entry["split"], entry["index"], entry["samples"], entry["bytes"],
                                entry["sha256"]))
    if not shards:
        problems.append(f"{MANIFEST} lists no shards")
    files = data.get("files") or {}
    for name in SIDE_FILES:
        if name not in files:
            problems.append(f"{MANIFEST} does not record {name}")
    if check_files or check_hashes:
        for s in shards:
            problems += _check_file(s.path, s.bytes, s.sha256, check_hashes)
        for name, info in files.items():
            if isinstance(info, dict):
                problems += _check_file(root / name, info.get("bytes"), info.get("sha256"), True)
    return Manifest(root=root, data=data, labels=labels, shards=shards), problems


def _check_file(path: Path, size: Any, digest: Any, check_hash: bool) -> list[str]:
    if not path.is_file():
        return [f"{path.name}: missing"]
    actual = path.stat().st_size
    if actual != size:
        return [f"{path.name}: {actual} bytes, manifest says {size}"]
    if check_hash and file_digest(path)[1] != digest:
        return [f"{path.name}: sha256 differs from the manifest (file changed or corrupted)"]
    return []


def read_manifest(root: str | os.PathLike, *, check_hashes: bool = False) -> Manifest:
    """The manifest of a complete data set, after checking it and every listed file's size.

    Raises ManifestError (a UsageError) listing every problem; a folder without manifest.json, such as
    one a killed writer left, is never accepted.
    """
    manifest, problems = check_manifest(root, check_files=True, check_hashes=check_hashes)
    if problems or manifest is None:
        raise ManifestError(f"data set '{root}' is not usable: " + "; ".join(problems) +
                            " (run `mycodist verify` for a full check)")
    return manifest
