"""A mini Long-Range Arena on this machine: every registered attention × tasks × two lengths, one small encoder.

Tay et al. (2020) trained the same small encoder with every efficient attention on long tasks and reported accuracy,
speed and memory side by side (their Tables 1–2, in :mod:`effedu.capstone.reference`). This is that experiment at
a size two CPU cores can run in minutes:

* the tasks of :mod:`effedu.data.long_range` — ``needle`` (``hops=1``: one key–value pair early in the haystack,
  asked for at the end), ``listops`` (LRA's ListOps) and ``text`` (byte-level classification) at length 256; at 1024
  those of them the time budget allows (:data:`SETTINGS`);
* the same **encoder** (``causal=False``, as in LRA — Linformer and Nyström cannot be causal) for every variant: the
  same width, heads, layers, feed-forward size, learning rate, steps, tokens per step and seeds; classification at
  the last position (the tasks' convention: labels there, ``IGNORE`` elsewhere);
* per run: validation accuracy and loss (a fixed validation set), the median training-step time (first 2 steps
  excluded), the median no-grad inference time on a training-size batch, the peak memory of one training step and
  of one inference forward (:func:`effedu.measure.peak_memory`), and the parameter count.

Every variant's keyword arguments per length come from :func:`variant_kwargs` (with its family, chapter and a note in
:data:`VARIANT_SETTINGS`). A variant that cannot run a configuration is recorded with ``status "cannot"`` and the
reason. Budgets are small: accuracies separate "learns the task" from "does not", not the third decimal.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from .. import measure

# ----------------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------------

BLOCK = 32  # the block of the block-sparse kernel for every fixed sparse pattern

SETTINGS = dict(lengths=(256, 1024), tasks={256: ("needle", "listops", "text"), 1024: ("needle", "text")},
                steps=90, tokens_per_step=1024, lr=1e-2, seeds=(0,), d_model=64, n_heads=4, n_layers=2, d_ff=128,
                n_val={256: 128, 1024: 32}, val_seed=10_000, aux_weight=1.0, infer_repeat=3)
# Sized on 2 shared cores (issue 16): one training step of all 27 variants costs ~0.96 s at 256 (batch 4) and ~2.5 s
# at 1024 (batch 1) with 1 thread on a fairly quiet core (entmax, sparsebert, dense, shared_qk and the synthesizers
# dominate at 1024): 90 steps × (3 × 0.96 + 2 × 2.5) s ≈ 12 min of training with 1 thread, ~14 min with evaluation
# and measurements; estimated ~8–11 min with 2 threads on a quiet 2-core machine. With these steps, batch 4 and
# lr 1e-2, dense reaches 0.57 on needle at 256 with seed 0 (0.19 with seed 1; chance 0.1): the needle is learned
# in a sudden transition whose step varies with the seed. No variant diverged at this lr (grad clip 1.0).
QUICK = dict(lengths=(32, 64), tasks={32: ("needle",), 64: ("needle",)}, steps=2, tokens_per_step=128, lr=3e-3,
             seeds=(0,), d_model=16, n_heads=2, n_layers=1, d_ff=32, n_val={32: 8, 64: 8}, val_seed=10_000,
             aux_weight=1.0, infer_repeat=1)

TASK_KWARGS = {"needle": {"hops": 1}, "listops": {}, "text": {}, "recall": {}}

FAMILIES = ("baseline", "exact", "fixed sparse", "learned sparse", "low rank", "kernel")

# name → (family, chapter, length_dependent, note)
VARIANT_SETTINGS = {
    "dense": ("baseline", 1, False, "materialised softmax attention: the reference every variant is compared with"),
    "tiled": ("baseline", 1, False, "the same exact attention through the tiled (online-softmax) kernel"),
    "shared_qk": ("baseline", 4, False, "Reformer's shared queries and keys: a parameter-sharing trick, still "
                                        "quadratic"),
    "memory_efficient": ("exact", 19, False, "exact attention in tiles, differentiable (chapter 19)"),
    "local": ("fixed sparse", 15, False, "sliding window of n/8, on the block-sparse kernel (blocks of 32)"),
    "strided": ("fixed sparse", 15, False, "Sparse Transformer strided pattern (stride √n), block-sparse kernel "
                                           "(blocks of 32: its covering layout is nearly dense)"),
    "fixed": ("fixed sparse", 15, False, "Sparse Transformer fixed pattern (stride n/8, 1 summary column), "
                                         "block-sparse kernel"),
    "longformer": ("fixed sparse", 15, False, "window of n/8 + 1 global token, block-sparse kernel"),
    "bigbird": ("fixed sparse", 15, False, "blocks of 32: 3 window + 1 global + 1 random block per row"),
    "blockwise": ("fixed sparse", 15, False, "full attention inside blocks of n/8 only"),
    "block_sparse": ("fixed sparse", 15, False, "the generic block-sparse kernel with an explicit layout: a band of "
                                                "3 blocks of 32 plus the first block as global row and column"),
    "star": ("fixed sparse", 15, False, "Star-Transformer ring + relay token, block-sparse kernel"),
    "logsparse": ("fixed sparse", 15, False, "LogSparse (symmetric: an encoder), block-sparse kernel"),
    "blockbert": ("fixed sparse", 15, False, "BlockBERT: blocks of n/8, one block permutation per head"),
    "lsh": ("learned sparse", 16, False, "Reformer LSH (shared QK), 2 rounds, chunks of n/8, n/chunk buckets"),
    "entmax": ("learned sparse", 16, False, "1.5-entmax weights: sparse but computed densely (quadratic)"),
    "routing": ("learned sparse", 16, False, "Routing Transformer: online k-means, √n/4 clusters; commitment loss "
                                             "added to the training loss"),
    "sinkhorn": ("learned sparse", 16, False, "Sinkhorn sorting of blocks of n/8"),
    "sparsebert": ("learned sparse", 16, True, "SparseBERT learned n×n mask logits (rebuilt per length); sparsity "
                                               "loss added to the training loss"),
    "clustered": ("learned sparse", 18, False, "clustered attention (chapter 18): k-means of the queries, n/16 "
                                               "clusters — grouped here with the learned sparse family"),
    "clustered_improved": ("learned sparse", 18, False, "improved clustered attention (chapter 18): clusters plus "
                                                        "each cluster's top-32 keys exactly"),
    "linformer": ("low rank", 17, True, "Linformer: keys/values projected n → 64 (the projection is rebuilt per "
                                        "length)"),
    "nystrom": ("low rank", 17, False, "Nyström with n/8 landmarks (at most 64)"),
    "synthesizer_dense": ("low rank", 17, True, "Dense Synthesizer: weights from an MLP d → n (rebuilt per length)"),
    "synthesizer_random": ("low rank", 17, True, "Random Synthesizer: a learned n×n matrix (rebuilt per length)"),
    "linear": ("kernel", 18, False, "linear attention, φ = elu + 1"),
    "performer": ("kernel", 18, False, "Performer FAVOR+ with 64 orthogonal random features"),
}


def _check_len(seq_len, where):
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"{where}: seq_len must be a positive int, got {seq_len!r}")


def _block_sparse_layout(seq_len):
    from ..attention.sparse import local_layout

    b = min(BLOCK, seq_len)
    layout = local_layout(seq_len, b, 2 * b).clone()
    layout[..., 0, :] = True
    layout[..., :, 0] = True
    return layout


def variant_kwargs(name, seq_len):
    """The attention keyword arguments of built-in variant ``name`` at sequence length ``seq_len``.

    Sparse patterns get ``block_size`` (the block-sparse kernel) and windows/blocks that scale with the length;
    LSH and Sinkhorn chunks divide the length. ``block_sparse``'s layout is a tensor (see :data:`VARIANT_SETTINGS`).
    """
    where = "variant_kwargs"
    if not isinstance(name, str) or name not in VARIANT_SETTINGS:
        raise ValueError(f"{where}: name must be a built-in attention ({', '.join(VARIANT_SETTINGS)}), got {name!r}")
    _check_len(seq_len, where)
    L = seq_len
    b = min(BLOCK, L)
    eighth = max(b, L // 8) if L % max(b, L // 8) == 0 else b
    root = max(1, int(math.isqrt(L)))
    return {
        "dense": {}, "tiled": {}, "shared_qk": {}, "memory_efficient": {},
        "local": {"window": eighth, "block_size": b},
        "strided": {"stride": root, "block_size": b},
        "fixed": {"stride": eighth, "summary": 1, "block_size": b},
        "longformer": {"window": eighth, "global_tokens": 1, "block_size": b},
        "bigbird": {"block_size": b, "window_blocks": 3, "global_blocks": 1, "random_blocks": 1},
        "blockwise": {"block_size": eighth},
        "block_sparse": {"layout": _block_sparse_layout(L), "block_size": b},
        "star": {"block_size": b},
        "logsparse": {"symmetric": True, "block_size": b},
        "blockbert": {"block_size": eighth},
        "lsh": {"n_buckets": max(2, L // eighth), "n_rounds": 2, "chunk_size": eighth},
        "entmax": {"alpha": 1.5},
        "routing": {"n_clusters": max(2, root // 4)},
        "sinkhorn": {"block_size": eighth},
        "sparsebert": {"init": 0.5, "sparsity": 0.1},
        "clustered": {"n_clusters": max(2, L // 16)},
        "clustered_improved": {"n_clusters": max(2, L // 16), "topk": min(32, L)},
        "linformer": {"rank": min(64, L)},
        "nystrom": {"landmarks": min(64, max(1, L // 8))},
        "synthesizer_dense": {}, "synthesizer_random": {},
        "linear": {},
        "performer": {"n_features": 64},
    }[name]


def jsonable_kwargs(kwargs):
    """``kwargs`` with tensors replaced by a short description (the results file is JSON)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            out[k] = f"bool tensor {tuple(v.shape)} ({int(v.sum())} of {v.numel()} blocks)"
        else:
            out[k] = v
    return out


