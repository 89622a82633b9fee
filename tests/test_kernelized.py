"""Chapter 18, kernel attention: the prefix-sum kernel, linear attention, its RNN form, FAVOR+, clustered attention.

Oracles: the naive O(T²) masked linear attention (values and gradients), the literal prefix-sum formula, exact
softmax attention (FAVOR+ converges to it as features grow; clustered attention with one cluster per query *is*
it), and gradcheck in float64 for the custom autograd.Function.
"""

import pytest
import torch
import torch.nn.functional as F

from effedu import data, kernels, measure
from effedu.attention import available, get
from effedu.attention import kernelized as K
from effedu.attention.dense import softmax_attention
from effedu.kernels import linear_attention as la
from effedu.model import Transformer, TransformerConfig
from effedu.train import train
from _oracles import TOL

CPU_BACKENDS = ["torch", "numba"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # every tensor here is tiny: one thread is fastest, and on a shared, oversubscribed machine an OpenMP team of
    # two can wait milliseconds per tiny op for a descheduled partner (measured: 0.2 ms → 100 ms per call)
    import numba

    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


def features(B=2, H=3, T=17, M=6, Dv=5, dtype=torch.float64, seed=0, requires_grad=False):
    """Non-negative features φq, φk (B,H,T,M) and values v (B,H,T,Dv)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, H, T, M, generator=g, dtype=torch.float64).to(dtype)
    b = torch.rand(B, H, T, M, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64).to(dtype)
    if requires_grad:
        for x in (a, b, v):
            x.requires_grad_(True)
    return a, b, v


def qkv(B=2, H=3, T=17, S=None, D=8, Dv=None, dtype=torch.float64, seed=0, scale=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    Dv = D if Dv is None else Dv
    q = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    k = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    v = torch.randn(B, H, S, Dv, generator=g, dtype=torch.float64).to(dtype)
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_(True)
    return q, k, v


def grads(fn, inputs, seed=1):
    """Gradients of Σ out·w for a fixed random w (a full vector-Jacobian product, not just the sum)."""
    out = fn(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return out, torch.autograd.grad((out * w).sum(), inputs)


# ------------------------------------------------------------------------------------------------------------
# the kernel: kernels.causal_linear_attention
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("T, chunk", [(1, None), (17, None), (17, 4), (130, 7), (33, 200)])
def test_kernel_values_match_naive(backend, dtype, T, chunk):
    a, b, v = features(T=T, dtype=dtype)
    out = kernels.causal_linear_attention(a, b, v, backend=backend, chunk_size=chunk)
    ref = K.linear_attention_naive(a, b, v, causal=True)
    assert out.shape == v.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(la.prefix_sum_reference(a, b, v), ref, **TOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("T, chunk", [(19, 4), (64, None), (5, 64)])
def test_kernel_gradients_match_naive(backend, dtype, T, chunk):
    inputs = features(T=T, dtype=dtype, seed=2, requires_grad=True)
    out, g = grads(lambda a, b, v: kernels.causal_linear_attention(a, b, v, backend=backend, chunk_size=chunk), inputs)
    ref, g_ref = grads(lambda a, b, v: K.linear_attention_naive(a, b, v, causal=True), inputs)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for name, x, y in zip(("phi_q", "phi_k", "v"), g, g_ref):
        torch.testing.assert_close(x, y, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    # odd T, M != Dv, chunk 2: the partial last chunk and the carried states in both sweeps
    a, b, v = features(B=1, H=2, T=5, M=3, Dv=2, seed=3, requires_grad=True)
    fn = lambda a, b, v: kernels.causal_linear_attention(a, b, v, backend=backend, chunk_size=2, eps=1e-3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b, v), eps=1e-6, atol=1e-8)


def test_numba_serial_and_parallel_paths_agree(monkeypatch):
    # tiny calls run serially (starting the thread pool costs more than they do); both paths give one result
    a, b, v = features(B=2, H=3, T=70, seed=4, requires_grad=True)
    results = []
    for threshold in (0, 2**62):
        monkeypatch.setattr(la, "SERIAL_WORK", threshold)
        results.append(grads(lambda a, b, v: kernels.causal_linear_attention(a, b, v, backend="numba", chunk_size=16),
                             (a, b, v)))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-14)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-13)


def test_backends_agree_on_a_long_sequence():
    a, b, v = features(B=1, H=2, T=1000, M=16, Dv=8, seed=5)
    t = kernels.causal_linear_attention(a, b, v, backend="torch")
    n = kernels.causal_linear_attention(a, b, v, backend="numba", chunk_size=48)
    torch.testing.assert_close(n, t, **TOL[torch.float64])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_features_give_zeros_not_nan(backend):
    # all-zero features: every denominator is 0 + eps, the output 0 and the gradients finite
    a, b, v = features(B=1, H=1, T=9, seed=6, dtype=torch.float32)
    a = torch.zeros_like(a).requires_grad_(True)
    b = torch.zeros_like(b).requires_grad_(True)
    v.requires_grad_(True)
    out = kernels.causal_linear_attention(a, b, v, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (a, b, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(7)
    a = torch.rand(2, 11, 3, 6, generator=g).transpose(1, 2)  # (B, H, T, M) view of (B, T, H, M)
    b = torch.rand(2, 3, 6, 11, generator=g).transpose(-1, -2)
    v = torch.randn(2, 11, 3, 4, generator=g).transpose(1, 2)
    assert not (a.is_contiguous() or b.is_contiguous() or v.is_contiguous())
    out = kernels.causal_linear_attention(a, b, v, backend=backend, chunk_size=4)
    torch.testing.assert_close(out, K.linear_attention_naive(a, b, v, causal=True), **TOL[torch.float32])


def test_numba_saves_only_linear_memory_for_backward():
    # saved: φq, φk, v, out (B·H·T·(2M + 2Dv) numbers) and den (B·H·T): O(T·D), never the T×T matrix
    B, H, T, M, Dv = 1, 2, 512, 8, 4
    a, b, v = features(B=B, H=H, T=T, M=M, Dv=Dv, dtype=torch.float32, requires_grad=True)
    saved = measure.saved_activation_bytes(lambda a, b, v: kernels.causal_linear_attention(a, b, v, backend="numba"),
                                           a, b, v)
    assert saved == 4 * B * H * T * (2 * M + 2 * Dv + 1)
    assert saved < 4 * B * H * T * T / 10
    assert la.numba_workspace_bytes(T, M, Dv, n_threads=1) == la.numba_workspace_bytes(10 * T, M, Dv, n_threads=1)


def test_kernel_auto_backend_and_half_precision():
    a, b, v = features(T=12, dtype=torch.float32)
    torch.testing.assert_close(kernels.causal_linear_attention(a, b, v),
                               kernels.causal_linear_attention(a, b, v, backend="numba"), rtol=0, atol=0)
    ab, bb, vb = (x.to(torch.bfloat16) for x in (a, b, v))
    out = kernels.causal_linear_attention(ab, bb, vb)  # auto → torch for bfloat16
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), K.linear_attention_naive(a, b, v, causal=True), **TOL[torch.bfloat16])


def test_kernel_bad_input():
    a, b, v = features(T=6, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"phi_q must hold non-negative features.*minimum of -"):
        kernels.causal_linear_attention(a - 0.5, b, v)
    with pytest.raises(ValueError, match=r"phi_k must hold non-negative features.*nan"):
        kernels.causal_linear_attention(a, b.masked_fill(b > 0.9, float("nan")), v)
    with pytest.raises(ValueError, match=r"as many positions as phi_q, got T=6 queries and S=5 keys"):
        kernels.causal_linear_attention(a, b[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match=r"phi_q must have 4 dimensions \(B, H, T, M\), got shape \(3, 6, 6\)"):
        kernels.causal_linear_attention(a[0], b[0], v[0])
    with pytest.raises(ValueError, match=r"head dims differ"):
        kernels.causal_linear_attention(a, b[..., :3], v)
    with pytest.raises(TypeError, match=r"share one dtype"):
        kernels.causal_linear_attention(a, b.double(), v)
    with pytest.raises(ValueError, match=r"eps must be a positive finite number.*got 0.0"):
        kernels.causal_linear_attention(a, b, v, eps=0.0)
    with pytest.raises(TypeError, match=r"eps must be a float, got bool"):
        kernels.causal_linear_attention(a, b, v, eps=True)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int, got 0"):
        kernels.causal_linear_attention(a, b, v, chunk_size=0)
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        kernels.causal_linear_attention(a, b, v, backend="fast")
    with pytest.raises(TypeError, match=r"supports float32 and float64"):
        kernels.causal_linear_attention(*(x.half() for x in (a, b, v)), backend="numba")


@pytest.mark.skipif(kernels.cuda_usable(), reason="a real GPU is present: backend='cuda' works here")
def test_kernel_cuda_without_gpu_names_the_alternatives():
    a, b, v = features(T=4, dtype=torch.float32)
    with pytest.raises((RuntimeError, ValueError)) as ei:
        kernels.causal_linear_attention(a, b, v, backend="cuda")
    assert "'numba'" in str(ei.value) and "NUMBA_ENABLE_CUDASIM" in str(ei.value)


# ------------------------------------------------------------------------------------------------------------
# linear attention (elu + 1) and its RNN form
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_linear_attention_matches_naive_values_and_gradients(causal, dtype):
    inputs = qkv(T=23, D=8, Dv=5, dtype=dtype, requires_grad=True)
    out, g = grads(lambda q, k, v: K.linear_attention(q, k, v, causal=causal), inputs)
    fq = lambda q, k, v: K.linear_attention_naive(K.elu_feature_map(q), K.elu_feature_map(k), v, causal=causal)  # noqa
    ref, g_ref = grads(fq, inputs)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x, y, **tol)


def test_linear_attention_cross_attention_t_ne_s_and_elu_map():
    q, k, v = qkv(T=7, S=19, D=8)
    ref = K.linear_attention_naive(F.elu(q) + 1, F.elu(k) + 1, v)
    torch.testing.assert_close(K.linear_attention(q, k, v), ref, **TOL[torch.float64])
    x = torch.linspace(-30, 5, 101, dtype=torch.float64)
    assert (K.elu_feature_map(x) > 0).all()  # positive: every denominator > 0
    with pytest.raises(ValueError, match=r"causal=True needs as many keys as queries.*T=7, S=19"):
        K.linear_attention(q, k, v, causal=True)


def test_linear_attention_is_causal():
    q, k, v = qkv(B=1, H=2, T=40, D=8, dtype=torch.float32)
    out = K.linear_attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25:] += 3.0
    v2[:, :, 25:] -= 1.0
    out2 = K.linear_attention(q, k2, v2, causal=True)
    torch.testing.assert_close(out[:, :, :25], out2[:, :, :25], rtol=0, atol=1e-6)
    assert (out[:, :, 25:] - out2[:, :, 25:]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rnn_decoding_equals_the_parallel_causal_form(dtype):
    q, k, v = qkv(B=2, H=2, T=31, D=8, Dv=6, dtype=dtype, seed=8)
    parallel = K.linear_attention(q, k, v, causal=True)
    torch.testing.assert_close(K.linear_attention_recurrent(q, k, v), parallel, **TOL[dtype])
    # step by step: the state's size never changes
    rnn = K.RecurrentLinearAttention()
    sizes = []
    for t in range(31):
        out_t = rnn.step(q[:, :, t], k[:, :, t], v[:, :, t])
        torch.testing.assert_close(out_t, parallel[:, :, t], **TOL[dtype])
        sizes.append(rnn.state_bytes())
    assert len(set(sizes)) == 1 and sizes[0] == 2 * 2 * (8 * 6 + 8) * q.element_size()
    assert rnn.t == 31
    rnn.reset()
    assert rnn.state_bytes() == 0 and rnn.t == 0


def test_rnn_with_performer_features_equals_the_kernel():
    q, k, v = qkv(B=1, H=2, T=20, D=8, seed=9, scale=0.5)
    W = K.gaussian_projection(16, 8, seed=1, dtype=torch.float64)
    fq = K.favor_features(q, W, stabilizer="row")
    fk = K.favor_features(k, W, stabilizer="bound")
    rnn = K.RecurrentLinearAttention(feature_map=None)
    steps = torch.stack([rnn.step(fq[:, :, t], fk[:, :, t], v[:, :, t]) for t in range(20)], dim=2)
    torch.testing.assert_close(steps, K.performer_attention(q, k, v, causal=True, projection=W), **TOL[torch.float64])


def test_rnn_bad_input():
    rnn = K.RecurrentLinearAttention()
    q, k, v = qkv(B=1, H=2, T=3, D=4)
    with pytest.raises(ValueError, match=r"q_t must be a \(B, H, D\) tensor"):
        rnn.step(q, k[:, :, 0], v[:, :, 0])
    rnn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    with pytest.raises(ValueError, match=r"shapes changed mid-sequence"):
        rnn.step(q[:, :1, 0], k[:, :1, 0], v[:, :1, 0])
    with pytest.raises(TypeError, match=r"feature_map must be callable"):
        K.RecurrentLinearAttention(feature_map="elu")
    with pytest.raises(ValueError, match=r"need S == T"):
        K.linear_attention_recurrent(*qkv(T=3, S=4))


# ------------------------------------------------------------------------------------------------------------
# Performer: FAVOR+
# ------------------------------------------------------------------------------------------------------------


def test_gaussian_projection_is_seeded_and_orthogonal_in_blocks():
    W = K.gaussian_projection(20, 8, seed=3, dtype=torch.float64)
    assert W.shape == (20, 8)
    torch.testing.assert_close(W, K.gaussian_projection(20, 8, seed=3, dtype=torch.float64), rtol=0, atol=0)
    assert not torch.equal(W, K.gaussian_projection(20, 8, seed=4, dtype=torch.float64))
    for block in (W[:8], W[8:16], W[16:]):  # rows of one block: exactly orthogonal directions
        u = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(u @ u.T, torch.eye(len(u), dtype=torch.float64), atol=1e-12, rtol=0)
    iid = K.gaussian_projection(20, 8, orthogonal=False, seed=3, dtype=torch.float64)
    u = iid[:8] / iid[:8].norm(dim=1, keepdim=True)
    assert (u @ u.T - torch.eye(8, dtype=torch.float64)).abs().max() > 0.05
    # row lengths: χ_8, not 1 (each row is marginally N(0, I)): mean squared length ≈ d over many rows
    big = K.gaussian_projection(4000, 8, seed=0, dtype=torch.float64)
    assert abs((big ** 2).sum(1).mean().item() - 8.0) < 0.3


def test_favor_features_estimate_the_softmax_kernel_without_bias():
    # E[φ(x)·φ(y)] = exp(x·y/√d): with many features the estimate is close for moderate norms
    q, k, _ = qkv(B=1, H=1, T=6, D=8, scale=0.5, seed=10)
    W = K.gaussian_projection(20000, 8, seed=0, dtype=torch.float64)
    est = K.favor_features(q, W, stabilizer="none") @ K.favor_features(k, W, stabilizer="none").transpose(-1, -2)
    exact = torch.exp(q @ k.transpose(-1, -2) / 8 ** 0.5)
    torch.testing.assert_close(est, exact, rtol=0.05, atol=0)
    assert (K.favor_features(q, W) > 0).all()  # positive features: no negative weights, unlike sin/cos features


def test_favor_stabilizers_cancel_in_the_attention_ratio():
    q, k, v = qkv(B=1, H=2, T=16, D=8, seed=11)
    W = K.gaussian_projection(32, 8, seed=2, dtype=torch.float64)
    plain = K.linear_attention_naive(K.favor_features(q, W, stabilizer="none"), K.favor_features(k, W, stabilizer="none"),
                                     v, eps=1e-300)
    for causal in (False, True):
        ref = plain if not causal else K.linear_attention_naive(
            K.favor_features(q, W, stabilizer="none"), K.favor_features(k, W, stabilizer="none"), v, causal=True,
            eps=1e-300)
        out = K.performer_attention(q, k, v, causal=causal, projection=W, eps=1e-300)
        torch.testing.assert_close(out, ref, **TOL[torch.float64])


def test_favor_error_falls_with_features_and_orthogonal_beats_iid():
    # the Performer's claims, averaged over seeds: error vs exact softmax attention falls as m grows, and
    # orthogonal features have a lower error than iid ones (q, k of moderate norm, where the estimator is usable)
    q, k, v = qkv(B=1, H=2, T=48, D=16, scale=0.5, seed=12)
    exact = softmax_attention(q, k, v)

    def err(m, orthogonal):
        e = [((K.performer_attention(q, k, v, n_features=m, orthogonal=orthogonal, seed=s) - exact).norm()
              / exact.norm()).item() for s in range(24)]
        return sum(e) / len(e)

    ms = [8, 32, 128, 512]
    orth = [err(m, True) for m in ms]
    iid = [err(m, False) for m in ms]
    assert all(a > b for a, b in zip(orth, orth[1:])), orth
    assert all(a > b for a, b in zip(iid, iid[1:])), iid
    assert orth[-1] < 0.35 * orth[0] and orth[-1] < 0.2
    assert sum(orth) < sum(iid) and orth[0] < iid[0] and orth[1] < iid[1], (orth, iid)


def test_performer_causal_uses_the_kernel_and_does_not_leak():
    q, k, v = qkv(B=1, H=2, T=30, D=8, seed=13, scale=0.7, dtype=torch.float32)
    W = K.gaussian_projection(24, 8, seed=0)
    out = K.performer_attention(q, k, v, causal=True, projection=W)
    ref = K.linear_attention_naive(K.favor_features(q, W), K.favor_features(k, W, stabilizer="bound"), v, causal=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] *= 5.0  # huge future keys: a data-dependent key stabiliser would change past outputs
    v2[:, :, 20:] += 1.0
    out2 = K.performer_attention(q, k2, v2, causal=True, projection=W)
    torch.testing.assert_close(out[:, :, :20], out2[:, :, :20], rtol=0, atol=1e-6)


def test_performer_gradients_match_naive():
    inputs = qkv(B=1, H=2, T=13, D=4, seed=14, scale=0.5, requires_grad=True)
    W = K.gaussian_projection(6, 4, seed=0, dtype=torch.float64)

    def naive(q, k, v):
        return K.linear_attention_naive(K.favor_features(q, W), K.favor_features(k, W, stabilizer="bound"), v,
                                        causal=True)

    out, g = grads(lambda q, k, v: K.performer_attention(q, k, v, causal=True, projection=W), inputs)
    ref, g_ref = grads(naive, inputs)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x, y, **TOL[torch.float64])


def test_performer_bad_input():
    q, k, v = qkv(T=5, D=4)
    with pytest.raises(ValueError, match=r"n_features must be a positive int, got 0"):
        K.performer_attention(q, k, v, n_features=0)
    with pytest.raises(ValueError, match=r"n_features must be a positive int, got -3"):
        K.gaussian_projection(-3, 4)
    with pytest.raises(TypeError, match=r"n_features must be an int, got float"):
        K.performer_attention(q, k, v, n_features=8.0)
    with pytest.raises(ValueError, match=r"projection must be a \(n_features, D=4\) tensor, got \(8, 5\)"):
        K.performer_attention(q, k, v, projection=torch.randn(8, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"n_features=4 disagrees with projection's 8 rows"):
        K.performer_attention(q, k, v, n_features=4, projection=torch.randn(8, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"stabilizer must be one of"):
        K.favor_features(q, torch.randn(8, 4, dtype=torch.float64), stabilizer="max")
    with pytest.raises(ValueError, match=r"mask is not supported"):
        K.performer_attention(q, k, v, mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"causal must be a bool"):
        K.performer_attention(q, k, v, causal=1)


# ------------------------------------------------------------------------------------------------------------
# clustered attention
# ------------------------------------------------------------------------------------------------------------


def test_clustered_with_one_cluster_per_query_is_exact_attention():
    inputs = qkv(B=2, H=2, T=19, S=23, D=8, Dv=5, seed=15, requires_grad=True)
    out, g = grads(lambda q, k, v: K.clustered_attention(q, k, v, n_clusters=19), inputs)
    ref, g_ref = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), inputs)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x, y, **TOL[torch.float64])
    # more clusters than queries: capped at T, still exact
    torch.testing.assert_close(K.clustered_attention(*inputs, n_clusters=100), ref, **TOL[torch.float64])


def test_clustered_error_falls_with_clusters_and_one_cluster_is_the_mean_query():
    q, k, v = qkv(B=1, H=2, T=64, D=8, seed=16)
    exact = softmax_attention(q, k, v)
    errs = [((K.clustered_attention(q, k, v, n_clusters=c) - exact).norm() / exact.norm()).item() for c in (1, 8, 32, 64)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-10, errs
    one = K.clustered_attention(q, k, v, n_clusters=1)
    mean_q = q.mean(2, keepdim=True)
    torch.testing.assert_close(one, softmax_attention(mean_q, k, v).expand_as(one), **TOL[torch.float64])


def test_attention_weights_of_the_model_api():
    q, k, v = qkv(T=9, D=4)
    out, w, assign = K.clustered_attention(q, k, v, n_clusters=3, return_weights=True, return_clusters=True)
    assert w.shape == (2, 3, 9, 9) and assign.shape == (2, 3, 9)
    torch.testing.assert_close(w @ v, out, **TOL[torch.float64])  # each query's row is its centroid's weights
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 9, dtype=torch.float64), **TOL[torch.float64])
    for fn in (K.linear_attention, K.performer_attention):
        with pytest.raises(ValueError, match=r"return_weights=True would need the T×S matrix"):
            fn(q, k, v, return_weights=True)


def test_kmeans_finds_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(10)
    x = (centers[labels] + 0.1 * torch.randn(30, 2, generator=g, dtype=torch.float64)).view(1, 1, 30, 2)
    c, assign = K.kmeans(x, 3, seed=1)
    a = assign[0, 0]
    for lab in range(3):  # every true cluster maps to one k-means cluster, and different ones to different ones
        assert (a[labels == lab] == a[labels == lab][0]).all()
    assert len(set(a[labels == lab][0].item() for lab in range(3))) == 3
    c2, assign2 = K.kmeans(x, 3, seed=1)
    assert torch.equal(c, c2) and torch.equal(assign, assign2)


def test_clustered_bad_input():
    q, k, v = qkv(T=6, D=4)
    with pytest.raises(ValueError, match=r"causal=True is impossible: a cluster mixes queries"):
        K.clustered_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"n_clusters must be a positive int, got 0"):
        K.clustered_attention(q, k, v, n_clusters=0)
    with pytest.raises(ValueError, match=r"mask is not supported"):
        K.clustered_attention(q, k, v, mask=torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"n_clusters must be ≤ the number of points T=6, got 7"):
        K.kmeans(q, 7)
    with pytest.raises(ValueError, match=r"iterations must be an int ≥ 0"):
        K.kmeans(q, 2, iterations=-1)


# ------------------------------------------------------------------------------------------------------------
# improved clustered attention (Vyas et al. 2020, §3.3)
# ------------------------------------------------------------------------------------------------------------


def _improved_oracle(q, k, v, n_clusters, topk, iterations=10, seed=0):
    """The paper's A^t written out query by query, from the same k-means assignment."""
    _, assign = K.kmeans(q, n_clusters, iterations=iterations, seed=seed)
    B, H, T, D = q.shape
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                members = assign[b, h] == assign[b, h, i]
                centroid = q[b, h][members].mean(0)
                a_c = torch.softmax(k[b, h] @ centroid / D ** 0.5, dim=0)
                top = a_c.topk(topk).indices
                a_t = a_c.clone()
                a_t[top] = a_c[top].sum() * torch.softmax(k[b, h][top] @ q[b, h, i] / D ** 0.5, dim=0)
                out[b, h, i] = a_t @ v[b, h]
    return out


def test_improved_clustered_matches_the_papers_formula_and_its_weights():
    q, k, v = qkv(B=1, H=2, T=13, S=11, D=4, Dv=3, seed=21)
    out, w, assign = K.improved_clustered_attention(q, k, v, n_clusters=3, topk=4, return_weights=True,
                                                    return_clusters=True)
    torch.testing.assert_close(out, _improved_oracle(q, k, v, 3, 4), **TOL[torch.float64])
    torch.testing.assert_close(w @ v, out, **TOL[torch.float64])
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 13, dtype=torch.float64), **TOL[torch.float64])
    # the same clusters as plain clustered attention
    _, _, plain_assign = K.clustered_attention(q, k, v, n_clusters=3, return_weights=True, return_clusters=True)
    assert torch.equal(assign, plain_assign)


