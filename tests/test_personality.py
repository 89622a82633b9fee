"""The CPU personality of the notebook tests (tests/personality.py) changes code paths, never results that must be
exact: an int8 product under it is still the exact integer product (oneDNN capped below VNNI on a VNNI CPU broke
``torch._int_mm``, a combination no real CPU has)."""
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHECK = """
import torch
g = torch.Generator().manual_seed(0)
a = torch.randint(-127, 128, (128, 128), dtype=torch.int8, generator=g)
b = torch.randint(-127, 128, (128, 128), dtype=torch.int8, generator=g)
print(int((torch._int_mm(a, b).long() - a.long() @ b.long()).abs().max()))
"""


def _personality_env():
    out = subprocess.run([sys.executable, str(HERE / "personality.py")], capture_output=True, text=True, check=True)
    pairs = [kv.split("=", 1) for kv in out.stdout.split()]
    assert pairs and all(len(p) == 2 for p in pairs), out.stdout
    return dict(pairs)


def test_personality_changes_threads_and_numba_target():
    env = _personality_env()
    assert env["OMP_NUM_THREADS"] == "1" and env["NUMBA_CPU_NAME"] == "generic"


def test_int8_products_stay_exact_under_the_personality():
    env = {**os.environ, **_personality_env()}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0", f"torch._int_mm under {_personality_env()} is off by {out.stdout.strip()}"
