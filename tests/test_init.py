"""Chapter 12: initialisation schemes (effedu.general.init) against their published formulas and admin-torch."""
import math

import admin_torch
import pytest
import torch

from effedu.general import init as I
from effedu.measure import layer_weight_grad_norms
from effedu.model import Transformer, TransformerConfig


def _model(norm, n_layers=3, causal=True, d=16, seed=0):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=11, d_model=d, n_heads=2, n_layers=n_layers, d_ff=4 * d,
                                         max_len=32, causal=causal, norm=norm))


def _tokens(B=3, T=9, V=11, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the skip-path seam (Block.skip_scale_*)

@pytest.mark.parametrize("norm", ["post", "pre", "none"])
def test_skip_scale_default_is_the_plain_residual_and_omega_one_changes_nothing(norm):
    m = _model(norm)
    x = _tokens()
    ref = m(x)
    for b in m.blocks:
        b.skip_scale_attn = torch.nn.Parameter(torch.ones(16))
        b.skip_scale_ffn = 1.0
    torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
    m.blocks[0].skip_scale_attn = torch.nn.Parameter(torch.full((16,), 3.0))
    assert (m(x) - ref).abs().max() > 1e-3  # ω really multiplies the skip path


def test_admin_block_matches_admin_torch_omega_residual():
    """Our post-LN block with ω against a block assembled from admin_torch.OmegaResidual (x·ω + f(x), then LN)."""
    m = _model("post", n_layers=4)
    I.init_post_ln(m)
    I.admin_init(m, output_change_scale="O(1)")
    n_res = 2 * len(m.blocks)
    omega = admin_torch.admin.calculate_init(n_res, "O(1)")
    block = m.blocks[1]
    assert torch.allclose(block.skip_scale_attn, torch.full((16,), omega, dtype=torch.float32))
    res_attn = admin_torch.as_module(n_res, "O(1)", as_parameter=True, embed_dim=16)
    res_ffn = admin_torch.as_module(n_res, "O(1)", as_parameter=True, embed_dim=16)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    h = block.ln1(res_attn(x, block.attn(x)))
    expected = block.ln2(res_ffn(h, block.ffn(h)))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", I.OUTPUT_CHANGE_SCALES)
@pytest.mark.parametrize("n", [1, 2, 12, 37])
def test_admin_closed_form_equals_admin_torch(scale, n):
    assert I.admin_omega_closed_form(n, scale) == pytest.approx(admin_torch.admin.calculate_init(n, scale), rel=1e-12)


# ------------------------------------------------------------------ Admin profiling: ω_i = √(Σ_{j<i} Var f_j)

def test_admin_profile_variances_recomputed_by_hand():
    m = _model("post", n_layers=3)
    I.init_post_ln(m)
    x = _tokens()
    prof = I.admin_profile(m, x)
    # independent recomputation: walk the blocks with ω = 1
    with torch.no_grad():
        h = m.embed_tokens(x)
        assert prof["input"] == pytest.approx(h.double().var(unbiased=False).item(), rel=1e-6)
        for i, b in enumerate(m.blocks):
            fa = b.attn(h)
            assert prof["attn"][i] == pytest.approx(fa.double().var(unbiased=False).item(), rel=1e-5)
            h = b.ln1(h + fa)
            ff = b.ffn(h)
            assert prof["ffn"][i] == pytest.approx(ff.double().var(unbiased=False).item(), rel=1e-5)
            h = b.ln2(h + ff)


def test_admin_omegas_formula_and_init():
    prof = {"input": 2.0, "attn": [0.5, 0.25], "ffn": [1.0, 3.0]}
    om = I.admin_omegas(prof)
    # sub-layers in order: attn1, ffn1, attn2, ffn2; ω_i = √(Var x₀ + Σ_{0<j<i} Var f_j)
    assert om["attn"] == pytest.approx([math.sqrt(2.0), math.sqrt(3.5)])
    assert om["ffn"] == pytest.approx([math.sqrt(2.5), math.sqrt(3.75)])
    m = _model("post", n_layers=2)
    I.init_post_ln(m)
    x = _tokens()
    before = m(x).detach()
    I.admin_init(m, x)
    expected = I.admin_omegas(I.admin_profile(m, x))
    for i, b in enumerate(m.blocks):
        assert isinstance(b.skip_scale_attn, torch.nn.Parameter) and b.skip_scale_attn.shape == (16,)
        assert torch.allclose(b.skip_scale_attn, torch.tensor(expected["attn"][i]))
        assert torch.allclose(b.skip_scale_ffn, torch.tensor(expected["ffn"][i]))
    assert sum(p.numel() for n, p in m.named_parameters() if "skip_scale" in n) == 2 * 2 * 16  # ω train
    # profiling runs at ω = 1, so profiling again gives the same ω; the output changed (ω > 1 damps the branches)
    again = I.admin_omegas(I.admin_profile(m, x))
    assert again["attn"] == pytest.approx(expected["attn"]) and again["ffn"] == pytest.approx(expected["ffn"])
    assert all(w > 1 for w in expected["attn"] + expected["ffn"])
    assert (m(x) - before).abs().max() > 1e-3


# ------------------------------------------------------------------ T-Fixup: Huang et al. 2020's constants

@pytest.mark.parametrize("N", [1, 6, 12])
def test_t_fixup_scales_are_the_published_constants(N):
    dec = I.t_fixup_scales(N, "decoder")
    enc = I.t_fixup_scales(N, "encoder")
    assert dec["weights"] == pytest.approx((9 * N) ** -0.25)
    assert dec["embeddings"] == pytest.approx((9 * N) ** -0.25) == enc["embeddings"]
    assert enc["weights"] == pytest.approx(0.67 * N ** -0.25)


@pytest.mark.parametrize("causal", [True, False])
def test_t_fixup_init_scales_v_o_ffn_and_embeddings(causal):
    N, d = 8, 32
    m = Transformer(TransformerConfig(vocab_size=500, d_model=d, n_heads=2, n_layers=N, d_ff=4 * d, max_len=400,
                                      causal=causal, norm="none"))
    I.t_fixup_init(m)
    s = I.t_fixup_scales(N, "decoder" if causal else "encoder")
    xavier = lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))  # noqa: E731
    stds = {"q": [], "v": [], "o": [], "fc1": [], "fc2": []}
    for b in m.blocks:
        q, k, v = b.attn.qkv.weight.split(d)
        stds["q"].append(q.std().item())
        stds["v"].append(v.std().item())
        stds["o"].append(b.attn.proj.weight.std().item())
        stds["fc1"].append(b.ffn.fc1.weight.std().item())
        stds["fc2"].append(b.ffn.fc2.weight.std().item())
    mean = {k: sum(v) / len(v) for k, v in stds.items()}
    assert mean["q"] == pytest.approx(xavier(d, d), rel=0.05)  # q, k: plain Xavier
    assert mean["v"] == pytest.approx(xavier(d, d) * s["weights"], rel=0.05)
    assert mean["o"] == pytest.approx(xavier(d, d) * s["weights"], rel=0.05)
    assert mean["fc1"] == pytest.approx(xavier(d, 4 * d) * s["weights"], rel=0.05)
    assert mean["fc2"] == pytest.approx(xavier(4 * d, d) * s["weights"], rel=0.05)
    for emb in (m.tok_emb, m.pos_emb):
        assert emb.weight.std().item() == pytest.approx(d ** -0.5 * s["embeddings"], rel=0.05)
    assert all(b.attn.qkv.bias.abs().max() == 0 for b in m.blocks)


