"""Chapter 14's trained models, precomputed: early exit, ACT and per-token depth, written to a JSON file.

Notebook 14 must run in under a minute on two cores; the three models of :mod:`effedu.general.conditional` need a
few thousand steps between them to learn their task, so they are trained here once and what the notebook plots is
committed as ``data/results/conditional.json`` (per-layer logits of a test set, trade-off curves, depth and
pondering heatmaps). The notebook loads that file, plots it, and re-trains each model briefly live to check the
mechanics (batched exit == loop, ponder = N + R, exited states copied). Regenerate it with one command (about
3–5 minutes on 2 cores)::

    python -m effedu.general.conditional_sweep            # → data/results/conditional.json
    python -m effedu.general.conditional_sweep --quick    # seconds: a few steps each (the unit test runs this)

**One task with easy and hard tokens for all three** — ``make_mixed_difficulty`` (``effedu.data``): spans
``COPY d …`` (the target of a digit is the digit: easy) and ``SUM d …`` (the running sum mod ``modulus`` of the
span: hard, and harder the more digits it sums). We use ``modulus=5``, ``max_span=4`` so that a tiny model learns
the hard tokens in a few hundred steps.

* **early exit** (sequence classification, DeeBERT / PABEE): :func:`last_token_task` turns each sequence into one
  example whose class is the target of its *last* token (a digit 0–4): a COPY ending is easy, a SUM ending needs
  the digits before it. An :class:`~effedu.general.conditional.EarlyExitClassifier` (causal, 4 layers,
  ``pool="last"``) trained with PABEE's weighted loss; saved: the per-layer logits of 512 test examples (4 decimals),
  their labels, difficulty (easy / hard and how many digits a SUM ending sums), the entropy and patience curves;
* **ACT** (Graves 2016; Universal Transformer): an :class:`~effedu.general.conditional.ACTTransformer` (one
  shared block, ≤ 6 steps) tagging every digit; saved: the number of updates N per position on 8 test sequences,
  N and accuracy on easy / hard tokens;
* **depth-adaptive** (Elbayad et al. 2020): a :class:`~effedu.general.conditional.DepthAdaptiveTransformer`
  (4 layers, one head shared by all) on the same tagging; saved: per-layer accuracy on easy / hard tokens, the
  exit layer of every token of 8 test sequences at confidence 0.9, accuracy vs average depth as the threshold moves.

Everything is seeded; nothing here re-implements a technique (it calls :mod:`effedu.general.conditional`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import env_report
from .._checks import check_int, check_seed
from ..data.tasks import MIXED_DIGIT0, PAD, make_mixed_difficulty
from ..model import IGNORE, TransformerConfig
from ..train import train
from . import conditional as C
from .sweeps import sweep_main, torch_threads

COMMAND = "python -m effedu.general.conditional_sweep"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "results" / "conditional.json"
SCHEMA_VERSION = 1

TASK = {"modulus": 5, "max_span": 4, "test_samples": 512, "test_seed": 10**6}
EARLY = {"seq_len": 12, "d_model": 64, "n_heads": 4, "n_layers": 4, "d_ff": 128, "batch": 64, "lr": 3e-3,
         "steps": 2000}
ACT = {"seq_len": 24, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_steps": 6, "threshold": 0.99,
       "ponder_weight": 1e-2, "batch": 32, "lr": 3e-3, "steps": 1200}
DEPTH = {"seq_len": 24, "d_model": 64, "n_heads": 4, "n_layers": 4, "d_ff": 128, "batch": 32, "lr": 3e-3,
         "steps": 1000, "threshold": 0.9}
QUICK_STEPS = 10
ENTROPY_THRESHOLDS = (0.0, 0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.61)  # nats
CONFIDENCE_THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.01)
N_SHOWN = 8  # test sequences kept for the heatmaps


# ----------------------------------------------------------------------------------------------------------------
# the task and the models
# ----------------------------------------------------------------------------------------------------------------

def mixed_batch(n_samples, seq_len, *, seed, return_difficulty=False):
    """``make_mixed_difficulty`` with this chapter's ``modulus`` and ``max_span`` (see :data:`TASK`)."""
    return make_mixed_difficulty(n_samples, seq_len, seed=seed, modulus=TASK["modulus"], max_span=TASK["max_span"],
                                 return_difficulty=return_difficulty)


