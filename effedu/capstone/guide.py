"""The decision guide, computed: "which method for which constraint", answered from measured numbers.

The survey outline's decision guide (§9.3) says what to try first for each constraint; here every answer is
*recomputed from a capstone results file* (and, for deployment size, from the chapters' committed results), so a
learner's own run gives a learner's own guide. Each recommendation says the measured evidence in one sentence,
which chapters teach the technique, and which section/rows of the results it came from. A row of the survey's
table with no measurement behind it is not invented: it is listed under "the survey says", with its source.

Rules (the constants below are the tolerances, stated in the markdown's caption):

1. *Long sequences on a CPU, for inference* (``lra``): among the variants whose task-mean accuracy at the short
   length is ≥ dense's − :data:`QUALITY_TOL`, the lowest median inference time at the long length.
2. *Training memory on one GPU* (``grid``, mode train, longest length): the combination with the lowest peak memory
   whose quality is within :data:`QUALITY_TOL` of the plain dense fp32 row (same mode, length, device).
3. *Smallest model for a phone* (``grid`` inference rows' ``model_mib``; chapters 8, 5, 6 when given): the smallest
   model whose accuracy is ≥ its own baseline's − :data:`QUALITY_TOL`.
4. *Fastest decoding* (``decode``): the lowest ms per token at the longest context, and its ratio to dense.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import ROOT
from .reference import CHANCE_MARGIN, chance_level, lra_summary

QUALITY_TOL = 0.02  # accuracy (absolute, 2 points) a technique may lose and still count as "quality kept"
LOSS_TOL = 0.05  # for a loss-like quality metric (lower is better): at most 5 % (relative) above the baseline

NOTEBOOKS = {
    1: "01_transformer", 2: "02_gradient_checkpointing", 3: "03_reversible_layers", 4: "04_parameter_sharing",
    5: "05_pruning", 6: "06_distillation", 7: "07_mixed_precision", 8: "08_quantization", 9: "09_micro_batching",
    10: "10_mixture_of_experts", 11: "11_electra", 12: "12_initialization", 13: "13_architecture_search",
    14: "14_conditional_computing", 15: "15_sparse_attention", 16: "16_learned_sparse_attention",
    17: "17_low_rank_attention", 18: "18_kernel_attention", 19: "19_memory_efficient_attention",
    20: "20_architectural_changes", 21: "21_capstone",
}
# the headings of notebook 21 that each answer links to (JupyterLab and nbconvert both make "N.-Words-of-the-title")
ANCHORS = {"lra": "1.-The-mini-Long-Range-Arena", "grid": "5.-The-trade-off-explorer",
           "decode": "4.-Decoding-one-token-at-a-time", "guide": "6.-The-decision-guide"}
RESULTS_LINK = "data/results/capstone.json"
CHAPTER_FILES = ("quantization", "pruning", "distillation")

# chapter of each family / technique (for the chapters cell)
FAMILY_CHAPTERS = {"baseline": [1], "exact": [19], "fixed sparse": [15], "learned sparse": [16], "low rank": [17],
                   "kernel": [18]}

# the survey's rows (outline §9.3) that the capstone does not measure: stated, with their source, never invented
SURVEY_SAYS = [
    ("Training OOM from model size", "micro-batching / pipeline (GPipe), mixed precision, parameter sharing",
     "survey outline §9.3 [N2]", [9, 7, 4]),
    ("Long autoregressive streams", "Transformer-XL / Compressive memory", "survey outline §9.3 [N2]", [20]),
    ("More capacity at the same FLOPs", "MoE (Switch)", "survey outline §9.3 [N2]", [10]),
    ("Limited pre-training budget", "ELECTRA-style RTD objective; Admin / T-Fixup for stable deep training",
     "survey outline §9.3 [N2]", [11, 12]),
    ("Variable-difficulty inputs", "conditional computing (ACT/Universal, depth-adaptive, adaptive span)",
     "survey outline §9.3 [N2]", [14]),
]

# the survey's rows the capstone can measure (replaced by the measured answer when the results have it)
SURVEY_MEASURABLE = [
    ("Training OOM from activations, any sequence length", "gradient checkpointing → reversible layers",
     "survey outline §9.3 [O/N2, N1]", [2, 3]),
    ("Long sequences, need accuracy", "sparse attention (BigBird/Longformer-type)", "survey outline §9.3 [N1, O]",
     [15]),
    ("Long sequences, need speed", "kernel attention (Performer / Linear Transformer)",
     "survey outline §9.3 [N1, O]", [18]),
    ("Long sequences, need lowest memory", "low-rank (Linformer / Nyströmformer)", "survey outline §9.3 [N1, O]",
     [17]),
]

NOT_MEASURED = "not measured"


def _chapters(numbers):
    return [(n, NOTEBOOKS[n]) for n in sorted(set(numbers)) if n in NOTEBOOKS]


def _rec(question, answer, evidence, chapters, source, measured=True):
    return {"question": question, "answer": answer, "evidence": evidence, "chapters": _chapters(chapters),
            "source": source, "measured": measured}


def _lower_is_better(metric):
    m = (metric or "").lower()
    return any(w in m for w in ("loss", "perplexity", "ppl", "error"))


def _metric_name(metric):
    """A grid row's ``quality_metric`` in one word for the evidence sentence (the full text is in the results)."""
    m = (metric or "").lower()
    return "accuracy" if "accuracy" in m else "loss" if _lower_is_better(m) else "quality"


