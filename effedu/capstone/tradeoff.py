"""The trade-off grid behind the capstone's explorer: the course's techniques *combined* on one model, measured.

Pick a constraint — sequence length, a memory budget, a time budget, training or inference, CPU or GPU — and ask
which combination of chapters meets it (say local attention on the block-sparse kernel + gradient checkpointing +
bf16), at what measured cost and with what quality. Nothing here is a hard-coded table: :func:`run_grid` builds
one model per attention and measures every combination with the course's meters, the capstone run stores the rows
(``results/capstone.json``, section ``grid``), and the explorer only filters them (:func:`feasible`,
:func:`best`, :func:`plot_tradeoff`, all well under a second); :func:`measure_combination` re-measures one
combination live through the same code path.

**The model.** One :class:`effedu.model.Transformer` encoder (``causal=False``; d 64, 4 heads, 2 layers, d_ff 256
in the full grid) classifying the one-hop needle (:func:`effedu.data.long_range.make_needle`, ``hops=1``; the
label at the last position). Its learned positions cover the longest length of the grid.

**The axes.**

* attention — one representative per family the course builds: ``dense`` (chapter 01, the baseline),
  ``memory_efficient`` (exact, tiled online softmax), ``local`` with ``block_size`` (fixed sparse on the
  block-sparse kernel), ``linear`` (kernel, elu + 1) and ``performer`` (kernel, FAVOR+ random features; chosen
  over linformer because it does not tie the model to one length);
* checkpointing (training only) — :func:`effedu.general.checkpoint.checkpoint_model`, strategy ``"every"`` (each
  block its own segment: only block inputs are kept, the blocks are recomputed in the backward pass);
* precision — training: the course's mixed precision (:class:`effedu.general.precision.MixedPrecisionModel` +
  :func:`~effedu.general.precision.mixed_precision_step`: float32 master weights, bfloat16 forward and backward;
  on a CPU its bf16 matmuls are emulated as chapter 05 describes — float32 products rounded once to bf16 — not
  ``torch.autocast``); inference: bf16 weights and activations (:func:`~effedu.general.precision.cast_model`);
* int8 (inference only) — :func:`effedu.general.quantize.quantize_linears`: every Linear inside the blocks becomes
  chapter 08's ``QuantizedLinear`` (int8 weights per channel, dynamic int8 activations, int32 sums);
* sequence length.

One thing the grid shows that a table would hide: ``local`` + bf16 on a CPU costs what dense does. The block-sparse
numba kernel takes float32/float64 only, so ``backend="auto"`` sends bf16 to the masked-dense torch reference
(:func:`effedu.kernels.block_sparse.block_sparse_attention`); on a GPU the cuda kernel runs instead.

Training rows: attention × checkpointing × precision × length. Inference rows: attention × (fp32, bf16, int8) ×
length. A combination that fails to run (a kernel that takes no bf16, say) is kept as ``status="cannot"`` with the
error as ``why``; combinations that make no sense (int8 training, checkpointing at inference) are absent from the
grid, and :func:`measure_combination` answers them with ``"cannot"``.

**What is measured per row.** ``step_ms``: the median (:func:`effedu.measure.time_it`) of a training step
(forward + backward + optimizer step) or of a no-grad forward, on a batch of ``batch_size`` sequences.
``peak_mib``: :func:`effedu.measure.peak_memory` of one such step (bytes allocated above what was live before:
activations, gradients, temporaries; the profiler on a CPU, the allocator's high-water mark on a GPU).
``params``: :func:`effedu.measure.count_parameters`; ``model_mib``: :func:`effedu.general.quantize.model_bytes`
of the model as it runs (int8 weights 1 byte, bf16 2, float32 4; a mixed-precision model counts its float32
masters *and* its bf16 working copy).

**Quality.** Measured, never invented: each attention is trained once (float32, seeded, a short budget on the
needle at ``quality.seq_len``) and, for the bf16 training rows, once more with mixed precision and the same budget
and seed. ``quality`` is the needle accuracy on a fixed validation set *at the training length*, evaluated with the
row's numerics (the bf16 copy, the int8 copy): the quality of the combination; the cost columns are at the row's
length. Checkpointing never changes the maths (the same gradients), so its rows carry the accuracy of the same
training without it, and ``quality_metric`` says so.

**The rule of :func:`best`.** Among the feasible rows, the highest quality wins; quality ties (equal to 1e-9) go to
the fastest (lowest ``step_ms``), then the smallest ``peak_mib``, then the label (so the choice is deterministic).
"""
from __future__ import annotations

