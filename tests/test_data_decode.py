"""Training crops through simplejpeg (data/decode.py) against the Pillow path: same boxes, same statistics."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from data_util import config
from PIL import Image

from mycodist.data import decode, transforms
from mycodist.data.decode import pick_scale, resize_region
from mycodist.data.transforms import ImageConfig, decode_eval, decode_train
from mycodist.errors import UsageError


def photo(seed: int, size: tuple[int, int], mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A smooth colour field with fine noise: compresses and scales like a photo."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC), dtype=np.int16)
    arr = np.clip(arr + rng.normal(0, 6, arr.shape[:2] + (1,)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


SIZES = [(640, 480), (333, 517), (250, 250), (900, 620)]
PILLOW = ImageConfig(size=64, decoder="pillow")
TURBO = ImageConfig(size=64, decoder="simplejpeg")


def test_pick_scale_is_the_smallest_power_of_two_that_covers():
    assert pick_scale(800, 600, 100, 75) == 1
    assert pick_scale(800, 600, 101, 10) == 2  # 1/8 gives 100 px wide
    assert pick_scale(691, 756, 346, 1) == 4  # libjpeg rounds 345.5 up; Pillow's draft (691 // 346 = 1) would not
    assert pick_scale(800, 600, 401, 1) == 8
    assert pick_scale(800, 600, 500, 1, scales=tuple(range(1, 9))) == 5


def test_same_crop_boxes_and_flips_as_the_pillow_path(monkeypatch):
    seen: dict[str, list] = {"pillow": [], "simplejpeg": []}
    real = transforms.crop_box
    current = []

    def spy(*args, **kw):
        box = real(*args, **kw)
        seen[current[0]].append((args[:2], box))
        return box

    monkeypatch.setattr(transforms, "crop_box", spy)
    states = {}
    for cfg in (PILLOW, TURBO):
        current[:] = [cfg.decoder]
        rngs = [random.Random(s) for s in range(40)]
        for i, rng in enumerate(rngs):
            decode_train(photo(i % 4, SIZES[i % 4]), cfg, rng)
        states[cfg.decoder] = [r.getstate() for r in rngs]  # same draws → same flips and later draws
    assert seen["pillow"] == seen["simplejpeg"] and len(seen["pillow"]) == 40
    assert states["pillow"] == states["simplejpeg"]


def test_pixels_and_statistics_match_the_pillow_path():
    a, b, diffs = [], [], []
    for i in range(48):
        data = photo(i, SIZES[i % 4])
        pa = decode_train(data, PILLOW, random.Random(i)).astype(np.float64)
        pb = decode_train(data, TURBO, random.Random(i)).astype(np.float64)
        a.append(pa)
        b.append(pb)
        diffs.append(np.abs(pa - pb).mean())
    a, b = np.stack(a), np.stack(b)
    assert np.abs(a.mean(axis=(0, 1, 2)) - b.mean(axis=(0, 1, 2))).max() < 0.5  # per-channel mean, 0..255
    assert np.abs(a.std(axis=(0, 1, 2)) - b.std(axis=(0, 1, 2))).max() < 0.5
    assert max(diffs) < 2.0 and np.mean(diffs) < 0.5
    assert sum(d == 0 for d in diffs) < len(diffs)  # the two paths really ran different code


def test_resize_region_matches_resizing_the_whole_array():
    arr = np.asarray(Image.open(io.BytesIO(photo(3, (500, 380)))).convert("RGB"))
    rng = np.random.default_rng(0)
    for _ in range(60):
        bw, bh = rng.uniform(20, 500), rng.uniform(20, 380)
        x, y = rng.uniform(0, 500 - bw), rng.uniform(0, 380 - bh)
        box = (x, y, x + bw, y + bh)
        full = np.asarray(Image.fromarray(arr).resize((48, 48), Image.BILINEAR, box=box, reducing_gap=2.0), int)
        part = np.asarray(resize_region(arr, box, 48, 2.0), int)
        # the shifted box rounds the filter's sample positions differently: off by one level, never more
        assert np.abs(full - part).max() <= 1 and np.abs(full - part).mean() < 0.25


@pytest.mark.parametrize("kind", ["png", "cmyk_jpeg", "gray_jpeg"])
def test_other_images_give_the_pillow_result(kind):
    data = {"png": lambda: photo(1, (300, 200), fmt="PNG"), "cmyk_jpeg": lambda: photo(1, (300, 200), "CMYK"),
            "gray_jpeg": lambda: photo(1, (300, 200), "L")}[kind]()
    for seed in range(5):
        want = decode_train(data, PILLOW, random.Random(seed))
        got = decode_train(data, TURBO, random.Random(seed))
        assert got.shape == (64, 64, 3)
        if kind == "gray_jpeg":  # simplejpeg decodes it (gray → RGB); same scale choice, so nearly equal
            assert np.abs(got.astype(int) - want).mean() < 1.0
        else:
            assert np.array_equal(got, want)


def test_without_simplejpeg_auto_falls_back_and_explicit_is_an_error(monkeypatch):
    data = photo(2, (640, 480))
    monkeypatch.setattr(decode, "_simplejpeg", lambda: None)
    auto = decode_train(data, ImageConfig(size=64), random.Random(1))
    assert np.array_equal(auto, decode_train(data, PILLOW, random.Random(1)))
    with pytest.raises(UsageError, match="simplejpeg is not installed"):
        ImageConfig(decoder="simplejpeg").check()


def test_decoder_key_is_validated_and_eval_never_uses_simplejpeg(monkeypatch):
    with pytest.raises(UsageError, match="data.decoder"):
        ImageConfig.from_config(config("data.decoder=turbo"))
    assert ImageConfig.from_config(config("data.decoder=pillow")).decoder == "pillow"

    def boom(*a, **k):
        raise AssertionError("eval crops must take the Pillow path (serving restates it)")

    monkeypatch.setattr(transforms, "decode_scaled", boom)
    assert decode_eval(photo(0, (640, 480)), TURBO).shape == (64, 64, 3)


def test_a_truncated_jpeg_fails_as_on_the_pillow_path():
    """simplejpeg refuses it (strict), Pillow then raises as before, so the loader counts it as a bad sample."""
    data = photo(0, (640, 480))[:20000]
    for cfg in (PILLOW, TURBO):
        with pytest.raises(OSError, match="truncated"):
            decode_train(data, cfg, random.Random(0))
