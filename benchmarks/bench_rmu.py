"""RMU: the published loop and the wmdp_fast engine side by side, same model, data, control
vectors.

Per-step time (median after warm-up) and the ratio, peak GPU memory of each, the loss curves'
agreement, the engine with a 4-bit prefix (--load-in-4bit) on CUDA, and optionally (--end-to-end)
load + cache + steps + save through `run_rmu` from a checkpoint on local disk vs the published
script's load-two-copies + loop + save_pretrained.

  python benchmarks/bench_rmu.py                                   # CPU, small model
  python benchmarks/bench_rmu.py --device cuda --arch zephyr-7b    # ~1-2 min on an H100

The published loop here gets pre-tokenized batches (its per-step tokenization is not timed,
which favours it). Random weights, random-token batches without padding (B x T tokens each).
With --arch zephyr-7b the model is built directly on the GPU in bf16 (no disk); the engine then
keeps only the embeddings and layers 0..layer_id, and on CUDA, as `run_rmu` does, holds the
embeddings and layers 0..first-1 on the GPU for the capture only. Each row prints as soon as it
is measured; a failing A/B row prints an ERROR row and the table goes on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wmdp_fast.cache import capture_layer_inputs  # noqa: E402
from wmdp_fast.rmu import (  # noqa: E402
    PublishedAdamW,
    RMUConfig,
    _Loader,
    _Trainer,
    draw_control_vectors,
    prepare_replay,
)

ARCHS = {
    # hidden, intermediate, layers, heads, kv heads
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "zephyr-7b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}


def build_model(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(
        vocab_size=32000,
        max_position_embeddings=32768,
        sliding_window=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **ARCHS[arch],
    )
    cfg.initializer_range = 0.02
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


class _PreTokenized:
    """Stands in for the tokenizer: 'texts' are batch names mapped to fixed encodings."""

    def __init__(self, encodings: dict[str, dict]):
        self.encodings = encodings

    def __call__(self, texts, **kw):
        from transformers import BatchEncoding

        enc = self.encodings[texts[0]]
        return BatchEncoding({k: v[:, : kw.get("max_length", v.shape[1])] for k, v in enc.items()})


def make_batches(n_steps: int, K: int, B: int, T: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    enc, f_names, r_names = {}, [], []
    for i in range(n_steps):
        for kind, names in (("f", f_names), ("r", r_names)):
            name = f"{kind}{i}"
            ids = torch.randint(3, 32000, (B, T), generator=g)
            ids[:, 0] = 1
            enc[name] = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long)}
            names.append(name)
    return enc, f_names, r_names


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def published_loop(model, cfg, enc, f_names, r_names, cvs, device, steps):
    """The published loop: frozen copy, full forwards, hook on layer_id, F.mse_loss, AdamW."""
    frozen = copy.deepcopy(model).eval()
    model.train()
    params = [
        p
        for lid in cfg.layer_ids
        for i, p in enumerate(model.model.layers[lid].parameters())
        if i in cfg.param_ids
    ]
    # the published transformers.AdamW (eager, whatever WMDP_FAST_FUSED_ADAMW says)
    opt = PublishedAdamW(params, lr=cfg.lr, fused=False)

    def fwd(m, inputs, no_grad):
        cache = []
        h = m.model.layers[cfg.layer_id].register_forward_hook(
            lambda mod, i, o: cache.append(o[0] if isinstance(o, tuple) else o)
        )
        with torch.set_grad_enabled(not no_grad):
            m(**inputs)
        h.remove()
        return cache[0]

    times, losses = [], []
    K = len(cvs)
    for idx in range(steps):
        k = idx % K
        t0 = time.perf_counter()
        f_in = {n: v.to(device) for n, v in enc[f_names[idx]].items()}
        r_in = {n: v.to(device) for n, v in enc[r_names[idx]].items()}
        h_f = fwd(model, f_in, False)
        lf = F.mse_loss(h_f, cvs[k])
        h_r = fwd(model, r_in, False)
        h_r0 = fwd(frozen, r_in, True)
        lr = F.mse_loss(h_r, h_r0) * cfg.alpha[k]
        loss = lf + lr
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    del frozen, opt
    # every parameter of layers 0..layer_id and the embeddings got a .grad (the published model
    # requires grad everywhere) that no optimizer frees: ~3.7 GB on Zephyr-7B, which would
    # otherwise sit in every engine row's peak memory
    model.zero_grad(set_to_none=True)
    return times, losses


def engine_loop(
    model,
    cfg,
    enc,
    f_names,
    r_names,
    cvs,
    device,
    steps,
    storage,
    quant=None,
    split=True,
    fused_adamw=None,
    fused_layers=False,
):
    """The engine's path: capture layer-`first` inputs once, retain targets from the original
    layers (and with `split`, the layer-first cache: each step starts at layer `first`'s
    down_proj), then replay layers first..layer_id per step with the fused loss. As in run_rmu:
    `fused_adamw` (the optimizer's one-pass Triton step; None: the default, on for CUDA
    tensors) and `fused_layers` (fused RMSNorm/SwiGLU in the replayed layers, opt-in)."""
    from wmdp_fast.fused_layers import fuse_decoder_layers, unfuse_decoder_layers

    first = min(cfg.layer_ids)
    tok = _PreTokenized(enc)
    entries = [((n,), 512) for n in f_names[:steps]] + [((n,), 512) for n in r_names[:steps]]
    t0 = time.perf_counter()
    if quant:
        from wmdp_fast.models import quantize_linear_layers_

        for i in range(first):
            quantize_linear_layers_(model.model.layers[i], quant, torch.bfloat16)
    for i in range(first):
        model.model.layers[i].to(device)
    model.model.embed_tokens.to(device)
    stored = capture_layer_inputs(model, tok, entries, first, device, storage, progress=False)
    if device.type == "cuda":
        # as run_rmu: the prefix never runs again, its GPU memory is freed before training
        # (bitsandbytes layers do not move back: dropped, the model is not reused after)
        model.model.embed_tokens.to("cpu")
        for i in range(first):
            if quant:
                model.model.layers[i] = torch.nn.Identity()
            else:
                model.model.layers[i].to("cpu")
        torch.cuda.empty_cache()
    from wmdp_fast.cache import ActivationCache

    cache = ActivationCache(stored, list(range(steps)), list(range(steps, 2 * steps)), "bench")
    layers = list(model.model.layers[first : cfg.layer_id + 1])
    times, losses = [], []
    try:
        if fused_layers and not fuse_decoder_layers(layers):
            raise RuntimeError("--fused-layers: no RMSNorm or SwiGLU MLP recognised")
        pin = storage.type == "cpu" and device.type == "cuda"
        targets, parts, reason = prepare_replay(
            layers, cache, range(steps, 2 * steps), device, cvs[0].dtype, storage, pin, split=split
        )
        if split and parts is None:
            raise RuntimeError(f"the layer-first cache does not apply: {reason}")
        if parts is not None:
            cache = dataclasses.replace(cache, entries=[parts[e] for e in range(2 * steps)])
        sync(device)
        prep_s = time.perf_counter() - t0
        trainer = _Trainer(model, cfg, first, cvs, device)
        if fused_adamw is not None:
            trainer.opt.fused = fused_adamw
        loader = _Loader(cache, targets, device, cvs[0].dtype)
        for idx in range(steps):
            t0 = time.perf_counter()
            fb, rb, tgt = loader.get(idx, steps)
            tot, *_ = trainer.step(idx, fb, rb, tgt)
            sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(tot.item())
    finally:
        unfuse_decoder_layers(layers)
    return times, losses, prep_s


def summarize(times, warmup):
    t = times[warmup:] or times
    return (
        statistics.median(t),
        (statistics.quantiles(t, n=5)[0] if len(t) > 4 else min(t)),
        (statistics.quantiles(t, n=5)[-1] if len(t) > 4 else max(t)),
    )


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def end_to_end(arch, cfg, args, device, dtype):
    """run_rmu from a checkpoint on disk vs the published script's load x2 + loop + save. What
    it writes under --workdir (for Zephyr-7B: the 14.5 GB checkpoint, and one 14.5 GB output
    at a time: each run_rmu output, a full copy since untouched shards are no longer
    hard-linked, is deleted once timed, before the next) is removed afterwards, also when the
    run fails or is stopped by SIGTERM (`timeout`): a rerun on the same machine would
    otherwise find the disk full (the GPU machine has 64 GB)."""
    root = Path(tempfile.mkdtemp(prefix="bench_rmu_", dir=args.workdir))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _end_to_end(root, arch, cfg, args, device, dtype)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(root, ignore_errors=True)


def _end_to_end(root: Path, arch, cfg, args, device, dtype):
    from bench_eval import load_bench_tokenizer
    from transformers import AutoModelForCausalLM

    from wmdp_fast.rmu import run_rmu

    ckpt = root / "model"
    model = build_model(arch, device, dtype)
    # sharded like HuggingFaceH4/zephyr-7b-beta on the hub (8 files of ~1.9 GB), not in
    # transformers 5's default single 50GB-limit shard: run_rmu rewrites only the shards holding
    # trained tensors (copied, then those bytes patched), so the layout is part of its timing
    model.save_pretrained(str(ckpt), max_shard_size="2GB")
    # the GPU image has no mistral_common (and maybe no sentencepiece): bench_eval's loader
    # reads the saved tokenizer.json there
    tok = load_bench_tokenizer(None)
    tok.save_pretrained(str(ckpt))
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(3)
    corpus = root / "corpora"
    corpus.mkdir()
    # whole-word pieces ("▁the" -> "the"), so that a document of n words is about n tokens
    pieces = tok.convert_ids_to_tokens(list(range(3, 32000)))
    words = [p[1:] for p in pieces if p.startswith("\u2581") and p[1:].isalpha()][:4000]
    for name in ("bio-forget-corpus", "cyber-forget-corpus", "wikitext"):
        with open(corpus / f"{name}.jsonl", "w") as fh:
            for _ in range(args.steps * args.batch_size):
                ids = torch.randint(0, len(words), (args.seq_len,), generator=g).tolist()
                fh.write(json.dumps({"text": " ".join(words[i] for i in ids)}) + "\n")
    rcfg = RMUConfig(
        model_name_or_path=str(ckpt),
        layer_id=cfg.layer_id,
        layer_ids=cfg.layer_ids,
        param_ids=cfg.param_ids,
        max_num_batches=args.steps,
        batch_size=args.batch_size,
        corpus_dir=str(corpus),
        output_dir=str(root / "out"),
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
    )
    t0 = time.perf_counter()
    res = run_rmu(rcfg, progress=False)
    ours = time.perf_counter() - t0
    shutil.rmtree(root / "out")  # 14.5 GB: keep one output on disk at a time
    ab = None
    if args.e2e_ab:  # the same run with the other layer-first cache setting (on if it was off)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        other = "off" if res.report["first_layer_cache"]["used"] else "on"
        rcfg_off = dataclasses.replace(
            rcfg, first_layer_cache=other, output_dir=str(root / "out_off")
        )
        t0 = time.perf_counter()
        res_off = run_rmu(rcfg_off, progress=False)
        ab = (time.perf_counter() - t0, res_off.report["timings"])
        shutil.rmtree(root / "out_off")
        same = all(torch.equal(res_off.params[k], v) for k, v in res.params.items())
        ab = (*ab, same, other)
    # the published script: two copies, the loop (timed per step above; scaled here), save.
    # It loads with device_map="auto" (straight onto the one GPU), not to the CPU and then .to()
    t0 = time.perf_counter()
    m1 = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype, device_map={"": device})
    m2 = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype, device_map={"": device})
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m1.save_pretrained(str(root / "published_out"))
    save_s = time.perf_counter() - t0
    del m1, m2
    used = res.report["first_layer_cache"]["used"]
    return ours, load_s, save_s, res.report["timings"], used, ab


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", choices=sorted(ARCHS), default=None, help="default: small on CPU")
    p.add_argument("--steps", type=int, default=None, help="default 20 (CUDA) / 8 (CPU)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default 512 (CUDA) / 128 (CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-4bit", action="store_true", help="skip the --load-in-4bit measurement")
    p.add_argument(
        "--no-ab",
        action="store_true",
        help="skip the A/B rows (cache off, fused paths): e.g. with --end-to-end, where "
        "bench-rmu has measured them",
    )
    p.add_argument(
        "--end-to-end",
        action="store_true",
        help="also time run_rmu from disk (writes the model to --workdir)",
    )
    p.add_argument(
        "--e2e-ab",
        action="store_true",
        help="with --end-to-end, also time run_rmu with the other --first-layer-cache setting "
        "(on where the default left it off, off where it used it)",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    arch = args.arch or ("zephyr-7b" if cuda else "small")
    args.steps = args.steps or (20 if cuda else 6)
    args.seq_len = args.seq_len or (512 if cuda else 64)
    args.warmup = min(args.warmup, args.steps // 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    if arch == "zephyr-7b":
        cfg = RMUConfig(model_name_or_path="random", layer_id=7, layer_ids=[5, 6, 7], param_ids=[6])
    else:
        cfg = RMUConfig(model_name_or_path="random", layer_id=4, layer_ids=[2, 3, 4], param_ids=[6])
    torch.set_grad_enabled(True)
    warnings.filterwarnings("ignore", message="Using a target size")  # the published broadcast

    t0 = time.perf_counter()
    model = build_model(arch, device, dtype)
    build_s = time.perf_counter() - t0
    D = model.config.hidden_size
    cvs = draw_control_vectors(cfg.steering_coeffs, D, cfg.seed, device, dtype)
    enc, f_names, r_names = make_batches(args.steps, len(cvs), args.batch_size, args.seq_len)
    orig = {
        n: p.detach().to("cpu", copy=True)
        for n, p in model.named_parameters()
        if any(n == f"model.layers.{lid}.mlp.down_proj.weight" for lid in cfg.layer_ids)
    }
    print(
        f"# RMU benchmark: {arch} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
        f"{dtype}), {device}, B={args.batch_size}, T={args.seq_len}, {args.steps} steps "
        f"(built in {build_s:.1f} s)"
    )

    peak_reset(device)
    pub_times, pub_losses = published_loop(
        model, cfg, enc, f_names, r_names, cvs, device, args.steps
    )
    pub_peak = peak(device)

    # restore the original trained tensors; keep only what the engine needs on the device
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in orig:
                p.copy_(orig[n])
    model.model.layers = torch.nn.ModuleList(list(model.model.layers[: cfg.layer_id + 1]))
    model.lm_head = None
    model.model.norm = None
    storage = torch.device("cpu") if cuda else device

    def restore():
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in orig:
                    p.copy_(orig[n])
        model.zero_grad(set_to_none=True)  # the last step's gradients: not the next row's

    gib = lambda b: f"{b / 2**30:.2f} GiB" if b is not None else "n/a"  # noqa: E731
    pm, pq1, pq4 = summarize(pub_times, args.warmup)
    # rows are printed as they are measured: a failing row or the step's time limit keeps them
    print("| path | median s/step | q20 | q80 | peak GPU memory |")
    print("|---|---|---|---|---|")
    print(f"| published loop | {pm:.4f} | {pq1:.4f} | {pq4:.4f} | {gib(pub_peak)} |")
    # the defaults (the headline) first, then A/B rows against them (a failure prints an ERROR
    # row and the table goes on). run_rmu's defaults: on CUDA the cache is in pinned CPU memory
    # here, where `auto` leaves the layer-first cache off (it lost end to end on an H200), and
    # the fused AdamW step is on; on the CPU the layer-first cache is on
    peak_reset(device)
    eng_times, eng_losses, prep_s = engine_loop(
        model, cfg, enc, f_names, r_names, cvs, device, args.steps, storage, split=not cuda
    )
    eng_peak = peak(device)
    restore()
    em, eq1, eq4 = summarize(eng_times, args.warmup)
    print(f"| wmdp_fast engine | {em:.4f} | {eq1:.4f} | {eq4:.4f} | {gib(eng_peak)} |")
    if args.no_ab:
        variants = []
    elif cuda:
        variants = [
            ("engine + --first-layer-cache on (pinned CPU)", dict(split=True)),
            ("engine, eager AdamW (WMDP_FAST_FUSED_ADAMW=0)", dict(split=False, fused_adamw=False)),
            ("engine + --fused-layers on", dict(split=False, fused_layers=True)),
            ("engine + --fused-layers on + layer-first cache", dict(fused_layers=True)),
        ]
    else:
        variants = [("engine, --first-layer-cache off (plain replay)", dict(split=False))]
    if cuda and not args.no_4bit:
        # the same engine with the frozen prefix in NF4 (bf16 prefix layers freed first); last:
        # it replaces the prefix layers
        variants.append(("engine, --load-in-4bit prefix", dict(quant="4bit", split=False)))
    ab_rows = []
    for label, kw in variants:
        if kw.get("quant"):
            for i in range(min(cfg.layer_ids)):
                model.model.layers[i].to("cpu")
        peak_reset(device)
        try:
            t, losses, _ = engine_loop(
                model, cfg, enc, f_names, r_names, cvs, device, args.steps, storage, **kw
            )
        except Exception as exc:  # noqa: BLE001 - one failing row must not end the table
            traceback.print_exc()
            msg = " ".join(str(exc).split())[:160]
            print(f"| {label} | ERROR {type(exc).__name__}: {msg} | | | |")
            continue
        finally:
            restore()
        ab_rows.append((label, summarize(t, args.warmup), peak(device), losses))
        (m, q1, q4), pk = ab_rows[-1][1], ab_rows[-1][2]
        print(f"| {label} | {m:.4f} | {q1:.4f} | {q4:.4f} | {gib(pk)} |")

    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(pub_losses, eng_losses))
    print(
        f"speedup per step: {pm / em:.1f}x  (engine cache+targets: {prep_s:.2f} s for "
        f"{args.steps} steps)"
    )
    for label, (m, _, _), _, losses in ab_rows:
        rel_ab = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses, eng_losses))
        print(
            f"  {label}: {em / m:.2f}x the defaults' speed, {pm / m:.1f}x the published loop's; "
            f"loss curves max relative difference {rel_ab:.1e}"
        )
    print(
        f"loss curves: max relative difference {rel:.2e} over {args.steps} steps "
        f"(published {pub_losses[0]:.4g} -> {pub_losses[-1]:.4g}, engine {eng_losses[0]:.4g} -> {eng_losses[-1]:.4g})"
    )
    result = {
        "arch": arch,
        "device": str(device),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "published_s_per_step": pm,
        "engine_s_per_step": em,
        "ab_s_per_step": {label: m for label, (m, _, _), _, _ in ab_rows},
        "speedup": pm / em,
        "published_peak_bytes": pub_peak,
        "engine_peak_bytes": eng_peak,
        "ab_peak_bytes": {label: pk for label, _, pk, _ in ab_rows},
        "engine_prep_s": prep_s,
        "loss_max_rel_diff": rel,
    }
    for label, (m, _, _), pk, _ in ab_rows:
        if "4bit" in label:
            result.update({"engine_4bit_s_per_step": m, "engine_4bit_peak_bytes": pk})

    if args.end_to_end:
        del model
        peak_reset(device)
        ours, load_s, save_s, timings, used, ab = end_to_end(arch, cfg, args, device, dtype)
        pub_total = load_s + args.steps * pm + save_s
        rounded = lambda t: json.dumps({k: round(v, 2) for k, v in t.items()})  # noqa: E731
        print(
            f"end-to-end, {args.steps} steps: run_rmu {ours:.1f} s (layer-first cache used: {used}; "
            f"{rounded(timings)}); published load x2 {load_s:.1f} s + {args.steps} x {pm:.3f} s + "
            f"save {save_s:.1f} s = {pub_total:.1f} s; ratio {pub_total / ours:.1f}x"
        )
        result.update({"end_to_end_engine_s": ours, "end_to_end_published_s": pub_total})
        if ab is not None:
            print(
                f"end-to-end with --first-layer-cache {ab[3]} (ran second: warm imports and page "
                f"cache favour it): run_rmu {ab[0]:.1f} s ({rounded(ab[1])}); "
                f"ratio {pub_total / ab[0]:.1f}x; same trained tensors: {ab[2]}"
            )
            result.update({"end_to_end_engine_off_s": ab[0]})
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
