"""Reversible layers against the ordinary computation: same outputs, same gradients, inverse(forward(x)) ≈ x,
activation memory flat in depth (vs linear for the plain stack), errors that grow with depth in low precision."""
import pytest
import torch
import torch.nn as nn

from effedu import measure
from effedu.general.reversible import (
    AttentionSublayer, FeedForwardSublayer, ReversibleBlock, ReversibleFunction, ReversibleSequence,
    ReversibleTransformer, merge_channels, reconstruction_errors, split_channels,
)
from effedu.model import Transformer, TransformerConfig

from _oracles import TOL


def mlp_block(d, p=0.0):
    f = nn.Sequential(nn.Linear(d, 2 * d), nn.Dropout(p), nn.Tanh(), nn.Linear(2 * d, d))
    g = nn.Sequential(nn.Linear(d, d), nn.Dropout(p), nn.GELU())
    return ReversibleBlock(f, g)


def make_seq(n, d, p=0.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return ReversibleSequence([mlp_block(d, p) for _ in range(n)]).to(dtype)


def inputs(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    x2 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return x1, x2


def loss_of(y1, y2):
    # a loss that weighs both streams differently, so a swapped gradient would show
    return (y1.sin() * 1.5).sum() + (y2 * y2).sum() * 0.25


def grads_of(run, seq, x1, x2, seed=123):
    """Run ``run(x1, x2)`` with the RNG seeded, backprop ``loss_of``; return outputs and every gradient."""
    for t in (x1, x2, *seq.parameters()):
        t.grad = None
    torch.manual_seed(seed)
    y1, y2 = run(x1, x2)
    loss_of(y1, y2).backward()
    trainable = [p for p in seq.parameters() if p.requires_grad]
    return [y1.detach(), y2.detach(), x1.grad.clone(), x2.grad.clone()] + [p.grad.clone() for p in trainable]


# ---------------------------------------------------------------------------------------------------------------
# the coupling and its inverse
# ---------------------------------------------------------------------------------------------------------------


def test_block_computes_the_coupling_and_its_inverse():
    seq = make_seq(1, 7)
    block = seq.blocks[0]
    x1, x2 = inputs((3, 5, 7), torch.float64)
    y1, y2 = block(x1, x2)
    torch.testing.assert_close(y1, x1 + block.f(x2), **TOL[torch.float64])
    torch.testing.assert_close(y2, x2 + block.g(y1), **TOL[torch.float64])
    r1, r2 = block.inverse(y1, y2)
    assert not r1.requires_grad and not r2.requires_grad  # the inverse does not build a graph
    torch.testing.assert_close(r1, x1.detach(), atol=1e-13, rtol=0)
    torch.testing.assert_close(r2, x2.detach(), atol=1e-13, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_sequence_inverse_of_forward_is_identity(dtype, atol):
    seq = make_seq(6, 5, dtype=dtype)
    x1, x2 = inputs((2, 17, 5), dtype)
    with torch.no_grad():
        y1, y2 = seq(x1, x2)
        r1, r2 = seq.inverse(y1, y2)
    assert (y1 - x1).abs().max() > 0.1  # the stack does change its input
    torch.testing.assert_close(r1, x1.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(r2, x2.detach(), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# gradients: the memory-saving backward equals ordinary autograd through the same blocks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 17, 6), (1, 1, 3), (4, 9)])
def test_gradients_equal_plain_autograd(dtype, shape):
    seq = make_seq(4, shape[-1], dtype=dtype)
    x1, x2 = inputs(shape, dtype)
    rev = grads_of(seq, seq, x1, x2)
    ref = grads_of(seq.forward_plain, seq, x1, x2)
    assert len(rev) == 4 + len(list(seq.parameters()))
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for a, b in zip(rev, ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_masks_are_replayed(dtype):
    seq = make_seq(3, 8, p=0.4, dtype=dtype)
    x1, x2 = inputs((2, 11, 8), dtype)
    rev = grads_of(seq, seq, x1, x2)
    ref = grads_of(seq.forward_plain, seq, x1, x2)
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for a, b in zip(rev, ref):
        torch.testing.assert_close(a, b, **tol)
    # a different seed gives different masks: the comparison above is not vacuous
    other = grads_of(seq.forward_plain, seq, x1, x2, seed=7)
    assert (other[0] - ref[0]).abs().max() > 1e-3
    # without the replay, the backward recomputes f and g with fresh masks: gradients come out wrong
    seq.preserve_rng_state = False
    wrong = grads_of(seq, seq, x1, x2)
    assert max(float((a - b).abs().max()) for a, b in zip(wrong[2:], ref[2:])) > 1e-3


def test_forward_consumes_the_same_random_numbers_as_the_plain_path():
    seq = make_seq(2, 4, p=0.5)
    x1, x2 = inputs((3, 4), torch.float64)
    torch.manual_seed(5)
    seq(x1, x2)
    after_rev = torch.rand(3)
    torch.manual_seed(5)
    seq.forward_plain(x1, x2)
    torch.testing.assert_close(torch.rand(3), after_rev, atol=0, rtol=0)


def test_gradcheck_inputs_and_parameters_float64():
    seq = make_seq(2, 3).eval()
    x1, x2 = inputs((2, 3), torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: seq(a, b), (x1, x2))
    params = seq._params()
    assert len(params) == 2 * 6  # f: 2 Linear, g: 1 Linear per block → 6 tensors per block
    # the parameters are passed as inputs of the Function: gradcheck perturbs them in place and checks their grads
    assert torch.autograd.gradcheck(
        lambda a, b, *ps: ReversibleFunction.apply(a, b, list(seq.blocks), True, *ps), (x1, x2, *params)
    )


def test_shared_parameters_accumulate_and_same_tensor_for_both_streams():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double()
    g = nn.Sequential(nn.Linear(5, 5), nn.Sigmoid()).double()
    seq = ReversibleSequence([ReversibleBlock(f, g), ReversibleBlock(f, g), ReversibleBlock(g, f)])
    assert len(seq._params()) == 4  # f and g are shared by the three blocks: each parameter once
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    results = []
    for run in (seq, seq.forward_plain):
        x.grad = None
        seq.zero_grad(set_to_none=True)
        y1, y2 = run(x, x)  # Reformer-style: the same tensor feeds both streams
        loss_of(y1, y2).backward()
        results.append([x.grad.clone()] + [p.grad.clone() for p in seq.parameters()])
    assert len(results[0]) == 5
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_no_graph_in_inference_and_frozen_parameters():
    seq = make_seq(2, 4)
    x1, x2 = inputs((3, 4), torch.float64)
    with torch.no_grad():
        y1, _ = seq(x1, x2)
    assert y1.grad_fn is None
    for p in seq.blocks[0].parameters():
        p.requires_grad_(False)
    rev = grads_of(seq, seq, x1, x2)
    for p in seq.blocks[0].parameters():
        assert p.grad is None
    ref = grads_of(seq.forward_plain, seq, x1, x2)
    for a, b in zip(rev, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------------------------
# memory: flat in depth
# ---------------------------------------------------------------------------------------------------------------


def test_saved_bytes_are_the_top_outputs_only_and_flat_in_depth():
    x1, x2 = inputs((4, 33, 16), torch.float32)
    saved_rev, saved_plain = {}, {}
    for n in (2, 4, 12):
        seq = make_seq(n, 16, dtype=torch.float32)
        saved_rev[n] = measure.saved_activation_bytes(seq, x1, x2)
        saved_plain[n] = measure.saved_activation_bytes(seq.forward_plain, x1, x2)
    assert saved_rev[2] == saved_rev[12] == 2 * 4 * 33 * 16 * 4  # y1 and y2, float32
    per_block = (saved_plain[4] - saved_plain[2]) // 2
    assert per_block > 0 and saved_plain[12] == saved_plain[2] + 10 * per_block  # linear
    assert saved_plain[12] > 10 * saved_rev[12]


@pytest.mark.parametrize("coupling", ["duplicate", "split"])
def test_reversible_transformer_memory_flat_vs_plain_linear(coupling):
    tokens = torch.randint(0, 20, (2, 24), generator=torch.Generator().manual_seed(0))
    rev, plain = {}, {}
    for L in (2, 12):
        cfg = TransformerConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=L, d_ff=32, max_len=32)
        torch.manual_seed(0)
        rev[L] = measure.saved_activation_bytes(ReversibleTransformer(cfg, coupling=coupling), tokens)
        plain[L] = measure.saved_activation_bytes(Transformer(cfg), tokens)
    assert abs(rev[12] - rev[2]) <= 0.1 * rev[2]
    assert plain[12] > 4 * plain[2]


# ---------------------------------------------------------------------------------------------------------------
# numerical error accumulates with depth
# ---------------------------------------------------------------------------------------------------------------


def test_reconstruction_error_grows_with_depth_in_float32_tiny_in_float64():
    cfg = TransformerConfig(vocab_size=8, d_model=16, n_heads=2, n_layers=24, d_ff=32, max_len=16)
    torch.manual_seed(0)
    seq = ReversibleTransformer(cfg).blocks.eval()
    for m in seq.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.15)  # trained-like weights (the 0.02 init barely moves x)
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(0))
    err32 = reconstruction_errors(seq, x, x)
    assert len(err32) == 24
    assert err32[-1] > 10 * err32[1] > 0
    err64 = reconstruction_errors(seq.double(), x.double(), x.double())
    assert max(err64) < 1e-12
    assert err32[-1] > 1e4 * err64[-1]


# ---------------------------------------------------------------------------------------------------------------
# the reversible Transformer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coupling", ["duplicate", "split"])
def test_reversible_transformer_gradients_equal_plain_path(coupling):
    cfg = TransformerConfig(vocab_size=11, d_model=12, n_heads=3 if coupling == "duplicate" else 2, n_layers=3,
                            d_ff=20, max_len=16, dropout=0.2)
    torch.manual_seed(0)
    model = ReversibleTransformer(cfg, coupling=coupling).double()
    tokens = torch.randint(0, 11, (2, 13), generator=torch.Generator().manual_seed(1))
    out = {}
    for eff in (True, False):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(42)
        logits = model(tokens, memory_efficient=eff)
        logits.pow(2).mean().backward()
        out[eff] = [logits.detach()] + [p.grad.clone() for p in model.parameters()]
    assert logits.shape == (2, 13, 11)
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_reversible_transformer_parameters_causality_and_training():
    cfg = TransformerConfig(vocab_size=10, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16)
    torch.manual_seed(0)
    model = ReversibleTransformer(cfg)
    # duplicate coupling: exactly the parameters of the ordinary Transformer
    assert measure.count_parameters(model) == measure.count_parameters(Transformer(cfg))
    assert isinstance(model.blocks.blocks[0].f, AttentionSublayer)
    assert isinstance(model.blocks.blocks[0].g, FeedForwardSublayer)
    tokens = torch.randint(0, 10, (2, 9), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 10
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # causal: the past does not see the future
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4
    # a few optimizer steps on a fixed batch lower the loss
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 10), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_split_and_merge_channels_round_trip():
    x = torch.randn(2, 3, 10)
    a, b = split_channels(x)
    assert a.shape == b.shape == (2, 3, 5)
    torch.testing.assert_close(merge_channels(a, b), x, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------------------------


def test_bad_input():
    seq = make_seq(1, 4)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x1 and x2 must have the same shape.*\(2, 4\).*\(2, 5\)"):
        seq(x, torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="y1 and y2 must have the same shape"):
        seq.inverse(x, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="x1 and x2 must share one dtype"):
        seq(x, x.float())
    with pytest.raises(TypeError, match="x2 must be a torch.Tensor"):
        seq.blocks[0](x, 3.0)
    with pytest.raises(TypeError, match="x1 must be a floating-point tensor"):
        seq(torch.ones(2, 4, dtype=torch.int64), x)
    with pytest.raises(ValueError, match="blocks must hold at least one ReversibleBlock, got an empty list"):
        ReversibleSequence([])
    with pytest.raises(TypeError, match=r"blocks\[1\] must be a ReversibleBlock, got Linear"):
        ReversibleSequence([mlp_block(4), nn.Linear(4, 4)])
    with pytest.raises(TypeError, match="blocks must be a list of ReversibleBlock, got a single ReversibleBlock"):
        ReversibleSequence(mlp_block(4))
    with pytest.raises(TypeError, match="g must be an nn.Module.*got function"):
        ReversibleBlock(nn.Linear(4, 4), lambda t: t)
    with pytest.raises(ValueError, match=r"even number of channels.*got 7 channels"):
        split_channels(torch.randn(2, 7))
    with pytest.raises(TypeError, match="memory_efficient must be a bool"):
        seq(x, x, memory_efficient="yes")
    with pytest.raises(TypeError, match="sequence must be a ReversibleSequence"):
        reconstruction_errors(seq.blocks[0], x, x)
    cfg = TransformerConfig(vocab_size=10, d_model=14, n_heads=2, n_layers=1, d_ff=8, max_len=8)
    with pytest.raises(ValueError, match=r"d_model/2=7 channels, which must be divisible by n_heads=2"):
        ReversibleTransformer(cfg, coupling="split")
    with pytest.raises(ValueError, match=r"needs an even d_model.*got d_model=15"):
        ReversibleTransformer(cfg.replace(d_model=15, n_heads=1), coupling="split")
    with pytest.raises(ValueError, match=r"coupling must be one of \('duplicate', 'split'\), got 'half'"):
        ReversibleTransformer(cfg, coupling="half")
    with pytest.raises(ValueError, match="norm_first must be True"):
        ReversibleTransformer(cfg.replace(norm_first=False))
    with pytest.raises(TypeError, match="config must be a TransformerConfig"):
        ReversibleTransformer({"d_model": 14})
    model = ReversibleTransformer(cfg)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=10\)"):
        model(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="T=9 exceeds max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.int64))
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        model(torch.zeros(1, 3))


def test_reversible_transformer_reuses_the_model_seams_and_drops_recomputed_aux_losses():
    from effedu import model as M

    class AuxFFN(nn.Module):
        def __init__(self, config, layer):
            super().__init__()
            self.ffn = M.FeedForward(config.d_model, config.d_ff)

        def forward(self, x):
            y = self.ffn(x)
            M.add_aux_loss(self, y.square().mean())
            return y

    assert ReversibleTransformer.embed_tokens is Transformer.embed_tokens
    assert ReversibleTransformer.logits is Transformer.logits
    cfg = TransformerConfig(vocab_size=10, d_model=16, n_heads=2, n_layers=3, d_ff=32, max_len=16, ffn=AuxFFN)
    torch.manual_seed(0)
    model = ReversibleTransformer(cfg)
    tokens = torch.randint(0, 10, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = model(tokens, memory_efficient=False)
    ref_aux = model.aux_loss().detach()
    out = model(tokens)
    torch.testing.assert_close(out, ref)
    assert len(model.aux_channel.values) == 3
    out.square().mean().backward()  # rebuilds and recomputes f and g of every block
    assert len(model.aux_channel.values) == 3
    with torch.no_grad():
        torch.testing.assert_close(model.aux_loss(), ref_aux)
    # per-layer head counts reach the attention sub-layers
    model = ReversibleTransformer(cfg.replace(n_heads=(2, 4, 1), ffn="dense"))
    assert [b.f.attn.n_heads for b in model.blocks.blocks] == [2, 4, 1]
