"""The CUDA backend on a real GPU, and what ``backend="cuda"`` says on a machine without one.

``@pytest.mark.gpu`` tests run only where ``kernels.cuda_usable()`` is True (a GPU that numba.cuda can drive; the
simulator does not count); elsewhere they are skipped with the reason. The simulator tests live in
``tests/cudasim`` (own process). The rest of this file runs everywhere, simulator off: the error message without
a GPU, and compile-time checks of the kernel that a simulator cannot make.
"""
import ast
import inspect
import math
import os
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effedu import kernels
from effedu.kernels import tiled_attention as ta

from _gpu import HAVE_GPU, gpu, needs_gpu, needs_nvvm, needs_simulator_off  # noqa: E402,F401

# float32 on the GPU: float32 arithmetic, S ≤ 257 terms per row; the oracle is float64 SDPA on the CPU
TOL = {torch.float32: dict(atol=3e-5, rtol=3e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}


def _qkv(B, H, T, S, D, Dv, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, S, Dv, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype=dtype, device=device) for x in (q, k, v))


def _reference(q, k, v, causal, scale=None):
    """SDPA and the scores' log-sum-exp, in float64 on the CPU (no TF32, no fused-kernel approximations)."""
    q64, k64, v64 = (x.detach().cpu().double() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal, scale=scale)
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q64 @ k64.transpose(-2, -1)) * sc
    if causal:
        T, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(), -math.inf)  # top-left: key j ≤ query i
    return out, torch.logsumexp(s, dim=-1)


def _check(q, k, v, *, causal=False, scale=None, block_size=None, backend="cuda"):
    out, lse = kernels.attention(
        q, k, v, causal=causal, scale=scale, backend=backend, block_size=block_size, return_lse=True
    )
    ref, ref_lse = _reference(q, k, v, causal, scale)
    B, H, T, _ = q.shape
    assert out.shape == (B, H, T, v.shape[-1]) and lse.shape == (B, H, T)
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    assert out.device == q.device and lse.device == q.device
    torch.testing.assert_close(out.cpu(), ref.to(q.dtype), **TOL[q.dtype])
    torch.testing.assert_close(lse.cpu(), ref_lse.to(q.dtype), **TOL[q.dtype])
    return out, lse


# ------------------------------------------------------------------------------------------------------------
# on a real GPU
# ------------------------------------------------------------------------------------------------------------


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_matches_sdpa(dtype, causal):
    # 257 = 8·32 + 1: the last query and key tiles hold one row
    q, k, v = _qkv(2, 4, 257, 257, 64, 64, dtype, "cuda")
    _check(q, k, v, causal=causal)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
def test_gpu_every_block_size_and_wide_heads(dtype, block_size):
    # D=128 is the head-dim limit: float64 tiles then need the key tile shrunk to fit 48 KiB of shared memory
    q, k, v = _qkv(1, 2, 203, 150, 128, 128, dtype, "cuda", seed=1)
    _check(q, k, v, causal=True, block_size=block_size)
    _check(q, k, v, causal=False, block_size=block_size)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("T, S", [(1, 300), (300, 1), (100, 333), (333, 100)])
def test_gpu_edges_and_causal_t_ne_s(dtype, T, S):
    q, k, v = _qkv(2, 3, T, S, 65, 24, dtype, "cuda", seed=2)  # D=65 (tiles round up to 128), Dv=24
    _check(q, k, v, causal=False)
    _check(q, k, v, causal=True)


@gpu
@needs_gpu
def test_gpu_custom_scale_and_non_contiguous():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 129, 4, 32, generator=g).cuda().transpose(1, 2)
    k = torch.randn(2, 77, 4, 32, generator=g).cuda().transpose(1, 2)
    v = torch.randn(2, 4, 16, 77, generator=g).cuda().transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, causal=True, scale=0.3)
    _check(q, k, v, causal=False, scale=1.7, block_size=16)


@gpu
@needs_gpu
def test_gpu_tensors_on_the_current_non_default_stream():
    q, k, v = _qkv(2, 2, 100, 100, 32, 32, torch.float32, "cuda", seed=4)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q2 = q * 2.0  # produced on the side stream
        out = kernels.attention(q2, k, v, causal=True, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    ref, _ = _reference(q * 2.0, k, v, True)
    torch.testing.assert_close(out.cpu(), ref.float(), **TOL[torch.float32])


@gpu
@needs_gpu
def test_gpu_auto_picks_cuda(monkeypatch):
    assert kernels.resolve_backend("auto", torch.device("cuda"), torch.float32, "t") == "cuda"
    assert kernels.resolve_backend("auto", torch.device("cpu"), torch.float32, "t") == "numba"
    calls = []
    real = ta.attention_cuda

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ta, "attention_cuda", counting)
    q, k, v = _qkv(2, 4, 257, 257, 64, 64, torch.float32, "cuda", seed=5)
    auto = kernels.attention(q, k, v, causal=True)
    assert calls == [1]
    explicit = kernels.attention(q, k, v, causal=True, backend="cuda")
    assert auto.is_cuda
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)  # same kernel, same launch: bit-identical
    ref, _ = _reference(q, k, v, True)
    torch.testing.assert_close(auto.cpu(), ref.float(), **TOL[torch.float32])


