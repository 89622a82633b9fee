"""The package's shape, checked: layers import downwards only, no module borrows another's private names,
and nothing changes the process (environment, file descriptors, thread counts) beyond the call that needs it.

    kernels  ←  attention  ←  model  ←  general          (an arrow points from the importer to what it may import)

``_checks``, ``measure``, ``viz``, ``data``, ``train``, ``widgets``, ``exercises``, ``bench`` … sit beside the
layers. ``ruff`` (pyflakes rules + E402, configured in pyproject.toml) runs on ``effedu/`` and ``tests/`` in
``make test`` as its first step.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "effedu"

# a layer may import the layers listed, never one above it
LAYERS = ["kernels", "attention", "model", "general"]
FORBIDDEN = {layer: set(LAYERS[i + 1:]) for i, layer in enumerate(LAYERS)}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), path, is_pkg


def _imports(name, path, is_pkg):
    """(line, target module, imported names) for every effedu import in the file, function-level ones included."""
    package = name if is_pkg else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "effedu" or target.startswith("effedu."):
                yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("effedu"):
                    yield node.lineno, alias.name, []


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _is_module(dotted):
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


def test_the_import_walker_sees_relative_and_function_level_imports(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text("from ..model import Transformer\n\ndef f():\n    from ...effedu import viz\n")
    found = list(_imports("effedu.attention.probe", src, False))
    assert (1, "effedu.model", ["Transformer"]) in found
    assert any(t == "effedu" and names == ["viz"] for _, t, names in found)


def test_layers_import_downwards_only():
    upward = []
    for name, path, is_pkg in _modules():
        layer = _layer(name)
        if layer is None:
            continue
        for line, target, names in _imports(name, path, is_pkg):
            targets = [target] if target != "effedu" else [f"effedu.{n}" for n in names]
            for t in targets:
                if _layer(t) in FORBIDDEN[layer]:
                    upward.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {t} ({_layer(t)})")
    assert not upward, "imports that run upwards (kernels ← attention ← model ← general):\n" + "\n".join(upward)


def test_no_module_imports_another_modules_private_names():
    borrowed = []
    for name, path, is_pkg in _modules():
        for line, target, names in _imports(name, path, is_pkg):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and not _is_module(f"{target}.{n}"):
                    borrowed.append(f"{path.relative_to(ROOT)}:{line} imports {n} from {target}")
    assert not borrowed, ("private names used across modules (make them public, or move them to an underscore "
                          "module such as effedu/_checks.py):\n" + "\n".join(borrowed))


def test_the_private_name_rule_would_catch_a_violation(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text("from .tiled_attention import _hidden\nfrom .. import _checks\n")
    names = [(t, n) for _, t, ns in _imports("effedu.kernels.probe", src, False) for n in ns]
    private = [(t, n) for t, n in names if n.startswith("_") and not _is_module(f"{t}.{n}")]
    assert private == [("effedu.kernels.tiled_attention", "_hidden")]


def test_no_module_changes_the_environment_at_import():
    import subprocess
    import sys

    code = ("import os, json; before = dict(os.environ); import effedu, effedu.kernels, effedu.attention, "
            "effedu.model, effedu.general.checkpoint, effedu.general.microbatch, effedu.pretrained, effedu.measure; "
            "after = dict(os.environ); print(json.dumps(sorted(k for k in set(before) | set(after) "
            "if before.get(k) != after.get(k))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_measuring_leaves_threads_environment_and_stderr_as_they_were():
    import torch

    from effedu import measure

    threads, env, fd2 = torch.get_num_threads(), dict(os.environ), os.fstat(2)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    measure.peak_memory(lambda: lin(x).sum().backward())
    measure.time_it(lambda: lin(x), warmup=0, repeat=1)
    assert torch.get_num_threads() == threads
    changed = {k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)}
    assert changed <= {"TORCHINDUCTOR_CACHE_DIR"}, changed  # torch's profiler sets that one itself, once
    assert os.fstat(2).st_ino == fd2.st_ino and os.fstat(2).st_dev == fd2.st_dev


def test_numba_thread_pool_leaves_torch_threads_as_set():
    """numba's OpenMP pool sets OpenMP's thread count when it starts (libgomp is shared with torch): under
    OMP_NUM_THREADS=1 the report and a first parallel kernel must leave torch on one thread."""
    import subprocess
    import sys

    code = ("import torch, effedu; from effedu import kernels; effedu.env_report(print_report=False); "
            "a = kernels.dense_to_csr(torch.randn(16, 16)); kernels.csr_matmul(a, torch.randn(16, 4), backend='numba'); "
            "print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_exists(layer):
    assert (PKG / layer).exists() or (PKG / f"{layer}.py").exists()
