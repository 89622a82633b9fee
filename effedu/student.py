"""``python -m effedu.student notebooks student`` (``make student``): a copy of the course without the solutions.

Each exercise's solution cell (tagged ``solution``) keeps every line except those between its marker lines
``### BEGIN SOLUTION`` and ``### END SOLUTION`` (nbgrader's convention), which become a stub:

- a region inside an indented block (a function body, a loop) becomes ``raise NotImplementedError(...)`` at that
  indentation, so the signature and the lines around it stay;
- a region at the top level becomes one ``name = ...`` line per name the answer defines (assignments outside
  functions, names starting with ``_`` excepted) and, for a function or class it defines, its header with
  ``raise NotImplementedError`` as the body.

The check cell after it (untagged) then fails on the stub — with :func:`effedu.exercises.answered`'s message
for a ``...`` — until the learner's answer is right. The outputs of the solution and check cells are removed;
every other cell keeps its outputs, so the plots stay visible.

In the student copy the stub cell is tagged ``exercise`` and both it and its check cell are tagged
``raises-exception``: JupyterLab's "Run All" (which sends such a cell with ``stop_on_error=False``), nbclient and
nbval then go on past an exercise that is not done yet, so the rest of the chapter still runs. The browser test
(``tests/e2e``) runs the student copies this way and asserts that every check cell raised.
"""
from __future__ import annotations

import ast
import json
import pathlib
import sys

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB_COMMENT = "# YOUR CODE HERE"
SOLUTION_TAG = "solution"  # the course notebook's answer cell
EXERCISE_TAG = "exercise"  # the same cell in the student copy, holding the stub
RAISES_TAG = "raises-exception"  # JupyterLab / nbclient / nbval: the cell may raise, go on with the next one
# what a check cell may raise on its stub: effedu.exercises.answered's ExerciseNotDone for an answer still ``...``,
# NotImplementedError from a stubbed function, or the check's own AssertionError
EXPECTED_CHECK_ERRORS = frozenset({"ExerciseNotDone", "AssertionError", "NotImplementedError"})
_NOT_IMPLEMENTED = 'raise NotImplementedError("exercise: your code here")'


def _source(cell):
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def solution_regions(source):
    """``[(begin_line, end_line)]`` (0-based indices of the marker lines) of a solution cell's source.

    Raises ``ValueError`` for a cell without markers, unmatched or nested markers.
    """
    lines = source.split("\n")
    regions, start = [], None
    for i, line in enumerate(lines):
        s = line.strip()
        if s == BEGIN:
            if start is not None:
                raise ValueError(f"line {i + 1}: {BEGIN!r} inside another solution region (opened line {start + 1})")
            start = i
        elif s == END:
            if start is None:
                raise ValueError(f"line {i + 1}: {END!r} without a {BEGIN!r} before it")
            regions.append((start, i))
            start = None
    if start is not None:
        raise ValueError(f"line {start + 1}: {BEGIN!r} is never closed by {END!r}")
    if not regions:
        raise ValueError(f"a solution cell needs {BEGIN!r} ... {END!r} around its answer")
    return regions


def _bound_names(tree):
    """Names a top-level region binds outside functions, classes, loops and comprehensions, in order."""
    names = []

    def add(name):
        if not name.startswith("_") and name not in names:
            names.append(name)

    def targets(node):
        if isinstance(node, ast.Name):
            add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                targets(elt)
        elif isinstance(node, ast.Starred):
            targets(node.value)

    def visit(stmts):
        for st in stmts:
            if isinstance(st, ast.Assign):
                for t in st.targets:
                    targets(t)
            elif isinstance(st, (ast.AugAssign, ast.AnnAssign)):
                targets(st.target)
            elif isinstance(st, ast.If):  # loop bodies hold intermediates (the loop's own names): not stubbed
                visit(st.body)
                visit(st.orelse)
            elif isinstance(st, (ast.With, ast.AsyncWith)):
                visit(st.body)
            elif isinstance(st, ast.Try):
                visit(st.body)
                for h in st.handlers:
                    visit(h.body)
                visit(st.orelse)
                visit(st.finalbody)

    visit(tree.body)
    return names


def _definitions(tree, lines):
    """``[(header source lines, indent)]`` of the functions/classes a top-level region defines."""
    defs = []
    for st in tree.body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not st.name.startswith("_"):
            first = min([d.lineno for d in st.decorator_list] + [st.lineno]) - 1
            body_start = st.body[0].lineno - 1
            if isinstance(st.body[0], ast.Expr) and isinstance(getattr(st.body[0], "value", None), ast.Constant) \
                    and isinstance(st.body[0].value.value, str):  # keep the docstring
                body_start = st.body[0].end_lineno
            header = lines[first:body_start] if body_start > first else [lines[first]]
            defs.append(header)
    return defs


