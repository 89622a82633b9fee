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


def test_bad_callables():
    with pytest.raises(TypeError, match="fn must be callable"):
        measure.saved_activation_bytes(3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        measure.memory_timeline(lambda x: x, torch.zeros(1))
