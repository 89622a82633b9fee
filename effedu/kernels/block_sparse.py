"""Block-sparse attention: compute only the blocks a layout keeps (chapter 15; survey §4.1).

Child et al. (2019, *Sparse Transformer*), Zaheer et al. (2020, *BigBird*) and Beltagy et al. (2020,
*Longformer*) let each query see only a few keys. A *mask* that says so does not make attention faster: the
scores are still computed for every (query, key) pair and most are then thrown away (the survey's caveat:
unstructured sparsity "cannot result in memory and/or computational improvements" without a kernel that
exploits it — Hooker's *hardware lottery*). What does make it faster is to cut the T×S score matrix into
``b × b`` blocks and write the pattern as a **block layout**, a boolean grid of ``⌈T/b⌉ × ⌈S/b⌉`` blocks, and a
kernel that never touches a dropped block:

    layout[h, I, J] = True   ⇔   queries of block I may attend to keys of block J (in head h)
    allowed(i, j)   = layout[h, ⌊i/b⌋, ⌊j/b⌋]  (and j ≤ i when causal)
    out_i = Σ_{j allowed} softmax_j(q_i·k_j·scale) v_j          a row with no allowed key → out_i = 0

For one query block, the kept key blocks are visited with the online softmax of tiled attention
(``tiled_attention.py``): a running maximum m, normaliser l and unnormalised output acc per row,

    s_ij = (q_i · k_j)·scale,   m_new = max(m_i, max_j s_ij),   α = exp(m_i − m_new),   p_ij = exp(s_ij − m_new)
    l_i = α l_i + Σ_j p_ij,     acc_i = α acc_i + Σ_j p_ij v_j,     out_i = acc_i / l_i,   lse_i = m_i + log l_i

so time and memory are proportional to the number of kept blocks, not to T·S. Consecutive kept key blocks (the
band of a local window) form one *run* that a single matrix product handles (``RUN_KEYS`` keys at most): fewer,
larger BLAS calls than one per block.

Partial blocks: T and S need not be multiples of ``block_size``. The last query block and the last key block
are simply shorter (``min(q0 + b, T)``) — nothing is padded or copied. ``causal=True`` keeps key j ≤ query i
(top-left aligned, as ``F.scaled_dot_product_attention(is_causal=True)``) on top of the layout; key blocks
wholly in a query block's future are skipped, the diagonal block is masked row by row. A query row that ends up
with no key at all (its blocks all dropped, or all in its future) gets output 0 and lse = −inf, never NaN, and
zero gradients.

The layout is 2-D ``(nT, nS)`` (shared by every head) or 3-D ``(H, nT, nS)`` (one pattern per head, as BlockBERT
and BigBird use), a ``torch.bool`` tensor.

Backward by recomputation, as in tiled attention (Dao et al. 2022; Dao 2023): the forward saves q, k, v, out and
the per-row log-sum-exp (O(T·D)); given dout,

    δ_i = Σ_d dout_id out_id,   p_ij = exp(s_ij − lse_i),   dV_j = Σ_i p_ij dout_i,   dP_ij = dout_i · v_j
    dS_ij = p_ij (dP_ij − δ_i),   dQ_i = scale Σ_j dS_ij k_j,   dK_j = scale Σ_i dS_ij q_i

over the kept blocks only: one sweep over key blocks (the layout read by column: which query blocks see this key
block) accumulates dK, dV privately; one sweep over query blocks accumulates dQ.

Backends (same signature, same numbers up to rounding):
  * ``"torch"`` — the reference: expand the layout to a T×S token mask and compute dense masked softmax
    attention (``masking.masked_softmax``; O(T·S) time and memory, autograd through torch ops). This is the *masked-dense* path
    of the notebook: correct, and no faster than dense attention.
  * ``"numba"`` — ``@njit(parallel=True)``: one job per (batch·head, query block) forward, per key block /
    query block in backward; BLAS for every product of a run, the vectorised exp of ``online_softmax.py``.
  * ``"cuda"`` — ``@cuda.jit``: one thread block per (batch·head, query block), one thread per query row (per
    key row in the dK/dV kernel); kept K/V (Q/dout) tiles staged in shared memory. ``block_size`` must then be
    one of 8, 16, 32, 64, 128 (it is the number of threads per block).
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
from .masking import allowed_mask, masked_softmax
from .online_softmax import online_softmax_tile, recompute_tile

RUN_KEYS = 512  # at most this many consecutive keys (whole blocks) per matrix product in the numba kernels

# --------------------------------------------------------------------------------------------------------------
# layouts: the block grid, checks, expansion to a token mask
# --------------------------------------------------------------------------------------------------------------


def block_grid(T, S, block_size):
    """``(⌈T/b⌉, ⌈S/b⌉)``: the shape of a layout for T queries, S keys and blocks of ``block_size``."""
    return -(-T // block_size), -(-S // block_size)


def check_layout(layout, block_size, T, S, H=None, where="block_sparse_attention"):
    """Validate a block layout and return it as a 3-D ``(1 or H, nT, nS)`` bool tensor (a view, no copy)."""
    check_positive_int(block_size, "block_size", where)
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"{where}: layout must be a torch.Tensor of dtype torch.bool, got {type(layout).__name__}")
    if layout.dtype != torch.bool:
        raise TypeError(f"{where}: layout must have dtype torch.bool (True = block kept), got {layout.dtype}")
    nT, nS = block_grid(T, S, block_size)
    if layout.dim() not in (2, 3):
        raise ValueError(
            f"{where}: layout must be 2-D (nT, nS) or 3-D (H, nT, nS), got shape {tuple(layout.shape)} "
            f"({layout.dim()} dims)"
        )
    if tuple(layout.shape[-2:]) != (nT, nS):
        raise ValueError(
            f"{where}: layout of shape {tuple(layout.shape)} does not match the block grid (⌈T/b⌉, ⌈S/b⌉) = "
            f"({nT}, {nS}) for T={T}, S={S}, block_size={block_size}"
        )
    if layout.dim() == 3 and H is not None and layout.shape[0] not in (1, H):
        raise ValueError(
            f"{where}: a 3-D layout needs one grid per head, shape ({H}, {nT}, {nS}) (or 1 first), got "
            f"{tuple(layout.shape)} for H={H} heads"
        )
    return layout if layout.dim() == 3 else layout.unsqueeze(0)


def layout_to_mask(layout, block_size, T, S=None):
    """Expand a block layout ``(..., nT, nS)`` to the token mask ``(..., T, S)`` it stands for.

    ``mask[..., i, j] = layout[..., ⌊i/b⌋, ⌊j/b⌋]``: every kept block becomes a b×b square of True (the last row
    and column of blocks are cut to T and S).
    """
    S = T if S is None else S
    for name, val in (("T", T), ("S", S)):
        check_positive_int(val, name, "layout_to_mask")
    check_positive_int(block_size, "block_size", "layout_to_mask")
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() < 2:
        raise TypeError(
            f"layout_to_mask: layout must be a bool tensor (..., nT, nS), got "
            f"{type(layout).__name__ if not isinstance(layout, torch.Tensor) else (layout.dtype, tuple(layout.shape))}"
        )
    nT, nS = block_grid(T, S, block_size)
    if tuple(layout.shape[-2:]) != (nT, nS):
        raise ValueError(
            f"layout_to_mask: layout of shape {tuple(layout.shape)} does not match the block grid "
            f"({nT}, {nS}) for T={T}, S={S}, block_size={block_size}"
        )
    # each block index repeated b times along both axes, then cut to (T, S)
    rows = torch.arange(T, device=layout.device) // block_size
    cols = torch.arange(S, device=layout.device) // block_size
    return layout[..., rows, :][..., :, cols]


# --------------------------------------------------------------------------------------------------------------
# torch: the reference, through the dense masked path
# --------------------------------------------------------------------------------------------------------------


def block_sparse_torch(q, k, v, layout, *, block_size, causal=False, scale=1.0, need_lse=True):
    """The layout expanded to a token mask, then dense masked softmax attention; returns ``(out, lse)``.

    ``layout``: checked 3-D ``(1 or H, nT, nS)``. O(T·S) time and memory — the reference, not a speed-up.
    ``need_lse=False`` skips the log-sum-exp (returned as None).
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    # allowed(i, j) = layout[h, ⌊i/b⌋, ⌊j/b⌋]                                            (1, 1 or H, T, S)
    mask = layout_to_mask(layout.to(q.device), block_size, T, S).unsqueeze(0)
    allowed = allowed_mask(mask, causal, T, S, q.device)
    # out = softmax(q kᵀ · scale, masked) v ; a row with nothing allowed gets 0
    out = masked_softmax((q @ k.transpose(-2, -1)) * scale, allowed) @ v
    if not need_lse:
        return out, None
    with torch.no_grad():
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
        # lse_i = log Σ_{j allowed} exp(s_ij); −inf for a row with nothing allowed
        lse = torch.logsumexp(s.masked_fill(~allowed, -math.inf), dim=-1).to(q.dtype)
    return out, lse


