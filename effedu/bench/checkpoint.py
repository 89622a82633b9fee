"""``python -m effedu.bench checkpoint`` (chapter 02): gradient checkpointing — bytes saved for backward and step
time of plain / every layer / √L segments, against torch.utils.checkpoint, and the memory model's prediction."""
from __future__ import annotations

import time

import torch.nn as nn
import torch.utils.checkpoint as tuc

from .. import measure
from ..general.checkpoint import CheckpointedTransformer, predicted_activation_bytes, segment_plan
from ..model import Transformer, TransformerConfig
from ._format import Column, Table
from ._progress import steps


class TorchEveryLayer(nn.Module):
    """The oracle: ``model`` with torch.utils.checkpoint around every block but the last."""

    def __init__(self, model, *, reentrant):
        super().__init__()
        self.model, self.reentrant = model, reentrant

    def forward(self, tokens):
        m = self.model
        x = m.embed_tokens(tokens)
        for i, blk in enumerate(m.blocks):
            x = tuc.checkpoint(blk, x, use_reentrant=self.reentrant) if i < len(m.blocks) - 1 else blk(x)
        return m.logits(x)


def bench_checkpoint(opts):
    """Gradient checkpointing: saved activation bytes and step time of plain / every layer / √L vs torch."""
    import torch

    L, d, T, B = (9, 32, 32, 2) if opts.quick else (12, 256, 512, 8)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=d, n_heads=4, n_layers=L, d_ff=4 * d, max_len=T)
    model = Transformer(cfg)
    tokens = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))
    every, sqrt = "effedu every layer", f"effedu √L {segment_plan(L, 'sqrt')}"
    variants = {
        "plain": model,
        every: CheckpointedTransformer(model, "every"),
        sqrt: CheckpointedTransformer(model, "sqrt"),
        "torch.utils.checkpoint every layer (reentrant)": TorchEveryLayer(model, reentrant=True),
        "torch.utils.checkpoint every layer (non-reentrant)": TorchEveryLayer(model, reentrant=False),
    }
    names = list(variants)

    def step(fn):
        model.zero_grad(set_to_none=True)
        fn(tokens).float().pow(2).mean().backward()

    saved = {name: measure.saved_activation_bytes(fn, tokens) for name, fn in variants.items()}
    # time: each variant in turn (one untimed step first, so the allocator settles on that variant's memory —
    # interleaving single steps favours whichever variant follows a bigger one), rounds in forward then reverse
    # order, the fastest step per variant: robust to other work on the machine
    rounds, repeat = 2, (3 if opts.quick else 2)
    order = [(r, name) for r in range(rounds) for name in (names if r % 2 == 0 else names[::-1])]
    times = {name: [] for name in names}
    for _, name in steps(order, "checkpoint", label=lambda x: f"round {x[0] + 1}: {x[1]}"):
        step(variants[name])
        for _ in range(repeat):
            t0 = time.perf_counter()
            step(variants[name])
            times[name].append(time.perf_counter() - t0)
    best = {name: min(ts) for name, ts in times.items()}
    rows = [{"variant": name, "saved_bytes": saved[name], "saved_vs_plain": saved[name] / saved["plain"],
             "step_s": best[name], "time_vs_plain": best[name] / best["plain"]} for name in names]
    # the memory model from the plain model at two depths: a = one layer, base = the rest, c = one checkpoint
    one = Transformer(cfg.replace(n_layers=1))
    one.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not k.startswith("blocks.") or k.startswith("blocks.0.")})
    b1 = measure.saved_activation_bytes(one, tokens)
    a = (saved["plain"] - b1) // (L - 1)
    base, c = b1 - a, B * T * d * 4
    notes, values = [""], {}
    for name, strategy in ((every, "every"), (sqrt, "sqrt")):
        pred = predicted_activation_bytes(segment_plan(L, strategy), a, c, base)
        values[f"{strategy}_predicted_bytes"] = pred
        values[f"{strategy}_vs_model"] = (saved[name] - pred) / pred
        notes.append(f"{name}: measured {saved[name] / 2**20:.2f} MiB, predicted base + (k−1)·c + |last|·a = "
                     f"{pred / 2**20:.2f} MiB ({values[f'{strategy}_vs_model']:+.1%})")
    values.update(every_time_vs_plain=best[every] / best["plain"], sqrt_time_vs_plain=best[sqrt] / best["plain"],
                  torch_time_vs_plain=best[names[4]] / best["plain"])
    notes.append(f"time overhead (target ≤ 1.5×, one extra forward): every layer "
                 f"{values['every_time_vs_plain']:.2f}×, √L {values['sqrt_time_vs_plain']:.2f}×, "
                 f"torch non-reentrant {values['torch_time_vs_plain']:.2f}×")
    width = max(len(n) for n in names)
    columns = [Column("variant", "variant", width, "", align="<", sep=""),
               Column("saved_bytes", "saved MiB", 9, ".1f", 1 / 2**20, sep=" | "),
               Column("saved_vs_plain", "vs plain", 8, ".1%", sep=" | "),
               Column("step_s", "step ms", 8, ".1f", 1e3, sep=" | "),
               Column("time_vs_plain", "time ×", 6, ".2f", suffix="×", sep=" | ")]
    title = (f"gradient checkpointing: Transformer L={L}, d={d}, T={T}, B={B}, float32, {opts.threads} threads; "
             f"time = fastest of {rounds * repeat} forward+backward steps")
    return [Table(title, columns, rows, notes, values)]
