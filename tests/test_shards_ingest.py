import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from shards_util import jpeg

from mycodist.cli import main
from mycodist.shards import read_manifest
from mycodist.shards.verify import verify_dataset


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noisy(size=(64, 64), seed=0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.fixture
def kaggle_tree(tmp_path):
    """Class folders with good and bad files of many kinds, all made here with Pillow."""
    root = tmp_path / "kaggle"
    a, b, c = root / "Agaricus arvensis", root / "Golden Chanterelle", root / "boletus-bonus"
    for d in (a, b, c, root / "Empty Folder"):
        d.mkdir(parents=True)
    for i in range(3):
        (a / f"a{i}.jpg").write_bytes(jpeg((200, 200, 190), noise_seed=i))
    # EXIF orientation 6: stored 60x40 with red left / blue right; upright it is 40x60, red on top
    im = Image.new("RGB", (60, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 30, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    (b / "rotated.jpg").write_bytes(_save(im, "JPEG", exif=exif, quality=95))
    rgba = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    rgba.paste((0, 128, 0, 255), (0, 0, 15, 30))
    (b / "alpha.png").write_bytes(_save(rgba, "PNG"))
    (b / "grey.png").write_bytes(_save(Image.new("L", (20, 10), 90), "PNG"))
    (b / "deep.png").write_bytes(_save(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), "PNG"))
    (b / "nested").mkdir()
    (b / "nested" / "photo.webp").write_bytes(_save(Image.new("RGB", (16, 16), (250, 180, 20)), "WEBP"))
    good = _save(noisy(), "JPEG", quality=90)
    (c / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (c / "notes.jpg").write_text("this is not an image\n")
    (c / "empty.jpg").write_bytes(b"")
    (c / "good.jpg").write_bytes(good)
    (c / "copy.jpg").write_bytes(good)
    (c / ".DS_Store").write_bytes(b"\0\1")
    (root / "README.txt").write_text("class folders below\n")
    return root


def test_ingest_folder_handles_bad_files(kaggle_tree, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["ingest", "folder", str(kaggle_tree), "--out", str(out), "--quiet", "shards.ingest_workers=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ingested 9 images in 3 classes" in printed and "skipped 5 files" in printed
    report = json.loads((out / "ingest_report.json").read_text())
    reasons = {r["file"]: r["reason"] for r in report["skipped_files"]}
    assert reasons["README.txt"] == "not inside a class folder"
    assert reasons["boletus-bonus/empty.jpg"] == "empty file"
    assert reasons["boletus-bonus/notes.jpg"] == "not an image Pillow can read"
    assert reasons["boletus-bonus/truncated.jpg"].startswith("truncated or corrupt image")
    assert reasons["boletus-bonus/good.jpg"] == "duplicate of boletus-bonus/copy.jpg"
    assert report["empty_classes"] == ["Empty Folder"]

    m = read_manifest(out, check_hashes=True)
    assert m.labels == ["agaricus_arvensis", "boletus_bonus", "golden_chanterelle"]
    assert verify_dataset(out) == []
    samples = {}
    for split in m.splits:
        for s in wds.WebDataset(m.paths(split), shardshuffle=False).decode("pil"):
            samples[s["json"]["file"]] = s
    assert len(samples) == 9
    up = samples["Golden Chanterelle/rotated.jpg"]
    assert up["jpg"].size == (40, 60) and (up["json"]["width"], up["json"]["height"]) == (40, 60)
    top, bottom = up["jpg"].getpixel((20, 5)), up["jpg"].getpixel((20, 55))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    flat = samples["Golden Chanterelle/alpha.png"]["jpg"]
    assert flat.mode == "RGB" and min(flat.getpixel((25, 15))) > 240  # transparent → white, not black
    assert flat.getpixel((5, 15))[1] > 100
    assert samples["Golden Chanterelle/deep.png"]["jpg"].mode == "RGB"
    assert samples["Golden Chanterelle/nested/photo.webp"]["json"]["orig_format"] == "WEBP"
    species = json.loads((out / "species.json").read_text())
    assert species["agaricus_arvensis"]["scientific_name"] == "Agaricus arvensis"
    assert species["golden_chanterelle"]["common_name"] == "Golden Chanterelle"
    # a folder name says nothing about edibility; the lookalike reference knows Agaricus arvensis
    assert {lab: s["edibility"] for lab, s in species.items()} == {
        "agaricus_arvensis": "edible", "golden_chanterelle": "unknown", "boletus_bonus": "unknown"}
    # every class with >= 2 images has validation samples; boletus_bonus has one valid image
    val, train = m.class_counts("val"), m.class_counts("train")
    assert val.get(0, 0) >= 1 and val.get(2, 0) >= 1 and (val.get(1, 0), train[1]) == (0, 1)
    assert train[0] >= 1 and train[2] >= 1

    # the same tree with worker processes gives byte-identical shards
    out2 = tmp_path / "out2"
    assert main(["ingest", "folder", str(kaggle_tree), "--out", str(out2), "--quiet", "shards.ingest_workers=2"]) == 0
    assert [s.sha256 for s in read_manifest(out2).shards] == [s.sha256 for s in m.shards]


def test_ingest_usage_errors(kaggle_tree, tmp_path, capsys):
    assert main(["ingest", "folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["ingest", "folder", str(kaggle_tree), "--out", str(kaggle_tree / "out")]) == 2
    assert "inside" in capsys.readouterr().err
    (kaggle_tree / "Golden_Chanterelle").mkdir()
    assert main(["ingest", "folder", str(kaggle_tree), "--out", str(tmp_path / "o")]) == 2
    assert "both give the label 'golden_chanterelle'" in capsys.readouterr().err
    bad = tmp_path / "bad"
    (bad / "Some Species").mkdir(parents=True)
    (bad / "Some Species" / "x.jpg").write_text("nope")
    assert main(["ingest", "folder", str(bad), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "no readable images" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_ingest_known_species_and_config_after_subcommand(tmp_path):
    src = tmp_path / "src" / "Boletus edulis"
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"{i}.png").write_bytes(_save(noisy((40, 30), seed=i), "PNG"))
    (tmp_path / "c.yaml").write_text("data:\n  ingest_max_side: 20\n  val_fraction: 0.0\n")
    (tmp_path / "sp.json").write_text(json.dumps({"boletus_edulis": {
        "scientific_name": "Boletus edulis", "common_name": "Penny bun", "edibility": "choice"}}))
    out = tmp_path / "out"
    assert main(["ingest", "folder", str(tmp_path / "src"), "--out", str(out), "--config", str(tmp_path / "c.yaml"),
                 "--species", str(tmp_path / "sp.json"), "--quiet", "shards.ingest_workers=1"]) == 0
    m = read_manifest(out)
    assert m.splits == ["train"] and m.samples() == 3
    recs = [s["json"] for s in wds.WebDataset(m.paths("train"), shardshuffle=False).decode()]
    assert {(r["width"], r["height"], r["edibility"], r["common_name"]) for r in recs} == {(20, 15, "choice", "Penny bun")}


def test_ingest_joins_the_lookalike_reference(tmp_path):
    """Folder names are binomials: the reference gives the death cap its danger, whatever --species says,
    and both species their lookalikes (what tells them apart included)."""
    root = tmp_path / "tree"
    for name in ("Amanita phalloides", "Agaricus campestris"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.jpg").write_bytes(jpeg((120, 160, 90), noise_seed=i + len(name)))
    known = tmp_path / "species.json"
    known.write_text(json.dumps({"amanita_phalloides": {"scientific_name": "Amanita phalloides",
                                                        "edibility": "edible", "source": "my notes"}}))
    assert main(["ingest", "folder", str(root), "--out", str(tmp_path / "out"), "--species", str(known),
                 "--quiet"]) == 0
    species = json.loads((tmp_path / "out" / "species.json").read_text())
    cap, field = species["amanita_phalloides"], species["agaricus_campestris"]
    assert cap["edibility"] == "deadly" and cap["edibility_sources"]["my notes"] == "edible"
    assert "agaricus_campestris" in cap["lookalikes"] and "amanita_phalloides" in field["lookalikes"]
    assert field["lookalike_notes"]["amanita_verna"]["edibility"] == "deadly"  # not a class, danger known
