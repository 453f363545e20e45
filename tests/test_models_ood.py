"""The feature-space OOD score: Gaussian fit against numpy, distances on known clusters, file round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mycodist.models import create_model
from mycodist.models.ood import (
    SCORES,
    features_and_logits,
    fit_feature_gaussians,
    load_feature_gaussians,
    quantiles,
    save_feature_gaussians,
    threshold_keeping,
)

D, C, PER_CLASS = 8, 3, 400


def clusters(seed: int = 0, per_class: int = PER_CLASS) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """C Gaussian clusters with well separated means and one shared, correlated covariance."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 6, (C, D))
    a = rng.normal(0, 1, (D, D))
    chol = np.linalg.cholesky(a @ a.T / D + 0.5 * np.eye(D))
    x = np.concatenate([means[c] + rng.normal(0, 1, (per_class, D)) @ chol.T for c in range(C)])
    y = np.repeat(np.arange(C), per_class)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y), means, chol


def test_precision_and_distances_match_numpy():
    x, y, _, _ = clusters()
    stats = fit_feature_gaussians(x, y, C, shrinkage=0.2)
    xn, yn = x.double().numpy(), y.numpy()
    mu = np.stack([xn[yn == c].mean(0) for c in range(C)])
    within = xn - mu[yn]
    cov = within.T @ within / (len(xn) - 1)
    shrunk = 0.8 * cov + 0.2 * np.trace(cov) / D * np.eye(D)
    precision = np.linalg.inv(shrunk)
    np.testing.assert_allclose(stats.means.numpy(), mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.precision.numpy(), precision, rtol=1e-4, atol=1e-6)
    g = np.random.default_rng(1).normal(0, 5, (7, D))
    expected = np.einsum("nci,ij,ncj->nc", g[:, None] - mu[None], precision, g[:, None] - mu[None])
    got = stats.class_distances(torch.tensor(g, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_allclose(stats.score(torch.tensor(g, dtype=torch.float32)).numpy(), expected.min(1), rtol=1e-4)
    # relative Mahalanobis: minus the distance under one Gaussian of all features
    overall = xn.mean(0)
    bg_cov = (xn - overall).T @ (xn - overall) / (len(xn) - 1)
    bg_prec = np.linalg.inv(0.8 * bg_cov + 0.2 * np.trace(bg_cov) / D * np.eye(D))
    bg = np.einsum("ni,ij,nj->n", g - overall, bg_prec, g - overall)
    rel = stats.score(torch.tensor(g, dtype=torch.float32), "relative_mahalanobis").numpy()
    np.testing.assert_allclose(rel, (expected - bg[:, None]).min(1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("score", SCORES)
def test_in_distribution_points_score_low_and_far_points_high(score):
    x, y, means, chol = clusters()
    stats = fit_feature_gaussians(x, y, C)
    rng = np.random.default_rng(7)

    def draw(n: int) -> torch.Tensor:  # new photos of the same classes
        return torch.tensor(np.concatenate([means[c] + rng.normal(0, 1, (n, D)) @ chol.T for c in range(C)]),
                            dtype=torch.float32)

    val, held_out = draw(100), draw(50)
    direction = rng.normal(0, 1, (60, D))
    far = torch.tensor(means.mean(0) + 60 * direction / np.linalg.norm(direction, axis=1, keepdims=True),
                       dtype=torch.float32)
    s_in, s_far = stats.score(held_out, score), stats.score(far, score)
    threshold = threshold_keeping(stats.score(val, score), 0.95)
    assert float((s_in <= threshold).double().mean()) >= 0.85
    assert bool((s_far > threshold).all()) and float(s_far.min()) > float(s_in.max())
    if score == "mahalanobis":  # squared distance in D dims: mean near D for held-out points
        assert D * 0.5 < float(s_in.mean()) < D * 2.0


def test_threshold_and_quantiles_describe_the_validation_scores():
    s = torch.arange(1, 101, dtype=torch.float64)
    t = threshold_keeping(s, 0.95)
    assert float((s <= t).double().mean()) == pytest.approx(0.95, abs=0.011)
    q = quantiles(torch.cat([s, torch.tensor([float("nan")])]))
    assert set(q) == {"q50", "q90", "q95", "q99", "min", "max", "mean"}
    assert q["q95"] == pytest.approx(t) and q["min"] == 1 and q["max"] == 100
    with pytest.raises(ValueError):
        threshold_keeping(s, 0.0)


def test_nan_features_give_nan_scores_and_bad_shapes_are_refused():
    x, y, _, _ = clusters()
    stats = fit_feature_gaussians(x, y, C)
    bad = torch.full((2, D), float("nan"))
    assert bool(torch.isnan(stats.score(bad)).all())  # serving counts NaN as out of distribution
    with pytest.raises(ValueError):
        stats.score(torch.zeros(2, D + 1))
    with pytest.raises(ValueError):
        fit_feature_gaussians(x, y, C, shrinkage=1.5)


def test_class_without_photos_gets_the_overall_mean():
    x, y, _, _ = clusters()
    stats = fit_feature_gaussians(x, y, C + 1)
    assert torch.allclose(stats.means[C], x.mean(0), atol=1e-5)


def test_file_round_trip_and_corrupt_files(tmp_path):
    x, y, _, _ = clusters()
    stats = fit_feature_gaussians(x, y, C)
    path = tmp_path / "ood.safetensors"
    save_feature_gaussians(path, stats, {"score": "mahalanobis"})
    back, meta = load_feature_gaussians(path)
    assert meta["score"] == "mahalanobis" and int(meta["dim"]) == D and float(meta["shrinkage"]) == 0.1
    probe = torch.randn(5, D) * 4
    torch.testing.assert_close(back.score(probe), stats.score(probe))
    from safetensors.torch import save_file

    save_file({"means": stats.means}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        load_feature_gaussians(tmp_path / "partial.safetensors")
    broken = stats.state_dict()
    broken["precision"] = torch.zeros(D + 1, D + 1)
    save_file(broken, str(tmp_path / "mismatch.safetensors"))
    with pytest.raises(ValueError, match="inconsistent"):
        load_feature_gaussians(tmp_path / "mismatch.safetensors")


def test_features_come_from_the_same_pass_as_the_logits():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16", 5, img_size=32, embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats, logits = features_and_logits(model, x)
        torch.testing.assert_close(logits, model(x))
        tokens = model.forward_features(x)
    assert feats.shape == (3, 64)
    torch.testing.assert_close(feats[:, :32], tokens[:, 0])  # class-token pre-logits (token pooling)
    torch.testing.assert_close(feats[:, 32:], tokens[:, 1:].mean(1))
