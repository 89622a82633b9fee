"""Mixture of experts: more parameters without more FLOPs per token (survey §3.8).

Papers: Shazeer, Mirhoseini, Maziarz, Davis, Le, Hinton & Dean, *Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer* (ICLR 2017) — noisy top-k gating; Lepikhin et al., *GShard* (2020) —
top-2 routing, expert capacity, token dropping, the auxiliary load-balancing loss; Fedus, Zoph & Shazeer, *Switch
Transformers* (JMLR 2022) — top-1 routing, the capacity factor, the balancing loss E·Σ f_i·P_i; Zoph et al.,
*ST-MoE* (2022) — the router z-loss.

**The idea.** Replace the Transformer's feed-forward layer by E copies of it, the *experts*, and a *router* that
sends each token to only k of them (k = 1 or 2). The parameters grow E-fold; the FLOPs per token grow only by the
router and k experts instead of one. The survey: "the computation cost of a token is the same for any number of
experts", the extra capacity costs memory and communication, not arithmetic.

**Routing** (a token x ∈ ℝ^d, E experts):

    h(x) = x · W_g                                  router logits (E,)        (+ noise in training, Shazeer 2017:
                                                                               h = x·W_g + ε ⊙ softplus(x·W_noise),
                                                                               ε ~ N(0, 1))
    p(x) = softmax(h(x))                            router probabilities
    T    = top-k(p)                                 the k chosen experts, best first
    g_j  = p_{T_j}                                  k = 1: the raw probability (Switch)
    g_j  = p_{T_j} / Σ_{j'} p_{T_j'}                k > 1: renormalised over the k (Shazeer's softmax over the
                                                           kept logits, GShard)
    y    = Σ_j g_j · FFN_{T_j}(x)                   the layer's output (0 for a token every choice of which was
                                                     dropped: the block's residual carries x)

**Capacity and dropping.** For batched compute each expert gets a fixed buffer of C slots,

    C = ceil(k · N / E · capacity_factor)           (Switch: capacity factor 1.0–1.25; GShard: 2 with k = 2)

and tokens claim slots *first come, first served* in token order: a token's slot at expert e is the number of
tokens that went to e before it. For k > 1 every first choice is placed before any second choice (GShard: a
token's second choice never displaces another token's first). A choice whose slot is ≥ C is *dropped*. Slots are
computed without a Python loop: flatten the choices choice-major, one-hot them (kN, E), a cumulative sum down the
rows counts, for each row, the tokens that chose the same expert up to and including it.

**Load balancing** (Switch eq. 4–6). With nothing to stop it, the router collapses onto a few experts (they train
faster because they get more tokens, so they get chosen more...). The auxiliary loss

    L_aux = E · Σ_i f_i · P_i,     f_i = (1/N) Σ_n 1[argmax p(x_n) = i],     P_i = (1/N) Σ_n p_i(x_n)

is 1 when the routing is balanced (f_i = 1/E for all i: then L_aux = Σ_i P_i = 1) and grows up to E when one
expert takes everything. f is not differentiable; the gradient flows through P, pushing probability away from
the over-used experts. Added to the LM loss with a weight α (Switch: 10⁻²). The router z-loss of ST-MoE,

    L_z = (1/N) Σ_n (log Σ_i exp h_i(x_n))²

keeps the logits small (bf16 round-off in the router's exponentials); ST-MoE's weight is 10⁻³.

**The layer** (:class:`MoEFeedForward`) holds its experts as batched parameters, ``w_in (E, d, d_ff)``, ``b_in``,
``w_out (E, d_ff, d)``, ``b_out``: route → *dispatch* the tokens into ``(E, C, d)`` buffers → one batched matmul
per FFN matrix (``torch.baddbmm`` over the experts) → *combine* back to ``(N, d)`` weighted by the gates. The
dispatch/combine kernels live in ``effedu.kernels.moe_dispatch`` (sort by expert + gather, numba, CUDA); the
layer can also use Mesh-TensorFlow's one-hot ``(N, E, C)`` einsum or a per-expert Python loop (``dispatch=``):
same numbers, different costs (``python -m effedu.bench moe``). :func:`moe_reference` is the plain oracle: a loop
over the tokens and their kept choices.

**Auxiliary loss and recomputation.** The layer records ``aux_weight·L_aux + z_weight·L_z`` in the model's
auxiliary-loss channel (``model.aux_loss()``), once per forward. Under gradient checkpointing or reversible
layers (chapters 02, 03) a segment runs twice: first without autograd (its record has no gradient), then again
in the backward pass (inside ``model.recomputing()``, where records are dropped). The layer then does what
Megatron-LM's ``MoEAuxLossAutoScaler`` does: during the recomputation it attaches its aux loss to its output
through a tiny autograd Function, identity in the forward, whose backward also hands the aux loss the gradient
∂total/∂aux = ``aux_grad_scale`` (1.0: the caller's loss is ``lm + model.aux_loss()``). The router receives
exactly the gradient of the un-checkpointed model, and the first forward's record is marked
"gradient injected on recompute" (no warning from ``aux_loss()``). Limit: a checkpoint that recomputes without
``recompute_context=model.recomputing`` records twice (as for any auxiliary loss); scale ``aux_grad_scale``
with the loss if you scale the loss (gradient accumulation).

What this module does *not* do (production systems do): expert parallelism across devices (chapter 10's
``effedu.general.expert_parallel``), GShard's random routing of the second expert, Switch's "selective precision"
beyond computing the router softmax in float32, capacity per group of tokens (HF's Switch router applies it per
sequence: see the tests), token-choice vs expert-choice routing (Zhou et al. 2022).
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_bool, check_choice, check_positive_int
from ..kernels.moe_dispatch import (moe_combine, moe_combine_einsum, moe_combine_loop, moe_dispatch,
                                    moe_dispatch_einsum, moe_dispatch_loop)
from ..measure import ffn_flops
from ..model import FeedForward, add_aux_loss, gelu, lm_loss

__all__ = [
    "capacity_for", "top_k_route", "load_balancing_loss", "router_z_loss", "Router", "MoEFeedForward",
    "moe_reference", "moe_factory", "moe_ffn_flops", "moe_param_count", "moe_layers", "moe_step", "train_moe",
    "DISPATCHES",
]

DISPATCHES = ("kernel", "einsum", "loop")


# --------------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------------


def _check_number(value, name, where, *, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {value!r}")
    return value


def _check_nonnegative(value, name, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def _check_k(k, n_experts, where):
    check_positive_int(k, "k", where)
    if k > n_experts:
        raise ValueError(f"{where}: k={k} experts per token exceeds the number of experts ({n_experts})")
    return k


def _check_logits(router_logits, where):
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"{where}: router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    if router_logits.dim() != 2:
        raise ValueError(f"{where}: router_logits must be (N, E) (tokens × experts), got shape "
                         f"{tuple(router_logits.shape)}")
    if not router_logits.is_floating_point():
        raise TypeError(f"{where}: router_logits must be a floating tensor, got {router_logits.dtype}")
    N, E = router_logits.shape
    if N == 0 or E == 0:
        raise ValueError(f"{where}: router_logits is empty: {N} tokens × {E} experts")
    # a value check (a GPU sync) worth its cost: a NaN logit routes its token nowhere sensible, silently
    if not bool(torch.isfinite(router_logits).all()):
        raise ValueError(f"{where}: router_logits contain NaN or inf (a diverged router? lower the lr, or add the "
                         f"router z-loss)")
    return N, E


# --------------------------------------------------------------------------------------------------------------
# capacity and routing
# --------------------------------------------------------------------------------------------------------------


def capacity_for(n_tokens, n_experts, k=1, capacity_factor=1.0):
    """Slots per expert: ``C = ceil(k · n_tokens / n_experts · capacity_factor)``, at least 1.

    Computed in exact fractions with the factor as written (1.1 is 11/10, not 1.1000000000000000888), so
    ``capacity_for(10, 1, 1, 1.1) == 11``, not 12.
    """
    where = "capacity_for"
    check_positive_int(n_tokens, "n_tokens", where)
    check_positive_int(n_experts, "n_experts", where)
    _check_k(k, n_experts, where)
    _check_number(capacity_factor, "capacity_factor", where)
    # C = ⌈k·N/E·cf⌉
    exact = Fraction(k * n_tokens, n_experts) * Fraction(repr(float(capacity_factor)))
    return max(1, math.ceil(exact))


def top_k_route(router_logits, k, capacity=None, *, return_slots=False):
    """Route N tokens to k of E experts each, with an optional capacity per expert.

    ``router_logits (N, E)`` → ``(expert_index (N, k) int64, gate (N, k), kept (N, k) bool)``, and with
    ``return_slots=True`` also ``slot (N, k) int64`` (the token's row in the expert's buffer, −1 where dropped).

    * ``expert_index[n]``: the k most probable experts of token n, best first;
    * ``gate``: their softmax probabilities (k = 1: the raw probability, as Switch; k > 1: renormalised over the
      k, as Shazeer 2017 and GShard), reported for dropped choices too (the combine multiplies by ``kept``);
      differentiable w.r.t. the logits; in the logits' dtype (the softmax runs in float32 for 16-bit logits);
    * ``capacity`` None: nothing is dropped. Else first come, first served in token order, all first choices
      before all second choices: ``kept = slot < capacity``.
    """
    where = "top_k_route"
    N, E = _check_logits(router_logits, where)
    _check_k(k, E, where)
    if capacity is not None:
        check_positive_int(capacity, "capacity", where)
    check_bool(return_slots, "return_slots", where)

    # p = softmax(h)  (float32 at least: Switch's "selective precision" for the router)
    half = router_logits.dtype in (torch.float16, torch.bfloat16)
    probs = torch.softmax(router_logits.float() if half else router_logits, dim=-1)  # (N, E)
    top_p, expert_index = probs.topk(k, dim=-1)  # (N, k), best first
    # g_j = p_{T_j} (k = 1)   or   p_{T_j} / Σ_j' p_{T_j'} (k > 1)
    gate = top_p if k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
    gate = gate.to(router_logits.dtype)

    # slots, first come first served, choice-major: rows 0…N−1 are the first choices, N…2N−1 the second, …
    flat = expert_index.t().reshape(-1)  # (k·N,)
    onehot = F.one_hot(flat, E)  # (k·N, E)
    # position[r] = #{r' ≤ r : flat[r'] = flat[r]} − 1   (how many went to that expert before this one)
    position = (onehot.cumsum(dim=0).gather(1, flat.unsqueeze(1)).squeeze(1) - 1).view(k, N).t()  # (N, k)
    if capacity is None:
        kept = torch.ones_like(expert_index, dtype=torch.bool)
        slot = position
    else:
        kept = position < capacity
        slot = torch.where(kept, position, torch.full_like(position, -1))
    return (expert_index, gate, kept, slot) if return_slots else (expert_index, gate, kept)


def _first_choice(expert_index, N, where):
    if not isinstance(expert_index, torch.Tensor) or expert_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: expert_index must be an integer tensor (N,) or (N, k)")
    if expert_index.dim() not in (1, 2) or expert_index.shape[0] != N or expert_index.numel() == 0:
        raise ValueError(f"{where}: expert_index must be ({N},) or ({N}, k), got shape {tuple(expert_index.shape)}")
    return expert_index if expert_index.dim() == 1 else expert_index[:, 0]


def load_balancing_loss(router_probs, expert_index):
    """Switch's auxiliary loss ``E · Σ_i f_i · P_i`` (f from the *first* choice, P the mean probability).

    ``router_probs (N, E)`` (rows sum to 1), ``expert_index (N,)`` or ``(N, k)`` (column 0 = first choice).
    1.0 exactly when the first choices are balanced (or the probabilities uniform); up to E when one expert takes
    every token with probability 1. Differentiable through P only.
    """
    where = "load_balancing_loss"
    if not isinstance(router_probs, torch.Tensor) or router_probs.dim() != 2 or not router_probs.is_floating_point():
        raise ValueError(f"{where}: router_probs must be a floating (N, E) tensor, got "
                         f"{getattr(router_probs, 'shape', type(router_probs).__name__)}")
    N, E = router_probs.shape
    first = _first_choice(expert_index, N, where)
    # f_i = (1/N) Σ_n 1[first choice of n = i]            (counts, not differentiable)
    f = torch.bincount(first, minlength=E)[:E].to(router_probs.dtype) / N
    # P_i = (1/N) Σ_n p_i(x_n)
    P = router_probs.mean(dim=0)
    # L_aux = E · Σ_i f_i · P_i
    return E * (f * P).sum()


def router_z_loss(router_logits):
    """ST-MoE's router z-loss ``(1/N) Σ_n (logsumexp_i h_i(x_n))²`` for ``router_logits (N, E)``."""
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(f"router_z_loss: router_logits must be a floating (N, E) tensor, got "
                         f"{getattr(router_logits, 'shape', type(router_logits).__name__)}")
    lse = torch.logsumexp(router_logits.float(), dim=-1)  # (N,)
    return lse.square().mean().to(router_logits.dtype)


