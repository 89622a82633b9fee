"""Quantization (survey §3.6, second half): store and compute with a few bits instead of 32.

A real number x is written as an integer q on a grid of step ``scale`` (s), shifted by an integer ``zero_point``
(z) — Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", eq. (1):

    x ≈ x̂ = s · (q − z),        q = clamp(round(x / s) + z, q_min, q_max)

* **symmetric** (z = 0): b-bit signed ``q`` in [−(2^{b−1}−1), 2^{b−1}−1] (int8 storage; −2^{b−1} is left out so
  the grid is symmetric and −q never overflows), ``s = max|x| / (2^{b−1}−1)``. Weights are nearly symmetric
  around 0: the usual choice for them.
* **affine** (asymmetric): b-bit unsigned ``q`` in [0, 2^b−1] (uint8 storage) and an *integer* zero point, so
  x = 0 is exactly representable (padding, ReLU zeros): ``s = (max − min) / (2^b − 1)``, ``z = q_min −
  round(min / s)``, with the range [min, max] widened to contain 0. Post-GELU activations are one-sided: affine
  spends the grid where the values are.
* **per-tensor** (``axis=None``): one (s, z) for the tensor; **per-channel** (``axis=d``): one per index along
  dimension d — for a Linear weight (out, in), ``axis=0`` gives every output channel its own scale, so one row
  of large weights does not coarsen the grid of all others.
* **calibration**: ``"minmax"`` uses the extremes; ``"percentile"`` clips at the p-th percentile of |x| (or the
  (100−p)-th / p-th for affine): a few outliers no longer stretch the grid, at the price of clipping them.

Scales and zero points are returned **shaped for broadcasting**: 0-d tensors per tensor, and per channel a
tensor with ``x.dim()`` dimensions, all 1 except ``axis`` (``keepdim``), so ``dequantize`` is just
``(q − z) · s``. ``dequantize`` and ``fake_quantize`` also accept the 1-D per-channel form (with ``axis``).

Rounding is ``round(x · (1/s))``, half to even, computed as torch's own quantisation ops do (multiply by the
reciprocal of the scale), so :func:`fake_quantize` equals ``torch.fake_quantize_per_tensor_affine`` /
``torch.fake_quantize_per_channel_affine`` bit for bit in float32.

**Fake quantisation and the straight-through estimator** (Bengio et al. 2013; Jacob et al. 2018 §3): for
quantisation-aware training the forward pass uses x̂ = s·(clamp(round(x/s)+z, q_min, q_max) − z), whose true
derivative is 0 almost everywhere. The STE passes the gradient straight through where the value was *not*
clamped::

    ∂x̂/∂x := 1  if  q_min ≤ round(x/s) + z ≤ q_max,   else 0

exactly at the boundary (rounded value = q_min or q_max) the gradient is 1, as in torch's op. (Writing the STE
as ``clamp(x, lo, hi)`` plus a detached rounding term depends on clamp's gradient at its boundary, which torch
changed once; here the mask is written out, and the tests hold it to torch's op at and just beyond both ends.)

What this module offers, from scratch (tensor ops + autograd; the int8 product in :mod:`effedu.kernels.int8_matmul`):

* :func:`quantize`, :func:`dequantize`, :func:`calibrate`, :func:`quantization_error`, :func:`fake_quantize`;
* **PTQ with real integers**: :class:`QuantizedLinear` (int8 per-channel weights × dynamic per-token int8
  activations → exact int32 → rescale), :func:`quantize_linears`, :func:`model_bytes`; :func:`ptq` fake-quantises
  weights at any width 2–8 for the size/fidelity sweeps;
* **QAT**: :class:`QATLinear`, :func:`prepare_qat`, :func:`convert_qat`;
* **iPQ** (Stock et al. 2020, "And the Bit Goes Down" / Fan et al. 2020): :func:`product_quantize` (k-means
  codebooks over blocks of weights, Jégou et al. 2011), :func:`pq_reconstruct`, :func:`pq_bytes`, :func:`ipq`;
* **Quant-Noise** (Fan et al. 2020, "Training with Quantization Noise for Extreme Model Compression"):
  :class:`QuantNoise`, :func:`quant_noise`, :func:`strip_quant_noise`.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_bool, check_choice, check_int, check_seed

SCHEMES = ("symmetric", "affine")
CALIBRATIONS = ("minmax", "percentile")
QUANTIZERS = ("int8", "pq")
LINEAR_BACKENDS = ("auto", "torch", "numba", "cuda", "torch._int_mm")
MIN_SCALE = torch.finfo(torch.float32).eps  # the floor torch's observers put under a scale (an all-zero tensor)

__all__ = [
    "SCHEMES", "CALIBRATIONS", "qrange", "calibrate", "quantize", "dequantize", "quantization_error",
    "fake_quantize", "QuantizedLinear", "quantize_linears", "model_bytes", "int_mm_supported", "ptq",
    "QATLinear", "prepare_qat", "convert_qat", "product_quantize", "pq_reconstruct", "pq_bytes", "ipq",
    "QuantNoise", "quant_noise", "strip_quant_noise",
]


# --------------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------------


def _check_bits(bits, where):
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{where}: bits must be an int in 2..8, got {type(bits).__name__} ({bits!r})")
    if not 2 <= bits <= 8:
        raise ValueError(f"{where}: bits must be an int in 2..8, got {bits}")
    return bits


def _check_float(x, name, where):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{where}: {name} is empty (shape {tuple(x.shape)}); nothing to calibrate")
    if not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise ValueError(f"{where}: {name} contains {bad}; quantisation needs finite values")
    return x


def _check_axis(axis, ndim, where):
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{where}: axis must be an int or None, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{where}: axis {axis} is out of range for a tensor with {ndim} dimensions "
                         f"(expected -{ndim} ≤ axis < {ndim})")
    return axis % ndim


def _check_percentile(p, where):
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{where}: percentile must be a number in (0, 100], got {type(p).__name__}")
    if not 0 < p <= 100:
        raise ValueError(f"{where}: percentile must be in (0, 100], got {p}")
    return float(p)


def _scale_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def qrange(bits, scheme="symmetric"):
    """``(q_min, q_max)`` of a b-bit grid: symmetric [−(2^{b−1}−1), 2^{b−1}−1], affine [0, 2^b−1]."""
    _check_bits(bits, "qrange")
    check_choice(scheme, SCHEMES, "scheme", "qrange")
    if scheme == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


# --------------------------------------------------------------------------------------------------------------
# calibration, quantize, dequantize
# --------------------------------------------------------------------------------------------------------------


def _rows(x, axis):
    """x as (C, n): one row per channel (C = 1 for per-tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _shape_like(v, x, axis):
    """A (C,) per-channel vector → broadcastable to x (keepdim), or a 0-d tensor per tensor."""
    if axis is None:
        return v.reshape(())
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return v.reshape(shape)


def _kth(rows, p):
    """Nearest-rank p-th percentile of each row (k = ⌈p/100 · n⌉), and the mirrored (100−p)-th."""
    n = rows.shape[1]
    k = min(n, max(1, math.ceil(p / 100.0 * n)))
    hi = rows.kthvalue(k, dim=1).values
    lo = rows.kthvalue(n + 1 - k, dim=1).values
    return lo, hi


def calibrate(x, bits, *, scheme="symmetric", axis=None, method="minmax", percentile=99.99):
    """Pick the grid for ``x``: returns ``(scale, zero_point, qmin, qmax)``.

    ``scale`` (float32, float64 for float64 x) and ``zero_point`` (int32) are 0-d tensors when ``axis`` is None,
    else shaped for broadcasting against ``x`` (size ``x.shape[axis]`` along ``axis``, 1 elsewhere).

        symmetric:  s = max|x| / q_max,                         z = 0
        affine:     s = (max' − min') / (q_max − q_min),        z = clamp(q_min − round(min'/s), q_min, q_max)
                    with min' = min(min x, 0), max' = max(max x, 0)   (0 must be on the grid)

    ``method="percentile"`` replaces max|x| (resp. min, max) by the nearest-rank ``percentile``-th percentile of
    |x| (resp. the (100 − p)-th and p-th percentiles of x). Scales are floored at float32's eps (an all-zero
    channel gets a harmless grid instead of a division by zero), as torch's observers do.
    """
    where = "calibrate"
    _check_bits(bits, where)
    check_choice(scheme, SCHEMES, "scheme", where)
    check_choice(method, CALIBRATIONS, "calibration method", where)
    _check_float(x, "x", where)
    axis = _check_axis(axis, x.dim(), where)
    p = _check_percentile(percentile, where)
    qmin, qmax = qrange(bits, scheme)
    rows = _rows(x.detach().to(_scale_dtype(x)), axis)
    if scheme == "symmetric":
        a = rows.abs()
        amax = a.amax(dim=1) if method == "minmax" else _kth(a, p)[1]
        scale = (amax / qmax).clamp_min(MIN_SCALE)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        if method == "minmax":
            lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        else:
            lo, hi = _kth(rows, p)
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(MIN_SCALE)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return _shape_like(scale, x, axis), _shape_like(zp, x, axis), qmin, qmax


def _broadcast_params(x, scale, zero_point, axis, where):
    """scale / zero_point as tensors broadcastable to x: accepts numbers, 0-d, 1-D per-channel (with axis), keepdim."""
    axis = _check_axis(axis, x.dim(), where)
    sdtype = _scale_dtype(x)
    out = []
    for name, v, dtype in (("scale", scale, sdtype), ("zero_point", zero_point, None)):
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
            raise TypeError(f"{where}: {name} must be a number or a tensor, got {type(v).__name__}")
        if name == "zero_point" and isinstance(v, float):
            raise TypeError(f"{where}: zero_point must be an integer, got the float {v}")
        t = torch.as_tensor(v, device=x.device)
        if name == "zero_point" and t.dtype.is_floating_point:
            if not bool((t == torch.round(t)).all()):
                raise ValueError(f"{where}: zero_point must hold integers, got {t}")
        t = t.to(dtype) if dtype is not None else t.to(torch.int32)
        if t.dim() == 1 and x.dim() != 1 and t.numel() != 1:
            if axis is None:
                raise ValueError(f"{where}: a 1-D {name} of {t.numel()} values is per channel: give its axis")
            if t.numel() != x.shape[axis]:
                raise ValueError(f"{where}: {name} has {t.numel()} values but x has {x.shape[axis]} channels "
                                 f"along axis {axis}")
            shape = [1] * x.dim()
            shape[axis] = -1
            t = t.reshape(shape)
        elif t.dim() == 1 and x.dim() == 1 and axis is None and t.numel() not in (1,):
            raise ValueError(f"{where}: a {name} with {t.numel()} values needs axis=0 for a 1-D x")
        # broadcastable without changing x's shape (torch.broadcast_shapes would import sympy: seconds, once)
        if t.dim() > x.dim() or any(a not in (1, b) for a, b in zip(reversed(t.shape), reversed(x.shape))):
            raise ValueError(f"{where}: {name} of shape {tuple(t.shape)} does not broadcast against x of shape "
                             f"{tuple(x.shape)}")
        out.append(t)
    scale, zp = out
    if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{where}: scale must be positive and finite, got {scale}")
    return scale, zp


def quantize(x, bits=8, *, scheme="symmetric", axis=None, calibration="minmax", percentile=99.99):
    """Quantise ``x``: returns ``(q, scale, zero_point)`` with ``x ≈ (q − zero_point) · scale``.

    symmetric → ``q`` int8 in [−(2^{b−1}−1), 2^{b−1}−1], zero_point 0; affine → ``q`` uint8 in [0, 2^b−1] and an
    integer zero point in that range. ``axis``: per-channel along that dimension (see :func:`calibrate` for the
    broadcastable shapes of scale and zero_point). Inside the calibrated range the round-trip error
    |x − dequantize(q, …)| is at most scale/2.
    """
    scale, zp, qmin, qmax = calibrate(x, bits, scheme=scheme, axis=axis, method=calibration, percentile=percentile)
    xs = x.detach().to(scale.dtype)
    q = (torch.round(xs * (1.0 / scale)) + zp).clamp(qmin, qmax)
    return q.to(torch.int8 if scheme == "symmetric" else torch.uint8), scale, zp


def dequantize(q, scale, zero_point, *, axis=None):
    """``(q − zero_point) · scale`` in the scale's float dtype (1-D per-channel scale/zero_point need ``axis``)."""
    where = "dequantize"
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{where}: q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype.is_floating_point or q.dtype == torch.bool or q.dtype.is_complex:
        raise TypeError(f"{where}: q must be an integer tensor (int8 / uint8 from quantize), got {q.dtype}")
    sdtype = scale.dtype if isinstance(scale, torch.Tensor) and scale.dtype.is_floating_point else torch.float32
    probe = torch.empty(q.shape, dtype=sdtype, device=q.device)
    s, z = _broadcast_params(probe, scale, zero_point, axis, where)
    return (q.to(s.dtype) - z.to(s.dtype)) * s


def quantization_error(x, bits, **kw):
    """How much a round trip through :func:`quantize` / :func:`dequantize` changes ``x``.

    ``kw``: the keywords of :func:`quantize` (scheme, axis, calibration, percentile). Returns a dict of floats:
    ``mse``, ``max_abs``, ``rel_rms`` = ‖x − x̂‖/‖x‖ and ``sqnr_db`` = 10·log10(‖x‖²/‖x − x̂‖²) (inf when exact).
    """
    q, s, z = quantize(x, bits, **kw)
    xh = dequantize(q, s, z)
    xd = x.detach().to(xh.dtype)
    err = xd - xh
    e2, x2 = float(err.pow(2).sum()), float(xd.pow(2).sum())
    return {
        "mse": e2 / x.numel(),
        "max_abs": float(err.abs().max()),
        "rel_rms": math.sqrt(e2 / x2) if x2 > 0 else 0.0,
        "sqnr_db": 10 * math.log10(x2 / e2) if e2 > 0 and x2 > 0 else math.inf,
    }


# --------------------------------------------------------------------------------------------------------------
# fake quantisation with the straight-through estimator
# --------------------------------------------------------------------------------------------------------------


class _FakeQuantizeSTE(torch.autograd.Function):
    """x̂ = (clamp(round(x·(1/s)) + z, q_min, q_max) − z)·s; backward: g · [q_min ≤ round(x·(1/s)) + z ≤ q_max]."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        s = scale.to(x.dtype)
        z = zero_point.to(x.dtype)
        xq = torch.round(x * (1.0 / s)) + z
        keep = (xq >= qmin) & (xq <= qmax)  # the STE's mask: 1 at the boundary itself, 0 beyond it
        ctx.save_for_backward(keep)
        return (xq.clamp(qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype), None, None, None, None


def _check_qminmax(qmin, qmax, where):
    for name, v in (("qmin", qmin), ("qmax", qmax)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{where}: {name} must be an int, got {type(v).__name__} ({v!r})")
    if qmin >= qmax:
        raise ValueError(f"{where}: need qmin < qmax, got qmin={qmin}, qmax={qmax}")


def fake_quantize(x, scale, zero_point, qmin, qmax, *, axis=None):
    """Quantise and dequantise in one differentiable step, with the straight-through estimator.

    ``scale``/``zero_point``: numbers or tensors — 0-d per tensor; per channel either shaped for broadcasting
    (as :func:`calibrate` returns them) or 1-D with ``axis``. Forward equals torch's
    ``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine``; the gradient w.r.t. ``x`` is 1
    where ``q_min ≤ round(x/s) + z ≤ q_max`` (boundaries included) and 0 outside, as theirs. No gradient flows to
    ``scale`` (learned scales, LSQ, are another technique).
    """
    where = "fake_quantize"
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{where}: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    _check_qminmax(qmin, qmax, where)
    s, z = _broadcast_params(x, scale, zero_point, axis, where)
    if not bool(((z >= qmin) & (z <= qmax)).all()):
        raise ValueError(f"{where}: zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}]")
    return _FakeQuantizeSTE.apply(x, s, z, qmin, qmax)


# --------------------------------------------------------------------------------------------------------------
# real int8 inference: QuantizedLinear
# --------------------------------------------------------------------------------------------------------------


def int_mm_supported(M, K, N, device):
    """Whether ``torch._int_mm`` takes an (M, K) × (K, N) int8 product on ``device``.

    On CUDA it needs M > 16 and K, N multiples of 8; on the CPU (oneDNN) the pinned torch accepts any shape.
    """
    if torch.device(device).type == "cuda":
        return M > 16 and K % 8 == 0 and N % 8 == 0
    return True


def _int8_product(a, b, backend):
    """int8 (M, K) × int8 (K, N) → int32 through effedu's kernel, or torch._int_mm (production comparison)."""
    from ..kernels.int8_matmul import int8_matmul

    if backend == "torch._int_mm":
        if int_mm_supported(a.shape[0], a.shape[1], b.shape[1], a.device):
            return torch._int_mm(a, b)
        backend = "auto"  # shapes torch._int_mm refuses: effedu's kernel instead
    return int8_matmul(a, b, backend=backend)


def _per_row_symmetric(x2):
    """Dynamic per-token symmetric int8: s_i = max_k |x_ik| / 127, q = clamp(round(x/s), −127, 127)."""
    s = (x2.abs().amax(dim=1) / 127.0).clamp_min(MIN_SCALE)
    q = torch.round(x2 * (1.0 / s)[:, None]).clamp(-127, 127)
    return q, s


def _per_row_affine(x2):
    """Dynamic per-token affine uint8: s_i = (max' − min')/255, z_i = clamp(−round(min'/s), 0, 255)."""
    lo = x2.amin(dim=1).clamp_max(0)
    hi = x2.amax(dim=1).clamp_min(0)
    s = ((hi - lo) / 255.0).clamp_min(MIN_SCALE)
    z = (-torch.round(lo / s)).clamp(0, 255)
    q = (torch.round(x2 * (1.0 / s)[:, None]) + z[:, None]).clamp(0, 255)
    return q, s, z


class QuantizedLinear(nn.Module):
    """An ``nn.Linear`` computed in integers: int8 weights × dynamic int8 activations → exact int32 → float.

    Weights, once (symmetric, per output channel n): ``W[n, k] ≈ s_w[n] · Wq[n, k]``, Wq int8 in [−127, 127].
    Activations, every call (per token i = per row of the flattened input):

    * ``act_scheme="symmetric"``: ``x[i, k] ≈ s_x[i] · Xq[i, k]`` and

          y[i, n] = s_x[i] · s_w[n] · Σ_k Xq[i, k] · Wq[n, k]  + b[n]              (the sum: int8_matmul, int32)

    * ``act_scheme="affine"``: ``x[i, k] ≈ s_x[i] · (Xq[i, k] − z[i])``, Xq uint8 in [0, 255]. The kernel is
      int8 × int8, so Xq is shifted by 128 into int8, A = Xq − 128, and the zero point becomes a correction
      term with the column sums of Wq (computed once):

          Σ_k (Xq − z)·Wq = Σ_k (A + 128 − z)·Wq = Σ_k A[i, k]·Wq[n, k]  +  (128 − z[i]) · Σ_k Wq[n, k]
          y[i, n] = s_x[i] · s_w[n] · ( int8_matmul(A, Wqᵀ)[i, n] + (128 − z[i]) · colsum[n] ) + b[n]

    ``backend``: the int8 kernel's (``"auto"``, ``"torch"``, ``"numba"``, ``"cuda"``), or ``"torch._int_mm"``
    — torch's oneDNN/cuBLAS int8 GEMM, the production comparison; where its shape constraints fail
    (:func:`int_mm_supported`) the call falls back to effedu's kernel. Inference only (integers have no
    gradient): the weights are buffers and the input is detached, so the output carries no autograd graph.
    """

    def __init__(self, in_features, out_features, bias=True, *, backend="auto", act_scheme="symmetric"):
        super().__init__()
        where = "QuantizedLinear"
        check_int(in_features, "in_features", where)
        check_int(out_features, "out_features", where)
        check_choice(backend, LINEAR_BACKENDS, "backend", where)
        check_choice(act_scheme, SCHEMES, "act_scheme", where)
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.act_scheme = backend, act_scheme
        # Wq stored (out, in) contiguous, nn.Linear's layout; the kernel's b operand (K, N) is its transposed view,
        # column-major — the layout torch._int_mm (oneDNN) and effedu's numba kernel (which reads bᵀ rows) prefer
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear, *, backend="auto", act_scheme="symmetric"):
        """Quantise ``linear``'s weight (symmetric int8, one scale per output channel); bias kept in float32."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantizedLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, backend=backend,
                act_scheme=act_scheme).to(linear.weight.device)
        with torch.no_grad():
            q, s, _ = quantize(linear.weight.detach().float(), 8, scheme="symmetric", axis=0)
            m.weight_int8.copy_(q)
            m.weight_scale.copy_(s.reshape(-1))
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach().float())
        return m

    @property
    def weight_int8_t(self):
        """Wqᵀ ``(in, out)``: the kernel's ``b`` operand (a transposed view, no copy)."""
        return self.weight_int8.t()

    def dequantized_weight(self):
        """s_w[n] · Wq[n, k]: the float weight this layer computes with."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def weight_bytes(self):
        """Bytes of the int8 weight (1 per element) + its float32 scales (the bias is not counted)."""
        return self.weight_int8.numel() + self.weight_scale.numel() * self.weight_scale.element_size()

    def forward(self, x):
        where = "QuantizedLinear"
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{where}: x must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{where}: x must end in in_features={self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, self.in_features).float()
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        if self.act_scheme == "symmetric":
            q, s = _per_row_symmetric(x2)
            acc = _int8_product(q.to(torch.int8), self.weight_int8_t, self.backend)  # exact int32
        else:
            q, s, z = _per_row_affine(x2)
            a = (q - 128).to(torch.int8)  # uint8 [0, 255] shifted into int8 [−128, 127]
            acc = _int8_product(a, self.weight_int8_t, self.backend).to(torch.int64)
            colsum = self.weight_int8.sum(dim=1, dtype=torch.int64)  # Σ_k Wq[n, k]  (O(K·N), beside O(M·K·N))
            acc = acc + (128 - z.to(torch.int64))[:, None] * colsum[None, :]  # the zero-point correction term
        # rescale: y = s_x[i]·s_w[n]·acc[i, n] (+ b) — float32 (|acc| < 2²⁴ is exact; beyond, 1 ulp of float32)
        y = acc.to(torch.float32).mul_(s[:, None]).mul_(self.weight_scale[None, :])
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend!r}, act_scheme={self.act_scheme!r}")


def _encoder_linears(model, where, types=(nn.Linear,), skip=()):
    """``(qualified name, parent, attribute, module)`` of every module of ``types`` inside ``model.blocks``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise ValueError(f"{where}: model has no .blocks (the encoder layers); effedu's Transformer and "
                         f"BertEncoder have them")
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"{where}: skip must be a tuple of name patterns (str), got {skip!r}")
    found = []
    for name, parent in blocks.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, types):
                full = ".".join(p for p in ("blocks", name, attr) if p)
                if any(fnmatch.fnmatchcase(full, pat) or fnmatch.fnmatchcase(attr, pat) for pat in skip):
                    continue
                found.append((full, parent, attr, child))
    return found


