"""Chapter 16's heavy runs, precomputed: time and memory of LSH attention vs n, and accuracy on the needle task.

Notebook 16 must run in under a minute on two cores, so its scaling curves and its accuracy bars come from this
file, committed as ``data/results/learned_sparse.json``; the notebook loads it, plots it and reproduces one point
live. Regenerate it with one command (a few minutes on 2 quiet cores)::

    python -m effedu.general.learned_sparse_sweep --threads 1          # → data/results/learned_sparse.json
    python -m effedu.general.learned_sparse_sweep --quick              # seconds: the unit test runs this

Two parts, built on the chapter's modules (nothing here re-implements an attention):

* ``scaling`` — forward time (median) and extra memory (peak bytes above the inputs, torch profiler) of one
  non-causal attention layer (B=1, H=4, d=64, float32) vs n ∈ {512 … 8192} for: Reformer LSH attention
  (:func:`effedu.attention.lsh.lsh_attention`, numba kernel, ``n_buckets = n / chunk_size``, 2 rounds, chunks of 64),
  dense SDPA (``F.scaled_dot_product_attention``, the fused kernel) and the block-sparse local kernel of chapter 15
  (:func:`effedu.attention.sparse.local_attention` with ``block_size=64``, numba). Also the crossover n (the
  smallest n from which LSH's forward beats SDPA's; None when it never does).
* ``accuracy`` — a small causal :class:`~effedu.model.Transformer` per attention variant (dense, local, lsh,
  routing, sinkhorn, entmax, sparsebert) trained with the same steps, batches, learning rate and seeds on the needle
  task (:func:`effedu.data.long_range.make_needle` with ``hops=1``: one value token early in 128 key tokens); the validation accuracy during training, the final one, and for
  sparsebert the density of its learned mask during training. The chance level (1 / n_values) is recorded.

Trained accuracies and timings depend on the machine: the notebook prints them from this file (the same on every
machine) and asserts only claims it re-checks live.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import env_report, measure
from ..model import Transformer, TransformerConfig
from ..train import default_step, evaluate, train
from .sweeps import log_to_stderr, sweep_main, torch_numba_threads

COMMAND = "python -m effedu.general.learned_sparse_sweep"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "results" / "learned_sparse.json"
SCHEMA_VERSION = 1

METHODS = ("lsh", "sdpa", "local")  # the scaling part
VARIANTS = ("dense", "local", "lsh", "routing", "sinkhorn", "entmax", "sparsebert")  # the accuracy part

SCALING = dict(ns=(512, 1024, 2048, 4096, 8192), B=1, H=4, D=64, chunk_size=64, n_rounds=2, window=256,
               block_size=64, repeat=3)
SCALING_QUICK = dict(SCALING, ns=(128, 256), H=2, D=16, chunk_size=32, window=64, block_size=32, repeat=1)

ACCURACY = dict(task="needle", hops=1, n_keys=16, depth=0.25, seq_len=128, n_values=8, steps=400, batch_size=16,
                lr=3e-3, seeds=(0, 1), d_model=32, n_heads=2, n_layers=2, n_val=128, eval_every=50, val_seed=10_000,
                aux_weight=1.0)
ACCURACY_QUICK = dict(ACCURACY, seq_len=64, steps=3, batch_size=4, d_model=16, n_heads=2, n_layers=1, n_val=16,
                      eval_every=1)


def variant_kwargs(name, seq_len):
    """The attention keyword arguments of each variant in the accuracy part, for sequences of ``seq_len``."""
    chunk = max(8, seq_len // 8)
    return {
        "dense": {},
        "local": {"window": chunk},
        "lsh": {"n_buckets": 8, "n_rounds": 2, "chunk_size": chunk},
        "routing": {"n_clusters": 4},
        "sinkhorn": {"block_size": chunk},
        "entmax": {"alpha": 1.5},
        "sparsebert": {"init": 0.5, "sparsity": 0.1},
    }[name]


def _lsh():
    from ..attention.lsh import lsh_attention
    return lsh_attention


def scaling_paths(n, settings):
    """``{method: fn(q, k, v)}`` at sequence length ``n`` (see the module docstring)."""
    from ..attention.sparse import local_attention

    lsh_attention = _lsh()
    c = settings["chunk_size"]
    n_buckets = max(2, 2 * (n // c // 2))
    return {
        "lsh": lambda q, k, v: lsh_attention(q, None, v, n_buckets=n_buckets, n_rounds=settings["n_rounds"],
                                             chunk_size=c, backend="numba"),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "local": lambda q, k, v: local_attention(q, k, v, window=settings["window"],
                                                 block_size=settings["block_size"], backend="numba"),
    }


def sweep_scaling(settings=SCALING, log=None):
    """``{"n": [...], "time_s": {method: [...]}, "bytes": {method: [...]}, "crossover_n": int | None}``."""
    gen = torch.Generator().manual_seed(0)
    s = settings
    out = {"n": list(s["ns"]), "time_s": {m: [] for m in METHODS}, "bytes": {m: [] for m in METHODS}}
    for n in s["ns"]:
        q, k, v = (torch.randn(s["B"], s["H"], n, s["D"], generator=gen) for _ in range(3))
        t0 = time.perf_counter()
        for name, fn in scaling_paths(n, s).items():
            with torch.no_grad():
                out["time_s"][name].append(measure.time_it(fn, q, k, v, warmup=1, repeat=s["repeat"]))
                out["bytes"][name].append(int(measure.peak_memory(fn, q, k, v)[0]))
        if log:
            log(f"scaling n={n}: {time.perf_counter() - t0:.0f} s, " + ", ".join(
                f"{m} {out['time_s'][m][-1] * 1e3:.1f} ms" for m in METHODS))
    out["crossover_n"] = crossover(out["n"], out["time_s"]["lsh"], out["time_s"]["sdpa"])
    return out


def crossover(ns, t_new, t_ref):
    """The smallest n from which ``t_new < t_ref`` at every larger measured n too (None: never)."""
    for i, n in enumerate(ns):
        if all(a < b for a, b in zip(t_new[i:], t_ref[i:])):
            return n
    return None


def needle_data(settings, seed):
    """A callable step → (inputs, targets) of fresh needle batches (seeded per step), and the task's info."""
    from ..data.long_range import long_range_info, make_needle

    s = settings

    def batches(step):
        b = make_needle(s["batch_size"], s["seq_len"], n_values=s["n_values"], n_keys=s["n_keys"], depth=s["depth"],
                        hops=s["hops"], seed=1000 * seed + step)
        return b.inputs, b.targets

    return batches, long_range_info("needle", n_values=s["n_values"], n_keys=s["n_keys"])


