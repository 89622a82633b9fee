"""Chapter 08: quantisation from scratch, held to torch's fake-quantisation ops, exact integer products and
closed-form error bounds."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effedu.general.quantize import (
    QATLinear,
    QuantizedLinear,
    QuantNoise,
    calibrate,
    convert_qat,
    dequantize,
    fake_quantize,
    int_mm_supported,
    ipq,
    model_bytes,
    pq_bytes,
    pq_reconstruct,
    prepare_qat,
    product_quantize,
    ptq,
    qrange,
    quant_noise,
    quantization_error,
    quantize,
    quantize_linears,
    strip_quant_noise,
)
from effedu.model import Transformer, TransformerConfig, lm_loss

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _tiny(n_layers=2, seed=0):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=n_layers, d_ff=32,
                                         max_len=16)).eval()


# --------------------------------------------------------------------------------------------------------------
# quantize / dequantize / calibrate
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["symmetric", "affine"])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_round_trip_error_is_at_most_half_a_step(dtype, scheme, axis, bits):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(5, 7, 3, generator=g) * 3 + 0.5).to(dtype)
    q, s, z = quantize(x, bits, scheme=scheme, axis=axis)
    qmin, qmax = qrange(bits, scheme)
    assert q.dtype == (torch.int8 if scheme == "symmetric" else torch.uint8)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    if axis is None:
        assert s.shape == () and z.shape == ()
    else:
        want = [1, 1, 1]
        want[axis] = x.shape[axis]
        assert tuple(s.shape) == tuple(want) == tuple(z.shape)
    assert z.dtype == torch.int32 and s.dtype == dtype
    if scheme == "symmetric":
        assert bool((z == 0).all())
    else:
        assert bool(((z >= qmin) & (z <= qmax)).all())
    xh = dequantize(q, s, z)
    assert xh.dtype == dtype
    # min-max calibration: every value is inside the range, so |x − x̂| ≤ s/2 everywhere
    assert bool(((x - xh).abs() <= s / 2 * (1 + TOL[dtype]) + TOL[dtype]).all())


def test_affine_zero_is_exact_and_range_ends_are_hit():
    x = torch.tensor([0.0, 0.3, 1.7, 2.5, 0.0])  # one-sided: min' = 0
    q, s, z = quantize(x, 8, scheme="affine")
    assert int(z) == 0 and int(q.max()) == 255
    assert float(dequantize(q, s, z)[0]) == 0.0
    q, s, z = quantize(torch.tensor([-1.0, 3.0]), 4, scheme="affine")
    assert int(q[0]) == 0 and int(q[1]) == 15 and 0 <= int(z) <= 15


def test_symmetric_uses_the_symmetric_grid():
    q, s, _ = quantize(torch.tensor([-2.0, 1.0, 2.0]), 8)
    assert q.tolist() == [-127, 64, 127] and math.isclose(float(s), 2 / 127, rel_tol=1e-6)


def test_per_channel_scales_follow_each_channel():
    x = torch.tensor([[1.0, -0.5], [100.0, 20.0]])
    _, s, _ = quantize(x, 8, axis=0)
    assert torch.allclose(s.reshape(-1), torch.tensor([1 / 127, 100 / 127]))
    # dequantize also takes the 1-D form of per-channel parameters with their axis
    q, s, z = quantize(x, 8, axis=0)
    assert torch.equal(dequantize(q, s.reshape(-1), z.reshape(-1), axis=0), dequantize(q, s, z))


def test_percentile_calibration_clips_outliers():
    x = torch.cat([torch.linspace(-1, 1, 10_000), torch.tensor([50.0])])
    s_mm, _, _, _ = calibrate(x, 8, method="minmax")
    s_p, _, _, qmax = calibrate(x, 8, method="percentile", percentile=99.9)
    assert float(s_p) < float(s_mm) / 10
    q, s, z = quantize(x, 8, calibration="percentile", percentile=99.9)
    assert int(q[-1]) == qmax  # the outlier is clipped to the end of the grid
    err_p = quantization_error(x[:-1], 8, calibration="percentile", percentile=99.9)["max_abs"]
    err_m = quantization_error(x[:-1], 8)["max_abs"]
    assert err_p <= err_m * 1.01


def test_quantization_error_falls_with_bits():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    errs = [quantization_error(x, b, axis=0)["mse"] for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    e = quantization_error(x, 8)
    assert set(e) == {"mse", "max_abs", "rel_rms", "sqnr_db"} and 35 < e["sqnr_db"] < 50


def test_all_zero_tensor_quantizes_to_zero():
    q, s, z = quantize(torch.zeros(3, 4), 8, scheme="affine", axis=1)
    assert bool((dequantize(q, s, z) == 0).all()) and bool((s > 0).all())


@pytest.mark.parametrize("bad, exc, match", [
    (dict(bits=1), ValueError, "bits must be an int in 2..8"),
    (dict(bits=9), ValueError, "bits must be an int in 2..8"),
    (dict(bits=8.0), TypeError, "bits must be an int"),
    (dict(bits=True), TypeError, "bits must be an int"),
    (dict(scheme="asym"), ValueError, "unknown scheme"),
    (dict(axis=3), ValueError, "axis 3 is out of range"),
    (dict(axis=-4), ValueError, "axis -4 is out of range"),
    (dict(calibration="kl"), ValueError, "unknown calibration"),
    (dict(calibration="percentile", percentile=0), ValueError, "percentile must be in"),
])
def test_quantize_rejects_bad_arguments(bad, exc, match):
    kw = dict(bits=8)
    kw.update(bad)
    with pytest.raises(exc, match=match):
        quantize(torch.randn(2, 3, 4), **kw)


def test_quantize_rejects_bad_inputs():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        quantize(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x contains NaN"):
        quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="x contains inf"):
        quantize(torch.tensor([1.0, float("inf")]))
    with pytest.raises(TypeError, match="q must be an integer tensor"):
        dequantize(torch.ones(3), 1.0, 0)
    with pytest.raises(ValueError, match="give its axis"):
        dequantize(torch.ones(3, 2, dtype=torch.int8), torch.ones(3), torch.zeros(3, dtype=torch.int32))


# --------------------------------------------------------------------------------------------------------------
# fake_quantize: torch's ops as the oracle, values and gradients, at the boundaries
# --------------------------------------------------------------------------------------------------------------


def _boundary_values(scale, zp, qmin, qmax):
    """x whose rounded value is exactly qmin / qmax, half a step away (ties: half to even), and just beyond."""
    pts = []
    for end in (qmin, qmax):
        for d in (0.0, 0.25, -0.25, 0.49, -0.49, 0.5, -0.5, 0.51, -0.51, 1.0, -1.0, 3.0, -3.0):
            pts.append((end - zp + d) * scale)
    pts += [0.0, 0.37 * scale, -1.5 * scale, 2.5 * scale]
    return torch.tensor(pts)


@pytest.mark.parametrize("qmin, qmax, zp, scale", [(-127, 127, 0, 0.1), (0, 255, 13, 0.037), (-7, 7, 0, 0.5),
                                                    (0, 3, 1, 1.3)])
def test_fake_quantize_per_tensor_matches_torch_values_and_gradients(qmin, qmax, zp, scale):
    x = _boundary_values(scale, zp, qmin, qmax)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fake_quantize(a, scale, zp, qmin, qmax)
    yb = torch.fake_quantize_per_tensor_affine(b, scale, zp, qmin, qmax)
    assert torch.equal(ya, yb)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)
    # the boundary itself passes the gradient, one step beyond does not
    at_ends = torch.tensor([(qmin - zp) * scale, (qmax - zp) * scale], requires_grad=True)
    fake_quantize(at_ends, scale, zp, qmin, qmax).sum().backward()
    assert at_ends.grad.tolist() == [1.0, 1.0]
    beyond = torch.tensor([(qmin - zp - 1) * scale, (qmax - zp + 1) * scale], requires_grad=True)
    fake_quantize(beyond, scale, zp, qmin, qmax).sum().backward()
    assert beyond.grad.tolist() == [0.0, 0.0]


def test_fake_quantize_float64_matches_torch():
    # torch's CPU op rounds the scale to float32 even for float64 input; effedu keeps it in float64: values agree
    # to float32's precision of the scale, the STE masks exactly
    x = _boundary_values(0.1, 0, -127, 127).double()
    frac = (x / 0.1).abs() % 1
    x = x[(frac - 0.5).abs() > 1e-3]  # exact ties round by the scale's last bit, which differs (see above)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fake_quantize(a, 0.1, 0, -127, 127)
    yb = torch.fake_quantize_per_tensor_affine(b, 0.1, 0, -127, 127)
    assert ya.dtype == torch.float64 and torch.allclose(ya, yb, rtol=1e-6, atol=1e-9)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(a.grad, b.grad)
    yh = fake_quantize(x.to(torch.bfloat16), 0.1, 0, -127, 127)
    assert yh.dtype == torch.bfloat16 and torch.allclose(yh.double(), yb.detach(), atol=0.1)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fake_quantize_per_channel_matches_torch(axis):
    g = torch.Generator().manual_seed(axis)
    x = torch.randn(5, 6, 7, generator=g) * 2
    C = x.shape[axis]
    scale = torch.rand(C, generator=g) * 0.05 + 0.01
    zp = torch.randint(0, 256, (C,), generator=g, dtype=torch.int32)
    # put boundary values into the tensor: first slice along axis hits qmin/qmax exactly and just beyond
    xs = x.movedim(axis, 0).contiguous()
    xs[0].view(-1)[:4] = torch.tensor([0 - int(zp[0]), 255 - int(zp[0]), -1 - int(zp[0]), 256 - int(zp[0])],
                                      dtype=x.dtype) * scale[0]
    x = xs.movedim(0, axis).contiguous()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fake_quantize(a, scale, zp, 0, 255, axis=axis)
    yb = torch.fake_quantize_per_channel_affine(b, scale, zp, axis, 0, 255)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(a.grad, b.grad)
    assert 0 < float(a.grad.mean()) < 1  # some clamped, some not: the mask is really exercised
    # calibrate's broadcastable (keepdim) parameters give the same as the 1-D ones
    shape = [1, 1, 1]
    shape[axis] = C
    assert torch.equal(fake_quantize(x, scale.reshape(shape), zp.reshape(shape), 0, 255), yb.detach())


def test_fake_quantize_equals_quantize_then_dequantize():
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    for scheme in ("symmetric", "affine"):
        s, z, qmin, qmax = calibrate(x, 5, scheme=scheme, axis=0)
        q, s2, z2 = quantize(x, 5, scheme=scheme, axis=0)
        assert torch.equal(fake_quantize(x, s, z, qmin, qmax), dequantize(q, s2, z2))


def test_fake_quantize_gradcheck_in_the_fine_grid_limit():
    # with a grid much finer than gradcheck's step the STE is the true derivative of clamp: 1 inside, 0 outside
    x = torch.tensor([-3e-3, -5e-4, 1e-4, 7e-4, 2e-3, 4e-3], dtype=torch.float64, requires_grad=True)
    s, lim = 1e-12, 2 ** 30  # range ±1.07e-3
    assert torch.autograd.gradcheck(lambda t: fake_quantize(t, s, 0, -lim, lim), (x,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda t: fake_quantize(t, s, 5, -lim, lim) ** 2, (x,), eps=1e-6, atol=1e-5)


def test_fake_quantize_rejects_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        fake_quantize(torch.ones(3, dtype=torch.int32), 0.1, 0, -127, 127)
    with pytest.raises(ValueError, match="need qmin < qmax"):
        fake_quantize(x, 0.1, 0, 5, 5)
    with pytest.raises(ValueError, match="scale must be positive"):
        fake_quantize(x, 0.0, 0, -127, 127)
    with pytest.raises(ValueError, match="zero_point must lie in"):
        fake_quantize(x, 0.1, 300, 0, 255)
    with pytest.raises(TypeError, match="zero_point must be an integer"):
        fake_quantize(x, 0.1, 0.5, 0, 255)
    with pytest.raises(ValueError, match="3 channels along axis 1|4 values but x has 3"):
        fake_quantize(x, torch.ones(4) * 0.1, torch.zeros(4, dtype=torch.int32), 0, 255, axis=0)


# --------------------------------------------------------------------------------------------------------------
# QuantizedLinear: real int8
# --------------------------------------------------------------------------------------------------------------


def _oracle_linear(lin, x, act_scheme):
    """Dequantised-weight float Linear on fake-quantised activations, built from torch's own fake-quant ops."""
    w = lin.weight.detach()
    s_w = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).eps)
    w_dq = torch.fake_quantize_per_channel_affine(w, s_w, torch.zeros_like(s_w, dtype=torch.int32), 0, -127, 127)
    x2 = x.reshape(-1, x.shape[-1])
    if act_scheme == "symmetric":
        s = (x2.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).eps)
        xq = torch.fake_quantize_per_channel_affine(x2, s, torch.zeros_like(s, dtype=torch.int32), 0, -127, 127)
    else:
        lo, hi = x2.amin(dim=1).clamp_max(0), x2.amax(dim=1).clamp_min(0)
        s = ((hi - lo) / 255).clamp_min(torch.finfo(torch.float32).eps)
        z = (-torch.round(lo / s)).clamp(0, 255).to(torch.int32)
        xq = torch.fake_quantize_per_channel_affine(x2, s, z, 0, 0, 255)
    return F.linear(xq, w_dq, lin.bias).reshape(*x.shape[:-1], -1), s, s_w