def quantize_linears(model, *, backend="auto", skip=(), act_scheme="symmetric"):
    """Replace, in place, every ``nn.Linear`` inside ``model.blocks`` by a :class:`QuantizedLinear`.

    ``skip``: name patterns (``fnmatch``) matched against the full name (``"blocks.0.ffn.fc2"``) or the last
    part (``"fc2"``). Returns the number of layers replaced. Embeddings, LayerNorms and heads outside the blocks
    stay float.
    """
    where = "quantize_linears"
    check_choice(backend, LINEAR_BACKENDS, "backend", where)
    found = _encoder_linears(model, where, skip=skip)
    for _, parent, attr, lin in found:
        setattr(parent, attr, QuantizedLinear.from_linear(lin, backend=backend, act_scheme=act_scheme))
    return len(found)


def _storage_id(t):
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def model_bytes(model, *, overrides=None):
    """Bytes of the model's saved state (``state_dict``: parameters + persistent buffers, each tensor once).

    int8 weights count 1 byte per element (their ``element_size``). ``overrides``: ``{id(tensor): bytes}`` to
    count a tensor at another width (:func:`ptq` uses it for b-bit weights stored in float).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_bytes: model must be an nn.Module, got {type(model).__name__}")
    overrides = overrides or {}
    seen, n = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = _storage_id(t)
        if key in seen:
            continue
        seen.add(key)
        n += overrides.get(id(t), t.numel() * t.element_size())
    return n


# --------------------------------------------------------------------------------------------------------------
# PTQ at any width (fake-quantised weights, for sweeps)
# --------------------------------------------------------------------------------------------------------------


def ptq(model, bits, *, scheme="symmetric", per_channel=True, calibration="minmax", percentile=99.99):
    """Post-training quantisation of the weights of every ``nn.Linear`` in ``model.blocks``, in place.

    Each weight is replaced by its b-bit grid value ``dequantize(quantize(W, bits, ...))`` (per output channel
    with ``per_channel``); activations are left in float (weights-only PTQ, what the size axis measures).
    Returns the model's byte size at that width: each quantised weight counts ⌈numel·b/8⌉ bytes plus 4 bytes per
    scale (and 1 per affine zero point); everything else at its dtype (:func:`model_bytes`).
    """
    where = "ptq"
    _check_bits(bits, where)
    check_choice(scheme, SCHEMES, "scheme", where)
    check_bool(per_channel, "per_channel", where)
    check_choice(calibration, CALIBRATIONS, "calibration", where)
    overrides = {}
    with torch.no_grad():
        for _, _, _, lin in _encoder_linears(model, where):
            w = lin.weight
            q, s, z = quantize(w, bits, scheme=scheme, axis=0 if per_channel else None, calibration=calibration,
                               percentile=percentile)
            w.copy_(dequantize(q, s, z).to(w.dtype))
            n_scales = s.numel()
            overrides[id(w)] = math.ceil(w.numel() * bits / 8) + n_scales * (4 + (1 if scheme == "affine" else 0))
    return model_bytes(model, overrides=overrides)


# --------------------------------------------------------------------------------------------------------------
# QAT
# --------------------------------------------------------------------------------------------------------------


class QATLinear(nn.Module):
    """A Linear trained through fake quantisation (Jacob et al. 2018 §3).

    Forward: ``F.linear(fq_a(x), fq_w(W), b)`` where ``fq_w`` is symmetric b-bit (per output channel, scale from
    the current weight's max|W|, treated as a constant) and ``fq_a`` affine ``act_bits``-bit per tensor with a
    running min/max: in training ``min ← (1 − m)·min + m·min(x)`` (first batch: its own min; ``momentum`` m),
    frozen in eval. Both with the straight-through estimator, so the float weights learn to sit well on the grid.
    ``act_bits=None`` leaves activations in float.
    """

    def __init__(self, linear, bits=8, *, per_channel=True, act_bits=8, momentum=0.1):
        super().__init__()
        where = "QATLinear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{where}: linear must be an nn.Linear, got {type(linear).__name__}")
        self.bits = _check_bits(bits, where)
        self.act_bits = None if act_bits is None else _check_bits(act_bits, where)
        self.per_channel = check_bool(per_channel, "per_channel", where)
        if not 0 < momentum <= 1:
            raise ValueError(f"{where}: momentum must be in (0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("act_min", torch.zeros((), device=linear.weight.device))
        self.register_buffer("act_max", torch.zeros((), device=linear.weight.device))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool, device=linear.weight.device))

    def weight_fake_quant(self):
        w = self.weight
        qmin, qmax = qrange(self.bits, "symmetric")
        rows = w.detach().abs().reshape(w.shape[0], -1) if self.per_channel else w.detach().abs().reshape(1, -1)
        s = (rows.amax(dim=1) / qmax).clamp_min(MIN_SCALE)
        s = s[:, None] if self.per_channel else s.reshape(())
        return fake_quantize(w, s, 0, qmin, qmax)

    def act_fake_quant(self, x):
        if self.act_bits is None:
            return x
        if self.training:
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach())
                if not bool(self.observed):
                    self.act_min.copy_(lo)
                    self.act_max.copy_(hi)
                    self.observed.fill_(True)
                else:
                    self.act_min.lerp_(lo.to(self.act_min.dtype), self.momentum)
                    self.act_max.lerp_(hi.to(self.act_max.dtype), self.momentum)
        if not bool(self.observed):  # eval before any training batch: calibrate on this one
            lo, hi = torch.aminmax(x.detach())
        else:
            lo, hi = self.act_min, self.act_max
        qmin, qmax = qrange(self.act_bits, "affine")
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        s = ((hi - lo) / (qmax - qmin)).clamp_min(MIN_SCALE)
        z = (qmin - torch.round(lo / s)).clamp(qmin, qmax)
        return fake_quantize(x, s.to(_scale_dtype(x)), z.to(torch.int32), qmin, qmax)

    def forward(self, x):
        return F.linear(self.act_fake_quant(x), self.weight_fake_quant(), self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"act_bits={self.act_bits}, per_channel={self.per_channel}")


def prepare_qat(model, bits, *, per_channel=True, act_bits=8, skip=()):
    """Wrap every ``nn.Linear`` in ``model.blocks`` in a :class:`QATLinear` (in place; the same Parameters are
    kept, so an optimiser made before still works). Returns ``model``; train it as usual."""
    where = "prepare_qat"
    _check_bits(bits, where)
    for _, parent, attr, lin in _encoder_linears(model, where, skip=skip):
        setattr(parent, attr, QATLinear(lin, bits, per_channel=per_channel, act_bits=act_bits))
    return model


def convert_qat(model, *, backend="auto"):
    """Turn every :class:`QATLinear` in ``model.blocks`` into an inference layer, in place; returns ``model``.

    8-bit weights → a :class:`QuantizedLinear` (real int8 weights, dynamic per-token int8 activations); below 8
    bits → an ``nn.Linear`` whose weight is the b-bit grid value (there is no sub-byte kernel here; activations
    then stay float, as in :func:`ptq`).
    """
    where = "convert_qat"
    for _, parent, attr, m in _encoder_linears(model, where, types=(QATLinear,)):
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None).to(m.weight.device)
        with torch.no_grad():
            lin.weight.copy_(m.weight_fake_quant())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        if m.bits == 8:
            setattr(parent, attr, QuantizedLinear.from_linear(lin, backend=backend))
        else:
            setattr(parent, attr, lin)
    return model


# --------------------------------------------------------------------------------------------------------------
# iPQ: product quantisation of weights (k-means codebooks over blocks)
# --------------------------------------------------------------------------------------------------------------


def _subvectors(weight, block_size, where):
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.dim() != 2:
        raise TypeError(f"{where}: weight must be a 2-D floating-point tensor (out, in), got "
                        f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    check_int(block_size, "block_size", where)
    out_f, in_f = weight.shape
    if in_f % block_size:
        raise ValueError(f"{where}: block_size={block_size} must divide the weight's in_features={in_f}")
    # each row's input features cut into blocks of block_size consecutive columns: (out·in/bs, bs)
    return weight.reshape(out_f, in_f // block_size, block_size).reshape(-1, block_size)


def _assign(x, codebook, chunk=2048):
    """Index of the nearest centroid of each row of x: argmin_k ‖C_k‖² − 2·x·C_k (‖x‖² is the same for every k).

    float32 distances in cache-sized chunks (a near tie may pick the second nearest; :func:`product_quantize`
    then keeps the old code, so its objective still never rises).
    """
    x, codebook = x.float(), codebook.float()
    c2 = codebook.pow(2).sum(dim=1)
    ct = codebook.t().contiguous()
    codes = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        codes[i:i + chunk] = torch.addmm(c2, x[i:i + chunk], ct, alpha=-2.0).argmin(dim=1)
    return codes


def product_quantize(weight, block_size, n_centroids, *, iters=20, seed=0):
    """k-means over the weight's sub-vectors (Jégou et al. 2011; Stock et al. 2020): one shared codebook.

    ``weight`` (out, in) is cut into ``out · in / block_size`` sub-vectors of ``block_size`` consecutive input
    columns; Lloyd's algorithm (init: ``n_centroids`` distinct sub-vectors drawn with ``seed``) alternates

        assign:  c(j) = argmin_k ‖w_j − C_k‖²         update:  C_k = mean{ w_j : c(j) = k }   (empty: unchanged)

    Each step can only lower the objective J = Σ_j ‖w_j − C_c(j)‖², so the returned history (J after each
    assignment, ``iters + 1`` values) is non-increasing. Returns ``(codebook (n_centroids, block_size), codes
    (n_blocks,) int64, history list of floats)``; the codebook has the weight's dtype.
    """
    where = "product_quantize"
    sub = _subvectors(weight, block_size, where).detach().to(torch.float64)
    check_int(n_centroids, "n_centroids", where)
    check_int(iters, "iters", where)
    check_seed(seed, where)
    n = sub.shape[0]
    if n_centroids > n:
        raise ValueError(f"{where}: n_centroids={n_centroids} exceeds the number of blocks {n}")
    if not bool(torch.isfinite(sub).all()):
        raise ValueError(f"{where}: weight contains NaN or inf")
    g = torch.Generator().manual_seed(seed)
    codebook = sub[torch.randperm(n, generator=g)[:n_centroids].to(sub.device)].clone()
    history = []
    codes = _assign(sub, codebook)
    for it in range(iters + 1):
        history.append(float((sub - codebook[codes]).pow(2).sum()))
        if it == iters:
            break
        sums = torch.zeros_like(codebook).index_add_(0, codes, sub)
        counts = torch.bincount(codes, minlength=n_centroids)
        filled = counts > 0
        updated = codebook.clone()
        updated[filled] = sums[filled] / counts[filled, None].to(sub.dtype)
        # the mean minimises Σ‖w − C‖² over its cluster; guard the last bit of float rounding all the same
        if float((sub - updated[codes]).pow(2).sum()) <= history[-1]:
            codebook = updated
        new_codes = _assign(sub, codebook)
        # keep a code where the new nearest is no nearer (ties / rounding): the objective never goes up
        old_d = (sub - codebook[codes]).pow(2).sum(dim=1)
        new_d = (sub - codebook[new_codes]).pow(2).sum(dim=1)
        codes = torch.where(new_d < old_d, new_codes, codes)
    return codebook.to(weight.dtype), codes, history


def pq_reconstruct(codebook, codes, shape, block_size):
    """The weight product quantisation stands for: ``codebook[codes]`` laid back out as ``shape`` (out, in)."""
    where = "pq_reconstruct"
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or codebook.shape[1] != block_size:
        raise ValueError(f"{where}: codebook must be (n_centroids, block_size={block_size}), got "
                         f"{tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__}")
    out_f, in_f = shape
    if codes.numel() * block_size != out_f * in_f:
        raise ValueError(f"{where}: {codes.numel()} codes × block_size {block_size} ≠ {out_f}×{in_f} weights")
    return codebook[codes].reshape(out_f, in_f)


def pq_bytes(codebook, codes):
    """Storage of a product-quantised weight: codes at ⌈log2(n_centroids)⌉ bits each (packed) + the codebook."""
    k = codebook.shape[0]
    code_bits = max(1, math.ceil(math.log2(k)))
    return math.ceil(codes.numel() * code_bits / 8) + codebook.numel() * codebook.element_size()


def ipq(model, block_size, n_centroids, *, finetune=None, iters=20, seed=0, skip=()):
    """Iterative product quantisation (Stock et al. 2020), in place: one layer (``model.blocks[l]``) at a time.

    For each encoder layer in turn, every ``nn.Linear`` weight in it is product-quantised
    (:func:`product_quantize`), replaced by its reconstruction and frozen (``requires_grad=False``); then, if
    ``finetune`` is given, ``finetune(model)`` trains the parameters still in float so they make up for the
    error (the "iterative" of iPQ) before the next layer is quantised. Returns a dict: ``bytes`` (the model size
    with PQ weights counted by :func:`pq_bytes`), ``layers`` (names quantised), ``objective`` (final k-means
    objective per layer name).
    """
    where = "ipq"
    if finetune is not None and not callable(finetune):
        raise TypeError(f"{where}: finetune must be a callable finetune(model) or None, got {type(finetune).__name__}")
    found = _encoder_linears(model, where, skip=skip)
    groups = {}
    for full, parent, attr, lin in found:
        groups.setdefault(full.split(".")[1], []).append((full, lin))
    overrides, names, objective = {}, [], {}
    for _, layers in groups.items():
        for full, lin in layers:
            cb, codes, hist = product_quantize(lin.weight.detach(), block_size, n_centroids, iters=iters, seed=seed)
            with torch.no_grad():
                lin.weight.copy_(pq_reconstruct(cb, codes, lin.weight.shape, block_size))
            lin.weight.requires_grad_(False)
            overrides[id(lin.weight)] = pq_bytes(cb, codes)
            names.append(full)
            objective[full] = hist[-1]
        if finetune is not None:
            finetune(model)
    return {"bytes": model_bytes(model, overrides=overrides), "layers": names, "objective": objective}


# --------------------------------------------------------------------------------------------------------------
# Quant-Noise
# --------------------------------------------------------------------------------------------------------------


class QuantNoise(nn.Module):
    """Quant-Noise (Fan et al. 2020): train with a random fraction ``p`` of weight blocks quantised.

    A block = ``block_size`` consecutive input columns of one output row (the iPQ sub-vector). In training, each
    forward draws a mask b_j ~ Bernoulli(p) per block and computes with

        W̃ = b ⊙ quant(W) + (1 − b) ⊙ W,      gradient through quant(·) by the straight-through estimator

    so the network learns to tolerate the quantisation it will get, while most of the gradient stays unbiased
    (p = 1 is plain QAT; the paper finds p ≈ 0.05–0.2 best for iPQ). ``quantizer="int8"``: quant = symmetric
    8-bit (``bits``) fake quantisation per output channel; ``"pq"``: each block replaced by its nearest centroid
    of a codebook fitted once (``n_centroids``, re-fit with :meth:`refit`). In eval the layer is the float Linear.
    (fairseq's ``quant_noise`` uses *dropping* blocks, with 1/(1 − p) rescaling, as a cheap proxy for PQ noise;
    here the blocks really are quantised.)
    """

    def __init__(self, linear, p, block_size, quantizer="int8", *, bits=8, n_centroids=256, iters=10, seed=0):
        super().__init__()
        where = "QuantNoise"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{where}: module must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"{where}: p must be a number in [0, 1], got {type(p).__name__}")
        if not 0 <= p <= 1:
            raise ValueError(f"{where}: p must be a number in [0, 1], got {p!r}")
        check_choice(quantizer, QUANTIZERS, "quantizer", where)
        check_int(block_size, "block_size", where)
        if linear.in_features % block_size:
            raise ValueError(f"{where}: block_size={block_size} must divide in_features={linear.in_features}")
        self.linear, self.p, self.block_size, self.quantizer = linear, float(p), block_size, quantizer
        self.bits = _check_bits(bits, where)
        self.n_centroids = min(check_int(n_centroids, "n_centroids", where),
                               linear.weight.numel() // block_size)
        self.iters, self.seed = iters, seed
        self.register_buffer("codebook", None)
        if quantizer == "pq":
            self.refit()

    def refit(self):
        """Fit the PQ codebook to the current weight (``quantizer="pq"``)."""
        cb, _, _ = product_quantize(self.linear.weight.detach(), self.block_size, self.n_centroids,
                                    iters=self.iters, seed=self.seed)
        self.codebook = cb

    def quantized_weight(self):
        """quant(W) with the STE (differentiable, gradient 1 where not clamped)."""
        w = self.linear.weight
        if self.quantizer == "int8":
            qmin, qmax = qrange(self.bits, "symmetric")
            s = (w.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(MIN_SCALE)
            return fake_quantize(w, s, 0, qmin, qmax)
        sub = w.detach().reshape(-1, self.block_size)
        codes = _assign(sub, self.codebook)
        wq = self.codebook[codes].reshape(w.shape).to(w.dtype)
        return w + (wq - w).detach()  # straight through

    def noisy_weight(self):
        w = self.linear.weight
        if self.p == 0:
            return w
        out_f, in_f = w.shape
        mask = torch.rand(out_f, in_f // self.block_size, device=w.device) < self.p
        mask = mask.repeat_interleave(self.block_size, dim=1)
        return torch.where(mask, self.quantized_weight(), w)

    def forward(self, x):
        if not self.training or self.p == 0:
            return self.linear(x)
        return F.linear(x, self.noisy_weight(), self.linear.bias)

    def extra_repr(self):
        return f"p={self.p}, block_size={self.block_size}, quantizer={self.quantizer!r}"


def strip_quant_noise(model):
    """Replace every :class:`QuantNoise` inside ``model`` by the Linear it wraps (after training), in place;
    returns the number unwrapped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"strip_quant_noise: model must be an nn.Module, got {type(model).__name__}")
    found = [(parent, attr, child) for _, parent in model.named_modules()
             for attr, child in parent.named_children() if isinstance(child, QuantNoise)]
    for parent, attr, child in found:
        setattr(parent, attr, child.linear)
    return len(found)


def quant_noise(module, p, block_size, quantizer="int8", **kw):
    """Quant-Noise on ``module``: an ``nn.Linear`` → its :class:`QuantNoise` wrapper; a model with ``.blocks`` →
    every ``nn.Linear`` inside wrapped in place (returns the model). ``kw``: :class:`QuantNoise`'s keywords."""
    if isinstance(module, nn.Linear):
        return QuantNoise(module, p, block_size, quantizer, **kw)
    for _, parent, attr, lin in _encoder_linears(module, "quant_noise"):
        setattr(parent, attr, QuantNoise(lin, p, block_size, quantizer, **kw))
    return module
