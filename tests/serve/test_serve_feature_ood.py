"""The feature-distance OOD check through the API: crafted statistics decide, an old export falls back."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest
import torch
from serve_util import LABELS, logits_for, make_export, photo, run_client, tiny_builder

from mycodist.config import load_config
from mycodist.errors import UsageError
from mycodist.models.ood import FeatureGaussians, features_and_logits, save_feature_gaussians
from mycodist.serve.app import build_service_app
from mycodist.serve.inference import load_export
from mycodist.serve.preprocess import decode_image

CONFIDENT_EDIBLE = logits_for({"boletus_bonus": 0.999999})


def form(data: bytes) -> aiohttp.FormData:
    f = aiohttp.FormData()
    f.add_field("image", data, filename="photo.jpg", content_type="image/jpeg")
    return f


def features_of_photo(export_dir, image: bytes) -> torch.Tensor:
    ex = load_export(export_dir, builder=tiny_builder)
    x = ex.transform(decode_image(image, 10**9, ex.transform)).unsqueeze(0)
    with torch.no_grad():
        return features_and_logits(ex.model, x)[0][0]


def with_stats(export_dir, centre: torch.Tensor, threshold: float, classes: int = len(LABELS)) -> None:
    """Every class mean at `centre`, identity precision: the score is the squared distance to `centre`."""
    d = centre.numel()
    stats = FeatureGaussians(centre.repeat(classes, 1), torch.eye(d), centre.clone(), torch.eye(d))
    save_feature_gaussians(export_dir / "ood.safetensors", stats)
    cal = {"temperature": 1.0, "ood_scores_on_val": {"neg_energy": {"q05": -1e6}},
           "feature_ood": {"score": "mahalanobis", "threshold": threshold,
                           "val_quantiles": {"q50": threshold / 2, "q95": threshold}}}
    (export_dir / "calibration.json").write_text(json.dumps(cal))


def ask(export_dir, image: bytes, **serve) -> dict:
    cfg = load_config(None, [f"serve.{k}={v}" for k, v in serve.items()])
    out = {}

    async def body(client):
        r = await client.post("/api/v1/predict", data=form(image))
        assert r.status == 200, await r.text()
        out.update(await r.json())

    run_client(build_service_app(export_dir, cfg, builder=tiny_builder), body)
    return out


def test_feature_distance_decides_not_identified(tmp_path):
    """The model says "king bolete, 99.9999%" for any photo; only the feature statistics differ."""
    image = photo()
    near = make_export(tmp_path / "near", CONFIDENT_EDIBLE)
    far = make_export(tmp_path / "far", CONFIDENT_EDIBLE)
    f = features_of_photo(near, image)
    with_stats(near, f, threshold=1.0)  # the photo sits on the class means: score ≈ 0
    with_stats(far, f + 10.0, threshold=1.0)  # every mean 10 away in each of d dims: score = 100 d

    ans = ask(near, image)
    assert ans["ood"]["score_name"] == "mahalanobis" and ans["ood"]["ood_when"] == "above"
    assert ans["ood"]["score"] == pytest.approx(0.0, abs=1e-3) and ans["ood"]["out_of_distribution"] is False
    assert ans["verdict"]["code"] == "edible_species"

    ans = ask(far, image)
    assert ans["ood"]["score"] == pytest.approx(100.0 * f.numel(), rel=1e-4)
    assert ans["ood"]["out_of_distribution"] is True and ans["ood"]["threshold"] == 1.0
    assert ans["verdict"]["code"] == "not_identified"
    assert "does not look like" in ans["verdict"]["message"] and ans["warning"]

    off = ask(far, image, ood_features="false")  # the logit rule alone (threshold out of the way)
    assert off["ood"]["score_name"] == "neg_energy" and off["verdict"]["code"] == "edible_species"
    assert ask(far, image, ood="false")["ood"] is None


def test_serve_ood_quantile_picks_the_validation_quantile(tmp_path):
    image = photo()
    export = make_export(tmp_path / "q", CONFIDENT_EDIBLE)
    f = features_of_photo(export, image)
    with_stats(export, f, threshold=1e9)  # val_quantiles: q50 = 5e8, q95 = 1e9
    ex = load_export(export, builder=tiny_builder, ood_quantile=0.5)
    assert ex.feature_ood.threshold == 5e8 and ex.feature_ood.source.endswith("val_quantiles.q50")
    ex = load_export(export, builder=tiny_builder, ood_quantile=0.05)
    assert ex.feature_ood.threshold == 1e9


def test_old_export_without_statistics_falls_back_with_a_warning(tmp_path, caplog):
    old = make_export(tmp_path / "old", CONFIDENT_EDIBLE,
                      {"temperature": 1.0, "ood_scores_on_val": {"neg_energy": {"q05": 1e6}}})
    with caplog.at_level(logging.WARNING, logger="mycodist.serve.inference"):
        ans = ask(old, photo())
    assert any("ood.safetensors" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    assert ans["ood"]["score_name"] == "neg_energy" and ans["verdict"]["code"] == "not_identified"


def test_statistics_that_do_not_fit_the_model_refuse_to_load(tmp_path):
    export = make_export(tmp_path / "bad", CONFIDENT_EDIBLE)
    f = features_of_photo(export, photo())
    with_stats(export, f, threshold=1.0, classes=len(LABELS) - 1)
    with pytest.raises(UsageError, match="classes"):
        load_export(export, builder=tiny_builder)
    (export / "ood.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="ood.safetensors"):
        load_export(export, builder=tiny_builder)
