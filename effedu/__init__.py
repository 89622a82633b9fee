"""effedu — an interactive course on making Transformers faster and lighter.

Built on Fournier, Marceau Caron & Aloise, *A Practical Survey on Faster and Lighter Transformers* (ACM CSUR
2023). Every technique is implemented from scratch here and explained in a notebook under ``notebooks/``:

    effedu.model        the Transformer every chapter reuses (pluggable attention)
    effedu.attention    attention variants, one module per family (survey §4)
    effedu.general      general methods, one module per technique (survey §3)
    effedu.kernels      the hot loops: torch / numba / numba.cuda behind one signature
    effedu.measure      the meters (activation bytes, timelines, peak memory, time, FLOPs)
    effedu.viz, effedu.widgets   plots and slider explorers
    effedu.data, effedu.train    synthetic tasks, the small corpus, one training loop
    python -m effedu.bench       the tables behind every speed and memory claim
"""
from __future__ import annotations

import functools
import importlib
import platform
import random
import subprocess
import sys

__version__ = "0.1.0"

_SUBMODULES = ("model", "attention", "general", "kernels", "measure", "viz", "widgets", "data", "train", "bench")


def __getattr__(name):  # lazy submodules: `import effedu` stays light, `effedu.viz` imports on first use
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'effedu' has no attribute {name!r}")


def seed_everything(seed=0):
    """Seed Python's, NumPy's and torch's random generators (and make torch's CPU kernels deterministic)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed_everything: seed must be a non-negative int, got {seed!r}")
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed


def device(prefer=None):
    """The device to compute on: ``prefer`` if given, else CUDA when a GPU is present, else the CPU."""
    import torch

    if prefer is not None:
        dev = torch.device(prefer)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {prefer!r} was asked for but torch sees no CUDA GPU")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=None)
def _cpu_model():
    """The CPU's marketing name: /proc/cpuinfo's "model name" (Linux), sysctl (macOS), else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_facts():
    """The CPU, the vector ISA torch's kernels were dispatched to, and what numba compiles for (LLVM's CPU name)."""
    import numba
    import torch

    get_capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    try:
        from llvmlite import binding as llvm

        llvm_cpu = numba.config.CPU_NAME or llvm.get_host_cpu_name()  # NUMBA_CPU_NAME overrides the host
    except (ImportError, AttributeError):  # an llvmlite without the call: unknown, rather than a failed setup cell
        llvm_cpu = None
    return {
        "cpu": _cpu_model(),
        "cpu isa (torch)": get_capability() if get_capability is not None else None,
        "cpu (numba/llvm)": llvm_cpu,
        "numba svml": getattr(numba.config, "USING_SVML", None),
    }


def cpu_description():
    """One line naming the CPU and its vector ISA, for benchmark headers: ``"AMD EPYC 7B13 (AVX2; llvm znver3)"``.

    The ISA is the one torch's CPU kernels use (``torch.backends.cpu.get_cpu_capability()``), the llvm name the CPU
    numba compiles for; ``SVML`` is added when numba vectorises ``exp``/``log`` with Intel's SVML.
    """
    facts = _cpu_facts()
    details = [facts["cpu isa (torch)"]]
    if facts["cpu (numba/llvm)"]:
        details.append(f"llvm {facts['cpu (numba/llvm)']}")
    if facts["numba svml"]:
        details.append("SVML")
    details = [d for d in details if d]
    return f"{facts['cpu']} ({'; '.join(details)})" if details else facts["cpu"]


def env_report(print_report=True):
    """Versions, device, CPU model and vector ISA, threads and live kernel backends; printed and returned as a dict."""
    import numba
    import numpy as np
    import torch

    from . import kernels

    backends = kernels.backends()  # first: starts numba's thread pool without changing torch's thread count
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "device": str(device()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **_cpu_facts(),
        "cpu threads (torch)": torch.get_num_threads(),
        "cpu threads (numba)": numba.get_num_threads(),
        "backends": backends,
    }
    if print_report:
        width = max(len(k) for k in report)
        for key, value in report.items():
            if key == "backends":
                for name, status in value.items():
                    print(f"{('backend ' + name).ljust(width)} : {status}")
            elif value is not None:
                print(f"{key.ljust(width)} : {value}")
    return report


__all__ = ["__version__", "env_report", "cpu_description", "seed_everything", "device"]
