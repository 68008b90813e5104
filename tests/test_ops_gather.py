"""gather_logprobs / choice_logprobs: the C++ (and CUDA) op against the plain-PyTorch reference."""

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wmdp_fast import _ext, build_info, ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VARIANT_ENV = "WMDP_FAST_GATHER_CUDA_VARIANT"
CUDA_VARIANTS = (1, 2, 3, 4)  # the row_stats kernels of csrc/gather_logprobs_cuda.cu
CSRC = Path(__file__).resolve().parent.parent / "csrc"


# A test taking `device` runs on the CPU and on CUDA once per kernel variant. The CUDA cases
# carry the gpu mark, so `pytest -m gpu` (benchmarks/gpu_check.sh) selects them.
@pytest.fixture(
    params=["cpu"]
    + [pytest.param(f"cuda-v{v}", marks=pytest.mark.gpu, id=f"cuda-v{v}") for v in CUDA_VARIANTS]
)
def device(request, monkeypatch):
    if request.param == "cpu":
        monkeypatch.delenv(VARIANT_ENV, raising=False)
        return "cpu"
    monkeypatch.setenv(VARIANT_ENV, request.param.removeprefix("cuda-v"))
    return "cuda"


def _truth(logits, row_index, target, offsets):
    """float64 ground truth (independent of both float32 implementations)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    out = []
    greedy = []
    am = logits.float().argmax(dim=-1)
    for n in range(offsets.numel() - 1):
        a, b = int(offsets[n]), int(offsets[n + 1])
        out.append(sum(float(lp[row_index[i], target[i]]) for i in range(a, b)))
        greedy.append(all(int(am[row_index[i]]) == int(target[i]) for i in range(a, b)))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(greedy)


def _random_requests(R, V, N, max_len=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (N,), generator=g)
    offsets = torch.zeros(N + 1, dtype=torch.long)
    offsets[1:] = lens.cumsum(0)
    M = int(offsets[-1])
    row_index = torch.randint(0, R, (M,), generator=g)  # rows shared between requests
    target = torch.randint(0, V, (M,), generator=g)
    return row_index.to(device), target.to(device), offsets.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [32000, 32001, 50257, 151936])
def test_matches_reference(V, dtype, device):
    R = 24 if V > 100000 else 48
    torch.manual_seed(V)
    logits = (torch.randn(R, V) * 4).to(dtype).to(device)
    # make some targets greedy so is_greedy is exercised both ways
    row_index, target, offsets = _random_requests(R, V, 40, device=device)
    am = logits.float().argmax(-1)
    target[::3] = am[row_index[::3]]
    ll, g = ops.gather_logprobs(logits, row_index, target, offsets)
    rl, rg = reference.gather_logprobs(logits, row_index, target, offsets)
    assert ll.dtype == torch.float32 and g.dtype == torch.bool and ll.shape == (40,)
    torch.testing.assert_close(ll, rl, atol=1e-5, rtol=1e-6)
    assert torch.equal(g, rg)
    assert g.any() and not g.all()
    tl, tg = _truth(logits.cpu(), row_index.cpu(), target.cpu(), offsets.cpu())
    torch.testing.assert_close(ll.cpu().double(), tl, atol=2e-5, rtol=1e-6)
    assert torch.equal(g.cpu(), tg)


def test_single_token_choices_share_one_row(device):
    """The usual MCQ case: 4 single-token requests per question, all on one row."""
    torch.manual_seed(1)
    N, V = 16, 32000
    logits = torch.randn(N, V, device=device) * 3
    choice_ids = torch.tensor([330, 365, 334, 384], device=device)
    lp = ops.choice_logprobs(logits, choice_ids)
    ref = reference.choice_logprobs(logits, choice_ids)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-6)
    per_row = torch.randint(0, V, (N, 4), device=device)
    torch.testing.assert_close(
        ops.choice_logprobs(logits, per_row),
        reference.choice_logprobs(logits, per_row),
        atol=1e-5,
        rtol=1e-6,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_from_3d_logits(dtype, device):
    """Rows picked out of [B, T, V] logits without a copy (stride(0) = T * V)."""
    torch.manual_seed(2)
    B, T, V = 5, 7, 32001
    full = (torch.randn(B, T, V) * 2).to(dtype).to(device)
    last = full[:, -1, :]
    assert not last.is_contiguous() and last.stride(1) == 1
    row_index = torch.tensor([0, 1, 2, 3, 4, 4], device=device)
    target = torch.tensor([5, 6, 7, 8, 9, 10], device=device)
    offsets = torch.tensor([0, 1, 2, 3, 4, 6], device=device)
    ll, g = ops.gather_logprobs(last, row_index, target, offsets)
    rl, rg = reference.gather_logprobs(last.contiguous(), row_index, target, offsets)
    torch.testing.assert_close(ll, rl, atol=1e-5, rtol=1e-6)
    assert torch.equal(g, rg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(dtype, device):
    torch.manual_seed(3)
    V = 32000
    logits = torch.randn(6, V) * 3
    logits[0, 17] = 1e4  # one huge logit: loglik of 17 is ~0, the rest ~ -1e4
    logits[1, :] = -1e4
    logits[1, 5] = 1e4
    logits[2, 100:200] = -1e4
    logits[3, :] = 1e4  # all equal: uniform, argmax is index 0
    logits = logits.to(dtype).to(device)
    row_index = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4], device=device)
    target = torch.tensor([17, 3, 5, 6, 150, 0, 9, 1], device=device)
    offsets = torch.arange(9, device=device)
    ll, g = ops.gather_logprobs(logits, row_index, target, offsets)
    tl, tg = _truth(logits.cpu(), row_index.cpu(), target.cpu(), offsets.cpu())
    # float32 arithmetic on logits of size 1e4 (ulp ~1e-3): loglik = x - lse is exact only up to
    # about one ulp of 1e4, in any float32 implementation (lm-eval's included).
    torch.testing.assert_close(ll.cpu().double(), tl, atol=2e-3, rtol=1e-6)
    assert torch.equal(g.cpu(), tg)
    assert g.tolist()[:3] == [True, False, True]
    assert g[5] and not g[6]  # all-equal row: only index 0 is greedy
    assert abs(float(ll[5]) + torch.log(torch.tensor(float(V))).item()) < 2e-3


def test_tie_rule_first_index_wins(device):
    """Ties: the argmax is the FIRST maximal index (torch.argmax / lm-eval's rule)."""
    V = 32000
    logits = torch.zeros(2, V, device=device)
    logits[0, 10] = 5.0
    logits[0, 20] = 5.0  # tied with 10
    logits[1, 3000] = 2.0
    logits[1, 1500] = 2.0  # tied, earlier index, in the chunk before (CPU chunks: 2048 elements)
    row_index = torch.tensor([0, 0, 1, 1], device=device)
    target = torch.tensor([10, 20, 1500, 3000], device=device)
    offsets = torch.arange(5, device=device)
    ll, g = ops.gather_logprobs(logits, row_index, target, offsets)
    assert g.tolist() == [True, False, True, False]
    assert ll[0] == ll[1] and ll[2] == ll[3]
    # a multi-token request is greedy only if every pair is
    _, g2 = ops.gather_logprobs(logits, row_index, target, torch.tensor([0, 2, 4], device=device))
    assert g2.tolist() == [False, False]


def test_multi_token_requests_sum_in_order():
    torch.manual_seed(4)
    V = 50257
    logits = torch.randn(10, V)
    row_index = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9])
    target = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    offsets = torch.tensor([0, 4, 5, 5, 11])  # includes an empty request
    ll, g = ops.gather_logprobs(logits, row_index, target, offsets)
    lp = torch.log_softmax(logits.double(), -1)
    expect = [
        sum(float(lp[row_index[i], target[i]]) for i in range(a, b))
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())
    ]
    torch.testing.assert_close(
        ll.double(), torch.tensor(expect, dtype=torch.float64), atol=2e-5, rtol=0
    )
    assert ll[2] == 0.0 and g[2]  # empty request: log-likelihood 0, vacuously greedy


