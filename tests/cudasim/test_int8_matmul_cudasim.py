"""The CUDA backend of ``int8_matmul`` in numba's simulator (own process: ``NUMBA_ENABLE_CUDASIM=1``).

Every simulated thread is a Python thread, so one tiny case covers the kernel's edges: M, N not multiples of the
16 × 16 tile (partial tiles on both axes), K not a multiple of 4 (a zero-padded last word) and spanning two shared
tiles of 16 words (K = 70 → 18 words), and the extreme values −128 and 127 in every byte position of a word.
The compile-to-PTX check (dp4a, ptxas) is in tests/test_int8_matmul.py, with the simulator off.
"""
import pytest
import torch

from effedu import kernels
from effedu.kernels.int8_matmul import int8_matmul

pytestmark = pytest.mark.cudasim


def test_simulator_is_on():
    assert kernels.simulator_enabled() and not kernels.cuda_usable()


def test_partial_tiles_padded_k_and_extremes_are_exact():
    g = torch.Generator().manual_seed(0)
    vals = torch.tensor([-128, 127, -1, 0, 1, -127, 64, -64], dtype=torch.int8)
    a = vals[torch.randint(0, 8, (17, 70), generator=g)]
    b = vals[torch.randint(0, 8, (70, 19), generator=g)]
    a[0], b[:, 0] = -128, -128  # c[0, 0] = 70 · 2¹⁴, every byte of every word −128
    c = int8_matmul(a, b, backend="cuda")
    assert c.dtype == torch.int32 and c.shape == (17, 19)
    assert torch.equal(c.to(torch.int64), a.to(torch.int64) @ b.to(torch.int64))
    assert torch.equal(c, torch._int_mm(a, b)) and c[0, 0] == 70 * 16384
    # zero sizes never launch
    assert int8_matmul(a[:, :0], b[:0], backend="cuda").eq(0).all()
