import json

from PIL import Image
from shards_util import LABELS, SPECIES, config, jpeg, make_dataset

from mycodist.cli import main
from mycodist.shards import DatasetWriter, WriterSettings


def test_stats_report(tmp_path, capsys):
    ds = tmp_path / "ds"
    sizes = [(48, 32), (32, 48), (64, 64), (100, 50)]
    with DatasetWriter(ds, LABELS, SPECIES, WriterSettings.from_config(config())) as w:
        for i in range(12):  # 6 of class 0, 4 of class 1, 2 of class 2
            label = LABELS[0] if i < 6 else LABELS[1] if i < 10 else LABELS[2]
            w.write("val" if i in (0, 6) else "train", f"s{i:02d}", jpeg(size=sizes[i % 4]), label, {})
    report = tmp_path / "report"
    assert main(["stats", str(ds), "--report", str(report), "--quiet"]) == 0
    assert "12 images in 3 classes" in capsys.readouterr().out
    summary = json.loads((report / "summary.json").read_text())
    assert summary["samples"] == 12 and summary["per_split"] == {"train": 10, "val": 2}
    assert summary["width"]["min"] == 32 and summary["width"]["max"] == 100
    assert summary["height"]["max"] == 64
    assert summary["aspect_w_over_h"]["max"] == 2.0 and summary["aspect_w_over_h"]["min"] == round(32 / 48, 4)
    assert summary["per_class"] == {LABELS[0]: {"train": 5, "val": 1}, LABELS[1]: {"train": 3, "val": 1},
                                    LABELS[2]: {"train": 2}}
    assert summary["class_balance"]["max_over_min"] == 3.0
    assert summary["class_balance"]["classes_without_val"] == [LABELS[2]]
    assert summary["edibility"] == {"choice": 4, "deadly": 6, "edible": 2}
    for name in ("sizes.png", "aspect.png", "class_balance.png"):
        with Image.open(report / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
    md = (report / "report.md").read_text()
    assert "12 images (train 10, val 2) in 3 classes" in md and "![class balance](class_balance.png)" in md
    assert LABELS[2] in md  # named as lacking validation images
    assert (report / "config.yaml").is_file()


def test_stats_refuses_bad_input(tmp_path, capsys):
    assert main(["stats", str(tmp_path), "--report", str(tmp_path / "r")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    make_dataset(tmp_path / "ds")
    assert main(["stats", str(tmp_path / "ds"), "--report", str(tmp_path / "ds"), "--quiet"]) == 2
    assert "--report must be a folder other than the data set" in capsys.readouterr().err