VARIANT_MODULES = {"dense": "dense", "local": "sparse", "lsh": "lsh", "routing": "routing", "sinkhorn": "sinkhorn",
                   "entmax": "entmax", "sparsebert": "learned_mask"}


def build_model(name, settings, vocab_size, num_seed=0):
    """The small causal Transformer of the accuracy part with attention ``name``."""
    import importlib

    importlib.import_module(f"effedu.attention.{VARIANT_MODULES[name]}")  # registers the name (@register)
    s = settings
    torch.manual_seed(num_seed)
    cfg = TransformerConfig(vocab_size=vocab_size, d_model=s["d_model"], n_heads=s["n_heads"],
                            n_layers=s["n_layers"], d_ff=4 * s["d_model"], max_len=s["seq_len"], causal=True,
                            attention=name, attention_kwargs=variant_kwargs(name, s["seq_len"]))
    return Transformer(cfg)


def _densities(model):
    return [float(m.density()) for m in model.modules() if hasattr(m, "density") and callable(m.density)
            and isinstance(m, torch.nn.Module) and m is not model]


def train_variant(name, settings=ACCURACY, seed=0, val=None, log=None):
    """Train one variant; returns its record (accuracy curve, final accuracy, seconds, mask density for sparsebert)."""
    s = settings
    from ..data.long_range import make_needle

    batches, info = needle_data(s, seed)
    if val is None:
        val = make_needle(s["n_val"], s["seq_len"], n_values=s["n_values"], n_keys=s["n_keys"], depth=s["depth"],
                          hops=s["hops"], seed=s["val_seed"])
    model = build_model(name, s, info["vocab_size"], seed)
    record = {"variant": name, "seed": seed, "kwargs": variant_kwargs(name, s["seq_len"]), "density": [],
              "density_step": []}
    aux_weight = s["aux_weight"]  # routing's commitment, sparsebert's sparsity (weighted by the modules)

    def step_fn(model, inputs, targets, optimizer):
        loss = default_step(model, inputs, targets, optimizer, grad_clip=1.0, aux_weight=aux_weight)
        step = len(record["_losses"])
        record["_losses"].append(loss)
        if name == "sparsebert" and (step % s["eval_every"] == 0 or step == s["steps"] - 1):
            record["density_step"].append(step)
            record["density"].append(sum(_densities(model)) / max(1, len(_densities(model))))
        return loss

    record["_losses"] = []
    t0 = time.perf_counter()
    h = train(model, batches, steps=s["steps"], lr=s["lr"], seed=seed, val_batch=(val.inputs, val.targets),
              eval_every=s["eval_every"], step_fn=step_fn, progress=False)
    record.pop("_losses")
    record["seconds"] = time.perf_counter() - t0
    record["loss"] = [round(x, 5) for x in h["loss"]]
    record["val_step"] = h["val_step"]
    record["val_acc"] = h["val_acc"]
    record["final_loss"], record["final_acc"] = evaluate(model, (val.inputs, val.targets))
    if name == "sparsebert":
        model.eval()
        record["final_density"] = sum(_densities(model)) / max(1, len(_densities(model)))
    if log:
        log(f"accuracy {name} seed {seed}: acc {record['final_acc']:.3f}, {record['seconds']:.0f} s")
    return record


