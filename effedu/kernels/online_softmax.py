"""The online softmax, tile by tile, for the numba CPU kernels (tiled attention and block-sparse attention).

One step of the online softmax (Milakov & Gimelshein 2018; Dao et al. 2022) folds a tile of keys into the running
state of a tile of queries — running maximum m, normaliser l, unnormalised output acc:

    s_ij = (q_i · k_j)·scale,  m_new = max(m_i, max_j s_ij),  α = exp(m_i − m_new),  p_ij = exp(s_ij − m_new)
    l_i = α l_i + Σ_j p_ij,    acc_i = α acc_i + Σ_j p_ij v_j

(:func:`online_softmax_tile`); the backward recomputes one tile's weights from the saved log-sum-exp
(:func:`recompute_tile`). Both spend their time in two BLAS products and three row operations — exp, row
maximum, row sum — written below so that LLVM vectorises them.

The softmax inside tiled attention evaluates one exp per (query, key) pair: 33 M of them for one n=2048, H=8
forward. numba's scalar ``math.exp`` calls libm once per element and does not vectorise. We compute
``exp(x) = 2**(x·log2 e)`` the way vector math libraries do, with nothing but arithmetic and integer adds:

    n = round(x·log2 e),   r = x − n·ln2 ∈ [−ln2/2, ln2/2]   (ln2 split in a high and a low part, Cody–Waite,
                                                               so r keeps full precision even for |x| ≈ 80)
    exp(r) ≈ Σ_{i ≤ K} r^i / i!                            (Taylor: K=7 for float32, K=13 for float64)
    exp(x) = exp(r)·2**n                                    (n added to the exponent field of exp(r))

``round`` is the "magic number" trick: ``x·log2 e + 1.5·2**23`` is rounded to an integer by the float addition
itself, and the low bits of that sum hold n; multiplying by 2**n is adding n to exp(r)'s exponent bits (an
integer add on the same bytes viewed as int32/int64). No table, no gather, no call, no branch: LLVM turns both
loops into SIMD code on any x86 (SSE, AVX2, AVX-512) without ``fastmath``. Relative error ≤ 2e-7 (float32),
≤ 4e-16 (float64), tested against ``np.exp``. Arguments below −86 (float32) or −700 (float64) are clamped there:
exp(−86) ≈ 4e-38, invisible next to the row maximum's exp(0) = 1.

The row maximum and row sum are the other two reductions of a softmax. A plain ``for j: mx = max(mx, s[j])``
loop is not vectorised (a float reduction may not be reordered without fastmath), so ``row_max`` keeps 8
independent running maxima in registers and combines them at the end: the same result, exactly, since max is
associative. ``row_sum`` reorders the sum (``fastmath={"reassoc"}``): a different but fixed rounding order, as
in any BLAS; it sums positive numbers, so the relative error stays at a few ulps.

All three run one row at a time — max, then exp, then sum of the same row — so the row (1 KiB for 256 float32
keys) is read from L1, not three times from L2 as a whole-tile pass per operation would. Measured
(``python -m effedu.bench attention``, and the closing note of issue 11): the table-lookup exp this replaced ran
at ~16 ns per element on numba 0.68 (not vectorised: the int64 ``math.floor`` turned the loop into scalar code),
this one at ~0.8 ns.
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
# y + ROUND rounds y to an integer n (|y| < 2**22 resp. 2**51), and the sum's bit pattern is ROUND_BITS + n
ROUND_F32, ROUND_F32_BITS = 12582912.0, 0x4B400000  # 1.5 · 2**23
ROUND_F64, ROUND_F64_BITS = 6755399441055744.0, 0x4338000000000000  # 1.5 · 2**52


def exp_row(row, c, lim, scratch):
    """In place: ``row[j] = exp(row[j] − c)`` for ``j < lim``, and 0 for the rest of the row.

    ``c`` is the row's maximum (forward) or its log-sum-exp (backward), so exp's argument is ≤ 0; it is clamped
    to [−86, 0] (float32) / [−700, 0] (float64). ``scratch``: a vector of at least ``lim`` floats of the row's
    dtype (it holds the rounded exponents between the two loops). Callable from numba-compiled code only.
    """
    raise TypeError("exp_row is only callable from numba-compiled code")


@overload(exp_row, jit_options={"cache": True, "nogil": True}, inline="always")
def _exp_row_overload(row, c, lim, scratch):
    if row.dtype == types.float32:
        return _exp_row_f32
    if row.dtype == types.float64:
        return _exp_row_f64
    raise TypeError(f"exp_row: expected float32 or float64, got {row.dtype}")


def _exp_row_f32(row, c, lim, scratch):
    for j in range(lim):
        x = min(max(row[j] - c, np.float32(-86.0)), np.float32(0.0))
        r = x * np.float32(LOG2E) + np.float32(ROUND_F32)  # rounded: r = ROUND + n exactly
        n = r - np.float32(ROUND_F32)
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
        row[j] = p
        scratch[j] = r
    # exp(x) = exp(t)·2**n: add n to the exponent field (bits 23…30); exp(t) ∈ [0.7, 1.5] and n ≥ −125 keep it normal
    bits, rbits = row.view(np.int32), scratch.view(np.int32)
    for j in range(lim):
        bits[j] += (rbits[j] - np.int32(ROUND_F32_BITS)) << 23
    for j in range(lim, row.shape[0]):
        row[j] = np.float32(0.0)


def _exp_row_f64(row, c, lim, scratch):
    for j in range(lim):
        x = min(max(row[j] - c, -700.0), 0.0)
        r = x * LOG2E + ROUND_F64
        n = r - ROUND_F64
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
        row[j] = p
        scratch[j] = r
    bits, rbits = row.view(np.int64), scratch.view(np.int64)
    for j in range(lim):
        bits[j] += (rbits[j] - np.int64(ROUND_F64_BITS)) << 52
    for j in range(lim, row.shape[0]):
        row[j] = 0.0


@njit(cache=True, nogil=True, inline="always")
def row_max(row, lim):
    """max_{j < lim} row[j] (lim ≥ 1): eight independent running maxima (SIMD lanes), combined at the end."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    j = 0
    while j + 8 <= lim:
        x = row[j]
        m0 = x if x > m0 else m0
        x = row[j + 1]
        m1 = x if x > m1 else m1
        x = row[j + 2]
        m2 = x if x > m2 else m2
        x = row[j + 3]
        m3 = x if x > m3 else m3
        x = row[j + 4]
        m4 = x if x > m4 else m4
        x = row[j + 5]
        m5 = x if x > m5 else m5
        x = row[j + 6]
        m6 = x if x > m6 else m6
        x = row[j + 7]
        m7 = x if x > m7 else m7
        j += 8
    mx = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for jj in range(j, lim):
        mx = row[jj] if row[jj] > mx else mx
    return mx


