"""Explorers: a plot function + a few sliders = an interactive trade-off.

Every chapter ends with an "Explore" cell in which the learner moves sliders (sequence length, number of segments,
sparsity, bits …) and watches a plot of the chapter's trade-off change. All of them are built the same way, from a
plot function of :mod:`effedu.viz` style (keyword parameters in, a matplotlib ``Figure`` out) and one keyword per
slider::

    from effedu.widgets import explorer, static

    def plot(n=256, causal=False, method="naive"):
        ...
        return fig

    explorer(plot, n=(64, 1024, 64), causal=False, method=["naive", "tiled"])   # the interactive cell
    static(plot, n=256, causal=False, method="naive")                          # the same plot, once, for nbval

A control is written as

==============================  ===========================================================
``(min, max, step)`` ints       an ``IntSlider``  (``(min, max, step, default)`` sets the start)
``(min, max, step)`` floats     a ``FloatSlider`` (idem)
``[a, b, c]``                   a ``Dropdown`` of those values (``[(label, value), ...]`` too)
``{label: value}``              a ``Dropdown`` with those labels
``True`` / ``False``            a ``Checkbox``
an ipywidgets widget            used as is
==============================  ===========================================================

Without an explicit default a control starts at the plot function's own default for that parameter (when it is
one of the choices / inside the range), else at the slider's minimum / the first choice — the cheapest setting,
so that a CPU run of the notebook stays quick.

Controls that depend on other controls: ``depends={name: rule}``, where ``rule(values) -> dict`` receives the
current ``{parameter: value}`` and returns what to change on that control — ``min``/``max`` (a slider's range,
its value clamped into it), ``options`` (a dropdown's choices), ``visible`` (False hides a control that the
current setting does not use). The rules run before every redraw, so a control never offers a value that does
nothing::

    explorer(plot, depth=(2, 36, 1, 12), segments=(1, 36, 1, 3),
             depends={"segments": lambda v: {"max": v["depth"]}})            # never more segments than layers
    explorer(plot, pattern=["local", "bigbird"], random_blocks=(0, 4, 1),
             depends={"random_blocks": lambda v: {"visible": v["pattern"] == "bigbird"}})

Sliders are created with ``continuous_update=False``: the plot is redrawn when the learner *releases* the slider,
not for every pixel of a drag (which would queue dozens of slow re-runs).

How the figure reaches the screen: the explorer renders it to PNG and *sets* the ``Output`` widget's ``outputs``
(one display item, replacing the previous one in a single step — the effect of ``clear_output(wait=True)`` +
``display``, without a flicker). Setting ``outputs`` rather than printing inside ``with output:`` also works
outside a running kernel and keeps ``output.outputs`` readable from Python, which is what the tests check. A
figure drawn with pyplot is then closed, so the inline backend does not show it a second time under the cell.
An exception inside the plot function is shown in the output as the error and its traceback (never swallowed);
``print`` output and warnings of the plot function are shown above the figure.
"""
from __future__ import annotations

import base64
import contextlib
import html
import inspect
import io
import math
import numbers
import sys
import traceback
import warnings

import ipywidgets as widgets
from matplotlib.figure import Figure

__all__ = ["Explorer", "explorer", "static"]

_SUPPORTED = (
    "a (min, max, step) or (min, max, step, default) tuple of numbers (→ slider), a list of choices (→ Dropdown), "
    "a dict {label: value} (→ Dropdown), a bool (→ Checkbox) or an ipywidgets value widget"
)


# ---------------------------------------------------------------------------------------------------------------
# Checking names against the plot function's signature
# ---------------------------------------------------------------------------------------------------------------


def _fn_name(fn):
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _check_call(plot_fn, names, where):
    """Check that ``plot_fn(**{name: ...})`` is a valid call; return ``{name: default}`` of its parameters."""
    if not callable(plot_fn):
        raise TypeError(f"{where}: plot_fn must be callable, got {type(plot_fn).__name__} ({plot_fn!r})")
    try:
        sig = inspect.signature(plot_fn)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check against
        return {}
    params = sig.parameters
    by_keyword = {
        n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    fn = _fn_name(plot_fn)
    for name in names:
        if name not in by_keyword and not takes_kwargs:
            raise TypeError(
                f"{where}: {name!r} is not a parameter of {fn} (its keyword parameters: "
                f"{', '.join(by_keyword) or 'none'})"
            )
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty
        and (p.kind == p.POSITIONAL_ONLY or (p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in names))
    ]
    if missing:
        raise TypeError(
            f"{where}: {fn} has no default for {', '.join(map(repr, missing))}; give each a value "
            f"(a control in explorer, a keyword in static)"
        )
    return {n: p.default for n, p in by_keyword.items() if p.default is not p.empty}


