"""Loading weights in every supported format from checkpoints the tests write themselves."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mycodist.config import load_config
from mycodist.errors import UsageError
from mycodist.models import build_model, create_model, load_pretrained, save_jax_npz
from mycodist.models.vit import resample_pos_embed

SMALL = dict(embed_dim=32, depth=2, num_heads=2)


def make(seed=0, num_classes=5, img_size=32, **kw):
    torch.manual_seed(seed)
    m = create_model("vit_tiny_patch16", num_classes=num_classes, img_size=img_size, attention="math", **SMALL, **kw)
    with torch.no_grad():  # non-trivial values everywhere, so a wrongly mapped tensor shows in the logits
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))


def same_logits(a, b):
    with torch.no_grad():
        return torch.allclose(a.eval()(X), b.eval()(X), rtol=1e-5, atol=1e-5)


def test_safetensors_round_trip(tmp_path):
    src = make(0, reg_tokens=2, init_values=0.5)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    dst = make(1, reg_tokens=2, init_values=0.5)
    assert not same_logits(src, dst)
    report = load_pretrained(dst, tmp_path / "w.safetensors")
    assert same_logits(src, dst) and not report.head_reset


def test_pth_in_training_container_with_ddp_prefix(tmp_path):
    src = make(0)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model": state, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth")
    dst = make(1)
    load_pretrained(dst, tmp_path / "ckpt.pth")
    assert same_logits(src, dst)


class NotATensor:
    pass


def test_pth_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"model": make().state_dict(), "extra": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(UsageError, match="refusing to unpickle"):
        load_pretrained(make(), tmp_path / "evil.pth")


def test_jax_npz_round_trip(tmp_path):
    src = make(0, pre_logits=16)
    save_jax_npz(src, tmp_path / "vit.npz")
    with np.load(tmp_path / "vit.npz") as z:
        assert z["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape == (32, 2, 16)
        assert z["embedding/kernel"].shape == (16, 16, 3, 32)
    dst = make(1, pre_logits=16)
    load_pretrained(dst, tmp_path / "vit.npz")
    assert same_logits(src, dst)


def test_big_vision_npz_naming(tmp_path):
    """big_vision numbers submodules differently and nests under params/; same weights, same logits."""
    src = make(0)
    save_jax_npz(src, tmp_path / "orig.npz")
    renames = {"LayerNorm_2": "LayerNorm_1", "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
               "MlpBlock_3": "MlpBlock_0", "Transformer/posembed_input/pos_embedding": "pos_embedding"}
    with np.load(tmp_path / "orig.npz") as z:
        arrays = {}
        for k in z.files:
            new = k
            for a, b in renames.items():
                new = new.replace(a, b)
            arrays["params/" + new] = z[k]
    np.savez(tmp_path / "bv.npz", **arrays)
    dst = make(1)
    load_pretrained(dst, tmp_path / "bv.npz")
    assert same_logits(src, dst)


def test_original_project_checkpoint_with_pre_logits(tmp_path):
    """The original vit_model.py names: pre_logits.fc + head. Loading into a model without pre-logits and
    another class count drops both (its fine-tuning rule) and keeps the backbone."""
    src = make(0, pre_logits=16)
    assert "pre_logits.fc.weight" in src.state_dict()
    torch.save(src.state_dict(), tmp_path / "vit_base.pth")
    dst = make(1, num_classes=5)
    report = load_pretrained(dst, tmp_path / "vit_base.pth", num_classes=3)
    assert report.head_reset and "pre_logits.fc.weight" in report.dropped
    assert dst.head.out_features == 3
    with torch.no_grad():
        assert torch.allclose(dst.forward_features(X), src.forward_features(X), atol=1e-6)


def test_head_reset_when_classes_differ(tmp_path):
    src = make(0, num_classes=10)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    dst = make(1, num_classes=4)
    report = load_pretrained(dst, tmp_path / "w.safetensors")
    assert report.head_reset and dst.head.weight.shape == (4, 32)
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert not torch.equal(dst.head.weight, src.head.weight[:4])


def test_pos_embed_resized_to_new_resolution(tmp_path):
    src = make(0, img_size=32)  # 2x2 grid
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    dst = make(1, img_size=64)  # 4x4 grid
    report = load_pretrained(dst, tmp_path / "w.safetensors")
    assert report.pos_embed_resized == ((2, 2), (4, 4))
    assert torch.equal(dst.pos_embed[:, :1], src.pos_embed[:, :1])  # class position kept
    assert torch.allclose(dst.pos_embed, resample_pos_embed(src.pos_embed, (4, 4), (2, 2), 1))
    # a constant embedding stays constant, and resizing to the same grid is the identity
    const = torch.ones(1, 1 + 4, 8)
    assert torch.allclose(resample_pos_embed(const, (4, 4), (2, 2), 1), torch.ones(1, 17, 8), atol=1e-6)
    assert torch.equal(resample_pos_embed(src.pos_embed, (2, 2), (2, 2), 1), src.pos_embed)


def test_pos_embed_resize_matches_timm():
    layers = pytest.importorskip("timm.layers", reason="timm not installed (optional)")
    pos = torch.randn(1, 1 + 49, 16)
    ours = resample_pos_embed(pos, (10, 12), (7, 7), 1)
    theirs = layers.resample_abs_pos_embed(pos, (10, 12), (7, 7), num_prefix_tokens=1)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_mismatch_lists_keys(tmp_path):
    save_file(make(0).state_dict(), tmp_path / "w.safetensors")
    deeper = create_model("vit_tiny_patch16", num_classes=5, img_size=32, embed_dim=32, depth=3, num_heads=2)
    with pytest.raises(UsageError, match=r"missing keys: blocks\.2\.attn\.proj\.bias"):
        load_pretrained(deeper, tmp_path / "w.safetensors")
    wider = create_model("vit_tiny_patch16", num_classes=5, img_size=32, embed_dim=48, depth=2, num_heads=2)
    with pytest.raises(UsageError, match="shape mismatches: blocks.0.attn.proj.bias"):
        load_pretrained(wider, tmp_path / "w.safetensors")
    with pytest.raises(UsageError, match="do not exist"):
        load_pretrained(make(), tmp_path / "nope.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(UsageError, match="unknown weight format"):
        load_pretrained(make(), tmp_path / "w.onnx")


def test_build_model_loads_pretrained(tmp_path):
    src = make(0, num_classes=9)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    cfg = load_config(None, ["model.img_size=32", f"model.pretrained={tmp_path / 'w.safetensors'}"])
    with pytest.raises(UsageError, match="does not fit"):  # tiny-size checkpoint, default vit_tiny widths
        build_model(cfg.model, 4)
    torch.manual_seed(0)
    full = create_model("vit_tiny_patch16", num_classes=9, img_size=32)
    save_file(full.state_dict(), tmp_path / "full.safetensors")
    cfg = load_config(None, ["model.img_size=32", f"model.pretrained={tmp_path / 'full.safetensors'}"])
    m = build_model(cfg.model, 4)
    assert m.head.out_features == 4 and torch.equal(m.pos_embed, full.pos_embed)
