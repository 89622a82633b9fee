"""Parameter sharing (survey §3.3): separate parts of a network reuse *the same* parameters.

The survey's three examples, all here, from scratch:

* **ALBERT** (Lan et al. 2020, "ALBERT: A Lite BERT for Self-supervised Learning of Language Representations")
  shares the parameters of every layer — one block applied L times, like the steps of an RNN::

      unshared:  x_{l+1} = Block_{θ_l}(x_l),   l = 0 … L−1        (L sets of block parameters)
      shared:    x_{l+1} = Block_{θ}(x_l)                          (one set; θ_l = θ for every l)

  ``share="attention"`` shares only the attention sub-layers, ``share="ffn"`` only the feed-forward ones, and
  ``groups=G`` splits the stack into G consecutive groups that each share one block (ALBERT's
  ``num_hidden_groups``). ALBERT also **factorises the embedding**: the V×H table becomes a V×E table followed
  by an E×H projection, V·H → V·E + E·H parameters, a big saving when E ≪ H (the vocabulary-sized table then no
  longer grows with the width H).

* **Reformer** (Kitaev et al. 2020) **shares queries and keys**: one projection gives q, and the keys are the
  *normalised* queries, kⱼ = qⱼ / ‖qⱼ‖. Since q·q is the largest dot product a query can have, a token would
  attend mostly to itself, so a token may not attend to itself unless it has nothing else to attend to (the
  first token of a causal sequence). The attention function itself is :mod:`effedu.attention.shared_qk`
  (``shared_qk_attention``, re-exported here); this module adds the layer without a key projection.

* **Linformer** (Wang et al. 2020) projects keys and values along the *sequence* axis with k×n matrices E and F
  (:class:`~effedu.attention.lowrank.SharedProjection`, re-exported here) and can share them across heads
  ("headwise"), between keys and values ("key-value") and across layers ("layerwise"): from 2·L·H matrices down
  to one.

Sharing is *real* here: a shared weight is one ``nn.Parameter`` object reachable from several places. Autograd then
adds the gradient of every use into its ``.grad`` — ∂loss/∂θ = Σ_l ∂loss/∂θ_l, the gradient the unshared model
would give each copy, summed — and the optimiser updates it once. ``effedu.measure.count_parameters`` counts a
shared tensor once; every count has a closed form below, which the tests hold the modules to.

What sharing does *not* do — the survey's trade-off: the shared model has fewer parameters (less memory for
weights, gradients and optimiser state, smaller checkpoints, less communication between devices) but it runs the
same number of layers: the same FLOPs and the same activation memory per step. And with fewer parameters its
capacity is smaller, so quality can drop.

The everyday form of sharing, in almost every language model, is tying the output layer to the input embedding
(Press & Wolf 2017): ``lm.head.weight = lm.tok_emb.weight`` (:func:`tie_embeddings`).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .._checks import check_choice, check_positive_int, check_scale
from ..attention import get as get_attention
from ..attention import is_module_factory
# the attention techniques this chapter shares: they live in the attention layer, re-exported here
from ..attention.lowrank import PROJECTION_MODES, SharedProjection
from ..attention.shared_qk import shared_qk_attention, shared_qk_keys, shared_qk_mask
from ..model import Block, MultiHeadAttention, Transformer, TransformerConfig

SHARE_MODES = ("none", "all", "attention", "ffn")


# --------------------------------------------------------------------------------------------------------------
# ALBERT: cross-layer sharing
# --------------------------------------------------------------------------------------------------------------


def group_of_layer(layer, n_layers, groups):
    """The group whose shared block layer ``layer`` uses: ⌊layer · G / L⌋ (ALBERT's consecutive groups)."""
    # g(l) = ⌊l·G/L⌋ : L/G consecutive layers per group (every group gets ≥ 1 layer since G ≤ L)
    return (layer * groups) // n_layers


def share_layers(model, share="all", *, groups=1):
    """Tie the parameters of ``model``'s blocks in place, ALBERT style; returns ``model``.

    ``share``: ``"all"`` — every block *is* the first block of its group (attention, FFN and both LayerNorms
    shared); ``"attention"`` — the attention sub-layers are shared, FFNs and LayerNorms stay per layer; ``"ffn"``
    — the feed-forward sub-layers are shared; ``"none"`` — nothing changes. ``groups=G`` splits the L layers into
    G consecutive groups, each sharing one set (layer l uses group ⌊l·G/L⌋); ``groups=1`` is ALBERT's default.

    The first layer of each group keeps its weights; the other layers' weights are dropped. Sharing is by module
    identity: ``model.blocks[3].attn is model.blocks[0].attn`` — one set of ``nn.Parameter`` objects, into which
    autograd accumulates the gradient of every layer that uses it. Undo with :func:`unshare_layers`.
    """
    where = "share_layers"
    blocks = _check_blocks(model, where)
    check_choice(share, SHARE_MODES, "share", where)
    L = len(blocks)
    _check_groups(groups, share, L, where)
    if share == "none":
        return model
    # the first layer of each group holds the group's parameters
    first = {}
    for layer in range(L):
        first.setdefault(group_of_layer(layer, L, groups), blocks[layer])
    for layer in range(L):
        owner = first[group_of_layer(layer, L, groups)]
        if share == "all":
            blocks[layer] = owner  # the same Block object at several places of the ModuleList
        elif share == "attention":
            blocks[layer].attn = owner.attn
        else:  # "ffn"
            blocks[layer].ffn = owner.ffn
    return model


def unshare_layers(model):
    """Give every block its own copy of the parameters it shares (same values); returns ``model``.

    The result computes exactly the same function as the shared model, but each layer's parameters are separate
    tensors again — the oracle for "the gradient of a shared parameter is the sum of the per-layer gradients".
    """
    blocks = _check_blocks(model, "unshare_layers")
    # deepcopy each block on its own: nothing is shared between the copies (nor with the originals)
    model.blocks = nn.ModuleList([copy.deepcopy(b) for b in blocks])
    return model


def sharing_pattern(model):
    """Which layers share what: ``{"block", "attention", "ffn", "norms"}`` → list, per layer, of the index of the
    first layer holding the same module. ``[0, 0, 0, 0]`` = all four layers share layer 0's; ``[0, 1, 2, 3]`` =
    nothing shared."""
    blocks = _check_blocks(model, "sharing_pattern")

    def pattern(get):
        seen, out = {}, []
        for layer, b in enumerate(blocks):
            out.append(seen.setdefault(id(get(b)), layer))
        return out

    return {
        "block": pattern(lambda b: b),
        "attention": pattern(lambda b: b.attn),
        "ffn": pattern(lambda b: b.ffn),
        "norms": pattern(lambda b: b.ln1),
    }


class FactorizedEmbedding(nn.Module):
    """ALBERT's factorised token embedding: a V×E table, then an E×H projection (no bias).

        e(t) = P · A[t]          A ∈ ℝ^{V×E} (``table.weight``),  P ∈ ℝ^{H×E} (``proj.weight``)

    equal to an ordinary embedding whose V×H table is the rank-≤E product W = A Pᵀ (:meth:`full_weight`), with
    V·E + E·H parameters instead of V·H — fewer as soon as E < V·H / (V + H). (ALBERT's projection has a bias,
    H more parameters; the survey's V×E + E×H counts none.)
    """

    def __init__(self, vocab_size, embedding_dim, d_model):
        super().__init__()
        where = "FactorizedEmbedding"
        check_positive_int(vocab_size, "vocab_size", where)
        check_positive_int(embedding_dim, "embedding_dim", where)
        check_positive_int(d_model, "d_model", where)
        self.vocab_size, self.embedding_dim, self.d_model = vocab_size, embedding_dim, d_model
        self.table = nn.Embedding(vocab_size, embedding_dim)
        self.proj = nn.Linear(embedding_dim, d_model, bias=False)

    def forward(self, tokens):
        """tokens ``(…)`` integer ids in [0, V) → ``(…, H)``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"FactorizedEmbedding: tokens must be an integer torch.Tensor, got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"FactorizedEmbedding: token ids must lie in [0, vocab_size={self.vocab_size}), "
                             f"got min {int(tokens.min())}, max {int(tokens.max())}")
        # e = A[t] Pᵀ : look up E numbers per token, then project E → H                        (…, E) → (…, H)
        return self.proj(self.table(tokens))

    def full_weight(self):
        """The equivalent V×H embedding table W = A Pᵀ (rank ≤ E)."""
        return self.table.weight @ self.proj.weight.t()

    def extra_repr(self):
        return f"vocab_size={self.vocab_size}, embedding_dim={self.embedding_dim}, d_model={self.d_model}"


class TiedFactorizedHead(nn.Module):
    """An output layer tied to a :class:`FactorizedEmbedding`: logits = (x P) Aᵀ + b.

    It owns only the bias b (V numbers): the H→E map is the transpose of the embedding's projection P and the
    E→V map the transpose of its table A. (ALBERT's MLM head ties the E→V decoder to the table the same way but
    has its own H→E dense layer and LayerNorm.)
    """

    def __init__(self, embedding):
        super().__init__()
        if not isinstance(embedding, FactorizedEmbedding):
            raise TypeError(f"TiedFactorizedHead: embedding must be a FactorizedEmbedding, got {type(embedding).__name__}")
        self.embedding = embedding  # a submodule: its parameters are reachable from here too, counted once
        self.bias = nn.Parameter(torch.zeros(embedding.vocab_size))

    def forward(self, x):
        # z = x P : back to the E-dimensional embedding space                                   (B, T, H) → (B, T, E)
        z = x @ self.embedding.proj.weight
        # logits = z Aᵀ + b                                                                     (B, T, V)
        return z @ self.embedding.table.weight.t() + self.bias


def tie_embeddings(model):
    """Tie ``model``'s output layer to its token embedding in place (Press & Wolf 2017); returns ``model``.

    With an ``nn.Embedding`` this is the one-liner ``model.head.weight = model.tok_emb.weight`` (both are V×H):
    the head keeps its own bias. With a :class:`FactorizedEmbedding` the head becomes a
    :class:`TiedFactorizedHead`. Either way V·H parameters (or more) disappear.
    """
    where = "tie_embeddings"
    emb, head = getattr(model, "tok_emb", None), getattr(model, "head", None)
    if isinstance(emb, FactorizedEmbedding):
        model.head = TiedFactorizedHead(emb)
        return model
    if not isinstance(emb, nn.Embedding) or not isinstance(head, nn.Linear):
        raise TypeError(f"{where}: model must have .tok_emb (nn.Embedding or FactorizedEmbedding) and .head "
                        f"(nn.Linear), got {type(emb).__name__} and {type(head).__name__}")
    if head.weight.shape != emb.weight.shape:
        raise ValueError(f"{where}: head.weight {tuple(head.weight.shape)} and tok_emb.weight "
                         f"{tuple(emb.weight.shape)} must have the same (vocab, d_model) shape to be tied")
    model.head.weight = model.tok_emb.weight  # one Parameter, two uses
    return model


# --------------------------------------------------------------------------------------------------------------
# Reformer: shared-QK attention
# --------------------------------------------------------------------------------------------------------------
# the attention function (shared_qk_keys, shared_qk_mask, shared_qk_attention) is effedu.attention.shared_qk;
# here: the layer without a key projection, and swapping it into a model


class SharedQKMultiHeadAttention(nn.Module):
    """Multi-head attention with one projection for queries and keys (Reformer): ``qv`` is (2·d, d), not (3·d, d).

    3d² + 3d parameters instead of 4d² + 4d. Same call as :class:`effedu.model.MultiHeadAttention`
    (``x (B, T, d)``, ``mask``, ``return_weights``); self-attention only (no ``context``).
    """

    def __init__(self, d_model, n_heads, *, causal=False, scale=None, bias=True):
        super().__init__()
        where = "SharedQKMultiHeadAttention"
        check_positive_int(d_model, "d_model", where)
        check_positive_int(n_heads, "n_heads", where)
        if d_model % n_heads:
            raise ValueError(f"{where}: d_model={d_model} must be divisible by n_heads={n_heads}")
        if not isinstance(causal, bool):
            raise TypeError(f"{where}: causal must be a bool, got {type(causal).__name__}")
        if scale is not None:
            check_scale(scale, d_model // n_heads, where)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal, self.scale = causal, scale
        self.qv = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    @classmethod
    def from_attention(cls, attn):
        """A shared-QK copy of an :class:`effedu.model.MultiHeadAttention`: keeps its W_q, W_v, W_o (and biases)
        and drops W_k."""
        if not isinstance(attn, MultiHeadAttention):
            raise TypeError(f"SharedQKMultiHeadAttention.from_attention: attn must be an effedu MultiHeadAttention, "
                            f"got {type(attn).__name__}")
        new = cls(attn.d_model, attn.n_heads, causal=attn.causal, bias=attn.qkv.bias is not None)
        new = new.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        d = attn.d_model
        with torch.no_grad():
            w = attn.qkv.weight  # rows [W_q; W_k; W_v]                                          (3d, d)
            new.qv.weight.copy_(torch.cat([w[:d], w[2 * d:]]))
            if attn.qkv.bias is not None:
                b = attn.qkv.bias
                new.qv.bias.copy_(torch.cat([b[:d], b[2 * d:]]))
            new.proj.load_state_dict(attn.proj.state_dict())
        return new

    def _split_heads(self, x):
        B, T, _ = x.shape
        # (B, T, d) → (B, H, T, d/H)
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, *, context=None, mask=None, return_weights=False):
        if context is not None:
            raise ValueError("SharedQKMultiHeadAttention: shared-QK is self-attention; cross-attention (context=) "
                             "needs keys of their own")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"SharedQKMultiHeadAttention: x must be (B, T, {self.d_model}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        # [q; v] = x W_qvᵀ + b — no separate key projection                                   (B, T, 2d)
        q, v = self.qv(x).split(self.d_model, dim=-1)
        q, v = self._split_heads(q), self._split_heads(v)
        res = shared_qk_attention(q, None, v, causal=self.causal, mask=mask, scale=self.scale,
                                  return_weights=return_weights)
        out, weights = res if return_weights else (res, None)
        B, H, T, Dh = out.shape
        # concat heads, then W_o                                                               (B, T, d)
        out = self.proj(out.transpose(1, 2).reshape(B, T, H * Dh))
        return (out, weights) if return_weights else out


def share_qk(model):
    """Replace every block's attention of an effedu Transformer by :class:`SharedQKMultiHeadAttention` (in place;
    keeps W_q, W_v, W_o, drops W_k); returns ``model``. Attention modules shared between layers stay shared."""
    where = "share_qk"
    blocks = _check_blocks(model, where)
    replaced = {}
    for layer, block in enumerate(blocks):
        attn = block.attn
        if isinstance(attn, SharedQKMultiHeadAttention):
            continue
        if not isinstance(attn, MultiHeadAttention):
            raise TypeError(f"{where}: layer {layer}'s attention must be an effedu MultiHeadAttention, "
                            f"got {type(attn).__name__}")
        if isinstance(attn.attn_fn, nn.Module) and any(True for _ in attn.attn_fn.parameters()):
            raise ValueError(f"{where}: layer {layer}'s attention function {type(attn.attn_fn).__name__} has "
                             f"parameters of its own; shared-QK replaces it by its own softmax attention")
        if id(attn) not in replaced:
            replaced[id(attn)] = SharedQKMultiHeadAttention.from_attention(attn)
        block.attn = replaced[id(attn)]
    return model


# --------------------------------------------------------------------------------------------------------------
# an ALBERT-style model
# --------------------------------------------------------------------------------------------------------------


class SharedTransformer(Transformer):
    """An effedu :class:`~effedu.model.Transformer` with ALBERT's parameter savings switched on.

    ``share``: cross-layer sharing mode (``"none"``, ``"all"``, ``"attention"``, ``"ffn"``) over ``groups``
    consecutive groups (:func:`share_layers`); ``embedding_dim=E``: a :class:`FactorizedEmbedding` V×E + E×H
    instead of the V×H table (None = unfactorised); ``tie_head``: the output layer reuses the token embedding
    (:func:`tie_embeddings`); ``shared_qk``: Reformer's shared query/key projection in every layer
    (:func:`share_qk`). The forward pass, the layers run and the FLOPs are those of the plain Transformer.
    ``albert_parameter_count(config, share, embedding_dim, ...)`` gives its size in closed form.
    """

    def __init__(self, config, share="all", embedding_dim=None, *, groups=1, tie_head=False, shared_qk=False):
        where = "SharedTransformer"
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"{where}: config must be a TransformerConfig, got {type(config).__name__}")
        check_choice(share, SHARE_MODES, "share", where)
        _check_groups(groups, share, config.n_layers, where)
        _check_optional_positive_int(embedding_dim, "embedding_dim", where)
        for name, value in (("tie_head", tie_head), ("shared_qk", shared_qk)):
            if not isinstance(value, bool):
                raise TypeError(f"{where}: {name} must be a bool, got {value!r}")
        if shared_qk and config.attention not in ("dense", "shared_qk"):
            raise ValueError(f"{where}: shared_qk=True uses its own softmax attention; config.attention must be "
                             f"'dense' or 'shared_qk', got {config.attention!r}")
        super().__init__(config)
        self.share, self.embedding_dim, self.groups = share, embedding_dim, groups
        self.tie_head, self.shared_qk = tie_head, shared_qk
        if embedding_dim is not None:
            self.tok_emb = FactorizedEmbedding(config.vocab_size, embedding_dim, config.d_model)
            self.tok_emb.apply(self._init_weights)
        if shared_qk:
            share_qk(self)
        share_layers(self, share, groups=groups)
        if tie_head:
            tie_embeddings(self)

    def extra_repr(self):
        return (f"share={self.share!r}, embedding_dim={self.embedding_dim}, groups={self.groups}, "
                f"tie_head={self.tie_head}, shared_qk={self.shared_qk}")


# --------------------------------------------------------------------------------------------------------------
# closed-form parameter counts
# --------------------------------------------------------------------------------------------------------------


def embedding_parameter_count(vocab_size, d_model, embedding_dim=None):
    """V·H for an ordinary table, V·E + E·H for ALBERT's factorised one."""
    where = "embedding_parameter_count"
    V, H = check_positive_int(vocab_size, "vocab_size", where), check_positive_int(d_model, "d_model", where)
    E = _check_optional_positive_int(embedding_dim, "embedding_dim", where)
    # V×H → V×E + E×H
    return V * H if E is None else V * E + E * H


