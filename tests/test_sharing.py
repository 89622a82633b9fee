"""Parameter sharing (ALBERT, Reformer shared-QK, Linformer projections) against closed forms and oracles.

Oracles: parameter counts equal the closed-form formulas (``measure.count_parameters`` counts a shared tensor
once); shared layers are the same Parameter objects and their gradient is the sum of the per-layer gradients of
an unshared copy with equal weights; the factorised embedding is a product of matrices; shared-QK attention equals
``F.scaled_dot_product_attention`` with normalised keys and the Reformer diagonal rule, and the Reformer
implementations' "−1e5 on the diagonal" trick.
"""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from _oracles import TOL
from effedu.attention import get as get_attention
from effedu.general import sharing as S
from effedu.measure import count_parameters
from effedu.model import MultiHeadAttention, Transformer, TransformerConfig
from effedu.train import lm_loss


def small(**kw):
    cfg = dict(vocab_size=29, d_model=24, n_heads=3, n_layers=4, d_ff=40, max_len=19)
    cfg.update(kw)
    return TransformerConfig(**cfg)


def tokens(B=2, T=11, V=29, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# closed-form parameter counts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", S.SHARE_MODES)
@pytest.mark.parametrize("norm_first", [True, False])
def test_parameter_count_equals_closed_form(share, norm_first):
    cfg = small(norm_first=norm_first, n_layers=5)
    for E, groups, tie, sqk in itertools.product([None, 7], [1, 2, 5], [False, True], [False, True]):
        if share == "none" and groups != 1:
            continue
        torch.manual_seed(0)
        model = S.SharedTransformer(cfg, share, E, groups=groups, tie_head=tie, shared_qk=sqk)
        expected = S.albert_parameter_count(cfg, share, E, groups=groups, tie_head=tie, shared_qk=sqk)
        assert count_parameters(model) == expected, (share, E, groups, tie, sqk)


def test_closed_form_by_hand_and_breakdown_by_module():
    cfg = small()
    V, d, f, L, n = 29, 24, 40, 4, 19
    block = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d
    plain = V * d + n * d + L * block + 2 * d + d * V + V
    assert S.albert_parameter_count(cfg, "none") == plain == count_parameters(Transformer(cfg))
    assert S.albert_parameter_count(cfg, "all") == plain - (L - 1) * block
    assert S.albert_parameter_count(cfg, "all", 5, tie_head=True) == (
        V * 5 + 5 * d + n * d + block + 2 * d + V)
    # the parts, measured module by module on the built model
    model = S.SharedTransformer(cfg, "attention", 6, groups=2, tie_head=True)
    parts = S.albert_parameter_breakdown(cfg, "attention", 6, groups=2, tie_head=True)
    seen = set()

    def measured(modules):
        total = 0
        for m in modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return total

    assert measured([model.tok_emb]) == parts["token embedding"] == V * 6 + 6 * d
    assert measured([model.pos_emb]) == parts["position embedding"]
    assert measured([b.attn for b in model.blocks]) == parts["attention"] == 2 * (4 * d * d + 4 * d)
    assert measured([b.ffn for b in model.blocks]) == parts["ffn"] == L * (2 * d * f + f + d)
    assert measured([m for b in model.blocks for m in (b.ln1, b.ln2)] + [model.ln_f]) == parts["norms"]
    assert measured([model.head]) == parts["head"] == V
    assert parts["total"] == count_parameters(model)


def test_albert_large_is_about_18x_smaller_than_bert_large():
    # survey §3.3: an ALBERT configuration similar to BERT-large has about 18× fewer parameters
    bert_large = TransformerConfig(vocab_size=30000, d_model=1024, n_heads=16, n_layers=24, d_ff=4096, max_len=512,
                                   causal=False)
    bert = S.albert_parameter_count(bert_large, "none", tie_head=True)
    albert = S.albert_parameter_count(bert_large, "all", 128, tie_head=True)
    assert 330e6 < bert < 340e6 and 17e6 < albert < 19e6
    assert 17 < bert / albert < 20


def test_block_and_embedding_counts():
    assert S.block_parameter_count(8, 32, part="attention") == 4 * 64 + 32
    assert S.block_parameter_count(8, 32, part="attention", shared_qk=True) == 3 * 64 + 24
    assert S.block_parameter_count(8, 32, part="ffn") == 2 * 8 * 32 + 32 + 8
    assert S.block_parameter_count(8, 32) == 4 * 64 + 32 + 2 * 8 * 32 + 40 + 32
    assert S.embedding_parameter_count(1000, 64) == 64000
    assert S.embedding_parameter_count(1000, 64, 16) == 16000 + 1024


# ---------------------------------------------------------------------------------------------------------------
# ALBERT cross-layer sharing: identity and gradient accumulation
# ---------------------------------------------------------------------------------------------------------------


def test_shared_parameters_are_the_same_objects():
    model = S.share_layers(Transformer(small()), "all")
    p0 = dict(model.blocks[0].named_parameters())
    for b in model.blocks[1:]:
        assert b is model.blocks[0]
        for name, p in b.named_parameters():
            assert p is p0[name]
    model = S.share_layers(Transformer(small()), "attention")
    assert all(b.attn.qkv.weight is model.blocks[0].attn.qkv.weight for b in model.blocks)
    assert model.blocks[1].ffn.fc1.weight is not model.blocks[0].ffn.fc1.weight
    assert model.blocks[1].ln1.weight is not model.blocks[0].ln1.weight
    model = S.share_layers(Transformer(small()), "ffn")
    assert all(b.ffn.fc2.weight is model.blocks[0].ffn.fc2.weight for b in model.blocks)
    assert model.blocks[2].attn.proj.weight is not model.blocks[0].attn.proj.weight


@pytest.mark.parametrize("share,groups,expected", [
    ("all", 1, {"block": [0, 0, 0, 0, 0], "attention": [0] * 5, "ffn": [0] * 5, "norms": [0] * 5}),
    ("attention", 2, {"block": [0, 1, 2, 3, 4], "attention": [0, 0, 0, 3, 3], "ffn": [0, 1, 2, 3, 4],
                      "norms": [0, 1, 2, 3, 4]}),
    ("ffn", 5, {"block": [0, 1, 2, 3, 4], "attention": [0, 1, 2, 3, 4], "ffn": [0, 1, 2, 3, 4],
                "norms": [0, 1, 2, 3, 4]}),
    ("all", 3, {"block": [0, 0, 2, 2, 4], "attention": [0, 0, 2, 2, 4], "ffn": [0, 0, 2, 2, 4],
                "norms": [0, 0, 2, 2, 4]}),
    ("none", 1, {"block": [0, 1, 2, 3, 4], "attention": [0, 1, 2, 3, 4], "ffn": [0, 1, 2, 3, 4],
                 "norms": [0, 1, 2, 3, 4]}),
])
def test_sharing_pattern_and_groups(share, groups, expected):
    model = S.share_layers(Transformer(small(n_layers=5)), share, groups=groups)
    assert S.sharing_pattern(model) == expected
    assert [S.group_of_layer(i, 5, 3) for i in range(5)] == [0, 0, 1, 1, 2]


def _unshared_twin(shared):
    """An independent plain Transformer with every layer's weights equal to the shared model's (built from the
    state dict, not with unshare_layers)."""
    twin = Transformer(shared.config).double()
    twin.load_state_dict(shared.state_dict())  # the shared model's state dict lists a shared tensor per layer
    ptrs = {p.data_ptr() for p in twin.parameters()}
    assert len(ptrs) == len(list(twin.parameters()))  # nothing shared in the twin
    return twin


@pytest.mark.parametrize("share,groups", [("all", 1), ("attention", 1), ("ffn", 1), ("all", 2), ("ffn", 3)])
def test_gradient_of_shared_parameter_is_sum_of_per_layer_gradients(share, groups):
    torch.manual_seed(0)
    shared = S.share_layers(Transformer(small()).double(), share, groups=groups)
    twin = _unshared_twin(shared)
    x, y = tokens(T=13), tokens(T=13, seed=1)
    out_s, out_t = shared(x), twin(x)
    torch.testing.assert_close(out_s, out_t, **TOL[torch.float64])
    lm_loss(out_s, y).backward()
    lm_loss(out_t, y).backward()
    shared_params = dict(shared.named_parameters())  # deduplicated: one name per Parameter object
    twin_params = dict(twin.named_parameters())
    pattern = S.sharing_pattern(shared)
    part_of = {"attn": "attention", "ffn": "ffn", "ln1": "norms", "ln2": "norms"}
    checked = 0
    for name, p in shared_params.items():
        if not name.startswith("blocks."):
            torch.testing.assert_close(p.grad, twin_params[name].grad, **TOL[torch.float64])
            continue
        layer, sub = int(name.split(".")[1]), name.split(".")[2]
        users = [i for i, owner in enumerate(pattern[part_of[sub]]) if owner == layer]
        rest = ".".join(name.split(".")[2:])
        expected = sum(twin_params[f"blocks.{i}.{rest}"].grad for i in users)
        torch.testing.assert_close(p.grad, expected, **TOL[torch.float64])
        checked += len(users) > 1
    assert checked > 0  # some parameter really was shared


def test_unshare_layers_gives_equal_values_separate_tensors():
    torch.manual_seed(0)
    model = S.SharedTransformer(small(), "all")
    x = tokens()
    before = model(x)
    S.unshare_layers(model)
    assert S.sharing_pattern(model)["attention"] == [0, 1, 2, 3]
    assert model.blocks[1].attn.qkv.weight is not model.blocks[0].attn.qkv.weight
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model(x), before, **TOL[torch.float32])
    assert count_parameters(model) == S.albert_parameter_count(small(), "none")