def quality_kept(quality, baseline, metric="accuracy"):
    """Is ``quality`` within the tolerance of ``baseline``? Accuracy-like metrics: ≥ baseline − QUALITY_TOL;
    loss-like metrics (name contains loss/perplexity/error): ≤ baseline·(1 + LOSS_TOL)."""
    if quality is None or baseline is None:
        return False
    if _lower_is_better(metric):
        return quality <= baseline * (1 + LOSS_TOL) + 1e-12
    return quality >= baseline - QUALITY_TOL - 1e-12


def _fmt_ratio(r):
    return f"{r:,.0f}×" if r >= 100 else f"{r:.1f}×"


def _fmt_ms(x):
    return f"{x:.3g} ms" if x < 1000 else f"{x / 1000:.3g} s"


def _lengths(lra):
    lengths = lra.get("settings", {}).get("lengths")
    if not lengths:
        lengths = sorted({r["seq_len"] for r in lra.get("runs", []) if "seq_len" in r})
    return sorted(int(n) for n in lengths)


def _family_chapters(variants, name):
    """The variant's own chapter (results' ``variants[name]["chapter"]``), else its family's."""
    v = variants.get(name, {})
    if isinstance(v.get("chapter"), int) and v["chapter"] in NOTEBOOKS:
        return [v["chapter"]]
    return list(FAMILY_CHAPTERS.get(v.get("family"), []))


# ------------------------------------------------------------------------------------------------------------------
# 1. long sequences on a CPU, for inference (lra)
# ------------------------------------------------------------------------------------------------------------------

Q_LONG_INFER = "Long sequences on a CPU, for inference"
Q_TRAIN_MEM = "Training memory on one GPU"
Q_PHONE = "Smallest model for a phone"
Q_DECODE = "Fastest decoding"


