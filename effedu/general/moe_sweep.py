"""Chapter 10's heavy runs, precomputed: tiny mixture-of-experts language models, written to a JSON file.

Notebook 10 must run in under a minute on two cores, so the training runs behind its load-balancing, capacity and
loss-curve plots run here once and are committed as ``data/results/moe.json``; the notebook loads that file, plots
it, and reproduces one point live. Regenerate it with one command (a few minutes on 2 cores)::

    python -m effedu.general.moe_sweep            # → data/results/moe.json
    python -m effedu.general.moe_sweep --quick    # seconds: smaller everything (the unit test runs this)

Everything is built on :mod:`effedu.general.moe` (nothing here re-implements a technique). The model is effedu's
causal decoder (:class:`effedu.model.Transformer`, 4 layers, d = 64) on the course corpus, one token per character
(:func:`effedu.data.corpus_tokenizer`, windows drawn by :func:`effedu.data.lm_batch`). The MoE models replace the
FFN of every other layer (layers 2 and 4, as Switch and GShard alternate) by
:class:`~effedu.general.moe.MoEFeedForward` with E experts of the *same* width ``d_ff`` as the dense FFN and top-1
routing (Switch): the FLOPs per token equal the dense model's (plus the router, 2·d·E), the parameters grow ≈ E×
in those layers. Every run uses the same batches (seeded by the step), the same validation windows and the same
optimiser; runs differ only in the FFN and the seed of the initialisation. The dispatch runs on the kernel's torch
backend (``backend="torch"``: the same numbers as numba for top-1, and no thread pool to fight over on a busy
machine).

* ``compare`` — dense vs MoE (E = 8, aux weight 1e-2, capacity factor 1.25) for seeds 0 and 1: validation loss
  every ``eval_every`` steps, parameters and FLOPs per token (Switch's claim: better at equal FLOPs).
* ``balance`` — MoE models for each (E, load-balancing weight) ∈ {4, 8} × {0, 1e-2, 1e-1}, seed 0 (the comparison's
  run is reused where it is the same): the per-step expert load of every MoE layer
  (tokens whose first choice is each expert), the auxiliary loss and the dropped fraction during training (router
  collapse without the balancing loss), the final validation loss, and the routing of the trained routers on held-out
  windows: for k = 1, 2 and each capacity factor, the tokens sent to and kept by each expert — the table the
  notebook's explorer reads (no routing runs while a slider moves).
* ``uniform`` — the same routing table for random router logits (every expert equally likely: the best a router can
  be balanced *in expectation*), to compare the dropped fraction of trained routers with pure chance.

The numbers of trained models depend on the CPU's kernels in their last digits: the notebook plots them and
prints them from this file (the same on every machine), and re-computes only exact things live.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .. import env_report
from ..data import corpus_tokenizer, lm_batch, load_corpus, train_val_split
from ..measure import attention_flops, attention_projection_flops, count_parameters, ffn_flops
from ..model import Transformer, TransformerConfig
from ..train import evaluate, train
from . import moe as M
from .sweeps import log_to_stderr, sweep_main

COMMAND = "python -m effedu.general.moe_sweep"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "results" / "moe.json"
SCHEMA_VERSION = 1

# the tiny language model and its training (full run); --quick shrinks everything
LM = dict(d_model=64, n_heads=4, n_layers=4, d_ff=256, seq_len=64, batch=16, steps=200, lr=3e-3, warmup=20,
          eval_every=20, val_windows=64, every=2, k=1, capacity_factor=1.25, backend="torch")
LM_QUICK = dict(LM, d_model=16, n_heads=2, n_layers=2, d_ff=32, seq_len=16, batch=4, steps=6, warmup=1,
                eval_every=3, val_windows=4)
COMPARE = dict(experts=(8,), seeds=(0, 1), aux_weight=1e-2)
COMPARE_QUICK = dict(COMPARE, experts=(4,), seeds=(0, 1))
BALANCE = dict(experts=(4, 8), aux_weights=(0.0, 1e-2, 1e-1))
BALANCE_QUICK = dict(experts=(4,), aux_weights=(0.0, 1e-2))
CAPACITY_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
ROUTE_KS = (1, 2)
VAL_SEED = 10**6      # validation windows: a seed no training batch uses
ROUTING_SEED = 10**6 + 1  # the held-out windows the trained routers are inspected on
UNIFORM_SEED = 0


# ----------------------------------------------------------------------------------------------------------------
# the tiny language model
# ----------------------------------------------------------------------------------------------------------------

def lm_data(settings=LM):
    """``(vocab_size, batch_fn, val_batch, routing_batch)`` of the experiment: ``batch_fn(step)`` the training
    batch of a step (seeded by the step), ``val_batch`` the validation windows (from the held-out end of the
    corpus), ``routing_batch`` one training-sized batch of held-out windows (its ``batch·seq_len`` tokens are what
    a MoE layer routes in one training step, so capacities match training)."""
    s = settings
    tok = corpus_tokenizer()
    train_ids, val_ids = train_val_split(tok.encode(load_corpus()))

    def batch_fn(step):
        return lm_batch(train_ids, s["batch"], s["seq_len"], seed=step)

    val = lm_batch(val_ids, s["val_windows"], s["seq_len"], seed=VAL_SEED)
    routing = lm_batch(val_ids, s["batch"], s["seq_len"], seed=ROUTING_SEED)
    return tok.vocab_size, batch_fn, val, routing


def lm_config(vocab_size, settings=LM, *, n_experts=None, aux_weight=1e-2):
    """The ``TransformerConfig``: dense FFNs (``n_experts=None``) or MoE in every ``settings["every"]``-th layer."""
    s = settings
    ffn = "dense"
    if n_experts is not None:
        ffn = M.moe_factory(n_experts, k=s["k"], capacity_factor=s["capacity_factor"], aux_weight=aux_weight,
                            every=s["every"], backend=s["backend"])
    return TransformerConfig(vocab_size=vocab_size, d_model=s["d_model"], n_heads=s["n_heads"],
                             n_layers=s["n_layers"], d_ff=s["d_ff"], max_len=s["seq_len"], ffn=ffn)


def moe_layer_indices(model):
    """The model's :class:`~effedu.general.moe.MoEFeedForward` modules, in layer order (``[(layer_index, module)]``)."""
    return [(i, block.ffn) for i, block in enumerate(model.blocks) if isinstance(block.ffn, M.MoEFeedForward)]


