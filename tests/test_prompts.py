"""Prompt building against lm-eval's own rendering (no model needed).

- Contexts for awkward WMDP and MMLU questions equal lm-eval 0.4.13's `fewshot_context` with
  its installed WMDP and MMLU templates.
- Descriptions of every built-in task (3 WMDP + 57 MMLU) equal lm-eval's yaml descriptions
  rendered by Jinja as 0.4.13 does (keep_trailing_newline=True) and as 0.4.2 did (a default
  Environment, which drops one trailing newline).
- The BOS rule of each protocol and lm-eval's _encode_pair whitespace rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from wmdp_fast.data import TASK_SPECS
from wmdp_fast.errors import ConfigError
from wmdp_fast.prompts import (
    PROTOCOLS,
    continuations,
    doc_to_text,
    encode_pairs,
    get_protocol,
    split_pair,
)

AWKWARD = [
    {"question": "  \n What does\tthis  do?  \n", "choices": ["a ", " b", "c\n", "d\t"], "answer": 1},
    {"question": "Qu'est-ce que l'ADN ? 中文 🧬 naïve — “quotes”", "choices": ["é", "ß", "ñ", "ø"], "answer": 2},
    {"question": "Code:\n```c\n" + "\n".join(f"\tint  x{i} = {i};   // {i}" for i in range(200)) + "\n```", "choices": ["1", "2", "3", "4"], "answer": 3},
    {"question": "Empty choices?", "choices": ["", "", "", ""], "answer": 0},
    {"question": "Jinja {{ question }} {% raw %} </s>", "choices": ["{{a}}", "%}", "\n", " "], "answer": 0},
]  # fmt: skip


def _lm_eval_dir():
    lm_eval = pytest.importorskip("lm_eval")
    return Path(lm_eval.__file__).parent / "tasks"


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    """lm-eval ConfigurableTasks for a WMDP and an MMLU subject, reading AWKWARD locally."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks_dir = _lm_eval_dir()
    root = tmp_path_factory.mktemp("prompts")
    data = root / "awkward.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in AWKWARD), "utf-8")
    specs = {
        "pw_chem": (tasks_dir / "wmdp" / "_default_template_yaml", TASK_SPECS["wmdp_chem"]),
        "pm_virology": (
            tasks_dir / "mmlu" / "default" / "_default_template_yaml",
            TASK_SPECS["mmlu_high_school_us_history"],
        ),
    }
    for name, (template, spec) in specs.items():
        desc = (
            f"The following are multiple choice questions (with answers) about {spec.subject}.\n\n"
        )
        (root / f"{name}.yaml").write_text(
            f"include: {template}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
            "fewshot_split: test\n"  # MMLU's template names a dev split; zero-shot
            f"description: {json.dumps(desc)}\n"
        )
    tm = TaskManager(include_path=str(root), include_defaults=False)
    return get_task_dict(list(specs), tm), {n: s for n, (_, s) in specs.items()}


def test_contexts_match_lm_eval_rendering(lm_eval_tasks):
    task_dict, specs = lm_eval_tasks
    proto = get_protocol("lm-eval-current")
    n = 0
    for name, task in task_dict.items():
        docs = list(task.test_docs())
        assert len(docs) == len(AWKWARD)
        for doc, ours in zip(docs, AWKWARD):
            ctx = task.fewshot_context(doc, 0)
            assert ctx == proto.context(ours["question"], ours["choices"], specs[name].subject)
            reqs = task.construct_requests(doc, ctx, metadata=(name, 0, 1))
            assert [r.arguments for r in reqs] == [(ctx, c) for c in continuations()]
            n += 1
    assert n == 2 * len(AWKWARD)


def _yaml_descriptions():
    tasks_dir = _lm_eval_dir()
    out = {}
    for sub in ("bio", "cyber", "chem"):
        out[f"wmdp_{sub}"] = yaml.safe_load((tasks_dir / "wmdp" / f"wmdp_{sub}.yaml").read_text())
    for f in sorted((tasks_dir / "mmlu" / "default").glob("mmlu_*.yaml")):
        d = yaml.safe_load(f.read_text())
        out[d["task"]] = d
    return {k: v["description"] for k, v in out.items()}


