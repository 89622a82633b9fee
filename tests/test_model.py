"""The from-scratch Transformer: shapes, causality, pluggable attention, config validation, bad input, and the
seams later chapters use (hidden states, head gate, per-layer config, pluggable FFN + aux losses, norm, memory)."""
import pytest
import torch
import torch.nn as nn

from effedu import model as M
from effedu.attention import register
from effedu.attention.dense import softmax_attention
from effedu.model import Block, FeedForward, Transformer, TransformerConfig, gelu


def small(**kw):
    cfg = dict(vocab_size=32, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=40)
    cfg.update(kw)
    return TransformerConfig(**cfg)


def test_logits_shape_and_dtype():
    torch.manual_seed(0)
    model = Transformer(small())
    tokens = torch.randint(0, 32, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, 32) and logits.dtype == torch.float32


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("attention", ["dense", "tiled"])
def test_causal_lm_does_not_look_ahead(norm_first, attention):
    torch.manual_seed(0)
    model = Transformer(small(norm_first=norm_first, attention=attention)).eval()
    tokens = torch.randint(0, 32, (2, 20))
    t = 11
    changed = tokens.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 7) % 32
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])  # logits ≤ t unchanged
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3  # later ones do change


def test_encoder_does_look_everywhere():
    torch.manual_seed(0)
    model = Transformer(small(causal=False)).eval()
    tokens = torch.randint(0, 32, (1, 12))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 32
    assert (model(tokens)[0, 0] - model(changed)[0, 0]).abs().max() > 1e-4


def test_tiled_and_dense_models_agree_with_gradients():
    torch.manual_seed(0)
    dense = Transformer(small(attention="dense"))
    tiled = Transformer(small(attention="tiled"))
    tiled.load_state_dict(dense.state_dict())
    tokens = torch.randint(0, 32, (2, 23))
    a, b = dense(tokens), tiled(tokens)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(dense.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_callable_attention_and_kwargs_are_passed_through():
    calls = []

    def spy(q, k, v, *, causal=False, mask=None, temperature=1.0):
        calls.append((tuple(q.shape), causal, temperature))
        return softmax_attention(q, k, v, causal=causal, mask=mask, scale=temperature / q.shape[-1] ** 0.5)

    torch.manual_seed(0)
    model = Transformer(small(attention=spy, attention_kwargs={"temperature": 0.5}, n_layers=3))
    model(torch.randint(0, 32, (2, 9)))
    assert calls == [((2, 4, 9, 8), True, 0.5)] * 3


def test_module_attention_gets_built_per_layer_and_trains():
    @register("test-learned-temperature")
    class LearnedTemperature(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.log_t = torch.nn.Parameter(torch.zeros(config.n_heads, 1, 1))

        def forward(self, q, k, v, *, causal=False, mask=None, return_weights=False):
            return softmax_attention(q * self.log_t.exp(), k, v, causal=causal, mask=mask,
                                     return_weights=return_weights)

    model = Transformer(small(attention="test-learned-temperature"))
    temps = [b.attn.attn_fn.log_t for b in model.blocks]
    assert len({id(t) for t in temps}) == 2  # one per layer
    model(torch.randint(0, 32, (2, 9))).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in temps)


def test_return_attentions_shapes_and_rows_sum_to_one():
    torch.manual_seed(0)
    model = Transformer(small()).eval()
    logits, atts = model(torch.randint(0, 32, (2, 10)), return_attentions=True)
    assert len(atts) == 2 and atts[0].shape == (2, 4, 10, 10)
    torch.testing.assert_close(atts[1].sum(-1), torch.ones(2, 4, 10))
    with pytest.raises(ValueError, match="return_weights=True is impossible"):
        Transformer(small(attention="tiled"))(torch.randint(0, 32, (1, 4)), return_attentions=True)


def test_blocks_and_ffn():
    x = torch.randn(2, 5, 32)
    ffn = FeedForward(32, 64)
    assert ffn(x).shape == x.shape
    torch.testing.assert_close(gelu(x), torch.nn.functional.gelu(x))
    for nf in (True, False):
        assert Block(small(norm_first=nf))(x).shape == x.shape


def test_generate_is_deterministic_with_a_generator():
    torch.manual_seed(0)
    model = Transformer(small()).eval()
    prompt = torch.randint(0, 32, (1, 3))
    a = model.generate(prompt, 5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 8) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(d_model=30, n_heads=4), ValueError, "divisible by n_heads"),
        (dict(n_layers=0), ValueError, "n_layers must be a positive int"),
        (dict(dropout=1.5), ValueError, "dropout must be in"),
        (dict(attention="nope"), ValueError, "unknown attention 'nope'"),
        (dict(attention=3), TypeError, "registered name or a callable"),
        (dict(causal="yes"), TypeError, "causal must be a bool"),
    ],
)
def test_config_validation(kw, exc, match):
    with pytest.raises(exc, match=match):
        small(**kw)


