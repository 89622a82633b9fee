"""Conditional computation (survey §3.12): spend layers where they are needed — early exit, ACT, per-token depth.

A Transformer runs every layer on every input, yet many inputs are easy: a shallow layer already knows the answer.
Three ways to stop early, all from tensor ops here:

* **Early exit per sequence** (classification). A classifier ("off-ramp") after *every* layer j = 1 … L, trained
  jointly with PABEE's weighted loss (Zhou et al. 2020, "BERT Loses Patience", Eq. 3)::

      L_total = Σ_j j · L_j / Σ_j j                      (deeper classifiers weigh more; j is 1-based)

  At inference an example leaves at the first layer whose classifier is sure enough:

  - **entropy** (DeeBERT, Xin et al. 2020): exit at the first layer with ``H(softmax(z_j)) < S`` (S in nats);
  - **patience** (PABEE): exit once the argmax has stayed the same for ``patience`` consecutive layers.
    Counting, exactly as PABEE's reference code (``modeling_pabee_bert.py``: ``patient_counter``): the counter
    starts at 0 after layer 1; after layer j ≥ 2 it becomes counter + 1 if argmax_j == argmax_{j−1}, else 0; the
    example exits at the first layer where counter == patience. So with patience t the earliest exit is layer
    t + 1 (1-based) — t + 1 consecutive layers agree — and an example that never gets there uses the last layer.

  :func:`early_exit_infer` runs the batch layer by layer and *drops* the finished examples (row indexing), so
  later layers see fewer rows — real compute saved, unlike a loop that waits until ``torch.all`` of the batch is
  done (what PABEE's own code does). It equals the batch-of-one loop :func:`early_exit_loop` and the rules
  applied to the full forward (:func:`exit_by_entropy`, :func:`exit_by_patience`).

* **Adaptive Computation Time** (Graves 2016; the Universal Transformer, Dehghani et al. 2019). One shared block
  applied up to M times; after step n each position emits a halting probability h_n = σ(w·s_n + b). With
  threshold 1 − ε::

      N = min( M, min{ n : h_1 + … + h_n ≥ 1 − ε } )      halting step (1-based)
      R = 1 − (h_1 + … + h_{N−1})                           remainder
      w_n = h_n (n < N),  w_N = R,  w_n = 0 (n > N)          Σ_n w_n = 1
      output = Σ_n w_n · s_n,  ponder cost ρ = N + R        (Graves Eq. 6–11)

  :func:`act_weights` computes it vectorised over positions (:func:`act_reference` step by step is the oracle),
  :class:`ACTTransformer` is the model (ponder cost recorded as an auxiliary loss).

* **Depth-adaptive per token** (Elbayad et al. 2020, "Depth-Adaptive Transformer"; Schuster et al. 2022, CALM).
  One output head shared by every layer; a token exits after the first layer whose prediction has max softmax
  probability ≥ threshold; an exited token's state is *copied* to the layers above, so the tokens still running
  read its last state as keys and values. :class:`DepthAdaptiveTransformer`.

Everything is from tensor ops and the course's :class:`~effedu.model.Block`; ``torch.distributions.Categorical``
is only the entropy oracle in tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice, check_int, check_positive_int, check_tokens
from ..data.tasks import PAD
from ..model import IGNORE, AuxLossChannel, Block, TransformerConfig, add_aux_loss, init_weights, lm_loss
from ..train import train

POOLS = ("mean", "last")
EXIT_RULES = ("entropy", "patience")
DEPTH_RULES = ("confidence",)


# --------------------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------------------


def _check_config(config, where):
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"{where}: config must be a TransformerConfig, got {type(config).__name__}")


def _check_per_layer_logits(per_layer_logits, where):
    if not isinstance(per_layer_logits, torch.Tensor) or not per_layer_logits.is_floating_point():
        raise TypeError(f"{where}: per_layer_logits must be a floating torch.Tensor (L, B, C), "
                        f"got {type(per_layer_logits).__name__}")
    if per_layer_logits.dim() != 3 or 0 in per_layer_logits.shape:
        raise ValueError(f"{where}: per_layer_logits must be a non-empty (L, B, C) tensor, "
                         f"got shape {tuple(per_layer_logits.shape)}")
    return per_layer_logits.shape


def _check_entropy_threshold(threshold, where):
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{where}: threshold must be a number (an entropy in nats), got {type(threshold).__name__}")
    if not threshold >= 0:  # also NaN
        raise ValueError(f"{where}: threshold must be >= 0 (an entropy, in nats; 0 never exits early), "
                         f"got {threshold!r}")
    return float(threshold)


def _check_patience(patience, where):
    return check_int(patience, "patience", where, minimum=1)


def _check_act_threshold(threshold, where):
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{where}: threshold must be a number in (0, 1] (= 1 − ε), got {type(threshold).__name__}")
    if not 0 < threshold <= 1:
        raise ValueError(f"{where}: threshold must be in (0, 1] (= 1 − ε), got {threshold!r}")
    return float(threshold)


def _rule_args(rule, threshold, patience, where):
    check_choice(rule, EXIT_RULES, "rule", where)
    if rule == "entropy":
        if threshold is None:
            raise ValueError(f"{where}: rule='entropy' needs threshold= (an entropy in nats)")
        return _check_entropy_threshold(threshold, where)
    if patience is None:
        raise ValueError(f"{where}: rule='patience' needs patience= (an int >= 1)")
    return _check_patience(patience, where)


def _attach_aux_channel(model):
    """Give every submodule the model's :class:`~effedu.model.AuxLossChannel` (an FFN factory such as a mixture of
    experts records its auxiliary loss there, as inside a :class:`~effedu.model.Transformer`)."""
    model.aux_channel = AuxLossChannel()
    for m in model.modules():
        m.aux_channel = model.aux_channel


# --------------------------------------------------------------------------------------------------------------
# early exit per sequence: the model, its loss, the exit rules
# --------------------------------------------------------------------------------------------------------------


class EarlyExitClassifier(nn.Module):
    """The course Transformer's embeddings and blocks with a classifier after *every* layer (DeeBERT, PABEE).

    ``forward(tokens (B, T)) -> per_layer_logits (L, B, C)``: classifier j (0-based; layer j + 1 in displays)
    reads the pooled output of block j: ``z_j = W_j · LN_j(pool(h_j)) + b_j``. ``pool="mean"`` averages the
    positions that are not ``pad_id`` (each example its own mask, so dropping rows keeps it right; ``pad_id=None``
    averages every position), ``pool="last"`` takes the last position (the SEP of ListOps/brackets, the only one a
    causal model sees everything from). The attention itself is not masked: PAD is an ordinary token, as in the
    rest of the course.
    """

    def __init__(self, config: TransformerConfig, n_classes, *, pool="mean", pad_id: Optional[int] = PAD):
        super().__init__()
        where = "EarlyExitClassifier"
        _check_config(config, where)
        check_int(n_classes, "n_classes", where, minimum=2)
        check_choice(pool, POOLS, "pool", where)
        if pad_id is not None:
            check_int(pad_id, "pad_id", where, minimum=0)
        self.config, self.n_classes, self.pool, self.pad_id = config, n_classes, pool, pad_id
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(config.d_model) for _ in range(config.n_layers)])
        self.classifiers = nn.ModuleList([nn.Linear(config.d_model, n_classes) for _ in range(config.n_layers)])
        self.apply(init_weights)
        _attach_aux_channel(self)

    @property
    def n_layers(self):
        return len(self.blocks)

    def embed(self, tokens):
        """tokens ``(B, T)`` → ``dropout(E[tokens] + P[positions])`` ``(B, T, d)``."""
        B, T = check_tokens(tokens, self.config, type(self).__name__)
        self.aux_channel.clear()
        return self.drop(self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device)))

    def aux_loss(self):
        """The auxiliary losses recorded during the last forward (0 when none), as ``Transformer.aux_loss``."""
        return self.aux_channel.total(self.tok_emb.weight.device)

    def classify(self, layer, h, tokens):
        """Logits ``(B, C)`` of classifier ``layer`` (0-based) on block ``layer``'s output ``h (B, T, d)``."""
        if self.pool == "last":
            pooled = h[:, -1]
        elif self.pad_id is None:
            pooled = h.mean(dim=1)
        else:
            keep = (tokens != self.pad_id).to(h.dtype).unsqueeze(-1)  # (B, T, 1), per example
            # mean over the non-PAD positions (an all-PAD row: over none → 0)
            pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
        return self.classifiers[layer](self.norms[layer](pooled))

    def forward(self, tokens):
        """tokens ``(B, T)`` → per-layer logits ``(L, B, C)``: every layer, every example (training, the oracle)."""
        h = self.embed(tokens)
        out = []
        for j, block in enumerate(self.blocks):
            h = block(h)
            out.append(self.classify(j, h, tokens))
        return torch.stack(out)


