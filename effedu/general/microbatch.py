"""Micro-batching: gradient accumulation, exact for a ragged batch; chapter 09 of the course (survey §3.7).

Papers: Huang et al. 2019, *GPipe: Efficient Training of Giant Neural Networks using Pipeline Parallelism*
(NeurIPS), where micro-batches feed a pipeline; rematerialisation from Chen et al. 2016, *Training Deep Nets with
Sublinear Memory Cost* (chapter 02).

**Micro-batching.** A mini-batch of B sequences is cut into M *micro-batches*. Each one runs forward and backward on
its own and the parameter gradients are *accumulated* (autograd adds into ``.grad``) before one optimizer step. The
activations of only one micro-batch are alive at a time, so the memory is that of a batch of B/M, and the gradient
is that of the full batch. It is *exactly* that gradient only if every micro-batch's loss is weighted correctly. The
course's loss is a mean over the *scored* tokens (targets ≠ −100). Micro-batch m has nₘ scored tokens out of
N = Σ nₘ, so

    L = (1/N) Σ_tokens ℓ = Σₘ (nₘ/N) · Lₘ        with Lₘ = (1/nₘ) Σ_{tokens of m} ℓ

The naive mean of the micro-batch means, (1/M) Σₘ Lₘ, is a different function as soon as the nₘ differ.

**Batch Norm caveat.** Micro-batching is exact only when the model treats samples independently. Batch Norm
normalises with statistics *of the batch it sees*, so its micro-batch statistics differ from the full batch's and
the accumulated gradient is not the full-batch gradient. LayerNorm (the Transformer's) normalises each token on its
own and keeps the equivalence.

**Pipeline parallelism** puts consecutive layers on K devices and feeds them the micro-batches in a wave (GPipe);
its schedule, its bubble (K − 1) / (M + K − 1) and a real pipeline of K processes are in
``effedu.general.pipeline``, its Gantt charts in ``effedu.viz``. This module re-exports both under their names
(``microbatch.gpipe_schedule``, ``microbatch.run_pipeline``, ``microbatch.plot_gpipe``, ...), so chapter 09 needs
one import.

This module holds, in reading order: ``accumulate_gradients`` (the technique) with the plain reference
``full_batch_gradients`` and ``accumulation_step`` for ``effedu.train.train``; then what it is built from:
``micro_weights`` (the wₘ above), ``split_batch`` and ``micro_sizes``, and ``token_cross_entropy`` (the loss).
``python -m effedu.bench pipeline`` prints step time, measured vs predicted bubble and memory per stage, with
torch's pipeline timed in the same run.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_batch, check_int
from ..data import Batch
from ..model import IGNORE, lm_loss
from ..viz import plot_gantt, plot_gpipe, plot_measured_pipeline
from .pipeline import (
    StageRunner,
    TransformerStage,
    bubble_fraction,
    busy_fractions,
    check_schedule,
    gpipe_schedule,
    handoff_latencies,
    ideal_step_time,
    idle_fraction,
    measured_bubble,
    run_pipeline,
    run_pipelines,
    run_torch_pipeline,
    schedule_events,
    simulate_pipeline,
    split_transformer,
    stage_actions,
)

WEIGHT_BY = ("scored", "samples", "micro")


token_cross_entropy = lm_loss  # the course's one LM loss (effedu.model.lm_loss), under chapter 09's old name


# --------------------------------------------------------------------------------------------------------------
# the technique: gradient accumulation
# --------------------------------------------------------------------------------------------------------------


def accumulate_gradients(model, batch, n_micro, *, loss_fn=token_cross_entropy, weight_by="scored",
                         allow_uneven=True, zero_grad=True):
    """Gradient accumulation: forward + backward per micro-batch, gradients summed in ``.grad``.

    ``loss_fn(output, targets)`` must be a *mean* (over scored tokens for ``weight_by="scored"``, over samples for
    ``"samples"``); each micro-batch's loss is scaled by its weight wₘ (:func:`micro_weights`) so that the
    accumulated gradient equals the full-batch gradient, also when the micro-batches hold different numbers of
    scored tokens or samples (``n_micro`` need not divide the batch). A micro-batch with nothing scored is skipped
    (its mean would be 0/0). Returns the full-batch loss Σₘ wₘ Lₘ (a float). Only one micro-batch's activations
    are alive at a time.
    """
    where = "accumulate_gradients"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable, got {type(loss_fn).__name__}")
    inputs, targets = check_batch(batch, where)
    check_weight_by(weight_by, targets, where)
    micro = split_batch((inputs, targets), n_micro, allow_uneven=allow_uneven)
    weights = micro_weights([mb.targets for mb in micro], weight_by)
    if zero_grad:
        model.zero_grad(set_to_none=True)
    total = 0.0
    for (x_m, y_m), w_m in zip(micro, weights):
        if w_m == 0.0:
            continue  # nothing scored here: contributes nothing to L = Σ wₘ Lₘ
        # L = Σₘ wₘ Lₘ  ⇒  ∇L = Σₘ wₘ ∇Lₘ, accumulated by autograd into .grad
        loss_m = loss_fn(model(x_m), y_m) * w_m
        loss_m.backward()
        total += float(loss_m.detach())
    return total


def accumulation_step(n_micro, *, loss_fn=token_cross_entropy, weight_by="scored", grad_clip=1.0):
    """A ``step_fn`` for ``effedu.train.train``: accumulate over ``n_micro`` micro-batches, then one update."""
    where = "accumulation_step"
    check_int(n_micro, "n_micro", where)
    if weight_by not in WEIGHT_BY:
        raise ValueError(f"{where}: weight_by must be one of {WEIGHT_BY}, got {weight_by!r}")

    def step(model, inputs, targets, optimizer):
        loss = accumulate_gradients(model, (inputs, targets), n_micro, loss_fn=loss_fn, weight_by=weight_by)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss

    return step


def full_batch_gradients(model, batch, *, loss_fn=token_cross_entropy, zero_grad=True):
    """The plain reference: one forward and backward on the whole batch. Returns the loss (a float)."""
    where = "full_batch_gradients"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    inputs, targets = check_batch(batch, where)
    if zero_grad:
        model.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------------------------
# what it is built from: micro-batches and their weights
# --------------------------------------------------------------------------------------------------------------


def micro_sizes(batch_size, n_micro, *, allow_uneven=True, where="micro_sizes"):
    """Sizes of the ``n_micro`` micro-batches of a batch of ``batch_size`` (as ``torch.tensor_split`` cuts it).

    ``micro_sizes(8, 3) == [3, 3, 2]``. With ``allow_uneven=False`` a ``n_micro`` that does not divide the batch
    is an error.
    """
    check_int(batch_size, "batch_size", where)
    check_int(n_micro, "n_micro", where)
    if n_micro > batch_size:
        raise ValueError(
            f"{where}: n_micro={n_micro} is larger than the batch size {batch_size} (a micro-batch would be empty)"
        )
    if not allow_uneven and batch_size % n_micro:
        raise ValueError(
            f"{where}: n_micro={n_micro} does not divide the batch size {batch_size} "
            f"(pass allow_uneven=True for micro-batches of sizes ⌈B/M⌉ and ⌊B/M⌋)"
        )
    q, r = divmod(batch_size, n_micro)
    # the first r micro-batches get one more sample (torch.tensor_split's convention)
    return [q + 1 if m < r else q for m in range(n_micro)]


def split_batch(batch, n_micro, *, allow_uneven=True):
    """Cut ``batch`` along its first dimension into ``n_micro`` micro-batches (a list of ``Batch``)."""
    where = "split_batch"
    inputs, targets = check_batch(batch, where)
    sizes = micro_sizes(inputs.shape[0], n_micro, allow_uneven=allow_uneven, where=where)
    return [Batch(x, y) for x, y in zip(inputs.split(sizes), targets.split(sizes))]


def micro_weights(micro_targets, weight_by="scored"):
    """The weight wₘ of each micro-batch's (mean) loss so that Σₘ wₘ Lₘ is the full-batch loss.

    * ``"scored"``: wₘ = nₘ / N, nₘ = scored targets (≠ −100) of micro-batch m — exact for a mean over tokens;
    * ``"samples"``: wₘ = Bₘ / B — exact for a mean over samples;
    * ``"micro"``: wₘ = 1 / M — the naive mean of the micro-batch means; exact only when all nₘ are equal.
    """
    where = "micro_weights"
    if not isinstance(micro_targets, (list, tuple)) or not micro_targets:
        raise TypeError(f"{where}: micro_targets must be a non-empty list of tensors, got {type(micro_targets).__name__}")
    if weight_by not in WEIGHT_BY:
        raise ValueError(f"{where}: weight_by must be one of {WEIGHT_BY}, got {weight_by!r}")
    M = len(micro_targets)
    if weight_by == "micro":
        return [1.0 / M] * M
    if weight_by == "samples":
        counts = [t.shape[0] for t in micro_targets]
    else:
        counts = [int((t != IGNORE).sum()) for t in micro_targets]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"{where}: no target is scored in the whole batch (all are {IGNORE}): the loss is undefined")
    # wₘ = nₘ / N
    return [c / total for c in counts]



def check_weight_by(weight_by, targets, where):
    """``weight_by`` is one of ``WEIGHT_BY``; ``"scored"`` needs integer targets (it counts those ≠ −100)."""
    if weight_by not in WEIGHT_BY:
        raise ValueError(f"{where}: weight_by must be one of {WEIGHT_BY}, got {weight_by!r}")
    if weight_by == "scored" and targets.is_floating_point():
        raise TypeError(
            f"{where}: weight_by='scored' counts integer targets ≠ {IGNORE}; got float targets ({targets.dtype}). "
            f"Use weight_by='samples' for a loss that is a mean over samples."
        )
    return weight_by


_StageRunner = StageRunner  # the old name (chapter 09 prints its source)


# benchmark: `python -m effedu.bench pipeline` (effedu/bench/pipeline.py)

__all__ = [
    "token_cross_entropy", "micro_sizes", "split_batch", "micro_weights", "full_batch_gradients",
    "accumulate_gradients", "accumulation_step", "check_weight_by",
    # re-exported from effedu.general.pipeline
    "gpipe_schedule", "check_schedule", "stage_actions", "idle_fraction", "bubble_fraction", "schedule_events",
    "measured_bubble", "busy_fractions", "handoff_latencies", "ideal_step_time",
    "TransformerStage", "split_transformer", "StageRunner", "simulate_pipeline", "run_pipelines", "run_pipeline",
    "run_torch_pipeline",
    # re-exported from effedu.viz
    "plot_gantt", "plot_gpipe", "plot_measured_pipeline",
]
