"""`mycodist merge-manifests OUT IN1 IN2 ...`: join several data sets (e.g. crawl workers) into one.

Class lists are unioned and re-numbered in label order; a shard whose class numbers stay the same is
hard-linked (or copied) under its new name, others are rewritten with the new `cls` values. Species
facts must agree: two inputs naming the same label differently, or with another edibility, is an error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mycodist.atomic import TMP_PREFIX
from mycodist.catalog import CLASS_INDICES, SPECIES, Species, load_species, save_class_indices, save_species
from mycodist.config import save_config, to_dict
from mycodist.errors import UsageError
from mycodist.lookalikes import merge_catalogue, most_dangerous, reference_from_config
from mycodist.shards.manifest import MANIFEST, Manifest, build_manifest, read_manifest, write_manifest
from mycodist.shards.tarshard import ShardFile, iter_keys, iter_samples, list_shards, shard_name

IDENTITY_FIELDS = ("scientific_name", "common_name", "family")  # edibility: the most dangerous wins
_EMPTY = (None, "", "unknown")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="new data-set folder (must not hold a data set yet)")
    parser.add_argument("inputs", nargs="+", metavar="IN", help="data-set folders to join, in this order")
    parser.add_argument("--copy", action="store_true", help="copy shards instead of hard-linking them")


def _sources(sp: Species, where: str) -> dict[str, str]:
    """Each input's edibility sources, named after the input so two inputs' levels both stay visible."""
    given = sp.edibility_sources or {sp.source or "catalogue": sp.edibility}
    return {k if k.startswith("reference:") else f"{k} ({where})": v for k, v in given.items()}


def merge_species(catalogues: list[tuple[str, dict[str, Species]]]) -> tuple[dict[str, Species], list[str]]:
    """Union of the inputs' species; returns (merged, notes). Conflicting names raise UsageError; on
    edibility the most dangerous level wins and every input's level is kept in `edibility_sources`."""
    merged: dict[str, Species] = {}
    origin: dict[str, str] = {}
    conflicts, notes = [], []
    for where, catalogue in catalogues:
        for label, sp in catalogue.items():
            if label not in merged:
                merged[label] = Species.from_json(label, sp.to_json())
                merged[label].edibility_sources = _sources(sp, where)
                origin[label] = where
                continue
            cur = merged[label]
            cur.edibility_sources.update(_sources(sp, where))
            level = most_dangerous(cur.edibility_sources.values())
            if level != cur.edibility and cur.edibility != "unknown" and sp.edibility != "unknown":
                notes.append(f"'{label}' edibility: {cur.edibility!r} in {origin[label]} but {sp.edibility!r} in "
                             f"{where}; kept the more dangerous {level!r}")
            cur.edibility = level
            cur.lookalike_notes = {**sp.lookalike_notes, **cur.lookalike_notes}
            cur.lookalike_record = cur.lookalike_record or sp.lookalike_record
            for name in IDENTITY_FIELDS:
                a, b = getattr(cur, name), getattr(sp, name)
                if a in _EMPTY:
                    setattr(cur, name, b)
                elif b not in _EMPTY and a != b:
                    conflicts.append(f"'{label}' {name}: {a!r} in {origin[label]} but {b!r} in {where}")
            cur.lookalikes = list(dict.fromkeys(cur.lookalikes + sp.lookalikes))
            if sp.source and sp.source not in cur.source.split(", "):
                cur.source = f"{cur.source}, {sp.source}" if cur.source else sp.source
            for k, v in sp.facts.items():
                if k not in cur.facts:
                    cur.facts[k] = v
                elif cur.facts[k] != v:
                    notes.append(f"'{label}' fact '{k}' differs in {where}; kept the one from {origin[label]}")
    if conflicts:
        raise UsageError("inputs disagree about species facts, fix the catalogues first: " + "; ".join(conflicts))
    return merged, notes


def _check_keys(manifests: list[Manifest]) -> None:
    seen: dict[str, str] = {}
    dups = []
    for m in manifests:
        for shard in m.shards:
            for key in iter_keys(shard.path):
                where = f"{shard.path}"
                if key in seen:
                    dups.append(f"'{key}' in {seen[key]} and {where}")
                seen[key] = where
    if dups:
        raise UsageError(f"{len(dups)} sample key(s) appear in more than one input (the inputs overlap): "
                         + "; ".join(dups[:5]))


