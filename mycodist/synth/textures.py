"""Ground textures behind the mushrooms: grass, leaf litter and wood, as float32 RGB arrays in 0..1.

Everything is built from small random arrays upsampled by Pillow (smooth noise at the wanted scale and
direction in one C call) and shapes drawn by ImageDraw, so a 256 px background costs about a millisecond.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

Rgb = tuple[float, float, float]


def smooth_noise(rng: np.random.Generator, rows: int, cols: int, width: int, height: int) -> np.ndarray:
    """Value noise: a rows×cols random grid upsampled (bicubic) to height×width; anisotropic if rows≠cols."""
    small = rng.random((max(2, rows), max(2, cols)), dtype=np.float32)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def _mix(a: np.ndarray | Rgb, b: np.ndarray | Rgb, t: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return a + (b - a) * t[..., None]


def _jitter(rng: np.random.Generator, rgb: Rgb, amount: float = 0.08) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) * rng.uniform(1 - amount, 1 + amount, 3).astype(np.float32), 0, 1)


GRASS_GREENS: tuple[Rgb, ...] = ((0.22, 0.40, 0.10), (0.32, 0.45, 0.14), (0.42, 0.46, 0.18), (0.18, 0.32, 0.12))
LEAF_COLOURS: tuple[Rgb, ...] = ((0.55, 0.33, 0.14), (0.68, 0.45, 0.18), (0.42, 0.25, 0.12), (0.75, 0.58, 0.25),
                                 (0.35, 0.22, 0.12), (0.60, 0.25, 0.10), (0.50, 0.42, 0.22))
BARK_COLOURS: tuple[Rgb, ...] = ((0.45, 0.36, 0.26), (0.52, 0.45, 0.36), (0.38, 0.28, 0.20), (0.58, 0.48, 0.34))


def grass(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Vertical blade streaks at two scales over soil-dark gaps, with patches of straw."""
    base = _jitter(rng, GRASS_GREENS[int(rng.integers(len(GRASS_GREENS)))])
    streaks = (0.55 * smooth_noise(rng, 5, 90, width, height)
               + 0.30 * smooth_noise(rng, 12, 40, width, height)
               + 0.15 * smooth_noise(rng, 4, 4, width, height))
    t = np.clip((streaks - 0.25) * 2.0, 0, 1)
    img = _mix(base * 0.35, np.clip(base * 1.35 + 0.04, 0, 1), t)
    straw = np.clip((smooth_noise(rng, 5, 5, width, height) - 0.62) * 5, 0, 1) * rng.uniform(0, 0.7)
    return _mix(img, _jitter(rng, (0.70, 0.62, 0.38)) * (0.6 + 0.5 * t[..., None]), straw)


def leaf_litter(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Overlapping fallen leaves (drawn polygons with a midrib) over dark soil, deeper layers darker."""
    soil = _jitter(rng, (0.20, 0.14, 0.09))
    tone = 0.7 + 0.6 * smooth_noise(rng, 6, 6, width, height)
    canvas = Image.fromarray((np.clip(soil * tone[..., None], 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    n = int(rng.integers(60, 110))
    scale = max(width, height)
    t = np.linspace(0, 2 * np.pi, 11, dtype=np.float32)[:-1]
    for i in range(n):
        cx, cy = rng.uniform(-0.05, 1.05) * width, rng.uniform(-0.05, 1.05) * height
        length = rng.uniform(0.05, 0.14) * scale
        half_w = length * rng.uniform(0.18, 0.3)
        ang = rng.uniform(0, np.pi)
        ca, sa = np.cos(ang), np.sin(ang)
        px = np.cos(t) * length / 2
        py = np.sin(t) * half_w * (1 - 0.4 * np.cos(t))  # a pointed, egg-shaped leaf
        xs, ys = cx + px * ca - py * sa, cy + px * sa + py * ca
        depth = 0.45 + 0.55 * (i + 1) / n
        colour = _jitter(rng, LEAF_COLOURS[int(rng.integers(len(LEAF_COLOURS)))], 0.15) * depth
        fill = tuple(int(c * 255) for c in np.clip(colour, 0, 1))
        draw.polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=fill)
        rib = tuple(int(c * 0.7) for c in fill)
        draw.line([(cx - ca * length / 2, cy - sa * length / 2), (cx + ca * length / 2, cy + sa * length / 2)],
                  fill=rib, width=1)
    return np.asarray(canvas, dtype=np.float32) * (1 / 255)


def wood(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A log's bark: grain streaks along one axis, warped rings, cracks and moss."""
    base = _jitter(rng, BARK_COLOURS[int(rng.integers(len(BARK_COLOURS)))])
    horizontal = rng.random() < 0.7
    rows, cols = (70, 4) if horizontal else (4, 70)
    fibre = smooth_noise(rng, rows, cols, width, height)
    warp = smooth_noise(rng, 3, 3, width, height) * rng.uniform(0.03, 0.12) * max(width, height)
    axis = np.arange(height if horizontal else width, dtype=np.float32)
    axis = axis[:, None] if horizontal else axis[None, :]
    rings = 0.5 + 0.5 * np.sin((axis + warp) * (2 * np.pi / (rng.uniform(0.025, 0.06) * max(width, height))))
    t = np.clip(0.55 * fibre + 0.3 * rings + 0.15 * smooth_noise(rng, 8, 8, width, height), 0, 1)
    img = _mix(base * 0.4, np.clip(base * 1.3, 0, 1), t)
    cracks = np.clip((0.12 - np.abs(fibre - 0.5)) * 6, 0, 1) * rng.uniform(0.3, 0.8)
    img *= (1 - cracks)[..., None]
    moss = np.clip((smooth_noise(rng, 4, 4, width, height) - rng.uniform(0.6, 0.9)) * 6, 0, 1)
    return _mix(img, _jitter(rng, (0.30, 0.42, 0.12)) * (0.6 + 0.6 * fibre[..., None]), moss)


BACKGROUNDS = {"grass": grass, "litter": leaf_litter, "wood": wood}


def background(kind: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One of BACKGROUNDS with depth: the far (upper) part of the frame darker or hazier."""
    img = BACKGROUNDS[kind](rng, width, height)
    ramp = np.linspace(rng.uniform(0.55, 0.95), 1.0, height, dtype=np.float32)[:, None, None]
    haze = _jitter(rng, (0.55, 0.6, 0.55), 0.15)
    far = np.linspace(rng.uniform(0.0, 0.35), 0.0, height, dtype=np.float32)[:, None, None]
    return img * ramp * (1 - far) + haze * far