def test_empty_inputs_return_empty():
    logits = torch.randn(3, 100)
    e = torch.zeros(0, dtype=torch.long)
    ll, g = ops.gather_logprobs(logits, e, e, torch.zeros(1, dtype=torch.long))
    assert ll.shape == (0,) and g.shape == (0,)
    ll, g = ops.gather_logprobs(torch.randn(0, 100), e, e, torch.zeros(1, dtype=torch.long))
    assert ll.shape == (0,)
    assert ops.choice_logprobs(torch.randn(0, 100), torch.tensor([1, 2])).shape == (0, 2)


def test_requests_without_pairs(device):
    """N > 0 requests but M = 0 pairs: every request is empty, log-likelihood 0, greedy."""
    logits = torch.randn(3, 100, device=device)
    e = torch.zeros(0, dtype=torch.long, device=device)
    offsets = torch.zeros(4, dtype=torch.long, device=device)
    ll, g = ops.gather_logprobs(logits, e, e, offsets)
    assert ll.dtype == torch.float32 and ll.device == logits.device
    assert ll.tolist() == [0.0, 0.0, 0.0] and g.tolist() == [True, True, True]
    rl, rg = reference.gather_logprobs(logits.cpu(), e.cpu(), e.cpu(), offsets.cpu())
    assert torch.equal(ll.cpu(), rl) and torch.equal(g.cpu(), rg)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda L: (L[0], L[1], L[2][:-1], L[3]), "same length"),
        (lambda L: (L[0], L[1].int(), L[2], L[3]), "row_index must be a 1-D int64"),
        (lambda L: (L[0].int(), L[1], L[2], L[3]), "dtype must be float32"),
        (lambda L: (L[0][0], L[1], L[2], L[3]), "2-D"),
        (lambda L: (L[0].t(), L[1], L[2], L[3]), "contiguous last dimension"),
        (lambda L: (L[0], L[1] + 100, L[2], L[3]), r"row_index out of range \[0, 4\)"),
        (lambda L: (L[0], L[1], L[2] + 1000, L[3]), r"target id out of range \[0, 1000\)"),
        (lambda L: (L[0], L[1], L[2], torch.tensor([0, 3, 2, 4])), "non-decreasing"),
        (lambda L: (L[0], L[1], L[2], torch.tensor([0, 2, 3])), "end at M=4"),
        (lambda L: (L[0], L[1] - 1, L[2], L[3]), r"row_index out of range \[0, 4\): min -1"),
        (lambda L: (L[0], L[1], L[2] - 2, L[3]), r"target id out of range \[0, 1000\): min -1"),
        (lambda L: (L[0], L[1], L[2], torch.tensor([1, 2, 3, 4, 4])), "start at 0"),
        (lambda L: (L[0], L[1], L[2].int(), L[3]), "target must be a 1-D int64"),
        (lambda L: (L[0], L[1], L[2], L[3].int()), "request_offsets must be a 1-D int64"),
        (lambda L: (L[0], L[1][None], L[2], L[3]), "row_index must be a 1-D int64"),
        (lambda L: (L[0].tolist(), L[1], L[2], L[3]), "logits must be a 2-D tensor"),
        (lambda L: (L[0], [0, 1, 2, 3], L[2], L[3]), "row_index must be a 1-D int64 tensor"),
        (lambda L: (L[0], L[1], (1, 2, 3, 4), L[3]), "target must be a 1-D int64 tensor"),
        (lambda L: (L[0], L[1], L[2], 4), "request_offsets must be a 1-D int64 tensor"),
    ],
)
def test_bad_arguments_name_the_argument(make, match):
    L = (
        torch.randn(4, 1000),
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([1, 2, 3, 4]),
        torch.arange(5),
    )
    with pytest.raises(ValueError, match=match):
        ops.gather_logprobs(*make(L))


