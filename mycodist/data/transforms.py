"""The image path: JPEG bytes → uint8 crop (in the worker, per sample) → batch tensor (per batch).

Per sample, the crop is chosen on the photo's full size first, then the JPEG is decoded at the smallest
scale that still leaves the crop at least as large as the output — 1/8, 1/4, 1/2 or 1 with libjpeg-turbo,
decoding only the crop's region where that pays (decode.py, `data.decoder`), or with Pillow's draft mode —
and one Pillow resize with a source box does crop and resize together. That is the whole speed difference against the usual
decode-everything-then-crop path. The eval crop always takes the Pillow path, which serving restates.

Each crop is written straight into its slot of a uint8 NHWC batch buffer (flip = a reversed numpy
view, copied once), which a DataLoader worker allocates in shared memory: the hand-off to the
training process then copies nothing. Colour jitter and mixup/cutmix run on the batch in the worker;
normalisation to float runs in the training process (`to_output`), one fused pass per channel. Sending
uint8 and normalising on arrival is the cheapest placement measured: a fresh shared-memory page costs
far more to fault in than an ordinary (transparent-huge-page) one, and float batches are 4x larger.
NHWC storage *is* the channels-last layout of an NCHW tensor, so channels-last uint8 costs nothing.

Randomness comes from a seed per (seed, epoch, sample key) or (seed, epoch, rank, batch), never from a
running generator, so a resumed or re-laid-out epoch augments each sample identically.
"""

from __future__ import annotations

import io
import math
import mmap
import random
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from mycodist.data.decode import (
    DECODERS,
    RESIZES,
    decode_crop,
    jpeg_size,
    pixels_into,
    region_available,
    resample_available,
    simplejpeg_available,
    turbo_path,
)
from mycodist.errors import UsageError
from mycodist.preprocess import EvalPreprocess, scale_shift

OUTPUTS = ("float", "uint8")


def resolve_output(output: str) -> str:
    """`data.output=auto`: uint8 batches when a GPU will normalise them (4x fewer bytes through pinned memory
    and PCIe), normalised float on a CPU-only machine, where the workers do that work instead."""
    if output == "auto":
        return "uint8" if torch.cuda.is_available() else "float"
    return output


