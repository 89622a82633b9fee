"""softmax_attention (the materialised reference) against torch's SDPA and nn.MultiheadAttention."""
import pytest
import torch
import torch.nn.functional as F

from effedu.attention import available, get, register
from effedu.attention.dense import softmax_attention
from _oracles import TOL, qkv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,S", [(1, 1), (17, 17), (5, 23), (23, 5), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(dtype, T, S, causal):
    q, k, v = qkv(T=T, S=S, dtype=dtype)
    out = softmax_attention(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_dv_differs_and_custom_scale():
    q, k, v = qkv(T=9, S=11, D=8, Dv=5)
    out = softmax_attention(q, k, v, scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("shape", [(11,), (17, 11), (2, 1, 17, 11), (1, 3, 1, 11)])
def test_boolean_mask_broadcasts_like_sdpa(shape):
    q, k, v = qkv(T=17, S=11)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) > 0.3
    mask[..., 0] = True  # keep every row attendable here (empty rows are tested separately)
    out = softmax_attention(q, k, v, mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(2, 3, 17, 11))  # SDPA wants ≥ 2-D
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_mask_and_causal_combine():
    q, k, v = qkv(T=13, S=13)
    mask = torch.rand(13, 13, generator=torch.Generator().manual_seed(2)) > 0.5
    mask.fill_diagonal_(True)
    out = softmax_attention(q, k, v, mask=mask, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & torch.ones(13, 13, dtype=torch.bool).tril())
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_fully_masked_rows_give_zeros_not_nan_and_finite_grads():
    q, k, v = qkv(T=6, S=7, requires_grad=True)
    mask = torch.ones(6, 7, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing
    out, w = softmax_attention(q, k, v, mask=mask, return_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(w[:, :, 2], torch.zeros_like(w[:, :, 2]))
    # the other rows are ordinary softmax rows
    torch.testing.assert_close(w[:, :, [0, 1, 3, 4, 5]].sum(-1), torch.ones(2, 3, 5))
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_weights_are_a_distribution_and_causal_zero_above_diagonal():
    q, k, v = qkv(T=10)
    out, w = softmax_attention(q, k, v, causal=True, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 10))
    assert (w.triu(1) == 0).all()
    torch.testing.assert_close(out, w @ v)


def test_gradients_match_sdpa_and_gradcheck():
    q, k, v = qkv(T=7, S=9, dtype=torch.float64, requires_grad=True)
    out = softmax_attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    small = qkv(B=1, H=2, T=4, S=5, D=3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda q, k, v: softmax_attention(q, k, v, mask=mask), small)


def test_matches_nn_multihead_attention():
    from effedu.model import MultiHeadAttention

    torch.manual_seed(0)
    d, h = 24, 4
    ours = MultiHeadAttention(d, h, "dense", causal=False)
    ref = torch.nn.MultiheadAttention(d, h, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(3, 11, d)
    out, w = ours(x, return_weights=True)
    ref_out, ref_w = ref(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(w, ref_w, **TOL[torch.float32])
    # causal: nn.MultiheadAttention's attn_mask uses True = *not allowed*
    ours.causal = True
    causal_block = torch.ones(11, 11, dtype=torch.bool).triu(1)
    out = ours(x)
    ref_out, _ = ref(x, x, x, attn_mask=causal_block)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(q=torch.randn(2, 3, 4)), ValueError, "q must have 4 dimensions"),
        (dict(k=torch.randn(2, 3, 5, 7)), ValueError, "head dims differ"),
        (dict(k=torch.randn(3, 3, 5, 8)), ValueError, "batch sizes differ"),
        (dict(v=torch.randn(2, 3, 6, 8)), ValueError, "same length S"),
        (dict(q=torch.ones(2, 3, 4, 8, dtype=torch.int64)), TypeError, "floating dtype"),
        (dict(mask=torch.ones(4, 6, dtype=torch.bool)), ValueError, "does not broadcast"),
        (dict(mask=torch.ones(4, 5)), TypeError, "torch.bool"),
        (dict(scale=-1.0), ValueError, "scale must be a positive"),
        (dict(causal=1), TypeError, "causal must be a bool"),
    ],
)
def test_bad_input_is_named(kwargs, exc, match):
    args = dict(q=torch.randn(2, 3, 4, 8), k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        softmax_attention(q, k, v, **args)


def test_registry_finds_builtins_and_new_variants():
    assert {"dense", "tiled"} <= set(available())
    assert get("dense") is softmax_attention
    with pytest.raises(ValueError, match="unknown attention 'nope'.*dense"):
        get("nope")

    @register("test-double")
    def doubled(q, k, v, *, causal=False, mask=None):
        return 2 * softmax_attention(q, k, v, causal=causal, mask=mask)

    assert get("test-double") is doubled
    with pytest.raises(ValueError, match="already taken"):
        register("dense", lambda q, k, v, **kw: q)