# --------------------------------------------------------------------------------------------------------------
# the router
# --------------------------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Linear router ``h(x) = x · W_g`` (no bias, as Switch and Mixtral), optionally noisy (Shazeer et al. 2017).

    With ``noisy=True``, in training mode: ``h(x) = x · W_g + ε ⊙ softplus(x · W_noise)``, ε ~ N(0, 1) drawn from
    ``generator`` (a ``torch.Generator``; None = the global generator, which checkpointing replays). The noise
    spreads the load early in training and lets the top-k choice be explored; eval mode is noiseless.
    Shazeer initialises W_g and W_noise at 0; here the weights get nn.Linear's default (and N(0, 0.02) inside an
    ``effedu.model.Transformer``, whose ``init_weights`` covers every Linear) so that routes differ from the start.
    """

    def __init__(self, d_model, n_experts, *, noisy=False):
        super().__init__()
        check_positive_int(d_model, "d_model", "Router")
        check_positive_int(n_experts, "n_experts", "Router")
        check_bool(noisy, "noisy", "Router")
        self.d_model, self.n_experts, self.noisy = d_model, n_experts, noisy
        self.w_gate = nn.Linear(d_model, n_experts, bias=False)
        self.w_noise = nn.Linear(d_model, n_experts, bias=False) if noisy else None

    def forward(self, x, *, generator=None):
        """``x (N, d)`` → logits ``(N, E)``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"Router: x must be (N, {self.d_model}), got {getattr(x, 'shape', type(x).__name__)}")
        logits = self.w_gate(x)  # h = x·W_g                                               (N, E)
        if self.noisy and self.training:
            eps = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            # h = x·W_g + ε ⊙ softplus(x·W_noise)
            logits = logits + eps * F.softplus(self.w_noise(x))
        return logits

    def extra_repr(self):
        return f"d_model={self.d_model}, n_experts={self.n_experts}, noisy={self.noisy}"


