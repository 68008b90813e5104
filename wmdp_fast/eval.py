"""CLI: python -m wmdp_fast.eval -- WMDP/MMLU accuracy as lm-evaluation-harness computes it.

    python -m wmdp_fast.eval --model HuggingFaceH4/zephyr-7b-beta --tasks wmdp,mmlu \\
        --output results.json --log-samples samples.jsonl
    python -m wmdp_fast.eval --model ./ckpt --tasks wmdp --data-dir ./mirror --protocol lm-eval-0.4.2
    python -m wmdp_fast.eval            # the embedded demo model on the demo tasks, offline

Thin: parse, load (data first, so bad data fails before the model loads), call
`wmdp_fast.evaluate.evaluate`, print the table, write files atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from pathlib import Path

from wmdp_fast.atomic import atomic_path
from wmdp_fast.errors import ConfigError, ModelError, run_cli
from wmdp_fast.prompts import DEFAULT_PROTOCOL, PROTOCOLS

log = logging.getLogger("wmdp_fast")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def limit_arg(text: str) -> float:
    """--limit as lm-eval reads it: a count (>= 1) or a fraction of each task (0 < x < 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a count >= 1 or a fraction in (0, 1), got {text}"
        )
    return int(v) if v >= 1 else v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wmdp_fast.eval",
        description="Multiple-choice accuracy (WMDP, MMLU) with lm-evaluation-harness parity.",
    )
    p.add_argument(
        "--model",
        help="hub name or local directory of a causal LM (omitted: the embedded demo model)",
    )
    p.add_argument(
        "--tasks",
        help="comma-separated tasks/groups: wmdp, mmlu (also reports mmlu_stem, mmlu_other, "
        "mmlu_social_sciences, mmlu_humanities), mmlu_paper, wmdp_bio, mmlu_<subject>, "
        "demo_forget, demo_retain (default: wmdp; the demo tasks when --model is omitted)",
    )
    p.add_argument("--data-dir", help="local mirror of the hub data (wmdp-bio.jsonl, mmlu/...)")
    p.add_argument(
        "--protocol",
        default=DEFAULT_PROTOCOL,
        choices=sorted(PROTOCOLS),
        help="prompt/BOS protocol: lm-eval-current (0.4.13, default) or lm-eval-0.4.2 (paper)",
    )
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), bf16, ...")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 4-bit (bitsandbytes)")
    p.add_argument("--load-in-8bit", action="store_true", help="LLM.int8 8-bit (bitsandbytes)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument(
        "--limit",
        type=limit_arg,
        help="first N questions of each task; below 1, that fraction of each (as lm-eval)",
    )
    p.add_argument(
        "--batch-tokens", type=_positive_int, help="tokens per batch (default: from free memory)"
    )
    p.add_argument(
        "--max-length",
        type=_positive_int,
        help="context length for left truncation (default: lm-eval's rule from the config)",
    )
    p.add_argument(
        "--fused-layers",
        action="store_true",
        help="RMSNorm and SwiGLU MLPs (Llama/Mistral/Qwen2 style) as fused Triton kernels on "
        "CUDA: faster, but bf16 log-likelihoods may differ from lm-eval's in the last bit",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow hub model code")
    p.add_argument("--output", help="write results JSON here")
    p.add_argument("--log-samples", help="write one JSON line per question here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    return p


def _check_output_paths(paths: list[tuple[str, str]]) -> None:
    """Each (flag, path) must be a file name in a folder where files can be created, and no two
    the same file: checked before any work, not found out after the whole evaluation."""
    seen: dict[Path, str] = {}
    for flag, path in paths:
        target = Path(path)
        if not target.resolve().parent.is_dir():
            raise ConfigError(f"{flag} {path}: folder {target.parent} does not exist")
        if target.is_dir():
            raise ConfigError(f"{flag} {path}: is a folder; give a file name inside it")
        if target.resolve() in seen:
            raise ConfigError(f"{flag} {path}: the same file as {seen[target.resolve()]}")
        seen[target.resolve()] = flag
        try:  # a read-only mount or a folder without write permission (even for root, /proc)
            with tempfile.TemporaryFile(dir=target.resolve().parent):
                pass
        except OSError as exc:
            raise ConfigError(
                f"{flag} {path}: cannot write in folder {target.parent} ({exc.strerror or exc})"
            ) from exc


def _write_outputs(files: list[tuple[str, str, str]]) -> None:
    """Write each (flag, path, text) to a temporary sibling; only once all are written are
    they renamed into place, the last first (so the results file, given first, is renamed
    last). A failed write replaces no file: never new samples beside old results."""
    with contextlib.ExitStack() as stack:
        for flag, path, text in files:
            try:
                tmp = stack.enter_context(atomic_path(path))
                tmp.write_text(text, encoding="utf-8", newline="\n")
            except OSError as exc:
                raise ConfigError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from exc


def _fmt(x) -> str:
    return "N/A" if x is None else f"{x:.4f}"


def format_table(res: dict) -> str:
    """A markdown table like lm-eval's summary (tasks, then groups)."""
    proto = res["protocol"]
    lines = [
        f"{res['model']} ({res['dtype']}), protocol {proto}, {res['seconds']:.1f}s",
        "",
        "|Tasks|n|Metric| |Value| |Stderr|",
        "|-----|-:|------|-|----:|-|-----:|",
    ]
    for name, r in res["results"].items():
        lines.append(f"|{name}|{r['n']}|acc|↑|{_fmt(r['acc'])}|±|{_fmt(r['acc_stderr'])}|")
    if res["groups"]:
        lines += ["", "|Groups|n|Metric| |Value| |Stderr|", "|------|-:|------|-|----:|-|-----:|"]
        for name, r in res["groups"].items():
            lines.append(f"|{name}|{r['n']}|acc|↑|{_fmt(r['acc'])}|±|{_fmt(r['acc_stderr'])}|")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    from wmdp_fast.data import DEMO_TASKS, load_tasks
    from wmdp_fast.evaluate import evaluate
    from wmdp_fast.models import check_model_path, load_model, load_tokenizer, resolve_device

    model_path = args.model
    tasks = args.tasks
    if model_path is None:
        from wmdp_fast import demo

        model_path = str(demo.demo_model_dir())
        if not (Path(model_path) / "config.json").is_file():
            raise ModelError(
                f"the embedded demo model is missing ({model_path}); pass --model, or build it "
                "with python -m wmdp_fast.demo.train"
            )
        tasks = tasks or ",".join(DEMO_TASKS)
    else:
        model_path = check_model_path(model_path)  # a missing folder fails before data loading
    tasks = tasks or "wmdp"
    if args.load_in_4bit and args.load_in_8bit:
        raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other")

    outputs = (("--output", args.output), ("--log-samples", args.log_samples))
    _check_output_paths([(flag, path) for flag, path in outputs if path])
    task_objs, groups = load_tasks(tasks, args.data_dir, args.limit)  # validates all data first
    device = resolve_device(args.device)
    log.info("loading %s", model_path)
    progress = not args.no_progress
    tokenizer = load_tokenizer(
        model_path, trust_remote_code=args.trust_remote_code, progress=progress
    )
    model = load_model(
        model_path,
        dtype=args.dtype,
        device=device,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        trust_remote_code=args.trust_remote_code,
        progress=progress,
    )
    res = evaluate(
        model,
        tokenizer,
        task_objs,
        groups=groups,
        protocol=args.protocol,
        batch_tokens=args.batch_tokens,
        max_length=args.max_length,
        log_samples=bool(args.log_samples),
        progress=progress,
        model_name=args.model or "wmdp_fast-demo",
        fused_layers=args.fused_layers,
    )
    res["quantization"] = "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None
    res["limit"] = args.limit
    samples = res.pop("samples", None)
    # samples renamed into place first: a results file, once there, means the run's samples
    # were written too
    files = []
    if args.output:
        files.append(("--output", args.output, json.dumps(res, indent=2) + "\n"))
    if args.log_samples:
        text = "".join(json.dumps(s) + "\n" for s in samples or [])
        files.append(("--log-samples", args.log_samples, text))
    _write_outputs(files)
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )

    def body() -> int:
        print(format_table(run(args)))
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