def _bad_value_cases() -> list[tuple[str, tuple]]:
    """(name, CPU arguments) with malformed row / target / offset VALUES: on CUDA the kernels
    find these (each would be an address there), and csrc/bindings.cpp's check_gather_values
    must then raise what wmdp_fast.ops' own checks raise on the CPU. Row 3 holds a NaN: the
    argument error comes first."""
    L = torch.randn(4, 1000)
    L[3, 5] = float("nan")
    ri, tg, off = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.arange(5)
    T = torch.tensor
    big = 10**12
    return [
        ("row past R", (L, ri + 100, tg, off)),
        ("negative row", (L, ri - 1, tg, off)),
        ("row far past R", (L, T([0, big, 2, 3]), tg, off)),
        ("row far below 0", (L, T([0, 1, -big, 3]), tg, off)),
        ("target past V", (L, ri, tg + 1000, off)),
        ("negative target", (L, ri, tg - 2, off)),
        ("target far past V", (L, ri, T([1, big, 3, 4]), off)),
        ("row and target bad", (L, ri + 4, tg - 5, off)),
        ("offsets decreasing", (L, ri, tg, T([0, 3, 2, 4]))),
        ("offsets decreasing twice", (L, ri, tg, T([0, 3, 2, 4, 1, 4]))),
        ("offset far past M inside", (L, ri, tg, T([0, big, 4]))),
        ("negative offset", (L, ri, tg, T([0, -3, 4]))),
        ("offsets end short", (L, ri, tg, T([0, 2, 3]))),
        ("offsets end past M", (L, ri, tg, T([0, 1, 2, 3, big]))),
        ("offsets not from 0", (L, ri, tg, T([1, 2, 3, 4, 4]))),
        ("offsets and rows bad", (L, ri + 9, tg, T([0, 2, 1, 4]))),
        ("no pairs, offsets past 0", (L, ri[:0], tg[:0], T([0, 1]))),
        ("no rows at all", (L[:0], ri, tg, off)),
        ("empty vocabulary", (L[:, :0], ri, tg, off)),
    ]


def _value_error(fn, args) -> str:
    with pytest.raises(ValueError) as exc:
        fn(*args)
    return str(exc.value)


