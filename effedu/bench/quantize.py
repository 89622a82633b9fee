"""``python -m effedu.bench quantize`` (chapter 08): is int8 faster here? — the int8 matmul kernels against float32
sgemm at 1024³, then all-MiniLM-L6-v2's forward with every encoder ``nn.Linear`` computed in int8, in one run.

int8 quarters the bytes of a float32 weight, but its *speed* is the CPU's business: with VNNI (``vpdpbusd``: 4 int8
products accumulated into int32 per instruction, ``avx512_vnni`` / ``avx_vnni``) or AMX tiles (``amx_int8``),
oneDNN's int8 GEMM behind ``torch._int_mm`` outruns float32 sgemm; with AVX2 alone there is no int8
dot-product instruction and int8 is often *slower* than float32 — the survey's hardware caveat again.
"""
from __future__ import annotations

import copy
import time

from .. import measure
from ..kernels.int8_matmul import INT8_FEATURES, cpu_int8_features, int8_matmul
from ._format import Column, Table
from ._progress import steps

TARGET_VS_INT_MM = 2.0  # the target: effedu's numba int8 matmul within 2× of torch._int_mm at 1024³
SLOW_CALL_S = 2.0  # a path whose first call takes longer is timed once more (not 5 times)
SKIP_REFERENCE_S = 30.0  # the torch reference is skipped at a size where it would take longer than this (estimated)


def int8_hardware():
    """``(line, has_int8_dot)``: torch's CPU capability and the int8 features that decide whether int8 is fast."""
    import torch

    feats = cpu_int8_features()
    cap = torch.backends.cpu.get_cpu_capability()
    listed = ", ".join(f"{name} {'yes' if feats.get(name) else 'no'}" for name in INT8_FEATURES) if feats else \
        "unknown (no /proc/cpuinfo flags)"
    if feats.get("amx_int8"):
        decides = "AMX int8 tiles: oneDNN (torch._int_mm) can use tile matmuls"
    elif feats.get("avx512_vnni") or feats.get("avx_vnni"):
        decides = "VNNI (vpdpbusd, 4 int8 products per lane per instruction): oneDNN's int8 GEMM can use it"
    elif feats.get("avx2"):
        decides = "AVX2 only: no int8 dot-product instruction (no VNNI, no AMX)"
    else:
        decides = "no AVX2: scalar int8"
    has_dot = bool(feats.get("amx_int8") or feats.get("avx512_vnni") or feats.get("avx_vnni"))
    return f"torch CPU capability {cap}; int8 features: {listed} → {decides}", has_dot