@gpu
@needs_gpu
def test_gpu_backend_device_errors():
    q, k, v = _qkv(1, 1, 4, 4, 8, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"needs CUDA tensors"):
        kernels.attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=r"backend 'numba' needs CPU tensors"):
        kernels.attention(*(x.cuda() for x in (q, k, v)), backend="numba")


@gpu
@needs_gpu
def test_gpu_torch_backend_agrees_with_cuda():
    q, k, v = _qkv(2, 4, 257, 257, 64, 64, torch.float64, "cuda", seed=6)
    a = kernels.attention(q, k, v, causal=True, backend="cuda")
    b = kernels.attention(q, k, v, causal=True, backend="torch")
    torch.testing.assert_close(a, b, **TOL[torch.float64])


# ------------------------------------------------------------------------------------------------------------
# without a GPU (simulator off)
# ------------------------------------------------------------------------------------------------------------


@needs_simulator_off
@pytest.mark.skipif(HAVE_GPU, reason="a real GPU is present: backend='cuda' works here")
def test_cuda_backend_without_gpu_names_the_alternatives():
    assert not kernels.cuda_usable()
    assert "no GPU" in kernels.backends()["cuda"] or "numba.cuda" in kernels.backends()["cuda"]
    q, k, v = _qkv(1, 1, 4, 4, 8, 8, torch.float32, "cpu")
    with pytest.raises((RuntimeError, ValueError)) as ei:
        kernels.attention(q, k, v, backend="cuda")
    msg = str(ei.value)
    assert "'numba'" in msg and "'torch'" in msg, msg
    assert "NUMBA_ENABLE_CUDASIM" in msg, msg
    # and "auto" quietly takes the CPU kernel instead
    assert kernels.resolve_backend("auto", q.device, q.dtype, "t") == "numba"


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [8, 16, 32, 64, 128])
def test_cuda_tiles_fit_static_shared_memory(np_dtype, block):
    # A static __shared__ declaration over 48 KiB does not compile for any GPU (ptxas "uses too much shared
    # data"); the simulator has no such limit, so the sizing is checked here for every head dim.
    itemsize = np.dtype(np_dtype).itemsize
    for D in range(1, ta.CUDA_MAX_HEAD_DIM + 1):
        for Dv in {1, D, ta.CUDA_MAX_HEAD_DIM}:
            bk, dmax = ta._cuda_tile_dims(np_dtype, block, D, Dv)
            assert max(D, Dv) <= dmax <= ta.CUDA_MAX_HEAD_DIM
            assert 8 <= bk <= block and block % bk == 0
            assert 2 * bk * dmax * itemsize <= ta.CUDA_STATIC_SMEM_BYTES, (D, Dv, bk, dmax)