def _long_inference(results):
    q, src = Q_LONG_INFER, "lra: runs (task-mean accuracy at the short length, median infer_ms at the long length)"
    lra = results.get("lra") if isinstance(results, dict) else None
    if not isinstance(lra, dict) or not lra.get("runs"):
        return _rec(q, NOT_MEASURED, "no mini-LRA results (lra section missing)", [21], src)
    lengths = _lengths(lra)
    short, long = lengths[0], lengths[-1]
    s_short, s_long = lra_summary(results, short), lra_summary(results, long)
    dense_acc = s_short.get("dense", {}).get("accuracy")
    if dense_acc is None:
        return _rec(q, NOT_MEASURED, f"dense has no accuracy at n = {short}: no reference for 'quality kept'",
                    [21], src)
    cands = [(s_long[n]["infer_ms"], n) for n, s in s_short.items()
             if n in s_long and s_long[n]["infer_ms"] is not None and quality_kept(s["accuracy"], dense_acc)]
    if not cands:
        return _rec(q, NOT_MEASURED, f"no variant kept accuracy within {QUALITY_TOL} of dense's {dense_acc:.3f} "
                                     f"and ran at n = {long}", [21], src)
    ms, best = min(cands)
    variants = lra.get("variants", {})
    acc = s_short[best]["accuracy"]
    dense_ms = s_long.get("dense", {}).get("infer_ms")
    vs = (f"vs dense {_fmt_ms(dense_ms)} ({dense_ms / ms:.1f}×)" if dense_ms else "(dense cannot run there)")
    note = variants.get(best, {}).get("note")
    label = f"{best} ({note})" if note and len(note) < 40 else best
    ev = (f"at n = {long}, {label} infers in {_fmt_ms(ms)} {vs}, at accuracy {acc:.3f} vs dense {dense_acc:.3f} "
          f"(n = {short})")
    chance = chance_level(results, short)
    if chance is not None and dense_acc <= chance + CHANCE_MARGIN:
        ev += f"; dense itself is at or below chance ({chance:.2f}) there, so 'quality kept' says little"
    return _rec(q, best, ev, _family_chapters(variants, best) + [21], src)


# ------------------------------------------------------------------------------------------------------------------
# 2. training memory (grid, mode train) and 3. smallest model (grid inference rows + chapters)
# ------------------------------------------------------------------------------------------------------------------

def combination(row):
    """A grid row's combination in words: ``"local + checkpointing + bf16 + int8"``."""
    parts = [row.get("attention", "?")]
    if row.get("checkpointing"):
        parts.append("checkpointing")
    if row.get("precision") and row.get("precision") != "fp32":
        parts.append(row["precision"])
    if row.get("int8"):
        parts.append("int8")
    return " + ".join(parts)


def _combination_chapters(row, variants=None):
    ch = list(_family_chapters(variants or {}, row.get("attention"))) or ([1] if row.get("attention") == "dense"
                                                                          else [])
    if row.get("checkpointing"):
        ch.append(2)
    if row.get("precision") and row.get("precision") != "fp32":
        ch.append(7)
    if row.get("int8"):
        ch.append(8)
    return ch


def _is_plain(row):
    return (row.get("attention") == "dense" and not row.get("checkpointing") and row.get("precision") == "fp32"
            and not row.get("int8"))


def _grid_rows(results, mode):
    grid = results.get("grid") if isinstance(results, dict) else None
    if not isinstance(grid, dict) or not grid.get("rows"):
        return None
    return [r for r in grid["rows"] if r.get("mode") == mode and r.get("status") == "ok"]


def _baseline(rows, metric):
    plain = [r for r in rows if _is_plain(r) and r.get("quality") is not None]
    if plain:
        return plain[0]
    return None


def _training_memory(results):
    q, src = Q_TRAIN_MEM, "grid: rows with mode 'train' at the longest length (peak_mib, quality)"
    rows = _grid_rows(results, "train")
    if not rows:
        return _rec(q, NOT_MEASURED, "no training rows in the trade-off grid (grid section missing)", [2, 7, 21], src)
    n = max(r["seq_len"] for r in rows)
    rows = [r for r in rows if r["seq_len"] == n and r.get("peak_mib") is not None]
    devices = sorted({r.get("device", "cpu") for r in rows})
    device = "cuda" if "cuda" in devices else devices[0] if devices else "cpu"
    rows = [r for r in rows if r.get("device", "cpu") == device]
    metric = rows[0].get("quality_metric", "accuracy") if rows else "accuracy"
    base = _baseline(rows, metric)
    if base is None:
        return _rec(q, NOT_MEASURED, f"no plain dense fp32 training row with a quality at n = {n}", [2, 7, 21], src)
    kept = [r for r in rows if quality_kept(r.get("quality"), base["quality"], metric)]
    best = min(kept, key=lambda r: (r["peak_mib"], r.get("step_ms") or 0.0))
    where = "on CUDA" if device == "cuda" else "here on the CPU (no GPU in this run: the same allocations a GPU " \
                                               "would hold)"
    ratio = base["peak_mib"] / best["peak_mib"] if best["peak_mib"] else float("inf")
    ev = (f"at n = {n}, measured {where}, {combination(best)} peaks at {best['peak_mib']:.1f} MiB vs plain dense fp32 "
          f"{base['peak_mib']:.1f} MiB ({ratio:.1f}× less), {_metric_name(metric)} {best['quality']:.3f} vs "
          f"{base['quality']:.3f}")
    variants = results.get("lra", {}).get("variants", {}) if isinstance(results.get("lra"), dict) else {}
    return _rec(q, combination(best), ev, _combination_chapters(best, variants) + [21], src)


