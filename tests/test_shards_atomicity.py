"""A writer killed with SIGKILL mid-shard must leave nothing that a reader accepts, and resume cleanly."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from shards_util import LABELS, SPECIES, config, jpeg

from mycodist.shards import DatasetWriter, ManifestError, WriterSettings, read_manifest
from mycodist.shards.tarshard import list_shards
from mycodist.shards.verify import verify_dataset

WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from shards_util import LABELS, SPECIES, config, jpeg
    from mycodist.shards import DatasetWriter, WriterSettings
    w = DatasetWriter(sys.argv[1], LABELS, SPECIES, WriterSettings.from_config(config("shards.max_samples=5")),
                      on_shard_closed=lambda split, path, keys: print("closed", path.name, flush=True))
    for i in range(8):
        w.write("train", f"k{{i:03d}}", jpeg(noise_seed=i), LABELS[i % 3], {{}})
    print("mid-shard", flush=True)
    time.sleep(60)
""")


@pytest.mark.slow
def test_killed_writer_leaves_no_acceptable_half_shard(tmp_path):
    out = tmp_path / "ds"
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).parent)))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "closed train-000000.tar"
        assert proc.stdout.readline().strip() == "mid-shard"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    # the second shard exists only as a temporary file that no shard pattern matches
    assert [p.name for p in list_shards(out)] == ["train-000000.tar"]
    assert len(list(out.glob(".tmp-train-000001.tar.*"))) == 1
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar"]
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(out)
    assert any("no manifest.json" in p for p in verify_dataset(out))

    # resume keeps the complete shard, drops the temporary one, and numbers new shards after it
    with DatasetWriter(out, LABELS, SPECIES, WriterSettings.from_config(config("shards.max_samples=5")), resume=True) as w:
        assert w.keys == {f"k{i:03d}" for i in range(5)}
        for i in range(5, 12):
            w.write("train", f"k{i:03d}", jpeg(noise_seed=i), LABELS[i % 3], {})
    m = read_manifest(out, check_hashes=True)
    assert [s.file for s in m.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert m.samples("train") == 12
    assert not list(out.glob(".tmp-*"))
    assert verify_dataset(out) == []


def test_resume_refuses_other_labels(tmp_path):
    with DatasetWriter(tmp_path, LABELS, SPECIES, WriterSettings.from_config(config())) as w:
        w.write("train", "a", jpeg(), LABELS[0], {})
    with pytest.raises(ValueError, match="other labels"):
        DatasetWriter(tmp_path, list(reversed(LABELS)), SPECIES, WriterSettings.from_config(config()), resume=True)
    read_manifest(tmp_path)  # the refused resume left the data set as it was