def test_training_keeps_layers_tied_and_state_dict_round_trips():
    torch.manual_seed(0)
    model = S.SharedTransformer(small(), "all", 6, tie_head=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert len(opt.param_groups[0]["params"]) == len({id(p) for p in model.parameters()})
    w0 = model.blocks[0].ffn.fc1.weight.detach().clone()
    for step in range(3):
        opt.zero_grad()
        lm_loss(model(tokens(seed=step)), tokens(seed=step + 10)).backward()
        opt.step()
    assert not torch.equal(model.blocks[3].ffn.fc1.weight, w0)  # it trained
    assert model.blocks[3].ffn.fc1.weight is model.blocks[0].ffn.fc1.weight
    torch.manual_seed(1)
    fresh = S.SharedTransformer(small(), "all", 6, tie_head=True)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(tokens()), model(tokens()))
    assert fresh.blocks[2] is fresh.blocks[0]


def test_shared_model_has_same_activation_memory_and_depth():
    from effedu.measure import saved_activation_bytes

    torch.manual_seed(0)
    plain = Transformer(small())
    shared = S.SharedTransformer(small(), "all")
    x = tokens()
    assert saved_activation_bytes(plain, x) == saved_activation_bytes(shared, x)  # sharing saves no activations
    assert len(S.hidden_states(shared, x)) == len(S.hidden_states(plain, x)) == 5


