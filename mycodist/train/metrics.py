"""Evaluation numbers from gathered logits: accuracy, per-class accuracy, macro-F1, calibration (ECE and
the temperature that minimises validation NLL) and the OOD-score quantiles serving thresholds on."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return float(hits.float().mean()) if len(labels) else 0.0


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: |accuracy − confidence| averaged over equal-width confidence bins, weighted by bin size."""
    if len(labels) == 0:
        return 0.0
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1, device=probs.device)
    ece = torch.zeros((), device=probs.device)
    for lo, hi in zip(edges[:-1], edges[1:], strict=False):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return float(ece)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar T minimising NLL of softmax(logits / T)."""
    if len(labels) == 0:
        return 1.0
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if np.isfinite(t) and 0.01 < t < 100 else 1.0


def ood_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores that are high for in-distribution inputs: max logit, max softmax prob, negative energy."""
    return {
        "max_logit": logits.max(dim=1).values,
        "max_prob": logits.softmax(dim=1).max(dim=1).values,
        "neg_energy": torch.logsumexp(logits, dim=1),
    }


def quantiles(x: torch.Tensor, qs: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5, 0.9)) -> dict[str, float]:
    if len(x) == 0:
        return {}
    v = torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64, device=x.device))
    return {f"q{round(q * 100):02d}": float(a) for q, a in zip(qs, v, strict=False)}


def classification_report(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Everything evaluation logs, from the gathered logits of one pass over the validation split."""
    logits = logits.float()
    pred = logits.argmax(dim=1).numpy() if len(labels) else np.zeros(0, dtype=np.int64)
    y = labels.numpy()
    cm = confusion_matrix(pred, y, num_classes)
    support = cm.sum(axis=1)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = support > 0
    return {
        "samples": int(len(labels)),
        "loss": float(F.cross_entropy(logits, labels)) if len(labels) else 0.0,
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "ece": expected_calibration_error(logits.softmax(dim=1), labels),
        "per_class_acc": recall.tolist(),
        "confusion": cm,
    }


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """What serving reads from export/calibration.json: T, ECE before/after, OOD-score quantiles."""
    logits = logits.float()
    t = fit_temperature(logits, labels)
    scaled = logits / t
    return {
        "temperature": t,
        "ece_before": expected_calibration_error(logits.softmax(dim=1), labels),
        "ece_after": expected_calibration_error(scaled.softmax(dim=1), labels),
        "nll_before": float(F.cross_entropy(logits, labels)) if len(labels) else 0.0,
        "nll_after": float(F.cross_entropy(scaled, labels)) if len(labels) else 0.0,
        "val_samples": int(len(labels)),
        "ood_scores_on_val": {name: quantiles(s) for name, s in ood_scores(scaled).items()},
        "ood_note": "scores computed on logits / temperature; in-distribution validation images score high",
    }
