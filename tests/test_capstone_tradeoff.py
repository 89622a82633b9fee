"""The capstone's trade-off grid: schema of run_grid(quick=True), memory facts that are properties of the
techniques (never wall-clock), the explorer's filters on a synthetic grid with known answers, the plot, the live
measurement."""
import math

import pytest
import torch

from effedu.capstone import tradeoff

ROW_KEYS = {"mode", "device", "seq_len", "attention", "checkpointing", "precision", "int8", "status", "why",
            "step_ms", "peak_mib", "quality", "quality_metric", "params", "model_mib"}
TINY = dict(tradeoff.GRID_QUICK, attentions=("dense",), lengths=(32,))


@pytest.fixture(scope="module")
def quick_grid():
    torch.manual_seed(0)
    return tradeoff.run_grid(quick=True, threads=1)


def _check_row(r):
    assert set(r) == ROW_KEYS
    assert r["mode"] in tradeoff.MODES and r["device"] in tradeoff.DEVICES
    assert r["precision"] in tradeoff.PRECISIONS and r["attention"] in tradeoff.ATTENTIONS
    assert isinstance(r["checkpointing"], bool) and isinstance(r["int8"], bool)
    assert isinstance(r["quality_metric"], str) and r["quality_metric"]
    assert isinstance(r["params"], int) and r["params"] > 0
    assert math.isfinite(r["model_mib"]) and r["model_mib"] > 0
    if r["status"] == "ok":
        assert r["why"] is None
        for k in ("step_ms", "peak_mib"):
            assert math.isfinite(r[k]) and r[k] >= 0, (k, r)
    else:
        assert r["status"] == "cannot" and isinstance(r["why"], str) and r["why"]
        assert r["step_ms"] is None and r["peak_mib"] is None
    assert r["quality"] is None or 0.0 <= r["quality"] <= 1.0


