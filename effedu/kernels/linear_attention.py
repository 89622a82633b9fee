"""Causal linear attention by prefix sums: one op, three backends, forward and backward.

Katharopoulos et al. (2020, "Transformers are RNNs") replace the softmax kernel exp(q·k) by a dot product of
non-negative feature maps φ(q)·φ(k). Then the T×T matrix never has to exist: for query i (causal, keys j ≤ i)

    out_i = Σ_{j≤i} (φq_i·φk_j) v_j / Σ_{j≤i} φq_i·φk_j  =  φq_iᵀ S_i / (φq_i·z_i)

    S_i = Σ_{j≤i} φk_j v_jᵀ   (M × Dv, a prefix sum of outer products)      z_i = Σ_{j≤i} φk_j   (M)

so the cost is O(T·M·Dv) instead of O(T²·D). This module takes φq = ``phi_q`` and φk = ``phi_k`` *already
feature-mapped* (elu+1 for the linear Transformer, positive random features for the Performer: see
``effedu/attention/kernelized.py``) and computes ``out`` with a small ``eps`` in the denominator
(``φq_i·z_i + eps``): with non-negative features the denominator is ≥ 0, and eps keeps an all-zero row at 0
instead of 0/0 = NaN.

Chunks. Summing outer products one token at a time is an RNN: exact, but T sequential rank-1 updates that no BLAS
can speed up. Cut the sequence into chunks of C tokens instead (Hua et al. 2022; the "chunkwise" form of
flash-linear-attention). For the chunk c holding rows c0 … c0+C−1, with S, z the state *before* the chunk:

    P      = tril(A_c B_cᵀ)                    (C × C, the chunk's own masked scores; A = φq, B = φk)
    N_c    = P V_c + A_c S                     numerators: inside the chunk + everything before it
    den_c  = rowsum(P) + A_c z
    S     += B_cᵀ V_c ,   z += colsum(B_c)     the state moves on by one chunk

Four matrix products of C-sized blocks per chunk: BLAS does the work, and only C×C (not T×T) scores exist.

Backward. With out_i = N_i / (den_i + eps) and g = ∂L/∂out, let dN_i = g_i / (den_i+eps) and
dden_i = −(g_i·out_i) / (den_i+eps). Then (G_ij = dN_i·v_j + dden_i for j ≤ i, else 0)

    ∂L/∂φq_i = Σ_{j≤i} G_ij φk_j           = (G B)_i + S_i⁻ dN_i + dden_i z_i⁻      (prefix sums: a forward sweep)
    ∂L/∂φk_j = Σ_{i≥j} G_ij φq_i           = (Gᵀ A)_j + R v_j + r                     (suffix sums: a reverse sweep)
    ∂L/∂v_j  = Σ_{i≥j} (φq_i·φk_j) dN_i    = (Pᵀ dN)_j + Rᵀ φk_j

with the reverse states R = Σ_{i later} φq_i dN_iᵀ (M × Dv) and r = Σ_{i later} φq_i dden_i: the backward of a
prefix sum is a reverse prefix sum. Saved for backward: φq, φk, v, out, den — O(T·(M+Dv)), never T×T.

Backends (same signature, same results up to float rounding):
  * ``linear_attention_torch`` — the chunked algorithm in torch ops, all chunks at once: the per-chunk states are
    summed with an exclusive ``cumsum`` over chunks, O(T·M·Dv / C) memory. Autograd works through it.
  * ``linear_attention_numba`` — ``@njit(parallel=True)``, one parallel job per (batch·head); the chunks of a job
    run in order carrying S, z (forward) or R, r (backward); the block products go to BLAS (np.dot). Calls too
    small to pay for starting the thread team (a tiny model's training step) run the same loop serially.
  * ``linear_attention_cuda`` — ``@cuda.jit``, a three-phase *block scan* over chunks: (1) every thread block sums
    its chunk's outer products ``Σ_j w_j u_jᵀ``, (2) an exclusive scan over the chunk sums gives each chunk the
    state before it, (3) every block computes its rows: masked in-chunk products plus the state term. The
    backward is three such causal products (one forward, two reversed), built from the formulas above.

``prefix_sum_reference`` is the formula read literally (S_i for every i: O(T·M·Dv) memory), kept as the plain
reference next to the efficient versions.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import cuda, njit, prange

from .._checks import check_positive_int, check_qkv
from ._base import (CUDA_MAX_GRID_Y, CUDA_STATIC_SMEM_BYTES, apply_kernel, cached_kernels, cuda_launch, np_dtype_of,
                    resolve_backend, shared_tile_dims, single_threaded_blas)

DEFAULT_EPS = 1e-6
DEFAULT_CHUNK = {"torch": 64, "numba": 64, "cuda": 32}
WHERE = "causal_linear_attention"


# --------------------------------------------------------------------------------------------------------------
# torch: the literal formula and the chunked reference
# --------------------------------------------------------------------------------------------------------------


def prefix_sum_reference(phi_q, phi_k, v, *, eps=DEFAULT_EPS):
    """The formula read literally: every S_i = Σ_{j≤i} φk_j v_jᵀ is materialised, O(T·M·Dv) memory (tiny inputs)."""
    # S_i = Σ_{j≤i} φk_j v_jᵀ                                                      (B, H, T, M, Dv)
    S = torch.cumsum(phi_k.unsqueeze(-1) * v.unsqueeze(-2), dim=2)
    # z_i = Σ_{j≤i} φk_j                                                             (B, H, T, M)
    z = torch.cumsum(phi_k, dim=2)
    # out_i = φq_iᵀ S_i / (φq_i·z_i + eps)
    num = (phi_q.unsqueeze(-1) * S).sum(-2)
    den = (phi_q * z).sum(-1, keepdim=True)
    return num / (den + eps)


def linear_attention_torch(phi_q, phi_k, v, *, eps=DEFAULT_EPS, chunk_size=64):
    """Chunked causal linear attention in torch ops (every chunk at once); autograd works through it."""
    B, H, T, M = phi_q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    n = -(-T // C)  # chunks
    pad = n * C - T
    if pad:
        # zero features add nothing to any state; the padded rows' outputs are cut off at the end
        phi_q, phi_k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (phi_q, phi_k, v))
    a = phi_q.reshape(B, H, n, C, M)
    b = phi_k.reshape(B, H, n, C, M)
    vc = v.reshape(B, H, n, C, Dv)
    # P = tril(A_c B_cᵀ): the chunk's own scores, j ≤ i                            (B, H, n, C, C)
    tril = torch.ones(C, C, dtype=torch.bool, device=a.device).tril()
    P = (a @ b.transpose(-1, -2)).masked_fill(~tril, 0.0)
    # per-chunk sums B_cᵀ V_c and colsum(B_c), then the states *before* each chunk (exclusive cumsum)
    states = b.transpose(-1, -2) @ vc  # (B, H, n, M, Dv)
    zs = b.sum(-2)  # (B, H, n, M)
    S = torch.cat([torch.zeros_like(states[:, :, :1]), states[:, :, :-1].cumsum(2)], dim=2)
    z = torch.cat([torch.zeros_like(zs[:, :, :1]), zs[:, :, :-1].cumsum(2)], dim=2)
    # N_c = P V_c + A_c S ;  den_c = rowsum(P) + A_c z
    num = P @ vc + a @ S
    den = P.sum(-1) + (a @ z.unsqueeze(-1)).squeeze(-1)
    out = num / (den + eps).unsqueeze(-1)
    return out.reshape(B, H, n * C, Dv)[:, :, :T]


# --------------------------------------------------------------------------------------------------------------
# numba on the CPU
# --------------------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _forward_one(a, b, v, out, den, eps, chunk, bh):
    # one (batch, head): its chunks run in order, carrying S and z.
    # a, b (BH, T, M), v (BH, T, Dv), out (BH, T, Dv), den (BH, T) — C-contiguous
    T, M = a.shape[1], a.shape[2]
    Dv = v.shape[2]
    S = np.zeros((M, Dv), dtype=a.dtype)  # Σ_{j < c0} φk_j v_jᵀ
    z = np.zeros(M, dtype=a.dtype)  # Σ_{j < c0} φk_j
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        n = c1 - c0
        ac = a[bh, c0:c1]
        bc = b[bh, c0:c1]
        vc = v[bh, c0:c1]
        # P = A_c B_cᵀ                                                               (n, n), BLAS
        P = np.dot(ac, bc.T)
        dens = np.empty(n, dtype=a.dtype)
        for i in range(n):
            # den_i = Σ_{j≤i} P_ij + φq_i·z ; then zero P_ij for j > i (tril)
            s = a.dtype.type(0.0)
            for j in range(i + 1):
                s += P[i, j]
            for j in range(i + 1, n):
                P[i, j] = 0.0
            for m in range(M):
                s += ac[i, m] * z[m]
            dens[i] = s
        # N_c = P V_c + A_c S                                                        (n, Dv), two BLAS calls
        N1 = np.dot(P, vc)
        N2 = np.dot(ac, S)
        for i in range(n):
            inv = 1.0 / (dens[i] + eps)
            for e in range(Dv):
                out[bh, c0 + i, e] = (N1[i, e] + N2[i, e]) * inv
            den[bh, c0 + i] = dens[i]
        # S += B_cᵀ V_c ;  z += colsum(B_c)
        S += np.dot(bc.T, vc)
        for i in range(n):
            for m in range(M):
                z[m] += bc[i, m]


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _forward_kernel(a, b, v, out, den, eps, chunk):
    for bh in prange(a.shape[0]):  # one parallel job per (batch, head)
        _forward_one(a, b, v, out, den, eps, chunk, bh)


@njit(fastmath=False, cache=True, nogil=True)
def _forward_kernel_serial(a, b, v, out, den, eps, chunk):
    for bh in range(a.shape[0]):
        _forward_one(a, b, v, out, den, eps, chunk, bh)


@njit(cache=True, nogil=True, inline="always")
def _chunk_grads(g, out, den, c0, n, eps, bh):
    # dN_i = g_i / (den_i + eps) ;  dden_i = −(g_i·out_i) / (den_i + eps)
    Dv = g.shape[2]
    dN = np.empty((n, Dv), dtype=g.dtype)
    dd = np.empty(n, dtype=g.dtype)
    for i in range(n):
        inv = 1.0 / (den[bh, c0 + i] + eps)
        s = g.dtype.type(0.0)
        for e in range(Dv):
            s += g[bh, c0 + i, e] * out[bh, c0 + i, e]
            dN[i, e] = g[bh, c0 + i, e] * inv
        dd[i] = -s * inv
    return dN, dd


@njit(cache=True, nogil=True, inline="always")
def _masked_G(dN, vc, dd):
    # G_ij = dN_i·v_j + dden_i for j ≤ i, 0 for j > i                              (n, n)
    G = np.dot(dN, vc.T)
    n = G.shape[0]
    for i in range(n):
        for j in range(i + 1):
            G[i, j] += dd[i]
        for j in range(i + 1, n):
            G[i, j] = 0.0
    return G


@njit(cache=True, nogil=True, inline="always")
def _backward_one(a, b, v, out, den, g, da, db, dv, eps, chunk, bh):
    T, M = a.shape[1], a.shape[2]
    Dv = v.shape[2]
    n_chunks = (T + chunk - 1) // chunk
    # sweep 1, forward in time: ∂L/∂φq_i = (G B)_i + dN_iᵀ Sᵀ + dden_i z   (prefix states S, z)
    S = np.zeros((M, Dv), dtype=a.dtype)
    z = np.zeros(M, dtype=a.dtype)
    for c in range(n_chunks):
        c0 = c * chunk
        c1 = min(c0 + chunk, T)
        n = c1 - c0
        bc = b[bh, c0:c1]
        vc = v[bh, c0:c1]
        dN, dd = _chunk_grads(g, out, den, c0, n, eps, bh)
        G = _masked_G(dN, vc, dd)
        X1 = np.dot(G, bc)  # (n, M)
        X2 = np.dot(dN, S.T)  # (n, M)
        for i in range(n):
            for m in range(M):
                da[bh, c0 + i, m] = X1[i, m] + X2[i, m] + dd[i] * z[m]
        S += np.dot(bc.T, vc)
        for i in range(n):
            for m in range(M):
                z[m] += bc[i, m]
    # sweep 2, backward in time: ∂L/∂φk_j = (Gᵀ A)_j + R v_j + r ;  ∂L/∂v_j = (Pᵀ dN)_j + Rᵀ φk_j
    R = np.zeros((M, Dv), dtype=a.dtype)  # Σ_{i after the chunk} φq_i dN_iᵀ
    r = np.zeros(M, dtype=a.dtype)  # Σ_{i after the chunk} φq_i dden_i
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        c0 = c * chunk
        c1 = min(c0 + chunk, T)
        n = c1 - c0
        ac = a[bh, c0:c1]
        bc = b[bh, c0:c1]
        vc = v[bh, c0:c1]
        dN, dd = _chunk_grads(g, out, den, c0, n, eps, bh)
        G = _masked_G(dN, vc, dd)
        P = np.dot(ac, bc.T)
        for i in range(n):
            for j in range(i + 1, n):
                P[i, j] = 0.0
        Y1 = np.dot(G.T, ac)  # (n, M)
        Y2 = np.dot(vc, R.T)  # (n, M)
        for j in range(n):
            for m in range(M):
                db[bh, c0 + j, m] = Y1[j, m] + Y2[j, m] + r[m]
        W1 = np.dot(P.T, dN)  # (n, Dv)
        W2 = np.dot(bc, R)  # (n, Dv)
        for j in range(n):
            for e in range(Dv):
                dv[bh, c0 + j, e] = W1[j, e] + W2[j, e]
        R += np.dot(ac.T, dN)
        for i in range(n):
            for m in range(M):
                r[m] += ac[i, m] * dd[i]


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _backward_kernel(a, b, v, out, den, g, da, db, dv, eps, chunk):
    for bh in prange(a.shape[0]):  # one parallel job per (batch, head): two sweeps over its chunks
        _backward_one(a, b, v, out, den, g, da, db, dv, eps, chunk, bh)


@njit(fastmath=False, cache=True, nogil=True)
def _backward_kernel_serial(a, b, v, out, den, g, da, db, dv, eps, chunk):
    for bh in range(a.shape[0]):
        _backward_one(a, b, v, out, den, g, da, db, dv, eps, chunk, bh)


SERIAL_WORK = 2**20  # multiply-adds below which one thread beats starting the parallel region


def _parallel_worth_it(BH, T, M, Dv, chunk):
    # per call ≈ BH·T·(C·(M + Dv) + 2·M·Dv) multiply-adds; tiny calls (a small model's training step) run serially
    return BH > 1 and BH * T * (min(chunk, T) * (M + Dv) + 2 * M * Dv) >= SERIAL_WORK


def _flat(x):
    B, H, T, D = x.shape
    return x.reshape(B * H, T, D)


def linear_attention_numba_forward(a, b, v, *, eps=DEFAULT_EPS, chunk_size=64):
    """numba forward on contiguous CPU tensors; returns ``(out (B,H,T,Dv), den (B,H,T))`` (den without eps)."""
    B, H, T, M = a.shape
    Dv = v.shape[-1]
    an, bn, vn = (_flat(x.detach().contiguous()).numpy() for x in (a, b, v))
    # outputs allocated by torch (its memory profiler sees them), written by numba through .numpy()
    out = torch.empty((B * H, T, Dv), dtype=a.dtype)
    den = torch.empty((B * H, T), dtype=a.dtype)
    kernel = _forward_kernel if _parallel_worth_it(B * H, T, M, Dv, chunk_size) else _forward_kernel_serial
    with single_threaded_blas():
        kernel(an, bn, vn, out.numpy(), den.numpy(), an.dtype.type(eps), min(chunk_size, T))
    return out.reshape(B, H, T, Dv), den.reshape(B, H, T)


def linear_attention_numba_backward(a, b, v, out, den, grad_out, *, eps=DEFAULT_EPS, chunk_size=64):
    """numba backward: ``(∂L/∂φq, ∂L/∂φk, ∂L/∂v)`` from the saved forward tensors and ``grad_out``."""
    B, H, T, M = a.shape
    Dv = v.shape[-1]
    arrs = [_flat(x.detach().contiguous()).numpy() for x in (a, b, v, out, grad_out)]
    denn = den.detach().contiguous().reshape(B * H, T).numpy()
    da = torch.empty((B * H, T, M), dtype=a.dtype)
    db = torch.empty((B * H, T, M), dtype=a.dtype)
    dv = torch.empty((B * H, T, Dv), dtype=a.dtype)
    an, bn, vn, on, gn = arrs
    kernel = _backward_kernel if _parallel_worth_it(B * H, T, M, Dv, chunk_size) else _backward_kernel_serial
    with single_threaded_blas():
        kernel(an, bn, vn, on, denn, gn, da.numpy(), db.numpy(), dv.numpy(), an.dtype.type(eps),
                         min(chunk_size, T))
    return da.reshape(B, H, T, M), db.reshape(B, H, T, M), dv.reshape(B, H, T, Dv)


linear_attention_backward_numba = linear_attention_numba_backward  # the uniform name


def linear_attention_numba(phi_q, phi_k, v, *, eps=DEFAULT_EPS, chunk_size=64):
    """The numba backend as a differentiable function (forward and backward kernels)."""
    return apply_kernel(linear_attention_numba_forward, linear_attention_numba_backward, (phi_q, phi_k, v), eps=eps,
                        chunk_size=chunk_size)[0]


def numba_workspace_bytes(T, M, Dv, *, chunk_size=64, itemsize=4, n_threads=None, backward=False):
    """Bytes the numba kernels allocate internally at most (numba's allocator: torch's profiler does not see them).

    Per worker thread: the states (S, z; R, r in backward), a chunk's score block P (and G), and the few C-row
    blocks that np.dot returns. Independent of T beyond one chunk.
    """
    from numba import get_num_threads

    n_threads = get_num_threads() if n_threads is None else n_threads
    C = min(chunk_size, T)
    per_job = M * Dv + M + C * C + 3 * C * Dv + C
    if backward:
        per_job = 2 * (M * Dv + M) + 2 * C * C + 3 * C * Dv + 4 * C * M + 2 * C
    return n_threads * per_job * itemsize


# --------------------------------------------------------------------------------------------------------------
# numba.cuda on a GPU (and in the CUDA simulator for tests): a block scan over chunks
# --------------------------------------------------------------------------------------------------------------

CUDA_THREADS = 128  # threads per block in every phase
CUDA_MAX_DIM = 256  # feature / value width the shared tiles hold (the backward products need Dv + 1)


def _cuda_dims(np_dtype, chunk, width):
    """Compile-time ``(C, DMAX)``: DMAX the smallest power of two ≥ width (≥ 16); C = chunk halved until the
    shared tiles x, w (C × DMAX each) and the scores P (C × C) fit the 48 KiB of static shared memory."""
    return shared_tile_dims(np_dtype, chunk, width, lambda c, dmax: 2 * c * dmax + c * c, min_rows=4)


cuda_tile_dims = _cuda_dims  # the one name every op's tile-size helper has


def _check_cuda_dims(M, Dv, T, chunk, dtype):
    if M > CUDA_MAX_DIM or Dv + 1 > CUDA_MAX_DIM:
        raise ValueError(
            f"{WHERE}(backend='cuda'): feature count M and value dim Dv must satisfy M ≤ {CUDA_MAX_DIM} and "
            f"Dv < {CUDA_MAX_DIM} (shared-memory tile width), got M={M}, Dv={Dv}; use backend='numba' or 'torch'"
        )
    np_dtype = np_dtype_of(dtype)
    C, _ = _cuda_dims(np_dtype, chunk, max(M, Dv + 1))
    if -(-T // C) > CUDA_MAX_GRID_Y:
        raise ValueError(f"{WHERE}(backend='cuda'): T={T} needs more than {CUDA_MAX_GRID_Y} chunks of {C}; "
                         f"use a larger chunk_size")


@cached_kernels
def _make_cuda_kernels(np_dtype, C, DMAX, NT=CUDA_THREADS):
    """Compile the three phases of the causal product ``Y = tril(X Wᵀ) U`` (``reverse``: triu) for one dtype.

    ``chunk_sums``: block (bh, c) writes ``Σ_{j∈c} w_j u_jᵀ`` to states[bh, c]; ``scan``: an exclusive scan of
    the states over chunks (in reverse order for ``reverse``), in place, one thread per state entry;
    ``outputs``: block (bh, c) computes ``Y_i = Σ_{j∈c, j≤i} (x_i·w_j) u_j + x_iᵀ states[bh, c]``.
    ``NT`` threads per block (every loop is strided by NT, so any count is correct). Arithmetic in the input
    dtype; no builtin ``min``/``max`` (numba ≥ 0.66 cannot compile them for CUDA).
    """
    from numba import float32, float64

    nb_dtype = float32 if np_dtype == np.float32 else float64
    ZERO = np_dtype(0.0)

    @cuda.jit
    def chunk_sums(w, u, states):
        # grid (B·H, n_chunks), NT threads; thread t owns state entries t, t + NT, …
        bh = cuda.blockIdx.x
        c = cuda.blockIdx.y
        t = cuda.threadIdx.x
        T = w.shape[1]
        Dw = w.shape[2]
        Du = u.shape[2]
        c0 = c * C
        n = T - c0
        if n > C:
            n = C
        for idx in range(t, Dw * Du, NT):
            d = idx // Du
            e = idx - d * Du
            s = ZERO
            for j in range(n):
                # Σ_{j∈c} w_j[d] u_j[e]
                s += w[bh, c0 + j, d] * u[bh, c0 + j, e]
            states[bh, c, d, e] = s

    @cuda.jit
    def scan(states, reverse):
        # grid (B·H, ⌈Dw·Du / NT⌉): one thread per state entry walks the chunks in order, exclusive prefix sum
        bh = cuda.blockIdx.x
        idx = cuda.blockIdx.y * NT + cuda.threadIdx.x
        n_chunks = states.shape[1]
        Dw = states.shape[2]
        Du = states.shape[3]
        if idx < Dw * Du:
            d = idx // Du
            e = idx - d * Du
            run = ZERO
            for cc in range(n_chunks):
                c = n_chunks - 1 - cc if reverse else cc
                tmp = states[bh, c, d, e]
                states[bh, c, d, e] = run  # the state *before* chunk c (after it, for reverse)
                run += tmp

    @cuda.jit
    def outputs(x, w, u, states, y, reverse):
        # grid (B·H, n_chunks), NT threads; x, w rows of the chunk staged in shared memory
        bh = cuda.blockIdx.x
        c = cuda.blockIdx.y
        t = cuda.threadIdx.x
        T = x.shape[1]
        Dx = x.shape[2]
        Du = u.shape[2]
        c0 = c * C
        n = T - c0
        if n > C:
            n = C
        x_sh = cuda.shared.array((C, DMAX), dtype=nb_dtype)
        w_sh = cuda.shared.array((C, DMAX), dtype=nb_dtype)
        p_sh = cuda.shared.array((C, C), dtype=nb_dtype)
        for idx in range(t, C * Dx, NT):
            i = idx // Dx
            d = idx - i * Dx
            x_sh[i, d] = x[bh, c0 + i, d] if i < n else ZERO
            w_sh[i, d] = w[bh, c0 + i, d] if i < n else ZERO
        cuda.syncthreads()
        # P_ij = x_i·w_j where j ≤ i (reverse: j ≥ i), else 0
        for idx in range(t, C * C, NT):
            i = idx // C
            j = idx - i * C
            keep = i < n and j < n
            if reverse:
                keep = keep and j >= i
            else:
                keep = keep and j <= i
            s = ZERO
            if keep:
                for d in range(Dx):
                    s += x_sh[i, d] * w_sh[j, d]
            p_sh[i, j] = s
        cuda.syncthreads()
        # Y_i[e] = Σ_j P_ij u_j[e] + Σ_d x_i[d] states[bh, c, d, e]
        for idx in range(t, n * Du, NT):
            i = idx // Du
            e = idx - i * Du
            acc = ZERO
            for j in range(n):
                acc += p_sh[i, j] * u[bh, c0 + j, e]
            for d in range(Dx):
                acc += x_sh[i, d] * states[bh, c, d, e]
            y[bh, c0 + i, e] = acc

    return chunk_sums, scan, outputs


def causal_product_cuda(x, w, u, *, reverse=False, chunk_size=32, threads=None):
    """``Y_i = Σ_{j≤i} (x_i·w_j) u_j`` (``reverse``: j ≥ i) with the CUDA block scan; (BH, T, ·) tensors.

    x, w ``(BH, T, Dx)``, u ``(BH, T, Du)``; CUDA tensors (CPU tensors under the simulator). The per-chunk states
    ``(BH, T/C, Dx, Du)`` are the kernel's only workspace: O(T·Dx·Du / C) memory. ``threads`` per block defaults
    to ``CUDA_THREADS`` (the simulator tests use fewer: every simulated thread is a Python thread).
    """
    BH, T, Dx = x.shape
    Du = u.shape[2]
    np_dtype = np_dtype_of(x.dtype)
    C, dmax = _cuda_dims(np_dtype, chunk_size, Dx)
    nt = CUDA_THREADS if threads is None else threads
    chunk_sums, scan, outputs = _make_cuda_kernels(np_dtype, C, dmax, nt)
    n_chunks = -(-T // C)
    x, w, u = (t.contiguous() for t in (x, w, u))
    states = torch.empty((BH, n_chunks, Dx, Du), dtype=x.dtype, device=x.device)
    y = torch.empty((BH, T, Du), dtype=x.dtype, device=x.device)
    grid = (BH, n_chunks)
    grid_scan = (BH, -(-(Dx * Du) // nt))
    cuda_launch(chunk_sums, grid, nt, (w, u, states))
    cuda_launch(scan, grid_scan, nt, (states,), (bool(reverse),))
    cuda_launch(outputs, grid, nt, (x, w, u, states, y), (bool(reverse),))
    return y


def _with_ones(x):
    # [x, 1]: a column of ones turns Σ_j P_ij u_j into (numerator, denominator) in one product
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def linear_attention_cuda_forward(a, b, v, *, eps=DEFAULT_EPS, chunk_size=32):
    """CUDA forward: ``[N, den] = tril(A Bᵀ) [V, 1]`` by the block scan, then ``out = N / (den + eps)``."""
    B, H, T, M = a.shape
    Dv = v.shape[-1]
    y = causal_product_cuda(_flat(a), _flat(b), _with_ones(_flat(v)), chunk_size=chunk_size)
    den = y[..., Dv]
    out = y[..., :Dv] / (den + eps).unsqueeze(-1)
    return out.reshape(B, H, T, Dv), den.reshape(B, H, T)


def linear_attention_cuda_backward(a, b, v, out, den, grad_out, *, eps=DEFAULT_EPS, chunk_size=32):
    """CUDA backward: three causal products on the GPU (one forward, two reversed), see the module docstring."""
    B, H, T, M = a.shape
    Dv = v.shape[-1]
    a, b, v, out, g = (_flat(x) for x in (a, b, v, out, grad_out))
    inv = 1.0 / (den.reshape(B * H, T, 1) + eps)
    dN = g * inv  # ∂L/∂N_i = g_i / (den_i + eps)
    dd = -(g * out).sum(-1, keepdim=True) * inv  # ∂L/∂den_i = −(g_i·out_i) / (den_i + eps)
    dN_hat = torch.cat([dN, dd], dim=-1)  # [dN, dden]: G_ij = dN̂_i·v̂_j with v̂ = [v, 1]
    v_hat = _with_ones(v)
    # ∂L/∂φq_i = Σ_{j≤i} (dN̂_i·v̂_j) φk_j
    da = causal_product_cuda(dN_hat, v_hat, b, chunk_size=chunk_size)
    # ∂L/∂φk_j = Σ_{i≥j} (v̂_j·dN̂_i) φq_i
    db = causal_product_cuda(v_hat, dN_hat, a, reverse=True, chunk_size=chunk_size)
    # ∂L/∂v_j = Σ_{i≥j} (φk_j·φq_i) dN_i
    dv = causal_product_cuda(b, a, dN, reverse=True, chunk_size=chunk_size)
    return da.reshape(B, H, T, M), db.reshape(B, H, T, M), dv.reshape(B, H, T, Dv)


linear_attention_backward_cuda = linear_attention_cuda_backward  # the uniform name


def linear_attention_cuda(phi_q, phi_k, v, *, eps=DEFAULT_EPS, chunk_size=32):
    """The CUDA backend as a differentiable function (forward and backward kernels)."""
    return apply_kernel(linear_attention_cuda_forward, linear_attention_cuda_backward, (phi_q, phi_k, v), eps=eps,
                        chunk_size=chunk_size)[0]


# --------------------------------------------------------------------------------------------------------------
# the public entry point (re-exported as effedu.kernels.causal_linear_attention)
# --------------------------------------------------------------------------------------------------------------


def check_eps(eps, where):
    """``eps`` as a positive finite float, or a TypeError/ValueError naming it."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{where}: eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not (0.0 < eps < float("inf")):
        raise ValueError(f"{where}: eps must be a positive finite number (it keeps the denominator > 0), got {eps}")
    return eps


