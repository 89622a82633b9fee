"""The from-scratch Transformer every chapter reuses (Vaswani et al. 2017; survey §2).

    x₀ = E[tokens] + P[positions]                                   token + learned absolute position embedding
    pre-LN  block (norm_first=True):   x = x + MHA(LN(x));   x = x + FFN(LN(x))
    post-LN block (norm_first=False):  x = LN(x + MHA(x));   x = LN(x + FFN(x))      (the original layout)
    logits = W_out · LN(x_L)                                        (final LN only for pre-LN)

    MHA(x)  = concat_h Attention(x W_q^h, x W_k^h, x W_v^h) W_o
    FFN(x)  = GELU(x W₁ + b₁) W₂ + b₂

The attention function is *pluggable*: ``TransformerConfig(attention="dense")`` picks a registered variant
(``effedu.attention.available()`` lists them), or pass any callable ``fn(q, k, v, *, causal, mask, **kw)``
on ``(B, H, T, D)`` tensors. Later chapters swap in sparse, low-rank, kernelised or memory-efficient attention
without touching this file. ``attention_kwargs`` are passed through to it (a window size, a number of features).

Everything here is written from tensor ops (LayerNorm is torch's own); ``nn.MultiheadAttention`` and
``F.scaled_dot_product_attention`` are only the oracles in tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention as attention_registry
from ._checks import check_tokens


@dataclass
class TransformerConfig:
    vocab_size: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    max_len: int = 256
    dropout: float = 0.0
    causal: bool = True
    norm_first: bool = True
    attention: Union[str, Callable] = "dense"
    attention_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformerConfig: {name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig: dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("causal", "norm_first"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TransformerConfig: {name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.attention, str):
            attention_registry.get(self.attention)  # unknown names fail here, with the list of known ones
        elif not callable(self.attention):
            raise TypeError(
                f"TransformerConfig: attention must be a registered name or a callable, got {type(self.attention).__name__}"
            )
        if not isinstance(self.attention_kwargs, dict):
            raise TypeError(f"TransformerConfig: attention_kwargs must be a dict, got {type(self.attention_kwargs).__name__}")

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def replace(self, **changes):
        """A copy with some fields changed (like ``dataclasses.replace``)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return TransformerConfig(**values)


