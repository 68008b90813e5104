"""Parity of the RMU engine with a straightforward implementation of the published loop.

`published_rmu` below is the WMDP repository's `rmu/unlearn.py` reduced to its arithmetic: two
model copies, full forward passes, a forward hook on layer `layer_id`, `F.mse_loss` (padding
included), the old `transformers.AdamW` the published script imported (eps 1e-6, weight decay 0;
transcribed below, since transformers no longer ships it). It reads the corpora itself (the published
`get_data`), so the engine's corpus reading is checked too. Everything runs in float32 on the CPU
on tiny random-weight models with the real Mistral tokenizer.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from wmdp_fast.rmu import RMUConfig, run_rmu
from wmdp_fast.testing import make_tiny_model

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega river mountain protein enzyme virus network packet "
    "exploit kernel buffer overflow cell membrane"
).split()


def _doc(rng: torch.Generator, n_words: int) -> str:
    idx = torch.randint(0, len(WORDS), (n_words,), generator=rng).tolist()
    return " ".join(WORDS[i] for i in idx)


def write_corpora(d: Path, n_docs: int = 12, long_words: int = 0, seed: int = 0) -> Path:
    """bio (JSON text), cyber (raw lines: JSON objects whose raw line is the text in exact mode)
    and wikitext (JSONL of {"text"}, with empty lines as in wikitext-2-raw-v1)."""
    rng = torch.Generator().manual_seed(seed)
    d.mkdir(parents=True, exist_ok=True)

    def n(i):
        return (
            long_words
            if (long_words and i % 3 == 0)
            else int(torch.randint(3, 40, (1,), generator=rng))
        )

    with open(d / "bio-forget-corpus.jsonl", "w") as fh:
        for i in range(n_docs):
            fh.write(json.dumps({"text": _doc(rng, n(i)), "title": f"doc {i}"}) + "\n")
    with open(d / "cyber-forget-corpus.jsonl", "w") as fh:
        for i in range(n_docs):
            fh.write(json.dumps({"text": _doc(rng, n(i))}) + "\n")
    with open(d / "wikitext.jsonl", "w") as fh:
        for i in range(2 * n_docs):
            text = (
                ""
                if i % 4 == 1
                else " " + _doc(rng, int(torch.randint(2, 30, (1,), generator=rng))) + " \n"
            )
            fh.write(json.dumps({"text": text}) + "\n")
    return d


def published_get_data(corpus_dir, forget_corpora, retain_corpora, min_len, batch_size):
    def get_dataset(name):
        data = []
        for line in open(Path(corpus_dir) / f"{name}.jsonl"):
            if name == "wikitext" or "bio-forget-corpus" in name:
                raw_text = json.loads(line)["text"]
            else:
                raw_text = line
            if len(raw_text) > min_len:
                data.append(str(raw_text))
        return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]

    return [get_dataset(c) for c in forget_corpora], [get_dataset(c) for c in retain_corpora]


class TransformersAdamW(torch.optim.Optimizer):
    """`transformers.AdamW` as the published script used it (transformers 4.x, removed since),
    transcribed from its source: eps is added to sqrt(v) and the bias corrections are folded into
    the step size. Not torch's AdamW, which adds eps to the bias-corrected sqrt(v)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=True)
        )

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=(1.0 - beta1))
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    bias_correction1 = 1.0 - beta1 ** state["step"]
                    bias_correction2 = 1.0 - beta2 ** state["step"]
                    step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))


def _masked_mse(h, target, mask):
    """open-unlearning's objective (--mask-padding): mean over real tokens only."""
    m = mask[..., None].to(h.dtype)
    return ((h - target) ** 2 * m).sum() / (m.sum() * h.shape[-1])


