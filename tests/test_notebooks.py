"""Every chapter notebook is committed executed and follows the template (nbval alone passes an unexecuted one)."""
import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_executed_and_templated(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    executed = [c for c in code if c.get("outputs")]
    assert len(executed) >= 0.8 * len(code), f"{path.name}: only {len(executed)}/{len(code)} code cells have outputs"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    sources = ["".join(c["source"]) for c in code]
    assert "effedu.env_report()" in sources[0] and "seed_everything(0)" in sources[0], "setup cell first"
    assert any("widgets.explorer(" in s for s in sources), "an explorer"
    assert any("solution" in c.get("metadata", {}).get("tags", []) for c in code), "exercise solutions"
    assert nb["cells"][0]["cell_type"] == "markdown" and nb["cells"][0]["source"][0].startswith("# ")


# ---------------------------------------------------------------------------------------------------------------
# Exercises that check themselves (CONVENTIONS: notebooks)
# ---------------------------------------------------------------------------------------------------------------

def _src(cell):
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_marked_solution_and_check_cell(path):
    import ast
    import re

    from effedu.student import solution_regions, stub_source

    cells = json.loads(path.read_text())["cells"]
    solutions = [i for i, c in enumerate(cells) if "solution" in c.get("metadata", {}).get("tags", [])]
    assert 2 <= len(solutions) <= 4, f"{path.name}: {len(solutions)} exercises; the course has 2–4 per chapter"
    numbers = []
    for i in solutions:
        assert cells[i]["cell_type"] == "code"
        solution_regions(_src(cells[i]))          # markers present and well formed
        ast.parse(stub_source(_src(cells[i])))    # the student stub is valid Python
        assert i + 1 < len(cells), f"{path.name}: the solution cell {i} is the last cell: no check cell"
        check = cells[i + 1]
        assert check["cell_type"] == "code" and "solution" not in check.get("metadata", {}).get("tags", []), (
            f"{path.name}: cell {i + 1} after solution cell {i} must be an untagged check cell")
        body = _src(check)
        found = re.findall(r"exercises\.passed\((\d+)", body)
        assert found, f"{path.name}: check cell {i + 1} does not end with exercises.passed(N)"
        assert re.search(r"exercises\.(check|check_close|answered)\(", body), (
            f"{path.name}: check cell {i + 1} checks nothing (exercises.check / check_close / answered)")
        numbers.append(int(found[-1]))
        assert any(o.get("output_type") == "stream" and "✔ Exercise" in "".join(o.get("text", ""))
                   for o in check.get("outputs", [])), f"{path.name}: check cell {i + 1} did not pass when executed"
    assert numbers == list(range(1, len(numbers) + 1)), f"{path.name}: exercises numbered {numbers}"


def _syllabus_chapters():
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    return {int(m) for m in re.findall(r"^\| (\d\d) \| ", readme, flags=re.M)}


def test_readme_syllabus_lists_the_chapters():
    chapters = _syllabus_chapters()
    assert chapters == set(range(22)), sorted(chapters)
    for path in NOTEBOOKS:
        assert int(path.name[:2]) in chapters


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_references_name_chapters_of_the_syllabus(path):
    import re

    chapters = _syllabus_chapters()
    text = "\n".join(_src(c) for c in json.loads(path.read_text())["cells"])
    bad = []
    for m in re.finditer(r"\b[Cc]hapters?\s+((?:\d{1,3}(?:\s*(?:,|and|or|to|–|-|/)\s*)?)+)", text):
        for num in re.findall(r"\d{1,3}", m.group(1)):
            if int(num) not in chapters:
                bad.append(f"{m.group(0).strip()!r}")
    assert not bad, f"{path.name}: references to chapters not in the README's syllabus: {bad}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_progress_bar_in_committed_outputs(path):
    """A tqdm bar is committed as a frozen '0% 0/500' widget: pass progress=False in notebooks."""
    import re

    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
            assert not re.search(r"\d+%\|.*\| *\d+/\d+", text), f"{path.name}: cell {i} shows a progress bar: {text!r}"
            if "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                assert "explorer(" in _src(cell), f"{path.name}: cell {i} has a widget output that is no explorer"