def flops_per_token(settings=LM, n_experts=None):
    """Forward FLOPs per token of the model (causal attention over ``seq_len``, projections, FFN or MoE, LM head
    excluded: it is the same for every model), and of its FFN/MoE sub-layers alone: ``(total, ffn)``."""
    s = settings
    n, d, L = s["seq_len"], s["d_model"], s["n_layers"]
    ffn = 0
    for i in range(L):
        moe_here = n_experts is not None and i % s["every"] == s["every"] - 1
        ffn += M.moe_ffn_flops(n, d, s["d_ff"], n_experts, s["k"]) if moe_here else ffn_flops(n, d, s["d_ff"])
    attn = L * (attention_flops(n, d, causal=True) + attention_projection_flops(n, d))
    return (attn + ffn) / n, ffn / n


def train_lm(settings=LM, *, n_experts=None, aux_weight=1e-2, seed=0, data=None):
    """Train one model (dense, or MoE with ``n_experts``) and return ``(model, history)``; same batches for all.

    MoE models train with :func:`effedu.general.moe.train_moe` (LM loss + the recorded auxiliary losses; history
    with the per-step ``load``); the dense model with :func:`effedu.train.train` (the same AdamW, schedule, clip).
    """
    s = settings
    vocab, batch_fn, val, _ = data or lm_data(s)
    torch.manual_seed(seed)
    model = Transformer(lm_config(vocab, s, n_experts=n_experts, aux_weight=aux_weight))
    kw = dict(steps=s["steps"], lr=s["lr"], warmup=s["warmup"], seed=seed, val_batch=val,
              eval_every=s["eval_every"], progress=False)
    if n_experts is None:
        history = train(model, batch_fn, **kw)
    else:
        history = M.train_moe(model, batch_fn, **kw)
    return model.eval(), history


def _load_rows(history, n_layers_moe):
    """history["load"] as ``[layer][step] -> [E ints]`` (MoE layer order)."""
    per_step = history.get("load", [])
    rows = [[] for _ in range(n_layers_moe)]
    for step in per_step:
        for j, counts in enumerate(step):
            rows[j].append([int(c) for c in torch.as_tensor(counts).tolist()])
    return rows


def _floats(xs, digits=5):
    return [None if x is None or not math.isfinite(float(x)) else round(float(x), digits) for x in xs]


# ----------------------------------------------------------------------------------------------------------------
# routing tables: tokens sent to / kept by each expert, for k and capacity factors
# ----------------------------------------------------------------------------------------------------------------

