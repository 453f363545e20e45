"""The export's calibrated decision: how its calibration files are read, and logits → OOD check → verdict.

One implementation for both sides of the hand-off: serving answers every photo with `judge`, and the ONNX
export (export/onnx.py) counts with it how often int8's verdict equals fp32's on the validation photos,
recording the rate in onnx.json together with `conditions`, everything the verdicts depended on (temperature,
OOD rule and threshold, safety rules, calibration state). Serving compares those with its own: equal, the
recorded rate is the rate; different (other serve.* thresholds), it recounts on the kept outputs.

Calibration files (names: export/artifact.py):
  calibration.json    {"temperature": T, "ood_scores_on_val": {score: {"q01": .., "q05": .., ...}}}
                      and/or an explicit {"ood": {"score": name, "threshold": t}} (which wins);
                      "feature_ood": {"score": "mahalanobis", "threshold": t, "val_quantiles": {...}, ...}
  ood.safetensors     feature statistics for the feature-distance OOD score (mycodist.models.ood)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mycodist.catalog import CLASS_INDICES, SPECIES, Species, load_class_indices, load_species
from mycodist.errors import UsageError
from mycodist.export.artifact import CALIBRATION, OOD_FILE
from mycodist.models import ood as feature_ood
from mycodist.verdict import SafetyRules, Verdict, decide

log = logging.getLogger(__name__)

OOD_SCORES = ("max_logit", "max_prob", "neg_energy")
OOD_ALIASES = {"energy": "neg_energy"}

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



def calibration_problems(export_dir: str | Path, has_ood_rule: bool) -> list[str]:
    """What is missing from the export's calibration: [] when temperature and OOD statistics are there."""
    path = Path(export_dir) / CALIBRATION
    if not path.is_file():
        return [f"the export has no {CALIBRATION} (no temperature, no OOD statistics)"]
    problems = []
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raw = None
    if not isinstance(raw, dict) or "temperature" not in raw:
        problems.append(f"{CALIBRATION} has no temperature")
    if not has_ood_rule:
        problems.append(f"{CALIBRATION} has no out-of-distribution statistics")
    return problems


def ood_check(scaled: torch.Tensor, feature_score: float | None, ood: OodRule | None,
              feature: FeatureOodRule | None) -> dict[str, Any] | None:
    """The OOD part of an answer: the feature rule when in use (it needs the photo's feature score), else
    the logit rule on the calibrated logits `scaled`, else None. NaN counts as out of distribution."""
    if feature is not None:
        if feature_score is None:
            raise ValueError("the feature OOD check needs the photo's feature score (Predictor.forward)")
        rule: OodRule | FeatureOodRule = feature
        score = float(feature_score)
        flagged = not (score <= feature.threshold)
    elif ood is not None:
        rule = ood
        score = float(ood.scores(scaled.unsqueeze(0))[0])
        flagged = not (score >= ood.threshold)
    else:
        return None
    return {"score_name": rule.score, "score": score, "threshold": rule.threshold,
            "ood_when": "above" if rule is feature else "below", "out_of_distribution": flagged}


