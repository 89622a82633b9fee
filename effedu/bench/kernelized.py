"""``python -m effedu.bench kernelized`` (chapter 18): kernel attention vs SDPA — causal linear attention (numba
prefix sums), non-causal linear attention and Performer; forward, forward+backward, peak extra memory."""
from __future__ import annotations

from .. import measure
from ..attention.kernelized import default_n_features, gaussian_projection, linear_attention, performer_attention
from ..kernels.linear_attention import numba_workspace_bytes
from ._format import Column, Table
from ._progress import steps

PATHS = ("sdpa causal", "linear causal", "sdpa", "linear", "performer")


def kernelized_tables(ns, *, threads, B=1, H=8, D=64):
    """The two tables of ``bench_kernelized`` (causal, then non-causal) for sequence lengths ``ns``. Each row holds
    ``<path> fwd s``, ``<path> fwd+bwd s``, ``<path> bytes`` for the paths in ``PATHS`` and the ratios to SDPA."""
    import torch
    import torch.nn.functional as F

    m = default_n_features(D)
    gen = torch.Generator().manual_seed(0)
    proj = gaussian_projection(m, D, seed=0)
    paths = {
        "sdpa causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "linear causal": lambda q, k, v: linear_attention(q, k, v, causal=True, backend="numba"),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "linear": lambda q, k, v: linear_attention(q, k, v),
        "performer": lambda q, k, v: performer_attention(q, k, v, projection=proj),
    }

    def fwd_bwd(fn):
        def run(q, k, v):
            q.grad = k.grad = v.grad = None
            fn(q, k, v).sum().backward()
        return run

    rows = []
    for n in steps(ns, "kernel attention"):
        q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
        repeat = 3 if n >= 4096 else 5
        row = {"n": n}
        for name, fn in paths.items():
            with torch.no_grad():
                row[f"{name} fwd s"] = measure.time_it(fn, q, k, v, warmup=1, repeat=repeat)
            row[f"{name} fwd+bwd s"] = measure.time_it(fwd_bwd(fn), qg, kg, vg, warmup=1, repeat=repeat)
            row[f"{name} bytes"], _ = measure.peak_memory(fwd_bwd(fn), qg, kg, vg)
        row["linear causal bytes"] += numba_workspace_bytes(n, D, D, backward=True)
        for kind in ("fwd", "fwd+bwd"):
            row[f"linear causal {kind} ratio"] = row[f"linear causal {kind} s"] / row[f"sdpa causal {kind} s"]
            for name in ("linear", "performer"):
                row[f"{name} {kind} ratio"] = row[f"{name} {kind} s"] / row[f"sdpa {kind} s"]
        rows.append(row)

    def ms(key, header, width, sep=" "):
        return Column(key, header, width, ".1f", 1e3, sep=sep)

    def ratio(key):
        return Column(key, "ratio", 6, ".2f", suffix="×")

    def mib(key, header, sep=" ", label=""):
        return Column(key, header, 7, ".1f", 1 / 2**20, sep=sep, label=label)

    causal = Table(
        f"kernel attention, B={B} H={H} D={D} float32, {threads} threads (torch + numba); ratio = time / SDPA "
        f"time in the same run (< 1: faster than SDPA); Performer m={m} features (d·ln d)",
        [Column("n", "n", 6, "d", sep=""),
         ms("sdpa causal fwd s", "SDPA fwd ms", 11, " | "), ms("linear causal fwd s", "linear fwd", 10),
         ratio("linear causal fwd ratio"),
         ms("sdpa causal fwd+bwd s", "SDPA f+b ms", 11, " | "), ms("linear causal fwd+bwd s", "linear f+b", 10),
         ratio("linear causal fwd+bwd ratio"),
         mib("sdpa causal bytes", "SDPA", " || ", "peak extra MiB f+b: "), mib("linear causal bytes", "linear")],
        rows, intro=["", "causal (decoder): SDPA(is_causal=True) vs linear attention, elu+1, numba prefix-sum kernel"])
    columns = [Column("n", "n", 6, "d", sep="")]
    for kind, label in (("fwd", "SDPA fwd ms"), ("fwd+bwd", "SDPA f+b ms")):
        columns += [ms(f"sdpa {kind} s", label, 11, " | "), ms(f"linear {kind} s", "linear", 8),
                    ratio(f"linear {kind} ratio"), ms(f"performer {kind} s", "Performer", 9),
                    ratio(f"performer {kind} ratio")]
    columns += [mib("sdpa bytes", "SDPA", " || ", "peak MiB f+b: "), mib("linear bytes", "linear"),
                mib("performer bytes", "Perf.")]

    notes, values = [""], {}
    big = [r for r in rows if r["n"] >= 2048]
    if big:
        fw = [r["sdpa causal fwd s"] / r["linear causal fwd s"] for r in big]
        fb = [r["sdpa causal fwd+bwd s"] / r["linear causal fwd+bwd s"] for r in big]
        ok_f, ok_b = all(x > 1 for x in fw), all(x > 1 for x in fb)
        values.update(causal_faster_from_2048_fwd=ok_f, causal_faster_from_2048_fwd_bwd=ok_b)
        notes.append(f"target: causal linear attention faster than causal SDPA from n = 2048 on → forward "
                     f"{'yes' if ok_f else 'NO'} ({min(fw):.1f}–{max(fw):.1f}× faster), forward+backward "
                     f"{'yes' if ok_b else 'NO'} ({min(fb):.1f}–{max(fb):.1f}× faster) for n = "
                     f"{big[0]['n']}…{big[-1]['n']}")
    ns = [r["n"] for r in rows]
    for label, kind in (("forward", "fwd"), ("forward+backward", "fwd+bwd")):
        # the crossover: the smallest measured n from which linear attention is faster at every larger n
        faster = [r[f"linear causal {kind} s"] < r[f"sdpa causal {kind} s"] for r in rows]
        cross = next((n for j, n in enumerate(ns) if all(faster[j:])), None)
        values[f"crossover_{kind}"] = cross
        notes.append(f"crossover (causal {label}): linear attention is faster from n = {cross} on (smallest n "
                     f"measured: {ns[0]})" if cross
                     else f"crossover (causal {label}): not reached in the measured range")
    notes.append("peak extra = torch allocations seen by the profiler during forward+backward (+ the numba kernels' "
                 "own workspace: numba_workspace_bytes)")
    noncausal = Table("", columns, rows, notes, values,
                      intro=["non-causal (encoder): SDPA vs linear attention (two products) vs Performer FAVOR+"])
    return [causal, noncausal]


def bench_kernelized(opts):
    """Kernel attention vs SDPA: causal linear (numba prefix sums), non-causal linear and Performer; fwd, fwd+bwd."""
    ns = [256, 512] if opts.quick else [512, 1024, 2048, 4096, 8192]
    return kernelized_tables(ns, threads=opts.threads)
