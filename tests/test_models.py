"""models.py additions for RMU: parameter selection, layer validation, saving a checkpoint with
only some tensors replaced."""

from __future__ import annotations

import fnmatch
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from wmdp_fast.errors import ConfigError, ModelError
from wmdp_fast.models import save_updated_checkpoint, select_params, validate_layers
from wmdp_fast.testing import tiny_config


def _model(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, num_hidden_layers=3, vocab_size=128))


@pytest.mark.parametrize("arch,index", [("mistral", 6), ("llama", 6), ("qwen2", 9)])
def test_select_params_by_index_and_name(arch, index):
    m = _model(arch)
    by_name = select_params(m, [0, 2], ["mlp.down_proj.weight"])
    by_index = select_params(m, [0, 2], [index])
    assert [n for n, _ in by_name] == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    ]
    assert all(a is b for (_, a), (_, b) in zip(by_name, by_index))
    assert by_name[1][1] is m.model.layers[2].mlp.down_proj.weight
    # published order: layer by layer, then by parameter index (not by the order given)
    two = select_params(m, [1], [index, 0])
    assert [n for n, _ in two] == [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]


def test_select_and_validate_errors():
    m = _model("mistral")
    with pytest.raises(ConfigError, match="6=mlp.down_proj.weight"):
        select_params(m, [0], [99])
    with pytest.raises(ConfigError, match="not a parameter"):
        select_params(m, [0], ["mlp.missing.weight"])
    assert validate_layers(m, 2, [0, 1, 2]) == 3
    with pytest.raises(ConfigError, match="--layer_id 3"):
        validate_layers(m, 3, [1])
    with pytest.raises(ConfigError, match="above --layer_id"):
        validate_layers(m, 1, [1, 2])
    with pytest.raises(ConfigError, match="out of range"):
        validate_layers(m, 2, [-1])