@dataclass(frozen=True)
class ImageConfig:
    """The `data.*` augmentation keys, resolved once and passed to workers."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    output: str = "float"
    channels_last: bool = False
    draft: bool = True
    reducing_gap: float = 2.0
    decoder: str = "auto"
    resize: str = "auto"
    eval: EvalPreprocess | None = None  # the eval transform (mycodist/preprocess.py); None = defaults at `size`

    @property
    def eval_transform(self) -> EvalPreprocess:
        if self.eval is not None:
            return self.eval
        return EvalPreprocess(size=self.size, mean=self.mean, std=self.std, draft=self.draft)

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mixup_prob > 0

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ImageConfig:
        d = cfg.data
        try:
            ev = EvalPreprocess.from_config(cfg)  # also the one place of "data.img_size 0 = model.img_size"
        except ValueError as e:
            raise UsageError(str(e)) from None
        ic = cls(size=ev.size, scale=_pair(d.scale, "data.scale"), ratio=_pair(d.ratio, "data.ratio"),
                 hflip=float(d.hflip), color_jitter=float(d.color_jitter),
                 mean=_triple(d.mean, "data.mean"), std=_triple(d.std, "data.std"),
                 mixup_alpha=float(d.mixup_alpha), cutmix_alpha=float(d.cutmix_alpha),
                 mixup_prob=float(d.mixup_prob), output=resolve_output(str(d.output)), channels_last=bool(d.channels_last),
                 draft=ev.draft, eval=ev, reducing_gap=float(d.get("reducing_gap", cls.reducing_gap)),
                 decoder=str(d.get("decoder", cls.decoder)), resize=str(d.get("resize", cls.resize)))
        ic.check()
        return ic

    def check(self) -> None:
        if self.size < 8:
            raise UsageError(f"image size {self.size} is too small; set data.img_size (0 = model.img_size)")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise UsageError(f"data.scale={list(self.scale)} must satisfy 0 < min <= max <= 1")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise UsageError(f"data.ratio={list(self.ratio)} must satisfy 0 < min <= max")
        if self.decoder not in DECODERS:
            raise UsageError(f"data.decoder='{self.decoder}' must be one of {DECODERS}")
        if self.decoder == "simplejpeg" and not simplejpeg_available():
            raise UsageError("data.decoder=simplejpeg but simplejpeg is not installed (pip install simplejpeg, "
                             "or data.decoder=auto to fall back to Pillow)")
        if self.decoder == "region" and not region_available():
            raise UsageError("data.decoder=region but mycodist's region decoder (mycodist/data/_jpegregion.c) is "
                             "not built: install libjpeg-turbo's headers (Debian: libjpeg62-turbo-dev) and a C "
                             "compiler, reinstall mycodist, or use data.decoder=auto")
        if self.resize not in RESIZES:
            raise UsageError(f"data.resize='{self.resize}' must be one of {RESIZES}")
        if self.resize == "fast" and not resample_available():
            raise UsageError("data.resize=fast but mycodist's resize (mycodist/data/_resample.c) is not built: install "
                             "a C compiler and reinstall mycodist, or use data.resize=auto (Pillow when not built)")
        if self.output not in OUTPUTS:
            raise UsageError(f"data.output='{self.output}' must be one of auto, {', '.join(OUTPUTS)}")
        if self.reducing_gap != 0 and self.reducing_gap < 1:
            raise UsageError(f"data.reducing_gap={self.reducing_gap} must be 0 (off) or >= 1, e.g. 2.0")
        if min(self.std) <= 0:
            raise UsageError("data.std values must be positive")
        for k in ("hflip", "mixup_prob"):
            if not 0 <= getattr(self, k) <= 1:
                raise UsageError(f"data.{k} must be a probability in [0, 1]")


def _pair(v, key: str) -> tuple[float, float]:
    vals = [float(x) for x in v]
    if len(vals) != 2:
        raise UsageError(f"{key} takes two numbers like [0.08, 1.0], got {vals}")
    return vals[0], vals[1]


def _triple(v, key: str) -> tuple[float, float, float]:
    vals = [float(x) for x in v]
    if len(vals) != 3:
        raise UsageError(f"{key} takes one number per RGB channel, got {vals}")
    return vals[0], vals[1], vals[2]


def crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h): area share in `scale`, aspect in `ratio` (log-uniform)."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # fall back to the largest centred crop with an aspect inside `ratio`
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _draft(img: Image.Image, box: tuple[float, float, float, float], size: int,
           use_draft: bool) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Draft-reduce a not-yet-loaded JPEG so `box` stays >= size; return the RGB image and the box rescaled."""
    width, height = img.size
    x0, y0, x1, y1 = box
    if use_draft and img.format == "JPEG":
        bw, bh = max(x1 - x0, 1), max(y1 - y0, 1)
        img.draft("RGB", (math.ceil(width * size / bw), math.ceil(height * size / bh)))
        sx, sy = img.size[0] / width, img.size[1] / height
        box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, box