def class_labels(targets):
    """The class label of each row: ``targets (B,)`` as they are, or ``(B, T)`` task targets with exactly one
    scored position per row (ListOps, brackets: the last) → that value ``(B,)``."""
    where = "class_labels"
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: targets must be an integer tensor (B,) or (B, T), got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.dim() == 1:
        return targets.long()
    if targets.dim() != 2:
        raise ValueError(f"{where}: targets must be (B,) or (B, T), got shape {tuple(targets.shape)}")
    scored = targets != IGNORE
    if not bool((scored.sum(dim=1) == 1).all()):
        raise ValueError(f"{where}: (B, T) targets must have exactly one scored position per row (a class label)")
    return targets[scored].long()


def early_exit_loss(per_layer_logits, labels):
    """PABEE's weighted loss ``Σ_j j·L_j / Σ_j j`` (j = 1 … L; L_j the mean cross-entropy of classifier j).

    ``per_layer_logits (L, B, C)``, ``labels (B,)`` (or ``(B, T)`` task targets, see :func:`class_labels`)."""
    L, B, C = _check_per_layer_logits(per_layer_logits, "early_exit_loss")
    labels = class_labels(labels)
    if labels.shape != (B,):
        raise ValueError(f"early_exit_loss: labels must be ({B},), got {tuple(labels.shape)}")
    # L_j = CE(z_j, y), one per layer
    losses = F.cross_entropy(per_layer_logits.reshape(L * B, C), labels.repeat(L), reduction="none")
    losses = losses.view(L, B).mean(dim=1)
    j = torch.arange(1, L + 1, dtype=losses.dtype, device=losses.device)
    return (j * losses).sum() / j.sum()


