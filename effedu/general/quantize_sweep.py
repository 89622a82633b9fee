"""Chapter 08's heavy runs, precomputed: accuracy and fidelity of quantised models, written to a JSON file.

Notebook 08 must run in under a minute on two cores, so the sweeps behind its PTQ / QAT / iPQ / Quant-Noise plots
run here once and are committed as ``data/results/quantization.json``; the notebook loads that file, plots it,
and re-runs one small point live. Regenerate it with one command (about 4–6 minutes on 2 cores)::

    python -m effedu.general.quantize_sweep            # → data/results/quantization.json
    python -m effedu.general.quantize_sweep --quick    # seconds: smaller everything (the unit test runs this)

Everything is built on :mod:`effedu.general.quantize` (nothing here re-implements a technique):

* **tiny model** — effedu's decoder (2 layers, d = 64) trained on the synthetic ``sort`` task to ≈ 100 %
  (:func:`train_tiny`), then
  - **PTQ** of the weights of every ``nn.Linear`` in the blocks at 8, 6, 4, 3, 2 bits, per tensor / per channel,
    symmetric / affine (:func:`effedu.general.quantize.ptq`; activations float: weights-only);
  - **QAT** at 8, 4, 2 bits: a short fine-tuning through fake quantisation + STE
    (:func:`~effedu.general.quantize.prepare_qat` → train → :func:`~effedu.general.quantize.convert_qat`), next
    to PTQ of the same weights and to PTQ after a float fine-tuning of the same length (the control: is it the
    quantisation-aware training or just more training?);
  - **Quant-Noise** (Fan et al. 2020): trained from scratch with a fraction ``p`` of weight blocks replaced by
    their product-quantised value in each forward (codebooks re-fitted every few steps), then fully
    product-quantised (iPQ); accuracy against the model trained with p = 0; and **iPQ** of the float model
    with and without fine-tuning between layers (the "iterative" in iPQ);
* **MiniLM** (all-MiniLM-L6-v2 in :mod:`effedu.pretrained`) — size in MB against the fidelity of its sentence
  embeddings (:func:`effedu.pretrained.fidelity` against the float encoder on the project's 300 sentences) for
  weights-only PTQ at each width and scheme, real int8 inference (``QuantizedLinear``: int8 weights × dynamic
  int8 activations) and iPQ at a few block sizes / codebook sizes, **without fine-tuning** (no training data
  for MiniLM's objective here: the fidelity is what PTQ-style PQ gives).

Sizes are bytes of the saved state: quantised weights at their width (⌈numel·b/8⌉ + scales), everything else in
float32 — MiniLM's embeddings (11.9 M of its 22.6 M parameters) stay float, so they bound what quantising the
encoder layers can save; the rows also give the bytes of the quantised layers alone.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
from pathlib import Path

import torch

from .. import env_report
from ..data import make_task
from ..model import Transformer, TransformerConfig
from ..train import default_step, evaluate, train
from . import quantize as Q
from .sweeps import sweep_main, torch_threads

COMMAND = "python -m effedu.general.quantize_sweep"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "results" / "quantization.json"
SCHEMA_VERSION = 1

# the tiny model and its task: sort 7 tokens (sequence of 16 = 7 + SEP + 7 + pad), trains to ≈ 100 % in 200 steps
TINY = {"task": "sort", "seq_len": 16, "vocab_size": 12, "d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 128,
        "steps": 200, "batch": 64, "lr": 3e-3, "warmup": 20, "val_samples": 512, "val_seed": 10**6}
BITS = (8, 6, 4, 3, 2)
QAT_BITS = (8, 4, 2)
# (name, scheme, per_channel, calibration) of the PTQ sweeps
SCHEMES = (
    ("symmetric, per tensor", "symmetric", False, "minmax"),
    ("affine, per tensor", "affine", False, "minmax"),
    ("symmetric, per channel", "symmetric", True, "minmax"),
    ("affine, per channel", "affine", True, "minmax"),
)
MINILM_SCHEMES = (SCHEMES[0],) + SCHEMES[2:] + (("symmetric, per channel, percentile 99.9", "symmetric", True,
                                                   "percentile"),)
PERCENTILE = 99.9


# ----------------------------------------------------------------------------------------------------------------
# the tiny model
# ----------------------------------------------------------------------------------------------------------------

def tiny_config():
    """The TransformerConfig of the chapter's tiny model (a causal decoder sized for the ``sort`` task)."""
    t = TINY
    return TransformerConfig(vocab_size=t["vocab_size"], d_model=t["d_model"], n_heads=t["n_heads"],
                             n_layers=t["n_layers"], d_ff=t["d_ff"], max_len=t["seq_len"])


