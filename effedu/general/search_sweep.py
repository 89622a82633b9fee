"""Chapter 13's searches, precomputed: evolution with and without progressive dynamic hurdles, written to JSON.

A search trains dozens of small Transformers; notebook 13 must run in under a minute, so the searches run here once
and the notebook plots ``data/results/search.json`` (and re-runs one child's training live). Regenerate with::

    python -m effedu.general.search_sweep            # → data/results/search.json (about 3–5 minutes on 2 cores)
    python -m effedu.general.search_sweep --quick    # seconds: a tiny search (the unit test runs this)

For each seed of :data:`SEEDS`, :func:`effedu.general.search.evolve` runs twice on :data:`SPACE` with the same
seed: once with every child trained the full budget (plain tournament selection), once with the hurdle schedule
:data:`HURDLES` (the same final budget). Saved per child: architecture, generation, parent, budgets reached,
validation loss after each, the hurdles it faced, parameters and training FLOPs (deterministic), and the forward
latency measured on this machine (reported, never selected on). Everything but the latencies is a deterministic
function of the seed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


from .. import env_report
from . import search as S
from .sweeps import sweep_main, torch_threads

COMMAND = "python -m effedu.general.search_sweep"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "results" / "search.json"
SCHEMA_VERSION = 1

SPACE = {"n_layers": (1, 2, 3), "d_model": (16, 32, 64), "n_heads": (1, 2, 4), "d_ff": (32, 128),
         "attention": ("dense", "local", "linear"), "share": (None, "all")}
SEARCH = {"population": 8, "generations": 5, "tournament": 3}
HURDLES = (30, 90)  # cumulative steps: every child trains 30, those beating the hurdle train on to 90
SEEDS = (0, 1)
QUICK = {"population": 3, "generations": 2, "tournament": 2, "hurdles": (2, 4), "seeds": (0,)}
QUICK_SPACE = {**SPACE, "attention": ("dense", "local")}  # no numba kernel to load: seconds


def space(*, quick=False):
    return S.SearchSpace(**(QUICK_SPACE if quick else SPACE))




def run(*, quick=False, threads=1, log=print):
    """Both searches for every seed; returns the JSON-ready dict (see the module docstring)."""
    cfg = ({**SEARCH, "hurdles": HURDLES, "seeds": SEEDS} if not quick else QUICK)
    sp = space(quick=quick)
    latency, cost = {}, {}

    def cost_fn(arch):
        if arch not in cost:
            cost[arch] = S.arch_cost(arch)
        return cost[arch]

    def latency_fn(arch):
        if arch not in latency:
            latency[arch] = S.measure_latency(arch, repeat=3 if quick else 7)
        return latency[arch]

    runs = []
    t_start = time.perf_counter()
    with torch_threads(threads):
        for seed in cfg["seeds"]:
            for hurdles_on in (False, True):
                fit = S.TrainedFitness(seed=seed)
                t0 = time.perf_counter()
                res = S.evolve(sp, fit, population=cfg["population"], generations=cfg["generations"],
                               tournament=cfg["tournament"], seed=seed,
                               hurdles=cfg["hurdles"] if hurdles_on else None, steps=cfg["hurdles"][-1],
                               cost_fn=cost_fn, latency_fn=latency_fn)
                d = res.as_dict()
                d["steps_trained"] = fit.steps_trained
                d["seconds"] = round(time.perf_counter() - t0, 1)
                runs.append(d)
                log(f"seed {seed} hurdles {'on ' if hurdles_on else 'off'}: {d['total_steps']} steps, best "
                    f"{res.best.arch.label()} loss {res.best.fitness:.3f} ({d['seconds']} s)")
    return {"schema": SCHEMA_VERSION, "quick": quick, "command": COMMAND + (" --quick" if quick else ""),
            "env": env_report(print_report=False),
            "space": {k: list(v) for k, v in (QUICK_SPACE if quick else SPACE).items()}, "space_size": sp.size, "task": dict(S.TASK),
            "search": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "seconds": round(time.perf_counter() - t_start, 1), "runs": runs}


run_sweep = run  # the name the other chapters' sweeps use


def load_results(path=None):
    """The committed results (``data/results/search.json``, or ``path``)."""
    path = Path(path) if path is not None else DEFAULT_OUT
    return json.loads(path.read_text())


def children(results, *, seed=0, hurdles=False):
    """The list of child dicts of one run of ``results``."""
    for r in results["runs"]:
        if r["seed"] == seed and r["hurdles_on"] == hurdles:
            return r["children"]
    raise ValueError(f"children: no run with seed={seed}, hurdles={hurdles} in these results")


def main(argv=None):
    # tiny models: one torch thread unless --threads says otherwise
    return sweep_main(argv, command=COMMAND, description=__doc__, default_out=DEFAULT_OUT, indent=1,
                      run=lambda a: run(quick=a.quick, threads=1 if a.threads is None else a.threads))


if __name__ == "__main__":
    main()
