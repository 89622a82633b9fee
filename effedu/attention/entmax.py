"""α-entmax: a softmax that can give *exact zeros* (survey §4.1 c; Peters, Niculae & Martins 2019, *Sparse
Sequence-to-Sequence Models*; Correia, Niculae & Martins 2019, *Adaptively Sparse Transformers*).

Softmax never gives a weight of exactly 0: every key gets some attention. α-entmax replaces it by

    entmax_α(z)_i = [(α − 1) z_i − τ]_+ ^ (1/(α−1)),      τ the one threshold with Σ_i p_i = 1

α → 1 is softmax, α = 2 is sparsemax (Martins & Astudillo 2016: the Euclidean projection of z onto the simplex),
α = 1.5 lies between: keys whose score falls below the threshold get *exactly* zero weight, so each query learns
how many keys it looks at ("adaptively sparse": Correia et al. learn α per head). The sum Σ_i p_i is decreasing in
τ, so τ is found by **bisection** (:func:`entmax_bisect`, any α); for α = 1.5 and α = 2 a **sort** of z gives τ
exactly (:func:`entmax15`, :func:`sparsemax`).

**Backward (closed form).** On the support S = {i : p_i > 0}, p_i = (X_i − τ)^{1/(α−1)} with X = (α − 1) z.
Differentiating Σ_i p_i = 1 gives dτ, and with g_i = p_i^{2−α} (0 off the support):

    ∂p_i/∂z_j = g_i (δ_ij − g_j / Σ_k g_k)   ⇒   dz = g ⊙ dp − g · (Σ_k g_k dp_k) / Σ_k g_k

softmax's Jacobian is the case g = p (α = 1). For α itself (a learnable per-head α), with S_i = p_i log p_i,
H = Σ_k S_k and p̃ = g / Σ g:  ∂L/∂α = Σ_i dp_i [ (p_i − p̃_i)/(α−1)² − (S_i − p̃_i H)/(α−1) ].

**Cost.** Bisection runs ``n_iter`` passes over the row (50 by default) where softmax runs one: the survey quotes
entmax attention as "25 % slower" than softmax with an optimised implementation; measure it yourself
(chapter 16's notebook). Registered: ``"entmax"`` (:func:`entmax_attention`). The PyPI ``entmax`` package is the
oracle of the tests, never the implementation.
"""
from __future__ import annotations

import torch

from .._checks import check_mask, check_qkv, check_scale
from ..kernels.masking import allowed_mask
from . import register

# --------------------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------------------


def _check_z(z, where):
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{where}: z must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{where}: z must have a floating dtype, got {z.dtype}")
    if z.dim() == 0:
        raise ValueError(f"{where}: z must have at least 1 dimension, got a scalar")


def _check_dim(dim, z, where):
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{where}: dim must be an int, got {type(dim).__name__}")
    if not -z.dim() <= dim < z.dim():
        raise ValueError(f"{where}: dim must be in [{-z.dim()}, {z.dim() - 1}] for z of shape {tuple(z.shape)}, got {dim}")
    return dim % z.dim()


def _check_alpha(alpha, z, dim, where):
    """α > 1: a float, or a tensor broadcastable to z with size 1 along ``dim``; returns a float or a tensor of z's
    rank (size 1 along ``dim``, z's dtype)."""
    if isinstance(alpha, torch.Tensor):
        if not alpha.is_floating_point():
            raise TypeError(f"{where}: alpha must be a float or a floating tensor, got a tensor of {alpha.dtype}")
        if alpha.dim() > z.dim():
            raise ValueError(f"{where}: alpha of shape {tuple(alpha.shape)} does not broadcast to z of shape "
                             f"{tuple(z.shape)}")
        a = alpha.reshape((1,) * (z.dim() - alpha.dim()) + tuple(alpha.shape))
        for i, (got, want) in enumerate(zip(a.shape, z.shape)):
            if got not in (1, want):
                raise ValueError(f"{where}: alpha of shape {tuple(alpha.shape)} does not broadcast to z of shape "
                                 f"{tuple(z.shape)} (dimension {i}: got {got}, expected 1 or {want})")
        if a.shape[dim] != 1:
            raise ValueError(f"{where}: alpha must have size 1 along dim={dim} (one α per distribution), got shape "
                             f"{tuple(alpha.shape)}")
        if not bool((alpha.detach() > 1).all()):
            raise ValueError(f"{where}: alpha must be > 1 (α → 1 is softmax: use softmax), got min "
                             f"{float(alpha.detach().min())}")
        return a
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{where}: alpha must be a float > 1 or a tensor, got {type(alpha).__name__}")
    if not (float(alpha) > 1 and float(alpha) < float("inf")):
        raise ValueError(f"{where}: alpha must be a finite float > 1 (α → 1 is softmax: use softmax), got {alpha}")
    return float(alpha)