# ---------------------------------------------------------------------------------------------------------------
# factorised embedding and tied heads
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factorized_embedding_is_a_product_of_matrices(dtype):
    torch.manual_seed(0)
    emb = S.FactorizedEmbedding(31, 5, 12).to(dtype)
    t = tokens(B=3, T=17, V=31)
    A, P = emb.table.weight, emb.proj.weight  # (V, E), (H, E)
    W = emb.full_weight()
    assert W.shape == (31, 12) and torch.linalg.matrix_rank(W.double(), rtol=1e-4) == 5
    torch.testing.assert_close(emb(t), F.one_hot(t, 31).to(dtype) @ A @ P.t(), **TOL[dtype])
    torch.testing.assert_close(emb(t), F.embedding(t, A @ P.t()), **TOL[dtype])
    assert count_parameters(emb) == 31 * 5 + 5 * 12 == S.embedding_parameter_count(31, 12, 5)


def test_factorized_embedding_gradients_match_the_product_form():
    torch.manual_seed(0)
    emb = S.FactorizedEmbedding(11, 3, 7).double()
    t = tokens(B=2, T=9, V=11)
    g = torch.randn(2, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (emb(t) * g).sum().backward()
    A = emb.table.weight.detach().clone().requires_grad_(True)
    P = emb.proj.weight.detach().clone().requires_grad_(True)
    (F.embedding(t, A @ P.t()) * g).sum().backward()
    torch.testing.assert_close(emb.table.weight.grad, A.grad, **TOL[torch.float64])
    torch.testing.assert_close(emb.proj.weight.grad, P.grad, **TOL[torch.float64])


def test_tie_embeddings_plain_and_factorized():
    torch.manual_seed(0)
    lm = Transformer(small())
    before = count_parameters(lm)
    S.tie_embeddings(lm)
    assert lm.head.weight is lm.tok_emb.weight
    assert count_parameters(lm) == before - 29 * 24
    fact = S.SharedTransformer(small(), "none", 5, tie_head=True)
    assert isinstance(fact.head, S.TiedFactorizedHead)
    x = torch.randn(2, 3, 24, dtype=torch.float32)
    with torch.no_grad():
        fact.head.bias.normal_()
        expected = x @ fact.tok_emb.full_weight().t() + fact.head.bias  # logits = x Wᵀ + b with W = A Pᵀ
    torch.testing.assert_close(fact.head(x), expected, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------------------------
# Reformer shared-QK attention
# ---------------------------------------------------------------------------------------------------------------


def _oracle_mask(T, causal, mask=None):
    """Self excluded unless the row has nothing else — built by hand, row by row."""
    allowed = torch.ones(T, T, dtype=torch.bool) if mask is None else mask.clone()
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    out = allowed.clone()
    for i in range(T):
        others = allowed[i].clone()
        others[i] = False
        if others.any():
            out[i, i] = False
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1, 2, 17])
def test_shared_qk_equals_sdpa_with_normalised_keys(dtype, causal, T):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(2, 3, T, 5, generator=g, dtype=torch.float64).to(dtype)
    out, w = S.shared_qk_attention(q, None, v, causal=causal, return_weights=True)
    k = F.normalize(q.double(), dim=-1)
    ref = F.scaled_dot_product_attention(q.double(), k, v.double(), attn_mask=_oracle_mask(T, causal), scale=1.0)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    # the keys really are the normalised queries: unit length, same direction
    keys = S.shared_qk_keys(q.double())
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(2, 3, T, dtype=torch.float64))
    torch.testing.assert_close(keys * q.double().norm(dim=-1, keepdim=True), q.double())
    # the diagonal rule: self-weight 0 where something else is allowed, 1 where it is the only key
    diag = w.diagonal(dim1=-2, dim2=-1).double()
    if T == 1:
        assert torch.all(diag == 1)
    elif causal:
        assert torch.all(diag[..., 0] == 1) and torch.all(diag[..., 1:] == 0)
    else:
        assert torch.all(diag == 0)


