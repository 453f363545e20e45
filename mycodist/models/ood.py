"""Feature-space out-of-distribution score: how far a photo's features lie from every training class.

Logit scores (max-prob, energy) of a small network trained from scratch rate many non-mushroom photos as
*more* familiar than real ones, because the head extrapolates linearly far from the data. A distance in
the head's input space does not: class-conditional Gaussians with one shared covariance (Lee et al. 2018,
"A Simple Unified Framework for Detecting Out-of-Distribution Samples") are fitted on the training
split's features, and the score is the squared Mahalanobis distance to the nearest class mean
(high = unfamiliar). `relative_mahalanobis` (Ren et al. 2021) subtracts the distance under one
background Gaussian of all training features, which cancels directions every photo varies along.

The statistics travel in the export as `ood.safetensors`; the threshold is chosen on validation photos
and kept in calibration.json. This module knows nothing of either file's place: train (fit) and serve
(score) both import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from mycodist.atomic import atomic_write_bytes

SCORES = ("mahalanobis", "relative_mahalanobis")
# What the statistics are of: the head's input (forward_head(tokens, pre_logits=True)) concatenated with the
# mean of the final patch tokens. The class token alone is shaped by the classification loss and collapses
# much of what makes a texture or a drawing unlike a mushroom photo; the patch tokens keep it (docs/safety.md
# has the measurement: 57% → 99% abstention on generated non-mushrooms at the same validation cost).
FEATURES = "pre_logits+patch_mean"
QUANTILES = (0.5, 0.9, 0.95, 0.99)
_TENSORS = ("means", "precision", "background_mean", "background_precision")


def features_and_logits(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass → (OOD features, logits), both fp32; see FEATURES for what the features are.

    The head is applied to the very pre-logits that are scored, so serving pays nothing extra for them.
    Needs the timm-style `forward_features` / `forward_head(pre_logits=True)` / `head` and
    `num_prefix_tokens` of our VisionTransformer.
    """
    tokens = model.forward_features(images)
    pre = model.forward_head(tokens, pre_logits=True)
    patch_mean = tokens[:, int(getattr(model, "num_prefix_tokens", 1)):].mean(dim=1)
    return torch.cat([pre, patch_mean], dim=1).float(), model.head(pre).float()


