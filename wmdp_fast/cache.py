"""Activation cache for RMU: the inputs of decoder layer `first = min(layer_ids)`.

Everything below `first` is frozen, so its output on a given batch is a constant. We capture,
once per distinct batch, exactly what the model passes to layer `first` (the hidden states AND
the keyword arguments: attention mask, rotary position embeddings, position ids) with a forward
pre-hook (`with_kwargs=True`), stop the forward there with a private exception, and later replay
layers `first..layer_id` on it. The model is called with `use_cache=False` so that no KV cache
ends up in the captured arguments.

Storage: on the GPU, in (pinned) CPU memory, and optionally on disk as safetensors + a JSON
metadata file (never pickle). A disk cache lives in `<cache_dir>/<fingerprint[:24]>/` where the
fingerprint hashes everything that determines the activations (model config and weights of the
prefix, tokenizer, texts, lengths, layer, dtype, device type, quantization, format, library
versions); the metadata also stores a SHA-256 of the tensor file, so a corrupted or truncated
file is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wmdp_fast.atomic import atomic_path, atomic_write_text
from wmdp_fast.errors import CacheError

log = logging.getLogger("wmdp_fast")

CACHE_VERSION = 1
CACHE_FORMATS = ("bf16", "int8")
_TENSOR_FILE = "activations.safetensors"
_META_FILE = "meta.json"


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at layer `first`."""


@dataclass
class CachedBatch:
    """One tokenized batch as layer `first` sees it.

    hidden: [B, T, D] (model dtype, or int8 with `scale` [B, T, 1] float32 for the int8 format).
    token_mask: [B, T] int64, the tokenizer's attention mask (1 = real token).
    kwargs: the keyword arguments the model passed to the layer (tensors, tuples of tensors,
        None, bools, numbers, strings).
    act: only in a batch split at layer `first` (`wmdp_fast.rmu.split_first_layer`): the input
        of that layer's `mlp.down_proj` [B, T, I]; `hidden` then holds the residual stream
        that the MLP output is added to. Never stored on disk.
    """

    hidden: torch.Tensor
    token_mask: torch.Tensor
    kwargs: dict
    scale: torch.Tensor | None = None
    act: torch.Tensor | None = None

    def to(
        self, device, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> CachedBatch:
        """A copy on `device` (the int8 format is dequantized to `dtype` there)."""

        def mv(x):
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, tuple):
                return tuple(mv(v) for v in x)
            return x

        hidden = mv(self.hidden)
        if self.scale is not None:
            hidden = (hidden.float() * mv(self.scale)).to(dtype or torch.bfloat16)
        return CachedBatch(
            hidden,
            mv(self.token_mask),
            {k: mv(v) for k, v in self.kwargs.items()},
            act=mv(self.act),
        )

    def nbytes(self) -> int:
        def nb(x):
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, tuple):
                return sum(nb(v) for v in x)
            return 0

        return (
            nb(self.hidden)
            + nb(self.token_mask)
            + nb(self.scale)
            + nb(self.act)
            + sum(nb(v) for v in self.kwargs.values())
        )


@dataclass
class ActivationCache:
    """Distinct batches (`entries`) and, per training step, which entry is its forget batch and
    which its retain batch."""

    entries: list[CachedBatch]
    forget_index: list[int]
    retain_index: list[int]
    fingerprint: str
    info: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.entries)


# --------------------------------------------------------------------------- fingerprints


def _h() -> hashlib._Hash:
    return hashlib.sha256()


def _word_sum(t: torch.Tensor) -> int:
    """Sum of the tensor's bytes read as integer words (the widest of 8/4/2/1 bytes that divides
    its size), modulo 2^64: any change of one element changes it (only changes that cancel
    exactly do not). One pass at memory speed: for 8-byte words ~80x faster than the float64
    sum + 2-norm it replaced (0.015 vs 1.2 s for a 4096 x 14336 bf16 matrix on one CPU core)."""
    b = t.reshape(-1).contiguous().view(torch.uint8)
    # the word size must not depend on where the tensor sits, and view() needs the storage
    # offset (not only the address) divisible by the word: a view into a storage whose base is
    # not 8-aligned (a buffer from torch.frombuffer, a mmapped file) can have an aligned address
    if b.data_ptr() % 8 or b.storage_offset() % 8:
        b = b.clone()  # fresh allocations are aligned
    for w, dt in ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8)):
        if b.numel() % w == 0:
            words = b.view(dt)
            break
    # int64 sums wrap around (two's complement): deterministic for any thread count
    return int(words.sum(dtype=torch.int64)) if words.numel() else 0


