"""The RMU loss ops and the activation-cache format on the CPU (reference backend): values and
gradients against the published `F.mse_loss` form, masks, packing, RMULoss, argument errors.

The same checks against the Triton kernels (run in Triton's interpreter, and on a GPU when there
is one) are in tests/test_kernels_rmu.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wmdp_fast import ops, reference
from wmdp_fast.errors import ConfigError, DataError, TrainingError

F32 = {"rtol": 1e-6, "atol": 1e-8}


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.delenv("WMDP_FAST_FORCE_TRITON", raising=False)


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _published(hidden, target, mask=None, scale=1.0):
    """RMU's loss the way the published code writes it (float32 casts), masked by selection."""
    h, t = hidden.float(), target.float().expand_as(hidden)
    if mask is not None:
        keep = mask.bool()
        h, t = h[keep], t[keep]
    return F.mse_loss(h, t) * scale


def _loss_and_grad(fn, hidden, *args, grad_output=1.0, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    loss = fn(h, *args, **kwargs)
    (g,) = torch.autograd.grad(loss, h, grad_outputs=torch.tensor(grad_output))
    return loss.detach(), g


def test_backend_is_reference_on_cpu(monkeypatch):
    assert ops.backend_of("rmu_mse", "cpu") == "reference"
    monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
    assert ops.backend_of("rmu_loss", "cpu") == "triton-interpret"


@pytest.mark.parametrize("tshape", ["full", "b11d", "d"])
@pytest.mark.parametrize("shape", [(4, 16, 64), (3, 37, 4097)])
def test_rmu_mse_matches_published_float32(shape, tshape):
    h = _rand(*shape)
    D = shape[-1]
    t = {"full": _rand(*shape, seed=1), "b11d": _rand(1, 1, D, seed=1), "d": _rand(D, seed=1)}[
        tshape
    ]
    loss, g = _loss_and_grad(ops.rmu_mse, h, t, grad_output=0.37)
    want, gw = _loss_and_grad(_published, h, t, grad_output=0.37)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, want, **F32)
    torch.testing.assert_close(g, gw, **F32)


def test_rmu_mse_other_hidden_ranks_and_scale():
    for shape in [(64,), (7, 64), (2, 3, 5, 64)]:
        h, t = _rand(*shape), _rand(*shape, seed=1)
        loss, g = _loss_and_grad(ops.rmu_mse, h, t, scale=1200.0)
        want, gw = _loss_and_grad(_published, h, t, scale=1200.0)
        torch.testing.assert_close(loss, want, **F32)
        torch.testing.assert_close(g, gw, **F32)


def test_broadcast_target_of_higher_rank_than_hidden():
    """hidden [T, D] or [D] with the published control vector [1, 1, D]: the same value as
    [D], and no 'different target size' warning from F.mse_loss (the result is right)."""
    import warnings

    for shape in [(5, 16), (16,)]:
        h, cv = _rand(*shape), _rand(1, 1, 16, seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss, g = _loss_and_grad(ops.rmu_mse, h, cv, grad_output=0.5)
        want, gw = _loss_and_grad(_published, h, cv.reshape(16), grad_output=0.5)
        torch.testing.assert_close(loss, want, **F32)
        torch.testing.assert_close(g, gw, **F32)


def test_rmu_mse_bf16_inputs():
    h, t = _rand(2, 9, 128, dtype=torch.bfloat16), _rand(2, 9, 128, dtype=torch.bfloat16, seed=1)
    loss, g = _loss_and_grad(ops.rmu_mse, h, t, grad_output=2.0)
    want, gw = _loss_and_grad(_published, h, t, grad_output=2.0)
    # the loss is float32 math on exactly-converted bf16 values; the gradient comes back in bf16
    torch.testing.assert_close(loss, want, **F32)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), gw.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_rmu_mse_mask_counts_only_true_positions(mask_dtype):
    h, t = _rand(3, 11, 32), _rand(3, 11, 32, seed=1)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[0, 0] = True
    loss, g = _loss_and_grad(ops.rmu_mse, h, t, mask.to(mask_dtype), scale=3.0, grad_output=0.5)
    want, gw = _loss_and_grad(_published, h, t, mask, scale=3.0, grad_output=0.5)
    torch.testing.assert_close(loss, want, **F32)
    torch.testing.assert_close(g, gw, **F32)
    assert torch.all(g[~mask] == 0)


