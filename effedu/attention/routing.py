"""Routing attention (survey §4.1 c; Roy, Saffar, Vaswani & Grangier 2021, *Efficient Content-Based Sparse
Attention with Routing Transformers*).

Fixed patterns (chapter 15) decide *where* to look before seeing the data. The Routing Transformer lets the
content decide: queries and keys are unit-normalised and assigned to C clusters by **online mini-batch k-means**,
and a query attends only to the keys of its own cluster — tokens that are close in direction are likely to have a
large dot product, so the attention mass the pattern drops is small.

* **Online k-means** (:class:`OnlineKMeans`): C unit centroids μ_c, kept as a buffer (not trained by the
  optimiser). A training step assigns every normalised q̂/k̂ to its nearest centroid (largest μ_c·x̂) and moves
  each centroid by an exponential moving average towards the mean of its members,
  μ_c ← normalise(λ μ_c + (1 − λ) mean{x̂ : c(x̂) = c}) (λ = ``decay``, 0.999 in the paper; a centroid with no
  member stays). The paper's update sums the members, ours averages them (the step is then independent of the
  batch size).
* **Balanced clusters**: nearest-centroid clusters can be very uneven (one cluster holds everything: back to
  O(n²)). Like the paper's implementation, each centroid instead takes its **top-w** queries and its top-w keys by
  μ_c·x̂ (w = ``window``, default T // C): every cluster has exactly w members, the cost is C·w² = O(n·w), and
  with w = √n it is O(n^1.5).
* **Attention within clusters**, causal on the *original* positions (query i sees key j ≤ i of its cluster).
  Because clusters are top-w lists, a token can be in several clusters or in none. A query in several clusters
  gets one softmax over the keys of all its clusters together: the clusters' partial sums Σ_j e^{s_ij − m_i} v_j
  and Σ_j e^{s_ij − m_i} (m_i its maximum score) are added before dividing, so a key that shares *two* clusters
  with the query is counted twice (weight ∝ n_ij · e^{s_ij}, n_ij the number of shared clusters — exactly
  :func:`routing_counts`). A query in no cluster, or with no allowed key, gets output 0 (as a fully masked row).
* **Commitment loss** (:func:`commitment_loss`): ‖x̂ − μ_{c(x̂)}‖², averaged, pulls queries and keys towards their
  (fixed) centroids, so routing is stable. :class:`RoutingAttention` records it as an auxiliary loss of the
  model: the training loss must include ``model.aux_loss()`` (a ``step_fn`` for :func:`effedu.train.train`).

Registered: ``"routing"`` (:class:`RoutingAttention`, an nn.Module holding the k-means).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_mask, check_positive_int, check_qkv, check_scale, check_seed
from ..kernels.masking import allowed_mask
from . import register

# --------------------------------------------------------------------------------------------------------------
# online k-means
# --------------------------------------------------------------------------------------------------------------


def _check_decay(decay, where):
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"{where}: decay must be a float in [0, 1), got {type(decay).__name__}")
    if not 0 <= decay < 1:
        raise ValueError(f"{where}: decay must be a float in [0, 1), got {decay}")
    return float(decay)


def _check_centroids(centroids, D, where):
    if not isinstance(centroids, torch.Tensor):
        raise TypeError(f"{where}: centroids must be a torch.Tensor (C, D), got {type(centroids).__name__}")
    if centroids.dim() != 2 or centroids.shape[1] != D or centroids.shape[0] < 1:
        raise ValueError(f"{where}: centroids must be (C, D={D}) with C ≥ 1, got shape {tuple(centroids.shape)}")
    if not centroids.is_floating_point():
        raise TypeError(f"{where}: centroids must have a floating dtype, got {centroids.dtype}")
    return centroids.shape[0]


class OnlineKMeans(nn.Module):
    """C unit-norm centroids in dimension ``dim``, updated by an EMA of their members' mean (Roy et al. 2021).

    ``centroids`` (C, dim) is a buffer (saved in the state_dict, not a parameter), drawn from ``seed``.
    :meth:`assign` gives each vector its nearest centroid (largest cosine); :meth:`update` moves the centroids,
    in training mode only (a no-op in ``eval()``).
    """

    def __init__(self, n_clusters, dim, *, decay=0.999, seed=0):
        super().__init__()
        where = "OnlineKMeans"
        self.n_clusters = check_positive_int(n_clusters, "n_clusters", where)
        self.dim = check_positive_int(dim, "dim", where)
        self.decay = _check_decay(decay, where)
        g = torch.Generator().manual_seed(check_seed(seed, where))
        self.register_buffer("centroids", F.normalize(torch.randn(n_clusters, dim, generator=g), dim=-1))
        self.updates = 0

    def _check_x(self, x, where):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{where}: x must be a floating torch.Tensor (..., {self.dim})")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{where}: x must be (..., dim={self.dim}), got shape {tuple(x.shape)}")

    def assign(self, x):
        """x ``(..., dim)`` → the index of the nearest centroid to x̂ = x/‖x‖ ``(...)``, a LongTensor."""
        self._check_x(x, "OnlineKMeans.assign")
        return (F.normalize(x.detach(), dim=-1) @ self.centroids.to(x.dtype).t()).argmax(-1)

    @torch.no_grad()
    def update(self, x):
        """One EMA step on the vectors x ``(..., dim)`` (only in training mode); returns True if it updated.

        μ_c ← normalise(decay · μ_c + (1 − decay) · mean{x̂ : assign(x̂) = c}); a centroid with no member stays.
        """
        self._check_x(x, "OnlineKMeans.update")
        if not self.training:
            return False
        xh = F.normalize(x.detach().reshape(-1, self.dim), dim=-1).to(self.centroids.dtype)
        c = self.assign(xh)
        # per-cluster sums and counts of the members                                        (C, dim), (C,)
        sums = torch.zeros_like(self.centroids).index_add_(0, c, xh)
        counts = torch.zeros(self.n_clusters, dtype=xh.dtype, device=xh.device).index_add_(0, c, torch.ones_like(c, dtype=xh.dtype))
        has = counts > 0
        mean = sums / counts.clamp(min=1).unsqueeze(-1)
        moved = F.normalize(self.decay * self.centroids + (1 - self.decay) * mean, dim=-1)
        self.centroids.copy_(torch.where(has.unsqueeze(-1), moved, self.centroids))
        self.updates += 1
        return True

    def extra_repr(self):
        return f"n_clusters={self.n_clusters}, dim={self.dim}, decay={self.decay}"


def commitment_loss(x, centroids):
    """mean ‖x̂ − μ_{c(x̂)}‖² over the vectors x ``(..., D)``; μ the nearest of ``centroids (C, D)``, held fixed
    (no gradient reaches the centroids: they move by the EMA only)."""
    where = "commitment_loss"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating torch.Tensor (..., D)")
    _check_centroids(centroids, x.shape[-1], where)
    xh = F.normalize(x, dim=-1)
    mu = centroids.detach().to(x.dtype)
    nearest = mu[(xh.detach() @ mu.t()).argmax(-1)]
    return ((xh - nearest) ** 2).sum(-1).mean()


# --------------------------------------------------------------------------------------------------------------
# balanced routing and attention within clusters
# --------------------------------------------------------------------------------------------------------------


class RoutingClusters(NamedTuple):
    """Who is in which cluster: ``queries (B, H, C, w)`` and ``keys (B, H, C, w_k)`` hold positions (ascending)."""

    queries: torch.Tensor
    keys: torch.Tensor


def route(x, centroids, window):
    """Balanced routing: each centroid takes the ``window`` vectors of x ``(B, H, N, D)`` with the largest
    μ_c · x̂; returns their positions ``(B, H, C, window)``, sorted ascending."""
    # affinity of every normalised vector to every centroid                               (B, H, C, N)
    aff = (F.normalize(x, dim=-1) @ centroids.to(x.dtype).t()).transpose(-2, -1)
    return aff.topk(window, dim=-1).indices.sort(dim=-1).values


def routing_counts(clusters, T, S):
    """n_ij = the number of clusters holding both query i and key j ``(B, H, T, S)`` (int64): the pattern routing
    attention attends on (0 = not attended; a key sharing 2 clusters with the query counts twice)."""
    qi, ki = clusters
    B, H, C, _ = qi.shape
    inq = torch.zeros(B, H, C, T, device=qi.device).scatter_(-1, qi, 1.0)
    ink = torch.zeros(B, H, C, S, device=ki.device).scatter_(-1, ki, 1.0)
    # n_ij = Σ_c [i ∈ Q_c][j ∈ K_c]
    return torch.einsum("bhct,bhcs->bhts", inq, ink).round().long()


def _gather_rows(x, idx):
    """x ``(B, H, N, E)``, idx ``(B, H, C, w)`` → ``(B, H, C, w, E)``."""
    B, H, C, w = idx.shape
    flat = idx.reshape(B, H, C * w, 1).expand(B, H, C * w, x.shape[-1])
    return x.gather(2, flat).view(B, H, C, w, x.shape[-1])


def routing_attention(q, k, v, *, centroids, window=None, causal=False, mask=None, scale=None,
                      return_clusters=False, return_weights=False):
    """Attention within balanced k-means clusters; q ``(B,H,T,D)``, k ``(B,H,S,D)``, v ``(B,H,S,Dv)``.

    ``centroids (C, D)`` (unit rows, e.g. ``OnlineKMeans.centroids``); each takes its top-``window`` queries and
    top-``window`` keys by cosine (default ``window``: T // C for the queries, S // C for the keys). Scores are
    the ordinary q·k·scale; ``causal`` on the original positions; ``mask`` (True = may attend) applies inside the
    clusters. A query in several clusters: one softmax over all its clusters' keys (a key in two shared clusters
    counted twice); in none: output 0. ``return_weights`` → also the dense ``(B,H,T,S)`` weights;
    ``return_clusters`` → also a :class:`RoutingClusters`. Returns out[, weights][, clusters].
    """
    where = "routing_attention"
    B, H, T, S, D, Dv = check_qkv(q, k, v, where=where)
    C = _check_centroids(centroids, D, where)
    scale = check_scale(scale, D, where)
    if not isinstance(causal, bool):
        raise TypeError(f"{where}: causal must be a bool, got {type(causal).__name__}")
    mask = check_mask(mask, B, H, T, S, where=where)
    if window is None:
        wq, wk = max(1, T // C), max(1, S // C)
    else:
        check_positive_int(window, "window", where)
        if window > min(T, S):
            raise ValueError(f"{where}: window must be ≤ min(T, S) = {min(T, S)} (members per cluster), got {window}")
        wq = wk = window
    centroids = centroids.detach()
    qi, ki = route(q.detach(), centroids, wq), route(k.detach(), centroids, wk)  # (B, H, C, w)
    qc, kc, vc = _gather_rows(q, qi), _gather_rows(k, ki), _gather_rows(v, ki)
    # scores within each cluster s_ij = q_i · k_j · scale                                 (B, H, C, wq, wk)
    scores = (qc @ kc.transpose(-2, -1)) * scale
    allowed = allowed_mask(mask, False, T, S, q.device)
    pair = None
    if allowed is not None:
        # the mask at the gathered (query, key) pairs
        rows = allowed.expand(B, H, T, S).gather(2, qi.reshape(B, H, C * wq, 1).expand(B, H, C * wq, S))
        pair = rows.view(B, H, C, wq, S).gather(-1, ki.unsqueeze(-2).expand(B, H, C, wq, wk))
    if causal:
        # original positions: query i sees key j ≤ i
        tri = qi.unsqueeze(-1) >= ki.unsqueeze(-2)
        pair = tri if pair is None else pair & tri
    if pair is not None:
        scores = scores.masked_fill(~pair, float("-inf"))
    # one shift per query over all its clusters: m_i = max of its scores (a constant for autograd)
    with torch.no_grad():
        row_max = scores.amax(-1)  # (B, H, C, wq)
        m = torch.full((B, H, T), float("-inf"), dtype=q.dtype, device=q.device)
        m = m.scatter_reduce(-1, qi.reshape(B, H, -1), row_max.reshape(B, H, -1), "amax")
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # partial sums per cluster: e_ij = exp(s_ij − m_i), num_i = Σ_j e_ij v_j, den_i = Σ_j e_ij
    e = torch.exp(scores - m.gather(-1, qi.reshape(B, H, -1)).view(B, H, C, wq, 1))
    num = e @ vc  # (B, H, C, wq, Dv)
    den = e.sum(-1)  # (B, H, C, wq)
    # add the clusters' partial sums per query, then divide (0 where a query has nothing)
    flat = qi.reshape(B, H, C * wq)
    num_t = torch.zeros(B, H, T, Dv, dtype=num.dtype, device=q.device).scatter_add(
        2, flat.unsqueeze(-1).expand(B, H, C * wq, Dv), num.reshape(B, H, C * wq, Dv))
    den_t = torch.zeros(B, H, T, dtype=den.dtype, device=q.device).scatter_add(2, flat, den.reshape(B, H, C * wq))
    safe = torch.where(den_t > 0, den_t, torch.ones_like(den_t)).unsqueeze(-1)
    out = num_t / safe
    res = [out]
    if return_weights:
        # dense (B, H, T, S): weights_ij = Σ_c e_ij / den_i
        pos = (qi.unsqueeze(-1) * S + ki.unsqueeze(-2)).reshape(B, H, -1)
        w = torch.zeros(B, H, T * S, dtype=e.dtype, device=q.device).scatter_add(2, pos, e.reshape(B, H, -1))
        res.append(w.view(B, H, T, S) / safe)
    if return_clusters:
        res.append(RoutingClusters(qi, ki))
    return res[0] if len(res) == 1 else tuple(res)


# --------------------------------------------------------------------------------------------------------------
# the module a Transformer builds
# --------------------------------------------------------------------------------------------------------------

_KWARGS = ("n_clusters", "window", "decay", "commitment", "seed")


@register("routing")
class RoutingAttention(nn.Module):
    """Routing attention with its own online k-means; built by the model with ``cls(config)``.

    ``config.attention_kwargs``: ``n_clusters`` (default 4), ``window`` (None: T // n_clusters), ``decay``
    (0.999), ``commitment`` (weight of the commitment loss, 1e-4), ``seed`` (of the initial centroids; default 0).
    The centroids (one set per layer, shared by its heads, in dimension d_model / n_heads) are routed with, then
    — in training — updated with this batch's queries and keys. The commitment loss of the last forward is
    ``.aux_loss`` (weighted); inside a Transformer it is also recorded in the model's auxiliary-loss channel, so
    ``loss = lm_loss(...) + model.aux_loss()`` trains with it.
    """

    def __init__(self, config):
        super().__init__()
        where = "RoutingAttention"
        kw = dict(config.attention_kwargs)
        unknown = sorted(set(kw) - set(_KWARGS))
        if unknown:
            raise TypeError(f"{where}: unknown attention_kwargs {unknown}; expected some of {list(_KWARGS)}")
        self.n_clusters = check_positive_int(kw.get("n_clusters", 4), "n_clusters", where)
        self.window = kw.get("window")
        if self.window is not None:
            check_positive_int(self.window, "window", where)
        commitment = kw.get("commitment", 1e-4)
        if isinstance(commitment, bool) or not isinstance(commitment, (int, float)) or commitment < 0:
            raise ValueError(f"{where}: commitment must be a non-negative float, got {commitment!r}")
        self.commitment = float(commitment)
        self.kmeans = OnlineKMeans(self.n_clusters, config.d_model // config.n_heads, decay=kw.get("decay", 0.999),
                                   seed=kw.get("seed", 0))
        self.aux_loss = None
        self.last_clusters = None

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None, return_weights=False, **kwargs):
        # the model passes its attention_kwargs on every call too: the build-time ones are ignored here
        unknown = sorted(set(kwargs) - set(_KWARGS))
        if unknown:
            raise TypeError(f"RoutingAttention: unexpected keyword arguments {unknown}")
        res = routing_attention(q, k, v, centroids=self.kmeans.centroids, window=self.window, causal=causal,
                                mask=mask, scale=scale, return_clusters=True, return_weights=return_weights)
        self.last_clusters = res[-1]
        # commitment loss of the queries and keys to their (pre-update) centroids
        mu = self.kmeans.centroids
        self.aux_loss = self.commitment * (commitment_loss(q, mu) + commitment_loss(k, mu))
        channel = getattr(self, "aux_channel", None)  # set by effedu.model.Transformer on every module
        if channel is not None:
            channel.add(self.aux_loss)
        if self.training:
            self.kmeans.update(torch.cat([q.detach().flatten(0, 2), k.detach().flatten(0, 2)]))
        return res[:-1] if return_weights else res[0]


__all__ = ["OnlineKMeans", "commitment_loss", "route", "routing_counts", "routing_attention", "RoutingClusters",
           "RoutingAttention"]
