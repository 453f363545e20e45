"""`mycodist synth` end to end: shards (read back with tarfile and webdataset), folders, refusals."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from mycodist.catalog import load_class_indices, load_species
from mycodist.cli import main

SMALL = ["synth.species=3", "synth.per_species=4", "synth.size=48", "synth.workers=1"]


def _run(out, *extra):
    return main(["synth", "--out", str(out), "--quiet", *SMALL, *extra])


def test_shards_follow_the_contract(tmp_path, capsys):
    out = tmp_path / "ds"
    assert _run(out) == 0
    summary = capsys.readouterr().out
    assert "12 photos of 3 species" in summary and "train" in summary and "val" in summary
    labels = load_class_indices(out / "class_indices.json")
    species = load_species(out / "species.json")
    assert set(species) == set(labels) and all(s.source == "synth" for s in species.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "synth" and (out / "config.yaml").is_file()
    shards = sorted(out.glob("*.tar"))
    assert {p.name.split("-")[0] for p in shards} == {"train", "val"}
    keys = set()
    for path in shards:
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert all(n.rsplit(".", 1)[1] in ("jpg", "cls", "json") for n in names)
        for sample in wds.WebDataset(str(path), shardshuffle=False):
            meta = json.loads(sample["json"])
            label = meta["label"]
            assert sample["__key__"].startswith(label + "-")
            assert labels[int(sample["cls"])] == label
            assert meta["source"] == "synth" and meta["url"] is None
            assert meta["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (meta["width"], meta["height"])
                assert max(im.size) == 48
            assert meta["edibility"] == species[label].edibility
            assert meta["scientific_name"] == species[label].scientific_name
            keys.add(sample["__key__"])
    assert keys == {f"{lab}-{i:05d}" for lab in labels for i in range(4)}


def test_rerun_with_same_settings_gives_identical_shards_and_other_settings_are_refused(tmp_path, capsys):
    out = tmp_path / "ds"
    assert _run(out) == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert _run(out, "synth.workers=2") == 0  # workers never change the output
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first
    capsys.readouterr()
    assert _run(out, "synth.seed=1") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "synth.seed" in err
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first


def test_refuses_foreign_folders_and_files(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    assert _run(foreign) == 2
    assert "not an earlier synth output" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert _run(a_file) == 2
    assert "is a file" in capsys.readouterr().err


def test_folder_with_only_a_readme_is_usable(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "README.md").write_text("generated data goes here\n")
    assert _run(out) == 0
    assert (out / "manifest.json").is_file() and (out / "README.md").is_file()


@pytest.mark.parametrize("override, match", [
    ("synth.species=1", "at least 2 species"),
    ("synth.per_species=0", "at least 1 photo"),
    ("synth.size=31", "longest side"),
    ("synth.format=zip", "shards, folders"),
])
def test_bad_settings_exit_2_and_write_nothing(tmp_path, capsys, override, match):
    out = tmp_path / "ds"
    assert _run(out, override) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_folders_format_is_the_kaggle_layout(tmp_path):
    out = tmp_path / "folders"
    assert _run(out, "synth.format=folders") == 0
    species = load_species(out / "species.json")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(species)
    for label in species:
        files = sorted(p.name for p in (out / label).iterdir())
        assert files == [f"{label}-{i:05d}.jpg" for i in range(4)]
    assert (out / "config.yaml").is_file()
    assert not list(out.rglob(".tmp-*"))