def test_bad_tokens():
    model = Transformer(small(max_len=16))
    with pytest.raises(ValueError, match="T=17 exceeds max_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"must be \(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=32\)"):
        model(torch.full((1, 4), 32))
    with pytest.raises(TypeError, match="TransformerConfig"):
        Transformer({"d_model": 4})


# --------------------------------------------------------------------------------------------------------------
# seams: embed_tokens / logits, init_weights, one loss, hidden states, head gate, per-layer config, pluggable FFN,
# auxiliary losses, norm and residual scale, keys longer than queries
# --------------------------------------------------------------------------------------------------------------


def test_embed_blocks_logits_is_forward_and_one_loss():
    torch.manual_seed(0)
    model = Transformer(small(dropout=0.1)).eval()
    tokens = torch.randint(0, 32, (2, 9))
    x = model.embed_tokens(tokens)
    assert x.shape == (2, 9, 32)
    for block in model.blocks:
        x = block(x)
    torch.testing.assert_close(model.logits(x), model(tokens), rtol=0, atol=0)
    assert Transformer._init_weights is M.init_weights
    from effedu import train

    assert train.lm_loss is M.lm_loss and train.IGNORE == M.IGNORE == -100
    logits, targets = torch.randn(2, 3, 5), torch.tensor([[1, -100, 2], [0, 4, -100]])
    keep = targets != -100
    torch.testing.assert_close(M.lm_loss(logits, targets),
                               torch.nn.functional.cross_entropy(logits[keep], targets[keep]))


def test_return_hidden_gives_the_l_plus_1_states():
    torch.manual_seed(0)
    model = Transformer(small(n_layers=3)).eval()
    tokens = torch.randint(0, 32, (2, 7))
    logits, hidden = model(tokens, return_hidden=True)
    assert len(hidden) == 4 and all(h.shape == (2, 7, 32) for h in hidden)
    torch.testing.assert_close(hidden[0], model.embed_tokens(tokens), rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[1](hidden[1]), hidden[2], rtol=0, atol=0)
    torch.testing.assert_close(model.logits(hidden[-1]), logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, model(tokens), rtol=0, atol=0)
    logits2, atts, hidden2 = model(tokens, return_attentions=True, return_hidden=True)
    assert len(atts) == 3 and len(hidden2) == 4
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)


def test_head_gate_zero_equals_removing_the_head_from_w_o():
    torch.manual_seed(0)
    mha = M.MultiHeadAttention(32, 4, causal=True)
    x = torch.randn(2, 6, 32)
    ref = mha(x)
    assert mha.head_gate.shape == (4,) and mha.gate_is_untouched()
    assert "head_gate" not in mha.state_dict()  # not saved: old checkpoints load unchanged
    mha64 = M.MultiHeadAttention(32, 4, causal=True).double()
    assert mha64.head_gate.dtype == torch.float64 and mha64.gate_is_untouched()
    with torch.no_grad():
        mha.head_gate[2] = 0
    assert not mha.gate_is_untouched()
    pruned = mha(x)
    # oracle: the same module with head 2's columns of W_o zeroed (head h feeds columns h·Dh … (h+1)·Dh of W_o)
    with torch.no_grad():
        mha.head_gate.fill_(1)
        mha.proj.weight[:, 16:24] = 0
    torch.testing.assert_close(pruned, mha(x))
    assert not torch.allclose(pruned, ref)


