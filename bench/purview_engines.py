"""Per-layer cost of the three exact engines behind ``purview``'s Linear/Conv2d gradient norms.

``gradreg.scorers.purview`` picks, per layer, between materializing the per-sample weight gradient
(unfold + batched matmul, or a grouped convolution for large maps) and ghost norms from two Gram
matrices, by three constants (``GROUPED_CONV_MIN_POSITIONS``, ``GROUPED_CONV_MIN_KERNEL``,
``GHOST_MAX_COST_RATIO``). This script times every engine on every single-call Linear/Conv2d layer of
a model, with the inputs and output gradients of one real batch, checks that the engines agree, and
prints one row per layer shape: the time of each engine, the engine the current constants pick and
the fastest one, plus totals. It then times the whole ``purview_layer_norms`` call (hooks, every
layer) on a grid of ``GROUPED_CONV_MIN_POSITIONS`` and ``GHOST_MAX_COST_RATIO``. That is the data for
tuning the constants on a device.

Examples:
    python bench/purview_engines.py --device cuda
    python bench/purview_engines.py --device cpu --model wrn40_2:64:32 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scorers import (
    DEFAULT_MODELS,
    apply_device_settings,
    environment_line,
    kernel_bench_parser,
    parse_model_spec,
    time_interleaved,
)

from gradreg.double_backward import original_type
from gradreg.models import MODELS
from gradreg.scorers import purview

# Constants that force one engine everywhere (as in tests/test_scorers.py).
ENGINES = {
    "unfold": {"GROUPED_CONV_MIN_POSITIONS": 10**9, "GHOST_MAX_COST_RATIO": 0.0},
    "grouped": {"GROUPED_CONV_MIN_POSITIONS": 1, "GROUPED_CONV_MIN_KERNEL": 1, "GHOST_MAX_COST_RATIO": 0.0},
    "ghost": {"GHOST_MAX_COST_RATIO": float("inf")},
}


# Ghost norms are not timed where they cost more than this many times the materialized gradient.
GHOST_SKIP_COST_RATIO = 8
# End-to-end grid: (GROUPED_CONV_MIN_POSITIONS, GHOST_MAX_COST_RATIO).
GRID = [(positions, ratio) for positions in (1, 256, 1024) for ratio in (0.0, 0.5, 1.0)]


@contextmanager
def constants(settings: dict[str, object]) -> Iterator[None]:
    """Set ``purview``'s switch constants (or other attributes) for the duration of the block."""
    saved = {name: getattr(purview, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(purview, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(purview, name, value)


def layer_calls(model: nn.Module, x: torch.Tensor, layers: list) -> dict[nn.Module, list]:
    """The (input, output gradient) pairs ``purview`` hands each closed-form layer, kept from one call."""
    kept: dict[nn.Module, list] = {}
    reduce = purview._layer_sq_norm

    def keep(m: nn.Module, calls: list) -> torch.Tensor:
        kept[m] = calls
        return reduce(m, calls)

    with constants({"_layer_sq_norm": keep}):
        purview._closed_form_sq_norms(model, x, layers)
    return kept


def engine_norm(engine: str | None, m: nn.Module, calls: list) -> torch.Tensor:
    """``purview._layer_sq_norm`` with one engine forced (None: the default constants)."""
    with constants(ENGINES.get(engine, {})):
        return purview._layer_sq_norm(m, calls)


def layer_norms_with(settings: dict[str, float], model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The whole ``purview_layer_norms`` call under the given constants."""
    with constants(settings):
        return purview.purview_layer_norms(model, x)


def default_engine(m: nn.Module, d: torch.Tensor) -> str:
    """The engine the current constants pick for a single-call layer."""
    if purview._ghost_is_cheaper(m, d):
        return "ghost"
    if isinstance(m, nn.Conv2d) and purview._uses_grouped_conv(m, d):
        return "grouped"
    return "unfold"


def bench_model(name: str, batch: int, size: int, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """One row per distinct layer shape (count, median ms per engine, default and fastest engine), then
    the end-to-end ms of ``purview_layer_norms`` for every point of ``GRID``."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MODELS.build(name, num_classes=1000 if size >= 224 else 10, in_channels=3).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    layers = purview.purview_layers(model)
    calls = layer_calls(model, x, layers)
    shapes: Counter = Counter()
    rows: dict[tuple, dict] = {}
    for _, m in layers:
        m_calls = calls.get(m, [])
        kind = original_type(m)  # GReg's double-backward layers count as their originals, as in purview
        if kind not in (nn.Linear, nn.Conv2d) or len(m_calls) != 1:
            continue
        d = m_calls[0][1]
        groups, positions, k, o = purview._factor_shape(m, d)
        # Layers alike in every setting that changes the work are timed once and counted.
        geometry = tuple(getattr(m, a, None) for a in ("kernel_size", "stride", "padding", "dilation"))
        key = (kind.__name__, groups, positions, k, o, geometry)
        shapes[key] += 1
        if key in rows:
            continue
        engines = [e for e in ENGINES if e != "grouped" or isinstance(m, nn.Conv2d)]
        if positions * (k + o) > GHOST_SKIP_COST_RATIO * k * o:
            engines.remove("ghost")  # far off the switch point: seconds per call on large maps, never chosen
        results = {e: engine_norm(e, m, m_calls) for e in engines}
        worst = max((r - results["unfold"]).abs().max() / results["unfold"].abs().max() for r in results.values())
        cases = [("engine", e, lambda e=e, m=m, c=m_calls: engine_norm(e, m, c), batch) for e in engines]
        timed = {t["name"]: 1e3 * t["seconds"] for t in time_interleaved(cases, device, args.warmup, args.repeats)}
        rows[key] = {
            "model": name,
            "layer": key,
            "ms": timed,
            "default": default_engine(m, d),
            "fastest": min(timed, key=timed.get),
            "max_rel_diff": float(worst),
        }
    for key, row in rows.items():
        row["count"] = shapes[key]
    grid = [{"GROUPED_CONV_MIN_POSITIONS": p, "GHOST_MAX_COST_RATIO": r} for p, r in GRID]
    cases = [("grid", str(i), lambda g=g: layer_norms_with(g, model, x), batch) for i, g in enumerate(grid)]
    totals = time_interleaved(cases, device, args.warmup, args.repeats)
    end_to_end = [{"model": name, **g, "ms": 1e3 * t["seconds"]} for g, t in zip(grid, totals, strict=True)]
    return list(rows.values()), end_to_end


def markdown(rows: list[dict]) -> str:
    """One table row per layer shape, then per-model totals (ms per batch, summed over layers)."""
    lines = [
        "| model | layer (type, g, T, K, O, (kernel, stride, padding, dilation)) | count "
        "| unfold ms | grouped ms | ghost ms | default | fastest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals: dict[str, Counter] = {}
    for r in rows:
        ms = r["ms"]
        cells = [f"{ms[e]:.2f}" if e in ms else "-" for e in ENGINES]
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['count']} | {' | '.join(cells)} | {r['default']} | {r['fastest']} |"
        )
        total = totals.setdefault(r["model"], Counter())
        total["default"] += r["count"] * ms[r["default"]]
        total["fastest"] += r["count"] * ms[r["fastest"]]
        for e in ENGINES:
            # Linear layers have no grouped engine (their materialized route is unfold); nan: ghost not timed.
            total[e] += r["count"] * ms.get(e, ms["unfold"] if e == "grouped" else float("nan"))
    lines += [
        "",
        "| model | default ms | per-layer fastest ms | unfold only | grouped only | ghost only |",
        "|---|---|---|---|---|---|",
    ]
    for model, t in totals.items():
        lines.append(
            f"| {model} | {t['default']:.1f} | {t['fastest']:.1f} | "
            + " | ".join(f"{t[e]:.1f}" for e in ENGINES)
            + " |"
        )
    worst = max((r["max_rel_diff"] for r in rows), default=0.0)
    return "\n".join(lines) + f"\n\nlargest relative difference between engines: {worst:.1e}"


def grid_markdown(end_to_end: list[dict]) -> str:
    """Whole ``purview_layer_norms`` call, ms per batch, for each pair of constants."""
    lines = [
        "| model | GROUPED_CONV_MIN_POSITIONS | GHOST_MAX_COST_RATIO | purview_layer_norms ms |",
        "|---|---|---|---|",
    ]
    for r in end_to_end:
        lines.append(
            f"| {r['model']} | {r['GROUPED_CONV_MIN_POSITIONS']} | {r['GHOST_MAX_COST_RATIO']} | {r['ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse flags, time every model's layers, print the tables."""
    parser = kernel_bench_parser(__doc__, warmup=1, repeats=5)
    parser.add_argument("--model", action="append", type=parse_model_spec, help="name:batch:size, repeatable")
    args = parser.parse_args(argv)
    apply_device_settings(args.device, args.threads)
    rows, end_to_end = [], []
    for spec in args.model or DEFAULT_MODELS:
        model_rows, model_totals = bench_model(*spec, args)
        rows += model_rows
        end_to_end += model_totals
    command = "python bench/purview_engines.py " + " ".join(sys.argv[1:] if argv is None else argv)
    current = f"current constants: {purview.GROUPED_CONV_MIN_POSITIONS}, {purview.GHOST_MAX_COST_RATIO}"
    text = (
        f"{environment_line(args.device, args.threads)}\n`{command}`\n\n{markdown(rows)}\n\n"
        f"{grid_markdown(end_to_end)}\n\n{current}"
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