import copy
import math
import time

import torch

from .. import measure
from .._checks import check_bool, check_choice, check_positive_int

ATTENTIONS = ("dense", "memory_efficient", "local", "linear", "performer")
FAMILIES = {"dense": "baseline", "memory_efficient": "exact", "local": "fixed sparse", "linear": "kernel",
            "performer": "kernel"}
PRECISIONS = ("fp32", "bf16")
MODES = ("train", "inference")
DEVICES = ("cpu", "cuda")
MIB = 2 ** 20

# the quality budget: 150 steps of 16 needles of 128 tokens, one seed (dense reaches ~0.98 accuracy there; chance
# 1/8; between two trainings of this length, differences of ~0.1 are seed noise, not a property of a technique).
# train_bf16: also train once with mixed precision for the bf16 training rows (measured: about the cost of the fp32
# training here); False: those rows carry the fp32 accuracy and their quality_metric says so
QUALITY = dict(seq_len=128, steps=150, batch_size=16, lr=3e-3, n_values=8, n_keys=16, depth=0.25, hops=1, seed=0,
               n_val=128, val_seed=10_000, train_bf16=True)
GRID = dict(attentions=ATTENTIONS, lengths=(256, 1024, 2048), d_model=64, n_heads=4, n_layers=2, d_ff=256,
            batch_size=1, warmup=1, repeat=3, checkpoint_strategy="every", window=64, block_size=32,
            quality=QUALITY)
GRID_QUICK = dict(GRID, lengths=(32, 64), d_model=16, n_heads=2, n_layers=2, d_ff=32, batch_size=2, warmup=0,
                  repeat=1, window=16, block_size=16,
                  quality=dict(QUALITY, seq_len=32, steps=2, batch_size=4, n_val=8))
LIVE_QUICK = dict(warmup=1, repeat=2)  # measure_combination(quick=True): the grid's model, fewer repeats


# --------------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------------


def _budget(value, name, where):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{where}: {name} must be a number ≥ 0 or None, got {value!r}")
    return float(value)


def _rows(grid, where):
    if isinstance(grid, dict) and "rows" in grid:
        rows = grid["rows"]
    elif isinstance(grid, (list, tuple)):
        rows = grid
    else:
        raise TypeError(f"{where}: grid must be the grid dict (with 'rows') or a list of rows, "
                        f"got {type(grid).__name__}")
    return rows


# --------------------------------------------------------------------------------------------------------------
# the model and its variants
# --------------------------------------------------------------------------------------------------------------


def attention_kwargs(name, settings):
    """The attention keyword arguments of ``name`` in the grid (local: a window on the block-sparse kernel)."""
    s = settings
    return {"dense": {}, "memory_efficient": {}, "local": {"window": s["window"], "block_size": s["block_size"]},
            "linear": {}, "performer": {"seed": 0}}[name]


def _info(settings):
    from ..data.long_range import long_range_info

    q = settings["quality"]
    return long_range_info("needle", n_values=q["n_values"], n_keys=q["n_keys"])


def build_model(attention, settings, *, seed=0):
    """The grid's float32 encoder with ``attention``; learned positions cover the longest length."""
    from ..model import Transformer, TransformerConfig

    s = settings
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=_info(s)["vocab_size"], d_model=s["d_model"], n_heads=s["n_heads"],
                            n_layers=s["n_layers"], d_ff=s["d_ff"], max_len=max(max(s["lengths"]),
                                                                                s["quality"]["seq_len"]),
                            causal=False, attention=attention, attention_kwargs=attention_kwargs(attention, s))
    return Transformer(cfg)


def _needle(settings, n, seq_len, seed):
    from ..data.long_range import make_needle

    q = settings["quality"]
    b = make_needle(n, seq_len, n_values=q["n_values"], n_keys=q["n_keys"], depth=q["depth"], hops=q["hops"],
                    seed=seed)
    return b.inputs, b.targets


