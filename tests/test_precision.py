"""Mixed precision: the scaler against torch.amp.GradScaler, the bf16 forward against torch.autocast, master
weights that keep small updates, skipped steps on overflow, and input validation."""
import copy
import functools
import math

import pytest
import torch
import torch.nn as nn

from effedu import measure
from effedu.general.precision import (
    DynamicLossScaler,
    LossScaler,
    MasterWeights,
    MixedPrecisionModel,
    all_finite,
    cast_model,
    collect_gradients,
    emulated_16bit_matmul,
    emulated_fp16_matmul,
    emulates_matmul,
    format_info,
    lost_update_fraction,
    mixed_precision_step,
    resolve_dtype,
    training_bytes,
    underflow_report,
)
from effedu.model import Transformer, TransformerConfig
from effedu.train import lm_loss, train

from _oracles import TOL


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: one thread is as fast, and immune to a busy machine's oversubscription
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_lm(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=19, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=32)
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg))


def tokens(B=3, T=17, V=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_dtype_names_and_errors():
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("half") is torch.float16
    assert resolve_dtype("BF16") is torch.bfloat16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match=r"dtype must be one of .*got 'fp8'"):
        resolve_dtype("fp8")
    with pytest.raises(ValueError, match="dtype must be one of .*got float64"):
        resolve_dtype(torch.float64)
    with pytest.raises(ValueError, match="got int8"):
        resolve_dtype(torch.int8)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype or its name, got int"):
        resolve_dtype(16)


def test_format_info_matches_the_table():
    h, b, f = format_info("float16"), format_info("bfloat16"), format_info("float32")
    assert (h["exponent_bits"], h["mantissa_bits"], h["bytes"]) == (5, 10, 2)
    assert (b["exponent_bits"], b["mantissa_bits"], b["bytes"]) == (8, 7, 2)
    assert (f["exponent_bits"], f["mantissa_bits"], f["bytes"]) == (8, 23, 4)
    assert h["max"] == 65504.0 and h["min_normal"] == 2.0 ** -14 and h["min_subnormal"] == 2.0 ** -24
    assert b["min_normal"] == 2.0 ** -126 and b["min_subnormal"] == 2.0 ** -133
    # the smallest subnormal is representable, half of it rounds to zero
    assert float(torch.tensor(h["min_subnormal"]).half()) == 2.0 ** -24
    assert float(torch.tensor(2.0 ** -25).half()) == 0.0


def test_underflow_report_classifies_and_scaling_rescues():
    v = torch.tensor([2.0 ** -26, -(2.0 ** -20), 2.0 ** -10, 2.0 ** 17, 0.0])  # the zero is not counted
    r = underflow_report(v, torch.float16)
    assert r["count"] == 4
    assert (r["zero"], r["subnormal"], r["normal"], r["overflow"]) == (0.25, 0.25, 0.25, 0.25)
    r = underflow_report(v, "fp16", scale=2.0 ** 6)  # 2^-20, 2^-14, 2^-4, 2^23
    assert (r["zero"], r["subnormal"], r["normal"], r["overflow"]) == (0.0, 0.25, 0.5, 0.25)
    r = underflow_report(v, torch.bfloat16)  # float32's range: nothing lost
    assert r["normal"] == 1.0
    with pytest.raises(ValueError, match="scale must be a positive finite number, got -1"):
        underflow_report(v, torch.float16, scale=-1)
    with pytest.raises(ValueError, match="no non-zero finite entry"):
        underflow_report(torch.zeros(3), torch.float16)
    with pytest.raises(TypeError, match="values must be a floating-point tensor, got torch.int64"):
        underflow_report(torch.ones(3, dtype=torch.long), torch.float16)


