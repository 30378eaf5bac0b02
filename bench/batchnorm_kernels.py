"""Per-layer cost of training-mode BatchNorm's double backward: PyTorch's against gradreg's closed form, eager and
compiled.

GReg's penalty back-propagates every BatchNorm layer twice (``gradreg.double_backward.batchnorm``). This script
times, on the activation shapes of WRN-40-2 (ID + outlier batch 384) and ResNet-50 (192), contiguous and
channels-last, float32 and bfloat16, per call:

- forward and first-order backward (gx, gγ, gβ) by PyTorch's kernels (``F.batch_norm``: cuDNN where it applies),
  for scale: what every training step runs;
- the double backward of that first-order backward (what GReg's penalty adds): PyTorch's, the closed form in eager
  mode (``compile_setting="off"``) and compiled (``"on"``; ``auto`` compiles on CUDA with Triton);

and prints the largest relative difference of each against PyTorch's. The training step itself is timed by
``bench/train_step.py`` (``greg`` against ``greg_eager_bn``).

Examples:
    python bench/batchnorm_kernels.py --device cuda --out bench/results/h100_batchnorm_kernels.md
    python bench/batchnorm_kernels.py --device cpu --batch-scale 0.05 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scorers import apply_device_settings, kernel_bench_parser, report_table, time_interleaved

from gradreg.double_backward.batchnorm import batch_norm_train

EPS = 1e-5
# (model, N, C, H) of the distinct BatchNorm inputs of one GReg step (ID + outliers).
SHAPES = [
    ("wrn40_2", 384, 32, 32),
    ("wrn40_2", 384, 64, 16),
    ("wrn40_2", 384, 128, 8),
    ("resnet50", 192, 64, 112),
    ("resnet50", 192, 256, 56),
    ("resnet50", 192, 512, 28),
    ("resnet50", 192, 1024, 14),
    ("resnet50", 192, 2048, 7),
]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def bench_shape(n: int, c: int, h: int, dtype: torch.dtype, layout: str, args: argparse.Namespace) -> dict:
    """Median us per call of every variant on one input shape, and the pairs' largest relative differences."""
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format

    def rand(*shape: int, dt: torch.dtype = dtype) -> Tensor:
        t = torch.randn(*shape, generator=gen, device=device).to(dt)
        return t.contiguous(memory_format=fmt) if t.dim() == 4 else t

    x, gy, ggx = (2 * rand(n, c, h, h) + 0.5 for _ in range(3))
    weight, bias, ggw = (rand(c, dt=torch.float32) for _ in range(3))

    def double_backward(setting: str | None) -> Callable[[], tuple]:
        """The call that runs the backward of the first-order backward's graph (setting None: PyTorch's)."""
        xr, wr, gyr = (t.detach().requires_grad_() for t in (x, weight, gy))
        if setting is None:
            y = F.batch_norm(xr, None, None, wr, bias, True, 0.1, EPS)
        else:
            y = batch_norm_train(xr, None, None, wr, bias, 0.1, EPS, setting)
        grads = torch.autograd.grad(y, (xr, wr), gyr, create_graph=True)
        # d/dgy too: in a GReg step it flows on into the layers below
        return lambda: torch.autograd.grad(grads, (xr, wr, gyr), (ggx, ggw), retain_graph=True)

    xr = x.detach().requires_grad_()
    y = F.batch_norm(xr, None, None, weight, bias, True, 0.1, EPS)
    pytorch_dbw, eager_dbw, compiled_dbw = double_backward(None), double_backward("off"), double_backward("on")
    expected = pytorch_dbw()
    diffs = {
        "eager": max(map(_rel, eager_dbw(), expected)),
        "compiled": max(map(_rel, compiled_dbw(), expected)),
    }
    cases = [
        ("forward", "PyTorch", lambda: F.batch_norm(x, None, None, weight, bias, True, 0.1, EPS)),
        ("backward", "PyTorch", lambda: torch.autograd.grad(y, xr, gy, retain_graph=True)),
        ("double backward", "PyTorch", pytorch_dbw),
        ("double backward", "closed form, eager", eager_dbw),
        ("double backward", "closed form, compiled", compiled_dbw),
    ]
    timed = time_interleaved([(k, label, fn, 1) for k, label, fn in cases], device, args.warmup, args.repeats)
    return {"us": {(t["kind"], t["name"]): 1e6 * t["seconds"] for t in timed}, "diffs": diffs}


def main(argv: list[str] | None = None) -> None:
    """Time every shape x layout x dtype, print (and optionally write) one markdown table."""
    parser = kernel_bench_parser(__doc__, warmup=2, repeats=10)
    parser.add_argument("--batch-scale", type=float, default=1.0, help="multiply every batch size (CPU: 0.05)")
    args = parser.parse_args(argv)
    apply_device_settings(args.device, args.threads)
    header, lines = None, []
    for model, n, c, h in SHAPES:
        n = max(2, round(n * args.batch_scale))
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("contiguous", "channels-last"):
                r = bench_shape(n, c, h, dtype, layout, args)
                if header is None:
                    labels = [f"{kind}: {name} us" for kind, name in r["us"]]
                    header = ["model", "input", "dtype", "layout", *labels, *(f"{k} rel. diff" for k in r["diffs"])]
                    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                cells = [model, f"{n}x{c}x{h}x{h}", str(dtype).removeprefix("torch."), layout]
                cells += [f"{us:.0f}" for us in r["us"].values()] + [f"{d:.1e}" for d in r["diffs"].values()]
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    report_table("batchnorm_kernels.py", argv, args.device, args.repeats, lines, args.out)


if __name__ == "__main__":
    main()
