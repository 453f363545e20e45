"""Multi-head self-attention with pluggable kernels that all compute softmax(QKᵀ/√d)V.

Backends (model.attention):
- flash_attn: the flash-attn package, CUDA + fp16/bf16 + head dim <= 256, full attention only.
- sdpa: torch's scaled_dot_product_attention; torch picks its kernel (on CPU a flash-style kernel),
  model.sdpa_kernel can force one.
- flex: torch FlexAttention with a BlockMask (dense / local / block_sparse); compiled by default.
- math: the explicit O(N²) reference.
- auto: the fastest that can run for this device/dtype/mask, logged once.
An explicitly requested backend that cannot run raises AttentionBackendError saying why; only `auto` chooses.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mycodist.errors import UsageError
from mycodist.models.masks import TokenMask
from mycodist.models.vit_config import AttentionRuntime, ViTConfig

log = logging.getLogger("mycodist.models")

BACKENDS = ("auto", "flash_attn", "sdpa", "flex", "math")
SDPA_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")
FLASH_ATTN_MAX_HEAD_DIM = 256

_logged_choices: set[tuple] = set()
_warned: set[str] = set()


class AttentionBackendError(UsageError):
    """The attention backend the user asked for cannot run here; the message says why and what to use."""


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


@functools.lru_cache(maxsize=1)
def flash_attn_qkvpacked() -> Callable | None:
    """flash_attn_qkvpacked_func when the flash-attn package imports (CUDA machines only), else None."""
    try:
        from flash_attn import flash_attn_qkvpacked_func
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_qkvpacked_func


@functools.lru_cache(maxsize=1)
def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def why_unavailable(
    backend: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool, mask: TokenMask | None
) -> str | None:
    """None if `backend` can run this call, else the reason (shown to the user verbatim)."""
    sparse = mask is not None and not mask.is_dense
    if backend == "flash_attn":
        if flash_attn_qkvpacked() is None:
            return "the flash-attn package is not importable (pip install flash-attn on a CUDA machine)"
        if device_type != "cuda":
            return f"flash-attn runs on CUDA only, the input is on {device_type}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs fp16 or bf16, the input is {dtype} (use mixed precision or model.attention=sdpa)"
        if head_dim > FLASH_ATTN_MAX_HEAD_DIM:
            return f"flash-attn supports head dim <= {FLASH_ATTN_MAX_HEAD_DIM}, this model has {head_dim}"
        if sparse:
            return f"flash-attn computes full attention only; model.flex_mask={mask.spec.kind} needs flex"
        return None
    if backend == "flex":
        if not flex_available():
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        if dropout:
            return "FlexAttention has no attention dropout; set model.attn_drop_rate=0 or use sdpa/math"
        return None
    if backend in ("sdpa", "math"):
        return None
    raise AttentionBackendError(f"unknown attention backend '{backend}'; choose one of {', '.join(BACKENDS)}")


def choose_backend(
    requested: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool, mask: TokenMask | None
) -> str:
    """Resolve `auto`, or check that an explicit choice can run (raising AttentionBackendError if not)."""
    if requested != "auto":
        reason = why_unavailable(requested, device_type, dtype, head_dim, dropout, mask)
        if reason:
            raise AttentionBackendError(f"model.attention={requested} cannot run: {reason}")
        return requested
    sparse = mask is not None and not mask.is_dense
    if sparse:
        order = ("flex", "sdpa")  # flex skips masked blocks; sdpa applies the same mask densely
    elif device_type == "cuda":
        order = ("flash_attn", "sdpa")
    else:
        order = ("sdpa",)  # CPU: SDPA's flash kernel beats eager flex (which materialises scores)
    choice = next(b for b in order if why_unavailable(b, device_type, dtype, head_dim, dropout, mask) is None)
    key = (choice, device_type, dtype, mask.spec.kind if mask is not None else "dense")
    if key not in _logged_choices and not torch.compiler.is_compiling():  # logging would break a graph
        _logged_choices.add(key)
        log.info("attention=auto chose %s for %s %s (mask %s)", choice, device_type, dtype, key[3])
    return choice


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """The reference: softmax(q kᵀ · scale) v on (B, H, N, D); boolean mask, True = attend.
    Softmax runs in fp32 so a bf16 run is compared against the best the reference can do."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    attn = scores.float().softmax(dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


_SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    kernel: str = "auto",
) -> torch.Tensor:
    """torch SDPA, optionally forced onto one kernel; a forced kernel that cannot run is a clear error."""
    if dropout_p > 0.0 and q.device.type == "cpu":
        _warn_once(
            "sdpa_cpu_dropout",
            "attention dropout > 0 makes SDPA on CPU use its O(N^2) math kernel (memory grows with N^2); "
            "set model.attn_drop_rate=0 to keep the flash kernel",
        )
    if kernel == "auto":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    if kernel not in _SDPA_BACKENDS:
        raise AttentionBackendError(f"unknown model.sdpa_kernel '{kernel}'; choose one of {', '.join(SDPA_KERNELS)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[kernel])]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    except RuntimeError as e:
        raise AttentionBackendError(
            f"model.sdpa_kernel={kernel} cannot run on {q.device.type} {q.dtype} head dim {q.shape[-1]}"
            f"{' with a mask' if attn_mask is not None else ''}{' with dropout' if dropout_p else ''}: "
            f"{str(e).splitlines()[0]} (use model.sdpa_kernel=auto)"
        ) from None


_compiled_flex: Callable | None = None
FLEX_COMPILE: dict = {"dynamic": None}  # see _flex_fn


def _flex_fn(compiled: bool) -> Callable:
    """torch.compile(flex_attention) makes a fused kernel; eager flex materialises the scores (tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _compiled_flex is None:
        # dynamic=None: the first new shape (e.g. a smaller last eval batch) recompiles once with dynamic
        # sizes, instead of once per new batch size until the recompile limit drops to eager
        _compiled_flex = torch.compile(flex_attention, **FLEX_COMPILE)
    return _compiled_flex


def _call_flex(fn: Callable, q, k, v, block_mask, compiled: bool) -> torch.Tensor:
    if compiled:
        return fn(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return fn(q, k, v, block_mask=block_mask)


class _FlexForwardSdpaBackward(torch.autograd.Function):
    """FlexAttention has no backward on CPU (torch 2.13 raises if q/k/v require grad). Forward runs the
    flex kernel; backward recomputes the same masked attention with SDPA's CPU flash kernel and returns
    its gradients, so flex models (sparse masks included) train on CPU. Backward saves no compute."""

    @staticmethod
    def forward(ctx, q, k, v, mask: TokenMask | None, compiled: bool):
        ctx.save_for_backward(q, k, v)
        ctx.dense_mask = mask.dense(q.device) if mask is not None else None
        block_mask = mask.block_mask(q.device) if mask is not None else None
        return _call_flex(_flex_fn(compiled), q.detach(), k.detach(), v.detach(), block_mask, compiled)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.dense_mask)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
        return dq, dk, dv, None, None


def flex_attention_any_device(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: TokenMask | None, compiled: bool = True
) -> torch.Tensor:
    """FlexAttention on (B, H, N, D) with the mask's BlockMask; trains on CPU via the function above."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and needs_grad:
        return _FlexForwardSdpaBackward.apply(q, k, v, mask, compiled)
    block_mask = mask.block_mask(q.device) if mask is not None else None
    return _call_flex(_flex_fn(compiled), q, k, v, block_mask, compiled)


class Attention(nn.Module):
    """timm-named attention (qkv, proj); the kernel is `runtime.backend`, resolved once by `resolve`."""

    def __init__(self, cfg: ViTConfig, runtime: AttentionRuntime | None = None) -> None:
        super().__init__()
        runtime = runtime or AttentionRuntime()
        if runtime.backend not in BACKENDS:
            raise AttentionBackendError(f"unknown model.attention '{runtime.backend}'; choose one of {', '.join(BACKENDS)}")
        if runtime.sdpa_kernel not in SDPA_KERNELS:
            raise AttentionBackendError(
                f"unknown model.sdpa_kernel '{runtime.sdpa_kernel}'; choose one of {', '.join(SDPA_KERNELS)}"
            )
        dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.backend = runtime.backend
        self.sdpa_kernel = runtime.sdpa_kernel
        self.flex_compile = runtime.flex_compile
        self.attn_drop = cfg.attn_drop_rate
        self.kernel: str | None = None  # `backend` resolved for one device/dtype by `resolve` (None: per call)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(cfg.drop_rate)

    def resolve(self, device_type: str, dtype: torch.dtype, mask: TokenMask | None) -> str:
        """Choose the kernel once for the device and compute dtype the model will run in (as timm's
        `fused_attn`), so forward does no choosing or logging: nothing to break a compiled graph."""
        self.kernel = choose_backend(self.backend, device_type, dtype, self.head_dim, self.attn_drop > 0, mask)
        return self.kernel

    def forward(self, x: torch.Tensor, mask: TokenMask | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        dropout_p = self.attn_drop if self.training else 0.0
        backend = self.kernel or choose_backend(self.backend, x.device.type, qkv.dtype, self.head_dim, dropout_p > 0, mask)
        if backend == "flash_attn":
            out = flash_attn_qkvpacked()(qkv, dropout_p=dropout_p, softmax_scale=self.scale)  # (B, N, H, D)
            return self.proj_drop(self.proj(out.reshape(B, N, C)))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if backend == "flex":
            out = flex_attention_any_device(q, k, v, mask, compiled=self.flex_compile)
        elif backend == "sdpa":
            dense = mask.dense(x.device) if mask is not None else None
            out = sdpa_attention(q, k, v, attn_mask=dense, dropout_p=dropout_p, kernel=self.sdpa_kernel)
        else:
            dense = mask.dense(x.device) if mask is not None else None
            out = math_attention(q, k, v, attn_mask=dense, dropout_p=dropout_p, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
