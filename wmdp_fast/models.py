"""Model and tokenizer loading (dtype, 4/8-bit), finding decoder layers, saving.

Hub names and local directories go through the same `from_pretrained` calls, so tests on
local random-weight models exercise the real loading path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from wmdp_fast.atomic import set_new_file_mode
from wmdp_fast.errors import ConfigError, ModelError, ResourceError

log = logging.getLogger("wmdp_fast")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(
    dtype: str | torch.dtype | None,
    device: str | torch.device,
    checkpoint_dir: str | Path | None = None,
) -> torch.dtype:
    """Names like 'bf16' -> torch dtypes. 'auto'/None -> float32 off CUDA (bf16 matmuls are slow
    on CPUs); on CUDA the dtype `checkpoint_dir`'s config.json declares (transformers'
    `torch_dtype="auto"`, what the published RMU script loads with), else bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.device(device).type != "cuda":
            return torch.float32
        declared = checkpoint_dtype(checkpoint_dir) if checkpoint_dir is not None else None
        return declared or torch.bfloat16
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def checkpoint_dtype(checkpoint_dir: str | Path) -> torch.dtype | None:
    """The floating dtype a checkpoint declares in its config.json (`dtype`, or the older
    `torch_dtype`): what transformers' `torch_dtype="auto"` loads. None when it names none."""
    import json

    cfg = Path(checkpoint_dir) / "config.json"
    if not cfg.is_file():
        return None
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cfg} is not readable JSON ({exc})") from exc
    name = d.get("dtype") or d.get("torch_dtype")
    if isinstance(name, str):
        name = name.replace("torch.", "")
    return DTYPES.get(name) if isinstance(name, str) else None


def resolve_device(device: str | None) -> torch.device:
    """None/'auto' -> cuda if available, else cpu. Refuses 'cuda' when no GPU is present."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device}: CUDA is not available on this machine; use --device cpu"
        )
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


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub name: it exists, starts with / . or ~, or has more than one '/'
    (hub names are 'name' or 'org/name')."""
    return (
        os.path.exists(os.path.expanduser(name_or_path))
        or name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
    )


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def check_model_path(
    name_or_path: str, flag: str = "--model", need: tuple[str, ...] = ("config.json",)
) -> str:
    """Refuse a local-looking path that does not exist, is a file, or is a folder holding none of
    the files in `need`, with a plain ModelError (transformers would report a hub 'Repo id must
    use alphanumeric chars' or a sentencepiece message instead). Returns the path with '~'
    expanded; hub names ('name', 'org/name') come back unchanged."""
    if not _looks_local(name_or_path):
        return name_or_path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(
            f"{flag} {name_or_path}: no such folder; pass an existing model folder (one written "
            "by save_pretrained, holding config.json) or a hub name such as org/name"
        )
    if not path.is_dir():
        raise ModelError(
            f"{flag} {name_or_path}: is a file, not a model folder; pass the folder holding "
            "config.json and the weights"
        )
    if not any((path / f).is_file() for f in need):
        raise ModelError(
            f"{flag} {name_or_path}: the folder holds no {' or '.join(need)}, so it is not a "
            "model folder; pass the folder written by save_pretrained (config.json, weights, "
            "tokenizer files)"
        )
    return str(path)


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """With enabled=False, transformers' own bars ('Loading weights', ...) are off inside the
    block; the previous setting is restored after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was != hf_logging.is_progress_bar_enabled():
            if was:
                hf_logging.enable_progress_bar()
            else:
                hf_logging.disable_progress_bar()


def _truncation_overrides(name_or_path: str, n: int, trust_remote_code: bool) -> dict:
    """Config overrides that make from_pretrained build only decoder layers 0..n-1."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {name_or_path!r}: {exc}") from exc
    total = getattr(config, "num_hidden_layers", None)
    if not isinstance(total, int) or n >= total:
        return {}
    if n < 1:
        raise ConfigError(f"cannot load {n} decoder layers")
    out: dict = {"num_hidden_layers": n}
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == total:
        out["layer_types"] = list(layer_types[:n])
    return out


