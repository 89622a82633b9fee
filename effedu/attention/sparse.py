"""Chapter 15 — sparse attention with fixed patterns (survey §4.1 (a)).

Because of the softmax's exponential only a few keys get large weights in each row, so one may *decide in
advance* which (query, key) pairs to compute and set every other score to −∞ (weight 0):

    out_i = Σ_{j ∈ A(i)} softmax_j(q_i · k_j / √d) v_j ,       A(i) = the keys query i may see

A(i) is a **pattern**, fixed before training. This module builds the classic ones, each as a **token mask**
``(T, S)`` (``mask[i, j] = j ∈ A(i)``) and as a **block layout** ``(⌈T/b⌉, ⌈S/b⌉)`` (a block kept if any pair in
it is), the form a kernel can exploit (``effedu.kernels.block_sparse_attention``):

* ``local`` — a sliding window of w tokens centred on the query: |i − j| ≤ ⌊w/2⌋ (Longformer's convention: w is
  the window's total width). O(n·w).
* ``strided`` — Sparse Transformer (Child et al. 2019), stride s ≈ √n: i sees j if |i − j| < s (the local part)
  or (i − j) mod s = 0 (the strided part). Any two positions are two hops apart. O(n√n): an interior query sees
  (2s − 1) + (n/s − 1) ≈ 3√n keys in this bidirectional form (s | n); causally, query i sees s + ⌊i/s⌋ ≤ ≈ 2√n.
* ``fixed`` — Sparse Transformer's other factorisation: i sees j if they lie in the same block of s positions
  (⌊i/s⌋ = ⌊j/s⌋) or j is one of the c "summary" positions at the end of every block (j mod s ≥ s − c):
  s + c(n/s − 1) keys per query (s | n), ≈ 2√n for c = 1.
* ``longformer`` — Beltagy et al. (2020): a window of w (optionally *dilated*: every d-th token, reaching d times
  further for the same cost) plus **global tokens** that attend to and from every position. Between any two
  positions the longest path is then 2 (through a global token). O(n·w).
* ``bigbird`` — Zaheer et al. (2020), in blocks of b: a window of w blocks, g global blocks and r **random**
  blocks per query block (seeded). Random edges make the graph an expander: few hops between any two positions.
* ``blockwise`` — BlockBERT (Qiu et al. 2020): split the sequence into blocks of b with full attention inside
  each; head h may look at a *shifted* block instead (key block (I + shift_h) mod n), which lets heads exchange
  information between blocks. O(n²/n_blocks).

The survey's list goes on (§4.1 (a)); these four complete it:

* ``star`` — Star-Transformer (Guo et al. 2019): a **ring** (i sees i − 1, i, i + 1) plus one **relay** that sees
  and is seen by every position: 4 keys per query (the relay: all n), any two positions 2 hops apart. In the paper
  the relay is a separate node, updated in its own step from all the satellites; here it is token 0.
* ``cascade`` — Cascade Transformer ("Transformer on a Diet", Wang et al. 2020): a local window whose width grows
  exponentially with the layer index, w_l = w₀ · growth^l (``cascade_window``). Not a new attention: ``local`` with
  one ``attention_kwargs`` dict per layer (``cascade_attention_kwargs``); after L layers the reach is
  ⌊w₀/2⌋(2^L − 1) positions for growth 2 (integer half-windows) instead of L⌊w₀/2⌋.
* ``logsparse`` — LogSparse Transformer (Li et al. 2019), for time series: query i sees itself and i − 2^k for
  k = 0, 1, … (causal): ⌊log₂ i⌋ + 2 keys for i ≥ 1, one for i = 0. ``symmetric=True`` also adds i + 2^k (a
  bidirectional variant of ours, not in the paper). O(n log n) per layer; the paper stacks ⌈log₂ n⌉ layers
  to connect every pair (O(n log² n)).
* ``blockbert`` — BlockBERT (Qiu et al. 2020) as the paper writes it: head h maps query block I to key block
  π_h(I) for a per-head **permutation** π_h of the blocks (identity: block diagonal; a shift: the next block);
  ``blockwise`` above is the special case of shifts.

The registered attention functions (``TransformerConfig(attention="local", attention_kwargs={"window": 32})``)
compute one of these patterns in one of two ways:

* the **masked-dense reference** (``block_size=None`` for token patterns, or ``backend="torch"``): the full T×S
  score matrix, then ``masked_fill(−∞)`` — exact, and exactly as slow and as big as dense attention;
* the **block-sparse kernel** (``block_size=b`` with ``backend="auto" | "numba" | "cuda"``): only the kept blocks
  are computed. A token pattern is then rounded *up* to whole blocks (its covering layout, ``mask_to_layout``):
  a few extra keys per query, which is what real block-sparse kernels do (Sparse Transformer, BigBird, DeepSpeed).

``receptive_field`` / ``hop_distance`` count how many layers information needs to travel between two positions
(the residual path lets a position keep what it has). ``BENCHMARKS["sparse"]`` measures masked-dense vs the
block-sparse kernel vs dense SDPA — the hardware lottery in one table.
"""
from __future__ import annotations

import functools

import torch

from .._checks import check_mask, check_positive_int, check_qkv
from ..kernels.block_sparse import block_grid, block_sparse_attention, check_layout, layout_to_mask
from . import register
from .dense import softmax_attention

