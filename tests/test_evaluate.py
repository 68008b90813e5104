"""Engine internals: an independent plain-PyTorch reference of lm-eval's algorithm (full
forward per request, log_softmax over the vocabulary), Gemma-2 logit softcapping, the
full-forward fallback, OOM back-off, metrics."""

from __future__ import annotations

import math
import random

import pytest
import torch

from wmdp_fast import evaluate as ev
from wmdp_fast.data import MCQTask
from wmdp_fast.errors import ConfigError, DataError, ModelError, ResourceError
from wmdp_fast.prompts import continuations, encode_pairs, get_protocol
from wmdp_fast.testing import save_mistral_tokenizer


def _docs(n, seed=0):
    rng = random.Random(seed)
    words = "virus gene exploit buffer kernel toxin reagent the a of which".split()
    return [
        {
            "question": " ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) + "?",
            "choices": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(4)],
            "answer": rng.randint(0, 3),
        }
        for _ in range(n)
    ]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Boom:
    """A model/tokenizer stand-in that fails on any use: proves nothing touched it."""

    def __getattr__(self, name):
        raise AssertionError(f"model touched ({name})")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_mistral_tokenizer(tmp_path_factory.mktemp("tok"))


def _gemma2(seed=0):
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=96,
        final_logit_softcapping=5.0, sliding_window=16, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, initializer_range=0.5,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _mistral(seed=0, **kw):
    from transformers import AutoModelForCausalLM

    from wmdp_fast.testing import tiny_config

    cfg = tiny_config("mistral", num_hidden_layers=2, **kw)
    cfg.initializer_range = 0.5
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def reference_logliks(model, tok, task, protocol, max_length):
    """lm-eval's algorithm written out plainly: one full forward per request, full
    log_softmax, sum over continuation positions."""
    proto = get_protocol(protocol)
    ctxs = [proto.context(d["question"], d["choices"], task.subject) for d in task.docs]
    out, cache = [], {}
    for ctx_ids, conts in encode_pairs(
        tok, ctxs, continuations(), proto.add_special_tokens(model.config.model_type)
    ):
        for cont in conts:
            inp = (ctx_ids + cont)[-(max_length + 1) :][:-1]
            if tuple(inp) not in cache:  # the 4 single-token answers share one input
                with torch.no_grad():
                    logits = model(torch.tensor([inp])).logits[0].float()
                cache[tuple(inp)] = torch.log_softmax(logits, dim=-1)
            lp = cache[tuple(inp)][len(inp) - len(cont) :]
            ll = lp.gather(1, torch.tensor(cont)[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == torch.tensor(cont)).all())
            out.append((ll, greedy))
    return out


@pytest.mark.parametrize("protocol", ["lm-eval-current", "lm-eval-0.4.2"])
def test_gemma2_softcap_sliding_window_truncation_vs_reference(tok, protocol):
    model = _gemma2()
    task = MCQTask("t", "biology", "synthetic", _docs(6))
    res = ev.evaluate(model, tok, [task], protocol=protocol, log_samples=True, progress=False,
                      batch_tokens=200)  # fmt: skip
    assert res["max_length"] == 96
    ref = reference_logliks(model, tok, task, protocol, 96)
    got = [(ll, g) for s in res["samples"] for ll, g in zip(s["loglikelihoods"], s["is_greedy"])]
    for (a, ga), (b, gb) in zip(ref, got):
        assert abs(a - b) <= 1e-4 and ga == gb
    # softcapping is live: every per-token log-prob is bounded by the capped logit range
    assert all(ll > -4 * 2 * 5.0 for ll, _ in got)  # |logit| <= 5 -> ll >= -(10 + log V) each
    # without the cap the numbers differ (so the check above can fail)
    model.config.final_logit_softcapping = None
    nocap = ev.evaluate(model, tok, [task], protocol=protocol, log_samples=True, progress=False)
    assert (
        max(
            abs(a - b)
            for s, t in zip(res["samples"], nocap["samples"])
            for a, b in zip(s["loglikelihoods"], t["loglikelihoods"])
        )
        > 0.1
    )


