"""Convolution double backward per layer: PyTorch's against ``gradreg.double_backward.conv``'s.

GReg's penalty differentiates each convolution's input gradient ``gx = convᵀ(gy, W)`` once more. PyTorch
(``aten._convolution_double_backward``) computes the weight term as a convolution with batch and channels
swapped and the output gradient as the filter; ``gradreg.double_backward.conv`` computes the same numbers as
an ordinary weight gradient (``convolution_backward``). This script finds every distinct convolution of a
model (forward hooks), and times per layer, layout and dtype, at the batch of a GReg step (ID + outliers):

- forward ``conv(x, W)`` and the ordinary backward (input and weight gradients), for scale;
- the double backward for an upstream gradient ``ggx`` of ``gx``: ``conv(ggx, W)`` and the weight term,
  by PyTorch's ``_convolution_double_backward`` and by ``conv`` + ``convolution_backward`` (gradreg);

prints the largest relative difference of the two, and sums every column over the model's layers (each
distinct layer times how often it occurs): the convolution part of one GReg step either way.

Examples:
    python bench/conv_kernels.py --device cuda --out bench/results/h100_conv_kernels.md
    python bench/conv_kernels.py --device cpu --model wrn40_2:48:32 --dtype fp32 --layout contiguous --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scorers import apply_device_settings, kernel_bench_parser, report_table, time_interleaved

from gradreg.models import create_classifier

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (kind, label) of the timed columns; the two double backward columns are the comparison
COLUMNS = [
    ("forward", "conv"),
    ("backward", "input + weight"),
    ("double backward", "pytorch"),
    ("double backward", "gradreg"),
]


def parse_model(spec: str) -> tuple[str, int, int]:
    """``name:batch:size`` (batch = ID + outliers of one GReg step)."""
    name, batch, size = spec.split(":")
    return name, int(batch), int(size)


def conv_layers(name: str, size: int) -> Counter:
    """Distinct (input C·H·W, weight shape, stride, padding, dilation, groups) of the model's convolutions."""
    model = create_classifier(name, 10, in_channels=3).eval()
    seen: Counter = Counter()

    def hook(m: nn.Conv2d, inputs: tuple[Tensor], _: Tensor) -> None:
        key = (tuple(inputs[0].shape[1:]), tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups)
        seen[key] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return seen


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def bench_layer(layer: tuple, batch: int, dtype: torch.dtype, layout: str, args: argparse.Namespace) -> dict:
    """Median us per call of every column on one layer, and the relative difference of the two double backwards."""
    in_shape, w_shape, stride, padding, dilation, groups = layer
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype).contiguous(memory_format=fmt)

    x, weight = rand(batch, *in_shape), rand(*w_shape)
    conv = (list(stride), list(padding), list(dilation), groups)
    y = torch.convolution(x, weight, None, *conv[:3], False, [0, 0], groups)
    gy, ggx = rand(*y.shape), rand(*x.shape)

    def backward(grad: Tensor, inp: Tensor, mask: list[bool]) -> tuple:
        return torch.ops.aten.convolution_backward(grad, inp, weight, None, *conv[:3], False, [0, 0], groups, mask)

    def pytorch() -> tuple:
        ggy, _, gw = torch.ops.aten._convolution_double_backward(
            ggx, None, None, gy, weight, x, *conv[:3], False, [0, 0], groups, [True, False, True]
        )
        return ggy, gw

    def gradreg() -> tuple:
        return torch.convolution(ggx, weight, None, *conv[:3], False, [0, 0], groups), backward(gy, ggx, [0, 1, 0])[1]

    diff = max(map(_rel, gradreg(), pytorch()))
    fns = [
        lambda: torch.convolution(x, weight, None, *conv[:3], False, [0, 0], groups),
        lambda: backward(gy, x, [True, True, False]),
        pytorch,
        gradreg,
    ]
    cases = [(kind, label, fn, 1) for (kind, label), fn in zip(COLUMNS, fns, strict=True)]
    timed = time_interleaved(cases, device, args.warmup, args.repeats)
    return {"us": [1e6 * t["seconds"] for t in timed], "diff": diff}


def main(argv: list[str] | None = None) -> None:
    """Time every layer x dtype x layout of every model; print (and optionally write) one markdown table."""
    parser = kernel_bench_parser(__doc__, warmup=2, repeats=10)
    parser.add_argument(
        "--model", action="append", type=parse_model, help="name:batch:size (default wrn40_2:384:32, resnet50:192:224)"
    )
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--layout", nargs="+", default=["contiguous", "channels-last"])
    args = parser.parse_args(argv)
    apply_device_settings(args.device, args.threads)
    header = ["model", "input (C, H, W)", "weight", "stride", "count", "dtype", "layout"]
    header += [f"{kind}: {label} us" for kind, label in COLUMNS] + ["pytorch / gradreg", "rel. diff"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, batch, size in args.model or [("wrn40_2", 384, 32), ("resnet50", 192, 224)]:
        layers = conv_layers(name, size)
        for dtype_name in args.dtype:
            for layout in args.layout:
                totals = [0.0] * len(COLUMNS)
                for layer, count in layers.items():
                    r = bench_layer(layer, batch, DTYPES[dtype_name], layout, args)
                    totals = [t + count * us for t, us in zip(totals, r["us"], strict=True)]
                    cells = [name, "x".join(map(str, layer[0])), "x".join(map(str, layer[1])), str(layer[2][0])]
                    cells += [str(count), dtype_name, layout, *(f"{us:.0f}" for us in r["us"])]
                    cells += [f"{r['us'][2] / r['us'][3]:.2f}x", f"{r['diff']:.1e}"]
                    lines.append("| " + " | ".join(cells) + " |")
                    print(lines[-1], flush=True)
                cells = [f"**{name} (batch {batch}), all layers**", "", "", "", str(sum(layers.values()))]
                cells += [dtype_name, layout, *(f"**{t:.0f}**" for t in totals)]
                cells += [f"**{totals[2] / totals[3]:.2f}x**", ""]
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    report_table("conv_kernels.py", argv, args.device, args.repeats, lines, args.out)


if __name__ == "__main__":
    main()
