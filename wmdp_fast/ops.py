"""The public fused ops (functional API).

Each op picks its backend by device: the C++/CUDA extension `wmdp_fast._C` (gather ops) or
Triton kernels (RMU losses, cache packing) when available, else the plain-PyTorch twin in
`wmdp_fast.reference`. `backend_of(op)` says which one runs for a given device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from wmdp_fast import reference
from wmdp_fast._ext import load_C, load_error
from wmdp_fast.errors import ConfigError, DataError, TrainingError

log = logging.getLogger("wmdp_fast")

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GATHER_OPS = ("gather_logprobs", "choice_logprobs")
TRITON_OPS = (
    "rmu_mse",
    "rmu_loss",
    "pack_activations",
    "unpack_activations",
    "rms_norm",
    "swiglu",
    "published_adamw_step",
)
OPS = GATHER_OPS + TRITON_OPS


def _check_gather_args(
    logits: torch.Tensor,
    row_index: torch.Tensor,
    target: torch.Tensor,
    request_offsets: torch.Tensor,
) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(
            f"gather_logprobs: logits must be a 2-D tensor [R, V], got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)}"
        )
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"gather_logprobs: logits dtype must be float32, bfloat16 or float16, got {logits.dtype}"
        )
    if logits.size(1) > 0 and logits.stride(1) != 1:
        raise ValueError(
            "gather_logprobs: logits must have a contiguous last dimension (stride(1) == 1); "
            "rows may be strided"
        )
    for name, t in (
        ("row_index", row_index),
        ("target", target),
        ("request_offsets", request_offsets),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise ValueError(f"gather_logprobs: {name} must be a 1-D int64 tensor")
        if t.device != logits.device:
            raise ValueError(
                f"gather_logprobs: {name} is on {t.device} but logits is on {logits.device}"
            )
    if row_index.shape != target.shape:
        raise ValueError(
            f"gather_logprobs: row_index {tuple(row_index.shape)} and target "
            f"{tuple(target.shape)} must have the same length M"
        )
    if request_offsets.numel() < 1:
        raise ValueError("gather_logprobs: request_offsets must hold N+1 >= 1 entries")


def _check_gather_values(
    logits: torch.Tensor,
    row_index: torch.Tensor,
    target: torch.Tensor,
    request_offsets: torch.Tensor,
) -> None:
    """Row / target ranges and offsets 0 ... M, non-decreasing (after `_check_gather_args`).
    The CUDA kernels run the same checks on the device (csrc/bindings.cpp's check_gather_values
    raises these messages from them), so CUDA calls skip this and its device sync."""
    R, V = logits.shape
    M = row_index.numel()
    off = request_offsets
    # Every value check in ONE device-to-host read: on a GPU each int()/bool() is a sync that
    # costs more than the kernel on small inputs.
    zero = off.new_zeros(())
    stats = [
        off[0],
        off[-1],
        (off[1:] < off[:-1]).any().long() if off.numel() > 1 else zero,
        row_index.min() if M else zero,
        row_index.max() if M else zero,
        target.min() if M else zero,
        target.max() if M else zero,
    ]
    first, last, decreasing, rlo, rhi, tlo, thi = torch.stack(stats).tolist()
    if first != 0 or last != M:
        raise ValueError(
            f"gather_logprobs: request_offsets must start at 0 and end at M={M}, got "
            f"{first}..{last}"
        )
    if decreasing:
        i = int((off[1:] < off[:-1]).nonzero()[0, 0])
        raise ValueError(
            f"gather_logprobs: request_offsets must be non-decreasing (entry {i + 1} < entry {i})"
        )
    if M and (rlo < 0 or rhi >= R):
        raise ValueError(f"gather_logprobs: row_index out of range [0, {R}): min {rlo}, max {rhi}")
    if M and (tlo < 0 or thi >= V):
        raise ValueError(f"gather_logprobs: target id out of range [0, {V}): min {tlo}, max {thi}")


def backend_of(op: str, device: str | torch.device = "cpu") -> str:
    """Which implementation `op` (one of `OPS`) uses for tensors on `device`: 'c++', 'cuda',
    'triton', 'triton-interpret' or 'reference'. Pure: it never logs (see `_select_backend`)."""
    if op not in OPS:
        raise ConfigError(f"backend_of: unknown op {op!r}; expected one of {OPS}")
    dev = torch.device(device)
    if op in GATHER_OPS:
        C = load_C()
        if C is None:
            return "reference"
        if dev.type == "cuda":
            return "cuda" if C.with_cuda() else "reference"
        return "c++" if dev.type == "cpu" else "reference"
    return _triton_backend(dev)


def _triton_backend(dev: torch.device) -> str:
    """Backend of the Triton ops: CUDA tensors run Triton; CPU tensors run the reference unless
    WMDP_FAST_FORCE_TRITON=1 (then the kernels run under TRITON_INTERPRET=1)."""
    if dev.type == "cuda":
        return "triton" if _triton_available() else "reference"
    if os.environ.get("WMDP_FAST_FORCE_TRITON") == "1":
        return "triton-interpret"
    return "reference"


_triton_import: list[str | None] = []  # [None] or [the ImportError's text], after the first try


def _triton_import_error() -> str | None:
    """Why `import triton` fails (None when it works); tried once per process."""
    if not _triton_import:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            _triton_import.append(f"{type(exc).__name__}: {exc}")
        else:
            _triton_import.append(None)
    return _triton_import[0]


def _triton_available() -> bool:
    return _triton_import_error() is None


# op families that have warned about running CUDA tensors on the reference ("gather", "triton")
_cuda_fallback_warned: set[str] = set()


def _select_backend(op: str, device: str | torch.device) -> str:
    """`backend_of(op, device)`, and ONE warning per op family per process the first time a
    CUDA tensor takes the reference path (the reference is correct there but slow and makes
    float32 copies, which nobody should pay for without being told)."""
    backend = backend_of(op, device)
    if backend == "reference" and torch.device(device).type == "cuda":
        family = "gather" if op in GATHER_OPS else "triton"
        if family not in _cuda_fallback_warned:
            _cuda_fallback_warned.add(family)
            log.warning(_cuda_fallback_message(op, family))
    return backend


def _cuda_fallback_message(op: str, family: str) -> str:
    if family == "gather":
        if load_C() is not None:
            why = "wmdp_fast._C was built without CUDA"
        else:
            why = f"the C++ extension wmdp_fast._C is {load_error()}"
        if os.environ.get("WMDP_FAST_DISABLE_C") == "1":
            fix = "unset WMDP_FAST_DISABLE_C"
        else:
            fix = (
                "rebuild with CUDA (needs nvcc): "
                "WMDP_FAST_CUDA=1 pip install --no-build-isolation -e ."
            )
        return (
            f"wmdp_fast: {op} got CUDA logits but {why}, so gather_logprobs/choice_logprobs run "
            "the plain-PyTorch reference on the GPU: a float32 copy of every scored row and a "
            "float64 log-softmax over [M, V] (slow, and large at a 32k-150k vocabulary). To use "
            f"the CUDA kernel, {fix}; wmdp_fast.build_info() shows what was compiled. (Warned "
            "once per process.)"
        )
    return (
        f"wmdp_fast: {op} got CUDA tensors but triton cannot be imported "
        f"({_triton_import_error()}), so {'/'.join(TRITON_OPS)} "
        "run the plain-PyTorch reference on the GPU (correct, but unfused: more memory "
        "traffic, and float32 copies of the activations). Install triton (pip install triton, the version your "
        "torch build pins) to use the fused kernels. (Warned once per process.)"
    )


def gather_logprobs(
    logits: torch.Tensor,
    row_index: torch.Tensor,
    target: torch.Tensor,
    request_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched log-likelihoods of continuation tokens, without a float32 copy of the logits.

    Args:
        logits: [R, V] float32/bfloat16/float16; rows may be strided, V must be contiguous.
        row_index: int64 [M], the row of `logits` that predicts each continuation token. Rows may
            be shared (the 4 single-token answers of a question share one row).
        target: int64 [M], the token id scored at that row.
        request_offsets: int64 [N+1], CSR offsets grouping the M pairs into N requests.

    Returns:
        loglik: float32 [N], sum over the request's pairs of logits[row, t] - logsumexp(logits[row]).
        is_greedy: bool [N], every pair's target is the argmax of its row. Tie rule: the argmax is
            the FIRST index holding the maximum (torch.argmax's rule, which lm-eval uses), so a
            target tied with an earlier token is not greedy.

    Each distinct row's log-sum-exp and argmax is computed once, in one streaming pass over V.
    Raises ValueError for malformed arguments and RuntimeError for a row containing NaN/+inf or
    only -inf (naming the smallest such row id, on every device). On CUDA the row, target and
    offset values are checked by the kernels themselves and read back with the bad-row flags
    after the launch: one device sync per call, after the work is queued, none before.
    """
    _check_gather_args(logits, row_index, target, request_offsets)
    if logits.device.type == "cuda" and backend_of("gather_logprobs", logits.device) == "cuda":
        return load_C().gather_logprobs(logits, row_index, target, request_offsets)
    _check_gather_values(logits, row_index, target, request_offsets)
    n = request_offsets.numel() - 1
    if n == 0 or row_index.numel() == 0:
        return reference.gather_logprobs(logits, row_index, target, request_offsets)
    if _select_backend("gather_logprobs", logits.device) != "reference":
        return load_C().gather_logprobs(logits, row_index, target, request_offsets)
    rows = logits[torch.unique(row_index)].float()
    bad = ~torch.isfinite(rows.amax(dim=-1)) | torch.isnan(rows).any(dim=-1)
    if bool(bad.any()):
        r = int(torch.unique(row_index)[bad.nonzero()[0, 0]])
        raise RuntimeError(
            f"logits row {r} contains NaN or +inf, or is entirely -inf: "
            "its log-softmax is undefined"
        )
    return reference.gather_logprobs(logits, row_index, target, request_offsets)