def _compute_dtype(z):
    # half precision: bisection needs the mantissa of float32
    return torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype


# --------------------------------------------------------------------------------------------------------------
# bisection, any α
# --------------------------------------------------------------------------------------------------------------


def _powered(x, alpha):
    # [x]_+ ^ (1/(α−1))
    return x.clamp(min=0) ** (1.0 / (alpha - 1.0))


class _EntmaxBisect(torch.autograd.Function):
    """α-entmax along the last dim; α a float or a tensor (..., 1). Forward by bisection, closed-form backward."""

    @staticmethod
    def forward(ctx, z, alpha, n_iter):
        alpha_t = alpha if isinstance(alpha, torch.Tensor) else None
        # X = (α − 1) z; the row maximum gets p = 1 at τ = max − 1 (Σp ≥ 1) and each of the d entries gets
        # p ≤ 1/d at τ = max − (1/d)^(α−1) (Σp ≤ 1): τ lies between
        X = z * (alpha - 1.0)
        d = X.shape[-1]
        x_max = X.max(dim=-1, keepdim=True).values
        tau_lo = x_max - 1.0
        tau_hi = x_max - (1.0 / d) ** (alpha - 1.0)
        f_lo = _powered(X - tau_lo, alpha).sum(-1, keepdim=True) - 1.0  # ≥ 0
        width = tau_hi - tau_lo
        p = None
        for _ in range(n_iter):
            width = width / 2
            tau_mid = tau_lo + width
            p = _powered(X - tau_mid, alpha)
            f_mid = p.sum(-1, keepdim=True) - 1.0
            # keep the half where Σp − 1 changes sign
            tau_lo = torch.where(f_mid * f_lo >= 0, tau_mid, tau_lo)
        # the last midpoint's p, renormalised: rows sum to 1 exactly (up to rounding)
        p = p / p.sum(-1, keepdim=True)
        ctx.alpha_is_tensor = alpha_t is not None
        ctx.save_for_backward(p, alpha_t if alpha_t is not None else torch.empty(0))
        ctx.alpha_float = None if alpha_t is not None else alpha
        return p

    @staticmethod
    def backward(ctx, dp):
        p, alpha_t = ctx.saved_tensors
        alpha = alpha_t if ctx.alpha_is_tensor else ctx.alpha_float
        # g = p^(2−α) on the support, 0 off it
        support = p > 0
        g = torch.where(support, p.clamp(min=torch.finfo(p.dtype).tiny) ** (2.0 - alpha), torch.zeros_like(p))
        gdp = g * dp
        # dz = g ⊙ dp − g · Σ(g dp) / Σ g
        dz = gdp - g * (gdp.sum(-1, keepdim=True) / g.sum(-1, keepdim=True))
        dalpha = None
        if ctx.alpha_is_tensor and ctx.needs_input_grad[1]:
            # S_i = p_i log p_i, H = Σ S, p̃ = g / Σ g
            S = torch.where(support, p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
            H = S.sum(-1, keepdim=True)
            p_tilde = g / g.sum(-1, keepdim=True)
            dalpha = (dp * ((p - p_tilde) / (alpha - 1.0) ** 2 - (S - p_tilde * H) / (alpha - 1.0))).sum(-1, keepdim=True)
        return dz, dalpha, None


def _reduce_to(grad, shape):
    """Sum ``grad`` over the dimensions that were broadcast from ``shape``."""
    if grad is None or grad.shape == shape:
        return grad
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True).reshape(shape) if dims else grad.reshape(shape)


