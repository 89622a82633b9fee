"""Low-rank attention (chapter 17): Linformer, Nyströmformer, Synthesizer against their oracles.

Oracles: the Eckart–Young bound (the truncated SVD is the best rank-k approximation: no rank-k method beats it);
Nyström with as many landmarks as tokens is exact softmax attention (``F.scaled_dot_product_attention``), up to the
pseudo-inverse's accuracy; the iterative pseudo-inverse converges to ``torch.linalg.pinv``; Linformer with k = n
and E = F = I (or any permutation) is exact attention; the efficient right-to-left products equal the plain
T×S-matrix references (values and gradients); causal methods do not depend on the future, Linformer does.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from _oracles import TOL, qkv
from effedu import data
from effedu.attention import available, is_module_factory
from effedu.attention import get as get_attention
from effedu.attention import lowrank as LR
from effedu.general import sharing as S
from effedu.measure import count_parameters
from effedu.model import Transformer, TransformerConfig
from effedu.train import train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: one thread is as fast and does not stall when the machine is busy (restored afterwards)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def eye_projection(n, dtype=torch.float64):
    return torch.eye(n, dtype=dtype)


def random_projection(k, n, dtype=torch.float64, seed=0, heads=None):
    g = torch.Generator().manual_seed(seed)
    shape = (k, n) if heads is None else (heads, k, n)
    return (torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(n)).to(dtype)


def small(**kw):
    cfg = dict(vocab_size=12, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=24, causal=False)
    cfg.update(kw)
    return TransformerConfig(**cfg)


# ---------------------------------------------------------------------------------------------------------------
# the SVD yardstick
# ---------------------------------------------------------------------------------------------------------------


def test_truncated_svd_attains_the_bound_and_random_rank_k_matrices_do_not_beat_it():
    q, k, _ = qkv(B=1, H=2, T=20, D=8, dtype=torch.float64, scale=1.5)
    A = LR.softmax_attention_matrix(q, k)
    g = torch.Generator().manual_seed(3)
    for rank in (1, 3, 7, 20):
        bound = LR.best_rank_k_error(A, rank)
        torch.testing.assert_close(LR.approximation_error(LR.rank_k_approximation(A, rank), A), bound)
        spectral = LR.best_rank_k_error(A, rank, norm="spectral")
        torch.testing.assert_close(
            LR.approximation_error(LR.rank_k_approximation(A, rank), A, norm="spectral"), spectral)
        for _ in range(5):
            M = torch.randn(1, 2, 20, rank, generator=g, dtype=torch.float64) @ torch.randn(
                1, 2, rank, 20, generator=g, dtype=torch.float64) * 0.05 + A
            M = LR.rank_k_approximation(M, rank)  # some rank-k matrix near A, not the optimal one
            assert (LR.approximation_error(M, A) >= bound - 1e-12).all()
    assert (LR.best_rank_k_error(A, 20) < 1e-12).all()  # full rank: exact
    # the absolute error is (Σ_{i>k} σ_i²)^½ with σ from numpy's SVD
    import numpy as np
    s = np.linalg.svd(A[0, 0].numpy(), compute_uv=False)
    assert abs(float(LR.best_rank_k_error(A, 4, relative=False)[0, 0]) - float(np.sqrt((s[4:] ** 2).sum()))) < 1e-12


def test_energy_rank_counts_singular_values():
    A = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64))  # σ² shares: 9/14, 4/14, 1/14
    assert int(LR.energy_rank(A, 0.5)) == 1
    assert int(LR.energy_rank(A, 0.9)) == 2
    assert int(LR.energy_rank(A, 1.0)) == 3
    uniform = torch.full((1, 16, 16), 1 / 16)  # uniform attention has rank 1
    assert int(LR.energy_rank(uniform, 0.99)) == 1


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 15])
def test_every_method_is_above_the_svd_bound(rank):
    q, k, _ = qkv(B=2, H=2, T=15, D=8, dtype=torch.float64, scale=1.2)
    A = LR.softmax_attention_matrix(q, k)
    bound = LR.best_rank_k_error(A, rank)
    approximations = {
        "linformer": LR.linformer_attention_matrix(q, k, random_projection(rank, 15, seed=1),
                                                   random_projection(rank, 15, seed=2)),
        "linformer per head": LR.linformer_attention_matrix(q, k, random_projection(rank, 15, seed=3, heads=2)),
        "nystrom exact": LR.nystrom_attention_matrix(q, k, landmarks=rank, pinv="exact"),
        "nystrom iterative": LR.nystrom_attention_matrix(q, k, landmarks=rank, pinv="iterative"),
    }
    for name, A_hat in approximations.items():
        assert torch.linalg.matrix_rank(A_hat).max() <= rank, name
        err = LR.approximation_error(A_hat, A)
        assert (err >= bound - 1e-10).all(), (name, err, bound)
        err2 = LR.approximation_error(A_hat, A, norm="spectral")
        assert (err2 >= LR.best_rank_k_error(A, rank, norm="spectral") - 1e-10).all(), name


# ---------------------------------------------------------------------------------------------------------------
# Nyström
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 6, 13])
def test_nystrom_with_one_landmark_per_token_is_exact_softmax_attention(dtype, T):
    q, k, v = qkv(B=2, H=3, T=T, D=8, dtype=dtype)
    out = LR.nystrom_attention(q, k, v, landmarks=T, pinv="exact")
    ref = F.scaled_dot_product_attention(q, k, v)
    tol = dict(atol=1e-9, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out, ref, **tol)
    # the implied matrix is A A⁺ A = A
    _, W = LR.nystrom_attention(q, k, v, landmarks=T, pinv="exact", return_weights=True)
    torch.testing.assert_close(W, LR.softmax_attention_matrix(q, k), **tol)


def test_nystrom_iterative_with_enough_steps_is_exact_too():
    q, k, v = qkv(B=1, H=2, T=10, D=8, dtype=torch.float64)
    out = LR.nystrom_attention(q, k, v, landmarks=10, pinv="iterative", pinv_iters=60)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-9, rtol=1e-8)


def softmax_square(m, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, m, 8, generator=g, dtype=torch.float64) * scale
    y = torch.randn(2, 3, m, 8, generator=g, dtype=torch.float64) * scale
    return torch.softmax(x @ y.transpose(-1, -2) / math.sqrt(8), dim=-1).to(dtype)


@pytest.mark.parametrize("m", [1, 4, 9, 16])
def test_iterative_pinv_converges_to_torch_pinv(m):
    A = softmax_square(m, seed=m)
    ref = torch.linalg.pinv(A)
    errors = [float((LR.iterative_pinv(A, it) - ref).norm() / ref.norm()) for it in (0, 2, 6, 12, 40)]
    assert errors[-1] < 1e-9, errors
    assert all(b <= a * 1.0001 for a, b in zip(errors, errors[1:])), errors  # never worse with more steps
    Z = LR.iterative_pinv(A, 40)
    torch.testing.assert_close(A @ Z @ A, A, atol=1e-10, rtol=1e-9)  # a Moore–Penrose condition


def test_iterative_pinv_finds_the_pseudo_inverse_of_a_singular_matrix():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(6, 2, generator=g, dtype=torch.float64)
    A = U @ U.T  # rank 2, singular
    # a dozen steps reach A⁺ ...
    torch.testing.assert_close(LR.iterative_pinv(A, 12), torch.linalg.pinv(A), atol=1e-9, rtol=1e-8)
    # ... but there is no cut-off like pinv's rtol: round-off in the null space grows 3.25× per step (documented)
    assert (LR.iterative_pinv(A, 40) - torch.linalg.pinv(A)).abs().max() > 1.0


def test_iterative_pinv_float32_and_iteration_count_zero():
    A = softmax_square(8, seed=1, dtype=torch.float32)
    Z0 = LR.iterative_pinv(A, 0)
    # Z₀ = Aᵀ / (‖A‖₁‖A‖∞), per matrix
    n1 = A.abs().sum(-2).amax(-1)
    ninf = A.abs().sum(-1).amax(-1)
    torch.testing.assert_close(Z0, A.transpose(-1, -2) / (n1 * ninf)[..., None, None])
    torch.testing.assert_close(LR.iterative_pinv(A, 30), torch.linalg.pinv(A), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("T,m", [(12, 4), (13, 4), (7, 3), (5, 5), (9, 1)])
def test_segment_means_uneven_segments(T, m):
    x = torch.randn(2, 3, T, 5, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    b = LR.segment_boundaries(T, m)
    assert b[0] == 0 and b[-1] == T and len(b) == m + 1
    sizes = [b[i + 1] - b[i] for i in range(m)]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    ref = torch.stack([x[:, :, b[i]:b[i + 1]].mean(2) for i in range(m)], dim=2)
    torch.testing.assert_close(LR.segment_means(x, m), ref)


@pytest.mark.parametrize("T,m", [(16, 4), (17, 4), (11, 3)])
@pytest.mark.parametrize("pinv", ["exact", "iterative"])
def test_nystrom_efficient_equals_reference_values_and_gradients(T, m, pinv):
    q, k, v = qkv(B=2, H=2, T=T, D=6, dtype=torch.float64, requires_grad=True)
    out = LR.nystrom_attention(q, k, v, landmarks=m, pinv=pinv)
    ref = LR.nystrom_reference(q, k, v, landmarks=m, pinv=pinv)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)


def test_nystrom_cross_attention_and_default_landmarks():
    q, k, v = qkv(B=1, H=2, T=9, S=20, D=8, Dv=3, dtype=torch.float64)
    assert LR.nystrom_attention(q, k, v, landmarks=4).shape == (1, 2, 9, 3)
    # default: min(64, T, S) landmarks — here T = 9, so exact with the exact pinv... on the query side; the
    # key landmarks average pairs of keys, so only the shape is checked against SDPA's
    assert LR.nystrom_attention(q, k, v).shape == F.scaled_dot_product_attention(q, k, v).shape
    q, k, v = qkv(B=1, H=2, T=12, D=8, dtype=torch.float64)
    torch.testing.assert_close(LR.nystrom_attention(q, k, v, pinv="exact"), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-9, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# Linformer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 7, 16])
def test_linformer_with_identity_projections_is_dense_attention(dtype, T):
    q, k, v = qkv(B=2, H=3, T=T, D=8, dtype=dtype)
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(LR.linformer_attention(q, k, v, eye_projection(T, dtype)), ref, **TOL[dtype])
    torch.testing.assert_close(LR.linformer_attention(q, k, v, eye_projection(T, dtype), eye_projection(T, dtype)),
                               ref, **TOL[dtype])
    # E = F = Π, any permutation: softmax(Q Kᵀ Πᵀ) Π V = softmax(Q Kᵀ) V
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(0))
    P = eye_projection(T, dtype)[perm]
    torch.testing.assert_close(LR.linformer_attention(q, k, v, P, P), ref, **TOL[dtype])
    # per-head identities (H, n, n), and n > S: a shorter sequence uses the first S columns (zero padding)
    E = torch.eye(T, T + 5, dtype=dtype).expand(3, T, T + 5).contiguous()
    torch.testing.assert_close(LR.linformer_attention(q, k, v, E), ref, **TOL[dtype])


def test_linformer_module_with_identity_projections_inside_the_model_equals_dense():
    torch.manual_seed(0)
    cfg = small(attention_kwargs={"rank": 24, "share": "none"}, attention="linformer")
    lin = Transformer(cfg).double()
    dense = Transformer(small()).double()
    dense.load_state_dict({k: v for k, v in lin.state_dict().items() if "projection" not in k})
    with torch.no_grad():
        for p in lin.parameters():
            if p.shape == (24, 24):
                p.copy_(torch.eye(24, dtype=torch.float64))
    tokens = torch.randint(0, 12, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lin(tokens), dense(tokens), **TOL[torch.float64])


@pytest.mark.parametrize("heads", [None, 2])
def test_linformer_efficient_equals_reference_values_and_gradients(heads):
    q, k, v = qkv(B=2, H=2, T=11, D=6, dtype=torch.float64, requires_grad=True)
    E = random_projection(4, 15, seed=1, heads=heads).requires_grad_(True)
    Fm = random_projection(4, 15, seed=2, heads=heads).requires_grad_(True)
    out = LR.linformer_attention(q, k, v, E, Fm)
    ref = LR.linformer_reference(q, k, v, E, Fm)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, E, Fm), g), torch.autograd.grad(ref, (q, k, v, E, Fm), g)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    # the first S columns only: columns beyond S get no gradient
    gE = torch.autograd.grad(LR.linformer_attention(q, k, v, E, Fm).sum(), E)[0]
    assert gE[..., 11:].abs().max() == 0 and gE[..., :11].abs().max() > 0


def test_linformer_weights_are_over_k_projected_keys():
    q, k, v = qkv(B=1, H=2, T=9, D=4)
    out, w = LR.linformer_attention(q, k, v, random_projection(3, 9, dtype=torch.float32), return_weights=True)
    assert w.shape == (1, 2, 9, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 9))


@pytest.mark.parametrize("mode", S.PROJECTION_MODES)
def test_linformer_sharing_modes_match_the_closed_form_of_chapter_04(mode):
    cfg = small(n_layers=3)
    torch.manual_seed(0)
    model = Transformer(LR.linformer_config(cfg, 6, mode, seed=0))
    projections = {id(m.projection): m.projection for m in model.modules() if isinstance(m, LR.LinformerAttention)}
    n_proj = sum(count_parameters(p) for p in projections.values())
    assert n_proj == S.linformer_projection_parameter_count(3, 4, 24, 6, mode)
    total_plain = count_parameters(Transformer(cfg))
    assert count_parameters(model) == total_plain + n_proj
    attn = [b.attn.attn_fn for b in model.blocks]
    E0, F0 = attn[0].matrices()
    if mode in ("key-value", "layerwise"):
        assert E0 is F0
    if mode == "layerwise":
        assert all(a.projection is attn[0].projection for a in attn)
    else:
        assert attn[1].projection is not attn[0].projection
    assert E0.dim() == (3 if mode == "none" else 2)


def test_linformer_initialisation_is_seeded_and_differs_per_layer():
    def first_matrices():
        torch.manual_seed(7)
        model = Transformer(LR.linformer_config(small(), 6))
        return [b.attn.attn_fn.matrices()[0].detach().clone() for b in model.blocks]

    a, b = first_matrices(), first_matrices()
    assert all(torch.equal(x, y) for x, y in zip(a, b))      # reproducible after torch.manual_seed
    assert not torch.equal(a[0], a[1])                        # but the layers start different
    fixed = Transformer(LR.linformer_config(small(), 6, seed=3))
    assert torch.equal(fixed.blocks[0].attn.attn_fn.matrices()[0], fixed.blocks[1].attn.attn_fn.matrices()[0])


def test_tie_projections_shares_across_layers_and_gradients_accumulate():
    torch.manual_seed(0)
    model = LR.tie_projections(Transformer(LR.linformer_config(small(n_layers=3), 5, "key-value", seed=1)))
    attn = [b.attn.attn_fn for b in model.blocks]
    assert all(a.projection is attn[0].projection for a in attn)
    assert sum(p.numel() for p in attn[0].projection.parameters()) == 5 * 24
    batch = data.make_task("sort", 2, 24, seed=0)
    torch.nn.functional.cross_entropy(model(batch.inputs).flatten(0, 1), batch.targets.flatten(),
                                      ignore_index=-100).backward()
    assert attn[0].projection.matrices[0].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no LinformerAttention"):
        LR.tie_projections(Transformer(small()))


# ---------------------------------------------------------------------------------------------------------------
# the causal leak
# ---------------------------------------------------------------------------------------------------------------


def test_linformer_leaks_the_future_and_causal_dense_does_not():
    q, k, v = qkv(B=1, H=2, T=10, D=8, dtype=torch.float64)
    E, Fm = random_projection(4, 10, seed=1), random_projection(4, 10, seed=2)
    lin = LR.dependence_matrix(lambda q, k, v: LR.linformer_attention(q, k, v, E, Fm), q, k, v)
    dense_causal = LR.dependence_matrix(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                        q, k, v)
    upper = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)
    assert dense_causal[upper].max() == 0 and dense_causal[~upper].min() > 0
    assert lin[upper].min() > 1e-6  # every position depends on every future position
    nys = LR.dependence_matrix(lambda q, k, v: LR.nystrom_attention(q, k, v, landmarks=2), q, k, v)
    assert nys[upper].min() > 1e-6
    # the output at position 0 changes when the last token changes
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 1.0
    v2[:, :, -1] += 1.0
    change = (LR.linformer_attention(q, k2, v2, E, Fm) - LR.linformer_attention(q, k, v, E, Fm))[:, :, 0]
    assert change.abs().max() > 1e-3


def test_linformer_model_output_at_the_first_position_sees_the_last_token():
    torch.manual_seed(0)
    model = Transformer(LR.linformer_config(small(), 6)).eval()
    tokens = torch.randint(0, 12, (1, 24), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 12
    with torch.no_grad():
        diff = (model(changed) - model(tokens))[0, 0].abs().max()
    assert diff > 1e-6


def test_causal_requests_are_refused_with_the_reason():
    q, k, v = qkv(T=8)
    with pytest.raises(ValueError, match="Linformer cannot be causal.*future"):
        LR.linformer_attention(q, k, v, random_projection(4, 8, dtype=torch.float32), causal=True)
    with pytest.raises(ValueError, match="Linformer cannot be causal.*causal=False"):
        Transformer(small(attention="linformer", causal=True))
    with pytest.raises(ValueError, match="Nyströmformer cannot be causal.*future"):
        LR.nystrom_attention(q, k, v, landmarks=2, causal=True)
    with pytest.raises(ValueError, match="mask is not supported by Linformer"):
        LR.linformer_attention(q, k, v, random_projection(4, 8, dtype=torch.float32),
                               mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask is not supported by Nyström"):
        LR.nystrom_attention(q, k, v, landmarks=2, mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="causal must be a bool"):
        LR.nystrom_attention(q, k, v, causal=1)


# ---------------------------------------------------------------------------------------------------------------
# Synthesizer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", [("synthesizer_dense", {}), ("synthesizer_dense", {"hidden": 5}),
                                     ("synthesizer_random", {}), ("synthesizer_random", {"rank": 3}),
                                     ("synthesizer_random", {"trainable": False})])
@pytest.mark.parametrize("causal", [False, True])
def test_synthesizer_shapes_gradients_and_causality(name, kw, causal):
    cfg = small(attention=name, attention_kwargs=dict(kw, seed=0), causal=causal)
    mod = get_attention(name)(cfg).double()
    q, k, v = qkv(B=2, H=4, T=13, D=8, Dv=5, dtype=torch.float64, requires_grad=True)
    out, w = mod(q, k, v, causal=causal, return_weights=True)
    assert out.shape == (2, 4, 13, 5) and w.shape == (2, 4, 13, 13)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 13, dtype=torch.float64))
    torch.testing.assert_close(out, w @ v)
    out.square().sum().backward()
    assert q.grad is not None if name == "synthesizer_dense" else q.grad is None
    assert k.grad is None  # no query–key interaction
    assert v.grad.abs().sum() > 0
    params = list(mod.parameters())
    if kw.get("trainable") is False:
        assert params == [] and len(list(mod.buffers())) == 1
    else:
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # changing the keys changes nothing
    with torch.no_grad():
        torch.testing.assert_close(mod(q, k * 3 + 1, v, causal=causal), out)
    dep = LR.dependence_matrix(lambda q, k, v: mod(q, k, v, causal=causal), q.detach(), k.detach(), v.detach())
    upper = torch.triu(torch.ones(13, 13, dtype=torch.bool), diagonal=1)
    assert (dep[upper].max() == 0) if causal else (dep[upper].min() > 0)


def test_factorised_random_synthesizer_has_low_rank_scores_and_dense_counts_parameters():
    mod = get_attention("synthesizer_random")(small(attention_kwargs={"rank": 3, "seed": 0})).double()
    R = mod.score_matrix()
    assert R.shape == (4, 24, 24) and int(torch.linalg.matrix_rank(R.double()).max()) == 3
    dense = get_attention("synthesizer_dense")(small(attention_kwargs={"hidden": 6, "seed": 0}))
    H, D, Dh, n = 4, 8, 6, 24
    assert count_parameters(dense) == H * (D * Dh + Dh + Dh * n + n)
    full = get_attention("synthesizer_random")(small(attention_kwargs={"seed": 0}))
    assert count_parameters(full) == 4 * 24 * 24


def test_synthesizer_functions_take_masks_and_empty_rows_give_zero():
    q, k, v = qkv(B=1, H=2, T=5, D=4, dtype=torch.float64)
    R = torch.randn(2, 6, 6, dtype=torch.float64)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    out = LR.random_synthesizer_attention(q, k, v, R, mask=mask)
    assert torch.isfinite(out).all() and out[:, :, 2].abs().max() == 0
    ref = F.scaled_dot_product_attention(torch.zeros(1, 2, 5, 1, dtype=torch.float64),
                                         torch.zeros(1, 2, 5, 1, dtype=torch.float64), v,
                                         attn_mask=R[:, :5, :5].unsqueeze(0))
    torch.testing.assert_close(LR.random_synthesizer_attention(q, k, v, R), ref, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_bad_ranks_and_landmarks():
    q, k, v = qkv(T=8)
    for bad in (0, -1, 9):
        with pytest.raises(ValueError, match=rf"landmarks must be in \[1, min\(T, S\)=8\].*got {bad}"):
            LR.nystrom_attention(q, k, v, landmarks=bad)
        with pytest.raises(ValueError, match=rf"rank must be in \[1, max_len=24\].*got {bad + 16 if bad == 9 else bad}"):
            get_attention("linformer")(small(attention_kwargs={"rank": bad + 16 if bad == 9 else bad}))
        with pytest.raises(ValueError, match="rank must be in"):
            LR.best_rank_k_error(torch.eye(8), bad)
    with pytest.raises(ValueError, match="rank must be in"):
        LR.linformer_config(small(), 25)
    with pytest.raises(ValueError, match=r"k=9 > n rows; k must be in \[1, n\]"):
        LR.linformer_attention(q, k, v, torch.randn(9, 8))
    with pytest.raises(ValueError, match="n=6 columns but the sequence has S=8"):
        LR.linformer_attention(q, k, v, torch.randn(3, 6))
    with pytest.raises(ValueError, match="expected 1 \\(shared\\) or H=3"):
        LR.linformer_attention(q, k, v, torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="dtype of q"):
        LR.linformer_attention(q, k, v, torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="same k"):
        LR.linformer_attention(q, k, v, torch.randn(3, 8), torch.randn(4, 8))
    with pytest.raises(TypeError, match="landmarks must be an int"):
        LR.nystrom_attention(q, k, v, landmarks=2.0)
    with pytest.raises(ValueError, match="pinv must be one of 'iterative', 'exact'"):
        LR.nystrom_attention(q, k, v, landmarks=2, pinv="svd")
    with pytest.raises(ValueError, match="iters must be an int ≥ 0"):
        LR.iterative_pinv(torch.eye(3), -1)
    with pytest.raises(ValueError, match="must be square"):
        LR.iterative_pinv(torch.ones(3, 4))
    with pytest.raises(ValueError, match="energy must be a number in"):
        LR.energy_rank(torch.eye(3), 0)
    with pytest.raises(ValueError, match="same shape"):
        LR.approximation_error(torch.eye(3), torch.eye(4))


def test_bad_module_configuration():
    with pytest.raises(ValueError, match="unknown share 'rows'"):
        get_attention("linformer")(small(attention_kwargs={"share": "rows"}))
    with pytest.raises(ValueError, match="share='layerwise'.*projection"):
        get_attention("linformer")(small(attention_kwargs={"share": "layerwise"}))
    with pytest.raises(TypeError, match="unknown attention_kwargs \\['k'\\]"):
        get_attention("linformer")(small(attention_kwargs={"k": 4}))
    with pytest.raises(TypeError, match="SharedProjection"):
        get_attention("linformer")(small(attention_kwargs={"projection": torch.eye(3)}))
    with pytest.raises(ValueError, match="does not match"):
        get_attention("linformer")(small(attention_kwargs={"rank": 4, "share": "headwise",
                                                          "projection": S.SharedProjection(1, 4, 24, 5)}))
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        get_attention("synthesizer_dense")(small(attention_kwargs={"seed": -3}))
    with pytest.raises(TypeError, match="trainable must be a bool"):
        get_attention("synthesizer_random")(small(attention_kwargs={"trainable": "yes"}))
    mod = get_attention("linformer")(small(attention_kwargs={"rank": 4}))
    q, k, v = qkv(H=4, T=30)
    with pytest.raises(ValueError, match="T=30 exceeds max_len=24"):
        mod(q, k, v)
    with pytest.raises(TypeError, match="unexpected keyword"):
        mod(*qkv(H=4, T=8), window=3)


# ---------------------------------------------------------------------------------------------------------------
# registry: each variant trains inside the model
# ---------------------------------------------------------------------------------------------------------------


def test_registry_names_and_kinds():
    names = set(available())
    assert {"linformer", "nystrom", "synthesizer_dense", "synthesizer_random"} <= names
    assert get_attention("nystrom") is LR.nystrom_attention and not is_module_factory(get_attention("nystrom"))
    for name in ("linformer", "synthesizer_dense", "synthesizer_random"):
        assert is_module_factory(get_attention(name))


def test_dependence_matrix_checks_its_inputs():
    q, k, v = qkv(T=5, S=6)
    with pytest.raises(ValueError, match="self-attention only"):
        LR.dependence_matrix(lambda q, k, v: q, q, k, v)
    q, k, v = qkv(T=5)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        LR.dependence_matrix(lambda q, k, v: q, q, k, v, eps=0)
    with pytest.raises(TypeError, match="fn must be callable"):
        LR.dependence_matrix(None, q, k, v)


@pytest.mark.parametrize("name,kw,causal", [
    ("linformer", {"rank": 6}, False),
    ("linformer", {"rank": 6, "share": "none"}, False),
    ("nystrom", {"landmarks": 4}, False),
    ("nystrom", {"landmarks": 5, "pinv": "exact"}, False),
    ("synthesizer_dense", {}, True),
    ("synthesizer_random", {"rank": 4}, True),
])
def test_registered_variant_trains_in_the_model(name, kw, causal):
    torch.manual_seed(0)
    model = Transformer(small(attention=name, attention_kwargs=kw, causal=causal))
    batch = data.make_task("sort", 16, 24, seed=0)
    hist = train(model, batch, steps=25, lr=3e-3, progress=False)
    assert all(math.isfinite(x) for x in hist["loss"])
    assert sum(hist["loss"][-5:]) / 5 < 0.85 * sum(hist["loss"][:5]) / 5


# ---------------------------------------------------------------------------------------------------------------
# the truncated pseudo-inverse (a cut-off chosen by the caller, unlike torch.linalg.pinv's default)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rtol", [0.0, 1e-12, 1e-6, 1e-3, 1e-2, 0.3])
@pytest.mark.parametrize("shape", [(6, 6), (2, 3, 8, 5), (5, 9)])
def test_truncated_pinv_equals_torch_pinv_with_the_same_rtol(rtol, shape):
    g = torch.Generator().manual_seed(1)
    *batch, m, n = shape
    r = min(m, n) - 2  # numerically rank-deficient: rank r plus 1e-9 noise, and spread singular values
    A = torch.randn(*batch, m, r, generator=g, dtype=torch.float64) @ torch.randn(*batch, r, n, generator=g,
                                                                                 dtype=torch.float64)
    A = A + 1e-9 * torch.randn(*batch, m, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(LR.truncated_pinv(A, rtol), torch.linalg.pinv(A, rtol=rtol), atol=1e-8, rtol=1e-8)


def test_truncated_pinv_is_the_inverse_of_a_well_conditioned_matrix_and_cuts_a_singular_one():
    g = torch.Generator().manual_seed(2)
    A = torch.eye(8, dtype=torch.float64) * 3 + 0.3 * torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    assert float(torch.linalg.cond(A).max()) < 10
    for rtol in (0.0, 1e-6, 1e-2):  # σ_min/σ₁ > 0.1: nothing is cut
        torch.testing.assert_close(LR.truncated_pinv(A, rtol), torch.linalg.inv(A), atol=1e-12, rtol=1e-10)
    # float32 too
    torch.testing.assert_close(LR.truncated_pinv(A.float(), 1e-3), torch.linalg.inv(A.float()), atol=1e-5, rtol=1e-5)
    # a cut-off between σ's: the result is the pseudo-inverse of the truncated SVD (rank r), with r singular values
    D = torch.diag(torch.tensor([4.0, 2.0, 1e-3, 1e-9], dtype=torch.float64))
    Q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    A = Q @ D @ Q.T
    Z = LR.truncated_pinv(A, 1e-2)
    torch.testing.assert_close(Z, Q @ torch.diag(torch.tensor([0.25, 0.5, 0, 0], dtype=torch.float64)) @ Q.T)
    assert int(torch.linalg.matrix_rank(Z)) == 2
    # the default cut-off of torch.linalg.pinv keeps 1e-9: an entry of ~1e9
    assert float(torch.linalg.pinv(A).abs().max()) > 1e8 > float(Z.abs().max()) * 1e6


def test_nystrom_truncated_pinv_option_and_its_checks():
    q, k, v = qkv(B=1, H=2, T=24, D=8, dtype=torch.float64, scale=2.0)
    f, a, b = LR._nystrom_parts(q, k, 6, 8 ** -0.5, "t")
    for rtol in (1e-8, 1e-2):
        want = f @ torch.linalg.pinv(a, rtol=rtol) @ b
        got = LR.nystrom_attention_matrix(q, k, landmarks=6, pinv="truncated", pinv_rtol=rtol)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(LR.nystrom_attention(q, k, v, landmarks=6, pinv="truncated", pinv_rtol=rtol),
                                   want @ v)
        torch.testing.assert_close(LR.nystrom_reference(q, k, v, landmarks=6, pinv="truncated", pinv_rtol=rtol),
                                   want @ v)
    # m = T and a tiny rtol: exact softmax attention, as with the exact pinv (random q, k: well-conditioned Ã)
    torch.testing.assert_close(LR.nystrom_attention(q, k, v, landmarks=24, pinv="truncated", pinv_rtol=1e-12),
                               F.scaled_dot_product_attention(q, k, v), atol=1e-9, rtol=1e-8)
    # gradients flow through the SVD
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    LR.nystrom_attention(qg, kg, vg, landmarks=6, pinv="truncated").sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (qg, kg, vg))
    for bad in (-0.1, 1.0, "1e-3", True, None):
        with pytest.raises(ValueError, match="rtol must be a number in"):
            LR.truncated_pinv(torch.eye(3), bad)
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        LR.truncated_pinv([[1.0]])
    assert "truncated" in LR.PINV_METHODS


def test_truncated_pinv_removes_the_exact_pinv_artefact_on_a_numerically_singular_landmark_matrix():
    # random-walk queries/keys: Ã is ill-conditioned (cond ~1e5–1e6) and F̃, B̃ are not exactly its rows/columns;
    # torch.linalg.pinv's default cut-off inverts the tiny σ's and the implied matrix blows up (error ≫ 1), a cut-off
    # at 1e-2 keeps it near A (the notebook's §3 finding)
    g = torch.Generator().manual_seed(0)
    T_, D_ = 48, 16
    x = torch.randn(2, 1, 2, T_, D_, generator=g, dtype=torch.float64).cumsum(-2) * 0.6
    q, k = x[0], x[1]
    A = LR.softmax_attention_matrix(q, k)
    exact = LR.approximation_error(LR.nystrom_attention_matrix(q, k, landmarks=24, pinv="exact"), A)
    trunc = LR.approximation_error(LR.nystrom_attention_matrix(q, k, landmarks=24, pinv="truncated",
                                                               pinv_rtol=1e-2), A)
    assert (exact > 10 * trunc).all() and (exact > 1).all()
    assert (trunc < 0.5).all()
