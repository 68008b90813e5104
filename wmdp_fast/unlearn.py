"""CLI: python -m wmdp_fast.unlearn — RMU unlearning, the published recipe computed fast.

Flag names are those of the WMDP repository's `rmu/unlearn.py`; the defaults are the published
Zephyr-7B-beta run. Without --model_name_or_path the embedded offline demo runs (a tiny model
and an invented knowledge world): evaluation before, RMU, evaluation after, a before/after table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from wmdp_fast.errors import ConfigError, run_cli
from wmdp_fast.eval import limit_arg

# The published script's flags; their defaults (the published Zephyr-7B run) live in RMUConfig.
PUBLISHED_FLAGS = (
    "layer_id",
    "layer_ids",
    "param_ids",
    "steering_coeffs",
    "alpha",
    "lr",
    "min_len",
    "max_len",
    "batch_size",
    "max_num_batches",
    "forget_corpora",
    "retain_corpora",
    "seed",
)
DEMO_OUTPUT_DIR = "wmdp_fast_demo"


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _param_ids(s: str) -> list[int | str]:
    return [int(x) if x.isdigit() else x for x in _names(s)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wmdp_fast.unlearn",
        description=(
            "RMU unlearning (WMDP paper) with the published script's flags. Defaults are the "
            "published Zephyr-7B-beta recipe: --layer_id 7 --layer_ids 5,6,7 --param_ids 6 "
            "--steering_coeffs 6.5,6.5 --alpha 1200,1200 --lr 5e-5 --batch_size 4 "
            "--max_num_batches 150 --forget_corpora bio-forget-corpus,cyber-forget-corpus "
            "--retain_corpora wikitext,wikitext --seed 42. Without --model_name_or_path the "
            "embedded offline demo runs."
        ),
    )
    pub = p.add_argument_group("published flags (rmu/unlearn.py)")
    pub.add_argument(
        "--model_name_or_path",
        default=None,
        help="hub name or local directory (the published run: HuggingFaceH4/zephyr-7b-beta); "
        "omit to run the embedded demo",
    )
    pub.add_argument(
        "--layer_id",
        type=int,
        default=None,
        help="layer whose output is trained (default, as published: 7)",
    )
    pub.add_argument(
        "--layer_ids",
        type=_ints,
        default=None,
        help="layers to update (default, as published: 5,6,7)",
    )
    pub.add_argument(
        "--param_ids",
        type=_param_ids,
        default=None,
        help="parameter indices in list(layer.parameters()) or names such as "
        "mlp.down_proj.weight (default, as published: 6 = mlp.down_proj.weight for Mistral/Llama; "
        "9 for Qwen2)",
    )
    pub.add_argument(
        "--steering_coeffs",
        type=_floats,
        default=None,
        help="one per forget corpus (default, as published: 6.5,6.5)",
    )
    pub.add_argument(
        "--alpha",
        type=_floats,
        default=None,
        help="retain weights, one per forget corpus (default, as published: 1200,1200)",
    )
    pub.add_argument(
        "--lr", type=float, default=None, help="AdamW learning rate (default, as published: 5e-5)"
    )
    pub.add_argument(
        "--min_len",
        type=int,
        default=None,
        help="keep documents longer than this many characters (default, as published: 0)",
    )
    pub.add_argument(
        "--max_len",
        type=int,
        default=None,
        help="accepted for compatibility; unused, as in the published script (2000)",
    )
    pub.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="documents per batch (default, as published: 4)",
    )
    pub.add_argument(
        "--max_num_batches",
        type=int,
        default=None,
        help="training steps at most (default, as published: 150)",
    )
    pub.add_argument(
        "--forget_corpora",
        type=_names,
        default=None,
        help="comma-separated (default, as published: bio-forget-corpus,cyber-forget-corpus)",
    )
    pub.add_argument(
        "--retain_corpora",
        type=_names,
        default=None,
        help="comma-separated (default, as published: wikitext,wikitext)",
    )
    pub.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for the control vectors (default, as published: 42)",
    )
    pub.add_argument(
        "--output_dir",
        default=None,
        help="where the unlearned model goes (default: models/<name>_alpha-..._<date>; demo: ./wmdp_fast_demo)",
    )
    pub.add_argument(
        "--verbose",
        action="store_true",
        help="also log activation norms and cosine similarities per step",
    )

    add = p.add_argument_group("added by wmdp_fast")
    add.add_argument(
        "--corpus-dir",
        dest="corpus_dir",
        default=None,
        help="offline corpora DIR/<name>.jsonl, one document per line (wikitext: the "
        'wikitext-2-raw-v1 test lines as {"text": ...} in DIR/wikitext.jsonl if present, else '
        "the hub); non-wikitext corpora are read from ./data like the published script when "
        "omitted",
    )
    add.add_argument(
        "--corpus-mode",
        dest="corpus_mode",
        choices=("exact", "clean"),
        default=None,
        help="exact (default): non-bio corpora use the raw line as text (published quirk); "
        "clean: parse JSON text",
    )
    add.add_argument(
        "--control-vectors",
        dest="control_vectors",
        default=None,
        help="safetensors file with a float32 tensor control_vectors [K, hidden_size], used instead of drawing them",
    )
    add.add_argument(
        "--control-vector-rng",
        dest="control_vector_rng",
        choices=("device", "cpu"),
        default=None,
        help="where the control vectors are drawn: device (default, as published: torch.rand on "
        "the model's device, so a CPU and a CUDA run with the same --seed draw different "
        "vectors) or cpu (the same vectors on every device; the demo's default)",
    )
    add.add_argument(
        "--mask-padding",
        dest="mask_padding",
        action="store_true",
        help="leave padding positions out of both MSEs (the published loss includes them)",
    )
    add.add_argument(
        "--optimizer-dtype",
        dest="optimizer_dtype",
        choices=("model", "float32"),
        default="model",
        help="AdamW states in the model dtype (published) or float32 with a float32 master copy",
    )
    add.add_argument(
        "--load-in-4bit",
        dest="load_in_4bit",
        action="store_true",
        help="quantize the frozen prefix (layers below min(layer_ids)) to NF4; the cache becomes an approximation",
    )
    add.add_argument(
        "--load-in-8bit",
        dest="load_in_8bit",
        action="store_true",
        help="quantize the frozen prefix to LLM.int8",
    )
    add.add_argument(
        "--offload",
        action="store_true",
        help="keep the prefix layers on the CPU and stream them through the GPU one at a time to build the cache (exact)",
    )
    add.add_argument(
        "--cache-dir",
        dest="cache_dir",
        default=None,
        help="keep the activation cache on disk here and reuse it when nothing that determines it changed",
    )
    add.add_argument(
        "--cache-format",
        dest="cache_format",
        choices=("bf16", "int8"),
        default="bf16",
        help="cached layer inputs in the model dtype, or int8 with a per-position scale (half the memory, approximate)",
    )
    add.add_argument(
        "--cache-device",
        dest="cache_device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the cache lives during training (auto: GPU when small, else pinned CPU memory streamed per step)",
    )
    add.add_argument(
        "--first-layer-cache",
        dest="first_layer_cache",
        choices=("auto", "on", "off"),
        default="auto",
        help="when only mlp.down_proj is trained in layer min(layer_ids) (the published param 6), "
        "cache that layer's constant part (attention, norms, gate/up) per batch and start each "
        "step at its down_proj: the same numbers bitwise, less work per step, at the cost of "
        "(hidden + intermediate size) values per token in the cache's memory "
        "(auto: on where that memory is available, but not in pinned CPU memory for a CUDA "
        "run, where it cost more end to end than it saved)",
    )
    add.add_argument(
        "--fused-layers",
        dest="fused_layers",
        choices=("auto", "on", "off"),
        default="off",
        help="run the replayed layers' RMSNorms and SwiGLU MLPs (Llama/Mistral/Qwen2 style) "
        "with wmdp_fast's fused Triton kernels: the same roundings to the model dtype, fewer "
        "memory passes (auto: on CUDA; default off: not yet measured on a GPU)",
    )
    add.add_argument(
        "--dtype",
        default="auto",
        help="model dtype: auto (on CUDA the checkpoint's own dtype, as the published "
        "torch_dtype='auto'; float32 on CPU), bf16, float16, float32",
    )
    add.add_argument(
        "--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)"
    )
    add.add_argument(
        "--eval",
        dest="eval_tasks",
        type=_names,
        default=None,
        help="score these tasks before and after (e.g. wmdp,mmlu; demo_forget,demo_retain)",
    )
    add.add_argument(
        "--eval-data-dir",
        dest="eval_data_dir",
        default=None,
        help="local mirror of the evaluation data",
    )
    add.add_argument(
        "--eval-limit",
        dest="eval_limit",
        type=limit_arg,
        default=None,
        help="first N questions per task; below 1, that fraction of each (as lm-eval)",
    )
    add.add_argument(
        "--eval-protocol",
        dest="eval_protocol",
        choices=["lm-eval-current", "lm-eval-0.4.2"],
        default="lm-eval-current",
        help="prompt protocol of --eval: lm-eval 0.4.13 (default) or 0.4.2 (the paper's)",
    )
    add.add_argument(
        "--checkpoint-every",
        dest="checkpoint_every",
        type=int,
        default=0,
        help="write a training checkpoint every N steps (Ctrl-C always writes one)",
    )
    add.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint of an interrupted run with the same flags",
    )
    add.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --output_dir"
    )
    add.add_argument(
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        help="allow model code from the hub (off by default)",
    )
    add.add_argument(
        "--quiet", action="store_true", help="no per-step log lines and no progress bars"
    )
    add.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def config_from_args(args: argparse.Namespace):
    """(RMUConfig, is_demo) from parsed arguments: published defaults, or the demo's settings
    when no model is given (flags given explicitly still win)."""
    from wmdp_fast.rmu import RMUConfig

    demo = args.model_name_or_path is None
    published = RMUConfig()
    base = {k: getattr(published, k) for k in PUBLISHED_FLAGS}
    base["corpus_mode"] = "exact"
    base["control_vector_rng"] = "device"
    extra = {}
    if demo:
        from wmdp_fast import demo as demo_pkg

        fields = {f.name for f in dataclasses.fields(RMUConfig)}
        base.update({k: v for k, v in demo_pkg.DEMO_RMU_ARGS.items() if k in fields})
        demo_dir = demo_pkg.demo_model_dir()
        if not (demo_dir / "config.json").is_file():
            raise ConfigError(
                f"no --model_name_or_path given and the embedded demo model is missing "
                f"({demo_dir}); pass --model_name_or_path (e.g. HuggingFaceH4/zephyr-7b-beta)"
            )
        extra["model_name_or_path"] = str(demo_dir)
        extra["corpus_dir"] = args.corpus_dir or str(demo_pkg.DEMO_CORPUS_DIR)
        extra["output_dir"] = args.output_dir or DEMO_OUTPUT_DIR
        extra["eval_tasks"] = args.eval_tasks or list(demo_pkg.DEMO_TASKS)

    def given(k):  # an explicit flag; unset flags are None (store_true ones False)
        v = getattr(args, k, None)
        return v is not None and v is not False

    values = {k: (getattr(args, k) if given(k) else v) for k, v in base.items()}
    fields = dict(
        model_name_or_path=args.model_name_or_path,
        output_dir=args.output_dir,
        verbose=args.verbose,
        corpus_dir=args.corpus_dir,
        control_vectors=args.control_vectors,
        mask_padding=args.mask_padding,
        optimizer_dtype=args.optimizer_dtype,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        offload=args.offload,
        cache_dir=args.cache_dir,
        cache_format=args.cache_format,
        cache_device=args.cache_device,
        first_layer_cache=args.first_layer_cache,
        fused_layers=args.fused_layers,
        dtype=args.dtype,
        device=args.device,
        eval_tasks=args.eval_tasks or [],
        eval_data_dir=args.eval_data_dir,
        eval_limit=args.eval_limit,
        eval_protocol=args.eval_protocol,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    fields.update(values)
    fields.update(extra)
    return RMUConfig(**fields), demo


def _table(before: dict, after: dict) -> str:
    names = list(dict.fromkeys([*before, *after]))
    w = max(len("task"), *(len(n) for n in names))
    lines = [f"{'task':<{w}}  {'before':>7}  {'after':>7}  {'change':>7}"]
    for n in names:
        b = (before.get(n) or {}).get("acc")
        a = (after.get(n) or {}).get("acc")
        fmt = lambda x: f"{100 * x:6.1f}%" if x is not None else "      -"  # noqa: E731
        d = f"{100 * (a - b):+6.1f}" if a is not None and b is not None else "      -"
        lines.append(f"{n:<{w}}  {fmt(b):>7}  {fmt(a):>7}  {d:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("wmdp_fast").setLevel(logging.WARNING if args.quiet else logging.INFO)
    return run_cli(lambda: _run(args), args.debug)


def _run(args) -> int:
    """The CLI's work; errors are turned into exit statuses by run_cli."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from wmdp_fast.rmu import run_rmu

    cfg, demo = config_from_args(args)
    if demo:
        print(
            "No --model_name_or_path given: running the embedded offline DEMO (a tiny model "
            "and an invented knowledge world: forget = made-up creatures, retain = made-up "
            f"towns). Output: {cfg.output_dir}/. For a real run pass --model_name_or_path, "
            "e.g. HuggingFaceH4/zephyr-7b-beta (see --help)."
        )
    # log lines go through tqdm.write, so they do not break the progress bars
    with logging_redirect_tqdm():
        result = run_rmu(cfg, progress=not args.quiet)
    rep = result.report
    print(
        "Updated tensors: "
        + ", ".join(f"{p['name']} {tuple(p['shape'])} {p['dtype']}" for p in rep["params_updated"])
    )
    last = rep["losses"][-1] if rep["losses"] else None
    if last:
        print(
            f"Final step {last['step']}: loss {last['loss']:.4g} (forget {last['forget_loss']:.4g}, "
            f"retain {last['retain_loss']:.4g}); {len(rep['losses'])} steps, "
            f"{rep['timings']['per_step_s'] * 1000:.1f} ms/step"
        )
    if rep.get("eval_before") is not None and rep.get("eval_after") is not None:
        print(_table(rep["eval_before"], rep["eval_after"]))
    print(f"Saved the unlearned model, rmu_report.json and losses.png to {result.output_dir}")
    if args.debug:
        print(json.dumps(rep["timings"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