def stub_region(region_lines):
    """The stub for the lines between the markers (see the module docstring)."""
    code = [ln for ln in region_lines if ln.strip()]
    if not code:
        return []
    indent = min(len(ln) - len(ln.lstrip()) for ln in code)
    pad = " " * indent
    if indent > 0:
        return [f"{pad}{STUB_COMMENT}", f"{pad}{_NOT_IMPLEMENTED}"]
    text = "\n".join(region_lines)
    tree = ast.parse(text)
    out = [STUB_COMMENT]
    lines = text.split("\n")
    for header in _definitions(tree, lines):
        body_pad = " " * (len(header[0]) - len(header[0].lstrip()) + 4)
        out += header + [f"{body_pad}{_NOT_IMPLEMENTED}"]
    out += [f"{name} = ..." for name in _bound_names(tree)]
    if len(out) == 1:  # the answer binds nothing: it only prints or plots
        out.append(_NOT_IMPLEMENTED)
    return out


def stub_source(source):
    """The whole solution cell's source with each marked region replaced by its stub."""
    lines = source.split("\n")
    out, pos = [], 0
    for b, e in solution_regions(source):
        out += lines[pos:b]
        out += stub_region(lines[b + 1:e])
        pos = e + 1
    out += lines[pos:]
    return "\n".join(out)


def _as_nb_source(text):
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _tags(cell):
    return list(cell.get("metadata", {}).get("tags", []))


def exercise_cells(nb):
    """``[(answer cell index, check cell index)]`` of a course notebook or of its student copy.

    The answer cell is tagged ``solution`` (course) or ``exercise`` (student copy); its check cell is the code
    cell right after it. Raises ``ValueError`` when an answer cell is not followed by a code cell.
    """
    cells = nb["cells"]
    pairs = []
    for i, cell in enumerate(cells):
        tags = _tags(cell)
        if SOLUTION_TAG in tags or EXERCISE_TAG in tags:
            j = i + 1
            if j >= len(cells) or cells[j].get("cell_type") != "code":
                raise ValueError(f"cell {i} (tagged {SOLUTION_TAG!r}/{EXERCISE_TAG!r}): the next cell must be the "
                                 f"exercise's check, a code cell")
            pairs.append((i, j))
    return pairs


def strip_solutions(nb):
    """Return a copy of the notebook dict with each ``solution``-tagged cell's answer replaced by its stub.

    The stub cell is tagged ``exercise`` instead of ``solution``; it and its check cell (the next code cell) get
    the ``raises-exception`` tag and lose their outputs. The input is not modified.
    """
    out = dict(nb)
    checks = {j for i, j in exercise_cells(nb) if SOLUTION_TAG in _tags(nb["cells"][i])}
    cells = []
    for n, cell in enumerate(nb["cells"]):
        tags = _tags(cell)
        if SOLUTION_TAG in tags:
            meta = dict(cell.get("metadata", {}))
            meta["tags"] = [t for t in tags if t not in (SOLUTION_TAG, RAISES_TAG)] + [EXERCISE_TAG, RAISES_TAG]
            cells.append({
                "cell_type": "code", "metadata": meta, "execution_count": None, "outputs": [],
                "source": _as_nb_source(stub_source(_source(cell))),
                **({"id": cell["id"]} if "id" in cell else {}),
            })
        elif n in checks:
            meta = dict(cell.get("metadata", {}))
            meta["tags"] = tags + ([] if RAISES_TAG in tags else [RAISES_TAG])
            # its committed output ("✔ Exercise N passed") would not be true of the stub: removed too
            cells.append({**cell, "metadata": meta, "outputs": [], "execution_count": None})
        else:
            cells.append(cell)
    out["cells"] = cells
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m effedu.student SOURCE_DIR TARGET_DIR", file=sys.stderr)
        return 2
    src, dst = pathlib.Path(argv[0]), pathlib.Path(argv[1])
    if not src.is_dir():
        print(f"effedu.student: source folder {src} does not exist", file=sys.stderr)
        return 2
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in sorted(src.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        try:
            student = strip_solutions(nb)
        except (ValueError, SyntaxError) as exc:
            print(f"effedu.student: {path.name}: a solution cell is malformed: {exc}", file=sys.stderr)
            return 1
        (dst / path.name).write_text(json.dumps(student, indent=1, ensure_ascii=False) + "\n")
        n += 1
    print(f"wrote {n} student notebooks to {dst}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