def block_parameter_count(d_model, d_ff, *, part="all", shared_qk=False):
    """Parameters of one :class:`effedu.model.Block` (with biases), or of one ``part`` of it.

    attention: 4d² + 4d (W_q, W_k, W_v, W_o and biases; 3d² + 3d with shared-QK); ffn: 2·d·d_ff + d_ff + d;
    norms: 4d (two LayerNorms, a scale and a shift each); all: their sum.
    """
    where = "block_parameter_count"
    d, f = check_positive_int(d_model, "d_model", where), check_positive_int(d_ff, "d_ff", where)
    check_choice(part, ("all", "attention", "ffn", "norms"), "part", where)
    n_proj = 3 if shared_qk else 4
    parts = {
        # (n_proj) d×d matrices + (n_proj) biases of d
        "attention": n_proj * d * d + n_proj * d,
        # W₁ (d×d_ff) + b₁ + W₂ (d_ff×d) + b₂
        "ffn": 2 * d * f + f + d,
        # LN₁, LN₂: γ and β of d each
        "norms": 4 * d,
    }
    return sum(parts.values()) if part == "all" else parts[part]


def albert_parameter_breakdown(config, share="all", embedding_dim=None, *, groups=1, tie_head=False,
                               shared_qk=False):
    """Closed-form parameter count of ``SharedTransformer(config, share, embedding_dim, ...)``, by part.

    Returns ``{"token embedding", "position embedding", "attention", "ffn", "norms", "head", "total"}``. With G
    groups, a shared part counts G times, an unshared one L times:

        total = emb + n·d + n_att·A + n_ffn·F + n_norm·4d + [2d final LN, pre-LN only] + head
        emb = V·d or V·E + E·d;  A = 4d² + 4d (3d² + 3d shared-QK);  F = 2·d·d_ff + d_ff + d
        head = d·V + V, or V (its bias only) when tied

    (n = max_len.) ``share="none"`` gives the plain :class:`~effedu.model.Transformer`. Assumes the attention
    function has no parameters of its own (true of "dense", "tiled", "shared_qk").
    """
    where = "albert_parameter_breakdown"
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"{where}: config must be a TransformerConfig, got {type(config).__name__}")
    check_choice(share, SHARE_MODES, "share", where)
    L = config.n_layers
    _check_groups(groups, share, L, where)
    E = _check_optional_positive_int(embedding_dim, "embedding_dim", where)
    att = get_attention(config.attention) if isinstance(config.attention, str) else config.attention
    if is_module_factory(att) and not shared_qk:
        raise ValueError(f"{where}: config.attention={config.attention!r} is a module with parameters of its own; "
                         f"the closed form knows only parameter-free attention functions (count the model instead)")
    V, d, f = config.vocab_size, config.d_model, config.d_ff
    n_att = groups if share in ("all", "attention") else L
    n_ffn = groups if share in ("all", "ffn") else L
    n_norm = groups if share == "all" else L
    parts = {
        "token embedding": embedding_parameter_count(V, d, E),
        "position embedding": config.max_len * d,
        "attention": n_att * block_parameter_count(d, f, part="attention", shared_qk=shared_qk),
        "ffn": n_ffn * block_parameter_count(d, f, part="ffn"),
        # per-layer LayerNorms, plus the final one of a pre-LN stack
        "norms": n_norm * block_parameter_count(d, f, part="norms") + (2 * d if config.norm_first else 0),
        # the LM head: W (V×d) + b (V), or only b when tied to the embedding
        "head": V if tie_head else d * V + V,
    }
    parts["total"] = sum(parts.values())
    return parts


