"""Pruning (survey §3.4): remove the weights, heads or layers a trained Transformer can do without.

**Unstructured magnitude pruning** (Han et al. 2015; the Transformer study of Gale et al. 2019) zeroes the weights
of smallest magnitude. A mask M ∈ {0, 1} multiplies the weight, W' = M ⊙ W, and stays applied while the network is
fine-tuned::

    M_ij = 0  for the k = round(s · numel) entries with the smallest |W_ij|      (one tensor, "layer" scope)
    M    = 0  for the k = round(s · Σ numel) smallest |W| over ALL prunable tensors (one threshold, "global" scope)

:func:`magnitude_mask` and :func:`global_magnitude_masks` compute the masks exactly as
``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured`` do (the tests hold them to it); ties between equal
magnitudes are broken by position (the earlier entry of the flattened tensor is removed first), which torch leaves
undefined. **Iterative pruning** (:func:`iterative_prune`) alternates pruning and fine-tuning: round r reaches the
*cumulative* sparsity 1 − (1 − rate)^r of all prunable weights (20 % of what remains per round: 20 %, 36 %, 48.8 %…).

On the course's models the prunable weights are the weights of the ``nn.Linear`` layers inside ``model.blocks``
(:func:`prunable_weights`: attention ``qkv`` and ``proj``, FFN ``fc1`` and ``fc2``) — not the embeddings, not the
LayerNorms, not the biases, not the LM head.

**Structured pruning** removes whole pieces, which makes the dense matrices *smaller* — the only kind of pruning that
is faster on ordinary hardware without a sparse kernel (the survey: *"sparse models are unoptimized for modern
hardware"*):

* heads — Michel et al. 2019, "Are Sixteen Heads Really Better than One?": each head's output is multiplied by a gate
  ξ_h (``MultiHeadAttention.head_gate``), and the importance of head h is the expected sensitivity of the loss to its
  gate at ξ = 1, I_h = E_x |∂L(x)/∂ξ_h|, normalised per layer by the ℓ2 norm over the layer's heads
  (:func:`head_importance`). :func:`mask_heads` sets gates to 0; :func:`prune_heads` *physically* removes the heads
  (fewer rows of ``qkv``, fewer columns of ``proj``) and gives the same output as the gated model.
* layers — Sajjad et al. 2020, "On the Effect of Dropping Layers of Pre-trained Transformer Models" ("Poor Man's
  BERT"): drop the top layers, the bottom ones, or every other one (:func:`layers_kept`, :func:`drop_layers`).

Indices are 0-based in this API (layer 0 is the bottom block, head 0 the first head), 1-based in every display.
Everything works on the tiny ``effedu.model.Transformer`` and on MiniLM's ``effedu.pretrained.BertEncoder``: both
have ``.blocks[i].attn`` (a ``MultiHeadAttention``) and ``.blocks[i].ffn.fc1/fc2``.
"""
from __future__ import annotations

import numbers
import weakref
from typing import Callable, Dict, Iterable, List

import torch
import torch.nn as nn

from ..measure import count_parameters, parameter_bytes
from ..model import MultiHeadAttention
from .sparse_linear import SparseLinear  # noqa: F401  (re-exported: a pruned nn.Linear stored as CSR, helper K1)

SCOPES = ("global", "layer")
STRATEGIES = ("top", "bottom", "alternate", "alternate_odd")
TEMPERATURE = 0.05  # of topic_contrastive_loss (SimCSE's / sentence-transformers' usual 1/20)


# --------------------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------------------


def _check_sparsity(sparsity, where, name="sparsity"):
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= float(sparsity) < 1:
        raise ValueError(f"{where}: {name} must be a number in [0, 1) (the fraction of weights removed), "
                         f"got {sparsity!r}")
    return float(sparsity)


def _check_weight(weight, where, name="weight"):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{where}: {name} is empty (shape {tuple(weight.shape)})")
    return weight


def _check_model(model, where):
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        raise TypeError(f"{where}: model must be an nn.Module with a .blocks ModuleList (an effedu Transformer or "
                        f"BertEncoder), got {type(model).__name__}")
    return model


def _attentions(model, where):
    _check_model(model, where)
    out = []
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, MultiHeadAttention):
            raise TypeError(f"{where}: model.blocks[{i}].attn must be an effedu MultiHeadAttention, "
                            f"got {type(attn).__name__}")
        out.append(attn)
    return out


# --------------------------------------------------------------------------------------------------------------
# unstructured magnitude pruning: masks
# --------------------------------------------------------------------------------------------------------------


