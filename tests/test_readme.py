"""The README's Python examples run as printed (CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(title: str) -> list[str]:
    text = README.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def test_readme_gather_example_matches_the_reference():
    from wmdp_fast import reference

    [example] = [b for b in _section_blocks("## Using the fused ops") if "gather_logprobs(" in b]
    ns: dict = {}
    exec(compile(example, str(README), "exec"), ns)
    want, want_greedy = reference.gather_logprobs(
        ns["logits"], ns["row_index"], ns["target"], ns["request_offsets"]
    )
    torch.testing.assert_close(ns["loglik"], want, rtol=0, atol=1e-5)
    assert torch.equal(ns["is_greedy"], want_greedy)
    assert ns["lp"].shape == (3, 4)


def test_readme_rmu_example_trains(capsys):
    [example] = [b for b in _section_blocks("## Using the fused ops") if "manual_seed(0)" in b]
    exec(compile(example, str(README), "exec"), {})
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+) =", out)]
    assert len(losses) == 3 and losses[2] < losses[0]


def test_readme_fuse_layers_example_patches_and_restores():
    [example] = [
        b for b in _section_blocks("## Using the fused ops") if "fuse_decoder_layers(" in b
    ]
    ns: dict = {}
    exec(compile(example, str(README), "exec"), ns)
    assert sorted(ns["patched"]) == sorted(
        f"{i}.{m}" for i in (0, 1) for m in ("input_layernorm", "post_attention_layernorm", "mlp")
    )
    assert ns["out"].logits.shape == (1, 3, 32000)
    from wmdp_fast.fused_layers import fused_modules

    assert fused_modules(ns["model"]) == []
