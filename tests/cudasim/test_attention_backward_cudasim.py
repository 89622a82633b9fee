"""The CUDA backward of ``kernels.attention`` (chapter 19), run in numba's CUDA simulator against SDPA's gradients.

Own process, simulator on: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim``. Tiny shapes (every simulated
thread is a Python thread) that still cover both backward sweeps' edges: partial query and key tiles, causal tile
skipping with T == S, T < S and T > S, D != Dv, a key tile smaller than the query tile, and gradcheck.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effedu import kernels
from effedu.kernels import _base
from effedu.kernels import tiled_attention as ta

pytestmark = pytest.mark.cudasim

TOL = {torch.float32: dict(atol=5e-5, rtol=5e-4), torch.float64: dict(atol=1e-11, rtol=1e-10)}


def _qkv(B, H, T, S, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
                 for n, d in ((T, D), (S, D), (S, Dv)))


def _grads(fn, q, k, v, dout):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _check(q, k, v, *, causal=False, scale=None, block_size=8):
    g = torch.Generator().manual_seed(99)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], generator=g, dtype=torch.float64).to(q.dtype)
    got = _grads(lambda a, b, c: kernels.attention(a, b, c, causal=causal, scale=scale, backend="cuda",
                                                    block_size=block_size), q, k, v, dout)
    ref = _grads(lambda a, b, c: F.scaled_dot_product_attention(a.double(), b.double(), c.double(),
                                                                is_causal=causal, scale=scale), q, k, v, dout.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == q.dtype and torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b.to(q.dtype), **TOL[q.dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_odd_lengths_gradients_match_sdpa(dtype, causal):
    # T=17, S=23 with 8-row tiles: 3 query and 3 key tiles, the last ones partial
    _check(*_qkv(1, 2, 17, 23, 8, 8, dtype), causal=causal)


@pytest.mark.parametrize("T, S", [(23, 9), (9, 23), (16, 16)])
def test_causal_t_ne_s_and_d_ne_dv(T, S):
    # the key sweep starts at the query tile holding its first key; queries past S see every key
    _check(*_qkv(1, 1, T, S, 8, 4, torch.float64, seed=1), causal=True, scale=0.6)


def test_key_tile_smaller_than_query_tile(monkeypatch):
    # wide float64 heads shrink the streamed tile below the block on a GPU; force it at simulator sizes
    monkeypatch.setattr(_base, "CUDA_STATIC_SMEM_BYTES", 2 * 8 * 16 * 8)
    assert ta._cuda_tile_dims(np.float64, 16, 16, 16) == (8, 16)
    q, k, v = _qkv(1, 1, 19, 21, 16, 16, torch.float64, seed=2)
    _check(q, k, v, block_size=16)
    _check(q, k, v, causal=True, block_size=16)


def test_gradcheck_float64():
    q, k, v = _qkv(1, 1, 5, 6, 3, 2, torch.float64, seed=3)
    fn = lambda a, b, c: kernels.attention(a, b, c, causal=True, backend="cuda", block_size=8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_agrees_with_numba_backward():
    q, k, v = _qkv(2, 1, 13, 11, 8, 8, torch.float64, seed=4)
    dout = torch.randn(2, 1, 13, 8, dtype=torch.float64)
    a = _grads(lambda *x: kernels.attention(*x, causal=True, backend="cuda", block_size=8), q, k, v, dout)
    b = _grads(lambda *x: kernels.attention(*x, causal=True, backend="numba", block_size=8), q, k, v, dout)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[torch.float64])


@pytest.mark.parametrize("T, S", [(3, 13), (8, 8)])
def test_bottom_right_forward_and_backward(T, S):
    # keys longer than queries, causal diagonal aligned to the end (j ≤ i + S − T): against SDPA with that mask
    q, k, v = _qkv(1, 1, T, S, 4, 3, torch.float64, seed=T + S)
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(1, 1, T, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    got = _grads(lambda a, b, c: kernels.attention(a, b, c, causal=True, causal_align="bottom_right", backend="cuda",
                                                    block_size=8), q, k, v, dout)
    ref = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"{name}: {m}")
