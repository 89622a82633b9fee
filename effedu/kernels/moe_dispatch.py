"""Mixture-of-experts dispatch and combine: tokens to per-expert buffers and back (chapter 10; survey §3.8).

A mixture-of-experts layer routes each of N tokens to k of E experts. Every expert is a small FFN applied to a
*batch* of its tokens, so the tokens must first be moved into one contiguous buffer per expert, and the experts'
outputs moved back to the tokens, weighted by the router's gates. With a fixed **capacity** C per expert (the
Switch Transformer's ``ceil(k · N / E · capacity_factor)``) the buffers are one dense tensor ``(E, C, d)``: static
shapes, one batched matmul for all experts. The router (``effedu.general.moe.top_k_route(..., return_slots=True)``)
has already decided where each choice goes:

    expert_index[n, j] = e     the j-th expert chosen by token n
    slot[n, j]         = s     its row in expert e's buffer: the number of choices sent to e before it (first come,
                               first served), or −1 when e was full (the choice is *dropped*)

So the "sort tokens by expert" of every MoE implementation is already done: the running count that gave the slots
is a counting sort, and (e, s) is each kept choice's place in the sorted order. The two data movements are

    dispatch   buffers[e, s] = x[n]                          for every kept choice (n, j) → (e, s); other rows 0
    combine    y[n] = Σ_j [slot[n, j] ≥ 0] · gate[n, j] · expert_out[e_nj, s_nj]

and their gradients are the same two movements the other way round (with L a loss):

    ∂L/∂x[n]               = Σ_{j kept} ∂L/∂buffers[e_nj, s_nj]          (dispatch backward = a combine, gates 1)
    ∂L/∂expert_out[e, s]   = gate[n, j] · ∂L/∂y[n]   for the choice (n, j) in (e, s), else 0   (= a dispatch)
    ∂L/∂gate[n, j]         = [kept] · ⟨∂L/∂y[n], expert_out[e_nj, s_nj]⟩

O(N·k·d) work — pure data movement, memory bound. Two classic ways to write it, kept here as the baselines the
benchmark compares against (``python -m effedu.bench moe``):

  * **one-hot einsum** (Mesh-TensorFlow, GShard): a dispatch tensor D (N, E, C) with D[n, e, s] = 1 for each kept
    choice; ``buffers = einsum("nec,nd->ecd", D, x)``, and with the combine tensor G = D weighted by the gates
    ``y = einsum("nec,ecd->nd", G, expert_out)``. Static shapes that TPUs like, but N·E·C entries (≈ N²·k·cf/… —
    quadratic in the tokens) and a dense matmul of N·E·C·d multiply-adds to move N·k·d numbers
    (:func:`dispatch_tensor`, :func:`moe_dispatch_einsum`, :func:`moe_combine_einsum`);
  * **per-expert loop** (what a first implementation does): for each expert select its tokens, copy them in with
    ``index_put`` and add the outputs back with ``index_add`` — E rounds of small ops
    (:func:`moe_dispatch_loop`, :func:`moe_combine_loop`).

Backends of :func:`moe_dispatch` / :func:`moe_combine` (one signature, :func:`resolve_backend`): ``"torch"`` — the
reference, a scatter to row e·C + s with ``index_copy`` and a gather + ``index_add`` back, differentiated by
autograd; ``"numba"`` — an owner map (which choice fills each buffer row, −1 for none: each row has at most one
writer, so no atomics), then ``prange`` over buffer rows (dispatch) or over tokens (combine), contiguous row copies;
``"cuda"`` — numba.cuda, one thread block per buffer row or per token, threads over d (coalesced), and a
shared-memory tree reduction per (token, choice) for the gates' gradient.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import cuda, njit, prange

from ._base import apply_kernel, cached_kernels, cuda_launch, np_dtype_of, resolve_backend

INDEX_DTYPES = (torch.int32, torch.int64)  # expert_index / slot (torch.topk gives int64)
CUDA_THREADS = 128  # threads per block of the CUDA kernels, a power of two (the simulator tests use fewer)


# --------------------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------------------


def _names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_int(value, name, where, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be an int ≥ {minimum}, got {value}")
    return int(value)


def _check_float_tensor(t, name, shape_doc, dims, where):
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        got = type(t).__name__ if not isinstance(t, torch.Tensor) else f"layout {t.layout}"
        raise TypeError(f"{where}: {name} must be a dense torch.Tensor {shape_doc}, got {got}")
    if t.dim() != dims:
        raise ValueError(f"{where}: {name} must be {dims}-D {shape_doc}, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must have a floating dtype (float32 or float64 for the numba and CUDA "
                        f"backends), got {t.dtype}")


def check_routing(expert_index, slot, n_experts, capacity, n_tokens, device, *, where="moe_dispatch",
                  check_indices=True):
    """Validate a routing ``(expert_index, slot)`` of ``n_tokens`` tokens to ``n_experts`` buffers of ``capacity``
    rows; returns ``k`` (choices per token).

    ``expert_index`` and ``slot``: integer tensors (int32 or int64) of one shape ``(N, k)``, k ≥ 1, on ``device``.
    ``check_indices`` (O(N·k) work, a device sync on a GPU): also check the values — every expert index in
    [0, n_experts), every slot in [−1, capacity) (−1 = dropped), and no two kept choices in one (expert, slot).
    """
    n_experts = _check_int(n_experts, "n_experts", where, 1)
    capacity = _check_int(capacity, "capacity", where, 1)
    for name, t in (("expert_index", expert_index), ("slot", slot)):
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            got = type(t).__name__ if not isinstance(t, torch.Tensor) else f"layout {t.layout}"
            raise TypeError(f"{where}: {name} must be an integer torch.Tensor (N, k), got {got}")
        if t.dtype not in INDEX_DTYPES:
            raise TypeError(f"{where}: {name} must have an integer dtype ({_names(INDEX_DTYPES)}), got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D (N, k), got shape {tuple(t.shape)}; for top-1 routing "
                             f"use {name}.unsqueeze(1)")
        if t.device != device:
            raise ValueError(f"{where}: {name} must be on the data's device {device}, got {t.device}")
    if expert_index.shape != slot.shape:
        raise ValueError(f"{where}: expert_index and slot must have one shape (N, k), got "
                         f"{tuple(expert_index.shape)} and {tuple(slot.shape)}")
    N, k = expert_index.shape
    if N != n_tokens:
        raise ValueError(f"{where}: expert_index must have one row per token, N = {n_tokens}, got {N} rows")
    if k < 1:
        raise ValueError(f"{where}: every token needs k ≥ 1 choices, got expert_index of shape {(N, k)}")
    if check_indices and N > 0:
        lo, hi = int(expert_index.min()), int(expert_index.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"{where}: expert_index must lie in [0, n_experts) = [0, {n_experts}), got values in "
                             f"[{lo}, {hi}]")
        lo, hi = int(slot.min()), int(slot.max())
        if lo < -1 or hi >= capacity:
            raise ValueError(f"{where}: slot must lie in [-1, capacity) = [-1, {capacity}) (−1 = dropped), got "
                             f"values in [{lo}, {hi}]")
        kept = slot >= 0
        rows = (expert_index.long() * capacity + slot.long())[kept]
        if rows.numel() > 0:
            counts = torch.bincount(rows, minlength=n_experts * capacity)
            if int(counts.max()) > 1:
                r = int(torch.argmax(counts))
                raise ValueError(f"{where}: two kept choices share (expert, slot) = ({r // capacity}, "
                                 f"{r % capacity}): a buffer row holds one token; slots must be unique per expert "
                                 f"(as top_k_route(..., return_slots=True) gives them)")
    return k


def check_dispatch(x, expert_index, slot, n_experts, capacity, *, where="moe_dispatch", check_indices=True):
    """Validate the arguments of :func:`moe_dispatch`; returns ``(N, d, k)``."""
    _check_float_tensor(x, "x", "(N, d)", 2, where)
    k = check_routing(expert_index, slot, n_experts, capacity, x.shape[0], x.device, where=where,
                      check_indices=check_indices)
    return x.shape[0], x.shape[1], k


def check_combine(expert_out, expert_index, slot, gate, *, where="moe_combine", check_indices=True):
    """Validate the arguments of :func:`moe_combine`; returns ``(E, C, d, N, k)``."""
    _check_float_tensor(expert_out, "expert_out", "(E, C, d)", 3, where)
    E, C, d = expert_out.shape
    if E < 1 or C < 1:
        raise ValueError(f"{where}: expert_out must have ≥ 1 expert and capacity ≥ 1, got shape {(E, C, d)}")
    _check_float_tensor(gate, "gate", "(N, k)", 2, where)
    if gate.dtype != expert_out.dtype:
        raise TypeError(f"{where}: gate and expert_out must share one dtype, got {gate.dtype} and "
                        f"{expert_out.dtype}")
    if gate.device != expert_out.device:
        raise ValueError(f"{where}: gate and expert_out must be on one device, got {gate.device} and "
                         f"{expert_out.device}")
    N = gate.shape[0]
    k = check_routing(expert_index, slot, E, C, N, expert_out.device, where=where, check_indices=check_indices)
    if gate.shape != expert_index.shape:
        raise ValueError(f"{where}: gate must have expert_index's shape (N, k) = {tuple(expert_index.shape)}, got "
                         f"{tuple(gate.shape)}")
    return E, C, d, N, k


# --------------------------------------------------------------------------------------------------------------
# torch: the reference (scatter to row e·C + s, gather back) — autograd differentiates it
# --------------------------------------------------------------------------------------------------------------


def _kept_rows(expert_index, slot, capacity):
    """For the kept choices, in token order: (token n, flat choice n·k + j, buffer row e·C + s)."""
    kept = (slot >= 0).reshape(-1)
    choice = kept.nonzero().squeeze(1)
    k = slot.shape[1]
    token = torch.div(choice, k, rounding_mode="floor")
    rows = (expert_index.long() * capacity + slot.long()).reshape(-1)[choice]
    return token, choice, rows


def moe_dispatch_torch(x, expert_index, slot, *, n_experts, capacity, **_):
    """``buffers (E, C, d)``: each kept choice's token row copied to row e·C + s of the flat buffer; ``(out, None)``."""
    token, _, rows = _kept_rows(expert_index, slot, capacity)
    flat = x.new_zeros(n_experts * capacity, x.shape[1]).index_copy(0, rows, x.index_select(0, token))
    return flat.view(n_experts, capacity, x.shape[1]), None


