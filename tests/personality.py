"""Print the environment of a CPU "personality" other than this machine's native one, for the notebook tests.

The committed notebooks are executed natively (full vector ISA, all cores). ``make test`` runs nbval under a
different personality, so that a printed number whose digits depend on the CPU's kernels fails here, on the
course's own machine, before it fails on a learner's laptop:

- ``ATEN_CPU_CAPABILITY``: torch's vectorised ops (softmax, GELU, reductions) one ISA below the native one
  (AVX512 → avx2, AVX2 → default, i.e. no explicit vectorisation);
- ``MKL_CBWR`` and ``ONEDNN_MAX_CPU_ISA``: the matmul / Linear kernels of MKL and oneDNN (bf16/fp16 too) on an
  older code path;
- ``NUMBA_CPU_NAME=generic``: numba compiles for a generic x86-64 / aarch64, not for this CPU;
- one thread (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``NUMBA_NUM_THREADS`` = 1) instead of all cores: every
  reduction that torch splits across threads sums in another order.

Usage (the Makefile does this): ``env $(python tests/personality.py) python -m pytest --nbval notebooks``.
``--describe`` prints one line saying which personality that is, for the test log.
"""
from __future__ import annotations

import os
import platform
import sys


def native_capability() -> str:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # torch missing or too old: assume the common x86 laptop
        return "AVX2"


def has_vnni() -> bool:
    """True when the CPU has AVX-512 VNNI (Linux: /proc/cpuinfo; elsewhere: assume not)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and " avx512_vnni" in line for line in f)
    except OSError:
        return False


def personality() -> dict[str, str]:
    cap = native_capability().upper()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "NUMBA_CPU_NAME": "generic"}
    if platform.machine().lower() in ("x86_64", "amd64"):
        if cap.startswith("AVX512"):
            # oneDNN capped below VNNI on a VNNI CPU is a combination no real CPU has: torch checks VNNI itself and
            # sends torch._int_mm to oneDNN's int8 GEMM, which below VNNI takes a saturating u8·s8 path — wrong
            # int8 products (measured: errors of 68,157 on a 128×128 product). On such a CPU the cap stays at
            # AVX512_CORE_VNNI (still below the native bf16/AMX kernels).
            env.update(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2",
                       ONEDNN_MAX_CPU_ISA="AVX512_CORE_VNNI" if has_vnni() else "AVX2")
        else:  # AVX2 (or below): no explicit vectorisation in ATen, SSE4.1-era MKL/oneDNN paths
            env.update(ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE", ONEDNN_MAX_CPU_ISA="SSE41")
    else:  # arm64 (Apple silicon, Graviton): ATen's "default" path is the only other one there
        env.update(ATEN_CPU_CAPABILITY="default")
    return env


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = personality()
    if "--describe" in argv:
        print(f"notebook tests under another CPU personality than the native {native_capability()} "
              f"({os.cpu_count()} cores): " + " ".join(f"{k}={v}" for k, v in env.items()))
    else:
        print(" ".join(f"{k}={v}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