class _ReduceAlpha(torch.autograd.Function):
    """Expand α (..., 1) to the batch shape in the forward, sum its gradient back in the backward."""

    @staticmethod
    def forward(ctx, a, shape):
        ctx.shape = a.shape
        return a.expand(shape).contiguous()

    @staticmethod
    def backward(ctx, g):
        return _reduce_to(g, ctx.shape), None


def entmax_bisect(z, alpha=1.5, dim=-1, n_iter=50):
    """α-entmax of ``z`` along ``dim`` by bisection on the threshold τ; any α > 1 (a float, or a tensor
    broadcastable to z with size 1 along ``dim``: one α per row, learnable — it receives a gradient).

    p_i = [(α−1) z_i − τ]_+^{1/(α−1)}, Σ_i p_i = 1. ``n_iter`` halvings of an interval of width < 1 pin τ to
    2^−n_iter. Entries −inf get p = 0 (a row must have one finite entry). Differentiable (closed-form backward).
    """
    where = "entmax_bisect"
    _check_z(z, where)
    dim = _check_dim(dim, z, where)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int):
        raise TypeError(f"{where}: n_iter must be an int, got {type(n_iter).__name__}")
    if n_iter < 1:
        raise ValueError(f"{where}: n_iter must be ≥ 1, got {n_iter}")
    alpha = _check_alpha(alpha, z, dim, where)
    cd = _compute_dtype(z)
    x = z.to(cd).movedim(dim, -1)
    if isinstance(alpha, torch.Tensor):
        a = alpha.to(cd).movedim(dim, -1)
        a = _ReduceAlpha.apply(a, x.shape[:-1] + (1,))
        p = _EntmaxBisect.apply(x, a, n_iter)
    else:
        p = _EntmaxBisect.apply(x, alpha, n_iter)
    return p.movedim(-1, dim).to(z.dtype)


# --------------------------------------------------------------------------------------------------------------
# exact, by sorting: α = 1.5 and α = 2
# --------------------------------------------------------------------------------------------------------------


class _Entmax15(torch.autograd.Function):
    """1.5-entmax along the last dim (Peters et al. 2019, Algorithm 2): sort, then τ in closed form."""

    @staticmethod
    def forward(ctx, z):
        # X = (α − 1) z = z / 2, shifted so that max = 0 (τ is shift-equivariant)
        X = z / 2
        X = X - X.max(dim=-1, keepdim=True).values
        Xs = X.sort(dim=-1, descending=True).values
        rho = torch.arange(1, X.shape[-1] + 1, device=X.device, dtype=X.dtype)
        # with the top k entries in the support, Σ_{i≤k} (X_i − τ)² = 1 is a quadratic in τ:
        # τ_k = mean_k − sqrt((1 − k·(mean_sq_k − mean_k²)) / k)
        mean = Xs.cumsum(-1) / rho
        mean_sq = (Xs ** 2).cumsum(-1) / rho
        ss = rho * (mean_sq - mean ** 2)
        delta = ((1 - ss) / rho).clamp(min=0)
        tau = mean - delta.sqrt()
        # the support size k* = #{k : τ_k ≤ X_(k)}; τ* = τ_{k*}
        k_star = (tau <= Xs).sum(-1, keepdim=True)
        tau_star = tau.gather(-1, k_star - 1)
        p = (X - tau_star).clamp(min=0) ** 2
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, dp):
        (p,) = ctx.saved_tensors
        # g = p^(2 − 1.5) = √p
        g = p.sqrt()
        gdp = g * dp
        return gdp - g * (gdp.sum(-1, keepdim=True) / g.sum(-1, keepdim=True))


