"""The capstone's mini-LRA (effedu.capstone.lra) and its command line (effedu.capstone.run)."""
import csv
import json
import math

import pytest
import torch

from effedu.attention import BUILTIN, available
from effedu.capstone import load_results
from effedu.capstone import lra as L
from effedu.capstone.run import main, write_results
from effedu.data.long_range import long_range_info

RUN_KEYS = {"variant", "task", "seq_len", "seed", "status", "why", "accuracy", "final_loss", "params",
            "train_step_ms", "infer_ms", "train_peak_mib", "infer_peak_mib", "train_seconds"}
NUMBERS = ("accuracy", "final_loss", "train_step_ms", "infer_ms", "train_peak_mib", "infer_peak_mib",
           "train_seconds")


@pytest.fixture(scope="module")
def quick():
    torch.set_num_threads(1)
    return L.run_lra(quick=True)


def test_quick_schema(quick):
    s = quick["settings"]
    for key, typ in (("lengths", list), ("tasks", dict), ("steps", int), ("tokens_per_step", int),
                     ("batch_size", dict), ("lr", float), ("seeds", list), ("d_model", int), ("n_heads", int),
                     ("n_layers", int), ("d_ff", int), ("n_val", int), ("n_val_by_length", dict), ("threads", int)):
        assert isinstance(s[key], typ), key
    assert set(s["tasks"]) == set(s["batch_size"]) == {str(n) for n in s["lengths"]}
    json.dumps(quick)  # JSON-serialisable (block_sparse's layout tensor is described, not stored)
    for name, t in quick["tasks"].items():
        info = long_range_info(name, **t["kwargs"])
        assert t["chance"] == info["chance"] and t["num_classes"] == info["num_classes"]
        assert t["vocab_size"] == info["vocab_size"] and isinstance(t["description"], str)
    for name, v in quick["variants"].items():
        assert v["family"] in L.FAMILIES
        assert isinstance(v["chapter"], int) and isinstance(v["note"], str) and v["note"]
        assert set(v["kwargs"]) == {str(n) for n in s["lengths"]}
        assert isinstance(v["length_dependent"], bool)


def test_quick_every_attention_every_task_and_length(quick):
    s = quick["settings"]
    assert set(available()) <= set(quick["variants"])
    have = {(r["variant"], r["task"], r["seq_len"]) for r in quick["runs"]}
    for n in s["lengths"]:
        for task in s["tasks"][str(n)]:
            for name in available():
                assert (name, task, n) in have


def test_quick_runs_consistent(quick):
    for r in quick["runs"]:
        assert set(r) == RUN_KEYS
        assert r["status"] in ("ok", "cannot")
        if r["status"] == "ok":
            assert r["why"] is None
            for k in NUMBERS:
                assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] >= 0, (r["variant"], k)
            assert 0 <= r["accuracy"] <= 1
            assert isinstance(r["params"], int) and r["params"] > 0
        else:
            assert isinstance(r["why"], str) and r["why"]
            assert all(r[k] is None for k in NUMBERS + ("params",))
    assert any(r["status"] == "ok" for r in quick["runs"])


def test_variant_kwargs():
    assert set(L.VARIANT_SETTINGS) == set(BUILTIN)
    dep = {n for n, v in L.VARIANT_SETTINGS.items() if v[2]}
    assert dep == {"linformer", "synthesizer_dense", "synthesizer_random", "sparsebert"}
    for n in (256, 1024, 64):
        for name in BUILTIN:
            kw = L.variant_kwargs(name, n)
            for key in ("block_size", "chunk_size"):
                if key in kw:
                    assert n % kw[key] == 0, (name, n, key)
        assert L.variant_kwargs("lsh", n)["n_buckets"] * L.variant_kwargs("lsh", n)["chunk_size"] == n
        layout = L.variant_kwargs("block_sparse", n)["layout"]
        assert layout.shape[-1] == n // L.variant_kwargs("block_sparse", n)["block_size"]
    for name in ("local", "fixed", "longformer", "star", "logsparse", "strided"):
        assert L.variant_kwargs(name, 256)["block_size"] == L.BLOCK  # the block-sparse kernel, not masked-dense
    with pytest.raises(ValueError, match="name"):
        L.variant_kwargs("nope", 256)
    with pytest.raises(ValueError, match="seq_len"):
        L.variant_kwargs("dense", 0)
    with pytest.raises(ValueError, match="variants"):
        L.run_lra(quick=True, variants=["nope"])
    with pytest.raises(ValueError, match="threads"):
        L.run_lra(quick=True, threads=0)


