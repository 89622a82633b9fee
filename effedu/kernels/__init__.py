"""The course's hot loops: one op, three backends, one signature.

    from effedu import kernels
    out = kernels.attention(q, k, v, causal=True, backend="numba")   # "torch" | "numba" | "cuda" | "auto"
    kernels.backends()   # {"torch": "ok", "numba": "ok", "cuda": "no GPU (simulator off)"}

``"auto"`` picks ``"cuda"`` for CUDA tensors on a real GPU, ``"numba"`` for float32/float64 CPU tensors, and
``"torch"`` otherwise. It never picks the CUDA simulator: under ``NUMBA_ENABLE_CUDASIM=1``
``numba.cuda.is_available()`` is True, so the simulator is only used when asked for by name (that is how the
tests exercise the CUDA kernels on machines without a GPU).

Adding a kernel for a later chapter = a new module here holding its torch / numba / cuda versions side by side
and its public, validating entry point (which calls :func:`resolve_backend`), re-exported lazily below:

    kernels.block_sparse_attention(q, k, v, layout, block_size=64)      # chapter 15 (kernels/block_sparse.py)
    kernels.causal_linear_attention(phi_q, phi_k, v)                    # chapter 18 (kernels/linear_attention.py)
"""
from __future__ import annotations

import os

import torch

from .._checks import check_positive_int, check_qkv, check_scale

BACKENDS = ("torch", "numba", "cuda")


def simulator_enabled():
    """True when numba's CUDA simulator is switched on (``NUMBA_ENABLE_CUDASIM=1`` before numba was imported)."""
    try:
        from numba import config

        return bool(config.ENABLE_CUDASIM)
    except Exception:  # pragma: no cover - numba missing
        return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def _numba_status():
    try:
        import numba  # noqa: F401
        import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls BLAS through scipy)
        import threadpoolctl  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        return f"unavailable: {e} (pip install numba scipy threadpoolctl)"
    return "ok"


def _cuda_status():
    if simulator_enabled():
        return "simulator (NUMBA_ENABLE_CUDASIM=1: correct but slow, tests only)"
    if not torch.cuda.is_available():
        return "no GPU (torch.cuda.is_available() is False; simulator off)"
    try:
        from numba import cuda

        if not cuda.is_available():
            return "GPU seen by torch but not by numba.cuda (install the CUDA toolkit / cuda-python bindings)"
    except Exception as e:  # pragma: no cover - depends on the install
        return f"numba.cuda failed to load: {e}"
    return "ok"


def backends():
    """Which kernel backends are live here, and why not: ``{"torch": "ok", "numba": "ok", "cuda": "..."}``."""
    return {"torch": "ok", "numba": _numba_status(), "cuda": _cuda_status()}


def cuda_usable():
    """A real GPU that numba.cuda can drive (the simulator does not count)."""
    return _cuda_status() == "ok"


def resolve_backend(backend, device, dtype, where):
    """Turn ``backend`` (possibly ``"auto"``) into a concrete backend name, or raise a clear error."""
    if not isinstance(backend, str):
        raise TypeError(f"{where}: backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        if device.type == "cuda" and cuda_usable():
            return "cuda"
        if device.type == "cpu" and dtype in (torch.float32, torch.float64) and _numba_status() == "ok":
            return "numba"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {backend!r}; expected one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if backend in ("numba", "cuda") and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{where}: backend {backend!r} supports float32 and float64, got {dtype}; use backend='torch'")
    if backend == "numba":
        status = _numba_status()
        if status != "ok":
            raise RuntimeError(f"{where}: backend 'numba' is {status}")
        if device.type != "cpu":
            raise ValueError(f"{where}: backend 'numba' needs CPU tensors, got device {device}; use 'cuda' or 'torch'")
    if backend == "cuda":
        if simulator_enabled():
            if device.type != "cpu":
                raise ValueError(f"{where}: the CUDA simulator works on CPU tensors, got device {device}")
        elif not cuda_usable():
            raise RuntimeError(
                f"{where}: backend 'cuda' is not usable here ({_cuda_status()}); use backend='numba' (CPU) or "
                f"'torch', or set NUMBA_ENABLE_CUDASIM=1 before importing numba to run the kernel in the simulator"
            )
        elif device.type != "cuda":
            raise ValueError(f"{where}: backend 'cuda' needs CUDA tensors, got device {device}; move them with .cuda()")
    return backend


DEFAULT_BLOCK = {"torch": 256, "numba": 256, "cuda": 32}


class _TiledAttention(torch.autograd.Function):
    """Forward by the chosen backend; backward by recomputation from the saved log-sum-exp (chapter 19).

    Saved for backward: q, k, v (the caller holds them anyway), out and lse — O(T·D), never the T×S weights.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, name, block_size):
        fwd = {"torch": tiled_attention.attention_torch, "numba": tiled_attention.attention_numba,
               "cuda": tiled_attention.attention_cuda}[name]
        with torch.no_grad():  # the torch reference must not record its own graph (that would store every tile)
            out, lse = fwd(q, k, v, causal=causal, scale=scale, block_size=block_size)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.name, ctx.block_size = causal, scale, name, block_size
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        bwd = {"torch": tiled_attention.attention_backward_torch, "numba": tiled_attention.attention_backward_numba,
               "cuda": tiled_attention.attention_backward_cuda}[ctx.name]
        dq, dk, dv = bwd(q, k, v, out, lse, dout.contiguous(), causal=ctx.causal, scale=ctx.scale,
                         block_size=ctx.block_size)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, *, causal=False, scale=None, backend="auto", block_size=None, return_lse=False):
    """Exact softmax attention, tiled (online softmax): never materialises the T×S score matrix.

    q ``(B, H, T, D)``, k ``(B, H, S, D)``, v ``(B, H, S, Dv)`` → ``(B, H, T, Dv)`` in q's dtype.
    ``causal``: query i attends to keys j ≤ i (top-left aligned, as SDPA). ``scale`` defaults to 1/√D.
    ``block_size``: tile edge (queries and keys per tile); defaults 256 (torch, numba) and 32 (cuda).
    ``return_lse=True`` also returns the per-row log-sum-exp ``(B, H, T)`` (not differentiable).

    Differentiable on every backend: the backward recomputes the weights tile by tile from the saved
    log-sum-exp (numba and CUDA backward kernels; torch ops for ``"torch"``), so training memory is O(T·D) too.
    """
    where = "attention"
    B, H, T, S, D, Dv = check_qkv(q, k, v, where=where)
    scale = check_scale(scale, D, where)
    if not isinstance(causal, bool):
        raise TypeError(f"{where}: causal must be a bool, got {type(causal).__name__}")
    name = resolve_backend(backend, q.device, q.dtype, where)
    if block_size is None:
        block_size = DEFAULT_BLOCK[name]
    check_positive_int(block_size, "block_size", where)
    if name == "cuda" and block_size not in (8, 16, 32, 64, 128):
        raise ValueError(f"{where}: block_size for backend 'cuda' must be one of 8, 16, 32, 64, 128 (threads per block), got {block_size}")
    out, lse = _TiledAttention.apply(q, k, v, causal, float(scale), name, block_size)
    return (out, lse) if return_lse else out


from . import tiled_attention  # noqa: E402  (the implementations, readable as kernels.tiled_attention)

# entry points of later chapters' kernels, imported on first use (each lives in its own module)
_LAZY = {
    "block_sparse_attention": "block_sparse",
    "causal_linear_attention": "linear_attention",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["attention", "backends", "cuda_usable", "resolve_backend", "simulator_enabled", "BACKENDS",
           "block_sparse_attention", "causal_linear_attention"]