def tiny_batch(step, batch=None):
    """Training batch number ``step`` (seeded by the step: the same on every machine)."""
    return make_task(TINY["task"], batch or TINY["batch"], TINY["seq_len"], vocab_size=TINY["vocab_size"], seed=step)


def tiny_val(n=None):
    """The held-out batch every accuracy of the chapter is measured on (its own seed, never trained on)."""
    return make_task(TINY["task"], n or TINY["val_samples"], TINY["seq_len"], vocab_size=TINY["vocab_size"],
                     seed=TINY["val_seed"])


def tiny_accuracy(model, val=None):
    """Accuracy (fraction of scored answer tokens right) of ``model`` on the held-out batch."""
    return evaluate(model, tiny_val() if val is None else val)[1]


def train_tiny(*, steps=None, seed=0, model=None, lr=None, warmup=None, offset=0, step_fn=None):
    """Train the tiny model (a fresh one seeded with ``seed``, or ``model``) and return it, in eval mode.

    ``offset`` shifts the batch seeds (fine-tuning sees other batches than the first training); ``step_fn`` as in
    :func:`effedu.train.train`.
    """
    if model is None:
        torch.manual_seed(seed)
        model = Transformer(tiny_config())
    train(model, lambda s: tiny_batch(offset + s), steps=steps or TINY["steps"], lr=lr or TINY["lr"],
          warmup=TINY["warmup"] if warmup is None else warmup, seed=seed, step_fn=step_fn, progress=False)
    return model.eval()


def ptq_rows(model, evaluate_fn, *, bits=BITS, schemes=SCHEMES):
    """Weights-only PTQ of a copy of ``model`` for every (bits, scheme): rows with bytes and ``evaluate_fn``'s dict."""
    rows = []
    for b in bits:
        for name, scheme, per_channel, calibration in schemes:
            m = copy.deepcopy(model)
            nbytes = Q.ptq(m, b, scheme=scheme, per_channel=per_channel, calibration=calibration,
                           percentile=PERCENTILE)
            rows.append({"bits": b, "scheme": name, "bytes": nbytes, **evaluate_fn(m)})
    return rows


def qat_point(model, bits, *, steps, lr=1e-3, offset=10**5):
    """QAT of a copy of ``model`` at ``bits`` (weights per channel, activations float), converted: its accuracy.

    ``steps`` of fine-tuning through :class:`~effedu.general.quantize.QATLinear` (fake-quantised weights, STE),
    then :func:`~effedu.general.quantize.convert_qat` (8 bits: real int8 ``QuantizedLinear``; below: the grid
    weights in a float Linear). Returns the converted model.
    """
    m = Q.prepare_qat(copy.deepcopy(model), bits, per_channel=True, act_bits=None)
    train_tiny(model=m, steps=steps, lr=lr, warmup=0, offset=offset)
    return Q.convert_qat(m)


def _unwrap_quant_noise(model):
    """Replace every QuantNoise wrapper in ``model.blocks`` by the float Linear it holds (in place)."""
    for _, parent in list(model.blocks.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, Q.QuantNoise):
                setattr(parent, attr, child.linear)
    return model


