"""The kernel spine: causal_align='bottom_right' (keys longer than queries), the shared base, the masking module."""
import pytest
import torch
import torch.nn.functional as F

from effedu import kernels
from effedu.kernels import _base, masking

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _qkv(T, S, D=8, dtype=torch.float64, seed=0, B=1, H=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g, dtype=dtype) for n in (T, S, S))


def _oracle(q, k, v):
    # SDPA with an explicit boolean mask: query i sees key j ≤ i + S − T
    T, S = q.shape[2], k.shape[2]
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T, S, block", [(1, 17, 4), (5, 5, 2), (7, 19, 4), (17, 40, 8), (3, 300, 256)])
def test_bottom_right_matches_sdpa(backend, dtype, T, S, block):
    q, k, v = _qkv(T, S, dtype=dtype, seed=T * S)
    out = kernels.attention(q, k, v, causal=True, causal_align="bottom_right", backend=backend, block_size=block)
    torch.testing.assert_close(out, _oracle(q, k, v), **TOL[dtype])


def test_bottom_right_matches_causal_lower_right():
    bias = pytest.importorskip("torch.nn.attention.bias")
    q, k, v = _qkv(6, 11, dtype=torch.float32)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.causal_lower_right(6, 11))
    torch.testing.assert_close(kernels.attention(q, k, v, causal=True, causal_align="bottom_right", backend="numba"),
                               ref, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_top_left_default_unchanged_and_square_alignments_agree(backend):
    q, k, v = _qkv(9, 9)
    a = kernels.attention(q, k, v, causal=True, backend=backend, block_size=4)
    b = kernels.attention(q, k, v, causal=True, causal_align="bottom_right", backend=backend, block_size=4)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    q, k, v = _qkv(5, 12)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # top-left
    torch.testing.assert_close(kernels.attention(q, k, v, causal=True, backend=backend), ref, **TOL[torch.float64])


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("T, S, block", [(3, 7, 2), (4, 4, 3), (1, 5, 4)])
def test_bottom_right_gradcheck(backend, T, S, block):
    q, k, v = (x.requires_grad_() for x in _qkv(T, S, D=3, H=1, seed=1))
    fn = lambda a, b, c: kernels.attention(a, b, c, causal=True, causal_align="bottom_right",  # noqa: E731
                                           backend=backend, block_size=block)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_bottom_right_gradients_match_sdpa(backend):
    q, k, v = (x.requires_grad_() for x in _qkv(7, 19, seed=2))
    g = torch.randn(1, 2, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(kernels.attention(q, k, v, causal=True, causal_align="bottom_right", backend=backend,
                                                block_size=4), (q, k, v), g)
    want = torch.autograd.grad(_oracle(q, k, v), (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_causal_align_validated():
    q, k, v = _qkv(4, 6)
    with pytest.raises(ValueError, match="causal_align"):
        kernels.attention(q, k, v, causal=True, causal_align="lower_right")
    q, k, v = _qkv(6, 4)
    with pytest.raises(ValueError, match="causal_align='bottom_right'.*S ≥ T"):
        kernels.attention(q, k, v, causal=True, causal_align="bottom_right")


def test_allowed_mask_bottom_right():
    m = masking.allowed_mask(None, True, 3, 5, "cpu", causal_align="bottom_right")
    assert torch.equal(m[0, 0], torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2))
    assert torch.equal(masking.allowed_mask(None, True, 3, 5, "cpu")[0, 0], torch.ones(3, 5, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="causal_align"):
        masking.allowed_mask(None, True, 3, 5, "cpu", causal_align="x")


def test_resolve_backend_takes_the_ops_dtypes():
    cpu = torch.device("cpu")
    assert _base.resolve_backend("auto", cpu, torch.int8, "t", dtypes=(torch.int8,)) == "numba"
    assert _base.resolve_backend("auto", cpu, torch.float32, "t", dtypes=(torch.int8,)) == "torch"
    with pytest.raises(TypeError, match="supports int8"):
        _base.resolve_backend("numba", cpu, torch.float32, "t", dtypes=(torch.int8,))


def test_single_threaded_blas_restores():
    from threadpoolctl import threadpool_info

    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    with _base.single_threaded_blas():
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before


def test_old_names_still_importable():
    from effedu.kernels import block_sparse as bsk, linear_attention as la, tiled_attention as ta

    assert ta._cuda_tile_dims is ta.cuda_tile_dims and la._check_eps is la.check_eps
    assert bsk.online_softmax_tile is ta.online_softmax_tile
    assert kernels.masked_softmax is masking.masked_softmax
    for name in ("attention", "backends", "block_sparse_attention", "causal_linear_attention", "cuda_usable",
                 "resolve_backend", "simulator_enabled", "BACKENDS"):
        assert callable(getattr(kernels, name)) or name == "BACKENDS"
