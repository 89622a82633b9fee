"""float16 matrix products on a CPU, emulated: float16 in, float32 accumulate, float16 out.

**float16 on a CPU.** torch runs float16 matmuls on the CPU, but on CPUs without float16 matrix instructions they
are slow (measured on the course machine: a (2048×64)·(64×256) product over 10× slower in float16 than in
float32, while bfloat16 is faster than float32). :func:`emulated_fp16_matmul` therefore *emulates* float16 matrix
products: float16 inputs are widened to float32 (exact), multiplied and summed in float32, and the result is
rounded to float16 — the same contract as a GPU tensor core (float16 in, float32 accumulate, float16 out). Every
tensor stays float16; only the matmul kernels run in float32.
:class:`~effedu.general.precision.MixedPrecisionModel` switches it on by itself for float16 on a CPU.

How: a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sits *below* autograd, so it sees every matmul
that runs — the forward's and the backward's — as an ``aten`` op. For the matrix-product ops (``mm``, ``bmm``,
``addmm``, ``baddbmm``, ``mv``, ``addmv``, ``dot``) with a float16 argument it widens the float16 arguments to
float32, calls the same op, and rounds the result to float16; every other op passes through untouched.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["emulated_fp16_matmul"]

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default, _aten.bmm.default, _aten.addmm.default, _aten.baddbmm.default, _aten.mv.default,
            _aten.addmv.default, _aten.dot.default}
_emulation = threading.local()


class _Float16MatmulInFloat32(TorchDispatchMode):
    """Below autograd, each float16 matmul (forward *and* backward) is widened to float32 and rounded back."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == torch.float16 for a in args):
            # C₁₆ = round₁₆(A₃₂ · B₃₂), A₃₂ = A₁₆ exactly: a tensor core's contract
            wide = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a for a in args]
            return func(*wide, **kwargs).to(torch.float16)
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_fp16_matmul(enabled=True):
    """Inside this block, float16 matrix products run as float32 kernels with the result rounded to float16.

    Numerically the same as a float16 matmul that accumulates in float32 (up to summation order); much faster on
    CPUs without float16 matrix instructions. Other ops are untouched. Re-entrant; ``enabled=False`` does nothing.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"emulated_fp16_matmul: enabled must be a bool, got {type(enabled).__name__}")
    if not enabled or getattr(_emulation, "depth", 0) > 0:
        yield
        return
    _emulation.depth = 1
    try:
        with _Float16MatmulInFloat32():
            yield
    finally:
        _emulation.depth = 0
