"""The layer-first cache (`--first-layer-cache`): when only `mlp.down_proj` is trained in layer
`first = min(layer_ids)`, its attention, norms and gate/up run once per batch before training,
and each step starts at that down_proj. The trained weights and losses must be bitwise those of
the full replay; layers whose output is not `residual + down_proj(act)` fall back to it."""

from __future__ import annotations

import pytest
import torch
from test_rmu_parity import tiny_cfg, write_corpora

import wmdp_fast.rmu as rmu_mod
from wmdp_fast.errors import ConfigError
from wmdp_fast.rmu import first_layer_split_reason, run_rmu, split_first_layer
from wmdp_fast.testing import make_tiny_model, tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpora(tmp_path_factory.mktemp("corpora"))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return make_tiny_model(
        tmp_path_factory.mktemp("m") / "model", arch="mistral", num_hidden_layers=3
    )


def _count_replayed_layers(monkeypatch) -> list[int]:
    """Records how many whole decoder layers each replay() call runs."""
    seen: list[int] = []
    orig = rmu_mod.replay

    def spy(layers, hidden, kwargs):
        seen.append(len(list(layers)))
        return orig(layers, hidden, kwargs)

    monkeypatch.setattr(rmu_mod, "replay", spy)
    return seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_first_cache_is_bitwise_the_full_replay(
    tmp_path, mistral, corpus, dtype, monkeypatch
):
    kw = dict(max_num_batches=4, dtype=dtype, layer_id=2, layer_ids=[1, 2])
    off = run_rmu(
        tiny_cfg(tmp_path / "off", mistral, corpus, first_layer_cache="off", **kw), progress=False
    )
    seen = _count_replayed_layers(monkeypatch)
    on = run_rmu(tiny_cfg(tmp_path / "on", mistral, corpus, **kw), progress=False)  # auto
    assert off.report["first_layer_cache"]["used"] is False
    assert "off" in off.report["first_layer_cache"]["reason"]
    rep = on.report["first_layer_cache"]
    assert rep["used"] is True and rep["reason"] is None and rep["bytes"] > 0
    # training steps replay only layer 2 whole (layer 1 starts at its down_proj)
    assert seen[-8:] == [1] * 8
    assert set(on.params) == set(off.params) and len(on.params) == 2
    for name, t in off.params.items():
        assert torch.equal(on.params[name], t), name
        assert not torch.equal(t, on.params[name] * 0)  # trained, not zero
    assert on.report["losses"] == off.report["losses"]


def test_single_replayed_layer(tmp_path, mistral, corpus):
    """layer_ids == [layer_id]: the step is residual + down_proj(act) alone."""
    kw = dict(max_num_batches=3, layer_id=1, layer_ids=[1])
    off = run_rmu(
        tiny_cfg(tmp_path / "a", mistral, corpus, first_layer_cache="off", **kw), progress=False
    )
    on = run_rmu(
        tiny_cfg(tmp_path / "b", mistral, corpus, first_layer_cache="on", **kw), progress=False
    )
    assert on.report["first_layer_cache"]["used"] is True
    for name, t in off.params.items():
        assert torch.equal(on.params[name], t), name
    assert on.report["losses"] == off.report["losses"]


def test_other_trained_tensors_in_layer_first_replay_it_whole(tmp_path, mistral, corpus):
    kw = dict(max_num_batches=2, param_ids=[0, 6])  # q_proj is trained too
    res = run_rmu(tiny_cfg(tmp_path / "a", mistral, corpus, **kw), progress=False)
    rep = res.report["first_layer_cache"]
    assert rep["used"] is False and "other than mlp.down_proj" in rep["reason"]
    with pytest.raises(ConfigError, match="--first-layer-cache on.*other than mlp.down_proj"):
        run_rmu(
            tiny_cfg(tmp_path / "b", mistral, corpus, first_layer_cache="on", **kw), progress=False
        )