def variant_info(name, lengths):
    """The ``variants[name]`` entry of the results: family, chapter, kwargs per length, length_dependent, note."""
    if name in VARIANT_SETTINGS:
        family, chapter, dep, note = VARIANT_SETTINGS[name]
        kw = {str(L): jsonable_kwargs(variant_kwargs(name, L)) for L in lengths}
    else:  # registered at run time by a learner: default kwargs
        family, chapter, dep, note = "baseline", 21, False, "registered at run time: default keyword arguments"
        kw = {str(L): {} for L in lengths}
    return {"family": family, "chapter": chapter, "kwargs": kw, "length_dependent": dep, "note": note}


# ----------------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------------


def thread_count(n):
    """torch's and numba's thread counts set to ``n`` for the block (None: unchanged), restored after."""
    from ..general.sweeps import torch_numba_threads

    return torch_numba_threads(n)


def batch_size(settings, seq_len):
    """Sequences per training step at ``seq_len``: tokens_per_step // seq_len (at least 1)."""
    return max(1, settings["tokens_per_step"] // seq_len)


def build_model(name, settings, seq_len, vocab_size, seed=0):
    """The small encoder (``causal=False``) with attention ``name`` at ``seq_len``."""
    from ..model import Transformer, TransformerConfig

    s = settings
    kw = variant_kwargs(name, seq_len) if name in VARIANT_SETTINGS else {}
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=vocab_size, d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"],
                            d_ff=s["d_ff"], max_len=seq_len, causal=False, attention=name, attention_kwargs=kw)
    return Transformer(cfg)


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _empty_run(name, task, seq_len, seed, why):
    return {"variant": name, "task": task, "seq_len": seq_len, "seed": seed, "status": "cannot", "why": why,
            "accuracy": None, "final_loss": None, "params": None, "train_step_ms": None, "infer_ms": None,
            "train_peak_mib": None, "infer_peak_mib": None, "train_seconds": None}


