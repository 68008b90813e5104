"""Model and tokenizer loading (dtype, 4/8-bit), finding decoder layers, saving.

Hub names and local directories go through the same `from_pretrained` calls, so tests on
local random-weight models exercise the real loading path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from wmdp_fast.errors import ConfigError, ModelError

log = logging.getLogger("wmdp_fast")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """'auto'/None -> bf16 on CUDA, float32 elsewhere; names like 'bf16' -> torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    """None/'auto' -> cuda if available, else cpu. Refuses 'cuda' when no GPU is present."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def quantization_config(load_in_4bit: bool = False, load_in_8bit: bool = False, compute_dtype=None):
    """A transformers BitsAndBytesConfig for NF4 4-bit or LLM.int8 8-bit, or None."""
    if load_in_4bit and load_in_8bit:
        raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "4/8-bit loading needs bitsandbytes: pip install 'wmdp_fast[quant]'"
        ) from exc
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, **kwargs):
    """AutoTokenizer.from_pretrained with a clear error for a missing model."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {name_or_path!r}: {exc}") from exc


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
):
    """Load a Hugging Face causal LM (hub name or local directory) for inference.

    dtype 'auto' means bf16 on CUDA and float32 on the CPU. 4/8-bit loading uses bitsandbytes
    (the model is placed by transformers; `device` then only picks the GPU). Returns the model in
    eval mode.
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device if device is None else str(device))
    torch_dtype = resolve_dtype(dtype, dev)
    qcfg = quantization_config(load_in_4bit, load_in_8bit, compute_dtype=torch_dtype)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    if not Path(name_or_path).exists() and "/" not in name_or_path:
        log.info("%s is not a local directory; trying the Hugging Face hub", name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {name_or_path!r}: {exc}") from exc
    if qcfg is None:
        model.to(dev)
    model.eval()
    return model


def get_decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a Llama/Mistral/Qwen2/Gemma/Mixtral-style model (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(
            f"{type(model).__name__} has no `model.model.layers`: wmdp_fast supports decoder "
            "models laid out like Llama, Mistral, Qwen2, Gemma and Mixtral"
        )
    return layers