def _kth_smallest(flat, k):
    """The k-th smallest entry (1-based) of a 1-D tensor, NaN ranking above every number, in O(n).

    Large tensors: a strided sample of ~2¹⁶ entries brackets the k-th value, [lo, hi]; with c entries below lo and
    the k-th inside the bracket (c < k ≤ c + #[lo, hi], checked), it is the (k − c)-th of the few bracketed entries —
    two passes of comparisons and a small selection instead of selecting among all n. Otherwise (or if the bracket
    missed) ``torch.kthvalue`` of everything.
    """
    n = flat.numel()
    if n > 1 << 20:
        sample = flat[:: n >> 16]
        m = sample.numel()
        q_lo, q_hi = max(1, int(m * (k / n - 0.01))), min(m, int(m * (k / n + 0.01)) + 1)
        lo, hi = torch.kthvalue(sample, q_lo).values, torch.kthvalue(sample, q_hi).values
        if not (torch.isnan(lo) or torch.isnan(hi)):
            c = int(torch.count_nonzero(flat < lo))
            mid = flat[(flat >= lo) & (flat <= hi)]
            if c < k <= c + mid.numel():
                return torch.kthvalue(mid, k - c).values
    return torch.kthvalue(flat, k).values


def smallest_mask(scores, k):
    """Boolean mask of ``scores``' shape (True = kept), False at exactly the ``k`` smallest entries; ties at the
    threshold go by position (the earlier flattened entry first) — the same mask as a stable sort's first k.

    O(n), no sort: the k-th smallest value t is found by selection (``torch.kthvalue``; for a large tensor, on the
    few entries that a sampled bracket leaves); every entry < t is removed, then the first ``k − #(< t)`` entries
    equal to t. NaN ranks above every number, as in a sort. :func:`magnitude_mask` is ``smallest_mask(|w|, k)``.
    """
    where = "smallest_mask"
    _check_weight(scores, where, "scores")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= scores.numel():
        raise ValueError(f"{where}: k must be an int in [0, scores.numel()={scores.numel()}], got {k!r}")
    k = int(k)
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    if k >= flat.numel():
        keep.zero_()
    elif k > 0:
        t = _kth_smallest(flat, k)
        if torch.isnan(t):
            tied = torch.isnan(flat)
            below = ~tied
        else:
            below, tied = flat < t, flat == t
        keep &= ~below
        n_more = k - int(torch.count_nonzero(below))  # ≥ 1: t itself is among the k smallest
        keep[torch.nonzero(tied).reshape(-1)[:n_more]] = False
    return keep.view(scores.shape)


def magnitude_mask(weight, sparsity):
    """Boolean mask (True = kept) removing exactly ``round(sparsity · numel)`` entries of smallest ``|weight|``.

    The same count as ``torch.nn.utils.prune.l1_unstructured(module, "weight", amount=sparsity)`` (Python's
    ``round``, half to even); ties are broken by position (the earlier flattened entry goes first).
    ``sparsity`` in [0, 1).
    """
    where = "magnitude_mask"
    weight = _check_weight(weight, where)
    sparsity = _check_sparsity(sparsity, where)
    k = round(sparsity * weight.numel())
    return smallest_mask(weight.detach().abs(), k)


def _check_weight_dict(weights, where):
    if not isinstance(weights, dict) or not weights:
        raise TypeError(f"{where}: weights must be a non-empty dict name → tensor, got "
                        f"{type(weights).__name__ if not isinstance(weights, dict) else 'an empty dict'}")
    for name, w in weights.items():
        _check_weight(w, where, f"weights[{name!r}]")
    return weights


def _global_masks(scores: Dict[str, torch.Tensor], sparsity):
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).to(torch.float64) for n in names])
    keep = smallest_mask(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].view(scores[n].shape)
        start += size
    return out


def global_magnitude_masks(weights, sparsity):
    """One magnitude threshold over all tensors: ``{name: bool mask}`` removing the ``round(sparsity · Σ numel)``
    smallest ``|w|`` of all of them together (as ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``).

    A tensor whose weights are small overall loses more of them than one whose weights are large: per-layer
    sparsities differ, only the total is fixed.
    """
    where = "global_magnitude_masks"
    weights = _check_weight_dict(weights, where)
    sparsity = _check_sparsity(sparsity, where)
    return _global_masks({n: w.detach().abs() for n, w in weights.items()}, sparsity)


