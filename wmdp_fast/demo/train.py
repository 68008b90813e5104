"""Train the tiny demo model that ships in wmdp_fast/demo/model/ (deterministic, CPU, minutes).

    python -m wmdp_fast.demo.train                 # writes wmdp_fast/demo/model/
    python -m wmdp_fast.demo.train --out_dir /tmp/m --steps 300

The model is a 4-layer Mistral-architecture decoder (hidden size 64, tied embeddings, about
2.3M parameters, 9 MB in float32) with the real Mistral/Zephyr tokenizer (32,000 tokens, from
mistral_common). It is trained on
- the two corpora of `wmdp_fast.demo.world` (next-token loss over every position), and
- multiple-choice practice about the same facts (`world.practice_mcq`: other question
  templates, other distractors and answer orders than the evaluation sets), with the loss on
  the answer letter at the last position of the lm-eval WMDP prompt (with BOS or without, one
  or two newlines after the description, so both lm-eval protocols work).
The evaluated questions never appear in the training text (tests/test_demo.py checks it).

Why auxiliary probes: with only the answer-letter loss a tiny model sits on the ln(4) plateau
for a long time (chance for 800+ steps in our runs) before it discovers "find the choice that
matches the fact, copy its letter". Two linear probes, used during training and then thrown
away, read the output of decoder layer `aux_layer` (2, the layer RMU perturbs) at the end of
each choice line and are trained to say which choice is right and which letter it carries.
That dense signal gets the model off the plateau after ~600 steps, and it puts the forget
knowledge in the layer the demo's RMU targets. The shipped model is a plain Mistral model.

Speed: the world uses fewer than a thousand distinct tokens, so the training loss is a softmax
over those token ids only (the output layer is the tied embedding, so this is the same model,
just a cheaper loss); the rows of never-seen tokens are zero, i.e. their logits are exactly 0.
Multiple-choice accuracy compares the logits of " A".." D" at one position, which does not
depend on the other tokens.

Determinism: fixed seeds, `torch.use_deterministic_algorithms(True)`, and a fixed thread
count; the same torch build and CPU give bitwise the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wmdp_fast.atomic import make_temp_dir
from wmdp_fast.demo import DEMO_SUBJECTS, DEMO_TASK_FILES, demo_model_dir, world
from wmdp_fast.demo.world import LETTERS, mcq_prompt
from wmdp_fast.errors import ModelError

log = logging.getLogger("wmdp_fast")


MODEL_CONFIG = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    sliding_window=4096,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
)


def letter_token_ids(tok) -> list[int]:
    """Token ids of the continuations " A".." D" as lm-eval tokenizes them after "Answer:"."""
    ids = []
    for L in LETTERS:
        ctx = tok("Answer:", add_special_tokens=False)["input_ids"]
        whole = tok("Answer: " + L, add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx) :]
        if len(cont) != 1:
            raise ModelError(
                f"the tokenizer splits ' {L}' after 'Answer:' into {cont}; the demo needs the "
                "Mistral/Llama tokenizer, where it is one token"
            )
        ids.append(cont[0])
    return ids


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@torch.no_grad()
def score_mcq(
    model,
    tok,
    rows: list[dict],
    subject: str,
    bos: bool = True,
    newlines: int = 2,
    batch_size: int = 32,
) -> tuple[float, list[int]]:
    """Zero-shot accuracy with the lm-eval prompt: argmax over the logits of " A".." D" at the
    last prompt position (first index wins ties). Returns (accuracy, predictions)."""
    letters = torch.tensor(letter_token_ids(tok))
    device = next(model.parameters()).device
    preds = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = [
            tok(mcq_prompt(r, subject, newlines), add_special_tokens=bos)["input_ids"]
            for r in chunk
        ]
        ids, mask, last = _pad(enc)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        sel = logits[torch.arange(len(enc)), last][:, letters.to(device)]
        preds += sel.argmax(-1).tolist()
    acc = sum(int(p == r["answer"]) for p, r in zip(preds, rows)) / len(rows)
    return acc, preds


def _pad(seqs: list[list[int]], pad_id: int = 0):
    """Right-pad; returns ids, attention mask and the index of each last real token."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    last = mask.sum(1) - 1
    return ids, mask, last


def _training_texts(seed: int):
    """Corpus documents (with BOS) and practice prompts (random protocol: BOS or not, one or
    two newlines after the description) with their answers."""
    rng = random.Random(seed)
    docs = []
    for name in ("demo_forget", "demo_retain"):
        docs += [d["text"] for d in world.prose(name)]
    practice = []
    for name in ("demo_forget", "demo_retain"):
        for rep in range(2):
            for row in world.practice_mcq(name, seed=rep):
                practice.append((row, DEMO_SUBJECTS[name], rng.random() < 0.75, rng.choice((1, 2))))
    return docs, practice