def test_per_layer_head_counts():
    torch.manual_seed(0)
    cfg = small(n_layers=3, n_heads=(4, 2, 8))
    model = Transformer(cfg).eval()
    assert [b.attn.n_heads for b in model.blocks] == [4, 2, 8]
    assert [b.attn.head_gate.numel() for b in model.blocks] == [4, 2, 8]
    assert cfg.layer(1).n_heads == 2 and cfg.layer(1).head_dim == 16
    assert small().layer(0) is not None and small().layer(1).n_heads == 4
    _, atts = model(torch.randint(0, 32, (1, 5)), return_attentions=True)
    assert [a.shape[1] for a in atts] == [4, 2, 8]
    with pytest.raises(ValueError, match="use config.layer"):
        cfg.head_dim
    with pytest.raises(ValueError, match="one per layer"):
        small(n_layers=3, n_heads=(4, 2))
    with pytest.raises(ValueError, match="divisible by n_heads=3"):
        small(n_layers=2, n_heads=[4, 3])


def test_per_layer_attention_kwargs_reach_each_layer():
    seen = []

    def recording(q, k, v, *, causal, mask=None, tag=None, return_weights=False):
        seen.append(tag)
        return softmax_attention(q, k, v, causal=causal, mask=mask, return_weights=return_weights)

    model = Transformer(small(n_layers=3, attention=recording, attention_kwargs=[{"tag": 0}, {"tag": 1}, {"tag": 2}]))
    model(torch.randint(0, 32, (1, 4)))
    assert seen == [0, 1, 2]
    with pytest.raises(TypeError, match="attention_kwargs must be a dict"):
        small(n_layers=2, attention_kwargs=[{}, 3])


class _ScaledFFN(nn.Module):
    """A pluggable FFN that records an auxiliary loss (the square of its output's mean)."""

    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.ffn = layer, M.FeedForward(config.d_model, config.d_ff)

    def forward(self, x):
        y = self.ffn(x)
        M.add_aux_loss(self, y.mean().square())
        return y


def test_pluggable_ffn_and_aux_losses():
    torch.manual_seed(0)
    model = Transformer(small(n_layers=3, ffn=_ScaledFFN))
    assert [b.ffn.layer for b in model.blocks] == [0, 1, 2]
    assert isinstance(Transformer(small()).blocks[0].ffn, M.FeedForward)  # the default
    tokens = torch.randint(0, 32, (2, 5))
    assert float(model.aux_loss()) == 0.0  # nothing recorded yet
    out, hidden = model(tokens, return_hidden=True)
    expected = sum(b.ffn.ffn(b.ln2(h + b.attn(b.ln1(h)))).mean().square() for b, h in zip(model.blocks, hidden))
    torch.testing.assert_close(model.aux_loss(), expected)
    assert len(model.aux_channel.values) == 3
    model(tokens)
    assert len(model.aux_channel.values) == 3  # a new forward starts afresh
    (out.sum() + model.aux_loss()).backward()
    with model.recomputing():
        model(tokens)
    assert model.aux_channel.values == []  # recorded while recomputing: dropped
    with pytest.raises(RuntimeError, match="no aux_channel"):
        M.add_aux_loss(nn.Linear(2, 2), torch.tensor(1.0))
    with pytest.raises(TypeError, match="must return an nn.Module"):
        Transformer(small(ffn=lambda config, i: None))
    with pytest.raises(ValueError, match="unknown ffn"):
        small(ffn="moe")


def test_norm_none_post_pre_and_norm_first():
    torch.manual_seed(0)
    none = Transformer(small(norm="none"))
    assert not any(isinstance(m, nn.LayerNorm) for m in none.modules())
    assert small(norm="post").norm_first is False and small(norm="pre", norm_first=False).norm_first is True
    assert small(norm_first=False).norm_kind == "post" and small().norm_kind == "pre"
    assert small(norm="post").replace(norm_first=True).norm_kind == "pre"  # norm_first alone resets norm
    tokens = torch.randint(0, 32, (2, 6))
    torch.manual_seed(1)
    a = Transformer(small(norm="post"))
    torch.manual_seed(1)
    b = Transformer(small(norm_first=False))
    torch.testing.assert_close(a(tokens), b(tokens), rtol=0, atol=0)
    # no LayerNorm: x = x + MHA(x); x = x + FFN(x); logits = head(x)
    x = none.embed_tokens(tokens)
    for blk in none.blocks:
        x = x + blk.attn(x)
        x = x + blk.ffn(x)
    torch.testing.assert_close(none(tokens), none.head(x))
    with pytest.raises(ValueError, match="unknown norm"):
        small(norm="rms")


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_residual_scale_per_branch(norm):
    torch.manual_seed(0)
    blk = Block(small(norm=norm, residual_scale=(0.5, 2.0)))
    x = torch.randn(2, 5, 32)
    if norm == "pre":
        h = x + 0.5 * blk.attn(blk.ln1(x))
        ref = h + 2.0 * blk.ffn(blk.ln2(h))
    else:
        h = blk.ln1(x + 0.5 * blk.attn(x))
        ref = blk.ln2(h + 2.0 * blk.ffn(h))
    torch.testing.assert_close(blk(x), ref)
    zero = Block(small(norm="pre", residual_scale=0.0))
    torch.testing.assert_close(zero(x), x, rtol=0, atol=0)  # ReZero at init: every block is the identity
    with pytest.raises(TypeError, match="residual_scale"):
        small(residual_scale="big")


