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
import warnings

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .._checks import check_tokens
from ..measure import _SavedTensorTracker, _parameter_storages

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
    "BENCHMARKS",
]

STRATEGIES = ("none", "every", "sqrt")  # and any int k ≥ 1: segments of k layers


# --------------------------------------------------------------------------------------------------------------
# replaying random and autocast state
# --------------------------------------------------------------------------------------------------------------


def _cuda_devices(tensors):
    return sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in tensors if t.is_cuda})


class _RngState:
    """The CPU generator's state and that of every CUDA device the inputs live on, at one moment."""

    def __init__(self, tensors):
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in _cuda_devices(tensors)}

    def restore(self):
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda.items():
            torch.cuda.set_rng_state(state, d)


@contextlib.contextmanager
def _replay_rng(stashed, tensors):
    """Inside: the generators are where they were when ``stashed`` was taken. After: back to where they are now."""
    if stashed is None:
        yield
        return
    now = _RngState(tensors)
    stashed.restore()
    try:
        yield
    finally:
        now.restore()


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
    def forward(ctx, fn, preserve_rng_state, dummy, *args):
        # autograd is off inside a custom Function's forward: fn's intermediates are not saved
        ctx.fn = fn
        ctx.tensor_index = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.other_args = [None if i in ctx.tensor_index else a for i, a in enumerate(args)]
        tensors = [args[i] for i in ctx.tensor_index]
        # the random state fn is about to see, to be replayed in the recomputation
        ctx.rng = _RngState(tensors) if preserve_rng_state else None
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
        with _replay_rng(ctx.rng, detached), torch.enable_grad(), _replay_autocast(ctx.autocast):
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
        # one gradient per forward input: fn, preserve_rng_state, dummy, *args
        return (None, None, None, *grads)


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


def checkpoint(fn, *args, preserve_rng_state=True):
    """``fn(*args)`` that saves only its tensor inputs and recomputes its intermediates in the backward pass.

    ``fn`` returns a tensor or a tuple of tensors. ``args`` may mix tensors (with or without ``requires_grad``)
    and other values (passed through unchanged). Parameters used inside ``fn`` receive their gradients in the
    backward pass, as with ``torch.utils.checkpoint``. ``preserve_rng_state=True`` replays the random state so
    dropout inside ``fn`` draws the same mask when recomputed. With autograd off (``torch.no_grad()``) this is
    plainly ``fn(*args)``.
    """
    if not callable(fn):
        raise TypeError(f"checkpoint: fn must be callable, got {type(fn).__name__}")
    if not isinstance(preserve_rng_state, bool):
        raise TypeError(f"checkpoint: preserve_rng_state must be a bool, got {preserve_rng_state!r}")
    if not torch.is_grad_enabled():
        return _check_output(fn(*args))  # nothing would be saved anyway
    # When no input requires grad, autograd would not record the Function at all, and the parameters inside fn
    # would get no gradient (torch's reentrant variant warns and drops them). A 0-byte leaf that requires grad
    # keeps the Function in the graph.
    needs_dummy = not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    dummy = torch.empty(0, requires_grad=True) if needs_dummy else None
    return _CheckpointFunction.apply(fn, preserve_rng_state, dummy, *args)


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


