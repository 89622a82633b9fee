"""`python -m effedu.bench moe` (chapter 10): the rows of its three tables on `--quick` sizes, and its helpers.

Times are never asserted: `time_it` is replaced by one timed call (as in tests/test_bench.py); what is checked is
the tables' shape, that every number is a positive finite time or ratio, that every method computes the same
result, and the expert-parallel split (compute + all-to-all = total on every rank). The 2-process run itself
(spawning, gloo, 20 s here) is tested in tests/test_expert_parallel.py: here ``expert_parallel_run`` is replaced by a
stand-in with its signature and the shape of its result.
"""
import inspect
import math

import pytest
import torch

from effedu import bench
from effedu.bench import Options, format_tables
from effedu.bench import moe as bmoe

pytestmark = pytest.mark.usefixtures("one_timed_call")  # tests/conftest.py: time_it → one call


def _positive_finite(values):
    assert values and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values), values


def fake_expert_parallel_run(layer, x, **kwargs):
    from effedu.general import expert_parallel

    inspect.signature(expert_parallel.expert_parallel_run).bind(layer, x, **kwargs)  # the real call's arguments
    W = kwargs["world_size"]
    compute, a2a, reduce = [0.03, 0.04][:W], [0.02, 0.01][:W], [0.001, 0.002][:W]
    return {"times": {"compute": compute, "all_to_all": a2a, "all_reduce": reduce,
                      "total": [c + a for c, a in zip(compute, a2a)]},
            "sent_bytes": [4096, 4096][:W], "dropped": [0] * W, "capacity": [10] * W, "world_size": W}


@pytest.fixture(scope="module")
def tables():
    from effedu.general import expert_parallel

    mp = pytest.MonkeyPatch()
    mp.setattr(expert_parallel, "expert_parallel_run", fake_expert_parallel_run)
    try:
        with bench.num_threads(1):
            return bmoe.bench_moe(Options(threads=1, quick=True))
    finally:
        mp.undo()


def test_quick_tables_rows_ratios_and_values(tables):
    movement, layer, ep = tables
    assert [r["key"] for r in movement.rows] == list(bmoe.METHODS)
    _positive_finite([r[k] for r in movement.rows for k in ("fwd_s", "fwd_vs_numba", "fb_s", "fb_vs_numba")])
    by = {r["key"]: r for r in movement.rows}
    assert by["numba"]["fwd_vs_numba"] == 1.0 and by["numba"]["fb_vs_numba"] == 1.0
    assert movement.values["all_match_torch_reference"] is True
    assert movement.values["numba_speedup_vs_einsum"] == pytest.approx(by["einsum"]["fwd_vs_numba"])
    size = bmoe.sizes(True)
    C = math.ceil(size["k"] * size["n_tokens"] / size["n_experts"] * size["capacity_factor"])
    assert movement.values["capacity"] == C and f"(C = {C})" in movement.title
    assert movement.values["onehot_bytes"] == size["n_tokens"] * size["n_experts"] * C * 4
    assert "target" in movement.notes[1] and "3× faster than the one-hot einsum" in movement.notes[1]

    assert [r["key"] for r in layer.rows] == list(bmoe.LAYER_MODES)
    _positive_finite([r[k] for r in layer.rows for k in ("fwd_s", "fwd_vs_kernel", "fb_s", "fb_vs_kernel")])
    assert layer.values["all_modes_match"] is True
    params = {r["key"]: r["params"] for r in layer.rows}
    assert len({params[m] for m in bmoe.LAYER_MODES if m != "dense"}) == 1 and params["dense"] < params["loop"]

    assert [r["key"] for r in ep.rows] == list(bmoe.EP_PARTS)
    by = {r["key"]: r for r in ep.rows}
    for rank in (0, 1):
        assert by["compute"][f"rank{rank}_s"] + by["all_to_all"][f"rank{rank}_s"] == pytest.approx(
            by["total"][f"rank{rank}_s"])
    _positive_finite([r[k] for r in ep.rows if r["key"] != "all_reduce" for k in ("rank0_s", "rank1_s", "max_s")])
    assert by["total"]["share"] == 1.0 and by["all_to_all"]["max_s"] == 0.02 and by["compute"]["max_s"] == 0.04
    assert ep.values["all_to_all_share"] == pytest.approx(0.02 / 0.05)  # max over ranks of each part / max total
    assert ep.values["world_size"] == 2 and all(b > 0 for b in ep.values["sent_bytes"])

    text = format_tables(tables, "Some CPU")
    assert text.count("; CPU: Some CPU") == 3 and "one-hot einsum (Mesh-TF/GShard)" in text and "rank 2" in text


def test_movement_fns_agree_and_differentiate():
    ei, slot, gate, C = bmoe.routing(300, 6, 2, 1.0, seed=3)
    assert ei.shape == slot.shape == gate.shape == (300, 2) and C == 100
    assert bool((slot < 0).any())  # capacity factor 1: some choices are dropped
    x = torch.randn(300, 10)
    fns = bmoe.movement_fns(x, ei, slot, gate, 6, C)
    ref_fwd = fns["torch"][0]()
    ref_dx, ref_dg = fns["torch"][1]()
    for m, (fwd, fb) in fns.items():
        torch.testing.assert_close(fwd(), ref_fwd, atol=1e-5, rtol=1e-5, msg=m)
        dx, dg = fb()
        torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-5, msg=m)
        torch.testing.assert_close(dg, ref_dg, atol=1e-5, rtol=1e-5, msg=m)
    with pytest.raises(ValueError, match="unknown method"):
        bmoe.movement_fns(x, ei, slot, gate, 6, C, methods=("numba", "megablocks"))