def check_features(phi_q, phi_k, v, *, where=WHERE):
    """Validate feature-mapped inputs: shapes ``(B,H,T,M)``, ``(B,H,T,M)``, ``(B,H,T,Dv)``, features ≥ 0.

    Returns ``(B, H, T, M, Dv)``.
    """
    for name, x in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{where}: {name} must have 4 dimensions (B, H, T, {'Dv' if name == 'v' else 'M'}), "
                             f"got shape {tuple(x.shape)}")
    B, H, T, S, M, Dv = check_qkv(phi_q, phi_k, v, where=where)  # dtypes, devices, matching sizes
    if S != T:
        raise ValueError(
            f"{where}: causal linear attention is self-attention: phi_k and v need as many positions as phi_q, "
            f"got T={T} queries and S={S} keys"
        )
    for name, x in (("phi_q", phi_q), ("phi_k", phi_k)):
        lo = float(x.detach().min())
        if not lo >= 0.0:  # also catches NaN
            raise ValueError(
                f"{where}: {name} must hold non-negative features (apply a feature map first, e.g. "
                f"elu(x) + 1 or Performer's positive random features), got a minimum of {lo}"
            )
    return B, H, T, M, Dv


_check_eps = check_eps  # the old private name (attention.kernelized imported it)




def linear_attention_torch_forward(phi_q, phi_k, v, *, eps=DEFAULT_EPS, chunk_size=64):
    """:func:`linear_attention_torch` in the ``(out, aux)`` form of the kernels; autograd differentiates it."""
    return linear_attention_torch(phi_q, phi_k, v, eps=eps, chunk_size=chunk_size), None


