"""wmdp_fast.evaluate vs lm-eval's `hf` backend on the same model object and the same prompts.

    python benchmarks/bench_eval.py                                   # CPU, tiny Mistral
    python benchmarks/bench_eval.py --device cuda --arch zephyr-7b    # H100: random Zephyr-7B, bf16
    python benchmarks/bench_eval.py --device cuda --arch zephyr-7b --load-in-4bit

Prompts are synthetic WMDP-like questions (4 choices, lm-eval's WMDP template), lengths drawn
so that the mean context is about 195 tokens as in WMDP. lm-eval runs `HFLM.loglikelihood`
(tokenization + `_loglikelihood_tokens`, logits cache on) at --batch-size (default 32);
wmdp_fast runs `evaluate(...)`. Prints both times, the ratio, prediction agreement, the largest
log-likelihood difference and peak memory. The 7B model is built with random weights directly
on the GPU (from_config under a device context, bf16; nothing is saved or downloaded);
--load-in-4bit converts its decoder Linear layers to bitsandbytes NF4 in place.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from wmdp_fast.atomic import atomic_write_text

ARCHS = {
    # Zephyr-7B-beta = Mistral-7B-v0.1 architecture
    "zephyr-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "tiny": dict(
        vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
}  # fmt: skip

WORDS = (
    "protein virus gene toxin pathogen enzyme receptor vector plasmid culture strain assay "
    "buffer overflow exploit kernel socket payload shellcode heap stack register address "
    "reagent synthesis precursor solvent catalyst yield reaction compound mixture which "
    "the of and to in is that for with as by on be this are from at or an which following"
).split()


def make_docs(n: int, seed: int) -> list[dict]:
    """Synthetic WMDP-like questions: log-normal word counts (mean context ~195 tokens)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        n_words = min(1500, max(5, int(rng.lognormvariate(math.log(82), 0.75))))
        q = " ".join(rng.choice(WORDS) for _ in range(n_words)) + "?"
        ch = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(4)]
        docs.append({"question": q, "choices": ch, "answer": rng.randint(0, 3)})
    return docs


