"""Time per generated token: how fast does each method *decode*? (survey §4.2 c, Katharopoulos et al. 2020)

A decoder makes one token at a time. After a context of t tokens, the next token costs

* **dense, recomputing the prefix** (what ``Transformer.generate`` does): a full forward over all t tokens,
  O(t²·d) per token — every key and value of the prefix is computed again, every time;
* **dense with a KV cache**: the keys and values of the prefix are kept, one per layer and position; the new
  token computes its own q, k, v and attends with one query row over the t cached keys: O(t·d) per token and
  O(t·d·L) memory that grows with the text;
* **sliding-window local attention with a window cache**: causal ``local`` attention with window w sees only the
  last ⌊w/2⌋ + 1 positions (itself included), so a ring buffer of that many keys and values is all it keeps:
  O(w·d) per token and memory, independent of t;
* **linear attention as an RNN** (``RecurrentLinearAttention``): the state S = Σ φ(k_j) v_jᵀ (M × Dv) and
  z = Σ φ(k_j) per head, O(M·Dv) per token and memory, independent of t — "Transformers are RNNs".

Everything here reuses the model's own weights (``effedu.model.Transformer``, pre-LN, causal); the cached
decoders (:class:`KVCacheDecoder`, :class:`RecurrentDecoder`) are written from tensor ops, and the tests check
that their logits equal the full forward's last row (float64, 1e-10).

``run_decoding(quick=False)`` measures ms per token (median over ``n_tokens`` generated tokens) and the peak
memory of the cache/state plus one step, for contexts 256, 1024, 4096 — the ``decode`` section of the capstone
results file.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from ..attention.kernelized import DEFAULT_EPS, RecurrentLinearAttention, elu_feature_map
from ..measure import peak_memory
from ..model import Transformer, TransformerConfig

MIB = 2 ** 20

# settings of the measurement (full / quick)
FULL = dict(contexts=(256, 1024, 4096), d_model=64, n_heads=4, n_layers=4, d_ff=256, vocab_size=64, window=128,
            n_tokens=16, warmup=2, batch_size=1, seed=0, budget_s=3.0)
QUICK = dict(contexts=(32, 64), d_model=32, n_heads=2, n_layers=2, d_ff=64, vocab_size=32, window=16,
             n_tokens=4, warmup=1, batch_size=1, seed=0, budget_s=1.0)

# method → (attention of the model, chapter, note)
METHODS = {
    "dense (recompute)": ("dense", 1, "Transformer.generate: a full forward over the whole prefix for every token"),
    "dense + KV cache": ("dense", 21, "keys and values of every layer kept; one query row per token (O(t) memory)"),
    "local window cache": ("local", 15, "causal sliding window: a ring buffer of the last ⌊w/2⌋+1 keys/values"),
    "linear RNN": ("linear", 18, "linear attention's recurrent form: state S, z of fixed size (O(1) in t)"),
}


def _check_model(model, where):
    if not isinstance(model, Transformer):
        raise TypeError(f"{where}: model must be an effedu.model.Transformer, got {type(model).__name__}")
    cfg = model.config
    if not cfg.causal:
        raise ValueError(f"{where}: model must be a causal decoder (config.causal=True)")
    if cfg.norm_kind != "pre":
        raise ValueError(f"{where}: only the pre-LN layout is supported, got norm={cfg.norm_kind!r}")
    for i, block in enumerate(model.blocks):
        if not block.attn.gate_is_untouched():
            raise ValueError(f"{where}: block {i} has a head gate (pruned heads) — not supported here")
    return cfg


def _check_tokens_1d(tokens, name, where):
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
        raise TypeError(f"{where}: {name} must be an int64 tensor, got "
                        f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")


class _CachedDecoder:
    """Shared machinery: run the blocks on new positions, attending to cached past keys/values."""

    where = "decoder"

    def __init__(self, model):
        self.model = model
        self.config = _check_model(model, self.where)
        self.t = 0

    # one block on the new positions x (B, n, d); self._attend does the attention on (B, H, n, Dh)
    def _block(self, i, block, x):
        attn = block.attn
        h = block.ln1(x)
        # [q; k; v] = h W_qkvᵀ + b                                             (B, n, 3·H·Dh)
        q, k, v = attn.qkv(h).split(attn.inner_dim, dim=-1)
        B, n, _ = x.shape
        # (B, n, H·Dh) → (B, H, n, Dh)
        q, k, v = (t.view(B, n, attn.n_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
        out = self._attend(i, q, k, v)  # (B, H, n, Dh)
        H, Dh = out.shape[1], out.shape[3]
        x = x + attn.proj(out.transpose(1, 2).reshape(B, n, H * Dh))
        # x = x + FFN(LN(x))
        return x + block.ffn(block.ln2(x))

    def _run(self, tokens):
        cfg = self.config
        B, n = tokens.shape
        if self.t + n > cfg.max_len:
            raise ValueError(f"{self.where}: position {self.t + n - 1} is past max_len={cfg.max_len}")
        pos = torch.arange(self.t, self.t + n, device=tokens.device)
        x = self.model.tok_emb(tokens) + self.model.pos_emb(pos)  # (B, n, d)
        for i, block in enumerate(self.model.blocks):
            x = self._block(i, block, x)
        self.t += n
        return self.model.logits(x[:, -1])  # (B, vocab)

    @torch.no_grad()
    def prefill(self, prompt, capacity=None):
        """Read ``prompt (B, T0)`` in one pass (filling the cache); returns the last position's logits (B, vocab).
        ``capacity``: how many positions the cache must hold in all (default: max_len)."""
        where = f"{self.where}.prefill"
        _check_tokens_1d(prompt, "prompt", where)
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"{where}: prompt must be (B, T0) with T0 ≥ 1, got {tuple(prompt.shape)}")
        capacity = self.config.max_len if capacity is None else capacity
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < prompt.shape[1]:
            raise ValueError(f"{where}: capacity must be an int ≥ the prompt length {prompt.shape[1]}, "
                             f"got {capacity!r}")
        self.t = 0
        self._allocate(prompt.shape[0], capacity, prompt.device)
        return self._run(prompt)

    @torch.no_grad()
    def step(self, token):
        """One new token ``(B,)`` (or ``(B, 1)``) → the logits of the next one ``(B, vocab)``."""
        where = f"{self.where}.step"
        _check_tokens_1d(token, "token", where)
        if self.t == 0:
            raise ValueError(f"{where}: call prefill(prompt) first")
        return self._run(token.reshape(-1, 1))


class KVCacheDecoder(_CachedDecoder):
    """Dense softmax attention with a KV cache (``window=None``), or causal local attention with a ring buffer of
    the last ⌊window/2⌋ + 1 keys and values (``window=w``, the model's ``local`` attention with that window).

    Per layer the cache holds K, V ``(B, H, C, Dh)``: C = capacity (dense) or ⌊w/2⌋ + 1 (window). A new token's
    query attends to the cached keys, itself included: softmax(q Kᵀ/√Dh) V — one row, O(C·Dh) per head.
    """

    where = "KVCacheDecoder"

    def __init__(self, model, *, window=None):
        super().__init__(model)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"{self.where}: window must be a positive int or None, got {window!r}")
        self.window = window
        self.k = self.v = None

    def _allocate(self, B, capacity, device):
        ref = self.model.head.weight
        size = capacity if self.window is None else min(capacity, self.window // 2 + 1)
        self.size = size
        shapes = [(B, blk.attn.n_heads, size, blk.attn.head_dim) for blk in self.model.blocks]
        self.k = [torch.zeros(s, dtype=ref.dtype, device=device) for s in shapes]
        self.v = [torch.zeros(s, dtype=ref.dtype, device=device) for s in shapes]

    def state_bytes(self):
        """Bytes of the cache (every layer's K and V)."""
        return 0 if self.k is None else sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _attend(self, i, q, k, v):
        B, H, n, Dh = q.shape
        t0 = self.t  # absolute position of q's first row
        scale = 1.0 / math.sqrt(Dh)
        if self.window is None:
            if t0 + n > self.size:
                raise ValueError(f"{self.where}: cache full ({self.size} positions); give prefill a larger capacity")
            self.k[i][:, :, t0:t0 + n] = k
            self.v[i][:, :, t0:t0 + n] = v
            K, V = self.k[i][:, :, :t0 + n], self.v[i][:, :, :t0 + n]  # (B, H, t0+n, Dh)
            # scores = q Kᵀ/√Dh, causal: query t0+a sees keys j ≤ t0+a                       (B, H, n, t0+n)
            s = (q @ K.transpose(-2, -1)) * scale
            if n > 1:
                j = torch.arange(t0 + n, device=q.device)
                allowed = j.view(1, -1) <= (t0 + torch.arange(n, device=q.device)).view(-1, 1)
                s = s.masked_fill(~allowed, float("-inf"))
            return torch.softmax(s, dim=-1) @ V
        half = self.window // 2
        if n > 1:
            # prefill (cache empty): causal local attention over the prompt itself, |i − j| ≤ ⌊w/2⌋ and j ≤ i
            idx = torch.arange(n, device=q.device)
            d = idx.view(-1, 1) - idx.view(1, -1)
            allowed = (d >= 0) & (d <= half)
            s = ((q @ k.transpose(-2, -1)) * scale).masked_fill(~allowed, float("-inf"))
            out = torch.softmax(s, dim=-1) @ v
            # keep the last ⌊w/2⌋+1 positions in the ring buffer, slot = position mod size
            for p in range(max(0, n - self.size), n):
                self.k[i][:, :, p % self.size] = k[:, :, p]
                self.v[i][:, :, p % self.size] = v[:, :, p]
            return out
        # one new position t0: write slot t0 mod size; the buffer then holds positions max(0, t0−⌊w/2⌋) … t0
        self.k[i][:, :, t0 % self.size] = k[:, :, 0]
        self.v[i][:, :, t0 % self.size] = v[:, :, 0]
        filled = min(t0 + 1, self.size)  # slots 0 … filled−1 hold valid positions (order does not matter)
        K, V = self.k[i][:, :, :filled], self.v[i][:, :, :filled]
        s = (q @ K.transpose(-2, -1)) * scale  # (B, H, 1, filled)
        return torch.softmax(s, dim=-1) @ V


class RecurrentDecoder(_CachedDecoder):
    """Causal linear attention (φ = elu + 1, the model's ``linear`` attention) as an RNN: per layer one
    ``RecurrentLinearAttention`` whose state S (B, H, M, Dv) and z (B, H, M) does not grow with the text."""

    where = "RecurrentDecoder"

    def __init__(self, model, *, eps=DEFAULT_EPS):
        super().__init__(model)
        self.eps = eps
        self.rnns = None

    def _allocate(self, B, capacity, device):
        self.rnns = [RecurrentLinearAttention(feature_map=elu_feature_map, eps=self.eps) for _ in self.model.blocks]

    def state_bytes(self):
        """Bytes of every layer's state S and z: the same at every position."""
        return 0 if self.rnns is None else sum(r.state_bytes() for r in self.rnns)

    def _attend(self, i, q, k, v):
        rnn = self.rnns[i]
        n = q.shape[2]
        if n == 1:
            return rnn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0]).unsqueeze(2)
        # prefill: the prompt's outputs by the causal prefix sums, the state = the sums over the whole prompt
        fq, fk = elu_feature_map(q), elu_feature_map(k)
        # S_i = Σ_{j≤i} φ(k_j) v_jᵀ, z_i = Σ_{j≤i} φ(k_j)                       (B, H, n, M, Dv), (B, H, n, M)
        S = torch.cumsum(fk.unsqueeze(-1) * v.unsqueeze(-2), dim=2)
        z = torch.cumsum(fk, dim=2)
        num = (fq.unsqueeze(-2) @ S).squeeze(-2)
        den = (fq * z).sum(-1, keepdim=True)
        rnn.reset()
        rnn.S, rnn.z, rnn.t = S[:, :, -1].clone(), z[:, :, -1].clone(), n
        return num / (den + rnn.eps)