def _chapter_smallest(chapter_results):
    """Candidates from the chapters' results: (bytes_ratio, label, evidence, chapter)."""
    out = []
    cr = chapter_results or {}
    qz = (cr.get("quantization") or {}).get("tiny")
    if qz and qz.get("float"):
        fb, fa = qz["float"]["bytes"], qz["float"]["accuracy"]
        cands = [(e["bytes"], f"{e['bits']}-bit PTQ ({e['scheme']})", e["accuracy"], f"{e['bits']}-bit PTQ")
                 for e in qz.get("ptq", [])]
        cands += [(e["bytes"], f"iPQ (blocks of {e['block_size']}, {e['n_centroids']} centroids, "
                               f"{e.get('finetune_steps_per_layer', 0)} fine-tune steps/layer)", e["accuracy"], "iPQ")
                  for e in qz.get("ipq", [])]
        kept = [c for c in cands if quality_kept(c[2], fa)]
        if kept:
            b, label, acc, short = min(kept, key=lambda c: (c[0], -c[2]))
            out.append((b / fb, short, f"chapter 8: {label} stores the tiny model in {b / 1024:.1f} KiB vs "
                                       f"{fb / 1024:.1f} KiB float ({fb / b:.1f}×), accuracy {acc:.3f} vs {fa:.3f}", 8))
    pr = (cr.get("pruning") or {}).get("tiny")
    if pr and pr.get("unstructured"):
        u, da = pr["unstructured"], pr["dense_accuracy"]
        accs = u.get("accuracy_finetuned") or u.get("accuracy")
        kept = [(s, a) for s, a in zip(u["sparsity"], accs) if quality_kept(a, da)]
        if kept:
            s, a = max(kept)
            out.append((1 - s, f"{s:.0%} pruning",
                        f"chapter 5: {s:.0%} of the weights pruned (fine-tuned) keeps accuracy {a:.3f} vs {da:.3f} "
                        f"(nonzero weights {1 - s:.0%}; stored sparse)", 5))
    ds = (cr.get("distillation") or {}).get("tiny")
    if ds and ds.get("depth") and ds.get("teacher"):
        ta, tp = ds["teacher"]["val_acc"], ds["teacher"]["params"]
        kept = [d for d in ds["depth"] if quality_kept(d.get("kd"), ta)]
        if kept:
            d = min(kept, key=lambda d: d["params"])
            out.append((d["params"] / tp, f"{d['depth']}-layer distilled student",
                        f"chapter 6: a {d['depth']}-layer distilled student has {d['params']:,} parameters vs the "
                        f"teacher's {tp:,} ({tp / d['params']:.1f}×), accuracy {d['kd']:.3f} vs {ta:.3f}", 6))
    return out


