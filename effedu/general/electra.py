"""ELECTRA: pre-training by replaced-token detection (Clark et al. 2020; survey §3.9).

A masked language model (BERT, Devlin et al. 2019) learns from the ~15 % of positions it masks: the other 85 % of
every sequence cost a forward and a backward pass and teach nothing. ELECTRA turns pre-training into a task
defined on *every* position:

* a small **generator** G (an MLM whose hidden size is a fraction of the discriminator's) fills the masked
  positions with samples from its own distribution, ``x̂_t ~ p_G(· | x_masked)``;
* the **discriminator** D reads the corrupted text ``x_corrupt`` and says, for each position, whether the token
  is the original or a replacement: ``D(x_corrupt, t) = sigmoid(w · h_D(x_corrupt)_t)``.

    L_MLM(x, θ_G)  = E[ Σ_{t ∈ m} −log p_G(x_t | x_masked) ]
    L_Disc(x, θ_D) = E[ Σ_{t=1..n} −1(x_corrupt_t = x_t) log D(x_corrupt, t) − 1(x_corrupt_t ≠ x_t) log(1 − D(x_corrupt, t)) ]
    min_{θ_G, θ_D}  Σ_x  L_MLM(x, θ_G) + λ · L_Disc(x, θ_D),          λ = 50                       (Clark et al., eq. 1)

The label of a position is "replaced" only if the sampled token *differs* from the original: a generator that
guesses right produced a real token (:func:`rtd_labels`). Sampling is not differentiable, and ELECTRA does not
back-propagate the discriminator loss through it: the generator learns from its MLM loss alone, and the
discriminator's loss reaches it only through the embeddings the two share (token and position tables; the
generator reads them through a projection when its width differs, and its output layer is tied to the token table,
as in the paper's "smaller generators" setup). The masking is BERT's (:func:`mask_tokens`: 15 % of positions; of
those 80 % become ``[MASK]``, 10 % a random token, 10 % stay) for the MLM baseline; ELECTRA's generator input masks
its positions with ``[MASK]`` only (``REPLACE(x, m, [MASK])`` in the paper).

Compute is counted with :func:`effedu.measure.training_flops` (≈ 3 × the forward: the backward costs two) for each
Transformer body, plus the heads by formula (:func:`pretraining_flops`). The MLM heads (the baseline's and the
generator's) run on the masked positions only — the positions they are scored on, as BERT's and ELECTRA's code
gather them — while the discriminator's head runs on every position. Quality is measured the same way for both
objectives: a linear probe (:func:`linear_probe`) on frozen, mean-pooled features of sentences whose label
(tense, or sentence kind) comes from the corpus grammar (``effedu.data.corpus.generate_labelled_sentences``).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import measure
from .._checks import check_int, check_positive_int, check_seed, check_tokens
from ..model import IGNORE, Transformer, TransformerConfig, gelu

# --------------------------------------------------------------------------------------------------------------
# masking and labels
# --------------------------------------------------------------------------------------------------------------


def _check_rate(value, name, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{where}: {name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _check_lam(lam, where):
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{where}: lam (λ, the discriminator loss weight) must be a finite number ≥ 0, got {lam!r}")
    return float(lam)


def _check_split(split, where):
    if (not isinstance(split, (tuple, list)) or len(split) != 3
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0 for s in split)
            or abs(sum(split) - 1) > 1e-9):
        raise ValueError(f"{where}: split must be three fractions (mask, random, keep) ≥ 0 that sum to 1, "
                         f"got {split!r}")
    return tuple(float(s) for s in split)


def mask_tokens(tokens, *, mask_rate=0.15, mask_id, vocab_size, generator=None, special=None,
                split=(0.8, 0.1, 0.1)):
    """BERT's masking (Devlin et al. 2019, §3.1): choose positions, then corrupt them 80/10/10.

    Each position of ``tokens (B, T)`` is chosen independently with probability ``mask_rate`` (at least one per
    sequence: a row with none gets one chosen uniformly); ids in ``special`` are never chosen. A chosen position
    becomes ``mask_id`` with probability ``split[0]`` (0.8), a token drawn uniformly from ``[0, vocab_size)``
    without ``mask_id`` with ``split[1]`` (0.1; it may equal the original), and stays itself with ``split[2]``
    (0.1). Returns ``(inputs, targets, masked)``: ``targets`` = the original token at chosen positions, ``IGNORE``
    (−100) elsewhere; ``masked`` (B, T) bool. All draws come from ``generator`` (the global RNG when None).
    """
    where = "mask_tokens"
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
        raise TypeError(f"{where}: tokens must be an int64 tensor (B, T), got "
                        f"{type(tokens).__name__ if not isinstance(tokens, torch.Tensor) else (tokens.dtype, tuple(tokens.shape))}")
    if tokens.numel() == 0:
        raise ValueError(f"{where}: tokens must not be empty, got shape {tuple(tokens.shape)}")
    mask_rate = _check_rate(mask_rate, "mask_rate", where)
    check_positive_int(vocab_size, "vocab_size", where)
    check_int(mask_id, "mask_id", where, minimum=0)
    split = _check_split(split, where)
    B, T = tokens.shape
    dev = tokens.device
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    for s in (special or ()):
        eligible &= tokens != int(s)
    if not bool(eligible.any(dim=1).all()):
        raise ValueError(f"{where}: every sequence needs a position that is not special (special={special!r})")
    u = torch.rand(B, T, generator=generator, device=dev)
    masked = (u < mask_rate) & eligible
    # at least one position per sequence: the eligible position with the smallest draw
    empty = ~masked.any(dim=1)
    if bool(empty.any()):
        first = u.masked_fill(~eligible, 2.0).argmin(dim=1)  # (B,)
        masked[empty, first[empty]] = True
    # which corruption: r < p_mask → [MASK]; p_mask ≤ r < p_mask + p_random → random token; else keep
    r = torch.rand(B, T, generator=generator, device=dev)
    to_mask = masked & (r < split[0])
    to_random = masked & (r >= split[0]) & (r < split[0] + split[1])
    n_real = vocab_size - 1 if mask_id < vocab_size else vocab_size
    rand = torch.randint(0, n_real, (B, T), generator=generator, device=dev, dtype=tokens.dtype)
    if mask_id < vocab_size:
        rand = rand + (rand >= mask_id).to(rand.dtype)  # skip the [MASK] id
    inputs = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(to_random, rand, inputs)
    targets = torch.where(masked, tokens, torch.full_like(tokens, IGNORE))
    return inputs, targets, masked


def rtd_labels(original, sampled, masked):
    """Replaced-token-detection labels: ``masked AND sampled ≠ original`` (bool, the shape of ``original``).

    A position the generator filled with the original token counts as *real* (Clark et al. §2: "if the generator
    happens to generate the correct token, that token is considered 'real' instead of 'fake'")."""
    where = "rtd_labels"
    for name, t in (("original", original), ("sampled", sampled), ("masked", masked)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if sampled.shape != original.shape or masked.shape != original.shape:
        raise ValueError(f"{where}: original, sampled and masked must have one shape, got {tuple(original.shape)}, "
                         f"{tuple(sampled.shape)}, {tuple(masked.shape)}")
    if masked.dtype != torch.bool:
        raise TypeError(f"{where}: masked must be a bool tensor, got {masked.dtype}")
    return masked & (sampled != original)


# --------------------------------------------------------------------------------------------------------------
# the models
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ElectraConfig:
    """Sizes of the discriminator (and of the MLM baseline, the same encoder), the generator and the objective.

    ``vocab_size`` counts the ``[MASK]`` token (``mask_id``, default the last id). The generator has the
    discriminator's depth and ``gen_fraction`` of its width (d_model, heads and d_ff; Clark et al. find ¼–½ best).
    """

    vocab_size: int = 68
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    max_len: int = 64
    gen_fraction: float = 0.25
    lam: float = 50.0
    mask_rate: float = 0.15
    mask_id: int = -1  # −1: vocab_size − 1
    grad_clip: float = 1.0
    init: str = "width"  # "width": N(0, 1/d_in) weights, N(0, 1) tables (width_scaled_init); "gpt2": N(0, 0.02)

    def __post_init__(self):
        where = "ElectraConfig"
        if self.init not in ("width", "gpt2"):
            raise ValueError(f"{where}: init must be 'width' or 'gpt2', got {self.init!r}")
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            check_positive_int(getattr(self, name), name, where)
        if isinstance(self.gen_fraction, bool) or not isinstance(self.gen_fraction, (int, float)) \
                or not 0 < self.gen_fraction <= 1:
            raise ValueError(f"{where}: gen_fraction must be a number in (0, 1], got {self.gen_fraction!r}")
        _check_lam(self.lam, where)
        _check_rate(self.mask_rate, "mask_rate", where)
        if self.mask_id == -1:
            self.mask_id = self.vocab_size - 1
        check_int(self.mask_id, "mask_id", where, minimum=0)
        if self.mask_id >= self.vocab_size:
            raise ValueError(f"{where}: mask_id must be < vocab_size={self.vocab_size}, got {self.mask_id}")
        self.generator_config()  # a width the heads divide, or a clear error now

    def encoder_config(self):
        """The discriminator's (and the MLM baseline's) ``TransformerConfig``: a pre-LN encoder."""
        return TransformerConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads,
                                 n_layers=self.n_layers, d_ff=self.d_ff, max_len=self.max_len, causal=False)

    def generator_config(self):
        """The generator's: ``gen_fraction`` of the width, heads and d_ff; same depth."""
        d = max(1, round(self.d_model * self.gen_fraction))
        h = max(1, round(self.n_heads * self.gen_fraction))
        while d % h:
            h -= 1
        return TransformerConfig(vocab_size=self.vocab_size, d_model=d, n_heads=h, n_layers=self.n_layers,
                                 d_ff=max(1, round(self.d_ff * self.gen_fraction)), max_len=self.max_len,
                                 causal=False)


class MLMHead(nn.Module):
    """BERT's MLM head: ``logits = LN(GELU(h W + b)) Eᵀ + b_out`` with ``E`` the (shared) token table (tied)."""

    def __init__(self, d_in, embedding: nn.Embedding):
        super().__init__()
        d = embedding.embedding_dim
        self.dense = nn.Linear(d_in, d)
        self.norm = nn.LayerNorm(d)
        self.embedding = embedding  # tied: the table is the token embedding's own Parameter
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))

    def forward(self, h):
        # (N, d_in) → (N, d) → (N, V)
        return F.linear(self.norm(gelu(self.dense(h))), self.embedding.weight, self.bias)


