"""Chapter 05's pruning module against independent oracles: torch.nn.utils.prune's masks, finite differences for
Michel et al.'s head importance, the head-gated model for physically pruned heads (tiny model and MiniLM)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from effedu.general import prune as P
from effedu.model import MultiHeadAttention, Transformer, TransformerConfig
from effedu.pretrained import load_minilm, mean_pool

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=1e-4, rtol=1e-4)}


def tiny(n_layers=2, n_heads=4, d_model=32, dtype=torch.float32, seed=0, causal=True, norm_first=True):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=23, d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_ff=48,
                            max_len=16, causal=causal, norm_first=norm_first)
    m = Transformer(cfg).to(dtype).eval()
    with torch.no_grad():  # GPT-2 init is small; spread the weights so every head matters
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def tokens(B=3, T=9, seed=1):
    return torch.randint(0, 23, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


# ---------------------------------------------------------------------------------------------------------------
# masks: oracle torch.nn.utils.prune
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 13), (1, 5), (64, 33)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_magnitude_mask_equals_l1_unstructured(shape, sparsity, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    lin = nn.Linear(shape[1], shape[0]).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    tprune.l1_unstructured(lin, "weight", amount=sparsity)
    mask = P.magnitude_mask(w, sparsity)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, lin.weight_mask.bool())
    assert int((~mask).sum()) == round(sparsity * w.numel())


def test_magnitude_mask_ties_count_exactly_and_break_by_position():
    w = torch.tensor([[1.0, -1.0, 2.0], [1.0, 0.5, -1.0]])
    mask = P.magnitude_mask(w, 0.5)  # round(3.0) = 3 removed: 0.5, then two of the four |1|'s
    assert int((~mask).sum()) == 3
    assert w.abs()[~mask].max() <= w.abs()[mask].min()
    assert mask.tolist() == [[False, False, True], [True, False, True]]  # the earlier |1|'s go first
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
    tprune.l1_unstructured(lin, "weight", amount=0.5)  # torch: the same count (which tie goes is undefined)
    assert int((lin.weight_mask == 0).sum()) == 3


def test_global_magnitude_masks_equal_global_unstructured():
    g = torch.Generator().manual_seed(5)
    mods = [nn.Linear(11, 7), nn.Linear(7, 19), nn.Linear(19, 3)]
    with torch.no_grad():
        for i, m in enumerate(mods):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (i + 1))  # different scales per layer
    weights = {f"w{i}": m.weight.detach().clone() for i, m in enumerate(mods)}
    tprune.global_unstructured([(m, "weight") for m in mods], pruning_method=tprune.L1Unstructured, amount=0.6)
    masks = P.global_magnitude_masks(weights, 0.6)
    for i, m in enumerate(mods):
        assert torch.equal(masks[f"w{i}"], m.weight_mask.bool())
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~k).sum()) for k in masks.values()) == round(0.6 * total)
    per_layer = [float((~masks[f"w{i}"]).float().mean()) for i in range(3)]
    assert per_layer[0] > per_layer[2]  # the small-weight layer loses more


def _stable_sort_mask(w, sparsity):
    """The definition, by a full stable sort: the round(s·n) smallest |w| removed, ties → the earlier flat index."""
    keep = torch.ones(w.numel(), dtype=torch.bool)
    keep[torch.argsort(w.abs().reshape(-1), stable=True)[:round(sparsity * w.numel())]] = False
    return keep.view(w.shape)


@pytest.mark.parametrize("kind", ["normal", "few_values", "zeros_then_noise"])
def test_magnitude_masks_of_large_tensors_select_exactly_without_sorting(kind):
    """Above 2²⁰ entries the threshold is found by a sampled bracket + selection (no sort): the same mask as the
    full stable sort, ties (many: few distinct values, a block of zeros) resolved by position, exact count."""
    g = torch.Generator().manual_seed(11)
    n = (1 << 20) + 5
    if kind == "normal":
        w = torch.randn(n, generator=g, dtype=torch.float64)
    elif kind == "few_values":
        w = torch.randint(-6, 7, (n,), generator=g).to(torch.float32)
    else:
        w = torch.cat([torch.zeros(n // 2), torch.randn(n - n // 2, generator=g)])
    w = w.view(-1, 5) if n % 5 == 0 else w
    for s in (0.001, 0.77) if kind == "normal" else (0.5,):
        mask = P.magnitude_mask(w, s)
        assert int((~mask).sum()) == round(s * w.numel())
        assert torch.equal(mask, _stable_sort_mask(w, s)), s
    half = w.numel() // 2
    masks = P.global_magnitude_masks({"a": w[:half], "b": w[half:] * 3}, 0.6)
    flat = torch.cat([w[:half].abs().double(), (w[half:] * 3).abs().double()])
    expected = _stable_sort_mask(flat, 0.6)
    assert torch.equal(torch.cat([masks["a"], masks["b"]]), expected)


def test_magnitude_mask_of_a_large_tensor_equals_global_unstructured():
    lin = nn.Linear(1100, 1000, bias=False)  # 1.1 M distinct weights: the selection path, oracle torch
    torch.nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(2))
    w = lin.weight.detach().clone()
    tprune.l1_unstructured(lin, "weight", amount=0.85)
    assert torch.equal(P.magnitude_mask(w, 0.85), lin.weight_mask.bool())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", True, None])
def test_bad_sparsity_is_a_value_error(bad):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        P.magnitude_mask(torch.randn(3, 3), bad)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        P.global_magnitude_masks({"a": torch.randn(3)}, bad)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        P.prune_magnitude(tiny(), bad)


def test_bad_weights_are_errors():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        P.magnitude_mask([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        P.magnitude_mask(torch.arange(4), 0.5)
    with pytest.raises(TypeError, match="non-empty dict"):
        P.global_magnitude_masks({}, 0.5)
    with pytest.raises(TypeError, match=r"weights\['b'\] must be a torch.Tensor"):
        P.global_magnitude_masks({"a": torch.randn(2), "b": 3}, 0.5)
    with pytest.raises(ValueError, match="scope must be one of"):
        P.prune_magnitude(tiny(), 0.5, scope="row")
    with pytest.raises(ValueError, match=r"k must be an int in \[0, scores.numel\(\)=4\], got 5"):
        P.smallest_mask(torch.randn(2, 2), 5)
    with pytest.raises(ValueError, match="k must be an int"):
        P.smallest_mask(torch.randn(2, 2), 1.0)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        P.smallest_mask([1.0], 0)


def test_smallest_mask_counts_ties_and_nan_like_a_stable_sort():
    x = torch.tensor([3.0, float("nan"), 1.0, 1.0, -2.0, 1.0, float("nan")])
    for k in range(x.numel() + 1):
        keep = torch.ones(x.numel(), dtype=torch.bool)
        keep[torch.argsort(x, stable=True)[:k]] = False
        assert torch.equal(P.smallest_mask(x, k), keep), k


# ---------------------------------------------------------------------------------------------------------------
# masks on a model
# ---------------------------------------------------------------------------------------------------------------


def test_prunable_weights_are_the_block_linears_only():
    m = tiny()
    names = list(P.prunable_weights(m))
    assert names == [f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn.qkv", "attn.proj", "ffn.fc1", "ffn.fc2")]
    params = dict(m.named_parameters())
    assert all(P.prunable_weights(m)[n] is params[n] for n in names)
    with pytest.raises(TypeError, match="blocks ModuleList"):
        P.prunable_weights(nn.Linear(2, 2))


def test_masks_survive_adamw_training_and_gradient_accumulation():
    m = tiny().train()
    x, y = tokens(), tokens(seed=2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # optimiser state (momentum) from before the masking
        opt.zero_grad()
        nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
    keys = set(m.state_dict())
    masks = P.prune_magnitude(m, 0.7, scope="layer")
    assert set(m.state_dict()) == keys  # masks are not saved
    for _ in range(3):
        opt.zero_grad()
        for _ in range(2):  # two forwards before one backward (gradient accumulation) must stay legal
            nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
        for name, w in P.prunable_weights(m).items():
            assert torch.all(w.grad[~masks[name]] == 0)
        opt.step()
        m(x)  # the forward re-applies the masks after the step
        for name, w in P.prunable_weights(m).items():
            assert torch.all(w[~masks[name]] == 0)
            assert int((w != 0).sum()) <= int(masks[name].sum())
    assert P.sparsity(m) >= 0.7 - 1e-3
    weights = P.prunable_weights(m)
    for name, w in weights.items():  # layer scope: every matrix exactly
        assert int((~masks[name]).sum()) == round(0.7 * w.numel())
    clone = copy.deepcopy(m)  # a copy keeps its masks working, gradient masking included
    nn.functional.cross_entropy(clone(x).flatten(0, 1), y.flatten()).backward()
    for name, w in P.prunable_weights(clone).items():
        assert torch.all(w.grad[~masks[name]] == 0) and torch.all(w[~masks[name]] == 0)
    P.remove_masks(clone)  # removing the copy's masks leaves the original's hooks alone
    opt.zero_grad()
    nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
    assert all(torch.all(w.grad[~masks[n]] == 0) for n, w in P.prunable_weights(m).items())
    assert P.sparsity(clone) == pytest.approx(P.sparsity(m))
    P.remove_masks(m)
    assert P.current_masks(m) == {} and not hasattr(m.blocks[0].attn.qkv, "weight_mask")
    assert P.sparsity(m) == pytest.approx(P.sparsity(clone))  # the zeros stay
    opt.zero_grad()
    nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
    w = m.blocks[0].ffn.fc1.weight
    assert bool((w.grad[~masks["blocks.0.ffn.fc1.weight"]] != 0).any())  # hooks gone: pruned entries get gradients


def test_prune_magnitude_global_is_cumulative():
    m = tiny()
    first = P.prune_magnitude(m, 0.3)
    second = P.prune_magnitude(m, 0.5)
    total = sum(w.numel() for w in P.prunable_weights(m).values())
    assert sum(int((~k).sum()) for k in second.values()) == round(0.5 * total)
    assert all(not bool((~first[n] & second[n]).any()) for n in first)  # once pruned, always pruned
    assert P.sparsity(m) == pytest.approx(round(0.5 * total) / total)


def test_apply_masks_errors():
    m = tiny()
    with pytest.raises(ValueError, match="not a prunable weight"):
        P.apply_masks(m, {"tok_emb.weight": torch.ones(23, 32, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool tensor"):
        P.apply_masks(m, {"blocks.0.ffn.fc1.weight": torch.ones(48, 32)})
    with pytest.raises(ValueError, match=r"has shape \(32, 48\)"):
        P.apply_masks(m, {"blocks.0.ffn.fc1.weight": torch.ones(32, 48, dtype=torch.bool)})
    with pytest.raises(TypeError, match="masks must be a dict"):
        P.apply_masks(m, [1])


def test_iterative_prune_schedule_and_records():
    m = tiny()
    seen = []

    def finetune(model, r):
        seen.append((r, P.sparsity(model)))
        return {"loss": float(r)} if r % 2 else r

    records = P.iterative_prune(m, finetune, target=0.55, rate=0.2)
    expected = [0.2, 0.36, 0.488, 0.55]
    assert [rec["round"] for rec in records] == [1, 2, 3, 4]
    assert [rec["target_sparsity"] for rec in records] == pytest.approx(expected)
    total = sum(w.numel() for w in P.prunable_weights(m).values())
    assert [rec["sparsity"] for rec in records] == pytest.approx([round(s * total) / total for s in expected])
    assert [s for _, s in seen] == pytest.approx([rec["sparsity"] for rec in records])
    assert records[0]["loss"] == 1.0 and records[1]["result"] == 2
    assert P.sparsity_schedule(0.9, 0.5) == pytest.approx([0.5, 0.75, 0.875, 0.9])
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\)"):
        P.iterative_prune(m, finetune, target=0.5, rate=1.0)
    with pytest.raises(ValueError, match=r"target must be a number in \[0, 1\)"):
        P.iterative_prune(m, finetune, target=1.0)
    with pytest.raises(TypeError, match="finetune must be a callable"):
        P.iterative_prune(m, None, target=0.5)


def test_model_size_tiny_closed_form():
    m = tiny()
    d, V, n, ff, L = 32, 23, 16, 48, 2
    size = P.model_size(m)
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d
    assert size["encoder"] == L * per_layer
    assert size["embeddings"] == V * d + n * d and size["token_embeddings"] == V * d
    assert size["other"] == 2 * d + d * V + V  # final LayerNorm + LM head
    assert size["total"] == size["encoder"] + size["embeddings"] + size["other"]
    assert size["prunable"] == size["nonzero_prunable"] == L * (4 * d * d + 2 * d * ff)
    assert size["bytes"] == 4 * size["total"] == size["nonzero_bytes"]
    P.prune_magnitude(m, 0.5)
    after = P.model_size(m)
    assert after["nonzero_prunable"] == size["prunable"] - round(0.5 * size["prunable"])
    assert after["bytes"] - after["nonzero_bytes"] == 4 * round(0.5 * size["prunable"])


def test_model_size_minilm(minilm):
    size = P.model_size(minilm[0])
    assert size["total"] == 22_565_376  # + HF's unused pooler (147,840) = the 22.7 M of the model card
    assert size["token_embeddings"] == 30522 * 384 == 11_720_448  # the "11.7 M"
    assert size["embeddings"] == 11_918_592 and size["encoder"] == 10_646_784 and size["other"] == 0
    assert size["prunable"] == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert len(P.prunable_weights(minilm[0])) == 24


# ---------------------------------------------------------------------------------------------------------------
# head importance (Michel et al. 2019)
# ---------------------------------------------------------------------------------------------------------------


def _gated_loss(model, gates, x):
    for a, g in zip([b.attn for b in model.blocks], gates):
        a.head_gate = g
    return model(x).logsumexp(-1).pow(2).mean()


def test_head_importance_equals_finite_differences_of_the_gate():
    m = tiny(n_layers=1, n_heads=4, dtype=torch.float64)
    batches = [tokens(seed=1), tokens(B=2, seed=7)]

    def loss_fn(model, x):
        return model(x).logsumexp(-1).pow(2).mean()

    imp = P.head_importance(m, batches, loss_fn, normalize=False)
    assert imp.shape == (1, 4) and imp.dtype == torch.float64
    gate = m.blocks[0].attn.head_gate
    assert m.blocks[0].attn.gate_is_untouched() and not gate.requires_grad  # restored
    eps, expected = 1e-6, torch.zeros(4, dtype=torch.float64)
    for x in batches:  # E_x |∂L/∂ξ_h| by central differences at ξ = 1
        for h in range(4):
            e = torch.zeros(4, dtype=torch.float64)
            e[h] = eps
            with torch.no_grad():
                up = _gated_loss(m, [torch.ones(4, dtype=torch.float64) + e], x)
                down = _gated_loss(m, [torch.ones(4, dtype=torch.float64) - e], x)
            expected[h] += abs(float(up - down) / (2 * eps)) / len(batches)
    m.blocks[0].attn.head_gate = gate
    torch.testing.assert_close(imp[0], expected, atol=1e-6, rtol=1e-5)
    assert bool((expected > 0).all())
    normed = P.head_importance(m, batches, loss_fn)
    torch.testing.assert_close(normed[0], expected / expected.norm(), atol=1e-6, rtol=1e-5)


def test_head_importance_of_a_distance_to_itself_is_zero_and_bad_inputs():
    m = tiny(dtype=torch.float64)
    x = tokens()
    with torch.no_grad():
        ref = m(x)
    imp = P.head_importance(m, [x], lambda model, b: (model(b) - ref).pow(2).sum(), normalize=False)
    assert torch.count_nonzero(imp) == 0  # why head importance needs a real task loss
    with pytest.raises(ValueError, match="batches is empty"):
        P.head_importance(m, [], lambda model, b: model(b).sum())
    with pytest.raises(TypeError, match="scalar tensor"):
        P.head_importance(m, [x], lambda model, b: model(b))
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        P.head_importance(m, [x], None)
    assert all(b.attn.gate_is_untouched() for b in m.blocks)  # restored after an error too


def test_head_importance_keeps_masked_heads_masked():
    m = tiny(dtype=torch.float64)
    P.mask_heads(m, {1: [2]})
    x = tokens()
    P.head_importance(m, [x], lambda model, b: model(b).logsumexp(-1).mean())
    assert m.blocks[1].attn.head_gate.tolist() == [1, 1, 0, 1]


def test_topic_contrastive_loss_matches_a_loop_and_moves_the_gates(minilm):
    encoder, tokenizer = minilm
    sentences = ["The striker scored twice in the final.", "Fans cheered as the goalkeeper saved a penalty.",
                 "Stir the soup slowly and add salt.", "Roast the potatoes with garlic and thyme.",
                 "The server crashed again.", "Restart the laptop after the update."]
    topics = ["football", "football", "cooking", "cooking", "computers", "computers"]
    loss = P.topic_contrastive_loss(encoder, sentences, topics)
    with torch.no_grad():
        batch = tokenizer(sentences)
        e = mean_pool(encoder(**batch), batch["attention_mask"]).double()
    s = e @ e.T / 0.05
    expected = 0.0
    for i in range(6):
        others = [j for j in range(6) if j != i]
        log_z = torch.logsumexp(s[i, others], 0)
        pos = [j for j in others if topics[j] == topics[i]]
        expected += -sum(float(s[i, p] - log_z) for p in pos) / len(pos) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    imp = P.head_importance(encoder, [(sentences, topics)], lambda m, b: P.topic_contrastive_loss(m, *b))
    assert imp.shape == (6, 12) and bool(torch.isfinite(imp).all()) and bool((imp > 0).all())
    torch.testing.assert_close(imp.norm(dim=1), torch.ones(6, dtype=torch.float64))
    assert all(b.attn.gate_is_untouched() for b in encoder.blocks)
    with pytest.raises(ValueError, match="no two sentences share a topic"):
        P.topic_contrastive_loss(encoder, sentences[:2], ["a", "b"])
    with pytest.raises(ValueError, match="one label per sentence"):
        P.topic_contrastive_loss(encoder, sentences, topics[:3])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        P.topic_contrastive_loss(encoder, sentences, topics, temperature=0)
    batches = P.topic_batches(sentences * 2, topics * 2, batch_size=4, per_topic=2)
    assert all(len(set(t)) * 2 == len(t) for _, t in batches) and sum(len(s) for s, _ in batches) == 12


# ---------------------------------------------------------------------------------------------------------------
# physical head removal == gated model
# ---------------------------------------------------------------------------------------------------------------


def test_multihead_attention_head_dim_argument():
    mha = MultiHeadAttention(32, 3, head_dim=5)
    assert mha.qkv.weight.shape == (45, 32) and mha.proj.weight.shape == (32, 15) and mha.inner_dim == 15
    x = torch.randn(2, 7, 32)
    assert mha(x).shape == (2, 7, 32) and mha(x, context=torch.randn(2, 4, 32)).shape == (2, 7, 32)
    assert MultiHeadAttention(32, 4).head_dim == 8  # default unchanged
    with pytest.raises(ValueError, match="head_dim must be"):
        MultiHeadAttention(32, 3, head_dim=0)
    with pytest.raises(ValueError, match="divisible by n_heads=3"):
        MultiHeadAttention(32, 3)


HEADS = {0: [1, 3], 1: [0]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_first", [True, False])
def test_pruned_heads_equal_gated_heads_tiny(dtype, norm_first):
    gated = tiny(dtype=dtype, norm_first=norm_first).train()
    pruned = copy.deepcopy(gated)
    P.mask_heads(gated, HEADS)
    P.prune_heads(pruned, HEADS)
    assert [b.attn.n_heads for b in pruned.blocks] == [2, 3]
    assert pruned.blocks[0].attn.qkv.weight.shape == (3 * 2 * 8, 32)
    assert pruned.blocks[0].attn.proj.weight.shape == (32, 2 * 8)
    assert pruned.blocks[1].attn.head_gate.tolist() == [1, 1, 1]
    fresh = P.prune_heads(tiny(), HEADS)  # an untouched gate stays untouched (no multiply by ones)
    assert all(b.attn.gate_is_untouched() for b in fresh.blocks)
    x, y = tokens(), tokens(seed=2)
    out_g, out_p = gated(x), pruned(x)
    torch.testing.assert_close(out_p, out_g, **TOL[dtype])
    nn.functional.cross_entropy(out_g.flatten(0, 1), y.flatten()).backward()
    nn.functional.cross_entropy(out_p.flatten(0, 1), y.flatten()).backward()
    g, p = dict(gated.named_parameters()), dict(pruned.named_parameters())
    for name in ("tok_emb.weight", "blocks.0.ffn.fc1.weight", "blocks.1.ln1.weight", "blocks.0.attn.proj.bias"):
        torch.testing.assert_close(p[name].grad, g[name].grad, **TOL[dtype])
    D = 32  # kept head 2 of layer 0: its rows of q, k and v, its columns of proj
    rows_g = torch.cat([torch.arange(part * D + 16, part * D + 24) for part in range(3)])
    rows_p = torch.cat([torch.arange(part * 16 + 8, part * 16 + 16) for part in range(3)])
    torch.testing.assert_close(p["blocks.0.attn.qkv.weight"].grad[rows_p], g["blocks.0.attn.qkv.weight"].grad[rows_g],
                               **TOL[dtype])
    torch.testing.assert_close(p["blocks.0.attn.proj.weight"].grad[:, 8:16],
                               g["blocks.0.attn.proj.weight"].grad[:, 16:24], **TOL[dtype])


def test_pruning_twice_and_per_layer_head_counts():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=23, d_model=32, n_heads=[4, 2, 8], n_layers=3, d_ff=48, max_len=16)
    gated = Transformer(cfg).eval()
    pruned = copy.deepcopy(gated)
    P.mask_heads(gated, {0: [0], 2: [1, 2, 7]})
    P.prune_heads(pruned, {0: [0], 2: [1, 7]})
    P.prune_heads(pruned, {2: [1]})  # now 0-based among the 6 left: the original head 2
    assert [b.attn.n_heads for b in pruned.blocks] == [3, 2, 5]
    torch.testing.assert_close(pruned(tokens()), gated(tokens()), **TOL[torch.float32])
    P.mask_heads(pruned, {2: [4]})  # a masked gate survives a later pruning of another head
    P.prune_heads(pruned, {2: [0]})
    assert pruned.blocks[2].attn.head_gate.tolist() == [1, 1, 1, 0]


def test_pruned_heads_equal_gated_heads_minilm(minilm):
    encoder, tokenizer = minilm
    heads = {0: [0, 5], 3: list(range(11)), 5: [11]}
    gated, pruned = copy.deepcopy(encoder), copy.deepcopy(encoder)
    P.mask_heads(gated, heads)
    P.prune_heads(pruned, heads)
    assert [b.attn.n_heads for b in pruned.blocks] == [10, 12, 12, 1, 12, 11]
    assert P.model_size(pruned)["encoder"] == 10_646_784 - 14 * (3 * 32 * 384 + 3 * 32 + 384 * 32)
    batch = tokenizer(["A cat sat on the mat.", "Attention is all you need, said the paper."])
    out_g, out_p = gated(**batch), pruned(**batch)
    torch.testing.assert_close(out_p, out_g, **TOL[torch.float32])
    out_g.pow(2).mean().backward()
    out_p.pow(2).mean().backward()
    for name in ("blocks.0.ffn.fc1.weight", "blocks.3.attn.proj.bias", "tok_emb.weight"):
        torch.testing.assert_close(dict(pruned.named_parameters())[name].grad,
                                   dict(gated.named_parameters())[name].grad, atol=1e-5, rtol=1e-3)


def test_head_errors():
    m = tiny()
    with pytest.raises(ValueError, match="head 4 of layer 1 does not exist"):
        P.prune_heads(m, {1: [4]})
    with pytest.raises(ValueError, match="head -1 of layer 0 does not exist"):
        P.mask_heads(m, {0: [-1]})
    with pytest.raises(ValueError, match="layer 2 does not exist"):
        P.prune_heads(m, {2: [0]})
    with pytest.raises(ValueError, match="cannot remove all 4 heads of layer 0.*drop the layer"):
        P.prune_heads(m, {0: [0, 1, 2, 3]})
    with pytest.raises(TypeError, match="heads must be a dict"):
        P.prune_heads(m, [0, 1])
    with pytest.raises(TypeError, match=r"heads\[0\] must be a list"):
        P.prune_heads(m, {0: 1})
    P.prune_magnitude(m, 0.5)
    with pytest.raises(ValueError, match="remove_masks"):
        P.prune_heads(m, {0: [0]})
    assert [b.attn.n_heads for b in m.blocks] == [4, 4]  # nothing changed by a refused call


def test_heads_to_prune():
    imp = torch.tensor([[0.1, 0.9, 0.05], [0.2, 0.3, float("nan")], [0.01, 0.02, 0.5]])
    assert P.heads_to_prune(imp, 0) == {}
    assert P.heads_to_prune(imp, 2) == {2: [0, 1]}
    assert P.heads_to_prune(imp, 4) == {0: [0, 2], 2: [0, 1]}
    assert P.heads_to_prune(torch.tensor([[0.01, 0.02], [0.5, 0.6]]), 2) == {0: [0], 1: [0]}  # a layer's last head
    assert P.heads_to_prune(imp, 5) == {0: [0, 2], 1: [0], 2: [0, 1]}
    with pytest.raises(ValueError, match="at most 5"):
        P.heads_to_prune(imp, 6)
    with pytest.raises(TypeError, match=r"\(L, H\) tensor"):
        P.heads_to_prune(imp[0], 1)
    with pytest.raises(ValueError, match="n must be an int"):
        P.heads_to_prune(imp, -1)


# ---------------------------------------------------------------------------------------------------------------
# layers (Sajjad et al. 2020)
# ---------------------------------------------------------------------------------------------------------------


def test_layers_kept_each_strategy():
    assert P.layers_kept(6, 4, "top") == [0, 1, 2, 3]
    assert P.layers_kept(6, 4, "bottom") == [2, 3, 4, 5]
    assert P.layers_kept(12, 8, "alternate") == [0, 1, 2, 3, 4, 6, 8, 10]  # paper: drop 12, 10, 8, 6 (1-based)
    assert P.layers_kept(12, 8, "alternate_odd") == [0, 1, 2, 3, 5, 7, 9, 11]  # drop 11, 9, 7, 5
    assert P.layers_kept(6, 3, "alternate") == [0, 2, 4]
    assert all(P.layers_kept(6, 6, s) == list(range(6)) for s in P.STRATEGIES)
    with pytest.raises(ValueError, match="at most 3 of 6 layers"):
        P.layers_kept(6, 2, "alternate")
    with pytest.raises(ValueError, match="strategy must be one of"):
        P.layers_kept(6, 2, "middle")
    with pytest.raises(ValueError, match="n_keep=7 is more than n_layers=6"):
        P.layers_kept(6, 7, "top")
    with pytest.raises(ValueError, match="n_keep must be an int ≥ 1"):
        P.layers_kept(6, 0, "top")


def test_drop_layers_tiny_equals_running_the_kept_blocks():
    m = tiny(n_layers=4)
    x = tokens()
    with torch.no_grad():
        h = m.embed_tokens(x)
        for i in (0, 2, 3):
            h = m.blocks[i](h)
        expected = m.logits(h)
    P.drop_layers(m, [0, 2, 3])
    assert m.config.n_layers == 3 and len(m.blocks) == 3
    torch.testing.assert_close(m(x), expected)
    cfg = TransformerConfig(vocab_size=23, d_model=32, n_heads=[4, 2, 8], n_layers=3, d_ff=48, max_len=16)
    m2 = P.drop_layers(Transformer(cfg), [1, 2])
    assert m2.config.n_heads == [2, 8]
    for bad, err in (([0, 0], "repeated"), ([2, 0], "ascending"), ([], "at least one"), ([5], "layer 5 does not exist")):
        with pytest.raises(ValueError, match=err):
            P.drop_layers(m, bad)
    with pytest.raises(TypeError, match="keep must be a list"):
        P.drop_layers(m, 1)


def test_drop_layers_minilm(minilm):
    encoder, tokenizer = minilm
    m = copy.deepcopy(encoder)
    keep = P.layers_kept(6, 3, "alternate")
    P.drop_layers(m, keep)
    assert m.config.n_layers == 3 and len(m.blocks) == 3 and m.blocks[1] is not encoder.blocks[2]
    assert torch.equal(m.blocks[1].attn.qkv.weight, encoder.blocks[2].attn.qkv.weight)
    assert m.embed(["A short sentence."]).shape == (1, 384)
    assert P.model_size(m)["encoder"] == 10_646_784 // 2


def test_sparse_linear_is_re_exported():
    from effedu.general.sparse_linear import SparseLinear

    assert P.SparseLinear is SparseLinear
