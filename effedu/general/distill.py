"""Knowledge distillation: a small *student* trained to imitate a large *teacher* (survey §3.5).

Hinton, Vinyals & Dean 2015, *Distilling the Knowledge in a Neural Network*: the teacher's output distribution
carries more than its argmax — which wrong answers are *almost* right ("dark knowledge"). Softening both
distributions with a temperature T exposes it, and the student is trained on a mix of the soft and the hard targets:

    p_T(z) = softmax(z / T)
    L_KD   = α · T² · mean_rows KL( p_T(t) ‖ p_T(s) )  +  (1 − α) · CE(s, y)

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)

**Why T².** ∂KL(p_T(t) ‖ p_T(s)) / ∂s = (p_T(s) − p_T(t)) / T, and for large T, p_T(z) ≈ 1/V + (z − z̄)/(V T), so the
gradient of the soft term scales as 1/T². Multiplying by T² keeps its weight relative to the hard term unchanged
when the temperature is changed (``soft_gradient_norm`` measures it).

**Students from teachers.** DistilBERT (Sanh et al. 2019) halves BERT by keeping every other layer and initialises
the student from the teacher's weights (``student_from_teacher``). TinyBERT (Jiao et al. 2020) also matches hidden
states through a learned projection (``hidden_state_loss``), MiniLM (Wang et al. 2020) the last layer's attention
distributions (``attention_map_loss``). sentence-transformers distils an embedding model by regressing the
teacher's sentence embedding with an MSE loss (Reimers & Gurevych 2020): ``embedding_distill``.

    python -m effedu.general.distill [--quick] [--out PATH]     # the chapter's sweeps → data/results/distillation.json

Everything here is written from tensor ops; ``F.kl_div`` and ``F.cross_entropy`` are the oracles in the tests.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import IGNORE, TransformerConfig
from ..train import train

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "results" / "distillation.json"
COMMAND = "python -m effedu.general.distill"
INTERMEDIATE_KINDS = ("hidden", "attention")

# --------------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------------


def _check_T(T, where):
    if isinstance(T, bool) or not isinstance(T, (int, float)):
        raise TypeError(f"{where}: T (the temperature) must be a number, got {type(T).__name__}")
    if not math.isfinite(T) or T <= 0:
        raise ValueError(f"{where}: T (the temperature) must be a finite number > 0, got {T}")
    return float(T)


def _check_alpha(alpha, where):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{where}: alpha must be a number in [0, 1], got {type(alpha).__name__}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"{where}: alpha must be in [0, 1] (the weight of the soft term), got {alpha}")
    return float(alpha)


def _check_logits(x, name, where):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor of logits (..., V), got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1 or x.numel() == 0:
        raise ValueError(f"{where}: {name} must be (..., V) with V ≥ 1 and at least one row, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x.detach()).all()):  # a NaN here would silently poison every gradient
        raise ValueError(f"{where}: {name} contain NaN or inf")
    # 16-bit softmaxes are not precise enough: compute in float32 (as effedu.model.lm_loss does)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --------------------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------------------


def soften(logits, T):
    """The softened distribution ``softmax(logits / T)`` over the last dimension (T = 1: the model's own)."""
    T = _check_T(T, "soften")
    logits = _check_logits(logits, "logits", "soften")
    # p_T(z)_v = exp(z_v / T) / Σ_u exp(z_u / T)
    return torch.softmax(logits / T, dim=-1)


def _kl_rows(log_p, log_q):
    """KL(p ‖ q) per row from log-probabilities: Σ_v p_v (log p_v − log q_v)        (rows of ``(N, V)``)"""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kd_loss(student_logits, teacher_logits, targets=None, *, T=2.0, alpha=0.5, ignore_index=IGNORE):
    """Hinton et al.'s distillation loss on rows of logits ``(..., V)``.

        α · T² · mean_rows KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, targets)

    ``targets`` ``(...)`` integer ids; rows whose target is ``ignore_index`` are left out of **both** terms.
    ``targets=None``: the T²-scaled soft term alone (``alpha`` unused). The teacher side is detached.
    """
    where = "kd_loss"
    T, alpha = _check_T(T, where), _check_alpha(alpha, where)
    s = _check_logits(student_logits, "student_logits", where)
    t = _check_logits(teacher_logits, "teacher_logits", where)
    if s.shape != t.shape:
        raise ValueError(f"{where}: student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} must have "
                         f"the same shape (..., V)")
    V = s.shape[-1]
    s, t = s.reshape(-1, V), t.detach().to(s.dtype).reshape(-1, V)  # (N, V): one row per scored position
    y = None
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise TypeError(f"{where}: targets must be an integer tensor of class ids (or None), got "
                            f"{targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__}")
        if targets.shape != student_logits.shape[:-1]:
            raise ValueError(f"{where}: targets must have shape {tuple(student_logits.shape[:-1])} (the logits "
                             f"without V), got {tuple(targets.shape)}")
        y = targets.reshape(-1).to(s.device)
        keep = y != ignore_index  # left out of both terms
        if not bool(keep.any()):
            raise ValueError(f"{where}: every target is ignore_index={ignore_index}: no row to score")
        s, t, y = s[keep], t[keep], y[keep]
        if bool(((y < 0) | (y >= V)).any()):
            raise ValueError(f"{where}: targets must lie in [0, V={V}) or equal ignore_index={ignore_index}")
    # soft term: T² · (1/N) Σ_rows KL(p_T(t) ‖ p_T(s))
    soft = _kl_rows(torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1)).mean() * T * T
    if y is None:
        return soft
    # hard term: CE(s, y) = −(1/N) Σ_rows log softmax(s)[y]
    hard = -torch.log_softmax(s, -1).gather(1, y[:, None]).mean()
    return alpha * soft + (1 - alpha) * hard


