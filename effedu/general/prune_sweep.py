"""The heavy runs of chapter 05 (pruning), precomputed into ``data/results/pruning.json``.

    python -m effedu.general.prune_sweep            # the full sweep (a few minutes on 2 cores)
    python -m effedu.general.prune_sweep --quick    # a smoke run of seconds (what the unit test runs)
    python -m effedu.general.prune_sweep --out my.json

The notebook loads the committed file (:func:`load_results`) and plots it, and reproduces one point live. The file
records ``effedu.env_report()`` and the command that wrote it. Everything is seeded; the numbers still depend on the
CPU's kernels in their last digits (trained accuracies, fidelities), so the notebook only plots them.

**The tiny model** — a 3-layer, 4-head, d = 48 effedu ``Transformer`` trained on ``make_task("sort")`` (sequences of 6
symbols) to near 100 % accuracy. Pruned three ways, the x-axis of every curve being the fraction of the *prunable*
weights removed (the Linear weights of the blocks, :func:`effedu.general.prune.prunable_weights`), so that the
methods compare at equal size:

* unstructured — global magnitude pruning (one threshold over all prunable weights), accuracy right after pruning
  and after a short fine-tuning with the mask held;
* heads — the n least important heads by Michel et al.'s importance (``head_importance`` with the task's loss),
  and n random heads for comparison, switched off by their gates (equal to physically removing them); a head is
  4·d·Dh weights of ``qkv`` + ``proj``;
* layers — Sajjad et al.'s top / bottom / alternate dropping, before and after a short fine-tuning;
* the lottery ticket (:func:`effedu.general.lottery.lottery_ticket`): dense vs pruned + rewound to step k vs pruned +
  re-initialised, at high sparsities (90–99.5 %), for two seeds (``"dense"``, ``"rewound"``, ``"reinit"``: one entry
  per seed; the latter two a list over the sparsities each). The dense run of seed 0 is the model above, trained
  once without interruption: ``lottery["dense"][0] == dense_accuracy``.

**MiniLM** (``effedu.pretrained``) — no fine-tuning anywhere (a pruned MiniLM is not retrained here: say so when you
quote these numbers); the cost is measured as the fidelity of its sentence embeddings on the project's sentences
(``effedu.pretrained.fidelity`` against the unpruned encoder: mean cosine, top-1 and top-5 neighbour agreement):
unstructured global magnitude pruning, heads by importance (``topic_contrastive_loss``: a real task loss, same-topic
sentences as positives) and at random, layers dropped top / bottom / alternate; and the 6 × 12 head-importance
matrix itself.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from .. import env_report
from ..data import make_task
from ..data.sentences import load_sentences
from ..model import Transformer, TransformerConfig
from ..train import evaluate, lm_loss, train
from . import lottery, prune
from .sweeps import log_to_stderr, sweep_main

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "data" / "results" / "pruning.json"  # <repo>/data/results/
COMMAND = "python -m effedu.general.prune_sweep"
LAYER_STRATEGIES = ("top", "bottom", "alternate")
METRICS = ("cosine", "top1", "top5")

# the tiny model and its training (full run; --quick shrinks everything)
TINY = dict(task="sort", seq_len=13, d_model=48, n_heads=4, n_layers=3, batch_size=32, steps=200, lr=1e-2,
            warmup=10, finetune_steps=40, finetune_lr=3e-3, val_size=512,
            sparsities=[0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
            lottery_sparsities=[0.9, 0.98, 0.99, 0.995], lottery_seeds=[0, 1], rewind_step=10)
TINY_QUICK = dict(TINY, d_model=16, n_heads=2, n_layers=2, batch_size=16, steps=12, warmup=2, finetune_steps=3,
                  val_size=64, sparsities=[0.0, 0.5, 0.9], lottery_sparsities=[0.5], lottery_seeds=[0, 1],
                  rewind_step=2)
MINILM = dict(per_topic=None, sparsities=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
              heads=[0, 6, 12, 24, 36, 48, 60], importance_batches=None)
MINILM_QUICK = dict(per_topic=2, sparsities=[0.0, 0.5], heads=[0, 12], importance_batches=1, layers_kept=[6, 3])
VAL_SEED = 10**6  # validation batches: seeds no training batch uses
FINETUNE_SEED = 10**5


def tiny_config(settings=TINY):
    """The tiny model's ``TransformerConfig`` for these settings (vocabulary of the task, d_ff = 4·d)."""
    s = settings
    return TransformerConfig(vocab_size=12, d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"],
                             d_ff=4 * s["d_model"], max_len=s["seq_len"])


