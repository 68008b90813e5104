"""One decoder layer of RMU's replay, forward + backward: eager HF code vs fused RMSNorm/SwiGLU.

    python benchmarks/bench_fused_layers.py                  # CPU, tiny shape (overhead only)
    python benchmarks/bench_fused_layers.py --device cuda    # GPU: Zephyr-7B width, bf16, B=4, T=512

The layer is a Mistral decoder layer (random weights, --dtype) called as RMU's replay calls it:
rotary embeddings precomputed, causal attention without a mask, the input requiring grad, and
only `mlp.down_proj.weight` requiring grad (the published param 6). Rows:
  layer eager / layer fused   forward + backward of the whole layer, unpatched and after
                              `fuse_decoder_layers` (its 2 RMSNorms and its MLP's SwiGLU);
                              "diff" = max |fused - eager| of the layer output and of the
                              down_proj weight gradient (and of the input gradient)
  rms_norm / swiglu           the op alone, forward + backward (x resp. gate and up requiring
                              grad; the norm weight frozen as in RMU): reference (the HF code)
                              vs ops (Triton on CUDA)
Columns: median ms with the 0.2 / 0.8 quantiles (triton.testing.do_bench on CUDA, host time
included when it exceeds the GPU time), GPU-only ms (the step captured in a CUDA graph and
replayed; "-" when capture fails), effective GB/s (ops rows: the bytes a one-pass forward +
backward must move, divided by the GPU-only time, or the median where there is none: rms_norm
reads x and w and writes y, then reads dy and x and writes dx; swiglu reads gate and up and
writes y, then reads dy, gate, up and writes both gradients), peak memory allocated during the
step above its inputs (CUDA).

On the CPU the fused ops run their reference twins (the same HF code), so the CPU table only
shows the cost of the op layer; it says nothing about the GPU. --force-triton runs the kernels
in Triton's interpreter (slow; correctness only).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from _timing import peak_extra_mb as _peak_mb
from _timing import time_fn as _time

from wmdp_fast import ops, reference
from wmdp_fast.fused_layers import fuse_decoder_layers, unfuse_decoder_layers

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ZEPHYR = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, batch=4, seq=512)
CPU_TINY = dict(hidden=256, intermediate=768, heads=4, kv_heads=2, batch=2, seq=64)


def make_layer(shape: dict, dtype: torch.dtype, device: torch.device):
    """(layer, call(x) -> output): one Mistral decoder layer, random weights, only
    mlp.down_proj.weight trainable, and how RMU's replay calls it."""
    from transformers import MistralConfig, MistralModel

    cfg = MistralConfig(
        vocab_size=128,
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=1,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max(4096, shape["seq"]),
        sliding_window=4096,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place (a 7B-width layer on the CPU takes seconds)
        model = MistralModel(cfg).to(dtype=dtype)
    model.requires_grad_(False)
    layer = model.layers[0]
    with torch.no_grad():  # norm weights as a trained model has them (not all ones)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.uniform_(0.5, 1.5)
    layer.mlp.down_proj.weight.requires_grad_(True)
    T = shape["seq"]
    pos = torch.arange(T, device=device)[None].expand(shape["batch"], -1)
    probe = torch.zeros(shape["batch"], T, shape["hidden"], device=device, dtype=dtype)
    pe = model.rotary_emb(probe, pos)

    def call(x):
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out

    return layer, call


def _gen(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def layer_rows(shape, dtype, device, reps) -> tuple[list, str]:
    layer, call = make_layer(shape, dtype, device)
    B, T, D = shape["batch"], shape["seq"], shape["hidden"]
    x = _gen((B, T, D), dtype, device, 1).requires_grad_(True)
    dy = _gen((B, T, D), dtype, device, 2)
    w = layer.mlp.down_proj.weight

    def step():
        call(x).backward(dy)

    def result():
        x.grad = w.grad = None
        out = call(x)
        out.backward(dy)
        return out.detach(), w.grad.clone(), x.grad.clone()

    rows = []
    want = result()
    rows.append(
        ("layer eager", *_time(step, device, reps, [x, w]), None, _peak_mb(step, device, [x, w]))
    )
    names = fuse_decoder_layers(layer)
    got = result()
    rows.append(
        ("layer fused", *_time(step, device, reps, [x, w]), None, _peak_mb(step, device, [x, w]))
    )
    unfuse_decoder_layers(layer)
    diffs = [(g.float() - e.float()).abs().max().item() for g, e in zip(got, want)]
    bitwise = (got[0] == want[0]).float().mean().item()
    note = (
        f"fused modules: {names}; max |fused - eager|: output {diffs[0]:.3g}, "
        f"down_proj grad {diffs[1]:.3g}, input grad {diffs[2]:.3g} (largest |eager|: "
        f"{want[0].abs().max().item():.3g}, {want[1].abs().max().item():.3g}, "
        f"{want[2].abs().max().item():.3g}); output bitwise equal {bitwise:.4f}"
    )
    return rows, note


def op_rows(shape, dtype, device, reps) -> list:
    B, T, D, F = shape["batch"], shape["seq"], shape["hidden"], shape["intermediate"]
    esz = torch.finfo(dtype).bits // 8
    rows = []
    x = _gen((B, T, D), dtype, device, 3, 2.0).requires_grad_(True)
    nw = _gen((D,), dtype, device, 4, 0.3) + 1.0
    dy = _gen((B, T, D), dtype, device, 5)
    norm_bytes = (5 * B * T * D + D) * esz + 2 * B * T * 4  # + rstd written and read
    for name, fn in (("rms_norm reference", reference.rms_norm), ("rms_norm ops", ops.rms_norm)):

        def step(fn=fn):
            fn(x, nw, 1e-5).backward(dy)

        t = _time(step, device, reps, [x])
        rows.append(
            (name, *t, norm_bytes / ((t[3] or t[0]) * 1e-3) / 1e9, _peak_mb(step, device, [x]))
        )
    g = _gen((B, T, F), dtype, device, 6, 2.0).requires_grad_(True)
    u = _gen((B, T, F), dtype, device, 7).requires_grad_(True)
    dz = _gen((B, T, F), dtype, device, 8)
    glu_bytes = 8 * B * T * F * esz
    for name, fn in (("swiglu reference", reference.swiglu), ("swiglu ops", ops.swiglu)):

        def step(fn=fn):
            fn(g, u).backward(dz)

        t = _time(step, device, reps, [g, u])
        rows.append(
            (name, *t, glu_bytes / ((t[3] or t[0]) * 1e-3) / 1e9, _peak_mb(step, device, [g, u]))
        )
    return rows


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--batch", type=int, help="default: 4 on CUDA, 2 on the CPU")
    ap.add_argument("--seq", type=int, help="default: 512 on CUDA, 64 on the CPU")
    ap.add_argument("--reps", type=int, default=10, help="CPU repetitions")
    ap.add_argument(
        "--force-triton", action="store_true", help="CPU: run the kernels in the interpreter"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 1
    if args.force_triton:
        os.environ["WMDP_FAST_FORCE_TRITON"] = "1"
    shape = dict(ZEPHYR if device.type == "cuda" else CPU_TINY)
    if args.batch:
        shape["batch"] = args.batch
    if args.seq:
        shape["seq"] = args.seq
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":  # a busy 2-core box: OpenMP barriers of preempted threads dominate
        torch.set_num_threads(1)
    rows, note = layer_rows(shape, dtype, device, args.reps)
    rows += op_rows(shape, dtype, device, args.reps)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"## fused RMSNorm/SwiGLU, {gpu}, {args.dtype}, B={shape['batch']} T={shape['seq']} "
        f"D={shape['hidden']} I={shape['intermediate']}; backends: rms_norm "
        f"{ops.backend_of('rms_norm', device)}, swiglu {ops.backend_of('swiglu', device)}\n"
    )
    print("| row | median ms (p20-p80) | GPU-only ms | effective GB/s | peak extra MiB |")
    print("| --- | --- | --- | --- | --- |")
    for name, med, lo, hi, graph, gbs, peak in rows:
        print(
            f"| {name} | {med:.3f} ({lo:.3f}-{hi:.3f}) | {_fmt(graph)} | {_fmt(gbs, '.0f')} | "
            f"{_fmt(peak, '.0f')} |"
        )
    by = {r[0]: r for r in rows}

    def ratio(a, b):
        ta, tb = by[a][4] or by[a][1], by[b][4] or by[b][1]
        return ta / tb

    print(
        f"\nspeed-up (eager / fused, GPU-only where measured): layer "
        f"{ratio('layer eager', 'layer fused'):.2f}x, rms_norm "
        f"{ratio('rms_norm reference', 'rms_norm ops'):.2f}x, swiglu "
        f"{ratio('swiglu reference', 'swiglu ops'):.2f}x"
    )
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
