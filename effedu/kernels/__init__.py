"""The course's hot loops: one op, three backends, one signature.

    from effedu import kernels
    out = kernels.attention(q, k, v, causal=True, backend="numba")   # "torch" | "numba" | "cuda" | "auto"
    kernels.backends()   # {"torch": "ok", "numba": "ok", "cuda": "no GPU (simulator off)"}

``"auto"`` picks ``"cuda"`` for CUDA tensors on a real GPU, ``"numba"`` for float32/float64 CPU tensors, and
``"torch"`` otherwise. It never picks the CUDA simulator: under ``NUMBA_ENABLE_CUDASIM=1``
``numba.cuda.is_available()`` is True, so the simulator is only used when asked for by name (that is how the
tests exercise the CUDA kernels on machines without a GPU).

Adding a kernel for a later chapter = a new module here that reads top to bottom: the derivation, the torch
reference ``<op>_torch``, ``<op>_numba``, ``<op>_cuda`` (and ``<op>_backward_*``), then a short validating entry
point that calls :func:`resolve_backend` with the op's dtypes and :func:`apply_kernel` (``_base.py``), re-exported
here:

    kernels.block_sparse_attention(q, k, v, layout, block_size=64)      # chapter 15 (kernels/block_sparse.py)
    kernels.causal_linear_attention(phi_q, phi_k, v)                    # chapter 18 (kernels/linear_attention.py)
    kernels.lsh_chunked_attention(q, k, v, pos, bucket, chunk_size=64)  # chapter 16 (kernels/lsh_attention.py)
    kernels.csr_matmul(a_csr, b)                                        # chapter 05 (kernels/sparse_matmul.py)
    kernels.int8_matmul(a, b)              # chapter 08 (kernels/int8_matmul.py): int8 × int8 → exact int32
    kernels.moe_dispatch(x, expert_index, slot, n_experts, capacity)   # chapter 10 (kernels/moe_dispatch.py),
    kernels.moe_combine(expert_out, expert_index, slot, gate)          # tokens → (E, C, d) expert buffers → back

(``kernels.moe_dispatch`` is the function; the module is ``effedu.kernels.moe_dispatch`` for ``import``.)
"""
from __future__ import annotations

from . import block_sparse, linear_attention, lsh_attention, masking, online_softmax, sparse_matmul, tiled_attention
from ._base import BACKENDS, backends, cuda_usable, resolve_backend, simulator_enabled, single_threaded_blas
from .block_sparse import block_sparse_attention
from .int8_matmul import cpu_int8_features, int8_matmul
from .linear_attention import causal_linear_attention
from .lsh_attention import lsh_chunked_attention
from .moe_dispatch import dispatch_tensor, moe_combine, moe_dispatch
from .masking import allowed_mask, masked_softmax
from .sparse_matmul import csr_matmul, csr_matmul_parts, dense_to_csr
from .tiled_attention import DEFAULT_BLOCK, attention

__all__ = ["attention", "backends", "cuda_usable", "resolve_backend", "simulator_enabled", "single_threaded_blas",
           "BACKENDS", "DEFAULT_BLOCK", "block_sparse_attention", "causal_linear_attention", "allowed_mask",
           "masked_softmax", "tiled_attention", "block_sparse", "linear_attention",
           "masking", "online_softmax", "csr_matmul", "csr_matmul_parts", "dense_to_csr", "sparse_matmul",
           "int8_matmul", "cpu_int8_features", "moe_dispatch", "moe_combine", "dispatch_tensor",
           "lsh_attention", "lsh_chunked_attention"]
