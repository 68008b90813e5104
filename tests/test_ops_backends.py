"""How wmdp_fast.ops picks a backend, and what it says when a CUDA tensor has to take the slow
reference path (no GPU needed: the decision takes a device argument, and the availability
checks are monkeypatched). Also choice_logprobs' own argument errors and build_info's op list.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

import wmdp_fast
from wmdp_fast import ops, reference
from wmdp_fast.errors import ConfigError


class _FakeC:
    """A wmdp_fast._C built without CUDA."""

    @staticmethod
    def with_cuda() -> bool:
        return False


@pytest.fixture
def no_gpu_backends(monkeypatch):
    """_C compiled without CUDA, triton not importable, and no warning given yet."""
    monkeypatch.setattr(ops, "load_C", lambda: _FakeC)
    monkeypatch.setattr(ops, "_triton_import_error", lambda: "ModuleNotFoundError: no triton")
    monkeypatch.setattr(ops, "_cuda_fallback_warned", set())
    monkeypatch.delenv("WMDP_FAST_DISABLE_C", raising=False)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_cuda_fallback_warns_once_per_op_family(no_gpu_backends, caplog):
    with caplog.at_level(logging.WARNING, logger="wmdp_fast"):
        # the pure query never logs
        assert ops.backend_of("rmu_mse", "cuda") == "reference"
        assert ops.backend_of("gather_logprobs", "cuda") == "reference"
        assert _warnings(caplog) == []
        for op in ops.TRITON_OPS:
            assert ops._select_backend(op, "cuda") == "reference"
        assert ops._select_backend("rmu_mse", torch.device("cuda", 0)) == "reference"
        triton_msgs = _warnings(caplog)
        for op in ops.GATHER_OPS * 2:
            assert ops._select_backend(op, "cuda") == "reference"
        # CPU tensors on the reference are the documented default: no warning
        assert ops._select_backend("rmu_loss", "cpu") == "reference"
        msgs = _warnings(caplog)
    assert len(triton_msgs) == 1 and len(msgs) == 2, msgs
    t, g = msgs
    assert "rmu_mse got CUDA tensors" in t and "triton cannot be imported" in t
    assert "no triton" in t and "pip install triton" in t
    assert "gather_logprobs got CUDA logits" in g and "built without CUDA" in g
    assert "WMDP_FAST_CUDA=1 pip install --no-build-isolation -e ." in g
    assert "float64 log-softmax over [M, V]" in g


def test_cuda_fallback_message_when_C_is_missing_or_disabled(no_gpu_backends, monkeypatch, caplog):
    monkeypatch.setattr(ops, "load_C", lambda: None)
    monkeypatch.setattr(ops, "load_error", lambda: "disabled by WMDP_FAST_DISABLE_C=1")
    monkeypatch.setenv("WMDP_FAST_DISABLE_C", "1")
    with caplog.at_level(logging.WARNING, logger="wmdp_fast"):
        assert ops._select_backend("choice_logprobs", "cuda") == "reference"
    (msg,) = _warnings(caplog)
    assert "choice_logprobs got CUDA logits" in msg
    assert "wmdp_fast._C is disabled by WMDP_FAST_DISABLE_C=1" in msg
    assert "unset WMDP_FAST_DISABLE_C" in msg


def test_every_op_decides_through_select_backend_with_its_device(monkeypatch, caplog):
    """The public ops ask `_select_backend` with their tensor's device (so the warning above is
    what a CUDA call meets). With that decision faked to 'cuda' on CPU tensors and no GPU
    backend, each op warns once per family and gives the reference's values."""
    seen = []
    real = ops._select_backend

    def spy(op, device):
        seen.append((op, torch.device(device)))
        return real(op, device)

    monkeypatch.setattr(ops, "_select_backend", spy)
    monkeypatch.delenv("WMDP_FAST_FORCE_TRITON", raising=False)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([1, 7, 49])
    h = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    t = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))

    def call_all():
        out = [
            ops.gather_logprobs(logits, torch.tensor([0, 2]), ids[:2], torch.tensor([0, 1, 2]))[0],
            ops.choice_logprobs(logits, ids),
            ops.rmu_mse(h, t),
            ops.rmu_loss(h, t[0, 0], h, t, 3.0)[0],
        ]
        p = ops.pack_activations(t, "int8")
        return [*out, p.data, p.scale, ops.unpack_activations(p)]

    call_all()
    cpu = torch.device("cpu")
    assert [op for op, _ in seen] == [
        "gather_logprobs",
        "gather_logprobs",  # choice_logprobs runs gather_logprobs
        "rmu_mse",
        "rmu_loss",
        "pack_activations",
        "unpack_activations",
    ]
    assert all(d == cpu for _, d in seen)

    # the same calls with the decision made for "cuda"
    monkeypatch.setattr(ops, "_select_backend", lambda op, device: real(op, "cuda"))
    monkeypatch.setattr(ops, "load_C", lambda: _FakeC)
    monkeypatch.setattr(ops, "_triton_import_error", lambda: "ModuleNotFoundError: no triton")
    monkeypatch.setattr(ops, "_cuda_fallback_warned", set())
    with caplog.at_level(logging.WARNING, logger="wmdp_fast"):
        got = call_all()
        got += call_all()
    warned = _warnings(caplog)
    assert len(warned) == 2 and "gather_logprobs" in warned[0] and "rmu_mse" in warned[1]
    want = [
        reference.gather_logprobs(logits, torch.tensor([0, 2]), ids[:2], torch.tensor([0, 1, 2]))[
            0
        ],
        reference.choice_logprobs(logits, ids[None].expand(3, -1)),
        reference.rmu_mse(h, t),
        reference.rmu_loss(h, t[0, 0], h, t, 3.0)[0],
        *reference.int8_quantize(t),
    ]
    want.append(reference.unpack_activations(reference.pack_activations(t, "int8")))
    for g, w in zip(got, want * 2):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_backend_of_refuses_an_unknown_op():
    with pytest.raises(ConfigError, match="unknown op 'rmu_msee'"):
        ops.backend_of("rmu_msee", "cpu")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda L, ids: (L, ids + 100), r"choice_ids out of range \[0, 100\).*max 199"),
        (lambda L, ids: (L, ids - 10), r"choice_ids out of range \[0, 100\).*min -7"),
        (lambda L, ids: (L, torch.tensor([[1, 2]] * 3)), r"choice_ids must be \[N=4, K\]"),
        (lambda L, ids: (L, ids.int()), "choice_ids must be an int64 tensor"),
        (lambda L, ids: (L.t().contiguous().t(), ids), "logits must have a contiguous last"),
        (lambda L, ids: (L.long(), ids), "logits dtype must be"),
        (lambda L, ids: (L[0], ids), r"logits must be a 2-D tensor \[N, V\]"),
    ],
)
def test_choice_logprobs_errors_name_its_own_arguments(make, match):
    """Bad choice_ids or strided logits were reported as gather_logprobs' target/logits."""
    L = torch.randn(4, 100)
    ids = torch.tensor([3, 9, 50, 99])
    with pytest.raises(ConfigError, match=f"^choice_logprobs: {match}") as exc:
        ops.choice_logprobs(*make(L, ids))
    assert "gather_logprobs" not in str(exc.value)
    assert isinstance(exc.value, ValueError)  # what callers caught before
    # the valid call still matches the reference
    torch.testing.assert_close(
        ops.choice_logprobs(L, ids), reference.choice_logprobs(L, ids), rtol=1e-6, atol=1e-5
    )


