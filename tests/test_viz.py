"""Tests of effedu.viz: every plot returns a titled, labelled Figure showing what it was given, and bad input fails
loudly with the argument's name."""
import matplotlib

matplotlib.use("Agg")  # no display in tests; must come before pyplot is imported anywhere

import io  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.text import Annotation  # noqa: E402

from effedu import viz  # noqa: E402


def _render(fig):
    """Draw to PNG: catches errors that only appear at draw time (layout, mathtext, tick formatting)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def _heatmap_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def _bottom_left(axes):
    """The panel of the last row, first column: the one that carries both axis labels."""
    return max(axes, key=lambda a: (a.get_subplotspec().rowspan.start, -a.get_subplotspec().colspan.start))


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


@pytest.fixture(autouse=True)
def no_pyplot_figures_left():
    """The plot functions must not register figures with pyplot (nothing to close, nothing shown twice)."""
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before


# ---------------------------------------------------------------------------------------------------------------
# to_mib
# ---------------------------------------------------------------------------------------------------------------


def test_to_mib():
    assert viz.to_mib(3 * 2**20) == 3.0
    assert viz.to_mib(512 * 1024) == 0.5
    np.testing.assert_allclose(viz.to_mib([2**20, 2**21]), [1.0, 2.0])
    np.testing.assert_allclose(viz.to_mib(torch.tensor([2**22])), [4.0])
    with pytest.raises(TypeError, match="nbytes"):
        viz.to_mib("1024")
    with pytest.raises(TypeError, match="nbytes"):
        viz.to_mib(None)


# ---------------------------------------------------------------------------------------------------------------
# attention heads
# ---------------------------------------------------------------------------------------------------------------


def _attention(B, H, T, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, H, T, S, generator=g), dim=-1)


@pytest.mark.parametrize(
    "shape, heads",
    [((2, 3, 5, 5), 3), ((6, 7, 4), 6), ((5, 9), 1), ((1, 16, 3, 3), 16)],
    ids=["BHTS", "HTS", "TS", "16 heads"],
)
def test_attention_heads_one_heatmap_per_head(shape, heads):
    w = torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), dim=-1)
    fig = viz.plot_attention_heads(w)
    assert isinstance(fig, Figure)
    maps = _heatmap_axes(fig)
    assert len(maps) == heads
    # a single (T, S) map gets no "head 0" panel title: the figure's title says which head it is
    assert [ax.get_title() for ax in maps] == ([""] if len(shape) == 2 else [f"head {h + 1}" for h in range(heads)])
    assert fig.get_suptitle() == "Attention weights per head"
    # exactly one more axes: the shared colorbar, with its label
    others = [ax for ax in fig.axes if not ax.images]
    assert len(others) == 1 and others[0].get_ylabel() == "attention weight"
    # the bottom-left panel carries both axis labels
    bottom_left = _bottom_left(maps)
    assert "key position" in bottom_left.get_xlabel()
    assert "query position" in bottom_left.get_ylabel()
    _render(fig)


@pytest.mark.parametrize("heads, grid", [(1, (1, 1)), (3, (1, 3)), (5, (2, 3)), (6, (2, 3)), (8, (2, 4)), (12, (3, 4))])
def test_attention_heads_grid_has_few_empty_slots(heads, grid):
    fig = viz.plot_attention_heads(torch.full((heads, 2, 2), 0.5))
    spec = _heatmap_axes(fig)[0].get_subplotspec().get_gridspec()
    assert (spec.nrows, spec.ncols) == grid


def test_attention_heads_batch_zero_and_shared_scale():
    w = _attention(2, 2, 4, 4)
    w[1] = 0.0  # batch element 1 must not be the one shown
    fig = viz.plot_attention_heads(w.numpy())
    maps = _heatmap_axes(fig)
    np.testing.assert_allclose(maps[1].images[0].get_array(), w[0, 1].numpy(), rtol=1e-6)
    norms = {(im.norm.vmin, im.norm.vmax) for ax in maps for im in ax.images}
    assert len(norms) == 1  # one colour scale for all heads
    assert norms.pop() == pytest.approx((0.0, float(w[0].max())))


def test_attention_heads_tokens_and_max_heads():
    toks = ["the", "cat", "sat", "on", "a", "mat"]
    w = _attention(1, 9, 6, 6)
    fig = viz.plot_attention_heads(w, tokens=toks, max_heads=5)
    maps = _heatmap_axes(fig)
    assert len(maps) == 5
    assert "first 5 of 9 heads" in fig.get_suptitle()
    bottom_left = _bottom_left(maps)
    assert [t.get_text() for t in bottom_left.get_xticklabels()] == toks
    assert [t.get_text() for t in bottom_left.get_yticklabels()] == toks  # T == S: queries are the same tokens
    _render(fig)


def test_attention_heads_long_sequences_use_positions():
    w = _attention(1, 1, 50, 50)
    fig = viz.plot_attention_heads(w, tokens=[f"t{i}" for i in range(50)])
    labels = [t.get_text() for t in _heatmap_axes(fig)[0].get_xticklabels()]
    assert "t3" not in labels and len(labels) < 50


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(weights=torch.rand(2, 2, 2, 2, 2)), ValueError, r"weights must have .*got shape \(2, 2, 2, 2, 2\)"),
        (dict(weights="attention"), TypeError, "weights must be a torch.Tensor"),
        (dict(weights=torch.rand(2, 3, 3), tokens=["a", "b"]), ValueError, r"tokens must have one entry .*got 2"),
        (dict(weights=torch.rand(2, 3, 3), tokens="abc"), TypeError, "tokens must be a list of strings"),
        (dict(weights=torch.rand(2, 3, 3), max_heads=0), ValueError, "max_heads must be ≥ 1, got 0"),
        (dict(weights=torch.rand(2, 3, 3), cmap="nope"), ValueError, "cmap must be .* got 'nope'"),
        (dict(weights=torch.full((2, 3), float("nan"))), ValueError, "weights must be finite"),
        (dict(weights=torch.zeros(2, 0, 3)), ValueError, "weights is empty"),
    ],
)
def test_attention_heads_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        viz.plot_attention_heads(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# memory timeline
# ---------------------------------------------------------------------------------------------------------------


def _timeline(depth=3, per_layer=2**20, alloc=False):
    """depth layers each saving per_layer bytes in forward, freed in reverse in backward."""
    events, live = [], 0
    for i in range(depth):
        live += per_layer
        events.append(dict(phase="forward", module=f"layers.{i}", activation_bytes=live))
    for i in reversed(range(depth)):
        live -= per_layer
        events.append(dict(phase="backward", module=f"layers.{i}", activation_bytes=live))
    if alloc:
        for k, e in enumerate(events):
            e["allocator_bytes"] = e["activation_bytes"] + 2**21 if k % 2 == 0 else None
    return events


def _annotations(ax):
    return [c for c in ax.get_children() if isinstance(c, Annotation)]


def test_memory_timeline_single_run():
    fig = viz.plot_memory_timeline(_timeline(depth=3, per_layer=3 * 2**19))  # 1.5 MiB per layer → peak 4.5 MiB
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_title() == "Activation memory over one training step"
    assert "MiB" in ax.get_ylabel() and "event" in ax.get_xlabel()
    (line,) = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    # steps: event i's value holds on [i, i+1), last value repeated to close the final step
    np.testing.assert_allclose(line.get_ydata(), [1.5, 3.0, 4.5, 3.0, 1.5, 0.0, 0.0])
    assert [a.get_text() for a in _annotations(ax)] == ["peak 4.50 MiB"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["saved activations", "forward pass", "backward pass"]
    # two shaded phase spans (forward over [0, 3), backward over [3, 6))
    spans = [p for p in ax.patches if p.get_facecolor()[:3] != (1.0, 1.0, 1.0)]
    assert len(spans) == 2
    # few events: the module names are the tick labels
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["layers.0", "layers.1", "layers.2"]
    _render(fig)


def test_memory_timeline_allocator_line():
    fig = viz.plot_memory_timeline(_timeline(alloc=True))
    ax = fig.axes[0]
    labels = [ln.get_label() for ln in ax.lines if not ln.get_label().startswith("_")]
    assert labels == ["saved activations", "allocator (GPU)"]
    alloc = ax.lines[1].get_ydata()
    assert alloc[0] == pytest.approx(3.0) and np.isnan(alloc[1])  # None = not recorded, a gap in the line
    assert ax.get_ylabel() == "memory (MiB)"


def test_memory_timeline_overlay_runs():
    plain = _timeline(depth=4, per_layer=2**20)
    ckpt = _timeline(depth=4, per_layer=2**19)
    ckpt.insert(5, dict(phase="forward", module="layers.2 (recompute)", activation_bytes=3 * 2**19))
    fig = viz.plot_memory_timeline({"plain": plain, "checkpointed": ckpt}, title="with and without")
    ax = fig.axes[0]
    assert ax.get_title() == "with and without"
    labels = [ln.get_label() for ln in ax.lines if not ln.get_label().startswith("_")]
    assert labels == ["plain: saved activations", "checkpointed: saved activations"]
    texts = sorted(a.get_text() for a in _annotations(ax))
    assert texts == ["checkpointed: peak 2.00 MiB", "plain: peak 4.00 MiB"]
    assert ax.get_ylim()[0] < 0  # room below zero for one phase strip per run
    assert all(t >= 0 for t in ax.get_yticks())
    _render(fig)


def test_memory_timeline_into_given_axes():
    fig = Figure()
    ax = fig.subplots()
    assert viz.plot_memory_timeline(_timeline(), ax=ax) is fig


@pytest.mark.parametrize(
    "timeline, exc, match",
    [
        ([], ValueError, "timeline is empty"),
        ("forward", TypeError, "timeline must be a list of event dicts"),
        ([dict(phase="forward", module="a")], ValueError, r"timeline\[0\] has no key 'activation_bytes'"),
        ([dict(phase="sideways", module="a", activation_bytes=1)], ValueError, "got 'sideways'"),
        ([dict(phase="forward", module="a", activation_bytes=1.5)], TypeError, r"activation_bytes'\] must be an int"),
        ([dict(phase="forward", module="a", activation_bytes=-1)], ValueError, "must be ≥ 0 bytes, got -1"),
        ([dict(phase="forward", module=3, activation_bytes=1)], TypeError, r"\['module'\] must be a str"),
        ({"plain": [1]}, TypeError, r"timeline\['plain'\]\[0\] must be a dict"),
        ({}, ValueError, "timeline is empty"),
    ],
)
def test_memory_timeline_rejects(timeline, exc, match):
    with pytest.raises(exc, match=match):
        viz.plot_memory_timeline(timeline)


# ---------------------------------------------------------------------------------------------------------------
# gradient flow
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_flow():
    norms = {"pre-LN": [1.0, 0.9, 0.8, 0.8], "post-LN": torch.tensor([0.01, 0.1, 1.0, 10.0])}
    fig = viz.plot_gradient_flow(norms)
    (ax,) = fig.axes
    assert ax.get_title() == "Gradient norm per layer"
    assert ax.get_yscale() == "log"
    assert "layer" in ax.get_xlabel() and "1 = closest to the input" in ax.get_xlabel()
    assert "gradient norm" in ax.get_ylabel() and "log scale" in ax.get_ylabel()
    assert [ln.get_label() for ln in ax.lines] == ["pre-LN", "post-LN"]
    np.testing.assert_array_equal(ax.lines[1].get_xdata(), [1, 2, 3, 4])  # layers are shown 1-based
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["pre-LN", "post-LN"]
    _render(fig)
    assert viz.plot_gradient_flow([0.0, 1.0], log=False).axes[0].get_yscale() == "linear"


def test_gradient_flow_rejects():
    with pytest.raises(ValueError, match=r"norms\['a'\] has 0 at layer 1.*log=False"):
        viz.plot_gradient_flow({"a": [1.0, 0.0]})
    with pytest.raises(ValueError, match=r"norms\['a'\] must be ≥ 0"):
        viz.plot_gradient_flow({"a": [1.0, -2.0]}, log=False)
    with pytest.raises(TypeError, match="labels of norms must be str"):
        viz.plot_gradient_flow({0: [1.0]})
    with pytest.raises(TypeError, match="log must be a bool"):
        viz.plot_gradient_flow({"a": [1.0]}, log="yes")


# ---------------------------------------------------------------------------------------------------------------
# power-law fit and scaling plot
# ---------------------------------------------------------------------------------------------------------------


def test_fit_power_law_exact():
    ns = np.array([64, 128, 256, 512, 1024])
    c, p = viz.fit_power_law(ns, 3 * ns.astype(float) ** 2)
    assert p == pytest.approx(2.0, abs=1e-6)
    assert c == pytest.approx(3.0, rel=1e-6)
    c, p = viz.fit_power_law(torch.tensor([1.0, 10.0, 100.0]), [5.0, 5.0 * 10**0.5, 50.0])
    assert (c, p) == (pytest.approx(5.0), pytest.approx(0.5))


def test_fit_power_law_noisy():
    rng = np.random.default_rng(0)
    ns = np.geomspace(32, 8192, 12)
    ys = 1e-3 * ns**1.5 * np.exp(rng.normal(0.0, 0.1, ns.size))  # ±10 % multiplicative noise
    _, p = viz.fit_power_law(ns, ys)
    assert abs(p - 1.5) < 0.05


@pytest.mark.parametrize(
    "ns, ys, match",
    [
        ([1, 2, 3], [1.0, 0.0, 2.0], r"ys must be > 0 .*got 0.0 at index 1"),
        ([1, -2, 3], [1.0, 1.0, 2.0], r"ns must be > 0 .*got -2.0 at index 1"),
        ([1, 2, 3], [1.0, float("nan"), 2.0], "ys must be finite"),
        ([1, 2, 3], [1.0, 2.0], "same length, got 3 and 2"),
        ([4, 4, 4], [1.0, 2.0, 3.0], "at least 2 distinct values"),
    ],
)
def test_fit_power_law_rejects(ns, ys, match):
    with pytest.raises(ValueError, match=match):
        viz.fit_power_law(ns, ys)


def test_plot_scaling_fits_and_legend():
    ns = [128, 256, 512, 1024, 2048]
    n = np.array(ns, dtype=float)
    series = {
        "naive": (1e-4 * n**2).tolist(),
        "linear": torch.tensor(2e-3 * n),
        "tiled": [0.5, 1.0, None, None, None],  # only 2 points: drawn, not fitted
    }
    fig = viz.plot_scaling(ns, series, ylabel="time (ms)", title="attention time")
    (ax,) = fig.axes
    assert ax.get_title() == "attention time"
    assert ax.get_xlabel() == "sequence length n" and ax.get_ylabel() == "time (ms)"
    assert ax.get_xscale() == ax.get_yscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["naive: ∝ n^2.00", "linear: ∝ n^1.00", "tiled", "least-squares fit c·n^p"]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    data = [ln for ln in ax.lines if ln.get_linestyle() != "--"]
    assert len(dashed) == 2 and len(data) == 3  # 3 series, 2 with enough points to fit
    assert len(data[2].get_xdata()) == 2  # the None entries are not drawn
    # the measured sizes label the x axis
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(v) for v in ns]
    _render(fig)


def test_plot_scaling_no_fit_and_symbol():
    fig = viz.plot_scaling([1, 2, 4], {"a": [1, 4, 16]}, fit=False, logx=False, logy=False)
    ax = fig.axes[0]
    assert len(ax.lines) == 1 and ax.get_xscale() == "linear"
    fig = viz.plot_scaling([64, 128, 256], {"ffn": [1, 4, 16]}, xlabel="model width d", symbol="d")
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "ffn: ∝ d^2.00"


@pytest.mark.parametrize(
    "ns, series, match",
    [
        ([1, 2, 3], {"a": [1.0, 2.0]}, r"series\['a'\] must have one value per n \(3\), got 2"),
        ([0, 2, 3], {"a": [1.0, 2.0, 3.0]}, "ns must be > 0 on a log x axis, got 0.0"),
        ([1, 2, 3], {"a": [1.0, -2.0, 3.0]}, r"series\['a'\] must be > 0 on a log y axis, got -2.0"),
        ([1, 2, 3], [1.0, 2.0, 3.0], "series must be a dict"),
        ([1, 2, 3], {"a": ["x", 1, 2]}, r"series\['a'\] must hold real numbers"),
    ],
)
def test_plot_scaling_rejects(ns, series, match):
    with pytest.raises((ValueError, TypeError), match=match):
        viz.plot_scaling(ns, series)


# ---------------------------------------------------------------------------------------------------------------
# bars, stacked shares, curves
# ---------------------------------------------------------------------------------------------------------------


def test_plot_bars():
    fig = viz.plot_bars(["fp32", "bf16", "int8"], [4 * 2**20, 2 * 2**20, 2**20], ylabel="bytes", title="weights")
    (ax,) = fig.axes
    assert ax.get_title() == "weights" and ax.get_ylabel() == "bytes"
    assert len(_bars(ax)) == 3
    assert [b.get_height() for b in _bars(ax)] == [4 * 2**20, 2 * 2**20, 2**20]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["4,194,304", "2,097,152", "1,048,576"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "bf16", "int8"]
    _render(fig)
    fig = viz.plot_bars(["a", "b"], [1.234567, None], ylabel="speed-up (×)", title="t")
    assert [t.get_text() for t in fig.axes[0].texts] == ["1.23", "n/a"]
    fig = viz.plot_bars(["a"], [1], ylabel="y", title="t", annotate=False)
    assert len(fig.axes[0].texts) == 0


def test_plot_bars_rejects():
    with pytest.raises(ValueError, match="labels and values must have the same length, got 2 and 3"):
        viz.plot_bars(["a", "b"], [1, 2, 3], ylabel="y", title="t")
    with pytest.raises(TypeError, match="ylabel must be a str"):
        viz.plot_bars(["a"], [1], ylabel=None, title="t")
    with pytest.raises(TypeError, match="labels must be a list of strings"):
        viz.plot_bars("ab", [1, 2], ylabel="y", title="t")
    with pytest.raises(TypeError, match="ax must be a matplotlib Axes"):
        viz.plot_bars(["a"], [1], ylabel="y", title="t", ax="left")


def test_plot_stacked_share():
    ns = [64, 256, 1024, 4096]
    d = 256
    # per-layer FLOPs: attention scores+values ∝ 4 n² d, FFN ∝ 16 n d²
    attn = [4 * n * n * d for n in ns]
    ffn = [16 * n * d * d for n in ns]
    fig = viz.plot_stacked_share(ns, {"attention": attn, "FFN": ffn}, xlabel="sequence length n", title="FLOP share")
    (ax,) = fig.axes
    assert ax.get_title() == "FLOP share" and ax.get_ylabel() == "share of FLOPs (%)"
    assert ax.get_xlabel() == "sequence length n"
    bars = _bars(ax)
    assert len(bars) == 2 * len(ns)
    tops = np.array([b.get_y() + b.get_height() for b in bars]).reshape(2, len(ns))
    np.testing.assert_allclose(tops[1], 100.0)  # every column stacks to 100 %
    # attention's share at n = d is 4/(4+16) = 20 %
    assert bars[1].get_height() == pytest.approx(20.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["attention", "FFN"]
    _render(fig)


def test_plot_stacked_share_rejects():
    with pytest.raises(ValueError, match=r"parts\['a'\] must have one value per x \(2\), got 3"):
        viz.plot_stacked_share([1, 2], {"a": [1, 2, 3]}, xlabel="x", title="t")
    with pytest.raises(ValueError, match=r"xs\[1\]=2 sum to 0"):
        viz.plot_stacked_share([1, 2], {"a": [1, 0], "b": [1, 0]}, xlabel="x", title="t")
    with pytest.raises(ValueError, match=r"parts\['a'\] must be ≥ 0, got -1.0"):
        viz.plot_stacked_share([1, 2], {"a": [1, -1]}, xlabel="x", title="t")


def test_plot_curves():
    fig = viz.plot_curves(
        {"shared": [3.0, 2.0, 1.5], "not shared": ([0, 10, 20, 30], torch.tensor([3.0, 1.8, 1.2, float("nan")]))},
        logy=True,
    )
    (ax,) = fig.axes
    assert ax.get_title() == "Training curves"
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss" and ax.get_yscale() == "log"
    assert [ln.get_label() for ln in ax.lines] == ["shared", "not shared"]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [0, 1, 2])
    np.testing.assert_array_equal(ax.lines[1].get_xdata(), [0, 10, 20, 30])
    assert len(ax.get_legend().get_texts()) == 2
    _render(fig)
    # a 2-value curve given as a tuple of numbers is ys, not (xs, ys)
    fig = viz.plot_curves({"a": (2.0, 1.0)})
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), [2.0, 1.0])


def test_plot_curves_rejects():
    with pytest.raises(ValueError, match=r"curves\['a'\] = \(xs, ys\) must have len\(xs\) == len\(ys\), got 2 and 3"):
        viz.plot_curves({"a": ([0, 1], [1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match=r"curves\['a'\] must be > 0 on a log y axis"):
        viz.plot_curves({"a": [1.0, 0.0]}, logy=True)
    with pytest.raises(TypeError, match="curves must be a dict"):
        viz.plot_curves([1.0, 2.0])


def test_figures_display_in_notebooks_without_pyplot():
    """A returned figure has a PNG repr, so Jupyter shows it even before pyplot set up the inline backend."""
    fig = viz.plot_bars(["a"], [1], ylabel="y", title="t")
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_heads_single_head_has_no_head_0_title():
    import torch

    fig = viz.plot_attention_heads(torch.softmax(torch.randn(5, 5), -1), title="layer 3, head 7")
    assert [ax.get_title() for ax in _heatmap_axes(fig)] == [""]
    fig3 = viz.plot_attention_heads(torch.softmax(torch.randn(2, 5, 5), -1))
    assert [ax.get_title() for ax in _heatmap_axes(fig3)] == ["head 1", "head 2"]


# ---------------------------------------------------------------------------------------------------------------
# log axes without overlapping labels
# ---------------------------------------------------------------------------------------------------------------


def test_log_scale_labels_only_major_ticks():
    fig = viz.CourseFigure(figsize=(5, 3))
    ax = fig.subplots()
    ax.plot([200, 300, 500, 900], [1, 2, 3, 4])  # less than a decade: matplotlib would label minor ticks
    viz.log_scale(ax, "x")
    _render(fig)
    assert ax.get_xscale() == "log"
    assert all(lbl.get_text() == "" for lbl in ax.xaxis.get_minorticklabels())
    fig2 = viz.CourseFigure(figsize=(5, 3))
    ax2 = fig2.subplots()
    ax2.plot([16, 32, 64, 128], [1, 2, 3, 4])
    viz.log_scale(ax2, "x", ticks=[16, 32, 64, 128])
    _render(fig2)
    assert [t.get_text() for t in ax2.get_xticklabels()] == ["16", "32", "64", "128"]
    assert len(ax2.xaxis.get_minorticklocs()) == 0
    with pytest.raises(ValueError, match="axis must be"):
        viz.log_scale(ax2, "z")
    with pytest.raises(ValueError, match="positive"):
        viz.log_scale(ax2, "x", ticks=[0, 1])
    with pytest.raises(TypeError, match="Axes"):
        viz.log_scale(None)


def test_new_figure_is_public_and_outside_pyplot():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = viz.new_figure(4, 3)
    assert isinstance(fig, viz.CourseFigure) and tuple(fig.get_size_inches()) == (4, 3)
    assert plt.get_fignums() == before  # pyplot does not know about it
    assert viz._new_figure is viz.new_figure  # the old name still works


def test_pipeline_gantt_plots_live_in_viz():
    fig = viz.plot_gpipe(2, 3)
    assert isinstance(fig, Figure) and "bubble 25%" in fig.axes[0].get_title()
    events = [{"stage": 0, "kind": "F", "micro": 0, "start": 0.0, "end": 0.001},
              {"stage": 1, "kind": "F", "micro": 0, "start": 0.001, "end": 0.002}]
    ax_fig = viz.plot_gantt(events, unit="ms")
    assert ax_fig.axes[0].get_xlabel() == "time (ms)"
    with pytest.raises(ValueError, match="unit must be 'tick' or 'ms'"):
        viz.plot_gantt(events, unit="s")
