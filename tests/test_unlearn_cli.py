"""The unlearn CLI: flags, defaults, one-line errors, a small real run, the demo wiring."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_rmu_parity import write_corpora

from wmdp_fast.testing import make_tiny_model
from wmdp_fast.unlearn import PUBLISHED_FLAGS, build_parser, config_from_args, main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model_dir = make_tiny_model(d / "model", arch="mistral", num_hidden_layers=3)
    corpus = write_corpora(d / "corpora")
    return model_dir, corpus


def test_help_states_published_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "wmdp_fast.unlearn", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--model_name_or_path",
        "--layer_id",
        "--layer_ids",
        "--param_ids",
        "--steering_coeffs",
        "--alpha",
        "--lr",
        "--min_len",
        "--max_len",
        "--batch_size",
        "--max_num_batches",
        "--forget_corpora",
        "--retain_corpora",
        "--seed",
        "--output_dir",
        "--verbose",
        "--corpus-dir",
        "--control-vectors",
        "--mask-padding",
        "--optimizer-dtype",
        "--load-in-4bit",
        "--load-in-8bit",
        "--offload",
        "--cache-dir",
        "--cache-format",
        "--dtype",
        "--device",
        "--eval",
        "--checkpoint-every",
        "--resume",
        "--overwrite",
        "--debug",
    ):
        assert flag in out, flag
    assert "Zephyr-7B" in out and "--alpha 1200,1200" in out


def test_defaults_are_the_published_zephyr_recipe():
    cfg, demo = config_from_args(build_parser().parse_args(["--model_name_or_path", "m"]))
    assert not demo
    published = {  # the WMDP authors' Zephyr-7B run (spec/rmu.md), written out here on purpose
        "layer_id": 7,
        "layer_ids": [5, 6, 7],
        "param_ids": [6],
        "steering_coeffs": [6.5, 6.5],
        "alpha": [1200.0, 1200.0],
        "lr": 5e-5,
        "min_len": 0,
        "max_len": 2000,
        "batch_size": 4,
        "max_num_batches": 150,
        "forget_corpora": ["bio-forget-corpus", "cyber-forget-corpus"],
        "retain_corpora": ["wikitext", "wikitext"],
        "seed": 42,
    }
    assert set(published) == set(PUBLISHED_FLAGS)
    for k, v in published.items():
        assert getattr(cfg, k) == v, k
    assert (cfg.layer_id, cfg.layer_ids, cfg.param_ids) == (7, [5, 6, 7], [6])
    assert cfg.alpha == [1200.0, 1200.0] and cfg.steering_coeffs == [6.5, 6.5]
    assert cfg.max_num_batches == 150 and cfg.batch_size == 4 and cfg.lr == 5e-5
    assert cfg.corpus_mode == "exact" and not cfg.mask_padding and cfg.optimizer_dtype == "model"
    args = build_parser().parse_args(
        ["--model_name_or_path", "m", "--param_ids", "mlp.down_proj.weight,3", "--alpha", "5"]
    )
    cfg, _ = config_from_args(args)
    assert cfg.param_ids == ["mlp.down_proj.weight", 3] and cfg.alpha == [5.0]


def test_errors_are_one_line_and_exit_1(tmp_path, tiny, capsys):
    model_dir, corpus = tiny
    argv = [
        "--model_name_or_path",
        str(model_dir),
        "--corpus-dir",
        str(tmp_path / "nowhere"),
        "--output_dir",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: corpus 'bio-forget-corpus'") and "\n" not in err
    assert "Traceback" not in err
    from wmdp_fast.errors import DataError

    with pytest.raises(DataError):
        main(argv + ["--debug"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert (
        main(argv[:2] + ["--corpus-dir", str(corpus), "--output_dir", str(tmp_path / "out")]) == 1
    )
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--model_name_or_path", str(model_dir), "--alpha", "1,2,3"]) == 1
    assert "--alpha has 3 entries" in capsys.readouterr().err


def test_cli_run_prints_selected_tensors(tmp_path, tiny, capsys):
    model_dir, corpus = tiny
    out = tmp_path / "out"
    rc = main(
        [
            "--model_name_or_path",
            str(model_dir),
            "--corpus-dir",
            str(corpus),
            "--layer_id",
            "1",
            "--layer_ids",
            "0,1",
            "--param_ids",
            "mlp.down_proj.weight",
            "--steering_coeffs",
            "20,20",
            "--alpha",
            "10,10",
            "--lr",
            "1e-3",
            "--batch_size",
            "2",
            "--max_num_batches",
            "2",
            "--output_dir",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert (
        "model.layers.0.mlp.down_proj.weight" in text
        and "model.layers.1.mlp.down_proj.weight" in text
    )
    rep = json.loads((out / "rmu_report.json").read_text())
    assert rep["config"]["forget_corpora"] == ["bio-forget-corpus", "cyber-forget-corpus"]
    assert len(rep["losses"]) == 2 and rep["eval_before"] is None


def test_demo_is_the_default(tmp_path, tiny, monkeypatch, capsys):
    """No --model_name_or_path: the demo runs (announced), evaluates before and after on
    demo_forget/demo_retain, prints a table and writes the report and both plots. The demo
    model is swapped for a tiny random one here (the wiring is what is tested)."""
    import wmdp_fast.demo as demo

    model_dir, _ = tiny
    monkeypatch.setattr(demo, "demo_model_dir", lambda: model_dir)
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "--max_num_batches",
            "2",
            "--eval-limit",
            "4",
            "--device",
            "cpu",
            "--quiet",
            "--layer_id",
            "1",
            "--layer_ids",
            "1",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "DEMO" in text and "demo_forget" in text and "demo_retain" in text
    out = tmp_path / "wmdp_fast_demo"
    rep = json.loads((out / "rmu_report.json").read_text())
    for key in ("eval_before", "eval_after"):
        assert set(rep[key]) >= {"demo_forget", "demo_retain"}
        assert 0.0 <= rep[key]["demo_forget"]["acc"] <= 1.0
    assert rep["config"]["forget_corpora"] == demo.DEMO_RMU_ARGS["forget_corpora"]
    for key, value in demo.DEMO_RMU_ARGS.items():
        if key not in ("layer_id", "layer_ids", "max_num_batches"):  # given explicitly above
            assert rep["config"][key] == value, key
    assert rep["config"]["max_num_batches"] == 2
    assert (out / "losses.png").is_file() and (out / "accuracy.png").is_file()
