"""MCQ data: local mirror layout, file formats, task/group resolution, validation errors."""

from __future__ import annotations

import json

import pytest

from wmdp_fast.data import (
    GROUPS,
    MMLU_CATEGORIES,
    MMLU_SUBJECTS,
    apply_limit,
    load_task,
    load_tasks,
    read_mcq_file,
    resolve_tasks,
    validate_row,
)
from wmdp_fast.errors import ConfigError, DataError

GOOD = {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_formats_round_trip(tmp_path):
    rows = [GOOD, {"question": "  Ünïcode ", "choices": ["", " ", "x", "y"], "answer": 0}]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    j = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for p in (j, tmp_path / "b.json", tmp_path / "c.parquet"):
        assert read_mcq_file(p) == rows


def test_json_file_holding_json_lines(tmp_path):
    """`datasets.Dataset.to_json("wmdp-bio.json")` (the natural way to build a mirror) writes
    JSON Lines under a .json name; lm-eval's `json` loader reads it, so must we."""
    rows = [GOOD, {"question": "Q2", "choices": ["w", "x", "y", "z"], "answer": 0}]
    p = tmp_path / "wmdp-bio.json"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert read_mcq_file(p) == rows
    assert load_task("wmdp_bio", tmp_path).docs == rows
    p.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "answer": 7}) + "\n")
    with pytest.raises(DataError, match=r"row 1 \(line 2\), field 'answer'"):
        read_mcq_file(p)


def test_mirror_layout_groups_and_limit(tmp_path):
    for stem in ("wmdp-bio", "wmdp-cyber", "wmdp-chem"):
        write_jsonl(tmp_path / f"{stem}.jsonl", [GOOD] * 3)
    (tmp_path / "mmlu").mkdir()
    for s in ("college_biology", "virology", "college_computer_science"):
        (tmp_path / "mmlu" / f"{s}.json").write_text(json.dumps([GOOD] * 2))
    write_jsonl(tmp_path / "mmlu" / "computer_security.jsonl", [GOOD])
    tasks, groups = load_tasks("wmdp,mmlu_paper", tmp_path, limit=2)
    assert [t.name for t in tasks] == [
        "wmdp_bio", "wmdp_cyber", "wmdp_chem", "mmlu_college_biology", "mmlu_virology",
        "mmlu_college_computer_science", "mmlu_computer_security",
    ]  # fmt: skip
    assert [len(t.docs) for t in tasks] == [2, 2, 2, 2, 2, 2, 1]
    assert groups["wmdp"] == ["wmdp_bio", "wmdp_cyber", "wmdp_chem"]
    assert tasks[0].subject == "biology" and tasks[1].subject == "cybersecurity"
    assert tasks[3].subject == "college biology"
    assert tasks[6].source.endswith("computer_security.jsonl")
    with pytest.raises(DataError, match=r"mmlu/anatomy\.jsonl"):
        load_task("mmlu_anatomy", tmp_path)


def test_resolve_tasks():
    tasks, groups = resolve_tasks(["mmlu", "mmlu_virology"])
    cats = ["mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"]
    assert len(tasks) == 57 == len(MMLU_SUBJECTS) and list(groups) == ["mmlu", *cats]
    assert sorted(t for c in cats for t in groups[c]) == sorted(groups["mmlu"])
    tasks, groups = resolve_tasks("mmlu_humanities")
    assert list(groups) == ["mmlu_humanities"] and len(tasks) == 13
    assert "mmlu_world_religions" in tasks and "mmlu_virology" not in tasks
    assert len(GROUPS["mmlu_paper"]) == 4
    tasks, groups = resolve_tasks("wmdp_bio, demo_forget")
    assert tasks == ["wmdp_bio", "demo_forget"] and groups == {}
    with pytest.raises(ConfigError, match="unknown task 'wmdp_physics'"):
        resolve_tasks("wmdp,wmdp_physics")
    with pytest.raises(ConfigError, match="no task"):
        resolve_tasks(" , ")


