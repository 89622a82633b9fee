"""Reversible layers: rebuild each layer's input from its output instead of storing it (survey §3.2).

Papers: NICE (Dinh, Krueger & Bengio 2014) introduced the *additive coupling*; RevNet (Gomez, Ren, Urtasun &
Grosse 2017, "The Reversible Residual Network: Backpropagation Without Storing Activations") used it to train deep
ResNets whose activations are never stored; the Reformer (Kitaev, Kaiser & Levskaya 2020) applied it to the
Transformer, with f = attention and g = feed-forward.

**The idea.** Ordinary backpropagation keeps, for every layer, the tensors its backward pass needs: the activation
memory grows linearly with depth. Split the activations in two streams ``(x₁, x₂)`` and couple them additively:

    y₁ = x₁ + f(x₂)                          x₂ = y₂ − g(y₁)
    y₂ = x₂ + g(y₁)           ⇔              x₁ = y₁ − f(x₂)

f and g can be *any* functions (they need not be invertible themselves): the block is invertible because each
stream is only ever shifted by a function of the other. So the backward pass can walk down from the top, rebuilding
each block's inputs from its outputs, recomputing f and g on them to get the local gradients. Only the outputs of
the last block are stored — "only once in the training process instead of N times, where N is the number of layers"
(Reformer) — at the cost of about one extra forward computation per layer.

**The gradients**, for a block with upstream gradients ``dy₁ = ∂L/∂y₁``, ``dy₂ = ∂L/∂y₂`` (Gomez et al., Alg. 1):

    dŷ₁ = dy₁ + (∂g/∂y₁)ᵀ dy₂                 the total gradient of y₁ (it feeds both the output and g)
    dx₂ = dy₂ + (∂f/∂x₂)ᵀ dŷ₁
    dx₁ = dŷ₁
    ∂L/∂θ_g = (∂g/∂θ_g)ᵀ dy₂                  ∂L/∂θ_f = (∂f/∂θ_f)ᵀ dŷ₁

Each vector-Jacobian product is obtained by recomputing g(y₁) and f(x₂) under ``torch.enable_grad`` and calling
autograd on that one small piece — the reconstruction and the local backward share one evaluation of f and g.

**Dropout.** f and g must compute exactly what they computed in the forward pass, random masks included. The
forward records the random-number generator's state before each f and each g; the backward replays it
(``torch.random.fork_rng`` + ``set_rng_state``), so the masks match and the gradients equal those of the ordinary
computation. The states (a few KiB per block, independent of the batch) are kept on the side, not as activations.

**The catch.** ``x₁ = (x₁ + f(x₂)) − f(x₂)`` is exact in real numbers, not in floating point: each block rounds,
and a rebuilt input that is slightly off makes the next f and g slightly off, so the errors *accumulate* down the
stack. The survey: "reversible layers add numerical errors that accumulate over multiple layers and may degrade the
model performance. Therefore, they are not suited for very deep networks." The notebook measures it in float64,
float32 and bfloat16.

**A reversible Transformer.** :class:`ReversibleTransformer` uses f = pre-LN attention sub-layer,
g = pre-LN feed-forward sub-layer (the two halves of :class:`effedu.model.Block`), built from
:class:`effedu.model.MultiHeadAttention` and :class:`effedu.model.FeedForward`. Two ways to get two streams:

* ``coupling="duplicate"`` (the default, the Reformer's choice): both streams start as the embedding,
  ``x₁ = x₂ = x``, each of full width d; at the top the two streams are averaged, ``h = (y₁ + y₂) / 2`` (as in
  trax's Reformer *encoder*, ``XYAvg``, and reformer-pytorch; trax's ``ReformerLM`` and Hugging Face's
  ``ReformerModel`` concatenate them instead, a 2d-wide output before the final LayerNorm). It has exactly the parameters of
  :class:`effedu.model.Transformer` with the same config; the two streams cost 2× the width in the saved outputs.
* ``coupling="split"`` (RevNet): the d channels are split in two halves of d/2 (``d_model`` must be even), f and g
  work at width d/2, and the halves are concatenated at the top.

``ReversibleSequence.forward_plain`` runs the same blocks through ordinary autograd: the reference the tests (and
the notebook) compare the memory-saving path against.

Not supported (on purpose, to stay small): double backward through the custom function, autocast state replay,
an attention mask argument (the config's ``causal`` flag is honoured). There is no reversible layer in PyTorch
itself; ``torch.utils.checkpoint`` (recompute instead of store, chapter 02) is what people usually reach for.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..model import AuxLossChannel, MultiHeadAttention, Transformer, TransformerConfig, build_ffn, init_weights
from .rng import RngState, replay_rng

__all__ = [
    "ReversibleBlock", "ReversibleSequence", "ReversibleFunction", "ReversibleTransformer",
    "AttentionSublayer", "FeedForwardSublayer", "split_channels", "merge_channels", "reconstruction_errors",
]


# --------------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------------


def _check_pair(x1, x2, names, where):
    a, b = names
    for name, x in ((a, x1), (b, x2)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    if x1.shape != x2.shape:
        raise ValueError(
            f"{where}: {a} and {b} must have the same shape (the two streams of a coupling), "
            f"got {a} {tuple(x1.shape)} and {b} {tuple(x2.shape)}"
        )
    if x1.dtype != x2.dtype:
        raise TypeError(f"{where}: {a} and {b} must share one dtype, got {x1.dtype} and {x2.dtype}")
    if x1.device != x2.device:
        raise ValueError(f"{where}: {a} and {b} must be on one device, got {x1.device} and {x2.device}")


def split_channels(x):
    """Split the last dimension in two halves (RevNet's coupling): ``(..., d) → (..., d/2), (..., d/2)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"split_channels: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] % 2:
        d = "a 0-d tensor" if x.dim() == 0 else f"{x.shape[-1]} channels"
        raise ValueError(
            f"split_channels: x must have an even number of channels in its last dimension to split into two "
            f"halves, got {d} (shape {tuple(x.shape)})"
        )
    x1, x2 = x.chunk(2, dim=-1)
    return x1, x2


def merge_channels(x1, x2):
    """The inverse of :func:`split_channels`: concatenate the two halves on the last dimension."""
    _check_pair(x1, x2, ("x1", "x2"), "merge_channels")
    return torch.cat([x1, x2], dim=-1)


# --------------------------------------------------------------------------------------------------------------
# random-number state: record in forward, replay in backward (so dropout masks match)
# --------------------------------------------------------------------------------------------------------------


# RngState (general/rng.py): the CPU generator's state and the CUDA generator's of the inputs' device, recorded
# before each f and g in the forward pass; replay_rng(state) runs the recomputation with it (torch.random.fork_rng)
# and puts the generators back afterwards.


def _trainable(module):
    return [p for p in module.parameters() if p.requires_grad] if isinstance(module, nn.Module) else []


# --------------------------------------------------------------------------------------------------------------
# the coupling block
# --------------------------------------------------------------------------------------------------------------


class ReversibleBlock(nn.Module):
    """Additive coupling ``y₁ = x₁ + f(x₂)``, ``y₂ = x₂ + g(y₁)`` and its exact inverse.

    ``f`` and ``g`` are ``nn.Module`` s mapping a tensor to one of the same shape (e.g. f = attention, g = FFN).
    ``forward`` is the ordinary differentiable computation (autograd stores what f and g need); the memory saving
    comes from :class:`ReversibleSequence`, which calls :meth:`backward_pass` instead.
    """

    def __init__(self, f, g):
        super().__init__()
        for name, m in (("f", f), ("g", g)):
            if not isinstance(m, nn.Module):
                raise TypeError(
                    f"ReversibleBlock: {name} must be an nn.Module (so that its parameters are found and trained), "
                    f"got {type(m).__name__}"
                )
        self.f, self.g = f, g
        self.recompute_context = None  # e.g. model.recomputing: entered while f and g run again in backward

    def forward(self, x1, x2):
        _check_pair(x1, x2, ("x1", "x2"), "ReversibleBlock.forward")
        # y₁ = x₁ + f(x₂)
        y1 = x1 + self.f(x2)
        # y₂ = x₂ + g(y₁)
        y2 = x2 + self.g(y1)
        return y1, y2

    def recomputing(self):
        """The context f and g run again in during the backward pass (the model's: no aux loss recorded twice)."""
        return self.recompute_context() if self.recompute_context is not None else contextlib.nullcontext()

    @torch.no_grad()
    def inverse(self, y1, y2):
        """Rebuild ``(x₁, x₂)`` from ``(y₁, y₂)`` (no autograd: this is for reconstruction, not training)."""
        _check_pair(y1, y2, ("y1", "y2"), "ReversibleBlock.inverse")
        # x₂ = y₂ − g(y₁)
        x2 = y2 - self.g(y1)
        # x₁ = y₁ − f(x₂)
        x1 = y1 - self.f(x2)
        return x1, x2

    def backward_pass(self, y1, y2, dy1, dy2, rng_f=None, rng_g=None):
        """From the outputs and their gradients, rebuild the inputs and compute every gradient of this block.

        Returns ``(x1, x2, dx1, dx2, param_grads)`` where ``param_grads`` is a list of ``(parameter, gradient)``.
        ``rng_f`` / ``rng_g`` are the generator states recorded before f and g ran in the forward pass.
        """
        y1, y2 = y1.detach(), y2.detach()
        g_params, f_params = _trainable(self.g), _trainable(self.f)
        param_grads = []

        # --- g: recompute g(y₁) with the forward's random numbers, then one vector-Jacobian product
        with torch.enable_grad():
            y1_leaf = y1.requires_grad_(True)
            with replay_rng(rng_g), self.recomputing():
                gy1 = self.g(y1_leaf)  # (…, d)
            grads = _vjp(gy1, [y1_leaf, *g_params], dy2)
        # dŷ₁ = dy₁ + (∂g/∂y₁)ᵀ dy₂
        dy1_total = dy1 + grads[0] if grads[0] is not None else dy1
        param_grads += zip(g_params, grads[1:])

        with torch.no_grad():
            # x₂ = y₂ − g(y₁)                                   (reconstruction: no stored activation needed)
            x2 = y2 - gy1.detach()

        # --- f: recompute f(x₂) on the rebuilt x₂, then one vector-Jacobian product
        with torch.enable_grad():
            x2_leaf = x2.requires_grad_(True)
            with replay_rng(rng_f), self.recomputing():
                fx2 = self.f(x2_leaf)  # (…, d)
            grads = _vjp(fx2, [x2_leaf, *f_params], dy1_total)
        param_grads += zip(f_params, grads[1:])

        with torch.no_grad():
            # x₁ = y₁ − f(x₂)
            x1 = y1.detach() - fx2.detach()
            # dx₂ = dy₂ + (∂f/∂x₂)ᵀ dŷ₁ ;  dx₁ = dŷ₁
            dx2 = dy2 + grads[0] if grads[0] is not None else dy2
            dx1 = dy1_total
        return x1, x2.detach(), dx1, dx2, param_grads


def _vjp(output, inputs, grad_output):
    """``(∂output/∂inputs)ᵀ grad_output`` for each input (None where the output does not depend on it)."""
    if not output.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(output, inputs, grad_output, allow_unused=True))


