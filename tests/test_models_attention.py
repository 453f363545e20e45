"""Every attention backend computes the same softmax(QKᵀ/√d)V, forward and backward, dense and masked."""

import itertools
import warnings

import pytest
import torch

from mycodist.models import AttentionBackendError, create_model
from mycodist.models.attention import (
    choose_backend,
    flash_attn_qkvpacked,
    flex_attention_any_device,
    math_attention,
    sdpa_attention,
)
from mycodist.models.masks import MaskSpec, TokenMask, block_keep_table


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def upstream(out: torch.Tensor) -> torch.Tensor:
    """A fixed, non-uniform upstream gradient (all-ones would hide errors that cancel across rows)."""
    return torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)


def run(backend: str, q, k, v, mask: TokenMask | None = None):
    """Output and q/k/v gradients for a fixed upstream gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if backend == "math":
        out = math_attention(q, k, v, attn_mask=mask.dense("cpu") if mask else None)
    elif backend == "sdpa":
        out = sdpa_attention(q, k, v, attn_mask=mask.dense("cpu") if mask else None)
    else:
        out = flex_attention_any_device(q, k, v, mask, compiled=False)
    out.backward(upstream(out))
    return out.detach(), q.grad, k.grad, v.grad


def qkv(n: int, d: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, d, generator=gen).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("n,d", [(17, 16), (50, 32), (197, 64)])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backend_matches_math_fp32(backend, n, d):
    q, k, v = qkv(n, d)
    ref = run("math", q.double(), k.double(), v.double())
    got = run(backend, q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert rel_err(a, b) <= 1e-5, f"{backend} {name} n={n} d={d}: {rel_err(a, b)}"


@pytest.mark.parametrize("n,d", [(50, 32), (197, 64)])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "math"])
def test_backend_bf16_close_to_fp32_reference(backend, n, d):
    q, k, v = qkv(n, d, seed=1)
    ref = run("math", q, k, v)
    got = run(backend, q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got[0].dtype == torch.bfloat16
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert rel_err(a, b) <= 2e-2, f"{backend} bf16 {name}: {rel_err(a, b)}"


def brute_force_local(num_prefix: int, grid: tuple[int, int], window: int) -> torch.Tensor:
    """The local mask written out token by token, independently of the mask_mod."""
    n = num_prefix + grid[0] * grid[1]
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, j in itertools.product(range(n), range(n)):
        if i < num_prefix or j < num_prefix:
            m[i, j] = True
            continue
        (ri, ci), (rj, cj) = divmod(i - num_prefix, grid[1]), divmod(j - num_prefix, grid[1])
        m[i, j] = abs(ri - rj) <= window and abs(ci - cj) <= window
    return m


@pytest.mark.parametrize("num_prefix,grid,window", [(1, (6, 6), 1), (5, (5, 7), 2)])
def test_flex_local_equals_math_with_explicit_mask(num_prefix, grid, window):
    mask = TokenMask(MaskSpec("local", window=window, block=16), num_prefix, grid)
    explicit = brute_force_local(num_prefix, grid, window)
    assert torch.equal(mask.dense("cpu"), explicit)
    q, k, v = qkv(mask.seq_len, 16, seed=2)
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    ref = math_attention(q_, k_, v_, attn_mask=explicit)
    ref.backward(upstream(ref))
    got = run("flex", q, k, v, mask)
    assert rel_err(got[0], ref.detach()) <= 1e-5
    for a, b in zip(got[1:], (q_.grad, k_.grad, v_.grad), strict=True):
        assert rel_err(a, b) <= 1e-5
    # and the mask really restricts attention: full attention gives a different answer
    assert rel_err(math_attention(q, k, v), ref.detach()) > 1e-2


def test_block_sparse_mask_density_and_agreement():
    table = block_keep_table(8, 0.25, seed=0)
    assert table.diagonal().all() and table.sum().item() == 16
    assert torch.equal(table, block_keep_table(8, 0.25, seed=0))  # same on every rank
    mask = TokenMask(MaskSpec("block_sparse", density=0.25, block=16), 1, (11, 11))  # 122 tokens, 8 blocks
    dense = mask.dense("cpu")
    assert dense[0].all() and dense[:, 0].all()  # class token global
    assert 0.2 < mask.density() < 0.45
    q, k, v = qkv(mask.seq_len, 16, seed=3)
    for a, b in zip(run("flex", q, k, v, mask), run("math", q, k, v, mask), strict=True):
        assert rel_err(a, b) <= 1e-5


def test_auto_choice_and_explicit_errors(caplog):
    import mycodist.models.attention as att

    att._logged_choices.clear()
    with caplog.at_level("INFO", logger="mycodist.models"):
        for _ in range(3):
            assert choose_backend("auto", "cpu", torch.float32, 64, False, None) == "sdpa"
    assert [r.getMessage() for r in caplog.records if "chose" in r.getMessage()] == [
        "attention=auto chose sdpa for cpu torch.float32 (mask dense)"]
    local = TokenMask(MaskSpec("local"), 1, (4, 4))
    assert choose_backend("auto", "cpu", torch.float32, 64, False, local) == "flex"
    with pytest.raises(AttentionBackendError, match="flash_attn cannot run"):
        choose_backend("flash_attn", "cpu", torch.bfloat16, 64, False, None)
    with pytest.raises(AttentionBackendError, match="no attention dropout"):
        choose_backend("flex", "cpu", torch.float32, 64, True, None)
    with pytest.raises(AttentionBackendError, match="unknown model.attention"):
        create_model("vit_tiny_patch16", num_classes=2, img_size=32, attention="fast", depth=1)


def test_forced_sdpa_kernel():
    q, k, v = qkv(33, 16)
    out = sdpa_attention(q, k, v, kernel="flash")  # CPU flash kernel exists
    assert rel_err(out, math_attention(q, k, v)) <= 1e-5
    with pytest.raises(AttentionBackendError, match="sdpa_kernel=efficient cannot run on cpu"):
        sdpa_attention(q, k, v, kernel="efficient")


def test_sdpa_dropout_on_cpu_warns_once():
    import mycodist.models.attention as att

    att._warned.discard("sdpa_cpu_dropout")  # an earlier test may have warned already
    model = create_model("vit_tiny_patch16", num_classes=2, img_size=32, attention="sdpa", depth=2,
                         embed_dim=32, num_heads=2, attn_drop_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.eval()(x)  # no dropout in eval: no warning
        assert not [w for w in caught if "O(N^2) math kernel" in str(w.message)]
        model.train()(x)
        model(x)
    assert len([w for w in caught if "O(N^2) math kernel" in str(w.message)]) == 1


@pytest.mark.skipif(
    flash_attn_qkvpacked() is None or not torch.cuda.is_available(),
    reason="flash-attn not importable or no CUDA device (it is a CUDA-only package)",
)
def test_flash_attn_matches_math():
    q, k, v = (t.cuda().bfloat16() for t in qkv(197, 64))
    qkv_packed = torch.stack([q, k, v], dim=2).transpose(1, 3).contiguous()  # (B, N, 3, H, D)
    out = flash_attn_qkvpacked()(qkv_packed).transpose(1, 2)
    assert rel_err(out, math_attention(q.float(), k.float(), v.float())) <= 2e-2
