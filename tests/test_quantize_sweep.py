"""Chapter 08's precomputed sweeps: `python -m effedu.general.quantize_sweep --quick` writes a file of the schema the
notebook reads, and its numbers have the properties the chapter claims (sizes shrink with bits, fidelity and
accuracy in range, int8 close to float). The committed full file is checked for the same schema."""
import json
import math

import pytest

from effedu.general import quantize_sweep as S


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "q.json"
    S.main(["--quick", "--no-torchao", "--threads", "1", "--out", str(out)])
    return json.loads(out.read_text())


def _check_schema(r, quick):
    assert r["schema"] == S.SCHEMA_VERSION and r["quick"] is quick
    assert r["command"].startswith(S.COMMAND)
    assert "torch" in r["env"] and "cpu threads (torch)" in r["env"]
    tiny, mini = r["tiny"], r["minilm"]
    assert set(tiny) >= {"config", "float", "ptq", "qat", "ipq", "quant_noise"}
    assert tiny["config"]["task"] == S.TINY["task"]
    for row in tiny["ptq"]:
        assert set(row) == {"bits", "scheme", "bytes", "accuracy"}
        assert row["scheme"] in {name for name, *_ in S.SCHEMES} and 2 <= row["bits"] <= 8
        assert 0 <= row["accuracy"] <= 1
    assert [q["bits"] for q in tiny["qat"]] == list(S.QAT_BITS)
    for q in tiny["qat"]:
        assert all(0 <= q[k] <= 1 for k in ("ptq", "ptq_after_float_finetune", "qat"))
    for q in tiny["ipq"] + tiny["quant_noise"]:
        assert all(0 <= q[k] <= 1 for k in q if k.startswith("accuracy"))
    assert [q["p"] for q in tiny["quant_noise"]][0] == 0.0
    assert set(mini) >= {"n_sentences", "float", "ptq", "int8_dynamic", "ipq", "finetuning"}
    for row in mini["ptq"] + mini["ipq"] + [mini["int8_dynamic"]]:
        assert -1 <= row["cosine"] <= 1 + 1e-9 and 0 <= row["top1"] <= 1 and 0 <= row["top5"] <= 1
        assert 0 < row["bytes"] < mini["float"]["bytes"]


def test_quick_sweep_schema(quick):
    _check_schema(quick, True)
    assert quick["minilm"]["n_sentences"] == 12


def test_sizes_shrink_with_bits_exactly(quick):
    tiny, mini = quick["tiny"], quick["minilm"]
    for rows, total in ((tiny["ptq"], tiny["float"]["bytes"]), (mini["ptq"], mini["float"]["bytes"])):
        by_scheme = {}
        for row in rows:
            by_scheme.setdefault(row["scheme"], []).append((row["bits"], row["bytes"]))
        for points in by_scheme.values():
            points.sort()
            assert [b for _, b in points] == sorted(b for _, b in points)   # fewer bits, fewer bytes
            assert all(b < total for _, b in points)
    # MiniLM: the quantised layers' bytes are ⌈numel·b/8⌉ + 4 bytes per output-channel scale (symmetric)
    lin = mini["float"]["encoder_linear_bytes"] // 4
    for row in mini["ptq"]:
        if row["scheme"] == "symmetric, per channel":
            assert row["linear_bytes"] >= lin * row["bits"] / 8
            assert row["linear_bytes"] <= lin * row["bits"] / 8 + 4 * lin / 384 + 24


def test_quick_sweep_properties(quick):
    mini = quick["minilm"]
    ptq = {(r["bits"], r["scheme"]): r for r in mini["ptq"]}
    s8, s2 = ptq[8, "symmetric, per channel"], ptq[2, "symmetric, per channel"]
    assert s8["weight_rel_error"] < s2["weight_rel_error"] / 10        # 6 bits fewer: ≈ 64× the error (≫ 10×)
    assert s8["cosine"] > 0.99 and s8["cosine"] > s2["cosine"]
    assert mini["int8_dynamic"]["cosine"] > 0.98 and mini["int8_dynamic"]["layers"] == 24
    assert mini["int8_dynamic"]["linear_bytes"] < mini["float"]["encoder_linear_bytes"] / 3.9
    ipq = mini["ipq"][0]
    assert ipq["layers"] == 4 and math.isclose(ipq["bits_per_weight"], math.log2(ipq["n_centroids"]) / ipq["block_size"])
    tiny = quick["tiny"]
    for row in tiny["ipq"]:
        assert row["bytes"] < tiny["float"]["bytes"]


def test_run_sweep_rejects_bad_arguments():
    with pytest.raises(ValueError, match="parts must be"):
        S.run_sweep(parts=("tiny", "bert"))
    with pytest.raises(ValueError, match="threads must be"):
        S.run_sweep(threads=0)


def test_committed_results_have_the_schema():
    if not S.DEFAULT_OUT.is_file():
        pytest.skip(f"{S.DEFAULT_OUT} not generated yet")
    r = S.load_results()
    _check_schema(r, False)
    assert r["minilm"]["n_sentences"] == 120
    assert {row["bits"] for row in r["tiny"]["ptq"]} == set(S.BITS)
    assert {row["scheme"] for row in r["minilm"]["ptq"]} == {name for name, *_ in S.MINILM_SCHEMES}


def test_load_results_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="quantize_sweep"):
        S.load_results(tmp_path / "nope.json")