def test_shared_qk_equals_the_reformer_minus_1e5_trick():
    # Trax / Hugging Face Reformer: keys of length √D, scores / √D, and −1e5 (not −inf) on the diagonal
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 9, 6, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 6, generator=g, dtype=torch.float64)
    D = q.shape[-1]
    k = q / q.pow(2).mean(-1, keepdim=True).sqrt() / D ** 0.5  # "length and dim normalisation"
    scores = q @ k.transpose(-1, -2)
    scores = scores.masked_fill(torch.eye(9, dtype=torch.bool), -1e5)
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(S.shared_qk_attention(q, None, v, causal=True), ref, **TOL[torch.float64])


def test_shared_qk_masks_and_empty_rows():
    T = 6
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(1, 2, T, 4, generator=g), torch.randn(1, 2, T, 4, generator=g)
    mask = torch.ones(T, T, dtype=torch.bool)
    mask[2] = False
    mask[2, 2] = True  # row 2 may only see itself → keeps it
    mask[4] = False  # row 4 sees nothing → zeros, no NaN
    out, w = S.shared_qk_attention(q, None, v, mask=mask, return_weights=True)
    ref = F.scaled_dot_product_attention(q, F.normalize(q, dim=-1), v, attn_mask=_oracle_mask(T, False, mask),
                                         scale=1.0)
    keep = torch.arange(T) != 4
    torch.testing.assert_close(out[:, :, keep], ref[:, :, keep], **TOL[torch.float32])
    assert torch.all(out[:, :, 4] == 0) and not out.isnan().any()
    torch.testing.assert_close(out[:, :, 2], v[:, :, 2])
    assert torch.all(w[:, :, 2, 2] == 1)
    # zero query → zero key, finite output
    q0 = q.clone()
    q0[0, 0, 3] = 0
    assert torch.isfinite(S.shared_qk_attention(q0, None, v)).all()