def test_device_value_checks_say_what_ops_says():
    """The messages the CUDA path raises for bad values (check_gather_values in bindings.cpp, run
    on the CPU here: plain ATen ops) are ops' CPU messages, character for character, and in the
    same order of precedence; valid arguments pass."""
    C = _ext.load_C()
    if C is None:
        pytest.skip(f"wmdp_fast._C not built: {_ext.load_error()}")
    seen = set()
    for name, args in _bad_value_cases():
        want = _value_error(ops.gather_logprobs, args)
        assert _value_error(C.check_gather_values, args) == want, name
        seen.add(want.split(":")[1].split(" must")[0].split(" out")[0].strip())
    assert seen == {"request_offsets", "row_index", "target id"}
    L = torch.randn(4, 1000)
    C.check_gather_values(L, torch.tensor([3, 0]), torch.tensor([999, 0]), torch.tensor([0, 0, 2]))
    C.check_gather_values(
        L,
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(3, dtype=torch.long),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("variant", CUDA_VARIANTS)
def test_cuda_bad_values_raise_the_cpu_error(variant, monkeypatch):
    """Bad row / target / offset values on CUDA, checked by the kernels with no sync before the
    launch: wmdp_fast.ops and the raw _C call raise ops' CPU message, no kernel reads or writes
    out of bounds (values up to 1e12; an illegal address would poison the context and fail
    every later CUDA call), and the next valid call is right."""
    monkeypatch.setenv(VARIANT_ENV, str(variant))
    C = _ext.load_C()
    for name, args in _bad_value_cases():
        want = _value_error(ops.gather_logprobs, args)
        cuda_args = tuple(a.cuda() for a in args)
        assert _value_error(ops.gather_logprobs, cuda_args) == want, name
        assert _value_error(C.gather_logprobs, cuda_args) == want, name
    torch.cuda.synchronize()  # raises if any launch above faulted
    L = torch.randn(4, 1000, device="cuda")
    ri, tg = torch.tensor([3, 0, 3], device="cuda"), torch.tensor([999, 0, 7], device="cuda")
    ll, _ = ops.gather_logprobs(L, ri, tg, torch.tensor([0, 2, 2, 3], device="cuda"))
    lp = torch.log_softmax(L.double(), -1)[ri, tg]
    want = torch.stack([lp[0] + lp[1], lp.new_zeros(()), lp[2]]).float()
    torch.testing.assert_close(ll, want, atol=2e-5, rtol=1e-6)


@pytest.mark.gpu
def test_cuda_choice_ids_out_of_range_name_choice_ids():
    """choice_logprobs on CUDA leaves the id range to the kernels (no sync before the launch)
    and still raises its own ConfigError, the CPU message, also before a scored row's NaN (the
    CPU checks the ids first; on CUDA the argument flags outrank the bad-row flag)."""
    from wmdp_fast.errors import ConfigError

    L = torch.randn(4, 100)
    L[1, 5] = float("nan")
    for ids in (torch.tensor([3, 9, 100, 99]), torch.tensor([[1, -7]] * 4)):
        with pytest.raises(ConfigError) as cpu:
            ops.choice_logprobs(L, ids)
        for dev_ids in (ids.cuda(), ids):  # ids on the GPU or left on the CPU
            with pytest.raises(ConfigError) as gpu:
                ops.choice_logprobs(L.cuda(), dev_ids)
            assert str(gpu.value) == str(cpu.value)
            assert gpu.value.__cause__ is None and gpu.value.__suppress_context__


@pytest.mark.gpu
@pytest.mark.parametrize("variant", CUDA_VARIANTS)
def test_cuda_call_syncs_once_after_its_launches(variant, monkeypatch):
    """The host path of a CUDA call (bench-gather's whole op): every kernel is queued before
    the call's only device-to-host copy (the flags), so the GPU never idles while the host
    validates. The CUDA runtime calls made inside the op come from the profiler (CUPTI)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    monkeypatch.setenv(VARIANT_ENV, str(variant))
    logits = torch.randn(64, 5000, device="cuda", dtype=torch.bfloat16)
    args = (
        logits,
        torch.arange(64, device="cuda").repeat_interleave(4),
        torch.randint(0, 5000, (256,), device="cuda"),
        torch.arange(257, device="cuda"),
    )
    ops.gather_logprobs(*args)  # warm-up: allocator blocks, module loads
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("the_gather_call"):
            ops.gather_logprobs(*args)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CPU]
    (call,) = [e for e in events if e.name == "the_gather_call"]
    lo, hi = call.time_range.start, call.time_range.end
    runtime = sorted(
        (e for e in events if e.name.startswith("cuda") and lo <= e.time_range.start <= hi),
        key=lambda e: e.time_range.start,
    )
    names = [e.name for e in runtime]
    launches = [i for i, n in enumerate(names) if "LaunchKernel" in n]
    syncs = [i for i, n in enumerate(names) if "Memcpy" in n or "Synchronize" in n]
    if not launches:
        pytest.skip(f"the profiler recorded no CUDA runtime calls here: {names}")
    # check_mark, row_stats, finish (and the fill of the row map and flags, unless a memset)
    assert len(launches) >= 3, names
    assert len([n for n in names if "Memcpy" in n]) == 1, names
    assert syncs and min(syncs) > max(launches), names


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["row_index", "target", "request_offsets"])
def test_device_mismatch_names_the_argument(which):
    args = {
        "logits": torch.randn(4, 1000, device="cuda"),
        "row_index": torch.tensor([0, 1, 2, 3], device="cuda"),
        "target": torch.tensor([1, 2, 3, 4], device="cuda"),
        "request_offsets": torch.arange(5, device="cuda"),
    }
    args[which] = args[which].cpu()
    with pytest.raises(ValueError, match=f"{which} is on cpu but logits is on cuda"):
        ops.gather_logprobs(**args)
    args = {k: v.cpu() for k, v in args.items()}
    args[which] = args[which].cuda()
    with pytest.raises(ValueError, match=f"{which} is on cuda:0 but logits is on cpu"):
        ops.gather_logprobs(**args)


def test_smallest_bad_row_is_named(device):
    """Rows 3 and 1 both bad, row 3 asked for first: every path names row 1 (CUDA finds it with
    atomicMin, the CPU kernel takes the minimum, the fallback checks sorted rows)."""
    logits = torch.randn(5, 3000)
    logits[3, 10] = float("nan")
    logits[1] = float("-inf")
    logits = logits.to(device)
    args = [torch.tensor(v, device=device) for v in ([3, 0, 1], [1, 1, 1], [0, 1, 2, 3])]
    with pytest.raises(RuntimeError, match="logits row 1 contains"):
        ops.gather_logprobs(logits, *args)


@pytest.mark.parametrize("poison", ["nan", "allneginf", "posinf"])
def test_bad_rows_raise(poison, device):
    logits = torch.randn(4, 5000)
    if poison == "nan":
        logits[2, 4321] = float("nan")
    elif poison == "allneginf":
        logits[2] = float("-inf")
    else:
        logits[2, 7] = float("inf")
    logits = logits.to(device)
    with pytest.raises(RuntimeError, match="row 2"):
        ops.gather_logprobs(
            logits,
            torch.tensor([0, 2], device=device),
            torch.tensor([1, 1], device=device),
            torch.tensor([0, 1, 2], device=device),
        )
    # rows that are never asked for are never read
    ll, _ = ops.gather_logprobs(
        logits,
        torch.tensor([0, 1], device=device),
        torch.tensor([1, 1], device=device),
        torch.tensor([0, 1, 2], device=device),
    )
    assert torch.isfinite(ll).all()


def test_partial_neginf_row_is_fine(device):
    logits = torch.randn(1, 4096)
    logits[0, :4000] = float("-inf")  # masked vocabulary
    ll, g = ops.gather_logprobs(
        logits.to(device),
        torch.tensor([0, 0], device=device),
        torch.tensor([4001, 5], device=device),
        torch.arange(3, device=device),
    )
    ref = torch.log_softmax(logits.double(), -1)[0]
    assert abs(float(ll[0]) - float(ref[4001])) < 1e-5
    assert ll[1] == float("-inf") and not g[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_at_every_distance(dtype, device):
    """First-index ties inside one 16-byte vector, between neighbouring threads, and as far apart
    as one thread's consecutive loads and chunks in every CUDA variant (128 ... 16,384
    elements), in aligned rows and in rows misaligned by one element (the head is read element
    by element)."""
    V = 40001
    cases = [(3, d) for d in (1, 4, 8, 9, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)]
    cases += [(20000, 1024), (0, V - 1)]  # (first index, distance to its tie)
    for start in (0, 1):
        full = torch.randn(len(cases), V + 1) * 3
        for r, (i, d) in enumerate(cases):
            full[r, start + i] = full[r, start + i + d] = 30.0
        x = full.to(dtype).to(device)[:, start : start + V]  # sliced on the device: strided
        rows = torch.arange(len(cases), device=device).repeat_interleave(2)
        target = torch.tensor([t for i, d in cases for t in (i, i + d)], device=device)
        ll, g = ops.gather_logprobs(
            x, rows, target, torch.arange(2 * len(cases) + 1, device=device)
        )
        assert g.tolist() == [True, False] * len(cases)
        assert torch.equal(ll[0::2], ll[1::2])
        offsets = torch.arange(len(g) + 1)
        rl, _ = reference.gather_logprobs(x.cpu(), rows.cpu(), target.cpu(), offsets)
        torch.testing.assert_close(ll.cpu(), rl, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "poison",
    [
        "nan_first",
        "nan_last",
        "posinf_last",
        "neginf_but_one_nan",
        "neginf_but_one_posinf",
        "neginf_but_finite_and_nan",
        "masked_vocab_nan",
        "posinf_and_neginf",
    ],
)
def test_bad_row_cases_name_the_row(poison, dtype, device):
    """Bad rows the CUDA variants 2-4 must find from the final (max, sum) alone: a NaN in a
    16-byte vector whose other values are -inf, a +inf at the very end, a NaN in the misaligned
    head, ... Row 3 of 5 is poisoned, in a [5, V] slice of [5, V + 1] (rows misaligned)."""
    V = 32001
    full = torch.randn(5, V + 1)
    x = full[:, 1:]  # a view: the poison below lands in full
    nan, inf = float("nan"), float("inf")
    if poison == "nan_first":
        x[3, 0] = nan
    elif poison == "nan_last":
        x[3, V - 1] = nan
    elif poison == "posinf_last":
        x[3, V - 1] = inf
    elif poison == "neginf_but_one_nan":
        x[3] = -inf
        x[3, 12345] = nan
    elif poison == "neginf_but_one_posinf":
        x[3] = -inf
        x[3, 77] = inf
    elif poison == "neginf_but_finite_and_nan":
        x[3] = -inf
        x[3, 100] = 1.0
        x[3, 20000] = nan
    elif poison == "masked_vocab_nan":
        x[3, : 3 * V // 4] = -inf
        x[3, 1001] = nan  # alone among -inf values
    else:
        x[3, 5] = inf
        x[3, 6] = -inf
    x = full.to(dtype).to(device)[:, 1:]  # sliced on the device: rows stay misaligned
    assert x.stride(0) == V + 1
    row_index = torch.tensor([0, 1, 2, 3, 4], device=device)
    target = torch.tensor([1, 2, 3, 4, 5], device=device)
    with pytest.raises(RuntimeError, match="row 3 "):
        ops.gather_logprobs(x, row_index, target, torch.arange(6, device=device))
    ll, _ = ops.gather_logprobs(  # the same rows without row 3 are fine
        x, row_index[[0, 1, 2, 4]], target[:4], torch.arange(5, device=device)
    )
    assert torch.isfinite(ll).all()


def test_cuda_variant_is_read_from_the_environment(monkeypatch):
    """WMDP_FAST_GATHER_CUDA_VARIANT picks the CUDA row_stats kernel (parsed in bindings.cpp, so
    this runs without a GPU); anything but 1-4 is an error naming the variable."""
    C = _ext.load_C()
    if C is None:
        pytest.skip(f"wmdp_fast._C not built: {_ext.load_error()}")
    monkeypatch.delenv(VARIANT_ENV, raising=False)
    assert C.gather_cuda_variant() == 3  # the default: fastest on an H200 (bench-gather, session 6)
    monkeypatch.setenv(VARIANT_ENV, "")
    assert C.gather_cuda_variant() == 3
    for v in CUDA_VARIANTS:
        monkeypatch.setenv(VARIANT_ENV, str(v))
        assert C.gather_cuda_variant() == v
    for bad in ("0", "5", "2 ", "12", "v2"):
        monkeypatch.setenv(VARIANT_ENV, bad)
        with pytest.raises(
            RuntimeError, match=rf"{VARIANT_ENV} must be 1, 2, 3 \(the default\) or 4, got '{bad}'"
        ):
            C.gather_cuda_variant()


@pytest.mark.gpu
def test_cuda_bad_variant_raises_before_any_work(monkeypatch):
    monkeypatch.setenv(VARIANT_ENV, "9")
    logits = torch.randn(2, 100, device="cuda")
    with pytest.raises(RuntimeError, match=VARIANT_ENV):
        ops.gather_logprobs(
            logits,
            torch.tensor([0, 1], device="cuda"),
            torch.tensor([3, 4], device="cuda"),
            torch.arange(3, device="cuda"),
        )


# (U, G) template arguments of row_stats_v2_kernel per variant; variant 1 is row_stats_kernel
VARIANT_KERNELS = {1: "v1", 2: (4, 256), 3: (4, 32), 4: (8, 256)}


def _row_stats_kernels(names) -> set:
    """Which row_stats kernels ran, from profiler kernel names, demangled or not: "v1" for
    row_stats_kernel, (U, G) for row_stats_v2_kernel<T, U, G>."""
    found = set()
    for name in names:
        m = re.search(r"row_stats_v2_kernel<[^<>]*?,\s*(\d+),\s*(\d+)\s*>", name) or re.search(
            r"row_stats_v2_kernelI\w*?Li(\d+)ELi(\d+)E", name
        )
        if m:
            found.add((int(m.group(1)), int(m.group(2))))
        elif re.search(r"row_stats_kernel[<I]", name):
            found.add("v1")
    return found


def test_row_stats_kernel_names_are_parsed():
    """The names nvcc 13 gives the kernels (demangled as the profiler shows them, and mangled)."""
    ns = "void (anonymous namespace)::"
    assert _row_stats_kernels(
        [
            ns + "row_stats_kernel<__nv_bfloat16>(__nv_bfloat16 const*, long, long, ...)",
            ns + "row_stats_v2_kernel<float, 4, 32>(float const*, long, long, long, ...)",
            ns + "row_stats_v2_kernel<__half, 8, 256>(__half const*, long, long, long, ...)",
            ns + "check_mark_kernel(long const*, long const*, long, long const*, long, ...)",
            ns + "finish_kernel<float>(float const*, long, ...)",
        ]
    ) == {"v1", (4, 32), (8, 256)}
    mangled = "_ZN56_GLOBAL__N__b3bb5fbd_23_gather_logprobs_cuda_cu_25560cc6"
    assert _row_stats_kernels(
        [
            mangled + "19row_stats_v2_kernelI13__nv_bfloat16Li4ELi256EEEvPKT_lllPKhPfPlPiS9_",
            mangled + "16row_stats_kernelIfEEvPKT_llPKhPfPlPiS8_",
        ]
    ) == {(4, 256), "v1"}


@pytest.mark.gpu
def test_cuda_runs_the_variant_it_is_asked_for(monkeypatch):
    """Every variant gives the right numbers, so a variant switch that ran the wrong kernel
    (env read once, a swapped case) would pass every other test and make the benchmark's
    columns lie: the profiler names the row_stats kernel each setting really launched."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    logits = torch.randn(20, 5000, device="cuda", dtype=torch.bfloat16)
    args = (
        logits,
        torch.tensor([0, 19, 7], device="cuda"),
        torch.tensor([1, 2, 3], device="cuda"),
        torch.arange(4, device="cuda"),
    )
    for v, expect in VARIANT_KERNELS.items():
        monkeypatch.setenv(VARIANT_ENV, str(v))
        ops.gather_logprobs(*args)  # warm-up outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ops.gather_logprobs(*args)
            torch.cuda.synchronize()
        names = [
            e.name for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA
        ]
        if not names:
            pytest.skip("torch.profiler recorded no CUDA kernels here (CUPTI unavailable?)")
        assert _row_stats_kernels(names) == {expect}, (v, names)


