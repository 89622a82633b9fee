"""Gradient checkpointing: keep a few activations, recompute the rest in the backward pass (survey §3.1).

Chen, Xu, Zhang & Guestrin, *Training Deep Nets with Sublinear Memory Cost* (arXiv 1604.06174, 2016).

**The problem.** Backpropagation needs, for every layer, the tensors its forward pass produced (a linear layer
needs its input to form the weight gradient, a softmax its output, ...). Autograd therefore *saves* them during the
forward pass and frees them during the backward pass. For a stack of L layers that each save ``a`` bytes, the
activation memory held at the turn from forward to backward is

    M_plain(L) = L · a                                                     (linear in depth)

**The idea.** Cut the stack into segments. Run each segment *without* saving its intermediates and keep only its
input, the *checkpoint* (``c`` bytes: one tensor of the layer width). In the backward pass, when the gradient
reaches a segment, run the segment's forward again from its checkpoint — this time saving everything — and
backpropagate through it. Only one segment's activations are alive at a time, so with ``k`` segments of L/k layers

    M_ckpt(L, k) = k · c + (L / k) · a           minimised at  k* = √(L · a / c)   ⇒   M = O(√L)

and the price is that every layer but those of the last segment runs its forward twice: at most *one extra
forward pass* per step (a step costs ≈ 1 forward + 2 forwards' worth of backward, so ≤ ~33 % more compute).
Chen et al. report a 1,000-layer ResNet going from 48 GB to 7 GB of memory for about 30 % more time.

**How it is built here** (the design of ``torch.utils.checkpoint``'s *reentrant* variant, from autograd parts):

* :func:`checkpoint` wraps ``fn(*args)`` in a custom :class:`torch.autograd.Function`. Its ``forward`` runs
  ``fn`` with autograd off (a custom Function's forward always does) so nothing inside is saved, and
  ``save_for_backward`` keeps only the tensor inputs. Its ``backward`` re-runs ``fn`` with autograd on, on
  *detached* copies of the inputs (a fresh little graph), and calls ``torch.autograd.backward`` on the recomputed
  outputs with the incoming gradients: the gradients of the parameters used inside ``fn`` accumulate into their
  ``.grad`` there, and the gradients of the detached inputs are returned to the outer graph.
* The random state is *replayed*: the CPU (and CUDA) generator state is stashed before the forward and restored
  around the recomputation, so dropout draws the same mask twice (``preserve_rng_state=False`` shows what goes
  wrong without it). The global generator is put back afterwards, so a checkpointed step consumes exactly the
  same random numbers as a plain one. The autocast state is replayed the same way.
* :func:`checkpoint_sequential` checkpoints each segment of a layer list; :func:`segment_plan` builds the
  segments ("none", "every" layer, every ``k`` layers, or √L segments); :class:`CheckpointedTransformer` runs
  the blocks of an :class:`effedu.model.Transformer` that way.

**An int means two things — watch out.** In :func:`segment_plan` and :class:`CheckpointedTransformer` an int
``k`` is the number of *layers per segment* ("checkpoint every k layers"). In :func:`checkpoint_sequential` and
:func:`even_plan` — as in ``torch.utils.checkpoint.checkpoint_sequential`` — an int is the *number of segments*.
``segment_plan(12, 4) == even_plan(12, 3)``: three segments of four layers either way. (The API is kept as it is;
pass an explicit plan from :func:`even_plan` to :class:`CheckpointedTransformer` to say "k segments".)

**Choice: the last segment runs normally** (as in ``torch.utils.checkpoint.checkpoint_sequential``). Its
activations are needed the moment the backward pass starts; checkpointing it frees them at the end of the forward
only to recompute them almost at once: |last| more layer forwards, for a peak lower only by what the layers
*after* the stack save (final LayerNorm, head, loss), which the backward pass frees before it reaches the last
segment (``checkpoint_last=True`` measures it). Running it plainly has a second benefit for this course: plans put
any larger segment *last* (:func:`even_plan`, :func:`segment_plan`), so the bytes saved at the end of the forward
pass — what :func:`effedu.measure.saved_activation_bytes` counts — *are* the peak activation memory of the whole
step (recomputing an earlier, smaller segment never needs more). :func:`recompute_timeline` checks that by keeping
the meter on during the backward pass.

Known limits (shared with torch's reentrant variant): differentiate with ``loss.backward()``;
``torch.autograd.grad(loss, inputs)`` works for the inputs but the parameters inside ``fn`` still have their
``.grad`` filled as a side effect, and asking ``torch.autograd.grad`` for those parameters fails (they are not
inputs of the Function). No double backward. Unlike the reentrant variant, parameters inside ``fn`` get their
gradients even when no input requires grad (a dummy input that requires grad keeps the Function in the graph).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ..measure import memory_timeline
from .rng import RngState, replay_rng

__all__ = [
    "checkpoint",
    "checkpoint_sequential",
    "segment_plan",
    "even_plan",
    "recomputed_layers",
    "predicted_activation_bytes",
    "CheckpointedTransformer",
    "checkpoint_model",
    "recompute_timeline",
    "STRATEGIES",
]

STRATEGIES = ("none", "every", "sqrt")  # and any int k ≥ 1: segments of k layers


# --------------------------------------------------------------------------------------------------------------
# replaying random and autocast state
# --------------------------------------------------------------------------------------------------------------


# RngState (general/rng.py) records the CPU and CUDA generators; replay_rng(state) runs code with them and puts
# the generators back afterwards (torch.random.fork_rng), so a checkpointed step draws the numbers a plain one does.


def _autocast_state():
    return {dev: (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            for dev in ("cpu", "cuda")}


@contextlib.contextmanager
def _replay_autocast(state):
    with contextlib.ExitStack() as stack:
        for dev, (enabled, dtype) in state.items():
            if enabled:
                stack.enter_context(torch.autocast(dev, dtype=dtype))
        yield


# --------------------------------------------------------------------------------------------------------------
# checkpoint(fn, *args): the custom autograd Function
# --------------------------------------------------------------------------------------------------------------


class _CheckpointFunction(torch.autograd.Function):
    """Forward: run ``fn`` without autograd, save only the tensor inputs. Backward: recompute, backprop, return."""

    @staticmethod
    def forward(ctx, fn, preserve_rng_state, recompute_context, dummy, *args):
        # autograd is off inside a custom Function's forward: fn's intermediates are not saved
        ctx.fn, ctx.recompute_context = fn, recompute_context
        ctx.tensor_index = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.other_args = [None if i in ctx.tensor_index else a for i, a in enumerate(args)]
        tensors = [args[i] for i in ctx.tensor_index]
        # the random state fn is about to see, to be replayed in the recomputation
        ctx.rng = RngState(tensors) if preserve_rng_state else None
        ctx.autocast = _autocast_state()
        # the checkpoint: the inputs are the only tensors kept for the backward pass
        ctx.save_for_backward(*tensors)
        return _check_output(fn(*args))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        saved = ctx.saved_tensors
        # a fresh graph for the recomputation: detached copies of the inputs (leaves), same requires_grad
        detached = [t.detach().requires_grad_(t.requires_grad) for t in saved]
        args = list(ctx.other_args)
        for i, t in zip(ctx.tensor_index, detached):
            args[i] = t
        # recompute fn(*args) — same random numbers, same autocast — this time saving its intermediates
        recomputing = ctx.recompute_context() if ctx.recompute_context is not None else contextlib.nullcontext()
        with replay_rng(ctx.rng), torch.enable_grad(), _replay_autocast(ctx.autocast), recomputing:
            out = ctx.fn(*args)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        # backpropagate through the recomputed segment with the incoming gradients g = ∂loss/∂out:
        #   param.grad += (∂out/∂param)ᵀ g   (accumulated by autograd)
        #   x.grad       = (∂out/∂x)ᵀ g       (returned below)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [None] * len(args)
        for i, t in zip(ctx.tensor_index, detached):
            grads[i] = t.grad if t.requires_grad else None
        # one gradient per forward input: fn, preserve_rng_state, recompute_context, dummy, *args
        return (None, None, None, None, *grads)


def _check_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple) and out and all(isinstance(o, torch.Tensor) for o in out):
        return out
    raise TypeError(f"checkpoint: fn must return a tensor or a non-empty tuple of tensors, got {_describe(out)}")


def _describe(x):
    if isinstance(x, (tuple, list)):
        inner = ", ".join(type(o).__name__ for o in x)
        return f"{type(x).__name__} ({inner})"
    return type(x).__name__


def checkpoint(fn, *args, preserve_rng_state=True, recompute_context=None):
    """``fn(*args)`` that saves only its tensor inputs and recomputes its intermediates in the backward pass.

    ``fn`` returns a tensor or a tuple of tensors. ``args`` may mix tensors (with or without ``requires_grad``)
    and other values (passed through unchanged). Parameters used inside ``fn`` receive their gradients in the
    backward pass, as with ``torch.utils.checkpoint``. ``preserve_rng_state=True`` replays the random state so
    dropout inside ``fn`` draws the same mask when recomputed. ``recompute_context``: a callable returning a
    context manager entered around the recomputation (e.g. ``model.recomputing``, so auxiliary losses are not
    recorded twice). With autograd off (``torch.no_grad()``) this is plainly ``fn(*args)``.
    """
    if not callable(fn):
        raise TypeError(f"checkpoint: fn must be callable, got {type(fn).__name__}")
    if not isinstance(preserve_rng_state, bool):
        raise TypeError(f"checkpoint: preserve_rng_state must be a bool, got {preserve_rng_state!r}")
    if recompute_context is not None and not callable(recompute_context):
        raise TypeError(f"checkpoint: recompute_context must be callable or None, got {type(recompute_context).__name__}")
    if not torch.is_grad_enabled():
        return _check_output(fn(*args))  # nothing would be saved anyway
    # When no input requires grad, autograd would not record the Function at all, and the parameters inside fn
    # would get no gradient (torch's reentrant variant warns and drops them). A 0-byte leaf that requires grad
    # keeps the Function in the graph.
    needs_dummy = not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    dummy = torch.empty(0, requires_grad=True) if needs_dummy else None
    return _CheckpointFunction.apply(fn, preserve_rng_state, recompute_context, dummy, *args)


# --------------------------------------------------------------------------------------------------------------
# segment plans
# --------------------------------------------------------------------------------------------------------------


def _check_n_layers(n_layers, where):
    if isinstance(n_layers, bool) or not isinstance(n_layers, int):
        raise TypeError(f"{where}: n_layers must be an int, got {type(n_layers).__name__} ({n_layers!r})")
    if n_layers <= 0:
        raise ValueError(f"{where}: n_layers must be a positive int, got {n_layers}")


def _check_segments(segments, n_layers, where, name="segments"):
    if isinstance(segments, bool) or not isinstance(segments, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(segments).__name__} ({segments!r})")
    if not 1 <= segments <= n_layers:
        raise ValueError(f"{where}: {name} must be between 1 and n_layers={n_layers}, got {segments}")


def even_plan(n_layers, segments):
    """``segments`` contiguous segments of ``n_layers`` layers whose sizes differ by at most one, larger ones last.

    ``even_plan(10, 3) == [(0, 3), (3, 6), (6, 10)]``. Larger segments go last because the last segment runs
    without checkpointing: then nothing recomputed later needs more memory than what it holds at the turn.
    """
    where = "even_plan"
    _check_n_layers(n_layers, where)
    _check_segments(segments, n_layers, where)
    base, extra = divmod(n_layers, segments)
    # the first (segments − extra) segments have `base` layers, the last `extra` have base + 1
    sizes = [base] * (segments - extra) + [base + 1] * extra
    plan, start = [], 0
    for s in sizes:
        plan.append((start, start + s))
        start += s
    return plan


def segment_plan(n_layers, strategy):
    """Split ``range(n_layers)`` into segments: a list of ``(start, stop)`` pairs, in order, covering every layer.

    ``strategy``:
      * ``"none"``  — one segment: nothing is checkpointed (the last segment runs normally);
      * ``"every"`` — each layer is its own segment: only layer inputs are kept;
      * an int ``k`` — "every k layers": segments of ``k`` layers (a shorter remainder goes *first*). Not the
        number of segments, which is what :func:`even_plan` and :func:`checkpoint_sequential` take as an int;
      * ``"sqrt"``  — round(√L) segments of ≈ √L layers (Chen et al. 2016): O(√L) memory.
    """
    where = "segment_plan"
    _check_n_layers(n_layers, where)
    if isinstance(strategy, bool):
        raise ValueError(f"{where}: unknown strategy {strategy!r}; expected 'none', 'every', 'sqrt' or an int k ≥ 1")
    if isinstance(strategy, int):
        k = strategy
        if not 1 <= k <= n_layers:
            raise ValueError(f"{where}: strategy k={k} (segments of k layers) must be between 1 and "
                             f"n_layers={n_layers}")
        # segments of k layers; the remainder (n_layers mod k) becomes a shorter first segment
        first = n_layers % k
        bounds = ([0] if first else []) + list(range(first, n_layers + 1, k))  # 0, (first,) first + k, …, L
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    if strategy == "none":
        return [(0, n_layers)]
    if strategy == "every":
        return [(i, i + 1) for i in range(n_layers)]
    if strategy == "sqrt":
        # k = round(√L) segments of ≈ √L layers: k·c + (L/k)·a = O(√L)
        k = max(1, int(math.floor(math.sqrt(n_layers) + 0.5)))
        return even_plan(n_layers, k)
    raise ValueError(f"{where}: unknown strategy {strategy!r}; expected 'none', 'every', 'sqrt' or an int k ≥ 1 "
                     f"(segments of k layers)")


def _check_plan(plan, n_layers, where):
    if not isinstance(plan, (list, tuple)) or not plan:
        raise TypeError(f"{where}: a plan must be a non-empty list of (start, stop) pairs, got {plan!r}")
    expected = 0
    for i, seg in enumerate(plan):
        ok = (isinstance(seg, (tuple, list)) and len(seg) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in seg))
        if not ok:
            raise TypeError(f"{where}: plan[{i}] must be a (start, stop) pair of ints, got {seg!r}")
        a, b = seg
        if a != expected or b <= a:
            raise ValueError(f"{where}: plan[{i}]={tuple(seg)} must start at {expected} and be non-empty "
                             f"(segments are contiguous and cover range({n_layers}) in order)")
        expected = b
    if expected != n_layers:
        raise ValueError(f"{where}: the plan covers range({expected}), expected range(n_layers={n_layers})")
    return [tuple(seg) for seg in plan]


def _plan_length(plan):
    """The number of layers a plan claims to cover (its last stop), or 0 when it is malformed."""
    try:
        return int(plan[-1][1])
    except (TypeError, IndexError, KeyError, ValueError):
        return 0


def recomputed_layers(plan, *, checkpoint_last=False):
    """How many layer forwards the backward pass re-runs: every layer of every checkpointed segment.

    Divide by the number of layers for the extra compute in units of one forward pass.
    """
    n = _check_plan(plan, _plan_length(plan), "recomputed_layers")
    checkpointed = n if checkpoint_last else n[:-1]
    return sum(b - a for a, b in checkpointed)


def predicted_activation_bytes(plan, layer_bytes, input_bytes, base_bytes=0):
    """The memory model: ``base + (#checkpointed segments)·input_bytes + (#layers of the last segment)·layer_bytes``.

    ``layer_bytes`` (a) = what one layer saves when run plainly; ``input_bytes`` (c) = one checkpoint (a layer's
    input); ``base_bytes`` = what the rest of the model saves (embeddings, head). With the last segment run
    plainly and no larger than the others, this is the peak activation memory of the step.
    """
    where = "predicted_activation_bytes"
    n = _check_plan(plan, _plan_length(plan), where)
    for name, v in (("layer_bytes", layer_bytes), ("input_bytes", input_bytes), ("base_bytes", base_bytes)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{where}: {name} must be a number of bytes ≥ 0, got {v!r}")
    last = n[-1][1] - n[-1][0]
    # M = base + (k − 1) · c + |last segment| · a
    return base_bytes + (len(n) - 1) * input_bytes + last * layer_bytes


# --------------------------------------------------------------------------------------------------------------
# checkpoint_sequential
# --------------------------------------------------------------------------------------------------------------


def _as_layers(layers, where):
    if isinstance(layers, (nn.Sequential, nn.ModuleList)):
        layers = list(layers)
    elif isinstance(layers, (list, tuple)):
        layers = list(layers)
    else:
        raise TypeError(f"{where}: layers must be a list/tuple of callables, an nn.Sequential or an nn.ModuleList, "
                        f"got {type(layers).__name__}")
    if not layers:
        raise ValueError(f"{where}: layers is empty; expected at least one layer")
    for i, layer in enumerate(layers):
        if not callable(layer):
            raise TypeError(f"{where}: layers[{i}] must be callable, got {type(layer).__name__}")
    return layers


def _segment_runner(layers, start, stop):
    def run_segment(x):
        for layer in layers[start:stop]:
            x = layer(x)
        return x

    run_segment.__qualname__ = f"layers[{start}:{stop}]"
    return run_segment


def checkpoint_sequential(layers, segments, x, *, checkpoint_last=False, preserve_rng_state=True,
                          recompute_context=None):
    """Run ``x`` through ``layers`` in checkpointed segments.

    ``segments`` is the number of segments (an int, split by :func:`even_plan`, as in
    ``torch.utils.checkpoint.checkpoint_sequential``; note that :func:`segment_plan`'s int is the number of
    *layers per segment* instead) or a plan from :func:`segment_plan`. Every segment but the last is checkpointed; the last runs normally unless
    ``checkpoint_last=True`` (see the module docstring: |last| more layer forwards, for a peak lower only by
    what the layers after the stack save). ``recompute_context`` as in :func:`checkpoint`.
    """
    where = "checkpoint_sequential"
    layers = _as_layers(layers, where)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(checkpoint_last, bool):
        raise TypeError(f"{where}: checkpoint_last must be a bool, got {checkpoint_last!r}")
    if isinstance(segments, (list, tuple)):
        plan = _check_plan(segments, len(layers), where)
    else:
        _check_segments(segments, len(layers), where)
        plan = even_plan(len(layers), segments)
    for i, (start, stop) in enumerate(plan):
        run = _segment_runner(layers, start, stop)
        if i == len(plan) - 1 and not checkpoint_last:
            x = run(x)  # the last segment: its activations are used as soon as the backward pass starts
        else:
            x = checkpoint(run, x, preserve_rng_state=preserve_rng_state, recompute_context=recompute_context)
    return x


# --------------------------------------------------------------------------------------------------------------
# a checkpointed Transformer
# --------------------------------------------------------------------------------------------------------------


class CheckpointedTransformer(nn.Module):
    """An :class:`effedu.model.Transformer` whose blocks run checkpointed per ``segment_plan(n_layers, strategy)``.

    ``strategy`` is anything :func:`segment_plan` takes ("none", "every", "sqrt", an int k = *layers per
    segment*, not the number of segments) or an explicit plan, a list of ``(start, stop)`` pairs such as
    ``even_plan(n_layers, segments)`` (there the int *is* the number of segments).

    It *wraps* the model (same parameters, same ``state_dict`` under ``model.``): ``forward(tokens)`` returns
    exactly the model's logits, and ``backward`` the same gradients, with less activation memory. The embeddings
    and the head run normally. ``checkpoint_model(model, strategy)`` is the same thing as a function.
    """

    def __init__(self, model, strategy="sqrt", *, checkpoint_last=False, preserve_rng_state=True):
        super().__init__()
        from ..model import Transformer

        if not isinstance(model, Transformer):
            raise TypeError(f"CheckpointedTransformer: model must be an effedu.model.Transformer, "
                            f"got {type(model).__name__}")
        if not isinstance(checkpoint_last, bool):
            raise TypeError(f"CheckpointedTransformer: checkpoint_last must be a bool, got {checkpoint_last!r}")
        if not isinstance(preserve_rng_state, bool):
            raise TypeError(f"CheckpointedTransformer: preserve_rng_state must be a bool, got {preserve_rng_state!r}")
        self.model = model
        self.strategy = strategy
        if isinstance(strategy, (list, tuple)):  # an explicit plan of (start, stop) segments
            self.plan = _check_plan(strategy, model.config.n_layers, "CheckpointedTransformer")
        else:
            self.plan = segment_plan(model.config.n_layers, strategy)
        self.checkpoint_last = checkpoint_last
        self.preserve_rng_state = preserve_rng_state

    @property
    def config(self):
        return self.model.config

    def forward(self, tokens, *, mask=None):
        """tokens ``(B, T)`` int64 → logits ``(B, T, vocab)``, the model's own computation."""
        m = self.model
        x = m.embed_tokens(tokens)  # (B, T, d)
        layers = list(m.blocks) if mask is None else [
            (lambda h, block=block: block(h, mask=mask)) for block in m.blocks]
        # the blocks, segment by segment: only segment inputs are saved, the rest recomputed in backward (where
        # the model's auxiliary losses are not recorded a second time)
        x = checkpoint_sequential(layers, self.plan, x, checkpoint_last=self.checkpoint_last,
                                  preserve_rng_state=self.preserve_rng_state,
                                  recompute_context=m.recomputing)  # (B, T, d)
        return m.logits(x)  # (B, T, vocab)

    def extra_repr(self):
        return f"strategy={self.strategy!r}, plan={self.plan}"


def checkpoint_model(model, strategy="sqrt", **kwargs):
    """``CheckpointedTransformer(model, strategy, **kwargs)``: the model's blocks, checkpointed per the plan."""
    return CheckpointedTransformer(model, strategy, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# a memory timeline that keeps counting through the recomputation
# --------------------------------------------------------------------------------------------------------------


def recompute_timeline(model, inputs, loss_fn=None):
    """Live saved-for-backward bytes over one forward + backward, *including the recomputation*.

    ``memory_timeline(model, inputs, loss_fn, through_backward=True)`` (same event dicts, one after each leaf
    module's forward and backward), with the module names of a :class:`CheckpointedTransformer` given relative to
    the wrapped model. The meter stays on during the backward pass, so the tensors a checkpointed segment saves
    when it is recomputed are counted: those forward calls have ``phase="backward"`` and ``" (recompute)"`` after
    the module name. For a plain model this is exactly ``memory_timeline``. The maximum of ``activation_bytes`` is
    the step's peak activation memory.
    """
    where = "recompute_timeline"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable or None, got {type(loss_fn).__name__}")
    events = memory_timeline(model, inputs, loss_fn, through_backward=True)
    if isinstance(model, CheckpointedTransformer):
        for e in events:
            e["module"] = e["module"].removeprefix("model.")
    return events


# benchmark: `python -m effedu.bench checkpoint` (effedu/bench/checkpoint.py)