def published_rmu(
    model_dir,
    cfg: RMUConfig,
    control_vecs,
    mask_padding: bool = False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The published loop; returns ({param name: tensor}, [(loss, forget, retain)]).
    With mask_padding, the MSEs leave padding out (not the published objective). `dtype`: the
    models' and control vectors' (the published script ran in bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    frozen = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    updated = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    control_vecs = [c.to(device, dtype) for c in control_vecs]
    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=False)
    tok.pad_token_id = tok.eos_token_id
    tok.padding_side = "left"
    tok.truncation_side = "right"
    forget, retain = published_get_data(
        cfg.corpus_dir, cfg.forget_corpora, cfg.retain_corpora, cfg.min_len, cfg.batch_size
    )
    updated.train()
    params, names = [], []
    for lid in cfg.layer_ids:
        for i, (n, p) in enumerate(updated.model.layers[lid].named_parameters()):
            if i in cfg.param_ids:
                params.append(p)
                names.append(f"model.layers.{lid}.{n}")
    opt = TransformersAdamW(params, lr=cfg.lr)
    frozen_module = frozen.model.layers[cfg.layer_id]
    updated_module = updated.model.layers[cfg.layer_id]

    def forward_with_cache(model, inputs, module, no_grad):
        cache = []

        def hook(mod, inp, out):
            cache.append(out[0] if isinstance(out, tuple) else out)

        h = module.register_forward_hook(hook)
        if no_grad:
            with torch.no_grad():
                model(**inputs)
        else:
            model(**inputs)
        h.remove()
        return cache[0]

    num_batches = min(cfg.max_num_batches, min(len(f) for f in forget), min(len(r) for r in retain))
    warnings.filterwarnings("ignore", message="Using a target size")  # the published broadcast
    losses = []
    for idx in range(num_batches):
        topic_idx = idx % len(forget)
        batch_idx = idx // len(forget)
        max_length = 512 if topic_idx == 0 else 768
        f_in = tok(
            forget[topic_idx][batch_idx],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        ).to(device)
        h_f = forward_with_cache(updated, f_in, updated_module, no_grad=False)
        if mask_padding:
            unlearn_loss = _masked_mse(h_f, control_vecs[topic_idx], f_in["attention_mask"])
        else:
            unlearn_loss = F.mse_loss(h_f, control_vecs[topic_idx])
        r_in = tok(
            retain[topic_idx][batch_idx],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=512,
        ).to(device)
        h_r = forward_with_cache(updated, r_in, updated_module, no_grad=False)
        h_r0 = forward_with_cache(frozen, r_in, frozen_module, no_grad=True)
        if mask_padding:
            retain_loss = _masked_mse(h_r, h_r0, r_in["attention_mask"]) * cfg.alpha[topic_idx]
        else:
            retain_loss = F.mse_loss(h_r, h_r0) * cfg.alpha[topic_idx]
        loss = unlearn_loss + retain_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((loss.item(), unlearn_loss.item(), retain_loss.item()))
    return {n: p.detach().cpu().clone() for n, p in zip(names, params)}, losses


def control_vectors_file(path: Path, K: int, D: int, coeffs, seed: int = 42) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    cvs = []
    for c in coeffs:
        u = torch.rand(1, 1, D)
        cvs.append(u / torch.norm(u) * c)
    save_file({"control_vectors": torch.cat([c.reshape(1, -1) for c in cvs])}, str(path))
    return cvs


def tiny_cfg(tmp: Path, model_dir: Path, corpus_dir: Path, K: int = 1, **kw) -> RMUConfig:
    forget = ["bio-forget-corpus", "cyber-forget-corpus"][:K]
    base = dict(
        model_name_or_path=str(model_dir),
        layer_id=2,
        layer_ids=[1, 2],
        param_ids=[6],
        steering_coeffs=[20.0] * K,
        alpha=[10.0] * K,
        lr=1e-3,
        batch_size=2,
        max_num_batches=6,
        forget_corpora=forget,
        retain_corpora=["wikitext"] * K,
        corpus_dir=str(corpus_dir),
        output_dir=str(tmp / "out"),
        device="cpu",
        dtype="float32",
    )
    base.update(kw)
    return RMUConfig(**base)


def _model_state(model_dir) -> dict:
    """Parameters by model name, as transformers loads them (Mixtral: fused experts)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()


def assert_parity(result, ref_params, ref_losses, model_dir):
    orig = load_file(str(Path(model_dir) / "model.safetensors"))
    # model parameter names that the checkpoint stores under other keys (converted on load)
    converted = [k for k in ref_params if k not in orig]
    orig_model = _model_state(model_dir) if converted else orig
    assert set(result.params) == set(ref_params)
    for name, ref in ref_params.items():
        got = result.params[name]
        delta_ref = ref - orig_model[name]
        assert delta_ref.abs().max() > 1e-4, f"{name} barely moved: the test would be vacuous"
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        rel = (got - orig_model[name] - delta_ref).norm() / delta_ref.norm()
        assert rel < 1e-3, f"{name}: update differs from the published loop by {rel:.2e} (relative)"
    got_losses = [(r["loss"], r["forget_loss"], r["retain_loss"]) for r in result.report["losses"]]
    assert len(got_losses) == len(ref_losses)
    torch.testing.assert_close(
        torch.tensor(got_losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6
    )
    # the saved checkpoint: trained tensors replaced, every other tensor untouched
    saved = load_file(str(result.output_dir / "model.safetensors"))
    assert set(saved) == set(orig)
    if converted:  # stored under the checkpoint's own keys: compare what transformers loads
        reloaded = _model_state(result.output_dir)
        for k, v in orig_model.items():
            want = result.params[k] if k in ref_params else v
            torch.testing.assert_close(reloaded[k], want, rtol=0, atol=0, msg=k)
        changed = {k for k in orig if not torch.equal(saved[k], orig[k])}
        assert changed and all(".experts." in k for k in changed), sorted(changed)[:5]
        return
    for k, v in orig.items():
        if k in ref_params:
            torch.testing.assert_close(saved[k], result.params[k], rtol=0, atol=0)
        else:
            assert torch.equal(saved[k], v), k


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_parity_one_topic(tmp_path, arch):
    model_dir = make_tiny_model(tmp_path / "model", arch=arch)
    corpus = write_corpora(tmp_path / "corpora")
    cfg = tiny_cfg(tmp_path, model_dir, corpus, K=1)
    cvs = control_vectors_file(tmp_path / "cv.safetensors", 1, 64, cfg.steering_coeffs)
    cfg.control_vectors = str(tmp_path / "cv.safetensors")
    result = run_rmu(cfg, progress=False)
    ref_params, ref_losses = published_rmu(model_dir, cfg, cvs)
    assert [p["name"] for p in result.report["params_updated"]] == [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    ]
    assert ref_losses[0][2] == 0.0 and result.report["losses"][0]["retain_loss"] == 0.0
    # the engine built and read layers 0..layer_id only (the published loop: all 4)
    assert result.report["layers_loaded"] == 3
    assert_parity(result, ref_params, ref_losses, model_dir)


def test_parity_qwen2_param_index_shift(tmp_path):
    """Qwen2's q/k/v biases shift mlp.down_proj.weight to index 9; selecting it by name and by
    index must train the same tensor as the published index-based selection."""
    model_dir = make_tiny_model(tmp_path / "model", arch="qwen2")
    corpus = write_corpora(tmp_path / "corpora")
    cfg = tiny_cfg(
        tmp_path, model_dir, corpus, K=1, param_ids=["mlp.down_proj.weight"], max_num_batches=3
    )
    cvs = control_vectors_file(tmp_path / "cv.safetensors", 1, 64, cfg.steering_coeffs)
    cfg.control_vectors = str(tmp_path / "cv.safetensors")
    result = run_rmu(cfg, progress=False)
    ref_cfg = tiny_cfg(tmp_path, model_dir, corpus, K=1, param_ids=[9], max_num_batches=3)
    ref_params, ref_losses = published_rmu(model_dir, ref_cfg, cvs)
    assert set(ref_params) == {f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)}
    assert result.report["layers_loaded"] == 3  # layer_types cut with num_hidden_layers
    assert_parity(result, ref_params, ref_losses, model_dir)


@pytest.mark.slow
def test_parity_two_topics_interleaved_512_768(tmp_path):
    """Two forget topics (bio: JSON text, cyber: the raw line), interleaved k = idx % 2, with
    documents long enough that topic 0 is cut at 512 tokens and topic 1 at 768."""
    model_dir = make_tiny_model(tmp_path / "model", arch="mistral", num_hidden_layers=3)
    corpus = write_corpora(tmp_path / "corpora", n_docs=8, long_words=700)
    cfg = tiny_cfg(
        tmp_path,
        model_dir,
        corpus,
        K=2,
        max_num_batches=4,
        alpha=[10.0, 30.0],
        steering_coeffs=[20.0, 10.0],
        layer_id=1,
        layer_ids=[0, 1],
    )
    cvs = control_vectors_file(tmp_path / "cv.safetensors", 2, 64, cfg.steering_coeffs)
    cfg.control_vectors = str(tmp_path / "cv.safetensors")
    result = run_rmu(cfg, progress=False, keep_cache=True)
    ref_params, ref_losses = published_rmu(model_dir, cfg, cvs)
    assert_parity(result, ref_params, ref_losses, model_dir)
    cache = result.cache
    lengths = [cache.entries[i].hidden.shape[1] for i in cache.forget_index]
    assert lengths[0] == 512 and lengths[1] == 768, lengths  # steps 0, 1: topic 0, topic 1
    # the published code cuts wikitext batches at 512 and shares them between the topics
    assert cache.retain_index[0] == cache.retain_index[1]


def test_mask_padding_matches_masked_objective(tmp_path):
    """--mask-padding trains the open-unlearning objective (padding left out of both means)."""
    model_dir = make_tiny_model(tmp_path / "model", arch="mistral", num_hidden_layers=3)
    corpus = write_corpora(tmp_path / "corpora")
    cfg = tiny_cfg(tmp_path, model_dir, corpus, K=1, max_num_batches=3, mask_padding=True)
    cvs = control_vectors_file(tmp_path / "cv.safetensors", 1, 64, cfg.steering_coeffs)
    cfg.control_vectors = str(tmp_path / "cv.safetensors")
    result = run_rmu(cfg, progress=False)
    ref_params, ref_losses = published_rmu(model_dir, cfg, cvs, mask_padding=True)
    assert_parity(result, ref_params, ref_losses, model_dir)
    unmasked, unmasked_losses = published_rmu(model_dir, cfg, cvs, mask_padding=False)
    assert abs(unmasked_losses[0][1] - ref_losses[0][1]) > 1e-3 * ref_losses[0][1]


@pytest.mark.parametrize("arch", ["gemma", "mixtral"])
def test_parity_gemma_and_mixtral(tmp_path, arch):
    """The other decoder families the engine supports: Gemma (scaled embeddings, (1 + w)
    norms) and Mixtral (mixture of experts; index 6 is the experts' fused down projection).
    The engine matches the published loop on them too."""
    model_dir = make_tiny_model(tmp_path / "model", arch=arch, num_hidden_layers=4)
    corpus = write_corpora(tmp_path / "corpora")
    cfg = tiny_cfg(tmp_path, model_dir, corpus, K=1, max_num_batches=3)
    cvs = control_vectors_file(tmp_path / "cv.safetensors", 1, 64, cfg.steering_coeffs)
    cfg.control_vectors = str(tmp_path / "cv.safetensors")
    result = run_rmu(cfg, progress=False)
    ref_params, ref_losses = published_rmu(model_dir, cfg, cvs)
    want = "mlp.down_proj.weight" if arch == "gemma" else "mlp.experts.down_proj"
    assert set(ref_params) == {f"model.layers.{i}.{want}" for i in (1, 2)}
    assert result.report["layers_loaded"] == 3
    assert_parity(result, ref_params, ref_losses, model_dir)
