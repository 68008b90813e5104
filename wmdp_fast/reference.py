"""Plain-PyTorch versions of every fused op: the truth for tests and the CPU fallback.

Each function here has the same signature and semantics as its twin in `wmdp_fast.ops`, written
the obvious way (full-size float32 temporaries allowed), so that it is easy to check by eye.
"""

from __future__ import annotations

import torch


def gather_logprobs(
    logits: torch.Tensor,
    row_index: torch.Tensor,
    target: torch.Tensor,
    request_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `ops.gather_logprobs`: log_softmax over the rows, gather, per-request sum.

    logits [R, V] (float32/bf16/fp16), row_index/target int64 [M], request_offsets int64 [N+1].
    Returns loglik float32 [N] and is_greedy bool [N] (target == torch.argmax(row), which is the
    FIRST index of the maximum, as in lm-eval's `logits.argmax(dim=-1)` + `torch.equal`).
    """
    n = request_offsets.numel() - 1
    if n <= 0 or row_index.numel() == 0:
        return (
            torch.zeros(max(n, 0), dtype=torch.float32, device=logits.device),
            torch.ones(max(n, 0), dtype=torch.bool, device=logits.device),
        )
    rows = logits.float()[row_index]  # [M, V]
    logp = torch.log_softmax(rows, dim=-1).gather(1, target[:, None])[:, 0]
    greedy = rows.argmax(dim=-1) == target
    counts = request_offsets[1:] - request_offsets[:-1]
    req = torch.repeat_interleave(torch.arange(n, device=logits.device), counts)
    loglik = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add_(0, req, logp)
    n_bad = torch.zeros(n, dtype=torch.long, device=logits.device).index_add_(
        0, req, (~greedy).long()
    )
    return loglik, n_bad == 0


def choice_logprobs(logits: torch.Tensor, choice_ids: torch.Tensor) -> torch.Tensor:
    """Reference of `ops.choice_logprobs`: log_softmax(logits)[n, choice_ids[n, k]] -> [N, K]."""
    n = logits.shape[0]
    ids = choice_ids.expand(n, -1) if choice_ids.dim() == 1 else choice_ids
    return torch.log_softmax(logits.float(), dim=-1).gather(1, ids)
