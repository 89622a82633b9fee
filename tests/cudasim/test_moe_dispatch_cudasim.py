"""The CUDA backend of ``moe_dispatch`` / ``moe_combine`` (one block per buffer row or per token, threads over d; a
shared-memory tree reduction per choice for the gates' gradient) in numba's CUDA simulator.

Own process, simulator on: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim``. Every simulated thread is a
Python thread, so the case is tiny and runs with 4 threads per block (d = 6 > 4 threads: the strided loops and the
reduction over several partial sums are covered). Oracle: the torch reference, values and gradients.
"""
import importlib

import pytest
import torch

from effedu import kernels

md = importlib.import_module("effedu.kernels.moe_dispatch")  # the module (kernels may re-export the function)
pytestmark = pytest.mark.cudasim


@pytest.fixture(autouse=True)
def few_threads(monkeypatch):
    monkeypatch.setattr(md, "CUDA_THREADS", 4)


def test_simulator_is_on():
    assert kernels.simulator_enabled() and not kernels.cuda_usable()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(atol=1e-5, rtol=1e-5)),
                                        (torch.float64, dict(atol=1e-12, rtol=1e-12))], ids=["f32", "f64"])
def test_forward_and_gradients_match_the_torch_reference(dtype, tol):
    g = torch.Generator().manual_seed(0)
    # 5 tokens, 3 experts, k = 2, capacity 2: token 4 is dropped entirely, expert 2 gets one token
    expert_index = torch.tensor([[0, 1], [1, 0], [0, 2], [1, 0], [1, 0]])
    slot = torch.tensor([[0, -1], [0, -1], [1, 0], [1, -1], [-1, -1]])  # GShard order: first choices first
    x0 = torch.randn(5, 6, generator=g, dtype=torch.float64).to(dtype)
    eo0 = torch.randn(3, 2, 6, generator=g, dtype=torch.float64).to(dtype)
    g0 = torch.rand(5, 2, generator=g, dtype=torch.float64).to(dtype)
    dbuf = torch.randn(3, 2, 6, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(5, 6, generator=g, dtype=torch.float64).to(dtype)
    out = {}
    for backend in ("torch", "cuda"):
        x, eo, gate = (t.clone().requires_grad_(True) for t in (x0, eo0, g0))
        buf = md.moe_dispatch(x, expert_index, slot, 3, 2, backend=backend)
        y = md.moe_combine(eo, expert_index, slot, gate, backend=backend)
        out[backend] = [buf, y, *torch.autograd.grad((buf, y), (x, eo, gate), (dbuf, dy))]
    for a, b in zip(out["cuda"], out["torch"]):
        torch.testing.assert_close(a, b, **tol)
    buf, y, dx, deo, dgate = out["cuda"]
    assert (y[4] == 0).all() and (dgate[slot < 0] == 0).all() and (buf[2, 1] == 0).all()


def test_auto_never_picks_the_simulator(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("backend='auto' ran the CUDA kernel in the simulator")

    monkeypatch.setitem(md.MOE_DISPATCH_FORWARD, "cuda", boom)
    ei, slot = torch.zeros(2, 1, dtype=torch.int64), torch.tensor([[0], [1]])
    assert torch.equal(md.moe_dispatch(torch.ones(2, 3), ei, slot, 1, 2), torch.ones(1, 2, 3))
