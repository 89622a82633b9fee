"""Kernel attention (survey §4.2 b–c): linear attention, the Performer's FAVOR+, clustered attention.

Softmax attention weighs value j for query i by sim(q_i, k_j) = exp(q_i·k_j / √d), normalised over j. *Any*
similarity that is a dot product of feature maps, sim(q, k) = φ(q)·φ(k), lets us reorder the products:

    out_i = Σ_j (φ(q_i)·φ(k_j)) v_j / Σ_j φ(q_i)·φ(k_j)  =  φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / φ(q_i)ᵀ (Σ_j φ(k_j))

The two sums are computed once (M × Dv and M numbers) and shared by every query: O(n) time and memory instead of
O(n²), and the T×S matrix is never formed.

* **Linear Transformer** (Katharopoulos, Vyas, Pappas, Fleuret 2020, "Transformers are RNNs"): φ(x) = elu(x) + 1,
  positive and cheap (M = d). Causal attention keeps running sums S_i = Σ_{j≤i} φ(k_j) v_jᵀ and z_i = Σ_{j≤i} φ(k_j):
  a prefix sum in training (``effedu.kernels.causal_linear_attention``) and an **RNN** with an O(1) state per
  step in decoding (``RecurrentLinearAttention``): no KV cache that grows with the text.
* **Performer** (Choromanski et al. 2021), FAVOR+: positive random features make the dot product an *unbiased
  estimate* of the softmax kernel itself,

      exp(x·y) = E_ω[ exp(ωᵀx − |x|²/2) · exp(ωᵀy − |y|²/2) ],   ω ~ N(0, I_d)

  so φ(x) = exp(Wx − |x|²/2) / √m with m random rows ω_i (x = q·d^(−1/4), so that x·y = q·k/√d). Drawing the ω_i
  *orthogonal* (blocks of a random rotation, rows rescaled to Gaussian lengths) lowers the estimator's variance.
  The error falls as m grows; the features are redrawn from a seed (``PerformerAttention`` can redraw during
  training).
* **Clustered attention** (Vyas, Katharopoulos, Fleuret 2020): group the T queries into C clusters by k-means,
  compute exact softmax attention once per centroid, give every query its centroid's output: O(T·C) instead of
  O(T²). With C = T every query is its own centroid and the result is exact attention. (Vyas et al. cluster
  LSH codes of the queries in Hamming space for speed; we run plain Euclidean k-means on the queries.)
* **Improved clustered attention** (Vyas et al. 2020, §3.3): the centroid's weights A^c_j also say which keys
  matter to its cluster. Each cluster takes its top-k keys by those weights and the mass m̂_j = Σ_{top-k} A^c_jl
  they hold; each query then attends *exactly* (softmax of its own q_i·k_l) to those k keys, scaled to m̂_j, and
  keeps the centroid's weights on every other key:

      A^t_il = m̂_j · exp(q_i·k_l/√d) / Σ_{r ∈ top-k_j} exp(q_i·k_r/√d)   if l ∈ top-k_j,    A^c_jl   otherwise

  Rows still sum to 1; k = S gives exact attention; cost O(T·C + T·k) on top of clustering.

Registered: ``"linear"``, ``"clustered"`` and ``"clustered_improved"`` (functions) and ``"performer"`` (an nn.Module holding its random
features). ``linear_attention_naive`` is the plain O(T²) reference that the tests hold everything to.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_positive_int, check_qkv, check_scale
from ..kernels.linear_attention import DEFAULT_EPS, causal_linear_attention, check_eps
from . import register

# --------------------------------------------------------------------------------------------------------------
# the feature map of linear attention
# --------------------------------------------------------------------------------------------------------------


def elu_feature_map(x):
    """φ(x) = elu(x) + 1: positive (> 0) everywhere, ≈ 1 + x near 0, ≈ e^x for x → −∞ (Katharopoulos et al.)."""
    return F.elu(x) + 1.0


# --------------------------------------------------------------------------------------------------------------
# the plain O(T²) reference
# --------------------------------------------------------------------------------------------------------------


def linear_attention_naive(phi_q, phi_k, v, *, causal=False, eps=DEFAULT_EPS):
    """Linear attention the quadratic way: the T×S matrix of φ(q_i)·φ(k_j), masked, row-normalised. O(T²).

    ``phi_q (B,H,T,M)``, ``phi_k (B,H,S,M)`` non-negative features, ``v (B,H,S,Dv)``. The oracle of the tests.
    """
    where = "linear_attention_naive"
    B, H, T, S, M, Dv = check_qkv(phi_q, phi_k, v, where=where)
    _check_causal(causal, where)
    eps = check_eps(eps, where)
    # A_ij = φ(q_i)·φ(k_j)                                                             (B, H, T, S)
    A = phi_q @ phi_k.transpose(-2, -1)
    if causal:
        # keep j ≤ i (top-left aligned, as the softmax version)
        A = A * torch.ones(T, S, dtype=torch.bool, device=A.device).tril()
    # out_i = Σ_j A_ij v_j / (Σ_j A_ij + eps)
    return (A @ v) / (A.sum(-1, keepdim=True) + eps)


def _noncausal(phi_q, phi_k, v, eps):
    # KV = Σ_j φ(k_j) v_jᵀ                                                               (B, H, M, Dv)
    kv = phi_k.transpose(-2, -1) @ v
    # z = Σ_j φ(k_j)                                                                     (B, H, M, 1)
    z = phi_k.sum(-2).unsqueeze(-1)
    # out_i = φ(q_i)ᵀ KV / (φ(q_i)·z + eps)
    return (phi_q @ kv) / (phi_q @ z + eps)


def _kernel_attention(phi_q, phi_k, v, causal, eps, backend, chunk_size, where):
    """Non-causal: two products; causal: the prefix-sum kernel (T must equal S)."""
    if not causal:
        return _noncausal(phi_q, phi_k, v, eps)
    if phi_k.shape[2] != phi_q.shape[2]:
        raise ValueError(
            f"{where}: causal=True needs as many keys as queries (self-attention), got T={phi_q.shape[2]}, "
            f"S={phi_k.shape[2]}"
        )
    return causal_linear_attention(phi_q, phi_k, v, backend=backend, eps=eps, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------------------------
# linear attention (elu + 1)
# --------------------------------------------------------------------------------------------------------------


@register("linear")
def linear_attention(q, k, v, *, causal=False, mask=None, eps=DEFAULT_EPS, backend="auto", chunk_size=None,
                     return_weights=False):
    """Linear attention with φ(x) = elu(x) + 1; q ``(B,H,T,D)``, k ``(B,H,S,D)``, v ``(B,H,S,Dv)``.

    Non-causal: φ(q) (φ(k)ᵀ v) / (φ(q) Σφ(k) + eps), two matrix products. Causal: the prefix-sum kernel
    ``effedu.kernels.causal_linear_attention`` (``backend``, ``chunk_size`` passed on; differentiable).
    """
    where = "linear_attention"
    check_qkv(q, k, v, where=where)
    _check_causal(causal, where)
    _refuse_mask(mask, where)
    _refuse_weights(return_weights, where)
    eps = check_eps(eps, where)
    return _kernel_attention(elu_feature_map(q), elu_feature_map(k), v, causal, eps, backend, chunk_size, where)


class RecurrentLinearAttention:
    """Causal linear attention as an RNN: one token per ``step``, a state of fixed size.

        S_t = S_{t−1} + φ(k_t) v_tᵀ       z_t = z_{t−1} + φ(k_t)       out_t = φ(q_t)ᵀ S_t / (φ(q_t)·z_t + eps)

    The state (S: M × Dv, z: M per batch row and head) does not grow with t: decoding costs O(M·Dv) per token
    and O(M·Dv) memory, where softmax attention with a KV cache costs O(t·d) per token and keeps all t keys and
    values. ``feature_map`` maps q_t, k_t to features (``None``: they already are features).
    """

    def __init__(self, *, feature_map=elu_feature_map, eps=DEFAULT_EPS):
        if feature_map is not None and not callable(feature_map):
            raise TypeError(f"RecurrentLinearAttention: feature_map must be callable or None, "
                            f"got {type(feature_map).__name__}")
        self.feature_map = feature_map
        self.eps = check_eps(eps, "RecurrentLinearAttention")
        self.reset()

    def reset(self):
        """Forget the past: the next step is position 0."""
        self.S = None  # (B, H, M, Dv)
        self.z = None  # (B, H, M)
        self.t = 0

    def state_bytes(self):
        """Bytes held by the state: the same at every step."""
        return 0 if self.S is None else self.S.numel() * self.S.element_size() + self.z.numel() * self.z.element_size()

    def step(self, q_t, k_t, v_t):
        """One position: q_t, k_t ``(B, H, D)``, v_t ``(B, H, Dv)`` → out_t ``(B, H, Dv)``."""
        where = "RecurrentLinearAttention.step"
        for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{where}: {name} must be a (B, H, D) tensor (one position), got {shape}")
        if q_t.shape != k_t.shape or v_t.shape[:2] != q_t.shape[:2]:
            raise ValueError(f"{where}: q_t and k_t must share a shape and v_t its (B, H), got "
                             f"{tuple(q_t.shape)}, {tuple(k_t.shape)}, {tuple(v_t.shape)}")
        fq = q_t if self.feature_map is None else self.feature_map(q_t)
        fk = k_t if self.feature_map is None else self.feature_map(k_t)
        if self.S is None:
            self.S = torch.zeros(*fk.shape, v_t.shape[-1], dtype=v_t.dtype, device=v_t.device)
            self.z = torch.zeros_like(fk)
        elif self.S.shape[:-1] != fk.shape or self.S.shape[-1] != v_t.shape[-1]:
            raise ValueError(f"{where}: shapes changed mid-sequence: state {tuple(self.S.shape)}, got features "
                             f"{tuple(fk.shape)} and values {tuple(v_t.shape)}; call reset() first")
        # S_t = S_{t−1} + φ(k_t) v_tᵀ ;  z_t = z_{t−1} + φ(k_t)
        self.S = self.S + fk.unsqueeze(-1) * v_t.unsqueeze(-2)
        self.z = self.z + fk
        self.t += 1
        # out_t = φ(q_t)ᵀ S_t / (φ(q_t)·z_t + eps)
        num = (fq.unsqueeze(-2) @ self.S).squeeze(-2)
        den = (fq * self.z).sum(-1, keepdim=True)
        return num / (den + self.eps)


def linear_attention_recurrent(q, k, v, *, feature_map=elu_feature_map, eps=DEFAULT_EPS):
    """Run ``RecurrentLinearAttention`` over all T positions: equal to causal ``linear_attention``, step by step."""
    where = "linear_attention_recurrent"
    B, H, T, S, D, Dv = check_qkv(q, k, v, where=where)
    if S != T:
        raise ValueError(f"{where}: an RNN reads one key per query: need S == T, got T={T}, S={S}")
    rnn = RecurrentLinearAttention(feature_map=feature_map, eps=eps)
    return torch.stack([rnn.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(T)], dim=2)


# --------------------------------------------------------------------------------------------------------------
# Performer: FAVOR+ (positive orthogonal random features)
# --------------------------------------------------------------------------------------------------------------


def default_n_features(head_dim):
    """m = d·ln d, the Performer paper's choice (at least 1)."""
    return max(1, round(head_dim * math.log(head_dim))) if head_dim > 1 else 1


