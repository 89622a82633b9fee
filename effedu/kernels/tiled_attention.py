"""Exact softmax attention, tiled with the online softmax: one algorithm, three backends.

Dao et al. (2022, FlashAttention) and Rabe & Staats (2021) compute ``softmax(q kᵀ / √d) v`` without ever holding
the T×S score matrix. Queries are cut into tiles of ``Bq`` rows, keys and values into tiles of ``Bk`` rows; for
one query tile we sweep the key tiles and keep, per query row i, a running maximum m_i, a running normaliser l_i
and an unnormalised output acc_i:

    s_ij   = (q_i · k_j) · scale                       for the keys j of the current tile
    m_new  = max(m_i, max_j s_ij)
    α      = exp(m_i − m_new)                          rescales what was accumulated under the old maximum
    p_ij   = exp(s_ij − m_new)
    l_i    = α · l_i + Σ_j p_ij
    acc_i  = α · acc_i + Σ_j p_ij v_j
    out_i  = acc_i / l_i,       lse_i = m_new + log l_i   (log-sum-exp, what a backward pass needs)

Extra memory is O(Bq·Bk + T·D) instead of O(T·S). With ``causal=True`` query i may attend to keys j ≤ i
(top-left aligned, as ``F.scaled_dot_product_attention(is_causal=True)``), and key tiles that lie entirely in
the future of a query tile are skipped, not masked: that halves the work. With more keys than queries (S > T: a
memory of earlier keys, as in Transformer-XL, or a decoder's cache) the queries are the *last* T positions, and
``causal_align="bottom_right"`` aligns the diagonal to the end (torch's ``causal_lower_right``):

    query i may see key j   ⇔   j ≤ i + off,      off = 0 (top-left)  or  S − T (bottom-right)

The kernels take ``off`` as one more integer; the torch reference gets it by putting ``off`` empty queries in
front (bottom-right alignment is top-left alignment of a query block that starts ``off`` rows later).

Backends (same signature, same results up to float rounding):
  * ``attention_torch`` — the algorithm written with torch ops, vectorised over batch, heads and queries; the
    readable reference of the loop above (autograd works through it).
  * ``attention_numba`` — ``@njit(parallel=True)``: one parallel job per (batch·head, query tile); the two
    matrix products per tile go to BLAS (np.dot), the row max / exp / sum to vectorised loops (``online_softmax.py``).
  * ``attention_cuda`` — ``@cuda.jit``: one thread block per (batch·head, query tile), one thread per query row,
    K and V tiles staged in shared memory.

Backward by recomputation (chapter 19; Dao et al. 2022, Alg. 4; Dao 2023, FlashAttention-2). The forward saves
only q, k, v, out and the per-row log-sum-exp — O(T·D), never the T×S weights. Given ``dout``:

    δ_i    = Σ_d dout_id · out_id                      one number per query row (the softmax Jacobian's trace)
    p_ij   = exp(s_ij − lse_i)                         the weights, recomputed one tile at a time
    dV_j   = Σ_i p_ij dout_i                           dP_ij = dout_i · v_j
    dS_ij  = p_ij (dP_ij − δ_i)                        softmax backward, row by row
    dQ_i   = scale · Σ_j dS_ij k_j                     dK_j = scale · Σ_i dS_ij q_i

dK and dV of one key tile need every query tile; dQ of one query tile needs every key tile. The numba and CUDA
backward kernels therefore run two parallel sweeps, as FlashAttention-2 does: one over key tiles (accumulating
dK, dV privately, no write conflicts) and one over query tiles (dQ). Each recomputes S and P: 7 tile products
instead of the forward's 2, the price of O(T) memory. Causal tiles that lie wholly in the future are skipped in
both sweeps.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import cuda, njit, prange

from .._checks import check_positive_int, check_qkv, check_scale
from ._base import (CUDA_BLOCK_SIZES, CUDA_MAX_GRID_Y, CUDA_MAX_HEAD_DIM, CUDA_STATIC_SMEM_BYTES, apply_kernel,
                    cached_kernels, check_cuda_grid, cuda_launch, np_dtype_of, resolve_backend, shared_tile_dims,
                    single_threaded_blas)
from .online_softmax import online_softmax_tile, recompute_tile

# --------------------------------------------------------------------------------------------------------------
# torch: the readable reference of the tiled algorithm
# --------------------------------------------------------------------------------------------------------------


def attention_torch(q, k, v, *, causal=False, scale=1.0, block_size=256):
    """Tiled online-softmax attention in torch ops; returns ``(out (B,H,T,Dv), lse (B,H,T))``.

    Vectorised over batch, heads and all queries; loops over key tiles of ``block_size`` keys.
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    acc_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qs = q.to(acc_dtype) * scale
    m = torch.full((B, H, T, 1), -math.inf, dtype=acc_dtype, device=q.device)  # running max
    l = torch.zeros((B, H, T, 1), dtype=acc_dtype, device=q.device)  # running normaliser
    acc = torch.zeros((B, H, T, v.shape[-1]), dtype=acc_dtype, device=q.device)  # unnormalised output
    rows = torch.arange(T, device=q.device).view(T, 1)
    for k0 in range(0, S, block_size):
        if causal and k0 > T - 1:
            break  # every key from here on is in the future of every query
        k1 = min(k0 + block_size, S)
        # s_ij = (q_i · k_j) · scale                                     (B, H, T, Bk)
        s = qs @ k[:, :, k0:k1].to(acc_dtype).transpose(-2, -1)
        if causal:
            allowed = torch.arange(k0, k1, device=q.device).view(1, -1) <= rows  # (T, Bk)
            s = s.masked_fill(~allowed, -math.inf)
        # m_new = max(m_i, max_j s_ij)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        # α = exp(m_i − m_new): zero while m_i is still −inf (nothing accumulated yet)
        alpha = torch.exp(m - m_new).nan_to_num(0.0) if causal else torch.exp(m - m_new)
        # p_ij = exp(s_ij − m_new); rows whose tile is fully masked have m_new = −inf: p = 0
        p = torch.exp(s - m_new.clamp_min(torch.finfo(acc_dtype).min))
        l = alpha * l + p.sum(dim=-1, keepdim=True)
        acc = alpha * acc + p @ v[:, :, k0:k1].to(acc_dtype)
        m = m_new
    out = acc / l
    lse = (m + torch.log(l)).squeeze(-1)
    return out.to(q.dtype), lse


