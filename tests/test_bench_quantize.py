"""``python -m effedu.bench quantize`` on its --quick sizes: the tables' schema and the properties of their numbers.

Times are never asserted (``measure.time_it`` is one timed call here); what is checked: the int8 products are
exact, the ratios are the quotients of the times, the int8 MiniLM keeps its embeddings (cosine > 0.99) while
its state shrinks, and the header names the CPU features that decide whether int8 is fast.
"""
import math

import pytest

from effedu import bench
from effedu.bench import quantize as bq


@pytest.fixture(scope="module")
def tables(one_timed_call):  # tests/conftest.py: measure.time_it → one timed call
    with bench.num_threads(1):
        yield bq.bench_quantize(bench.Options(threads=1, quick=True))


def _positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_matmul_table_is_exact_and_its_ratios_are_quotients(tables):
    t1 = tables[0]
    assert [r["n"] for r in t1.rows] == [64, 128]
    for r in t1.rows:
        assert r["exact"] is True
        for key in ("fp32_s", "int_mm_s", "numba_s", "torch_ref_s", "numba_gops"):
            assert _positive(r[key]), (key, r[key])
        assert r["numba_vs_int_mm"] == pytest.approx(r["numba_s"] / r["int_mm_s"])
        assert r["int_mm_vs_fp32"] == pytest.approx(r["int_mm_s"] / r["fp32_s"])
        assert r["numba_gops"] == pytest.approx(2 * r["n"] ** 3 / r["numba_s"] / 1e9)
    v = t1.values
    assert v["n"] == 128 and v["all_exact"] is True and v["target_vs_int_mm"] == 2.0
    assert v["within_target"] == (v["numba_vs_int_mm"] <= 2.0)
    text = bench.format_table(t1, "Some CPU")
    assert "; CPU: Some CPU" in text and "avx512_vnni" in text and "amx_int8" in text and "target:" in text


def test_minilm_table_quantizes_every_encoder_linear_and_keeps_the_embeddings(tables):
    t2 = tables[1]
    fp32, numba, int_mm = t2.rows
    assert fp32["linears"] == 0 and numba["linears"] == 24  # 6 layers × (qkv, proj, fc1, fc2)
    assert fp32["cosine"] == pytest.approx(1.0) and fp32["vs_fp32"] == pytest.approx(1.0)
    assert 0.99 < numba["cosine"] <= 1.0 + 1e-9 and 0.0 <= numba["top5"] <= 1.0
    assert numba["mib"] < 0.7 * fp32["mib"]  # int8 encoder Linears: 4× smaller; the embeddings stay float32
    assert _positive(numba["forward_s"]) and numba["vs_fp32"] == pytest.approx(numba["forward_s"] / fp32["forward_s"])
    if int_mm["forward_s"] is None:  # skipped: no int8 dot-product instruction here, and the note says why
        assert int_mm["estimate_s"] > 0 and any("row skipped" in n for n in t2.notes)
    else:
        assert int_mm["linears"] == 24 and int_mm["cosine"] > 0.99
    assert t2.values["batch"] == 2 and t2.values["linears"] == 24 and t2.values["n_sentences"] == 30
    assert t2.values["int8_numba_vs_fp32"] == numba["vs_fp32"]


@pytest.mark.parametrize("feats, expect, dot", [
    ({"avx2": True, "avx512_vnni": False, "avx_vnni": False, "amx_int8": False}, "AVX2 only", False),
    ({"avx2": True, "avx512_vnni": True, "avx_vnni": False, "amx_int8": False}, "VNNI", True),
    ({"avx2": True, "avx512_vnni": False, "avx_vnni": True, "amx_int8": False}, "VNNI", True),
    ({"avx2": True, "avx512_vnni": True, "avx_vnni": False, "amx_int8": True}, "AMX", True),
    ({}, "unknown", False),
])
def test_the_header_says_which_cpu_feature_decides(monkeypatch, feats, expect, dot):
    monkeypatch.setattr(bq, "cpu_int8_features", lambda: dict(feats))
    line, has_dot = bq.int8_hardware()
    assert expect in line and has_dot is dot and "torch CPU capability" in line
