"""``effedu.kernels.int8_matmul.int8_matmul``: int8 × int8 → exact int32, on the torch and numba backends here.

Oracles: an int64 matmul (exact for any K) and ``torch._int_mm`` (oneDNN on the CPU: no shape constraints there;
on CUDA it wants M > 16 and K, N multiples of 8). Integers have no tolerance: every comparison is ``torch.equal``.
The CUDA kernel runs in the simulator (tests/cudasim/test_int8_matmul_cudasim.py) and is compiled to sm_90 PTX
here (it must assemble, and LLVM must have turned its byte unpacking into ``dp4a``).
"""
import importlib
import os
import shutil
import subprocess

import pytest
import torch

from effedu import kernels
from effedu.kernels.int8_matmul import MAX_EXACT_K, cpu_int8_features, int8_matmul

from _gpu import gpu, needs_gpu, needs_nvvm, needs_simulator_off  # noqa: E402

# the module itself (once effedu.kernels re-exports the function int8_matmul, that name in the package is the function)
im = importlib.import_module("effedu.kernels.int8_matmul")

CPU_BACKENDS = ["torch", "numba"]


def _int8(shape, seed, lo=-128, hi=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int8)


def _exact(a, b):
    return a.to(torch.int64) @ b.to(torch.int64)


def _check(c, a, b):
    assert c.dtype == torch.int32 and c.shape == (a.shape[0], b.shape[1]) and not c.requires_grad
    assert torch.equal(c.to(torch.int64), _exact(a, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (7, 33, 129), (129, 7, 33), (33, 129, 7), (1, 1000, 1),
                                     (65, 257, 130)])
