"""Image checks run in the worker processes: each rejection reason, EXIF orientation, size cap, and
the hashes that make exact and near duplicates detectable."""

from __future__ import annotations

import io

from PIL import Image

from mycodist.crawl.images import ImageOptions, difference_hash, hamming, process_image
from mycodist.crawl.mock_site import bomb_png, simple_photo, with_comment

OPTS = ImageOptions(max_side=128, min_side=32, max_pixels=10_000_000, jpeg_quality=90)


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_rejections_with_reasons():
    photo = simple_photo("a", 0, 200, 0)
    assert process_image(b"<html>not an image</html>", OPTS).reason == "not_image"
    assert process_image(photo[: len(photo) // 2], OPTS).reason == "truncated"
    assert process_image(bomb_png(), OPTS).reason == "too_many_pixels"
    assert process_image(jpeg(Image.new("RGB", (20, 300))), OPTS).reason == "too_small"


def test_resize_reencode_and_keep():
    big = simple_photo("a", 0, 400, 0)
    r = process_image(big, OPTS)
    assert r.reason is None and max(r.width, r.height) == 128 and r.jpg != big
    with Image.open(io.BytesIO(r.jpg)) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (r.width, r.height)
    small = simple_photo("a", 1, 100, 0)
    kept = process_image(small, OPTS)
    assert kept.jpg == small  # already an RGB JPEG within the cap: stored as downloaded
    png = io.BytesIO()
    Image.new("RGBA", (64, 64), (10, 200, 30, 128)).save(png, "PNG")
    r = process_image(png.getvalue(), OPTS)
    assert r.reason is None and Image.open(io.BytesIO(r.jpg)).mode == "RGB"


def test_exif_orientation_applied():
    im = Image.new("RGB", (100, 60), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    r = process_image(jpeg(im, exif=exif.tobytes()), OPTS)
    assert (r.width, r.height) == (60, 100)


def scene(seed: int) -> Image.Image:
    """A smooth scene with shapes, like a photo at the scale a difference hash looks at."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:120, 0:160]
    arr = np.zeros((120, 160, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.01, 0.05), rng.uniform(0.01, 0.05), rng.uniform(0, 6)
        arr[..., c] = 128 + 100 * np.sin(fx * x + ph) * np.cos(fy * y)
    return Image.fromarray(arr.clip(0, 255).astype("uint8"), "RGB")


def test_duplicate_hashes():
    photo = jpeg(scene(0), quality=92)
    a, b = process_image(photo, OPTS), process_image(with_comment(photo), OPTS)
    assert a.sha256 != b.sha256 and a.pixel_sha256 == b.pixel_sha256
    recompressed = process_image(jpeg(scene(0).resize((140, 105)), quality=50), OPTS)
    other = process_image(jpeg(scene(1)), OPTS)
    assert recompressed.pixel_sha256 != a.pixel_sha256
    assert hamming(recompressed.phash, a.phash) <= 4 < hamming(other.phash, a.phash)
    assert difference_hash(scene(3)) == difference_hash(scene(3))
