"""JPEG decoding through libjpeg-turbo for training crops: only the crop's region where it pays; Pillow for the rest.

Region decoding (`_jpegregion`, a small C extension over libjpeg-turbo's classic API, built when a compiler
and libjpeg-turbo's headers are present: Debian's libjpeg62-turbo-dev): the JPEG is decoded at a
power-of-two scale k/8 inside the inverse DCT, `jpeg_crop_scanline` limits the inverse DCT, chroma
upsampling and colour conversion to the iMCU columns around the crop, `jpeg_skip_scanlines` passes over the
rows above it without inverse DCT, and decoding stops after its last row. Rows above the crop still have to
be entropy-decoded (a baseline JPEG has no index), so the saving is the rows below the crop plus the inverse
DCT and colour work outside it: measured on the loader benchmark's photos, a crop window covering 10-20 % of
the scaled image decodes in ~0.53 of the whole-image time, 50-60 % in ~0.84, and from ~90 % the whole-image
decode through simplejpeg is as fast or faster (`REGION_MAX_AREA`; docs/performance.md).

The pixels are those of a whole-image decode at the same scale, bit for bit: libjpeg's fancy (triangle)
upsampling of 4:2:2/4:2:0 chroma treats a cropped span's first and last columns as image edges, so the
region asked for is one column wider on each side than the resize reads, and those edge columns are never
used (tests/test_data_decode.py checks the equality on 4:4:4, 4:2:2 and 4:2:0, baseline and progressive, at
every scale). Decoding stops after the crop, so a file truncated below it would decode; to keep a truncated
file a bad sample, region decoding is used only when the EOI marker follows the last scan (`_complete`), and
anything else takes the whole-image path, which reads (and refuses) the whole file.

Whole-image decoding (simplejpeg, a manylinux wheel bundling libjpeg-turbo) is the fallback when the
extension is not built, and `data.decoder=simplejpeg`. The scales: libjpeg-turbo scales by any k/8, but the
3/8, 5/8, 6/8 and 7/8 inverse DCTs and chroma upsampling have no SIMD code and decode *slower* than the
next power of two up, for whole images and regions alike, so crops are decoded at the smallest of `SCALES`
that covers them, chosen from the rounded-up scaled size (Pillow's draft rounds down and sometimes decodes
2x larger than needed). Either way only the crop window is resized, once, straight into the batch slot: by
`_resample` (mycodist/data/_resample.c, Pillow's antialiased bilinear filter evaluated ~3.5x faster, within one
level of Pillow's pixels; built with any C compiler) or, without it, by Pillow (decoding to RGBX, which Pillow
could wrap without a copy, was tried: Pillow's resize of 4-band images is ~20 % slower and ate the gain).
Decoding settings are libjpeg's defaults, which are Pillow's and simplejpeg's (accurate integer IDCT, fancy chroma upsampling): at the same scale all give identical pixels.

Anything neither can read (PNG, WebP, CMYK JPEG, ...) returns None and goes to Pillow.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any

import numpy as np
from PIL import Image

DECODERS = ("auto", "region", "simplejpeg", "pillow")
RESIZES = ("auto", "fast", "pillow")  # data.resize: the train crop's resize after libjpeg-turbo decoding
SCALES = (1, 2, 4, 8)  # eighths: the scales that pay (module docstring); range(1, 9) would be every scale
# auto: region-decode when the crop window covers less than this share of the scaled image, else whole-image
REGION_MAX_AREA = 0.9
_EOI = b"\xff\xd9"


@functools.cache
def _optional(name: str) -> Any | None:
    """An optional module, or None where it is not installed (or, for our C extensions, not built)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _region() -> Any | None:  # not built: no C compiler or no libjpeg-turbo headers at install time
    return _optional("mycodist.data._jpegregion")


def _resample() -> Any | None:  # not built: no C compiler at install time
    return _optional("mycodist.data._resample")


def _simplejpeg() -> Any | None:
    return _optional("simplejpeg")


def region_available() -> bool:
    return _region() is not None


def resample_available() -> bool:
    return _resample() is not None


def simplejpeg_available() -> bool:
    return _simplejpeg() is not None


def turbo_path(decoder: str) -> str | None:
    """`data.decoder` → how training crops are decoded: "region" (region decoding, whole-image simplejpeg for
    crops covering most of the image), "region-only", "simplejpeg" (whole image) or None (Pillow). auto takes
    the fastest installed."""
    if decoder == "region":
        return "region-only" if region_available() else None
    if decoder == "simplejpeg":
        return "simplejpeg" if simplejpeg_available() else None
    if decoder == "auto":
        return "region" if region_available() else "simplejpeg" if simplejpeg_available() else None
    return None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG header, or None when libjpeg cannot decode this file to RGB."""
    sj = _simplejpeg()
    if sj is None:
        region = _region()
        if region is None:
            return None
        try:
            return region.jpeg_size(data)
        except (ValueError, TypeError):
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


def _window(box: tuple[float, float, float, float], size: int, w: int, h: int) -> tuple[int, int, int, int]:
    """The columns and rows (x0, y0, x1, y1) of a w x h image that resizing `box` to size x size reads:
    the box plus the bilinear filter's reach and a margin."""
    pad = math.ceil(max((box[2] - box[0]) / size, (box[3] - box[1]) / size, 1.0)) + 2
    return (max(int(box[0]) - pad, 0), max(int(box[1]) - pad, 0),
            min(math.ceil(box[2]) + pad, w), min(math.ceil(box[3]) + pad, h))


