"""Survey §4: attention variants, one module per family, all behind one signature.

Every attention function takes ``q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv)`` and keyword arguments
``causal=False`` and ``mask=None`` (boolean, broadcastable to ``(B, H, T, S)``, True = may attend), and returns
``(B, H, T, Dv)``. A function that can also return its attention weights accepts ``return_weights=True``.

The registry lets a model pick its attention by name: ``TransformerConfig(attention="dense")``. It is the table
:data:`BUILTIN` below — name → ``"module:object"`` — read on :func:`get`, which imports that one module the first
time the name is asked for (so ``import effedu.attention`` stays light and nothing is imported to be found). A
chapter that adds a variant adds one line to the table; the ``@register("name")`` above the function in its own
module marks it where the reader meets it and checks that the table points at it.

A learner's own variant is registered at run time, from anywhere:

    from effedu.attention import register

    @register("local2")
    def my_local_attention(q, k, v, *, causal=False, mask=None, window=64): ...

Variants with parameters of their own (Linformer's projections, say) register an ``nn.Module`` subclass instead;
the model builds one per layer with ``cls(config)`` and calls it like a function (:func:`is_module_factory`).
"""
from __future__ import annotations

import importlib

import torch.nn as nn

# name → "module:attribute" of every attention the course ships, by chapter
BUILTIN = {
    # chapter 01: the materialised reference and the tiled kernel
    "dense": "effedu.attention.dense:softmax_attention",
    "tiled": "effedu.attention.dense:tiled_attention",
    # chapter 04: Reformer's shared queries and keys
    "shared_qk": "effedu.attention.shared_qk:shared_qk_attention",
    # chapter 15: fixed sparse patterns
    "local": "effedu.attention.sparse:local_attention",
    "strided": "effedu.attention.sparse:strided_attention",
    "fixed": "effedu.attention.sparse:fixed_attention",
    "longformer": "effedu.attention.sparse:longformer_attention",
    "bigbird": "effedu.attention.sparse:bigbird_attention",
    "blockwise": "effedu.attention.sparse:blockwise_attention",
    "block_sparse": "effedu.attention.sparse:block_sparse",
    "star": "effedu.attention.sparse:star_attention",
    "logsparse": "effedu.attention.sparse:logsparse_attention",
    "blockbert": "effedu.attention.sparse:blockbert_attention",
    # chapter 16: learned sparse attention
    "lsh": "effedu.attention.lsh:lsh_attention",
    "entmax": "effedu.attention.entmax:entmax_attention",
    "routing": "effedu.attention.routing:RoutingAttention",
    "sinkhorn": "effedu.attention.sinkhorn:SinkhornAttention",
    "sparsebert": "effedu.attention.learned_mask:LearnedMaskAttention",
    # chapter 17: low rank
    "linformer": "effedu.attention.lowrank:LinformerAttention",
    "nystrom": "effedu.attention.lowrank:nystrom_attention",
    "synthesizer_dense": "effedu.attention.lowrank:DenseSynthesizerAttention",
    "synthesizer_random": "effedu.attention.lowrank:RandomSynthesizerAttention",
    # chapter 18: kernels instead of the softmax
    "linear": "effedu.attention.kernelized:linear_attention",
    "performer": "effedu.attention.kernelized:PerformerAttention",
    "clustered": "effedu.attention.kernelized:clustered_attention",
    "clustered_improved": "effedu.attention.kernelized:improved_clustered_attention",
    # chapter 19: memory-efficient exact attention (the tiled kernel, differentiable on every backend)
    "memory_efficient": "effedu.attention.memory_efficient:memory_efficient_attention",
}

_RESOLVED: dict = {}  # built-in names already imported → their object
_USER: dict = {}  # names registered at run time → their object


def _where(obj):
    return f"{getattr(obj, '__module__', None)}:{getattr(obj, '__qualname__', None)}"


def register(name, obj=None):
    """Register an attention function (or nn.Module subclass) under ``name``; usable as a decorator.

    For a name of :data:`BUILTIN` this only checks that the table points at ``obj`` (the technique modules mark
    their variants this way); any other name is added to the run-time registry. Re-registering the same function
    (a notebook cell run twice) is fine; a different one under a taken name is an error.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: name must be a non-empty str, got {name!r}")

    def deco(o):
        if not callable(o):
            raise TypeError(f"register({name!r}): expected a function or nn.Module subclass, got {type(o).__name__}")
        if name in BUILTIN:
            if _where(o) != BUILTIN[name] and _RESOLVED.get(name) is not o:
                raise ValueError(f"register: the attention name {name!r} is already taken by the built-in "
                                 f"{BUILTIN[name]}")
            return o
        previous = _USER.get(name)
        if previous is not None and previous is not o and getattr(previous, "__qualname__", None) != getattr(o, "__qualname__", None):
            raise ValueError(f"register: the attention name {name!r} is already taken by {previous!r}")
        _USER[name] = o
        return o

    return deco(obj) if obj is not None else deco


def available():
    """Sorted names of every attention variant: the built-in table and those registered at run time."""
    return sorted(set(BUILTIN) | set(_USER))


def get(name):
    """The attention registered under ``name`` (a function, or an nn.Module subclass)."""
    if not isinstance(name, str):
        raise TypeError(f"attention name must be a str, got {type(name).__name__}")
    if name in _USER:
        return _USER[name]
    if name not in BUILTIN:
        raise ValueError(f"unknown attention {name!r}; registered: {', '.join(available())}")
    if name not in _RESOLVED:
        # "module:attribute" → import the module (once), take the attribute
        module, attr = BUILTIN[name].split(":")
        _RESOLVED[name] = getattr(importlib.import_module(module), attr)
    return _RESOLVED[name]


def is_module_factory(obj):
    """True for a registered nn.Module subclass (built per layer with ``cls(config)``)."""
    return isinstance(obj, type) and issubclass(obj, nn.Module)


__all__ = ["BUILTIN", "register", "get", "available", "is_module_factory"]