def albert_parameter_count(config, share="all", embedding_dim=None, *, groups=1, tie_head=False, shared_qk=False):
    """Closed-form number of parameters of ``SharedTransformer(config, share, embedding_dim, ...)`` (see
    :func:`albert_parameter_breakdown`); with ``share="none"`` that of the plain Transformer."""
    return albert_parameter_breakdown(config, share, embedding_dim, groups=groups, tie_head=tie_head,
                                      shared_qk=shared_qk)["total"]


# --------------------------------------------------------------------------------------------------------------
# Linformer: sharing the sequence projections
# --------------------------------------------------------------------------------------------------------------
# the matrices themselves are effedu.attention.lowrank.SharedProjection; here: how many each mode keeps


def linformer_projection_count(n_layers, n_heads, mode):
    """How many distinct k×n matrices a Linformer with this sharing ``mode`` holds.

    none: 2·L·H (an E and an F per head and layer); headwise: 2·L (one E, one F per layer); key-value: L (E = F
    per layer); layerwise: 1 (one matrix everywhere).
    """
    where = "linformer_projection_count"
    L, H = check_positive_int(n_layers, "n_layers", where), check_positive_int(n_heads, "n_heads", where)
    check_choice(mode, PROJECTION_MODES, "mode", where)
    return {"none": 2 * L * H, "headwise": 2 * L, "key-value": L, "layerwise": 1}[mode]