@dataclass(frozen=True)
class Decision:
    """What turns one photo's raw logits into its verdict: the export's calibration (temperature, the OOD
    rule in use) and the catalogue, under `rules`. `uncalibrated` ("" when calibrated) caps every answer."""

    labels: Sequence[str]
    species: Mapping[str, Species]
    rules: SafetyRules
    temperature: float = 1.0
    ood: OodRule | None = None
    feature_ood: FeatureOodRule | None = None
    uncalibrated: str = ""

    def judge(self, logits: torch.Tensor, feature_score: float | None = None
              ) -> tuple[torch.Tensor, dict[str, Any] | None, Verdict]:
        """One row of raw logits (+ its feature OOD score when that rule is in use) → (calibrated
        probabilities, the OOD part of the answer, the verdict)."""
        scaled = logits / self.temperature
        probs = torch.softmax(scaled, dim=-1)
        ood_json = ood_check(scaled, feature_score, self.ood, self.feature_ood)
        verdict = decide(probs.tolist(), self.labels, self.species, self.rules,
                         out_of_distribution=bool(ood_json and ood_json["out_of_distribution"]),
                         uncalibrated=self.uncalibrated)
        return probs, ood_json, verdict

    def codes(self, logits: torch.Tensor, feats: torch.Tensor | None) -> list[str]:
        """The verdict code of every row; `feats` are the OOD features (scored here when that rule is in use)."""
        scores: list[float | None] = [None] * len(logits)
        if self.feature_ood is not None:
            if feats is None:
                raise ValueError("the feature OOD check needs the photos' features")
            scores = self.feature_ood.scores(feats).tolist()
        return [self.judge(row, s)[2].code for row, s in zip(logits, scores, strict=True)]

    def conditions(self) -> dict[str, Any]:
        """Everything a verdict depends on besides the logits, as JSON: equal conditions, equal verdicts."""
        def rule(r: OodRule | FeatureOodRule | None) -> dict[str, Any] | None:
            return None if r is None else {"score": r.score, "threshold": r.threshold}

        catalogue = json.dumps({k: asdict(v) for k, v in sorted(self.species.items())}, sort_keys=True, default=str)
        return {"rules": asdict(self.rules), "temperature": self.temperature, "ood": rule(self.ood),
                "feature_ood": rule(self.feature_ood), "uncalibrated": self.uncalibrated,
                "labels": len(self.labels),
                # an edited species.json (edibility, lookalikes) changes verdicts: it must force a recount
                "catalogue_sha256": hashlib.sha256(catalogue.encode()).hexdigest()}


def verdict_agreement(decision: Decision, outputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """How often int8's verdict (and top-1) equals fp32's on the kept validation outputs (onnx_val.safetensors:
    logits_/features_ fp32 and int8, labels when known), under `decision`; with the top-1 accuracy drop."""
    z32, z8 = outputs["logits_fp32"], outputs["logits_int8"]
    n = len(z32)
    v32 = decision.codes(z32, outputs.get("features_fp32"))
    v8 = decision.codes(z8, outputs.get("features_int8"))
    same = sum(a == b for a, b in zip(v32, v8, strict=True))
    out: dict[str, Any] = {"photos": n, "agree": same, "verdict_agreement": same / n if n else 0.0,
                           "top1_agreement": float((z32.argmax(1) == z8.argmax(1)).float().mean()) if n else 0.0,
                           "top1_drop": None}
    if "labels" in outputs and n:
        y = outputs["labels"]
        out["top1_drop"] = float((z32.argmax(1) == y).float().mean() - (z8.argmax(1) == y).float().mean())
    return out


def folder_decision(export_dir: Path, rules: SafetyRules, ood_score: str = "neg_energy", ood_quantile: float = 0.05,
                    use_ood: bool = True, use_feature_ood: bool = True) -> Decision | None:
    """The Decision serving would make on an export folder with these serve.* settings (the same readers and
    the same choice of OOD rule as load_export and Predictor); None when the folder has no class list yet."""
    d = Path(export_dir)
    if not (d / CLASS_INDICES).is_file():
        return None
    labels = load_class_indices(d / CLASS_INDICES)
    species = load_species(d / SPECIES) if (d / SPECIES).is_file() else {}
    temperature, ood = read_calibration(d / CALIBRATION, ood_score, ood_quantile)
    feature = read_feature_ood(d, len(labels), ood_quantile)
    uncalibrated = "; ".join(calibration_problems(d, ood is not None or feature is not None))
    feature_in_use = feature if use_ood and use_feature_ood else None
    return Decision(labels, species, rules, temperature, ood if use_ood and feature_in_use is None else None,
                    feature_in_use, uncalibrated)