def _early_exit_step(model, inputs, targets, optimizer, grad_clip=1.0):
    optimizer.zero_grad(set_to_none=True)
    loss = early_exit_loss(model(inputs), targets) + model.aux_loss()  # + e.g. a mixture of experts' balancing
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


def train_early_exit(model, batches, *, steps, lr=3e-3, **train_kw):
    """Train every classifier jointly with :func:`early_exit_loss` (+ ``model.aux_loss()``) through :func:`effedu.train.train`
    (``step_fn``); ``batches`` as there (targets ``(B,)`` labels or ``(B, T)`` task targets). Returns the
    history. ``val_batch`` is not supported (the LM evaluation does not apply): use :func:`per_layer_accuracy`."""
    if not isinstance(model, EarlyExitClassifier):
        raise TypeError(f"train_early_exit: model must be an EarlyExitClassifier, got {type(model).__name__}")
    if "val_batch" in train_kw or "step_fn" in train_kw:
        raise TypeError("train_early_exit: val_batch and step_fn are not supported (use per_layer_accuracy)")
    return train(model, batches, steps=steps, lr=lr, step_fn=_early_exit_step, **train_kw)


@torch.no_grad()
def per_layer_accuracy(per_layer_logits, labels):
    """Accuracy of each layer's classifier, a list of L floats."""
    L, B, C = _check_per_layer_logits(per_layer_logits, "per_layer_accuracy")
    labels = class_labels(labels).to(per_layer_logits.device)
    return (per_layer_logits.argmax(-1) == labels).float().mean(dim=1).tolist()


