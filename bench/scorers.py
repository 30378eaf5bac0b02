"""Per-image cost of every registered OOD scorer, next to two floors and the per-sample loops it replaces.

Everything is measured in one process on the same random batch, model in eval mode, random weights:

- floors: a plain forward (no grad), a forward plus one backward to the input (what any input-gradient
  scorer needs at least), and that plus a second forward (ODIN's own floor: it scores the perturbed input);
- scorers: every name in ``gradreg.scorers.SCORERS`` with its default settings, on the whole batch;
- per-sample loops (timed on ``--loop-samples`` images, reported per image): GradNorm as the official
  code runs it (batch 1, forward + full backward, L1 norm of the last-layer weight gradient, next to
  the closed form ``gradnorm``); all-layer per-sample gradient norms of the purview loss with a
  batch-1 loop, with ``torch.func.vmap`` (``purview_layer_norms(method="vmap")``) and, if installed
  (``pip install -e ".[bench]"``), with BackPACK's ``BatchL2Grad``, next to the
  hook-based ``purview``.

Models are looked up by name in ``gradreg.models.MODELS`` at run time; a name that is not registered is
skipped with a message. ``torchvision.NAME`` builds ``torchvision.models.get_model(NAME)`` instead, wrapped in
``gradreg.models.SplitHead`` (e.g. ``torchvision.vit_b_16:32:224``). Timing: ``--warmup`` rounds, then
``--repeats`` rounds that each run every case once (interleaved, so background load hits all cases alike); median
per case, CUDA synchronized around each call. Only GPU numbers are meaningful as absolute times; on a CPU read the
ratios (scorer / floor, loop / batched).

Examples:
    python bench/scorers.py --device cuda --out bench_scorers_gpu.md
    python bench/scorers.py --device cpu --model wrn40_2:32:32 --repeats 3 --loop-samples 4 --threads 1
    python bench/scorers.py --device cpu --model wrn40_2:2:8 --scorers purview --skip-loops --count-ops
    python bench/scorers.py --device cpu --model torchvision.swin_t:8:224 --scorers energy purview --loop-samples 4
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gradreg.models import MODELS, SplitHead
from gradreg.scorers import SCORERS, build, purview
from gradreg.scorers.purview import confounding_loss, purview_layer_norms, purview_layers

DEFAULT_MODELS = [("wrn40_2", 512, 32), ("resnet50", 128, 224)]


def parse_model_spec(spec: str) -> tuple[str, int, int]:
    """``name:batch:size`` -> (name, batch, size)."""
    try:
        name, batch, size = spec.split(":")
        return name, int(batch), int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name:batch:size, got {spec!r}") from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    cases: list[tuple[str, str, Callable[[], object], int]], device: torch.device, warmup: int, repeats: int
) -> list[dict]:
    """Time ``(kind, label, fn, images)`` cases round-robin: round r runs every case once.

    Interleaving spreads background load evenly over the cases, which keeps their ratios meaningful on
    a shared machine. Returns per case the median seconds per call and the peak CUDA memory (NaN on CPU).
    """
    for _ in range(warmup):
        for _, _, fn, _ in cases:
            fn()
    times: list[list[float]] = [[] for _ in cases]
    peaks = [float("nan")] * len(cases)
    for _ in range(repeats):
        for i, (_, _, fn, _) in enumerate(cases):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[i].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[i] = float(torch.cuda.max_memory_allocated(device))
    return [
        {"kind": kind, "name": label, "seconds": statistics.median(t), "images": images, "peak_bytes": peak}
        for (kind, label, _, images), t, peak in zip(cases, times, peaks, strict=True)
    ]


def count_operators(fn: Callable[[], object]) -> int:
    """aten operators dispatched by one call of ``fn`` (nested ones included), from ``torch.profiler``.

    Where kernel launches bound a call (small models on a GPU), its time follows this count more than its FLOPs.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def forward_floor(model: nn.Module, x: Tensor) -> None:
    """Plain eval-mode forward without autograd."""
    with torch.no_grad():
        model(x)


def input_backward_floor(model: nn.Module, x: Tensor) -> Tensor:
    """Forward plus one backward to the input (the cheapest input-gradient computation); returns the gradient."""
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(model(x).amax(dim=1).sum(), x)[0]


