"""The export folder: the one definition of its layout, its version, how it is written and how it is read.

    export/
      export.json         {"format": "mycodist-export", "version": 2, "model_config": ViTConfig.to_dict(),
                           "preprocess": {...}, "weights": "model"|"ema", "files": [...]}
      model.safetensors   fp32 state dict, timm-style names
      config.yaml         the run's resolved config (provenance; serving builds from export.json)
      class_indices.json  {"0": label, ...}
      species.json        the catalogue (edibility, lookalikes, ...)
      calibration.json    temperature, ECE, OOD-score quantiles, `feature_ood`
      ood.safetensors     feature statistics for the feature-distance OOD score (optional)
      model.onnx, model.int8.onnx, onnx.json, onnx_val.safetensors   ONNX Runtime graphs (optional, --onnx)

The builder (mycodist.export.build) writes through `write_export`; predict and serve read through
`read_export`, which names what is missing or too new. Version 1 (before export.json) still reads: its
model config is rebuilt from config.yaml's model group.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mycodist.atomic import atomic_write_json
from mycodist.catalog import CLASS_INDICES, SPECIES
from mycodist.config import CONFIG_FILENAME
from mycodist.errors import UsageError

FORMAT = "mycodist-export"
VERSION = 2
EXPORT_DIR = "export"  # RUN_DIR/export
MANIFEST = "export.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = CONFIG_FILENAME
CALIBRATION = "calibration.json"
OOD_FILE = "ood.safetensors"
ONNX_FILE = "model.onnx"  # with `mycodist export --onnx` (mycodist/export/onnx.py)
INT8_FILE = "model.int8.onnx"
ONNX_META = "onnx.json"
ONNX_VAL = "onnx_val.safetensors"
REQUIRED = (MODEL_FILE, CONFIG_FILE, CLASS_INDICES, SPECIES)


@dataclass(frozen=True)
class ExportFolder:
    """A checked export folder: where each file is, and what export.json says (empty for version 1)."""

    path: Path
    version: int
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def class_indices(self) -> Path:
        return self.path / CLASS_INDICES

    @property
    def species(self) -> Path:
        return self.path / SPECIES

    @property
    def calibration(self) -> Path:
        return self.path / CALIBRATION

    @property
    def ood_stats(self) -> Path:
        return self.path / OOD_FILE

    @property
    def model_config(self) -> dict[str, Any] | None:
        """The ViTConfig dict (version 2), or None for a version-1 export (build from config.yaml)."""
        return self.manifest.get("model_config")


def read_export(path: str | Path) -> ExportFolder:
    """Check an export folder before anything loads from it; every problem is one clear UsageError."""
    d = Path(path)
    if not d.is_dir():
        raise UsageError(f"export folder '{d}' does not exist; make one with `mycodist export RUN_DIR`")
    if d.name.startswith(".tmp-"):
        raise UsageError(f"'{d}' is an unfinished export (the builder was interrupted); run `mycodist export "
                         "RUN_DIR` again")
    manifest: dict[str, Any] = {}
    if (d / MANIFEST).is_file():
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read '{d / MANIFEST}': {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UsageError(f"'{d / MANIFEST}' is not a mycodist export manifest")
        version = int(manifest.get("version", 0))
        if version > VERSION:
            raise UsageError(f"'{d}' is export format version {version}; this mycodist reads up to {VERSION}: "
                             "upgrade mycodist, or re-export the run with this version")
    else:
        version = 1
    missing = [name for name in (*REQUIRED, *manifest.get("files", [])) if not (d / name).is_file()]
    if missing:
        raise UsageError(f"'{d}' is not a complete export folder: {', '.join(sorted(set(missing)))} missing "
                         f"(export format version {version}); `mycodist export RUN_DIR` writes it whole")
    return ExportFolder(d, version, manifest)


def write_export(run_dir: Path, write_files: Callable[[Path], None], manifest: dict[str, Any],
                 copy_from_run: tuple[str, ...] = (CLASS_INDICES, SPECIES)) -> Path:
    """Write RUN_DIR/export atomically: everything goes into RUN_DIR/.tmp-export (by `write_files`, plus the
    run's catalogue files and export.json, written last), which then replaces RUN_DIR/export by rename."""
    run_dir = Path(run_dir)
    out, tmp = run_dir / EXPORT_DIR, run_dir / f".tmp-{EXPORT_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_files(tmp)
    for name in copy_from_run:
        if (run_dir / name).is_file() and not (tmp / name).is_file():
            shutil.copyfile(run_dir / name, tmp / name)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    atomic_write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, **manifest, "files": files})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (the weights' identity in answers and ONNX records)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