def entropy(logits):
    """Entropy of ``softmax(logits)`` over the last axis, in nats: ``H = −Σ_c p_c log p_c`` → shape ``(…,)``."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"entropy: logits must be a floating torch.Tensor, got {type(logits).__name__}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"entropy: logits must have a class axis (…, C), got shape {tuple(logits.shape)}")
    logp = torch.log_softmax(logits, dim=-1)
    # p log p with 0·log 0 = 0 (a -inf logit gives p = 0)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(dim=-1)


def _first_true(done):
    """Index of the first True along axis 0 of ``done (L, B)`` (the last row must be all True)."""
    L = done.shape[0]
    idx = torch.arange(L, device=done.device).view(L, *([1] * (done.dim() - 1)))
    return torch.where(done, idx, L).amin(dim=0)


def _gather_exit(per_layer_logits, exit_layer):
    L, B, C = per_layer_logits.shape
    return per_layer_logits.gather(0, exit_layer.view(1, B, 1).expand(1, B, C))[0]


def exit_by_entropy(per_layer_logits, threshold):
    """DeeBERT's rule on precomputed logits ``(L, B, C)``: exit at the first layer whose entropy (nats) is
    ``< threshold``, else at the last. Returns ``(exit_layer (B,) int64 0-based, logits (B, C))``."""
    where = "exit_by_entropy"
    _check_per_layer_logits(per_layer_logits, where)
    threshold = _check_entropy_threshold(threshold, where)
    done = entropy(per_layer_logits) < threshold  # (L, B)
    done[-1] = True
    exit_layer = _first_true(done)
    return exit_layer, _gather_exit(per_layer_logits, exit_layer)


def patience_counters(per_layer_logits):
    """PABEE's counter after each layer ``(L, B)`` int64: 0 after layer 1, then +1 when the argmax equals the
    previous layer's, reset to 0 when it changes."""
    pred = per_layer_logits.argmax(-1)  # (L, B)
    counters = torch.zeros_like(pred)
    for j in range(1, pred.shape[0]):  # a loop over layers only (vectorised over the batch)
        counters[j] = torch.where(pred[j] == pred[j - 1], counters[j - 1] + 1, 0)
    return counters


def exit_by_patience(per_layer_logits, patience):
    """PABEE's rule on precomputed logits ``(L, B, C)``: exit at the first layer where the patience counter
    (:func:`patience_counters`) reaches ``patience`` (t + 1 consecutive layers agree), else at the last.
    Returns ``(exit_layer (B,) int64 0-based, logits (B, C))``."""
    where = "exit_by_patience"
    _check_per_layer_logits(per_layer_logits, where)
    patience = _check_patience(patience, where)
    done = patience_counters(per_layer_logits) >= patience
    done[-1] = True
    exit_layer = _first_true(done)
    return exit_layer, _gather_exit(per_layer_logits, exit_layer)


def apply_exit_rule(per_layer_logits, *, rule="entropy", threshold=None, patience=None):
    """:func:`exit_by_entropy` or :func:`exit_by_patience` by name."""
    value = _rule_args(rule, threshold, patience, "apply_exit_rule")
    return exit_by_entropy(per_layer_logits, value) if rule == "entropy" else exit_by_patience(per_layer_logits,
                                                                                                  value)


@torch.no_grad()
def early_exit_infer(model, tokens, *, rule="entropy", threshold=None, patience=None, return_stats=False):
    """Batched early exit: run layer by layer and drop the finished examples from the batch.

    After block j the remaining rows are classified; the rows that exit are written out and removed
    (``h = h[keep]``, their tokens and patience state too), so block j + 1 runs on fewer rows. Returns
    ``(logits (B, C), exit_layer (B,) int64 0-based)``; with ``return_stats=True`` also a dict:
    ``rows_per_layer`` (how many examples ran each layer), ``layers_run`` (Σ = Σ_b (exit_b + 1)),
    ``full`` (B·L) and ``average_layers`` (layers_run / B). Runs in eval mode (restored afterwards).
    """
    where = "early_exit_infer"
    if not isinstance(model, EarlyExitClassifier):
        raise TypeError(f"{where}: model must be an EarlyExitClassifier, got {type(model).__name__}")
    value = _rule_args(rule, threshold, patience, where)
    was_training = model.training
    model.eval()
    try:
        h = model.embed(tokens)
        B, L = tokens.shape[0], model.n_layers
        active = torch.arange(B, device=tokens.device)  # original row of each remaining row
        rows = tokens
        out_logits, exit_layer = None, torch.full((B,), L - 1, dtype=torch.long, device=tokens.device)
        prev_pred, counter = None, None
        rows_per_layer = []
        for j, block in enumerate(model.blocks):
            rows_per_layer.append(int(active.numel()))
            h = block(h)
            z = model.classify(j, h, rows)  # (n_active, C)
            if out_logits is None:
                out_logits = z.new_empty(B, z.shape[-1])
            if rule == "entropy":
                done = entropy(z) < value
            else:
                pred = z.argmax(-1)
                counter = torch.zeros_like(pred) if prev_pred is None else torch.where(pred == prev_pred,
                                                                                          counter + 1, 0)
                prev_pred = pred
                done = counter >= value
            if j == L - 1:
                done = torch.ones_like(done)
            out_logits[active[done]] = z[done]
            exit_layer[active[done]] = j
            keep = ~done
            if not bool(keep.any()):
                break
            h, rows, active = h[keep], rows[keep], active[keep]
            if rule == "patience":
                prev_pred, counter = prev_pred[keep], counter[keep]
    finally:
        model.train(was_training)
    if not return_stats:
        return out_logits, exit_layer
    layers_run = sum(rows_per_layer)
    stats = {"rows_per_layer": rows_per_layer + [0] * (L - len(rows_per_layer)), "layers_run": layers_run,
             "full": B * L, "average_layers": layers_run / B}
    return out_logits, exit_layer, stats