# --------------------------------------------------------------------------------------------------------------
# the auxiliary loss under recomputation (Megatron's MoEAuxLossAutoScaler)
# --------------------------------------------------------------------------------------------------------------


class _InjectAuxGrad(torch.autograd.Function):
    """Identity on ``out`` in the forward; in the backward, also gives ``aux`` the gradient ``scale``
    (∂total/∂aux when the caller's loss is ``… + scale·aux``), so the aux loss trains even though the record the
    caller summed was made without autograd."""

    @staticmethod
    def forward(ctx, out, aux, scale):
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        shape, dtype, device = ctx.aux_meta
        return grad_out, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


# --------------------------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------------------------


def _dispatch_fns(dispatch, backend):
    """(dispatch_fn, combine_fn) of the chosen implementation, from effedu.kernels.moe_dispatch."""
    if dispatch == "kernel":
        # the routing comes from top_k_route: its indices need no second check
        return (lambda x, i, s, E, C: moe_dispatch(x, i, s, E, C, backend=backend, check_indices=False),
                lambda y, i, s, g: moe_combine(y, i, s, g, backend=backend, check_indices=False))
    if dispatch == "einsum":
        return moe_dispatch_einsum, moe_combine_einsum
    return moe_dispatch_loop, moe_combine_loop


