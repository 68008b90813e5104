"""wmdp_fast.atomic: all-or-nothing writes with ordinary permissions."""

import os
import stat

import pytest

from wmdp_fast.atomic import atomic_path, atomic_write_text, make_temp_dir


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_written_file_has_umask_permissions_not_0600(tmp_path, umask_022):
    target = tmp_path / "results.json"
    atomic_write_text(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert _mode(target) == 0o644
    assert os.listdir(tmp_path) == ["results.json"]


def test_error_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_suffix_ends_the_temporary_name(tmp_path):
    with atomic_path(tmp_path / "plot.png", suffix=".png") as tmp:
        assert tmp.name.endswith(".png") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "plot.png").read_bytes() == b"x"


def test_temp_dir_has_umask_permissions(tmp_path, umask_022):
    d = make_temp_dir(tmp_path / "out")
    assert d.parent == tmp_path and d.name.startswith(".out.tmp-")
    assert _mode(d) == 0o755


def test_set_new_file_mode_fixes_safetensors_0600(tmp_path, umask_022):
    import torch
    from safetensors.torch import save_file

    from wmdp_fast.atomic import set_new_file_mode

    p = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    os.chmod(p, 0o600)  # what save_file produced here (safetensors 0.8)
    set_new_file_mode(p)
    assert _mode(p) == 0o644
