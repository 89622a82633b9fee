"""Chapter 19: differentiable tiled attention (backward by recomputation) against SDPA; the memory and IO models."""
import math

import pytest
import torch
import torch.nn.functional as F

from _oracles import TOL, qkv
from effedu import kernels
from effedu.attention import get
from effedu.attention.dense import softmax_attention
from effedu.attention.memory_efficient import (H200_SHARED_MEMORY_BYTES, TILE_PRODUCTS, count_matmuls,
                                               fast_memory_bytes, fwd_bwd, largest_block_that_fits,
                                               online_softmax_trace, saved_for_backward_bytes, tile_products,
                                               traffic_bytes)
from effedu.kernels import tiled_attention as ta
from effedu.measure import peak_memory, saved_activation_bytes, tensor_bytes

CPU_BACKENDS = ["torch", "numba"]
# float32 gradients sum T products of O(1) terms: a little looser than the forward's tolerance
GTOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=1e-4, rtol=1e-4)}


def _dout(q, v, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*q.shape[:-1], v.shape[-1], generator=g, dtype=torch.float64).to(q.dtype)


def _compare(q, k, v, *, causal, backend, block_size, scale=None):
    dout = _dout(q, v)
    out, grads = fwd_bwd(lambda a, b, c: kernels.attention(a, b, c, causal=causal, scale=scale, backend=backend,
                                                            block_size=block_size), q, k, v, dout)
    ref, rgrads = fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a.double(), b.double(), c.double(),
                                                                          is_causal=causal, scale=scale),
                          q, k, v, dout.double())
    torch.testing.assert_close(out, ref.to(q.dtype), **TOL[q.dtype])
    for name, a, b in zip("qkv", grads, rgrads):
        assert a.dtype == q.dtype and a.shape == b.shape and torch.isfinite(a).all()
        torch.testing.assert_close(a, b.to(q.dtype), **GTOL[q.dtype], msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("T, S, block", [(37, 37, 8), (37, 53, 16), (53, 37, 16), (1, 9, 4), (9, 1, 4), (64, 64, 64)])
def test_values_and_gradients_match_sdpa(backend, dtype, causal, T, S, block):
    q, k, v = qkv(B=2, H=3, T=T, S=S, D=16, Dv=12, dtype=dtype, seed=T + S)
    _compare(q, k, v, causal=causal, backend=backend, block_size=block)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_scale_large_scores_and_non_contiguous(backend):
    # scores of magnitude ~100: the recomputed exp(s − lse) must stay finite and exact
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 19, 2, 8, generator=g, dtype=torch.float64) * 6).transpose(1, 2)
    k = (torch.randn(1, 23, 2, 8, generator=g, dtype=torch.float64) * 6).transpose(1, 2)
    v = torch.randn(1, 2, 5, 23, generator=g, dtype=torch.float64).transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _compare(q, k, v, causal=True, backend=backend, block_size=8, scale=0.9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_float64(backend, causal):
    q, k, v = qkv(B=1, H=2, T=5, S=7, D=3, Dv=2, dtype=torch.float64, seed=3, requires_grad=True)
    fn = lambda a, b, c: kernels.attention(a, b, c, causal=causal, backend=backend, block_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_bfloat16_torch_backend_grads_close_to_float32():
    q, k, v = qkv(B=1, H=2, T=33, D=16, dtype=torch.float32, seed=4)
    dout = _dout(q, v)
    _, ref = fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, dout)
    _, got = fwd_bwd(lambda a, b, c: kernels.attention(a, b, c, causal=True, backend="torch", block_size=8),
                     *(x.bfloat16() for x in (q, k, v)), dout.bfloat16())
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=6e-2, rtol=6e-2)


