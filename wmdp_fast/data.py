"""Multiple-choice sets (WMDP, MMLU, the demo): hub or local files, validated before use.

Every question is a dict ``{"question": str, "choices": [4 str], "answer": int 0..3}``. Sources:

- the Hugging Face hub through `datasets` (``cais/wmdp``, ``cais/mmlu``; split ``test``);
- a local mirror ``--data-dir DIR`` with one file per hub config: ``DIR/wmdp-bio.jsonl``
  (or ``.json`` / ``.parquet``), ``DIR/wmdp-cyber.*``, ``DIR/wmdp-chem.*``,
  ``DIR/mmlu/<subject>.*``;
- the embedded demo sets (``demo_forget``, ``demo_retain``) shipped in `wmdp_fast.demo`.

Validation is complete before anything is scored: a bad row raises `DataError` naming the
file, the row (0-based, = lm-eval's doc_id; JSONL also gives the line) and the field.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from wmdp_fast.errors import ConfigError, DataError

log = logging.getLogger("wmdp_fast")

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip
MMLU_PAPER_SUBJECTS = (
    "college_biology",
    "virology",
    "college_computer_science",
    "computer_security",
)
# lm-eval's MMLU categories (the subject yamls' `tag: mmlu_<category>_tasks` in 0.4.13,
# `group: mmlu_<category>` in 0.4.2: the same split), in the order of lm-eval's _mmlu.yaml
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics",
        "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
        "human_aging", "management", "marketing", "medical_genetics", "miscellaneous",
        "nutrition", "professional_accounting", "professional_medicine", "virology",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
        "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
        "world_religions",
    ),
}  # fmt: skip
EXTENSIONS = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's questions live and which subject its description names."""

    name: str
    subject: str
    hub_path: str | None = None  # datasets path, e.g. "cais/wmdp"
    hub_config: str | None = None  # datasets config name, e.g. "wmdp-bio"
    local_stem: str | None = None  # file stem under --data-dir, e.g. "wmdp-bio", "mmlu/virology"
    file: Path | None = None  # a fixed file (demo tasks)


@dataclass
class MCQTask:
    """A validated multiple-choice set. docs[i] is lm-eval's doc_id i."""

    name: str
    subject: str
    source: str
    docs: list[dict] = field(default_factory=list)


def _builtin_specs() -> dict[str, TaskSpec]:
    specs = {}
    for sub, subject in (("bio", "biology"), ("cyber", "cybersecurity"), ("chem", "chemistry")):
        specs[f"wmdp_{sub}"] = TaskSpec(
            f"wmdp_{sub}", subject, "cais/wmdp", f"wmdp-{sub}", f"wmdp-{sub}"
        )
    for s in MMLU_SUBJECTS:
        specs[f"mmlu_{s}"] = TaskSpec(f"mmlu_{s}", s.replace("_", " "), "cais/mmlu", s, f"mmlu/{s}")
    return specs


TASK_SPECS: dict[str, TaskSpec] = _builtin_specs()
GROUPS: dict[str, tuple[str, ...]] = {
    "wmdp": ("wmdp_bio", "wmdp_cyber", "wmdp_chem"),
    "mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS),
    **{f"mmlu_{c}": tuple(f"mmlu_{s}" for s in subs) for c, subs in MMLU_CATEGORIES.items()},
    "mmlu_paper": tuple(f"mmlu_{s}" for s in MMLU_PAPER_SUBJECTS),
}
# groups made of groups, as lm-eval defines them: naming the parent also reports the children
# (`--tasks mmlu` reports mmlu_stem, mmlu_other, ... as lm-eval does)
SUBGROUPS: dict[str, tuple[str, ...]] = {"mmlu": tuple(f"mmlu_{c}" for c in MMLU_CATEGORIES)}
DEMO_TASKS = ("demo_forget", "demo_retain")


def _demo_spec(name: str) -> TaskSpec:
    from wmdp_fast import demo

    files = getattr(demo, "DEMO_TASK_FILES", {})
    subjects = getattr(demo, "DEMO_SUBJECTS", {})
    if name not in files:
        raise DataError(f"demo task {name!r}: wmdp_fast.demo.DEMO_TASK_FILES has no entry for it")
    return TaskSpec(name, subjects.get(name, name.replace("_", " ")), file=Path(files[name]))


