"""Input validation shared by every attention function and kernel.

Every public function of the course checks its inputs here and raises a ``ValueError`` / ``TypeError`` that names
the argument, the value it got and what was expected, so a learner never meets an opaque shape error deep inside
a numba kernel (or a silent wrong broadcast).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q, k, v, *, dtypes=FLOAT_DTYPES, where="attention"):
    """Check q ``(B, H, T, D)``, k ``(B, H, S, D)``, v ``(B, H, S, Dv)``; return ``(B, H, T, S, D, Dv)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{where}: {name} must have 4 dimensions (B, H, T, D), got shape {tuple(x.shape)} ({x.dim()} dims)"
            )
        if x.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{where}: {name} must have a floating dtype ({allowed}), got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{where}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{where}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{where}: batch sizes differ: q has B={B}, k has {k.shape[0]}, v has {v.shape[0]}")
    if k.shape[1] != H or v.shape[1] != H:
        raise ValueError(f"{where}: head counts differ: q has H={H}, k has {k.shape[1]}, v has {v.shape[1]}")
    if k.shape[3] != D:
        raise ValueError(f"{where}: head dims differ: q has D={D}, k has D={k.shape[3]} (q·k needs equal D)")
    S = k.shape[2]
    if v.shape[2] != S:
        raise ValueError(f"{where}: k and v must have the same length S, got k S={S}, v S={v.shape[2]}")
    if T == 0 or S == 0 or D == 0:
        raise ValueError(f"{where}: empty input: T={T}, S={S}, D={D} (each must be ≥ 1)")
    return B, H, T, S, D, v.shape[3]


def check_scale(scale, D, where="attention"):
    """Return the softmax scale: ``1/sqrt(D)`` by default, else a positive finite float."""
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{where}: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"{where}: scale must be a positive finite number, got {scale}")
    return scale


def check_mask(mask, B, H, T, S, where="attention"):
    """A boolean mask broadcastable to ``(B, H, T, S)``; True = may attend. Returns it viewed as 4-D."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: mask must be a boolean torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: mask must have dtype torch.bool (True = may attend), got {mask.dtype}")
    if mask.dim() > 4 or mask.dim() < 1:
        raise ValueError(
            f"{where}: mask must be broadcastable to (B, H, T, S)=({B}, {H}, {T}, {S}), "
            f"got shape {tuple(mask.shape)}"
        )
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    for got, want, name in zip(m.shape, (B, H, T, S), "BHTS"):
        if got not in (1, want):
            raise ValueError(
                f"{where}: mask of shape {tuple(mask.shape)} does not broadcast to (B, H, T, S)=({B}, {H}, {T}, {S}) "
                f"(dimension {name}: got {got}, expected 1 or {want})"
            )
    return m


def check_positive_int(value, name, where):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{where}: {name} must be a positive int, got {value}")
    return value


def check_tokens(tokens, config, where, *, values=None):
    """Token ids ``(B, T)`` for a model with ``config.vocab_size`` and ``config.max_len``; returns ``(B, T)``.

    The range of the ids is a *value* check: ``min()``/``max()`` on a GPU tensor waits for the GPU. It is worth it
    where it protects from a silent wrong answer — an id ≥ vocab_size is an IndexError on the CPU but garbage or a
    device-side assert (which kills the CUDA context) on a GPU. ``values=None`` checks on the CPU, where it costs no
    sync, and skips elsewhere; ``values=True`` always checks (the Transformer does on its first forward on a device,
    which catches a tokenizer / vocab_size mismatch at once), ``values=False`` never.
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{where}: tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: tokens must be an integer tensor (int64), got {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"{where}: tokens must be (B, T), got shape {tuple(tokens.shape)}")
    B, T = tokens.shape
    if T == 0 or B == 0:
        raise ValueError(f"{where}: empty batch or sequence (T ≥ 1 needed), got tokens of shape {tuple(tokens.shape)}")
    if T > config.max_len:
        raise ValueError(f"{where}: sequence length T={T} exceeds max_len={config.max_len}")
    if values if values is not None else tokens.device.type == "cpu":
        lo, hi = torch.aminmax(tokens)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(
                f"{where}: token ids must lie in [0, vocab_size={config.vocab_size}), got min {lo}, max {hi}"
            )
    return B, T


def check_seed(seed, where):
    """A seed for a local generator: a non-negative int (``bool`` refused). Returns it."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{where}: seed must be a non-negative int, got {seed}")
    return seed


def check_choice(value, choices, what, where):
    """``value`` must be a str and one of ``choices`` (a registry's keys); ``what`` names it in the message."""
    if not isinstance(value, str):
        raise TypeError(f"{where}: {what} must be a str, one of {', '.join(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{where}: unknown {what} {value!r}; expected one of {', '.join(choices)}")
    return value


def check_bool(value, name, where):
    """``value`` must be a real ``bool`` (not 0/1, not None). Returns it."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_int(value, name, where, *, minimum=1):
    """An int (not a bool) ≥ ``minimum``; returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be an int ≥ {minimum}, got {value}")
    return value


def check_batch(batch, where):
    """``batch`` = an ``effedu.data.Batch`` or an ``(inputs, targets)`` pair of tensors with one batch dimension;
    returns ``(inputs, targets)``."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{where}: batch must be a Batch or an (inputs, targets) pair of tensors, got {type(batch).__name__}")
    inputs, targets = batch
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: batch {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{where}: batch {name} must have a batch dimension, got a 0-d tensor")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{where}: inputs and targets must have the same batch size, got {inputs.shape[0]} and {targets.shape[0]}"
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{where}: empty batch (batch size 0)")
    return inputs, targets
