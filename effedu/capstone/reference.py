"""Tay et al. 2020, "Long Range Arena" (LRA), Tables 1–2 — the numbers the survey's conclusion rests on — and the
same picture drawn from this machine's mini-LRA.

The survey (§5–6): "sparse attention is the best performing approach, kernel attention is the fastest, and
low-rank factorization is the lightest". :data:`TABLE1` (test accuracy, %) and :data:`TABLE2` (training steps/s
and peak memory, GB per device) are copied from the LRA paper as transcribed in the course's survey outline §6.
:func:`tay_bubble_chart` draws them as LRA's bubble figure; :func:`bubble_chart` draws ours from a capstone results
file; :func:`agreement` says, claim by claim, whether our numbers agree.
"""
from __future__ import annotations

import math
import statistics

from ..viz import log_scale, new_figure

SOURCE = ("Tay, Dehghani, Abnar, Shen, Bahri, Pham, Rao, Yang, Ruder, Metzler 2020, \"Long Range Arena: A Benchmark "
          "for Efficient Transformers\", Tables 1–2 (via the survey outline §6)")

TASKS = ("ListOps", "Text", "Retrieval", "Image", "Pathfinder")

# Table 1: test accuracy (%); Path-X: every model FAILs; Avg excludes Path-X.
TABLE1 = {
    # model:            ListOps  Text   Retrieval Image  Pathfinder  Avg
    "Transformer":     (36.37, 64.27, 57.46, 42.44, 71.40, 54.39),
    "Local Attention": (15.82, 52.98, 53.39, 41.46, 66.63, 46.06),
    "Sparse Trans.":   (17.07, 63.58, 59.59, 44.24, 71.71, 51.24),
    "Longformer":      (35.63, 62.85, 56.89, 42.22, 69.71, 53.46),
    "Linformer":       (35.70, 53.94, 52.27, 38.56, 76.34, 51.36),
    "Reformer":        (37.27, 56.10, 53.40, 38.07, 68.50, 50.67),
    "Sinkhorn Trans.": (33.67, 61.20, 53.83, 41.23, 67.45, 51.39),
    "Synthesizer":     (36.99, 61.68, 54.67, 41.61, 69.45, 52.88),
    "BigBird":         (36.05, 64.02, 59.29, 40.83, 74.87, 55.01),
    "Linear Trans.":   (16.13, 65.90, 53.09, 42.34, 75.30, 50.55),
    "Performer":       (18.01, 65.40, 53.82, 42.77, 77.05, 51.41),
}
TABLE1_COLUMNS = TASKS + ("Avg",)
PATH_X = "FAIL"  # every model, Table 1
# as printed: Sinkhorn's Avg (51.39) is not the mean of its five tasks (51.48); the table is copied, not corrected
TABLE1_AVG_AS_PRINTED = {"Sinkhorn Trans.": 51.476}