class _Sparsemax(torch.autograd.Function):
    """sparsemax = 2-entmax along the last dim (Martins & Astudillo 2016): the projection onto the simplex."""

    @staticmethod
    def forward(ctx, z):
        X = z - z.max(dim=-1, keepdim=True).values
        Xs = X.sort(dim=-1, descending=True).values
        rho = torch.arange(1, X.shape[-1] + 1, device=X.device, dtype=X.dtype)
        cs = Xs.cumsum(-1) - 1
        # support: the k with 1 + k·X_(k) > Σ_{i≤k} X_(i);   τ = (Σ_{i≤k*} X_(i) − 1) / k*
        k_star = (rho * Xs > cs).sum(-1, keepdim=True)
        tau = cs.gather(-1, k_star - 1) / k_star.to(X.dtype)
        p = (X - tau).clamp(min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, dp):
        (p,) = ctx.saved_tensors
        # g = p^0 = 1 on the support: dz = dp − mean of dp over the support (0 off it)
        g = (p > 0).to(dp.dtype)
        gdp = g * dp
        return gdp - g * (gdp.sum(-1, keepdim=True) / g.sum(-1, keepdim=True))


def _sorted_variant(fn, z, dim, where):
    _check_z(z, where)
    dim = _check_dim(dim, z, where)
    return fn.apply(z.to(_compute_dtype(z)).movedim(dim, -1)).movedim(-1, dim).to(z.dtype)


def entmax15(z, dim=-1):
    """Exact 1.5-entmax of ``z`` along ``dim`` (sort-based, O(d log d) per row); differentiable."""
    return _sorted_variant(_Entmax15, z, dim, "entmax15")


def sparsemax(z, dim=-1):
    """sparsemax (2-entmax) of ``z`` along ``dim`` (sort-based); differentiable."""
    return _sorted_variant(_Sparsemax, z, dim, "sparsemax")


# --------------------------------------------------------------------------------------------------------------
# the attention variant
# --------------------------------------------------------------------------------------------------------------


@register("entmax")
def entmax_attention(q, k, v, *, causal=False, mask=None, alpha=1.5, scale=None, return_weights=False, n_iter=50):
    """Attention with α-entmax weights: entmax_α(q kᵀ · scale) v. q ``(B,H,T,D)``, k ``(B,H,S,D)``, v ``(B,H,S,Dv)``.

    ``alpha``: a float > 1 (1.5 → exact :func:`entmax15`, 2 → :func:`sparsemax`, else :func:`entmax_bisect` with
    ``n_iter``), or a tensor broadcastable to ``(B, H, T, 1)`` (e.g. one learnable α per head, shape ``(H, 1, 1)``;
    always bisection). Masked positions get exactly 0; a query with nothing allowed gets weights 0 and output 0.
    """
    where = "entmax_attention"
    B, H, T, S, D, _ = check_qkv(q, k, v, where=where)
    scale = check_scale(scale, D, where)
    if not isinstance(causal, bool):
        raise TypeError(f"{where}: causal must be a bool, got {type(causal).__name__}")
    mask = check_mask(mask, B, H, T, S, where=where)
    allowed = allowed_mask(mask, causal, T, S, q.device)
    # scores s_ij = q_i · k_j · scale                                                     (B, H, T, S)
    scores = (q @ k.transpose(-2, -1)) * scale
    empty = None
    if allowed is not None:
        allowed = allowed.expand(B, H, T, S)
        scores = scores.masked_fill(~allowed, float("-inf"))
        # a row with nothing allowed: give it finite scores, zero its weights afterwards
        empty = ~allowed.any(-1, keepdim=True)
        scores = scores.masked_fill(empty, 0.0)
    if isinstance(alpha, torch.Tensor):
        weights = entmax_bisect(scores, alpha, dim=-1, n_iter=n_iter)
    else:
        alpha = _check_alpha(alpha, scores, 3, where)
        if alpha == 1.5:
            weights = entmax15(scores, dim=-1)
        elif alpha == 2.0:
            weights = sparsemax(scores, dim=-1)
        else:
            weights = entmax_bisect(scores, alpha, dim=-1, n_iter=n_iter)
    if empty is not None:
        weights = weights.masked_fill(empty, 0.0)
    out = weights @ v
    return (out, weights) if return_weights else out


def support_size(p, dim=-1):
    """How many entries of each distribution are exactly non-zero (an int tensor): entmax's sparsity."""
    return (p != 0).sum(dim)


__all__ = ["entmax_bisect", "entmax15", "sparsemax", "entmax_attention", "support_size"]
