"""Reformer LSH attention (chapter 16): hashing, the chunked kernel (torch / numba), the layer, its oracles."""
import math

import pytest
import torch

from effedu import attention
from effedu.attention import lsh
from effedu.attention.lsh import (collision_probability, lsh_attention, lsh_attention_mask, lsh_buckets,
                                  random_rotations)
from effedu.attention.shared_qk import shared_qk_attention
from effedu.data import make_task
from effedu.kernels.lsh_attention import lsh_chunked_attention, lsh_chunked_torch
from effedu.model import Transformer, TransformerConfig
from effedu.train import train

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}


def _qv(B, H, T, D, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
    v = torch.randn(B, H, T, D + 1, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
    return q, v


def _pad(B, T, n_pad):
    m = torch.ones(B, 1, 1, T, dtype=torch.bool)
    m[0, ..., T - n_pad:] = False
    return m


# ------------------------------------------------------------------------------------------------------------
# hashing
# ------------------------------------------------------------------------------------------------------------


def test_random_rotations_shape_seed_and_generator():
    r = random_rotations(6, 3, 8, seed=1)
    assert r.shape == (6, 3, 4) and r.dtype == torch.float32
    assert torch.equal(r, random_rotations(6, 3, 8, seed=1))
    assert not torch.equal(r, random_rotations(6, 3, 8, seed=2))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(random_rotations(6, 3, 8, generator=g, dtype=torch.float64).float(), r)


def test_lsh_buckets_is_the_argmax_formula():
    x = torch.randn(2, 3, 10, 5, generator=torch.Generator().manual_seed(0))
    rot = random_rotations(5, 4, 6, seed=3)
    b = lsh_buckets(x, rot)
    assert b.shape == (2, 3, 4, 10) and b.dtype == torch.int64
    for r in range(4):
        xr = x @ rot[:, r, :]  # (2, 3, 10, 3)
        want = torch.cat([xr, -xr], dim=-1).argmax(dim=-1)
        assert torch.equal(b[:, :, r], want)
    assert int(b.min()) >= 0 and int(b.max()) <= 5


@pytest.mark.parametrize("theta", [0.3, math.pi / 2, 2.5])
def test_two_bucket_collision_rate_is_one_minus_theta_over_pi(theta):
    d, n = 16, 20000
    x = torch.zeros(2, d, dtype=torch.float64)
    x[0, 0] = 1.0
    x[1, 0], x[1, 1] = math.cos(theta), math.sin(theta)
    b = lsh_buckets(x, random_rotations(d, n, 2, seed=7, dtype=torch.float64))  # (n, 2)
    rate = (b[:, 0] == b[:, 1]).double().mean().item()
    p = collision_probability(theta)
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (rate, p)
    assert torch.allclose(collision_probability(torch.tensor([theta])), torch.tensor([p]))


# ------------------------------------------------------------------------------------------------------------
# the degenerate case: one bucket, one round, one chunk == shared-QK attention
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,causal,padded", [("torch", False, False), ("torch", True, False),
                                                    ("torch", False, True), ("torch", True, True),
                                                    ("numba", False, False), ("numba", True, True)])
def test_one_bucket_one_round_one_chunk_is_shared_qk(backend, causal, padded):
    q, v = _qv(2, 2, 24, 6)
    mask = _pad(2, 24, 5) if padded else None
    rot = torch.zeros(6, 1, 1, dtype=torch.float64)  # every token in bucket 0
    out = lsh_attention(q, None, v, rotations=rot, chunk_size=24, causal=causal, mask=mask, backend=backend)
    ref = shared_qk_attention(q, None, v, causal=causal, mask=mask)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])


# ------------------------------------------------------------------------------------------------------------
# the general case against an independent dense oracle
# ------------------------------------------------------------------------------------------------------------