# --------------------------------------------------------------------------------------------------------------
# the custom autograd function: store the top outputs only, rebuild the rest in backward
# --------------------------------------------------------------------------------------------------------------


class ReversibleFunction(torch.autograd.Function):
    """``apply(x1, x2, blocks, preserve_rng_state, *params) → (y1, y2)`` through all ``blocks``.

    Saves only the final ``(y1, y2)``. ``params`` are the blocks' trainable parameters (each once): passing them
    as inputs lets autograd route their gradients (and lets ``gradcheck`` check them).
    """

    @staticmethod
    def forward(ctx, x1, x2, blocks, preserve_rng_state, *params):
        # autograd is off inside forward: f and g run without storing anything
        states = []
        for block in blocks:
            rng_f = RngState((x2,)) if preserve_rng_state else None
            # y₁ = x₁ + f(x₂)
            y1 = x1 + block.f(x2)
            rng_g = RngState((x2,)) if preserve_rng_state else None
            # y₂ = x₂ + g(y₁)
            y2 = x2 + block.g(y1)
            states.append((rng_f, rng_g))
            x1, x2 = y1, y2
        ctx.blocks, ctx.states, ctx.params = blocks, states, params
        ctx.save_for_backward(x1, x2)  # the only activations kept: the top block's outputs
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2
        acc = {}  # id(parameter) → accumulated gradient (a parameter may be shared by several blocks)
        # walk down from the top: each block rebuilds its inputs, which are the outputs of the block below
        for block, (rng_f, rng_g) in zip(reversed(ctx.blocks), reversed(ctx.states)):
            y1, y2, dy1, dy2, param_grads = block.backward_pass(y1, y2, dy1, dy2, rng_f, rng_g)
            for p, gp in param_grads:
                if gp is not None:
                    acc[id(p)] = gp if id(p) not in acc else acc[id(p)] + gp
        param_grads = tuple(acc.get(id(p)) for p in ctx.params)
        return (dy1, dy2, None, None) + param_grads


