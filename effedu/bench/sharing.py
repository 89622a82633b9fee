"""``python -m effedu.bench sharing`` (chapter 04): ALBERT-style parameter sharing — parameters fall, FLOPs and
activation memory do not."""
from __future__ import annotations

from .. import measure
from ..general.sharing import SharedTransformer, albert_parameter_count
from ..model import TransformerConfig
from ..train import lm_loss
from ._format import Column, Table
from ._progress import steps

VARIANTS = {
    "plain": dict(share="none"),
    "ALBERT all-shared": dict(share="all"),
    "all-shared, E=64, tied head": dict(share="all", embedding_dim=64, tie_head=True),
    "attention-shared": dict(share="attention"),
    "FFN-shared": dict(share="ffn"),
    "shared-QK": dict(share="none", shared_qk=True),
}


def bench_sharing(opts):
    """ALBERT sharing: parameters fall, FLOPs and activation memory do not (12 layers, d=256, T=512, B=8)."""
    import torch

    L, d, T, B, V = (4, 128, 128, 2, 256) if opts.quick else (12, 256, 512, 8, 256)
    cfg = TransformerConfig(vocab_size=V, d_model=d, n_heads=8 if d >= 256 else 4, n_layers=L, d_ff=4 * d,
                            max_len=T)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    rows = []
    for name in steps(VARIANTS, "sharing", label=str):
        kw = VARIANTS[name]
        torch.manual_seed(0)
        model = SharedTransformer(cfg, **kw)

        def step():
            model.zero_grad(set_to_none=True)
            lm_loss(model(tokens), targets).backward()

        saved = measure.saved_activation_bytes(model, tokens)
        t = measure.time_it(step, warmup=1, repeat=3)
        rows.append({"variant": name, "parameters": measure.count_parameters(model),
                     "formula": albert_parameter_count(cfg, **kw), "saved_bytes": saved, "step_s": t,
                     "time_vs_plain": t / (rows[0]["step_s"] if rows else t)})
    columns = [Column("variant", "variant", 30, "", align="<", sep=""),
               Column("parameters", "params", 10, ","), Column("formula", "formula", 10, ","),
               Column("saved_bytes", "saved act. MiB", 15, ".1f", 1 / 2**20),
               Column("step_s", "step ms", 9, ".1f", 1e3), Column("time_vs_plain", "vs plain", 8, ".2f", suffix="×")]
    title = (f"parameter sharing, L={L} d={d} T={T} B={B} V={V} float32, {opts.threads} threads; "
             f"step = forward + backward")
    return [Table(title, columns, rows)]
