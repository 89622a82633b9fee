"""The lottery ticket with rewinding (effedu.general.lottery) and the precomputed pruning sweep's file.

What is checked: the order of the runs (one uninterrupted dense run — equal to a plain run with the same seed — that
hands its step-k weights over through ``on_step``, then one rewound and one re-initialised run per sparsity); the ticket starts from the step-k weights with exactly the mask's entries zeroed, the control from
another init with the same mask; the masks come from the *trained* dense weights (oracle: torch.nn.utils.prune's
global_unstructured) and survive retraining with AdamW and weight decay; schedule_train_fn continues one schedule
(batches and learning rates by global step number); the errors; and the schema and properties of
``python -m effedu.general.prune_sweep --quick``.
"""
import copy

import pytest
import torch
import torch.nn.utils.prune as tprune

from effedu import data
from effedu.general import lottery as LT
from effedu.general import prune as P
from effedu.model import Transformer, TransformerConfig
from effedu.train import lm_loss

CFG = TransformerConfig(vocab_size=12, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=13)


def make_model(seed):
    torch.manual_seed(seed)
    return Transformer(CFG)


class Recorder:
    """A train_fn that does real AdamW steps (weight decay on) on a fixed batch and records every call: the model,
    steps_from, a copy of the weights it was handed, of the weights at every step t (``states[t]``) and at the end.
    It honours the contract: ``on_step(t, model)`` at every t in [steps_from, steps]."""

    def __init__(self, steps=4):
        self.steps, self.calls = steps, []
        self.batch = data.make_task("sort", 8, 13, seed=0)

    def __call__(self, model, steps_from, *, on_step=None):
        call = dict(model=model, steps_from=steps_from, before=copy.deepcopy(model.state_dict()), states={})
        self.calls.append(call)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        for t in range(steps_from, self.steps + 1):
            call["states"][t] = copy.deepcopy(model.state_dict())
            if on_step is not None:
                on_step(t, model)
            if t == self.steps:
                break
            opt.zero_grad()
            lm_loss(model(self.batch.inputs), self.batch.targets).backward()
            opt.step()
        call["after"] = copy.deepcopy(model.state_dict())
        return 0.5


SPARSITIES = [0.0, 0.5, 0.9]


@pytest.fixture(scope="module")
def run():
    rec = Recorder(steps=4)
    out = LT.lottery_ticket(make_model, rec, sparsities=SPARSITIES, rewind_step=2, seed=3)
    return rec, out


def test_the_runs_come_in_the_documented_order(run):
    rec, out = run
    assert [c["steps_from"] for c in rec.calls] == [0] + [2, 0] * len(SPARSITIES)  # the dense run is not split
    dense = rec.calls[0]["model"]
    assert all(c["model"] is not dense for c in rec.calls[1:])
    assert out["sparsity"] == SPARSITIES and len(out["rewound"]) == len(out["reinit"]) == len(SPARSITIES)
    assert out["dense"] == 0.5 and out["rewind_step"] == 2 and out["scope"] == "global" and out["seed"] == 3


def test_masks_are_the_global_magnitude_masks_of_the_trained_dense_weights(run):
    rec, out = run
    trained = rec.calls[0]["after"]
    names = list(P.prunable_weights(make_model(0)))
    for i, s in enumerate(SPARSITIES):
        ticket_before = rec.calls[1 + 2 * i]["before"]
        # oracle: torch's global_unstructured on copies of the trained dense weights
        oracle = make_model(0)
        oracle.load_state_dict(trained)
        modules = dict(oracle.named_modules())
        params = [(modules[n.rsplit(".", 1)[0]], "weight") for n in names]
        if s > 0:
            tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=s)
        for n in names:
            expected = modules[n.rsplit(".", 1)[0]].weight_mask.bool() if s > 0 else torch.ones_like(trained[n]).bool()
            assert torch.equal(ticket_before[n] != 0, expected), (s, n)


def test_the_ticket_starts_from_the_rewound_weights(run):
    rec, out = run
    theta_k = rec.calls[0]["states"][2]  # the dense model's weights at step k = 2 of its one run
    theta_0 = make_model(3).state_dict()
    assert any(not torch.equal(theta_k[n], theta_0[n]) for n in theta_k)  # k > 0: step k is not the init
    prunable = set(P.prunable_weights(make_model(0)))
    for i, s in enumerate(SPARSITIES):
        before = rec.calls[1 + 2 * i]["before"]
        for n, w in before.items():
            if n in prunable:
                kept = w != 0
                torch.testing.assert_close(w[kept], theta_k[n][kept], rtol=0, atol=0)
                assert int((~kept).sum()) == pytest.approx(round(s * w.numel()), abs=round(s * w.numel()) + 1)
            else:
                assert torch.equal(w, theta_k[n]), n


