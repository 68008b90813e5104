"""The public fused ops (functional API).

Each op picks its backend by device: the C++/CUDA extension `wmdp_fast._C` (gather ops) or
Triton kernels (RMU losses, cache packing) when available, else the plain-PyTorch twin in
`wmdp_fast.reference`. `backend_of(op)` says which one runs for a given device.
"""

from __future__ import annotations

import torch

from wmdp_fast import reference
from wmdp_fast._ext import load_C

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    for name, t in (("row_index", row_index), ("target", target), ("request_offsets", request_offsets)):
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
    R, V = logits.shape
    M = row_index.numel()
    off = request_offsets
    if int(off[0]) != 0 or int(off[-1]) != M:
        raise ValueError(
            f"gather_logprobs: request_offsets must start at 0 and end at M={M}, got "
            f"{int(off[0])}..{int(off[-1])}"
        )
    if off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
        i = int((off[1:] < off[:-1]).nonzero()[0, 0])
        raise ValueError(
            f"gather_logprobs: request_offsets must be non-decreasing (entry {i + 1} < entry {i})"
        )
    if M:
        lo, hi = int(row_index.min()), int(row_index.max())
        if lo < 0 or hi >= R:
            raise ValueError(f"gather_logprobs: row_index out of range [0, {R}): min {lo}, max {hi}")
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"gather_logprobs: target id out of range [0, {V}): min {lo}, max {hi}")


def backend_of(op: str, device: str | torch.device = "cpu") -> str:
    """Which implementation `op` uses for tensors on `device`: 'c++', 'cuda', 'triton',
    'triton-interpret' or 'reference'."""
    dev = torch.device(device)
    if op in ("gather_logprobs", "choice_logprobs"):
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
    import os

    if dev.type == "cuda":
        return "triton" if _triton_available() else "reference"
    if os.environ.get("WMDP_FAST_FORCE_TRITON") == "1":
        return "triton-interpret"
    return "reference"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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
    only -inf.
    """
    _check_gather_args(logits, row_index, target, request_offsets)
    n = request_offsets.numel() - 1
    if n == 0 or row_index.numel() == 0:
        return reference.gather_logprobs(logits, row_index, target, request_offsets)
    C = load_C()
    if C is not None and (logits.device.type == "cpu" or (logits.is_cuda and C.with_cuda())):
        return C.gather_logprobs(logits, row_index, target, request_offsets)
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
        logits: [N, V] float32/bfloat16/float16 (V contiguous).
        choice_ids: int64 [N, K] (per row) or [K] (the same for every row).

    Returns: float32 [N, K], logits[n, c] - logsumexp(logits[n]).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("choice_logprobs: logits must be a 2-D tensor [N, V]")
    if not isinstance(choice_ids, torch.Tensor) or choice_ids.dtype != torch.int64:
        raise ValueError("choice_logprobs: choice_ids must be an int64 tensor [N, K] or [K]")
    N = logits.shape[0]
    if choice_ids.dim() == 1:
        ids = choice_ids.to(logits.device)[None, :].expand(N, -1)
    elif choice_ids.dim() == 2 and choice_ids.shape[0] == N:
        ids = choice_ids.to(logits.device)
    else:
        raise ValueError(
            f"choice_logprobs: choice_ids must be [N={N}, K] or [K], got {tuple(choice_ids.shape)}"
        )
    K = ids.shape[1]
    row_index = torch.arange(N, device=logits.device).repeat_interleave(K)
    offsets = torch.arange(N * K + 1, device=logits.device)
    loglik, _ = gather_logprobs(logits, row_index, ids.reshape(-1).contiguous(), offsets)
    return loglik.view(N, K)