def test_improved_clustered_with_topk_S_is_exact_attention_values_and_gradients():
    inputs = qkv(B=2, H=2, T=19, S=23, D=8, Dv=5, seed=22, requires_grad=True)
    out, g = grads(lambda q, k, v: K.improved_clustered_attention(q, k, v, n_clusters=3, topk=23), inputs)
    ref, g_ref = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), inputs)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x, y, **TOL[torch.float64])
    # topk beyond S is capped at S: still exact
    torch.testing.assert_close(K.improved_clustered_attention(*inputs, n_clusters=2, topk=100), ref,
                               **TOL[torch.float64])


def test_improved_clustered_error_is_below_plain_clustered_and_falls_with_topk():
    q, k, v = qkv(B=1, H=2, T=64, D=8, seed=23)
    exact = softmax_attention(q, k, v)

    def err(out):
        return ((out - exact).norm() / exact.norm()).item()

    plain = err(K.clustered_attention(q, k, v, n_clusters=8))
    improved = [err(K.improved_clustered_attention(q, k, v, n_clusters=8, topk=t)) for t in (4, 16, 32, 64)]
    assert plain > improved[0] > improved[1] > improved[2] > improved[3], (plain, improved)
    assert improved[3] < 1e-10
    # k = 1: the one key keeps exactly the weight the centroid gave it: plain clustered attention again
    torch.testing.assert_close(K.improved_clustered_attention(q, k, v, n_clusters=8, topk=1),
                               K.clustered_attention(q, k, v, n_clusters=8), **TOL[torch.float64])


