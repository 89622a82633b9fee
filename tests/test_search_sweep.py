"""Chapter 13's precomputed searches: `python -m effedu.general.search_sweep --quick` writes a file of the schema the
notebook reads, and its numbers keep the search's invariants (exact step counts, hurdles that save steps, the same
first generation with and without hurdles). The committed full file is checked the same way."""
import json

import pytest

from effedu.general import search as S
from effedu.general import search_sweep as W


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "s.json"
    W.main(["--quick", "--threads", "1", "--out", str(out)])
    return json.loads(out.read_text())


def _check(r, quick):
    assert r["schema"] == W.SCHEMA_VERSION and r["quick"] is quick
    assert r["command"].startswith(W.COMMAND) and "torch" in r["env"]
    cfg = r["search"]
    space = S.SearchSpace(**r["space"])
    assert r["space_size"] == space.size
    assert len(r["runs"]) == 2 * len(cfg["seeds"])
    budgets = cfg["hurdles"]
    for run in r["runs"]:
        ch = run["children"]
        assert len(ch) == cfg["population"] * cfg["generations"]
        assert run["total_steps"] == sum(c["steps"] for c in ch) >= run["steps_trained"]
        for c in ch:
            arch = S.Arch(**c["arch"])
            assert space.validate(arch) == arch and c["label"] == arch.label()
            assert c["budgets"] == (budgets[:len(c["budgets"])] if run["hurdles_on"] else [budgets[-1]])
            assert len(c["fitnesses"]) == len(c["budgets"]) and all(f > 0 for f in c["fitnesses"])
            assert c["params"] > 0 and c["flops"] > 0 and c["latency"] > 0
            assert c["parent"] is None if c["generation"] == 0 else 0 <= c["parent"] < c["index"]
        best = ch[run["best"]]
        assert best["steps"] == budgets[-1]
        assert best["fitness"] == min(c["fitness"] for c in ch if c["steps"] == budgets[-1])
    for seed in cfg["seeds"]:
        off, on = W.children(r, seed=seed, hurdles=False), W.children(r, seed=seed, hurdles=True)
        P = cfg["population"]
        # same seed: the same random first generation, and the hurdles spend fewer steps
        assert [c["arch"] for c in off[:P]] == [c["arch"] for c in on[:P]]
        assert sum(c["steps"] for c in on) < sum(c["steps"] for c in off) == len(off) * budgets[-1]


def test_quick_sweep(quick):
    _check(quick, True)
    assert quick["search"]["hurdles"] == list(W.QUICK["hurdles"])


def test_children_lookup_errors(quick):
    with pytest.raises(ValueError, match="no run with seed=7"):
        W.children(quick, seed=7)


def test_committed_results():
    if not W.DEFAULT_OUT.exists():
        pytest.skip("data/results/search.json not generated yet")
    r = W.load_results()
    _check(r, False)
    assert r["search"]["hurdles"] == list(W.HURDLES) and r["search"]["seeds"] == list(W.SEEDS)