def test_masked_out_positions_never_leak_nan():
    h, t = _rand(2, 4, 16), _rand(2, 4, 16, seed=1)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    h[1, 3] = float("nan")
    t[1, 3, 2] = float("inf")
    loss, g = _loss_and_grad(ops.rmu_mse, h, t, mask)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, _published(h, t, mask), **F32)


def test_rmu_loss_equals_two_published_mse_calls():
    hf, hr = _rand(2, 12, 48), _rand(2, 20, 48, seed=1)
    cv = _rand(1, 1, 48, seed=2).abs() * 6.5
    h0 = _rand(2, 20, 48, seed=3)
    hf.requires_grad_(True)
    hr.requires_grad_(True)
    total, lf, lr = ops.rmu_loss(hf, cv, hr, h0, 1200.0)
    gf, gr = torch.autograd.grad(total, (hf, hr))
    wf, wr = F.mse_loss(hf, cv.expand_as(hf)), 1200.0 * F.mse_loss(hr, h0)
    wgf, wgr = torch.autograd.grad(wf + wr, (hf, hr))
    torch.testing.assert_close(lf, wf.detach(), **F32)
    torch.testing.assert_close(lr, wr.detach(), **F32)
    torch.testing.assert_close(total.detach(), (wf + wr).detach(), **F32)
    torch.testing.assert_close(gf, wgf, **F32)
    torch.testing.assert_close(gr, wgr, **F32)
    assert not lf.requires_grad and not lr.requires_grad and total.requires_grad


def test_rmu_loss_with_masks_and_packed_target():
    hf, hr = _rand(2, 6, 32), _rand(3, 5, 32, seed=1)
    h0 = _rand(3, 5, 32, seed=2)
    fm = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    rm = torch.ones(3, 5, dtype=torch.bool)
    rm[2, :2] = False
    packed = ops.pack_activations(h0, "int8")
    total, lf, lr = ops.rmu_loss(hf, torch.ones(32), hr, packed, 5.0, fm, rm)
    deq = ops.unpack_activations(packed, torch.float32)
    torch.testing.assert_close(lf, _published(hf, torch.ones(32), fm), **F32)
    torch.testing.assert_close(lr, _published(hr, deq, rm, 5.0), **F32)
    torch.testing.assert_close(total, lf + lr, **F32)


def test_pack_bf16_is_lossless_for_bf16():
    h = _rand(2, 7, 64, dtype=torch.bfloat16)
    p = ops.pack_activations(h, "bf16")
    assert p.fmt == "bf16" and p.scale is None and p.data.dtype == torch.bfloat16
    assert torch.equal(ops.unpack_activations(p), h)
    assert p.nbytes == h.numel() * 2


def test_pack_int8_error_bound_and_size():
    # heavy-tailed rows with outliers and an all-zero row: the bound is per position
    h = _rand(4, 33, 257) * torch.linspace(0.01, 50.0, 33)[None, :, None]
    h[0, 5, 17] = 400.0
    h[1, 2] = 0.0
    p = ops.pack_activations(h, "int8")
    assert p.fmt == "int8" and p.data.dtype == torch.int8 and p.scale.dtype == torch.float32
    assert p.scale.shape == h.shape[:-1]
    assert p.nbytes == h.numel() + 4 * h[..., 0].numel()  # ~half of bf16
    err = (ops.unpack_activations(p, torch.float32) - h).abs()
    bound = h.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-4)
    assert torch.all(err <= bound)
    assert torch.all(err[1, 2] == 0)
    # the bound is not loose: some element comes close to half a step
    assert float((err / bound.clamp_min(1e-30)).max()) > 0.9
    # unpack defaults to the original dtype
    assert ops.unpack_activations(p).dtype == torch.float32
    assert (
        ops.unpack_activations(ops.pack_activations(h.bfloat16(), "int8")).dtype == torch.bfloat16
    )


