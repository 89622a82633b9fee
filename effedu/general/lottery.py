"""The lottery ticket hypothesis, with rewinding (survey §3.4).

Frankle & Carbin (2019), "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks": a dense
network trained to convergence and pruned by weight magnitude leaves a sub-network — the *winning ticket* — that,
**reset to its original initial values** θ₀ and trained alone, reaches the accuracy of the dense network. The same
mask with *fresh random* values does much worse: what wins is the mask **and** the initial values it was found with.

    1. θ₀ ← init;  train θ₀ → θ_T                                              (the dense run)
    2. m  ← magnitude mask of θ_T at sparsity s        (True = kept; the s·n smallest |θ_T| removed)
    3. ticket:  θ_k ⊙ m, trained with the mask held  → accuracy_rewound(s)
    4. control: θ'₀ ⊙ m (θ'₀ a fresh init, another seed), trained the same way → accuracy_reinit(s)

Frankle, Dziugaite, Roy & Carbin (2020), "Linear Mode Connectivity and the Lottery Ticket Hypothesis": for deeper
networks, resetting to θ₀ stops working, but **rewinding** to the weights θ_k of an early step k (a few per cent of
training) does: the ticket is trained again from step k, with the rest of the learning-rate schedule. Step 3 above
uses θ_k; ``rewind_step=0`` is the original hypothesis (θ_k = θ₀).

Here the masks are one-shot (one pruning of θ_T per sparsity, which Frankle & Carbin also report next to
iterative pruning), computed by :mod:`effedu.general.prune` (``global_magnitude_masks`` over
``prunable_weights``: the Linear weights of the blocks) and held during retraining by ``apply_masks``.

The training itself is the caller's ``train_fn(model, steps_from, *, on_step=None) -> accuracy``: it trains
``model`` in place over the steps ``[steps_from, T)`` of one fixed schedule of T steps — the same batches and
learning rates at the same step numbers, whoever calls it — and returns the final accuracy (a float). If given,
``on_step(t, model)`` is called with the weights *at step t* (after t optimiser steps) for every t in
``[steps_from, T]``: before each step, and once after the last. The dense run is ONE uninterrupted training (its
optimiser state never restarts); :func:`lottery_ticket` takes θ_k from it through ``on_step``.
:func:`schedule_train_fn` builds such a ``train_fn`` for effedu's tasks on top of :func:`effedu.train.train`.
"""
from __future__ import annotations

import copy
import math
import numbers

import torch

from .._checks import check_choice, check_int, check_seed
from ..train import default_step, evaluate, train
from . import prune

SCOPES = prune.SCOPES  # "global", "layer"


def _check_sparsities(sparsities, where):
    if isinstance(sparsities, (str, bytes)) or not hasattr(sparsities, "__iter__"):
        raise TypeError(f"{where}: sparsities must be a list of numbers in [0, 1), got {type(sparsities).__name__}")
    out = []
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s < 1:
            raise ValueError(f"{where}: every sparsity must be a number in [0, 1), got {s!r}")
        out.append(float(s))
    if not out:
        raise ValueError(f"{where}: sparsities must not be empty")
    return out


def _accuracy(value, who, where):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: train_fn must return the final accuracy (a float), got {type(value).__name__} "
                        f"from the {who} run")
    return float(value)


def ticket_masks(model, sparsity, scope="global"):
    """Magnitude masks of ``model``'s prunable weights at ``sparsity`` (True = kept).

    ``scope="global"``: one threshold over all prunable weights (Frankle & Carbin prune convolutional layers
    globally); ``"layer"``: the same fraction removed from each weight matrix.
    """
    where = "ticket_masks"
    check_choice(scope, SCOPES, "scope", where)
    weights = {name: w.detach() for name, w in prune.prunable_weights(model).items()}
    if scope == "global":
        return prune.global_magnitude_masks(weights, sparsity)
    return {name: prune.magnitude_mask(w, sparsity) for name, w in weights.items()}


