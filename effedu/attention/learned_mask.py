"""SparseBERT's differentiable attention mask (survey §4.1; Shi, Gao, Ren, Xu, Liang, Li & Kwok 2021,
*SparseBERT: Rethinking the Importance Analysis in Self-attention*).

Instead of choosing a sparse pattern by hand (chapter 15), *learn* it: a logit α_ij for every pair of positions
(i, j) says how much query position i needs key position j. A hard 0/1 mask is not differentiable, so training
uses a relaxation — the **Gumbel-sigmoid** (the two-class Gumbel-softmax of Jang et al. 2017 / Maddison et al.
2017):

    M_ij = σ((α_ij + log U − log(1 − U)) / τ),      U ~ Uniform(0, 1)

(log U − log(1−U) is Logistic noise: P(M_ij > ½) = σ(α_ij)); τ → 0 makes M nearly binary. ``hard=True``
rounds M to {0, 1} in the forward and keeps the soft gradient (straight-through estimator).

The mask enters the attention in the log domain, weights ∝ M_ij · exp(s_ij), i.e. scores + log M (computed as a
log-sigmoid: stable, never log 0), so a hard M is exactly masked attention. In evaluation the mask is hard and
deterministic: M_ij = [α_ij > 0]. SparseBERT adds a sparsity penalty λ·mean(σ(α)) to the loss (``sparsity``
kwarg: recorded as the model's auxiliary loss) and reads off which positions matter — in BERT it learns mostly
the neighbours and drops the diagonal.

Registered: ``"sparsebert"`` (:class:`LearnedMaskAttention`, one logit per position pair up to ``max_len``, per
layer, shared by its heads).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_mask, check_qkv, check_scale
from ..kernels.masking import allowed_mask, masked_softmax
from . import register


def _check_temperature(temperature, where):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{where}: temperature must be a positive float, got {type(temperature).__name__}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"{where}: temperature must be a positive float, got {temperature}")
    return float(temperature)


def logistic_noise(shape, *, generator=None, dtype=torch.float32, device=None, eps=1e-20):
    """log U − log(1 − U), U ~ Uniform(0, 1): the difference of two Gumbels."""
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    return torch.log(u + eps) - torch.log(1 - u + eps)


def _noisy(logits, temperature, noise, generator):
    if noise:
        g = logistic_noise(logits.shape, generator=generator, dtype=logits.dtype,
                           device=None if generator is not None else logits.device).to(logits.device)
        logits = logits + g
    return logits / temperature


def gumbel_sigmoid(logits, *, temperature=1.0, hard=False, generator=None, noise=True):
    """σ((logits + logistic noise) / τ) ∈ (0, 1); ``hard``: rounded to {0, 1} with the soft gradient
    (straight-through). ``noise=False``: σ(logits / τ)."""
    where = "gumbel_sigmoid"
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{where}: logits must be a floating torch.Tensor")
    temperature = _check_temperature(temperature, where)
    soft = torch.sigmoid(_noisy(logits, temperature, noise, generator))
    if not hard:
        return soft
    # forward: the 0/1 value; backward: the gradient of the soft one
    return (soft > 0.5).to(soft.dtype) - soft.detach() + soft


_KWARGS = ("temperature", "init", "noise", "sparsity")


@register("sparsebert")
class LearnedMaskAttention(nn.Module):
    """Softmax attention under a learned mask (SparseBERT); built by the model with ``cls(config)``.

    ``mask_logits`` (max_len, max_len) is a parameter: α_ij for query i, key j. ``config.attention_kwargs``:
    ``temperature`` τ (1.0), ``init`` (the initial α, 2.0: σ(2) ≈ 0.88, nearly dense), ``noise`` (True: logistic
    noise in training), ``sparsity`` λ (0.0: the penalty λ·mean σ(α) over the used T×S block — its j ≤ i part when
    causal — is ``.aux_loss``
    and recorded in the model's auxiliary-loss channel when λ > 0). Training: soft mask; eval: hard [α > 0].
    ``causal`` and ``mask`` are ANDed with the learned mask. Keys beyond max_len are refused.
    """

    def __init__(self, config):
        super().__init__()
        where = "LearnedMaskAttention"
        kw = dict(config.attention_kwargs)
        unknown = sorted(set(kw) - set(_KWARGS))
        if unknown:
            raise TypeError(f"{where}: unknown attention_kwargs {unknown}; expected some of {list(_KWARGS)}")
        self.temperature = _check_temperature(kw.get("temperature", 1.0), where)
        init = kw.get("init", 2.0)
        if isinstance(init, bool) or not isinstance(init, (int, float)):
            raise TypeError(f"{where}: init must be a float (the initial mask logit), got {type(init).__name__}")
        sparsity = kw.get("sparsity", 0.0)
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or sparsity < 0:
            raise ValueError(f"{where}: sparsity must be a non-negative float, got {sparsity!r}")
        self.sparsity = float(sparsity)
        self.noise = bool(kw.get("noise", True))
        self.max_len = config.max_len
        self.mask_logits = nn.Parameter(torch.full((config.max_len, config.max_len), float(init)))
        self.aux_loss = None

    def _size(self, T, S):
        if T > self.max_len or S > self.max_len:
            raise ValueError(f"LearnedMaskAttention: T={T}, S={S} exceed max_len={self.max_len} (one mask logit per "
                             f"position pair up to max_len)")

    def hard_mask(self, T=None, S=None):
        """The evaluation mask [α_ij > 0] ``(T, S)`` (bool; default the full max_len × max_len)."""
        T = self.max_len if T is None else T
        S = T if S is None else S
        self._size(T, S)
        return self.mask_logits[:T, :S].detach() > 0

    def density(self, T=None, S=None, *, causal=False):
        """The fraction of position pairs the hard mask keeps, in [0, 1] (``causal``: of the pairs j ≤ i)."""
        m = self.hard_mask(T, S)
        if causal:
            region = torch.ones_like(m).tril()
            return float((m & region).sum() / region.sum())
        return float(m.float().mean())

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None, return_weights=False, generator=None,
                **kwargs):
        where = "LearnedMaskAttention"
        unknown = sorted(set(kwargs) - set(_KWARGS))
        if unknown:
            raise TypeError(f"{where}: unexpected keyword arguments {unknown}")
        B, H, T, S, D, _ = check_qkv(q, k, v, where=where)
        scale = check_scale(scale, D, where)
        if not isinstance(causal, bool):
            raise TypeError(f"{where}: causal must be a bool, got {type(causal).__name__}")
        self._size(T, S)
        mask = check_mask(mask, B, H, T, S, where=where)
        allowed = allowed_mask(mask, causal, T, S, q.device)
        logits = self.mask_logits[:T, :S].to(q.dtype)
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
        if self.training:
            # soft mask: weights ∝ M_ij exp(s_ij), log M = log σ((α + noise)/τ)
            scores = scores + F.logsigmoid(_noisy(logits, self.temperature, self.noise, generator))
        else:
            hard = logits > 0
            allowed = hard.view(1, 1, T, S) if allowed is None else allowed & hard
        # the penalty λ·mean σ(α) over the pairs the mask can matter for (causal: j ≤ i only)
        kept = torch.sigmoid(logits)
        if causal:
            region = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
            self.aux_loss = self.sparsity * kept[region].mean()
        else:
            self.aux_loss = self.sparsity * kept.mean()
        channel = getattr(self, "aux_channel", None)  # set by effedu.model.Transformer on every module
        if channel is not None and self.sparsity > 0:
            channel.add(self.aux_loss)
        weights = masked_softmax(scores, allowed)
        out = weights @ v
        return (out, weights) if return_weights else out

    def extra_repr(self):
        return f"max_len={self.max_len}, temperature={self.temperature}, sparsity={self.sparsity}"


__all__ = ["gumbel_sigmoid", "logistic_noise", "LearnedMaskAttention"]
