"""Chapter 17 — low-rank attention (survey §4.2a): Linformer, Nyströmformer, Synthesizer.

The n×n attention matrix A = softmax(Q Kᵀ / √d) costs O(n²) time and memory. If A is *approximately low rank*
— a few singular values carry almost all of it — a rank-k factorisation A ≈ L R (L: n×k, R: k×n) suffices, and
(L R) V = L (R V) costs O(n k d): linear in n for a fixed k. Three ways to get such a factorisation:

* **Linformer** (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity") projects the keys and
  values *along the sequence axis* with learned k×n matrices E and F::

      Attention(Q, K, V) ≈ softmax(Q (E K)ᵀ / √d) · (F V)              P̄ = softmax(·): n×k,  F V: k×d

  The attention matrix it implies is P̄ F (n×n, rank ≤ k). E and F can be shared across heads, between keys and
  values and across layers "with virtually no performance penalty" — the modes of :class:`SharedProjection`
  (chapter 04 counts what each saves and shares it across layers). Because every projected key (E K)_r = Σ_j E_rj K_j
  mixes *all* positions, a query sees the future through every one of them: **Linformer cannot be causal** (no
  mask on the n×k scores can remove a future token from a mixture), and asking for ``causal=True`` is an error.

* **Nyströmformer** (Xiong et al. 2021, "Nyströmformer: A Nyström-Based Algorithm for Approximating
  Self-Attention") applies the Nyström method (Williams & Seeger 2001) to the softmax matrix. m *landmarks* Q̃, K̃
  are the means of m consecutive segments of the queries and keys; then::

      A ≈ F̃ Ã⁺ B̃,   F̃ = softmax(Q K̃ᵀ/√d) (n×m),  Ã = softmax(Q̃ K̃ᵀ/√d) (m×m),  B̃ = softmax(Q̃ Kᵀ/√d) (m×n)

  and out = F̃ (Ã⁺ (B̃ V)) in O(n m d). Ã⁺ is the Moore–Penrose pseudo-inverse: exactly (``torch.linalg.pinv``,
  through an SVD: the reference), truncated (an SVD that drops the singular values below rtol·σ₁: a regularised
  inverse for a numerically singular Ã) or with the iteration of Razavi et al. (2014) the paper uses, only matrix
  products (GPU-friendly)::

      Z₀ = Ãᵀ / (‖Ã‖₁ ‖Ã‖∞),   Z_{j+1} = ¼ Z_j (13 I − Ã Z_j (15 I − Ã Z_j (7 I − Ã Z_j)))

  With as many landmarks as tokens, F̃ = Ã = B̃ = A and F̃ Ã⁺ B̃ = A A⁺ A = A: exact softmax attention. Segment
  means also mix future tokens: Nyström is not causal either.

* **Synthesizer** (Tay et al. 2021, "Synthesizer: Rethinking Self-Attention in Transformer Models") asks whether
  the query–key dot product is needed at all. *Dense*: each token synthesises its own row of scores with an MLP,
  B_i = W₂ ReLU(W₁ x_i + b₁) + b₂ ∈ ℝⁿ; *Random*: one learned (or fixed) n×n matrix R per head, the same for every
  input, optionally factorised R = R₁ R₂ᵀ (rank r). Then out = softmax(B) V. Still O(n²) — it is in this family
  because the (factorised) random variant is a low-rank, input-independent attention matrix. A row of B only
  depends on token i (dense) or on nothing (random), so a causal mask works: these two *can* be causal.

The yardstick for all of them is the **Eckart–Young theorem**: the best rank-k approximation of A in the
Frobenius (and spectral) norm is its truncated SVD, with error ‖A − A_k‖_F = (Σ_{i>k} σ_i²)^½. Linformer's P̄ F
and Nyström's F̃ Ã⁺ B̃ have rank ≤ k (≤ m), so no choice of E, F or landmarks can beat that bound
(:func:`best_rank_k_error`); the helpers ``*_attention_matrix`` give the n×n matrix each method implies, to
measure how close it gets.

Shapes are batch-first ``(B, H, T, D)`` as everywhere in ``effedu.attention``. Registered variants:
``"linformer"``, ``"synthesizer_dense"``, ``"synthesizer_random"`` (nn.Modules with parameters, built per layer
with ``cls(config)`` from ``config.attention_kwargs``) and ``"nystrom"`` (a function: it has no parameters).

Reading order: Linformer, Nyström, Synthesizer, the SVD yardstick, tools to look at the matrices; the input
checks every public function calls sit near the end of the file.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .._checks import FLOAT_DTYPES, check_bool, check_choice, check_mask, check_positive_int, check_qkv, check_scale
from . import register
from .dense import allowed_mask, masked_softmax, softmax_attention

PINV_METHODS = ("iterative", "exact", "truncated")
DEFAULT_PINV_RTOL = 1e-2  # truncated pinv: σ_i ≤ 1 % of σ₁ counts as 0 (chapter 17, §3, compares)
PROJECTION_MODES = ("none", "headwise", "key-value", "layerwise")  # Linformer's sharing of E and F


# --------------------------------------------------------------------------------------------------------------
# Linformer
# --------------------------------------------------------------------------------------------------------------


def _project(E, x):
    """E x along the sequence axis: E ``(1 or H, k, S)``, x ``(B, H, S, D)`` → ``(B, H, k, D)``."""
    if E.shape[0] == 1:
        # one matrix for every head: a single GEMM over all (batch, head, feature) columns
        return torch.einsum("rs,bhsd->bhrd", E[0], x)
    return torch.einsum("hrs,bhsd->bhrd", E, x)


def linformer_attention(q, k, v, E, F=None, *, causal=False, mask=None, scale=None, return_weights=False):
    """Linformer attention softmax(q (E k)ᵀ · scale) (F v) — O(T·k·D) — on ``(B, H, T, D)`` tensors.

    ``E``, ``F``: ``(k, n)`` (one for every head) or ``(H, k, n)``, n ≥ S (the first S columns are used); ``F=None``
    shares E between keys and values. ``return_weights=True`` also returns the ``(B, H, T, k)`` weights over the k
    projected keys (the implied ``(T, S)`` matrix is :func:`linformer_attention_matrix`).
    ``causal=True`` and ``mask`` raise ``ValueError``: the projection mixes every position, future ones included.
    """
    where = "linformer_attention"
    B, H, T, S, D, _ = check_qkv(q, k, v, where=where)
    scale = check_scale(scale, D, where)
    _not_causal(causal, "Linformer", _LINFORMER_WHY, where)
    _no_mask(mask, "Linformer", _PROJECTION_MASK_WHY, where)
    check_bool(return_weights, "return_weights", where)
    E = _check_projection(E, "E", H, S, q.dtype, q.device, where)
    F = E if F is None else _check_projection(F, "F", H, S, q.dtype, q.device, where)
    if F.shape[-2] != E.shape[-2]:
        raise ValueError(f"{where}: E and F must project to the same k, got {E.shape[-2]} and {F.shape[-2]}")
    # projected keys and values: (E K)_r = Σ_j E_rj K_j, (F V)_r = Σ_j F_rj V_j               (B, H, k, D)
    k_proj, v_proj = _project(E, k), _project(F, v)
    # P̄ = softmax(Q (E K)ᵀ · scale): each query's weights over k mixtures of keys              (B, H, T, k)
    # (the scale multiplies q — T×D numbers — rather than the T×k scores)
    weights = masked_softmax((q * scale) @ k_proj.transpose(-2, -1))
    # out = P̄ (F V)                                                                             (B, H, T, Dv)
    out = weights @ v_proj
    return (out, weights) if return_weights else out


def linformer_attention_matrix(q, k, E, F=None, *, scale=None):
    """The ``(B, H, T, S)`` matrix Linformer applies to V: P̄ F, rank ≤ k (out = P̄ F V = P̄ (F V))."""
    where = "linformer_attention_matrix"
    B, H, T, S, D, _ = check_qkv(q, k, k, where=where)
    E_s = _check_projection(E, "E", H, S, q.dtype, q.device, where)
    F_s = E_s if F is None else _check_projection(F, "F", H, S, q.dtype, q.device, where)
    _, weights = linformer_attention(q, k, k, E, F, scale=scale, return_weights=True)
    # A_Linformer = P̄ F                                                                         (B, H, T, S)
    return weights @ F_s


def linformer_reference(q, k, v, E, F=None, *, scale=None):
    """The plain O(T·S) form of Linformer, next to the efficient one: (P̄ F) V through the full T×S matrix."""
    # out = (P̄ F) V — the same numbers as P̄ (F V), with the n×n matrix formed first
    return linformer_attention_matrix(q, k, E, F, scale=scale) @ v


class SharedProjection(nn.Module):
    """The k×n sequence projections of a Linformer (E for keys, F for values, per head and layer), stored with
    the sharing ``mode`` of Wang et al. 2020, §4:

    ============  =========================================================  =============
    mode          which matrices are the same Parameter                       distinct
    ============  =========================================================  =============
    "none"        nothing                                                     2·L·H
    "headwise"    E_{l,h} = E_l, F_{l,h} = F_l for all heads h                2·L
    "key-value"   E_{l,h} = F_{l,h} = E_l                                     L
    "layerwise"   every E and F of every head and layer is one matrix E      1
    ============  =========================================================  =============

    :meth:`matrix` gives the Parameter for ``(layer, head, which)``; :meth:`project` applies a layer's matrices to
    per-head keys or values, ``(B, H, T, D) → (B, H, k, D)``. Initialised N(0, 1/n) so that E x keeps the scale
    of x, from ``seed`` (a fixed generator, independent of torch's global one). :class:`LinformerAttention` uses
    one per layer (or one for all layers); chapter 04 (:mod:`effedu.general.sharing`) counts the parameters of
    each mode in closed form.
    """

    def __init__(self, n_layers, n_heads, seq_len, k, mode="headwise", *, seed=0):
        super().__init__()
        where = "SharedProjection"
        self.n_layers = check_positive_int(n_layers, "n_layers", where)
        self.n_heads = check_positive_int(n_heads, "n_heads", where)
        self.seq_len = check_positive_int(seq_len, "seq_len", where)
        self.k = check_positive_int(k, "k", where)
        self.mode = check_choice(mode, PROJECTION_MODES, "mode", where)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{where}: seed must be a non-negative int, got {seed!r}")
        # which distinct matrix each (layer, head, which) uses
        self._slot = {}
        for layer in range(n_layers):
            for head in range(n_heads):
                for w, which in enumerate(("key", "value")):
                    self._slot[(layer, head, which)] = {
                        "none": (layer * n_heads + head) * 2 + w,
                        "headwise": layer * 2 + w,
                        "key-value": layer,
                        "layerwise": 0,
                    }[mode]
        # distinct matrices: 2·L·H, 2·L, L or 1 (chapter 04's linformer_projection_count checks this closed form)
        count = len(set(self._slot.values()))
        gen = torch.Generator().manual_seed(seed)
        # E ~ N(0, 1/n): each of the k outputs is a sum of n inputs, its variance stays that of one input
        self.matrices = nn.ParameterList(
            [nn.Parameter(torch.randn(k, seq_len, generator=gen) / math.sqrt(seq_len)) for _ in range(count)]
        )

    def _check_index(self, layer, head, which, where):
        for name, value, top in (("layer", layer, self.n_layers), ("head", head, self.n_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
            if not 0 <= value < top:
                raise ValueError(f"{where}: {name} must be in [0, {top}), got {value}")
        check_choice(which, ("key", "value"), "which", where)

    def matrix(self, layer, head, which):
        """The k×n Parameter used by ``layer``'s ``head`` for ``which`` = "key" (E) or "value" (F)."""
        self._check_index(layer, head, which, "SharedProjection.matrix")
        return self.matrices[self._slot[(layer, head, which)]]

    def project(self, x, layer, which):
        """E_{layer,h} x_h for every head h: x ``(B, H, T, D)`` with T ≤ n → ``(B, H, k, D)``.

        A sequence shorter than n is treated as zero-padded to n: E [x; 0] = E[:, :T] x.
        """
        where = "SharedProjection.project"
        self._check_index(layer, 0, which, where)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{where}: x must be a (B, H, T, D) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        B, H, T, D = x.shape
        if H != self.n_heads:
            raise ValueError(f"{where}: x has H={H} heads, the projections were made for n_heads={self.n_heads}")
        if not 1 <= T <= self.seq_len:
            raise ValueError(f"{where}: sequence length T={T} must be between 1 and seq_len={self.seq_len}")
        # the layer's H matrices (the same Parameter H times when heads share), first T columns  (H, k, T)
        E = torch.stack([self.matrix(layer, h, which)[:, :T] for h in range(H)]).to(x.dtype)
        # (E x)_h = E_h x_h : mix the T positions into k                                        (B, H, k, D)
        return torch.einsum("hkt,bhtd->bhkd", E, x)

    def extra_repr(self):
        return (f"n_layers={self.n_layers}, n_heads={self.n_heads}, seq_len={self.seq_len}, k={self.k}, "
                f"mode={self.mode!r}, matrices={len(self.matrices)}")


@register("linformer")
class LinformerAttention(nn.Module):
    """Linformer attention with learned k×n projections, registered as ``"linformer"`` (built with ``cls(config)``).

    ``config.attention_kwargs``:

    * ``rank`` — Linformer's k, the projected length, in [1, max_len] (default max_len // 4). (Not called ``k``:
      the model passes these keywords next to the keys ``k``.)
    * ``share`` — which projections are one Parameter, the modes of :class:`SharedProjection`: ``"none"`` (E, F per head), ``"headwise"`` (one E and one F
      for all heads, the default), ``"key-value"`` (E = F, shared by all heads), ``"layerwise"`` (one matrix for
      keys and values of every head *and every layer*: it needs ``projection=``, see below).
    * ``projection`` — a :class:`SharedProjection` object to use instead of making one; every layer given the same
      object shares its matrices (cross-layer sharing by identity, as in chapter 04). :func:`linformer_config`
      makes one for ``share="layerwise"``.
    * ``seed`` — initialisation seed (default: drawn from torch's generator, so layers differ).

    Sequences shorter than ``max_len`` use the first T columns of E and F (zero padding). ``config.causal=True``
    is refused at construction: Linformer cannot be causal (see the module docstring).
    """

    KWARGS = ("rank", "share", "projection", "seed")

    def __init__(self, config):
        super().__init__()
        where = "LinformerAttention"
        kw = dict(config.attention_kwargs)
        unknown = set(kw) - set(self.KWARGS)
        if unknown:
            raise TypeError(f"{where}: unknown attention_kwargs {sorted(unknown)}; expected some of {self.KWARGS}")
        _not_causal(config.causal, "Linformer", _LINFORMER_WHY + " (set TransformerConfig(causal=False))", where)
        n, H = config.max_len, config.n_heads
        rank = kw.get("rank", max(1, n // 4))
        _check_rank(rank, n, "rank", where, what="max_len")
        share = check_choice(kw.get("share", "headwise"), PROJECTION_MODES, "share", where)
        projection = kw.get("projection")
        if projection is None:
            if share == "layerwise":
                raise ValueError(f"{where}: share='layerwise' means one matrix for every layer, but each layer "
                                 f"builds its own module; pass one SharedProjection as attention_kwargs['projection'] "
                                 f"(linformer_config(config, rank, share='layerwise') does it) or call "
                                 f"tie_projections(model)")
            projection = SharedProjection(1, H, n, rank, share, seed=_check_seed(kw.get("seed"), where))
        elif not isinstance(projection, SharedProjection):
            raise TypeError(f"{where}: projection must be an effedu SharedProjection, got {type(projection).__name__}")
        elif (projection.n_heads, projection.seq_len, projection.k) != (H, n, rank) or projection.mode != share:
            raise ValueError(f"{where}: projection (n_heads={projection.n_heads}, seq_len={projection.seq_len}, "
                             f"k={projection.k}, mode={projection.mode!r}) does not match n_heads={H}, max_len={n}, "
                             f"rank={rank}, share={share!r}")
        self.n_heads, self.max_len, self.rank, self.share = H, n, rank, share
        self.projection = projection  # a submodule: shared objects are one set of Parameters

    def matrices(self, dtype=None):
        """This layer's ``(E, F)``: ``(k, n)`` each when all heads share one matrix, else ``(H, k, n)``."""
        p = self.projection
        out = []
        for which in ("key", "value"):
            mats = [p.matrix(0, h, which) for h in range(self.n_heads)]
            M = mats[0] if all(m is mats[0] for m in mats) else torch.stack(mats)
            out.append(M if dtype is None else M.to(dtype))
        return tuple(out)

    def _check_call(self, q, kwargs, where):
        unknown = set(kwargs) - set(self.KWARGS)
        if unknown:
            raise TypeError(f"{where}: unexpected keyword arguments {sorted(unknown)}")
        if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[2] > self.max_len:
            raise ValueError(f"{where}: sequence length T={q.shape[2]} exceeds max_len={self.max_len} (E and F "
                             f"have n={self.max_len} columns)")

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None, return_weights=False, **kwargs):
        # the model passes config.attention_kwargs again on every call: they were used at construction
        self._check_call(q, kwargs, "LinformerAttention")
        check_qkv(q, k, v, where="LinformerAttention")
        E, F = self.matrices(q.dtype)
        return linformer_attention(q, k, v, E, F, causal=causal, mask=mask, scale=scale,
                                   return_weights=return_weights)

    def attention_matrix(self, q, k, *, scale=None):
        """The ``(B, H, T, S)`` matrix P̄ F this layer applies to the values."""
        E, F = self.matrices(q.dtype)
        return linformer_attention_matrix(q, k, E, F, scale=scale)

    def extra_repr(self):
        return f"n_heads={self.n_heads}, max_len={self.max_len}, rank={self.rank}, share={self.share!r}"


def linformer_config(config, rank, share="headwise", *, seed=None):
    """A copy of ``config`` using Linformer attention with projected length ``rank`` and sharing mode ``share``
    (``causal`` set to False: Linformer is an encoder). For ``share="layerwise"`` one
    :class:`SharedProjection` is created and put in ``attention_kwargs``, so every layer of
    ``Transformer(linformer_config(...))`` uses the same k×n matrix.

    ``seed=None`` draws each layer's initialisation from torch's generator (reproducible after
    ``torch.manual_seed``, different per layer); an int gives every layer that seed (equal initial matrices).
    """
    where = "linformer_config"
    # any config with the TransformerConfig fields and .replace() (attention does not import the model)
    if not all(hasattr(config, a) for a in ("replace", "max_len", "n_heads")):
        raise TypeError(f"{where}: config must be a TransformerConfig, got {type(config).__name__}")
    _check_rank(rank, config.max_len, "rank", where, what="max_len")
    check_choice(share, PROJECTION_MODES, "share", where)
    kw = {"rank": rank, "share": share}
    if share == "layerwise":
        kw["projection"] = SharedProjection(1, config.n_heads, config.max_len, rank, "layerwise",
                                            seed=_check_seed(seed, where))
    elif seed is not None:
        kw["seed"] = _check_seed(seed, where)
    return config.replace(attention="linformer", attention_kwargs=kw, causal=False)


def tie_projections(model):
    """Make every :class:`LinformerAttention` of ``model`` use the first one's projections (in place; returns
    ``model``) — cross-layer sharing by module identity, like ``share_layers`` in chapter 04."""
    mods = [m for m in model.modules() if isinstance(m, LinformerAttention)]
    if not mods:
        raise ValueError(f"tie_projections: {type(model).__name__} has no LinformerAttention module")
    first = mods[0]
    for m in mods[1:]:
        if (m.n_heads, m.max_len, m.rank) != (first.n_heads, first.max_len, first.rank):
            raise ValueError("tie_projections: the Linformer layers have different shapes (n_heads, max_len, rank)")
        m.projection = first.projection
    return model


# --------------------------------------------------------------------------------------------------------------
# Nyströmformer
# --------------------------------------------------------------------------------------------------------------


def segment_boundaries(T, m):
    """Start offsets of m consecutive segments covering T positions: segment i = [⌊iT/m⌋, ⌊(i+1)T/m⌋).

    When m divides T every segment has T/m positions (the paper's setting); otherwise lengths differ by at most
    one — no padding is needed. Returns a list of m + 1 offsets.
    """
    where = "segment_boundaries"
    check_positive_int(T, "T", where)
    _check_rank(m, T, "landmarks", where, what="T")
    # b_i = ⌊i·T/m⌋, i = 0 … m
    return [(i * T) // m for i in range(m + 1)]


def segment_means(x, m):
    """The m landmarks of ``x (B, H, T, D)``: the mean of each of m consecutive segments → ``(B, H, m, D)``.

    T need not be a multiple of m (see :func:`segment_boundaries`). Computed as an averaging matrix
    M (m×T, M_it = 1/|segment i| on segment i) times x: O(m·T·D), differentiable.
    """
    where = "segment_means"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{where}: x must be a (B, H, T, D) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    T = x.shape[2]
    _check_rank(m, T, "landmarks", where, what="T")
    if T % m == 0:
        # equal segments: x̃_i = mean of x[iT/m : (i+1)T/m]                                    (B, H, m, D)
        return x.unflatten(2, (m, T // m)).mean(dim=3)
    b = segment_boundaries(T, m)
    M = torch.zeros(m, T, dtype=x.dtype, device=x.device)
    for i in range(m):
        M[i, b[i]:b[i + 1]] = 1.0 / (b[i + 1] - b[i])
    # x̃ = M x                                                                                   (B, H, m, D)
    return torch.einsum("it,bhtd->bhid", M, x)


def iterative_pinv(A, iters=6):
    """Moore–Penrose pseudo-inverse of ``A (…, m, m)`` by the iteration of Razavi et al. (2014), as in
    Nyströmformer: matrix products only, third-order convergence (the error e = 1 − λ of each eigenvalue λ of
    A Z becomes ¼ e³ (3 + e)).

        Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)         (‖A‖₁: largest column sum of |A|, ‖A‖∞: largest row sum)
        Z_{j+1} = ¼ Z_j (13 I − A Z_j (15 I − A Z_j (7 I − A Z_j)))

    Z₀ puts every eigenvalue of A Z₀ in (0, 1] (σ₁² ≤ ‖A‖₁‖A‖∞), so the iteration converges to A⁺; a singular
    value σ needs about log(‖A‖₁‖A‖∞ / σ²) / log(3.25) steps to be reached. (The paper's code takes the norms over
    the whole batch; here each matrix gets its own.) ``torch.linalg.pinv`` is the exact reference.

    Unlike ``pinv`` there is no cut-off for tiny singular values: for a *singular* A the iteration reaches A⁺ and
    then drifts away, because round-off in the null space grows by 13/4 per step. A softmax matrix Ã has positive
    entries and is nonsingular in practice; a few steps (the paper's 6) give a usable approximation, not A⁺ itself.
    """
    where = "iterative_pinv"
    _check_matrix(A, "A", where)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{where}: A must be square (…, m, m), got {tuple(A.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{where}: iters must be an int ≥ 0, got {iters!r}")
    I = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    # ‖A‖₁ ‖A‖∞ = (max column abs sum) · (max row abs sum)                                    (…, 1, 1)
    norm1 = A.abs().sum(-2).amax(-1, keepdim=True).unsqueeze(-1)
    norm_inf = A.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
    # Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)
    Z = A.transpose(-2, -1) / (norm1 * norm_inf).clamp_min(torch.finfo(A.dtype).tiny)
    for _ in range(iters):
        AZ = A @ Z
        # Z ← ¼ Z (13 I − AZ (15 I − AZ (7 I − AZ)))
        Z = 0.25 * Z @ (13 * I - AZ @ (15 * I - AZ @ (7 * I - AZ)))
    return Z


def _nystrom_parts(q, k, landmarks, scale, where):
    """F̃ (B,H,T,m), Ã (B,H,m,m), B̃ (B,H,m,S) of the Nyström approximation."""
    T, S = q.shape[2], k.shape[2]
    m = landmarks
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"{where}: landmarks must be an int, got {type(m).__name__}")
    if m <= 0 or m > min(T, S):
        raise ValueError(f"{where}: landmarks must be in [1, min(T, S)={min(T, S)}] (each landmark is the mean of "
                         f"≥ 1 token), got {m}")
    # queries scaled once (T×D numbers) instead of three score matrices
    q = q * scale
    # landmarks: segment means of the (scaled) queries and of the keys                         (B, H, m, D)
    q_l, k_l = segment_means(q, m), segment_means(k, m)
    # F̃ = softmax(Q K̃ᵀ · scale)                                                                (B, H, T, m)
    f = masked_softmax(q @ k_l.transpose(-2, -1))
    # Ã = softmax(Q̃ K̃ᵀ · scale)                                                                (B, H, m, m)
    a = masked_softmax(q_l @ k_l.transpose(-2, -1))
    # B̃ = softmax(Q̃ Kᵀ · scale)                                                                 (B, H, m, S)
    b = masked_softmax(q_l @ k.transpose(-2, -1))
    return f, a, b


def truncated_pinv(A, rtol=DEFAULT_PINV_RTOL):
    """Truncated-SVD pseudo-inverse of ``A (…, m, n)``: invert only the singular values above ``rtol · σ₁``.

        A = U Σ Vᵀ,   A⁺_rtol = V Σ⁺ Uᵀ,   Σ⁺_ii = 1/σ_i if σ_i > rtol·σ₁ else 0

    This is ``torch.linalg.pinv(A, rtol=rtol)`` written out (the test compares the two). ``torch.linalg.pinv``'s
    *default* cut-off is rtol = max(m, n)·eps (≈ 1e-14 in float64): on a numerically singular or ill-conditioned Ã
    — e.g. the landmark matrix of a trained model — it inverts singular values that are round-off and returns huge
    entries that amplify every mismatch between F̃, B̃ and Ã. A larger rtol is a *regularised*
    inverse (the rank-r truncated SVD, r = number of σ_i kept), what the paper's few iterations do implicitly.
    On a well-conditioned A (σ_min > rtol·σ₁) nothing is cut and the result is the inverse itself. (Gradients
    flow through ``torch.linalg.svd``; they are not defined where two kept singular values coincide.)
    """
    where = "truncated_pinv"
    _check_matrix(A, "A", where)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1:
        raise ValueError(f"{where}: rtol must be a number in [0, 1) (the share of σ₁ below which a singular value "
                         f"counts as 0), got {rtol!r}")
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    # keep σ_i > rtol · σ₁ (σ₁ = s[..., 0], the largest)                                         (…, r)
    keep = s > rtol * s[..., :1]
    s_inv = torch.where(keep, 1 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    # A⁺ = V Σ⁺ Uᵀ                                                                               (…, n, m)
    return (Vh.transpose(-2, -1) * s_inv[..., None, :]) @ U.transpose(-2, -1)


def _pinv(a, pinv, pinv_iters, where, rtol=DEFAULT_PINV_RTOL):
    if pinv not in PINV_METHODS:
        raise ValueError(f"{where}: pinv must be one of {', '.join(map(repr, PINV_METHODS))}, got {pinv!r}")
    if pinv == "exact":
        # the reference: A⁺ through an SVD (singular values below max(m,n)·eps·σ₁ treated as 0)
        return torch.linalg.pinv(a)
    if pinv == "truncated":
        # A⁺ through an SVD, singular values below rtol·σ₁ treated as 0
        return truncated_pinv(a, rtol)
    return iterative_pinv(a, pinv_iters)


def _default_landmarks(landmarks, T, S):
    # the paper's default is 64 landmarks; a shorter sequence simply uses one landmark per token
    return min(64, T, S) if landmarks is None else landmarks


@register("nystrom")
def nystrom_attention(q, k, v, *, landmarks=None, pinv="iterative", pinv_iters=6, pinv_rtol=DEFAULT_PINV_RTOL,
                      causal=False, mask=None, scale=None, return_weights=False):
    """Nyström attention F̃ (Ã⁺ (B̃ V)) — O(T·m·D) — on ``(B, H, T, D)`` tensors (registered as ``"nystrom"``).

    ``landmarks`` m in [1, min(T, S)] (default min(64, T, S)); T need not be a multiple of m (uneven segments,
    see :func:`segment_means`). ``pinv="iterative"`` (``pinv_iters`` steps of :func:`iterative_pinv`, the paper's 6
    by default), ``"exact"`` (``torch.linalg.pinv`` with its default cut-off) or ``"truncated"``
    (:func:`truncated_pinv`: singular values below ``pinv_rtol · σ₁`` dropped). ``return_weights=True`` also
    returns the implied ``(B, H, T, S)`` matrix F̃ Ã⁺ B̃ (O(T·S) memory: for inspection). ``causal``/``mask``
    raise ``ValueError``.
    """
    where = "nystrom_attention"
    B, H, T, S, D, _ = check_qkv(q, k, v, where=where)
    scale = check_scale(scale, D, where)
    _not_causal(causal, "Nyströmformer", _NYSTROM_WHY, where)
    _no_mask(mask, "Nyströmformer", "landmarks average over segments of keys, so a (T, S) mask has no single "
             "column to act on", where)
    check_bool(return_weights, "return_weights", where)
    f, a, b = _nystrom_parts(q, k, _default_landmarks(landmarks, T, S), scale, where)
    a_pinv = _pinv(a, pinv, pinv_iters, where, pinv_rtol)
    # out = F̃ (Ã⁺ (B̃ V)) — right to left, never a T×S matrix                                  (B, H, T, Dv)
    out = f @ (a_pinv @ (b @ v))
    if return_weights:
        return out, (f @ a_pinv) @ b
    return out


def nystrom_attention_matrix(q, k, *, landmarks=None, pinv="iterative", pinv_iters=6, pinv_rtol=DEFAULT_PINV_RTOL,
                             scale=None):
    """The ``(B, H, T, S)`` matrix Nyström attention applies to V: F̃ Ã⁺ B̃, rank ≤ m."""
    where = "nystrom_attention_matrix"
    B, H, T, S, D, _ = check_qkv(q, k, k, where=where)
    scale = check_scale(scale, D, where)
    f, a, b = _nystrom_parts(q, k, _default_landmarks(landmarks, T, S), scale, where)
    # Â = F̃ Ã⁺ B̃
    return f @ _pinv(a, pinv, pinv_iters, where, pinv_rtol) @ b


def nystrom_reference(q, k, v, *, landmarks=None, pinv="exact", pinv_iters=6, pinv_rtol=DEFAULT_PINV_RTOL,
                      scale=None):
    """The plain O(T·S) form: (F̃ Ã⁺ B̃) V through the full matrix, next to the efficient right-to-left product."""
    return nystrom_attention_matrix(q, k, landmarks=landmarks, pinv=pinv, pinv_iters=pinv_iters, pinv_rtol=pinv_rtol,
                                    scale=scale) @ v


# --------------------------------------------------------------------------------------------------------------
# Synthesizer
# --------------------------------------------------------------------------------------------------------------


def _synth_allowed(mask, causal, B, H, T, S, device, where):
    check_bool(causal, "causal", where)
    mask = check_mask(mask, B, H, T, S, where=where)
    return allowed_mask(mask, causal, T, S, device)


def dense_synthesizer_attention(q, k, v, W1, b1, W2, b2, *, causal=False, mask=None, return_weights=False):
    """Dense Synthesizer: scores B_i = W₂ᵀ ReLU(W₁ᵀ x_i + b₁) + b₂ synthesised from each token alone, then
    softmax(B) V. ``x_i`` is the token's per-head query ``q_i`` (a linear function of the token, as the paper's
    input X up to a linear map); ``k`` is **not used** — there is no query–key interaction.

    ``W1 (H, D, Dh)``, ``b1 (H, Dh)``, ``W2 (H, Dh, n)``, ``b2 (H, n)`` with n ≥ S: a score for each of n positions,
    the first S used. ``causal`` and ``mask`` act on the synthesised scores (position i may use B_ij, j ≤ i).
    """
    where = "dense_synthesizer_attention"
    B, H, T, S, D, _ = check_qkv(q, k, v, where=where)
    shapes = {"W1": (H, D, None), "b1": (H, None), "W2": (H, None, None), "b2": (H, None)}
    for name, t in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)):
        if not isinstance(t, torch.Tensor) or t.dtype != q.dtype or t.dim() != len(shapes[name]):
            raise ValueError(f"{where}: {name} must be a {len(shapes[name])}-D tensor of dtype {q.dtype}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                             f"{'' if not isinstance(t, torch.Tensor) else f' ({t.dtype})'}")
    Dh, n = W1.shape[-1], W2.shape[-1]
    if W1.shape != (H, D, Dh) or b1.shape != (H, Dh) or W2.shape != (H, Dh, n) or b2.shape != (H, n):
        raise ValueError(f"{where}: expected W1 (H={H}, D={D}, Dh), b1 (H, Dh), W2 (H, Dh, n), b2 (H, n); got "
                         f"{tuple(W1.shape)}, {tuple(b1.shape)}, {tuple(W2.shape)}, {tuple(b2.shape)}")
    if n < S:
        raise ValueError(f"{where}: W2 synthesises n={n} scores per token but there are S={S} keys (need n ≥ S)")
    allowed = _synth_allowed(mask, causal, B, H, T, S, q.device, where)
    # hidden = ReLU(x W₁ + b₁)                                                                   (B, H, T, Dh)
    hidden = torch.relu(torch.einsum("bhtd,hde->bhte", q, W1) + b1[:, None, :])
    # B = hidden W₂ + b₂, one score per position, the first S kept                              (B, H, T, S)
    scores = torch.einsum("bhte,hes->bhts", hidden, W2[..., :S]) + b2[:, None, :S]
    weights = masked_softmax(scores, allowed)
    out = weights @ v
    return (out, weights) if return_weights else out


def random_synthesizer_attention(q, k, v, R, *, causal=False, mask=None, return_weights=False):
    """Random Synthesizer: softmax(R) V with ``R (H, n, n)`` (or ``(n, n)``) an input-independent score matrix,
    n ≥ max(T, S) (the top-left T×S block is used). ``q`` and ``k`` give only the shapes: nothing of the input
    enters the weights. ``causal``/``mask`` act on R."""
    where = "random_synthesizer_attention"
    B, H, T, S, D, _ = check_qkv(q, k, v, where=where)
    if not isinstance(R, torch.Tensor) or R.dim() not in (2, 3) or R.dtype != q.dtype:
        raise ValueError(f"{where}: R must be an (n, n) or (H, n, n) tensor of dtype {q.dtype}, got "
                         f"{tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__}")
    R3 = R if R.dim() == 3 else R.unsqueeze(0)
    if R3.shape[0] not in (1, H) or R3.shape[1] < T or R3.shape[2] < S:
        raise ValueError(f"{where}: R of shape {tuple(R.shape)} must be (n, n) or (H={H}, n, n) with n ≥ T={T} "
                         f"and n ≥ S={S}")
    allowed = _synth_allowed(mask, causal, B, H, T, S, q.device, where)
    # weights = softmax(R[:T, :S]) — the same for every input                                    (1, H, T, S)
    weights = masked_softmax(R3[None, :, :T, :S], allowed)
    out = weights @ v  # broadcasts over the batch                                               (B, H, T, Dv)
    return (out, weights.expand(B, -1, -1, -1)) if return_weights else out


class _SynthesizerBase(nn.Module):
    KWARGS = ()

    def _kw(self, config, where):
        kw = dict(config.attention_kwargs)
        unknown = set(kw) - set(self.KWARGS)
        if unknown:
            raise TypeError(f"{where}: unknown attention_kwargs {sorted(unknown)}; expected some of {self.KWARGS}")
        return kw

    def _check_call(self, q, kwargs, where):
        unknown = set(kwargs) - set(self.KWARGS)
        if unknown:
            raise TypeError(f"{where}: unexpected keyword arguments {sorted(unknown)}")
        if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[2] > self.max_len:
            raise ValueError(f"{where}: sequence length T={q.shape[2]} exceeds max_len={self.max_len}")

    def attention_matrix(self, q, k, *, causal=False):
        """The ``(B, H, T, S)`` weights this layer applies to the values."""
        return self(q, k, k, causal=causal, return_weights=True)[1]


@register("synthesizer_dense")
class DenseSynthesizerAttention(_SynthesizerBase):
    """Dense Synthesizer (registered ``"synthesizer_dense"``): per head W₁ (D×Dh), b₁, W₂ (Dh×max_len), b₂.

    ``attention_kwargs``: ``hidden`` (Dh, default head_dim), ``seed`` (default: from torch's generator).
    Parameters per layer: H·(D·Dh + Dh + Dh·n + n), n = max_len. Causal masking is supported.
    """

    KWARGS = ("hidden", "seed")

    def __init__(self, config):
        super().__init__()
        where = "DenseSynthesizerAttention"
        kw = self._kw(config, where)
        H, D, n = config.n_heads, config.head_dim, config.max_len
        Dh = check_positive_int(kw.get("hidden", D), "hidden", where)
        gen = torch.Generator().manual_seed(_check_seed(kw.get("seed"), where))
        self.n_heads, self.head_dim, self.hidden, self.max_len = H, D, Dh, n
        # N(0, 1/fan_in) weights (variance-preserving), zero biases
        self.W1 = nn.Parameter(torch.randn(H, D, Dh, generator=gen) / math.sqrt(D))
        self.b1 = nn.Parameter(torch.zeros(H, Dh))
        self.W2 = nn.Parameter(torch.randn(H, Dh, n, generator=gen) / math.sqrt(Dh))
        self.b2 = nn.Parameter(torch.zeros(H, n))

    def forward(self, q, k, v, *, causal=False, mask=None, return_weights=False, **kwargs):
        self._check_call(q, kwargs, "DenseSynthesizerAttention")
        check_qkv(q, k, v, where="DenseSynthesizerAttention")
        p = [t.to(q.dtype) for t in (self.W1, self.b1, self.W2, self.b2)]
        return dense_synthesizer_attention(q, k, v, *p, causal=causal, mask=mask, return_weights=return_weights)

    def extra_repr(self):
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}, hidden={self.hidden}, max_len={self.max_len}"


@register("synthesizer_random")
class RandomSynthesizerAttention(_SynthesizerBase):
    """Random Synthesizer (registered ``"synthesizer_random"``): a per-head n×n score matrix R, n = max_len.

    ``attention_kwargs``: ``rank`` (None: a full R; r: the factorised R = R₁ R₂ᵀ with R₁, R₂ of n×r, rank ≤ r),
    ``trainable`` (True: learned; False: a fixed random buffer, the paper's "fixed random"), ``seed``.
    Entries of R (or of R₁R₂ᵀ) start N(0, 1). Causal masking is supported.
    """

    KWARGS = ("rank", "trainable", "seed")

    def __init__(self, config):
        super().__init__()
        where = "RandomSynthesizerAttention"
        kw = self._kw(config, where)
        H, n = config.n_heads, config.max_len
        rank = kw.get("rank")
        if rank is not None:
            _check_rank(rank, n, "rank", where, what="max_len")
        trainable = check_bool(kw.get("trainable", True), "trainable", where)
        gen = torch.Generator().manual_seed(_check_seed(kw.get("seed"), where))
        self.n_heads, self.max_len, self.rank, self.trainable = H, n, rank, trainable
        if rank is None:
            tensors = {"R": torch.randn(H, n, n, generator=gen)}
        else:
            # entries of R₁ R₂ᵀ are sums of r products: N(0, r^-½) factors give them variance 1
            tensors = {name: torch.randn(H, n, rank, generator=gen) / rank ** 0.25 for name in ("R1", "R2")}
        for name, t in tensors.items():
            if trainable:
                setattr(self, name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

    def score_matrix(self):
        """R ``(H, n, n)``: the learned matrix, or R₁ R₂ᵀ when factorised."""
        # R = R₁ R₂ᵀ (rank ≤ r)                                                                     (H, n, n)
        return self.R if self.rank is None else self.R1 @ self.R2.transpose(-2, -1)

    def forward(self, q, k, v, *, causal=False, mask=None, return_weights=False, **kwargs):
        self._check_call(q, kwargs, "RandomSynthesizerAttention")
        _, _, T, S, _, _ = check_qkv(q, k, v, where="RandomSynthesizerAttention")
        if self.rank is None:
            R = self.R[:, :T, :S]
        else:
            # only the T×S block is needed: R₁[:T] R₂[:S]ᵀ
            R = self.R1[:, :T] @ self.R2[:, :S].transpose(-2, -1)
        return random_synthesizer_attention(q, k, v, R.to(q.dtype), causal=causal, mask=mask,
                                            return_weights=return_weights)

    def extra_repr(self):
        return f"n_heads={self.n_heads}, max_len={self.max_len}, rank={self.rank}, trainable={self.trainable}"


# --------------------------------------------------------------------------------------------------------------
# the yardstick: SVD
# --------------------------------------------------------------------------------------------------------------


def singular_values(A):
    """Singular values σ₁ ≥ σ₂ ≥ … of every matrix of ``A (…, T, S)``, in float64: ``(…, min(T, S))``."""
    _check_matrix(A, "A", "singular_values")
    return torch.linalg.svdvals(A.detach().double())


def rank_k_approximation(A, rank):
    """The best rank-k approximation of ``A (…, T, S)`` (Eckart–Young): the truncated SVD U_k Σ_k V_kᵀ."""
    where = "rank_k_approximation"
    _check_matrix(A, "A", where)
    _check_rank(rank, min(A.shape[-2:]), "rank", where)
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    # A_k = Σ_{i≤k} σ_i u_i v_iᵀ                                                                (…, T, S)
    return (U[..., :rank] * s[..., None, :rank]) @ Vh[..., :rank, :]


def best_rank_k_error(A, rank, *, norm="fro", relative=True):
    """min over rank-k matrices M of ‖A − M‖ — the lower bound no rank-k method can beat. ``(…,)`` float64.

    Eckart–Young: ‖A − A_k‖_F = (Σ_{i>k} σ_i²)^½ (``norm="fro"``), ‖A − A_k‖₂ = σ_{k+1} (``norm="spectral"``);
    ``relative=True`` divides by ‖A‖ (‖A‖_F = (Σ σ_i²)^½, ‖A‖₂ = σ₁).
    """
    where = "best_rank_k_error"
    _check_matrix(A, "A", where)
    _check_rank(rank, min(A.shape[-2:]), "rank", where)
    if norm not in ("fro", "spectral"):
        raise ValueError(f"{where}: norm must be 'fro' or 'spectral', got {norm!r}")
    check_bool(relative, "relative", where)
    s = singular_values(A)
    if norm == "fro":
        # ‖A − A_k‖_F² = Σ_{i>k} σ_i²
        err = s[..., rank:].pow(2).sum(-1).sqrt()
        ref = s.pow(2).sum(-1).sqrt()
    else:
        # ‖A − A_k‖₂ = σ_{k+1} (0 when k = min(T, S))
        err = s[..., rank] if rank < s.shape[-1] else torch.zeros_like(s[..., 0])
        ref = s[..., 0]
    return err / ref.clamp_min(torch.finfo(torch.float64).tiny) if relative else err


def approximation_error(A_hat, A, *, norm="fro", relative=True):
    """‖Â − A‖ per matrix (``(…,)`` float64), Frobenius or spectral, relative to ‖A‖ by default."""
    where = "approximation_error"
    _check_matrix(A_hat, "A_hat", where)
    _check_matrix(A, "A", where)
    if A_hat.shape != A.shape:
        raise ValueError(f"{where}: A_hat {tuple(A_hat.shape)} and A {tuple(A.shape)} must have the same shape")
    if norm not in ("fro", "spectral"):
        raise ValueError(f"{where}: norm must be 'fro' or 'spectral', got {norm!r}")
    check_bool(relative, "relative", where)
    diff, A = (A_hat.detach().double() - A.detach().double()), A.detach().double()
    ord_ = "fro" if norm == "fro" else 2
    err = torch.linalg.matrix_norm(diff, ord=ord_)
    ref = torch.linalg.matrix_norm(A, ord=ord_)
    return err / ref.clamp_min(torch.finfo(torch.float64).tiny) if relative else err


def energy_rank(A, energy=0.9):
    """The smallest k whose top-k singular values hold ``energy`` of ‖A‖_F²: min k with Σ_{i≤k} σ_i² ≥ e Σ σ_i².

    (Linformer's Figure 1 plots this cumulative spectrum for RoBERTa.) Returns an int64 tensor ``(…,)``.
    """
    where = "energy_rank"
    _check_matrix(A, "A", where)
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"{where}: energy must be a number in (0, 1], got {energy!r}")
    s2 = singular_values(A).pow(2)
    # cumulative share of the squared singular values
    share = s2.cumsum(-1) / s2.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    # first index where the share reaches `energy` (a hair of slack for round-off), counted from 1
    return (share < energy - 1e-12).sum(-1) + 1


# --------------------------------------------------------------------------------------------------------------
# looking at it: dense matrices, dependence on other positions
# --------------------------------------------------------------------------------------------------------------


def softmax_attention_matrix(q, k, *, causal=False, scale=None):
    """The exact ``(B, H, T, S)`` matrix softmax(q kᵀ · scale) (the thing every method here approximates)."""
    return softmax_attention(q, k, k, causal=causal, scale=scale, return_weights=True)[1]


@torch.no_grad()
def dependence_matrix(fn, q, k, v, *, eps=1.0):
    """How much output position i moves when position j changes: ``(T, T)`` float64, entry (i, j) =
    max |fn(q', k', v')[…, i, :] − fn(q, k, v)[…, i, :]| where q', k', v' add ``eps`` to position j of all three
    (a changed token changes its query, key and value). Self-attention only (T = S).

    A causal method gives a lower-triangular matrix: nothing above the diagonal. Linformer and Nyström fill the
    upper triangle — the future leaks.
    """
    where = "dependence_matrix"
    if not callable(fn):
        raise TypeError(f"{where}: fn must be callable fn(q, k, v) → (B, H, T, Dv), got {type(fn).__name__}")
    B, H, T, S, D, _ = check_qkv(q, k, v, where=where)
    if T != S:
        raise ValueError(f"{where}: self-attention only (T = S), got T={T}, S={S}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{where}: eps must be a positive number, got {eps!r}")
    base = fn(q, k, v)
    out = torch.zeros(T, T, dtype=torch.float64)
    for j in range(T):
        bumped = []
        for x in (q, k, v):
            x = x.clone()
            x[:, :, j] += eps
            bumped.append(x)
        # change at every output position, max over batch, heads and features
        out[:, j] = (fn(*bumped) - base).abs().amax(dim=(0, 1, 3)).double()
    return out


# --------------------------------------------------------------------------------------------------------------
# plumbing: the input checks the functions above call
# --------------------------------------------------------------------------------------------------------------


def _check_seed(seed, where):
    """``None`` → a seed drawn from torch's global generator (so each layer differs, and torch.manual_seed makes
    it reproducible); an int ≥ 0 → that seed."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, (1,)))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{where}: seed must be a non-negative int or None, got {seed!r}")
    return seed


def _no_mask(mask, method, why, where):
    if mask is not None:
        raise ValueError(f"{where}: mask is not supported by {method}: {why}")


def _not_causal(causal, method, why, where):
    check_bool(causal, "causal", where)
    if causal:
        raise ValueError(f"{where}: {method} cannot be causal (causal=True): {why}")


_LINFORMER_WHY = ("every projected key (E K)_r = Σ_j E_rj K_j and value (F V)_r mixes all n positions, future "
                  "ones included, so a query sees future tokens through every one of the k columns and no mask "
                  "on the n×k scores can hide them; use an encoder (causal=False), or a causal method (dense, "
                  "local/sparse, causal linear attention)")
_NYSTROM_WHY = ("each landmark is the mean of a segment of queries/keys, so it mixes future tokens into the "
                "scores of every query; use an encoder (causal=False)")
_PROJECTION_MASK_WHY = ("the keys are mixed along the sequence before the scores exist, so a (T, S) mask has no "
                        "column to act on; zero padded keys/values before projecting instead")


def _check_matrix(A, name, where):
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() < 2 or A.shape[-1] == 0 or A.shape[-2] == 0:
        raise ValueError(f"{where}: {name} must be a (…, T, S) matrix with T, S ≥ 1, got shape {tuple(A.shape)}")
    if A.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must have a floating dtype, got {A.dtype}")
    return A


def _check_rank(rank, top, name, where, what="min(T, S)"):
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(rank).__name__}")
    if rank <= 0 or rank > top:
        raise ValueError(f"{where}: {name} must be in [1, {what}={top}] (k ≤ 0 or k > n has no rank-k "
                         f"approximation), got {rank}")
    return rank


def _check_projection(E, name, H, S, dtype, device, where):
    """E ``(k, n)`` or ``(H, k, n)`` with n ≥ S; returns it viewed as ``(1 or H, k, S)``."""
    if not isinstance(E, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a (k, n) or (H, k, n) torch.Tensor, got {type(E).__name__}")
    if E.dim() not in (2, 3):
        raise ValueError(f"{where}: {name} must be (k, n) or (H, k, n), got shape {tuple(E.shape)}")
    if E.dtype != dtype:
        raise TypeError(f"{where}: {name} must have the dtype of q ({dtype}), got {E.dtype}")
    if E.device != device:
        raise ValueError(f"{where}: {name} must be on q's device ({device}), got {E.device}")
    E3 = E if E.dim() == 3 else E.unsqueeze(0)
    if E3.shape[0] not in (1, H):
        raise ValueError(f"{where}: {name} has {E3.shape[0]} head matrices, expected 1 (shared) or H={H}")
    k, n = E3.shape[-2:]
    if k == 0:
        raise ValueError(f"{where}: {name} has k=0 rows; the projected length k must be ≥ 1")
    if n < S:
        raise ValueError(f"{where}: {name} has n={n} columns but the sequence has S={S} keys (need n ≥ S; a "
                         f"shorter sequence uses the first S columns, as if zero-padded to n)")
    if k > n:
        raise ValueError(f"{where}: {name} projects n={n} positions to k={k} > n rows; k must be in [1, n]")
    # a sequence of S ≤ n tokens is the first S of n with zeros after them: E [x; 0] = E[:, :S] x
    return E3[..., :S]


# benchmark: `python -m effedu.bench lowrank` (effedu/bench/lowrank.py)

__all__ = [
    "PINV_METHODS", "PROJECTION_MODES", "SharedProjection", "singular_values", "rank_k_approximation", "best_rank_k_error", "approximation_error",
    "energy_rank", "linformer_attention", "linformer_attention_matrix", "linformer_reference",
    "LinformerAttention", "linformer_config", "tie_projections", "segment_boundaries", "segment_means",
    "iterative_pinv", "truncated_pinv", "DEFAULT_PINV_RTOL", "nystrom_attention", "nystrom_attention_matrix",
    "nystrom_reference",
    "dense_synthesizer_attention", "random_synthesizer_attention", "DenseSynthesizerAttention",
    "RandomSynthesizerAttention", "softmax_attention_matrix", "dependence_matrix",
]
