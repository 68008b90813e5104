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

import inspect
import os
import re
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
        (torch.float32, "int8", True),
        (torch.float16, "full", False),
        (torch.bfloat16, "d", True),
    ],
)
def test_odd_shape_against_published_form(device, dtype, kind, use_mask):
    """B=3, T=37, D=4097: D is one past a power of two, so the row takes two blocks. Every
    target form (full, [1, 1, D], [D], int8-packed: its dequantised values) and every hidden
    dtype, forward and gradient once each."""
    shape = (3, 37, 4097)
    h = _rand(*shape, dtype=dtype, device=device)
    if kind == "int8":  # packed by the reference (same bits; 5x faster than the interpreter)
        t = reference.pack_activations(_rand(*shape, dtype=dtype, seed=1, device=device), "int8")
    else:
        t = _target(kind, shape, dtype, device)
    mask = _mask(shape, device) if use_mask else None

    def published(hidden, target, mask):
        if isinstance(target, reference.PackedActivations):
            target = reference.unpack_activations(target, torch.float32)
        hh, tt = hidden.float(), target.float().expand_as(hidden)
        if mask is not None:
            hh, tt = hh[mask], tt[mask]
        return F.mse_loss(hh, tt)

    loss, g, fn = _run(ops.rmu_mse, h, t, mask, grad_output=3.0)
    _assert_kernel(fn)
    want, gw, _ = _run(published, h, t, mask, grad_output=3.0)
    torch.testing.assert_close(loss, want, **F32)
    torch.testing.assert_close(g.float(), gw.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_contiguous_inputs(device, dtype):
    base = _rand(6, 2, 40, dtype=dtype, device=device)  # [T, B, D]
    h = base.transpose(0, 1)  # [B, T, D], strided positions
    t = _rand(2, 6, 80, dtype=dtype, seed=1, device=device)[..., ::2]  # strided D
    cv = _rand(40, dtype=dtype, seed=2, device=device)[None, None, :].expand(2, 6, 40)
    mask = _mask((6, 2, 40), device).t()  # [B, T], transposed
    for target, m in [(t, None), (t, mask), (cv, mask), (ops.pack_activations(t, "int8"), mask)]:
        loss, g, fn = _run(ops.rmu_mse, h, target, m, grad_output=1.5)
        _assert_kernel(fn)
        want, gw, _ = _run(reference.rmu_mse, h.contiguous(), target, m, grad_output=1.5)
        torch.testing.assert_close(loss, want, **F32)
        assert g.dtype == dtype and g.shape == h.shape
        torch.testing.assert_close(g.float(), gw.float(), **GRAD_TOL[dtype])
    # a [..., D] hidden of rank 4 and a strided D in hidden itself
    h4 = _rand(2, 3, 4, 80, dtype=dtype, device=device)[..., 1::2]
    t4 = _rand(2, 3, 4, 40, dtype=dtype, seed=5, device=device)
    loss, g, fn = _run(ops.rmu_mse, h4, t4)
    _assert_kernel(fn)
    want, gw, _ = _run(reference.rmu_mse, h4, t4)
    torch.testing.assert_close(loss, want, **F32)
    torch.testing.assert_close(g.float(), gw.float(), **GRAD_TOL[dtype])


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


# --- autograd: retain_graph sequences, create_graph, no_grad / inference_mode -----------------


def _grads_in_sequence(fn, hidden, args, grad_outputs, n_hidden=1):
    """Backward through ONE graph once per grad_output (retain_graph=True): the gradients of
    fn(*hidden, *args)[0 if a tuple] w.r.t. the hidden tensors, one list per backward."""
    hs = [h.detach().clone().requires_grad_(True) for h in hidden[:n_hidden]]
    out = fn(*hs, *args)
    loss = out[0] if isinstance(out, tuple) else out
    seq = []
    for go in grad_outputs:
        go_t = torch.tensor(go, device=loss.device)
        seq.append(torch.autograd.grad(loss, hs, go_t, retain_graph=True))
    return loss.grad_fn, seq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_retain_graph_any_grad_output_sequence(device, dtype):
    """Every backward through a retained graph gives grad_output * d(loss)/d(hidden), whatever
    the earlier ones were: a first grad_output of 0 used to leave NaN (0 / 0) for the next."""
    seq = [0.0, 1.0, 2.5, -1.5, 0.0, 1.0]
    if dtype == torch.float16:
        seq = [0.0, 1024.0, 1.0, -3.0]
    shape = (2, 3, 24)
    h = _rand(*shape, dtype=dtype, device=device)
    if dtype == torch.float16:
        h = h * 1e-3  # the unscaled gradient is float16-subnormal (see the loss-scaling test)
    mask = _mask(shape, device)
    for t, m in [
        (_target("full", shape, dtype, device), None),
        (_target("d", shape, dtype, device), mask),
    ]:
        fn, got = _grads_in_sequence(ops.rmu_mse, [h], (t, m, 1.7), seq)
        _assert_kernel(fn)
        _, want = _grads_in_sequence(reference.rmu_mse, [h], (t, m, 1.7), seq)
        for go, (g,), (w,) in zip(seq, got, want):
            assert g.dtype == dtype and torch.isfinite(g).all(), go
            torch.testing.assert_close(g.float(), w.float(), **GRAD_TOL[dtype], msg=f"go={go}")
    # both terms of rmu_loss (one saved buffer each), int8 retain target
    hr = _rand(3, 2, 24, dtype=dtype, seed=5, device=device)
    args = (hr, _target("int8", (3, 2, 24), dtype, device, seed=6), 40.0)
    cv = _target("b11d", shape, dtype, device)
    fn, got = _grads_in_sequence(
        lambda a, b, *r: ops.rmu_loss(a, cv, b, *r), [h, *args], args[1:], seq, 2
    )
    _assert_kernel(fn, "RMULossFunction")
    _, want = _grads_in_sequence(
        lambda a, b, *r: reference.rmu_loss(a, cv, b, *r), [h, *args], args[1:], seq, 2
    )
    for go, gs, ws in zip(seq, got, want):
        for g, w in zip(gs, ws):
            torch.testing.assert_close(g.float(), w.float(), **GRAD_TOL[dtype], msg=f"go={go}")


def test_single_backward_hands_out_the_stored_gradient(device):
    """The common path stays free: the first backward with grad_output == 1 returns the buffer
    the forward wrote (no copy, no kernel work), also after a create_graph backward."""
    h = _rand(2, 3, 16, device=device).requires_grad_(True)
    t = _rand(2, 3, 16, seed=1, device=device)
    loss = ops.rmu_mse(h, t)
    buf = loss.grad_fn.saved_tensors[0]
    (g2,) = torch.autograd.grad(loss, h, create_graph=True)  # recomputed: buffer untouched
    (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
    assert g1.data_ptr() == buf.data_ptr() and g2.data_ptr() != buf.data_ptr()
    torch.testing.assert_close(g2.detach(), g1, **F32)
    want = g1.clone()
    g1.mul_(-4.0)  # the caller owns the handed-out buffer; a later backward does not read it
    (g3,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(g3, want, **F32)
    hf = h.detach().clone().requires_grad_(True)
    total = ops.rmu_loss(hf, t[0, 0], h, t, 3.0)[0]
    ptr = total.grad_fn.saved_tensors[0].data_ptr()
    total.backward()  # no retain_graph: autograd steals the buffer for .grad
    assert hf.grad.data_ptr() == ptr


class _Lin(torch.nn.Module):
    """hidden = x @ W: a second-order gradient w.r.t. W goes through the op's gradient."""

    def __init__(self, D, device, seed=7):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter((torch.randn(D, D, generator=g) / D**0.5).to(device))

    def forward(self, x):
        return x @ self.W


def _second_order(loss_fn, x, xr, device):
    """(loss, penalty grads) of a gradient penalty |d loss / d W|^2 and a Hessian-vector product
    through hidden, plus the derivative w.r.t. a grad_output that requires grad."""
    lin = _Lin(x.shape[-1], device)
    h, hr = lin(x), lin(xr)
    loss = loss_fn(h, hr)
    go = torch.tensor(1.7, device=device, requires_grad=True)
    (gw,) = torch.autograd.grad(loss, lin.W, go, create_graph=True)
    gh, ghr = torch.autograd.grad(loss, (h, hr), create_graph=True)
    v = torch.linspace(-1, 1, h.numel(), device=device).view_as(h)
    penalty = (gw * gw).sum() + (gh * v).sum() + ghr.square().sum()
    dW, dgo = torch.autograd.grad(penalty, (lin.W, go))
    return [loss.detach(), gw.detach(), gh.detach(), dW, dgo]


def test_create_graph_second_order_matches_reference(device):
    """create_graph=True builds a graph through the gradient (recomputed with torch ops), so a
    gradient penalty, a Hessian-vector product and d/d(grad_output) match the reference twin
    through autograd. rmu_mse and rmu_loss; a mask, a broadcast [D] target, an int8 target."""
    D = 16
    x = _rand(2, 3, D, device=device)
    xr = _rand(3, 2, D, seed=1, device=device)
    cv = _rand(D, seed=2, device=device)
    mask = _mask((2, 3, D), device)
    rmask = _mask((3, 2, D), device, seed=4)
    h0 = _rand(3, 2, D, seed=3, device=device)
    p8 = ops.pack_activations(h0, "int8")

    cases = {
        "mse [D] + mask": lambda m: lambda h, hr: m.rmu_mse(h, cv, mask, 2.5) + m.rmu_mse(hr, h0),
        "mse int8": lambda m: lambda h, hr: m.rmu_mse(hr, p8, rmask, 3.0) + m.rmu_mse(h, cv),
        "loss": lambda m: lambda h, hr: m.rmu_loss(h, cv, hr, p8, 50.0, mask, rmask)[0],
        "loss full": lambda m: lambda h, hr: m.rmu_loss(h, cv[None, None], hr, h0, 7.0)[0],
    }
    for name, make in cases.items():
        got = _second_order(make(ops), x, xr, device)
        want = _second_order(make(reference), x, xr, device)
        for i, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=f"{name}, output {i}")
    # after a create_graph backward, a plain one still gets the stored gradient, unscaled
    h = x.clone().requires_grad_(True)
    loss = ops.rmu_mse(h, cv, mask)
    torch.autograd.grad(loss * 3.0, h, create_graph=True)
    loss.backward()
    _, w, _ = _run(reference.rmu_mse, x, cv, mask)
    torch.testing.assert_close(h.grad, w, **F32)


def test_no_grad_inference_mode_and_second_backward(device):
    """No graph under no_grad / inference_mode or for a hidden without grad (same values);
    a second backward without retain_graph raises torch's usual error; a target made under
    inference_mode (e.g. a cache) works in every backward; an in-place change of hidden or the
    target before a recomputing backward is refused, as torch refuses it for a saved tensor."""
    h = _rand(2, 3, 16, device=device)
    t = _rand(2, 3, 16, seed=1, device=device)
    want = reference.rmu_loss(h, t[0, 0], h, t, 5.0)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            x = h.clone().requires_grad_(True) if ctx is torch.no_grad else h
            got = ops.rmu_loss(x, t[0, 0], x, t, 5.0)
            one = ops.rmu_mse(x, t, scale=5.0)
        assert not got[0].requires_grad and not one.requires_grad
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **F32)
        torch.testing.assert_close(one, want[2], **F32)
    assert not ops.rmu_mse(h, t).requires_grad  # hidden does not require grad
    for make in (lambda x: ops.rmu_mse(x, t), lambda x: ops.rmu_loss(x, t[0, 0], h, t, 2.0)[0]):
        x = h.clone().requires_grad_(True)
        loss = make(x)
        loss.backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()
    with torch.inference_mode():
        t_inf = t.clone()
        mask_inf = _mask((2, 3, 16), device)
    x = h.clone().requires_grad_(True)
    _, got = _grads_in_sequence(ops.rmu_mse, [x], (t_inf, mask_inf), [1.0, 2.0])
    _, ref = _grads_in_sequence(reference.rmu_mse, [x], (t.clone(), mask_inf.clone()), [1.0, 2.0])
    for (g,), (w,) in zip(got, ref):
        torch.testing.assert_close(g, w, **F32)
    for what in ("hidden", "target"):
        x, tt = h.clone().requires_grad_(True), t.clone()
        loss = ops.rmu_mse(x, tt)
        loss.backward(retain_graph=True)
        with torch.no_grad():
            (x if what == "hidden" else tt).mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    y = h.clone().requires_grad_(True) * 1.0
    loss = ops.rmu_mse(y, t)  # hidden is saved, as by any op that saves its input
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


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
    """The kernel's bits are the reference's, and on a GPU also the CPU reference's: scale is
    the exact quotient absmax / 127 on every device (on CUDA, Triton's `/` is div.full.f32 and
    torch's `tensor / 127` multiplies by 1 / 127: each 1 ulp off for ~5% of rows; 4096 rows on
    the GPU so that such a row is all but certain to be there)."""
    h = _rand(3, 11, 300, dtype=torch.bfloat16, device=device) * 7
    h[1, 4] = 0
    h[2, 3, 5] = -90.0
    many = [_rand(64, 64, 96, seed=9, device=device) * 5] if device == "cuda" else []
    for x in (h, h.transpose(0, 1), h.float()[..., ::3], *many):
        p = ops.pack_activations(x, "int8")
        q, s = reference.int8_quantize(x)
        assert torch.equal(p.data, q) and torch.equal(p.scale, s)
        qc, sc = reference.int8_quantize(x.cpu())
        assert torch.equal(p.scale.cpu(), sc) and torch.equal(p.data.cpu(), qc)
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
    """Two AdamW steps through ops.rmu_loss, run by the Triton kernels (interpreter), equal two
    steps through the published F.mse_loss calls. The CPU twin in test_ops_rmu.py runs the
    reference (which IS F.mse_loss), so this is the check of that kind that can fail."""
    if device == "cuda":
        pytest.skip("the CPU interpreter run covers the arithmetic; see test_gpu_training_step")
    from test_ops_rmu import train_two_steps

    grad_fns = []
    got = train_two_steps("fused", grad_fns=grad_fns)
    assert len(grad_fns) == 2 and all("RMULossFunction" in n for n in grad_fns), grad_fns
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


# --- fused finish (opt-in, WMDP_FAST_RMU_MSE_FUSED_FINISH=1) ----------------------------------

FF_ENV = "WMDP_FAST_RMU_MSE_FUSED_FINISH"


def _kernel_module(device):
    from wmdp_fast.kernels import load

    return load("rmu_mse", interpret=device == "cpu")


def _counter(device) -> int:
    """The fused finish's ticket counter value for `device` ('cpu' or 'cuda')."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _kernel_module(device)._counters[(dev.type, dev.index)].item()


def _both_paths(monkeypatch, device, fn):
    """fn() with the finish kernel (0) and with the fused finish (1); the fused run must not
    launch the finish kernel, and must leave the ticket counter at 0."""
    K = _kernel_module(device)
    monkeypatch.setenv(FF_ENV, "0")
    want = fn()
    calls = []
    finish = K._finish
    monkeypatch.setattr(K, "_finish", lambda *a: calls.append(a) or finish(*a))
    monkeypatch.setenv(FF_ENV, "1")
    got = fn()
    assert not calls, "the fused finish launched the finish kernel"
    assert _counter(device) == 0
    return want, got


def _poison_empty(monkeypatch):
    """torch.empty hands out memory filled with NaN (floats) or 85 (other dtypes): a kernel
    that reads memory before it was written reads the poison, not a stale copy of equal
    values left by the previous call."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        with torch.no_grad():
            t.fill_(float("nan") if t.is_floating_point() else 85)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _assert_same_loss(device, got, want):
    """Bitwise in the interpreter. On a GPU the stage-1 partials are bitwise the same, but the
    last program reduces the 4096-lane accumulator with the main kernel's warps (1-4) where the
    finish kernel uses 8, so the float32 sum's association (and the last bit) may differ."""
    if device == "cpu":
        assert torch.equal(got, want), (got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


FF_CASES = [  # (shape, dtype, target kind, mask)
    ((2, 5, 33), torch.float32, "full", False),
    ((2, 5, 33), torch.bfloat16, "b11d", True),
    ((3, 4, 20), torch.float16, "int8", True),
    ((1, 7, 300), torch.bfloat16, "int8", False),
    ((3, 3, 17), torch.float32, "d", True),
    ((2, 3, 40), torch.bfloat16, "bf16pack", False),
]


@pytest.mark.parametrize("shape,dtype,kind,use_mask", FF_CASES)
def test_fused_finish_equals_default(device, monkeypatch, shape, dtype, kind, use_mask):
    """The fused finish gives the default path's loss (bitwise in the interpreter, see
    _assert_same_loss) and bitwise its gradient, for rmu_mse and both terms of rmu_loss."""
    h = _rand(*shape, dtype=dtype, device=device)
    t = _target(kind, shape, dtype, device)
    mask = _mask(shape, device) if use_mask else None
    rshape = (shape[0] + 1, shape[1], shape[2])
    hr = _rand(*rshape, dtype=dtype, seed=4, device=device)
    tr = _target(kind if kind != "b11d" else "full", rshape, dtype, device, seed=5)
    cv = _target("b11d", shape, dtype, device, seed=6)

    def run():
        loss, g, fn = _run(ops.rmu_mse, h, t, mask, scale=2.5, grad_output=0.75)
        _assert_kernel(fn)
        a = h.clone().requires_grad_(True)
        b = hr.clone().requires_grad_(True)
        out = ops.rmu_loss(a, cv, b, tr, 300.0, mask, None)
        _assert_kernel(out[0].grad_fn, "RMULossFunction")
        out[0].backward()
        return [loss, g, *(x.detach() for x in out), a.grad, b.grad]

    want, got = _both_paths(monkeypatch, device, run)
    for i in (0, 2, 3, 4):
        _assert_same_loss(device, got[i], want[i])
    for i in (1, 5, 6):
        assert got[i].dtype == want[i].dtype and torch.equal(got[i], want[i]), i


def test_fused_finish_calls_in_a_row(device, monkeypatch):
    """The last program puts the counter back to 0: calls of different sizes in a row (rmu_mse,
    rmu_loss, no_grad) each give the default path's result, and the counter is 0 after each."""
    monkeypatch.setenv(FF_ENV, "1")
    seen = []
    for i, shape in enumerate([(2, 3, 16), (1, 9, 24), (3, 2, 16), (2, 3, 16)]):
        h = _rand(*shape, seed=i % 3, device=device)  # the last call repeats the first
        t = _rand(*shape, seed=10 + i % 3, device=device)
        with torch.no_grad():
            mse = ops.rmu_mse(h, t, scale=1.5)
            total, lf, lr = ops.rmu_loss(h, t[0, 0], h[:1], t[:1], 4.0)
        assert _counter(device) == 0
        monkeypatch.setenv(FF_ENV, "0")
        with torch.no_grad():
            want_mse = ops.rmu_mse(h, t, scale=1.5)
            want = ops.rmu_loss(h, t[0, 0], h[:1], t[:1], 4.0)
        monkeypatch.setenv(FF_ENV, "1")
        _assert_same_loss(device, mse, want_mse)
        for x, y in zip((total, lf, lr), want):
            _assert_same_loss(device, x, y)
        seen.append(mse)
    assert torch.equal(seen[3], seen[0])  # deterministic on every device


def test_fused_finish_env_values(monkeypatch):
    """Read at every call: 0 / empty / unset = default, 1 = fused, anything else is refused."""
    K = _kernel_module("cpu")
    for value, want in (("0", False), ("", False), ("1", True), (" 1 ", True)):
        monkeypatch.setenv(FF_ENV, value)
        assert K.fused_finish_enabled() is want, value
    monkeypatch.delenv(FF_ENV)
    assert K.fused_finish_enabled() is False
    from wmdp_fast.errors import ConfigError

    monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
    monkeypatch.setenv(FF_ENV, "yes")
    with pytest.raises(ConfigError, match=f"{FF_ENV}='yes'.*expected 1"):
        ops.rmu_mse(torch.ones(2, 3), torch.zeros(3))


def test_interpreted_launch_leaves_triton_language_unpatched(monkeypatch):
    """An interpreted launch whose kernel calls @triton.jit helpers must not leave triton.language
    patched with the interpreter's versions: a GPU compile later in the same process failed
    (and the sm_90 compile check below with it, whenever triton's cache missed)."""
    import triton.language as tl

    objects = [tl, tl.core, tl.core.tensor]
    before = [dict(vars(obj)) for obj in objects]
    monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
    ops.rmu_mse(_rand(2, 3, 8), _rand(8, seed=1))  # _mse_row, _cast_out, tl.sum: helper calls
    for obj, attrs in zip(objects, before):
        changed = [
            n
            for n, v in vars(obj).items()
            if attrs.get(n) is not v and not (n not in attrs and inspect.ismodule(v))
        ]  # a submodule imported meanwhile may stay
        assert not changed, (obj, changed[:5])


def test_fused_finish_ptx_for_sm90():
    """Compiled for an H100 (sm_90) without a GPU: the ticket is a gpu-scope acq_rel atomic
    (SASS: MEMBAR.ALL.GPU, ATOMG.STRONG.GPU, CCTL.IVALL), the partials' store comes before a
    bar.sync that comes before it, and the last program's partial loads bypass L1
    (ld.global.cg). The default kernels hold no atomic."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from wmdp_fast.kernels import compile_for, load

    K = load("rmu_mse")
    h = torch.empty(4, 96, 4096, dtype=torch.bfloat16)
    n = h.shape[0] * h.shape[1]
    part, out, cnt = torch.empty(2 * n), torch.empty(3), torch.zeros(1, dtype=torch.int32)
    term = [h, *h.stride(), h, *h.stride(), h, 0, 0, h, 0, 0, h, 96, 4096, 1.0]
    flags = [False, False, True, False]
    block, warps = K.block_settings(4096)
    opts = {"BLOCK_D": block, "num_warps": warps}
    opts.update(FINISH_BLOCK=4096)
    mse = compile_for(
        K._rmu_mse_kernel, part, cnt, out, n, 0.5, *term, *flags, FUSED_FINISH=True, **opts
    )
    loss = compile_for(
        K._rmu_loss_kernel, part, cnt, out, 2 * n, 0.5, 0.25, n, *term, *term, *flags,
        *flags, FUSED_FINISH=True, **opts,
    )  # fmt: skip
    for ptx in (mse.asm["ptx"], loss.asm["ptx"]):
        lines = [x.strip() for x in ptx.splitlines()]
        atom = [i for i, x in enumerate(lines) if " atom." in f" {x}" or "atom.global" in x]
        assert len(atom) == 1 and "atom.global.gpu.acq_rel.add" in lines[atom[0]], atom
        stores = [i for i, x in enumerate(lines) if "st.global.b32" in x and i < atom[0]]
        bars = [i for i, x in enumerate(lines) if x.startswith("bar.sync")]
        assert stores and any(stores[-1] < b < atom[0] for b in bars)
        cg = [i for i, x in enumerate(lines) if "ld.global.cg" in x]
        assert cg and min(cg) > atom[0] and any(atom[0] < b < min(cg) for b in bars)
    plain = compile_for(
        K._rmu_mse_kernel, part, part, part, n, 0.5, *term, *flags, FUSED_FINISH=False, **opts
    ).asm["ptx"]
    assert "atom." not in plain and "ld.global.cg" not in plain


def test_pack_kernel_divides_exactly_in_sm90_ptx():
    """Compiled for an H100: the per-row scale absmax / 127 and x / scale are IEEE divisions
    (div.rn.f32), as in the interpreter and the reference. Triton's `/` on float32 compiles to
    div.full.f32 (approximate, up to 2 ulp), which gave ~5% of the rows a scale 1 ulp off the
    reference's (and their q with it)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from wmdp_fast.kernels import compile_for, load

    P = load("pack")
    x = torch.empty(4, 96, 4096, dtype=torch.bfloat16)
    q, s = torch.empty(4, 96, 4096, dtype=torch.int8), torch.empty(4, 96)
    block, warps = P._settings(4096)
    ptx = compile_for(
        P._pack_int8_kernel, x, *x.stride(), q, s, 96, 4096, QMAX=reference.INT8_QMAX,
        BLOCK_D=block, num_warps=warps,
    ).asm["ptx"]  # fmt: skip
    divs = re.findall(r"\bdiv\.[\w.]*f32", ptx)
    per_thread = block // (32 * warps)  # x / scale, per element of the (runtime) column loop
    assert divs.count("div.rn.f32") == 1 + per_thread, divs
    assert set(divs) == {"div.rn.f32"} and "rcp.approx" not in ptx, set(divs)


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


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_fused_finish_many_programs(monkeypatch):
    """16,384 programs (more than run at once, so tickets are taken while others still run)
    and 20,480 for rmu_loss (the partials loop runs 5 chunks): 30 calls in a row give bitwise
    the same loss and gradient, the gradient is bitwise the default path's, the loss equals the
    default's to float32 reassociation, and the counter is back at 0. A missing release or
    acquire would show as a partial read before it was written (a varying or wrong loss): the
    partials buffer comes poisoned with NaN (without that, the caching allocator hands each
    call the previous call's block, which holds the very same partials, and a stale read could
    not be told from a correct one)."""
    h = _rand(8, 2048, 1024, dtype=torch.bfloat16, device="cuda")
    t = _rand(8, 2048, 1024, dtype=torch.bfloat16, seed=1, device="cuda")
    hr = _rand(2, 2048, 1024, dtype=torch.bfloat16, seed=2, device="cuda")
    p8 = ops.pack_activations(_rand(2, 2048, 1024, seed=3, device="cuda"), "int8")
    _poison_empty(monkeypatch)

    def once():
        loss, g, fn = _run(ops.rmu_mse, h, t, scale=3.0)
        _assert_kernel(fn)
        with torch.no_grad():
            out = ops.rmu_loss(h, t[0, 0], hr, p8, 100.0)
        return [loss, g, *out]

    want, got = _both_paths(monkeypatch, "cuda", once)
    runs = [got] + [once() for _ in range(29)]
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, runs[0]))
    assert torch.equal(got[1], want[1])
    for i in (0, 2, 3, 4):
        _assert_same_loss("cuda", got[i], want[i])
    assert _counter("cuda") == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_fused_finish_cuda_graph_and_streams(monkeypatch, caplog):
    """What the benchmark relies on: after one eager call, a CUDA graph captured with the fused
    finish replays to the eager loss; calls on another stream are ordered after the previous
    stream's. Capturing before any eager call falls back to the finish kernel with a warning."""
    K = _kernel_module("cuda")
    h = _rand(4, 512, 4096, dtype=torch.bfloat16, device="cuda")
    t = _rand(4, 512, 4096, dtype=torch.bfloat16, seed=1, device="cuda")
    monkeypatch.setenv(FF_ENV, "0")
    default = ops.rmu_mse(h, t)  # compiles the default kernels outside the capture below
    monkeypatch.setenv(FF_ENV, "1")
    want = ops.rmu_mse(h, t)
    _assert_same_loss("cuda", want, default)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = [ops.rmu_mse(h, t) for _ in range(3)]
    again = ops.rmu_mse(h, t)  # default stream: waits for the side stream's launches
    torch.cuda.synchronize()
    assert all(torch.equal(x, want) for x in [*on_side, again])
    for fresh in (False, True):
        if fresh:
            monkeypatch.setattr(K, "_counters", {})
            monkeypatch.setattr(K, "_counter_streams", {})
            monkeypatch.setattr(K, "_capture_warned", set())
        graph = torch.cuda.CUDAGraph()
        with caplog.at_level("WARNING", logger="wmdp_fast"), torch.cuda.graph(graph):
            out = ops.rmu_mse(h, t)
        assert ("capturing a CUDA graph" in caplog.text) is fresh
        for _ in range(3):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            _assert_same_loss("cuda", out, want)
            if not fresh:
                assert torch.equal(out, want)
        if not fresh:
            assert _counter("cuda") == 0


