"""The course's plots: what the learner *sees* in every chapter.

Every chapter of the course ends its "Measure" section with a picture: attention maps per head, activation memory
rising through the forward pass and falling through the backward pass, gradient norms per layer, time and memory
against the sequence length n on log-log axes (where a straight line of slope p means cost ∝ nᵖ), FLOP shares,
training curves, and the Gantt charts of a pipeline schedule (chapter 09), planned and measured. This module holds those pictures, one function each, so that every notebook draws them the same
way and the tests can check them.

Rules every function here follows:

* it returns a :class:`matplotlib.figure.Figure` and never calls ``plt.show()``. The figure is built with
  ``Figure(...)`` + ``fig.subplots()``, *not* through pyplot, so nothing is left in pyplot's registry (no figure
  shown twice in a notebook, no memory growing in a loop of a hundred plots). In a notebook the returned figure
  displays itself as the cell's value (see :class:`CourseFigure`);
* every figure has a title, axis labels with units and a legend when it shows several series;
* inputs are torch tensors (any device, any dtype, with or without grad), numpy arrays or plain sequences, and are
  validated: a wrong input raises ``ValueError`` / ``TypeError`` naming the argument, the value and what was
  expected, instead of an opaque matplotlib error or a silently empty plot.

The one piece of arithmetic here is :func:`fit_power_law`, the least-squares line on log-log axes that turns
"the naive attention got slower" into "the naive attention costs ∝ n^2.01":

    log y = log c + p · log n      ⇔      y = c · nᵖ
"""
from __future__ import annotations

import io
import math
import numbers
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter, NullLocator

from ._checks import check_int
from .general.pipeline import (
    bubble_fraction,
    busy_fractions,
    gpipe_schedule,
    ideal_step_time,
    idle_fraction,
    schedule_events,
)

__all__ = [
    "CourseFigure",
    "to_mib",
    "log_scale",
    "plot_attention_heads",
    "plot_memory_timeline",
    "plot_gradient_flow",
    "fit_power_law",
    "plot_scaling",
    "plot_bars",
    "plot_stacked_share",
    "plot_curves",
    "new_figure",
    "plot_gantt",
    "plot_gpipe",
    "plot_measured_pipeline",
]

MIB = 2**20  # bytes in one mebibyte (MiB); the course reports memory in MiB throughout

# background colours of the two phases of a training step (pale, so the lines on top stay readable)
PHASE_COLOURS = {"forward": "#dff0dc", "backward": "#f5e1ef"}
PHASE_LABELS = {"forward": "forward pass", "backward": "backward pass"}


class CourseFigure(Figure):
    """A plain :class:`~matplotlib.figure.Figure` that also knows how to show itself as PNG in Jupyter.

    A figure built with ``Figure()`` (not ``plt.figure()``) is only drawn as an image in a notebook once the
    inline backend has registered its PNG formatter, which happens the first time *pyplot* draws something in the
    kernel. Before that, a returned figure shows up as the text ``<Figure size 640x480 with 1 Axes>`` (measured
    with ipykernel 7 / matplotlib-inline 0.2). ``_repr_png_`` fills that gap; where the inline formatter *is*
    registered, IPython uses the formatter instead, so the figure is still shown exactly once.
    """

    def _repr_png_(self):
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Input helpers
# ---------------------------------------------------------------------------------------------------------------


def new_figure(width, height):
    """A constrained-layout :class:`CourseFigure` of ``width`` × ``height`` inches that pyplot does not know about."""
    return CourseFigure(figsize=(width, height), layout="constrained")


_new_figure = new_figure  # the old name


def _check_str(value, name, where):
    if not isinstance(value, str):
        raise TypeError(f"{where}: {name} must be a str, got {type(value).__name__} ({value!r})")
    return value


def _check_bool(value, name, where):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be a bool, got {type(value).__name__} ({value!r})")
    return bool(value)


def _check_ax(ax, where):
    if ax is not None and not isinstance(ax, Axes):
        raise TypeError(f"{where}: ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax


def _as_array(x, name, where, *, ndim=None, allow_nan=False):
    """Turn a tensor / array / sequence of numbers into a float64 numpy array, or raise naming ``name``.

    ``None`` entries of a plain sequence become NaN (= "not measured"); NaN/inf are rejected unless ``allow_nan``.
    """
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported: no need to import it here
    if torch is not None and isinstance(x, torch.Tensor):
        arr = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "iuf":
            raise TypeError(f"{where}: {name} must hold real numbers, got a numpy array of dtype {x.dtype}")
        arr = x.astype(np.float64)
    elif isinstance(x, (list, tuple, range)):
        for i, item in enumerate(np.ravel(np.asarray(x, dtype=object))):
            if item is not None and (isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Real)):
                raise TypeError(
                    f"{where}: {name} must hold real numbers, got {type(item).__name__} ({item!r}) at flat index {i}"
                )
        try:
            arr = np.asarray(x, dtype=np.float64)
        except ValueError as exc:  # ragged nested lists
            raise ValueError(f"{where}: {name} must be a rectangular array of numbers ({exc})") from None
    else:
        raise TypeError(
            f"{where}: {name} must be a torch.Tensor, numpy array or sequence of numbers, got {type(x).__name__}"
        )
    if ndim is not None and arr.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(
            f"{where}: {name} must have {ndim} dimension(s), got shape {tuple(arr.shape)} ({arr.ndim} dims)"
        )
    if arr.size == 0:
        raise ValueError(f"{where}: {name} is empty (shape {tuple(arr.shape)}); expected at least one value")
    if not allow_nan and not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        idx = tuple(int(i) for i in bad) if arr.ndim > 1 else int(bad[0])
        raise ValueError(f"{where}: {name} must be finite, got {arr[tuple(bad)]} at index {idx}")
    return arr


