"""TensorBoard on rank 0 (other ranks get a writer that drops everything), plus the two pictures that
evaluation logs: the confusion matrix and a grid of validation images with their predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


class Board:
    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        if self.writer is not None:
            self.writer.add_figure(tag, fig, step, close=True)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self.writer.add_hparams(flat, metrics, run_name="hparams")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def confusion_figure(cm: np.ndarray, labels: list[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    size = min(16, 3 + 0.3 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def prediction_grid(images: torch.Tensor, labels: list[int], preds: list[int], probs: list[float],
                    names: list[str]) -> Any:
    """Validation images (de-normalised per image for display) titled `pred (p) / true`, wrong in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        img = images[i].float().permute(1, 2, 0).numpy()
        img = (img - img.min()) / max(1e-6, float(img.max() - img.min()))
        ax = axes.flat[i]
        ax.imshow(img)
        ok = labels[i] == preds[i]
        ax.set_title(f"{names[preds[i]][:18]} ({probs[i]:.2f})\ntrue {names[labels[i]][:18]}", fontsize=7,
                     color="black" if ok else "red")
    fig.tight_layout()
    return fig
