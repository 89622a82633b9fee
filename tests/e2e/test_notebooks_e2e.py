"""Every chapter as a learner sees it: JupyterLab in headless Chromium, run all, move a slider, see the plot change.

The notebook opened is the chapter's **student copy** (``effedu.student.strip_solutions``, what ``make student``
writes): each exercise's answer is a stub, and the stub and its check cell are tagged ``raises-exception``, so
JupyterLab's "Run All" goes on past them (it sends such a cell with ``stop_on_error=False``). This test is thus also
the exercises' test (``tests/exercises`` runs the same check with nbclient, for machines without Chromium):
every check cell raises, with ``ExerciseNotDone``, ``AssertionError`` or ``NotImplementedError`` (a check that
passes on the stub checks nothing), and no other cell raises (the stubs break only what the learner writes).
nbval proves the other half: in the course notebooks every check passes.

nbval proves a notebook's text outputs; this proves the page: the chapter opens in JupyterLab, its kernel
connects, "run all" finishes without an error output outside the exercises, the explorer's controls render as widgets (not as
``IntSlider(value=…)`` text or "Error displaying widget"), and moving one slider with the keyboard re-runs the
plot in the kernel and redraws the figure. Then every visible control of every explorer is moved to both ends
(sliders with Home/End, dropdowns to their last and first option, checkboxes toggled): each move must redraw the
figure, without an error — a control that changes nothing is a defect (bound it or hide it with ``depends=``).
This reuses the kernel of the run: the explorer cells alone, no second run of the notebook. Screenshots of the explorer before and after the move are written to
``docs/screenshots/<notebook>-before.png`` / ``-after.png`` (the README shows them).

Each notebook runs from a copy in a temporary folder; the repository's notebooks are never touched.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import pytest

import _lab
from effedu.student import EXPECTED_CHECK_ERRORS, exercise_cells, strip_solutions

pytestmark = pytest.mark.e2e

NOTEBOOKS = sorted(_lab.NOTEBOOK_DIR.glob(_lab.NOTEBOOK_GLOB))
RUN_TIMEOUT = float(os.environ.get("EFFEDU_E2E_TIMEOUT", "600"))
MOVE_TIMEOUT = float(os.environ.get("EFFEDU_E2E_MOVE_TIMEOUT", "90"))  # one redraw after one move
SCREENSHOTS = pathlib.Path(os.environ.get("EFFEDU_E2E_SCREENSHOTS", _lab.REPO / "docs" / "screenshots"))


def _cell_error_message(cells: list[dict], errors: list[dict]) -> str:
    lines = []
    for e in errors:
        src = "".join(cells[e["cell"]]["source"]).strip().splitlines()
        lines.append(f"cell {e['cell']} ({src[0][:80] if src else ''!r}): {e['ename']}: {e['evalue']}")
    return "; ".join(lines)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_runs_and_explorer_redraws(notebook, lab, lab_server):
    # the student copy, written to the server's temporary folder: the repo's file is never opened
    student = strip_solutions(json.loads(notebook.read_text()))
    (lab_server.notebook_dir / notebook.name).write_text(json.dumps(student, indent=1, ensure_ascii=False) + "\n")
    times = _lab.TIMINGS.setdefault(notebook.stem, {})
    started = time.monotonic()
    try:
        _visit(notebook, student, lab, times)
    finally:
        times["total"] = time.monotonic() - started


def _check_exercises(name, cells, pairs, errors):
    """Every check cell raised a learner's error; no cell outside the exercises raised."""
    exercise_idx = {i for pair in pairs for i in pair}
    unexpected = [e for e in errors if e["cell"] not in exercise_idx]
    assert not unexpected, (f"{name}: a cell outside the exercises raised in the student copy: "
                            f"{_cell_error_message(cells, unexpected)}")
    by_cell = {}
    for e in errors:
        by_cell.setdefault(e["cell"], e)
    for n, (sol, chk) in enumerate(pairs, 1):
        err = by_cell.get(chk)
        assert err, (f"{name}: exercise {n}'s check (cell {chk}) passes on the stub of cell {sol}: it checks "
                     f"nothing a learner could get wrong")
        assert err["ename"] in EXPECTED_CHECK_ERRORS, (
            f"{name}: exercise {n}'s check (cell {chk}) fails on the stub with {err['ename']}: "
            f"{err['evalue'][:200]} — expected a message for the learner ({', '.join(sorted(EXPECTED_CHECK_ERRORS))})"
        )


