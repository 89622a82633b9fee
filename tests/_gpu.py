"""Shared markers of the GPU test files (tests/test_gpu*.py): real-GPU tests, and compile-only checks."""
import pytest

from effedu import kernels

HAVE_GPU = kernels.cuda_usable()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(
    not HAVE_GPU, reason=f"needs a real CUDA GPU that numba.cuda can drive: backends()['cuda'] = {kernels.backends()['cuda']!r}"
)
needs_simulator_off = pytest.mark.skipif(
    kernels.simulator_enabled(), reason="NUMBA_ENABLE_CUDASIM=1 in this process: run tests/cudasim for the simulator"
)


def nvvm_available():
    """libNVVM (the CUDA toolkit) is here, so kernels can be compiled to PTX without a GPU."""
    if kernels.simulator_enabled():
        return False
    try:
        from numba.cuda.cudadrv import nvvm

        return nvvm.is_available()
    except Exception:
        return False


needs_nvvm = pytest.mark.skipif(not nvvm_available(), reason="needs libNVVM (CUDA toolkit) to compile the kernels to PTX")