def test_full_forward_fallback_matches_split_path(tok):
    model = _mistral()

    class Wrapped(torch.nn.Module):
        """A causal LM without model.model / lm_head attributes."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    task = MCQTask("t", "biology", "synthetic", _docs(6, seed=1))
    a = ev.evaluate(model, tok, [task], log_samples=True, progress=False)
    b = ev.evaluate(Wrapped(model), tok, [task], log_samples=True, progress=False)
    for s, t in zip(a["samples"], b["samples"]):
        assert s["pred"] == t["pred"]
        for x, y in zip(s["loglikelihoods"], t["loglikelihoods"]):
            assert abs(x - y) <= 1e-4


def test_oom_backoff_and_resource_error(tok, monkeypatch):
    model = _mistral(seed=2)
    task = MCQTask("t", "biology", "synthetic", _docs(10, seed=2))
    clean = ev.evaluate(model, tok, [task], log_samples=True, progress=False)
    real = ev._Scorer.logits_at
    calls = []

    def flaky(self, ids, flat_rows):
        calls.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(self, ids, flat_rows)

    monkeypatch.setattr(ev._Scorer, "logits_at", flaky)
    got = ev.evaluate(model, tok, [task], log_samples=True, progress=False, batch_tokens=10**6)
    assert calls[0] == 1  # the one-sequence check of the split path
    assert calls[1] == 10  # all in one batch under the huge budget
    # then the rest is re-planned under half that batch's tokens until every batch fits
    assert calls[2] <= 5 and all(c <= 2 for c in calls[-3:])
    assert sum(c for c in calls[1:] if c <= 2) == 10  # each sequence scored exactly once
    flat = [x for s in got["samples"] for x in s["loglikelihoods"]]
    assert flat == pytest.approx(
        [x for s in clean["samples"] for x in s["loglikelihoods"]], abs=1e-4
    )

    def always(self, ids, flat_rows):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ev._Scorer, "logits_at", always)
    with pytest.raises(ResourceError, match="--load-in-4bit"):
        ev.evaluate(model, tok, [task], progress=False)


def _padded(lengths, sizes):
    out, i = 0, 0
    for n in sizes:
        out, i = out + n * lengths[i], i + n
    return out


def test_plan_batches_is_the_optimal_split_under_the_budget():
    """plan_batches against brute force over every split of small sorted length lists: within
    the budget (a row longer than it alone) and the least padded tokens + budget/32 per batch."""
    import itertools

    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted((rng.randint(1, 60) for _ in range(rng.randint(1, 9))), reverse=True)
        budget = rng.randint(20, 200)
        sizes = ev.plan_batches(lengths, budget)
        assert sum(sizes) == len(lengths) and all(n >= 1 for n in sizes)
        i = 0
        for n in sizes:
            assert n == 1 or n * lengths[i] <= budget
            i += n
        best = None
        for cuts in itertools.product([0, 1], repeat=len(lengths) - 1):
            split, start = [], 0
            for k, c in enumerate(cuts, 1):
                if c:
                    split.append(k - start)
                    start = k
            split.append(len(lengths) - start)
            j, ok = 0, True
            for n in split:
                ok &= n == 1 or n * lengths[j] <= budget
                j += n
            if ok:
                c = _padded(lengths, split) + len(split) * max(1, budget // 32)
                best = c if best is None else min(best, c)
        assert _padded(lengths, sizes) + len(sizes) * max(1, budget // 32) == best


def test_batches_do_not_pad_short_sequences_to_a_long_one(tok, monkeypatch):
    """One long question among short ones: filling the budget put them all in one batch padded
    to the long one (the old rule: 14% of bench_eval's tokens were padding); now the long one
    runs alone. Scores equal one-sequence-per-batch runs."""
    model = _mistral(seed=3)
    docs = _docs(12, seed=3)
    docs[0] = dict(docs[0], question=" ".join(["virus gene"] * 150) + "?")
    task = MCQTask("t", "biology", "synthetic", docs)
    real, shapes = ev._Scorer.logits_at, []

    def spy(self, ids, flat_rows):
        shapes.append(tuple(ids.shape))
        return real(self, ids, flat_rows)

    monkeypatch.setattr(ev._Scorer, "logits_at", spy)
    res = ev.evaluate(model, tok, [task], log_samples=True, progress=False, batch_tokens=4096)
    batches = shapes[1:]  # [0] is the one-sequence check of the split path
    assert sum(b for b, _ in batches) == 12
    longest = max(t for _, t in batches)
    assert longest > 300 and (1, longest) in batches  # the long one alone
    assert sum(b * t for b, t in batches) < 2 * longest + 12 * 80  # not 12 x longest
    one = ev.evaluate(model, tok, [task], log_samples=True, progress=False, batch_tokens=1)
    for s, t in zip(res["samples"], one["samples"]):
        assert s["pred"] == t["pred"]
        assert s["loglikelihoods"] == pytest.approx(t["loglikelihoods"], abs=1e-4)


def test_auto_batch_tokens_on_cuda(monkeypatch):
    """The CUDA budget (from torch.cuda.mem_get_info, faked here): Zephyr-7B's formula and cap,
    and a config with per-layer MLP widths (Gemma 3n: `intermediate_size` is a list), which
    raised TypeError on CUDA only (the CPU returns before reading the config)."""
    from types import SimpleNamespace

    from transformers import Gemma3nTextConfig, MistralConfig

    free = {"bytes": 60 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    cuda = torch.device("cuda", 0)
    zephyr = SimpleNamespace(
        config=MistralConfig(hidden_size=4096, intermediate_size=14336), dtype=torch.bfloat16
    )
    assert ev.auto_batch_tokens(zephyr, cuda) == ev.MAX_AUTO_BATCH_TOKENS
    free["bytes"] = 2 * 2**30
    per_token = 2 * (8 * 4096 + 4 * 14336)
    assert ev.auto_batch_tokens(zephyr, cuda) == int(0.35 * 2 * 2**30 / per_token)
    g3n = Gemma3nTextConfig(hidden_size=4096, intermediate_size=[8192, 14336], num_hidden_layers=2)
    assert isinstance(g3n.intermediate_size, list)
    got = ev.auto_batch_tokens(SimpleNamespace(config=g3n, dtype=torch.bfloat16), cuda)
    assert got == ev.auto_batch_tokens(zephyr, cuda)  # sized by its widest layer


def test_metrics_match_lm_eval_formulas():
    xs = [1.0, 0.0, 0.0, 1.0, 1.0]
    mu = 0.6
    assert ev._mean_stderr(xs) == pytest.approx(
        math.sqrt(sum((x - mu) ** 2 for x in xs) / 4) / math.sqrt(5)
    )
    assert ev._mean_stderr([1.0]) is None
    assert ev._argmax_first([-1.0, -0.5, -0.5, -2.0]) == 1
    # pooled stderr of two groups equals the stderr of the concatenation when means agree
    a, b = [1.0, 0.0] * 10, [1.0, 0.0, 1.0, 0.0] * 5
    pooled = ev._pooled_stderr([ev._mean_stderr(a), ev._mean_stderr(b)], [20, 20])
    assert pooled == pytest.approx(ev._mean_stderr(a + b), rel=2e-2)


def test_group_scores_are_size_weighted(tok):
    model = _mistral(seed=4)
    t1 = MCQTask("t1", "biology", "s", _docs(3, seed=5))
    t2 = MCQTask("t2", "chemistry", "s", _docs(9, seed=6))
    res = ev.evaluate(model, tok, [t1, t2], groups={"g": ["t1", "t2"]}, progress=False)
    r = res["results"]
    assert res["groups"]["g"]["n"] == 12
    assert res["groups"]["g"]["acc"] == pytest.approx(
        (3 * r["t1"]["acc"] + 9 * r["t2"]["acc"]) / 12
    )


def test_cohere_logit_scale_vs_reference(tok):
    from transformers import AutoModelForCausalLM, CohereConfig

    cfg = CohereConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        logit_scale=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    task = MCQTask("t", "biology", "synthetic", _docs(4, seed=8))
    res = ev.evaluate(model, tok, [task], log_samples=True, progress=False)
    ref = reference_logliks(model, tok, task, "lm-eval-current", 256)
    got = [x for s in res["samples"] for x in s["loglikelihoods"]]
    assert max(abs(a - b) for (a, _), b in zip(ref, got)) <= 1e-4


def test_unknown_logit_postprocessing_falls_back_to_full_forward(tok, caplog):
    """A CausalLM whose forward changes the logits after lm_head in a way the split path does
    not know: the one-sequence check catches it and the results are still lm-eval's."""
    from transformers import MistralForCausalLM

    class Shifted(MistralForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.7 + torch.linspace(0, 3, out.logits.shape[-1])
            return out

    base = _mistral(seed=9)
    model = Shifted(base.config)
    model.load_state_dict(base.state_dict())
    model.eval()
    task = MCQTask("t", "biology", "synthetic", _docs(4, seed=9))
    res = ev.evaluate(model, tok, [task], log_samples=True, progress=False)
    assert "using full forward passes" in caplog.text
    ref = reference_logliks(model, tok, task, "lm-eval-current", 2048)
    got = [x for s in res["samples"] for x in s["loglikelihoods"]]
    assert max(abs(a - b) for (a, _), b in zip(ref, got)) <= 1e-4


def test_bad_limit_or_empty_task_is_refused_before_model_work():
    """With already loaded MCQTask objects, limit <= 0 must not silently drop questions
    (docs[:-1]) or divide by zero, and an empty task is a DataError naming it."""
    task = MCQTask("t", "biology", "synthetic.jsonl", _docs(3))
    for bad in (0, -1):
        with pytest.raises(
            ConfigError, match=f"limit must be a count >= 1 or a fraction in \\(0, 1\\), got {bad}"
        ):
            ev.evaluate(Boom(), Boom(), [task], limit=bad, progress=False)
    empty = MCQTask("t_empty", "biology", "empty.jsonl", [])
    with pytest.raises(DataError, match=r"t_empty \(empty\.jsonl\): no questions"):
        ev.evaluate(Boom(), Boom(), [task, empty], progress=False)


def test_group_naming_a_missing_task_is_refused_before_model_work():
    """groups= with MCQTask objects: a member that is not among the tasks is a ConfigError up
    front, not a KeyError after the whole run has been scored."""
    task = MCQTask("t1", "biology", "synthetic.jsonl", _docs(2))
    with pytest.raises(ConfigError, match=r"group 'g'.*'t2'"):
        ev.evaluate(Boom(), Boom(), [task], groups={"g": ["t1", "t2"]}, progress=False)


def test_tokenization_errors_name_task_and_doc_id(tok, monkeypatch):
    """A continuation that encodes to nothing (or is longer than max_length) is reported with
    the task and its doc_id, not a global question index across tasks."""
    t1 = MCQTask("t1", "biology", "a.jsonl", _docs(2, seed=1))
    t2 = MCQTask("t2", "chemistry", "b.jsonl", _docs(3, seed=2))
    proto = get_protocol("lm-eval-current")
    real = ev.encode_pairs

    def broken(tokenizer, contexts, conts, add_special_tokens):
        out = real(tokenizer, contexts, conts, add_special_tokens)
        ctx, cs = out[3]  # t2, doc_id 1
        out[3] = (ctx, [cs[0], [], cs[2], cs[3]])
        return out

    monkeypatch.setattr(ev, "encode_pairs", broken)
    with pytest.raises(ModelError, match=r"task t2 \(b\.jsonl\), doc_id 1"):
        ev.build_requests([t1, t2], tok, proto, 2048, "mistral")

    def long_cont(tokenizer, contexts, conts, add_special_tokens):
        out = real(tokenizer, contexts, conts, add_special_tokens)
        ctx, cs = out[2]  # t2, doc_id 0
        out[2] = (ctx, [cs[0], cs[1] * 3, cs[2], cs[3]])
        return out

    monkeypatch.setattr(ev, "encode_pairs", long_cont)
    with pytest.raises(ConfigError, match=r"task t2 \(b\.jsonl\), doc_id 0: .*--max-length"):
        ev.build_requests([t1, t2], tok, proto, 2, "mistral")


def test_mcqtask_docs_are_validated_before_model_work():
    """Already loaded MCQTask objects get the same row validation as files: 5 choices or an
    answer of 4 would otherwise be scored silently (zip drops choice E; acc can never count it)."""
    docs = _docs(3)
    for bad, field in (
        ({**docs[1], "answer": 4}, "answer"),
        ({**docs[1], "choices": list("abcde")}, "choices"),
    ):
        task = MCQTask("t", "biology", "mine.jsonl", [docs[0], bad, docs[2]])
        with pytest.raises(DataError, match=rf"task t \(mine\.jsonl\): row 1, field '{field}'"):
            ev.evaluate(Boom(), Boom(), [task], progress=False)


def test_nan_logits_name_task_and_doc_ids_and_suggest_a_dtype(tok, monkeypatch, caplog):
    """NaN/inf logits (float16 overflow): a ModelError naming the task and doc_id(s) and
    suggesting bfloat16/float32, not gather_logprobs' bare RuntimeError."""
    t1 = MCQTask("t1", "biology", "a.jsonl", _docs(3, seed=1))
    docs2 = _docs(4, seed=2)
    docs2[2] = {**docs2[2], "question": "zebra " * 30 + "?"}  # long: never the checked sequence
    t2 = MCQTask("t2", "chemistry", "b.jsonl", docs2)
    model = _mistral(seed=3)
    marker = tok(" zebra", add_special_tokens=False)["input_ids"][-1]
    real = ev._Scorer.logits_at

    def overflowing(self, ids, flat_rows):
        logits = real(self, ids, flat_rows).clone()
        T = ids.shape[1]
        hit = (ids == marker).any(dim=1)
        logits[hit[(flat_rows // T).to(hit.device)]] = float("nan")
        return logits

    monkeypatch.setattr(ev._Scorer, "logits_at", overflowing)
    with pytest.raises(ModelError) as info:
        ev.evaluate(model, tok, [t1, t2], progress=False, batch_tokens=10**6)
    msg = str(info.value)
    assert msg.startswith("task t2, doc_id 2: ") and "--dtype bfloat16" in msg
    assert "float32" in msg

    # the whole head NaN: already the one-sequence check of the split path names the docs
    monkeypatch.setattr(ev._Scorer, "logits_at", real)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ModelError, match=r"^task t\d, doc_id \d+: .*NaN or inf logits"):
        ev.evaluate(model, tok, [t1, t2], progress=False)
    assert "full forward" not in caplog.text  # not blamed on the split path


@pytest.mark.parametrize("arch", ["granite", "gemma3", "phi3", "olmo"])
def test_more_architectures_vs_reference(tok, caplog, arch):
    """Granite (logits divided by logits_scaling, embeddings multiplied), Gemma 3 (text),
    Phi-3 (fused qkv / gate_up) and OLMo: the split path (body + lm_head at the needed rows)
    equals a full forward per request, without falling back to full forwards."""
    import transformers

    base = dict(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.5,
    )  # fmt: skip
    extra = {
        "granite": ("GraniteConfig", dict(logits_scaling=4.0, embedding_multiplier=2.0)),
        "gemma3": ("Gemma3TextConfig", dict(head_dim=16)),
        "phi3": ("Phi3Config", {}),
        "olmo": ("OlmoConfig", {}),
    }
    name, kw = extra[arch]
    cfg = getattr(transformers, name)(**base, **kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    task = MCQTask("t", "biology", "synthetic", _docs(4, seed=8))
    with caplog.at_level("WARNING", logger="wmdp_fast"):
        res = ev.evaluate(model, tok, [task], log_samples=True, progress=False)
    assert "full forward" not in caplog.text
    ref = reference_logliks(model, tok, task, "lm-eval-current", 256)
    got = [x for s in res["samples"] for x in s["loglikelihoods"]]
    assert max(abs(a - b) for (a, _), b in zip(ref, got)) <= 1e-4