def train_one(name, task, seq_len, seed, settings, val, cache=None):
    """Train and measure one (variant, task, length, seed); returns its ``runs`` record (status "ok").

    ``cache``: a dict keeping the training batches of (task, seq_len, seed, step) across variants (the same data
    for every variant; generating ListOps and text is not free)."""
    from ..data.long_range import long_range_info, make_long_range
    from ..model import lm_loss
    from ..train import default_step, train

    s = settings
    tkw = TASK_KWARGS.get(task, {})
    info = long_range_info(task, **tkw)
    B = batch_size(s, seq_len)
    model = build_model(name, s, seq_len, info["vocab_size"], seed)
    aux_weight = s["aux_weight"]
    step_times = []

    def batches(step):
        key = (task, seq_len, B, seed, step)
        if cache is not None and key in cache:
            return cache[key]
        b = make_long_range(task, B, seq_len, seed=100_000 * seed + 1_000 * seq_len + step, **tkw)
        if cache is not None:
            cache[key] = (b.inputs, b.targets)
        return b.inputs, b.targets

    def step_fn(model, inputs, targets, optimizer):  # the default step (+ auxiliary losses), timed
        t0 = time.perf_counter()
        loss = default_step(model, inputs, targets, optimizer, grad_clip=1.0, aux_weight=aux_weight)
        step_times.append(time.perf_counter() - t0)
        return loss

    t0 = time.perf_counter()
    with torch.random.fork_rng():  # train() seeds torch's global RNG
        train(model, batches, steps=s["steps"], lr=s["lr"], seed=seed, step_fn=step_fn, progress=False)
    train_seconds = time.perf_counter() - t0
    final_loss, acc = evaluate_chunked(model, val, chunk=8)
    inputs, targets = batches(s["steps"])  # a training-size batch not trained on

    def train_step():
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model(inputs), targets)
        (loss + aux_weight * model.aux_loss() if aux_weight else loss).backward()
        return loss

    def infer():
        with torch.no_grad():
            return model(inputs)

    model.train()
    train_peak = measure.peak_memory(train_step)[0]
    model.zero_grad(set_to_none=True)
    model.eval()
    infer_s = measure.time_it(infer, warmup=1, repeat=s["infer_repeat"])
    infer_peak = measure.peak_memory(infer)[0]
    timed = step_times[2:] if len(step_times) > 2 else step_times
    return {"variant": name, "task": task, "seq_len": seq_len, "seed": seed, "status": "ok", "why": None,
            "accuracy": float(acc), "final_loss": float(final_loss), "params": int(measure.count_parameters(model)),
            "train_step_ms": 1e3 * statistics.median(timed), "infer_ms": 1e3 * infer_s,
            "train_peak_mib": float(train_peak) / 2**20, "infer_peak_mib": float(infer_peak) / 2**20,
            "train_seconds": train_seconds}