def soft_gradient_norm(student_logits, teacher_logits, T):
    """‖∂/∂s mean_rows KL(p_T(t) ‖ p_T(s))‖ — the soft term *without* its T² factor. Falls as 1/T² for large T."""
    s = _check_logits(student_logits, "student_logits", "soft_gradient_norm").detach().double().requires_grad_()
    loss = kd_loss(s, teacher_logits.detach().double(), T=T) / (_check_T(T, "soft_gradient_norm") ** 2)
    (grad,) = torch.autograd.grad(loss, s)
    return float(grad.norm())


# --------------------------------------------------------------------------------------------------------------
# a student made of the teacher's layers
# --------------------------------------------------------------------------------------------------------------


def _check_layer_list(layers, n, where):
    if isinstance(layers, int) or not isinstance(layers, (list, tuple, range)):
        raise TypeError(f"{where}: layers must be a list of 0-based layer indices, got {type(layers).__name__}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"{where}: layers must name at least one layer")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{where}: layers must hold ints, got {i!r}")
        if not 0 <= i < n:
            raise ValueError(f"{where}: layer index {i} does not exist: the teacher has {n} layers (0..{n - 1})")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{where}: layers must be strictly increasing (the teacher's order), got {layers}")
    return layers


def student_from_teacher(teacher, layers):
    """A deep copy of ``teacher`` that keeps only ``layers`` (0-based, increasing), config ``n_layers`` updated.

    DistilBERT's initialisation is ``layers=range(0, L, 2)``. Works for any model with ``blocks`` (an
    ``nn.ModuleList``) and a ``TransformerConfig`` in ``config``: ``effedu.model.Transformer`` and
    ``effedu.pretrained.BertEncoder``. Embeddings, final norm and head are copied as they are.
    """
    where = "student_from_teacher"
    if not isinstance(teacher, nn.Module) or not isinstance(getattr(teacher, "blocks", None), nn.ModuleList) \
            or not isinstance(getattr(teacher, "config", None), TransformerConfig):
        raise TypeError(f"{where}: teacher must be a Transformer or a BertEncoder (blocks + a TransformerConfig), "
                        f"got {type(teacher).__name__}")
    layers = _check_layer_list(layers, len(teacher.blocks), where)
    student = copy.deepcopy(teacher)
    student.blocks = nn.ModuleList([student.blocks[i] for i in layers])
    cfg = teacher.config
    changes = {"n_layers": len(layers)}
    for name in ("n_heads", "attention_kwargs"):  # per-layer fields keep the kept layers' entries
        value = getattr(cfg, name)
        if isinstance(value, (list, tuple)):
            changes[name] = [value[i] for i in layers]
    student.config = cfg.replace(**changes)
    return student


# --------------------------------------------------------------------------------------------------------------
# intermediate losses (TinyBERT, MiniLM)
# --------------------------------------------------------------------------------------------------------------


def _pairs(layer_map, n_s, n_t, where):
    pairs = list(layer_map.items()) if isinstance(layer_map, dict) else layer_map
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise TypeError(f"{where}: layer_map must be a non-empty dict {{student layer: teacher layer}} or a list of "
                        f"pairs, got {layer_map!r}")
    out = []
    for p in pairs:
        if not isinstance(p, (list, tuple)) or len(p) != 2 or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                       for i in p):
            raise TypeError(f"{where}: layer_map entries must be (student index, teacher index) ints, got {p!r}")
        i, j = p
        if not (0 <= i < n_s and 0 <= j < n_t):
            raise ValueError(f"{where}: layer_map pair ({i}, {j}) out of range: the student has {n_s} entries, "
                             f"the teacher {n_t}")
        out.append((i, j))
    return out