def _smallest_model(results, chapter_results):
    q = Q_PHONE
    src = "grid: rows with mode 'inference' (model_mib, quality)"
    parts, evidence, chapters, answer = [], [], [], None
    rows = _grid_rows(results, "inference")
    if rows:
        metric = rows[0].get("quality_metric", "accuracy")
        by_len = {}
        for r in rows:
            by_len.setdefault(r["seq_len"], []).append(r)
        cands = []
        for n, rs in by_len.items():
            base = _baseline(rs, metric)
            if base is None:
                continue
            cands += [(r["model_mib"], r.get("step_ms") or 0.0, n, r, base) for r in rs
                      if r.get("model_mib") is not None and quality_kept(r.get("quality"), base["quality"], metric)]
        if cands:
            mib, _, n, best, base = min(cands, key=lambda c: (c[0], c[1], -c[2]))
            answer = combination(best)
            evidence.append(f"{answer} weighs {mib:.2f} MiB vs dense fp32 {base['model_mib']:.2f} MiB "
                            f"({base['model_mib'] / mib:.1f}×) at {_metric_name(metric)} {best['quality']:.3f} vs "
                            f"{base['quality']:.3f} (grid, n = {n})")
            chapters += _combination_chapters(best) + [21]
    ch = _chapter_smallest(chapter_results)
    if ch:
        src += "; " + ", ".join(f"data/results/{f}.json" for f in CHAPTER_FILES if (chapter_results or {}).get(f))
        ch.sort(key=lambda c: c[0])
        parts = [c[1] for c in ch]
        evidence += [c[2] for c in ch]
        chapters += [c[3] for c in ch]
        answer = "; ".join(([answer] if answer else []) + parts)
    if not evidence:
        return _rec(q, NOT_MEASURED, "no inference rows in the grid and no chapter results given", [5, 6, 8, 21], src)
    return _rec(q, answer, "; ".join(evidence), chapters, src)


# ------------------------------------------------------------------------------------------------------------------
# 4. fastest decoding (decode)
# ------------------------------------------------------------------------------------------------------------------

def _fastest_decoding(results):
    q, src = Q_DECODE, "decode: rows at the longest context (ms_per_token, peak_mib)"
    dec = results.get("decode") if isinstance(results, dict) else None
    rows = [r for r in (dec or {}).get("rows", []) if r.get("ms_per_token") is not None]
    if not rows:
        return _rec(q, NOT_MEASURED, "no decoding rows (decode section missing)", [18, 21], src)
    t = max(r["context"] for r in rows)
    at = {r["method"]: r for r in rows if r["context"] == t}
    best = min(at.values(), key=lambda r: r["ms_per_token"])
    ev = f"after t = {t} tokens, {best['method']} takes {_fmt_ms(best['ms_per_token'])}/token " \
         f"({best['peak_mib']:.2f} MiB)"
    others = [m for m in ("dense (recompute)", "dense + KV cache") if m in at and m != best["method"]]
    if others:
        ev += " vs " + ", ".join(f"{m} {_fmt_ms(at[m]['ms_per_token'])} ({_fmt_ratio(at[m]['ms_per_token'] / best['ms_per_token'])},"
                                 f" {at[m]['peak_mib']:.2f} MiB)" for m in others)
    chapters = [best.get("chapter")] if isinstance(best.get("chapter"), int) else []
    return _rec(q, best["method"], ev, chapters + [21], src)


# ------------------------------------------------------------------------------------------------------------------
# the survey's other rows, where the results give evidence
# ------------------------------------------------------------------------------------------------------------------