def _prepare_out(out: Path, inputs: list[Path]) -> None:
    resolved = out.resolve()
    if any(resolved == i.resolve() for i in inputs):
        raise UsageError(f"OUT '{out}' is also an input; give a new folder first: merge-manifests OUT IN1 IN2 ...")
    if (out / MANIFEST).exists():
        raise UsageError(f"'{out}' already holds a data set ({MANIFEST}); give a new or empty folder as OUT")
    out.mkdir(parents=True, exist_ok=True)
    for p in list_shards(out) + sorted(out.glob(TMP_PREFIX + "*")):
        p.unlink()  # shards of an interrupted merge (there is no manifest): never a data set


def _place(src: Path, dst: Path, link: bool) -> None:
    """Put an unchanged shard at `dst` atomically: hard link when allowed, else copy; temp name, then rename."""
    tmp = dst.with_name(f"{TMP_PREFIX}{dst.name}.{uuid.uuid4().hex[:8]}")
    try:
        if link:
            try:
                os.link(src, tmp)
            except OSError:  # other file system, or links not allowed
                shutil.copyfile(src, tmp)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _rewrite(src: Path, dst: Path, new_cls: list[int]) -> None:
    shard = ShardFile(dst)
    try:
        for key, members in iter_samples(src):
            members = dict(members)
            members["cls"] = str(new_cls[int(members["cls"])]).encode("ascii")
            shard.add(key, members)
        shard.commit()
    except BaseException:
        shard.abort()
        raise


def merge_datasets(out: str | Path, inputs: list[str | Path], cfg: DictConfig, *, link: bool = True) -> dict[str, Any]:
    """Join `inputs` into a new data set at `out`; returns its manifest."""
    out, paths = Path(out), [Path(i) for i in inputs]
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise UsageError("an input is given twice")
    _prepare_out(out, paths)
    manifests = [read_manifest(p, check_hashes=True) for p in paths]
    species, notes = merge_species([(str(m.root), load_species(m.root / SPECIES)) for m in manifests])
    species = merge_catalogue(species, reference_from_config(cfg))
    for m in manifests:
        missing = [lab for lab in m.labels if lab not in species]
        if missing:
            raise UsageError(f"'{m.root}': {SPECIES} lacks labels {missing[:5]}; run `mycodist verify {m.root}`")
    _check_keys(manifests)
    labels = sorted({lab for m in manifests for lab in m.labels})
    index = {lab: i for i, lab in enumerate(labels)}
    next_index: Counter[str] = Counter()
    merged_from = []
    for m in manifests:
        new_cls = [index[lab] for lab in m.labels]
        unchanged = new_cls == list(range(len(new_cls)))
        for shard in m.shards:
            dst = out / shard_name(shard.split, next_index[shard.split])
            next_index[shard.split] += 1
            if unchanged:
                _place(shard.path, dst, link)
            else:
                _rewrite(shard.path, dst, new_cls)
        merged_from.append({"path": str(m.root), "source": m.data.get("source", ""), "shards": len(m.shards),
                            "samples": m.samples(), "classes_renumbered": not unchanged})
    save_class_indices(out / CLASS_INDICES, labels)
    save_species(out / SPECIES, [species[lab] for lab in labels])
    save_config(cfg, out)
    sources = list(dict.fromkeys(m.data.get("source", "") for m in manifests if m.data.get("source")))
    manifest = build_manifest(out, config=to_dict(cfg), source=", ".join(sources),
                              extra={"merged_from": merged_from, "merge_notes": notes})
    write_manifest(out, manifest)
    return manifest


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    manifest = merge_datasets(args.out, args.inputs, cfg, link=not args.copy)
    for note in manifest["merge_notes"]:
        print(f"note: {note}")
    splits = ", ".join(f"{s} {t['samples']}" for s, t in sorted(manifest["totals"].items()))
    print(f"merged {len(args.inputs)} data sets → {args.out}: {len(manifest['shards'])} shards, "
          f"{manifest['samples']} samples ({splits}), {manifest['num_classes']} classes")
    return 0
