"""Shared pytest configuration for the course's tests.

The tests under ``tests/cudasim`` run numba.cuda kernels in numba's CUDA simulator, which must be switched on
(``NUMBA_ENABLE_CUDASIM=1``) before numba is first imported, so they run in a pytest process of their own:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim

A plain ``pytest tests`` (simulator off) never imports them: they would otherwise run in the wrong mode.
"""
import os
import time

import pytest

collect_ignore = []
if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore.append("cudasim")


@pytest.fixture(scope="module")
def one_timed_call():
    """``measure.time_it`` → a single timed call, for the benchmark tests: the tables' shape and ratios in seconds
    instead of minutes (times are never asserted)."""
    from effedu import measure

    def once(fn, *args, warmup=0, repeat=1, device=None, **kwargs):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        return max(time.perf_counter() - t0, 1e-9)

    mp = pytest.MonkeyPatch()
    mp.setattr(measure, "time_it", once)
    yield
    mp.undo()
