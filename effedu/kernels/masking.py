"""Masks and the masked softmax every explicit-weights attention shares.

Masks are boolean with True = "may attend". ``causal=True`` lets query i see key j ≤ i (top-left aligned, as
``F.scaled_dot_product_attention(is_causal=True)``). A query row with nothing to attend to (all masked) gets
weights 0, never NaN — the textbook ``masked_fill(-inf)`` + softmax would give 0/0.

These live in the kernels layer so that both the kernels' torch references and ``effedu.attention`` can use
them without the kernels importing a layer above them.
"""
from __future__ import annotations

import torch


def allowed_mask(mask, causal, T, S, device, B=1, H=1, causal_align="top_left"):
    """Combine a boolean ``mask`` (already checked, 4-D or None) and ``causal`` into one (·,·,T,S) mask or None.

    ``causal_align="bottom_right"`` aligns the causal diagonal to the end: query i sees key j ≤ i + S − T.
    """
    if causal_align not in ("top_left", "bottom_right"):
        raise ValueError(f"allowed_mask: causal_align must be 'top_left' or 'bottom_right', got {causal_align!r}")
    allowed = mask
    if causal:
        # query i may see key j iff j ≤ i (top-left), j ≤ i + S − T (bottom-right)          (T, S)
        tri = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T if causal_align == "bottom_right" else 0)
        allowed = tri.view(1, 1, T, S) if allowed is None else allowed & tri
    return allowed


def masked_softmax(scores, allowed=None):
    """Row softmax of ``scores`` over the last dim, with an optional boolean ``allowed`` (True = may attend).

    A fully masked row gives weights 0, never NaN. Shared by every attention that forms its weights explicitly.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    # subtract the row maximum before exp (softmax is shift-invariant; exp cannot overflow). The shift is a
    # constant for autograd: no_grad, so no node is built (and nothing saved) for it
    with torch.no_grad():
        row_max = scores.amax(dim=-1, keepdim=True)
    # a fully masked row has max −inf: shift it by 0 instead, its exps are exp(−inf) = 0
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    # weights_ij = p_ij / Σ_j p_ij ; an empty row has Σ = 0 → weights 0 (not 0/0)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


__all__ = ["allowed_mask", "masked_softmax"]
