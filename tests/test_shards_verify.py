import hashlib
import io
import json
import tarfile

import pytest
from shards_util import jpeg, make_dataset

from mycodist.cli import main
from mycodist.shards import ManifestError, read_manifest
from mycodist.shards.tarshard import iter_samples
from mycodist.shards.verify import verify_dataset


@pytest.fixture
def dataset(tmp_path):
    out = tmp_path / "ds"
    make_dataset(out)
    assert verify_dataset(out) == []
    return out


def rewrite_shard(root, name, edit):
    """Rewrite one shard with `edit(samples) -> samples` and update its manifest entry to match, so that
    only the content check can tell."""
    samples = edit(list(iter_samples(root / name)))
    with tarfile.open(root / name, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    m = json.loads((root / "manifest.json").read_text())
    data = (root / name).read_bytes()
    for e in m["shards"]:
        if e["file"] == name:
            e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps(m))


def test_flipped_byte_is_caught(dataset, capsys):
    path = dataset / "train-000000.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0x01
    path.write_bytes(bytes(data))
    assert any("train-000000.tar: sha256 differs" in p for p in verify_dataset(dataset))
    read_manifest(dataset)  # a loader's cheap check (sizes) passes...
    with pytest.raises(ManifestError, match="sha256"):
        read_manifest(dataset, check_hashes=True)  # ...the full one does not
    assert main(["verify", str(dataset), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "- train-000000.tar: sha256 differs" in err


def test_missing_shard_is_caught(dataset):
    (dataset / "val-000000.tar").unlink()
    assert "val-000000.tar: missing" in verify_dataset(dataset)
    with pytest.raises(ManifestError, match="val-000000.tar: missing"):
        read_manifest(dataset)


def test_truncated_shard_is_caught(dataset):
    path = dataset / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:3000])
    assert any("train-000001.tar: 3000 bytes, manifest says" in p for p in verify_dataset(dataset))


def test_extra_and_missing_samples_are_caught(dataset):
    rewrite_shard(dataset, "train-000000.tar", lambda s: s + [("zz-extra", dict(s[0][1]))])
    rewrite_shard(dataset, "train-000001.tar", lambda s: s[1:])
    problems = verify_dataset(dataset)
    assert any(p.startswith("train-000000.tar: 6 samples, manifest says 5") for p in problems)
    assert any(p.startswith("train-000001.tar: 4 samples, manifest says 5") for p in problems)


def test_bad_sample_contents_are_caught(dataset):
    def spoil(samples):
        (k0, m0), (k1, m1), (k2, m2), (k3, m3) = samples[:4]
        m0 = dict(m0, jpg=m0["jpg"][: len(m0["jpg"]) // 2])  # truncated JPEG
        m1 = dict(m1, cls=b"7")  # class out of range
        rec = json.loads(m2["json"])
        m2 = dict(m2, json=json.dumps(dict(rec, label="not_this_one")).encode())  # json.label != cls
        m3 = {k: v for k, v in m3.items() if k != "json"}
        return [(k0, m0), (k1, m1), (k2, m2), (k3, m3), (k0, samples[4][1])] + samples[5:]  # key repeated

    rewrite_shard(dataset, "train-000000.tar", spoil)
    problems = "\n".join(verify_dataset(dataset))
    assert "jpg does not decode" in problems
    assert "cls '7' is not a class number in 0..2" in problems
    assert "json label 'not_this_one' but cls" in problems
    assert "missing member(s) json" in problems
    assert "key also in train-000000.tar" in problems


def test_unlisted_shard_and_temp_files_are_caught(dataset):
    (dataset / "train-000099.tar").write_bytes((dataset / "train-000000.tar").read_bytes())
    (dataset / ".tmp-train-000100.tar.abc").write_bytes(b"half")
    problems = verify_dataset(dataset)
    assert any("train-000099.tar: a shard file the manifest does not list" in p for p in problems)
    assert any(".tmp-train-000100.tar.abc: unfinished temporary file" in p for p in problems)


def test_side_files_are_checked(dataset):
    (dataset / "class_indices.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    problems = verify_dataset(dataset)
    assert any(p.startswith("class_indices.json: ") for p in problems)
    assert any("json label" in p for p in problems)


def test_verify_ok_and_usage_errors(dataset, tmp_path, capsys):
    assert main(["verify", str(dataset), "--quiet"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["verify", str(empty), "--quiet"]) == 1
    assert "no manifest.json" in capsys.readouterr().err
    (dataset / "x.jpg").write_bytes(jpeg())  # unrelated files beside the shards are allowed
    assert verify_dataset(dataset) == []