def _visit(notebook, student, lab, times):
    name = notebook.name
    cells = student["cells"]
    pairs = exercise_cells(student)
    assert pairs, f"{name}: no exercises (cells tagged 'solution', each followed by its check cell)"
    expected_errors = {i for pair in pairs for i in pair}
    lab.error_cells = expected_errors  # error outputs allowed on the page (lab.dom_errors): the exercises' only
    started = time.monotonic()

    # 1. open the chapter and wait for a connected, idle kernel
    lab.open_notebook(name)
    times["open"] = time.monotonic() - started

    # 2. run all cells (command id, not a label) and wait on the page state until every cell has executed
    t = time.monotonic()
    state = lab.run_all(name, timeout=RUN_TIMEOUT)
    times["run_all"] = time.monotonic() - t
    cell_times = {int(i): s for i, s in (state.get("times") or {}).items()}
    times["cells"] = sum(cell_times.values())
    times["slowest"] = max(cell_times.items(), key=lambda kv: kv[1], default=(None, 0.0))
    unexpected = [e for e in state["errors"] if e["cell"] not in expected_errors]
    assert not unexpected, f"{name}: a cell raised: {_cell_error_message(cells, unexpected)}"
    assert not state["missing"], (
        f"{name}: cells {state['missing']} were not executed (after the error of cell(s) "
        f"{sorted({e['cell'] for e in state['errors']})}: is the 'raises-exception' tag honoured by Run All?)"
        if state["errors"] else f"{name}: cells {state['missing']} were not executed")
    _check_exercises(name, cells, pairs, state["errors"])
    times["checks"] = len(pairs)
    dom_errors = lab.dom_errors()
    assert not dom_errors, f"{name}: error output(s) on the page outside the exercises: {dom_errors}"

    # 3. the explorer renders as widgets: sliders with handles and the figure, no text repr, no widget error
    t = time.monotonic()
    report = lab.explorers()
    assert not report["problems"], f"{name}: widgets not rendered as widgets: {report['problems']}"
    assert report["explorers"], f"{name}: no cell calls widgets.explorer("
    for ex in report["explorers"]:
        assert ex["widgets"] > 0 and ex["handles"] == ex["sliders"], (
            f"{name}: cell {ex['cell']}: the explorer did not render as widgets (sliders with handles): {ex}"
        )
    assert lab.controls(0), f"{name}: the first explorer shows no control (slider, dropdown or checkbox)"
    before = lab.wait_image_ready(0)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    lab.screenshot_explorer(SCREENSHOTS / f"{notebook.stem}-before.png", 0)

    # 4. move the first control (a slider with the keyboard, else a dropdown or checkbox); the kernel re-runs the
    #    plot and the image is replaced
    first = lab.controls(0)[0]
    if first["kind"] == "slider" and first["index"] == 0:  # one keyboard step, as a learner nudges it
        slider, key = lab.move_slider(0)
        # the front end updates the readout and the handle's aria-valuenow (a float slider's may lag): either counts
        deadline = time.monotonic() + 5.0

        def unmoved(after):
            return after["now"] == slider["now"] and after["readout"] == slider["readout"]

        while unmoved(after_slider := lab.sliders(0)[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not unmoved(after_slider), (f"{name}: {key} did not move slider {slider['label']!r}: {slider} -> "
                                           f"{after_slider}")
        moved = f"{slider['label']} {slider['readout']} -> {after_slider['readout']}"
    else:
        moved = lab.move_control(0, first, "max") or lab.move_control(0, first, "min")
        assert moved, f"{name}: the first control {first} cannot be moved"
    after = lab.wait_image_changed(before, name, 0, timeout=RUN_TIMEOUT)
    assert after["hash"] != before["hash"] or after["len"] != before["len"]
    dom_errors = lab.dom_errors()
    assert not dom_errors, f"{name}: moving {moved} showed an error: {dom_errors}"
    lab.evaluate("() => document.activeElement && document.activeElement.blur()")
    lab.screenshot_explorer(SCREENSHOTS / f"{notebook.stem}-after.png", 0)
    times["explore"] = time.monotonic() - t
    times["moved"] = moved

    # 5. every visible control of every explorer, to both ends: each move redraws the figure
    t = time.monotonic()
    moves = 0
    for n in range(len(report["explorers"])):
        seen = set()
        while True:  # re-read the controls after each move: a depends= rule may show, hide or re-bound some
            todo = [(c, end) for c in lab.controls(n) for end in ("max", "min")
                    if (c["kind"], c["index"], c["label"], end) not in seen]
            if not todo:
                break
            control, end = todo[0]
            seen.add((control["kind"], control["index"], control["label"], end))
            before = lab.wait_image_ready(n)
            moved = lab.move_control(n, control, end)
            if moved is None:
                continue
            try:
                lab.wait_image_changed(before, name, n, timeout=MOVE_TIMEOUT)
            except AssertionError as exc:
                raise AssertionError(f"{name}: explorer {n + 1}: moving {moved} did not redraw the figure "
                                     f"(a control that changes nothing?): {exc}") from None
            dom_errors = lab.dom_errors()
            assert not dom_errors, f"{name}: explorer {n + 1}: moving {moved} showed an error: {dom_errors}"
            moves += 1
    assert moves >= 2, f"{name}: only {moves} control move(s) redrew the figure"
    times["controls"] = time.monotonic() - t
    times["moves"] = moves