TOKEN_PATTERNS = ("local", "strided", "fixed", "longformer", "star", "logsparse")  # defined token by token
BLOCK_PATTERNS = ("bigbird", "blockwise", "blockbert")  # defined block by block (token mask = expanded layout)
PATTERNS = TOKEN_PATTERNS + BLOCK_PATTERNS


# --------------------------------------------------------------------------------------------------------------
# token patterns as predicates on (query index i, key index j), broadcasting
# --------------------------------------------------------------------------------------------------------------


def _local(i, j, *, window):
    # |i − j| ≤ ⌊w/2⌋
    return (i - j).abs() <= window // 2


def _strided(i, j, *, stride):
    d = i - j
    # |i − j| < s  (local)   or   (i − j) mod s = 0  (strided)
    return (d.abs() < stride) | (torch.remainder(d, stride) == 0)


def _fixed(i, j, *, stride, summary):
    # same block ⌊i/s⌋ = ⌊j/s⌋   or   j is a summary position: j mod s ≥ s − c
    return (torch.div(i, stride, rounding_mode="floor") == torch.div(j, stride, rounding_mode="floor")) | (
        torch.remainder(j, stride) >= stride - summary
    )


def _longformer(i, j, *, window, dilation, glob_q, glob_k):
    d = i - j
    # dilated window: |i − j| ≤ ⌊w/2⌋·dil and (i − j) mod dil = 0
    allowed = (d.abs() <= (window // 2) * dilation) & (torch.remainder(d, dilation) == 0)
    # global tokens attend to everything and are attended by everything
    if glob_q is not None:
        allowed = allowed | glob_q[i] | glob_k[j]
    return allowed


def _star(i, j):
    # ring |i − j| ≤ 1   or   the relay (position 0) on either side
    return ((i - j).abs() <= 1) | (i == 0) | (j == 0)


def _logsparse(i, j, *, symmetric):
    d = i - j
    if symmetric:
        d = d.abs()
    # i − j = 0, or i − j = 2^k (k ≥ 0): a positive power of two has one bit set, d & (d − 1) = 0
    return (d == 0) | ((d > 0) & (torch.bitwise_and(d, d - 1) == 0))


def _predicate(name, T, S, p, device=None):
    """The pattern as a function ``allowed(i, j)`` of broadcastable index tensors."""
    if name == "star":
        return _star
    if name == "logsparse":
        return functools.partial(_logsparse, symmetric=p["symmetric"])
    if name == "local":
        return functools.partial(_local, window=p["window"])
    if name == "strided":
        return functools.partial(_strided, stride=p["stride"])
    if name == "fixed":
        return functools.partial(_fixed, stride=p["stride"], summary=p["summary"])
    g = p["global_tokens"]
    glob_q = glob_k = None
    if g:
        glob_q = torch.zeros(T, dtype=torch.bool, device=device)
        glob_k = torch.zeros(S, dtype=torch.bool, device=device)
        glob_q[[x for x in g if x < T]] = True
        glob_k[[x for x in g if x < S]] = True
    return functools.partial(_longformer, window=p["window"], dilation=p["dilation"], glob_q=glob_q, glob_k=glob_k)


def _freeze(params):
    return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in params.items()))


@functools.lru_cache(maxsize=64)
def _token_mask_cached(name, T, S, frozen):
    p = dict(frozen)
    allowed = _predicate(name, T, S, p)
    i = torch.arange(T).view(T, 1)
    j = torch.arange(S).view(1, S)
    return allowed(i, j)


