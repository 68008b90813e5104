import os

# Before anything imports transformers/datasets/huggingface_hub (they read these at import): an
# accidental hub call in a test fails at once instead of downloading, or hanging offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_terminal = None


def pytest_sessionstart(session):
    global _terminal
    # xdist workers report to the controller, whose hook prints (a worker has no terminal)
    if not hasattr(session.config, "workerinput"):
        _terminal = session.config.pluginmanager.get_plugin("terminalreporter")


def pytest_runtest_logreport(report):
    """A failing gpu test's traceback is printed as soon as it fails, not only in the final
    summary: benchmarks/gpu_check.sh runs `pytest -m gpu` under a time limit, and a run killed
    by it prints no summary at all (with -q only the progress letters would remain)."""
    if _terminal is None or not report.failed or "gpu" not in report.keywords:
        return
    _terminal.write("\n")  # after -q's progress letters
    _terminal.write_line(f"FAILED (gpu, {report.when}) {report.nodeid}", red=True, bold=True)
    _terminal.write_line(report.longreprtext[-4000:])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from 2 threads, and on a loaded CI box OpenMP barriers of
    preempted threads make them many times slower. Use per module:
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
