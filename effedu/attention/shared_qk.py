"""Reformer's shared-QK attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer"; survey §3.3).

One projection gives the queries, and the keys are the *normalised* queries::

    kⱼ = qⱼ / ‖qⱼ‖,      s_ij = qᵢ · kⱼ · scale,      out = softmax_j(s_ij) V

Since q·q is the largest dot product a query can have, a token would attend mostly to itself, so a token may not
attend to itself unless it has nothing else to attend to (the first token of a causal sequence). The rest is the
ordinary softmax attention of chapter 01 with these keys and this mask.

This is the attention function, registered as ``"shared_qk"``. Chapter 04 (:mod:`effedu.general.sharing`) builds
on it: ``SharedQKMultiHeadAttention`` drops the key projection from the layer, ``share_qk(model)`` swaps it into a
model, and the parameter counts say what that saves.
"""
from __future__ import annotations

import torch

from .._checks import check_bool, check_mask, check_qkv, check_scale
from . import register
from .dense import allowed_mask, softmax_attention


def shared_qk_keys(q):
    """The Reformer keys: kⱼ = qⱼ / ‖qⱼ‖ (unit length per token and head; a zero query gives a zero key)."""
    # ‖q‖ clamped at the dtype's smallest normal number, so q = 0 gives k = 0 instead of 0/0
    norm = q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    # k_j = q_j / ‖q_j‖                                                                      (B, H, T, D)
    return q / norm


def shared_qk_mask(T, *, causal=False, mask=None, device=None):
    """Boolean ``(·, ·, T, T)`` mask (True = may attend) of shared-QK attention: the usual causal/padding mask,
    minus the diagonal in every row that has some other key allowed.

    A row whose only allowed key is itself (the first token of a causal sequence) keeps it; a row with nothing
    allowed stays empty (its output is 0, as in :func:`~effedu.attention.dense.softmax_attention`).
    """
    base = allowed_mask(mask, causal, T, T, device)
    if base is None:
        base = torch.ones(1, 1, T, T, dtype=torch.bool, device=device)
    eye = torch.eye(T, dtype=torch.bool, device=device)
    # others_ij = allowed_ij ∧ (i ≠ j)
    others = base & ~eye
    # a row keeps its diagonal only when it has no other key: allowed'_i = others_i if any(others_i) else allowed_i
    has_other = others.any(dim=-1, keepdim=True)
    return torch.where(has_other, others, base)


def check_shared_qk_inputs(q, k, v, where, what):
    """The input checks of every shared-QK attention (this one, Reformer's LSH in chapter 16): ``k`` is ignored
    but must be None or shaped like q, v has the queries' length (self-attention), then the usual q/v checks."""
    if k is not None:
        if not isinstance(k, torch.Tensor):
            raise TypeError(f"{where}: k must be None or a torch.Tensor (it is ignored), got {type(k).__name__}")
        if k.shape != q.shape:
            raise ValueError(f"{where}: k is ignored (keys are the normalised queries) but must be None or shaped "
                             f"like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor) and q.dim() == v.dim() == 4 \
            and v.shape[2] != q.shape[2]:
        raise ValueError(f"{where}: {what} is self-attention: v must have the queries' length "
                         f"T={q.shape[2]}, got {v.shape[2]}")
    check_qkv(q, q, v, where=where)


@register("shared_qk")
def shared_qk_attention(q, k, v, *, mask=None, causal=False, scale=None, return_weights=False):
    """Reformer's shared-QK attention: the keys are the normalised queries; ``k`` is **ignored**.

        kⱼ = qⱼ / ‖qⱼ‖,      s_ij = qᵢ · kⱼ · scale,      out = softmax_j(s_ij, j ≠ i unless i has no other j) V

    q ``(B, H, T, D)``, v ``(B, H, T, Dv)``; ``k`` may be ``None`` or a tensor shaped like q — it is there only so
    that the function fits the attention signature and can be picked with ``TransformerConfig(attention=
    "shared_qk")`` (registered in :data:`effedu.attention.BUILTIN`). In that use the model's fused ``qkv``
    projection still computes k, and the k third of it (d² + d parameters per layer) is dead weight with zero
    gradient: :class:`effedu.general.sharing.SharedQKMultiHeadAttention` (chapter 04) is the honest version
    without it.

    ``scale`` defaults to **1**, not 1/√D: the usual 1/√D compensates for keys of length ≈ √D, but these keys
    have length 1. (Trax and Hugging Face normalise the keys to length √D and divide by √D: the same scores.)
    """
    where = "shared_qk_attention"
    check_shared_qk_inputs(q, k, v, where, "shared-QK")
    B, H, T, _ = q.shape
    scale = 1.0 if scale is None else check_scale(scale, q.shape[-1], where)
    check_bool(causal, "causal", where)
    mask = check_mask(mask, B, H, T, T, where=where)
    keys = shared_qk_keys(q)
    allowed = shared_qk_mask(T, causal=causal, mask=mask, device=q.device)
    # the rest is ordinary softmax attention (chapter 01) with these keys and this mask
    return softmax_attention(q, keys, v, mask=allowed, scale=scale, return_weights=return_weights)


__all__ = ["shared_qk_keys", "shared_qk_mask", "check_shared_qk_inputs", "shared_qk_attention"]