@njit(cache=True, nogil=True, fastmath={"reassoc"}, inline="always")
def row_sum(row, n):
    """Σ_{j < n} row[j] (summed in SIMD lanes: ``reassoc``)."""
    tot = row.dtype.type(0)
    for j in range(n):
        tot += row[j]
    return tot

# --------------------------------------------------------------------------------------------------------------
# the tile steps shared by the dense and block-sparse kernels
# --------------------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")  # inlined into the kernels' loops (a call cost ~4% at n=2048)
def online_softmax_tile(qs, kt, vt, q0, k0, causal, m, l, acc, scratch):
    """One step of the online softmax: fold key rows ``k0 …`` (``kt``, ``vt``) into the running state of the
    query rows ``q0 …`` (``qs`` = scale · q): running max ``m``, normaliser ``l``, unnormalised output ``acc``.
    With ``causal``, query row ``q0 + i`` sees keys j ≤ q0 + i (pass ``q0 + off`` for an offset diagonal).
    ``scratch``: at least ``len(kt)`` floats. Shared by the dense and the block-sparse forward kernels.
    """
    nq = qs.shape[0]
    nk = kt.shape[0]
    Dv = vt.shape[1]
    # s_ij = (q_i · k_j) · scale                                        (nq, nk), BLAS sgemm/dgemm
    s = np.dot(qs, kt.T)
    for i in range(nq):  # one row at a time: it stays in L1 for its max, exp and sum
        # keys this row may see in this tile: all, or j ≤ q0 + i when causal
        lim = nk
        if causal:
            lim = max(0, min(nk, q0 + i - k0 + 1))
        if lim == 0:  # nothing visible here: p = 0, the state is unchanged
            s[i, :] = 0.0
            continue
        # m_new = max(m_i, max_j s_ij);  α = exp(m_i − m_new), 0 when nothing was accumulated yet
        mx = max(m[i], row_max(s[i], lim))
        alpha = math.exp(m[i] - mx) if m[i] > -np.inf else 0.0
        m[i] = mx
        # p_ij = exp(s_ij − m_new), 0 for the masked columns          (vectorised exp, in place)
        exp_row(s[i], mx, lim, scratch)
        # l_i = α l_i + Σ_j p_ij ;   acc_i = α acc_i (+ P V below)
        l[i] = alpha * l[i] + row_sum(s[i], lim)
        for d in range(Dv):
            acc[i, d] *= alpha
    # acc += P V                                                      (nq, Dv), BLAS
    acc += np.dot(s, vt)