@pytest.mark.gpu
def test_cuda_row_offsets_past_2_31_elements(monkeypatch):
    """The eval's real size, 16,384 rows of a 151,936 vocabulary, as a [:, 1:] slice of
    [R, V + 1] (odd row stride: every row misaligned differently, a storage offset): row 14,134
    straddles element 2^31 and rows from 14,135 on start past it (and 4 GiB), so an int32
    row * stride anywhere in the mark / row_stats / finish kernels reads the wrong row. bf16, the eval's dtype; only the
    scored rows are filled (5 GB, freed at the end)."""
    R, V, dtype = 16384, 151936, torch.bfloat16
    rows = [0, 1, 14133, 14134, 14135, 16382, 16383]
    full = torch.empty(R, V + 1, dtype=dtype, device="cuda")
    try:
        x = full[:, 1:]
        # row 14,134 straddles element 2^31, row 14,135 starts past it (the test's own check)
        start = [x.storage_offset() + r * x.stride(0) for r in rows]
        assert start[3] < 2**31 < start[3] + V and start[4] > 2**31
        g = torch.Generator(device="cuda").manual_seed(7)
        vals = torch.randn(len(rows), V, generator=g, device="cuda") * 4
        vals[-1, 100] = vals[-1, 150000] = 40.0  # a tie far apart: the first index wins
        x[rows] = vals.to(dtype)
        row_index = torch.tensor(rows, device="cuda").repeat_interleave(2)
        target = torch.randint(0, V, (2 * len(rows),), generator=g, device="cuda")
        target[-2:] = torch.tensor([100, 150000], device="cuda")
        offsets = torch.arange(2 * len(rows) + 1, device="cuda")
        sub = x[rows].cpu()  # the scored rows, renumbered 0..6 for the float64 truth
        local = torch.arange(len(rows)).repeat_interleave(2)
        tl, tg = _truth(sub, local, target.cpu(), offsets.cpu())
        assert tg[-2:].tolist() == [True, False]
        for v in CUDA_VARIANTS:
            monkeypatch.setenv(VARIANT_ENV, str(v))
            ll, gr = ops.gather_logprobs(x, row_index, target, offsets)
            torch.testing.assert_close(ll.cpu().double(), tl, atol=2e-5, rtol=1e-6, msg=f"v{v}")
            assert torch.equal(gr.cpu(), tg), v
    finally:
        del full
        torch.cuda.empty_cache()  # other xdist workers share the card