def _oracle(q, v, buckets, c, causal, valid, count_duplicates):
    """Dense: per round, softmax over the pairs that round lets meet (sorted by a stable sort of the buckets),
    scores − log(rounds they meet in) if duplicates are counted once; rounds weighted by softmax of their lse."""
    B, H, T, D = q.shape
    R = buckets.shape[2]
    keys = q / q.norm(dim=-1, keepdim=True)
    s = q @ keys.transpose(-2, -1)  # scale 1
    meet = torch.zeros(B, H, R, T, T, dtype=torch.bool)
    for r in range(R):
        order = torch.sort(buckets[:, :, r], dim=-1, stable=True).indices  # sorted → original
        chunk = torch.empty_like(order)
        chunk.scatter_(-1, order, torch.arange(T).expand_as(order) // c)  # original → its chunk
        gap = chunk.unsqueeze(-1) - chunk.unsqueeze(-2)
        same = buckets[:, :, r].unsqueeze(-1) == buckets[:, :, r].unsqueeze(-2)
        meet[:, :, r] = same & ((gap == 0) | (gap == 1))
    eye = torch.eye(T, dtype=torch.bool)
    allowed = meet & ~eye
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    if valid is not None:
        allowed &= valid.view(B, 1, 1, 1, T)
    n = allowed.sum(dim=2, keepdim=True).clamp_min(1).to(q.dtype)
    sr = (s.unsqueeze(2) - (n.log() if count_duplicates else 0)).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(sr, dim=-1)  # (B, H, R, T)
    p = torch.nan_to_num(torch.exp(sr - lse.unsqueeze(-1)))
    wr = torch.nan_to_num(torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True)))
    out = torch.einsum("bhrt,bhrts,bhsd->bhtd", wr, p, v)
    alone = ~allowed.any(dim=-1).any(dim=2)
    self_ok = alone if valid is None else alone & valid.view(B, 1, T)
    return torch.where(self_ok.unsqueeze(-1), v, out), allowed


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("count_duplicates", [True, False])
def test_general_case_matches_the_dense_oracle(causal, count_duplicates):
    q, v = _qv(2, 2, 32, 5, seed=1)
    mask = _pad(2, 32, 6)
    out, b = lsh_attention(q, None, v, n_buckets=4, n_rounds=3, chunk_size=8, causal=causal, mask=mask,
                           count_duplicates=count_duplicates, backend="torch", return_buckets=True)
    assert b.shape == (2, 2, 3, 32)
    ref, allowed = _oracle(q, v, b, 8, causal, mask.view(2, 32), count_duplicates)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    # the rounds really differ and some pairs meet in several rounds (so the duplicate rule matters)
    assert (allowed.sum(dim=2) > 1).any() and not torch.equal(b[:, :, 0], b[:, :, 1])


def test_counting_duplicates_once_is_softmax_over_the_union_of_pairs():
    q, v = _qv(1, 2, 32, 4, seed=2)
    out, w, b = lsh_attention(q, None, v, n_buckets=4, n_rounds=4, chunk_size=8, backend="torch",
                              return_weights=True, return_buckets=True)
    union = (lsh_attention_mask(b, 8) & ~torch.eye(32, dtype=torch.bool)).any(dim=2)
    keys = q / q.norm(dim=-1, keepdim=True)
    p = torch.softmax((q @ keys.transpose(-2, -1)).masked_fill(~union, -math.inf), dim=-1)
    torch.testing.assert_close(w, p, **TOL[torch.float64])
    torch.testing.assert_close(out, w @ v, **TOL[torch.float64])
    # without the correction, pairs met in several rounds weigh more: the output differs
    out2 = lsh_attention(q, None, v, n_buckets=4, n_rounds=4, chunk_size=8, backend="torch", count_duplicates=False)
    assert (out2 - out).abs().max() > 1e-3


def test_lsh_attention_mask_properties():
    b = lsh_buckets(torch.randn(2, 1, 40, 6, generator=torch.Generator().manual_seed(0)), random_rotations(6, 2, 4))
    m = lsh_attention_mask(b, 8)
    assert m.shape == (2, 1, 2, 40, 40) and m.dtype == torch.bool
    assert m.diagonal(dim1=-2, dim2=-1).all()
    assert int(m.sum(dim=-1).max()) <= 16  # own chunk + previous chunk
    same = b.unsqueeze(-1) == b.unsqueeze(-2)
    assert not (m & ~same).any()  # only pairs of one bucket
    mc = lsh_attention_mask(b, 8, causal=True)
    assert torch.equal(mc, m & torch.ones(40, 40, dtype=torch.bool).tril())


def test_return_weights_rows_and_output():
    q, v = _qv(2, 2, 16, 4, seed=3)
    mask = _pad(2, 16, 4)
    out, w = lsh_attention(q, None, v, n_buckets=2, n_rounds=2, chunk_size=4, causal=True, mask=mask,
                           backend="torch", return_weights=True)
    assert w.shape == (2, 2, 16, 16)
    torch.testing.assert_close(out, w @ v, **TOL[torch.float64])
    rows = w.sum(dim=-1)
    assert torch.allclose(rows[1], torch.ones_like(rows[1]))  # no padding in batch 1: every row sums to 1
    assert (w.triu(1) == 0).all()  # causal


