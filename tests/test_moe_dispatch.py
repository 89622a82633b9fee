"""MoE dispatch / combine (``effedu.kernels.moe_dispatch``, chapter 10): tokens → (E, C, d) buffers → tokens.

Oracles: a Python loop over every (token, choice) written here (the definition, element by element), and the torch
reference; every backend (torch, numba) and both baselines (Mesh-TensorFlow's one-hot einsum, the per-expert loop)
equal it, per-dtype tolerances, odd sizes, k = 1, 2, 3, dropped choices, an expert with no tokens, capacity 1;
gradcheck (float64) of the torch and numba backends w.r.t. x, expert_out and gate; errors. The CUDA kernels: in
the simulator (``tests/cudasim/test_moe_dispatch_cudasim.py``), compiled to sm_90 PTX here (with libNVVM), and for
real on a GPU.
"""
import ast
import importlib
import inspect
import os
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import torch

from effedu.kernels.moe_dispatch import (dispatch_tensor, moe_combine, moe_combine_einsum, moe_combine_loop,
                                         moe_dispatch, moe_dispatch_einsum, moe_dispatch_loop)

from _gpu import gpu, needs_gpu, needs_nvvm, needs_simulator_off  # noqa: E402

md = importlib.import_module("effedu.kernels.moe_dispatch")  # the module (kernels may re-export the function)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}
BACKENDS = ["torch", "numba"]


