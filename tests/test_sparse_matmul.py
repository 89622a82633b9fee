"""The CSR sparse × dense kernel (``effedu.kernels.sparse_matmul``) and ``SparseLinear`` (chapter 05).

Oracles: ``a.to_dense() @ b`` (torch's dense product) and ``scipy.sparse.csr_matrix @ b``, per-dtype tolerances;
odd shapes, empty rows, an all-zero and a fully dense matrix; gradcheck (float64) of the torch reference and of the
numba kernels (forward, SDDMM and transposed-product backward); ``SparseLinear`` == the masked dense ``nn.Linear``
in outputs and gradients. The CUDA kernels: in the simulator (``tests/cudasim/test_sparse_matmul_cudasim.py``),
compiled to sm_90 PTX here (with libNVVM), and for real on a GPU.
"""
import ast
import inspect
import os
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import scipy.sparse
import torch
from torch import nn

from effedu.general.sparse_linear import SparseLinear
from effedu.kernels import sparse_matmul as sm
from effedu.kernels.sparse_matmul import csr_matmul, csr_matmul_parts, csr_transpose, dense_to_csr

from _gpu import gpu, needs_gpu, needs_nvvm, needs_simulator_off  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}
BACKENDS = ["torch", "numba"]


def _sparse(M, K, density, dtype=torch.float64, seed=0, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = w * (torch.rand(M, K, generator=g, dtype=torch.float64) < density)
    for i in empty_rows:
        w[i] = 0
    return w.to(dtype)


def _dense(K, N, dtype=torch.float64, seed=1):
    return torch.randn(K, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------------------
# forward: two oracles, odd shapes, edge patterns
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("M, K, N, density", [(1, 1, 1, 1.0), (7, 33, 5, 0.3), (33, 7, 1, 0.5), (1, 64, 33, 0.1),
                                              (40, 48, 33, 0.9), (65, 17, 130, 0.05)])
def test_matches_dense_and_scipy(backend, dtype, M, K, N, density):
    w = _sparse(M, K, density, dtype, seed=M * K + N, empty_rows=(0,) if M > 2 else ())
    b = _dense(K, N, dtype)
    y = csr_matmul(dense_to_csr(w), b, backend=backend)
    assert y.shape == (M, N) and y.dtype == dtype and y.layout == torch.strided
    torch.testing.assert_close(y, w @ b, **TOL[dtype])
    ref = scipy.sparse.csr_matrix(w.numpy()) @ b.numpy()
    torch.testing.assert_close(y, torch.from_numpy(ref), **TOL[dtype])
    if M > 2:
        assert (y[0] == 0).all()  # an empty row gives an exact zero row


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_fully_dense_and_empty_shapes(backend):
    b = _dense(9, 4)
    zero = torch.zeros(6, 9, dtype=torch.float64)
    a = dense_to_csr(zero)
    assert a.values().numel() == 0
    assert torch.equal(csr_matmul(a, b, backend=backend), torch.zeros(6, 4, dtype=torch.float64))
    full = _sparse(6, 9, 1.0, seed=3)
    assert dense_to_csr(full).values().numel() == 54
    torch.testing.assert_close(csr_matmul(dense_to_csr(full), b, backend=backend), full @ b, **TOL[torch.float64])
    # N = 0 columns, M = 0 rows: empty results of the right shape
    assert csr_matmul(dense_to_csr(full), b[:, :0], backend=backend).shape == (6, 0)
    assert csr_matmul(dense_to_csr(full[:0]), b, backend=backend).shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torchs_own_csr_int32_indices_and_auto(backend):
    w = _sparse(12, 10, 0.4, torch.float32, seed=5)
    b = _dense(10, 7, torch.float32)
    ref = w @ b
    torch.testing.assert_close(csr_matmul(w.to_sparse_csr(), b, backend=backend), ref, **TOL[torch.float32])
    a32 = dense_to_csr(w, index_dtype=torch.int32)
    assert a32.crow_indices().dtype == torch.int32 and a32.col_indices().dtype == torch.int32
    torch.testing.assert_close(csr_matmul(a32, b, backend=backend), ref, **TOL[torch.float32])
    torch.testing.assert_close(csr_matmul(a32, b), ref, **TOL[torch.float32])  # auto → numba on the CPU
    # a non-contiguous b (a transposed view) is fine
    bt = _dense(7, 10, torch.float32).t()
    torch.testing.assert_close(csr_matmul(a32, bt, backend=backend), w @ bt, **TOL[torch.float32])


def test_numba_and_torch_agree_on_a_bench_sized_product():
    w = _sparse(256, 192, 0.1, torch.float32, seed=6)
    b = _dense(192, 64, torch.float32)
    a = dense_to_csr(w)
    torch.testing.assert_close(csr_matmul(a, b, backend="numba"), csr_matmul(a, b, backend="torch"),
                               atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# dense_to_csr and the transpose
# ------------------------------------------------------------------------------------------------------------


def test_dense_to_csr_matches_torch_and_keeps_the_masks_pattern():
    w = _sparse(8, 11, 0.4, seed=7, empty_rows=(2, 7))
    a, ref = dense_to_csr(w), w.to_sparse_csr()
    for x, y in ((a.crow_indices(), ref.crow_indices()), (a.col_indices(), ref.col_indices()),
                 (a.values(), ref.values())):
        assert torch.equal(x, y)
    assert not a.requires_grad
    mask = torch.zeros(8, 11, dtype=torch.bool)
    mask[0, :3] = True
    mask[5, 10] = True
    w2 = w.clone()
    w2[0, 1] = 0.0  # a kept weight that is zero is still stored: the structure is the mask's
    m = dense_to_csr(w2, mask)
    assert m.values().numel() == 4 and m.crow_indices().tolist() == [0, 3, 3, 3, 3, 3, 4, 4, 4]
    assert m.col_indices().tolist() == [0, 1, 2, 10] and m.values()[1] == 0
    assert torch.equal(m.to_dense(), w2 * mask)


def test_transposes_match_and_rows_come_out_sorted():
    w = _sparse(9, 13, 0.35, seed=8, empty_rows=(4,))
    a = dense_to_csr(w)
    parts = (a.crow_indices(), a.col_indices(), a.values())
    for crow_t, col_t, val_t in (csr_transpose(*parts, 13), sm.csr_transpose_numba(*parts, 13)):
        at = torch.sparse_csr_tensor(crow_t, col_t, val_t, size=(13, 9), check_invariants=True)
        assert torch.equal(at.to_dense(), w.t())
        for j in range(13):
            seg = col_t[crow_t[j]:crow_t[j + 1]]
            assert torch.all(seg[1:] > seg[:-1])


# ------------------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_wrt_b(backend):
    a = dense_to_csr(_sparse(5, 6, 0.5, seed=9, empty_rows=(1,)))
    b = _dense(6, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: csr_matmul(a, b, backend=backend), (b,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_parts_wrt_values_and_b(backend):
    a = dense_to_csr(_sparse(6, 5, 0.5, seed=10, empty_rows=(3,)))
    crow, col = a.crow_indices(), a.col_indices()
    values = a.values().clone().requires_grad_(True)
    b = _dense(5, 4, seed=11).requires_grad_(True)
    fn = lambda v, x: csr_matmul_parts(crow, col, v, x, 6, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (values, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gradients_match_the_dense_product(backend, dtype):
    w = _sparse(19, 23, 0.3, dtype, seed=12, empty_rows=(0, 18))
    a = dense_to_csr(w)
    values = a.values().clone().requires_grad_(True)
    b = _dense(23, 9, dtype, seed=13).requires_grad_(True)
    g = _dense(19, 9, dtype, seed=14)
    y = csr_matmul_parts(a.crow_indices(), a.col_indices(), values, b, 19, backend=backend)
    dv, db = torch.autograd.grad(y, (values, b), g)
    wd = w.clone().requires_grad_(True)
    bd = b.detach().clone().requires_grad_(True)
    dw_ref, db_ref = torch.autograd.grad(wd @ bd, (wd, bd), g)
    torch.testing.assert_close(db, db_ref, **TOL[dtype])
    torch.testing.assert_close(dv, dw_ref[w != 0], **TOL[dtype])  # the SDDMM: dW sampled at the non-zeros
    # only b needs a gradient: the numba backward skips the SDDMM
    (db_only,) = torch.autograd.grad(csr_matmul(a, b, backend=backend), (b,), g)
    torch.testing.assert_close(db_only, db_ref, **TOL[dtype])


def test_numba_backward_computes_only_what_is_needed(monkeypatch):
    calls = []
    real = sm.csr_sddmm_numba
    monkeypatch.setattr(sm, "csr_sddmm_numba", lambda *a: calls.append(1) or real(*a))
    a = dense_to_csr(_sparse(4, 5, 0.6, seed=15))
    b = _dense(5, 3).requires_grad_(True)
    csr_matmul(a, b, backend="numba").sum().backward()
    assert calls == [] and b.grad is not None


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------


def test_errors_of_csr_matmul():
    w = _sparse(4, 5, 0.5, torch.float32, seed=16)
    a, b = dense_to_csr(w), _dense(5, 3, torch.float32)
    with pytest.raises(TypeError, match=r"a must be a torch.sparse_csr_tensor .*layout torch.sparse_coo"):
        csr_matmul(w.to_sparse(), b)
    with pytest.raises(TypeError, match=r"a must be a torch.sparse_csr_tensor .*layout torch.strided"):
        csr_matmul(w, b)
    with pytest.raises(TypeError, match="a must be a torch.sparse_csr_tensor"):
        csr_matmul(w.numpy(), b)
    with pytest.raises(TypeError, match="share one dtype, got torch.float32 and torch.float64"):
        csr_matmul(a, b.double())
    with pytest.raises(TypeError, match="a must have dtype float32, float64, got torch.int64"):
        csr_matmul(dense_to_csr(w).to(torch.int64), b)
    with pytest.raises(TypeError, match="b must have dtype float32, float64, got torch.int32"):
        csr_matmul(a, b.to(torch.int32))
    with pytest.raises(ValueError, match=r"inner dimensions differ: a is 4×5, b is 6×3"):
        csr_matmul(a, _dense(6, 3, torch.float32))
    with pytest.raises(ValueError, match=r"b must be 2-D \(K, N\), got shape \(5,\)"):
        csr_matmul(a, b[:, 0])
    with pytest.raises(ValueError, match="one device, got cpu and meta"):
        csr_matmul(a, torch.empty(5, 3, device="meta"))
    with pytest.raises(TypeError, match="b must be a dense"):
        csr_matmul(a, b.to_sparse())
    ag = dense_to_csr(w).requires_grad_(True)
    with pytest.raises(TypeError, match="csr_matmul_parts.*SparseLinear"):
        csr_matmul(ag, b)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        csr_matmul(a, b, backend="gpu")


def test_errors_of_the_parts_and_dense_to_csr():
    a = dense_to_csr(_sparse(4, 5, 0.5, seed=17))
    crow, col, val = a.crow_indices(), a.col_indices(), a.values()
    b = _dense(5, 2)
    with pytest.raises(ValueError, match="crow_indices must have n_rows \\+ 1 = 4 entries, got 5"):
        csr_matmul_parts(crow, col, val, b, 3)
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, K\) = \[0, 3\)"):
        csr_matmul_parts(crow, col, val, b[:3], 4)
    bad = crow.clone()
    bad[2] = bad[3] + 1
    with pytest.raises(ValueError, match="non-decreasing"):
        csr_matmul_parts(bad, col, val, b, 4)
    with pytest.raises(ValueError, match="start at 0 and end at nnz"):
        csr_matmul_parts(crow + 1, col, val, b, 4)
    with pytest.raises(ValueError, match="one entry per non-zero"):
        csr_matmul_parts(crow, col[:-1], val, b, 4)
    with pytest.raises(TypeError, match="crow_indices and col_indices must share one dtype"):
        csr_matmul_parts(crow.int(), col, val, b, 4)
    with pytest.raises(TypeError, match="col_indices must have an integer dtype"):
        csr_matmul_parts(crow, col.double(), val, b, 4)
    with pytest.raises(TypeError, match="n_rows must be an int"):
        csr_matmul_parts(crow, col, val, b, 4.0)
    with pytest.raises(TypeError, match="weight must be a dense 2-D"):
        dense_to_csr(a)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        dense_to_csr(torch.ones(3))
    with pytest.raises(TypeError, match="mask must be a torch.bool tensor"):
        dense_to_csr(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"mask must have the weight's shape \(2, 2\)"):
        dense_to_csr(torch.ones(2, 2), torch.ones(2, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------------------
# SparseLinear
# ------------------------------------------------------------------------------------------------------------


def _masked_linear(in_f, out_f, density, seed, dtype=torch.float64, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    mask = torch.rand(out_f, in_f, generator=torch.Generator().manual_seed(seed)) < density
    mask[1] = False  # an output with no kept weight: its output is the bias alone
    return lin, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_sparse_linear_equals_the_masked_linear(backend, dtype):
    lin, mask = _masked_linear(13, 7, 0.3, seed=18, dtype=dtype)
    sl = SparseLinear.from_linear(lin, mask, backend=backend)
    assert sl.nnz == int(mask.sum()) and sl.density == pytest.approx(mask.float().mean().item())
    assert torch.equal(sl.mask(), mask) and sl.crow_indices.dtype == torch.int32
    x = torch.randn(2, 3, 13, generator=torch.Generator().manual_seed(19), dtype=torch.float64).to(dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w = (lin.weight * mask).detach().requires_grad_(True)
    bias = lin.bias.detach().clone().requires_grad_(True)
    y, ref = sl(x1), nn.functional.linear(x2, w, bias)
    assert y.shape == (2, 3, 7)
    torch.testing.assert_close(y, ref, **TOL[dtype])
    g = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(20), dtype=torch.float64).to(dtype)
    gx, gv, gb = torch.autograd.grad(y, (x1, sl.values, sl.bias), g)
    rx, rw, rb = torch.autograd.grad(ref, (x2, w, bias), g)
    torch.testing.assert_close(gx, rx, **TOL[dtype])
    torch.testing.assert_close(gv, rw[mask], **TOL[dtype])
    torch.testing.assert_close(gb, rb, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_linear_gradcheck(backend):
    lin, mask = _masked_linear(5, 4, 0.5, seed=21)
    sl = SparseLinear.from_linear(lin, mask, backend=backend)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(22)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, v, b: torch.func.functional_call(sl, {"values": v, "bias": b}, (x,)),
                                     (x, sl.values, sl.bias))


def test_sparse_linear_defaults_sizes_round_trip_and_training():
    lin, mask = _masked_linear(32, 16, 0.25, seed=23, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.mul_(mask)
    sl = SparseLinear.from_linear(lin)  # default pattern: the non-zero weights
    nnz = int(mask.sum())
    assert sl.nnz == nnz and torch.equal(sl.mask(), mask)
    # CSR bytes: float32 values + int32 columns + int32 row offsets + bias; dense: weight + bias
    assert sl.storage_bytes() == 4 * nnz + 4 * nnz + 4 * 17 + 4 * 16
    assert sl.dense_bytes() == 4 * (32 * 16 + 16)
    back = sl.to_linear()
    assert isinstance(back, nn.Linear) and torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    assert "nnz=" in repr(sl)
    # a training step updates only the kept weights: the pattern cannot fill in
    opt = torch.optim.SGD(sl.parameters(), lr=0.1)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(24))
    sl(x).pow(2).mean().backward()
    opt.step()
    assert torch.equal(sl.mask(), mask) and (sl.to_linear().weight[~mask] == 0).all()
    nobias = SparseLinear.from_linear(nn.Linear(4, 3, bias=False), backend="torch")
    assert nobias.bias is None and nobias(torch.randn(4)).shape == (3,)
    assert nobias.storage_bytes() == 12 * 4 + 12 * 4 + 4 * 4


def test_sparse_linear_errors():
    sl = SparseLinear.from_linear(nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., in_features=6\), got \(2, 5\)"):
        sl(torch.randn(2, 5))
    with pytest.raises(TypeError, match="input dtype torch.float64 differs"):
        sl(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(2, 2, 1))
    a = dense_to_csr(torch.ones(3, 6))
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, K\) = \[0, 4\)"):
        SparseLinear(a.crow_indices(), a.col_indices(), a.values(), 4, 3)
    with pytest.raises(ValueError, match=r"bias must be None or a tensor of shape \(3,\)"):
        SparseLinear(a.crow_indices(), a.col_indices(), a.values(), 6, 3, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="in_features must be an int ≥ 1"):
        SparseLinear(a.crow_indices(), a.col_indices(), a.values(), 0, 3)


# ------------------------------------------------------------------------------------------------------------
# the CUDA kernels: on a real GPU, and compiled to PTX without one
# ------------------------------------------------------------------------------------------------------------


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gpu_matches_the_oracles_values_and_gradients(dtype):
    w = _sparse(300, 257, 0.1, dtype, seed=25, empty_rows=(0, 299)).cuda()
    a = dense_to_csr(w)
    values = a.values().clone().requires_grad_(True)
    b = _dense(257, 70, dtype).cuda().requires_grad_(True)
    g = _dense(300, 70, dtype, seed=26).cuda()
    y = csr_matmul_parts(a.crow_indices(), a.col_indices(), values, b, 300)  # auto → cuda
    assert y.is_cuda
    dv, db = torch.autograd.grad(y, (values, b), g)
    w64, b64 = w.double().cpu().requires_grad_(True), b.detach().double().cpu().requires_grad_(True)
    ref = w64 @ b64
    dw_ref, db_ref = torch.autograd.grad(ref, (w64, b64), g.double().cpu())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(y.detach().cpu(), ref.detach().to(dtype), **tol)
    torch.testing.assert_close(db.cpu(), db_ref.to(dtype), **tol)
    torch.testing.assert_close(dv.cpu(), dw_ref[w.cpu() != 0].to(dtype), **tol)


def _cuda_kernel_functions():
    tree = ast.parse(textwrap.dedent(inspect.getsource(sm._make_cuda_kernels)))
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name != "_make_cuda_kernels"}


def test_cuda_kernels_avoid_builtin_min_max():
    # numba ≥ 0.66 cannot compile two-argument min()/max() for CUDA; the simulator would not notice
    fns = _cuda_kernel_functions()
    assert set(fns) == {"rows_kernel", "sddmm_kernel"}
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
    rows_kernel, sddmm_kernel = sm._make_cuda_kernels(np_dtype, sm.CUDA_THREADS)
    nb = float32 if np_dtype == np.float32 else float64
    a1, a2 = types.Array(nb, 1, "C"), types.Array(nb, 2, "C")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    ptxas = shutil.which("ptxas") or next((p for p in [os.path.join(home, "bin", "ptxas")] if os.path.exists(p)), None)
    for ix in (int32, int64):
        i1 = types.Array(ix, 1, "C")
        for name, kern, sig in (("rows", rows_kernel, (i1, i1, a1, a2, a2)),
                                ("sddmm", sddmm_kernel, (i1, i1, a2, a2, a1))):
            ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
            if np_dtype == np.float32:
                f64_math = [ln for ln in ptx.splitlines() if ".f64" in ln and "cvt" not in ln]
                assert not f64_math, (name, f64_math[:5])
            if ptxas is None:
                continue
            src = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                               f"effedu_csr_{os.getpid()}_{name}_{np.dtype(np_dtype).name}_{ix}.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            try:
                r = subprocess.run([ptxas, "-arch=sm_90", src, "-o", os.devnull], capture_output=True, text=True,
                                   timeout=120)
            finally:
                os.remove(src)
            assert r.returncode == 0, (name, r.stderr)