def test_lse_is_returned_but_not_differentiable():
    q, k, v = qkv(T=11, dtype=torch.float64, requires_grad=True)
    out, lse = kernels.attention(q, k, v, backend="numba", block_size=4, return_lse=True)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1))
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_upstream_gradient_gives_zero_gradients(backend):
    q, k, v = qkv(T=9, dtype=torch.float32, requires_grad=True)
    out = kernels.attention(q, k, v, backend=backend, block_size=4)
    grads = torch.autograd.grad(out, (q, k, v), torch.zeros_like(out))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_saves_only_inputs_output_and_lse(backend):
    # what backward keeps: q, k, v, out, lse — O(n·d); softmax_attention also keeps the n×n weights
    for n in (64, 128):
        q, k, v = qkv(B=1, H=2, T=n, D=8, dtype=torch.float32, requires_grad=True)
        saved = saved_activation_bytes(lambda a, b, c: kernels.attention(a, b, c, backend=backend), q, k, v)
        out, lse = kernels.attention(q, k, v, backend=backend, return_lse=True)
        assert saved == tensor_bytes(q, k, v, out, lse)
        assert saved - tensor_bytes(q, k, v) == saved_for_backward_bytes(1, 2, n, 8, method="tiled")
        dense = saved_activation_bytes(softmax_attention, q, k, v)
        assert dense >= tensor_bytes(q, k, v) + saved_for_backward_bytes(1, 2, n, 8, method="standard")


def test_peak_memory_of_forward_backward_grows_linearly_not_quadratically():
    def peak(fn, n):
        q, k, v = qkv(B=1, H=2, T=n, D=32, dtype=torch.float32)
        dout = torch.ones(1, 2, n, 32)
        return peak_memory(fwd_bwd, fn, q, k, v, dout)[0]

    tiled = lambda a, b, c: kernels.attention(a, b, c, backend="numba", block_size=64)  # noqa: E731
    t1, t2 = peak(tiled, 512), peak(tiled, 1024)
    d1, d2 = peak(softmax_attention, 512), peak(softmax_attention, 1024)
    assert t2 / t1 < 2.5, (t1, t2)  # O(n): doubling n about doubles the peak
    assert d2 / d1 > 3.0, (d1, d2)  # O(n²): about four times
    assert d2 > 4 * t2


def test_registered_variant_trains_and_matches_dense_model():
    from effedu.model import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=32, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=40)
    torch.manual_seed(0)
    dense = Transformer(cfg)
    me = Transformer(cfg.replace(attention="memory_efficient"))
    me.load_state_dict(dense.state_dict())
    tokens = torch.randint(0, 32, (3, 37), generator=torch.Generator().manual_seed(0))
    a, b = dense(tokens), me(tokens)  # "auto": numba on the CPU, with its backward
    torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p1), p2 in zip(dense.named_parameters(), me.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert get("memory_efficient") is get("tiled")


def test_registered_variant_refuses_mask_and_weights():
    q, k, v = qkv(T=5)
    fn = get("memory_efficient")
    with pytest.raises(ValueError, match="mask is not supported"):
        fn(q, k, v, mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="return_weights=True is impossible"):
        fn(q, k, v, return_weights=True)


# ------------------------------------------------------------------------------------------------------------
# the online softmax, the IO model, the workspace
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 3, 16, 100])
def test_online_softmax_trace_ends_at_logsumexp(block):
    s = torch.randn(37, generator=torch.Generator().manual_seed(block), dtype=torch.float64) * 4
    steps = online_softmax_trace(s, block)
    assert len(steps) == math.ceil(37 / block) and steps[-1]["block"][1] == 37
    assert steps[0]["alpha"] == 0.0 and all(0 < st["alpha"] <= 1 for st in steps[1:])
    ms = [st["m"] for st in steps]
    assert ms == sorted(ms) and ms[-1] == s.max().item()
    assert math.isclose(steps[-1]["m"] + math.log(steps[-1]["l"]), torch.logsumexp(s, 0).item(), rel_tol=1e-12)


def test_traffic_model_formulas_and_trends():
    n, d = 1024, 64
    assert traffic_bytes(n, d, method="standard", itemsize=1) == 4 * n * n + 4 * n * d
    assert traffic_bytes(n, d, method="standard", backward=True, itemsize=1) == 11 * n * n + 12 * n * d
    assert traffic_bytes(n, d, block_size=n, itemsize=1) == 4 * n * d + n  # one tile: everything read once
    tiled = [traffic_bytes(n, d, block_size=b) for b in (16, 64, 256, 1024)]
    assert tiled == sorted(tiled, reverse=True)  # larger tiles, fewer passes over K and V
    assert traffic_bytes(n, d, block_size=128) < traffic_bytes(n, d, method="standard") / 3
    for bwd in (False, True):
        full = traffic_bytes(n, d, block_size=64, backward=bwd)
        causal = traffic_bytes(n, d, block_size=64, backward=bwd, causal=True)
        assert 0.45 * full < causal < 0.65 * full
    assert fast_memory_bytes(128, 64) == (4 * 128 * 64 + 128 * 128 + 256) * 4
    assert fast_memory_bytes(128, 64, backward=True) > fast_memory_bytes(128, 64)