class RecomputeDecoder:
    """What ``Transformer.generate`` does: every step runs the model over the whole prefix (no cache)."""

    where = "RecomputeDecoder"

    def __init__(self, model):
        if not isinstance(model, Transformer):
            raise TypeError(f"{self.where}: model must be an effedu.model.Transformer, got {type(model).__name__}")
        self.model = model
        self.tokens = None

    def state_bytes(self):
        return 0 if self.tokens is None else self.tokens.numel() * self.tokens.element_size()

    @torch.no_grad()
    def prefill(self, prompt, capacity=None, *, logits=True):
        """Keep ``prompt``; its last logits (``logits=False``: skip that forward and return None)."""
        _check_tokens_1d(prompt, "prompt", f"{self.where}.prefill")
        self.tokens = prompt
        return self.model(prompt[:, -self.model.config.max_len:])[:, -1] if logits else None

    @torch.no_grad()
    def step(self, token):
        _check_tokens_1d(token, "token", f"{self.where}.step")
        if self.tokens is None:
            raise ValueError(f"{self.where}.step: call prefill(prompt) first")
        self.tokens = torch.cat([self.tokens, token.reshape(-1, 1)], dim=1)
        return self.model(self.tokens[:, -self.model.config.max_len:])[:, -1]


def make_decoder(method, model, *, window=None):
    """The decoder of ``method`` (a key of :data:`METHODS`) on ``model``."""
    if method == "dense (recompute)":
        return RecomputeDecoder(model)
    if method == "dense + KV cache":
        return KVCacheDecoder(model)
    if method == "local window cache":
        return KVCacheDecoder(model, window=window)
    if method == "linear RNN":
        return RecurrentDecoder(model)
    raise ValueError(f"make_decoder: method must be one of {list(METHODS)}, got {method!r}")