def routing_table(router_logits, *, ks=ROUTE_KS, capacity_factors=CAPACITY_FACTORS):
    """For router logits ``(N, E)``: ``{k: [{capacity_factor, capacity, sent (E,), kept (E,), dropped, dropped_tokens}]}``.

    ``sent[e]`` = choices routed to expert e (all k of them), ``kept[e]`` those within its capacity
    (:func:`~effedu.general.moe.capacity_for` on N tokens, first come first served as
    :func:`~effedu.general.moe.top_k_route`), ``dropped`` = the fraction of the N·k choices dropped and
    ``dropped_tokens`` the fraction of tokens that no expert processes (all k choices dropped)."""
    N, E = router_logits.shape
    out = {}
    for k in ks:
        if k > E:
            continue
        rows = []
        for cf in capacity_factors:
            C = M.capacity_for(N, E, k, cf)
            expert_index, _, kept = M.top_k_route(router_logits, k, C)
            sent = torch.bincount(expert_index.reshape(-1), minlength=E)
            kept_e = torch.bincount(expert_index[kept], minlength=E)
            rows.append({"capacity_factor": cf, "capacity": C, "sent": sent.tolist(), "kept": kept_e.tolist(),
                         "dropped": int((~kept).sum()) / (N * k),
                         "dropped_tokens": int((~kept).all(dim=1).sum()) / N})
        out[str(k)] = rows
    return out


def uniform_logits(n_tokens, n_experts, seed=UNIFORM_SEED):
    """Random router logits ``(N, E)`` (i.i.d. normal, seeded): every expert is each token's first choice with
    probability 1/E, independently — routing by chance, balanced in expectation only."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, n_experts, generator=g, dtype=torch.float64)


@torch.no_grad()
def trained_router_logits(model, batch):
    """Router log-probabilities ``(N, E)`` of every MoE layer of ``model`` on ``batch.inputs`` (eval mode): the
    logits up to a per-token constant, so they route exactly like the logits."""
    model.eval()
    model(batch[0])
    return [torch.log(layer.last_routing["router_probs"].double().reshape(-1, layer.last_routing["router_probs"].shape[-1]))
            for _, layer in moe_layer_indices(model)]


# ----------------------------------------------------------------------------------------------------------------
# the sweeps
# ----------------------------------------------------------------------------------------------------------------

def _model_info(model, settings, n_experts):
    total, ffn = flops_per_token(settings, n_experts)
    return {"params": count_parameters(model), "flops_per_token": total, "ffn_flops_per_token": ffn}


def _run(cache, settings, data, *, n_experts, aux_weight, seed, log):
    """Train (or take from ``cache``) one model; its summary: curves, sizes and, for MoE, load and routing."""
    key = (n_experts, aux_weight if n_experts else None, seed)
    if key in cache:
        return cache[key]
    _, _, val, routing = data
    name = "dense" if n_experts is None else f"MoE, E = {n_experts}, aux weight {aux_weight:g}"
    log(f"{name}, seed {seed} ({settings['steps']} steps)")
    t0 = time.perf_counter()
    model, h = train_lm(settings, n_experts=n_experts, aux_weight=aux_weight, seed=seed, data=data)
    run = {"n_experts": n_experts, "aux_weight": aux_weight if n_experts else None, "seed": seed,
           "seconds": round(time.perf_counter() - t0, 1), "val_step": [s + 1 for s in h["val_step"]],
           "val_loss": _floats(h["val_loss"]), "train_loss": _floats(h["loss"], 4),
           "final_val_loss": round(evaluate(model, val)[0], 5), **_model_info(model, settings, n_experts)}
    if n_experts is not None:
        layers = moe_layer_indices(model)
        logits = trained_router_logits(model, routing)
        run.update({
            "layers": [i for i, _ in layers],
            "load": _load_rows(h, len(layers)),
            "aux": _floats(h.get("aux", [])),
            "dropped_fraction": _floats(h.get("dropped_fraction", [])),
            "balance_loss": [round(float(M.load_balancing_loss(lg.exp(), lg.argmax(-1))), 5) for lg in logits],
            "routing": [routing_table(lg) for lg in logits],
        })
    cache[key] = run
    return run


def sweep_compare(settings, compare, data, cache=None, log=print):
    """Dense vs MoE (each E of ``compare``, its aux weight) for each seed: validation-loss curves (one list per
    seed), parameters, FLOPs per token."""
    cache = {} if cache is None else cache
    runs = {}
    for name, E in [("dense", None)] + [(f"moe{E}", E) for E in compare["experts"]]:
        rs = [_run(cache, settings, data, n_experts=E, aux_weight=compare["aux_weight"], seed=seed, log=log)
              for seed in compare["seeds"]]
        runs[name] = {"n_experts": E, "seeds": list(compare["seeds"]), "val_step": rs[0]["val_step"],
                      **{key: [r[key] for r in rs] for key in ("val_loss", "train_loss", "final_val_loss", "seconds")},
                      **{key: rs[0][key] for key in ("params", "flops_per_token", "ffn_flops_per_token")}}
    return {"aux_weight": compare["aux_weight"], "runs": runs}


def sweep_balance(settings, balance, data, cache=None, log=print):
    """One MoE model per (E, aux weight), seed 0 (taken from ``cache`` when the comparison trained it): load / aux /
    dropped per step, final validation loss, balance loss and routing table of the trained routers on held-out
    windows."""
    cache = {} if cache is None else cache
    return [_run(cache, settings, data, n_experts=E, aux_weight=w, seed=0, log=log)
            for E in balance["experts"] for w in balance["aux_weights"]]


def sweep_uniform(settings, balance):
    """The routing table of random (uniform-by-chance) router logits for each E, on as many tokens as one batch."""
    n = settings["batch"] * settings["seq_len"]
    return {str(E): routing_table(uniform_logits(n, E)) for E in balance["experts"]}


def run_sweep(quick=False, *, log=print, threads=None):
    """All sweeps, as the dict that :func:`main` writes (with the environment and the command)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"run_sweep: threads must be a positive int or None, got {threads!r}")
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    settings = LM_QUICK if quick else LM
    compare, balance = (COMPARE_QUICK, BALANCE_QUICK) if quick else (COMPARE, BALANCE)
    command = COMMAND + (" --quick" if quick else "") + (f" --threads {threads}" if threads else "")
    # env_report starts numba's threading layer, whose OpenMP pool can change torch's thread count: put it back
    results = {"schema": SCHEMA_VERSION, "command": command, "quick": bool(quick),
               "env": env_report(print_report=False)}
    torch.set_num_threads(before)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        results["env"]["cpu threads (torch)"] = torch.get_num_threads()
        data = lm_data(settings)
        results["settings"] = {**settings, "vocab_size": data[0], "tokens_per_batch": settings["batch"] * settings["seq_len"],
                               "capacity_factors": list(CAPACITY_FACTORS), "route_ks": list(ROUTE_KS),
                               "val_seed": VAL_SEED, "routing_seed": ROUTING_SEED, "uniform_seed": UNIFORM_SEED}
        cache = {}
        with torch.random.fork_rng():  # train() seeds torch's global RNG: restored after
            results["compare"] = sweep_compare(settings, compare, data, cache, log)
            results["balance"] = sweep_balance(settings, balance, data, cache, log)
        results["uniform"] = sweep_uniform(settings, balance)
    finally:
        torch.set_num_threads(before)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results