def last_token_task(n_samples, seq_len, *, seed):
    """Sequence classification from the mixed task: the class of a sequence is the target of its last digit.

    Returns ``(tokens (N, T), labels (N,) in 0 … modulus−1, hard (N,) bool, n_summed (N,) int64)``: ``hard`` when
    the last digit closes a SUM span, ``n_summed`` = how many digits its answer depends on (1 for a COPY ending
    and for the first digit of a SUM span). A row that the generator ended with one PAD is shifted right by one
    (PAD first), so that position T − 1 is always a scored digit (``pool="last"`` reads it)."""
    where = "last_token_task"
    check_int(n_samples, "n_samples", where)
    check_int(seq_len, "seq_len", where, minimum=3)
    check_seed(seed, where)
    batch, hard = mixed_batch(n_samples, seq_len, seed=seed, return_difficulty=True)
    x, y = batch.inputs.clone(), batch.targets.clone()
    shift = x[:, -1] == PAD
    x[shift], y[shift], hard[shift] = x[shift].roll(1, 1), y[shift].roll(1, 1), hard[shift].roll(1, 1)
    assert bool((y[:, -1] != IGNORE).all())
    # how many digits back to the span's marker (the marker is not scored: its target is IGNORE)
    scored = (y != IGNORE).flip(1).long()  # (N, T), from the end
    n_back = scored.cumprod(dim=1).sum(dim=1)  # length of the run of digits that ends at T − 1
    n_summed = torch.where(hard[:, -1], n_back, torch.ones_like(n_back))
    return x, y[:, -1] - MIXED_DIGIT0, hard[:, -1].clone(), n_summed


def _config(spec, *, n_layers=None):
    return TransformerConfig(vocab_size=MIXED_DIGIT0 + TASK["modulus"], d_model=spec["d_model"],
                             n_heads=spec["n_heads"], n_layers=n_layers or spec["n_layers"], d_ff=spec["d_ff"],
                             max_len=spec["seq_len"], causal=True)


def train_early_exit_model(*, steps=None, seed=0, log_every=10):
    """The chapter's :class:`EarlyExitClassifier` (:data:`EARLY`), trained ``steps`` steps on
    :func:`last_token_task` with PABEE's weighted loss. Returns ``(model, history)``; the model is in eval mode."""
    steps = EARLY["steps"] if steps is None else steps
    torch.manual_seed(seed)
    model = C.EarlyExitClassifier(_config(EARLY), TASK["modulus"], pool="last")

    def batches(step):
        x, y, _, _ = last_token_task(EARLY["batch"], EARLY["seq_len"], seed=seed * 10**5 + step)
        return x, y

    history = C.train_early_exit(model, batches, steps=steps, lr=EARLY["lr"], seed=seed, progress=False)
    return model.eval(), history


def train_act_model(*, steps=None, seed=0, ponder_weight=None):
    """The chapter's :class:`ACTTransformer` (:data:`ACT`) trained on the mixed tagging task (LM loss + ponder
    cost, :func:`~effedu.general.conditional.act_step`). Returns ``(model, history)`` in eval mode."""
    steps = ACT["steps"] if steps is None else steps
    torch.manual_seed(seed)
    pw = ACT["ponder_weight"] if ponder_weight is None else ponder_weight
    model = C.ACTTransformer(_config(ACT, n_layers=1), max_steps=ACT["max_steps"], threshold=ACT["threshold"],
                             ponder_weight=pw)
    history = train(model, lambda step: mixed_batch(ACT["batch"], ACT["seq_len"], seed=seed * 10**5 + step),
                    steps=steps, lr=ACT["lr"], seed=seed, step_fn=C.act_step, progress=False)
    return model.eval(), history