def lottery_ticket(make_model, train_fn, *, sparsities, rewind_step, scope="global", seed=0):
    """Dense vs winning ticket (mask + rewound weights) vs the same mask on a fresh init, at each sparsity.

    ``make_model(seed) -> nn.Module`` builds a freshly initialised model, the same for the same seed.
    ``train_fn(model, steps_from, *, on_step=None) -> float`` trains ``model`` in place over the steps
    ``[steps_from, T)`` of one fixed schedule, calling ``on_step(t, model)`` with the weights at every step t in
    ``[steps_from, T]`` (before each step, and once after the last), and returns the final accuracy.

    The order of the runs (the tests hold it to this):

    1. dense: ``m = make_model(seed)``; ``train_fn(m, 0, on_step=...)`` → ``"dense"``, one uninterrupted run
       (the same as ``train_fn(make_model(seed), 0)``); ``on_step`` copies θ_k, the weights at step
       ``rewind_step`` (ValueError if the run never reaches that step).
    2. for each sparsity s: masks of the trained dense weights (:func:`ticket_masks`, ``scope``);
       rewound: ``make_model(seed)`` loaded with θ_k, masked, ``train_fn(ticket, rewind_step)`` → ``"rewound"``
       (a fresh optimiser from step k: the weights are rewound, as in Frankle et al. 2020, not the optimiser);
       re-initialised: ``make_model(seed + 1)`` (another init), the same mask, ``train_fn(model, 0)`` — the full
       schedule, k steps more than the ticket, a control that is if anything favoured → ``"reinit"``.

    Returns ``{"sparsity": [...], "dense": float, "rewound": [...], "reinit": [...], "rewind_step": k,
    "scope": scope, "seed": seed, "kept_sparsity": [...]}`` — ``kept_sparsity`` is the fraction of zeros among
    the prunable weights of each ticket *after* retraining (the mask held: equal to the requested sparsity).
    """
    where = "lottery_ticket"
    if not callable(make_model):
        raise TypeError(f"{where}: make_model must be a callable seed -> nn.Module, got {type(make_model).__name__}")
    if not callable(train_fn):
        raise TypeError(f"{where}: train_fn must be a callable (model, steps_from, *, on_step=None) -> accuracy, got "
                        f"{type(train_fn).__name__}")
    sparsities = _check_sparsities(sparsities, where)
    check_int(rewind_step, "rewind_step", where, minimum=0)
    check_choice(scope, SCOPES, "scope", where)
    check_seed(seed, where)

    # 1. the dense run — one uninterrupted training — with θ_k copied on the way
    dense = make_model(seed)
    if not isinstance(dense, torch.nn.Module):
        raise TypeError(f"{where}: make_model must return an nn.Module, got {type(dense).__name__}")
    saved = {}

    def on_step(step, model):
        if step == rewind_step:
            saved["theta_k"] = copy.deepcopy(model.state_dict())

    dense_acc = _accuracy(train_fn(dense, 0, on_step=on_step), "dense", where)
    if "theta_k" not in saved:
        raise ValueError(f"{where}: rewind_step={rewind_step} was never reached: train_fn must call on_step(t, model) "
                         f"for every step t of its schedule (and rewind_step must not exceed its length)")
    theta_k = saved["theta_k"]

    out = {"sparsity": sparsities, "dense": dense_acc, "rewound": [], "reinit": [], "rewind_step": rewind_step,
           "scope": scope, "seed": seed, "kept_sparsity": []}
    for s in sparsities:
        masks = ticket_masks(dense, s, scope)
        # 2a. the winning ticket: θ_k ⊙ m, trained from step k with the mask held
        ticket = make_model(seed)
        ticket.load_state_dict(theta_k)
        prune.apply_masks(ticket, masks)
        out["rewound"].append(_accuracy(train_fn(ticket, rewind_step), "rewound", where))
        out["kept_sparsity"].append(prune.sparsity(ticket))
        prune.remove_masks(ticket)
        # 2b. the control: a fresh init θ'₀ ⊙ m, trained from step 0
        control = make_model(seed + 1)
        prune.apply_masks(control, masks)
        out["reinit"].append(_accuracy(train_fn(control, 0), "re-initialised", where))
        prune.remove_masks(control)
    return out


def schedule_train_fn(batch_fn, val_batch, *, steps, lr=1e-2, warmup=10, weight_decay=0.01, grad_clip=1.0):
    """A ``train_fn(model, steps_from, *, on_step=None) -> accuracy`` for :func:`lottery_ticket` on effedu's tasks.

    Step ``t`` always trains on ``batch_fn(t)`` with the learning rate of one schedule over ``steps`` steps —
    linear warm-up, then cosine decay to 10 % (:func:`effedu.train.train`'s) — whichever ``steps_from`` a run
    starts at: a rewound ticket continues the dense run's schedule from step k (with a fresh AdamW). ``on_step(t,
    model)``, if given, sees the weights at every step t in ``[steps_from, steps]``. Returns the accuracy on
    ``val_batch`` (:func:`effedu.train.evaluate`).
    """
    where = "schedule_train_fn"
    if not callable(batch_fn):
        raise TypeError(f"{where}: batch_fn must be a callable step -> (inputs, targets), got {type(batch_fn).__name__}")
    check_int(steps, "steps", where, minimum=1)
    check_int(warmup, "warmup", where, minimum=0)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise ValueError(f"{where}: lr must be a positive number, got {lr!r}")

    def lr_at(step):
        # η_t = η·(t+1)/w during warm-up, then η·(0.1 + 0.9·½(1 + cos(π (t − w)/(T − w))))
        if warmup and step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def train_fn(model, steps_from, *, on_step=None):
        if isinstance(steps_from, bool) or not isinstance(steps_from, int) or not 0 <= steps_from <= steps:
            raise ValueError(f"train_fn: need 0 <= steps_from <= steps={steps}, got steps_from={steps_from!r}")
        if on_step is not None and not callable(on_step):
            raise TypeError(f"train_fn: on_step must be a callable (step, model) or None, got {type(on_step).__name__}")
        if steps_from < steps:
            step = [steps_from]

            def step_fn(model, inputs, targets, optimizer):
                if on_step is not None:
                    on_step(step[0], model)  # the weights at step t, before step t runs
                for group in optimizer.param_groups:  # the global schedule, not train()'s own (which starts at 0)
                    group["lr"] = lr_at(step[0])
                step[0] += 1
                return default_step(model, inputs, targets, optimizer, grad_clip)

            train(model, lambda s: batch_fn(steps_from + s), steps=steps - steps_from, lr=lr,
                  weight_decay=weight_decay, seed=steps_from, step_fn=step_fn, progress=False)
        if on_step is not None:
            on_step(steps, model)  # the weights at the end of the schedule
        return evaluate(model, val_batch)[1]

    return train_fn


__all__ = ["lottery_ticket", "ticket_masks", "schedule_train_fn", "SCOPES"]