def attention_backward_torch(q, k, v, out, lse, dout, *, causal=False, scale=1.0, block_size=256):
    """Gradients ``(dq, dk, dv)`` by recomputation from ``lse``, one key tile at a time, in torch ops.

    Vectorised over batch, heads and all queries; the largest temporary is one (B, H, T, block_size) tile.
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qs = q.to(acc) * scale
    do = dout.to(acc)
    # δ_i = Σ_d dout_id · out_id                                                   (B, H, T, 1)
    delta = (do * out.to(acc)).sum(dim=-1, keepdim=True)
    lse_ = lse.to(acc).unsqueeze(-1)
    dq = torch.zeros_like(qs)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    rows = torch.arange(T, device=q.device).view(T, 1)
    for k0 in range(0, S, block_size):
        if causal and k0 > T - 1:
            break
        k1 = min(k0 + block_size, S)
        kt, vt = k[:, :, k0:k1].to(acc), v[:, :, k0:k1].to(acc)
        # p_ij = exp(s_ij − lse_i)                                                 (B, H, T, Bk)
        s = qs @ kt.transpose(-2, -1)
        if causal:
            s = s.masked_fill(torch.arange(k0, k1, device=q.device).view(1, -1) > rows, -math.inf)
        p = torch.exp(s - lse_)
        # dV_j = Σ_i p_ij dout_i ;  dP_ij = dout_i · v_j ;  dS_ij = p_ij (dP_ij − δ_i)
        dv[:, :, k0:k1] = p.transpose(-2, -1) @ do
        ds = p * (do @ vt.transpose(-2, -1) - delta)
        # dQ_i += Σ_j dS_ij k_j (scale applied at the end) ;  dK_j = scale · Σ_i dS_ij q_i
        dq += ds @ kt
        dk[:, :, k0:k1] = ds.transpose(-2, -1) @ qs
    return (dq * scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------------------------------------------
# numba on the CPU
# --------------------------------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _attention_numba_kernel(q, k, v, out, lse, scale, causal, bq, bk, off):
    # q (BH, T, D), k (BH, S, D), v (BH, S, Dv), out (BH, T, Dv), lse (BH, T) — C-contiguous
    BH, T, D = q.shape
    S = k.shape[1]
    Dv = v.shape[2]
    n_qt = (T + bq - 1) // bq
    for job in prange(BH * n_qt):  # one job = one (batch·head, query tile)
        bh = job // n_qt
        q0 = (job % n_qt) * bq
        q1 = min(q0 + bq, T)
        nq = q1 - q0
        qs = q[bh, q0:q1] * scale  # (nq, D): the scale folded into q once
        acc = np.zeros((nq, Dv), dtype=q.dtype)  # Σ_j p_ij v_j (unnormalised)
        m = np.full(nq, -np.inf, dtype=q.dtype)  # running max per row
        l = np.zeros(nq, dtype=q.dtype)  # running normaliser per row
        scratch = np.empty(bk, dtype=q.dtype)  # the exp's rounded exponents, one row at a time
        # causal block skipping: the last query of the tile is q1 − 1, so keys ≥ q1 + off are never needed
        k_end = min(S, q1 + off) if causal else S
        for k0 in range(0, k_end, bk):
            k1 = min(k0 + bk, k_end)
            # s = q kᵀ·scale, running max, rescale, p = exp(s − m), l and acc += P V  (see online_softmax_tile)
            # (the causal limit j ≤ i + off is the top-left one of a query tile starting at q0 + off)
            online_softmax_tile(qs, k[bh, k0:k1], v[bh, k0:k1], q0 + off, k0, causal, m, l, acc, scratch)
        for i in range(nq):
            inv = 1.0 / l[i]
            for d in range(Dv):
                out[bh, q0 + i, d] = acc[i, d] * inv
            lse[bh, q0 + i] = m[i] + math.log(l[i])


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _attention_bwd_dkdv_kernel(q, k, v, dout, lse, delta, dk, dv, scale, causal, bq, bk, off):
    # sweep 1: one job per (batch·head, key tile); dK and dV of the tile accumulate privately
    BH, T, D = q.shape
    S = k.shape[1]
    Dv = v.shape[2]
    n_kt = (S + bk - 1) // bk
    for job in prange(BH * n_kt):
        bh = job // n_kt
        k0 = (job % n_kt) * bk
        k1 = min(k0 + bk, S)
        nk = k1 - k0
        kt = k[bh, k0:k1]
        vt = v[bh, k0:k1]
        dk_acc = np.zeros((nk, D), dtype=q.dtype)
        scratch = np.empty(nk, dtype=q.dtype)
        dv_acc = np.zeros((nk, Dv), dtype=q.dtype)
        # causal block skipping: queries i < k0 − off see none of these keys; start at the tile holding k0 − off
        q_start = (max(0, k0 - off) // bq) * bq if causal else 0
        for q0 in range(q_start, T, bq):
            q1 = min(q0 + bq, T)
            nq = q1 - q0
            qt = q[bh, q0:q1] * scale  # (nq, D)
            dot = dout[bh, q0:q1]  # (nq, Dv)
            shift = np.empty(nq, dtype=q.dtype)
            for i in range(nq):
                shift[i] = lse[bh, q0 + i]
            p, ds = recompute_tile(qt, dot, kt, vt, shift, delta[bh], q0, k0, causal, scratch, off)
            # dV_j += Σ_i p_ij dout_i ;  dK_j += Σ_i dS_ij (scale · q_i)
            dv_acc += np.dot(p.T, dot)
            dk_acc += np.dot(ds.T, qt)
        dk[bh, k0:k1] = dk_acc
        dv[bh, k0:k1] = dv_acc


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _attention_bwd_dq_kernel(q, k, v, dout, lse, delta, dq, scale, causal, bq, bk, off):
    # sweep 2: one job per (batch·head, query tile); dQ of the tile accumulates privately
    BH, T, D = q.shape
    S = k.shape[1]
    n_qt = (T + bq - 1) // bq
    for job in prange(BH * n_qt):
        bh = job // n_qt
        q0 = (job % n_qt) * bq
        q1 = min(q0 + bq, T)
        nq = q1 - q0
        qt = q[bh, q0:q1] * scale
        dot = dout[bh, q0:q1]
        dq_acc = np.zeros((nq, D), dtype=q.dtype)
        scratch = np.empty(bk, dtype=q.dtype)
        shift = np.empty(nq, dtype=q.dtype)
        for i in range(nq):
            shift[i] = lse[bh, q0 + i]
        k_end = min(S, q1 + off) if causal else S
        for k0 in range(0, k_end, bk):
            k1 = min(k0 + bk, k_end)
            _, ds = recompute_tile(qt, dot, k[bh, k0:k1], v[bh, k0:k1], shift, delta[bh], q0, k0, causal, scratch, off)
            # dQ_i += Σ_j dS_ij k_j   (× scale below)
            dq_acc += np.dot(ds, k[bh, k0:k1])
        for i in range(nq):
            for d in range(D):
                dq[bh, q0 + i, d] = dq_acc[i, d] * scale


_single_threaded_blas = single_threaded_blas  # the old private name (kept for old imports)


def attention_numba(q, k, v, *, causal=False, scale=1.0, block_size=256, off=0):
    """numba tiled attention on CPU tensors (float32/float64); returns ``(out, lse)`` as torch tensors."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    # zero-copy when the tensor is already contiguous; one copy otherwise
    qn = q.detach().contiguous().reshape(B * H, T, D).numpy()
    kn = k.detach().contiguous().reshape(B * H, S, D).numpy()
    vn = v.detach().contiguous().reshape(B * H, S, Dv).numpy()
    # outputs allocated by torch (so torch's memory profiler sees them), written by numba through .numpy()
    out = torch.empty((B * H, T, Dv), dtype=q.dtype)
    lse = torch.empty((B * H, T), dtype=q.dtype)
    bq = min(block_size, T)
    bk = min(block_size, S)
    with single_threaded_blas():
        _attention_numba_kernel(qn, kn, vn, out.numpy(), lse.numpy(), qn.dtype.type(scale), bool(causal), bq, bk,
                                int(off))
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)


