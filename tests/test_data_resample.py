"""The training crop's C resize (mycodist/data/_resample.c) against Pillow's and against the exact filter."""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import shutil
import subprocess
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mycodist.data import decode

pytestmark = pytest.mark.skipif(not decode.resample_available(), reason="mycodist/data/_resample.c not built")
SOURCE = Path(decode.__file__).with_name("_resample.c")


@functools.lru_cache(maxsize=8)
def photo(seed: int, h: int = 300, w: int = 340) -> np.ndarray:
    """Smooth structure plus noise and a few hard edges: every filter position gets work."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 13.0) + np.cos(yy / 29.0), np.sin((xx + yy) / 37.0), np.cos(xx / 7.0) * np.sin(yy / 11.0)], -1)
    img = base * 70 + 128 + rng.normal(0, 30, base.shape)
    img[h // 3: h // 2, w // 4: w // 2] = (255, 0, 40)
    return np.clip(img, 0, 255).astype(np.uint8)


def random_box(rng: np.random.Generator, w: int, h: int) -> tuple[float, float, float, float]:
    bw, bh = rng.uniform(8, w), rng.uniform(8, h)
    x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return (x0, y0, x0 + bw, y0 + bh)


def ours(arr: np.ndarray, box, size: int, flip: bool = False, module=None) -> np.ndarray:
    h, w = arr.shape[:2]
    out = np.full((size, size, 3), 7, np.uint8)
    assert (module or decode._resample()).resize_box(memoryview(arr).cast("B"), w * 3, w, h, *box, out, size, size, flip)
    return out


def pillow(arr: np.ndarray, box, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR, box=box), np.int64)


def exact(arr: np.ndarray, box, size: int) -> np.ndarray:
    """Pillow's triangle filter (same centres, support and normalised weights; the box in single precision, as
    Pillow parses it) in float64, with no rounding anywhere."""
    def weights(in_size: int, a: float, b: float) -> np.ndarray:
        a, b = float(np.float32(a)), float(np.float32(b))
        scale = float(np.float32(b) - np.float32(a)) / size
        fscale = max(scale, 1.0)
        c = a + (np.arange(size) + 0.5) * scale
        lo = np.maximum((c - fscale + 0.5).astype(int), 0)  # int(): truncation, as C's cast
        hi = np.minimum((c + fscale + 0.5).astype(int), in_size)
        x = np.arange(in_size)[None, :]
        m = np.clip(1 - np.abs((x - c[:, None] + 0.5) * (1.0 / fscale)), 0, None) * ((x >= lo[:, None]) & (x < hi[:, None]))
        m /= m.sum(axis=1, keepdims=True)
        return m
    h, w = arr.shape[:2]
    wv, wh = weights(h, box[1], box[3]), weights(w, box[0], box[2])
    return np.stack([wv @ arr[:, :, c].astype(np.float64) @ wh.T for c in range(3)], -1)


def test_within_one_level_of_pillow_and_closer_to_the_exact_filter():
    rng = np.random.default_rng(0)
    worst_ours = worst_pillow = 0.0
    for i in range(60):
        arr = photo(i % 3)
        size = int(rng.choice([16, 48, 96, 160]))  # down- and upscaling boxes alike
        box = random_box(rng, arr.shape[1], arr.shape[0])
        got, want, ref = ours(arr, box, size).astype(np.int64), pillow(arr, box, size), exact(arr, box, size)
        assert np.abs(got - want).max() <= 1, (i, box, size)
        assert np.abs(got - want).mean() < 0.3
        worst_ours = max(worst_ours, np.abs(got - ref).max())
        worst_pillow = max(worst_pillow, np.abs(want - ref).max())
    # ours rounds once (its 6-bit intermediate and 14-bit weights add < 0.1 level); Pillow rounds twice
    assert worst_ours < 0.6 < worst_pillow, (worst_ours, worst_pillow)


def test_the_training_shapes_match_pillow():
    """The boxes the loader hands over: a window with the filter's margin, a box of 1-2x the output size."""
    rng = np.random.default_rng(1)
    arr = photo(5, 420, 460)
    for _ in range(40):
        size = 224
        bw = rng.uniform(size, 2 * size - 1)
        bh = min(bw * math.exp(rng.uniform(-0.28, 0.28)), 419)
        x0, y0 = rng.uniform(0, 460 - bw), rng.uniform(0, 420 - bh)
        box = (x0, y0, x0 + bw, y0 + bh)
        diff = np.abs(ours(arr, box, size).astype(np.int64) - pillow(arr, box, size))
        assert diff.max() <= 1 and diff.mean() < 0.3


