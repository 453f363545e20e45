"""benchmarks/safety_eval.py counts what it claims: a model that calls everything edible must be caught."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from serve_util import LABELS, SPECIES, full_builder, logits_for, make_export, photo

from mycodist.config import load_config
from mycodist.shards import DatasetWriter, WriterSettings, assign_splits

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "safety_eval.py"


@pytest.mark.slow
def test_safety_eval_catches_toxic_photos_called_edible(tmp_path):
    shards = tmp_path / "shards"
    cfg = load_config()
    keys = {lab: [f"{lab}-{i}" for i in range(4)] for lab in LABELS}
    splits = assign_splits(keys, 0.5)
    with DatasetWriter(shards, LABELS, SPECIES[:len(LABELS)], WriterSettings.from_config(cfg), source="test") as w:
        for lab, ks in keys.items():
            for i, k in enumerate(ks):
                w.write(splits[k], k, photo(colour=(40 * i, 90, 40)), lab, {"url": None})
    val = [k for k, s in splits.items() if s == "val"]
    toxic_val = [k for k in val if k.startswith(("amanita_letalis", "hebeloma_toxicum"))]
    # A reckless model: "king bolete, 99.9999%" for every photo; the OOD threshold is out of reach.
    export = make_export(tmp_path / "export", logits_for({"boletus_bonus": 0.999999}),
                         {"temperature": 1.0, "ood": {"score": "max_logit", "threshold": 1e6}}, builder=full_builder)

    out = subprocess.run([sys.executable, str(SCRIPT), "--export", str(export), "--shards", str(shards),
                          "--ood-images", "12"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # the same-run baseline (OOD check off) shows the reckless model for what it is...
    b = r["baseline_without_ood"]
    assert b["val_photos"] == len(val) and b["toxic_photos"] == len(toxic_val) > 0
    assert b["toxic_as_edible"] == len(toxic_val)
    assert b["coverage"] == 1.0 and b["ood_abstention"] == 0.0 and b["ood_as_edible"] == 12
    # ...and with the export's OOD rule (threshold out of reach) every photo is turned away
    c = r["configured"]
    assert c["ood_abstention"] == 1.0 and c["coverage"] == 0.0 and c["toxic_as_edible"] == 0
    # rule counts: each rule that fired, per photo
    assert c["rules_val"]["out_of_distribution"] == len(val) and b["rules_val"] == {}
    assert r["catalogue"]["classes"] == len(LABELS) and r["catalogue"]["with_lookalikes"] >= 3
