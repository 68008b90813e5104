"""Plain-PyTorch versions of every fused op: the truth for tests and the CPU fallback.

Each function here has the same signature and semantics as its twin in `wmdp_fast.ops`, written
the obvious way (full-size float32 temporaries allowed), so that it is easy to check by eye.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    The log-softmax is taken in float64: torch's float32 CPU log_softmax drifts by ~2e-5 at
    V = 152k, more than the 1e-5 the fast op is held to.
    """
    n = request_offsets.numel() - 1
    if n <= 0 or row_index.numel() == 0:
        return (
            torch.zeros(max(n, 0), dtype=torch.float32, device=logits.device),
            torch.ones(max(n, 0), dtype=torch.bool, device=logits.device),
        )
    rows = logits.float()[row_index]  # [M, V]
    logp = torch.log_softmax(rows.double(), dim=-1).gather(1, target[:, None])[:, 0].float()
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


# --- RMU activation-MSE loss and the activation-cache format (issue 3) -----------------------

INT8_QMAX = 127.0


@dataclass(frozen=True)
class PackedActivations:
    """A stored block of layer outputs (the activation-cache format).

    fmt "bf16": `data` is the bfloat16 tensor [..., D] itself and `scale` is None.
    fmt "int8": `data` is int8 [..., D] and `scale` is float32 [...] (one per position); the value
    is `data * scale` with `scale = absmax(position) / 127` (symmetric, per position).
    `dtype` is the dtype the activations had when packed; `unpack_activations` returns it.
    """

    data: torch.Tensor
    scale: torch.Tensor | None
    fmt: str
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n

    def dim(self) -> int:
        return self.data.dim()

    def to(self, device: str | torch.device, non_blocking: bool = False) -> PackedActivations:
        """A copy on `device` (the same object if it is already there)."""
        if torch.device(device) == self.data.device:
            return self
        scale = None if self.scale is None else self.scale.to(device, non_blocking=non_blocking)
        return PackedActivations(
            self.data.to(device, non_blocking=non_blocking), scale, self.fmt, self.dtype
        )

    def pin_memory(self) -> PackedActivations:
        scale = None if self.scale is None else self.scale.pin_memory()
        return PackedActivations(self.data.pin_memory(), scale, self.fmt, self.dtype)

    def __getitem__(self, index) -> PackedActivations:
        """Select along the leading (position) dimensions, never along D: `packed[2:4]`."""
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > self.data.dim() - 1 or any(i is Ellipsis for i in index):
            raise IndexError(
                "PackedActivations can only be indexed along its leading dimensions, not along D"
            )
        scale = None if self.scale is None else self.scale[index]
        return PackedActivations(self.data[index], scale, self.fmt, self.dtype)


