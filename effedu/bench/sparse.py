"""``python -m effedu.bench sparse`` (chapter 15): Longformer-style sparse attention — dense SDPA vs the masked dense
path vs effedu's block-sparse numba kernel, forward and forward+backward, and peak extra memory."""
from __future__ import annotations

from .. import measure
from ..attention.dense import softmax_attention
from ..attention.sparse import block_sparse_attention, density, layout_to_mask, pattern_layout
from ..kernels.block_sparse import numba_workspace_bytes
from ._format import Column, Table
from ._progress import steps


def sparse_bench_table(ns, *, threads, B=1, H=8, D=64, block_size=64, window=256, global_blocks=2, skip_masked=()):
    """The table of ``bench_sparse`` for sequence lengths ``ns`` (forward, forward+backward, peak extra memory);
    the masked dense path is skipped at the sizes in ``skip_masked``. Speed-up = SDPA time / kernel time."""
    import torch
    import torch.nn.functional as F

    b = block_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in steps(ns, "sparse attention"):
        layout = pattern_layout("longformer", n, b, window=window, global_tokens=global_blocks * b)
        mask = layout_to_mask(layout, b, n, n)
        q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
        dout = torch.randn(B, H, n, D, generator=gen)
        paths = {
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
            "masked": lambda q, k, v: softmax_attention(q, k, v, mask=mask),
            "kernel": lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=b, backend="numba"),
        }
        row = {"n": n, "kept": density(layout)}
        rep = 2 if n >= 4096 else 5
        for name, fn in paths.items():
            if name == "masked" and n in skip_masked:
                row["masked_fwd_s"] = row["masked_fwd_bwd_s"] = row["masked_bytes"] = None
                continue
            with torch.no_grad():
                row[f"{name}_fwd_s"] = measure.time_it(fn, q, k, v, warmup=1, repeat=rep)
                row[f"{name}_bytes"], _ = measure.peak_memory(fn, q, k, v)
            qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

            def step(fn=fn):
                out = fn(qg, kg, vg)
                torch.autograd.grad(out, (qg, kg, vg), dout)

            row[f"{name}_fwd_bwd_s"] = measure.time_it(step, warmup=1, repeat=rep)
        row["kernel_bytes"] += numba_workspace_bytes(n, n, D, D, block_size=b, itemsize=4)
        row["fwd_speedup"] = row["sdpa_fwd_s"] / row["kernel_fwd_s"]
        row["fwd_bwd_speedup"] = row["sdpa_fwd_bwd_s"] / row["kernel_fwd_bwd_s"]
        rows.append(row)

    def ms(key, header, **kw):
        return Column(key, header, 7, ".1f", 1e3, **kw)

    def mib(key, header, **kw):
        return Column(key, header, 6, ".1f", 1 / 2**20, **kw)

    columns = [
        Column("n", "n", 5, "d", sep=""), Column("kept", "kept", 6, ".1%"),
        ms("sdpa_fwd_s", "SDPA", sep=" | ", label="fwd ms: "), ms("masked_fwd_s", "masked"),
        ms("kernel_fwd_s", "kernel"), Column("fwd_speedup", "speed-up", 8, ".1f", suffix="×"),
        ms("sdpa_fwd_bwd_s", "SDPA", sep=" | ", label="fwd+bwd ms: "), ms("masked_fwd_bwd_s", "masked"),
        ms("kernel_fwd_bwd_s", "kernel"), Column("fwd_bwd_speedup", "speed-up", 8, ".1f", suffix="×"),
        mib("sdpa_bytes", "SDPA", sep=" | ", label="peak MiB: "), mib("masked_bytes", "masked"),
        mib("kernel_bytes", "kernel"),
    ]
    last = max(rows, key=lambda r: r["n"])
    values = {"n": last["n"], "fwd_speedup": last["fwd_speedup"], "fwd_bwd_speedup": last["fwd_bwd_speedup"]}
    notes = ["", f"target: block-sparse ≥ 5× faster than dense SDPA at n=8192 → at n={last['n']}: forward "
                 f"{last['fwd_speedup']:.1f}×, forward+backward {last['fwd_bwd_speedup']:.1f}×",
             "masked = dense softmax_attention with the layout's token mask (all n² scores computed, then "
             "masked): no faster than dense. kept = fraction of blocks the layout keeps. peak = extra memory "
             "of the forward (torch profiler, + the numba kernel's own workspace)"]
    title = (f"sparse attention, window {window} + {global_blocks} global blocks, block {b}; B={B} H={H} D={D} "
             f"float32, {threads} threads; speed-up = SDPA time / kernel time, same run; kernel = block-sparse numba")
    return Table(title, columns, rows, notes, values)


def bench_sparse(opts):
    """Sparse attention (window 256 + 2 global blocks of 64): masked-dense vs block-sparse numba vs dense SDPA."""
    ns = [256, 512] if opts.quick else [512, 1024, 2048, 4096, 8192]
    # the masked-dense path at n=8192 needs ~8 GiB (scores, masked scores, weights): skipped unless asked for
    skip_masked = () if opts.naive_8192 else (8192,)
    return [sparse_bench_table(ns, threads=opts.threads, skip_masked=skip_masked)]
