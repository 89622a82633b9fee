"""Reformer's LSH attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer", §2; survey §4.1 b).

Softmax attention is dominated by the few keys closest to the query. *Locality-sensitive hashing* puts close
vectors in the same bucket with high probability, so each query need only look inside its own bucket.

**Angular LSH.** Draw a random Gaussian matrix ``R_r`` (d × b/2) per hash round r; the bucket of x is

    h_r(x) = argmax([x R_r ; −x R_r])        ∈ {0, …, b − 1}

(a random rotation, then the nearest of b signed axes). For b = 2 this is the sign of one random projection,
and two vectors at angle θ land in the same bucket with probability **1 − θ/π** (:func:`collision_probability`).

**Attention.** Shared-QK (chapter 04, :mod:`effedu.attention.shared_qk`): keys = normalised queries, so q and k
hash alike; ``k`` is ignored; scale defaults to 1. Per round r:

  1. hash the keys → buckets; **sort** the tokens by (bucket, position);
  2. cut the sorted sequence into chunks of ``chunk_size`` c; each chunk attends to itself and to the chunk
     before it (no wrap-around: the first chunk has no previous chunk), only to keys of the **same bucket**,
     causal on the original positions, never to padding keys, and never to itself;
  3. un-sort: ``out_r``, ``lse_r`` (the log-sum-exp of the scores each token saw in that round).

The rounds are combined by their log-sum-exp:  ``out = Σ_r softmax_r(lse_r) · out_r``.

**Duplicates.** A pair (i, j) that meets in n_ij > 1 rounds would be counted n_ij times. With
``count_duplicates=True`` (the default, as Reformer's appendix and trax do) every round subtracts log n_ij from
that pair's score, so the combination is *exactly* softmax attention over the union of the pairs the rounds saw:
each pair counted once. ``count_duplicates=False`` leaves the scores alone (a pair seen in n rounds weighs n×).

**Self.** As in shared-QK, a token attends to itself only if it has nothing else to attend to in any round
(the first token of a causal sequence, or a token whose buckets are otherwise empty): then its output is v_i.

Cost per round O(T·c·D) time and O(T·c) memory, against O(T²) for dense attention; plus a sort, O(T log T).
The chunked step is :func:`effedu.kernels.lsh_attention.lsh_chunked_attention` (torch / numba / numba.cuda).
"""
from __future__ import annotations

import math

import torch

from .._checks import check_bool, check_mask, check_positive_int, check_scale, check_seed
from ..kernels.lsh_attention import lsh_chunked_attention
from ..kernels.masking import masked_softmax
from . import register
from .shared_qk import check_shared_qk_inputs, shared_qk_keys

WHERE = "lsh_attention"


def _check_lsh_sizes(n_buckets, n_rounds, where):
    check_positive_int(n_rounds, "n_rounds", where)
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int):
        raise TypeError(f"{where}: n_buckets must be an int, got {type(n_buckets).__name__}")
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"{where}: n_buckets must be an even int ≥ 2 (buckets come in ± pairs), got {n_buckets}")


