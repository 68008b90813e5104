"""RMU unlearning (Li et al. 2024, the WMDP paper), the published recipe computed fast.

What is computed is the published loop (see shared spec Part 1): for step `idx`, topic
`k = idx % K`, batch `b = idx // K`,
    loss = mse(h_{layer_id}(F_k[b]), c_k * u_k / |u_k|) + alpha_k * mse(h_{layer_id}(R_k[b]), h0)
with forget batches tokenized to 512 tokens for topic 0 and 768 otherwise, retain batches to
512, padding included in the means, the old transformers AdamW (eps 1e-6, no weight decay; not
torch's AdamW, see PublishedAdamW) on the selected tensors.

How (Part 2): the inputs of layer `first = min(layer_ids)` are cached once (`wmdp_fast.cache`),
the frozen model's retain outputs are computed once from the ORIGINAL layers `first..layer_id`
on those inputs, and each step replays only layers `first..layer_id`, forward and backward.
There is no second model copy and nothing above `layer_id` is ever computed.

`RMUConfig` holds every setting (defaults: the published Zephyr-7B run); `run_rmu(config)` does
the whole job (load, data, cache, train, save, report) and returns an `RMUResult`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from wmdp_fast.atomic import atomic_path, atomic_write_text, make_temp_dir, set_new_file_mode
from wmdp_fast.errors import (
    ConfigError,
    ModelError,
    ResourceError,
    TrainingError,
    WmdpFastError,
)

log = logging.getLogger("wmdp_fast")

FORGET_MAX_LENGTH_TOPIC0 = 512
FORGET_MAX_LENGTH_OTHER = 768
RETAIN_MAX_LENGTH = 512
# how cache.tensor_fingerprint summarises tensors above its full_limit, recorded in checkpoints:
# one written before the word sum (no key) cannot match a large model's inputs fingerprint
WEIGHTS_FINGERPRINT = "word-sum"


@dataclass
class RMUConfig:
    """Every RMU setting. Defaults are the published Zephyr-7B-beta recipe (WMDP paper)."""

    model_name_or_path: str = "HuggingFaceH4/zephyr-7b-beta"
    layer_id: int = 7
    layer_ids: list[int] = field(default_factory=lambda: [5, 6, 7])
    param_ids: list[int | str] = field(default_factory=lambda: [6])
    steering_coeffs: list[float] = field(default_factory=lambda: [6.5, 6.5])
    alpha: list[float] = field(default_factory=lambda: [1200.0, 1200.0])
    lr: float = 5e-5
    min_len: int = 0
    max_len: int = 2000  # accepted like the published script, which never uses it
    batch_size: int = 4
    max_num_batches: int = 150
    forget_corpora: list[str] = field(
        default_factory=lambda: ["bio-forget-corpus", "cyber-forget-corpus"]
    )
    retain_corpora: list[str] = field(default_factory=lambda: ["wikitext", "wikitext"])
    seed: int = 42
    output_dir: str | None = None
    verbose: bool = False
    # added (wmdp_fast)
    corpus_dir: str | None = None
    corpus_mode: str = "exact"  # exact: raw lines for non-bio corpora; clean: parse JSON text
    control_vectors: str | None = None
    control_vector_rng: str = "device"  # device: published; cpu: the same vectors everywhere
    mask_padding: bool = False
    optimizer_dtype: str = "model"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    offload: bool = False
    cache_dir: str | None = None
    cache_format: str = "bf16"
    cache_device: str = "auto"
    first_layer_cache: str = "auto"  # see FIRST_LAYER_CACHE / --first-layer-cache
    # fused RMSNorm/SwiGLU in the replayed layers (auto: on CUDA); off until measured on a GPU
    fused_layers: str = "off"
    dtype: str = "auto"
    device: str | None = None
    eval_tasks: list[str] = field(default_factory=list)
    eval_data_dir: str | None = None
    eval_limit: float | None = None
    eval_protocol: str = "lm-eval-current"
    checkpoint_every: int = 0
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False

    def validate(self) -> None:
        """Check what can be checked without the model (ConfigError naming the flag)."""
        K = len(self.forget_corpora)
        if K == 0:
            raise ConfigError("--forget_corpora is empty")
        for name, vals in (
            ("--steering_coeffs", self.steering_coeffs),
            ("--alpha", self.alpha),
            ("--retain_corpora", self.retain_corpora),
        ):
            if len(vals) != K:
                raise ConfigError(
                    f"{name} has {len(vals)} entries but --forget_corpora has {K}: give one per "
                    "forget topic, comma-separated"
                )
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.max_num_batches < 1:
            raise ConfigError(f"--max_num_batches must be >= 1, got {self.max_num_batches}")
        if self.optimizer_dtype not in ("model", "float32"):
            raise ConfigError("--optimizer-dtype must be 'model' or 'float32'")
        if self.cache_format not in ("bf16", "int8"):
            raise ConfigError("--cache-format must be 'bf16' or 'int8'")
        if self.cache_device not in ("auto", "cpu", "cuda"):
            raise ConfigError("--cache-device must be auto, cpu or cuda")
        if self.first_layer_cache not in FIRST_LAYER_CACHE:
            raise ConfigError("--first-layer-cache must be auto, on or off")
        if self.fused_layers not in ("auto", "on", "off"):
            raise ConfigError("--fused-layers must be auto, on or off")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other")
        if (self.load_in_4bit or self.load_in_8bit) and self.offload:
            raise ConfigError("--offload streams the exact prefix; do not combine it with 4/8-bit")
        if self.checkpoint_every < 0:
            raise ConfigError("--checkpoint-every must be >= 0")
        if self.control_vector_rng not in ("device", "cpu"):
            raise ConfigError("--control-vector-rng must be 'device' or 'cpu'")
        if self.corpus_mode not in ("exact", "clean"):
            raise ConfigError("--corpus-mode must be 'exact' or 'clean'")
        if self.eval_protocol not in ("lm-eval-current", "lm-eval-0.4.2"):
            raise ConfigError("--eval-protocol must be 'lm-eval-current' or 'lm-eval-0.4.2'")
        for name, vals in (("--layer_ids", self.layer_ids), ("--param_ids", self.param_ids)):
            if not vals:
                raise ConfigError(f"{name} is empty: name at least one (comma-separated)")
        if min(self.layer_ids) < 0 or self.layer_id < 0:
            raise ConfigError("layer indices must be >= 0")
        if self.control_vectors and not Path(self.control_vectors).is_file():
            # before --resume compares fingerprints: a vanished file is not "other settings"
            raise ConfigError(f"--control-vectors {self.control_vectors}: no such file")

    def training_fingerprint(self) -> str:
        """Hash of the settings that determine the trained weights (for --resume)."""
        skip = {
            "output_dir",
            "verbose",
            "eval_tasks",
            "eval_data_dir",
            "eval_limit",
            "eval_protocol",
            "checkpoint_every",
            "resume",
            "overwrite",
            "cache_dir",
            "first_layer_cache",  # the same computation either way (bitwise on the CPU)
        }
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if d["control_vector_rng"] == "device":
            del d["control_vector_rng"]  # the default: checkpoints of earlier versions resume
        if self.control_vectors and Path(self.control_vectors).is_file():
            # the file's contents, not only its name, determine the training
            data = Path(self.control_vectors).read_bytes()
            d["control_vectors_sha256"] = hashlib.sha256(data).hexdigest()
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class RMUResult:
    output_dir: Path | None
    report: dict
    params: dict[str, torch.Tensor]  # trained tensors (CPU copies), full parameter names
    cache: object | None = None  # the ActivationCache, with run_rmu(keep_cache=True)


# --------------------------------------------------------------------------- pieces


def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA) and numpy seeds, as the published script."""
    import numpy as np

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)


