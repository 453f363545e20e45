"""Decode, check and re-encode one downloaded image. Runs in worker processes so that decoding never
stalls the event loop; everything here is a pure function of the bytes and the options."""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# We check the pixel count ourselves from the header before decoding (a bomb must be a clean
# rejection with a reason, not a warning), and a truncated file must fail rather than be padded.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageOptions:
    max_side: int = 512
    min_side: int = 32
    max_pixels: int = 50_000_000
    jpeg_quality: int = 90


@dataclass(frozen=True)
class ImageResult:
    """Either `reason` is set (rejected) or the rest describes the accepted, re-encoded image."""

    reason: str | None
    jpg: bytes = b""
    width: int = 0
    height: int = 0
    sha256: str = ""  # of the bytes as downloaded
    pixel_sha256: str = ""  # of the decoded RGB pixels after resizing: same picture, other bytes → same hash
    phash: int = 0  # 64-bit difference hash, for near-duplicates within a species


def difference_hash(im: Image.Image) -> int:
    """64-bit dHash: robust to re-encoding and resizing, cheap to compare by Hamming distance."""
    small = im.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    px = small.tobytes()
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (px[row * 9 + col] > px[row * 9 + col + 1])
    return bits


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not a reason to drop the photo
        return 1


def process_image(data: bytes, opts: ImageOptions) -> ImageResult:
    """Validate `data` and return an RGB JPEG whose longest side is at most `opts.max_side`."""
    sha = hashlib.sha256(data).hexdigest()
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return ImageResult("not_image", sha256=sha)
    w, h = im.size
    if w <= 0 or h <= 0:
        return ImageResult("not_image", sha256=sha)
    if w * h > opts.max_pixels:  # from the header alone: a decompression bomb is never decoded
        return ImageResult("too_many_pixels", sha256=sha)
    if min(w, h) < opts.min_side:
        return ImageResult("too_small", sha256=sha)
    orientation = _orientation(im)
    keep_original = (im.format == "JPEG" and im.mode == "RGB" and max(w, h) <= opts.max_side and orientation == 1)
    try:
        if max(w, h) > opts.max_side:
            r = opts.max_side / max(w, h)
            target = (max(1, math.ceil(w * r)), max(1, math.ceil(h * r)))
            if im.format == "JPEG":
                # let the JPEG decoder scale by 1/2, 1/4 or 1/8 while staying >= the target size (both
                # sides): 2-4x cheaper than a full decode, and DCT scaling is a good-quality reduction
                im.draft("RGB", target)
            im = im.resize(target, Image.Resampling.LANCZOS)
        else:
            im.load()
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return ImageResult("truncated", sha256=sha)
    except Exception:  # a decoder bug on hostile input is a rejection, never a crash of the crawl
        return ImageResult("not_image", sha256=sha)
    if im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
            im = bg
        else:
            im = im.convert("RGB")
    pixel_sha = hashlib.sha256(f"{im.size}".encode() + im.tobytes()).hexdigest()
    if keep_original:
        jpg = data  # already what we would write: avoid a second lossy generation
    else:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=opts.jpeg_quality)
        jpg = buf.getvalue()
    return ImageResult(None, jpg, im.width, im.height, sha, pixel_sha, difference_hash(im))
