"""The import direction of docs/architecture.md, checked on the source: a stage imports only the shared
base and stages upstream of it, so no stage can quietly grow a dependency on one downstream."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mycodist"
BASE = {"config", "catalog", "lookalikes", "atomic", "errors", "devices", "preprocess", "verdict"}
ALLOWED = {
    "shards": set(),
    "synth": {"shards"},
    "crawl": {"shards", "synth"},
    "data": {"shards"},
    "models": set(),
    "profile": set(),
    "train": {"shards", "data", "models", "profile"},
    "export": {"shards", "data", "models", "profile", "train"},
    "serve": {"models", "export"},
}


def _imports(path: Path) -> set[str]:
    """First component under `mycodist.` of every import in a file (including function-level ones)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {n.split(".")[1] for n in names if n.startswith("mycodist.") and n.count(".") >= 1}
    return found


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stage_imports_only_base_and_upstream(stage):
    bad = {}
    for path in sorted((ROOT / stage).rglob("*.py")):
        wrong = _imports(path) - BASE - ALLOWED[stage] - {stage}
        if wrong:
            bad[str(path.relative_to(ROOT.parent))] = sorted(wrong)
    assert not bad, f"{stage} imports stages it must not (docs/architecture.md): {bad}"


def test_base_imports_no_stage():
    for name in BASE:
        assert _imports(ROOT / f"{name}.py") <= BASE, name


def test_every_stage_is_listed():
    stages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert stages == set(ALLOWED)


# One contract per hand-off: the export folder's file names are written in mycodist/export/artifact.py only
# (a checkpoint folder's own model file is train/checkpoint.py's).
EXPORT_NAMES = {"model.safetensors": {"export/artifact.py", "train/checkpoint.py"},
                "calibration.json": {"export/artifact.py"}, "ood.safetensors": {"export/artifact.py"},
                "export.json": {"export/artifact.py"}, "model.onnx": {"export/artifact.py"},
                "onnx.json": {"export/artifact.py"}, "onnx_val.safetensors": {"export/artifact.py"}}


def test_export_file_names_are_defined_once():
    found: dict[str, set[str]] = {name: set() for name in EXPORT_NAMES}
    for path in ROOT.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in EXPORT_NAMES:
                found[node.value].add(rel)
    extra = {name: sorted(where - EXPORT_NAMES[name]) for name, where in found.items() if where - EXPORT_NAMES[name]}
    assert not extra, f"export file names restated outside mycodist/export/artifact.py: {extra}"
    assert all(found.values()), found  # the check sees the definitions themselves


def test_eval_transform_settings_are_resolved_once():
    """`eval_crop`, and the `data.img_size` 0 → `model.img_size` rule, live in mycodist/preprocess.py only."""
    found = set()
    for path in ROOT.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.value if isinstance(node, ast.Constant) else None
            if name in ("eval_crop", "img_size") and isinstance(node, (ast.Attribute, ast.Constant)):
                if name == "eval_crop" or _reads_data_img_size(node):
                    found.add(rel)
    assert found == {"preprocess.py"}, f"eval transform settings read outside mycodist/preprocess.py: {sorted(found)}"


def _reads_data_img_size(node: ast.AST) -> bool:
    """`<x>.data.img_size` or `d.img_size` where d is the data group: any `.data.img_size` / ("data")..img_size."""
    return (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "data")