def checkpoint_sequential(layers, segments, x, *, checkpoint_last=False, preserve_rng_state=True):
    """Run ``x`` through ``layers`` in checkpointed segments.

    ``segments`` is the number of segments (an int, split by :func:`even_plan`, as in
    ``torch.utils.checkpoint.checkpoint_sequential``; note that :func:`segment_plan`'s int is the number of
    *layers per segment* instead) or a plan from :func:`segment_plan`. Every segment but the last is checkpointed; the last runs normally unless
    ``checkpoint_last=True`` (see the module docstring: |last| more layer forwards, for a peak lower only by
    what the layers after the stack save).
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
            x = checkpoint(run, x, preserve_rng_state=preserve_rng_state)
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
        B, T = check_tokens(tokens, m.config, "CheckpointedTransformer")
        pos = torch.arange(T, device=tokens.device)
        x = m.drop(m.tok_emb(tokens) + m.pos_emb(pos))  # (B, T, d)
        layers = list(m.blocks) if mask is None else [
            (lambda h, block=block: block(h, mask=mask)) for block in m.blocks]
        # the blocks, segment by segment: only segment inputs are saved, the rest recomputed in backward
        x = checkpoint_sequential(layers, self.plan, x, checkpoint_last=self.checkpoint_last,
                                  preserve_rng_state=self.preserve_rng_state)  # (B, T, d)
        return m.head(m.ln_f(x))  # (B, T, vocab)

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

    Like :func:`effedu.measure.memory_timeline` (same event dicts, one after each leaf module's forward and
    backward), but the meter stays on during the backward pass, so the tensors a checkpointed segment saves when
    it is recomputed are counted. Forward calls made during the backward pass are recomputations: their events
    have ``phase="backward"`` and ``" (recompute)"`` after the module name. For a plain model this is exactly
    ``memory_timeline``. The maximum of ``activation_bytes`` is the step's peak activation memory.
    """
    where = "recompute_timeline"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if loss_fn is None:
        loss_fn = lambda out: out.float().pow(2).mean()  # noqa: E731
    elif not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable or None, got {type(loss_fn).__name__}")
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    tracker = _SavedTensorTracker(_parameter_storages(model))
    events, state = [], {"backward": False}

    def record(phase, name):
        events.append({"phase": phase, "module": name, "activation_bytes": tracker.live_bytes,
                       "allocator_bytes": torch.cuda.memory_allocated(device) if on_gpu else None})

    def on_forward(name):
        def hook(mod, inp, out):
            if state["backward"]:
                record("backward", f"{name} (recompute)")
            else:
                record("forward", name)
        return hook

    def short(name):
        return name[len("model."):] if isinstance(model, CheckpointedTransformer) else name

    watch = [(short(n), m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    handles = []
    for name, mod in watch:
        handles.append(mod.register_forward_hook(on_forward(name)))
        handles.append(mod.register_full_backward_hook(lambda m, gi, go, name=name: record("backward", name)))
    try:
        with warnings.catch_warnings():
            # full backward hooks warn when a module's inputs need no gradient (token ids, no-grad forwards)
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", message=".*does not require grad.*")
            record("forward", "<start>")
            with tracker.hooks():
                out = model(inputs)
                loss = loss_fn(out)
                record("forward", "<loss>")
                del out
                state["backward"] = True
                loss.backward()
                del loss
            record("backward", "<end>")
    finally:
        for h in handles:
            h.remove()
    return events


# --------------------------------------------------------------------------------------------------------------
# benchmark: python -m effedu.bench checkpoint
# --------------------------------------------------------------------------------------------------------------


def bench_checkpoint(args):
    """Gradient checkpointing: saved activation bytes and step time of plain / every layer / √L vs torch."""
    import time

    import torch.utils.checkpoint as tuc

    from ..measure import saved_activation_bytes
    from ..model import Transformer, TransformerConfig

    torch.set_num_threads(args.threads)
    L, d, T, B = (9, 32, 32, 2) if args.quick else (12, 256, 512, 8)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=d, n_heads=4, n_layers=L, d_ff=4 * d, max_len=T)
    model = Transformer(cfg)
    tokens = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))

    class TorchEveryLayer(nn.Module):  # the oracle: torch.utils.checkpoint around every block but the last
        def __init__(self, reentrant):
            super().__init__()
            self.m, self.reentrant = model, reentrant

        def forward(self, tok):
            m = self.m
            x = m.drop(m.tok_emb(tok) + m.pos_emb(torch.arange(tok.shape[1])))
            for i, blk in enumerate(m.blocks):
                x = tuc.checkpoint(blk, x, use_reentrant=self.reentrant) if i < L - 1 else blk(x)
            return m.head(m.ln_f(x))

    variants = {
        "plain": model,
        "effedu every layer": CheckpointedTransformer(model, "every"),
        f"effedu √L {segment_plan(L, 'sqrt')}": CheckpointedTransformer(model, "sqrt"),
        "torch.utils.checkpoint every layer (reentrant)": TorchEveryLayer(True),
        "torch.utils.checkpoint every layer (non-reentrant)": TorchEveryLayer(False),
    }

    def step(fn):
        model.zero_grad(set_to_none=True)
        fn(tokens).float().pow(2).mean().backward()

    saved = {name: saved_activation_bytes(fn, tokens) for name, fn in variants.items()}
    # time: each variant in turn (one untimed step first, so the allocator settles on that variant's memory —
    # interleaving single steps favours whichever variant follows a bigger one), rounds in forward then reverse
    # order, the fastest step per variant: robust to other work on the machine
    rounds, repeat = 2, (3 if args.quick else 2)
    names = list(variants)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            step(variants[name])
            for _ in range(repeat):
                t0 = time.perf_counter()
                step(variants[name])
                times[name].append(time.perf_counter() - t0)
    best = {name: min(ts) for name, ts in times.items()}
    plain_bytes, t_plain = saved["plain"], best["plain"]
    width = max(len(n) for n in variants)
    header = f"{'variant':{width}s} | {'saved MiB':>9} | {'vs plain':>8} | {'step ms':>8} | {'time ×':>6}"
    lines = [f"gradient checkpointing: Transformer L={L}, d={d}, T={T}, B={B}, float32, {args.threads} threads; "
             f"time = fastest of {rounds * repeat} forward+backward steps",
             header, "-" * len(header)]
    for name in variants:
        lines.append(f"{name:{width}s} | {saved[name] / 2**20:9.1f} | {saved[name] / plain_bytes:8.1%} | "
                     f"{best[name] * 1e3:8.1f} | {best[name] / t_plain:5.2f}×")
    # the memory model from the plain model at two depths: a = one layer, base = the rest, c = one checkpoint
    one = Transformer(cfg.replace(n_layers=1))
    one.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not k.startswith("blocks.") or k.startswith("blocks.0.")})
    b1 = saved_activation_bytes(one, tokens)
    a = (plain_bytes - b1) // (L - 1)
    base, c = b1 - a, B * T * d * 4
    names = list(variants)
    lines.append("")
    for name, strategy in ((names[1], "every"), (names[2], "sqrt")):
        pred = predicted_activation_bytes(segment_plan(L, strategy), a, c, base)
        lines.append(f"{name}: measured {saved[name] / 2**20:.2f} MiB, predicted base + (k−1)·c + |last|·a = "
                     f"{pred / 2**20:.2f} MiB ({(saved[name] - pred) / pred:+.1%})")
    lines.append(f"time overhead (target ≤ 1.5×, one extra forward): every layer {best[names[1]] / t_plain:.2f}×, "
                 f"√L {best[names[2]] / t_plain:.2f}×, torch non-reentrant {best[names[4]] / t_plain:.2f}×")
    return "\n".join(lines)


BENCHMARKS = {"checkpoint": bench_checkpoint}