def tensor_fingerprint(t: torch.Tensor, full_limit: int = 1 << 22) -> str:
    """A hash of a tensor: all bytes when it has at most `full_limit` elements; otherwise its
    shape, dtype, a 64-bit sum of all its bytes as integer words (every element counts) and a
    strided sample of 65,536 elements (which also catches permutations). Hashing gigabytes of
    weights with sha256 on every run would cost seconds. The float64 sum and 2-norm used before
    sat where run_rmu lost ~8 s outside its timed phases for Zephyr-7B on an H200 host
    (session 6); the word sum is ~80x cheaper per byte (not yet re-measured there)."""
    h = _h()
    t = t.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
    flat = t.reshape(-1)
    if flat.numel() <= full_limit:
        h.update(flat.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    else:
        h.update(f"{_word_sum(flat)}".encode())
        step = max(1, flat.numel() // 65536)
        h.update(flat[::step].to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_prefix_fingerprint(model, first: int) -> str:
    """Hash of the model config and of every parameter/buffer that the inputs of layer `first`
    depend on: everything outside `model.model.layers`, plus layers 0..first-1."""
    from wmdp_fast.models import get_decoder_layers

    h = _h()
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    # the inputs of layer `first` do not depend on the layers above it: the depth (and the types
    # of the layers above) stay out of the key, so a model loaded with only layers 0..layer_id
    # and runs with another --layer_id share the cache
    cfg.pop("num_hidden_layers", None)
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][: first + 1]
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    layers = get_decoder_layers(model)
    skip = {id(p) for i in range(first, len(layers)) for p in layers[i].parameters()}
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        skip |= {id(p) for p in lm_head.parameters()}
    norm = getattr(model.model, "norm", None)
    if norm is not None:
        skip |= {id(p) for p in norm.parameters()}
    # tied embeddings: lm_head.weight is the embedding matrix, which the cache does depend on
    skip -= {id(p) for p in model.get_input_embeddings().parameters()}
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if id(p) in skip or p.device.type == "meta":
            continue
        h.update(name.encode())
        h.update(tensor_fingerprint(p).encode())
    return h.hexdigest()


def layers_fingerprint(model, lo: int, hi: int) -> str:
    """Hash of the parameters and buffers of decoder layers lo..hi-1."""
    from wmdp_fast.models import get_decoder_layers

    h = _h()
    layers = get_decoder_layers(model)
    for i in range(lo, hi):
        for name, p in list(layers[i].named_parameters()) + list(layers[i].named_buffers()):
            if p.device.type == "meta":
                continue
            h.update(f"{i}.{name}".encode())
            h.update(tensor_fingerprint(p).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, special tokens, padding/truncation sides and a probe encoding."""
    h = _h()
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab).encode())
    probe = tokenizer(["Hello world, a probe.", "x"], padding=True)
    h.update(
        json.dumps(
            [
                type(tokenizer).__name__,
                tokenizer.padding_side,
                tokenizer.truncation_side,
                tokenizer.pad_token_id,
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
                probe["input_ids"],
                probe["attention_mask"],
            ]
        ).encode()
    )
    return h.hexdigest()


def data_fingerprint(batches: Sequence[tuple[Sequence[str], int]]) -> str:
    """Hash of the distinct (texts, max_length) batches in order."""
    h = _h()
    for texts, max_length in batches:
        h.update(f"|{max_length}|{len(texts)}|".encode())
        for t in texts:
            b = t.encode("utf-8", "surrogatepass")
            h.update(f"{len(b)}:".encode())
            h.update(b)
    return h.hexdigest()


def combine_fingerprint(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- capture


def _check_kwarg(name: str, value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(v.detach() for v in value)
    raise CacheError(
        f"the model passes keyword argument {name!r} of type {type(value).__name__} to its "
        "decoder layers; the activation cache only stores tensors, tuples of tensors and plain "
        "values (is a KV cache enabled? the capture runs with use_cache=False)"
    )


class PinnedPool:
    """Page-locked CPU memory for many tensors of one lifetime (a cache, its targets), carved
    out of large chunks. PyTorch's pinned allocator rounds every block up to a power of two, so
    a [4, 512, 4096] bf16 batch (16.8 MB) would take a 32 MB block: half the pinned memory, and
    the time to lock it, wasted. Here chunks are powers of two (not rounded again) and tensors
    are 512-byte aligned views into them. Chunks grow geometrically, from `first_chunk` bytes
    (doubling per new chunk, up to `max_chunk`), and are always at least 4x the tensor asked
    for: a chunk that filled up wastes at most a quarter of itself, the last one at most its
    size (at most 1 GiB, and about a third of what the pool holds), and a small cache does not
    lock hundreds of MB. A tensor larger than `max_chunk` / 4 gets a block of its own. A chunk is
    freed when the last tensor viewing it is. `pinned=False` gives ordinary memory (tests of
    the carving on a machine without CUDA)."""

    def __init__(self, first_chunk: int = 16 << 20, max_chunk: int = 1 << 30, pinned: bool = True):
        self.next_chunk, self.max_chunk, self.pinned = int(first_chunk), int(max_chunk), pinned
        self._chunk: torch.Tensor | None = None
        self._off = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        step = -(-n // 512) * 512
        if 4 * step > self.max_chunk:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pinned)
        if self._chunk is None or self._off + step > self._chunk.numel():
            size = max(self.next_chunk, 1 << (4 * step - 1).bit_length())
            self._chunk = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
            self._off = 0
            self.next_chunk = min(2 * size, self.max_chunk)
        view = self._chunk[self._off : self._off + n].view(dtype).view(shape)
        self._off += step
        return view


def store(x, storage: torch.device, pin: bool, pool: PinnedPool | None = None):
    """`x` (a tensor, or a tuple of them, or any other value) moved to `storage`, pinned if
    asked (from `pool` when given)."""
    if isinstance(x, torch.Tensor):
        if pin and storage.type == "cpu" and (pool is not None or x.device.type != "cpu"):
            # one copy, straight into page-locked memory (not to pageable memory, then again)
            y = (
                pool.empty(x.shape, x.dtype)
                if pool is not None
                else torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            )
            return y.copy_(x)
        y = x.to(storage)
        return y.pin_memory() if pin else y
    if isinstance(x, tuple):
        return tuple(store(v, storage, pin, pool) for v in x)
    return x


@torch.no_grad()
def tokenize_batches(tokenizer, batches: Sequence[tuple[Sequence[str], int]]) -> list:
    """Each (texts, max_length) batch tokenized exactly as
    ``tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=...)``
    (the published script's call: padded to the batch's longest, on the tokenizer's
    padding side), but with one tokenizer call per max_length over all the documents, then
    padded per batch: a Rust tokenizer encodes a list on all cores, and a batch of 4 long
    papers keeps at most 4 busy (2 cores here: 0.32 s vs 0.37 s for 120 documents)."""
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):  # transformers 4.x: pad() on a fast tokenizer says "use __call__"
        warned["Asking-to-pad-a-fast-tokenizer"] = True
    by_length: dict[int, list[int]] = {}
    for i, (_, max_length) in enumerate(batches):
        by_length.setdefault(max_length, []).append(i)
    out: list = [None] * len(batches)
    for max_length, ids in by_length.items():
        flat = [t for i in ids for t in batches[i][0]]
        enc = tokenizer(flat, truncation=True, max_length=max_length)
        pos = 0
        for i in ids:
            n = len(batches[i][0])
            part = {k: v[pos : pos + n] for k, v in enc.items()}
            out[i] = tokenizer.pad(part, padding=True, return_tensors="pt")
            pos += n
    return out


@torch.no_grad()  # the prefix is frozen: no graph, no saved activations (see the offload test)
def capture_layer_inputs(
    model,
    tokenizer,
    batches: Sequence[tuple[Sequence[str], int]],
    layer: int,
    device: torch.device,
    storage: torch.device,
    fmt: str = "bf16",
    progress: bool = True,
    prefix_layers_on_cpu: bool = False,
    encodings: Sequence | None = None,
) -> list[CachedBatch]:
    """Run the model on every (texts, max_length) batch and capture the inputs of decoder layer
    `layer` (hidden states + keyword arguments), stopping the forward there.

    With `prefix_layers_on_cpu` (--offload) the capture stops at layer 0, and layers
    0..layer-1 are then streamed through `device` one at a time over all batches.
    Returns one CachedBatch per input batch, stored on `storage` (pinned when CPU and CUDA
    is in use). `encodings`, when given, holds each batch already tokenized (e.g.
    `tokenize_batches(tokenizer, batches)`, the same tensors in fewer tokenizer calls), so
    that a caller who tokenized to size the cache does not tokenize twice.
    """
    from tqdm.auto import tqdm

    from wmdp_fast.models import get_decoder_layers

    if fmt not in CACHE_FORMATS:
        raise CacheError(f"--cache-format must be one of {CACHE_FORMATS}, got {fmt!r}")
    layers = get_decoder_layers(model)
    stop_at = 0 if prefix_layers_on_cpu else layer
    pin = storage.type == "cpu" and device.type == "cuda"
    # the hidden states apart from the rest: a caller may drop them and keep the kwargs
    h_pool, kw_pool = (PinnedPool(), PinnedPool(1 << 20)) if pin else (None, None)
    captured: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured["hidden"] = hidden.detach()
        captured["kwargs"] = {k: _check_kwarg(k, v) for k, v in kwargs.items()}
        raise _StopForward

    def finish(e: CachedBatch) -> CachedBatch:
        hidden, scale = e.hidden, None
        if fmt == "int8":
            from wmdp_fast.ops import pack_activations

            packed = pack_activations(hidden.to(device), "int8")
            hidden, scale = packed.data, packed.scale.reshape(*packed.data.shape[:-1], 1)
        return CachedBatch(
            hidden=store(hidden, storage, pin, h_pool),
            token_mask=store(e.token_mask, storage, pin, kw_pool),
            kwargs={k: store(v, storage, pin, kw_pool) for k, v in e.kwargs.items()},
            scale=store(scale, storage, pin, h_pool) if scale is not None else None,
        )

    if encodings is None:  # per batch: any callable with the tokenizer's signature will do
        encodings = [
            tokenizer(
                list(texts), return_tensors="pt", padding=True, truncation=True, max_length=ml
            )
            for texts, ml in batches
        ]
    if len(encodings) != len(batches):
        raise CacheError(f"{len(encodings)} encodings given for {len(batches)} batches")
    out: list[CachedBatch] = []
    handle = layers[stop_at].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for encoded in tqdm(
            encodings, desc=f"caching inputs of layer {layer}", disable=not progress, unit="batch"
        ):
            enc = {k: v.to(device) for k, v in encoded.items()}
            captured.clear()
            try:
                model(**enc, use_cache=False)
            except _StopForward:
                pass
            if "hidden" not in captured:
                raise CacheError(f"decoder layer {stop_at} was never called by the model forward")
            kw = captured["kwargs"]
            kw.pop("use_cache", None)
            kw["use_cache"] = False
            batch = CachedBatch(
                hidden=captured["hidden"], token_mask=enc["attention_mask"].detach(), kwargs=kw
            )
            if prefix_layers_on_cpu:
                # finished after streaming; until then the hidden states AND the layer kwargs
                # (4D masks, rotary tables: ~0.5 GB over the published 150 batches) wait on
                # `storage`, so that the GPU holds one layer and one batch at a time
                batch.hidden = batch.hidden.to(storage)
                batch.kwargs = {k: store(v, storage, False) for k, v in kw.items()}
                batch.token_mask = batch.token_mask.to(storage)
                out.append(batch)
            else:  # stored at once: the whole cache never sits on `device` unless stored there
                out.append(finish(batch))
    finally:
        handle.remove()

    if prefix_layers_on_cpu:
        for li in tqdm(range(layer), desc="streaming prefix layers", disable=not progress):
            layer_mod = layers[li].to(device)
            for e in out:
                kw = {k: store(v, device, False) for k, v in e.kwargs.items()}
                h = layer_mod(e.hidden.to(device), **kw)
                e.hidden = (h[0] if isinstance(h, tuple) else h).to(storage)
            layers[li].to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out = [finish(e) for e in out]
    return out


# --------------------------------------------------------------------------- disk


def _sha256_file(path: Path) -> str:
    h = _h()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_path(cache_dir: str | Path, fingerprint: str) -> Path:
    return Path(cache_dir) / fingerprint[:24]


def save_cache(cache: ActivationCache, cache_dir: str | Path, components: dict) -> Path:
    """Write the cache to `<cache_dir>/<fingerprint[:24]>/` (safetensors + meta.json, both
    written to temporary files and renamed; meta.json last, so its presence means complete)."""
    from safetensors.torch import save_file

    if any(e.act is not None for e in cache.entries):
        raise ValueError(
            "batches split at layer `first` are not cache entries: save before splitting"
        )
    root = cache_path(cache_dir, cache.fingerprint)
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    entries_meta = []
    for i, e in enumerate(cache.entries):
        tensors[f"e{i}.hidden"] = e.hidden.contiguous().cpu()
        tensors[f"e{i}.token_mask"] = e.token_mask.contiguous().cpu()
        if e.scale is not None:
            tensors[f"e{i}.scale"] = e.scale.contiguous().cpu()
        kw_meta = {}
        for k, v in e.kwargs.items():
            if isinstance(v, torch.Tensor):
                tensors[f"e{i}.kw.{k}"] = v.contiguous().cpu()
                kw_meta[k] = {"kind": "tensor"}
            elif isinstance(v, tuple):
                for j, t in enumerate(v):
                    tensors[f"e{i}.kw.{k}.{j}"] = t.contiguous().cpu()
                kw_meta[k] = {"kind": "tuple", "n": len(v)}
            else:
                kw_meta[k] = {"kind": "value", "value": v}
        entries_meta.append({"kwargs": kw_meta, "int8": e.scale is not None})
    with atomic_path(root / _TENSOR_FILE, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"wmdp_fast_cache": str(CACHE_VERSION)})
        digest = _sha256_file(tmp)
    meta = {
        "version": CACHE_VERSION,
        "fingerprint": cache.fingerprint,
        "components": components,
        "sha256": digest,
        "entries": entries_meta,
        "forget_index": cache.forget_index,
        "retain_index": cache.retain_index,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(root / _META_FILE, json.dumps(meta, indent=1))
    return root


def load_cache(
    cache_dir: str | Path, fingerprint: str, storage: torch.device, pin: bool = False
) -> ActivationCache | None:
    """The cache for `fingerprint` from disk, or None when absent, stale or corrupted (logged;
    the caller rebuilds and overwrites it)."""
    from safetensors.torch import load_file

    root = cache_path(cache_dir, fingerprint)
    meta_file, tensor_file = root / _META_FILE, root / _TENSOR_FILE
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, and bytes that are not UTF-8
        log.warning("activation cache %s: unreadable metadata (%s); rebuilding", meta_file, exc)
        return None
    if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
        log.warning("activation cache %s is stale (other settings); rebuilding", root)
        return None
    if not tensor_file.is_file():
        log.warning("activation cache %s: %s missing; rebuilding", root, _TENSOR_FILE)
        return None
    digest = _sha256_file(tensor_file)
    if digest != meta.get("sha256"):
        log.warning(
            "activation cache %s is corrupted (SHA-256 %s..., expected %s...); rebuilding",
            tensor_file,
            digest[:12],
            str(meta.get("sha256"))[:12],
        )
        return None
    try:
        tensors = load_file(str(tensor_file))
        entries = []
        h_pool, kw_pool = (PinnedPool(), PinnedPool(1 << 20)) if pin else (None, None)
        for i, em in enumerate(meta["entries"]):
            kwargs = {}
            for k, spec in em["kwargs"].items():
                if spec["kind"] == "tensor":
                    kwargs[k] = store(tensors[f"e{i}.kw.{k}"], storage, pin, kw_pool)
                elif spec["kind"] == "tuple":
                    kwargs[k] = tuple(
                        store(tensors[f"e{i}.kw.{k}.{j}"], storage, pin, kw_pool)
                        for j in range(spec["n"])
                    )
                else:
                    kwargs[k] = spec["value"]
            entries.append(
                CachedBatch(
                    hidden=store(tensors[f"e{i}.hidden"], storage, pin, h_pool),
                    token_mask=store(tensors[f"e{i}.token_mask"], storage, pin, kw_pool),
                    kwargs=kwargs,
                    scale=store(tensors[f"e{i}.scale"], storage, pin, h_pool)
                    if em["int8"]
                    else None,
                )
            )
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        log.warning("activation cache %s unreadable (%s); rebuilding", root, exc)
        return None
    return ActivationCache(
        entries=entries,
        forget_index=list(meta["forget_index"]),
        retain_index=list(meta["retain_index"]),
        fingerprint=fingerprint,
        info={"path": str(root), "hit": True},
    )
