"""Chapter 20: change the architecture, not the attention (survey §4.3).

Four models built from the pieces of :mod:`effedu.model` (hence ``general``: they wrap blocks, FFNs and the
attention registry, and a module below ``model`` could not import them):

* **Transformer-XL** (Dai et al. 2019): the sequence is processed segment by segment; each layer also attends to a
  *memory* of the previous segments' hidden states (a FIFO of the last ``mem_len`` states of that layer's input,
  detached — no gradient flows into it), with *relative* positions so that the same memory means the same thing
  from every segment. The score of query i and key j (Dai et al. 2019, eq. 4)::

      A_ij = q_iᵀ k_j  +  q_iᵀ W_R R_{i−j}  +  uᵀ k_j  +  vᵀ W_R R_{i−j}
             (a) content  (b) content→pos.    (c) global   (d) global
                                                   content      position

  with R the sinusoid of the *distance* i − j and u, v learned per head. Terms (b)+(d) are computed against every
  distance at once, ``(q + v) · (W_R R)ᵀ`` → ``(T, M+T)`` indexed by distance, and turned into a matrix indexed by key
  position with the **relative shift** (:func:`rel_shift`, Dai et al. App. B): pad, reshape, drop a row. The shift
  leaves garbage above the causal diagonal: :func:`relative_attention` masks it (the well-known bug class).
* **Compressive Transformer** (Rae et al. 2020): the states evicted from the FIFO are not dropped but compressed by
  a rate c (mean/max pooling or a strided convolution, :func:`compress`) into a second memory; the convolution is
  trained by an *attention-reconstruction loss* with the attention parameters detached
  (:func:`attention_reconstruction_loss`).
* **Funnel Transformer** (Dai et al. 2020): an encoder whose sequence is shortened between blocks by strided mean
  pooling of the *queries* (:func:`funnel_pool`; the first layer of a block attends from the pooled queries to the
  unpooled keys/values), optionally up-sampled back (repeat + the first block's output) for token-level outputs.
* **Perceiver** (Jaegle et al. 2021): a small learned latent array (m × d) cross-attends to the long input — O(n·m)
  instead of O(n²) — then the latents self-attend; a head reads the mean latent.

Outputs: :class:`TransformerXL` and :class:`CompressiveTransformer` are causal language models,
``forward(tokens, mems) -> (logits (N, L, V), new_mems)``; :class:`FunnelTransformer` gives ``(N, L, V)`` with
``upsample=True`` and ``(N, V)`` (one class per sequence, read from the first pooled position) without;
:class:`Perceiver` gives ``(N, V)``. Long-range tasks put their label at the *last* position (targets IGNORE
elsewhere): :func:`classify_step` / :func:`classifier_metrics` score a ``(N, V)`` output against that label, and
:func:`make_xl_step` trains the recurrent models segment by segment with ``effedu.train.train(..., step_fn=...)``.
:func:`needle_batch` is the chapter's own small long-dependency task.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_bool, check_choice, check_int, check_positive_int, check_seed
from ..attention.dense import masked_softmax, softmax_attention
from ..measure import attention_flops, ffn_flops
from ..model import IGNORE, Block, FeedForward, TransformerConfig, end_aligned_causal_mask, init_weights

COMPRESSIONS = ("mean", "max", "conv")


# --------------------------------------------------------------------------------------------------------------
# relative positions and the relative shift (Transformer-XL)
# --------------------------------------------------------------------------------------------------------------


def sinusoid_positions(n, d, *, dtype=torch.float32, device=None):
    """``(n, d)``: row p = [sin(p·f₀), …, sin(p·f_{d/2−1}), cos(p·f₀), …], f_i = 10000^(−2i/d) (Vaswani et al. 2017,
    in Transformer-XL's layout: sines then cosines). Row p encodes the distance p (p = 0, …, n − 1)."""
    check_positive_int(n, "n", "sinusoid_positions")
    check_positive_int(d, "d", "sinusoid_positions")
    if d % 2:
        raise ValueError(f"sinusoid_positions: d must be even (sine and cosine pairs), got {d}")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv_freq[None]  # (n, d/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


def rel_shift(x):
    """Transformer-XL's relative shift (Dai et al. 2019, App. B), on the last two dimensions.

    ``x (…, T, K)`` holds scores against *distances*: column p ↔ distance K − 1 − p (Transformer-XL's order, the
    distances of the K keys from the last query, largest first), with K = M + T (M memory positions before the T
    queries). Returns ``(…, T, K)`` indexed by *key position*: ``out[i, j] = x[i, j + T − 1 − i]`` = the score of
    distance (i + M) − j, for j ≤ i + M. Above that diagonal the entries are garbage (values of the next row, or the
    zero pad): the caller must mask them (:func:`relative_attention` does).

    The trick: pad one zero column on the left, view the (T, K + 1) block as (K + 1, T), drop the first row, view
    back as (T, K) — every row ends up shifted left by one more than the row above it, without a gather.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"rel_shift: x must be a tensor of at least 2 dimensions (…, T, K), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    *lead, T, K = x.shape
    if K < T:
        raise ValueError(f"rel_shift: x must have K ≥ T (K = memory + T keys), got T={T}, K={K}")
    padded = torch.cat([x.new_zeros(*lead, T, 1), x], dim=-1)  # (…, T, K + 1)
    padded = padded.reshape(*lead, K + 1, T)                    # the same numbers, read as K + 1 rows of T
    return padded[..., 1:, :].reshape(*lead, T, K)              # drop the first row, read back as T rows of K


def relative_attention(q, k, v, r, u, v_bias, *, mem_len, causal=True, scale=None, return_weights=False):
    """Transformer-XL's attention with relative positions and learned biases (eq. 4 of Dai et al. 2019).

    q ``(B, H, T, D)``; k ``(B, H, K, D)``, v ``(B, H, K, Dv)`` with K = ``mem_len`` + T (memory first);
    r ``(H, K, D)`` (or ``(B, H, K, D)``): W_R R for the distances K − 1, …, 0 (row p ↔ distance K − 1 − p, as
    :func:`rel_shift` expects); u, v_bias ``(H, D)``. Scores (all four terms, then the shift of (b) + (d))::

        (a) + (c) = (q_i + u) · k_j                                     (B, H, T, K)
        (b) + (d) = rel_shift((q_i + v) · r_p)                          distance → key position
        A = scale · [(a) + (b) + (c) + (d)],  masked to j ≤ i + mem_len (the shift's garbage lies above)

    Returns ``out (B, H, T, Dv)`` (and the weights ``(B, H, T, K)`` with ``return_weights``). Only the causal form
    exists: the distances are non-negative (``causal=False`` is refused).
    """
    where = "relative_attention"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{where}: q must be a (B, H, T, D) tensor, got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    check_int(mem_len, "mem_len", where, minimum=0)
    check_bool(causal, "causal", where)
    if not causal:
        raise ValueError(f"{where}: causal=False is not supported: the relative shift covers distances ≥ 0 only "
                         f"(query i, keys j ≤ i + mem_len)")
    B, H, T, D = q.shape
    if k.dim() != 4 or v.dim() != 4 or k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[-1] != D:
        raise ValueError(f"{where}: k must be (B, H, K, D) and v (B, H, K, Dv) matching q {tuple(q.shape)}, got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    K = k.shape[2]
    if K != mem_len + T:
        raise ValueError(f"{where}: k has K={K} positions, expected mem_len + T = {mem_len} + {T} = {mem_len + T}")
    if r.shape[-3:] != (H, K, D) or r.dim() not in (3, 4):
        raise ValueError(f"{where}: r must be (H, K, D) = ({H}, {K}, {D}) (or with a batch dimension), got "
                         f"{tuple(r.shape)}")
    for name, b in (("u", u), ("v_bias", v_bias)):
        if tuple(b.shape) != (H, D):
            raise ValueError(f"{where}: {name} must be (H, D) = ({H}, {D}), got {tuple(b.shape)}")
    scale = D ** -0.5 if scale is None else float(scale)
    ac = (q + u[:, None, :]) @ k.transpose(-2, -1)                          # (a) + (c)   (B, H, T, K)
    bd = rel_shift((q + v_bias[:, None, :]) @ r.transpose(-2, -1))          # (b) + (d)   by key position
    scores = (ac + bd) * scale
    allowed = end_aligned_causal_mask(T, K, q.device)                       # j ≤ i + M: masks the garbage too
    weights = masked_softmax(scores, allowed)
    out = weights @ v
    return (out, weights) if return_weights else out


class RelativeMultiHeadAttention(nn.Module):
    """Multi-head attention of Transformer-XL: queries from the segment, keys/values from [memory; segment],
    relative positions through W_R (``r_net``) and the learned biases ``u``, ``v_bias`` (H, Dh)."""

    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"RelativeMultiHeadAttention: d_model={d_model} must be divisible by n_heads={n_heads}")
        if d_model % 2:
            raise ValueError(f"RelativeMultiHeadAttention: d_model must be even (sinusoids), got {d_model}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.r_net = nn.Linear(d_model, d_model, bias=False)  # W_R
        self.proj = nn.Linear(d_model, d_model)
        self.u = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        self.v_bias = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        self.drop = nn.Dropout(dropout)

    def _heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, h, memory=None, *, return_weights=False):
        """h ``(B, T, d)``, memory ``(B, M, d)`` or None → ``(B, T, d)``."""
        B, T, d = h.shape
        M = 0 if memory is None else memory.shape[1]
        context = h if M == 0 else torch.cat([memory, h], dim=1)
        w_q, w_kv = self.qkv.weight.split([d, 2 * d])
        q = self._heads(F.linear(h, w_q))
        k, v = (self._heads(t) for t in F.linear(context, w_kv).split(d, dim=-1))
        K = M + T
        R = sinusoid_positions(K, d, dtype=h.dtype, device=h.device).flip(0)  # distances K − 1, …, 0
        r = self.r_net(R).view(K, self.n_heads, self.head_dim).transpose(0, 1)  # (H, K, Dh)
        res = relative_attention(q, k, v, r, self.u, self.v_bias, mem_len=M, return_weights=return_weights)
        out, weights = res if return_weights else (res, None)
        out = self.proj(self.drop(out).transpose(1, 2).reshape(B, T, d))
        return (out, weights) if return_weights else out


class XLBlock(nn.Module):
    """A pre-LN block with relative attention over [memory; segment] (the memory is normalised by the same LN)."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = RelativeMultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, memory=None):
        h = self.ln1(x)
        m = None if memory is None or memory.shape[1] == 0 else self.ln1(memory)
        x = x + self.drop(self.attn(h, m))
        return x + self.drop(self.ffn(self.ln2(x)))


def _check_config(config, where):
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"{where}: config must be a TransformerConfig, got {type(config).__name__}")
    if not isinstance(config.n_heads, int):
        raise ValueError(f"{where}: per-layer n_heads are not supported, got {config.n_heads!r}")


def _check_ids(tokens, config, where, max_len=None):
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
        raise TypeError(f"{where}: tokens must be an integer tensor (B, T), got "
                        f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}"
                        f"{'' if not isinstance(tokens, torch.Tensor) else ' ' + str(tuple(tokens.shape))}")
    if tokens.numel() == 0:
        raise ValueError(f"{where}: empty tokens {tuple(tokens.shape)}")
    if max_len is not None and tokens.shape[1] > max_len:
        raise ValueError(f"{where}: sequence length T={tokens.shape[1]} exceeds max_len={max_len}")
    if tokens.device.type == "cpu":
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"{where}: token ids must lie in [0, vocab_size={config.vocab_size}), got min {lo}, "
                             f"max {hi}")


