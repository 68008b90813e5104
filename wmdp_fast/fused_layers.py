"""Fused RMSNorm and SwiGLU inside given decoder layers (per instance, reversible).

`fuse_decoder_layers(layers)` finds, inside the given modules, the RMSNorms and SwiGLU MLPs
whose math it knows (transformers' Llama / Mistral / Qwen2 form, and any class whose forward is
the same code) and replaces THOSE INSTANCES' forward so that they call `ops.rms_norm` and
`ops.swiglu`: on CUDA the fused Triton kernels, on CPU the reference twins (the original math,
so a patched layer on the CPU computes what it computed before). The classes are never
touched, so other models in the process are unaffected. `unfuse_decoder_layers` puts the
original forwards back.

What counts as recognised (anything else is left alone, e.g. Gemma's `(1 + weight)` norm, GELU
MLPs, mixture-of-experts blocks):
- a norm: a class named `*RMSNorm` with a 1-D `weight` and a float `variance_epsilon` whose
  forward's code is, line for line, `LlamaRMSNorm.forward`'s (`_NORM_BODY`);
- an MLP: a class named `*MLP` with `nn.Linear` `gate_proj`, `up_proj`, `down_proj`, whose
  forward's code is `LlamaMLP.forward`'s (`_MLP_BODY`), and whose `act_fn` is SiLU (an
  `nn.SiLU`, transformers' `SiLUActivation` or `F.silu`, and bitwise `F.silu` on a probe).
Comparing the code, not only the class name, means a future transformers release that changes
the math of these classes makes them unrecognised rather than silently computed the old way.

A module whose forward was already replaced on the instance is skipped, except accelerate's
device hook (`_hf_hook` + `_old_forward`): there the hooked inner forward is replaced.
"""

from __future__ import annotations

import inspect
import logging
import textwrap
import types
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from wmdp_fast import ops

log = logging.getLogger("wmdp_fast")

_STATE = "_wmdp_fast_unfuse"  # instance attribute: (patched attribute name, previous value)
_MISSING = object()
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_NORM_BODY = (
    "input_dtype = hidden_states.dtype",
    "hidden_states = hidden_states.to(torch.float32)",
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
)
_MLP_BODY = (
    "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
    "return down_proj",
)
_SILU_TYPES = ("SiLU", "SiLUActivation")


def _forward_body(cls: type) -> tuple[str, ...] | None:
    """The statements of `cls.forward` (stripped lines after the signature, without comments
    and blank lines), or None when the source cannot be read."""
    try:
        src = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return None
    lines = [ln.split("#", 1)[0].strip() for ln in src.splitlines()]
    lines = [ln for ln in lines if ln]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("def ")), None)
    if start is None:
        return None
    # the signature may span lines (decorators come before it); it ends at the first ":" line end
    end = next((i for i in range(start, len(lines)) if lines[i].endswith(":")), None)
    return None if end is None else tuple(lines[end + 1 :])


_body_cache: dict[type, tuple[str, ...] | None] = {}


def _body(cls: type) -> tuple[str, ...] | None:
    if cls not in _body_cache:
        _body_cache[cls] = _forward_body(cls)
    return _body_cache[cls]


def _is_rms_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        type(m).__name__.endswith("RMSNorm")
        and isinstance(w, torch.Tensor)
        and w.dim() == 1
        and isinstance(getattr(m, "variance_epsilon", None), (float, int))
        and _body(type(m)) == _NORM_BODY
    )


def _is_silu(act) -> bool:
    if act is F.silu:
        return True
    if not isinstance(act, nn.Module) or type(act).__name__ not in _SILU_TYPES:
        return False
    if "forward" in vars(act):
        return False
    probe = torch.linspace(-8.0, 8.0, 65)
    with torch.no_grad():
        return torch.equal(act(probe.clone()), F.silu(probe))


def _is_swiglu_mlp(m: nn.Module) -> bool:
    return (
        type(m).__name__.endswith("MLP")
        and all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj"))
        and isinstance(getattr(m, "down_proj", None), nn.Linear)
        and _is_silu(getattr(m, "act_fn", None))
        and _body(type(m)) == _MLP_BODY
    )


def _original(module: nn.Module):
    """The forward the patch replaced (bound), for inputs the fused ops do not take."""
    _, prev = vars(module)[_STATE]
    return types.MethodType(type(module).forward, module) if prev is _MISSING else prev


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype not in _KERNEL_DTYPES or self.weight.dtype not in _KERNEL_DTYPES:
        return _original(self)(hidden_states)
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype not in _KERNEL_DTYPES or gate.dtype != up.dtype or gate.shape != up.shape:
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(ops.swiglu(gate, up))


def _patch(module: nn.Module, fn) -> bool:
    """Replaces the instance's forward (or accelerate's hooked inner forward) by `fn`."""
    own = vars(module)
    if _STATE in own:
        return False  # already fused
    attr = "forward"
    if "forward" in own:
        if not (hasattr(module, "_hf_hook") and "_old_forward" in own):
            log.debug("fuse_decoder_layers: %s has an instance forward; left alone", module)
            return False
        attr = "_old_forward"
    prev = own.get(attr, _MISSING)
    setattr(module, _STATE, (attr, prev))
    setattr(module, attr, types.MethodType(fn, module))
    return True


def _named(layers) -> Iterable[tuple[str, nn.Module]]:
    if isinstance(layers, nn.Module):
        yield from layers.named_modules()
        return
    for i, layer in enumerate(layers):
        for name, m in layer.named_modules():
            yield (f"{i}.{name}" if name else str(i)), m


def fuse_decoder_layers(layers: nn.Module | Iterable[nn.Module]) -> list[str]:
    """Patch the recognised RMSNorms and SwiGLU MLPs inside `layers` (see the module
    docstring) so that their forward runs `ops.rms_norm` / `ops.swiglu`.

    Args:
        layers: decoder layers: an `nn.Module` (e.g. `model.model.layers`, or a whole model)
            or a list of them.

    Returns: the qualified names of the modules patched by this call (relative to `layers`;
    for a list, prefixed by the position in it), e.g. `["5.input_layernorm", "5.mlp", ...]`.
    Modules already fused are skipped. Parameters, buffers and state_dict are unchanged.
    Inputs the fused ops do not take (float64, mismatched dtypes) run the original code.
    """
    patched = []
    for name, m in _named(layers):
        if _is_rms_norm(m):
            fn = _fused_norm_forward
        elif _is_swiglu_mlp(m):
            fn = _fused_mlp_forward
        else:
            continue
        if _patch(m, fn):
            patched.append(name)
    log.info("fused RMSNorm/SwiGLU in %d modules", len(patched))
    return patched


def unfuse_decoder_layers(layers: nn.Module | Iterable[nn.Module]) -> list[str]:
    """Undo `fuse_decoder_layers` on `layers`; returns the names restored (same naming)."""
    restored = []
    for name, m in _named(layers):
        state = vars(m).get(_STATE)
        if state is None:
            continue
        attr, prev = state
        if prev is _MISSING:
            vars(m).pop(attr, None)
        else:
            setattr(m, attr, prev)
        del m.__dict__[_STATE]
        restored.append(name)
    return restored


def fused_modules(layers: nn.Module | Iterable[nn.Module]) -> list[str]:
    """The names of the modules inside `layers` that are currently fused."""
    return [name for name, m in _named(layers) if _STATE in vars(m)]