@pytest.mark.parametrize("act_scheme", ["symmetric", "affine"])
@pytest.mark.parametrize("backend, shift", [("torch", 0.3), ("numba", 0.3), ("torch._int_mm", 0.3),
                                            ("torch", "positive"), ("torch", "negative")])
def test_quantized_linear_matches_its_float_oracle(act_scheme, backend, shift):
    torch.manual_seed(0)
    lin = nn.Linear(33, 17)
    x = torch.randn(3, 7, 33)
    # one-sided rows put the affine zero point at its ends (z = 0 for x ≥ 0, z = 255 for x ≤ 0)
    x = {"positive": x.abs(), "negative": -x.abs()}.get(shift, x + 0.3 if shift == 0.3 else x)
    ql = QuantizedLinear.from_linear(lin, backend=backend, act_scheme=act_scheme)
    y = ql(x)
    assert y.shape == (3, 7, 17) and y.dtype == torch.float32
    want, s_x, s_w = _oracle_linear(lin, x, act_scheme)
    # the same arithmetic up to float32 rounding of the oracle's sums (the int32 sum is exact)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)
    # and the float Linear within the quantisation error bound Σ_k |x|·s_w/2 + |w|·s_x/2 + s_x·s_w/4
    x2 = x.reshape(-1, 33)
    bound = (x2.abs() @ (s_w[:, None] / 2).expand(17, 33).t() + (s_x[:, None] / 2) * lin.weight.abs().sum(1)
             + s_x[:, None] * s_w[None, :] * 33 / 4)
    err = (y.reshape(-1, 17) - lin(x2)).abs()
    assert bool((err <= bound * 1.001 + 1e-6).all())
    assert float(err.detach().max()) < 0.05