def _lra_extremes(results):
    """Long sequences: need accuracy / speed / lowest memory — the best variant at the long length."""
    out = []
    lra = results.get("lra") if isinstance(results, dict) else None
    if not isinstance(lra, dict) or not lra.get("runs"):
        return out
    long = _lengths(lra)[-1]
    s = lra_summary(results, long)
    variants = lra.get("variants", {})
    dense = s.get("dense", {})
    src = f"lra: runs at n = {long}"
    for question, key, higher, what, survey in (
            ("Long sequences, need accuracy", "accuracy", True, "task-mean accuracy", "sparse (BigBird/Longformer)"),
            ("Long sequences, need speed", "train_step_ms", False, "median training step", "kernel (Performer / "
                                                                                           "Linear Transformer)"),
            ("Long sequences, need lowest memory", "train_peak_mib", False, "training peak", "low rank (Linformer)")):
        n_at, s_at, dense_at, note = long, s, dense, ""
        if key == "accuracy":
            # accuracy only ranks variants where something was learned: the longest length at which the best
            # variant is above chance + CHANCE_MARGIN (at chance, the ranking is noise)
            n_at = None
            for L in reversed(_lengths(lra)):
                sL = lra_summary(results, L)
                accs = [v["accuracy"] for v in sL.values() if v.get("accuracy") is not None]
                chance = chance_level(results, L)
                if accs and chance is not None and max(accs) > chance + CHANCE_MARGIN:
                    n_at, s_at, dense_at = L, sL, sL.get("dense", {})
                    break
            if n_at is None:
                out.append(_rec(question, NOT_MEASURED, "every variant is at chance at every length: this run's "
                                "budget separates no variant by accuracy", [21], "lra", measured=False))
                continue
            if n_at != long:
                note = f" (at n = {long} every variant is at chance: nothing was learned with this budget)"
        vals = {n: v[key] for n, v in s_at.items() if v.get(key) is not None}
        if not vals:
            continue
        best = (max if higher else min)(vals, key=vals.get)
        fam = variants.get(best, {}).get("family", "?")
        fmt = (lambda x: f"{x:.3f}") if key == "accuracy" else (
            _fmt_ms if key == "train_step_ms" else (lambda x: f"{x:.1f} MiB"))
        ev = f"at n = {n_at}, {best} ({fam}) has the best {what}: {fmt(vals[best])}"
        if dense_at.get(key) is not None and best != "dense":
            ev += f" vs dense {fmt(dense_at[key])}"
        ties = [n for n in vals if n != best and abs(vals[n] - vals[best]) <= 1e-9]
        if ties:
            ev += f" (tied with {', '.join(ties)})"
        ev += note
        out.append(_rec(question, f"{best} ({fam})", ev + f"; the survey says {survey}",
                        _family_chapters(variants, best) + [21], src))
    return out


def _checkpointing(results):
    rows = _grid_rows(results, "train")
    if not rows:
        return None
    n = max(r["seq_len"] for r in rows)
    on = {(r["attention"], r["precision"], r.get("int8"), r.get("device")): r for r in rows
          if r["seq_len"] == n and r.get("checkpointing") and r.get("peak_mib")}
    off = {(r["attention"], r["precision"], r.get("int8"), r.get("device")): r for r in rows
           if r["seq_len"] == n and not r.get("checkpointing") and r.get("peak_mib")}
    key = ("dense", "fp32", False, next(iter({k[3] for k in on} or {"cpu"})))
    if key not in on or key not in off:
        common = sorted(set(on) & set(off), key=str)
        if not common:
            return None
        key = common[0]
    a, b = off[key], on[key]
    ev = (f"at n = {n}, {key[0]} {key[1]} training peaks at {b['peak_mib']:.1f} MiB with checkpointing vs "
          f"{a['peak_mib']:.1f} MiB without ({a['peak_mib'] / b['peak_mib']:.1f}× less)")
    if a.get("step_ms") and b.get("step_ms"):
        ev += f", at {b['step_ms'] / a['step_ms']:.2f}× the step time"
    return _rec("Training OOM from activations, any sequence length", "gradient checkpointing", ev, [2, 3, 21],
                f"grid: train rows at n = {n}, checkpointing on vs off")


def recommendations(results, *, chapter_results=None):
    """The decision guide as a list of dicts ``{"question", "answer", "evidence", "chapters", "source",
    "measured"}`` computed from a capstone ``results`` dict (sections may be missing: the answer then says
    "not measured") and, for deployment size, ``chapter_results`` (:func:`load_chapter_results`).
    ``chapters`` is a list of ``(number, notebook stem)``. The first four answer the issue's questions; measured
    rows of the survey's §9.3 follow; ``measured=False`` rows are what the survey says, unmeasured here."""
    if results is None:
        results = {}
    if not isinstance(results, dict):
        raise TypeError(f"recommendations: results must be a dict (a capstone results file), got "
                        f"{type(results).__name__}")
    if chapter_results is not None and not isinstance(chapter_results, dict):
        raise TypeError(f"recommendations: chapter_results must be a dict or None, got "
                        f"{type(chapter_results).__name__}")
    recs = [_long_inference(results), _training_memory(results), _smallest_model(results, chapter_results),
            _fastest_decoding(results)]
    recs += _lra_extremes(results)
    ck = _checkpointing(results)
    if ck is not None:
        recs.append(ck)
    measured = {r["question"] for r in recs}
    for question, answer, source, chapters in SURVEY_MEASURABLE + SURVEY_SAYS:
        if question in measured:
            continue
        recs.append(_rec(question, answer, "not measured in the capstone: the survey's recommendation", chapters,
                         source, measured=False))
    return recs