def decode_train(data: bytes, cfg: ImageConfig, rng: random.Random, out: np.ndarray | None = None) -> np.ndarray:
    """Random-resized-crop and flip one image to a (size, size, 3) uint8 array (written into `out` if given).

    The crop box and the flip are drawn from `rng` the same way whichever decoder runs; only how the
    pixels are produced differs (`decode.decode_crop`). `reducing_gap` lets Pillow shrink by an integer
    factor (cheap box averaging) before the bilinear pass when the crop is still >= gap x the output
    after scaled decoding: a no-op for scaled JPEGs, a large saving for non-JPEGs or `draft=false`."""
    gap = cfg.reducing_gap or None
    path = turbo_path(cfg.decoder) if cfg.draft else None
    size = jpeg_size(data) if path is not None else None
    if size is not None:
        x, y, w, h = crop_box(size[0], size[1], rng, cfg.scale, cfg.ratio)
        flip = rng.random() < cfg.hflip
        small = decode_crop(data, size, (x, y, x + w, y + h), cfg.size, gap, path, flip=flip, out=out,
                            fast_resize=cfg.resize != "pillow")
        if small is not None:
            return small
        with Image.open(io.BytesIO(data)) as img:  # rare: a JPEG the header read allowed but decoding refused
            img, box = _draft(img, (x, y, x + w, y + h), cfg.size, cfg.draft)
            return pixels_into(img.resize((cfg.size, cfg.size), Image.BILINEAR, box=box, reducing_gap=gap), flip, out)
    with Image.open(io.BytesIO(data)) as img:
        x, y, w, h = crop_box(img.size[0], img.size[1], rng, cfg.scale, cfg.ratio)
        flip = rng.random() < cfg.hflip
        img, box = _draft(img, (x, y, x + w, y + h), cfg.size, cfg.draft)
        small = img.resize((cfg.size, cfg.size), Image.BILINEAR, box=box, reducing_gap=gap)
    return pixels_into(small, flip, out)


def decode_eval(data: bytes, cfg: ImageConfig, out: np.ndarray | None = None) -> np.ndarray:
    """The eval transform's pixels (mycodist/preprocess.py, shared with export and serving), written into
    `out` (a batch slot) when given."""
    pixels = cfg.eval_transform.decode(data)
    if out is None:
        return pixels
    np.copyto(out, pixels)
    return out


