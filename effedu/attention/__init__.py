"""Survey §4: attention variants, one module per family, all behind one signature.

Every attention function takes ``q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv)`` and keyword arguments
``causal=False`` and ``mask=None`` (boolean, broadcastable to ``(B, H, T, S)``, True = may attend), and returns
``(B, H, T, Dv)``. A function that can also return its attention weights accepts ``return_weights=True``.

The registry lets a model pick its attention by name: ``TransformerConfig(attention="dense")``. A chapter adds a
variant by registering it in its own module, with no change here:

    from effedu.attention import register

    @register("local")
    def local_attention(q, k, v, *, causal=False, mask=None, window=64): ...

Variants with parameters of their own (Linformer's projections, say) register an ``nn.Module`` subclass instead;
the model builds one per layer with ``cls(config)`` and calls it like a function. Names are looked up lazily: on
a miss, every module of this package is imported once, so a new module is found without being listed anywhere.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch.nn as nn

_REGISTRY: dict = {}
_SCANNED = False


def register(name, obj=None):
    """Register an attention function (or nn.Module subclass) under ``name``; usable as a decorator."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: name must be a non-empty str, got {name!r}")

    def deco(o):
        if not callable(o):
            raise TypeError(f"register({name!r}): expected a function or nn.Module subclass, got {type(o).__name__}")
        previous = _REGISTRY.get(name)
        if previous is not None and previous is not o and getattr(previous, "__qualname__", None) != getattr(o, "__qualname__", None):
            raise ValueError(f"register: the attention name {name!r} is already taken by {previous!r}")
        _REGISTRY[name] = o
        return o

    return deco(obj) if obj is not None else deco


def _scan():
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available():
    """Sorted names of every registered attention variant."""
    _scan()
    return sorted(_REGISTRY)


def get(name):
    """The attention registered under ``name`` (a function, or an nn.Module subclass)."""
    if not isinstance(name, str):
        raise TypeError(f"attention name must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        _scan()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention {name!r}; registered: {', '.join(available())}")
    return _REGISTRY[name]


def is_module_factory(obj):
    """True for a registered nn.Module subclass (built per layer with ``cls(config)``)."""
    return isinstance(obj, type) and issubclass(obj, nn.Module)


__all__ = ["register", "get", "available", "is_module_factory"]
