"""``python -m effedu.bench lowrank`` (chapter 17): Linformer and Nyström vs SDPA — time of forward and of
forward+backward, and peak extra memory, against n."""
from __future__ import annotations

import math

from .. import measure
from ..attention.dense import softmax_attention
from ..attention.lowrank import linformer_attention, nystrom_attention
from ._format import Column, Table
from ._progress import steps

NAMES = ("SDPA", "Linformer", "Nyström", "dense (ours)")
TIMED = NAMES[:3]  # the materialised dense path is measured for memory only


def lowrank_table(ns, *, threads, B=1, H=8, D=64, K=256, M=64):
    """The table of ``bench_lowrank`` for sequence lengths ``ns``: Linformer with ``K``-row projections E, F and
    Nyström with ``M`` landmarks vs SDPA (times, ratios to SDPA) and the peak extra memory of forward+backward, the
    materialised dense path included (measured up to n = 4096, extrapolated ∝ n² above)."""
    import torch
    import torch.nn.functional as Fnn

    materialised_max = 4096  # the dense from-scratch path needs ~3 GiB at n=8192: extrapolated there (∝ n²)
    gen = torch.Generator().manual_seed(0)

    def methods(n):
        k_ = min(K, n)
        E = (torch.randn(k_, n, generator=gen) / math.sqrt(n)).requires_grad_(True)
        F_ = (torch.randn(k_, n, generator=gen) / math.sqrt(n)).requires_grad_(True)
        out = {
            "SDPA": lambda q, k, v: Fnn.scaled_dot_product_attention(q, k, v),
            "Linformer": lambda q, k, v: linformer_attention(q, k, v, E, F_),
            "Nyström": lambda q, k, v: nystrom_attention(q, k, v, landmarks=min(M, n)),
        }
        if n <= materialised_max:
            out["dense (ours)"] = lambda q, k, v: softmax_attention(q, k, v)
        return out, (E, F_)

    rows = []
    for n in steps(ns, "low-rank attention"):
        q, k, v = (torch.randn(B, H, n, D, generator=gen).requires_grad_(True) for _ in range(3))
        grad = torch.randn(B, H, n, D, generator=gen)
        fns, params = methods(n)
        leaves = (q, k, v) + params
        row = {"n": n, "dense_extrapolated": False}
        repeat = 3 if n >= 4096 else 5
        for name, fn in fns.items():
            def fwd():
                with torch.no_grad():
                    return fn(q, k, v)

            def fwd_bwd():
                for x in leaves:
                    x.grad = None
                fn(q, k, v).backward(grad)

            if name in TIMED:
                row[f"{name} fwd s"] = measure.time_it(fwd, warmup=1, repeat=repeat)
                row[f"{name} fwd+bwd s"] = measure.time_it(fwd_bwd, warmup=1, repeat=repeat)
            for x in leaves:
                x.grad = None
            row[f"{name} bytes"], _ = measure.peak_memory(fwd_bwd)
        prev = next((r for r in rows if r["n"] == materialised_max), None)
        if "dense (ours)" not in fns:
            # extrapolate the materialised path's memory ∝ n² from the largest n measured
            scale = (n / materialised_max) ** 2
            row["dense (ours) bytes"] = None if prev is None else prev["dense (ours) bytes"] * scale
            row["dense_extrapolated"] = prev is not None
        for name in TIMED:
            for kind in ("fwd", "fwd+bwd"):
                row[f"{name} {kind} ratio"] = row[f"{name} {kind} s"] / row[f"SDPA {kind} s"]
        rows.append(row)

    def cell(key):
        return lambda r: f"{r[key + ' s'] * 1e3:.1f} ({r[key + ' ratio']:.2f}×)"

    w = 17  # width of one "ms (ratio×)" cell
    columns = [Column("n", "n", 5, "d", sep="")]
    for kind in ("fwd", "fwd+bwd"):
        columns += [Column(f"{x} {kind} s", f"{kind} {x}", w, text=cell(f"{x} {kind}"), sep=" | " if i == 0 else " ")
                    for i, x in enumerate(TIMED)]
    columns += [Column(f"{x} bytes", x, 12, ".1f", 1 / 2**20, sep=" || " if i == 0 else " ",
                       label="peak extra MiB, fwd+bwd: " if i == 0 else "") for i, x in enumerate(NAMES)]
    columns.append(Column("dense_extrapolated", "", 0, sep="",
                          text=lambda r: " (dense extrapolated ∝ n²)" if r["dense_extrapolated"] else ""))
    top = max(rows, key=lambda r: r["n"])
    values = {"n": top["n"],
              "linformer_memory_vs_sdpa": top["Linformer bytes"] / top["SDPA bytes"],
              "linformer_memory_vs_dense": (None if top["dense (ours) bytes"] is None
                                            else top["Linformer bytes"] / top["dense (ours) bytes"]),
              "linformer_fwd_bwd_time_vs_sdpa": top["Linformer fwd+bwd ratio"],
              "nystrom_memory_vs_sdpa": top["Nyström bytes"] / top["SDPA bytes"],
              "nystrom_fwd_bwd_time_vs_sdpa": top["Nyström fwd+bwd ratio"]}
    vs_dense = values["linformer_memory_vs_dense"]
    notes = ["", f"target (survey §4, LRA: low-rank is the lightest) at n={top['n']}: Linformer peak memory "
                 f"{values['linformer_memory_vs_sdpa']:.2f}× SDPA's, "
                 f"{'—' if vs_dense is None else f'{vs_dense:.3f}'}× the materialised dense path's; fwd+bwd time "
                 f"{values['linformer_fwd_bwd_time_vs_sdpa']:.2f}× SDPA's (Nyström: memory "
                 f"{values['nystrom_memory_vs_sdpa']:.2f}× SDPA, time {values['nystrom_fwd_bwd_time_vs_sdpa']:.2f}×)",
             "peak extra = torch allocations seen by the profiler during forward+backward, including the "
             "gradients of q, k, v (and E, F); SDPA on the CPU is a fused flash kernel: O(n) memory too"]
    title = (f"low-rank attention, B={B} H={H} D={D} float32, Linformer k={K} (headwise E, F), Nyström m={M} "
             f"landmarks (6-step iterative pinv), {threads} threads; times in ms (ratio = time / SDPA time in the "
             f"same run)")
    return Table(title, columns, rows, notes, values)


def bench_lowrank(opts):
    """Low-rank attention: Linformer (k=256) and Nyström (m=64) vs SDPA, time and peak memory vs n."""
    ns = [256, 512] if opts.quick else [512, 1024, 2048, 4096, 8192]
    return [lowrank_table(ns, threads=opts.threads)]
