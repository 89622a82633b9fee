"""Chapter 15: sparse attention patterns, the block-sparse kernel (torch / numba) and the registered variants.

Oracles: patterns against their definitions written as plain Python loops; ``mask_to_layout`` against torch's
``flex_attention.create_block_mask``; the kernel against dense ``softmax_attention`` with the mask expanded from the
layout (values, log-sum-exp and gradients); ``gradcheck`` (float64) for the numba autograd.Function.
"""
import math

import pytest
import torch

from effedu import attention, kernels
from effedu.attention import sparse as sp
from effedu.attention.dense import softmax_attention
from effedu.data import make_task
from effedu.kernels import block_sparse as bsk
from effedu.measure import saved_activation_bytes
from effedu.model import Transformer, TransformerConfig
from effedu.train import train
from _oracles import TOL, qkv

BACKENDS = ["torch", "numba"]


# ------------------------------------------------------------------------------------------------------------
# patterns, against their definitions as loops
# ------------------------------------------------------------------------------------------------------------


def _loop_mask(T, S, allowed):
    return torch.tensor([[bool(allowed(i, j)) for j in range(S)] for i in range(T)])


DEFINITIONS = {
    "local": (dict(window=5), lambda i, j: abs(i - j) <= 2),
    "strided": (dict(stride=4), lambda i, j: abs(i - j) < 4 or (i - j) % 4 == 0),
    "fixed": (dict(stride=5, summary=2), lambda i, j: i // 5 == j // 5 or j % 5 >= 3),
    "longformer": (dict(window=4, dilation=3, global_tokens=[0, 7]),
                   lambda i, j: (abs(i - j) <= 6 and (i - j) % 3 == 0) or i in (0, 7) or j in (0, 7)),
}


@pytest.mark.parametrize("name", list(DEFINITIONS))
@pytest.mark.parametrize("T,S", [(1, 1), (13, 13), (19, 11), (11, 19)])
def test_token_patterns_match_their_definition(name, T, S):
    params, allowed = DEFINITIONS[name]
    if name == "longformer" and 7 >= max(T, S):
        params = dict(params, global_tokens=[0])
        allowed = lambda i, j: (abs(i - j) <= 6 and (i - j) % 3 == 0) or i == 0 or j == 0  # noqa: E731
    m = sp.pattern_mask(name, T, S=S, **params)
    assert m.shape == (T, S) and m.dtype == torch.bool
    assert torch.equal(m, _loop_mask(T, S, allowed))


@pytest.mark.parametrize("name", list(DEFINITIONS))
@pytest.mark.parametrize("T,S,b", [(13, 13, 4), (19, 11, 3), (11, 19, 5), (16, 16, 4), (7, 7, 16)])
def test_token_layout_is_the_smallest_cover(name, T, S, b):
    params, _ = DEFINITIONS[name]
    if name == "longformer":
        params = dict(params, global_tokens=[0])
    m = sp.pattern_mask(name, T, S=S, **params)
    lay = sp.pattern_layout(name, T, b, S=S, **params)
    assert lay.shape == (math.ceil(T / b), math.ceil(S / b))
    # block (I, J) kept ⇔ some pair inside it allowed (loop oracle)
    for I in range(lay.shape[0]):
        for J in range(lay.shape[1]):
            assert bool(lay[I, J]) == bool(m[I * b:(I + 1) * b, J * b:(J + 1) * b].any())
    assert torch.equal(lay, sp.mask_to_layout(m, b))
    expanded = sp.layout_to_mask(lay, b, T, S)
    assert not (m & ~expanded).any()  # the cover contains the pattern


def test_named_builders_agree_with_the_generic_ones():
    assert torch.equal(sp.local_mask(20, 7), sp.pattern_mask("local", 20, window=7))
    assert torch.equal(sp.strided_layout(40, 8, 6), sp.pattern_layout("strided", 40, 8, stride=6))
    assert torch.equal(sp.fixed_mask(20, 5, summary=2), sp.pattern_mask("fixed", 20, stride=5, summary=2))
    assert torch.equal(sp.longformer_layout(40, 8, 6, global_tokens=2),
                       sp.pattern_layout("longformer", 40, 8, window=6, global_tokens=2))
    assert torch.equal(sp.bigbird_mask(40, 8, seed=3), sp.layout_to_mask(sp.bigbird_layout(40, 8, seed=3), 8, 40))
    assert torch.equal(sp.blockwise_mask(20, 5, shift=1), sp.layout_to_mask(sp.blockwise_layout(20, 5, shift=1), 5, 20))


def test_layout_to_mask_expands_blocks_and_cuts_partial_ones():
    lay = torch.tensor([[True, False], [False, True]])
    m = sp.layout_to_mask(lay, 3, 5, 4)  # blocks of 3: rows 0-2 | 3-4, columns 0-2 | 3
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    per_head = torch.stack([lay, ~lay])
    assert torch.equal(sp.layout_to_mask(per_head, 3, 5, 4), torch.stack([expected, ~expected]))
    assert torch.equal(sp.mask_to_layout(torch.stack([expected, ~expected]), 3), per_head)


def test_mask_to_layout_matches_flex_attention_block_mask():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    T, b = 256, 32
    m = sp.longformer_mask(T, 24, dilation=2, global_tokens=[5, 100])
    bm = fa.create_block_mask(lambda bb, h, qi, kj: m[qi, kj], B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu",
                              BLOCK_SIZE=b)
    assert torch.equal(bm.to_dense()[0, 0].bool(), sp.mask_to_layout(m, b))
    assert torch.equal(sp.longformer_layout(T, b, 24, dilation=2, global_tokens=[5, 100]), sp.mask_to_layout(m, b))


def test_bigbird_window_global_and_seeded_random_blocks():
    n, b, r = 32, 4, 3  # 8 × 8 blocks
    lay = sp.bigbird_layout(n, b, window_blocks=3, global_blocks=1, random_blocks=r, seed=7)
    nb = n // b
    assert lay.shape == (nb, nb)
    assert lay[0].all() and lay[:, 0].all()  # the global block: row and column
    for I in range(1, nb):
        window = {J for J in range(nb) if abs(I - J) <= 1} | {0}
        kept = set(torch.nonzero(lay[I]).flatten().tolist())
        assert window <= kept and len(kept - window) == r  # exactly r random blocks beyond window + global
    assert torch.equal(lay, sp.bigbird_layout(n, b, window_blocks=3, global_blocks=1, random_blocks=r, seed=7))
    assert not torch.equal(lay, sp.bigbird_layout(n, b, window_blocks=3, global_blocks=1, random_blocks=r, seed=8))
    per_head = sp.bigbird_layout(n, b, random_blocks=1, seed=0, heads=3)
    assert per_head.shape == (3, nb, nb) and not torch.equal(per_head[0], per_head[1])
    # more random blocks than candidates: everything kept, no error
    assert sp.bigbird_layout(12, 4, random_blocks=10).all()


def test_blockwise_is_block_diagonal_and_shifts_per_head():
    lay = sp.blockwise_layout(10, 4)  # 3 blocks, the last partial
    assert torch.equal(lay, torch.eye(3, dtype=torch.bool))
    heads = sp.blockwise_layout(12, 4, shift=(0, 1, 2))
    assert heads.shape == (3, 3, 3)
    for h in range(3):
        assert torch.equal(heads[h], torch.eye(3, dtype=torch.bool).roll(h, dims=1))


def test_density():
    assert sp.density(torch.eye(4, dtype=torch.bool)) == 0.25
    with pytest.raises(TypeError, match="bool tensor"):
        sp.density(torch.eye(4))


# ------------------------------------------------------------------------------------------------------------
# receptive field
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, s", [(64, 8), (256, 16), (96, 12)])
def test_keys_per_query_follow_the_docstring_formulas(n, s):
    # strided, bidirectional: an interior query sees (2s − 1) + (n/s − 1) ≈ 3√n keys; causally s + ⌊i/s⌋
    strided = sp.strided_mask(n, s)
    interior = strided[s - 1 : n - s + 1].sum(1)
    assert (interior == (2 * s - 1) + (n // s - 1)).all()
    causal = strided & torch.ones(n, n, dtype=torch.bool).tril()
    assert [int(x) for x in causal.sum(1)] == [min(i + 1, s) + i // s for i in range(n)]
    # fixed: its own block of s + c summary columns in each of the other n/s − 1 blocks
    for c in (1, 2):
        assert (sp.fixed_mask(n, s, summary=c).sum(1) == s + c * (n // s - 1)).all()


def test_local_window_needs_distance_over_half_window_hops():
    T, w = 40, 7  # reach 3 per layer
    m = sp.local_mask(T, w)
    hd = sp.hop_distance(m)
    for i, j in [(0, 0), (0, 3), (0, 4), (0, 39), (20, 5)]:
        assert hd[i, j] == math.ceil(abs(i - j) / 3)
    assert sp.hops(m, 39, 0) == 13
    # causal: information flows forward only
    assert sp.hops(m, 0, 39, causal=True) is None and sp.hops(m, 39, 0, causal=True) == 13


@pytest.mark.parametrize("name,params,max_hops", [
    ("longformer", dict(window=3, global_tokens=1), 2),   # via the global token
    ("strided", dict(stride=8), 2),                       # strided then local (Child et al.)
    ("fixed", dict(stride=8, summary=1), 2),              # via a summary position
])
def test_two_hop_patterns(name, params, max_hops):
    m = sp.pattern_mask(name, 64, **params)
    hd = sp.hop_distance(m)
    assert (hd >= 0).all() and int(hd.max()) == max_hops


def test_receptive_field_agrees_with_hop_distance():
    m = sp.bigbird_mask(48, 4, random_blocks=1, global_blocks=0, seed=1)
    hd = sp.hop_distance(m)
    for layers in range(4):
        assert torch.equal(sp.receptive_field(m, layers), (hd >= 0) & (hd <= layers))
    blocks = sp.blockwise_mask(12, 4)
    assert sp.hops(blocks, 0, 11) is None  # separate blocks never meet
    assert sp.hop_distance(blocks, max_layers=0).max() == 0
    # hops_to: one column of the matrix, by a backwards sweep
    for i in (0, 17, 47):
        assert torch.equal(sp.hops_to(m, i), hd[i])
        assert torch.equal(sp.hops_to(m, i, causal=True), sp.hop_distance(m, causal=True)[i])


def test_receptive_field_bad_input():
    with pytest.raises(ValueError, match="square"):
        sp.hop_distance(torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="2-D bool"):
        sp.receptive_field(torch.ones(3, 3), 1)
    with pytest.raises(ValueError, match="layers must be ≥ 0"):
        sp.receptive_field(torch.ones(3, 3, dtype=torch.bool), -1)
    with pytest.raises(ValueError, match="i must be < T=3"):
        sp.hops(torch.ones(3, 3, dtype=torch.bool), 3, 0)


# ------------------------------------------------------------------------------------------------------------
# the kernel against the oracle: dense softmax_attention with the expanded mask
# ------------------------------------------------------------------------------------------------------------


def _random_layout(H, T, S, b, p=0.4, seed=0, per_head=False):
    g = torch.Generator().manual_seed(seed)
    nT, nS = bsk.block_grid(T, S, b)
    return torch.rand((H if per_head else 1, nT, nS), generator=g)[0 if not per_head else slice(None)] < p


def _oracle(q, k, v, layout, b, causal=False, scale=None):
    T, S = q.shape[2], k.shape[2]
    mask = sp.layout_to_mask(layout, b, T, S)
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    out = softmax_attention(q, k, v, mask=mask, causal=causal, scale=scale)
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * sc
    allowed = mask & torch.ones(T, S, dtype=torch.bool).tril() if causal else mask
    return out, torch.logsumexp(s.masked_fill(~allowed, -math.inf), dim=-1)


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("T,S,b", [(1, 1, 4), (17, 17, 4), (33, 20, 8), (20, 33, 8), (64, 64, 16), (5, 70, 16)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_values_and_gradients_match_the_masked_oracle(backend, dtype, T, S, b, causal):
    q, k, v = qkv(B=2, H=3, T=T, S=S, D=8, Dv=5, dtype=dtype, requires_grad=True)
    lay = _random_layout(3, T, S, b, p=0.5, seed=T + S)
    out, lse = kernels.block_sparse_attention(q, k, v, lay, block_size=b, causal=causal, backend=backend,
                                              return_lse=True)
    ref, ref_lse = _oracle(q, k, v, lay, b, causal)
    assert out.shape == (2, 3, T, 5) and out.dtype == dtype and lse.shape == (2, 3, T)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse.detach(), **TOL[dtype])
    for a, r in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_layout_scale_and_non_contiguous(backend):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 29, 4, 8, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
    k = torch.randn(2, 4, 8, 23, generator=g, dtype=torch.float64).transpose(-2, -1).requires_grad_(True)
    v = torch.randn(2, 4, 23, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    assert not q.is_contiguous() and not k.is_contiguous()
    lay = _random_layout(4, 29, 23, 6, p=0.5, seed=5, per_head=True)
    assert lay.shape == (4, 5, 4) and not torch.equal(lay[0], lay[1])
    out = kernels.block_sparse_attention(q, k, v, lay, block_size=6, scale=0.7, causal=True, backend=backend)
    ref, _ = _oracle(q, k, v, lay, 6, causal=True, scale=0.7)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for a, r in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, r, **TOL[torch.float64])
    # a (1, nT, nS) layout broadcasts over heads like a 2-D one
    lay2 = lay[1]
    a = kernels.block_sparse_attention(q, k, v, lay2.unsqueeze(0), block_size=6, backend=backend)
    b = kernels.block_sparse_attention(q, k, v, lay2, block_size=6, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_give_zeros_not_nan(backend):
    q, k, v = qkv(B=1, H=2, T=12, D=4, dtype=torch.float64, requires_grad=True)
    lay = torch.tensor([[False, False, False], [True, False, False], [False, False, True]])  # block row 0: nothing
    out, lse = kernels.block_sparse_attention(q, k, v, lay, block_size=4, backend=backend, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[:, :, :4] == 0).all() and torch.isneginf(lse[:, :, :4]).all() and torch.isfinite(lse[:, :, 4:]).all()
    # causal + a layout that keeps only a future block: also empty (rows 0-3 keep block 2, in their future)
    lay_f = torch.tensor([[False, False, True], [True, True, False], [True, True, True]])
    out_f = kernels.block_sparse_attention(q, k, v, lay_f, block_size=4, causal=True, backend=backend)
    assert (out_f[:, :, :4] == 0).all() and torch.isfinite(out_f).all()
    grads = _grads(out_f, (q, k, v))
    ref_grads = _grads(_oracle(q, k, v, lay_f, 4, causal=True)[0], (q, k, v))
    for a, r in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, **TOL[torch.float64])
    # an all-False layout: all zeros, zero gradients
    out0 = kernels.block_sparse_attention(q, k, v, torch.zeros(3, 3, dtype=torch.bool), block_size=4, backend=backend)
    assert (out0 == 0).all()
    assert all((g == 0).all() for g in _grads(out0, (q, k, v)))


def test_full_layout_is_exact_attention_and_large_scores_stay_finite():
    q, k, v = qkv(B=1, H=2, T=37, D=16, scale=8.0)  # scores of several hundred
    lay = torch.ones(5, 5, dtype=torch.bool)
    out = kernels.block_sparse_attention(q, k, v, lay, block_size=8, backend="numba")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), **TOL[torch.float32])


def test_long_runs_are_split_and_backends_agree():
    # a full row of 40 blocks of 16 = 640 keys > RUN_KEYS: the kernel splits the run; same numbers as torch
    q, k, v = qkv(B=1, H=2, T=640, D=8, dtype=torch.float64)
    lay = sp.longformer_layout(640, 16, 48, global_tokens=16)
    a = kernels.block_sparse_attention(q, k, v, lay, block_size=16, causal=True, backend="numba")
    b = kernels.block_sparse_attention(q, k, v, lay, block_size=16, causal=True, backend="torch")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_gradcheck_numba_float64():
    q, k, v = qkv(B=1, H=2, T=7, S=9, D=3, Dv=2, dtype=torch.float64, requires_grad=True)
    lay = torch.tensor([[[True, False, True], [True, True, False]], [[False, True, True], [True, False, True]]])
    for causal in (False, True):
        fn = lambda q, k, v: kernels.block_sparse_attention(q, k, v, lay, block_size=4, causal=causal,  # noqa: E731
                                                            backend="numba")
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8)


def test_kernel_saves_linear_not_quadratic_memory():
    T, D = 256, 16
    q, k, v = qkv(B=1, H=2, T=T, D=D, requires_grad=True)
    lay = sp.local_layout(T, 32, 64)
    kernel = saved_activation_bytes(lambda: kernels.block_sparse_attention(q, k, v, lay, block_size=32, backend="numba"))
    dense = saved_activation_bytes(lambda: kernels.block_sparse_attention(q, k, v, lay, block_size=32, backend="torch"))
    # q, k, v, out (4·B·H·T·D floats), lse (B·H·T) and the layout (nT·nS bytes): no T×S tensor
    assert kernel == (4 * 2 * T * D + 2 * T) * 4 + lay.numel()
    assert dense > 2 * T * T * 4  # the masked-dense path keeps the (B, H, T, S) weights


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------


def test_kernel_bad_input():
    q, k, v = qkv(B=1, H=2, T=10, D=4)
    f = kernels.block_sparse_attention
    good = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"does not match the block grid .* \(3, 3\) for T=10, S=10, block_size=4"):
        f(q, k, v, torch.ones(2, 3, dtype=torch.bool), block_size=4)
    with pytest.raises(TypeError, match="layout must have dtype torch.bool"):
        f(q, k, v, good.int(), block_size=4)
    with pytest.raises(TypeError, match="layout must be a torch.Tensor"):
        f(q, k, v, good.tolist(), block_size=4)
    with pytest.raises(ValueError, match="layout must be 2-D .* or 3-D"):
        f(q, k, v, good.view(1, 1, 3, 3), block_size=4)
    with pytest.raises(ValueError, match="one grid per head, shape \\(2, 3, 3\\)"):
        f(q, k, v, good.expand(3, 3, 3), block_size=4)
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        f(q, k, v, good, block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int, got float"):
        f(q, k, v, good, block_size=4.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        f(q, k, v, good, block_size=4, causal=1)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        f(q, k, v, good, block_size=4, backend="fast")
    with pytest.raises(ValueError, match="scale must be a positive"):
        f(q, k, v, good, block_size=4, scale=-1.0)
    with pytest.raises(TypeError, match="backend 'numba' supports float32 and float64"):
        f(q.half(), k.half(), v.half(), good, block_size=4, backend="numba")
    with pytest.raises(ValueError, match="head dims differ"):
        f(q, k[..., :3], v, good, block_size=4)


@pytest.mark.skipif(kernels.cuda_usable() or kernels.simulator_enabled(), reason="a CUDA backend is usable here")
def test_cuda_backend_without_gpu_is_refused_clearly():
    q, k, v = qkv(B=1, H=1, T=8, D=4)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable here.*'numba'"):
        kernels.block_sparse_attention(q, k, v, torch.ones(1, 1, dtype=torch.bool), block_size=8, backend="cuda")


def test_half_precision_goes_through_torch_with_auto():
    q, k, v = qkv(B=1, H=2, T=24, D=8, dtype=torch.bfloat16)
    lay = sp.local_layout(24, 8, 9)
    out = kernels.block_sparse_attention(q, k, v, lay, block_size=8)
    ref, _ = _oracle(q.float(), k.float(), v.float(), lay, 8)
    torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])


def test_pattern_bad_input():
    with pytest.raises(ValueError, match="unknown pattern 'dilated'"):
        sp.pattern_mask("dilated", 10)
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        sp.local_mask(10, 0)
    with pytest.raises(ValueError, match="summary must be ≤ stride=4, got 5"):
        sp.fixed_mask(10, 4, summary=5)
    with pytest.raises(TypeError, match="unexpected parameter.*'stride'.*for pattern 'local'"):
        sp.pattern_mask("local", 10, window=3, stride=2)
    with pytest.raises(ValueError, match="global token position 12 is outside"):
        sp.longformer_mask(10, 3, global_tokens=[12])
    with pytest.raises(ValueError, match="global_tokens must hold positions ≥ 0"):
        sp.longformer_mask(10, 3, global_tokens=[-1])
    with pytest.raises(TypeError, match="defined in blocks: give block_size"):
        sp.pattern_mask("bigbird", 10)
    with pytest.raises(TypeError, match="takes no block_size"):
        sp.pattern_mask("local", 10, block_size=4, window=3)
    with pytest.raises(ValueError, match="shift must be ≥ 0"):
        sp.blockwise_layout(10, 4, shift=-1)
    with pytest.raises(ValueError, match="random_blocks must be ≥ 0"):
        sp.bigbird_layout(10, 4, random_blocks=-1)
    with pytest.raises(ValueError, match="T must be a positive int"):
        sp.local_layout(0, 4, 3)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        sp.mask_to_layout(torch.ones(4, 4, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="does not match the block grid"):
        sp.layout_to_mask(torch.ones(2, 2, dtype=torch.bool), 4, 10)


# ------------------------------------------------------------------------------------------------------------
# registered variants
# ------------------------------------------------------------------------------------------------------------

REGISTERED = {
    "local": dict(window=9),
    "strided": dict(stride=5),
    "fixed": dict(stride=6, summary=2),
    "longformer": dict(window=7, dilation=2, global_tokens=2),
    "bigbird": dict(block_size=4, random_blocks=1, seed=2),
    "blockwise": dict(block_size=8),
    "star": dict(),
    "logsparse": dict(symmetric=True),
    "blockbert": dict(block_size=8, permutations=[(1, 0, 2), 2]),
}


def test_all_variants_are_registered():
    assert set(REGISTERED) | {"block_sparse"} <= set(attention.available())


@pytest.mark.parametrize("name", list(REGISTERED))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_registered_dense_path_is_the_masked_reference(name, causal):
    q, k, v = qkv(B=2, H=2, T=21, D=8, dtype=torch.float64)
    fn = attention.get(name)
    params = REGISTERED[name]
    if name in sp.TOKEN_PATTERNS:
        mask = sp.pattern_mask(name, 21, **params)
    else:
        mask = sp.pattern_mask(name, 21, **params)
        params = dict(params, backend="torch")
    out, w = fn(q, k, v, causal=causal, return_weights=True, **params)
    ref, w_ref = softmax_attention(q, k, v, mask=mask, causal=causal, return_weights=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(w, w_ref, **TOL[torch.float64])
    allowed = mask & torch.ones(21, 21, dtype=torch.bool).tril() if causal else mask
    assert (w[..., ~allowed] == 0).all()  # nothing outside the pattern
    if name not in sp.TOKEN_PATTERNS:
        # the block patterns' kernel path gives the same numbers as the dense reference
        fast = fn(q, k, v, causal=causal, **dict(REGISTERED[name], backend="numba"))
        torch.testing.assert_close(fast, ref, **TOL[torch.float64])


@pytest.mark.parametrize("name", sp.TOKEN_PATTERNS)
def test_token_patterns_with_block_size_use_the_covering_layout(name):
    q, k, v = qkv(B=1, H=2, T=30, D=8, dtype=torch.float64)
    fn = attention.get(name)
    out = fn(q, k, v, block_size=8, backend="numba", causal=True, **REGISTERED[name])
    lay = sp.pattern_layout(name, 30, 8, **REGISTERED[name])
    ref, _ = _oracle(q, k, v, lay, 8, causal=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])


def test_registered_bad_input_and_extra_mask():
    q, k, v = qkv(B=1, H=2, T=16, D=4)
    with pytest.raises(ValueError, match="backend='numba' needs block_size="):
        sp.local_attention(q, k, v, window=5, backend="numba")
    with pytest.raises(ValueError, match="the block-sparse kernel \\(backend='numba'\\) takes neither"):
        sp.bigbird_attention(q, k, v, block_size=4, backend="numba", mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match the block grid"):
        sp.block_sparse(q, k, v, layout=torch.ones(3, 3, dtype=torch.bool), block_size=4)
    # an extra mask is combined with the pattern (dense path)
    extra = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) < 0.7
    out = sp.local_attention(q, k, v, window=5, mask=extra)
    ref = softmax_attention(q, k, v, mask=extra & sp.local_mask(16, 5))
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    lay = sp.local_layout(16, 4, 5)
    out_b = sp.block_sparse(q, k, v, layout=lay, block_size=4, mask=extra)
    torch.testing.assert_close(out_b, softmax_attention(q, k, v, mask=extra & sp.layout_to_mask(lay, 4, 16)),
                               **TOL[torch.float32])


def _loss_falls(config):
    torch.manual_seed(0)
    model = Transformer(config)
    batch = make_task("copy", 8, 24, seed=0)
    hist = train(model, batch, steps=12, lr=3e-3, progress=False)
    assert all(math.isfinite(x) for x in hist["loss"])
    assert hist["loss"][-1] < hist["loss"][0] - 0.1, hist["loss"]


@pytest.mark.parametrize("name,kwargs", [
    ("local", dict(window=9)),                                           # exact, masked-dense
    ("local", dict(window=9, block_size=8)),                             # numba kernel, autograd.Function
    ("strided", dict(stride=6, block_size=8)),
    ("fixed", dict(stride=8, summary=2, block_size=8)),
    ("longformer", dict(window=8, dilation=2, global_tokens=1, block_size=8)),
    ("bigbird", dict(block_size=8, random_blocks=1, per_head=True)),
    ("blockwise", dict(block_size=8, shift=(0, 1))),
    ("block_sparse", dict(layout=sp.local_layout(48, 8, 17), block_size=8)),
])
def test_model_trains_with_each_variant(name, kwargs):
    batch_len = make_task("copy", 1, 24, seed=0).inputs.shape[1]
    if name == "block_sparse":
        kwargs = dict(kwargs, layout=sp.local_layout(batch_len, 8, 17))
    cfg = TransformerConfig(vocab_size=32, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=64,
                            attention=name, attention_kwargs=kwargs)
    _loss_falls(cfg)


# ------------------------------------------------------------------------------------------------------------
# the survey's remaining patterns: Star-Transformer, LogSparse, BlockBERT's permutations, Cascade
# ------------------------------------------------------------------------------------------------------------


def _is_power_of_two(d):
    return d > 0 and (d & (d - 1)) == 0


NEW_DEFINITIONS = {
    "star": (dict(), lambda i, j: abs(i - j) <= 1 or i == 0 or j == 0),
    "logsparse": (dict(), lambda i, j: i == j or _is_power_of_two(i - j)),
    "logsparse_sym": (dict(symmetric=True), lambda i, j: i == j or _is_power_of_two(abs(i - j))),
}


@pytest.mark.parametrize("key", list(NEW_DEFINITIONS))
@pytest.mark.parametrize("T,S", [(1, 1), (13, 13), (19, 11), (11, 19), (33, 33)])
def test_new_token_patterns_match_their_definition_and_cover(key, T, S):
    params, allowed = NEW_DEFINITIONS[key]
    name = key.removesuffix("_sym")
    m = sp.pattern_mask(name, T, S=S, **params)
    assert m.shape == (T, S) and m.dtype == torch.bool
    assert torch.equal(m, _loop_mask(T, S, allowed))
    for b in (3, 4, 16):
        assert torch.equal(sp.pattern_layout(name, T, b, S=S, **params), sp.mask_to_layout(m, b))
    builder = {"star": sp.star_mask, "logsparse": sp.logsparse_mask}[name]
    assert torch.equal(builder(T, S=S, **params), m)
    lay_builder = {"star": sp.star_layout, "logsparse": sp.logsparse_layout}[name]
    assert torch.equal(lay_builder(T, 4, S=S, **params), sp.mask_to_layout(m, 4))


def test_logsparse_row_counts_are_logarithmic():
    n = 300
    rows = sp.logsparse_mask(n).sum(1)
    assert int(rows[0]) == 1
    assert all(int(rows[i]) == math.floor(math.log2(i)) + 2 for i in range(1, n))
    assert not sp.logsparse_mask(n).triu(1).any()  # causal by construction
    sym = sp.logsparse_mask(n, symmetric=True)
    assert torch.equal(sym, sym.T)


def test_star_counts_and_two_hops():
    n = 40
    m = sp.star_mask(n)
    rows = m.sum(1)
    assert int(rows[0]) == n and int(rows[1]) == 3 and int(rows[-1]) == 3 and (rows[2:-1] == 4).all()
    assert int(sp.hop_distance(m).max()) == 2  # any pair through the relay


def _loop_blockbert(T, S, b, perms):
    nS = -(-S // b)
    lays = []
    for perm in perms:
        target = (lambda I, p=perm: (I + p) % nS) if isinstance(perm, int) else (lambda I, p=perm: p[I])
        lays.append(_loop_mask(T, S, lambda i, j, t=target: j // b == t(i // b)))
    return torch.stack(lays)


@pytest.mark.parametrize("T,S,b,perms", [
    (16, 16, 4, None), (19, 19, 4, [0, 1, 2]), (16, 16, 4, [(2, 0, 3, 1), 1]), (13, 17, 4, [0, 3]),
])
def test_blockbert_layout_and_mask_match_the_definition(T, S, b, perms):
    mask = sp.blockbert_mask(T, b, S=S, permutations=perms)
    want = _loop_blockbert(T, S, b, [0, 1] if perms is None else perms)
    assert mask.shape == want.shape and torch.equal(mask, want)
    lay = sp.blockbert_layout(T, b, S=S, permutations=perms)
    assert lay.dim() == 3 and torch.equal(lay, sp.mask_to_layout(mask, b))
    assert torch.equal(sp.layout_to_mask(lay, b, T, S), mask)
    assert sp.blockbert_layout(T, b, S=S, heads=3).shape[0] == 3


def test_blockbert_with_shifts_is_blockwise():
    lay = sp.blockbert_layout(32, 8, permutations=[0, 1, 3])
    assert torch.equal(lay, sp.blockwise_layout(32, 8, shift=(0, 1, 3)))


def test_cascade_windows_kwargs_and_receptive_field():
    assert [sp.cascade_window(layer, 4) for layer in range(4)] == [4, 8, 16, 32]
    assert sp.cascade_window(2, 3, growth=3) == 27
    assert torch.equal(sp.cascade_mask(50, 2, base_window=4), sp.local_mask(50, 16))
    kw = sp.cascade_attention_kwargs(3, 4, block_size=8)
    assert kw == [dict(window=4, block_size=8), dict(window=8, block_size=8), dict(window=16, block_size=8)]
    n, L = 128, 4
    cascade = [sp.cascade_mask(n, layer, base_window=4) for layer in range(L)]
    fixed = [sp.local_mask(n, 4)] * L
    mid = n // 2
    for depth in range(1, L + 1):
        rc = sp.stacked_receptive_field(cascade[:depth])
        rf = sp.stacked_receptive_field(fixed[:depth])
        assert torch.equal(rf, sp.receptive_field(fixed[0], depth))
        # reach of the middle query: Σ_l ⌊w_l/2⌋ = 2(2^L − 1) for the cascade, 2L for the fixed window
        assert int(rc[mid].sum()) == 2 * (2 * (2**depth - 1)) + 1
        assert int(rf[mid].sum()) == 2 * (2 * depth) + 1
        if depth > 1:
            assert rc[mid].sum() > rf[mid].sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,params", [
    ("star", dict(block_size=4)), ("logsparse", dict(block_size=4)),
    ("blockbert", dict(block_size=4, permutations=[(1, 0, 3, 2, 5, 4), 2])),
])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_new_patterns_attention_equals_masked_dense(name, params, backend, causal):
    q, k, v = qkv(B=2, H=2, T=21, D=8, dtype=torch.float64)
    fn = attention.get(name)
    if name == "blockbert":
        mask = sp.blockbert_mask(21, 4, permutations=params["permutations"])
    else:
        mask = sp.layout_to_mask(sp.pattern_layout(name, 21, 4), 4, 21)
    out = fn(q, k, v, causal=causal, backend=backend, **params)
    ref = softmax_attention(q, k, v, mask=mask, causal=causal)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])


@pytest.mark.parametrize("name,params", [("star", {}), ("logsparse", {}), ("logsparse", dict(symmetric=True))])
def test_new_token_patterns_exact_dense_path(name, params):
    q, k, v = qkv(B=1, H=2, T=19, S=23, D=8, dtype=torch.float64)
    out, w = attention.get(name)(q, k, v, return_weights=True, **params)
    mask = sp.pattern_mask(name, 19, S=23, **params)
    torch.testing.assert_close(out, softmax_attention(q, k, v, mask=mask), **TOL[torch.float64])
    assert (w[..., ~mask] == 0).all()


def test_new_patterns_bad_input():
    with pytest.raises(TypeError, match="unexpected parameter\\(s\\) 'window' for pattern 'star'"):
        sp.pattern_mask("star", 8, window=3)
    with pytest.raises(TypeError, match="symmetric must be a bool, got int"):
        sp.logsparse_mask(8, symmetric=1)
    with pytest.raises(ValueError, match=r"permutations\[0\] must be a permutation of range\(4\), got \[0, 0, 1, 2\]"):
        sp.blockbert_layout(16, 4, permutations=[(0, 0, 1, 2)])
    with pytest.raises(ValueError, match=r"permutations\[1\] must be a permutation of the 4 key blocks"):
        sp.blockbert_layout(16, 4, permutations=[0, (1, 0)])
    with pytest.raises(TypeError, match="permutations must be a non-empty sequence"):
        sp.blockbert_layout(16, 4, permutations=[])
    with pytest.raises(ValueError, match="heads=3 disagrees with the 2 permutations"):
        sp.blockbert_layout(16, 4, permutations=[0, 1], heads=3)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        sp.blockbert_layout(16, 4, heads=0)
    with pytest.raises(ValueError, match="permutations\\[0\\] must be ≥ 0"):
        sp.blockbert_layout(16, 4, permutations=[-1])
    with pytest.raises(TypeError, match="takes no block_size"):
        sp.pattern_mask("logsparse", 8, block_size=4)
    with pytest.raises(ValueError, match="layer must be ≥ 0, got -1"):
        sp.cascade_window(-1, 4)
    with pytest.raises(ValueError, match="base_window must be a positive int"):
        sp.cascade_mask(8, 0, base_window=0)
    with pytest.raises(ValueError, match="growth must be a positive int"):
        sp.cascade_attention_kwargs(2, 4, growth=0)
    with pytest.raises(TypeError, match="masks must be a non-empty list"):
        sp.stacked_receptive_field(sp.local_mask(8, 3))
    with pytest.raises(ValueError, match="every layer's mask must be"):
        sp.stacked_receptive_field([sp.local_mask(8, 3), sp.local_mask(9, 3)])
    q, k, v = qkv(B=1, H=2, T=16, D=4)
    with pytest.raises(ValueError, match="layout has 3 heads|heads"):
        sp.blockbert_attention(q, k, v, block_size=4, permutations=[0, 1, 2])


@pytest.mark.parametrize("name,kwargs", [
    ("star", {}),
    ("logsparse", dict(block_size=8)),
    ("blockbert", dict(block_size=8)),
    ("local", sp.cascade_attention_kwargs(2, 4, block_size=8)),            # Cascade: one window per layer
])
def test_model_trains_with_the_new_patterns(name, kwargs):
    cfg = TransformerConfig(vocab_size=32, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=64,
                            attention=name, attention_kwargs=kwargs)
    _loss_falls(cfg)
