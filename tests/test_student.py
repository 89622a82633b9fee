"""`make student` removes the solution cells and keeps everything else."""
import json

from effedu.student import main, strip_solutions


def test_strip_solutions_and_cli(tmp_path):
    nb = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["# Exercise"]},
        {"cell_type": "code", "metadata": {"tags": ["solution"]}, "outputs": [{"x": 1}], "source": ["answer = 42"],
         "execution_count": 3},
        {"cell_type": "code", "metadata": {}, "outputs": [{"y": 2}], "source": ["plot()"], "execution_count": 4},
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    out = strip_solutions(nb)
    assert "answer" not in json.dumps(out)
    assert out["cells"][1]["source"] == ["# your solution here\n"] and out["cells"][1]["outputs"] == []
    assert out["cells"][2] == nb["cells"][2] and out["cells"][0] == nb["cells"][0]
    src = tmp_path / "src"
    src.mkdir()
    (src / "00_x.ipynb").write_text(json.dumps(nb))
    assert main([str(src), str(tmp_path / "dst")]) == 0
    assert "answer = 42" not in (tmp_path / "dst" / "00_x.ipynb").read_text()
    assert main([str(tmp_path / "missing"), str(tmp_path / "d2")]) == 2
