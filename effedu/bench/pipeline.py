"""``python -m effedu.bench pipeline`` (chapter 05): GPipe over 2 processes (effedu) vs one process and vs
torch.distributed.pipelining — step time, measured vs predicted bubble, activation memory per stage."""
from __future__ import annotations

from .. import measure
from ..data import corpus_tokenizer, lm_batch, load_corpus
from ..general.microbatch import full_batch_gradients
from ..general.pipeline import run_pipelines, run_torch_pipeline
from ..model import Transformer, TransformerConfig
from . import num_threads
from ._format import Column, Table


def bench_pipeline(opts):
    """2-process GPipe (effedu) vs one process and vs torch.distributed.pipelining: step time, bubble, memory."""
    import torch

    tok = corpus_tokenizer()
    ids = tok.encode(load_corpus())
    d, L, B, T = (128, 4, 16, 64) if opts.quick else (256, 8, 32, 128)
    Ms = [1, 2, 4, 8] if opts.quick else [1, 2, 4, 8, 16]
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tok.vocab_size, d_model=d, n_heads=4, n_layers=L, d_ff=4 * d,
                                          max_len=T))
    batch = lm_batch(ids, B, T, seed=0)
    # one thread per pipeline process; the single-process reference gets one too (whatever --threads says)
    with num_threads(1):
        runs = run_pipelines(model, batch, [{"n_micro": M} for M in Ms] + [{"n_micro": 4, "remat": True}],
                             warmup=1, repeats=3 if opts.quick else 5, timeout=600)
        single = measure.time_it(lambda: full_batch_gradients(model, batch), warmup=1, repeat=3 if opts.quick else 5)
        torch_run = run_torch_pipeline(model, batch, 4, warmup=1, timeout=600)
    rows = [{"n_micro": r["n_micro"], "step_s": r["wall_time"], "vs_one_process": r["wall_time"] / single,
             "measured_bubble": r["measured_bubble"], "predicted_bubble": r["predicted_bubble"]} for r in runs[:-1]]
    plain = next(r for r in runs if r["n_micro"] == 4 and not r["remat"])
    remat = runs[-1]
    values = {"one_process_s": single, "remat_step_s": remat["wall_time"],
              "remat_vs_plain": remat["wall_time"] / plain["wall_time"],
              "plain_activation_peak_bytes": list(plain["activation_peak_bytes"]),
              "remat_activation_peak_bytes": list(remat["activation_peak_bytes"]),
              "torch_step_s": torch_run["time"], "effedu_vs_torch": plain["wall_time"] / torch_run["time"]}
    notes = [f"M=4 with rematerialisation: step {remat['wall_time'] * 1e3:.1f} ms "
             f"({values['remat_vs_plain']:.2f}× plain)",
             "M=4 peak activation bytes per stage (MiB): plain "
             + ", ".join(f"{b / 2**20:.2f}" for b in plain["activation_peak_bytes"]) + "; rematerialised "
             + ", ".join(f"{b / 2**20:.2f}" for b in remat["activation_peak_bytes"]),
             f"torch.distributed.pipelining ScheduleGPipe, M=4: {torch_run['time'] * 1e3:.1f} ms "
             f"(effedu / torch = {values['effedu_vs_torch']:.2f}×)"]
    columns = [Column("n_micro", "M", 3, "d", sep=""), Column("step_s", "step ms", 8, ".1f", 1e3, sep=" | "),
               Column("vs_one_process", "× 1 process", 11, ".2f", suffix="×", sep=" | "),
               Column("measured_bubble", "measured bubble", 15, ".1%", sep=" | "),
               Column("predicted_bubble", "(K-1)/(M+K-1)", 13, ".1%", sep=" | ")]
    title = (f"GPipe over 2 processes (gloo, 1 thread each), Transformer d={d} L={L}, batch {B}×{T}; one process "
             f"(1 thread, full batch): {single * 1e3:.1f} ms")
    return [Table(title, columns, rows, notes, values)]
