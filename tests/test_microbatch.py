"""Micro-batching and pipelines: accumulation = full batch, GPipe schedule invariants, bubble formula vs counted
idle slots, a real 2-process pipeline (and torch.distributed.pipelining) = the single-process gradient."""
import multiprocessing

import pytest
import torch
import torch.nn as nn

from _oracles import TOL
from effedu.general import microbatch as mb
from effedu.general import pipeline as pl
from effedu.model import Transformer, TransformerConfig
from effedu.train import IGNORE, default_step

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when other processes load the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(n_layers=4, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=n_layers, d_ff=32, max_len=16)
    return Transformer(cfg).to(dtype)


def ragged_batch(B=7, T=9, seed=0):
    """Token ids with unequal numbers of scored targets per row, and one row with nothing scored."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (B, T), generator=g)
    y = torch.randint(0, 16, (B, T), generator=g)
    y[: B // 2, : T - 2] = IGNORE  # the first rows score only their last 2 tokens
    y[B - 2] = IGNORE  # one row scores nothing
    return x, y


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_grads_close(got, want, dtype):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL[dtype], msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_accumulation_equals_full_batch_with_ragged_scoring(dtype):
    model = tiny_model(dtype=dtype)
    batch = ragged_batch()
    full_loss = mb.full_batch_gradients(model, batch)
    ref = grads_of(model)
    for n_micro in (1, 2, 3, 7):  # 3 does not divide 7; with 7 one micro-batch has nothing scored
        loss = mb.accumulate_gradients(model, batch, n_micro)
        assert loss == pytest.approx(full_loss, rel=1e-12 if dtype == torch.float64 else 1e-5)
        assert_grads_close(grads_of(model), ref, dtype)


def test_naive_mean_of_means_is_not_the_full_batch_gradient():
    model = tiny_model()
    batch = ragged_batch()
    mb.full_batch_gradients(model, batch)
    ref = grads_of(model)
    mb.accumulate_gradients(model, batch, 2, weight_by="micro")
    diff = max((g - ref[n]).abs().max().item() for n, g in grads_of(model).items())
    assert diff > 1e-3  # unequal scored counts: (1/M) Σ Lₘ is another loss
    # ... but with every token scored and equal micro-batches the naive weights are the right ones
    x, y = ragged_batch(B=8)
    y = torch.randint(0, 16, y.shape, generator=torch.Generator().manual_seed(1))
    mb.full_batch_gradients(model, (x, y))
    ref = grads_of(model)
    mb.accumulate_gradients(model, (x, y), 4, weight_by="micro")
    assert_grads_close(grads_of(model), ref, torch.float64)


def test_micro_weights_and_sizes():
    assert mb.micro_sizes(8, 3) == [3, 3, 2]
    assert mb.micro_sizes(8, 4, allow_uneven=False) == [2, 2, 2, 2]
    t = [torch.tensor([1, IGNORE, 2]), torch.tensor([IGNORE, IGNORE, 3]), torch.tensor([[IGNORE]])]
    assert mb.micro_weights(t, "scored") == [2 / 3, 1 / 3, 0.0]
    assert mb.micro_weights(t, "samples") == [3 / 7, 3 / 7, 1 / 7]
    assert mb.micro_weights(t, "micro") == [1 / 3] * 3
    parts = mb.split_batch(ragged_batch(), 3)
    assert [p.inputs.shape[0] for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([p.targets for p in parts]), ragged_batch()[1])


def test_samples_weighting_for_a_per_sample_mean_loss():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(11, 5, dtype=torch.float64)
    y = torch.randn(11, 2, dtype=torch.float64)
    mse = nn.functional.mse_loss
    mb.full_batch_gradients(net, (x, y), loss_fn=mse)
    ref = grads_of(net)
    mb.accumulate_gradients(net, (x, y), 4, loss_fn=mse, weight_by="samples")  # sizes 3, 3, 3, 2
    assert_grads_close(grads_of(net), ref, torch.float64)
    with pytest.raises(TypeError, match="weight_by='scored' counts integer targets"):
        mb.accumulate_gradients(net, (x, y), 4, loss_fn=mse)


def test_accumulation_step_trains_like_the_full_batch_step():
    batch = ragged_batch(B=8)
    models = [tiny_model(dtype=torch.float32), tiny_model(dtype=torch.float32)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    default_step(models[0], *batch, opts[0])
    mb.accumulation_step(4, grad_clip=None)(models[1], *batch, opts[1])
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, **TOL[torch.float32])
    assert any((p.grad.abs() > 0).any() for p in models[1].parameters())


def test_token_cross_entropy_equals_lm_loss_and_keeps_float64():
    from effedu.train import lm_loss

    logits = torch.randn(3, 5, 7)
    targets = torch.randint(0, 7, (3, 5))
    targets[0, :3] = IGNORE
    torch.testing.assert_close(mb.token_cross_entropy(logits, targets), lm_loss(logits, targets))
    assert mb.token_cross_entropy(logits.double(), targets).dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------------
# schedule and bubble
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K,M", [(1, 1), (1, 5), (2, 1), (2, 4), (3, 5), (4, 8), (5, 3)])
def test_gpipe_schedule_invariants(K, M):
    sched = mb.gpipe_schedule(K, M)
    assert mb.check_schedule(sched, K, M)
    assert len(sched) == 2 * (M + K - 1)
    when = {(kind, s, m): t for t, tick in enumerate(sched) for s, (kind, m) in tick.items()}
    assert len(when) == 2 * K * M  # every stage runs F and B of every micro-batch once
    for s in range(K):
        for m in range(M):
            assert when[("F", s, m)] == s + m  # the forward wave
            if s > 0:
                assert when[("F", s, m)] > when[("F", s - 1, m)]  # needs the previous stage's output
            assert when[("B", s, m)] > when[("F", s, m)]  # backward after its forward
            if s < K - 1:
                assert when[("B", s, m)] > when[("B", s + 1, m)]  # needs the next stage's gradient
    # GPipe: all forwards (of every stage) before any backward
    assert max(t for (k, _, _), t in when.items() if k == "F") < min(t for (k, _, _), t in when.items() if k == "B")
    acts = mb.stage_actions(sched, K - 1)
    assert acts == [("F", m) for m in range(M)] + [("B", m) for m in range(M)]


def test_check_schedule_rejects_broken_schedules():
    good = mb.gpipe_schedule(2, 2)
    swapped = [dict(t) for t in good]
    swapped[0], swapped[1] = {0: ("F", 0), 1: ("F", 0)}, {0: ("F", 1)}  # stage 1 runs F0 with stage 0
    with pytest.raises(ValueError, match="must come after F0 on stage 0"):
        mb.check_schedule(swapped, 2, 2)
    missing = [dict(t) for t in good][:-1]
    with pytest.raises(ValueError, match="never runs B1"):
        mb.check_schedule(missing, 2, 2)
    twice = [dict(t) for t in good] + [{0: ("B", 1)}]
    with pytest.raises(ValueError, match="runs twice"):
        mb.check_schedule(twice, 2, 2)
    early_b = [{0: ("F", 0)}, {1: ("F", 0)}, {0: ("B", 0)}, {1: ("B", 0)}]
    with pytest.raises(ValueError, match="must come after B0 on stage 1"):
        mb.check_schedule(early_b, 2, 1)
    with pytest.raises(ValueError, match="action must be"):
        mb.check_schedule([{0: ("X", 0)}], 1, 1)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 8])
def test_bubble_formula_equals_counted_idle_slots(K):
    previous = 1.0
    for M in (1, 2, 3, 4, 7, 16, 32):
        counted = mb.idle_fraction(mb.gpipe_schedule(K, M), K)
        assert counted == pytest.approx(mb.bubble_fraction(K, M), abs=1e-12)
        assert counted <= previous  # more micro-batches, smaller bubble
        previous = counted
    assert mb.bubble_fraction(4, 16) == pytest.approx(3 / 19)
    assert mb.bubble_fraction(K, 4 * K) < 0.2  # GPipe's "negligible when M ≥ 4K"
    events = mb.schedule_events(mb.gpipe_schedule(K, 5))
    assert mb.measured_bubble(events, K) == pytest.approx(mb.bubble_fraction(K, 5))


# ---------------------------------------------------------------------------------------------------------------
# stages and the single-process simulation
# ---------------------------------------------------------------------------------------------------------------


def test_stages_compose_to_the_model_and_share_its_parameters():
    model = tiny_model(n_layers=5, dtype=torch.float32)
    x, _ = ragged_batch()
    for K in (1, 2, 3, 5):
        stages = mb.split_transformer(model, K)
        assert [len(s.blocks) for s in stages] == mb.micro_sizes(5, K)
        h = x
        for stage in stages:
            h = stage(h)
        assert torch.equal(h, model(x))
        owned = [id(p) for s in stages for p in s.parameters()]
        assert sorted(owned) == sorted(id(p) for p in model.parameters())  # each parameter on exactly one stage
    stages = mb.split_transformer(model, 2, layers_per_stage=[1, 4])
    assert [len(s.blocks) for s in stages] == [1, 4]


@pytest.mark.parametrize("K,M", [(1, 3), (2, 3), (3, 2), (4, 7)])
def test_simulated_pipeline_gradients_equal_full_batch(K, M):
    model = tiny_model()
    batch = ragged_batch()
    full_loss = mb.full_batch_gradients(model, batch)
    ref = grads_of(model)
    res = mb.simulate_pipeline(model, batch, M, K)
    assert_grads_close(grads_of(model), ref, torch.float64)
    assert res["loss"] == pytest.approx(full_loss, rel=1e-12)
    d = model.config.d_model
    sizes = mb.micro_sizes(7, M)
    boundary = sum(b * 9 * d * 8 for b in sizes)  # one (B_m, T, d) float64 activation per micro-batch
    assert res["sent_bytes"] == [boundary * ((s > 0) + (s < K - 1)) for s in range(K)]
    for trace in res["activation_trace"]:  # GPipe: memory grows over the M forwards, drains over the M backwards
        assert len(trace) == 2 * M and trace[M - 1] == max(trace) and trace[-1] == 0
        assert trace[:M] == sorted(trace[:M])


def test_gpipe_stage_holds_all_micro_batches():
    model = tiny_model()
    x, y = ragged_batch(B=8)
    peak1 = mb.simulate_pipeline(model, (x, y), 1, 2)["activation_peak_bytes"]
    peak4 = mb.simulate_pipeline(model, (x, y), 4, 2)["activation_peak_bytes"]
    for a, b in zip(peak1, peak4):  # the whole mini-batch's activations are alive at the flush, however cut
        assert abs(a - b) <= 0.05 * a


def test_rematerialisation_keeps_gradients_and_cuts_stage_memory():
    model = tiny_model()
    batch = ragged_batch(B=8)
    mb.full_batch_gradients(model, batch)
    ref = grads_of(model)
    plain = mb.simulate_pipeline(model, batch, 4, 2)
    remat = mb.simulate_pipeline(model, batch, 4, 2, remat=True)
    assert_grads_close(grads_of(model), ref, torch.float64)
    for p, r in zip(plain["activation_peak_bytes"], remat["activation_peak_bytes"]):
        assert r < 0.6 * p
    # between forward and backward a rematerialising stage keeps (about) only its inputs
    held_plain, held_remat = plain["activation_trace"][1][3], remat["activation_trace"][1][3]
    assert held_remat < 0.15 * held_plain


# ---------------------------------------------------------------------------------------------------------------
# the real pipeline: 2 processes, torch.distributed (gloo)
# ---------------------------------------------------------------------------------------------------------------


def test_two_process_pipeline_equals_single_process():
    model = tiny_model()
    batch = ragged_batch()
    full_loss = mb.full_batch_gradients(model, batch)
    ref = grads_of(model)
    configs = [{"n_micro": 3}, {"n_micro": 2, "remat": True}]
    results = mb.run_pipelines(model, batch, configs, n_stages=2, warmup=0, repeats=2, timeout=300)
    for cfg, res in zip(configs, results):
        assert len(res["step_times"]) == 2 and res["wall_time"] == pytest.approx(min(res["step_times"]))  # best
        assert res["loss"] == pytest.approx(full_loss, rel=1e-12)
        assert_grads_close(res["grads"], ref, torch.float64)
        sim = mb.simulate_pipeline(model, batch, cfg["n_micro"], 2, remat=cfg.get("remat", False))
        assert res["activation_peak_bytes"] == sim["activation_peak_bytes"]  # the meter is deterministic
        assert res["sent_bytes"] == sim["sent_bytes"]
        M = cfg["n_micro"]
        for s in range(2):
            mine = [e for e in res["events"] if e["stage"] == s]
            assert [(e["kind"], e["micro"]) for e in mine] == mb.stage_actions(mb.gpipe_schedule(2, M), s)
            assert all(e["end"] >= e["start"] >= 0 for e in mine)
        f0 = {e["micro"]: e for e in res["events"] if e["stage"] == 0 and e["kind"] == "F"}
        f1 = {e["micro"]: e for e in res["events"] if e["stage"] == 1 and e["kind"] == "F"}
        assert all(f1[m]["start"] >= f0[m]["start"] for m in range(M))  # stage 1 waits for stage 0's output
        assert 0.0 <= res["measured_bubble"] < 1.0 and res["predicted_bubble"] == mb.bubble_fraction(2, M)
    assert multiprocessing.active_children() == []


def test_torch_pipelining_oracle_agrees():
    pytest.importorskip("torch.distributed.pipelining")
    model = tiny_model()
    x, y = ragged_batch(B=8)
    full_loss = mb.full_batch_gradients(model, (x, y))
    ref = grads_of(model)
    res = mb.run_torch_pipeline(model, (x, y), 4, timeout=300)
    assert res["loss"] == pytest.approx(full_loss, rel=1e-12)
    assert_grads_close(res["grads"], ref, torch.float64)


def test_failing_stage_is_reported_and_processes_are_reaped():
    model = tiny_model()
    # torch.cdist refuses integer targets: the last stage raises inside its process
    with pytest.raises(RuntimeError, match=r"a stage process failed:[\s\S]*stage 1[\s\S]*cdist"):
        mb.run_pipeline(model, ragged_batch(), 2, loss_fn=torch.cdist, warmup=0, timeout=300)
    assert multiprocessing.active_children() == []
    with pytest.raises(TimeoutError, match="did not finish within timeout"):
        mb.run_pipeline(model, ragged_batch(), 2, warmup=0, timeout=0.05)
    assert multiprocessing.active_children() == []


# ---------------------------------------------------------------------------------------------------------------
# measured-pipeline analysis: busy fractions, hand-offs, the ideal step time, the cost/benefit plot
# ---------------------------------------------------------------------------------------------------------------


def fake_runs(Ms=(1, 2, 4), K=2):
    """Runs as run_pipelines returns them, from GPipe's schedule with a box of 1/M (remat: backward 4/3 longer)."""
    runs = []
    for M in Ms:
        for remat in (False, True):
            events = [{**e, "start": e["start"] / M, "end": e["end"] / M} for e in
                      mb.schedule_events(mb.gpipe_schedule(K, M))]
            runs.append({"n_stages": K, "n_micro": M, "remat": remat, "events": events,
                         "wall_time": max(e["end"] for e in events), "measured_bubble": mb.measured_bubble(events, K),
                         "predicted_bubble": mb.bubble_fraction(K, M),
                         "activation_peak_bytes": [1000 // (M if remat else 1)] * K})
    return runs


@pytest.mark.parametrize("K,M", [(2, 1), (2, 8), (3, 4), (4, 5)])
def test_busy_fraction_and_ideal_step_time_match_the_bubble_formula(K, M):
    events = mb.schedule_events(mb.gpipe_schedule(K, M))
    assert mb.busy_fractions(events, K) == pytest.approx([M / (M + K - 1)] * K)  # every stage: 1 − bubble
    one = mb.schedule_events(mb.gpipe_schedule(K, 1))  # M = 1: one box of 1 tick per stage and direction
    ideal = mb.ideal_step_time(one, M, K)
    assert ideal == pytest.approx(2 * (M + K - 1) / M)  # the M-micro-batch schedule, boxes of 1/M tick
    assert 1 - 2 * K / (K * ideal) == pytest.approx(mb.bubble_fraction(K, M))
    # unequal stages: the slowest one sets the pace
    slow = [{**e, "end": e["start"] + (3 if e["stage"] == 0 else 1)} for e in one]
    assert mb.ideal_step_time(slow, M, K) == pytest.approx(2 * ((3 + K - 1) / M + (M - 1) * 3 / M))


def test_handoff_latencies_measure_only_waiting_receivers():
    ev = [{"stage": 0, "kind": "F", "micro": 0, "start": 0.0, "end": 1.0},
          {"stage": 0, "kind": "F", "micro": 1, "start": 1.0, "end": 2.0},
          {"stage": 1, "kind": "F", "micro": 0, "start": 1.5, "end": 3.0},   # waited 0.5 for stage 0
          {"stage": 1, "kind": "F", "micro": 1, "start": 3.0, "end": 4.0},   # input ready at 2.0 but busy: no wait
          {"stage": 1, "kind": "B", "micro": 0, "start": 4.0, "end": 5.0},
          {"stage": 0, "kind": "B", "micro": 0, "start": 5.25, "end": 6.0}]  # waited 0.25 for stage 1's gradient
    assert mb.handoff_latencies(ev) == pytest.approx([0.5, 0.25])


def test_plot_measured_pipeline_and_one_based_gantt_labels():
    fig = mb.plot_measured_pipeline(fake_runs(), 2, True)
    axes = fig.get_axes()
    assert len(axes) == 4
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["stage 1", "stage 2"]
    assert "M=2, rematerialised" in axes[0].get_title() and "predicted 33%" in axes[0].get_title()
    labels = {t.get_text() for t in axes[0].texts}
    assert labels == {"1", "2"}  # micro-batches shown 1-based


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_bad_input():
    model = tiny_model(n_layers=2)
    batch = ragged_batch(B=8)
    with pytest.raises(ValueError, match=r"world size n_stages ≥ 2.*got 1"):
        mb.run_pipeline(model, batch, 2, n_stages=1)
    with pytest.raises(ValueError, match="n_stages=3 is larger than the model's n_layers=2"):
        mb.run_pipeline(model, batch, 2, n_stages=3)
    with pytest.raises(ValueError, match="n_stages=3 is larger than the model's n_layers=2"):
        mb.simulate_pipeline(model, batch, 2, 3)
    with pytest.raises(ValueError, match="n_micro=3 does not divide the batch size 8"):
        mb.accumulate_gradients(model, batch, 3, allow_uneven=False)
    with pytest.raises(ValueError, match="n_micro=3 does not divide the batch size 8"):
        mb.run_torch_pipeline(model, batch, 3)
    with pytest.raises(ValueError, match="n_micro=9 is larger than the batch size 8"):
        mb.accumulate_gradients(model, batch, 9)
    with pytest.raises(ValueError, match="n_micro must be an int ≥ 1, got 0"):
        mb.gpipe_schedule(2, 0)
    with pytest.raises(TypeError, match="n_stages must be an int, got float"):
        mb.bubble_fraction(2.0, 4)
    with pytest.raises(ValueError, match="weight_by must be one of"):
        mb.accumulate_gradients(model, batch, 2, weight_by="tokens")
    with pytest.raises(ValueError, match="same batch size, got 8 and 7"):
        mb.accumulate_gradients(model, (batch[0], batch[1][:7]), 2)
    with pytest.raises(ValueError, match="no target is scored"):
        mb.accumulate_gradients(model, (batch[0], torch.full_like(batch[1], IGNORE)), 2)
    with pytest.raises(TypeError, match="must be an effedu.model.Transformer"):
        mb.run_pipeline(nn.Linear(2, 2), batch, 2)
    with pytest.raises(TypeError, match="each config must be a dict with 'n_micro'"):
        mb.run_pipelines(model, batch, [{"micro": 2}])
    with pytest.raises(ValueError, match="pick must be 'best' or 'median', got 'mean'"):
        mb.run_pipelines(model, batch, [{"n_micro": 2}], pick="mean")
    with pytest.raises(ValueError, match="no measured run for n_micro=3"):
        mb.plot_measured_pipeline(fake_runs(Ms=(1, 2)), 3)
    with pytest.raises(TypeError, match="runs must be the non-empty list"):
        mb.plot_measured_pipeline([], 1)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        mb.run_pipeline(model, batch, 2, timeout=0)
    with pytest.raises(ValueError, match="layers_per_stage must be 2 positive ints summing to n_layers=2"):
        mb.split_transformer(model, 2, layers_per_stage=[2, 0])
    with pytest.raises(ValueError, match="must come after"):
        mb.simulate_pipeline(model, batch, 1, 2, schedule=[{0: ("F", 0), 1: ("F", 0)}, {1: ("B", 0)}, {0: ("B", 0)}])
    assert multiprocessing.active_children() == []


# ---------------------------------------------------------------------------------------------------------------
# module layout: the pipeline in effedu.general.pipeline, its plots in effedu.viz, all re-exported here
# ---------------------------------------------------------------------------------------------------------------


def test_pipeline_names_are_reexported_from_microbatch():
    from effedu import viz

    for name in pl.__all__:
        assert getattr(mb, name) is getattr(pl, name), name
    for name in ("plot_gantt", "plot_gpipe", "plot_measured_pipeline"):
        assert getattr(mb, name) is getattr(viz, name), name
    assert mb._StageRunner is pl.StageRunner  # the old name, printed by notebook 09


def test_stages_reuse_the_model_seams():
    model = tiny_model(n_layers=2)
    x, _ = ragged_batch(B=3)
    first, last = mb.split_transformer(model, 2)
    torch.manual_seed(0)
    torch.testing.assert_close(first.embed(x), model.embed_tokens(x), rtol=0, atol=0)
    h = torch.randn(3, x.shape[1], model.config.d_model, dtype=torch.float64)
    torch.testing.assert_close(last.body(h), model.logits(model.blocks[1](h)), rtol=0, atol=0)
    # a stage owns only its own layers' parameters (the bound seams do not register the whole model)
    assert {id(p) for p in first.parameters()}.isdisjoint({id(p) for p in last.parameters()})
    assert sum(p.numel() for st in (first, last) for p in st.parameters()) == sum(p.numel() for p in model.parameters())
