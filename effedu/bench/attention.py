"""``python -m effedu.bench attention``: exact attention — torch SDPA vs effedu's torch reference, the materialised
path and the numba tiled kernels, forward then forward+backward, time and peak extra memory; then the tables of the
attention chapters (sparse, low-rank, kernelized)."""
from __future__ import annotations

from dataclasses import replace

from .. import kernels, measure
from ..attention.dense import softmax_attention
from ..attention.memory_efficient import fwd_bwd
from ..kernels.tiled_attention import numba_workspace_bytes
from ._format import Column, Table
from ._progress import steps
from .kernelized import bench_kernelized
from .lowrank import bench_lowrank
from .sparse import bench_sparse

B, H, D = 1, 8, 64
MiB = 1 / 2**20


def _ms(key, header, width=8, sep=" | "):
    return Column(key, header, width, ".1f", 1e3, sep=sep)


def _ratio(key):
    return Column(key, "", 6, ".2f", suffix="×")


def _mib(key, header, width, sep=" ", label=""):
    return Column(key, header, width, ".1f", MiB, sep=sep, label=label)


def attention_forward_table(ns, *, threads, naive_8192=False):
    """Forward of exact attention at each ``n`` in ``ns``: time (and ratio to SDPA) and peak extra memory of SDPA,
    effedu's torch reference, the materialised path (``naive``) and the numba tiled kernel."""
    import torch
    import torch.nn.functional as F

    lean_only = {8192}  # the materialised path needs ~6 GiB there: time is not measured for it
    gen = torch.Generator().manual_seed(0)
    paths = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "torch_ref": lambda q, k, v: kernels.attention(q, k, v, backend="torch"),
        "naive": lambda q, k, v: softmax_attention(q, k, v),
        "numba": lambda q, k, v: kernels.attention(q, k, v, backend="numba"),
    }
    rows = []
    with torch.no_grad():
        for n in steps(ns, "attention forward"):
            q, k, v = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float32) for _ in range(3))
            row = {"n": n, "naive_extrapolated": False}
            for name, fn in paths.items():
                if name == "naive" and n in lean_only and not naive_8192:
                    # extra memory of the materialised path, from its measured cost per score at n=4096
                    prev = next((r for r in rows if r["n"] == 4096), None)
                    known = prev is not None and prev["naive_bytes"] is not None
                    row["naive_bytes"] = prev["naive_bytes"] * (n / 4096) ** 2 if known else None
                    row["naive_extrapolated"] = known
                    row["naive_s"] = None
                    continue
                repeat = 3 if n >= 4096 else 7
                row[f"{name}_s"] = measure.time_it(fn, q, k, v, warmup=1, repeat=repeat)
                row[f"{name}_bytes"], _ = measure.peak_memory(fn, q, k, v)
            row["numba_bytes"] += numba_workspace_bytes(n, n, D, D, itemsize=4)
            for name in ("torch_ref", "naive", "numba"):
                t = row[f"{name}_s"]
                row[f"{name}_ratio"] = None if t is None else t / row["sdpa_s"]
            rows.append(row)
    columns = [
        Column("n", "n", 6, "d", sep=""),
        _ms("sdpa_s", "SDPA ms"),
        _ms("torch_ref_s", "torch-ref ms", 12), _ratio("torch_ref_ratio"),
        _ms("naive_s", "naive ms"), _ratio("naive_ratio"),
        _ms("numba_s", "numba ms"), _ratio("numba_ratio"),
        _mib("sdpa_bytes", "SDPA", 9, sep=" || ", label="peak extra MiB: "),
        _mib("torch_ref_bytes", "torch-ref", 9), _mib("naive_bytes", "naive", 9), _mib("numba_bytes", "numba", 9),
        Column("naive_extrapolated", "", 0, text=lambda r: " (extrapolated n²)" if r["naive_extrapolated"] else "",
               sep=""),
    ]
    by_n = {r["n"]: r for r in rows}
    notes, values = [""], {}
    if 2048 in by_n:
        values["numba_vs_sdpa_at_2048"] = by_n[2048]["numba_ratio"]
        notes.append(f"target: numba tiled ≤ 1.5× SDPA at n=2048 → {values['numba_vs_sdpa_at_2048']:.2f}×")
    if 8192 in by_n and by_n[8192]["naive_bytes"]:
        values["naive_over_numba_memory_at_8192"] = by_n[8192]["naive_bytes"] / by_n[8192]["numba_bytes"]
        notes.append(f"target: numba extra memory at n=8192 ≥ 50× below the materialised path → "
                     f"{values['naive_over_numba_memory_at_8192']:.0f}× below")
    notes.append("peak extra = torch allocations seen by the profiler during the call (+ the numba kernel's own "
                 "workspace, computed from its allocations: numba_workspace_bytes)")
    title = (f"attention forward, B={B} H={H} D={D} float32, {threads} threads (torch + numba); "
             f"ratios = time / SDPA time in the same run")
    return Table(title, columns, rows, notes, values)


