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
