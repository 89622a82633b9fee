"""effedu.kernels.attention: torch and numba backends against SDPA; dispatch; bad input; the row operations."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effedu import kernels
from effedu.kernels.online_softmax import exp_rows_checked, row_max_sum_checked
from _oracles import TOL, qkv

CPU_BACKENDS = ["torch", "numba"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,S,block", [(1, 1, None), (17, 17, 8), (17, 40, 16), (40, 17, 16), (300, 300, None),
                                       (5, 700, 64), (700, 5, 64), (65, 63, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(backend, dtype, T, S, block, causal):
    q, k, v = qkv(B=2, H=2, T=T, S=S, D=16, dtype=dtype)
    out, lse = kernels.attention(q, k, v, causal=causal, backend=backend, block_size=block, return_lse=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    # lse_i = log Σ_j exp(s_ij) over the allowed keys
    scores = (q @ k.transpose(-2, -1)) / 16 ** 0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), **TOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_scores_stay_finite(backend):
    # scores of several hundred: a naive exp would overflow; the online softmax must not
    q, k, v = qkv(B=1, H=2, T=33, D=16, scale=8.0)
    out = kernels.attention(q, k, v, backend=backend, block_size=8)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_dv_and_scale(backend):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 19, 3, 8, generator=g)
    q = base.transpose(1, 2)  # (B, H, T, D) view, not contiguous
    k = torch.randn(2, 3, 8, 23, generator=g).transpose(-2, -1)
    v = torch.randn(2, 3, 23, 5, generator=g)[..., :5]
    assert not q.is_contiguous() and not k.is_contiguous()
    out = kernels.attention(q, k, v, scale=0.7, backend=backend, block_size=8)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.7)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_backends_agree_with_each_other_bitwise_close():
    q, k, v = qkv(B=1, H=4, T=129, D=32, dtype=torch.float64)
    a = kernels.attention(q, k, v, backend="torch", causal=True)
    b = kernels.attention(q, k, v, backend="numba", causal=True)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_torch_backend_is_differentiable_and_half_precision():
    q, k, v = qkv(T=9, S=12, dtype=torch.float64, requires_grad=True)
    out = kernels.attention(q, k, v, backend="torch", causal=True, block_size=4)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    qb, kb, vb = qkv(T=20, dtype=torch.bfloat16)
    out = kernels.attention(qb, kb, vb, backend="torch")
    assert out.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(qb.float(), kb.float(), vb.float())
    torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])


def test_auto_picks_numba_on_cpu_and_never_the_simulator():
    assert kernels.resolve_backend("auto", torch.device("cpu"), torch.float32, "t") == "numba"
    assert kernels.resolve_backend("auto", torch.device("cpu"), torch.bfloat16, "t") == "torch"
    status = kernels.backends()
    assert set(status) == {"torch", "numba", "cuda"} and status["torch"] == "ok" and status["numba"] == "ok"


def test_numba_is_differentiable_since_chapter_19():
    q, k, v = qkv(T=5, requires_grad=True)
    out = kernels.attention(q, k, v, backend="numba")
    assert out.requires_grad and out.grad_fn is not None
    out.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(backend="fast"), ValueError, "unknown backend 'fast'"),
        (dict(backend=3), TypeError, "backend must be a str"),
        (dict(block_size=0), ValueError, "block_size must be a positive int"),
        (dict(block_size=-4), ValueError, "block_size must be a positive int"),
        (dict(block_size=2.5), TypeError, "block_size must be an int"),
        (dict(causal="yes"), TypeError, "causal must be a bool"),
        (dict(scale=float("nan")), ValueError, "scale must be a positive finite"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    q, k, v = qkv(T=5)
    with pytest.raises(exc, match=match):
        kernels.attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "shapes,exc,match",
    [
        (((2, 3, 5), (2, 3, 5, 8), (2, 3, 5, 8)), ValueError, "q must have 4 dimensions"),
        (((2, 3, 5, 8), (2, 3, 5, 4), (2, 3, 5, 8)), ValueError, "head dims differ"),
        (((2, 3, 5, 8), (1, 3, 5, 8), (1, 3, 5, 8)), ValueError, "batch sizes differ"),
        (((2, 3, 5, 8), (2, 2, 5, 8), (2, 2, 5, 8)), ValueError, "head counts differ"),
    ],
)
def test_bad_shapes(shapes, exc, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(exc, match=match):
        kernels.attention(q, k, v, backend="numba")


def test_numba_rejects_half_and_integer_dtypes():
    q, k, v = qkv(T=5, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32 and float64.*backend='torch'"):
        kernels.attention(q, k, v, backend="numba")
    with pytest.raises(TypeError, match="floating dtype"):
        kernels.attention(*(torch.ones(1, 1, 2, 2, dtype=torch.int32) for _ in range(3)))


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-7), (np.float64, 5e-16)])
def test_vectorised_exp_is_accurate_and_masks_columns(dtype, rtol):
    rng = np.random.default_rng(0)
    x = rng.uniform(-80, 5, size=(37, 70)).astype(dtype)
    shift = x.max(1).astype(dtype)
    ncols = rng.integers(0, 71, size=37)
    ncols[0] = 0  # a row with nothing allowed
    s = x.copy()
    exp_rows_checked(s, shift, ncols.astype(np.int64))
    ref = np.exp((x - shift[:, None]).astype(np.float64))  # the argument rounded as the kernel rounds it
    cols = np.arange(70)[None, :] < ncols[:, None]
    assert np.all(s[~cols] == 0)
    big = cols & (ref > 1e-30)
    assert np.max(np.abs(s[big] / ref[big] - 1)) < rtol
    assert np.all(np.isfinite(s))


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100])
def test_row_max_and_sum(n):
    s = np.random.default_rng(n).normal(size=(5, 100)).astype(np.float32)
    mx, sm = row_max_sum_checked(s, n)
    assert np.array_equal(mx, s[:, :n].max(1))
    np.testing.assert_allclose(sm, s[:, :n].astype(np.float64).sum(1), rtol=1e-5, atol=1e-5)
