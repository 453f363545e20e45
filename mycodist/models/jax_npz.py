"""The original JAX ViT checkpoint format (.npz of '/'-joined Flax names) ↔ timm-named state dicts.

Flax stores Dense kernels as (in, out) and attention projections per head: query/key/value kernels are
(D, heads, head_dim) and the output kernel is (heads, head_dim, D); torch Linear weights are (out, in).
The converter is exact both ways, so a model exported here and read back gives the same logits.
Both the original naming (LayerNorm_0/2, MultiHeadDotProductAttention_1, MlpBlock_3) and big_vision's
(LayerNorm_0/1, MultiHeadDotProductAttention_0, MlpBlock_0) are read: submodules are matched by type
and ordered by their index.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from torch import nn

from mycodist.atomic import atomic_open

_PREFIXES = ("opt/target/", "params/")
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def _sub(names: set[str], kind: str) -> list[str]:
    """Submodule names of one type in a block, in index order (e.g. LayerNorm_0, LayerNorm_2)."""
    found = {n for n in names if n.startswith(kind + "_")}
    return sorted(found, key=lambda n: int(n.rsplit("_", 1)[1]))


def jax_to_timm(arrays: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Flax names → timm names. Returns (state dict, JAX keys that have no place in a ViT)."""
    a = {_strip(k): v for k, v in arrays.items()}
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> np.ndarray:
        return a.pop(key)

    if "embedding/kernel" in a:
        out["patch_embed.proj.weight"] = _t(take("embedding/kernel").transpose(3, 2, 0, 1))  # HWIO → OIHW
        out["patch_embed.proj.bias"] = _t(take("embedding/bias"))
    if "cls" in a:
        out["cls_token"] = _t(take("cls"))
    if "reg" in a:
        out["reg_token"] = _t(take("reg"))
    for pos in ("Transformer/posembed_input/pos_embedding", "pos_embedding"):
        if pos in a:
            out["pos_embed"] = _t(take(pos))
    for src, dst in (
        ("Transformer/encoder_norm", "norm"),
        ("fc_norm", "fc_norm"),
        ("pre_logits", "pre_logits.fc"),
        ("head", "head"),
    ):
        if f"{src}/scale" in a:
            out[f"{dst}.weight"] = _t(take(f"{src}/scale"))
        if f"{src}/kernel" in a:
            out[f"{dst}.weight"] = _t(take(f"{src}/kernel").T)
        if f"{src}/bias" in a:
            out[f"{dst}.bias"] = _t(take(f"{src}/bias"))

    blocks = sorted({int(m[1]) for k in a if (m := _BLOCK.match(k))})
    for i in blocks:
        p = f"Transformer/encoderblock_{i}/"
        subs = {k[len(p) :].split("/", 1)[0] for k in a if k.startswith(p)}
        d = f"blocks.{i}."
        for ln, dst in zip(_sub(subs, "LayerNorm"), ("norm1", "norm2"), strict=False):
            out[d + dst + ".weight"] = _t(take(f"{p}{ln}/scale"))
            out[d + dst + ".bias"] = _t(take(f"{p}{ln}/bias"))
        for mha in _sub(subs, "MultiHeadDotProductAttention"):
            m = p + mha + "/"
            qkv_w = [take(f"{m}{n}/kernel") for n in ("query", "key", "value")]  # (D, H, hd)
            qkv_b = [take(f"{m}{n}/bias") for n in ("query", "key", "value")]  # (H, hd)
            dim = qkv_w[0].shape[0]
            out[d + "attn.qkv.weight"] = _t(np.concatenate([w.reshape(dim, -1).T for w in qkv_w], axis=0))
            out[d + "attn.qkv.bias"] = _t(np.concatenate([b.reshape(-1) for b in qkv_b]))
            out[d + "attn.proj.weight"] = _t(take(f"{m}out/kernel").reshape(-1, dim).T)  # (H, hd, D) → (D, D)
            out[d + "attn.proj.bias"] = _t(take(f"{m}out/bias"))
        for mlp in _sub(subs, "MlpBlock"):
            for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
                out[f"{d}mlp.{fc}.weight"] = _t(take(f"{p}{mlp}/{dense}/kernel").T)
                out[f"{d}mlp.{fc}.bias"] = _t(take(f"{p}{mlp}/{dense}/bias"))
    return out, sorted(a)


def timm_to_jax(state: dict[str, torch.Tensor], num_heads: int) -> dict[str, np.ndarray]:
    """timm names → the original Flax names (the inverse of jax_to_timm for a ViT)."""
    s = {k: v.detach().cpu().float().numpy() for k, v in state.items()}
    out: dict[str, np.ndarray] = {
        "embedding/kernel": s.pop("patch_embed.proj.weight").transpose(2, 3, 1, 0),
        "embedding/bias": s.pop("patch_embed.proj.bias"),
        "Transformer/posembed_input/pos_embedding": s.pop("pos_embed"),
    }
    if "cls_token" in s:
        out["cls"] = s.pop("cls_token")
    if "reg_token" in s:
        out["reg"] = s.pop("reg_token")
    for src, dst in (("norm", "Transformer/encoder_norm"), ("fc_norm", "fc_norm")):
        if f"{src}.weight" in s:
            out[f"{dst}/scale"] = s.pop(f"{src}.weight")
            out[f"{dst}/bias"] = s.pop(f"{src}.bias")
    for src, dst in (("pre_logits.fc", "pre_logits"), ("head", "head")):
        if f"{src}.weight" in s:
            out[f"{dst}/kernel"] = s.pop(f"{src}.weight").T
            out[f"{dst}/bias"] = s.pop(f"{src}.bias")
    depth = 1 + max((int(k.split(".")[1]) for k in s if k.startswith("blocks.")), default=-1)
    for i in range(depth):
        d, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for src, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{p}{ln}/scale"] = s.pop(f"{d}{src}.weight")
            out[f"{p}{ln}/bias"] = s.pop(f"{d}{src}.bias")
        w, b = s.pop(d + "attn.qkv.weight"), s.pop(d + "attn.qkv.bias")
        dim = w.shape[1]
        m = p + "MultiHeadDotProductAttention_1/"
        for j, n in enumerate(("query", "key", "value")):
            out[f"{m}{n}/kernel"] = w[j * dim : (j + 1) * dim].T.reshape(dim, num_heads, dim // num_heads)
            out[f"{m}{n}/bias"] = b[j * dim : (j + 1) * dim].reshape(num_heads, dim // num_heads)
        out[f"{m}out/kernel"] = s.pop(d + "attn.proj.weight").T.reshape(num_heads, dim // num_heads, dim)
        out[f"{m}out/bias"] = s.pop(d + "attn.proj.bias")
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[f"{p}MlpBlock_3/{dense}/kernel"] = s.pop(f"{d}mlp.{fc}.weight").T
            out[f"{p}MlpBlock_3/{dense}/bias"] = s.pop(f"{d}mlp.{fc}.bias")
    if s:
        raise ValueError(f"no JAX name for: {', '.join(sorted(s)[:10])}")
    return out


def save_jax_npz(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a model in the original JAX .npz layout (atomically), e.g. to hand weights to JAX code."""
    num_heads = model.blocks[0].attn.num_heads
    arrays = timm_to_jax(model.state_dict(), num_heads)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def read_jax_npz(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load a .npz without pickle (allow_pickle=False) and convert it to timm names."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return jax_to_timm(arrays)