def _time(fn, repeat):
    """Median seconds of ``fn()``; the first call (compilation, caches) is the warm-up, and a path slower than
    SLOW_CALL_S per call is timed once more instead of ``repeat`` times."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > SLOW_CALL_S:
        return measure.time_it(fn, warmup=0, repeat=1)
    return measure.time_it(fn, warmup=0, repeat=repeat)


def matmul_table(opts):
    """Table 1: fp32 ``torch.mm`` vs ``torch._int_mm`` vs effedu's numba int8 vs effedu's torch reference."""
    import torch

    sizes = (64, 128) if opts.quick else (256, 512, 1024)
    repeat = 3 if opts.quick else 5
    hw, _ = int8_hardware()
    g = torch.Generator().manual_seed(0)
    rows, ref_estimate = [], None
    for n in steps(sizes, "quantize: int8 matmul"):
        a = torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8)
        af, bf = a.float(), b.float()
        row = {"n": n}
        row["fp32_s"] = _time(lambda: torch.mm(af, bf), repeat)
        row["int_mm_s"] = _time(lambda: torch._int_mm(a, b), repeat)
        row["numba_s"] = _time(lambda: int8_matmul(a, b, backend="numba"), repeat)
        if ref_estimate is not None and ref_estimate > SKIP_REFERENCE_S:
            row["torch_ref_s"] = None  # skipped: would take too long (said in the notes)
        else:
            row["torch_ref_s"] = _time(lambda: int8_matmul(a, b, backend="torch"), repeat)
            ref_estimate = row["torch_ref_s"] * 8  # the next size doubles n: 8× the work
        row["exact"] = bool(torch.equal(int8_matmul(a, b, backend="numba"), torch._int_mm(a, b)))
        row["numba_vs_int_mm"] = row["numba_s"] / row["int_mm_s"]
        row["numba_vs_fp32"] = row["numba_s"] / row["fp32_s"]
        row["int_mm_vs_fp32"] = row["int_mm_s"] / row["fp32_s"]
        row["numba_gops"] = 2 * n**3 / row["numba_s"] / 1e9
        rows.append(row)
    last = rows[-1]
    values = {"n": last["n"], "numba_vs_int_mm": last["numba_vs_int_mm"], "numba_vs_fp32": last["numba_vs_fp32"],
              "int_mm_vs_fp32": last["int_mm_vs_fp32"], "int_mm_s": last["int_mm_s"],
              "target_vs_int_mm": TARGET_VS_INT_MM, "within_target": last["numba_vs_int_mm"] <= TARGET_VS_INT_MM,
              "all_exact": all(r["exact"] for r in rows), "hardware": hw}
    ms = dict(fmt=".2f", scale=1e3, sep=" | ")
    columns = [Column("n", "M=K=N", 6, "d", sep=""), Column("fp32_s", "fp32 mm", 9, label="ms: ", **ms),
               Column("int_mm_s", "_int_mm", 9, **ms), Column("numba_s", "numba i8", 9, **ms),
               Column("torch_ref_s", "torch ref", 9, **ms),
               Column("numba_vs_int_mm", "numba/_int_mm", 13, ".2f", suffix="×", sep=" | "),
               Column("numba_vs_fp32", "numba/fp32", 10, ".2f", suffix="×", sep=" | "),
               Column("int_mm_vs_fp32", "_int_mm/fp32", 12, ".2f", suffix="×", sep=" | "),
               Column("numba_gops", "numba GOP/s", 11, ".1f", sep=" | "),
               Column("exact", "exact", 5, "", sep=" | ")]
    verdict = "met" if values["within_target"] else "NOT met"
    notes = [f"target: effedu numba int8 within {TARGET_VS_INT_MM:g}× of torch._int_mm at n={last['n']}: "
             f"{last['numba_vs_int_mm']:.2f}× → {verdict}; int8 vs fp32: numba {last['numba_vs_fp32']:.2f}×, "
             f"torch._int_mm {last['int_mm_vs_fp32']:.2f}× (< 1× = int8 faster)",
             "fp32 mm: MKL sgemm. torch._int_mm: torch's int8 GEMM (oneDNN where the CPU has VNNI/AMX). numba i8: "
             "effedu.kernels.int8_matmul (bᵀ contiguous, parallel 32×128 tiles, LLVM-vectorised int8→int32 dots). "
             "torch ref: int32 matmul in tensor ops. exact: numba == torch._int_mm, element for element."]
    if any(r["torch_ref_s"] is None for r in rows):
        notes.append(f"torch ref —: skipped where its estimated time exceeds {SKIP_REFERENCE_S:g} s")
    title = f"int8 × int8 → int32 matmul, M=K=N, {opts.threads} threads"
    return Table(title, columns, rows, notes, values=values, intro=[hw])


def _linear_macs(encoder, tokens):
    """Multiply-accumulates of the encoder layers' Linear layers for ``tokens`` tokens."""
    import torch.nn as nn

    return tokens * sum(m.in_features * m.out_features for m in encoder.blocks.modules() if isinstance(m, nn.Linear))