class MoEFeedForward(nn.Module):
    """A mixture-of-experts feed-forward layer, usable as the FFN of :class:`effedu.model.Block`.

    ``E = n_experts`` experts, each ``GELU(x W_in[e] + b_in[e]) W_out[e] + b_out[e]`` (the
    :class:`effedu.model.FeedForward` of width ``d_ff``), held as batched parameters ``w_in (E, d, d_ff)``,
    ``b_in (E, d_ff)``, ``w_out (E, d_ff, d)``, ``b_out (E, d)``; a :class:`Router` (``self.router``), k experts
    per token, capacity ``capacity_for(N, E, k, capacity_factor)`` over the N tokens of a forward
    (``capacity_factor=None``: no dropping, buffers as large as the busiest expert).

    ``dispatch``: ``"kernel"`` (``effedu.kernels.moe_dispatch`` with ``backend``), ``"einsum"`` (Mesh-TF's one-hot
    ``(N, E, C)``) or ``"loop"`` (per expert): the same numbers. ``aux_weight`` α (Switch 10⁻²) and ``z_weight``
    (ST-MoE 10⁻³) weigh the auxiliary losses recorded with :func:`effedu.model.add_aux_loss` (a layer used outside a
    Transformer, with no ``aux_channel``, records nothing; ``last_aux`` holds the value either way).
    ``aux_grad_scale``: ∂(caller's loss)/∂(model.aux_loss()), the gradient injected into the aux loss when the
    layer is recomputed by checkpointing/reversible layers (module docstring).

    After each forward ``last_routing`` is a dict: ``expert_index``, ``gate``, ``kept``, ``slot`` (N, k),
    ``router_probs`` (N, E), ``load`` (E,) int64 = tokens whose first choice is each expert, ``counts`` (E,) int64 =
    choices (all k) sent to each expert before dropping, ``dropped`` (int) = dropped choices (token, expert),
    ``dropped_tokens`` (int) = tokens with every choice dropped, ``capacity`` (int), ``n_tokens`` (int),
    ``balance_loss`` and ``z_loss`` (0-d tensors, unweighted). All detached.
    """

    def __init__(self, d_model, d_ff, n_experts, *, k=1, capacity_factor=1.25, aux_weight=1e-2, z_weight=0.0,
                 noisy=False, dispatch="kernel", backend="auto", dropout=0.0, aux_grad_scale=1.0):
        super().__init__()
        where = "MoEFeedForward"
        check_positive_int(d_model, "d_model", where)
        check_positive_int(d_ff, "d_ff", where)
        check_positive_int(n_experts, "n_experts", where)
        _check_k(k, n_experts, where)
        if capacity_factor is not None:
            _check_number(capacity_factor, "capacity_factor", where)
        _check_nonnegative(aux_weight, "aux_weight", where)
        _check_nonnegative(z_weight, "z_weight", where)
        _check_nonnegative(aux_grad_scale, "aux_grad_scale", where)
        check_choice(dispatch, DISPATCHES, "dispatch", where)
        if not isinstance(backend, str):
            raise TypeError(f"{where}: backend must be a str ('auto', 'torch', 'numba', 'cuda'), got "
                            f"{type(backend).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{where}: dropout must be in [0, 1), got {dropout!r}")
        self.d_model, self.d_ff, self.n_experts, self.k = d_model, d_ff, n_experts, k
        self.capacity_factor = capacity_factor
        self.aux_weight, self.z_weight, self.aux_grad_scale = float(aux_weight), float(z_weight), float(aux_grad_scale)
        self.dispatch, self.backend = dispatch, backend
        self.router = Router(d_model, n_experts, noisy=noisy)
        E = n_experts
        self.w_in = nn.Parameter(torch.empty(E, d_model, d_ff))
        self.b_in = nn.Parameter(torch.empty(E, d_ff))
        self.w_out = nn.Parameter(torch.empty(E, d_ff, d_model))
        self.b_out = nn.Parameter(torch.empty(E, d_model))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()
        self.last_routing, self.last_aux = None, None

    @torch.no_grad()
    def reset_parameters(self, std=None):
        """``std=None``: each expert as a fresh ``nn.Linear`` pair (:class:`effedu.model.FeedForward` standalone:
        U(±1/√fan_in) weights and biases). ``std`` a number: N(0, std) weights, zero biases — what
        ``effedu.model.init_weights`` gives a FeedForward inside a Transformer (:func:`moe_factory` uses 0.02)."""
        for w, b, fan_in in ((self.w_in, self.b_in, self.d_model), (self.w_out, self.b_out, self.d_ff)):
            if std is None:
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5) of nn.Linear = U(±1/√fan_in)
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)
            else:
                w.normal_(0.0, _check_number(std, "std", "MoEFeedForward.reset_parameters"))
                b.zero_()
        return self

    # -- the pieces ------------------------------------------------------------------------------------------

    def _route(self, x2d):
        """Routing of ``x2d (N, d)``: (the ``route`` dict, router probabilities with grad, logits with grad)."""
        N = x2d.shape[0]
        logits = self.router(x2d)  # (N, E)
        if self.capacity_factor is None:
            capacity = None
        else:
            capacity = capacity_for(N, self.n_experts, self.k, self.capacity_factor)
        expert_index, gate, kept, slot = top_k_route(logits, self.k, capacity, return_slots=True)
        half = logits.dtype in (torch.float16, torch.bfloat16)
        probs = torch.softmax(logits.float() if half else logits, dim=-1)  # (N, E), for the balancing loss
        E = self.n_experts
        counts = torch.bincount(expert_index.reshape(-1), minlength=E)  # choices per expert before dropping
        if capacity is None:
            capacity = max(1, int(counts.max()))  # no dropping: buffers as large as the busiest expert
        n_dropped = int((~kept).sum())
        routing = dict(expert_index=expert_index, gate=gate, kept=kept, slot=slot, router_probs=probs.detach(),
                       load=torch.bincount(expert_index[:, 0], minlength=E), counts=counts, dropped=n_dropped,
                       dropped_tokens=int((~kept).all(dim=1).sum()) if n_dropped else 0, capacity=capacity,
                       n_tokens=N)
        return routing, probs, logits

    def route(self, x2d):
        """The router part alone, on ``x2d (N, d)``: the ``last_routing`` dict (``gate`` keeps its gradient)."""
        if not isinstance(x2d, torch.Tensor) or x2d.dim() != 2 or x2d.shape[1] != self.d_model or x2d.shape[0] == 0:
            raise ValueError(f"MoEFeedForward.route: x2d must be (N, {self.d_model}) with N ≥ 1, got "
                             f"{getattr(x2d, 'shape', type(x2d).__name__)}")
        return self._route(x2d)[0]

    def _expert_slice(self, experts):
        if isinstance(experts, slice):
            return experts
        if isinstance(experts, int) and not isinstance(experts, bool):
            return slice(experts, experts + 1)
        idx = torch.as_tensor(experts, dtype=torch.long, device=self.w_in.device)
        if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_experts)):
            raise ValueError(f"MoEFeedForward: experts must be a slice, an int or a list of indices in "
                             f"0 … {self.n_experts - 1}, got {experts!r}")
        return idx

    def expert_parameters(self, experts=slice(None)):
        """``(w_in, b_in, w_out, b_out)`` of the chosen experts (a slice, an int or a list of indices), indexed
        views of the batched parameters (with a slice: views sharing memory; gradients flow to the full ones)."""
        sel = self._expert_slice(experts)
        return self.w_in[sel], self.b_in[sel], self.w_out[sel], self.b_out[sel]

    def experts_forward(self, buffers, experts=slice(None)):
        """``buffers (E', C, d)`` → ``(E', C, d)``: each chosen expert's FFN on its buffer (one batched matmul per
        matrix). ``experts`` picks E' of the E experts (a rank's share under expert parallelism)."""
        w_in, b_in, w_out, b_out = self.expert_parameters(experts)
        if not isinstance(buffers, torch.Tensor) or buffers.dim() != 3 or buffers.shape[0] != w_in.shape[0] \
                or buffers.shape[2] != self.d_model:
            raise ValueError(f"MoEFeedForward.experts_forward: buffers must be ({w_in.shape[0]}, C, {self.d_model}) "
                             f"for the chosen experts, got {getattr(buffers, 'shape', type(buffers).__name__)}")
        # h = GELU(X_e W_in[e] + b_in[e])                                              (E', C, d_ff)
        h = self.dropout(gelu(torch.baddbmm(b_in.unsqueeze(1), buffers, w_in)))
        # y = h W_out[e] + b_out[e]                                                    (E', C, d)
        return torch.baddbmm(b_out.unsqueeze(1), h, w_out)

    def _aux(self, probs, logits, expert_index):
        # aux = α·L_aux + β·L_z
        balance, z = load_balancing_loss(probs, expert_index), router_z_loss(logits)
        aux = self.aux_weight * balance + self.z_weight * z if self.z_weight else self.aux_weight * balance
        return aux, balance, z

    def _record(self, out, aux):
        """Record ``aux`` once per forward; attach it to ``out`` when this forward is a recomputation."""
        channel = getattr(self, "aux_channel", None)
        if channel is None:
            return out  # a layer outside a Transformer: nothing to record into (last_aux has the value)
        if channel.recomputing_depth > 0:
            # a recomputation (checkpoint / reversible backward): the record is dropped by the channel, and the
            # first forward's record had no gradient — inject d(total)/d(aux) = aux_grad_scale here instead
            if torch.is_grad_enabled() and aux.requires_grad:
                out = _InjectAuxGrad.apply(out, aux, self.aux_grad_scale)
            return out
        # without autograd (a checkpointed segment's first forward, or evaluation): the value counts, its
        # gradient comes from the recomputation
        add_aux_loss(self, aux, injected=not torch.is_grad_enabled())
        return out

    def forward(self, x):
        """``x (..., d)`` → ``(..., d)``: route, dispatch, experts, combine; 0 for a token whose choices were all
        dropped."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.d_model or x.numel() == 0:
            raise ValueError(f"MoEFeedForward: x must be (..., {self.d_model}) and non-empty, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        shape = x.shape
        x2d = x.reshape(-1, self.d_model)  # (N, d)
        routing, probs, logits = self._route(x2d)
        idx, slot, gate = routing["expert_index"], routing["slot"], routing["gate"]
        dispatch_fn, combine_fn = _dispatch_fns(self.dispatch, self.backend)
        buffers = dispatch_fn(x2d, idx, slot, self.n_experts, routing["capacity"])  # (E, C, d)
        expert_out = self.experts_forward(buffers)  # (E, C, d)
        out = combine_fn(expert_out, idx, slot, gate.to(expert_out.dtype))  # (N, d)
        aux, balance, z = self._aux(probs, logits, idx)
        out = self._record(out, aux)
        routing["balance_loss"], routing["z_loss"] = balance.detach(), z.detach()
        routing["gate"] = gate.detach()
        self.last_routing, self.last_aux = routing, aux.detach()
        return out.reshape(shape)

    def extra_repr(self):
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, k={self.k}, "
                f"capacity_factor={self.capacity_factor}, aux_weight={self.aux_weight}, z_weight={self.z_weight}, "
                f"dispatch={self.dispatch!r}")


def moe_reference(layer, x):
    """The oracle: ``y_n = Σ_{kept choices j} g_nj · FFN_{e_nj}(x_n)``, a Python loop over tokens and choices with
    the layer's own routing (``layer.route``; in eval mode, or noiseless, so both see the same routes).
    ``x (..., d)`` → ``(..., d)``. Dropout is not applied (use eval mode)."""
    if not isinstance(layer, MoEFeedForward):
        raise TypeError(f"moe_reference: layer must be a MoEFeedForward, got {type(layer).__name__}")
    shape = x.shape
    x2d = x.reshape(-1, layer.d_model)
    r = layer.route(x2d)
    rows = []
    for n in range(x2d.shape[0]):
        y = torch.zeros_like(x2d[n])
        for j in range(layer.k):
            if r["kept"][n, j]:
                e = int(r["expert_index"][n, j])
                # FFN_e(x) = GELU(x W_in[e] + b_in[e]) W_out[e] + b_out[e]
                h = gelu(x2d[n] @ layer.w_in[e] + layer.b_in[e])
                y = y + r["gate"][n, j] * (h @ layer.w_out[e] + layer.b_out[e])
        rows.append(y)
    return torch.stack(rows).reshape(shape)


# --------------------------------------------------------------------------------------------------------------
# in a Transformer: the FFN factory, counts, training
# --------------------------------------------------------------------------------------------------------------


def moe_factory(n_experts, *, k=1, capacity_factor=1.25, aux_weight=1e-2, every=1, **kw):
    """A ``TransformerConfig(ffn=...)`` factory: :class:`MoEFeedForward` in the layers with
    ``layer_index % every == every − 1`` (every=2: every other layer, as Switch and GShard), the dense
    :class:`effedu.model.FeedForward` elsewhere. Width ``config.d_ff``, dropout ``config.dropout`` (unless given),
    experts initialised as the Transformer initialises a FeedForward (N(0, 0.02), zero biases). Other keywords go
    to :class:`MoEFeedForward`."""
    where = "moe_factory"
    check_positive_int(n_experts, "n_experts", where)
    _check_k(k, n_experts, where)
    if capacity_factor is not None:
        _check_number(capacity_factor, "capacity_factor", where)
    check_positive_int(every, "every", where)

    def factory(config, layer_index):
        if layer_index % every != every - 1:
            return FeedForward(config.d_model, config.d_ff, config.dropout)
        options = dict(kw)
        options.setdefault("dropout", config.dropout)
        layer = MoEFeedForward(config.d_model, config.d_ff, n_experts, k=k, capacity_factor=capacity_factor,
                               aux_weight=aux_weight, **options)
        return layer.reset_parameters(0.02)

    factory.n_experts, factory.k, factory.every = n_experts, k, every
    return factory


def moe_ffn_flops(n_tokens, d_model, d_ff, n_experts, k=1):
    """Forward FLOPs of an MoE FFN on ``n_tokens``: router ``2·d·E`` per token + k experts' FFN
    (``effedu.measure.ffn_flops``). Dropping and padding of the buffers are not counted."""
    where = "moe_ffn_flops"
    for name, v in (("n_tokens", n_tokens), ("d_model", d_model), ("d_ff", d_ff), ("n_experts", n_experts)):
        check_positive_int(v, name, where)
    _check_k(k, n_experts, where)
    return 2 * n_tokens * d_model * n_experts + k * ffn_flops(n_tokens, d_model, d_ff)


def moe_param_count(d_model, d_ff, n_experts, *, noisy=False):
    """Parameters of a :class:`MoEFeedForward`: E experts ``(2·d·d_ff + d_ff + d)`` + router ``d·E`` (twice with
    the noise weights)."""
    where = "moe_param_count"
    for name, v in (("d_model", d_model), ("d_ff", d_ff), ("n_experts", n_experts)):
        check_positive_int(v, name, where)
    return n_experts * (2 * d_model * d_ff + d_ff + d_model) + (2 if noisy else 1) * d_model * n_experts


def moe_layers(model):
    """The :class:`MoEFeedForward` modules of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def _aux_loss_of(model):
    if hasattr(model, "aux_loss"):
        return model.aux_loss()
    inner = getattr(model, "model", None)  # a wrapper (CheckpointedTransformer)
    if inner is not None and hasattr(inner, "aux_loss"):
        return inner.aux_loss()
    raise TypeError(f"moe_step: {type(model).__name__} has no aux_loss() (an effedu Transformer, or a wrapper with "
                    f".model, is expected)")