def linformer_projection_parameter_count(n_layers, n_heads, seq_len, k, mode):
    """Parameters of a Linformer's sequence projections: (number of distinct matrices) · k · n."""
    where = "linformer_projection_parameter_count"
    n, k = check_positive_int(seq_len, "seq_len", where), check_positive_int(k, "k", where)
    # {2LH, 2L, L, 1} matrices of k×n
    return linformer_projection_count(n_layers, n_heads, mode) * k * n


# --------------------------------------------------------------------------------------------------------------
# looking inside: hidden states and how similar consecutive layers are
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hidden_states(model, tokens, *, mask=None):
    """The L + 1 hidden states of an effedu Transformer on ``tokens (B, T)``: the input of the first block
    (embeddings) then the output of every block, each ``(B, T, d)``.

    Recorded with forward hooks on each *distinct* block module, in call order, so a block shared by several
    layers records once per use.
    """
    blocks = _check_blocks(model, "hidden_states")
    states = []

    def pre(module, args):
        if not states:
            states.append(args[0].detach().clone())

    def post(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        states.append(out.detach().clone())

    handles = []
    for b in {id(b): b for b in blocks}.values():
        handles.append(b.register_forward_pre_hook(pre))
        handles.append(b.register_forward_hook(post))
    try:
        model(tokens) if mask is None else model(tokens, mask=mask)
    finally:
        for h in handles:
            h.remove()
    return states


def layer_similarity(states):
    """Mean cosine similarity between every pair of hidden states: ``(n, n)`` with entry (i, j) =
    mean over tokens of cos(h_i[b, t], h_j[b, t]). ``states``: a list of equally shaped ``(B, T, d)`` tensors
    (e.g. from :func:`hidden_states`). The first off-diagonal holds consecutive layers' similarity."""
    where = "layer_similarity"
    if not isinstance(states, (list, tuple)) or len(states) < 1:
        raise TypeError(f"{where}: states must be a non-empty list of (B, T, d) tensors, got {type(states).__name__}")
    shape = states[0].shape if isinstance(states[0], torch.Tensor) else None
    for i, s in enumerate(states):
        if not isinstance(s, torch.Tensor) or s.dim() != 3 or s.shape != shape:
            raise ValueError(f"{where}: states[{i}] must be a (B, T, d) tensor shaped like states[0] "
                             f"{tuple(shape) if shape is not None else '?'}, got "
                             f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
    # unit vectors per token: û = h / ‖h‖                                                     (n, B·T, d)
    u = torch.stack([s.reshape(-1, s.shape[-1]).double() for s in states])
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    # S_ij = mean_tokens ⟨û_i, û_j⟩                                                            (n, n)
    return torch.einsum("itd,jtd->ij", u, u) / u.shape[1]


# --------------------------------------------------------------------------------------------------------------
# plumbing: the input checks the functions above call
# --------------------------------------------------------------------------------------------------------------


def _check_optional_positive_int(value, name, where):
    return None if value is None else check_positive_int(value, name, where)


def _check_groups(groups, share, n_layers, where):
    check_positive_int(groups, "groups", where)
    if share == "none" and groups != 1:
        raise ValueError(f"{where}: groups={groups} needs a shared mode (share='all', 'attention' or 'ffn'); "
                         f"with share='none' nothing is shared, leave groups=1")
    if groups > n_layers:
        raise ValueError(f"{where}: groups must be between 1 and n_layers={n_layers}, got {groups}")
    return groups


def _check_blocks(model, where):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an effedu Transformer (an nn.Module), got {type(model).__name__}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0 or not all(isinstance(b, Block) for b in blocks):
        raise TypeError(f"{where}: model must have .blocks, a non-empty nn.ModuleList of effedu.model.Block "
                        f"(an effedu Transformer), got {type(model).__name__}")
    return blocks


# benchmark: `python -m effedu.bench sharing` (effedu/bench/sharing.py)

__all__ = [
    "SHARE_MODES", "PROJECTION_MODES", "group_of_layer", "share_layers", "unshare_layers", "sharing_pattern",
    "FactorizedEmbedding", "TiedFactorizedHead", "tie_embeddings", "shared_qk_keys", "shared_qk_mask",
    "shared_qk_attention", "SharedQKMultiHeadAttention", "share_qk", "SharedTransformer",
    "embedding_parameter_count", "block_parameter_count", "albert_parameter_breakdown", "albert_parameter_count",
    "linformer_projection_count", "linformer_projection_parameter_count", "SharedProjection", "hidden_states",
    "layer_similarity",
]
