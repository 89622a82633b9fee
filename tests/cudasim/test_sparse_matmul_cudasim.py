"""The CUDA backend of ``csr_matmul`` / ``csr_matmul_parts`` (one block per row, threads over columns; the SDDMM
kernel for the values' gradient) in numba's CUDA simulator.

Own process, simulator on: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim``. Every simulated thread is a
Python thread, so the case is tiny and runs with 4 threads per block (the kernels stride by the thread count, so
N > threads and rows with more non-zeros than threads are covered). Oracle: the dense product and its gradients.
"""
import pytest
import torch

from effedu import kernels
from effedu.kernels import sparse_matmul as sm

pytestmark = pytest.mark.cudasim


@pytest.fixture(autouse=True)
def few_threads(monkeypatch):
    monkeypatch.setattr(sm, "CUDA_THREADS", 4)


def test_simulator_is_on():
    assert kernels.simulator_enabled() and not kernels.cuda_usable()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(atol=1e-5, rtol=1e-5)),
                                        (torch.float64, dict(atol=1e-12, rtol=1e-12))], ids=["f32", "f64"])
def test_forward_and_gradients_match_the_dense_product(dtype, tol):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    w[torch.rand(5, 7, generator=g) < 0.4] = 0
    w[2] = 0  # an empty row
    w[0] = torch.arange(1, 8, dtype=torch.float64)  # a full row: more non-zeros than threads
    w = w.to(dtype)
    a = sm.dense_to_csr(w, index_dtype=torch.int32)
    values = a.values().clone().requires_grad_(True)
    b = torch.randn(7, 6, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)  # N=6 > 4 threads
    y = sm.csr_matmul_parts(a.crow_indices(), a.col_indices(), values, b, 5, backend="cuda")
    wd = w.clone().requires_grad_(True)
    bd = b.detach().clone().requires_grad_(True)
    ref = wd @ bd
    torch.testing.assert_close(y, ref, **tol)
    gy = torch.randn(5, 6, generator=g, dtype=torch.float64).to(dtype)
    dv, db = torch.autograd.grad(y, (values, b), gy)
    dw_ref, db_ref = torch.autograd.grad(ref, (wd, bd), gy)
    torch.testing.assert_close(db, db_ref, **tol)
    torch.testing.assert_close(dv, dw_ref[w != 0], **tol)
    # csr_matmul (a fixed): the b-gradient alone
    (db_only,) = torch.autograd.grad(sm.csr_matmul(sm.dense_to_csr(w), b, backend="cuda"), (b,), gy)
    torch.testing.assert_close(db_only, db_ref, **tol)


def test_auto_never_picks_the_simulator(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("backend='auto' ran the CUDA kernel in the simulator")

    monkeypatch.setitem(sm.CSR_MATMUL_FORWARD, "cuda", boom)
    w = torch.eye(3)
    assert torch.equal(sm.csr_matmul(sm.dense_to_csr(w), torch.ones(3, 2)), torch.ones(3, 2))