def hidden_state_loss(student_hidden, teacher_hidden, layer_map, proj=None):
    """TinyBERT's hidden-state loss: mean over the mapped pairs of MSE(proj(h_s[i]), h_t[j]), teacher detached.

    ``student_hidden`` / ``teacher_hidden``: lists of ``(B, T, d)`` (``return_hidden=True``: entry 0 is the
    embedding); ``layer_map`` ``{student index: teacher index}``; ``proj`` a module (or callable) mapping the
    student's width to the teacher's (TinyBERT's learned W_h), None when both have the same width.
    """
    where = "hidden_state_loss"
    pairs = _pairs(layer_map, len(student_hidden), len(teacher_hidden), where)
    total = 0.0
    for i, j in pairs:
        hs, ht = student_hidden[i], teacher_hidden[j].detach()
        if proj is not None:
            hs = proj(hs)
        if hs.shape != ht.shape:
            raise ValueError(f"{where}: student hidden {i} {tuple(hs.shape)} and teacher hidden {j} "
                             f"{tuple(ht.shape)} differ (give proj= to map the student's width)")
        # MSE(h_s W_h, h_t) = mean (h_s W_h − h_t)²
        total = total + ((hs - ht) ** 2).mean()
    return total / len(pairs)


def attention_map_loss(student_attn, teacher_attn, layer_map):
    """MiniLM / TinyBERT attention transfer: mean over heads, queries and mapped layers of KL(a_t ‖ a_s) per row.

    ``student_attn`` / ``teacher_attn``: lists of ``(B, H, T, S)`` attention weights (``return_attentions=True``),
    the same head count on both sides. Masked keys (weight 0 in the teacher) contribute 0.
    """
    where = "attention_map_loss"
    pairs = _pairs(layer_map, len(student_attn), len(teacher_attn), where)
    total = 0.0
    for i, j in pairs:
        a_s, a_t = student_attn[i], teacher_attn[j].detach()
        if a_s.shape != a_t.shape:
            raise ValueError(f"{where}: student attention {i} {tuple(a_s.shape)} and teacher attention {j} "
                             f"{tuple(a_t.shape)} differ (same heads and lengths needed)")
        # KL(a_t ‖ a_s) = Σ_j a_t,j (log a_t,j − log a_s,j), with 0 · log 0 = 0
        tiny = torch.finfo(a_s.dtype).tiny
        kl = torch.where(a_t > 0, a_t * (a_t.clamp_min(tiny).log() - a_s.clamp_min(tiny).log()),
                         torch.zeros((), dtype=a_s.dtype, device=a_s.device)).sum(-1)
        total = total + kl.mean()
    return total / len(pairs)


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------


def _check_intermediate(intermediate, where):
    if intermediate is None:
        return {}
    if not isinstance(intermediate, dict) or not set(intermediate) <= set(INTERMEDIATE_KINDS) or not intermediate:
        raise ValueError(f"{where}: intermediate must be None or a dict with keys among {INTERMEDIATE_KINDS} "
                         f"(each a layer_map {{student: teacher}}), got {intermediate!r}")
    return intermediate