def test_lost_update_fraction():
    w = torch.ones(8)
    assert lost_update_fraction(w, torch.full((8,), 1e-4), torch.bfloat16) == 1.0
    assert lost_update_fraction(w, torch.full((8,), 1e-4), torch.float16) == 1.0
    assert lost_update_fraction(w, torch.full((8,), 1e-4), torch.float32) == 0.0
    u = torch.tensor([1e-4, 1e-2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # zeros do not count
    assert lost_update_fraction(w, u, torch.bfloat16) == 0.5
    with pytest.raises(ValueError, match="weights and updates must have one shape"):
        lost_update_fraction(w, torch.ones(3), torch.float16)
    with pytest.raises(ValueError, match="updates are all zero"):
        lost_update_fraction(w, torch.zeros(8), torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# loss scaling: the oracle is torch.amp.GradScaler
# ---------------------------------------------------------------------------------------------------------------


def drive_both(pattern, magnitude=1.0, **kw):
    """Feed the same gradients (finite, inf or nan at each step) to GradScaler and to DynamicLossScaler."""
    p_ref, p_me = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt_ref, opt_me = torch.optim.SGD([p_ref], lr=0.1), torch.optim.SGD([p_me], lr=0.1)
    ref, me = torch.amp.GradScaler("cpu", **kw), DynamicLossScaler(**kw)
    trajectory = []
    for i, kind in enumerate(pattern):
        loss = torch.tensor(1.5)
        assert torch.equal(ref.scale(loss), me.scale_loss(loss))
        g = torch.tensor([0.3, -1.7, 2.5e-3]) * (i + 1) * magnitude
        if kind == "inf":
            g[1] = float("inf")
        elif kind == "nan":
            g[0] = float("nan")
        p_ref.grad, p_me.grad = g * ref.get_scale(), g * me.scale
        ref.unscale_(opt_ref)
        found_inf = me.unscale_(opt_me)
        assert found_inf == (kind != "ok")
        # the unscaled gradients are bit-identical (nan where GradScaler has nan)
        assert torch.equal(p_ref.grad.isnan(), p_me.grad.isnan())
        assert torch.equal(p_ref.grad.nan_to_num(), p_me.grad.nan_to_num())
        ref.step(opt_ref)
        if not found_inf:
            opt_me.step()
        ref.update()
        me.update(found_inf)
        assert torch.equal(p_ref, p_me)  # the same steps were skipped
        trajectory.append((ref.get_scale(), ref._get_growth_tracker(), me.scale, me.growth_tracker))
    return trajectory


PATTERN = ["ok"] * 5 + ["inf"] + ["ok"] * 7 + ["nan", "inf"] + ["ok"] * 9


@pytest.mark.parametrize("kw", [
    dict(init_scale=2.0 ** 4, growth_interval=3),
    dict(init_scale=2.0 ** 16, growth_interval=1),
    dict(init_scale=1000.3, growth_factor=1.7, backoff_factor=0.33, growth_interval=2),  # float32 rounding of S
])
def test_scale_trajectory_equals_gradscaler(kw):
    traj = drive_both(PATTERN, **kw)
    for s_ref, t_ref, s_me, t_me in traj:
        assert s_ref == s_me and t_ref == t_me
    scales = [s for s, *_ in traj]
    assert len(set(scales)) > 2  # the pattern really made the scale move both ways
    assert any(b < a for a, b in zip(scales, scales[1:])) and any(b > a for a, b in zip(scales, scales[1:]))


def test_scale_stops_growing_at_float32_max_like_gradscaler():
    traj = drive_both(["ok"] * 6, magnitude=2.0 ** -100, init_scale=2.0 ** 127, growth_interval=2)
    assert all(s_ref == s_me == 2.0 ** 127 for s_ref, _, s_me, _ in traj)
    assert [t for _, t, _, _ in traj] == [t for _, _, _, t in traj] == [1, 0, 1, 0, 1, 0]


def test_default_scaler_is_gradscalers_default():
    me, ref = DynamicLossScaler(), torch.amp.GradScaler("cpu")
    assert me.scale == ref.get_scale() == 2.0 ** 16
    assert (me.growth_factor, me.backoff_factor, me.growth_interval) == (
        ref.get_growth_factor(), ref.get_backoff_factor(), ref.get_growth_interval())
    me.update(True)
    assert me.scale == 2.0 ** 15 and me.skipped == 1 and me.history == [(2.0 ** 16, True)]
    state = me.state_dict()
    other = DynamicLossScaler(init_scale=1.0)
    other.load_state_dict(state)
    assert other.scale == 2.0 ** 15 and other.growth_interval == 2000


def test_static_scaler_never_changes_and_unscales():
    s = LossScaler(2.0 ** 8)
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([256.0, 512.0])
    assert s.unscale_([p]) is False
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0]))
    s.update(False)
    p.grad = torch.tensor([float("inf"), 1.0])
    assert s.unscale_([p]) is True
    s.update(True)
    assert s.scale == 2.0 ** 8 and s.skipped == 1


