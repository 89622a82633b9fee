"""Chapter 16, α-entmax: bisection (any α), exact 1.5-entmax and sparsemax, entmax attention.

Oracles: the PyPI ``entmax`` package (values and gradients, float32 and float64, odd shapes, every dim), softmax
as α → 1, gradcheck (float64) of the closed-form backward (for z and for a learnable α), dense softmax attention's
masking conventions.
"""

import entmax as entmax_pkg  # the oracle, a test dependency (pyproject [test]): missing → this file fails, never skips
import pytest
import torch

from effedu import data
from effedu.attention import get
from effedu.attention import entmax as E
from effedu.attention.dense import softmax_attention
from effedu.model import Transformer, TransformerConfig
from effedu.train import train
from _oracles import TOL, qkv


ODD = [(7,), (3, 5), (2, 3, 11), (2, 1, 4, 9)]


def rand(shape, dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ODD)
def test_values_and_gradients_match_the_entmax_package(shape, dtype):
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-8)
    for dim in range(-len(shape), len(shape)):
        z = rand(shape, dtype, seed=len(shape) + dim)
        dy = rand(shape, dtype, seed=99)
        cases = [
            (lambda x: E.entmax_bisect(x, 1.5, dim=dim), lambda x: entmax_pkg.entmax_bisect(x, 1.5, dim=dim)),
            (lambda x: E.entmax_bisect(x, 1.3, dim=dim), lambda x: entmax_pkg.entmax_bisect(x, 1.3, dim=dim)),
            (lambda x: E.entmax15(x, dim=dim), lambda x: entmax_pkg.entmax15(x, dim=dim)),
            (lambda x: E.sparsemax(x, dim=dim), lambda x: entmax_pkg.sparsemax(x, dim=dim)),
        ]
        for ours, theirs in cases:
            a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
            pa, pb = ours(a), theirs(b)
            torch.testing.assert_close(pa, pb, **tol)
            (pa * dy).sum().backward()
            (pb * dy).sum().backward()
            torch.testing.assert_close(a.grad, b.grad, **tol)


def test_rows_sum_to_one_with_exact_zeros():
    z = rand((4, 50), seed=3)
    for p in (E.entmax_bisect(z, 1.5), E.entmax_bisect(z, 3.0), E.entmax15(z), E.sparsemax(z)):
        torch.testing.assert_close(p.sum(-1), torch.ones(4, dtype=z.dtype), **TOL[torch.float64])
        assert (p >= 0).all() and (p == 0).any()
        assert (E.support_size(p) < 50).all() and (E.support_size(p) >= 1).all()
    # larger α, sparser: the support shrinks (weakly) as α grows
    sizes = [E.support_size(E.entmax_bisect(z, a)).sum().item() for a in (1.1, 1.5, 2.0, 4.0)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    # softmax has no exact zero
    assert (torch.softmax(z, -1) > 0).all()


def test_alpha_to_one_approaches_softmax():
    z = rand((3, 9), seed=1, scale=1.0)
    errs = [(E.entmax_bisect(z, a) - torch.softmax(z, -1)).abs().max().item() for a in (1.5, 1.1, 1.01, 1.001)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 2e-3


def test_exact_and_bisection_agree():
    z = rand((5, 33), seed=7)
    torch.testing.assert_close(E.entmax_bisect(z, 1.5), E.entmax15(z), **TOL[torch.float64])
    torch.testing.assert_close(E.entmax_bisect(z, 2.0), E.sparsemax(z), **TOL[torch.float64])


def test_gradcheck_z_and_alpha():
    z = rand((3, 6), seed=5).requires_grad_(True)
    for fn in (lambda x: E.entmax_bisect(x, 1.7), E.entmax15, E.sparsemax):
        assert torch.autograd.gradcheck(fn, (z,))
    # a learnable α per row (shape (3, 1)), and one α broadcast over the rows (shape (1,)): sums its gradient
    for alpha in (torch.tensor([[1.3], [1.6], [2.2]], dtype=torch.float64), torch.tensor([1.4], dtype=torch.float64)):
        alpha.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, a: E.entmax_bisect(x, a, n_iter=80), (z, alpha))


def test_alpha_gradient_matches_the_package():
    z = rand((4, 7), seed=2)
    dy = rand((4, 7), seed=8)
    a1 = torch.full((4, 1), 1.4, dtype=torch.float64, requires_grad=True)
    a2 = a1.detach().clone().requires_grad_(True)
    (E.entmax_bisect(z, a1) * dy).sum().backward()
    (entmax_pkg.entmax_bisect(z, a2) * dy).sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-8, rtol=1e-6)


