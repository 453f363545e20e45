"""Training crops through libjpeg-turbo (data/decode.py: region decoding, whole-image simplejpeg) against the
Pillow path: same boxes, same statistics; region decoding gives the whole-image decode's pixels."""

from __future__ import annotations

import io
import random
import threading

import numpy as np
import pytest
from data_util import config
from PIL import Image

from mycodist.data import decode, transforms
from mycodist.data.decode import pick_scale, region_available, resize_region
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
REGION = ImageConfig(size=64, decoder="region")
AUTO = ImageConfig(size=64, decoder="auto")
needs_region = pytest.mark.skipif(not region_available(), reason="mycodist/data/_jpegregion.c not built")
FAST = [TURBO, pytest.param(REGION, marks=needs_region)]


def test_pick_scale_is_the_smallest_power_of_two_that_covers():
    assert pick_scale(800, 600, 100, 75) == 1
    assert pick_scale(800, 600, 101, 10) == 2  # 1/8 gives 100 px wide
    assert pick_scale(691, 756, 346, 1) == 4  # libjpeg rounds 345.5 up; Pillow's draft (691 // 346 = 1) would not
    assert pick_scale(800, 600, 401, 1) == 8
    assert pick_scale(800, 600, 500, 1, scales=tuple(range(1, 9))) == 5


def test_same_crop_boxes_and_flips_as_the_pillow_path(monkeypatch):
    seen: dict[str, list] = {"pillow": [], "simplejpeg": [], "region": []}
    real = transforms.crop_box
    current = []

    def spy(*args, **kw):
        box = real(*args, **kw)
        seen[current[0]].append((args[:2], box))
        return box

    monkeypatch.setattr(transforms, "crop_box", spy)
    states = {}
    for cfg in (PILLOW, TURBO, REGION) if region_available() else (PILLOW, TURBO):
        current[:] = [cfg.decoder]
        rngs = [random.Random(s) for s in range(40)]
        for i, rng in enumerate(rngs):
            decode_train(photo(i % 4, SIZES[i % 4]), cfg, rng)
        states[cfg.decoder] = [r.getstate() for r in rngs]  # same draws → same flips and later draws
    assert seen["pillow"] == seen["simplejpeg"] and len(seen["pillow"]) == 40
    assert states["pillow"] == states["simplejpeg"]
    if region_available():
        assert seen["region"] == seen["pillow"] and states["region"] == states["pillow"]


@pytest.mark.parametrize("fast", FAST, ids=lambda c: c.decoder)
def test_pixels_and_statistics_match_the_pillow_path(fast):
    a, b, diffs = [], [], []
    for i in range(48):
        data = photo(i, SIZES[i % 4])
        pa = decode_train(data, PILLOW, random.Random(i)).astype(np.float64)
        pb = decode_train(data, fast, random.Random(i)).astype(np.float64)
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


@pytest.mark.parametrize("fast", FAST, ids=lambda c: c.decoder)
@pytest.mark.parametrize("kind", ["png", "cmyk_jpeg", "gray_jpeg"])
def test_other_images_give_the_pillow_result(kind, fast):
    data = {"png": lambda: photo(1, (300, 200), fmt="PNG"), "cmyk_jpeg": lambda: photo(1, (300, 200), "CMYK"),
            "gray_jpeg": lambda: photo(1, (300, 200), "L")}[kind]()
    for seed in range(5):
        want = decode_train(data, PILLOW, random.Random(seed))
        got = decode_train(data, fast, random.Random(seed))
        assert got.shape == (64, 64, 3)
        if kind == "gray_jpeg":  # simplejpeg decodes it (gray → RGB); same scale choice, so nearly equal
            assert np.abs(got.astype(int) - want).mean() < 1.0
        else:
            assert np.array_equal(got, want)


