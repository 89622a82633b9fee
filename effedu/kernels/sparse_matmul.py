"""CSR sparse × dense matrix product: touch only the weights pruning kept (chapter 05; survey §3.4).

Unstructured magnitude pruning zeroes most entries of a weight matrix, but a dense ``W @ X`` still multiplies
every zero: the model is smaller on disk, not faster. To be faster, a kernel must skip the zeros, so the matrix is
stored in **CSR** (compressed sparse row) form, as ``torch.sparse_csr_tensor`` and ``scipy.sparse.csr_matrix`` do:

    values[p], col_indices[p]     the p-th non-zero and its column, row by row (nnz of them)
    crow_indices[i] … [i+1] − 1   the positions p of row i's non-zeros (M + 1 offsets, crow_indices[0] = 0)

Storage: nnz values + nnz column indices + (M + 1) offsets, against M·K values dense — with 32-bit indices a
float32 CSR matrix is smaller only above 50 % sparsity (8 bytes per kept weight against 4).

The product ``Y = A B`` (A: M×K CSR, B: K×N dense) is, row by row, a sum of scaled rows of B:

    Y_i = Σ_{p ∈ row i} values[p] · B[col_indices[p], :]                     (one axpy over N per non-zero)

— nnz·N multiply-adds instead of M·K·N. Whether that is *faster* than a dense sgemm is another matter: the
axpys read rows of B in an irregular order and cannot use the register blocking of a BLAS kernel, so a dense
sgemm does several times more work per second. ``python -m effedu.bench prune`` measures the crossover sparsity
above which the CSR kernel wins — the survey's "sparse models are unoptimized for modern hardware", in numbers.

Gradients (A's non-zeros are ``values``; with L a loss and G = ∂L/∂Y, M×N):

    ∂L/∂B        = Aᵀ G                   a CSR product again: Aᵀ in CSR form is A in CSC form, built by a counting
                                          sort of the non-zeros by column (O(nnz + K), :func:`csr_transpose`), then
                                          the same row kernel over Aᵀ's K rows (no two rows write the same output:
                                          no atomics, parallel over rows)
    ∂L/∂values[p] = ⟨G_i, B_j⟩  for p = (i, j)     the *sampled* dense–dense product (SDDMM): G Bᵀ evaluated only
                                          at A's non-zeros, nnz dot products of length N

so training a pruned layer never forms a dense M×K matrix (and its gradient keeps the sparsity pattern: a pruned
weight stays pruned).

Backends (one signature, :func:`resolve_backend`): ``"torch"`` — the reference, written from the CSR arrays with
tensor ops (gather the rows of B, scale, ``index_add`` into Y; autograd differentiates it; ``a @ b`` is the test
oracle, never the implementation); ``"numba"`` — ``prange`` over rows, each row an axpy per non-zero into its
output row, four non-zeros per sweep over the row (written for speed, no BLAS in the forward); ``"cuda"`` — numba.cuda, one thread block per row,
threads over the N columns (reads of B's rows are coalesced, ``values`` and ``col_indices`` are broadcast).

Public entry points: :func:`csr_matmul` (a ``torch.sparse_csr_tensor`` × dense, differentiable w.r.t. ``b``) and
:func:`csr_matmul_parts` (the CSR arrays passed separately: differentiable w.r.t. ``values`` and ``b`` — what
``effedu.general.sparse_linear.SparseLinear`` uses), :func:`dense_to_csr` to build the CSR tensor of a pruned
weight.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from numba import cuda, njit, prange

from ._base import (FLOAT_KERNEL_DTYPES, apply_kernel, cached_kernels, cuda_launch, np_dtype_of, resolve_backend,
                    single_threaded_blas)

INDEX_DTYPES = (torch.int32, torch.int64)  # what crow_indices / col_indices may be (torch and scipy use both)
CUDA_THREADS = 128  # threads per block of the CUDA kernels (the simulator tests use fewer)


# --------------------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------------------


def _names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_dense_b(b, where, dtype, device):
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{where}: b must be a dense torch.Tensor (K, N), got {type(b).__name__}")
    if b.layout != torch.strided:
        raise TypeError(f"{where}: b must be a dense (strided) tensor (K, N), got layout {b.layout}")
    if b.dim() != 2:
        raise ValueError(f"{where}: b must be 2-D (K, N), got shape {tuple(b.shape)} ({b.dim()} dims); "
                         f"for a vector use b.unsqueeze(1)")
    if b.dtype not in FLOAT_KERNEL_DTYPES:
        raise TypeError(f"{where}: b must have dtype {_names(FLOAT_KERNEL_DTYPES)}, got {b.dtype}")
    if b.dtype != dtype:
        raise TypeError(f"{where}: the sparse values and b must share one dtype, got {dtype} and {b.dtype}")
    if b.device != device:
        raise ValueError(f"{where}: the sparse matrix and b must be on one device, got {device} and {b.device}")


def check_csr_parts(crow_indices, col_indices, values, b, n_rows, *, where="csr_matmul_parts", check_indices=True):
    """Validate CSR arrays and a dense ``b`` for ``Y = A b``; returns ``(M, K, N, nnz)``.

    ``check_indices``: also check the index *values* (offsets start at 0, never decrease and end at nnz; columns in
    [0, K)) — O(nnz) work, a device sync on a GPU; a module whose indices never change checks them once.
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, int):
        raise TypeError(f"{where}: n_rows must be an int, got {type(n_rows).__name__} ({n_rows!r})")
    if n_rows < 0:
        raise ValueError(f"{where}: n_rows must be ≥ 0, got {n_rows}")
    for name, x in (("crow_indices", crow_indices), ("col_indices", col_indices), ("values", values)):
        if not isinstance(x, torch.Tensor) or x.layout != torch.strided:
            got = type(x).__name__ if not isinstance(x, torch.Tensor) else f"layout {x.layout}"
            raise TypeError(f"{where}: {name} must be a dense 1-D torch.Tensor, got {got}")
        if x.dim() != 1:
            raise ValueError(f"{where}: {name} must be 1-D, got shape {tuple(x.shape)}")
    for name, x in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if x.dtype not in INDEX_DTYPES:
            raise TypeError(f"{where}: {name} must have an integer dtype ({_names(INDEX_DTYPES)}), got {x.dtype}")
    if crow_indices.dtype != col_indices.dtype:
        raise TypeError(f"{where}: crow_indices and col_indices must share one dtype, got {crow_indices.dtype} and "
                        f"{col_indices.dtype}")
    if values.dtype not in FLOAT_KERNEL_DTYPES:
        raise TypeError(f"{where}: values must have dtype {_names(FLOAT_KERNEL_DTYPES)}, got {values.dtype}")
    _check_dense_b(b, where, values.dtype, values.device)
    for name, x in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if x.device != values.device:
            raise ValueError(f"{where}: {name} and values must be on one device, got {x.device} and {values.device}")
    nnz = values.shape[0]
    if col_indices.shape[0] != nnz:
        raise ValueError(f"{where}: col_indices and values must have one entry per non-zero, got "
                         f"{col_indices.shape[0]} and {nnz}")
    if crow_indices.shape[0] != n_rows + 1:
        raise ValueError(f"{where}: crow_indices must have n_rows + 1 = {n_rows + 1} entries, got "
                         f"{crow_indices.shape[0]}")
    K, N = b.shape
    if check_indices:
        first, last = int(crow_indices[0]), int(crow_indices[-1])
        if first != 0 or last != nnz:
            raise ValueError(f"{where}: crow_indices must start at 0 and end at nnz = {nnz}, got {first} … {last}")
        if n_rows > 0 and bool((crow_indices[1:] < crow_indices[:-1]).any()):
            raise ValueError(f"{where}: crow_indices must be non-decreasing (row i's non-zeros are "
                             f"crow_indices[i] … crow_indices[i+1] − 1)")
        if nnz > 0:
            lo, hi = int(col_indices.min()), int(col_indices.max())
            if lo < 0 or hi >= K:
                raise ValueError(f"{where}: col_indices must lie in [0, K) = [0, {K}) (K = b.shape[0]), got "
                                 f"values in [{lo}, {hi}]")
    return n_rows, K, N, nnz