# --------------------------------------------------------------------------------------------------------------
# masks on a model
# --------------------------------------------------------------------------------------------------------------


def prunable_weights(model) -> Dict[str, nn.Parameter]:
    """``{name: weight}`` of every ``nn.Linear`` inside ``model.blocks`` (names as in ``model.named_parameters()``):
    attention ``qkv``/``proj`` and FFN ``fc1``/``fc2`` of every layer. Not the embeddings, LayerNorms, biases or LM
    head."""
    _check_model(model, "prunable_weights")
    out = {}
    for mod_name, module in model.blocks.named_modules(prefix="blocks"):
        if isinstance(module, nn.Linear):
            out[f"{mod_name}.weight"] = module.weight
    return out


def _linear_modules(model):
    return {f"{name}.weight": m for name, m in model.blocks.named_modules(prefix="blocks") if isinstance(m, nn.Linear)}


class _MaskKeeper:
    """Keeps ``module.weight`` equal to ``weight ⊙ module.weight_mask`` while it trains.

    * a hook on the weight's gradient multiplies it by the mask, so the masked entries get no gradient (and an
      optimiser that starts after the masking — Adam's moments included — never moves them);
    * a forward pre-hook re-applies the mask in place (``weight.mul_(mask)``, no autograd) whenever the weight
      changed since the last time (its version counter: an optimiser step, a weight-decay step, a ``load_state_dict``)
      — so whatever an optimiser does (momentum from before the masking, decoupled weight decay), the forward pass
      only ever sees exact zeros. Two forwards without a step in between do not touch the weight (gradient
      accumulation stays legal).

    ``copy.deepcopy`` of the model copies the keeper; a tensor's gradient hooks are not copied with it, so the
    pre-hook (re-)registers the gradient hook on whichever weight tensor the module holds now.
    """

    def __init__(self, module):
        self.module = module
        self.version = None
        self.hooked, self.grad_handle = None, None
        self.forward_handle = module.register_forward_pre_hook(self.before_forward)
        self.ensure_grad_hook()
        self.remask()

    def ensure_grad_hook(self):
        w = self.module.weight
        if self.hooked is None or self.hooked() is not w:
            self.grad_handle = w.register_hook(self.mask_grad)
            self.hooked = weakref.ref(w)

    def mask_grad(self, grad):
        return grad * self.module.weight_mask.to(grad.dtype)

    @torch.no_grad()
    def remask(self):
        w = self.module.weight
        w.mul_(self.module.weight_mask.to(w.dtype))
        self.version = (id(w), w._version)

    def before_forward(self, module, args):
        self.ensure_grad_hook()
        w = module.weight
        if (id(w), w._version) != self.version:
            self.remask()

    def remove(self):
        if self.hooked is not None and self.hooked() is self.module.weight:
            self.grad_handle.remove()
        self.forward_handle.remove()


