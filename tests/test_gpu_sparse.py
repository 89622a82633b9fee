"""The block-sparse CUDA kernels on a real GPU, and the compile-time checks that run without one.

``@pytest.mark.gpu`` tests run only where ``kernels.cuda_usable()`` is True (a GPU numba.cuda can drive; the
simulator does not count). The simulator tests are in ``tests/cudasim/test_block_sparse_cudasim.py``. Here, on any
machine: the three kernels (forward, dQ, dK/dV) compile to sm_90 PTX with float32-only arithmetic for float32
inputs, their tiles fit 48 KiB of static shared memory, and their bodies avoid builtin ``min``/``max``.
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

from effedu import kernels
from effedu.attention import sparse as sp
from effedu.attention.dense import softmax_attention
from effedu.kernels import block_sparse as bsk

from _gpu import HAVE_GPU, gpu, needs_gpu, needs_nvvm, needs_simulator_off  # noqa: E402,F401

TOL = {torch.float32: dict(atol=3e-5, rtol=3e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}


def _qkv(B, H, T, S, D, Dv, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, H, n, d, generator=g, dtype=torch.float64) for n, d in ((T, D), (S, D), (S, Dv))]
    return tuple(x.to(dtype=dtype, device=device).requires_grad_(True) for x in xs)


def _oracle(q, k, v, layout, b, causal):
    """Dense masked softmax attention in float64 on the CPU (no TF32), its lse, and its gradients for ``dout``."""
    T, S = q.shape[2], k.shape[2]
    lay = layout.cpu() if layout.dim() == 3 else layout.cpu().unsqueeze(0)
    mask = bsk.layout_to_mask(lay, b, T, S).unsqueeze(0)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_(True) for x in (q, k, v))
    out = softmax_attention(q64, k64, v64, mask=mask, causal=causal)
    s = (q64 @ k64.transpose(-2, -1)) * q.shape[-1] ** -0.5
    allowed = mask & torch.ones(T, S, dtype=torch.bool).tril() if causal else mask
    lse = torch.logsumexp(s.masked_fill(~allowed, -math.inf), dim=-1)
    return out, lse, (q64, k64, v64)


def _check(q, k, v, layout, b, causal):
    out, lse = kernels.block_sparse_attention(q, k, v, layout, block_size=b, causal=causal, backend="cuda",
                                              return_lse=True)
    assert out.is_cuda and out.dtype == q.dtype
    ref, ref_lse, inputs64 = _oracle(q, k, v, layout, b, causal)
    torch.testing.assert_close(out.detach().cpu(), ref.detach().to(q.dtype), **TOL[q.dtype])
    torch.testing.assert_close(lse.cpu(), ref_lse.detach().to(q.dtype), **TOL[q.dtype])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), g.to(device=q.device, dtype=q.dtype))
    ref_grads = torch.autograd.grad(ref, inputs64, g)
    for a, r in zip(grads, ref_grads):
        assert a.is_cuda and torch.isfinite(a).all()
        torch.testing.assert_close(a.cpu(), r.to(q.dtype), **TOL[q.dtype])


# ------------------------------------------------------------------------------------------------------------
# on a real GPU
# ------------------------------------------------------------------------------------------------------------


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_gpu_longformer_layout_matches_the_oracle(dtype, causal, block):
    q, k, v = _qkv(2, 4, 300, 300, 64, 64, dtype, "cuda")  # partial last block
    layout = sp.longformer_layout(300, block, 80, global_tokens=block)
    _check(q, k, v, layout, block, causal)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gpu_per_head_bigbird_t_ne_s_wide_heads(dtype):
    q, k, v = _qkv(1, 3, 200, 130, 128, 40, dtype, "cuda", seed=1)
    layout = torch.stack([sp.bigbird_layout(200, 32, S=130, random_blocks=1, seed=h) for h in range(3)])
    _check(q, k, v, layout, 32, causal=False)
    _check(q, k, v, layout, 32, causal=True)


@gpu
@needs_gpu
def test_gpu_auto_picks_cuda_and_agrees_with_numba():
    q, k, v = _qkv(1, 8, 1024, 1024, 64, 64, torch.float32, "cuda", seed=2)
    layout = sp.longformer_layout(1024, 64, 256, global_tokens=128)
    with torch.no_grad():
        auto = kernels.block_sparse_attention(q, k, v, layout, block_size=64)
        cpu = kernels.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), layout, block_size=64, backend="numba")
    assert auto.is_cuda
    torch.testing.assert_close(auto.cpu(), cpu, **TOL[torch.float32])


@gpu
@needs_gpu
def test_gpu_rows_without_keys_are_zero():
    q, k, v = _qkv(1, 2, 64, 64, 16, 16, torch.float32, "cuda", seed=3)
    layout = torch.zeros(2, 2, dtype=torch.bool)
    layout[1, 1] = True
    out = kernels.block_sparse_attention(q, k, v, layout, block_size=32, backend="cuda")
    assert (out[:, :, :32] == 0).all() and torch.isfinite(out).all()
    (out.sum()).backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, :32] == 0).all()


# ------------------------------------------------------------------------------------------------------------
# without a GPU: what the simulator cannot check
# ------------------------------------------------------------------------------------------------------------


def _kernel_functions():
    tree = ast.parse(textwrap.dedent(inspect.getsource(bsk._make_cuda_kernels)))
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name != "_make_cuda_kernels"}


def test_cuda_kernels_avoid_builtin_min_max():
    # numba ≥ 0.66 cannot compile two-argument min()/max() for CUDA (numba issue #10753); the simulator runs them
    # as plain Python, so only a real GPU would notice
    fns = _kernel_functions()
    assert set(fns) == {"forward", "backward_dq", "backward_dkdv"}
    for name, fn in fns.items():
        used = {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not used & {"min", "max"}, f"builtin {sorted(used & {'min', 'max'})} in CUDA kernel {name}"


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", bsk.CUDA_BLOCK_SIZES)
def test_cuda_tiles_fit_static_shared_memory(np_dtype, block):
    itemsize = np.dtype(np_dtype).itemsize
    for D in (1, 16, 17, 64, 65, 100, 128):
        for Dv in (1, D, 128):
            bt, dmax = bsk.cuda_tile_dims(np_dtype, block, D, Dv)
            assert max(D, Dv) <= dmax <= 128 and 8 <= bt <= block and block % bt == 0
            assert (2 * bt * dmax + 2 * bt) * itemsize <= bsk.CUDA_STATIC_SMEM_BYTES, (D, Dv, bt, dmax)


@needs_simulator_off
@needs_nvvm
@pytest.mark.parametrize("np_dtype, block, D", [(np.float32, 64, 64), (np.float64, 32, 128), (np.float32, 128, 128),
                                                (np.float32, 8, 16)])
def test_cuda_kernels_compile_for_hopper(monkeypatch, np_dtype, block, D):
    """Compile the three real (non-simulator) kernels to sm_90 PTX, and assemble them when ptxas is around."""
    import numba.cuda.dispatcher as dispatcher
    from numba import boolean, cuda, float32, float64, int64, types, uint8

    if not hasattr(dispatcher, "get_current_device"):
        pytest.skip("this numba.cuda has no dispatcher.get_current_device to stand in for a GPU")
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: type("Dev", (), {"compute_capability": (9, 0)})())
    bt, dmax = bsk.cuda_tile_dims(np_dtype, block, D, D)
    fwd, bwd_dq, bwd_dkdv = bsk._make_cuda_kernels(np_dtype, block, bt, dmax)
    nb = float32 if np_dtype == np.float32 else float64
    a3, a2, lay = types.Array(nb, 3, "C"), types.Array(nb, 2, "C"), types.Array(uint8, 3, "C")
    sigs = {
        "forward": (fwd, (a3, a3, a3, lay, a3, a2, nb, boolean, int64)),
        "backward_dq": (bwd_dq, (a3, a3, a3, a3, a2, a2, lay, a3, nb, boolean, int64)),
        "backward_dkdv": (bwd_dkdv, (a3, a3, a3, a3, a2, a2, lay, a3, a3, nb, boolean, int64)),
    }
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    ptxas = shutil.which("ptxas") or next((p for p in [os.path.join(home, "bin", "ptxas")] if os.path.exists(p)), None)
    for name, (kern, sig) in sigs.items():
        ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
        if np_dtype == np.float32:
            # float32 inputs, float32 arithmetic (float64 is a fraction of the speed on most GPUs)
            f64_math = [ln for ln in ptx.splitlines() if ".f64" in ln and "cvt" not in ln]
            assert not f64_math, (name, f64_math[:5])
        if ptxas is None:
            continue
        src = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                           f"effedu_bs_{os.getpid()}_{name}_{np.dtype(np_dtype).name}_{block}_{D}.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        try:
            r = subprocess.run([ptxas, "-arch=sm_90", src, "-o", os.devnull], capture_output=True, text=True,
                               timeout=120)
        finally:
            os.remove(src)
        assert r.returncode == 0, (name, r.stderr)