def draw_control_vectors(
    coeffs: list[float],
    hidden_size: int,
    seed: int,
    device,
    dtype: torch.dtype,
    rng: str = "device",
) -> list[torch.Tensor]:
    """The published control vectors: after seeding, for each forget corpus in order,
    `u = torch.rand(1, 1, D)` (uniform [0, 1), model dtype and device), `u / ||u|| * c_k`.
    The CPU and CUDA generators give different numbers for one seed, so the published vectors
    depend on the device; `rng="cpu"` draws them as on the CPU and moves them to `device`
    (the same vectors, hence comparable runs, on every device)."""
    seed_everything(seed)
    where = torch.device("cpu") if rng == "cpu" else device
    out = []
    for c in coeffs:
        u = torch.rand(1, 1, hidden_size, dtype=dtype, device=where)
        out.append((u / torch.norm(u) * c).to(device))
    return out


def load_control_vectors(path: str, K: int, hidden_size: int, device, dtype) -> list[torch.Tensor]:
    """Control vectors from a safetensors file holding `control_vectors` [K, hidden_size]."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(path)["control_vectors"]
    except (OSError, KeyError, SafetensorError) as exc:
        raise ConfigError(
            f"--control-vectors {path}: cannot read a tensor 'control_vectors' ({exc})"
        ) from exc
    if t.dim() == 3:
        t = t.reshape(t.shape[0], -1)
    if tuple(t.shape) != (K, hidden_size):
        raise ConfigError(
            f"--control-vectors {path}: shape {tuple(t.shape)}, expected [{K}, {hidden_size}] "
            "(one row per forget corpus)"
        )
    return [t[k].reshape(1, 1, -1).to(device=device, dtype=dtype) for k in range(K)]


def plan_batches(
    forget: list[list[list[str]]], retain: list[list[list[str]]], num_batches: int
) -> tuple[list[tuple[tuple[str, ...], int]], list[int], list[int]]:
    """Distinct (texts, max_length) batches and, per step, the index of its forget and retain
    batch (identical retain batches of two topics are cached once)."""
    K = len(forget)
    entries: list[tuple[tuple[str, ...], int]] = []
    seen: dict[tuple[tuple[str, ...], int], int] = {}

    def add(texts, max_length) -> int:
        key = (tuple(texts), max_length)
        if key not in seen:
            seen[key] = len(entries)
            entries.append(key)
        return seen[key]

    f_idx, r_idx = [], []
    for idx in range(num_batches):
        k, b = idx % K, idx // K
        fl = FORGET_MAX_LENGTH_TOPIC0 if k == 0 else FORGET_MAX_LENGTH_OTHER
        f_idx.append(add(forget[k][b], fl))
        r_idx.append(add(retain[k][b], RETAIN_MAX_LENGTH))
    return entries, f_idx, r_idx


def replay(layers, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run decoder `layers` in order on `hidden` with the captured keyword arguments."""
    for layer in layers:
        out = layer(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


# ------------------------------------------------ layer `first`: its constant part, cached

FIRST_LAYER_CACHE = ("auto", "on", "off")


def first_layer_split_reason(layer, trained_params) -> str | None:
    """None if decoder layer `first` can be split: the only tensors trained in it belong to its
    `mlp.down_proj` (the published recipe: param 6 of layers 5, 6, 7). Everything before that
    projection (attention, norms, gate/up, activation) then sees constant inputs and frozen
    weights, so its results are constants per batch. Otherwise, why not."""
    mlp = getattr(layer, "mlp", None)
    down = getattr(mlp, "down_proj", None)
    norm = getattr(layer, "post_attention_layernorm", None)
    if not isinstance(down, torch.nn.Module) or not isinstance(norm, torch.nn.Module):
        return f"{type(layer).__name__} has no mlp.down_proj and post_attention_layernorm"
    own = {id(p) for p in layer.parameters()}
    in_down = {id(p) for p in down.parameters()}
    mine = [p for p in trained_params if id(p) in own]
    if not mine:
        return "no tensor of that layer is trained"
    if any(id(p) not in in_down for p in mine):
        return "tensors other than mlp.down_proj are trained in that layer"
    # the cached part runs in eval mode, the steps in train mode: with dropout they differ
    for name, m in layer.named_modules():
        rates = [getattr(m, "p", 0.0)] if isinstance(m, torch.nn.Dropout) else []
        rates += [
            v
            for k, v in vars(m).items()
            if ("dropout" in k or "pdrop" in k) and isinstance(v, float)
        ]
        if any(r > 0 for r in rates):
            return f"{type(layer).__name__}.{name or 'forward'} applies dropout in training"
    return None


@torch.no_grad()
def split_first_layer(layer, hidden: torch.Tensor, kwargs: dict):
    """Run decoder `layer` on a cached batch and return (output, residual, act): `act` is the
    input of `layer.mlp.down_proj` and `residual` the input of `post_attention_layernorm`,
    both None unless the output is bitwise `residual + down_proj(act)` (the Llama / Mistral /
    Qwen2 / Gemma layer; Gemma 2's extra norms or Granite's residual multiplier fail the check,
    and such a layer is replayed whole)."""
    got: dict[str, torch.Tensor] = {}

    def first_arg(args, kwargs):
        return args[0] if args else next(iter(kwargs.values()), None)

    def pre(module, args, kwargs):
        got.setdefault("residual", first_arg(args, kwargs))

    def post(module, args, kwargs, out):
        got.setdefault("act", first_arg(args, kwargs))
        got.setdefault("down", out)

    handles = [
        layer.post_attention_layernorm.register_forward_pre_hook(pre, with_kwargs=True),
        layer.mlp.down_proj.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        out = layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    out = out[0] if isinstance(out, tuple) else out
    parts = [got.get(k) for k in ("residual", "act", "down")]
    if all(isinstance(t, torch.Tensor) for t in parts) and torch.equal(out, parts[0] + parts[2]):
        return out, got["residual"], got["act"]
    return out, None, None


def replay_batch(layers, b) -> torch.Tensor:
    """Layers first..layer_id on a cached batch `b`; a split batch (`b.act` set) starts at the
    `mlp.down_proj` of layer `first` (`split_first_layer`), with the same result bitwise."""
    if b.act is None:
        return replay(layers, b.hidden, b.kwargs)
    hidden = b.hidden + layers[0].mlp.down_proj(b.act)
    return replay(layers[1:], hidden, b.kwargs)


def prepare_replay(
    layers, cache, need_ids, device, dtype, storage, pin: bool, split: bool, progress=False
):
    """Replay the ORIGINAL layers first..layer_id once per cached batch, before any update.

    Returns (targets, split_entries, reason): `targets[e]` is the output for every entry id in
    `need_ids` (the retain targets); with `split`, `split_entries[e]` is entry e split at layer
    `first`'s down_proj (residual + act, on `storage`) for EVERY entry, or None with the reason
    when the layer's output is not residual + down_proj(act)."""
    from tqdm.auto import tqdm

    from wmdp_fast import cache as cache_mod

    for layer in layers:
        layer.eval()
    need = set(need_ids)
    ids = range(len(cache.entries)) if split else sorted(need)
    targets: dict[int, torch.Tensor] = {}
    parts: dict[int, object] | None = {} if split else None
    reason = None
    # pinned memory carved from large chunks (targets and split batches live and die apart)
    t_pool = cache_mod.PinnedPool() if pin else None
    p_pool = cache_mod.PinnedPool() if pin and split else None
    desc = "retain targets" + (" + layer-first cache" if split else "")
    with torch.no_grad():
        for e in tqdm(ids, desc=desc, disable=not progress, unit="batch"):
            if parts is None and e not in need:
                continue  # the split was given up: targets only
            b = cache.entries[e].to(device, dtype)
            if parts is None:
                out = replay(layers, b.hidden, b.kwargs)
            else:
                out, residual, act = split_first_layer(layers[0], b.hidden, b.kwargs)
                if residual is None:
                    parts, reason = (
                        None,
                        (
                            f"the output of {type(layers[0]).__name__} is not residual + "
                            "mlp.down_proj(act)"
                        ),
                    )
                else:
                    parts[e] = cache_mod.CachedBatch(
                        cache_mod.store(residual, storage, pin, p_pool),
                        cache.entries[e].token_mask,
                        cache.entries[e].kwargs,
                        act=cache_mod.store(act, storage, pin, p_pool),
                    )
                if e in need:
                    out = replay(layers[1:], out, b.kwargs)
            if e in need:
                targets[e] = cache_mod.store(out.detach(), storage, pin, t_pool)
    return targets, parts, reason


class _Abort(TrainingError):
    """A second Ctrl-C: stop now, without a checkpoint. A TrainingError, so that even where
    it escapes the handler that rewords it, the CLI reports it in one line."""


class _Loader:
    """Moves cached batches (and retain targets) to the compute device; with a pinned CPU
    cache and CUDA, the next step's copy runs on a side stream while this step computes."""

    def __init__(self, cache, targets, device, dtype):
        self.cache, self.targets, self.device, self.dtype = cache, targets, device, dtype
        first = cache.entries[0].hidden if cache.entries else None
        self.stream = (
            torch.cuda.Stream(device)
            if device.type == "cuda" and first is not None and first.device.type == "cpu"
            else None
        )
        self.pending: dict[int, tuple] = {}

    def _issue(self, step: int):
        f = self.cache.entries[self.cache.forget_index[step]]
        r_id = self.cache.retain_index[step]
        r = self.cache.entries[r_id]
        t = self.targets[r_id]
        if self.stream is None:
            return (
                f.to(self.device, self.dtype),
                r.to(self.device, self.dtype),
                t.to(self.device),
                None,
            )
        with torch.cuda.stream(self.stream):
            out = (
                f.to(self.device, self.dtype, non_blocking=True),
                r.to(self.device, self.dtype, non_blocking=True),
                t.to(self.device, non_blocking=True),
            )
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return (*out, ev)

    def get(self, step: int, n_steps: int):
        item = self.pending.pop(step, None) or self._issue(step)
        fb, rb, tgt, ev = item
        if ev is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            for b in (fb, rb):
                for x in [b.hidden, b.token_mask, b.act, *b.kwargs.values()]:
                    for y in x if isinstance(x, tuple) else (x,):
                        if isinstance(y, torch.Tensor):
                            y.record_stream(cur)
            tgt.record_stream(cur)
            if step + 1 < n_steps:
                self.pending[step + 1] = self._issue(step + 1)
        return fb, rb, tgt


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _layer_and_embed_bytes(model, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes of one decoder layer and of the input embeddings in `dtype` (works on a meta
    skeleton: from the shapes alone)."""
    from wmdp_fast.models import get_decoder_layers

    esize = torch.tensor([], dtype=dtype).element_size()
    layer_b = sum(p.numel() for p in get_decoder_layers(model)[0].parameters()) * esize
    return layer_b, model.model.embed_tokens.weight.numel() * esize


def estimate_gpu_memory(
    model,
    cfg: RMUConfig,
    first: int,
    dtype: torch.dtype,
    max_tokens: int,
    cache_bytes: int,
    cache_on_gpu: bool,
    load_in_4bit: bool | None = None,
    offload: bool | None = None,
    batch_size: int | None = None,
    split_width: int = 0,
) -> int:
    """Rough upper estimate (bytes) of the GPU memory a run needs, from the model's sizes: the
    larger of the caching phase (embeddings, prefix and trained layers on the GPU) and the
    training phase (the prefix goes back to the CPU unless quantized). `split_width`: the
    width of the down_proj inputs streamed per batch with the layer-first cache (0: none);
    `cache_bytes` includes the split batches when they are stored on the GPU."""
    from wmdp_fast.models import get_decoder_layers

    q4 = cfg.load_in_4bit if load_in_4bit is None else load_in_4bit
    off = cfg.offload if offload is None else offload
    bs = cfg.batch_size if batch_size is None else batch_size
    layers = get_decoder_layers(model)
    esize = torch.tensor([], dtype=dtype).element_size()
    layer_b, embed_b = _layer_and_embed_bytes(model, dtype)
    if off:
        prefix_b = layer_b
    elif q4:
        prefix_b = first * layer_b * 0.3
    elif cfg.load_in_8bit:
        prefix_b = first * layer_b * 0.55
    else:
        prefix_b = first * layer_b
    n_train = cfg.layer_id - first + 1
    trained_b = n_train * layer_b
    n_sel = len(cfg.layer_ids) * max(1, len(cfg.param_ids))
    sel_b = n_sel * max(p.numel() for p in layers[0].parameters()) * esize
    opt_b = sel_b * 2 if cfg.optimizer_dtype == "model" else sel_b // esize * 4 * 3
    D = model.config.hidden_size
    inter = getattr(model.config, "intermediate_size", 4 * D) or 4 * D
    # saved for backward per replayed layer (only the selected tensors need weight grads):
    # attention and norm tensors ~8 x D, MLP gate/up/act ~3 x I per token; forget and retain
    # graphs live together; plus one layer's transient forward
    act_b = 2 * n_train * bs * max_tokens * (8 * D + 3 * inter) * esize
    transient_b = bs * max_tokens * (6 * D + 3 * inter) * esize
    stream_b = 0 if cache_on_gpu else bs * max_tokens * (6 * D + 4 * split_width) * esize
    cache_b = cache_bytes if cache_on_gpu else 0
    caching = embed_b + prefix_b + trained_b + cache_b + transient_b
    training = trained_b + opt_b + act_b + cache_b + stream_b + transient_b
    return int(max(caching, training) + (256 << 20))


def host_available_bytes() -> int | None:
    """The CPU memory available for new allocations: MemAvailable on Linux, or less where a
    cgroup (v2, e.g. a container) limits this process to less; None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        avail = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            left = max(0, int(limit) - used)
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def preflight(
    model,
    cfg: RMUConfig,
    first: int,
    dtype: torch.dtype,
    max_tokens: int,
    cache_bytes: int,
    cache_on_gpu: bool,
    free_bytes: int,
    device="cuda",
    split_width: int = 0,
    split_bytes: int = 0,
) -> dict:
    """Check the estimated GPU memory against `free_bytes` before anything goes to the GPU.
    Raises ResourceError naming the flag(s) that would make the run fit."""
    need = estimate_gpu_memory(
        model, cfg, first, dtype, max_tokens, cache_bytes, cache_on_gpu, split_width=split_width
    )
    if need <= free_bytes:
        return {"estimated_bytes": need, "free_bytes": int(free_bytes)}

    def est(**kw):
        return estimate_gpu_memory(
            model, cfg, first, dtype, max_tokens, cache_bytes, False, split_width=split_width, **kw
        )

    options = []
    if split_width:  # the layer-first cache (in cache_bytes when on the GPU, else streamed)
        n = estimate_gpu_memory(
            model,
            cfg,
            first,
            dtype,
            max_tokens,
            cache_bytes - (split_bytes if cache_on_gpu else 0),
            cache_on_gpu,
        )
        if n <= free_bytes:
            options.append(("--first-layer-cache off", n))
    if cache_on_gpu and est() <= free_bytes:
        options.append(("--cache-device cpu", est()))
    for flag, kw in (("--offload", {"offload": True}), ("--load-in-4bit", {"load_in_4bit": True})):
        if not (cfg.offload or cfg.load_in_4bit or cfg.load_in_8bit) and est(**kw) <= free_bytes:
            options.append((flag, est(**kw)))
    bs = cfg.batch_size
    while bs > 1 and not options:
        bs //= 2
        for flags, kw in (("", {}), (" --offload", {"offload": True})):
            n = est(batch_size=bs, **kw)
            if n <= free_bytes:
                options.append((f"--batch_size {bs}{flags} (changes the recipe)", n))
                break
    gib = 2**30
    hint = (
        "try " + " or ".join(f"{f} (about {n / gib:.1f} GiB)" for f, n in options)
        if options
        else "free GPU memory, or use a GPU with more memory"
    )
    raise ResourceError(
        f"this run needs about {need / gib:.1f} GiB of GPU memory but {free_bytes / gib:.1f} GiB "
        f"are free on {device}; {hint}"
    )


def plot_losses(losses: list[dict], path: Path, title: str = "RMU") -> None:
    """losses.png: total, forget and retain terms per step (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in losses]
    for key, label in (("loss", "total"), ("forget_loss", "forget"), ("retain_loss", "retain")):
        vals = [max(r[key], 1e-12) for r in losses]
        ax.plot(steps, vals, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(before: dict, after: dict, path: Path) -> None:
    """Bar chart of accuracy before/after per task (written atomically to `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in before if n in after]
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 4))
    xs = range(len(names))
    b = [100 * (before[n].get("acc") or 0) for n in names]
    a = [100 * (after[n].get("acc") or 0) for n in names]
    ax.bar([x - 0.2 for x in xs], b, width=0.4, label="before RMU")
    ax.bar([x + 0.2 for x in xs], a, width=0.4, label="after RMU")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.axhline(25, color="grey", linestyle=":", label="chance (4 choices)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir_for(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.rmu-checkpoint"


def _save_checkpoint(
    ckpt: Path, step: int, trainer: _Trainer, losses, fingerprint: str, inputs_fp: str
) -> None:
    """Write the training state after `step` steps. The tensors go to a new file named by the
    step, then state.json (which names that file) is replaced, then older tensor files go: a
    kill at any point leaves a consistent pair (the previous one or the new one)."""
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    tensors, meta = trainer.state_tensors()
    name = f"state-{step}.safetensors"
    with atomic_path(ckpt / name, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))
        h = hashlib.sha256(tmp.read_bytes()).hexdigest()
    state = {
        "steps_done": step,
        "config_fingerprint": fingerprint,
        "inputs_fingerprint": inputs_fp,
        "weights_fingerprint": WEIGHTS_FINGERPRINT,
        "tensors": name,
        "losses": losses,
        "sha256": h,
        **meta,
    }
    atomic_write_text(ckpt / "state.json", json.dumps(state))
    for old in ckpt.glob("state*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    log.info("checkpoint after %d steps written to %s", step, ckpt)


def _load_checkpoint(ckpt: Path, fingerprint: str):
    from safetensors.torch import load_file

    sj = ckpt / "state.json"
    if not sj.is_file():
        raise ConfigError(f"--resume: no checkpoint in {ckpt}; run without --resume")
    try:
        state = json.loads(sj.read_text())
        st = ckpt / state.get("tensors", "state.safetensors")
    except (ValueError, TypeError, AttributeError) as exc:
        raise TrainingError(
            f"--resume: {sj} is corrupted ({exc}); delete {ckpt} and rerun without --resume"
        ) from exc
    if state.get("config_fingerprint") != fingerprint:
        raise ConfigError(
            f"--resume: the checkpoint in {ckpt} was written with other settings; rerun with "
            "the same flags, or without --resume to start over"
        )
    if not st.is_file() or hashlib.sha256(st.read_bytes()).hexdigest() != state.get("sha256"):
        raise TrainingError(
            f"--resume: {st} is missing or corrupted (checksum); delete {ckpt} and rerun"
        )
    return state, load_file(str(st))


# --------------------------------------------------------------------------- trainer


class PublishedAdamW(torch.optim.Optimizer):
    """The published script's optimizer: the old `transformers.AdamW` (removed from transformers
    since) with its defaults, betas (0.9, 0.999), eps 1e-6, weight decay 0, bias correction on:
        m, v = EMAs of g, g^2;  p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    torch's AdamW instead adds eps to sqrt(v / (1 - b2^t)), an effective eps up to 1/sqrt(1 - b2)
    ~ 32x smaller; RMU gradients of a 7B model are near eps, so the steps differ several-fold.
    Same operations in the same order as the transformers source (bitwise the same update).
    CUDA tensors take one Triton pass each (`ops.published_adamw_step`), which rounds where
    PyTorch's CUDA kernels round: on an H200 (session 6) bitwise the eager step over a whole
    run (tests/test_rmu_gpu.py) and 2.4x faster (0.67 vs 1.61 ms for Zephyr-7B's 3 down_proj
    matrices; benchmarks/bench_adamw.py). `fused=None` (default): WMDP_FAST_FUSED_ADAMW=0 turns
    it off, =1 also sends CPU tensors through it under WMDP_FAST_FORCE_TRITON=1 (tests);
    `fused=False` is the eager step, `fused=True` as =1."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, fused=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        if fused is None:
            env = os.environ.get("WMDP_FAST_FUSED_ADAMW", "")
            fused = False if env == "0" else (True if env == "1" else "cuda")
        self.fused = fused  # True, False, or "cuda" (CUDA tensors only: the default)

    @torch.no_grad()
    def step(self, closure=None):
        from wmdp_fast import ops

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            batched: dict[int, list[list[torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                # a plain int: a resumed tensor step would put the bias corrections in float32
                t = state["step"] = int(state["step"]) + 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                forced = self.fused is True and os.environ.get("WMDP_FAST_FORCE_TRITON") == "1"
                if (
                    self.fused
                    and (p.is_cuda or forced)
                    and p.grad.dtype == p.dtype == exp_avg.dtype == exp_avg_sq.dtype
                ):
                    lists = batched.setdefault(t, [[], [], [], []])
                    for lst, x in zip(lists, (p, p.grad, exp_avg, exp_avg_sq)):
                        lst.append(x)
                    continue
                exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                p.addcdiv_(exp_avg, denom, value=-step_size)
            for t, (ps, gs, ms, vs) in batched.items():
                ops.published_adamw_step(ps, gs, ms, vs, t, group["lr"], beta1, beta2, group["eps"])


class _Trainer:
    """The trained tensors, the optimizer, and one RMU step on replayed layers."""

    def __init__(self, model, cfg: RMUConfig, first: int, control_vecs, device):
        from wmdp_fast.models import get_decoder_layers, select_params

        self.cfg, self.device = cfg, device
        self.layers = list(get_decoder_layers(model)[first : cfg.layer_id + 1])
        self.named = select_params(model, cfg.layer_ids, cfg.param_ids)
        self.params = [p for _, p in self.named]
        chosen = {id(p) for p in self.params}
        for layer in self.layers:
            for p in layer.parameters():
                p.requires_grad_(id(p) in chosen)
        self.control_vecs = control_vecs
        self.master = None
        opt_params = self.params
        if cfg.optimizer_dtype == "float32" and any(p.dtype != torch.float32 for p in self.params):
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
            opt_params = self.master
        self.opt = PublishedAdamW(opt_params, lr=cfg.lr)

    def step(self, idx: int, fb, rb, tgt):
        from wmdp_fast.ops import rmu_loss

        cfg = self.cfg
        k = idx % len(cfg.forget_corpora)
        for layer in self.layers:
            layer.train()
        h_f = replay_batch(self.layers, fb)
        h_r = replay_batch(self.layers, rb)
        total, lf, lr = rmu_loss(
            h_f,
            self.control_vecs[k],
            h_r,
            tgt,
            float(cfg.alpha[k]),
            fb.token_mask if cfg.mask_padding else None,
            rb.token_mask if cfg.mask_padding else None,
        )
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.master is not None:
            for p, m in zip(self.params, self.master):
                m.grad = p.grad.float()
                p.grad = None
        self.opt.step()
        if self.master is not None:
            with torch.no_grad():
                for p, m in zip(self.params, self.master):
                    p.copy_(m)
        return total.detach(), lf.detach(), lr.detach(), h_f.detach(), h_r.detach()

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)}
        if self.master is not None:
            tensors.update(
                {f"master.{i}": m.detach().cpu().contiguous() for i, m in enumerate(self.master)}
            )
        sd = self.opt.state_dict()
        for i, st in sd["state"].items():
            for key, val in st.items():
                tensors[f"opt.{i}.{key}"] = (
                    val.detach().cpu().contiguous()
                    if isinstance(val, torch.Tensor)
                    else torch.tensor(val)
                )
        groups = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
            for g in sd["param_groups"]
        ]
        # the generators' states: dropout in the replayed layers draws from them every step,
        # so a resumed run must continue their sequence, not restart it after the seeding
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return tensors, {"param_groups": groups, "n_params": len(self.params)}

    def load_state(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"])
            if self.master is not None:
                for i, m in enumerate(self.master):
                    m.copy_(tensors[f"master.{i}"])
        opt_state: dict[int, dict] = {}
        for name, t in tensors.items():
            if name.startswith("opt."):
                _, i, key = name.split(".", 2)
                opt_state.setdefault(int(i), {})[key] = t
        groups = state["param_groups"]
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        self.opt.load_state_dict({"state": opt_state, "param_groups": groups})
        if "rng.cpu" in tensors:  # absent from checkpoints of older versions
            torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)


# --------------------------------------------------------------------------- the run


def _resolve_output_dir(cfg: RMUConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    name = Path(cfg.model_name_or_path).name or "model"
    date = time.strftime("%Y-%m-%d-%H-%M-%S")
    alpha = ",".join(f"{a:g}" for a in cfg.alpha)
    return (
        Path("models")
        / f"{name}_alpha-{alpha}_batches-{cfg.max_num_batches}_layer-{cfg.layer_id}_{date}"
    )


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output directory unless `overwrite`, and the current
    directory or one above it (the output is renamed into place as a whole, which fails for
    '.' only after training, and would replace the directory the run works in)."""
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise ConfigError(
            f"--output_dir {out} is the current directory or one above it; the output directory "
            "is written beside its target and renamed into place, so name a new directory "
            "(e.g. --output_dir models/zephyr_rmu)"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"--output_dir {out} exists and is not empty; pass --overwrite to replace it or "
            "choose another directory"
        )


def meta_model(checkpoint_dir: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model built from its config on the meta device: names, shapes and dtypes of every
    parameter, no memory and no weights read (for checks and the memory preflight)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(checkpoint_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model config in {checkpoint_dir}: {exc}") from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )


def _evaluate_dir(
    cfg: RMUConfig, model_dir: str, device, dtype, progress: bool = True
) -> tuple[dict, dict]:
    """Score `model_dir` on cfg.eval_tasks with the evaluation engine. With --load-in-4bit/8bit
    the scored model is quantized the same way (the full model would not fit where the run
    does). Returns ({task: {acc, acc_stderr, n}}, {protocol, dtype, quantization, versions})."""
    from wmdp_fast.evaluate import evaluate
    from wmdp_fast.models import load_model, load_tokenizer

    try:
        model = load_model(
            model_dir,
            dtype=dtype,
            device=device,
            load_in_4bit=cfg.load_in_4bit,
            load_in_8bit=cfg.load_in_8bit,
            trust_remote_code=cfg.trust_remote_code,
            progress=progress,
        )
        tok = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code, progress=progress)
        res = evaluate(
            model,
            tok,
            list(cfg.eval_tasks),
            protocol=cfg.eval_protocol,
            data_dir=cfg.eval_data_dir,
            limit=cfg.eval_limit,
            model_name=model_dir,
            progress=progress,
        )
    except torch.cuda.OutOfMemoryError as exc:
        raise ResourceError(
            f"--eval ran out of GPU memory scoring {model_dir} ({str(exc).splitlines()[0]}): "
            "the evaluation loads the whole model. Add --load-in-4bit, or drop --eval and score "
            "the saved model afterwards with python -m wmdp_fast.eval"
        ) from exc
    finally:
        model = None
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    out: dict = {}
    for name, r in {**res.get("results", {}), **res.get("groups", {})}.items():
        out[name] = {k: r.get(k) for k in ("acc", "acc_stderr", "n")}
    quant = "nf4" if cfg.load_in_4bit else ("int8" if cfg.load_in_8bit else "none")
    meta = {
        "protocol": res.get("protocol"),
        "dtype": res.get("dtype"),
        "quantization": quant,
        "versions": res.get("versions"),
    }
    return out, meta


def run_rmu(
    cfg: RMUConfig,
    progress: bool = True,
    step_callback: Callable[[int, dict], None] | None = None,
    keep_cache: bool = False,
) -> RMUResult:
    """Run RMU as configured and save the result (see the module docstring).

    step_callback(step, losses_row) is called after every completed step (tests use it to
    simulate an interruption). Raises WmdpFastError subclasses for every user-caused failure;
    a NaN/inf loss raises TrainingError naming the step and saves no model.
    """
    running: dict = {}  # what _run started that must be stopped if it fails
    try:
        return _run(cfg, progress, step_callback, keep_cache, running)
    except torch.cuda.OutOfMemoryError as exc:
        raise ResourceError(
            f"the GPU ran out of memory ({str(exc).splitlines()[0]}); try --cache-device cpu, "
            "--offload, --load-in-4bit or a smaller --batch_size"
        ) from exc
    finally:
        if "prefetch" in running:  # after a success its folder is the output: nothing to remove
            running["prefetch"].abort()


def _run(cfg: RMUConfig, progress, step_callback, keep_cache, running: dict) -> RMUResult:
    from tqdm.auto import tqdm

    from wmdp_fast import cache as cache_mod
    from wmdp_fast.corpora import load_corpora
    from wmdp_fast.models import (
        get_decoder_layers,
        load_model,
        load_tokenizer,
        quantize_linear_layers_,
        resolve_checkpoint_dir,
        resolve_device,
        resolve_dtype,
        save_updated_checkpoint,
        select_params,
        untouched_weight_files,
        validate_layers,
    )

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cfg.validate()
    if cfg.resume and not cfg.output_dir:
        raise ConfigError(
            "--resume needs the --output_dir of the interrupted run: the default output "
            "directory name holds the start time (the interruption message names it)"
        )
    out = _resolve_output_dir(cfg)
    # how to continue after an interruption (a default output_dir is not found again)
    rerun = (
        "the same command with" + ("" if cfg.output_dir else f" --output_dir {out}") + " --resume"
    )
    check_output_dir(out, cfg.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dir_for(out)
    fingerprint = cfg.training_fingerprint()
    resume_state = _load_checkpoint(ckpt, fingerprint) if cfg.resume else None

    device = resolve_device(cfg.device)
    if cfg.cache_device == "cuda" and device.type != "cuda":
        raise ConfigError(f"--cache-device cuda needs a CUDA --device; this run is on {device}")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and device.type != "cuda":
        log.warning("4/8-bit prefix on %s: bitsandbytes CPU kernels are slow", device)

    # data first: a missing corpus should fail before a 14 GB model is read
    t0 = time.perf_counter()
    forget, retain, num_batches = load_corpora(
        cfg.forget_corpora,
        cfg.retain_corpora,
        cfg.batch_size,
        cfg.max_num_batches,
        corpus_dir=cfg.corpus_dir,
        min_len=cfg.min_len,
        mode=cfg.corpus_mode,
    )
    entries, f_idx, r_idx = plan_batches(forget, retain, num_batches)
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    src_dir = resolve_checkpoint_dir(cfg.model_name_or_path)
    # 'auto': the checkpoint's own dtype on CUDA, as the published torch_dtype="auto"
    dtype = resolve_dtype(cfg.dtype, device, src_dir)
    timings["download_s"] = time.perf_counter() - t0

    # Everything that can be checked without the weights is checked before any are read, on a
    # skeleton of the model (meta tensors, no memory): layers, parameters, control vectors,
    # attention types and the GPU memory preflight. Then --eval, then the real load.
    t0 = time.perf_counter()
    tok = load_tokenizer(
        str(src_dir), trust_remote_code=cfg.trust_remote_code, use_fast=False, progress=progress
    )
    if tok.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {src_dir} has no EOS token to pad with")
    tok.pad_token_id = tok.eos_token_id
    tok.padding_side = "left"
    tok.truncation_side = "right"
    skeleton = meta_model(str(src_dir), dtype, trust_remote_code=cfg.trust_remote_code)
    validate_layers(skeleton, cfg.layer_id, cfg.layer_ids)
    first = min(cfg.layer_ids)
    sk_named = select_params(skeleton, cfg.layer_ids, cfg.param_ids)  # a bad --param_ids fails here
    first_sk = get_decoder_layers(skeleton)[first]
    split_reason = (
        "--first-layer-cache off"
        if cfg.first_layer_cache == "off"
        else first_layer_split_reason(first_sk, [p for _, p in sk_named])
    )
    if split_reason is not None and cfg.first_layer_cache == "on":
        raise ConfigError(f"--first-layer-cache on: layer {first} cannot be split: {split_reason}")
    split_width = first_sk.mlp.down_proj.in_features if split_reason is None else 0
    D = skeleton.config.hidden_size
    if cfg.control_vectors:  # shape checked now; moved to the device later
        load_control_vectors(cfg.control_vectors, len(cfg.forget_corpora), D, "cpu", dtype)
    layer_types = getattr(skeleton.config, "layer_types", None)
    lo = 0 if cfg.offload else first
    if layer_types and len(set(layer_types[lo : cfg.layer_id + 1])) > 1:
        # one captured attention mask serves every replayed layer; Gemma-2-style models
        # alternate sliding-window and global layers, whose masks differ
        raise ConfigError(
            f"layers {lo}..{cfg.layer_id} mix attention types "
            f"{sorted(set(layer_types[lo : cfg.layer_id + 1]))}; replaying them with one "
            "captured mask would not be exact: choose --layer_ids/--layer_id within one type"
            + (" (or drop --offload)" if cfg.offload else "")
        )
    quant = "nf4" if cfg.load_in_4bit else ("int8" if cfg.load_in_8bit else "none")

    # cache size; tokenized once: the shapes size the cache, and a cache miss feeds these
    # encodings to the model
    encodings = cache_mod.tokenize_batches(tok, entries)
    lengths = [tuple(enc["input_ids"].shape) for enc in encodings]
    esize = 1 if cfg.cache_format == "int8" else torch.tensor([], dtype=dtype).element_size()
    cache_bytes = sum(b * t * D * esize for b, t in lengths)
    # retain targets, and with --verbose the frozen forget outputs too, are kept alongside
    tset = set(r_idx) | (set(f_idx) if cfg.verbose else set())
    tsize = torch.tensor([], dtype=dtype).element_size()
    cache_bytes += sum(b * t * D * tsize for e, (b, t) in enumerate(lengths) if e in tset)
    max_tokens = max(t for _, t in lengths)
    # the layer-first cache: per token, the residual stream and the down_proj input
    split_bytes = sum(b * t * (D + split_width) * tsize for b, t in lengths) if split_width else 0

    def choose_storage(total: int) -> torch.device:
        if cfg.cache_device == "auto":
            small = device.type != "cuda" or total <= (1 << 30)
            return device if small else torch.device("cpu")
        return torch.device(cfg.cache_device if cfg.cache_device == "cpu" else device)

    # where the cache lives is decided by the cache alone; the layer-first cache goes with it
    storage = choose_storage(cache_bytes)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if split_bytes and cfg.first_layer_cache == "auto":
        # an optimisation (the same numbers either way): only where the memory is there, and
        # never in pinned CPU memory for a CUDA run: on an H200 (session 6, Zephyr-7B, the
        # published 150 steps, ~16 GiB of split batches) pinning and filling it cost more than
        # the ~3 ms per step it saves: run_rmu 44.2 s with it vs 18.7 s without (cache_s
        # 11.1 vs 3.4, targets_s 8.9 vs 0.5, train_s 11.3 vs 4.2 s); --first-layer-cache on
        # still forces it
        if storage.type == "cpu" and device.type == "cuda":
            split_reason = (
                f"its {split_bytes / 2**30:.1f} GiB would live in pinned CPU memory, which costs "
                "more end to end than it saves per step (--first-layer-cache on forces it)"
            )
        elif storage.type == "cpu":
            avail = host_available_bytes()
            # besides it in CPU memory: the cache, the loaded layers (embeddings + layer_id + 1)
            layer_b, embed_b = _layer_and_embed_bytes(skeleton, dtype)
            model_b = (cfg.layer_id + 1) * layer_b + embed_b
            if avail is not None and split_bytes > (avail - cache_bytes - model_b) // 2:
                split_reason = (
                    f"it needs {split_bytes / 2**30:.1f} GiB of CPU memory and "
                    f"{avail / 2**30:.1f} GiB are available (the cache and the model need "
                    f"{(cache_bytes + model_b) / 2**30:.1f})"
                )
        elif free is not None:
            est = estimate_gpu_memory(
                skeleton, cfg, first, dtype, max_tokens, cache_bytes + split_bytes, True
            )
            if est > free:
                split_reason = f"it does not fit in the free memory of {device}"
        if split_reason is not None:
            split_width = split_bytes = 0
    memory = None
    if device.type == "cuda":
        memory = preflight(
            skeleton,
            cfg,
            first,
            dtype,
            max_tokens,
            cache_bytes + split_bytes,
            storage.type == "cuda",
            free,
            device,
            split_width=split_width,
            split_bytes=split_bytes,
        )
    del skeleton
    timings["checks_s"] = time.perf_counter() - t0

    eval_before = eval_meta = None
    if cfg.eval_tasks:
        t0 = time.perf_counter()
        eval_before, eval_meta = _evaluate_dir(cfg, str(src_dir), device, dtype, progress)
        timings["eval_before_s"] = time.perf_counter() - t0
    if device.type == "cuda":  # the peak reported is RMU's, not the evaluation's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # load on the CPU, and only what ever runs: the embeddings and layers 0..layer_id (the
    # layers above are never built nor read: a quarter of Zephyr-7B's bytes at the published
    # layer 7); of those, only the modules that run go to the device
    t0 = time.perf_counter()
    model = load_model(
        str(src_dir),
        dtype=dtype,
        device="cpu",
        trust_remote_code=cfg.trust_remote_code,
        progress=progress,
        num_layers=cfg.layer_id + 1,
    )
    layers = get_decoder_layers(model)
    timings["load_s"] = time.perf_counter() - t0
    # the output's untouched weight files (for a 7B model ~12.5 GB: copies, never hard links)
    # are copied by a background thread while the GPU builds the cache and trains
    trained0 = {n: p.detach() for n, p in select_params(model, cfg.layer_ids, cfg.param_ids)}
    running["prefetch"] = prefetch = _OutputPrefetch(
        src_dir, out, untouched_weight_files(src_dir, trained0, model)
    )
    del trained0

    t0 = time.perf_counter()  # the weights' fingerprints: the cache key and --resume's check
    components = {
        "model": cache_mod.model_prefix_fingerprint(model, first),
        "tokenizer": cache_mod.tokenizer_fingerprint(tok),
        "data": cache_mod.data_fingerprint(entries),
        "index": hashlib.sha256(json.dumps([f_idx, r_idx]).encode()).hexdigest(),
        "layer": first,
        "dtype": str(dtype),
        "device_type": device.type,
        "quantization": quant,
        "format": cfg.cache_format,
        "versions": _versions(),
    }
    cache_fp = cache_mod.combine_fingerprint(components)
    # what --resume must find unchanged beyond the flags: the weights of every layer up to
    # layer_id (the flags name the model only by its path), the tokenizer and the data
    inputs_fp = cache_mod.combine_fingerprint(
        {
            "prefix": components["model"],
            "trained_layers": cache_mod.layers_fingerprint(model, first, cfg.layer_id + 1),
            "tokenizer": components["tokenizer"],
            "data": components["data"],
            "index": components["index"],
            "dtype": str(dtype),
        }
    )
    timings["fingerprint_s"] = time.perf_counter() - t0
    if resume_state is not None and "inputs_fingerprint" not in resume_state[0]:
        raise ConfigError(
            f"--resume: the checkpoint in {ckpt} was written by an older wmdp_fast that did not "
            "record the model weights and data it trained on; rerun without --resume"
        )
    if resume_state is not None and resume_state[0].get("inputs_fingerprint") != inputs_fp:
        if resume_state[0].get("weights_fingerprint") != WEIGHTS_FINGERPRINT:
            raise ConfigError(
                f"--resume: the checkpoint in {ckpt} was written by an older wmdp_fast that "
                "fingerprinted large weight tensors differently (a float sum and norm), so it "
                "cannot tell whether the weights are unchanged; rerun without --resume"
            )
        raise ConfigError(
            f"--resume: the checkpoint in {ckpt} was written for other model weights, tokenizer "
            f"or data than {cfg.model_name_or_path} and the corpora hold now; restore them, or "
            "rerun without --resume to start over"
        )

    t0 = time.perf_counter()
    pin = storage.type == "cpu" and device.type == "cuda"
    cache = None
    if cfg.cache_dir:
        cache = cache_mod.load_cache(cfg.cache_dir, cache_fp, storage, pin)
    # move what runs to the device: the trained layers, and for a cache miss the embeddings
    # and the prefix (quantized, or left on the CPU to be streamed with --offload)
    for i in range(first, cfg.layer_id + 1):
        layers[i].to(device)
    fused_names: list[str] = []
    if cfg.fused_layers == "on" or (cfg.fused_layers == "auto" and device.type == "cuda"):
        # before the targets pass: targets, the layer-first cache and the steps run one code
        from wmdp_fast.fused_layers import fuse_decoder_layers

        for name in fuse_decoder_layers(list(layers[first : cfg.layer_id + 1])):
            pos, rest = name.split(".", 1)
            fused_names.append(f"layers.{first + int(pos)}.{rest}")
    if cache is None:
        model.model.embed_tokens.to(device)
        if getattr(model.model, "rotary_emb", None) is not None:
            model.model.rotary_emb.to(device)
        for i in range(first):
            if quant != "none":
                quantize_linear_layers_(layers[i], "4bit" if cfg.load_in_4bit else "8bit", dtype)
            if not cfg.offload:
                layers[i].to(device)
        stored = cache_mod.capture_layer_inputs(
            model,
            tok,
            entries,
            first,
            device,
            storage,
            cfg.cache_format,
            progress=progress,
            prefix_layers_on_cpu=cfg.offload,
            encodings=encodings,
        )
        del encodings
        cache = cache_mod.ActivationCache(stored, f_idx, r_idx, cache_fp, {"hit": False})
        del stored  # the cache holds the batches; the layer-first cache may drop them later
        if cfg.cache_dir:
            try:
                cache.info["path"] = str(cache_mod.save_cache(cache, cfg.cache_dir, components))
            except (OSError, SafetensorError) as exc:  # an optimisation: train on without it
                log.warning(
                    "could not write the activation cache to --cache-dir %s (%s); continuing "
                    "without saving it",
                    cfg.cache_dir,
                    exc,
                )
    timings["cache_s"] = time.perf_counter() - t0
    if device.type == "cuda" and not cache.info.get("hit"):
        # the prefix is never run again: free its GPU memory before training
        model.model.embed_tokens.to("cpu")
        for i in range(first):
            if quant == "none":
                layers[i].to("cpu")
            else:  # bitsandbytes layers do not move back cleanly; the model is not reused
                layers[i] = torch.nn.Identity()
        torch.cuda.empty_cache()

    # retain targets (and, with --verbose, frozen forget outputs) from the ORIGINAL layers;
    # in the same pass, the constant part of layer `first` for every batch (layer-first cache)
    t0 = time.perf_counter()
    n_entries, cache_nbytes = len(cache.entries), cache.nbytes()
    need_ids = sorted(set(r_idx) | (set(f_idx) if cfg.verbose else set()))
    try:
        targets, parts, reason = prepare_replay(
            list(layers[first : cfg.layer_id + 1]),
            cache,
            need_ids,
            device,
            dtype,
            storage,
            pin,
            split=split_width > 0,
            progress=progress,
        )
    except RuntimeError as exc:
        if "out of memory" not in str(exc) and "alloc" not in str(exc).lower():
            raise
        if isinstance(exc, torch.cuda.OutOfMemoryError) and storage.type != "cuda":
            raise  # the GPU's, not the CPU-side cache's: run_rmu's GPU message
        where = "pinned CPU" if pin else storage.type
        fix = (
            "--first-layer-cache off"
            if split_width
            else ("fewer batches (--max_num_batches)" if pin else "--cache-device cpu")
        )
        raise ResourceError(
            f"out of {where} memory while computing the retain targets"
            + (" and the layer-first cache" if split_width else "")
            + f": try {fix} ({exc})"
        ) from exc
    split_reason = split_reason or reason
    train_cache = cache
    if parts is not None:
        train_cache = dataclasses.replace(cache, entries=[parts[e] for e in range(n_entries)])
        if not keep_cache:
            cache = train_cache  # the inputs of layer `first` are not needed any more
            if pin and hasattr(torch._C, "_host_emptyCache"):
                # their page-locked chunks go back to the OS, not to PyTorch's host cache
                torch._C._host_emptyCache()
    elif cfg.first_layer_cache == "on":
        raise ConfigError(f"--first-layer-cache on: {split_reason}; rerun without it")
    else:
        log.info("layer-first cache off: %s", split_reason)
    first_layer_report = {
        "used": parts is not None,
        "reason": split_reason,
        "bytes": sum(p.nbytes() for p in parts.values()) if parts is not None else 0,
    }
    timings["targets_s"] = time.perf_counter() - t0

    if cfg.control_vectors:
        cvs = load_control_vectors(cfg.control_vectors, len(cfg.forget_corpora), D, device, dtype)
    else:
        cvs = draw_control_vectors(
            cfg.steering_coeffs, D, cfg.seed, device, dtype, cfg.control_vector_rng
        )

    trainer = _Trainer(model, cfg, first, cvs, device)
    names = [n for n, _ in trainer.named]
    log.info("updating %d tensors: %s", len(names), ", ".join(names))

    losses: list[dict] = []
    start = 0
    if resume_state is not None:
        state, tensors = resume_state
        trainer.load_state(state, tensors)
        losses = list(state["losses"])
        start = int(state["steps_done"])
        log.info("resuming after step %d from %s", start, ckpt)

    loader = _Loader(train_cache, targets, device, dtype)
    t0 = time.perf_counter()
    pending: list[tuple[int, torch.Tensor, dict | None]] = []
    sync_every = 1 if device.type != "cuda" or cfg.verbose else 10

    def flush(callbacks: bool = True):
        if not pending:
            return
        vals = torch.stack([v for _, v, _ in pending]).tolist()
        items = list(zip(pending, vals))
        pending.clear()
        for (step, _, extra), (tot, lf, lr) in items:
            if not all(math.isfinite(x) for x in (tot, lf, lr)):
                raise TrainingError(
                    f"the loss became {tot} (forget {lf}, retain {lr}) at step {step}; no model "
                    "was saved. Lower --lr or --alpha/--steering_coeffs, or use "
                    "--optimizer-dtype float32"
                )
            row = {"step": step, "loss": tot, "forget_loss": lf, "retain_loss": lr}
            if extra:
                row.update(extra)
            losses.append(row)
            log.info("step %d | loss %.4g | forget %.4g | retain %.4g", step, tot, lf, lr)
            if extra:
                log.info("step %d | %s", step, " | ".join(f"{k} {v:.4g}" for k, v in extra.items()))
            bar.set_postfix(loss=f"{tot:.4g}", forget=f"{lf:.4g}", retain=f"{lr:.4g}")
        if callbacks and step_callback is not None:
            for row in losses[-len(items) :]:
                step_callback(row["step"], row)

    # Ctrl-C (or SIGTERM) is deferred to the end of the current step so that the checkpoint
    # written on interruption holds a consistent state (a second one aborts at once, without a
    # checkpoint). While a checkpoint is being written, Ctrl-C waits for it to finish.
    interrupt = {"requested": False, "saving": False}

    def on_sigint(signum, frame):
        if interrupt["saving"]:
            interrupt["requested"] = True
            log.warning("interrupt: writing a checkpoint; stopping once it is written")
            return
        if interrupt["requested"]:
            raise _Abort("aborted by a second Ctrl-C; no checkpoint written for this step")
        interrupt["requested"] = True
        log.warning(
            "interrupt: finishing the current step and writing a checkpoint "
            "(press Ctrl-C again to abort without one)"
        )

    saved = {"step": None}

    def save(step: int, periodic: bool) -> None:
        if saved["step"] == step:  # e.g. Ctrl-C during the periodic checkpoint of this step
            return
        interrupt["saving"] = True
        try:
            _save_checkpoint(ckpt, step, trainer, losses, fingerprint, inputs_fp)
        except (OSError, SafetensorError) as exc:
            msg = f"could not write the checkpoint after step {step} to {ckpt}: {exc}"
            if not periodic:
                raise TrainingError(msg) from exc
            log.warning("%s; training goes on (an interruption would lose these steps)", msg)
            return
        finally:
            interrupt["saving"] = False
        saved["step"] = step

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, a Slurm time limit) as Ctrl-C: finish the step, write a checkpoint
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, on_sigint)
    bar = tqdm(total=num_batches, initial=start, desc="RMU", disable=not progress, unit="step")
    done = start
    try:
        for idx in range(start, num_batches):
            fb, rb, tgt = loader.get(idx, num_batches)
            tot, lf, lr, h_f, h_r = trainer.step(idx, fb, rb, tgt)
            extra = _verbose_stats(idx, h_f, h_r, tgt, targets, cache, cfg) if cfg.verbose else None
            pending.append((idx, torch.stack([tot, lf, lr]), extra))
            done = idx + 1
            bar.update(1)
            if len(pending) >= sync_every or done == num_batches:
                flush()
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < num_batches:
                flush()
                save(done, periodic=True)
            if interrupt["requested"]:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        flush(callbacks=False)
        save(done, periodic=False)
        raise TrainingError(
            f"interrupted after {done} of {num_batches} steps; checkpoint saved to {ckpt}: rerun "
            f"{rerun} to finish"
        ) from None
    except _Abort:
        raise TrainingError(
            f"aborted during step {done}; no checkpoint written for it ({rerun} "
            "continues from the last periodic checkpoint, if any)"
        ) from None
    finally:
        bar.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["train_s"] = time.perf_counter() - t0
    steps_run = num_batches - start
    timings["per_step_s"] = timings["train_s"] / max(1, steps_run)

    # save: the ORIGINAL checkpoint with only the trained tensors replaced
    t0 = time.perf_counter()
    trained = {n: p.detach().to("cpu").clone() for n, p in trainer.named}
    # the loss check sees every update but the last one's result
    bad = [n for n, t in trained.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainingError(
            f"the last update (step {num_batches - 1}) made {', '.join(bad)} NaN or inf; no "
            "model was saved. Lower --lr or --alpha/--steering_coeffs, or use "
            "--optimizer-dtype float32"
        )
    tmp = prefetch.tmp
    try:
        prefetch.finish()  # the untouched weight files are in tmp now (a Ctrl-C may come here)
        save_updated_checkpoint(src_dir, tmp, trained, model=model, copied=prefetch.names)
        from safetensors.torch import save_file

        save_file(
            {"control_vectors": torch.cat([c.reshape(1, -1).float().cpu() for c in cvs])},
            str(tmp / "control_vectors.safetensors"),
        )
        set_new_file_mode(tmp / "control_vectors.safetensors")
        report = {
            "config": dataclasses.asdict(cfg),
            "output_dir": str(out),
            "num_batches": num_batches,
            "params_updated": [
                {"name": n, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", "")}
                for n, p in trainer.named
            ],
            "losses": losses,
            "timings": timings,
            "peak_gpu_memory_bytes": (
                int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
            ),
            "memory_preflight": memory,
            "cache": {
                "fingerprint": cache_fp,
                "hit": bool(cache.info.get("hit")),
                "path": cache.info.get("path"),
                "format": cfg.cache_format,
                "storage": str(storage),
                "entries": n_entries,
                "bytes": cache_nbytes,
                "exact": quant == "none" and cfg.cache_format == "bf16",
                "note": (
                    "the prefix was quantized: cached inputs approximate the full-precision model"
                    if quant != "none"
                    else None
                ),
            },
            "first_layer_cache": first_layer_report,
            "fused_layers": fused_names,
            "control_vector_norms": [float(c.float().norm()) for c in cvs],
            "layers_loaded": len(layers),
            "resumed_from_step": start if resume_state is not None else None,
            "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
            "versions": _versions(),
            "eval": eval_meta,
            "eval_before": eval_before,
            "eval_after": None,
        }
        if losses:
            plot_losses(
                losses, tmp / "losses.png", title=f"RMU on {Path(cfg.model_name_or_path).name}"
            )
        atomic_write_text(tmp / "rmu_report.json", json.dumps(report, indent=1, default=str))
        # a source that is an earlier run's output brought its accuracy plot along; this run's
        # is written after the evaluation below, if there is one
        (tmp / "accuracy.png").unlink(missing_ok=True)
        _move_into_place(tmp, out)
    except BaseException as exc:
        prefetch.abort()  # stops the copy if it still runs, removes tmp
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C while saving: keep the finished steps
            save(num_batches, periodic=False)
            raise TrainingError(
                f"interrupted while saving the model; checkpoint of all {num_batches} steps "
                f"saved to {ckpt}: rerun {rerun} to save the model"
            ) from None
        raise
    timings["save_s"] = time.perf_counter() - t0
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("saved the unlearned model to %s", out)

    kept = cache if keep_cache else None
    if cfg.eval_tasks:
        t0 = time.perf_counter()
        del model, trainer, loader, cache, train_cache, targets
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["eval_after"], report["eval"] = _evaluate_dir(cfg, str(out), device, dtype, progress)
        timings["eval_after_s"] = time.perf_counter() - t0
        if report["eval_before"] is not None:
            plot_accuracy(report["eval_before"], report["eval_after"], out / "accuracy.png")
    timings["total_s"] = time.perf_counter() - t_start
    report["timings"] = timings
    atomic_write_text(out / "rmu_report.json", json.dumps(report, indent=1, default=str))
    return RMUResult(output_dir=out, report=report, params=trained, cache=kept)


def _verbose_stats(idx, h_f, h_r, tgt, targets, cache, cfg) -> dict:
    """The published --verbose numbers: cosine similarities and mean activation norms."""
    import torch.nn.functional as F

    frozen_f = targets[cache.forget_index[idx]].to(h_f.device, h_f.dtype)
    k = idx % len(cfg.forget_corpora)

    def norm(x):
        return torch.mean(x.float().norm(dim=-1).mean(dim=1), dim=0).item()

    return {
        "unlearn_cosine_sim": F.cosine_similarity(h_f, frozen_f, dim=-1).mean().item(),
        "retain_cosine_sim": F.cosine_similarity(h_r, tgt, dim=-1).mean().item(),
        f"topic{k}_updated_forget_norm": norm(h_f),
        f"topic{k}_frozen_forget_norm": norm(frozen_f),
        f"topic{k}_updated_retain_norm": norm(h_r),
        f"topic{k}_frozen_retain_norm": norm(tgt),
    }


class _OutputPrefetch:
    """Copies the checkpoint's untouched weight files into a new temporary output folder in a
    background thread (`os.copy_file_range` releases the GIL), so that the copy overlaps the
    run instead of adding to the save. `finish()` waits for it and returns the folder;
    `abort()` stops it (between files and 1 GiB chunks) and removes the folder."""

    def __init__(self, src_dir: Path, out: Path, names: list[str]):
        from wmdp_fast.models import copy_untouched_files

        self.names = names
        self.tmp = make_temp_dir(out)
        self.stop = threading.Event()
        self.error: BaseException | None = None

        def work():
            try:
                copy_untouched_files(src_dir, self.tmp, names, self.stop)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread by finish()
                self.error = exc

        self.thread = threading.Thread(target=work, name="wmdp_fast-output-copy", daemon=True)
        self.thread.start()

    def finish(self) -> Path:
        self.thread.join()
        if self.error is not None:
            raise ModelError(
                f"could not copy the checkpoint's files into {self.tmp}: {self.error}"
            ) from self.error
        return self.tmp

    def abort(self) -> None:
        self.stop.set()
        self.thread.join()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to `out` (replacing an old one: --overwrite)."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _versions() -> dict:
    import transformers

    import wmdp_fast

    return {
        "wmdp_fast": getattr(wmdp_fast, "__version__", "unknown"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


__all__ = [
    "RMUConfig",
    "RMUResult",
    "WmdpFastError",
    "check_output_dir",
    "draw_control_vectors",
    "load_control_vectors",
    "plan_batches",
    "replay",
    "run_rmu",
]