def tiny_setup(settings=TINY):
    """``(make_model, batch_fn, val_batch, train_fn)`` of the tiny experiment: ``make_model(seed)`` a fresh model,
    ``batch_fn(step)`` the training batch of a step, ``train_fn`` :func:`lottery.schedule_train_fn`'s."""
    s, cfg = settings, tiny_config(settings)

    def make_model(seed):
        torch.manual_seed(seed)
        return Transformer(cfg)

    def batch_fn(step):
        return make_task(s["task"], s["batch_size"], s["seq_len"], seed=step)

    val = make_task(s["task"], s["val_size"], s["seq_len"], seed=VAL_SEED)
    train_fn = lottery.schedule_train_fn(batch_fn, val, steps=s["steps"], lr=s["lr"], warmup=s["warmup"])
    return make_model, batch_fn, val, train_fn


def finetune(model, settings, val, seed=FINETUNE_SEED):
    """A short fine-tuning (masks, if any, are held by their hooks); returns the validation accuracy."""
    s = settings
    train(model, lambda step: make_task(s["task"], s["batch_size"], s["seq_len"], seed=seed + step),
          steps=s["finetune_steps"], lr=s["finetune_lr"], progress=False)
    return evaluate(model, val)[1]


def head_weights(model):
    """Prunable weights one head holds: its Dh rows of each of W_q, W_k, W_v and its Dh columns of W_o."""
    attn = model.blocks[0].attn
    return 4 * attn.d_model * attn.head_dim


def _n_prunable(model):
    return sum(w.numel() for w in prune.prunable_weights(model).values())


def _layer_plan(n_layers, kept=None):
    """``{strategy: [n_keep, ...]}``: every count each strategy allows (alternate drops at most ⌈L/2⌉)."""
    kept = list(range(n_layers, 0, -1)) if kept is None else kept
    plan = {}
    for strategy in LAYER_STRATEGIES:
        ok = []
        for k in kept:
            try:
                prune.layers_kept(n_layers, k, strategy)
                ok.append(k)
            except ValueError:
                pass
        plan[strategy] = ok
    return plan