def evaluate_chunked(model, batch, chunk=8):
    """(loss, accuracy) of ``model`` on ``batch`` (``.inputs``, ``.targets``), forward in chunks of ``chunk``
    sequences under no_grad (the quadratic variants' scores at 1024 stay small)."""
    from ..train import accuracy
    from ..model import lm_loss

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(batch.inputs[i:i + chunk]) for i in range(0, len(batch.inputs), chunk)])
    return float(lm_loss(logits, batch.targets)), float(accuracy(logits, batch.targets))


def run_one(name, task, seq_len, seed, settings, val, cache=None):
    """:func:`train_one`, or a "cannot" record with the exception's first line when the variant raises."""
    try:
        r = train_one(name, task, seq_len, seed, settings, val, cache)
    except (ValueError, TypeError, RuntimeError, NotImplementedError, FloatingPointError) as exc:
        return _empty_run(name, task, seq_len, seed, _first_line(exc))
    for k in ("accuracy", "final_loss", "train_step_ms", "infer_ms", "train_peak_mib", "infer_peak_mib"):
        if not math.isfinite(r[k]):
            return _empty_run(name, task, seq_len, seed, f"non-finite {k} ({r[k]})")
    return r


# ----------------------------------------------------------------------------------------------------------------
# the section
# ----------------------------------------------------------------------------------------------------------------


def _check_names(values, allowed, what):
    if values is None:
        return None
    if isinstance(values, str) or not all(isinstance(v, (str, int)) for v in values):
        raise TypeError(f"run_lra: {what} must be a list, got {values!r}")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"run_lra: unknown {what} {bad}; expected some of {list(allowed)}")
    return list(values)


