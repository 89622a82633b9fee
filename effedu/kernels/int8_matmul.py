"""int8 × int8 → exact int32 matrix products: the arithmetic under every int8-quantised Linear (chapter 08; §3.6).

Symmetric int8 quantisation (``effedu.general.quantize``) writes a weight as ``W ≈ s_W · Q_W`` and an activation as
``x ≈ s_x · Q_x`` with integer ``Q`` in [−127, 127] (int8 also holds −128). The product then splits into an
*integer* matrix product and one float rescale per output (Jacob et al. 2018, *Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference*):

    y_ij = Σ_k x_ik W_kj ≈ s_x,i · s_W,j · C_ij,        C_ij = Σ_k Q_x,ik · Q_W,kj      (this kernel: C)

``C`` is computed **exactly** in int32: each product |Q_x · Q_W| ≤ 128 · 128 = 16384 = 2¹⁴, so a sum of ``K``
of them fits int32 (|C| ≤ 2³¹ − 1) whenever

    K ≤ MAX_EXACT_K = ⌊(2³¹ − 1) / 2¹⁴⌋ = 131 071

(the extreme: K copies of (−128)·(−128)). Larger K is refused with a ValueError rather than silently wrapped
around — split K into chunks and add the int32 (or int64) partial products yourself. Integers have no gradient:
``int8_matmul`` is **not differentiable** (quantisation-aware training differentiates the float fake-quantised
model through a straight-through estimator instead, ``effedu.general.quantize.fake_quantize``).

Why int8 can be faster than float32: a 256-bit register holds 32 int8 values but only 8 float32, and memory
traffic is 4× smaller. Whether it *is* faster depends on the instructions the CPU has (:func:`cpu_int8_features`):

  * ``avx2``: ``vpmaddubsw`` / ``vpmaddwd`` multiply 16-bit pairs and add neighbours into int32 (what this module's
    numba kernel gets from LLVM's vectoriser: sign-extend int8 → int16/int32, multiply, add);
  * ``avx512_vnni`` / ``avx_vnni``: ``vpdpbusd`` does 4 int8 products + accumulate into int32 in one instruction
    (oneDNN's int8 GEMM behind ``torch._int_mm`` uses it);
  * ``amx_int8``: tile matrix multiply units (Sapphire Rapids and later), another order of magnitude.

Without VNNI, oneDNN's int8 path may even be slower than float32 sgemm — measure it
(``python -m effedu.bench quantize``).

Backends (one signature, as every kernel here):

  * ``"torch"`` — the reference in tensor ops: widen to int32 and ``@`` on the CPU; on a GPU (where integer
    ``matmul`` is not implemented) a float64 ``@``, which is also exact: every partial sum is an integer of
    magnitude < 2³¹ < 2⁵³ (float64's exact-integer range). ``torch._int_mm`` is *not* used: it is the oracle of
    the tests and the "production" comparison of the notebook and benchmark.
  * ``"numba"`` — CPU, ``b`` transposed once (O(K·N)) so both operands of every dot product are contiguous int8
    rows; ``prange`` over (32-row × 128-column) tiles of C (a tile's 128 rows of ``bᵀ`` stay in L2); the inner
    ``Σ_k int32(a_ik) · int32(bᵀ_jk)`` loop is vectorised by LLVM (sign-extending loads, ``vpmulld``/``vpmaddwd``,
    int32 adds).
  * ``"cuda"`` — numba.cuda, 16 × 16 output tiles, one thread per output. Operands are **packed 4 int8 to an
    int32 word** (K padded with zeros to a multiple of 4), as ``dp4a`` consumes them: a 16 × 16-word shared tile
    covers 64 values of K, and each thread's inner step unpacks 4 signed bytes of a word pair
    (``((w >> 8t) & 0xFF) ^ 0x80) − 0x80``) and accumulates their 4 products in int32. numba.cuda exposes no
    ``dp4a`` intrinsic, but it needs none: LLVM's NVPTX backend recognises this unpack-multiply-add of 4 byte
    pairs and emits one ``dp4a.s32.s32`` per word pair (sm_61 and later; the compile-to-PTX test checks it).
"""
from __future__ import annotations

import functools
import math

import torch
from numba import cuda, int32, njit, prange

from ._base import cached_kernels, check_cuda_grid, cuda_launch, resolve_backend

INT8_DTYPES = (torch.int8,)  # what the numba and CUDA kernels accept (the dtype set given to resolve_backend)
MAX_PRODUCT = 128 * 128  # largest |a·b| of two int8 values: (−128)·(−128) = 16384 = 2¹⁴
MAX_EXACT_K = (2**31 - 1) // MAX_PRODUCT  # 131071: K products of 2¹⁴ fit int32 (2³¹ − 1) for K up to this
NUMBA_TILE_M, NUMBA_TILE_N = 32, 128  # rows of a × rows of bᵀ per parallel job of the numba kernel
CUDA_TILE = 16  # 16 × 16 threads per block, one output each; a shared tile holds 16 words = 64 int8 of K
INT8_FEATURES = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")


