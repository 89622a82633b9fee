"""Every exercise's check can fail: in the student copy (``make student``) each check cell fails on its stub.

nbval proves the other half — in the course notebooks every check cell passes (it prints "✔ Exercise N passed",
compared with the committed output). Here each notebook's student copy is executed top to bottom in a fresh
kernel, as a learner who has not answered anything would run it, and:

- every check cell raises (``ExerciseNotDone`` for an answer still ``...``, ``NotImplementedError`` from a stubbed
  function, or the check's own ``AssertionError``) — a check that passes on the stub checks nothing;
- no cell other than the exercises' raises: the stubs break only what the learner has to write.

Run with ``make exercises``. ``make test`` proves the same in the browser instead: tests/e2e runs every
chapter's student copy in JupyterLab and makes the same two assertions (the stub and check cells are tagged
``raises-exception``, so Run All goes on past them); it runs this file only where the browser tests cannot run
(no Chromium or playwright). It executes every notebook once more (natively), so it sits with the notebook tests,
not the unit tests.
"""
from __future__ import annotations

import json
import pathlib

import pytest

from effedu.student import EXPECTED_CHECK_ERRORS as EXPECTED_FAILURES
from effedu.student import exercise_cells, strip_solutions

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_check_fails_on_the_student_stub(path, tmp_path):
    import nbclient
    import nbformat

    course = json.loads(path.read_text())
    pairs = exercise_cells(course)
    assert pairs, f"{path.name}: no exercises"
    student = nbformat.reads(json.dumps(strip_solutions(course)), as_version=4)  # sources joined, as on disk
    client = nbclient.NotebookClient(
        student, timeout=600, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()

    def errors(idx):
        return [o for o in student.cells[idx].get("outputs", []) if o.get("output_type") == "error"]

    exercise_idx = {i for pair in pairs for i in pair}
    unexpected = {
        i: f"{e[0]['ename']}: {e[0]['evalue'][:200]}"
        for i in range(len(student.cells))
        if student.cells[i].cell_type == "code" and i not in exercise_idx and (e := errors(i))
    }
    assert not unexpected, f"{path.name}: cells outside the exercises raise in the student copy: {unexpected}"
    for n, (sol, chk) in enumerate(pairs, 1):
        errs = errors(chk)
        assert errs, (f"{path.name}: exercise {n}'s check (cell {chk}) passes on the stub of cell {sol}: it checks "
                      f"nothing a learner could get wrong")
        assert errs[0]["ename"] in EXPECTED_FAILURES, (
            f"{path.name}: exercise {n}'s check (cell {chk}) fails on the stub with {errs[0]['ename']}: "
            f"{errs[0]['evalue'][:200]} — expected a message for the learner ({', '.join(sorted(EXPECTED_FAILURES))})"
        )
