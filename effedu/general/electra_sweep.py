"""Chapter 11's pre-training runs, precomputed: MLM vs ELECTRA at equal FLOPs, and ELECTRA's three knobs.

Notebook 11 must run in under a minute on two cores; pre-training two encoders long enough for a probe to tell
them apart takes a few minutes, so it is done here once and the notebook plots the committed
``data/results/electra.json`` (and re-runs one small point live). Regenerate with one command::

    python -m effedu.general.electra_sweep            # → data/results/electra.json (a few minutes on 2 cores)
    python -m effedu.general.electra_sweep --quick    # seconds: a few steps each (the unit test runs this)

* **quality vs compute** — one :class:`~effedu.general.electra.Electra` (generator ¼ of the width, λ = 50, 15 %
  masked) and one :class:`~effedu.general.electra.MaskedLM` of the discriminator's shape, both pre-trained on random
  windows of the corpus; the MLM gets as many more steps as make its FLOPs equal to ELECTRA's
  (:func:`~effedu.general.electra.pretraining_flops`). Along the way, a linear probe on frozen, mean-pooled
  features of held-out sentences (which of the grammar's 8 sentence builders wrote them) at step 0 and at :data:`N_PROBES` points;
* **the knobs** — ELECTRA again, one setting changed at a time from the default: generator width
  (:data:`GEN_FRACTIONS`), λ (:data:`LAMBDAS`), mask rate (:data:`MASK_RATES`); for each, the probe accuracy at
  the end, the share of masked positions actually replaced, and the generator's and discriminator's accuracy.

Everything is seeded; nothing here re-implements a technique (it calls :mod:`effedu.general.electra`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import env_report
from . import electra as E
from .sweeps import torch_threads

COMMAND = "python -m effedu.general.electra_sweep"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "results" / "electra.json"
SCHEMA_VERSION = 2

MODEL = {"d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 256, "max_len": 16}
TRAIN = {"batch_size": 64, "lr": 2e-3, "electra_steps": 1200}
PROBE = {"n": 1000, "label": "kind", "seed": 123}
N_PROBES = 6
DEFAULT_KNOBS = {"gen_fraction": 0.25, "lam": 50.0, "mask_rate": 0.15}
GEN_FRACTIONS = (0.25, 0.5, 1.0)
LAMBDAS = (1.0, 10.0, 50.0)
MASK_RATES = (0.15, 0.3, 0.5)
KNOB_STEPS = 300
QUICK_STEPS = 4
QUICK_PROBE_N = 120
N_GRID = 6  # held-out windows shown word by word


def config(**knobs):
    """The chapter's :class:`ElectraConfig` (:data:`MODEL`) with the corpus's vocabulary + [MASK]."""
    _, tok, vocab, mask_id = E.corpus_setup()
    return E.ElectraConfig(vocab_size=vocab, mask_id=mask_id, **MODEL, **dict(DEFAULT_KNOBS, **knobs))


def _probe(quick):
    n = QUICK_PROBE_N if quick else PROBE["n"]
    return E.probe_data(n, label=PROBE["label"], seed=PROBE["seed"], max_len=MODEL["max_len"])


@torch.no_grad()
def _diagnostics(model, train_ids, *, seed=7):
    """The ELECTRA objective's parts on one held batch (generator and discriminator accuracy, replaced share)."""
    from ..data import lm_batch

    x = lm_batch(train_ids, 64, model.config.max_len, seed=seed).inputs
    _, parts = E.electra_loss(model, x, generator=torch.Generator().manual_seed(seed))
    return {k: round(parts[k], 4) for k in ("mlm", "disc", "gen_accuracy", "replaced_fraction", "disc_accuracy",
                                            "disc_base_rate", "disc_auc")}


@torch.no_grad()
def token_grid(model, *, n=N_GRID, seed=11):
    """What the trained ELECTRA does to ``n`` windows of held-out text (the corpus's last 10 %): the words it reads
    after the generator's samples, the originals, which were masked / replaced, and the discriminator's
    P(replaced) (3 decimals)."""
    from ..data import lm_batch, load_corpus, train_val_split

    tok = E.corpus_tokenizer()
    _, val_ids = train_val_split(tok.encode(load_corpus()), 0.1)
    x = lm_batch(val_ids, n, model.config.max_len, seed=seed).inputs
    _, parts = E.electra_loss(model, x, generator=torch.Generator().manual_seed(seed))
    return {"original": [tok.decode_tokens(r) for r in x], "corrupt": [tok.decode_tokens(r) for r in parts["sampled"]],
            "masked": parts["masked"].tolist(), "replaced": parts["labels"].tolist(),
            "disc_prob": [[round(v, 3) for v in row] for row in parts["disc_prob"].tolist()]}


