"""``python -m effedu.bench lsh`` (chapter 16): Reformer LSH attention (numba kernel) vs dense SDPA vs the
block-sparse local kernel of chapter 15 — forward and forward+backward time, the crossover n where LSH beats
SDPA, and the extra memory of the LSH forward (O(n·chunk))."""
from __future__ import annotations

from .. import measure
from ..attention.lsh import lsh_attention
from ..attention.sparse import block_sparse_attention, pattern_layout
from ._format import Column, Table
from ._progress import steps


def lsh_bench_table(ns, *, threads, B=1, H=8, D=64, chunk_size=64, n_buckets=32, n_rounds=2, block_size=64):
    """The table of ``bench_lsh`` for sequence lengths ``ns``. Speed-up = SDPA time / LSH time (same run)."""
    import torch
    import torch.nn.functional as F

    c = chunk_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in steps(ns, "LSH attention"):
        # the local window of the block-sparse kernel: the same 2·chunk keys per query as one LSH round
        layout = pattern_layout("local", n, block_size, window=2 * c)
        q, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(2))
        k = torch.randn(B, H, n, D, generator=gen)
        dout = torch.randn(B, H, n, D, generator=gen)
        paths = {
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
            "local": lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=block_size, backend="numba"),
            "lsh": lambda q, k, v: lsh_attention(q, None, v, n_buckets=n_buckets, n_rounds=n_rounds, chunk_size=c,
                                                 backend="numba"),
        }
        row = {"n": n}
        rep = 2 if n >= 4096 else 3
        for name, fn in paths.items():
            with torch.no_grad():
                row[f"{name}_fwd_s"] = measure.time_it(fn, q, k, v, warmup=1, repeat=rep)
                if name != "local":
                    row[f"{name}_bytes"], _ = measure.peak_memory(fn, q, k, v)
            qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

            def step(fn=fn, name=name):
                out = fn(qg, kg, vg)
                torch.autograd.grad(out, (qg, vg) if name == "lsh" else (qg, kg, vg), dout)

            row[f"{name}_fwd_bwd_s"] = measure.time_it(step, warmup=1, repeat=rep)
        row["fwd_speedup"] = row["sdpa_fwd_s"] / row["lsh_fwd_s"]
        row["fwd_bwd_speedup"] = row["sdpa_fwd_bwd_s"] / row["lsh_fwd_bwd_s"]
        row["lsh_bytes_per_token"] = row["lsh_bytes"] / n
        rows.append(row)

    def ms(key, header, **kw):
        return Column(key, header, 7, ".1f", 1e3, **kw)

    def mib(key, header, **kw):
        return Column(key, header, 7, ".1f", 1 / 2**20, **kw)

    columns = [
        Column("n", "n", 5, "d", sep=""),
        ms("sdpa_fwd_s", "SDPA", sep=" | ", label="fwd ms: "), ms("local_fwd_s", "local"), ms("lsh_fwd_s", "LSH"),
        Column("fwd_speedup", "speed-up", 8, ".2f", suffix="×"),
        ms("sdpa_fwd_bwd_s", "SDPA", sep=" | ", label="fwd+bwd ms: "), ms("local_fwd_bwd_s", "local"),
        ms("lsh_fwd_bwd_s", "LSH"), Column("fwd_bwd_speedup", "speed-up", 8, ".2f", suffix="×"),
        mib("sdpa_bytes", "SDPA", sep=" | ", label="peak MiB: "), mib("lsh_bytes", "LSH"),
        Column("lsh_bytes_per_token", "LSH B/token", 11, ".0f"),
    ]
    faster = [r["n"] for r in rows if r["fwd_speedup"] > 1]
    crossover = min(faster) if faster else None
    top = max(r["n"] for r in rows)
    values = {"crossover_n": crossover, "n": top,
              "fwd_speedup": max(rows, key=lambda r: r["n"])["fwd_speedup"]}
    where = f"n = {crossover}" if crossover is not None else f"none ≤ {top}"
    notes = ["", f"crossover (first n where the LSH forward beats dense SDPA): {where}",
             f"LSH: {n_rounds} rounds × {n_buckets} buckets, chunk {c} (each query scores 2·chunk = {2 * c} keys per "
             f"round: O(n·rounds·chunk) work, + a sort); local = block-sparse numba kernel (chapter 15), window "
             f"{2 * c}, block {block_size}; LSH B/token ≈ constant = memory O(n·chunk) (torch allocations of the "
             "forward: the sorted copies, the window bias, outputs); LSH fwd+bwd differentiates q and v (k is "
             "ignored: shared-QK)"]
    title = (f"LSH attention vs dense SDPA vs block-sparse local; B={B} H={H} D={D} float32, {threads} threads; "
             f"speed-up = SDPA time / LSH time, same run")
    return Table(title, columns, rows, notes, values)


def bench_lsh(opts):
    """Reformer LSH attention (numba) vs dense SDPA and the block-sparse local kernel; the crossover n."""
    ns = [256, 512] if opts.quick else [512, 1024, 2048, 4096, 8192]
    return [lsh_bench_table(ns, threads=opts.threads)]


__all__ = ["bench_lsh", "lsh_bench_table"]
