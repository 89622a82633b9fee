"""Chapter 12's heavy runs, precomputed: gradient norms at initialisation and training with/without warm-up.

Notebook 12 must run in under a minute on two cores, so the training runs behind its loss curves and its explorer
run here once and are committed as ``data/results/init.json``; the notebook loads that file, plots it, and
reproduces one point live. Regenerate it with one command (a few minutes on 2 quiet cores)::

    python -m effedu.general.init_sweep            # → data/results/init.json
    python -m effedu.general.init_sweep --quick    # seconds: smaller everything (the unit test runs this)

Everything is built on :mod:`effedu.general.init` (nothing here re-implements a scheme):

* ``grad_norms`` — ‖∂L/∂W²‖ per layer at initialisation (:func:`~effedu.general.init.grad_norms_at_init`, the
  chapter-01 meter) for every scheme and depth, one next-character corpus batch per seed (16 × 64), d = 64.
* ``warmup`` — :func:`~effedu.general.init.warmup_demo` over the grid depth × learning rate × warm-up steps, every
  scheme, seed 0, no gradient clipping: the loss per step, the step of divergence, and the verdict (diverged,
  stalled at the unigram plateau, trained). The explorer reads this grid.
* ``seeds`` — the demonstration point (depth 12, lr 3e-3, no warm-up) again for seeds 1 and 2: is the verdict
  robust?

The numbers of trained models depend on the CPU's kernels in their last digits: the notebook plots and prints them
from this file (the same on every machine) and asserts only the verdicts it reproduces live.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import env_report
from ..data import corpus_tokenizer, lm_batch, load_corpus, train_val_split
from . import init as I
from .sweeps import log_to_stderr, sweep_main

COMMAND = "python -m effedu.general.init_sweep"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "results" / "init.json"
SCHEMA_VERSION = 1

GRAD = dict(depths=(6, 12, 24), seeds=(0, 1, 2), d_model=64, batch=16, seq_len=64)
GRAD_QUICK = dict(GRAD, depths=(2, 4), seeds=(0,), d_model=16, batch=2, seq_len=16)
WARMUP = dict(depths=(6, 12), lrs=(1e-3, 3e-3), warmups=(0, 40), steps=80, d_model=32, batch_size=16, seq_len=32,
              tail=10, stall_margin=0.1)
WARMUP_QUICK = dict(WARMUP, depths=(2,), lrs=(1e-3,), warmups=(0, 2), steps=4, d_model=16, batch_size=2,
                    seq_len=8, tail=2)
DEMO = dict(depth=12, lr=3e-3, warmup=0, seeds=(1, 2), schemes=("post-ln", "admin"))
DEMO_QUICK = dict(DEMO, depth=2, seeds=(1,))


def corpus_tokens():
    """``(train_tokens, vocab_size)``: the course corpus, one token per character, its training part."""
    tok = corpus_tokenizer()
    return train_val_split(torch.as_tensor(tok.encode(load_corpus())))[0], tok.vocab_size


def sweep_grad_norms(settings=GRAD, tokens=None, vocab_size=None):
    """``{depth: {scheme: [per seed: [‖∂L/∂W²‖ per layer]]}}`` (keys as strings, layer 0 nearest the input)."""
    if tokens is None:
        tokens, vocab_size = corpus_tokens()
    out = {}
    for depth in settings["depths"]:
        out[str(depth)] = {s: [] for s in I.SCHEMES}
        for seed in settings["seeds"]:
            batch = lm_batch(tokens, settings["batch"], settings["seq_len"], seed=123 + seed)
            for s in I.SCHEMES:
                out[str(depth)][s].append(I.grad_norms_at_init(s, depth, batch=batch, seed=seed,
                                                               d_model=settings["d_model"], vocab_size=vocab_size))
    return out


def sweep_warmup(settings=WARMUP, tokens=None, vocab_size=None, log=None):
    """The grid: a list of :func:`~effedu.general.init.warmup_demo` results, one per (depth, lr)."""
    if tokens is None:
        tokens, vocab_size = corpus_tokens()
    grid = []
    for depth in settings["depths"]:
        for lr in settings["lrs"]:
            t0 = time.perf_counter()
            r = I.warmup_demo(depth=depth, lr=lr, steps=settings["steps"], warmups=tuple(settings["warmups"]),
                              d_model=settings["d_model"], batch_size=settings["batch_size"],
                              seq_len=settings["seq_len"], tail=settings["tail"],
                              stall_margin=settings["stall_margin"], tokens=tokens, vocab_size=vocab_size)
            grid.append(r)
            if log:
                log(f"warmup depth={depth} lr={lr}: {time.perf_counter() - t0:.0f} s, " + ", ".join(
                    f"{x['scheme']}/w{x['warmup']}:{'div' if x['diverged_at'] is not None else 'stall' if x['stalled'] else 'ok'}"
                    for x in r["runs"]))
    return grid


def sweep_seeds(settings=DEMO, warmup_settings=WARMUP, tokens=None, vocab_size=None):
    """The demonstration point (depth 12, lr 3e-3, no warm-up) for more seeds (same sizes as the grid)."""
    if tokens is None:
        tokens, vocab_size = corpus_tokens()
    w = warmup_settings
    return I.warmup_demo(schemes=settings["schemes"], depth=settings["depth"], lr=settings["lr"], steps=w["steps"],
                         warmups=(settings["warmup"],), seeds=tuple(settings["seeds"]), d_model=w["d_model"],
                         batch_size=w["batch_size"], seq_len=w["seq_len"], tail=w["tail"],
                         stall_margin=w["stall_margin"], tokens=tokens, vocab_size=vocab_size)


def run_sweep(quick=False, *, threads=None, log=None):
    """Every part; returns the dict written to ``data/results/init.json``."""
    t0 = time.perf_counter()
    old = torch.get_num_threads()
    env = env_report(print_report=False)  # may start numba's pool, which can change torch's threads: set after
    if threads:
        torch.set_num_threads(threads)
    try:
        tokens, vocab_size = corpus_tokens()
        grad = GRAD_QUICK if quick else GRAD
        warm = WARMUP_QUICK if quick else WARMUP
        demo = DEMO_QUICK if quick else DEMO
        out = {"schema": SCHEMA_VERSION, "command": COMMAND + (" --quick" if quick else ""), "quick": quick,
               "env": env,
               "settings": {"grad": _jsonable(grad), "warmup": _jsonable(warm), "demo": _jsonable(demo),
                            "vocab_size": vocab_size, "unigram_entropy": I.unigram_entropy(tokens, vocab_size)}}
        out["grad_norms"] = sweep_grad_norms(grad, tokens, vocab_size)
        if log:
            log(f"grad norms: {time.perf_counter() - t0:.0f} s")
        out["warmup"] = sweep_warmup(warm, tokens, vocab_size, log=log)
        out["seeds"] = sweep_seeds(demo, warm, tokens, vocab_size)
    finally:
        torch.set_num_threads(old)
    out["seconds"] = time.perf_counter() - t0
    return out


def _jsonable(d):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_results(path=None):
    """The committed results (``data/results/init.json``)."""
    import json
    return json.loads(Path(path or DEFAULT_OUT).read_text(encoding="utf-8"))


def main(argv=None):
    return sweep_main(argv, command=COMMAND, description=__doc__, default_out=DEFAULT_OUT,
                      run=lambda a: run_sweep(a.quick, threads=a.threads, log=log_to_stderr))


if __name__ == "__main__":
    main()


__all__ = ["run_sweep", "sweep_grad_norms", "sweep_warmup", "sweep_seeds", "corpus_tokens", "load_results", "main",
           "COMMAND", "DEFAULT_OUT", "SCHEMA_VERSION", "GRAD", "GRAD_QUICK", "WARMUP", "WARMUP_QUICK", "DEMO",
           "DEMO_QUICK"]