@njit(cache=True, nogil=True, inline="always")
def recompute_tile(qt, dot, kt, vt, shift, delta_bh, q0, k0, causal, scratch, off):
    """One (query tile, key tile) of the backward: ``(p, ds)`` with the weights recomputed from the lse.

    ``qt`` = scale · q rows ``q0 …``, ``dot`` = their dout rows, ``kt``/``vt`` key rows ``k0 …``; ``shift[i]`` =
    lse of query row ``q0 + i``; ``delta_bh`` = δ of every row of this batch·head. ``scratch``: ≥ ``len(kt)`` floats.
    ``off``: the causal diagonal's offset (query i sees keys j ≤ i + off; 0 top-left, S − T bottom-right).
    Shared by the dense (``tiled_attention.py``) and block-sparse (``block_sparse.py``) backward kernels.
    """
    nq = qt.shape[0]
    nk = kt.shape[0]
    # p_ij = exp(s_ij − lse_i)                                            (nq, nk), recomputed
    p = np.dot(qt, kt.T)
    for i in range(nq):
        lim = nk
        if causal:
            lim = max(0, min(nk, q0 + off + i - k0 + 1))  # keys j ≤ i + off only
        exp_row(p[i], shift[i] if lim > 0 else p.dtype.type(0), lim, scratch)
    # dS_ij = p_ij (dP_ij − δ_i),  dP = dout Vᵀ                           (written over dP)
    ds = np.dot(dot, vt.T)
    for i in range(nq):
        di = delta_bh[q0 + i]
        for j in range(nk):
            ds[i, j] = p[i, j] * (ds[i, j] - di)
    return p, ds


@njit(cache=True)
def exp_rows_checked(s, shift, ncols):
    """Compiled entry points for tests: ``exp_row`` on every row of ``s`` (``ncols[i]`` columns allowed)."""
    scratch = np.empty(s.shape[1], s.dtype)
    for i in range(s.shape[0]):
        exp_row(s[i], shift[i] if ncols[i] > 0 else s.dtype.type(0), ncols[i], scratch)


@njit(cache=True)
def row_max_sum_checked(s, lim):
    mx = np.empty(s.shape[0], s.dtype)
    sm = np.empty(s.shape[0], s.dtype)
    for i in range(s.shape[0]):
        mx[i] = row_max(s[i], lim)
        sm[i] = row_sum(s[i], lim)
    return mx, sm