def build_model(arch: str, device: str, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(**ARCHS[arch])
    cfg.initializer_range = 0.02 if arch != "tiny" else 0.5
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def quantize_4bit_(model, compute_dtype=torch.bfloat16):
    """Replace every decoder nn.Linear by a bitsandbytes NF4 Linear4bit (weights quantized on
    the GPU); the LM head stays in bf16 as transformers' loader keeps it."""
    import bitsandbytes as bnb

    layers = model.model.layers
    for layer in layers:
        for mod in list(layer.modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=child.bias is not None,
                        compute_dtype=compute_dtype, quant_type="nf4",
                        device="meta",
                    )  # fmt: skip
                    q.weight = bnb.nn.Params4bit(
                        child.weight.data, requires_grad=False, quant_type="nf4"
                    ).to(child.weight.device)
                    if child.bias is not None:
                        q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(mod, child_name, q)
                    del child
        torch.cuda.empty_cache()
    gc.collect()
    torch.cuda.empty_cache()
    return model


def peak_mem(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated (peak)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process RSS (peak so far)"


def reset_peak(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def setup(args) -> tuple[bool, str, int, torch.dtype]:
    """(cuda, arch, n, dtype) from --device/--arch/--n/--threads, with the defaults that
    profile_eval.py shares (its numbers are about this benchmark's model and prompts). Sets the
    torch thread count: one by default on the CPU, where OpenMP barriers of preempted threads
    on a shared machine make timings swing 30x between runs."""
    cuda = args.device.startswith("cuda")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    arch = args.arch or ("zephyr-7b" if cuda else "tiny")
    n = args.n or (1500 if cuda else 96)
    return cuda, arch, n, torch.bfloat16 if cuda else torch.float32


def load_bench_tokenizer(path: str | None):
    """The Mistral/Zephyr tokenizer: --tokenizer DIR, else $WMDP_FAST_TOKENIZER_DIR, else built
    from mistral_common, else the saved copy ($WMDP_FAST_MISTRAL_TOKENIZER's folder or .gpu/tok;
    GPU boxes lack mistral_common) read from its tokenizer.json: rebuilding it from
    tokenizer.model needs sentencepiece and protobuf, and without them transformers falls back
    to a tiktoken parser that fails with a ValueError."""
    import os

    from transformers import AutoTokenizer

    path = path or os.environ.get("WMDP_FAST_TOKENIZER_DIR")
    if path:
        return AutoTokenizer.from_pretrained(path)
    try:
        import mistral_common  # noqa: F401
    except ImportError:
        env = os.environ.get("WMDP_FAST_MISTRAL_TOKENIZER")
        saved = [Path(env) if Path(env).is_dir() else Path(env).parent] if env else []
        saved.append(Path(__file__).resolve().parent.parent / ".gpu" / "tok")
        for d in saved:
            if (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(str(d))
        raise SystemExit(
            "no tokenizer: install mistral_common, or save one where this machine can read it "
            '(python -c "from wmdp_fast.testing import save_mistral_tokenizer as s; '
            "s('.gpu/tok')\") and pass --tokenizer .gpu/tok"
        ) from None
    from wmdp_fast.testing import save_mistral_tokenizer

    return save_mistral_tokenizer(tempfile.mkdtemp(prefix="bench_tok_"))


def run_lm_eval(model, tok, task, device: str, batch_size: int):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from wmdp_fast.prompts import continuations, get_protocol

    proto = get_protocol("lm-eval-current")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
    reqs = []
    for i, d in enumerate(task.docs):
        ctx = proto.context(d["question"], d["choices"], task.subject)
        for k, cont in enumerate(continuations()):
            reqs.append(Instance("loglikelihood", d, (ctx, cont), k, ("bench", i, 1)))
    sync(device)
    t = time.perf_counter()
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    sync(device)
    return time.perf_counter() - t, [o[0] for o in out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default=None, choices=sorted(ARCHS), help="default: tiny on CPU")
    p.add_argument("--n", type=int, default=None, help="questions (default 1500 GPU, 96 CPU)")
    p.add_argument("--batch-size", type=int, default=32, help="lm-eval batch size")
    p.add_argument("--batch-tokens", type=int, default=None, help="wmdp_fast budget (auto)")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--skip-lm-eval", action="store_true")
    p.add_argument(
        "--no-fused", action="store_true", help="skip the --fused-layers A/B run (CUDA only)"
    )
    p.add_argument(
        "--fused-ab",
        action="store_true",
        help="run the --fused-layers A/B on the CPU too (there the fused modules run their "
        "reference code: for testing this script, not for timing)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each (median reported)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default 1 on the CPU)"
    )
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument(
        "--tokenizer", help="tokenizer dir (default: the Mistral tokenizer from mistral_common)"
    )
    p.add_argument(
        "--sweep", help="also time wmdp_fast at these --batch-tokens values, e.g. 8192,16384,65536"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from wmdp_fast.data import MCQTask
    from wmdp_fast.evaluate import evaluate

    cuda, arch, n, dtype = setup(args)
    if args.load_in_4bit and not cuda:
        p.error("--load-in-4bit needs --device cuda")
    tok = load_bench_tokenizer(args.tokenizer)
    t = time.perf_counter()
    model = build_model(arch, args.device, dtype, args.seed)
    if args.load_in_4bit:
        model = quantize_4bit_(model)
    sync(args.device)
    t_build = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    task = MCQTask("bench_wmdp", "biology", "synthetic", make_docs(n, args.seed))

    # warm-up both paths on a few questions (CUDA context, cuBLAS handles, allocator)
    warm = MCQTask("warm", "biology", "synthetic", task.docs[:16])
    evaluate(model, tok, [warm], progress=False, batch_tokens=args.batch_tokens)

    def time_ours(bt=args.batch_tokens, fused=False):
        reset_peak(args.device)
        sync(args.device)
        t = time.perf_counter()
        res = evaluate(
            model,
            tok,
            [task],
            log_samples=True,
            progress=False,
            batch_tokens=bt,
            fused_layers=fused,
        )
        sync(args.device)
        return time.perf_counter() - t, res, peak_mem(args.device)

    from wmdp_fast.prompts import get_protocol

    proto = get_protocol("lm-eval-current")
    enc = tok([proto.context(d["question"], d["choices"], "biology") for d in task.docs])
    ctx_lens = [len(x) for x in enc["input_ids"]]
    report = {
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"cpu ({torch.get_num_threads()} threads)",
        "arch": arch,
        "dtype": str(dtype).replace("torch.", "") + (" + nf4 4-bit" if args.load_in_4bit else ""),
        "questions": n,
        "mean_context_tokens": round(sum(ctx_lens) / n, 1),
        "max_context_tokens": max(ctx_lens),
        "weights_GiB": round(weights, 2),
        "model_build_s": round(t_build, 2),
    }
    # first wmdp_fast run before lm-eval ever ran: on the CPU peak RSS is process-wide
    t_ours, res, mem_ours = time_ours()
    ours_t, lm_t = [t_ours], []
    if not args.skip_lm_eval:
        run_lm_eval(model, tok, warm, args.device, args.batch_size)  # warm-up
    # alternate the two engines so that load on a shared machine hits both alike
    for r in range(args.repeat):
        if r > 0:
            t_ours, res, mem = time_ours()
            ours_t.append(t_ours)
            mem_ours = mem if cuda else mem_ours
        if not args.skip_lm_eval:
            reset_peak(args.device)
            t_lm, lm_ll = run_lm_eval(model, tok, task, args.device, args.batch_size)
            mem_lm = peak_mem(args.device)
            lm_t.append(t_lm)
    ours_ll = [x for s in res["samples"] for x in s["loglikelihoods"]]
    ours_pred = [s["pred"] for s in res["samples"]]
    t_ours = statistics.median(ours_t)
    report["wmdp_fast_s"] = round(t_ours, 3)
    if args.repeat > 1:
        report["wmdp_fast_runs_s"] = [round(x, 3) for x in ours_t]
    report["wmdp_fast_peak_mem"] = mem_ours
    if args.sweep:
        report["wmdp_fast_sweep"] = {
            bt: (lambda r: f"{r[0]:.3f}s, {r[2]}")(time_ours(bt))
            for bt in [int(x) for x in args.sweep.split(",")]
        }
    if not args.skip_lm_eval:
        t_lm = statistics.median(lm_t)
        lm_pred = [max(range(4), key=lambda i: (lm_ll[4 * q + i], -i)) for q in range(n)]
        agree = sum(a == b for a, b in zip(ours_pred, lm_pred)) / n
        report["lm_eval_s"] = round(t_lm, 3)
        if args.repeat > 1:
            report["lm_eval_runs_s"] = [round(x, 3) for x in lm_t]
        report.update(
            {
                "lm_eval_batch_size": args.batch_size,
                "lm_eval_peak_mem": mem_lm,
                "speedup": round(t_lm / t_ours, 2),
                "prediction_agreement": agree,
                "max_abs_loglik_diff": max(abs(a - b) for a, b in zip(ours_ll, lm_ll)),
            }
        )
    # printed before the fused A/B, so that a failure or the step's time limit there (the
    # fused kernels have not run in this engine on a GPU before) keeps the main comparison
    emit(report)
    save_json(report, args.json)
    if (cuda or args.fused_ab) and not args.no_fused:
        fused = {}
        try:
            # A/B: --fused-layers (fused RMSNorm/SwiGLU; off by default for lm-eval parity)
            evaluate(model, tok, [warm], progress=False, fused_layers=True)  # Triton compile
            t_f, res_f, mem_f = time_ours(fused=True)
            fused_pred = [s["pred"] for s in res_f["samples"]]
            fused_ll = [x for s in res_f["samples"] for x in s["loglikelihoods"]]
            fused["wmdp_fast_fused_layers_s"] = round(t_f, 3)
            fused["fused_layers_peak_mem"] = mem_f
            fused["fused_vs_eager_max_abs_loglik_diff"] = max(
                abs(a - b) for a, b in zip(fused_ll, ours_ll)
            )
            if not args.skip_lm_eval:
                fused["fused_layers_speedup"] = round(t_lm / t_f, 2)
                fused["fused_layers_prediction_agreement"] = (
                    sum(a == b for a, b in zip(fused_pred, lm_pred)) / n
                )
        except Exception as exc:  # reported as a row; the rest stays valid
            fused["fused_layers_error"] = f"{type(exc).__name__}: {exc}"
        report.update(fused)
        emit(fused)
        save_json(report, args.json)
    return 0


def emit(rows: dict) -> None:
    """Prints rows as `key: value` lines."""
    for k, v in rows.items():
        print(f"{k:>22}: {v}", flush=True)


def save_json(report: dict, path: str | None) -> None:
    """The whole report as JSON at `path` (if given), written atomically."""
    if path:
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