def odin_floor(model: nn.Module, x: Tensor) -> None:
    """Forward, backward to the input, forward of the moved input: ODIN's own floor."""
    grad = input_backward_floor(model, x)
    with torch.no_grad():
        model(x - grad)


def gradnorm_official_loop(model: nn.Module, x: Tensor) -> list[float]:
    """GradNorm as ``gradnorm_ood/test_ood.py::iterate_data_gradnorm`` runs it, step by step; the scores.

    Batch 1, an input that requires grad, ``zero_grad``, all-ones target, ``loss.backward()`` through every
    parameter, L1 norm of the fc weight gradient copied to the host.
    """
    scores = []
    for xi in x:
        inputs = xi.unsqueeze(0).requires_grad_(True)
        model.zero_grad()
        outputs = model(inputs)
        targets = torch.ones((1, outputs.shape[1]), device=x.device)
        loss = torch.mean(torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1))  # T = 1
        loss.backward()
        scores.append(model.fc.weight.grad.abs().sum().item())
    model.zero_grad()  # no gradients left behind in the other cases' memory
    return scores


def all_layer_norms_loop(model: nn.Module, x: Tensor) -> Tensor:
    """Per-sample squared gradient norm of every layer, one sample at a time (the naive baseline), (N, L).

    Kept lean, so that the ratio measures the batching and not the reduction: fused per-tensor norms
    (``torch._foreach_norm``, as ``clip_grad_norm_`` uses), one sum per layer, no host sync inside the loop.
    """
    layers = [list(m.parameters(recurse=False)) for _, m in purview_layers(model)]
    flat = [p for params in layers for p in params]
    layer_of = torch.tensor([i for i, params in enumerate(layers) for _ in params], device=x.device)
    rows = []
    for xi in x:
        grads = torch.autograd.grad(confounding_loss(model(xi.unsqueeze(0))).sum(), flat)
        sq = torch.stack(torch._foreach_norm(grads)).square()
        rows.append(sq.new_zeros(len(layers)).index_add_(0, layer_of, sq))
    return torch.stack(rows)


def backpack_layer_norms(extended: nn.Module, layers: list[nn.Module], x: Tensor) -> Tensor:
    """Per-sample, per-layer squared gradient norms with BackPACK's ``BatchL2Grad`` (Dangel et al., ICLR 2020).

    ``extended`` is a copy of the model passed through ``backpack.extend``; ``layers`` its parameter modules.
    """
    from backpack import backpack
    from backpack.extensions import BatchL2Grad

    extended.zero_grad(set_to_none=True)
    with backpack(BatchL2Grad()):
        confounding_loss(extended(x)).sum().backward()
    return torch.stack([sum(p.batch_l2 for p in m.parameters(recurse=False)) for m in layers], dim=1)


def library_cases(model: nn.Module, x: Tensor) -> list[tuple[str, str, Callable[[], object], int]]:
    """Per-sample-norm cases from installed libraries (``pip install -e ".[bench]"``), checked against purview.

    Opacus (``GradSampleModule``) is not among them: it refuses layers with buffers, i.e. every BatchNorm.
    """
    try:
        from backpack import extend
    except ImportError:
        print("BackPACK not installed: skipping its per-sample norms", file=sys.stderr)
        return []
    extended = extend(copy.deepcopy(model))
    layers = [m for _, m in purview_layers(extended)]
    got, expected = backpack_layer_norms(extended, layers, x), purview_layer_norms(model, x)
    error = float((got - expected).abs().max() / expected.abs().max())
    print(f"BackPACK vs purview_layer_norms: max relative difference {error:.1e}", file=sys.stderr)
    return [
        ("loop", "all-layer norms, BackPACK BatchL2Grad", lambda: backpack_layer_norms(extended, layers, x), len(x))
    ]


def build_model(name: str, num_classes: int) -> nn.Module | None:
    """A registered model, or ``torchvision.NAME`` with its head split off; None (and a message) if unknown."""
    torchvision_name = name.removeprefix("torchvision.")
    if torchvision_name != name:
        from torchvision.models import get_model, list_models

        if torchvision_name in list_models():
            return SplitHead(get_model(torchvision_name, num_classes=num_classes))
    elif name in MODELS:
        return MODELS.build(name, num_classes=num_classes, in_channels=3)
    print(f"skipping '{name}': not registered (known: {', '.join(MODELS.names())}, torchvision.NAME)", file=sys.stderr)
    return None


