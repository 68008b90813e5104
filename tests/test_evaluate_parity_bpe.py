"""Parity of wmdp_fast.evaluate with the REAL lm-eval 0.4.13 on a byte-level BPE tokenizer.

tests/test_evaluate_parity.py checks the engine with the SentencePiece Mistral v1 tokenizer;
Llama-3, Qwen2 and Mistral NeMo use byte-level BPE instead (regex pre-tokenizer, 'Ġ' spaces,
bytes for any unicode). Here: Mistral NeMo's real "tekken" tokenizer (131,072 tokens, converted
offline by wmdp_fast.testing.save_tekken_tokenizer) in a Llama-3-like flavour (the tokenizer
prepends BOS) on a tiny Llama, and a Qwen2-like one (no BOS token at all; transformers 5 loads
it as Qwen2Tokenizer, with Qwen2's NFC normalizer and regex) on a tiny Qwen2 whose 160 positions
left-truncate the long questions. float32 on the CPU; lm-eval's HFLM and simple_evaluate run its
own WMDP template on the same local files and model objects. Every log-likelihood (<= 1e-4),
is_greedy, prediction, accuracy, stderr and the group; ~15 s here for the module.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("mistral_common")

from test_evaluate_parity import (  # noqa: E402
    SUBJECTS,
    awkward_docs,
    check_parity,
    load,
    random_docs,
    write_jsonl,
)

from wmdp_fast.data import MCQTask, read_mcq_file  # noqa: E402
from wmdp_fast.evaluate import build_requests  # noqa: E402
from wmdp_fast.prompts import continuations, encode_pairs, get_protocol  # noqa: E402
from wmdp_fast.testing import make_tiny_model, save_tekken_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ANSWER_IDS = [1349, 1398, 1359, 1407]  # " A".." D" after "Answer:" in tekken
MAX_LEN_QWEN = 160


def bpe_docs() -> list[dict]:
    """What byte-level BPE splits differently from SentencePiece: digit runs, emoji with ZWJ and
    variation selectors, combining marks, CRLF, lone spaces and tabs at the ends."""
    return [
        {"question": "\t 12345678 + 0.5e-3 = ?   ", "choices": ["  ", "\t", "1,000,000", "١٢٣"], "answer": 3},
        {"question": "👨‍👩‍👧‍👦 vs ❤️ vs 🇫🇷: cafe\u0301 Ångström\r\nline two\r\n", "choices": ["👍🏽", "e\u0301", "\r\n", "Ω"], "answer": 1},
        {"question": " leading space,trailing newline\n\n", "choices": [" A", "Answer:", "B.", " "], "answer": 0},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_bpe")
    rng = random.Random(99)
    files = {
        "p_bio": write_jsonl(
            root / "p_bio.jsonl", awkward_docs() + bpe_docs() + random_docs(rng, 3)
        ),
        "p_cyber": write_jsonl(root / "p_cyber.jsonl", random_docs(rng, 6)),
    }
    tasks = [MCQTask(n, SUBJECTS[n], str(p), read_mcq_file(p)) for n, p in files.items()]
    # vocab 131072: a narrow body keeps the embeddings and the LM head at ~17 MB each
    small = dict(vocab_size=131072, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    llama3 = make_tiny_model(root / "llama3", arch="llama", seed=7, with_tokenizer=False, **small)
    qwen2 = make_tiny_model(
        root / "qwen2",
        arch="qwen2",
        seed=11,
        with_tokenizer=False,
        max_position_embeddings=MAX_LEN_QWEN,
        **small,
    )
    save_tekken_tokenizer(llama3, bos=True)
    save_tekken_tokenizer(qwen2, bos=False)
    return {"root": root, "files": files, "tasks": tasks, "llama3": llama3, "qwen2": qwen2}


@pytest.mark.slow
def test_tekken_tokenizer_facts(kit):
    """The Llama-3-like tokenizer is the real tekken (the ids of mistral_common's own Tekkenizer
    on ordinary text); BOS only in that flavour; " A".." D" are single tokens everywhere."""
    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    _, bos_tok = load(kit["llama3"])
    _, nobos_tok = load(kit["qwen2"])
    assert len(bos_tok) == len(nobos_tok) == 131072
    assert (bos_tok.bos_token, bos_tok.bos_token_id, bos_tok.eos_token_id) == ("<s>", 1, 2)
    assert nobos_tok.bos_token is None and nobos_tok.bos_token_id is None
    assert nobos_tok.eos_token_id == nobos_tok.pad_token_id == 2
    assert bos_tok("Answer: A")["input_ids"] == [1, 31106, 1058, 1349]
    assert nobos_tok("Answer: A")["input_ids"] == [31106, 1058, 1349]
    assert bos_tok("Answer: A", add_special_tokens=False)["input_ids"] == [31106, 1058, 1349]

    native = Tekkenizer.from_file(
        str(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")
    )
    proto = get_protocol("lm-eval-current")
    texts = [
        proto.context(d["question"], d["choices"], "biology") + " A"
        for d in awkward_docs() + bpe_docs()
        if "<s>" not in d["question"]  # HF reads "</s>" / "<s>" in text as specials; tekken not
    ]
    for t in texts:
        assert bos_tok(t, add_special_tokens=False)["input_ids"] == native.encode(t, False, False)
    # next to a qwen2 config.json, transformers 5 loads the Qwen2-like folder as Qwen2Tokenizer:
    # tekken's vocab and merges under Qwen2's own NFC normalizer and pre-tokenizer regex
    nfd, nfc = "cafe\u0301", "caf\u00e9"
    assert nobos_tok(nfd)["input_ids"] == nobos_tok(nfc)["input_ids"]
    assert bos_tok(nfd)["input_ids"] != bos_tok(nfc)["input_ids"]
    # every question's " A".." D" is one token, the same four ids, for both flavours
    for arch in ("llama3", "qwen2"):
        _, tok = load(kit[arch])
        docs = [(d, t.subject) for t in kit["tasks"] for d in t.docs]
        ctxs = [proto.context(d["question"], d["choices"], subject) for d, subject in docs]
        for ctx_ids, conts in encode_pairs(tok, ctxs, continuations(), None):
            assert conts == [[i] for i in ANSWER_IDS]
            assert (ctx_ids[0] == 1) == (arch == "llama3")
        model_type = "llama" if arch == "llama3" else arch
        _, _, single = build_requests(kit["tasks"], tok, proto, 2048, model_type)
        assert single == len(ctxs)
    # byte-level pieces: a space is 'Ġ', CJK and emoji are byte pieces
    pieces = bos_tok.convert_ids_to_tokens(bos_tok("Runs   of 中文 🧬")["input_ids"])
    assert pieces == ["<s>", "R", "uns", "ĠĠ", "Ġof", "Ġä¸Ń", "æĸĩ", "ĠðŁ", "§", "¬"]


CASES = [
    # (model, protocol, description newlines lm-eval is given, add_bos_token for HFLM)
    ("llama3", "lm-eval-current", "\n\n", None),
    ("qwen2", "lm-eval-current", "\n\n", None),
    # lm-eval 0.4.2 = no BOS + a description that lost one trailing newline to Jinja
    ("llama3", "lm-eval-0.4.2", "\n", False),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,protocol,newlines,bos", CASES)
def test_parity_with_lm_eval_bpe(kit, arch, protocol, newlines, bos):
    # lm-eval at batch 2: its float32 log-softmax over [batch, length, 131072] is ~0.2 GB per
    # row of 400 tokens
    ours = check_parity(kit, arch, protocol, newlines, bos, lm_eval_batch_size=2)
    first_is_bos = arch == "llama3" and protocol == "lm-eval-current"
    for ctx_ids, cont_ids in ours["_encodings"]:
        assert cont_ids == [[i] for i in ANSWER_IDS]
        assert (ctx_ids[0] == 1) == first_is_bos
    # the random models must make the comparison meaningful: predictions vary
    assert len({s["pred"] for s in ours["samples"]}) >= 3
    if arch == "qwen2":  # the long-code question was left-truncated to the model's 160 positions
        assert max(len(c) for c, _ in ours["_encodings"]) > MAX_LEN_QWEN
