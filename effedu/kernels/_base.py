"""The machinery every kernel module shares (private to ``effedu.kernels``; its names are public to the package).

Each op file (``tiled_attention.py``, ``block_sparse.py``, ``linear_attention.py``) holds the algorithm: the
torch reference, the numba kernel and the numba.cuda kernel. What is the same for all of them lives here, once:

  * which backends are live and how ``backend="auto"`` resolves (:func:`resolve_backend`, with each op's own
    dtype set: float kernels today, int8, index and sparse kernels next);
  * :func:`single_threaded_blas`: the numba kernels are parallel over tiles, so BLAS inside a tile runs on one
    thread (scoped: the previous BLAS thread count is restored on exit);
  * the CUDA limits (:data:`CUDA_MAX_GRID_Y`, :data:`CUDA_MAX_HEAD_DIM`, :data:`CUDA_STATIC_SMEM_BYTES`), one
    helper that sizes shared-memory tiles (:func:`shared_tile_dims`), one cache of compiled kernels
    (:func:`cached_kernels`) and one launcher (:func:`cuda_launch`);
  * :func:`apply_kernel`: one way to turn a backend's forward and backward into a differentiable call.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

BACKENDS = ("torch", "numba", "cuda")
FLOAT_KERNEL_DTYPES = (torch.float32, torch.float64)  # what the numba and CUDA float kernels compile for

# --------------------------------------------------------------------------------------------------------------
# backends: status and resolution
# --------------------------------------------------------------------------------------------------------------


def simulator_enabled():
    """True when numba's CUDA simulator is switched on (``NUMBA_ENABLE_CUDASIM=1`` before numba was imported)."""
    try:
        from numba import config

        return bool(config.ENABLE_CUDASIM)
    except Exception:  # pragma: no cover - numba missing
        return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


_NUMBA_POOL_STARTED = []


def start_numba_pool():
    """Start numba's thread pool once, leaving torch's thread count as it was.

    numba's OpenMP threading layer, when its pool starts, sets OpenMP's thread count to ``NUMBA_NUM_THREADS`` (all
    cores unless set). torch shares that libgomp, so under ``OMP_NUM_THREADS=1`` the first parallel numba call (or
    ``numba.get_num_threads()``) would silently give torch every core. Started here, torch's count is restored.
    """
    if _NUMBA_POOL_STARTED:
        return
    import numba

    n = torch.get_num_threads()
    numba.get_num_threads()  # launches the pool
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _NUMBA_POOL_STARTED.append(True)


def numba_status():
    """``"ok"``, or why the numba backend is unavailable (starts numba's thread pool: :func:`start_numba_pool`)."""
    try:
        import numba  # noqa: F401
        import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls BLAS through scipy)
        import threadpoolctl  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        return f"unavailable: {e} (pip install numba scipy threadpoolctl)"
    start_numba_pool()
    return "ok"


def cuda_status():
    """``"ok"`` on a real GPU that numba.cuda drives, else why not (the simulator is reported, never "ok")."""
    if simulator_enabled():
        return "simulator (NUMBA_ENABLE_CUDASIM=1: correct but slow, tests only)"
    if not torch.cuda.is_available():
        return "no GPU (torch.cuda.is_available() is False; simulator off)"
    try:
        from numba import cuda

        if not cuda.is_available():
            return "GPU seen by torch but not by numba.cuda (install the CUDA toolkit / cuda-python bindings)"
    except Exception as e:  # pragma: no cover - depends on the install
        return f"numba.cuda failed to load: {e}"
    return "ok"


def backends():
    """Which kernel backends are live here, and why not: ``{"torch": "ok", "numba": "ok", "cuda": "..."}``."""
    return {"torch": "ok", "numba": numba_status(), "cuda": cuda_status()}


def cuda_usable():
    """A real GPU that numba.cuda can drive (the simulator does not count)."""
    return cuda_status() == "ok"