def _cuda_include_dir() -> str | None:
    """A CUDA toolkit include folder with cuda_bf16.h (host-usable headers), if there is one."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    for h in homes:
        if h and (Path(h) / "include" / "cuda_bf16.h").is_file():
            return str(Path(h) / "include")
    return None


def test_cuda_variants_2_to_4_math_on_the_host(tmp_path):
    """The per-thread code of CUDA variants 2-4 (csrc/row_stats_v2.cuh, __host__ __device__) run
    on the CPU by csrc/row_stats_v2_hostcheck.cpp: every thread of a row, merged in the kernel's
    shuffle order, against a float64 reference (lse, first argmax, bad-row verdict) over
    alignments, ties and NaN/+inf/-inf rows. Needs a C++ compiler and the CUDA headers."""
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("needs g++ and a CUDA toolkit's include folder (cuda_bf16.h)")
    exe = tmp_path / "hostcheck"
    src = CSRC / "row_stats_v2_hostcheck.cpp"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", "-w", "-I", str(CSRC), "-I", inc, str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and ", 0 failures" in res.stdout, res.stdout[-3000:]


def test_compiled_extension_is_what_runs(monkeypatch):
    """When _C is built, the op must run it, not a silent fallback to the reference."""
    if os.environ.get("WMDP_FAST_DISABLE_C") == "1":
        pytest.skip("C++ extension disabled on purpose")
    info = build_info()
    if os.environ.get("WMDP_FAST_REQUIRE_C") == "1":
        assert info["C_cpu_compiled"], f"wmdp_fast._C is not built: {info['C_error']}"
    if not info["C_cpu_compiled"]:
        pytest.skip(f"wmdp_fast._C not built: {info['C_error']}")
    assert info["backends"]["cpu"]["gather_logprobs"] == "c++"
    calls = []
    C = _ext.load_C()
    real = C.gather_logprobs

    def spy(*a):
        calls.append(1)
        return real(*a)

    def boom(*a, **k):
        raise AssertionError("reference path used although _C is built")

    monkeypatch.setattr(C, "gather_logprobs", spy)
    monkeypatch.setattr(reference, "gather_logprobs", boom)
    ll, _ = ops.gather_logprobs(
        torch.randn(2, 100), torch.tensor([0, 1]), torch.tensor([3, 4]), torch.arange(3)
    )
    assert calls == [1] and ll.shape == (2,)


def test_fallback_path_warns_once_and_matches(monkeypatch, caplog):
    monkeypatch.setenv("WMDP_FAST_DISABLE_C", "1")
    _ext._reset_for_tests()
    try:
        torch.manual_seed(5)
        logits = torch.randn(8, 32000)
        ri, tg, off = _random_requests(8, 32000, 10, seed=5)
        with caplog.at_level(logging.WARNING, logger="wmdp_fast"):
            ll1, g1 = ops.gather_logprobs(logits, ri, tg, off)
            ll2, _ = ops.gather_logprobs(logits, ri, tg, off)
        warnings = [r for r in caplog.records if "C++ extension" in r.getMessage()]
        assert len(warnings) == 1
        assert ops.backend_of("gather_logprobs", "cpu") == "reference"
        rl, rg = reference.gather_logprobs(logits, ri, tg, off)
        assert torch.equal(ll1, rl) and torch.equal(g1, rg) and torch.equal(ll1, ll2)
        bad = logits.clone()
        bad[ri[0], 0] = float("nan")
        with pytest.raises(RuntimeError, match=f"row {int(ri[0])}"):
            ops.gather_logprobs(bad, ri, tg, off)
    finally:
        monkeypatch.delenv("WMDP_FAST_DISABLE_C")
        _ext._reset_for_tests()


@pytest.mark.gpu
def test_cuda_extension_compiled_and_used():
    info = build_info()
    assert info["C_cuda_compiled"], "wmdp_fast._C was built without CUDA"
    assert info["backends"]["cuda"]["gather_logprobs"] == "cuda"


def test_fallback_when_the_extension_does_not_import(monkeypatch, caplog):
    """wmdp_fast._C missing (sys.modules entry None makes its import fail, as a failed build
    would): one warning naming the reason, reference backend, same values, and the bad-row error
    names the smallest bad row like the compiled paths."""
    import wmdp_fast

    monkeypatch.delenv("WMDP_FAST_DISABLE_C", raising=False)
    monkeypatch.setitem(sys.modules, "wmdp_fast._C", None)
    monkeypatch.delattr(wmdp_fast, "_C", raising=False)  # `from wmdp_fast import _C` reads it
    _ext._reset_for_tests()
    try:
        with caplog.at_level(logging.WARNING, logger="wmdp_fast"):
            assert _ext.load_C() is None
            assert ops.backend_of("gather_logprobs", "cpu") == "reference"
            torch.manual_seed(6)
            logits = torch.randn(6, 5000)
            ri, tg, off = _random_requests(6, 5000, 9, seed=6)
            ll, g = ops.gather_logprobs(logits, ri, tg, off)
        assert "not available" in _ext.load_error()
        warnings = [r for r in caplog.records if "wmdp_fast._C is not available" in r.getMessage()]
        assert len(warnings) == 1
        tl, tgr = _truth(logits, ri, tg, off)
        torch.testing.assert_close(ll.double(), tl, atol=2e-5, rtol=1e-6)
        assert torch.equal(g, tgr)
        logits[4, 0] = float("nan")
        logits[2] = float("-inf")
        with pytest.raises(RuntimeError, match="logits row 2 contains"):
            ops.gather_logprobs(logits, torch.tensor([4, 2]), torch.tensor([1, 1]), torch.arange(3))
    finally:
        _ext._reset_for_tests()


# Direct calls of the compiled op with bad arguments, each of which read or wrote outside the
# tensors (segfault) or misread int32 as int64 before bindings.cpp and the CPU kernel checked
# them. Run in a subprocess: a crash there fails this test instead of killing pytest. Each case
# prints "start" first, so the last line names a case that crashed.
RAW_PROBE = r"""
import re, sys, torch
from wmdp_fast import _C

