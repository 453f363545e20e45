"""The export folder's contract (mycodist/export/artifact.py): written whole or not at all, read with a
version check and errors that name what is missing."""

from __future__ import annotations

import json

import pytest

from mycodist.errors import UsageError
from mycodist.export import artifact


def _write(run, files=artifact.REQUIRED):
    def write_files(tmp):
        for name in files:
            (tmp / name).write_text("{}")
    return artifact.write_export(run, write_files, {"model_name": "vit_tiny_patch16", "model_config": {"depth": 2}})


def test_write_then_read_round_trip(tmp_path):
    out = _write(tmp_path)
    assert out == tmp_path / "export" and not (tmp_path / ".tmp-export").exists()
    folder = artifact.read_export(out)
    manifest = json.loads((out / artifact.MANIFEST).read_text())
    assert folder.version == artifact.VERSION == manifest["version"] and folder.model_config == {"depth": 2}
    assert set(artifact.REQUIRED) <= set(manifest["files"])
    assert folder.model_file == out / artifact.MODEL_FILE


def test_a_failed_build_leaves_the_previous_export(tmp_path):
    _write(tmp_path)

    def broken(tmp):
        (tmp / artifact.MODEL_FILE).write_text("half")
        raise RuntimeError("killed mid-export")

    with pytest.raises(RuntimeError):
        artifact.write_export(tmp_path, broken, {})
    assert artifact.read_export(tmp_path / "export").version == artifact.VERSION
    with pytest.raises(UsageError, match="unfinished export"):
        artifact.read_export(tmp_path / ".tmp-export")


def test_old_partial_and_future_exports_get_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        artifact.read_export(tmp_path / "nope")
    v1 = tmp_path / "v1"
    v1.mkdir()
    for name in artifact.REQUIRED:
        (v1 / name).write_text("{}")
    assert artifact.read_export(v1).version == 1 and artifact.read_export(v1).model_config is None
    (v1 / artifact.CONFIG_FILE).unlink()
    with pytest.raises(UsageError, match=r"config.yaml missing \(export format version 1\)"):
        artifact.read_export(v1)
    out = _write(tmp_path)
    (out / artifact.CALIBRATION).write_text("{}")
    manifest = json.loads((out / artifact.MANIFEST).read_text())
    (out / artifact.MANIFEST).write_text(json.dumps({**manifest, "version": artifact.VERSION + 1}))
    with pytest.raises(UsageError, match="this mycodist reads up to"):
        artifact.read_export(out)
    (out / artifact.MANIFEST).write_text(json.dumps({**manifest, "files": [*manifest["files"], "ood.safetensors"]}))
    with pytest.raises(UsageError, match="ood.safetensors missing"):
        artifact.read_export(out)
