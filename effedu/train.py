"""One small training loop for every chapter (AdamW, optional warm-up, a tqdm progress bar, a history).

    history = train(model, batches, steps=200, lr=3e-3, seed=0)
    history["loss"]       # one value per step
    history["val_loss"]   # every `eval_every` steps, when `val_batch` is given

``batches`` is either a callable ``batch_fn(step) -> Batch`` (inputs, targets), a fixed ``Batch`` reused every
step, or an iterable of batches. Targets use -100 where nothing is scored (``effedu.data.IGNORE``). Chapters
that change the training step itself (checkpointing, mixed precision, micro-batching) pass ``step_fn``.
"""
from __future__ import annotations

import math
import time

import torch

from .model import IGNORE, lm_loss  # one ignore index and one LM loss for the whole course (re-exported here)


@torch.no_grad()
def accuracy(logits, targets):
    """Fraction of scored positions where argmax(logits) equals the target."""
    scored = targets != IGNORE
    if not scored.any():
        return float("nan")
    return float((logits.argmax(-1)[scored] == targets[scored]).float().mean())


def _batch_source(batches):
    if callable(batches):
        return batches
    if isinstance(batches, (tuple, list)) and len(batches) == 2 and all(isinstance(b, torch.Tensor) for b in batches):
        return lambda step: batches
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(
            f"train: batches must be a callable step -> (inputs, targets), an (inputs, targets) pair or an "
            f"iterable of them, got {type(batches).__name__}"
        ) from None
    return lambda step: next(it)


def default_step(model, inputs, targets, optimizer, grad_clip=None, aux_weight=0.0):
    """forward → loss → backward → (clip the gradient norm) → optimizer step; returns the loss (a float).

    ``aux_weight``: back-propagate ``loss + aux_weight · model.aux_loss()`` — the model's auxiliary losses (MoE's
    balancing, routing's commitment, SparseBERT's sparsity); the returned loss is the task loss alone."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(inputs)
    loss = lm_loss(logits, targets)
    (loss + aux_weight * model.aux_loss() if aux_weight else loss).backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


def train(model, batches, *, steps=100, lr=3e-3, weight_decay=0.01, warmup=0, grad_clip=1.0, seed=0,
          val_batch=None, eval_every=None, step_fn=None, progress=True, device=None, desc="training",
          on_divergence="raise", divergence_threshold=None):
    """Train ``model`` for ``steps`` steps; returns a history dict of lists (loss, lr, time, val_loss, val_acc).

    ``grad_clip``: the maximum gradient norm (None or 0: no clipping, as chapter 12's warm-up demonstration needs).
    ``warmup``: steps of linear warm-up before the cosine decay.
    ``on_divergence``: what a diverged step does — a non-finite loss, or a loss above ``divergence_threshold`` when
    one is given. ``"raise"`` (default) raises ``FloatingPointError``; ``"record"`` stops training there and returns
    the history with the bad loss appended and ``history["diverged_at"]`` set to that step. The key is always
    present: None when every step stayed finite (and under the threshold).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"train: steps must be a positive int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"train: lr must be a positive number, got {lr!r}")
    if on_divergence not in ("raise", "record"):
        raise ValueError(f"train: on_divergence must be 'raise' or 'record', got {on_divergence!r}")
    if divergence_threshold is not None and (isinstance(divergence_threshold, bool)
                                             or not isinstance(divergence_threshold, (int, float))
                                             or not math.isfinite(divergence_threshold)):
        raise ValueError(f"train: divergence_threshold must be a finite number or None, got {divergence_threshold!r}")
    warmup = 0 if warmup is None else warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"train: warmup must be an int >= 0 (steps) or None, got {warmup!r}")
    if grad_clip is not None and (isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float))
                                  or grad_clip < 0):
        raise ValueError(f"train: grad_clip must be a number >= 0 or None (no clipping), got {grad_clip!r}")
    torch.manual_seed(seed)
    device = device or next(model.parameters()).device
    get_batch = _batch_source(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    # linear warm-up then cosine decay to 10 %
    def lr_at(step):
        if warmup and step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    eval_every = eval_every or max(1, steps // 10)
    history = {"step": [], "loss": [], "lr": [], "time": [], "val_step": [], "val_loss": [], "val_acc": [],
               "diverged_at": None}
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=desc, leave=False)
    t0 = time.perf_counter()
    model.train()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        inputs, targets = get_batch(step)
        inputs, targets = inputs.to(device), targets.to(device)
        if step_fn is None:
            loss = default_step(model, inputs, targets, optimizer, grad_clip)
        else:
            loss = step_fn(model, inputs, targets, optimizer)
        diverged = not math.isfinite(loss) or (divergence_threshold is not None and loss > divergence_threshold)
        if diverged and on_divergence == "raise":
            what = f"became {loss}" if not math.isfinite(loss) else f"= {loss} exceeded {divergence_threshold}"
            raise FloatingPointError(f"train: loss {what} at step {step} (lower lr, add warm-up, or check the "
                                     f"inputs; on_divergence='record' returns the history instead)")
        history["step"].append(step)
        history["loss"].append(loss)
        history["lr"].append(lr_at(step))
        history["time"].append(time.perf_counter() - t0)
        if diverged:
            history["diverged_at"] = step
            break
        if val_batch is not None and ((step + 1) % eval_every == 0 or step == steps - 1):
            vl, va = evaluate(model, val_batch)
            history["val_step"].append(step)
            history["val_loss"].append(vl)
            history["val_acc"].append(va)
            model.train()
        if progress:
            bar.set_postfix(loss=f"{loss:.3f}")
    model.eval()
    return history


@torch.no_grad()
def evaluate(model, batch):
    """(loss, accuracy) of ``model`` on one ``(inputs, targets)`` batch, in eval mode."""
    model.eval()
    inputs, targets = batch
    device = next(model.parameters()).device
    logits = model(inputs.to(device))
    targets = targets.to(device)
    return float(lm_loss(logits, targets)), accuracy(logits, targets)


__all__ = ["train", "evaluate", "lm_loss", "accuracy", "default_step", "IGNORE"]