def test_flip_mirrors_and_every_pixel_is_written():
    arr = photo(2)
    box = (10.25, 20.5, 300.75, 280.0)
    plain, mirrored = ours(arr, box, 64), ours(arr, box, 64, flip=True)
    assert np.array_equal(mirrored, plain[:, ::-1])
    for flip in (False, True):  # the slot's old content never shows through: 0-filled and 255-filled agree
        got = []
        for fill in (0, 255):
            out = np.full((64, 48, 3), fill, np.uint8)
            assert decode._resample().resize_box(memoryview(arr).cast("B"), 340 * 3, 340, 300, *box, out, 48, 64, flip)
            got.append(out)
        assert np.array_equal(*got)
    identity = np.empty((300, 340, 3), np.uint8)
    assert decode._resample().resize_box(memoryview(arr).cast("B"), 340 * 3, 340, 300, 0.0, 0.0, 340.0, 300.0,
                                         identity, 340, 300, False)
    assert np.array_equal(identity, arr)


def test_strided_windows_and_bad_arguments():
    arr = photo(3)
    sub = np.ascontiguousarray(arr[40:200, 30:250])
    view = memoryview(arr).cast("B")[(40 * 340 + 30) * 3:]  # the same window inside the whole image's rows
    out = np.empty((32, 32, 3), np.uint8)
    assert decode._resample().resize_box(view, 340 * 3, 220, 160, 3.5, 4.25, 200.0, 150.5, out, 32, 32, False)
    assert np.array_equal(out, ours(sub, (3.5, 4.25, 200.0, 150.5), 32))
    fn, buf = decode._resample().resize_box, memoryview(sub).cast("B")
    for args in [(buf, 660, 220, 160, -1.0, 0.0, 10.0, 10.0, out, 32, 32, False),   # box outside the image
                 (buf, 660, 220, 160, 0.0, 0.0, 221.0, 10.0, out, 32, 32, False),
                 (buf, 660, 220, 160, 5.0, 0.0, 5.0, 10.0, out, 32, 32, False),    # empty box
                 (buf, 660, 220, 161, 0.0, 0.0, 10.0, 10.0, out, 32, 32, False),   # more rows than the buffer
                 (buf, 600, 220, 160, 0.0, 0.0, 10.0, 10.0, out, 32, 32, False),   # stride < a row
                 (buf, 660, 220, 160, 0.0, 0.0, 10.0, 10.0, out, 33, 32, False)]:  # destination too small
        with pytest.raises(ValueError):
            fn(*args)
    with pytest.raises(TypeError):
        fn(buf, 660, 220, 160, 0.0, 0.0, 10.0, 10.0, bytes(32 * 32 * 3), 32, 32, False)  # read-only destination
    tiny = np.zeros((3, 3, 3), np.uint8)  # narrower than the filter: the caller asks Pillow instead
    assert fn(memoryview(tiny).cast("B"), 9, 3, 3, 0.0, 0.0, 3.0, 3.0, out, 32, 32, False) is False


def test_a_box_edge_past_the_image_by_a_rounding_error_is_the_edge():
    """The loader scales boxes by sw / width: (x + w) * sw / width can exceed sw by 1e-15 (width 85 at 2/8:
    22.000000000000004). Pillow takes the box in single precision, where that is the edge; so does ours
    (it once refused such crops, and the loader counted the photos as bad samples)."""
    arr = photo(6, 40, 22)
    edge = 85 * (22 / 85)
    assert edge > 22
    box = (3.5, 0.0, edge, 40.0)
    got = ours(arr, box, 16).astype(np.int64)
    assert np.abs(got - pillow(arr, box, 16)).max() <= 1