def sweep_tiny(quick=False, log=print):
    """Accuracy vs pruned fraction on the tiny model (unstructured, heads, layers) and the lottery ticket."""
    s = TINY_QUICK if quick else TINY
    make_model, batch_fn, val, train_fn = tiny_setup(s)
    log(f"tiny: training the dense model ({s['steps']} steps)")
    dense = make_model(0)
    dense_acc = train_fn(dense, 0)
    n_total, L, H = _n_prunable(dense), s["n_layers"], s["n_heads"]
    out = {"settings": s, "prunable_weights": n_total, "dense_accuracy": dense_acc}

    log("tiny: unstructured (global magnitude)")
    rows = {"sparsity": [], "accuracy": [], "accuracy_finetuned": [], "finetune_steps": s["finetune_steps"]}
    for sp in s["sparsities"]:
        m = copy.deepcopy(dense)
        prune.prune_magnitude(m, sp, scope="global")
        rows["sparsity"].append(prune.sparsity(m))
        rows["accuracy"].append(evaluate(m, val)[1])
        rows["accuracy_finetuned"].append(finetune(m, s, val))
    out["unstructured"] = rows

    log("tiny: heads (importance and random)")
    batches = [make_task(s["task"], 64, s["seq_len"], seed=VAL_SEED + 1 + i) for i in range(2 if quick else 4)]
    importance = prune.head_importance(dense, batches, lambda m, b: lm_loss(m(b.inputs), b.targets))
    shuffled = torch.rand(L, H, generator=torch.Generator().manual_seed(0)).double()
    rows = {"n_heads_pruned": [], "weight_sparsity": [], "accuracy": [], "accuracy_random": [],
            "importance": importance.tolist(), "random_order": shuffled.tolist()}
    for n in range(0, L * (H - 1) + 1):
        rows["n_heads_pruned"].append(n)
        rows["weight_sparsity"].append(n * head_weights(dense) / n_total)
        for key, imp in (("accuracy", importance), ("accuracy_random", shuffled)):
            m = prune.mask_heads(copy.deepcopy(dense), prune.heads_to_prune(imp, n))
            rows[key].append(evaluate(m, val)[1])
    out["heads"] = rows

    log("tiny: layers (top / bottom / alternate)")
    out["layers"] = {}
    for strategy, kept in _layer_plan(L).items():
        rows = {"n_kept": [], "kept": [], "weight_sparsity": [], "accuracy": [], "accuracy_finetuned": []}
        for k in kept:
            keep = prune.layers_kept(L, k, strategy)
            m = prune.drop_layers(copy.deepcopy(dense), keep)
            rows["n_kept"].append(k)
            rows["kept"].append(keep)
            rows["weight_sparsity"].append(1 - _n_prunable(m) / n_total)
            rows["accuracy"].append(evaluate(m, val)[1])
            rows["accuracy_finetuned"].append(finetune(m, s, val) if k < L else rows["accuracy"][-1])
        out["layers"][strategy] = rows

    log(f"tiny: lottery ticket (rewind to step {s['rewind_step']}, {len(s['lottery_sparsities'])} sparsities, "
        f"seeds {s['lottery_seeds']})")
    runs = [lottery.lottery_ticket(make_model, train_fn, sparsities=s["lottery_sparsities"],
                                   rewind_step=s["rewind_step"], seed=seed) for seed in s["lottery_seeds"]]
    out["lottery"] = {"sparsity": runs[0]["sparsity"], "seeds": list(s["lottery_seeds"]),
                      "rewind_step": s["rewind_step"], "scope": runs[0]["scope"],
                      "kept_sparsity": runs[0]["kept_sparsity"],
                      **{key: [r[key] for r in runs] for key in ("dense", "rewound", "reinit")}}
    return out


def sentence_subset(sentences, topics, per_topic):
    """The first ``per_topic`` sentences of each topic (in file order): ``(sentences, topics)``."""
    count, out = {}, []
    for x, t in zip(sentences, topics):
        count[t] = count.get(t, 0) + 1
        if count[t] <= per_topic:
            out.append((x, t))
    return [x for x, _ in out], [t for _, t in out]


def _fidelity_row(rows, reference, encoder, sentences):
    from ..pretrained import fidelity

    f = fidelity(reference, encoder, sentences)
    for k in METRICS:
        rows.setdefault(k, []).append(f[k])


