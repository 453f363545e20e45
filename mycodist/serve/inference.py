"""The export folder → a ready model, and logits → the API's answer. Shared by `predict` and `serve`.

Export folder (layout: mycodist/export/artifact.py; written by `mycodist export`, docs/serving.md):
  model.safetensors   fp32 state dict, timm-style names
  config.yaml         the resolved run config (model group builds the model, img_size/mean/std preprocess)
  class_indices.json  {"0": label, ...}
  species.json        the catalogue (edibility, lookalikes, ...)
  calibration.json    {"temperature": T, "ood_scores_on_val": {score: {"q01": .., "q05": .., ...}}}
                      and/or an explicit {"ood": {"score": name, "threshold": t}} (which wins);
                      "feature_ood": {"score": "mahalanobis", "threshold": t, "val_quantiles": {...}, ...}
  ood.safetensors     feature statistics for the feature-distance OOD score (mycodist.models.ood)

The OOD check is the feature-distance score when the export has ood.safetensors (score above the
threshold → out of distribution); an older export without it falls back, with a warning, to the logit
score, computed on the calibrated logits (logits / T) as the export computes its quantiles.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from mycodist import __version__
from mycodist.catalog import CLASS_INDICES, SPECIES, Species, load_class_indices, load_species
from mycodist.errors import UsageError
from mycodist.export.artifact import CALIBRATION, CONFIG_FILE, MODEL_FILE, OOD_FILE, file_sha256, read_export
from mycodist.models import ood as feature_ood
from mycodist.serve.failsafe import calibration_problems
from mycodist.serve.preprocess import EvalTransform
from mycodist.serve.verdict import WARNING, SafetyRules, decide

log = logging.getLogger(__name__)

OOD_SCORES = ("max_logit", "max_prob", "neg_energy")
OOD_ALIASES = {"energy": "neg_energy"}
ModelBuilder = Callable[[Any, int], torch.nn.Module]


@dataclass(frozen=True)
class OodRule:
    """An in-distribution score of the calibrated logits (higher = more familiar); below `threshold` → OOD.

    max_logit: the largest logit; max_prob: the largest probability; neg_energy: logsumexp of the logits.
    The threshold is a low quantile of the score on validation photos (e.g. q05: 5% of real photos of
    known species are turned away), so it is calibrated, not guessed.
    """

    score: str
    threshold: float
    source: str = ""

    def scores(self, scaled_logits: torch.Tensor) -> torch.Tensor:
        if self.score == "max_logit":
            return scaled_logits.max(dim=-1).values
        if self.score == "max_prob":
            return scaled_logits.softmax(dim=-1).max(dim=-1).values
        return torch.logsumexp(scaled_logits, dim=-1)


@dataclass(frozen=True)
class FeatureOodRule:
    """A distance of the photo's features from the training photos' (higher = less familiar); above
    `threshold` → OOD. The threshold is a high quantile of the score on validation photos (q95: 5% of
    real photos of known species are turned away), chosen by the export."""

    stats: feature_ood.FeatureGaussians
    score: str
    threshold: float
    source: str = ""

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        return self.stats.score(feats, self.score)

    def describe(self) -> dict[str, Any]:
        return {"score": self.score, "threshold": self.threshold, "source": self.source, "ood_when": "above"}


@dataclass
class Export:
    model: torch.nn.Module
    labels: list[str]
    species: dict[str, Species]
    temperature: float
    ood: OodRule | None
    transform: EvalTransform
    info: dict[str, Any] = field(default_factory=dict)
    feature_ood: FeatureOodRule | None = None


def default_builder(model_cfg: Any, num_classes: int) -> torch.nn.Module:
    """The training architecture, without what only training needs: the export's weights replace any
    pretrained ones (which may not even be on this machine) and gradient checkpointing is off."""
    from mycodist.models import build_model  # the models package is heavy; import it only when serving

    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    cfg.update(pretrained="", grad_checkpointing=False)
    return build_model(cfg, num_classes)


def read_calibration(path: Path, score: str = "neg_energy", quantile: float = 0.05) -> tuple[float, OodRule | None]:
    """Temperature and OOD rule; anything missing is tolerated with a warning (T = 1, OOD check off).

    The rule is the explicit `ood` entry if present, else `ood_scores_on_val[score]["qNN"]` for `quantile`.
    """
    if not path.is_file():
        log.warning("%s is missing: probabilities are uncalibrated (T = 1) and the OOD check is off", path)
        return 1.0, None
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read calibration '{path}': {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"'{path}' must hold a JSON object like {{\"temperature\": 1.3}}")
    t = raw.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise UsageError(f"'{path}': temperature must be a positive number, got {t!r}")
    ood = raw.get("ood")
    if isinstance(ood, dict) and isinstance(ood.get("threshold"), (int, float)):
        name = OOD_ALIASES.get(str(ood.get("score")), str(ood.get("score")))
        if name not in OOD_SCORES:
            raise UsageError(f"'{path}': ood.score {ood.get('score')!r} is not one of {OOD_SCORES}")
        return float(t), OodRule(name, float(ood["threshold"]), "calibration.json ood")
    name = OOD_ALIASES.get(score, score)
    key = f"q{round(quantile * 100):02d}"
    stats = raw.get("ood_scores_on_val")
    value = stats.get(name, {}).get(key) if isinstance(stats, dict) and isinstance(stats.get(name), dict) else None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        log.warning("%s has no OOD statistic ood_scores_on_val.%s.%s: the out-of-distribution check is off",
                    path, name, key)
        return float(t), None
    return float(t), OodRule(name, float(value), f"calibration.json ood_scores_on_val.{name}.{key}")


def read_feature_ood(export_dir: Path, num_classes: int, quantile: float = 0.05) -> FeatureOodRule | None:
    """The feature-distance rule from ood.safetensors + calibration.json's `feature_ood`, or None.

    An export written before this check existed has neither: that is logged and the caller falls back to
    the logit score. A file that exists but does not fit (wrong classes, corrupt) is an error: serving
    with a silently missing safety check is worse than not starting. The threshold is the validation
    quantile that turns away `quantile` of real photos (`val_quantiles.q95` for 0.05) when the export
    recorded it, else the export's own threshold.
    """
    path, cal = export_dir / OOD_FILE, export_dir / CALIBRATION
    entry = None
    if cal.is_file():
        try:
            raw = json.loads(cal.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read calibration '{cal}': {e}") from None
        entry = raw.get("feature_ood") if isinstance(raw, dict) else None
    if not path.is_file() or not isinstance(entry, dict):
        log.warning("'%s' has no %s with a calibration.json feature_ood entry (exported before the feature "
                    "OOD check, or without validation data): falling back to the logit-based OOD check, which "
                    "misses most non-mushroom photos; re-export with `mycodist export RUN_DIR`", export_dir, OOD_FILE)
        return None
    try:
        stats, _ = feature_ood.load_feature_gaussians(path)
    except (ValueError, OSError) as e:  # safetensors raises its own error types for a corrupt file
        raise UsageError(f"'{path}' cannot be used: {e}") from None
    except Exception as e:
        raise UsageError(f"'{path}' is not a readable safetensors file: {e}") from None
    if stats.num_classes != num_classes:
        raise UsageError(f"'{path}' has statistics for {stats.num_classes} classes, the model has {num_classes}; "
                         "re-export with `mycodist export RUN_DIR`")
    score = str(entry.get("score", "mahalanobis"))
    if score not in feature_ood.SCORES:
        raise UsageError(f"'{cal}': feature_ood.score {score!r} is not one of {feature_ood.SCORES}")
    key = f"q{100 - round(quantile * 100):02d}"
    table = entry.get("val_quantiles") if isinstance(entry.get("val_quantiles"), dict) else {}
    for value, source in ((table.get(key), f"calibration.json feature_ood.val_quantiles.{key}"),
                          (entry.get("threshold"), "calibration.json feature_ood.threshold")):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            if source.endswith("threshold") and table:
                log.warning("%s has no validation quantile %s for serve.ood_quantile=%s: using the export's "
                            "threshold", cal, key, quantile)
            return FeatureOodRule(stats, score, float(value), source)
    raise UsageError(f"'{cal}': feature_ood has no finite threshold; re-export with `mycodist export RUN_DIR`")


def load_export(export_dir: str | Path, device: str = "cpu", builder: ModelBuilder | None = None,
                ood_score: str = "neg_energy", ood_quantile: float = 0.05) -> Export:
    """Load and check everything once, at start-up, so a broken export fails before serving a request."""
    folder = read_export(export_dir)  # layout and version checked; names what is missing
    d = folder.path
    try:
        cfg = OmegaConf.load(d / CONFIG_FILE)
    except Exception as e:
        raise UsageError(f"cannot read '{d / CONFIG_FILE}': {e}") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        raise UsageError(f"'{d / CONFIG_FILE}' has no model group")
    labels = load_class_indices(d / CLASS_INDICES)
    species = load_species(d / SPECIES)
    missing = [lab for lab in labels if lab not in species]
    if missing:
        log.warning("%d classes have no species record (treated as unknown edibility): %s", len(missing), missing[:5])
    temperature, ood = read_calibration(d / CALIBRATION, ood_score, ood_quantile)
    try:
        pre = folder.manifest.get("preprocess")  # version 2 records the eval transform; version 1: from config
        transform = EvalTransform.from_dict(pre) if pre else EvalTransform.from_config(cfg)
    except ValueError as e:
        raise UsageError(f"'{d / CONFIG_FILE}': {e}") from None

    model = (builder or default_builder)(cfg.model, len(labels))
    try:
        state = load_file(str(d / MODEL_FILE))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3] if line.strip())[:300]
        raise UsageError(f"'{d / MODEL_FILE}' does not fit model '{cfg.model.get('name')}' with "
                         f"{len(labels)} classes ({detail or e}); was it exported from this run's config?") from None
    model.eval().to(device)
    if hasattr(model, "resolve_attention"):  # the kernel is chosen once, here, for this machine (fp32 forwards)
        model.resolve_attention(torch.device(device).type, torch.float32)
    feature_rule = read_feature_ood(d, len(labels), ood_quantile)  # statistics stay on the CPU, in float64
    sha = file_sha256(d / MODEL_FILE)
    info = {"id": f"{cfg.model.get('name', 'model')}-{sha[:12]}", "name": str(cfg.model.get("name", "")),
            "sha256": sha, "classes": len(labels), "img_size": transform.size, "version": __version__,
            "temperature": temperature,
            "ood": None if ood is None else {"score": ood.score, "threshold": ood.threshold, "source": ood.source,
                                             "ood_when": "below"},
            "feature_ood": None if feature_rule is None else feature_rule.describe(),
            "uncalibrated": "; ".join(calibration_problems(d, ood is not None or feature_rule is not None))}
    return Export(model, labels, species, temperature, ood, transform, info, feature_rule)


class Predictor:
    """Runs the model on batches and turns each row of logits into top-k, verdict and warning.

    OOD check: the export's feature-distance rule when it has one (and `use_feature_ood`), else its
    logit-score rule; none with `use_ood=False`. Only one of the two is applied: on the measured demo
    model the logit score turned away no photo, real or generated, that the feature score or
    `min_confidence` did not already turn away (docs/safety.md), so it would only add a second threshold.
    """

    runtime = "torch"  # what computes the forward pass (mycodist.serve.onnx_runtime has the other)
    precision = "fp32"

    def __init__(self, export: Export, rules: SafetyRules, top_k: int = 5, use_ood: bool = True,
                 device: str = "cpu", use_feature_ood: bool = True) -> None:
        self.export = export
        self.rules = rules
        self.top_k = max(1, min(int(top_k), len(export.labels)))
        self.feature_ood = export.feature_ood if use_ood and use_feature_ood else None
        self.ood = export.ood if use_ood and self.feature_ood is None else None
        self.device = device

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch → (logits, feature OOD scores or None when no feature rule is in use), on the CPU."""
        x = batch.to(self.device)
        if self.feature_ood is not None:
            feats, logits = feature_ood.features_and_logits(self.export.model, x)
            return logits.float().cpu(), self.feature_ood.scores(feats.cpu())
        out = self.export.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().cpu(), None

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.forward(batch)[0]

    def _ood(self, scaled: torch.Tensor, feature_score: float | None) -> dict[str, Any] | None:
        if self.feature_ood is not None:
            if feature_score is None:
                raise ValueError("the feature OOD check needs the photo's feature score (Predictor.forward)")
            rule = self.feature_ood
            score = float(feature_score)
            flagged = not (score <= rule.threshold)  # NaN counts as out of distribution
        elif self.ood is not None:
            rule = self.ood
            score = float(rule.scores(scaled.unsqueeze(0))[0])
            flagged = not (score >= rule.threshold)  # NaN counts as out of distribution
        else:
            return None
        return {"score_name": rule.score, "score": score, "threshold": rule.threshold,
                "ood_when": "above" if rule is self.feature_ood else "below", "out_of_distribution": flagged}

    def answer(self, logits: torch.Tensor, feature_score: float | None = None) -> dict[str, Any]:
        """One row of raw logits (+ that photo's feature OOD score, when that rule is in use) → the JSON
        answer (without image-specific fields)."""
        ex = self.export
        scaled = logits / ex.temperature
        probs_t = torch.softmax(scaled, dim=-1)
        probs = probs_t.tolist()
        ood_json = self._ood(scaled, feature_score)
        out_of_distribution = bool(ood_json and ood_json["out_of_distribution"])
        verdict = decide(probs, ex.labels, ex.species, self.rules, out_of_distribution=out_of_distribution,
                         uncalibrated=ex.info.get("uncalibrated", ""))
        top = torch.topk(probs_t, self.top_k)
        top_k = []
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            lab = ex.labels[i]
            s = ex.species.get(lab)
            top_k.append({"label": lab, "scientific_name": s.scientific_name if s else "",
                          "common_name": s.common_name if s else "", "family": s.family if s else "",
                          "probability": p, "edibility": s.edibility if s else "unknown"})
        return {"top_k": top_k, "verdict": verdict.to_json(), "warning": WARNING,
                "ood": ood_json, "model": self.model_json()}

    def model_json(self) -> dict[str, Any]:
        """Which weights answered, and how: the runtime and precision of the forward pass."""
        return {**{k: self.export.info[k] for k in ("id", "name", "version", "sha256")},
                "runtime": self.runtime, "precision": self.precision}

    def answers(self, logits: torch.Tensor, feature_scores: torch.Tensor | None = None) -> list[dict[str, Any]]:
        scores = [None] * len(logits) if feature_scores is None else feature_scores.tolist()
        return [self.answer(row, sc) for row, sc in zip(logits, scores, strict=True)]

    def predict(self, tensors: list[torch.Tensor]) -> list[dict[str, Any]]:
        """A list of preprocessed images → one answer each, in one forward pass."""
        return self.answers(*self.forward(torch.stack(tensors)))
