"""``python -m effedu.student notebooks student``: a copy of the course without the exercise solutions.

Cells tagged ``solution`` are replaced by an empty code cell that says "your solution here"; outputs of every
cell are kept (the plots stay visible) except those of the removed cells.
"""
from __future__ import annotations

import json
import pathlib
import sys


def strip_solutions(nb):
    """Return a copy of the notebook dict with the ``solution``-tagged cells emptied."""
    out = dict(nb)
    cells = []
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if "solution" in tags:
            cells.append({
                "cell_type": "code", "metadata": {"tags": ["exercise"]}, "execution_count": None, "outputs": [],
                "source": ["# your solution here\n"],
            })
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
        (dst / path.name).write_text(json.dumps(strip_solutions(nb), indent=1, ensure_ascii=False) + "\n")
        n += 1
    print(f"wrote {n} student notebooks to {dst}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