def test_shared_qk_gradients_match_sdpa():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    go = torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64)
    (S.shared_qk_attention(q, None, v, causal=True) * go).sum().backward()
    gq, gv = q.grad.clone(), v.grad.clone()
    q.grad = v.grad = None
    ref = F.scaled_dot_product_attention(q, F.normalize(q, dim=-1), v, attn_mask=_oracle_mask(7, True), scale=1.0)
    (ref * go).sum().backward()
    torch.testing.assert_close(gq, q.grad, **TOL[torch.float64])
    torch.testing.assert_close(gv, v.grad, **TOL[torch.float64])


def test_shared_qk_registered_and_usable_in_the_config():
    assert get_attention("shared_qk") is S.shared_qk_attention
    torch.manual_seed(0)
    model = Transformer(small(attention="shared_qk"))
    x, y = tokens(), tokens(seed=1)
    lm_loss(model(x), y).backward()
    d = 24
    for b in model.blocks:
        # the key rows of the fused projection are computed but unused: zero gradient
        assert torch.all(b.attn.qkv.weight.grad[d:2 * d] == 0) and torch.all(b.attn.qkv.bias.grad[d:2 * d] == 0)
        assert b.attn.qkv.weight.grad[:d].abs().sum() > 0 and b.attn.qkv.weight.grad[2 * d:].abs().sum() > 0
    # the honest module computes the same function with d² + d fewer parameters per layer
    honest = S.share_qk(copy.deepcopy(model))
    torch.testing.assert_close(honest(x), model(x), **TOL[torch.float32])
    assert count_parameters(model) - count_parameters(honest) == 4 * (d * d + d)
    assert count_parameters(honest) == S.albert_parameter_count(small(), "none", shared_qk=True)


def test_shared_qk_module_from_attention_and_count():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, "shared_qk", causal=True)
    sqk = S.SharedQKMultiHeadAttention.from_attention(mha)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(sqk(x), mha(x), **TOL[torch.float32])
    out, w = sqk(x, return_weights=True)
    assert w.shape == (2, 4, 9, 9) and torch.all(w.diagonal(dim1=-2, dim2=-1)[..., 1:] == 0)
    assert count_parameters(sqk) == 3 * 16 * 16 + 3 * 16 == S.block_parameter_count(16, 1, part="attention",
                                                                                      shared_qk=True)
    # share_qk keeps a shared attention shared
    model = S.share_qk(S.share_layers(Transformer(small()), "attention"))
    assert all(b.attn is model.blocks[0].attn for b in model.blocks)
    assert isinstance(model.blocks[0].attn, S.SharedQKMultiHeadAttention)


