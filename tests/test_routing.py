"""Chapter 16, routing attention: online k-means, balanced clusters, attention within clusters, commitment loss.

Oracles: dense softmax attention restricted to the same clusters — weights ∝ n_ij · exp(s_ij), n_ij the number of
clusters holding both query i and key j, built from the assignments — in values and gradients; one cluster
holding everything == dense attention; the EMA step and the commitment loss by hand; gradcheck (float64).
"""

import pytest
import torch
import torch.nn.functional as F

from effedu import data
from effedu.attention import get
from effedu.attention import routing as R
from effedu.attention.dense import softmax_attention
from effedu.kernels.masking import masked_softmax
from effedu.model import Transformer, TransformerConfig, lm_loss
from effedu.train import train
from _oracles import TOL, qkv


def centroids(C, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def oracle(q, k, v, clusters, *, causal=False, mask=None, scale=None):
    """Dense attention with weights ∝ n_ij exp(s_ij) on the pairs the clusters cover (n_ij > 0), 0 elsewhere."""
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    n = R.routing_counts(clusters, T, S)
    scores = (q @ k.transpose(-2, -1)) * (D ** -0.5 if scale is None else scale)
    allowed = n > 0
    if causal:
        allowed = allowed & torch.ones(T, S, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & mask
    w = masked_softmax(scores + torch.log(n.clamp(min=1).to(q.dtype)), allowed)
    return w @ v, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal, use_mask, T, S, C, window", [
    (False, False, 13, 13, 3, None),
    (True, False, 16, 16, 4, 5),
    (False, True, 11, 7, 2, 4),
    (True, True, 12, 12, 3, 6),
])
def test_equals_dense_attention_restricted_to_the_clusters(dtype, causal, use_mask, T, S, C, window):
    q, k, v = qkv(B=2, H=3, T=T, S=S, D=6, Dv=5, dtype=dtype, seed=T + C, requires_grad=True)
    mu = centroids(C, 6, seed=C, dtype=dtype)
    mask = (torch.rand(2, 1, T, S, generator=torch.Generator().manual_seed(1)) > 0.3) if use_mask else None
    out, w, cl = R.routing_attention(q, k, v, centroids=mu, window=window, causal=causal, mask=mask,
                                     return_weights=True, return_clusters=True)
    ref, wref = oracle(q, k, v, cl, causal=causal, mask=mask)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(w, wref, **tol)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    ours = torch.autograd.grad((out * g).sum(), (q, k, v))
    theirs = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **(tol if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)))
    # balanced: every cluster holds exactly window (default T // C) distinct queries and keys, ascending
    wq = window or T // C
    wk = window or S // C
    assert cl.queries.shape == (2, 3, C, wq) and cl.keys.shape == (2, 3, C, wk)
    for idx in (cl.queries, cl.keys):
        assert (idx[..., 1:] > idx[..., :-1]).all()
    # rows of the weights sum to 1 where the query attends to something, else 0 (and its output is 0)
    sums = w.sum(-1)
    some = (wref > 0).any(-1)
    torch.testing.assert_close(sums[some], torch.ones_like(sums[some]), **tol)
    assert (sums[~some] == 0).all() and (out[~some] == 0).all()


def test_routing_picks_top_window_by_cosine():
    q, k, v = qkv(B=1, H=2, T=10, D=4, dtype=torch.float64, seed=3)
    mu = centroids(3, 4, seed=1)
    _, cl = R.routing_attention(q, k, v, centroids=mu, window=4, return_clusters=True)
    aff = F.normalize(q, dim=-1) @ mu.t()  # (B, H, T, C)
    for h in range(2):
        for c in range(3):
            top = set(aff[0, h, :, c].topk(4).indices.tolist())
            assert set(cl.queries[0, h, c].tolist()) == top


def test_one_cluster_holding_everything_is_dense_attention():
    q, k, v = qkv(B=2, H=2, T=9, D=5, dtype=torch.float64, seed=2)
    mu = centroids(1, 5)
    for causal in (False, True):
        out = R.routing_attention(q, k, v, centroids=mu, causal=causal)
        torch.testing.assert_close(out, softmax_attention(q, k, v, causal=causal), **TOL[torch.float64])