def attention_backward_table(ns, *, threads):
    """Forward + backward (grads of q, k, v) of exact attention, full and causal, at each ``n`` in ``ns``: SDPA vs
    the materialised path (up to n = 2048) vs effedu's numba tiled kernels."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(1)
    rows = []
    for n, causal in steps([(n, c) for n in ns for c in (False, True)], "attention forward+backward",
                           label=lambda x: f"n={x[0]}{' causal' if x[1] else ''}"):
        q, k, v, dout = (torch.randn(B, H, n, D, generator=gen) for _ in range(4))
        paths = {
            "sdpa": lambda a, b, c, _c=causal: F.scaled_dot_product_attention(a, b, c, is_causal=_c),
            "naive": lambda a, b, c, _c=causal: softmax_attention(a, b, c, causal=_c),
            "numba": lambda a, b, c, _c=causal: kernels.attention(a, b, c, causal=_c, backend="numba"),
        }
        row = {"n": n, "causal": causal}
        for name, fn in paths.items():
            if name == "naive" and n > 2048:  # 3 n×n float32 matrices per head kept for backward: GiBs
                row["naive_s"] = row["naive_bytes"] = None
                continue
            row[f"{name}_s"] = measure.time_it(fwd_bwd, fn, q, k, v, dout, warmup=1, repeat=3 if n >= 4096 else 5)
            row[f"{name}_bytes"], _ = measure.peak_memory(fwd_bwd, fn, q, k, v, dout)
        row["numba_bytes"] += numba_workspace_bytes(n, n, D, D, itemsize=4, backward=True)
        for name in ("naive", "numba"):
            t = row[f"{name}_s"]
            row[f"{name}_ratio"] = None if t is None else t / row["sdpa_s"]
        rows.append(row)
    columns = [
        Column("n", "n", 6, "d", sep=""), Column("causal", "causal", 6, ""),
        _ms("sdpa_s", "SDPA ms"),
        _ms("naive_s", "naive ms"), _ratio("naive_ratio"),
        _ms("numba_s", "numba ms"), _ratio("numba_ratio"),
        _mib("sdpa_bytes", "SDPA", 8, sep=" || ", label="peak extra MiB: "),
        _mib("naive_bytes", "naive", 8), _mib("numba_bytes", "numba", 8),
    ]
    notes, values = [], {}
    at_2048 = {r["causal"]: r["numba_ratio"] for r in rows if r["n"] == 2048}
    if at_2048:
        values.update({f"numba_vs_sdpa_at_2048_{'causal' if c else 'full'}": x for c, x in at_2048.items()})
        notes += ["", "target: tiled exact attention forward+backward ≤ 2× SDPA's at n=2048 → "
                  + ", ".join(f"{'causal' if c else 'full'} {x:.2f}×" for c, x in at_2048.items())]
    notes.append("naive forward+backward is not run above n=2048 (it keeps three n×n matrices per head)")
    title = (f"attention forward+backward (grads of q, k, v), B={B} H={H} D={D} float32, {threads} threads; "
             "ratios = time / SDPA's forward+backward in the same run")
    return Table(title, columns, rows, notes, values)


def bench_attention(opts):
    """Exact attention: torch SDPA vs effedu's torch reference, naive (materialised) and numba tiled."""
    ns = [256, 512, 1024] if opts.quick else [256, 512, 1024, 2048, 4096, 8192]
    tables = [attention_forward_table(ns, threads=opts.threads, naive_8192=opts.naive_8192),
              attention_backward_table(ns, threads=opts.threads)]
    for name, chapter in (("sparse", bench_sparse), ("lowrank", bench_lowrank), ("kernelized", bench_kernelized)):
        first, *rest = chapter(opts)
        heading = f"-- {name} (chapter benchmark, also runnable alone: python -m effedu.bench {name}) --"
        tables += [replace(first, heading=heading), *rest]
    return tables
