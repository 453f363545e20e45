"""JPEG decoding through libjpeg-turbo (simplejpeg) for training crops; Pillow for everything else.

libjpeg-turbo scales by k/8 (k = 1..8) inside the inverse DCT; simplejpeg, a manylinux wheel that bundles
it, exposes that as "the smallest scale whose image is at least min_width x min_height". Measured on the
loader benchmark's photos (docs/performance.md), the scales 3/8, 5/8, 6/8 and 7/8 decode *slower* than the
next power of two up (their IDCTs and chroma upsampling have no SIMD code), and a crop needing 5/8-7/8
is cheaper decoded in full and resized: so crops are decoded at the smallest of `SCALES` that covers them,
the same set as Pillow's draft mode. What is gained over Pillow: a faster decode at each scale, only the
crop's region copied into Pillow for the resize, and a scale chosen from the rounded-up scaled size
(Pillow's draft rounds down and sometimes decodes 2x larger than needed). Decoding to RGBX, which Pillow
could wrap without a copy, was tried: Pillow's resize of 4-band images is ~20 % slower and ate the gain.
simplejpeg's defaults are Pillow's (accurate integer IDCT, fancy chroma upsampling): at the same scale both
give identical pixels.

Decoding only the crop's region (TurboJPEG 3's cropping region) would save more on small crops, but no
Python binding of it runs on Debian's libturbojpeg 2.1 (PyTurboJPEG 2 requires TurboJPEG 3), so it is not
used. Anything simplejpeg cannot read (PNG, WebP, CMYK JPEG, ...) returns None and goes to Pillow.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from PIL import Image

DECODERS = ("auto", "simplejpeg", "pillow")
SCALES = (1, 2, 4, 8)  # eighths: the scales that pay (module docstring); range(1, 9) would be every scale


@functools.lru_cache(maxsize=1)
def _simplejpeg() -> Any | None:
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def simplejpeg_available() -> bool:
    return _simplejpeg() is not None


def use_simplejpeg(decoder: str) -> bool:
    """`data.decoder` → whether training crops go through simplejpeg (auto: when it is installed)."""
    return decoder == "simplejpeg" or (decoder == "auto" and simplejpeg_available())


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG header, or None when simplejpeg cannot decode this file."""
    sj = _simplejpeg()
    if sj is None:
        return None
    try:
        height, width, colorspace, _ = sj.decode_jpeg_header(data)
    except (ValueError, TypeError):
        return None
    if colorspace not in ("Gray", "YCbCr", "RGB"):  # CMYK / YCCK: libjpeg cannot convert them to RGB
        return None
    return width, height


def scale_request(width: int, height: int, box: tuple[float, float, float, float], size: int) -> tuple[int, int]:
    """The least decoded (width, height) that keeps `box` at least `size` px on both sides."""
    bw, bh = max(box[2] - box[0], 1), max(box[3] - box[1], 1)
    return min(math.ceil(width * size / bw), width), min(math.ceil(height * size / bh), height)


def pick_scale(width: int, height: int, min_width: int, min_height: int, scales: tuple[int, ...] = SCALES) -> int:
    """The smallest k in `scales` whose k/8-scaled image (libjpeg rounds up) is >= min_width x min_height."""
    for k in sorted(scales):
        if math.ceil(width * k / 8) >= min_width and math.ceil(height * k / 8) >= min_height:
            return k
    return 8


def decode_scaled(data: bytes, width: int, height: int, min_width: int, min_height: int,
                  scales: tuple[int, ...] = SCALES) -> np.ndarray | None:
    """RGB (H, W, 3) uint8 at the scale `pick_scale` chooses; None when simplejpeg cannot decode `data`."""
    sj = _simplejpeg()
    if sj is None:
        return None
    k = pick_scale(width, height, min_width, min_height, scales)
    try:
        return sj.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(width * k / 8),
                              min_height=math.ceil(height * k / 8))
    except (ValueError, TypeError):
        return None


def resize_region(arr: np.ndarray, box: tuple[float, float, float, float], size: int,
                  gap: float | None) -> Image.Image:
    """Pillow's bilinear resize of `box` of an RGB array to size x size, handing Pillow only the box's rows and
    columns (plus the filter's reach): Pillow copies what it is given into its own 4-byte pixels, and the
    rest of the photo is never read. The same pixels as resizing the whole array for most boxes; for some,
    the shifted box rounds the filter's sample positions differently and pixels differ by 1 level (in up
    to a fifth of the pixels; never by more, tests/test_data_decode.py)."""
    h, w = arr.shape[:2]
    pad = math.ceil(max((box[2] - box[0]) / size, (box[3] - box[1]) / size, 1.0)) + 2
    x0, y0 = max(int(box[0]) - pad, 0), max(int(box[1]) - pad, 0)
    x1, y1 = min(math.ceil(box[2]) + pad, w), min(math.ceil(box[3]) + pad, h)
    rows = memoryview(np.ascontiguousarray(arr)).cast("B")[(y0 * w + x0) * 3:]
    img = Image.frombuffer("RGB", (x1 - x0, y1 - y0), rows, "raw", "RGB", w * 3, 1)
    shifted = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    return img.resize((size, size), Image.BILINEAR, box=shifted, reducing_gap=gap)
