"""Scaled dot-product attention, written out (Vaswani et al. 2017; survey §2).

For queries Q ∈ ℝ^{T×d}, keys K ∈ ℝ^{S×d} and values V ∈ ℝ^{S×d_v}:

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V

The T×S matrix of scores is *materialised*: that is the O(n²) time and memory the rest of the course works to
avoid. Masks are boolean with True = "may attend"; ``causal=True`` lets query i see keys j ≤ i (top-left
aligned, as ``F.scaled_dot_product_attention(is_causal=True)``). A query row with nothing to attend to (all
masked) gets weights 0 and output 0, never NaN — the textbook ``masked_fill(-inf)`` + softmax would give 0/0.

:func:`masked_softmax` and :func:`allowed_mask` live in :mod:`effedu.kernels.masking` (the kernels' torch
references use them too, and kernels sit below attention); they are re-exported here.
"""
from __future__ import annotations

from .._checks import check_mask, check_qkv, check_scale
from ..kernels.masking import allowed_mask, masked_softmax  # one definition, shared with the kernels' references
from . import register


@register("dense")
def softmax_attention(q, k, v, *, mask=None, causal=False, scale=None, return_weights=False):
    """softmax(q kᵀ · scale) v with the full score matrix; q ``(B,H,T,D)``, k ``(B,H,S,D)``, v ``(B,H,S,Dv)``.

    Returns ``out (B, H, T, Dv)``, and the weights ``(B, H, T, S)`` too when ``return_weights=True``.
    """
    B, H, T, S, D, _ = check_qkv(q, k, v, where="softmax_attention")
    scale = check_scale(scale, D, "softmax_attention")
    if not isinstance(causal, bool):
        raise TypeError(f"softmax_attention: causal must be a bool, got {type(causal).__name__}")
    mask = check_mask(mask, B, H, T, S, where="softmax_attention")
    allowed = allowed_mask(mask, causal, T, S, q.device)

    # scores s_ij = q_i · k_j · scale                                                     (B, H, T, S)
    scores = (q @ k.transpose(-2, -1)) * scale
    weights = masked_softmax(scores, allowed)
    out = weights @ v
    return (out, weights) if return_weights else out


@register("tiled")
def tiled_attention(q, k, v, *, mask=None, causal=False, scale=None, return_weights=False, backend="auto",
                    causal_align="top_left"):
    """The same attention through ``effedu.kernels.attention`` (online softmax, no T×S matrix).

    The kernel takes no arbitrary mask and never forms the weights, so ``mask`` and ``return_weights`` are
    refused with a clear error rather than ignored. ``causal_align="bottom_right"``: with more keys than queries,
    query i sees keys j ≤ i + S − T (a memory in front of the segment). Differentiable on every backend (chapter
    19's backward by recomputation); ``backend="auto"`` picks numba on the CPU.
    """
    from .. import kernels

    if mask is not None:
        raise ValueError("tiled_attention: mask is not supported by the tiled kernel (only causal=); use 'dense'")
    if return_weights:
        raise ValueError("tiled_attention: return_weights=True is impossible without the T×S matrix; use 'dense'")
    return kernels.attention(q, k, v, causal=causal, scale=scale, backend=backend, causal_align=causal_align)


__all__ = ["softmax_attention", "masked_softmax", "tiled_attention", "allowed_mask"]