def sweep_accuracy(settings=ACCURACY, variants=VARIANTS, log=None):
    """``{"chance": float, "runs": [record per (variant, seed)]}`` (see :func:`train_variant`)."""
    from ..data.long_range import long_range_info, make_needle

    s = settings
    val = make_needle(s["n_val"], s["seq_len"], n_values=s["n_values"], n_keys=s["n_keys"], depth=s["depth"],
                          hops=s["hops"], seed=s["val_seed"])
    info = long_range_info("needle", n_values=s["n_values"], n_keys=s["n_keys"])
    runs = []
    with torch.random.fork_rng():  # train() seeds torch's global RNG: restored after
        for name in variants:
            for seed in s["seeds"]:
                runs.append(train_variant(name, s, seed, val=val, log=log))
    return {"chance": 1.0 / s["n_values"], "info_chance": info.get("chance"), "runs": runs}




def run_sweep(quick=False, *, threads=None, log=None, parts=("scaling", "accuracy")):
    """Every part; returns the dict written to ``data/results/learned_sparse.json``."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"run_sweep: threads must be a positive int or None, got {threads!r}")
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    env = env_report(print_report=False)  # may start numba's pool, which can change torch's threads: put it back
    torch.set_num_threads(before)
    scaling = SCALING_QUICK if quick else SCALING
    accuracy = ACCURACY_QUICK if quick else ACCURACY
    out = {"schema": SCHEMA_VERSION,
           "command": COMMAND + (" --quick" if quick else "") + (f" --threads {threads}" if threads else ""),
           "quick": bool(quick), "env": env,
           "settings": {"scaling": _jsonable(scaling), "accuracy": _jsonable(accuracy),
                        "variants": {v: variant_kwargs(v, accuracy["seq_len"]) for v in VARIANTS}}}
    with torch_numba_threads(threads):
        out["env"]["cpu threads (torch)"] = torch.get_num_threads()
        if "scaling" in parts:
            out["scaling"] = sweep_scaling(scaling, log=log)
        if "accuracy" in parts:
            out["accuracy"] = sweep_accuracy(accuracy, log=log)
    out["seconds"] = time.perf_counter() - t0
    return out


def _jsonable(d):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_results(path=None):
    """The committed results (``data/results/learned_sparse.json``)."""
    import json
    return json.loads(Path(path or DEFAULT_OUT).read_text(encoding="utf-8"))


def final_accuracy(results):
    """``{variant: mean final validation accuracy over seeds}`` of a results dict."""
    acc = {}
    for r in results["accuracy"]["runs"]:
        acc.setdefault(r["variant"], []).append(r["final_acc"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def main(argv=None):
    return sweep_main(argv, command=COMMAND, description=__doc__, default_out=DEFAULT_OUT,
                      run=lambda a: run_sweep(a.quick, threads=a.threads, log=log_to_stderr))


if __name__ == "__main__":
    main()


__all__ = ["run_sweep", "sweep_scaling", "sweep_accuracy", "train_variant", "build_model", "variant_kwargs",
           "scaling_paths", "crossover", "needle_data", "final_accuracy", "load_results", "main", "COMMAND",
           "DEFAULT_OUT", "SCHEMA_VERSION", "METHODS", "VARIANTS", "SCALING", "SCALING_QUICK", "ACCURACY",
           "ACCURACY_QUICK"]
