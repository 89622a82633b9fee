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
the future of a query tile are skipped, not masked: that halves the work.

Backends (same signature, same results up to float rounding):
  * ``attention_torch`` — the algorithm written with torch ops, vectorised over batch, heads and queries; the
    readable reference of the loop above (autograd works through it).
  * ``attention_numba`` — ``@njit(parallel=True)``: one parallel job per (batch·head, query tile); the two
    matrix products per tile go to BLAS (np.dot), the row max / exp / sum to vectorised loops (``_rowops.py``).
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

from ._rowops import N_LANES, exp_rows, row_max, row_sum

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


@njit(cache=True, nogil=True, inline="always")  # inlined into the kernels' loops (a call cost ~4% at n=2048)
def online_softmax_tile(qs, kt, vt, q0, k0, causal, m, l, acc, ncols, alpha, lanes):
    """One step of the online softmax: fold key rows ``k0 …`` (``kt``, ``vt``) into the running state of the
    query rows ``q0 …`` (``qs`` = scale · q): running max ``m``, normaliser ``l``, unnormalised output ``acc``.
    ``ncols``, ``alpha``, ``lanes`` are scratch. Shared by the dense and the block-sparse forward kernels.
    """
    nq = qs.shape[0]
    nk = kt.shape[0]
    Dv = vt.shape[1]
    # s_ij = (q_i · k_j) · scale                                        (nq, nk), BLAS sgemm/dgemm
    s = np.dot(qs, kt.T)
    for i in range(nq):
        # keys this row may see in this tile: all, or j ≤ q0 + i when causal
        lim = nk
        if causal:
            lim = max(0, min(nk, q0 + i - k0 + 1))
        ncols[i] = lim
        # m_new = max(m_i, max_j s_ij)
        mx = max(m[i], row_max(s, i, lim, lanes)) if lim > 0 else m[i]
        # α = exp(m_i − m_new); 0 when nothing was accumulated yet
        alpha[i] = math.exp(m[i] - mx) if m[i] > -np.inf else 0.0
        m[i] = mx
    # p_ij = exp(s_ij − m_new), 0 for the masked columns          (vectorised exp, in place)
    exp_rows(s, m, ncols)
    for i in range(nq):
        # l_i = α l_i + Σ_j p_ij ;   acc_i = α acc_i (+ P V below)
        l[i] = alpha[i] * l[i] + row_sum(s, i, nk)
        for d in range(Dv):
            acc[i, d] *= alpha[i]
    # acc += P V                                                      (nq, Dv), BLAS
    acc += np.dot(s, vt)


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _attention_numba_kernel(q, k, v, out, lse, scale, causal, bq, bk):
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
        ncols = np.empty(nq, dtype=np.int64)
        alpha = np.empty(nq, dtype=q.dtype)
        lanes = np.empty(N_LANES, dtype=q.dtype)
        # causal block skipping: the last query of the tile is q1 − 1, so keys ≥ q1 are never needed
        k_end = min(S, q1) if causal else S
        for k0 in range(0, k_end, bk):
            k1 = min(k0 + bk, k_end)
            # s = q kᵀ·scale, running max, rescale, p = exp(s − m), l and acc += P V  (see online_softmax_tile)
            online_softmax_tile(qs, k[bh, k0:k1], v[bh, k0:k1], q0, k0, causal, m, l, acc, ncols, alpha, lanes)
        for i in range(nq):
            inv = 1.0 / l[i]
            for d in range(Dv):
                out[bh, q0 + i, d] = acc[i, d] * inv
            lse[bh, q0 + i] = m[i] + math.log(l[i])