def check_csr(a, b, where="csr_matmul"):
    """Validate ``a`` (a 2-D ``torch.sparse_csr_tensor``, no grad) and ``b`` (dense K×N); returns ``(M, K, N)``."""
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{where}: a must be a torch.sparse_csr_tensor (M, K), got {type(a).__name__}")
    if a.layout != torch.sparse_csr:
        raise TypeError(f"{where}: a must be a torch.sparse_csr_tensor (layout torch.sparse_csr), got layout "
                        f"{a.layout}; convert it with a.to_sparse_csr() or effedu's dense_to_csr(weight)")
    if a.dim() != 2:
        raise ValueError(f"{where}: a must be a 2-D CSR matrix (M, K), got shape {tuple(a.shape)} (batched or "
                         f"hybrid CSR is not supported)")
    if a.values().dim() != 1:
        raise ValueError(f"{where}: a must hold scalar non-zeros (values 1-D), got values of shape "
                         f"{tuple(a.values().shape)} (a hybrid CSR tensor)")
    if a.dtype not in FLOAT_KERNEL_DTYPES:
        raise TypeError(f"{where}: a must have dtype {_names(FLOAT_KERNEL_DTYPES)}, got {a.dtype}")
    if a.requires_grad or a.values().requires_grad:
        raise TypeError(f"{where}: a requires grad, but csr_matmul is differentiable w.r.t. b only; to train the "
                        f"non-zeros use csr_matmul_parts(crow_indices, col_indices, values, b, n_rows) or "
                        f"effedu.general.sparse_linear.SparseLinear (which holds them as a parameter)")
    _check_dense_b(b, where, a.dtype, a.device)
    M, K = a.shape
    if b.shape[0] != K:
        raise ValueError(f"{where}: inner dimensions differ: a is {M}×{K}, b is {b.shape[0]}×{b.shape[1]} "
                         f"(a @ b needs b.shape[0] == a.shape[1] = {K})")
    return M, K, b.shape[1]