def _fifo(memory, h, mem_len):
    """The new memory: the last ``mem_len`` of [memory; h], detached (no gradient flows into a memory)."""
    full = h if memory is None else torch.cat([memory, h], dim=1)
    return full[:, max(0, full.shape[1] - mem_len):].detach() if mem_len else full[:, :0].detach()


class TransformerXL(nn.Module):
    """A causal LM with segment-level recurrence and relative positions (Dai et al. 2019).

    ``forward(tokens (B, T), mems=None) -> (logits (B, T, V), new_mems)``; ``mems`` is a list of one ``(B, M, d)``
    tensor per layer (that layer's *inputs* for the last M ≤ ``mem_len`` earlier positions), detached. There is no
    absolute position embedding: the relative terms carry position, so a memory means the same from every segment,
    and the segment length is limited by ``config.max_len`` only. Pre-LN blocks (the course's layout; the paper's
    is post-LN). ``config.causal`` must be True.
    """

    def __init__(self, config, *, mem_len):
        super().__init__()
        where = type(self).__name__
        _check_config(config, where)
        check_int(mem_len, "mem_len", where, minimum=0)
        if not config.causal:
            raise ValueError(f"{where}: config.causal must be True (a segment-recurrent decoder)")
        if config.d_model % 2:
            raise ValueError(f"{where}: d_model must be even (sinusoidal relative positions), got {config.d_model}")
        self.config, self.mem_len = config, mem_len
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([XLBlock(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.apply(init_weights)

    def _check_mems(self, mems, B):
        if mems is None:
            return [None] * len(self.blocks)
        if not isinstance(mems, (list, tuple)) or len(mems) != len(self.blocks):
            raise ValueError(f"{type(self).__name__}: mems must be None or a list of {len(self.blocks)} (one per "
                             f"layer), got {type(mems).__name__}")
        return list(mems)

    def _layer_memory(self, mem):
        return mem

    def _update(self, index, mem, h):
        return _fifo(mem, h, self.mem_len)

    def forward(self, tokens, mems=None):
        _check_ids(tokens, self.config, type(self).__name__, self.config.max_len)
        mems = self._check_mems(mems, tokens.shape[0])
        x = self.drop(self.tok_emb(tokens))
        new_mems = []
        for i, (block, mem) in enumerate(zip(self.blocks, mems)):
            new_mems.append(self._update(i, mem, x))  # this layer's inputs join its memory
            x = block(x, self._layer_memory(mem))
        return self.head(self.ln_f(x)), new_mems


@torch.no_grad()
def evaluate_segments(model, tokens, segment_len):
    """Run ``tokens (B, L)`` through a recurrent model segment by segment, carrying the memory; returns the logits
    ``(B, L, V)`` (the last segment may be shorter). With a memory that covers every earlier position this equals
    the model over the whole sequence at once."""
    check_positive_int(segment_len, "segment_len", "evaluate_segments")
    was = model.training
    model.eval()
    mems, out = None, []
    for s in range(0, tokens.shape[1], segment_len):
        logits, mems = model(tokens[:, s:s + segment_len], mems)
        out.append(logits)
    model.train(was)
    return torch.cat(out, dim=1)


def make_xl_step(segment_len, *, grad_clip=1.0, reconstruction_weight=1.0):
    """A ``step_fn`` for ``effedu.train.train``: one optimiser step over the whole sequence, segment by segment.

    Each segment's loss (the summed cross-entropy of its scored positions / all scored positions of the batch) is
    back-propagated at once — the memory is detached, so a segment's graph ends with it (memory O(segment)); a
    :class:`CompressiveTransformer`'s reconstruction loss is added (× ``reconstruction_weight``). Returns the
    mean loss (a float)."""
    check_positive_int(segment_len, "segment_len", "make_xl_step")

    def xl_step(model, inputs, targets, optimizer):
        optimizer.zero_grad(set_to_none=True)
        n_scored = max(1, int((targets != IGNORE).sum()))
        mems, total = None, 0.0
        for s in range(0, inputs.shape[1], segment_len):
            logits, mems = model(inputs[:, s:s + segment_len], mems)
            tgt = targets[:, s:s + segment_len]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE,
                                   reduction="sum") / n_scored
            rec = getattr(model, "reconstruction_loss", None)
            objective = loss + (reconstruction_weight * rec if isinstance(rec, torch.Tensor) and rec.requires_grad
                                else 0.0)
            if objective.requires_grad and (bool((tgt != IGNORE).any()) or objective is not loss):
                objective.backward()
            total += float(loss.detach())
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return total

    return xl_step


# --------------------------------------------------------------------------------------------------------------
# Compressive Transformer
# --------------------------------------------------------------------------------------------------------------


def compress(mem, rate, how="mean", conv=None):
    """Compress ``mem (B, n, d)`` by ``rate`` c → ``(B, n / c, d)``: the mean or the max of each group of c
    consecutive states, or ``conv`` (an ``nn.Conv1d(d, d, kernel_size=c, stride=c)``) for ``how="conv"``."""
    where = "compress"
    check_int(rate, "compression_rate", where, minimum=1)
    check_choice(how, COMPRESSIONS, "compression", where)
    if not isinstance(mem, torch.Tensor) or mem.dim() != 3:
        raise ValueError(f"{where}: mem must be (B, n, d), got "
                         f"{tuple(mem.shape) if isinstance(mem, torch.Tensor) else type(mem).__name__}")
    B, n, d = mem.shape
    if n % rate:
        raise ValueError(f"{where}: the number of states n={n} must be divisible by compression_rate={rate}")
    if how == "conv":
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"{where}: how='conv' needs conv=nn.Conv1d(d, d, kernel_size=rate, stride=rate), got "
                            f"{type(conv).__name__}")
        return conv(mem.transpose(1, 2)).transpose(1, 2)  # (B, d, n) → (B, d, n/c) → (B, n/c, d)
    groups = mem.view(B, n // rate, rate, d)
    return groups.mean(2) if how == "mean" else groups.amax(2)


def attention_reconstruction_loss(attn, h, mem, compressed):
    """Rae et al. 2020's attention-reconstruction loss: ‖attn(h, mem) − attn(h, compressed)‖² (mean), content
    attention with the layer's query/key/value weights **detached** (and h, mem detached): its only gradient goes
    into ``compressed`` — the compression network learns to keep what the attention reads.

    ``attn``: a :class:`RelativeMultiHeadAttention` (its ``qkv`` weight is used); h ``(B, T, d)``, mem
    ``(B, n, d)``, compressed ``(B, n/c, d)``."""
    if not isinstance(attn, RelativeMultiHeadAttention):
        raise TypeError(f"attention_reconstruction_loss: attn must be a RelativeMultiHeadAttention, got "
                        f"{type(attn).__name__}")
    d = attn.d_model
    w_q, w_k, w_v = attn.qkv.weight.detach().split(d)
    q = attn._heads(F.linear(h.detach(), w_q))

    def read(m):
        return softmax_attention(q, attn._heads(F.linear(m, w_k)), attn._heads(F.linear(m, w_v)))

    return F.mse_loss(read(compressed), read(mem.detach()))


class CompressiveTransformer(TransformerXL):
    """Transformer-XL with a second, compressed memory (Rae et al. 2020).

    Per layer the memory is a pair ``(mem (B, ≤ mem_len, d), cmem (B, ≤ cmem_len, d))``; the layer attends to
    [cmem; mem; segment]. States pushed out of ``mem`` are compressed by ``compression_rate`` with ``compression``
    ("mean", "max" or "conv": one strided ``Conv1d`` per layer) and appended to ``cmem`` (oldest dropped). Both
    memories are detached. After a forward, ``reconstruction_loss`` holds the summed attention-reconstruction loss
    of the layers that compressed something with "conv" (None otherwise) — :func:`make_xl_step` adds it. The
    segment length and ``mem_len`` must be multiples of the rate (so that evictions come in whole groups).
    """

    def __init__(self, config, *, mem_len, cmem_len, compression_rate, compression="mean"):
        super().__init__(config, mem_len=mem_len)
        where = type(self).__name__
        check_int(cmem_len, "cmem_len", where, minimum=0)
        check_int(compression_rate, "compression_rate", where, minimum=1)
        check_choice(compression, COMPRESSIONS, "compression", where)
        if mem_len % compression_rate:
            raise ValueError(f"{where}: mem_len={mem_len} must be a multiple of compression_rate={compression_rate}")
        self.cmem_len, self.compression_rate, self.compression = cmem_len, compression_rate, compression
        self.convs = nn.ModuleList([nn.Conv1d(config.d_model, config.d_model, compression_rate, stride=compression_rate)
                                    for _ in range(config.n_layers)]) if compression == "conv" else None
        self.reconstruction_loss = None

    def _check_mems(self, mems, B):
        mems = super()._check_mems(mems, B)
        for m in mems:
            if m is not None and (not isinstance(m, (tuple, list)) or len(m) != 2):
                raise ValueError(f"{type(self).__name__}: each layer's memory must be a pair (mem, cmem)")
        return mems

    def _layer_memory(self, mem):
        return None if mem is None else torch.cat([mem[1], mem[0]], dim=1)  # [cmem; mem]

    def forward(self, tokens, mems=None):
        if tokens.dim() == 2 and tokens.shape[1] % self.compression_rate:
            raise ValueError(f"{type(self).__name__}: the segment length T={tokens.shape[1]} must be a multiple of "
                             f"compression_rate={self.compression_rate}")
        self.reconstruction_loss = None
        return super().forward(tokens, mems)

    def _update(self, index, mem, h):
        old, cmem = (None, None) if mem is None else mem
        full = h if old is None else torch.cat([old, h], dim=1)
        n_evict = max(0, full.shape[1] - self.mem_len)
        new_mem = full[:, n_evict:].detach()
        if cmem is None:
            cmem = h[:, :0].detach()
        if n_evict and self.cmem_len:
            evicted = full[:, :n_evict].detach()
            conv = None if self.convs is None else self.convs[index]
            c = compress(evicted, self.compression_rate, self.compression, conv)
            if conv is not None:
                block = self.blocks[index]
                ln = (lambda t: F.layer_norm(t, t.shape[-1:], block.ln1.weight.detach(), block.ln1.bias.detach(),
                                             block.ln1.eps))  # the layer's LN, detached: only the conv learns
                rec = attention_reconstruction_loss(block.attn, ln(h), ln(evicted), ln(c))
                self.reconstruction_loss = rec if self.reconstruction_loss is None else self.reconstruction_loss + rec
            cmem = torch.cat([cmem, c.detach()], dim=1)
            cmem = cmem[:, max(0, cmem.shape[1] - self.cmem_len):]
        return new_mem, cmem.detach()


# --------------------------------------------------------------------------------------------------------------
# Funnel Transformer
# --------------------------------------------------------------------------------------------------------------


def funnel_pool(x, stride, separate_cls=True):
    """Strided mean pooling along the sequence: ``x (B, T, d)`` → ``(B, T / stride, d)``; with ``separate_cls``
    the first position ([CLS]) is kept as it is and the other T − 1 are pooled → ``(B, 1 + (T − 1) / stride, d)``.
    The pooled length must divide exactly (ValueError otherwise)."""
    where = "funnel_pool"
    check_int(stride, "stride", where, minimum=1)
    check_bool(separate_cls, "separate_cls", where)
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{where}: x must be (B, T, d), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    cls, rest = (x[:, :1], x[:, 1:]) if separate_cls else (None, x)
    B, n, d = rest.shape
    if n == 0 or n % stride:
        what = "T − 1" if separate_cls else "T"
        raise ValueError(f"{where}: the pool stride={stride} must divide the pooled length {what}={n}")
    pooled = rest.reshape(B, n // stride, stride, d).mean(2)
    return pooled if cls is None else torch.cat([cls, pooled], dim=1)


def funnel_lengths(n, block_layers, stride, separate_cls=True):
    """The sequence length each block runs at, e.g. n=65, 3 blocks, stride 2, separate [CLS] → [65, 33, 17]."""
    lengths = [n]
    for _ in range(len(block_layers) - 1):
        rest = lengths[-1] - (1 if separate_cls else 0)
        if rest <= 0 or rest % stride:
            raise ValueError(f"funnel: the pool stride={stride} must divide the pooled length "
                             f"{'T − 1' if separate_cls else 'T'}={rest} (input length {n}, blocks {tuple(block_layers)})")
        lengths.append(rest // stride + (1 if separate_cls else 0))
    return lengths


class FunnelTransformer(nn.Module):
    """A Funnel encoder (Dai et al. 2020): ``len(block_layers)`` blocks, the sequence pooled by ``pool_stride``
    between them; the first layer of each later block attends from the pooled queries to the unpooled keys/values
    ("pool-query-only"). Non-causal (``config.causal`` is ignored), learned absolute positions, pre-LN.

    ``forward(tokens (N, L))`` → ``(N, V)`` from the first position of the last block ([CLS] with
    ``separate_cls``; the mean of the last block's positions without) — or, with ``upsample=True``, token-level
    logits ``(N, L, V)``: the last block's output repeated ``stride^(blocks−1)`` times plus the first block's output
    (the residual), through one more block at full length.
    """

    def __init__(self, config, *, block_layers=(1, 1, 1), pool_stride=2, separate_cls=True, upsample=False):
        super().__init__()
        where = type(self).__name__
        _check_config(config, where)
        if not isinstance(block_layers, (tuple, list)) or not block_layers:
            raise ValueError(f"{where}: block_layers must be a non-empty tuple of layer counts, got {block_layers!r}")
        for b in block_layers:
            check_int(b, "block_layers", where, minimum=1)
        check_int(pool_stride, "pool_stride", where, minimum=1)
        check_bool(separate_cls, "separate_cls", where)
        check_bool(upsample, "upsample", where)
        self.config = config.replace(causal=False)
        self.block_layers, self.pool_stride = tuple(block_layers), pool_stride
        self.separate_cls, self.upsample = separate_cls, upsample
        c = self.config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([nn.ModuleList([Block(c) for _ in range(n)]) for n in self.block_layers])
        self.up_block = Block(c) if upsample else None
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size)
        self.apply(init_weights)

    @staticmethod
    def _pooled_layer(block, x_q, x_kv):
        # pre-LN layer whose queries are pooled: x = x_q + MHA(LN(x_q), keys/values LN(x_kv)); x = x + FFN(LN(x))
        x = x_q + block.drop(block.attn(block.ln1(x_q), context=block.ln1(x_kv)))
        return x + block.drop(block.ffn(block.ln2(x)))

    def forward(self, tokens):
        _check_ids(tokens, self.config, type(self).__name__, self.config.max_len)
        N, L = tokens.shape
        funnel_lengths(L, self.block_layers, self.pool_stride, self.separate_cls)  # a clear error before any work
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(torch.arange(L, device=tokens.device)))
        first = None
        for b, layers in enumerate(self.blocks):
            for i, block in enumerate(layers):
                if b > 0 and i == 0:
                    x = self._pooled_layer(block, funnel_pool(x, self.pool_stride, self.separate_cls), x)
                else:
                    x = block(x)
            if b == 0:
                first = x
        if not self.upsample:
            summary = x[:, 0] if self.separate_cls else x.mean(1)
            return self.head(self.ln_f(summary))  # (N, V)
        return self.head(self.ln_f(self.up_block(first + self._upsample(x, L))))  # (N, L, V)

    def _upsample(self, x, L):
        """Repeat each pooled position stride^(blocks−1) times back to length L ([CLS] kept in place)."""
        factor = self.pool_stride ** (len(self.blocks) - 1)
        if self.separate_cls:
            return torch.cat([x[:, :1], x[:, 1:].repeat_interleave(factor, dim=1)], dim=1)
        return x.repeat_interleave(factor, dim=1)


# --------------------------------------------------------------------------------------------------------------
# Perceiver
# --------------------------------------------------------------------------------------------------------------


class Perceiver(nn.Module):
    """A Perceiver classifier (Jaegle et al. 2021): a learned latent array ``(n_latents, d)`` cross-attends to the
    embedded input (``n_cross`` cross-attention layers: latents are the queries, the n inputs the keys/values —
    O(n·m)), then ``n_self`` latent self-attention blocks (O(m²), independent of n); the head reads the mean latent.

    ``forward(tokens (N, L)) → (N, V)``. Learned absolute input positions (``config.max_len``), pre-LN.
    """

    def __init__(self, config, *, n_latents, n_cross=1, n_self=None):
        super().__init__()
        where = type(self).__name__
        _check_config(config, where)
        check_int(n_latents, "n_latents", where, minimum=1)
        check_int(n_cross, "n_cross", where, minimum=1)
        n_self = config.n_layers if n_self is None else n_self
        check_int(n_self, "n_self", where, minimum=0)
        self.config = c = config.replace(causal=False)
        self.n_latents, self.n_cross, self.n_self = n_latents, n_cross, n_self
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_len, c.d_model)
        self.latents = nn.Parameter(torch.randn(n_latents, c.d_model) * 0.02)
        self.drop = nn.Dropout(c.dropout)
        self.cross = nn.ModuleList([Block(c) for _ in range(n_cross)])
        self.ln_input = nn.LayerNorm(c.d_model)
        self.blocks = nn.ModuleList([Block(c) for _ in range(n_self)])
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size)
        self.apply(init_weights)

    def forward(self, tokens, *, return_weights=False):
        """``return_weights=True`` also returns the cross-attention weights ``(N, H, m, L)`` of the first layer."""
        _check_ids(tokens, self.config, type(self).__name__, self.config.max_len)
        N, L = tokens.shape
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(torch.arange(L, device=tokens.device)))
        ctx = self.ln_input(x)
        z = self.latents.unsqueeze(0).expand(N, -1, -1)
        first = None
        for block in self.cross:
            a = block.attn(block.ln1(z), context=ctx, return_weights=return_weights and first is None)
            if isinstance(a, tuple):
                a, first = a
            z = z + block.drop(a)
            z = z + block.drop(block.ffn(block.ln2(z)))
        for block in self.blocks:
            z = block(z)
        logits = self.head(self.ln_f(z.mean(1)))
        return (logits, first) if return_weights else logits