LENGTHS = (1024, 2048, 3072, 4096)  # Table 2's columns 1K … 4K
# Table 2: training steps/s at 1K, 2K, 3K, 4K (speed-up vs Transformer in parentheses in the paper)
STEPS_PER_S = {
    "Transformer":     (8.1, 4.9, 2.3, 1.4),
    "Local Attention": (9.2, 8.4, 7.4, 7.4),
    "Linformer":       (9.3, 9.1, 8.5, 7.7),
    "Reformer":        (4.4, 2.2, 1.5, 1.1),
    "Sinkhorn Trans.": (9.1, 7.9, 6.6, 5.3),
    "Synthesizer":     (8.7, 5.7, 6.6, 1.9),
    "BigBird":         (7.4, 3.9, 2.7, 1.5),
    "Linear Trans.":   (9.1, 9.3, 8.6, 7.8),
    "Performer":       (9.5, 9.4, 8.7, 8.0),
}
# the speed-ups as printed in Table 2 (Transformer = 1)
SPEEDUP = {
    "Transformer":     (1.0, 1.0, 1.0, 1.0),
    "Local Attention": (1.1, 1.7, 3.2, 5.3),
    "Linformer":       (1.2, 1.9, 3.7, 5.5),
    "Reformer":        (0.5, 0.4, 0.7, 0.8),
    "Sinkhorn Trans.": (1.1, 1.6, 2.9, 3.8),
    "Synthesizer":     (1.1, 1.2, 2.9, 1.4),
    "BigBird":         (0.9, 0.8, 1.2, 1.1),
    "Linear Trans.":   (1.1, 1.9, 3.7, 5.6),
    "Performer":       (1.2, 1.9, 3.8, 5.7),
}
# peak memory (GB per device) at 1K, 2K, 3K, 4K
MEMORY_GB = {
    "Transformer":     (0.85, 2.65, 5.51, 9.48),
    "Local Attention": (0.42, 0.76, 1.06, 1.37),
    "Linformer":       (0.37, 0.55, 0.99, 0.99),
    "Reformer":        (0.48, 0.99, 1.53, 2.28),
    "Sinkhorn Trans.": (0.47, 0.83, 1.13, 1.48),
    "Synthesizer":     (0.65, 1.98, 4.09, 6.99),
    "BigBird":         (0.77, 1.49, 2.18, 2.88),
    "Linear Trans.":   (0.37, 0.57, 0.80, 1.03),
    "Performer":       (0.37, 0.59, 0.82, 1.06),
}
TABLE2_SETUP = "byte-level Text task, batch size 32, 4×4 TPU v3"
TABLE2_ABSENT = {
    "Sparse Trans.": "excluded: its mask-based implementation has no custom kernel",
    "Longformer": "excluded: its mask-based implementation has no custom kernel",
}

# the survey's reading: each LRA model → family
LRA_FAMILY = {
    "Transformer": "baseline",
    "Local Attention": "fixed sparse",
    "Sparse Trans.": "fixed sparse",
    "Longformer": "fixed sparse",
    "BigBird": "fixed sparse",
    "Reformer": "learned sparse",
    "Sinkhorn Trans.": "learned sparse",
    "Linformer": "low rank",
    "Synthesizer": "low rank",
    "Linear Trans.": "kernel",
    "Performer": "kernel",
}
# each LRA model → our registry name (effedu.attention.available())
OURS = {
    "Transformer": "dense",
    "Local Attention": "local",
    "Sparse Trans.": "strided",
    "Longformer": "longformer",
    "Linformer": "linformer",
    "Reformer": "lsh",
    "Sinkhorn Trans.": "sinkhorn",
    "Synthesizer": "synthesizer_dense",
    "BigBird": "bigbird",
    "Linear Trans.": "linear",
    "Performer": "performer",
}

# one colour per family, everywhere (our families include "exact": memory-efficient/entmax, same math as dense)
FAMILIES = ("baseline", "exact", "fixed sparse", "learned sparse", "low rank", "kernel")
FAMILY_COLORS = dict(zip(FAMILIES, ("#444444", "#8c564b", "#1f77b4", "#2ca02c", "#ff7f0e", "#d62728")))
# the survey's families ("sparse" = fixed or learned sparse)
SURVEY_FAMILY = {"fixed sparse": "sparse", "learned sparse": "sparse", "low rank": "low rank", "kernel": "kernel",
                 "baseline": "baseline", "exact": "exact"}


def _length_index(seq_len, where):
    if seq_len not in LENGTHS:
        raise ValueError(f"{where}: seq_len must be one of {LENGTHS} (Table 2's columns), got {seq_len!r}")
    return LENGTHS.index(seq_len)


def _legend_families(ax, families):
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", ls="", color=FAMILY_COLORS.get(f, "#777777"), alpha=0.6, markersize=9,
                      label=f) for f in families]
    ax.legend(handles=handles, title="family", loc="best", fontsize=8, title_fontsize=8)


