"""Mixed-precision training: compute in 16 bits, remember small steps in 32 (survey §3.6).

Micikevicius, Narang, Alben, Diamos, Elsen, Garcia, Ginsburg, Houston, Kuchaiev, Venkatesh & Wu, *Mixed Precision
Training* (ICLR 2018, arXiv 1710.03740). bfloat16: Kalamkar et al., *A Study of BFLOAT16 for Deep Learning
Training* (arXiv 1905.12322, 2019); the survey meets it in the Switch Transformer (§3.8).

**The formats.** A normal float is (−1)ˢ · 2ᵉ · 1.m. float16 ("half") has 5 exponent bits and 10 mantissa bits;
bfloat16 keeps float32's 8 exponent bits and only 7 mantissa bits — float32's range, far less precision:

    format     bytes  largest     smallest normal   smallest subnormal   ε = gap above 1.0
    float32    4      3.4·10³⁸    2⁻¹²⁶             2⁻¹⁴⁹                2⁻²³
    float16    2      65504       2⁻¹⁴              2⁻²⁴                 2⁻¹⁰
    bfloat16   2      3.4·10³⁸    2⁻¹²⁶             2⁻¹³³                2⁻⁷

Below the smallest normal number the *subnormals* trade mantissa bits for range (fewer significant bits the
smaller they get); below half the smallest subnormal (2⁻²⁵ for float16) a value rounds to zero: it *underflows*.
Above the largest it becomes ``inf``: it *overflows*.

**Why 16 bits at all.** Half the bytes for every activation saved for backward (usually the bulk of training
memory), half the bytes moved through memory, and on GPUs/TPUs matrix units that run 16-bit products several
times faster than float32 ones.

**Three things go wrong in 16 bits, and the paper's three fixes.**

1. *Small weight updates vanish.* w + u rounds back to w when |u| < ½·ulp(w). In bfloat16 a weight of 1.0
   ignores every update below 2⁻⁸ ≈ 0.004 (float16: below 2⁻¹¹) — late in training, with a small learning rate,
   most updates are that small. Fix: a float32 **master copy** of the weights. Forward and backward use a 16-bit
   *working copy*; the 16-bit gradients are copied (exactly) into float32, the optimizer updates the float32
   masters, and the working copy is re-made from them: w₁₆ = round₁₆(w₃₂). Small steps accumulate in w₃₂ until
   they are large enough to show in w₁₆.
2. *Gradients underflow.* The gradient of a mean loss over N tokens carries a factor 1/N, and it shrinks further
   through the layers: in float16 many activation gradients fall below 2⁻²⁴ and become 0, the rest lose
   precision as subnormals. Fix: **loss scaling**. Back-propagate S·L instead of L. The chain rule is linear, so
   every gradient is S times larger — the histogram of gradient magnitudes shifts right by log₂S, into float16's
   normal range — and dividing the float32 master gradients by S before the update gives the true gradient.
3. *Long sums need more bits.* Dot products and reductions (softmax, LayerNorm, the loss) accumulate in float32
   and round the result to 16 bits. Here the loss is computed in float32 (:func:`effedu.train.lm_loss` upcasts
   the logits) and torch's kernels accumulate matmuls and reductions in float32.

**Dynamic loss scaling.** Too small an S leaves gradients underflowing, too large a one overflows them to inf.
Start large (S = 2¹⁶); after every backward pass look at the gradients: any inf or nan → *skip this update* and
multiply S by ``backoff_factor`` (½); ``growth_interval`` clean steps in a row → multiply S by ``growth_factor``
(2). S settles just below the overflow threshold, paying one skipped step now and then. bfloat16 has float32's
exponent range: it rarely needs scaling. float16 does.

**What is here** (all from tensor ops; ``torch.autocast`` and ``torch.amp.GradScaler`` are only the oracles in
the tests and the "production" cell of the notebook):

* :func:`resolve_dtype`, :func:`format_info` (the table above, computed), :func:`underflow_report` (which fraction
  of some values becomes zero / subnormal / inf in a format, after scaling by S), :func:`lost_update_fraction`
  (which fraction of updates a 16-bit weight ignores);
* :class:`MasterWeights` — float32 masters of 16-bit parameters, and the two copies of a step;
* :class:`MixedPrecisionModel` — wraps a float32 model: its parameters *are* the masters (what an optimizer built
  on it updates, what its state_dict saves); a 16-bit working copy computes; :func:`cast_model` — the plain
  16-bit copy with no masters, for comparison;
* :class:`LossScaler` (static S) and :class:`DynamicLossScaler` (the schedule above; the same scale trajectory,
  bit for bit, as ``torch.amp.GradScaler`` for the same overflow pattern);
* :func:`mixed_precision_step` — one step of the recipe, skipping the update on overflow; pass it as
  :func:`effedu.train.train`'s ``step_fn``;
* :func:`collect_gradients` — the activation and weight gradients of one backward pass (for the histograms);
  :func:`training_bytes` — weights / gradients / activations / optimizer state of a training setup, in bytes.

**16-bit matmuls on a CPU** are emulated (float16 / bfloat16 in, float32 accumulate, 16 bits out) by
:func:`emulated_16bit_matmul`, in :mod:`effedu.general.fp16_emulation`: :class:`MixedPrecisionModel` switches it on
by itself on a CPU, and :func:`mixed_precision_step` for a 16-bit ``cast_model`` there too (torch's own CPU kernels
for these dtypes are slow without 16-bit matrix units; the precision benchmark times them).
"""
from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn as nn