def load_results(path=None):
    """The precomputed results (default ``data/results/moe.json``), with a hint when the file is missing."""
    path = DEFAULT_OUT if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_results: {path} is missing; run `{COMMAND}` (a few minutes) to write it")
    return json.loads(path.read_text(encoding="utf-8"))


def balance_run(results, n_experts, aux_weight):
    """The ``balance`` entry of ``results`` for (E, aux weight); ValueError listing what exists otherwise."""
    for run in results["balance"]:
        if run["n_experts"] == n_experts and math.isclose(run["aux_weight"], aux_weight, rel_tol=1e-9, abs_tol=0):
            return run
    have = sorted({(r["n_experts"], r["aux_weight"]) for r in results["balance"]})
    raise ValueError(f"balance_run: no run with n_experts={n_experts}, aux_weight={aux_weight!r}; the file has {have}")


def main(argv=None):
    return sweep_main(argv, command=COMMAND, description=__doc__, default_out=DEFAULT_OUT,
                      run=lambda a: run_sweep(a.quick, threads=a.threads, log=log_to_stderr))


if __name__ == "__main__":
    main()


__all__ = ["run_sweep", "sweep_compare", "sweep_balance", "sweep_uniform", "routing_table", "uniform_logits",
           "trained_router_logits", "train_lm", "lm_data", "lm_config", "moe_layer_indices", "flops_per_token",
           "load_results", "balance_run", "main", "COMMAND", "DEFAULT_OUT", "SCHEMA_VERSION", "LM", "LM_QUICK",
           "COMPARE", "COMPARE_QUICK", "BALANCE", "BALANCE_QUICK", "CAPACITY_FACTORS", "ROUTE_KS"]
