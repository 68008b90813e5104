"""Small local models and the real Mistral tokenizer, for tests, benchmarks and the demo.

Nothing here touches the network: the tokenizer is the Mistral-7B / Zephyr-7B SentencePiece
model (32,000 tokens) shipped inside the `mistral_common` wheel, and the models are random-weight
copies of real architectures at toy sizes, saved with `save_pretrained` so that the real loading
code (`wmdp_fast.models.load_model`) is what reads them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def mistral_tokenizer_file() -> Path:
    """Path of the Mistral v1 SentencePiece model: inside the mistral_common wheel; without it
    (the lent GPU machines lack it), a saved copy: $WMDP_FAST_MISTRAL_TOKENIZER (the .model
    file or a folder holding tokenizer.model), else .gpu/tok/tokenizer.model in the repository
    (made by benchmarks/make_gpu_site.sh)."""
    try:
        import mistral_common
    except ImportError as exc:
        env = os.environ.get("WMDP_FAST_MISTRAL_TOKENIZER")
        if env:  # named explicitly: use it or say why not (no silent fallback)
            f = Path(env) / "tokenizer.model" if Path(env).is_dir() else Path(env)
            if f.is_file():
                return f
            raise ImportError(
                f"WMDP_FAST_MISTRAL_TOKENIZER={env} names no tokenizer.model (and mistral_common "
                "is not installed)"
            ) from exc
        f = Path(__file__).resolve().parent.parent / ".gpu" / "tok" / "tokenizer.model"
        if f.is_file():
            return f
        raise ImportError(
            "the real Mistral tokenizer needs `pip install mistral_common`, or a saved copy: set "
            "WMDP_FAST_MISTRAL_TOKENIZER to its tokenizer.model (benchmarks/make_gpu_site.sh "
            "writes one to .gpu/tok)"
        ) from exc
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"{path} missing from the mistral_common wheel")
    return path


def save_mistral_tokenizer(out_dir: str | Path):
    """Write the Mistral/Zephyr HF tokenizer (BOS on, as Zephyr's config has it; pad = eos) to
    `out_dir` and return it.

    Under transformers 5 a LlamaTokenizer built from the .model file only adds BOS when
    `add_bos_token=True` is passed explicitly, and `save_pretrained` keeps that setting.
    """
    from transformers import LlamaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src, found = out / "tokenizer.model", mistral_tokenizer_file()
    if not (src.exists() and src.resolve() == found.resolve()):  # e.g. re-saving .gpu/tok
        shutil.copyfile(found, src)
    tok = LlamaTokenizer.from_pretrained(str(out), add_bos_token=True)
    tok.save_pretrained(str(out))
    return tok


def save_tekken_tokenizer(out_dir: str | Path, bos: bool = True):
    """Write a real byte-level BPE HF tokenizer (Mistral NeMo's "tekken", 131,072 tokens: a
    tiktoken-style regex pre-tokenizer, GPT-2 byte-to-unicode 'Ġ' pieces, every byte a token)
    to `out_dir` and return it. Built offline from `tekken_240911.json` in the mistral_common
    wheel by `transformers.integrations.mistral.convert_tekken_tokenizer`.

    Ids 0..999 are special tokens ("<unk>" 0, "<s>" 1, "</s>" 2, "<pad>" 11, ...). The bare
    conversion adds nothing when encoding; two flavours of the families that use such
    tokenizers:

    - bos=True, Llama-3-like: the tokenizer.json post-processor is ByteLevel then a template
      that prepends "<s>" (id 1), as Llama-3's prepends <|begin_of_text|>; no unk or pad token.
    - bos=False, Qwen2-like: bos_token None and nothing added; pad = eos = "</s>" (id 2).

    In either flavour " A".." D" after "Answer:" are single tokens (ids 1349, 1398, 1359, 1407).
    Saved next to a config.json of model_type "qwen2", transformers 5's AutoTokenizer loads the
    folder as Qwen2Tokenizer: these vocab and merges under Qwen2's own NFC normalizer and
    pre-tokenizer regex (a Llama folder keeps tekken's pipeline as written).
    """
    try:
        import mistral_common
    except ImportError as exc:
        raise ImportError("the tekken tokenizer needs `pip install mistral_common`") from exc
    from tokenizers import processors
    from transformers.integrations.mistral import convert_tekken_tokenizer

    src = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    if not src.is_file():  # pragma: no cover
        raise FileNotFoundError(f"{src} missing from the mistral_common wheel")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = convert_tekken_tokenizer(str(src), chat_template="")
    tok.chat_template = None  # no chat_template.jinja: scoring never applies one
    tok.unk_token = None
    if bos:
        tok.pad_token = None
        tok.backend_tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
                ),
            ]
        )
    else:
        tok.bos_token = None
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(out))
    return tok


ARCHS = ("mistral", "llama", "qwen2", "gemma", "gemma2", "mixtral")


def tiny_config(arch: str = "mistral", vocab_size: int = 32000, **overrides):
    """A toy config of a real architecture (hidden 64, 4 layers by default). gemma: scaled
    embeddings, (1 + weight) norms, GELU; gemma2: also logit and attention soft-capping and
    alternating sliding-window / global layers; mixtral: 4 experts, 2 per token."""
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
    )

    base = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    if arch == "mistral":
        base.setdefault("sliding_window", 4096)
        return MistralConfig(**base)
    if arch == "llama":
        return LlamaConfig(**base)
    if arch == "qwen2":
        return Qwen2Config(**base)
    if arch in ("gemma", "gemma2"):
        base.setdefault("head_dim", base["hidden_size"] // base["num_attention_heads"])
        base.setdefault("pad_token_id", base["eos_token_id"])
        if arch == "gemma2":
            base.setdefault("sliding_window", 4096)
            return Gemma2Config(**base)
        return GemmaConfig(**base)
    if arch == "mixtral":
        base.setdefault("num_local_experts", 4)
        base.setdefault("num_experts_per_tok", 2)
        return MixtralConfig(**base)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "mistral",
    seed: int = 0,
    init_std: float = 0.5,
    with_tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Save a random-weight toy model (float32) of `arch` (and the Mistral tokenizer) to out_dir.

    `init_std` is larger than the usual 0.02 so that the logits vary enough for multiple-choice
    predictions to differ between questions (a 0.02 init gives near-uniform next-token
    distributions and ties everywhere).
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(arch, **config_overrides)
    cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(out))
    if with_tokenizer:
        save_mistral_tokenizer(out)
    return out
