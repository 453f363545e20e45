"""Parameter counts and forward FLOPs per image, computed from the architecture (docs/models.md's table).

FLOPs count 2 per multiply-add of every matmul/conv (patch embedding, qkv, QKᵀ, attention·V, proj, MLP,
pre-logits, head), the same convention as torch.utils.flop_counter; norms, softmax, GELU and adds are
left out (< 1% for these sizes). A test checks this formula against FlopCounterMode on a real forward.
"""

from __future__ import annotations

import torch

from mycodist.models.factory import create_model


def vit_forward_flops(
    img_size: int, patch: int, dim: int, depth: int, mlp_hidden: int, num_classes: int, prefix: int = 1,
    pre_logits: int = 0, in_chans: int = 3, attended_fraction: float = 1.0,
) -> int:
    """Forward FLOPs for one image; `attended_fraction` < 1 models a sparse attention mask."""
    patches = (img_size // patch) ** 2
    n = patches + prefix
    embed = 2 * patches * in_chans * patch * patch * dim
    attn_core = 2 * 2 * n * n * dim * attended_fraction  # QKᵀ and attention·V over all heads
    block = 2 * n * dim * 3 * dim + attn_core + 2 * n * dim * dim + 2 * 2 * n * dim * mlp_hidden
    head_in = pre_logits or dim
    head = 2 * dim * pre_logits + 2 * head_in * num_classes
    return int(embed + depth * block + head)


def model_stats(name: str, img_size: int = 224, num_classes: int = 1000) -> dict:
    """Parameters and forward GFLOPs per image for a named model, built on the meta device (no memory)."""
    with torch.device("meta"):
        m = create_model(name, num_classes=num_classes, img_size=img_size)
    blk = m.blocks[0]
    flops = vit_forward_flops(
        img_size, m.patch_embed.patch_size[0], m.embed_dim, len(m.blocks), blk.mlp.fc1.out_features, num_classes,
        prefix=m.num_prefix_tokens,
    )
    return {
        "name": name, "img_size": img_size, "tokens": m.num_prefix_tokens + m.patch_embed.num_patches,
        "params": sum(p.numel() for p in m.parameters()), "gflops": flops / 1e9,
    }
