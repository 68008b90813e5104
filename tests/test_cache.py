"""The activation cache: faithful capture and replay, keyed by everything that determines it,
stale and corrupted files detected and rebuilt."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_rmu_parity import tiny_cfg, write_corpora

from wmdp_fast.cache import capture_layer_inputs
from wmdp_fast.rmu import replay, run_rmu
from wmdp_fast.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    model_dir = make_tiny_model(d / "model", arch="mistral", num_hidden_layers=3)
    corpus = write_corpora(d / "corpora")
    return model_dir, corpus


def test_replay_of_captured_inputs_equals_hooked_full_forward(tiny):
    """Layers first..layer_id replayed on the captured hidden states + kwargs give exactly the
    layer_id output of a full forward (left padding, truncation included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=False)
    tok.pad_token_id, tok.padding_side = tok.eos_token_id, "left"
    texts = ("a short one", "a much longer document " * 12, "mid length text here")
    [cached] = capture_layer_inputs(
        model, tok, [(texts, 20)], 1, torch.device("cpu"), torch.device("cpu"), progress=False
    )
    assert cached.hidden.shape[1] == 20 and cached.token_mask[0, 0] == 0  # left padded, cut
    assert cached.kwargs["use_cache"] is False and "position_embeddings" in cached.kwargs
    out = []
    h = model.model.layers[2].register_forward_hook(lambda m, i, o: out.append(o))
    with torch.no_grad():
        model(**tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=20))
        replayed = replay(model.model.layers[1:3], cached.hidden, cached.kwargs)
    h.remove()
    assert torch.equal(replayed, out[0])


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offload"])
def test_capture_builds_no_autograd_graph(tiny, offload):
    """The capture runs the frozen prefix without autograd, whatever requires_grad says: with
    --offload the streamed layers' outputs kept a graph holding every batch's intermediates on
    the GPU (found on an H200: +5.6 MB per batch of a tiny model, the whole cache at 7B)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert all(p.requires_grad for p in model.parameters())  # as run_rmu loads it
    tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=False)
    tok.pad_token_id, tok.padding_side = tok.eos_token_id, "left"
    batches = [(("a short one", "a much longer document " * 12), 24), (("mid length",), 24)]
    cpu = torch.device("cpu")
    out = capture_layer_inputs(
        model, tok, batches, 2, cpu, cpu, progress=False, prefix_layers_on_cpu=offload
    )
    tensors = [e.hidden for e in out] + [
        t for e in out for v in e.kwargs.values() for t in (v if isinstance(v, tuple) else (v,))
    ]
    grads = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    assert not grads, [t.grad_fn for t in grads]


def _params(res):
    return {k: v.clone() for k, v in res.params.items()}


def test_cache_hit_miss_stale_and_corrupted(tmp_path, tiny, caplog):
    model_dir, corpus = tiny
    cache_dir = tmp_path / "cache"

    def run(name, **kw):
        cfg = tiny_cfg(
            tmp_path / name,
            model_dir,
            kw.pop("corpus", corpus),
            max_num_batches=3,
            cache_dir=str(cache_dir),
            **kw,
        )
        return run_rmu(cfg, progress=False)

    first = run("a")
    assert first.report["cache"]["hit"] is False
    path = Path(first.report["cache"]["path"])
    assert (path / "activations.safetensors").is_file() and (path / "meta.json").is_file()
    assert not list(path.glob("*.pkl")) and not list(path.glob("*.pt"))

    second = run("b")
    assert second.report["cache"]["hit"] is True
    assert second.report["cache"]["fingerprint"] == first.report["cache"]["fingerprint"]
    for k, v in first.params.items():
        assert torch.equal(second.params[k], v)

    # a changed setting (other first layer / other cache format) is a different cache
    other_layer = run("c", layer_ids=[2])
    assert other_layer.report["cache"]["hit"] is False
    assert other_layer.report["cache"]["fingerprint"] != first.report["cache"]["fingerprint"]

    # changed data: one document edited
    corpus2 = tmp_path / "corpora2"
    corpus2.mkdir()
    for f in corpus.iterdir():
        (corpus2 / f.name).write_text(f.read_text())
    lines = (corpus2 / "bio-forget-corpus.jsonl").read_text().splitlines(keepends=True)
    lines[0] = json.dumps({"text": "an edited first document"}) + "\n"
    (corpus2 / "bio-forget-corpus.jsonl").write_text("".join(lines))
    changed_data = run("d", corpus=corpus2)
    assert changed_data.report["cache"]["hit"] is False

    # corrupted tensor file: detected by checksum, rebuilt, same results as before
    blob = bytearray((path / "activations.safetensors").read_bytes())
    blob[-100] ^= 0xFF
    (path / "activations.safetensors").write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="wmdp_fast"):
        rebuilt = run("e")
    assert "corrupted" in caplog.text
    assert rebuilt.report["cache"]["hit"] is False
    for k, v in first.params.items():
        assert torch.equal(rebuilt.params[k], v)
    assert run("f").report["cache"]["hit"] is True  # the rebuilt file is valid again

    # stale metadata (fingerprint of other settings in the folder) is refused
    meta = json.loads((path / "meta.json").read_text())
    meta["fingerprint"] = "0" * 64
    (path / "meta.json").write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wmdp_fast"):
        assert run("g").report["cache"]["hit"] is False
    assert "stale" in caplog.text


def test_changed_model_weights_are_not_served_stale(tmp_path, tiny):
    """Editing a prefix weight (layer 0, below min(layer_ids) = 1) changes the cache key;
    editing a weight above layer_id does not touch what the cache holds."""
    model_dir, corpus = tiny
    cache_dir = tmp_path / "cache"

    def copy_model(dst: Path, edit: str | None) -> Path:
        dst.mkdir()
        for f in Path(model_dir).iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        if edit:
            sd = load_file(str(dst / "model.safetensors"))
            sd[edit] = sd[edit] + 0.01
            save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst

    def run(name, mdir):
        cfg = tiny_cfg(tmp_path / name, mdir, corpus, max_num_batches=2, cache_dir=str(cache_dir))
        return run_rmu(cfg, progress=False)

    base = run("a", copy_model(tmp_path / "m0", None))
    prefix = run("b", copy_model(tmp_path / "m1", "model.layers.0.mlp.up_proj.weight"))
    assert prefix.report["cache"]["hit"] is False
    assert any(not torch.equal(prefix.params[k], v) for k, v in base.params.items())
    embed = run("c", copy_model(tmp_path / "m2", "model.embed_tokens.weight"))
    assert embed.report["cache"]["hit"] is False
    above = run("d", copy_model(tmp_path / "m3", "lm_head.weight"))
    assert above.report["cache"]["hit"] is True
    for k, v in base.params.items():
        assert torch.equal(above.params[k], v)


def test_int8_cache_is_close_and_keyed_separately(tmp_path, tiny):
    model_dir, corpus = tiny
    cfg = tiny_cfg(tmp_path / "a", model_dir, corpus, max_num_batches=3, cache_dir=str(tmp_path))
    exact = run_rmu(cfg, progress=False)
    cfg8 = tiny_cfg(
        tmp_path / "b",
        model_dir,
        corpus,
        max_num_batches=3,
        cache_dir=str(tmp_path),
        cache_format="int8",
    )
    approx = run_rmu(cfg8, progress=False)
    assert approx.report["cache"]["hit"] is False and approx.report["cache"]["exact"] is False
    assert approx.report["cache"]["bytes"] < exact.report["cache"]["bytes"]
    l_exact = torch.tensor([r["forget_loss"] for r in exact.report["losses"]])
    l_int8 = torch.tensor([r["forget_loss"] for r in approx.report["losses"]])
    torch.testing.assert_close(l_int8, l_exact, rtol=2e-2, atol=0)
    assert not torch.equal(l_int8, l_exact)


@pytest.mark.parametrize("bad", [b"\xff\xfe not UTF-8", b"[]", b"null"], ids=str)
def test_corrupted_metadata_is_rebuilt_not_a_crash(tmp_path, bad, caplog):
    """A meta.json that is not UTF-8 or not a JSON object is a cache to rebuild, like bad JSON;
    it raised UnicodeDecodeError / AttributeError out of the run. The good one loads."""
    from wmdp_fast.cache import ActivationCache, CachedBatch, load_cache, save_cache

    fp, cpu = "cd" * 32, torch.device("cpu")
    hidden = torch.randn(1, 2, 4)
    entry = CachedBatch(hidden, torch.ones(1, 2, dtype=torch.long), {"use_cache": False})
    root = save_cache(ActivationCache([entry], [0], [0], fp), tmp_path, {})
    assert torch.equal(load_cache(tmp_path, fp, cpu).entries[0].hidden, hidden)
    (root / "meta.json").write_bytes(bad)
    with caplog.at_level(logging.WARNING, logger="wmdp_fast"):
        assert load_cache(tmp_path, fp, cpu) is None
    assert "unreadable metadata" in caplog.text


def test_prefix_fingerprint_covers_tied_embeddings():
    """With tie_word_embeddings (Qwen2-0.5B, Gemma) lm_head.weight IS the embedding matrix:
    skipping lm_head must not drop the embeddings from the cache key."""
    from transformers import AutoModelForCausalLM

    from wmdp_fast.cache import model_prefix_fingerprint
    from wmdp_fast.testing import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("qwen2", tie_word_embeddings=True, num_hidden_layers=3)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = model_prefix_fingerprint(model, 1)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] += 1.0
    assert model_prefix_fingerprint(model, 1) != before


def test_pinned_pool_carves_disjoint_aligned_views():
    """PinnedPool (page-locked chunks on CUDA machines; ordinary memory here): views of any
    dtype and shape, 512-byte aligned within their chunk (page-aligned when pinned), never
    overlapping; chunks grow geometrically and hold at least 4 of the tensor asked for; a
    tensor larger than a quarter of the largest chunk gets a block of its own."""
    from wmdp_fast.cache import PinnedPool

    pool = PinnedPool(first_chunk=4096, max_chunk=1 << 16, pinned=False)
    shapes = [((10, 25), torch.float32), ((3, 7), torch.bfloat16), ((999,), torch.int8),
              ((2, 2, 64), torch.float16), ((5000,), torch.uint8), ((1,), torch.int64),
              ((31, 33), torch.float32), ((20000,), torch.uint8)]  # fmt: skip
    views = []
    for i, (shape, dtype) in enumerate(shapes):
        v = pool.empty(shape, dtype)
        assert v.shape == shape and v.dtype == dtype and v.is_contiguous()
        assert (v.data_ptr() - v.untyped_storage().data_ptr()) % 512 == 0  # from the chunk
        v.fill_(i + 1)
        views.append(v)
    for i, v in enumerate(views):  # nothing overwrote anything
        assert torch.all(v == i + 1), i
    sizes = [v.untyped_storage().nbytes() for v in views]
    # 1000, 42, 999 and 512 bytes fill the first chunk (4096 = 4 x 1024) to 3072; 5000 needs
    # a chunk of at least 4 x 5120 -> 32768, where the next two go too; 20000 x 4 > 65536:
    # a block of its own
    assert sizes == [4096] * 4 + [32768] * 3 + [20000]
    assert len({v.untyped_storage().data_ptr() for v in views}) == 3


@pytest.mark.parametrize("flavour", ["mistral", "tekken"])
def test_tokenize_batches_is_the_published_per_batch_call(tmp_path, flavour):
    """One tokenizer call per max_length, padded per batch, gives the very tensors of the
    published per-batch `tok(texts, return_tensors="pt", padding=True, truncation=True,
    max_length=...)`: left padding with EOS, truncation on the right, mixed lengths."""
    import random

    from wmdp_fast.cache import tokenize_batches
    from wmdp_fast.testing import save_mistral_tokenizer, save_tekken_tokenizer

    if flavour == "mistral":
        tok = save_mistral_tokenizer(tmp_path)
    else:
        pytest.importorskip("mistral_common")
        tok = save_tekken_tokenizer(tmp_path)
    tok.pad_token = tok.eos_token
    tok.padding_side, tok.truncation_side = "left", "right"
    rng = random.Random(0)
    words = ["virus", "protein", "  ", "naïve", "中文", "\n", "x", "1234", "🧬"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 80))) for _ in range(23)]
    batches = [(tuple(docs[i : i + 4]), (64, 128, 96)[i % 3]) for i in range(0, 23, 4)]
    batches.append((("a single short one",), 64))
    got = tokenize_batches(tok, batches)
    assert len(got) == len(batches)
    for enc, (texts, ml) in zip(got, batches):
        want = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=ml)
        assert set(enc) == set(want)
        for k in want:
            assert enc[k].dtype == want[k].dtype and torch.equal(enc[k], want[k]), k
    # the cases are real: some batch is padded on the left, some document truncated
    assert any((e["attention_mask"][:, 0] == 0).any() for e in got)
    assert any(e["input_ids"].shape[1] == ml for e, (_, ml) in zip(got, batches))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_tensor_fingerprint_sees_every_element_of_a_large_tensor(dtype):
    """Above full_limit the fingerprint is a word sum of all the bytes plus a strided sample:
    a change of any single element (here ones the sample skips) changes it; the same values at
    another address (misaligned view vs copy) or computed with other thread counts do not."""
    from wmdp_fast.cache import tensor_fingerprint

    g = torch.Generator().manual_seed(3)
    big = torch.randn(1 + 300 * 1001, generator=g).to(dtype)
    t = big[1:]  # a storage offset: misaligned for 8-byte words
    ref = tensor_fingerprint(t, full_limit=1000)
    assert tensor_fingerprint(t.clone(), full_limit=1000) == ref
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert tensor_fingerprint(t, full_limit=1000) == ref
    finally:
        torch.set_num_threads(threads)
    step = t.numel() // 65536 or 1
    for i in (1, 7, t.numel() // 2 + 1, t.numel() - 1):
        if step > 1:
            assert i % step  # not a sampled element
        u = t.clone()
        u[i] = u[i] * 2 + 1
        assert tensor_fingerprint(u, full_limit=1000) != ref, i
    v = t.clone()
    v[[5, 6]] = v[[6, 5]]  # neighbours swapped: sum of bytes unchanged only for equal values
    assert tensor_fingerprint(v, full_limit=1000) != ref


def test_word_sum_of_a_view_into_an_unaligned_buffer():
    """A tensor at an 8-aligned address whose storage base is not (a view into a buffer from
    torch.frombuffer or a mmapped file at an odd offset): its storage offset is not a multiple
    of 8 bytes, which view(int64) refuses; the fingerprint is that of the same values copied."""
    from wmdp_fast.cache import _word_sum, tensor_fingerprint

    vals = torch.randn(4099, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    buf = bytearray(2 * 4099 + 16)
    base = torch.frombuffer(memoryview(buf)[2:], dtype=torch.bfloat16)  # base misaligned by 2
    for k in range(4):  # one of these storage offsets gives an 8-aligned address
        view = base[k : k + 4096]
        view.copy_(vals[:4096])
        want = vals[:4096].clone()
        assert _word_sum(view) == _word_sum(want), k
        assert tensor_fingerprint(view, full_limit=100) == tensor_fingerprint(want, full_limit=100)
    assert any(base[k:].data_ptr() % 8 == 0 and k % 4 for k in range(4))