def distill_step(teacher, *, T=2.0, alpha=0.5, intermediate=None, beta=1.0, proj=None, grad_clip=1.0):
    """A ``step_fn(model, inputs, targets, optimizer) -> loss`` for ``effedu.train.train``: the KD loss of the
    student (``model``) against the frozen ``teacher``, plus ``beta`` × the intermediate losses."""
    where = "distill_step"
    T, alpha = _check_T(T, where), _check_alpha(alpha, where)
    intermediate = _check_intermediate(intermediate, where)
    want_attn, want_hidden = "attention" in intermediate, "hidden" in intermediate
    kw = {"return_attentions": want_attn, "return_hidden": want_hidden}

    def unpack(out):
        out = out if isinstance(out, tuple) else (out,)
        logits, rest = out[0], list(out[1:])
        attn = rest.pop(0) if want_attn else None
        hidden = rest.pop(0) if want_hidden else None
        return logits, attn, hidden

    def step(model, inputs, targets, optimizer):
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_logits, t_attn, t_hidden = unpack(teacher(inputs, **kw))
        s_logits, s_attn, s_hidden = unpack(model(inputs, **kw))
        loss = kd_loss(s_logits, t_logits, targets, T=T, alpha=alpha)
        if want_hidden:
            loss = loss + beta * hidden_state_loss(s_hidden, t_hidden, intermediate["hidden"], proj)
        if want_attn:
            loss = loss + beta * attention_map_loss(s_attn, t_attn, intermediate["attention"])
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return float(loss.detach())

    return step


def distill(student, teacher, batches, *, steps, T=2.0, alpha=0.5, lr=3e-3, seed=0, intermediate=None, beta=1.0,
            proj=None, val_batch=None, eval_every=None, progress=False, **train_kwargs):
    """Train ``student`` on ``batches`` against the frozen ``teacher`` with :func:`kd_loss` (+ intermediate losses),
    through ``effedu.train.train(step_fn=...)``; returns its history (loss, val_loss, val_acc, ...).

    ``intermediate``: None, or ``{"hidden": layer_map, "attention": layer_map}`` (either key) for TinyBERT /
    MiniLM-style losses, weighted by ``beta``; ``proj`` maps the student's hidden width to the teacher's.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError(f"distill: student and teacher must be nn.Modules, got {type(student).__name__} and "
                        f"{type(teacher).__name__}")
    if student is teacher:
        raise ValueError("distill: student and teacher are the same module (make one with student_from_teacher)")
    step_fn = distill_step(teacher, T=T, alpha=alpha, intermediate=intermediate, beta=beta, proj=proj,
                           grad_clip=train_kwargs.pop("grad_clip", 1.0))
    was_training = teacher.training
    teacher.eval()
    try:
        return train(student, batches, steps=steps, lr=lr, seed=seed, step_fn=step_fn, val_batch=val_batch,
                     eval_every=eval_every, progress=progress, desc="distilling", **train_kwargs)
    finally:
        teacher.train(was_training)


# --------------------------------------------------------------------------------------------------------------
# sentence embeddings: a MiniLM student (sentence-transformers' recipe: regress the teacher's embedding)
# --------------------------------------------------------------------------------------------------------------


def pooled_embedding(encoder, batch, *, normalize=False, return_hidden=False):
    """Mean-pooled last hidden state ``(B, d)`` of a BertEncoder on a tokenised ``batch`` (not L2-normalised unless
    asked); ``return_hidden=True`` also returns the L + 1 hidden states (embedding output, then each layer)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if return_hidden:  # BertEncoder.forward has no return_hidden: the same computation, one block at a time
        encoder._check_inputs(ids, mask, None)
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = encoder.drop(encoder.emb_ln(encoder.tok_emb(ids) + encoder.pos_emb(pos)
                                        + encoder.type_emb(torch.zeros_like(ids))))
        m = None if bool(mask.bool().all()) else mask.bool()[:, None, None, :]
        hidden = [x]
        for block in encoder.blocks:
            x = block(x, mask=m)
            hidden.append(x)
    else:
        x = encoder(ids, attention_mask=mask)
    w = mask.to(x.dtype).unsqueeze(-1)
    # e = Σ_t m_t h_t / Σ_t m_t
    e = (x * w).sum(1) / w.sum(1).clamp_min(1e-9)
    e = F.normalize(e, dim=-1) if normalize else e
    return (e, hidden) if return_hidden else e