# ------------------------------------------------------------------------------------------------------------
# backends and gradients
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_equals_torch_forward_and_backward(dtype):
    q, v = _qv(1, 2, 16, 4, dtype=dtype, seed=4, grad=True)
    mask = _pad(1, 16, 3)
    res = []
    for backend in ("torch", "numba"):
        out = lsh_attention(q, None, v, n_buckets=4, n_rounds=3, chunk_size=4, causal=True, mask=mask,
                            backend=backend)
        gq, gv = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum(),
                                     (q, v))
        res.append((out, gq, gv))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, **TOL[dtype])


def _kernel_inputs(N=2, T=12, D=3, Dv=2, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(N, T, D, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    v = torch.randn(N, T, Dv, generator=g, dtype=torch.float64).requires_grad_(True)
    pos = torch.stack([torch.randperm(T, generator=g) for _ in range(N)])
    bucket = torch.randint(0, 2, (N, T), generator=g).sort(dim=-1).values
    bias = torch.randn(N, T, 2 * c, generator=g, dtype=torch.float64)
    bias[0, 3, :] = -math.inf  # a row with no key
    bias[1, :, 5] = -math.inf
    return q, k, v, pos, bucket, bias


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_gradcheck_out_and_lse(backend, causal):
    q, k, v, pos, bucket, bias = _kernel_inputs()

    def f(q, k, v):
        out, lse = lsh_chunked_attention(q, k, v, pos, bucket, chunk_size=4, causal=causal, scale=0.7,
                                         backend=backend, bias=bias)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    # fast mode (random projections of the Jacobian) keeps the many numba launches of the slow mode out
    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=backend == "numba")
    out, lse = f(q, k, v)
    assert (out[0, 3] == 0).all() and lse[0, 3] == 0  # the empty row: 0, never NaN


def test_kernel_numba_equals_torch_reference():
    q, k, v, pos, bucket, bias = _kernel_inputs(N=2, T=32, D=5, Dv=4, c=8, seed=1)
    a = lsh_chunked_attention(q, k, v, pos, bucket, chunk_size=8, causal=True, scale=1.0, backend="numba", bias=bias)
    b = lsh_chunked_torch(q, k, v, pos, bucket, bias, chunk_size=8, causal=True, scale=1.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[torch.float64])


# ------------------------------------------------------------------------------------------------------------
# bad input, registry, model
# ------------------------------------------------------------------------------------------------------------


def test_bad_input_errors():
    q, v = _qv(1, 1, 16, 4)
    with pytest.raises(ValueError, match="n_buckets must be an even"):
        lsh_attention(q, None, v, n_buckets=3, chunk_size=4)
    with pytest.raises(ValueError, match="n_buckets must be an even"):
        random_rotations(4, 1, 0)
    with pytest.raises(ValueError, match="n_rounds must be a positive"):
        lsh_attention(q, None, v, n_rounds=0, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size=5 must divide the sequence length T=16"):
        lsh_attention(q, None, v, chunk_size=5)
    with pytest.raises(ValueError, match="only a padding"):
        lsh_attention(q, None, v, chunk_size=4, mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="k is ignored"):
        lsh_attention(q, torch.zeros(1, 1, 8, 4), v, chunk_size=4)
    with pytest.raises(ValueError, match="rotations must have d=4"):
        lsh_attention(q, None, v, chunk_size=4, rotations=torch.zeros(3, 1, 1))
    with pytest.raises(ValueError, match="chunk_size=3 must divide"):
        lsh_attention_mask(torch.zeros(1, 1, 1, 16, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="pos must be an int64"):
        lsh_chunked_attention(q[0], q[0], v[0], torch.zeros(1, 16), torch.zeros(1, 16, dtype=torch.int64),
                              chunk_size=4, causal=False, scale=1.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        lsh_attention(q, None, v, chunk_size=4, causal=1)


def test_registered_and_trains_in_a_transformer():
    assert attention.get("lsh") is lsh.lsh_attention
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=32, d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=64, attention="lsh",
                            attention_kwargs=dict(n_buckets=4, n_rounds=2, chunk_size=8))
    model = Transformer(cfg)
    batch = make_task("copy", 8, 24, seed=0)
    hist = train(model, batch, steps=3, lr=3e-3, progress=False)
    assert len(hist["loss"]) == 3 and all(math.isfinite(x) for x in hist["loss"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