def test_the_control_is_a_fresh_init_with_the_same_mask(run):
    rec, out = run
    theta_1 = make_model(3 + 1).state_dict()  # "another seed"
    prunable = set(P.prunable_weights(make_model(0)))
    for i in range(len(SPARSITIES)):
        ticket, control = rec.calls[1 + 2 * i]["before"], rec.calls[2 + 2 * i]["before"]
        for n in prunable:
            assert torch.equal(ticket[n] != 0, control[n] != 0), n  # the same mask
            kept = control[n] != 0
            assert torch.equal(control[n][kept], theta_1[n][kept])
            assert not torch.equal(control[n][kept], ticket[n][kept])  # reinit differs from the ticket


def test_masks_hold_during_retraining(run):
    rec, out = run
    prunable = set(P.prunable_weights(make_model(0)))
    for i, s in enumerate(SPARSITIES):
        for call in rec.calls[1 + 2 * i: 3 + 2 * i]:
            for n in prunable:
                pruned = call["before"][n] == 0
                assert torch.all(call["after"][n][pruned] == 0), (s, n)  # AdamW + weight decay did not revive them
                if s > 0:
                    assert not torch.equal(call["after"][n], call["before"][n])  # ... and it did train
    n_total = sum(w.numel() for w in P.prunable_weights(make_model(0)).values())
    for s, kept in zip(SPARSITIES, out["kept_sparsity"]):
        assert kept == pytest.approx(round(s * n_total) / n_total, abs=2 / n_total)


def test_rewind_step_zero_is_the_original_hypothesis():
    rec = Recorder(steps=3)
    LT.lottery_ticket(make_model, rec, sparsities=[0.8], rewind_step=0, seed=5)
    assert [c["steps_from"] for c in rec.calls] == [0, 0, 0]
    theta_0, ticket = make_model(5).state_dict(), rec.calls[1]["before"]
    for n, w in ticket.items():
        kept = w != 0
        assert torch.equal(w[kept], theta_0[n][kept])


def test_layer_scope_prunes_each_matrix_by_the_same_fraction():
    rec = Recorder(steps=2)
    LT.lottery_ticket(make_model, rec, sparsities=[0.75], rewind_step=1, scope="layer")
    ticket = rec.calls[1]["before"]
    for n in P.prunable_weights(make_model(0)):
        assert int((ticket[n] == 0).sum()) == round(0.75 * ticket[n].numel()), n
    masks = LT.ticket_masks(rec.calls[0]["model"], 0.75, "layer")
    for n, m in masks.items():
        assert torch.equal(m, P.magnitude_mask(rec.calls[0]["model"].state_dict()[n], 0.75))


def test_schedule_train_fn_continues_one_schedule():
    seen, at = [], {}

    def batch_fn(step):
        seen.append(step)
        return data.make_task("sort", 8, 13, seed=step)

    val = data.make_task("sort", 16, 13, seed=99)
    fn = LT.schedule_train_fn(batch_fn, val, steps=6, lr=1e-2, warmup=2)
    m = make_model(0)
    init = copy.deepcopy(m.state_dict())
    acc = fn(m, 0, on_step=lambda t, model: at.setdefault(t, copy.deepcopy(model.state_dict())))
    assert seen == list(range(6))  # step t trains on batch_fn(t)
    assert sorted(at) == list(range(7))  # on_step saw the weights at every step 0 … 6
    assert all(torch.equal(at[0][n], w) for n, w in init.items())  # step 0: the init
    assert all(torch.equal(at[6][n], w) for n, w in m.state_dict().items())  # step 6: the trained model
    assert any(not torch.equal(at[2][n], at[3][n]) for n in init)  # one step apart: the weights moved
    assert 0.0 <= acc <= 1.0
    seen.clear()
    m2 = make_model(0)
    m2.load_state_dict(at[4])
    fn(m2, 4)
    assert seen == [4, 5]  # a run from step 4 continues the schedule: the batches of steps 4 and 5
    before = copy.deepcopy(m.state_dict())
    assert fn(m, 6) == pytest.approx(acc)  # nothing left to train: only the evaluation
    assert all(torch.equal(before[n], w) for n, w in m.state_dict().items())
    with pytest.raises(ValueError, match="steps_from <= steps=6"):
        fn(m, 7)
    with pytest.raises(ValueError, match="steps_from <= steps=6"):
        fn(m, -1)
    with pytest.raises(TypeError, match="on_step must be a callable"):
        fn(m, 0, on_step=3)


