"""``python -m effedu.bench precision`` (chapter 06): mixed precision — bytes of activations, weights, gradients
and Adam state, and step time, of float32 / bfloat16 / float16 training."""
from __future__ import annotations

import copy
import functools

from .. import measure
from ..general.precision import (
    DynamicLossScaler,
    MixedPrecisionModel,
    cast_model,
    mixed_precision_step,
    training_bytes,
)
from ..model import Transformer, TransformerConfig
from ._format import Column, Table
from ._progress import steps


def bench_precision(opts):
    """Mixed precision: saved activation bytes, training bytes and step time of float32 / bfloat16 / float16."""
    import torch

    L, d, T, B = (2, 64, 64, 4) if opts.quick else (12, 256, 512, 8)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=d, n_heads=4, n_layers=L, d_ff=4 * d, max_len=T)
    base = Transformer(cfg)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (B, T), generator=gen)
    targets = torch.randint(0, 64, (B, T), generator=gen)
    variants = {
        "float32": (copy.deepcopy(base), None),
        "bfloat16 + fp32 masters": (MixedPrecisionModel(copy.deepcopy(base), torch.bfloat16), None),
        "float16 + fp32 masters + dyn. scaling": (MixedPrecisionModel(copy.deepcopy(base), torch.float16),
                                                  DynamicLossScaler()),
        "bfloat16 only (no masters)": (cast_model(base, torch.bfloat16), None),
    }
    rows = []
    for name in steps(variants, "precision", label=str):
        model, scaler = variants[name]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = functools.partial(mixed_precision_step, model, tokens, targets, opt, scaler=scaler)
        t = measure.time_it(step, warmup=1, repeat=3 if not opts.quick else 5)
        b = training_bytes(model, opt, tokens)
        rows.append({"variant": name, "activations_bytes": b["activations"], "weights_bytes": b["weights"],
                     "gradients_bytes": b["gradients"], "optimizer_bytes": b["optimizer state"], "step_s": t})
    for row in rows:
        row["activations_vs_fp32"] = row["activations_bytes"] / rows[0]["activations_bytes"]
        row["time_vs_fp32"] = row["step_s"] / rows[0]["step_s"]

    def mib(key, header, width):
        return Column(key, header, width, ".1f", 1 / 2**20, sep=" | ")

    columns = [Column("variant", "variant", 40, "", align="<", sep=""),
               mib("activations_bytes", "activations MiB", 15),
               Column("activations_vs_fp32", "vs fp32", 7, ".1%", sep=" | "),
               mib("weights_bytes", "weights MiB", 11), mib("gradients_bytes", "grads MiB", 9),
               mib("optimizer_bytes", "Adam MiB", 8), Column("step_s", "step ms", 8, ".1f", 1e3, sep=" | "),
               Column("time_vs_fp32", "time ×", 6, ".2f", suffix="×", sep=" | ")]
    title = (f"mixed precision: Transformer L={L}, d={d}, T={T}, B={B}, AdamW, {opts.threads} threads "
             f"(16-bit matmuls emulated on the CPU: float32 kernels, float16 / bfloat16 results)")
    notes = ["bf16/fp16 step times on a CPU depend on its 16-bit instructions; the memory columns do not."]
    return [Table(title, columns, rows, notes)]
