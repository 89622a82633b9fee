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

Forward only in this chapter (01); the backward by recomputation from ``lse`` arrives with chapter 19.
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


# --------------------------------------------------------------------------------------------------------------
# numba on the CPU
# --------------------------------------------------------------------------------------------------------------


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
            nk = k1 - k0
            # s_ij = (q_i · k_j) · scale                                    (nq, nk), BLAS sgemm/dgemm
            s = np.dot(qs, k[bh, k0:k1].T)
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
            # p_ij = exp(s_ij − m_new), 0 for the masked columns      (vectorised exp, in place)
            exp_rows(s, m, ncols)
            for i in range(nq):
                # l_i = α l_i + Σ_j p_ij ;   acc_i = α acc_i (+ P V below)
                l[i] = alpha[i] * l[i] + row_sum(s, i, nk)
                for d in range(Dv):
                    acc[i, d] *= alpha[i]
            # acc += P V                                                  (nq, Dv), BLAS
            acc += np.dot(s, v[bh, k0:k1])
        for i in range(nq):
            inv = 1.0 / l[i]
            for d in range(Dv):
                out[bh, q0 + i, d] = acc[i, d] * inv
            lse[bh, q0 + i] = m[i] + math.log(l[i])


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


def numba_workspace_bytes(T, S, D, Dv, *, block_size=256, itemsize=4, n_threads=None):
    """Bytes the numba kernel allocates internally at most (numba's own allocator: no profiler sees them).

    Per worker thread, one job at a time: the scaled query tile (Bq·D), the accumulator (Bq·Dv), the score
    tile that np.dot returns (Bq·Bk, at most two alive while the next one is made) and five row vectors.
    Independent of T and S beyond one tile: that is the point of tiling.
    """
    from numba import get_num_threads

    n_threads = get_num_threads() if n_threads is None else n_threads
    bq, bk = min(block_size, T), min(block_size, S)
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


def attention_cuda(q, k, v, *, causal=False, scale=1.0, block_size=32):
    """numba.cuda tiled attention; CUDA tensors in and out (CPU tensors only under the simulator)."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    if D > CUDA_MAX_HEAD_DIM or Dv > CUDA_MAX_HEAD_DIM:
        raise ValueError(
            f"attention(backend='cuda'): head dim must be ≤ {CUDA_MAX_HEAD_DIM} (shared-memory tile size), "
            f"got D={D}, Dv={Dv}; use backend='numba' or 'torch'"
        )
    n_qt = (T + block_size - 1) // block_size
    if n_qt > CUDA_MAX_GRID_Y:
        raise ValueError(
            f"attention(backend='cuda'): T={T} needs {n_qt} query tiles of {block_size}, more than the grid's "
            f"{CUDA_MAX_GRID_Y}; use a larger block_size"
        )
    np_dtype = np.float32 if q.dtype == torch.float32 else np.float64
    bk, dmax = _cuda_tile_dims(np_dtype, block_size, D, Dv)
    key = (np_dtype, block_size, bk, dmax)
    if key not in _CUDA_KERNELS:
        _CUDA_KERNELS[key] = _make_cuda_kernel(np_dtype, block_size, bk, dmax)
    kernel = _CUDA_KERNELS[key]
    qc = q.detach().contiguous().reshape(B * H, T, D)
    kc = k.detach().contiguous().reshape(B * H, S, D)
    vc = v.detach().contiguous().reshape(B * H, S, Dv)
    out = torch.empty((B * H, T, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, T), dtype=q.dtype, device=q.device)
    grid = (B * H, n_qt)  # B·H on x (limit 2³¹ − 1), query tiles on y (limit 65535)
    if q.is_cuda:
        dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
        with cuda.gpus[dev]:  # launch on the tensors' GPU, not numba's default device 0
            # zero-copy: numba reads torch's memory through __cuda_array_interface__
            args = [cuda.as_cuda_array(x) for x in (qc, kc, vc, out, lse)]
            kernel[grid, block_size](*args, np_dtype(scale), bool(causal))
        torch.cuda.synchronize(q.device)
        return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)
    # simulator: host arrays stand in for device memory
    out_np, lse_np = out.numpy(), lse.numpy()
    kernel[grid, block_size](qc.numpy(), kc.numpy(), vc.numpy(), out_np, lse_np, np_dtype(scale), bool(causal))
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)