# ---------------------------------------------------------------------------------------------------------------
# Control specs → widgets
# ---------------------------------------------------------------------------------------------------------------


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _decimals(step):
    """Digits after the point that a float slider's readout needs to show its step (0.05 → 2)."""
    return min(6, max(1, -math.floor(math.log10(step) + 1e-9)))


_STYLE = {"description_width": "initial"}


def _slider(name, spec, fn_default, where):
    if len(spec) not in (3, 4) or not all(_is_real(v) for v in spec):
        raise TypeError(
            f"{where}: control {name}={spec!r} is not supported; a slider is (min, max, step) or "
            f"(min, max, step, default) of numbers. Supported: {_SUPPORTED}"
        )
    lo, hi, step = spec[:3]
    if not lo < hi:
        raise ValueError(f"{where}: control {name}: min must be < max, got min={lo}, max={hi}")
    if not step > 0:
        raise ValueError(f"{where}: control {name}: step must be > 0, got {step}")
    integer = all(_is_int(v) for v in spec)
    if len(spec) == 4:
        value = spec[3]
        if not lo <= value <= hi:
            raise ValueError(f"{where}: control {name}: default must lie in [{lo}, {hi}], got {value}")
    elif _is_real(fn_default) and lo <= fn_default <= hi and (not integer or float(fn_default).is_integer()):
        value = fn_default  # start where the plot function itself starts
    else:
        value = lo
    common = dict(description=name, continuous_update=False, style=_STYLE)
    if integer:
        return widgets.IntSlider(min=int(lo), max=int(hi), step=int(step), value=int(value), **common)
    return widgets.FloatSlider(
        min=float(lo), max=float(hi), step=float(step), value=float(value),
        readout_format=f".{_decimals(float(step))}f", **common,
    )


def _safe_in(value, choices):
    for c in choices:
        try:
            if c is value or bool(c == value):
                return True
        except Exception:  # e.g. comparing arrays
            continue
    return False


def _dropdown(name, options, fn_default, where):
    if len(options) == 0:
        raise ValueError(f"{where}: control {name}: the list of choices is empty; expected at least one")
    if isinstance(options, dict):
        options = list(options.items())
        values = [v for _, v in options]
    else:
        options = list(options)
        pairs = all(isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str) for o in options)
        values = [o[1] for o in options] if pairs else options
    value = fn_default if _safe_in(fn_default, values) else values[0]
    return widgets.Dropdown(options=options, value=value, description=name, style=_STYLE)


