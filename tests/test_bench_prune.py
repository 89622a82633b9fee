"""`python -m effedu.bench prune` (chapter 05): the rows of its two tables on `--quick` sizes, and its helpers.

Times are never asserted: `time_it` is replaced by one timed call (as in tests/test_bench.py); what is checked is
the tables' shape, that every number is a positive finite time or ratio, the crossover arithmetic on made-up
times, and the exact sparsity of the operands.
"""
import math

import pytest
import torch

from effedu import bench
from effedu.bench import Options, format_tables
from effedu.bench import prune as bp


pytestmark = pytest.mark.usefixtures("one_timed_call")  # tests/conftest.py: time_it → one call


def _positive_finite(values):
    assert values and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values), values


@pytest.fixture(scope="module")
def tables():
    with bench.num_threads(1):
        return bp.bench_prune(Options(threads=1, quick=True))


def test_quick_tables_rows_ratios_and_crossovers(tables):
    at90, curve = tables
    assert [r["key"] for r in at90.rows] == ["dense", "torch.sparse", "scipy", "numba", "torch"]
    _positive_finite([r[k] for r in at90.rows for k in ("s", "vs_scipy", "vs_dense")])
    by = {r["key"]: r for r in at90.rows}
    assert by["scipy"]["vs_scipy"] == 1.0 and by["dense"]["vs_dense"] == 1.0
    assert at90.values["numba_matches_dense"] is True
    assert at90.values["numba_speedup_vs_scipy"] == pytest.approx(1 / by["numba"]["vs_scipy"])
    assert "6554 non-zeros" in at90.title and "target: effedu numba CSR faster than scipy" in at90.notes[1]
    assert curve.column("sparsity") == [0.0, 0.5, 0.9, 0.99]
    for key in ("dense", "torch_sparse", "numba", "structured"):
        _positive_finite(curve.column(f"{key}_s") + curve.column(f"{key}_vs_dense"))
    assert all(r["dense_vs_dense"] == 1.0 for r in curve.rows)
    for key in ("crossover_numba", "crossover_torch_sparse", "crossover_structured"):
        x = curve.values[key]
        assert x is None or 0.0 <= x <= 0.99
    assert "crossover (faster than dense sgemm above)" in curve.notes[1]
    text = format_tables(tables, "Some CPU")
    assert text.count("; CPU: Some CPU") == 2 and "effedu CSR, numba" in text


def test_crossover_interpolates_in_log_ratio():
    s = [0.0, 0.5, 0.9, 0.99]
    # faster only from 0.9 on: ratio 2 at 0.5, 1/2 at 0.9 → log-ratios ±log 2 → the midpoint 0.7
    assert bp.crossover(s, [4.0, 2.0, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.7)
    assert bp.crossover(s, [4.0, 2.0, 0.5, 0.1], 1.0) == pytest.approx(0.7)  # one baseline number
    assert bp.crossover(s, [0.5, 0.4, 0.3, 0.2], 1.0) == 0.0  # faster from the start
    assert bp.crossover(s, [4.0, 3.0, 2.0, 1.5], 1.0) is None  # never faster
    with pytest.raises(ValueError, match="one entry each"):
        bp.crossover(s, [1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="increasing"):
        bp.crossover([0.5, 0.1], [1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        bp.crossover([0.1], [0.0], 1.0)


def test_time_vs_sparsity_shapes_and_errors():
    times = bp.time_vs_sparsity([0.0, 0.75], m=16, k=12, n=5, methods=bp.METHODS, repeat=1)
    assert list(times) == list(bp.METHODS) and all(len(v) == 2 for v in times.values())
    _positive_finite([t for v in times.values() for t in v])
    with pytest.raises(ValueError, match=r"every sparsity must lie in \[0, 1\).*\[1.0\]"):
        bp.time_vs_sparsity([0.5, 1.0])
    with pytest.raises(ValueError, match="unknown method"):
        bp.time_vs_sparsity([0.5], methods=("dense", "cusparse"))
    with pytest.raises(TypeError, match="methods must be a sequence"):
        bp.time_vs_sparsity([0.5], methods="dense")
    with pytest.raises(ValueError, match="m must be an int ≥ 1"):
        bp.time_vs_sparsity([0.5], m=0)


def test_pruned_operands_have_exactly_the_sparsity():
    for s in (0.0, 0.3, 0.9, 0.99):
        w, b = bp.pruned_operands(s, m=40, k=30, n=7)
        assert w.shape == (40, 30) and b.shape == (30, 7) and w.dtype == torch.float32
        assert int((w == 0).sum()) == round(s * 1200)