def moe_combine_torch(expert_out, gate, expert_index, slot, **_):
    """``y (N, d)``: each kept choice's expert-output row, times its gate, added to its token; ``(out, None)``."""
    E, C, d = expert_out.shape
    N = slot.shape[0]
    token, choice, rows = _kept_rows(expert_index, slot, C)
    contrib = expert_out.reshape(E * C, d).index_select(0, rows) * gate.reshape(-1)[choice].unsqueeze(1)
    return expert_out.new_zeros(N, d).index_add(0, token, contrib), None


# --------------------------------------------------------------------------------------------------------------
# the two baselines: Mesh-TensorFlow's one-hot einsum and a per-expert Python loop
# --------------------------------------------------------------------------------------------------------------


def dispatch_tensor(expert_index, slot, n_experts, capacity, gate=None):
    """Mesh-TensorFlow / GShard's dispatch tensor ``D (N, E, C)``: 1 at (n, e, s) for each kept choice, else 0;
    with ``gate`` (N, k) the *combine* tensor, ``gate[n, j]`` there instead (differentiable w.r.t. ``gate``).

    dtype: the gate's, else torch's default float dtype. Size N·E·C — with C ≈ k·N/E·cf that is k·cf·N² entries:
    the reason the one-hot formulation does not scale with the number of tokens.
    """
    where = "dispatch_tensor"
    if gate is not None:
        _check_float_tensor(gate, "gate", "(N, k)", 2, where)
        device, dtype = gate.device, gate.dtype
    else:
        device, dtype = getattr(expert_index, "device", None), torch.get_default_dtype()
    N = expert_index.shape[0] if isinstance(expert_index, torch.Tensor) and expert_index.dim() == 2 else -1
    check_routing(expert_index, slot, n_experts, capacity, N, device, where=where)
    if gate is not None and gate.shape != expert_index.shape:
        raise ValueError(f"{where}: gate must have expert_index's shape (N, k) = {tuple(expert_index.shape)}, got "
                         f"{tuple(gate.shape)}")
    kept = slot >= 0
    cols = (expert_index.long() * capacity + slot.long()).clamp_min(0)  # dropped choices: value 0 at column 0
    values = kept.to(dtype) if gate is None else gate * kept
    d = torch.zeros(N, n_experts * capacity, dtype=dtype, device=device).scatter_add(1, cols, values)
    return d.view(N, n_experts, capacity)


