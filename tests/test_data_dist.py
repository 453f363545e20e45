"""Multi-process checks: a real 2-rank gloo run over uneven shards, and `mycodist data plan`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_util import loader_config, make_shards
from omegaconf import OmegaConf

from mycodist.data import DataSpec
from mycodist.data.plan import simulate_rank, summarise

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uneven_dist")
    make_shards(out, [5, 50, 200], [7, 6], corrupt=frozenset({30}))
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_gloo_ranks_with_an_all_reduce_per_step_finish(uneven, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "data_dist_script.py"), str(uneven), str(tmp_path)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * ranks[0]["len"] == 2 * 31
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])  # ranks read disjoint samples
    assert ranks[0]["val_total"] == ranks[1]["val_total"] == 13


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_plan_command_reports_equal_batches_and_exact_eval(uneven):
    cmd = [sys.executable, "-m", "mycodist", "data", "plan", str(uneven), "--world-size", "2", "--workers", "1",
           "train.batch_size=4"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (epoch,) = result["epochs"]
    assert epoch["equal_batches"] and epoch["batches_per_rank"] == 31 and epoch["duplicates"] == 0
    bad = sum(result["bad_samples"].values())
    assert set(result["bad_samples"]) <= {"decode"} and bad <= 1  # the corrupted sample, unless in the remainder
    assert epoch["misses"] == 255 - 248 + bad and result["padded"] == bad
    assert result["val"] == {"samples": 13, "distinct": 13, "duplicates": 0, "misses": 0,
                             "batches_per_rank": [2], "bad": 0}
    assert not any("shards <" in w for w in result["warnings"])  # 3 shards for 2 ranks x 1 worker
    assert "batches on every rank" in proc.stdout


def test_plan_summary_flags_bad_data_and_few_shards(uneven):
    cfg = loader_config(uneven, "data.workers=2", "data.max_bad_fraction=1.0")
    spec = DataSpec.from_config(cfg)
    ranks = [simulate_rank(OmegaConf.to_yaml(cfg), r, 3, 1, spec) for r in range(3)]
    result = summarise(cfg, spec, 3, ranks)
    assert result["ok"] and result["epochs"][0]["equal_batches"]
    assert result["epochs"][0]["duplicates"] == 0
    assert result["val"]["distinct"] == 13 and result["val"]["duplicates"] == 0
    assert any("3 train shards < 3 ranks x 2 workers" in w for w in result["warnings"])
    bad = sum(result["bad_samples"].values())
    assert bad <= 1 and any("bad samples skipped" in w for w in result["warnings"]) == (bad == 1)
