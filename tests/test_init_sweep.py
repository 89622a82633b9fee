"""Chapter 12's precomputed sweep: `python -m effedu.general.init_sweep --quick` writes a file of the schema notebook 12
reads, with consistent verdicts; the committed full file has the same schema and the chapter's claims."""
import json
import math

import pytest

from effedu.general import init as I
from effedu.general import init_sweep as S


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "init.json"
    S.main(["--quick", "--threads", "1", "--out", str(out)])
    return json.loads(out.read_text())


def _check_runs(result, settings):
    H = result["unigram_entropy"]
    for run in result["runs"]:
        assert run["scheme"] in I.SCHEMES
        if run["diverged_at"] is None:
            assert len(run["loss"]) == result["config"]["steps"]
            assert all(math.isfinite(x) for x in run["loss"])
            tail = run["loss"][-settings["tail"]:]
            assert run["final_loss"] == pytest.approx(sum(tail) / len(tail))
            assert run["stalled"] == (run["final_loss"] > H - settings["stall_margin"])
        else:  # a diverged run stops at its bad step, which is recorded
            assert len(run["loss"]) == run["diverged_at"] + 1 and not math.isfinite(run["loss"][-1])
            assert run["final_loss"] is None and not run["stalled"]
        assert run["trained"] == (run["diverged_at"] is None and not run["stalled"])


def _check_schema(r, quick):
    assert r["schema"] == S.SCHEMA_VERSION and r["quick"] is quick
    assert r["command"].startswith(S.COMMAND) and "torch" in r["env"]
    grad, warm = r["settings"]["grad"], r["settings"]["warmup"]
    assert set(r["grad_norms"]) == {str(d) for d in grad["depths"]}
    for depth, per_scheme in r["grad_norms"].items():
        assert set(per_scheme) == set(I.SCHEMES)
        for norms in per_scheme.values():
            assert len(norms) == len(grad["seeds"])
            assert all(len(n) == int(depth) and all(x > 0 for x in n) for n in norms)
    cells = [(g["config"]["depth"], g["config"]["lr"]) for g in r["warmup"]]
    assert cells == [(d, lr) for d in warm["depths"] for lr in warm["lrs"]]
    for g in r["warmup"]:
        assert [(x["scheme"], x["warmup"]) for x in g["runs"]] == [(s, w) for s in I.SCHEMES for w in warm["warmups"]]
        assert g["unigram_entropy"] == pytest.approx(r["settings"]["unigram_entropy"])
        _check_runs(g, warm)
    _check_runs(r["seeds"], warm)


def test_quick_sweep_schema_and_consistency(quick):
    _check_schema(quick, True)
    # the unigram entropy of a character corpus: between 1 nat and log(vocab)
    assert 1.0 < quick["settings"]["unigram_entropy"] < math.log(quick["settings"]["vocab_size"])


def test_committed_results_schema_and_claims():
    r = S.load_results()
    _check_schema(r, False)
    demo = S.DEMO
    cell = next(g for g in r["warmup"] if g["config"]["depth"] == demo["depth"] and g["config"]["lr"] == demo["lr"])
    runs = {(x["scheme"], x["warmup"]): x for x in cell["runs"]}
    # the chapter's claim: deep post-LN fails without warm-up where the three remedies train
    assert not runs["post-ln", 0]["trained"]
    assert all(runs[s, 0]["trained"] for s in ("pre-ln", "t-fixup", "admin"))
    # Xiong et al.: at the last layer post-LN's gradient is about √L times pre-LN's (seed mean, within a factor 2)
    L = max(r["settings"]["grad"]["depths"])
    post = [sum(x) / len(x) for x in zip(*r["grad_norms"][str(L)]["post-ln"])]
    pre = [sum(x) / len(x) for x in zip(*r["grad_norms"][str(L)]["pre-ln"])]
    assert math.sqrt(L) / 2 < post[-1] / pre[-1] < 2 * math.sqrt(L) and pre[-1] < pre[0]
