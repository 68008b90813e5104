"""The RMU engine's host-side I/O, side by side in one process (CPU is enough):

1. tokenizing the corpora: the published per-batch call vs `cache.tokenize_batches` (one call
   per max_length, padded per batch; the same tensors);
2. saving: the untouched shards copied at the save vs by the background thread while the run
   computes (`rmu._OutputPrefetch`), on a sharded checkpoint written to --workdir.

    python benchmarks/bench_rmu_io.py [--repeat 3] [--workdir /tmp]

Prints medians. Absolute times on a shared machine are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def bench_tokenize(tok_dir: Path, repeat: int) -> None:
    from wmdp_fast.cache import tokenize_batches
    from wmdp_fast.models import load_tokenizer

    tok = load_tokenizer(str(tok_dir), use_fast=False, progress=False)
    tok.pad_token_id, tok.padding_side, tok.truncation_side = tok.eos_token_id, "left", "right"
    rng = random.Random(0)
    words = "the protein virus cell gene expression binding receptor host infection".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(500, 6000))) for _ in range(120)]
    batches = [
        (tuple(docs[i : i + 4]), 512 if (i // 4) % 2 == 0 else 768) for i in range(0, 120, 4)
    ]

    def per_batch():
        return [
            tok(list(t), return_tensors="pt", padding=True, truncation=True, max_length=ml)
            for t, ml in batches
        ]

    a, b = per_batch(), tokenize_batches(tok, batches)
    same = all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    times: dict[str, list[float]] = {"per batch (published)": [], "tokenize_batches": []}
    for _ in range(repeat):
        for name, fn in (
            ("per batch (published)", per_batch),
            ("tokenize_batches", lambda: tokenize_batches(tok, batches)),
        ):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    chars = sum(map(len, docs)) / 1e6
    print(f"\n## tokenizing {len(docs)} documents ({chars:.1f} M chars), 512/768 tokens")
    print("| path | median s |\n|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {_median(ts)} |")
    print(f"same tensors: {same}")


def bench_save(root: Path, repeat: int) -> None:
    from transformers import AutoModelForCausalLM

    import wmdp_fast.models as models
    from wmdp_fast.rmu import RMUConfig, run_rmu
    from wmdp_fast.testing import make_tiny_model

    tiny = make_tiny_model(
        root / "m", arch="mistral", hidden_size=1024, intermediate_size=3584,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
    )  # fmt: skip
    src = root / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).save_pretrained(
        str(src), max_shard_size="100MB"
    )
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, src / f.name)
    corpus = root / "corpora"
    corpus.mkdir()
    rng = random.Random(1)
    for name in ("bio-forget-corpus", "wikitext"):
        with open(corpus / f"{name}.jsonl", "w") as fh:
            for _ in range(24):
                text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(60))
                fh.write(json.dumps({"text": text}) + "\n")
    shards = list(src.glob("*.safetensors"))
    real = models.untouched_weight_files
    rows: dict[str, dict[str, list[float]]] = {"background copy": {}, "copy at the save": {}}
    try:
        for _ in range(repeat):
            for mode in rows:
                # no file names for the thread: everything is copied at the save, as before
                models.untouched_weight_files = (
                    real if mode == "background copy" else (lambda *a, **k: [])
                )
                out = root / "out"
                cfg = RMUConfig(
                    model_name_or_path=str(src), layer_id=2, layer_ids=[1, 2], param_ids=[6],
                    steering_coeffs=[20.0], alpha=[10.0], lr=1e-3, batch_size=2,
                    max_num_batches=6, forget_corpora=["bio-forget-corpus"],
                    retain_corpora=["wikitext"], corpus_dir=str(corpus), output_dir=str(out),
                    device="cpu", dtype="float32",
                )  # fmt: skip
                t = run_rmu(cfg, progress=False).report["timings"]
                for k in ("train_s", "save_s"):
                    rows[mode].setdefault(k, []).append(t[k])
                shutil.rmtree(out)
    finally:
        models.untouched_weight_files = real
    mb = sum(p.stat().st_size for p in shards) / 1e6
    print(f"\n## run_rmu save: {mb:.0f} MB checkpoint in {len(shards)} shards, 6 steps, CPU")
    print("| untouched shards | median train_s | median save_s |\n|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {_median(r['train_s'])} | {_median(r['save_s'])} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_rmu_io_", dir=args.workdir))
    try:
        from wmdp_fast.testing import make_tiny_model

        bench_tokenize(make_tiny_model(root / "tok", num_hidden_layers=1), args.repeat)
        bench_save(root, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
