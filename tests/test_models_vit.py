"""The ViT family: names, sizes, FLOPs, the trainer-facing API, config building, timm compatibility."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mycodist.config import load_config
from mycodist.errors import UsageError
from mycodist.models import (
    MaskSpec,
    build_model,
    create_model,
    model_names,
    param_groups_layer_decay,
    parse_name,
)
from mycodist.models.flops import model_stats, vit_forward_flops

SMALL = dict(embed_dim=48, depth=3, num_heads=3)


def small(attention="math", **kw):
    torch.manual_seed(0)
    args = {**SMALL, **kw}
    return create_model("vit_tiny_patch16", num_classes=5, img_size=32, attention=attention, **args)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_names_and_timm_parameter_counts():
    assert len(model_names()) == 18
    size, patch = parse_name("vit_giant_patch14")
    assert (size.embed_dim, size.depth, size.num_heads, int(size.embed_dim * size.mlp_ratio), patch) == (
        1408, 40, 16, 6144, 14)
    assert parse_name("vit_base_patch16_224")[1] == 16  # timm-style suffix accepted
    with pytest.raises(UsageError, match="unknown model 'vit_medium_patch16'"):
        parse_name("vit_medium_patch16")
    # timm's published parameter counts (ImageNet-1k heads)
    assert model_stats("vit_tiny_patch16")["params"] == 5_717_416
    assert model_stats("vit_base_patch16")["params"] == 86_567_656


@pytest.mark.parametrize("reg_tokens,pre_logits", [(0, 0), (2, 24)])
def test_flops_formula_matches_flop_counter(reg_tokens, pre_logits):
    m = small(reg_tokens=reg_tokens, pre_logits=pre_logits).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(torch.randn(1, 3, 32, 32))
    expected = vit_forward_flops(32, 16, 48, 3, 192, 5, prefix=1 + reg_tokens, pre_logits=pre_logits)
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize("reg_tokens,class_token", [(0, True), (4, True), (2, False)])
def test_backends_agree_in_the_model(reg_tokens, class_token):
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
    results = {}
    for backend in ("math", "sdpa", "flex"):
        m = small(backend, reg_tokens=reg_tokens, class_token=class_token, flex_compile=False)
        xi = x.detach().clone().requires_grad_()
        out = m(xi)
        out.square().sum().backward()
        results[backend] = (out.detach(), xi.grad, m.blocks[0].attn.qkv.weight.grad, m.pos_embed.grad)
    for backend in ("sdpa", "flex"):
        for a, b in zip(results[backend], results["math"], strict=True):
            assert rel_err(a, b) <= 1e-5, backend


def test_api_shapes_and_pre_logits():
    m = small(pre_logits=24).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (2, 1 + 4, 48)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 24)
    assert torch.equal(m.forward_head(feats), m(x))
    assert m(x).shape == (2, 5)
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}
    assert isinstance(m.blocks, torch.nn.ModuleList) and len(m.blocks) == 3
    m.reset_classifier(9)
    assert m(x).shape == (2, 9)


def test_parameter_names_are_timms():
    keys = set(small(reg_tokens=1, init_values=0.1, pre_logits=8).state_dict())
    expected_block = {f"blocks.0.{n}" for n in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias", "ls2.gamma")}
    assert {k for k in keys if k.startswith("blocks.0.")} == expected_block
    assert {k for k in keys if not k.startswith("blocks.")} == {
        "cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
        "norm.bias", "pre_logits.fc.weight", "pre_logits.fc.bias", "head.weight", "head.bias"}


def test_other_resolution_resamples_position_embedding():
    m = small().eval()
    assert m(torch.randn(1, 3, 64, 48)).shape == (1, 5)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(1, 3, 40, 32))


def test_channels_last_and_grad_checkpointing_change_nothing():
    x = torch.randn(2, 3, 32, 32)
    ref = small(drop_path_rate=0.0).train()
    out = ref(x)
    out.sum().backward()
    m = small().train().to(memory_format=torch.channels_last)
    m.set_grad_checkpointing(True)
    out2 = m(x.contiguous(memory_format=torch.channels_last))
    out2.sum().backward()
    assert rel_err(out2, out) <= 1e-5
    for (n, p), (_, p2) in zip(ref.named_parameters(), m.named_parameters(), strict=True):
        assert rel_err(p2.grad, p.grad) <= 1e-4, n


def test_drop_path_is_random_in_training_only():
    m = small(drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


def test_layer_decay_groups():
    m = small(init_values=1e-5)
    groups = param_groups_layer_decay(m, weight_decay=0.05, layer_decay=0.5, lr=1.0)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters())  # every parameter exactly once
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(m.head.weight)]["lr_scale"] == 1.0
    assert by_param[id(m.blocks[2].mlp.fc1.weight)]["lr_scale"] == 0.5
    assert by_param[id(m.pos_embed)]["lr_scale"] == 0.5**4
    assert by_param[id(m.patch_embed.proj.weight)]["weight_decay"] == 0.05
    for p in (m.pos_embed, m.cls_token, m.blocks[0].norm1.weight, m.blocks[0].attn.qkv.bias, m.blocks[1].ls1.gamma):
        assert by_param[id(p)]["weight_decay"] == 0.0
    assert by_param[id(m.blocks[0].attn.qkv.weight)]["lr"] == 0.5**3
    torch.optim.AdamW(groups)  # accepted as is


def test_build_model_from_config():
    cfg = load_config(None, ["model.img_size=32", "model.reg_tokens=2", "model.init_values=0.1",
                             "model.grad_checkpointing=true", "model.attention=sdpa", "model.pre_logits=16"])
    m = build_model(cfg.model, num_classes=7)
    assert m.num_prefix_tokens == 3 and m.grad_checkpointing
    assert m.blocks[0].ls1.gamma[0].item() == pytest.approx(0.1)
    assert m.pre_logits.fc.out_features == 16
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(UsageError, match="flex"):
        build_model(load_config(None, ["model.flex_mask=banded"]).model, 7)
    with pytest.raises(UsageError, match="img_size=40 is not a multiple"):
        build_model(load_config(None, ["model.img_size=40"]).model, 7)
    with pytest.raises(UsageError, match="attn_drop_rate"):
        build_model(load_config(None, ["model.attn_drop_rate=1.5"]).model, 7)


def test_sparse_model_trains_with_flex_and_matches_math():
    """The sparse-attention study's model: flex with a local mask == math with the same mask, and it learns."""
    torch.manual_seed(0)
    kw = dict(img_size=64, reg_tokens=1, mask=MaskSpec("local", window=1))
    flex = create_model("vit_tiny_patch16", num_classes=3, attention="flex", flex_compile=False, **SMALL, **kw)
    math = create_model("vit_tiny_patch16", num_classes=3, attention="math", **SMALL, **kw)
    math.load_state_dict(flex.state_dict())
    x, y = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 2, 0, 1, 2])
    assert rel_err(flex(x), math(x)) <= 1e-5
    opt = torch.optim.SGD(flex.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(flex(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_logits_equal_timm_for_same_weights():
    timm = pytest.importorskip("timm", reason="timm not installed (optional: pip install timm)")
    for kw, tkw in (
        ({}, {}),
        (dict(reg_tokens=4, class_token=False, init_values=1e-3),
         dict(reg_tokens=4, class_token=False, global_pool="avg", no_embed_class=True, init_values=1e-3)),
    ):
        t = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, **SMALL, **tkw)
        ours = small(**kw)
        ours.load_state_dict(t.state_dict())  # strict: same names and shapes
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert rel_err(ours.eval()(x), t.eval()(x)) <= 1e-5
