"""Shared pytest configuration for the course's tests.

The tests under ``tests/cudasim`` run numba.cuda kernels in numba's CUDA simulator, which must be switched on
(``NUMBA_ENABLE_CUDASIM=1``) before numba is first imported, so they run in a pytest process of their own:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim

A plain ``pytest tests`` (simulator off) never imports them: they would otherwise run in the wrong mode.
"""
import os

collect_ignore = []
if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore.append("cudasim")
