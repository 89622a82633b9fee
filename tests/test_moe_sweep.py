"""Chapter 10's precomputed sweep: `python -m effedu.general.moe_sweep --quick` writes a file of the schema notebook 10
reads, and its numbers have the properties the chapter claims (exact capacities and counts, dropped fractions that
fall with the capacity factor and vanish once a buffer holds every token, MoE FLOPs ≈ dense FLOPs with more
parameters). The committed full file is checked for the same schema."""
import json
import math

import pytest
import torch

from effedu.general import moe as M
from effedu.general import moe_sweep as S


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "moe.json"
    S.main(["--quick", "--threads", "1", "--out", str(out)])
    return json.loads(out.read_text())


def _check_routing_table(table, n_tokens, n_experts):
    assert set(table) == {str(k) for k in S.ROUTE_KS if k <= n_experts}
    for k_str, rows in table.items():
        k = int(k_str)
        assert [r["capacity_factor"] for r in rows] == list(S.CAPACITY_FACTORS)
        previous = 1.0
        for r in rows:
            assert r["capacity"] == M.capacity_for(n_tokens, n_experts, k, r["capacity_factor"])
            assert sum(r["sent"]) == n_tokens * k and len(r["sent"]) == n_experts
            # kept_e = min(sent_e, C): first come, first served fills each buffer up to its capacity
            assert r["kept"] == [min(s, r["capacity"]) for s in r["sent"]]
            assert math.isclose(r["dropped"], 1 - sum(r["kept"]) / (n_tokens * k), abs_tol=1e-6)
            assert 0 <= r["dropped_tokens"] <= r["dropped"] + 1e-9
            assert r["dropped"] <= previous + 1e-12          # more capacity never drops more
            previous = r["dropped"]
            if r["capacity"] >= n_tokens:                     # a buffer holds every token: nothing dropped
                assert r["dropped"] == 0


def _check_schema(r, quick):
    assert r["schema"] == S.SCHEMA_VERSION and r["quick"] is quick
    assert r["command"].startswith(S.COMMAND)
    assert "torch" in r["env"] and "cpu threads (torch)" in r["env"]
    s = r["settings"]
    n_tokens = s["tokens_per_batch"]
    assert n_tokens == s["batch"] * s["seq_len"] and s["capacity_factors"] == list(S.CAPACITY_FACTORS)
    compare = (S.COMPARE_QUICK if quick else S.COMPARE)
    balance = (S.BALANCE_QUICK if quick else S.BALANCE)
    runs = r["compare"]["runs"]
    assert set(runs) == {"dense"} | {f"moe{E}" for E in compare["experts"]}
    for name, run in runs.items():
        assert run["seeds"] == list(compare["seeds"])
        assert len(run["val_loss"]) == len(compare["seeds"]) == len(run["final_val_loss"])
        assert all(len(curve) == len(run["val_step"]) for curve in run["val_loss"])
        assert all(len(curve) == s["steps"] for curve in run["train_loss"])
        assert run["val_step"][-1] == s["steps"]
        assert all(0 < v < 2 * math.log(s["vocab_size"]) for curve in run["val_loss"] for v in curve)
    assert [(b["n_experts"], b["aux_weight"]) for b in r["balance"]] == \
        [(E, w) for E in balance["experts"] for w in balance["aux_weights"]]
    n_moe = len([i for i in range(s["n_layers"]) if i % s["every"] == s["every"] - 1])
    for b in r["balance"]:
        E = b["n_experts"]
        assert b["layers"] == [i for i in range(s["n_layers"]) if i % s["every"] == s["every"] - 1]
        assert len(b["load"]) == n_moe and all(len(steps) == s["steps"] for steps in b["load"])
        for steps in b["load"]:
            assert all(len(c) == E and sum(c) == n_tokens for c in steps)   # every token has one first choice
        assert len(b["dropped_fraction"]) == s["steps"] and all(0 <= f < 1 for f in b["dropped_fraction"])
        assert all(0 < x <= E + 1e-6 for x in b["balance_loss"])   # Switch's loss: E·Σ f_i·P_i ≤ E
        assert len(b["routing"]) == n_moe
        for table in b["routing"]:
            _check_routing_table(table, n_tokens, E)
    assert set(r["uniform"]) == {str(E) for E in balance["experts"]}
    for E, table in r["uniform"].items():
        _check_routing_table(table, n_tokens, int(E))


def test_quick_sweep_schema(quick):
    _check_schema(quick, True)


def test_quick_sweep_properties(quick):
    s = quick["settings"]
    runs = quick["compare"]["runs"]
    dense, moe = runs["dense"], runs["moe4"]
    # equal FLOPs per token up to the router (2·d·E per token in each MoE layer), more parameters
    n_moe = s["n_layers"] // s["every"]
    router = n_moe * 2 * s["d_model"] * 4
    assert moe["flops_per_token"] - dense["flops_per_token"] == pytest.approx(router)
    extra = n_moe * (M.moe_param_count(s["d_model"], s["d_ff"], 4) - (2 * s["d_model"] * s["d_ff"] + s["d_ff"] + s["d_model"]))
    assert moe["params"] - dense["params"] == extra
    # the comparison's MoE run (seed 0) is the balance run of the same (E, aux weight): trained once, reused
    b = S.balance_run(quick, 4, quick["compare"]["aux_weight"])
    assert b["final_val_loss"] == moe["final_val_loss"][0]
    # without the balancing loss the aux loss recorded is 0; with it, positive and at most aux_weight·E per layer
    assert all(a == 0 for a in S.balance_run(quick, 4, 0.0)["aux"])
    assert all(0 < a <= 1e-2 * 4 * n_moe * (1 + 1e-6) for a in b["aux"])


def test_uniform_routing_is_exact_and_reproducible():
    # the "uniform" rows are a pure function of the seed: re-computed here, equal to the integer
    logits = S.uniform_logits(256, 4)
    assert logits.shape == (256, 4) and torch.equal(logits, S.uniform_logits(256, 4))
    table = S.routing_table(logits, ks=(1,), capacity_factors=(1.0, 4.0))
    first = torch.bincount(logits.argmax(1), minlength=4).tolist()
    assert table["1"][0]["sent"] == first and table["1"][0]["capacity"] == 64
    assert table["1"][0]["dropped"] == pytest.approx(sum(max(0, c - 64) for c in first) / 256)
    assert table["1"][1]["dropped"] == 0


def test_flops_per_token_matches_the_parts():
    s = S.LM_QUICK
    total_dense, ffn_dense = S.flops_per_token(s)
    total_moe, ffn_moe = S.flops_per_token(s, 4)
    assert ffn_moe - ffn_dense == pytest.approx((s["n_layers"] // s["every"]) * 2 * s["d_model"] * 4)
    assert total_moe - total_dense == pytest.approx(ffn_moe - ffn_dense)


def test_bad_arguments():
    with pytest.raises(ValueError, match="threads must be"):
        S.run_sweep(threads=0)
    with pytest.raises(ValueError, match="no run with n_experts=3"):
        S.balance_run({"balance": [{"n_experts": 4, "aux_weight": 0.0}]}, 3, 0.0)


def test_committed_results_have_the_schema():
    if not S.DEFAULT_OUT.is_file():
        pytest.skip(f"{S.DEFAULT_OUT} not generated yet")
    r = S.load_results()
    _check_schema(r, False)
    assert r["settings"]["steps"] == S.LM["steps"]


def test_load_results_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="moe_sweep"):
        S.load_results(tmp_path / "nope.json")