def quant_noise_model(p, *, block_size, n_centroids, steps=None, refit_every=25, seed=0):
    """Train the tiny model from scratch with Quant-Noise (``quantizer="pq"``) at rate ``p``; the float model back.

    The codebooks are re-fitted to the current weights every ``refit_every`` steps (a codebook of the random
    initial weights would say nothing about the trained ones).
    """
    torch.manual_seed(seed)
    model = Transformer(tiny_config())
    if p == 0:
        return train_tiny(model=model, steps=steps, seed=seed)
    Q.quant_noise(model, p, block_size, "pq", n_centroids=n_centroids, iters=8, seed=seed)
    wrappers = [m for m in model.modules() if isinstance(m, Q.QuantNoise)]

    def step_fn(model, inputs, targets, optimizer):
        if step_fn.count % refit_every == 0 and step_fn.count:
            for w in wrappers:
                w.refit()
        step_fn.count += 1
        return default_step(model, inputs, targets, optimizer, grad_clip=1.0)

    step_fn.count = 0
    train_tiny(model=model, steps=steps, seed=seed, step_fn=step_fn)
    return _unwrap_quant_noise(model)


def sweep_tiny(*, quick=False, log=print):
    """The tiny model's part of the results (see the module docstring)."""
    t0 = time.perf_counter()
    steps = 20 if quick else TINY["steps"]
    qat_steps = 3 if quick else 60
    val = tiny_val(64 if quick else None)
    float_model = train_tiny(steps=steps)
    acc = {"accuracy": tiny_accuracy(float_model, val)}
    out = {"config": dict(TINY, steps=steps, val_samples=val.inputs.shape[0]),
           "float": {"bytes": Q.model_bytes(float_model), **acc}}
    log(f"tiny float model: accuracy {acc['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)")

    out["ptq"] = ptq_rows(float_model, lambda m: {"accuracy": tiny_accuracy(m, val)},
                          bits=(8, 4, 2) if quick else BITS)
    log(f"tiny PTQ: {len(out['ptq'])} points ({time.perf_counter() - t0:.0f} s)")

    # QAT vs PTQ at equal weights, and the control: the same number of float fine-tuning steps, then PTQ
    tuned = train_tiny(model=copy.deepcopy(float_model), steps=qat_steps, lr=1e-3, warmup=0, offset=10**5)
    qat = []
    for b in QAT_BITS:
        m_ptq = copy.deepcopy(float_model)
        Q.ptq(m_ptq, b, scheme="symmetric", per_channel=True)
        m_tuned = copy.deepcopy(tuned)
        Q.ptq(m_tuned, b, scheme="symmetric", per_channel=True)
        m_qat = qat_point(float_model, b, steps=qat_steps)
        qat.append({"bits": b, "steps": qat_steps, "ptq": tiny_accuracy(m_ptq, val),
                    "ptq_after_float_finetune": tiny_accuracy(m_tuned, val), "qat": tiny_accuracy(m_qat, val)})
    out["qat"] = qat
    log(f"tiny QAT: {[(r['bits'], round(r['ptq'], 3), round(r['qat'], 3)) for r in qat]} "
        f"({time.perf_counter() - t0:.0f} s)")

    # iPQ of the float model, without and with fine-tuning between layers
    ipq_cfg = [(8, 16)] if quick else [(4, 16), (8, 64), (8, 16)]
    ft_steps = 2 if quick else 30
    rows = []
    for bs, k in ipq_cfg:
        for finetune in (False, True):
            m = copy.deepcopy(float_model)
            fn = (lambda mm: train_tiny(model=mm, steps=ft_steps, lr=1e-3, warmup=0, offset=2 * 10**5)) \
                if finetune else None
            info = Q.ipq(m, bs, k, finetune=fn, iters=3 if quick else 10)
            rows.append({"block_size": bs, "n_centroids": k, "finetune_steps_per_layer": ft_steps if finetune else 0,
                         "bytes": info["bytes"], "accuracy": tiny_accuracy(m, val)})
    out["ipq"] = rows
    log(f"tiny iPQ: {len(rows)} points ({time.perf_counter() - t0:.0f} s)")

    # Quant-Noise, then full iPQ (no fine-tuning)
    qn_bs, qn_k = 8, 16
    rows = []
    for p in ((0.0, 0.2) if quick else (0.0, 0.1, 0.5)):
        # p = 0 is the float model itself (same seed, same batches)
        m = copy.deepcopy(float_model) if p == 0 else quant_noise_model(
            p, block_size=qn_bs, n_centroids=qn_k, steps=steps, refit_every=5 if quick else 25)
        acc_float = tiny_accuracy(m, val)
        info = Q.ipq(m, qn_bs, qn_k, iters=3 if quick else 10)
        rows.append({"p": p, "quantizer": "pq", "block_size": qn_bs, "n_centroids": qn_k, "steps": steps,
                     "accuracy_float": acc_float, "accuracy_ipq": tiny_accuracy(m, val), "bytes_ipq": info["bytes"]})
    out["quant_noise"] = rows
    log(f"tiny Quant-Noise: {[(r['p'], round(r['accuracy_float'], 3), round(r['accuracy_ipq'], 3)) for r in rows]} "
        f"({time.perf_counter() - t0:.0f} s)")
    out["seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------------------------------

def encoder_linear_bytes(model):
    """float32 bytes of the weights of every nn.Linear in ``model.blocks`` (what PTQ / iPQ shrink)."""
    return sum(m.weight.numel() * 4 for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))