def _synthetic():
    def run(v, t, n, seed, acc, ms, status="ok"):
        ok = status == "ok"
        return {"variant": v, "task": t, "seq_len": n, "seed": seed, "status": status,
                "why": None if ok else "refuses", "accuracy": acc if ok else None, "final_loss": 1.0 if ok else None,
                "params": 10 if ok else None, "train_step_ms": ms if ok else None, "infer_ms": ms / 2 if ok else None,
                "train_peak_mib": 2.0 if ok else None, "infer_peak_mib": 1.0 if ok else None,
                "train_seconds": 1.0 if ok else None}

    return {"settings": {}, "tasks": {"needle": {"chance": 0.1}, "text": {"chance": 0.25}},
            "variants": {"a": {"family": "baseline"}, "b": {"family": "kernel"}},
            "runs": [run("a", "needle", 256, 0, 0.4, 10.0), run("a", "needle", 256, 1, 0.6, 20.0),
                     run("a", "text", 256, 0, 0.8, 30.0),
                     run("b", "needle", 256, 0, None, None, "cannot"), run("b", "text", 256, 0, 0.3, 6.0),
                     run("a", "needle", 1024, 0, 0.2, 100.0),
                     run("b", "needle", 1024, 0, None, None, "cannot")]}


def test_runs_table_and_summary():
    lra = _synthetic()
    rows = {(r["variant"], r["task"]): r for r in L.runs_table(lra, 256)}
    assert len(rows) == 4 and len(L.runs_table(lra)) == 6
    a = rows[("a", "needle")]
    assert a["accuracy"] == pytest.approx(0.5) and a["train_step_ms"] == pytest.approx(15.0)
    assert a["n_seeds"] == 2 and a["chance"] == 0.1 and a["family"] == "baseline"
    b = rows[("b", "needle")]
    assert b["status"] == "cannot" and b["accuracy"] is None and b["why"] == "refuses"
    s = L.summary(lra, 256)
    assert s["a"]["accuracy"] == pytest.approx((0.5 + 0.8) / 2)
    assert s["b"]["accuracy"] == pytest.approx(0.3) and s["b"]["family"] == "kernel"
    s = L.summary(lra, 1024)
    assert s["b"]["accuracy"] is None and s["b"]["train_step_ms"] is None
    assert s["a"]["train_step_ms"] == pytest.approx(100.0)
    text = L.format_table(lra)
    assert "n=256" in text and "n=1024" in text and "—" in text
    with pytest.raises(TypeError, match="lra"):
        L.summary({"no": 1}, 256)


def test_write_results_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="results"):
        write_results({"kind": "other"}, tmp_path / "x.json")


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "c.json"
    results = main(["run", "--quick", "--out", str(out), "--threads", "1"])
    loaded = load_results(path=out)
    assert loaded["quick"] is True and loaded["schema"] == 1
    assert set(loaded["sections_seconds"]) == {"lra", "grid", "decode"}
    for section in ("lra", "grid", "decode"):
        assert isinstance(loaded[section], dict), section
    assert len(loaded["lra"]["runs"]) == len(results["lra"]["runs"])
    for suffix, n_rows in (("lra", len(loaded["lra"]["runs"])), ("grid", len(loaded["grid"]["rows"]))):
        with open(tmp_path / f"c_{suffix}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        assert rows[0] and len(rows) == n_rows + 1, suffix
    assert "n=" in main(["show", "--path", str(out)])


def test_cli_steps_sets_the_budget_of_the_lra_section(tmp_path):
    out = tmp_path / "s.json"
    results = main(["run", "--quick", "--sections", "lra", "--steps", "4", "--out", str(out), "--threads", "1"])
    assert results["lra"]["settings"]["steps"] == 4 and results["grid"] is None and results["decode"] is None
    assert load_results(path=out)["lra"]["settings"]["steps"] == 4
    with pytest.raises(ValueError, match="steps"):
        L.run_lra(quick=True, steps=0)