@njit(cache=True, nogil=True, inline="always")
def recompute_tile(qt, dot, kt, vt, shift, delta_bh, q0, k0, causal, ncols):
    """One (query tile, key tile) of the backward: ``(p, ds)`` with the weights recomputed from the lse.

    ``qt`` = scale · q rows ``q0 …``, ``dot`` = their dout rows, ``kt``/``vt`` key rows ``k0 …``; ``shift[i]`` =
    lse of query row ``q0 + i``; ``delta_bh`` = δ of every row of this batch·head. ``ncols`` is scratch (≥ nq).
    Shared by the dense (this module) and block-sparse (``block_sparse.py``) backward kernels.
    """
    nq = qt.shape[0]
    nk = kt.shape[0]
    for i in range(nq):
        lim = nk
        if causal:
            lim = max(0, min(nk, q0 + i - k0 + 1))  # keys j ≤ i only
        ncols[i] = lim
    # p_ij = exp(s_ij − lse_i)                                            (nq, nk), recomputed
    p = np.dot(qt, kt.T)
    exp_rows(p, shift, ncols)
    # dS_ij = p_ij (dP_ij − δ_i),  dP = dout Vᵀ                           (written over dP)
    ds = np.dot(dot, vt.T)
    for i in range(nq):
        di = delta_bh[q0 + i]
        for j in range(nk):
            ds[i, j] = p[i, j] * (ds[i, j] - di)
    return p, ds


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _attention_bwd_dkdv_kernel(q, k, v, dout, lse, delta, dk, dv, scale, causal, bq, bk):
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
        dv_acc = np.zeros((nk, Dv), dtype=q.dtype)
        # causal block skipping: queries i < k0 see none of these keys; start at the tile holding query k0
        q_start = (k0 // bq) * bq if causal else 0
        for q0 in range(q_start, T, bq):
            q1 = min(q0 + bq, T)
            nq = q1 - q0
            qt = q[bh, q0:q1] * scale  # (nq, D)
            dot = dout[bh, q0:q1]  # (nq, Dv)
            ncols = np.empty(nq, dtype=np.int64)
            shift = np.empty(nq, dtype=q.dtype)
            for i in range(nq):
                shift[i] = lse[bh, q0 + i]
            p, ds = recompute_tile(qt, dot, kt, vt, shift, delta[bh], q0, k0, causal, ncols)
            # dV_j += Σ_i p_ij dout_i ;  dK_j += Σ_i dS_ij (scale · q_i)
            dv_acc += np.dot(p.T, dot)
            dk_acc += np.dot(ds.T, qt)
        dk[bh, k0:k1] = dk_acc
        dv[bh, k0:k1] = dv_acc


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _attention_bwd_dq_kernel(q, k, v, dout, lse, delta, dq, scale, causal, bq, bk):
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
        ncols = np.empty(nq, dtype=np.int64)
        shift = np.empty(nq, dtype=q.dtype)
        for i in range(nq):
            shift[i] = lse[bh, q0 + i]
        k_end = min(S, q1) if causal else S
        for k0 in range(0, k_end, bk):
            k1 = min(k0 + bk, k_end)
            _, ds = recompute_tile(qt, dot, k[bh, k0:k1], v[bh, k0:k1], shift, delta[bh], q0, k0, causal, ncols)
            # dQ_i += Σ_j dS_ij k_j   (× scale below)
            dq_acc += np.dot(ds, k[bh, k0:k1])
        for i in range(nq):
            for d in range(D):
                dq[bh, q0 + i, d] = dq_acc[i, d] * scale


_BLAS_CONTROLLER = None


def _single_threaded_blas():
    """A context in which BLAS runs on one thread.

    The numba kernel is already parallel over (head, query tile) jobs. If each job's np.dot also spawned
    OpenBLAS threads, 2 numba threads × 2 BLAS threads would fight for 2 cores (and OpenBLAS, seeing an OpenMP
    parallel region, prints "Detect OpenMP Loop" and slows down 3–5×). So: parallelism across tiles, one BLAS
    thread inside each — measured as the fastest combination (``python -m effedu.bench attention``).
    """
    global _BLAS_CONTROLLER
    from threadpoolctl import ThreadpoolController

    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def attention_numba(q, k, v, *, causal=False, scale=1.0, block_size=256):
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
    with _single_threaded_blas():
        _attention_numba_kernel(qn, kn, vn, out.numpy(), lse.numpy(), qn.dtype.type(scale), bool(causal), bq, bk)
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)


