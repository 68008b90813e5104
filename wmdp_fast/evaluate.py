"""The MCQ evaluation engine: lm-eval's numbers from one decoder pass per distinct input.

    from wmdp_fast.evaluate import evaluate
    res = evaluate(model, tokenizer, "wmdp,mmlu_paper", data_dir="mirror/")
    res["results"]["wmdp_bio"]["acc"], res["groups"]["wmdp"]["acc"]

How a run goes (lm-eval semantics, spec/eval.md):
1. Every question becomes 4 requests (context, " A".." D"), tokenized with lm-eval's
   ``_encode_pair`` under the chosen protocol (wmdp_fast.prompts).
2. A request's model input is ``(ctx + cont)[-(max_len + 1):][:-1]`` (left truncation) and it
   is scored at its last ``len(cont)`` positions. Requests with the same input share one
   sequence (as lm-eval's logits cache does): when all 4 answers are single tokens in context
   (the usual case) a question is ONE sequence read at ONE position; otherwise its requests
   fall back to the multi-token path, which reads several positions per sequence.
3. Sequences are sorted by length (longest first) and split into batches of at most a token
   budget of padded tokens, where padding is least (`plan_batches`). Only the
   decoder body runs over the batch (``model.model``); the LM head (plus Gemma's final logit
   softcapping) is applied to the hidden states of the needed positions only, and
   `ops.gather_logprobs` (C++/CUDA) turns those logits into log-likelihoods and is_greedy
   flags. No [B, T, V] tensor is ever built.
4. Padding: batches are right-padded and run WITHOUT an attention mask, exactly as lm-eval's
   hf backend does: under causal attention a real position never attends to later (padded)
   positions, and position ids start at 0 for every row, so padding cannot change a needed
   position's value; the model's own attention applies any sliding window
   (tests/test_evaluate.py checks batched against one-sequence runs).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from wmdp_fast import ops
from wmdp_fast.data import SUBGROUPS, MCQTask, apply_limit, check_limit, load_tasks, validate_row
from wmdp_fast.errors import ConfigError, DataError, ModelError, ResourceError
from wmdp_fast.prompts import continuations, encode_pairs, get_protocol

log = logging.getLogger("wmdp_fast")

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives one
_TOKENIZER_INFINITY = 1000000000000000019884624838656
CPU_BATCH_TOKENS = 2048
MAX_AUTO_BATCH_TOKENS = 32768


def model_max_length(model, tokenizer) -> int:
    """The context length lm-eval uses (``resolve_max_length``): the (text) config's
    n_positions / max_position_embeddings / n_ctx, else the tokenizer's model_max_length,
    else 2048."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != _TOKENIZER_INFINITY:
        return int(mml)
    return DEFAULT_MAX_LENGTH


# ----------------------------------------------------------------------------- requests


@dataclass
class _Request:
    question: int  # global question index
    seq: int  # index of its input sequence
    start: int  # first position (in the sequence) that predicts a continuation token
    cont: list[int]  # continuation token ids


def build_requests(
    tasks: list[MCQTask], tokenizer, protocol, max_length: int, model_type: str | None
) -> tuple[list[tuple[int, ...]], list[_Request], int]:
    """Tokenize every question; returns (unique input sequences, 4 requests per question in
    order, number of questions whose 4 answers are single tokens)."""
    proto = get_protocol(protocol)
    contexts = [
        proto.context(d["question"], d["choices"], t.subject) for t in tasks for d in t.docs
    ]
    pairs = encode_pairs(tokenizer, contexts, continuations(), proto.add_special_tokens(model_type))
    where = [f"task {t.name} ({t.source}), doc_id {i}" for t in tasks for i in range(len(t.docs))]
    seq_index: dict[tuple[int, ...], int] = {}
    seqs: list[tuple[int, ...]] = []
    requests: list[_Request] = []
    single = 0
    for qi, (ctx, conts) in enumerate(pairs):
        if not ctx:
            raise ModelError(f"{where[qi]}: the tokenizer produced no context tokens")
        single += all(len(c) == 1 for c in conts)
        for cont in conts:
            if not cont:
                raise ModelError(
                    f"{where[qi]}: a continuation encodes to no tokens in context; "
                    "this tokenizer cannot score lm-eval's ' A'..' D' answers"
                )
            if len(cont) > max_length:
                raise ConfigError(
                    f"{where[qi]}: a continuation of {len(cont)} tokens is longer than the max "
                    f"length {max_length}; raise --max-length"
                )
            inp = tuple((ctx + cont)[-(max_length + 1) :][:-1])
            s = seq_index.get(inp)
            if s is None:
                s = seq_index[inp] = len(seqs)
                seqs.append(inp)
            requests.append(_Request(qi, s, len(inp) - len(cont), cont))
    return seqs, requests, single


