"""The CUDA backend of ``kernels.attention``, run in numba's CUDA simulator against the SDPA oracle.

Own process, simulator on: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim`` (conftest.py refuses to run
otherwise). Every simulated thread is a Python thread, so the cases are tiny (a few blocks of ≤ 32 threads,
T, S ≤ 40, D ≤ 16) and still cover the kernel's edges: partial query and key tiles, single rows, causal block
skipping with T == S and T != S, D != Dv, the key tile shrunk below the query tile, the returned log-sum-exp.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effedu import kernels
from effedu.kernels import _base
from effedu.kernels import tiled_attention as ta

pytestmark = pytest.mark.cudasim

# float32: the kernel accumulates in float32 on a GPU (the simulator's math.exp returns Python floats, so it is a
# little more accurate here); float64 agrees with SDPA to rounding.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.float64: dict(atol=1e-11, rtol=1e-10)}


def _qkv(B, H, T, S, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, S, Dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _reference(q, k, v, causal, scale=None):
    """SDPA in float64 (exact for these sizes), plus the log-sum-exp of the scaled, masked scores."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal, scale=scale)
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q64 @ k64.transpose(-2, -1)) * sc
    if causal:
        T, S = s.shape[-2:]
        allowed = torch.ones(T, S, dtype=torch.bool).tril()  # top-left aligned: key j ≤ query i
        s = s.masked_fill(~allowed, -math.inf)
    return out, torch.logsumexp(s, dim=-1)


def _check(q, k, v, *, causal=False, scale=None, block_size=None):
    out, lse = kernels.attention(
        q, k, v, causal=causal, scale=scale, backend="cuda", block_size=block_size, return_lse=True
    )
    ref, ref_lse = _reference(q, k, v, causal, scale)
    B, H, T, _ = q.shape
    assert out.shape == (B, H, T, v.shape[-1]) and lse.shape == (B, H, T)
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    assert out.device == q.device and lse.device == q.device
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, ref.to(q.dtype), **TOL[q.dtype])
    torch.testing.assert_close(lse, ref_lse.to(q.dtype), **TOL[q.dtype])
    return out, lse


# ------------------------------------------------------------------------------------------------------------
# the simulator is what runs here
# ------------------------------------------------------------------------------------------------------------


def test_simulator_is_on_and_reported():
    assert kernels.simulator_enabled()
    status = kernels.backends()["cuda"]
    assert "simulator" in status and "NUMBA_ENABLE_CUDASIM" in status
    assert not kernels.cuda_usable()  # the simulator is not a usable GPU


