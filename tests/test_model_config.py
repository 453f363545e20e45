"""The model hand-off: one ViTConfig passed whole and saved with checkpoints; the attention kernel apart from
it; renamed config keys still read (with a warning) for one release."""

from __future__ import annotations

import pytest
import torch

from mycodist.config import load_config
from mycodist.errors import UsageError
from mycodist.models import AttentionRuntime, VisionTransformer, ViTConfig, build_model, model_config, vit_config
from mycodist.train.checkpoint import model_config_diff


def test_vit_config_round_trips_and_rebuilds_the_same_model():
    cfg = load_config(None, ["model.img_size=32", "model.reg_tokens=2", "model.init_values=0.1",
                             "model.flex_mask=local", "model.flex_window=1"])
    vc = model_config(cfg.model, 5)
    assert vc == ViTConfig.from_dict(vc.to_dict())
    assert vc.to_dict()["version"] == 1 and vc.mask.kind == "local" and vc.img_size == (32, 32)
    torch.manual_seed(0)
    a = build_model(cfg.model, 5)
    torch.manual_seed(0)
    b = VisionTransformer(ViTConfig.from_dict(vc.to_dict()), AttentionRuntime(backend="math"))
    assert a.cfg == b.cfg
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


def test_blocks_and_attention_take_the_config_whole():
    vc = vit_config("vit_tiny_patch16", num_classes=3, img_size=32, depth=2, attn_drop_rate=0.1, drop_rate=0.2)
    m = VisionTransformer(vc)
    assert m.blocks[0].attn.attn_drop == 0.1 and m.blocks[1].mlp.drop1.p == 0.2
    assert m.blocks[0].attn.head_dim == vc.head_dim == 64


def test_bad_model_configs_are_clear_errors():
    with pytest.raises(UsageError, match="img_size=40 is not a multiple of the patch size 16"):
        vit_config("vit_tiny_patch16", img_size=40)
    with pytest.raises(ValueError, match="newer than this mycodist reads"):
        ViTConfig.from_dict({"version": 99})
    with pytest.raises(ValueError, match="unknown model config keys"):
        ViTConfig.from_dict({"version": 1, "attention": "sdpa"})


def test_renamed_keys_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="'model.attn_drop' is now 'model.attn_drop_rate'"):
        cfg = load_config(None, ["model.attn_drop=0.1"])
    assert cfg.model.attn_drop_rate == 0.1 and "attn_drop" not in cfg.model
    with pytest.warns(FutureWarning, match="'model.layer_scale_init' is now 'model.init_values'"):
        assert load_config(None, ["model.layer_scale_init=0.01"]).model.init_values == 0.01


def test_resume_compares_architecture_not_the_attention_kernel():
    old = {"name": "vit_tiny_patch16", "attn_drop": 0.0, "layer_scale_init": 0.0, "attention": "flash_attn"}
    now = {"name": "vit_tiny_patch16", "attn_drop_rate": 0.0, "init_values": 0.0, "attention": "sdpa"}
    assert model_config_diff(old, now) == []
    assert model_config_diff(old, {**now, "init_values": 0.1}) == ["model.init_values: 0.0 → 0.1"]


def test_shard_writer_keys_moved_to_their_own_group():
    with pytest.warns(FutureWarning, match="'data.shard_max_samples' is now 'shards.max_samples'"):
        cfg = load_config(None, ["data.shard_max_samples=7", "shards.ingest_workers=1"])
    assert cfg.shards.max_samples == 7 and "shard_max_samples" not in cfg.data


def test_a_folder_saved_before_the_rename_reads_the_same_settings():
    from omegaconf import OmegaConf

    from mycodist.config import select
    from mycodist.synth.cli import output_settings

    old = OmegaConf.create({"synth": {"species": 4, "format": "shards"},
                            "data": {"val_fraction": 0.2, "shard_max_samples": 9, "shard_max_bytes": 100}})
    new = OmegaConf.create({"synth": {"species": 4, "format": "shards"},
                            "shards": {"val_fraction": 0.2, "max_samples": 9, "max_bytes": 100}})
    assert output_settings(old) == output_settings(new) and select(old, "shards.max_samples") == 9