@functools.lru_cache(maxsize=64)
def _token_layout_cached(name, T, S, block_size, frozen):
    """The covering layout of a token pattern, computed a band of query blocks at a time (never the T×S mask)."""
    p = dict(frozen)
    allowed = _predicate(name, T, S, p)
    nT, nS = block_grid(T, S, block_size)
    b = block_size
    layout = torch.zeros(nT, nS, dtype=torch.bool)
    j = torch.arange(nS * b).view(1, nS * b)
    jpad = j >= S  # padding columns of the last key block: never allowed
    rows_per_band = max(1, (1 << 22) // (b * nS * b))
    for r0 in range(0, nT, rows_per_band):
        r1 = min(nT, r0 + rows_per_band)
        i = torch.arange(r0 * b, r1 * b).view(-1, 1)
        ok = allowed(i.clamp(max=T - 1), j.clamp(max=S - 1)) & ~jpad & (i < T)
        # a block is kept iff any (i, j) inside it is allowed                       (r1 − r0, nS)
        layout[r0:r1] = ok.view(r1 - r0, b, nS, b).any(dim=3).any(dim=1)
    return layout


# --------------------------------------------------------------------------------------------------------------
# block patterns: layouts first
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _block_layout_cached(name, nT, nS, frozen):
    p = dict(frozen)
    I = torch.arange(nT).view(nT, 1)
    J = torch.arange(nS).view(1, nS)
    if name == "blockbert":
        # head h: query block I sees key block π_h(I); an int π is the shift I ↦ (I + π) mod nS
        lays = []
        for perm in p["permutations"]:
            target = torch.remainder(I + perm, nS) if isinstance(perm, int) else torch.tensor(perm).view(-1, 1)[:nT]
            lays.append(J == target)
        return torch.stack(lays)
    if name == "blockwise":
        shifts = p["shift"] if isinstance(p["shift"], tuple) else (p["shift"],)
        # head h: query block I sees key block (I + shift_h) mod nS  (shift 0: block diagonal)
        lay = torch.stack([J == torch.remainder(I + s, nS) for s in shifts])
        return lay if isinstance(p["shift"], tuple) else lay[0]
    # bigbird: window of w blocks (|I − J| ≤ ⌊w/2⌋) + g global blocks (rows and columns) + r random blocks per row
    base = ((I - J).abs() <= p["window_blocks"] // 2) | (I < p["global_blocks"]) | (J < p["global_blocks"])
    gen = torch.Generator().manual_seed(p["seed"])
    n_heads = p["heads"] or 1
    lays = []
    for _ in range(n_heads):
        lay = base.clone()
        r = min(p["random_blocks"], nS)
        if r > 0:
            # r distinct key blocks per query block, drawn among those not kept yet (uniform keys; kept → −1)
            u = torch.rand(nT, nS, generator=gen).masked_fill(base, -1.0)
            val, idx = u.topk(r, dim=1)
            lay.scatter_(1, idx, val >= 0)
            lay |= base
        lays.append(lay)
    return torch.stack(lays) if p["heads"] is not None else lays[0]


# --------------------------------------------------------------------------------------------------------------
# public: masks and layouts
# --------------------------------------------------------------------------------------------------------------


def pattern_mask(name, T, *, S=None, block_size=None, **params):
    """The token mask ``(T, S)`` of a pattern (``(H, T, S)`` for per-head block patterns); True = may attend.

    Token patterns (``local``, ``strided``, ``fixed``, ``longformer``) are exact; block patterns (``bigbird``,
    ``blockwise``) need ``block_size`` and are their layout expanded to tokens.
    """
    where = "pattern_mask"
    name = _check_name(name, where)
    T, S = _lengths(T, S, where)
    if name in TOKEN_PATTERNS:
        if block_size is not None:
            raise TypeError(f"{where}: pattern {name!r} is defined token by token and takes no block_size; use "
                            f"pattern_layout(name, T, block_size, ...) for its block layout")
        p = _check_token_params(name, T, S, params, where)
        return _token_mask_cached(name, T, S, _freeze(p)).clone()
    if block_size is None:
        raise TypeError(f"{where}: pattern {name!r} is defined in blocks: give block_size=")
    return layout_to_mask(pattern_layout(name, T, block_size, S=S, **params), block_size, T, S)


def pattern_layout(name, T, block_size, *, S=None, **params):
    """The block layout ``(⌈T/b⌉, ⌈S/b⌉)`` of a pattern (``(H, ·, ·)`` for per-head patterns), True = block kept.

    For token patterns: the smallest layout covering the exact mask (computed band by band, never the T×S mask).
    """
    where = "pattern_layout"
    name = _check_name(name, where)
    T, S = _lengths(T, S, where)
    check_positive_int(block_size, "block_size", where)
    if name in TOKEN_PATTERNS:
        p = _check_token_params(name, T, S, params, where)
        return _token_layout_cached(name, T, S, block_size, _freeze(p)).clone()
    p = _check_block_params(name, params, where)
    nT, nS = block_grid(T, S, block_size)
    if name == "blockbert":
        for h, perm in enumerate(p["permutations"]):
            if not isinstance(perm, int) and len(perm) != nS:
                raise ValueError(f"{where}: permutations[{h}] must be a permutation of the {nS} key blocks "
                                 f"(range({nS})), got {len(perm)} entries")
            if not isinstance(perm, int) and nT > nS:
                raise ValueError(f"{where}: an explicit permutation needs nT ≤ nS blocks, got {nT} query and "
                                 f"{nS} key blocks; use an int shift instead")
    return _block_layout_cached(name, nT, nS, _freeze(p)).clone()


def local_mask(T, window, *, S=None):
    """|i − j| ≤ ⌊window/2⌋: a window of ``window`` tokens centred on the query."""
    return pattern_mask("local", T, S=S, window=window)


def local_layout(T, block_size, window, *, S=None):
    return pattern_layout("local", T, block_size, S=S, window=window)


def strided_mask(T, stride, *, S=None):
    """Sparse Transformer, strided: |i − j| < stride or (i − j) mod stride = 0."""
    return pattern_mask("strided", T, S=S, stride=stride)


def strided_layout(T, block_size, stride, *, S=None):
    return pattern_layout("strided", T, block_size, S=S, stride=stride)


def fixed_mask(T, stride, *, summary=1, S=None):
    """Sparse Transformer, fixed: same block of ``stride`` positions, or j among the last ``summary`` of a block."""
    return pattern_mask("fixed", T, S=S, stride=stride, summary=summary)


def fixed_layout(T, block_size, stride, *, summary=1, S=None):
    return pattern_layout("fixed", T, block_size, S=S, stride=stride, summary=summary)


def longformer_mask(T, window, *, dilation=1, global_tokens=0, S=None):
    """Longformer: dilated window (|i − j| ≤ ⌊w/2⌋·d, (i − j) mod d = 0) + global tokens (int g = the first g)."""
    return pattern_mask("longformer", T, S=S, window=window, dilation=dilation, global_tokens=global_tokens)


def longformer_layout(T, block_size, window, *, dilation=1, global_tokens=0, S=None):
    return pattern_layout("longformer", T, block_size, S=S, window=window, dilation=dilation,
                          global_tokens=global_tokens)


def bigbird_layout(T, block_size, *, window_blocks=3, global_blocks=1, random_blocks=1, seed=0, heads=None, S=None):
    """BigBird: window of ``window_blocks`` blocks + ``global_blocks`` global blocks + ``random_blocks`` random key
    blocks per query block (drawn with ``seed``; ``heads=H`` draws them independently per head → (H, nT, nS))."""
    return pattern_layout("bigbird", T, block_size, S=S, window_blocks=window_blocks, global_blocks=global_blocks,
                          random_blocks=random_blocks, seed=seed, heads=heads)


def bigbird_mask(T, block_size, *, window_blocks=3, global_blocks=1, random_blocks=1, seed=0, heads=None, S=None):
    return pattern_mask("bigbird", T, S=S, block_size=block_size, window_blocks=window_blocks,
                        global_blocks=global_blocks, random_blocks=random_blocks, seed=seed, heads=heads)


def blockwise_layout(T, block_size, *, shift=0, S=None):
    """BlockBERT: query block I sees key block (I + shift) mod n_blocks; a sequence of shifts → one per head."""
    return pattern_layout("blockwise", T, block_size, S=S, shift=shift)


def blockwise_mask(T, block_size, *, shift=0, S=None):
    return pattern_mask("blockwise", T, S=S, block_size=block_size, shift=shift)


def star_mask(T, *, S=None):
    """Star-Transformer: ring |i − j| ≤ 1, plus the relay, token 0, which sees and is seen by every position.

    (Guo et al. 2019 update the relay as a separate node in its own step; here it is simply position 0.)"""
    return pattern_mask("star", T, S=S)


def star_layout(T, block_size, *, S=None):
    return pattern_layout("star", T, block_size, S=S)


def logsparse_mask(T, *, symmetric=False, S=None):
    """LogSparse (Li et al. 2019): query i sees j = i and j = i − 2^k, k = 0, 1, … (causal by construction):
    ⌊log₂ i⌋ + 2 keys for i ≥ 1, one for i = 0 (T = S). ``symmetric=True`` also adds j = i + 2^k."""
    return pattern_mask("logsparse", T, S=S, symmetric=symmetric)


def logsparse_layout(T, block_size, *, symmetric=False, S=None):
    return pattern_layout("logsparse", T, block_size, S=S, symmetric=symmetric)


def blockbert_layout(T, block_size, *, permutations=None, heads=None, S=None):
    """BlockBERT (Qiu et al. 2020), per head: query block I attends key block π_h(I) → ``(H, nT, nS)``.

    ``permutations``: one entry per head, each an int (the shift I ↦ (I + shift) mod nS; 0 is the block-diagonal
    identity) or a sequence (π(0), …, π(nS − 1)), a permutation of the key blocks. ``None``: ``heads`` heads
    (default 2) with shifts 0, 1, … — identity for head 0, the next block for head 1, and so on."""
    return pattern_layout("blockbert", T, block_size, S=S, permutations=permutations, heads=heads)


def blockbert_mask(T, block_size, *, permutations=None, heads=None, S=None):
    return pattern_mask("blockbert", T, S=S, block_size=block_size, permutations=permutations, heads=heads)


def cascade_window(layer, base_window, growth=2):
    """Cascade Transformer ("Transformer on a Diet", Wang et al. 2020): layer ``layer`` (0-based) uses a local
    window of ``base_window · growth**layer`` tokens — exponentially wider with depth."""
    where = "cascade_window"
    _nonneg_int(layer, "layer", where)
    check_positive_int(base_window, "base_window", where)
    check_positive_int(growth, "growth", where)
    return base_window * growth ** layer


def cascade_mask(T, layer, *, base_window=4, growth=2, S=None):
    """The local mask of layer ``layer`` (0-based) of a Cascade Transformer: ``local_mask(T, cascade_window(...))``."""
    return local_mask(T, cascade_window(layer, base_window, growth), S=S)


def cascade_attention_kwargs(n_layers, base_window, growth=2, **extra):
    """One ``attention_kwargs`` dict per layer for ``TransformerConfig(attention="local", attention_kwargs=...)``:
    ``[{"window": w₀}, {"window": w₀·g}, {"window": w₀·g²}, …]`` (``extra``, e.g. ``block_size``, in each)."""
    check_positive_int(n_layers, "n_layers", "cascade_attention_kwargs")
    return [dict(extra, window=cascade_window(layer, base_window, growth)) for layer in range(n_layers)]


def mask_to_layout(mask, block_size):
    """The smallest block layout covering a token mask: block (I, J) kept iff any pair in it is allowed.

    ``mask`` ``(..., T, S)`` bool → ``(..., ⌈T/b⌉, ⌈S/b⌉)``; ``layout_to_mask(mask_to_layout(m, b), b, T, S) ⊇ m``,
    with equality exactly when m is made of whole blocks.
    """
    where = "mask_to_layout"
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{where}: mask must be a bool tensor (..., T, S), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.dim() < 2:
        raise ValueError(f"{where}: mask must have at least 2 dims (..., T, S), got shape {tuple(mask.shape)}")
    check_positive_int(block_size, "block_size", where)
    *lead, T, S = mask.shape
    nT, nS = block_grid(T, S, block_size)
    b = block_size
    # pad to whole blocks with False, then "any" over each b×b square
    padded = torch.zeros(*lead, nT * b, nS * b, dtype=torch.bool, device=mask.device)
    padded[..., :T, :S] = mask
    return padded.view(*lead, nT, b, nS, b).any(dim=-1).any(dim=-2)


def density(mask_or_layout):
    """Fraction of True entries (kept pairs, or kept blocks)."""
    if not isinstance(mask_or_layout, torch.Tensor) or mask_or_layout.dtype != torch.bool:
        raise TypeError(f"density: expected a bool tensor (a mask or a layout), got "
                        f"{getattr(mask_or_layout, 'dtype', type(mask_or_layout).__name__)}")
    return float(mask_or_layout.float().mean())


# --------------------------------------------------------------------------------------------------------------
# the plain masked-dense reference
# --------------------------------------------------------------------------------------------------------------


def masked_attention(q, k, v, mask, *, causal=False, scale=None, return_weights=False):
    """The plain reference: dense scores ``(B, H, T, S)``, then ``masked_fill(−∞)`` outside ``mask``, softmax.

    ``mask``: bool, broadcastable to ``(B, H, T, S)`` (a ``(T, S)`` pattern, or ``(H, T, S)`` per head). Every
    score is computed and most are thrown away: O(T·S) time and memory whatever the sparsity.
    """
    return softmax_attention(q, k, v, mask=mask, causal=causal, scale=scale, return_weights=return_weights)


# --------------------------------------------------------------------------------------------------------------
# registered attention functions
# --------------------------------------------------------------------------------------------------------------


def _pattern_attention(name, q, k, v, *, causal, mask, scale, block_size, backend, return_weights, params):
    where = f"{name}_attention"
    B, H, T, S, D, _ = check_qkv(q, k, v, where=where)
    if not isinstance(backend, str):
        raise TypeError(f"{where}: backend must be a str, got {type(backend).__name__}")
    if name in TOKEN_PATTERNS and block_size is None:
        # the exact token pattern, through the masked-dense reference
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"{where}: backend={backend!r} needs block_size= (the kernel works on blocks); without block_size "
                f"the exact token pattern is computed densely (backend 'auto' or 'torch')"
            )
        pm = pattern_mask(name, T, S=S, **params).to(q.device)
        dense_path = True
    else:
        if block_size is None:
            raise TypeError(f"{where}: block_size must be an int, got None")
        layout = pattern_layout(name, T, block_size, S=S, **params)
        check_layout(layout, block_size, T, S, H, where)
        dense_path = backend == "torch" or mask is not None or return_weights
        if dense_path and backend not in ("auto", "torch"):
            raise ValueError(
                f"{where}: mask= and return_weights=True need the dense masked path (backend 'torch' or 'auto'); "
                f"the block-sparse kernel (backend={backend!r}) takes neither"
            )
        if dense_path:
            pm = layout_to_mask(layout.to(q.device), block_size, T, S)
        else:
            return block_sparse_attention(q, k, v, layout, block_size=block_size, causal=causal, scale=scale,
                                          backend=backend)
    if mask is not None:
        m = check_mask(mask, B, H, T, S, where=where)
        pm = m & pm
    return softmax_attention(q, k, v, mask=pm, causal=causal, scale=scale, return_weights=return_weights)


@register("local")
def local_attention(q, k, v, *, causal=False, mask=None, scale=None, window=32, block_size=None, backend="auto",
                    return_weights=False):
    """Sliding-window attention, |i − j| ≤ ⌊window/2⌋. ``block_size=None``: exact, masked-dense; ``block_size=b``:
    the covering block layout through the block-sparse kernel (``backend``)."""
    return _pattern_attention("local", q, k, v, causal=causal, mask=mask, scale=scale, block_size=block_size,
                              backend=backend, return_weights=return_weights, params=dict(window=window))


@register("strided")
def strided_attention(q, k, v, *, causal=False, mask=None, scale=None, stride=16, block_size=None, backend="auto",
                      return_weights=False):
    """Sparse Transformer strided pattern (see ``strided_mask``); ``block_size`` as in ``local_attention``."""
    return _pattern_attention("strided", q, k, v, causal=causal, mask=mask, scale=scale, block_size=block_size,
                              backend=backend, return_weights=return_weights, params=dict(stride=stride))


@register("fixed")
def fixed_attention(q, k, v, *, causal=False, mask=None, scale=None, stride=16, summary=1, block_size=None,
                    backend="auto", return_weights=False):
    """Sparse Transformer fixed pattern (see ``fixed_mask``); ``block_size`` as in ``local_attention``."""
    return _pattern_attention("fixed", q, k, v, causal=causal, mask=mask, scale=scale, block_size=block_size,
                              backend=backend, return_weights=return_weights,
                              params=dict(stride=stride, summary=summary))


@register("longformer")
def longformer_attention(q, k, v, *, causal=False, mask=None, scale=None, window=32, dilation=1, global_tokens=1,
                         block_size=None, backend="auto", return_weights=False):
    """Longformer: dilated sliding window + global tokens (see ``longformer_mask``); ``block_size`` as in
    ``local_attention``."""
    return _pattern_attention("longformer", q, k, v, causal=causal, mask=mask, scale=scale, block_size=block_size,
                              backend=backend, return_weights=return_weights,
                              params=dict(window=window, dilation=dilation, global_tokens=global_tokens))


@register("bigbird")
def bigbird_attention(q, k, v, *, causal=False, mask=None, scale=None, block_size=16, window_blocks=3,
                      global_blocks=1, random_blocks=1, seed=0, per_head=False, backend="auto", return_weights=False):
    """BigBird in blocks of ``block_size``: window + global + seeded random blocks (``per_head=True``: independent
    random blocks per head). Block-sparse kernel by default; ``backend="torch"`` is the masked-dense reference."""
    H = q.shape[1] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    params = dict(window_blocks=window_blocks, global_blocks=global_blocks, random_blocks=random_blocks, seed=seed,
                  heads=H if per_head else None)
    return _pattern_attention("bigbird", q, k, v, causal=causal, mask=mask, scale=scale, block_size=block_size,
                              backend=backend, return_weights=return_weights, params=params)


@register("blockwise")
def blockwise_attention(q, k, v, *, causal=False, mask=None, scale=None, block_size=32, shift=0, backend="auto",
                        return_weights=False):
    """BlockBERT: full attention inside blocks of ``block_size`` (``shift``: an int, or one per head)."""
    return _pattern_attention("blockwise", q, k, v, causal=causal, mask=mask, scale=scale, block_size=block_size,
                              backend=backend, return_weights=return_weights, params=dict(shift=shift))


@register("star")
def star_attention(q, k, v, *, causal=False, mask=None, scale=None, block_size=None, backend="auto",
                   return_weights=False):
    """Star-Transformer: ring of neighbours + relay token 0 (see ``star_mask``); ``block_size`` as in
    ``local_attention``."""
    return _pattern_attention("star", q, k, v, causal=causal, mask=mask, scale=scale, block_size=block_size,
                              backend=backend, return_weights=return_weights, params={})


@register("logsparse")
def logsparse_attention(q, k, v, *, causal=False, mask=None, scale=None, symmetric=False, block_size=None,
                        backend="auto", return_weights=False):
    """LogSparse: itself and exponentially spaced earlier positions (see ``logsparse_mask``); ``block_size`` as in
    ``local_attention``."""
    return _pattern_attention("logsparse", q, k, v, causal=causal, mask=mask, scale=scale, block_size=block_size,
                              backend=backend, return_weights=return_weights, params=dict(symmetric=symmetric))


@register("blockbert")
def blockbert_attention(q, k, v, *, causal=False, mask=None, scale=None, block_size=32, permutations=None,
                        backend="auto", return_weights=False):
    """BlockBERT with one block permutation per head (see ``blockbert_layout``; ``None``: head h shifts by h).
    Block-sparse kernel by default; ``backend="torch"`` is the masked-dense reference."""
    H = q.shape[1] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    params = dict(permutations=permutations, heads=H if permutations is None else None)
    return _pattern_attention("blockbert", q, k, v, causal=causal, mask=mask, scale=scale, block_size=block_size,
                              backend=backend, return_weights=return_weights, params=params)


@register("block_sparse")
def block_sparse(q, k, v, *, layout, block_size, causal=False, mask=None, scale=None, backend="auto",
                 return_weights=False):
    """Attention over any block layout (``effedu.kernels.block_sparse_attention``); ``mask``/``return_weights``
    take the masked-dense path (``backend="torch"``)."""
    where = "block_sparse"
    B, H, T, S, D, _ = check_qkv(q, k, v, where=where)
    lay = check_layout(layout, block_size, T, S, H, where)
    if mask is None and not return_weights:
        return block_sparse_attention(q, k, v, layout, block_size=block_size, causal=causal, scale=scale,
                                      backend=backend)
    if backend not in ("auto", "torch"):
        raise ValueError(f"{where}: mask= and return_weights=True need backend 'torch' or 'auto', got {backend!r}")
    pm = layout_to_mask(lay.to(q.device), block_size, T, S).unsqueeze(0)
    if mask is not None:
        pm = check_mask(mask, B, H, T, S, where=where) & pm
    return softmax_attention(q, k, v, mask=pm, causal=causal, scale=scale, return_weights=return_weights)


# --------------------------------------------------------------------------------------------------------------
# receptive field across layers
# --------------------------------------------------------------------------------------------------------------


def receptive_field(mask, layers, *, causal=False):
    """``R[i, j]`` = True if, after ``layers`` attention layers with this mask, position i has information from j.

    One layer moves information along the mask's edges (j → i when mask[i, j]); the residual path keeps what a
    position had, so  R₀ = I,  R_{l+1} = (M ∨ I) R_l  (boolean matrix product).
    """
    where = "receptive_field"
    T = _check_square(mask, where)
    _nonneg_int(layers, "layers", where)
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    m = mask & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril() if causal else mask
    step = (m | eye).float()
    reach = eye.float()
    for _ in range(layers):
        # R_{l+1}[i, j] = ∃ k: M[i, k] ∧ R_l[k, j]
        reach = ((step @ reach) > 0).float()
    return reach.bool()


def stacked_receptive_field(masks, *, causal=False):
    """``receptive_field`` through layers with *different* masks (one per layer, the first applied first), e.g.
    a Cascade Transformer's growing windows: R₀ = I, R_{l+1} = (M_l ∨ I) R_l."""
    where = "stacked_receptive_field"
    if isinstance(masks, torch.Tensor) or not isinstance(masks, (list, tuple)) or not masks:
        raise TypeError(f"{where}: masks must be a non-empty list of (T, T) bool masks, one per layer, got "
                        f"{type(masks).__name__}")
    T = _check_square(masks[0], where)
    reach = torch.eye(T, dtype=torch.bool, device=masks[0].device)
    for m in masks:
        if _check_square(m, where) != T:
            raise ValueError(f"{where}: every layer's mask must be ({T}, {T}), got {tuple(m.shape)}")
        # R_{l+1}[i, j] = ∃ k: (M_l ∨ I)[i, k] ∧ R_l[k, j]
        reach = (receptive_field(m, 1, causal=causal).float() @ reach.float()) > 0
    return reach


def hop_distance(mask, *, causal=False, max_layers=None):
    """``(T, T)`` int64: the fewest layers after which position i has information from j (0 on the diagonal,
    −1 if never within ``max_layers``, default T)."""
    where = "hop_distance"
    T = _check_square(mask, where)
    max_layers = T if max_layers is None else _nonneg_int(max_layers, "max_layers", where)
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    m = mask & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril() if causal else mask
    step = (m | eye).float()
    hops = torch.full((T, T), -1, dtype=torch.int64, device=mask.device)
    hops[eye] = 0
    reach = eye.float()
    for layer in range(1, max_layers + 1):
        new = (step @ reach) > 0
        fresh = new & (hops < 0)
        if not fresh.any():
            break
        hops[fresh] = layer
        reach = new.float()
    return hops


def hops_to(mask, i, *, causal=False, max_layers=None):
    """``(T,)`` int64: the fewest layers for information at each position j to reach position ``i`` (−1: never
    within ``max_layers``, default T). One breadth-first sweep backwards from i: O(T²) per layer, not O(T³)."""
    where = "hops_to"
    T = _check_square(mask, where)
    _nonneg_int(i, "i", where)
    if i >= T:
        raise ValueError(f"{where}: i must be < T={T}, got {i}")
    max_layers = T if max_layers is None else _nonneg_int(max_layers, "max_layers", where)
    m = mask & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril() if causal else mask
    dist = torch.full((T,), -1, dtype=torch.int64, device=mask.device)
    dist[i] = 0
    frontier = torch.zeros(T, dtype=torch.bool, device=mask.device)
    frontier[i] = True
    for layer in range(1, max_layers + 1):
        # positions the frontier reads from: k with M[a, k] for some a in the frontier
        fresh = m[frontier].any(dim=0) & (dist < 0)
        if not fresh.any():
            break
        dist[fresh] = layer
        frontier = fresh
    return dist


def hops(mask, i, j, *, causal=False):
    """Fewest layers for information at position ``j`` to reach position ``i`` (None if it never does)."""
    T = _check_square(mask, "hops")
    for name, x in (("i", i), ("j", j)):
        _nonneg_int(x, name, "hops")
        if x >= T:
            raise ValueError(f"hops: {name} must be < T={T}, got {x}")
    h = int(hop_distance(mask, causal=causal)[i, j])
    return None if h < 0 else h


# --------------------------------------------------------------------------------------------------------------
# plumbing: the input checks the functions above call
# --------------------------------------------------------------------------------------------------------------


def _nonneg_int(value, name, where):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{where}: {name} must be ≥ 0, got {value}")
    return value


def _lengths(T, S, where):
    check_positive_int(T, "T", where)
    S = T if S is None else S
    check_positive_int(S, "S", where)
    return T, S


def _global_positions(global_tokens, where):
    """``global_tokens``: an int g (the first g positions, like [CLS]) or a sequence of positions → a tuple."""
    if isinstance(global_tokens, bool):
        raise TypeError(f"{where}: global_tokens must be an int or a sequence of ints, got a bool")
    if isinstance(global_tokens, int):
        _nonneg_int(global_tokens, "global_tokens", where)
        return tuple(range(global_tokens))
    if isinstance(global_tokens, torch.Tensor):
        global_tokens = global_tokens.tolist()
    try:
        pos = tuple(global_tokens)
    except TypeError:
        raise TypeError(
            f"{where}: global_tokens must be an int or a sequence of ints, got {type(global_tokens).__name__}"
        ) from None
    for p in pos:
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(f"{where}: global_tokens must hold positions ≥ 0, got {p!r}")
    return tuple(sorted(set(pos)))


def _check_token_params(name, T, S, params, where):
    """Validate a token pattern's parameters; return them normalised (as the predicate takes them)."""
    p = dict(params)
    if name == "local":
        _only(p, {"window"}, name, where)
        check_positive_int(p.setdefault("window", 32), "window", where)
    elif name == "strided":
        _only(p, {"stride"}, name, where)
        check_positive_int(p.setdefault("stride", 16), "stride", where)
    elif name == "fixed":
        _only(p, {"stride", "summary"}, name, where)
        check_positive_int(p.setdefault("stride", 16), "stride", where)
        check_positive_int(p.setdefault("summary", 1), "summary", where)
        if p["summary"] > p["stride"]:
            raise ValueError(f"{where}: summary must be ≤ stride={p['stride']}, got {p['summary']}")
    elif name == "longformer":
        _only(p, {"window", "dilation", "global_tokens"}, name, where)
        check_positive_int(p.setdefault("window", 32), "window", where)
        check_positive_int(p.setdefault("dilation", 1), "dilation", where)
        g = _global_positions(p.setdefault("global_tokens", 0), where)
        if g and g[-1] >= max(T, S):
            raise ValueError(f"{where}: global token position {g[-1]} is outside the sequence (T={T}, S={S})")
        p["global_tokens"] = g
    elif name == "star":
        _only(p, set(), name, where)
    elif name == "logsparse":
        _only(p, {"symmetric"}, name, where)
        if not isinstance(p.setdefault("symmetric", False), bool):
            raise TypeError(f"{where}: symmetric must be a bool, got {type(p['symmetric']).__name__}")
    return p


def _only(params, allowed, name, where):
    extra = set(params) - allowed
    if extra:
        raise TypeError(
            f"{where}: unexpected parameter(s) {', '.join(sorted(map(repr, extra)))} for pattern {name!r}; "
            f"expected some of {', '.join(sorted(allowed))}"
        )


def _check_block_params(name, params, where):
    p = dict(params)
    if name == "bigbird":
        _only(p, {"window_blocks", "global_blocks", "random_blocks", "seed", "heads"}, name, where)
        check_positive_int(p.setdefault("window_blocks", 3), "window_blocks", where)
        _nonneg_int(p.setdefault("global_blocks", 1), "global_blocks", where)
        _nonneg_int(p.setdefault("random_blocks", 1), "random_blocks", where)
        _nonneg_int(p.setdefault("seed", 0), "seed", where)
        heads = p.setdefault("heads", None)
        if heads is not None:
            check_positive_int(heads, "heads", where)
    elif name == "blockwise":
        _only(p, {"shift"}, name, where)
        shift = p.setdefault("shift", 0)
        if isinstance(shift, (list, tuple)):
            if len(shift) == 0:
                raise ValueError(f"{where}: shift must be an int or a non-empty sequence (one per head), got []")
            for s in shift:
                _nonneg_int(s, "shift", where)
            p["shift"] = tuple(shift)
        else:
            _nonneg_int(shift, "shift", where)
    elif name == "blockbert":
        _only(p, {"permutations", "heads"}, name, where)
        perms, heads = p.get("permutations"), p.pop("heads", None)
        if heads is not None:
            check_positive_int(heads, "heads", where)
        if perms is None:
            p["permutations"] = tuple(range(2 if heads is None else heads))
        else:
            if isinstance(perms, torch.Tensor):
                perms = perms.tolist()
            if isinstance(perms, (int, str)) or not isinstance(perms, (list, tuple)) or len(perms) == 0:
                raise TypeError(f"{where}: permutations must be a non-empty sequence (one per head) of int shifts "
                                f"or block permutations, got {perms!r}")
            if heads is not None and heads != len(perms):
                raise ValueError(f"{where}: heads={heads} disagrees with the {len(perms)} permutations given")
            norm = []
            for h, perm in enumerate(perms):
                if isinstance(perm, torch.Tensor):
                    perm = perm.tolist()
                if isinstance(perm, int) and not isinstance(perm, bool):
                    _nonneg_int(perm, f"permutations[{h}]", where)
                    norm.append(perm)
                    continue
                if not isinstance(perm, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int)
                                                              for x in perm):
                    raise TypeError(f"{where}: permutations[{h}] must be an int shift or a sequence of block "
                                    f"indices, got {perm!r}")
                if sorted(perm) != list(range(len(perm))):
                    raise ValueError(f"{where}: permutations[{h}] must be a permutation of range({len(perm)}), "
                                     f"got {list(perm)}")
                norm.append(tuple(perm))
            p["permutations"] = tuple(norm)
    return p


