"""The export folder → a ready model, and logits → the API's answer. Shared by `predict` and `serve`.

Export folder (layout: mycodist/export/artifact.py; written by `mycodist export`, docs/serving.md):
  model.safetensors   fp32 state dict, timm-style names
  config.yaml         the resolved run config (model group builds the model, img_size/mean/std preprocess)
  class_indices.json  {"0": label, ...}
  species.json        the catalogue (edibility, lookalikes, ...)
  calibration.json    temperature, OOD statistics and thresholds (read by mycodist/export/decision.py)
  ood.safetensors     feature statistics for the feature-distance OOD score (mycodist.models.ood)

The OOD check is the feature-distance score when the export has ood.safetensors (score above the
threshold → out of distribution); an older export without it falls back, with a warning, to the logit
score, computed on the calibrated logits (logits / T) as the export computes its quantiles. Logits → OOD
check → verdict is export/decision.py's `Decision`, the code the export counts int8's verdicts with.
"""

from __future__ import annotations

import logging
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
from mycodist.export.artifact import CALIBRATION, CONFIG_FILE, MODEL_FILE, file_sha256, read_export
from mycodist.export.decision import (
    Decision,
    FeatureOodRule,
    OodRule,
    calibration_problems,
    read_calibration,
    read_feature_ood,
)
from mycodist.models import ood as feature_ood
from mycodist.serve.preprocess import EvalTransform
from mycodist.verdict import WARNING, SafetyRules

log = logging.getLogger(__name__)

ModelBuilder = Callable[[Any, int], torch.nn.Module]


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

    @property
    def decision(self) -> Decision:
        """Logits → OOD check → verdict, as this predictor answers (export/decision.py: the same code the
        export counts int8's verdicts with)."""
        ex = self.export
        return Decision(ex.labels, ex.species, self.rules, ex.temperature, self.ood, self.feature_ood,
                        ex.info.get("uncalibrated", ""))

    def answer(self, logits: torch.Tensor, feature_score: float | None = None,
               decision: Decision | None = None) -> dict[str, Any]:
        """One row of raw logits (+ that photo's feature OOD score, when that rule is in use) → the JSON
        answer (without image-specific fields)."""
        ex = self.export
        probs_t, ood_json, verdict = (decision or self.decision).judge(logits, feature_score)
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
        decision = self.decision
        return [self.answer(row, sc, decision) for row, sc in zip(logits, scores, strict=True)]

    def predict(self, tensors: list[torch.Tensor]) -> list[dict[str, Any]]:
        """A list of preprocessed images → one answer each, in one forward pass."""
        return self.answers(*self.forward(torch.stack(tensors)))