def training_sentences(n_seeds=4, per_topic=100, *, exclude=None):
    """Sentences the project generates (seeds 1..n_seeds; the held-out set is seed 0), minus any in ``exclude``."""
    from ..data.sentences import generate_sentences, load_sentences

    held_out = set(load_sentences()[0] if exclude is None else exclude)
    seen, out = set(), []
    for seed in range(1, n_seeds + 1):
        for _, s in generate_sentences(per_topic, seed):
            if s not in held_out and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def embedding_distill(student, teacher, sentences, *, steps=200, batch_size=32, lr=1e-4, loss="mse",
                      hidden_map=None, beta=1.0, seed=0, train_word_embeddings=False):
    """Train a BertEncoder ``student`` to reproduce ``teacher``'s mean-pooled sentence embeddings.

    ``loss="mse"``: MSE between the pooled embeddings (sentence-transformers' ``MSELoss`` distillation);
    ``"cosine"``: 1 − cos. ``hidden_map`` ``{student hidden index: teacher hidden index}`` adds TinyBERT's hidden
    state loss (index 0 = embedding output). ``train_word_embeddings=False`` freezes the 30 522 × 384 token table
    (half of MiniLM's parameters; its rows barely move in a short run, and skipping its update halves the step's
    optimizer work). Returns the history ``{"loss": [...]}``; the student ends in eval mode.
    """
    where = "embedding_distill"
    if loss not in ("mse", "cosine"):
        raise ValueError(f"{where}: loss must be 'mse' or 'cosine', got {loss!r}")
    if not isinstance(sentences, (list, tuple)) or len(sentences) < batch_size or \
            not all(isinstance(s, str) for s in sentences):
        raise ValueError(f"{where}: sentences must be a list of at least batch_size={batch_size} strings")
    tok = teacher.tokenizer or student.tokenizer
    g = torch.Generator().manual_seed(seed)
    was_trainable = student.tok_emb.weight.requires_grad
    params = [p for name, p in student.named_parameters() if train_word_embeddings or name != "tok_emb.weight"]
    student.tok_emb.weight.requires_grad_(train_word_embeddings)
    try:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        teacher.eval()
        history = {"loss": []}
        for step in range(steps):
            idx = torch.randint(0, len(sentences), (batch_size,), generator=g).tolist()
            batch = tok([sentences[i] for i in idx], max_length=128, truncation=True)
            with torch.no_grad():
                t_emb, t_hidden = pooled_embedding(teacher, batch, return_hidden=True)
            student.train()
            s_emb, s_hidden = pooled_embedding(student, batch, return_hidden=True)
            if loss == "mse":
                # sentence-transformers: MSE(student(x), teacher(x))
                value = ((s_emb - t_emb) ** 2).mean()
            else:
                value = (1 - F.cosine_similarity(s_emb, t_emb, dim=-1)).mean()
            if hidden_map:
                value = value + beta * hidden_state_loss(s_hidden, t_hidden, hidden_map)
            opt.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history["loss"].append(float(value.detach()))
    finally:  # the freeze lasts for this call only
        student.tok_emb.weight.requires_grad_(was_trainable)
    student.eval()
    return history


# --------------------------------------------------------------------------------------------------------------
# the chapter's experiments (precomputed: python -m effedu.general.distill)
# --------------------------------------------------------------------------------------------------------------

TINY = {"task": "sort", "seq_len": 24, "d_model": 64, "n_heads": 4, "d_ff": 128, "teacher_layers": 6,
        "batch": 32, "transfer_set": 64, "T": 2.0, "alpha": 0.9, "lr": 3e-3}


def tiny_config(layers, task=None, seq_len=None):
    from ..data import task_vocab_size

    task = task or TINY["task"]
    return TransformerConfig(vocab_size=task_vocab_size(task), d_model=TINY["d_model"], n_heads=TINY["n_heads"],
                             n_layers=layers, d_ff=TINY["d_ff"], max_len=seq_len or TINY["seq_len"])


def transfer_batches(transfer, batch_size, seed=0):
    """``batch_fn(step)``: ``batch_size`` rows drawn (seeded by step) from a fixed, small transfer set."""
    n = transfer.inputs.shape[0]

    def batch_fn(step):
        idx = torch.randint(0, n, (batch_size,), generator=torch.Generator().manual_seed(seed * 100_003 + step))
        return transfer.inputs[idx], transfer.targets[idx]

    return batch_fn