def _end_aligned_oracle(T, S):
    return torch.tensor([[j <= i + S - T for j in range(S)] for i in range(T)])


@pytest.mark.parametrize("T,S", [(1, 5), (3, 7), (4, 4)])
def test_keys_longer_than_queries_causal_mask_is_end_aligned(T, S):
    torch.manual_seed(0)
    assert torch.equal(M.end_aligned_causal_mask(T, S), _end_aligned_oracle(T, S))
    mha = M.MultiHeadAttention(32, 4, causal=True)
    x, ctx = torch.randn(2, T, 32), torch.randn(2, S, 32)
    out, w = mha(x, context=ctx, return_weights=True)
    # oracle: the same projections, non-causal attention with the explicit end-aligned mask
    mha_free = M.MultiHeadAttention(32, 4, causal=False)
    mha_free.load_state_dict(mha.state_dict())
    ref, w_ref = mha_free(x, context=ctx, mask=_end_aligned_oracle(T, S), return_weights=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.all(w[..., ~_end_aligned_oracle(T, S)] == 0)
    # and a user mask is combined with it (AND)
    user = torch.ones(T, S, dtype=torch.bool)
    user[:, 0] = False
    ref2 = mha_free(x, context=ctx, mask=user & _end_aligned_oracle(T, S))
    torch.testing.assert_close(mha(x, context=ctx, mask=user), ref2, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["pre", "post", "none"])
def test_block_memory_equals_running_the_whole_sequence(norm):
    torch.manual_seed(0)
    blk = Block(small(norm=norm)).eval()
    mem, x = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    # Transformer-XL: keys/values from [memory; x], queries from x, causal aligned to the end
    # = the last T rows of the block run on the whole sequence [memory; x] (position-wise FFN and norms)
    full = blk(torch.cat([mem, x], dim=1))[:, 5:]
    torch.testing.assert_close(blk(x, memory=mem), full)


def test_token_range_checked_once_off_the_cpu():
    from effedu._checks import check_tokens

    cfg = small()
    bad = torch.full((1, 3), 99)
    with pytest.raises(ValueError, match="token ids must lie"):
        check_tokens(bad, cfg, "t")  # CPU: checked by default
    assert check_tokens(bad, cfg, "t", values=False) == (1, 3)
    model = Transformer(cfg)
    model(torch.zeros(1, 3, dtype=torch.long))
    assert torch.device("cpu") in model.token_range_checked_on
    with pytest.raises(ValueError, match="token ids must lie"):
        model(bad)  # still checked on the CPU, every call


def test_a_model_with_recorded_aux_losses_can_be_copied():
    import copy

    model = Transformer(small(ffn=_ScaledFFN))
    model(torch.randint(0, 32, (1, 4)))
    twin = copy.deepcopy(model)
    assert twin.aux_channel.values == [] and twin.blocks[0].ffn.aux_channel is twin.aux_channel
    assert len(model.aux_channel.values) == 2


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_memory_through_the_tiled_kernel_equals_the_dense_path(backend):
    # the tiled attention aligns the causal diagonal itself (causal_align="bottom_right"): no S×T mask is built
    torch.manual_seed(0)
    dense = Block(small(norm="pre")).eval()
    tiled = Block(small(norm="pre", attention="tiled", attention_kwargs={"backend": backend})).eval()
    tiled.load_state_dict(dense.state_dict())
    assert tiled.attn.takes_causal_align and not dense.attn.takes_causal_align
    mem, x = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(tiled(x, memory=mem), dense(x, memory=mem), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled(x, memory=mem), dense(torch.cat([mem, x], dim=1))[:, 5:], rtol=1e-5, atol=1e-5)