L = torch.randn(4, 100)
ri, tg, off = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.arange(5)
T = torch.tensor
cases = [
    ("row past R", (L, T([0, 1, 2, 4]), tg, off), ValueError, r"row_index\[3\] = 4 is out of range \[0, 4\)"),
    ("row far past R", (L, T([0, 10**12, 2, 3]), tg, off), ValueError, r"row_index\[1\] = 1000000000000 is out"),
    ("negative row", (L, T([0, 1, -1, 3]), tg, off), ValueError, r"row_index\[2\] = -1 is out of range"),
    ("target past V", (L, ri, T([1, 100, 3, 4]), off), ValueError, r"target\[1\] = 100 is out of range \[0, 100\)"),
    ("negative target", (L, ri, T([1, 2, 3, -5]), off), ValueError, r"target\[3\] = -5 is out of range"),
    ("offsets past M", (L, ri, tg, T([0, 1, 2, 3, 10])), ValueError, r"start at 0 and end at M=4, got 0\.\.10"),
    ("offset past M inside", (L, ri, tg, T([0, 1, 9, 3, 4])), ValueError, r"non-decreasing \(entry 3 < entry 2\)"),
    ("offsets not from 0", (L, ri, tg, T([1, 2, 3, 4])), ValueError, r"start at 0 and end at M=4, got 1\.\.4"),
    ("offsets decreasing", (L, ri, tg, T([0, 3, 2, 4])), ValueError, r"non-decreasing \(entry 2 < entry 1\)"),
    ("negative offset", (L, ri, tg, T([0, -3, 4])), ValueError, r"non-decreasing"),
    ("no offsets", (L, ri, tg, T([], dtype=torch.long)), ValueError, r"N\+1 >= 1 entries"),
    ("int32 row_index", (L, ri.int(), tg, off), ValueError, r"row_index must be a 1-D int64 tensor, got Int"),
    ("int32 target", (L, ri, tg.int(), off), ValueError, r"target must be a 1-D int64 tensor"),
    ("int32 offsets", (L, ri, tg, off.int()), ValueError, r"request_offsets must be a 1-D int64 tensor"),
    ("float row_index", (L, ri.float(), tg, off), ValueError, r"row_index must be a 1-D int64"),
    ("2-D row_index", (L, ri[None], tg, off), ValueError, r"row_index must be a 1-D int64 tensor, got Long of shape \[1, 4\]"),
    ("length mismatch", (L, ri, tg[:3], off), ValueError, r"row_index \(4\) and target \(3\) must have the same length"),
    ("int logits", (L.long(), ri, tg, off), ValueError, r"logits dtype must be float32, bfloat16 or float16"),
    ("1-D logits", (L[0], ri, tg, off), ValueError, r"logits must be a 2-D tensor"),
    ("3-D logits", (L[None], ri, tg, off), ValueError, r"logits must be a 2-D tensor"),
    ("strided V", (L.t(), ri, tg, off), ValueError, r"contiguous last dimension"),
    ("meta logits", (L.to("meta"), ri.to("meta"), tg.to("meta"), off.to("meta")), ValueError, r"not supported"),
    ("not tensors", ([[1.0]], [0], [0], [0, 1]), TypeError, r"incompatible function arguments"),
]
bad = L.clone()
bad[3, 7] = float("nan")
bad[1] = float("-inf")
cases.append(("smallest bad row", (bad, T([3, 1, 0]), T([1, 1, 1]), T([0, 2, 3])), RuntimeError, r"logits row 1 contains"))
failed = 0
for name, args, exc, pattern in cases:
    print("start", name, flush=True)
    try:
        _C.gather_logprobs(*args)
        print("NO ERROR", name, flush=True)
        failed += 1
    except Exception as e:
        if not isinstance(e, exc) or not re.search(pattern, str(e)):
            print("WRONG", name, type(e).__name__, str(e)[:300], flush=True)
            failed += 1