@torch.no_grad()
def early_exit_loop(model, tokens, *, rule="entropy", threshold=None, patience=None):
    """The oracle of :func:`early_exit_infer`: one example at a time (a batch of one). Same returns."""
    logits, exits = [], []
    for b in range(tokens.shape[0]):
        z, e = early_exit_infer(model, tokens[b:b + 1], rule=rule, threshold=threshold, patience=patience)
        logits.append(z)
        exits.append(e)
    return torch.cat(logits), torch.cat(exits)


@torch.no_grad()
def exit_tradeoff(per_layer_logits, labels, *, rule="entropy", values):
    """Accuracy vs compute as the threshold (or patience) moves, on precomputed per-layer logits.

    Returns a dict of lists, one entry per value: ``value``, ``average_layers`` (mean of exit_layer + 1, in
    layers, 1 … L) and ``accuracy`` — the curve a notebook plots."""
    where = "exit_tradeoff"
    _check_per_layer_logits(per_layer_logits, where)
    check_choice(rule, EXIT_RULES, "rule", where)
    labels = class_labels(labels).to(per_layer_logits.device)
    out = {"value": [], "average_layers": [], "accuracy": []}
    for v in values:
        kw = {"threshold": v} if rule == "entropy" else {"patience": v}
        e, z = apply_exit_rule(per_layer_logits, rule=rule, **kw)
        out["value"].append(v)
        out["average_layers"].append(float((e + 1).float().mean()))
        out["accuracy"].append(float((z.argmax(-1) == labels).float().mean()))
    return out


# --------------------------------------------------------------------------------------------------------------
# Adaptive Computation Time
# --------------------------------------------------------------------------------------------------------------