def test_exact_against_int64_and_int_mm(backend, M, K, N):
    a, b = _int8((M, K), M + K), _int8((K, N), K + N + 1)
    c = int8_matmul(a, b, backend=backend)
    _check(c, a, b)
    assert torch.equal(c, torch._int_mm(a, b))  # oneDNN's int8 GEMM (CPU: any shape)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int_mm_shapes_of_the_cuda_rules(backend):
    # the shapes torch._int_mm accepts everywhere (CUDA: M > 16, K and N multiples of 8)
    a, b = _int8((24, 64), 3), _int8((64, 40), 4)
    assert torch.equal(int8_matmul(a, b, backend=backend), torch._int_mm(a, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extremes_at_the_largest_exact_k(backend):
    # K = 131071 products of (−128)(−128) = 2¹⁴: 2³¹ − 2¹⁴, the largest sum int32 must hold exactly
    K = MAX_EXACT_K
    assert K == 131071 and K * 128 * 128 <= 2**31 - 1 < (K + 1) * 128 * 128
    a = torch.full((2, K), -128, dtype=torch.int8)
    a[1] = 127
    b = torch.full((K, 3), -128, dtype=torch.int8)
    b[:, 1] = 127
    b[::2, 2] = 127  # alternating signs: partial sums swing, the total is small
    c = int8_matmul(a, b, backend=backend)
    _check(c, a, b)
    assert c[0, 0] == K * 16384 == 2**31 - 2**14 and c[1, 1] == K * 127 * 127 and c[0, 1] == -K * 128 * 127


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_extreme_values_in_small_odd_shapes(backend):
    vals = torch.tensor([-128, 127, -1, 0, 1, -127], dtype=torch.int8)
    g = torch.Generator().manual_seed(5)
    a = vals[torch.randint(0, 6, (17, 31), generator=g)]
    b = vals[torch.randint(0, 6, (31, 9), generator=g)]
    _check(int8_matmul(a, b, backend=backend), a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    a = _int8((40, 23), 7).t()  # (23, 40), strided
    b = _int8((50, 40), 8)[::2].t()  # (40, 25), strided both ways
    _check(int8_matmul(a, b, backend=backend), a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M, K, N", [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)])
def test_zero_sizes(backend, M, K, N):
    a, b = torch.zeros((M, K), dtype=torch.int8), torch.zeros((K, N), dtype=torch.int8)
    c = int8_matmul(a, b, backend=backend)
    assert c.dtype == torch.int32 and c.shape == (M, N) and (c == 0).all()


def test_auto_picks_numba_for_cpu_int8_and_matches_torch():
    a, b = _int8((19, 45), 1), _int8((45, 21), 2)
    assert torch.equal(int8_matmul(a, b), int8_matmul(a, b, backend="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8, torch.int16, torch.int32])
@pytest.mark.parametrize("which", ["a", "b"])
def test_wrong_dtype_is_a_type_error_naming_the_argument(dtype, which):
    a, b = _int8((3, 4), 0), _int8((4, 5), 1)
    if which == "a":
        a = a.to(dtype)
    else:
        b = b.to(dtype)
    with pytest.raises(TypeError, match=rf"int8_matmul: {which} must have dtype torch.int8, got {dtype}"):
        int8_matmul(a, b, backend="numba")


def test_float_input_says_to_quantize_first():
    with pytest.raises(TypeError, match=r"a must have dtype torch.int8.*effedu.general.quantize.quantize"):
        int8_matmul(torch.randn(3, 4), _int8((4, 5), 1))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="b must be a torch.Tensor of dtype torch.int8, got list"):
        int8_matmul(_int8((2, 2), 0), [[1, 2], [3, 4]])


def test_shape_errors():
    with pytest.raises(ValueError, match=r"a must be 2-D, got shape \(4,\)"):
        int8_matmul(_int8((4,), 0), _int8((4, 5), 1))
    with pytest.raises(ValueError, match=r"b must be 2-D, got shape \(2, 4, 5\)"):
        int8_matmul(_int8((3, 4), 0), _int8((2, 4, 5), 1))
    with pytest.raises(ValueError, match=r"inner dimensions differ: a is \(3, 4\).*b is \(5, 6\)"):
        int8_matmul(_int8((3, 4), 0), _int8((5, 6), 1))


def test_k_overflow_is_refused():
    K = MAX_EXACT_K + 1
    a, b = torch.zeros((1, K), dtype=torch.int8), torch.zeros((K, 1), dtype=torch.int8)
    for backend in ("torch", "numba", "auto"):
        with pytest.raises(ValueError, match=rf"K = {K} > {MAX_EXACT_K}.*overflow int32"):
            int8_matmul(a, b, backend=backend)


def test_different_devices_are_refused():
    a = _int8((3, 4), 0)
    b = _int8((4, 5), 1).to("meta")
    with pytest.raises(ValueError, match="a and b must be on the same device, got a on cpu and b on meta"):
        int8_matmul(a, b)


def test_backend_errors():
    a, b = _int8((3, 4), 0), _int8((4, 5), 1)
    with pytest.raises(ValueError, match="unknown backend 'blas'"):
        int8_matmul(a, b, backend="blas")
    with pytest.raises(TypeError, match="backend must be a str"):
        int8_matmul(a, b, backend=None)


@needs_simulator_off
def test_cuda_backend_without_a_gpu_says_why():
    if kernels.cuda_usable():
        pytest.skip("a real GPU is here: tests/test_gpu*.py cover it")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable here"):
        int8_matmul(_int8((3, 4), 0), _int8((4, 5), 1), backend="cuda")


def test_pack_int8_rows_little_endian_words_zero_padded():
    x = torch.tensor([[1, -2, 3, -128, 127]], dtype=torch.int8)
    w = im.pack_int8_rows(x)
    assert w.dtype == torch.int32 and w.shape == (1, 2)
    # word 0 holds bytes 1, −2 (0xFE), 3, −128 (0x80) from low to high; word 1 holds 127 and three zero bytes
    assert w[0, 0].item() == int.from_bytes(bytes([1, 0xFE, 3, 0x80]), "little", signed=True)
    assert w[0, 1].item() == 127


def test_cpu_int8_features_reads_the_flags():
    feats = cpu_int8_features()
    assert set(feats) <= set(im.INT8_FEATURES) and all(isinstance(v, bool) for v in feats.values())
    flags = None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    if flags is not None:  # x86 Linux: exactly the flags' verdicts
        assert feats == {name: name in flags for name in im.INT8_FEATURES}
    feats["avx2"] = "changed"  # a copy: the cached answer is not touched
    assert cpu_int8_features().get("avx2") != "changed"


@needs_simulator_off
@needs_nvvm
def test_cuda_kernel_compiles_for_hopper_with_dp4a(monkeypatch):
    """The real (non-simulator) kernel compiles to sm_90 PTX, uses dp4a, fits shared memory, and assembles."""
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda, types

    if not hasattr(dispatcher, "get_current_device"):
        pytest.skip("this numba.cuda has no dispatcher.get_current_device to stand in for a GPU")
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: type("Dev", (), {"compute_capability": (9, 0)})())
    a2 = types.Array(types.int32, 2, "C")
    ptx, _ = cuda.compile_ptx(im.make_cuda_kernel(im.CUDA_TILE).py_func, (a2, a2, a2), cc=(9, 0))
    assert "dp4a.s32.s32" in ptx  # LLVM recognised the 4 byte products + int32 accumulate
    assert not [ln for ln in ptx.splitlines() if ".f32" in ln or ".f64" in ln]  # integer arithmetic only
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    ptxas = shutil.which("ptxas") or next((p for p in [os.path.join(home, "bin", "ptxas")] if os.path.exists(p)), None)
    if ptxas is None:
        return
    src = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"effedu_int8mm_{os.getpid()}.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    try:
        r = subprocess.run([ptxas, "-arch=sm_90", "-v", src, "-o", os.devnull], capture_output=True, text=True,
                           timeout=120)
    finally:
        os.remove(src)
    assert r.returncode == 0, r.stderr


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "torch", "auto"])
@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (7, 33, 129), (129, 70, 33), (48, 1024, 40)])
def test_on_a_real_gpu_exact_against_int64_and_int_mm(backend, M, K, N):
    a, b = _int8((M, K), M + K), _int8((K, N), K + N + 1)
    c = int8_matmul(a.cuda(), b.cuda(), backend=backend)
    assert c.is_cuda and c.dtype == torch.int32
    assert torch.equal(c.cpu().to(torch.int64), _exact(a, b))
    if M > 16 and K % 8 == 0 and N % 8 == 0:  # cuBLASLt's int8 GEMM constraints
        assert torch.equal(c, torch._int_mm(a.cuda(), b.cuda()))


@gpu
@needs_gpu
def test_on_a_real_gpu_extremes_at_the_largest_exact_k():
    K = MAX_EXACT_K
    a = torch.full((17, K), -128, dtype=torch.int8, device="cuda")
    b = torch.full((K, 19), -128, dtype=torch.int8, device="cuda")
    for backend in ("cuda", "torch"):
        c = int8_matmul(a, b, backend=backend)
        assert (c == K * 16384).all()