# --------------------------------------------------------------------------------------------------------------
# FLOPs (hand formulas, 2 per multiply-add, embeddings/biases/LN/softmax left out, as effedu.measure)
# --------------------------------------------------------------------------------------------------------------


def _layer(nq, nkv, d, d_ff):
    # Q and O on the nq queries, K and V on the nkv keys; scores and A·V: 2·nq·nkv·d each; FFN on the nq queries
    return 2 * 2 * nq * d * d + 2 * 2 * nkv * d * d + attention_flops(nq, d, s=nkv) + ffn_flops(nq, d, d_ff)


def dense_flops(n, d, *, n_layers=1, d_ff=None):
    """A dense encoder of ``n_layers`` layers at length n: O(n²·d) attention."""
    return n_layers * _layer(n, n, d, d_ff)


def perceiver_flops(n, m, d, *, n_cross=1, n_self=1, d_ff=None):
    """:class:`Perceiver`'s forward (without the head): cross-attention layers m × n, self-attention layers m × m.
    Linear in n: each extra input position costs 4·d² (its key and value) + 4·m·d (scores and A·V) per cross
    layer."""
    return n_cross * _layer(m, n, d, d_ff) + n_self * _layer(m, m, d, d_ff)


def funnel_flops(n, d, *, block_layers=(1, 1, 1), stride=2, separate_cls=True, d_ff=None):
    """:class:`FunnelTransformer`'s forward (without the head and the up-sampling block): each block at its pooled
    length; the first layer of a later block has pooled queries and unpooled keys/values."""
    lengths = funnel_lengths(n, block_layers, stride, separate_cls)
    total = 0
    for b, (layers, length) in enumerate(zip(block_layers, lengths)):
        for i in range(layers):
            total += _layer(length, lengths[b - 1] if (b > 0 and i == 0) else length, d, d_ff)
    return total


