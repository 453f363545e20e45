import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from shards_util import COLOURS, LABELS, SPECIES, config, jpeg, make_dataset

from mycodist.catalog import load_class_indices, load_species
from mycodist.shards import (
    DatasetWriter,
    DuplicateKeyError,
    ManifestError,
    WriterSettings,
    assign_splits,
    read_manifest,
)

REQUIRED = {"label", "scientific_name", "common_name", "source", "url", "sha256", "width", "height", "edibility"}


def test_contract_read_back_with_plain_tarfile(tmp_path):
    manifest = make_dataset(tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert shards == sorted(s["file"] for s in manifest["shards"])
    assert set(shards) >= {"train-000000.tar", "val-000000.tar"}
    labels = load_class_indices(tmp_path / "class_indices.json")
    assert json.loads((tmp_path / "class_indices.json").read_text()) == {"0": LABELS[0], "1": LABELS[1],
                                                                          "2": LABELS[2]}
    species = json.loads((tmp_path / "species.json").read_text())
    assert species["amanita_pallida"]["edibility"] == "deadly"
    assert species["amanita_pallida"]["lookalikes"] == ["boletus_bonus"]
    assert (tmp_path / "config.yaml").is_file()
    keys = []
    for entry in manifest["shards"]:
        data = (tmp_path / entry["file"]).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        with tarfile.open(tmp_path / entry["file"]) as tar:
            names = tar.getnames()
            assert len(names) == 3 * entry["samples"]
            for name in names:
                key, ext = name.split(".", 1)
                assert ext in {"jpg", "cls", "json"}
                if ext != "cls":
                    continue
                keys.append(key)
                cls = int(tar.extractfile(name).read().decode("ascii"))
                rec = json.loads(tar.extractfile(f"{key}.json").read())
                jpg = tar.extractfile(f"{key}.jpg").read()
                assert REQUIRED <= set(rec)
                assert labels[cls] == rec["label"] and key.startswith(rec["label"])
                assert rec["sha256"] == hashlib.sha256(jpg).hexdigest()
                assert rec["url"] == f"http://127.0.0.1/{key}.jpg"
                # names and edibility filled from the catalogue
                sp = species[rec["label"]]
                assert (rec["scientific_name"], rec["common_name"], rec["edibility"]) == (
                    sp["scientific_name"], sp["common_name"], sp["edibility"])
                with Image.open(io.BytesIO(jpg)) as im:
                    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (rec["width"], rec["height"]))
    assert len(keys) == len(set(keys)) == 3 * 8
    assert manifest["samples"] == 24 and manifest["num_classes"] == 3
    assert manifest["totals"]["val"]["class_counts"] == {"0": 1, "1": 1, "2": 1}  # round(8 * 0.15) = 1 each
    assert manifest["config"]["shards"]["max_samples"] == 5