def test_save_updated_checkpoint_sharded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a = {"x.a": torch.randn(3, 4, dtype=torch.bfloat16), "x.b": torch.randn(2)}
    b = {"y.c": torch.randn(5)}
    save_file(a, str(src / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(b, str(src / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wmap = {
        "x.a": "model-00001-of-00002.safetensors",
        "x.b": "model-00001-of-00002.safetensors",
        "y.c": "model-00002-of-00002.safetensors",
    }
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    new = torch.ones(3, 4, dtype=torch.float32)
    out = tmp_path / "out"
    rewritten = save_updated_checkpoint(src, out, {"x.a": new})
    assert rewritten == ["model-00001-of-00002.safetensors"]
    s1 = load_file(str(out / "model-00001-of-00002.safetensors"))
    assert s1["x.a"].dtype == torch.bfloat16 and torch.equal(s1["x.a"], new.to(torch.bfloat16))
    assert torch.equal(s1["x.b"], a["x.b"])
    assert torch.equal(load_file(str(out / "model-00002-of-00002.safetensors"))["y.c"], b["y.c"])
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert not (out / "pytorch_model.bin").exists()
    with pytest.raises(ModelError, match="not in the checkpoint"):
        save_updated_checkpoint(src, tmp_path / "o2", {"nope": new})
    with pytest.raises(ModelError, match="shape"):
        save_updated_checkpoint(src, tmp_path / "o3", {"x.a": torch.ones(2, 2)})


def test_hub_snapshot_skips_other_weight_formats(tmp_path, monkeypatch):
    """Only safetensors are read and rewritten: a hub snapshot must not also download the
    .bin/.pth copies that many repositories ship (14 GB more for zephyr-7b-beta)."""
    import huggingface_hub

    from wmdp_fast.models import resolve_checkpoint_dir

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_checkpoint_dir("org/some-model") == tmp_path
    [(repo_id, kwargs)] = calls
    assert repo_id == "org/some-model"
    ignored = kwargs.get("ignore_patterns") or []
    for name in ("pytorch_model-00001-of-00008.bin", "original/consolidated.00.pth", "x.msgpack"):
        assert any(fnmatch.fnmatch(name, pat) for pat in ignored), name
    assert not any(fnmatch.fnmatch("model-00001-of-00008.safetensors", p) for p in ignored)


# --- loading: local paths, progress bars, out of memory --------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from wmdp_fast.testing import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("m") / "tiny", arch="llama", num_hidden_layers=1, vocab_size=128,
        with_tokenizer=False,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["missing", "relative", "deep", "home", "empty_dir", "file"])
def test_local_looking_paths_fail_plainly(tmp_path, monkeypatch, how):
    """A path that is not a model folder: a ModelError saying so, not the hub's 'Repo id must use
    alphanumeric chars' nor a sentencepiece message; nothing is asked of the hub."""
    import huggingface_hub

    from wmdp_fast.models import load_model, load_tokenizer, resolve_checkpoint_dir

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    name, msg = {
        "missing": ("/nonexistent/path", "no such folder"),
        "relative": ("./nope", "no such folder"),
        "deep": ("a/b/c", "no such folder"),
        "home": ("~/surely-not-a-model-here-4c1d", "no such folder"),
        "empty_dir": ("empty", "holds no config.json"),
        "file": ("weights.bin", "is a file"),
    }[how]
    with pytest.raises(ModelError, match=msg) as info:
        load_model(name, device="cpu")
    assert name in str(info.value) and "alphanumeric" not in str(info.value)
    with pytest.raises(ModelError, match=msg if how != "empty_dir" else "holds no config.json or"):
        load_tokenizer(name)
    with pytest.raises(ModelError, match=msg):
        resolve_checkpoint_dir(name)


def test_hub_names_still_go_to_the_hub(monkeypatch):
    import transformers

    from wmdp_fast.models import check_model_path, load_model

    assert check_model_path("org/name") == "org/name" and check_model_path("gpt2") == "gpt2"
    seen = []

    def fake(name, **kwargs):
        seen.append(name)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(ModelError, match="couldn't connect"):
        load_model("HuggingFaceH4/zephyr-7b-beta", device="cpu")
    assert seen == ["HuggingFaceH4/zephyr-7b-beta"]


def test_progress_false_hides_transformers_loading_bar(tiny_dir, capfd):
    from transformers.utils import logging as hf_logging

    from wmdp_fast.models import load_model

    assert hf_logging.is_progress_bar_enabled()
    ref = load_model(str(tiny_dir), device="cpu")
    assert "Loading weights" in capfd.readouterr().err  # the bar this test must be able to see
    model = load_model(str(tiny_dir), device="cpu", progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
    hf_logging.disable_progress_bar()  # a previous "off" stays off
    try:
        load_model(str(tiny_dir), device="cpu", progress=False)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
def test_out_of_memory_while_loading_is_a_resource_error(tiny_dir, monkeypatch, exc):
    import transformers

    from wmdp_fast.errors import ResourceError
    from wmdp_fast.models import load_model

    def oom(*a, **k):
        raise exc

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", oom)
    with pytest.raises(ResourceError) as info:
        load_model(str(tiny_dir), device="cpu")
    msg = str(info.value)
    assert str(tiny_dir) in msg and "--load-in-4bit" in msg and "--load-in-8bit" in msg


def test_tests_run_offline():
    """conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE before transformers/datasets are
    imported, so an accidental hub call in a test fails instead of downloading."""
    import os

    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var) not in (None, "1"):
            pytest.skip(f"{var}={os.environ[var]} set explicitly by the caller")
        assert os.environ.get(var) == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert datasets.config.HF_DATASETS_OFFLINE is True


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_load_model_num_layers_builds_and_reads_only_the_first_layers(tmp_path, arch, capfd):
    """load_model(num_layers=n): layers 0..n-1 with the checkpoint's weights (their outputs equal
    the full model's), the rest never built; no 'UNEXPECTED keys' report; n >= the model's
    depth loads everything."""
    from wmdp_fast.models import load_model
    from wmdp_fast.testing import make_tiny_model

    d = make_tiny_model(tmp_path / "m", arch=arch, num_hidden_layers=4)
    full = load_model(str(d), dtype="float32", device="cpu")
    capfd.readouterr()
    part = load_model(str(d), dtype="float32", device="cpu", num_layers=2)
    assert len(part.model.layers) == 2 and part.config.num_hidden_layers == 2
    assert "UNEXPECTED" not in capfd.readouterr().err  # transformers' handler writes to stderr
    if getattr(full.config, "layer_types", None) is not None:
        assert part.config.layer_types == full.config.layer_types[:2]
    fsd = full.state_dict()
    assert all(torch.equal(v, fsd[k]) for k, v in part.state_dict().items())
    ids = torch.randint(0, 32000, (2, 9), generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (full, part):
        h = m.model.layers[1].register_forward_hook(lambda mod, i, o: outs.append(o))
        with torch.no_grad():
            m(input_ids=ids)
        h.remove()
    a, b = (o[0] if isinstance(o, tuple) else o for o in outs)
    assert torch.equal(a, b)
    assert len(load_model(str(d), dtype="float32", device="cpu", num_layers=9).model.layers) == 4


class _RecordingSlice:
    def __init__(self, key, sl, read):
        self._key, self._sl, self._read = key, sl, read

    def __getitem__(self, idx):
        self._read.append(self._key)
        return self._sl[idx]

    def __getattr__(self, name):
        return getattr(self._sl, name)


def test_truncated_load_reads_no_tensor_of_the_dropped_layers(tmp_path, monkeypatch):
    """load_model(num_layers=n) never reads a tensor of layers >= n (every safetensors access
    of transformers' loader is recorded)."""
    import sys

    import safetensors

    from wmdp_fast.models import load_model
    from wmdp_fast.testing import make_tiny_model

    d = make_tiny_model(tmp_path / "m", arch="mistral", num_hidden_layers=5)
    orig = safetensors.safe_open
    read: list[str] = []

    class Recording:
        def __init__(self, *a, **kw):
            self._f = orig(*a, **kw)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *a):
            return self._f.__exit__(*a)

        def get_tensor(self, k):
            read.append(k)
            return self._f.get_tensor(k)

        def get_slice(self, k):  # lazy: the bytes are read when it is indexed
            return _RecordingSlice(k, self._f.get_slice(k), read)

        def __getattr__(self, name):
            return getattr(self._f, name)

    import transformers.modeling_utils  # noqa: F401 - the loader modules must be imported

    for name, mod in list(sys.modules.items()):
        if name.startswith("transformers") and getattr(mod, "safe_open", None) is orig:
            monkeypatch.setattr(mod, "safe_open", Recording)
    load_model(str(d), dtype="float32", device="cpu", num_layers=2, progress=False)
    assert read, "the recorder saw no tensor access: transformers' loader changed"
    layers = {int(k.split(".")[2]) for k in read if k.startswith("model.layers.")}
    assert layers == {0, 1}, sorted(set(read))


def test_truncated_load_refuses_missing_tensors(tmp_path):
    """The truncated load silences transformers' load report (the dropped layers' tensors are
    'unexpected'), so a tensor missing from the checkpoint (which would be random) is an error."""
    from wmdp_fast.models import load_model
    from wmdp_fast.testing import make_tiny_model

    d = make_tiny_model(tmp_path / "m", arch="mistral", num_hidden_layers=4)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.layers.1.mlp.down_proj.weight"):
        load_model(str(d), dtype="float32", device="cpu", num_layers=3, progress=False)


def test_mistral_tokenizer_without_mistral_common(tmp_path, monkeypatch):
    """The lent GPU machines lack mistral_common: the tokenizer then comes from a saved copy
    ($WMDP_FAST_MISTRAL_TOKENIZER, a file or a folder), and the same tokens come out."""
    import sys

    from wmdp_fast.testing import mistral_tokenizer_file, save_mistral_tokenizer

    real = save_mistral_tokenizer(tmp_path / "real")
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # import fails
    monkeypatch.setenv("WMDP_FAST_MISTRAL_TOKENIZER", str(tmp_path / "real"))
    assert mistral_tokenizer_file() == tmp_path / "real" / "tokenizer.model"
    copy = save_mistral_tokenizer(tmp_path / "copy")
    text = "RMU: représentation misdirection, 7B."
    assert copy(text)["input_ids"] == real(text)["input_ids"]
    again = save_mistral_tokenizer(tmp_path / "real")  # into the folder it is read from
    assert again(text)["input_ids"] == real(text)["input_ids"]
    monkeypatch.setenv("WMDP_FAST_MISTRAL_TOKENIZER", str(tmp_path / "nowhere"))
    with pytest.raises(ImportError, match="names no tokenizer.model"):
        mistral_tokenizer_file()  # named but missing: no silent fallback to .gpu/tok
    monkeypatch.delenv("WMDP_FAST_MISTRAL_TOKENIZER")
    import wmdp_fast.testing

    monkeypatch.setattr(wmdp_fast.testing, "__file__", str(tmp_path / "pkg" / "testing.py"))
    with pytest.raises(ImportError, match="WMDP_FAST_MISTRAL_TOKENIZER"):
        mistral_tokenizer_file()


def test_rewritten_shard_is_the_original_with_only_those_bytes_changed(tmp_path):
    """The shard holding a trained tensor is a copy of the original, header and layout
    untouched, with only that tensor's bytes rewritten (cast to the stored dtype); the source
    file is not modified; a symlinked shard (a hub snapshot) is copied, not followed into the
    blob; a broken file is a clear ModelError."""
    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.w": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "b.w": torch.randn(33, generator=gen),
        "c.w": torch.randn(4, 4, generator=gen).to(torch.float16),
    }
    blob = tmp_path / "blob.safetensors"
    save_file(tensors, str(blob), metadata={"format": "pt", "note": "kept"})
    (src / "model.safetensors").symlink_to(blob)
    before = blob.read_bytes()
    new = torch.randn(33, generator=gen, dtype=torch.float64)  # cast to the stored float32
    out = tmp_path / "out"
    assert save_updated_checkpoint(src, out, {"b.w": new}) == ["model.safetensors"]
    after = (out / "model.safetensors").read_bytes()
    assert blob.read_bytes() == before and not (out / "model.safetensors").is_symlink()
    assert len(after) == len(before)
    changed = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
    from wmdp_fast.models import _read_safetensors_header

    header, start = _read_safetensors_header(blob)
    lo, hi = header["b.w"]["data_offsets"]
    assert changed and start + lo <= min(changed) and max(changed) < start + hi
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "note": "kept"}
        assert torch.equal(fh.get_tensor("b.w"), new.float())
        assert torch.equal(fh.get_tensor("a.w"), tensors["a.w"])
        assert torch.equal(fh.get_tensor("c.w"), tensors["c.w"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ModelError, match="not a safetensors file"):
        save_updated_checkpoint(bad, tmp_path / "o", {"b.w": new}, model=None)


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "fallback"])
def test_copy_file_in_the_kernel_or_not(tmp_path, monkeypatch, kernel_copy):
    import os

    from wmdp_fast.models import _copy_file

    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(3 << 20) + b"tail")
    if not kernel_copy:

        def unsupported(*a, **kw):
            raise OSError(95, "Operation not supported")

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    _copy_file(src, tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == src.read_bytes()


def test_a_header_that_is_not_an_object_is_a_model_error(tmp_path):
    import struct

    from wmdp_fast.models import _read_safetensors_header

    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(ModelError, match="not a JSON object"):
        _read_safetensors_header(f)


def _sharded(src, extra=()):
    """A two-shard checkpoint in `src`; `extra` names more files to write (other layouts)."""
    src.mkdir()
    gen = torch.Generator().manual_seed(1)
    save_file(
        {"x.a": torch.randn(3, 4, generator=gen)}, str(src / "model-00001-of-00002.safetensors")
    )
    save_file({"y.b": torch.randn(5, generator=gen)}, str(src / "model-00002-of-00002.safetensors"))
    wmap = {"x.a": "model-00001-of-00002.safetensors", "y.b": "model-00002-of-00002.safetensors"}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    (src / "config.json").write_text("{}")
    for name in extra:  # the whole model again, as another file
        save_file({"x.a": torch.randn(3, 4, generator=gen), "y.b": torch.randn(5)}, str(src / name))
    return src


def test_untouched_files_are_copies_not_links_into_the_original(tmp_path):
    """The output shares no file with the original (a hub snapshot's symlinks included): what
    rewrites a file of the output in place must not rewrite the original. safetensors < 0.8's
    save_file (so save_pretrained over the output) truncates and rewrites a shard in place, and
    transformers' save_pretrained writes the index with open('w'); through a hard link that
    rewrote the original checkpoint, or the hub cache's blob. Bytes and mode are the original's."""
    import os

    snap = _sharded(tmp_path / "blobs")  # the hub cache: snapshot files are symlinks to blobs
    os.chmod(snap / "model-00002-of-00002.safetensors", 0o640)
    src = tmp_path / "snapshot"
    src.mkdir()
    for f in snap.iterdir():
        (src / f.name).symlink_to(f)
    before = {f.name: f.read_bytes() for f in snap.iterdir()}
    out = tmp_path / "out"
    save_updated_checkpoint(src, out, {"x.a": torch.zeros(3, 4)})
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    for name in ("model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == before[name] and not (out / name).is_symlink()
        assert (out / name).stat().st_ino != (snap / name).stat().st_ino
        with open(out / name, "wb") as fh:  # an in-place rewrite of the output's file
            fh.write(b"rewritten")
    assert (out / "model-00002-of-00002.safetensors").stat().st_mode & 0o777 == 0o640
    assert {f.name: f.read_bytes() for f in snap.iterdir()} == before


def test_refuses_an_output_folder_that_is_not_empty(tmp_path):
    """Writing into a folder that holds the original's files (out_dir == src_dir, or an earlier
    output whose untouched shards are hard links to the original) emptied the original's
    shards: the copy opened its destination, the original itself, with 'wb'."""
    import os

    src = _sharded(tmp_path / "src")
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    old = tmp_path / "old"  # an output of an earlier wmdp_fast: untouched files hard-linked
    old.mkdir()
    for name in ("model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        os.link(src / name, old / name)
    for out in (old, src):
        with pytest.raises(ModelError, match="not empty"):
            save_updated_checkpoint(src, out, {"x.a": torch.zeros(3, 4)})
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    save_updated_checkpoint(src, tmp_path / "empty", {"x.a": torch.zeros(3, 4)})  # exists, empty


def test_weights_transformers_does_not_load_are_not_copied(tmp_path):
    """Only the files from_pretrained loads are written: a consolidated.safetensors (Mistral's
    own layout, shipped beside the shards by Mistral-7B-v0.3 and Nemo) would hand the ORIGINAL
    weights to a loader that reads it. With both a model.safetensors and an index, transformers
    loads model.safetensors: that is the file to patch (patching the shards left the output
    loading the old tensor)."""
    from safetensors import safe_open

    src = _sharded(tmp_path / "a", extra=["consolidated.safetensors"])
    out = tmp_path / "out_a"
    assert save_updated_checkpoint(src, out, {"x.a": torch.zeros(3, 4)}) == [
        "model-00001-of-00002.safetensors"
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    both = _sharded(tmp_path / "b", extra=["model.safetensors"])
    out = tmp_path / "out_b"
    assert save_updated_checkpoint(both, out, {"x.a": torch.zeros(3, 4)}) == ["model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor("x.a"), torch.zeros(3, 4))
        with safe_open(str(both / "model.safetensors"), "pt") as orig:
            assert torch.equal(fh.get_tensor("y.b"), orig.get_tensor("y.b"))
