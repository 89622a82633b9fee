"""The CUDA backend of ``kernels.lsh_chunked_attention`` (forward, the dQ and the dK/dV passes) in numba's simulator.

Own process, simulator on: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim``. Tiny cases (chunks of 8
threads, T ≤ 24): several chunks (the look-back window), causal, the bias (padding −inf, a row with no key), and
the lse's gradient; compared with the torch reference in float64.
"""
import math

import pytest
import torch

from effedu.attention.lsh import lsh_attention
from effedu.kernels.lsh_attention import lsh_chunked_attention

pytestmark = pytest.mark.cudasim


def _inputs(N=2, T=24, D=4, Dv=3, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(N, T, D, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    v = torch.randn(N, T, Dv, generator=g, dtype=torch.float64).requires_grad_(True)
    pos = torch.stack([torch.randperm(T, generator=g) for _ in range(N)])
    bucket = torch.randint(0, 2, (N, T), generator=g).sort(dim=-1).values
    bias = torch.randn(N, T, 2 * c, generator=g, dtype=torch.float64)
    bias[0, 3, :] = -math.inf  # a row with no key
    bias[1, :, 9] = -math.inf
    return q, k, v, pos, bucket, bias


@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_and_backward_match_torch(causal):
    q, k, v, pos, bucket, bias = _inputs()
    w = torch.linspace(-1, 1, 2 * 24 * 3, dtype=torch.float64).view(2, 24, 3)
    res = []
    for backend in ("torch", "cuda"):
        out, lse = lsh_chunked_attention(q, k, v, pos, bucket, chunk_size=8, causal=causal, scale=0.8,
                                         backend=backend, bias=bias)
        fin = torch.isfinite(lse)
        loss = (out * w).sum() + torch.where(fin, lse, torch.zeros_like(lse)).sum() * 0.3
        res.append((out, torch.where(fin, lse, torch.zeros_like(lse)), *torch.autograd.grad(loss, (q, k, v))))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    assert (res[1][0][0, 3] == 0).all()  # the empty row gives 0


def test_cuda_layer_matches_torch_float32():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 16, 4, generator=g)
    v = torch.randn(1, 1, 16, 4, generator=g)
    a = lsh_attention(q, None, v, n_buckets=2, n_rounds=2, chunk_size=8, backend="cuda", causal=True)
    b = lsh_attention(q, None, v, n_buckets=2, n_rounds=2, chunk_size=8, backend="torch", causal=True)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


def test_cuda_refuses_a_chunk_size_that_is_not_a_block_size():
    q, k, v, pos, bucket, _ = _inputs(T=24, c=8)
    with pytest.raises(ValueError, match="chunk_size for backend 'cuda' must be one of"):
        lsh_chunked_attention(q, k, v, pos, bucket, chunk_size=12, causal=False, scale=1.0, backend="cuda")