from ..train import lm_loss
from .fp16_emulation import emulated_16bit_matmul, emulated_fp16_matmul

__all__ = [
    "DTYPES", "LOW_PRECISION", "resolve_dtype", "format_info", "underflow_report", "lost_update_fraction",
    "emulated_fp16_matmul", "emulated_16bit_matmul", "emulates_matmul", "MasterWeights", "MixedPrecisionModel",
    "cast_model", "LossScaler", "DynamicLossScaler", "all_finite", "mixed_precision_step", "collect_gradients", "training_bytes",
]

# --------------------------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def resolve_dtype(dtype, *, allowed=tuple(DTYPES.values()), where="resolve_dtype"):
    """A ``torch.dtype`` from a dtype or a name (``"float16"``, ``"fp16"``, ``"half"``, ``"bf16"``, ``"fp32"`` ...).

    Anything not in ``allowed`` raises a ``ValueError`` that lists what is (float64, int8, "fp8" ... are not
    mixed-precision compute types here).
    """
    names = ", ".join(_dtype_name(d) for d in allowed)
    if isinstance(dtype, str):
        key = _ALIASES.get(dtype.lower(), dtype.lower())
        if key not in DTYPES:
            raise ValueError(f"{where}: dtype must be one of {names} (or fp32/bf16/fp16/half), got {dtype!r}")
        dtype = DTYPES[key]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{where}: dtype must be a torch.dtype or its name, got {type(dtype).__name__} ({dtype!r})")
    if dtype not in allowed:
        raise ValueError(f"{where}: dtype must be one of {names}, got {_dtype_name(dtype)}")
    return dtype


def format_info(dtype):
    """The numbers that matter for mixed precision, for one format: a dict with ``bytes``, ``exponent_bits``,
    ``mantissa_bits``, ``max``, ``min_normal``, ``min_subnormal``, ``eps`` (gap between 1.0 and the next number)."""
    dtype = resolve_dtype(dtype, where="format_info")
    fi = torch.finfo(dtype)
    mantissa = round(-math.log2(fi.eps))  # ε = 2^-m
    return {
        "bytes": fi.bits // 8,
        "exponent_bits": fi.bits - 1 - mantissa,
        "mantissa_bits": mantissa,
        "max": fi.max,
        "min_normal": fi.tiny,
        # the smallest subnormal: the smallest normal number with only the last mantissa bit left, 2^(e_min − m)
        "min_subnormal": fi.tiny * fi.eps,
        "eps": fi.eps,
    }