def _check_halt_probs(halt_probs, where):
    if not isinstance(halt_probs, torch.Tensor) or not halt_probs.is_floating_point():
        raise TypeError(f"{where}: halt_probs must be a floating torch.Tensor (steps, N), "
                        f"got {type(halt_probs).__name__}")
    if halt_probs.dim() != 2 or 0 in halt_probs.shape:
        raise ValueError(f"{where}: halt_probs must be a non-empty (steps, N) tensor, got shape "
                         f"{tuple(halt_probs.shape)}")
    if bool(torch.isnan(halt_probs).any()):
        raise ValueError(f"{where}: halt_probs contains NaN")
    lo, hi = float(halt_probs.detach().min()), float(halt_probs.detach().max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{where}: halt_probs must lie in [0, 1] (probabilities), got min {lo}, max {hi}")


def act_weights(halt_probs, threshold=0.99):
    """ACT's weights from halting probabilities, vectorised over positions (no Python loop over positions).

    ``halt_probs (steps, N)``: h_n of each position after step n. With ``c_n = h_1 + … + h_n`` the halting step is
    the first n with ``c_n ≥ threshold`` (threshold = 1 − ε), or the last step when none reaches it; the remainder
    is ``R = 1 − c_{N−1}``; the weights are ``h_n`` before N, ``R`` at N and 0 after (they sum to 1). Returns
    ``(weights (steps, N), n_updates (N,) int64 = N, 1-based, remainders (N,) = R)``; ponder cost = N + R.
    Differentiable in ``halt_probs`` (through h_n and R; N is a count).
    """
    where = "act_weights"
    _check_halt_probs(halt_probs, where)
    threshold = _check_act_threshold(threshold, where)
    S, N = halt_probs.shape
    cum = halt_probs.cumsum(dim=0)  # c_n
    reached = cum.detach() >= threshold
    reached[-1] = True  # the last step always halts: it takes the remainder
    halt_idx = _first_true(reached)  # (N,) 0-based halting step
    step = torch.arange(S, device=halt_probs.device).unsqueeze(1)  # (S, 1)
    before = step < halt_idx  # (S, N): still running after this step
    # R = 1 − Σ_{n < N} h_n
    remainders = 1.0 - (halt_probs * before).sum(dim=0)
    weights = torch.where(before, halt_probs, torch.where(step == halt_idx, remainders, 0.0))
    return weights, halt_idx + 1, remainders


def act_reference(halt_probs, threshold=0.99):
    """The step-by-step oracle of :func:`act_weights` (Python loops over positions and steps, float64 sums)."""
    where = "act_reference"
    _check_halt_probs(halt_probs, where)
    threshold = _check_act_threshold(threshold, where)
    S, N = halt_probs.shape
    p = halt_probs.detach().to(torch.float64).cpu().tolist()
    weights = torch.zeros(S, N, dtype=torch.float64)
    n_updates = torch.zeros(N, dtype=torch.long)
    remainders = torch.zeros(N, dtype=torch.float64)
    for i in range(N):
        total = 0.0
        for n in range(S):
            if total + p[n][i] >= threshold or n == S - 1:  # halts here: the remainder
                weights[n, i] = 1.0 - total
                n_updates[i], remainders[i] = n + 1, 1.0 - total
                break
            weights[n, i] = p[n][i]
            total += p[n][i]
    dt = halt_probs.dtype
    return weights.to(dt), n_updates, remainders.to(dt)


class ACTTransformer(nn.Module):
    """A Universal Transformer with Adaptive Computation Time (Graves 2016; Dehghani et al. 2019): one shared
    :class:`~effedu.model.Block` applied up to ``max_steps`` times.

    Step n (0-based): ``s_n = Block(s_{n−1} + S[n])`` with a learned step embedding S (the UT's "timestep"
    signal), then ``h_n = σ(w · s_n + b)`` per position (the halting unit; b starts at 1 as the UT's
    ``act_halting_bias_init``). A position halts when the cumulative sum *reaches* 1 − ε (≥, Graves Eq. 7);
    the UT's code tests ``>``, which differs only on exact ties. :func:`act_weights` turns the h_n into weights, the output state is
    ``Σ_n w_n s_n``, then the final LayerNorm and the LM head: ``forward(tokens) -> logits (B, T, vocab)``.

    Every position keeps being updated until all have halted (as the UT: a halted position's later states are
    still read by the others' attention, but carry no weight in its own output); the loop stops once every
    position has halted — the steps after that would all have weight 0. Kept after each forward:
    ``last_ponder (B, T)`` = N + R, ``last_n_updates (B, T)`` int64 = N, ``last_halt_probs (steps, B, T)``.

    The ponder cost ``ponder_weight · mean(N + R)`` is recorded as an auxiliary loss with
    :func:`effedu.model.add_aux_loss`: a training step adds ``model.aux_loss()`` (:func:`act_step` does;
    :func:`effedu.train.default_step` does not). Its gradient reaches the halting unit through R only.
    """

    def __init__(self, config: TransformerConfig, *, max_steps=8, threshold=0.99, ponder_weight=1e-2):
        super().__init__()
        where = "ACTTransformer"
        _check_config(config, where)
        check_positive_int(max_steps, "max_steps", where)
        self.threshold = _check_act_threshold(threshold, where)
        if isinstance(ponder_weight, bool) or not isinstance(ponder_weight, (int, float)) or not ponder_weight >= 0:
            raise ValueError(f"{where}: ponder_weight must be a number >= 0, got {ponder_weight!r}")
        self.config, self.max_steps, self.ponder_weight = config, max_steps, float(ponder_weight)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.step_emb = nn.Embedding(max_steps, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.block = Block(config, 0)
        self.halt = nn.Linear(config.d_model, 1)
        self.ln_f = nn.LayerNorm(config.d_model) if config.norm_kind == "pre" else nn.Identity()
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.apply(init_weights)
        nn.init.constant_(self.halt.bias, 1.0)
        _attach_aux_channel(self)
        self.last_ponder = self.last_n_updates = self.last_halt_probs = None

    def aux_loss(self):
        """The ponder loss recorded by the last forward (ponder_weight · mean ponder cost)."""
        return self.aux_channel.total(self.head.weight.device)

    def forward(self, tokens):
        B, T = check_tokens(tokens, self.config, type(self).__name__)
        self.aux_channel.clear()
        s = self.drop(self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device)))
        states, probs = [], []
        cum = torch.zeros(B, T, device=s.device, dtype=s.dtype)
        for n in range(self.max_steps):
            s = self.block(s + self.step_emb.weight[n])
            h = torch.sigmoid(self.halt(s)).squeeze(-1)  # (B, T)
            states.append(s)
            probs.append(h)
            cum = cum + h.detach()
            if bool((cum >= self.threshold).all()):
                break
        halt_probs = torch.stack(probs).reshape(len(probs), B * T)
        weights, n_updates, remainders = act_weights(halt_probs, self.threshold)
        weights = weights.view(len(probs), B, T, 1)
        out = (weights * torch.stack(states)).sum(dim=0)  # Σ_n w_n s_n
        ponder = (n_updates.to(remainders.dtype) + remainders).view(B, T)  # ρ = N + R
        self.last_ponder = ponder.detach()
        self.last_n_updates = n_updates.view(B, T)
        self.last_halt_probs = halt_probs.detach().view(len(probs), B, T)
        add_aux_loss(self, self.ponder_weight * ponder.mean())
        return self.head(self.ln_f(out))


