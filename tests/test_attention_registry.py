"""The attention registry: an explicit table name → "module:object", imported lazily, no module scan."""
import importlib
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import effedu.attention as attention
from effedu.attention import BUILTIN, available, get, is_module_factory, register

ATTENTION_DIR = pathlib.Path(attention.__file__).parent


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_name_resolves_to_the_object_the_table_names(name):
    module, attr = BUILTIN[name].split(":")
    obj = get(name)
    assert obj is getattr(importlib.import_module(module), attr)
    assert callable(obj)
    assert name in available()
    # a module with parameters is a class the model builds per layer; anything else is a plain function
    assert is_module_factory(obj) or inspect.isfunction(obj)


def test_unknown_name_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown attention 'no-such-attention'; registered: .*dense.*linformer"):
        get("no-such-attention")
    with pytest.raises(TypeError, match="attention name must be a str"):
        get(3)


def test_every_register_decorator_in_the_package_is_in_the_table():
    """``@register("x")`` in a technique module marks what the table lists: the two must agree."""
    marked = {}
    for path in sorted(ATTENTION_DIR.glob("*.py")):
        for name in re.findall(r'^@register\("([^"]+)"\)', path.read_text(), re.M):
            marked[name] = path.stem
    assert set(marked) <= set(BUILTIN)
    for name, stem in marked.items():
        assert BUILTIN[name].startswith(f"effedu.attention.{stem}:"), (name, stem)


def test_no_module_scan_and_lazy_imports():
    src = (ATTENTION_DIR / "__init__.py").read_text()
    assert "pkgutil" not in src and "iter_modules" not in src
    code = (
        "import sys, effedu.attention as A\n"
        "assert not any(m.startswith('effedu.attention.') for m in sys.modules), sorted(sys.modules)\n"
        "A.available()\n"
        "assert not any(m.startswith('effedu.attention.') for m in sys.modules)\n"
        "A.get('dense')\n"
        "loaded = {m for m in sys.modules if m.startswith('effedu.attention.')}\n"
        "assert loaded == {'effedu.attention.dense'}, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_no_shim_modules():
    """Every module of the attention package defines something of its own (no import-only registration shims)."""
    for path in sorted(ATTENTION_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        assert re.search(r"^(def|class) ", path.read_text(), re.M), f"{path.name} defines nothing"


def test_register_at_run_time_and_refuse_taken_names():
    def doubled(q, k, v, *, causal=False, mask=None):
        return 2 * get("dense")(q, k, v, causal=causal, mask=mask)

    assert register("test-registry-double", doubled) is doubled
    assert get("test-registry-double") is doubled and "test-registry-double" in available()
    assert register("test-registry-double", doubled) is doubled  # the same function again: fine (a re-run cell)
    with pytest.raises(ValueError, match="already taken"):
        register("test-registry-double", lambda q, k, v, **kw: q)
    with pytest.raises(ValueError, match="already taken by the built-in effedu.attention.dense:softmax_attention"):
        register("dense", doubled)
    assert register("dense", get("dense")) is get("dense")  # the built-in itself: a no-op check
    with pytest.raises(TypeError, match="non-empty str"):
        register("", doubled)
    with pytest.raises(TypeError, match="expected a function"):
        register("test-registry-not-callable", 3)


def test_moved_names_still_importable_from_their_old_places():
    from effedu.attention import lowrank, shared_qk
    from effedu.attention.dense import allowed_mask, masked_softmax
    from effedu.general import sharing
    from effedu.kernels import masking

    assert sharing.shared_qk_attention is shared_qk.shared_qk_attention is get("shared_qk")
    assert sharing.shared_qk_keys is shared_qk.shared_qk_keys and sharing.shared_qk_mask is shared_qk.shared_qk_mask
    assert sharing.SharedProjection is lowrank.SharedProjection
    assert sharing.PROJECTION_MODES is lowrank.PROJECTION_MODES
    assert masked_softmax is masking.masked_softmax and allowed_mask is masking.allowed_mask


def test_attention_imports_no_layer_above_it():
    pattern = re.compile(r"^\s*(from|import)\s+(effedu\.(model|general)|\.\.(model|general))\b", re.M)
    for path in sorted(ATTENTION_DIR.glob("*.py")):
        assert not pattern.search(path.read_text()), f"{path.name} imports model/general"
