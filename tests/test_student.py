"""`make student`: each solution's answer becomes a stub; everything else is kept."""
import ast
import json

import pytest

from effedu.student import exercise_cells, main, solution_regions, strip_solutions, stub_source

SOLUTION = """# Solution 1: k* from the measured a and c
torch.manual_seed(0)
### BEGIN SOLUTION
a, c = 10, 2
k_star = (64 * a / c) ** 0.5
measured = {}
for k in range(1, 5):
    tmp = k * 2
    measured[k] = tmp
@decorator
def helper(x, y=2):
    '''Docstring stays.'''
    return x + y
_private = 3
### END SOLUTION
print(k_star)
def predict(n):
    ### BEGIN SOLUTION
    return n ** 2
    ### END SOLUTION
"""


def test_stub_keeps_the_lines_around_and_stubs_the_answer():
    out = stub_source(SOLUTION)
    ast.parse(out)  # still valid Python
    lines = out.split("\n")
    assert lines[:2] == ["# Solution 1: k* from the measured a and c", "torch.manual_seed(0)"]
    assert "print(k_star)" in lines and "def predict(n):" in lines
    for name in ("a", "c", "k_star", "measured"):
        assert f"{name} = ..." in lines
    assert "tmp = ..." not in lines and "k = ..." not in lines  # loop intermediates are not stubbed
    assert "_private = ..." not in lines
    assert "@decorator" in lines and "def helper(x, y=2):" in lines and "    '''Docstring stays.'''" in lines
    assert "** 0.5" not in out and "n ** 2" not in out and "x + y" not in out
    assert out.count("raise NotImplementedError") == 2  # helper's body and predict's body
    assert "    raise NotImplementedError" in out.split("def predict(n):")[1]


def test_stubbed_function_raises_and_names_are_ellipsis():
    ns = {"torch": type("T", (), {"manual_seed": staticmethod(lambda s: None)}), "decorator": lambda f: f,
          "print": lambda *a: None}
    exec(stub_source(SOLUTION), ns)
    assert ns["k_star"] is Ellipsis and ns["measured"] is Ellipsis
    with pytest.raises(NotImplementedError):
        ns["predict"](3)
    with pytest.raises(NotImplementedError):
        ns["helper"](1)


def test_region_that_binds_nothing_becomes_raise():
    out = stub_source("### BEGIN SOLUTION\nprint(42)\n### END SOLUTION")
    assert "print(42)" not in out and "raise NotImplementedError" in out


@pytest.mark.parametrize("source, message", [
    ("x = 1", "needs"),
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
])
def test_malformed_markers_are_reported(source, message):
    with pytest.raises(ValueError, match=message):
        solution_regions(source)


def test_strip_solutions_and_cli(tmp_path):
    nb = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["# Exercise"]},
        {"cell_type": "code", "metadata": {"tags": ["solution"]}, "outputs": [{"x": 1}],
         "source": ["### BEGIN SOLUTION\n", "answer = 42\n", "### END SOLUTION\n"], "execution_count": 3},
        {"cell_type": "code", "metadata": {}, "outputs": [{"y": 2}], "source": ["check(answer)"], "execution_count": 4},
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    out = strip_solutions(nb)
    assert "42" not in json.dumps(out["cells"][1])
    assert "".join(out["cells"][1]["source"]).splitlines() == ["# YOUR CODE HERE", "answer = ...", ""][:2]
    assert out["cells"][1]["outputs"] == [] and out["cells"][1]["metadata"]["tags"] == ["exercise", "raises-exception"]
    # the check cell keeps its source, tagged raises-exception (Run All / nbclient go on past an unanswered
    # exercise); its committed "passed" output is not true of the stub: removed
    assert out["cells"][2]["metadata"]["tags"] == ["raises-exception"]
    assert out["cells"][2]["source"] == nb["cells"][2]["source"]
    assert out["cells"][2]["outputs"] == [] and out["cells"][2]["execution_count"] is None
    assert out["cells"][0] == nb["cells"][0]
    assert nb["cells"][2]["metadata"] == {} and nb["cells"][1]["metadata"]["tags"] == ["solution"]  # input intact
    assert nb["cells"][2]["outputs"] == [{"y": 2}]
    assert exercise_cells(nb) == exercise_cells(out) == [(1, 2)]
    assert strip_solutions(out) == out  # a student copy has no solutions left: stripping again changes nothing
    src = tmp_path / "src"
    src.mkdir()
    (src / "00_x.ipynb").write_text(json.dumps(nb))
    assert main([str(src), str(tmp_path / "dst")]) == 0
    assert "answer = 42" not in (tmp_path / "dst" / "00_x.ipynb").read_text()
    assert main([str(tmp_path / "missing"), str(tmp_path / "d2")]) == 2
    nb["cells"][1]["source"] = ["answer = 42"]  # no markers: refused with the reason
    (src / "00_x.ipynb").write_text(json.dumps(nb))
    assert main([str(src), str(tmp_path / "d3")]) == 1


def test_exercise_cells_pairs_answers_with_their_checks():
    def cell(kind, *tags):
        return {"cell_type": kind, "metadata": {"tags": list(tags)} if tags else {}, "source": ""}

    nb = {"cells": [cell("markdown"), cell("code", "solution"), cell("code"), cell("markdown"),
                    cell("code", "solution", "nbval-ignore-output"), cell("code", "raises-exception")]}
    assert exercise_cells(nb) == [(1, 2), (4, 5)]
    out = strip_solutions({**nb, "cells": [dict(c, source="### BEGIN SOLUTION\nx = 1\n### END SOLUTION")
                                           if "solution" in c["metadata"].get("tags", []) else c
                                           for c in nb["cells"]]})
    assert out["cells"][4]["metadata"]["tags"] == ["nbval-ignore-output", "exercise", "raises-exception"]
    assert out["cells"][5]["metadata"]["tags"] == ["raises-exception"]  # not added twice
    assert exercise_cells({"cells": [cell("markdown")]}) == []
    for bad in ([cell("code", "solution")], [cell("code", "exercise"), cell("markdown")]):
        with pytest.raises(ValueError, match="must be the exercise's check, a code cell"):
            exercise_cells({"cells": bad})


def test_exercise_helpers():
    from effedu import exercises

    with pytest.raises(exercises.ExerciseNotDone, match="`k_star` is not answered"):
        exercises.answered(k_star=..., other=3)
    with pytest.raises(AssertionError, match="expected 4"):
        exercises.check(False, "expected 4")
    with pytest.raises(TypeError, match="hint"):
        exercises.check(True, "")
    assert exercises.check_close(10.2, 10, rtol=0.05)
    with pytest.raises(AssertionError, match=r"x = 12, expected 10 \(within 5%\): hint"):
        exercises.check_close(12, 10, rtol=0.05, name="x", hint="hint")
    with pytest.raises(AssertionError, match="must be a number"):
        exercises.check_close("abc", 10, name="x")
