"""Initialisation that makes warm-up unnecessary: Post-LN vs Pre-LN, T-Fixup and Admin (survey §3.10).

A deep Post-LN Transformer (``x = LN(x + F(x))``, the original layout) is hard to train without a learning-rate
warm-up. Three explanations, three remedies, all at *initialisation*:

* **Xiong et al. 2020**, "On Layer Normalization in the Transformer Architecture" (ICML): at initialisation the
  gradient of Post-LN's last layers is large — ‖∂L/∂W²‖ grows toward the output — while Pre-LN
  (``x = x + F(LN(x))``) keeps it flat, about √L times smaller at the top (their Theorem 1). Remedy: move the
  LayerNorm (Pre-LN). The meter is :func:`effedu.measure.layer_weight_grad_norms` (chapter 01 uses it too).

* **Huang et al. 2020**, "Improving Transformer Optimization Through Better Initialization" (ICML), **T-Fixup**:
  remove every LayerNorm and scale the initialisation so that an Adam update changes the output by Θ(η).
  Their rules (Section 3.2), for N layers:

      Xavier for every weight matrix;  input embeddings ~ N(0, d^(-1/2))
      encoder:  v, W_o of attention and both FFN matrices  × 0.67 · N^(-1/4)
      decoder:  v, W_o of attention and both FFN matrices  × (9N)^(-1/4)
      input embeddings (encoder and decoder)               × (9N)^(-1/4)

  This course's models are decoder-only (causal) or encoder-only, never both: :func:`t_fixup_init` uses the
  decoder rule for a causal model and the encoder rule otherwise (``variant=`` overrides), and scales the token and
  the learned position embeddings by (9N)^(-1/4) in both cases, as the paper does for every input embedding. Our
  model adds embeddings without the original Transformer's √d factor, so N(0, d^(-1/2)) is the literal scale of
  the input (‖x‖ ≈ 1 per token before the (9N)^(-1/4)).

* **Liu et al. 2020**, "Understanding the Difficulty of Training Transformers" (EMNLP), **Admin**: Post-LN
  depends heavily on its residual branches (amplified output changes), so rescale the *skip* path:

      x_i = LN(ω_i · x_{i-1} + f_i(x_{i-1}))      ω_i = √( Σ_{j<i} Var[f_j(x_{j-1})] )

  with i running over the 2N sub-layers (attention, FFN, attention, ...). A profiling forward pass at ω = 1
  measures Var[f_j] (:func:`admin_profile`); the term j = 0 is the input x₀ (the embedding), so ω₁ = √Var[x₀]
  and not an empty sum (Liu et al.'s code starts its running ratio at the input's scale). ω is then a learned
  vector of d entries per sub-layer, initialised to the scalar. The ``admin-torch`` package (Liu) ships the
  closed form without profiling, ω = √(calculate_init) for an assumed output change O(1), O(log n) or O(n):
  ``admin_init(model, output_change_scale=...)`` reproduces it.

    model = make_model("admin", depth=12, batch=batch)   # Transformer + Xavier init + profiled ω
    grad_norms_at_init("post-ln", 12)                     # ‖∂L/∂W²‖ per layer, layer 0 nearest the input
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .._checks import check_choice, check_positive_int
from ..measure import layer_weight_grad_norms
from ..model import Transformer, TransformerConfig

SCHEMES = ("post-ln", "pre-ln", "t-fixup", "admin")
OUTPUT_CHANGE_SCALES = ("O(1)", "O(logn)", "O(n)")
T_FIXUP_ENCODER_CONSTANT = 0.67  # Huang et al. 2020, §3.2: encoder weights × 0.67·N^(-1/4)
T_FIXUP_DECODER_CONSTANT = 9  # decoder weights and input embeddings × (9N)^(-1/4)


def _check_transformer(model, where, norm=None):
    if not isinstance(model, Transformer):
        raise TypeError(f"{where}: model must be an effedu Transformer, got {type(model).__name__}")
    if norm is not None and model.config.norm_kind != norm:
        raise ValueError(f"{where}: model must be a {norm}-LN Transformer (TransformerConfig(norm={norm!r})), "
                         f"got norm={model.config.norm_kind!r}" if norm != "none" else
                         f"{where}: model must have no LayerNorm (TransformerConfig(norm='none')), "
                         f"got norm={model.config.norm_kind!r}")


@torch.no_grad()
def xavier_init(model):
    """Xavier-normal weight matrices (each of q, k, v separately: the fused ``qkv`` is three d×d matrices), zero
    biases, LayerNorm gains 1, embeddings N(0, 1) — the original Transformer's setting (its N(0, d^(-1/2))
    embeddings are multiplied by √d), which Xiong et al. 2020 analyse. Returns the model."""
    _check_transformer(model, "xavier_init")
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight
            # std = √(2 / (fan_in + fan_out)), per projection
            parts = w.split(w.shape[0] // 3, dim=0) if _is_qkv(model, mod) else (w,)
            for part in parts:
                part.normal_(0.0, math.sqrt(2.0 / (part.shape[0] + part.shape[1])))
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Embedding):
            mod.weight.normal_(0.0, 1.0)
        elif isinstance(mod, nn.LayerNorm):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    return model


def _is_qkv(model, linear):
    return any(linear is block.attn.qkv for block in model.blocks)


def init_post_ln(model):
    """The baseline initialisation of a Post-LN Transformer (Xavier, :func:`xavier_init`); checks the layout."""
    _check_transformer(model, "init_post_ln", "post")
    return xavier_init(model)


def init_pre_ln(model):
    """The baseline initialisation of a Pre-LN Transformer (Xavier, :func:`xavier_init`); checks the layout."""
    _check_transformer(model, "init_pre_ln", "pre")
    return xavier_init(model)


def t_fixup_scales(n_layers, variant="decoder"):
    """Huang et al.'s factors for ``n_layers`` = N: ``{"weights": ..., "embeddings": (9N)^(-1/4)}`` with
    weights 0.67·N^(-1/4) (encoder) or (9N)^(-1/4) (decoder)."""
    check_positive_int(n_layers, "n_layers", "t_fixup_scales")
    check_choice(variant, ("encoder", "decoder"), "variant", "t_fixup_scales")
    # encoder: 0.67·N^(-1/4);  decoder: (9N)^(-1/4);  input embeddings: (9N)^(-1/4)
    emb = (T_FIXUP_DECODER_CONSTANT * n_layers) ** -0.25
    weights = T_FIXUP_ENCODER_CONSTANT * n_layers ** -0.25 if variant == "encoder" else emb
    return {"weights": weights, "embeddings": emb}


@torch.no_grad()
def t_fixup_init(model, *, variant=None):
    """T-Fixup (Huang et al. 2020) for a Transformer without LayerNorm (``norm="none"``); returns the model.

    Xavier for every weight matrix (q, k, v separately), embeddings N(0, d^(-1/2)); then × the factors of
    :func:`t_fixup_scales` (N = ``n_layers``): the value rows of ``qkv``, ``proj`` (W_o) and both FFN matrices by
    the weight factor, token and position embeddings by (9N)^(-1/4). ``variant``: ``"decoder"`` (default for a
    causal model) or ``"encoder"`` (default otherwise). A pluggable FFN must have ``fc1``/``fc2``.
    """
    where = "t_fixup_init"
    _check_transformer(model, where, "none")
    cfg = model.config
    variant = check_choice(variant, ("encoder", "decoder"), "variant", where) if variant is not None else (
        "decoder" if cfg.causal else "encoder")
    scale = t_fixup_scales(cfg.n_layers, variant)
    xavier_init(model)
    for emb in (model.tok_emb, model.pos_emb):
        # x ~ N(0, d^(-1/2)) · (9N)^(-1/4)
        emb.weight.normal_(0.0, cfg.d_model ** -0.5).mul_(scale["embeddings"])
    for i, block in enumerate(model.blocks):
        attn = block.attn
        inner = attn.inner_dim
        # v ← v · s,  W_o ← W_o · s   (the value rows are the last third of [q; k; v])
        attn.qkv.weight[2 * inner:].mul_(scale["weights"])
        attn.proj.weight.mul_(scale["weights"])
        for name in ("fc1", "fc2"):
            lin = getattr(block.ffn, name, None)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"{where}: block {i}'s FFN has no Linear {name!r} (T-Fixup scales both FFN "
                                 f"matrices); got {type(block.ffn).__name__}")
            lin.weight.mul_(scale["weights"])
    return model


def _check_batch(batch, model, where):
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype != torch.long:
        raise TypeError(f"{where}: batch must be int64 tokens (B, T) or a pair (inputs, targets), "
                        f"got {type(batch).__name__}{'' if not isinstance(batch, torch.Tensor) else tuple(batch.shape)}")
    return batch


def _variance(t):
    # Var[t] over every element, population form: E[t²] − E[t]²
    t = t.detach().double()
    return float((t - t.mean()).pow(2).mean())


@torch.no_grad()
def admin_profile(model, batch):
    """The profiling pass of Admin: one forward at ω = 1 (the skip scales temporarily off) in eval mode.

    Returns ``{"input": Var[x₀], "attn": [Var[f] per layer], "ffn": [Var[f] per layer]}`` where f is each
    sub-layer's branch output (the attention's and the FFN's output before the residual add), x₀ the embedding.
    """
    where = "admin_profile"
    _check_transformer(model, where)
    tokens = _check_batch(batch, model, where)
    out = {"input": None, "attn": [], "ffn": []}
    saved = [(b.skip_scale_attn, b.skip_scale_ffn) for b in model.blocks]
    hooks = []
    was_training = model.training
    try:
        for b in model.blocks:
            b.skip_scale_attn = b.skip_scale_ffn = None
            hooks.append(b.attn.register_forward_hook(lambda m, i, o: out["attn"].append(_variance(o))))
            hooks.append(b.ffn.register_forward_hook(lambda m, i, o: out["ffn"].append(_variance(o))))
        model.eval()
        out["input"] = _variance(model.embed_tokens(tokens))
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
        for b, (sa, sf) in zip(model.blocks, saved):
            b.skip_scale_attn, b.skip_scale_ffn = sa, sf
        model.train(was_training)
    return out


def admin_omegas(profile):
    """ω per sub-layer from a profile: ω_i = √(Var[x₀] + Σ_{0<j<i} Var[f_j]), i over attention, FFN, attention, …
    Returns ``{"attn": [ω per layer], "ffn": [ω per layer]}``."""
    running = profile["input"]
    omegas = {"attn": [], "ffn": []}
    for va, vf in zip(profile["attn"], profile["ffn"]):
        omegas["attn"].append(math.sqrt(running))
        running += va
        omegas["ffn"].append(math.sqrt(running))
        running += vf
    return omegas


def admin_omega_closed_form(num_res_layers, output_change_scale="O(logn)"):
    """admin-torch's ω without profiling, for ``num_res_layers`` residual sub-layers (2N for N layers):
    √((n+1)/ln(n+1) − 1) for O(log n), √n for O(1), 1 for O(n)."""
    check_positive_int(num_res_layers, "num_res_layers", "admin_omega_closed_form")
    check_choice(output_change_scale, OUTPUT_CHANGE_SCALES, "output_change_scale", "admin_omega_closed_form")
    n = num_res_layers
    value = {"O(logn)": (n + 1) / math.log(n + 1) - 1, "O(n)": 1.0, "O(1)": float(n)}[output_change_scale]
    return value ** 0.5


def admin_init(model, batch=None, *, output_change_scale=None):
    """Admin (Liu et al. 2020) on a Post-LN Transformer: sets each block's ``skip_scale_attn``/``skip_scale_ffn``
    to a learned vector ω (shape (d,)), initialised from :func:`admin_profile` on ``batch`` (the paper), or, with
    ``batch=None`` and ``output_change_scale`` given, from admin-torch's closed form. The weights are left as they
    are (call :func:`init_post_ln` first). Build the optimiser afterwards (ω are new parameters). Returns the model.
    """
    where = "admin_init"
    _check_transformer(model, where, "post")
    if batch is None:
        if output_change_scale is None:
            raise ValueError(f"{where}: give a batch (profiling, the paper) or output_change_scale "
                             f"(one of {OUTPUT_CHANGE_SCALES}, admin-torch's closed form)")
        w = admin_omega_closed_form(2 * len(model.blocks), output_change_scale)
        omegas = {"attn": [w] * len(model.blocks), "ffn": [w] * len(model.blocks)}
    else:
        if output_change_scale is not None:
            raise ValueError(f"{where}: give either a batch or output_change_scale, not both")
        omegas = admin_omegas(admin_profile(model, batch))
    ref = model.head.weight
    for b, wa, wf in zip(model.blocks, omegas["attn"], omegas["ffn"]):
        b.skip_scale_attn = nn.Parameter(torch.full((model.config.d_model,), wa, dtype=ref.dtype, device=ref.device))
        b.skip_scale_ffn = nn.Parameter(torch.full((model.config.d_model,), wf, dtype=ref.dtype, device=ref.device))
    return model


def make_model(scheme, *, depth, d_model=64, n_heads=4, d_ff=None, vocab_size=64, max_len=128, causal=True,
               seed=0, batch=None):
    """A ``depth``-layer Transformer initialised by ``scheme`` (one of :data:`SCHEMES`), seeded.

    ``"post-ln"``/``"pre-ln"``: Xavier (:func:`xavier_init`); ``"t-fixup"``: ``norm="none"`` + :func:`t_fixup_init`;
    ``"admin"``: Post-LN, Xavier, then :func:`admin_init` profiled on ``batch`` (default: random tokens, seeded).
    """
    where = "make_model"
    check_choice(scheme, SCHEMES, "scheme", where)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"{where}: depth must be an int >= 1 (layers), got {depth!r}")
    norm = {"post-ln": "post", "pre-ln": "pre", "t-fixup": "none", "admin": "post"}[scheme]
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, n_layers=depth,
                                          d_ff=d_ff or 4 * d_model, max_len=max_len, causal=causal, norm=norm))
    if scheme == "t-fixup":
        return t_fixup_init(model)
    xavier_init(model)
    if scheme == "admin":
        if batch is None:
            g = torch.Generator().manual_seed(seed)
            batch = torch.randint(0, vocab_size, (8, min(64, max_len)), generator=g)
        admin_init(model, batch)
    return model


def grad_norms_at_init(scheme, depth, *, batch=None, weights="ffn.fc2.weight", seed=0, **model_kw):
    """‖∂L/∂W‖ per layer (index 0 nearest the input) of a freshly initialised ``make_model(scheme, depth=depth)``
    on ``batch`` (an ``(inputs, targets)`` pair; default: random tokens predicting the next one), in eval mode,
    with :func:`effedu.measure.layer_weight_grad_norms` (Xiong et al.'s W², the FFN output weight, by default)."""
    vocab = model_kw.get("vocab_size", 64)
    if batch is None:
        g = torch.Generator().manual_seed(seed + 1)
        tokens = torch.randint(0, vocab, (8, 65), generator=g)
        batch = (tokens[:, :-1], tokens[:, 1:])
    model = make_model(scheme, depth=depth, seed=seed, batch=batch, **model_kw)
    model.eval()
    return layer_weight_grad_norms(model, batch, weights=weights)





def unigram_entropy(tokens, vocab_size):
    """The cross-entropy (nats) of predicting every token by its corpus frequency: the loss a model reaches that
    learned nothing but the character counts. Training that ends above it has *stalled*."""
    counts = torch.bincount(tokens.reshape(-1), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    # H = −Σ p log p
    return float(-(p * p.log()).sum())


def warmup_demo(*, schemes=SCHEMES, depth=12, lr=3e-3, steps=80, warmups=(0, 40), seeds=(0,), d_model=32,
                batch_size=16, seq_len=32, tail=10, stall_margin=0.1, tokens=None, vocab_size=None):
    """Train each scheme with and without learning-rate warm-up on the course corpus; no gradient clipping.

    Every run: ``make_model(scheme, depth=depth, seed=seed)``, ``effedu.train.train(..., grad_clip=None,
    warmup=w, on_divergence="record")`` on next-character batches (``lm_batch(..., seed=step)``, the same
    batches for every run). Returns ``{"config": ..., "unigram_entropy": H, "runs": [run, ...]}``, each run a
    dict ``scheme, warmup, seed, loss (list), diverged_at (step or None), final_loss (mean of the last ``tail``
    losses, None when diverged), stalled, trained``:

    * *diverged*: a non-finite loss (training stops there, recorded by ``train``);
    * *stalled*: finished, but ``final_loss`` > H − ``stall_margin`` where H is the unigram entropy of the corpus
      (:func:`unigram_entropy`): it learned less than ``stall_margin`` nats beyond the character frequencies;
    * *trained*: neither.
    """
    from .. import data
    from ..train import train

    where = "warmup_demo"
    for s in schemes:
        check_choice(s, SCHEMES, "scheme", where)
    check_positive_int(steps, "steps", where)
    check_positive_int(tail, "tail", where)
    if not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < steps for w in warmups):
        raise ValueError(f"{where}: warmups must be ints in [0, steps={steps}), got {warmups!r}")
    if tokens is None:
        tok = data.corpus_tokenizer()
        tokens = data.train_val_split(torch.as_tensor(tok.encode(data.load_corpus())))[0]
        vocab_size = tok.vocab_size
    elif vocab_size is None:
        raise ValueError(f"{where}: give vocab_size with tokens")
    H = unigram_entropy(tokens, vocab_size)

    def batch_fn(step):
        return data.lm_batch(tokens, batch_size, seq_len, seed=1000 + step)

    runs = []
    for scheme in schemes:
        for seed in seeds:
            for w in warmups:
                model = make_model(scheme, depth=depth, d_model=d_model, vocab_size=vocab_size,
                                   max_len=max(seq_len, 64), seed=seed, batch=batch_fn(0))
                hist = train(model, batch_fn, steps=steps, lr=lr, warmup=w, grad_clip=None, seed=seed,
                             on_divergence="record", progress=False)
                loss = [float(x) for x in hist["loss"]]
                diverged = hist["diverged_at"]
                final = None if diverged is not None else sum(loss[-tail:]) / len(loss[-tail:])
                stalled = diverged is None and final > H - stall_margin
                runs.append({"scheme": scheme, "warmup": w, "seed": seed, "loss": loss, "diverged_at": diverged,
                             "final_loss": final, "stalled": stalled, "trained": diverged is None and not stalled})
    return {"config": {"depth": depth, "lr": lr, "steps": steps, "warmups": list(warmups), "d_model": d_model,
                       "batch_size": batch_size, "seq_len": seq_len, "tail": tail, "seeds": list(seeds),
                       "stall_margin": stall_margin, "schemes": list(schemes)},
            "unigram_entropy": H, "runs": runs}


__all__ = ["SCHEMES", "xavier_init", "init_post_ln", "init_pre_ln", "t_fixup_scales", "t_fixup_init",
           "admin_profile", "admin_omegas", "admin_omega_closed_form", "admin_init", "make_model",
           "grad_norms_at_init", "unigram_entropy", "warmup_demo"]
