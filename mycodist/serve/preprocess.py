"""Untrusted upload bytes → a normalised tensor, exactly as the training loader's eval transform.

Serving may not import mycodist.data, so the eval transform of mycodist/data/transforms.py
(`decode_eval` + normalisation) is restated here from the run config the export carries; a test
compares the two. Everything happens in memory: nothing touches the disk.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# Formats a camera or a browser produces. TIFF, ICO, PSD and friends are left out: no phone sends them and
# each decoder is more attack surface. SVG is not a raster format at all (and may carry script).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875


class BadImage(ValueError):
    """The upload cannot be used; `status` is the HTTP code to answer with (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EvalTransform:
    """The loader's eval path restated: the centred square of side `eval_crop` × the shorter side, resized
    (bilinear, antialiased) to size × size in one Pillow call, then (x / 255 - mean) / std.

    Equivalent to "resize the shorter side to size / eval_crop, centre-crop size" without the double
    resampling. JPEGs are draft-decoded at the largest 1/2, 1/4, 1/8 scale that keeps the square ≥ size,
    as the loader does (`data.draft`).
    """

    size: int = 224
    eval_crop: float = DEFAULT_CROP_PCT
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    draft: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> EvalTransform:
        """Read `data.img_size` (0 → `model.img_size`), `data.eval_crop`, `data.mean`, `data.std`, `data.draft`;
        an older config without them gets the loader's defaults."""
        data = cfg.get("data") or {}
        model = cfg.get("model") or {}
        size = int(data.get("img_size", 0) or 0) or int(model.get("img_size", 224))
        mean = tuple(float(x) for x in data.get("mean", IMAGENET_MEAN))
        std = tuple(float(x) for x in data.get("std", IMAGENET_STD))
        crop = float(data.get("eval_crop", DEFAULT_CROP_PCT))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"data.mean/std must be 3 numbers each (std > 0), got {mean} / {std}")
        if not 0 < crop <= 1 or size < 8:
            raise ValueError(f"data.eval_crop must be in (0, 1] and the image size ≥ 8, got {crop}, {size}")
        return cls(size=size, eval_crop=crop, mean=mean, std=std, draft=bool(data.get("draft", True)))  # type: ignore[arg-type]

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        side = min(width, height) * self.eval_crop
        x0, y0 = (width - side) / 2, (height - side) / 2
        return x0, y0, x0 + side, y0 + side

    def draft_request(self, width: int, height: int) -> tuple[int, int] | None:
        """The size to ask JPEG draft mode for so the centred square stays ≥ size (None: decode in full).

        The square is centred, so it covers the same pixels before and after an EXIF rotation."""
        if not self.draft:
            return None
        side = max(min(width, height) * self.eval_crop, 1.0)
        return math.ceil(width * self.size / side), math.ceil(height * self.size / side)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """An RGB PIL image → a (3, size, size) float32 tensor."""
        arr = np.asarray(img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=self.box(*img.size)),
                         dtype=np.uint8)
        scale = torch.tensor([1 / (255 * s) for s in self.std])
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std, strict=True)])
        return (torch.from_numpy(arr.copy()).float() * scale - shift).permute(2, 0, 1).contiguous()


EXIF_ORIENTATION = 0x0112


def original_size(img: Image.Image) -> tuple[int, int]:
    """The upright width and height of the photo as uploaded (draft decoding may have shrunk `img`)."""
    return tuple(img.info.get("original_size", img.size))  # type: ignore[return-value]


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
        out.info["original_size"] = (w, h)  # upright size as uploaded, before any draft reduction
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
