"""Chapter 20's heavy runs, precomputed: Transformer-XL's accuracy vs memory length on the needle task, and the
compute and memory of Funnel (vs pooling depth) and Perceiver (vs latents) against a dense encoder.

Notebook 20 must run in under a minute on two cores, so the runs behind its plots live here and are committed as
``data/results/architectural.json``; the notebook loads that file, plots it, and reproduces one point live::

    python -m effedu.general.architectural_sweep --threads 1           # → data/results/architectural.json
    python -m effedu.general.architectural_sweep --quick               # seconds (the unit test runs this)

* ``memory`` — :class:`~effedu.general.architectural.TransformerXL` trained on
  :func:`~effedu.general.architectural.needle_batch` sequences of ``n_segments`` segments, segment by segment
  (:func:`~effedu.general.architectural.make_xl_step`), with memories of 0, 1, 2, … segments and 1 or 2 layers;
  same seed, steps and batches for every run. The needle sits in the *first* segment, ≥ 1 segment before the query
  (in training and evaluation): with no memory the model cannot see it (chance, 1 / n_values), with a memory that
  reaches it, it can. ``reaches`` records whether the memory covers
  the first segment, counting that each layer's memory reaches ``mem_len`` further back (the effective context is
  about n_layers × mem_len, Dai et al. 2019 §3.2): a one-layer model needs 2 segments of memory, a two-layer one
  may get by with 1.
* ``cost`` — per sequence length n: forward FLOPs (hand formulas, checked against ``torch.utils.flop_counter`` in
  the tests) and peak memory of one forward with autograd (``effedu.measure.peak_memory``) of a dense encoder, of
  Funnel encoders with 1, 2, 3 poolings (same number of layers) and of Perceivers with several latent counts.

Peak memory and accuracies depend on the machine in their last digits: the notebook plots this file and asserts
only what it reproduces live.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import env_report
from ..measure import peak_memory
from ..model import TransformerConfig
from ..train import train
from . import architectural as A
from .sweeps import log_to_stderr, sweep_main, torch_threads

COMMAND = "python -m effedu.general.architectural_sweep"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "results" / "architectural.json"
SCHEMA_VERSION = 1

MEMORY = dict(segment_len=16, n_segments=3, mem_segments=(0, 1, 2), layers=(1, 2), d_model=32, n_heads=2, d_ff=64,
              n_values=8, n_noise=16, steps=150, batch=32, lr=3e-3, seed=0, n_eval=256)
MEMORY_QUICK = dict(MEMORY, segment_len=4, mem_segments=(0, 2), layers=(1,), steps=3, batch=4, n_eval=32)
COST = dict(ns=(257, 513, 1025), d_model=64, n_heads=4, d_ff=256, n_layers=4,
            funnel=((4,), (2, 2), (2, 1, 1), (1, 1, 1, 1)), latents=(16, 64, 256))
COST_QUICK = dict(COST, ns=(17, 33), d_model=16, n_heads=2, d_ff=32, funnel=((4,), (2, 2)), latents=(4,))


def sweep_memory(settings=MEMORY, log=None):
    """Accuracy on needles ≥ 1 segment before the query, per memory length (in segments)."""
    s = settings
    S, L = s["segment_len"], s["segment_len"] * s["n_segments"]
    V = A.needle_vocab_size(s["n_values"], s["n_noise"])
    val = A.needle_batch(s["n_eval"], L, n_values=s["n_values"], n_noise=s["n_noise"], needle_span=(0, S),
                         seed=10_000 + s["seed"])
    runs = []
    for n_layers, m in ((nl, m) for nl in s["layers"] for m in s["mem_segments"]):
        t0 = time.perf_counter()
        torch.manual_seed(s["seed"])
        cfg = TransformerConfig(vocab_size=V, d_model=s["d_model"], n_heads=s["n_heads"], n_layers=n_layers,
                                d_ff=s["d_ff"], max_len=S)
        model = A.TransformerXL(cfg, mem_len=m * S)

        def batch(step):
            return A.needle_batch(s["batch"], L, n_values=s["n_values"], n_noise=s["n_noise"],
                                  needle_span=(0, S), seed=s["seed"] * 100_000 + step)

        h = train(model, batch, steps=s["steps"], lr=s["lr"], seed=s["seed"], step_fn=A.make_xl_step(S),
                  progress=False)
        loss, acc = A.classifier_metrics(model, val, segment_len=S)
        runs.append({"n_layers": n_layers, "mem_segments": m, "mem_len": m * S,
                     "reaches": n_layers * m * S >= L - S, "accuracy": acc,
                     "val_loss": loss, "train_loss": h["loss"], "seconds": time.perf_counter() - t0})
        if log:
            log(f"{n_layers} layer(s), memory {m} segment(s): accuracy {acc:.3f} ({time.perf_counter() - t0:.0f} s)")
    return {"chance": 1 / s["n_values"], "seq_len": L, "runs": runs}


def _peak(model, n, vocab):
    tokens = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    model.eval()
    return int(peak_memory(lambda: model(tokens).sum())[0])


def sweep_cost(settings=COST, log=None):
    """FLOPs and peak forward memory per n for dense, Funnel (per block layout) and Perceiver (per latent count)."""
    s = settings
    d, dff, vocab = s["d_model"], s["d_ff"], 16
    cfg = TransformerConfig(vocab_size=vocab, d_model=d, n_heads=s["n_heads"], n_layers=s["n_layers"], d_ff=dff,
                            max_len=max(s["ns"]), causal=False)
    rows = []
    for n in s["ns"]:
        row = {"n": n, "dense": {"flops": A.dense_flops(n, d, n_layers=s["n_layers"], d_ff=dff)}, "funnel": [],
               "perceiver": []}
        torch.manual_seed(0)
        row["dense"]["peak_bytes"] = _peak(A.FunnelTransformer(cfg, block_layers=(s["n_layers"],)), n, vocab)
        for layout in s["funnel"]:
            torch.manual_seed(0)
            model = A.FunnelTransformer(cfg, block_layers=tuple(layout), pool_stride=2)
            row["funnel"].append({"block_layers": list(layout), "poolings": len(layout) - 1,
                                  "lengths": A.funnel_lengths(n, layout, 2),
                                  "flops": A.funnel_flops(n, d, block_layers=tuple(layout), d_ff=dff),
                                  "peak_bytes": _peak(model, n, vocab)})
        for m in s["latents"]:
            torch.manual_seed(0)
            model = A.Perceiver(cfg, n_latents=m, n_cross=1, n_self=s["n_layers"] - 1)
            row["perceiver"].append({"n_latents": m,
                                     "flops": A.perceiver_flops(n, m, d, n_cross=1, n_self=s["n_layers"] - 1,
                                                                d_ff=dff),
                                     "peak_bytes": _peak(model, n, vocab)})
        rows.append(row)
        if log:
            log(f"cost n={n}: dense {row['dense']['flops'] / 1e6:.0f} MFLOP")
    return rows


def run_sweep(quick=False, *, threads=None, log=None):
    """Both parts; returns the dict written to ``data/results/architectural.json``."""
    t0 = time.perf_counter()
    env = env_report(print_report=False)
    mem, cost = (MEMORY_QUICK, COST_QUICK) if quick else (MEMORY, COST)
    with torch_threads(threads):
        out = {"schema": SCHEMA_VERSION, "command": COMMAND + (" --quick" if quick else ""), "quick": quick,
               "env": env, "settings": {"memory": _jsonable(mem), "cost": _jsonable(cost)}}
        out["memory"] = sweep_memory(mem, log=log)
        out["cost"] = sweep_cost(cost, log=log)
    out["seconds"] = time.perf_counter() - t0
    return out


def _jsonable(d):
    return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
            for k, v in d.items()}


def load_results(path=None):
    """The committed results (``data/results/architectural.json``)."""
    import json
    return json.loads(Path(path or DEFAULT_OUT).read_text(encoding="utf-8"))


def main(argv=None):
    return sweep_main(argv, command=COMMAND, description=__doc__, default_out=DEFAULT_OUT,
                      run=lambda a: run_sweep(a.quick, threads=a.threads, log=log_to_stderr))


if __name__ == "__main__":
    main()


__all__ = ["run_sweep", "sweep_memory", "sweep_cost", "load_results", "main", "COMMAND", "DEFAULT_OUT",
           "SCHEMA_VERSION", "MEMORY", "MEMORY_QUICK", "COST", "COST_QUICK"]