def _check_name(name, where):
    if not isinstance(name, str):
        raise TypeError(f"{where}: pattern name must be a str, got {type(name).__name__}")
    if name not in PATTERNS:
        raise ValueError(f"{where}: unknown pattern {name!r}; expected one of {', '.join(PATTERNS)}")
    return name


def _check_square(mask, where):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(f"{where}: mask must be a 2-D bool tensor (T, T), got "
                        f"{(mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.shape[0] != mask.shape[1]:
        raise ValueError(f"{where}: self-attention needs a square mask (T, T), got {tuple(mask.shape)}")
    return mask.shape[0]


# benchmark: `python -m effedu.bench sparse` (effedu/bench/sparse.py)

__all__ = [
    "PATTERNS", "TOKEN_PATTERNS", "BLOCK_PATTERNS", "pattern_mask", "pattern_layout", "mask_to_layout",
    "layout_to_mask", "density", "local_mask", "local_layout", "strided_mask", "strided_layout",
    "fixed_mask", "fixed_layout", "longformer_mask", "longformer_layout", "bigbird_mask", "bigbird_layout",
    "blockwise_mask", "blockwise_layout", "masked_attention", "local_attention", "strided_attention",
    "fixed_attention", "longformer_attention", "bigbird_attention", "blockwise_attention", "block_sparse",
    "receptive_field", "hop_distance", "hops", "hops_to", "block_sparse_attention",
    "star_mask", "star_layout", "star_attention", "logsparse_mask", "logsparse_layout", "logsparse_attention",
    "blockbert_mask", "blockbert_layout", "blockbert_attention", "cascade_window", "cascade_mask",
    "cascade_attention_kwargs", "stacked_receptive_field",
]