class _CudaScalarDivision(torch.overrides.TorchFunctionMode):
    """PyTorch's CUDA arithmetic for `tensor / number`, on the CPU: div_true_kernel_cuda
    multiplies by the reciprocal rounded to float32 ("may lose one bit of precision compared
    to computing the division"); the CPU divides exactly."""

    DIV = (torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.DIV and not kwargs and len(args) == 2 and isinstance(args[1], (int, float)):
            return args[0] * torch.tensor(1.0 / args[1], dtype=torch.float64).to(args[0].dtype)
        return func(*args, **kwargs)


def test_int8_scale_is_the_exact_quotient_with_cuda_division():
    """The reference's scale is absmax / 127 correctly rounded on every device. It divided by
    the number 127, which CUDA computes as absmax * float32(1 / 127): 1 ulp off for ~5% of the
    rows, so on a GPU the reference disagreed with the CPU reference and the int8 kernel."""
    mags = torch.arange(0x3F80, 0x4400, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = torch.zeros(mags.numel(), 8)
    x[:, 3] = -mags.float()  # one row per bf16 absmax in [1, 512)
    x[:, 5] = mags.float() / 3
    want = (x.abs().amax(-1).double() / reference.INT8_QMAX).float()
    with _CudaScalarDivision():
        emulated = x.abs().amax(-1) / reference.INT8_QMAX
        q, scale = reference.int8_quantize(x)
    assert not torch.equal(emulated, want)  # the emulation does what CUDA does
    assert torch.equal(scale, want)
    assert torch.equal(q, reference.int8_quantize(x)[0])


def test_int8_target_loss_error_bound():
    """|L(int8 target) - L(exact)| <= scale * (2 sqrt(L/scale * E) + E), E = mean(e^2) <=
    mean over positions of (absmax / 254)^2 (Cauchy-Schwarz), documented in docs/fused_ops.md."""
    h, t = _rand(3, 17, 200), _rand(3, 17, 200, seed=1) * 4
    p = ops.pack_activations(t, "int8")
    scale = 7.0
    exact = float(ops.rmu_mse(h, t, scale=scale))
    approx = float(ops.rmu_mse(h, p, scale=scale))
    E = float(((t.abs().amax(-1) / 254 * (1 + 1e-4)) ** 2).mean())
    assert abs(approx - exact) <= scale * (2 * math.sqrt(exact / scale * E) + E)
    assert approx != exact


def test_packed_activations_indexing_and_to():
    h = _rand(4, 5, 16)
    p = ops.pack_activations(h, "int8")
    sub = p[1:3]
    assert sub.shape == (2, 5, 16) and sub.scale.shape == (2, 5)
    assert torch.equal(ops.unpack_activations(sub), ops.unpack_activations(p)[1:3])
    assert p.to("cpu") is p
    with pytest.raises(IndexError):
        p[..., 0]


def test_rmu_loss_module_matches_published_per_topic():
    D = 24
    gen = torch.Generator().manual_seed(0)
    cvs = []
    for coeff in (6.5, 20.0):
        u = torch.rand(1, 1, D, generator=gen)
        cvs.append(u / torch.norm(u) * coeff)
    loss_fn = ops.RMULoss(cvs, [1200.0, 100.0])
    hf, hr, h0 = _rand(2, 7, D), _rand(2, 9, D, seed=1), _rand(2, 9, D, seed=2)
    for k in (0, 1):
        total, lf, lr = loss_fn(hf, hr, h0, topic=k)
        want = F.mse_loss(hf, cvs[k].expand_as(hf)) + [1200.0, 100.0][k] * F.mse_loss(hr, h0)
        torch.testing.assert_close(total, want, **F32)
    with pytest.raises(ConfigError, match="topic"):
        loss_fn(hf, hr, h0, topic=2)
    # one control vector given as a single tensor [D] or [1, 1, D]: one topic, not D topics
    for one in (cvs[1].reshape(D), cvs[1]):
        single = ops.RMULoss(one, 100.0)
        assert single.control_vecs.shape == (1, 1, 1, D) and single.alphas == [100.0]
        torch.testing.assert_close(single(hf, hr, h0)[0], loss_fn(hf, hr, h0, topic=1)[0], **F32)
    with pytest.raises(ConfigError, match="alphas"):
        ops.RMULoss(cvs, [1.0])


class _TinyLayers(torch.nn.Module):
    def __init__(self, D):
        super().__init__()
        self.a = torch.nn.Linear(D, 2 * D)
        self.b = torch.nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.b(torch.nn.functional.gelu(self.a(x)))


def train_two_steps(
    loss_kind: str, dtype=torch.float32, grad_fns: list | None = None
) -> list[torch.Tensor]:
    """Two RMU steps on a tiny residual block (AdamW as published: eps 1e-6, no decay).
    `grad_fns`, if given, collects the type name of each step's loss.grad_fn (which backend
    ran)."""
    torch.manual_seed(0)
    D = 32
    model = _TinyLayers(D).to(dtype)
    frozen = _TinyLayers(D).to(dtype)
    frozen.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, eps=1e-6, weight_decay=0.0)
    cv = (torch.rand(1, 1, D) / math.sqrt(D) * 6.5).to(dtype)
    for step in range(2):
        xf = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(10 + step)).to(dtype)
        xr = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(20 + step)).to(dtype)
        hf, hr = model(xf), model(xr)
        with torch.no_grad():
            h0 = frozen(xr)
        if loss_kind == "published":
            loss = F.mse_loss(hf, cv.expand_as(hf)) + 100.0 * F.mse_loss(hr, h0)
        else:
            loss = ops.rmu_loss(hf, cv, hr, h0, 100.0)[0]
        if grad_fns is not None:
            grad_fns.append(type(loss.grad_fn).__name__)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_training_step_through_rmu_loss_equals_mse_loss():
    """On the CPU ops.rmu_loss runs the reference twin, which IS F.mse_loss, so this only checks
    the op layer (argument handling, the two terms' sum and alpha). The check that can fail on
    the arithmetic is tests/test_kernels_rmu.py::test_training_step_through_kernels_equals_mse_loss
    (the same two steps through the Triton kernels in the interpreter, and on a GPU
    test_gpu_training_step)."""
    grad_fns = []
    got, want = train_two_steps("fused", grad_fns=grad_fns), train_two_steps("published")
    assert grad_fns and all("RMULossFunction" not in n for n in grad_fns), grad_fns
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def _bad(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_argument_errors_name_the_argument():
    h = _rand(2, 3, 8)
    t = _rand(2, 3, 8, seed=1)
    _bad(lambda: ops.rmu_mse(h, _rand(2, 4, 8)), ConfigError, "target has shape")
    _bad(lambda: ops.rmu_mse(h, _rand(3, 8)), ConfigError, "target has shape")
    _bad(lambda: ops.rmu_mse(h, _rand(1, 1, 9)), ConfigError, "target has shape")
    _bad(lambda: ops.rmu_mse(h, t.requires_grad_(True)), ConfigError, "target requires grad")
    t = t.detach()
    _bad(lambda: ops.rmu_mse(h.long(), t), ConfigError, "hidden dtype")
    _bad(lambda: ops.rmu_mse(h, t, torch.ones(2, 4)), ConfigError, "mask has shape")
    _bad(lambda: ops.rmu_mse(h, t, torch.zeros(2, 3, dtype=torch.bool)), DataError, "no true")
    _bad(lambda: ops.rmu_mse(h, t, torch.full((2, 3), 2)), ConfigError, "only 0 and 1")
    _bad(lambda: ops.rmu_mse(h, t, scale=float("nan")), ConfigError, "scale must be finite")
    _bad(lambda: ops.rmu_mse(h, "x"), ConfigError, "target must be a tensor")
    hn = h.clone()
    hn[0, 0, 0] = float("inf")
    _bad(lambda: ops.rmu_mse(hn, t, check_finite=True), TrainingError, "hidden contains NaN")
    tn = t.clone()
    tn[1, 2, 3] = float("nan")
    _bad(lambda: ops.rmu_mse(h, tn, check_finite=True), TrainingError, "target contains NaN")
    _bad(
        lambda: ops.rmu_loss(h, torch.ones(8), h, tn, 1.0, check_finite=True),
        TrainingError,
        "retain_target contains NaN",
    )
    _bad(lambda: ops.rmu_loss(h, torch.ones(7), h, t, 1.0), ConfigError, "control_vec has shape")
    _bad(
        lambda: ops.rmu_loss(h, torch.ones(8), h, t, 1.0, retain_mask=torch.zeros(2, 3)),
        DataError,
        "retain_mask has no true entry",
    )
    _bad(lambda: ops.pack_activations(h, "fp8"), ConfigError, "fmt must be one of")
    hn[0, 0, 0] = float("nan")
    _bad(lambda: ops.pack_activations(hn, "int8"), DataError, r"position \(0, 0\)")
    _bad(lambda: ops.unpack_activations(h), ConfigError, "expected a PackedActivations")
    # without check_finite a NaN simply propagates (no hidden sync)
    assert torch.isnan(ops.rmu_mse(torch.where(hn.isnan(), hn, h), t))


def test_packed_target_that_requires_grad_or_mixes_devices_is_refused():
    """A PackedActivations is a constant like a tensor target: a bf16 `data` (or an int8
    `scale`) that requires grad used to pass and the reference backpropagated into it; a
    `scale` on another device than `data` was never compared."""
    h = _rand(2, 3, 8)
    t = _rand(2, 3, 8, seed=1)
    bf = ops.pack_activations(t, "bf16")
    i8 = ops.pack_activations(t, "int8")
    P = reference.PackedActivations
    leaky_bf = P(bf.data.clone().requires_grad_(True), None, "bf16", t.dtype)
    leaky_i8 = P(i8.data, i8.scale.clone().requires_grad_(True), "int8", t.dtype)
    _bad(lambda: ops.rmu_mse(h, leaky_bf), ConfigError, r"^rmu_mse: target\.data requires grad")
    _bad(lambda: ops.rmu_mse(h, leaky_i8), ConfigError, r"^rmu_mse: target\.scale requires grad")
    _bad(
        lambda: ops.rmu_loss(h, torch.ones(8), h, leaky_bf, 2.0),
        ConfigError,
        r"^rmu_loss: retain_target\.data requires grad",
    )
    meta = P(i8.data, i8.scale.to("meta"), "int8", t.dtype)
    _bad(
        lambda: ops.rmu_mse(h, meta),
        ConfigError,
        r"target\.scale is on meta but target\.data is on cpu; .*\.to\(device\)",
    )
    half = P(i8.data, i8.scale.half(), "int8", t.dtype)
    _bad(lambda: ops.rmu_mse(h, half), ConfigError, "malformed PackedActivations")
    # the same objects, built as intended, are accepted and give the reference value
    for p in (bf, i8):
        want = reference.rmu_mse(h, reference.unpack_activations(p, torch.float32))
        torch.testing.assert_close(ops.rmu_mse(h, p), want, **F32)


def _f64_cases():
    """(name, target, mask) on hidden [2, 3, 8] float64: broadcast [D] + mask, full, int8."""
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    full = _rand(2, 3, 8, dtype=torch.float64, seed=1)
    return [
        ("[D] + mask", _rand(8, dtype=torch.float64, seed=2), mask),
        ("[1, 1, D]", _rand(1, 1, 8, dtype=torch.float64, seed=2), None),
        ("full", full, None),
        ("int8 + mask", reference.pack_activations(full, "int8"), mask),
    ]


def test_reference_gradcheck_and_gradgradcheck_float64():
    """The reference twins keep float64 (only they accept it), so torch's numerical checks of
    first and second derivatives apply: the truth the fused ops' autograd is compared with."""
    h = _rand(2, 3, 8, dtype=torch.float64).requires_grad_(True)
    hr = _rand(3, 2, 8, dtype=torch.float64, seed=3).requires_grad_(True)
    t_r = _rand(3, 2, 8, dtype=torch.float64, seed=4)
    for name, t, m in _f64_cases():
        assert reference.rmu_mse(h, t, m).dtype == torch.float64, name
        fn = lambda x, t=t, m=m: reference.rmu_mse(x, t, m, 2.5)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (h,)), name
        assert torch.autograd.gradgradcheck(fn, (h,)), name
        loss = lambda a, b, t=t, m=m: reference.rmu_loss(a, t, b, t_r, 7.0, m)[0]  # noqa: E731
        assert torch.autograd.gradgradcheck(loss, (h, hr)), name