# ---------------------------------------------------------------------------------------------------------------
# Linformer projection sharing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", S.PROJECTION_MODES)
def test_shared_projection_counts_and_identities(mode):
    L, H, n, k = 3, 4, 20, 5
    proj = S.SharedProjection(L, H, n, k, mode)
    assert count_parameters(proj) == S.linformer_projection_parameter_count(L, H, n, k, mode)
    assert len(proj.matrices) == {"none": 2 * L * H, "headwise": 2 * L, "key-value": L, "layerwise": 1}[mode]
    distinct = {id(proj.matrix(l, h, w)) for l in range(L) for h in range(H) for w in ("key", "value")}
    assert len(distinct) == len(proj.matrices)
    same_heads = proj.matrix(1, 0, "key") is proj.matrix(1, 3, "key")
    same_kv = proj.matrix(1, 2, "key") is proj.matrix(1, 2, "value")
    same_layers = proj.matrix(0, 0, "key") is proj.matrix(2, 0, "key")
    assert (same_heads, same_kv, same_layers) == {
        "none": (False, False, False), "headwise": (True, False, False),
        "key-value": (True, True, False), "layerwise": (True, True, True)}[mode]


def test_shared_projection_project_and_gradient_accumulation():
    L, H, n, k = 2, 3, 13, 4
    proj = S.SharedProjection(L, H, n, k, "layerwise", seed=1).double()
    g = torch.Generator().manual_seed(0)
    xs = {(l, w): torch.randn(2, H, n, 5, generator=g, dtype=torch.float64) for l in range(L) for w in ("key", "value")}
    total = sum((proj.project(x, l, w) ** 2).sum() for (l, w), x in xs.items())
    total.backward()
    E = proj.matrices[0]
    # oracle: every use gets its own copy of E; the shared gradient is the sum over the 2·L·H uses
    grad_sum = torch.zeros_like(E)
    for (l, w), x in xs.items():
        for h in range(H):
            Ec = E.detach().clone().requires_grad_(True)
            ((Ec @ x[:, h]) ** 2).sum().backward()
            grad_sum += Ec.grad
    torch.testing.assert_close(E.grad, grad_sum, **TOL[torch.float64])
    # per-head product and the zero-padding rule for a shorter sequence
    x = torch.randn(2, H, 9, 5, generator=g, dtype=torch.float64)
    padded = torch.cat([x, torch.zeros(2, H, n - 9, 5, dtype=torch.float64)], dim=2)
    torch.testing.assert_close(proj.project(x, 1, "value"), proj.project(padded, 1, "value"), **TOL[torch.float64])
    none = S.SharedProjection(L, H, n, k, "none")
    x = torch.randn(1, H, n, 2, generator=g)
    out = none.project(x, 1, "key")
    for h in range(H):
        torch.testing.assert_close(out[0, h], none.matrix(1, h, "key") @ x[0, h], **TOL[torch.float32])
    assert not torch.equal(none.matrix(0, 0, "key"), none.matrix(0, 1, "key"))


# ---------------------------------------------------------------------------------------------------------------
# hidden states and similarity
# ---------------------------------------------------------------------------------------------------------------