def int8_quantize(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position symmetric absmax int8: (q int8 [..., D], scale float32 [...]).

    scale = absmax / 127 (float32), q = floor(x / scale + 0.5) clamped to [-127, 127] (0 where
    the position is all zeros). The Triton kernel computes exactly the same bits.
    """
    x = hidden.detach().float()
    amax = x.abs().amax(dim=-1)
    # divided by a tensor, not the number: CUDA computes `tensor / number` as tensor * (1 / number)
    # (PyTorch's div_true_kernel_cuda), which is 1 ulp off the exact quotient for ~5% of values
    scale = amax / torch.full_like(amax, INT8_QMAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor(x / safe[..., None] + 0.5).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def pack_activations(hidden: torch.Tensor, fmt: str = "bf16") -> PackedActivations:
    """Reference of `ops.pack_activations`: [..., D] float tensor -> PackedActivations."""
    if fmt == "bf16":
        data = hidden.detach().to(torch.bfloat16).contiguous()
        return PackedActivations(data, None, "bf16", hidden.dtype)
    q, scale = int8_quantize(hidden)
    return PackedActivations(q, scale, "int8", hidden.dtype)


def unpack_activations(packed: PackedActivations, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference of `ops.unpack_activations`: the stored values as a tensor of `dtype`
    (default: the dtype the activations had when packed). int8 dequantises in float32
    (`q * scale`) and then casts."""
    dtype = packed.dtype if dtype is None else dtype
    if packed.fmt == "bf16":
        return packed.data.to(dtype)
    return (packed.data.float() * packed.scale[..., None]).to(dtype)


def _acc_dtype(hidden: torch.Tensor) -> torch.dtype:
    """float32 for the ops' dtypes; float64 stays float64 (only the reference accepts it: it
    lets torch.autograd.gradcheck / gradgradcheck check these functions)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _float_target(target: torch.Tensor | PackedActivations, dtype=torch.float32) -> torch.Tensor:
    if isinstance(target, PackedActivations):
        return unpack_activations(target, torch.float32).to(dtype)
    t = target.to(dtype)
    if t.is_inference() and not torch.is_inference_mode_enabled():
        # a target made under inference_mode (e.g. a cache): F.mse_loss saves its target for
        # backward, which torch refuses for an inference tensor; a normal copy is allowed
        t = t.clone()
    return t


def rmu_mse(
    hidden: torch.Tensor,
    target: torch.Tensor | PackedActivations,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Reference of `ops.rmu_mse`: scale * mean((hidden - target)^2) in float32.

    hidden [..., D]; target [D], [1, ..., 1, D] (broadcast) or hidden's shape, or a
    PackedActivations; mask hidden.shape[:-1] (bool or 0/1): only true positions count, in the
    sum and in the count. Masked-out positions never touch the result or the gradient (even if
    they hold NaN). Returns a float32 scalar (float64 for float64 hidden, which only the
    reference accepts), differentiable w.r.t. hidden, also twice.
    """
    acc = _acc_dtype(hidden)
    if mask is None:  # the published form (with float32 casts)
        t = _float_target(target, acc)
        if t.shape != hidden.shape:  # [D] or [1, ..., 1, D], possibly of higher rank than hidden
            t = t.reshape(hidden.shape[-1]).expand_as(hidden)
        return F.mse_loss(hidden.to(acc), t) * scale
    diff = hidden.to(acc) - _float_target(target, acc)
    keep = (mask != 0)[..., None]
    diff = torch.where(keep, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    count = keep.sum() * hidden.shape[-1]
    return (diff * diff).sum() / count * scale


def rmu_loss(
    h_forget: torch.Tensor,
    control_vec: torch.Tensor | PackedActivations,
    h_retain: torch.Tensor,
    retain_target: torch.Tensor | PackedActivations,
    alpha: float,
    forget_mask: torch.Tensor | None = None,
    retain_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of `ops.rmu_loss`: (forget + alpha * retain, forget, alpha * retain), the last
    two detached."""
    forget = rmu_mse(h_forget, control_vec, forget_mask)
    retain = rmu_mse(h_retain, retain_target, retain_mask, scale=alpha)
    return forget + retain, forget.detach(), retain.detach()


def rmu_mse_grad(
    hidden: torch.Tensor,
    target: torch.Tensor | PackedActivations,
    mask: torch.Tensor | None,
    scale: float,
    grad_output: torch.Tensor,
) -> torch.Tensor:
    """d(rmu_mse)/d(hidden) times grad_output, written with differentiable torch ops:
    `grad_output * 2 * scale / count * (hidden - target)` at the positions that count, 0
    elsewhere (count = number of counted positions times D). Computed in float32 (float64 for
    float64 hidden) and returned in hidden's dtype, rounded once.

    The fused ops' backward uses it when the gradient stored by the forward cannot serve: a
    second backward through a retained graph, or create_graph=True (the result is then
    differentiable w.r.t. hidden and grad_output, so second-order gradients flow).
    """
    acc = _acc_dtype(hidden)
    t = _float_target(target, acc)
    if t.shape != hidden.shape:  # [D] or [1, ..., 1, D]
        t = t.reshape(hidden.shape[-1])
    diff = hidden.to(acc) - t
    if mask is None:
        count = hidden.numel()
    else:
        keep = (mask != 0)[..., None]
        diff = torch.where(keep, diff, torch.zeros((), dtype=acc, device=diff.device))
        count = keep.sum() * hidden.shape[-1]
    coeff = grad_output.to(acc) * (2.0 * scale) / count
    return (diff * coeff).to(hidden.dtype)


# --- fused RMSNorm and SwiGLU (transformers' Llama/Mistral/Qwen2 modules) -------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference of `ops.rms_norm`: exactly the forward of transformers' LlamaRMSNorm /
    MistralRMSNorm / Qwen2RMSNorm (x [..., D], weight [D]; output dtype
    promote_types(weight, x))."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Reference of `ops.swiglu`: the middle of transformers' LlamaMLP / MistralMLP / Qwen2MLP,
    `act_fn(gate_proj(x)) * up_proj(x)` with act_fn SiLU (silu's output is rounded to the dtype
    before the multiply, as in eager)."""
    return F.silu(gate) * up


# --- the published AdamW step (issue 5's optimizer) -------------------------------------------


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
    """Reference of `ops.published_adamw_step`: literally the eager op sequence of
    `wmdp_fast.rmu.PublishedAdamW.step` (the old transformers.AdamW) on each tensor, in place;
    `step` is the new step count t (1 at the first step). Bitwise what that optimizer does, on
    every device."""
    import math  # (kept local: the module's other twins need no math)

    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    with torch.no_grad():
        for p, g, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
            exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