def _check_real(value, name, where, *, positive=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{where}: {name} must be a {'positive ' if positive else ''}finite number, got {value}")
    return value


def _check_tensor(x, name, where):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    return x


@torch.no_grad()
def underflow_report(values, dtype, scale=1.0):
    """What becomes of ``scale · values`` when stored in ``dtype``, as fractions of the non-zero finite values.

    Returns ``{"zero": ..., "subnormal": ..., "normal": ..., "overflow": ...}`` (summing to 1) and ``"count"``:
    *zero* = underflowed (the information is gone), *subnormal* = kept with fewer significant bits, *overflow* =
    became ±inf. Without scaling, float16 loses the small gradients; with S = 2ᵏ the same values move k binades up.
    """
    where = "underflow_report"
    values = _check_tensor(values, "values", where)
    dtype = resolve_dtype(dtype, where=where)
    scale = _check_real(scale, "scale", where)
    v = values.detach().flatten().double()
    v = v[(v != 0) & torch.isfinite(v)]
    if v.numel() == 0:
        raise ValueError(f"{where}: values has no non-zero finite entry to classify")
    # x₁₆ = round₁₆(S · x)   (computed in float64 so that only the final rounding happens)
    stored = (v * scale).to(dtype)
    mag = stored.abs()
    n = v.numel()
    zero = int((stored == 0).sum())
    overflow = int(torch.isinf(stored).sum())
    subnormal = int(((mag > 0) & (mag < torch.finfo(dtype).tiny)).sum())
    return {"zero": zero / n, "subnormal": subnormal / n, "normal": (n - zero - overflow - subnormal) / n,
            "overflow": overflow / n, "count": n}


@torch.no_grad()
def lost_update_fraction(weights, updates, dtype):
    """Fraction of the non-zero ``updates`` that leave ``weights`` unchanged when both are stored in ``dtype``.

    ``round(w + u) == w`` whenever |u| is below half the gap between w and its neighbour: such an update is lost.
    A float32 master copy keeps it (problem 1 of the paper).
    """
    where = "lost_update_fraction"
    weights = _check_tensor(weights, "weights", where)
    updates = _check_tensor(updates, "updates", where)
    if weights.shape != updates.shape:
        raise ValueError(f"{where}: weights and updates must have one shape, got {tuple(weights.shape)} and "
                         f"{tuple(updates.shape)}")
    dtype = resolve_dtype(dtype, where=where)
    nonzero = updates != 0
    if not bool(nonzero.any()):
        raise ValueError(f"{where}: updates are all zero; nothing can be lost")
    w = weights.to(dtype)
    # w₁₆ + u₁₆, rounded to the format: equal to w₁₆ ⇔ the update was lost
    lost = ((w + updates.to(dtype)) == w) & nonzero
    return float(lost.sum()) / float(nonzero.sum())


# --------------------------------------------------------------------------------------------------------------
# float32 master weights
# --------------------------------------------------------------------------------------------------------------


class MasterWeights:
    """float32 master copies of 16-bit parameters, and the two copies that frame every update.

    ::

        masters = MasterWeights(model16.parameters())        # float32 clones (or masters=[...] to pair given ones)
        opt = torch.optim.AdamW(masters.masters, lr=1e-3)    # the optimizer updates the float32 copies
        loss_fn(model16(x)).backward()                       # 16-bit gradients on model16's parameters
        masters.grads_to_masters()                           # g₃₂ = float32(g₁₆)     (exact)
        opt.step()                                           # w₃₂ ← w₃₂ − η · update(g₃₂)
        masters.masters_to_params()                          # w₁₆ = round₁₆(w₃₂)
    """

    def __init__(self, params, masters=None):
        where = "MasterWeights"
        if isinstance(params, torch.Tensor):
            raise TypeError(f"{where}: params must be an iterable of tensors (e.g. model.parameters()), got one "
                            f"tensor; wrap it in a list")
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{where}: params is empty; expected at least one parameter")
        for i, p in enumerate(self.params):
            _check_tensor(p, f"params[{i}]", where)
        if masters is None:
            self.masters = [nn.Parameter(p.detach().to(torch.float32, copy=True), requires_grad=p.requires_grad)
                            for p in self.params]
        else:
            self.masters = list(masters)
            if len(self.masters) != len(self.params):
                raise ValueError(f"{where}: got {len(self.masters)} masters for {len(self.params)} params; "
                                 f"expected one master per parameter")
            for i, (p, m) in enumerate(zip(self.params, self.masters)):
                _check_tensor(m, f"masters[{i}]", where)
                if m.dtype != torch.float32:
                    raise TypeError(f"{where}: masters[{i}] must be float32, got {m.dtype}")
                if m.shape != p.shape:
                    raise ValueError(f"{where}: masters[{i}] has shape {tuple(m.shape)}, params[{i}] has "
                                     f"{tuple(p.shape)}; expected equal shapes")

    def grads_to_masters(self, *, free=True):
        """``master.grad = float32(param.grad)`` for every pair (None stays None). ``free`` drops the 16-bit
        gradients once copied: nothing reads them again this step."""
        for p, m in zip(self.params, self.masters):
            if p.grad is None:
                m.grad = None
                continue
            # g₃₂ = float32(g₁₆): every float16 / bfloat16 number is a float32 number, so the copy is exact
            m.grad = p.grad.detach().to(torch.float32, copy=True)
            if free:
                p.grad = None

    @torch.no_grad()
    def masters_to_params(self):
        """``param = round₁₆(master)`` in place, for every pair: the working copy of the next forward."""
        for p, m in zip(self.params, self.masters):
            p.copy_(m)

    def __len__(self):
        return len(self.params)


def _master_dtype_check(model, where):
    n = 0
    for name, p in model.named_parameters():
        n += 1
        if p.is_floating_point() and p.dtype != torch.float32:
            raise TypeError(f"{where}: the model's parameters become the float32 master weights, but {name!r} is "
                            f"{p.dtype}; pass the float32 model")
    if n == 0:
        raise ValueError(f"{where}: the model has no parameters; nothing to train in mixed precision")


class MixedPrecisionModel(nn.Module):
    """A float32 model whose forward and backward run in ``dtype`` (bfloat16 or float16).

    * ``self.master`` is the float32 model you passed: its parameters are this module's ``parameters()`` — the
      **master weights** an optimizer built on it updates, and what ``state_dict()`` saves.
    * ``self.working`` is a 16-bit copy of it that computes. Its weights are *buffers*, not parameters (derived
      state, re-made from the masters after each update; not saved): tensors that require grad, so backward fills
      their ``.grad`` in 16 bits.
    * :meth:`grads_to_masters` and :meth:`masters_to_working` are the two copies of a step
      (:class:`MasterWeights`); :func:`mixed_precision_step` does the whole step.

    Every floating input is cast to ``dtype``; the output (logits) is in ``dtype`` — compute the loss in float32
    (``effedu.train.lm_loss`` does). Shared (tied) parameters stay shared in the working copy. Move the model with
    ``.to(device)`` only: the masters must stay float32 and the compute dtype is fixed at construction.
    ``emulate_fp16_matmul`` (default: on for float16 and bfloat16 on a CPU) runs the 16-bit matmuls as described in
    :mod:`effedu.general.fp16_emulation` (float32 products and sums, rounded once to 16 bits); ``dtype=float32`` is allowed too (a plain float32 copy, for uniform code in comparisons).
    """

    def __init__(self, model, dtype=torch.bfloat16, *, emulate_fp16_matmul=None):
        super().__init__()
        where = "MixedPrecisionModel"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, MixedPrecisionModel):
            raise TypeError(f"{where}: model is already a MixedPrecisionModel; wrap the float32 model once")
        if emulate_fp16_matmul is not None and not isinstance(emulate_fp16_matmul, bool):
            raise TypeError(f"{where}: emulate_fp16_matmul must be None (auto) or a bool, got "
                            f"{type(emulate_fp16_matmul).__name__}")
        self.dtype = resolve_dtype(dtype, where=where)
        _master_dtype_check(model, where)
        self._emulate = emulate_fp16_matmul
        self.master = model
        working = copy.deepcopy(model)
        # the same module tree; in the copy, each parameter becomes a 16-bit leaf tensor registered as a buffer
        self._slots = []  # (module of the working copy, attribute name, index of its tensor)
        tensors, masters, index = [], [], {}
        for (_, w_mod), (_, m_mod) in zip(working.named_modules(remove_duplicate=False),
                                          model.named_modules(remove_duplicate=False)):
            for name, buf in list(w_mod._buffers.items()):
                if buf is not None and buf.is_floating_point():
                    w_mod._buffers[name] = buf.to(self.dtype)
            for name, p in list(w_mod._parameters.items()):
                if p is None:
                    continue
                m = m_mod._parameters[name]
                if id(m) not in index:  # a tied parameter gets one working tensor, registered where it is used
                    index[id(m)] = len(tensors)
                    tensors.append(m.detach().to(self.dtype, copy=True).requires_grad_(m.requires_grad))
                    masters.append(m)
                del w_mod._parameters[name]
                w_mod.register_buffer(name, tensors[index[id(m)]], persistent=False)
                self._slots.append((w_mod, name, index[id(m)]))
        self.working = working
        self.copies = MasterWeights(tensors, masters=masters)
        # loading masters (load_state_dict) must refresh the working copy too
        self.register_load_state_dict_post_hook(lambda module, keys: module.masters_to_working())

    # -- what the step needs ------------------------------------------------------------------------------------
    @property
    def masters(self):
        """The float32 master weights (the parameters an optimizer on this module updates)."""
        return self.copies.masters

    @property
    def working_tensors(self):
        """The 16-bit weights the forward pass uses (one per master, in the same order)."""
        return self.copies.params

    @property
    def emulate_fp16_matmul(self):
        """Whether the 16-bit matmuls (float16 or bfloat16) are emulated (the name predates bfloat16's)."""
        if self.dtype not in (torch.float16, torch.bfloat16):
            return False
        if self._emulate is not None:
            return self._emulate
        return self.masters[0].device.type == "cpu"

    def grads_to_masters(self, *, free=True):
        """Copy the 16-bit gradients of the working copy into the masters' ``.grad`` (float32)."""
        self.copies.grads_to_masters(free=free)

    def masters_to_working(self):
        """Re-make the working copy from the (updated) masters: w₁₆ = round₁₆(w₃₂)."""
        self.copies.masters_to_params()

    def forward(self, *args, **kwargs):
        cast = lambda x: x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
        args = tuple(cast(a) for a in args)
        kwargs = {k: cast(v) for k, v in kwargs.items()}
        with emulated_16bit_matmul(self.emulate_fp16_matmul):
            return self.working(*args, **kwargs)

    def zero_grad(self, set_to_none=True):
        """Clear the masters' gradients and the working copy's."""
        super().zero_grad(set_to_none=set_to_none)
        for t in self.working_tensors:
            t.grad = None

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() / .cpu() move the masters; the working copy is then re-made from them as fresh
        # leaves (nn.Module would leave buffers that require grad as non-leaf results of the move)
        out = super()._apply(fn, recurse)
        for name, p in self.master.named_parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                raise TypeError(f"MixedPrecisionModel: the master weights must stay float32 ({name!r} became "
                                f"{p.dtype}); move the model with .to(device) only: the compute dtype is fixed "
                                f"at construction (dtype={_dtype_name(self.dtype)})")
        fresh = [m.detach().to(self.dtype, copy=True).requires_grad_(m.requires_grad) for m in self.masters]
        for module, name, i in self._slots:
            module._buffers[name] = fresh[i]
        self.copies.params = fresh
        return out

    def extra_repr(self):
        return f"dtype={_dtype_name(self.dtype)}, emulate_fp16_matmul={self.emulate_fp16_matmul}"