def test_hidden_states_and_layer_similarity():
    torch.manual_seed(0)
    model = S.SharedTransformer(small(n_layers=3), "all").eval()
    x = tokens()
    states = S.hidden_states(model, x)
    assert len(states) == 4
    pos = torch.arange(x.shape[1])
    torch.testing.assert_close(states[0], model.tok_emb(x) + model.pos_emb(pos))
    h = states[0]
    for i, b in enumerate(model.blocks):
        h = b(h)
        torch.testing.assert_close(states[i + 1], h)
    sim = S.layer_similarity(states)
    assert sim.shape == (4, 4)
    torch.testing.assert_close(sim, sim.t())
    torch.testing.assert_close(sim.diagonal(), torch.ones(4, dtype=torch.float64))
    i, j = 1, 2
    ref = F.cosine_similarity(states[i].double(), states[j].double(), dim=-1).mean()
    torch.testing.assert_close(sim[i, j], ref)


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_bad_input():
    cfg = small()
    with pytest.raises(ValueError, match="unknown share 'every'"):
        S.share_layers(Transformer(cfg), "every")
    with pytest.raises(TypeError, match="share must be a str"):
        S.SharedTransformer(cfg, share=1)
    with pytest.raises(ValueError, match="groups must be between 1 and n_layers=4, got 5"):
        S.share_layers(Transformer(cfg), "all", groups=5)
    with pytest.raises(ValueError, match="groups must be a positive int, got 0"):
        S.SharedTransformer(cfg, "all", groups=0)
    with pytest.raises(ValueError, match="groups=2 needs a shared mode"):
        S.albert_parameter_count(cfg, "none", groups=2)
    with pytest.raises(TypeError, match="model must have .blocks"):
        S.share_layers(torch.nn.Linear(2, 2), "all")
    with pytest.raises(ValueError, match="embedding_dim must be a positive int, got 0"):
        S.SharedTransformer(cfg, "all", 0)
    with pytest.raises(TypeError, match="embedding_dim must be an int"):
        S.albert_parameter_count(cfg, "all", 12.5)
    with pytest.raises(TypeError, match="tie_head must be a bool"):
        S.SharedTransformer(cfg, "all", tie_head=1)
    with pytest.raises(ValueError, match="config.attention must be 'dense' or 'shared_qk', got 'tiled'"):
        S.SharedTransformer(small(attention="tiled"), shared_qk=True)
    with pytest.raises(TypeError, match="config must be a TransformerConfig"):
        S.albert_parameter_count({"d_model": 4})
    with pytest.raises(ValueError, match="unknown part 'mlp'"):
        S.block_parameter_count(8, 8, part="mlp")
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got -3"):
        S.FactorizedEmbedding(-3, 4, 8)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=5\), got min 0, max 7"):
        S.FactorizedEmbedding(5, 2, 4)(torch.tensor([[0, 7]]))
    with pytest.raises(TypeError, match="tokens must be an integer"):
        S.FactorizedEmbedding(5, 2, 4)(torch.zeros(2, 3))
    lm = Transformer(cfg)
    lm.head = torch.nn.Linear(24, 7)
    with pytest.raises(ValueError, match=r"must have the same \(vocab, d_model\) shape"):
        S.tie_embeddings(lm)
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"k is ignored .* must be None or shaped like q \(1, 2, 5, 4\), got \(1, 2, 3, 4\)"):
        S.shared_qk_attention(q, torch.randn(1, 2, 3, 4), q)
    with pytest.raises(ValueError, match="v must have the queries' length T=5, got 6"):
        S.shared_qk_attention(q, None, torch.randn(1, 2, 6, 4))
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        S.shared_qk_attention(q, None, q, scale=-1.0)
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        S.shared_qk_attention(q, None, q, mask=torch.ones(5, 5))
    with pytest.raises(ValueError, match="cross-attention"):
        S.SharedQKMultiHeadAttention(8, 2)(torch.randn(1, 3, 8), context=torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=3"):
        S.SharedQKMultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="unknown mode 'per-head'"):
        S.SharedProjection(2, 2, 8, 4, "per-head")
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        S.SharedProjection(2, 2, 8, 0)
    proj = S.SharedProjection(2, 2, 8, 4)
    with pytest.raises(ValueError, match="sequence length T=9 must be between 1 and seq_len=8"):
        proj.project(torch.randn(1, 2, 9, 3), 0, "key")
    with pytest.raises(ValueError, match="x has H=3 heads"):
        proj.project(torch.randn(1, 3, 8, 3), 0, "key")
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
        proj.matrix(2, 0, "key")
    with pytest.raises(ValueError, match="unknown which 'query'"):
        proj.matrix(0, 0, "query")
    with pytest.raises(ValueError, match=r"states\[1\] must be a \(B, T, d\) tensor shaped like"):
        S.layer_similarity([torch.randn(1, 2, 3), torch.randn(1, 2, 4)])
