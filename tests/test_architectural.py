"""Chapter 20: Transformer-XL (relative shift, segment recurrence), Compressive Transformer, Funnel, Perceiver —
against explicit gathers, the same model over the whole context, plain block stacks and torch's FLOP counter."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effedu.general import architectural as A
from effedu.model import IGNORE, TransformerConfig
from effedu.train import train

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _cfg(**kw):
    base = dict(vocab_size=23, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=80, causal=True)
    base.update(kw)
    return TransformerConfig(**base)


def _tokens(B=2, T=24, V=23, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _rand(*shape, dtype=torch.float64, g=None):
    return torch.randn(*shape, dtype=dtype, generator=g)


# ---------------------------------------------------------------------------------------------------- rel shift


@pytest.mark.parametrize("T,M", [(1, 0), (5, 0), (5, 4), (3, 7)])
def test_rel_shift_moves_distances_to_key_positions(T, M):
    K = M + T
    x = torch.arange(2 * T * K, dtype=torch.float64).view(2, T, K)
    out = A.rel_shift(x)
    assert out.shape == x.shape
    for i in range(T):
        for j in range(i + M + 1):  # the causal region: out[i, j] = x[i, j + T − 1 − i] (distance i + M − j)
            assert torch.equal(out[:, i, j], x[:, i, j + T - 1 - i])


def test_rel_shift_refuses_fewer_keys_than_queries():
    with pytest.raises(ValueError, match="K ≥ T"):
        A.rel_shift(torch.zeros(5, 3))


def _gather_oracle(q, k, v, r, u, vb, M):
    """Scores by explicit loops: A_ij = (q_i + u)·k_j + (q_i + v)·W_R R_{i+M−j} on j ≤ i + M, softmax, · V."""
    B, H, T, D = q.shape
    K = k.shape[2]
    S = torch.full((B, H, T, K), float("-inf"), dtype=q.dtype)
    for i in range(T):
        for j in range(i + M + 1):
            dist = i + M - j
            rr = r[:, K - 1 - dist]  # row p of r ↔ distance K − 1 − p
            S[:, :, i, j] = ((q[:, :, i] + u) * k[:, :, j]).sum(-1) + ((q[:, :, i] + vb) * rr).sum(-1)
    return torch.softmax(S * D ** -0.5, -1) @ v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,M", [(5, 0), (5, 4), (3, 7), (1, 2)])
def test_relative_attention_equals_explicit_gather(dtype, T, M):
    g = torch.Generator().manual_seed(T * 10 + M)
    B, H, D, Dv, K = 2, 3, 6, 5, M + T
    q, k, v = _rand(B, H, T, D, g=g), _rand(B, H, K, D, g=g), _rand(B, H, K, Dv, g=g)
    r, u, vb = _rand(H, K, D, g=g), _rand(H, D, g=g), _rand(H, D, g=g)
    ref = _gather_oracle(q, k, v, r, u, vb, M)
    args = [t.to(dtype) for t in (q, k, v, r, u, vb)]
    out, w = A.relative_attention(*args, mem_len=M, return_weights=True)
    assert out.shape == (B, H, T, Dv) and w.shape == (B, H, T, K)
    assert (out.double() - ref).abs().max() < TOL[dtype]
    assert torch.all(w[..., torch.ones(T, K, dtype=torch.bool).triu(M + 1)] == 0)  # nothing above the diagonal


def test_the_garbage_above_the_diagonal_is_really_masked(monkeypatch):
    g = torch.Generator().manual_seed(1)
    B, H, T, M, D = 1, 2, 6, 3, 4
    K = M + T
    args = (_rand(B, H, T, D, g=g), _rand(B, H, K, D, g=g), _rand(B, H, K, D, g=g), _rand(H, K, D, g=g),
            _rand(H, D, g=g), _rand(H, D, g=g))
    clean = A.relative_attention(*args, mem_len=M)
    upper = torch.ones(T, K, dtype=torch.bool).triu(M + 1)
    # the shift really leaves non-zero garbage there (so an unmasked implementation would be wrong) …
    x = _rand(T, K, g=g)
    assert A.rel_shift(x)[upper].abs().sum() > 0
    # … and poisoning it changes nothing
    true_shift = A.rel_shift
    monkeypatch.setattr(A, "rel_shift", lambda s: true_shift(s).masked_fill(upper, 1e6))
    assert torch.equal(A.relative_attention(*args, mem_len=M), clean)
    monkeypatch.setattr(A, "rel_shift", lambda s: true_shift(s).masked_fill(upper, float("nan")))
    assert torch.equal(A.relative_attention(*args, mem_len=M), clean)


def test_relative_attention_gradcheck():
    g = torch.Generator().manual_seed(2)
    H, T, M, D = 2, 3, 2, 3
    args = [_rand(*s, g=g).requires_grad_() for s in ((1, H, T, D), (1, H, M + T, D), (1, H, M + T, D),
                                                      (H, M + T, D), (H, D), (H, D))]
    assert torch.autograd.gradcheck(lambda *a: A.relative_attention(*a, mem_len=M), args)


def test_relative_attention_bad_input():
    q, k = torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 5, 2)
    r, b = torch.zeros(1, 5, 2), torch.zeros(1, 2)
    with pytest.raises(ValueError, match="mem_len"):
        A.relative_attention(q, k, k, r, b, b, mem_len=-1)
    with pytest.raises(ValueError, match="mem_len \\+ T"):
        A.relative_attention(q, k, k, r, b, b, mem_len=1)
    with pytest.raises(ValueError, match="causal=False"):
        A.relative_attention(q, k, k, r, b, b, mem_len=2, causal=False)
    with pytest.raises(ValueError, match="r must be"):
        A.relative_attention(q, k, k, r[:, :4], b, b, mem_len=2)


def test_sinusoid_positions():
    P = A.sinusoid_positions(7, 6, dtype=torch.float64)
    assert P.shape == (7, 6)
    assert torch.equal(P[0], torch.tensor([0.0, 0, 0, 1, 1, 1], dtype=torch.float64))
    assert P[5, 0] == pytest.approx(math.sin(5.0)) and P[5, 4] == pytest.approx(math.cos(5 * 10000 ** (-2 / 6)))
    with pytest.raises(ValueError, match="even"):
        A.sinusoid_positions(4, 5)


# ---------------------------------------------------------------------------------------------------- Transformer-XL


@pytest.mark.parametrize("segment_len, mem_len", [(8, 64), (5, 64), (24, 64), (8, 16), (8, 20)])
def test_segments_with_full_memory_equal_the_whole_context(segment_len, mem_len):
    # mem_len 16 and 20 (between one and two segments): the FIFO keeps everything it has while it is not full yet
    torch.manual_seed(0)
    model = A.TransformerXL(_cfg(), mem_len=mem_len).double().eval()
    tokens = _tokens()
    whole, _ = model(tokens)
    seg = A.evaluate_segments(model, tokens, segment_len)
    assert seg.shape == whole.shape == (2, 24, 23)
    assert (seg - whole).abs().max() < 1e-10


def test_memory_is_a_detached_fifo_and_mem_len_zero_forgets():
    torch.manual_seed(0)
    model = A.TransformerXL(_cfg(), mem_len=6).double()
    tokens = _tokens(T=16)
    logits1, mems = model(tokens[:, :8])
    assert [m.shape for m in mems] == [(2, 6, 16)] * 2
    assert all(not m.requires_grad and m.grad_fn is None for m in mems)
    emb = model.tok_emb(tokens[:, 2:8])  # layer 0's memory = its inputs, the last 6 embeddings
    assert torch.equal(mems[0], emb.detach())
    logits2, _ = model(tokens[:, 8:], mems)
    logits2.sum().backward()  # the gradient reaches the weights, not the memory
    assert model.tok_emb.weight.grad is not None and mems[0].grad is None
    # mem_len = 0: a segment is on its own
    forget = A.TransformerXL(_cfg(), mem_len=0).double()
    forget.load_state_dict(model.state_dict())
    _, m0 = forget(tokens[:, :8])
    assert m0[0].shape == (2, 0, 16)
    assert torch.allclose(forget(tokens[:, 8:], m0)[0], forget(tokens[:, 8:])[0], atol=1e-12)
    # … while a memory changes the output
    assert not torch.allclose(model(tokens[:, 8:], mems)[0], model(tokens[:, 8:])[0], atol=1e-6)


def test_transformer_xl_bad_input():
    with pytest.raises(ValueError, match="mem_len"):
        A.TransformerXL(_cfg(), mem_len=-1)
    with pytest.raises(ValueError, match="causal"):
        A.TransformerXL(_cfg(causal=False), mem_len=4)
    model = A.TransformerXL(_cfg(), mem_len=4)
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 3), 99))
    with pytest.raises(ValueError, match="mems"):
        model(_tokens(T=4), mems=[torch.zeros(2, 1, 16)])


def test_recurrent_models_train_with_finite_loss_and_gradients():
    x, y = A.needle_batch(8, 16, n_values=4, n_noise=18, needle_span=(0, 4), seed=0)
    for model in (A.TransformerXL(_cfg(), mem_len=8),
                  A.CompressiveTransformer(_cfg(), mem_len=4, cmem_len=4, compression_rate=2, compression="conv")):
        h = train(model, (x, y), steps=3, step_fn=A.make_xl_step(4), progress=False)
        assert len(h["loss"]) == 3 and all(math.isfinite(v) for v in h["loss"])
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(gr).all() for gr in grads)
        loss, acc = A.classifier_metrics(model, (x, y), segment_len=4)
        assert math.isfinite(loss) and 0 <= acc <= 1


# ---------------------------------------------------------------------------------------------------- Compressive


def test_compress_mean_max_conv():
    g = torch.Generator().manual_seed(3)
    mem = _rand(2, 6, 4, g=g)
    assert torch.allclose(A.compress(mem, 3, "mean"), torch.stack([mem[:, :3].mean(1), mem[:, 3:].mean(1)], 1))
    assert torch.equal(A.compress(mem, 2, "max")[:, 1], torch.maximum(mem[:, 2], mem[:, 3]))
    assert torch.equal(A.compress(mem, 1, "mean"), mem)
    conv = torch.nn.Conv1d(4, 4, 3, stride=3).double()
    c = A.compress(mem, 3, "conv", conv)
    ref = torch.einsum("oik,bki->bo", conv.weight, mem[:, 3:6]) + conv.bias  # second group by hand
    assert c.shape == (2, 2, 4) and torch.allclose(c[:, 1], ref)
    with pytest.raises(ValueError, match="divisible by compression_rate"):
        A.compress(mem, 4)
    with pytest.raises(ValueError, match="compression_rate"):
        A.compress(mem, 0)
    with pytest.raises(TypeError, match="conv"):
        A.compress(mem, 2, "conv")


def test_compressive_memory_holds_the_compressed_evictions():
    torch.manual_seed(0)
    model = A.CompressiveTransformer(_cfg(), mem_len=4, cmem_len=4, compression_rate=2, compression="mean").double()
    tokens = _tokens(T=12)
    mems = None
    for s in range(0, 12, 4):
        _, mems = model(tokens[:, s:s + 4], mems)
    mem, cmem = mems[0]
    emb = model.tok_emb(tokens).detach()
    assert torch.equal(mem, emb[:, 8:12])  # the FIFO: the last 4 inputs of layer 0
    assert torch.allclose(cmem, A.compress(emb[:, :8], 2, "mean"))  # the 8 evicted ones, by 2
    assert cmem.grad_fn is None


def test_compressive_without_compressed_memory_is_transformer_xl():
    torch.manual_seed(0)
    xl = A.TransformerXL(_cfg(), mem_len=4).double()
    cm = A.CompressiveTransformer(_cfg(), mem_len=4, cmem_len=0, compression_rate=2).double()
    cm.load_state_dict(xl.state_dict())
    tokens = _tokens(T=16)
    assert torch.allclose(A.evaluate_segments(cm, tokens, 4), A.evaluate_segments(xl, tokens, 4), atol=1e-12)


def test_reconstruction_loss_trains_only_the_compression():
    torch.manual_seed(0)
    model = A.CompressiveTransformer(_cfg(), mem_len=4, cmem_len=4, compression_rate=2, compression="conv")
    tokens = _tokens(T=12)
    mems = None
    for s in range(0, 12, 4):
        _, mems = model(tokens[:, s:s + 4], mems)
    rec = model.reconstruction_loss
    assert rec is not None and rec.requires_grad and rec.item() > 0
    model.zero_grad()
    rec.backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in model.convs)
    others = [n for n, p in model.named_parameters() if not n.startswith("convs.") and p.grad is not None]
    assert others == []  # no gradient to the attention (nor anything else)
    # the function itself: the attention weights are detached
    attn = model.blocks[0].attn
    h, mem = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    comp = A.compress(mem, 2, "conv", model.convs[0])
    model.zero_grad()
    A.attention_reconstruction_loss(attn, h, mem, comp).backward()
    assert attn.qkv.weight.grad is None and model.convs[0].weight.grad is not None


def test_compressive_bad_input():
    with pytest.raises(ValueError, match="compression_rate"):
        A.CompressiveTransformer(_cfg(), mem_len=4, cmem_len=4, compression_rate=0)
    with pytest.raises(ValueError, match="mem_len"):
        A.CompressiveTransformer(_cfg(), mem_len=3, cmem_len=4, compression_rate=2)
    with pytest.raises(ValueError, match="compression"):
        A.CompressiveTransformer(_cfg(), mem_len=4, cmem_len=4, compression_rate=2, compression="median")
    model = A.CompressiveTransformer(_cfg(), mem_len=4, cmem_len=4, compression_rate=2)
    with pytest.raises(ValueError, match="multiple of compression_rate"):
        model(_tokens(T=5))


# ---------------------------------------------------------------------------------------------------- Funnel


def test_funnel_pool():
    x = torch.arange(2 * 7 * 3, dtype=torch.float64).view(2, 7, 3)
    p = A.funnel_pool(x, 2, separate_cls=True)
    assert p.shape == (2, 4, 3)
    assert torch.equal(p[:, 0], x[:, 0]) and torch.equal(p[:, 2], (x[:, 3] + x[:, 4]) / 2)
    q = A.funnel_pool(x[:, 1:], 3, separate_cls=False)
    assert torch.equal(q[:, 1], x[:, 4:7].mean(1))
    with pytest.raises(ValueError, match="stride=4 must divide"):
        A.funnel_pool(x, 4)
    with pytest.raises(ValueError, match="stride"):
        A.funnel_pool(x, 0)
    assert A.funnel_lengths(65, (1, 1, 1), 2) == [65, 33, 17]


def test_funnel_with_stride_one_is_a_plain_stack_of_blocks():
    torch.manual_seed(0)
    cfg = _cfg(causal=False)
    f = A.FunnelTransformer(cfg, block_layers=(2, 1), pool_stride=1, separate_cls=False).double()
    tokens = _tokens(T=9)
    x = f.tok_emb(tokens) + f.pos_emb(torch.arange(9))
    for layers in f.blocks:
        for block in layers:
            x = block(x)
    assert torch.allclose(f(tokens), f.head(f.ln_f(x.mean(1))), atol=1e-12)


def test_funnel_pools_queries_and_upsamples():
    torch.manual_seed(0)
    f = A.FunnelTransformer(_cfg(), block_layers=(1, 2, 1), pool_stride=2, upsample=True)
    assert f(_tokens(T=17)).shape == (2, 17, 23)
    cls = A.FunnelTransformer(_cfg(), block_layers=(1, 1, 1), pool_stride=2)
    assert cls(_tokens(T=17)).shape == (2, 23)
    with pytest.raises(ValueError, match="stride=2 must divide"):
        cls(_tokens(T=16))
    with pytest.raises(ValueError, match="pool_stride"):
        A.FunnelTransformer(_cfg(), pool_stride=0)
    # the first layer of block 2 attends from 9 pooled queries to the 17 unpooled keys
    seen = {}
    block = cls.blocks[1][0]
    block.attn.register_forward_hook(lambda m, a, kw, out: seen.update(q=a[0].shape, kv=kw["context"].shape),
                                     with_kwargs=True)
    cls(_tokens(T=17))
    assert seen == {"q": (2, 9, 16), "kv": (2, 17, 16)}


# ---------------------------------------------------------------------------------------------------- Perceiver


def test_perceiver_shapes_cross_attention_and_bad_input():
    torch.manual_seed(0)
    p = A.Perceiver(_cfg(), n_latents=5, n_self=1)
    logits, w = p(_tokens(T=31), return_weights=True)
    assert logits.shape == (2, 23) and w.shape == (2, 2, 5, 31)  # m latents × n inputs, per head
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 5))
    with pytest.raises(ValueError, match="n_latents"):
        A.Perceiver(_cfg(), n_latents=0)


def _counted(model, n):
    with FlopCounterMode(display=False) as fc:
        model(_tokens(B=1, T=n))
    return fc.get_total_flops()


def test_flop_formulas_match_torchs_counter_and_perceiver_is_linear_in_n():
    cfg = _cfg()
    head = 2 * cfg.d_model * cfg.vocab_size
    p = A.Perceiver(cfg, n_latents=4, n_cross=2, n_self=2)
    f = A.FunnelTransformer(cfg, block_layers=(2, 1, 1), pool_stride=2)
    for n in (17, 33):
        assert _counted(p, n) == A.perceiver_flops(n, 4, 16, n_cross=2, n_self=2, d_ff=32) + head
        assert _counted(f, n) == A.funnel_flops(n, 16, block_layers=(2, 1, 1), d_ff=32) + head
    pf = [A.perceiver_flops(n, 8, 64) for n in (1024, 2048, 3072, 4096)]
    assert pf[1] - pf[0] == pf[2] - pf[1] == pf[3] - pf[2] > 0  # linear: constant increments
    df = [A.dense_flops(n, 64) for n in (1024, 2048, 3072)]
    assert df[2] - df[1] > df[1] - df[0]  # dense is not
    assert A.funnel_flops(1025, 64, block_layers=(1, 1, 1)) < A.dense_flops(1025, 64, n_layers=3)


def test_classifiers_train_with_finite_loss_and_gradients():
    x, y = A.needle_batch(8, 17, n_values=4, n_noise=18, seed=1)
    for model in (A.FunnelTransformer(_cfg(), block_layers=(1, 1), pool_stride=2),
                  A.FunnelTransformer(_cfg(), block_layers=(1, 1), pool_stride=2, upsample=True),
                  A.Perceiver(_cfg(), n_latents=4, n_self=1)):
        h = train(model, (x, y), steps=3, step_fn=A.classify_step, progress=False)
        assert all(math.isfinite(v) for v in h["loss"])
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(gr).all() for gr in grads)
        assert 0 <= A.classifier_metrics(model, (x, y))[1] <= 1


def test_needle_batch():
    x, y = A.needle_batch(50, 40, n_values=5, n_noise=7, needle_span=(0, 10), seed=4)
    assert x.shape == y.shape == (50, 40) and x.dtype == torch.long
    assert torch.all(x[:, -1] == A.QUERY) and torch.all(y[:, :-1] == IGNORE)
    is_value = (x >= 1) & (x <= 5)
    assert torch.all(is_value.sum(1) == 1) and torch.all(is_value[:, 10:] == 0)  # one needle, in the span
    assert torch.equal(x[is_value], y[:, -1])  # the label is the needle
    assert x.max() < A.needle_vocab_size(5, 7)
    assert torch.equal(A.needle_batch(50, 40, n_values=5, n_noise=7, needle_span=(0, 10), seed=4)[0], x)
    with pytest.raises(ValueError, match="needle_span"):
        A.needle_batch(2, 10, needle_span=(5, 12))