def route(n_tokens, n_experts, k, capacity, seed=0, unused_expert=False):
    """A top-k routing with GShard's slots: all first choices in token order, then all second choices, …; a
    choice past the expert's capacity is dropped (slot −1). ``unused_expert``: nobody picks the last expert."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tokens, n_experts, generator=g)
    if unused_expert:
        logits[:, -1] = -1e9
    expert_index = logits.topk(k, dim=1).indices
    slot = torch.full((n_tokens, k), -1, dtype=torch.int64)
    count = [0] * n_experts
    for j in range(k):
        for n in range(n_tokens):
            e = int(expert_index[n, j])
            if count[e] < capacity:
                slot[n, j] = count[e]
                count[e] += 1
    return expert_index, slot


def oracle_dispatch(x, expert_index, slot, E, C):
    out = torch.zeros(E, C, x.shape[1], dtype=x.dtype)
    for n in range(x.shape[0]):
        for j in range(slot.shape[1]):
            if slot[n, j] >= 0:
                out[expert_index[n, j], slot[n, j]] = x[n]
    return out


def oracle_combine(eo, expert_index, slot, gate):
    out = torch.zeros(slot.shape[0], eo.shape[2], dtype=eo.dtype)
    for n in range(slot.shape[0]):
        for j in range(slot.shape[1]):
            if slot[n, j] >= 0:
                out[n] += gate[n, j] * eo[expert_index[n, j], slot[n, j]]
    return out


def _rand(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


CASES = [  # N, d, E, k, C, unused expert
    (1, 1, 1, 1, 1, False),
    (37, 9, 5, 2, 6, False),      # drops
    (50, 33, 4, 3, 40, False),    # k = 3, no drops
    (13, 5, 6, 1, 1, True),       # capacity 1, an expert with no tokens
    (64, 17, 8, 2, 3, True),      # many drops
]
IDS = [f"N{c[0]}-d{c[1]}-E{c[2]}-k{c[3]}-C{c[4]}" for c in CASES]

DISPATCHERS = {
    "torch": lambda *a: moe_dispatch(*a, backend="torch"),
    "numba": lambda *a: moe_dispatch(*a, backend="numba"),
    "einsum": moe_dispatch_einsum,
    "loop": moe_dispatch_loop,
}
COMBINERS = {
    "torch": lambda *a: moe_combine(*a, backend="torch"),
    "numba": lambda *a: moe_combine(*a, backend="numba"),
    "einsum": moe_combine_einsum,
    "loop": moe_combine_loop,
}


# ------------------------------------------------------------------------------------------------------------
# forward: every backend and baseline == the element-by-element oracle
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("N, d, E, k, C, unused", CASES, ids=IDS)
def test_every_implementation_matches_the_oracle(N, d, E, k, C, unused, dtype):
    ei, slot = route(N, E, k, C, seed=N + d, unused_expert=unused)
    x = _rand(N, d, dtype=dtype)
    eo = _rand(E, C, d, dtype=dtype, seed=2)
    gate = torch.rand(N, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    want_buf = oracle_dispatch(x, ei, slot, E, C)
    want_y = oracle_combine(eo, ei, slot, gate)
    for name, fn in DISPATCHERS.items():
        buf = fn(x, ei, slot, E, C)
        assert buf.shape == (E, C, d) and buf.dtype == dtype, name
        torch.testing.assert_close(buf, want_buf, **TOL[dtype], msg=name)
    for name, fn in COMBINERS.items():
        y = fn(eo, ei, slot, gate)
        assert y.shape == (N, d) and y.dtype == dtype, name
        torch.testing.assert_close(y, want_y, **TOL[dtype], msg=name)
    # exact facts: a buffer row holds a copy (bit-equal) of its token; unfilled rows and dropped tokens are 0
    buf = moe_dispatch(x, ei, slot, E, C, backend="numba")
    filled = torch.zeros(E, C, dtype=torch.bool)
    filled[ei[slot >= 0], slot[slot >= 0]] = True
    assert torch.equal(buf, want_buf) and (buf[~filled] == 0).all()
    assert int(filled.sum()) == int((slot >= 0).sum())
    if unused:
        assert (buf[-1] == 0).all()
    all_dropped = (slot < 0).all(dim=1)
    assert (moe_combine(eo, ei, slot, gate, backend="numba")[all_dropped] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_with_identity_experts_gives_the_gated_tokens(backend):
    # identity experts: combine(dispatch(x)) = x · Σ_{kept j} gate — and x itself for top-1 gates of 1, no drops
    ei, slot = route(100, 8, 2, 30, seed=5)
    x = _rand(100, 16, dtype=torch.float32)
    gate = torch.rand(100, 2, generator=torch.Generator().manual_seed(6))
    y = moe_combine(moe_dispatch(x, ei, slot, 8, 30, backend=backend), ei, slot, gate, backend=backend)
    torch.testing.assert_close(y, x * (gate * (slot >= 0)).sum(1, keepdim=True), **TOL[torch.float32])
    ei1, slot1 = route(100, 8, 1, 100, seed=7)
    y1 = moe_combine(moe_dispatch(x, ei1, slot1, 8, 100, backend=backend), ei1, slot1, torch.ones(100, 1),
                     backend=backend)
    assert torch.equal(y1, x)


def test_numba_and_torch_agree_on_a_bench_sized_case_int32_indices_and_auto():
    ei, slot = route(4096, 8, 1, 640, seed=8)
    x = _rand(4096, 256, dtype=torch.float32)
    ref = moe_dispatch(x, ei, slot, 8, 640, backend="torch")
    assert torch.equal(moe_dispatch(x, ei.int(), slot.int(), 8, 640, backend="numba"), ref)
    assert torch.equal(moe_dispatch(x, ei, slot, 8, 640), ref)  # auto → numba on CPU float32
    gate = torch.rand(4096, 1)
    torch.testing.assert_close(moe_combine(ref, ei.int(), slot.int(), gate), moe_combine(ref, ei, slot, gate,
                                                                                          backend="torch"))


def test_torch_backend_takes_other_float_dtypes_and_auto_picks_it():
    ei, slot = route(20, 4, 2, 8, seed=9)
    x = _rand(20, 6, dtype=torch.bfloat16)
    buf = moe_dispatch(x, ei, slot, 4, 8)  # auto → torch for bfloat16
    assert buf.dtype == torch.bfloat16 and torch.equal(buf, oracle_dispatch(x, ei, slot, 4, 8))
    with pytest.raises(TypeError, match="backend 'numba' supports float32 and float64, got torch.bfloat16"):
        moe_dispatch(x, ei, slot, 4, 8, backend="numba")


def test_dispatch_tensor_is_one_hot_and_the_combine_tensor_holds_the_gates():
    ei, slot = route(30, 5, 2, 7, seed=10)
    D = dispatch_tensor(ei, slot, 5, 7)
    assert D.shape == (30, 5, 7) and D.dtype == torch.get_default_dtype()
    assert set(D.unique().tolist()) <= {0.0, 1.0}
    assert int(D.sum()) == int((slot >= 0).sum())  # one 1 per kept choice
    assert D.sum(dim=0).max() <= 1  # one token per (expert, slot)
    assert torch.equal(D.sum(dim=(1, 2)), (slot >= 0).sum(1).to(D.dtype))
    gate = torch.rand(30, 2, dtype=torch.float64)
    G = dispatch_tensor(ei, slot, 5, 7, gate=gate)
    assert G.dtype == torch.float64
    kept = slot >= 0
    torch.testing.assert_close(G[kept.nonzero()[:, 0], ei[kept], slot[kept]], gate[kept])
    assert torch.equal(G != 0, D.to(torch.float64) != 0) or (gate[kept] == 0).any()


def test_empty_batch():
    ei = torch.zeros(0, 2, dtype=torch.int64)
    for backend in BACKENDS:
        buf = moe_dispatch(torch.zeros(0, 4), ei, ei.clone(), 3, 2, backend=backend)
        assert buf.shape == (3, 2, 4) and (buf == 0).all()
        assert moe_combine(torch.ones(3, 2, 4), ei, ei.clone(), torch.zeros(0, 2), backend=backend).shape == (0, 4)


# ------------------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_dispatch_and_combine(backend):
    ei, slot = route(11, 4, 2, 3, seed=11)  # drops
    assert (slot < 0).any()
    x = _rand(11, 5).requires_grad_(True)
    eo = _rand(4, 3, 5, seed=12).requires_grad_(True)
    gate = torch.rand(11, 2, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: moe_dispatch(x, ei, slot, 4, 3, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda a, g: moe_combine(a, ei, slot, g, backend=backend), (eo, gate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_every_implementation_has_the_same_gradients(dtype):
    ei, slot = route(40, 6, 3, 12, seed=13, unused_expert=True)
    x0, eo0 = _rand(40, 7, dtype=dtype), _rand(6, 12, 7, dtype=dtype, seed=14)
    g0 = torch.rand(40, 3, dtype=torch.float64).to(dtype)
    dbuf, dy = _rand(6, 12, 7, dtype=dtype, seed=15), _rand(40, 7, dtype=dtype, seed=16)
    grads = {}
    for name in DISPATCHERS:
        x, eo, g = (t.clone().requires_grad_(True) for t in (x0, eo0, g0))
        (dx,) = torch.autograd.grad(DISPATCHERS[name](x, ei, slot, 6, 12), (x,), dbuf)
        grads[name] = (dx, *torch.autograd.grad(COMBINERS[name](eo, ei, slot, g), (eo, g), dy))
    # the definitions: dx[n] = Σ_kept dbuf[e, s]; deo[e, s] = gate · dy[n]; dgate = ⟨dy[n], eo[e, s]⟩ · kept
    kept = (slot >= 0).to(dtype)
    rows = (ei * 12 + slot.clamp_min(0))
    want_dx = (dbuf.reshape(-1, 7)[rows] * kept.unsqueeze(2)).sum(1)
    want_dg = (dy.unsqueeze(1) * eo0.reshape(-1, 7)[rows]).sum(2) * kept
    for name, (dx, deo, dg) in grads.items():
        torch.testing.assert_close(dx, want_dx, **TOL[dtype], msg=name)
        torch.testing.assert_close(dg, want_dg, **TOL[dtype], msg=name)
        torch.testing.assert_close(deo, grads["torch"][1], **TOL[dtype], msg=name)
        assert (deo[-1] == 0).all(), name  # the unused expert's rows get no gradient
    assert (grads["numba"][2][slot < 0] == 0).all()  # dropped choices: no gate gradient


def test_numba_backward_computes_only_what_is_needed(monkeypatch):
    calls = []
    real = md._gate_grad_kernel
    monkeypatch.setattr(md, "_gate_grad_kernel", lambda *a: calls.append(1) or real(*a))
    ei, slot = route(9, 3, 1, 5, seed=17)
    eo = _rand(3, 5, 4).requires_grad_(True)
    gate = torch.rand(9, 1, dtype=torch.float64)
    moe_combine(eo, ei, slot, gate, backend="numba").sum().backward()
    assert calls == [] and eo.grad is not None
    gate.requires_grad_(True)
    (dg,) = torch.autograd.grad(moe_combine(eo.detach(), ei, slot, gate, backend="numba").sum(), (gate,))
    assert calls == [1] and dg.shape == (9, 1)


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------


def test_errors():
    ei, slot = route(10, 4, 2, 5, seed=18)
    x, eo, gate = torch.randn(10, 3), torch.randn(4, 5, 3), torch.rand(10, 2)
    bad = [
        (TypeError, "x must be a dense torch.Tensor", lambda: moe_dispatch(x.numpy(), ei, slot, 4, 5)),
        (ValueError, r"x must be 2-D \(N, d\)", lambda: moe_dispatch(x[None], ei, slot, 4, 5)),
        (TypeError, "x must have a floating dtype", lambda: moe_dispatch(x.long(), ei, slot, 4, 5)),
        (TypeError, "expert_index must have an integer dtype", lambda: moe_dispatch(x, ei.float(), slot, 4, 5)),
        (ValueError, r"slot must be 2-D \(N, k\).*unsqueeze", lambda: moe_dispatch(x, ei, slot[:, 0], 4, 5)),
        (ValueError, "must have one shape", lambda: moe_dispatch(x, ei, slot[:, :1], 4, 5)),
        (ValueError, "one row per token, N = 9", lambda: moe_dispatch(x[:9], ei, slot, 4, 5)),
        (ValueError, "k ≥ 1 choices", lambda: moe_dispatch(x, ei[:, :0], slot[:, :0], 4, 5)),
        (ValueError, r"expert_index must lie in \[0, n_experts\) = \[0, 3\)", lambda: moe_dispatch(x, ei, slot, 3, 5)),
        (ValueError, r"slot must lie in \[-1, capacity\) = \[-1, 4\)", lambda: moe_dispatch(x, ei, slot, 4, 4)),
        (ValueError, r"slot must lie in \[-1", lambda: moe_dispatch(x, ei, slot - 2, 4, 5)),
        (ValueError, "capacity must be an int ≥ 1, got 0", lambda: moe_dispatch(x, ei, slot, 4, 0)),
        (TypeError, "n_experts must be an int", lambda: moe_dispatch(x, ei, slot, 4.0, 5)),
        (ValueError, "n_experts must be an int ≥ 1", lambda: moe_dispatch(x, ei, slot, 0, 5)),
        (ValueError, "unknown backend 'cuBLAS'", lambda: moe_dispatch(x, ei, slot, 4, 5, backend="cuBLAS")),
        (ValueError, r"expert_out must be 3-D \(E, C, d\)", lambda: moe_combine(eo[0], ei, slot, gate)),
        (TypeError, "gate and expert_out must share one dtype", lambda: moe_combine(eo, ei, slot, gate.double())),
        (ValueError, r"gate must have expert_index's shape \(N, k\) = \(10, 2\)",
         lambda: moe_combine(eo, ei, slot, gate[:, :1])),
        (ValueError, r"expert_index must lie in \[0, n_experts\) = \[0, 3\)", lambda: moe_combine(eo[:3], ei, slot, gate)),
        (ValueError, "expert_out must have ≥ 1 expert", lambda: moe_combine(eo[:0], ei, slot, gate)),
        (TypeError, "gate must be a dense torch.Tensor", lambda: moe_combine(eo, ei, slot, [1.0])),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
    # two kept choices in one buffer row
    dup = slot.clone()
    n0 = int((slot[:, 0] >= 0).nonzero()[0])
    other = int(((ei[:, 0] == ei[n0, 0]) & (slot[:, 0] >= 0)).nonzero()[1])
    dup[other, 0] = slot[n0, 0]
    for call in (lambda: moe_dispatch(x, ei, dup, 4, 5, backend="numba"), lambda: moe_combine(eo, ei, dup, gate),
                 lambda: moe_dispatch_einsum(x, ei, dup, 4, 5), lambda: moe_combine_loop(eo, ei, dup, gate),
                 lambda: dispatch_tensor(ei, dup, 4, 5)):
        with pytest.raises(ValueError, match=rf"two kept choices share \(expert, slot\) = \({int(ei[n0, 0])}, "
                                             rf"{int(slot[n0, 0])}\)"):
            call()
    # a dropped choice may name any expert in range: only kept choices occupy a row
    free = slot.clone()
    free[other, 0] = -1
    moe_dispatch(x, ei, free, 4, 5)
    with pytest.raises(ValueError, match="data's device"):
        moe_dispatch(x, ei.to("meta"), slot, 4, 5)
    with pytest.raises(ValueError, match="dispatch_tensor: gate must have expert_index's shape"):
        dispatch_tensor(ei, slot, 4, 5, gate=gate[:, :1])


# ------------------------------------------------------------------------------------------------------------
# the CUDA kernels: on a real GPU, and compiled to PTX without one
# ------------------------------------------------------------------------------------------------------------


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gpu_matches_the_torch_reference_values_and_gradients(dtype):
    ei, slot = route(1000, 8, 2, 200, seed=19, unused_expert=True)
    x0, eo0 = _rand(1000, 300, dtype=dtype), _rand(8, 200, 300, dtype=dtype, seed=20)
    g0 = torch.rand(1000, 2, dtype=torch.float64).to(dtype)
    dbuf, dy = _rand(8, 200, 300, dtype=dtype, seed=21), _rand(1000, 300, dtype=dtype, seed=22)
    out = {}
    for device, backend in (("cpu", "torch"), ("cuda", "auto")):
        x, eo, g = (t.to(device).requires_grad_(True) for t in (x0, eo0, g0))
        e, s = ei.to(device), slot.to(device)
        buf = moe_dispatch(x, e, s, 8, 200, backend=backend)
        y = moe_combine(eo, e, s, g, backend=backend)
        assert buf.device.type == device
        grads = torch.autograd.grad((buf, y), (x, eo, g), (dbuf.to(device), dy.to(device)))
        out[device] = [t.detach().cpu() for t in (buf, y, *grads)]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    for a, b in zip(out["cuda"], out["cpu"]):
        torch.testing.assert_close(a, b, **tol)


def _cuda_kernel_functions():
    tree = ast.parse(textwrap.dedent(inspect.getsource(md._make_cuda_kernels)))
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name != "_make_cuda_kernels"}


def test_cuda_kernels_avoid_builtin_min_max():
    # numba ≥ 0.66 cannot compile two-argument min()/max() for CUDA; the simulator would not notice
    fns = _cuda_kernel_functions()
    assert set(fns) == {"gather_rows", "combine_rows", "gate_grad"}
    for name, fn in fns.items():
        used = {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not used & {"min", "max"}, (name, used)


@needs_simulator_off
@needs_nvvm
@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
def test_cuda_kernels_compile_for_hopper(monkeypatch, np_dtype):
    """Compile the real (non-simulator) kernels to sm_90 PTX, and assemble them when ptxas is around."""
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda, float32, float64, int32, int64, types

    if not hasattr(dispatcher, "get_current_device"):
        pytest.skip("this numba.cuda has no dispatcher.get_current_device to stand in for a GPU")
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: type("Dev", (), {"compute_capability": (9, 0)})())
    gather_rows, combine_rows, gate_grad = md._make_cuda_kernels(np_dtype, md.CUDA_THREADS)
    nb = float32 if np_dtype == np.float32 else float64
    a1, a2 = types.Array(nb, 1, "C"), types.Array(nb, 2, "C")
    o1 = types.Array(int64, 1, "C")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    ptxas = shutil.which("ptxas") or next((p for p in [os.path.join(home, "bin", "ptxas")] if os.path.exists(p)), None)
    for ix in (int32, int64):
        i2 = types.Array(ix, 2, "C")
        for name, kern, sig in (("gather", gather_rows, (o1, a2, a1, a2, int64)),
                                ("combine", combine_rows, (i2, i2, a2, a2, a2, int64)),
                                ("gate_grad", gate_grad, (i2, i2, a2, a2, a2, int64))):
            ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
            if np_dtype == np.float32:
                f64_math = [ln for ln in ptx.splitlines() if ".f64" in ln and "cvt" not in ln]
                assert not f64_math, (name, f64_math[:5])
            if ptxas is None:
                continue
            src = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                               f"effedu_moe_{os.getpid()}_{name}_{np.dtype(np_dtype).name}_{ix}.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            try:
                r = subprocess.run([ptxas, "-arch=sm_90", src, "-o", os.devnull], capture_output=True, text=True,
                                   timeout=120)
            finally:
                os.remove(src)
            assert r.returncode == 0, (name, r.stderr)
