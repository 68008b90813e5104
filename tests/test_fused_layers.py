"""wmdp_fast.fused_layers: the fused RMSNorm / SwiGLU patched into real transformers decoder
layers (tiny random-weight models of the real architectures), under the Triton interpreter
(WMDP_FAST_FORCE_TRITON=1) on the CPU and compiled on a GPU.

What must hold: the patched layers give the unpatched layers' output and gradients, with the
largest error relative to the largest magnitude of the tensor (output, a down_proj weight
gradient, the input gradient) at most 2e-5 in float32 (a few float32 ulp per fused op, carried
through two layers and their attention; measured 1e-6 to 5e-6) and 2^-6 in bf16 (about one
bf16 rounding; the interpreter gives > 90% bitwise-equal outputs), the patch is per
instance and reversible, and what is not the Llama/Mistral/Qwen2 math (Gemma's `(1 + weight)`
norm, GELU MLPs, Mixtral's experts) is left alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wmdp_fast import ops
from wmdp_fast.fused_layers import fuse_decoder_layers, fused_modules, unfuse_decoder_layers
from wmdp_fast.testing import tiny_config

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER_NAMES = ["mlp", "input_layernorm", "post_attention_layernorm"]


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused ops' calls (so a test knows the patched code ran)."""
    seen = {"rms_norm": 0, "swiglu": 0}
    for name in seen:
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name):
            seen[_name] += 1
            return _real(*args)

        monkeypatch.setattr(ops, name, spy)
    return seen


def _model(arch: str, dtype=torch.float32, device="cpu", layers=2, **overrides):
    from transformers import AutoModel

    torch.manual_seed(0)
    cfg = tiny_config(arch, vocab_size=64, num_hidden_layers=layers, **overrides)
    cfg.initializer_range = 0.5 if dtype == torch.float32 else 0.05
    with torch.device(device):  # initialised in place (Zephyr width on the CPU takes seconds)
        model = AutoModel.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # non-trivial norm weights (they start at 1)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    model.requires_grad_(False)
    if hasattr(model.layers[0].mlp, "down_proj"):  # (not Mixtral's experts)
        model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # as RMU trains it
    return model


def _run(model, embeds, dy):
    """Last hidden state and the down_proj gradient of layer 0 (through both layers)."""
    w = model.layers[0].mlp.down_proj.weight
    w.grad = None
    x = embeds.detach().clone().requires_grad_(True)
    out = model(inputs_embeds=x).last_hidden_state
    out.backward(dy)
    return out.detach(), w.grad.clone(), x.grad.clone()