@pytest.mark.parametrize("path", ["simplejpeg", "region"])
def test_loader_crops_touching_the_image_edge_are_never_refused(path):
    if path == "region" and not decode.region_available():
        pytest.skip("mycodist/data/_jpegregion.c not built")
    buf = io.BytesIO()
    Image.fromarray(photo(1, 85, 85)).save(buf, "JPEG", quality=90)
    # 85 px at 2/8 is 22 px, and 85 * (22 / 85) > 22 in float64: the whole-photo box's right edge
    for box in [(0, 0, 85, 85), (20, 0, 85, 85), (0, 30, 85, 85)]:
        got = decode.decode_crop(buf.getvalue(), (85, 85), box, 16, 2.0, path)
        assert got is not None and got.shape == (16, 16, 3)


def test_the_resize_key_is_validated_and_pillow_gives_pillows_pixels(monkeypatch):
    import random

    from data_util import config

    from mycodist.data.transforms import ImageConfig, decode_train
    from mycodist.errors import UsageError

    with pytest.raises(UsageError, match="data.resize"):
        ImageConfig.from_config(config("data.resize=opencv"))
    assert ImageConfig.from_config(config("data.resize=pillow")).resize == "pillow"
    buf = io.BytesIO()
    Image.fromarray(photo(2)).save(buf, "JPEG", quality=90)
    fast = ImageConfig(size=64, decoder="simplejpeg")
    exact = ImageConfig(size=64, decoder="simplejpeg", resize="pillow")
    differs = False
    for seed in range(8):
        a = decode_train(buf.getvalue(), fast, random.Random(seed)).astype(int)
        b = decode_train(buf.getvalue(), exact, random.Random(seed)).astype(int)
        assert np.abs(a - b).max() <= 1
        differs |= bool((a != b).any())
    assert differs  # the two settings really ran different resizes
    monkeypatch.setattr(decode, "_resample", lambda: None)  # not built: "fast" is a clear error, auto falls back
    with pytest.raises(UsageError, match="_resample.c"):
        ImageConfig(size=64, resize="fast").check()
    ImageConfig(size=64, resize="auto").check()


def test_runs_in_threads_with_the_same_pixels():
    arr = photo(4)
    boxes = [random_box(np.random.default_rng(s), 340, 300) for s in range(8)]
    want = [ours(arr, b, 96) for b in boxes]
    got: list = [None] * len(boxes)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, [ours(arr, boxes[i], 96) for _ in range(20)]))
               for i in range(len(boxes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(g, want[i]) for i, runs in enumerate(got) for g in runs)


@pytest.mark.skipif(shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc")
                    is None, reason="no C compiler")
def test_portable_loops_give_the_same_pixels_as_the_simd_ones(tmp_path):
    """The build without SSE2 intrinsics or AVX2 clones (what a non-x86 CPU runs) computes the same integers."""
    cc = sysconfig.get_config_var("CC").split()
    so = tmp_path / f"_resample_portable{sysconfig.get_config_var('EXT_SUFFIX')}"
    src = tmp_path / "_resample_portable.c"
    src.write_text(SOURCE.read_text().replace("PyInit__resample", "PyInit__resample_portable")
                   .replace('"_resample", NULL', '"_resample_portable", NULL'))
    subprocess.run([*cc, "-O2", "-shared", "-fPIC", "-DMYCODIST_PORTABLE", f"-I{sysconfig.get_paths()['include']}",
                    str(src), "-o", str(so)], check=True)
    spec = importlib.util.spec_from_file_location("_resample_portable", so)
    portable = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(portable)
    rng = np.random.default_rng(7)
    for i in range(30):
        arr = photo(i % 3)
        box, size, flip = random_box(rng, 340, 300), int(rng.choice([24, 96, 224])), bool(i % 2)
        assert np.array_equal(ours(arr, box, size, flip, portable), ours(arr, box, size, flip)), (box, size)