def _figure_ax(ax, where):
    if ax is None:
        fig = new_figure(7.5, 5.0)
        return fig, fig.add_subplot(1, 1, 1)
    if not hasattr(ax, "figure") or not hasattr(ax, "scatter"):
        raise TypeError(f"{where}: ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax.figure, ax


# label offsets (points) where Tay et al.'s bubbles sit on top of each other
_TAY_LABEL_OFFSETS = {"Linformer": (-14, 6, "right"), "Performer": (14, 6, "left"), "Linear Trans.": (0, -16, "center"),
                      "BigBird": (0, 22, "center"), "Transformer": (0, -10, "center")}


def tay_bubble_chart(ax=None, seq_len=4096):
    """Tay et al.'s LRA bubble figure from Tables 1–2: average accuracy (y) × training speed-up over the
    Transformer at ``seq_len`` (x) × peak memory (bubble area), coloured by family. Returns the Figure.
    Sparse Trans. and Longformer have no Table 2 entry (no custom kernel) and are left out."""
    where = "tay_bubble_chart"
    i = _length_index(seq_len, where)
    fig, ax = _figure_ax(ax, where)
    biggest = max(v[i] for v in MEMORY_GB.values())
    for model, steps in STEPS_PER_S.items():
        fam = LRA_FAMILY[model]
        x, y, mem = steps[i] / STEPS_PER_S["Transformer"][i], TABLE1[model][-1], MEMORY_GB[model][i]
        ax.scatter([x], [y], s=2000 * mem / biggest, color=FAMILY_COLORS[fam], alpha=0.5, edgecolors="black")
        dx, dy, ha = _TAY_LABEL_OFFSETS.get(model, (0, 0, "center"))
        ax.annotate(f"{model}\n{mem:.2f} GB", (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                    ha=ha, va="center")
    ax.set_xlabel(f"training speed-up over the Transformer at {seq_len} tokens (steps/s ÷ Transformer's)")
    ax.set_ylabel("LRA average accuracy (%), Path-X excluded")
    ax.set_title(f"Tay et al. 2020, LRA Tables 1–2 at {seq_len // 1024}K: bubble area ∝ peak memory\n"
                 f"({TABLE2_SETUP}; Sparse Trans. and Longformer not timed)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    _legend_families(ax, [f for f in FAMILIES if f in set(LRA_FAMILY.values())])
    return fig


def _lra_section(results, where):
    if not isinstance(results, dict):
        raise TypeError(f"{where}: results must be a capstone results dict, got {type(results).__name__}")
    lra = results.get("lra")
    if not isinstance(lra, dict) or "runs" not in lra:
        raise ValueError(f"{where}: results has no 'lra' section with 'runs'")
    return lra


def lra_summary(results, seq_len, task=None):
    """Per variant at ``seq_len`` (ok runs only; means over seeds, tasks averaged unless ``task``):
    ``{variant: {"family", "accuracy", "train_step_ms", "infer_ms", "train_peak_mib", "infer_peak_mib", "n"}}``.
    Accuracy is the mean over tasks of the mean over seeds; times/memory are the median over the runs."""
    where = "lra_summary"
    lra = _lra_section(results, where)
    variants = lra.get("variants", {})
    per = {}
    for r in lra["runs"]:
        if r.get("seq_len") != seq_len or r.get("status") != "ok" or (task is not None and r.get("task") != task):
            continue
        per.setdefault(r["variant"], []).append(r)
    out = {}
    for name, runs in per.items():
        by_task = {}
        for r in runs:
            if r.get("accuracy") is not None:
                by_task.setdefault(r["task"], []).append(r["accuracy"])
        acc = statistics.fmean(statistics.fmean(v) for v in by_task.values()) if by_task else None

        def med(key, runs=runs):
            vals = [r[key] for r in runs if r.get(key) is not None]
            return statistics.median(vals) if vals else None

        out[name] = {"family": variants.get(name, {}).get("family", "unknown"), "accuracy": acc,
                     "train_step_ms": med("train_step_ms"), "infer_ms": med("infer_ms"),
                     "train_peak_mib": med("train_peak_mib"), "infer_peak_mib": med("infer_peak_mib"),
                     "n": len(runs)}
    return out


def chance_level(results, seq_len, task=None):
    """Mean chance accuracy of the tasks run at ``seq_len`` (or of ``task``); None when unknown."""
    lra = _lra_section(results, "chance_level")
    tasks = lra.get("settings", {}).get("tasks", {}).get(str(seq_len))
    if tasks is None:
        tasks = sorted({r["task"] for r in lra["runs"] if r.get("seq_len") == seq_len})
    if task is not None:
        tasks = [task]
    chances = [lra.get("tasks", {}).get(t, {}).get("chance") for t in tasks]
    chances = [c for c in chances if c is not None]
    return statistics.fmean(chances) if chances else None


def bubble_chart(results, seq_len, ax=None, task=None, accuracy_at=None):
    """Our mini-LRA as LRA's bubble chart: mean accuracy over tasks (or ``task``) on y, training speed relative to
    dense (dense's train step ms ÷ the variant's) on x (log scale), bubble area ∝ training peak MiB, coloured by
    family, every variant labelled, the chance level as a dashed line. Returns the Figure.

    ``accuracy_at``: take the accuracy at that length instead (e.g. the short one, when nothing was learned at
    ``seq_len``); speed and memory stay those of ``seq_len``, and the axis label says so."""
    where = "bubble_chart"
    summary = lra_summary(results, seq_len, task=task)
    if not summary:
        raise ValueError(f"{where}: no 'ok' runs at seq_len={seq_len!r}" + (f" for task {task!r}" if task else ""))
    acc_len = seq_len if accuracy_at is None else accuracy_at
    if accuracy_at is not None:
        acc_summary = lra_summary(results, accuracy_at, task=task)
        if not acc_summary:
            raise ValueError(f"{where}: no 'ok' runs at accuracy_at={accuracy_at!r}")
        summary = {n: dict(s, accuracy=acc_summary.get(n, {}).get("accuracy")) for n, s in summary.items()}
    fig, ax = _figure_ax(ax, where)
    dense = summary.get("dense", {}).get("train_step_ms")
    pts = {n: s for n, s in summary.items() if s["accuracy"] is not None and s["train_step_ms"]}
    if not pts:
        raise ValueError(f"{where}: no run at seq_len={seq_len!r} has both an accuracy and a training step time")
    dense = dense if dense else None
    xs = {n: (dense / s["train_step_ms"] if dense else 1.0) for n, s in pts.items()}
    biggest = max((s["train_peak_mib"] or 0.0) for s in pts.values()) or 1.0
    for name, s in sorted(pts.items()):
        mem = s["train_peak_mib"] or 0.0
        ax.scatter([xs[name]], [s["accuracy"]], s=30 + 1500 * mem / biggest,
                   color=FAMILY_COLORS.get(s["family"], "#777777"), alpha=0.5, edgecolors="black")
    # labels: "name (MiB)", nudged up/down (in points) where they would sit on a neighbour's
    lx = {n: math.log10(x) for n, x in xs.items()}
    span_x = (max(lx.values()) - min(lx.values())) or 1.0
    accs = [s["accuracy"] for s in pts.values()]
    span_y = (max(accs) - min(accs)) or 1.0
    placed = []
    for name in sorted(pts, key=lambda n: lx[n]):
        s = pts[name]
        u, v = (lx[name] - min(lx.values())) / span_x, (s["accuracy"] - min(accs)) / span_y
        for level in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6, 7, -7, 8, -8):
            if not any(abs(u - pu) < 0.25 and abs(v - pv) < 0.06 and level == pl for pu, pv, pl in placed):
                break
        placed.append((u, v, level))
        mem = s["train_peak_mib"] or 0.0
        ax.annotate(f"{name} ({mem:.3g} MiB)", (xs[name], s["accuracy"]), xytext=(0, 8 * level),
                    textcoords="offset points", fontsize=6.5, ha="center", va="center")
    chance = chance_level(results, acc_len, task=task)
    if chance is not None:
        ax.axhline(chance, ls="--", color="gray", lw=1, label="chance")
        ax.annotate("chance", (1.0, chance), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=8, color="gray")
    lo, hi = min(xs.values()), max(xs.values())
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo / 2 <= t <= hi * 2] or None
    log_scale(ax, "x", ticks=ticks)
    ax.set_xlabel("training speed relative to dense (dense step ms ÷ step ms), log scale" if dense else
                  "training speed (dense not measured: all at 1)")
    ax.set_ylabel("accuracy" + (f" on {task}" if task else ", mean over tasks") + (
        f" (at n = {acc_len})" if acc_len != seq_len else ""))
    machine = results.get("cpu") or results.get("env", {}).get("cpu") or "this machine"
    ax.set_title(f"Mini-LRA at n = {seq_len}: accuracy × speed × memory (bubble area ∝ training peak MiB)"
                 + (f"; accuracy at n = {acc_len}" if acc_len != seq_len else "") + "\n"
                 f"measured on {machine}", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.margins(0.15, 0.25)
    _legend_families(ax, [f for f in FAMILIES if f in {s["family"] for s in pts.values()}])
    return fig


def _family_stats(summary):
    fam = {}
    for s in summary.values():
        f = SURVEY_FAMILY.get(s["family"])
        if f in ("sparse", "low rank", "kernel"):
            fam.setdefault(f, []).append(s)
    return fam


def _winner(values, higher, tol):
    """The family with the best value, or None when the best two are within ``tol`` (relative) of each other."""
    ranked = sorted(values.items(), key=lambda kv: -kv[1] if higher else kv[1])
    if not ranked:
        return None
    if len(ranked) > 1:
        a, b = ranked[0][1], ranked[1][1]
        if abs(a - b) <= tol * max(abs(a), abs(b), 1e-12):
            return None
    return ranked[0][0]


TIE = 0.02  # two families within 2 % (relative) of each other: undecided
CHANCE_MARGIN = 0.02  # a family "learned" when its mean accuracy is > chance + 2 points


def agreement(results, seq_len):
    """Do our numbers at ``seq_len`` agree with the survey's reading of LRA? One dict per claim:
    ``{"claim", "survey", "here", "agrees": True | False | None}``.

    Families (the survey's): sparse = our "fixed sparse" and "learned sparse" variants, low rank, kernel; dense
    and exact variants are the baseline and take no part. Over the variants with an ok run at ``seq_len``:

    * best performing = the family with the highest *mean over its members* of the task-mean accuracy; None when
      every family is within :data:`CHANCE_MARGIN` of chance (nothing learned) or the top two are within
      :data:`TIE` (relative);
    * fastest = the family with the lowest *median over its members* of the median training step (ms);
    * lightest = the family with the lowest median of the training peak MiB;
    * "Reformer slower than the Transformer": lsh's training step ms > dense's (None if either is missing).
    """
    summary = lra_summary(results, seq_len)
    fam = _family_stats(summary)
    chance = chance_level(results, seq_len)
    out = []

    acc = {f: statistics.fmean(s["accuracy"] for s in v if s["accuracy"] is not None)
           for f, v in fam.items() if any(s["accuracy"] is not None for s in v)}
    claim = {"claim": "sparse attention is the best performing", "survey": "sparse (BigBird 55.01, Longformer 53.46 "
             "average LRA accuracy, %)"}
    if not acc:
        claim.update(here="not measured (no sparse, low-rank or kernel run)", agrees=None)
    elif chance is not None and all(a <= chance + CHANCE_MARGIN for a in acc.values()):
        claim.update(here=f"undecidable: every family is at chance ({chance:.2f}): "
                          + ", ".join(f"{f} {a:.3f}" for f, a in sorted(acc.items())), agrees=None)
    else:
        w = _winner(acc, True, TIE)
        txt = ", ".join(f"{f} {a:.3f}" for f, a in sorted(acc.items(), key=lambda kv: -kv[1]))
        claim.update(here=(f"{w}: " if w else "a tie (top two within 2 %): ") + "mean accuracy " + txt,
                     agrees=None if w is None else w == "sparse")
    out.append(claim)

    for name, key, survey, want, unit in (
            ("kernel attention is the fastest", "train_step_ms",
             "kernel (Performer 8.0, Linear Trans. 7.8 steps/s at 4K)", "kernel", "ms per training step"),
            ("low-rank factorization is the lightest", "train_peak_mib",
             "low rank (Linformer 0.99 GB at 4K)", "low rank", "MiB training peak")):
        vals = {f: statistics.median(s[key] for s in v if s[key] is not None)
                for f, v in fam.items() if any(s[key] is not None for s in v)}
        claim = {"claim": name, "survey": survey}
        if not vals:
            claim.update(here="not measured", agrees=None)
        else:
            w = _winner(vals, False, TIE)
            txt = ", ".join(f"{f} {a:.3g}" for f, a in sorted(vals.items(), key=lambda kv: kv[1]))
            claim.update(here=(f"{w}: " if w else "a tie (top two within 2 %): ") + f"median {unit}: " + txt,
                         agrees=None if w is None else w == want)
        out.append(claim)

    dense, lsh = summary.get("dense", {}).get("train_step_ms"), summary.get("lsh", {}).get("train_step_ms")
    claim = {"claim": "Reformer is slower than the Transformer", "survey": "Reformer 1.1 vs Transformer 1.4 steps/s "
             "at 4K (0.8×)"}
    if dense is None or lsh is None:
        claim.update(here="not measured (dense or lsh missing)", agrees=None)
    else:
        claim.update(here=f"lsh {lsh:.3g} ms vs dense {dense:.3g} ms per training step ({dense / lsh:.2f}×)",
                     agrees=lsh > dense)
    out.append(claim)
    return out


def table1_rows():
    """Table 1 as rows ``{"model", "family", "ours", task…, "Path-X", "Avg"}`` (for a DataFrame)."""
    return [{"model": m, "family": LRA_FAMILY[m], "ours": OURS[m], **dict(zip(TABLE1_COLUMNS[:-1], v[:-1])),
             "Path-X": PATH_X, "Avg": v[-1]} for m, v in TABLE1.items()]


def table2_rows():
    """Table 2 as rows ``{"model", "family", "ours", "steps/s 1K" …, "speed-up 1K" …, "mem GB 1K" …}``."""
    rows = []
    for m, steps in STEPS_PER_S.items():
        row = {"model": m, "family": LRA_FAMILY[m], "ours": OURS[m]}
        for i, n in enumerate(LENGTHS):
            k = f"{n // 1024}K"
            row[f"steps/s {k}"], row[f"speed-up {k}"], row[f"mem GB {k}"] = steps[i], SPEEDUP[m][i], MEMORY_GB[m][i]
        rows.append(row)
    return rows


__all__ = ["SOURCE", "TASKS", "TABLE1", "TABLE1_COLUMNS", "TABLE1_AVG_AS_PRINTED", "STEPS_PER_S", "SPEEDUP", "MEMORY_GB", "LENGTHS",
           "TABLE2_SETUP", "TABLE2_ABSENT", "LRA_FAMILY", "OURS", "FAMILIES", "FAMILY_COLORS", "SURVEY_FAMILY",
           "tay_bubble_chart", "bubble_chart", "agreement", "lra_summary", "chance_level", "table1_rows",
           "table2_rows", "TIE", "CHANCE_MARGIN"]