def shrunk_covariance(centred: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """(1 - a) * sample covariance + a * (mean variance) * I, in float64.

    With a few thousand photos and a few hundred feature dimensions the sample covariance is
    ill-conditioned; shrinking towards a scaled identity keeps its inverse stable.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    x = centred.double()
    cov = x.T @ x / max(1, x.shape[0] - 1)
    scale = float(cov.diagonal().mean()) or 1.0
    return (1.0 - shrinkage) * cov + shrinkage * scale * torch.eye(cov.shape[0], dtype=torch.float64)


@dataclass
class FeatureGaussians:
    """Class means with one tied precision matrix, plus one background Gaussian of all features."""

    means: torch.Tensor  # (C, D)
    precision: torch.Tensor  # (D, D), shared by all classes
    background_mean: torch.Tensor  # (D,)
    background_precision: torch.Tensor  # (D, D)
    shrinkage: float = 0.1

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @cached_property
    def _expanded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float64 precision, P·mu_c and mu_c·P·mu_c, computed once: serving scores every batch with them."""
        p, mu = self.precision.double(), self.means.double()
        pmu = mu @ p
        return p, pmu, (pmu * mu).sum(1)

    def class_distances(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, D) → (N, C) squared Mahalanobis distances to each class mean (shared precision).

        Expanded as x·P·x - 2 x·P·mu + mu·P·mu (P symmetric): one (N, D) x (D, D) product per batch.
        """
        x = _check(feats, self.dim).double()
        p, pmu, mpm = self._expanded
        d = ((x @ p) * x).sum(1, keepdim=True) - 2.0 * x @ pmu.T + mpm[None, :]
        return d.clamp_min(0.0)

    def background_distance(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, D) → (N,) squared Mahalanobis distance under the background Gaussian."""
        x = _check(feats, self.dim).double() - self.background_mean.double()
        return ((x @ self.background_precision.double()) * x).sum(1).clamp_min(0.0)

    def score(self, feats: torch.Tensor, name: str = "mahalanobis") -> torch.Tensor:
        """(N, D) → (N,) float64 OOD score, higher = less like the training photos. NaN features → NaN."""
        d = self.class_distances(feats)
        if name == "mahalanobis":
            return d.min(1).values
        if name == "relative_mahalanobis":
            return (d - self.background_distance(feats)[:, None]).min(1).values
        raise ValueError(f"unknown OOD score {name!r}; use one of {SCORES}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).float().contiguous() for k in _TENSORS}


def _check(feats: torch.Tensor, dim: int) -> torch.Tensor:
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise ValueError(f"features must have shape (N, {dim}), got {tuple(feats.shape)}")
    return feats


def fit_feature_gaussians(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          shrinkage: float = 0.1) -> FeatureGaussians:
    """Fit on training features. A class with no photo gets the overall mean (so it attracts nothing odd)."""
    if feats.ndim != 2 or len(feats) != len(labels) or len(feats) < 2:
        raise ValueError(f"need (N >= 2, D) features with N labels, got {tuple(feats.shape)} and {len(labels)}")
    x = feats.double()
    y = labels.long()
    overall = x.mean(0)
    means = torch.stack([x[y == c].mean(0) if bool((y == c).any()) else overall for c in range(num_classes)])
    within = x - means[y]
    precision = torch.linalg.inv(shrunk_covariance(within, shrinkage))
    background = torch.linalg.inv(shrunk_covariance(x - overall, shrinkage))
    return FeatureGaussians(means.float(), precision.float(), overall.float(), background.float(), float(shrinkage))


def quantiles(scores: torch.Tensor) -> dict[str, float]:
    """The score's distribution on a split, for calibration.json (q50 ... q99, min, max, mean)."""
    s = scores.double()[torch.isfinite(scores.double())]
    if not len(s):
        return {}
    out = {f"q{round(q * 100):02d}": float(torch.quantile(s, q)) for q in QUANTILES}
    out.update(min=float(s.min()), max=float(s.max()), mean=float(s.mean()))
    return out


def threshold_keeping(scores: torch.Tensor, keep: float) -> float:
    """The score below which `keep` of these (in-distribution validation) photos fall: they stay answered."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    s = scores.double()[torch.isfinite(scores.double())]
    if not len(s):
        raise ValueError("no finite scores to choose a threshold from")
    return float(torch.quantile(s, keep))


def save_feature_gaussians(path: str | Path, stats: FeatureGaussians, metadata: dict[str, Any] | None = None) -> None:
    """Write `stats` as safetensors (atomically); metadata values are stored as strings."""
    from safetensors.torch import save

    meta = {"features": FEATURES, "shrinkage": str(stats.shrinkage), "classes": str(stats.num_classes),
            "dim": str(stats.dim)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(Path(path), save(stats.state_dict(), metadata=meta))


def load_feature_gaussians(path: str | Path) -> tuple[FeatureGaussians, dict[str, str]]:
    """Read what save_feature_gaussians wrote; raises ValueError when the file is not a consistent set."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing = [k for k in _TENSORS if k not in names]
        if missing:
            raise ValueError(f"'{path}' lacks {missing}; is it an OOD statistics file from `mycodist export`?")
        t = {k: f.get_tensor(k).float() for k in _TENSORS}
        meta = dict(f.metadata() or {})
    c, d = t["means"].shape if t["means"].ndim == 2 else (0, 0)
    shapes_ok = (d > 0 and t["precision"].shape == (d, d) and t["background_precision"].shape == (d, d)
                 and t["background_mean"].shape == (d,))
    if not shapes_ok or not all(bool(torch.isfinite(v).all()) for v in t.values()):
        raise ValueError(f"'{path}' holds inconsistent or non-finite statistics (means {tuple(t['means'].shape)})")
    shrinkage = float(meta.get("shrinkage", "nan"))
    return FeatureGaussians(t["means"], t["precision"], t["background_mean"], t["background_precision"],
                            shrinkage if math.isfinite(shrinkage) else 0.0), meta