def empty_batch(shape: tuple[int, ...], dtype: torch.dtype, shared: bool,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """An uninitialised tensor; with `shared`, allocated directly in shared memory.

    `Tensor.share_memory_()` would allocate ordinary memory first and then copy it into a new shared
    block; allocating the shared block up front (as torch's own default_collate does) skips that copy.
    A large private batch comes from its own anonymous mapping marked MADV_HUGEPAGE: where transparent huge
    pages are madvise-only (Debian's default), faulting a fresh 38.5 MB float batch in 4 KiB pages costs
    ~17 ms of CPU, in 2 MiB pages ~4 ms (measured; `torch.empty` gets 4 KiB pages there)."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if numel == 0 or (not shared and (nbytes < _HUGE_MIN or _MADV_HUGEPAGE is None)):
        return torch.empty(shape, dtype=dtype, memory_format=memory_format)
    strides = torch.empty(shape, dtype=dtype, device="meta", memory_format=memory_format).stride()
    if shared:
        storage = torch.UntypedStorage._new_shared(nbytes)
    else:
        block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        block.madvise(_MADV_HUGEPAGE)
        storage = torch.frombuffer(block, dtype=torch.uint8).untyped_storage()  # keeps `block` alive
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
_HUGE_MIN = 4 << 20


def share(x: torch.Tensor) -> torch.Tensor:
    """`x` in shared memory (itself if it already is): what a worker hands over then travels by handle."""
    if x.is_shared():
        return x
    out = empty_batch(tuple(x.shape), x.dtype, True)
    return out.copy_(x)


def color_jitter_(x: torch.Tensor, strength: float, rngs: list[random.Random]) -> torch.Tensor:
    """Brightness, contrast, saturation factors in [1-s, 1+s] per image, on a float NHWC 0..255 batch."""
    lo, hi = max(0.0, 1 - strength), 1 + strength
    f = torch.tensor([[r.uniform(lo, hi) for _ in range(3)] for r in rngs], dtype=x.dtype)
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype)
    x.mul_(f[:, 0].view(-1, 1, 1, 1))
    mean = (x @ luma).mean(dim=(1, 2)).view(-1, 1, 1, 1)
    x.sub_(mean).mul_(f[:, 1].view(-1, 1, 1, 1)).add_(mean)
    gray = (x @ luma).unsqueeze(-1)
    x.sub_(gray).mul_(f[:, 2].view(-1, 1, 1, 1)).add_(gray)
    return x.clamp_(0, 255)


def one_hot(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(targets, num_classes).float()


def mix_batch(x: torch.Tensor, targets: torch.Tensor, num_classes: int, cfg: ImageConfig,
              rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix with the batch reversed (timm's pairing), on float NHWC; returns soft targets (B, C)."""
    soft = one_hot(targets, num_classes)
    if x.shape[0] < 2 or rng.random() >= cfg.mixup_prob:
        return x, soft
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = rng.betavariate(alpha, alpha)
    flipped = x.flip(0)
    if use_cutmix:
        h, w = x.shape[1], x.shape[2]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = rng.randint(0, h - 1), rng.randint(0, w - 1)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        x = x.clone()
        x[:, y0:y1, x0:x1] = flipped[:, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + flipped * (1 - lam)
    return x, soft * lam + soft.flip(0) * (1 - lam)


def to_output(x: torch.Tensor, cfg: ImageConfig, shared: bool = False) -> torch.Tensor:
    """NHWC batch (uint8, or float 0..255) → NCHW float normalised, or uint8; channels-last if asked.

    Contiguous output is written one channel at a time by numpy: `multiply(x[..., c], scale, dtype=float32)`
    reads the interleaved channel, converts and scales it into a contiguous plane in one pass, then
    `subtract(plane, shift)`. The same float32 arithmetic as torch's `mul`/`sub_` (bit-identical, tests), ~2.7x
    faster on one core: torch's uint8→float multiply does not vectorise the conversion (29 vs 11 ms per
    64 x 224 x 224 batch); for uint8 output numpy's de-interleaving copy takes 3.2 ms against torch's 5.4.
    The result never aliases `x` unless it is the free channels-last uint8 view. `shared` allocates the
    output in shared memory."""
    nchw = x.permute(0, 3, 1, 2)  # a channels-last view: no copy
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    if cfg.output == "uint8":
        if x.dtype != torch.uint8:
            nchw = nchw.round().clamp_(0, 255).to(torch.uint8)
        if cfg.channels_last and (nchw.is_shared() or not shared):
            return nchw
        out = empty_batch(tuple(nchw.shape), torch.uint8, shared, fmt)
        if cfg.channels_last or nchw.device.type != "cpu":
            return out.copy_(nchw)
        src, dst = nchw.numpy(), out.numpy()
        for c in range(nchw.shape[1]):
            dst[:, c] = src[:, c]
        return out
    out = empty_batch(tuple(nchw.shape), torch.float32, shared, fmt)
    scale, shift = scale_shift(cfg.mean, cfg.std)
    if cfg.channels_last:  # NHWC in memory on both sides: whole-tensor ops run contiguously
        out.copy_(nchw)
        return out.mul_(torch.tensor(scale).view(1, 3, 1, 1)).sub_(torch.tensor(shift).view(1, 3, 1, 1))
    if nchw.device.type != "cpu" or nchw.dtype not in (torch.uint8, torch.float32):
        for c in range(nchw.shape[1]):
            torch.mul(nchw[:, c], scale[c], out=out[:, c])
            out[:, c].sub_(shift[c])
        return out
    src, dst = nchw.numpy(), out.numpy()
    for c in range(nchw.shape[1]):
        np.multiply(src[:, c], np.float32(scale[c]), out=dst[:, c], dtype=np.float32)
        np.subtract(dst[:, c], np.float32(shift[c]), out=dst[:, c])
    return out


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """For `data.output=uint8`: normalise an NCHW uint8 batch where it lands (e.g. on the GPU)."""
    scale, shift = scale_shift(mean, std)  # the arithmetic of every other path: x * scale - shift
    return (images.float() * torch.tensor(scale, device=images.device).view(1, -1, 1, 1)
            - torch.tensor(shift, device=images.device).view(1, -1, 1, 1))