def _wrap_train(model, checkpointing, precision, settings):
    """The model a training step runs: checkpointed blocks and/or the mixed-precision wrapper (master weights)."""
    from ..general.checkpoint import checkpoint_model
    from ..general.precision import MixedPrecisionModel

    if checkpointing:
        model = checkpoint_model(model, settings["checkpoint_strategy"])
    if precision == "bf16":
        model = MixedPrecisionModel(model, torch.bfloat16)
    return model


def _wrap_inference(model, precision, int8):
    """A copy of ``model`` as it runs at inference: bf16 weights and activations, or int8 Linears in the blocks."""
    from ..general.precision import cast_model
    from ..general.quantize import quantize_linears

    if precision == "bf16":
        model = cast_model(model, torch.bfloat16)
    else:
        model = copy.deepcopy(model)
    if int8:
        quantize_linears(model)
    return model.eval()


def _model_bytes(model):
    from ..general.quantize import model_bytes

    n = model_bytes(model)
    working = getattr(model, "working", None)  # a MixedPrecisionModel: the bf16 working copy (non-persistent)
    if working is not None:
        n += sum(t.numel() * t.element_size() for t in model.working_tensors)
    return n


def _train_step_fn(model, optimizer):
    from ..general.precision import mixed_precision_step

    def step(inputs, targets):
        return mixed_precision_step(model, inputs, targets, optimizer)  # plain models: a float32 step

    return step


# --------------------------------------------------------------------------------------------------------------
# quality: train once per (attention, training precision), evaluate under each combination
# --------------------------------------------------------------------------------------------------------------


def train_for_quality(attention, settings, *, precision="fp32", device="cpu", log=None):
    """Train the grid's model with ``attention`` on the needle (``settings["quality"]``); returns
    ``(fp32 model, accuracy, seconds)`` — the accuracy of the model as trained (bf16: its mixed-precision forward)."""
    from ..train import evaluate, train

    q = settings["quality"]
    model = build_model(attention, settings, seed=q["seed"]).to(device)
    trained = _wrap_train(model, False, precision, settings)

    def batches(step):
        return _needle(settings, q["batch_size"], q["seq_len"], 1000 * q["seed"] + step)

    from ..general.precision import mixed_precision_step

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        train(trained, batches, steps=q["steps"], lr=q["lr"], seed=q["seed"], progress=False,
              step_fn=lambda m, x, y, opt: mixed_precision_step(m, x, y, opt))
    seconds = time.perf_counter() - t0
    val = _needle(settings, q["n_val"], q["seq_len"], q["val_seed"])
    with torch.no_grad():
        _, acc = evaluate(trained, (val[0].to(device), val[1].to(device)))
    if log:
        log(f"grid: trained {attention} ({precision}) on the needle, T={q['seq_len']}: accuracy {acc:.3f}, "
            f"{seconds:.1f} s")
    return model.eval(), float(acc), seconds


def _evaluate(model, settings, device):
    from ..train import evaluate

    q = settings["quality"]
    val = _needle(settings, q["n_val"], q["seq_len"], q["val_seed"])
    with torch.no_grad():
        return float(evaluate(model, (val[0].to(device), val[1].to(device)))[1])


# --------------------------------------------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------------------------------------------


def combination_label(row):
    """``"local + checkpointing + bf16"``: the attention, then each technique switched on (fp32 is the default)."""
    if not isinstance(row, dict):
        raise TypeError(f"combination_label: row must be a dict, got {type(row).__name__}")
    parts = [str(row.get("attention", "?"))]
    if row.get("checkpointing"):
        parts.append("checkpointing")
    if row.get("precision", "fp32") != "fp32":
        parts.append(str(row["precision"]))
    if row.get("int8"):
        parts.append("int8")
    return " + ".join(parts)