def test_quantized_linear_layout_bytes_and_edge_cases():
    lin = nn.Linear(8, 5, bias=False)
    ql = QuantizedLinear.from_linear(lin)
    assert ql.weight_int8.shape == (5, 8) and ql.weight_int8.is_contiguous() and ql.weight_int8_t.dtype == torch.int8
    assert set(ql.state_dict()) == {"weight_int8", "weight_scale"}
    assert ql.weight_bytes() == 5 * 8 + 5 * 4
    assert torch.allclose(ql.dequantized_weight(), lin.weight, atol=float(ql.weight_scale.max()) / 2 + 1e-7)
    assert ql(torch.zeros(0, 8)).shape == (0, 5)
    assert torch.equal(ql(torch.zeros(2, 8)), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="in_features=8"):
        ql(torch.randn(2, 7))
    with pytest.raises(TypeError, match="floating-point"):
        ql(torch.ones(2, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="unknown backend"):
        QuantizedLinear.from_linear(lin, backend="fast")
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        QuantizedLinear.from_linear(nn.Conv1d(2, 2, 1))
    assert int_mm_supported(5, 7, 3, "cpu") and not int_mm_supported(16, 8, 8, "cuda")


def test_quantize_linears_replaces_the_encoder_linears():
    model = _tiny()
    tokens = torch.randint(0, 16, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = model(tokens)
    before = model_bytes(model)
    n = quantize_linears(model, backend="torch")
    assert n == 4 * 2  # qkv, proj, fc1, fc2 per layer
    assert isinstance(model.head, nn.Linear)  # outside the blocks: left in float
    lin_params = sum(16 * 48 + 16 * 16 + 16 * 32 + 32 * 16 for _ in range(2))
    # int8 weights save 3 of every 4 bytes, scales cost 4 bytes per output channel
    scales = 2 * (48 + 16 + 32 + 16) * 4
    assert before - model_bytes(model) == 3 * lin_params - scales
    with torch.no_grad():
        out, ref = model(tokens), ref.detach()
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())
    model2 = _tiny()
    assert quantize_linears(model2, skip=("fc2",)) == 6
    assert quantize_linears(_tiny(), skip=("blocks.0.*",)) == 4
    with pytest.raises(ValueError, match="has no .blocks"):
        quantize_linears(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------------------
# PTQ at any width, QAT
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ptq_puts_weights_on_the_grid_and_counts_bytes(bits):
    model = _tiny()
    float_bytes = model_bytes(model)
    nbytes = ptq(model, bits, per_channel=True)
    n_w = 2 * (16 * 48 + 16 * 16 + 16 * 32 + 32 * 16)
    n_ch = 2 * (48 + 16 + 32 + 16)
    assert nbytes == float_bytes - 4 * n_w + math.ceil(n_w * bits / 8) + 4 * n_ch
    w = model.blocks[0].ffn.fc1.weight
    for row in w:
        assert row.unique().numel() <= 2 ** bits - 1


def test_qat_trains_and_converts():
    torch.manual_seed(0)
    model = _tiny(seed=1).train()
    prepare_qat(model, 4)
    assert isinstance(model.blocks[0].attn.qkv, QATLinear)
    tokens = torch.randint(0, 16, (8, 12), generator=torch.Generator().manual_seed(2))
    losses = []
    params = [p for p in model.parameters() if p.requires_grad]
    m1, m2 = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step in range(1, 13):  # Adam by hand: torch.optim's first step imports torch._dynamo (seconds)
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p, a, b in zip(params, m1, m2):
                a.lerp_(p.grad, 0.1)
                b.lerp_(p.grad ** 2, 0.001)
                p -= 1e-2 * (a / (1 - 0.9 ** step)) / ((b / (1 - 0.999 ** step)).sqrt() + 1e-8)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.grad is not None and float(qkv.act_max) > float(qkv.act_min)
    model.eval()
    for m in model.modules():
        if isinstance(m, QATLinear):
            m.act_bits = None  # below 8 bits convert_qat keeps activations float: compare like with like
    with torch.no_grad():
        y_qat = model(tokens[:, :-1])
    convert_qat(model)
    assert type(model.blocks[0].attn.qkv) is nn.Linear  # 4 bits: a float Linear on the 4-bit grid
    assert model.blocks[0].attn.qkv.weight[0].unique().numel() <= 15
    with torch.no_grad():
        assert torch.allclose(model(tokens[:, :-1]), y_qat, atol=1e-5)
    m8 = prepare_qat(_tiny(), 8)
    convert_qat(m8, backend="torch")
    assert isinstance(m8.blocks[1].ffn.fc2, QuantizedLinear)


# --------------------------------------------------------------------------------------------------------------
# iPQ
# --------------------------------------------------------------------------------------------------------------


def test_product_quantization_objective_never_rises():
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    cb, codes, hist = product_quantize(w, 4, 16, iters=15, seed=0)
    assert cb.shape == (16, 4) and codes.shape == (48 * 8,) and codes.dtype == torch.int64
    assert len(hist) == 16 and all(b <= a for a, b in zip(hist, hist[1:])) and hist[-1] < hist[0]
    rec = pq_reconstruct(cb, codes, w.shape, 4)
    assert math.isclose(float((rec - w).pow(2).sum()), hist[-1], rel_tol=1e-5)
    assert pq_bytes(cb, codes) == 48 * 8 * 4 // 8 + 16 * 4 * 4  # 4-bit codes + float32 codebook
    # as many centroids as blocks: every block is its own centroid
    _, _, h = product_quantize(w[:4, :8], 4, 8, iters=2)
    assert h[-1] == 0.0


def test_ipq_quantizes_layer_by_layer():
    model = _tiny()
    before = model_bytes(model)
    calls = []
    report = ipq(model, 4, 8, iters=5, finetune=lambda m: calls.append(
        [m.blocks[1].ffn.fc1.weight.requires_grad, m.blocks[0].ffn.fc1.weight.requires_grad]))
    assert calls == [[True, False], [False, False]]  # layer 1 still float while layer 0 is fine-tuned around
    assert len(report["layers"]) == 8 and report["bytes"] < before / 2
    assert model.blocks[0].ffn.fc1.weight.reshape(-1, 4).unique(dim=0).shape[0] <= 8


def test_pq_rejects_bad_arguments():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="block_size=4 must divide"):
        product_quantize(w, 4, 2)
    with pytest.raises(ValueError, match="exceeds the number of blocks"):
        product_quantize(w, 3, 9)
    with pytest.raises(TypeError, match="2-D floating-point"):
        product_quantize(torch.randn(6), 3, 2)


# --------------------------------------------------------------------------------------------------------------
# Quant-Noise
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer", ["int8", "pq"])
def test_quant_noise_limits(quantizer):
    torch.manual_seed(0)
    lin = nn.Linear(16, 6)
    x = torch.randn(5, 16)
    qn = QuantNoise(lin, 0.0, 4, quantizer, n_centroids=4).train()
    assert torch.equal(qn(x), lin(x))
    qn = QuantNoise(lin, 1.0, 4, quantizer, bits=4, n_centroids=4).train()
    wq = qn.quantized_weight().detach()
    w = lin.weight.detach()
    if quantizer == "int8":  # oracle: torch's per-channel fake quantisation on the 4-bit symmetric grid
        s = w.abs().amax(dim=1) / 7
        want = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(6, dtype=torch.int32), 0, -7, 7)
    else:  # oracle: every block replaced by its nearest centroid (torch.cdist)
        sub = w.reshape(-1, 4)
        want = qn.codebook[torch.cdist(sub, qn.codebook).argmin(dim=1)].reshape(w.shape)
    assert torch.allclose(wq, want, atol=1e-6) and not torch.equal(wq, w)
    assert torch.allclose(qn(x), F.linear(x, wq, lin.bias))
    qn.eval()
    assert torch.equal(qn(x), lin(x))
    # STE: the gradient reaches the float weight
    qn.train()
    qn(x).sum().backward()
    assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0