def test_half_precision_runs_in_float32():
    z = rand((2, 10), torch.float16, seed=4)
    p = E.entmax_bisect(z, 1.5)
    assert p.dtype == torch.float16
    torch.testing.assert_close(p.float(), E.entmax15(z.float()), atol=3e-3, rtol=3e-3)


def test_bad_input():
    z = rand((2, 5))
    with pytest.raises(ValueError, match="alpha must be a finite float > 1"):
        E.entmax_bisect(z, 1.0)
    with pytest.raises(ValueError, match="alpha must be > 1"):
        E.entmax_bisect(z, torch.tensor([[0.5], [1.5]], dtype=torch.float64))
    with pytest.raises(ValueError, match="size 1 along dim"):
        E.entmax_bisect(z, torch.full((2, 5), 1.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not broadcast"):
        E.entmax_bisect(z, torch.full((3, 1), 1.5, dtype=torch.float64))
    with pytest.raises(TypeError, match="alpha must be a float > 1 or a tensor"):
        E.entmax_bisect(z, "1.5")
    with pytest.raises(ValueError, match="n_iter must be ≥ 1"):
        E.entmax_bisect(z, 1.5, n_iter=0)
    with pytest.raises(ValueError, match="dim must be in"):
        E.entmax15(z, dim=2)
    with pytest.raises(TypeError, match="z must have a floating dtype"):
        E.sparsemax(torch.ones(3, dtype=torch.long))
    q, k, v = qkv(T=5)
    with pytest.raises(ValueError, match="entmax_attention: alpha must be a finite float > 1"):
        E.entmax_attention(q, k, v, alpha=0.9)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_matches_package_with_mask_and_causal(alpha, dtype):
    q, k, v = qkv(B=2, H=3, T=7, S=7, D=5, Dv=4, dtype=dtype, seed=1)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, 7, 7, generator=g) > 0.4
    mask[0, 0, 2] = False  # a query with nothing allowed
    out, w = E.entmax_attention(q, k, v, mask=mask, causal=True, alpha=alpha, return_weights=True)
    allowed = mask & torch.ones(7, 7, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1)) * 5 ** -0.5
    ref = entmax_pkg.entmax_bisect(scores.masked_fill(~allowed, -1e9).double(), alpha).to(dtype)
    ref = ref.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w, ref, **tol)
    torch.testing.assert_close(out, ref @ v, **tol)
    assert (w[~allowed.expand_as(w)] == 0).all()  # masked: exactly 0
    assert (w[0, :, 2] == 0).all() and (out[0, :, 2] == 0).all() and torch.isfinite(out).all()
    assert get("entmax") is E.entmax_attention


def test_attention_gradients_finite_with_empty_rows():
    q, k, v = qkv(B=1, H=2, T=6, dtype=torch.float64, seed=2, requires_grad=True)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[1] = False
    alpha = torch.tensor([[[1.3]], [[1.8]]], dtype=torch.float64, requires_grad=True)  # one α per head
    out = E.entmax_attention(q, k, v, mask=mask, alpha=alpha)
    out.sum().backward()
    for t in (q, k, v, alpha):
        assert torch.isfinite(t.grad).all()
    assert alpha.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda a, b, c: E.entmax_attention(a, b, c, mask=mask, alpha=1.5),
                                    (q.detach().requires_grad_(), k.detach().requires_grad_(),
                                     v.detach().requires_grad_()), fast_mode=True)


def test_high_alpha_limit_and_softmax_reference_shapes():
    # α large: nearly argmax; odd T ≠ S, Dv ≠ D
    q, k, v = qkv(B=1, H=1, T=3, S=8, D=4, Dv=6, dtype=torch.float64, seed=4)
    out = E.entmax_attention(q, k, v, alpha=1.5)
    assert out.shape == softmax_attention(q, k, v).shape == (1, 1, 3, 6)


@pytest.mark.parametrize("causal", [True, False])
def test_model_trains_with_entmax(causal):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=12, d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=32, causal=causal,
                            attention="entmax", attention_kwargs={"alpha": 1.5})
    model = Transformer(cfg)
    history = train(model, data.make_task("copy", 16, 8, seed=0), steps=3, lr=3e-3, progress=False)
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
