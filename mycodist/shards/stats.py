"""`mycodist stats OUT --report DIR`: image-size and class-balance report of a data set.

The original project's image-size notebook as a command: width/height/aspect histograms and class
balance as PNG plots, a summary.json for scripts and a short report.md for people.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from mycodist.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from mycodist.catalog import SPECIES, load_species
from mycodist.lookalikes import DANGER, edibility_conflict
from mycodist.config import save_config
from mycodist.errors import UsageError
from mycodist.shards.manifest import Manifest, read_manifest
from mycodist.shards.tarshard import iter_samples

PLOTS = {"sizes": "sizes.png", "aspect": "aspect.png", "classes": "class_balance.png"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="data-set folder holding manifest.json and the shards")
    parser.add_argument("--report", required=True, metavar="DIR", help="folder for the plots, summary.json, report.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclass
class Measurements:
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    jpeg_bytes: list[int] = field(default_factory=list)
    per_class: dict[str, Counter] = field(default_factory=dict)  # label → {split: samples}
    unreadable: int = 0


def measure(manifest: Manifest, progress: bool = True) -> Measurements:
    """Read every sample's image size (JPEG header only) and class, with a progress bar."""
    m = Measurements(per_class={lab: Counter() for lab in manifest.labels})
    with tqdm(total=manifest.samples(), unit="img", desc="stats", disable=not progress, file=sys.stderr) as bar:
        for shard in manifest.shards:
            for _, members in iter_samples(shard.path):
                bar.update(1)
                try:
                    label = manifest.labels[int(members["cls"])]
                    with Image.open(io.BytesIO(members["jpg"])) as im:
                        w, h = im.size
                except (KeyError, ValueError, IndexError, OSError):
                    m.unreadable += 1
                    continue
                m.widths.append(w)
                m.heights.append(h)
                m.jpeg_bytes.append(len(members["jpg"]))
                m.per_class[label][shard.split] += 1
    return m


def _describe(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "p05": float(np.percentile(a, 5)), "median": float(np.median(a)),
            "mean": round(float(a.mean()), 3), "p95": float(np.percentile(a, 95)), "max": float(a.max())}


def summarize(manifest: Manifest, m: Measurements) -> dict[str, Any]:
    species = load_species(manifest.root / SPECIES)
    totals = {lab: sum(c.values()) for lab, c in m.per_class.items()}
    counts = [n for n in totals.values()]
    aspects = [w / h for w, h in zip(m.widths, m.heights, strict=True) if h]
    edibility: Counter[str] = Counter()
    for lab, n in totals.items():
        edibility[species[lab].edibility if lab in species else "unknown"] += n
    return {
        "dataset": str(manifest.root),
        "samples": len(m.widths),
        "unreadable": m.unreadable,
        "classes": len(manifest.labels),
        "per_split": {s: manifest.samples(s) for s in manifest.splits},
        "width": _describe(m.widths),
        "height": _describe(m.heights),
        "aspect_w_over_h": {k: round(v, 4) for k, v in _describe(aspects).items()},
        "jpeg_bytes": _describe(m.jpeg_bytes),
        "common_sizes": [{"width": w, "height": h, "samples": n}
                         for (w, h), n in Counter(zip(m.widths, m.heights, strict=True)).most_common(5)],
        "class_balance": {
            "min": min(counts), "max": max(counts), "median": float(np.median(counts)),
            "max_over_min": round(max(counts) / min(counts), 3) if min(counts) else None,
            "classes_without_val": [lab for lab, c in m.per_class.items() if not c.get("val")],
            "classes_without_samples": [lab for lab, n in totals.items() if n == 0],
        },
        "edibility": dict(sorted(edibility.items())),
        "edibility_conflicts": {lab: edibility_conflict(species[lab]) for lab in manifest.labels
                                if lab in species and edibility_conflict(species[lab])},
        "lookalikes": {"with_record": sum(bool(species[lab].lookalike_record or species[lab].lookalikes)
                                          for lab in manifest.labels if lab in species),
                       "without_record": [lab for lab in manifest.labels
                                          if lab not in species or not (species[lab].lookalike_record
                                                                        or species[lab].lookalikes)]},
        "per_class": {lab: dict(sorted(c.items())) for lab, c in m.per_class.items()},
    }