class Generator(Transformer):
    """An encoder that reads the discriminator's embeddings: ``x₀ = P_proj(E[x] + P[pos])`` (width d → d_G).

    Its own token/position tables are replaced by the shared ones and ``forward`` returns the last hidden state
    (its head is the identity: :class:`Electra` applies the tied :class:`MLMHead` on the masked positions)."""

    def __init__(self, config: TransformerConfig, tok_emb: nn.Embedding, pos_emb: nn.Embedding):
        super().__init__(config)
        self.tok_emb, self.pos_emb = tok_emb, pos_emb
        d_e = tok_emb.embedding_dim
        self.embed_proj = nn.Identity() if d_e == config.d_model else nn.Linear(d_e, config.d_model, bias=False)
        if isinstance(self.embed_proj, nn.Linear):
            nn.init.normal_(self.embed_proj.weight, std=d_e ** -0.5)
        self.head = nn.Identity()
        for m in self.modules():
            m.aux_channel = self.aux_channel

    def embed_tokens(self, tokens):
        return self.embed_proj(super().embed_tokens(tokens))  # (B, T, d) → (B, T, d_G)


def width_scaled_init(model):
    """Re-initialise ``model`` for its width: every ``nn.Linear`` weight ~ N(0, 1/d_in), every ``nn.Embedding``
    table ~ N(0, 1), biases 0 (LayerNorms untouched). Returns ``model``.

    GPT-2's N(0, 0.02) is ≈ 0.55/√d for d = 768; at d = 64 it makes every query·key score ≈ 0 — attention stays
    uniform and the gradient that would sharpen it is a product of two tiny matrices. A masked LM escapes that
    plateau (its 590-way target pulls hard); a discriminator learning one bit per position from a 15 %-positive
    label does not: with the 0.02 init it predicts "real" everywhere for thousands of steps (AUC 0.5). The
    1/√d_in scale (LeCun's, PyTorch's default order of magnitude) is what BERT's 0.02 amounts to at its width."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0)
    return model


def rtd_auc(scores, labels):
    """The discriminator's ROC AUC: P(score of a replaced position > score of a real one) (ties count ½), from
    ranks (Mann–Whitney U). ``scores``/``labels`` any shape (flattened); NaN when a class is absent."""
    s, y = scores.detach().flatten().double(), labels.flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = s.argsort()
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=s.dtype)
    # average ranks over ties
    uniq, inv = torch.unique(s, return_inverse=True)
    mean_rank = torch.zeros(len(uniq), dtype=s.dtype).index_add_(0, inv, ranks) / torch.bincount(inv).to(s.dtype)
    ranks = mean_rank[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _encoder(config):
    """A Transformer encoder whose ``forward`` returns the last hidden state (B, T, d) (head = identity)."""
    model = Transformer(config)
    model.head = nn.Identity()
    model.head.aux_channel = model.aux_channel
    return model


class Electra(nn.Module):
    """Generator + discriminator with shared embeddings (:class:`ElectraConfig`).

    ``.discriminator`` an effedu :class:`~effedu.model.Transformer` encoder (head = identity) + ``.disc_head``
    (dense → GELU → 1 logit per position); ``.generator`` a :class:`Generator` + ``.gen_head`` (:class:`MLMHead`
    tied to the shared token table). ``forward(tokens)`` = the discriminator's hidden states (the features a
    downstream task fine-tunes or probes)."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        if not isinstance(config, ElectraConfig):
            raise TypeError(f"Electra: config must be an ElectraConfig, got {type(config).__name__}")
        self.config = config
        self.discriminator = _encoder(config.encoder_config())
        if config.init == "width":  # first, as MaskedLM does: one seed → the same encoder in both
            width_scaled_init(self.discriminator)
        d = config.d_model
        self.disc_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        gcfg = config.generator_config()
        self.generator = Generator(gcfg, self.discriminator.tok_emb, self.discriminator.pos_emb)
        self.gen_head = MLMHead(gcfg.d_model, self.discriminator.tok_emb)
        if config.init == "width":
            for part in (self.disc_head, self.generator.blocks, self.generator.ln_f, self.generator.embed_proj,
                         self.gen_head.dense):
                width_scaled_init(part)  # the shared tables were drawn with the discriminator

    def forward(self, tokens):
        return self.discriminator(tokens)  # (B, T, d)