def gelu(x):
    # GELU(x) = x · Φ(x) = ½ x (1 + erf(x / √2))                        (Hendrycks & Gimpel 2016)
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def build_attention(config):
    """Resolve ``config.attention`` into a callable (an nn.Module for variants with parameters)."""
    att = config.attention
    if isinstance(att, str):
        att = attention_registry.get(att)
    if attention_registry.is_module_factory(att):
        return att(config)
    return att


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a pluggable attention function.

    One fused input projection ``qkv`` of shape (3·d, d) — the same layout as ``nn.MultiheadAttention``'s
    ``in_proj_weight`` — then the per-head attention, then the output projection ``proj``.
    """

    def __init__(self, d_model, n_heads, attention="dense", *, causal=False, attention_kwargs=None, bias=True,
                 config=None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MultiHeadAttention: d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal = causal
        self.attention_kwargs = dict(attention_kwargs or {})
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        if config is None:
            config = TransformerConfig(d_model=d_model, n_heads=n_heads, causal=causal, attention=attention,
                                       attention_kwargs=self.attention_kwargs)
        self.attn_fn = build_attention(config)  # a registered Module becomes a submodule (its parameters train)

    def _split_heads(self, x):
        B, T, _ = x.shape
        # (B, T, d) → (B, H, T, d/H)
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, *, context=None, mask=None, return_weights=False):
        """x ``(B, T, d)``; ``context (B, S, d)`` for cross-attention (keys/values from it); ``mask`` boolean
        broadcastable to ``(B, H, T, S)``, True = may attend. Returns ``(B, T, d)`` (and weights if asked)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MultiHeadAttention: x must be (B, T, {self.d_model}), got {tuple(x.shape)}")
        if context is None:
            # [q; k; v] = x W_qkvᵀ + b                                            (B, T, 3d)
            q, k, v = self.qkv(x).split(self.d_model, dim=-1)
        else:
            w_q, w_kv = self.qkv.weight.split([self.d_model, 2 * self.d_model])
            b_q, b_kv = (None, None) if self.qkv.bias is None else self.qkv.bias.split([self.d_model, 2 * self.d_model])
            q = F.linear(x, w_q, b_q)
            k, v = F.linear(context, w_kv, b_kv).split(self.d_model, dim=-1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        kwargs = dict(self.attention_kwargs)
        if mask is not None:
            kwargs["mask"] = mask
        if return_weights:
            res = self.attn_fn(q, k, v, causal=self.causal, return_weights=True, **kwargs)
            out, weights = res
        else:
            out = self.attn_fn(q, k, v, causal=self.causal, **kwargs)
        B, H, T, Dh = out.shape
        # concat heads: (B, H, T, d/H) → (B, T, d), then W_o
        out = self.proj(out.transpose(1, 2).reshape(B, T, H * Dh))
        return (out, weights) if return_weights else out


class FeedForward(nn.Module):
    """Position-wise FFN: GELU(x W₁ + b₁) W₂ + b₂ with hidden size d_ff (usually 4·d)."""

    def __init__(self, d_model, d_ff, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.dropout(gelu(self.fc1(x))))


class Block(nn.Module):
    """One Transformer layer: attention and FFN sub-layers, each with a residual connection and LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.norm_first = config.norm_first
        self.attn = MultiHeadAttention(config.d_model, config.n_heads, config.attention, causal=config.causal,
                                       attention_kwargs=config.attention_kwargs, config=config)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.ln1 = nn.LayerNorm(config.d_model)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, *, mask=None, return_weights=False):
        weights = None
        if self.norm_first:
            # pre-LN: x = x + MHA(LN(x)); x = x + FFN(LN(x))
            a = self.attn(self.ln1(x), mask=mask, return_weights=return_weights)
            if return_weights:
                a, weights = a
            x = x + self.drop(a)
            x = x + self.drop(self.ffn(self.ln2(x)))
        else:
            # post-LN: x = LN(x + MHA(x)); x = LN(x + FFN(x))
            a = self.attn(x, mask=mask, return_weights=return_weights)
            if return_weights:
                a, weights = a
            x = self.ln1(x + self.drop(a))
            x = self.ln2(x + self.drop(self.ffn(x)))
        return (x, weights) if return_weights else x


class Transformer(nn.Module):
    """A stack of blocks over token + position embeddings with a language-model head.

    ``forward(tokens (B, T)) → logits (B, T, vocab)``. With ``config.causal=True`` it is a decoder (a GPT-like
    LM: position t sees tokens ≤ t); with False an encoder (every position sees every token).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"Transformer: config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model) if config.norm_first else nn.Identity()
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # GPT-2 style: N(0, 0.02) weights, zero biases
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens, *, mask=None, return_attentions=False):
        """tokens ``(B, T)`` int64 → logits ``(B, T, vocab)``; ``return_attentions=True`` also returns a list of
        per-layer weights ``(B, H, T, T)`` (the attention function must support ``return_weights``)."""
        B, T = check_tokens(tokens, self.config, "Transformer")
        pos = torch.arange(T, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))  # (B, T, d)
        attentions = []
        for block in self.blocks:
            if return_attentions:
                x, w = block(x, mask=mask, return_weights=True)
                attentions.append(w)
            else:
                x = block(x, mask=mask)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        return (logits, attentions) if return_attentions else logits

    @torch.no_grad()
    def generate(self, prompt, n_new, *, temperature=1.0, generator=None):
        """Sample ``n_new`` tokens after ``prompt (B, T0)`` (greedy when temperature == 0)."""
        tokens = prompt
        for _ in range(n_new):
            logits = self(tokens[:, -self.config.max_len:])[:, -1]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens


__all__ = ["TransformerConfig", "Transformer", "Block", "MultiHeadAttention", "FeedForward", "gelu"]
