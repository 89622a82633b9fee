"""The meters against hand-computed byte counts, torch's own numbers and closed-form FLOPs."""
import pytest
import torch
import torch.nn as nn

from effedu import measure
from effedu.model import Transformer, TransformerConfig


def test_saved_bytes_of_elementwise_ops_by_hand():
    x = torch.randn(1000, requires_grad=True)
    assert measure.saved_activation_bytes(torch.exp, x) == 4000  # exp saves its output: 1000 × 4 B
    assert measure.saved_activation_bytes(torch.sin, x) == 4000  # sin saves its input
    # sin saves x, exp saves its output: two storages
    assert measure.saved_activation_bytes(lambda t: torch.sin(t).exp(), x) == 8000
    # x * x saves x twice — one storage, counted once
    assert measure.saved_activation_bytes(lambda t: t * t, x) == 4000
    x64 = torch.randn(10, 10, dtype=torch.float64, requires_grad=True)
    assert measure.saved_activation_bytes(torch.tanh, x64) == 800
    # nothing is saved without autograd
    assert measure.saved_activation_bytes(torch.exp, torch.randn(1000)) == 0


def test_linear_layer_saves_its_input_not_its_weight():
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    # the weight gradient needs x (8×64×4 B); the weight itself is a parameter, not an activation
    assert measure.saved_activation_bytes(lin, x) == 8 * 64 * 4
    x.requires_grad_(True)
    assert measure.saved_activation_bytes(lin, x) == 8 * 64 * 4


def test_model_activation_bytes_grow_linearly_with_depth_and_batch():
    def bytes_for(n_layers, batch):
        torch.manual_seed(0)
        m = Transformer(TransformerConfig(vocab_size=16, d_model=32, n_heads=4, n_layers=n_layers, d_ff=64))
        return measure.saved_activation_bytes(m, torch.randint(0, 16, (batch, 12)))

    b1, b2, b4 = bytes_for(1, 2), bytes_for(2, 2), bytes_for(4, 2)
    per_layer = b2 - b1
    assert per_layer > 0 and b4 - b2 == 2 * per_layer
    assert bytes_for(2, 4) > 1.9 * b2


def test_deterministic():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=16, d_model=32, n_heads=4, n_layers=2, d_ff=64))
    x = torch.randint(0, 16, (2, 12))
    assert measure.saved_activation_bytes(m, x) == measure.saved_activation_bytes(m, x)


def test_memory_timeline_rises_in_forward_and_falls_to_zero_in_backward():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=16, d_model=32, n_heads=4, n_layers=2, d_ff=64))
    x = torch.randint(0, 16, (2, 12))
    tl = measure.memory_timeline(m, x)
    fwd = [e["activation_bytes"] for e in tl if e["phase"] == "forward"]
    bwd = [e["activation_bytes"] for e in tl if e["phase"] == "backward"]
    assert fwd == sorted(fwd) and fwd[0] == 0  # only grows while the graph is built
    assert bwd[-1] == 0 and bwd == sorted(bwd, reverse=True)  # freed as backward walks back
    assert max(fwd) >= measure.saved_activation_bytes(m, x)
    assert {e["module"] for e in tl} >= {"blocks.0.attn.qkv", "blocks.1.ffn.fc2", "head"}
    assert all(e["allocator_bytes"] is None for e in tl)  # CPU
    for p in m.parameters():
        assert p.grad is not None


def test_peak_memory_counts_temporaries():
    x = torch.randn(256, 256)

    def two_temps(t):
        a = t @ t  # 256 KiB
        b = a.exp()  # another 256 KiB while a is alive
        return (b + 1).sum()

    peak, result = measure.peak_memory(two_temps, x)
    assert isinstance(result, torch.Tensor)
    assert 3 * 256 * 256 * 4 <= peak < 4 * 256 * 256 * 4 + 4096
    peak_small, _ = measure.peak_memory(lambda t: t.sum(), x)
    assert peak_small < 1024


def test_time_it_returns_positive_median_and_validates():
    calls = []
    t = measure.time_it(lambda: calls.append(1), warmup=2, repeat=5)
    assert t > 0 and len(calls) == 7
    with pytest.raises(ValueError, match="repeat must be an int"):
        measure.time_it(lambda: None, repeat=0)


def test_parameter_counts_match_formula_and_shared_counted_once():
    cfg = TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=3, d_ff=40, max_len=20)
    m = Transformer(cfg)
    d, f, V, L = 16, 40, 50, 3
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)
    expected = V * d + 20 * d + L * per_layer + 2 * d + (d * V + V)
    assert measure.count_parameters(m) == expected
    assert measure.parameter_bytes(m) == 4 * expected
    m.head.weight = m.tok_emb.weight  # weight tying: one tensor
    assert measure.count_parameters(m) == expected - V * d