def _save(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot(m: Measurements, summary: dict[str, Any], report: Path) -> None:
    fig = Figure(figsize=(10, 4))
    for ax, values, name in zip(fig.subplots(1, 2), (m.widths, m.heights), ("width", "height"), strict=True):
        ax.hist(values, bins=min(40, max(5, len(set(values)))), color="#7a5c3e")
        ax.set(title=f"image {name}", xlabel="pixels", ylabel="images")
    _save(fig, report / PLOTS["sizes"])

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.hist([w / h for w, h in zip(m.widths, m.heights, strict=True) if h], bins=40, color="#4e7a3e")
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set(title="aspect ratio (width / height)", xlabel="width / height", ylabel="images")
    _save(fig, report / PLOTS["aspect"])

    labels = sorted(summary["per_class"], key=lambda lab: -sum(summary["per_class"][lab].values()))
    splits = sorted({s for c in summary["per_class"].values() for s in c})
    fig = Figure(figsize=(8, max(3, 0.22 * len(labels) + 1)))
    ax = fig.subplots()
    left = np.zeros(len(labels))
    for split in splits:
        values = np.array([summary["per_class"][lab].get(split, 0) for lab in labels])
        ax.barh(labels, values, left=left, label=split)
        left += values
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7 if len(labels) > 40 else 9)
    ax.set(title="class balance", xlabel="images")
    ax.legend(loc="lower right")
    _save(fig, report / PLOTS["classes"])


def markdown(summary: dict[str, Any]) -> str:
    w, h, a, cb = summary["width"], summary["height"], summary["aspect_w_over_h"], summary["class_balance"]
    splits = ", ".join(f"{s} {n}" for s, n in summary["per_split"].items())
    lines = [
        f"# Data report: `{summary['dataset']}`", "",
        f"{summary['samples']} images ({splits}) in {summary['classes']} classes"
        + (f"; {summary['unreadable']} unreadable samples" if summary["unreadable"] else "") + ".", "",
        "| | min | median | mean | max |", "|---|---|---|---|---|",
        f"| width (px) | {w['min']:.0f} | {w['median']:.0f} | {w['mean']:.1f} | {w['max']:.0f} |",
        f"| height (px) | {h['min']:.0f} | {h['median']:.0f} | {h['mean']:.1f} | {h['max']:.0f} |",
        f"| aspect (w/h) | {a['min']:.2f} | {a['median']:.2f} | {a['mean']:.2f} | {a['max']:.2f} |", "",
        f"Images per class: {cb['min']} to {cb['max']} (median {cb['median']:g}).",
        "Edibility of the images: " + ", ".join(f"{k} {v}" for k, v in summary["edibility"].items()) + ".", "",
    ]
    if summary["edibility_conflicts"]:
        lines += ["Sources disagree on edibility (the most dangerous level is used): " + "; ".join(
            f"{lab}: " + ", ".join(f"{src} says {lv}" for src, lv in by.items())
            for lab, by in summary["edibility_conflicts"].items()) + ".", ""]
    look = summary["lookalikes"]
    lines += [f"Lookalikes recorded for {look['with_record']} of {summary['classes']} classes"
              + (f"; none for {', '.join(look['without_record'])}" if look["without_record"] else "") + ".", ""]
    if cb["classes_without_val"]:
        lines += [f"Classes without validation images: {', '.join(cb['classes_without_val'])}.", ""]
    lines += [f"![image sizes]({PLOTS['sizes']})", "", f"![aspect ratio]({PLOTS['aspect']})", "",
              f"![class balance]({PLOTS['classes']})", "", "Figures in `summary.json`.", ""]
    return "\n".join(lines)


def write_report(root: str | Path, report: str | Path, cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Measure the data set at `root` and write the report into `report`; returns the summary."""
    root, report = Path(root), Path(report)
    if report.resolve() == root.resolve():
        raise UsageError("--report must be a folder other than the data set (its config.yaml is part of the data set)")
    manifest = read_manifest(root)
    m = measure(manifest, progress)
    if not m.widths:
        raise UsageError(f"no readable samples in '{root}'; run `mycodist verify {root}`")
    summary = summarize(manifest, m)
    report.mkdir(parents=True, exist_ok=True)
    plot(m, summary, report)
    atomic_write_json(report / "summary.json", summary)
    atomic_write_text(report / "report.md", markdown(summary))
    save_config(cfg, report)
    return summary


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    summary = write_report(args.out, args.report, cfg, progress=not args.quiet)
    w, h = summary["width"], summary["height"]
    print(f"{summary['samples']} images in {summary['classes']} classes; median size "
          f"{w['median']:.0f}x{h['median']:.0f}; {summary['class_balance']['min']}-"
          f"{summary['class_balance']['max']} per class → {Path(args.report) / 'report.md'}")
    for lab, by in summary["edibility_conflicts"].items():
        print(f"edibility disagreement: {lab}: " + ", ".join(f"{src} says {lv}" for src, lv in by.items())
              + f" → {max(by.values(), key=DANGER.__getitem__)} is used")
    return 0