def random_rotations(d, n_rounds, n_buckets, *, seed=0, generator=None, dtype=torch.float32, device=None):
    """The random projections of angular LSH: Gaussian ``(d, n_rounds, n_buckets // 2)`` (seeded).

    ``generator`` (a ``torch.Generator``) overrides ``seed``. Drawn on the CPU, then moved, so a seed gives the
    same rotations on every device.
    """
    where = "random_rotations"
    check_positive_int(d, "d", where)
    _check_lsh_sizes(n_buckets, n_rounds, where)
    if generator is None:
        generator = torch.Generator().manual_seed(check_seed(seed, where))
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    r = torch.randn(d, n_rounds, n_buckets // 2, generator=generator, dtype=torch.float64)
    return r.to(dtype=dtype, device=device)


def _check_rotations(rotations, d, where):
    if not isinstance(rotations, torch.Tensor) or rotations.dim() != 3 or not rotations.is_floating_point():
        raise ValueError(f"{where}: rotations must be a float tensor (d, n_rounds, n_buckets // 2), got "
                         f"{tuple(rotations.shape) if isinstance(rotations, torch.Tensor) else type(rotations).__name__}")
    if rotations.shape[0] != d:
        raise ValueError(f"{where}: rotations must have d={d} rows (the head dim), got shape {tuple(rotations.shape)}")
    return rotations.shape[1], 2 * rotations.shape[2]


def lsh_buckets(x, rotations):
    """Angular LSH buckets: LongTensor ``(..., n_rounds, n)`` for x ``(..., n, d)``.

    ``h_r(x) = argmax([x R_r ; −x R_r])`` per round r (Kitaev et al. 2020, §2), ``rotations`` ``(d, n_rounds,
    n_buckets // 2)`` from :func:`random_rotations`.
    """
    where = "lsh_buckets"
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"{where}: x must be a float tensor (..., n, d), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    _check_rotations(rotations, x.shape[-1], where)
    # x R_r for every round                                                         (..., n, n_rounds, b/2)
    xr = torch.einsum("...nd,drb->...rnb", x, rotations.to(x.dtype))
    # h = argmax over the b signed directions [xR ; −xR]                                      (..., r, n)
    return torch.cat([xr, -xr], dim=-1).argmax(dim=-1)


def collision_probability(theta):
    """Probability that two vectors at angle ``theta`` (radians, in [0, π]) share a bucket with b = 2: 1 − θ/π."""
    if isinstance(theta, torch.Tensor):
        return 1.0 - theta / math.pi
    return 1.0 - float(theta) / math.pi


def _sorted_ranks(buckets):
    """Sort each round by (bucket, position): the permutation ``perm`` (sorted → original) and ``rank``
    (original → sorted), both ``(..., n_rounds, T)``."""
    T = buckets.shape[-1]
    pos = torch.arange(T, device=buckets.device)
    perm = torch.argsort(buckets * T + pos, dim=-1)  # keys are distinct: the sort is stable by construction
    rank = torch.argsort(perm, dim=-1)
    return perm, rank


def lsh_attention_mask(buckets, chunk_size, *, causal=False):
    """Bool ``(B, H, n_rounds, T, T)``: which pairs (i, j) each round lets meet.

    Pair (i, j) meets in round r iff they share the bucket and, once sorted by (bucket, position), j's chunk is
    i's chunk or the one before it (no wrap-around); with ``causal`` also j ≤ i. The diagonal is True (a token
    always meets itself); :func:`lsh_attention` then drops it unless the token has nothing else, and drops
    padding keys. ``buckets`` ``(B, H, n_rounds, T)`` from :func:`lsh_buckets`.
    """
    where = "lsh_attention_mask"
    if not isinstance(buckets, torch.Tensor) or buckets.dim() != 4 or buckets.dtype != torch.int64:
        raise ValueError(f"{where}: buckets must be an int64 tensor (B, H, n_rounds, T)")
    T = buckets.shape[-1]
    check_positive_int(chunk_size, "chunk_size", where)
    if T % chunk_size:
        raise ValueError(f"{where}: chunk_size={chunk_size} must divide the sequence length T={T}")
    check_bool(causal, "causal", where)
    _, rank = _sorted_ranks(buckets)
    chunk = rank // chunk_size
    same = buckets.unsqueeze(-1) == buckets.unsqueeze(-2)
    gap = chunk.unsqueeze(-1) - chunk.unsqueeze(-2)  # chunk(i) − chunk(j)
    meet = same & (gap >= 0) & (gap <= 1)
    if causal:
        meet = meet & torch.ones(T, T, dtype=torch.bool, device=buckets.device).tril()
    return meet


def _key_valid(mask, B, H, T, where):
    """A padding mask (True = real key) as ``(B, H, T)``, or None; any other mask → ValueError."""
    m = check_mask(mask, B, H, T, T, where=where)
    if m is None:
        return None
    if m.shape[2] != 1:
        raise ValueError(f"{where}: only a padding (key) mask is supported, shaped (B, 1, 1, T) (query dim 1), got "
                         f"shape {tuple(mask.shape)}: LSH chooses the pairs itself, an arbitrary (T, T) mask would "
                         f"not be honoured")
    return m[:, :, 0, :].expand(B, H, T)


def _softmax_weights(lse, dim):
    """``exp(lse − logsumexp(lse))`` along ``dim``; all −inf → zeros (never NaN), with finite gradients."""
    with torch.no_grad():
        mx = lse.amax(dim=dim, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(lse - mx)
    tot = e.sum(dim=dim, keepdim=True)
    return e / torch.where(tot > 0, tot, torch.ones_like(tot))


def _gather(x, idx):
    """``x (B, H, T, F)`` gathered along T by ``idx (B, H, R, T)`` → ``(B, H, R, T, F)``."""
    B, H, R, T = idx.shape
    F = x.shape[-1]
    return torch.gather(x.unsqueeze(2).expand(B, H, R, T, F), 3, idx.unsqueeze(-1).expand(B, H, R, T, F))


def _duplicate_counts(qpos, kpos, buckets, rank, chunk_size, dtype):
    """n_ij: in how many rounds query ``qpos`` ``(B, H, R, T, 1)`` and key ``kpos`` ``(B, H, R, T, W)`` meet.

    Per round one packed code per token, code = bucket·(n_chunks + 1) + chunk: two tokens meet iff
    code_i − code_j ∈ {0, 1} (the stride n_chunks + 1 makes a difference of 0 or 1 impossible across buckets).
    """
    B, H, R, T = buckets.shape
    W = kpos.shape[-1]
    stride = T // chunk_size + 1
    codes = (buckets * stride + rank // chunk_size).to(torch.int32)  # (B, H, R, T)
    count = torch.zeros(kpos.shape, dtype=dtype, device=kpos.device)
    flat_q, flat_k = qpos.reshape(B, H, -1), kpos.reshape(B, H, -1)
    for r2 in range(R):
        cq = torch.gather(codes[:, :, r2], 2, flat_q).reshape(B, H, R, T, 1)
        ck = torch.gather(codes[:, :, r2], 2, flat_k).reshape(B, H, R, T, W)
        gap = cq - ck
        count += ((gap == 0) | (gap == 1)).to(dtype)
    return count


@register("lsh")
def lsh_attention(q, k, v, *, causal=False, mask=None, n_buckets=8, n_rounds=2, chunk_size=32, seed=0, scale=None,
                  rotations=None, count_duplicates=True, backend="auto", return_weights=False,
                  return_buckets=False):
    """Reformer LSH attention (shared-QK); q, v ``(B, H, T, D|Dv)`` → ``(B, H, T, Dv)``. ``k`` is ignored (None or
    shaped like q): the keys are the normalised queries.

    ``n_buckets`` (even ≥ 2) and ``n_rounds`` (≥ 1) size the hash; ``rotations`` ``(D, n_rounds, n_buckets//2)``
    overrides them and ``seed`` (else :func:`random_rotations` draws them from ``seed``: the same seed, the same
    buckets in every layer and step, as a fixed hash). ``chunk_size`` must divide T. ``mask``: a padding mask
    (B, 1, 1, T) only. ``scale`` defaults to 1 (unit keys). ``count_duplicates=True`` (default): a pair met in
    several rounds counts once (score − log n_ij); ``False``: n_ij times. ``backend`` of the chunked kernel
    ("auto", "torch", "numba", "cuda"). ``return_weights=True`` also returns the effective ``(B, H, T, T)``
    weights (computed densely, O(T²): for plots); ``return_buckets=True`` also returns the buckets
    ``(B, H, n_rounds, T)``. Returns ``out`` or a tuple ``(out[, weights][, buckets])``.
    """
    where = WHERE
    check_shared_qk_inputs(q, k, v, where, "LSH attention")
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    for name, val in (("causal", causal), ("count_duplicates", count_duplicates),
                      ("return_weights", return_weights), ("return_buckets", return_buckets)):
        check_bool(val, name, where)
    scale = 1.0 if scale is None else check_scale(scale, D, where)
    check_positive_int(chunk_size, "chunk_size", where)
    if T % chunk_size:
        raise ValueError(f"{where}: chunk_size={chunk_size} must divide the sequence length T={T} "
                         f"(pad the sequence or pick a divisor)")
    if rotations is None:
        _check_lsh_sizes(n_buckets, n_rounds, where)
        rotations = random_rotations(D, n_rounds, n_buckets, seed=check_seed(seed, where), dtype=q.dtype,
                                     device=q.device)
    else:
        n_rounds, n_buckets = _check_rotations(rotations, D, where)
    valid = _key_valid(mask, B, H, T, where)
    R, c = n_rounds, chunk_size

    keys = shared_qk_keys(q)
    with torch.no_grad():
        buckets = lsh_buckets(keys, rotations)  # (B, H, R, T)
        perm, rank = _sorted_ranks(buckets)
    # sort each round by (bucket, position)                                             (B, H, R, T, ·)
    qs, ks, vs = _gather(q, perm), _gather(keys, perm), _gather(v, perm)
    bs = torch.gather(buckets, 3, perm)
    # the additive bias on each sorted row's window of 2c keys: padding (−inf) and duplicates (−log n_ij)
    bias = None
    if valid is not None or count_duplicates and R > 1:
        with torch.no_grad():
            j = torch.arange(2 * c, device=q.device)
            win = (torch.arange(T, device=q.device) // c * c - c).unsqueeze(-1) + j  # window → sorted index
            win = win.clamp(0, T - 1)  # chunk 0's missing previous chunk: clamped (the kernel refuses it)
            kpos = perm[..., win]  # original positions of each sorted row's window keys     (B, H, R, T, 2c)
            bias = torch.zeros(B, H, R, T, 2 * c, dtype=q.dtype, device=q.device)
            if count_duplicates and R > 1:
                n = _duplicate_counts(perm.unsqueeze(-1), kpos, buckets, rank, c, q.dtype)
                bias = bias - torch.log(n.clamp_min(1))
            if valid is not None:
                kval = torch.gather(valid.unsqueeze(2).expand(B, H, R, T), 3, kpos.reshape(B, H, R, -1))
                bias = bias.masked_fill(~kval.reshape(B, H, R, T, 2 * c), -math.inf)
            bias = bias.reshape(B * H * R, T, 2 * c)
    flat = lambda x: x.reshape(B * H * R, T, x.shape[-1])  # noqa: E731
    out_s, lse_s = lsh_chunked_attention(flat(qs), flat(ks), flat(vs), perm.reshape(-1, T), bs.reshape(-1, T),
                                         chunk_size=c, causal=causal, scale=scale, backend=backend, bias=bias,
                                         exclude_self=True)
    # un-sort: round r's output for original position t sits at sorted index rank[t]
    out_r = torch.gather(out_s.reshape(B, H, R, T, Dv), 3, rank.unsqueeze(-1).expand(B, H, R, T, Dv))
    lse_r = torch.gather(lse_s.reshape(B, H, R, T), 3, rank)
    # combine the rounds: out = Σ_r softmax_r(lse_r) out_r
    w = _softmax_weights(lse_r, dim=2)
    out = (w.unsqueeze(-1) * out_r).sum(dim=2)
    # self: a token that met nobody else in any round attends to itself (if it is not a padding key)
    alone = ~torch.isfinite(lse_r).any(dim=2)  # (B, H, T)
    self_ok = alone if valid is None else alone & valid
    out = torch.where(self_ok.unsqueeze(-1), v, out)

    extra = []
    if return_weights:
        extra.append(_effective_weights(q, keys, buckets, valid, c, causal, scale, count_duplicates))
    if return_buckets:
        extra.append(buckets)
    return (out, *extra) if extra else out


def _effective_weights(q, keys, buckets, valid, chunk_size, causal, scale, count_duplicates):
    """The T×T weights LSH attention applies, computed densely (for plots): Σ_r softmax_r(lse_r) · p_r."""
    with torch.no_grad():
        B, H, T, _ = q.shape
        meet = lsh_attention_mask(buckets, chunk_size, causal=causal)  # (B, H, R, T, T)
        eye = torch.eye(T, dtype=torch.bool, device=q.device)
        allowed = meet & ~eye
        if valid is not None:
            allowed = allowed & valid[:, :, None, None, :]
        s = ((q @ keys.transpose(-2, -1)) * scale).unsqueeze(2)  # (B, H, 1, T, T)
        if count_duplicates:
            s = s - torch.log(meet.sum(dim=2, keepdim=True).clamp_min(1).to(q.dtype))
        s = s.expand_as(allowed)
        lse = torch.logsumexp(s.masked_fill(~allowed, -math.inf), dim=-1)  # (B, H, R, T)
        p = masked_softmax(s, allowed)
        w = _softmax_weights(lse, dim=2)
        weights = (w.unsqueeze(-1) * p).sum(dim=2)
        alone = ~allowed.any(dim=-1).any(dim=2)
        self_ok = alone if valid is None else alone & valid
        return torch.where(self_ok.unsqueeze(-1) & eye, torch.ones_like(weights), weights)


__all__ = ["random_rotations", "lsh_buckets", "collision_probability", "lsh_attention_mask", "lsh_attention"]
