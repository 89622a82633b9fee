"""16-bit matrix products on a CPU, emulated: float16 / bfloat16 in, float32 accumulate, float16 / bfloat16 out.

**float16 on a CPU.** torch runs float16 matmuls on the CPU, but on CPUs without float16 matrix instructions they
are slow (measured on the course machine: a (2048×64)·(64×256) product over 10× slower in float16 than in
float32). bfloat16 is the same story on CPUs without bfloat16 matrix units (AVX512-BF16, AMX): on the course
machine (AMD EPYC, Zen 3, AVX2) the same product is about 25× slower in bfloat16 than in float32, and a bfloat16
training step of chapter 07's model spends 88 % of its time in ``mm``/``bmm``/``addmm``.
:func:`emulated_fp16_matmul` therefore *emulates* float16 matrix products (:func:`emulated_16bit_matmul` float16
and bfloat16 ones): float16 inputs are widened to float32 (exact), multiplied and summed in float32, and the result is
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

__all__ = ["emulated_fp16_matmul", "emulated_16bit_matmul"]

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default, _aten.bmm.default, _aten.addmm.default, _aten.baddbmm.default, _aten.mv.default,
            _aten.addmv.default, _aten.dot.default}
_emulation = threading.local()


class _MatmulInFloat32(TorchDispatchMode):
    """Below autograd, each 16-bit matmul (forward *and* backward) is widened to float32 and rounded back."""

    def __init__(self, dtypes):
        super().__init__()
        self.dtypes = frozenset(dtypes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS:
            low = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in self.dtypes]
            if low:
                # C₁₆ = round₁₆(A₃₂ · B₃₂), A₃₂ = A₁₆ exactly: a tensor core's contract
                wide = [a.float() if isinstance(a, torch.Tensor) and a.dtype in self.dtypes else a for a in args]
                return func(*wide, **kwargs).to(low[0])
        return func(*args, **kwargs)


@contextlib.contextmanager
def _emulated(dtypes, enabled, where):
    if not isinstance(enabled, bool):
        raise TypeError(f"{where}: enabled must be a bool, got {type(enabled).__name__}")
    if not enabled or getattr(_emulation, "depth", 0) > 0:
        yield
        return
    _emulation.depth = 1
    try:
        with _MatmulInFloat32(dtypes):
            yield
    finally:
        _emulation.depth = 0


def emulated_fp16_matmul(enabled=True):
    """Inside this block, float16 matrix products run as float32 kernels with the result rounded to float16.

    Numerically the same as a float16 matmul that accumulates in float32 (up to summation order); much faster on
    CPUs without float16 matrix instructions. Other ops are untouched. Re-entrant; ``enabled=False`` does nothing.
    """
    return _emulated((torch.float16,), enabled, "emulated_fp16_matmul")


def emulated_16bit_matmul(enabled=True):
    """As :func:`emulated_fp16_matmul`, for float16 *and* bfloat16 matrix products (each rounded back to its own
    dtype): a bfloat16 GEMM that accumulates in float32, as oneDNN's and a GPU's do, on CPUs without bfloat16 units."""
    return _emulated((torch.float16, torch.bfloat16), enabled, "emulated_16bit_matmul")
