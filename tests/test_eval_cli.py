"""CLI: python -m wmdp_fast.eval -- output files, table, exit codes, error lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from wmdp_fast.eval import main
from wmdp_fast.testing import make_tiny_model

ROWS = [
    {
        "question": f"Question {i}: which {'x ' * i}?",
        "choices": ["w", "x", "y", "z"],
        "answer": i % 4,
    }
    for i in range(5)
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_model(root / "model", arch="llama", seed=5)
    data = root / "data"
    data.mkdir()
    for stem in ("wmdp-bio", "wmdp-cyber", "wmdp-chem"):
        (data / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root, model, data


def test_full_run_writes_results_and_samples(setup, capsys):
    root, model, data = setup
    out, samples = root / "res.json", root / "samples.jsonl"
    argv = ["--model", str(model), "--tasks", "wmdp", "--data-dir", str(data), "--device", "cpu",
            "--limit", "4", "--output", str(out), "--log-samples", str(samples), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "|wmdp_bio|4|acc|" in printed and "|wmdp|12|acc|" in printed
    res = json.loads(out.read_text())
    assert set(res) >= {"results", "groups", "protocol", "model", "dtype", "versions", "seconds"}
    assert res["protocol"] == "lm-eval-current" and res["dtype"] == "float32"
    assert res["versions"]["lm_eval_reproduced"] == "0.4.13"
    assert set(res["results"]) == {"wmdp_bio", "wmdp_cyber", "wmdp_chem"}
    assert all(r["n"] == 4 for r in res["results"].values())
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(lines) == 12
    assert set(lines[0]) == {"task", "doc_id", "loglikelihoods", "pred", "answer", "is_greedy"}
    # the results agree with the samples
    for task, r in res["results"].items():
        mine = [s for s in lines if s["task"] == task]
        assert r["acc"] == sum(s["pred"] == s["answer"] for s in mine) / len(mine)
        for s in mine:
            assert s["pred"] == max(range(4), key=lambda i: (s["loglikelihoods"][i], -i))
    assert res["groups"]["wmdp"]["acc"] == pytest.approx(
        sum(s["pred"] == s["answer"] for s in lines) / 12
    )
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers

    # the 0.4.2 protocol is recorded and changes the numbers
    out2 = root / "res042.json"
    assert (
        main(argv[:-5] + ["--output", str(out2), "--protocol", "lm-eval-0.4.2", "--no-progress"])
        == 0
    )
    res2 = json.loads(out2.read_text())
    assert res2["protocol"] == "lm-eval-0.4.2" and res2["versions"]["lm_eval_reproduced"] == "0.4.2"
    assert res["max_length"] == 2048
    out3, samples3 = root / "res_short.json", root / "samples_short.jsonl"
    extra = ["--output", str(out3), "--log-samples", str(samples3), "--max-length", "8"]
    assert main(argv[:-5] + extra + ["--no-progress"]) == 0
    assert json.loads(out3.read_text())["max_length"] == 8
    short = [json.loads(x) for x in samples3.read_text().splitlines()]
    assert all(a["loglikelihoods"] != b["loglikelihoods"] for a, b in zip(lines, short))
    # lm-eval's fractional --limit: ceil(5 * 0.5) = 3 of each task's 5 questions
    out4 = root / "res_frac.json"
    frac = argv[:8] + ["--limit", "0.5", "--output", str(out4), "--no-progress"]
    assert main(frac) == 0
    res4 = json.loads(out4.read_text())
    assert res4["limit"] == 0.5 and all(r["n"] == 3 for r in res4["results"].values())


def test_bad_data_exits_1_with_one_line(setup, tmp_path, capsys):
    _, model, data = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    for stem in ("wmdp-bio", "wmdp-cyber", "wmdp-chem"):
        (bad / f"{stem}.jsonl").write_text((data / f"{stem}.jsonl").read_text())
    (bad / "wmdp-cyber.jsonl").write_text(
        json.dumps({"question": "q", "choices": ["a"], "answer": 0})
    )
    out = tmp_path / "res.json"
    rc = main(
        ["--model", str(model), "--tasks", "wmdp", "--data-dir", str(bad), "--output", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("error: ") and "wmdp-cyber.jsonl: row 0" in err[-1]
    assert "choices" in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--tasks", "wmdp", "--load-in-4bit", "--load-in-8bit"], "exclude each other"),
        (["--tasks", "wmdp_bio", "--output", "/nonexistent/dir/r.json"], "--output"),
    ],
)
def test_config_errors_exit_1(setup, capsys, extra, msg):
    _, model, data = setup
    rc = main(["--model", str(model), "--data-dir", str(data), "--no-progress", *extra])
    assert rc == 1
    assert msg in capsys.readouterr().err


def test_output_path_that_is_a_folder_fails_before_the_model_runs(setup, tmp_path, capsys):
    """--output / --log-samples naming an existing folder: one error line up front, not an
    IsADirectoryError traceback after the whole evaluation."""
    _, model, data = setup
    for flag in ("--output", "--log-samples"):
        rc = main(["--model", str(model), "--tasks", "wmdp_bio", "--data-dir", str(data),
                   "--device", "cpu", "--no-progress", flag, str(tmp_path)])  # fmt: skip
        captured = capsys.readouterr()
        assert rc == 1 and f"error: {flag} {tmp_path}" in captured.err
        assert "|wmdp_bio|" not in captured.out
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_traceback_and_module_entry_point(setup):
    _, model, data = setup
    from wmdp_fast.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--model", str(model), "--tasks", "nope", "--debug"])
    proc = subprocess.run(
        [sys.executable, "-m", "wmdp_fast.eval", "--model", str(model), "--tasks", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --tasks: unknown task")
    assert "Traceback" not in proc.stderr


def test_no_model_runs_the_demo(tmp_path, capsys):
    from wmdp_fast import demo

    if not (demo.demo_model_dir() / "config.json").is_file():
        pytest.skip("the demo model is not built yet (wmdp_fast/demo/model)")
    out = tmp_path / "demo.json"
    assert main(["--device", "cpu", "--output", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"demo_forget", "demo_retain"}
    assert all(r["n"] > 0 for r in res["results"].values())
    assert "|demo_forget|" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name,msg",
    [("/nonexistent/path", "no such folder"), ("EMPTY", "holds no config.json")],
)
def test_model_path_that_is_not_a_model_folder(tmp_path, capsys, name, msg):
    """--model naming a missing path or a folder without config.json: one plain error line (was
    the hub's 'Repo id must use alphanumeric chars' / a sentencepiece message), before any data
    is loaded (no --data-dir here: the hub is never asked)."""
    name = str(tmp_path) if name == "EMPTY" else name
    assert main(["--model", name, "--tasks", "wmdp_bio", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --model {name}: ") and msg in err[-1]
    assert "alphanumeric" not in err[-1] and "Traceback" not in "\n".join(err)


def test_out_of_memory_while_loading_is_one_error_line(setup, monkeypatch, capsys):
    import torch
    import transformers

    _, model, data = setup

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", oom)
    rc = main(["--model", str(model), "--tasks", "wmdp_bio", "--data-dir", str(data),
               "--device", "cpu", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"error: out of memory loading model '{model}'")
    assert "--load-in-4bit" in err[-1] and "--load-in-8bit" in err[-1]


def test_ctrl_c_prints_interrupted_exits_130_writes_nothing(setup, tmp_path, monkeypatch, capsys):
    import wmdp_fast.evaluate

    _, model, data = setup

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(wmdp_fast.evaluate, "evaluate", interrupted)
    out, samples = tmp_path / "r.json", tmp_path / "s.jsonl"
    try:
        rc = main(["--model", str(model), "--tasks", "wmdp_bio", "--data-dir", str(data),
                   "--device", "cpu", "--no-progress", "--output", str(out),
                   "--log-samples", str(samples)])  # fmt: skip
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main() (a traceback for the user)")
    captured = capsys.readouterr()
    assert rc == 130
    assert captured.err.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_sigterm_is_handled_as_ctrl_c(setup, tmp_path, monkeypatch, capsys):
    """kill / timeout / a Slurm time limit send SIGTERM, whose default action ends Python
    without running `finally` (temporary files left behind): the CLI treats it as Ctrl-C."""
    import os
    import signal

    import wmdp_fast.evaluate

    _, model, data = setup

    class NotHandled(Exception):
        pass

    def guard(signum, frame):  # what runs if the CLI does not handle SIGTERM itself
        raise NotHandled

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(wmdp_fast.evaluate, "evaluate", killed)
    out = tmp_path / "r.json"
    previous = signal.signal(signal.SIGTERM, guard)
    try:
        rc = main(["--model", str(model), "--tasks", "wmdp_bio", "--data-dir", str(data),
                   "--device", "cpu", "--no-progress", "--output", str(out)])  # fmt: skip
        assert signal.getsignal(signal.SIGTERM) is guard  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert rc == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert list(tmp_path.iterdir()) == []


def test_no_progress_hides_the_transformers_loading_bar(setup, capfd):
    _, model, data = setup
    argv = ["--model", str(model), "--tasks", "wmdp_bio", "--data-dir", str(data),
            "--device", "cpu", "--limit", "1"]  # fmt: skip
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "Loading weights" in err and "Scoring" in err  # what --no-progress must hide
    assert main([*argv, "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Scoring" not in err


def test_bad_output_paths_fail_before_the_model_loads(setup, tmp_path, monkeypatch, capsys):
    """An output folder where no file can be created (read-only mount, no permission: here
    /proc, which refuses new files even to root) was found only at the end, as an OSError
    traceback after the whole evaluation; --output and --log-samples naming the same file
    let the results silently replace the samples. Both are one error line before loading."""
    import wmdp_fast.models

    _, model, data = setup

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(wmdp_fast.models, "load_model", no_model)
    base = ["--model", str(model), "--tasks", "wmdp_bio", "--data-dir", str(data), "--device",
            "cpu", "--no-progress"]  # fmt: skip
    same = str(tmp_path / "r.json")
    cases = [(["--output", same, "--log-samples", same], "--log-samples", "same file")]
    if os.path.isdir("/proc") and sys.platform.startswith("linux"):
        for flag in ("--output", "--log-samples"):
            cases.append(([flag, "/proc/wmdp_fast_r.json"], flag, "cannot write"))
    for extra, flag, msg in cases:
        rc = main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and "Traceback" not in "\n".join(err), err
        assert err[-1].startswith(f"error: {flag} ") and msg in err[-1], err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_replaces_neither_file(setup, tmp_path, monkeypatch, capsys):
    """The samples file used to be renamed into place before the results were written: a
    failure writing the results (disk full) left the new samples beside an OLD results file
    from an earlier run (and an OSError traceback). Now both are written before either is
    renamed, and the failure is one error line."""
    import errno
    import pathlib

    _, model, data = setup
    out, samples = tmp_path / "r.json", tmp_path / "s.jsonl"
    out.write_text("old results\n")
    samples.write_text("old samples\n")
    real_write_text = pathlib.Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.name.startswith(".r.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    rc = main(["--model", str(model), "--tasks", "wmdp_bio", "--data-dir", str(data),
               "--device", "cpu", "--no-progress", "--output", str(out),
               "--log-samples", str(samples)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"error: --output {out}: cannot write") and "No space" in err[-1]
    assert out.read_text() == "old results\n" and samples.read_text() == "old samples\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "s.jsonl"]