def test_without_simplejpeg_auto_falls_back_and_explicit_is_an_error(monkeypatch):
    data = photo(2, (640, 480))
    turbo = decode_train(data, TURBO, random.Random(1))
    monkeypatch.setattr(decode, "_simplejpeg", lambda: None)
    if region_available():  # the region decoder reads headers and decodes every crop itself: same pixels
        assert np.array_equal(decode_train(data, ImageConfig(size=64), random.Random(1)), turbo)
        monkeypatch.setattr(decode, "_region", lambda: None)
    auto = decode_train(data, ImageConfig(size=64), random.Random(1))
    assert np.array_equal(auto, decode_train(data, PILLOW, random.Random(1)))
    with pytest.raises(UsageError, match="simplejpeg is not installed"):
        ImageConfig(decoder="simplejpeg").check()


def test_decoder_key_is_validated_and_eval_never_uses_libjpeg_turbo(monkeypatch):
    with pytest.raises(UsageError, match="data.decoder"):
        ImageConfig.from_config(config("data.decoder=turbo"))
    assert ImageConfig.from_config(config("data.decoder=pillow")).decoder == "pillow"

    def boom(*a, **k):
        raise AssertionError("eval crops must take the Pillow path (serving restates it)")

    monkeypatch.setattr(transforms, "decode_crop", boom)
    for cfg in (TURBO, REGION, AUTO):
        assert decode_eval(photo(0, (640, 480)), cfg).shape == (64, 64, 3)


def test_a_truncated_jpeg_fails_as_on_the_pillow_path():
    """simplejpeg refuses it (strict), Pillow then raises as before, so the loader counts it as a bad sample.
    Region decoding stops after the crop and would not notice a cut below it: data without the EOI marker
    never goes to it (the seeds below put crops wholly above the cut)."""
    data = photo(0, (640, 480))[:20000]
    for cfg in (PILLOW, TURBO, REGION, AUTO) if region_available() else (PILLOW, TURBO, AUTO):
        for seed in range(6):
            with pytest.raises(OSError, match="truncated"):
                decode_train(data, cfg, random.Random(seed))



