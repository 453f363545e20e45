"""The image path: crops, draft decoding, eval crop, jitter, mixup/cutmix, output formats."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from data_util import config, noise_jpeg
from PIL import Image

from mycodist.data.transforms import (
    ImageConfig,
    color_jitter_,
    crop_box,
    decode_eval,
    decode_train,
    mix_batch,
    normalize,
    to_output,
)
from mycodist.errors import UsageError
from mycodist.preprocess import EvalPreprocess, scale_shift


def gradient_jpeg(w: int, h: int) -> bytes:
    """A smooth image: draft (DCT-scaled) and full decoding must agree closely on it."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128, np.float32)], axis=2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(640, 480), (31, 200), (300, 300)])
def test_crop_box_stays_inside_and_respects_scale_and_ratio(size):
    rng = random.Random(0)
    for _ in range(200):
        x, y, w, h = crop_box(*size, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x and 0 <= y and x + w <= size[0] and y + h <= size[1] and w > 0 and h > 0


def test_train_crop_shape_dtype_and_determinism():
    cfg = ImageConfig(size=32)
    data = noise_jpeg(1, (120, 90))
    a = decode_train(data, cfg, random.Random(5))
    b = decode_train(data, cfg, random.Random(5))
    c = decode_train(data, cfg, random.Random(6))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_draft_decoding_matches_full_decoding():
    data = gradient_jpeg(800, 600)
    for seed in range(5):
        fast = decode_train(data, ImageConfig(size=64, draft=True), random.Random(seed)).astype(int)
        full = decode_train(data, ImageConfig(size=64, draft=False), random.Random(seed)).astype(int)
        assert np.abs(fast - full).mean() < 3


def test_eval_crop_is_the_centre():
    cfg = ImageConfig(size=32, eval=EvalPreprocess(size=32, eval_crop=0.5))
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[25:75, 75:125] = 255  # a white centre square: half the shorter side
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=98)
    out = decode_eval(buf.getvalue(), cfg)
    assert out.shape == (32, 32, 3) and out[4:28, 4:28].min() > 200


def test_float_output_is_normalised_nchw():
    cfg = ImageConfig(size=8)
    x = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    out = to_output(x, cfg)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32 and out.is_contiguous()
    expected = torch.tensor([(1 - m) / s for m, s in zip(cfg.mean, cfg.std, strict=True)])
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-5)
    u8 = to_output(x, ImageConfig(size=8, output="uint8", channels_last=True))
    assert u8.dtype == torch.uint8 and u8.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(normalize(u8, cfg.mean, cfg.std), out, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_output_conversion_is_torchs_arithmetic_bit_for_bit(dtype):
    """to_output converts with numpy (faster); the values are exactly torch's per-channel mul then sub."""
    cfg = ImageConfig(size=16)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 16, 16, 3), dtype=torch.uint8, generator=g)  # every value in every channel
    if dtype == torch.float32:
        x = x.float() + torch.rand(x.shape, generator=g)  # after jitter or mixing: float 0..255
    scale, shift = scale_shift(cfg.mean, cfg.std)
    want = torch.stack([torch.mul(x[..., c], scale[c]).sub_(shift[c]) for c in range(3)], dim=1)
    for shared in (False, True):
        got = to_output(x, cfg, shared)
        assert got.is_contiguous() and got.is_shared() == shared and torch.equal(got, want)
        cl = to_output(x, ImageConfig(size=16, channels_last=True), shared)
        assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, want, atol=1e-5)
        u8 = to_output(x, ImageConfig(size=16, output="uint8"), shared)
        assert u8.is_contiguous() and u8.dtype == torch.uint8
        assert torch.equal(u8, x.permute(0, 3, 1, 2).round().clamp(0, 255).to(torch.uint8))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_large_private_batches_come_from_their_own_mapping_and_stay_alive(fmt):
    import gc

    from mycodist.data.transforms import empty_batch

    shape = (8, 3, 224, 224)  # 4.8 MB of float: above the huge-page threshold
    x = empty_batch(shape, torch.float32, False, fmt)
    assert x.shape == shape and x.is_contiguous(memory_format=fmt) and not x.is_shared()
    x.fill_(2.0)
    view = x[1:3]
    del x
    gc.collect()
    assert torch.equal(view, torch.full((2, 3, 224, 224), 2.0)) and view.clone().sum() == 2 * 3 * 224 * 224 * 2
    small = empty_batch((2, 3, 8, 8), torch.uint8, False, fmt)
    assert small.is_contiguous(memory_format=fmt) and not small.is_shared()
    assert empty_batch(shape, torch.uint8, True, fmt).is_shared()


