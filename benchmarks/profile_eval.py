"""Where wmdp_fast.evaluate's time goes, phase by phase, on bench_eval.py's model and prompts.

    python benchmarks/profile_eval.py                  # CPU, tiny Mistral: checks the script
    python benchmarks/profile_eval.py --device cuda    # random Zephyr-7B, bf16: ~45 s on an H200

Phases, each printed as soon as it is measured (later ones are skipped, and say so, once
--time-limit seconds have passed since the start):
1. tokenize: `build_requests` (what evaluate() runs: batched fast-tokenizer calls) and, for
   comparison, lm-eval's per-request `_encode_pair` (2 encodes per request, one at a time).
2. padding: batches and padded tokens of the engine's plan (`plan_batches`) and of the old
   fill-to-budget rule, at several budgets (CPU arithmetic on the real token lengths).
3. engine: `score_sequences` (the real engine code) at the budget given (default: the automatic
   one), instrumented with CUDA events in hooks: host prep before each batch's first kernel,
   decoder body, LM head + gather, the wait for results, and the GPU's idle time between
   batches; tokens/s and TFLOP/s of the body on real and on padded tokens. Then the same with
   the old fill-to-budget plan (A/B), and optionally with --fused-layers and other budgets.
4. sweep: the decoder body alone on [B, T] batches of the mean length: tokens/s vs batch
   tokens (how large a batch must be for the matmuls to run at speed).
5. kernels: torch.profiler over one body forward: device time by kind (matmul, attention,
   memory-bound elementwise/norm/rotary, copies).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_eval  # noqa: E402

from wmdp_fast.atomic import atomic_write_text  # noqa: E402

T_START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T_START


def body_flops_per_token(cfg) -> float:
    """2 x the decoder body's matmul weights (no embedding, no LM head; attention scores are
    left out: ~2% at 200 tokens)."""
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return 2.0 * n * (h * q + 2 * h * kv + q * h + 3 * h * i)


def greedy_plan(lengths: list[int], budget: int) -> list[int]:
    """The engine's old rule: fill each batch up to budget // (its longest row) rows."""
    sizes, i = [], 0
    while i < len(lengths):
        n = min(len(lengths) - i, max(1, budget // lengths[i]))
        sizes.append(n)
        i += n
    return sizes


def padded_tokens(lengths: list[int], sizes: list[int]) -> int:
    out, i = 0, 0
    for n in sizes:
        out, i = out + n * lengths[i], i + n
    return out


class Clock:
    """A point on the device timeline (CUDA event) and on the host clock."""

    def __init__(self, cuda: bool):
        self.host = time.perf_counter()
        self.ev = None
        if cuda:
            self.ev = torch.cuda.Event(enable_timing=True)
            self.ev.record()

    def to(self, other: Clock) -> float:
        """Device seconds from self to other (host seconds on the CPU)."""
        if self.ev is not None:
            return self.ev.elapsed_time(other.ev) / 1e3
        return other.host - self.host


def run_engine(model, seqs, requests, budget, cuda, plan=None, fused=False) -> dict:
    """score_sequences with hooks; `plan` replaces evaluate.plan_batches for this run."""
    import wmdp_fast.evaluate as ev
    from wmdp_fast import ops

    batches: list[dict] = []
    cur: dict = {}
    real_score, real_gather, real_plan = ev._score_batch, ops.gather_logprobs, ev.plan_batches

    def score_batch(scorer, seqs_, requests_, by_seq, batch, *rest):
        cur.clear()
        cur["t0"] = time.perf_counter()
        cur["rows"], cur["T"] = len(batch), len(seqs_[batch[0]])
        cur["real"] = sum(len(seqs_[s]) for s in batch)
        real_score(scorer, seqs_, requests_, by_seq, batch, *rest)
        cur["t_end"] = time.perf_counter()
        batches.append(dict(cur))

    def gather(*a, **k):
        out = real_gather(*a, **k)
        if cur:
            cur["gather_end"] = Clock(cuda)
        return out

    def pre(name):
        def hook(mod, args):
            if cur and f"{name}0" not in cur:
                cur[f"{name}0"] = Clock(cuda)

        return hook

    def post(name):
        def hook(mod, args, out):
            if cur and f"{name}0" in cur:
                cur[f"{name}1"] = Clock(cuda)

        return hook

    hooks = [
        model.model.register_forward_pre_hook(pre("body")),
        model.model.register_forward_hook(post("body")),
        model.lm_head.register_forward_pre_hook(pre("head")),
    ]
    ev._score_batch, ops.gather_logprobs = score_batch, gather
    if plan is not None:
        ev.plan_batches = plan
    try:
        if fused:
            from wmdp_fast.fused_layers import fuse_decoder_layers

            fuse_decoder_layers(model)
        bench_eval.sync("cuda" if cuda else "cpu")
        start = Clock(cuda)
        ev.score_sequences(model, seqs, requests, batch_tokens=budget, progress=False)
        end = Clock(cuda)
        bench_eval.sync("cuda" if cuda else "cpu")
    finally:
        for h in hooks:
            h.remove()
        ev._score_batch, ops.gather_logprobs, ev.plan_batches = real_score, real_gather, real_plan
        if fused:
            from wmdp_fast.fused_layers import fused_modules, unfuse_decoder_layers

            unfuse_decoder_layers([model.get_submodule(n) for n in fused_modules(model)])
    wall = end.host - start.host
    body = sum(b["body0"].to(b["body1"]) for b in batches)
    head = sum(b["head0"].to(b["gather_end"]) for b in batches)
    gaps = [a["gather_end"].to(b["body0"]) for a, b in zip(batches, batches[1:])]
    real = sum(b["real"] for b in batches)
    padded = sum(b["rows"] * b["T"] for b in batches)
    return {
        "batches": len(batches),
        "wall_s": wall,
        "before_first_batch_s": start.to(batches[0]["body0"]) if batches else 0.0,
        "host_prep_s": sum(b["body0"].host - b["t0"] for b in batches),
        "body_s": body,
        "head_gather_s": head,
        "wait_results_s": sum(b["t_end"] - b["gather_end"].host for b in batches),
        "idle_between_batches_s": sum(gaps),
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_pct": 100.0 * (padded - real) / max(1, padded),
        "tokens_per_s": real / wall,
        "body_tokens_per_s_padded": padded / max(body, 1e-9),
    }


def fmt_engine(name: str, r: dict, flops: float) -> str:
    return (
        f"{name}: wall {r['wall_s']:.2f}s | {r['batches']} batches, {r['real_tokens']} tokens "
        f"+ {r['padding_pct']:.1f}% padding | before 1st batch {r['before_first_batch_s']:.3f}s, "
        f"host prep {r['host_prep_s']:.3f}s, body {r['body_s']:.2f}s, head+gather "
        f"{r['head_gather_s']:.3f}s, GPU idle between batches {r['idle_between_batches_s']:.3f}s"
        f" | {r['tokens_per_s']:.0f} tok/s | body {flops * r['body_tokens_per_s_padded'] / 1e12:.3g}"
        f" TFLOP/s on padded, {flops * r['real_tokens'] / r['wall_s'] / 1e12:.3g} TFLOP/s "
        f"end-to-end on real tokens"
    )


KINDS = [  # first match wins: attention first (the mem-efficient kernel's name says cutlass)
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm\d\d_|aten::(mm|addmm|bmm|matmul|linear)", re.I)),
    ("copy", re.compile(r"copy|cat|contiguous|memcpy|memset|fill", re.I)),
]  # fmt: skip


def kernel_breakdown(model, rows: int, T: int, cuda: bool) -> dict:
    """Device (CUDA) or self CPU time of one body forward, by kind of kernel/op."""
    from torch.profiler import ProfilerActivity, profile

    dev = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (rows, T), device=dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        model.model(input_ids=ids, use_cache=False)
        bench_eval.sync(str(dev))
        with profile(activities=acts) as prof:
            model.model(input_ids=ids, use_cache=False)
            bench_eval.sync(str(dev))
    totals: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for e in prof.key_averages():
        if cuda:
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
            if getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
                continue
        else:
            if not e.key.startswith("aten::") or e.key in ("aten::empty", "aten::view"):
                continue
            t = e.self_cpu_time_total
        if t <= 0:
            continue
        kind = next((k for k, rx in KINDS if rx.search(e.key)), "elementwise/norm/rotary/other")
        totals[kind] = totals.get(kind, 0.0) + t / 1e6
        top.append((t / 1e6, e.key[:70]))
    top.sort(reverse=True)
    return {"by_kind_s": totals, "top": top[:8]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default=None, choices=sorted(bench_eval.ARCHS))
    p.add_argument("--n", type=int, default=None, help="questions (default 1500 GPU, 96 CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--tokenizer", help="tokenizer dir (as bench_eval.py)")
    p.add_argument("--batch-tokens", type=int, default=None, help="engine budget (default auto)")
    p.add_argument(
        "--budgets",
        default="4096,8192,16384,32768,65536",
        help="padding table and body sweep: batch-token budgets",
    )
    p.add_argument("--engine-budgets", default="", help="also run the engine at these budgets")
    p.add_argument("--no-ab", action="store_true", help="skip the old-plan A/B engine run")
    p.add_argument("--fused", action="store_true", help="also run the engine with --fused-layers")
    p.add_argument("--no-lm-eval-tok", action="store_true", help="skip lm-eval-style tokenizing")
    p.add_argument("--time-limit", type=float, default=55.0, help="skip phases after this (s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU: 1)")
    p.add_argument("--json", help="also write every number here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from wmdp_fast.data import MCQTask
    from wmdp_fast.evaluate import (
        auto_batch_tokens,
        build_requests,
        evaluate,
        model_max_length,
        plan_batches,
    )
    from wmdp_fast.prompts import continuations, get_protocol

    cuda, arch, n, dtype = bench_eval.setup(args)
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "arch": arch}

    def out(key, value, line=None):
        report[key] = value
        print(line if line is not None else f"{key}: {value}", flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=2, default=str) + "\n")

    def time_left(need: float, what: str) -> bool:
        if elapsed() + need > args.time_limit:
            out(f"skipped_{what}", f"at {elapsed():.0f}s (limit {args.time_limit:.0f}s)")
            return False
        return True

    tok = bench_eval.load_bench_tokenizer(args.tokenizer)
    model = bench_eval.build_model(arch, args.device, dtype, args.seed)
    if args.load_in_4bit:
        model = bench_eval.quantize_4bit_(model)
    flops = body_flops_per_token(model.config)
    docs = bench_eval.make_docs(n, args.seed)
    task = MCQTask("bench_wmdp", "biology", "synthetic", docs)
    warm = MCQTask("warm", "biology", "synthetic", docs[:16])
    evaluate(model, tok, [warm], progress=False, batch_tokens=args.batch_tokens)
    out("setup_s", round(elapsed(), 2))

    # 1. tokenization
    L, mtype = model_max_length(model, tok), model.config.model_type
    t = time.perf_counter()
    seqs, requests, _ = build_requests([task], tok, "lm-eval-current", L, mtype)
    out("tokenize_engine_s", round(time.perf_counter() - t, 3),
        f"tokenize (engine, batched {type(tok).__name__}): {time.perf_counter() - t:.3f}s "
        f"for {n} questions ({len(requests)} requests)")  # fmt: skip
    if not args.no_lm_eval_tok and time_left(5, "lm_eval_tokenize"):
        proto = get_protocol("lm-eval-current")
        ctxs = [proto.context(d["question"], d["choices"], task.subject) for d in docs]
        t = time.perf_counter()
        for c in ctxs:
            for k in continuations():
                tok.encode(c + k)
                tok.encode(c)
        out("tokenize_lm_eval_style_s", round(time.perf_counter() - t, 3),
            f"tokenize (lm-eval style, 2 encodes per request, one at a time): "
            f"{time.perf_counter() - t:.3f}s")  # fmt: skip

    # 2. padding: same lengths, both plans
    lengths = sorted((len(s) for s in seqs), reverse=True)
    real = sum(lengths)
    auto = args.batch_tokens or auto_batch_tokens(model, next(model.parameters()).device)
    out("real_tokens", real, f"{len(seqs)} sequences, {real} tokens, mean {real / len(seqs):.1f}, "
        f"max {lengths[0]}; engine budget {auto}{'' if args.batch_tokens else ' (auto)'}")  # fmt: skip
    budgets = sorted({int(b) for b in args.budgets.split(",") if b} | {auto})
    table = {}
    for b in budgets:
        row = {}
        for name, plan in (("plan", plan_batches), ("fill", greedy_plan)):
            sizes = plan(lengths, b)
            pt = padded_tokens(lengths, sizes)
            row[name] = {"batches": len(sizes), "padding_pct": round(100 * (pt - real) / pt, 1)}
        table[b] = row
        print(f"  budget {b:6d}: engine plan {row['plan']['batches']:4d} batches, "
              f"{row['plan']['padding_pct']:5.1f}% padding | old fill-to-budget "
              f"{row['fill']['batches']:4d} batches, {row['fill']['padding_pct']:5.1f}% padding",
              flush=True)  # fmt: skip
    out("padding_table", table, "")

    # 3. the engine, instrumented: the new plan, then the old one (A/B)
    last = [None]

    def engine(name, b, plan=None, fused=False):
        if last[0] is not None and not time_left(last[0] * 1.1, name):
            return
        try:
            if fused:  # Triton compile outside the timed run
                evaluate(model, tok, [warm], progress=False, fused_layers=True)
            t = time.perf_counter()
            r = run_engine(model, seqs, requests, b, cuda, plan=plan, fused=fused)
            last[0] = time.perf_counter() - t
            out(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
                fmt_engine(f"{name} (budget {b})", r, flops))  # fmt: skip
        except Exception as exc:  # a row, not the end of the run
            out(f"{name}_error", f"{type(exc).__name__}: {exc}")

    engine("engine", auto)
    if not args.no_ab:
        engine("engine_old_fill_plan", auto, plan=greedy_plan)

    # 4. body throughput vs batch tokens, at the mean length
    T = max(8, round(real / len(seqs)))
    dev = next(model.parameters()).device
    sweep = {}
    try:
        with torch.inference_mode():
            for b in budgets:
                rows = max(1, b // T)
                if not time_left(3 * rows * T * flops / 4e14 + 0.5 if cuda else 0.5, f"sweep_{b}"):
                    break
                ids = torch.randint(3, model.config.vocab_size, (rows, T), device=dev)
                model.model(input_ids=ids, use_cache=False)  # warm-up of this shape
                reps = max(1, 16384 // (rows * T)) if cuda else 1
                bench_eval.sync(args.device)
                t = time.perf_counter()
                for _ in range(reps):
                    model.model(input_ids=ids, use_cache=False)
                bench_eval.sync(args.device)
                dt = (time.perf_counter() - t) / reps
                sweep[b] = {"rows": rows, "T": T, "s": round(dt, 4), "tokens_per_s": round(rows * T / dt),
                            "tflops": round(flops * rows * T / dt / 1e12, 3)}  # fmt: skip
                print(f"  body [{rows} x {T}] = {rows * T} tokens: {dt * 1e3:.1f} ms, "
                      f"{rows * T / dt:.0f} tok/s, {flops * rows * T / dt / 1e12:.3g} TFLOP/s",
                      flush=True)  # fmt: skip
                del ids
    except Exception as exc:
        out("body_sweep_error", f"{type(exc).__name__}: {exc}")
    out("body_sweep", sweep, "")

    # 5. kernel breakdown of one body forward (~16k tokens on a GPU)
    rows = max(1, (16384 if cuda else 1024) // T)
    if time_left(3 * rows * T * flops / 4e14 + 3 if cuda else 3, "kernels"):
        try:
            kb = kernel_breakdown(model, rows, T, cuda)
            tot = sum(kb["by_kind_s"].values()) or 1.0
            line = ", ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / tot:.0f}%)" for k, v in
                             sorted(kb["by_kind_s"].items(), key=lambda kv: -kv[1]))  # fmt: skip
            out("kernels", kb, f"kernels, one body forward [{rows} x {T}]: {line}")
            for t_s, key in kb["top"]:
                print(f"    {t_s * 1e3:8.2f} ms  {key}")
        except Exception as exc:
            out("kernels_error", f"{type(exc).__name__}: {exc}")

    # 6. optional engine runs: --fused-layers, other budgets
    if args.fused:
        engine("engine_fused_layers", auto, fused=True)
    for b in [int(x) for x in args.engine_budgets.split(",") if x]:
        engine(f"engine_budget_{b}", b)
    out("total_s", round(elapsed(), 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