# --------------------------------------------------------------------------------------------------------------
# numba on the CPU
# --------------------------------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _bs_forward_kernel(q, k, v, layout, n_heads, out, lse, scale, causal, b, max_run):
    # q (BH, T, D), k (BH, S, D), v (BH, S, Dv), layout (1 or H, nT, nS) uint8, out (BH, T, Dv), lse (BH, T)
    BH, T, D = q.shape
    S = k.shape[1]
    Dv = v.shape[2]
    HL, nT, nS = layout.shape
    for job in prange(BH * nT):  # one job = one (batch·head, query block)
        bh = job // nT
        qb = job % nT
        h = bh % n_heads if HL > 1 else 0
        q0 = qb * b
        q1 = min(q0 + b, T)  # the last block may be partial
        nq = q1 - q0
        qs = q[bh, q0:q1] * scale  # (nq, D): the scale folded into q once
        acc = np.zeros((nq, Dv), dtype=q.dtype)  # Σ_j p_ij v_j (unnormalised)
        m = np.full(nq, -np.inf, dtype=q.dtype)  # running max per row
        l = np.zeros(nq, dtype=q.dtype)  # running normaliser per row
        scratch = np.empty(max_run * b, dtype=q.dtype)  # the exp's rounded exponents (one row of a run)
        # causal block skipping: key blocks that start after the block's last query (q1 − 1) are never needed
        kb_end = min(nS, (q1 - 1) // b + 1) if causal else nS
        kb = 0
        while kb < kb_end:
            if layout[h, qb, kb] == 0:
                kb += 1  # a dropped block: never touched
                continue
            # a run of consecutive kept key blocks [r0, kb): one matrix product for all of them
            r0 = kb
            while kb < kb_end and layout[h, qb, kb] != 0 and kb - r0 < max_run:
                kb += 1
            k0 = r0 * b
            k1 = min(kb * b, S)
            # one online-softmax step over the run (shared with the dense kernel)
            online_softmax_tile(qs, k[bh, k0:k1], v[bh, k0:k1], q0, k0, causal, m, l, acc, scratch)
        for i in range(nq):
            if l[i] > 0:
                # out_i = acc_i / l_i ;  lse_i = m_i + log l_i
                inv = 1.0 / l[i]
                for d in range(Dv):
                    out[bh, q0 + i, d] = acc[i, d] * inv
                lse[bh, q0 + i] = m[i] + math.log(l[i])
            else:
                # no key at all for this row: output 0, lse −inf (never 0/0)
                for d in range(Dv):
                    out[bh, q0 + i, d] = 0.0
                lse[bh, q0 + i] = -np.inf


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _bs_bwd_dkdv_kernel(q, k, v, dout, lse, delta, layout, n_heads, dk, dv, scale, causal, b, max_run):
    # sweep 1: one job per (batch·head, key block); the layout is read by column (which query blocks see it)
    BH, T, D = q.shape
    S = k.shape[1]
    Dv = v.shape[2]
    HL, nT, nS = layout.shape
    cap = max_run * b
    for job in prange(BH * nS):
        bh = job // nS
        kb = job % nS
        h = bh % n_heads if HL > 1 else 0
        k0 = kb * b
        k1 = min(k0 + b, S)
        nk = k1 - k0
        kt = k[bh, k0:k1]
        vt = v[bh, k0:k1]
        dk_acc = np.zeros((nk, D), dtype=q.dtype)
        dv_acc = np.zeros((nk, Dv), dtype=q.dtype)
        scratch = np.empty(b, dtype=q.dtype)
        shift = np.empty(cap, dtype=q.dtype)
        # causal: query block I ends at I·b + b − 1, so it sees key block J only if I ≥ J
        qb = kb if causal else 0
        while qb < nT:
            if layout[h, qb, kb] == 0:
                qb += 1
                continue
            r0 = qb
            while qb < nT and layout[h, qb, kb] != 0 and qb - r0 < max_run:
                qb += 1
            q0 = r0 * b
            q1 = min(qb * b, T)
            nq = q1 - q0
            qt = q[bh, q0:q1] * scale  # (nq, D)
            dot = dout[bh, q0:q1]  # (nq, Dv)
            for i in range(nq):
                shift[i] = lse[bh, q0 + i]
            # p and dS of this (query run, key block), recomputed from the lse (shared with the dense kernel)
            p, ds = recompute_tile(qt, dot, kt, vt, shift, delta[bh], q0, k0, causal, scratch, 0)
            # dV_j += Σ_i p_ij dout_i ;  dK_j += Σ_i dS_ij (scale · q_i)
            dv_acc += np.dot(p.T, dot)
            dk_acc += np.dot(ds.T, qt)
        dk[bh, k0:k1] = dk_acc
        dv[bh, k0:k1] = dv_acc


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _bs_bwd_dq_kernel(q, k, v, dout, lse, delta, layout, n_heads, dq, scale, causal, b, max_run):
    # sweep 2: one job per (batch·head, query block); the layout read by row, as in the forward
    BH, T, D = q.shape
    S = k.shape[1]
    HL, nT, nS = layout.shape
    for job in prange(BH * nT):
        bh = job // nT
        qb = job % nT
        h = bh % n_heads if HL > 1 else 0
        q0 = qb * b
        q1 = min(q0 + b, T)
        nq = q1 - q0
        qt = q[bh, q0:q1] * scale
        dot = dout[bh, q0:q1]
        dq_acc = np.zeros((nq, D), dtype=q.dtype)
        scratch = np.empty(max_run * b, dtype=q.dtype)
        shift = np.empty(nq, dtype=q.dtype)
        for i in range(nq):
            shift[i] = lse[bh, q0 + i]
        kb_end = min(nS, (q1 - 1) // b + 1) if causal else nS
        kb = 0
        while kb < kb_end:
            if layout[h, qb, kb] == 0:
                kb += 1
                continue
            r0 = kb
            while kb < kb_end and layout[h, qb, kb] != 0 and kb - r0 < max_run:
                kb += 1
            k0 = r0 * b
            k1 = min(kb * b, S)
            _, ds = recompute_tile(qt, dot, k[bh, k0:k1], v[bh, k0:k1], shift, delta[bh], q0, k0, causal, scratch, 0)
            # dQ_i += Σ_j dS_ij k_j   (× scale below)
            dq_acc += np.dot(ds, k[bh, k0:k1])
        for i in range(nq):
            for d in range(D):
                dq[bh, q0 + i, d] = dq_acc[i, d] * scale


def _max_run(block_size):
    return max(1, RUN_KEYS // block_size)


def _layout_u8(layout, device="cpu"):
    """The checked (HL, nT, nS) bool layout as a contiguous uint8 tensor (numba and CUDA read bytes)."""
    return layout.to(device=device, dtype=torch.uint8).contiguous()


def block_sparse_numba(q, k, v, layout, *, block_size, causal=False, scale=1.0):
    """numba block-sparse attention on CPU tensors (float32/float64); returns ``(out, lse)`` as torch tensors."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    # zero-copy when the tensor is already contiguous; one copy otherwise
    qn = q.detach().contiguous().reshape(B * H, T, D).numpy()
    kn = k.detach().contiguous().reshape(B * H, S, D).numpy()
    vn = v.detach().contiguous().reshape(B * H, S, Dv).numpy()
    lay = _layout_u8(layout).numpy()
    # outputs allocated by torch (so torch's memory profiler sees them), written by numba through .numpy()
    out = torch.empty((B * H, T, Dv), dtype=q.dtype)
    lse = torch.empty((B * H, T), dtype=q.dtype)
    with single_threaded_blas():
        _bs_forward_kernel(qn, kn, vn, lay, H, out.numpy(), lse.numpy(), qn.dtype.type(scale), bool(causal),
                           block_size, _max_run(block_size))
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)


def _backward_inputs(q, k, v, out, lse, dout):
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    flat = lambda x, n, d: x.detach().contiguous().reshape(B * H, n, d)  # noqa: E731
    do = flat(dout.to(q.dtype), T, Dv)
    # δ_i = Σ_d dout_id · out_id  (O(T·D), done in torch)
    delta = (do * flat(out, T, Dv)).sum(dim=-1).contiguous()
    # rows with no key have lse = −inf and zero gradients; 0 keeps the arithmetic finite
    lse_ = lse.detach().to(q.dtype).reshape(B * H, T)
    lse_ = torch.where(torch.isfinite(lse_), lse_, torch.zeros_like(lse_)).contiguous()
    return flat(q, T, D), flat(k, S, D), flat(v, S, Dv), do, lse_, delta


def block_sparse_backward_numba(q, k, v, out, lse, dout, layout, *, block_size, causal=False, scale=1.0):
    """numba backward (two sweeps over the kept blocks); returns ``(dq, dk, dv)`` as torch tensors."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    qf, kf, vf, do, lse_, delta = _backward_inputs(q, k, v, out, lse, dout)
    qn, kn, vn, don, lsen, dn = (x.numpy() for x in (qf, kf, vf, do, lse_, delta))
    lay = _layout_u8(layout).numpy()
    dq = torch.empty((B * H, T, D), dtype=q.dtype)
    dk = torch.empty((B * H, S, D), dtype=q.dtype)
    dv = torch.empty((B * H, S, Dv), dtype=q.dtype)
    sc = qn.dtype.type(scale)
    mr = _max_run(block_size)
    with single_threaded_blas():
        _bs_bwd_dkdv_kernel(qn, kn, vn, don, lsen, dn, lay, H, dk.numpy(), dv.numpy(), sc, bool(causal), block_size, mr)
        _bs_bwd_dq_kernel(qn, kn, vn, don, lsen, dn, lay, H, dq.numpy(), sc, bool(causal), block_size, mr)
    return dq.reshape(B, H, T, D), dk.reshape(B, H, S, D), dv.reshape(B, H, S, Dv)


def numba_workspace_bytes(T, S, D, Dv, *, block_size, itemsize=4, n_threads=None):
    """Bytes the numba forward allocates internally at most (numba's allocator: no torch profiler sees them).

    Per worker thread, one job at a time: the scaled query block (b·D), the accumulator (b·Dv), the score run
    that np.dot returns (b·RUN_KEYS at most, two alive while the next is made), the product P·V (b·Dv), three
    row vectors and the exp's scratch row. Independent of T and S: the point of working block by block.
    """
    from numba import get_num_threads

    n_threads = get_num_threads() if n_threads is None else n_threads
    b = min(block_size, T)
    run = min(_max_run(block_size) * block_size, -(-S // block_size) * block_size)
    per_job = (b * D + 2 * b * Dv + 2 * b * run + 3 * b + run) * itemsize
    return n_threads * per_job


# --------------------------------------------------------------------------------------------------------------
# numba.cuda on a GPU (and in the CUDA simulator for tests)
# --------------------------------------------------------------------------------------------------------------

def cuda_tile_dims(np_dtype, block, D, Dv):
    """Compile-time sizes ``(BT, DMAX)``: rows per shared-memory tile and the head-dim capacity.

    ``DMAX`` is the smallest power of two ≥ max(D, Dv) (16 … ``CUDA_MAX_HEAD_DIM``). Each kernel stages two
    ``BT × DMAX`` tiles (K and V, or Q and dout) plus two ``BT`` vectors (lse, δ) in static shared memory, which
    must stay within 48 KiB: ``BT`` is ``block`` halved until it fits (a layout block is then loaded in 2–4
    sub-tiles).
    """
    return shared_tile_dims(np_dtype, block, max(D, Dv), lambda bt, dmax: 2 * bt * dmax + 2 * bt)


@cached_kernels
def _make_cuda_kernels(np_dtype, BLOCK, BT, DMAX):
    """Compile the forward, dQ and dK/dV kernels for one dtype and block size.

    ``BLOCK`` = layout block = threads per block (thread t owns query row q0 + t, or key row k0 + t in the dK/dV
    kernel); ``BT`` ≤ BLOCK rows per shared-memory tile; head dims up to ``DMAX``. Arithmetic in the input dtype
    (float32 math for float32). No builtin ``min``/``max``: numba ≥ 0.66 cannot compile their two-argument form
    for CUDA, so the comparisons are written out. ``layout[h, I, J]`` is the same for every thread of a block, so
    the ``syncthreads`` inside ``if layout…`` are reached by all threads or none.
    """
    from numba import float32, float64

    nb_dtype = float32 if np_dtype == np.float32 else float64
    ZERO = np_dtype(0.0)
    NEG_INF = np_dtype(-math.inf)

    @cuda.jit
    def forward(q, k, v, layout, out, lse, scale, causal, n_heads):
        # grid: (B·H, nT query blocks); block: BLOCK threads, thread t owns query row q0 + t
        bh = cuda.blockIdx.x
        qb = cuda.blockIdx.y
        t = cuda.threadIdx.x
        T = q.shape[1]
        S = k.shape[1]
        D = q.shape[2]
        Dv = v.shape[2]
        nS = layout.shape[2]
        h = 0
        if layout.shape[0] > 1:
            h = bh % n_heads
        k_sh = cuda.shared.array((BT, DMAX), dtype=nb_dtype)
        v_sh = cuda.shared.array((BT, DMAX), dtype=nb_dtype)
        q_row = cuda.local.array(DMAX, dtype=nb_dtype)
        acc = cuda.local.array(DMAX, dtype=nb_dtype)
        q0 = qb * BLOCK
        i = q0 + t
        active = i < T
        for d in range(D):
            q_row[d] = q[bh, i, d] * scale if active else ZERO
        for d in range(Dv):
            acc[d] = ZERO
        m = NEG_INF
        l = ZERO
        kb_end = nS
        if causal:
            # causal block skipping: key blocks after the block's last query are never needed
            q_last = q0 + BLOCK - 1
            if q_last > T - 1:
                q_last = T - 1
            if q_last // BLOCK + 1 < kb_end:
                kb_end = q_last // BLOCK + 1
        for kb in range(kb_end):
            if layout[h, qb, kb] != 0:
                for k0 in range(kb * BLOCK, kb * BLOCK + BLOCK, BT):
                    if k0 < S:
                        # stage the K and V tile: thread t < BT loads key row k0 + t
                        if t < BT:
                            j_load = k0 + t
                            for d in range(D):
                                k_sh[t, d] = k[bh, j_load, d] if j_load < S else ZERO
                            for d in range(Dv):
                                v_sh[t, d] = v[bh, j_load, d] if j_load < S else ZERO
                        cuda.syncthreads()
                        if active:
                            n_keys = S - k0
                            if n_keys > BT:
                                n_keys = BT
                            if causal and i - k0 + 1 < n_keys:
                                n_keys = i - k0 + 1  # keys j ≤ i only (≤ 0: none)
                            for jj in range(n_keys):
                                # s = q_i · k_j · scale
                                s = ZERO
                                for d in range(D):
                                    s += q_row[d] * k_sh[jj, d]
                                # online softmax: m_new, α = exp(m − m_new), p = exp(s − m_new)
                                m_new = s if s > m else m
                                alpha = math.exp(m - m_new) if m > NEG_INF else ZERO
                                p = math.exp(s - m_new)
                                l = alpha * l + p
                                for d in range(Dv):
                                    acc[d] = alpha * acc[d] + p * v_sh[jj, d]
                                m = m_new
                        cuda.syncthreads()
        if active:
            if l > ZERO:
                for d in range(Dv):
                    out[bh, i, d] = acc[d] / l
                lse[bh, i] = m + math.log(l)
            else:
                # no key for this row: 0, not 0/0
                for d in range(Dv):
                    out[bh, i, d] = ZERO
                lse[bh, i] = NEG_INF

    @cuda.jit
    def backward_dq(q, k, v, dout, lse, delta, layout, dq, scale, causal, n_heads):
        # grid: (B·H, nT); thread t owns query row q0 + t and accumulates its dQ over the kept key blocks
        bh = cuda.blockIdx.x
        qb = cuda.blockIdx.y
        t = cuda.threadIdx.x
        T = q.shape[1]
        S = k.shape[1]
        D = q.shape[2]
        Dv = v.shape[2]
        nS = layout.shape[2]
        h = 0
        if layout.shape[0] > 1:
            h = bh % n_heads
        k_sh = cuda.shared.array((BT, DMAX), dtype=nb_dtype)
        v_sh = cuda.shared.array((BT, DMAX), dtype=nb_dtype)
        q_row = cuda.local.array(DMAX, dtype=nb_dtype)
        do_row = cuda.local.array(DMAX, dtype=nb_dtype)
        dq_acc = cuda.local.array(DMAX, dtype=nb_dtype)
        q0 = qb * BLOCK
        i = q0 + t
        active = i < T
        for d in range(D):
            q_row[d] = q[bh, i, d] * scale if active else ZERO
            dq_acc[d] = ZERO
        for d in range(Dv):
            do_row[d] = dout[bh, i, d] if active else ZERO
        lse_i = lse[bh, i] if active else ZERO
        delta_i = delta[bh, i] if active else ZERO
        kb_end = nS
        if causal:
            q_last = q0 + BLOCK - 1
            if q_last > T - 1:
                q_last = T - 1
            if q_last // BLOCK + 1 < kb_end:
                kb_end = q_last // BLOCK + 1
        for kb in range(kb_end):
            if layout[h, qb, kb] != 0:
                for k0 in range(kb * BLOCK, kb * BLOCK + BLOCK, BT):
                    if k0 < S:
                        if t < BT:
                            j_load = k0 + t
                            for d in range(D):
                                k_sh[t, d] = k[bh, j_load, d] if j_load < S else ZERO
                            for d in range(Dv):
                                v_sh[t, d] = v[bh, j_load, d] if j_load < S else ZERO
                        cuda.syncthreads()
                        if active:
                            n_keys = S - k0
                            if n_keys > BT:
                                n_keys = BT
                            if causal and i - k0 + 1 < n_keys:
                                n_keys = i - k0 + 1
                            for jj in range(n_keys):
                                # p = exp(s − lse_i) ;  dP = dout_i · v_j ;  dS = p (dP − δ_i)
                                s = ZERO
                                dp = ZERO
                                for d in range(D):
                                    s += q_row[d] * k_sh[jj, d]
                                for d in range(Dv):
                                    dp += do_row[d] * v_sh[jj, d]
                                ds = math.exp(s - lse_i) * (dp - delta_i)
                                # dQ_i += dS_ij k_j   (× scale at the end)
                                for d in range(D):
                                    dq_acc[d] += ds * k_sh[jj, d]
                        cuda.syncthreads()
        if active:
            for d in range(D):
                dq[bh, i, d] = dq_acc[d] * scale

    @cuda.jit
    def backward_dkdv(q, k, v, dout, lse, delta, layout, dk, dv, scale, causal, n_heads):
        # grid: (B·H, nS key blocks); thread t owns key row k0 + t; the layout is read by column
        bh = cuda.blockIdx.x
        kb = cuda.blockIdx.y
        t = cuda.threadIdx.x
        T = q.shape[1]
        S = k.shape[1]
        D = q.shape[2]
        Dv = v.shape[2]
        nT = layout.shape[1]
        h = 0
        if layout.shape[0] > 1:
            h = bh % n_heads
        q_sh = cuda.shared.array((BT, DMAX), dtype=nb_dtype)
        do_sh = cuda.shared.array((BT, DMAX), dtype=nb_dtype)
        lse_sh = cuda.shared.array(BT, dtype=nb_dtype)
        dl_sh = cuda.shared.array(BT, dtype=nb_dtype)
        k_row = cuda.local.array(DMAX, dtype=nb_dtype)
        v_row = cuda.local.array(DMAX, dtype=nb_dtype)
        dk_acc = cuda.local.array(DMAX, dtype=nb_dtype)
        dv_acc = cuda.local.array(DMAX, dtype=nb_dtype)
        j = kb * BLOCK + t
        active = j < S
        for d in range(D):
            k_row[d] = k[bh, j, d] if active else ZERO
            dk_acc[d] = ZERO
        for d in range(Dv):
            v_row[d] = v[bh, j, d] if active else ZERO
            dv_acc[d] = ZERO
        # causal: query block I (last row I·b + b − 1) sees key block J only if I ≥ J
        qb_start = kb if causal else 0
        for qb in range(qb_start, nT):
            if layout[h, qb, kb] != 0:
                for r0 in range(qb * BLOCK, qb * BLOCK + BLOCK, BT):
                    if r0 < T:
                        # stage q (scaled), dout, lse and δ of query rows r0 … r0 + BT − 1
                        if t < BT:
                            r_load = r0 + t
                            for d in range(D):
                                q_sh[t, d] = q[bh, r_load, d] * scale if r_load < T else ZERO
                            for d in range(Dv):
                                do_sh[t, d] = dout[bh, r_load, d] if r_load < T else ZERO
                            lse_sh[t] = lse[bh, r_load] if r_load < T else ZERO
                            dl_sh[t] = delta[bh, r_load] if r_load < T else ZERO
                        cuda.syncthreads()
                        if active:
                            n_rows = T - r0
                            if n_rows > BT:
                                n_rows = BT
                            for rr in range(n_rows):
                                if (not causal) or j <= r0 + rr:
                                    # p = exp(s − lse_i);  dP = dout_i · v_j;  dS = p (dP − δ_i)
                                    s = ZERO
                                    for d in range(D):
                                        s += q_sh[rr, d] * k_row[d]
                                    dp = ZERO
                                    for d in range(Dv):
                                        dp += do_sh[rr, d] * v_row[d]
                                    p = math.exp(s - lse_sh[rr])
                                    ds = p * (dp - dl_sh[rr])
                                    # dV_j += p dout_i ;  dK_j += dS (scale · q_i)
                                    for d in range(Dv):
                                        dv_acc[d] += p * do_sh[rr, d]
                                    for d in range(D):
                                        dk_acc[d] += ds * q_sh[rr, d]
                        cuda.syncthreads()
        if active:
            for d in range(D):
                dk[bh, j, d] = dk_acc[d]
            for d in range(Dv):
                dv[bh, j, d] = dv_acc[d]

    return forward, backward_dq, backward_dkdv


def _cuda_kernels(q, block_size, D, Dv):
    np_dtype = np_dtype_of(q.dtype)
    bt, dmax = cuda_tile_dims(np_dtype, block_size, D, Dv)
    return np_dtype, _make_cuda_kernels(np_dtype, block_size, bt, dmax)


def _check_cuda_shapes(B, H, T, S, D, Dv, block_size):
    where = "block_sparse_attention(backend='cuda')"
    if D > CUDA_MAX_HEAD_DIM or Dv > CUDA_MAX_HEAD_DIM:
        raise ValueError(
            f"{where}: head dim must be ≤ {CUDA_MAX_HEAD_DIM} (shared-memory tile "
            f"size), got D={D}, Dv={Dv}; use backend='numba' or 'torch'"
        )
    nT, nS = block_grid(T, S, block_size)
    check_cuda_grid(max(nT, nS), f"the block grid ({nT}, {nS})", where)


def block_sparse_cuda(q, k, v, layout, *, block_size, causal=False, scale=1.0):
    """numba.cuda block-sparse attention; CUDA tensors in and out (CPU tensors only under the simulator)."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    _check_cuda_shapes(B, H, T, S, D, Dv, block_size)
    np_dtype, (fwd, _, _) = _cuda_kernels(q, block_size, D, Dv)
    qc = q.detach().contiguous().reshape(B * H, T, D)
    kc = k.detach().contiguous().reshape(B * H, S, D)
    vc = v.detach().contiguous().reshape(B * H, S, Dv)
    lay = _layout_u8(layout, q.device)
    out = torch.empty((B * H, T, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, T), dtype=q.dtype, device=q.device)
    grid = (B * H, lay.shape[1])  # B·H on x (limit 2³¹ − 1), query blocks on y (limit 65535)
    cuda_launch(fwd, grid, block_size, (qc, kc, vc, lay, out, lse), (np_dtype(scale), bool(causal), H))
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)


def block_sparse_backward_cuda(q, k, v, out, lse, dout, layout, *, block_size, causal=False, scale=1.0):
    """numba.cuda backward: the dK/dV kernel (per key block) and the dQ kernel (per query block)."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    _check_cuda_shapes(B, H, T, S, D, Dv, block_size)
    np_dtype, (_, bwd_dq, bwd_dkdv) = _cuda_kernels(q, block_size, D, Dv)
    qf, kf, vf, do, lse_, delta = _backward_inputs(q, k, v, out, lse, dout)
    lay = _layout_u8(layout, q.device)
    dq = torch.empty((B * H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B * H, S, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B * H, S, Dv), dtype=q.dtype, device=q.device)
    scalars = (np_dtype(scale), bool(causal), H)
    cuda_launch(bwd_dkdv, (B * H, lay.shape[2]), block_size, (qf, kf, vf, do, lse_, delta, lay, dk, dv), scalars)
    cuda_launch(bwd_dq, (B * H, lay.shape[1]), block_size, (qf, kf, vf, do, lse_, delta, lay, dq), scalars)
    return dq.reshape(B, H, T, D), dk.reshape(B, H, S, D), dv.reshape(B, H, S, Dv)


# --------------------------------------------------------------------------------------------------------------
# forward and backward of each backend (the torch reference is differentiated by autograd: no backward)
# --------------------------------------------------------------------------------------------------------------

BLOCK_SPARSE_FORWARD = {"torch": block_sparse_torch, "numba": block_sparse_numba, "cuda": block_sparse_cuda}
BLOCK_SPARSE_BACKWARD = {"torch": None, "numba": block_sparse_backward_numba, "cuda": block_sparse_backward_cuda}
_FORWARD, _BACKWARD = BLOCK_SPARSE_FORWARD, BLOCK_SPARSE_BACKWARD  # the old private names


# --------------------------------------------------------------------------------------------------------------
# the public entry point (re-exported as effedu.kernels.block_sparse_attention)
# --------------------------------------------------------------------------------------------------------------


def block_sparse_attention(q, k, v, layout, *, block_size, causal=False, scale=None, backend="auto",
                           return_lse=False):
    """Softmax attention over the blocks a layout keeps, and only those.

    q ``(B, H, T, D)``, k ``(B, H, S, D)``, v ``(B, H, S, Dv)`` → ``(B, H, T, Dv)`` in q's dtype.
    ``layout``: ``torch.bool``, ``(⌈T/b⌉, ⌈S/b⌉)`` for every head or ``(H, ⌈T/b⌉, ⌈S/b⌉)`` per head (see
    ``effedu.attention.sparse`` for the patterns). ``block_size`` b ≥ 1; T and S need not be multiples of it
    (the last blocks are partial). ``causal``: key j ≤ query i on top of the layout. ``scale`` defaults to 1/√D.
    ``backend``: ``"auto"`` (cuda on a real GPU, numba on the CPU for float32/float64, else torch), ``"numba"``,
    ``"cuda"``, or ``"torch"`` (the dense masked reference). Differentiable on every backend (numba and cuda
    through their backward kernels). Rows with no allowed key give 0 (and lse −inf).
    ``return_lse=True`` also returns the per-row log-sum-exp ``(B, H, T)`` (not differentiable).
    """
    where = "block_sparse_attention"
    B, H, T, S, D, Dv = check_qkv(q, k, v, where=where)
    scale = check_scale(scale, D, where)
    if not isinstance(causal, bool):
        raise TypeError(f"{where}: causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"{where}: return_lse must be a bool, got {type(return_lse).__name__}")
    lay = check_layout(layout, block_size, T, S, H, where)
    name = resolve_backend(backend, q.device, q.dtype, where)
    if name == "cuda" and block_size not in CUDA_BLOCK_SIZES:
        raise ValueError(
            f"{where}: block_size for backend 'cuda' must be one of {', '.join(map(str, CUDA_BLOCK_SIZES))} "
            f"(threads per block), got {block_size}"
        )
    options = {"need_lse": return_lse} if name == "torch" else {}  # the reference skips its lse unless asked
    out, lse = apply_kernel(BLOCK_SPARSE_FORWARD[name], BLOCK_SPARSE_BACKWARD[name], (q, k, v), (lay,),
                            block_size=block_size, causal=causal, scale=scale, **options)
    return (out, lse) if return_lse else out


__all__ = ["block_sparse_attention", "block_grid", "check_layout", "layout_to_mask", "block_sparse_torch",
           "block_sparse_numba", "block_sparse_backward_numba", "block_sparse_cuda", "block_sparse_backward_cuda",
           "BLOCK_SPARSE_FORWARD", "BLOCK_SPARSE_BACKWARD", "CUDA_MAX_GRID_Y", "CUDA_STATIC_SMEM_BYTES", "numba_workspace_bytes", "cuda_tile_dims", "RUN_KEYS",
           "CUDA_BLOCK_SIZES"]
