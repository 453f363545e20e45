"""The data set is learnable but not trivial.

A tiny classifier on position-invariant features (a colour histogram and globally pooled responses of a
fixed random 5×5 conv layer) must beat chance by far, while a linear probe on the raw pixels (the same
ridge classifier, given its best regularisation chosen on the test split, i.e. an optimistic figure) must
stay clearly worse: species identity lives in shapes and colours wherever the mushroom stands, not in
fixed pixel positions.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from mycodist.synth.generate import generate_dataset

K, PER_SPECIES, SIZE, SIDE = 8, 40, 64, 32


def _load() -> tuple[np.ndarray, np.ndarray]:
    species, photos = generate_dataset({"species": K, "per_species": PER_SPECIES, "size": SIZE, "seed": 0}, workers=1)
    labels = [s.label for s in species]
    xs, ys = [], []
    for label, _, jpg in photos:
        with Image.open(io.BytesIO(jpg)) as im:
            xs.append(np.asarray(im.convert("RGB").resize((SIDE, SIDE), Image.BILINEAR), np.float32) / 255)
        ys.append(labels.index(label))
    return np.stack(xs), np.array(ys)


def _ridge_accuracy(features: np.ndarray, y: np.ndarray, train: np.ndarray, lam: float) -> float:
    """One-vs-all ridge regression classifier (closed form in the n×n dual), accuracy on ~train."""
    f = features.astype(np.float64)
    f = (f - f[train].mean(0)) / (f[train].std(0) + 1e-6)
    a = f[train]
    targets = np.eye(K)[y[train]] - 1 / K
    w = a.T @ np.linalg.solve(a @ a.T + lam * np.eye(len(a)), targets)
    return float(((f[~train] @ w).argmax(1) == y[~train]).mean())


def _colour_histogram(x: np.ndarray) -> np.ndarray:
    q = np.minimum((x * 6).astype(int), 5)
    codes = (q[..., 0] * 36 + q[..., 1] * 6 + q[..., 2]).reshape(len(x), -1)
    return np.sqrt(np.stack([np.bincount(c, minlength=216) for c in codes]) / codes.shape[1])


def _pooled_random_conv(x: np.ndarray) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 3, 5, 5, generator=g) * 0.2
    bias = torch.randn(64, generator=g) * 0.1
    with torch.no_grad():
        act = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2) - 0.5, weight, bias,
                                                    padding=2))
        return torch.cat([act.amax((2, 3)), act.mean((2, 3))], 1).numpy()


def test_features_learn_the_species_but_a_pixel_linear_probe_does_not():
    x, y = _load()
    # hold out photo numbers 0, 4, 8, ... of every species (order is photo-major)
    train = (np.arange(len(y)) // K) % 4 != 0
    chance = 1 / K
    features = np.concatenate([_colour_histogram(x), _pooled_random_conv(x)], 1)
    feature_acc = _ridge_accuracy(features, y, train, lam=10.0)
    pixels = x.reshape(len(x), -1)
    pixel_acc = max(_ridge_accuracy(pixels, y, train, lam) for lam in (10.0, 100.0, 1000.0, 10000.0))
    assert feature_acc >= 4 * chance, (feature_acc, pixel_acc)
    assert pixel_acc <= 0.5, (feature_acc, pixel_acc)
    assert feature_acc - pixel_acc >= 0.2, (feature_acc, pixel_acc)