def build_model(attention, s, *, max_len):
    """The small causal decoder of settings ``s`` with ``attention`` (seeded: the same weights for every method)."""
    kwargs = {"window": s["window"]} if attention == "local" else {}
    torch.manual_seed(s["seed"])
    cfg = TransformerConfig(vocab_size=s["vocab_size"], d_model=s["d_model"], n_heads=s["n_heads"],
                            n_layers=s["n_layers"], d_ff=s["d_ff"], max_len=max_len, causal=True,
                            attention=attention, attention_kwargs=kwargs)
    return Transformer(cfg).eval()


def measure_method(method, context, s, *, model=None):
    """One row: ms per token (median over up to s["n_tokens"] tokens after a warm-up) and peak MiB of the
    cache/state plus one step, after a random prompt of ``context`` tokens.

    The tokens fed are a fixed random continuation (teacher forcing: the same cost as greedy decoding, and the
    same tokens for every method). The first warm-up step runs under ``measure.peak_memory`` (its step peak);
    a slow method (dense recomputing a long prefix: seconds per token) stops measuring once s["budget_s"]
    seconds are spent, after at least one token: the row says how many it measured (``n_tokens``)."""
    attention, chapter, note = METHODS[method]
    n_steps = s["warmup"] + s["n_tokens"]
    total = context + n_steps
    model = build_model(attention, s, max_len=total) if model is None else model
    gen = torch.Generator().manual_seed(s["seed"] + context)
    tokens = torch.randint(0, s["vocab_size"], (s["batch_size"], total), generator=gen)
    dec = make_decoder(method, model, window=s["window"])
    dec.prefill(tokens[:, :context], capacity=total, **({"logits": False} if method == "dense (recompute)" else {}))
    # warm-up; the first step under the memory meter (one step only when a step is slow: > 0.5 s)
    pos = context
    t0 = time.perf_counter()
    step_peak, _ = peak_memory(dec.step, tokens[:, pos])
    slow = time.perf_counter() - t0 > 0.5
    pos += 1
    for _ in range(s["warmup"] - 1 if not slow else 0):
        dec.step(tokens[:, pos])
        pos += 1
    times = []
    for _ in range(s["n_tokens"]):
        t0 = time.perf_counter()
        dec.step(tokens[:, pos])
        times.append(time.perf_counter() - t0)
        pos += 1
        if sum(times) > s["budget_s"]:
            break
    # memory: what the decoder holds (cache/state) + the peak of one step above it
    peak_mib = (dec.state_bytes() + step_peak) / MIB
    return {"method": method, "context": int(context), "ms_per_token": 1e3 * statistics.median(times),
            "peak_mib": float(peak_mib), "chapter": chapter, "note": note,
            "state_mib": dec.state_bytes() / MIB, "n_tokens": len(times)}