# --------------------------------------------------------------------------------------------------------------
# which int8 instructions this CPU has
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cpu_int8_features():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple((name, name in flags) for name in INT8_FEATURES)
    except OSError:
        pass
    try:  # not Linux: ask LLVM (numba's compiler) what the host CPU supports
        import llvmlite.binding as ll

        feats = ll.get_host_cpu_features()
        names = {"avx2": "avx2", "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni", "amx_int8": "amx-int8"}
        return tuple((name, bool(feats.get(llvm, False))) for name, llvm in names.items())
    except Exception:
        return ()


def cpu_int8_features():
    """Which int8 SIMD features this CPU has: ``{"avx2": bool, "avx512_vnni": bool, "avx_vnni": bool,
    "amx_int8": bool}`` from ``/proc/cpuinfo``'s flags (else LLVM's host CPU features); ``{}`` if neither can be
    read. VNNI (``vpdpbusd``: 4 int8 products accumulated into int32 per instruction) and AMX are what make
    oneDNN's int8 GEMM (``torch._int_mm``) outrun float32 sgemm; with AVX2 alone it often does not.
    """
    return dict(_cpu_int8_features())


# --------------------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------------------


def check_int8_operands(a, b, where="int8_matmul"):
    """Validate ``a`` int8 ``(M, K)`` and ``b`` int8 ``(K, N)`` on one device with K ≤ MAX_EXACT_K; → (M, K, N)."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor of dtype torch.int8, got {type(x).__name__}")
        if x.dtype != torch.int8:
            hint = (" (quantize float tensors first: effedu.general.quantize.quantize(x, bits=8) gives int8 values "
                    "and their scale)") if x.is_floating_point() else ""
            raise TypeError(f"{where}: {name} must have dtype torch.int8, got {x.dtype}{hint}")
        if x.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D, got shape {tuple(x.shape)} ({x.dim()}-D)")
    if a.device != b.device:
        raise ValueError(f"{where}: a and b must be on the same device, got a on {a.device} and b on {b.device}")
    M, K = a.shape
    K2, N = b.shape
    if K != K2:
        raise ValueError(f"{where}: inner dimensions differ: a is {tuple(a.shape)} (M, K), b is {tuple(b.shape)} "
                         f"(K, N); expected b.shape[0] == a.shape[1] == {K}")
    if K > MAX_EXACT_K:
        raise ValueError(f"{where}: K = {K} > {MAX_EXACT_K}: a sum of K int8 products (each up to 128·128 = 16384) "
                         f"could overflow int32; split K into chunks of at most {MAX_EXACT_K} and add the partial "
                         f"products in int64")
    return M, K, N


# --------------------------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------------------------


def int8_matmul_torch(a, b):
    """Reference in tensor ops: int32 ``@`` on the CPU; float64 ``@`` on a GPU (exact: |partial sums| < 2³¹ < 2⁵³)."""
    if a.device.type == "cpu":
        return a.to(torch.int32) @ b.to(torch.int32)
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


# --------------------------------------------------------------------------------------------------------------
# numba (CPU)
# --------------------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, nogil=True)
def _int8_matmul_kernel(a, bt, c, tile_m, tile_n):
    # a (M, K) int8, bt (N, K) int8 (b transposed), c (M, N) int32; one parallel job per (tile_m × tile_n) tile
    M, K = a.shape
    N = bt.shape[0]
    n_i = (M + tile_m - 1) // tile_m
    n_j = (N + tile_n - 1) // tile_n
    for t in prange(n_i * n_j):
        i0 = (t // n_j) * tile_m
        j0 = (t % n_j) * tile_n
        i1 = min(i0 + tile_m, M)
        j1 = min(j0 + tile_n, N)
        for i in range(i0, i1):
            for j in range(j0, j1):
                s = int32(0)
                for k in range(K):  # contiguous int8 × int8 → int32: LLVM vectorises this loop
                    s += int32(a[i, k]) * int32(bt[j, k])
                c[i, j] = s
    return c


def int8_matmul_numba(a, b):
    """numba CPU kernel: ``bᵀ`` made contiguous once, then parallel tiles of exact int32 dot products."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=torch.int32)
    if M == 0 or N == 0:
        return c
    a_np = a.contiguous().numpy()
    bt_np = b.t().contiguous().numpy()
    _int8_matmul_kernel(a_np, bt_np, c.numpy(), NUMBA_TILE_M, NUMBA_TILE_N)
    return c


# --------------------------------------------------------------------------------------------------------------
# numba.cuda: shared-memory tiles of int8 packed four to an int32 word
# --------------------------------------------------------------------------------------------------------------


def pack_int8_rows(x):
    """``(R, K)`` int8 → ``(R, ⌈K/4⌉)`` int32, 4 consecutive values of a row per word (byte t = value 4w + t, little
    endian), K padded with zeros (which add nothing to a dot product)."""
    R, K = x.shape
    K4 = math.ceil(K / 4)
    padded = torch.zeros((R, 4 * K4), dtype=torch.int8, device=x.device)
    padded[:, :K] = x
    return padded.view(torch.int32)