def minilm_table(opts, int_mm_s_per_mac, has_int8_dot):
    """Table 2: MiniLM forward (eval, no grad), fp32 vs every encoder nn.Linear as an int8 QuantizedLinear."""
    import torch

    from ..data.sentences import load_sentences
    from ..general.quantize import model_bytes, quantize_linears
    from ..pretrained import fidelity, load_minilm, passages

    B, T = (2, 32) if opts.quick else (8, 128)
    repeat = 3 if opts.quick else 5
    encoder, tokenizer = load_minilm()
    ids = passages(T, tokenizer)[0][:B]
    mask = torch.ones_like(ids)
    sentences = load_sentences()[0]
    if opts.quick:
        sentences = sentences[::10]  # 30 sentences
    macs = _linear_macs(encoder, B * T)
    # torch._int_mm as the QuantizedLinear kernel only where it is a real int8 GEMM (else it would take minutes)
    int_mm_estimate = macs * int_mm_s_per_mac
    run_int_mm = has_int8_dot or (not opts.quick and int_mm_estimate < 20.0)
    variants = {"fp32 (nn.Linear, sgemm)": None, "int8 QuantizedLinear, effedu numba": "numba",
                "int8 QuantizedLinear, torch._int_mm": "torch._int_mm" if run_int_mm else "skip"}
    rows, reference = [], None
    for label in steps(variants, "quantize: MiniLM", label=str):
        backend = variants[label]
        row = {"variant": label, "linears": 0}
        if backend == "skip":
            row["linears"] = None
            row.update(forward_s=None, vs_fp32=None, cosine=None, top1=None, top5=None, mib=None,
                       estimate_s=int_mm_estimate)
            rows.append(row)
            continue
        model = encoder
        if backend is not None:
            model = copy.deepcopy(encoder)
            row["linears"] = quantize_linears(model, backend=backend)
        with torch.no_grad():
            row["forward_s"] = _time(lambda: model(ids, mask), repeat)
            if reference is None:
                reference = model.embed(sentences)
            fid = fidelity(reference, model, sentences)
        row.update(cosine=fid["cosine"], top1=fid["top1"], top5=fid["top5"], mib=model_bytes(model) / 2**20)
        rows.append(row)
    fp32_s = rows[0]["forward_s"]
    for row in rows:
        if row["forward_s"] is not None:
            row["vs_fp32"] = row["forward_s"] / fp32_s
    numba_row = rows[1]
    values = {"int8_numba_vs_fp32": numba_row["vs_fp32"], "int8_numba_cosine": numba_row["cosine"],
              "int8_int_mm_vs_fp32": rows[2]["vs_fp32"], "batch": B, "tokens": T, "linears": numba_row["linears"],
              "n_sentences": len(sentences)}
    columns = [Column("variant", "variant", 38, "", align="<", sep=""),
               Column("linears", "int8 Linears", 12, "d", sep=" | "),
               Column("forward_s", "forward ms", 10, ".1f", 1e3, sep=" | "),
               Column("vs_fp32", "× fp32", 6, ".2f", suffix="×", sep=" | "),
               Column("mib", "state MiB", 9, ".1f", sep=" | "),
               Column("cosine", "cosine", 8, ".5f", sep=" | "), Column("top1", "top-1", 5, ".2f"),
               Column("top5", "top-5", 5, ".2f")]
    notes = [f"int8 vs fp32 end to end: effedu numba {numba_row['vs_fp32']:.2f}× the fp32 forward time "
             f"(< 1× = faster); fidelity of the int8 model's sentence embeddings vs fp32 on {len(sentences)} "
             f"sentences (effedu.pretrained.fidelity)",
             "int8: symmetric per-channel int8 weights × dynamic symmetric per-token int8 activations "
             "(effedu.general.quantize.quantize_linears); embeddings, LayerNorm, softmax and GELU stay float32."]
    if not run_int_mm:
        notes.append(f"torch._int_mm row skipped: no int8 dot-product instruction here, and at table 1's rate "
                     f"one forward would take ≈ {int_mm_estimate:.0f} s ({macs / 1e9:.1f} G int8 MACs)")
    title = f"all-MiniLM-L6-v2 forward, batch {B} × {T} tokens, eval, no grad, {opts.threads} threads"
    return Table(title, columns, rows, notes, values=values, intro=[int8_hardware()[0]])


def bench_quantize(opts):
    """Is int8 faster here? int8 matmul (effedu numba, torch._int_mm) vs fp32 sgemm, and MiniLM's int8 forward."""
    t1 = matmul_table(opts)
    _, has_dot = int8_hardware()
    n = t1.values["n"]
    t2 = minilm_table(opts, t1.values["int_mm_s"] / n**3, has_dot)
    return [t1, t2]


__all__ = ["bench_quantize", "matmul_table", "minilm_table", "int8_hardware", "TARGET_VS_INT_MM"]