def test_improved_clustered_float32_and_gradients_are_finite():
    q, k, v = qkv(B=2, H=2, T=17, D=8, dtype=torch.float32, seed=24, requires_grad=True)
    out = K.improved_clustered_attention(q, k, v, n_clusters=4, topk=5)
    out.square().sum().backward()
    assert out.dtype == torch.float32 and out.shape == (2, 2, 17, 8)
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))


def test_improved_clustered_bad_input():
    q, k, v = qkv(T=6, D=4)
    fn = K.improved_clustered_attention
    with pytest.raises(ValueError, match=r"causal=True is impossible"):
        fn(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"topk must be a positive int, got 0"):
        fn(q, k, v, topk=0)
    with pytest.raises(ValueError, match=r"n_clusters must be a positive int, got -1"):
        fn(q, k, v, n_clusters=-1)
    with pytest.raises(ValueError, match=r"mask is not supported"):
        fn(q, k, v, mask=torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"causal must be a bool"):
        fn(q, k, v, causal=1)


# ------------------------------------------------------------------------------------------------------------
# registry and the model
# ------------------------------------------------------------------------------------------------------------


def test_registered_names():
    assert {"linear", "performer", "clustered"} <= set(available())
    assert get("linear") is K.linear_attention and get("clustered") is K.clustered_attention
    assert get("performer") is K.PerformerAttention
    assert get("clustered_improved") is K.improved_clustered_attention