def alternate_layers(n_teacher, n_student):
    """Every k-th teacher layer, k = n_teacher // n_student (DistilBERT: every other one; 6 → 2 gives [0, 3])."""
    k = max(1, n_teacher // n_student)
    return [i * k for i in range(n_student)]


class CachedTeacher(nn.Module):
    """A frozen teacher's logits computed once on a fixed transfer set and looked up by input row.

    The teacher never changes during distillation (eval mode, no dropout), so its outputs on the transfer set are the
    same numbers at every step: computing them once makes a KD step cost what a hard-label step costs."""

    def __init__(self, teacher, inputs, batch_size=256):
        super().__init__()
        teacher.eval()
        with torch.no_grad():
            logits = torch.cat([teacher(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
        self.table = {tuple(row.tolist()): out for row, out in zip(inputs, logits)}

    def forward(self, inputs, **kwargs):
        if kwargs.get("return_attentions") or kwargs.get("return_hidden"):
            raise ValueError("CachedTeacher: only logits are cached (no intermediate losses)")
        try:
            return torch.stack([self.table[tuple(row.tolist())] for row in inputs])
        except KeyError:
            raise ValueError("CachedTeacher: an input row is not in the transfer set it was built on") from None


def run_tiny(*, teacher_steps, student_steps, seeds, depths, n_val=512, log=print):
    """Experiment 1: students of a 6-layer teacher on a synthetic task, with and without KD, from scratch."""
    from ..data import make_task
    from ..train import evaluate

    c = TINY
    val = make_task(c["task"], n_val, c["seq_len"], seed=999_999)
    torch.manual_seed(0)
    from ..model import Transformer

    teacher = Transformer(tiny_config(c["teacher_layers"]))
    train(teacher, lambda s: make_task(c["task"], c["batch"], c["seq_len"], seed=s), steps=teacher_steps,
          lr=c["lr"], progress=False)
    t_loss, t_acc = evaluate(teacher, val)
    log(f"teacher ({c['teacher_layers']} layers): val acc {t_acc:.3f}")
    transfer = make_task(c["task"], c["transfer_set"], c["seq_len"], seed=123_456)
    cached = CachedTeacher(teacher, transfer.inputs)
    eval_every = max(1, student_steps // 10)

    def student(kind, depth, seed):
        if kind == "scratch":
            torch.manual_seed(1000 + seed)
            return Transformer(tiny_config(depth))
        return student_from_teacher(teacher, alternate_layers(c["teacher_layers"], depth))

    def run(kind, depth, seed):
        m = student(kind, depth, seed)
        batches = transfer_batches(transfer, c["batch"], seed)
        if kind == "kd":
            h = distill(m, cached, batches, steps=student_steps, T=c["T"], alpha=c["alpha"], lr=c["lr"], seed=seed,
                        val_batch=val, eval_every=eval_every)
        else:
            h = train(m, batches, steps=student_steps, lr=c["lr"], seed=seed, val_batch=val, eval_every=eval_every,
                      progress=False)
        return {"val_step": h["val_step"], "val_acc": h["val_acc"], "val_loss": h["val_loss"]}

    kinds = ("scratch", "no_kd", "kd")
    students = {k: [] for k in kinds}
    for seed in seeds:
        for k in kinds:
            students[k].append(run(k, 2, seed))
            log(f"2-layer student, {k}, seed {seed}: val acc {students[k][-1]['val_acc'][-1]:.3f}")
    depth_rows = []
    for depth in depths:
        row = {"depth": depth, "layers": alternate_layers(c["teacher_layers"], depth),
               "params": sum(p.numel() for p in Transformer(tiny_config(depth)).parameters())}
        for k in kinds:
            accs = [students[k][i]["val_acc"][-1] for i in range(len(seeds))] if depth == 2 else \
                [run(k, depth, seeds[0])["val_acc"][-1]]
            row[k] = sum(accs) / len(accs)
        log(f"depth {depth}: " + ", ".join(f"{k} {row[k]:.3f}" for k in kinds))
        depth_rows.append(row)
    return {"config": dict(c), "teacher_steps": teacher_steps, "student_steps": student_steps, "seeds": list(seeds),
            "teacher": {"val_acc": t_acc, "val_loss": t_loss,
                        "params": sum(p.numel() for p in teacher.parameters())},
            "students": students, "depth": depth_rows}


def minilm_student(teacher, layers):
    """A BertEncoder student initialised from ``layers`` of MiniLM (shares the tokenizer)."""
    return student_from_teacher(teacher, layers).eval()


def run_minilm(*, steps, layer_sets, n_seeds, batch_size=16, lr=2e-4, held_out_every=1, n_probe=32, repeat=5,
               log=print):
    """Experiment 2: MiniLM → 2–3-layer effedu students, before/after embedding distillation, held-out fidelity."""
    from ..data.sentences import load_sentences
    from ..measure import count_parameters, parameter_bytes, time_it
    from ..pretrained import fidelity, load_minilm

    teacher, tok = load_minilm()
    held_out = load_sentences()[0]
    train_set = training_sentences(n_seeds, exclude=held_out)
    held_out = held_out[::held_out_every]  # --quick: a subset
    ref = teacher.embed(held_out)
    probe = tok(held_out[:n_probe], max_length=128, truncation=True)
    t_teacher = time_it(lambda: teacher(probe["input_ids"], attention_mask=probe["attention_mask"]), warmup=1,
                        repeat=repeat)
    rows = []
    for layers in layer_sets:
        s = minilm_student(teacher, layers)
        before = fidelity(ref, s, held_out)
        t0 = time.perf_counter()
        hist = embedding_distill(s, teacher, train_set, steps=steps, batch_size=batch_size, lr=lr)
        seconds = time.perf_counter() - t0
        after = fidelity(ref, s, held_out)
        t_s = time_it(lambda: s(probe["input_ids"], attention_mask=probe["attention_mask"]), warmup=1, repeat=repeat)
        rows.append({"layers": list(layers), "params": count_parameters(s), "mb": parameter_bytes(s) / 1e6,
                     "before": before, "after": after, "time_ratio": t_s / t_teacher, "train_seconds": seconds,
                     "loss": hist["loss"][:: max(1, steps // 50)]})
        log(f"MiniLM layers {[i + 1 for i in layers]}: cosine {before['cosine']:.3f} → {after['cosine']:.3f}, "
            f"top5 {before['top5']:.3f} → {after['top5']:.3f}, time ×{t_s / t_teacher:.2f}")
    return {"teacher": {"layers": list(range(teacher.config.n_layers)), "params": count_parameters(teacher),
                        "mb": parameter_bytes(teacher) / 1e6},
            "steps": steps, "batch_size": batch_size, "lr": lr, "train_sentences": len(train_set), "held_out": len(held_out), "students": rows}


def run_all(quick=False, log=print):
    import effedu

    torch.manual_seed(0)
    if quick:
        tiny = run_tiny(teacher_steps=10, student_steps=5, seeds=(0,), depths=(1, 2), n_val=64, log=log)
        mini = run_minilm(steps=2, layer_sets=([0, 5],), n_seeds=1, batch_size=4, held_out_every=10, n_probe=8,
                          repeat=1, log=log)
    else:
        tiny = run_tiny(teacher_steps=300, student_steps=200, seeds=(0, 1, 2), depths=(1, 2, 3), log=log)
        mini = run_minilm(steps=100, layer_sets=([0, 5], [0, 2, 4]), n_seeds=4, log=log)
    return {"command": COMMAND + (" --quick" if quick else ""), "quick": quick,
            "env": effedu.env_report(print_report=False), "tiny": tiny, "minilm": mini}


def main(argv=None):
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write the JSON (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = run_all(quick=args.quick)
    results["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.out} in {results['seconds']:.0f} s")
    return results


__all__ = ["kd_loss", "soften", "soft_gradient_norm", "student_from_teacher", "hidden_state_loss",
           "attention_map_loss", "distill_step", "distill", "pooled_embedding", "training_sentences",
           "embedding_distill", "CachedTeacher", "alternate_layers", "transfer_batches", "run_tiny", "run_minilm", "run_all", "main",
           "DEFAULT_OUT", "TINY"]

if __name__ == "__main__":  # pragma: no cover
    main()