def run_decoding(quick=False, *, log=None, threads=None):
    """The ``decode`` section of the capstone results: one row per (method, context).

    ``quick``: tiny model and contexts (32, 64), 4 tokens (seconds). ``log``: a callable taking a line of progress.
    ``threads``: torch threads for the measurement (restored afterwards)."""
    if not isinstance(quick, bool):
        raise TypeError(f"run_decoding: quick must be a bool, got {type(quick).__name__}")
    if log is not None and not callable(log):
        raise TypeError(f"run_decoding: log must be callable or None, got {type(log).__name__}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"run_decoding: threads must be a positive int or None, got {threads!r}")
    s = dict(QUICK if quick else FULL)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    rows = []
    try:
        total = max(s["contexts"]) + s["warmup"] + s["n_tokens"]
        models = {att: build_model(att, s, max_len=total) for att in {a for a, _, _ in METHODS.values()}}
        for context in s["contexts"]:
            for method, (att, _, _) in METHODS.items():
                row = measure_method(method, context, s, model=models[att])
                rows.append(row)
                if log is not None:
                    log(f"decode: {method:<20} t={context:<5} {row['ms_per_token']:8.2f} ms/token "
                        f"{row['peak_mib']:8.2f} MiB")
    finally:
        torch.set_num_threads(old_threads)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
    settings.update(threads=threads if threads is not None else old_threads, dtype="float32", device="cpu",
                    tokens="fixed random continuation (teacher forced)", seconds=time.perf_counter() - t_start,
                    timing="median over up to n_tokens steps after warmup (stops after budget_s seconds); "
                           "peak = cache/state + the first warm-up step's peak")
    return {"settings": settings, "rows": rows}


__all__ = ["KVCacheDecoder", "RecurrentDecoder", "RecomputeDecoder", "make_decoder", "build_model",
           "measure_method", "run_decoding", "METHODS", "FULL", "QUICK"]