@pytest.mark.parametrize("name, causal, kwargs", [
    ("linear", True, {}),
    ("linear", False, {}),
    ("performer", True, {"n_features": 16, "redraw_every": 3, "seed": 5}),
    ("clustered", False, {"n_clusters": 4}),
    ("clustered_improved", False, {"n_clusters": 4, "topk": 4}),
])
def test_model_trains_with_each_variant(name, causal, kwargs):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=12, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=32, causal=causal,
                            attention=name, attention_kwargs=kwargs)
    model = Transformer(cfg)
    history = train(model, data.make_task("copy", 16, 12, seed=0), steps=25, lr=3e-3, progress=False)
    assert history["loss"][-1] < history["loss"][0] - 0.3, history["loss"][::6]
    if name == "performer":
        att = model.blocks[0].attn.attn_fn
        assert att.calls == 25 and att.draws == 8  # redrawn before calls 3, 6, …, 24
        W = K.gaussian_projection(16, 16, seed=5 + 8)
        torch.testing.assert_close(att.projection, W, rtol=0, atol=0)


def test_performer_module_defaults_and_bad_kwargs():
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, n_heads=2, attention="performer")
    a, b = K.PerformerAttention(cfg), K.PerformerAttention(cfg)
    assert a.n_features == K.default_n_features(16) == round(16 * __import__("math").log(16))
    assert not torch.equal(a.projection, b.projection)  # seed=None: each layer draws its own features
    assert "projection" in a.state_dict() and not list(a.parameters())
    with pytest.raises(ValueError, match=r"n_features must be a positive int, got 0"):
        K.PerformerAttention(cfg.replace(attention_kwargs={"n_features": 0}))
    with pytest.raises(TypeError, match=r"unknown attention_kwargs \['window'\]"):
        K.PerformerAttention(cfg.replace(attention_kwargs={"window": 3}))
    with pytest.raises(ValueError, match=r"redraw_every must be a positive int"):
        K.PerformerAttention(cfg.replace(attention_kwargs={"redraw_every": -1}))


def test_linear_attention_bad_input():
    q, k, v = qkv(T=5, D=4)
    with pytest.raises(ValueError, match=r"mask is not supported: kernel attention never forms the T×S matrix"):
        K.linear_attention(q, k, v, mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"causal must be a bool, got str"):
        K.linear_attention(q, k, v, causal="yes")
    with pytest.raises(ValueError, match=r"k and v must have the same length"):
        K.linear_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match=r"eps must be a positive finite number"):
        K.linear_attention_naive(q.exp(), k.exp(), v, eps=-1.0)
