"""Chapter 16, Sparse Sinkhorn attention: log-domain Sinkhorn, Gumbel-Sinkhorn, local + sorted block attention.

Oracles: doubly stochastic output; the max-weight permutation (brute force) as τ → 0; with P = identity the
result is block-local dense attention; with a hard permutation π it is dense attention on block i ∪ block π(i)
(built explicitly, values, weights and gradients); gradcheck in float64.
"""

import itertools

import pytest
import torch

from effedu import data
from effedu.attention import get
from effedu.attention import sinkhorn as SK
from effedu.attention.dense import softmax_attention
from effedu.model import Transformer, TransformerConfig
from effedu.train import train
from _oracles import TOL, qkv


def logits(shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def test_sinkhorn_is_doubly_stochastic():
    la = logits((2, 3, 5, 5), seed=1, scale=2.0)
    P = SK.sinkhorn(la, n_iters=8)
    torch.testing.assert_close(P.sum(-2), torch.ones(2, 3, 5, dtype=torch.float64))  # columns: exact (last step)
    P = SK.sinkhorn(la, n_iters=60)
    for d in (-1, -2):
        torch.testing.assert_close(P.sum(d), torch.ones(2, 3, 5, dtype=torch.float64), atol=1e-8, rtol=0)
    assert (P > 0).all()
    # invariant to adding a constant to a row or a column of log α
    la2 = la + torch.arange(5, dtype=torch.float64).view(5, 1) + 3.0 * torch.arange(5, dtype=torch.float64)
    torch.testing.assert_close(SK.sinkhorn(la2, n_iters=60), P, atol=1e-8, rtol=0)
    # rows approach 1 as the iterations grow
    errs = [(SK.sinkhorn(la, n_iters=n).sum(-1) - 1).abs().max().item() for n in (1, 4, 16)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0]


def test_low_temperature_gives_the_max_weight_permutation():
    la = logits((4, 4), seed=3, scale=3.0)
    best = max(itertools.permutations(range(4)), key=lambda p: sum(la[i, p[i]].item() for i in range(4)))
    P = SK.gumbel_sinkhorn(la, temperature=0.05, n_iters=300, noise=False)
    assert tuple(P.argmax(-1).tolist()) == best
    assert (P.max(-1).values > 0.9).all()
    # high temperature: blurred towards uniform
    Pw = SK.gumbel_sinkhorn(la, temperature=50.0, n_iters=50, noise=False)
    assert (Pw - 0.25).abs().max() < 0.05


def test_gumbel_noise_is_seeded():
    la = logits((3, 3))
    a = SK.gumbel_sinkhorn(la, generator=torch.Generator().manual_seed(7))
    b = SK.gumbel_sinkhorn(la, generator=torch.Generator().manual_seed(7))
    c = SK.gumbel_sinkhorn(la, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(SK.gumbel_sinkhorn(la, noise=False, temperature=0.5), SK.sinkhorn(la / 0.5))


def block_mask(T, b, perm, causal):
    """Dense (T, T) mask: query block i sees block i and block perm[i] (causal: local j ≤ i, sorted only if earlier)."""
    nb = T // b
    M = torch.zeros(T, T, dtype=torch.bool)
    for i in range(nb):
        rows = slice(i * b, (i + 1) * b)
        M[rows, i * b:(i + 1) * b] = True if not causal else torch.ones(b, b, dtype=torch.bool).tril()
        j = perm[i]
        if j is not None and (not causal or j < i):
            M[rows, j * b:(j + 1) * b] = True
    return M


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_identity_permutation_is_block_local_attention(dtype, causal):
    q, k, v = qkv(B=2, H=3, T=12, D=5, Dv=7, dtype=dtype, seed=1)
    P = torch.eye(4, dtype=dtype)
    out = SK.sinkhorn_attention(q, k, v, permutation=P, block_size=3, causal=causal)
    ref = softmax_attention(q, k, v, mask=block_mask(12, 3, [None] * 4, causal))
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_hard_permutation_is_dense_attention_on_the_permuted_blocks(causal):
    q, k, v = qkv(B=1, H=2, T=15, D=4, dtype=torch.float64, seed=2, requires_grad=True)
    perm = [2, 0, 4, 1, 3]
    P = torch.zeros(5, 5, dtype=torch.float64)
    P[torch.arange(5), torch.tensor(perm)] = 1.0
    out, w = SK.sinkhorn_attention(q, k, v, permutation=P, block_size=3, causal=causal, return_weights=True)
    ref, wref = softmax_attention(q, k, v, mask=block_mask(15, 3, perm, causal), return_weights=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(w, wref, **TOL[torch.float64])
    ours = torch.autograd.grad(out.sum(), (q, k, v))
    theirs = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_soft_permutation_from_logits():
    q, k, v = qkv(B=2, H=2, T=8, D=4, dtype=torch.float64, seed=5)
    la = logits((2, 2, 4, 4), seed=6)
    out, w = SK.sinkhorn_attention(q, k, v, sort_logits=la, block_size=2, n_iters=5, return_weights=True)
    again = SK.sinkhorn_attention(q, k, v, permutation=SK.sinkhorn(la, 5), block_size=2)
    torch.testing.assert_close(out, again, **TOL[torch.float64])
    # the effective weights are exact: out = weights @ v, each row a distribution
    torch.testing.assert_close(out, w @ v, **TOL[torch.float64])
    # rows of the weights sum to the rows of P (local part 1 − w_sorted, sorted part w_sorted·Σ_j P_ij): 1 once
    # Sinkhorn has converged
    _, w60 = SK.sinkhorn_attention(q, k, v, sort_logits=la, block_size=2, n_iters=60, return_weights=True)
    torch.testing.assert_close(w60.sum(-1), torch.ones(2, 2, 8, dtype=torch.float64), atol=1e-7, rtol=0)
    # causal: no weight on a later position
    _, wc = SK.sinkhorn_attention(q, k, v, sort_logits=la, block_size=2, causal=True, return_weights=True)
    assert (wc.triu(1) == 0).all()


def test_gradcheck():
    q, k, v = qkv(B=1, H=1, T=6, D=3, dtype=torch.float64, seed=4, requires_grad=True)
    la = logits((1, 1, 3, 3), seed=2).requires_grad_(True)
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, c, s: SK.sinkhorn_attention(a, b, c, sort_logits=s, block_size=2, causal=causal),
            (q, k, v, la), fast_mode=True)


def test_bad_input():
    q, k, v = qkv(T=8, D=4)
    P = torch.eye(4)
    with pytest.raises(ValueError, match="block_size=3 must divide the sequence length T=8"):
        SK.sinkhorn_attention(q, k, v, permutation=torch.eye(2), block_size=3)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        SK.sinkhorn_attention(q, k, v, permutation=P, block_size=0)
    with pytest.raises(ValueError, match="exactly one of sort_logits"):
        SK.sinkhorn_attention(q, k, v, block_size=2)
    with pytest.raises(ValueError, match=r"nb = T / block_size = 4"):
        SK.sinkhorn_attention(q, k, v, permutation=torch.eye(3), block_size=2)
    with pytest.raises(ValueError, match="an arbitrary mask is not supported"):
        SK.sinkhorn_attention(q, k, v, permutation=P, block_size=2, mask=torch.ones(8, 8, dtype=torch.bool))
    q2, k2, v2 = qkv(T=8, S=4, D=4)
    with pytest.raises(ValueError, match="self-attention only"):
        SK.sinkhorn_attention(q2, k2, v2, permutation=P, block_size=2)
    with pytest.raises(ValueError, match="temperature must be a positive float, got 0"):
        SK.gumbel_sinkhorn(torch.zeros(3, 3), temperature=0)
    with pytest.raises(ValueError, match="n_iters must be a positive int, got 0"):
        SK.sinkhorn(torch.zeros(3, 3), n_iters=0)
    with pytest.raises(ValueError, match="must be square"):
        SK.sinkhorn(torch.zeros(3, 4))
    cfg = TransformerConfig(d_model=16, n_heads=2, max_len=16, attention="sinkhorn",
                            attention_kwargs={"temperature": -1.0})
    with pytest.raises(ValueError, match="temperature must be a positive float"):
        Transformer(cfg)


@pytest.mark.parametrize("causal", [True, False])
def test_model_trains_with_sinkhorn(causal):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=12, d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=32, causal=causal,
                            attention="sinkhorn", attention_kwargs={"block_size": 4})
    model = Transformer(cfg)
    att = model.blocks[0].attn.attn_fn
    assert get("sinkhorn") is SK.SinkhornAttention and isinstance(att, SK.SinkhornAttention)
    history = train(model, data.make_task("copy", 16, 8, seed=0), steps=3, lr=3e-3, progress=False)
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert att.sort_net.weight.grad is not None and att.sort_net.weight.grad.abs().sum() > 0
    P = att.last_permutation
    assert P.shape[-2:] == (2, 2)  # T = 8 tokens, blocks of 4