for name, rows, pattern in [
    ("row_stats row past R", T([0, 4]), r"rows\[1\] = 4 is out of range \[0, 4\)"),
    ("row_stats negative row", T([-1]), r"rows\[0\] = -1 is out of range"),
    ("row_stats int32 rows", T([0, 1], dtype=torch.int32), r"rows must be a 1-D int64 tensor"),
]:
    print("start", name, flush=True)
    try:
        _C.row_stats_cpu(L, rows)
        print("NO ERROR", name, flush=True)
        failed += 1
    except ValueError as e:
        if not re.search(pattern, str(e)):
            print("WRONG", name, str(e)[:300], flush=True)
            failed += 1
# still correct on good input, and with N > 0 requests but no pairs
ll, g = _C.gather_logprobs(L, ri, tg, off)
ref = torch.log_softmax(L.double(), -1)[ri, tg]
assert torch.allclose(ll.double(), ref, atol=1e-5), (ll, ref)
e = torch.zeros(0, dtype=torch.long)
ll, g = _C.gather_logprobs(L, e, e, torch.zeros(3, dtype=torch.long))
assert ll.tolist() == [0.0, 0.0] and g.tolist() == [True, True], (ll, g)
print("done", failed, "failed", flush=True)
sys.exit(1 if failed else 0)
"""


def test_raw_extension_raises_instead_of_crashing():
    C = _ext.load_C()
    if C is None:
        pytest.skip(f"wmdp_fast._C not built: {_ext.load_error()}")
    res = subprocess.run(
        [sys.executable, "-c", RAW_PROBE], capture_output=True, text=True, timeout=120
    )
    out = res.stdout + res.stderr[-2000:]
    assert res.returncode == 0 and "done 0 failed" in res.stdout, (
        f"exit code {res.returncode} (negative: killed by that signal; the last 'start' line "
        f"names the case):\n{out[-4000:]}"
    )


@pytest.mark.gpu
def test_raw_cuda_call_checks_kinds_devices_and_sizes():
    """bindings.cpp's checks run before any CUDA launch (the VALUES are checked by the kernels:
    test_cuda_bad_values_raise_the_cpu_error)."""
    C = _ext.load_C()
    L = torch.randn(4, 100, device="cuda")
    ri, tg, off = (t.cuda() for t in (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.arange(3)))
    for args, match in [
        ((L, ri.int(), tg, off), "row_index must be a 1-D int64 tensor"),
        ((L, ri, tg.cpu(), off), "target is on cpu but logits is on cuda"),
        ((L, ri, tg[:1], off), "must have the same length M"),
        ((L.t(), ri, tg, off), "contiguous last dimension"),
        ((L, ri, tg, off[:0]), "N\\+1 >= 1 entries"),
    ]:
        with pytest.raises(ValueError, match=match):
            C.gather_logprobs(*args)
    ll, _ = C.gather_logprobs(L, ri, tg, off)  # and the context is still usable
    torch.testing.assert_close(ll, torch.log_softmax(L, -1)[ri, tg], atol=1e-5, rtol=1e-6)