def test_cuda_kernel_avoids_builtin_min_max():
    # numba ≥ 0.66 cannot compile two-argument min()/max() for the CUDA target (numba issue #10753); the
    # simulator runs them as plain Python, so only a real GPU would notice. Keep them out of the kernel body.
    tree = ast.parse(textwrap.dedent(inspect.getsource(ta._make_cuda_kernel)))
    kernel = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "kernel")
    used = {n.func.id for n in ast.walk(kernel) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not used & {"min", "max"}, f"builtin {sorted(used & {'min', 'max'})} in the CUDA kernel"


@needs_simulator_off
@needs_nvvm
@pytest.mark.parametrize("np_dtype, block, D", [(np.float32, 32, 64), (np.float64, 32, 128), (np.float32, 128, 128)])
def test_cuda_kernel_compiles_for_hopper(monkeypatch, np_dtype, block, D):
    """Compile the real (non-simulator) kernel to sm_90 PTX, and assemble it when ptxas is around: catches
    typing errors and shared-memory overflows that the simulator cannot, on a machine with a toolkit but no GPU."""
    import numba.cuda.dispatcher as dispatcher
    from numba import boolean, cuda, float32, float64, types

    if not hasattr(dispatcher, "get_current_device"):
        pytest.skip("this numba.cuda has no dispatcher.get_current_device to stand in for a GPU")
    # device functions (numba's own overloads) are compiled for the current device's compute capability
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: type("Dev", (), {"compute_capability": (9, 0)})())
    bk, dmax = ta._cuda_tile_dims(np_dtype, block, D, D)
    kern = ta._make_cuda_kernel(np_dtype, block, bk, dmax)
    nb = float32 if np_dtype == np.float32 else float64
    a3, a2 = types.Array(nb, 3, "C"), types.Array(nb, 2, "C")
    ptx, _ = cuda.compile_ptx(kern.py_func, (a3, a3, a3, a3, a2, nb, boolean, types.int64), cc=(9, 0))
    if np_dtype == np.float32:
        # float32 inputs, float32 arithmetic: float64 runs at a fraction of the speed on most GPUs
        f64_math = [ln for ln in ptx.splitlines() if ".f64" in ln and "cvt" not in ln]
        assert not f64_math, f64_math[:5]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    ptxas = shutil.which("ptxas") or next(
        (p for p in [os.path.join(home, "bin", "ptxas")] if os.path.exists(p)), None
    )
    if ptxas is None:
        return
    tmp = os.environ.get("TMPDIR", "/tmp")
    src = os.path.join(tmp, f"effedu_attn_{os.getpid()}_{np.dtype(np_dtype).name}_{block}_{D}.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    try:
        r = subprocess.run([ptxas, "-arch=sm_90", src, "-o", os.devnull], capture_output=True, text=True, timeout=120)
    finally:
        os.remove(src)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------------------------
# chapter 19: the backward kernels
# ------------------------------------------------------------------------------------------------------------


def _grads_vs_sdpa(q, k, v, *, causal, block_size=None, gtol=None):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    dout = torch.randn(*q.shape[:-1], v.shape[-1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = kernels.attention(q, k, v, causal=causal, backend="cuda", block_size=block_size)
    got = torch.autograd.grad(out, (q, k, v), dout.to(q.dtype).to(q.device))
    r = [x.detach().cpu().double().requires_grad_(True) for x in (q, k, v)]
    ref = torch.autograd.grad(F.scaled_dot_product_attention(*r, is_causal=causal), r, dout)
    tol = gtol or {torch.float32: dict(atol=2e-4, rtol=2e-3), torch.float64: dict(atol=1e-9, rtol=1e-8)}[q.dtype]
    for name, a, b in zip("qkv", got, ref):
        assert a.device == q.device and a.dtype == q.dtype
        torch.testing.assert_close(a.cpu(), b.to(q.dtype), **tol, msg=lambda m: f"d{name}: {m}")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("T, S, block", [(257, 257, 32), (100, 333, 64), (333, 100, 16), (1, 50, 8)])
def test_gpu_backward_matches_sdpa(dtype, causal, T, S, block):
    _grads_vs_sdpa(*_qkv(2, 3, T, S, 64, 64, dtype, "cuda", seed=T), causal=causal, block_size=block)


@gpu
@needs_gpu
def test_gpu_backward_wide_heads_and_gradcheck():
    _grads_vs_sdpa(*_qkv(1, 2, 70, 70, 128, 96, torch.float64, "cuda", seed=1), causal=True, block_size=32)
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 1, 6, 7, 4, 3, torch.float64, "cuda", seed=2))
    fn = lambda a, b, c: kernels.attention(a, b, c, causal=True, backend="cuda", block_size=8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", ["dkdv_kernel", "dq_kernel"])
def test_cuda_backward_kernels_avoid_builtin_min_max(name):
    tree = ast.parse(textwrap.dedent(inspect.getsource(ta._make_cuda_bwd_kernels)))
    kernel = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    used = {n.func.id for n in ast.walk(kernel) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not used & {"min", "max"}, f"builtin {sorted(used & {'min', 'max'})} in {name}"


@needs_simulator_off
@needs_nvvm
@pytest.mark.parametrize("np_dtype, block, D", [(np.float32, 32, 64), (np.float64, 32, 128), (np.float32, 128, 128)])
def test_cuda_backward_kernels_compile_for_hopper(monkeypatch, np_dtype, block, D):
    import numba.cuda.dispatcher as dispatcher
    from numba import boolean, cuda, float32, float64, types

    if not hasattr(dispatcher, "get_current_device"):
        pytest.skip("this numba.cuda has no dispatcher.get_current_device to stand in for a GPU")
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: type("Dev", (), {"compute_capability": (9, 0)})())
    bk, dmax = ta._cuda_tile_dims(np_dtype, block, D, D)
    dkdv, dq = ta._make_cuda_bwd_kernels(np_dtype, block, bk, dmax)
    nb = float32 if np_dtype == np.float32 else float64
    a3, a2 = types.Array(nb, 3, "C"), types.Array(nb, 2, "C")
    for kern, sig in ((dkdv, (a3, a3, a3, a3, a2, a2, a3, a3, nb, boolean, types.int64)),
                      (dq, (a3, a3, a3, a3, a2, a2, a3, nb, boolean, types.int64))):
        ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
        if np_dtype == np.float32:
            f64_math = [ln for ln in ptx.splitlines() if ".f64" in ln and "cvt" not in ln]
            assert not f64_math, f64_math[:5]
        # static shared memory of the backward: two tiles + two row vectors, within 48 KiB
        assert (2 * bk * dmax + 2 * bk) * np.dtype(np_dtype).itemsize <= ta.CUDA_STATIC_SMEM_BYTES