def test_build_info_lists_every_public_op():
    public = {
        name
        for name, f in vars(ops).items()
        if inspect.isfunction(f) and f.__module__ == ops.__name__ and not name.startswith("_")
    }
    assert public - {"backend_of"} == set(ops.OPS)
    backends = wmdp_fast.build_info()["backends"]["cpu"]
    assert set(backends) == set(ops.OPS) and "unpack_activations" in backends
    assert backends == {op: ops.backend_of(op, "cpu") for op in ops.OPS}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_ops_run_their_kernels_without_fallback_warning(monkeypatch, caplog):
    """On a GPU build every op has its CUDA/Triton backend and no call warns about the
    reference. Run by gpu_check.sh's gpu-tests step."""
    monkeypatch.setattr(ops, "_cuda_fallback_warned", set())
    assert {op: ops.backend_of(op, "cuda") for op in ops.OPS} == {
        **{op: "cuda" for op in ops.GATHER_OPS},
        **{op: "triton" for op in ops.TRITON_OPS},
    }
    logits = torch.randn(4, 1000, device="cuda")
    h = torch.randn(2, 3, 64, device="cuda", requires_grad=True)
    t = torch.randn(2, 3, 64, device="cuda")
    with caplog.at_level(logging.WARNING, logger="wmdp_fast"):
        got = ops.choice_logprobs(logits, torch.tensor([1, 5, 999], device="cuda"))
        ops.rmu_loss(h, t[0, 0], h, ops.pack_activations(t, "int8"), 3.0)[0].backward()
        ops.unpack_activations(ops.pack_activations(t, "int8"))
    assert _warnings(caplog) == []
    want = reference.choice_logprobs(logits, torch.tensor([1, 5, 999], device="cuda"))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_compiled_triton_launches_are_put_on_the_tensors_device():
    """Triton launches on the current CUDA device: the ops enter the tensors' device first
    (a model on cuda:1 while cuda:0 is current). Nothing to enter on the CPU or interpreted."""
    import contextlib

    from wmdp_fast import ops

    ctx = ops._on_device("triton", torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    for backend, dev in (("triton-interpret", "cpu"), ("reference", "cuda:1"), ("triton", "cpu")):
        assert isinstance(ops._on_device(backend, torch.device(dev)), contextlib.nullcontext)