def test_the_dense_run_is_one_uninterrupted_training():
    """The dense result equals a plain, unsplit run with the same seed (no optimiser restart at step k), and the
    ticket starts from that run's own step-k weights."""
    fn = LT.schedule_train_fn(lambda s: data.make_task("sort", 16, 13, seed=s),
                              data.make_task("sort", 64, 13, seed=10**6), steps=10, lr=1e-2, warmup=2)
    models, at_k = [], {}

    def recording(model, steps_from, *, on_step=None):
        models.append((model, steps_from, copy.deepcopy(model.state_dict())))
        return fn(model, steps_from, on_step=on_step)

    out = LT.lottery_ticket(make_model, recording, sparsities=[0.5], rewind_step=4, seed=7)
    plain = make_model(7)
    acc = fn(plain, 0, on_step=lambda t, m: at_k.setdefault(t, copy.deepcopy(m.state_dict())) if t == 4 else None)
    assert out["dense"] == acc
    dense = models[0][0]
    assert all(torch.equal(w, plain.state_dict()[n]) for n, w in dense.state_dict().items())
    # the old way — train to k, then a second call from k with a fresh AdamW — is a different run
    split = make_model(7)
    split.load_state_dict(at_k[4])
    fn(split, 4)
    assert any(not torch.equal(w, split.state_dict()[n]) for n, w in plain.state_dict().items())
    ticket, steps_from, before = models[1]
    assert steps_from == 4
    for n, w in before.items():
        kept = w != 0
        assert torch.equal(w[kept], at_k[4][n][kept]), n


def test_an_end_to_end_run_on_a_task():
    train_fn = LT.schedule_train_fn(lambda s: data.make_task("sort", 16, 13, seed=s),
                                    data.make_task("sort", 32, 13, seed=10**6), steps=8)
    out = LT.lottery_ticket(make_model, train_fn, sparsities=[0.5], rewind_step=2)
    assert all(0.0 <= a <= 1.0 for a in [out["dense"], *out["rewound"], *out["reinit"]])
    assert out["kept_sparsity"][0] == pytest.approx(0.5, abs=1e-3)


def test_errors():
    rec = Recorder(steps=2)
    kw = dict(sparsities=[0.5], rewind_step=1)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got 1.0"):
        LT.lottery_ticket(make_model, rec, sparsities=[0.5, 1.0], rewind_step=1)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got -0.1"):
        LT.lottery_ticket(make_model, rec, sparsities=[-0.1], rewind_step=1)
    with pytest.raises(TypeError, match="sparsities must be a list"):
        LT.lottery_ticket(make_model, rec, sparsities=0.5, rewind_step=1)
    with pytest.raises(ValueError, match="sparsities must not be empty"):
        LT.lottery_ticket(make_model, rec, sparsities=[], rewind_step=1)
    with pytest.raises(ValueError, match="rewind_step must be an int ≥ 0, got -1"):
        LT.lottery_ticket(make_model, rec, sparsities=[0.5], rewind_step=-1)
    with pytest.raises(TypeError, match="rewind_step must be an int"):
        LT.lottery_ticket(make_model, rec, sparsities=[0.5], rewind_step=1.5)
    with pytest.raises(ValueError, match="unknown scope 'local'"):
        LT.lottery_ticket(make_model, rec, scope="local", **kw)
    with pytest.raises(TypeError, match="make_model must be a callable"):
        LT.lottery_ticket(42, rec, **kw)
    with pytest.raises(TypeError, match="make_model must return an nn.Module"):
        LT.lottery_ticket(lambda seed: "model", rec, **kw)
    with pytest.raises(TypeError, match="train_fn must be a callable"):
        LT.lottery_ticket(make_model, None, **kw)
    with pytest.raises(TypeError, match="train_fn must return the final accuracy"):
        LT.lottery_ticket(make_model, lambda m, s, on_step=None: {"acc": 1.0}, **kw)
    with pytest.raises(ValueError, match="rewind_step=5 was never reached"):
        LT.lottery_ticket(make_model, Recorder(steps=2), sparsities=[0.5], rewind_step=5)
    with pytest.raises(ValueError, match="rewind_step=1 was never reached: train_fn must call on_step"):
        LT.lottery_ticket(make_model, lambda m, s, on_step=None: 0.5, **kw)  # ignores on_step
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        LT.lottery_ticket(make_model, rec, seed=-1, **kw)
    with pytest.raises(TypeError, match="batch_fn must be a callable"):
        LT.schedule_train_fn(None, None, steps=2)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        LT.schedule_train_fn(lambda s: None, None, steps=2, lr=0)
    with pytest.raises(ValueError, match="steps must be an int ≥ 1"):
        LT.schedule_train_fn(lambda s: None, None, steps=0)


# ---------------------------------------------------------------------------------------------------------------
# the precomputed sweep: python -m effedu.general.prune_sweep --quick
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from effedu.general import prune_sweep as SW

    out = tmp_path_factory.mktemp("sweep") / "pruning.json"
    written = SW.main(["--quick", "--out", str(out)])
    results = SW.load_results(out)
    assert written["quick"] is True and results["command"] == written["command"]  # main returns what it wrote
    return results


