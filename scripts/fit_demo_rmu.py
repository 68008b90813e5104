"""Fit RMU hyperparameters for the demo model with a plain, self-contained RMU loop.

This is the published algorithm (docs: /work/shared/spec/rmu.md, part 1) written out in a few
lines, independent of wmdp_fast.rmu, so the demo's hyperparameters can be chosen (and later
cross-checked against the real engine):
  u = rand(1, 1, D); cv = u / ||u|| * steering_coeff
  loss = mse(h_forget[layer_id], cv) + alpha * mse(h_retain[layer_id], frozen h_retain[layer_id])
  update only list(layer.parameters())[param_ids] of layers layer_ids, AdamW(eps=1e-6, wd=0),
  one pass over min(max_num_batches, #forget batches, #retain batches) batches in file order.

    python scripts/fit_demo_rmu.py                         # DEMO_RMU_ARGS
    python scripts/fit_demo_rmu.py --set lr=5e-3 --set steering_coeffs=[10]
    python scripts/fit_demo_rmu.py --grid                  # sweep around it over 5 seeds
    python scripts/fit_demo_rmu.py --corpus_dir DIR        # other demo_*.jsonl corpora
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wmdp_fast.demo import (
    DEMO_CORPORA,
    DEMO_RMU_ARGS,
    DEMO_SUBJECTS,
    DEMO_TASK_FILES,
    demo_model_dir,
)
from wmdp_fast.demo.train import read_jsonl, score_mcq
from wmdp_fast.models import get_decoder_layers, load_model, load_tokenizer


def evaluate(model, tok) -> dict[str, float]:
    return {
        name: score_mcq(model, tok, read_jsonl(path), DEMO_SUBJECTS[name])[0]
        for name, path in DEMO_TASK_FILES.items()
    }


def batches(texts: list[str], bs: int) -> list[list[str]]:
    return [texts[i : i + bs] for i in range(0, len(texts), bs)]


CORPUS_DIR = None


def _texts(name: str, args: dict) -> list[str]:
    """Corpus documents: the JSON text field ("clean"), or the raw line ("exact" quirk)."""
    path = DEMO_CORPORA[name] if CORPUS_DIR is None else CORPUS_DIR / f"{name}.jsonl"
    if args.get("corpus_mode", "exact") == "clean":
        return [r["text"] for r in read_jsonl(path)]
    with open(path, encoding="utf-8") as fh:
        return list(fh)


def run_rmu(model, tok, args: dict) -> list[float]:
    """Plain RMU on `model` in place; returns the per-step losses."""
    torch.manual_seed(args["seed"])
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    model.train()
    layers = get_decoder_layers(model)
    frozen_layers = get_decoder_layers(frozen)
    params = []
    for p in model.parameters():
        p.requires_grad_(False)
    for lid in args["layer_ids"]:
        plist = list(layers[lid].parameters())
        for i in args["param_ids"]:
            plist[i].requires_grad_(True)
            params.append(plist[i])
    opt = torch.optim.AdamW(params, lr=args["lr"], eps=1e-6, weight_decay=0.0)

    forget = [_texts(c, args) for c in args["forget_corpora"]]
    retain = [_texts(c, args) for c in args["retain_corpora"]]
    fb = [batches(t, args["batch_size"]) for t in forget]
    rb = [batches(t, args["batch_size"]) for t in retain]
    n = min([args["max_num_batches"]] + [len(b) for b in fb] + [len(b) for b in rb])
    hidden = model.config.hidden_size
    cvs = []
    for coeff in args["steering_coeffs"]:
        u = torch.rand(1, 1, hidden, dtype=next(model.parameters()).dtype)
        cvs.append(u / u.norm() * coeff)

    captured = {}

    def hook(_m, _inp, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out

    lid = args["layer_id"]
    h_upd = layers[lid].register_forward_hook(hook)
    h_frz = frozen_layers[lid].register_forward_hook(hook)
    tok.padding_side = "left"
    tok.truncation_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    k_count = len(fb)
    losses = []
    try:
        for idx in range(n):
            k, b = idx % k_count, idx // k_count
            enc = tok(
                fb[k][b],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=args["max_len"],
            )
            model(**enc)
            lf = F.mse_loss(captured["h"], cvs[k].expand_as(captured["h"]))
            enc = tok(
                rb[k % len(rb)][b],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=args["max_len"],
            )
            model(**enc)
            hr = captured["h"]
            with torch.no_grad():
                frozen(**enc)
            hr0 = captured["h"]
            lr_ = F.mse_loss(hr, hr0) * args["alpha"][k]
            loss = lf + lr_
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append((lf.item(), lr_.item()))
    finally:
        h_upd.remove()
        h_frz.remove()
    model.eval()
    return losses


def parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        key, val = it.split("=", 1)
        out[key] = json.loads(val)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(demo_model_dir()))
    p.add_argument("--set", action="append", default=[], help="key=json override of DEMO_RMU_ARGS")
    p.add_argument("--grid", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corpus_dir", type=Path, default=None, help="other demo_*.jsonl corpora")
    a = p.parse_args(argv)
    global CORPUS_DIR
    CORPUS_DIR = a.corpus_dir
    torch.set_num_threads(a.threads)
    tok = load_tokenizer(a.model)
    base = load_model(a.model, dtype="float32", device="cpu")
    before = evaluate(base, tok)
    print("before", before, flush=True)
    args = {**DEMO_RMU_ARGS, **parse_set(a.set)}
    settings = [args]
    if a.grid:
        grid = {
            "steering_coeffs": [[25.0], [30.0]],
            "alpha": [[30.0], [40.0]],
            "lr": [1.5e-3, 2.5e-3],
            "seed": [42, 1, 2, 3, 7],
        }
        settings = [
            {**args, **dict(zip(grid, combo))} for combo in itertools.product(*grid.values())
        ]
    for s in settings:
        if "layers" in s:
            s["layer_id"], s["layer_ids"], s["param_ids"] = s.pop("layers")
        model = copy.deepcopy(base)
        t0 = time.time()
        losses = run_rmu(model, tok, s)
        after = evaluate(model, tok)
        keys = {
            k: s[k]
            for k in (
                "layer_id",
                "layer_ids",
                "steering_coeffs",
                "alpha",
                "lr",
                "batch_size",
                "max_num_batches",
                "param_ids",
                "seed",
            )
        }
        print(
            json.dumps(
                {
                    **keys,
                    "steps": len(losses),
                    "first_loss": losses[0],
                    "last_loss": losses[-1],
                    "after": after,
                    "seconds": round(time.time() - t0, 1),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
