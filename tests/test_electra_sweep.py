"""Chapter 11's precomputed runs: `python -m effedu.general.electra_sweep --quick` writes a file of the schema the
notebook reads, with numbers that have the properties the chapter relies on (equal FLOPs, accuracies in [0, 1],
one knob changed at a time). The committed full file, when present, is checked for the same schema."""
import json

import pytest

from effedu.general import electra_sweep as S


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("electra") / "e.json"
    S.main(["--quick", "--threads", "1", "--out", str(out)])
    return json.loads(out.read_text())


def _check_schema(r, quick):
    assert r["schema_version"] == S.SCHEMA_VERSION and r["quick"] is quick
    assert r["command"].startswith(S.COMMAND) and "torch" in r["env"]
    c = r["compute"]
    per = c["flops_per_step"]
    assert per["electra"] > per["mlm"] > 0  # the generator and the discriminator's head cost extra
    for objective in ("electra", "mlm"):
        curve = c["curves"][objective]
        assert curve["probe_steps"][0] == 0 and curve["probe_steps"][-1] == curve["steps"]
        assert curve["probe_flops"] == [s * per[objective] for s in curve["probe_steps"]]
        assert all(0 <= a <= 1 for a in curve["probe_accuracy"])
    # equal compute: the MLM's steps are ELECTRA's budget over its own cost, to one step
    assert abs(c["curves"]["mlm"]["steps"] * per["mlm"] - c["flops_budget"]) <= per["mlm"]
    assert c["curves"]["electra"]["steps"] * per["electra"] == c["flops_budget"]
    # both start from the same untrained encoder shape: the same features at step 0 → the same probe accuracy
    assert c["curves"]["electra"]["probe_accuracy"][0] == c["curves"]["mlm"]["probe_accuracy"][0]
    d = c["curves"]["electra"]["diagnostics"]
    assert 0 <= d["replaced_fraction"] <= 1 and 0 <= d["disc_accuracy"] <= 1
    g = c["grid"]
    assert len(g["original"]) == S.N_GRID and all(len(row) == S.MODEL["max_len"] for row in g["original"])
    for o, c, m, rep, p in zip(g["original"], g["corrupt"], g["masked"], g["replaced"], g["disc_prob"]):
        assert all(oo == cc for oo, cc, mm in zip(o, c, m) if not mm)            # only masked words change
        assert all(rr == (mm and oo != cc) for oo, cc, mm, rr in zip(o, c, m, rep))   # the label rule
        assert any(m) and all(0 <= v <= 1 for v in p)
    k = r["knobs"]
    grids = {"gen_fraction": S.GEN_FRACTIONS, "lam": S.LAMBDAS, "mask_rate": S.MASK_RATES}
    for knob, values in grids.items():
        rows = k["knobs"][knob]
        assert [row["value"] for row in rows] == list(values)
        assert all(0 <= row["probe_accuracy"] <= 1 and 0 <= row["replaced_fraction"] <= 1 for row in rows)
    # the default setting appears in every knob's row, computed once: identical numbers
    defaults = [row for knob, rows in k["knobs"].items() for row in rows if row["value"] == S.DEFAULT_KNOBS[knob]]
    assert len(defaults) == 3
    assert all({kk: v for kk, v in row.items() if kk != "value"} ==
               {kk: v for kk, v in defaults[0].items() if kk != "value"} for row in defaults)


def test_quick_sweep_schema(quick):
    _check_schema(quick, True)
    assert quick["compute"]["curves"]["electra"]["steps"] == S.QUICK_STEPS
    assert quick["knobs"]["steps"] == S.QUICK_STEPS


def test_knob_flops_grow_with_the_generator(quick):
    rows = quick["knobs"]["knobs"]["gen_fraction"]
    flops = [row["flops"] for row in rows]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    # λ does not change the compute; the mask rate changes only the MLM head's share
    lam_flops = {row["flops"] for row in quick["knobs"]["knobs"]["lam"]}
    assert len(lam_flops) == 1


def test_committed_file_schema():
    if not S.DEFAULT_OUT.exists():
        pytest.skip("data/results/electra.json not generated yet")
    _check_schema(S.load(), False)


def test_bad_threads():
    with pytest.raises(ValueError, match="threads"):
        S.run(quick=True, out=None, threads=0)