def emulates_matmul(model):
    """Whether a step of ``model`` runs its 16-bit matmuls emulated: a :class:`MixedPrecisionModel` says so itself
    (``emulate_fp16_matmul``); any other model when its floating parameters are 16-bit on a CPU (``cast_model``)."""
    if isinstance(model, MixedPrecisionModel):
        return model.emulate_fp16_matmul
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return p is not None and p.device.type == "cpu" and p.dtype in (torch.float16, torch.bfloat16)


def cast_model(model, dtype):
    """A 16-bit copy of ``model`` *without* master weights (parameters, gradients and optimizer state all in
    ``dtype``): the baseline that shows why the masters are needed. The original is left untouched."""
    where = "cast_model"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    dtype = resolve_dtype(dtype, where=where)
    return copy.deepcopy(model).to(dtype)


# --------------------------------------------------------------------------------------------------------------
# loss scaling
# --------------------------------------------------------------------------------------------------------------


def _grads_of(params, where):
    if isinstance(params, torch.optim.Optimizer):
        params = [p for group in params.param_groups for p in group["params"]]
    elif isinstance(params, torch.Tensor):
        raise TypeError(f"{where}: params must be an iterable of tensors or an optimizer, got one tensor; wrap it "
                        f"in a list")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"{where}: params must be an iterable of tensors or an optimizer, got "
                        f"{type(params).__name__}") from None
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: params[{i}] must be a torch.Tensor, got {type(p).__name__}")
    return params


