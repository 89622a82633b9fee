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

Seams for the later chapters, each off by default (the plain model above): the pieces wrappers reuse
(:meth:`Transformer.embed_tokens`, ``blocks``, :meth:`Transformer.logits`, :func:`init_weights`, :func:`lm_loss`),
every hidden state on request (``return_hidden=True``), a per-head gate and per-layer head counts, a pluggable FFN
with a channel for auxiliary losses (:func:`add_aux_loss`), ``norm="none"`` and a residual scale per branch, per-layer
attention kwargs, and keys longer than queries (``Block.forward(x, memory=...)``, causal mask aligned to the end).

Everything here is written from tensor ops (LayerNorm is torch's own); ``nn.MultiheadAttention`` and
``F.scaled_dot_product_attention`` are only the oracles in tests.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention as attention_registry
from ._checks import check_bool, check_choice, check_positive_int, check_tokens

NORMS = ("pre", "post", "none")


@dataclass
class TransformerConfig:
    """The model's hyper-parameters. The defaults give the plain pre-LN decoder; seams for later chapters:

    * ``n_heads`` an int, or one count per layer (head pruning leaves layers with different counts);
    * ``attention_kwargs`` a dict, or one dict per layer (Cascade: a window that grows with depth);
    * ``norm`` ``"pre"`` / ``"post"`` / ``"none"`` (no LayerNorm anywhere, T-Fixup); None = from ``norm_first``.
      When given it wins, and ``norm_first`` is set to ``norm == "pre"``;
    * ``residual_scale`` α in ``x = x + α·F(x)``: a number, or a pair (α_attention, α_ffn) (ReZero); the skip
      path's own weight ω (``x = ω·x + α·F(x)``, Admin) is ``Block.skip_scale_attn``/``skip_scale_ffn``;
    * ``ffn`` ``"dense"`` or a factory ``ffn(config, layer_index) -> nn.Module`` (mixture of experts, ...).
    """

    vocab_size: int = 64
    d_model: int = 64
    n_heads: Union[int, Sequence[int]] = 4
    n_layers: int = 2
    d_ff: int = 256
    max_len: int = 256
    dropout: float = 0.0
    causal: bool = True
    norm_first: bool = True
    attention: Union[str, Callable] = "dense"
    attention_kwargs: Union[dict, Sequence[dict]] = field(default_factory=dict)
    norm: Optional[str] = None
    residual_scale: Union[float, Tuple[float, float]] = 1.0
    ffn: Union[str, Callable] = "dense"

    def __post_init__(self):
        where = "TransformerConfig"
        for name in ("vocab_size", "d_model", "n_layers", "d_ff", "max_len"):
            check_positive_int(getattr(self, name), name, where)
        for h in self._per_layer("n_heads", int):
            check_positive_int(h, "n_heads", where)
            if self.d_model % h:
                raise ValueError(f"{where}: d_model={self.d_model} must be divisible by n_heads={h}")
        for kw in self._per_layer("attention_kwargs", dict):
            if not isinstance(kw, dict):
                raise TypeError(f"{where}: attention_kwargs must be a dict (or one per layer), got {type(kw).__name__}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"{where}: dropout must be in [0, 1), got {self.dropout!r}")
        check_bool(self.causal, "causal", where)
        check_bool(self.norm_first, "norm_first", where)
        if self.norm is not None:
            self.norm_first = check_choice(self.norm, NORMS, "norm", where) == "pre"
        alphas = self.residual_scales
        if len(alphas) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in alphas):
            raise TypeError(f"{where}: residual_scale must be a number or a pair of numbers, got {self.residual_scale!r}")
        if isinstance(self.attention, str):
            attention_registry.get(self.attention)  # unknown names fail here, with the list of known ones
        if isinstance(self.ffn, str):
            check_choice(self.ffn, ("dense",), "ffn", where)
        for name in ("attention", "ffn"):
            if not isinstance(getattr(self, name), str) and not callable(getattr(self, name)):
                raise TypeError(f"{where}: {name} must be a registered name or a callable, "
                                f"got {type(getattr(self, name)).__name__}")

    def _per_layer(self, name, single):
        """The field as one value per layer (a single value is repeated)."""
        value = getattr(self, name)
        if isinstance(value, single):
            return [value] * self.n_layers
        if not isinstance(value, (list, tuple)) or len(value) != self.n_layers:
            raise ValueError(f"TransformerConfig: {name} must be a {single.__name__} or a list of one per layer "
                             f"(n_layers={self.n_layers}), got {value!r}")
        return list(value)

    @property
    def norm_kind(self):
        """``"pre"``, ``"post"`` or ``"none"``: ``norm`` if given, else from ``norm_first``."""
        return self.norm or ("pre" if self.norm_first else "post")

    @property
    def residual_scales(self):
        """``(α_attention, α_ffn)``."""
        a = self.residual_scale
        return tuple(a) if isinstance(a, (tuple, list)) else (a, a)

    @property
    def head_dim(self):
        """d_model / n_heads (with per-layer head counts: ``config.layer(i).head_dim``)."""
        if not isinstance(self.n_heads, int):
            raise ValueError("TransformerConfig.head_dim: n_heads differs per layer; use config.layer(i).head_dim")
        return self.d_model // self.n_heads

    def layer(self, index):
        """The config layer ``index`` sees: its own ``n_heads`` and ``attention_kwargs`` (``self`` when uniform)."""
        if isinstance(self.n_heads, int) and isinstance(self.attention_kwargs, dict):
            return self
        return self.replace(n_heads=self._per_layer("n_heads", int)[index],
                            attention_kwargs=self._per_layer("attention_kwargs", dict)[index])

    def replace(self, **changes):
        """A copy with some fields changed (like ``dataclasses.replace``; changing ``norm_first`` alone resets
        ``norm``)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if "norm_first" in changes and "norm" not in changes:
            values["norm"] = None
        values.update(changes)
        return TransformerConfig(**values)


IGNORE = -100  # the target id that no loss scores (padding, prompt positions)


def lm_loss(logits, targets):
    """Mean cross-entropy over the scored positions, the one LM loss of the course.

    ``logits (B, T, V)`` or ``(N, V)``, ``targets`` of the shape before V; ``IGNORE`` (−100) marks a position that
    is not scored. float16/bfloat16 logits are computed in float32 (the softmax of a 16-bit logit is not
    precise enough); float32 and float64 stay as they are.
    """
    if logits.dim() < 2 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"lm_loss: targets must be {tuple(logits.shape[:-1])} (logits {tuple(logits.shape)} "
                         f"are (..., V)), got {tuple(targets.shape)}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    # L = −(1/N) Σ_{scored t} log softmax(z_t)[y_t]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def init_weights(m):
    """GPT-2 style initialisation, for ``model.apply(init_weights)``: N(0, 0.02) weights, zero biases."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


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


def end_aligned_causal_mask(T, S, device=None):
    """Boolean ``(T, S)``, True = may attend: query i sees keys j ≤ i + S − T (the queries are the *last* T of S
    positions, as with a Transformer-XL memory in front of the segment). ``S == T`` is the ordinary causal mask."""
    # allowed[i, j] = j ≤ i + (S − T)
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a pluggable attention function.

    One fused input projection ``qkv`` of shape (3·d, d) — the same layout as ``nn.MultiheadAttention``'s
    ``in_proj_weight`` — then the per-head attention, then the output projection ``proj``.

    ``head_dim`` (default ``d_model // n_heads``) sets each head's width Dh; the inner width is then ``H·Dh``:
    ``qkv`` is (3·H·Dh, d) (rows: all queries, then all keys, then all values; head h's rows h·Dh … (h+1)·Dh − 1 of
    each) and ``proj`` is (d, H·Dh). A layer whose heads were pruned (``effedu.general.prune.prune_heads``) keeps
    its head size with fewer heads: H·Dh < d.

    ``head_gate`` (a buffer of H ones, not saved in the ``state_dict``) multiplies each head's output before
    ``proj``: head pruning sets entries to 0 (Michel et al. 2019) in place, ``attn.head_gate[h] = 0``, or assigns a
    new tensor. Until then it is skipped (no extra multiply, no extra saved tensor). Write through the tensor, not
    through ``.data``: a ``.data`` write is invisible to the version counter that tells the gate was changed.
    """

    def __init__(self, d_model, n_heads, attention="dense", *, causal=False, attention_kwargs=None, bias=True,
                 config=None, head_dim=None):
        super().__init__()
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"MultiHeadAttention: d_model={d_model} must be divisible by n_heads={n_heads} "
                                 f"(or give head_dim)")
            head_dim = d_model // n_heads
        else:
            check_positive_int(head_dim, "head_dim", "MultiHeadAttention")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.causal = causal
        self.attention_kwargs = dict(attention_kwargs or {})
        inner = n_heads * head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=bias)
        self.proj = nn.Linear(inner, d_model, bias=bias)
        if config is None:
            # (with head_dim given, the attention sees heads of head_dim: its config's width is H·Dh)
            config = TransformerConfig(d_model=n_heads * head_dim, n_heads=n_heads, causal=causal, attention=attention,
                                       attention_kwargs=self.attention_kwargs)
        self.attn_fn = build_attention(config)  # a registered Module becomes a submodule (its parameters train)
        # keys longer than queries (a memory): an attention with a causal_align= keyword aligns the diagonal itself
        try:
            params = inspect.signature(self.attn_fn.forward if isinstance(self.attn_fn, nn.Module) else self.attn_fn)
            self.takes_causal_align = "causal_align" in params.parameters
        except (TypeError, ValueError):  # a callable without a readable signature: build the mask instead
            self.takes_causal_align = False
        self.register_buffer("head_gate", torch.ones(n_heads), persistent=False)
        self._mark_gate_untouched()

    # The gate costs a (B, H, T, d/H) multiply, so it is skipped while nobody has written to it. A tensor's
    # version counter counts its in-place changes (gate[h] = 0, fill_, copy_): same tensor + same version = ones.
    def _mark_gate_untouched(self):
        self._untouched_gate = (id(self.head_gate), self.head_gate._version)

    def gate_is_untouched(self):
        return self._untouched_gate == (id(self.head_gate), self.head_gate._version)

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), .cuda() make a new gate tensor: still all ones
        untouched = self.gate_is_untouched()
        out = super()._apply(fn, *args, **kwargs)
        if untouched:
            self._mark_gate_untouched()
        return out

    @property
    def inner_dim(self):
        """H·Dh, the width of the queries, keys and values (d_model unless heads were pruned or head_dim given)."""
        return self.n_heads * self.head_dim

    def remove_heads(self, heads):
        """Physically remove heads (0-based indices): ``qkv`` loses each head's Dh rows of the queries, keys and
        values, ``proj`` its Dh input columns, ``n_heads`` and ``head_gate`` shrink, Dh stays. The output equals
        this layer's with those heads' gates at 0 (``effedu.general.prune.prune_heads`` checks the indices and is
        the entry point). The new ``qkv``/``proj`` are new parameters: build the optimiser afterwards."""
        drop = set(heads)
        if not drop:
            return self
        H, Dh = self.n_heads, self.head_dim
        if not drop <= set(range(H)):
            raise ValueError(f"MultiHeadAttention.remove_heads: heads must be in 0 … {H - 1}, got {sorted(drop)}")
        if len(drop) == H:
            raise ValueError("MultiHeadAttention.remove_heads: cannot remove every head (drop the layer instead)")
        keep = [h for h in range(H) if h not in drop]
        device = self.qkv.weight.device
        cols = torch.cat([torch.arange(h * Dh, (h + 1) * Dh) for h in keep]).to(device)  # inside q (or k, or v)
        rows = torch.cat([part * H * Dh + cols for part in range(3)])  # the kept rows of [q; k; v]
        untouched = self.gate_is_untouched()
        new = {}
        with torch.no_grad():
            for name, old, index in (("qkv", self.qkv, rows), ("proj", self.proj, cols)):
                out_f, in_f = (3 * len(keep) * Dh, self.d_model) if name == "qkv" else (self.d_model, len(keep) * Dh)
                lin = nn.Linear(in_f, out_f, bias=old.bias is not None, device=device, dtype=old.weight.dtype)
                lin.weight.copy_(old.weight[index] if name == "qkv" else old.weight[:, index])
                if old.bias is not None:
                    lin.bias.copy_(old.bias[index] if name == "qkv" else old.bias)
                lin.weight.requires_grad_(old.weight.requires_grad)
                if old.bias is not None:
                    lin.bias.requires_grad_(old.bias.requires_grad)
                lin.train(old.training)
                if "aux_channel" in old.__dict__:
                    lin.aux_channel = old.aux_channel
                new[name] = lin
            gate = self.head_gate.detach()[torch.tensor(keep, device=self.head_gate.device)].clone()
        self.qkv, self.proj = new["qkv"], new["proj"]
        self.n_heads = len(keep)
        self.head_gate = gate
        if untouched:
            self._mark_gate_untouched()
        return self

    def _split_heads(self, x):
        B, T, _ = x.shape
        # (B, T, H·Dh) → (B, H, T, Dh)
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, *, context=None, mask=None, return_weights=False):
        """x ``(B, T, d)``; ``context (B, S, d)`` for keys/values from elsewhere (cross-attention, or memory +
        the segment itself); ``mask`` boolean broadcastable to ``(B, H, T, S)``, True = may attend. With
        ``causal`` and S > T the causal mask is aligned to the end: query i sees keys j ≤ i + S − T.
        Returns ``(B, T, d)`` (and weights if asked)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MultiHeadAttention: x must be (B, T, {self.d_model}), got {tuple(x.shape)}")
        causal = self.causal
        kwargs = dict(self.attention_kwargs)
        if context is None:
            # [q; k; v] = x W_qkvᵀ + b                                            (B, T, 3·H·Dh)
            q, k, v = self.qkv(x).split(self.inner_dim, dim=-1)
        else:
            inner = self.inner_dim
            w_q, w_kv = self.qkv.weight.split([inner, 2 * inner])
            b_q, b_kv = (None, None) if self.qkv.bias is None else self.qkv.bias.split([inner, 2 * inner])
            q = F.linear(x, w_q, b_q)
            k, v = F.linear(context, w_kv, b_kv).split(inner, dim=-1)
            T, S = x.shape[1], context.shape[1]
            if causal and S > T:
                if mask is None and self.takes_causal_align:
                    # an attention that aligns the causal diagonal itself (the tiled kernel): no S×T mask
                    kwargs["causal_align"] = "bottom_right"
                else:
                    # keys longer than queries: the causal mask is built here, aligned to the end, ANDed with mask
                    end = end_aligned_causal_mask(T, S, x.device)
                    mask, causal = (end if mask is None else mask & end), False
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        if mask is not None:
            kwargs["mask"] = mask
        if return_weights:
            res = self.attn_fn(q, k, v, causal=causal, return_weights=True, **kwargs)
            out, weights = res
        else:
            out = self.attn_fn(q, k, v, causal=causal, **kwargs)
        B, H, T, Dh = out.shape
        if not self.gate_is_untouched():
            # out_h ← gate_h · out_h                                                 (B, H, T, d/H)
            out = out * self.head_gate.to(out.dtype).view(1, H, 1, 1)
        # concat heads: (B, H, T, Dh) → (B, T, H·Dh), then W_o → (B, T, d)
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


def build_ffn(config, layer_index=0):
    """``config.ffn`` for one layer: ``"dense"`` → :class:`FeedForward`, else ``config.ffn(config, layer_index)``."""
    if config.ffn == "dense":
        return FeedForward(config.d_model, config.d_ff, config.dropout)
    ffn = config.ffn(config, layer_index)
    if not isinstance(ffn, nn.Module):
        raise TypeError(f"TransformerConfig.ffn: the factory must return an nn.Module, got {type(ffn).__name__}")
    return ffn


# --------------------------------------------------------------------------------------------------------------
# auxiliary losses (a mixture of experts' load balancing, ...): recorded once per forward, never by a recompute
# --------------------------------------------------------------------------------------------------------------


class AuxLossChannel:
    """The auxiliary losses the modules of one model recorded during its last forward.

    A module calls :func:`add_aux_loss` (``add_aux_loss(self, value)``); the model's :meth:`Transformer.aux_loss`
    sums them. Gradient checkpointing and reversible layers run a forward *again* during the backward pass: they
    do it inside :meth:`recomputing`, where records are dropped, so nothing is counted twice.

    Their *first* forward runs without autograd, so a value recorded there has no gradient (adding it to the loss
    trains nothing inside a checkpointed segment). :meth:`total` warns when it sums such a value with autograd on,
    unless it was recorded with ``injected=True``: the module promises to inject the value's gradient in the
    backward pass, when it is recomputed (as Megatron's ``MoEAuxLossAutoScaler`` does;
    ``effedu.general.moe.MoEFeedForward`` does it).
    """

    def __init__(self):
        self.values, self.injected, self.recomputing_depth = [], [], 0

    def __getstate__(self):  # copies and pickles of the model start empty (recorded values hold autograd graphs)
        return {"values": [], "injected": [], "recomputing_depth": 0}

    def add(self, value, injected=False):
        """Record ``value``; ``injected=True``: recorded without autograd, its gradient is injected on recompute."""
        if self.recomputing_depth == 0:
            self.values.append(value)
            self.injected.append(bool(injected))

    def clear(self):
        self.values, self.injected = [], []

    def total(self, device=None):
        flags = self.injected + [False] * (len(self.values) - len(self.injected))
        if torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and not v.requires_grad and not inj
                                           for v, inj in zip(self.values, flags)):
            warnings.warn("aux_loss: some auxiliary losses were recorded without autograd (inside a checkpointed "
                          "or reversible forward): they carry no gradient", RuntimeWarning, stacklevel=3)
        return sum(self.values) if self.values else torch.zeros((), device=device)

    @contextlib.contextmanager
    def recomputing(self):
        self.recomputing_depth += 1
        try:
            yield
        finally:
            self.recomputing_depth -= 1


def add_aux_loss(module, value, *, injected=False):
    """Record ``value`` (a scalar tensor) as an auxiliary loss of the model that ``module`` belongs to
    (``injected``: see :class:`AuxLossChannel`)."""
    channel = getattr(module, "aux_channel", None)
    if not isinstance(channel, AuxLossChannel):
        raise RuntimeError(f"add_aux_loss: {type(module).__name__} has no aux_channel; modules built by a "
                           f"Transformer have one (a module swapped in later: module.aux_channel = model.aux_channel)")
    channel.add(value, injected=injected)


class Block(nn.Module):
    """One Transformer layer: attention and FFN sub-layers, each with a residual connection and LayerNorm.

    ``layer_index`` picks the layer's own ``n_heads``/``attention_kwargs`` when the config gives one per layer.
    """

    def __init__(self, config, layer_index=0):
        super().__init__()
        lc = config.layer(layer_index)
        self.norm, self.norm_first = config.norm_kind, config.norm_first
        self.alpha_attn, self.alpha_ffn = (float(a) for a in config.residual_scales)
        self.attn = MultiHeadAttention(config.d_model, lc.n_heads, config.attention, causal=config.causal,
                                       attention_kwargs=lc.attention_kwargs, config=lc)
        self.ffn = build_ffn(config, layer_index)
        layer_norm = nn.LayerNorm if self.norm != "none" else nn.Identity  # Identity ignores its arguments
        self.ln1 = layer_norm(config.d_model)
        self.ln2 = layer_norm(config.d_model)
        self.drop = nn.Dropout(config.dropout)
        # ω in x = ω·x + α·F(x), per branch: None = 1 (no multiply). Admin (effedu.general.init.admin_init) sets
        # a number or an nn.Parameter of shape (d,) here.
        self.skip_scale_attn = self.skip_scale_ffn = None

    def _attend(self, h, memory, mask, return_weights):
        if memory is None:
            return self.attn(h, mask=mask, return_weights=return_weights)
        return self.attn(h, context=torch.cat([memory, h], dim=1), mask=mask, return_weights=return_weights)

    @staticmethod
    def _residual(x, branch, alpha, omega=None):
        # ω·x + α·F(x)   (α = 1: the plain residual, no multiply; ω = None: no multiply of the skip path)
        if omega is not None:
            x = x * omega
        return x + branch if alpha == 1.0 else x + alpha * branch

    def forward(self, x, *, memory=None, mask=None, return_weights=False):
        """x ``(B, T, d)``; ``memory (B, M, d)``: earlier hidden states (this layer's inputs, Transformer-XL)
        whose keys and values come before the segment's own (the causal mask is aligned to the end)."""
        weights = None
        if self.norm == "post":
            # post-LN: x = LN(x + α·MHA(x)); x = LN(x + α·FFN(x))
            a = self._attend(x, memory, mask, return_weights)
            if return_weights:
                a, weights = a
            x = self.ln1(self._residual(x, self.drop(a), self.alpha_attn, self.skip_scale_attn))
            x = self.ln2(self._residual(x, self.drop(self.ffn(x)), self.alpha_ffn, self.skip_scale_ffn))
        else:
            # pre-LN: x = x + α·MHA(LN(x)); x = x + α·FFN(LN(x))        (norm="none": LN is the identity)
            h = self.ln1(x)
            a = self._attend(h, None if memory is None else self.ln1(memory), mask, return_weights)
            if return_weights:
                a, weights = a
            x = self._residual(x, self.drop(a), self.alpha_attn, self.skip_scale_attn)
            x = self._residual(x, self.drop(self.ffn(self.ln2(x))), self.alpha_ffn, self.skip_scale_ffn)
        return (x, weights) if return_weights else x


class Transformer(nn.Module):
    """A stack of blocks over token + position embeddings with a language-model head.

    ``forward(tokens (B, T)) → logits (B, T, vocab)``. With ``config.causal=True`` it is a decoder (a GPT-like
    LM: position t sees tokens ≤ t); with False an encoder (every position sees every token).
    The pieces wrappers reuse: :meth:`embed_tokens` (tokens → first hidden state), ``blocks``, :meth:`logits`
    (last hidden state → logits), :meth:`aux_loss` and :meth:`recomputing`.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"Transformer: config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model) if config.norm_kind == "pre" else nn.Identity()
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.apply(init_weights)
        self.aux_channel = AuxLossChannel()
        for m in self.modules():  # every module can record auxiliary losses (add_aux_loss)
            m.aux_channel = self.aux_channel

    _init_weights = staticmethod(init_weights)  # the old name

    def embed_tokens(self, tokens):
        """tokens ``(B, T)`` → the first hidden state ``x₀ = dropout(E[tokens] + P[positions])`` ``(B, T, d)``.

        A new forward starts here: the auxiliary losses of the previous one are cleared."""
        # the ids' range is checked on the CPU (free) and on the first forward on any other device (a GPU sync)
        checked = self.__dict__.setdefault("token_range_checked_on", set())
        B, T = check_tokens(tokens, self.config, type(self).__name__, values=tokens.device not in checked or None)
        checked.add(tokens.device)
        if hasattr(self, "aux_channel"):
            self.aux_channel.clear()
        pos = torch.arange(T, device=tokens.device)
        return self.drop(self.tok_emb(tokens) + self.pos_emb(pos))  # (B, T, d)

    def logits(self, h):
        """The last hidden state ``(B, T, d)`` → logits ``(B, T, vocab)`` (final LayerNorm for pre-LN, then head)."""
        return self.head(self.ln_f(h))

    def aux_loss(self):
        """The sum of the auxiliary losses recorded during the last forward (0 when none)."""
        return self.aux_channel.total(self.head.weight.device)

    def recomputing(self):
        """Context manager for wrappers that run a forward again in the backward pass: records are dropped."""
        return self.aux_channel.recomputing()

    def forward(self, tokens, *, mask=None, return_attentions=False, return_hidden=False):
        """tokens ``(B, T)`` int64 → logits ``(B, T, vocab)``.

        ``return_attentions=True`` also returns a list of per-layer weights ``(B, H, T, T)`` (the attention
        function must support ``return_weights``); ``return_hidden=True`` also returns the L + 1 hidden states
        ``(B, T, d)``: the embedding and each block's output (early exit, distillation). Extras come in that
        order: ``logits, attentions, hidden``."""
        x = self.embed_tokens(tokens)
        attentions, hidden = [], [x]
        for block in self.blocks:
            if return_attentions:
                x, w = block(x, mask=mask, return_weights=True)
                attentions.append(w)
            else:
                x = block(x, mask=mask)
            if return_hidden:
                hidden.append(x)
        logits = self.logits(x)  # (B, T, vocab)
        extras = ([attentions] if return_attentions else []) + ([hidden] if return_hidden else [])
        return (logits, *extras) if extras else logits

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


__all__ = ["TransformerConfig", "Transformer", "Block", "MultiHeadAttention", "FeedForward", "gelu", "init_weights",
           "lm_loss", "IGNORE", "build_attention", "build_ffn", "add_aux_loss", "AuxLossChannel",
           "end_aligned_causal_mask", "NORMS"]