def _quality_metric(mode, attention, checkpointing, precision, int8, settings, trained_precision):
    T = settings["quality"]["seq_len"]
    text = f"needle (1 hop) accuracy at T={T}"
    if mode == "inference":
        how = "int8 Linears" if int8 else ("bf16 weights+activations" if precision == "bf16" else "fp32")
        text += f", model trained in fp32, evaluated with {how}"
    else:
        text += f", after training in {trained_precision}"
        if trained_precision != precision:
            text += f" (no {precision} training in this grid's budget: the fp32 accuracy)"
        if checkpointing:
            text += "; checkpointing does not change the maths: the accuracy of the same training without it"
    return text


def _empty_row(mode, device, seq_len, attention, checkpointing, precision, int8):
    return {"mode": mode, "device": device, "seq_len": int(seq_len), "attention": attention,
            "checkpointing": bool(checkpointing), "precision": precision, "int8": bool(int8), "status": "ok",
            "why": None, "step_ms": None, "peak_mib": None, "quality": None, "quality_metric": "", "params": 0,
            "model_mib": 0.0}


def _cannot(row, why):
    row.update(status="cannot", why=why, step_ms=None, peak_mib=None)
    return row


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure_row(model, *, mode, device, seq_len, attention, checkpointing, precision, int8, settings,
                quality=None, quality_metric="", timing=None):
    """Measure one combination of the fp32 ``model`` (trained or not): returns a row of the grid's schema."""
    row = _empty_row(mode, device, seq_len, attention, checkpointing, precision, int8)
    row["quality_metric"] = quality_metric
    row["quality"] = None if quality is None else float(quality)
    row["params"] = int(measure.count_parameters(model))
    row["model_mib"] = _model_bytes(model) / MIB  # the float32 model; replaced by the running model's below
    timing = timing or settings
    if mode == "train" and int8:
        return _cannot(row, "int8 here is post-training quantization (QuantizedLinear has no backward): "
                            "inference only")
    if mode == "inference" and checkpointing:
        return _cannot(row, "checkpointing trades recomputation for the activations saved for backward; "
                            "inference saves none")
    if mode == "inference" and int8 and precision != "fp32":
        return _cannot(row, "int8 Linears take float32 activations in this course; int8 is measured with fp32")
    B = settings["batch_size"]
    x, y = _needle(settings, B, seq_len, seed=123)
    x, y = x.to(device), y.to(device)
    try:
        if mode == "train":
            base = copy.deepcopy(model).to(device).train()
            run_model = _wrap_train(base, checkpointing, precision, settings)
            opt = torch.optim.AdamW(run_model.parameters(), lr=1e-4)
            fn = _train_step_fn(run_model, opt)
            args = (x, y)
        else:
            run_model = _wrap_inference(model.to(device), precision, int8)

            def fn(inputs):
                with torch.no_grad():
                    return run_model(inputs)

            args = (x,)
        row["model_mib"] = _model_bytes(run_model) / MIB
        for _ in range(timing["warmup"]):  # first calls: numba compiles / loads, the optimizer makes its state
            fn(*args)
        _sync(device)
        peak, out = measure.peak_memory(fn, *args, device=device)  # also one more warm-up for the timing
        seconds = measure.time_it(fn, *args, warmup=0, repeat=timing["repeat"], device=device)
        if mode == "train" and not math.isfinite(out):
            return _cannot(row, f"the training step's loss is {out}")
        row["step_ms"] = seconds * 1e3
        row["peak_mib"] = peak / MIB
    except Exception as e:  # noqa: BLE001 - a combination that fails to run is a row of the grid, with its why
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return _cannot(row, f"{type(e).__name__}: {msg[:200]}")
    return row


# --------------------------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------------------------


def _threads(n):
    """torch's and numba's thread counts set to ``n`` for the block (None: unchanged), restored after."""
    from ..general.sweeps import torch_numba_threads

    if n is not None:
        check_positive_int(n, "threads", "run_grid")
    return torch_numba_threads(n)