# ----------------------------------------------------------------------------- model pieces


class _Scorer:
    """Decoder body + LM head applied at chosen positions only."""

    def __init__(self, model):
        self.model = model
        self.body = getattr(model, "model", None)
        self.head = getattr(model, "lm_head", None)
        self.split = isinstance(self.body, torch.nn.Module) and isinstance(
            self.head, torch.nn.Module
        )
        if not self.split:
            log.warning(
                "%s has no model.model / model.lm_head: falling back to full forward passes "
                "(correct, but builds the full logits)",
                type(model).__name__,
            )
        cfg = getattr(model.config, "text_config", None) or model.config

        def conf(name):
            v = getattr(cfg, name, None)
            return v if v is not None else getattr(model.config, name, None)

        # what some CausalLM.forward methods do after lm_head (Gemma 2/3, Cohere, Granite)
        self.softcap = conf("final_logit_softcapping")
        self.scale = conf("logit_scale")
        self.divide = conf("logits_scaling")
        emb = model.get_input_embeddings()
        self.device = emb.weight.device
        self.checked = not self.split

    def check_against_forward(self, seq: tuple[int, ...]) -> None:
        """Compare the split path with the model's own forward on one sequence (last position);
        if they disagree (a CausalLM that post-processes logits in a way not handled here),
        warn and use full forward passes from now on."""
        self.checked = True
        ids = torch.tensor([seq], dtype=torch.long, device=self.device)
        row = torch.tensor([len(seq) - 1], device=self.device)
        try:
            ref = self.model(input_ids=ids, use_cache=False).logits[0, -1:].float()
            ours = self.logits_at(ids, row).float().to(ref.device)
        except Exception as exc:  # noqa: BLE001 - any failure of the split path -> fallback
            if _is_oom(exc):
                raise ResourceError(
                    f"out of memory on a single sequence of {len(seq)} tokens: try "
                    "--load-in-4bit, a smaller --dtype, or a GPU with more memory"
                ) from exc
            log.warning("%s: split forward failed (%s); using full forward passes",
                        type(self.model).__name__, exc)  # fmt: skip
            self.split = False
            return
        if _bad_rows(ref).any():
            raise _NonFiniteLogits([])
        tol = 1e-3 if ours.dtype == torch.float32 and ref.dtype == torch.float32 else 3e-2
        tol = tol * max(1.0, float(ref.abs().max()))
        if not torch.allclose(ours, ref, rtol=0, atol=tol):
            log.warning(
                "%s: decoder body + lm_head differs from the model's forward (max |diff| "
                "%.3g); using full forward passes (correct, slower)",
                type(self.model).__name__,
                float((ours - ref).abs().max()),
            )
            self.split = False

    def logits_at(self, ids: torch.Tensor, flat_rows: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [R, V] at flat positions b * T + t (R = len(flat_rows))."""
        B, T = ids.shape
        if self.split:
            hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state
            h = hidden.reshape(B * T, -1).index_select(0, flat_rows.to(hidden.device))
            head_device = next(self.head.parameters()).device
            logits = self.head(h if h.device == head_device else h.to(head_device))
        else:
            full = self.model(input_ids=ids, use_cache=False).logits
            return full.reshape(B * T, -1).index_select(0, flat_rows.to(full.device)).contiguous()
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.contiguous()


def auto_batch_tokens(model, device: torch.device) -> int:
    """Token budget per batch: from free GPU memory on CUDA, a cache-friendly 2048 on the CPU."""
    if device.type != "cuda":
        return CPU_BATCH_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    cfg = getattr(model.config, "text_config", None) or model.config
    hidden = int(getattr(cfg, "hidden_size", 4096))
    inter = getattr(cfg, "intermediate_size", None)
    if isinstance(inter, (list, tuple)):  # per-layer widths (Gemma 3n): the widest layer
        inter = max(inter, default=None)
    inter = int(inter or 4 * hidden)
    # activations alive at once in one no-grad layer (bf16/fp16; fp32 doubles it), generous
    elt = 4 if model.dtype == torch.float32 else 2
    per_token = elt * (8 * hidden + 4 * inter)
    budget = int(0.35 * free / per_token)
    return max(256, min(MAX_AUTO_BATCH_TOKENS, budget))


def plan_batches(lengths: list[int], budget: int) -> list[int]:
    """Batch sizes (rows) that split `lengths` (sorted longest first) into consecutive batches
    of at most `budget` padded tokens (rows x longest row; a longer row alone), minimizing the
    padded tokens plus `budget / 32` tokens per batch (its fixed cost: launches, a sync, smaller
    matmuls). Filling every batch up to the budget instead pads the long tail heavily: on
    bench_eval's 1,500 WMDP-like prompts at 32,768 tokens that was 14% of all tokens computed
    (the first batch held rows of 2,009 down to 602 tokens); this plan pads 5%.

    Exact dynamic programme over split points, O(sum of rows per batch) numpy work (~0.1 s for
    all of WMDP + MMLU)."""
    n = len(lengths)
    L = np.asarray(lengths, dtype=np.int64)
    overhead = max(1, budget // 32)
    cost = np.zeros(n + 1, dtype=np.int64)  # cost[i]: best cost of lengths[i:]
    end = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        T = int(L[i])
        m = min(n - i, max(1, budget // T))
        c = cost[i + 1 : i + m + 1] + np.arange(1, m + 1, dtype=np.int64) * T
        j = int(c.argmin())  # first minimum: the smaller batch on ties
        cost[i] = c[j] + overhead
        end[i] = i + 1 + j
    sizes, i = [], 0
    while i < n:
        sizes.append(int(end[i]) - i)
        i = int(end[i])
    return sizes


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


class _NonFiniteLogits(Exception):
    """Internal: some logits rows hold NaN/+inf (or only -inf); `questions` are the global
    indices of the questions scored from them (empty: those of the sequence being checked)."""

    def __init__(self, questions: list[int]):
        super().__init__(questions)
        self.questions = questions


def _bad_rows(logits: torch.Tensor) -> torch.Tensor:
    """bool [R]: rows whose log-softmax is undefined (gather_logprobs' rule)."""
    rows = logits.float()
    return ~torch.isfinite(rows.amax(dim=-1)) | torch.isnan(rows).any(dim=-1)


def _nonfinite_error(questions: list[int], labels: list[tuple[str, int]] | None) -> ModelError:
    qs = sorted(set(questions))
    if labels is None:
        where = f"questions {qs[:20]}"
    else:
        by_task: dict[str, list[int]] = {}
        for q in qs:
            by_task.setdefault(labels[q][0], []).append(labels[q][1])
        where = "; ".join(
            f"task {t}, doc_id {', '.join(map(str, ids[:20]))}{' ...' if len(ids) > 20 else ''}"
            for t, ids in by_task.items()
        )
    return ModelError(
        f"{where}: the model produced NaN or inf logits (in float16 activations overflow is the "
        "usual cause); load the model in bfloat16 or float32 (--dtype bfloat16 or --dtype "
        "float32)"
    )


def score_sequences(
    model,
    seqs: list[tuple[int, ...]],
    requests: list[_Request],
    batch_tokens: int | None = None,
    progress: bool = True,
    labels: list[tuple[str, int]] | None = None,
) -> tuple[list[float], list[bool]]:
    """Log-likelihood and is_greedy of every request (in order). `labels[q]` = (task, doc_id) of
    question q, named when the model yields NaN/inf logits (ModelError)."""
    scorer = _Scorer(model)
    device = scorer.device
    budget = int(batch_tokens) if batch_tokens else auto_batch_tokens(model, device)
    if budget < 1:
        raise ConfigError(f"--batch-tokens must be >= 1, got {batch_tokens}")
    log.info("batch token budget: %d%s", budget, "" if batch_tokens else " (auto)")

    by_seq: list[list[int]] = [[] for _ in seqs]
    for ri, r in enumerate(requests):
        by_seq[r.seq].append(ri)
    order = sorted(range(len(seqs)), key=lambda s: (-len(seqs[s]), seqs[s]))
    loglik = [0.0] * len(requests)
    greedy = [False] * len(requests)

    bar = tqdm(total=len(order), desc="Scoring", unit="seq", disable=not progress)
    i = 0
    with torch.inference_mode():
        if order and not scorer.checked:
            try:
                scorer.check_against_forward(seqs[order[-1]])  # the shortest: cheap
            except _NonFiniteLogits:
                qs = [requests[ri].question for ri in by_seq[order[-1]]]
                raise _nonfinite_error(qs, labels) from None
        lengths = [len(seqs[s]) for s in order]
        sizes, k = plan_batches(lengths, budget), 0
        while i < len(order):
            T = lengths[i]
            batch = order[i : i + sizes[k]]
            try:
                _score_batch(scorer, seqs, requests, by_seq, batch, loglik, greedy)
            except _NonFiniteLogits as exc:
                raise _nonfinite_error(exc.questions, labels) from None
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                if not _is_oom(exc):
                    raise
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(batch) == 1:
                    raise ResourceError(
                        f"out of memory on a single sequence of {T} tokens: try --load-in-4bit, "
                        "a smaller --dtype, or a GPU with more memory"
                    ) from exc
                budget = max(T, (len(batch) // 2) * T)
                log.warning("out of memory: lowering the batch token budget to %d", budget)
                sizes, k = plan_batches(lengths[i:], budget), 0
                continue
            i += len(batch)
            k += 1
            bar.update(len(batch))
    bar.close()
    return loglik, greedy


def _score_batch(scorer, seqs, requests, by_seq, batch, loglik, greedy) -> None:
    T = len(seqs[batch[0]])
    ids = torch.zeros((len(batch), T), dtype=torch.long)
    row_of: dict[int, int] = {}
    flat: list[int] = []
    pair_rows: list[int] = []
    targets: list[int] = []
    offsets = [0]
    req_ids: list[int] = []
    for b, s in enumerate(batch):
        seq = seqs[s]
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        for ri in by_seq[s]:
            r = requests[ri]
            for j, tok in enumerate(r.cont):
                pos = b * T + r.start + j
                row = row_of.get(pos)
                if row is None:
                    row = row_of[pos] = len(flat)
                    flat.append(pos)
                pair_rows.append(row)
                targets.append(tok)
            offsets.append(len(targets))
            req_ids.append(ri)
    dev = scorer.device
    logits = scorer.logits_at(ids.to(dev), torch.tensor(flat, dtype=torch.long, device=dev))
    try:
        ll, gr = ops.gather_logprobs(
            logits,
            torch.tensor(pair_rows, dtype=torch.long, device=logits.device),
            torch.tensor(targets, dtype=torch.long, device=logits.device),
            torch.tensor(offsets, dtype=torch.long, device=logits.device),
        )
    except RuntimeError:
        # gather_logprobs refuses NaN/+inf rows; checked only on failure (a pass over the logits)
        bad = _bad_rows(logits).tolist()
        if not any(bad):
            raise
        questions = [
            requests[ri].question
            for k, ri in enumerate(req_ids)
            if any(bad[pair_rows[j]] for j in range(offsets[k], offsets[k + 1]))
        ]
        raise _NonFiniteLogits(questions) from None
    for ri, v, g in zip(req_ids, ll.tolist(), gr.tolist()):
        loglik[ri] = v
        greedy[ri] = bool(g)


# ----------------------------------------------------------------------------- metrics


def _mean_stderr(values: list[float]) -> float | None:
    """lm-eval's mean_stderr: sample standard deviation (n - 1) / sqrt(n); None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _pooled_stderr(stderrs: list[float | None], sizes: list[int]) -> float | None:
    """lm-eval's pooled_sample_stderr for a size-weighted group."""
    if any(s is None for s in stderrs) or sum(sizes) <= len(sizes):
        return None
    var = sum((n - 1) * se**2 * n for n, se in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def _aggregate(parts: list[dict]) -> dict:
    """A size-weighted group of results {"acc", "acc_stderr", "n"} (lm-eval's
    aggregate_subtask_metrics and pooled_sample_stderr)."""
    sizes = [p["n"] for p in parts]
    return {
        "acc": sum(p["acc"] * n for p, n in zip(parts, sizes)) / sum(sizes),
        "acc_stderr": _pooled_stderr([p["acc_stderr"] for p in parts], sizes),
        "n": sum(sizes),
    }


def _argmax_first(xs: list[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


# ----------------------------------------------------------------------------- public API


def evaluate(
    model,
    tokenizer,
    tasks: str | list[str] | list[MCQTask],
    *,
    protocol: str = "lm-eval-current",
    data_dir: str | None = None,
    limit: float | None = None,
    batch_tokens: int | None = None,
    max_length: int | None = None,
    log_samples: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    groups: dict[str, list[str]] | None = None,
    fused_layers: bool = False,
) -> dict:
    """Score multiple-choice tasks on an already loaded causal LM, as lm-eval would.

    Args:
        model: a transformers causal LM (eval mode; any dtype, 4/8-bit, any device).
        tokenizer: its tokenizer (the HF tokenizer, as lm-eval uses).
        tasks: task/group names ("wmdp", "mmlu", "mmlu_paper", "wmdp_bio", "mmlu_virology",
            "demo_forget", ... as a comma-separated string or list), or already loaded
            `wmdp_fast.data.MCQTask` objects (then `data_dir` is ignored; `limit` still
            applies and their rows are validated like files).
        protocol: "lm-eval-current" (lm-eval 0.4.13, default) or "lm-eval-0.4.2" (the paper).
        data_dir: local mirror of the hub data (None = Hugging Face hub).
        limit: first N questions of each task; a fraction below 1 keeps the first
            ceil(n * limit) of each (lm-eval's --limit).
        batch_tokens: token budget per batch (None = automatic from free memory).
        max_length: context length (None = lm-eval's rule from the model config).
        log_samples: also return per-question records under "samples".
        progress: show a tqdm bar.
        model_name: name written into the result (default: config._name_or_path).
        groups: {group: [task names]} to aggregate when `tasks` are MCQTask objects (names
            resolve their groups themselves).
        fused_layers: run the model's Llama/Mistral/Qwen2-style RMSNorms and SwiGLU MLPs with
            wmdp_fast's fused kernels for this call (`wmdp_fast.fused_layers`; restored after):
            fewer memory passes on CUDA; the same roundings to the model dtype, but float32
            intermediates may differ from transformers' modules in the last bit, so bf16
            log-likelihoods are not bitwise lm-eval's. On the CPU the patched modules run the
            same eager code. Off by default: lm-eval parity first.

    Returns:
        {"results": {task: {"acc", "acc_stderr", "n"}}, "groups": {group: {"acc",
        "acc_stderr", "n"}}, "protocol", "model", "dtype", "versions", "seconds"} and, with
        log_samples, "samples": [{"task", "doc_id", "loglikelihoods", "pred", "answer",
        "is_greedy"}]. Group acc is the size-weighted mean of its tasks, group acc_stderr
        lm-eval's pooled sample stderr (over its tasks; under lm-eval-0.4.2, `mmlu`'s over its
        four categories, as that release computed it). Naming `mmlu` also reports its four
        categories (mmlu_stem, mmlu_other, mmlu_social_sciences, mmlu_humanities), as lm-eval.

    Raises DataError (bad data, before the model runs), ConfigError, ModelError, ResourceError.
    """
    t0 = time.perf_counter()
    proto = get_protocol(protocol)
    check_limit(limit)
    if isinstance(tasks, (list, tuple)) and tasks and all(isinstance(t, MCQTask) for t in tasks):
        task_objs = []
        for t in tasks:
            where = f"task {t.name} ({t.source})"
            docs = [
                validate_row(d, f"{where}: row {i}")
                for i, d in enumerate(apply_limit(t.docs, limit))
            ]
            if not docs:
                raise DataError(f"{where}: no questions")
            task_objs.append(MCQTask(t.name, t.subject, t.source, docs))
        groups = dict(groups or {})
        names = {t.name for t in task_objs}
        for g, members in groups.items():
            missing = [m for m in members if m not in names]
            if missing:
                raise ConfigError(f"groups: group {g!r} names {missing}, not among the tasks given")
    else:
        task_objs, groups = load_tasks(tasks, data_dir, limit)
    L = int(max_length) if max_length else model_max_length(model, tokenizer)
    model_type = getattr(model.config, "model_type", None)

    t_tok = time.perf_counter()
    seqs, requests, single = build_requests(task_objs, tokenizer, proto, L, model_type)
    n_q = sum(len(t.docs) for t in task_objs)
    log.info(
        "%d questions, %d requests -> %d sequences (%d questions single-position, %d "
        "multi-token); tokenized in %.2fs; protocol %s, max length %d",
        n_q, len(requests), len(seqs), single, n_q - single,
        time.perf_counter() - t_tok, proto.name, L,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    already: set[str] = set()
    try:
        if fused_layers:
            from wmdp_fast.fused_layers import fuse_decoder_layers, fused_modules

            already = set(fused_modules(model))
            fuse_decoder_layers(model)
        labels = [(t.name, i) for t in task_objs for i in range(len(t.docs))]
        loglik, greedy = score_sequences(model, seqs, requests, batch_tokens, progress, labels)
    finally:
        model.train(was_training)
        if fused_layers:  # only what this call patched (also if patching failed halfway)
            from wmdp_fast.fused_layers import fused_modules, unfuse_decoder_layers

            mine = [model.get_submodule(n) for n in fused_modules(model) if n not in already]
            unfuse_decoder_layers(mine)

    results: dict[str, dict] = {}
    samples: list[dict] = []
    q = 0
    for t in task_objs:
        correct = []
        for doc_id, doc in enumerate(t.docs):
            lls = loglik[4 * q : 4 * q + 4]
            pred = _argmax_first(lls)
            correct.append(1.0 if pred == doc["answer"] else 0.0)
            if log_samples:
                samples.append(
                    {
                        "task": t.name,
                        "doc_id": doc_id,
                        "loglikelihoods": lls,
                        "pred": pred,
                        "answer": doc["answer"],
                        "is_greedy": greedy[4 * q : 4 * q + 4],
                    }
                )
            q += 1
        results[t.name] = {
            "acc": sum(correct) / len(correct),
            "acc_stderr": _mean_stderr(correct),
            "n": len(correct),
        }
    group_res = {g: _aggregate([results[m] for m in members]) for g, members in groups.items()}
    if proto.nested_groups:  # lm-eval 0.4.2: a parent from its subgroups, not its leaves
        for g, subs in SUBGROUPS.items():
            if g in group_res and all(s in group_res for s in subs):
                group_res[g] = _aggregate([group_res[s] for s in subs])
    out = {
        "results": results,
        "groups": group_res,
        "protocol": proto.name,
        "model": model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "versions": _versions(proto),
        "max_length": L,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if fused_layers:  # not lm-eval's modules: say so in the result
        out["fused_layers"] = True
    if log_samples:
        out["samples"] = samples
    return out


def _versions(proto) -> dict:
    import importlib.metadata as md

    import wmdp_fast

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "wmdp_fast": wmdp_fast.__version__,
        "lm_eval_reproduced": proto.lm_eval_version,
        "torch": torch.__version__,
        "transformers": v("transformers"),
    }
