"""Forget and retain corpora for RMU, read exactly as the published script read them.

- `wikitext`: wikitext-2-raw-v1, split `test`, offline from `DIR/wikitext.jsonl` (one
  `{"text": ...}` object per line) when that file exists, else from the Hugging Face hub
  (`datasets`).
- a name containing `bio-forget-corpus`: one JSON object per line, text = `obj["text"]`.
- every other corpus: in exact mode the RAW LINE is the text (newline included), a quirk of the
  published code; in clean mode the JSON `text` field is parsed.
- a document is kept when `len(text) > min_len`; the corpus is cut into consecutive batches of
  `batch_size` documents in file order (the last batch may be short).
- reading stops once `max_num_batches * batch_size` documents are kept: a run never uses more
  (the published script read whole files; the documents used are the same).

Corpora other than wikitext are read from `DIR/<name>.jsonl` (default DIR: `data`, as the
published script).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from wmdp_fast.data import not_utf8_error
from wmdp_fast.errors import ConfigError, DataError

log = logging.getLogger("wmdp_fast")

MODES = ("exact", "clean")


def _read_jsonl_text(path: Path, parse: bool, keep, max_docs: int | None) -> tuple[list[str], bool]:
    try:
        return _read_lines(path, parse, keep, max_docs)
    except UnicodeDecodeError as exc:
        raise not_utf8_error(path, exc) from exc


def _read_lines(path: Path, parse: bool, keep, max_docs: int | None) -> tuple[list[str], bool]:
    """(the kept documents, whether reading stopped early at `max_docs` of them)."""
    docs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if max_docs is not None and len(docs) >= max_docs:
                return docs, True
            if not parse:
                if keep(line):
                    docs.append(line)
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one "
                    '{"text": ...} object per line'
                ) from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(
                    f'{path}:{lineno}: expected a JSON object with a string "text" field'
                )
            if keep(obj["text"]):
                docs.append(obj["text"])
    return docs, False


def _wikitext_from_hub(local: Path | None = None) -> list[str]:
    """wikitext-2-raw-v1 (test) through `datasets`. `local` is the DIR/wikitext.jsonl that was
    looked for first (named in the error: the offline alternative)."""
    offline = (
        f"write {local}" if local is not None else "pass --corpus-dir DIR with DIR/wikitext.jsonl"
    ) + ' (one {"text": ...} per line: the wikitext-2-raw-v1 test lines) to run offline'
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise ConfigError(
            f"wikitext from the hub needs `pip install datasets`; or {offline}"
        ) from exc
    try:
        raw = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # network, auth, missing dataset: all end the same way
        raise DataError(
            f"cannot load wikitext-2-raw-v1 from the hub ({exc}); go online (the hub must be "
            f"reachable, HF_DATASETS_OFFLINE unset), or {offline}"
        ) from exc
    return [str(x["text"]) for x in raw]


def load_corpus(
    name: str,
    corpus_dir: str | Path | None = None,
    min_len: int = 0,
    mode: str = "exact",
    max_docs: int | None = None,
) -> list[str]:
    """The documents of corpus `name` (after the `len(text) > min_len` filter), in file order.

    max_docs: stop after that many kept documents (a run of N batches of B documents never uses
    more than the first N * B; the published script read the whole file, e.g. ~1 GB of JSON
    for the bio forget corpus, to use its first 600 documents). The documents returned are the
    same as the first `max_docs` of a full read."""
    if mode not in MODES:
        raise ConfigError(f"corpus mode must be one of {MODES}, got {mode!r}")
    if max_docs is not None and max_docs < 1:
        raise ConfigError(f"max_docs must be >= 1, got {max_docs}")
    if not name or "/" in name or "\\" in name:
        raise ConfigError(f"corpus name {name!r} is invalid: give a bare name such as 'wikitext'")
    local_wikitext = Path(corpus_dir) / "wikitext.jsonl" if corpus_dir is not None else None
    if name == "wikitext" and (local_wikitext is None or not local_wikitext.is_file()):
        if local_wikitext is not None:
            log.info("%s does not exist: wikitext comes from the hub", local_wikitext)
        kept = [str(t) for t in _wikitext_from_hub(local_wikitext) if len(str(t)) > min_len]
        more = max_docs is not None and len(kept) > max_docs
        kept = kept[:max_docs] if more else kept
        where = "wikitext-2-raw-v1 (hub)"
    else:
        base = Path(corpus_dir) if corpus_dir is not None else Path("data")
        path = base / f"{name}.jsonl"
        if not path.is_file():
            known = sorted(p.stem for p in base.glob("*.jsonl")) if base.is_dir() else []
            raise DataError(
                f"corpus {name!r}: {path} does not exist"
                + (f" (available in {base}: {', '.join(known)})" if known else "")
                + "; pass --corpus-dir DIR holding <name>.jsonl (one document per line)"
            )
        parse = name == "wikitext" or "bio-forget-corpus" in name or mode == "clean"
        kept, more = _read_jsonl_text(path, parse, lambda t: len(t) > min_len, max_docs)
        kept = [str(t) for t in kept]
        where = str(path)
    if not kept:
        raise DataError(
            f"corpus {name!r} ({where}) has no document longer than --min_len {min_len}"
        )
    if more:
        log.info(
            "corpus %s: the first %d documents of %s (all the run can use)", name, len(kept), where
        )
    else:
        log.info("corpus %s: %d documents from %s", name, len(kept), where)
    return kept


def batched(docs: list[str], batch_size: int) -> list[list[str]]:
    """Consecutive batches of `batch_size` documents in order (the last one may be short)."""
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    return [docs[i : i + batch_size] for i in range(0, len(docs), batch_size)]


def load_corpora(
    forget_corpora: list[str],
    retain_corpora: list[str],
    batch_size: int,
    max_num_batches: int,
    corpus_dir: str | Path | None = None,
    min_len: int = 0,
    mode: str = "exact",
) -> tuple[list[list[list[str]]], list[list[list[str]]], int]:
    """(forget batches per topic, retain batches per topic, num_batches) as the published script.

    num_batches = min(max_num_batches, #batches of every forget and retain corpus). A corpus with
    fewer batches than requested is not an error: the run is shortened and a warning says so.
    """
    if not forget_corpora:
        raise ConfigError("--forget_corpora is empty: name at least one forget corpus")
    if len(retain_corpora) != len(forget_corpora):
        raise ConfigError(
            f"--retain_corpora has {len(retain_corpora)} entries but --forget_corpora has "
            f"{len(forget_corpora)}: give one retain corpus per forget topic"
        )
    if max_num_batches < 1:
        raise ConfigError(f"--max_num_batches must be >= 1, got {max_num_batches}")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    cache: dict[str, list[str]] = {}

    def get(name: str) -> list[list[str]]:
        if name not in cache:  # no run uses more than max_num_batches batches of a corpus
            cache[name] = load_corpus(name, corpus_dir, min_len, mode, max_num_batches * batch_size)
        return batched(cache[name], batch_size)

    forget = [get(n) for n in forget_corpora]
    retain = [get(n) for n in retain_corpora]
    counts = {f"forget {n}": len(b) for n, b in zip(forget_corpora, forget)}
    counts.update({f"retain {n}": len(b) for n, b in zip(retain_corpora, retain)})
    num_batches = min(max_num_batches, *counts.values())
    if num_batches < max_num_batches:
        short = ", ".join(f"{k} has {v}" for k, v in counts.items() if v < max_num_batches)
        log.warning(
            "--max_num_batches %d requested but %s batches of %d: running %d steps",
            max_num_batches,
            short,
            batch_size,
            num_batches,
        )
    return forget, retain, num_batches