def _jsonable(settings):
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out[k] = _jsonable(v)
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _device_rows(device, settings, trained, log):
    """Every row of the grid on ``device`` from the trained models ``{attention: {"fp32": (model, acc), ...}}``."""
    rows = []
    for attention in settings["attentions"]:
        fp32_model, fp32_acc = trained[attention]["fp32"]
        inference_q = {}
        for precision, int8 in (("fp32", False), ("bf16", False), ("fp32", True)):
            try:
                inference_q[(precision, int8)] = _evaluate(_wrap_inference(fp32_model.to(device), precision, int8),
                                                           settings, device)
            except Exception:  # noqa: BLE001 - measured as "cannot" below, with its why
                inference_q[(precision, int8)] = None
        t0 = time.perf_counter()
        for seq_len in settings["lengths"]:
            t1 = time.perf_counter()
            for checkpointing in (False, True):
                for precision in PRECISIONS:
                    tp = precision if precision in trained[attention] else "fp32"
                    rows.append(measure_row(
                        fp32_model, mode="train", device=device, seq_len=seq_len, attention=attention,
                        checkpointing=checkpointing, precision=precision, int8=False, settings=settings,
                        quality=trained[attention][tp][1],
                        quality_metric=_quality_metric("train", attention, checkpointing, precision, False,
                                                       settings, tp)))
            for precision, int8 in (("fp32", False), ("bf16", False), ("fp32", True)):
                rows.append(measure_row(
                    fp32_model, mode="inference", device=device, seq_len=seq_len, attention=attention,
                    checkpointing=False, precision=precision, int8=int8, settings=settings,
                    quality=inference_q[(precision, int8)],
                    quality_metric=_quality_metric("inference", attention, False, precision, int8, settings,
                                                   "fp32")))
            if log:
                log(f"grid: {attention} on {device} at T={seq_len}: {time.perf_counter() - t1:.1f} s")
        if log:
            log(f"grid: {attention} on {device}, {len(settings['lengths'])} lengths: "
                f"{time.perf_counter() - t0:.1f} s")
    return rows


