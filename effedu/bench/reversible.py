"""``python -m effedu.bench reversible`` (chapter 03): bytes saved for backward and training-step time of a plain
Transformer vs a reversible one, at 2 and 12 layers."""
from __future__ import annotations

from .. import measure
from ..general.reversible import ReversibleTransformer
from ..model import Transformer, TransformerConfig
from ._format import Column, Table
from ._progress import steps

DEPTHS = (2, 12)


def bench_reversible(opts):
    """Saved activation bytes and training-step time: plain Transformer vs reversible, 2 and 12 layers."""
    import torch

    B, T, d = (2, 128, 128) if opts.quick else (8, 512, 256)
    models = (("plain Transformer", Transformer), ("reversible (duplicate)", ReversibleTransformer))
    rows = []
    for L, (name, make) in steps([(L, m) for L in DEPTHS for m in models], "reversible",
                                 label=lambda x: f"{x[1][0]}, {x[0]} layers"):
        cfg = TransformerConfig(vocab_size=64, d_model=d, n_heads=4, n_layers=L, d_ff=4 * d, max_len=T)
        tokens = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        model = make(cfg)
        saved = measure.saved_activation_bytes(model, tokens)

        def step():
            model.zero_grad(set_to_none=True)
            model(tokens).float().pow(2).mean().backward()

        t = measure.time_it(step, warmup=1, repeat=3)
        t_plain = t if make is Transformer else rows[-1]["step_s"]
        rows.append({"model": name, "layers": L, "saved_bytes": saved, "step_s": t, "time_vs_plain": t / t_plain})
    saved = {(r["model"], r["layers"]): r["saved_bytes"] for r in rows}
    values = {"reversible_12_vs_2": saved["reversible (duplicate)", 12] / saved["reversible (duplicate)", 2],
              "plain_12_vs_2": saved["plain Transformer", 12] / saved["plain Transformer", 2]}
    columns = [Column("model", "model", 22, "", sep=""), Column("layers", "layers", 6, "d", sep=" | "),
               Column("saved_bytes", "saved MiB", 10, ".1f", 1 / 2**20, sep=" | "),
               Column("step_s", "fwd+bwd ms", 10, ".1f", 1e3, sep=" | "),
               Column("time_vs_plain", "time / plain", 12, ".2f", suffix="×", sep=" | ")]
    notes = ["", f"target: reversible saved bytes at 12 layers within 10% of 2 layers → ratio "
                 f"{values['reversible_12_vs_2']:.3f} (plain: {values['plain_12_vs_2']:.2f}×)"]
    title = (f"reversible layers: B={B} T={T} d={d} heads=4 d_ff={4 * d} float32, {opts.threads} threads; "
             f"saved = bytes autograd keeps for backward (effedu.measure)")
    return [Table(title, columns, rows, notes, values)]
