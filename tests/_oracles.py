"""Shared helpers for tests: per-dtype tolerances and random inputs."""
import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}


def qkv(B=2, H=3, T=17, S=None, D=8, Dv=None, dtype=torch.float32, seed=0, requires_grad=False, scale=1.0):
    S = T if S is None else S
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    k = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    v = torch.randn(B, H, S, Dv, generator=g, dtype=torch.float64).to(dtype)
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_(True)
    return q, k, v
