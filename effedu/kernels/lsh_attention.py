"""Bucketed chunked attention: the inner loop of Reformer's LSH attention (chapter 16; survey §4.1 b).

Kitaev et al. (2020, *Reformer*, §2) hash every token into a bucket, **sort** the sequence by (bucket, position),
cut the sorted sequence into chunks of ``c`` tokens, and let each chunk attend to itself and to the chunk before
it — only to keys of its own bucket. This module is that step, on inputs that are *already sorted* (one row of
the batch per (batch, head, hash round)); hashing, sorting, un-sorting and combining the rounds live in
:mod:`effedu.attention.lsh`. For sorted row ``i`` in chunk ``m = ⌊i/c⌋`` the candidate keys are the window

    j ∈ [(m − 1)·c, (m + 1)·c)        (chunk 0 has no previous chunk: the window does **not** wrap around)

and key j is allowed iff

    bucket_j = bucket_i   ∧   (pos_j ≤ pos_i if causal)   ∧   (pos_j ≠ pos_i if exclude_self)   ∧   bias_ij > −∞

where ``pos`` are the tokens' original positions. The scores are ``s_ij = q_i·k_j·scale + bias_ij``; ``bias``
``(N, T, 2c)`` is an optional additive term indexed by the window column ``w = j − (m − 1)·c`` (the LSH layer
puts the padding mask, −∞, and the duplicate correction −log(rounds in which the pair meets) there). Then

    lse_i = log Σ_{j allowed} exp(s_ij),    out_i = Σ_{j allowed} exp(s_ij − lse_i) v_j

a row with no allowed key gets out 0 and lse −inf. Time O(T·c·D), memory O(T·c) beyond the inputs (the bias).

Backward by recomputation (as ``tiled_attention.py``): with δ_i = dout_i·out_i, p_ij = exp(s_ij − lse_i),
dS_ij = p_ij (dout_i·v_j − δ_i):  dQ_i = scale Σ_j dS_ij k_j,  dK_j = scale Σ_i dS_ij q_i,  dV_j = Σ_i p_ij dout_i.
Key chunk m is seen by query chunks m and m + 1 only, so one job per chunk owns dQ of its rows and dK, dV of its
keys: no two jobs write the same row.

Backends: ``"torch"`` (reference: the windows gathered as (N, T/c, c, 2c) score blocks, autograd through torch
ops), ``"numba"`` (``prange`` over (row, chunk) jobs, BLAS per chunk), ``"cuda"`` (one thread per sorted row, one
thread block per chunk, key tiles staged in shared memory; ``chunk_size`` ∈ {8, 16, 32, 64, 128}).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import cuda, njit, prange

from .._checks import check_bool, check_positive_int, check_scale
from ._base import (CUDA_BLOCK_SIZES, CUDA_MAX_HEAD_DIM, apply_kernel, cached_kernels, check_cuda_grid, cuda_launch,
                    np_dtype_of, resolve_backend, shared_tile_dims, single_threaded_blas)

# --------------------------------------------------------------------------------------------------------------
# torch: the reference
# --------------------------------------------------------------------------------------------------------------


def _windows(x, c):
    """``(N, T, ...)`` → ``(N, T/c, 2c, ...)``: each chunk preceded by the previous one (zeros before chunk 0)."""
    N, T = x.shape[:2]
    xc = x.reshape(N, T // c, c, *x.shape[2:])
    prev = torch.cat([torch.zeros_like(xc[:, :1]), xc[:, :-1]], dim=1)
    return torch.cat([prev, xc], dim=2)


def window_allowed(pos, bucket, *, chunk_size, causal=False, exclude_self=True, bias=None):
    """Boolean ``(N, T/c, c, 2c)``: may sorted row i (chunk m, row r) attend to window column w (the rule above)."""
    N, T = pos.shape
    c = chunk_size
    nc = T // c
    pw, bw = _windows(pos, c), _windows(bucket, c)
    pi = pos.reshape(N, nc, c, 1)
    bi = bucket.reshape(N, nc, c, 1)
    # same bucket (Reformer's rule)                                                          (N, nc, c, 2c)
    allowed = bw.unsqueeze(2) == bi
    # chunk 0 has no previous chunk: its first c window columns are padding
    first = torch.zeros(nc, 1, 2 * c, dtype=torch.bool, device=pos.device)
    first[0, 0, :c] = True
    allowed = allowed & ~first
    if causal:
        allowed = allowed & (pw.unsqueeze(2) <= pi)
    if exclude_self:
        allowed = allowed & (pw.unsqueeze(2) != pi)
    if bias is not None:
        allowed = allowed & torch.isfinite(bias.reshape(N, nc, c, 2 * c))
    return allowed


def lsh_chunked_torch(q, k, v, pos, bucket, bias=None, *, chunk_size, causal=False, scale=1.0, exclude_self=True):
    """Reference: every chunk's (c × 2c) score block, masked; autograd differentiates it. Returns ``(out, lse)``."""
    N, T, D = q.shape
    Dv = v.shape[2]
    c = chunk_size
    nc = T // c
    allowed = window_allowed(pos, bucket, chunk_size=c, causal=causal, exclude_self=exclude_self, bias=bias)
    qc = q.reshape(N, nc, c, D)
    kw, vw = _windows(k, c), _windows(v, c)  # (N, nc, 2c, D), (N, nc, 2c, Dv)
    # s_ij = q_i · k_j · scale (+ bias_ij)                                                     (N, nc, c, 2c)
    s = (qc @ kw.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + torch.where(allowed, bias.reshape(N, nc, c, 2 * c).to(s.dtype), s.new_zeros(()))
    s = s.masked_fill(~allowed, -math.inf)
    # lse_i = log Σ_j exp(s_ij) (−inf for an empty row, with zero gradients); p_ij = exp(s_ij − lse_i)
    with torch.no_grad():
        mx = s.amax(dim=-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(s - mx)
    tot = e.sum(dim=-1, keepdim=True)
    nonempty = tot > 0
    tot = torch.where(nonempty, tot, torch.ones_like(tot))
    out = ((e / tot) @ vw).reshape(N, T, Dv)
    lse = torch.where(nonempty, mx + torch.log(tot), torch.full_like(tot, -math.inf))
    return out, lse.reshape(N, T)


# --------------------------------------------------------------------------------------------------------------
# numba on the CPU
# --------------------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _scores(q, k, pos, bucket, bias, has_bias, n, m, c, scale, causal, exclude_self):
    """Masked scores (c × W) of query chunk m against its window, −inf where not allowed; and the window start."""
    i0 = m * c
    j0 = i0 - c if m > 0 else 0
    j1 = i0 + c
    w0 = j0 - (i0 - c)  # window column of key j0 (c for chunk 0: its first c columns do not exist)
    s = np.dot(q[n, i0:i0 + c] * scale, k[n, j0:j1].T)
    for r in range(c):
        i = i0 + r
        for jj in range(j1 - j0):
            j = j0 + jj
            ok = bucket[n, j] == bucket[n, i]
            if causal and pos[n, j] > pos[n, i]:
                ok = False
            if exclude_self and pos[n, j] == pos[n, i]:
                ok = False
            if ok and has_bias:
                b = bias[n, i, w0 + jj]
                if b == -np.inf:
                    ok = False
                else:
                    s[r, jj] += b
            if not ok:
                s[r, jj] = -np.inf
    return s, j0


@njit(parallel=True, cache=True, nogil=True)
def _lsh_forward_kernel(q, k, v, pos, bucket, bias, has_bias, out, lse, c, scale, causal, exclude_self):
    N, T, D = q.shape
    nc = T // c
    for job in prange(N * nc):
        n = job // nc
        m = job % nc
        s, j0 = _scores(q, k, pos, bucket, bias, has_bias, n, m, c, scale, causal, exclude_self)
        W = s.shape[1]
        p = np.zeros_like(s)
        for r in range(c):
            mx = -np.inf
            for jj in range(W):
                if s[r, jj] > mx:
                    mx = s[r, jj]
            i = m * c + r
            if mx == -np.inf:
                lse[n, i] = -np.inf  # no key: out 0, lse −inf
                continue
            tot = 0.0
            for jj in range(W):
                e = math.exp(s[r, jj] - mx) if s[r, jj] > -np.inf else 0.0
                p[r, jj] = e
                tot += e
            for jj in range(W):
                p[r, jj] /= tot
            lse[n, i] = mx + math.log(tot)
        out[n, m * c:(m + 1) * c] = np.dot(p, v[n, j0:j0 + W])


@njit(cache=True, nogil=True)
def _probs_ds(q, k, v, dout, lse, delta, pos, bucket, bias, has_bias, n, m, c, scale, causal, exclude_self):
    """Recompute p and dS (c × W) of query chunk m."""
    s, j0 = _scores(q, k, pos, bucket, bias, has_bias, n, m, c, scale, causal, exclude_self)
    W = s.shape[1]
    i0 = m * c
    dp = np.dot(dout[n, i0:i0 + c], v[n, j0:j0 + W].T)
    p = np.zeros_like(s)
    ds = np.zeros_like(s)
    for r in range(c):
        for jj in range(W):
            if s[r, jj] > -np.inf:
                p[r, jj] = math.exp(s[r, jj] - lse[n, i0 + r])
                ds[r, jj] = p[r, jj] * (dp[r, jj] - delta[n, i0 + r])
    return p, ds, j0


@njit(parallel=True, cache=True, nogil=True)
def _lsh_backward_kernel(q, k, v, dout, lse, delta, pos, bucket, bias, has_bias, dq, dk, dv, c, scale, causal,
                         exclude_self):
    N, T, D = q.shape
    nc = T // c
    for job in prange(N * nc):
        n = job // nc
        m = job % nc
        i0 = m * c
        # query chunk m: dQ of its rows, and its part of dK, dV of key chunk m (the last c window columns)
        p, ds, j0 = _probs_ds(q, k, v, dout, lse, delta, pos, bucket, bias, has_bias, n, m, c, scale, causal,
                              exclude_self)
        W = p.shape[1]
        dq[n, i0:i0 + c] = np.dot(ds, k[n, j0:j0 + W]) * scale
        own = W - c
        dvm = np.dot(np.ascontiguousarray(p[:, own:].T), dout[n, i0:i0 + c])
        dkm = np.dot(np.ascontiguousarray(ds[:, own:].T), q[n, i0:i0 + c])
        # query chunk m + 1 looks back at key chunk m (its first c window columns)
        if m + 1 < nc:
            p1, ds1, _ = _probs_ds(q, k, v, dout, lse, delta, pos, bucket, bias, has_bias, n, m + 1, c, scale,
                                   causal, exclude_self)
            dvm += np.dot(np.ascontiguousarray(p1[:, :c].T), dout[n, i0 + c:i0 + 2 * c])
            dkm += np.dot(np.ascontiguousarray(ds1[:, :c].T), q[n, i0 + c:i0 + 2 * c])
        dv[n, i0:i0 + c] = dvm
        dk[n, i0:i0 + c] = dkm * scale


def _bias_np(bias, q):
    if bias is None:
        return np.zeros((1, 1, 1), dtype=q.detach().numpy().dtype), False
    return bias.detach().to(q.dtype).contiguous().numpy(), True


def lsh_chunked_numba(q, k, v, pos, bucket, bias=None, *, chunk_size, causal=False, scale=1.0, exclude_self=True):
    """numba forward on CPU tensors; returns ``(out, lse)``."""
    N, T, D = q.shape
    qn, kn, vn = (x.detach().contiguous().numpy() for x in (q, k, v))
    bn, has_bias = _bias_np(bias, q)
    out = torch.zeros((N, T, v.shape[2]), dtype=q.dtype)
    lse = torch.empty((N, T), dtype=q.dtype)
    with single_threaded_blas():
        _lsh_forward_kernel(qn, kn, vn, pos.contiguous().numpy(), bucket.contiguous().numpy(), bn, has_bias,
                            out.numpy(), lse.numpy(), chunk_size, qn.dtype.type(scale), bool(causal),
                            bool(exclude_self))
    return out, lse


def _backward_inputs(q, k, v, out, lse, dout, dlse):
    do = dout.to(q.dtype).contiguous()
    # δ_i = Σ_d dout_id · out_id − dlse_i  (∂lse_i/∂s_ij = p_ij, so the lse's gradient enters as −δ's shift)
    delta = (do * out).sum(dim=-1)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.to(q.dtype), torch.zeros_like(delta))
    delta = delta.contiguous()
    # rows with no key have lse = −inf and zero gradients; 0 keeps the arithmetic finite
    lse_ = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(q.dtype).contiguous()
    return q.detach().contiguous(), k.detach().contiguous(), v.detach().contiguous(), do, lse_, delta


def lsh_chunked_backward_numba(q, k, v, out, lse, dout, dlse, pos, bucket, bias=None, *, chunk_size, causal=False,
                               scale=1.0, exclude_self=True):
    """numba backward by recomputation (``dlse``: the lse's gradient or None); returns ``(dq, dk, dv)``."""
    qf, kf, vf, do, lse_, delta = _backward_inputs(q, k, v, out, lse, dout, dlse)
    bn, has_bias = _bias_np(bias, q)
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
    with single_threaded_blas():
        _lsh_backward_kernel(qf.numpy(), kf.numpy(), vf.numpy(), do.numpy(), lse_.numpy(), delta.numpy(),
                             pos.contiguous().numpy(), bucket.contiguous().numpy(), bn, has_bias, dq.numpy(),
                             dk.numpy(), dv.numpy(), chunk_size, qf.numpy().dtype.type(scale), bool(causal),
                             bool(exclude_self))
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------------------
# numba.cuda: one thread per sorted row, one thread block per chunk
# --------------------------------------------------------------------------------------------------------------


def cuda_tile_dims(np_dtype, chunk_size, D, Dv):
    """``(BT, DMAX)``: rows per staged tile and the column capacity (k/q and v/dout tiles, plus 4 scalars)."""
    return shared_tile_dims(np_dtype, chunk_size, max(D, Dv), lambda r, dm: 2 * r * dm + 4 * r)


@cached_kernels
def _make_cuda_kernels(np_dtype, C, BT, DMAX):
    from numba import float32, float64

    nb_dtype = float32 if np_dtype == np.float32 else float64
    NEG_INF = -np.inf
    ZERO = np_dtype(0.0)

    @cuda.jit(device=True)
    def allowed_bias(pos, bucket, bias, has_bias, n, i, j, w, causal, exclude_self):
        # returns (allowed, bias) of the pair (i, j) of row n, window column w
        if bucket[n, j] != bucket[n, i]:
            return False, ZERO
        if causal and pos[n, j] > pos[n, i]:
            return False, ZERO
        if exclude_self and pos[n, j] == pos[n, i]:
            return False, ZERO
        b = ZERO
        if has_bias:
            b = bias[n, i, w]
            if b == NEG_INF:
                return False, ZERO
        return True, b

    @cuda.jit
    def forward(q, k, v, pos, bucket, bias, out, lse, dout, lse_in, delta, dq, scale, causal, exclude_self,
                has_bias, want_dq):
        # grid (N, T/C), C threads; thread t owns sorted row i = m·C + t. want_dq: the dQ pass of the backward
        n = cuda.blockIdx.x
        m = cuda.blockIdx.y
        t = cuda.threadIdx.x
        D = q.shape[2]
        Dv = v.shape[2]
        k_sh = cuda.shared.array((BT, DMAX), dtype=nb_dtype)
        v_sh = cuda.shared.array((BT, DMAX), dtype=nb_dtype)
        q_row = cuda.local.array(DMAX, dtype=nb_dtype)
        acc = cuda.local.array(DMAX, dtype=nb_dtype)
        do_row = cuda.local.array(DMAX, dtype=nb_dtype)
        i = m * C + t
        for d in range(D):
            q_row[d] = q[n, i, d] * scale
        for d in range(DMAX):
            acc[d] = ZERO
        lse_i = ZERO
        delta_i = ZERO
        if want_dq:
            for d in range(Dv):
                do_row[d] = dout[n, i, d]
            lse_i = lse_in[n, i]
            delta_i = delta[n, i]
        mx = NEG_INF
        l = ZERO
        j0 = m * C - C if m > 0 else 0
        j1 = m * C + C
        for k0 in range(j0, j1, BT):
            if t < BT:
                for d in range(D):
                    k_sh[t, d] = k[n, k0 + t, d]
                for d in range(Dv):
                    v_sh[t, d] = v[n, k0 + t, d]
            cuda.syncthreads()
            for jj in range(BT):
                j = k0 + jj
                ok, b = allowed_bias(pos, bucket, bias, has_bias, n, i, j, j - (m * C - C), causal, exclude_self)
                if ok:
                    s = b
                    for d in range(D):
                        s += q_row[d] * k_sh[jj, d]
                    if want_dq:
                        # dS = p (dout_i·v_j − δ_i);  dQ_i += dS k_j
                        dp = ZERO
                        for d in range(Dv):
                            dp += do_row[d] * v_sh[jj, d]
                        ds = math.exp(s - lse_i) * (dp - delta_i)
                        for d in range(D):
                            acc[d] += ds * k_sh[jj, d]
                    else:
                        m_new = s if s > mx else mx
                        alpha = math.exp(mx - m_new) if mx > NEG_INF else ZERO
                        p = math.exp(s - m_new)
                        l = alpha * l + p
                        for d in range(Dv):
                            acc[d] = alpha * acc[d] + p * v_sh[jj, d]
                        mx = m_new
            cuda.syncthreads()
        if want_dq:
            for d in range(D):
                dq[n, i, d] = acc[d] * scale
        elif l > ZERO:
            for d in range(Dv):
                out[n, i, d] = acc[d] / l
            lse[n, i] = mx + math.log(l)
        else:
            for d in range(Dv):
                out[n, i, d] = ZERO
            lse[n, i] = NEG_INF

    @cuda.jit
    def backward_dkdv(q, k, v, dout, lse, delta, pos, bucket, bias, dk, dv, scale, causal, exclude_self, has_bias):
        # grid (N, T/C), C threads; thread t owns sorted key row j = m·C + t; query chunks m and m + 1 see it
        n = cuda.blockIdx.x
        m = cuda.blockIdx.y
        t = cuda.threadIdx.x
        T = q.shape[1]
        D = q.shape[2]
        Dv = v.shape[2]
        q_sh = cuda.shared.array((BT, DMAX), dtype=nb_dtype)
        do_sh = cuda.shared.array((BT, DMAX), dtype=nb_dtype)
        lse_sh = cuda.shared.array(BT, dtype=nb_dtype)
        dl_sh = cuda.shared.array(BT, dtype=nb_dtype)
        k_row = cuda.local.array(DMAX, dtype=nb_dtype)
        v_row = cuda.local.array(DMAX, dtype=nb_dtype)
        dk_acc = cuda.local.array(DMAX, dtype=nb_dtype)
        dv_acc = cuda.local.array(DMAX, dtype=nb_dtype)
        j = m * C + t
        for d in range(D):
            k_row[d] = k[n, j, d]
            dk_acc[d] = ZERO
        for d in range(Dv):
            v_row[d] = v[n, j, d]
            dv_acc[d] = ZERO
        r1 = m * C + 2 * C
        if r1 > T:
            r1 = T
        for r0 in range(m * C, r1, BT):
            if t < BT:
                for d in range(D):
                    q_sh[t, d] = q[n, r0 + t, d] * scale
                for d in range(Dv):
                    do_sh[t, d] = dout[n, r0 + t, d]
                lse_sh[t] = lse[n, r0 + t]
                dl_sh[t] = delta[n, r0 + t]
            cuda.syncthreads()
            for rr in range(BT):
                i = r0 + rr
                mi = i // C
                ok, b = allowed_bias(pos, bucket, bias, has_bias, n, i, j, j - (mi * C - C), causal, exclude_self)
                if ok:
                    s = b
                    for d in range(D):
                        s += q_sh[rr, d] * k_row[d]
                    dp = ZERO
                    for d in range(Dv):
                        dp += do_sh[rr, d] * v_row[d]
                    p = math.exp(s - lse_sh[rr])
                    ds = p * (dp - dl_sh[rr])
                    for d in range(Dv):
                        dv_acc[d] += p * do_sh[rr, d]
                    for d in range(D):
                        dk_acc[d] += ds * q_sh[rr, d]
            cuda.syncthreads()
        for d in range(D):
            dk[n, j, d] = dk_acc[d]
        for d in range(Dv):
            dv[n, j, d] = dv_acc[d]

    return forward, backward_dkdv


def _cuda_setup(q, v, chunk_size):
    where = "lsh_chunked_attention(backend='cuda')"
    N, T, D = q.shape
    Dv = v.shape[2]
    if D > CUDA_MAX_HEAD_DIM or Dv > CUDA_MAX_HEAD_DIM:
        raise ValueError(f"{where}: head dim must be ≤ {CUDA_MAX_HEAD_DIM}, got D={D}, Dv={Dv}; use 'numba' or 'torch'")
    check_cuda_grid(T // chunk_size, f"{T // chunk_size} chunks", where)
    np_dtype = np_dtype_of(q.dtype)
    bt, dmax = cuda_tile_dims(np_dtype, chunk_size, D, Dv)
    return np_dtype, _make_cuda_kernels(np_dtype, chunk_size, bt, dmax)


def _bias_cuda(bias, q):
    if bias is None:
        return torch.zeros((1, 1, 1), dtype=q.dtype, device=q.device), False
    return bias.detach().to(q.dtype).contiguous(), True


def lsh_chunked_cuda(q, k, v, pos, bucket, bias=None, *, chunk_size, causal=False, scale=1.0, exclude_self=True):
    """numba.cuda forward (CUDA tensors; CPU tensors under the simulator); returns ``(out, lse)``."""
    N, T, D = q.shape
    np_dtype, (fwd, _) = _cuda_setup(q, v, chunk_size)
    qc, kc, vc = (x.detach().contiguous() for x in (q, k, v))
    bc, has_bias = _bias_cuda(bias, q)
    out = torch.empty((N, T, v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.empty((N, T), dtype=q.dtype, device=q.device)
    d2 = torch.zeros((1, 1), dtype=q.dtype, device=q.device)  # the dQ pass's arguments, unused here
    d3 = torch.zeros((1, 1, 1), dtype=q.dtype, device=q.device)
    cuda_launch(fwd, (N, T // chunk_size), chunk_size,
                (qc, kc, vc, pos.contiguous(), bucket.contiguous(), bc, out, lse, d3, d2, d2, d3),
                (np_dtype(scale), bool(causal), bool(exclude_self), has_bias, False))
    return out, lse


def lsh_chunked_backward_cuda(q, k, v, out, lse, dout, dlse, pos, bucket, bias=None, *, chunk_size, causal=False,
                              scale=1.0, exclude_self=True):
    """numba.cuda backward: the dQ pass (per query row) and the dK/dV pass (per key row)."""
    np_dtype, (fwd, bwd_dkdv) = _cuda_setup(q, v, chunk_size)
    qf, kf, vf, do, lse_, delta = _backward_inputs(q, k, v, out, lse, dout, dlse)
    bc, has_bias = _bias_cuda(bias, q)
    N, T, D = q.shape
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
    pc, bkc = pos.contiguous(), bucket.contiguous()
    grid = (N, T // chunk_size)
    cuda_launch(bwd_dkdv, grid, chunk_size, (qf, kf, vf, do, lse_, delta, pc, bkc, bc, dk, dv),
                (np_dtype(scale), bool(causal), bool(exclude_self), has_bias))
    d2 = torch.zeros((1, 1), dtype=q.dtype, device=q.device)  # the forward's outputs, unused in the dQ pass
    d3 = torch.zeros((1, 1, 1), dtype=q.dtype, device=q.device)
    cuda_launch(fwd, grid, chunk_size, (qf, kf, vf, pc, bkc, bc, d3, d2, do, lse_, delta, dq),
                (np_dtype(scale), bool(causal), bool(exclude_self), has_bias, True))
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------------------
# the public entry point
# --------------------------------------------------------------------------------------------------------------

class _LSHFunction(torch.autograd.Function):
    """One backend's kernels as a differentiable call: ``(out, lse)``, both differentiable (the LSH layer weights
    its rounds by their lse, so the lse's gradient must flow); saves q, k, v, out, lse and the extras (O(T·D))."""

    @staticmethod
    def forward(ctx, forward, backward, options, q, k, v, *extras):
        with torch.no_grad():
            out, lse = forward(q, k, v, *extras, **options)
        ctx.save_for_backward(q, k, v, out, lse, *extras)
        ctx.backward_fn, ctx.options = backward, options
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *extras = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = ctx.backward_fn(q, k, v, out, lse, dout, dlse, *extras, **ctx.options)
        return (None, None, None, dq, dk, dv, *([None] * len(extras)))


LSH_FORWARD = {"torch": lsh_chunked_torch, "numba": lsh_chunked_numba, "cuda": lsh_chunked_cuda}
LSH_BACKWARD = {"torch": None, "numba": lsh_chunked_backward_numba, "cuda": lsh_chunked_backward_cuda}


def lsh_chunked_attention(q, k, v, pos, bucket, *, chunk_size, causal, scale, backend="auto", bias=None,
                          exclude_self=True):
    """Chunked attention within buckets on **sorted** inputs; returns ``(out, lse)``.

    q, k ``(N, T, D)``, v ``(N, T, Dv)`` (N = batch·heads·rounds), already sorted by (bucket, position);
    ``pos`` ``(N, T)`` int64, the original positions; ``bucket`` ``(N, T)`` int64. ``chunk_size`` must divide T.
    ``bias`` (optional, not differentiable) ``(N, T, 2·chunk_size)`` added to the window scores (−inf = refuse).
    ``exclude_self``: a row never attends to its own position (shared-QK's rule; the LSH layer puts a lonely
    row's self back). ``out`` and ``lse`` ``(N, T)`` are both differentiable in q, k, v on every backend (an
    empty row has lse −inf and zero gradients).
    """
    where = "lsh_chunked_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{where}: {name} must be a 3-D tensor (N, T, D), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    N, T, D = q.shape
    if k.shape != q.shape or v.shape[:2] != (N, T):
        raise ValueError(f"{where}: k must be shaped like q {tuple(q.shape)} and v (N, T, Dv) = ({N}, {T}, ·), got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, x in (("pos", pos), ("bucket", bucket)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or tuple(x.shape) != (N, T):
            raise ValueError(f"{where}: {name} must be an int64 tensor of shape ({N}, {T})")
    check_positive_int(chunk_size, "chunk_size", where)
    if T % chunk_size:
        raise ValueError(f"{where}: chunk_size={chunk_size} must divide the sequence length T={T}")
    check_bool(causal, "causal", where)
    check_bool(exclude_self, "exclude_self", where)
    scale = check_scale(scale, D, where)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N, T, 2 * chunk_size)):
        raise ValueError(f"{where}: bias must be None or a tensor of shape ({N}, {T}, {2 * chunk_size})")
    name = resolve_backend(backend, q.device, q.dtype, where)
    if name == "cuda" and chunk_size not in CUDA_BLOCK_SIZES:
        raise ValueError(f"{where}: chunk_size for backend 'cuda' must be one of "
                         f"{', '.join(map(str, CUDA_BLOCK_SIZES))} (threads per block), got {chunk_size}")
    extras = (pos, bucket) if bias is None else (pos, bucket, bias)
    options = dict(chunk_size=chunk_size, causal=causal, scale=scale, exclude_self=exclude_self)
    if name == "torch":  # the reference: autograd differentiates it as written
        return apply_kernel(LSH_FORWARD[name], None, (q, k, v), extras, **options)
    return _LSHFunction.apply(LSH_FORWARD[name], LSH_BACKWARD[name], options, q, k, v, *extras)


__all__ = ["lsh_chunked_attention", "window_allowed", "lsh_chunked_torch", "lsh_chunked_numba",
           "lsh_chunked_backward_numba", "lsh_chunked_cuda", "lsh_chunked_backward_cuda", "cuda_tile_dims",
           "LSH_FORWARD", "LSH_BACKWARD"]