def jpeg(seed: int, size: tuple[int, int], subsampling: int = 2, progressive: bool = False, mode: str = "RGB") -> bytes:
    """Like `photo`, with strong per-pixel chroma noise so that chroma upsampling differences show."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC), dtype=np.int16)
    arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
    return buf.getvalue()


@needs_region
@pytest.mark.parametrize("kind", ["444", "422", "420", "420_progressive", "gray", "gray_progressive"])
def test_region_decode_is_the_whole_decode_but_for_the_span_edge_columns(kind):
    """decode_region's rows and columns equal those of simplejpeg's whole-image decode at the same scale, with
    one exception, measured here: with horizontally subsampled chroma (4:2:2, 4:2:0 at full scale) libjpeg's
    fancy upsampling treats the cropped span's first and last columns as image edges (they differ by up to
    ~15 levels), so decode_crop asks for one column more on each side and never uses them."""
    import simplejpeg

    from mycodist.data.decode import _region

    sub = {"444": 0, "422": 1, "gray": 0, "gray_progressive": 0}.get(kind, 2)
    data = jpeg(len(kind), (701, 533), sub, kind.endswith("progressive"), "L" if kind.startswith("gray") else "RGB")
    rng = random.Random(0)
    edge_differs = False
    for k in (1, 2, 3, 4, 8):
        full = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-701 * k // 8), min_height=-(-533 * k // 8))
        h, w = full.shape[:2]
        for _ in range(25):
            x0, y0 = rng.randrange(0, w - 1), rng.randrange(0, h - 1)
            x1, y1 = rng.randrange(x0 + 1, w + 1), rng.randrange(y0 + 1, h + 1)
            pixels, x, y, rw, rh, sw, sh = _region().decode_region(data, k, x0, y0, x1, y1)
            assert (sw, sh) == (w, h) and y == y0 and rh == y1 - y0 and x <= x0 and x + rw >= x1
            got = np.frombuffer(pixels, np.uint8).reshape(rh, rw, 3).astype(int)
            diff = np.abs(got - full[y:y + rh, x:x + rw])
            assert diff[:, 1:-1].max(initial=0) == 0  # every row, every column but the span's two edges
            if x > 0:
                edge_differs |= bool(diff[:, 0].max() > 0)
            if x + rw < w:
                edge_differs |= bool(diff[:, -1].max() > 0)
            assert diff.max() <= 32
    assert edge_differs == (kind in ("422", "420", "420_progressive"))


@needs_region
@pytest.mark.parametrize("kind", ["420", "422", "444", "420_progressive", "gray"])
def test_region_crops_equal_whole_image_crops_bit_for_bit(kind):
    sub = {"444": 0, "422": 1, "gray": 0}.get(kind, 2)
    for i in range(16):
        data = jpeg(i, SIZES[i % 4], sub, kind.endswith("progressive"), "L" if kind == "gray" else "RGB")
        for cfg in (REGION, AUTO):
            got = decode_train(data, cfg, random.Random(i))
            assert np.array_equal(got, decode_train(data, TURBO, random.Random(i))), (kind, i, cfg.decoder)


@needs_region
def test_region_decoder_refuses_bad_data_cleanly():
    from mycodist.data.decode import _region

    good = photo(0, (300, 200))
    region = _region()
    for bad in (b"", b"not a jpeg", good[:2] + b"x" * 5000, good[:300], good[:3000]):
        with pytest.raises(ValueError):
            region.decode_region(bad, 8, 0, 0, 300, 200)
    with pytest.raises(ValueError):
        region.jpeg_size(good[:100])
    with pytest.raises(ValueError, match="empty region"):
        region.decode_region(good, 8, 50, 50, 50, 60)
    with pytest.raises(ValueError):
        region.decode_region(good, 9, 0, 0, 10, 10)
    assert region.decode_region(photo(1, (300, 200), "CMYK"), 8, 0, 0, 10, 10) is None
    assert region.jpeg_size(photo(1, (300, 200), "CMYK")) is None
    assert region.jpeg_size(good) == (300, 200)
    # a corrupt or cut file that reaches decode_crop: a clean fallback to Pillow's result or Pillow's error
    for bad in (good[:3000] + b"\xff\xd9", good[:1200] + bytes(range(256)) * 4 + good[2224:]):
        for seed in range(4):
            try:
                want = decode_train(bad, PILLOW, random.Random(seed))
            except OSError:
                with pytest.raises(OSError):
                    decode_train(bad, REGION, random.Random(seed))
            else:
                assert decode_train(bad, REGION, random.Random(seed)).shape == want.shape


def test_only_complete_jpegs_are_region_decoded():
    from mycodist.data.decode import _complete

    data = photo(0, (320, 240))
    assert _complete(data) and _complete(data + b"SEFT trailer \x00\x01" * 20) and _complete(data + bytes(64))
    for cut in (len(data) - 2, len(data) - 1, len(data) // 2, 700, 3):
        assert not _complete(data[:cut])
    thumb = photo(1, (40, 30))  # a complete thumbnail before a cut main image (an EXIF-like layout)
    assert not _complete(data[:2] + b"\xff\xe1" + len(thumb).to_bytes(2, "big") + thumb + data[2:len(data) // 2])


@needs_region
def test_region_decoder_runs_in_threads():
    """It releases the GIL while decoding; results stay those of a single thread."""
    from mycodist.data.decode import _region

    data = [jpeg(i, (640, 480)) for i in range(4)]
    want = [_region().decode_region(d, 8, 100, 50, 400, 300) for d in data]
    got: dict[int, list] = {}

    def work(t: int) -> None:
        got[t] = [_region().decode_region(data[(t + j) % 4], 8, 100, 50, 400, 300) for j in range(12)]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t, results in got.items():
        assert all(r == want[(t + j) % 4] for j, r in enumerate(results))


def test_without_the_region_decoder_auto_uses_simplejpeg_and_explicit_is_an_error(monkeypatch):
    data = photo(2, (640, 480))
    want = decode_train(data, TURBO, random.Random(3))
    monkeypatch.setattr(decode, "_region", lambda: None)
    assert decode.turbo_path("auto") == "simplejpeg"
    assert np.array_equal(decode_train(data, AUTO, random.Random(3)), want)
    with pytest.raises(UsageError, match="region decoder"):
        ImageConfig(decoder="region").check()