def train(
    out_dir: Path,
    steps: int = 1500,
    lr: float = 3e-3,
    doc_batch: int = 8,
    mcq_batch: int = 32,
    seed: int = 0,
    threads: int = 2,
    dtype: str = "float32",
    eval_every: int = 0,
    aux_weight: float = 1.0,
    aux_layer: int = 2,
    **config_overrides,
) -> dict:
    """Train and save the demo model to out_dir (atomically). Returns a summary dict."""
    from tqdm import tqdm
    from transformers import MistralConfig, MistralForCausalLM

    from wmdp_fast.testing import save_mistral_tokenizer

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    t0 = time.time()

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir)
    tok = save_mistral_tokenizer(tmp)
    letters = letter_token_ids(tok)

    docs, practice = _training_texts(seed)
    doc_ids = [tok(d)["input_ids"] + [tok.eos_token_id] for d in docs]
    mcq_ids = [
        tok(mcq_prompt(r, subj, nl), add_special_tokens=bos)["input_ids"]
        for r, subj, bos, nl in practice
    ]
    mcq_answer = [r["answer"] for r, *_ in practice]
    newline = tok.convert_tokens_to_ids("<0x0A>")
    choice_ends = [torch.tensor([j for j, t in enumerate(s) if t == newline][-4:]) for s in mcq_ids]
    used = sorted({t for s in doc_ids + mcq_ids for t in s} | set(letters))
    vocab = torch.tensor(used)
    remap = torch.full((MODEL_CONFIG["vocab_size"],), -1, dtype=torch.long)
    remap[vocab] = torch.arange(len(used))
    log.info(
        "demo train: %d documents, %d practice questions, %d distinct tokens",
        len(doc_ids),
        len(mcq_ids),
        len(used),
    )

    cfg = MistralConfig(**{**MODEL_CONFIG, **config_overrides})
    model = MistralForCausalLM(cfg)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        keep = torch.zeros(emb.shape[0], dtype=torch.bool)
        keep[vocab] = True
        emb[~keep] = 0.0
    model.train()
    probe_ok = torch.nn.Linear(cfg.hidden_size, 1)
    probe_letter = torch.nn.Linear(cfg.hidden_size, 4)
    trained = (
        list(model.parameters()) + list(probe_ok.parameters()) + list(probe_letter.parameters())
    )
    opt = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, steps // 20)

    def lr_at(step):
        if step < warm:
            return lr * (step + 1) / warm
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    g = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="demo train", unit="step", disable=None)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        di = torch.randint(len(doc_ids), (doc_batch,), generator=g).tolist()
        mi = torch.randint(len(mcq_ids), (mcq_batch,), generator=g).tolist()
        w = emb[vocab]  # (V', D) tied output rows of the tokens the world uses

        ids, mask, _ = _pad([doc_ids[i] for i in di])
        h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        tgt = remap[ids[:, 1:]].masked_fill(mask[:, 1:] == 0, -100)
        lm_loss = F.cross_entropy((h[:, :-1] @ w.T).flatten(0, 1), tgt.flatten(), ignore_index=-100)

        ids, mask, last = _pad([mcq_ids[i] for i in mi])
        out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h = out.last_hidden_state
        hl = h[torch.arange(len(mi)), last]
        answers = torch.tensor([mcq_answer[i] for i in mi])
        mcq_loss = F.cross_entropy(hl @ w.T, remap[torch.tensor(letters)[answers]])
        loss = lm_loss + mcq_loss
        if aux_weight > 0:
            # auxiliary probes (training only, discarded): at the end of each choice line, the
            # output of layer `aux_layer` should say which choice is right and which letter it has
            hp = out.hidden_states[aux_layer + 1]
            pos = torch.stack([choice_ends[i] for i in mi])  # (B, 4)
            hc = hp[torch.arange(len(mi))[:, None], pos]  # (B, 4, D)
            ptr = probe_ok(hc).squeeze(-1)  # (B, 4)
            aux = F.cross_entropy(ptr, answers)
            aux = aux + F.cross_entropy(
                probe_letter(hc).flatten(0, 1), torch.arange(4).repeat(len(mi))
            )
            loss = loss + aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        with torch.no_grad():
            emb[~keep] = 0.0  # weight decay must not move the unused rows off zero
        losses.append((lm_loss.item(), mcq_loss.item()))
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            accs = {
                n: score_mcq(model, tok, read_jsonl(pth), DEMO_SUBJECTS[n])[0]
                for n, pth in DEMO_TASK_FILES.items()
            }
            model.train()
            recent = losses[-eval_every:]
            log.info(
                "step %d lm %.3f mcq %.3f acc %s (%.0f s)",
                step + 1,
                sum(x for x, _ in recent) / len(recent),
                sum(y for _, y in recent) / len(recent),
                accs,
                time.time() - t0,
            )
        bar.set_postfix(lm=f"{lm_loss.item():.3f}", mcq=f"{mcq_loss.item():.3f}")

    model.eval()
    save_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        dtype
    ]
    model.to(save_dtype)
    model.save_pretrained(str(tmp))
    model.float()
    accs = {}
    for name, path in DEMO_TASK_FILES.items():
        accs[name] = score_mcq(model, tok, read_jsonl(path), DEMO_SUBJECTS[name])[0]
    summary = {
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
        "final_lm_loss": losses[-1][0],
        "final_mcq_loss": losses[-1][1],
        "acc": accs,
        "distinct_tokens": len(used),
    }
    (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m wmdp_fast.demo.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out_dir", type=Path, default=demo_model_dir())
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval_every", type=int, default=0, help="log both accuracies every N steps")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = train(
        args.out_dir,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        dtype=args.dtype,
        eval_every=args.eval_every,
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