def _check_series_dict(series, name, where):
    """A non-empty ``{label: values}`` mapping with string labels."""
    if not isinstance(series, Mapping):
        raise TypeError(f"{where}: {name} must be a dict {{label: values}}, got {type(series).__name__}")
    if len(series) == 0:
        raise ValueError(f"{where}: {name} is empty; expected at least one {{label: values}} entry")
    for label in series:
        if not isinstance(label, str):
            raise TypeError(f"{where}: the labels of {name} must be str, got {type(label).__name__} ({label!r})")
    return series


def _fmt_number(x):
    """128 → '128', 0.5 → '0.5', 1234567 → '1,234,567', nan → 'n/a'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:.3g}"


def _tick_label(x):
    return f"{int(x)}" if float(x).is_integer() else f"{x:g}"


def log_scale(ax, axis="y", *, ticks=None):
    """Put ``ax``'s ``axis`` ("x" or "y") on a log scale whose labels never overlap.

    matplotlib labels the *minor* ticks of a log axis that spans less than about a decade (2×10², 3×10², …) in the
    same font as the major ones, and they collide. Here minor ticks stay as marks without labels; with ``ticks``
    (e.g. the measured sizes 64, 128, …) exactly those values are the labelled major ticks, written plainly.
    """
    where = "log_scale"
    if not isinstance(ax, Axes):
        raise TypeError(f"{where}: ax must be a matplotlib Axes, got {type(ax).__name__}")
    if axis not in ("x", "y"):
        raise ValueError(f"{where}: axis must be 'x' or 'y', got {axis!r}")
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    if ticks is not None:
        values = np.unique(np.asarray(ticks, dtype=float))
        if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(f"{where}: ticks must be positive finite numbers, got {ticks!r}")
        target.set_major_locator(FixedLocator(values))
        target.set_major_formatter(FuncFormatter(lambda v, _pos: _tick_label(v)))
        target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())
    return ax


def to_mib(nbytes):
    """Bytes → mebibytes (MiB, 2²⁰ bytes): ``to_mib(3 * 2**20) == 3.0``.

    Accepts an int/float, or a tensor/array/sequence of them (returns a numpy array then).
    """
    if isinstance(nbytes, (bool, np.bool_)) or nbytes is None:
        raise TypeError(f"to_mib: nbytes must be a number of bytes, got {type(nbytes).__name__} ({nbytes!r})")
    if isinstance(nbytes, numbers.Real):
        return float(nbytes) / MIB
    return _as_array(nbytes, "nbytes", "to_mib", allow_nan=True) / MIB


# ---------------------------------------------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------------------------------------------


def _check_tokens(tokens, length, name, axis_name, where):
    if tokens is None:
        return None
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise TypeError(f"{where}: {name} must be a list of strings (one per {axis_name}), got {type(tokens).__name__}")
    if len(tokens) != length:
        raise ValueError(
            f"{where}: {name} must have one entry per {axis_name} ({length}), got {len(tokens)} entries"
        )
    return [str(t) for t in tokens]


def plot_attention_heads(
    weights,
    *,
    tokens=None,
    query_tokens=None,
    title="Attention weights per head",
    max_heads=16,
    cmap="viridis",
):
    """One heatmap per head of the attention weights softmax(QKᵀ/√d): row i = query i, column j = key j.

    Args:
        weights: ``(H, T, S)``, ``(B, H, T, S)`` (batch element 0 is shown) or ``(T, S)`` (one head); each row is
            a probability distribution over the S keys (values in [0, 1]).
        tokens: the S key tokens, used as x tick labels when S ≤ 40 (and as y tick labels when T == S and
            ``query_tokens`` is not given).
        query_tokens: the T query tokens (y tick labels when T ≤ 40).
        max_heads: show at most this many heads (the title says "first k of H heads" when some are left out).
        cmap: a matplotlib colormap name.

    All heads share one colour scale (0 … the largest weight shown) and one colorbar, so a sharp head and a
    diffuse head can be compared by eye.
    """
    where = "plot_attention_heads"
    w = _as_array(weights, "weights", where, ndim=(2, 3, 4))
    if w.ndim == 4:
        w = w[0]  # batch element 0                                                             (H, T, S)
    single = w.ndim == 2
    if single:
        w = w[None]  # a single head: no "head 0" panel title, the figure's title says which   (1, T, S)
    H, T, S = w.shape
    if isinstance(max_heads, bool) or not isinstance(max_heads, numbers.Integral):
        raise TypeError(f"{where}: max_heads must be an int, got {type(max_heads).__name__} ({max_heads!r})")
    if max_heads < 1:
        raise ValueError(f"{where}: max_heads must be ≥ 1, got {max_heads}")
    _check_str(title, "title", where)
    _check_str(cmap, "cmap", where)
    if cmap not in colormaps:
        raise ValueError(f"{where}: cmap must be a matplotlib colormap name such as 'viridis', got {cmap!r}")
    tokens = _check_tokens(tokens, S, "tokens", "key position S", where)
    query_tokens = _check_tokens(query_tokens, T, "query_tokens", "query position T", where)
    if query_tokens is None and tokens is not None and T == S:
        query_tokens = tokens  # self-attention: the queries are the same tokens

    shown = min(H, int(max_heads))
    # at most 4 panels a row; the width that minimises rows + empty slots (5 → 3+2, 6 → 3+3, 8 → 4+4)
    ncols = min(range(1, min(shown, 4) + 1), key=lambda c: (math.ceil(shown / c) + -shown % c, -shown % c))
    nrows = math.ceil(shown / ncols)
    # a panel is ~2.6 in wide; with readable token labels it grows with the number of tokens (up to 5 in)
    labelled = (tokens is not None and S <= 40) or (query_tokens is not None and T <= 40)
    panel = min(5.0, max(2.6, 0.14 * max(T, S) + 1.0)) if labelled else 2.6
    fig = new_figure(ncols * panel + 1.6, nrows * panel + (1.3 if labelled else 0.8))
    grid = fig.subplots(nrows, ncols, squeeze=False)

    vmax = float(w[:shown].max())
    norm = Normalize(vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
    used = []
    image = None
    for h in range(nrows * ncols):
        ax = grid[h // ncols, h % ncols]
        if h >= shown:
            ax.remove()  # an empty slot of the last row
            continue
        used.append(ax)
        image = ax.imshow(w[h], cmap=cmap, norm=norm, interpolation="nearest", aspect="equal" if T == S else "auto")
        if not single:
            ax.set_title(f"head {h + 1}", fontsize=10)  # heads are shown 1-based (weights[..., h] is head h + 1)
        bottom = h + ncols >= shown  # nothing below this panel
        left = h % ncols == 0
        if tokens is not None and S <= 40:
            ax.set_xticks(range(S), labels=tokens, rotation=90, fontsize=7)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        if query_tokens is not None and T <= 40:
            ax.set_yticks(range(T), labels=query_tokens, fontsize=7)
        else:
            ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.tick_params(labelbottom=bottom, labelleft=left)
        if bottom:
            ax.set_xlabel("key position j (token)")
        if left:
            ax.set_ylabel("query position i (token)")
    fig.colorbar(image, ax=used, label="attention weight", shrink=0.8 if nrows > 1 else 1.0, aspect=30)
    fig.suptitle(title if shown == H else f"{title} (first {shown} of {H} heads)")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Memory over one training step
# ---------------------------------------------------------------------------------------------------------------


def _check_byte_count(value, name, where, *, optional=False):
    if optional and value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        expected = "an int number of bytes or None" if optional else "an int number of bytes"
        raise TypeError(f"{where}: {name} must be {expected}, got {type(value).__name__} ({value!r})")
    if value < 0:
        raise ValueError(f"{where}: {name} must be ≥ 0 bytes, got {value}")
    return int(value)


def _check_timeline(timeline, name, where):
    """Validate one list of events; return (phases, modules, activation MiB, allocator MiB or None)."""
    if isinstance(timeline, (str, bytes)) or not isinstance(timeline, Sequence):
        raise TypeError(
            f"{where}: {name} must be a list of event dicts (or a dict {{label: list}}), got {type(timeline).__name__}"
        )
    if len(timeline) == 0:
        raise ValueError(f"{where}: {name} is empty; expected at least one event")
    phases, modules, act, alloc = [], [], [], []
    for i, event in enumerate(timeline):
        ename = f"{name}[{i}]"
        if not isinstance(event, Mapping):
            raise TypeError(f"{where}: {ename} must be a dict, got {type(event).__name__} ({event!r})")
        for key in ("phase", "module", "activation_bytes"):
            if key not in event:
                raise ValueError(
                    f"{where}: {ename} has no key {key!r}; every event needs 'phase', 'module' and "
                    f"'activation_bytes' (got keys {sorted(event)})"
                )
        phase = event["phase"]
        if phase not in PHASE_COLOURS:
            raise ValueError(f"{where}: {ename}['phase'] must be 'forward' or 'backward', got {phase!r}")
        if not isinstance(event["module"], str):
            raise TypeError(f"{where}: {ename}['module'] must be a str, got {type(event['module']).__name__}")
        phases.append(phase)
        modules.append(event["module"])
        act.append(_check_byte_count(event["activation_bytes"], f"{ename}['activation_bytes']", where))
        alloc.append(
            _check_byte_count(event.get("allocator_bytes"), f"{ename}['allocator_bytes']", where, optional=True)
        )
    act_mib = np.array(act, dtype=np.float64) / MIB
    alloc_mib = None
    if any(a is not None for a in alloc):
        alloc_mib = np.array([np.nan if a is None else a for a in alloc], dtype=np.float64) / MIB
    return phases, modules, act_mib, alloc_mib


def _phase_spans(phases):
    """[('forward', 0, 5), ('backward', 5, 11), ...]: contiguous runs; event i covers x ∈ [i, i+1)."""
    spans, start = [], 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            spans.append((phases[start], start, i))
            start = i
    return spans


def plot_memory_timeline(timeline, *, title="Activation memory over one training step", ax=None):
    """Live saved-for-backward memory after each module call of one forward + backward pass.

    Args:
        timeline: a list of events ``{"phase": "forward" | "backward", "module": str, "activation_bytes": int,
            "allocator_bytes": int | None}`` in call order (what ``effedu.measure`` records), or a dict
            ``{label: timeline}`` to overlay several runs in one axes (e.g. ``{"plain": ..., "checkpointed": ...}``).
        ax: draw into this Axes instead of a new figure (the Axes' figure is returned).

    What to look for: during the forward pass every layer *saves* its inputs for the backward pass, so the line
    climbs; the backward pass consumes and frees them, so it falls. The peak, at the turn, is what decides whether
    a batch fits in memory; gradient checkpointing lowers it by saving less and recomputing in the backward pass.
    The GPU allocator line (when recorded) sits above: it also holds weights, gradients and temporaries.
    """
    where = "plot_memory_timeline"
    _check_str(title, "title", where)
    _check_ax(ax, where)
    if isinstance(timeline, Mapping):
        _check_series_dict(timeline, "timeline", where)
        runs = {label: _check_timeline(tl, f"timeline[{label!r}]", where) for label, tl in timeline.items()}
        single = False
    else:
        runs = {"": _check_timeline(timeline, "timeline", where)}
        single = True

    if ax is None:
        longest = max(len(r[0]) for r in runs.values())
        fig = new_figure(min(12.0, max(7.5, 0.22 * longest + 3.0)), 4.8)
        ax = fig.subplots()
    else:
        fig = ax.figure
    any_alloc = any(r[3] is not None for r in runs.values())
    top = max(float(np.nanmax(np.r_[r[2], r[3] if r[3] is not None else []])) for r in runs.values())
    top = top if top > 0 else 1.0

    # --- background: forward / backward phases ---------------------------------------------------------------
    phase_seqs = [r[0] for r in runs.values()]
    shared_phases = all(p == phase_seqs[0] for p in phase_seqs)
    strip = 0.0
    if shared_phases:
        # one shading for all runs: full-height bands
        for phase, a, b in _phase_spans(phase_seqs[0]):
            ax.axvspan(a, b, color=PHASE_COLOURS[phase], zorder=0, lw=0)
    else:
        # the runs have different phase sequences: one thin strip per run along the bottom of the axes
        height = 0.045
        strip = height * len(runs) + 0.01
        for k, (label, (phases, *_)) in enumerate(runs.items()):
            lo = 0.005 + k * height
            for phase, a, b in _phase_spans(phases):
                ax.axvspan(a, b, ymin=lo, ymax=lo + height * 0.85, color=PHASE_COLOURS[phase], zorder=0, lw=0)
            ax.text(0.003, lo + height * 0.42, f" {label}", transform=ax.transAxes, fontsize=7, va="center",
                    ha="left", zorder=1)

    # --- the lines -------------------------------------------------------------------------------------------
    handles = []
    for k, (label, (phases, modules, act, alloc)) in enumerate(runs.items()):
        colour = f"C{k % 10}"
        n = len(act)
        x = np.arange(n + 1)  # event i's value holds on [i, i+1)
        name = "saved activations" if single else f"{label}: saved activations"
        (line,) = ax.plot(x, np.r_[act, act[-1]], drawstyle="steps-post", color=colour, lw=2, label=name)
        handles.append(line)
        if alloc is not None:
            aname = "allocator (GPU)" if single else f"{label}: allocator (GPU)"
            (aline,) = ax.plot(x, np.r_[alloc, alloc[-1]], drawstyle="steps-post", color=colour, lw=1.5, ls="--",
                               label=aname)
            handles.append(aline)
        # the peak: max over events of the live saved bytes
        i_peak = int(np.argmax(act))
        peak = float(act[i_peak])
        text = f"peak {peak:.2f} MiB" if single else f"{label}: peak {peak:.2f} MiB"
        ax.plot([i_peak + 0.5], [peak], marker="v", color=colour, ms=7, ls="none", label="_nolegend_")
        right_half = i_peak + 0.5 > n / 2
        ax.annotate(
            text,
            xy=(i_peak + 0.5, peak),
            xytext=(-12 if right_half else 12, 10 + 15 * k),
            textcoords="offset points",
            ha="right" if right_half else "left",
            fontsize=9,
            color=colour,
            arrowprops=dict(arrowstyle="-", color=colour, lw=0.8),
            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8),
        )

    # --- axes --------------------------------------------------------------------------------------------------
    upper = top * (1.22 + 0.06 * len(runs))
    lower = -strip / (1.0 - strip) * upper if strip else 0.0
    ax.set_ylim(lower, upper)
    ticks = [t for t in MaxNLocator(nbins=6).tick_values(0, upper) if 0 <= t <= upper]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    longest = max(len(r[0]) for r in runs.values())
    ax.set_xlim(0, longest)
    if single and longest <= 30:
        # few events: name the module of each one
        modules = runs[""][1]
        labels = [m if len(m) <= 18 else m[:17] + "…" for m in modules]
        ax.set_xticks(np.arange(longest) + 0.5, labels=labels, rotation=90, fontsize=7)
        ax.set_xlabel("event: module call, in order (forward, then backward)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("event index (module call, in order)")
    ax.set_ylabel("memory (MiB)" if any_alloc else "saved-for-backward activations (MiB)")
    ax.set_title(title)
    phase_handles = [Patch(facecolor=PHASE_COLOURS[p], label=PHASE_LABELS[p]) for p in ("forward", "backward")]
    ax.legend(handles=handles + phase_handles, loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------


def plot_gradient_flow(norms, *, title="Gradient norm per layer", log=True):
    """The gradient norm ‖∂L/∂θ_ℓ‖₂ of each layer ℓ, one line per setting (``{"pre-LN": [..], "post-LN": [..]}``).

    Layers are numbered from 1 (the one closest to the input), as everywhere the course displays layers and heads
    (the API's indices start at 0: ``norms[0]`` is layer 1). A healthy network has roughly flat lines; Post-LN Transformers at
    initialisation show gradients growing towards the output layers (Xiong et al. 2020), which is why they need a
    learning-rate warm-up. A plain sequence is accepted as a single series.
    """
    where = "plot_gradient_flow"
    _check_str(title, "title", where)
    log = _check_bool(log, "log", where)
    if not isinstance(norms, Mapping):
        norms = {"gradient norm": norms}
    _check_series_dict(norms, "norms", where)
    fig = new_figure(7.5, 4.5)
    ax = fig.subplots()
    longest = 0
    for label, values in norms.items():
        ys = _as_array(values, f"norms[{label!r}]", where, ndim=1)
        if np.any(ys < 0):
            i = int(np.argmax(ys < 0))
            raise ValueError(f"{where}: norms[{label!r}] must be ≥ 0 (a norm), got {ys[i]} at layer {i}")
        if log and np.any(ys == 0):
            i = int(np.argmax(ys == 0))
            raise ValueError(
                f"{where}: norms[{label!r}] has 0 at layer {i}, which a log axis cannot show; pass log=False"
            )
        ax.plot(np.arange(1, len(ys) + 1), ys, marker="o", ms=4, lw=1.5, label=label)
        longest = max(longest, len(ys))
    if log:
        log_scale(ax, "y")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer ℓ (1 = closest to the input)")
    ax.set_ylabel(r"gradient norm $\Vert\partial L/\partial\theta_\ell\Vert_2$" + (" (log scale)" if log else ""))
    ax.set_title(title)
    if len(norms) > 1:
        ax.legend()
    ax.grid(alpha=0.3, which="both" if log else "major")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Scaling: cost vs n on log-log axes
# ---------------------------------------------------------------------------------------------------------------


def fit_power_law(ns, ys):
    """Fit y = c · nᵖ by least squares on log-log axes; return ``(c, p)``.

    Taking logs turns the power law into a straight line, fitted by ordinary least squares:

        log y = log c + p · log n

    Only positive, finite values have a logarithm: anything else raises ``ValueError`` (drop unmeasured points
    before calling). Needs at least two distinct n.
    """
    where = "fit_power_law"
    n = _as_array(ns, "ns", where, ndim=1)
    y = _as_array(ys, "ys", where, ndim=1)
    if n.shape != y.shape:
        raise ValueError(f"{where}: ns and ys must have the same length, got {n.size} and {y.size}")
    for name, arr in (("ns", n), ("ys", y)):
        if np.any(arr <= 0):
            i = int(np.argmax(arr <= 0))
            raise ValueError(f"{where}: {name} must be > 0 (a log-log fit), got {arr[i]} at index {i}")
    if np.unique(n).size < 2:
        raise ValueError(f"{where}: ns needs at least 2 distinct values to fit a slope, got {n.tolist()}")
    # design matrix [1, log n] ; least squares for (log c, p)
    X = np.column_stack([np.ones_like(n), np.log(n)])
    (log_c, p), *_ = np.linalg.lstsq(X, np.log(y), rcond=None)
    return float(np.exp(log_c)), float(p)


def plot_scaling(
    ns,
    series,
    *,
    ylabel="time (ms)",
    title="Cost vs sequence length",
    xlabel="sequence length n",
    fit=True,
    logx=True,
    logy=True,
    symbol="n",
):
    """Cost (time, memory, FLOPs …) against a size, one marker series per method, with fitted power laws.

    Args:
        ns: the sizes (x values), e.g. ``[128, 256, 512, 1024]``.
        series: ``{label: ys}``, each ys as long as ``ns``; ``None``/NaN = not measured (e.g. out of memory), left
            out of the plot and of the fit.
        fit: for each series with ≥ 3 positive points, draw the least-squares fit y = c · nᵖ dashed and put the
            exponent in the legend (``"naive: ∝ n^2.01"``).
        symbol: the size's letter in that legend (``"d"`` when the x axis is the model width).

    On log-log axes a power law is a straight line whose slope is the exponent: the O(n²) attention has slope ≈ 2,
    a linear attention slope ≈ 1 — once n is large enough for the asymptotic term to dominate.
    """
    where = "plot_scaling"
    for name, value in (("ylabel", ylabel), ("title", title), ("xlabel", xlabel), ("symbol", symbol)):
        _check_str(value, name, where)
    fit, logx, logy = (_check_bool(v, k, where) for k, v in (("fit", fit), ("logx", logx), ("logy", logy)))
    n = _as_array(ns, "ns", where, ndim=1)
    if logx and np.any(n <= 0):
        i = int(np.argmax(n <= 0))
        raise ValueError(f"{where}: ns must be > 0 on a log x axis, got {n[i]} at index {i} (or pass logx=False)")
    _check_series_dict(series, "series", where)
    fig = new_figure(7.5, 4.8)
    ax = fig.subplots()
    handles, fitted_any = [], False
    for k, (label, values) in enumerate(series.items()):
        y = _as_array(values, f"series[{label!r}]", where, ndim=1, allow_nan=True)
        if y.shape != n.shape:
            raise ValueError(
                f"{where}: series[{label!r}] must have one value per n ({n.size}), got {y.size} values"
            )
        if np.any(np.isinf(y)):
            raise ValueError(f"{where}: series[{label!r}] has an infinite value; use None or NaN for 'not measured'")
        measured = np.isfinite(y)
        if logy and np.any(y[measured] <= 0):
            i = int(np.flatnonzero(measured & (y <= 0))[0])
            raise ValueError(
                f"{where}: series[{label!r}] must be > 0 on a log y axis, got {y[i]} at index {i} (or pass logy=False)"
            )
        colour = f"C{k % 10}"
        ok = measured & (y > 0) & (n > 0)
        text = label if measured.any() else f"{label} (not measured)"
        do_fit = fit and np.unique(n[ok]).size >= 3
        if do_fit:
            c, p = fit_power_law(n[ok], y[ok])
            grid = np.geomspace(n[ok].min(), n[ok].max(), 64)
            # the fitted law y = c · nᵖ over the measured range
            ax.plot(grid, c * grid**p, ls="--", lw=1.2, color=colour, alpha=0.8, label="_nolegend_")
            text = f"{label}: ∝ {symbol}^{p:.2f}"
            fitted_any = True
        (line,) = ax.plot(n[measured], y[measured], marker="o", ms=5, color=colour, ls="none" if do_fit else "-",
                          label=text)
        handles.append(line)
    if fitted_any:
        handles.append(Line2D([], [], color="grey", ls="--", label=f"least-squares fit c·{symbol}^p"))
    if logx:
        # label the measured sizes themselves (128, 256, …) rather than decades when there are few
        log_scale(ax, "x", ticks=np.unique(n) if np.unique(n).size <= 12 else None)
    if logy:
        log_scale(ax, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Bars, shares, curves
# ---------------------------------------------------------------------------------------------------------------


def plot_bars(labels, values, *, ylabel, title, annotate=True, ax=None):
    """A bar chart with each value written on top of its bar (byte counts, speed ratios, parameter counts).

    ``values`` may contain ``None``/NaN (drawn as a missing bar annotated "n/a"). Integers are annotated with
    thousands separators (12,582,912), other numbers with 3 significant digits.
    """
    where = "plot_bars"
    _check_str(ylabel, "ylabel", where)
    _check_str(title, "title", where)
    annotate = _check_bool(annotate, "annotate", where)
    _check_ax(ax, where)
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise TypeError(f"{where}: labels must be a list of strings, got {type(labels).__name__}")
    labels = [str(lbl) for lbl in labels]
    v = _as_array(values, "values", where, ndim=1, allow_nan=True)
    if np.any(np.isinf(v)):
        raise ValueError(f"{where}: values must be finite (or None/NaN for missing), got {v.tolist()}")
    if len(labels) != v.size:
        raise ValueError(f"{where}: labels and values must have the same length, got {len(labels)} and {v.size}")
    if ax is None:
        fig = new_figure(min(12.0, max(5.5, 0.8 * v.size + 2.5)), 4.5)
        ax = fig.subplots()
    else:
        fig = ax.figure
    x = np.arange(v.size)
    bars = ax.bar(x, np.nan_to_num(v, nan=0.0), color="C0", width=0.7)
    crowded = v.size > 6 or max(len(lbl) for lbl in labels) > 12
    ax.set_xticks(x, labels=labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    finite = v[np.isfinite(v)]
    if finite.size and 1e4 <= np.abs(finite).max() < 1e15:
        # byte counts: 4,000,000 on the axis rather than "4" with a "1e6" offset in the corner
        ax.yaxis.set_major_formatter(FuncFormatter(lambda t, _: f"{t:,.0f}"))
    if annotate:
        ax.bar_label(bars, labels=[_fmt_number(val) for val in v], padding=2, fontsize=8)
        ax.margins(y=0.12)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig


def plot_stacked_share(xs, parts, *, xlabel, ylabel="share of FLOPs (%)", title):
    """Stacked bars normalised to 100 %: how a total splits between parts at each x.

    Used for the attention vs feed-forward share of a layer's FLOPs as the sequence length n grows: attention's
    share (∝ n² d against the FFN's ∝ n d²) takes over once n ≳ d. ``parts = {label: values}``, each as long as
    ``xs``, non-negative; each column must have a positive total. Shares ≥ 7 % are written inside their segment.
    """
    where = "plot_stacked_share"
    for name, value in (("xlabel", xlabel), ("ylabel", ylabel), ("title", title)):
        _check_str(value, name, where)
    if isinstance(xs, str) or not isinstance(xs, (Sequence, np.ndarray)) and not hasattr(xs, "tolist"):
        raise TypeError(f"{where}: xs must be a sequence (one entry per bar), got {type(xs).__name__}")
    xs = list(xs.tolist() if hasattr(xs, "tolist") else xs)
    if len(xs) == 0:
        raise ValueError(f"{where}: xs is empty; expected at least one x")
    _check_series_dict(parts, "parts", where)
    table = []
    for label, values in parts.items():
        v = _as_array(values, f"parts[{label!r}]", where, ndim=1)
        if v.size != len(xs):
            raise ValueError(f"{where}: parts[{label!r}] must have one value per x ({len(xs)}), got {v.size}")
        if np.any(v < 0):
            i = int(np.argmax(v < 0))
            raise ValueError(f"{where}: parts[{label!r}] must be ≥ 0, got {v[i]} at index {i}")
        table.append(v)
    table = np.stack(table)  #                                                      (parts, len(xs))
    total = table.sum(axis=0)
    if np.any(total <= 0):
        i = int(np.argmax(total <= 0))
        raise ValueError(f"{where}: the parts at xs[{i}]={xs[i]!r} sum to 0; each column needs a positive total")
    # share_k(x) = 100 · part_k(x) / Σ_k part_k(x)
    share = 100.0 * table / total

    fig = new_figure(min(12.0, max(6.5, 0.75 * len(xs) + 3.5)), 4.5)
    ax = fig.subplots()
    palette = colormaps["Set2"]
    x = np.arange(len(xs))
    bottom = np.zeros(len(xs))
    for k, label in enumerate(parts):
        bars = ax.bar(x, share[k], bottom=bottom, width=0.75, color=palette(k % palette.N), label=label,
                      edgecolor="white", lw=0.5)
        ax.bar_label(bars, labels=[f"{s:.0f}%" if s >= 7 else "" for s in share[k]], label_type="center",
                     fontsize=8)
        bottom += share[k]
    ax.set_xticks(x, labels=[_tick_label(v) if isinstance(v, numbers.Real) else str(v) for v in xs])
    ax.set_ylim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    return fig


def _split_curve(value, label, where):
    """``ys`` or ``(xs, ys)`` → (xs, ys) arrays."""
    pair = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(not isinstance(part, numbers.Number) and hasattr(part, "__len__") for part in value)
    )
    if pair:
        xs = _as_array(value[0], f"curves[{label!r}][0] (xs)", where, ndim=1)
        ys = _as_array(value[1], f"curves[{label!r}][1] (ys)", where, ndim=1, allow_nan=True)
        if xs.size != ys.size:
            raise ValueError(
                f"{where}: curves[{label!r}] = (xs, ys) must have len(xs) == len(ys), got {xs.size} and {ys.size}"
            )
    else:
        ys = _as_array(value, f"curves[{label!r}]", where, ndim=1, allow_nan=True)
        xs = np.arange(ys.size, dtype=np.float64)
    return xs, ys


def plot_curves(curves, *, xlabel="step", ylabel="loss", title="Training curves", logy=False):
    """Training curves, one line per run: ``{label: ys}`` (x = 0, 1, 2, …) or ``{label: (xs, ys)}``.

    NaN/inf values (a run that diverged) are allowed: the line stops there, which is the point of the picture.
    """
    where = "plot_curves"
    for name, value in (("xlabel", xlabel), ("ylabel", ylabel), ("title", title)):
        _check_str(value, name, where)
    logy = _check_bool(logy, "logy", where)
    _check_series_dict(curves, "curves", where)
    fig = new_figure(7.5, 4.5)
    ax = fig.subplots()
    for label, value in curves.items():
        xs, ys = _split_curve(value, label, where)
        finite = np.isfinite(ys)
        if logy and np.any(ys[finite] <= 0):
            i = int(np.flatnonzero(finite & (ys <= 0))[0])
            raise ValueError(
                f"{where}: curves[{label!r}] must be > 0 on a log y axis, got {ys[i]} at index {i} (or logy=False)"
            )
        ax.plot(xs, np.where(finite, ys, np.nan), lw=1.5, label=label, marker="o" if ys.size <= 30 else None, ms=3)
    if logy:
        log_scale(ax, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    return fig

# ---------------------------------------------------------------------------------------------------------------
# Pipeline schedules (chapter 09, effedu.general.pipeline): Gantt charts of planned and measured runs
# ---------------------------------------------------------------------------------------------------------------

_KIND_COLOUR = {"F": "#4c78a8", "B": "#f58518"}


def plot_gantt(events, *, n_stages=None, unit="tick", title="Pipeline schedule", ax=None, label_micro=None):
    """Gantt chart: one row per stage, forward (blue) and backward (orange) boxes, the idle bubble shaded.

    ``events``: dicts ``{"stage", "kind", "micro", "start", "end"}`` (from :func:`schedule_events`, or measured:
    ``run_pipeline(...)["events"]`` with ``unit="ms"``, times in seconds converted to ms).
    """
    if not isinstance(events, (list, tuple)) or not events:
        raise ValueError("plot_gantt: events must be a non-empty list of event dicts")
    if unit not in ("tick", "ms"):
        raise ValueError(f"plot_gantt: unit must be 'tick' or 'ms', got {unit!r}")
    K = n_stages if n_stages is not None else 1 + max(e["stage"] for e in events)
    scale = 1e3 if unit == "ms" else 1
    t0 = min(e["start"] for e in events) * scale
    t1 = max(e["end"] for e in events) * scale
    if ax is None:
        fig = new_figure(10, 0.55 * K + 1.6)
        ax = fig.subplots()
    else:
        fig = ax.figure
    if label_micro is None:
        label_micro = len(events) <= 80
    ax.barh(range(K), [t1 - t0] * K, left=t0, height=0.8, color="#d9d9d9", hatch="//", edgecolor="#bdbdbd", lw=0)
    for e in events:
        start, end = e["start"] * scale, e["end"] * scale
        ax.barh(e["stage"], end - start, left=start, height=0.8, color=_KIND_COLOUR[e["kind"]], edgecolor="white", lw=0.8)
        if label_micro:
            # displayed 1-based (stage 1..K, micro-batch 1..M); the API counts from 0
            ax.text((start + end) / 2, e["stage"], str(e["micro"] + 1), ha="center", va="center", color="white",
                    fontsize=8)
    ax.set_yticks(range(K), labels=[f"stage {s + 1}" for s in range(K)])
    ax.set_ylim(K - 0.5, -0.5)
    ax.set_xlim(t0, t1)
    ax.set_xlabel("time (ticks: one forward or backward of one micro-batch)" if unit == "tick" else "time (ms)")
    if unit == "tick":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.legend(handles=[Patch(color=_KIND_COLOUR["F"], label="forward (micro-batch #)"),
                       Patch(color=_KIND_COLOUR["B"], label="backward (micro-batch #)"),
                       Patch(facecolor="#d9d9d9", hatch="//", edgecolor="#bdbdbd", label="idle (bubble)")],
              loc="upper center", bbox_to_anchor=(0.5, -0.32 if K <= 2 else -0.18), ncol=3, frameon=False, fontsize=8)
    return fig


def plot_gpipe(n_stages=4, n_micro=8):
    """The GPipe schedule for K stages and M micro-batches (left) and the bubble fraction vs M for this K (right)."""
    K = check_int(n_stages, "n_stages", "plot_gpipe")
    M = check_int(n_micro, "n_micro", "plot_gpipe")
    schedule = gpipe_schedule(K, M)
    fig = new_figure(13, max(3.6, 0.45 * K + 2.2))
    left, right = fig.subplots(1, 2, width_ratios=[3, 1])
    plot_gantt(schedule_events(schedule), n_stages=K, ax=left,
               title=f"GPipe, K={K} stages, M={M} micro-batches: bubble {bubble_fraction(K, M):.0%} "
                     f"(counted: {idle_fraction(schedule, K):.0%})")
    ms = list(range(1, max(4 * K, M) * 2 + 1))
    right.plot(ms, [100 * bubble_fraction(K, m) for m in ms], color="C3", label="(K−1)/(M+K−1)")
    right.plot([M], [100 * bubble_fraction(K, M)], "o", color="black", label=f"M={M}")
    right.axvline(4 * K, ls="--", color="gray", label="M = 4K (GPipe's rule)")
    right.set_xlabel("micro-batches M")
    right.set_ylabel("bubble (% of pipeline time idle)")
    right.set_title(f"Bubble vs M (K={K})")
    right.set_ylim(0, 100)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return fig


def plot_measured_pipeline(runs, n_micro=None, remat=False):
    """Cost vs benefit of micro-batching, *measured*: the Gantt chart of one run and the table it belongs to.

    ``runs``: the list :func:`run_pipelines` returns (several M, with and without ``remat``). Top: the measured
    Gantt chart of ``(n_micro, remat)``. Bottom, against M, the chosen M circled: the measured bubble next to
    (K−1)/(M+K−1); the measured step time next to the ideal one (:func:`ideal_step_time` from the M = 1 run: what
    the formula promises); the activation memory each stage holds for backward (the benefit of rematerialisation,
    counted in bytes).
    """
    where = "plot_measured_pipeline"
    if not isinstance(runs, (list, tuple)) or not runs or not all(isinstance(r, dict) and "events" in r for r in runs):
        raise TypeError(f"{where}: runs must be the non-empty list that run_pipelines returns")
    table = {(r["n_micro"], r["remat"]): r for r in runs}
    K = runs[0]["n_stages"]
    Ms = sorted({M for M, _ in table})
    if n_micro is None:
        n_micro = Ms[len(Ms) // 2]
    if (n_micro, remat) not in table:
        raise ValueError(f"{where}: no measured run for n_micro={n_micro}, remat={remat}; measured: "
                         f"{sorted(table)}")
    r = table[(n_micro, remat)]
    fig = new_figure(13, 7.6)
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.25])
    gantt = fig.add_subplot(grid[0, :])
    ax_b, ax_t, ax_m = (fig.add_subplot(grid[1, i]) for i in range(3))
    ideal = ideal_step_time(table[(1, remat)]["events"], n_micro, K) if (1, remat) in table else None
    busy = busy_fractions(r["events"], K)
    plot_gantt(r["events"], n_stages=K, unit="ms", ax=gantt,
               title=(f"Measured, {K} processes, M={n_micro}, {'rematerialised' if remat else 'plain'}: step "
                      f"{r['wall_time'] * 1e3:.0f} ms" + (f" (ideal {ideal * 1e3:.0f} ms)" if ideal else "")
                      + f", bubble {r['measured_bubble']:.0%} (predicted {r['predicted_bubble']:.0%}), busy "
                      + ", ".join(f"stage {s + 1} {b:.0%}" for s, b in enumerate(busy))))
    ms_curve = list(range(1, max(Ms) + 1))
    ax_b.plot(ms_curve, [100 * bubble_fraction(K, m) for m in ms_curve], color="C3", label="predicted (K−1)/(M+K−1)")
    for variant, style, name in ((False, "-", "plain"), (True, "--", "remat")):
        ms = [m for m in Ms if (m, variant) in table]
        if not ms:
            continue
        rows = [table[(m, variant)] for m in ms]
        ax_b.plot(ms, [100 * x["measured_bubble"] for x in rows], style, marker="o", color="black",
                  label=f"measured, {name}")
        ax_t.plot(ms, [1e3 * x["wall_time"] for x in rows], style, marker="o", color="black", label=f"measured, {name}")
        if (1, variant) in table:
            ax_t.plot(ms, [1e3 * ideal_step_time(table[(1, variant)]["events"], m, K) for m in ms], style,
                      color="C3", label=f"ideal from M=1, {name}")
        for s in range(K):
            ax_m.plot(ms, [x["activation_peak_bytes"][s] / 2**20 for x in rows], style, marker="o", color=f"C{s}",
                      label=f"stage {s + 1}, {name}")
    here = [(ax_b, 100 * r["measured_bubble"]), (ax_t, 1e3 * r["wall_time"])]
    here += [(ax_m, b / 2**20) for b in r["activation_peak_bytes"]]
    for ax, y in here:
        ax.plot([n_micro], [y], "o", ms=13, mfc="none", mec="C2", mew=2)
    for ax, ylabel, title in ((ax_b, "bubble (% of step idle)", "Benefit: the bubble shrinks"),
                              (ax_t, "step time (ms)", "Cost: time per step"),
                              (ax_m, "held for backward (MiB)", "Memory per stage (peak)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ms, labels=[str(m) for m in Ms])
        ax.minorticks_off()
        ax.set_xlabel("micro-batches M")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_b.set_ylim(0, 100)
    return fig
