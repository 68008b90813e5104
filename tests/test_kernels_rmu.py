"""The Triton kernels behind ops.rmu_mse / ops.rmu_loss / ops.pack_activations, against the
reference twins and the published `F.mse_loss` form.

On the CPU they run in Triton's interpreter (WMDP_FAST_FORCE_TRITON=1), on small shapes because
the interpreter is slow; the `cuda` variants run the compiled kernels on a GPU (marked gpu).

Tolerances: the loss is float32 arithmetic on exactly-converted inputs in both implementations,
so it agrees to rtol 1e-6 for every input dtype. The gradient is returned in hidden's dtype:
float32 rtol 1e-6; bfloat16 and float16 within 2 units in the last place (rtol 2^-6 and 2^-9):
one rounding each side, plus one more when grad_output != 1 rescales the stored gradient.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from wmdp_fast import ops, reference

HAS_CUDA = torch.cuda.is_available()
F32 = {"rtol": 1e-6, "atol": 1e-8}
GRAD_TOL = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-8},
    torch.bfloat16: {"rtol": 2**-6, "atol": 1e-12},
    torch.float16: {"rtol": 2**-9, "atol": 1e-7},
}

gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


@pytest.fixture(params=["interp", pytest.param("cuda", marks=gpu)])
def device(request, monkeypatch):
    """'cpu' with the kernels forced on (interpreter), or 'cuda'."""
    if request.param == "interp":
        monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
        return "cpu"
    return "cuda"


def _rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _target(kind, shape, dtype, device, seed=1):
    D = shape[-1]
    if kind == "full":
        return _rand(*shape, dtype=dtype, seed=seed, device=device)
    if kind == "b11d":
        return _rand(1, 1, D, dtype=dtype, seed=seed, device=device)
    if kind == "d":
        return _rand(D, dtype=dtype, seed=seed, device=device)
    t = _rand(*shape, dtype=dtype, seed=seed, device=device)
    return ops.pack_activations(t, "int8" if kind == "int8" else "bf16")


def _mask(shape, device, seed=3):
    m = torch.rand(*shape[:-1], generator=torch.Generator().manual_seed(seed)) > 0.4
    m.view(-1)[0] = True
    return m.to(device)


def _run(fn, hidden, *args, grad_output=1.0, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    loss = fn(h, *args, **kwargs)
    (g,) = torch.autograd.grad(loss, h, grad_outputs=torch.tensor(grad_output, device=h.device))
    return loss.detach(), g, loss.grad_fn


def _assert_kernel(grad_fn, name="RMUMSEFunction"):
    assert grad_fn is not None and name in type(grad_fn).__name__, type(grad_fn).__name__


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("kind", ["full", "b11d", "d", "int8", "bf16pack"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmu_mse_kernel_matches_reference(device, dtype, kind, use_mask):
    shape = (2, 5, 33)
    h = _rand(*shape, dtype=dtype, device=device)
    t = _target(kind, shape, dtype, device)
    mask = _mask(shape, device) if use_mask else None
    loss, g, fn = _run(ops.rmu_mse, h, t, mask, scale=2.5, grad_output=0.75)
    _assert_kernel(fn)
    want, gw, _ = _run(reference.rmu_mse, h, t, mask, 2.5, grad_output=0.75)
    torch.testing.assert_close(loss, want, **F32)
    assert g.dtype == dtype
    torch.testing.assert_close(g.float(), gw.float(), **GRAD_TOL[dtype])
    if use_mask:
        assert torch.all(g[~mask] == 0)


@pytest.mark.parametrize(
    "dtype,kind,use_mask",
    [
        (torch.float32, "full", False),
        (torch.float32, "full", True),
        (torch.bfloat16, "b11d", False),
    ],
)
def test_odd_shape_against_published_form(device, dtype, kind, use_mask):
    """B=3, T=37, D=4097: D is one past a power of two, so the row takes two blocks."""
    shape = (3, 37, 4097)
    h = _rand(*shape, dtype=dtype, device=device)
    t = _target(kind, shape, dtype, device)
    mask = _mask(shape, device) if use_mask else None

    def published(hidden, target, mask):
        hh, tt = hidden.float(), target.float().expand_as(hidden)
        if mask is not None:
            hh, tt = hh[mask], tt[mask]
        return F.mse_loss(hh, tt)

    loss, g, fn = _run(ops.rmu_mse, h, t, mask, grad_output=3.0)
    _assert_kernel(fn)
    want, gw, _ = _run(published, h, t, mask, grad_output=3.0)
    torch.testing.assert_close(loss, want, **F32)
    torch.testing.assert_close(g.float(), gw.float(), **GRAD_TOL[dtype])


def test_non_contiguous_inputs(device):
    base = _rand(6, 2, 40, device=device)  # [T, B, D]
    h = base.transpose(0, 1)  # [B, T, D], strided positions
    t = _rand(2, 6, 80, seed=1, device=device)[..., ::2]  # strided D
    cv = _rand(40, seed=2, device=device)[None, None, :].expand(2, 6, 40)  # stride-0 positions
    mask = _mask((6, 2, 40), device).t()  # [B, T], transposed
    for target, m in [(t, None), (t, mask), (cv, mask), (ops.pack_activations(t, "int8"), mask)]:
        loss, g, fn = _run(ops.rmu_mse, h, target, m, grad_output=1.5)
        _assert_kernel(fn)
        want, gw, _ = _run(reference.rmu_mse, h.contiguous(), target, m, grad_output=1.5)
        torch.testing.assert_close(loss, want, **F32)
        torch.testing.assert_close(g, gw, **F32)
    # a [..., D] hidden of rank 4 and a strided D in hidden itself
    h4 = _rand(2, 3, 4, 80, device=device)[..., 1::2]
    t4 = _rand(2, 3, 4, 40, seed=5, device=device)
    loss, g, _ = _run(ops.rmu_mse, h4, t4)
    want, gw, _ = _run(reference.rmu_mse, h4, t4)
    torch.testing.assert_close(loss, want, **F32)
    torch.testing.assert_close(g, gw, **F32)


def test_deterministic_bitwise(device):
    shape = (4, 64, 512) if device == "cuda" else (2, 9, 300)
    h = _rand(*shape, dtype=torch.bfloat16, device=device)
    t = _rand(*shape, dtype=torch.bfloat16, seed=1, device=device)
    runs = [_run(ops.rmu_mse, h, t, grad_output=0.3)[:2] for _ in range(3)]
    for loss, g in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(g, runs[0][1])
    outs = [ops.rmu_loss(h, t[:1, :1], h, t, 50.0) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_backward_twice_with_retain_graph(device):
    """The stored gradient is scaled in place on the first backward; a second backward through
    the same graph must still give grad_output * d(loss)/d(hidden)."""
    h = _rand(3, 4, 50, device=device).requires_grad_(True)
    t = _rand(3, 4, 50, seed=1, device=device)
    loss = ops.rmu_mse(h, t, scale=2.0)
    _assert_kernel(loss.grad_fn)
    torch.autograd.backward(loss, torch.tensor(2.0, device=device), retain_graph=True)
    torch.autograd.backward(loss, torch.tensor(3.0, device=device), retain_graph=True)
    loss.backward()
    want = 6.0 * 2.0 / h.numel() * 2.0 * (h.detach() - t)
    torch.testing.assert_close(h.grad, want, rtol=1e-6, atol=1e-9)
    h.grad = None
    total = ops.rmu_loss(h, t[:1, :1], h, t, 5.0)[0]
    torch.autograd.backward(total, torch.tensor(0.5, device=device), retain_graph=True)
    total.backward()
    want = 1.5 * 2.0 / h.numel() * ((h.detach() - t[:1, :1]) + 5.0 * (h.detach() - t))
    torch.testing.assert_close(h.grad, want, rtol=1e-5, atol=1e-9)


def test_float16_gradient_with_loss_scaling(device):
    """float16 with a large grad_output (manual loss scaling, the usual float16 recipe): the
    unscaled gradient 2 / count * (h - t) is float16-subnormal here, so it must not be rounded
    to float16 before grad_output multiplies it (the reference rounds once, at the end)."""
    h = _rand(2, 4, 64, device=device) * 1e-3
    h = h.half()
    t = torch.zeros(2, 4, 64, dtype=torch.float16, device=device)
    loss, g, fn = _run(ops.rmu_mse, h, t, grad_output=1024.0)
    _assert_kernel(fn)
    want, gw, _ = _run(reference.rmu_mse, h, t, grad_output=1024.0)
    torch.testing.assert_close(loss, want, **F32)
    assert g.dtype == torch.float16
    torch.testing.assert_close(g.float(), gw.float(), **GRAD_TOL[torch.float16])
    a = h.clone().requires_grad_(True)
    total = ops.rmu_loss(a, t[0, 0], h, t, 2.0)[0]
    (g2,) = torch.autograd.grad(total * 1024.0, a)
    torch.testing.assert_close(g2.float(), gw.float(), **GRAD_TOL[torch.float16])


def test_masked_out_int8_scale_never_leaks(device):
    """A masked-out position's int8 scale is never used (as in the reference), even if the
    cache holds NaN there."""
    h, t = _rand(2, 4, 16, device=device), _rand(2, 4, 16, seed=1, device=device)
    p = ops.pack_activations(t, "int8")
    p.scale[1, 3] = float("nan")
    mask = torch.ones(2, 4, dtype=torch.bool, device=device)
    mask[1, 3] = False
    loss, g, fn = _run(ops.rmu_mse, h, p, mask, grad_output=2.0)
    _assert_kernel(fn)
    want, gw, _ = _run(reference.rmu_mse, h, p, mask, grad_output=2.0)
    torch.testing.assert_close(loss, want, **F32)
    torch.testing.assert_close(g, gw, **F32)


def test_rmu_loss_one_launch_matches_reference(device):
    hf = _rand(2, 7, 64, dtype=torch.bfloat16, device=device)
    hr = _rand(3, 5, 64, dtype=torch.bfloat16, seed=1, device=device)
    cv = _rand(1, 1, 64, dtype=torch.bfloat16, seed=2, device=device).abs()
    h0 = _rand(3, 5, 64, dtype=torch.bfloat16, seed=3, device=device)
    fm, rm = _mask((2, 7, 64), device), _mask((3, 5, 64), device, seed=4)
    for target in (h0, ops.pack_activations(h0, "int8")):
        for masks in ((None, None), (fm, rm)):
            a = hf.clone().requires_grad_(True)
            b = hr.clone().requires_grad_(True)
            total, lf, lr = ops.rmu_loss(a, cv, b, target, 1200.0, *masks)
            _assert_kernel(total.grad_fn, "RMULossFunction")
            assert not lf.requires_grad and not lr.requires_grad
            ga, gb = torch.autograd.grad(total * 2.0, (a, b))
            a2 = hf.clone().requires_grad_(True)
            b2 = hr.clone().requires_grad_(True)
            wt, wf, wr = reference.rmu_loss(a2, cv, b2, target, 1200.0, *masks)
            wa, wb = torch.autograd.grad(wt * 2.0, (a2, b2))
            for x, y in ((total, wt), (lf, wf), (lr, wr)):
                torch.testing.assert_close(x.detach(), y.detach(), **F32)
            torch.testing.assert_close(ga.float(), wa.float(), **GRAD_TOL[torch.bfloat16])
            torch.testing.assert_close(gb.float(), wb.float(), **GRAD_TOL[torch.bfloat16])


def test_rmu_loss_partial_grad_and_no_grad(device):
    hf, hr = _rand(2, 3, 16, device=device), _rand(2, 4, 16, seed=1, device=device)
    cv, h0 = torch.ones(16, device=device), _rand(2, 4, 16, seed=2, device=device)
    want = reference.rmu_loss(hf, cv, hr, h0, 3.0)
    a = hf.clone().requires_grad_(True)
    total, _, _ = ops.rmu_loss(a, cv, hr, h0, 3.0)
    (ga,) = torch.autograd.grad(total, a)
    a2 = hf.clone().requires_grad_(True)
    (wa,) = torch.autograd.grad(reference.rmu_loss(a2, cv, hr, h0, 3.0)[0], a2)
    torch.testing.assert_close(ga, wa, **F32)
    with torch.no_grad():
        got = ops.rmu_loss(hf, cv, hr, h0, 3.0)
        loss = ops.rmu_mse(hr, h0, scale=3.0)
    assert got[0].grad_fn is None
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **F32)
    torch.testing.assert_close(loss, want[2], **F32)


def test_pack_int8_kernel_bits_equal_reference(device):
    h = _rand(3, 11, 300, dtype=torch.bfloat16, device=device) * 7
    h[1, 4] = 0
    h[2, 3, 5] = -90.0
    for x in (h, h.transpose(0, 1), h.float()[..., ::3]):
        p = ops.pack_activations(x, "int8")
        q, s = reference.int8_quantize(x)
        assert torch.equal(p.data, q) and torch.equal(p.scale, s)
        assert p.dtype == x.dtype
        for dtype in (torch.float32, torch.bfloat16):
            got = ops.unpack_activations(p, dtype)
            assert torch.equal(got, reference.unpack_activations(p, dtype))


def test_pack_int8_kernel_refuses_nan(device):
    """A NaN must reach the scale (as in the reference), so that pack_activations raises the
    documented DataError: Triton's max drops NaN unless told otherwise, and the NaN was then
    stored silently as -127."""
    from wmdp_fast.errors import DataError

    h = _rand(2, 3, 40, device=device)
    h[1, 2, 5] = float("nan")
    assert torch.isnan(reference.int8_quantize(h)[1][1, 2])
    with pytest.raises(DataError, match=r"position \(1, 2\)"):
        ops.pack_activations(h, "int8")


def test_training_step_through_kernels_equals_mse_loss(device, monkeypatch):
    if device == "cuda":
        pytest.skip("the CPU interpreter run covers the arithmetic; see test_gpu_training_step")
    from test_ops_rmu import train_two_steps

    got = train_two_steps("fused")
    monkeypatch.delenv("WMDP_FAST_FORCE_TRITON")
    want = train_two_steps("published")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_interpreter_when_triton_interpret_is_set_at_start(tmp_path):
    """TRITON_INTERPRET=1 exported before anything imports triton (the whole process in
    interpreter mode) must work too."""
    script = textwrap.dedent(
        """
        import torch
        from wmdp_fast import ops, reference
        h = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(0))
        t = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(1))
        x = h.clone().requires_grad_(True)
        loss = ops.rmu_mse(x, t, scale=2.0)
        loss.backward()
        assert "RMUMSEFunction" in type(loss.grad_fn).__name__
        torch.testing.assert_close(loss, reference.rmu_mse(h, t, None, 2.0), rtol=1e-6, atol=0)
        torch.testing.assert_close(x.grad, 4.0 / h.numel() * (h - t), rtol=1e-6, atol=1e-9)
        p = ops.pack_activations(t, "int8")
        assert torch.equal(p.data, reference.int8_quantize(t)[0])
        print("OK")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", WMDP_FAST_FORCE_TRITON="1")
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# --- GPU only ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_benchmark_shape_and_memory():
    """(4, 768, 4096) bf16, forward + backward: matches the reference, and allocates no float32
    copy of the activations (peak extra memory: the bf16 gradient and the row partials)."""
    shape = (4, 768, 4096)
    h = _rand(*shape, dtype=torch.bfloat16, device="cuda").requires_grad_(True)
    t = _rand(*shape, dtype=torch.bfloat16, seed=1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = ops.rmu_mse(h, t, scale=1200.0)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 1.25 * h.numel() * 2, extra  # a float32 copy alone would be 2x
    want, gw, _ = _run(reference.rmu_mse, h.detach(), t, None, 1200.0)
    torch.testing.assert_close(loss.detach(), want, **F32)
    torch.testing.assert_close(h.grad.float(), gw.float(), **GRAD_TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_training_step():
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256).cuda()
    x = torch.randn(4, 64, 256, device="cuda")
    h0 = layer(x).detach() + 0.1
    cv = torch.rand(1, 1, 256, device="cuda")
    grads = []
    for use_ops in (True, False):
        layer.zero_grad()
        h = layer(x)
        if use_ops:
            loss = ops.rmu_loss(h, cv, h, h0, 7.0)[0]
        else:
            loss = F.mse_loss(h, cv.expand_as(h)) + 7.0 * F.mse_loss(h, h0)
        loss.backward()
        grads.append(layer.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