# --------------------------------------------------------------------------------------------------------------
# classification at the last position, and the chapter's needle task
# --------------------------------------------------------------------------------------------------------------


def last_targets(targets):
    """The label of each row: targets ``(N, L)`` with IGNORE everywhere but the last position → ``(N,)``."""
    if targets.dim() != 2:
        raise ValueError(f"last_targets: targets must be (N, L), got {tuple(targets.shape)}")
    return targets[:, -1]


def _class_loss(logits, targets):
    if logits.dim() == 2:
        return F.cross_entropy(logits, last_targets(targets), ignore_index=IGNORE), logits, last_targets(targets)
    flat_l, flat_t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return F.cross_entropy(flat_l, flat_t, ignore_index=IGNORE), flat_l, flat_t


def classify_step(model, inputs, targets, optimizer, grad_clip=1.0):
    """A ``step_fn`` for ``effedu.train.train`` that accepts ``(N, V)`` outputs (scored against the last position's
    label) as well as ``(N, L, V)`` (every scored position)."""
    optimizer.zero_grad(set_to_none=True)
    loss = _class_loss(model(inputs), targets)[0]
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def classifier_metrics(model, batch, *, segment_len=None):
    """``(loss, accuracy)`` on ``batch``: a ``(N, V)`` or ``(N, L, V)`` model, or a recurrent one run with
    :func:`evaluate_segments` when ``segment_len`` is given."""
    inputs, targets = batch
    was = model.training
    model.eval()
    logits = evaluate_segments(model, inputs, segment_len) if segment_len else model(inputs)
    model.train(was)
    loss, flat_l, flat_t = _class_loss(logits, targets)
    scored = flat_t != IGNORE
    return float(loss), float((flat_l.argmax(-1)[scored] == flat_t[scored]).float().mean())


