"""The from-scratch Transformer: shapes, causality, pluggable attention, config validation, bad input."""
import pytest
import torch

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