def test_fused_finish_counter_is_dropped_when_a_launch_fails(monkeypatch):
    """A launch cut short (here: the kernel raises after taking two tickets) must not leave the
    ticket counter non-zero: every later fused-finish loss would be wrong (the last ticket
    would be drawn before all partials exist). The counter is dropped and rebuilt at zero."""
    monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
    K = _kernel_module("cpu")
    h = _rand(2, 3, 16)
    t = _rand(2, 3, 16, seed=1)
    monkeypatch.setenv(FF_ENV, "0")
    want = ops.rmu_mse(h, t)
    monkeypatch.setenv(FF_ENV, "1")
    ops.rmu_mse(h, t)  # the counter exists
    real = K._rmu_mse_kernel

    class CutShort:
        def __getitem__(self, grid):
            def launch(partials, counter, *a, **kw):
                counter += 2  # two programs took their tickets, then the launch died
                raise KeyboardInterrupt

            return launch

    monkeypatch.setattr(K, "_rmu_mse_kernel", CutShort())
    with pytest.raises(KeyboardInterrupt):
        ops.rmu_mse(h, t)
    monkeypatch.setattr(K, "_rmu_mse_kernel", real)
    for _ in range(2):
        assert torch.equal(ops.rmu_mse(h, t), want)
        assert _counter("cpu") == 0