def sweep_compute(*, quick=False, log=print):
    """MLM vs ELECTRA at equal FLOPs: probe accuracy vs pre-training FLOPs for each."""
    train_ids = E.corpus_setup()[0]
    probe = _probe(quick)
    cfg = config()
    T, B = MODEL["max_len"], TRAIN["batch_size"]
    per_step = {k: E.pretraining_flops(m, B * T, seq_len=T) for k, m in
                (("electra", E.Electra(cfg)), ("mlm", E.MaskedLM(cfg)))}
    e_steps = QUICK_STEPS if quick else TRAIN["electra_steps"]
    budget = e_steps * per_step["electra"]
    out = {"flops_budget": budget, "flops_per_step": per_step, "curves": {}}
    for objective in ("electra", "mlm"):
        steps = max(1, round(budget / per_step[objective]))
        t0 = time.perf_counter()
        model, rec = E.pretrain(objective, cfg, steps=steps, batch_size=B, lr=TRAIN["lr"], seed=0,
                                probe=probe[:3], probe_every=max(1, steps // N_PROBES), train_ids=train_ids)
        out["curves"][objective] = {
            "steps": steps, "probe_steps": rec["probe_steps"], "probe_flops": rec["probe_flops"],
            "probe_accuracy": [round(a, 4) for a in rec["probe_accuracy"]],
            "loss_every_10": [round(v, 4) for v in rec["loss"][::10]],
        }
        if objective == "electra":
            out["curves"][objective]["diagnostics"] = _diagnostics(model, train_ids)
            out["grid"] = token_grid(model)
        log(f"{objective}: {steps} steps, probe accuracy {out['curves'][objective]['probe_accuracy']} "
            f"({time.perf_counter() - t0:.0f} s)")
    return out


def sweep_knobs(*, quick=False, log=print):
    """ELECTRA with one knob changed at a time from :data:`DEFAULT_KNOBS`, :data:`KNOB_STEPS` steps each."""
    train_ids = E.corpus_setup()[0]
    probe = _probe(quick)
    steps = QUICK_STEPS if quick else KNOB_STEPS
    grid = {"gen_fraction": GEN_FRACTIONS, "lam": LAMBDAS, "mask_rate": MASK_RATES}
    done, out = {}, {"steps": steps, "default": dict(DEFAULT_KNOBS), "knobs": {}}
    for knob, values in grid.items():
        rows = []
        for v in values:
            setting = dict(DEFAULT_KNOBS, **{knob: v})
            key = tuple(sorted(setting.items()))
            if key not in done:
                t0 = time.perf_counter()
                model, rec = E.pretrain("electra", config(**setting), steps=steps, batch_size=TRAIN["batch_size"],
                                        lr=TRAIN["lr"], seed=0, probe=probe[:3], probe_every=steps,
                                        train_ids=train_ids)
                done[key] = dict(_diagnostics(model, train_ids), probe_accuracy=round(rec["probe_accuracy"][-1], 4),
                                 flops=steps * rec["flops_per_step"])
                log(f"{setting}: {done[key]} ({time.perf_counter() - t0:.0f} s)")
            rows.append(dict(done[key], value=v))
        out["knobs"][knob] = rows
    return out




def run(*, quick=False, out=DEFAULT_OUT, threads=None, log=print):
    """Both sweeps, written to ``out`` as JSON (with the environment and the command); returns the dict.
    ``threads``: torch's intra-op threads for the run (restored after; None: unchanged)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"electra_sweep.run: threads must be a positive int or None, got {threads!r}")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch_threads(threads):
        result = {
            "schema_version": SCHEMA_VERSION,
            "command": COMMAND + (" --quick" if quick else ""),
            "env": env_report(print_report=False),
            "quick": quick,
            "model": MODEL, "train": TRAIN, "probe": PROBE,
            "compute": sweep_compute(quick=quick, log=log),
            "knobs": sweep_knobs(quick=quick, log=log),
        }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {out} in {result['seconds']} s")
    return result


def load(path=DEFAULT_OUT):
    """The committed results (``data/results/electra.json``) as a dict."""
    return json.loads(Path(path).read_text())


def main(argv=None):
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps each (seconds): checks the pipeline")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output JSON (default {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the run (default: unchanged)")
    args = p.parse_args(argv)
    run(quick=args.quick, out=args.out, threads=args.threads)


if __name__ == "__main__":
    main()
