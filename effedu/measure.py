"""The course's meters: activation memory, memory timelines, peak memory, time, parameters, FLOPs.

Every chapter measures with these, so numbers are comparable across chapters.

* **Activation memory** = the bytes autograd *saves for the backward pass* while a function runs. We see every
  saved tensor through ``torch.autograd.graph.saved_tensors_hooks`` and count each underlying storage once (a
  view and its base share memory). Parameters are not activations and are not counted. On the CPU this number is
  deterministic: notebooks print it and tests compare it with hand-computed byte counts.
* **Memory timeline**: the live saved bytes after each module's forward and after each module's backward (when
  autograd frees what a node saved): the familiar "mountain" of activation memory over a training step.
* **Peak memory**: on a GPU the caching allocator's high-water mark (``torch.cuda.max_memory_allocated``); on the
  CPU the torch profiler's memory events (every allocation and free of torch tensors, summed in time order).
  Memory that numba allocates itself is not seen by either: the kernels say what they allocate.
* **Time**: warm-up, then the median of repeats, with ``torch.cuda.synchronize()`` around GPU work.
* **FLOPs**: closed forms for one Transformer layer (a multiply-add counts 2 FLOPs).
* **Gradients through depth**: the gradient norm per block (:func:`gradient_norms`) and of chosen weights per
  block for one batch (:func:`layer_weight_grad_norms`, Xiong et al. 2020's pre-LN vs post-LN measurement).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
import warnings
import weakref

import torch
import torch.nn as nn

# --------------------------------------------------------------------------------------------------------------
# activation memory: bytes saved for backward
# --------------------------------------------------------------------------------------------------------------


def parameter_storages(*objs):
    """Storage addresses of the parameters and buffers of the modules among ``objs`` (not activations)."""
    ptrs = set()
    for o in objs:
        if isinstance(o, nn.Module):
            for p in list(o.parameters()) + list(o.buffers()):
                ptrs.add(p.untyped_storage().data_ptr())
    return ptrs


def _storage_key(t):
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()


class SavedTensorTracker:
    """Counts storages saved for backward, and which of them are still alive (held by the autograd graph).

    ``with tracker.hooks(): ...`` sees every tensor autograd saves inside; ``total_bytes`` counts each storage
    ever saved once, ``live_bytes`` those still held. Storages in ``exclude_ptrs`` (see :func:`parameter_storages`)
    are not counted. Subclass and override :meth:`pack` to meter something else (the pipeline's peak tracker).
    """

    def __init__(self, exclude_ptrs=()):
        self.exclude = set(exclude_ptrs)
        self.total = {}  # every storage ever saved: key → nbytes
        self.live = {}  # storages currently held: key → [refcount, nbytes]
        self.lock = threading.Lock()

    @property
    def live_bytes(self):
        return sum(n for _, n in self.live.values())

    @property
    def total_bytes(self):
        return sum(self.total.values())

    def _release(self, key):
        with self.lock:
            entry = self.live.get(key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] == 0:
                    del self.live[key]

    def pack(self, t):
        if isinstance(t, nn.Parameter):
            return t
        key, nbytes = _storage_key(t)
        if key[2] in self.exclude or nbytes == 0:
            return t
        with self.lock:
            self.total.setdefault(key, nbytes)
            entry = self.live.setdefault(key, [0, nbytes])
            entry[0] += 1
        holder = _Held(t.detach())  # detached: holding an output must not make a grad_fn → holder cycle
        # when autograd frees what a node saved, the holder dies: the storage is no longer held for backward
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def unpack(x):
        return x.tensor if isinstance(x, _Held) else x

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor



def saved_activation_bytes(fn, *args, **kwargs):
    """Bytes that autograd saves for backward while ``fn(*args, **kwargs)`` runs, each storage counted once.

    Parameters (and buffers) of ``fn`` when it is an ``nn.Module`` (or a bound method of one), and any
    ``nn.Parameter``, are not activations and are excluded. Example: ``torch.exp`` saves its output, so
    ``saved_activation_bytes(torch.exp, x)`` for x of 1000 float32 that requires grad is 4000.
    """
    if not callable(fn):
        raise TypeError(f"saved_activation_bytes: fn must be callable, got {type(fn).__name__}")
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    tracker = SavedTensorTracker(parameter_storages(owner, *args, *kwargs.values()))
    with tracker.hooks():
        out = fn(*args, **kwargs)
    del out
    return tracker.total_bytes


def memory_timeline(model, inputs, loss_fn=None, *, modules=None, through_backward=False):
    """Live activation bytes over one forward + backward of ``model(inputs)``.

    Returns a list of events ``{"phase", "module", "activation_bytes", "allocator_bytes"}``: one after each
    leaf module's forward and one after its backward, plus start/loss/end markers. ``loss_fn(output)`` defaults
    to ``output.float().pow(2).mean()``. ``allocator_bytes`` is ``torch.cuda.memory_allocated()`` on a GPU and
    None on the CPU. ``modules`` restricts the events to those modules (default: all leaf modules).

    ``through_backward=True`` keeps the meter on during the backward pass: what a recomputation (gradient
    checkpointing) saves there is counted too, and a forward call made during the backward pass is recorded as
    ``phase="backward"``, module ``"<name> (recompute)"``. Its maximum is then the step's peak activation memory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memory_timeline: model must be an nn.Module, got {type(model).__name__}")
    if loss_fn is None:
        loss_fn = lambda out: out.float().pow(2).mean()  # noqa: E731
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    tracker = SavedTensorTracker(parameter_storages(model))
    events, state = [], {"backward": False}

    def record(phase, name):
        events.append({
            "phase": phase,
            "module": name,
            "activation_bytes": tracker.live_bytes,
            "allocator_bytes": torch.cuda.memory_allocated(device) if on_gpu else None,
        })

    def on_forward(name):
        def hook(mod, inp, out):
            if state["backward"] and through_backward:
                record("backward", f"{name} (recompute)")
            else:
                record("forward", name)
        return hook

    named = dict(model.named_modules())
    if modules is None:
        watch = [(n, m) for n, m in named.items() if n and not any(True for _ in m.children())]
    else:
        watch = [(n, named[n]) for n in modules]
    handles = []
    for name, mod in watch:
        handles.append(mod.register_forward_hook(on_forward(name)))
        handles.append(mod.register_full_backward_hook(lambda m, gi, go, name=name: record("backward", name)))
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as metered:
            # full backward hooks warn when a module's inputs (token ids, no-grad recomputation) need no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", message=".*does not require grad.*")
            record("forward", "<start>")
            metered.enter_context(tracker.hooks())
            out = model(inputs)
            loss = loss_fn(out)
            if not through_backward:
                metered.close()  # the meter is off for the backward pass
            record("forward", "<loss>")
            del out
            state["backward"] = True
            loss.backward()
            del loss
            metered.close()
            record("backward", "<end>")
    finally:
        for h in handles:
            h.remove()
    return events


# --------------------------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence C++ writes to file descriptor 2 (the profiler's "profiler_start" lines) for the body only.

    fd 2 is process-wide: it is pointed at /dev/null on entry and put back in ``finally``, so it is restored on
    every exit, exceptions included (Python's own ``sys.stderr`` is flushed first so nothing of it is lost).
    """
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no fd 2
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_memory_events(prof):
    """``(time_ns, bytes)`` of every CPU allocation (+) and free (−) that the profiler ``prof`` recorded.

    torch's public API attributes memory to *ops* (``prof.events()``: each op's ``cpu_memory_usage``, allocations
    minus frees inside it), which loses the order of allocations and frees within an op and so the peak. The
    time-ordered stream of memory records is only reachable through the profiler's private ``kineto_results``:
    it is read here and nowhere else. If a torch version lacks it, the fallback orders the ops' *self* memory by
    start time: the same total, a peak resolved per op only (it can be lower than the true one).
    """
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is not None:
        return [(e.start_ns(), e.nbytes()) for e in results.events()
                if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    return [(int(e.time_range.start * 1000), e.self_cpu_memory_usage) for e in prof.events()
            if e.self_cpu_memory_usage]  # pragma: no cover - fallback for a torch without kineto_results


def peak_memory(fn, *args, device=None, **kwargs):
    """Peak bytes allocated *above what was allocated before* while ``fn(*args, **kwargs)`` runs.

    GPU: the caching allocator's high-water mark. CPU: the profiler's allocation/free events of torch tensors,
    summed in time order (deterministic here). Returns ``(peak_bytes, result_of_fn)``.
    """
    if not callable(fn):
        raise TypeError(f"peak_memory: fn must be callable, got {type(fn).__name__}")
    dev = torch.device(device) if device is not None else _guess_device(args, kwargs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base, result
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn(*args, **kwargs)
    events = sorted(_cpu_memory_events(prof))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


def _guess_device(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, nn.Module):
            p = next(a.parameters(), None)
            if p is not None:
                return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------
# time
# --------------------------------------------------------------------------------------------------------------


def time_it(fn, *args, warmup=2, repeat=7, device=None, **kwargs):
    """Median wall time of ``fn(*args, **kwargs)`` in seconds after ``warmup`` calls; GPU work is synchronised."""
    for name, v in (("warmup", warmup), ("repeat", repeat)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup" else 1):
            raise ValueError(f"time_it: {name} must be an int ≥ {0 if name == 'warmup' else 1}, got {v!r}")
    dev = torch.device(device) if device is not None else _guess_device(args, kwargs)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn(*args, **kwargs)
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------------------------
# parameters, bytes, FLOPs
# --------------------------------------------------------------------------------------------------------------


def count_parameters(model, *, trainable_only=False):
    """Number of parameters, each shared tensor counted once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_parameters: model must be an nn.Module, got {type(model).__name__}")
    seen, n = set(), 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def parameter_bytes(model):
    """Bytes of the parameters (each shared tensor once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def tensor_bytes(*tensors):
    """Bytes of tensors' storages, each storage counted once."""
    seen, n = set(), 0
    for t in tensors:
        key, nbytes = _storage_key(t)
        if key not in seen:
            seen.add(key)
            n += nbytes
    return n


def attention_flops(n, d_model, *, n_heads=1, causal=False, s=None):
    """FLOPs of the attention *core* for one sequence: QKᵀ and (weights)·V, 2·n·s·d each (2 per multiply-add).

    Independent of the number of heads (H heads of d/H cost the same as one of d). ``causal`` halves it (a
    kernel that skips the masked half). The projections are counted by :func:`attention_projection_flops`.
    """
    s = n if s is None else s
    flops = 2 * (2 * n * s * d_model)
    return flops // 2 if causal else flops


def attention_projection_flops(n, d_model):
    """Q, K, V and output projections: 4 matmuls of (n × d)·(d × d)."""
    return 4 * 2 * n * d_model * d_model


def ffn_flops(n, d_model, d_ff=None):
    """Position-wise FFN: (n × d)·(d × d_ff) and back."""
    d_ff = 4 * d_model if d_ff is None else d_ff
    return 2 * 2 * n * d_model * d_ff


def layer_flops(n, d_model, d_ff=None, *, causal=False):
    """FLOPs of one Transformer layer's forward, split into its parts (dict)."""
    parts = {
        "attention (QKᵀ, AV)": attention_flops(n, d_model, causal=causal),
        "projections (QKVO)": attention_projection_flops(n, d_model),
        "FFN": ffn_flops(n, d_model, d_ff),
    }
    parts["total"] = sum(parts.values())
    return parts


def _matmul_weights(module, exclude=()):
    """Weights used in matrix multiplies: parameters with ≥ 2 dims, except embedding tables (lookups), each storage
    once within ``module``; ids in ``exclude`` are left out."""
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    seen, total = set(exclude), 0
    for p in module.parameters():
        if p.dim() >= 2 and id(p) not in tables and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _matmul_weights_per_use(model):
    """Like :func:`_matmul_weights`, but a block that appears at several depths (chapter 04's layer sharing: the same
    Block object in several places of ``model.blocks``) is counted at each: sharing saves parameters, not compute."""
    blocks = list(getattr(model, "blocks", None) or [])
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    return sum(_matmul_weights(b) for b in blocks) + _matmul_weights(model, exclude=in_blocks)


def forward_flops(model, seq_len, *, causal=None):
    """FLOPs of one forward pass of one sequence of ``seq_len`` tokens through a Transformer.

    = 2 × (weights of every matrix multiply) × seq_len  +  Σ over layers of ``attention_flops(seq_len, d_model)``.
    A multiply-add is 2 FLOPs; embedding tables are lookups (0 FLOPs); biases, LayerNorm and softmax are left out
    (a few % at these sizes). A block shared by several layers (chapter 04) is counted at every depth it runs at.
    A mixture-of-experts FFN runs k of its experts per token, not all: count it with ``moe_ffn_flops`` (chapter 10).
    ``model`` must have ``.config`` (a ``TransformerConfig``: d_model, n_layers, causal) — the effedu Transformer.
    ``causal`` (default ``model.config.causal``): the attention core counts the n·(n+1)/2 kept pairs as n²/2.
    """
    where = "forward_flops"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None or not all(hasattr(config, a) for a in ("d_model", "n_layers", "causal")):
        raise TypeError(f"{where}: model must have a .config with d_model, n_layers and causal (an effedu "
                        f"Transformer), got {type(model).__name__}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"{where}: seq_len must be a positive int, got {seq_len!r}")
    causal = config.causal if causal is None else bool(causal)
    return (2 * _matmul_weights_per_use(model) * seq_len
            + config.n_layers * attention_flops(seq_len, config.d_model, causal=causal))


def transformer_training_flops(n_params, tokens, *, n_layers, seq_len, d_model, causal=True, backward=True):
    """Closed form of the training compute: ≈ 6·N·D plus the attention term (Kaplan et al. 2020, Table 1).

    Per token, the forward costs 2·N (N = weights of the matrix multiplies, embeddings excluded) plus
    ``n_layers · attention_flops(seq_len, d_model) / seq_len``; the backward costs twice the forward (a gradient for
    the inputs and one for the weights), so training = 3 × forward (``backward=False``: the forward alone, e.g. a
    generator's sampling or a frozen teacher). ``tokens``: how many tokens are processed (batch × seq_len × steps).
    """
    where = "transformer_training_flops"
    for name, v in (("n_params", n_params), ("tokens", tokens), ("n_layers", n_layers), ("seq_len", seq_len),
                    ("d_model", d_model)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name in ("n_params", "tokens") else 1):
            raise ValueError(f"{where}: {name} must be a {'non-negative' if name in ('n_params', 'tokens') else 'positive'}"
                             f" int, got {v!r}")
    per_sequence = 2 * n_params * seq_len + n_layers * attention_flops(seq_len, d_model, causal=causal)
    passes = 3 if backward else 1
    return passes * per_sequence * tokens // seq_len


def training_flops(model, tokens, *, seq_len, causal=None, backward=True):
    """Training FLOPs of ``model`` over ``tokens`` tokens in sequences of ``seq_len``: 3 × :func:`forward_flops` per
    sequence (forward + backward = 2 × forward), × tokens / seq_len. ``backward=False``: forward only.

    ≈ 6·N·D + the attention term (Kaplan et al. 2020). Compare methods at equal compute with it; a method with
    several networks (ELECTRA: generator + discriminator) sums its parts."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"training_flops: tokens must be a non-negative int, got {tokens!r}")
    passes = 3 if backward else 1
    return passes * forward_flops(model, seq_len, causal=causal) * tokens // seq_len


def gradient_norms(model, *, per="block"):
    """‖grad‖₂ per Transformer block (``per="block"``; layer 0 = closest to the input) or per parameter."""
    if per == "block":
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ValueError("gradient_norms: model has no .blocks; use per='parameter'")
        norms = []
        for b in blocks:
            sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in b.parameters() if p.grad is not None)
            norms.append(sq ** 0.5)
        return norms
    if per == "parameter":
        return {n: float(p.grad.detach().float().norm()) for n, p in model.named_parameters() if p.grad is not None}
    raise ValueError(f"gradient_norms: per must be 'block' or 'parameter', got {per!r}")


def layer_weight_grad_norms(model, batch, loss_fn=None, *, weights="ffn.fc2.weight"):
    """‖∂L/∂W‖₂ of chosen weights in each block of ``model.blocks`` for one batch (index 0 = closest to the input).

    Xiong et al. (2020, "On Layer Normalization in the Transformer Architecture", Fig. 3 and Theorem 1) measure the
    gradient norm of each layer's FFN output weight W² at initialisation: for post-LN it grows toward the output
    layer, for pre-LN it stays flat or shrinks, and pre-LN's last-layer gradient is about √L times smaller. This is
    that meter, for any stack with ``.blocks`` (chapters 01 and 12 use it).

    Args:
        batch: the model's inputs (a tensor), or a pair ``(inputs, targets)`` such as an ``effedu.data.Batch``.
        loss_fn: ``loss_fn(output, targets) → scalar`` (``targets`` is None when ``batch`` is a tensor). Default:
            the cross-entropy of logits ``(..., V)`` against ``targets (...)`` (positions equal to -100 ignored), or
            ``output.float().pow(2).mean()`` when there are no targets.
        weights: a parameter name inside a block (default ``"ffn.fc2.weight"``, Xiong's W²), a list of names (one
            norm over them together), or ``"all"`` (every weight matrix of the block, i.e. each parameter with ≥ 2
            dimensions: biases and LayerNorm gains excluded).

    Returns a list of floats, one per block. The gradients come from ``torch.autograd.grad``: the parameters'
    ``.grad`` are left untouched, and the model keeps its mode (call ``model.eval()`` first to switch dropout off).
    """
    where = "layer_weight_grad_norms"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"{where}: model must have a non-empty .blocks (a stack of layers), got {blocks!r}")
    if isinstance(batch, torch.Tensor):
        inputs, targets = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
        inputs, targets = batch
    else:
        raise TypeError(f"{where}: batch must be a tensor of inputs or a pair (inputs, targets) of tensors, "
                        f"got {type(batch).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable loss_fn(output, targets), got {type(loss_fn).__name__}")

    selected = []  # per block: the list of chosen parameters
    for i, block in enumerate(blocks):
        named = dict(block.named_parameters())
        if weights == "all":
            chosen = [p for p in named.values() if p.dim() >= 2]
        else:
            names = [weights] if isinstance(weights, str) else weights
            if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
                raise TypeError(f"{where}: weights must be a parameter name, a list of names or 'all', got {weights!r}")
            missing = [n for n in names if n not in named]
            if missing:
                raise ValueError(f"{where}: block {i} has no parameter {missing[0]!r}; its parameters are "
                                 f"{sorted(named)}")
            chosen = [named[n] for n in names]
        if not chosen:
            raise ValueError(f"{where}: block {i} has no weight matrix (weights='all' selects parameters with ≥ 2 dims)")
        selected.append(chosen)

    output = model(inputs)
    if loss_fn is not None:
        loss = loss_fn(output, targets)
    elif targets is not None:
        # L = mean over scored positions of −log softmax(logits)[target]
        loss = nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]).float(), targets.reshape(-1))
    else:
        loss = output.float().pow(2).mean()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"{where}: the loss must be a scalar tensor, got {loss!r}")
    flat = [p for chosen in selected for p in chosen]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    norms, i = [], 0
    for chosen in selected:
        # ‖g‖₂ over the chosen tensors of the block together: √(Σ g²)
        sq = sum(float(g.detach().float().pow(2).sum()) for g in grads[i:i + len(chosen)] if g is not None)
        norms.append(sq ** 0.5)
        i += len(chosen)
    return norms


__all__ = [
    "SavedTensorTracker", "parameter_storages", "saved_activation_bytes", "memory_timeline", "peak_memory", "time_it", "count_parameters", "parameter_bytes",
    "tensor_bytes", "attention_flops", "attention_projection_flops", "ffn_flops", "layer_flops", "gradient_norms",
    "layer_weight_grad_norms", "forward_flops", "training_flops", "transformer_training_flops",
]
