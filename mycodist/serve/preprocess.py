"""Untrusted upload bytes → a normalised tensor, by the one eval transform (mycodist/preprocess.py) the
loader and the export use. This module only decodes uploads safely (formats, bombs, EXIF, transparency);
everything happens in memory: nothing touches the disk.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from mycodist.preprocess import ORIGINAL_SIZE
from mycodist.preprocess import EvalPreprocess as EvalTransform

# Formats a camera or a browser produces. TIFF, ICO, PSD and friends are left out: no phone sends them and
# each decoder is more attack surface. SVG is not a raster format at all (and may carry script).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
__all__ = ["ALLOWED_FORMATS", "BadImage", "EvalTransform", "decode_image", "original_size"]


class BadImage(ValueError):
    """The upload cannot be used; `status` is the HTTP code to answer with (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


EXIF_ORIENTATION = 0x0112


def original_size(img: Image.Image) -> tuple[int, int]:
    """The upright width and height of the photo as uploaded (draft decoding may have shrunk `img`)."""
    return tuple(img.info.get(ORIGINAL_SIZE, img.size))  # type: ignore[return-value]


def decode_image(data: bytes, max_pixels: int, transform: EvalTransform | None = None) -> Image.Image:
    """Decode an upload into an upright RGB image, refusing anything dangerous before it is decoded.

    - empty, unknown format, truncated or corrupt → BadImage (400);
    - declared width × height above `max_pixels` → BadImage (400), checked from the header alone;
    - EXIF orientation applied (phones store portrait photos sideways);
    - a JPEG far larger than needed is decoded at a reduced scale, as `transform.draft_request` asks.
    """
    if not data:
        raise BadImage("the upload is empty; send a JPEG, PNG, WebP, GIF or BMP photo")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml", b"<!doctype", b"<html")):
        raise BadImage("SVG/HTML/XML is not accepted; send a JPEG, PNG, WebP, GIF or BMP photo")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError:
        raise BadImage("this is not an image this service reads; send a JPEG, PNG, WebP, GIF or BMP photo") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("the image declares too many pixels (a decompression bomb?)") from None
    except Exception as e:  # Pillow raises many exception types on hostile headers
        raise BadImage(f"the image is truncated or corrupt (unreadable header, {type(e).__name__})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage(f"the image declares an empty size {w}x{h}")
    if w * h > max_pixels:
        raise BadImage(f"the image declares {w}x{h} = {w * h:,} pixels, more than the {max_pixels:,} accepted; "
                       "resize it before uploading")
    try:
        request = transform.draft_request(w, h) if transform is not None else None
        if request is not None and img.format in ("JPEG", "MPO"):
            img.draft("RGB", request)
        img.load()
        try:
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored sideways
                w, h = h, w
            img = ImageOps.exif_transpose(img)
        except Exception:  # a malformed EXIF block: keep the pixels as stored
            pass
        out = _to_rgb(img)
        out.info[ORIGINAL_SIZE] = (w, h)  # upright size as uploaded, before any draft reduction
        return out
    except Image.DecompressionBombError:
        raise BadImage("the image declares too many pixels (a decompression bomb?)") from None
    except MemoryError:
        raise BadImage("the image is too large to decode") from None
    except Exception as e:
        raise BadImage(f"the image is truncated or corrupt ({type(e).__name__}); upload the original file") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten transparency onto white (a cut-out photo on black would look like a different scene)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")
