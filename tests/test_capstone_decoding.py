"""Chapter 21: decoding speed. The cached decoders must give exactly the full forward's logits (float64, 1e-10):
dense + KV cache = dense, window cache = causal local attention, RNN = causal linear attention; the window cache
and the RNN state do not grow with the context (bytes, not time)."""
import pytest
import torch

from effedu.capstone import decoding as D
from effedu.model import Transformer, TransformerConfig


def _model(attention, **kw):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=17, d_model=24, n_heads=3, n_layers=2, d_ff=40, max_len=64,
                            attention=attention, attention_kwargs=kw)
    return Transformer(cfg).double().eval()


def _check_against_full_forward(model, dec, T0=13, n_new=9, B=2):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (B, T0), generator=gen)
    logits = dec.prefill(tokens, capacity=T0 + n_new)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(tokens)[:, -1], rtol=0, atol=1e-10)
        for _ in range(n_new):
            nxt = logits.argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            logits = dec.step(nxt)
            torch.testing.assert_close(logits, model(tokens)[:, -1], rtol=0, atol=1e-10)


def test_kv_cache_equals_full_forward():
    m = _model("dense")
    _check_against_full_forward(m, D.KVCacheDecoder(m))


@pytest.mark.parametrize("window,T0", [(6, 13), (9, 2), (4, 1)])  # prompt longer / shorter than the window
def test_window_cache_equals_local_attention(window, T0):
    m = _model("local", window=window)
    _check_against_full_forward(m, D.KVCacheDecoder(m, window=window), T0=T0)


def test_rnn_equals_causal_linear_attention():
    m = _model("linear")
    _check_against_full_forward(m, D.RecurrentDecoder(m))


def test_recompute_equals_generate():
    m = _model("dense")
    prompt = torch.randint(0, 17, (1, 5), generator=torch.Generator().manual_seed(2))
    dec = D.RecomputeDecoder(m)
    logits, tokens = dec.prefill(prompt), prompt
    for _ in range(4):
        nxt = logits.argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        logits = dec.step(nxt)
    assert torch.equal(tokens, m.generate(prompt, 4, temperature=0))


def _state_after(dec, model, t):
    prompt = torch.randint(0, 17, (1, t), generator=torch.Generator().manual_seed(3))
    logits = dec.prefill(prompt, capacity=t + 2)
    dec.step(logits.argmax(-1))
    return dec.state_bytes()


def test_state_size_independent_of_context():
    lin, loc, den = _model("linear"), _model("local", window=8), _model("dense")
    assert _state_after(D.RecurrentDecoder(lin), lin, 10) == _state_after(D.RecurrentDecoder(lin), lin, 50) > 0
    w = D.KVCacheDecoder
    assert _state_after(w(loc, window=8), loc, 10) == _state_after(w(loc, window=8), loc, 50) > 0
    # the KV cache grows linearly with the positions it holds
    assert _state_after(w(den), den, 50) > 4 * _state_after(w(den), den, 10)


def test_bad_input():
    m = _model("dense")
    with pytest.raises(TypeError, match="model"):
        D.KVCacheDecoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="window"):
        D.KVCacheDecoder(m, window=0)
    with pytest.raises(ValueError, match="prefill"):
        D.KVCacheDecoder(m).step(torch.tensor([1]))
    with pytest.raises(ValueError, match="capacity"):
        D.KVCacheDecoder(m).prefill(torch.zeros(1, 5, dtype=torch.long), capacity=3)
    with pytest.raises(ValueError, match="method"):
        D.make_decoder("nope", m)
    with pytest.raises(ValueError, match="threads"):
        D.run_decoding(quick=True, threads=0)
    with pytest.raises(ValueError, match="causal"):
        D.KVCacheDecoder(Transformer(TransformerConfig(causal=False)))


def test_run_decoding_quick_schema():
    lines = []
    out = D.run_decoding(quick=True, log=lines.append, threads=1)
    rows = out["rows"]
    assert {r["method"] for r in rows} == set(D.METHODS)
    assert {r["context"] for r in rows} == set(D.QUICK["contexts"])
    for r in rows:
        assert set(r) >= {"method", "context", "ms_per_token", "peak_mib", "chapter", "note"}
        assert r["ms_per_token"] > 0 and r["peak_mib"] >= 0 and isinstance(r["chapter"], int)
    assert len(lines) == len(rows)
    assert out["settings"]["seconds"] < 20
