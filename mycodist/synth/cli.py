"""`mycodist synth --out DIR [synth.species=K synth.per_species=N synth.size=S ...]`.

Writes the embedded data set: WebDataset shards through the shard writer (synth.format=shards, the
default) or Kaggle-style class folders DIR/<label>/<key>.jpg plus species.json (synth.format=folders).
The resolved config is saved beside the output. An existing non-empty folder is only ever replaced when
it is an earlier synth output made with the same settings, so a typo in --out never destroys data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mycodist.atomic import atomic_write_bytes
from mycodist.catalog import CLASS_INDICES, SPECIES, save_class_indices, save_species
from mycodist.config import CONFIG_FILENAME, save_config, select
from mycodist.errors import UsageError
from mycodist.lookalikes import merge_catalogue, reference_from_config, reference_from_rows
from mycodist.synth.generate import SynthSettings, generate_dataset, photo_key
from mycodist.synth.species import make_catalogue, reference_rows

# files a fresh checkout keeps in an otherwise empty output folder (shards/README.md)
IGNORABLE = ("README", "README.md", "README.txt", ".gitignore", ".gitkeep")
# config keys besides synth.* that change what lands in the folder (synth.workers never does)
OUTPUT_KEYS = ("shards.val_fraction", "shards.max_samples", "shards.max_bytes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: data.shards when it is a plain folder path)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _out_dir(args: argparse.Namespace, cfg: DictConfig) -> Path:
    out = args.out
    if out is None:
        default = str(cfg.data.shards)
        if any(ch in default for ch in "*?[{") or "://" in default:
            raise UsageError(f"data.shards={default!r} is a pattern or URL, not a folder; pass --out DIR")
        out = default
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out '{path}' is a file; give a folder path (new or empty)")
    return path


def output_settings(cfg: DictConfig | dict) -> dict[str, Any]:
    """The settings that decide an output's bytes: synth.* except workers, plus the shard layout keys."""
    c = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    synth = dict(OmegaConf.to_container(c.synth, resolve=True)) if "synth" in c else {}  # type: ignore[arg-type]
    synth.pop("workers", None)
    out = {f"synth.{k}": v for k, v in synth.items()}
    if out.get("synth.format", "shards") == "shards":
        out.update({k: select(c, k) for k in OUTPUT_KEYS})  # also from a folder written before a key rename
    return out


def _check_replaceable(out: Path, cfg: DictConfig) -> None:
    """Refuse a non-empty folder unless it holds an earlier synth output made with the same settings."""
    if not out.is_dir():
        return
    contents = [p for p in out.iterdir() if p.name not in IGNORABLE]
    if not contents:
        return
    how = "choose a new or empty --out folder, or delete this one"
    saved = out / CONFIG_FILENAME
    try:
        previous = OmegaConf.load(saved) if saved.is_file() else None
    except Exception:
        previous = None
    if previous is None or not _made_by_synth(out):
        raise UsageError(f"'{out}' is not empty and is not an earlier synth output; {how} (nothing was written)")
    old, new = output_settings(previous), output_settings(cfg)
    diff = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise UsageError(f"'{out}' holds synth output made with other settings ({'; '.join(diff)}); {how}")


def _made_by_synth(out: Path) -> bool:
    for name, check in ((SPECIES, lambda d: all(v.get("source") == "synth" for v in d.values())),
                        ("manifest.json", lambda d: d.get("source") == "synth")):
        path = out / name
        if path.is_file():
            try:
                if not check(json.loads(path.read_text())):
                    return False
            except (OSError, ValueError, AttributeError):
                return False
    return True


def _write_shards(out: Path, cfg: DictConfig, settings: SynthSettings, species: list, photos,
                  bar: tqdm) -> dict[str, int]:
    from mycodist.shards.writer import DatasetWriter, WriterSettings, assign_splits

    labels = [s.label for s in species]
    # keys are known before any photo is rendered, so splits are too
    keys = {lab: [photo_key(lab, i) for i in range(settings.per_species)] for lab in labels}
    splits = assign_splits(keys, float(cfg.shards.val_fraction))
    by_label = {s.label: s for s in species}
    counts: dict[str, int] = {}
    with DatasetWriter(out, labels, species, WriterSettings.from_config(cfg), source="synth") as writer:
        for label, key, jpg in photos:
            sp = by_label[label]
            split = splits[key]
            writer.write(split, key, jpg, label, {
                "scientific_name": sp.scientific_name, "common_name": sp.common_name, "source": "synth",
                "url": None, "sha256": hashlib.sha256(jpg).hexdigest(), "edibility": sp.edibility,
            })
            counts[split] = counts.get(split, 0) + 1
            bar.update(1)
    return counts


def _write_folders(out: Path, cfg: DictConfig, species: list, photos, bar: tqdm) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for label, key, jpg in photos:
        atomic_write_bytes(out / label / f"{key}.jpg", jpg)
        n += 1
        bar.update(1)
    save_species(out / SPECIES, species)
    save_class_indices(out / CLASS_INDICES, [s.label for s in species])
    save_config(cfg, out)
    return {"images": n}


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    try:
        settings = SynthSettings.from_config(cfg.synth)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = _out_dir(args, cfg)
    _check_replaceable(out, cfg)
    species, photos = generate_dataset(settings)
    # the catalogue's own pairs travel as its reference, joined with the packaged one
    ref = reference_from_config(cfg)
    ref.add(reference_from_rows(reference_rows(make_catalogue(settings.species, settings.seed)), "synth"))
    species = list(merge_catalogue(species, ref).values())
    total = settings.species * settings.per_species
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc="synth", disable=True if args.quiet else None, file=sys.stderr) as bar:
        if settings.format == "shards":
            counts = _write_shards(out, cfg, settings, species, photos, bar)
        else:
            counts = _write_folders(out, cfg, species, photos, bar)
    seconds = time.perf_counter() - start
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"synth: {total} photos of {settings.species} species at {settings.size} px ({detail}) as "
          f"{settings.format} in '{out}', {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} img/s, "
          f"{settings.resolved_workers()} processes)")
    return 0