def all_finite(params):
    """True when every existing ``.grad`` of ``params`` (tensors or an optimizer) is free of inf and nan."""
    return all(bool(torch.isfinite(p.grad).all()) for p in _grads_of(params, "all_finite") if p.grad is not None)


def _check_found_inf(found_inf, where):
    if isinstance(found_inf, torch.Tensor) and found_inf.numel() == 1:
        return bool(found_inf)
    if not isinstance(found_inf, bool):
        raise TypeError(f"{where}: found_inf must be a bool (what unscale_ returned), got "
                        f"{type(found_inf).__name__} ({found_inf!r})")
    return found_inf


def _f32(x):
    """Round a Python float to the nearest float32 (inf if it is too large), as a float32 scale tensor stores it."""
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


class LossScaler:
    """Static loss scaling (Micikevicius et al. 2018, §3.2): one constant S chosen by hand.

    ``scale_loss(loss)`` → S·L to back-propagate; ``unscale_(params)`` divides the gradients by S in place and
    returns ``found_inf`` (any inf/nan: the step must be skipped); ``update(found_inf)`` closes the step (records
    it; a static scaler never changes S). ``history`` lists ``(S used, found_inf)`` per step.
    """

    def __init__(self, scale=2.0 ** 10):
        where = type(self).__name__
        # S is kept as a float32 number, as torch.amp.GradScaler keeps it (a float32 tensor)
        self.scale = _f32(_check_real(scale, "scale", where))
        if not math.isfinite(self.scale):
            raise ValueError(f"{where}: scale={scale} overflows float32 (max 3.4e38)")
        self.history = []
        self._unscaled = False

    def scale_loss(self, loss):
        """S · loss (a tensor to call ``.backward()`` on)."""
        where = f"{type(self).__name__}.scale_loss"
        _check_tensor(loss, "loss", where)
        # L' = S · L  ⇒  ∂L'/∂θ = S · ∂L/∂θ for every tensor θ in the graph (the chain rule is linear)
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, params):
        """Divide every ``.grad`` of ``params`` (tensors or an optimizer) by S, in place; return ``found_inf``.

        Call it on the float32 master gradients (dividing float16 gradients in float16 would underflow them
        again: float16 gradients raise a ``TypeError``), after backward and before clipping or ``step()``.
        """
        where = f"{type(self).__name__}.unscale_"
        params = _grads_of(params, where)
        if self._unscaled:
            raise RuntimeError(f"{where}: the gradients were already unscaled since the last update(); call "
                               f"update(found_inf) once per step")
        # 1/S rounded to float32, as GradScaler computes it (in float64, then rounded)
        inv_scale = _f32(1.0 / self.scale)
        found_inf = False
        for p in params:
            g = p.grad
            if g is None:
                continue
            if g.dtype == torch.float16:
                raise TypeError(f"{where}: got a float16 gradient of shape {tuple(g.shape)}; unscale the float32 "
                                f"master gradients (MixedPrecisionModel.grads_to_masters() first)")
            # an overflow anywhere in backward leaves an inf — or a nan (inf − inf, 0 · inf) — in some gradient
            found_inf = found_inf or not bool(torch.isfinite(g).all())
            # g = g' / S
            g.mul_(inv_scale)
        self._unscaled = True
        return found_inf

    def update(self, found_inf):
        """Close the step: record ``(S, found_inf)``. (A dynamic scaler also adapts S here.)"""
        found_inf = _check_found_inf(found_inf, f"{type(self).__name__}.update")
        self.history.append((self.scale, found_inf))
        self._unscaled = False
        return found_inf

    @property
    def skipped(self):
        """Number of steps whose update was skipped (found_inf) so far."""
        return sum(1 for _, inf in self.history if inf)

    def state_dict(self):
        return {"scale": self.scale}

    def load_state_dict(self, state):
        self.scale = _f32(_check_real(state["scale"], "state['scale']", f"{type(self).__name__}.load_state_dict"))

    def __repr__(self):
        return f"{type(self).__name__}(scale={self.scale:g})"