BAD_ROWS = [
    ({"choices": ["a", "b", "c", "d"], "answer": 0}, "field 'question': missing"),
    ({"question": "Q", "answer": 0}, "field 'choices': missing"),
    ({"question": "Q", "choices": ["a", "b", "c", "d"]}, "field 'answer': missing"),
    ({"question": "Q", "choices": ["a", "b", "c"], "answer": 0}, "exactly 4 choices, got 3"),
    ({"question": "Q", "choices": ["a", "b", "c", "d", "e"], "answer": 0}, "exactly 4"),
    ({"question": "Q", "choices": "abcd", "answer": 0}, "field 'choices': must be a list"),
    ({"question": "Q", "choices": ["a", 2, "c", "d"], "answer": 0}, r"field 'choices\[1\]'"),
    ({"question": "Q", "choices": ["a", None, "c", "d"], "answer": 0}, r"'choices\[1\]'"),
    ({"question": "Q", "choices": ["a", "b", "c", "d"], "answer": "2"}, "must be an integer"),
    ({"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 1.0}, "must be an integer"),
    ({"question": "Q", "choices": ["a", "b", "c", "d"], "answer": True}, "must be an integer"),
    ({"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 4}, "out of range"),
    ({"question": "Q", "choices": ["a", "b", "c", "d"], "answer": -1}, "out of range"),
    ({"question": " \n\t", "choices": ["a", "b", "c", "d"], "answer": 0}, "empty question"),
    ({"question": 7, "choices": ["a", "b", "c", "d"], "answer": 0}, "'question': must be a string"),
]


@pytest.mark.parametrize("row,msg", BAD_ROWS)
def test_bad_row_names_file_row_and_field(tmp_path, row, msg):
    path = write_jsonl(tmp_path / "wmdp-bio.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError, match=msg) as info:
        read_mcq_file(path)
    text = str(info.value)
    assert str(path) in text and "row 2 (line 3)" in text


def test_file_level_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"row 1 \(line 3\): invalid JSON"):
        read_mcq_file(p)
    (tmp_path / "y.json").write_text(json.dumps({"data": [GOOD]}))
    with pytest.raises(DataError, match="array"):
        read_mcq_file(tmp_path / "y.json")
    (tmp_path / "z.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no questions"):
        read_mcq_file(tmp_path / "z.jsonl")
    (tmp_path / "w.csv").write_text("q\n")
    with pytest.raises(DataError, match="unsupported"):
        read_mcq_file(tmp_path / "w.csv")
    with pytest.raises(DataError, match="not found"):
        read_mcq_file(tmp_path / "missing.jsonl")
    assert validate_row(dict(GOOD), "here") == GOOD


def test_bad_data_fails_before_any_model_work(tmp_path):
    """evaluate() validates every task before touching the model: a model that explodes on any
    attribute access is never reached."""
    from wmdp_fast.evaluate import evaluate

    write_jsonl(tmp_path / "wmdp-bio.jsonl", [GOOD])
    write_jsonl(tmp_path / "wmdp-cyber.jsonl", [GOOD])
    write_jsonl(tmp_path / "wmdp-chem.jsonl", [GOOD, {**GOOD, "answer": 9}])

    class Boom:
        def __getattr__(self, name):
            raise AssertionError(f"model touched ({name}) before validation finished")

    with pytest.raises(DataError, match=r"wmdp-chem\.jsonl: row 1 \(line 2\), field 'answer'"):
        evaluate(Boom(), Boom(), "wmdp", data_dir=tmp_path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_file_is_a_data_error_naming_file_and_line(tmp_path, suffix):
    """A Latin-1 task file: one DataError naming the file, the line and UTF-8 (it was a raw
    UnicodeDecodeError traceback)."""
    good = json.dumps(GOOD).encode()
    bad = json.dumps({**GOOD, "question": "caf\u00e9?"}, ensure_ascii=False).encode("latin-1")
    body = good + b"\n" + good + b"\n" + bad + b"\n"
    p = tmp_path / f"wmdp-bio{suffix}"
    p.write_bytes(body if suffix == ".jsonl" else b"[" + good + b",\n" + bad + b"]")
    with pytest.raises(DataError) as info:
        load_task("wmdp_bio", data_dir=tmp_path)
    line = 3 if suffix == ".jsonl" else 2
    assert f"{p}:{line} " in str(info.value) and "UTF-8" in str(info.value)


def test_mmlu_categories_are_lm_evals():
    """The four MMLU categories partition the 57 subjects exactly as lm-eval's subject yamls
    tag them (`tag: mmlu_<category>_tasks`)."""
    import re
    from pathlib import Path

    lm_tasks = pytest.importorskip("lm_eval.tasks")
    theirs: dict[str, set[str]] = {}
    for f in (Path(lm_tasks.__file__).parent / "mmlu" / "default").glob("mmlu_*.yaml"):
        text = f.read_text()
        cat = re.search(r'"?tag"?: "?mmlu_(\w+)_tasks"?', text).group(1)
        subject = re.search(r'"?dataset_name"?: "?(\w+)"?', text).group(1)
        theirs.setdefault(cat, set()).add(subject)
    assert {c: set(s) for c, s in MMLU_CATEGORIES.items()} == theirs
    assert sorted(s for subs in MMLU_CATEGORIES.values() for s in subs) == sorted(MMLU_SUBJECTS)


@pytest.mark.parametrize("limit", [None, 1, 2, 5, 40, 0.5, 0.01, 0.3, 2.7, 0.999])
def test_limit_is_lm_evals(tmp_path, limit):
    """--limit as lm-eval's get_sample_size: a count, or below 1 a fraction rounded up."""
    evaluator_utils = pytest.importorskip("lm_eval.evaluator_utils")
    rows = [{**GOOD, "question": f"Q{i}?"} for i in range(7)]
    write_jsonl(tmp_path / "wmdp-bio.jsonl", rows)
    docs = load_task("wmdp_bio", tmp_path, limit).docs
    n = evaluator_utils.get_sample_size(type("T", (), {"eval_docs": rows})(), limit)
    assert docs == rows[: (7 if n is None else n)]


def test_bad_limits():
    for bad in (0, -1, 0.0, "3", True, float("nan")):
        with pytest.raises(ConfigError, match="--limit must be"):
            apply_limit([GOOD], bad)


def test_bom_and_single_object_files_read_as_lm_evals_json_loader(tmp_path):
    """A UTF-8 BOM at the start (Windows editors, PowerShell) and a .json holding ONE question
    object (`Dataset.to_json` of a one-row set) are read by lm-eval's loader (`datasets`'
    json builder strips a leading BOM; a lone object is one row); they were refused here
    ("Unexpected UTF-8 BOM", "must hold an array")."""
    rows = [GOOD, {"question": "Q2", "choices": ["w", "x", "y", "z"], "answer": 0}]
    lines = "".join(json.dumps(r) + "\r\n" for r in rows) + "\r\n"
    files = {
        "bom.jsonl": ("\ufeff" + lines, rows),
        "bom_lines.json": ("\ufeff" + lines, rows),
        "bom_array.json": ("\ufeff" + json.dumps(rows, indent=1), rows),
        "one.json": (json.dumps(rows[1]) + "\n", rows[1:]),
    }
    for name, (text, want) in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
        assert read_mcq_file(tmp_path / name) == want, name
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    for name, (_, want) in files.items():
        theirs = datasets.load_dataset(
            "json", data_files=str(tmp_path / name), split="train", cache_dir=str(tmp_path / "c")
        )
        assert [dict(r) for r in theirs] == want, name
    # a dict of columns is ONE row of lists to that loader, never the questions: still refused
    (tmp_path / "cols.json").write_text(json.dumps({k: [r[k] for r in rows] for k in GOOD}))
    with pytest.raises(DataError, match="array of question objects.*columns"):
        read_mcq_file(tmp_path / "cols.json")


def test_infinite_limit_is_a_config_error():
    """limit=inf passed the check, then int(inf) raised OverflowError in apply_limit."""
    with pytest.raises(ConfigError, match="--limit must be"):
        apply_limit([GOOD], float("inf"))