def gaussian_projection(n_features, head_dim, *, orthogonal=True, seed=0, generator=None, dtype=torch.float32,
                        device="cpu"):
    """The random matrix W ``(n_features, head_dim)`` of FAVOR+, rows ω_i with ω_i ~ N(0, I_d) marginally.

    ``orthogonal=True``: rows drawn in blocks of d mutually orthogonal directions (Q of the QR decomposition of a
    Gaussian matrix, signs fixed so that Q is uniformly distributed), each row rescaled to the length of an
    independent Gaussian vector (χ_d), so every row is still N(0, I_d) while rows within a block are exactly
    orthogonal. ``orthogonal=False``: iid Gaussian rows. Deterministic: ``seed`` (or ``generator``).
    """
    where = "gaussian_projection"
    check_positive_int(n_features, "n_features", where)
    check_positive_int(head_dim, "head_dim", where)
    if not isinstance(orthogonal, bool):
        raise TypeError(f"{where}: orthogonal must be a bool, got {type(orthogonal).__name__}")
    if generator is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{where}: seed must be an int (or pass generator=), got {type(seed).__name__}")
        generator = torch.Generator().manual_seed(seed)
    m, d = n_features, head_dim
    if not orthogonal:
        w = torch.randn(m, d, generator=generator, dtype=torch.float64)
    else:
        # ⌈m/d⌉ independent Gaussian d×d matrices, orthogonalised at once (batched QR)
        g = torch.randn(-(-m // d), d, d, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        # Q·sign(diag R) is Haar-distributed (uniform over rotations); its columns are orthonormal
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        sign[sign == 0] = 1.0
        q = q * sign.unsqueeze(-2)
        # block rows = the columns of each Q, stacked; keep the first m
        w = q.transpose(-2, -1).reshape(-1, d)[:m]
        # rescale each unit row to a χ_d length: ω_i = |g_i| · u_i has the N(0, I_d) marginal
        lengths = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
        w = w * lengths
    return w.to(dtype=dtype, device=device)


STABILIZERS = ("row", "all", "bound", "none")
BOUND_HEADROOM = 30.0  # "bound": exponents are kept ≤ 30 (e^30 ≈ 1e13: no overflow even summed over many tokens)


def favor_features(x, projection, *, scale=None, stabilizer="row"):
    """Positive random features φ(x) = exp(W x' − |x'|²/2 − c) / √m with x' = x·√scale; x ``(B,H,T,D)`` → ``(B,H,T,m)``.

    ``scale`` defaults to 1/√D, so that x'_q·x'_k = q·k/√D as in softmax attention. The constant c (held out of
    autograd) guards exp against overflow; it cancels in the attention ratio whenever it is one number per query,
    or one number for all keys:
      ``"row"``: c = max over this row's features (queries); ``"all"``: c = max over every key and feature
      (non-causal keys); ``"bound"``: c = max(0, max_i |ω_i|²/2 − 30), independent of the data, since
      ωᵀx' − |x'|²/2 ≤ |ω|²/2 for every x' (causal keys: no future key may influence a past output);
      ``"none"``: c = 0.
    """
    where = "favor_features"
    if not isinstance(x, torch.Tensor) or not isinstance(projection, torch.Tensor):
        raise TypeError(f"{where}: x and projection must be torch.Tensors")
    if projection.dim() != 2 or projection.shape[1] != x.shape[-1]:
        raise ValueError(f"{where}: projection must be (n_features, D={x.shape[-1]}), got {tuple(projection.shape)}")
    if stabilizer not in STABILIZERS:
        raise ValueError(f"{where}: stabilizer must be one of {STABILIZERS}, got {stabilizer!r}")
    scale = check_scale(scale, x.shape[-1], where)
    m = projection.shape[0]
    xs = x * scale ** 0.5
    # ωᵢᵀx' − |x'|²/2 for every feature i                                              (B, H, T, m)
    logits = xs @ projection.to(x.dtype).T - 0.5 * (xs * xs).sum(-1, keepdim=True)
    with torch.no_grad():
        if stabilizer == "row":
            c = logits.amax(-1, keepdim=True)
        elif stabilizer == "all":
            c = logits.amax(dim=(-2, -1), keepdim=True)
        elif stabilizer == "bound":
            c = ((projection.to(x.dtype) ** 2).sum(-1).max() * 0.5 - BOUND_HEADROOM).clamp_min(0.0)
        else:
            c = torch.zeros((), dtype=x.dtype, device=x.device)
    # φ(x) = exp(Wx' − |x'|²/2 − c) / √m
    return torch.exp(logits - c) * m ** -0.5


def performer_attention(q, k, v, *, causal=False, mask=None, n_features=None, orthogonal=True, seed=0,
                        projection=None, scale=None, eps=DEFAULT_EPS, backend="auto", chunk_size=None,
                        return_weights=False):
    """FAVOR+ attention: softmax attention estimated with m positive random features, O(T·m·D).

    ``projection (m, D)``: the random matrix to use (else drawn with ``gaussian_projection(n_features, D,
    orthogonal=..., seed=...)``; ``n_features`` defaults to d·ln d). ``causal=True`` runs the prefix-sum kernel.
    """
    where = "performer_attention"
    B, H, T, S, D, Dv = check_qkv(q, k, v, where=where)
    _check_causal(causal, where)
    _refuse_mask(mask, where)
    _refuse_weights(return_weights, where)
    eps = check_eps(eps, where)
    if projection is None:
        m = default_n_features(D) if n_features is None else check_positive_int(n_features, "n_features", where)
        projection = gaussian_projection(m, D, orthogonal=orthogonal, seed=seed, dtype=q.dtype, device=q.device)
    else:
        if not isinstance(projection, torch.Tensor) or projection.dim() != 2 or projection.shape[1] != D:
            shape = tuple(projection.shape) if isinstance(projection, torch.Tensor) else type(projection).__name__
            raise ValueError(f"{where}: projection must be a (n_features, D={D}) tensor, got {shape}")
        if n_features is not None and n_features != projection.shape[0]:
            raise ValueError(f"{where}: n_features={n_features} disagrees with projection's {projection.shape[0]} rows")
        if projection.shape[0] == 0:
            raise ValueError(f"{where}: n_features must be a positive int, got a projection with 0 rows")
    phi_q = favor_features(q, projection, scale=scale, stabilizer="row")
    phi_k = favor_features(k, projection, scale=scale, stabilizer="bound" if causal else "all")
    return _kernel_attention(phi_q, phi_k, v, causal, eps, backend, chunk_size, where)


def performer_weights(q, k, *, projection, scale=None, causal=False):
    """The T×S attention weights FAVOR+ implies, φ(q_i)·φ(k_j) / Σ_j φ(q_i)·φ(k_j) — for plots only (O(T²))."""
    where = "performer_weights"
    check_qkv(q, k, k, where=where)
    phi_q = favor_features(q, projection, scale=scale, stabilizer="row")
    phi_k = favor_features(k, projection, scale=scale, stabilizer="bound" if causal else "all")
    A = phi_q @ phi_k.transpose(-2, -1)
    if causal:
        A = A * torch.ones(A.shape[-2:], dtype=torch.bool, device=A.device).tril()
    return A / A.sum(-1, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)


@register("performer")
class PerformerAttention(nn.Module):
    """FAVOR+ attention for ``TransformerConfig(attention="performer", attention_kwargs={...})``, one per layer.

    ``attention_kwargs``: ``n_features`` (default d·ln d), ``orthogonal`` (True), ``seed`` (None: drawn from
    torch's global generator, so ``seed_everything`` fixes it and every layer gets its own features),
    ``redraw_every`` (None: fixed features; k: new features every k forward calls in training mode, the d-th
    draw from seed + d), plus ``eps``, ``backend``, ``chunk_size``, ``scale`` passed to ``performer_attention``.
    The features are a buffer (saved with the model), not parameters.
    """

    _BUILD = ("n_features", "orthogonal", "seed", "redraw_every")
    _CALL = ("eps", "backend", "chunk_size", "scale")

    def __init__(self, config):
        super().__init__()
        where = "PerformerAttention"
        kw = dict(config.attention_kwargs)
        unknown = set(kw) - set(self._BUILD) - set(self._CALL)
        if unknown:
            raise TypeError(f"{where}: unknown attention_kwargs {sorted(unknown)}; expected some of "
                            f"{list(self._BUILD + self._CALL)}")
        d = config.head_dim
        n = kw.get("n_features")
        self.n_features = default_n_features(d) if n is None else check_positive_int(n, "n_features", where)
        self.orthogonal = kw.get("orthogonal", True)
        if not isinstance(self.orthogonal, bool):
            raise TypeError(f"{where}: orthogonal must be a bool, got {type(self.orthogonal).__name__}")
        seed = kw.get("seed")
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{where}: seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        r = kw.get("redraw_every")
        self.redraw_every = None if r is None else check_positive_int(r, "redraw_every", where)
        self.head_dim = d
        self.draws = 0  # how many times the features were redrawn
        self.calls = 0  # forward calls in training mode
        self.register_buffer("projection", gaussian_projection(self.n_features, d, orthogonal=self.orthogonal,
                                                               seed=self.seed))

    def redraw(self):
        """Draw new random features (deterministically: the d-th draw uses seed + d)."""
        self.draws += 1
        new = gaussian_projection(self.n_features, self.head_dim, orthogonal=self.orthogonal,
                                  seed=self.seed + self.draws)
        self.projection = new.to(dtype=self.projection.dtype, device=self.projection.device)

    def forward(self, q, k, v, *, causal=False, mask=None, return_weights=False, **kwargs):
        unknown = set(kwargs) - set(self._BUILD) - set(self._CALL)
        if unknown:
            raise TypeError(f"PerformerAttention: unexpected keyword arguments {sorted(unknown)}")
        if self.training:
            if self.redraw_every is not None and self.calls > 0 and self.calls % self.redraw_every == 0:
                self.redraw()
            self.calls += 1
        call = {name: kwargs[name] for name in self._CALL if name in kwargs}
        return performer_attention(q, k, v, causal=causal, mask=mask, projection=self.projection.to(q.dtype),
                                   return_weights=return_weights, **call)

    def extra_repr(self):
        return (f"n_features={self.n_features}, head_dim={self.head_dim}, orthogonal={self.orthogonal}, "
                f"seed={self.seed}, redraw_every={self.redraw_every}")


# --------------------------------------------------------------------------------------------------------------
# clustered attention
# --------------------------------------------------------------------------------------------------------------


def _nearest(x, c):
    # argmin_c |x − c|² = argmin_c (|c|² − 2 x·c)                                        (B, H, T)
    return ((c * c).sum(-1).unsqueeze(-2) - 2.0 * (x @ c.transpose(-2, -1))).argmin(-1)


def kmeans(x, n_clusters, *, iterations=10, seed=0):
    """Lloyd's k-means on the rows of every (batch, head): x ``(B,H,T,D)`` → ``(centroids (B,H,C,D), assign (B,H,T))``.

    Initial centroids: C distinct rows of x picked by a seeded permutation. An empty cluster keeps its centroid.
    No gradient flows through the assignment.
    """
    where = "kmeans"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{where}: x must be a (B, H, T, D) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, H, T, D = x.shape
    check_positive_int(n_clusters, "n_clusters", where)
    if n_clusters > T:
        raise ValueError(f"{where}: n_clusters must be ≤ the number of points T={T}, got {n_clusters}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{where}: iterations must be an int ≥ 0, got {iterations!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = x.detach()
        # C distinct starting points per (batch, head): the first C of a random permutation
        init = torch.rand(B, H, T, generator=g).argsort(-1)[..., :n_clusters].to(x.device)
        c = x.gather(2, init.unsqueeze(-1).expand(B, H, n_clusters, D)).clone()
        for _ in range(iterations):
            assign = _nearest(x, c)
            onehot = F.one_hot(assign, n_clusters).to(x.dtype)  # (B, H, T, C)
            counts = onehot.sum(2).unsqueeze(-1)  # (B, H, C, 1)
            # centroid = mean of its points (unchanged when it has none)
            means = (onehot.transpose(-2, -1) @ x) / counts.clamp_min(1.0)
            c = torch.where(counts > 0, means, c)
        assign = _nearest(x, c)
    return c, assign


@register("clustered")
def clustered_attention(q, k, v, *, causal=False, mask=None, n_clusters=16, iterations=10, seed=0, scale=None,
                        return_weights=False, return_clusters=False):
    """Clustered attention: k-means over the queries, exact softmax attention per centroid, shared by its cluster.

    ``n_clusters`` is capped at T (one cluster per query is exact attention). Cost O(T·C·D) for the clustering
    and O(C·S·D) for the attention. Non-causal only. ``return_weights=True`` also returns each query's (its
    centroid's) weights ``(B, H, T, S)``; ``return_clusters=True`` also returns the assignment ``(B, H, T)``.
    """
    where = "clustered_attention"
    B, H, T, S, D, Dv = check_qkv(q, k, v, where=where)
    _check_causal(causal, where)
    if causal:
        raise ValueError(
            f"{where}: causal=True is impossible: a cluster mixes queries from different positions and shares one "
            f"attention row, but each position would need its own causal mask; use 'linear' or 'performer' for a "
            f"decoder"
        )
    _refuse_mask(mask, where)
    check_positive_int(n_clusters, "n_clusters", where)
    scale = check_scale(scale, D, where)
    C = min(n_clusters, T)
    _, assign = kmeans(q, C, iterations=iterations, seed=seed)
    onehot = F.one_hot(assign, C).to(q.dtype)  # (B, H, T, C)
    counts = onehot.sum(2).unsqueeze(-1)  # (B, H, C, 1)
    # centroid_c = mean of the queries of cluster c (differentiable in q)                 (B, H, C, D)
    centroids = (onehot.transpose(-2, -1) @ q) / counts.clamp_min(1.0)
    # one softmax row per centroid: softmax(centroid kᵀ · scale) v                           (B, H, C, Dv)
    weights_c = torch.softmax((centroids @ k.transpose(-2, -1)) * scale, dim=-1)  # (B, H, C, S)
    out_c = weights_c @ v
    # every query takes its cluster's output                                                (B, H, T, Dv)
    out = out_c.gather(2, assign.unsqueeze(-1).expand(B, H, T, Dv))
    extra = []
    if return_weights:
        extra.append(weights_c.gather(2, assign.unsqueeze(-1).expand(B, H, T, S)))
    if return_clusters:
        extra.append(assign)
    return (out, *extra) if extra else out


@register("clustered_improved")
def improved_clustered_attention(q, k, v, *, n_clusters=16, topk=32, iterations=10, seed=0, causal=False, mask=None,
                                 scale=None, return_weights=False, return_clusters=False):
    """Improved clustered attention (Vyas et al. 2020, §3.3): clustered attention, plus exact attention of every
    query to its cluster's top-``topk`` keys, which keep the probability mass the centroid gave them.

    ``topk`` is capped at S (``topk=S``: exact softmax attention whatever the clusters); ``n_clusters`` at T.
    Same clustering as ``clustered_attention`` (same ``iterations``, ``seed``). Non-causal only, no mask.
    ``return_weights=True`` also returns the ``(B, H, T, S)`` weights A^t; ``return_clusters=True`` the assignment.
    """
    where = "improved_clustered_attention"
    B, H, T, S, D, Dv = check_qkv(q, k, v, where=where)
    _check_causal(causal, where)
    if causal:
        raise ValueError(f"{where}: causal=True is impossible: a cluster shares one attention row (and one top-k) "
                         f"across positions; use 'linear' or 'performer' for a decoder")
    _refuse_mask(mask, where)
    check_positive_int(n_clusters, "n_clusters", where)
    check_positive_int(topk, "topk", where)
    scale = check_scale(scale, D, where)
    C, K = min(n_clusters, T), min(topk, S)
    _, assign = kmeans(q, C, iterations=iterations, seed=seed)
    onehot = F.one_hot(assign, C).to(q.dtype)  # (B, H, T, C)
    counts = onehot.sum(2).unsqueeze(-1)
    centroids = (onehot.transpose(-2, -1) @ q) / counts.clamp_min(1.0)  # (B, H, C, D)
    # the centroid's attention A^c = softmax(centroid kᵀ · scale)                              (B, H, C, S)
    weights_c = torch.softmax((centroids @ k.transpose(-2, -1)) * scale, dim=-1)
    # each cluster's top-k keys by A^c, and the mass m̂ they hold                      (B, H, C, K), (B, H, C, 1)
    top_c = weights_c.detach().topk(K, dim=-1).indices
    mass_c = weights_c.gather(-1, top_c).sum(-1, keepdim=True)
    # the clustered part: A^c with the top-k keys removed, times V                                (B, H, C, Dv)
    keep = torch.ones_like(weights_c, dtype=torch.bool).scatter(-1, top_c, False)
    rest_c = weights_c * keep
    out_rest = (rest_c @ v).gather(2, assign.unsqueeze(-1).expand(B, H, T, Dv))
    # the exact part: query i against its cluster's top-k keys                                     (B, H, T, K)
    top = top_c.gather(2, assign.unsqueeze(-1).expand(B, H, T, K))
    flat = top.reshape(B, H, T * K, 1)  # gather rows of k and v (never a (T, S, D) tensor, even in backward)
    k_top = k.gather(2, flat.expand(B, H, T * K, D)).view(B, H, T, K, D)
    v_top = v.gather(2, flat.expand(B, H, T * K, Dv)).view(B, H, T, K, Dv)
    scores = (q.unsqueeze(-2) @ k_top.transpose(-2, -1)).squeeze(-2) * scale
    # m̂_j · softmax over the top-k of q_i·k_l                                                      (B, H, T, K)
    mass = mass_c.gather(2, assign.unsqueeze(-1))
    w_top = mass * torch.softmax(scores, dim=-1)
    out = (w_top.unsqueeze(-2) @ v_top).squeeze(-2) + out_rest
    extra = []
    if return_weights:
        w = rest_c.gather(2, assign.unsqueeze(-1).expand(B, H, T, S)).scatter(-1, top, w_top)
        extra.append(w)
    if return_clusters:
        extra.append(assign)
    return (out, *extra) if extra else out


# --------------------------------------------------------------------------------------------------------------
# plumbing: the input checks the functions above call
# --------------------------------------------------------------------------------------------------------------


def _check_causal(causal, where):
    if not isinstance(causal, bool):
        raise TypeError(f"{where}: causal must be a bool, got {type(causal).__name__}")


def _refuse_weights(return_weights, where):
    if return_weights:
        raise ValueError(
            f"{where}: return_weights=True would need the T×S matrix this attention exists to avoid; use "
            f"linear_attention_naive / performer_weights to look at it, or attention='dense'"
        )


def _refuse_mask(mask, where):
    if mask is not None:
        raise ValueError(
            f"{where}: an arbitrary mask is not supported: kernel attention never forms the T×S matrix a mask would "
            f"apply to (only causal=True, built into the prefix sums); use attention='dense' for masks"
        )


# benchmark: `python -m effedu.bench kernelized` (effedu/bench/kernelized.py)

__all__ = ["elu_feature_map", "linear_attention", "linear_attention_naive", "linear_attention_recurrent",
           "RecurrentLinearAttention", "default_n_features", "gaussian_projection", "favor_features",
           "performer_attention", "performer_weights", "PerformerAttention", "kmeans", "clustered_attention",
           "improved_clustered_attention"]