def _is_fraction(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_the_quick_sweep_records_its_command_and_environment(quick):
    assert quick["command"] == "python -m effedu.general.prune_sweep --quick" and quick["quick"] is True
    assert {"torch", "cpu", "backends"} <= set(quick["env"])
    assert quick["seconds"] > 0


def test_the_quick_sweep_tiny_part(quick):
    from effedu.general import prune_sweep as SW

    t = quick["tiny"]
    u = t["unstructured"]
    assert u["sparsity"] == pytest.approx(SW.TINY_QUICK["sparsities"], abs=1 / t["prunable_weights"])
    assert u["accuracy"][0] == t["dense_accuracy"]  # sparsity 0 is the dense model, exactly
    assert all(_is_fraction(a) for a in u["accuracy"] + u["accuracy_finetuned"])
    h = t["heads"]
    L, H = SW.TINY_QUICK["n_layers"], SW.TINY_QUICK["n_heads"]
    assert h["n_heads_pruned"] == list(range(L * (H - 1) + 1))
    assert h["accuracy"][0] == h["accuracy_random"][0] == t["dense_accuracy"]
    d, dh = SW.TINY_QUICK["d_model"], SW.TINY_QUICK["d_model"] // H
    assert h["weight_sparsity"] == pytest.approx([n * 4 * d * dh / t["prunable_weights"] for n in h["n_heads_pruned"]])
    assert torch.tensor(h["importance"]).shape == (L, H)
    for strategy in ("top", "bottom", "alternate"):
        rows = t["layers"][strategy]
        assert rows["weight_sparsity"] == pytest.approx([1 - k / L for k in rows["n_kept"]])
        assert [len(k) for k in rows["kept"]] == rows["n_kept"]
        assert rows["accuracy"][rows["n_kept"].index(L)] == t["dense_accuracy"]
    lot = t["lottery"]
    assert lot["sparsity"] == SW.TINY_QUICK["lottery_sparsities"] and lot["rewind_step"] == SW.TINY_QUICK["rewind_step"]
    assert lot["seeds"] == SW.TINY_QUICK["lottery_seeds"] and len(lot["dense"]) == len(lot["seeds"])
    assert all(len(r) == len(lot["sparsity"]) for r in lot["rewound"] + lot["reinit"])
    assert all(_is_fraction(a) for r in lot["rewound"] + lot["reinit"] for a in r)
    assert all(_is_fraction(a) for a in lot["dense"])
    assert lot["dense"][0] == t["dense_accuracy"]  # seed 0's dense run IS the model above: one uninterrupted run
    assert lot["kept_sparsity"] == pytest.approx(lot["sparsity"], abs=1e-3)


def test_the_quick_sweep_minilm_part(quick):
    m = quick["minilm"]
    assert m["finetuned"] is False and m["n_sentences"] == 24
    assert m["size"]["total"] == 22_565_376 and m["size"]["token_embeddings"] == 30522 * 384
    u = m["unstructured"]
    assert u["sparsity"][0] == 0.0 and u["sparsity"][1] == pytest.approx(0.5, abs=1e-6)
    for key in ("cosine", "top1", "top5"):  # nothing pruned: the reference itself, exactly
        assert u[key][0] == pytest.approx(1.0, abs=1e-12)
        assert m["heads"]["importance"][key][0] == pytest.approx(1.0, abs=1e-12)
        for strategy in ("top", "bottom", "alternate"):
            rows = m["layers"][strategy]
            assert rows[key][rows["n_kept"].index(6)] == pytest.approx(1.0, abs=1e-12)
    assert u["cosine"][1] < 1.0  # half the encoder's weights gone: the embeddings moved
    assert m["heads"]["weight_sparsity"] == pytest.approx([n * 4 * 384 * 32 / m["prunable_weights"]
                                                           for n in m["heads"]["n_heads_pruned"]])
    imp = torch.tensor(m["head_importance"])
    assert imp.shape == (6, 12) and bool((imp >= 0).all())
    assert imp.norm(dim=1) == pytest.approx(torch.ones(6, dtype=torch.float64))  # normalised per layer
    assert m["layers"]["top"]["kept"][m["layers"]["top"]["n_kept"].index(3)] == [0, 1, 2]
    assert m["layers"]["bottom"]["kept"][m["layers"]["bottom"]["n_kept"].index(3)] == [3, 4, 5]
    assert m["layers"]["alternate"]["kept"][m["layers"]["alternate"]["n_kept"].index(3)] == [0, 2, 4]


def test_load_results_says_how_to_make_a_missing_file(tmp_path):
    from effedu.general import prune_sweep as SW

    with pytest.raises(FileNotFoundError, match="python -m effedu.general.prune_sweep"):
        SW.load_results(tmp_path / "nope.json")