def test_tensor_bytes_counts_storages_once():
    x = torch.zeros(100)
    assert measure.tensor_bytes(x, x[:10], x.view(10, 10)) == 400
    assert measure.tensor_bytes(x, torch.zeros(5, dtype=torch.float64)) == 440


def test_flop_formulas():
    assert measure.attention_flops(128, 64) == 2 * 2 * 128 * 128 * 64
    assert measure.attention_flops(128, 64, causal=True) == measure.attention_flops(128, 64) // 2
    assert measure.ffn_flops(10, 8) == 2 * 2 * 10 * 8 * 32
    parts = measure.layer_flops(1024, 64)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    # attention overtakes the projections + FFN when n > 6d (4nd² + 8nd²·... = 12 n d² vs 4 n² d)
    small, large = measure.layer_flops(64, 64), measure.layer_flops(4096, 64)
    assert small["attention (QKᵀ, AV)"] < small["FFN"] and large["attention (QKᵀ, AV)"] > large["FFN"]


def test_gradient_norms_per_block():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=16, d_model=32, n_heads=4, n_layers=3, d_ff=64))
    m(torch.randint(0, 16, (2, 8))).pow(2).mean().backward()
    norms = measure.gradient_norms(m)
    assert len(norms) == 3 and all(n > 0 for n in norms)
    manual = sum(p.grad.pow(2).sum() for p in m.blocks[1].parameters()) ** 0.5
    assert abs(norms[1] - float(manual)) < 1e-6
    with pytest.raises(ValueError, match="per must be"):
        measure.gradient_norms(m, per="layer")


def test_layer_weight_grad_norms_match_backward_and_leave_grads_alone():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=16, d_model=32, n_heads=4, n_layers=3, d_ff=64))
    x, y = torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8))
    norms = measure.layer_weight_grad_norms(m, (x, y))
    assert len(norms) == 3 and all(n > 0 for n in norms)
    assert all(p.grad is None for p in m.parameters())  # autograd.grad: .grad untouched
    torch.nn.functional.cross_entropy(m(x).reshape(-1, 16), y.reshape(-1)).backward()
    for i, b in enumerate(m.blocks):
        assert norms[i] == pytest.approx(float(b.ffn.fc2.weight.grad.norm()), rel=1e-5)
    # "all": every ≥2-D parameter of a block (qkv, proj, fc1, fc2), not biases or LayerNorm gains
    all_norms = measure.layer_weight_grad_norms(m, (x, y), weights="all")
    b = m.blocks[1]
    manual = sum(float(p.grad.pow(2).sum()) for p in (b.attn.qkv.weight, b.attn.proj.weight, b.ffn.fc1.weight,
                                                       b.ffn.fc2.weight)) ** 0.5
    assert all_norms[1] == pytest.approx(manual, rel=1e-5)
    two = measure.layer_weight_grad_norms(m, (x, y), weights=["ffn.fc1.weight", "ffn.fc2.weight"])
    assert two[2] == pytest.approx(float(torch.cat([m.blocks[2].ffn.fc1.weight.grad.flatten(),
                                                    m.blocks[2].ffn.fc2.weight.grad.flatten()]).norm()), rel=1e-5)
    # a tensor batch without targets: loss_fn gets targets=None
    seen = []
    sq = measure.layer_weight_grad_norms(m, x, lambda out, t: seen.append(t) or out.pow(2).sum(),
                                         weights="attn.proj.weight")
    assert seen == [None] and len(sq) == 3 and all(n > 0 for n in sq)


def test_layer_weight_grad_norms_reproduce_xiong_et_al():
    """Xiong et al. (2020) at initialisation (Xavier weights, unit-scale embeddings): post-LN's last-layer W²
    gradient is about √L times pre-LN's, and pre-LN's gradients do not grow toward the output."""
    x = torch.randint(0, 32, (8, 32), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 32, (8, 32), generator=torch.Generator().manual_seed(2))
    norms = {}
    for nf in (True, False):
        torch.manual_seed(0)
        m = Transformer(TransformerConfig(vocab_size=32, d_model=64, n_heads=4, n_layers=8, d_ff=256, max_len=32,
                                          norm_first=nf))
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_normal_(mod.weight)
            if isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=1.0)
        norms[nf] = measure.layer_weight_grad_norms(m, (x, y))
    pre, post = norms[True], norms[False]
    assert pre[-1] < pre[0]
    assert post[-1] > 1.5 * pre[-1]
    assert post[-1] / pre[-1] > post[0] / pre[0]


