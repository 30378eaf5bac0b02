"""GAIA-Z's per-channel zero fraction: the reductions it could use, timed inside the whole scorer.

GAIA-Z (Chen et al., NeurIPS 2023) reduces the gradient at every hooked layer output to the fraction of
non-zero entries per sample and channel. The reduction reads every gradient once more after the backward,
which makes it most of the scorer's cost above its forward + input-backward floor. Variants, each the whole
GAIA-Z computation (hooks, forward, backward to the input, reduction):

- ``ne-to-mean``: ``(g != 0).to(dtype).mean(2)`` (three passes, two full-size temporaries; the CPU route);
- ``l0-norm``: ``torch.linalg.vector_norm(g, ord=0, dim=2) / S`` (one pass; the CUDA route);
- ``ne-sum`` and ``count_nonzero``: ``(g != 0).sum(2) / S`` and ``torch.count_nonzero(g, dim=2) / S``;
- ``hooks, no reduction``: what the hooks alone cost.

All variants are checked to give identical scores before timing. ``gradreg.scorers.gaia._nonzero_fraction``
picks the route per device from this table (``bench/results/h200_gaia_z_reduction.md``).

Examples:
    python bench/gaia_reduction.py --device cuda --out bench/results/h200_gaia_z_reduction.md
    python bench/gaia_reduction.py --device cpu --model wrn40_2:64:32 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scorers import (
    DEFAULT_MODELS,
    apply_device_settings,
    input_backward_floor,
    kernel_bench_parser,
    parse_model_spec,
    report_table,
    time_interleaved,
)

from gradreg.models import MODELS
from gradreg.scorers.gaia import _per_channel, gaia_layers, record_output_grads

REDUCTIONS: dict[str, Callable[[Tensor], Tensor] | None] = {
    "ne-to-mean": lambda g: (g != 0).to(g.dtype).mean(dim=2),
    "l0-norm": lambda g: torch.linalg.vector_norm(g, ord=0, dim=2) / g.shape[2],
    "ne-sum": lambda g: (g != 0).sum(dim=2) / g.shape[2],
    "count_nonzero": lambda g: torch.count_nonzero(g, dim=2) / g.shape[2],
    "hooks, no reduction": None,
}


def gaia_z_with(model: nn.Module, x: Tensor, reduce: Callable[[Tensor], Tensor] | None) -> Tensor | None:
    """GAIA-Z as ``gradreg.scorers.gaia.gaia_z_score`` computes it, with the given per-channel reduction."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        with record_output_grads(gaia_layers(model, "z")) as grads:
            logits = model(x)
        grads.backward(model, logits.max(dim=1).values.sum(), x)
    if reduce is None:
        return None
    ratios = torch.cat([reduce(_per_channel(g)).to(x.dtype) for g in grads], dim=1)
    return -ratios.square().mean(dim=1)


def bench_case(name: str, batch: int, size: int, channels_last: bool, args: argparse.Namespace) -> list[str]:
    """Table rows for one model and layout: the floor, then every variant (checked to agree first)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MODELS.build(name, num_classes=1000 if size >= 224 else 10, in_channels=3).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    reference = gaia_z_with(model, x, REDUCTIONS["ne-to-mean"])
    for label, reduce in REDUCTIONS.items():
        if reduce is not None and not torch.equal(gaia_z_with(model, x, reduce), reference):
            raise AssertionError(f"{label} scores differ from ne-to-mean on {name}")
    cases = [("floor", "forward + input backward", lambda: input_backward_floor(model, x), batch)]
    cases += [("variant", label, lambda r=r: gaia_z_with(model, x, r), batch) for label, r in REDUCTIONS.items()]
    rows = time_interleaved(cases, device, args.warmup, args.repeats)
    layout = "channels-last" if channels_last else "contiguous"
    return [
        f"| {name} | {batch} | {layout} | {row['name']} | {1e6 * row['seconds'] / batch:.1f} | "
        f"{row['seconds'] / rows[0]['seconds']:.3f} |"
        for row in rows
    ]


def main(argv: list[str] | None = None) -> None:
    """Time every reduction on each model, contiguous and channels-last; print (and write) one table."""
    parser = kernel_bench_parser(__doc__, warmup=3, repeats=25)
    parser.add_argument("--model", action="append", type=parse_model_spec, help="name:batch:size, repeatable")
    args = parser.parse_args(argv)
    apply_device_settings(args.device, args.threads)
    lines = ["| model | batch | layout | variant | us / image | x fwd+input bwd |", "|---|---|---|---|---|---|"]
    for channels_last in (False, True):
        for spec in args.model or DEFAULT_MODELS:
            lines += bench_case(*spec, channels_last, args)
    report_table("gaia_reduction.py", argv, args.device, args.repeats, lines, args.out)


if __name__ == "__main__":
    main()
