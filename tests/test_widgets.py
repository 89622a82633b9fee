"""Tests of effedu.widgets: an explorer calls the plot function with its controls' values, re-runs on every change,
shows the figure (or the error) in its Output, and rejects names the plot function does not have."""
import matplotlib

matplotlib.use("Agg")  # no display in tests; must come before pyplot is imported anywhere

import functools  # noqa: E402

import ipywidgets as widgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from effedu.widgets import Explorer, explorer, static  # noqa: E402


class Recorder:
    """A plot function that remembers how it was called (and can be told to fail)."""

    def __init__(self):
        self.calls = []

    def __call__(self, n=128, temperature=1.0, method="naive", causal=False):
        self.calls.append(dict(n=n, temperature=temperature, method=method, causal=causal))
        if n == 13:
            raise ValueError("n=13 is unlucky, expected anything else")
        fig = Figure(figsize=(2, 1.5))  # small: every call is rendered to PNG
        ax = fig.subplots()
        ax.plot([temperature * i for i in range(1, n // 32 + 2)], label=method)
        ax.set_title(f"n={n}")
        return fig


def _build(rec):
    return explorer(
        rec,
        title="Try it",
        n=(64, 512, 32),
        temperature=(0.5, 2.0, 0.25),
        method=["naive", "tiled"],
        causal=True,
    )


def _images(out):
    return [o for o in out.outputs if o["output_type"] == "display_data" and "image/png" in o["data"]]


def test_explorer_builds_controls_and_first_plot():
    rec = Recorder()
    ex = _build(rec)
    assert isinstance(ex, widgets.VBox) and isinstance(ex, Explorer)
    c = ex.controls
    assert isinstance(c["n"], widgets.IntSlider) and (c["n"].min, c["n"].max, c["n"].step) == (64, 512, 32)
    assert isinstance(c["temperature"], widgets.FloatSlider) and c["temperature"].step == 0.25
    assert isinstance(c["method"], widgets.Dropdown) and list(c["method"].options) == ["naive", "tiled"]
    assert isinstance(c["causal"], widgets.Checkbox)
    assert c["n"].continuous_update is False and c["temperature"].continuous_update is False
    # one call at creation, with the plot function's own defaults where they fit (n=128, temperature=1.0) and
    # the given checkbox value
    assert rec.calls == [dict(n=128, temperature=1.0, method="naive", causal=True)]
    assert isinstance(ex.last_figure, Figure)
    assert ex.last_figure.axes[0].get_title() == "n=128"
    assert len(_images(ex.output)) == 1
    assert ex.output in ex.children
    assert any(isinstance(w, widgets.HTML) and "Try it" in w.value for w in ex.children)


def test_explorer_reruns_on_change():
    rec = Recorder()
    ex = _build(rec)
    ex.controls["n"].value = 256
    assert rec.calls[-1]["n"] == 256
    ex.controls["method"].value = "tiled"
    ex.controls["causal"].value = False
    ex.controls["temperature"].value = 1.5
    assert rec.calls[-1] == dict(n=256, temperature=1.5, method="tiled", causal=False)
    assert len(rec.calls) == 5
    assert ex.last_figure.axes[0].get_title() == "n=256"
    assert len(_images(ex.output)) == 1  # replaced, not appended
    ex.update()
    assert len(rec.calls) == 6


def test_explorer_shows_exceptions():
    rec = Recorder()
    ex = explorer(rec, n=(1, 64, 1, 13))  # starts in the failing state
    assert ex.last_figure is None and isinstance(ex.last_error, ValueError)
    (err,) = ex.output.outputs
    assert err["output_type"] == "error" and err["ename"] == "ValueError"
    assert "n=13 is unlucky" in err["evalue"]
    assert any("n=13 is unlucky" in line for line in err["traceback"])
    ex.controls["n"].value = 40  # recovers
    assert ex.last_error is None and len(_images(ex.output)) == 1


def test_explorer_shows_print_and_pyplot_figures():
    def plot(k=1):
        print(f"drawing k={k}")
        plt.figure()
        plt.plot(range(k + 1))
        plt.title("pyplot")
        # returns None: drew with pyplot

    before = set(plt.get_fignums())
    ex = explorer(plot, k=(1, 5, 1))
    kinds = [o["output_type"] for o in ex.output.outputs]
    assert kinds == ["stream", "display_data"]
    assert ex.output.outputs[0]["text"] == "drawing k=1\n"
    assert ex.last_figure.axes[0].get_title() == "pyplot"
    assert set(plt.get_fignums()) == before  # closed: the inline backend will not show it again


def test_explorer_wrong_return_type_is_shown():
    ex = explorer(lambda n=1: "not a figure", n=(1, 3, 1))
    assert isinstance(ex.last_error, TypeError)
    assert "must return a matplotlib Figure" in ex.output.outputs[-1]["evalue"]


def test_explorer_control_specs():
    def plot(a=3, b=0.5, c="y", d=None):
        return Figure()

    ex = explorer(
        plot,
        a=(0, 10, 2, 6),  # explicit default
        b=(0.0, 1.0, 0.05),  # function default 0.5 is in range
        c={"ex": "x", "why": "y"},  # labels → values
        d=widgets.IntText(value=7),  # used as is
    )
    assert ex.controls["a"].value == 6
    assert ex.controls["b"].value == 0.5 and ex.controls["b"].readout_format == ".2f"
    assert ex.controls["c"].value == "y" and ex.controls["c"].label == "why"
    assert ex.controls["d"].value == 7 and ex.controls["d"].description == "d"
    assert ex.values == dict(a=6, b=0.5, c="y", d=7)
    # no usable function default → the minimum / the first choice
    ex = explorer(lambda n, m="q": Figure(), n=(16, 64, 16), m=["a", "b"])
    assert ex.controls["n"].value == 16 and ex.controls["m"].value == "a"


@pytest.mark.parametrize(
    "controls, exc, match",
    [
        (dict(nn=(1, 3, 1)), TypeError, r"'nn' is not a parameter of .*Recorder.*\(its keyword parameters: n, "),
        (dict(n=5), TypeError, r"control n=5 \(int\) is not supported"),
        (dict(n=(1, 2)), TypeError, r"control n=\(1, 2\) is not supported; a slider is \(min, max, step\)"),
        (dict(n=("a", "b", "c")), TypeError, "control n=.* is not supported"),
        (dict(n=(5, 1, 1)), ValueError, "min must be < max, got min=5, max=1"),
        (dict(n=(1, 5, 0)), ValueError, "step must be > 0, got 0"),
        (dict(n=(1, 5, 1, 9)), ValueError, r"default must lie in \[1, 5\], got 9"),
        (dict(method=[]), ValueError, "control method: the list of choices is empty"),
        (dict(n=widgets.Button()), TypeError, "control n is a Button, which has no .value"),
        (dict(), TypeError, "give at least one control"),
    ],
)
def test_explorer_rejects(controls, exc, match):
    with pytest.raises(exc, match=match):
        explorer(Recorder(), **controls)


def test_explorer_rejects_missing_required_and_non_callable():
    with pytest.raises(TypeError, match=r"has no default for 'm'"):
        explorer(lambda n, m: Figure(), n=(1, 3, 1))
    with pytest.raises(TypeError, match="plot_fn must be callable, got int"):
        explorer(3, n=(1, 3, 1))
    with pytest.raises(TypeError, match="title must be a str or None"):
        explorer(Recorder(), title=5, n=(1, 3, 1))


def test_explorer_accepts_kwargs_and_partial():
    seen = {}

    def plot(**kw):
        seen.update(kw)
        return Figure()

    explorer(plot, anything=(1, 3, 1))
    assert seen == {"anything": 1}
    rec = Recorder()
    explorer(functools.partial(rec, method="tiled"), n=(64, 128, 64))
    assert rec.calls[-1]["method"] == "tiled"


def test_static():
    rec = Recorder()
    fig = static(rec, n=64, method="tiled")
    assert isinstance(fig, Figure)
    assert rec.calls == [dict(n=64, temperature=1.0, method="tiled", causal=False)]
    with pytest.raises(TypeError, match="'m' is not a parameter"):
        static(rec, m=3)
    with pytest.raises(ValueError, match="unlucky"):  # the static path raises plainly
        static(rec, n=13)

    def pyplot_plot(k=1):
        plt.figure()
        plt.plot([0, k])

    before = set(plt.get_fignums())
    fig = static(pyplot_plot, k=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert set(plt.get_fignums()) == before


def test_explorer_shows_warnings_once_each():
    import warnings

    def plot(k=1):
        for _ in range(3):
            warnings.warn("slow path", UserWarning)
        return Figure(figsize=(1, 1))

    ex = explorer(plot, k=(1, 2, 1))
    (stderr,) = [o for o in ex.output.outputs if o["output_type"] == "stream"]
    assert stderr["name"] == "stderr" and stderr["text"] == "UserWarning: slow path\n"


# ---------------------------------------------------------------------------------------------------------------
# controls that depend on other controls (depends=)
# ---------------------------------------------------------------------------------------------------------------


def _depth_plot(depth=12, segments=3, pattern="local", random_blocks=1, size="s"):
    _depth_plot.calls.append(dict(depth=depth, segments=segments, pattern=pattern, random_blocks=random_blocks,
                                  size=size))
    return Figure(figsize=(1, 1))


def _dep_explorer():
    _depth_plot.calls = []
    return explorer(
        _depth_plot, depth=(2, 36, 1, 12), segments=(1, 36, 1, 3), pattern=["local", "bigbird"],
        random_blocks=(0, 4, 1), size=["s", "m", "l"],
        depends={"segments": lambda v: {"max": v["depth"]},
                 "random_blocks": lambda v: {"visible": v["pattern"] == "bigbird"},
                 "size": lambda v: {"options": ["s", "m", "l"] if v["depth"] > 4 else ["s"]}},
    )


def test_depends_bounds_a_slider_by_another_and_redraws_once():
    ex = _dep_explorer()
    assert ex.controls["segments"].max == 12 and len(_depth_plot.calls) == 1
    ex.controls["segments"].value = 10
    ex.controls["depth"].value = 4  # segments 10 > depth 4: clamped to 4, the slider cannot offer more
    assert ex.controls["segments"].max == 4 and ex.controls["segments"].value == 4
    assert _depth_plot.calls[-1]["segments"] == 4 and _depth_plot.calls[-1]["depth"] == 4
    assert len(_depth_plot.calls) == 3  # one redraw per learner move, not one per adjusted control
    ex.controls["depth"].value = 30
    assert ex.controls["segments"].max == 30 and ex.controls["segments"].value == 4


def test_depends_hides_unused_controls_and_narrows_options():
    ex = _dep_explorer()
    assert not ex.visible("random_blocks") and ex.visible("segments")
    ex.controls["pattern"].value = "bigbird"
    assert ex.visible("random_blocks")
    ex.controls["size"].value = "l"
    ex.controls["depth"].value = 3
    assert list(ex.controls["size"].options) == ["s"] and ex.controls["size"].value == "s"


@pytest.mark.parametrize("depends, exc, match", [
    ({"nope": lambda v: {}}, ValueError, "not a control"),
    ({"n": 3}, TypeError, "callable"),
    ([("n", None)], TypeError, "must be a dict"),
    ({"n": lambda v: {"colour": 1}}, TypeError, "keys among"),
    ({"n": lambda v: {"options": [1]}}, TypeError, "dropdown"),
    ({"n": lambda v: {"min": 100, "max": 10}}, ValueError, "min must be <= max"),
])
def test_depends_rejects(depends, exc, match):
    with pytest.raises(exc, match=match):
        explorer(Recorder(), n=(64, 512, 32), depends=depends)
