"""``python -m effedu.bench prune`` (chapter 05): is a pruned weight matrix *faster*, or only smaller?

Table 1, at 90 % unstructured sparsity (a 1024×1024 float32 weight times a 1024×256 batch of activations): dense
sgemm (``torch.mm``, zeros included) vs ``torch.sparse`` (``a_csr @ b``) vs ``scipy.sparse.csr_matrix @ b``
(single-threaded C) vs effedu's numba CSR kernel vs effedu's torch reference — seconds, and ratios to scipy and to
dense. Table 2, time vs sparsity (0 … 0.99) for dense, ``torch.sparse``, effedu numba CSR and **structured**
pruning (a dense product with only (1 − s)·M rows: what removing whole neurons or heads buys), and the crossover
sparsity above which the CSR kernel beats dense sgemm — the survey's "sparse models are unoptimized for modern
hardware", measured.
"""
from __future__ import annotations

import math
import statistics

from .. import measure
from ._format import Column, Table
from ._progress import steps

METHODS = ("dense", "torch.sparse", "scipy", "numba", "torch", "structured")
DEFAULT_METHODS = ("dense", "torch.sparse", "numba", "structured")
DEFAULT_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
LABELS = {"dense": "dense sgemm (torch.mm)", "torch.sparse": "torch.sparse (a_csr @ b)",
          "scipy": "scipy.sparse csr @ b (1 thread, C)", "numba": "effedu CSR, numba",
          "torch": "effedu CSR, torch reference", "structured": "structured: (1−s)·M rows, dense"}


def _check_sparsities(sparsities, where):
    try:
        values = [float(s) for s in sparsities]
    except TypeError:
        raise TypeError(f"{where}: sparsities must be a sequence of numbers in [0, 1), got {sparsities!r}") from None
    if not values:
        raise ValueError(f"{where}: sparsities must not be empty")
    bad = [s for s in values if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"{where}: every sparsity must lie in [0, 1) (the fraction of weights removed), got {bad}")
    return values