def _layer(arch: str, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(arch, num_hidden_layers=2, **over)
    cfg.initializer_range = 0.5
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return model


def _layer_inputs(model, T: int = 7):
    from wmdp_fast.cache import capture_layer_inputs

    class Tok:
        def __call__(self, texts, **kw):
            from transformers import BatchEncoding

            ids = torch.randint(3, 1000, (2, T), generator=torch.Generator().manual_seed(1))
            return BatchEncoding(
                {"input_ids": ids, "attention_mask": torch.ones(2, T, dtype=torch.long)}
            )

    (b,) = capture_layer_inputs(
        model, Tok(), [(("x",), T)], 1, torch.device("cpu"), torch.device("cpu")
    )
    return b


@pytest.mark.parametrize(
    "arch,splits",
    [("mistral", True), ("llama", True), ("qwen2", True), ("gemma", True), ("gemma2", False)],
)
def test_split_check_per_architecture(arch, splits):
    """Gemma 2 normalises the MLP output before the residual add: the bitwise check refuses it."""
    model = _layer(arch)
    layer = model.model.layers[1]
    b = _layer_inputs(model)
    with torch.no_grad():
        full = layer(b.hidden, **b.kwargs)
    full = full[0] if isinstance(full, tuple) else full
    out, residual, act = split_first_layer(layer, b.hidden, b.kwargs)
    assert torch.equal(out, full)
    assert (residual is not None) is splits
    if splits:
        assert act.shape[-1] == layer.mlp.down_proj.in_features
        assert torch.equal(residual + layer.mlp.down_proj(act), full)


def test_structural_reasons():
    model = _layer("mixtral")
    layer = model.model.layers[1]
    assert "no mlp.down_proj" in first_layer_split_reason(layer, list(layer.parameters()))
    model = _layer("mistral")
    layer = model.model.layers[1]
    assert first_layer_split_reason(layer, [layer.mlp.down_proj.weight]) is None
    assert "other than" in first_layer_split_reason(
        layer, [layer.mlp.down_proj.weight, layer.self_attn.q_proj.weight]
    )
    # a layer with nothing trained (not first) is not split either
    assert first_layer_split_reason(layer, [model.model.layers[0].mlp.down_proj.weight])


def test_gemma2_falls_back_with_the_same_numbers(tmp_path, corpus):
    model_dir = make_tiny_model(tmp_path / "g2", arch="gemma2", num_hidden_layers=3)
    kw = dict(max_num_batches=2, layer_id=1, layer_ids=[1])
    auto = run_rmu(tiny_cfg(tmp_path / "a", model_dir, corpus, **kw), progress=False)
    off = run_rmu(
        tiny_cfg(tmp_path / "b", model_dir, corpus, first_layer_cache="off", **kw), progress=False
    )
    rep = auto.report["first_layer_cache"]
    assert rep["used"] is False and "not residual + mlp.down_proj(act)" in rep["reason"]
    for name, t in off.params.items():
        assert torch.equal(auto.params[name], t), name


def test_memory_budget_turns_auto_off(tmp_path, mistral, corpus, monkeypatch):
    monkeypatch.setattr(rmu_mod, "host_available_bytes", lambda: 1 << 10)
    res = run_rmu(
        tiny_cfg(tmp_path / "a", mistral, corpus, max_num_batches=2, cache_device="cpu"),
        progress=False,
    )
    rep = res.report["first_layer_cache"]
    assert rep["used"] is False and "GiB of CPU memory" in rep["reason"]


def test_cli_flag(tmp_path):
    from wmdp_fast.unlearn import build_parser

    args = build_parser().parse_args(["--first-layer-cache", "off", "--fused-layers", "on"])
    assert args.first_layer_cache == "off" and args.fused_layers == "on"
    assert build_parser().parse_args([]).fused_layers == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--first-layer-cache", "maybe"])


def test_fused_layers_in_the_engine(tmp_path, mistral, corpus, monkeypatch):
    """--fused-layers on with the Triton kernels forced (interpreted): the replayed layers'
    norms and MLPs are patched (reported by name), the layer-first cache still applies, and the
    run trains the same tensors as transformers' eager modules (float32: summation order)."""
    kw = dict(max_num_batches=3, layer_id=2, layer_ids=[1, 2])
    eager = run_rmu(
        tiny_cfg(tmp_path / "a", mistral, corpus, fused_layers="off", **kw), progress=False
    )
    assert eager.report["fused_layers"] == []
    monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
    fused = run_rmu(
        tiny_cfg(tmp_path / "b", mistral, corpus, fused_layers="on", **kw), progress=False
    )
    assert sorted(fused.report["fused_layers"]) == sorted(
        f"layers.{i}.{m}"
        for i in (1, 2)
        for m in ("input_layernorm", "post_attention_layernorm", "mlp")
    )
    assert fused.report["first_layer_cache"]["used"] is True
    for name, t in eager.params.items():
        torch.testing.assert_close(fused.params[name], t, rtol=1e-4, atol=1e-6)
    for a, b in zip(fused.report["losses"], eager.report["losses"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_dropout_in_the_layer_is_not_split():
    """The cached part runs in eval mode and the steps in train mode: a layer with dropout
    (attention_dropout > 0 here) would train differently split, so it is replayed whole."""
    model = _layer("mistral", attention_dropout=0.5)
    layer = model.model.layers[1]
    reason = first_layer_split_reason(layer, [layer.mlp.down_proj.weight])
    assert reason is not None and "dropout" in reason
    plain = _layer("mistral").model.layers[1]
    assert first_layer_split_reason(plain, [plain.mlp.down_proj.weight]) is None


def test_on_refuses_a_layer_that_fails_the_check(tmp_path, corpus):
    model_dir = make_tiny_model(tmp_path / "g2", arch="gemma2", num_hidden_layers=3)
    cfg = tiny_cfg(
        tmp_path / "a", model_dir, corpus, max_num_batches=2, layer_id=1, layer_ids=[1],
        first_layer_cache="on",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="--first-layer-cache on: .*not residual"):
        run_rmu(cfg, progress=False)
    assert not (tmp_path / "a" / "out").exists()


def test_the_layer_inputs_are_freed_once_split(tmp_path, mistral, corpus, monkeypatch):
    """With the layer-first cache the captured inputs of layer `first` are dropped before
    training (the residual replaces them), unless the caller keeps the cache."""
    import weakref

    import wmdp_fast.cache as cache_mod

    refs = []
    real = cache_mod.capture_layer_inputs

    def spy(*a, **kw):
        out = real(*a, **kw)
        refs.extend(weakref.ref(e.hidden) for e in out)
        return out

    monkeypatch.setattr(cache_mod, "capture_layer_inputs", spy)
    alive = []
    cfg = tiny_cfg(tmp_path / "a", mistral, corpus, max_num_batches=3)
    run_rmu(
        cfg,
        progress=False,
        step_callback=lambda s, r: alive.append(sum(x() is not None for x in refs)),
    )
    assert refs and alive == [0, 0, 0]
    refs.clear()
    alive.clear()
    run_rmu(
        tiny_cfg(tmp_path / "b", mistral, corpus, max_num_batches=3, first_layer_cache="off"),
        progress=False,
        step_callback=lambda s, r: alive.append(sum(x() is not None for x in refs)),
    )
    assert alive == [len(refs)] * 3  # without the split the steps read them


def test_preflight_names_first_layer_cache_off():
    from transformers import AutoModelForCausalLM, MistralConfig

    from wmdp_fast.errors import ResourceError
    from wmdp_fast.rmu import RMUConfig, estimate_gpu_memory, preflight

    cfg = MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    rcfg, bf16, gib = RMUConfig(), torch.bfloat16, 2**30
    cache_b, split_b = gib // 2, 3 * gib  # both on the GPU
    with_split = estimate_gpu_memory(model, rcfg, 5, bf16, 512, cache_b + split_b, True)
    without = estimate_gpu_memory(model, rcfg, 5, bf16, 512, cache_b, True)
    assert without < with_split
    with pytest.raises(ResourceError, match="--first-layer-cache off"):
        preflight(
            model, rcfg, 5, bf16, 512, cache_b + split_b, True, (with_split + without) // 2,
            split_width=14336, split_bytes=split_b,
        )  # fmt: skip


def test_gpu_oom_in_the_targets_pass_is_not_blamed_on_cpu_memory(
    tmp_path, mistral, corpus, monkeypatch
):
    """A CUDA out-of-memory error in the targets pass (torch.cuda.OutOfMemoryError, a
    RuntimeError saying "CUDA out of memory") while the cache lives in (pinned) CPU memory is
    the GPU's: it must get run_rmu's GPU message, not "out of pinned CPU memory ... try
    --first-layer-cache off" (a pinned-memory failure is torch.AcceleratorError "CUDA error:
    out of memory" instead, and keeps that message)."""
    from wmdp_fast.errors import ResourceError

    def gpu_oom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rmu_mod, "prepare_replay", gpu_oom)
    cfg = tiny_cfg(tmp_path / "a", mistral, corpus, max_num_batches=2, cache_device="cpu")
    with pytest.raises(ResourceError) as info:
        run_rmu(cfg, progress=False)
    msg = str(info.value)
    assert "GPU ran out of memory" in msg and "CPU memory" not in msg, msg

    def host_oom(*a, **kw):
        raise RuntimeError("CUDA error: out of memory")  # what a failed cudaHostAlloc raises

    monkeypatch.setattr(rmu_mod, "prepare_replay", host_oom)
    cfg = tiny_cfg(tmp_path / "b", mistral, corpus, max_num_batches=2, cache_device="cpu")
    with pytest.raises(ResourceError, match="--first-layer-cache off"):
        run_rmu(cfg, progress=False)