class MaskedLM(nn.Module):
    """The MLM baseline: the discriminator's encoder shape with BERT's tied :class:`MLMHead` (masked positions)."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        if not isinstance(config, ElectraConfig):
            raise TypeError(f"MaskedLM: config must be an ElectraConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = _encoder(config.encoder_config())
        if config.init == "width":
            width_scaled_init(self.encoder)
        self.head = MLMHead(config.d_model, self.encoder.tok_emb)
        if config.init == "width":
            width_scaled_init(self.head.dense)

    def forward(self, tokens):
        return self.encoder(tokens)  # (B, T, d)


# --------------------------------------------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------------------------------------------


def mlm_loss(model, tokens, *, mask_rate=None, generator=None, return_parts=False):
    """The MLM baseline's loss on ``tokens (B, T)``: BERT's 80/10/10 masking, cross-entropy at masked positions.

    ``model`` a :class:`MaskedLM`; ``mask_rate`` defaults to its config's. Returns the loss (and with
    ``return_parts`` a dict: ``mlm``, ``accuracy`` at masked positions, ``n_masked``)."""
    where = "mlm_loss"
    if not isinstance(model, MaskedLM):
        raise TypeError(f"{where}: model must be a MaskedLM, got {type(model).__name__}")
    cfg = model.config
    check_tokens(tokens, cfg, where)
    rate = cfg.mask_rate if mask_rate is None else _check_rate(mask_rate, "mask_rate", where)
    inputs, targets, masked = mask_tokens(tokens, mask_rate=rate, mask_id=cfg.mask_id, vocab_size=cfg.vocab_size,
                                          generator=generator)
    h = model(inputs)  # (B, T, d)
    logits = model.head(h[masked])  # (N_masked, V): the head runs on the masked positions only
    # L_MLM = −(1/|m|) Σ_{t∈m} log p(x_t | x_masked)
    loss = F.cross_entropy(logits, targets[masked])
    if not return_parts:
        return loss
    acc = float((logits.argmax(-1) == targets[masked]).float().mean())
    return loss, {"mlm": float(loss.detach()), "accuracy": acc, "n_masked": int(masked.sum())}


def electra_loss(model, tokens, *, lam=None, mask_rate=None, generator=None, temperature=1.0):
    """ELECTRA's loss ``L_MLM(G) + λ · L_Disc(D)`` on ``tokens (B, T)``; returns ``(loss, parts)``.

    ``parts``: ``mlm`` and ``disc`` (floats), ``gen_accuracy`` (the generator's argmax at masked positions),
    ``replaced_fraction`` (of masked positions whose sample differs), ``disc_accuracy`` (all positions), and the
    tensors of the step for plots: ``masked``, ``sampled`` (the generator's samples, original elsewhere),
    ``corrupt``, ``labels`` (bool, :func:`rtd_labels`), ``disc_prob`` (B, T) = P(replaced), detached; and the two
    terms as tensors with their graphs, ``mlm_loss`` and ``disc_loss``.
    ``lam`` and ``mask_rate`` default to the model's config; λ < 0 raises ValueError.
    """
    where = "electra_loss"
    if not isinstance(model, Electra):
        raise TypeError(f"{where}: model must be an Electra, got {type(model).__name__}")
    cfg = model.config
    check_tokens(tokens, cfg, where)
    lam = cfg.lam if lam is None else _check_lam(lam, where)
    rate = cfg.mask_rate if mask_rate is None else _check_rate(mask_rate, "mask_rate", where)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"{where}: temperature must be a positive number, got {temperature!r}")
    # x_masked = REPLACE(x, m, [MASK])                                          (Clark et al. §2)
    inputs, targets, masked = mask_tokens(tokens, mask_rate=rate, mask_id=cfg.mask_id, vocab_size=cfg.vocab_size,
                                          generator=generator, split=(1.0, 0.0, 0.0))
    h_g = model.generator(inputs)  # (B, T, d_G)
    logits = model.gen_head(h_g[masked])  # (N_masked, V)
    mlm = F.cross_entropy(logits, targets[masked])
    # x̂_t ~ p_G(x_t | x_masked) for t ∈ m — sampled, not differentiated (no gradient through the sample)
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float() / temperature, dim=-1)
        probs[:, cfg.mask_id] = 0  # never "replace" with [MASK] itself
        draws = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        sampled = tokens.clone()
        sampled[masked] = draws
    # x_corrupt = REPLACE(x, m, x̂); label = replaced ⇔ masked and x̂ ≠ x
    labels = rtd_labels(tokens, sampled, masked)
    h_d = model.discriminator(sampled)  # (B, T, d)
    disc_logit = model.disc_head(h_d).squeeze(-1)  # (B, T)
    # L_Disc = mean over all positions of BCE(D(x_corrupt, t), 1(replaced))
    disc = F.binary_cross_entropy_with_logits(disc_logit, labels.to(disc_logit.dtype))
    loss = mlm + lam * disc
    with torch.no_grad():
        parts = {
            "mlm": float(mlm.detach()), "disc": float(disc.detach()),
            "gen_accuracy": float((logits.argmax(-1) == targets[masked]).float().mean()),
            "replaced_fraction": float(labels.sum()) / max(1, int(masked.sum())),
            "disc_accuracy": float(((disc_logit > 0) == labels).float().mean()),
            "disc_base_rate": 1.0 - float(labels.float().mean()),  # the accuracy of "always real"
            "disc_auc": rtd_auc(disc_logit, labels),
            "masked": masked, "sampled": sampled, "corrupt": sampled, "labels": labels,
            "disc_prob": torch.sigmoid(disc_logit.detach()),
        }
    parts["mlm_loss"], parts["disc_loss"] = mlm, disc  # the two terms as tensors (with their graphs)
    return loss, parts


def _step(model, loss, optimizer):
    loss.backward()
    clip = model.config.grad_clip
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.detach())


def electra_step(model, inputs, targets, optimizer):
    """One ELECTRA training step for ``effedu.train.train(..., step_fn=electra_step)``: ``inputs`` are the token
    windows (``targets`` unused: the objective makes its own). λ, mask rate and clipping come from ``model.config``."""
    optimizer.zero_grad(set_to_none=True)
    loss, _ = electra_loss(model, inputs)
    return _step(model, loss, optimizer)


def mlm_step(model, inputs, targets, optimizer):
    """One MLM step for ``effedu.train.train(..., step_fn=mlm_step)`` (``targets`` unused)."""
    optimizer.zero_grad(set_to_none=True)
    return _step(model, mlm_loss(model, inputs), optimizer)


# --------------------------------------------------------------------------------------------------------------
# compute
# --------------------------------------------------------------------------------------------------------------


def head_flops(model, seq_len, *, mask_rate=None):
    """Forward FLOPs of the heads for one sequence of ``seq_len`` (a multiply-add = 2): an MLM head on the
    expected ``mask_rate · seq_len`` masked positions (dense d_in×d, then the tied d×V decoder) and, for ELECTRA,
    the discriminator's head (d×d, d×1) on every position."""
    cfg = model.config
    rate = cfg.mask_rate if mask_rate is None else mask_rate
    n_masked = max(1.0, rate * seq_len)
    V, d = cfg.vocab_size, cfg.d_model
    if isinstance(model, MaskedLM):
        return 2 * n_masked * (d * d + d * V)
    d_g = model.generator.config.d_model
    return 2 * n_masked * (d_g * d + d * V) + 2 * seq_len * (d * d + d)


def pretraining_flops(model, tokens, *, seq_len, mask_rate=None):
    """Training FLOPs of ``tokens`` tokens of pre-training (sequences of ``seq_len``), forward + backward (≈ 3 ×
    forward): ``effedu.measure.training_flops`` of each Transformer body (ELECTRA: generator + discriminator)
    plus 3 × :func:`head_flops` per sequence. Returns an int."""
    where = "pretraining_flops"
    if not isinstance(model, (Electra, MaskedLM)):
        raise TypeError(f"{where}: model must be an Electra or a MaskedLM, got {type(model).__name__}")
    check_positive_int(seq_len, "seq_len", where)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"{where}: tokens must be an int ≥ 0, got {tokens!r}")
    bodies = [model.encoder] if isinstance(model, MaskedLM) else [model.generator, model.discriminator]
    body = sum(measure.training_flops(b, tokens, seq_len=seq_len) for b in bodies)
    return int(body + 3 * head_flops(model, seq_len, mask_rate=mask_rate) * tokens / seq_len)


# --------------------------------------------------------------------------------------------------------------
# quality: a linear probe on frozen features
# --------------------------------------------------------------------------------------------------------------


def encode_texts(texts, tokenizer, max_len):
    """``(tokens (N, T), lengths (N,))``: each text's tokens, cut at ``max_len``, padded with id 0 on the right
    (``lengths`` says where the text ends; :func:`sentence_features` masks the rest)."""
    ids = [tokenizer.encode(t)[:max_len] for t in texts]
    T = max(len(i) for i in ids)
    out = torch.zeros(len(ids), T, dtype=torch.long)
    for row, i in enumerate(ids):
        out[row, :len(i)] = i
    return out, torch.tensor([len(i) for i in ids])


@torch.no_grad()
def sentence_features(model, tokens, lengths, *, batch_size=256):
    """Frozen features: the mean over a sentence's own positions of the encoder's last hidden state (N, d).

    Padding is masked out of attention (a key-padding mask) and out of the mean. ``model``: an :class:`Electra`
    (its discriminator, as the paper fine-tunes), a :class:`MaskedLM`, or a bare encoder."""
    was_training = model.training
    model.eval()
    feats = []
    for s in range(0, len(tokens), batch_size):
        x, n = tokens[s:s + batch_size], lengths[s:s + batch_size]
        keep = torch.arange(x.shape[1])[None, :] < n[:, None]  # (B, T) real positions
        h = model.discriminator(x, mask=keep[:, None, None, :]) if isinstance(model, Electra) else \
            (model.encoder if isinstance(model, MaskedLM) else model)(x, mask=keep[:, None, None, :])
        w = keep.to(h.dtype)[..., None]
        feats.append((h * w).sum(1) / w.sum(1))  # (B, d)
    model.train(was_training)
    return torch.cat(feats)


def linear_probe(features, labels, *, test_fraction=0.5, l2=1e-3, max_iter=100, seed=0):
    """Multinomial logistic regression on frozen ``features (N, d)`` → ``labels (N,)``; returns a dict with
    ``train_accuracy``, ``test_accuracy``, ``n_train``, ``n_test``.

    A seeded split (``test_fraction`` held out), features standardised with the training part's mean and std,
    then L-BFGS in float64 from zero weights on ``mean CE + l2 · ‖W‖²`` (a convex problem: the same answer every
    run, up to float rounding). Nothing of the encoder is trained: the probe measures what its features hold.
    """
    where = "linear_probe"
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"{where}: features must be a 2-D tensor (N, d), got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or len(labels) != len(features) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{where}: labels must be N={len(features)} integer class ids, got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    test_fraction = _check_rate(test_fraction, "test_fraction", where)
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or l2 < 0:
        raise ValueError(f"{where}: l2 must be a number ≥ 0, got {l2!r}")
    check_positive_int(max_iter, "max_iter", where)
    check_seed(seed, where)
    N = len(features)
    n_test = int(round(N * test_fraction))
    if n_test < 1 or n_test >= N:
        raise ValueError(f"{where}: test_fraction={test_fraction} of N={N} leaves an empty part")
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:n_test], perm[n_test:]
    x = features.detach().double()
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-8)
    x = (x - mu) / sd
    y = labels.long()
    C = int(y.max()) + 1
    W = torch.zeros(x.shape[1] + 1, C, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], 1)  # a bias column
    opt = torch.optim.LBFGS([W], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        # mean CE(softmax(x W), y) + l2 ‖W‖² (the bias row unpenalised)
        loss = F.cross_entropy(xb[tr] @ W, y[tr]) + l2 * W[:-1].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (xb @ W).argmax(1)
    return {"train_accuracy": float((pred[tr] == y[tr]).double().mean()),
            "test_accuracy": float((pred[te] == y[te]).double().mean()), "n_train": len(tr), "n_test": n_test}


# --------------------------------------------------------------------------------------------------------------
# pre-training on the corpus, probing along the way
# --------------------------------------------------------------------------------------------------------------


WORD_PATTERN = re.compile(r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]")  # words, single digits, punctuation marks


class WordTokenizer:
    """One token per word, digit or punctuation mark of the corpus (spaces dropped), plus ``[PAD]`` (0),
    ``[UNK]`` (1) and ``[MASK]`` (2).

    A character-level MLM of this size spends its first thousand steps learning to look at its neighbours (a masked
    character says nothing about itself); words make the objectives learn grammar — agreement, tense — within the
    chapter's budget. Numbers are split into digits, so the vocabulary stays a few hundred entries."""

    SPECIAL = ("[PAD]", "[UNK]", "[MASK]")

    def __init__(self, text):
        if not isinstance(text, str) or not text:
            raise ValueError("WordTokenizer: text must be a non-empty str")
        self.itos = list(self.SPECIAL) + sorted(set(WORD_PATTERN.findall(text)))
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.mask_id = 0, 1, 2

    @property
    def vocab_size(self):
        return len(self.itos)

    def __repr__(self):
        return f"WordTokenizer(vocab_size={self.vocab_size})"

    def tokenize(self, text):
        return WORD_PATTERN.findall(text)

    def encode(self, text):
        """``LongTensor (n,)``; a word outside the vocabulary becomes ``[UNK]``."""
        if not isinstance(text, str):
            raise TypeError(f"WordTokenizer.encode: text must be a str, got {type(text).__name__}")
        return torch.tensor([self.stoi.get(w, self.unk_id) for w in self.tokenize(text)], dtype=torch.long)

    def decode_tokens(self, ids):
        """The list of token strings of ``ids``."""
        return [self.itos[int(i)] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]

    def decode(self, ids):
        return " ".join(self.decode_tokens(ids))


@functools.lru_cache(maxsize=1)
def _corpus_words():
    from ..data import load_corpus

    text = load_corpus()
    tok = WordTokenizer(text)
    return tok, tok.encode(text)


def corpus_tokenizer():
    """The :class:`WordTokenizer` of the shipped corpus (built once per process)."""
    return _corpus_words()[0]


def corpus_setup():
    """The corpus as a word-token stream: ``(train_ids (N,), tokenizer, vocab_size, mask_id)`` (the first 90 %:
    ``effedu.data.train_val_split``)."""
    from ..data import train_val_split

    tok, ids = _corpus_words()
    train_ids, _ = train_val_split(ids.clone(), 0.1)
    return train_ids, tok, tok.vocab_size, tok.mask_id


def probe_data(n=1000, *, label="tense", seed=123, max_len=32, tokenizer=None):
    """Labelled sentences of the corpus grammar, encoded: ``(tokens, lengths, labels (N,), label_names)``."""
    from ..data.corpus import generate_labelled_sentences

    texts, labels, names = generate_labelled_sentences(n, seed, label=label)
    tokens, lengths = encode_texts(texts, tokenizer or corpus_tokenizer(), max_len)
    return tokens, lengths, torch.tensor(labels), names


def pretrain(objective, config, *, steps, batch_size=32, lr=2e-3, seed=0, probe=None, probe_every=None,
             train_ids=None):
    """Pre-train an :class:`Electra` (``objective="electra"``) or a :class:`MaskedLM` (``"mlm"``) of ``config`` on
    random windows of the corpus with ``effedu.train.train``; returns ``(model, record)``.

    ``record``: ``loss`` per step, ``flops_per_step`` (:func:`pretraining_flops` of ``batch_size × max_len``
    tokens), and, when ``probe = (tokens, lengths, labels)`` is given, the probe's test accuracy at step 0 and
    every ``probe_every`` steps (``probe_steps``, ``probe_flops``, ``probe_accuracy``)."""
    from ..data import lm_batch
    from ..train import train

    where = "pretrain"
    if objective not in ("electra", "mlm"):
        raise ValueError(f"{where}: objective must be 'electra' or 'mlm', got {objective!r}")
    check_positive_int(steps, "steps", where)
    check_positive_int(batch_size, "batch_size", where)
    check_seed(seed, where)
    torch.manual_seed(seed)
    model = Electra(config) if objective == "electra" else MaskedLM(config)
    if train_ids is None:
        train_ids = corpus_setup()[0]
    T = config.max_len
    per_step = pretraining_flops(model, batch_size * T, seq_len=T)
    record = {"objective": objective, "flops_per_step": per_step, "probe_steps": [], "probe_flops": [],
              "probe_accuracy": []}
    every = probe_every or steps

    def do_probe(step):
        if probe is None:
            return
        state = torch.random.get_rng_state()
        acc = linear_probe(sentence_features(model, probe[0], probe[1]), probe[2])["test_accuracy"]
        torch.random.set_rng_state(state)  # probing draws nothing from the training stream
        record["probe_steps"].append(step)
        record["probe_flops"].append(step * per_step)
        record["probe_accuracy"].append(acc)

    step_fn = electra_step if objective == "electra" else mlm_step
    done = [0]

    def probing_step(m, inputs, targets, optimizer):
        loss = step_fn(m, inputs, targets, optimizer)
        done[0] += 1
        if done[0] % every == 0 or done[0] == steps:
            do_probe(done[0])
        return loss

    do_probe(0)
    history = train(model, lambda s: lm_batch(train_ids, batch_size, T, seed=seed * 100003 + s), steps=steps,
                    lr=lr, warmup=max(1, steps // 20), seed=seed, step_fn=probing_step, progress=False)
    record["loss"] = history["loss"]
    model.eval()
    return model, record


# --------------------------------------------------------------------------------------------------------------
# plots (the notebook's figures; each returns a Figure)
# --------------------------------------------------------------------------------------------------------------


def plot_replaced_tokens(chars, original, labels, masked, disc_prob, *, title="What the generator replaced and the "
                         "discriminator flagged", max_cols=32):
    """A token grid, one row per sequence: the text the discriminator reads, each cell shaded by its P(replaced).

    ``chars``: per sequence, the list of tokens it reads (``x_corrupt``); ``original`` the original tokens;
    ``labels``/``masked``/``disc_prob`` (S, T). Replaced characters are written in red bold with the original
    below; masked positions where the generator sampled the original are green (they count as real)."""
    from matplotlib import colormaps

    from ..viz import new_figure

    S = len(chars)
    T = min(max_cols, max(len(c) for c in chars))
    fig = new_figure(min(16, 0.8 * T + 1.5), 0.75 * S + 1.4)
    ax = fig.add_subplot()
    cmap = colormaps["Greys"]
    for s in range(S):
        y = 2 * (S - 1 - s)
        for t in range(min(T, len(chars[s]))):
            p = float(disc_prob[s][t])
            ax.add_patch(_rect(t, y, cmap(0.6 * p)))
            rep, msk = bool(labels[s][t]), bool(masked[s][t])
            colour = "red" if rep else ("green" if msk else "black")
            ax.text(t + 0.5, y + 0.5, _show(chars[s][t]), ha="center", va="center", fontsize=8, color=colour,
                    fontweight="bold" if rep or msk else "normal", family="monospace")
            if rep:
                ax.text(t + 0.5, y - 0.35, _show(original[s][t]), ha="center", va="center", fontsize=7, color="gray",
                        family="monospace")
    ax.set_xlim(0, T)
    ax.set_ylim(-1, 2 * S)
    ax.set_yticks([2 * (S - 1 - s) + 0.5 for s in range(S)], [f"seq {s + 1}" for s in range(S)])
    ax.set_xlabel("position (token)   ·   shade = discriminator's P(replaced); red = replaced (original in grey "
                  "below); green = masked but sampled right (real)")
    step = 1 if T <= 24 else 4
    ax.set_xticks([t + 0.5 for t in range(0, T, step)], [str(t + 1) for t in range(0, T, step)])
    ax.set_title(title)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return fig


def _rect(t, y, colour):
    from matplotlib.patches import Rectangle

    return Rectangle((t, y), 1, 1, facecolor=colour, edgecolor="white", linewidth=0.5)


def _show(c):
    return {" ": "␣", "\n": "⏎"}.get(c, c)


def plot_quality_vs_compute(curves, *, chance=None, live=None, title="Probe accuracy vs pre-training compute"):
    """``curves``: ``{"electra": {"probe_flops": [...], "probe_accuracy": [...]}, "mlm": {...}}`` (the sweep's
    ``compute["curves"]``); ``live``: optional ``{name: (flops, accuracy)}`` points measured in the notebook."""
    from ..viz import new_figure

    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    styles = {"electra": ("C3", "ELECTRA (replaced-token detection)"), "mlm": ("C0", "masked LM (BERT)")}
    for name, c in curves.items():
        colour, label = styles.get(name, (None, name))
        ax.plot([f / 1e12 for f in c["probe_flops"]], c["probe_accuracy"], "o-", color=colour, label=label)
    if chance is not None:
        ax.axhline(chance, color="gray", ls=":", label="chance")
    for name, (f, a) in (live or {}).items():
        ax.plot([f / 1e12], [a], "*", ms=14, color=styles.get(name, ("k",))[0], label=f"{name}: measured here")
    ax.set_xlabel("pre-training compute (TFLOPs, forward + backward)")
    ax.set_ylabel("linear-probe test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


KNOB_LABELS = {"gen_fraction": "generator width / discriminator width", "lam": "λ (discriminator loss weight)",
               "mask_rate": "mask rate"}


def plot_knobs(knobs, *, gen_fraction=0.25, lam=50.0, mask_rate=0.15):
    """Three panels from the sweep's ``knobs["knobs"]``: the probe accuracy and the replaced share of masked
    positions as one knob moves (the others at their defaults); the chosen value of each knob is circled."""
    from ..viz import new_figure

    chosen = {"gen_fraction": gen_fraction, "lam": lam, "mask_rate": mask_rate}
    fig = new_figure(12, 3.6)
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (knob, rows) in zip(axes, knobs.items()):
        xs = [r["value"] for r in rows]
        ax.plot(xs, [r["probe_accuracy"] for r in rows], "o-", color="C3", label="probe accuracy")
        ax.plot(xs, [r["replaced_fraction"] for r in rows], "s--", color="C2", label="replaced / masked")
        ax.plot(xs, [r["disc_accuracy"] for r in rows], "^:", color="C1", label="discriminator accuracy")
        if all("disc_auc" in r for r in rows):
            ax.plot(xs, [r["disc_auc"] for r in rows], "v-.", color="C4", label="discriminator AUC")
        pick = min(rows, key=lambda r: abs(r["value"] - chosen[knob]))
        ax.plot([pick["value"]], [pick["probe_accuracy"]], "o", ms=16, mfc="none", mec="k", mew=2)
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(KNOB_LABELS[knob])
        ax.set_title(f"{knob} = {pick['value']:g}: probe {pick['probe_accuracy']:.2f}, "
                     f"replaced {pick['replaced_fraction']:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction")
    axes[0].legend(fontsize=8)
    fig.suptitle("ELECTRA's knobs, one at a time (the others at generator ¼, λ = 50, 15 % masked)")
    return fig


__all__ = ["mask_tokens", "rtd_labels", "rtd_auc", "width_scaled_init", "ElectraConfig", "Electra", "MaskedLM", "Generator", "MLMHead",
           "electra_loss", "mlm_loss", "electra_step", "mlm_step", "head_flops", "pretraining_flops",
           "encode_texts", "sentence_features", "linear_probe", "WordTokenizer", "corpus_tokenizer", "corpus_setup", "probe_data", "pretrain",
           "plot_replaced_tokens", "plot_quality_vs_compute", "plot_knobs"]
