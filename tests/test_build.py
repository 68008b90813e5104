"""setup.py: when the CUDA kernels are built, and that a CUDA failure keeps the CPU extension."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from setuptools import Extension

ROOT = Path(__file__).resolve().parent.parent

# Loads setup.py as a module without running setup(): its helpers are what the tests call.
LOAD_SETUP = textwrap.dedent(
    """
    import importlib.util, os, setuptools
    def load_setup(root):
        real, flag = setuptools.setup, os.environ.pop("WMDP_FAST_CUDA", None)
        setuptools.setup = lambda **kw: None
        try:
            spec = importlib.util.spec_from_file_location("wmdp_fast_setup", os.path.join(root, "setup.py"))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        finally:
            setuptools.setup = real
            if flag is not None:
                os.environ["WMDP_FAST_CUDA"] = flag
    """
)


@pytest.fixture(scope="module")
def S():
    ns: dict = {}
    exec(LOAD_SETUP, ns)
    return ns["load_setup"](str(ROOT))


@pytest.fixture
def cuda_home(tmp_path, monkeypatch):
    """Points torch's CUDA_HOME at an empty toolkit folder (no bin/nvcc) and hides nvcc on PATH;
    returns a function that puts an nvcc (executable or not) into it."""
    import torch.utils.cpp_extension as ce

    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    monkeypatch.setattr(ce, "CUDA_HOME", str(home))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.delenv("WMDP_FAST_CUDA", raising=False)

    def add_nvcc(executable=True):
        nvcc = home / "bin" / "nvcc"
        nvcc.write_text("#!/bin/sh\n")
        nvcc.chmod(0o755 if executable else 0o644)
        return str(nvcc)

    return add_nvcc


def test_cuda_needs_torch_with_cuda_and_torchs_nvcc(S, cuda_home, monkeypatch):
    # CUDA_HOME set (torch does so whenever /usr/local/cuda exists) but no nvcc in it: the old
    # rule (CUDA_HOME or nvcc) said yes and the build then failed
    want, why = S._want_cuda(True)
    assert not want and "no nvcc at CUDA_HOME/bin/nvcc" in why
    cuda_home(executable=False)
    assert S._want_cuda(True)[0] is False
    nvcc = cuda_home()
    assert S._want_cuda(True) == (True, f"torch has CUDA and nvcc is {nvcc}")
    want, why = S._want_cuda(False)  # a CPU-only torch cannot build the CUDA part
    assert not want and "no CUDA support" in why
    monkeypatch.setenv("WMDP_FAST_CUDA", "0")
    assert S._want_cuda(True) == (False, "WMDP_FAST_CUDA=0")
    monkeypatch.setenv("WMDP_FAST_CUDA", "1")
    assert S._want_cuda(True)[0] is True


def test_nvcc_on_path_elsewhere_is_named(S, cuda_home, monkeypatch):
    import torch.utils.cpp_extension as ce

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/opt/x/bin/nvcc")
    want, why = S._want_cuda(True)
    assert not want and "/opt/x/bin/nvcc" in why and "set CUDA_HOME" in why
    monkeypatch.setattr(ce, "CUDA_HOME", None)
    want, why = S._want_cuda(True)
    assert not want and "CUDA_HOME=None" in why


@pytest.mark.parametrize("torch_cuda", [True, False])
def test_forced_cuda_fails_loudly_when_impossible(S, cuda_home, monkeypatch, torch_cuda):
    monkeypatch.setenv("WMDP_FAST_CUDA", "1")
    with pytest.raises(RuntimeError, match="WMDP_FAST_CUDA=1 but the CUDA kernels cannot be built"):
        S._want_cuda(torch_cuda)


def test_bad_flag_value_is_an_error(S, cuda_home, monkeypatch):
    monkeypatch.setenv("WMDP_FAST_CUDA", "yes")
    with pytest.raises(RuntimeError, match="WMDP_FAST_CUDA must be 0, 1 or unset, got 'yes'"):
        S._want_cuda(True)


class _Compiler:
    pass


def _fake_base(fail_cuda: bool, fail_cpu: bool, calls: list):
    """Stands in for torch's BuildExtension: records the sources of each build_extensions call,
    patches the compiler as torch does, and fails as asked."""

    class Base:
        def __init__(self, extensions):
            self.extensions = extensions
            self.compiler = _Compiler()
            for e in extensions:
                e._full_name = e.name
            self.ext_map = {e.name: e for e in extensions}

        def build_extensions(self):
            calls.append(
                ([s for e in self.extensions for s in e.sources], "compile" in vars(self.compiler))
            )
            self.compiler.compile = "patched by torch"
            cuda = any(s.endswith(".cu") for e in self.extensions for s in e.sources)
            if (cuda and fail_cuda) or (not cuda and fail_cpu):
                raise RuntimeError("compiler exploded")

    return Base


def _cuda_ext():
    return Extension("wmdp_fast._C", ["a.cpp", "k.cu"])


def _cpu_ext():
    return Extension("wmdp_fast._C", ["a.cpp"])


def test_cuda_failure_falls_back_to_the_cpu_extension(S, capsys):
    calls = []
    cmd = S._tolerant_build(_fake_base(True, False, calls), _cpu_ext, cuda_forced=False)(
        [_cuda_ext()]
    )
    cmd.build_extensions()
    # retried with the CPU sources, on a compiler restored to its state before the first try
    assert calls == [(["a.cpp", "k.cu"], False), (["a.cpp"], False)]
    (ext,) = cmd.extensions
    assert ext.sources == ["a.cpp"] and ext._full_name == "wmdp_fast._C"
    assert cmd.ext_map["wmdp_fast._C"] is ext
    err = capsys.readouterr().err
    assert "CUDA dropped" in err and "compiler exploded" in err


def test_forced_cuda_failure_propagates(S):
    calls = []
    cmd = S._tolerant_build(_fake_base(True, False, calls), _cpu_ext, cuda_forced=True)(
        [_cuda_ext()]
    )
    with pytest.raises(RuntimeError, match="compiler exploded"):
        cmd.build_extensions()
    assert len(calls) == 1


@pytest.mark.parametrize("start", ["cpu", "cuda"])
def test_cpu_failure_completes_without_the_extension(S, capsys, start):
    calls = []
    ext = _cpu_ext() if start == "cpu" else _cuda_ext()
    cmd = S._tolerant_build(_fake_base(True, True, calls), _cpu_ext, cuda_forced=False)([ext])
    assert cmd.build_extensions() is None
    assert cmd.extensions == []
    assert len(calls) == (1 if start == "cpu" else 2)
    assert "plain-PyTorch fallback will be used" in capsys.readouterr().err


def test_success_builds_once_unchanged(S, capsys):
    calls = []
    ext = _cuda_ext()
    cmd = S._tolerant_build(_fake_base(False, False, calls), _cpu_ext, cuda_forced=False)([ext])
    cmd.build_extensions()
    assert len(calls) == 1 and cmd.extensions == [ext]
    assert "WARNING" not in capsys.readouterr().err


TINY_BUILD = textwrap.dedent(
    """
    import sys
    from setuptools import setup
    import torch.utils.cpp_extension as ce
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    S = load_setup(sys.argv[1])
    forced = sys.argv[2] == "1"
    ce.CUDA_HOME = sys.argv[3]  # a CPU-only torch leaves it None
    build = S._tolerant_build(
        BuildExtension.with_options(use_ninja=True),
        lambda: CppExtension("tiny", ["tiny.cpp"]),
        cuda_forced=forced,
    )
    setup(
        name="tiny",
        ext_modules=[CUDAExtension("tiny", ["tiny.cpp", "broken.cu"])],
        cmdclass={"build_ext": build},
        script_args=["-q", "build_ext", "--inplace"],
    )
    """
)

TINY_CPP = textwrap.dedent(
    """
    #include <Python.h>
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "tiny", nullptr, -1, nullptr};
    PyMODINIT_FUNC PyInit_tiny(void) {
      PyObject* m = PyModule_Create(&def);
      if (m) PyModule_AddIntConstant(m, "answer", 42);
      return m;
    }
    """
)


@pytest.mark.slow
def test_real_build_with_a_broken_cuda_part_keeps_the_cpu_extension(tmp_path):
    """torch's real BuildExtension: the .cu file does not compile, the retry builds the .cpp
    alone on the same build command (a second build_extensions call), and the module imports.
    With cuda_forced the same build fails."""
    import torch.utils.cpp_extension as ce

    homes = [ce.CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    homes = [h for h in homes + ["/usr/local/cuda"] if h and (Path(h) / "bin" / "nvcc").is_file()]
    if not homes or shutil.which("ninja") is None:
        pytest.skip("needs a CUDA toolkit folder with bin/nvcc and ninja")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("needs a C++ compiler")
    (tmp_path / "tiny.cpp").write_text(TINY_CPP)
    (tmp_path / "broken.cu").write_text('#error "deliberately broken CUDA part"\n')
    (tmp_path / "build_tiny.py").write_text(LOAD_SETUP + TINY_BUILD)
    env = {k: v for k, v in os.environ.items() if k != "WMDP_FAST_CUDA"}
    env.update(MAX_JOBS="1", TORCH_CUDA_ARCH_LIST="9.0")

    def build(forced: str):
        return subprocess.run(
            [sys.executable, "build_tiny.py", str(ROOT), forced, homes[0]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    res = build("0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CUDA dropped" in res.stderr, res.stderr[-3000:]
    assert "deliberately broken" in res.stdout + res.stderr  # nvcc ran and failed
    check = subprocess.run(
        [sys.executable, "-c", "import tiny; print(tiny.answer)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert check.stdout.strip() == "42", check.stderr[-2000:]
    for p in tmp_path.glob("tiny*.so"):
        p.unlink()
    res = build("1")
    assert res.returncode != 0 and "CUDA dropped" not in res.stderr
    assert not list(tmp_path.glob("tiny*.so"))