def bench_model(name: str, batch: int, size: int, args: argparse.Namespace) -> list[dict]:
    """All measurements for one model; returns one row per measurement (none for an unknown name)."""
    device = torch.device(args.device)
    num_classes = args.num_classes or (1000 if size >= 224 else 10)
    torch.manual_seed(0)
    model = build_model(name, num_classes)
    if model is None:
        return []
    model = model.to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    if args.channels_last:  # the layout the CIFAR and ImageNet configs train and evaluate in
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x_loop = x[: args.loop_samples]
    cases: list[tuple[str, str, Callable[[], object], int]] = [
        ("floor", "forward", lambda: forward_floor(model, x), batch),
        ("floor", "forward + input backward", lambda: input_backward_floor(model, x), batch),
        ("floor", "forward + input backward + forward", lambda: odin_floor(model, x), batch),
    ]
    scorers = {n: build(n) for n in args.scorers}
    for n in [n for n, s in scorers.items() if not s.supports(model)]:  # absent: models of method absent only
        print(f"{name}: skipping {n} (the model lacks what it reads)", file=sys.stderr)
        del scorers[n]
    cases += [("scorer", n, lambda s=s: s(model, x), batch) for n, s in scorers.items()]
    if not args.skip_loops:
        cases += [
            ("loop", "gradnorm, official batch-1 loop", lambda: gradnorm_official_loop(model, x_loop), len(x_loop)),
            ("loop", "all-layer norms, batch-1 loop", lambda: all_layer_norms_loop(model, x_loop), len(x_loop)),
            ("loop", "all-layer norms, torch.func.vmap", lambda: purview_layer_norms(model, x, method="vmap"), batch),
            *library_cases(model, x),
        ]
    rows = []
    for r, (_, _, fn, _) in zip(time_interleaved(cases, device, args.warmup, args.repeats), cases, strict=True):
        r.update(model=name, batch=batch, size=size, us_per_image=1e6 * r["seconds"] / r["images"])
        if args.count_ops and r["kind"] != "loop":
            r["aten_ops"] = count_operators(fn)
        print(f"{name} {r['kind']} {r['name']}: {r['us_per_image']:.1f} us/img", file=sys.stderr, flush=True)
        rows.append(r)
    return rows


def markdown_tables(rows: list[dict]) -> str:
    """Scorer table (per image and relative to both floors) and loop table (relative to the batched scorer)."""
    ops = any("aten_ops" in r for r in rows)
    header = "| model | batch | input | scorer | us / image | x forward | x fwd+input bwd | peak GiB |"
    lines = [header + (" aten ops |" if ops else ""), "|---|---|---|---|---|---|---|---|" + ("---|" if ops else "")]
    loops = [
        "| model | per-sample method | us / image | batched counterpart | loop / batched |",
        "|---|---|---|---|---|",
    ]
    by_model: dict[str, dict[str, dict]] = {}  # keyed by name:batch:size, so a model may appear twice
    for r in rows:
        by_model.setdefault(f"{r['model']}:{r['batch']}:{r['size']}", {})[r["name"]] = r
    counterpart = {
        "gradnorm, official batch-1 loop": "gradnorm",
        "all-layer norms, batch-1 loop": "purview",
        "all-layer norms, torch.func.vmap": "purview",
        "all-layer norms, BackPACK BatchL2Grad": "purview",
    }
    for key, named in by_model.items():
        model = key.split(":")[0]
        fwd = named["forward"]["us_per_image"]
        bwd = named["forward + input backward"]["us_per_image"]
        for r in named.values():
            if r["kind"] == "loop":
                base = named.get(counterpart[r["name"]])
                q = r["us_per_image"] / base["us_per_image"] if base else None
                ratio = "-" if q is None else f"{q:.0f}x" if q >= 10 else f"{q:.1f}x"  # 0.7x: the loop is faster
                loops.append(
                    f"| {model} | {r['name']} | {r['us_per_image']:.0f} | {counterpart[r['name']]} | {ratio} |"
                )
                continue
            peak = "n/a" if r["peak_bytes"] != r["peak_bytes"] else f"{r['peak_bytes'] / 2**30:.2f}"
            lines.append(
                f"| {model} | {r['batch']} | {r['size']}x{r['size']} | {r['name']} | {r['us_per_image']:.0f} | "
                f"{r['us_per_image'] / fwd:.2f} | {r['us_per_image'] / bwd:.2f} | {peak} |"
                + (f" {r['aten_ops']} |" if ops else "")
            )
    return "\n".join(lines) + ("\n\n" + "\n".join(loops) if len(loops) > 2 else "")


