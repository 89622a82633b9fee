"""Guard for the CUDA-simulator tests: they must run with ``NUMBA_ENABLE_CUDASIM=1`` set before numba loads.

Run them as ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim`` (the Makefile does). Collected with the
simulator off, ``backend="cuda"`` would either fail (no GPU) or run on a real GPU with CPU tensors, so this
conftest stops the session with a clear message instead.
"""
import os

import pytest

_HOW = "run them in their own process: NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim"


def _simulator_problem():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return (
            f"tests/cudasim need numba's CUDA simulator, but NUMBA_ENABLE_CUDASIM="
            f"{os.environ.get('NUMBA_ENABLE_CUDASIM')!r} (expected '1'); {_HOW}"
        )
    from effedu.kernels import simulator_enabled

    if not simulator_enabled():
        return (
            "tests/cudasim: NUMBA_ENABLE_CUDASIM=1 is set but numba was imported before it was, so the simulator "
            f"is off in this process; {_HOW}"
        )
    return None


def pytest_configure(config):
    # runs for this conftest whether pytest loads it at startup (tests/cudasim given) or late during collection
    problem = _simulator_problem()
    if problem:
        raise pytest.UsageError(problem)

