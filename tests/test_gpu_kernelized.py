"""``causal_linear_attention(backend="cuda")`` on a real GPU, and compile-time checks of its kernels that run anywhere.

``@pytest.mark.gpu`` tests run only where ``kernels.cuda_usable()`` is True (a GPU numba.cuda can drive; the simulator
does not count). The rest runs here, simulator off: the three block-scan kernels compile to sm_90 PTX (and assemble
with ptxas when it is installed), use float32 arithmetic for float32 inputs, keep builtin min/max out of their
bodies, and size their shared tiles within 48 KiB.
"""
import ast
import inspect
import os
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import torch

from effedu import kernels
from effedu.attention import kernelized as K
from effedu.kernels import linear_attention as la

from _gpu import HAVE_GPU, gpu, needs_gpu, needs_nvvm, needs_simulator_off  # noqa: E402,F401
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.float64: dict(atol=1e-10, rtol=1e-9)}


def _features(B, H, T, M, Dv, dtype, device, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(B, H, T, M, generator=g, dtype=torch.float64), torch.rand(B, H, T, M, generator=g, dtype=torch.float64),
          torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)]
    xs = [x.to(dtype=dtype, device=device) for x in xs]
    if requires_grad:
        for x in xs:
            x.requires_grad_(True)
    return xs


# ------------------------------------------------------------------------------------------------------------
# on a real GPU
# ------------------------------------------------------------------------------------------------------------


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("T, M, Dv, chunk", [(1, 8, 8, None), (257, 64, 64, None), (1000, 33, 17, 16), (300, 128, 127, 64)])
def test_gpu_values_and_gradients_match_naive(dtype, T, M, Dv, chunk):
    a, b, v = _features(2, 3, T, M, Dv, dtype, "cuda", requires_grad=True)
    w = torch.randn(2, 3, T, Dv, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).cuda()
    out = kernels.causal_linear_attention(a, b, v, backend="cuda", chunk_size=chunk)
    assert out.is_cuda and out.dtype == dtype
    g = torch.autograd.grad((out * w).sum(), (a, b, v))
    a64, b64, v64 = (x.detach().cpu().double().requires_grad_(True) for x in (a, b, v))
    ref = K.linear_attention_naive(a64, b64, v64, causal=True)
    g_ref = torch.autograd.grad((ref * w.cpu().double()).sum(), (a64, b64, v64))
    torch.testing.assert_close(out.cpu(), ref.to(dtype), **TOL[dtype])
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x.cpu(), y.to(dtype), **TOL[dtype])


@gpu
@needs_gpu
def test_gpu_auto_picks_cuda_and_agrees_with_numba():
    a, b, v = _features(1, 8, 2048, 64, 64, torch.float32, "cuda", seed=2)
    out = kernels.causal_linear_attention(a, b, v)
    ref = kernels.causal_linear_attention(a.cpu(), b.cpu(), v.cpu(), backend="numba")
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


@gpu
@needs_gpu
def test_gpu_linear_attention_model_step():
    from effedu.model import Transformer, TransformerConfig

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=16, d_model=64, n_heads=4, attention="linear")).cuda()
    tokens = torch.randint(0, 16, (4, 200), device="cuda")
    model(tokens).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------------------
# without a GPU (simulator off): compile-time checks
# ------------------------------------------------------------------------------------------------------------


def test_cuda_kernels_avoid_builtin_min_max():
    # numba ≥ 0.66 cannot compile two-argument min()/max() for CUDA (numba issue #10753); the simulator runs them
    # as plain Python, so only a real GPU would notice
    tree = ast.parse(textwrap.dedent(inspect.getsource(la._make_cuda_kernels)))
    bodies = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name != "_make_cuda_kernels"]
    assert {b.name for b in bodies} == {"chunk_sums", "scan", "outputs"}
    for body in bodies:
        used = {n.func.id for n in ast.walk(body) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not used & {"min", "max"}, f"builtin {sorted(used & {'min', 'max'})} in {body.name}"


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk", [8, 16, 32, 64, 128])
def test_cuda_tiles_fit_static_shared_memory(np_dtype, chunk):
    itemsize = np.dtype(np_dtype).itemsize
    for width in range(1, la.CUDA_MAX_DIM + 1):
        C, dmax = la._cuda_dims(np_dtype, chunk, width)
        assert width <= dmax <= la.CUDA_MAX_DIM and 4 <= C <= chunk
        assert (2 * C * dmax + C * C) * itemsize <= la.CUDA_STATIC_SMEM_BYTES, (width, C, dmax)


@needs_simulator_off
@needs_nvvm
@pytest.mark.parametrize("np_dtype, width", [(np.float32, 65), (np.float64, 65), (np.float32, 256)])
def test_cuda_kernels_compile_for_hopper(monkeypatch, np_dtype, width):
    """Compile the three real (non-simulator) kernels to sm_90 PTX and assemble them when ptxas is around."""
    import numba.cuda.dispatcher as dispatcher
    from numba import boolean, cuda, float32, float64, types

    if not hasattr(dispatcher, "get_current_device"):
        pytest.skip("this numba.cuda has no dispatcher.get_current_device to stand in for a GPU")
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: type("Dev", (), {"compute_capability": (9, 0)})())
    C, dmax = la._cuda_dims(np_dtype, 32, width)
    chunk_sums, scan, outputs = la._make_cuda_kernels(np_dtype, C, dmax)
    nb = float32 if np_dtype == np.float32 else float64
    a3, a4 = types.Array(nb, 3, "C"), types.Array(nb, 4, "C")
    sigs = {chunk_sums: (a3, a3, a4), scan: (a4, boolean), outputs: (a3, a3, a3, a4, a3, boolean)}
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    ptxas = shutil.which("ptxas") or next((p for p in [os.path.join(home, "bin", "ptxas")] if os.path.exists(p)), None)
    for kern, sig in sigs.items():
        ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
        if np_dtype == np.float32:
            # float32 inputs, float32 arithmetic (float64 runs at a fraction of the speed on most GPUs)
            f64_math = [ln for ln in ptx.splitlines() if ".f64" in ln and "cvt" not in ln]
            assert not f64_math, (kern.py_func.__name__, f64_math[:5])
        if ptxas is None:
            continue
        src = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                           f"effedu_linattn_{os.getpid()}_{kern.py_func.__name__}_{np.dtype(np_dtype).name}_{width}.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        try:
            r = subprocess.run([ptxas, "-arch=sm_90", src, "-o", os.devnull], capture_output=True, text=True, timeout=120)
        finally:
            os.remove(src)
        assert r.returncode == 0, r.stderr