class ReversibleSequence(nn.Module):
    """A stack of :class:`ReversibleBlock` s whose backward rebuilds activations instead of storing them.

    ``forward(x1, x2)`` → ``(y1, y2)`` with activation memory independent of the depth (only the top outputs are
    saved); ``forward_plain`` is the same computation through ordinary autograd (memory linear in depth);
    ``inverse(y1, y2)`` runs the stack backwards. ``preserve_rng_state=False`` skips the RNG bookkeeping (only
    correct when f and g draw no random numbers, e.g. dropout 0 or eval mode).
    """

    def __init__(self, blocks, *, preserve_rng_state=True):
        super().__init__()
        if isinstance(blocks, nn.Module) and not isinstance(blocks, nn.ModuleList):
            raise TypeError(
                f"ReversibleSequence: blocks must be a list of ReversibleBlock, got a single {type(blocks).__name__}"
            )
        try:
            blocks = list(blocks)
        except TypeError:
            raise TypeError(
                f"ReversibleSequence: blocks must be a list of ReversibleBlock, got {type(blocks).__name__}"
            ) from None
        if not blocks:
            raise ValueError("ReversibleSequence: blocks must hold at least one ReversibleBlock, got an empty list")
        for i, b in enumerate(blocks):
            if not isinstance(b, ReversibleBlock):
                raise TypeError(f"ReversibleSequence: blocks[{i}] must be a ReversibleBlock, got {type(b).__name__}")
        if not isinstance(preserve_rng_state, bool):
            raise TypeError(f"ReversibleSequence: preserve_rng_state must be a bool, got {preserve_rng_state!r}")
        self.blocks = nn.ModuleList(blocks)
        self.preserve_rng_state = preserve_rng_state

    def __len__(self):
        return len(self.blocks)

    def _params(self):
        seen, params = set(), []
        for p in self.parameters():  # nn.Module.parameters() already yields a shared parameter once
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def forward(self, x1, x2, *, memory_efficient=True):
        """``(x1, x2) → (y1, y2)``; ``memory_efficient=False`` is the same as :meth:`forward_plain`."""
        _check_pair(x1, x2, ("x1", "x2"), "ReversibleSequence.forward")
        if not isinstance(memory_efficient, bool):
            raise TypeError(f"ReversibleSequence.forward: memory_efficient must be a bool, got {memory_efficient!r}")
        params = self._params()
        needs_grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or bool(params))
        if not memory_efficient or not needs_grad:
            return self.forward_plain(x1, x2)  # nothing to save (inference), or the reference path asked for
        return ReversibleFunction.apply(x1, x2, list(self.blocks), self.preserve_rng_state, *params)

    def forward_plain(self, x1, x2):
        """The reference: the blocks one after the other through ordinary autograd (stores every activation)."""
        _check_pair(x1, x2, ("x1", "x2"), "ReversibleSequence.forward_plain")
        for block in self.blocks:
            x1, x2 = block(x1, x2)
        return x1, x2

    @torch.no_grad()
    def inverse(self, y1, y2):
        """Rebuild the stack's inputs from its outputs, top block first."""
        _check_pair(y1, y2, ("y1", "y2"), "ReversibleSequence.inverse")
        for block in reversed(self.blocks):
            y1, y2 = block.inverse(y1, y2)
        return y1, y2


