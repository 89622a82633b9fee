"""Chapter 16's precomputed sweep: `python -m effedu.general.learned_sparse_sweep --quick` writes a file of the schema
notebook 16 reads (every method and variant present, timings and bytes positive, accuracies in [0, 1]); the committed
full file has the same schema."""
import json
import math

import pytest

from effedu.general import learned_sparse_sweep as S


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned_sparse") / "learned_sparse.json"
    S.main(["--quick", "--threads", "1", "--out", str(out)])
    return json.loads(out.read_text())


def _check_schema(r, quick):
    assert r["schema"] == S.SCHEMA_VERSION and r["quick"] is quick
    assert r["command"].startswith(S.COMMAND) and "torch" in r["env"]
    sc, acc = r["settings"]["scaling"], r["settings"]["accuracy"]
    scaling = r["scaling"]
    assert scaling["n"] == list(sc["ns"])
    assert set(scaling["time_s"]) == set(S.METHODS) == set(scaling["bytes"])
    for m in S.METHODS:
        assert len(scaling["time_s"][m]) == len(sc["ns"]) and all(t > 0 for t in scaling["time_s"][m])
        assert len(scaling["bytes"][m]) == len(sc["ns"]) and all(b > 0 for b in scaling["bytes"][m])
    assert scaling["crossover_n"] == S.crossover(scaling["n"], scaling["time_s"]["lsh"], scaling["time_s"]["sdpa"])
    a = r["accuracy"]
    assert a["chance"] == pytest.approx(1 / acc["n_values"])
    runs = {(x["variant"], x["seed"]): x for x in a["runs"]}
    assert set(runs) == {(v, s) for v in S.VARIANTS for s in acc["seeds"]}
    for x in a["runs"]:
        assert 0.0 <= x["final_acc"] <= 1.0 and math.isfinite(x["final_loss"])
        assert len(x["loss"]) == acc["steps"] and all(math.isfinite(v) for v in x["loss"])
        assert all(0.0 <= v <= 1.0 for v in x["val_acc"]) and len(x["val_acc"]) == len(x["val_step"]) > 0
        assert x["seconds"] > 0
        if x["variant"] == "sparsebert":
            assert len(x["density"]) == len(x["density_step"]) > 0
            assert all(0.0 <= d <= 1.0 for d in x["density"] + [x["final_density"]])
    assert set(S.final_accuracy(r)) == set(S.VARIANTS)


def test_quick_sweep_schema_and_properties(quick):
    _check_schema(quick, True)
    assert quick["settings"]["variants"]["lsh"]["chunk_size"] * 8 == quick["settings"]["accuracy"]["seq_len"]


def test_crossover():
    assert S.crossover([1, 2, 3, 4], [5, 4, 1, 1], [3, 3, 3, 3]) == 3
    assert S.crossover([1, 2, 3], [1, 5, 1], [2, 2, 2]) == 3  # beaten at 1 but not from there on
    assert S.crossover([1, 2], [5, 5], [1, 1]) is None


def test_bad_threads():
    with pytest.raises(ValueError, match="threads must be a positive int"):
        S.run_sweep(True, threads=0)


def test_committed_results_schema():
    r = S.load_results()
    _check_schema(r, False)
    assert r["scaling"]["n"][-1] == 8192 and r["settings"]["accuracy"]["steps"] == S.ACCURACY["steps"]
    # memory: LSH's extra bytes grow linearly in n (O(n·chunk·rounds)), not like n²
    b, n = r["scaling"]["bytes"]["lsh"], r["scaling"]["n"]
    assert b[-1] / b[0] <= 1.5 * n[-1] / n[0]