def train_depth_model(*, steps=None, seed=0):
    """The chapter's :class:`DepthAdaptiveTransformer` (:data:`DEPTH`) trained on the mixed tagging task with the
    per-layer loss sum. Returns ``(model, history)`` in eval mode."""
    steps = DEPTH["steps"] if steps is None else steps
    torch.manual_seed(seed)
    model = C.DepthAdaptiveTransformer(_config(DEPTH), threshold=DEPTH["threshold"])
    history = C.train_depth_adaptive(
        model, lambda step: mixed_batch(DEPTH["batch"], DEPTH["seq_len"], seed=seed * 10**5 + step), steps=steps,
        lr=DEPTH["lr"], seed=seed, progress=False)
    return model.eval(), history


def _every(values, k=10):
    return [round(float(v), 4) for v in values[::k]]


def _rounded(t, digits=4):
    """``t`` rounded to ``digits`` decimals, as the float32 tensor the file's short decimals load back to."""
    return torch.tensor(_as_list(t, digits), dtype=t.dtype)


def _as_list(t, digits=4):
    """Nested lists of Python floats rounded to ``digits`` decimals (short in JSON)."""
    if t.dim() == 0:
        return round(float(t), digits)
    return [_as_list(row, digits) for row in t] if t.dim() > 1 else [round(v, digits) for v in t.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# the three sweeps
# ----------------------------------------------------------------------------------------------------------------

def sweep_early_exit(*, quick=False, log=print):
    steps = QUICK_STEPS if quick else EARLY["steps"]
    model, history = train_early_exit_model(steps=steps)
    x, y, hard, n_summed = last_token_task(TASK["test_samples"], EARLY["seq_len"], seed=TASK["test_seed"])
    with torch.no_grad():
        logits = _rounded(model(x))  # (L, N, C): the file's copy, and every number below comes from it
    acc = C.per_layer_accuracy(logits, y)
    correct = logits.argmax(-1) == y
    out = {
        "config": dict(EARLY, steps=steps), "loss_every_10": _every(history["loss"]),
        "labels": y.tolist(), "hard": hard.tolist(), "n_summed": n_summed.tolist(),
        "per_layer_logits": _as_list(logits),
        "per_layer_accuracy": acc,
        "per_layer_accuracy_easy": correct[:, ~hard].float().mean(dim=1).tolist(),
        "per_layer_accuracy_hard": correct[:, hard].float().mean(dim=1).tolist(),
        "entropy": C.exit_tradeoff(logits, y, rule="entropy", values=list(ENTROPY_THRESHOLDS)),
        "patience": C.exit_tradeoff(logits, y, rule="patience", values=list(range(1, EARLY["n_layers"]))),
    }
    log(f"early exit: {steps} steps, per-layer accuracy {[round(a, 3) for a in acc]}")
    return out


def _heatmap_rows(batch, hard, values):
    scored = batch.targets[:N_SHOWN] != IGNORE
    return {"tokens": batch.inputs[:N_SHOWN].tolist(), "hard": hard[:N_SHOWN].tolist(),
            "scored": scored.tolist(), "values": values[:N_SHOWN].tolist()}


def sweep_act(*, quick=False, log=print):
    steps = QUICK_STEPS if quick else ACT["steps"]
    model, history = train_act_model(steps=steps)
    batch, hard = mixed_batch(TASK["test_samples"], ACT["seq_len"], seed=TASK["test_seed"], return_difficulty=True)
    with torch.no_grad():
        logits = model(batch.inputs)
    scored = batch.targets != IGNORE
    easy = scored & ~hard
    n = model.last_n_updates.view_as(batch.inputs)
    ok = logits.argmax(-1) == batch.targets
    out = {
        "config": dict(ACT, steps=steps), "loss_every_10": _every(history["loss"]),
        "accuracy_easy": float(ok[easy].float().mean()), "accuracy_hard": float(ok[hard].float().mean()),
        "mean_updates_easy": float(n[easy].float().mean()), "mean_updates_hard": float(n[hard].float().mean()),
        "mean_ponder": float(model.last_ponder.mean()),
        "updates_histogram": torch.bincount(n[scored].flatten(), minlength=ACT["max_steps"] + 1)[1:].tolist(),
        "heatmap": _heatmap_rows(batch, hard, n),
    }
    log(f"ACT: {steps} steps, N easy {out['mean_updates_easy']:.2f}, hard {out['mean_updates_hard']:.2f}")
    return out


def sweep_depth(*, quick=False, log=print):
    steps = QUICK_STEPS if quick else DEPTH["steps"]
    model, history = train_depth_model(steps=steps)
    batch, hard = mixed_batch(TASK["test_samples"], DEPTH["seq_len"], seed=TASK["test_seed"], return_difficulty=True)
    scored = batch.targets != IGNORE
    easy = scored & ~hard
    with torch.no_grad():
        correct = model.per_layer_logits(batch.inputs).argmax(-1) == batch.targets  # (L, B, T)
        _, exit_layer = model(batch.inputs, threshold=DEPTH["threshold"])
    curve = C.depth_tradeoff(model, batch, list(CONFIDENCE_THRESHOLDS))
    out = {
        "config": dict(DEPTH, steps=steps), "loss_every_10": _every(history["loss"]),
        "per_layer_accuracy_easy": [float(c[easy].float().mean()) for c in correct],
        "per_layer_accuracy_hard": [float(c[hard].float().mean()) for c in correct],
        "mean_depth_easy": float((exit_layer[easy] + 1).float().mean()),
        "mean_depth_hard": float((exit_layer[hard] + 1).float().mean()),
        "tradeoff": curve,
        "heatmap": _heatmap_rows(batch, hard, exit_layer + 1),
    }
    log(f"depth-adaptive: {steps} steps, depth easy {out['mean_depth_easy']:.2f}, hard {out['mean_depth_hard']:.2f}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# the whole run and its file
# ----------------------------------------------------------------------------------------------------------------



PARTS = ("early_exit", "act", "depth")


def run_sweep(*, quick=False, threads=None, parts=PARTS, log=None):
    """Train and measure; returns the results dict (what :func:`main` writes as JSON)."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"run_sweep: parts must be a non-empty subset of {PARTS}, got {parts!r}")
    if threads is not None:
        check_int(threads, "threads", "run_sweep")
    log = log or (lambda *a: print(*a, flush=True))
    t0 = time.perf_counter()
    sweeps = {"early_exit": sweep_early_exit, "act": sweep_act, "depth": sweep_depth}
    with torch_threads(threads):
        results = {"schema": SCHEMA_VERSION, "command": COMMAND + (" --quick" if quick else ""), "quick": quick,
                   "env": env_report(print_report=False), "task": dict(TASK)}
        for part in PARTS:
            if part in parts:
                results[part] = sweeps[part](quick=quick, log=log)
    results["seconds"] = time.perf_counter() - t0
    return results


def load_results(path=None):
    """The committed results (``data/results/conditional.json`` by default) as a dict."""
    path = DEFAULT_OUT if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_results: {path} is missing; regenerate it with `{COMMAND}`")
    return json.loads(path.read_text(encoding="utf-8"))


def early_exit_arrays(results):
    """The early-exit part of a results dict as tensors: ``(per_layer_logits (L, N, C) float32, labels (N,),
    hard (N,) bool, n_summed (N,))``."""
    ee = results["early_exit"]
    return (torch.tensor(ee["per_layer_logits"], dtype=torch.float32), torch.tensor(ee["labels"]),
            torch.tensor(ee["hard"]), torch.tensor(ee["n_summed"]))


def main(argv=None):
    return sweep_main(argv, command=COMMAND, description=__doc__, default_out=DEFAULT_OUT,
                      add_arguments=lambda p: p.add_argument("--parts", nargs="+", default=list(PARTS),
                                                             choices=list(PARTS)),
                      run=lambda a: run_sweep(quick=a.quick, threads=a.threads, parts=tuple(a.parts)))


__all__ = ["COMMAND", "DEFAULT_OUT", "SCHEMA_VERSION", "TASK", "EARLY", "ACT", "DEPTH", "QUICK_STEPS",
           "ENTROPY_THRESHOLDS", "CONFIDENCE_THRESHOLDS", "PARTS", "mixed_batch", "last_token_task",
           "train_early_exit_model", "train_act_model", "train_depth_model", "sweep_early_exit", "sweep_act",
           "sweep_depth", "run_sweep", "load_results", "early_exit_arrays", "main"]

if __name__ == "__main__":
    main()