def sweep_minilm(quick=False, log=print):
    """Fidelity of MiniLM's sentence embeddings vs pruned fraction (unstructured, heads, layers), no fine-tuning."""
    from ..pretrained import load_minilm

    s = MINILM_QUICK if quick else MINILM
    encoder, _ = load_minilm()
    sentences, topics = load_sentences()
    if s["per_topic"]:
        sentences, topics = sentence_subset(sentences, topics, s["per_topic"])
    reference = encoder.embed(sentences)
    n_total = _n_prunable(encoder)
    L, H = len(encoder.blocks), encoder.blocks[0].attn.n_heads
    out = {"n_sentences": len(sentences), "prunable_weights": n_total, "finetuned": False,
           "size": {k: v for k, v in prune.model_size(encoder).items()}}

    log("minilm: unstructured (global magnitude, no fine-tuning)")
    rows = {"sparsity": []}
    for sp in s["sparsities"]:
        m = copy.deepcopy(encoder)
        prune.prune_magnitude(m, sp, scope="global")
        rows["sparsity"].append(prune.sparsity(m))
        _fidelity_row(rows, reference, m, sentences)
    out["unstructured"] = rows

    log("minilm: head importance (topic_contrastive_loss)")
    batches = prune.topic_batches(sentences, topics, batch_size=48, per_topic=2 if quick else 4)
    if s["importance_batches"]:
        batches = batches[:s["importance_batches"]]
    importance = prune.head_importance(encoder, batches, lambda m, b: prune.topic_contrastive_loss(m, *b))
    out["head_importance"] = importance.tolist()
    shuffled = torch.rand(L, H, generator=torch.Generator().manual_seed(0)).double()
    rows = {"n_heads_pruned": [], "weight_sparsity": [], "importance": {}, "random": {},
            "random_order": shuffled.tolist()}
    for n in s["heads"]:
        rows["n_heads_pruned"].append(n)
        rows["weight_sparsity"].append(n * head_weights(encoder) / n_total)
        for key, imp in (("importance", importance), ("random", shuffled)):
            m = prune.mask_heads(copy.deepcopy(encoder), prune.heads_to_prune(imp, n))
            _fidelity_row(rows[key], reference, m, sentences)
    out["heads"] = rows

    log("minilm: layers (top / bottom / alternate, no fine-tuning)")
    out["layers"] = {}
    for strategy, kept in _layer_plan(L, s.get("layers_kept")).items():
        rows = {"n_kept": [], "kept": [], "weight_sparsity": []}
        for k in kept:
            keep = prune.layers_kept(L, k, strategy)
            rows["n_kept"].append(k)
            rows["kept"].append(keep)
            rows["weight_sparsity"].append(1 - k / L)
            if k == L:  # nothing dropped: the unpruned encoder, the same for every strategy
                _fidelity_row(rows, reference, reference, sentences)
            else:
                _fidelity_row(rows, reference, prune.drop_layers(copy.deepcopy(encoder), keep), sentences)
        out["layers"][strategy] = rows
    return out


def run_sweep(quick=False, *, log=print):
    """Both sweeps, as the dict that :func:`main` writes (with the environment and the command)."""
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # env_report starts numba's threading layer, whose OpenMP pool can change torch's thread count: put it back
    results = {"command": COMMAND + (" --quick" if quick else ""), "quick": bool(quick),
               "env": env_report(print_report=False)}
    torch.set_num_threads(threads)
    with torch.random.fork_rng():  # the sweeps seed torch's global RNG (train, make_model): restored after
        results["tiny"] = sweep_tiny(quick, log)
        results["minilm"] = sweep_minilm(quick, log)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results


def load_results(path=None):
    """The precomputed results (default ``data/results/pruning.json``), with a hint when the file is missing."""
    path = DEFAULT_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_results: {path} is missing; run `{COMMAND}` (a few minutes) to write it")
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv=None):
    return sweep_main(argv, command=COMMAND, description=__doc__, default_out=DEFAULT_PATH, threads=False, indent=1,
                      run=lambda a: run_sweep(a.quick, log=log_to_stderr))


if __name__ == "__main__":
    main()


__all__ = ["run_sweep", "sweep_tiny", "sweep_minilm", "load_results", "tiny_setup", "tiny_config", "finetune",
           "head_weights", "sentence_subset", "main", "DEFAULT_PATH", "COMMAND", "TINY", "TINY_QUICK", "MINILM", "MINILM_QUICK"]
