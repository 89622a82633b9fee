"""The CUDA backend of ``kernels.causal_linear_attention`` (block scan over chunks), in numba's CUDA simulator.

Own process, simulator on: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim`` (conftest.py refuses to run
otherwise). Every simulated thread is a Python thread, so the cases are tiny (T ≤ 40, widths ≤ 16, a few chunks)
and most run with 32 threads per block instead of 128 (every loop in the kernels is strided by the thread count,
so the count changes the schedule, not the result; one test keeps the default 128). Oracle: the naive O(T²)
masked linear attention, values and gradients (the backward is three more block scans, two of them reversed).
"""
import numpy as np
import pytest
import torch

from effedu import kernels
from effedu.kernels import _base
from effedu.attention.kernelized import linear_attention_naive
from effedu.kernels import linear_attention as la

pytestmark = pytest.mark.cudasim

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.float64: dict(atol=1e-11, rtol=1e-10)}


@pytest.fixture(autouse=True)
def few_threads(monkeypatch):
    monkeypatch.setattr(la, "CUDA_THREADS", 32)


def _features(B, H, T, M, Dv, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, H, T, M, generator=g, dtype=torch.float64).to(dtype)
    b = torch.rand(B, H, T, M, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64).to(dtype)
    if requires_grad:
        for x in (a, b, v):
            x.requires_grad_(True)
    return a, b, v


def test_simulator_is_on():
    assert kernels.simulator_enabled() and not kernels.cuda_usable()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("T, chunk", [(11, 4), (1, 4), (9, 32)])
def test_values_match_naive(dtype, T, chunk):
    # T=11, chunk 4: three chunks, the last one partial; T=1: one row; chunk > T: one chunk, no carried state
    a, b, v = _features(1, 2, T, 6, 5, dtype)
    out = kernels.causal_linear_attention(a, b, v, backend="cuda", chunk_size=chunk)
    assert out.shape == v.shape and out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, linear_attention_naive(a, b, v, causal=True), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gradients_match_naive(dtype):
    a, b, v = _features(2, 1, 13, 4, 3, dtype, seed=1, requires_grad=True)
    w = torch.randn(2, 1, 13, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    out = kernels.causal_linear_attention(a, b, v, backend="cuda", chunk_size=4)
    g = torch.autograd.grad((out * w).sum(), (a, b, v))
    ref = linear_attention_naive(a, b, v, causal=True)
    g_ref = torch.autograd.grad((ref * w).sum(), (a, b, v))
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x, y, **tol)


def test_gradcheck_float64():
    # fast_mode: a few random directional derivatives instead of the full Jacobian (each is a simulated launch)
    a, b, v = _features(1, 1, 6, 3, 2, torch.float64, seed=3, requires_grad=True)
    fn = lambda a, b, v: kernels.causal_linear_attention(a, b, v, backend="cuda", chunk_size=4, eps=1e-3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b, v), eps=1e-6, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("reverse", [False, True], ids=["prefix", "suffix"])
def test_causal_product_both_directions(reverse):
    # Y_i = Σ_{j≤i} (x_i·w_j) u_j, or Σ_{j≥i} for the reverse scan the backward uses; widths differ (Dx=5, Du=3)
    g = torch.Generator().manual_seed(4)
    x, w = (torch.randn(2, 10, 5, generator=g, dtype=torch.float64) for _ in range(2))
    u = torch.randn(2, 10, 3, generator=g, dtype=torch.float64)
    y = la.causal_product_cuda(x, w, u, reverse=reverse, chunk_size=4)
    mask = torch.ones(10, 10, dtype=torch.bool)
    mask = mask.triu() if reverse else mask.tril()
    ref = ((x @ w.transpose(-1, -2)) * mask) @ u
    torch.testing.assert_close(y, ref, **TOL[torch.float64])


def test_default_thread_count_and_chunk(monkeypatch):
    monkeypatch.setattr(la, "CUDA_THREADS", 128)
    a, b, v = _features(1, 1, 40, 4, 4, torch.float32, seed=5)
    out = kernels.causal_linear_attention(a, b, v, backend="cuda")  # default chunk 32: one full, one partial chunk
    torch.testing.assert_close(out, linear_attention_naive(a, b, v, causal=True), **TOL[torch.float32])


def test_chunk_shrinks_to_fit_shared_memory(monkeypatch):
    # on a GPU, wide float64 features shrink the chunk to fit 48 KiB; force that at simulator sizes
    monkeypatch.setattr(_base, "CUDA_STATIC_SMEM_BYTES", (2 * 4 * 16 + 4 * 4) * 8)
    assert la._cuda_dims(np.float64, 16, 16) == (4, 16)
    a, b, v = _features(1, 2, 10, 16, 3, torch.float64, seed=6)
    out = kernels.causal_linear_attention(a, b, v, backend="cuda", chunk_size=16)
    torch.testing.assert_close(out, linear_attention_naive(a, b, v, causal=True), **TOL[torch.float64])


def test_matches_numba_and_torch_backends():
    a, b, v = _features(1, 2, 12, 4, 4, torch.float64, seed=7)
    out = kernels.causal_linear_attention(a, b, v, backend="cuda", chunk_size=4)
    for name in ("numba", "torch"):
        torch.testing.assert_close(out, kernels.causal_linear_attention(a, b, v, backend=name), **TOL[torch.float64])


def test_auto_never_picks_the_simulator(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("backend='auto' ran the CUDA kernel in the simulator")

    monkeypatch.setattr(la, "linear_attention_cuda_forward", boom)
    a, b, v = _features(1, 1, 5, 3, 3, torch.float32, seed=8)
    out = kernels.causal_linear_attention(a, b, v)
    torch.testing.assert_close(out, linear_attention_naive(a, b, v, causal=True), **TOL[torch.float32])


def test_too_wide_for_the_tiles():
    a, b, v = _features(1, 1, 2, la.CUDA_MAX_DIM + 1, 4, torch.float32)
    with pytest.raises(ValueError, match=r"feature count M and value dim Dv must satisfy") as ei:
        kernels.causal_linear_attention(a, b, v, backend="cuda")
    assert "'numba'" in str(ei.value)