# --------------------------------------------------------------------------------------------------------------
# building CSR: from a dense (pruned) weight, and the transpose (CSR of Aᵀ = CSC of A)
# --------------------------------------------------------------------------------------------------------------


def dense_to_csr(weight, mask=None, *, index_dtype=torch.int64):
    """The ``torch.sparse_csr_tensor`` of a dense 2-D ``weight``: its non-zeros, or the entries where ``mask`` is True.

    With a ``mask`` (bool, same shape) the pattern is the mask's — a kept weight that happens to be 0 is stored
    too, so the structure is the pruning mask. Values are detached (the result does not require grad: train the
    non-zeros with ``SparseLinear``). Built from scratch: the kept positions in row-major order give the column
    indices and the values; the row offsets are the cumulative count of kept entries per row.
    """
    where = "dense_to_csr"
    if not isinstance(weight, torch.Tensor) or weight.layout != torch.strided:
        got = type(weight).__name__ if not isinstance(weight, torch.Tensor) else f"layout {weight.layout}"
        raise TypeError(f"{where}: weight must be a dense 2-D torch.Tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D (M, K), got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{where}: weight must have a floating dtype, got {weight.dtype}")
    if index_dtype not in INDEX_DTYPES:
        raise TypeError(f"{where}: index_dtype must be one of {_names(INDEX_DTYPES)}, got {index_dtype}")
    if mask is None:
        keep = weight != 0
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype
            raise TypeError(f"{where}: mask must be a torch.bool tensor (True = kept), got {got}")
        if mask.shape != weight.shape:
            raise ValueError(f"{where}: mask must have the weight's shape {tuple(weight.shape)}, got "
                             f"{tuple(mask.shape)}")
        keep = mask.to(weight.device)
    M, K = weight.shape
    rows, cols = keep.nonzero(as_tuple=True)  # row-major order: row by row, columns ascending
    crow = torch.zeros(M + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(keep.sum(dim=1), dim=0)
    values = weight.detach()[rows, cols]
    with warnings.catch_warnings():  # torch's "CSR support is in beta" notice, once per process
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow.to(index_dtype), cols.to(index_dtype), values, size=(M, K),
                                       check_invariants=False)  # built valid above


def csr_transpose(crow_indices, col_indices, values, n_cols):
    """CSR arrays of Aᵀ (K×M) from those of A (M×K): ``(crow_t, col_t, values_t)``, with tensor ops.

    A stable sort of the non-zeros by column keeps each column's rows in ascending order; the new offsets are the
    cumulative count of non-zeros per column. Any device; the numba backward uses a counting sort instead.
    """
    n_rows = crow_indices.shape[0] - 1
    counts = crow_indices[1:] - crow_indices[:-1]
    rows = torch.repeat_interleave(torch.arange(n_rows, device=values.device), counts.long())
    order = torch.sort(col_indices.long(), stable=True).indices
    crow_t = torch.zeros(n_cols + 1, dtype=torch.int64, device=values.device)
    crow_t[1:] = torch.cumsum(torch.bincount(col_indices.long(), minlength=n_cols), dim=0)
    return crow_t.to(crow_indices.dtype), rows[order].to(col_indices.dtype), values[order]