def test_contract_read_back_with_webdataset(tmp_path):
    make_dataset(tmp_path)
    m = read_manifest(tmp_path)
    labels = m.labels
    seen = {}
    for split in ("train", "val"):
        ds = wds.WebDataset(m.paths(split), shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls", "json")
        for key, img, cls, rec in ds:
            assert img.mode == "RGB" and img.size == (48, 32)
            assert labels[cls] == rec["label"]
            r, g, b = img.getpixel((20, 20))
            assert max(abs(r - COLOURS[rec["label"]][0]), abs(g - COLOURS[rec["label"]][1])) < 12
            seen[key] = split
        assert len([k for k, s in seen.items() if s == split]) == m.samples(split)
    assert len(seen) == 24


def test_shard_limits_by_samples_and_bytes(tmp_path):
    cfg = config("shards.max_samples=1000", "shards.max_bytes=12000")
    big = jpeg(size=(64, 64), quality=95)
    with DatasetWriter(tmp_path, LABELS, SPECIES, WriterSettings.from_config(cfg)) as w:
        for i in range(12):
            w.write("train", f"k{i:03d}", big, LABELS[i % 3], {})
    m = read_manifest(tmp_path)
    assert len(m.shards) > 1 and m.samples("train") == 12
    for s in m.shards:
        assert s.bytes <= 12000 or s.samples == 1
    cfg = config("shards.max_samples=4")
    with DatasetWriter(tmp_path / "n", LABELS, SPECIES, WriterSettings.from_config(cfg)) as w:
        for i in range(10):
            w.write("train", f"k{i:03d}", jpeg(), LABELS[0], {})
    assert [s.samples for s in read_manifest(tmp_path / "n").shards] == [4, 4, 2]


def test_same_samples_give_identical_shards(tmp_path):
    a = make_dataset(tmp_path / "a")
    b = make_dataset(tmp_path / "b")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_write_rejects_bad_samples(tmp_path):
    with DatasetWriter(tmp_path, LABELS, SPECIES, WriterSettings.from_config(config())) as w:
        w.write("train", "k1", jpeg(), "boletus_bonus", {})
        with pytest.raises(DuplicateKeyError):
            w.write("val", "k1", jpeg(), "boletus_bonus", {})
        assert "k1" in w
        with pytest.raises(ValueError, match="unknown label"):
            w.write("train", "k2", jpeg(), "russula_rosea", {})
        with pytest.raises(ValueError, match="no dots"):
            w.write("train", "k2.x", jpeg(), "boletus_bonus", {})
        with pytest.raises(ValueError, match="split"):
            w.write("Train!", "k2", jpeg(), "boletus_bonus", {})
        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, "PNG")
        with pytest.raises(ValueError, match="RGB JPEG"):
            w.write("train", "k2", png.getvalue(), "boletus_bonus", {})
        with pytest.raises(ValueError, match="not a readable JPEG"):
            w.write("train", "k2", b"hello", "boletus_bonus", {})
        with pytest.raises(ValueError, match="48x32"):
            w.write("train", "k2", jpeg(), "boletus_bonus", {"width": 100})
        with pytest.raises(ValueError, match="edibility"):
            w.write("train", "k2", jpeg(), "boletus_bonus", {"edibility": "yummy"})
        w.write("train", "k3", jpeg(), "boletus_bonus", {"edibility": "inedible", "source": "site"})
        w.write("train", "k4", jpeg(), "boletus_bonus", {"seed": np.int64(7), "width": np.int64(48)})
    recs = [json.loads(s["json"]) for s in wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False)]
    assert [(r["edibility"], r["source"]) for r in recs] == [("choice", ""), ("inedible", "site"), ("choice", "")]
    assert recs[2]["seed"] == 7
    with pytest.raises(ValueError, match="slug"):
        DatasetWriter(tmp_path / "x", ["Boletus Bonus"], SPECIES, WriterSettings.from_config(config()))
    with pytest.raises(ValueError, match="no species record"):
        DatasetWriter(tmp_path / "x", ["russula_rosea"], SPECIES, WriterSettings.from_config(config()))


def test_failure_inside_writer_leaves_no_manifest_and_no_temp_files(tmp_path):
    closed = []
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path, LABELS, SPECIES, WriterSettings.from_config(config("shards.max_samples=2")),
                           on_shard_closed=lambda split, path, keys: closed.append((split, path.name, keys,
                                                                                   path.is_file()))) as w:
            for i in range(3):
                w.write("train", f"k{i}", jpeg(), LABELS[0], {})
            raise RuntimeError("producer failed")
    assert closed == [("train", "train-000000.tar", ["k0", "k1"], True)]
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_rewriting_a_folder_replaces_the_old_data_set(tmp_path):
    make_dataset(tmp_path, per_label=20)
    assert len(read_manifest(tmp_path).shards) > 2
    with DatasetWriter(tmp_path, LABELS, SPECIES, WriterSettings.from_config(config())) as w:
        w.write("train", "only", jpeg(), LABELS[1], {})
    m = read_manifest(tmp_path)
    assert [s.file for s in m.shards] == ["train-000000.tar"] and sorted(p.name for p in tmp_path.glob("*.tar")) == [
        "train-000000.tar"]
    assert load_species(tmp_path / "species.json")["boletus_bonus"].family == "Boletaceae"


def test_assign_splits_is_stratified_and_order_free():
    keys = {"a": [f"a{i}" for i in range(20)], "b": ["b0", "b1"], "c": ["c0"], "d": [f"d{i}" for i in range(3)]}
    s = assign_splits(keys, 0.2)
    assert sum(s[k] == "val" for k in keys["a"]) == 4
    assert sorted(s[k] for k in keys["b"]) == ["train", "val"]
    assert s["c0"] == "train"
    assert sorted(s[k] for k in keys["d"]).count("val") == 1
    assert assign_splits({lab: list(reversed(ks)) for lab, ks in reversed(keys.items())}, 0.2) == s
    assert set(assign_splits(keys, 0.0).values()) == {"train"}
    with pytest.raises(ValueError):
        assign_splits(keys, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("abcdef", min_size=1, max_size=3),
                       st.lists(st.text("0123456789xyz", min_size=1, max_size=6), max_size=30, unique=True),
                       max_size=6),
       st.floats(0.01, 0.9))
def test_assign_splits_property(raw, frac):
    keys = {lab: [f"{lab}-{k}" for k in ks] for lab, ks in raw.items()}
    s = assign_splits(keys, frac)
    assert set(s) == {k for ks in keys.values() for k in ks}
    for ks in keys.values():
        got = [s[k] for k in ks]
        if len(ks) >= 2:
            assert "val" in got and "train" in got
        elif ks:
            assert got == ["train"]