def load_chapter_results(directory=None):
    """The chapters' committed results used by the guide: ``{name: dict}`` for quantization, pruning,
    distillation (those that exist) under ``directory`` (default data/results/)."""
    d = Path(directory) if directory is not None else ROOT / "data" / "results"
    out = {}
    for name in CHAPTER_FILES:
        p = d / f"{name}.json"
        if p.exists():
            out[name] = json.loads(p.read_text(encoding="utf-8"))
    return out


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _chapter_links(rec, link_style):
    links = []
    for n, stem in rec["chapters"]:
        if n == 21:
            continue
        links.append(f"[{n}](notebooks/{stem}.ipynb)" if link_style == "repo" else f"[{n}]({stem}.html)")
    if rec["measured"]:
        section = rec["source"].split(":")[0]
        anchor = ANCHORS.get(section, ANCHORS["guide"])
        if link_style == "repo":
            links.append(f"[21 § {section}](notebooks/{NOTEBOOKS[21]}.ipynb#{anchor})")
            links.append(f"[results]({RESULTS_LINK})")
        else:
            links.append(f"[21 § {section}]({NOTEBOOKS[21]}.html#{anchor})")
    return ", ".join(links)


def guide_markdown(results, *, link_style="repo", chapter_results=None):
    """The decision guide as markdown: a caption with the tolerances, a table question | answer | evidence |
    chapters (measured), then the survey's unmeasured rows. ``link_style``: ``"repo"`` (links to
    ``notebooks/NN_x.ipynb`` and the results file, for the README) or ``"site"`` (``NN_x.html``)."""
    if link_style not in ("repo", "site"):
        raise ValueError(f"guide_markdown: link_style must be 'repo' or 'site', got {link_style!r}")
    recs = recommendations(results, chapter_results=chapter_results)
    machine = (results or {}).get("cpu") or ((results or {}).get("env") or {}).get("cpu") or "this machine"
    lines = [f"Computed by `effedu.capstone.guide` from the capstone results ({machine}"
             + (", quick run" if (results or {}).get("quick") else "") + "). \"Quality kept\" means accuracy at "
             f"most {QUALITY_TOL:g} below the baseline's (a loss-like metric: at most {LOSS_TOL:.0%} above it); "
             "times are medians on this machine.", "",
             "| question | answer | evidence | chapters |", "|---|---|---|---|"]
    for r in recs:
        if r["measured"]:
            lines.append(f"| {_cell(r['question'])} | {_cell(r['answer'])} | {_cell(r['evidence'])} | "
                         f"{_chapter_links(r, link_style)} |")
    lines += ["", "The survey says (not measured in the capstone):", "",
              "| constraint | first things to try | source | chapters |", "|---|---|---|---|"]
    for r in recs:
        if not r["measured"]:
            lines.append(f"| {_cell(r['question'])} | {_cell(r['answer'])} | {_cell(r['source'])} | "
                         f"{_chapter_links(r, link_style)} |")
    return "\n".join(lines) + "\n"


__all__ = ["recommendations", "guide_markdown", "load_chapter_results", "quality_kept", "combination",
           "QUALITY_TOL", "LOSS_TOL", "NOTEBOOKS", "ANCHORS", "SURVEY_SAYS", "NOT_MEASURED", "Q_LONG_INFER",
           "Q_TRAIN_MEM", "Q_PHONE", "Q_DECODE"]
