"""Optional: the `lm-eval-0.4.2` protocol against the REAL lm-eval 0.4.2 (the paper's release).

lm-eval 0.4.2 cannot be installed beside the 0.4.13 dev dependency, so this test runs it in a
subprocess from an unpacked wheel and is skipped unless WMDP_FAST_LM_EVAL_042 names that
folder:

    pip download lm_eval==0.4.2 --no-deps -d /tmp/lme042
    unzip -q /tmp/lme042/lm_eval-0.4.2-py3-none-any.whl -d /tmp/lme042/src
    WMDP_FAST_LM_EVAL_042=/tmp/lme042/src python -m pytest tests/test_evaluate_lmeval042.py

0.4.2 loads HF `evaluate`'s exact_match from the hub and imports peft at import time; the
driver stubs both (neither is used by multiple-choice scoring). It runs 0.4.2's own
`tasks/wmdp/_default_template_yaml` with its own HFLM defaults (no add_bos_token argument).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

LM_EVAL_042 = os.environ.get("WMDP_FAST_LM_EVAL_042")
pytestmark = pytest.mark.skipif(
    not (LM_EVAL_042 and (Path(LM_EVAL_042) / "lm_eval" / "__init__.py").is_file()),
    reason="set WMDP_FAST_LM_EVAL_042 to an unpacked lm_eval 0.4.2 wheel",
)

DRIVER = r"""
import importlib.machinery, json, sys, types
import evaluate as hf_evaluate
hf_evaluate.load = lambda *a, **k: types.SimpleNamespace(compute=lambda **kw: {})
peft = types.ModuleType("peft")
peft.__spec__ = importlib.machinery.ModuleSpec("peft", None)
peft.PeftModel = type("PeftModel", (), {})
peft.__version__ = "0.10.0"
sys.modules["peft"] = peft
import lm_eval
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, task_dir, task, out = sys.argv[1:5]
m = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
tok = AutoTokenizer.from_pretrained(model_dir)
lm = HFLM(pretrained=m, tokenizer=tok, batch_size=8, device="cpu")
r = simple_evaluate(lm, tasks=[task], task_manager=TaskManager(include_path=task_dir),
                    log_samples=True)
samples = {name: [{"doc_id": s["doc_id"], "ctx": s["arguments"][0][0],
                   "lls": [x[0][0] for x in s["resps"]]} for s in ss]
           for name, ss in r["samples"].items()}
json.dump({"results": r["results"], "samples": samples, "file": lm_eval.__file__},
          open(out, "w"))