def test_t_fixup_variant_override():
    m = I.t_fixup_init(_model("none", n_layers=4, causal=True), variant="encoder")  # same seed, same draws
    m2 = I.t_fixup_init(_model("none", n_layers=4, causal=True))
    ratio = m.blocks[0].attn.proj.weight.std() / m2.blocks[0].attn.proj.weight.std()
    assert ratio.item() == pytest.approx(0.67 * 4 ** -0.25 / 36 ** -0.25, rel=1e-5)


# ------------------------------------------------------------------ gradient norms at init: Xiong et al.'s trend

def test_grad_norms_follow_the_predicted_trend():
    L = 12
    post = I.grad_norms_at_init("post-ln", L, d_model=32)
    pre = I.grad_norms_at_init("pre-ln", L, d_model=32)
    assert len(post) == len(pre) == L
    # Xiong et al.: pre-LN's gradients shrink toward the output, post-LN's do not (relative to pre-LN's they grow)
    assert pre[-1] < pre[0]
    assert post[-1] / post[0] > pre[-1] / pre[0]
    # Theorem 1: at the last layer post-LN's gradient is about √L times pre-LN's (here within a factor 2)
    assert math.sqrt(L) / 2 < post[-1] / pre[-1] < 2 * math.sqrt(L)
    same = layer_weight_grad_norms(I.make_model("post-ln", depth=L, d_model=32).eval(),
                                   _default_batch())
    assert same == pytest.approx(post, rel=1e-6)  # one meter, the chapter-01 one


def _default_batch():
    tokens = torch.randint(0, 64, (8, 65), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def test_make_model_schemes_and_determinism():
    kinds = {"post-ln": "post", "pre-ln": "pre", "t-fixup": "none", "admin": "post"}
    for scheme, norm in kinds.items():
        m = I.make_model(scheme, depth=2, d_model=16, seed=3)
        assert m.config.norm_kind == norm and len(m.blocks) == 2
        m2 = I.make_model(scheme, depth=2, d_model=16, seed=3)
        for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
            assert torch.equal(p, p2), n
        assert (m.blocks[0].skip_scale_attn is not None) == (scheme == "admin")


def test_unigram_entropy():
    tokens = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert I.unigram_entropy(tokens, 6) == pytest.approx(math.log(4))


# ------------------------------------------------------------------ bad input

def test_bad_input():
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        I.make_model("pre-ln", depth=0)
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        I.grad_norms_at_init("pre-ln", -2)
    with pytest.raises(ValueError, match="unknown scheme 'fixup'"):
        I.make_model("fixup", depth=2)
    with pytest.raises(ValueError, match="no LayerNorm.*norm='none'"):
        I.t_fixup_init(_model("pre"))
    with pytest.raises(ValueError, match="post-LN Transformer"):
        I.admin_init(_model("pre"), _tokens())
    with pytest.raises(ValueError, match="post-LN"):
        I.init_post_ln(_model("pre"))
    with pytest.raises(ValueError, match="pre-LN"):
        I.init_pre_ln(_model("post"))
    with pytest.raises(TypeError, match="effedu Transformer"):
        I.xavier_init(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="give a batch"):
        I.admin_init(_model("post"))
    with pytest.raises(ValueError, match="not both"):
        I.admin_init(_model("post"), _tokens(), output_change_scale="O(1)")
    with pytest.raises(TypeError, match="batch must be int64 tokens"):
        I.admin_profile(_model("post"), torch.randn(2, 3))
    with pytest.raises(ValueError, match="unknown variant"):
        I.t_fixup_init(_model("none"), variant="both")
    with pytest.raises(ValueError, match="unknown output_change_scale"):
        I.admin_omega_closed_form(4, "O(n^2)")
    with pytest.raises(ValueError, match="warmups must be ints"):
        I.warmup_demo(steps=10, warmups=(10,))