def apply_masks(model, masks):
    """Zero the masked weights (``masks``: ``{name: bool mask}``, True = kept, names from :func:`prunable_weights`)
    and keep them zero while the model trains.

    Each masked ``nn.Linear`` gets a non-persistent buffer ``weight_mask`` (it follows ``.to()``; the
    ``state_dict`` is unchanged) and two hooks (see ``_MaskKeeper``): the gradient of a masked entry is zeroed, and
    before each forward the mask is re-applied in place if the weight changed since (after an optimiser step).
    Parameters keep their names and identities, so an optimiser built before or after still works. A module that
    already has a mask gets the new one (the masks are not combined: pass the logical AND if you want that).
    """
    where = "apply_masks"
    _check_model(model, where)
    if not isinstance(masks, dict):
        raise TypeError(f"{where}: masks must be a dict name → bool tensor, got {type(masks).__name__}")
    modules = _linear_modules(model)
    for name, mask in masks.items():
        if name not in modules:
            raise ValueError(f"{where}: {name!r} is not a prunable weight of this model "
                             f"(prunable_weights(model) lists them, e.g. {next(iter(modules), None)!r})")
        module = modules[name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{where}: masks[{name!r}] must be a bool tensor (True = kept), got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.shape != module.weight.shape:
            raise ValueError(f"{where}: masks[{name!r}] has shape {tuple(mask.shape)}, the weight "
                             f"{tuple(module.weight.shape)}")
        _remove_mask(module)
        module.register_buffer("weight_mask", mask.detach().to(module.weight.device).clone(), persistent=False)
        module._effedu_mask_keeper = _MaskKeeper(module)
    return model


def _remove_mask(module):
    keeper = module.__dict__.pop("_effedu_mask_keeper", None)
    if keeper is not None:
        keeper.remask()
        keeper.remove()
    if getattr(module, "weight_mask", None) is not None:
        delattr(module, "weight_mask")


def remove_masks(model):
    """Make the pruning permanent: the weights keep their zeros (applied one last time), the hooks and the
    ``weight_mask`` buffers go. Returns the model."""
    _check_model(model, "remove_masks")
    for module in _linear_modules(model).values():
        _remove_mask(module)
    return model


def current_masks(model) -> Dict[str, torch.Tensor]:
    """The masks now applied (``{name: bool mask}``; weights without one are left out)."""
    _check_model(model, "current_masks")
    return {n: m.weight_mask.clone() for n, m in _linear_modules(model).items()
            if getattr(m, "weight_mask", None) is not None}


def _check_scope(scope, where):
    if scope not in SCOPES:
        raise ValueError(f"{where}: scope must be one of {SCOPES}, got {scope!r}")
    return scope


def _masks_for(model, sparsity, scope):
    """Magnitude masks at ``sparsity``; weights masked already rank first (they stay pruned)."""
    weights = prunable_weights(model)
    if not weights:
        raise ValueError("prune_magnitude: the model has no prunable weights (no nn.Linear inside model.blocks)")
    old = current_masks(model)
    scores = {}
    for n, w in weights.items():
        s = w.detach().abs().to(torch.float64)
        if n in old:
            s = s.masked_fill(~old[n].to(s.device), -1.0)
        scores[n] = s
    if scope == "global":
        return _global_masks(scores, sparsity)
    return {n: smallest_mask(s, round(sparsity * s.numel())) for n, s in scores.items()}


def prune_magnitude(model, sparsity, *, scope="global"):
    """Magnitude-prune the prunable weights to ``sparsity`` and apply the masks; returns them.

    ``scope="global"``: one threshold over all prunable weights (:func:`global_magnitude_masks`); ``"layer"``: each
    weight matrix loses the same fraction (:func:`magnitude_mask`). Weights already masked stay masked (they rank
    first), so the sparsity is cumulative.
    """
    where = "prune_magnitude"
    _check_model(model, where)
    sparsity = _check_sparsity(sparsity, where)
    masks = _masks_for(model, sparsity, _check_scope(scope, where))
    apply_masks(model, masks)
    return masks


def sparsity(model) -> float:
    """The fraction of exact zeros among the prunable weights."""
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    if total == 0:
        return 0.0
    zeros = sum(int((w.detach() == 0).sum()) for w in weights.values())
    return zeros / total


def sparsity_schedule(target, rate=0.2):
    """The cumulative sparsities of :func:`iterative_prune`: ``min(target, 1 − (1 − rate)^r)`` for r = 1, 2, …
    until ``target`` is reached."""
    where = "sparsity_schedule"
    target = _check_sparsity(target, where, "target")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < float(rate) < 1:
        raise ValueError(f"{where}: rate must be in (0, 1) (the fraction of the remaining weights pruned per round), "
                         f"got {rate!r}")
    out, r = [], 1
    while not out or out[-1] < target:
        s = min(target, 1 - (1 - float(rate)) ** r)
        if out and s - out[-1] < 1e-12:  # 1 − (1 − rate)^r converges to 1 > target: reached up to rounding
            s = target
        out.append(s)
        r += 1
    return out


def iterative_prune(model, finetune: Callable, *, target, rate=0.2, scope="global") -> List[dict]:
    """Prune and fine-tune in rounds (Han et al. 2015; Frankle & Carbin 2019).

    Round r (1-based) prunes to the cumulative sparsity ``min(target, 1 − (1 − rate)^r)`` of all prunable weights
    (``rate`` of the remaining ones), then calls ``finetune(model, r)`` with the masks applied (they stay applied).
    Returns one record per round: ``{"round": r, "sparsity": measured sparsity after fine-tuning, **result}`` where
    ``result`` is what ``finetune`` returned (a dict is merged, anything else stored under ``"result"``).
    The masks stay on the model afterwards (:func:`remove_masks` makes them permanent).
    """
    where = "iterative_prune"
    _check_model(model, where)
    if not callable(finetune):
        raise TypeError(f"{where}: finetune must be a callable finetune(model, round), got {type(finetune).__name__}")
    _check_scope(scope, where)
    records = []
    for r, s in enumerate(sparsity_schedule(target, rate), start=1):
        prune_magnitude(model, s, scope=scope)
        result = finetune(model, r)
        record = {"round": r, "target_sparsity": s, "sparsity": sparsity(model)}
        if isinstance(result, dict):
            record.update(result)
        elif result is not None:
            record["result"] = result
        records.append(record)
    return records


def model_size(model) -> dict:
    """Parameter counts: ``total`` (every parameter once), ``embeddings`` (everything before the first block:
    token, position and token-type tables and the embedding LayerNorm), ``token_embeddings`` (the vocabulary table
    alone), ``encoder`` (inside ``model.blocks``), ``other`` (the rest: final LayerNorm, LM head),
    ``prunable`` / ``nonzero_prunable`` (the weights of :func:`prunable_weights`, all / non-zero), ``bytes`` (of
    all parameters, dense storage) and ``nonzero_bytes`` (bytes if the zeros of the prunable weights were not
    stored at all — an ideal sparse format without indices).

    MiniLM (effedu's BertEncoder): total 22,565,376; embeddings 11,918,592 of which the vocabulary table
    30522 × 384 = 11,720,448 (the "11.7 M"); encoder 10,646,784. The 22.7 M often quoted for all-MiniLM-L6-v2
    (22,713,216) also counts Hugging Face's BERT pooler (384 × 384 + 384 = 147,840), which the sentence
    embedding (mean pooling) never uses and effedu does not load.
    """
    _check_model(model, "model_size")
    total = count_parameters(model)
    encoder = count_parameters(model.blocks)
    block_params = {id(p) for p in model.blocks.parameters()}
    emb_names = ("tok_emb", "pos_emb", "type_emb", "emb_ln")
    seen, embeddings = set(block_params), 0
    for name in emb_names:
        m = getattr(model, name, None)
        if isinstance(m, nn.Module):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    embeddings += p.numel()
    tok = getattr(model, "tok_emb", None)
    weights = prunable_weights(model)
    prunable = sum(w.numel() for w in weights.values())
    nonzero = sum(int((w.detach() != 0).sum()) for w in weights.values())
    dense_bytes = parameter_bytes(model)
    zero_bytes = sum(int((w.detach() == 0).sum()) * w.element_size() for w in weights.values())
    return {"total": total, "embeddings": embeddings,
            "token_embeddings": tok.weight.numel() if isinstance(tok, nn.Embedding) else 0,
            "encoder": encoder, "other": total - encoder - embeddings, "prunable": prunable,
            "nonzero_prunable": nonzero, "bytes": dense_bytes, "nonzero_bytes": dense_bytes - zero_bytes}


# --------------------------------------------------------------------------------------------------------------
# structured: heads
# --------------------------------------------------------------------------------------------------------------


def head_importance(model, batches: Iterable, loss_fn: Callable, *, normalize=True) -> torch.Tensor:
    """Michel et al. 2019's head importance, ``(L, H)`` (float64, CPU): I_h = E_x |∂L(x)/∂ξ_h|.

    Every layer's ``head_gate`` ξ is replaced by a copy that requires grad (ones, or the gate as it is when some
    heads were masked already: they stay masked), ``loss_fn(model, batch)`` (a scalar) is differentiated w.r.t.
    the gates for each batch of ``batches``, the absolute values are averaged over the batches (a batch of one
    example gives the paper's per-example expectation), and the gates are restored afterwards. By Taylor, |∂L/∂ξ_h|
    estimates how much the loss changes when the head is removed (ξ_h: 1 → 0). The parameters' ``.grad`` are left
    untouched. ``normalize``: divide each layer's scores by their ℓ2 norm over the layer's heads (the paper's
    normalisation, which makes the scores of different layers comparable). Layers with fewer heads (after
    :func:`prune_heads`) leave NaN in the missing columns.
    """
    where = "head_importance"
    attns = _attentions(model, where)
    if not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be a callable loss_fn(model, batch) -> scalar tensor, "
                        f"got {type(loss_fn).__name__}")
    if not isinstance(normalize, bool):
        raise TypeError(f"{where}: normalize must be a bool, got {type(normalize).__name__}")
    saved = [a.head_gate for a in attns]  # restoring the same tensor restores gate_is_untouched()
    gates = []
    for a in attns:
        g = a.head_gate.detach().clone().requires_grad_(True)
        a.head_gate = g  # a new tensor: the gate is applied (gate_is_untouched() is False)
        gates.append(g)
    total = [torch.zeros(a.n_heads, dtype=torch.float64) for a in attns]
    n = 0
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"{where}: loss_fn must return a scalar tensor, got "
                                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
            if not loss.requires_grad:
                raise ValueError(f"{where}: the loss does not depend on the head gates (no autograd graph); "
                                 f"run loss_fn with gradients enabled")
            grads = torch.autograd.grad(loss.reshape(()), gates, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t += g.detach().abs().double().cpu()
            n += 1
    finally:
        for a, g in zip(attns, saved):
            a.head_gate = g
    if n == 0:
        raise ValueError(f"{where}: batches is empty")
    H = max(a.n_heads for a in attns) if attns else 0
    out = torch.full((len(attns), H), float("nan"), dtype=torch.float64)
    for i, t in enumerate(total):
        t = t / n
        if normalize:
            norm = t.norm()
            t = t / norm if norm > 0 else t
        out[i, :t.numel()] = t
    return out


def topic_contrastive_loss(encoder, sentences, topics, *, temperature=TEMPERATURE, max_length=128):
    """A real task loss for MiniLM: supervised contrastive loss (Khosla et al. 2020) over cosine similarities.

    Sentence embeddings e_i (masked mean pooling, L2-normalised, as ``encoder.embed`` computes them but with
    autograd), similarities s_ij = e_i·e_j / τ (τ = 0.05), and for each sentence i that has another sentence of
    its topic (its positives P(i))::

        ℓ_i = −1/|P(i)| · Σ_{p ∈ P(i)} log( exp(s_ip) / Σ_{j ≠ i} exp(s_ij) ),      L = mean_i ℓ_i

    It rewards embeddings that put sentences of one topic together and the others apart — a task MiniLM was
    trained for, so the loss is small but its gradient w.r.t. the head gates is not zero at ξ = 1. (A loss that
    compares the model with itself — the distance of the gated embeddings to the ungated ones — would be no good
    for Michel et al.'s importance: it is at its minimum, 0, at ξ = 1, so its gradient there is exactly zero.)
    ``sentences`` a list of str, ``topics`` one hashable label per sentence; at least one topic must occur twice.
    """
    from ..pretrained import mean_pool

    where = "topic_contrastive_loss"
    if getattr(encoder, "tokenizer", None) is None:
        raise ValueError(f"{where}: encoder needs a tokenizer (an encoder from effedu.pretrained.load_minilm())")
    if isinstance(sentences, str) or not isinstance(sentences, (list, tuple)) or \
            not all(isinstance(s, str) for s in sentences):
        raise TypeError(f"{where}: sentences must be a list of str")
    if not isinstance(topics, (list, tuple)) or len(topics) != len(sentences):
        raise ValueError(f"{where}: topics must be a list with one label per sentence ({len(sentences)}), got "
                         f"{len(topics) if isinstance(topics, (list, tuple)) else type(topics).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"{where}: temperature must be > 0, got {temperature!r}")
    ids = {t: i for i, t in enumerate(dict.fromkeys(topics))}
    labels = torch.tensor([ids[t] for t in topics])
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(topics), dtype=torch.bool)
    positives = same & ~eye
    has_pos = positives.any(dim=1)
    if not bool(has_pos.any()):
        raise ValueError(f"{where}: no two sentences share a topic, so there are no positives")
    device = encoder.tok_emb.weight.device
    batch = encoder.tokenizer(list(sentences), max_length=max_length, truncation=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    emb = mean_pool(encoder(**batch), batch["attention_mask"])  # (N, d), unit norm
    sim = (emb @ emb.T) / temperature  # s_ij = cos(e_i, e_j) / τ
    # log p(j | i) over j ≠ i
    logp = sim.masked_fill(eye.to(device), float("-inf")).log_softmax(dim=-1)
    pos = positives.to(device)
    per_anchor = -(logp.masked_fill(~pos, 0.0)).sum(dim=1) / pos.sum(dim=1).clamp_min(1)
    return per_anchor[has_pos.to(device)].mean()


def topic_batches(sentences, topics, *, batch_size=48, per_topic=4, seed=0):
    """Batches ``(sentences, topics)`` for :func:`topic_contrastive_loss`: ``per_topic`` sentences of each of
    ``batch_size // per_topic`` topics per batch (so every sentence has positives), each sentence used at most once.
    Deterministic for a ``seed``."""
    import random

    where = "topic_batches"
    if len(sentences) != len(topics):
        raise ValueError(f"{where}: sentences and topics differ in length: {len(sentences)} vs {len(topics)}")
    if not isinstance(per_topic, int) or per_topic < 2 or not isinstance(batch_size, int) or batch_size < per_topic:
        raise ValueError(f"{where}: per_topic must be an int ≥ 2 and batch_size ≥ per_topic, "
                         f"got per_topic={per_topic!r}, batch_size={batch_size!r}")
    rng = random.Random(seed)
    pools = {}
    for s, t in zip(sentences, topics):
        pools.setdefault(t, []).append(s)
    chunks = []
    for t, pool in pools.items():
        pool = pool[:]
        rng.shuffle(pool)
        chunks += [(t, pool[i:i + per_topic]) for i in range(0, len(pool) - per_topic + 1, per_topic)]
    rng.shuffle(chunks)
    k = max(1, batch_size // per_topic)
    out = []
    for i in range(0, len(chunks), k):
        group = chunks[i:i + k]
        out.append(([s for _, ss in group for s in ss], [t for t, ss in group for _ in ss]))
    return out


def _check_heads(model, heads, where):
    attns = _attentions(model, where)
    if not isinstance(heads, dict):
        raise TypeError(f"{where}: heads must be a dict {{layer: [head, ...]}} (0-based), got {type(heads).__name__}")
    out = {}
    for layer, hs in heads.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(attns):
            raise ValueError(f"{where}: layer {layer!r} does not exist: layers are 0 … {len(attns) - 1} (0-based)")
        if isinstance(hs, int) or not isinstance(hs, (list, tuple, set, range)):
            raise TypeError(f"{where}: heads[{layer}] must be a list of head indices, got {type(hs).__name__}")
        H = attns[layer].n_heads
        for h in hs:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < H:
                raise ValueError(f"{where}: head {h!r} of layer {layer} does not exist: that layer has heads "
                                 f"0 … {H - 1} (0-based)")
        out[layer] = sorted(set(hs))
    return attns, out


def mask_heads(model, heads):
    """Switch heads off by their gates (``head_gate[h] = 0``), 0-based ``{layer: [head, ...]}``. Reversible
    (set the gate back to 1); the weights are unchanged, the compute too. Returns the model."""
    attns, heads = _check_heads(model, heads, "mask_heads")
    with torch.no_grad():
        for layer, hs in heads.items():
            for h in hs:
                attns[layer].head_gate[h] = 0
    return model


def prune_heads(model, heads):
    """Physically remove heads, 0-based ``{layer: [head, ...]}``: each pruned layer's ``qkv`` loses the head's rows
    of the queries, keys and values (3·Dh rows) and ``proj`` the head's Dh input columns; ``n_heads`` and
    ``head_gate`` shrink, the head size Dh stays. The output equals the model's with those heads' gates at 0.

    Removing every head of a layer is refused (ValueError): the attention sub-layer would output only ``proj``'s
    bias — drop the layer instead (:func:`drop_layers`). ``model.config.n_heads`` is left as it was built (a
    ``TransformerConfig`` requires d_model divisible by each head count): the layers' ``attn.n_heads`` are the
    truth. Masks from :func:`apply_masks` on ``qkv``/``proj`` must be removed first. Returns the model.
    """
    where = "prune_heads"
    attns, heads = _check_heads(model, heads, where)
    for layer, hs in heads.items():
        if hs and len(hs) == attns[layer].n_heads:
            raise ValueError(f"{where}: cannot remove all {len(hs)} heads of layer {layer}: the layer would only "
                             f"add a bias; drop the layer instead (drop_layers)")
        for lin in (attns[layer].qkv, attns[layer].proj):
            if getattr(lin, "weight_mask", None) is not None:
                raise ValueError(f"{where}: layer {layer}'s attention has pruning masks; call remove_masks(model) first")
    for layer, hs in heads.items():
        attns[layer].remove_heads(hs)
    return model


def heads_to_prune(importance, n) -> Dict[int, List[int]]:
    """The ``n`` least important heads over all layers, ``{layer: [heads]}`` (0-based, sorted), never every head of
    a layer (a layer's last head is skipped; the next least important one is taken instead). NaN entries (heads
    that do not exist) are ignored; ties go to the lower (layer, head)."""
    where = "heads_to_prune"
    if not isinstance(importance, torch.Tensor) or importance.dim() != 2:
        raise TypeError(f"{where}: importance must be an (L, H) tensor (head_importance), got "
                        f"{tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{where}: n must be an int ≥ 0, got {n!r}")
    imp = importance.detach().double().cpu()
    exists = ~torch.isnan(imp)
    left = exists.sum(dim=1).tolist()
    possible = sum(max(0, c - 1) for c in left)
    if n > possible:
        raise ValueError(f"{where}: cannot prune n={n} heads while keeping one per layer: at most {possible}")
    order = sorted(((float(imp[i, h]), i, h) for i in range(imp.shape[0]) for h in range(imp.shape[1])
                    if exists[i, h]))
    out: Dict[int, List[int]] = {}
    for _, i, h in order:
        if len([x for v in out.values() for x in v]) == n:
            break
        if left[i] > 1:
            out.setdefault(i, []).append(h)
            left[i] -= 1
    return {i: sorted(v) for i, v in sorted(out.items())}


# --------------------------------------------------------------------------------------------------------------
# structured: layers
# --------------------------------------------------------------------------------------------------------------


def layers_kept(n_layers, n_keep, strategy) -> List[int]:
    """The (0-based, ascending) layers kept when ``n_layers − n_keep`` layers are dropped, Sajjad et al. 2020 §3:

    * ``"top"`` — top-layer dropping: remove the last K = n_layers − n_keep layers (those nearest the output);
      keep layers 0 … n_keep − 1.
    * ``"bottom"`` — bottom-layer dropping: remove the first K layers (those nearest the embeddings).
    * ``"alternate"`` — (even) alternate dropping: remove every other layer starting from the top, i.e. in the
      paper's 1-based numbering layers L, L − 2, L − 4, … (12, 10, 8, 6 for K = 4 of BERT's 12). Only
      ⌈L/2⌉ layers can be dropped that way.
    * ``"alternate_odd"`` — odd alternate dropping: L − 1, L − 3, … (11, 9, 7, 5): the top layer is kept.
      At most ⌊L/2⌋ layers.
    """
    where = "layers_kept"
    for name, v in (("n_layers", n_layers), ("n_keep", n_keep)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {name} must be an int ≥ 1, got {v!r}")
    if n_keep > n_layers:
        raise ValueError(f"{where}: n_keep={n_keep} is more than n_layers={n_layers}")
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    k = n_layers - n_keep
    if strategy == "top":
        return list(range(n_keep))
    if strategy == "bottom":
        return list(range(k, n_layers))
    start = n_layers - 1 if strategy == "alternate" else n_layers - 2  # 0-based index of the first layer dropped
    candidates = list(range(start, -1, -2))
    if k > len(candidates):
        raise ValueError(f"{where}: {strategy!r} dropping can remove at most {len(candidates)} of {n_layers} layers "
                         f"(every other one), asked to remove {k}; use 'top' or 'bottom'")
    dropped = set(candidates[:k])
    return [i for i in range(n_layers) if i not in dropped]


def drop_layers(model, keep):
    """Keep only the blocks ``keep`` (0-based indices, in ascending order) of the model, in place; updates
    ``model.config.n_layers`` (and per-layer ``n_heads`` / ``attention_kwargs`` lists). Returns the model."""
    where = "drop_layers"
    _check_model(model, where)
    L = len(model.blocks)
    if isinstance(keep, (str, bytes)) or not isinstance(keep, (list, tuple, range)):
        raise TypeError(f"{where}: keep must be a list of layer indices (0-based), got {type(keep).__name__}")
    keep = list(keep)
    for i in keep:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L:
            raise ValueError(f"{where}: layer {i!r} does not exist: layers are 0 … {L - 1} (0-based)")
    if not keep:
        raise ValueError(f"{where}: keep at least one layer")
    if len(set(keep)) != len(keep):
        raise ValueError(f"{where}: keep has repeated layers: {keep}")
    if keep != sorted(keep):
        raise ValueError(f"{where}: keep must be in ascending order (the blocks keep their order), got {keep}")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "replace"):
        changes = {"n_layers": len(keep)}
        for name in ("n_heads", "attention_kwargs"):
            value = getattr(config, name)
            if isinstance(value, (list, tuple)):
                changes[name] = [value[i] for i in keep]
        model.config = config.replace(**changes)
    model.blocks = nn.ModuleList([model.blocks[i] for i in keep])
    return model


__all__ = ["magnitude_mask", "smallest_mask", "global_magnitude_masks", "prunable_weights", "apply_masks", "remove_masks",
           "current_masks", "prune_magnitude", "sparsity", "sparsity_schedule", "iterative_prune", "model_size",
           "head_importance", "topic_contrastive_loss", "topic_batches", "mask_heads", "prune_heads",
           "heads_to_prune", "layers_kept", "drop_layers", "SCOPES", "STRATEGIES", "SparseLinear"]