def moe_dispatch_einsum(x, expert_index, slot, n_experts, capacity):
    """Baseline (Mesh-TensorFlow, GShard): ``einsum("nec,nd->ecd", D, x)`` with the one-hot dispatch tensor D
    (:func:`dispatch_tensor`): a dense N·E·C·d matmul to move N·k·d numbers. Same result as :func:`moe_dispatch`."""
    check_dispatch(x, expert_index, slot, n_experts, capacity, where="moe_dispatch_einsum")
    d = dispatch_tensor(expert_index, slot, n_experts, capacity).to(x.dtype)
    return torch.einsum("nec,nd->ecd", d, x)


def moe_combine_einsum(expert_out, expert_index, slot, gate):
    """Baseline (Mesh-TensorFlow, GShard): ``einsum("nec,ecd->nd", G, expert_out)`` with the combine tensor
    G = dispatch tensor · gates. Same result as :func:`moe_combine`."""
    E, C, _, _, _ = check_combine(expert_out, expert_index, slot, gate, where="moe_combine_einsum")
    return torch.einsum("nec,ecd->nd", dispatch_tensor(expert_index, slot, E, C, gate=gate), expert_out)


def moe_dispatch_loop(x, expert_index, slot, n_experts, capacity):
    """Baseline: a Python loop over experts — select expert e's kept choices, ``index_put`` their token rows into
    its (C, d) buffer, stack the E buffers. Same result as :func:`moe_dispatch`."""
    check_dispatch(x, expert_index, slot, n_experts, capacity, where="moe_dispatch_loop")
    buffers = []
    kept = slot >= 0
    for e in range(n_experts):
        n, j = ((expert_index == e) & kept).nonzero(as_tuple=True)
        buffers.append(x.new_zeros(capacity, x.shape[1]).index_put((slot[n, j].long(),), x[n]))
    return torch.stack(buffers)


