"""Chapter 16, SparseBERT's learned attention mask: Gumbel-sigmoid and LearnedMaskAttention.

Oracles: σ(z/τ) without noise; P(hard sample = 1) = σ(z) (statistical, seeded); the straight-through gradient is
the soft one; in eval the layer is dense masked softmax attention with the mask [α > 0]; gradients reach the mask
logits in training; the density by counting.
"""

import pytest
import torch

from effedu import data
from effedu.attention import get
from effedu.attention import learned_mask as LM
from effedu.attention.dense import softmax_attention
from effedu.model import Transformer, TransformerConfig, lm_loss
from effedu.train import train
from _oracles import TOL, qkv


def cfg(**kw):
    return TransformerConfig(vocab_size=12, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=12,
                             attention="sparsebert", attention_kwargs=kw)


def test_gumbel_sigmoid_without_noise_and_straight_through():
    z = torch.linspace(-3, 3, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(LM.gumbel_sigmoid(z, temperature=0.5, noise=False), torch.sigmoid(z / 0.5))
    g = torch.Generator().manual_seed(0)
    hard = LM.gumbel_sigmoid(z, temperature=0.5, hard=True, generator=g)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    (hard * torch.arange(7.0, dtype=torch.float64)).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    soft = LM.gumbel_sigmoid(z2, temperature=0.5, generator=torch.Generator().manual_seed(0))
    (soft * torch.arange(7.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)  # the soft sample's gradient
    torch.testing.assert_close(hard.detach(), (soft.detach() > 0.5).double())


def test_hard_samples_are_bernoulli_of_sigmoid():
    z = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    g = torch.Generator().manual_seed(1)
    samples = LM.gumbel_sigmoid(z.expand(20000, 5), temperature=0.3, hard=True, generator=g)
    # n = 20000: the standard error of a frequency is ≤ 0.0036; 0.015 is > 4 of them
    torch.testing.assert_close(samples.mean(0), torch.sigmoid(z), atol=0.015, rtol=0)
    a = LM.gumbel_sigmoid(z, generator=torch.Generator().manual_seed(3))
    b = LM.gumbel_sigmoid(z, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_eval_is_dense_attention_with_the_hard_mask(dtype, causal):
    torch.manual_seed(0)
    att = LM.LearnedMaskAttention(cfg())
    with torch.no_grad():
        att.mask_logits.copy_(torch.randn(12, 12))
    att.eval()
    q, k, v = qkv(B=2, H=2, T=9, S=11, D=4, Dv=3, dtype=dtype, seed=2)
    user = torch.rand(2, 1, 9, 11, generator=torch.Generator().manual_seed(4)) > 0.2
    out, w = att(q, k, v, causal=causal, mask=user, return_weights=True)
    hard = att.mask_logits[:9, :11] > 0
    assert torch.equal(att.hard_mask(9, 11), hard)
    ref, wref = softmax_attention(q, k, v, causal=causal, mask=user & hard, return_weights=True)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(w, wref, **TOL[dtype])
    assert (w[..., ~hard] == 0).all()


def test_training_mask_is_soft_and_gradients_reach_the_logits():
    torch.manual_seed(0)
    att = LM.LearnedMaskAttention(cfg(temperature=0.7, init=0.5))
    q, k, v = qkv(B=1, H=2, T=8, D=4, seed=3, requires_grad=True)
    out, w = att(q, k, v, return_weights=True, generator=torch.Generator().manual_seed(0))
    assert (w > 0).all()  # soft: nothing exactly masked
    # noise-free soft mask: weights ∝ σ(α/τ) exp(s)
    att.noise = False
    out2, w2 = att(q, k, v, return_weights=True)
    s = (q @ k.transpose(-2, -1)) * 0.5 + torch.log(torch.sigmoid(att.mask_logits[:8, :8] / 0.7))
    torch.testing.assert_close(w2, torch.softmax(s, -1), **TOL[torch.float32])
    out2.square().sum().backward()
    g = att.mask_logits.grad
    assert g is not None and torch.isfinite(g).all() and g[:8, :8].abs().sum() > 0
    assert (g[8:] == 0).all() and (g[:, 8:] == 0).all()  # positions not used: no gradient


def test_density():
    att = LM.LearnedMaskAttention(cfg(init=-1.0))
    assert att.density() == 0.0
    with torch.no_grad():
        att.mask_logits[:, :6] = 1.0
    assert att.density() == 0.5 and att.density(4, 12) == 0.5
    d = att.density(causal=True)
    assert 0.0 <= d <= 1.0 and d == pytest.approx((6 * 7 / 2 + 6 * 6) / (12 * 13 / 2))
    # everything masked in eval: output 0, finite
    att2 = LM.LearnedMaskAttention(cfg(init=-3.0)).eval()
    q, k, v = qkv(B=1, H=1, T=5, D=4)
    out = att2(q, k, v)
    assert torch.isfinite(out).all() and (out == 0).all()


def test_bad_input():
    with pytest.raises(ValueError, match="temperature must be a positive float, got 0"):
        LM.gumbel_sigmoid(torch.zeros(3), temperature=0)
    with pytest.raises(ValueError, match="temperature must be a positive float"):
        Transformer(cfg(temperature=-1.0))
    with pytest.raises(TypeError, match=r"unknown attention_kwargs \['window'\]"):
        LM.LearnedMaskAttention(cfg(window=3))
    with pytest.raises(ValueError, match="sparsity must be a non-negative float"):
        LM.LearnedMaskAttention(cfg(sparsity=-1.0))
    att = LM.LearnedMaskAttention(cfg())
    q, k, v = qkv(T=13, D=4)
    with pytest.raises(ValueError, match="exceed max_len=12"):
        att(q, k, v)


@pytest.mark.parametrize("causal", [True, False])
def test_model_trains_with_sparsebert(causal):
    torch.manual_seed(0)
    c = TransformerConfig(vocab_size=12, d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=32, causal=causal,
                          attention="sparsebert", attention_kwargs={"temperature": 0.5, "sparsity": 0.1})
    model = Transformer(c)
    att = model.blocks[0].attn.attn_fn
    assert get("sparsebert") is LM.LearnedMaskAttention and isinstance(att, LM.LearnedMaskAttention)
    before = att.mask_logits.detach().clone()

    def step(model, inputs, targets, optimizer, grad_clip=None):
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model(inputs), targets) + model.aux_loss()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    history = train(model, data.make_task("copy", 16, 8, seed=0), steps=3, lr=3e-3, progress=False, step_fn=step)
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert not torch.equal(att.mask_logits.detach(), before)  # the mask learned
    assert 0.0 <= att.density() <= 1.0
    # the penalty of the last forward: λ · mean σ(α) over the pairs used (causal: j ≤ i)
    model(data.make_task("copy", 16, 8, seed=0)[0])
    logits = att.mask_logits.detach()[:8, :8]
    region = torch.ones(8, 8, dtype=torch.bool).tril() if causal else torch.ones(8, 8, dtype=torch.bool)
    torch.testing.assert_close(att.aux_loss.detach(), 0.1 * torch.sigmoid(logits)[region].mean())
