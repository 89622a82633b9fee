"""Chapter 19 — memory-efficient *exact* attention: tiling, the online softmax, and recomputation in backward.

Rabe & Staats (2021, "Self-attention does not need O(n²) memory") and Dao et al. (2022, FlashAttention; Dao 2023,
FlashAttention-2) compute exactly ``softmax(q kᵀ / √d) v`` — no approximation, unlike chapters 15–18 — without
ever storing the n×n matrix of scores, in the forward *or* the backward pass:

* **Forward**: the online softmax (Milakov & Gimelshein 2018). Sweep key tiles, keep a running maximum m and a
  running normaliser l per query row, and rescale what was accumulated whenever the maximum grows. The only
  thing saved for backward, besides q, k, v and the output, is the per-row log-sum-exp ``lse = m + log l``.
* **Backward**: recompute each tile of weights from the saved lse, ``p_ij = exp(s_ij − lse_i)``, and use the
  softmax-backward identity ``dS_ij = p_ij (dP_ij − δ_i)`` with ``δ_i = dout_i · out_i``. More arithmetic
  (the weights are computed again: 5 tile products per tile pair in one sweep, 7 in FlashAttention-2's two
  sweeps, against the textbook backward's 4 — :data:`TILE_PRODUCTS`), far less memory: O(n·d) instead of O(n²).

On a GPU the win is also *time*: the n×n matrix never travels between the large slow memory (HBM) and the small
fast one (SRAM), and at these sizes attention is bound by that traffic, not by FLOPs. :func:`traffic_bytes` is
the simple IO model of the FlashAttention paper, which the notebook sets against measured time vs block size.

The kernels themselves live in ``effedu/kernels/tiled_attention.py`` (torch reference, numba, numba.cuda, forward
and backward); ``effedu.kernels.attention`` is the differentiable entry point. This module adds the registered
attention ``"memory_efficient"``, a step-by-step online softmax to look at, the IO and memory models, and the
chapter's numbers.
"""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .._checks import check_positive_int
from .dense import tiled_attention

# The registered variant (``"memory_efficient"`` in effedu.attention.BUILTIN) is the chapter-01 "tiled" attention,
# differentiable on every backend since this chapter.
memory_efficient_attention = tiled_attention