@torch.no_grad()
def reconstruction_errors(sequence, x1, x2):
    """How far the rebuilt activations drift from the true ones, block by block, going down the stack.

    Runs ``sequence`` forward keeping every true activation, then walks down with the blocks' inverses from the
    top outputs. Returns a list, one entry per block from the top (index 0 = the top block's inputs rebuilt,
    last = the stack's own inputs), of the relative error ``‖x̂ − x‖ / ‖x‖`` over both streams, computed in
    float64 whatever the dtype of the computation. Call it in eval mode (or without dropout): the inverse does not
    replay the forward's random masks.
    """
    if not isinstance(sequence, ReversibleSequence):
        raise TypeError(f"reconstruction_errors: sequence must be a ReversibleSequence, got {type(sequence).__name__}")
    _check_pair(x1, x2, ("x1", "x2"), "reconstruction_errors")
    acts = [(x1, x2)]
    for block in sequence.blocks:
        acts.append(block(*acts[-1]))
    y1, y2 = acts[-1]
    errors = []
    for block, (t1, t2) in zip(reversed(sequence.blocks), reversed(acts[:-1])):
        y1, y2 = block.inverse(y1, y2)
        diff = (y1.double() - t1.double()).pow(2).sum() + (y2.double() - t2.double()).pow(2).sum()
        ref = t1.double().pow(2).sum() + t2.double().pow(2).sum()
        errors.append(float(diff.sqrt() / ref.sqrt().clamp_min(torch.finfo(torch.float64).tiny)))
    return errors


