"""``python -m effedu.bench [name ...]``: the tables behind every speed and memory claim of the course.

Each benchmark measures effedu's implementation *and torch's* in the same run and reports ratios, so the numbers
say something on any machine. Tests never assert times; the closing notes and notebooks quote these tables.

One module per chapter (``effedu/bench/sparse.py`` for chapter 15's ``sparse`` …), each ``bench_<name>(opts)``
returning a list of :class:`Table` — rows of numbers, not text — and :func:`format_table` prints them. A chapter
adds its benchmark with one line in ``BENCHMARKS`` below (name → ``module:function``): no package scan.

From Python::

    from effedu import bench
    tables = bench.run("memory", quick=True, threads=1)     # list of Table; tables[0].rows: one dict per variant
    print(bench.format_tables(tables))
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import platform
from dataclasses import dataclass

from .. import env_report
from ._format import MISSING, Column, Table, format_table, format_tables
from ._progress import steps, write

# name → "module:function" under effedu.bench; --list and the default run follow this order (sorted by name)
BENCHMARKS = {
    "attention": "attention:bench_attention",
    "checkpoint": "checkpoint:bench_checkpoint",
    "kernelized": "kernelized:bench_kernelized",
    "lowrank": "lowrank:bench_lowrank",
    "lsh": "lsh:bench_lsh",
    "memory": "memory:bench_memory",
    "moe": "moe:bench_moe",
    "pipeline": "pipeline:bench_pipeline",
    "precision": "precision:bench_precision",
    "pretrained": "pretrained:bench_pretrained",
    "prune": "prune:bench_prune",
    "quantize": "quantize:bench_quantize",
    "reversible": "reversible:bench_reversible",
    "sharing": "sharing:bench_sharing",
    "sparse": "sparse:bench_sparse",
}

# chapter benchmarks that `attention` runs after its own tables (each is also runnable alone)
ATTENTION_CHAPTERS = ("sparse", "lowrank", "kernelized")


@dataclass(frozen=True)
class Options:
    """What every benchmark reads: ``threads`` (torch and numba, already set by :func:`run`; printed in titles),
    ``quick`` (the smallest sizes: a smoke run of seconds), ``naive_8192`` (also run the materialised attention
    paths at n = 8192, which need GiBs)."""

    threads: int = 2
    quick: bool = False
    naive_8192: bool = False


def get(name):
    """The function of benchmark ``name`` (imports its module)."""
    if name not in BENCHMARKS:
        raise ValueError(f"bench.get: unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    module, function = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def discover():
    """Every benchmark, ``{name: function}`` (the registry ``BENCHMARKS``, imported)."""
    return {name: get(name) for name in BENCHMARKS}


@contextlib.contextmanager
def num_threads(n):
    """Run the block with ``n`` torch and numba threads (numba: at most its pool size); restore both after."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads: n must be an int ≥ 1, got {n!r}")
    import numba
    import torch

    old_torch, old_numba = torch.get_num_threads(), numba.get_num_threads()
    # numba first: its OpenMP threading layer may set the OpenMP thread count that torch reads too
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(old_numba)
        torch.set_num_threads(old_torch)


def run(name, *, threads=2, quick=False, naive_8192=False):
    """Run benchmark ``name`` with ``threads`` threads (restored after) and return its list of :class:`Table`."""
    fn = get(name)
    opts = Options(threads=threads, quick=bool(quick), naive_8192=bool(naive_8192))
    with num_threads(threads):
        return list(fn(opts))


def cpu_description():
    """One line naming the CPU (``effedu.cpu_description()`` where it exists, else what ``platform`` knows)."""
    import effedu

    describe = getattr(effedu, "cpu_description", None)
    if describe is not None:
        return describe()
    return platform.processor() or platform.machine() or "unknown CPU"


def _description(fn):
    doc = (fn.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m effedu.bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and numba (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--naive-8192", action="store_true",
                        help="also run the materialised path at n=8192 (needs ~6 GiB)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in BENCHMARKS:
            print(f"{name}: {_description(get(name))}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(BENCHMARKS)}")
    if args.threads < 1:
        parser.error("--threads must be ≥ 1")
    # `attention` already includes the attention chapters' tables: running everything should not repeat them
    names = args.names or [n for n in BENCHMARKS if n not in ATTENTION_CHAPTERS]
    cpu = cpu_description()
    with num_threads(args.threads):
        env_report()  # inside: it reports the thread counts the tables were measured with
        print()
        for name in steps(names, "effedu.bench", label=str):
            tables = get(name)(Options(threads=args.threads, quick=args.quick, naive_8192=args.naive_8192))
            write(f"== {name} ==\n{format_tables(tables, cpu)}\n")
    return 0


__all__ = ["BENCHMARKS", "ATTENTION_CHAPTERS", "Options", "Table", "Column", "MISSING", "get", "discover", "run",
           "num_threads", "cpu_description", "format_table", "format_tables", "main"]