@cached_kernels
def make_cuda_kernel(tile):
    """The numba.cuda kernel for ``tile × tile`` thread blocks (compiled once per tile size)."""
    TILE = tile
    PAD = tile + 1  # a compile-time constant (shared array shapes must be)

    @cuda.jit(device=True, inline=True)
    def dot4(x, y):
        # the 4 signed bytes of each word: ((w >> 8t) & 0xFF) ^ 0x80) − 0x80 sign-extends byte t
        s = int32(0)
        for t in range(4):
            xa = ((x >> (8 * t)) & 0xFF) ^ 0x80
            ya = ((y >> (8 * t)) & 0xFF) ^ 0x80
            s += int32((xa - 0x80) * (ya - 0x80))
        return s

    @cuda.jit
    def kernel(a4, bt4, c):
        # a4 (M, K4) and bt4 (N, K4): int32 words of 4 int8; c (M, N) int32. Block (TILE, TILE) → a C tile.
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row = cuda.blockIdx.y * TILE + ty
        col = cuda.blockIdx.x * TILE + tx
        M = a4.shape[0]
        N = bt4.shape[0]
        K4 = a4.shape[1]
        # one padding column: threads of a warp read a_sh[ty, w] / b_sh[tx, w] along a column without bank clashes
        a_sh = cuda.shared.array((TILE, PAD), dtype=int32)
        b_sh = cuda.shared.array((TILE, PAD), dtype=int32)
        b_row = cuda.blockIdx.x * TILE + ty  # the bᵀ row this thread stages (coalesced along tx)
        acc = int32(0)
        for w0 in range(0, K4, TILE):
            w = w0 + tx
            a_sh[ty, tx] = a4[row, w] if row < M and w < K4 else int32(0)
            b_sh[ty, tx] = bt4[b_row, w] if b_row < N and w < K4 else int32(0)
            cuda.syncthreads()
            for ww in range(TILE):
                acc += dot4(a_sh[ty, ww], b_sh[tx, ww])
            cuda.syncthreads()
        if row < M and col < N:
            c[row, col] = acc

    return kernel


def int8_matmul_cuda(a, b):
    """numba.cuda kernel; CUDA tensors in and out (CPU tensors only under the simulator)."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.zeros((M, N), dtype=torch.int32, device=a.device)
    if M == 0 or N == 0 or K == 0:
        return c
    grid = (math.ceil(N / CUDA_TILE), math.ceil(M / CUDA_TILE))  # columns on x (≤ 2³¹ − 1), rows on y (≤ 65535)
    check_cuda_grid(grid[1], f"M = {M} rows ({grid[1]} tiles of {CUDA_TILE})", "int8_matmul(backend='cuda')")
    a4 = pack_int8_rows(a.contiguous())
    bt4 = pack_int8_rows(b.t().contiguous())
    cuda_launch(make_cuda_kernel(CUDA_TILE), grid, (CUDA_TILE, CUDA_TILE), (a4, bt4, c))
    return c


INT8_MATMUL = {"torch": int8_matmul_torch, "numba": int8_matmul_numba, "cuda": int8_matmul_cuda}


# --------------------------------------------------------------------------------------------------------------
# the public entry point
# --------------------------------------------------------------------------------------------------------------


def int8_matmul(a, b, *, backend="auto"):
    """Exact integer matrix product of int8 matrices: ``a`` ``(M, K)`` × ``b`` ``(K, N)`` → int32 ``(M, N)``.

    ``backend``: ``"auto"`` (cuda for CUDA tensors on a real GPU, numba for CPU tensors, else torch), ``"torch"``
    (the reference in tensor ops), ``"numba"`` (CPU) or ``"cuda"`` (numba.cuda; under ``NUMBA_ENABLE_CUDASIM=1``
    the simulator on CPU tensors). Every backend is exact (int32 accumulation) for K ≤ :data:`MAX_EXACT_K`
    (131 071); larger K raises ValueError. Zero-sized M, K or N are fine (K = 0 gives zeros).

    **Not differentiable**: integer tensors carry no gradient (for training, fake-quantise in float with a
    straight-through estimator: ``effedu.general.quantize.fake_quantize``). A float ``a`` or ``b`` raises a
    TypeError: quantize it first (``effedu.general.quantize.quantize(x, bits=8)``), then rescale the int32 result
    by the two scales.
    """
    where = "int8_matmul"
    check_int8_operands(a, b, where)
    name = resolve_backend(backend, a.device, a.dtype, where, dtypes=INT8_DTYPES)
    with torch.no_grad():
        return INT8_MATMUL[name](a, b)


__all__ = ["int8_matmul", "int8_matmul_torch", "int8_matmul_numba", "int8_matmul_cuda", "INT8_MATMUL",
           "check_int8_operands", "cpu_int8_features", "pack_int8_rows", "make_cuda_kernel", "INT8_DTYPES", "MAX_EXACT_K",
           "MAX_PRODUCT", "INT8_FEATURES", "NUMBA_TILE_M", "NUMBA_TILE_N", "CUDA_TILE"]