def attention_backward_numba(q, k, v, out, lse, dout, *, causal=False, scale=1.0, block_size=256):
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
    with _single_threaded_blas():
        _attention_bwd_dkdv_kernel(qn, kn, vn, do.numpy(), lse_n, delta.numpy(), dk.numpy(), dv.numpy(), sc,
                                   bool(causal), bq, bk)
        _attention_bwd_dq_kernel(qn, kn, vn, do.numpy(), lse_n, delta.numpy(), dq.numpy(), sc, bool(causal), bq, bk)
    return dq.reshape(B, H, T, D), dk.reshape(B, H, S, D), dv.reshape(B, H, S, Dv)


def numba_workspace_bytes(T, S, D, Dv, *, block_size=256, itemsize=4, n_threads=None, backward=False):
    """Bytes the numba kernel allocates internally at most (numba's own allocator: no profiler sees them).

    Per worker thread, one job at a time: the scaled query tile (Bq·D), the accumulator (Bq·Dv), the score
    tile that np.dot returns (Bq·Bk, at most two alive while the next one is made) and five row vectors.
    ``backward=True``: the larger of the two backward sweeps (key sweep: a scaled Q tile, private dK and dV
    accumulators, the P and dP tiles; query sweep: Q tile, dQ accumulator, P and dP).
    Independent of T and S beyond one tile: that is the point of tiling.
    """
    from numba import get_num_threads

    n_threads = get_num_threads() if n_threads is None else n_threads
    bq, bk = min(block_size, T), min(block_size, S)
    if backward:
        key_sweep = bq * D + bk * (D + Dv) + 2 * bq * bk + 2 * bq
        query_sweep = 2 * bq * D + 2 * bq * bk + 3 * bq
        per_job = max(key_sweep, query_sweep) * itemsize
    else:
        per_job = (bq * D + bq * Dv + 2 * bq * bk + 5 * bq + N_LANES) * itemsize
    return n_threads * per_job


# --------------------------------------------------------------------------------------------------------------
# numba.cuda on a GPU (and in the CUDA simulator for tests)
# --------------------------------------------------------------------------------------------------------------

CUDA_MAX_HEAD_DIM = 128  # shared-memory tiles are sized at compile time
CUDA_STATIC_SMEM_BYTES = 48 * 1024  # static __shared__ memory a block may declare (every GPU since Fermi)
CUDA_MAX_GRID_Y = 65535  # the grid's y (and z) extent limit; x may reach 2³¹ − 1
_CUDA_KERNELS = {}