def test_quant_noise_quantizes_about_a_fraction_p_of_blocks():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    qn = QuantNoise(lin, 0.3, 8, "int8", bits=2).train()
    changed = (qn.noisy_weight() != lin.weight).reshape(64, 8, 8).any(dim=2).double().mean()
    assert 0.2 < float(changed) < 0.4
    model = quant_noise(_tiny(), 0.1, 4)
    assert isinstance(model.blocks[0].ffn.fc1, QuantNoise)
    assert strip_quant_noise(model) == 8 and type(model.blocks[0].ffn.fc1) is nn.Linear
    with pytest.raises(ValueError, match="p must be a number in"):
        QuantNoise(lin, 1.5, 8)
    with pytest.raises(ValueError, match="unknown quantizer"):
        QuantNoise(lin, 0.5, 8, "fp4")


def test_half_precision_inputs_use_float32_scales():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(4)).half()
    q, s, z = quantize(x, 8, axis=1)
    assert s.dtype == torch.float32 and bool(((x.float() - dequantize(q, s, z)).abs() <= s / 2 + 1e-6).all())


def test_model_level_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        ptq(_tiny(), 1)
    with pytest.raises(TypeError, match="per_channel must be a bool"):
        ptq(_tiny(), 4, per_channel=1)
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        prepare_qat(_tiny(), 9)
    with pytest.raises(ValueError, match="unknown backend"):
        quantize_linears(_tiny(), backend="onednn")
    with pytest.raises(TypeError, match="skip must be a tuple of name patterns"):
        quantize_linears(_tiny(), skip="fc2")
    with pytest.raises(TypeError, match="finetune must be a callable"):
        ipq(_tiny(), 4, 8, finetune=3)
    with pytest.raises(ValueError, match="x is empty"):
        calibrate(torch.zeros(0), 8)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        model_bytes("model")