def act_step(model, inputs, targets, optimizer, grad_clip=1.0):
    """A training step for :func:`effedu.train.train` (``step_fn=act_step``): LM loss + the model's auxiliary
    loss (ACT's ponder cost). Returns the total loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = lm_loss(model(inputs), targets) + model.aux_loss()
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------------------------
# Depth-adaptive per token
# --------------------------------------------------------------------------------------------------------------


class DepthAdaptiveTransformer(nn.Module):
    """Per-token depth (Elbayad et al. 2020; the confidence exit of CALM, Schuster et al. 2022): a tiny LM /
    tagger whose one output head (final LayerNorm + Linear) is shared by every layer.

    Training (:func:`depth_adaptive_loss`, :func:`train_depth_adaptive`) runs every layer and sums the per-layer
    LM losses (Elbayad's "aligned" training with uniform weights). At inference, after block j (0-based) each
    still-running token is scored by the shared head; it exits if its max softmax probability is ≥ ``threshold``.
    An exited token's state is **copied upward**: every later layer keeps its last state, so the tokens still
    running compute that position's keys and values (with each later layer's own projections) from the copied
    state, as the Depth-Adaptive Transformer does. Tokens that never pass the threshold use all L layers; a
    threshold > 1 gives the full model.

    ``forward(tokens, *, threshold=None, return_hidden=False) -> (logits (B, T, V), exit_layer (B, T) int64
    0-based)`` (+ the L + 1 hidden states). In training mode every layer runs for every token (exit_layer = L − 1).
    The saving is counted (token-layers), not realised: this dense implementation still runs each block on the
    whole sequence and keeps the exited rows' old state (``torch.where``); gathering the running tokens into a
    smaller batch is what a serving system would do.
    """

    def __init__(self, config: TransformerConfig, *, rule="confidence", threshold=0.9):
        super().__init__()
        where = "DepthAdaptiveTransformer"
        _check_config(config, where)
        self.rule = check_choice(rule, DEPTH_RULES, "rule", where)
        self.threshold = self._check_threshold(threshold)
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.apply(init_weights)
        _attach_aux_channel(self)
        self.last_exit_layer = None

    def aux_loss(self):
        """The auxiliary losses recorded during the last forward (0 when none), as ``Transformer.aux_loss``."""
        return self.aux_channel.total(self.head.weight.device)

    @staticmethod
    def _check_threshold(threshold):
        where = "DepthAdaptiveTransformer"
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"{where}: threshold must be a number (a max softmax probability), "
                            f"got {type(threshold).__name__}")
        if not threshold > 0:
            raise ValueError(f"{where}: threshold must be > 0 (a max softmax probability; > 1 never exits), "
                             f"got {threshold!r}")
        return float(threshold)

    @property
    def n_layers(self):
        return len(self.blocks)

    def embed(self, tokens):
        B, T = check_tokens(tokens, self.config, type(self).__name__)
        self.aux_channel.clear()
        return self.drop(self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device)))

    def logits(self, h):
        """The shared head: ``h (…, d)`` → logits ``(…, V)``."""
        return self.head(self.ln_f(h))

    def per_layer_logits(self, tokens):
        """Every layer on every token: logits ``(L, B, T, V)`` of the shared head after each block."""
        h = self.embed(tokens)
        out = []
        for block in self.blocks:
            h = block(h)
            out.append(self.logits(h))
        return torch.stack(out)

    def forward(self, tokens, *, threshold=None, return_hidden=False):
        threshold = self.threshold if threshold is None else self._check_threshold(threshold)
        h = self.embed(tokens)
        B, T = tokens.shape
        L = self.n_layers
        hidden = [h]
        exit_layer = torch.full((B, T), L - 1, dtype=torch.long, device=tokens.device)
        running = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        for j, block in enumerate(self.blocks):
            new = block(h)
            # exited tokens keep their state: copied upward (their keys/values above come from it)
            h = torch.where(running.unsqueeze(-1), new, h)
            hidden.append(h)
            if self.training or j == L - 1:
                continue
            with torch.no_grad():
                conf = torch.softmax(self.logits(h).float(), dim=-1).amax(dim=-1)  # (B, T)
            exits = running & (conf >= threshold)
            exit_layer[exits] = j
            running = running & ~exits
            if not bool(running.any()):
                hidden += [h] * (L - 1 - j)
                break
        self.last_exit_layer = exit_layer
        # an exited token's final state is its state at its exit layer: the shared head gives its exit logits
        logits = self.logits(h)
        return (logits, exit_layer, hidden) if return_hidden else (logits, exit_layer)


def depth_adaptive_loss(per_layer_logits, targets):
    """Σ_j lm_loss(z_j, targets) over the L layers (uniform weights, Elbayad et al.'s aligned training);
    ``per_layer_logits (L, B, T, V)``, ``targets (B, T)`` with ``IGNORE`` where nothing is scored."""
    if not isinstance(per_layer_logits, torch.Tensor) or per_layer_logits.dim() != 4:
        raise ValueError(f"depth_adaptive_loss: per_layer_logits must be (L, B, T, V), got "
                         f"{tuple(getattr(per_layer_logits, 'shape', ()))}")
    return sum(lm_loss(z, targets) for z in per_layer_logits)


def _depth_step(model, inputs, targets, optimizer, grad_clip=1.0):
    optimizer.zero_grad(set_to_none=True)
    loss = depth_adaptive_loss(model.per_layer_logits(inputs), targets) + model.aux_loss()
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


def train_depth_adaptive(model, batches, *, steps, lr=3e-3, **train_kw):
    """Train with :func:`depth_adaptive_loss` (+ ``model.aux_loss()``) through :func:`effedu.train.train`; returns the history (the
    loss is the *sum* over layers). ``val_batch`` is not supported: evaluate with ``model(tokens)``."""
    if not isinstance(model, DepthAdaptiveTransformer):
        raise TypeError(f"train_depth_adaptive: model must be a DepthAdaptiveTransformer, got {type(model).__name__}")
    if "val_batch" in train_kw or "step_fn" in train_kw:
        raise TypeError("train_depth_adaptive: val_batch and step_fn are not supported")
    return train(model, batches, steps=steps, lr=lr, step_fn=_depth_step, **train_kw)


@torch.no_grad()
def depth_tradeoff(model, batch, thresholds):
    """Token accuracy vs average layers per scored token as the confidence threshold moves (eval mode).
    Returns a dict of lists: ``threshold``, ``average_layers`` (1 … L), ``accuracy``."""
    inputs, targets = batch
    was_training = model.training
    model.eval()
    try:
        out = {"threshold": [], "average_layers": [], "accuracy": []}
        scored = targets != IGNORE
        for t in thresholds:
            logits, e = model(inputs, threshold=t)
            out["threshold"].append(t)
            out["average_layers"].append(float((e[scored] + 1).float().mean()))
            out["accuracy"].append(float((logits.argmax(-1)[scored] == targets[scored]).float().mean()))
    finally:
        model.train(was_training)
    return out


__all__ = [
    "EarlyExitClassifier", "class_labels", "early_exit_loss", "train_early_exit", "per_layer_accuracy", "entropy",
    "exit_by_entropy", "exit_by_patience", "patience_counters", "apply_exit_rule", "early_exit_infer",
    "early_exit_loop", "exit_tradeoff", "act_weights", "act_reference", "ACTTransformer", "act_step",
    "DepthAdaptiveTransformer", "depth_adaptive_loss", "train_depth_adaptive", "depth_tradeoff",
    "POOLS", "EXIT_RULES", "DEPTH_RULES",
]