def pruned_operands(sparsity, *, m=1024, k=1024, n=256, seed=0):
    """``(weight, b)``: a float32 ``(m, k)`` weight with exactly ``round(sparsity·m·k)`` entries zeroed (a random
    pattern, as magnitude pruning of Gaussian weights gives) and activations ``b`` ``(k, n)``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g)
    n_zero = round(sparsity * m * k)
    w.view(-1)[torch.randperm(m * k, generator=g)[:n_zero]] = 0.0
    b = torch.randn(k, n, generator=g)
    return w, b


def _method_fns(w, b, sparsity, methods):
    """``{method: zero-argument callable}`` computing ``w @ b`` (or its structured stand-in) each way."""
    import torch

    from ..kernels.sparse_matmul import csr_matmul, dense_to_csr

    fns = {}
    a = dense_to_csr(w) if {"torch.sparse", "numba", "torch"} & set(methods) else None
    for name in methods:
        if name == "dense":
            fns[name] = lambda: torch.mm(w, b)
        elif name == "torch.sparse":
            fns[name] = lambda: a @ b
        elif name == "numba":
            fns[name] = lambda: csr_matmul(a, b, backend="numba")
        elif name == "torch":
            fns[name] = lambda: csr_matmul(a, b, backend="torch")
        elif name == "scipy":
            import scipy.sparse

            s = scipy.sparse.csr_matrix(w.numpy())
            bn = b.numpy()
            fns[name] = lambda: s @ bn
        elif name == "structured":
            rows = max(1, round((1.0 - sparsity) * w.shape[0]))  # whole output rows removed: a smaller dense matrix
            ws = w[:rows].contiguous()
            fns[name] = lambda: torch.mm(ws, b)
    return fns


def time_vs_sparsity(sparsities, *, m=1024, k=1024, n=256, methods=DEFAULT_METHODS, repeat=5, seed=0):
    """Median seconds of ``(m×k weight) @ (k×n)`` at each sparsity, per method: ``{method: [seconds, ...]}``.

    Methods (any of :data:`METHODS`): ``"dense"`` (``torch.mm``, the zeros multiplied too), ``"torch.sparse"``
    (``a_csr @ b``), ``"scipy"`` (``scipy.sparse.csr_matrix @ b``, single-threaded C), ``"numba"`` (effedu's CSR
    kernel), ``"torch"`` (effedu's torch reference: an nnz×n intermediate — GiBs at low sparsity for big sizes),
    ``"structured"`` (a dense product with only round((1 − s)·m) rows). Runs with the current torch/numba thread
    counts; float32; one warm-up call each, then ``repeat`` rounds that time each method once (interleaved); the
    median per method.
    """
    import torch

    where = "time_vs_sparsity"
    values = _check_sparsities(sparsities, where)
    if isinstance(methods, str):
        raise TypeError(f"{where}: methods must be a sequence of method names, got the str {methods!r}")
    unknown = [x for x in methods if x not in METHODS]
    if unknown or not methods:
        raise ValueError(f"{where}: unknown method(s) {unknown or methods!r}; expected some of {', '.join(METHODS)}")
    for name, v in (("m", m), ("k", k), ("n", n), ("repeat", repeat)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {name} must be an int ≥ 1, got {v!r}")
    out = {name: [] for name in methods}
    with torch.no_grad():
        for s in values:
            w, b = pruned_operands(s, m=m, k=k, n=n, seed=seed)
            fns = _method_fns(w, b, s, methods)
            for fn in fns.values():
                fn()  # warm-up (numba loads its compiled kernel on the first call)
            # interleaved rounds, one call of each method per round: a burst of load on a shared machine slows
            # every method of that round, not all the calls of one method — the ratios stay meaningful
            samples = {name: [] for name in methods}
            for _ in range(repeat):
                for name, fn in fns.items():
                    samples[name].append(measure.time_it(fn, warmup=0, repeat=1))
            for name in methods:
                out[name].append(statistics.median(samples[name]))
    return out


def crossover(sparsities, times, baseline):
    """The sparsity above which ``times`` drop below ``baseline`` (interpolated), or None if they never do.

    ``times``: seconds of a method at each sparsity (increasing sparsities); ``baseline``: the baseline's seconds
    at the same sparsities, or one number. The crossover is the first sparsity where the method is faster, moved
    back to where the log of the time ratio crosses 0 on the segment from the previous sparsity (the first
    sparsity itself when the method is already faster there).
    """
    where = "crossover"
    s = _check_sparsities(sparsities, where)
    t = [float(x) for x in times]
    base = [float(baseline)] * len(s) if isinstance(baseline, (int, float)) else [float(x) for x in baseline]
    if not (len(t) == len(base) == len(s)):
        raise ValueError(f"{where}: sparsities, times and baseline must have one entry each, got lengths {len(s)}, "
                         f"{len(t)}, {len(base)}")
    if any(not (x > 0 and math.isfinite(x)) for x in t + base):
        raise ValueError(f"{where}: times must be positive and finite seconds")
    if any(b <= a for a, b in zip(s, s[1:])):
        raise ValueError(f"{where}: sparsities must be increasing, got {s}")
    r = [math.log(x / y) for x, y in zip(t, base)]  # < 0: the method is faster
    for i, ri in enumerate(r):
        if ri < 0:
            if i == 0:
                return s[0]
            # linear in log-ratio between (s[i-1], r[i-1] ≥ 0) and (s[i], r[i] < 0)
            return s[i - 1] + (s[i] - s[i - 1]) * r[i - 1] / (r[i - 1] - ri)
    return None


def _ms(key, header, width=9, sep=" "):
    return Column(key, header, width, ".2f", 1e3, sep=sep)


def _ratio(key, header="", width=7, sep=" "):
    return Column(key, header, width, ".2f", suffix="×", sep=sep)


def at_90_table(*, m, k, n, threads, repeat):
    """Table 1: every method at 90 % sparsity; seconds and ratios to scipy and to dense."""
    import torch

    methods = ("dense", "torch.sparse", "scipy", "numba", "torch")
    times = time_vs_sparsity([0.9], m=m, k=k, n=n, methods=methods, repeat=repeat)
    w, b = pruned_operands(0.9, m=m, k=k, n=n)
    with torch.no_grad():
        fns = _method_fns(w, b, 0.9, ("dense", "numba"))
        agree = bool(torch.allclose(fns["numba"](), fns["dense"](), atol=1e-4, rtol=1e-4))
    rows = []
    for name in methods:
        sec = times[name][0]
        rows.append({"method": LABELS[name], "key": name, "s": sec, "vs_scipy": sec / times["scipy"][0],
                     "vs_dense": sec / times["dense"][0]})
    speedup = times["scipy"][0] / times["numba"][0]
    values = {"numba_speedup_vs_scipy": speedup, "numba_vs_dense": times["numba"][0] / times["dense"][0],
              "numba_matches_dense": agree, "m": m, "k": k, "n": n}
    columns = [Column("method", "method", 35, "", align="<", sep=""), _ms("s", "ms", sep=" | "),
               _ratio("vs_scipy", "÷ scipy", 8, sep=" | "), _ratio("vs_dense", "÷ dense", 8)]
    notes = ["", f"target: effedu numba CSR faster than scipy.sparse at 90 % → scipy time / numba time = "
                 f"{speedup:.2f} ({'met' if speedup > 1 else 'not met'}); numba CSR takes "
                 f"{values['numba_vs_dense']:.2f}× the dense sgemm's time; numba result == dense result: {agree}",
             "ratios = time / that method's time in the same run (below 1: faster). scipy's csr @ dense is "
             "single-threaded C; the torch reference gathers an nnz×n intermediate"]
    title = (f"CSR sparse × dense at 90 % sparsity: ({m}×{k} weight, {round(0.1 * m * k)} non-zeros) @ ({k}×{n}) "
             f"float32, {threads} threads")
    return Table(title, columns, rows, notes, values)


def sparsity_table(sparsities, *, m, k, n, threads, repeat):
    """Table 2: time vs sparsity for dense, torch.sparse, effedu numba CSR and structured; the crossovers."""
    times = time_vs_sparsity(sparsities, m=m, k=k, n=n, methods=DEFAULT_METHODS, repeat=repeat)
    rows = []
    for i, s in enumerate(sparsities):
        row = {"sparsity": s}
        for name in DEFAULT_METHODS:
            key = name.replace(".", "_")
            row[f"{key}_s"] = times[name][i]
            row[f"{key}_vs_dense"] = times[name][i] / times["dense"][i]
        rows.append(row)
    values = {f"crossover_{name.replace('.', '_')}": crossover(sparsities, times[name], times["dense"])
              for name in ("numba", "torch.sparse", "structured")}

    def said(x):
        return f"s ≈ {x:.2f}" if x is not None else f"none up to {sparsities[-1]:g}"

    columns = [Column("sparsity", "sparsity", 8, ".2f", sep=""), _ms("dense_s", "dense", sep=" | "),
               _ms("torch_sparse_s", "torch.sp"), _ratio("torch_sparse_vs_dense"),
               _ms("numba_s", "numba"), _ratio("numba_vs_dense"),
               _ms("structured_s", "struct."), _ratio("structured_vs_dense")]
    notes = ["", f"crossover (faster than dense sgemm above): effedu numba CSR {said(values['crossover_numba'])}; "
                 f"torch.sparse {said(values['crossover_torch_sparse'])}; structured "
                 f"{said(values['crossover_structured'])}",
             "ms: median time; × = time / dense time at the same sparsity. structured = the same product with "
             "(1 − s)·M whole rows (neurons/heads removed): a smaller dense matrix, fast at any sparsity"]
    title = (f"time vs sparsity: ({m}×{k}) @ ({k}×{n}) float32, {threads} threads — dense sgemm vs torch.sparse vs "
             f"effedu CSR (numba) vs structured")
    return Table(title, columns, rows, notes, values)


def bench_prune(opts):
    """Pruned weights: dense sgemm vs torch.sparse vs scipy vs effedu CSR (numba) vs structured; the crossover."""
    if opts.quick:
        m = k = 256
        n, repeat, sparsities = 64, 2, (0.0, 0.5, 0.9, 0.99)
    else:
        m = k = 1024
        n, repeat, sparsities = 256, 7, DEFAULT_SPARSITIES
    tables = []
    for which in steps(["at 90 %", "vs sparsity"], "prune", label=str):
        if which == "at 90 %":
            tables.append(at_90_table(m=m, k=k, n=n, threads=opts.threads, repeat=repeat))
        else:
            tables.append(sparsity_table(list(sparsities), m=m, k=k, n=n, threads=opts.threads, repeat=repeat))
    return tables


__all__ = ["bench_prune", "time_vs_sparsity", "crossover", "pruned_operands", "at_90_table", "sparsity_table",
           "METHODS", "DEFAULT_METHODS", "DEFAULT_SPARSITIES", "LABELS"]