def choice_logprobs(logits: torch.Tensor, choice_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of K single-token choices per row.

    Args:
        logits: [N, V] float32/bfloat16/float16 (V contiguous; rows may be strided).
        choice_ids: int64 [N, K] (per row) or [K] (the same for every row), each in [0, V).

    Returns: float32 [N, K], logits[n, c] - logsumexp(logits[n]).
    Raises ConfigError (a ValueError) naming `logits` or `choice_ids` for malformed arguments,
    RuntimeError for a scored row holding NaN/+inf or only -inf (as `gather_logprobs`).
    """
    op = "choice_logprobs"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"{op}: logits must be a 2-D tensor [N, V], got {got}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ConfigError(
            f"{op}: logits dtype must be float32, bfloat16 or float16, got {logits.dtype}"
        )
    N, V = logits.shape
    if V > 0 and logits.stride(1) != 1:
        raise ConfigError(
            f"{op}: logits must have a contiguous last dimension (stride(1) == 1, got "
            f"{logits.stride(1)}); rows may be strided. Pass logits.contiguous() or slice rows "
            "only"
        )
    if not isinstance(choice_ids, torch.Tensor) or choice_ids.dtype != torch.int64:
        got = choice_ids.dtype if isinstance(choice_ids, torch.Tensor) else type(choice_ids)
        raise ConfigError(f"{op}: choice_ids must be an int64 tensor [N, K] or [K], got {got}")
    if choice_ids.dim() == 1:
        ids = choice_ids.to(logits.device)[None, :].expand(N, -1)
    elif choice_ids.dim() == 2 and choice_ids.shape[0] == N:
        ids = choice_ids.to(logits.device)
    else:
        raise ConfigError(
            f"{op}: choice_ids must be [N={N}, K] or [K] (logits is {tuple(logits.shape)}), got "
            f"{tuple(choice_ids.shape)}"
        )

    def range_error() -> ConfigError | None:
        if choice_ids.numel():
            lo, hi = torch.stack([choice_ids.min(), choice_ids.max()]).tolist()  # one read
            if lo < 0 or hi >= V:
                return ConfigError(
                    f"{op}: choice_ids out of range [0, {V}) (logits' last dimension): min "
                    f"{lo}, max {hi}; are they token ids of this model's tokenizer?"
                )
        return None

    K = ids.shape[1]
    # The CUDA kernels check the ids as targets with no sync before the launch; their error is
    # renamed after choice_ids below. Elsewhere (or with no pair to score) check first.
    on_device = logits.device.type == "cuda" and backend_of(op, logits.device) == "cuda"
    if (not on_device or ids.numel() == 0) and (err := range_error()) is not None:
        raise err
    row_index = torch.arange(N, device=logits.device).repeat_interleave(K)
    offsets = torch.arange(N * K + 1, device=logits.device)
    try:
        loglik, _ = gather_logprobs(logits, row_index, ids.reshape(-1).contiguous(), offsets)
    except ValueError:
        if (err := range_error()) is None:
            raise
        raise err from None  # a target id out of range: say so about choice_ids
    return loglik.view(N, K)


# --- RMU activation-MSE loss and the activation-cache format (issue 3) -----------------------

PackedActivations = reference.PackedActivations
PACK_FORMATS = ("bf16", "int8")


def _kernel_module(name: str, backend: str):
    """The Triton kernel module `name` (kernels/<name>.py), compiled for the GPU or, for the
    'triton-interpret' backend, a separate copy whose kernels run under TRITON_INTERPRET=1."""
    from wmdp_fast import kernels

    return kernels.load(name, interpret=backend == "triton-interpret")


def _on_device(backend: str, device: torch.device):
    """Context for a compiled Triton launch: Triton launches on the CURRENT CUDA device, so a
    tensor on cuda:1 while cuda:0 is current would be handed to a kernel on the wrong GPU."""
    if backend == "triton" and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_number(op: str, name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{op}: {name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{op}: {name} must be finite, got {v}")
    return v


def _check_hidden(op: str, name: str, hidden) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ConfigError(
            f"{op}: {name} must be a tensor [..., D] (e.g. [B, T, D]), got "
            f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}"
        )
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ConfigError(
            f"{op}: {name} dtype must be float32, bfloat16 or float16, got {hidden.dtype}"
        )
    if hidden.numel() == 0:
        raise ConfigError(f"{op}: {name} is empty (shape {tuple(hidden.shape)})")


def _check_target(op: str, name: str, target, hname: str, hidden: torch.Tensor) -> None:
    if isinstance(target, PackedActivations):
        if target.fmt not in PACK_FORMATS:
            raise ConfigError(f"{op}: {name} has unknown packed format {target.fmt!r}")
        shape, device, dtype = target.shape, target.device, target.data.dtype
        want = torch.int8 if target.fmt == "int8" else torch.bfloat16
        sdt = None if target.scale is None else target.scale.dtype
        if dtype != want or sdt != (torch.float32 if target.fmt == "int8" else None):
            raise ConfigError(
                f"{op}: {name} is a malformed PackedActivations (fmt {target.fmt!r}, data "
                f"{dtype}, scale {sdt}); build it with pack_activations()"
            )
        if target.scale is not None:
            if tuple(target.scale.shape) != tuple(shape[:-1]):
                raise ConfigError(
                    f"{op}: {name}.scale has shape {tuple(target.scale.shape)}, expected "
                    f"{tuple(shape[:-1])}"
                )
            if target.scale.device != device:
                raise ConfigError(
                    f"{op}: {name}.scale is on {target.scale.device} but {name}.data is on "
                    f"{device}; move the whole PackedActivations with {name}.to(device)"
                )
        for part in ("data", "scale"):
            t = getattr(target, part)
            if t is not None and t.requires_grad:
                raise ConfigError(
                    f"{op}: {name}.{part} requires grad, but the target is a constant (the "
                    "frozen model's activations); build it with pack_activations(), which "
                    "detaches"
                )
    elif isinstance(target, torch.Tensor):
        shape, device = target.shape, target.device
        if target.dtype not in _FLOAT_DTYPES:
            raise ConfigError(
                f"{op}: {name} dtype must be float32, bfloat16 or float16, got {target.dtype}"
            )
        if target.requires_grad:
            raise ConfigError(
                f"{op}: {name} requires grad, but the target is a constant (control vector or "
                f"frozen model's activations); pass {name}.detach()"
            )
    else:
        raise ConfigError(
            f"{op}: {name} must be a tensor or PackedActivations, got {type(target).__name__}"
        )
    if device != hidden.device:
        raise ConfigError(f"{op}: {name} is on {device} but {hname} is on {hidden.device}")
    D = hidden.shape[-1]
    broadcast = len(shape) >= 1 and shape[-1] == D and all(s == 1 for s in shape[:-1])
    if not (broadcast or tuple(shape) == tuple(hidden.shape)):
        raise ConfigError(
            f"{op}: {name} has shape {tuple(shape)}; with {hname} {tuple(hidden.shape)} it must "
            f"be [{D}], [1, 1, {D}] (broadcast over positions) or {tuple(hidden.shape)}"
        )


def _check_mask(op: str, name: str, mask, hname: str, hidden: torch.Tensor) -> int | None:
    """Validates the mask; returns the number of positions that count (None without a mask)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(f"{op}: {name} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(hidden.shape[:-1]):
        raise ConfigError(
            f"{op}: {name} has shape {tuple(mask.shape)}, expected {tuple(hidden.shape[:-1])} "
            f"({hname}'s shape without D, like an attention mask)"
        )
    if mask.device != hidden.device:
        raise ConfigError(f"{op}: {name} is on {mask.device} but {hname} is on {hidden.device}")
    if mask.is_complex():
        raise ConfigError(f"{op}: {name} must be bool or 0/1, got {mask.dtype}")
    if mask.dtype == torch.bool:
        count = int(mask.sum())
    else:
        count, n_bad = torch.stack([(mask != 0).sum(), ((mask != 0) & (mask != 1)).sum()]).tolist()
        if n_bad:
            raise ConfigError(
                f"{op}: {name} must hold only 0 and 1 (or be bool); {n_bad} entries are neither"
            )
    if count == 0:
        raise DataError(
            f"{op}: {name} has no true entry, so no position counts and the mean is undefined; "
            "skip this batch or check that its documents are not empty"
        )
    return count


def _check_finite(op: str, name: str, t) -> None:
    if isinstance(t, PackedActivations):
        bad = t.scale is not None and not bool(torch.isfinite(t.scale).all())
        bad = bad or (t.fmt == "bf16" and not bool(torch.isfinite(t.data).all()))
    else:
        bad = not bool(torch.isfinite(t).all())
    if bad:
        raise TrainingError(
            f"{op}: {name} contains NaN or inf (the training has diverged or the cache is "
            "corrupted); lower the learning rate or rebuild the cache"
        )


def rmu_mse(
    hidden: torch.Tensor,
    target: torch.Tensor | PackedActivations,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """`scale * mean((hidden - target) ** 2)`, forward and backward in one pass.

    Args:
        hidden: [..., D] (typically [B, T, D]) float32/bfloat16/float16, a decoder layer's output.
            Any strides.
        target: [D] or [1, 1, D] (broadcast over all positions, e.g. RMU's control vector), or
            hidden's shape (e.g. the frozen model's outputs); float32/bfloat16/float16, or a
            PackedActivations (dequantised inside the kernel). Must not require grad.
        mask: optional hidden.shape[:-1] (e.g. [B, T]), bool or 0/1, true where a position
            counts (like an attention mask): only those positions count in the sum and in the
            count. Without it every position counts (the published RMU, padding included).
        scale: multiplies the mean (RMU's alpha for the retain term).
        check_finite: raise TrainingError when hidden or target holds NaN/inf (costs a pass).

    Returns: a float32 scalar tensor, differentiable w.r.t. hidden. Accumulation is float32 and
    the reduction is deterministic (fixed order, no atomics). On CUDA the forward also writes
    the gradient (in hidden's dtype; float16 is staged in float32 so that a large grad_output,
    e.g. a loss scale, does not meet a float16-subnormal gradient), so the backward costs
    nothing unless grad_output != 1 (or hidden is float16: one cast). That stored gradient
    serves the first backward; a later backward through the same graph (retain_graph=True) and
    any backward with create_graph=True recompute it from hidden and target with torch ops
    (`reference.rmu_mse_grad`; differentiable, so second-order gradients work). For that the
    op keeps references (no copies) to hidden until the graph is freed, and to target and mask
    while the loss's graph exists. WMDP_FAST_RMU_MSE_FUSED_FINISH=1 (opt-in, read per call)
    fuses the final reduction into the main kernel (docs/fused_ops.md); also for `rmu_loss`.
    """
    op = "rmu_mse"
    _check_hidden(op, "hidden", hidden)
    _check_target(op, "target", target, "hidden", hidden)
    count = _check_mask(op, "mask", mask, "hidden", hidden)
    scale = _check_number(op, "scale", scale)
    if check_finite:
        _check_finite(op, "hidden", hidden)
        _check_finite(op, "target", target)
    backend = _select_backend(op, hidden.device)
    if backend == "reference":
        return reference.rmu_mse(hidden, target, mask, scale)
    with _on_device(backend, hidden.device):
        return _kernel_module("rmu_mse", backend).rmu_mse(hidden, target, mask, scale, count)


def rmu_loss(
    h_forget: torch.Tensor,
    control_vec: torch.Tensor | PackedActivations,
    h_retain: torch.Tensor,
    retain_target: torch.Tensor | PackedActivations,
    alpha: float,
    forget_mask: torch.Tensor | None = None,
    retain_mask: torch.Tensor | None = None,
    *,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both RMU loss terms: `mse(h_forget, control_vec) + alpha * mse(h_retain, retain_target)`.

    Args:
        h_forget: [B, Tf, D] (or [..., D]) the updated model's layer output on the forget batch.
        control_vec: [1, 1, D] or [D] (broadcast), or h_forget's shape; RMU's `c * u`.
        h_retain: [B', Tr, D] the updated model's layer output on the retain batch.
        retain_target: h_retain's shape (the frozen model's output), a tensor or a
            PackedActivations from `pack_activations`.
        alpha: the retain weight.
        forget_mask, retain_mask: optional [B, Tf] / [B', Tr] bool or 0/1 (see `rmu_mse`).
        check_finite: raise TrainingError naming the argument that holds NaN/inf.

    Returns: (total, forget_term, retain_term), float32 scalars; `total` is differentiable
    w.r.t. both hidden tensors, the two terms are detached (for logging). retain_term already
    includes alpha. On CUDA both terms run in one kernel launch (plus a tiny reduction).
    Autograd (retain_graph, create_graph) as in `rmu_mse`.
    """
    op = "rmu_loss"
    _check_hidden(op, "h_forget", h_forget)
    _check_hidden(op, "h_retain", h_retain)
    _check_target(op, "control_vec", control_vec, "h_forget", h_forget)
    _check_target(op, "retain_target", retain_target, "h_retain", h_retain)
    if h_retain.device != h_forget.device:
        raise ConfigError(
            f"{op}: h_retain is on {h_retain.device} but h_forget is on {h_forget.device}"
        )
    count_f = _check_mask(op, "forget_mask", forget_mask, "h_forget", h_forget)
    count_r = _check_mask(op, "retain_mask", retain_mask, "h_retain", h_retain)
    alpha = _check_number(op, "alpha", alpha)
    if check_finite:
        for name, t in (
            ("h_forget", h_forget),
            ("control_vec", control_vec),
            ("h_retain", h_retain),
            ("retain_target", retain_target),
        ):
            _check_finite(op, name, t)
    backend = _select_backend(op, h_forget.device)
    if backend == "reference":
        return reference.rmu_loss(
            h_forget, control_vec, h_retain, retain_target, alpha, forget_mask, retain_mask
        )
    with _on_device(backend, h_forget.device):
        return _kernel_module("rmu_mse", backend).rmu_loss(
            h_forget,
            control_vec,
            h_retain,
            retain_target,
            alpha,
            forget_mask,
            retain_mask,
            count_f,
            count_r,
        )


def pack_activations(hidden: torch.Tensor, fmt: str = "bf16") -> PackedActivations:
    """Pack layer outputs for the activation cache.

    Args:
        hidden: [..., D] float32/bfloat16/float16 (detached; any strides).
        fmt: "bf16" stores bfloat16 as is (a float32/float16 input is rounded to bfloat16);
            "int8" stores per-position symmetric absmax int8 plus a float32 scale per position
            (about half the bytes of bf16).

    Returns: PackedActivations. int8 error bound, per element:
        |x - unpack(pack(x))| <= absmax(x's position) / 254 * (1 + 1e-4)
    (half a quantisation step; the 1e-4 covers float32 rounding), when unpacked to float32.
    Raises DataError if an int8-packed position holds NaN/inf.
    """
    op = "pack_activations"
    _check_hidden(op, "hidden", hidden)
    if fmt not in PACK_FORMATS:
        raise ConfigError(f"{op}: fmt must be one of {PACK_FORMATS}, got {fmt!r}")
    if fmt == "bf16":
        return reference.pack_activations(hidden, fmt)
    backend = _select_backend(op, hidden.device)
    if backend == "reference":
        packed = reference.pack_activations(hidden, fmt)
    else:
        with _on_device(backend, hidden.device):
            packed = _kernel_module("pack", backend).pack_int8(hidden)
    if not bool(torch.isfinite(packed.scale).all()):
        pos = tuple((~torch.isfinite(packed.scale)).nonzero()[0].tolist())
        raise DataError(
            f"{op}: hidden holds NaN or inf at position {pos}; int8 packing needs finite "
            "activations (check the model's dtype, or use fmt='bf16')"
        )
    return packed


def unpack_activations(packed: PackedActivations, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The values of a PackedActivations as a tensor [..., D] of `dtype` (default: the dtype
    the activations had when packed). int8 is dequantised as `q * scale` in float32."""
    if not isinstance(packed, PackedActivations):
        raise ConfigError(
            f"unpack_activations: expected a PackedActivations, got {type(packed).__name__}"
        )
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ConfigError(
            f"unpack_activations: dtype must be float32, bfloat16 or float16, got {dtype}"
        )
    if packed.fmt == "bf16":  # a cast: nothing to fuse
        return reference.unpack_activations(packed, dtype)
    backend = _select_backend("unpack_activations", packed.device)
    if backend == "reference":
        return reference.unpack_activations(packed, dtype)
    with _on_device(backend, packed.device):
        return _kernel_module("pack", backend).unpack_int8(packed, dtype or packed.dtype)


class RMULoss(torch.nn.Module):
    """The RMU loss of the published recipe, one control vector and one alpha per topic:
    `loss = mse(h_forget, control_vecs[k]) + alphas[k] * mse(h_retain, retain_target)`.

    Args:
        control_vecs: K tensors [1, 1, D] or [D] (or one tensor [K, 1, 1, D] / [K, D], or a
            single vector [D] / [1, 1, D] for K = 1); kept as a buffer, so `.to(device)` moves
            them.
        alphas: K retain weights (or one float for every topic).
    """

    def __init__(self, control_vecs, alphas) -> None:
        super().__init__()
        if isinstance(control_vecs, torch.Tensor):
            # [D] is one vector (iterating it would make D one-element "vectors")
            control_vecs = [control_vecs] if control_vecs.dim() == 1 else list(control_vecs)
        vecs = [torch.as_tensor(c).detach().reshape(-1) for c in control_vecs]
        if not vecs or len({v.numel() for v in vecs}) != 1:
            raise ConfigError("RMULoss: control_vecs must be K >= 1 vectors of the same size D")
        K = len(vecs)
        if isinstance(alphas, (int, float)):
            alphas = [alphas] * K
        alphas = [_check_number("RMULoss", "alphas", a) for a in alphas]
        if len(alphas) != K:
            raise ConfigError(f"RMULoss: got {K} control vectors but {len(alphas)} alphas")
        self.register_buffer("control_vecs", torch.stack(vecs)[:, None, None, :])
        self.alphas = alphas

    def forward(
        self,
        h_forget: torch.Tensor,
        h_retain: torch.Tensor,
        retain_target: torch.Tensor | PackedActivations,
        topic: int = 0,
        forget_mask: torch.Tensor | None = None,
        retain_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, forget_term, retain_term) for topic `topic` (see `rmu_loss`)."""
        if not 0 <= topic < len(self.alphas):
            raise ConfigError(f"RMULoss: topic {topic} out of range [0, {len(self.alphas)})")
        cv = self.control_vecs[topic].to(h_forget.device)
        return rmu_loss(
            h_forget, cv, h_retain, retain_target, self.alphas[topic], forget_mask, retain_mask
        )


# --- fused RMSNorm and SwiGLU (transformers' Llama/Mistral/Qwen2 modules) -------------------------

RMS_NORM_MAX_D = 65536  # = kernels.rmsnorm.MAX_D: wider rows run the reference


def _check_float_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() < 1:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ConfigError(f"{op}: {name} must be a tensor [..., D], got {got}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"{op}: {name} dtype must be float32, bfloat16 or float16, got {t.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm as transformers' Llama/Mistral/Qwen2RMSNorm computes it, forward and backward
    fused: `weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)`, the statistics in float32.

    Args:
        x: [..., D] float32/bfloat16/float16; rows may be strided (a non-unit column stride
            costs a copy).
        weight: [D] float32/bfloat16/float16 (its dtype may differ from x's, as in HF).
        eps: the module's `variance_epsilon`, finite and >= 0.

    Returns: [..., D] in `torch.promote_types(weight.dtype, x.dtype)`, differentiable w.r.t. x
    and weight. Rounded where HF rounds; on CUDA one kernel each way (the weight gradient, when
    weight requires grad, is a deterministic two-stage sum: no atomics). Rows wider than
    `kernels.rmsnorm.MAX_D` (65536) run the reference.
    """
    op = "rms_norm"
    _check_float_tensor(op, "x", x)
    _check_float_tensor(op, "weight", weight)
    D = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != D:
        raise ConfigError(
            f"{op}: weight must be [D={D}] (x is {tuple(x.shape)}), got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ConfigError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    eps = _check_number(op, "eps", eps)
    if eps < 0:
        raise ConfigError(f"{op}: eps must be >= 0 (the norm's variance_epsilon), got {eps}")
    backend = _select_backend(op, x.device)
    if backend == "reference" or D > RMS_NORM_MAX_D:
        return reference.rms_norm(x, weight, eps)
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    with _on_device(backend, x.device):
        return _kernel_module("rmsnorm", backend).rms_norm(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, the middle of a SwiGLU MLP (`down_proj(act_fn(gate_proj(x)) *
    up_proj(x))`), forward and backward fused.

    Args:
        gate, up: the same shape [..., I], the same float32/bfloat16/float16 dtype and device
            (non-contiguous inputs are copied).

    Returns: [..., I] in that dtype, differentiable w.r.t. both. silu's output is rounded to the
    dtype before the multiply, as eager does; the backward recomputes silu from gate (saves
    only gate and up).
    """
    op = "swiglu"
    _check_float_tensor(op, "gate", gate)
    _check_float_tensor(op, "up", up)
    if gate.shape != up.shape:
        raise ConfigError(
            f"{op}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape"
        )
    if gate.dtype != up.dtype:
        raise ConfigError(
            f"{op}: gate is {gate.dtype} but up is {up.dtype}; cast one (gate_proj and up_proj "
            "should share a dtype)"
        )
    if gate.device != up.device:
        raise ConfigError(f"{op}: gate is on {gate.device} but up is on {up.device}")
    backend = _select_backend(op, gate.device)
    if backend == "reference":
        return reference.swiglu(gate, up)
    with _on_device(backend, gate.device):
        return _kernel_module("swiglu", backend).swiglu(gate, up)


# --- the published AdamW step, fused (issue 5's optimizer) ------------------------------------

_adamw_strided_warned: list[bool] = []


def _check_adamw_lists(op: str, lists: dict) -> list[tuple[torch.Tensor, ...]]:
    """The tensor lists of `published_adamw_step`, validated; returns per-index 4-tuples."""
    for name, seq in lists.items():
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise ConfigError(
                f"{op}: {name} must be a list of tensors (one per trained tensor), got "
                f"{type(seq).__name__}"
            )
    lengths = {name: len(seq) for name, seq in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"{op}: the four lists must have the same length, got {lengths}")
    groups = list(zip(*lists.values()))
    names = list(lists)
    for i, group in enumerate(groups):
        p = group[0]
        for name, t in zip(names, group):
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
            if t.dtype not in _FLOAT_DTYPES:
                raise ConfigError(
                    f"{op}: {name}[{i}] dtype must be float32, bfloat16 or float16, got {t.dtype}"
                )
            if t is p:
                continue
            if t.shape != p.shape:
                raise ConfigError(
                    f"{op}: {name}[{i}] has shape {tuple(t.shape)} but params[{i}] has "
                    f"{tuple(p.shape)}"
                )
            if t.dtype != p.dtype:
                raise ConfigError(
                    f"{op}: {name}[{i}] is {t.dtype} but params[{i}] is {p.dtype}; the step "
                    "keeps the optimizer state and the gradient in the parameter's dtype (cast "
                    "the gradient, or keep float32 master weights for all four)"
                )
            if t.device != p.device:
                raise ConfigError(
                    f"{op}: {name}[{i}] is on {t.device} but params[{i}] is on {p.device}"
                )
        _, _, m, v = group
        if p.numel() and len({p.data_ptr(), m.data_ptr(), v.data_ptr()}) < 3:
            raise ConfigError(
                f"{op}: params[{i}], exp_avgs[{i}] and exp_avg_sqs[{i}] must be distinct tensors "
                "(all three are updated in place)"
            )
    return groups


def published_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One step of the published script's optimizer (`wmdp_fast.rmu.PublishedAdamW`, the old
    transformers.AdamW: weight decay 0, bias corrections in the step size), in place:

        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g * g
        p -= lr * sqrt(1 - beta2**step) / (1 - beta1**step) * m / (sqrt(v) + eps)

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of the same length; entry i holds four
            tensors of one shape, dtype (float32/bfloat16/float16) and device (tensor i's
            parameter, gradient, first and second moment). params, exp_avgs and exp_avg_sqs are
            updated in place.
        step: the new step count t (an int, 1 at the first step).
        lr, beta1, beta2, eps: the optimizer's hyper-parameters (0 <= beta < 1).

    On CUDA each tensor takes one Triton pass (reads p, g, m, v, writes p, m, v) that rounds
    exactly where the eager sequence rounds, so the result is meant to be bitwise
    PublishedAdamW.step's (tests/test_kernels_adamw.py checks it on a GPU). On CPU tensors, and
    for a tensor whose four tensors are not all contiguous (one warning per process), the eager
    sequence runs (`reference.published_adamw_step`).
    """
    op = "published_adamw_step"
    groups = _check_adamw_lists(
        op,
        {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
    )
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ConfigError(f"{op}: step must be an int >= 1 (the new step count), got {step!r}")
    lr = _check_number(op, "lr", lr)
    eps = _check_number(op, "eps", eps)
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= _check_number(op, name, beta) < 1.0:
            raise ConfigError(f"{op}: {name} must be in [0, 1), got {beta}")
    beta1, beta2 = float(beta1), float(beta2)
    # as PublishedAdamW computes it: Python floats (the kernel gets it as a float32, as
    # addcdiv_'s value becomes a float32 in PyTorch's CUDA kernel)
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    with torch.no_grad():
        for i, (p, g, m, v) in enumerate(groups):
            if p.numel() == 0:
                continue
            backend = _select_backend(op, p.device)
            contiguous = all(t.is_contiguous() for t in (p, g, m, v))
            if backend != "reference" and not contiguous and not _adamw_strided_warned:
                _adamw_strided_warned.append(True)
                log.warning(
                    f"wmdp_fast: {op}: tensor {i} ({tuple(p.shape)}) or its gradient or state is "
                    "not contiguous, so it takes the eager 7-pass step (correct, slower); make "
                    "the parameter contiguous to fuse it. (Warned once per process.)"
                )
            if backend == "reference" or not contiguous:
                reference.published_adamw_step([p], [g], [m], [v], step, lr, beta1, beta2, eps)
                continue
            _kernel_module("adamw", backend).adamw_step(
                p, g, m, v, beta1=beta1, beta2=beta2, eps=eps, step_size=step_size
            )
            # as the eager in-place ops do: a graph that saved p (or m, v) before the step
            # must refuse to backward through the new values
            for t in (p, m, v):
                torch.autograd.graph.increment_version(t)