# --------------------------------------------------------------------------------------------------------------
# a reversible Transformer (Reformer-style): f = attention sub-layer, g = feed-forward sub-layer
# --------------------------------------------------------------------------------------------------------------


class AttentionSublayer(nn.Module):
    """f(x) = Dropout(MHA(LN(x))): the residual branch of a pre-LN attention sub-layer (no residual here)."""

    def __init__(self, config, width=None, layer_index=0):
        super().__init__()
        width = config.d_model if width is None else width
        lc = config.replace(d_model=width).layer(layer_index)  # this layer's n_heads and attention_kwargs
        self.ln = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, lc.n_heads, config.attention, causal=config.causal,
                                       attention_kwargs=lc.attention_kwargs, config=lc)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, width) → (B, T, width)
        return self.drop(self.attn(self.ln(x)))


class FeedForwardSublayer(nn.Module):
    """g(x) = Dropout(FFN(LN(x))): the residual branch of a pre-LN feed-forward sub-layer (``config.ffn``)."""

    def __init__(self, config, width=None, layer_index=0):
        super().__init__()
        width = config.d_model if width is None else width
        self.ln = nn.LayerNorm(width)
        self.ffn = build_ffn(config if width == config.d_model else config.replace(d_model=width), layer_index)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, width) → (B, T, width)
        return self.drop(self.ffn(self.ln(x)))


