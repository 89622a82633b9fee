"""`python -m effedu.bench`: benchmarks are discovered and the memory table's targets hold on a small config."""
import argparse
import re

from effedu import bench


def test_discovers_chapter_benchmarks():
    names = set(bench.discover())
    assert {"attention", "memory", "pretrained", "checkpoint", "reversible", "sharing", "precision", "pipeline",
            "sparse", "lowrank", "kernelized"} <= names


def test_memory_bench_quick_meets_the_deterministic_targets():
    table = bench.bench_memory(argparse.Namespace(threads=1, quick=True))
    sqrt = float(re.search(r"√L memory model → ([+-][\d.]+)%", table).group(1))
    rev = float(re.search(r"of 2 layers → ([+-][\d.]+)%", table).group(1))
    assert abs(sqrt) <= 5.0 and abs(rev) <= 10.0
    for name in ("plain", "checkpoint every layer", "reversible", "bf16 compute + fp32 masters", "ALBERT all-shared"):
        assert name in table


def test_attention_backward_table_runs_and_states_its_target():
    table = bench._bench_attention_backward(argparse.Namespace(threads=1, quick=True), [256])
    rows = [ln for ln in table.splitlines() if re.match(r"\s+256\s+(True|False)", ln)]
    assert len(rows) == 2 and all("×" in r for r in rows)
    assert "forward+backward" in table and "target" not in table  # the target line needs n=2048