"""


def run_lm_eval_042(tmp_path: Path, model_dir: Path, tasks: Path, task: str) -> dict:
    """Run the real lm-eval 0.4.2 on `task` (a task or group of the yamls in `tasks`)."""
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / f"out_{task}.json"
    env = {**os.environ, "PYTHONPATH": LM_EVAL_042}
    subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(model_dir), str(tasks), task, str(out)],
        check=True, env=env, cwd=tmp_path, capture_output=True, timeout=600,
    )  # fmt: skip
    theirs = json.loads(out.read_text())
    assert theirs["file"].startswith(LM_EVAL_042)
    return theirs


def task_yaml(name: str, data: Path, group: str) -> str:
    template = Path(LM_EVAL_042) / "lm_eval" / "tasks" / "wmdp" / "_default_template_yaml"
    return (
        f"include: {template}\ntask: {name}\ngroup: {group}\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'description: "The following are multiple choice questions (with answers) about '
        'biology.\\n\\n"\n'
    )


def test_protocol_042_matches_real_lm_eval_042(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_evaluate_parity import awkward_docs, random_docs

    from wmdp_fast.data import MCQTask, read_mcq_file
    from wmdp_fast.evaluate import evaluate
    from wmdp_fast.models import load_model, load_tokenizer
    from wmdp_fast.prompts import get_protocol
    from wmdp_fast.testing import make_tiny_model

    docs = awkward_docs() + random_docs(random.Random(7), 10)
    data = tmp_path / "bio.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8")
    model_dir = make_tiny_model(tmp_path / "mistral", arch="mistral", seed=0, sliding_window=32)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "v_bio.yaml").write_text(task_yaml("v_bio", data, "v_grp"))
    theirs = run_lm_eval_042(tmp_path, model_dir, tasks, "v_bio")
    lm = sorted(theirs["samples"]["v_bio"], key=lambda s: s["doc_id"])

    model, tok = load_model(str(model_dir), "float32", "cpu"), load_tokenizer(str(model_dir))
    task = MCQTask("v_bio", "biology", str(data), read_mcq_file(data))
    proto = get_protocol("lm-eval-0.4.2")
    ours = evaluate(model, tok, [task], protocol="lm-eval-0.4.2", log_samples=True, progress=False)
    for s, t, doc in zip(lm, ours["samples"], task.docs):
        assert s["ctx"] == proto.context(doc["question"], doc["choices"], "biology")
        assert max(abs(a - b) for a, b in zip(s["lls"], t["loglikelihoods"])) <= 1e-4
        assert t["pred"] == max(range(4), key=lambda i: (s["lls"][i], -i))
    assert ours["results"]["v_bio"]["acc"] == pytest.approx(theirs["results"]["v_bio"]["acc,none"])
    # and the current protocol does NOT reproduce 0.4.2 (the check can fail)
    cur = evaluate(model, tok, [task], log_samples=True, progress=False)
    assert (
        max(
            abs(a - b)
            for s, t in zip(lm, cur["samples"])
            for a, b in zip(s["lls"], t["loglikelihoods"])
        )
        > 0.1
    )


def test_nested_group_matches_real_lm_eval_042(tmp_path, monkeypatch):
    """A group of groups, as 0.4.2 defined `mmlu` (subject yamls say `group: mmlu_stem`, ...;
    `_mmlu.yaml` lists the four categories): 0.4.2 pools the subgroups' stderrs, and the
    lm-eval-0.4.2 protocol must give its numbers for every level."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_evaluate_parity import random_docs

    from wmdp_fast import data as data_mod
    from wmdp_fast.data import MCQTask
    from wmdp_fast.evaluate import evaluate
    from wmdp_fast.models import load_model, load_tokenizer
    from wmdp_fast.testing import make_tiny_model

    rng = random.Random(11)
    parts = {"v_a": random_docs(rng, 6), "v_b": random_docs(rng, 9), "v_c": random_docs(rng, 7)}
    model_dir = make_tiny_model(tmp_path / "mistral", arch="mistral", seed=0, sliding_window=32)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, docs in parts.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps(d) + "\n" for d in docs), "utf-8")
        (tasks / f"{name}.yaml").write_text(task_yaml(name, f, "v_g2" if name == "v_c" else "v_g1"))
    (tasks / "v_outer.yaml").write_text("group: v_outer\ntask:\n  - v_g1\n  - v_g2\n")
    theirs = run_lm_eval_042(tmp_path, model_dir, tasks, "v_outer")["results"]

    model, tok = load_model(str(model_dir), "float32", "cpu"), load_tokenizer(str(model_dir))
    objs = [MCQTask(n, "biology", n, docs) for n, docs in parts.items()]
    groups = {"v_outer": ["v_a", "v_b", "v_c"], "v_g1": ["v_a", "v_b"], "v_g2": ["v_c"]}
    monkeypatch.setitem(data_mod.SUBGROUPS, "v_outer", ("v_g1", "v_g2"))
    ours = evaluate(model, tok, objs, groups=groups, protocol="lm-eval-0.4.2", progress=False)
    for g in groups:
        assert ours["groups"][g]["acc"] == pytest.approx(theirs[g]["acc,none"], abs=1e-12)
        assert ours["groups"][g]["acc_stderr"] == pytest.approx(
            theirs[g]["acc_stderr,none"], rel=1e-9
        )
    # pooled over the leaves instead (0.4.13's rule) it differs, so the check above can fail
    from wmdp_fast.evaluate import _pooled_stderr

    leaves = [ours["results"][n] for n in parts]
    flat = _pooled_stderr([r["acc_stderr"] for r in leaves], [r["n"] for r in leaves])
    assert abs(flat - theirs["v_outer"]["acc_stderr,none"]) > 1e-4 * flat