def test_gradcheck():
    q, k, v = qkv(B=1, H=2, T=8, D=3, dtype=torch.float64, seed=4, requires_grad=True)
    mu = centroids(3, 3, seed=2)
    assert torch.autograd.gradcheck(lambda a, b, c: R.routing_attention(a, b, c, centroids=mu, window=4, causal=True),
                                    (q, k, v), fast_mode=True)


def test_online_kmeans_ema_step_by_hand():
    km = R.OnlineKMeans(3, 4, decay=0.9, seed=1)
    mu0 = km.centroids.clone()
    torch.testing.assert_close(mu0.norm(dim=-1), torch.ones(3))
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    xh = F.normalize(x, dim=-1)
    c = (xh @ mu0.t()).argmax(-1)
    assert torch.equal(km.assign(x), c)
    assert km.update(x)
    for j in range(3):
        if (c == j).any():
            want = F.normalize(0.9 * mu0[j] + 0.1 * xh[c == j].mean(0), dim=0)
        else:
            want = mu0[j]
        torch.testing.assert_close(km.centroids[j], want)
    # eval mode: no update; centroids are a buffer, saved, not trained
    km.eval()
    before = km.centroids.clone()
    assert not km.update(x) and torch.equal(km.centroids, before)
    assert "centroids" in km.state_dict() and not list(km.parameters())
    assert torch.equal(R.OnlineKMeans(3, 4, seed=1).centroids, mu0)  # seeded


def test_commitment_loss_by_hand():
    mu = centroids(2, 3)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    loss = R.commitment_loss(x, mu)
    xh = F.normalize(x.detach(), dim=-1)
    near = mu[(xh @ mu.t()).argmax(-1)]
    torch.testing.assert_close(loss.detach(), ((xh - near) ** 2).sum(-1).mean())
    loss.backward()
    assert x.grad.abs().sum() > 0
    assert R.commitment_loss(mu * 3.0, mu).item() == pytest.approx(0.0, abs=1e-12)  # on the centroids: 0


def test_bad_input():
    q, k, v = qkv(T=8, D=4)
    mu = centroids(2, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="n_clusters must be a positive int, got 0"):
        R.OnlineKMeans(0, 4)
    with pytest.raises(ValueError, match=r"decay must be a float in \[0, 1\)"):
        R.OnlineKMeans(2, 4, decay=1.0)
    with pytest.raises(ValueError, match=r"centroids must be \(C, D=4\)"):
        R.routing_attention(q, k, v, centroids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"window must be ≤ min\(T, S\) = 8"):
        R.routing_attention(q, k, v, centroids=mu, window=9)
    with pytest.raises(ValueError, match="window must be a positive int"):
        R.routing_attention(q, k, v, centroids=mu, window=0)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., dim=4\)"):
        R.OnlineKMeans(2, 4).assign(torch.zeros(3, 5))
    cfg = TransformerConfig(d_model=16, n_heads=2, attention="routing", attention_kwargs={"n_clusters": 0})
    with pytest.raises(ValueError, match="n_clusters must be a positive int"):
        Transformer(cfg)
    with pytest.raises(TypeError, match=r"unknown attention_kwargs \['bucket'\]"):
        R.RoutingAttention(cfg.replace(attention_kwargs={"bucket": 2}))


@pytest.mark.parametrize("causal", [True, False])
def test_model_trains_with_routing_and_records_the_commitment_loss(causal):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=12, d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=32, causal=causal,
                            attention="routing", attention_kwargs={"n_clusters": 2, "decay": 0.5, "commitment": 0.1})
    model = Transformer(cfg)
    att = model.blocks[0].attn.attn_fn
    assert get("routing") is R.RoutingAttention and isinstance(att, R.RoutingAttention)
    mu0 = att.kmeans.centroids.clone()

    def step(model, inputs, targets, optimizer, grad_clip=None):  # the LM loss plus the commitment loss
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model(inputs), targets) + model.aux_loss()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    history = train(model, data.make_task("copy", 16, 8, seed=0), steps=3, lr=3e-3, progress=False, step_fn=step)
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert att.kmeans.updates == 3 and not torch.equal(att.kmeans.centroids, mu0)
    aux = model.aux_loss()
    assert aux.requires_grad and float(aux.detach()) > 0 and torch.equal(aux, att.aux_loss)
    # eval: the centroids stay
    model.eval()
    mu1 = att.kmeans.centroids.clone()
    with torch.no_grad():
        model(data.make_task("copy", 16, 8, seed=1)[0])
    assert torch.equal(att.kmeans.centroids, mu1)