def moe_step(model, inputs, targets, optimizer, *, grad_clip=1.0):
    """One training step for ``train(step_fn=...)``: ``(lm_loss + model.aux_loss()).backward()``, clip, step.
    Returns the LM loss alone (a float), so curves compare with a dense model's."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(inputs)
    lm = lm_loss(logits, targets)
    (lm + _aux_loss_of(model)).backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(lm.detach())


def train_moe(model, batches, *, steps, lr=3e-3, record=True, **train_kw):
    """``effedu.train.train`` with :func:`moe_step`. With ``record``, the history also has, per step:
    ``history["load"]`` a list (one per MoE layer) of E first-choice counts, ``history["aux"]`` the auxiliary loss,
    ``history["dropped_fraction"]`` dropped choices / all choices over the MoE layers."""
    from ..train import train

    check_bool(record, "record", "train_moe")
    grad_clip = train_kw.get("grad_clip", 1.0)
    layers = moe_layers(model)
    load, aux, dropped = [], [], []

    def step_fn(m, inputs, targets, optimizer):
        loss = moe_step(m, inputs, targets, optimizer, grad_clip=grad_clip)
        if record:
            load.append([lay.last_routing["load"].tolist() for lay in layers])
            aux.append(float(sum(lay.last_aux for lay in layers)) if layers else 0.0)
            total = sum(lay.last_routing["n_tokens"] * lay.k for lay in layers)
            dropped.append(sum(lay.last_routing["dropped"] for lay in layers) / total if total else 0.0)
        return loss

    history = train(model, batches, steps=steps, lr=lr, step_fn=step_fn, **train_kw)
    if record:
        history.update(load=load, aux=aux, dropped_fraction=dropped)
    return history