class DynamicLossScaler(LossScaler):
    """Dynamic loss scaling: back off on overflow, grow after ``growth_interval`` clean steps.

    ``update(found_inf)``::

        found_inf:            S ← S · backoff_factor,   tracker ← 0            (and the step was skipped)
        else:                 tracker ← tracker + 1
            tracker = N:      S ← S · growth_factor (kept only if finite in float32),   tracker ← 0

    ``scale`` is S (a float32 value), ``growth_tracker`` the count of clean steps since the last change.
    The defaults are ``torch.amp.GradScaler``'s, and so is the trajectory of S for any sequence of overflows.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        where = "DynamicLossScaler"
        super().__init__(_check_real(init_scale, "init_scale", where))
        self.growth_factor = _check_real(growth_factor, "growth_factor", where)
        if self.growth_factor <= 1.0:
            raise ValueError(f"{where}: growth_factor must be > 1 (it grows S), got {growth_factor}")
        self.backoff_factor = _check_real(backoff_factor, "backoff_factor", where)
        if self.backoff_factor >= 1.0:
            raise ValueError(f"{where}: backoff_factor must lie in (0, 1) (it shrinks S), got {backoff_factor}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval <= 0:
            raise ValueError(f"{where}: growth_interval must be a positive int, got {growth_interval!r}")
        self.growth_interval = growth_interval
        self.growth_tracker = 0

    def update(self, found_inf):
        """Record the step and adapt S (see the class docstring). Returns ``found_inf``."""
        found_inf = super().update(found_inf)
        if found_inf:
            # overflow: S ← S · β, start counting clean steps again
            self.scale = _f32(self.scale * self.backoff_factor)
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                # N clean steps in a row: S ← S · γ, unless γ·S is not a finite float32
                grown = _f32(self.scale * self.growth_factor)
                if math.isfinite(grown):
                    self.scale = grown
                self.growth_tracker = 0
        return found_inf

    def state_dict(self):
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for key in ("growth_factor", "backoff_factor", "growth_interval", "growth_tracker"):
            setattr(self, key, state[key])

    def __repr__(self):
        return (f"DynamicLossScaler(scale={self.scale:g}, growth_factor={self.growth_factor:g}, "
                f"backoff_factor={self.backoff_factor:g}, growth_interval={self.growth_interval}, "
                f"growth_tracker={self.growth_tracker})")


# --------------------------------------------------------------------------------------------------------------
# the training step
# --------------------------------------------------------------------------------------------------------------


def mixed_precision_step(model, inputs, targets, optimizer, *, scaler=None, loss_fn=lm_loss, grad_clip=1.0):
    """One step of the recipe; returns the (unscaled) loss as a float. ``effedu.train.train``'s ``step_fn``::

        mp = MixedPrecisionModel(model, torch.float16)
        scaler = DynamicLossScaler()
        train(mp, batches, step_fn=functools.partial(mixed_precision_step, scaler=scaler))

    forward (16 bits) → loss (float32) → backward of S·L → copy the gradients into the float32 masters →
    unscale (÷S) and check → *if no inf/nan*: clip the true gradient norm, ``optimizer.step()`` on the masters →
    ``scaler.update(found_inf)`` → re-make the working copy. On overflow the masters are left untouched (the step
    is skipped) and the scaler lowers S. ``model`` may also be a plain module (float32, or a :func:`cast_model`
    copy): then its own parameters are stepped, and a non-finite gradient still skips the update.
    """
    where = "mixed_precision_step"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scaler is not None and not isinstance(scaler, LossScaler):
        raise TypeError(f"{where}: scaler must be a LossScaler / DynamicLossScaler or None, got "
                        f"{type(scaler).__name__}")
    if grad_clip is not None:
        grad_clip = _check_real(grad_clip, "grad_clip", where)
    mixed = isinstance(model, MixedPrecisionModel)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if mixed:
        masters = {id(m) for m in model.masters}
        if any(id(p) not in masters for p in params):
            raise ValueError(f"{where}: the optimizer must update the MixedPrecisionModel's parameters (the float32 "
                             f"masters: torch.optim.X(mp.parameters())), not other tensors such as the working copy")
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    with emulated_16bit_matmul(emulates_matmul(model)):  # the backward's matmuls too
        out = model(inputs)
        loss = loss_fn(out, targets)  # float32: lm_loss upcasts the logits before the softmax
        if not loss.is_floating_point() or loss.dim() != 0:
            raise ValueError(f"{where}: loss_fn must return a floating scalar, got {loss.dtype} of shape "
                             f"{tuple(loss.shape)}")
        # backward of S·L: all gradients S times larger (S = 1 without a scaler)
        (scaler.scale_loss(loss) if scaler is not None else loss).backward()
    if mixed:
        model.grads_to_masters()  # g₃₂ = float32(g₁₆)
    found_inf = scaler.unscale_(params) if scaler is not None else not all_finite(params)  # g = g'/S
    if not found_inf:
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)  # on the true gradient, after unscaling
        optimizer.step()  # w₃₂ ← w₃₂ − η · update(g)
        if mixed:
            model.masters_to_working()  # w₁₆ = round₁₆(w₃₂)
    if scaler is not None:
        scaler.update(found_inf)  # S ← S·β on overflow, S·γ after N clean steps
    return float(loss.detach())


def collect_gradients(model, inputs, targets, *, loss_fn=lm_loss, scale=1.0):
    """The gradients one backward pass of ``scale · loss`` produces, flattened, in the dtype they were computed in.

    Returns ``{"activations": ..., "weights": ...}``: *activations* = every gradient flowing out of a module with
    parameters (Linear, LayerNorm, Embedding outputs: what backward passes from layer to layer, the paper's
    "activation gradients"); *weights* = every parameter gradient. For a :class:`MixedPrecisionModel` these are
    the 16-bit gradients of its working copy (before any copy to the masters). Gradients are cleared afterwards.
    """
    import warnings

    where = "collect_gradients"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    scale = _check_real(scale, "scale", where)
    mixed = isinstance(model, MixedPrecisionModel)
    net = model.working if mixed else model
    weights = list(model.working_tensors) if mixed else [p for p in model.parameters() if p.requires_grad]
    acts = []

    def has_weights(m):  # in the working copy of a MixedPrecisionModel the weights are buffers that need grad
        own = list(m.parameters(recurse=False)) + (list(m.buffers(recurse=False)) if mixed else [])
        return any(t.is_floating_point() and t.requires_grad for t in own)

    hooked = [m for m in net.modules() if next(m.children(), None) is None and has_weights(m)]
    handles = [m.register_full_backward_pre_hook(lambda mod, grad_out: acts.append(grad_out[0].detach().flatten()))
               for m in hooked]
    model.zero_grad(set_to_none=True)
    try:
        with warnings.catch_warnings(), emulated_16bit_matmul(emulates_matmul(model)):
            # the hooks of modules whose inputs need no gradient (token embeddings) warn: expected here
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            (loss_fn(model(inputs), targets) * scale).backward()
    finally:
        for h in handles:
            h.remove()
    grads = [w.grad.detach().flatten() for w in weights if w.grad is not None]
    model.zero_grad(set_to_none=True)
    if not acts or not grads:
        raise ValueError(f"{where}: the backward pass produced no gradients (does the loss depend on the model?)")
    return {"activations": torch.cat(acts), "weights": torch.cat(grads)}


# --------------------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------------------


def training_bytes(model, optimizer, inputs):
    """Bytes of a training setup by kind: ``{"weights", "gradients", "activations", "optimizer state"}``.

    *weights*: every parameter tensor (for a :class:`MixedPrecisionModel`, the float32 masters *and* the 16-bit
    working copy); *gradients*: every ``.grad`` alive now (call it after a step); *activations*: the bytes autograd
    saves for backward in one forward pass of ``inputs`` (:func:`effedu.measure.saved_activation_bytes`);
    *optimizer state*: every tensor in ``optimizer.state`` (AdamW: two moments per weight, in the weight's dtype).
    """
    from ..measure import saved_activation_bytes, tensor_bytes

    where = "training_bytes"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    weights = list(model.parameters())
    if isinstance(model, MixedPrecisionModel):
        weights += list(model.working_tensors)
    grads = [w.grad for w in weights if w.grad is not None]
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {
        "weights": tensor_bytes(*weights) if weights else 0,
        "gradients": tensor_bytes(*grads) if grads else 0,
        "activations": saved_activation_bytes(model, inputs),
        "optimizer state": tensor_bytes(*state) if state else 0,
    }


# benchmark: `python -m effedu.bench precision` (effedu/bench/precision.py)
