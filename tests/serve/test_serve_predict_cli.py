"""`mycodist predict`: the same answer as the API, one JSON line per image, bad files reported not fatal."""

from __future__ import annotations

import json
import shutil

from serve_util import photo

from mycodist.cli import main
from mycodist.verdict import WARNING


def test_predict_prints_one_json_line_per_image(real_export, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(photo())
    (folder / "sub" / "b.png").write_bytes(photo(fmt="PNG"))
    (folder / "notes.txt").write_text("not a photo, not picked up from a folder")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo()[:100])

    rc = main(["predict", "--model", str(real_export), str(folder), str(broken), "--top-k", "3"])
    out = capsys.readouterr()
    lines = [json.loads(x) for x in out.out.splitlines()]
    assert rc == 1 and "1 of 3 images could not be read" in out.err
    assert [x["file"].rsplit("/", 1)[-1] for x in lines] == ["a.jpg", "b.png", "broken.jpg"]
    for ans in lines[:2]:
        assert ans["verdict"]["code"] == "poisonous" and len(ans["top_k"]) == 3 and ans["warning"] == WARNING
    assert "truncated" in lines[2]["error"]


def test_predict_usage_errors(real_export, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(photo())
    assert main(["predict", "--model", str(tmp_path / "nope"), str(tmp_path / "a.jpg")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", "--model", str(real_export), str(tmp_path / "missing.jpg")]) == 2
    assert "neither an image file nor a folder" in capsys.readouterr().err
    assert main(["predict", "--model", str(real_export), str(tmp_path), "serve.min_confidance=0.2"]) == 2
    assert "did you mean 'serve.min_confidence'" in capsys.readouterr().err


def test_predict_checks_thresholds_and_calibration(real_export, tmp_path, capsys):
    """`serve.poison_mass=5` once let 35% deadly mass through as edible; an export without calibration
    once meant T = 1 and no OOD check. Both are refused; allowed explicitly, the answer is capped."""
    (tmp_path / "a.jpg").write_bytes(photo())
    assert main(["predict", "--model", str(real_export), str(tmp_path / "a.jpg"), "serve.poison_mass=5"]) == 2
    assert "serve.poison_mass must be a finite number in [0, 1], got 5.0" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(real_export, bare)
    (bare / "calibration.json").unlink()
    assert main(["predict", "--model", str(bare), str(tmp_path / "a.jpg")]) == 2
    assert "no calibration.json" in capsys.readouterr().err
    assert main(["predict", "--model", str(bare), str(tmp_path / "a.jpg"), "serve.allow_uncalibrated=true"]) == 0
    ans = json.loads(capsys.readouterr().out)
    assert ans["verdict"]["code"] == "poisonous" and "uncalibrated" in ans["verdict"]["rules"]
