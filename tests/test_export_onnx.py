"""`mycodist export RUN_DIR --onnx`: the ONNX graphs next to the safetensors, checked on the run's validation
photos, and served by ONNX Runtime. One process, a hand-made checkpoint of a tiny ViT, real shards."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from train_util import fake_run

from mycodist.catalog import CLASS_INDICES, load_class_indices
from mycodist.cli import main as cli
from mycodist.config import CONFIG_FILENAME, load_config
from mycodist.export import onnx as onnx_export
from mycodist.serve.app import build_service_app
from mycodist.serve.inference import load_export
from mycodist.serve.onnx_runtime import build_predictor
from mycodist.verdict import SafetyRules

pytest.importorskip("onnxruntime")


def test_export_onnx_flag_writes_checked_graphs_that_serve_loads(tmp_path, capsys):
    shards, run = fake_run(tmp_path, per_class=10)
    cfg = load_config(run / CONFIG_FILENAME)
    labels = load_class_indices(run / CLASS_INDICES)

    assert cli(["export", str(run), "--onnx", "export.int8=dynamic"]) == 0
    out = run / "export"
    meta = json.loads((out / onnx_export.ONNX_META).read_text())
    manifest = json.loads((shards / "manifest.json").read_text())
    n_val = manifest["totals"]["val"]["samples"]
    assert meta["photos"] == n_val and meta["fp32"]["max_abs_diff_logits"] <= 1e-4
    assert meta["int8"]["method"] == "dynamic" and meta["int8"]["top1_drop"] is not None
    verdicts = meta["int8"]["verdicts"]  # int8 vs fp32 verdicts, counted by the export, under the run's serve.*
    assert verdicts["photos"] == n_val and 0.0 <= verdicts["verdict_agreement"] <= 1.0
    assert verdicts["conditions"]["feature_ood"]["score"] == "mahalanobis"
    assert verdicts["conditions"]["labels"] == len(labels) and verdicts["conditions"]["uncalibrated"] == ""
    kept = load_file(str(out / onnx_export.ONNX_VAL))
    assert kept["labels"].shape == (n_val,) and kept["logits_int8"].shape == (n_val, len(labels))
    assert (out / onnx_export.ONNX_FILE).is_file() and (out / onnx_export.INT8_FILE).is_file()
    assert not list(run.glob(".tmp-*"))

    app = build_service_app(out, load_config(None, ["serve.runtime=onnxruntime", "serve.precision=int8",
                                                    "serve.int8_min_agreement=0"]))
    assert app is not None
    # serve with the run's settings takes the recorded rate as it is
    int8_cfg = load_config(None, ["serve.runtime=onnxruntime", "serve.precision=int8", "serve.int8_min_agreement=0"])
    ex8 = load_export(out)
    build_predictor(ex8, out, SafetyRules.from_config(int8_cfg.serve), int8_cfg.serve)
    assert ex8.info["int8"]["source"] == "onnx.json (export)"
    assert ex8.info["int8"]["verdict_agreement"] == verdicts["verdict_agreement"]
    # the feature OOD check works the same on ONNX Runtime: same scores and verdicts as PyTorch's
    ex = load_export(out)
    assert ex.feature_ood is not None
    photos, _ = onnx_export.validation_images(cfg, 6)
    answers = {}
    for runtime in ("torch", "onnxruntime"):
        serve = load_config(None, [f"serve.runtime={runtime}"]).serve
        answers[runtime] = build_predictor(ex, out, SafetyRules.from_config(serve), serve).predict(list(photos))
    for a, b in zip(answers["torch"], answers["onnxruntime"], strict=True):
        assert b["ood"]["score_name"] == "mahalanobis"
        assert b["ood"]["score"] == pytest.approx(a["ood"]["score"], rel=1e-3, abs=1e-3)
        assert b["verdict"]["code"] == a["verdict"]["code"] and b["model"]["runtime"] == "onnxruntime"
    # without the flag (and export.onnx=false, the default) no ONNX file is written
    assert cli(["export", str(run)]) == 0
    assert not (out / onnx_export.ONNX_FILE).exists()
    capsys.readouterr()
