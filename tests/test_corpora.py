"""Corpora: wikitext from the hub when --corpus-dir lacks wikitext.jsonl, errors naming both ways
to get it, non-UTF-8 files. The hub loader is monkeypatched: nothing goes online."""

from __future__ import annotations

import logging

import pytest

from wmdp_fast.corpora import load_corpora, load_corpus
from wmdp_fast.errors import DataError


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset replaced by three wikitext lines (or a failure, with .fail)."""
    import datasets

    calls = []

    class Hub:
        fail = False

    def load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        if Hub.fail:
            raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")
        return [{"text": ""}, {"text": " = Hub = \n"}, {"text": " from the hub \n"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    Hub.calls = calls
    return Hub


def test_corpus_dir_without_wikitext_takes_it_from_the_hub(tmp_path, fake_hub, caplog):
    (tmp_path / "f.jsonl").write_text('{"text": "forget a"}\n{"text": "forget b"}\n')
    with caplog.at_level(logging.INFO, logger="wmdp_fast"):
        forget, retain, n = load_corpora(["f"], ["wikitext"], 1, 10, corpus_dir=tmp_path)
    assert fake_hub.calls == [("wikitext", "wikitext-2-raw-v1", "test")]
    assert retain == [[[" = Hub = \n"], [" from the hub \n"]]]
    assert forget == [[['{"text": "forget a"}\n'], ['{"text": "forget b"}\n']]] and n == 2
    assert f"{tmp_path / 'wikitext.jsonl'} does not exist: wikitext comes from the hub" in (
        caplog.text
    )


def test_corpus_dir_wikitext_file_wins_over_the_hub(tmp_path, fake_hub):
    (tmp_path / "wikitext.jsonl").write_text('{"text": ""}\n{"text": " local \\n"}\n')
    assert load_corpus("wikitext", tmp_path) == [" local \n"]
    assert fake_hub.calls == []


def test_hub_unreachable_names_both_ways(tmp_path, fake_hub):
    fake_hub.fail = True
    with pytest.raises(DataError) as info:
        load_corpus("wikitext", tmp_path)
    msg = str(info.value)
    assert "go online" in msg and f"write {tmp_path / 'wikitext.jsonl'}" in msg
    with pytest.raises(DataError, match="go online.*--corpus-dir DIR with DIR/wikitext.jsonl"):
        load_corpus("wikitext")


@pytest.mark.parametrize("name,mode", [("bio-forget-corpus", "exact"), ("cyber", "exact")])
def test_non_utf8_corpus_is_a_data_error_naming_file_and_line(tmp_path, name, mode):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        load_corpus(name, tmp_path, mode=mode)
    assert f"{path}:3 " in str(info.value) and "UTF-8" in str(info.value)


def test_reading_stops_at_what_the_run_can_use(tmp_path, fake_hub, caplog):
    """A run of N batches of B documents uses at most the first N * B documents of a corpus, so
    reading stops there: the batches are those of a full read, a malformed line past that point
    is never reached (the bio forget corpus is ~1 GB of JSON), and the log says so."""
    import json

    lines = [json.dumps({"text": "x" * (i % 7)}) + "\n" for i in range(40)]  # 'x'*0 is dropped
    lines[30] = "{not json\n"
    (tmp_path / "bio-forget-corpus.jsonl").write_text("".join(lines))
    (tmp_path / "cyber-forget-corpus.jsonl").write_text("".join(lines[:30]))
    (tmp_path / "wikitext.jsonl").write_text("".join(lines[:30]))
    full = ["x" * (i % 7) for i in range(30) if i % 7 > 0]  # the 25 kept of the good lines
    with caplog.at_level(logging.INFO, logger="wmdp_fast"):
        forget, retain, n = load_corpora(
            ["bio-forget-corpus", "cyber-forget-corpus"], ["wikitext", "wikitext"],
            batch_size=4, max_num_batches=5, corpus_dir=tmp_path, min_len=0,
        )  # fmt: skip
    assert n == 5
    assert forget[0] == [full[i : i + 4] for i in range(0, 20, 4)]
    assert forget[1] == [lines[i : i + 4] for i in range(0, 20, 4)]  # raw lines, exact mode
    assert "the first 20 documents of" in caplog.text
    # a run that needs the whole file still reads it all, and fails where the published did
    with pytest.raises(DataError, match=r"bio-forget-corpus\.jsonl:31: not valid JSON"):
        load_corpora(["bio-forget-corpus"], ["wikitext"], 4, 8, corpus_dir=tmp_path)
    # and the hub's wikitext is cut the same way
    assert load_corpus("wikitext", max_docs=1) == [" = Hub = \n"]
    assert load_corpus("wikitext") == [" = Hub = \n", " from the hub \n"]