def test_scaler_bad_input():
    with pytest.raises(ValueError, match="init_scale must be a positive finite number, got -1"):
        DynamicLossScaler(init_scale=-1.0)
    with pytest.raises(ValueError, match="init_scale must be a positive finite number, got inf"):
        DynamicLossScaler(init_scale=math.inf)
    with pytest.raises(ValueError, match="growth_factor must be > 1"):
        DynamicLossScaler(growth_factor=1.0)
    with pytest.raises(ValueError, match=r"backoff_factor must lie in \(0, 1\)"):
        DynamicLossScaler(backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_interval must be a positive int, got 0"):
        DynamicLossScaler(growth_interval=0)
    with pytest.raises(TypeError, match="scale must be a real number, got str"):
        LossScaler("big")
    with pytest.raises(ValueError, match="overflows float32"):
        LossScaler(1e39)
    s = DynamicLossScaler()
    with pytest.raises(TypeError, match="loss must be a torch.Tensor, got float"):
        s.scale_loss(1.0)
    with pytest.raises(TypeError, match="found_inf must be a bool"):
        s.update("no")
    p = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    p.grad = torch.ones(2, dtype=torch.float16)
    with pytest.raises(TypeError, match="float16 gradient .* unscale the float32 master gradients"):
        s.unscale_([p])
    q = nn.Parameter(torch.zeros(2))
    q.grad = torch.ones(2)
    s2 = DynamicLossScaler()
    s2.unscale_([q])
    with pytest.raises(RuntimeError, match="already unscaled since the last update"):
        s2.unscale_([q])
    with pytest.raises(TypeError, match="got one tensor; wrap it in a list"):
        DynamicLossScaler().unscale_(q)


# ---------------------------------------------------------------------------------------------------------------
# the mixed-precision model: oracle torch.autocast
# ---------------------------------------------------------------------------------------------------------------


def test_bf16_forward_matches_autocast():
    model = small_lm(d_model=48, n_heads=3)
    with torch.no_grad():  # O(1) logits, so the comparison is not trivially small
        for p in model.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    x, _ = tokens(B=2, T=17)
    ref32 = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        oracle = model(x)
    out = MixedPrecisionModel(model, torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16 and oracle.dtype == torch.bfloat16
    assert float(ref32.detach().abs().mean()) > 0.3
    # both round differently from float32 (autocast keeps the residual stream in float32, we do not), but each
    # is within bfloat16's precision of the float32 result, and of each other
    torch.testing.assert_close(out.float(), oracle.float(), atol=0.1, rtol=TOL[torch.bfloat16]["rtol"])
    assert rel_err(out, oracle) < 2e-2
    assert rel_err(out, ref32) < 2e-2 and rel_err(oracle, ref32) < 2e-2
    assert rel_err(out, ref32) > 1e-4  # it really computed in bfloat16


def test_fp16_forward_matches_autocast_and_emulation_matches_native():
    model = small_lm()
    x, _ = tokens(B=2, T=9)
    with torch.autocast("cpu", dtype=torch.float16):
        oracle = model(x)
    emulated = MixedPrecisionModel(model, "fp16")
    native = MixedPrecisionModel(model, "fp16", emulate_fp16_matmul=False)
    assert emulated.emulate_fp16_matmul and not native.emulate_fp16_matmul
    a, b = emulated(x), native(x)
    assert a.dtype == b.dtype == torch.float16
    torch.testing.assert_close(a, b, **TOL[torch.float16])
    torch.testing.assert_close(a.float(), oracle.float(), atol=1e-2, rtol=1e-2)


def test_emulated_matmul_is_float32_rounded_to_float16():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 33, generator=g).half()
    B = torch.randn(33, 7, generator=g).half()
    with emulated_fp16_matmul():
        with emulated_fp16_matmul():  # re-entrant
            C = A @ B
    assert C.dtype == torch.float16
    assert torch.equal(C, (A.float() @ B.float()).half())
    torch.testing.assert_close(C, A @ B, **TOL[torch.float16])
    # backward matmuls too: gradients of a float16 product under emulation
    A.requires_grad_(True)
    with emulated_fp16_matmul():
        (A @ B).float().sum().backward()
    assert A.grad.dtype == torch.float16
    assert torch.equal(A.grad, (torch.ones(5, 7) @ B.float().T).half())
    with pytest.raises(TypeError, match="enabled must be a bool"):
        with emulated_fp16_matmul("yes"):
            pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_gradients_close_to_float32(dtype):
    model = small_lm()
    x, y = tokens(B=4, T=17)
    ref = copy.deepcopy(model)
    lm_loss(ref(x), y).backward()
    mp = MixedPrecisionModel(model, dtype)
    (lm_loss(mp(x), y) * 1024.0).backward()
    assert all(t.grad.dtype == dtype for t in mp.working_tensors)
    mp.grads_to_masters()
    assert all(t.grad is None for t in mp.working_tensors)  # freed once copied
    for (name, p), q in zip(ref.named_parameters(), mp.parameters()):
        assert q.grad.dtype == torch.float32
        if p.grad.norm() > 1e-4:
            assert rel_err(q.grad / 1024.0, p.grad) < 0.1, name


def test_parameters_are_the_float32_masters_and_working_copy_follows():
    model = small_lm()
    mp = MixedPrecisionModel(model, torch.bfloat16)
    params = list(mp.parameters())
    assert [id(p) for p in params] == [id(p) for p in model.parameters()]
    assert all(p.dtype == torch.float32 for p in params)
    assert all(t.dtype == torch.bfloat16 and t.is_leaf and t.requires_grad for t in mp.working_tensors)
    assert all(k.startswith("master.") for k in mp.state_dict())
    # saved activations: half the bytes of float32 (weights are never counted as activations)
    x, _ = tokens(B=4, T=17)
    ratio = measure.saved_activation_bytes(mp, x) / measure.saved_activation_bytes(model, x)
    assert 0.49 < ratio < 0.52
    # loading masters refreshes the working copy
    other = small_lm(seed=1)
    mp.load_state_dict({f"master.{k}": v for k, v in other.state_dict().items()})
    torch.testing.assert_close(mp.working.head.weight.float(), other.head.weight, **TOL[torch.bfloat16])
    # moving keeps the working tensors leaves; a dtype change of the masters is refused
    mp.to("cpu")
    assert all(t.is_leaf for t in mp.working_tensors) and mp.working.head.weight is mp.working_tensors[-2]
    with pytest.raises(TypeError, match="master weights must stay float32"):
        mp.half()


def test_tied_parameters_stay_tied():
    emb = nn.Embedding(11, 8)
    head = nn.Linear(8, 11, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    mp = MixedPrecisionModel(model, "bf16")
    assert len(mp.working_tensors) == len(list(model.parameters())) == 1
    assert mp.working[0].weight is mp.working[1].weight
    mp(torch.tensor([[1, 2, 3]])).float().sum().backward()
    mp.grads_to_masters()
    assert emb.weight.grad is not None and emb.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# master weights keep small updates
# ---------------------------------------------------------------------------------------------------------------


def constant_gradient_run(model, steps, g=2.0 ** -12):
    """SGD(lr=1) on loss = g·w·1: every step subtracts exactly g from the weight."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss_fn = lambda out, target: out.float().sum() * g  # noqa: E731
    for _ in range(steps):
        x = torch.ones(1, 1, dtype=next(model.parameters()).dtype)  # a MixedPrecisionModel casts it itself
        mixed_precision_step(model, x, None, opt, loss_fn=loss_fn, grad_clip=None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_keep_updates_that_vanish_in_16_bits(dtype):
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    # 2^-12 is below half the gap above 1.0 in both formats (bf16: 2^-8, fp16: 2^-11): each update alone is lost
    assert lost_update_fraction(torch.ones(1), torch.full((1,), 2.0 ** -12), dtype) == 1.0
    pure = cast_model(lin, dtype)
    constant_gradient_run(pure, 64)
    assert float(pure.weight.detach()) == 1.0  # 64 updates, all lost
    mp = MixedPrecisionModel(lin, dtype)
    constant_gradient_run(mp, 64)
    assert float(lin.weight.detach()) == 1.0 - 64 * 2.0 ** -12  # the float32 master kept every one (exact here)
    assert float(mp.working.weight.detach()) == float(torch.tensor(1.0 - 64 * 2.0 ** -12).to(dtype))
    assert float(mp.working.weight.detach()) < 1.0


def test_master_weights_class_round_trip():
    p16 = nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))
    mw = MasterWeights([p16])
    assert mw.masters[0].dtype == torch.float32 and len(mw) == 1
    p16.grad = torch.tensor([0.5, 0.25, 1.0], dtype=torch.bfloat16)
    mw.grads_to_masters(free=False)
    assert p16.grad is not None and torch.equal(mw.masters[0].grad, torch.tensor([0.5, 0.25, 1.0]))
    with torch.no_grad():
        mw.masters[0].sub_(1e-3)
    mw.masters_to_params()
    assert torch.equal(p16.data, (torch.tensor([1.0, 2.0, 3.0]) - 1e-3).bfloat16())
    with pytest.raises(ValueError, match="params is empty"):
        MasterWeights([])
    with pytest.raises(TypeError, match="masters\\[0\\] must be float32"):
        MasterWeights([p16], masters=[torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="masters\\[0\\] has shape \\(2,\\)"):
        MasterWeights([p16], masters=[torch.zeros(2)])
    with pytest.raises(TypeError, match="got one tensor"):
        MasterWeights(p16)


# ---------------------------------------------------------------------------------------------------------------
# the step: skipped on overflow, usable in effedu.train
# ---------------------------------------------------------------------------------------------------------------


def test_step_is_skipped_on_overflow_and_scale_backs_off():
    model = small_lm()
    x, y = tokens()
    mp = MixedPrecisionModel(model, torch.float16)
    opt = torch.optim.AdamW(mp.parameters(), lr=1e-2)
    before = copy.deepcopy(model.state_dict())
    working_before = [t.clone() for t in mp.working_tensors]
    scaler = DynamicLossScaler(init_scale=2.0 ** 40, growth_interval=5)  # S·L overflows float16 in backward
    loss = mixed_precision_step(mp, x, y, opt, scaler=scaler)
    assert math.isfinite(loss)
    assert scaler.history == [(2.0 ** 40, True)] and scaler.scale == 2.0 ** 39
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # masters untouched
    assert all(torch.equal(a, b) for a, b in zip(mp.working_tensors, working_before))
    assert opt.state == {}  # the optimizer never stepped
    # a sane scale: the step happens
    scaler.scale = 2.0 ** 10
    mixed_precision_step(mp, x, y, opt, scaler=scaler)
    assert scaler.history[-1] == (2.0 ** 10, False)
    assert not torch.equal(model.head.weight, before["head.weight"])


def test_step_is_skipped_on_nan_without_a_scaler():
    model = small_lm()
    x, y = tokens()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = model.head.weight.detach().clone()
    nan_loss = lambda out, t: lm_loss(out, t) * float("nan")  # noqa: E731
    loss = mixed_precision_step(model, x, y, opt, loss_fn=nan_loss)
    assert math.isnan(loss) and torch.equal(model.head.weight, w)
    assert not all_finite(model.parameters())
    mixed_precision_step(model, x, y, opt)
    assert not torch.equal(model.head.weight, w) and all_finite(opt)


def test_train_with_mixed_precision_step_learns_and_is_deterministic():
    def run(dtype):
        mp = MixedPrecisionModel(small_lm(), dtype)
        scaler = DynamicLossScaler(growth_interval=10)
        copy_task = lambda step: tokens(B=8, T=16, seed=0)  # noqa: E731  one batch to memorise
        hist = train(mp, copy_task, steps=20, lr=1e-2, progress=False,
                     step_fn=functools.partial(mixed_precision_step, scaler=scaler))
        return mp, hist, scaler

    mp, hist, scaler = run(torch.float16)
    assert hist["loss"][-1] < 0.8 * hist["loss"][0]
    assert len(scaler.history) == 20 and all(p.dtype == torch.float32 for p in mp.parameters())
    _, hist2, scaler2 = run(torch.float16)
    assert hist["loss"] == hist2["loss"] and scaler.history == scaler2.history
    _, hist_bf16, _ = run(torch.bfloat16)
    assert hist_bf16["loss"][-1] < 0.8 * hist_bf16["loss"][0]


def test_collect_gradients_scale_is_an_exact_shift_and_16_bit_dtype():
    model = small_lm()
    x, y = tokens(B=4, T=17)
    g1 = collect_gradients(model, x, y)
    g256 = collect_gradients(model, x, y, scale=256.0)
    assert g1["weights"].numel() == measure.count_parameters(model)
    assert g1["activations"].numel() > 0 and model.head.weight.grad is None  # cleared afterwards
    # a power-of-two loss scale changes only exponents: every gradient is exactly 256 times larger
    assert torch.equal(g256["activations"], g1["activations"] * 256)
    assert torch.equal(g256["weights"], g1["weights"] * 256)
    mp = MixedPrecisionModel(model, torch.float16)
    g16 = collect_gradients(mp, x, y, scale=1024.0)
    assert g16["activations"].dtype == g16["weights"].dtype == torch.float16
    assert g16["weights"].numel() == g1["weights"].numel()
    assert rel_err(g16["weights"].float() / 1024, g1["weights"]) < 0.05
    with pytest.raises(ValueError, match="scale must be a positive finite number, got 0"):
        collect_gradients(model, x, y, scale=0)


def test_training_bytes_counts_masters_working_copy_and_state():
    model = small_lm()
    P = measure.count_parameters(model)
    x, y = tokens(B=4, T=17)
    fp32, mp = copy.deepcopy(model), MixedPrecisionModel(copy.deepcopy(model), torch.bfloat16)
    out = {}
    for name, m in (("fp32", fp32), ("mixed", mp)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        mixed_precision_step(m, x, y, opt)
        out[name] = training_bytes(m, opt, x)
    n_tensors = len(list(model.parameters()))
    assert out["fp32"]["weights"] == 4 * P and out["mixed"]["weights"] == 6 * P  # float32 masters + bf16 copy
    assert out["fp32"]["gradients"] == out["mixed"]["gradients"] == 4 * P  # float32 master gradients
    assert out["fp32"]["optimizer state"] == out["mixed"]["optimizer state"] == 8 * P + 4 * n_tensors
    assert 0.49 < out["mixed"]["activations"] / out["fp32"]["activations"] < 0.52
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        training_bytes(mp, None, x)


def test_model_and_step_bad_input():
    model = small_lm()
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got float64"):
        MixedPrecisionModel(model, torch.float64)
    with pytest.raises(ValueError, match="got 'int4'"):
        MixedPrecisionModel(model, "int4")
    with pytest.raises(TypeError, match="'tok_emb.weight' is torch.float16; pass the float32 model"):
        MixedPrecisionModel(copy.deepcopy(model).half(), torch.float16)
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        MixedPrecisionModel("model")
    with pytest.raises(ValueError, match="no parameters"):
        MixedPrecisionModel(nn.ReLU())
    mp = MixedPrecisionModel(model)
    with pytest.raises(TypeError, match="already a MixedPrecisionModel"):
        MixedPrecisionModel(mp)
    with pytest.raises(TypeError, match="emulate_fp16_matmul must be None"):
        MixedPrecisionModel(model, emulate_fp16_matmul=1)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        cast_model(model, 3)
    x, y = tokens()
    opt = torch.optim.SGD(mp.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="scaler must be a LossScaler"):
        mixed_precision_step(mp, x, y, opt, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        mixed_precision_step(mp, x, y, [])
    with pytest.raises(ValueError, match="grad_clip must be a positive finite number, got 0"):
        mixed_precision_step(mp, x, y, opt, grad_clip=0)
    with pytest.raises(ValueError, match="optimizer must update the MixedPrecisionModel's parameters"):
        mixed_precision_step(mp, x, y, torch.optim.SGD(mp.working_tensors, lr=0.1))
    with pytest.raises(ValueError, match="loss_fn must return a floating scalar"):
        mixed_precision_step(mp, x, y, opt, loss_fn=lambda o, t: o.float().sum(-1))


def test_emulated_16bit_matmul_rounds_float32_products_to_each_dtype_and_cast_models_use_it():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(37, 64, generator=gen), torch.randn(64, 29, generator=gen)
    for dtype in (torch.bfloat16, torch.float16):
        a16, b16 = a.to(dtype), b.to(dtype)
        with emulated_16bit_matmul():
            c = a16 @ b16
        assert c.dtype == dtype
        assert torch.equal(c, (a16.float() @ b16.float()).to(dtype))  # one rounding of the float32 result
    with emulated_fp16_matmul():  # the float16-only context leaves bfloat16 to torch's kernel
        c = a.bfloat16() @ b.bfloat16()
    assert c.dtype == torch.bfloat16
    # gradients of a bfloat16 product under emulation: float32 products rounded to bfloat16
    x = a.bfloat16().requires_grad_()
    with emulated_16bit_matmul():
        (x @ b.bfloat16()).float().sum().backward()
    torch.testing.assert_close(x.grad.float(), (torch.ones(37, 29) @ b.bfloat16().float().t()).bfloat16().float())
    with pytest.raises(TypeError, match="emulated_16bit_matmul: enabled must be a bool"):
        with emulated_16bit_matmul("yes"):
            pass
    model = Transformer(TransformerConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=8))
    assert emulates_matmul(MixedPrecisionModel(model, torch.bfloat16))
    assert not emulates_matmul(MixedPrecisionModel(model, torch.bfloat16, emulate_fp16_matmul=False))
    assert emulates_matmul(cast_model(model, torch.bfloat16)) and not emulates_matmul(model)