QUERY = 0  # the needle task's query token; values are 1 … n_values, noise n_values + 1 …


def needle_batch(n, seq_len, *, n_values=8, n_noise=16, needle_span=None, seed=0):
    """A long-dependency task: noise tokens, one *value* token (the needle, 1 … n_values) at a position drawn
    from ``needle_span = (lo, hi)`` (default the first quarter), the query token 0 at the last position; the target
    there is the value (IGNORE elsewhere). Values never occur as noise: a model that sees the needle solves it, one
    that does not is at chance 1 / n_values. Returns ``(inputs, targets)`` ``(n, seq_len)`` int64; vocabulary
    ``1 + n_values + n_noise``."""
    where = "needle_batch"
    check_int(n, "n", where)
    check_int(seq_len, "seq_len", where, minimum=2)
    check_int(n_values, "n_values", where, minimum=2)
    check_int(n_noise, "n_noise", where)
    check_seed(seed, where)
    lo, hi = needle_span if needle_span is not None else (0, max(1, (seq_len - 1) // 4))
    if not (0 <= lo < hi <= seq_len - 1):
        raise ValueError(f"{where}: needle_span must satisfy 0 ≤ lo < hi ≤ seq_len − 1 = {seq_len - 1}, got "
                         f"{(lo, hi)}")
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1 + n_values, 1 + n_values + n_noise, (n, seq_len), generator=g)
    values = torch.randint(1, 1 + n_values, (n,), generator=g)
    pos = torch.randint(lo, hi, (n,), generator=g)
    inputs[torch.arange(n), pos] = values
    inputs[:, -1] = QUERY
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets[:, -1] = values
    return inputs, targets


def needle_vocab_size(n_values=8, n_noise=16):
    return 1 + n_values + n_noise


__all__ = ["sinusoid_positions", "rel_shift", "relative_attention", "RelativeMultiHeadAttention", "XLBlock",
           "TransformerXL", "evaluate_segments", "make_xl_step", "compress", "attention_reconstruction_loss",
           "CompressiveTransformer", "funnel_pool", "funnel_lengths", "FunnelTransformer", "Perceiver",
           "dense_flops", "perceiver_flops", "funnel_flops", "last_targets", "classify_step", "classifier_metrics",
           "needle_batch", "needle_vocab_size", "QUERY", "COMPRESSIONS"]