def _check_truncated_load(name_or_path: str, info: dict, n: int) -> None:
    """After a load cut to n decoder layers: missing or mismatched tensors are an error (they
    would be random); unexpected ones other than those of the dropped layers are logged."""
    import re

    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        what = (f"missing {missing[:8]}" if missing else "") + (
            f" mismatched {mismatched[:8]}" if mismatched else ""
        )
        raise ModelError(
            f"the checkpoint {name_or_path!r} lacks tensors the model needs ({what.strip()}); "
            "they would be randomly initialised: check the checkpoint files"
        )
    dropped = re.compile(r"(^|\.)layers\.(\d+)\.")
    other = [
        k
        for k in sorted(info.get("unexpected_keys") or [])
        if not ((m := dropped.search(k)) and int(m.group(2)) >= n)
    ]
    if other:
        log.warning(
            "%s: %d checkpoint tensors are not used by the model: %s",
            name_or_path,
            len(other),
            ", ".join(other[:8]),
        )


@contextlib.contextmanager
def _quiet_load_report(enabled: bool) -> Iterator[None]:
    """Silence transformers' warnings for the block (the 'UNEXPECTED keys' load report that a
    deliberately truncated load produces), restoring the previous verbosity."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(was)


def _is_oom(exc: BaseException) -> bool:
    """CUDA (torch.cuda.OutOfMemoryError, = torch.OutOfMemoryError since torch 2.5) or CPU
    (MemoryError, the allocator's RuntimeError) out of memory."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg
    )


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, progress: bool = True, **kwargs
):
    """AutoTokenizer.from_pretrained with a clear error for a missing model or folder.
    progress=False hides transformers' progress bars while loading."""
    from transformers import AutoTokenizer

    name_or_path = check_model_path(name_or_path, need=("config.json", *_TOKENIZER_FILES))
    try:
        with _transformers_progress(progress):
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
    progress: bool = True,
    num_layers: int | None = None,
):
    """Load a Hugging Face causal LM (hub name or local directory) for inference.

    dtype 'auto' means bf16 on CUDA and float32 on the CPU. 4/8-bit loading uses bitsandbytes
    (the model is placed by transformers; `device` then only picks the GPU). progress=False
    hides transformers' 'Loading weights' bar. Returns the model in eval mode.

    num_layers=n builds and loads only decoder layers 0..n-1 (the config's num_hidden_layers,
    and layer_types when it has them, cut to n; the other layers' tensors are never read):
    what RMU needs of a model whose layers above --layer_id are never run. The checkpoint on
    disk is not changed; the model's config says n layers.

    Raises ModelError (missing folder, no config.json, unreadable checkpoint) and
    ResourceError (out of memory while loading or moving it to the device).
    """
    from transformers import AutoModelForCausalLM

    name_or_path = check_model_path(name_or_path)
    dev = resolve_device(device if device is None else str(device))
    torch_dtype = resolve_dtype(dtype, dev)
    qcfg = quantization_config(load_in_4bit, load_in_8bit, compute_dtype=torch_dtype)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    truncated = False
    if num_layers is not None:
        overrides = _truncation_overrides(name_or_path, num_layers, trust_remote_code)
        kwargs.update(overrides)
        truncated = bool(overrides)
    if not Path(name_or_path).exists():
        log.info("%s is not a local directory; trying the Hugging Face hub", name_or_path)
    try:
        with _transformers_progress(progress), _quiet_load_report(truncated):
            if truncated:
                # the 'UNEXPECTED keys' of the dropped layers are expected, so transformers'
                # load report is silenced: check what it would have said about the rest here
                model, info = AutoModelForCausalLM.from_pretrained(
                    name_or_path, output_loading_info=True, **kwargs
                )
                _check_truncated_load(name_or_path, info, kwargs["num_hidden_layers"])
            else:
                model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        if qcfg is None:
            model.to(dev)
    except Exception as exc:
        if _is_oom(exc):
            quant = "4-bit" if load_in_4bit else "8-bit" if load_in_8bit else str(torch_dtype)[6:]
            raise ResourceError(
                f"out of memory loading model {name_or_path!r} ({quant}) on {dev}: try "
                "--load-in-4bit or --load-in-8bit, a smaller model, or a device with more memory"
            ) from exc
        if isinstance(exc, (OSError, ValueError)):
            raise ModelError(f"cannot load model {name_or_path!r}: {exc}") from exc
        raise
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


# --- RMU support: layer/parameter selection, quantized prefix, saving (issue 5) --------------

_FOREIGN_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".onnx")