def kernel_bench_parser(doc: str, warmup: int, repeats: int) -> argparse.ArgumentParser:
    """The flags every per-layer kernel benchmark shares: device, warm-up and timed calls, CPU threads, output file."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--out", type=Path, help="write the table(s) here")
    return parser


def require_device(device: str) -> None:
    """Stop in one line when ``--device cuda...`` names a device this machine lacks."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this machine has no CUDA device; run with --device cpu")


def apply_device_settings(device: str, threads: int) -> None:
    """CPU threads (0: torch's default) and cuDNN autotuning on CUDA; a missing CUDA device stops in one line."""
    require_device(device)
    if threads > 0:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True


def report_table(
    script: str, argv: list[str] | None, device: str, repeats: int, lines: list[str], out: Path | None
) -> None:
    """Print a markdown table under where it was measured and the command that measured it; write it to ``out``."""
    command = f"python bench/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    text = f"{where}; torch {torch.__version__}; median of {repeats} calls\n`{command}`\n\n" + "\n".join(lines)
    print(text)
    if out:
        out.write_text(text + "\n")


def environment_line(device: str, threads: int) -> str:
    """Where the numbers come from."""
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {threads or torch.get_num_threads()} threads)"
    tf32 = device.startswith("cuda") and torch.backends.cudnn.allow_tf32  # cuDNN's default for float32 convolutions
    precision = "float32 (TF32 convolutions)" if tf32 else "float32"
    return f"{where}; torch {torch.__version__}; {precision}, eval mode, random weights; median per call"


def main(argv: list[str] | None = None) -> None:
    """Parse flags, time every model, print and optionally write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model",
        action="append",
        type=parse_model_spec,
        help="name:batch:size, repeatable (default: wrn40_2:512:32 and resnet50:128:224)",
    )
    parser.add_argument("--scorers", nargs="+", default=SCORERS.names(), help="registered names (default: all)")
    parser.add_argument("--num-classes", type=int, default=0, help="0: 1000 for inputs >= 224 px, else 10")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-samples", type=int, default=32, help="images timed in the per-sample loops")
    parser.add_argument("--skip-loops", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="model weights and inputs in channels-last")
    parser.add_argument(
        "--count-ops", action="store_true", help="add the aten operators one call dispatches (torch.profiler)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument(
        "--chunk-elements",
        type=int,
        default=purview.MAX_CHUNK_ELEMENTS,
        help="cap on elements per materialized per-sample block (purview hooks and vmap)",
    )
    parser.add_argument("--out", type=Path, help="write the markdown tables (and the environment line) here")
    parser.add_argument("--json", type=Path, help="write all raw rows here")
    args = parser.parse_args(argv)

    apply_device_settings(args.device, args.threads)
    purview.MAX_CHUNK_ELEMENTS = args.chunk_elements
    rows = []
    for name, batch, size in args.model or DEFAULT_MODELS:
        rows.extend(bench_model(name, batch, size, args))
    tables = markdown_tables(rows)
    env = environment_line(args.device, args.threads)
    command = "python bench/scorers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{env}\n`{command}`\n\n{tables}")
    if args.out:
        args.out.write_text(f"{env}\n`{command}`\n\n{tables}\n")
    if args.json:  # strict JSON: no NaN (CPU rows have no peak memory)
        clean = [{k: None if v != v else v for k, v in r.items()} for r in rows]
        args.json.write_text(json.dumps(clean, indent=1))


if __name__ == "__main__":
    main()
