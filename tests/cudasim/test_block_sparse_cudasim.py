"""The CUDA backend of ``kernels.block_sparse_attention`` (forward and both backward kernels) in numba's simulator.

Own process, simulator on: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim``. Every simulated thread is a
Python thread, so the cases are tiny (blocks of 8 threads, T, S ≤ 40, D ≤ 16) and still cover the kernels' edges:
partial last blocks, T != S, D != Dv, causal with the diagonal block, per-head layouts, rows with no key, the
shared-memory sub-tiles (float64 with a wide head), and gradcheck in float64.
"""
import math

import pytest
import torch

from effedu import kernels
from effedu.attention.dense import softmax_attention
from effedu.kernels import block_sparse as bsk

pytestmark = pytest.mark.cudasim

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.float64: dict(atol=1e-11, rtol=1e-10)}


def _qkv(B, H, T, S, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    v = torch.randn(B, H, S, Dv, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return q, k, v


def _oracle(q, k, v, layout, b, causal):
    """Dense softmax_attention in float64 with the layout expanded to tokens, and the masked log-sum-exp."""
    T, S = q.shape[2], k.shape[2]
    mask = bsk.layout_to_mask(layout if layout.dim() == 3 else layout.unsqueeze(0), b, T, S).unsqueeze(0)
    q64, k64, v64 = (x.double() for x in (q, k, v))
    out = softmax_attention(q64, k64, v64, mask=mask, causal=causal)
    s = (q64 @ k64.transpose(-2, -1)) * q.shape[-1] ** -0.5
    allowed = mask & torch.ones(T, S, dtype=torch.bool).tril() if causal else mask
    return out, torch.logsumexp(s.masked_fill(~allowed, -math.inf), dim=-1)


def _check(q, k, v, layout, b, causal):
    out, lse = kernels.block_sparse_attention(q, k, v, layout, block_size=b, causal=causal, backend="cuda",
                                              return_lse=True)
    ref, ref_lse = _oracle(q, k, v, layout, b, causal)
    assert out.dtype == q.dtype and out.shape == ref.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.to(q.dtype), **TOL[q.dtype])
    torch.testing.assert_close(lse, ref_lse.detach().to(q.dtype), **TOL[q.dtype])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), g.to(q.dtype))
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, r in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r.to(q.dtype), **TOL[q.dtype])


def test_simulator_is_on():
    assert kernels.simulator_enabled() and not kernels.cuda_usable()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_partial_blocks_t_ne_s_match_the_oracle(dtype, causal):
    q, k, v = _qkv(1, 2, 19, 27, 6, 5, dtype)  # 3×4 blocks of 8, the last ones partial
    layout = torch.tensor([[True, False, True, False], [False, True, True, False], [True, False, True, True]])
    _check(q, k, v, layout, 8, causal)


def test_per_head_layout_and_empty_rows():
    q, k, v = _qkv(1, 2, 17, 17, 4, 4, torch.float64, seed=1)
    layout = torch.tensor([[[False, False, False], [True, True, False], [True, False, True]],
                           [[False, True, False], [False, True, True], [True, True, True]]])
    _check(q, k, v, layout, 8, causal=False)
    # causal: head 1's first query block keeps only a future block → those rows are empty: zeros, no NaN
    _check(q, k, v, layout, 8, causal=True)
    out = kernels.block_sparse_attention(q, k, v, layout, block_size=8, causal=True, backend="cuda")
    assert (out[:, :, :8] == 0).all()


def test_float64_wide_head_uses_sub_tiles():
    # float64, D=80 → DMAX=128; blocks of 32: 2 tiles of 32×128 doubles = 64 KiB > 48 KiB, so BT shrinks to 16
    import numpy as np

    bt, dmax = bsk.cuda_tile_dims(np.float64, 32, 80, 80)
    assert (bt, dmax) == (16, 128)
    q, k, v = _qkv(1, 1, 40, 40, 80, 80, torch.float64, seed=2)
    layout = torch.tensor([[True, False], [True, True]])
    _check(q, k, v, layout, 32, causal=True)


def test_gradcheck_float64():
    q, k, v = _qkv(1, 1, 10, 12, 2, 2, torch.float64, seed=3)
    layout = torch.tensor([[True, False], [True, True]])
    fn = lambda q, k, v: kernels.block_sparse_attention(q, k, v, layout, block_size=8, causal=True,  # noqa: E731
                                                        backend="cuda")
    # fast mode (random directions): every simulated launch is slow; the full Jacobian is checked for numba
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, fast_mode=True)


def test_cuda_block_size_must_be_a_thread_count():
    q, k, v = _qkv(1, 1, 10, 10, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="block_size for backend 'cuda' must be one of 8, 16, 32, 64, 128"):
        kernels.block_sparse_attention(q, k, v, torch.ones(2, 2, dtype=torch.bool), block_size=5, backend="cuda")