def _inputs(model, B=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = next(model.parameters())
    D = model.config.hidden_size
    embeds = torch.randn(B, T, D, generator=g).to(p.device, p.dtype)
    dy = torch.randn(B, T, D, generator=g).to(p.device, p.dtype)
    return embeds, dy


def _close(got, want, dtype):
    """max |got - want| <= rel * max |want| (float32: 2e-5, bf16: 2^-6)."""
    rel = 2e-5 if dtype == torch.float32 else 2**-6
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * want.float().abs().max().item(), (err, want.abs().max().item())


@pytest.mark.parametrize("arch", ["mistral", "llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patched_layers_match_eager(interp, calls, arch, dtype):
    model = _model(arch, dtype)
    embeds, dy = _inputs(model)
    want = _run(model, embeds, dy)
    names = fuse_decoder_layers(model.layers)
    assert sorted(names) == sorted(f"{i}.{n}" for i in range(2) for n in LAYER_NAMES)
    assert sorted(fused_modules(model.layers)) == sorted(names)
    got = _run(model, embeds, dy)
    assert calls == {"rms_norm": 4, "swiglu": 2}  # 2 layers x (2 norms, 1 MLP), forward
    for g, w in zip(got, want):
        _close(g, w, dtype)
    if dtype == torch.bfloat16:  # same rounding points: mostly the very same bits
        frac = (got[0] == want[0]).float().mean().item()
        print(f"{arch} bf16 layer output bitwise equal: {frac:.3f}")
        assert frac > 0.9
    assert fuse_decoder_layers(model.layers) == []  # idempotent
    assert sorted(unfuse_decoder_layers(model.layers)) == sorted(names)
    assert fused_modules(model.layers) == []
    again = _run(model, embeds, dy)
    assert calls == {"rms_norm": 4, "swiglu": 2}  # the original code again
    for a, w in zip(again, want):
        assert torch.equal(a, w)


def test_patch_is_per_instance_and_keeps_state(interp):
    a, b = _model("mistral"), _model("mistral")
    keys = {k: v.clone() for k, v in a.state_dict().items()}
    cls_forwards = (type(a.layers[1].mlp).forward, type(a.layers[1].input_layernorm).forward)
    fuse_decoder_layers([a.layers[1]])
    assert fused_modules(a.layers) == ["1.mlp", "1.input_layernorm", "1.post_attention_layernorm"]
    assert fused_modules(b.layers) == [] and fused_modules(a.layers[0]) == []
    assert "forward" in vars(a.layers[1].mlp) and "forward" not in vars(b.layers[1].mlp)
    assert cls_forwards == (
        type(a.layers[1].mlp).forward,
        type(a.layers[1].input_layernorm).forward,
    )
    assert all(torch.equal(keys[k], v) for k, v in a.state_dict().items())
    assert set(a.state_dict()) == set(keys)
    unfuse_decoder_layers([a.layers[1]])
    assert "forward" not in vars(a.layers[1].mlp)


@pytest.mark.parametrize("arch, want", [("gemma", []), ("gemma2", []), ("mixtral", None)])
def test_other_architectures_left_alone(interp, arch, want):
    """Gemma's (1 + weight) norms and GELU MLPs: nothing patched. Mixtral: its norms are the
    Llama form (patched), its experts are not an MLP of this form (left alone); its output
    still matches."""
    model = _model(arch)
    embeds, dy = _inputs(model)
    ref = model(inputs_embeds=embeds).last_hidden_state.detach()
    names = fuse_decoder_layers(model.layers)
    if want is not None:
        assert names == want
        return
    assert sorted(names) == sorted(f"{i}.{n}" for i in range(2) for n in LAYER_NAMES[1:])
    torch.testing.assert_close(
        model(inputs_embeds=embeds).last_hidden_state, ref, rtol=1e-4, atol=1e-5
    )


def test_lookalikes_are_not_patched():
    """A norm class whose forward differs from the Llama code (even if named *RMSNorm), an MLP
    whose act_fn is not SiLU, and an instance whose forward was replaced: all left alone."""
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    class OffsetRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1.0

    cfg = tiny_config("llama", hidden_act="gelu")
    gelu_mlp = LlamaMLP(cfg)
    hooked = LlamaRMSNorm(8)
    hooked.forward = lambda h: h
    relu_silu = LlamaMLP(tiny_config("llama"))
    relu_silu.act_fn = nn.ReLU()
    mods = nn.ModuleList([OffsetRMSNorm(8), gelu_mlp, hooked, relu_silu])
    assert fuse_decoder_layers(mods) == []
    ok = nn.ModuleList([LlamaRMSNorm(8), LlamaMLP(tiny_config("llama", hidden_act="swish"))])
    assert fuse_decoder_layers(ok) == ["0", "1"]


def test_accelerate_hook_is_kept(interp, calls):
    """A module behind accelerate's hook (device_map loading): the hooked inner forward is
    replaced, the hook still runs, and unfusing restores the inner forward."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    class Count(ModelHook):
        n = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.n += 1
            return args, kwargs

    norm = MistralRMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    add_hook_to_module(norm, Count())
    x = torch.randn(3, 16)
    want = norm(x)
    assert fuse_decoder_layers(norm) == [""]
    torch.testing.assert_close(norm(x), want, rtol=1e-6, atol=1e-6)
    assert calls["rms_norm"] == 1 and Count.n == 2
    unfuse_decoder_layers(norm)
    assert torch.equal(norm(x), want) and calls["rms_norm"] == 1 and Count.n == 3


def test_float64_and_cpu_default_run_the_original_math(calls):
    """Without WMDP_FAST_FORCE_TRITON the CPU path is the reference twin (the HF code itself:
    bitwise equal); float64 inputs, which the fused ops do not take, run the original forward."""
    model = _model("llama")
    embeds, dy = _inputs(model)
    want = _run(model, embeds, dy)
    fuse_decoder_layers(model.layers)
    for g, w in zip(_run(model, embeds, dy), want):
        assert torch.equal(g, w)
    model.double()
    model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    before = dict(calls)
    got = _run(model, embeds.double(), dy.double())
    assert got[0].dtype == torch.float64 and calls["rms_norm"] == before["rms_norm"]
    assert calls["swiglu"] == before["swiglu"]
    unfuse_decoder_layers(model.layers)
    for g, w in zip(got, _run(model, embeds.double(), dy.double())):
        assert torch.equal(g, w)


# --- GPU: one Zephyr-7B-width Mistral layer, bf16 ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_zephyr_width_layer_matches_eager():
    model = _model(
        "mistral",
        torch.bfloat16,
        "cuda",
        layers=1,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    embeds, dy = _inputs(model, B=2, T=512)
    want = _run(model, embeds, dy)
    assert len(fuse_decoder_layers(model.layers)) == 3
    got = _run(model, embeds, dy)
    for g, w in zip(got, want):
        _close(g, w, torch.bfloat16)
    frac = (got[0] == want[0]).float().mean().item()
    print(f"zephyr-width layer bf16 output bitwise equal: {frac:.3f}")
    # deterministic: the output and the down_proj gradient never pass attention's backward
    again = _run(model, embeds, dy)
    assert torch.equal(again[0], got[0]) and torch.equal(again[1], got[1])
    # the input gradient does, and on CUDA that backward is not deterministic (flash and
    # memory-efficient attention add dq with atomics; cuDNN's says the same of itself): under
    # the math backend everything else is, so there the fused backward kernels must be too
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        a, b = _run(model, embeds, dy), _run(model, embeds, dy)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
