"""Row operations of the online softmax, written so that LLVM vectorises them (numba, CPU).

The softmax inside tiled attention evaluates one exp per (query, key) pair: 33 M of them for one n=2048, H=8
forward. numba's scalar ``math.exp`` calls libm once per element and does not vectorise, which made the kernel
2× slower than torch's. We compute ``exp(x) = 2**(x·log2 e)`` the way vector math libraries do:

    n = round(x·log2 e),   r = x − n·ln2 ∈ [−ln2/2, ln2/2]   (ln2 split in a high and a low part, Cody–Waite,
                                                               so r keeps full precision even for |x| ≈ 80)
    exp(r) ≈ Σ_{i ≤ K} r^i / i!                            (Taylor: K=7 for float32, K=13 for float64)
    exp(x) = exp(r)·2**n, 2**n read from a table of the powers of two (a SIMD gather on AVX-512/AVX2)

Every step is plain arithmetic, so LLVM turns the loop into SIMD code without ``fastmath``. Relative error ≤ 2e-7 (float32), ≤ 4e-16 (float64), tested against ``np.exp``. Arguments below −87 (float32) or
−708 (float64) give the smallest normal float instead of a denormal: invisible next to the row maximum's 1.

The row maximum and row sum are the other two reductions of a softmax. A plain ``for j: mx = max(mx, s[j])``
loop is not vectorised (a float reduction may not be reordered without fastmath), so ``row_max`` keeps 16
independent running maxima (lanes) and combines them at the end: the same result, exactly, since max is
associative. ``row_sum`` reorders the sum (``fastmath={"reassoc"}``): a different but fixed rounding order, as
in any BLAS; it sums positive numbers, so the relative error stays at a few ulps.
"""
import math

import numpy as np
from numba import njit, types
from numba.extending import overload

LOG2E = 1.4426950408889634
# ln 2 = hi + lo with hi exactly representable with few mantissa bits, so n·hi is exact (Cody–Waite)
LN2_HI_F32 = 0.693359375
LN2_LO_F32 = -2.12194440e-4
LN2_HI_F64 = 6.93147180369123816490e-01
LN2_LO_F64 = 1.90821492927058770002e-10


# 2**n for the n the clamps allow: n ∈ [−126, 0] (float32), [−1022, 0] (float64); index = n + offset
POW2_F32 = np.ldexp(np.float32(1.0), np.arange(-126, 1)).astype(np.float32)
POW2_F64 = np.ldexp(1.0, np.arange(-1022, 1)).astype(np.float64)


def exp_rows(s, shift, ncols):
    """In place: ``s[i, j] = exp(s[i, j] - shift[i])`` for ``j < ncols[i]``, and 0 for the rest of the row.

    ``shift[i]`` is the running maximum of the allowed columns, so exp's argument is ≤ 0 there; it is clamped
    to [−87, 0] (float32) / [−708, 0] (float64), which keeps the power-of-two table lookup in range for any
    input, including masked columns whose score is above the maximum and rows with ``ncols[i] == 0``.
    """
    raise TypeError("exp_rows is only callable from numba-compiled code")


@overload(exp_rows, jit_options={"cache": True})
def _exp_rows_overload(s, shift, ncols):
    if s.dtype == types.float32:
        return _exp_rows_f32
    if s.dtype == types.float64:
        return _exp_rows_f64
    raise TypeError(f"exp_rows: expected float32 or float64, got {s.dtype}")


def _exp_rows_f32(s, shift, ncols):
    nq, nk = s.shape
    for i in range(nq):
        lim = ncols[i]
        c = shift[i] if lim > 0 else np.float32(0.0)  # a row with nothing to see: all zeros, no inf arithmetic
        for j in range(nk):
            # clamp to [−87, 0]: 2**n stays a normal float32 (exp(−87) ≈ 1.6e−38) and n stays inside the
            # table even for the masked columns j ≥ lim, whose scores may exceed the row maximum
            x = min(max(s[i, j] - c, np.float32(-87.0)), np.float32(0.0))
            n = math.floor(x * np.float32(LOG2E) + np.float32(0.5))
            t = x - n * np.float32(LN2_HI_F32) - n * np.float32(LN2_LO_F32)
            # exp(t) for |t| ≤ ln2/2 by Horner on the Taylor series up to t^7/7!
            p = np.float32(1.0 / 5040.0)
            p = p * t + np.float32(1.0 / 720.0)
            p = p * t + np.float32(1.0 / 120.0)
            p = p * t + np.float32(1.0 / 24.0)
            p = p * t + np.float32(1.0 / 6.0)
            p = p * t + np.float32(0.5)
            p = p * t + np.float32(1.0)
            p = p * t + np.float32(1.0)
            # exp(x) = exp(r) · 2**n
            s[i, j] = p * POW2_F32[np.int32(n) + 126] if j < lim else np.float32(0.0)


def _exp_rows_f64(s, shift, ncols):
    nq, nk = s.shape
    for i in range(nq):
        lim = ncols[i]
        c = shift[i] if lim > 0 else 0.0
        for j in range(nk):
            x = min(max(s[i, j] - c, -708.0), 0.0)
            n = math.floor(x * LOG2E + 0.5)
            t = x - n * LN2_HI_F64 - n * LN2_LO_F64
            # Taylor series up to t^13/13!: truncation error (ln2/2)^14/14! < 1e-17
            p = 1.0 / 6227020800.0
            p = p * t + 1.0 / 479001600.0
            p = p * t + 1.0 / 39916800.0
            p = p * t + 1.0 / 3628800.0
            p = p * t + 1.0 / 362880.0
            p = p * t + 1.0 / 40320.0
            p = p * t + 1.0 / 5040.0
            p = p * t + 1.0 / 720.0
            p = p * t + 1.0 / 120.0
            p = p * t + 1.0 / 24.0
            p = p * t + 1.0 / 6.0
            p = p * t + 0.5
            p = p * t + 1.0
            p = p * t + 1.0
            s[i, j] = p * POW2_F64[np.int64(n) + 1022] if j < lim else 0.0


N_LANES = 16


@njit(cache=True, inline="always")
def row_max(s, i, lim, lanes):
    """max_j s[i, j] for j < lim (lim ≥ 1), with ``lanes`` a scratch vector of N_LANES floats."""
    L = lanes.shape[0]
    for u in range(L):
        lanes[u] = s[i, 0]
    j0 = 0
    while j0 + L <= lim:
        for u in range(L):
            x = s[i, j0 + u]
            lanes[u] = x if x > lanes[u] else lanes[u]
        j0 += L
    mx = lanes[0]
    for u in range(1, L):
        mx = lanes[u] if lanes[u] > mx else mx
    for j in range(j0, lim):
        mx = s[i, j] if s[i, j] > mx else mx
    return mx


@njit(cache=True, fastmath={"reassoc"}, inline="always")
def row_sum(s, i, n):
    """Σ_{j < n} s[i, j]."""
    tot = s.dtype.type(0)
    for j in range(n):
        tot += s[i, j]
    return tot


@njit(cache=True)
def exp_rows_checked(s, shift, ncols):
    """Compiled entry points for tests."""
    exp_rows(s, shift, ncols)


@njit(cache=True)
def row_max_sum_checked(s, lim):
    lanes = np.empty(N_LANES, s.dtype)
    mx = np.empty(s.shape[0], s.dtype)
    sm = np.empty(s.shape[0], s.dtype)
    for i in range(s.shape[0]):
        mx[i] = row_max(s, i, lim, lanes)
        sm[i] = row_sum(s, i, lim)
    return mx, sm