def test_quick_grid_schema(quick_grid):
    g = quick_grid
    assert set(g) == {"settings", "device", "attentions", "lengths", "rows"}
    assert g["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert g["attentions"] == list(tradeoff.ATTENTIONS) and g["lengths"] == [32, 64]
    assert g["settings"]["quick"] is True
    for r in g["rows"]:
        _check_row(r)
    cpu = [r for r in g["rows"] if r["device"] == "cpu"]
    # every attention × length: 2 (checkpointing) × 2 (precision) training rows, 3 inference rows
    assert len(cpu) == len(tradeoff.ATTENTIONS) * 2 * (4 + 3)
    assert {(r["mode"], r["checkpointing"], r["precision"], r["int8"]) for r in cpu} == {
        ("train", c, p, False) for c in (False, True) for p in ("fp32", "bf16")} | {
        ("inference", False, "fp32", False), ("inference", False, "bf16", False), ("inference", False, "fp32", True)}
    assert all(r["status"] == "ok" for r in cpu), [r["why"] for r in cpu if r["status"] != "ok"]
    assert all(r["quality"] is not None for r in cpu)  # a measured accuracy on every row
    assert all("checkpointing does not change the maths" in r["quality_metric"] for r in cpu if r["checkpointing"])


def _row(g, **kw):
    (r,) = [r for r in g["rows"] if r["device"] == "cpu" and all(r[k] == v for k, v in kw.items())]
    return r


def test_measured_memory_facts(quick_grid):
    g, T = quick_grid, max(quick_grid["lengths"])
    plain = _row(g, mode="train", seq_len=T, attention="dense", checkpointing=False, precision="fp32")
    ckpt = _row(g, mode="train", seq_len=T, attention="dense", checkpointing=True, precision="fp32")
    assert ckpt["peak_mib"] < plain["peak_mib"]  # only block inputs are kept for backward
    assert ckpt["model_mib"] == plain["model_mib"] and ckpt["params"] == plain["params"]
    fp32 = _row(g, mode="inference", seq_len=T, attention="dense", precision="fp32", int8=False)
    bf16 = _row(g, mode="inference", seq_len=T, attention="dense", precision="bf16", int8=False)
    int8 = _row(g, mode="inference", seq_len=T, attention="dense", precision="fp32", int8=True)
    assert bf16["model_mib"] == pytest.approx(fp32["model_mib"] / 2)  # every weight 2 bytes instead of 4
    assert int8["model_mib"] < fp32["model_mib"]  # block Linears: 1 byte per weight (+ a scale per channel)
    # mixed precision keeps the float32 masters and adds a bf16 working copy: 1.5× the float32 bytes
    mixed = _row(g, mode="train", seq_len=T, attention="dense", checkpointing=False, precision="bf16")
    assert mixed["model_mib"] == pytest.approx(1.5 * plain["model_mib"])


def _synthetic():
    def r(attention, step_ms, peak_mib, quality, *, mode="train", seq_len=256, device="cpu", status="ok", **kw):
        row = {"mode": mode, "device": device, "seq_len": seq_len, "attention": attention, "checkpointing": False,
               "precision": "fp32", "int8": False, "status": status, "why": None if status == "ok" else "no",
               "step_ms": step_ms if status == "ok" else None, "peak_mib": peak_mib if status == "ok" else None,
               "quality": quality, "quality_metric": "acc", "params": 10, "model_mib": 1.0}
        row.update(kw)
        return row

    rows = [r("dense", 100.0, 50.0, 0.9), r("dense", 150.0, 20.0, 0.9, checkpointing=True),
            r("local", 40.0, 10.0, 0.6), r("linear", 30.0, 8.0, 0.3), r("linear", 35.0, 4.0, 0.3, precision="bf16"),
            r("performer", 1.0, 1.0, 1.0, status="cannot"), r("dense", 10.0, 10.0, 0.9, seq_len=1024),
            r("dense", 10.0, 10.0, 0.9, mode="inference"), r("dense", 1.0, 1.0, 0.95, device="cuda")]
    return {"settings": {}, "device": "cpu", "attentions": [], "lengths": [256, 1024], "rows": rows}


def test_feasible_and_best_known_answers():
    g = _synthetic()
    labels = lambda rows: sorted(tradeoff.combination_label(r) for r in rows)  # noqa: E731
    assert labels(tradeoff.feasible(g, seq_len=256, mode="train")) == sorted(
        ["dense", "dense + checkpointing", "local", "linear", "linear + bf16"])  # "cannot" rows never fit
    assert labels(tradeoff.feasible(g, seq_len=256, mode="train", memory_budget_mib=20)) == sorted(
        ["dense + checkpointing", "local", "linear", "linear + bf16"])
    assert labels(tradeoff.feasible(g, seq_len=256, mode="train", memory_budget_mib=20, time_budget_ms=100)) == \
        sorted(["local", "linear", "linear + bf16"])
    # highest quality wins; a quality tie goes to the fastest
    assert tradeoff.combination_label(tradeoff.best(g, seq_len=256, mode="train")) == "dense"
    assert tradeoff.combination_label(tradeoff.best(g, seq_len=256, mode="train", memory_budget_mib=30)) == \
        "dense + checkpointing"
    assert tradeoff.combination_label(tradeoff.best(g, seq_len=256, mode="train", memory_budget_mib=9)) == "linear"
    assert tradeoff.combination_label(tradeoff.best(g, seq_len=256, mode="train", memory_budget_mib=5)) == \
        "linear + bf16"
    assert tradeoff.best(g, seq_len=256, mode="train", memory_budget_mib=1) is None  # empty → None
    assert tradeoff.best(g, seq_len=512, mode="train") is None
    assert tradeoff.best(g, seq_len=256, mode="train", device="cuda")["quality"] == 0.95
    assert tradeoff.feasible(g, seq_len=256, mode="train", memory_budget_mib=0, time_budget_ms=0) == []


def test_combination_label():
    assert tradeoff.combination_label({"attention": "local", "checkpointing": True, "precision": "bf16",
                                       "int8": False}) == "local + checkpointing + bf16"
    assert tradeoff.combination_label({"attention": "dense", "checkpointing": False, "precision": "fp32",
                                       "int8": True}) == "dense + int8"


@pytest.mark.parametrize("kw, name", [
    (dict(mode="eval"), "mode"), (dict(device="tpu"), "device"), (dict(memory_budget_mib=-1), "memory_budget_mib"),
    (dict(time_budget_ms=-0.5), "time_budget_ms"), (dict(seq_len=0), "seq_len")])
def test_explorer_bad_input(kw, name):
    args = dict(seq_len=256, mode="train") | kw
    with pytest.raises(ValueError, match=name):
        tradeoff.feasible(_synthetic(), **args)
    with pytest.raises(ValueError, match=name):
        tradeoff.best(_synthetic(), **args)


@pytest.mark.parametrize("kw, name", [
    (dict(attention="nope"), "attention"), (dict(precision="fp16"), "precision"), (dict(mode="eval"), "mode"),
    (dict(device="tpu"), "device"), (dict(seq_len=-4), "seq_len")])
def test_measure_combination_bad_input(kw, name):
    args = dict(attention="dense") | kw
    with pytest.raises(ValueError, match=name):
        tradeoff.measure_combination(**args, settings=TINY)


def test_plot_tradeoff():
    import matplotlib.pyplot as plt

    g = _synthetic()
    fig = tradeoff.plot_tradeoff(g, seq_len=256, mode="train", memory_budget_mib=30, time_budget_ms=200)
    ax = fig.axes[0]
    assert ax.get_title() and "ms" in ax.get_xlabel() and "MiB" in ax.get_ylabel()
    assert ax.get_legend() is not None
    assert any("best: dense + checkpointing" in t.get_text() for t in ax.texts)
    plt.close(fig)
    for kw in (dict(memory_budget_mib=0.5), dict(device="cuda", seq_len=1024), dict(seq_len=4096)):
        fig = tradeoff.plot_tradeoff(g, **(dict(seq_len=256, mode="train") | kw))  # draws a message, no raise
        text = " ".join(t.get_text() for t in fig.axes[0].texts)
        assert "no combination fits" in text or "no measured rows" in text
        plt.close(fig)
    fig = tradeoff.plot_tradeoff({"rows": []}, seq_len=256)
    assert "no measured rows" in " ".join(t.get_text() for t in fig.axes[0].texts)
    plt.close(fig)
    with pytest.raises(ValueError, match="time_budget_ms"):
        tradeoff.plot_tradeoff(g, seq_len=256, time_budget_ms=-1)


def test_measure_combination_row():
    r = tradeoff.measure_combination(attention="local", checkpointing=True, precision="bf16", seq_len=32,
                                     settings=TINY)
    _check_row(r)
    assert r["status"] == "ok" and r["mode"] == "train" and r["quality"] is None
    assert tradeoff.combination_label(r) == "local + checkpointing + bf16"
    r = tradeoff.measure_combination(attention="dense", int8=True, seq_len=32, mode="inference", settings=TINY)
    _check_row(r)
    assert r["status"] == "ok" and r["int8"]
    # combinations that make no sense come back as "cannot", with why
    for kw in (dict(int8=True, mode="train"), dict(checkpointing=True, mode="inference")):
        r = tradeoff.measure_combination(attention="dense", seq_len=32, settings=TINY, **kw)
        _check_row(r)
        assert r["status"] == "cannot" and r["why"]


def test_run_grid_bad_input():
    with pytest.raises(ValueError, match="threads"):
        tradeoff.run_grid(quick=True, threads=0)
    with pytest.raises(ValueError, match="attention"):
        tradeoff.run_grid(settings=dict(TINY, attentions=("nope",)))


def test_bf16_training_rows_say_when_they_reuse_the_fp32_accuracy():
    s = dict(TINY, quality=dict(TINY["quality"], train_bf16=False))
    g = tradeoff.run_grid(settings=s, threads=1)
    rows = [r for r in g["rows"] if r["device"] == "cpu" and r["mode"] == "train"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    fp32 = {r["quality"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        if r["precision"] == "bf16":
            assert {r["quality"]} == fp32 and "the fp32 accuracy" in r["quality_metric"]
