"""The training loop: it learns, it is deterministic, it validates."""
import math
import pytest
import torch

from effedu.model import Transformer, TransformerConfig
from effedu.train import IGNORE, accuracy, evaluate, lm_loss, train


def copy_batch(step, n=32, L=8, V=10):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(2, V, (n, L), generator=g)
    seq = torch.cat([x, torch.ones(n, 1, dtype=torch.long), x], dim=1)  # prompt, SEP, copy
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, : L] = IGNORE  # score only the copy
    return inputs, targets


def test_learns_a_copy_task_and_is_deterministic():
    def run():
        torch.manual_seed(0)
        model = Transformer(TransformerConfig(vocab_size=10, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=32))
        hist = train(model, copy_batch, steps=100, lr=5e-3, progress=False, val_batch=copy_batch(10_000))
        return model, hist

    model, hist = run()
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert hist["val_acc"][-1] > 0.3  # chance is 1/8
    _, hist2 = run()
    assert hist["loss"] == hist2["loss"]
    assert len(hist["loss"]) == 100 and len(hist["val_loss"]) == 10


def test_lm_loss_ignores_unscored_positions_and_accuracy():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0
    targets = torch.tensor([[2, IGNORE, IGNORE]])
    assert float(lm_loss(logits, targets)) < 1e-3
    assert accuracy(logits, targets) == 1.0
    with pytest.raises(ValueError, match="targets must be"):
        lm_loss(logits, torch.zeros(1, 2, dtype=torch.long))


def test_validation_and_nan_detection():
    model = Transformer(TransformerConfig(vocab_size=10, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=32))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train(model, copy_batch, steps=0, progress=False)
    with pytest.raises(ValueError, match="lr must be a positive"):
        train(model, copy_batch, steps=1, lr=-1, progress=False)
    with pytest.raises(TypeError, match="batches must be"):
        train(model, 42, steps=1, progress=False)
    with pytest.raises(FloatingPointError, match="loss became"):
        train(model, copy_batch, steps=3, lr=1e30, grad_clip=None, progress=False)
    fresh = Transformer(TransformerConfig(vocab_size=10, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=32))
    loss, acc = evaluate(fresh, copy_batch(1))
    assert loss > 0 and 0 <= acc <= 1


def test_lm_loss_keeps_float64_and_computes_half_precision_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, 1] = IGNORE
    loss = lm_loss(logits, targets)
    assert loss.dtype == torch.float64
    keep = targets != IGNORE
    ref = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    assert lm_loss(logits.half(), targets).dtype == torch.float32
    assert lm_loss(logits.flatten(0, 1), targets.flatten()) == loss  # (N, V) as well as (B, T, V)


def test_divergence_is_recorded_instead_of_raised_when_asked():
    cfg = TransformerConfig(vocab_size=10, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=32)
    model = Transformer(cfg)
    hist = train(model, copy_batch, steps=6, lr=1e30, grad_clip=None, progress=False, on_divergence="record")
    k = hist["diverged_at"]
    assert k is not None and len(hist["loss"]) == k + 1 and not math.isfinite(hist["loss"][-1])
    assert all(math.isfinite(v) for v in hist["loss"][:-1]) and hist["step"][-1] == k
    # a threshold counts as divergence too: the first step above it stops training
    hist = train(Transformer(cfg), copy_batch, steps=5, progress=False, on_divergence="record",
                 divergence_threshold=0.0)
    assert hist["diverged_at"] == 0 and len(hist["loss"]) == 1
    with pytest.raises(FloatingPointError, match="exceeded"):
        train(Transformer(cfg), copy_batch, steps=2, progress=False, divergence_threshold=0.0)
    # a healthy run: the key is there, None
    hist = train(Transformer(cfg), copy_batch, steps=3, progress=False, on_divergence="record", grad_clip=0)
    assert hist["diverged_at"] is None and len(hist["loss"]) == 3
    for bad, match in ((dict(on_divergence="ignore"), "on_divergence must be"),
                       (dict(divergence_threshold=float("nan")), "divergence_threshold must be"),
                       (dict(warmup=-1), "warmup must be an int"), (dict(grad_clip=-1.0), "grad_clip must be")):
        with pytest.raises(ValueError, match=match):
            train(Transformer(cfg), copy_batch, steps=1, progress=False, **bad)


def test_default_step_adds_the_weighted_auxiliary_loss():
    """aux_weight: the backward sees loss + w·model.aux_loss(); the returned number is the task loss alone."""
    import copy

    from effedu.model import Transformer, TransformerConfig, lm_loss
    from effedu.train import default_step

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=16, causal=False,
                            attention="routing", attention_kwargs={"n_clusters": 2})
    model = Transformer(cfg)
    twin = copy.deepcopy(model)
    x = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(2))
    got = default_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.0), aux_weight=0.5)
    loss = lm_loss(twin(x), y)
    aux = twin.aux_loss()
    assert float(aux) > 0  # the routing commitment loss is there to be added
    (loss + 0.5 * aux).backward()
    assert got == pytest.approx(float(loss))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
