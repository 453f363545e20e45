"""`mycodist export` writes the feature OOD statistics: fitted on train photos, thresholded on validation
photos, loadable by serving. One process, a hand-made checkpoint of a tiny ViT, real shards."""

from __future__ import annotations

import json

import pytest
import torch
from train_util import fake_run

from mycodist.catalog import CLASS_INDICES, SPECIES, load_class_indices
from mycodist.config import CONFIG_FILENAME, load_config
from mycodist.export.artifact import OOD_FILE
from mycodist.export.build import export_run, split_outputs
from mycodist.models import build_model
from mycodist.models.ood import load_feature_gaussians
from mycodist.serve.inference import load_export


def test_export_writes_ood_statistics_that_serving_loads(tmp_path):
    shards, run = fake_run(tmp_path)
    cfg = load_config(run / CONFIG_FILENAME)
    labels = load_class_indices(run / CLASS_INDICES)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(labels)).eval()  # the weights fake_run saved

    out = export_run(run)

    cal = json.loads((out / "calibration.json").read_text())
    entry = cal["feature_ood"]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert entry["file"] == OOD_FILE and entry["score"] == "mahalanobis"
    assert entry["train_photos"] == manifest["totals"]["train"]["samples"]
    assert entry["val_photos"] == manifest["totals"]["val"]["samples"]
    stats, meta = load_feature_gaussians(out / OOD_FILE)
    assert stats.num_classes == len(labels) and stats.dim == 2 * model.num_features
    assert float(meta["threshold"]) == pytest.approx(entry["threshold"])

    # the threshold is the q95 of the score on the validation photos, as serving will compute it
    val_feats, _, _ = split_outputs(model, cfg, "val")
    val_scores = stats.score(val_feats, "mahalanobis")
    assert entry["threshold"] == pytest.approx(float(torch.quantile(val_scores, 0.95)), rel=1e-5)
    assert entry["val_quantiles"]["q95"] == pytest.approx(entry["threshold"])
    # and the class means are those of the train photos through the eval transform
    train_feats, _, train_y = split_outputs(model, cfg, "train")
    assert torch.allclose(stats.means[0], train_feats[train_y == 0].mean(0), atol=1e-4)

    ex = load_export(out)
    assert ex.feature_ood is not None and ex.feature_ood.threshold == pytest.approx(entry["threshold"])
    assert ex.info["feature_ood"]["score"] == "mahalanobis"


def test_export_merges_the_catalogue_with_the_lookalike_reference_again(tmp_path):
    """A run whose catalogue says a death cap is edible and knows no lookalikes: the export's species.json
    has it deadly (the most dangerous source wins, the disagreement kept) and the field mushroom linked to
    its deadly lookalikes both ways."""
    from mycodist.catalog import Species, load_species, save_species

    _, run = fake_run(tmp_path, per_class=6)
    labels = load_class_indices(run / CLASS_INDICES)
    site = {labels[0]: Species(labels[0], "Agaricus campestris", "field mushroom", edibility="edible", source="site"),
            labels[1]: Species(labels[1], "Amanita phalloides", "death cap", edibility="edible", source="site")}
    site.update({lab: Species(lab, "", lab, source="site") for lab in labels[2:]})
    save_species(run / SPECIES, site.values())

    out = export_run(run)

    species = load_species(out / SPECIES)
    cap, field = species[labels[1]], species[labels[0]]
    assert cap.edibility == "deadly" and cap.edibility_sources.get("site") == "edible"
    assert labels[1] in field.lookalikes and labels[0] in cap.lookalikes  # symmetric
    assert field.lookalike_record and any("phalloides" in n.get("scientific_name", "").lower()
                                          for n in field.lookalike_notes.values())