def task_spec(name: str) -> TaskSpec:
    if name in TASK_SPECS:
        return TASK_SPECS[name]
    if name in DEMO_TASKS:
        return _demo_spec(name)
    raise ConfigError(
        f"--tasks: unknown task {name!r}; known: groups {sorted(GROUPS)}, "
        f"{', '.join(DEMO_TASKS)}, wmdp_bio/wmdp_cyber/wmdp_chem and mmlu_<subject>"
    )


def resolve_tasks(names: str | list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Expand task and group names ("wmdp,mmlu_paper" or a list) into (tasks, groups).

    tasks: unique task names in order; groups: {group: [its tasks]} for each group named, and
    for `mmlu` also its four lm-eval categories (mmlu_stem, mmlu_other, mmlu_social_sciences,
    mmlu_humanities).
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = [n for n in names if n]
    if not names:
        raise ConfigError("--tasks: no task given (e.g. --tasks wmdp,mmlu)")
    tasks: list[str] = []
    groups: dict[str, list[str]] = {}
    for n in names:
        members = list(GROUPS[n]) if n in GROUPS else [n]
        if n in GROUPS:
            groups[n] = members
            for sub in SUBGROUPS.get(n, ()):
                groups.setdefault(sub, list(GROUPS[sub]))
        for m in members:
            task_spec(m)
            if m not in tasks:
                tasks.append(m)
    return tasks, groups


# ----------------------------------------------------------------------------- validation


def validate_row(row, where: str) -> dict:
    """Check one question; returns the clean {"question", "choices", "answer"} dict."""
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object with question/choices/answer, got {type(row).__name__}"
        )
    for key in ("question", "choices", "answer"):
        if key not in row:
            raise DataError(
                f"{where}, field '{key}': missing (each row needs question, choices, answer)"
            )
    q = row["question"]
    if not isinstance(q, str):
        raise DataError(f"{where}, field 'question': must be a string, got {type(q).__name__}")
    if not q.strip():
        raise DataError(f"{where}, field 'question': empty question")
    choices = row["choices"]
    if hasattr(choices, "tolist"):  # numpy arrays from parquet readers
        choices = choices.tolist()
    if not isinstance(choices, (list, tuple)):
        raise DataError(
            f"{where}, field 'choices': must be a list of 4 strings, got {type(choices).__name__}"
        )
    if len(choices) != 4:
        raise DataError(f"{where}, field 'choices': needs exactly 4 choices, got {len(choices)}")
    for i, c in enumerate(choices):
        if not isinstance(c, str):
            raise DataError(
                f"{where}, field 'choices[{i}]': must be a string, got {type(c).__name__} ({c!r})"
            )
    ans = row["answer"]
    if isinstance(ans, bool) or not isinstance(ans, numbers.Integral):
        raise DataError(f"{where}, field 'answer': must be an integer 0..3, got {ans!r}")
    if not 0 <= int(ans) <= 3:
        raise DataError(f"{where}, field 'answer': {int(ans)} is out of range 0..3")
    return {"question": q, "choices": list(choices), "answer": int(ans)}


def not_utf8_error(path: str | Path, exc: UnicodeDecodeError) -> DataError:
    """The DataError for a text file that is not UTF-8, naming the line of the first bad byte
    (the file is read again as bytes to find it: `exc.start` counts from a decoder chunk)."""
    try:
        raw = Path(path).read_bytes()
        raw.decode("utf-8")
    except UnicodeDecodeError as again:
        line = raw.count(b"\n", 0, again.start) + 1
        where = f"{path}:{line} (byte {again.start})"
    except OSError:
        where = str(path)
    else:  # pragma: no cover - the file changed between the two reads
        where = str(path)
    return DataError(
        f"{where}: not valid UTF-8 ({exc.reason}); the file must be UTF-8 encoded (re-save it "
        "as UTF-8, e.g. iconv -f latin1 -t utf-8)"
    )


def _jsonl_rows(path: Path) -> list[tuple[object, str]]:
    """(parsed object, "file: row R (line L)") per non-blank line of a JSON Lines file."""
    rows: list[tuple[object, str]] = []
    try:
        # utf-8-sig: a leading BOM is dropped, as lm-eval's loader (`datasets`' json builder) does
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}: row {len(rows)} (line {lineno})"
                try:
                    rows.append((json.loads(line), where))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise not_utf8_error(path, exc) from exc
    return rows


