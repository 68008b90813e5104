"""pytest-benchmark: gather_logprobs (C++) vs log_softmax + gather, 4,096 x 32,000 on the CPU.

python -m pytest benchmarks/bench_gather.py --benchmark-enable
"""

import pytest
import torch

from wmdp_fast import ops

R, V = 4096, 32000


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def inputs(request):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(R, V, generator=g) * 3).to(request.param)
    row_index = torch.arange(R).repeat_interleave(4)
    target = torch.randint(0, V, (4 * R,), generator=g)
    return logits, row_index, target, torch.arange(4 * R + 1)


def _eager(logits, row_index, target, offsets):
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp[row_index, target], lp.argmax(-1)[row_index] == target


def test_gather_eager(benchmark, inputs):
    benchmark.group = f"gather {inputs[0].dtype}"
    ll, _ = benchmark(_eager, *inputs)
    assert ll.shape == (4 * R,)


def test_gather_wmdp_fast(benchmark, inputs):
    benchmark.group = f"gather {inputs[0].dtype}"
    ll, _ = benchmark(ops.gather_logprobs, *inputs)
    ref, _ = _eager(*inputs)
    torch.testing.assert_close(ll, ref, atol=1e-4, rtol=1e-5)