def test_fast_memory_in_16_bit_and_the_largest_block_that_fits():
    assert fast_memory_bytes(128, 64, itemsize=2, backward=True) == (6 * 128 * 64 + 2 * 128 * 128 + 256) * 2
    # 16-bit tiles (as FlashAttention runs): b = 128 fits an H200 SM's 228 KiB in the backward, b = 256 does not
    assert largest_block_that_fits(64, H200_SHARED_MEMORY_BYTES, itemsize=2) == 128
    assert largest_block_that_fits(64, H200_SHARED_MEMORY_BYTES, itemsize=4) == 64  # float32: half the tile
    assert largest_block_that_fits(64, 1024) is None
    assert largest_block_that_fits(64, 10**9, blocks=(8, 32)) == 32


def test_tile_product_counts_and_the_torch_backend_does_them():
    assert TILE_PRODUCTS == {"forward": 2, "textbook": 4, "one_sweep": 5, "two_sweeps": 7}
    assert tile_products(backward=False) == 2 and tile_products() == 7 and tile_products("one_sweep") == 5
    assert tile_products("textbook") == 4
    q, k, v, dout = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (19, 45, 45, 19))
    for block in (8, 16, 45):
        tiles = math.ceil(45 / block)
        _, fwd = count_matmuls(kernels.attention, q, k, v, backend="torch", block_size=block)
        assert fwd == tiles * tile_products(backward=False)
        # the torch backward is one sweep over key tiles (vectorised over all queries): S recomputed once
        _, both = count_matmuls(fwd_bwd, lambda a, b, c: kernels.attention(a, b, c, backend="torch", block_size=block),
                                q, k, v, dout)
        assert both == tiles * (tile_products(backward=False) + tile_products("one_sweep"))
    # the textbook path: 2 forward products, 4 backward ones (P stored, never recomputed)
    _, dense = count_matmuls(fwd_bwd, softmax_attention, q, k, v, dout)
    assert dense == TILE_PRODUCTS["forward"] + TILE_PRODUCTS["textbook"]
    _, numba = count_matmuls(fwd_bwd, lambda a, b, c: kernels.attention(a, b, c, backend="numba"), q, k, v, dout)
    assert numba == 0  # numba's products are invisible to torch


def test_numba_workspace_is_independent_of_sequence_length():
    for bwd in (False, True):
        a = ta.numba_workspace_bytes(1024, 1024, 64, 64, block_size=128, n_threads=2, backward=bwd)
        b = ta.numba_workspace_bytes(8192, 8192, 64, 64, block_size=128, n_threads=2, backward=bwd)
        assert a == b > 0


@pytest.mark.parametrize("call, exc, match", [
    (lambda: traffic_bytes(0, 64, block_size=8), ValueError, "n must be a positive int"),
    (lambda: traffic_bytes(64, 64), ValueError, "needs block_size"),
    (lambda: traffic_bytes(64, 64, block_size=8, method="flash"), ValueError, "method must be 'tiled' or 'standard'"),
    (lambda: fast_memory_bytes(0, 64), ValueError, "block_size must be a positive int"),
    (lambda: saved_for_backward_bytes(1, 1, 8, 8, method="x"), ValueError, "method must be"),
    (lambda: tile_products("flash"), ValueError, "method must be 'textbook'"),
    (lambda: tile_products(backward=1), TypeError, "backward must be a bool"),
    (lambda: count_matmuls(3), TypeError, "fn must be callable"),
    (lambda: largest_block_that_fits(64, 0), ValueError, "fast_bytes must be a positive int"),
    (lambda: online_softmax_trace(torch.zeros(2, 2), 2), ValueError, "non-empty 1-D tensor"),
    (lambda: online_softmax_trace(torch.zeros(3), 0), ValueError, "block_size must be a positive int"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
