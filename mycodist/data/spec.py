"""What a data set is, for the loaders: its labels, species and, per split, the shards with exact counts.

Exact per-shard sample counts are what make every rank's epoch the same length, so they come from
`manifest.json` (the shard contract) when there is one, and otherwise from counting the tar members
once (cheap for local files, a full read for remote ones: give a manifest for remote data sets).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field

from omegaconf import DictConfig

from mycodist.catalog import CLASS_INDICES, SPECIES, Species, load_class_indices, load_species
from mycodist.data.urls import expand_pattern, is_local, join_url, local_path, open_url, read_bytes
from mycodist.errors import UsageError
from mycodist.shards.manifest import FORMAT, MANIFEST, ManifestError, check_manifest
from mycodist.shards.tarshard import split_member

log = logging.getLogger("mycodist.data")

SPLITS = ("train", "val")
_SPLIT_OF_NAME = re.compile(r"^(?P<split>[A-Za-z]+)-\d+\.tar$")


@dataclass(frozen=True)
class ShardInfo:
    url: str
    samples: int


@dataclass
class DataSpec:
    """Everything a loader needs to lay out an epoch; small and picklable (it travels to workers)."""

    labels: list[str]
    species: dict[str, Species]
    train_shards: list[ShardInfo]
    val_shards: list[ShardInfo]
    source: str
    from_manifest: bool = True
    class_counts: dict[str, dict[int, int]] = field(default_factory=dict)  # split -> class -> count, if known

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def num_train(self) -> int:
        return sum(s.samples for s in self.train_shards)

    @property
    def num_val(self) -> int:
        return sum(s.samples for s in self.val_shards)

    @property
    def train_urls(self) -> list[str]:
        return [s.url for s in self.train_shards]

    @property
    def val_urls(self) -> list[str]:
        return [s.url for s in self.val_shards]

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in SPLITS:
            raise UsageError(f"unknown split '{split}'; use one of {SPLITS}")
        return self.train_shards if split == "train" else self.val_shards

    @classmethod
    def from_config(cls, cfg: DictConfig) -> DataSpec:
        return cls.from_source(str(cfg.data.shards))

    @classmethod
    def from_source(cls, source: str) -> DataSpec:
        """A folder with manifest.json, a manifest URL, or a glob/brace pattern/URL list of shards."""
        source = source.strip()
        if not source:
            raise UsageError("data.shards is empty; set it to a shard folder, e.g. data.shards=demo/shards")
        if is_local(source) and os.path.isdir(local_path(source)):
            manifest = os.path.join(local_path(source), MANIFEST)
            if not os.path.isfile(manifest):
                raise UsageError(f"'{source}' has no {MANIFEST}; write shards with `mycodist synth`/`ingest`, "
                                 f"or pass a pattern like '{source}/train-*.tar'")
            return cls._from_manifest(manifest, source)
        if source.endswith(MANIFEST):
            return cls._from_manifest(source, source)
        return cls._from_pattern(source)

    @classmethod
    def _from_manifest(cls, manifest_url: str, source: str) -> DataSpec:
        if is_local(manifest_url):
            return cls._from_local_manifest(os.path.dirname(local_path(manifest_url)) or ".", source)
        try:
            manifest = json.loads(read_bytes(manifest_url))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read manifest '{manifest_url}': {e}") from None
        entries = manifest.get("shards") if isinstance(manifest, dict) else None
        if not isinstance(entries, list) or manifest.get("format") != FORMAT:
            raise UsageError(f"'{manifest_url}' is not a {FORMAT} manifest")
        by_split: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
        for e in entries:
            try:
                split, name, n = str(e["split"]), str(e["file"]), int(e["samples"])
            except (KeyError, TypeError, ValueError):
                raise UsageError(f"'{manifest_url}': a shard entry lacks file/split/samples: {e!r}") from None
            by_split.setdefault(split, []).append(ShardInfo(join_url(manifest_url, name), n))
        labels, species = _catalogue(manifest_url)
        counts = {split: {int(k): int(v) for k, v in (t.get("class_counts") or {}).items()}
                  for split, t in (manifest.get("totals") or {}).items() if isinstance(t, dict)}
        return cls(labels=labels, species=species, train_shards=by_split["train"], val_shards=by_split["val"],
                   source=source, from_manifest=True, class_counts=counts)

    @classmethod
    def _from_local_manifest(cls, root: str, source: str) -> DataSpec:
        """The shards package's checks; a missing or resized shard is logged here and counted when read,
        so one lost shard does not stop a run (data.max_bad_fraction decides that)."""
        manifest, problems = check_manifest(root, check_files=True)
        if manifest is None:
            raise ManifestError(f"data set '{root}' is not usable: " + "; ".join(problems))
        for p in problems:
            log.warning("data set '%s': %s", root, p)
        by_split: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
        for s in manifest.shards:
            by_split.setdefault(s.split, []).append(ShardInfo(str(s.path), s.samples))
        sp_path = os.path.join(root, SPECIES)
        species = load_species(sp_path) if os.path.isfile(sp_path) else {}
        return cls(labels=manifest.labels, species=species, train_shards=by_split["train"],
                   val_shards=by_split["val"], source=source, from_manifest=True,
                   class_counts={split: manifest.class_counts(split) for split in manifest.splits})

    @classmethod
    def _from_pattern(cls, source: str) -> DataSpec:
        urls = expand_pattern(source)
        if not urls or all(is_local(u) and not os.path.exists(local_path(u)) for u in urls):
            raise UsageError(f"data.shards='{source}' matches no shard; give a data set folder, a manifest, "
                             f"or a pattern like 'shards/train-*.tar'")
        by_split: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
        for url in urls:
            m = _SPLIT_OF_NAME.match(os.path.basename(url.split("?")[0]))
            split = m.group("split") if m and m.group("split") in SPLITS else "train"
            by_split[split].append(ShardInfo(url, count_samples(url)))
        labels, species = _catalogue(urls[0])
        return cls(labels=labels, species=species, train_shards=by_split["train"], val_shards=by_split["val"],
                   source=source, from_manifest=False)


def _catalogue(beside: str) -> tuple[list[str], dict[str, Species]]:
    """class_indices.json (required: it fixes the class numbers) and species.json (optional) beside `beside`."""
    ci_url, sp_url = join_url(beside, CLASS_INDICES), join_url(beside, SPECIES)
    if is_local(ci_url):
        labels = load_class_indices(local_path(ci_url))
        species = load_species(local_path(sp_url)) if os.path.isfile(local_path(sp_url)) else {}
        return labels, species
    try:
        raw = json.loads(read_bytes(ci_url))
        labels = [str(v) for _, v in sorted((int(k), v) for k, v in raw.items())]
    except Exception as e:
        raise UsageError(f"cannot read '{ci_url}': {e}; the shards need their {CLASS_INDICES}") from None
    try:
        species = {k: Species.from_json(k, v) for k, v in json.loads(read_bytes(sp_url)).items()}
    except Exception:
        species = {}
    return labels, species


def count_samples(url: str) -> int:
    """Distinct sample keys in a tar; a missing or unreadable shard counts 0 (its loss is reported at read time)."""
    keys: set[str] = set()
    try:
        if is_local(url):
            with tarfile.open(local_path(url), "r:") as tf:
                names = tf.getnames()
        else:
            with open_url(url) as f, tarfile.open(fileobj=f, mode="r|") as tf:
                names = [m.name for m in tf]
    except (OSError, tarfile.TarError):
        return 0
    for name in names:
        parts = split_member(name)
        if parts is not None and not os.path.basename(name).startswith("__"):
            keys.add(parts[0])
    return len(keys)