def validate_layers(model, layer_id: int, layer_ids) -> int:
    """Check `layer_id` and `layer_ids` against the model; return the number of decoder layers."""
    n = len(get_decoder_layers(model))
    if not 0 <= layer_id < n:
        raise ConfigError(f"--layer_id {layer_id} is out of range: the model has layers 0..{n - 1}")
    if not layer_ids:
        raise ConfigError("--layer_ids is empty: name at least one layer to update")
    bad = [i for i in layer_ids if not 0 <= i < n]
    if bad:
        raise ConfigError(f"--layer_ids {bad} out of range: the model has layers 0..{n - 1}")
    above = [i for i in layer_ids if i > layer_id]
    if above:
        raise ConfigError(
            f"--layer_ids {above} lie above --layer_id {layer_id}: a layer above the one whose "
            "output is trained never receives a gradient; use layers <= --layer_id"
        )
    return n


def select_params(model, layer_ids, param_ids) -> list[tuple[str, torch.nn.Parameter]]:
    """The trained tensors: for each layer in `layer_ids`, `list(layer.parameters())[i]` for the
    indices in `param_ids` (published RMU), in the published order (layer, then parameter index).

    `param_ids` entries are ints or names relative to the layer (e.g. 'mlp.down_proj.weight').
    Returns (full parameter name, parameter) pairs. For Mistral/Llama index 6 is
    `mlp.down_proj.weight`; for Qwen2 the q/k/v biases shift it to 9.
    """
    layers = get_decoder_layers(model)
    full_names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for lid in layer_ids:
        named = list(layers[lid].named_parameters())
        names = [n for n, _ in named]
        wanted = set()
        for pid in param_ids:
            if isinstance(pid, int) or (isinstance(pid, str) and pid.strip().isdigit()):
                i = int(pid)
                if not 0 <= i < len(named):
                    raise ConfigError(
                        f"--param_ids {i} is out of range for layer {lid}, which has "
                        f"{len(named)} parameters: "
                        + ", ".join(f"{j}={n}" for j, n in enumerate(names))
                    )
                wanted.add(i)
            else:
                if pid not in names:
                    raise ConfigError(
                        f"--param_ids {pid!r} is not a parameter of layer {lid}; its parameters "
                        "are " + ", ".join(f"{j}={n}" for j, n in enumerate(names))
                    )
                wanted.add(names.index(pid))
        for i in sorted(wanted):
            p = named[i][1]
            out.append((full_names.get(id(p), f"model.layers.{lid}.{named[i][0]}"), p))
    return out


