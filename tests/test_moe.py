"""Chapter 10: routing, capacity, balancing loss and the MoE feed-forward layer (effedu.general.moe)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from effedu.general.checkpoint import CheckpointedTransformer
from effedu.general.moe import (MoEFeedForward, Router, capacity_for, load_balancing_loss, moe_factory,
                                moe_ffn_flops, moe_layers, moe_param_count, moe_reference, moe_step, router_z_loss,
                                top_k_route, train_moe)
from effedu.general.reversible import ReversibleTransformer
from effedu.kernels.moe_dispatch import moe_combine, moe_dispatch
from effedu.measure import count_parameters, ffn_flops
from effedu.model import AuxLossChannel, FeedForward, Transformer, TransformerConfig, lm_loss

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


# --------------------------------------------------------------------------------------------------------------
# capacity
# --------------------------------------------------------------------------------------------------------------


def test_capacity_formula():
    assert capacity_for(8, 4) == 2
    assert capacity_for(8, 4, 1, 1.25) == 3  # ceil(2.5)
    assert capacity_for(8, 4, 2, 1.0) == 4
    assert capacity_for(10, 1, 1, 1.1) == 11  # exact: not ceil(11.000000000000002) = 12
    assert capacity_for(3, 8, 1, 0.1) == 1  # at least one slot
    for n, e, k, cf in [(37, 5, 2, 1.25), (4096, 8, 1, 1.0), (100, 7, 3, 0.7)]:
        assert capacity_for(n, e, k, cf) == math.ceil(round(k * n / e * cf, 9))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_tokens=8, n_experts=4, k=5), "k=5 experts per token exceeds"),
    (dict(n_tokens=8, n_experts=4, capacity_factor=0.0), "capacity_factor must be a finite number > 0"),
    (dict(n_tokens=8, n_experts=4, capacity_factor=-1), "capacity_factor"),
    (dict(n_tokens=0, n_experts=4), "n_tokens must be a positive int"),
    (dict(n_tokens=8, n_experts=0), "n_experts must be a positive int"),
])
def test_capacity_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        capacity_for(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# routing against a plain first-come-first-served loop
# --------------------------------------------------------------------------------------------------------------


def fcfs_reference(logits, k, capacity):
    """Python loops: top-k by probability, renormalised gates, slots by running counts, choice-major."""
    probs = torch.softmax(logits.double(), -1).tolist()
    N, E = logits.shape
    choice = [sorted(range(E), key=lambda e: -p[e])[:k] for p in probs]
    gates = []
    for p, c in zip(probs, choice):
        g = [p[e] for e in c]
        gates.append(g if k == 1 else [v / sum(g) for v in g])
    count = [0] * E
    slot = [[-1] * k for _ in range(N)]
    for j in range(k):  # all first choices before all second choices (GShard)
        for n in range(N):  # in token order
            e = choice[n][j]
            if capacity is None or count[e] < capacity:
                slot[n][j] = count[e]
            count[e] += 1
    return choice, gates, slot


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("capacity", [1, 3, 9, None])
def test_top_k_route_equals_the_fcfs_loop(k, capacity):
    g = torch.Generator().manual_seed(10 * k + (capacity or 0))
    N, E = 37, 5
    logits = torch.randn(N, E, generator=g) * 2
    idx, gate, kept, slot = top_k_route(logits, k, capacity, return_slots=True)
    choice, gates, ref_slot = fcfs_reference(logits, k, capacity)
    assert idx.dtype == torch.int64 and slot.dtype == torch.int64 and kept.dtype == torch.bool
    assert idx.shape == gate.shape == kept.shape == slot.shape == (N, k)
    assert idx.tolist() == choice
    assert slot.tolist() == ref_slot
    assert torch.equal(kept, slot >= 0)
    torch.testing.assert_close(gate.double(), torch.tensor(gates, dtype=torch.float64), atol=1e-6, rtol=1e-6)
    # without return_slots: the first three only
    idx2, gate2, kept2 = top_k_route(logits, k, capacity)
    assert torch.equal(idx2, idx) and torch.equal(kept2, kept)
    if capacity is not None:
        # each expert holds at most C choices, in slots 0 … C−1 without gaps
        for e in range(E):
            s = sorted(slot[(idx == e) & kept].tolist())
            assert s == list(range(len(s))) and len(s) <= capacity


@pytest.mark.parametrize("capacity", [1, 4, 7, 100])
def test_top1_drops_count_is_the_overflow_of_each_expert(capacity):
    logits = torch.randn(51, 6, generator=torch.Generator().manual_seed(capacity))
    idx, gate, kept = top_k_route(logits, 1, capacity)
    load = torch.bincount(idx[:, 0], minlength=6)
    assert int((~kept).sum()) == int((load - capacity).clamp(min=0).sum())
    # the dropped tokens are the latest ones of each overflowing expert
    for e in range(6):
        tokens = (idx[:, 0] == e).nonzero().flatten().tolist()
        assert kept[tokens, 0].tolist() == [i < capacity for i in range(len(tokens))]


def test_gates_raw_for_top1_renormalised_for_topk_and_differentiable():
    logits = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(logits, -1)
    _, g1, _ = top_k_route(logits, 1)
    torch.testing.assert_close(g1[:, 0], probs.max(-1).values)
    _, g2, _ = top_k_route(logits, 2)
    torch.testing.assert_close(g2.sum(-1), torch.ones(11, dtype=torch.float64))
    top2 = probs.topk(2, -1).values
    torch.testing.assert_close(g2, top2 / top2.sum(-1, keepdim=True))
    (g2[:, 0] * torch.arange(11.0, dtype=torch.float64)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # k = E: every expert, gates = the full softmax
    _, gE, _ = top_k_route(logits.detach(), 4)
    torch.testing.assert_close(gE.sum(-1), torch.ones(11, dtype=torch.float64))
    # 16-bit logits: gates in the logits' dtype, routing from a float32 softmax
    idx_h, g_h, _ = top_k_route(logits.detach().to(torch.bfloat16), 2)
    assert g_h.dtype == torch.bfloat16 and idx_h.shape == (11, 2)


@pytest.mark.parametrize("bad, kwargs, exc, match", [
    (torch.randn(5, 3), dict(k=4), ValueError, "k=4 experts per token exceeds the number of experts"),
    (torch.randn(5, 3), dict(k=0), ValueError, "k must be a positive int"),
    (torch.randn(5, 3), dict(k=1, capacity=0), ValueError, "capacity must be a positive int"),
    (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), dict(k=1), ValueError, "router_logits contain NaN"),
    (torch.tensor([[0.0, float("inf")]]), dict(k=1), ValueError, "router_logits contain NaN or inf"),
    (torch.randn(2, 5, 3), dict(k=1), ValueError, r"router_logits must be \(N, E\)"),
    (torch.randint(0, 3, (5, 3)), dict(k=1), TypeError, "router_logits must be a floating"),
    ([[0.0, 1.0]], dict(k=1), TypeError, "router_logits must be a torch.Tensor"),
])
def test_top_k_route_errors(bad, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        top_k_route(bad, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# oracles from transformers: Switch's top-1 router, Mixtral's top-2 block
# --------------------------------------------------------------------------------------------------------------


def test_top1_with_capacity_equals_switch_transformers_router():
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

    E, d, T, C = 4, 8, 13, 3
    cfg = SwitchTransformersConfig(num_experts=E, expert_capacity=C, d_model=d, router_bias=False,
                                   router_jitter_noise=0.0, router_dtype="float32")
    hf = SwitchTransformersTop1Router(cfg).eval()
    ours = Router(d, E)
    with torch.no_grad():
        hf.classifier.weight.copy_(torch.randn(E, d))
        ours.w_gate.weight.copy_(hf.classifier.weight)
    x = torch.randn(2, T, d, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mask, probs, logits = hf(x)  # mask (B, T, E): one-hot of the kept first choice; probs (B, T, 1)
    # HF applies the capacity per sequence (its cumsum runs over the sequence axis): our routing of each row alone
    for b in range(2):
        ours_logits = ours(x[b])
        torch.testing.assert_close(ours_logits, logits[b])
        idx, gate, kept = top_k_route(ours_logits, 1, C)
        torch.testing.assert_close(gate, probs[b])
        ref = F.one_hot(idx[:, 0], E) * kept
        assert torch.equal(ref, mask[b].to(ref.dtype))
        assert int((~kept).sum()) > 0  # the case has drops
    # on the flattened batch the capacity is shared by both sequences: different drops (why we route per row above)
    _, _, kept_all = top_k_route(ours(x.reshape(-1, d)), 1, C)
    assert int((~kept_all).sum()) > int((mask.sum(-1) == 0).sum())


def test_top2_routing_and_combine_equal_mixtral_sparse_moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E, d, f = 4, 8, 12
    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=2,
                        router_jitter_noise=0.0, hidden_act="silu")
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).eval().double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 7, d, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x)
        ref = ref[0] if isinstance(ref, tuple) else ref  # transformers 4.x also returned the router logits
        hf_routing = block.gate(x.reshape(-1, d))
    router = Router(d, E).double()
    with torch.no_grad():
        router.w_gate.weight.copy_(block.gate.weight)
        idx, gate, kept, slot = top_k_route(router(x.reshape(-1, d)), 2, None, return_slots=True)
    assert bool(kept.all())
    if isinstance(hf_routing, tuple):  # transformers 5.x: the router returns (logits, top-k weights, top-k index)
        _, hf_gate, hf_idx = hf_routing
        # routing and gates: Mixtral's topk of the softmax, renormalised over the two
        assert torch.equal(idx, hf_idx)
        torch.testing.assert_close(gate.float(), hf_gate)  # Mixtral's router softmax runs in float32
    # the combine, with Mixtral's own SwiGLU experts on our dispatched buffers
    C = int(slot.max()) + 1
    buffers = moe_dispatch(x.reshape(-1, d), idx, slot, E, C)
    ex = block.experts
    outs = []
    for e in range(E):
        if hasattr(ex, "gate_up_proj"):  # 5.x: batched expert weights
            a, u = F.linear(buffers[e], ex.gate_up_proj[e]).chunk(2, dim=-1)
            outs.append(F.linear(ex.act_fn(a) * u, ex.down_proj[e]))
        else:  # 4.x: one MixtralBlockSparseTop2MLP per expert, SwiGLU inside
            outs.append(ex[e](buffers[e]))
    y = moe_combine(torch.stack(outs), idx, slot, gate)
    torch.testing.assert_close(y.reshape(x.shape), ref, atol=1e-6, rtol=1e-6)  # (float32 gates there)


# --------------------------------------------------------------------------------------------------------------
# the auxiliary losses
# --------------------------------------------------------------------------------------------------------------


def test_load_balancing_loss_formula_balanced_and_collapsed():
    N, E = 24, 4
    probs = torch.softmax(torch.randn(N, E, dtype=torch.float64), -1)
    idx = probs.argmax(-1)
    f = torch.bincount(idx, minlength=E).double() / N
    torch.testing.assert_close(load_balancing_loss(probs, idx), E * (f * probs.mean(0)).sum())
    # (N, k): only the first choice counts
    idx2 = torch.stack([idx, (idx + 1) % E], dim=1)
    torch.testing.assert_close(load_balancing_loss(probs, idx2), load_balancing_loss(probs, idx))
    # balanced first choices: exactly 1 whatever the probabilities
    balanced = torch.arange(N) % E
    assert abs(float(load_balancing_loss(probs, balanced)) - 1.0) < 1e-12
    # uniform probabilities: 1 whatever the choices
    assert abs(float(load_balancing_loss(torch.full((N, E), 1.0 / E, dtype=torch.float64), idx)) - 1.0) < 1e-12
    # imbalanced: > 1; collapsed onto one expert with probability 1: E
    skewed = torch.zeros(N, dtype=torch.long)
    skewed[: N // 4] = 1
    assert float(load_balancing_loss(probs + 0.3 * F.one_hot(skewed, E), skewed)) > 1.0
    collapsed = F.one_hot(torch.zeros(N, dtype=torch.long), E).double()
    assert float(load_balancing_loss(collapsed, torch.zeros(N, dtype=torch.long))) == pytest.approx(E)
    # differentiable through P only
    p = probs.clone().requires_grad_(True)
    load_balancing_loss(p, idx).backward()
    torch.testing.assert_close(p.grad, (E * f / N).expand(N, E))
    with pytest.raises(ValueError, match=r"expert_index must be \(24,\) or \(24, k\)"):
        load_balancing_loss(probs, idx[:5])


def test_router_z_loss_formula():
    logits = torch.randn(9, 5, dtype=torch.float64)
    torch.testing.assert_close(router_z_loss(logits), (logits.exp().sum(-1).log() ** 2).mean())
    assert float(router_z_loss(torch.zeros(3, 4))) == pytest.approx(math.log(4) ** 2)


# --------------------------------------------------------------------------------------------------------------
# the router
# --------------------------------------------------------------------------------------------------------------


def test_noisy_router_noise_in_training_only_and_reproducible():
    r = Router(6, 4, noisy=True)
    x = torch.randn(10, 6)
    clean = x @ r.w_gate.weight.t()
    a = r(x, generator=torch.Generator().manual_seed(1))
    b = r(x, generator=torch.Generator().manual_seed(1))
    c = r(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    eps = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, clean + eps * F.softplus(x @ r.w_noise.weight.t()))
    r.eval()
    torch.testing.assert_close(r(x), clean)
    assert Router(6, 4).w_noise is None
    with pytest.raises(ValueError, match=r"Router: x must be \(N, 6\)"):
        r(torch.randn(10, 5))


# --------------------------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------------------------


def make_layer(k=1, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("capacity_factor", 1.0)
    return MoEFeedForward(8, 12, 4, k=k, **kw).to(dtype).eval()


@pytest.mark.parametrize("dispatch", ["kernel", "einsum", "loop"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_equals_the_dense_reference(dispatch, k, dtype):
    layer = make_layer(k, dtype, dispatch=dispatch, capacity_factor=0.75)
    x = torch.randn(3, 7, 8, dtype=dtype)  # N = 21: odd
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, moe_reference(layer, x), **TOL[dtype])
    r = layer.last_routing
    assert r["capacity"] == capacity_for(21, 4, k, 0.75) and r["dropped"] > 0  # the case has drops
    assert r["dropped"] == int((~r["kept"]).sum()) and int(r["load"].sum()) == 21
    assert r["load"].tolist() == torch.bincount(r["expert_index"][:, 0], minlength=4).tolist()
    # a token whose every choice was dropped gets 0 (the residual carries it)
    gone = (~r["kept"]).all(dim=1)
    assert r["dropped_tokens"] == int(gone.sum())
    assert torch.equal(y.reshape(-1, 8)[gone], torch.zeros(int(gone.sum()), 8, dtype=dtype))


def test_dispatches_agree_and_no_capacity_drops_nothing():
    x = torch.randn(25, 8, dtype=torch.float64)
    outs = [make_layer(2, dispatch=dsp, capacity_factor=None)(x) for dsp in ("kernel", "einsum", "loop")]
    torch.testing.assert_close(outs[0], outs[1], **TOL[torch.float64])
    torch.testing.assert_close(outs[0], outs[2], **TOL[torch.float64])
    layer = make_layer(2, capacity_factor=None)
    torch.testing.assert_close(layer(x), moe_reference(layer, x), **TOL[torch.float64])
    assert layer.last_routing["dropped"] == 0
    assert layer.last_routing["capacity"] == int(layer.last_routing["counts"].max())


def test_one_expert_with_room_for_all_is_the_dense_ffn():
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 12, 1, capacity_factor=1.0).double()
    ffn = FeedForward(8, 12).double()
    with torch.no_grad():
        ffn.fc1.weight.copy_(layer.w_in[0].t())
        ffn.fc1.bias.copy_(layer.b_in[0])
        ffn.fc2.weight.copy_(layer.w_out[0].t())
        ffn.fc2.bias.copy_(layer.b_out[0])
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ffn(x), **TOL[torch.float64])  # gate = softmax of one logit = 1


def test_layer_gradcheck_through_experts_and_gates():
    # the layer's own gradient (router → gates, experts, drops) on the torch backend of the kernel (fast);
    # the numba/CUDA kernels' gradients are gradchecked in tests/test_moe_dispatch.py, and compared below
    layer = make_layer(2, capacity_factor=0.8, backend="torch")
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    layer(x)
    assert layer.last_routing["dropped"] > 0
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)
    grads = []
    for dispatch in ("kernel", "einsum"):  # the default backend (numba on the CPU) against the one-hot einsum
        lay = make_layer(2, capacity_factor=0.8, dispatch=dispatch)
        xx = x.detach().requires_grad_(True)
        lay(xx).square().sum().backward()
        grads.append([xx.grad] + [p.grad for p in lay.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    # the router is trained through the gates (and the balancing loss)
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert layer.router.w_gate.weight.grad.abs().sum() > 0
    assert layer.w_in.grad.abs().sum() > 0


def test_experts_forward_on_a_slice_of_experts():
    layer = make_layer(1)
    buffers = torch.randn(4, 3, 8, dtype=torch.float64)
    full = layer.experts_forward(buffers)
    torch.testing.assert_close(layer.experts_forward(buffers[1:3], slice(1, 3)), full[1:3])
    torch.testing.assert_close(layer.experts_forward(buffers[[0, 3]], [0, 3]), full[[0, 3]])
    torch.testing.assert_close(layer.experts_forward(buffers[2:3], 2), full[2:3])
    with pytest.raises(ValueError, match="buffers must be"):
        layer.experts_forward(buffers, slice(0, 2))
    with pytest.raises(ValueError, match="experts must be"):
        layer.expert_parameters([4])
    # route() alone: the forward's routing, without running experts
    x = torch.randn(10, 8, dtype=torch.float64)
    layer(x)
    r = layer.route(x)
    assert torch.equal(r["slot"], layer.last_routing["slot"]) and r["capacity"] == layer.last_routing["capacity"]


def test_counts_of_parameters_and_flops():
    layer = MoEFeedForward(16, 40, 6, k=2)
    assert count_parameters(layer) == moe_param_count(16, 40, 6)
    assert count_parameters(MoEFeedForward(16, 40, 6, noisy=True)) == moe_param_count(16, 40, 6, noisy=True)
    assert count_parameters(FeedForward(16, 40)) * 6 + 16 * 6 == moe_param_count(16, 40, 6)
    assert moe_ffn_flops(100, 16, 40, 6, k=2) == 2 * 100 * 16 * 6 + 2 * ffn_flops(100, 16, 40)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=5), ValueError, "k=5 experts per token exceeds the number of experts"),
    (dict(capacity_factor=0), ValueError, "capacity_factor must be a finite number > 0"),
    (dict(dispatch="onehot"), ValueError, "unknown dispatch 'onehot'; expected one of kernel, einsum, loop"),
    (dict(aux_weight=-1.0), ValueError, "aux_weight must be a finite number ≥ 0"),
    (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
])
def test_layer_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MoEFeedForward(8, 12, 4, **kwargs)


def test_layer_input_errors_and_nan_logits():
    layer = make_layer(1)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 8\)"):
        layer(torch.randn(3, 5, dtype=torch.float64))
    x = torch.randn(4, 8, dtype=torch.float64)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="router_logits contain NaN"):
        layer(x)


# --------------------------------------------------------------------------------------------------------------
# in a Transformer: the factory, the auxiliary loss, checkpointing and reversible layers
# --------------------------------------------------------------------------------------------------------------


def moe_config(n_layers=4, every=1, **kw):
    kw.setdefault("capacity_factor", 1.0)
    kw.setdefault("k", 2)
    return TransformerConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=n_layers, d_ff=24, max_len=16,
                             ffn=moe_factory(4, every=every, aux_weight=0.1, z_weight=0.01, **kw))


def test_factory_places_moe_every_other_layer_and_records_aux_once_per_forward():
    torch.manual_seed(0)
    model = Transformer(moe_config(every=2)).double()
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["FeedForward", "MoEFeedForward", "FeedForward", "MoEFeedForward"]
    moe = moe_layers(model)
    assert len(moe) == 2 and all(m.aux_channel is model.aux_channel for m in moe)
    assert float(moe[0].w_in.detach().std()) == pytest.approx(0.02, rel=0.2)
    assert float(moe[0].b_in.detach().abs().max()) == 0.0
    tok = torch.randint(0, 16, (2, 9))
    model(tok)
    assert len(model.aux_channel.values) == 2
    # aux = Σ_layers α·L_aux + β·L_z
    expected = sum(0.1 * m.last_routing["balance_loss"] + 0.01 * m.last_routing["z_loss"] for m in moe)
    torch.testing.assert_close(model.aux_loss().detach(), expected, **TOL[torch.float64])
    assert model.aux_loss().requires_grad
    model(tok)
    assert len(model.aux_channel.values) == 2  # cleared by the next forward, not accumulated
    with torch.no_grad():
        model(tok)
    assert len(model.aux_channel.values) == 2 and model.aux_channel.injected == [True, True]


def _grads(model, run, tok, tgt):
    model.zero_grad()
    torch.manual_seed(5)  # the noisy router draws from the global generator (which checkpointing replays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "recorded without autograd" warning
        logits = run(tok)
        aux = model.aux_loss()
        (lm_loss(logits, tgt) + aux).backward()
    return float(aux.detach()), len(model.aux_channel.values), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("strategy, noisy", [("every", False), (2, True)])
def test_aux_loss_trains_the_router_under_checkpointing(strategy, noisy):
    torch.manual_seed(0)
    model = Transformer(moe_config(noisy=noisy)).double()  # training mode: noisy routing is on
    tok, tgt = torch.randint(0, 16, (2, 9)), torch.randint(0, 16, (2, 9))
    aux0, n0, g0 = _grads(model, model, tok, tgt)
    ck = CheckpointedTransformer(model, strategy)
    aux1, n1, g1 = _grads(model, ck, tok, tgt)
    assert n0 == n1 == 4 and aux1 == pytest.approx(aux0, rel=1e-12)  # once per forward, same value
    assert model.aux_channel.injected.count(True) > 0  # the checkpointed segments' records
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **TOL[torch.float64], msg=name)
    # without the injected gradient the router of a checkpointed layer would miss ∂aux/∂W_g
    for m in moe_layers(model):
        m.aux_grad_scale = 0.0
    _, _, g2 = _grads(model, ck, tok, tgt)
    assert not torch.allclose(g2["blocks.0.ffn.router.w_gate.weight"], g0["blocks.0.ffn.router.w_gate.weight"])


def test_aux_loss_trains_the_router_through_reversible_layers():
    torch.manual_seed(0)
    model = ReversibleTransformer(moe_config(n_layers=3)).double()
    tok, tgt = torch.randint(0, 16, (2, 9)), torch.randint(0, 16, (2, 9))
    aux0, n0, g0 = _grads(model, lambda t: model(t, memory_efficient=False), tok, tgt)
    aux1, n1, g1 = _grads(model, lambda t: model(t, memory_efficient=True), tok, tgt)
    assert n0 == n1 == 3 and aux1 == pytest.approx(aux0, rel=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-10, rtol=1e-8, msg=name)


def test_aux_channel_injected_records_do_not_warn():
    ch = AuxLossChannel()
    ch.add(torch.tensor(1.0), injected=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(ch.total()) == 1.0
    ch.add(torch.tensor(2.0))
    with pytest.warns(RuntimeWarning, match="carry no gradient"):
        assert float(ch.total()) == 3.0
    ch.clear()
    assert ch.values == [] and ch.injected == []


def test_train_moe_records_load_aux_and_drops():
    torch.manual_seed(0)
    model = Transformer(moe_config(n_layers=2, k=1, capacity_factor=1.0))
    tok = torch.randint(0, 16, (4, 12))
    batch = (tok[:, :-1], tok[:, 1:])
    hist = train_moe(model, batch, steps=3, progress=False)
    assert len(hist["loss"]) == len(hist["load"]) == len(hist["aux"]) == len(hist["dropped_fraction"]) == 3
    assert all(len(step) == 2 and all(sum(c) == 44 and len(c) == 4 for c in step) for step in hist["load"])
    assert all(0.0 <= f <= 1.0 for f in hist["dropped_fraction"]) and all(a > 0 for a in hist["aux"])
    # the step returns the LM loss alone
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.eval()
    lm = moe_step(model, *batch, opt)
    with torch.no_grad():
        assert lm == pytest.approx(float(lm_loss(model(batch[0]), batch[1])), rel=1e-6)


def test_factory_errors():
    with pytest.raises(ValueError, match="k=3 experts per token exceeds"):
        moe_factory(2, k=3)
    with pytest.raises(ValueError, match="every must be a positive int"):
        moe_factory(4, every=0)
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        moe_factory(4, capacity_factor=-0.5)