def moe_combine_loop(expert_out, expert_index, slot, gate):
    """Baseline: a Python loop over experts — for expert e's kept choices, ``index_add`` gate · its output rows
    into their tokens. Same result as :func:`moe_combine`."""
    E, C, d, N, _ = check_combine(expert_out, expert_index, slot, gate, where="moe_combine_loop")
    out = expert_out.new_zeros(N, d)
    kept = slot >= 0
    for e in range(E):
        n, j = ((expert_index == e) & kept).nonzero(as_tuple=True)
        out = out.index_add(0, n, gate[n, j].unsqueeze(1) * expert_out[e, slot[n, j].long()])
    return out


# --------------------------------------------------------------------------------------------------------------
# numba on the CPU: an owner map, then row copies in parallel (each row has one writer: no atomics)
# --------------------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _owner_kernel(expert_index, slot, capacity, owner):
    # owner[e·C + s] = n·k + j for the kept choice (n, j) in (e, s); −1 (set by the caller) for an unfilled row
    N, k = slot.shape
    for n in range(N):
        for j in range(k):
            s = slot[n, j]
            if s >= 0:
                owner[expert_index[n, j] * capacity + s] = n * k + j


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _gather_rows_kernel(owner, k, src, weight, out):
    # out[r] = weight[c] · src[c // k] for c = owner[r] ≥ 0, else a zero row; one job per buffer row
    R, d = out.shape
    for r in prange(R):
        o = out[r]
        c = owner[r]
        if c < 0:
            for i in range(d):
                o[i] = 0.0
        else:
            row = src[c // k]
            w = weight[c]
            for i in range(d):  # contiguous: LLVM vectorises the row copy
                o[i] = w * row[i]


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _combine_rows_kernel(expert_index, slot, capacity, weight, src, out):
    # out[n] = Σ_{j kept} weight[n, j] · src[e·C + s]; one job per token
    N, d = out.shape
    k = slot.shape[1]
    for n in prange(N):
        o = out[n]
        first = True
        for j in range(k):
            s = slot[n, j]
            if s < 0:
                continue
            row = src[expert_index[n, j] * capacity + s]
            w = weight[n, j]
            if first:  # the first kept choice writes the row: no zero-fill pass
                for i in range(d):
                    o[i] = w * row[i]
                first = False
            else:
                for i in range(d):
                    o[i] += w * row[i]
        if first:  # every choice dropped: the layer outputs 0 (the residual carries x)
            for i in range(d):
                o[i] = 0.0


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _gate_grad_kernel(expert_index, slot, capacity, dy, src, dgate):
    # dgate[n, j] = ⟨dy[n], src[e·C + s]⟩ for a kept choice, 0 for a dropped one; one job per token
    N, d = dy.shape
    k = slot.shape[1]
    for n in prange(N):
        g = dy[n]
        for j in range(k):
            s = slot[n, j]
            if s < 0:
                dgate[n, j] = 0.0
            else:
                row = src[expert_index[n, j] * capacity + s]
                acc = 0.0
                for i in range(d):
                    acc += g[i] * row[i]
                dgate[n, j] = acc


def _np(t):
    return t.detach().contiguous().numpy()


def _ones(slot, dtype, device=None):
    return torch.ones(slot.shape, dtype=dtype, device=device)  # the weights of an unweighted movement


def _dispatch_numba(src, expert_index, slot, n_experts, capacity, weight=None):
    """(E, C, d) buffers of ``src`` rows (scaled by ``weight`` (N, k) if given)."""
    d = src.shape[1]
    out = torch.empty(n_experts, capacity, d, dtype=src.dtype)
    owner = np.full(n_experts * capacity, -1, dtype=np.int64)
    _owner_kernel(_np(expert_index), _np(slot), capacity, owner)
    w = _ones(slot, src.dtype) if weight is None else weight
    _gather_rows_kernel(owner, slot.shape[1], _np(src), _np(w).reshape(-1), out.numpy().reshape(-1, d))
    return out


def _combine_numba(src, expert_index, slot, capacity, weight=None):
    """(N, d): Σ over each token's kept choices of (weight ·) src rows; ``src`` (E, C, d)."""
    d = src.shape[-1]
    out = torch.empty(slot.shape[0], d, dtype=src.dtype)
    w = _ones(slot, src.dtype) if weight is None else weight
    _combine_rows_kernel(_np(expert_index), _np(slot), capacity, _np(w), _np(src).reshape(-1, d), out.numpy())
    return out


def moe_dispatch_numba(x, expert_index, slot, *, n_experts, capacity, **_):
    """numba forward of the dispatch: ``(buffers, aux)``; one parallel job per buffer row."""
    out = _dispatch_numba(x, expert_index, slot, n_experts, capacity)
    return out, out.new_empty(0)


def moe_dispatch_backward_numba(x, out, aux, dout, expert_index, slot, *, n_experts, capacity, **_):
    """numba backward of the dispatch: ``(∂L/∂x,)`` — a combine of ∂L/∂buffers with gates 1."""
    return (_combine_numba(dout, expert_index, slot, capacity),)


def moe_combine_numba(expert_out, gate, expert_index, slot, **_):
    """numba forward of the combine: ``(y, aux)``; one parallel job per token."""
    out = _combine_numba(expert_out, expert_index, slot, expert_out.shape[1], gate)
    return out, out.new_empty(0)


def moe_combine_backward_numba(expert_out, gate, out, aux, dout, expert_index, slot, *, need_expert_out_grad=True,
                               need_gate_grad=True, **_):
    """numba backward of the combine: ``(∂L/∂expert_out, ∂L/∂gate)`` — a dispatch of ∂L/∂y scaled by the gates,
    and one dot product per kept choice; None where not needed."""
    E, C, d = expert_out.shape
    dexp = dgate = None
    if need_expert_out_grad:
        dexp = _dispatch_numba(dout, expert_index, slot, E, C, gate)
    if need_gate_grad:
        dgate = torch.empty_like(gate)
        _gate_grad_kernel(_np(expert_index), _np(slot), C, _np(dout), _np(expert_out).reshape(-1, d),
                          dgate.numpy())
    return dexp, dgate


# --------------------------------------------------------------------------------------------------------------
# numba.cuda: one block per buffer row (dispatch) or per token (combine), threads over d
# --------------------------------------------------------------------------------------------------------------


@cached_kernels
def _make_cuda_kernels(np_dtype, NT=CUDA_THREADS):
    """The CUDA kernels for one float dtype and block size ``NT`` (a power of two: the tree reduction halves it)."""
    from numba import float32, float64

    nb_dtype = float32 if np_dtype == np.float32 else float64
    ZERO = nb_dtype(0.0)

    @cuda.jit
    def gather_rows(owner, src, weight, out, k):
        # block r: out[r, :] = weight[c] · src[c // k, :] for c = owner[r] ≥ 0, else zeros; thread t: t, t + NT, …
        r = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = out.shape[1]
        c = owner[r]
        i = t
        if c < 0:
            while i < d:
                out[r, i] = ZERO
                i += NT
        else:
            n = c // k
            w = weight[c]
            while i < d:
                out[r, i] = w * src[n, i]  # coalesced read of one token row, coalesced write of one buffer row
                i += NT

    @cuda.jit
    def combine_rows(expert_index, slot, weight, src, out, capacity):
        # block n: out[n, :] = Σ_{j kept} weight[n, j] · src[e·C + s, :]
        n = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = out.shape[1]
        k = slot.shape[1]
        i = t
        while i < d:
            acc = ZERO
            for j in range(k):
                s = slot[n, j]
                if s >= 0:
                    acc += weight[n, j] * src[expert_index[n, j] * capacity + s, i]
            out[n, i] = acc
            i += NT

    @cuda.jit
    def gate_grad(expert_index, slot, dy, src, dgate, capacity):
        # block c = n·k + j: dgate[n, j] = ⟨dy[n], src[e·C + s]⟩ — strided partial sums over d, then a tree
        # reduction in shared memory
        c = cuda.blockIdx.x
        t = cuda.threadIdx.x
        k = slot.shape[1]
        n = c // k
        j = c - n * k
        s = slot[n, j]
        d = dy.shape[1]
        part = cuda.shared.array(NT, nb_dtype)
        acc = ZERO
        if s >= 0:
            row = expert_index[n, j] * capacity + s
            i = t
            while i < d:
                acc += dy[n, i] * src[row, i]
                i += NT
        part[t] = acc
        cuda.syncthreads()
        h = NT // 2
        while h > 0:
            if t < h:
                part[t] += part[t + h]
            cuda.syncthreads()
            h //= 2
        if t == 0:
            dgate[n, j] = part[0]

    return gather_rows, combine_rows, gate_grad


def _threads(threads):
    return CUDA_THREADS if threads is None else threads


def _owner_torch(expert_index, slot, n_experts, capacity):
    """The owner map with tensor ops (on the routing's device): row e·C + s → n·k + j, −1 where unfilled."""
    owner = torch.full((n_experts * capacity,), -1, dtype=torch.int64, device=slot.device)
    _, choice, rows = _kept_rows(expert_index, slot, capacity)
    return owner.index_copy(0, rows, choice)


def _cuda_gather(src, expert_index, slot, n_experts, capacity, weight, threads):
    d = src.shape[1]
    out = torch.zeros(n_experts, capacity, d, dtype=src.dtype, device=src.device)
    if d == 0:
        return out
    gather_rows, _, _ = _make_cuda_kernels(np_dtype_of(src.dtype), threads)
    owner = _owner_torch(expert_index, slot, n_experts, capacity)
    w = _ones(slot, src.dtype, src.device) if weight is None else weight.detach()
    cuda_launch(gather_rows, n_experts * capacity, threads,
                (owner, src.detach().contiguous(), w.contiguous().view(-1), out.view(-1, d)), (slot.shape[1],))
    return out


def _cuda_combine(src, expert_index, slot, capacity, weight, threads):
    d = src.shape[-1]
    N = slot.shape[0]
    out = torch.zeros(N, d, dtype=src.dtype, device=src.device)
    if d == 0 or N == 0:
        return out
    _, combine_rows, _ = _make_cuda_kernels(np_dtype_of(src.dtype), threads)
    w = _ones(slot, src.dtype, src.device) if weight is None else weight.detach()
    cuda_launch(combine_rows, N, threads, (expert_index.contiguous(), slot.contiguous(), w.contiguous(),
                                           src.detach().contiguous().view(-1, d), out), (capacity,))
    return out


def moe_dispatch_cuda(x, expert_index, slot, *, n_experts, capacity, threads=None, **_):
    """numba.cuda forward of the dispatch: ``(buffers, aux)``; CUDA tensors (CPU tensors under the simulator)."""
    out = _cuda_gather(x, expert_index, slot, n_experts, capacity, None, _threads(threads))
    return out, out.new_empty(0)


def moe_dispatch_backward_cuda(x, out, aux, dout, expert_index, slot, *, n_experts, capacity, threads=None, **_):
    """numba.cuda backward of the dispatch: ``(∂L/∂x,)`` — a combine of ∂L/∂buffers with gates 1."""
    return (_cuda_combine(dout, expert_index, slot, capacity, None, _threads(threads)),)


def moe_combine_cuda(expert_out, gate, expert_index, slot, *, threads=None, **_):
    """numba.cuda forward of the combine: ``(y, aux)``."""
    out = _cuda_combine(expert_out, expert_index, slot, expert_out.shape[1], gate, _threads(threads))
    return out, out.new_empty(0)


def moe_combine_backward_cuda(expert_out, gate, out, aux, dout, expert_index, slot, *, threads=None,
                              need_expert_out_grad=True, need_gate_grad=True, **_):
    """numba.cuda backward of the combine: ``(∂L/∂expert_out, ∂L/∂gate)``; None where not needed."""
    nt = _threads(threads)
    E, C, d = expert_out.shape
    dexp = dgate = None
    if need_expert_out_grad:
        dexp = _cuda_gather(dout, expert_index, slot, E, C, gate, nt)
    if need_gate_grad:
        dgate = torch.zeros_like(gate)
        if gate.numel() > 0:
            _, _, gate_grad = _make_cuda_kernels(np_dtype_of(gate.dtype), nt)
            cuda_launch(gate_grad, gate.numel(), nt, (expert_index.contiguous(), slot.contiguous(),
                                                       dout.contiguous(), expert_out.detach().contiguous().view(-1, d),
                                                       dgate), (C,))
    return dexp, dgate


# --------------------------------------------------------------------------------------------------------------
# the public entry points
# --------------------------------------------------------------------------------------------------------------

MOE_DISPATCH_FORWARD = {"torch": moe_dispatch_torch, "numba": moe_dispatch_numba, "cuda": moe_dispatch_cuda}
MOE_DISPATCH_BACKWARD = {"torch": None, "numba": moe_dispatch_backward_numba, "cuda": moe_dispatch_backward_cuda}
MOE_COMBINE_FORWARD = {"torch": moe_combine_torch, "numba": moe_combine_numba, "cuda": moe_combine_cuda}
MOE_COMBINE_BACKWARD = {"torch": None, "numba": moe_combine_backward_numba, "cuda": moe_combine_backward_cuda}


def moe_dispatch(x, expert_index, slot, n_experts, capacity, *, backend="auto", check_indices=True):
    """Tokens to per-expert buffers: ``x (N, d)`` → ``buffers (E, C, d)`` with ``buffers[e, s] = x[n]`` for every
    choice (n, j) with ``expert_index[n, j] = e`` and ``slot[n, j] = s ≥ 0``; slot −1 = dropped; other rows 0.

    ``expert_index``, ``slot``: integer tensors (N, k) (from ``top_k_route(..., return_slots=True)``), k ≥ 1;
    ``n_experts`` E ≥ 1, ``capacity`` C ≥ 1. Differentiable w.r.t. ``x`` (the gradient gathers the buffers'
    gradient back and sums it over each token's k choices). ``backend``: ``"auto"`` (cuda on a real GPU, numba for
    float32/float64 on the CPU, torch otherwise), ``"numba"``, ``"cuda"``, ``"torch"`` (any float dtype).
    ``check_indices=False`` skips the O(N·k) check of the index values (for a routing already checked).
    """
    where = "moe_dispatch"
    check_dispatch(x, expert_index, slot, n_experts, capacity, where=where, check_indices=check_indices)
    name = resolve_backend(backend, x.device, x.dtype, where)
    out, _ = apply_kernel(MOE_DISPATCH_FORWARD[name], MOE_DISPATCH_BACKWARD[name], (x,), (expert_index, slot),
                          n_experts=int(n_experts), capacity=int(capacity))
    return out


def moe_combine(expert_out, expert_index, slot, gate, *, backend="auto", check_indices=True):
    """Per-expert outputs back to the tokens: ``expert_out (E, C, d)`` → ``y (N, d)`` with
    ``y[n] = Σ_j [slot[n, j] ≥ 0] · gate[n, j] · expert_out[expert_index[n, j], slot[n, j]]`` (0 for a token whose
    choices were all dropped).

    ``gate`` (N, k): same dtype and device as ``expert_out``. Differentiable w.r.t. ``expert_out`` (gate · ∂L/∂y
    scattered to each kept choice's row) and ``gate`` (⟨∂L/∂y_n, expert_out[e, s]⟩; 0 for dropped choices).
    ``backend`` and ``check_indices`` as in :func:`moe_dispatch`.
    """
    where = "moe_combine"
    check_combine(expert_out, expert_index, slot, gate, where=where, check_indices=check_indices)
    name = resolve_backend(backend, expert_out.device, expert_out.dtype, where)
    options = {}
    if name != "torch":
        options.update(need_expert_out_grad=expert_out.requires_grad, need_gate_grad=gate.requires_grad)
    out, _ = apply_kernel(MOE_COMBINE_FORWARD[name], MOE_COMBINE_BACKWARD[name], (expert_out, gate),
                          (expert_index, slot), **options)
    return out


__all__ = ["moe_dispatch", "moe_combine", "moe_dispatch_einsum", "moe_combine_einsum", "moe_dispatch_loop",
           "moe_combine_loop", "dispatch_tensor", "check_routing", "check_dispatch", "check_combine",
           "moe_dispatch_torch", "moe_combine_torch", "moe_dispatch_numba", "moe_dispatch_backward_numba",
           "moe_combine_numba", "moe_combine_backward_numba", "moe_dispatch_cuda", "moe_dispatch_backward_cuda",
           "moe_combine_cuda", "moe_combine_backward_cuda", "MOE_DISPATCH_FORWARD", "MOE_DISPATCH_BACKWARD",
           "MOE_COMBINE_FORWARD", "MOE_COMBINE_BACKWARD", "INDEX_DTYPES", "CUDA_THREADS"]
