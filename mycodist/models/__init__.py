"""Vision Transformers (timm-named) with pluggable attention kernels and local weight loading.

    model = create_model("vit_tiny_patch16", num_classes=24, img_size=224, attention="auto")
    model = build_model(cfg.model, num_classes)
    load_pretrained(model, "weights.safetensors", num_classes=24)
"""

from mycodist.models.attention import BACKENDS, SDPA_KERNELS, AttentionBackendError
from mycodist.models.factory import (
    SIZES,
    attention_runtime,
    build_model,
    create_model,
    model_config,
    model_names,
    parse_name,
    vit_config,
)
from mycodist.models.jax_npz import read_jax_npz, save_jax_npz
from mycodist.models.layer_decay import param_groups_layer_decay
from mycodist.models.masks import MASK_KINDS, MaskSpec
from mycodist.models.vit import VisionTransformer
from mycodist.models.vit_config import AttentionRuntime, ViTConfig
from mycodist.models.weights import LoadReport, load_pretrained, read_state_dict

__all__ = [
    "BACKENDS",
    "AttentionRuntime",
    "ViTConfig",
    "attention_runtime",
    "model_config",
    "vit_config",
    "MASK_KINDS",
    "SDPA_KERNELS",
    "SIZES",
    "AttentionBackendError",
    "LoadReport",
    "MaskSpec",
    "VisionTransformer",
    "build_model",
    "create_model",
    "load_pretrained",
    "model_names",
    "param_groups_layer_decay",
    "parse_name",
    "read_jax_npz",
    "read_state_dict",
    "save_jax_npz",
]