def online_softmax_trace(scores, block_size):
    """The online softmax of one row of scores, one key block at a time, for the learner to inspect.

    ``scores``: 1-D tensor. Returns a list of dicts, one per block: ``{"block": (j0, j1), "m": running max,
    "l": running normaliser, "alpha": rescale factor applied to what was accumulated}``; the last entry's
    ``m + log l`` is ``logsumexp(scores)``.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"online_softmax_trace: scores must be a non-empty 1-D tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    check_positive_int(block_size, "block_size", "online_softmax_trace")
    m, l, steps = -math.inf, 0.0, []
    for j0 in range(0, scores.numel(), block_size):
        blk = scores[j0:j0 + block_size].double()
        # m_new = max(m, max_j s_j);  α = exp(m − m_new);  l = α l + Σ_j exp(s_j − m_new)
        m_new = max(m, blk.max().item())
        alpha = math.exp(m - m_new) if m > -math.inf else 0.0
        l = alpha * l + torch.exp(blk - m_new).sum().item()
        m = m_new
        steps.append({"block": (j0, j0 + blk.numel()), "m": m, "l": l, "alpha": alpha})
    return steps


def traffic_bytes(n, d, *, block_size=None, itemsize=4, method="tiled", causal=False, backward=False):
    """Bytes moved between slow memory (HBM / RAM) and fast memory (SRAM / cache) by one head's attention.

    The IO model of Dao et al. (2022, §3.2), counted element by element:

    * ``method="standard"`` (materialise S and P, as ``softmax_attention`` does): forward reads Q, K and writes S
      (2nd + n²), reads S and writes P (2n²), reads P, V and writes O (n² + 2nd) → ``4n² + 4nd``. Backward reads
      P, dO, V, Q, K and writes dP, dS, dQ, dK, dV → ``7n² + 8nd`` (dV = Pᵀ dO: n² + 2nd; dP = dO Vᵀ: n² + 2nd;
      dS = P∘(dP − δ): 3n²; dQ = dS K: n² + 2nd; dK = dSᵀ Q: n² + 2nd).
    * ``method="tiled"``: forward reads Q once, writes O and lse once, and reads K and V once per query tile →
      ``2nd + n + 2nd·⌈n/b⌉``. Backward (two sweeps): per key tile all of Q, dO, lse, δ, and per query tile all
      of K, V, plus each input and gradient once → ``2nd·⌈n/b⌉ + (2nd + 2n)·⌈n/b⌉ + 7nd + 2n``.
    With ``causal=True`` the tiled sweeps skip the tiles above the diagonal: the per-tile terms are halved (the
    standard path still computes the full matrix).
    """
    for name, val in (("n", n), ("d", d), ("itemsize", itemsize)):
        check_positive_int(val, name, "traffic_bytes")
    if method not in ("tiled", "standard"):
        raise ValueError(f"traffic_bytes: method must be 'tiled' or 'standard', got {method!r}")
    if method == "standard":
        elems = 4 * n * n + 4 * n * d + ((7 * n * n + 8 * n * d) if backward else 0)
        return elems * itemsize
    if block_size is None:
        raise ValueError("traffic_bytes: method='tiled' needs block_size (queries and keys per tile)")
    check_positive_int(block_size, "block_size", "traffic_bytes")
    tiles = math.ceil(n / block_size)
    share = (tiles + 1) / (2 * tiles) if causal else 1.0  # tiles on or below the diagonal
    elems = 2 * n * d + n + share * 2 * n * d * tiles
    if backward:
        elems += share * (2 * n * d + (2 * n * d + 2 * n)) * tiles + 7 * n * d + 2 * n
    return int(round(elems * itemsize))


def fast_memory_bytes(block_size, d, *, itemsize=4, backward=False):
    """Working set that must fit in fast memory (SRAM / L1–L2 cache) for one tile step.

    Forward: a Q tile, a K and a V tile, the b×b score tile and the output accumulator (+ 2 row vectors).
    Backward (key sweep): a K, V, dK, dV tile, a Q and dO tile, the score and dP tiles (+ 2 row vectors).
    ``itemsize``: bytes per element — 2 for the float16/bfloat16 tiles FlashAttention runs on (its float32
    accumulators live in registers, which this model leaves out), 4 for float32.
    """
    check_positive_int(block_size, "block_size", "fast_memory_bytes")
    check_positive_int(d, "d", "fast_memory_bytes")
    b = block_size
    elems = (6 * b * d + 2 * b * b + 2 * b) if backward else (4 * b * d + b * b + 2 * b)
    return elems * itemsize


def saved_for_backward_bytes(B, H, n, d, *, method="tiled", itemsize=4):
    """What attention saves for backward beyond q, k, v: the output and lse (tiled), or also the n×n weights."""
    for name, val in (("B", B), ("H", H), ("n", n), ("d", d), ("itemsize", itemsize)):
        check_positive_int(val, name, "saved_for_backward_bytes")
    if method not in ("tiled", "standard"):
        raise ValueError(f"saved_for_backward_bytes: method must be 'tiled' or 'standard', got {method!r}")
    per_head = n * d + n if method == "tiled" else n * d + n * n
    return B * H * per_head * itemsize


# Tile products: the b×b×d matrix products done per (query tile, key tile) pair, attention's unit of arithmetic.
#   forward                     S = Q Kᵀ, O += P V                                                              2
#   backward, textbook          P was stored: dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q                      4
#   backward, one sweep         recompute S = Q Kᵀ, then the four above (``attention_backward_torch``)           5
#   backward, two sweeps (FA-2) key sweep: S, dV, dP, dK; query sweep: S, dP, dQ (the numba and CUDA kernels)   7
TILE_PRODUCTS = {"forward": 2, "textbook": 4, "one_sweep": 5, "two_sweeps": 7}

# fast memory of the GPUs the chapter names: shared memory (SRAM) per streaming multiprocessor
H200_SHARED_MEMORY_BYTES = 228 * 2**10


def tile_products(method="two_sweeps", *, backward=True):
    """Tile products per (query tile, key tile) pair: ``backward=False`` → the forward's 2; otherwise the backward's
    for ``method`` ``"textbook"`` (4, P stored), ``"one_sweep"`` (5, S recomputed once: the torch backend) or
    ``"two_sweeps"`` (7, S recomputed in each sweep: FlashAttention-2, the numba and CUDA backends)."""
    if method not in ("textbook", "one_sweep", "two_sweeps"):
        raise ValueError(f"tile_products: method must be 'textbook', 'one_sweep' or 'two_sweeps', got {method!r}")
    if not isinstance(backward, bool):
        raise TypeError(f"tile_products: backward must be a bool, got {type(backward).__name__}")
    return TILE_PRODUCTS[method] if backward else TILE_PRODUCTS["forward"]


class _CountMatmuls(TorchDispatchMode):
    # a dispatch mode sees every aten op, the backward's included (a torch-function mode misses autograd's calls)
    _PRODUCTS = ("aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self._PRODUCTS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_matmuls(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` and count the matrix products torch executes for it (aten ``mm``/``bmm``/
    ``addmm``/``baddbmm``), its backward passes included. Returns ``(result, count)``. Sees torch ops only: the
    numba kernels' products count 0."""
    if not callable(fn):
        raise TypeError(f"count_matmuls: fn must be callable, got {type(fn).__name__}")
    with _CountMatmuls() as mode:
        result = fn(*args, **kwargs)
    return result, mode.count


def largest_block_that_fits(d, fast_bytes, *, itemsize=2, backward=True, blocks=(16, 32, 64, 128, 256, 512, 1024)):
    """The largest block size in ``blocks`` whose working set (:func:`fast_memory_bytes`) fits in ``fast_bytes``
    of fast memory, or ``None`` if none does."""
    check_positive_int(fast_bytes, "fast_bytes", "largest_block_that_fits")
    fits = [b for b in blocks if fast_memory_bytes(b, d, itemsize=itemsize, backward=backward) <= fast_bytes]
    return max(fits) if fits else None


def fwd_bwd(fn, q, k, v, dout):
    """One forward + backward through ``fn(q, k, v)``: returns ``(out, (dq, dk, dv))`` (inputs need no grad)."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), grads


__all__ = ["memory_efficient_attention", "online_softmax_trace", "traffic_bytes", "fast_memory_bytes",
           "saved_for_backward_bytes", "fwd_bwd", "TILE_PRODUCTS", "H200_SHARED_MEMORY_BYTES", "tile_products",
           "count_matmuls", "largest_block_that_fits"]