# forward and backward of each backend; the functions are looked up at call time (tests swap them)
def _forward(name):
    return {"torch": linear_attention_torch_forward, "numba": linear_attention_numba_forward,
            "cuda": linear_attention_cuda_forward}[name]


def _backward(name):
    return {"torch": None, "numba": linear_attention_numba_backward, "cuda": linear_attention_cuda_backward}[name]


def causal_linear_attention(phi_q, phi_k, v, *, backend="auto", eps=DEFAULT_EPS, chunk_size=None):
    """Causal linear attention ``out_i = φq_iᵀ S_i / (φq_i·z_i + eps)`` with prefix sums, never a T×T matrix.

    ``phi_q``, ``phi_k`` ``(B, H, T, M)``: non-negative features (already mapped); ``v`` ``(B, H, T, Dv)``.
    Returns ``(B, H, T, Dv)`` in the inputs' dtype. ``backend``: ``"torch"`` | ``"numba"`` | ``"cuda"`` | ``"auto"``.
    ``chunk_size``: tokens per chunk (defaults 64 for torch/numba, 32 for cuda). Differentiable with every backend
    (numba and cuda through their own backward kernels, torch through autograd).
    """
    B, H, T, M, Dv = check_features(phi_q, phi_k, v)
    eps = check_eps(eps, WHERE)
    name = resolve_backend(backend, phi_q.device, phi_q.dtype, WHERE)
    chunk = DEFAULT_CHUNK[name] if chunk_size is None else check_positive_int(chunk_size, "chunk_size", WHERE)
    if name == "cuda":
        _check_cuda_dims(M, Dv, T, chunk, phi_q.dtype)
    out, _ = apply_kernel(_forward(name), _backward(name), (phi_q, phi_k, v), eps=eps, chunk_size=chunk)
    return out


__all__ = ["causal_linear_attention", "check_features", "check_eps", "cuda_tile_dims", "CUDA_STATIC_SMEM_BYTES", "prefix_sum_reference", "linear_attention_torch",
           "linear_attention_numba", "linear_attention_cuda", "causal_product_cuda", "numba_workspace_bytes",
           "DEFAULT_EPS"]