# --------------------------------------------------------------------------------------------------------------
# torch: the reference (gather rows of B, scale, index_add into Y) — autograd differentiates it
# --------------------------------------------------------------------------------------------------------------


def csr_matmul_torch(values, b, crow_indices, col_indices, *, n_rows, **_):
    """``Y = A B`` from the CSR arrays with tensor ops; returns ``(Y, None)``.

    Y_i = Σ_{p ∈ row i} values[p] · B[col[p]]: every non-zero's scaled row of B (an nnz×N intermediate — the
    reference's memory cost), summed into its output row with ``index_add``.
    """
    counts = (crow_indices[1:] - crow_indices[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(n_rows, device=b.device), counts)  # the row of each non-zero
    contrib = values.unsqueeze(1) * b.index_select(0, col_indices.long())  # (nnz, N)
    out = torch.zeros(n_rows, b.shape[1], dtype=b.dtype, device=b.device).index_add(0, rows, contrib)
    return out, None


# --------------------------------------------------------------------------------------------------------------
# numba on the CPU
# --------------------------------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _csr_rows_kernel(crow, col, val, b, out):
    # out (M, N) = A b, one parallel job per row of A; b and out C-contiguous
    M, N = out.shape
    for i in prange(M):
        o = out[i]
        for n in range(N):
            o[n] = 0.0
        p = crow[i]
        end = crow[i + 1]
        # four non-zeros per sweep over the output row: o is loaded and stored once for four axpys (the loop is
        # bound by loads and stores, not multiply-adds); contiguous, independent updates — LLVM vectorises it
        while p + 4 <= end:
            v0, v1, v2, v3 = val[p], val[p + 1], val[p + 2], val[p + 3]
            b0, b1, b2, b3 = b[col[p]], b[col[p + 1]], b[col[p + 2]], b[col[p + 3]]
            for n in range(N):
                o[n] += v0 * b0[n] + v1 * b1[n] + v2 * b2[n] + v3 * b3[n]
            p += 4
        while p < end:  # the row's last 0–3 non-zeros: o += v · b[j]
            v = val[p]
            bj = b[col[p]]
            for n in range(N):
                o[n] += v * bj[n]
            p += 1


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _csr_sddmm_kernel(crow, col, g, b, dval):
    # dval[p] = ⟨g[i], b[j]⟩ for every non-zero p = (i, j); one parallel job per row
    M = g.shape[0]
    for i in prange(M):
        gi = g[i]
        for p in range(crow[i], crow[i + 1]):
            dval[p] = np.dot(gi, b[col[p]])  # BLAS dot (one thread: the caller scopes it)


@njit(fastmath=False, cache=True, nogil=True)
def _csr_transpose_kernel(crow, col, val, crow_t, row_t, val_t):
    # counting sort of the non-zeros by column; crow_t (K + 1) zero on entry
    M = crow.shape[0] - 1
    K = crow_t.shape[0] - 1
    nnz = col.shape[0]
    for p in range(nnz):
        crow_t[col[p] + 1] += 1
    for j in range(K):
        crow_t[j + 1] += crow_t[j]
    nxt = crow_t[:K].copy()  # next free slot of each column
    for i in range(M):  # rows in ascending order: each column's rows come out sorted
        for p in range(crow[i], crow[i + 1]):
            j = col[p]
            q = nxt[j]
            row_t[q] = i
            val_t[q] = val[p]
            nxt[j] = q + 1


def _numba_rows(crow, col, val, b, n_rows):
    out = torch.empty(n_rows, b.shape[1], dtype=b.dtype)
    _csr_rows_kernel(crow.numpy(), col.numpy(), val.detach().contiguous().numpy(), b.detach().contiguous().numpy(),
                     out.numpy())
    return out


def csr_transpose_numba(crow_indices, col_indices, values, n_cols):
    """CSR arrays of Aᵀ by a counting sort (O(nnz + K), serial): ``(crow_t, col_t, values_t)``."""
    crow_t = torch.zeros(n_cols + 1, dtype=crow_indices.dtype)
    row_t = torch.empty_like(col_indices)
    val_t = torch.empty_like(values)
    _csr_transpose_kernel(crow_indices.contiguous().numpy(), col_indices.contiguous().numpy(),
                          values.detach().contiguous().numpy(), crow_t.numpy(), row_t.numpy(), val_t.numpy())
    return crow_t, row_t, val_t


def csr_sddmm_numba(crow_indices, col_indices, g, b):
    """``dval[p] = ⟨g_i, b_j⟩`` at each non-zero p = (i, j) of the CSR pattern (g: M×N, b: K×N)."""
    dval = torch.empty(col_indices.shape[0], dtype=b.dtype)
    with single_threaded_blas():  # prange over rows × one BLAS thread per dot
        _csr_sddmm_kernel(crow_indices.contiguous().numpy(), col_indices.contiguous().numpy(),
                          g.detach().contiguous().numpy(), b.detach().contiguous().numpy(), dval.numpy())
    return dval


def csr_matmul_numba(values, b, crow_indices, col_indices, *, n_rows, **_):
    """numba forward: ``(Y, aux)``, Y = A b with one parallel job per row."""
    out = _numba_rows(crow_indices.contiguous(), col_indices.contiguous(), values, b, n_rows)
    return out, out.new_empty(0)


def csr_matmul_backward_numba(values, b, out, aux, dout, crow_indices, col_indices, *, n_rows,
                              need_values_grad=True, need_b_grad=True):
    """numba backward: ``(∂L/∂values, ∂L/∂b)`` = (SDDMM of dout and b at the non-zeros, Aᵀ dout); None where not
    needed."""
    dvalues = db = None
    if need_values_grad:
        dvalues = csr_sddmm_numba(crow_indices, col_indices, dout, b)
    if need_b_grad:
        crow_t, row_t, val_t = csr_transpose_numba(crow_indices, col_indices, values, b.shape[0])
        db = _numba_rows(crow_t, row_t, val_t, dout, b.shape[0])
    return dvalues, db


# --------------------------------------------------------------------------------------------------------------
# numba.cuda: one block per row, threads over the N columns
# --------------------------------------------------------------------------------------------------------------


@cached_kernels
def _make_cuda_kernels(np_dtype, NT=CUDA_THREADS):
    """The CUDA kernels for one float dtype (its zero is a typed constant: float32 stays float32 arithmetic)."""
    from numba import float32, float64

    nb_dtype = float32 if np_dtype == np.float32 else float64
    ZERO = nb_dtype(0.0)

    @cuda.jit
    def rows_kernel(crow, col, val, b, out):
        # block i computes out[i, :] = Σ_{p ∈ row i} val[p] · b[col[p], :]; thread t owns columns t, t + NT, …
        i = cuda.blockIdx.x
        t = cuda.threadIdx.x
        N = b.shape[1]
        start = crow[i]
        end = crow[i + 1]
        n = t
        while n < N:
            acc = ZERO
            for p in range(start, end):
                acc += val[p] * b[col[p], n]  # val, col: one address per warp (broadcast); b: coalesced
            out[i, n] = acc
            n += NT

    @cuda.jit
    def sddmm_kernel(crow, col, g, b, dval):
        # block i: the dot products of row i's non-zeros; thread t owns non-zeros start + t, start + t + NT, …
        i = cuda.blockIdx.x
        t = cuda.threadIdx.x
        N = b.shape[1]
        p = crow[i] + t
        end = crow[i + 1]
        while p < end:
            j = col[p]
            s = ZERO
            for n in range(N):
                s += g[i, n] * b[j, n]
            dval[p] = s
            p += NT

    return rows_kernel, sddmm_kernel


def _cuda_rows(crow, col, val, b, n_rows, threads):
    out = torch.zeros(n_rows, b.shape[1], dtype=b.dtype, device=b.device)
    if n_rows == 0 or b.shape[1] == 0:
        return out
    rows_kernel, _ = _make_cuda_kernels(np_dtype_of(b.dtype), threads)
    cuda_launch(rows_kernel, n_rows, threads, (crow.contiguous(), col.contiguous(), val.detach().contiguous(),
                                               b.detach().contiguous(), out))
    return out


def csr_matmul_cuda(values, b, crow_indices, col_indices, *, n_rows, threads=None, **_):
    """numba.cuda forward: ``(Y, aux)``; CUDA tensors (CPU tensors under the simulator)."""
    nt = CUDA_THREADS if threads is None else threads
    out = _cuda_rows(crow_indices, col_indices, values, b, n_rows, nt)
    return out, out.new_empty(0)


def csr_matmul_backward_cuda(values, b, out, aux, dout, crow_indices, col_indices, *, n_rows, threads=None,
                             need_values_grad=True, need_b_grad=True):
    """numba.cuda backward: SDDMM kernel for ∂L/∂values; Aᵀ (sorted by column with torch ops) × dout for ∂L/∂b."""
    nt = CUDA_THREADS if threads is None else threads
    dvalues = db = None
    if need_values_grad:
        dvalues = torch.zeros_like(values)
        if n_rows > 0 and values.shape[0] > 0:
            _, sddmm_kernel = _make_cuda_kernels(np_dtype_of(b.dtype), nt)
            cuda_launch(sddmm_kernel, n_rows, nt, (crow_indices.contiguous(), col_indices.contiguous(),
                                                   dout.contiguous(), b.detach().contiguous(), dvalues))
    if need_b_grad:
        crow_t, row_t, val_t = csr_transpose(crow_indices, col_indices, values.detach(), b.shape[0])
        db = _cuda_rows(crow_t, row_t, val_t, dout, b.shape[0], nt)
    return dvalues, db


# --------------------------------------------------------------------------------------------------------------
# the public entry points
# --------------------------------------------------------------------------------------------------------------

CSR_MATMUL_FORWARD = {"torch": csr_matmul_torch, "numba": csr_matmul_numba, "cuda": csr_matmul_cuda}
CSR_MATMUL_BACKWARD = {"torch": None, "numba": csr_matmul_backward_numba, "cuda": csr_matmul_backward_cuda}


def csr_matmul_parts(crow_indices, col_indices, values, b, n_rows, *, backend="auto", check_indices=True):
    """``Y = A b`` for A given by its CSR arrays (``n_rows`` × ``b.shape[0]``), b dense ``(K, N)`` → ``(n_rows, N)``.

    Differentiable w.r.t. ``values`` (∂L/∂values[p] = ⟨∂L/∂Y_i, b_j⟩ at p = (i, j): the SDDMM) and ``b``
    (∂L/∂b = Aᵀ ∂L/∂Y). ``crow_indices`` (n_rows + 1) and ``col_indices`` (nnz): int32 or int64, one dtype;
    ``values`` (nnz) and ``b``: float32 or float64, one dtype, one device. ``backend``: ``"auto"`` (cuda on a real
    GPU, numba on the CPU), ``"numba"``, ``"cuda"``, ``"torch"``. ``check_indices=False`` skips the O(nnz) check of
    the index values (for indices already checked once).
    """
    where = "csr_matmul_parts"
    M, K, N, nnz = check_csr_parts(crow_indices, col_indices, values, b, n_rows, where=where,
                                   check_indices=check_indices)
    name = resolve_backend(backend, b.device, b.dtype, where)
    options = {"n_rows": M}
    if name != "torch":
        options.update(need_values_grad=values.requires_grad, need_b_grad=b.requires_grad)
    out, _ = apply_kernel(CSR_MATMUL_FORWARD[name], CSR_MATMUL_BACKWARD[name], (values, b),
                          (crow_indices, col_indices), **options)
    return out


def csr_matmul(a, b, *, backend="auto"):
    """``a @ b`` for ``a`` a ``torch.sparse_csr_tensor`` (M, K) and ``b`` dense (K, N) → dense (M, N).

    float32 or float64 (one dtype, one device). Differentiable w.r.t. ``b`` (∂L/∂b = aᵀ ∂L/∂Y, computed as a CSR
    product with the transposed pattern). ``a`` must not require grad: use :func:`csr_matmul_parts` or
    ``SparseLinear`` to train the non-zeros. ``backend`` as in :func:`csr_matmul_parts`.
    """
    M, K, N = check_csr(a, b)
    return csr_matmul_parts(a.crow_indices(), a.col_indices(), a.values(), b, M, backend=backend)


__all__ = ["csr_matmul", "csr_matmul_parts", "dense_to_csr", "csr_transpose", "check_csr", "check_csr_parts",
           "csr_matmul_torch", "csr_matmul_numba", "csr_matmul_backward_numba", "csr_matmul_cuda",
           "csr_matmul_backward_cuda", "csr_transpose_numba", "csr_sddmm_numba", "CSR_MATMUL_FORWARD",
           "CSR_MATMUL_BACKWARD", "INDEX_DTYPES", "CUDA_THREADS"]
