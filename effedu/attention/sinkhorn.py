"""Sparse Sinkhorn attention (survey §4.1 c; Tay, Bahri, Yang, Metzler & Juan 2020, *Sparse Sinkhorn Attention*).

Block-local attention (chapter 15) is cheap but blind beyond its block. Tay et al. let each block of queries also
see *one other block of keys*, picked by a learned **sorting** of the blocks: a small network scores every pair
of blocks, the score matrix is made (nearly) a permutation matrix, and the key/value blocks are re-ordered by it.
Query block i then attends to its own block (local) and to block i of the sorted sequence ("local + sorted").

* **Sinkhorn normalisation** (Sinkhorn 1964; Adams & Zemel 2011): alternately normalising the rows and the
  columns of a positive matrix converges to a *doubly stochastic* one (rows and columns sum to 1) — the convex
  hull of permutation matrices. In the log domain (no overflow):
  S⁰ = log α,  S ← S − logsumexp_rows(S),  S ← S − logsumexp_cols(S),  P = exp(S)  (:func:`sinkhorn`).
* **Gumbel-Sinkhorn** (Mena et al. 2018): P = sinkhorn((log α + g)/τ), g Gumbel noise. As the temperature
  τ → 0 P tends to a hard permutation (a sample of the Gumbel-matching distribution); large τ gives a blurred one
  (:func:`gumbel_sinkhorn`).
* **Sorted blocks**: with blocks K_j (b keys each), sorted block i = Σ_j P_ij K_j (a soft mixture of blocks; a
  hard P picks one). Cost: local b² + sorted b² per query block, O(n·b), plus the nb×nb sort matrix.
* **Causal** (our version of Tay's causal balancing): the sorting row of block i is computed from the mean of the
  keys of the blocks *before* i, and its sorted block may only mix earlier blocks j < i (P's entries j ≥ i are
  dropped and the row renormalised; a row with nothing left — block 0 — has no sorted part). The local part is
  causal on positions.

Registered: ``"sinkhorn"`` (:class:`SinkhornAttention`: the sorting network, mean-pooled block keys → linear →
sort logits, Gumbel noise in training). An arbitrary ``mask`` cannot apply to mixtures of blocks: refused.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_positive_int, check_qkv, check_scale
from ..kernels.masking import masked_softmax
from . import register

# --------------------------------------------------------------------------------------------------------------
# Sinkhorn normalisation
# --------------------------------------------------------------------------------------------------------------


def _check_square(x, name, where):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating torch.Tensor (..., n, n)")
    if x.dim() < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{where}: {name} must be square in its last two dims (..., n, n), got shape {tuple(x.shape)}")


def _check_temperature(temperature, where):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{where}: temperature must be a positive float, got {type(temperature).__name__}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"{where}: temperature must be a positive float, got {temperature}")
    return float(temperature)


def sinkhorn(log_alpha, n_iters=8):
    """exp of ``n_iters`` rounds of log-domain row then column normalisation of ``log_alpha (..., n, n)``: a
    (nearly) doubly stochastic matrix — its columns sum to 1 exactly, its rows → 1 as ``n_iters`` grows."""
    where = "sinkhorn"
    _check_square(log_alpha, "log_alpha", where)
    check_positive_int(n_iters, "n_iters", where)
    s = log_alpha
    for _ in range(n_iters):
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)  # rows sum to 1
        s = s - torch.logsumexp(s, dim=-2, keepdim=True)  # columns sum to 1
    return s.exp()


def gumbel_noise(shape, *, generator=None, dtype=torch.float32, device=None, eps=1e-20):
    """Standard Gumbel samples g = −log(−log U), U ~ Uniform(0, 1)."""
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    return -torch.log(-torch.log(u + eps) + eps)


def gumbel_sinkhorn(log_alpha, *, temperature=0.75, n_iters=8, noise=True, generator=None):
    """sinkhorn((log α + g) / τ): a soft permutation, harder as τ → 0; ``noise=False`` drops g (evaluation)."""
    where = "gumbel_sinkhorn"
    _check_square(log_alpha, "log_alpha", where)
    temperature = _check_temperature(temperature, where)
    check_positive_int(n_iters, "n_iters", where)
    if noise:
        g = gumbel_noise(log_alpha.shape, generator=generator, dtype=log_alpha.dtype,
                         device=None if generator is not None else log_alpha.device).to(log_alpha.device)
        log_alpha = log_alpha + g
    return sinkhorn(log_alpha / temperature, n_iters)


# --------------------------------------------------------------------------------------------------------------
# local + sorted block attention
# --------------------------------------------------------------------------------------------------------------


def _blocks(T, block_size, where):
    check_positive_int(block_size, "block_size", where)
    if T % block_size:
        raise ValueError(f"{where}: block_size={block_size} must divide the sequence length T={T}")
    return T // block_size


def causal_permutation(P):
    """Keep only P_ij with j < i (a block's sorted part mixes earlier blocks only), rows renormalised (0 if none)."""
    nb = P.shape[-1]
    earlier = torch.ones(nb, nb, dtype=torch.bool, device=P.device).tril(-1)
    P = P * earlier
    s = P.sum(-1, keepdim=True)
    return P / torch.where(s > 0, s, torch.ones_like(s))


def sinkhorn_attention(q, k, v, *, sort_logits=None, block_size, causal=False, mask=None, scale=None,
                       return_weights=False, n_iters=8, permutation=None):
    """Local + sorted block attention; q ``(B,H,T,D)``, k ``(B,H,T,D)``, v ``(B,H,T,Dv)`` (self-attention).

    The soft permutation of the ``nb = T / block_size`` blocks is ``P = sinkhorn(sort_logits, n_iters)``
    (``sort_logits (B,H,nb,nb)``, or broadcastable), or ``permutation`` given directly (exactly one of the two).
    Query block i attends, in one softmax, to the keys of block i and of sorted block Σ_j P_ij K_j (values
    likewise). ``causal``: see the module docstring. ``return_weights`` → also the effective ``(B,H,T,T)`` weights
    (a sorted slot's weight spread over the blocks it mixes, by P): ``out = weights @ v`` exactly.
    """
    where = "sinkhorn_attention"
    B, H, T, S, D, Dv = check_qkv(q, k, v, where=where)
    if S != T:
        raise ValueError(f"{where}: self-attention only (blocks of keys are sorted against blocks of queries), "
                         f"got T={T}, S={S}")
    if mask is not None:
        raise ValueError(f"{where}: an arbitrary mask is not supported: the sorted blocks are mixtures of key blocks, "
                         f"a position mask cannot apply to them (only causal=True); use attention='dense' for masks")
    if not isinstance(causal, bool):
        raise TypeError(f"{where}: causal must be a bool, got {type(causal).__name__}")
    scale = check_scale(scale, D, where)
    nb = _blocks(T, block_size, where)
    b = block_size
    if (sort_logits is None) == (permutation is None):
        raise ValueError(f"{where}: give exactly one of sort_logits (B, H, nb, nb) and permutation (B, H, nb, nb)")
    given = "sort_logits" if permutation is None else "permutation"
    x = sort_logits if permutation is None else permutation
    _check_square(x, given, where)
    if x.shape[-1] != nb or x.dim() > 4:
        raise ValueError(f"{where}: {given} must be (B, H, nb, nb) with nb = T / block_size = {nb}, got shape "
                         f"{tuple(x.shape)}")
    P = sinkhorn(sort_logits, n_iters) if permutation is None else permutation
    P = P.to(q.dtype)
    if causal:
        P = causal_permutation(P)
    P = P.expand(B, H, nb, nb)
    qb = q.view(B, H, nb, b, D)
    kb, vb = k.view(B, H, nb, b, D), v.view(B, H, nb, b, Dv)
    # sorted blocks: K̃_i = Σ_j P_ij K_j, Ṽ_i = Σ_j P_ij V_j                              (B, H, nb, b, ·)
    ks = torch.einsum("bhij,bhjsd->bhisd", P, kb)
    vs = torch.einsum("bhij,bhjsd->bhisd", P, vb)
    # each query block: its own b keys, then the b sorted keys                           (B, H, nb, b, 2b)
    scores = torch.cat([qb @ kb.transpose(-2, -1), qb @ ks.transpose(-2, -1)], dim=-1) * scale
    allowed = None
    if causal:
        local = torch.ones(b, b, dtype=torch.bool, device=q.device).tril()
        has_sorted = P.sum(-1) > 0  # (B, H, nb): block 0 (and a hard P pointing forward) has no sorted part
        allowed = torch.cat([local.expand(B, H, nb, b, b),
                             has_sorted[..., None, None].expand(B, H, nb, b, b)], dim=-1)
    w = masked_softmax(scores, allowed)
    out = w[..., :b] @ vb + w[..., b:] @ vs
    out = out.reshape(B, H, T, Dv)
    if not return_weights:
        return out
    # effective weights on positions: local block i at (i, t); sorted slot t of block i at (j, t) with P_ij
    eye = torch.eye(nb, dtype=q.dtype, device=q.device)
    eff = (torch.einsum("bhiqt,ij->bhiqjt", w[..., :b], eye)
           + torch.einsum("bhiqt,bhij->bhiqjt", w[..., b:], P))
    return out, eff.reshape(B, H, T, T)


# --------------------------------------------------------------------------------------------------------------
# the module a Transformer builds: the sorting network
# --------------------------------------------------------------------------------------------------------------

_KWARGS = ("block_size", "n_iters", "temperature", "noise")


def block_means(k, block_size, *, causal=False):
    """Mean-pooled keys per block ``(B, H, nb, D)``; ``causal``: block i gets the mean of blocks 0…i−1 (0 for i=0)."""
    B, H, T, D = k.shape
    nb = _blocks(T, block_size, "block_means")
    m = k.view(B, H, nb, block_size, D).mean(-2)
    if not causal:
        return m
    # cumulative mean of the blocks strictly before i
    cs = torch.cumsum(m, dim=2) - m
    count = torch.arange(nb, device=k.device, dtype=k.dtype).clamp(min=1).view(1, 1, nb, 1)
    return cs / count


@register("sinkhorn")
class SinkhornAttention(nn.Module):
    """Sparse Sinkhorn attention with a learned sorting network; built by the model with ``cls(config)``.

    ``config.attention_kwargs``: ``block_size`` (default 16; must divide T), ``n_iters`` (8), ``temperature`` τ
    (0.75), ``noise`` (True: Gumbel noise in training mode; never in eval). Sort logits of block i =
    ``sort_net(mean of block i's keys)`` — a ``Linear(d_head, max_len // block_size)`` shared by the heads, its
    first nb outputs used (causal: the mean of the blocks before i). ``last_permutation`` holds the last P.
    """

    def __init__(self, config):
        super().__init__()
        where = "SinkhornAttention"
        kw = dict(config.attention_kwargs)
        unknown = sorted(set(kw) - set(_KWARGS))
        if unknown:
            raise TypeError(f"{where}: unknown attention_kwargs {unknown}; expected some of {list(_KWARGS)}")
        self.block_size = check_positive_int(kw.get("block_size", 16), "block_size", where)
        self.n_iters = check_positive_int(kw.get("n_iters", 8), "n_iters", where)
        self.temperature = _check_temperature(kw.get("temperature", 0.75), where)
        self.noise = bool(kw.get("noise", True))
        self.max_blocks = max(1, config.max_len // self.block_size)
        self.sort_net = nn.Linear(config.d_model // config.n_heads, self.max_blocks)
        self.last_permutation = None

    def sort_logits(self, k, causal=False):
        """The sorting network's logits ``(B, H, nb, nb)`` for keys k ``(B, H, T, D)``."""
        nb = _blocks(k.shape[2], self.block_size, "SinkhornAttention")
        if nb > self.max_blocks:
            raise ValueError(f"SinkhornAttention: T={k.shape[2]} gives {nb} blocks, more than max_len // block_size "
                             f"= {self.max_blocks}")
        return self.sort_net(block_means(k, self.block_size, causal=causal))[..., :nb]

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None, return_weights=False, **kwargs):
        unknown = sorted(set(kwargs) - set(_KWARGS))
        if unknown:
            raise TypeError(f"SinkhornAttention: unexpected keyword arguments {unknown}")
        logits = self.sort_logits(k, causal)
        P = gumbel_sinkhorn(logits, temperature=self.temperature, n_iters=self.n_iters,
                            noise=self.noise and self.training)
        self.last_permutation = P.detach()
        return sinkhorn_attention(q, k, v, permutation=P, block_size=self.block_size, causal=causal, mask=mask,
                                  scale=scale, return_weights=return_weights)


__all__ = ["sinkhorn", "gumbel_sinkhorn", "gumbel_noise", "sinkhorn_attention", "causal_permutation", "block_means",
           "SinkhornAttention"]
