"""Chapter 20's precomputed sweep: `python -m effedu.general.architectural_sweep --quick` writes a file of the schema
notebook 20 reads, with the cost claims (Perceiver linear in n, pooling saves compute) holding in it."""
import json
import math

import pytest

from effedu.general import architectural_sweep as S


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("architectural") / "architectural.json"
    S.main(["--quick", "--threads", "1", "--out", str(out)])
    return json.loads(out.read_text())


def _check(r, quick):
    assert r["schema"] == S.SCHEMA_VERSION and r["quick"] is quick and r["command"].startswith(S.COMMAND)
    assert "torch" in r["env"] and r["seconds"] > 0
    mem, cost = r["settings"]["memory"], r["settings"]["cost"]
    runs = r["memory"]["runs"]
    assert [(x["n_layers"], x["mem_segments"]) for x in runs] == [(nl, m) for nl in mem["layers"]
                                                                    for m in mem["mem_segments"]]
    L, Sl = r["memory"]["seq_len"], mem["segment_len"]
    assert L == Sl * mem["n_segments"] and r["memory"]["chance"] == pytest.approx(1 / mem["n_values"])
    for x in runs:
        assert x["mem_len"] == x["mem_segments"] * Sl and x["reaches"] == (x["n_layers"] * x["mem_len"] >= L - Sl)
        assert 0 <= x["accuracy"] <= 1 and math.isfinite(x["val_loss"]) and len(x["train_loss"]) == mem["steps"]
    assert [row["n"] for row in r["cost"]] == list(cost["ns"])
    for row in r["cost"]:
        assert row["dense"]["peak_bytes"] > 0
        assert [f["block_layers"] for f in row["funnel"]] == [list(b) for b in cost["funnel"]]
        flops = [f["flops"] for f in row["funnel"]]
        assert flops[0] == row["dense"]["flops"]  # no pooling = the dense encoder
        assert all(a > b for a, b in zip(flops, flops[1:]))  # every pooling saves compute
        assert all(f["lengths"][0] == row["n"] and f["peak_bytes"] > 0 for f in row["funnel"])
        assert [p["n_latents"] for p in row["perceiver"]] == list(cost["latents"])
    # Perceiver: FLOPs linear in n (equal increments per added position)
    for i in range(len(cost["latents"])):
        f = [(row["n"], row["perceiver"][i]["flops"]) for row in r["cost"]]
        slopes = {(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(f, f[1:])}
        assert len(slopes) == 1


def test_quick_sweep_schema_and_claims(quick):
    _check(quick, True)
    # with no memory the needle (≥ 1 segment back) is invisible: the prediction cannot depend on it
    assert not quick["memory"]["runs"][0]["reaches"]


def test_committed_results_schema_and_claims():
    r = S.load_results()
    _check(r, False)
    runs = {(x["n_layers"], x["mem_segments"]): x for x in r["memory"]["runs"]}
    chance = r["memory"]["chance"]
    assert all(x["accuracy"] < 2 * chance for (_, m), x in runs.items() if m == 0)  # no memory: chance
    assert runs[1, 2]["accuracy"] > 0.9  # a memory that reaches the needle: solved
    big = r["cost"][-1]
    assert big["perceiver"][0]["flops"] < big["dense"]["flops"] / 4
