"""``SparseLinear``: a pruned ``nn.Linear`` stored and computed in CSR form (chapter 05; survey §3.4).

After unstructured pruning most weights of a ``Linear`` are zero, yet ``nn.Linear`` still stores and multiplies all
``out × in`` of them. ``SparseLinear`` keeps only the kept weights — ``values`` (a trainable parameter, one per kept
weight), their column indices and the row offsets (buffers) — and computes

    y = x Wᵀ + b     as     yᵀ = W xᵀ    (a CSR × dense product: ``csr_matmul_parts(W, xᵀ)``) then + b

with ``effedu.kernels.sparse_matmul``. Gradients flow to ``x`` (∂L/∂xᵀ = Wᵀ ∂L/∂yᵀ, a CSR product with the
transposed pattern), to ``values`` (the SDDMM: only at the kept positions, so a pruned weight stays pruned through
training — no mask to re-apply) and to ``bias``.

Size: ``storage_bytes()`` counts values + indices + bias. The indices are int32 (as ``scipy.sparse`` uses), so a
float32 weight costs 8 bytes per kept entry against 4 dense: CSR is smaller only above 50 % sparsity (plus the
``out + 1`` offsets). Speed: see ``python -m effedu.bench prune`` — smaller is not the same as faster.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.sparse_matmul import INDEX_DTYPES, check_csr_parts, csr_matmul_parts, dense_to_csr


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` with W ``(out_features, in_features)`` held in CSR form.

    ``crow_indices`` ``(out_features + 1)`` and ``col_indices`` ``(nnz)``: int32 or int64 buffers (the pattern, fixed);
    ``values`` ``(nnz)``: the kept weights, an ``nn.Parameter``; ``bias`` ``(out_features)`` or None.
    ``backend``: the CSR kernel's (``"auto"``, ``"numba"``, ``"cuda"``, ``"torch"``). Build one from a pruned
    ``nn.Linear`` with :meth:`from_linear`.
    """

    def __init__(self, crow_indices, col_indices, values, in_features, out_features, bias=None, *, backend="auto"):
        super().__init__()
        where = "SparseLinear"
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {name} must be an int ≥ 1, got {v!r}")
        if not isinstance(backend, str):
            raise TypeError(f"{where}: backend must be a str, got {type(backend).__name__}")
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{where}: values must be a 1-D float torch.Tensor, got {type(values).__name__}")
        values = values.detach()
        # the pattern checked once (an empty (in, 0) operand stands in for the inputs to come)
        probe = torch.empty(in_features, 0, dtype=values.dtype, device=values.device)
        check_csr_parts(crow_indices, col_indices, values, probe, out_features, where=where)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (out_features,) or bias.dtype != values.dtype:
                got = type(bias).__name__ if not isinstance(bias, torch.Tensor) else (tuple(bias.shape), bias.dtype)
                raise ValueError(f"{where}: bias must be None or a tensor of shape ({out_features},) and dtype "
                                 f"{values.dtype}, got {got}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.register_buffer("crow_indices", crow_indices.detach().clone())
        self.register_buffer("col_indices", col_indices.detach().clone())
        self.values = nn.Parameter(values.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, linear, mask=None, *, backend="auto", index_dtype=torch.int32):
        """The ``SparseLinear`` of ``linear``: the weights where ``mask`` is True (default: the non-zero weights).

        ``mask``: bool ``(out_features, in_features)``, e.g. from magnitude pruning. The weights are copied; the
        result computes the same function as ``linear`` with ``weight * mask``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        if index_dtype not in INDEX_DTYPES:
            raise TypeError(f"SparseLinear.from_linear: index_dtype must be int32 or int64, got {index_dtype}")
        a = dense_to_csr(linear.weight.detach(), mask, index_dtype=index_dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(a.crow_indices(), a.col_indices(), a.values(), linear.in_features, linear.out_features, bias,
                   backend=backend)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SparseLinear: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: input must have shape (..., in_features={self.in_features}), got "
                             f"{tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise TypeError(f"SparseLinear: input dtype {x.dtype} differs from the layer's {self.values.dtype}")
        lead = x.shape[:-1]
        xt = x.reshape(-1, self.in_features).t().contiguous()  # (in, B)
        # yᵀ = W xᵀ  (out, B); indices were checked once at construction
        yt = csr_matmul_parts(self.crow_indices, self.col_indices, self.values, xt, self.out_features,
                              backend=self.backend, check_indices=False)
        y = yt.t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    # ---- views and sizes ------------------------------------------------------------------------------------

    @property
    def nnz(self):
        """Number of stored (kept) weights."""
        return int(self.values.shape[0])

    @property
    def density(self):
        """Kept fraction of the ``out × in`` weights (1 − sparsity)."""
        return self.nnz / (self.in_features * self.out_features)

    def dense_weight(self):
        """The dense ``(out, in)`` weight (zeros where pruned), differentiable w.r.t. ``values``."""
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=self.values.device), counts)
        w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        return w.index_put((rows, self.col_indices.long()), self.values)

    def mask(self):
        """The bool ``(out, in)`` pattern: True where a weight is stored."""
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=self.values.device), counts)
        m = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.values.device)
        m[rows, self.col_indices.long()] = True
        return m

    def to_linear(self):
        """A dense ``nn.Linear`` computing the same function (pruned weights as zeros)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.values.dtype,
                        device=self.values.device)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def storage_bytes(self):
        """Bytes of the CSR form: values + column indices + row offsets + bias."""
        tensors = [self.values, self.col_indices, self.crow_indices] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense_bytes(self):
        """Bytes of the equivalent dense ``nn.Linear`` (weight + bias) in the same dtype."""
        n = self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)
        return n * self.values.element_size()

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"density={self.density:.3f}, bias={self.bias is not None}, backend={self.backend!r}")


__all__ = ["SparseLinear"]