def _dtype_names(dtypes):
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def resolve_backend(backend, device, dtype, where, dtypes=FLOAT_KERNEL_DTYPES):
    """Turn ``backend`` (possibly ``"auto"``) into a concrete backend name, or raise a clear error.

    ``dtypes``: the input dtypes this op's numba and CUDA kernels accept (each op passes its own set). ``"auto"``
    picks cuda for CUDA tensors on a real GPU, numba for CPU tensors of those dtypes, torch otherwise; it never
    picks the CUDA simulator.
    """
    if not isinstance(backend, str):
        raise TypeError(f"{where}: backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        if device.type == "cuda" and cuda_usable():
            return "cuda"
        if device.type == "cpu" and dtype in dtypes and numba_status() == "ok":
            return "numba"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {backend!r}; expected one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if backend in ("numba", "cuda") and dtype not in dtypes:
        raise TypeError(f"{where}: backend {backend!r} supports {_dtype_names(dtypes)}, got {dtype}; use backend='torch'")
    if backend == "numba":
        status = numba_status()
        if status != "ok":
            raise RuntimeError(f"{where}: backend 'numba' is {status}")
        if device.type != "cpu":
            raise ValueError(f"{where}: backend 'numba' needs CPU tensors, got device {device}; use 'cuda' or 'torch'")
    if backend == "cuda":
        if simulator_enabled():
            if device.type != "cpu":
                raise ValueError(f"{where}: the CUDA simulator works on CPU tensors, got device {device}")
        elif not cuda_usable():
            raise RuntimeError(
                f"{where}: backend 'cuda' is not usable here ({cuda_status()}); use backend='numba' (CPU) or "
                f"'torch', or set NUMBA_ENABLE_CUDASIM=1 before importing numba to run the kernel in the simulator"
            )
        elif device.type != "cuda":
            raise ValueError(f"{where}: backend 'cuda' needs CUDA tensors, got device {device}; move them with .cuda()")
    return backend


# --------------------------------------------------------------------------------------------------------------
# numba on the CPU: one BLAS thread inside each parallel job
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def single_threaded_blas():
    """A context in which BLAS runs on one thread (the previous thread count is restored on exit).

    The numba kernels are already parallel over (head, tile) jobs. If each job's np.dot also spawned OpenBLAS
    threads, 2 numba threads × 2 BLAS threads would fight for 2 cores (and OpenBLAS, seeing an OpenMP parallel
    region, prints "Detect OpenMP Loop" and slows down 3–5×). So: parallelism across tiles, one BLAS thread inside
    each — measured as the fastest combination (``python -m effedu.bench attention``).
    """
    return _blas_controller().limit(limits=1, user_api="blas")


# --------------------------------------------------------------------------------------------------------------
# numba.cuda: limits, tile sizes, compiled-kernel cache, launcher
# --------------------------------------------------------------------------------------------------------------

CUDA_MAX_HEAD_DIM = 128  # shared-memory tiles of the attention kernels are sized at compile time up to this
CUDA_STATIC_SMEM_BYTES = 48 * 1024  # static __shared__ memory a block may declare (every GPU since Fermi)
CUDA_MAX_GRID_Y = 65535  # the grid's y (and z) extent limit; x may reach 2³¹ − 1
CUDA_BLOCK_SIZES = (8, 16, 32, 64, 128)  # threads per block the one-thread-per-row kernels accept


def shared_tile_dims(np_dtype, rows, width, smem_elems, *, min_rows=8):
    """Compile-time tile sizes ``(R, DMAX)`` for a kernel that stages ``R``-row tiles in static shared memory.

    ``DMAX``: the column capacity, the smallest power of two ≥ ``width`` (at least 16), so a 64-wide head does
    not pay for 128 columns. ``R``: ``rows`` halved (not below ``min_rows``) until the kernel's shared arrays,
    ``smem_elems(R, DMAX)`` elements of ``np_dtype``, fit the 48 KiB a block may declare statically.
    """
    dmax = 16
    while dmax < width:
        dmax *= 2
    itemsize = np.dtype(np_dtype).itemsize
    r = rows
    while r > min_rows and smem_elems(r, dmax) * itemsize > CUDA_STATIC_SMEM_BYTES:
        r //= 2
    return r, dmax


def np_dtype_of(dtype):
    """The numpy dtype of a float32/float64 torch dtype (what the CUDA kernels are compiled for)."""
    return np.float32 if dtype == torch.float32 else np.float64


def cached_kernels(make):
    """Decorate a kernel factory ``make(np_dtype, ...)`` so each argument tuple compiles once per process."""
    return functools.lru_cache(maxsize=None)(make)


def check_cuda_grid(n_blocks, what, where):
    """Refuse a launch whose y extent (query or key tiles) exceeds the grid's limit."""
    if n_blocks > CUDA_MAX_GRID_Y:
        raise ValueError(f"{where}: {what} needs {n_blocks} thread blocks along the grid's y axis, more than its "
                         f"{CUDA_MAX_GRID_Y}; use a larger block or chunk size")


def cuda_launch(kernel, grid, block, tensors, scalars=()):
    """Launch ``kernel[grid, block](*tensors, *scalars)`` on the tensors' GPU, zero-copy through
    ``__cuda_array_interface__``, and wait for it; under the simulator, on the CPU tensors' host arrays."""
    from numba import cuda

    device = tensors[0].device
    if device.type == "cuda":
        dev = device.index if device.index is not None else torch.cuda.current_device()
        with cuda.gpus[dev]:  # launch on the tensors' GPU, not numba's default device 0
            kernel[grid, block](*[cuda.as_cuda_array(x) for x in tensors], *scalars)
        torch.cuda.synchronize(device)
    else:  # simulator: host arrays stand in for device memory
        kernel[grid, block](*[x.numpy() for x in tensors], *scalars)


# --------------------------------------------------------------------------------------------------------------
# autograd: one backend's forward and backward as one differentiable call
# --------------------------------------------------------------------------------------------------------------


class KernelFunction(torch.autograd.Function):
    """``forward(*inputs, *extras, **options) → (out, aux)`` under no_grad, saving inputs, extras, out, aux;
    ``backward(*inputs, out, aux, dout, *extras, **options) → grads of inputs``.

    ``aux`` is what the backward needs besides the output (the log-sum-exp of softmax attention, the
    denominators of linear attention) and is not differentiable. Saved: O(T·D) tensors, never a T×S matrix.
    """

    @staticmethod
    def forward(ctx, forward, backward, options, n_inputs, *tensors):
        with torch.no_grad():  # a torch reference must not record its own graph (that would store every tile)
            out, aux = forward(*tensors, **options)
        ctx.save_for_backward(*tensors, out, aux)
        ctx.backward_fn, ctx.options, ctx.n_inputs = backward, options, n_inputs
        ctx.mark_non_differentiable(aux)
        return out, aux

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _daux):
        *tensors, out, aux = ctx.saved_tensors
        inputs, extras = tensors[:ctx.n_inputs], tensors[ctx.n_inputs:]
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        grads = ctx.backward_fn(*inputs, out, aux, dout, *extras, **ctx.options)
        return (None, None, None, None, *grads, *([None] * len(extras)))


def apply_kernel(forward, backward, inputs, extras=(), **options):
    """Run one backend of an op: ``(out, aux)``, differentiable with respect to ``inputs``.

    With a ``backward`` the call goes through :class:`KernelFunction` (forward kernel, then the backward kernel
    by recomputation). With ``backward=None`` the forward is a torch reference and autograd differentiates it
    as written (what it saves is then what its torch ops save).
    """
    if backward is None:
        return forward(*inputs, *extras, **options)
    return KernelFunction.apply(forward, backward, options, len(inputs), *inputs, *extras)


__all__ = ["BACKENDS", "FLOAT_KERNEL_DTYPES", "simulator_enabled", "numba_status", "cuda_status", "backends",
           "cuda_usable", "resolve_backend", "single_threaded_blas", "CUDA_MAX_HEAD_DIM", "CUDA_STATIC_SMEM_BYTES",
           "CUDA_MAX_GRID_Y", "CUDA_BLOCK_SIZES", "shared_tile_dims", "np_dtype_of", "cached_kernels",
           "check_cuda_grid", "cuda_launch", "KernelFunction", "apply_kernel"]