def test_rmu_mse_grad_is_the_reference_gradient():
    """reference.rmu_mse_grad (what the fused ops' backward recomputes with for retain_graph and
    create_graph) equals autograd through reference.rmu_mse, and is itself correctly
    differentiable w.r.t. hidden and grad_output (gradcheck in float64)."""
    tol = {
        torch.float64: {"rtol": 1e-12, "atol": 1e-15},
        torch.float32: {"rtol": 1e-6, "atol": 1e-9},
        torch.bfloat16: {"rtol": 2**-7, "atol": 0.0},  # one rounding each: at most 1 ulp apart
        torch.float16: {"rtol": 2**-10, "atol": 1e-7},
    }
    for name, t64, m in _f64_cases():
        for dtype, gos in [
            (torch.float64, [0.0, 2.5]),
            (torch.float32, [1.0, -1.5]),
            (torch.bfloat16, [0.3]),
            (torch.float16, [1024.0, 0.0]),
        ]:
            h = _rand(2, 3, 8, dtype=dtype) * (1e-3 if dtype == torch.float16 else 1.0)
            t = t64 if isinstance(t64, reference.PackedActivations) else t64.to(dtype)
            for go in gos:
                go_t = torch.tensor(go, dtype=torch.promote_types(dtype, torch.float32))
                got = reference.rmu_mse_grad(h, t, m, 1.7, go_t)
                x = h.clone().requires_grad_(True)
                (want,) = torch.autograd.grad(reference.rmu_mse(x, t, m, 1.7), x, go_t)
                assert got.dtype == dtype
                torch.testing.assert_close(got, want, **tol[dtype], msg=f"{name} {dtype} {go}")
        h = _rand(2, 3, 8, dtype=torch.float64).requires_grad_(True)
        go = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        fn = lambda x, g, t=t64, m=m: reference.rmu_mse_grad(x, t, m, 1.7, g)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (h, go)), name