def _make_control(name, spec, fn_default, where):
    """One control spec → one widget (see the table in the module docstring)."""
    if isinstance(spec, widgets.Widget):
        if not isinstance(spec, widgets.ValueWidget):
            raise TypeError(
                f"{where}: control {name} is a {type(spec).__name__}, which has no .value to pass to the plot "
                f"function; expected a value widget (slider, dropdown, checkbox, text …)"
            )
        if hasattr(spec, "description") and not spec.description:
            spec.description = name
        return spec
    if isinstance(spec, bool):
        return widgets.Checkbox(value=spec, description=name, indent=False)
    if isinstance(spec, tuple):
        return _slider(name, spec, fn_default, where)
    if isinstance(spec, (list, dict)):
        return _dropdown(name, spec, fn_default, where)
    raise TypeError(
        f"{where}: control {name}={spec!r} ({type(spec).__name__}) is not supported; expected {_SUPPORTED}. "
        f"(To fix a parameter at one value, use functools.partial on the plot function.)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Running the plot function and showing what it produced
# ---------------------------------------------------------------------------------------------------------------


def _pyplot():
    """pyplot if somebody imported it (only then can a figure be registered there), else None."""
    return sys.modules.get("matplotlib.pyplot")


def _pyplot_fignums():
    plt = _pyplot()
    return set(plt.get_fignums()) if plt is not None else set()


def _figures_of(result, before, where):
    """The figure(s) a plot function produced: the Figure it returned, or what it drew with pyplot."""
    if isinstance(result, Figure):
        return [result]
    if result is not None:
        raise TypeError(
            f"{where}: the plot function must return a matplotlib Figure (or None after drawing with pyplot), "
            f"got {type(result).__name__}"
        )
    plt = _pyplot()
    if plt is not None:
        new = sorted(set(plt.get_fignums()) - before)
        if new:
            return [plt.figure(num) for num in new]
        if plt.get_fignums():
            return [plt.gcf()]
    raise TypeError(f"{where}: the plot function returned None and drew no pyplot figure; return the Figure")


def _release(fig):
    """Forget ``fig`` in pyplot's registry (no-op for a figure pyplot never knew): it must not be shown twice."""
    plt = _pyplot()
    if plt is not None:
        plt.close(fig)


def _figure_item(fig):
    """The figure as one Jupyter ``display_data`` output (PNG, base64, as in a saved notebook)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return {
        "output_type": "display_data",
        "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)},
        "metadata": {},
    }


def _stream_item(name, text):
    return {"output_type": "stream", "name": name, "text": text}


def _error_item(exc):
    """The exception as a Jupyter ``error`` output: name, message and traceback, as a failing cell shows it."""
    tb = exc.__traceback__
    lines = "".join(traceback.format_exception(type(exc), exc, tb)).rstrip("\n").split("\n")
    return {"output_type": "error", "ename": type(exc).__name__, "evalue": str(exc), "traceback": lines}


class Explorer(widgets.VBox):
    """A title, a row of controls and an ``Output`` showing ``plot_fn(**current values)``.

    Attributes:
        controls: ``{parameter name: widget}``; set ``controls["n"].value = 512`` to re-run from code.
        output: the ``ipywidgets.Output`` holding the figure (or the error).
        last_figure: the Figure of the latest run (``None`` if it raised).
        last_error: the exception of the latest run, or ``None``.
        plot_fn: the plot function.

    Build it with :func:`explorer`.
    """

    def __init__(self, plot_fn, controls, title=None, depends=None):
        self.plot_fn = plot_fn
        self.controls = dict(controls)
        self.depends = dict(depends or {})
        self._adjusting = False
        self.output = widgets.Output(layout=widgets.Layout(min_height="120px"))
        self.last_figure = None
        self.last_error = None
        header = [widgets.HTML(f"<h4 style='margin:4px 0'>{html.escape(title)}</h4>")] if title else []
        row = widgets.HBox(list(self.controls.values()), layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__(children=[*header, row, self.output])
        for widget in self.controls.values():
            widget.observe(self._on_change, names="value")
        self._apply_depends()
        self.update()

    @property
    def values(self):
        """The current ``{parameter: value}`` the plot function is called with."""
        return {name: widget.value for name, widget in self.controls.items()}

    def visible(self, name):
        """Whether control ``name`` is shown (a ``depends`` rule may hide it)."""
        return self.controls[name].layout.display != "none"

    def _apply_depends(self):
        """Run every ``depends`` rule on the current values (twice: a clamped value may feed another rule)."""
        self._adjusting = True
        try:
            for _ in range(2):
                for name, rule in self.depends.items():
                    _apply_rule(name, self.controls[name], rule(self.values))
        finally:
            self._adjusting = False

    def _on_change(self, change):
        if self._adjusting:  # a rule moved a value: one redraw after all rules ran, not one per change
            return
        self._apply_depends()
        self.update()

    def update(self):
        """Re-run the plot function with the current values and show its figure; return the figure or None."""
        where = f"explorer({_fn_name(self.plot_fn)})"
        printed = io.StringIO()
        items, figures, caught, error = [], [], [], None
        before = _pyplot_fignums()
        try:
            with contextlib.redirect_stdout(printed), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = self.plot_fn(**self.values)
            figures = _figures_of(result, before, where)
        except Exception as exc:  # shown to the learner below the sliders, not swallowed
            error = exc
            for num in _pyplot_fignums() - before:  # pyplot figures of a failed run must not pile up
                _pyplot().close(num)
        if printed.getvalue():
            items.append(_stream_item("stdout", printed.getvalue()))
        if caught:
            seen = dict.fromkeys(f"{w.category.__name__}: {w.message}\n" for w in caught)
            items.append(_stream_item("stderr", "".join(seen)))
        if error is not None:
            items.append(_error_item(error))
        for fig in figures:
            items.append(_figure_item(fig))
            _release(fig)
        self.output.outputs = tuple(items)
        self.last_error = error
        self.last_figure = figures[-1] if figures else None
        return self.last_figure


_RULE_KEYS = {"min", "max", "options", "visible"}


def _apply_rule(name, widget, change):
    where = f"explorer: depends[{name!r}]"
    if not isinstance(change, dict) or not set(change) <= _RULE_KEYS:
        raise TypeError(f"{where}: a rule must return a dict with keys among {sorted(_RULE_KEYS)}, got {change!r}")
    if "visible" in change:
        widget.layout.display = None if change["visible"] else "none"
    if "options" in change:
        if not isinstance(widget, widgets.Dropdown):
            raise TypeError(f"{where}: 'options' applies to a dropdown, {name} is a {type(widget).__name__}")
        options = list(change["options"])
        if not options:
            raise ValueError(f"{where}: 'options' must not be empty")
        if list(widget.options) != options:
            value = widget.value
            widget.options = options
            values = [o[1] if isinstance(o, tuple) else o for o in options]
            widget.value = value if _safe_in(value, values) else values[0]
    for key in ("min", "max"):
        if key in change:
            if not isinstance(widget, (widgets.IntSlider, widgets.FloatSlider)):
                raise TypeError(f"{where}: {key!r} applies to a slider, {name} is a {type(widget).__name__}")
    if "min" in change or "max" in change:
        lo = change.get("min", widget.min)
        hi = change.get("max", widget.max)
        if not lo <= hi:
            raise ValueError(f"{where}: min must be <= max, got min={lo}, max={hi}")
        # widen first, then narrow, so that ipywidgets never sees min > max on the way
        if hi > widget.max:
            widget.max = hi
        widget.min = lo
        widget.max = hi
        widget.value = min(max(widget.value, lo), hi)


def explorer(plot_fn, *, title=None, depends=None, **controls):
    """An interactive explorer of ``plot_fn``: one control per keyword (see the module docstring for the specs).

    Returns an :class:`Explorer` (an ``ipywidgets.VBox``) already showing the plot for the initial values; its
    ``.controls``, ``.output``, ``.update()`` and ``.last_figure`` are there for code and tests.

    ``depends`` maps a control's name to a rule ``values -> {"min"|"max"|"options"|"visible": ...}`` (see the
    module docstring).

    Raises ``TypeError`` for a control that is not a parameter of ``plot_fn``, a parameter without default that
    has no control, or a control spec that is not supported; ``ValueError`` for a malformed range.
    """
    where = "explorer"
    if depends is not None:
        if not isinstance(depends, dict):
            raise TypeError(f"{where}: depends must be a dict {{control name: rule}}, got {type(depends).__name__}")
        for name, rule in depends.items():
            if name not in controls:
                raise ValueError(f"{where}: depends names {name!r}, which is not a control (controls: "
                                 f"{', '.join(controls)})")
            if not callable(rule):
                raise TypeError(f"{where}: depends[{name!r}] must be callable (values -> dict), got {rule!r}")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"{where}: title must be a str or None, got {type(title).__name__}")
    if not controls:
        raise TypeError(f"{where}: give at least one control, e.g. explorer(plot, n=(64, 1024, 64))")
    defaults = _check_call(plot_fn, list(controls), where)
    made = {name: _make_control(name, spec, defaults.get(name), where) for name, spec in controls.items()}
    return Explorer(plot_fn, made, title=title, depends=depends)


def static(plot_fn, **values):
    """Call ``plot_fn(**values)`` once, plainly, and return its Figure (the notebook's non-interactive path).

    Names are checked against ``plot_fn``'s signature as in :func:`explorer`. A figure drawn with pyplot (the
    function returned None) is taken from pyplot and released from its registry, so a notebook shows it once, as
    the cell's value.
    """
    where = "static"
    _check_call(plot_fn, list(values), where)
    before = _pyplot_fignums()
    figures = _figures_of(plot_fn(**values), before, where)
    fig = figures[-1]
    _release(fig)
    return fig