def run_lra(quick=False, *, log=None, threads=None, variants=None, lengths=None, tasks=None, steps=None):
    """The ``lra`` section of the capstone results (schema in :mod:`effedu.capstone`): every registered attention
    (or ``variants``) × the tasks of each length (or ``tasks``) × the lengths (or ``lengths``) × seeds.
    ``steps``: the training budget of every run (default ``SETTINGS["steps"]``; the time grows with it)."""
    from ..attention import available
    from ..data.long_range import LONG_RANGE_TASKS, long_range_info, make_long_range
    from ..bench._progress import steps as progress

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"run_lra: threads must be a positive int or None, got {threads!r}")
    s = dict(QUICK if quick else SETTINGS)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 3:
            raise ValueError(f"run_lra: steps must be an int >= 3 (training steps per run), got {steps!r}")
        s["steps"] = steps
    names = _check_names(variants, available(), "variants") or available()
    Ls = _check_names(lengths, s["lengths"], "lengths") if lengths is not None else list(s["lengths"])
    task_of = {L: list(s["tasks"][L]) for L in Ls}
    if tasks is not None:
        tasks = _check_names(tasks, LONG_RANGE_TASKS, "tasks")
        task_of = {L: [t for t in tasks] for L in Ls}
        for L in Ls:
            if L < 128 and "text" in task_of[L]:
                task_of[L].remove("text")  # text needs L ≥ 128
    all_tasks = sorted({t for L in Ls for t in task_of[L]})
    settings = {"lengths": Ls, "tasks": {str(L): task_of[L] for L in Ls}, "steps": s["steps"],
                "tokens_per_step": s["tokens_per_step"], "batch_size": {str(L): batch_size(s, L) for L in Ls},
                "lr": s["lr"], "seeds": list(s["seeds"]), "d_model": s["d_model"], "n_heads": s["n_heads"],
                "n_layers": s["n_layers"], "d_ff": s["d_ff"], "n_val": max(s["n_val"][L] for L in Ls),
                "n_val_by_length": {str(L): s["n_val"][L] for L in Ls},
                "val_seed": s["val_seed"], "aux_weight": s["aux_weight"], "block_size": BLOCK,
                "threads": threads or torch.get_num_threads(), "quick": bool(quick)}
    out = {"settings": settings,
           "tasks": {t: {**{k: v for k, v in long_range_info(t, **TASK_KWARGS.get(t, {})).items()},
                         "kwargs": dict(TASK_KWARGS.get(t, {}))} for t in all_tasks},
           "variants": {n: variant_info(n, Ls) for n in names}, "runs": []}
    jobs = [(L, t, n, seed) for L in Ls for t in task_of[L] for n in names for seed in s["seeds"]]
    vals, cache = {}, {}
    t_start = time.perf_counter()
    with thread_count(threads):
        settings["threads"] = torch.get_num_threads()
        for L, t, n, seed in progress(jobs, "mini-LRA", label=lambda j: f"{j[2]} {j[1]} n={j[0]}"):
            if (L, t) not in vals:
                cache.clear()  # one (length, task) at a time: keep only its batches
                vals[(L, t)] = make_long_range(t, s["n_val"][L], L, seed=s["val_seed"], **TASK_KWARGS.get(t, {}))
            t0 = time.perf_counter()
            r = run_one(n, t, L, seed, s, vals[(L, t)], cache)
            out["runs"].append(r)
            if log:
                what = (f"acc {r['accuracy']:.3f}, step {r['train_step_ms']:.0f} ms" if r["status"] == "ok"
                        else f"cannot: {r['why']}")
                log(f"lra {n} {t} n={L} seed {seed}: {what} ({time.perf_counter() - t0:.1f} s)")
    settings["seconds"] = time.perf_counter() - t_start
    return out


# ----------------------------------------------------------------------------------------------------------------
# tables for the notebook and the guide
# ----------------------------------------------------------------------------------------------------------------

_METRICS = ("accuracy", "final_loss", "train_step_ms", "infer_ms", "train_peak_mib", "infer_peak_mib")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _check_lra(lra, where):
    if not isinstance(lra, dict) or "runs" not in lra:
        raise TypeError(f"{where}: lra must be the 'lra' section of the results (a dict with 'runs')")