def test_inference_mode_target_trains():
    """A target made under torch.inference_mode (a cache) works in training on the reference
    backend too: F.mse_loss saves its target, which torch refuses for an inference tensor."""
    h0 = _rand(2, 3, 8, seed=1)
    with torch.inference_mode():
        t_inf, cv_inf = h0.clone(), h0[0, 0].clone()
    for args in ((t_inf,), (cv_inf,), (t_inf, torch.ones(2, 3, dtype=torch.bool))):
        plain = tuple(a.clone() for a in args)
        _, g = _loss_and_grad(ops.rmu_mse, _rand(2, 3, 8), *args, grad_output=2.0)
        _, want = _loss_and_grad(ops.rmu_mse, _rand(2, 3, 8), *plain, grad_output=2.0)
        torch.testing.assert_close(g, want, **F32)
    h = _rand(2, 3, 8).requires_grad_(True)
    ops.rmu_loss(h, cv_inf, h, t_inf, 3.0)[0].backward()
    x = _rand(2, 3, 8).requires_grad_(True)
    ops.rmu_loss(x, cv_inf.clone(), x, t_inf.clone(), 3.0)[0].backward()
    torch.testing.assert_close(h.grad, x.grad, **F32)


def test_reference_twin_is_what_ops_calls_on_cpu():
    h, t = _rand(2, 5, 16), _rand(2, 5, 16, seed=1)
    assert torch.equal(ops.rmu_mse(h, t, scale=2.0), reference.rmu_mse(h, t, None, 2.0))


def test_docs_example_runs(capsys):
    """The runnable CPU example in docs/fused_ops.md (README section) runs and trains."""
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "fused_ops.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    example = next(b for b in blocks if "torch.manual_seed(0)" in b)
    exec(compile(example, str(doc), "exec"), {})
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+) =", out)]
    assert len(losses) == 3 and losses[2] < losses[0]
