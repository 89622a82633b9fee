"""Gradient checkpointing (effedu.general.checkpoint) against torch.utils.checkpoint and the plain model.

Oracles: the same computation without checkpointing (gradients), ``torch.utils.checkpoint`` (gradients, and the
bytes saved for backward, which must be *equal*: both save exactly the segment inputs), gradcheck in float64,
and the memory model base + (k − 1)·c + |last|·a (exact on the CPU, where the meter is deterministic).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as tuc

from _oracles import TOL
from effedu import measure
from effedu.general.checkpoint import (
    CheckpointedTransformer,
    checkpoint,
    checkpoint_model,
    checkpoint_sequential,
    even_plan,
    predicted_activation_bytes,
    recompute_timeline,
    recomputed_layers,
    segment_plan,
)
from effedu.model import Block, FeedForward, Transformer, TransformerConfig, add_aux_loss
from effedu.viz import fit_power_law


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: one thread is as fast, and avoids OpenMP oversubscription when the machine is busy
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg(n_layers=4, **kw):
    base = dict(vocab_size=32, d_model=32, n_heads=4, n_layers=n_layers, d_ff=64, max_len=64)
    base.update(kw)
    return TransformerConfig(**base)


def tokens(B=2, T=17, seed=0):
    return torch.randint(0, 32, (B, T), generator=torch.Generator().manual_seed(seed))


def grads_of(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def loss_of(out, seed=1):
    # a weighted sum: every output element gets its own gradient
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)


# ------------------------------------------------------------------------------------------------------------
# checkpoint(fn, *args)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_gradients_match_plain_and_torch_checkpoint(dtype):
    torch.manual_seed(0)
    block = Block(cfg()).to(dtype)
    x0 = torch.randn(3, 17, 32, dtype=dtype)
    runs = {
        "plain": lambda x: block(x),
        "effedu": lambda x: checkpoint(block, x),
        "torch reentrant": lambda x: tuc.checkpoint(block, x, use_reentrant=True),
        "torch non-reentrant": lambda x: tuc.checkpoint(block, x, use_reentrant=False),
    }
    results = {}
    for name, run in runs.items():
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out = run(x)
        loss_of(out).backward()
        results[name] = (out.detach(), x.grad.clone(), grads_of(block))
    out_p, gx_p, gp_p = results["plain"]
    for name in ("effedu", "torch reentrant", "torch non-reentrant"):
        out, gx, gp = results[name]
        torch.testing.assert_close(out, out_p, **TOL[dtype])
        torch.testing.assert_close(gx, gx_p, **TOL[dtype])
        assert gp.keys() == gp_p.keys() and len(gp) == len(list(block.parameters()))
        for k in gp:
            torch.testing.assert_close(gp[k], gp_p[k], **TOL[dtype], msg=f"{name}: {k}")
    # effedu and torch's reentrant variant run the very same operations: bit-identical
    for a, b in zip(results["effedu"][:2], results["torch reentrant"][:2]):
        assert torch.equal(a, b)


def test_tuple_outputs_non_tensor_args_and_inputs_without_grad():
    lin = nn.Linear(5, 6).double()

    def fn(x, y, scale, mode):
        h = torch.tanh(lin(x)) * scale
        return (h + y, h.sum(-1)) if mode == "both" else (h,)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.randn(4, 6, generator=g, dtype=torch.float64)  # does not require grad
    res = {}
    for name, run in (("plain", fn), ("effedu", lambda *a: checkpoint(fn, *a)),
                      ("torch", lambda *a: tuc.checkpoint(fn, *a, use_reentrant=False))):
        lin.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out = run(x, y, 0.5, "both")
        assert isinstance(out, tuple) and len(out) == 2
        loss_of(out).backward()
        res[name] = (out[0].detach(), out[1].detach(), x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone())
    for a, b, c in zip(res["effedu"], res["plain"], res["torch"]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
        torch.testing.assert_close(a, c, **TOL[torch.float64])
    assert y.grad is None
    # only one output used in the loss: the other gets no gradient, nothing breaks
    x = x0.clone().requires_grad_(True)
    a, _ = checkpoint(fn, x, y, 2.0, "both")
    a.sum().backward()
    x2 = x0.clone().requires_grad_(True)
    fn(x2, y, 2.0, "both")[0].sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL[torch.float64])


def test_parameter_grads_even_when_no_input_requires_grad():
    torch.manual_seed(0)
    block = Block(cfg())
    x = torch.randn(2, 9, 32)  # e.g. raw features: no grad needed
    block(x).pow(2).sum().backward()
    ref = grads_of(block)
    block.zero_grad(set_to_none=True)
    out = checkpoint(block, x)
    assert out.requires_grad
    out.pow(2).sum().backward()
    got = grads_of(block)
    assert got.keys() == ref.keys() and len(got) == len(list(block.parameters()))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    # the oracle that handles this case (non-reentrant) agrees
    block.zero_grad(set_to_none=True)
    tuc.checkpoint(block, x, use_reentrant=False).pow(2).sum().backward()
    for k, v in grads_of(block).items():
        torch.testing.assert_close(got[k], v)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64, generator=g)

    def fn(x, y, scale):
        h = torch.tanh(x @ w) * scale
        return h + y.sum(), (h * y[:1]).sin()

    x = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: checkpoint(fn, a, b, 0.5), (x, y))
    # a sequence of layers, every segment checkpointed (the last one too)
    layers = [lambda t: torch.tanh(t * 1.3), lambda t: t.sin() + t, lambda t: t.pow(2) * 0.5, lambda t: t.exp()]
    z = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: checkpoint_sequential(layers, 2, t, checkpoint_last=True), (z,))
    assert torch.autograd.gradcheck(lambda t: checkpoint_sequential(layers, [(0, 1), (1, 4)], t), (z,))


def test_saves_only_the_inputs_like_torch():
    torch.manual_seed(0)
    block = Block(cfg())
    x = torch.randn(2, 17, 32, requires_grad=True)
    ours = measure.saved_activation_bytes(lambda t: checkpoint(block, t), x)
    assert ours == 2 * 17 * 32 * 4  # the input, nothing else
    assert ours == measure.saved_activation_bytes(lambda t: tuc.checkpoint(block, t, use_reentrant=True), x)
    assert ours == measure.saved_activation_bytes(lambda t: tuc.checkpoint(block, t, use_reentrant=False), x)
    assert measure.saved_activation_bytes(block, x) > 10 * ours


def test_no_grad_mode_is_a_plain_call_and_inplace_change_is_detected():
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        out = checkpoint(lin, x)
    assert not out.requires_grad
    torch.testing.assert_close(out, lin(x).detach())
    y = x * 1.0
    out = checkpoint(lin, y)
    y.add_(1.0)  # the checkpoint changed after it was saved: the recomputation would be wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_autocast_is_replayed_in_the_recomputation():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    x0 = torch.randn(4, 16)
    res = []
    for wrap in (lambda f, x: f(x), lambda f, x: checkpoint(f, x)):
        lin.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = wrap(lambda t: torch.relu(lin(t)), x)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        res.append((out.detach(), x.grad.clone(), lin.weight.grad.clone()))
    for a, b in zip(*res):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# dropout and the random state
# ------------------------------------------------------------------------------------------------------------


def _step(model, params_of, tok, seed):
    params_of.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(tok)
    loss_of(out).backward()
    after = torch.rand(4)  # where the global generator stands after the step
    return out.detach(), grads_of(params_of), after


def test_dropout_rng_replay_gives_the_uncheckpointed_gradients():
    torch.manual_seed(0)
    model = Transformer(cfg(n_layers=4, dropout=0.3))
    tok = tokens()
    out0, g0, after0 = _step(model, model, tok, seed=7)
    out1, g1, after1 = _step(CheckpointedTransformer(model, "every"), model, tok, seed=7)
    assert torch.equal(out0, out1)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    assert torch.equal(after0, after1)  # the recomputation put the generator back
    # without the replay the recomputed dropout masks differ: wrong gradients
    out2, g2, _ = _step(CheckpointedTransformer(model, "every", preserve_rng_state=False), model, tok, seed=7)
    assert torch.equal(out0, out2)  # the forward pass itself is unchanged ...
    diff = max(float((g2[k] - g0[k]).abs().max()) for k in g0)
    assert diff > 1e-3  # ... but the gradients are not


def test_dropout_inside_a_single_checkpoint_matches_torch():
    x0 = torch.randn(64, 8)
    lin = nn.Linear(8, 8)
    fn = lambda t: torch.nn.functional.dropout(lin(t), 0.5, training=True)  # noqa: E731
    res = []
    for run in (fn, lambda t: checkpoint(fn, t), lambda t: tuc.checkpoint(fn, t, use_reentrant=True)):
        torch.manual_seed(3)
        x = x0.clone().requires_grad_(True)
        run(x).pow(2).sum().backward()
        res.append(x.grad.clone())
    assert torch.equal(res[0], res[1]) and torch.equal(res[1], res[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_replay():
    torch.manual_seed(0)
    model = Transformer(cfg(n_layers=3, dropout=0.3)).cuda()
    tok = tokens().cuda()
    _, g0, _ = _step(model, model, tok, seed=5)
    _, g1, _ = _step(CheckpointedTransformer(model, "every"), model, tok, seed=5)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k])


# ------------------------------------------------------------------------------------------------------------
# the checkpointed Transformer
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,norm_first,T", [("none", True, 17), ("every", True, 17), (2, True, 1),
                                                  ("sqrt", False, 17), (3, False, 9), ("every", False, 5)])
def test_checkpointed_transformer_logits_and_grads(strategy, norm_first, T):
    torch.manual_seed(0)
    model = Transformer(cfg(n_layers=5, norm_first=norm_first))
    tok = tokens(T=T)
    ref = model(tok)
    loss_of(ref).backward()
    g0 = grads_of(model)
    model.zero_grad(set_to_none=True)
    ck = checkpoint_model(model, strategy)
    out = ck(tok)
    assert torch.equal(out, ref)  # the same operations in the same order
    loss_of(out).backward()
    g1 = grads_of(model)
    assert g1.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **TOL[torch.float32], msg=k)
    assert ck.plan == segment_plan(5, strategy)
    assert list(ck.state_dict()) == [f"model.{k}" for k in model.state_dict()]


def test_checkpointed_transformer_with_mask():
    torch.manual_seed(0)
    model = Transformer(cfg(n_layers=3, causal=False))
    tok = tokens(T=11)
    mask = torch.ones(11, 11, dtype=torch.bool).tril(2)
    ref = model(tok, mask=mask)
    out = CheckpointedTransformer(model, "every")(tok, mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    loss_of(out).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_saved_bytes_equal_torch_checkpoint_sequential():
    torch.manual_seed(0)
    model = Transformer(cfg(n_layers=6))
    tok = tokens()

    class TorchSequential(nn.Module):  # the same model with torch's checkpoint_sequential over the blocks
        def __init__(self, m, reentrant):
            super().__init__()
            self.m, self.reentrant = m, reentrant

        def forward(self, t):
            m = self.m
            x = m.embed_tokens(t)
            x = tuc.checkpoint_sequential(m.blocks, 3, x, use_reentrant=self.reentrant)
            return m.logits(x)

    # torch splits 6 layers into 3 segments of 2 and runs the last one plainly, like even_plan(6, 3)
    ours = measure.saved_activation_bytes(CheckpointedTransformer(model, 2), tok)
    plain = measure.saved_activation_bytes(model, tok)
    for reentrant in (True, False):
        oracle = measure.saved_activation_bytes(TorchSequential(model, reentrant), tok)
        # both keep exactly the segment inputs + the plain last segment: equal to the byte (tolerance 0)
        assert ours == oracle
    assert ours < 0.4 * plain
    every = measure.saved_activation_bytes(CheckpointedTransformer(model, "every"), tok)
    assert every < 0.25 * plain


def test_activation_bytes_vs_depth_linear_and_sqrt():
    B, T, d = 1, 8, 16
    c = B * T * d * 4  # one checkpoint: a (B, T, d) float32 tensor
    tok = torch.randint(0, 32, (B, T), generator=torch.Generator().manual_seed(0))
    plain, sqrt = {}, {}
    models = {}
    for L in (1, 2, 4, 9, 16, 25, 36, 49, 64):
        torch.manual_seed(0)
        models[L] = Transformer(cfg(n_layers=L, d_model=d, n_heads=2, d_ff=32))
        plain[L] = measure.saved_activation_bytes(models[L], tok)
        sqrt[L] = measure.saved_activation_bytes(CheckpointedTransformer(models[L], "sqrt"), tok)
    a = plain[2] - plain[1]  # one layer
    base = plain[1] - a  # embeddings, final LN, head
    for L in plain:
        assert plain[L] == base + L * a  # linear in depth, exactly
        assert sqrt[L] == predicted_activation_bytes(segment_plan(L, "sqrt"), a, c, base)
    squares = [4, 9, 16, 25, 36, 49, 64]
    _, p_plain = fit_power_law(squares, [plain[L] - base for L in squares])
    _, p_sqrt = fit_power_law(squares, [sqrt[L] - base for L in squares])
    assert abs(p_plain - 1.0) < 1e-6
    # (√L − 1)·c + √L·a ∝ √L up to the −c: exponent slightly above ½
    assert 0.5 <= p_sqrt < 0.53
    # uneven depths too, and the other strategies
    for L, strategy in ((7, 3), (10, "every"), (12, 5), (10, "sqrt")):
        m = models.get(L) or Transformer(cfg(n_layers=L, d_model=d, n_heads=2, d_ff=32))
        got = measure.saved_activation_bytes(CheckpointedTransformer(m, strategy), tok)
        assert got == predicted_activation_bytes(segment_plan(L, strategy), a, c, base)


def test_recompute_timeline_peak_is_the_meter_count():
    torch.manual_seed(0)
    model = Transformer(cfg(n_layers=7))
    tok = tokens()
    loss_bytes = tok.numel() * 32 * 4  # the default loss out.pow(2).mean() saves the logits
    plain = recompute_timeline(model, tok)
    ref = measure.memory_timeline(model, tok)
    assert [e["activation_bytes"] for e in plain] == [e["activation_bytes"] for e in ref]
    assert [e["module"] for e in plain] == [e["module"] for e in ref]
    plain_peak = max(e["activation_bytes"] for e in plain)
    for strategy in ("every", 3, "sqrt"):
        ck = CheckpointedTransformer(model, strategy)
        tl = recompute_timeline(ck, tok)
        peak = max(e["activation_bytes"] for e in tl)
        assert tl[-1]["activation_bytes"] == 0 and tl[0]["activation_bytes"] == 0
        rec = [e for e in tl if e["module"].endswith("(recompute)")]
        assert rec and all(e["phase"] == "backward" for e in rec)
        # each checkpointed layer is run a second time: one ln1 event per recomputed block
        assert sum(e["module"].endswith("ln1 (recompute)") for e in rec) == recomputed_layers(ck.plan)
        # the larger segment last: the bytes held at the turn are the peak of the whole step
        assert peak == measure.saved_activation_bytes(ck, tok) + loss_bytes
        assert peak < 0.6 * plain_peak
    # checkpointing the last segment too: lower peak only by what ln_f, head and loss save, more recomputation
    peaks = {}
    for last in (False, True):
        ck = CheckpointedTransformer(model, "sqrt", checkpoint_last=last)
        peaks[last] = max(e["activation_bytes"] for e in recompute_timeline(ck, tok))
        assert sum(e["module"].endswith("ln1 (recompute)") for e in recompute_timeline(ck, tok)) == \
            recomputed_layers(ck.plan, checkpoint_last=last)
    h = torch.randn(2, 17, 32, requires_grad=True)
    after_stack = measure.saved_activation_bytes(lambda t: model.head(model.ln_f(t)).float().pow(2).mean(), h)
    assert 0 < peaks[False] - peaks[True] <= after_stack
    # counter-example: a large *first* segment needs more when it is recomputed than the meter saw at the turn
    ck = CheckpointedTransformer(model, [(0, 5), (5, 6), (6, 7)])
    tl = recompute_timeline(ck, tok)
    assert max(e["activation_bytes"] for e in tl) > measure.saved_activation_bytes(ck, tok) + loss_bytes


# ------------------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", list(range(1, 21)) + [36, 100])
def test_segment_plans_cover_every_layer(L):
    strategies = ["none", "every", "sqrt"] + sorted({1, 2, 3, L} & set(range(1, L + 1)))
    for strategy in strategies:
        plan = segment_plan(L, strategy)
        assert plan[0][0] == 0 and plan[-1][1] == L
        assert all(a < b for a, b in plan) and all(p[1] == q[0] for p, q in zip(plan, plan[1:]))
        sizes = [b - a for a, b in plan]
        assert sizes[-1] == max(sizes)  # the plainly-run last segment is the largest
        if isinstance(strategy, int):
            assert all(s == strategy for s in sizes[1:]) and 1 <= sizes[0] <= strategy
    k = round(math.sqrt(L))
    assert len(segment_plan(L, "sqrt")) == max(1, k)
    assert len(segment_plan(L, "every")) == L and segment_plan(L, "none") == [(0, L)]


def test_an_int_is_layers_per_segment_in_plans_and_the_number_of_segments_in_checkpoint_sequential():
    # segment_plan / CheckpointedTransformer: an int k = k layers per segment; even_plan / checkpoint_sequential
    # (like torch.utils.checkpoint.checkpoint_sequential): an int = the number of segments
    assert segment_plan(12, 4) == even_plan(12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert len(segment_plan(12, 2)) == 6 and len(even_plan(12, 2)) == 2
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=12, d_ff=32, max_len=8))
    assert CheckpointedTransformer(model, 4).plan == even_plan(12, 3)
    calls = []
    layers = [nn.Identity() for _ in range(12)]
    for layer in layers:
        layer.register_forward_hook(lambda m, i, o: calls.append(m))
    x = torch.randn(2, 3, requires_grad=True)
    checkpoint_sequential(layers, 4, x).sum().backward()
    # 4 segments of 3 layers: the first 3 segments (9 layers) recomputed, so 12 + 9 layer calls
    assert len(calls) == 12 + 9


def test_specific_plans_and_costs():
    assert segment_plan(16, "sqrt") == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert segment_plan(12, "sqrt") == [(0, 4), (4, 8), (8, 12)]
    assert segment_plan(10, 3) == [(0, 1), (1, 4), (4, 7), (7, 10)]
    assert segment_plan(3, "every") == [(0, 1), (1, 2), (2, 3)]
    assert even_plan(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert even_plan(5, 5) == segment_plan(5, "every") and even_plan(5, 1) == segment_plan(5, "none")
    assert recomputed_layers(segment_plan(12, "sqrt")) == 8
    assert recomputed_layers(segment_plan(12, "sqrt"), checkpoint_last=True) == 12
    assert recomputed_layers(segment_plan(12, "none")) == 0
    assert predicted_activation_bytes([(0, 4), (4, 8), (8, 12)], 100, 10, 7) == 7 + 2 * 10 + 4 * 100


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: segment_plan(8, "bogus"), ValueError, "unknown strategy 'bogus'"),
        (lambda: segment_plan(8, 0), ValueError, "k=0"),
        (lambda: segment_plan(8, 9), ValueError, r"k=9 .*between 1 and n_layers=8"),
        (lambda: segment_plan(8, True), ValueError, "unknown strategy True"),
        (lambda: segment_plan(8, 2.5), ValueError, "unknown strategy 2.5"),
        (lambda: segment_plan(0, "every"), ValueError, "n_layers must be a positive int, got 0"),
        (lambda: segment_plan(4.0, "every"), TypeError, "n_layers must be an int"),
        (lambda: even_plan(4, 5), ValueError, "segments must be between 1 and n_layers=4, got 5"),
        (lambda: checkpoint_sequential([nn.Identity()] * 3, 0, torch.ones(2)), ValueError,
         "segments must be between 1 and n_layers=3, got 0"),
        (lambda: checkpoint_sequential([nn.Identity()] * 3, -1, torch.ones(2)), ValueError, "got -1"),
        (lambda: checkpoint_sequential([nn.Identity()] * 3, 4, torch.ones(2)), ValueError, "got 4"),
        (lambda: checkpoint_sequential([nn.Identity()] * 3, "2", torch.ones(2)), TypeError, "segments must be an int"),
        (lambda: checkpoint_sequential([], 1, torch.ones(2)), ValueError, "layers is empty"),
        (lambda: checkpoint_sequential([nn.Identity(), 3], 1, torch.ones(2)), TypeError,
         r"layers\[1\] must be callable"),
        (lambda: checkpoint_sequential(nn.Identity(), 1, torch.ones(2)), TypeError, "layers must be a list"),
        (lambda: checkpoint_sequential([nn.Identity()] * 3, [(0, 1), (2, 3)], torch.ones(2)), ValueError,
         r"plan\[1\]=\(2, 3\) must start at 1"),
        (lambda: checkpoint_sequential([nn.Identity()] * 3, [(0, 2)], torch.ones(2)), ValueError, "covers range"),
        (lambda: checkpoint_sequential([nn.Identity()], 1, [1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: checkpoint(3, torch.ones(2)), TypeError, "fn must be callable, got int"),
        (lambda: checkpoint(lambda t: t, torch.ones(2), preserve_rng_state=1), TypeError, "preserve_rng_state"),
        (lambda: checkpoint(lambda t: [t * 2], torch.ones(2, requires_grad=True)), TypeError,
         r"tensor or a non-empty tuple of tensors, got list"),
        (lambda: checkpoint(lambda t: (t * 2, 3), torch.ones(2, requires_grad=True)), TypeError,
         r"got tuple \(Tensor, int\)"),
        (lambda: CheckpointedTransformer(nn.Linear(2, 2), "every"), TypeError, "effedu.model.Transformer"),
        (lambda: CheckpointedTransformer(Transformer(cfg(n_layers=2)), "sqrtt"), ValueError,
         "unknown strategy 'sqrtt'"),
        (lambda: CheckpointedTransformer(Transformer(cfg(n_layers=2)), 3), ValueError, "k=3"),
        (lambda: CheckpointedTransformer(Transformer(cfg(n_layers=2)), [(0, 1)]), ValueError, "covers range"),
        (lambda: CheckpointedTransformer(Transformer(cfg(n_layers=2)))(torch.zeros(2, 3)), TypeError, "integer tensor"),
        (lambda: CheckpointedTransformer(Transformer(cfg(n_layers=2)))(torch.full((1, 3), 40)), ValueError,
         r"\[0, vocab_size=32\)"),
        (lambda: predicted_activation_bytes([(0, 2)], -1, 0), ValueError, "layer_bytes must be"),
        (lambda: recomputed_layers([]), TypeError, "non-empty list"),
        (lambda: recompute_timeline(lambda t: t, torch.ones(1)), TypeError, "model must be an nn.Module"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------------------------------------------
# the shared RNG replay helper, auxiliary losses under recomputation, the timeline through memory_timeline
# --------------------------------------------------------------------------------------------------------------


def test_rng_state_replays_and_puts_the_generator_back():
    from effedu.general.rng import RngState, replay_rng

    torch.manual_seed(0)
    state = RngState((torch.ones(2),))
    first = torch.rand(5)
    after = torch.get_rng_state()
    with replay_rng(state):
        again = torch.rand(5)
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # the same draws
    assert torch.equal(torch.get_rng_state(), after)  # and the generator is where it was before the replay
    with replay_rng(None):
        assert not torch.equal(torch.rand(5), first)


class _AuxFFN(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ffn = FeedForward(config.d_model, config.d_ff, config.dropout)

    def forward(self, x):
        y = self.ffn(x)
        add_aux_loss(self, y.square().mean())
        return y


@pytest.mark.parametrize("strategy", ["every", "sqrt"])
def test_aux_losses_are_not_recorded_again_by_the_recomputation(strategy):
    torch.manual_seed(0)
    model = Transformer(cfg(n_layers=4, ffn=_AuxFFN))
    tok = tokens()
    plain_out = model(tok)
    plain_aux = model.aux_loss().detach()
    ck = CheckpointedTransformer(model, strategy)
    out = ck(tok)
    assert len(model.aux_channel.values) == 4
    # the checkpointed segments ran without autograd: their records carry no gradient, and aux_loss says so
    with pytest.warns(RuntimeWarning, match="carry no gradient"):
        torch.testing.assert_close(model.aux_loss(), plain_aux)
    out.float().pow(2).mean().backward()  # recomputes the checkpointed segments in the backward pass
    assert len(model.aux_channel.values) == 4  # still one record per layer
    with torch.no_grad():
        torch.testing.assert_close(model.aux_loss(), plain_aux)
    torch.testing.assert_close(out, plain_out)
    # the generic hook: checkpoint(..., recompute_context=) enters the context only around the recomputation
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(torch.is_grad_enabled())

        def __exit__(self, *exc):
            return False

    x = torch.randn(3, requires_grad=True)
    y = checkpoint(torch.sin, x, recompute_context=Ctx)
    assert entered == []
    y.sum().backward()
    assert entered == [True]
    with pytest.raises(TypeError, match="recompute_context must be callable"):
        checkpoint(torch.sin, x, recompute_context=3)


def test_recompute_timeline_is_memory_timeline_through_backward():
    torch.manual_seed(0)
    model = Transformer(cfg(n_layers=3))
    tok = tokens()
    ck = CheckpointedTransformer(model, "every")
    ours = recompute_timeline(ck, tok)
    generic = measure.memory_timeline(ck, tok, through_backward=True)
    assert [e["activation_bytes"] for e in ours] == [e["activation_bytes"] for e in generic]
    assert [e["module"] for e in ours] == [e["module"].removeprefix("model.") for e in generic]
    # the meter off in backward (the default): no recompute events, the forward part equal
    off = measure.memory_timeline(ck, tok)
    assert not any(e["module"].endswith("(recompute)") for e in off)
    n_fwd = sum(e["phase"] == "forward" for e in ours)
    assert [e["activation_bytes"] for e in off[:n_fwd]] == [e["activation_bytes"] for e in ours[:n_fwd]]
