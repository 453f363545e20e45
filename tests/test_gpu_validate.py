"""The prepared GPU check cannot rot: its CPU dry run runs every stage at toy sizes, writes at most 8 files
(the device call returns no more) and ends with the same JSON summary as the real run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_validate_dry_run_passes_every_stage(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONUNBUFFERED": "1", "GPU_VALIDATE_LIMIT": "880"}
    proc = subprocess.run(["bash", "benchmarks/gpu_validate.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "gpu_validate" and summary["dry_run"] is True
    assert summary["status"] == dict.fromkeys(("env", "nccl", "attention", "train", "timm", "decode"), "ok")
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "validate.log" in files and "summary.json" in files, files
    nccl = json.loads((out / "nccl.json").read_text())
    assert nccl["world_size"] == 1 and nccl["helper_rejects_cpu_tensor"] is True
    decoding = json.loads((out / "decode.json").read_text())["cpu_loader_decoding"]
    assert set(decoding) == {"region_decoder", "simplejpeg", "c_resize"}, decoding
    train = json.loads((out / "train.json").read_text())
    for launcher in ("accelerate", "deepspeed", "torchrun"):
        run = train["runs"][launcher]
        assert run["resumed"] and run["exported"] and run["images_per_s"] > 0, (launcher, run)
    assert isinstance(train["ours_vs_bare"], dict) and train["ours_vs_bare"]["ratio"] > 0