def _pillow_reduces(box: tuple[float, float, float, float], size: int, gap: float | None) -> bool:
    """Whether Pillow's resize would first shrink by an integer factor (`reducing_gap`), as Image.resize decides."""
    if gap is None:
        return False
    return int((box[2] - box[0]) / size / gap) > 1 or int((box[3] - box[1]) / size / gap) > 1


def pixels_into(img: Image.Image, flip: bool, out: np.ndarray | None) -> np.ndarray:
    """A Pillow crop's (size, size, 3) pixels, mirrored if asked, copied into `out` (a batch slot) when given.

    Pillow mirrors a 224-px crop in ~20 us; copying a reversed numpy view instead costs ~150 us
    (3-byte items at a negative stride)."""
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.uint8)
    if out is None:
        return arr
    np.copyto(out, arr)
    return out


def _resize(pixels: Any, stride: int, window: tuple[int, int, int, int], box: tuple[float, float, float, float],
            size: int, gap: float | None, flip: bool, out: np.ndarray | None, fast_resize: bool = True) -> np.ndarray:
    """The bilinear resize of `box` to size x size, mirrored if `flip`, into `out` (a batch slot) when given;
    `pixels` holds the window's RGB rows (`stride` bytes apart, starting at the window's first pixel); the box
    is in the coordinates of the whole image. The C resize (`_resample`: Pillow's filter, ~3.5x faster, within
    one level of Pillow's pixels) where it is built, asked for (`fast_resize`) and Pillow would not first
    reduce; Pillow otherwise."""
    x0, y0, x1, y1 = window
    shifted = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    fast = _resample() if fast_resize and not _pillow_reduces(shifted, size, gap) else None
    if fast is not None:
        dst = np.empty((size, size, 3), np.uint8) if out is None else out
        if fast.resize_box(pixels, stride, x1 - x0, y1 - y0, *shifted, dst, size, size, flip):
            return dst
    img = Image.frombuffer("RGB", (x1 - x0, y1 - y0), pixels, "raw", "RGB", stride, 1)
    return pixels_into(img.resize((size, size), Image.BILINEAR, box=shifted, reducing_gap=gap), flip, out)


def resize_region(arr: np.ndarray, box: tuple[float, float, float, float], size: int, gap: float | None,
                  flip: bool = False, out: np.ndarray | None = None, fast_resize: bool = True) -> np.ndarray:
    """`_resize` of `box` of an RGB array, handing the resize only the box's rows and columns (plus the
    filter's reach): the rest of the photo is never read. Pillow's pixels on the window are those of resizing the
    whole array for most boxes; for some, the shifted box rounds the filter's sample positions differently and
    pixels differ by 1 level (in up to a fifth of the pixels; never by more, tests/test_data_decode.py)."""
    h, w = arr.shape[:2]
    window = _window(box, size, w, h)
    rows = memoryview(np.ascontiguousarray(arr)).cast("B")[(window[1] * w + window[0]) * 3:]
    return _resize(rows, w * 3, window, box, size, gap, flip, out, fast_resize)


def _complete(data: bytes) -> bool:
    """Whether the JPEG's last scan is followed by the EOI marker, i.e. the file was not cut short: the end of
    the file for nearly every JPEG, after a trailer for some cameras' files. Entropy-coded data cannot hold
    0xFFD9 or 0xFFDA (0xFF is stuffed), so an EOI after the last SOS marker is the real end of the image."""
    return data.endswith(_EOI) or data.rfind(_EOI) > data.rfind(b"\xff\xda") > 0


def decode_crop(data: bytes, full: tuple[int, int], box: tuple[int, int, int, int], size: int,
                gap: float | None, path: str, scales: tuple[int, ...] = SCALES, flip: bool = False,
                out: np.ndarray | None = None, fast_resize: bool = True) -> np.ndarray | None:
    """`box` of the JPEG `data` (full size `full`) resized to size x size, mirrored if `flip`, into `out` when
    given: decoded at the smallest of `SCALES` that keeps the box >= size px, by region or whole-image decoding
    (`path`, from `turbo_path`), then `_resize` of the window (`fast_resize`: the C resize where built).
    Region and whole-image decoding give identical pixels (module docstring); against Pillow's path the pixels differ by at most 1 level (the C resize's
    rounding, `resize_region`'s shifted box), and where Pillow's draft rounds down and decodes at twice the
    scale, the IDCT does part of the shrinking. None when libjpeg refuses the data (the caller then takes
    Pillow's path)."""
    width, height = full
    k = pick_scale(width, height, *scale_request(width, height, box, size), scales)
    sw, sh = -(-width * k // 8), -(-height * k // 8)  # libjpeg's scaled size (rounded up)
    sx, sy = sw / width, sh / height
    sbox = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    window = _window(sbox, size, sw, sh)
    x0, y0, x1, y1 = window
    region = _region() if path in ("region", "region-only") and _complete(data) else None
    if region is not None and (path == "region-only" or not simplejpeg_available()
                               or (x1 - x0) * (y1 - y0) < REGION_MAX_AREA * sw * sh):
        try:  # one column more on each side: libjpeg upsamples a cropped span's edge columns differently
            got = region.decode_region(data, k, x0 - 1, y0, x1 + 1, y1)
        except (ValueError, TypeError):
            got = None
        if got is not None:
            pixels, rx, _, rw, _, fw, fh = got
            if (fw, fh) == (sw, sh):
                return _resize(memoryview(pixels)[(x0 - rx) * 3:], rw * 3, window, sbox, size, gap, flip, out,
                               fast_resize)
    arr = decode_scaled(data, width, height, sw, sh, scales=(k,))
    if arr is None or arr.shape[:2] != (sh, sw):
        return None
    return resize_region(arr, sbox, size, gap, flip, out, fast_resize)