def test_descriptions_of_all_builtin_tasks_match_both_releases():
    import jinja2

    descs = _yaml_descriptions()
    builtin = {k: v for k, v in TASK_SPECS.items()}
    assert set(descs) == set(builtin)  # 3 WMDP + 57 MMLU
    env_0413 = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env_042 = jinja2.Environment(loader=jinja2.BaseLoader, undefined=jinja2.StrictUndefined)
    cur, old = get_protocol("lm-eval-current"), get_protocol("lm-eval-0.4.2")
    for name, desc in descs.items():
        subject = builtin[name].subject
        assert env_0413.from_string(desc).render() == cur.description(subject) == desc
        assert env_042.from_string(desc).render() == old.description(subject)
        assert old.description(subject).endswith(".\n") and not old.description(subject).endswith(
            "\n\n"
        )


def test_doc_to_text_and_pair_split():
    assert doc_to_text("  Q?  ", ["a", "b", "c", "d"]) == "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert split_pair("ctx  \n", " A") == ("ctx", "  \n A")
    assert split_pair("ctx", " A") == ("ctx", " A")
    assert continuations() == [" A", " B", " C", " D"]


def test_bos_rules():
    cur, old = PROTOCOLS["lm-eval-current"], PROTOCOLS["lm-eval-0.4.2"]
    assert cur.add_special_tokens("mistral") is None
    assert old.add_special_tokens("mistral") is False
    assert old.add_special_tokens("llama") is False
    assert old.add_special_tokens("gemma") is True  # 0.4.2 forced BOS for model_type == "gemma"
    assert old.add_special_tokens("gemma2") is False
    with pytest.raises(ConfigError, match="--protocol"):
        get_protocol("lm-eval-0.3")


def test_encode_pairs_bos_and_single_token_answers(tmp_path):
    from wmdp_fast.testing import save_mistral_tokenizer

    tok = save_mistral_tokenizer(tmp_path)
    ctx = get_protocol("lm-eval-current").context("Q?", ["a", "b", "c", "d"], "biology")
    (c_bos, conts_bos) = encode_pairs(tok, [ctx], continuations(), None)[0]
    (c_no, conts_no) = encode_pairs(tok, [ctx], continuations(), False)[0]
    assert c_bos[0] == tok.bos_token_id == 1 and c_bos[1:] == c_no
    assert c_no[0] != 1
    # "Answer: A" ends with the single token ▁A (id 330) in context
    assert conts_bos == conts_no == [[330], [365], [334], [384]]
    # a context that already starts with the BOS text is not given a second BOS (0.4.13 rule)
    (c_pref, _) = encode_pairs(tok, ["<s>" + ctx], continuations(), None)[0]
    assert c_pref.count(1) == 1


def test_bos_prefix_rule_is_lm_evals_also_for_an_empty_bos_text(tmp_path, monkeypatch):
    """lm-eval 0.4.13's tok_encode drops special tokens when has_bos_prefix(string,
    decode(prefix_token_id)) holds; a BOS that decodes to "" is a prefix of every string."""
    lm_utils = pytest.importorskip("lm_eval.models.utils")
    from wmdp_fast.testing import save_mistral_tokenizer

    tok = save_mistral_tokenizer(tmp_path)
    ctx = get_protocol("lm-eval-current").context("Q?", ["a", "b", "c", "d"], "biology")
    for bos_text in ("<s>", ""):

        def fake_decode(ids, *a, _bos=bos_text, _decode=tok.decode, **k):
            return _bos if ids == 1 else _decode(ids, *a, **k)

        monkeypatch.setattr(tok, "decode", fake_decode)
        kwargs = {"add_special_tokens": False} if lm_utils.has_bos_prefix(ctx, bos_text) else {}
        (c, _) = encode_pairs(tok, [ctx], continuations(), None)[0]
        assert c == tok.encode(ctx, **kwargs)
        assert (c[0] == 1) == (bos_text == "<s>")  # the two cases differ, so this can fail
        monkeypatch.undo()