def runs_table(lra, seq_len=None):
    """One row per (variant, task, seq_len) — means over ok seeds — with the task's chance level and status.

    Rows: ``{"variant", "family", "task", "seq_len", "status", "why", "n_seeds", "chance", accuracy, final_loss,
    train_step_ms, infer_ms, train_peak_mib, infer_peak_mib}`` (None where no seed ran)."""
    _check_lra(lra, "runs_table")
    groups = {}
    for r in lra["runs"]:
        if seq_len is not None and r["seq_len"] != seq_len:
            continue
        groups.setdefault((r["variant"], r["task"], r["seq_len"]), []).append(r)
    rows = []
    for (v, t, L), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        row = {"variant": v, "family": lra.get("variants", {}).get(v, {}).get("family"), "task": t, "seq_len": L,
               "status": "ok" if ok else "cannot", "why": None if ok else rs[0].get("why"), "n_seeds": len(ok),
               "chance": lra.get("tasks", {}).get(t, {}).get("chance")}
        for k in _METRICS:
            row[k] = _mean([r.get(k) for r in ok])
        rows.append(row)
    return rows


def summary(lra, seq_len):
    """``{variant: {"accuracy" (mean over tasks), "train_step_ms", "infer_ms", "train_peak_mib", "infer_peak_mib",
    "family"}}`` at ``seq_len``, from ok runs only (None where none ran)."""
    _check_lra(lra, "summary")
    _check_len(seq_len, "summary")
    per = {}
    for row in runs_table(lra, seq_len):
        per.setdefault(row["variant"], []).append(row)
    names = list(lra.get("variants", {})) or sorted(per)
    out = {}
    for v in names:
        rows = per.get(v, [])
        out[v] = {k: _mean([r[k] for r in rows]) for k in
                  ("accuracy", "train_step_ms", "infer_ms", "train_peak_mib", "infer_peak_mib")}
        out[v]["family"] = lra.get("variants", {}).get(v, {}).get("family")
    return out


def format_table(lra):
    """A plain-text table: per length, one line per variant — accuracy per task, mean, step/infer ms, peak MiB."""
    _check_lra(lra, "format_table")
    lines = []
    lengths = sorted({r["seq_len"] for r in lra["runs"]})
    for L in lengths:
        rows = runs_table(lra, L)
        tasks = sorted({r["task"] for r in rows})
        chance = {r["task"]: r["chance"] for r in rows}
        acc = {(r["variant"], r["task"]): r for r in rows}
        summ = summary(lra, L)
        head = f"{'n=' + str(L):<20}{'family':<16}" + "".join(f"{t:>9}" for t in tasks) + \
            f"{'mean':>8}{'step ms':>10}{'infer ms':>10}{'train MiB':>11}{'infer MiB':>11}"
        lines += [head, "-" * len(head)]
        lines.append(f"{'chance':<36}" + "".join(
            f"{chance[t]:>9.2f}" if chance.get(t) is not None else f"{'':>9}" for t in tasks))
        for v, s in summ.items():
            cells = []
            for t in tasks:
                r = acc.get((v, t))
                cells.append(f"{'—':>9}" if r is None or r["accuracy"] is None else f"{r['accuracy']:>9.3f}")

            def f(x, spec):
                return f"{'—':>{spec.split('.')[0]}}" if x is None else f"{x:>{spec}}"

            lines.append(f"{v:<20}{(s['family'] or ''):<16}" + "".join(cells) + f(s["accuracy"], "8.3f")
                         + f(s["train_step_ms"], "10.1f") + f(s["infer_ms"], "10.1f")
                         + f(s["train_peak_mib"], "11.1f") + f(s["infer_peak_mib"], "11.1f"))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["run_lra", "variant_kwargs", "variant_info", "jsonable_kwargs", "build_model", "batch_size", "train_one",
           "run_one", "evaluate_chunked", "runs_table", "summary", "format_table", "thread_count", "VARIANT_SETTINGS", "SETTINGS",
           "QUICK", "FAMILIES", "TASK_KWARGS", "BLOCK"]