def test_layer_weight_grad_norms_validation():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=16, d_model=32, n_heads=4, n_layers=2, d_ff=64))
    x = torch.randint(0, 16, (2, 8))
    with pytest.raises(ValueError, match="has no parameter 'ffn.w2'"):
        measure.layer_weight_grad_norms(m, x, weights="ffn.w2")
    with pytest.raises(TypeError, match="weights must be"):
        measure.layer_weight_grad_norms(m, x, weights=3)
    with pytest.raises(TypeError, match="batch must be"):
        measure.layer_weight_grad_norms(m, [1, 2, 3])
    with pytest.raises(ValueError, match="non-empty .blocks"):
        measure.layer_weight_grad_norms(nn.Linear(2, 2), torch.zeros(1, 2))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        measure.layer_weight_grad_norms(lambda t: t, x)
    with pytest.raises(ValueError, match="scalar"):
        measure.layer_weight_grad_norms(m, x, lambda out, t: out)


def test_bad_callables():
    with pytest.raises(TypeError, match="fn must be callable"):
        measure.saved_activation_bytes(3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        measure.memory_timeline(lambda x: x, torch.zeros(1))


def test_tracker_public_names():
    lin = nn.Linear(4, 4)
    tracker = measure.SavedTensorTracker(measure.parameter_storages(lin))
    x = torch.randn(3, 4, requires_grad=True)
    with tracker.hooks():
        y = lin(x).exp()
    assert tracker.total_bytes == 2 * 3 * 4 * 4  # the input of the linear layer and the output of exp
    assert tracker.live_bytes == tracker.total_bytes
    del y
    assert tracker.live_bytes == 0


def test_memory_timeline_through_backward_on_a_plain_model_is_the_same():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=16, d_model=32, n_heads=4, n_layers=2, d_ff=64))
    x = torch.randint(0, 16, (2, 12))
    a, b = measure.memory_timeline(m, x), measure.memory_timeline(m, x, through_backward=True)
    assert [(e["phase"], e["module"], e["activation_bytes"]) for e in a] == \
        [(e["phase"], e["module"], e["activation_bytes"]) for e in b]


def test_quiet_stderr_restores_fd_2_even_on_errors():
    import os

    before = os.fstat(2)
    with pytest.raises(RuntimeError):
        with measure._quiet_stderr_fd():
            assert os.path.samestat(os.fstat(2), os.stat(os.devnull))  # silenced inside
            raise RuntimeError("boom")
    after = os.fstat(2)
    assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)


def test_cpu_memory_events_fallback_without_private_results():
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(128, 128)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        (x @ x).exp().sum()
    exact = measure._cpu_memory_events(prof)
    assert sum(n for _, n in exact if n > 0) >= 2 * 128 * 128 * 4

    class Public:  # a profiler seen through its public API only
        def events(self):
            return prof.events()

    approx = measure._cpu_memory_events(Public())
    # the same net bytes (what was allocated and not freed), each op's memory at its start time
    assert sum(n for _, n in approx) == sum(n for _, n in exact)


def test_forward_and_training_flops_follow_the_closed_form():
    from effedu.measure import forward_flops, training_flops, transformer_training_flops, attention_flops
    from effedu.model import Transformer, TransformerConfig
    from effedu.general.sharing import share_layers

    cfg = TransformerConfig(vocab_size=37, d_model=24, n_heads=3, n_layers=3, d_ff=40, max_len=50)
    model = Transformer(cfg)
    # weights of the matmuls, by hand: per layer QKVO 4·d² + FFN 2·d·d_ff; the head d·V (embeddings are lookups)
    d, L, V, n = 24, 3, 37, 17
    N = L * (4 * d * d + 2 * d * 40) + d * V
    expected = 2 * N * n + L * 2 * (2 * n * n * d) // 2  # causal: half of QKᵀ and AV
    assert forward_flops(model, n) == expected
    assert forward_flops(model, n, causal=False) == 2 * N * n + L * 4 * n * n * d
    assert training_flops(model, 4 * n, seq_len=n) == 3 * 4 * expected
    assert training_flops(model, 4 * n, seq_len=n, backward=False) == 4 * expected
    assert transformer_training_flops(N, 4 * n, n_layers=L, seq_len=n, d_model=d) == 3 * 4 * expected
    # ≈ 6·N·D when the attention term is small (short sequences)
    assert abs(training_flops(model, 1000, seq_len=1) / (6 * N * 1000) - 1) < 0.01 + 3 * L * attention_flops(1, d) / (6 * N)
    # sharing saves parameters, not compute
    shared = share_layers(Transformer(cfg), "all")
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in model.parameters())
    assert forward_flops(shared, n) == forward_flops(model, n)


def test_flops_functions_reject_bad_input():
    import torch.nn as nn
    from effedu.measure import forward_flops, training_flops, transformer_training_flops
    from effedu.model import Transformer, TransformerConfig

    model = Transformer(TransformerConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, d_ff=16, max_len=8))
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        forward_flops(model, 0)
    with pytest.raises(TypeError, match="must have a .config"):
        forward_flops(nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="tokens must be a non-negative int"):
        training_flops(model, -1, seq_len=4)
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        transformer_training_flops(10, 10, n_layers=0, seq_len=4, d_model=8)