def _cuda_tile_dims(np_dtype, block, D, Dv):
    """Compile-time tile sizes ``(BK, DMAX)`` for the CUDA kernel.

    ``DMAX``: the head-dim capacity of the shared and local arrays, the smallest power of two ≥ max(D, Dv)
    (at least 16, at most ``CUDA_MAX_HEAD_DIM``), so a D=64 head does not pay for 128 columns.
    ``BK``: keys per shared-memory tile. The K and V tiles take ``2·BK·DMAX·itemsize`` bytes, which must stay within
    the 48 KiB of static shared memory a block may declare (float64, block 32, D=128 would need 64 KiB and fail to
    compile for a real GPU), so BK is ``block`` halved until it fits (float64 at DMAX=128: BK=16).
    """
    dmax = 16
    while dmax < max(D, Dv):
        dmax *= 2
    itemsize = np.dtype(np_dtype).itemsize
    bk = block
    while bk > 8 and 2 * bk * dmax * itemsize > CUDA_STATIC_SMEM_BYTES:
        bk //= 2
    return bk, dmax


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
    def kernel(q, k, v, out, lse, scale, causal):
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
            # causal block skipping: the tile's last query is min(q0 + BLOCK, T) − 1, later keys are never needed
            q_end = q0 + BLOCK
            if q_end > T:
                q_end = T
            if q_end < k_end:
                k_end = q_end
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
                if causal and i - k0 + 1 < n_keys:
                    n_keys = i - k0 + 1  # keys j ≤ i only
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
    def dkdv_kernel(q, k, v, dout, lse, delta, dk, dv, scale, causal):
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
        # causal block skipping: queries before k0 see none of this tile's keys
        q_start = 0
        if causal:
            q_start = (k0 // BK) * BK
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
                    if causal and q0 + ii < j:
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
    def dq_kernel(q, k, v, dout, lse, delta, dq, scale, causal):
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
            if q_end < k_end:
                k_end = q_end
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
                if causal and i - k0 + 1 < n_keys:
                    n_keys = i - k0 + 1
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
        n_t = (n + block_size - 1) // block_size
        if n_t > CUDA_MAX_GRID_Y:
            raise ValueError(
                f"{where}: {what}={n} needs {n_t} tiles of {block_size}, more than the grid's "
                f"{CUDA_MAX_GRID_Y}; use a larger block_size"
            )
    np_dtype = np.float32 if q.dtype == torch.float32 else np.float64
    bk, dmax = _cuda_tile_dims(np_dtype, block_size, D, Dv)
    return np_dtype, bk, dmax


def _cuda_run(kernel, grid, block_size, tensors, scalars, device):
    """Launch on the tensors' GPU (zero-copy through __cuda_array_interface__), or in the simulator on host arrays."""
    if device.type == "cuda":
        dev = device.index if device.index is not None else torch.cuda.current_device()
        with cuda.gpus[dev]:  # launch on the tensors' GPU, not numba's default device 0
            kernel[grid, block_size](*[cuda.as_cuda_array(x) for x in tensors], *scalars)
        torch.cuda.synchronize(device)
    else:
        kernel[grid, block_size](*[x.numpy() for x in tensors], *scalars)


def attention_backward_cuda(q, k, v, out, lse, dout, *, causal=False, scale=1.0, block_size=32):
    """numba.cuda backward (two sweeps); CUDA tensors in and out (CPU tensors only under the simulator)."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    np_dtype, bk, dmax = _cuda_launch_setup(q, k, v, block_size)
    key = ("bwd", np_dtype, block_size, bk, dmax)
    if key not in _CUDA_KERNELS:
        _CUDA_KERNELS[key] = _make_cuda_bwd_kernels(np_dtype, block_size, bk, dmax)
    dkdv_kernel, dq_kernel = _CUDA_KERNELS[key]
    flat = lambda x, n, d: x.detach().to(q.dtype).contiguous().reshape(B * H, n, d)  # noqa: E731
    qc, kc, vc, do = flat(q, T, D), flat(k, S, D), flat(v, S, Dv), flat(dout, T, Dv)
    delta = (do * flat(out, T, Dv)).sum(dim=-1).contiguous()  # δ_i = Σ_d dout_id out_id
    lse_c = lse.detach().to(q.dtype).contiguous().reshape(B * H, T)
    dq = torch.empty((B * H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B * H, S, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B * H, S, Dv), dtype=q.dtype, device=q.device)
    scalars = (np_dtype(scale), bool(causal))
    _cuda_run(dkdv_kernel, (B * H, (S + block_size - 1) // block_size), block_size,
              (qc, kc, vc, do, lse_c, delta, dk, dv), scalars, q.device)
    _cuda_run(dq_kernel, (B * H, (T + block_size - 1) // block_size), block_size,
              (qc, kc, vc, do, lse_c, delta, dq), scalars, q.device)
    return dq.reshape(B, H, T, D), dk.reshape(B, H, S, D), dv.reshape(B, H, S, Dv)


def attention_cuda(q, k, v, *, causal=False, scale=1.0, block_size=32):
    """numba.cuda tiled attention; CUDA tensors in and out (CPU tensors only under the simulator)."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    np_dtype, bk, dmax = _cuda_launch_setup(q, k, v, block_size)
    key = (np_dtype, block_size, bk, dmax)
    if key not in _CUDA_KERNELS:
        _CUDA_KERNELS[key] = _make_cuda_kernel(np_dtype, block_size, bk, dmax)
    qc = q.detach().contiguous().reshape(B * H, T, D)
    kc = k.detach().contiguous().reshape(B * H, S, D)
    vc = v.detach().contiguous().reshape(B * H, S, Dv)
    out = torch.empty((B * H, T, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, T), dtype=q.dtype, device=q.device)
    grid = (B * H, (T + block_size - 1) // block_size)  # B·H on x (limit 2³¹ − 1), query tiles on y (limit 65535)
    _cuda_run(_CUDA_KERNELS[key], grid, block_size, (qc, kc, vc, out, lse), (np_dtype(scale), bool(causal)), q.device)
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)