# ------------------------------------------------------------------------------------------------------------
# correctness against SDPA
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_odd_lengths_match_sdpa(dtype, causal):
    # T=17, S=23: neither a multiple of the 8-row tile (3 query tiles, 3 key tiles, the last ones partial)
    q, k, v = _qkv(2, 2, 17, 23, 8, 8, dtype)
    _check(q, k, v, causal=causal, block_size=8)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_block16_more_keys_than_queries_d_ne_dv(causal):
    # D=16 != Dv=8; block 16: 2 query tiles (17 = 16 + 1), 2 key tiles; causal with T < S skips key tile 2 of tile 1
    q, k, v = _qkv(1, 2, 17, 23, 16, 8, torch.float64, seed=1)
    _check(q, k, v, causal=causal, block_size=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_causal_square_default_block(dtype):
    # T == S == 40 with the default cuda block (32): one full and one partial tile; the first tile skips keys ≥ 32
    q, k, v = _qkv(1, 2, 40, 40, 8, 4, dtype, seed=2)
    _check(q, k, v, causal=True)


def test_causal_more_queries_than_keys():
    # T=23 > S=9: queries i ≥ S see every key (top-left alignment), the rest see keys j ≤ i
    q, k, v = _qkv(2, 1, 23, 9, 8, 8, torch.float64, seed=3)
    _check(q, k, v, causal=True, block_size=8)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_single_query(causal):
    # T=1: one block in which a single thread out of 8 is active; causal: the query sees key 0 only
    q, k, v = _qkv(2, 2, 1, 11, 8, 8, torch.float64, seed=4)
    _check(q, k, v, causal=causal, block_size=8)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_single_key(causal):
    # S=1: every row's softmax is [1], so out = v[0] and lse = the one score
    q, k, v = _qkv(1, 2, 10, 1, 8, 8, torch.float64, seed=5)
    out, lse = _check(q, k, v, causal=causal, block_size=8)
    torch.testing.assert_close(out, v.expand_as(out))


def test_custom_scale():
    q, k, v = _qkv(2, 2, 13, 15, 8, 8, torch.float64, seed=6)
    _check(q, k, v, scale=0.37, block_size=8)
    _check(q, k, v, causal=True, scale=2.5, block_size=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_non_contiguous_inputs(dtype):
    # transposed views, as a (B, T, H, D) projection split into heads produces, and v stored (B, H, Dv, S)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 11, 2, 8, generator=g, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 13, 2, 8, generator=g, dtype=dtype).transpose(1, 2)
    v = torch.randn(2, 2, 4, 13, generator=g, dtype=dtype).transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, causal=True, block_size=8)


def test_key_tile_smaller_than_query_tile(monkeypatch):
    # On a GPU the K/V tiles must fit 48 KiB of static shared memory, so wide float64 heads get a key tile BK
    # smaller than the query tile. Shrink the budget so that path runs at simulator sizes: block 16, BK 8.
    monkeypatch.setattr(_base, "CUDA_STATIC_SMEM_BYTES", 2 * 8 * 16 * 8)
    assert ta._cuda_tile_dims(np.float64, 16, 16, 16) == (8, 16)
    q, k, v = _qkv(1, 2, 19, 21, 16, 16, torch.float64, seed=8)
    _check(q, k, v, block_size=16)
    _check(q, k, v, causal=True, block_size=16)


def test_wide_head_rounds_tile_width_up():
    # D=17 → 32-wide shared tiles; only the first D / Dv columns are read
    q, k, v = _qkv(1, 1, 9, 10, 17, 3, torch.float64, seed=9)
    _check(q, k, v, causal=True, block_size=8)


def test_matches_numba_and_torch_backends():
    q, k, v = _qkv(2, 2, 17, 23, 8, 8, torch.float64, seed=10)
    out = kernels.attention(q, k, v, causal=True, backend="cuda", block_size=8)
    for name in ("numba", "torch"):
        other = kernels.attention(q, k, v, causal=True, backend=name, block_size=8)
        torch.testing.assert_close(out, other, **TOL[torch.float64])


def test_inputs_requiring_grad_give_a_differentiable_output():
    # chapter 19: the cuda backend has a backward (tests/cudasim/test_attention_backward_cudasim.py checks it)
    q, k, v = _qkv(1, 1, 5, 5, 8, 8, torch.float64, seed=11)
    q.requires_grad_(True)
    out, _ = _check(q, k, v, block_size=8)
    assert out.requires_grad and out.grad_fn is not None


# ------------------------------------------------------------------------------------------------------------
# "auto" never picks the simulator
# ------------------------------------------------------------------------------------------------------------


def test_auto_does_not_pick_the_simulator(monkeypatch):
    cpu = torch.device("cpu")
    assert kernels.resolve_backend("auto", cpu, torch.float32, "t") == "numba"
    assert kernels.resolve_backend("auto", cpu, torch.float64, "t") == "numba"
    assert kernels.resolve_backend("auto", cpu, torch.float16, "t") == "torch"

    def no_simulator(*args, **kwargs):
        raise AssertionError("backend='auto' ran the CUDA kernel in the simulator")

    monkeypatch.setattr(ta, "attention_cuda", no_simulator)
    q, k, v = _qkv(1, 2, 9, 9, 8, 8, torch.float32, seed=12)
    out = kernels.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, kernels.attention(q, k, v, causal=True, backend="numba"), rtol=0, atol=0)
    ref, _ = _reference(q, k, v, True)
    torch.testing.assert_close(out, ref.float(), **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [7, 12, 256])
def test_block_size_not_allowed_for_cuda(block_size):
    q, k, v = _qkv(1, 1, 4, 4, 8, 8, torch.float32)
    with pytest.raises(ValueError, match=r"block_size for backend 'cuda' must be one of 8, 16, 32, 64, 128"):
        kernels.attention(q, k, v, backend="cuda", block_size=block_size)


@pytest.mark.parametrize("block_size", [0, -8])
def test_block_size_not_positive(block_size):
    q, k, v = _qkv(1, 1, 4, 4, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        kernels.attention(q, k, v, backend="cuda", block_size=block_size)


@pytest.mark.parametrize("D, Dv", [(129, 8), (8, 129)])
def test_head_dim_over_limit(D, Dv):
    q, k, v = _qkv(1, 1, 2, 2, D, Dv, torch.float32)
    with pytest.raises(ValueError, match=r"head dim must be ≤ 128") as ei:
        kernels.attention(q, k, v, backend="cuda")
    assert "'numba'" in str(ei.value)


def test_half_precision_rejected():
    q, k, v = _qkv(1, 1, 2, 2, 8, 8, torch.float16)
    with pytest.raises(TypeError, match="float32 and float64"):
        kernels.attention(q, k, v, backend="cuda")