COUPLINGS = ("duplicate", "split")


class ReversibleTransformer(nn.Module):
    """A language model like :class:`effedu.model.Transformer` whose layers are reversible blocks.

    ``forward(tokens (B, T)) → logits (B, T, vocab)``. Layer ℓ is ``ReversibleBlock(f=AttentionSublayer,
    g=FeedForwardSublayer)``. ``coupling="duplicate"`` (Reformer): ``x₁ = x₂ = embedding``, output
    ``(y₁ + y₂)/2`` (as trax's Reformer encoder; its ReformerLM concatenates the streams); ``coupling="split"`` (RevNet): the embedding's channels are split in halves of ``d_model/2``
    and concatenated at the top. ``memory_efficient=False`` in ``forward`` runs the blocks through plain autograd
    (the reference). Needs ``config.norm_first=True``: a post-LN layer, ``LN(x + f(x))``, is not invertible.
    """

    def __init__(self, config, *, coupling="duplicate", preserve_rng_state=True):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"ReversibleTransformer: config must be a TransformerConfig, got {type(config).__name__}")
        if not config.norm_first:
            raise ValueError(
                "ReversibleTransformer: config.norm_first must be True (pre-LN): the post-LN update "
                "x ← LN(x + f(x)) cannot be inverted, got norm_first=False"
            )
        if coupling not in COUPLINGS:
            raise ValueError(f"ReversibleTransformer: coupling must be one of {COUPLINGS}, got {coupling!r}")
        width = config.d_model
        if coupling == "split":
            if config.d_model % 2:
                raise ValueError(
                    f"ReversibleTransformer: coupling='split' needs an even d_model to split the channels into two "
                    f"halves, got d_model={config.d_model}"
                )
            width = config.d_model // 2
            if width % config.n_heads:
                raise ValueError(
                    f"ReversibleTransformer: coupling='split' runs attention on d_model/2={width} channels, which "
                    f"must be divisible by n_heads={config.n_heads}"
                )
        self.config, self.coupling = config, coupling
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = ReversibleSequence(
            [ReversibleBlock(AttentionSublayer(config, width, i), FeedForwardSublayer(config, width, i))
             for i in range(config.n_layers)],
            preserve_rng_state=preserve_rng_state,
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.apply(init_weights)
        self.aux_channel = AuxLossChannel()
        for m in self.modules():  # auxiliary losses (config.ffn), not recorded again when f and g are recomputed
            m.aux_channel = self.aux_channel
        for block in self.blocks.blocks:
            block.recompute_context = self.recomputing

    _init_weights = staticmethod(init_weights)  # the old name
    # the same embedding, head and auxiliary-loss channel as effedu.model.Transformer (same attribute names)
    embed_tokens, logits = Transformer.embed_tokens, Transformer.logits
    aux_loss, recomputing = Transformer.aux_loss, Transformer.recomputing

    def forward(self, tokens, *, memory_efficient=True):
        x = self.embed_tokens(tokens)  # (B, T, d)
        if self.coupling == "duplicate":
            # x₁ = x₂ = x                                                  (B, T, d) each
            y1, y2 = self.blocks(x, x, memory_efficient=memory_efficient)
            # h = (y₁ + y₂) / 2
            h = (y1 + y2) * 0.5
        else:
            # (x₁, x₂) = x[..., :d/2], x[..., d/2:]                           (B, T, d/2) each
            x1, x2 = split_channels(x)
            y1, y2 = self.blocks(x1, x2, memory_efficient=memory_efficient)
            h = merge_channels(y1, y2)  # (B, T, d)
        return self.logits(h)  # (B, T, vocab)


# benchmark: `python -m effedu.bench reversible` (effedu/bench/reversible.py)