def read_mcq_file(path: str | Path) -> list[dict]:
    """Read and validate a .jsonl / .json (array of objects, or JSON Lines) / .parquet MCQ file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    rows: list[tuple[object, str]] = []
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise not_utf8_error(path, exc) from exc
        except json.JSONDecodeError as exc:
            # several top-level values: JSON Lines, as datasets' Dataset.to_json writes (and
            # lm-eval's `json` loader reads) under a .json name
            if exc.msg != "Extra data":
                raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from exc
            rows = _jsonl_rows(path)
        else:
            if isinstance(data, dict) and isinstance(data.get("question"), str):
                data = [data]  # one question object: one row to `datasets`' json loader too
            if not isinstance(data, list):
                raise DataError(
                    f"{path}: a .json task file must hold an array of question objects or JSON "
                    "Lines (a JSON object of columns is not read as rows; write records, e.g. "
                    "df.to_json(path, orient='records', lines=True))"
                )
            rows = [(r, f"{path}: row {i}") for i, r in enumerate(data)]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from exc
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types
            raise DataError(f"{path}: cannot read parquet ({exc})") from exc
        rows = [(r, f"{path}: row {i}") for i, r in enumerate(records)]
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    docs = [validate_row(r, where) for r, where in rows]
    if not docs:
        raise DataError(f"{path}: no questions in the file")
    return docs


def _find_local(data_dir: Path, stem: str) -> Path:
    for ext in EXTENSIONS:
        p = data_dir / f"{stem}{ext}"
        if p.is_file():
            return p
    raise DataError(
        f"--data-dir {data_dir}: no {stem}.jsonl, {stem}.json or {stem}.parquet found "
        "(the mirror holds one file per hub config, e.g. wmdp-bio.jsonl, mmlu/virology.jsonl)"
    )


def _load_hub(spec: TaskSpec) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"task {spec.name}: loading {spec.hub_path} from the hub needs `datasets` "
            "(pip install 'wmdp_fast[hub]'), or pass --data-dir with local files"
        ) from exc
    log.info("loading %s (%s) from the Hugging Face hub", spec.hub_path, spec.hub_config)
    try:
        ds = datasets.load_dataset(spec.hub_path, spec.hub_config, split="test")
    except Exception as exc:  # noqa: BLE001 - network/hub errors come in many types
        raise DataError(
            f"task {spec.name}: cannot load {spec.hub_path}:{spec.hub_config} from the hub "
            f"({exc}); use --data-dir with a local mirror"
        ) from exc
    where = f"{spec.hub_path}:{spec.hub_config}"
    return [validate_row(dict(r), f"{where}: row {i}") for i, r in enumerate(ds)]


def check_limit(limit: float | None) -> None:
    """`limit` must be None, a count >= 1 or a fraction in (0, 1) (lm-eval's --limit)."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not 0 < limit < math.inf:
        raise ConfigError(f"--limit must be a count >= 1 or a fraction in (0, 1), got {limit!r}")


def apply_limit(docs: list, limit: float | None) -> list:
    """The questions lm-eval scores under --limit (``get_sample_size``): the first
    ``ceil(len * limit)`` for a fraction below 1, else the first ``int(limit)``."""
    check_limit(limit)
    if limit is None:
        return docs
    n = math.ceil(len(docs) * limit) if limit < 1.0 else int(limit)
    return docs[:n]


def load_task(name: str, data_dir: str | Path | None = None, limit: float | None = None) -> MCQTask:
    """Load and validate one task. `limit` keeps the first N questions, or a fraction of them
    when below 1 (`apply_limit`, as lm-eval's --limit)."""
    check_limit(limit)
    spec = task_spec(name)
    if spec.file is not None:
        docs, source = read_mcq_file(spec.file), str(spec.file)
    elif data_dir is not None:
        path = _find_local(Path(data_dir), spec.local_stem)
        docs, source = read_mcq_file(path), str(path)
    else:
        docs, source = _load_hub(spec), f"{spec.hub_path}:{spec.hub_config}"
        if not docs:
            raise DataError(f"{source}: no questions")
    return MCQTask(name=name, subject=spec.subject, source=source, docs=apply_limit(docs, limit))


def load_tasks(
    names: str | list[str], data_dir: str | Path | None = None, limit: float | None = None
) -> tuple[list[MCQTask], dict[str, list[str]]]:
    """Resolve names/groups, load and validate every task (all before any model work)."""
    tasks, groups = resolve_tasks(names)
    return [load_task(t, data_dir, limit) for t in tasks], groups
