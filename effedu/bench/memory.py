"""``python -m effedu.bench memory``: the memory-saving training techniques of chapters 02–04 and 06 side by side on
one model — bytes saved for backward, parameters, step time — and the targets of their memory models."""
from __future__ import annotations

from .. import measure
from ..general.checkpoint import checkpoint_model, predicted_activation_bytes, segment_plan
from ..general.precision import MixedPrecisionModel
from ..general.reversible import ReversibleTransformer
from ..general.sharing import share_layers
from ..model import Transformer, TransformerConfig
from ..train import lm_loss
from ._format import Column, Table
from ._progress import steps


def bench_memory(opts):
    """The memory-saving training techniques side by side on one model: activation bytes, parameters, step time."""
    import torch

    L, d, T, B, V = (4, 128, 128, 4, 67) if opts.quick else (12, 256, 512, 8, 67)
    cfg = TransformerConfig(vocab_size=V, d_model=d, n_heads=4, n_layers=L, d_ff=4 * d, max_len=T)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)

    def fresh(config=cfg):
        torch.manual_seed(0)
        return Transformer(config)

    def reversible(config=cfg):
        torch.manual_seed(0)
        return ReversibleTransformer(config)

    base_model = fresh()
    variants = {
        "plain": base_model,
        "checkpoint every layer": checkpoint_model(base_model, "every"),
        "checkpoint √L segments": checkpoint_model(base_model, "sqrt"),
        "reversible": reversible(),
        "bf16 compute + fp32 masters": MixedPrecisionModel(fresh(), torch.bfloat16),
        "ALBERT all-shared": share_layers(fresh(), "all"),
    }

    def step(model):
        model.zero_grad(set_to_none=True)
        lm_loss(model(tokens), targets).backward()

    rows = []
    for name in steps(variants, "memory", label=str):
        model = variants[name]
        rows.append({"variant": name, "saved_bytes": measure.saved_activation_bytes(model, tokens),
                     "parameters": measure.count_parameters(model),
                     "step_s": measure.time_it(step, model, warmup=1, repeat=3)})
    plain = rows[0]
    for row in rows:
        row["saved_vs_plain"] = row["saved_bytes"] / plain["saved_bytes"]
        row["time_vs_plain"] = row["step_s"] / plain["step_s"]
    by_name = {r["variant"]: r for r in rows}
    # targets of issue 3: the √L memory model from one and two plain layers
    one, two = (measure.saved_activation_bytes(fresh(cfg.replace(n_layers=n)), tokens) for n in (1, 2))
    a = two - one  # one layer, run plainly
    c = B * T * d * 4  # one checkpoint: a layer's input
    predicted = predicted_activation_bytes(segment_plan(L, "sqrt"), a, c, one - a)
    rev2 = measure.saved_activation_bytes(reversible(cfg.replace(n_layers=2)), tokens)
    values = {
        "sqrt_vs_model": by_name["checkpoint √L segments"]["saved_bytes"] / predicted - 1,
        "reversible_vs_2_layers": by_name["reversible"]["saved_bytes"] / rev2 - 1,
        "every_layer_time_vs_plain": by_name["checkpoint every layer"]["time_vs_plain"],
        "sqrt_time_vs_plain": by_name["checkpoint √L segments"]["time_vs_plain"],
    }
    notes = ["",
             f"target: √L checkpointing within 5% of the √L memory model → {values['sqrt_vs_model']:+.1%}",
             f"target: reversible {L} layers within 10% of 2 layers → {values['reversible_vs_2_layers']:+.1%}",
             f"target: checkpointing time overhead ≤ 1.5× → every layer "
             f"{values['every_layer_time_vs_plain']:.2f}×, √L {values['sqrt_time_vs_plain']:.2f}×",
             "saved act. = bytes saved for backward during the forward (measure.saved_activation_bytes); checkpointed "
             "variants recompute a segment at a time in backward (see chapter 02 for the peak)"]
    columns = [Column("variant", "variant", 30, "", align="<", sep=""),
               Column("saved_bytes", "saved act. MiB", 15, ".1f", 1 / 2**20),
               Column("saved_vs_plain", "vs plain", 9, ".1%"),
               Column("parameters", "parameters", 12, ",d"),
               Column("step_s", "step s", 8, ".2f"),
               Column("time_vs_plain", "vs plain", 9, ".2f", suffix="×")]
    title = f"training step, {L} layers, d={d}, T={T}, B={B}, float32 unless stated, {opts.threads} threads"
    return [Table(title, columns, rows, notes, values, rule=False)]