def test_color_jitter_keeps_range_and_zero_strength_is_identity():
    x = torch.rand(3, 8, 8, 3) * 255
    same = color_jitter_(x.clone(), 0.0, [random.Random(i) for i in range(3)])
    assert torch.allclose(same, x, atol=1e-3)
    out = color_jitter_(x.clone(), 0.8, [random.Random(i) for i in range(3)])
    assert out.min() >= 0 and out.max() <= 255 and not torch.allclose(out, x)


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixing_gives_soft_targets_that_sum_to_one(mixup, cutmix):
    cfg = ImageConfig(size=8, mixup_alpha=mixup, cutmix_alpha=cutmix)
    x = torch.rand(6, 8, 8, 3) * 255
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    for seed in range(5):
        mixed, soft = mix_batch(x, t, 4, cfg, random.Random(seed))
        assert mixed.shape == x.shape and soft.shape == (6, 4)
        assert torch.allclose(soft.sum(1), torch.ones(6))
        assert soft.max() < 1 or torch.equal(mixed, x)


def test_config_keys_are_checked():
    ic = ImageConfig.from_config(config("data.img_size=0", "model.img_size=96"))
    assert ic.size == 96
    with pytest.raises(UsageError, match="data.output"):
        ImageConfig.from_config(config("data.output=half"))
    with pytest.raises(UsageError, match="data.scale"):
        ImageConfig.from_config(config("data.scale=[0.5,0.1]"))


def test_reducing_gap_is_validated_and_stays_close_to_plain_resize():
    import io as _io
    import random as _random

    import numpy as _np
    from PIL import Image as _Image

    from mycodist.config import load_config as _load
    from mycodist.data.transforms import ImageConfig, decode_train
    from mycodist.errors import UsageError as _UsageError

    with pytest.raises(_UsageError, match="reducing_gap"):
        ImageConfig.from_config(_load(None, ["data.reducing_gap=0.5", "model.img_size=64"])).check()
    # a large smooth PNG (draft cannot reduce it) where the reducing gap really acts
    yy, xx = _np.mgrid[0:1600, 0:1800]
    arr = _np.stack([(xx * 255 // 1800), (yy * 255 // 1600), ((xx + yy) % 256)], -1).astype(_np.uint8)
    buf = _io.BytesIO()
    _Image.fromarray(arr).save(buf, "PNG")
    outs = {}
    for gap in (0.0, 2.0):
        cfg = ImageConfig.from_config(_load(None, [f"data.reducing_gap={gap}", "model.img_size=64"]))
        outs[gap] = decode_train(buf.getvalue(), cfg, _random.Random(3)).astype(int)
    diff = _np.abs(outs[0.0] - outs[2.0])
    assert outs[0.0].shape == (64, 64, 3)
    assert diff.mean() < 1.5 and diff.max() < 40


def test_float_batches_identical_with_zero_and_two_workers(tmp_path):
    from data_util import loader_config, make_shards

    from mycodist.data import DataSpec, make_train_loader

    make_shards(tmp_path, train=[30, 34], val=[6])
    batches = {}
    for workers in (0, 2):
        cfg = loader_config(tmp_path, f"data.workers={workers}", "data.color_jitter=0")
        spec = DataSpec.from_config(cfg)
        loader = make_train_loader(cfg, 0, 1, spec=spec)
        batches[workers] = [(x.clone(), y.clone()) for x, y in loader]
    assert len(batches[0]) == len(batches[2]) > 0

    def samples(bs):  # worker count changes the order, never a sample's pixels (its crop rng is per sample)
        return sorted((int(y), tuple(x.flatten()[::97].tolist())) for xb, yb in bs for x, y in zip(xb, yb, strict=True))

    assert batches[0][0][0].dtype == torch.float32
    assert samples(batches[0]) == samples(batches[2])