def quantize_linear_layers_(module: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """Replace every nn.Linear inside `module` by a bitsandbytes 4-bit NF4 ('4bit') or LLM.int8
    ('8bit') layer holding the same weights (quantized when moved to the GPU). Returns the count.

    Used for the frozen prefix only: the trained layers keep the checkpoint's precision.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ConfigError(
            "4/8-bit loading needs bitsandbytes: pip install 'wmdp_fast[quant]'"
        ) from exc
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            has_bias = child.bias is not None
            if mode == "4bit":
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=has_bias,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.to(compute_dtype), requires_grad=False, quant_type="nf4"
                )
            elif mode == "8bit":
                q = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=has_bias, has_fp16_weights=False
                )
                q.weight = bnb.nn.Int8Params(
                    child.weight.data.to(torch.float16), requires_grad=False, has_fp16_weights=False
                )
            else:
                raise ConfigError(f"quantization mode must be '4bit' or '8bit', got {mode!r}")
            if has_bias:
                q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(module, name, q)
            count += 1
        else:
            count += quantize_linear_layers_(child, mode, compute_dtype)
    return count


def resolve_checkpoint_dir(name_or_path: str) -> Path:
    """The local directory holding the checkpoint files (a local path, or the hub snapshot)."""
    p = Path(check_model_path(name_or_path, flag="--model_name_or_path"))
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        # only safetensors are read and rewritten: skip the .bin/.pth copies many repos ship
        ignore = [f"*{suffix}" for suffix in _FOREIGN_WEIGHT_SUFFIXES] + ["*.bin.index.json"]
        return Path(snapshot_download(name_or_path, ignore_patterns=ignore))
    except Exception as exc:
        raise ModelError(
            f"cannot find the checkpoint files of {name_or_path!r} ({exc}); pass a local "
            "directory as --model_name_or_path"
        ) from exc


def _to_checkpoint_keys(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model parameter names -> the checkpoint's keys and layouts (transformers' reverse weight
    conversion); unchanged where transformers has none (older versions)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return tensors
    with torch.no_grad():
        out = revert_weight_conversion(model, {k: v.detach() for k, v in tensors.items()})
    return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


def _weight_map(src: Path) -> dict[str, str]:
    """Checkpoint key -> file, for the files transformers loads: model.safetensors when there is
    one (from_pretrained prefers it to an index beside it), else the index's shards."""
    single = src / "model.safetensors"
    if single.is_file():
        header, _ = _read_safetensors_header(single)
        return {k: "model.safetensors" for k in header if k != "__metadata__"}
    index = src / "model.safetensors.index.json"
    if index.is_file():
        import json

        return json.loads(index.read_text())["weight_map"]
    raise ModelError(
        f"{src} holds no model.safetensors(.index.json): only safetensors checkpoints can be "
        "saved with replaced tensors; convert it with save_pretrained(safe_serialization=True)"
    )


def _copy_untouched(src: Path, dst: Path, stop=None) -> None:
    """A copy of `src` (same bytes, mode and times), never a hard link: whatever rewrites a
    file of the output in place (safetensors < 0.8's save_file, transformers' index writer,
    torch.save, cp) would otherwise rewrite the original checkpoint, or the hub cache's blob,
    too. Where the file system has reflinks the copy shares the blocks, copy-on-write."""
    import shutil

    _copy_file(src, dst, stop)
    if stop is None or not stop.is_set():
        shutil.copystat(src, dst)


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, data_start): the JSON header of a safetensors file and where its data begins."""
    import json
    import struct

    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path}: not a safetensors file (shorter than its header size)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ModelError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise ModelError(f"{path}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + n


# safetensors' dtype names (the format's specification)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _copy_file(src: Path, dst: Path, stop=None) -> None:
    """Copy src to dst inside the kernel: copy_file_range (which shares the blocks instead of
    copying them on file systems with reflinks, e.g. XFS, Btrfs), else shutil's copy. `stop`
    (a threading.Event) ends the copy between 1 GiB chunks, leaving dst incomplete."""
    import shutil

    with open(src, "rb") as fi, open(dst, "wb") as fo:
        left = os.fstat(fi.fileno()).st_size
        try:
            while left > 0:
                if stop is not None and stop.is_set():
                    return
                n = os.copy_file_range(fi.fileno(), fo.fileno(), min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
        except (AttributeError, OSError):
            left = -1
    if left != 0:  # not supported here (another OS, file system or kernel): copy again
        shutil.copyfile(src, dst)


def _patch_shard(src: Path, dst: Path, updated: dict[str, torch.Tensor]) -> None:
    """Write `dst` = the safetensors file `src` with the tensors in `updated` replaced, same
    header and layout: the file is copied (`_copy_file`: in the kernel, blocks shared where the
    file system has reflinks) and only the replaced tensors' bytes are rewritten, cast
    to the dtype they are stored in. Nothing else of the shard passes through Python or memory
    (a 14.5 GB single-shard 7B checkpoint is not read into RAM to change 350 MB)."""
    import sys

    header, start = _read_safetensors_header(src)
    patches = []
    for k, new in updated.items():
        info = header.get(k)
        if not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise ModelError(f"{k}: not a tensor of a dtype torch reads in {src}")
        stored = _SAFETENSORS_DTYPES[info["dtype"]]
        new = new.detach().to("cpu")
        if list(new.shape) != list(info["shape"]):
            raise ModelError(
                f"{k}: updated shape {tuple(new.shape)} != stored {tuple(info['shape'])}"
            )
        flat = new.to(stored).contiguous().reshape(-1)
        if sys.byteorder == "big" and flat.element_size() > 1:  # the format is little-endian
            flat = flat.view(torch.uint8).reshape(-1, flat.element_size()).flip(1)
        data = flat.reshape(-1).view(torch.uint8).numpy().tobytes()
        begin, end = info["data_offsets"]
        if end - begin != len(data):  # cannot happen for a well-formed file
            raise ModelError(f"{k}: {end - begin} bytes stored in {src}, {len(data)} to write")
        patches.append((start + begin, data))
    _copy_file(src, dst)
    with open(dst, "r+b") as fh:
        for offset, data in sorted(patches, key=lambda x: x[0]):
            fh.seek(offset)
            fh.write(data)


def _save_plan(
    src: Path, updated: dict[str, torch.Tensor], model=None
) -> tuple[dict[str, str], dict[str, torch.Tensor], set[str], set[str]]:
    """(weight map, `updated` under checkpoint keys, the shards holding them, the files
    transformers loads) for saving `src` with `updated` replaced."""
    wmap = _weight_map(src)
    missing = [k for k in updated if k not in wmap]
    if missing and model is not None:
        updated = {k: v for k, v in updated.items() if k in wmap} | _to_checkpoint_keys(
            model, {k: updated[k] for k in missing}
        )
        missing = [k for k in updated if k not in wmap]
    if missing:
        raise ModelError(
            f"the updated tensors {missing} are not in the checkpoint {src} (its keys look like "
            f"{next(iter(wmap))!r}); the model's parameter names differ from the stored ones"
        )
    loaded = set(wmap.values())
    if "model.safetensors" not in loaded:
        loaded.add("model.safetensors.index.json")
    return wmap, updated, {wmap[k] for k in updated}, loaded


def untouched_weight_files(
    src_dir: str | Path, updated: dict[str, torch.Tensor], model=None
) -> list[str]:
    """The weight files of `src_dir` that `save_updated_checkpoint` copies unchanged when the
    tensors named in `updated` are replaced (their values do not matter here: a run can copy
    these with `copy_untouched_files` while it trains, and pass them as `copied`)."""
    src = Path(src_dir)
    _, _, shards, loaded = _save_plan(src, updated, model)
    return sorted(n for n in loaded - shards if (src / n).is_file())


def copy_untouched_files(
    src_dir: str | Path, out_dir: str | Path, names: list[str], stop=None
) -> None:
    """Copy the files `names` of `src_dir` into `out_dir` (`_copy_untouched`: kernel copies,
    never hard links). `stop` (a threading.Event): when set, return between files and between
    1 GiB chunks, leaving `out_dir` incomplete (the caller removes it)."""
    src, out = Path(src_dir), Path(out_dir)
    for name in names:
        if stop is not None and stop.is_set():
            return
        _copy_untouched(src / name, out / name, stop)


def save_updated_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    updated: dict[str, torch.Tensor],
    model=None,
    copied: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Write the checkpoint in `src_dir` to `out_dir` with only the tensors in `updated`
    (checkpoint key -> tensor) replaced, cast to the stored dtype. Untouched shards, config and
    tokenizer files are copied (reflinks where the file system has them; never hard links);
    weights transformers does not load (other formats, consolidated.safetensors, a layout
    beside the one loaded) are skipped: they would hold the old values. `out_dir` must be new
    or empty, or hold exactly the files `copied`, which `copy_untouched_files` has already
    copied there (`untouched_weight_files`); it is created if needed (the caller renames it
    into place). Returns the rewritten shards.

    `model` (the model the tensors came from, loaded by from_pretrained): parameter names that
    the checkpoint does not hold are mapped back to its keys with transformers' own reverse
    weight conversion (transformers 5 loads e.g. Mixtral's per-expert w1/w2/w3 tensors into
    fused `mlp.experts.gate_up_proj` / `down_proj` parameters).
    """
    import shutil

    src, out = Path(src_dir), Path(out_dir)
    wmap, updated, shards, loaded = _save_plan(src, updated, model)
    present = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if present != set(copied) or not set(copied) <= loaded - shards:
        # its files may be the source's own (out_dir == src_dir), or hard links to them (an
        # earlier wmdp_fast hard-linked untouched shards): writing over them rewrites the original
        raise ModelError(
            f"{out} is not empty: save_updated_checkpoint writes a new folder; pass a new or "
            "empty one (and rename it into place)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in copied:
            continue
        if f.name in shards:
            _patch_shard(f, out / f.name, {k: v for k, v in updated.items() if wmap[k] == f.name})
            set_new_file_mode(out / f.name)
        elif f.name in loaded:
            _copy_untouched(f, out / f.name)
        elif f.name.endswith((".safetensors", ".index.json", *_FOREIGN_WEIGHT_SUFFIXES)):
            log.info(
                "not copying %s (weights transformers does not load hold the old values)", f.name
            )
        else:
            shutil.copy2(f, out / f.name)
    return sorted(shards)