def attention_backward_numba(q, k, v, out, lse, dout, *, causal=False, scale=1.0, block_size=256, off=0):
    """numba backward (two sweeps, see the module docstring); returns ``(dq, dk, dv)`` as torch tensors."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    flat = lambda x, n, d: x.detach().contiguous().reshape(B * H, n, d)  # noqa: E731
    qn, kn, vn = flat(q, T, D).numpy(), flat(k, S, D).numpy(), flat(v, S, Dv).numpy()
    do = flat(dout.to(q.dtype), T, Dv)
    # δ_i = Σ_d dout_id · out_id  (O(T·D), done in torch)
    delta = (do * flat(out, T, Dv)).sum(dim=-1).contiguous()
    lse_n = lse.detach().to(q.dtype).contiguous().reshape(B * H, T).numpy()
    dq = torch.empty((B * H, T, D), dtype=q.dtype)
    dk = torch.empty((B * H, S, D), dtype=q.dtype)
    dv = torch.empty((B * H, S, Dv), dtype=q.dtype)
    bq, bk = min(block_size, T), min(block_size, S)
    sc = qn.dtype.type(scale)
    with single_threaded_blas():
        _attention_bwd_dkdv_kernel(qn, kn, vn, do.numpy(), lse_n, delta.numpy(), dk.numpy(), dv.numpy(), sc,
                                   bool(causal), bq, bk, int(off))
        _attention_bwd_dq_kernel(qn, kn, vn, do.numpy(), lse_n, delta.numpy(), dq.numpy(), sc, bool(causal), bq, bk,
                                 int(off))
    return dq.reshape(B, H, T, D), dk.reshape(B, H, S, D), dv.reshape(B, H, S, Dv)


def numba_workspace_bytes(T, S, D, Dv, *, block_size=256, itemsize=4, n_threads=None, backward=False):
    """Bytes the numba kernel allocates internally at most (numba's own allocator: no profiler sees them).

    Per worker thread, one job at a time: the scaled query tile (Bq·D), the accumulator (Bq·Dv), the score
    tile that np.dot returns (Bq·Bk, at most two alive while the next one is made), three row vectors and the
    exp's scratch row (Bk).
    ``backward=True``: the larger of the two backward sweeps (key sweep: a scaled Q tile, private dK and dV
    accumulators, the P and dP tiles; query sweep: Q tile, dQ accumulator, P and dP).
    Independent of T and S beyond one tile: that is the point of tiling.
    """
    from numba import get_num_threads

    n_threads = get_num_threads() if n_threads is None else n_threads
    bq, bk = min(block_size, T), min(block_size, S)
    if backward:
        key_sweep = bq * D + bk * (D + Dv) + 2 * bq * bk + 2 * bq + bk
        query_sweep = 2 * bq * D + 2 * bq * bk + 2 * bq + bk
        per_job = max(key_sweep, query_sweep) * itemsize
    else:
        per_job = (bq * D + bq * Dv + 2 * bq * bk + 3 * bq + bk) * itemsize
    return n_threads * per_job


# --------------------------------------------------------------------------------------------------------------
# numba.cuda on a GPU (and in the CUDA simulator for tests)
# --------------------------------------------------------------------------------------------------------------

# CUDA_MAX_HEAD_DIM, CUDA_STATIC_SMEM_BYTES, CUDA_MAX_GRID_Y: the limits in ``_base.py`` (re-exported here)


def cuda_tile_dims(np_dtype, block, D, Dv):
    """Compile-time tile sizes ``(BK, DMAX)`` for the CUDA kernels.

    ``DMAX``: the head-dim capacity of the shared and local arrays, the smallest power of two ≥ max(D, Dv)
    (at least 16, at most ``CUDA_MAX_HEAD_DIM``), so a D=64 head does not pay for 128 columns.
    ``BK``: keys per shared-memory tile. The K and V tiles take ``2·BK·DMAX·itemsize`` bytes, which must stay within
    the 48 KiB of static shared memory a block may declare (float64, block 32, D=128 would need 64 KiB and fail to
    compile for a real GPU), so BK is ``block`` halved until it fits (float64 at DMAX=128: BK=16).
    """
    return shared_tile_dims(np_dtype, block, max(D, Dv), lambda bk, dmax: 2 * bk * dmax)


_cuda_tile_dims = cuda_tile_dims  # the old private name


@cached_kernels
def _make_cuda_kernel(np_dtype, BLOCK, BK=None, DMAX=CUDA_MAX_HEAD_DIM):
    """Compile the tiled kernel for one dtype and tile shape.

    ``BLOCK`` queries per tile (= threads per block), ``BK`` ≤ BLOCK keys per shared-memory tile (default BLOCK),
    head dims up to ``DMAX``. The arithmetic stays in the input dtype (float32 math for float32 inputs: float64
    is 2–64× slower on GPUs). No built-in ``min``/``max`` in the kernel body: numba ≥ 0.66 fails to compile their
    two-argument form for CUDA (numba issue #10753), so the comparisons are spelled out.
    """
    from numba import float32, float64

    nb_dtype = float32 if np_dtype == np.float32 else float64
    if BK is None:
        BK = BLOCK
    ZERO = np_dtype(0.0)
    NEG_INF = np_dtype(-math.inf)

    @cuda.jit
    def kernel(q, k, v, out, lse, scale, causal, off):
        # grid: (B·H, n query tiles); block: BLOCK threads, thread t owns query row q0 + t
        bh = cuda.blockIdx.x
        q0 = cuda.blockIdx.y * BLOCK
        t = cuda.threadIdx.x
        T = q.shape[1]
        S = k.shape[1]
        D = q.shape[2]
        Dv = v.shape[2]
        k_sh = cuda.shared.array((BK, DMAX), dtype=nb_dtype)
        v_sh = cuda.shared.array((BK, DMAX), dtype=nb_dtype)
        q_row = cuda.local.array(DMAX, dtype=nb_dtype)
        acc = cuda.local.array(DMAX, dtype=nb_dtype)
        i = q0 + t
        active = i < T
        for d in range(D):
            q_row[d] = q[bh, i, d] * scale if active else ZERO
        for d in range(Dv):
            acc[d] = ZERO
        m = NEG_INF
        l = ZERO
        k_end = S
        if causal:
            # causal block skipping: the tile's last query is min(q0 + BLOCK, T) − 1, keys after it + off are never needed
            q_end = q0 + BLOCK
            if q_end > T:
                q_end = T
            if q_end + off < k_end:
                k_end = q_end + off
        for k0 in range(0, k_end, BK):
            # stage the K and V tile in shared memory: thread t < BK loads key row k0 + t
            if t < BK:
                j_load = k0 + t
                for d in range(D):
                    k_sh[t, d] = k[bh, j_load, d] if j_load < S else ZERO
                for d in range(Dv):
                    v_sh[t, d] = v[bh, j_load, d] if j_load < S else ZERO
            cuda.syncthreads()
            if active:
                n_keys = S - k0
                if n_keys > BK:
                    n_keys = BK
                if causal and i + off - k0 + 1 < n_keys:
                    n_keys = i + off - k0 + 1  # keys j ≤ i + off only
                for jj in range(n_keys):
                    # s = q_i · k_j · scale
                    s = ZERO
                    for d in range(D):
                        s += q_row[d] * k_sh[jj, d]
                    # online softmax update for one key: m_new, α, p
                    m_new = s if s > m else m
                    alpha = math.exp(m - m_new) if m > NEG_INF else ZERO
                    p = math.exp(s - m_new)
                    l = alpha * l + p
                    for d in range(Dv):
                        acc[d] = alpha * acc[d] + p * v_sh[jj, d]
                    m = m_new
            cuda.syncthreads()
        if active:
            for d in range(Dv):
                out[bh, i, d] = acc[d] / l
            lse[bh, i] = m + math.log(l)

    return kernel


@cached_kernels
def _make_cuda_bwd_kernels(np_dtype, BLOCK, BK=None, DMAX=CUDA_MAX_HEAD_DIM):
    """Compile the two backward sweeps for one dtype and tile shape: ``(dkdv_kernel, dq_kernel)``.

    ``dkdv_kernel``: one block per (batch·head, key tile of BLOCK keys), one thread per key row j holding k_j, v_j
    and its private dK_j, dV_j; query rows, dout, lse and δ stream through shared memory ``BK`` rows at a time.
    ``dq_kernel``: one block per (batch·head, query tile), one thread per query row i, K and V tiles in shared
    memory (the forward's layout). Same rules as the forward: input-dtype arithmetic, no builtin min/max.
    """
    from numba import float32, float64

    nb_dtype = float32 if np_dtype == np.float32 else float64
    if BK is None:
        BK = BLOCK
    ZERO = np_dtype(0.0)

    @cuda.jit
    def dkdv_kernel(q, k, v, dout, lse, delta, dk, dv, scale, causal, off):
        bh = cuda.blockIdx.x
        k0 = cuda.blockIdx.y * BLOCK
        t = cuda.threadIdx.x
        T = q.shape[1]
        S = k.shape[1]
        D = q.shape[2]
        Dv = v.shape[2]
        q_sh = cuda.shared.array((BK, DMAX), dtype=nb_dtype)
        do_sh = cuda.shared.array((BK, DMAX), dtype=nb_dtype)
        lse_sh = cuda.shared.array(BK, dtype=nb_dtype)
        delta_sh = cuda.shared.array(BK, dtype=nb_dtype)
        k_row = cuda.local.array(DMAX, dtype=nb_dtype)
        v_row = cuda.local.array(DMAX, dtype=nb_dtype)
        dk_acc = cuda.local.array(DMAX, dtype=nb_dtype)
        dv_acc = cuda.local.array(DMAX, dtype=nb_dtype)
        j = k0 + t
        active = j < S
        for d in range(D):
            k_row[d] = k[bh, j, d] * scale if active else ZERO  # scale folded into k for s_ij
            dk_acc[d] = ZERO
        for d in range(Dv):
            v_row[d] = v[bh, j, d] if active else ZERO
            dv_acc[d] = ZERO
        # causal block skipping: queries before k0 − off see none of this tile's keys
        q_start = 0
        if causal and k0 > off:
            q_start = ((k0 - off) // BK) * BK
        for q0 in range(q_start, T, BK):
            if t < BK:
                i_load = q0 + t
                ok = i_load < T
                for d in range(D):
                    q_sh[t, d] = q[bh, i_load, d] if ok else ZERO
                for d in range(Dv):
                    do_sh[t, d] = dout[bh, i_load, d] if ok else ZERO
                lse_sh[t] = lse[bh, i_load] if ok else ZERO
                delta_sh[t] = delta[bh, i_load] if ok else ZERO
            cuda.syncthreads()
            if active:
                n_q = T - q0
                if n_q > BK:
                    n_q = BK
                for ii in range(n_q):
                    if causal and q0 + ii + off < j:
                        continue  # query i may not see key j
                    # p_ij = exp(q_i · k_j · scale − lse_i)
                    s = ZERO
                    for d in range(D):
                        s += q_sh[ii, d] * k_row[d]
                    p = math.exp(s - lse_sh[ii])
                    # dV_j += p dout_i ;  dP = dout_i · v_j ;  dS = p (dP − δ_i) ;  dK_j += dS q_i
                    dp = ZERO
                    for d in range(Dv):
                        dv_acc[d] += p * do_sh[ii, d]
                        dp += do_sh[ii, d] * v_row[d]
                    ds = p * (dp - delta_sh[ii])
                    for d in range(D):
                        dk_acc[d] += ds * q_sh[ii, d]
            cuda.syncthreads()
        if active:
            for d in range(D):
                dk[bh, j, d] = dk_acc[d] * scale
            for d in range(Dv):
                dv[bh, j, d] = dv_acc[d]

    @cuda.jit
    def dq_kernel(q, k, v, dout, lse, delta, dq, scale, causal, off):
        bh = cuda.blockIdx.x
        q0 = cuda.blockIdx.y * BLOCK
        t = cuda.threadIdx.x
        T = q.shape[1]
        S = k.shape[1]
        D = q.shape[2]
        Dv = v.shape[2]
        k_sh = cuda.shared.array((BK, DMAX), dtype=nb_dtype)
        v_sh = cuda.shared.array((BK, DMAX), dtype=nb_dtype)
        q_row = cuda.local.array(DMAX, dtype=nb_dtype)
        do_row = cuda.local.array(DMAX, dtype=nb_dtype)
        dq_acc = cuda.local.array(DMAX, dtype=nb_dtype)
        i = q0 + t
        active = i < T
        for d in range(D):
            q_row[d] = q[bh, i, d] * scale if active else ZERO
            dq_acc[d] = ZERO
        for d in range(Dv):
            do_row[d] = dout[bh, i, d] if active else ZERO
        lse_i = lse[bh, i] if active else ZERO
        delta_i = delta[bh, i] if active else ZERO
        k_end = S
        if causal:
            q_end = q0 + BLOCK
            if q_end > T:
                q_end = T
            if q_end + off < k_end:
                k_end = q_end + off
        for k0 in range(0, k_end, BK):
            if t < BK:
                j_load = k0 + t
                for d in range(D):
                    k_sh[t, d] = k[bh, j_load, d] if j_load < S else ZERO
                for d in range(Dv):
                    v_sh[t, d] = v[bh, j_load, d] if j_load < S else ZERO
            cuda.syncthreads()
            if active:
                n_keys = S - k0
                if n_keys > BK:
                    n_keys = BK
                if causal and i + off - k0 + 1 < n_keys:
                    n_keys = i + off - k0 + 1
                for jj in range(n_keys):
                    s = ZERO
                    for d in range(D):
                        s += q_row[d] * k_sh[jj, d]
                    p = math.exp(s - lse_i)
                    dp = ZERO
                    for d in range(Dv):
                        dp += do_row[d] * v_sh[jj, d]
                    ds = p * (dp - delta_i)
                    for d in range(D):
                        dq_acc[d] += ds * k_sh[jj, d]
            cuda.syncthreads()
        if active:
            for d in range(D):
                dq[bh, i, d] = dq_acc[d] * scale

    return dkdv_kernel, dq_kernel


def _cuda_launch_setup(q, k, v, block_size, where="attention(backend='cuda')"):
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    if D > CUDA_MAX_HEAD_DIM or Dv > CUDA_MAX_HEAD_DIM:
        raise ValueError(
            f"{where}: head dim must be ≤ {CUDA_MAX_HEAD_DIM} (shared-memory tile size), "
            f"got D={D}, Dv={Dv}; use backend='numba' or 'torch'"
        )
    for n, what in ((T, "T"), (S, "S")):
        check_cuda_grid((n + block_size - 1) // block_size, f"{what}={n} in tiles of {block_size}", where)
    np_dtype = np_dtype_of(q.dtype)
    bk, dmax = cuda_tile_dims(np_dtype, block_size, D, Dv)
    return np_dtype, bk, dmax


def attention_cuda(q, k, v, *, causal=False, scale=1.0, block_size=32, off=0):
    """numba.cuda tiled attention; CUDA tensors in and out (CPU tensors only under the simulator)."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    np_dtype, bk, dmax = _cuda_launch_setup(q, k, v, block_size)
    kernel = _make_cuda_kernel(np_dtype, block_size, bk, dmax)
    qc = q.detach().contiguous().reshape(B * H, T, D)
    kc = k.detach().contiguous().reshape(B * H, S, D)
    vc = v.detach().contiguous().reshape(B * H, S, Dv)
    out = torch.empty((B * H, T, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, T), dtype=q.dtype, device=q.device)
    grid = (B * H, (T + block_size - 1) // block_size)  # B·H on x (limit 2³¹ − 1), query tiles on y (limit 65535)
    cuda_launch(kernel, grid, block_size, (qc, kc, vc, out, lse), (np_dtype(scale), bool(causal), int(off)))
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)


def attention_backward_cuda(q, k, v, out, lse, dout, *, causal=False, scale=1.0, block_size=32, off=0):
    """numba.cuda backward (two sweeps); CUDA tensors in and out (CPU tensors only under the simulator)."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    np_dtype, bk, dmax = _cuda_launch_setup(q, k, v, block_size)
    dkdv_kernel, dq_kernel = _make_cuda_bwd_kernels(np_dtype, block_size, bk, dmax)
    flat = lambda x, n, d: x.detach().to(q.dtype).contiguous().reshape(B * H, n, d)  # noqa: E731
    qc, kc, vc, do = flat(q, T, D), flat(k, S, D), flat(v, S, Dv), flat(dout, T, Dv)
    delta = (do * flat(out, T, Dv)).sum(dim=-1).contiguous()  # δ_i = Σ_d dout_id out_id
    lse_c = lse.detach().to(q.dtype).contiguous().reshape(B * H, T)
    dq = torch.empty((B * H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B * H, S, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B * H, S, Dv), dtype=q.dtype, device=q.device)
    scalars = (np_dtype(scale), bool(causal), int(off))
    cuda_launch(dkdv_kernel, (B * H, (S + block_size - 1) // block_size), block_size,
                (qc, kc, vc, do, lse_c, delta, dk, dv), scalars)
    cuda_launch(dq_kernel, (B * H, (T + block_size - 1) // block_size), block_size,
                (qc, kc, vc, do, lse_c, delta, dq), scalars)
    return dq.reshape(B, H, T, D), dk.reshape(B, H, S, D), dv.reshape(B, H, S, Dv)


# --------------------------------------------------------------------------------------------------------------
# the public entry point (re-exported as effedu.kernels.attention)
# --------------------------------------------------------------------------------------------------------------

DEFAULT_BLOCK = {"torch": 256, "numba": 256, "cuda": 32}
CAUSAL_ALIGNS = ("top_left", "bottom_right")


def attention_torch_aligned(q, k, v, *, causal=False, scale=1.0, block_size=256, off=0):
    """:func:`attention_torch` with the causal diagonal moved by ``off``: ``off`` empty queries in front, then the
    top-left mask, then those rows dropped (query i of q becomes row i + off: it sees keys j ≤ i + off)."""
    if off == 0:
        return attention_torch(q, k, v, causal=causal, scale=scale, block_size=block_size)
    out, lse = attention_torch(_pad_rows(q, off), k, v, causal=causal, scale=scale, block_size=block_size)
    return out[:, :, off:], lse[:, :, off:]


def attention_backward_torch_aligned(q, k, v, out, lse, dout, *, causal=False, scale=1.0, block_size=256, off=0):
    """:func:`attention_backward_torch` for a diagonal moved by ``off``. The padded rows get dout = 0, so δ = 0,
    dS = 0 and they add nothing to dK, dV (their lse is set to 0: any finite value does)."""
    if off == 0:
        return attention_backward_torch(q, k, v, out, lse, dout, causal=causal, scale=scale, block_size=block_size)
    dq, dk, dv = attention_backward_torch(_pad_rows(q, off), k, v, _pad_rows(out, off), _pad_rows(lse, off),
                                          _pad_rows(dout, off), causal=causal, scale=scale, block_size=block_size)
    return dq[:, :, off:], dk, dv


def _pad_rows(x, n):
    # n zero rows in front of the position axis (dim 2) of a (B, H, T, ·) or (B, H, T) tensor
    return torch.cat([x.new_zeros(x.shape[:2] + (n,) + x.shape[3:]), x], dim=2)


ATTENTION_FORWARD = {"torch": attention_torch_aligned, "numba": attention_numba, "cuda": attention_cuda}
ATTENTION_BACKWARD = {"torch": attention_backward_torch_aligned, "numba": attention_backward_numba,
                      "cuda": attention_backward_cuda}


def attention(q, k, v, *, causal=False, scale=None, backend="auto", block_size=None, return_lse=False,
              causal_align="top_left"):
    """Exact softmax attention, tiled (online softmax): never materialises the T×S score matrix.

    q ``(B, H, T, D)``, k ``(B, H, S, D)``, v ``(B, H, S, Dv)`` → ``(B, H, T, Dv)`` in q's dtype.
    ``causal``: query i attends to keys j ≤ i (top-left aligned, as SDPA). ``scale`` defaults to 1/√D.
    ``causal_align="bottom_right"``: the diagonal aligned to the end, keys j ≤ i + S − T (queries are the last T
    of S positions, as torch's ``causal_lower_right``; needs S ≥ T).
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
    if causal_align not in CAUSAL_ALIGNS:
        raise ValueError(f"{where}: causal_align must be 'top_left' or 'bottom_right', got {causal_align!r}")
    off = S - T if causal and causal_align == "bottom_right" else 0
    if off < 0:
        raise ValueError(f"{where}: causal_align='bottom_right' needs at least as many keys as queries (S ≥ T), "
                         f"got T={T}, S={S}: the first {T - S} queries would see no key")
    name = resolve_backend(backend, q.device, q.dtype, where)
    if block_size is None:
        block_size = DEFAULT_BLOCK[name]
    check_positive_int(block_size, "block_size", where)
    if name == "cuda" and block_size not in CUDA_BLOCK_SIZES:
        raise ValueError(f"{where}: block_size for backend 'cuda' must be one of 8, 16, 32, 64, 128 (threads per block), got {block_size}")
    out, lse = apply_kernel(ATTENTION_FORWARD[name], ATTENTION_BACKWARD[name], (q, k, v), causal=causal,
                            scale=float(scale), block_size=block_size, off=off)
    return (out, lse) if return_lse else out


__all__ = ["attention", "attention_torch", "attention_backward_torch", "attention_numba", "attention_backward_numba",
           "attention_cuda", "attention_backward_cuda", "attention_torch_aligned", "attention_backward_torch_aligned",
           "numba_workspace_bytes", "cuda_tile_dims", "online_softmax_tile", "recompute_tile", "DEFAULT_BLOCK",
           "CAUSAL_ALIGNS", "CUDA_MAX_HEAD_DIM", "CUDA_STATIC_SMEM_BYTES", "CUDA_MAX_GRID_Y"]