def run_grid(quick=False, *, log=None, threads=None, settings=None):
    """The whole grid (see the module docstring); ``quick``: tiny sizes (seq 32/64, d 16, 2 layers, 2 steps).

    Returns ``{"settings", "device", "attentions", "lengths", "rows"}`` (the capstone's pinned schema); on a machine
    with a GPU the rows are measured on the CPU and on ``"cuda"`` (``device`` is then ``"cuda"``)."""
    where = "run_grid"
    quick = bool(quick)
    if threads is not None:
        check_positive_int(threads, "threads", where)
    s = settings if settings is not None else (GRID_QUICK if quick else GRID)
    for a in s["attentions"]:
        check_choice(a, ATTENTIONS, "attention", where)
    t0 = time.perf_counter()
    devices = _devices()
    rows, train_seconds = [], {}
    with _threads(threads), torch.random.fork_rng(devices=[]):
        trained = {}
        for attention in s["attentions"]:
            trained[attention] = {}
            for precision in PRECISIONS if s["quality"].get("train_bf16", True) else ("fp32",):
                model, acc, sec = train_for_quality(attention, s, precision=precision, log=log)
                trained[attention][precision] = (model, acc)
                train_seconds[f"{attention}/{precision}"] = round(sec, 2)
        for device in devices:
            rows.extend(_device_rows(device, s, trained, log))
            for attention in s["attentions"]:  # back on the CPU for the next device's copies
                trained[attention]["fp32"][0].to("cpu")
    out_settings = _jsonable(s)
    out_settings.update(quick=bool(quick), threads=threads if threads is not None else torch.get_num_threads(),
                        families={a: FAMILIES[a] for a in s["attentions"]},
                        attention_kwargs={a: attention_kwargs(a, s) for a in s["attentions"]},
                        training_precision="course mixed precision (fp32 masters, bf16 compute; CPU: emulated "
                                           "bf16 matmuls)", inference_bf16="cast_model (bf16 weights+activations)",
                        int8="quantize_linears (QuantizedLinear, backend auto)",
                        train_seconds=train_seconds, seconds=round(time.perf_counter() - t0, 2),
                        chance=_info(s)["chance"])
    if log:
        log(f"grid: {len(rows)} rows in {time.perf_counter() - t0:.1f} s")
    return {"settings": out_settings, "device": devices[-1], "attentions": list(s["attentions"]),
            "lengths": [int(n) for n in s["lengths"]], "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# the explorer's helpers
# --------------------------------------------------------------------------------------------------------------


def feasible(grid, *, seq_len, mode, device="cpu", memory_budget_mib=None, time_budget_ms=None):
    """The rows of ``grid`` at ``seq_len`` / ``mode`` / ``device`` that ran (status ``"ok"``) and fit the budgets
    (``peak_mib ≤ memory_budget_mib``, ``step_ms ≤ time_budget_ms``; None: no limit)."""
    where = "feasible"
    rows = _rows(grid, where)
    check_positive_int(seq_len, "seq_len", where)
    check_choice(mode, MODES, "mode", where)
    check_choice(device, DEVICES, "device", where)
    mem = _budget(memory_budget_mib, "memory_budget_mib", where)
    ms = _budget(time_budget_ms, "time_budget_ms", where)
    out = []
    for r in rows:
        if r.get("seq_len") != seq_len or r.get("mode") != mode or r.get("device") != device:
            continue
        if r.get("status") != "ok" or r.get("step_ms") is None or r.get("peak_mib") is None:
            continue
        if mem is not None and r["peak_mib"] > mem:
            continue
        if ms is not None and r["step_ms"] > ms:
            continue
        out.append(r)
    return out


def _rank(row):
    q = row.get("quality")
    q = -math.inf if q is None else q
    # highest quality first; ties (to 1e-9) → fastest, then smallest peak, then the label
    return (-round(q, 9), row["step_ms"], row["peak_mib"], combination_label(row))


def best(grid, *, seq_len, mode, device="cpu", memory_budget_mib=None, time_budget_ms=None):
    """The feasible row (:func:`feasible`) with the highest quality; ties → the fastest, then the smallest
    ``peak_mib``, then the label. None when no row fits."""
    rows = feasible(grid, seq_len=seq_len, mode=mode, device=device, memory_budget_mib=memory_budget_mib,
                    time_budget_ms=time_budget_ms)
    return min(rows, key=_rank) if rows else None


def plot_tradeoff(grid, *, seq_len, mode="train", device="cpu", memory_budget_mib=None, time_budget_ms=None):
    """Time per step vs peak memory of every combination at ``seq_len`` (``mode``, ``device``): colour = quality,
    the feasible region (inside both budgets) shaded, the best feasible row annotated. Returns a Figure.

    With no rows for that device/length/mode, or none that fits, a message is drawn in the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    where = "plot_tradeoff"
    rows = _rows(grid, where)
    all_ok = feasible(rows, seq_len=seq_len, mode=mode, device=device)  # validates the arguments too
    mem = _budget(memory_budget_mib, "memory_budget_mib", where)
    ms = _budget(time_budget_ms, "time_budget_ms", where)
    fits = feasible(rows, seq_len=seq_len, mode=mode, device=device, memory_budget_mib=mem, time_budget_ms=ms)
    top = min(fits, key=_rank) if fits else None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    what = "training step" if mode == "train" else "inference forward"
    ax.set_title(f"{what}s at T={seq_len} on {device}: cost and quality of each combination")
    ax.set_xlabel(f"time per {what} (ms, median, log scale)")
    ax.set_ylabel("peak memory per step (MiB above the start, log)")
    cannot = [r for r in rows if r.get("seq_len") == seq_len and r.get("mode") == mode
              and r.get("device") == device and r.get("status") != "ok"]
    if not all_ok:
        msg = (f"no measured rows for {mode} at T={seq_len} on {device}"
               + (f" ({len(cannot)} combinations could not run)" if cannot else "")
               + ("\n(run the capstone on a machine with a GPU)" if device == "cuda" else ""))
        ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    # log–log: the combinations span orders of magnitude in both costs
    xs = [max(r["step_ms"], 1e-3) for r in all_ok]
    ys = [max(r["peak_mib"], 1e-3) for r in all_ok]
    qs = [math.nan if r.get("quality") is None else r["quality"] for r in all_ok]
    xlo, xhi, ylo, yhi = min(xs) / 1.6, max(xs) * 1.6, min(ys) / 1.6, max(ys) * 1.6
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(ylo, yhi)
    x_edge = min(ms, xhi) if ms is not None else xhi
    y_edge = min(mem, yhi) if mem is not None else yhi
    if x_edge > xlo and y_edge > ylo:
        ax.add_patch(plt.Rectangle((xlo, ylo), x_edge - xlo, y_edge - ylo, color="tab:green", alpha=0.12, lw=0))
    if ms is not None:
        ax.axvline(max(ms, xlo), color="tab:green", ls="--", lw=1)
    if mem is not None:
        ax.axhline(max(mem, ylo), color="tab:green", ls="--", lw=1)
    sc = ax.scatter(xs, ys, c=qs, cmap="viridis", vmin=0.0, vmax=1.0, s=60, edgecolors="k", linewidths=0.5,
                    plotnonfinite=True, zorder=3)
    fig.colorbar(sc, ax=ax, label="quality (needle accuracy)")
    fitting = {id(r) for r in fits}
    for r, x, y in zip(all_ok, xs, ys):
        ax.annotate(combination_label(r), (x, y), fontsize=6, xytext=(4, 3), textcoords="offset points",
                    color="black" if id(r) in fitting else "grey")
    handles = [Patch(color="tab:green", alpha=0.3, label="inside the budgets")]
    if top is not None:
        bx, by = max(top["step_ms"], 1e-3), max(top["peak_mib"], 1e-3)
        h = ax.scatter([bx], [by], s=220, facecolors="none", edgecolors="tab:red", linewidths=2, zorder=4,
                       label=f"best: {combination_label(top)}")
        q = top.get("quality")
        ax.annotate(f"best: {combination_label(top)}\n{top['step_ms']:.1f} ms, {top['peak_mib']:.1f} MiB"
                    + (f", quality {q:.2f}" if q is not None else ""), (bx, by),
                    xytext=(0.03, 0.97), textcoords="axes fraction", ha="left", va="top", fontsize=8,
                    color="tab:red", bbox=dict(boxstyle="round", fc="white", ec="tab:red", alpha=0.9),
                    arrowprops=dict(arrowstyle="->", color="tab:red"), zorder=5)
        handles.append(h)
    else:
        ax.text(0.5, 0.97, "no combination fits these budgets", ha="center", va="top", transform=ax.transAxes,
                fontsize=11, color="tab:red", bbox=dict(boxstyle="round", fc="white", ec="tab:red", alpha=0.9))
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def measure_combination(*, attention, checkpointing=False, precision="fp32", int8=False, seq_len=256,
                        mode="train", quick=True, device="cpu", settings=None):
    """Measure one combination live (the explorer's button): the grid's model and code path, a row of its schema.

    ``quick`` (default): one warm-up and two repeats; the model is untrained, so ``quality`` is None (the grid's
    row holds the trained accuracy). About a second at T=256 on two cores for most combinations."""
    where = "measure_combination"
    check_choice(attention, ATTENTIONS, "attention", where)
    check_bool(checkpointing, "checkpointing", where)
    check_choice(precision, PRECISIONS, "precision", where)
    check_bool(int8, "int8", where)
    check_positive_int(seq_len, "seq_len", where)
    check_choice(mode, MODES, "mode", where)
    check_choice(device, DEVICES, "device", where)
    check_bool(quick, "quick", where)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}: device 'cuda' asked for, but torch sees no GPU here")
    s = dict(settings if settings is not None else GRID)
    s["lengths"] = tuple(sorted(set(s["lengths"]) | {seq_len}))
    model = build_model(attention, s, seed=s["quality"]["seed"]).eval()
    timing = dict(s, **LIVE_QUICK) if quick else s
    return measure_row(model, mode=mode, device=device, seq_len=seq_len, attention=attention,
                       checkpointing=checkpointing, precision=precision, int8=int8, settings=s, quality=None,
                       quality_metric="none: measured live on an untrained model (the grid holds the accuracy)",
                       timing=timing)


__all__ = ["ATTENTIONS", "FAMILIES", "PRECISIONS", "MODES", "DEVICES", "GRID", "GRID_QUICK", "QUALITY",
           "attention_kwargs", "build_model", "train_for_quality", "measure_row", "run_grid", "combination_label",
           "feasible", "best", "plot_tradeoff", "measure_combination"]