def weight_rel_error(reference, model):
    """‖W − Ŵ‖ / ‖W‖ over all encoder-layer Linear weights together (reference: the float model)."""
    num = den = 0.0
    ref = {n: m.weight for n, m in reference.blocks.named_modules() if isinstance(m, torch.nn.Linear)}
    for n, m in model.blocks.named_modules():
        if n in ref and isinstance(m, torch.nn.Linear):
            num += float((m.weight.detach().double() - ref[n].detach().double()).pow(2).sum())
            den += float(ref[n].detach().double().pow(2).sum())
    return math.sqrt(num / den)


def torchao_point(encoder, fid):
    """The production comparison: torchao's int8 dynamic-activation / int8-weight quantisation of the same encoder
    layers (``quantize_(model, Int8DynamicActivationInt8WeightConfig())``): its fidelity, or why it did not run."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # torchao prints "Failed to load …_C_*.so" on CPU-only
            import torchao
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception as e:  # pragma: no cover - depends on the installation
        return {"error": f"{type(e).__name__}: {e}"}
    m = copy.deepcopy(encoder)
    quantize_(m, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and fqn.startswith("blocks."))
    return {"version": torchao.__version__, "config": "Int8DynamicActivationInt8WeightConfig", **fid(m)}


def sweep_minilm(*, quick=False, torchao=True, log=print):
    """MiniLM's part: size in MB vs fidelity for PTQ, int8 inference and iPQ (no fine-tuning)."""
    from ..data.sentences import load_sentences
    from ..pretrained import fidelity, load_minilm

    t0 = time.perf_counter()
    sentences, topics = load_sentences()
    # 10 sentences per topic (120; quick: 1 per topic): the nearest neighbours stay meaningful, the sweep stays short
    per_topic = 1 if quick else 10
    sentences = [s for i, s in enumerate(sentences) if i - topics.index(topics[i]) < per_topic]
    encoder, _ = load_minilm()
    reference = encoder.embed(sentences)
    linear_bytes = encoder_linear_bytes(encoder)
    total = Q.model_bytes(encoder)
    out = {"n_sentences": len(sentences), "float": {"bytes": total, "encoder_linear_bytes": linear_bytes},
           "finetuning": "none"}
    log(f"MiniLM float: {total / 1e6:.1f} MB, of which encoder Linear weights {linear_bytes / 1e6:.1f} MB")

    def fid(m):
        f = fidelity(reference, m, sentences)
        return {"cosine": f["cosine"], "top1": f["top1"], "top5": f["top5"]}

    def row_of(m, nbytes):
        return {"bytes": nbytes, "linear_bytes": nbytes - (total - linear_bytes),
                "weight_rel_error": weight_rel_error(encoder, m), **fid(m)}

    rows = []
    for b in ((8, 2) if quick else BITS):
        for name, scheme, per_channel, calibration in (SCHEMES[2:3] if quick else MINILM_SCHEMES):
            m = copy.deepcopy(encoder)
            nbytes = Q.ptq(m, b, scheme=scheme, per_channel=per_channel, calibration=calibration,
                           percentile=PERCENTILE)
            rows.append({"bits": b, "scheme": name, **row_of(m, nbytes)})
    out["ptq"] = rows
    log(f"MiniLM PTQ: {len(rows)} points ({time.perf_counter() - t0:.0f} s)")

    m = copy.deepcopy(encoder)
    n = Q.quantize_linears(m, backend="auto")
    qbytes = sum(q.weight_bytes() for q in m.modules() if isinstance(q, Q.QuantizedLinear))
    out["int8_dynamic"] = {"layers": n, "bytes": Q.model_bytes(m), "linear_bytes": qbytes,
                           "backend": "auto (effedu's int8_matmul)",
                           "activations": "dynamic symmetric int8 per token", **fid(m)}
    log(f"MiniLM int8 W8A8: cosine {out['int8_dynamic']['cosine']:.4f} ({time.perf_counter() - t0:.0f} s)")

    out["torchao"] = torchao_point(encoder, fid) if torchao else {"skipped": "not requested"}
    log(f"MiniLM torchao: {out['torchao']} ({time.perf_counter() - t0:.0f} s)")

    rows = []
    # quick: layer 1 only (k-means over all 14 M encoder weights takes a while)
    for bs, k in ([(8, 16)] if quick else [(4, 256), (8, 256), (8, 16)]):
        m = copy.deepcopy(encoder)
        info = Q.ipq(m, bs, k, iters=3 if quick else 8, skip=("blocks.[1-9].*",) if quick else ())
        rows.append({"block_size": bs, "n_centroids": k, "bits_per_weight": math.log2(k) / bs,
                     "layers": len(info["layers"]),
                     **row_of(m, info["bytes"])})
        log(f"MiniLM iPQ bs={bs} k={k}: cosine {rows[-1]['cosine']:.3f} ({time.perf_counter() - t0:.0f} s)")
    out["ipq"] = rows
    out["seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------------------------------------------
# the whole run and its file
# ----------------------------------------------------------------------------------------------------------------



def run_sweep(*, quick=False, threads=None, parts=("tiny", "minilm"), torchao=True, log=None):
    """Run the sweeps; returns the results dict (what :func:`main` writes as JSON)."""
    unknown = set(parts) - {"tiny", "minilm"}
    if unknown or not parts:
        raise ValueError(f"run_sweep: parts must be a non-empty subset of ('tiny', 'minilm'), got {parts!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"run_sweep: threads must be an int ≥ 1 or None, got {threads!r}")
    log = log or (lambda *a: print(*a, flush=True))
    t0 = time.perf_counter()
    with torch_threads(threads):
        results = {"schema": SCHEMA_VERSION, "command": COMMAND + (" --quick" if quick else ""), "quick": quick,
                   "env": env_report(print_report=False)}
        if "tiny" in parts:
            results["tiny"] = sweep_tiny(quick=quick, log=log)
        if "minilm" in parts:
            results["minilm"] = sweep_minilm(quick=quick, torchao=torchao, log=log)
    results["seconds"] = time.perf_counter() - t0
    return results


def load_results(path=None):
    """The committed results (``data/results/quantization.json`` by default) as a dict."""
    path = DEFAULT_OUT if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_results: {path} is missing; regenerate it with `{COMMAND}`")
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv=None):
    def options(p):
        p.add_argument("--parts", nargs="+", default=["tiny", "minilm"], choices=["tiny", "minilm"])
        p.add_argument("--no-torchao", action="store_true", help="skip the torchao comparison (its import is slow)")

    return sweep_main(argv, command=COMMAND, description=__doc__, default_out=DEFAULT_OUT, indent=1,
                      add_arguments=options,
                      run=lambda a: run_sweep(quick=a.quick, threads=a.threads, parts=tuple(a.parts),
                                              torchao=not a.no_torchao))


__all__ = ["COMMAND", "DEFAULT_OUT", "TINY", "BITS", "QAT_BITS", "SCHEMES", "MINILM_SCHEMES", "tiny_config",
           "tiny_batch", "tiny_val", "tiny_accuracy", "train_tiny", "ptq_rows", "qat_point", "quant_noise_model",
           "sweep_tiny", "sweep_minilm", "encoder_linear_bytes", "weight_rel_error", "run_sweep", "load_results",
           "main"]

if __name__ == "__main__":
    main()
