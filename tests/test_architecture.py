"""The import direction of docs/architecture.md, checked on the source: a stage imports only the shared
base and stages upstream of it, so no stage can quietly grow a dependency on one downstream."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mycodist"
BASE = {"config", "catalog", "atomic", "errors", "lookalikes"}
ALLOWED = {
    "shards": set(),
    "synth": {"shards"},
    "crawl": {"shards", "synth"},
    "data": {"shards"},
    "models": set(),
    "profile": set(),
    "train": {"shards", "data", "models", "profile"},
    "serve": {"models"},
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
