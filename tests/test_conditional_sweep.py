"""Chapter 14's precomputed runs: `python -m effedu.general.conditional_sweep --quick` writes a file of the schema
the notebook reads, and its numbers have the properties the chapter relies on (exit rules at their extremes, counts
that add up, the task's labels). The committed full file is checked for the same schema."""
import json
import math

import pytest
import torch

from effedu.data.tasks import MIXED_COPY, MIXED_DIGIT0, MIXED_SUM, PAD
from effedu.general import conditional_sweep as S


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "c.json"
    S.main(["--quick", "--threads", "1", "--out", str(out)])
    return json.loads(out.read_text())


def _check_schema(r, quick):
    assert r["schema"] == S.SCHEMA_VERSION and r["quick"] is quick
    assert r["command"].startswith(S.COMMAND) and "torch" in r["env"]
    L, N, C = S.EARLY["n_layers"], S.TASK["test_samples"], S.TASK["modulus"]
    ee = r["early_exit"]
    logits, labels, hard, n_summed = S.early_exit_arrays(r)
    assert logits.shape == (L, N, C) and labels.shape == hard.shape == n_summed.shape == (N,)
    assert 0 <= int(labels.min()) and int(labels.max()) < C
    assert bool((n_summed[~hard] == 1).all()) and bool((n_summed[hard] >= 1).all())
    assert int(n_summed.max()) <= S.TASK["max_span"]
    assert len(ee["per_layer_accuracy"]) == L and all(0 <= a <= 1 for a in ee["per_layer_accuracy"])
    assert ee["entropy"]["value"] == list(S.ENTROPY_THRESHOLDS)
    assert ee["patience"]["value"] == list(range(1, L))
    for curve in (ee["entropy"], ee["patience"]):
        assert all(1 <= a <= L for a in curve["average_layers"]) and all(0 <= a <= 1 for a in curve["accuracy"])
    act = r["act"]
    assert len(act["updates_histogram"]) == S.ACT["max_steps"]
    shown = act["heatmap"]
    assert len(shown["tokens"]) == S.N_SHOWN and len(shown["tokens"][0]) == S.ACT["seq_len"]
    assert all(1 <= v <= S.ACT["max_steps"] for row in shown["values"] for v in row)
    depth = r["depth"]
    assert depth["tradeoff"]["threshold"] == list(S.CONFIDENCE_THRESHOLDS)
    assert all(1 <= v <= S.DEPTH["n_layers"] for row in depth["heatmap"]["values"] for v in row)
    assert len(depth["per_layer_accuracy_easy"]) == len(depth["per_layer_accuracy_hard"]) == S.DEPTH["n_layers"]


def test_quick_sweep_schema(quick):
    _check_schema(quick, True)
    assert quick["early_exit"]["config"]["steps"] == S.QUICK_STEPS


def test_exit_rules_at_their_extremes(quick):
    L = S.EARLY["n_layers"]
    ent, pat = quick["early_exit"]["entropy"], quick["early_exit"]["patience"]
    # entropy is ≥ 0, so "exit when H < 0" never fires: every example runs all L layers
    assert ent["value"][0] == 0.0 and ent["average_layers"][0] == L
    # H ≤ ln C for every distribution, so a threshold above ln C exits everything at layer 1
    assert ent["value"][-1] > math.log(S.TASK["modulus"]) and ent["average_layers"][-1] == 1.0
    # patience t: no exit before layer t + 1
    assert all(a >= min(t + 1, L) for t, a in zip(pat["value"], pat["average_layers"]))
    # per-token depth: a confidence threshold above 1 never exits
    d = quick["depth"]["tradeoff"]
    assert d["threshold"][-1] > 1 and d["average_layers"][-1] == S.DEPTH["n_layers"]


def test_act_counts_add_up(quick):
    act = quick["act"]
    shown = act["heatmap"]
    assert sum(act["updates_histogram"]) > 0
    for tokens, scored in zip(shown["tokens"], shown["scored"]):
        assert all(s == (MIXED_DIGIT0 <= t) for t, s in zip(tokens, scored))   # only digits are scored


def test_last_token_task_labels_by_a_plain_loop():
    x, y, hard, n_summed = S.last_token_task(64, 12, seed=3)
    m = S.TASK["modulus"]
    for row, label, h, k in zip(x.tolist(), y.tolist(), hard.tolist(), n_summed.tolist()):
        assert row[-1] >= MIXED_DIGIT0
        i = len(row) - 1
        while row[i] >= MIXED_DIGIT0:       # walk back to the span's marker
            i -= 1
        digits = [t - MIXED_DIGIT0 for t in row[i + 1:]]
        assert row[i] in (MIXED_COPY, MIXED_SUM) and h == (row[i] == MIXED_SUM)
        assert label == (sum(digits) % m if h else digits[-1])
        assert k == (len(digits) if h else 1)
        assert all(t != PAD for t in row[1:])   # at most one PAD, moved to the front


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        S.last_token_task(4, 2, seed=0)
    with pytest.raises(TypeError, match="seed"):
        S.last_token_task(4, 12, seed=0.5)
    with pytest.raises(ValueError, match="parts"):
        S.run_sweep(quick=True, parts=("nope",))


def test_committed_file_has_the_schema():
    if not S.DEFAULT_OUT.is_file():
        pytest.skip("data/results/conditional.json not generated yet")
    r = S.load_results()
    _check_schema(r, False)
    assert r["early_exit"]["config"]["steps"] == S.EARLY["steps"]
    # the trained classifier beats the quick one's floor on the hard endings at full depth
    assert r["early_exit"]["per_layer_accuracy_hard"][-1] > 0.5
    assert S.early_exit_arrays(r)[0].dtype == torch.float32
