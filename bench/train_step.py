"""Training-step cost of GReg: cross-entropy vs energy-OE vs energy-OE + the gradient-norm regularizer.

The step is the one a GReg training step runs (``ALGORITHMS.md`` section 1.2, with the single-forward
variant of ``gradreg.losses``): concatenate ID and outlier batches into one input with
``requires_grad``, one train-mode forward, CE on the ID logits, 0.1 * energy margin loss, the regularizer
from ``torch.autograd.grad(Phi, x, create_graph=True)``, one backward, one SGD step. Methods:

- ``ce``: cross-entropy on the ID part only (the outliers still go through the forward, so BatchNorm
  sees the same batch as in the other two).
- ``energy``: CE + 0.1 * energy margin loss (energy-OE, Liu et al. 2020, arXiv:2010.03759).
- ``greg``: energy + 1.0 * ``grad_norm_penalty`` (GReg, Sharifi et al. 2024, arXiv:2404.12368), with
  the cheaper double backward of BatchNorm and convolutions (``gradreg.double_backward``), as
  ``GradRegModule`` trains it.
- ``greg_eager_bn``: the same with BatchNorm's closed-form double backward in eager mode
  (``batchnorm_compile="off"``; ``greg`` compiles it on CUDA with Triton, so on a CPU the two are the same;
  the ``greg`` rows of result files before that change). ``greg_pytorch_bn`` in the H100 results of
  commit 8552526 is this method (it ran PyTorch's BatchNorm kernels, which every method runs now).
- ``greg_native_conv``: ``greg`` with PyTorch's convolution double backward (BatchNorm's closed form
  only; the ``greg`` rows of result files before the convolution change).
- ``greg_native``: the same with PyTorch's own double backward everywhere (the naive baseline;
  ``greg_native_bn`` in older result files).
- ``greg_sync``: ``greg`` with the BatchNorm layers that DDP's ``sync_batchnorm`` makes
  (``DoubleBackwardSyncBatchNorm``) forced onto their multi-rank path, ``sync_batch_norm_train``, in one
  process: its two ``all_reduce`` calls run over a process group of one (NCCL on CUDA, gloo on CPU), so the
  column is the compute cost of synchronized statistics without the communication between GPUs.
- ``energy_graph``, ``greg_graph``: ``energy`` and ``greg`` with the forward and backwards of the step replayed
  from a CUDA graph (``gradreg.cuda_graph.CapturedStep``, ``GradRegModule(cuda_graph=True)``; eager on a CPU).
  Their ratio column divides ``greg_graph`` by ``energy_graph``.

Speed settings that keep the semantics: ``cudnn.benchmark``; channels-last tensors on CUDA
(``--channels-last auto``); fused SGD on CUDA (``foreach`` on CPU); ``zero_grad(set_to_none=True)``;
everything in float32 (or bf16 autocast with energies and norms in float32), never float64.
``torch.compile`` is not used on the model: AOTAutograd does not support double backward (only
BatchNorm's closed form, a function without autograd, is compiled).

Timing: the methods of one (model, precision) are interleaved step by step in one process (background
load then hits all of them alike), median over the timed steps. Peak memory:
``torch.cuda.max_memory_allocated`` over the timed steps on CUDA (for the ``_graph`` methods: over the warmup,
which includes the eager steps and the capture, since the graph holds its memory pool). On CPU,
``--isolate on`` runs each case alone in a fresh process (not interleaved) and reports the peak resident set size
minus the resident size before the first step (model, optimizer and data excluded), a rough but comparable number;
by default (``--isolate off``) the CPU memory column is n/a.

Examples:
    python bench/train_step.py --device cuda --out bench_gpu.md
    python bench/train_step.py --device cpu --model wrn40_2:16:32:32 --precision fp32 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scorers import require_device

from gradreg.cuda_graph import CapturedStep, Step
from gradreg.double_backward import use_double_backward
from gradreg.double_backward.batchnorm import DoubleBackwardSyncBatchNorm
from gradreg.losses import energy, energy_margin_loss, grad_norm_penalty
from gradreg.models import create_classifier

# method -> table label
LABELS = {
    "ce": "CE",
    "energy": "energy-OE",
    "greg": "GReg",
    "greg_eager_bn": "eager-BN",
    "greg_native_conv": "native-conv",
    "greg_native": "native",
    "energy_graph": "energy-OE graph",
    "greg_graph": "GReg graph",
    "greg_sync": "GReg sync-BN",
}
METHODS = tuple(LABELS)
CONVERTED = {  # method -> (gradreg.double_backward layers, BatchNorm compile setting)
    "greg": (("batchnorm", "conv"), "auto"),
    "greg_eager_bn": (("batchnorm", "conv"), "off"),
    "greg_native_conv": (("batchnorm",), "auto"),
    "greg_native": ((), "auto"),
    "greg_graph": (("batchnorm", "conv"), "auto"),
    "greg_sync": (("batchnorm", "conv"), "auto"),
}
BETA_ENERGY = 0.1  # weight of the energy margin loss (energy-OE and GReg)
LAMBDA_GRAD = 1.0  # weight of the regularizer (GReg's --jacobianLoss)


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration."""

    model: str
    n_in: int
    n_out: int
    size: int
    method: str
    precision: str
    device: str
    channels_last: bool
    num_classes: int = 10
    warmup: int = 5  # CapturedStep's 3 eager steps, its capture, one replay
    repeats: int = 10
    threads: int = 0
    m_in: float = -25.0
    m_out: float = -7.0


def parse_model_spec(spec: str) -> tuple[str, int, int, int]:
    """``name:n_in:n_out:size`` -> (name, n_in, n_out, size)."""
    try:
        name, n_in, n_out, size = spec.split(":")
        return name, int(n_in), int(n_out), int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name:n_in:n_out:size, got {spec!r}") from None


def baseline(method: str) -> str:
    """The method a ratio column divides by: energy-OE, run the same way (eagerly or from a CUDA graph)."""
    return "energy_graph" if method.endswith("_graph") else "energy"


def forward_backward(model: nn.Module, x_in: Tensor, y_in: Tensor, x_out: Tensor, case: Case) -> dict[str, Tensor]:
    """The loss of ``case.method`` and its backward (gradients into ``.grad``); returns the detached loss."""
    n_in = x_in.shape[0]
    x = torch.cat([x_in, x_out])
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    method = case.method.removesuffix("_graph")
    regularize = method.startswith("greg")
    if regularize:
        x.requires_grad_(True)  # the regularizer differentiates w.r.t. the (normalized) input of this forward
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=case.precision == "bf16"):
        logits = model(x)
    loss = F.cross_entropy(logits[:n_in].float(), y_in)
    if method != "ce":
        e = energy(logits)  # float32 even under autocast
        loss = loss + BETA_ENERGY * energy_margin_loss(e[:n_in], e[n_in:], case.m_in, case.m_out)
        if regularize:
            penalty = grad_norm_penalty(x, e[:n_in], e[n_in:], case.m_in, case.m_out, scaling="code")
            loss = loss + LAMBDA_GRAD * penalty.value
    loss.backward()
    return {"loss": loss.detach()}


def train_step(optimizer: torch.optim.Optimizer, step: Step, x_in: Tensor, y_in: Tensor, x_out: Tensor) -> Tensor:
    """One optimization step; returns the (detached) loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = step(x_in, y_in, x_out)["loss"]
    optimizer.step()
    return loss


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OneRankSyncBatchNorm(DoubleBackwardSyncBatchNorm):
    """``DoubleBackwardSyncBatchNorm`` on its multi-rank path (``sync_batch_norm_train``) in a process group of one."""

    def across_ranks(self) -> bool:
        return self.training


def _sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with the layers of DDP's ``sync_batchnorm``, in a process group of one (created once)."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _setup(case: Case) -> tuple[torch.optim.Optimizer, Step, Tensor, Tensor, Tensor]:
    """Optimizer, the step's forward and backward (model in train mode) and a fixed random batch on ``case.device``."""
    device = torch.device(case.device)
    torch.manual_seed(0)
    model = create_classifier(case.model, case.num_classes, in_channels=3).to(device).train()
    if case.method == "greg_sync":
        model = _sync_batchnorm(model, device)
    layers, batchnorm_compile = CONVERTED.get(case.method, ((), "auto"))
    use_double_backward(model, layers, batchnorm_compile)
    for module in model.modules():
        if type(module) is DoubleBackwardSyncBatchNorm:
            module.__class__ = OneRankSyncBatchNorm
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=0.01,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        **({"fused": True} if device.type == "cuda" else {"foreach": True}),
    )
    x_in = torch.randn(case.n_in, 3, case.size, case.size, device=device)
    y_in = torch.randint(0, case.num_classes, (case.n_in,), device=device)
    x_out = torch.randn(case.n_out, 3, case.size, case.size, device=device)
    step = functools.partial(forward_backward, model, case=case)
    if case.method.endswith("_graph"):
        step = CapturedStep(step, model.parameters())
    return optimizer, step, x_in, y_in, x_out


def run_group(cases: list[Case]) -> list[dict]:
    """Time the cases in one process, interleaved step by step (round r runs step r of every case).

    Interleaving spreads any background load evenly over the methods, which keeps their ratios
    meaningful on a shared machine. Peak memory: on CUDA the allocator's peak over each case's timed
    steps (reset before every step); on CPU the peak resident size minus the size before the first step,
    meaningful only for a group of one case in a fresh process (see :func:`run_isolated`), else NaN.
    """
    first = cases[0]
    if first.threads > 0:
        torch.set_num_threads(first.threads)
    device = torch.device(first.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    states = [_setup(case) for case in cases]
    base_rss = _resident_bytes()
    failed, capture_peaks = set(), {}
    for i, (case, state) in enumerate(zip(cases, states, strict=True)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:  # the warmup captures the CUDA graphs: a failure there costs one method, not the group's results
            for _ in range(case.warmup):
                train_step(*state)
        except RuntimeError as err:
            print(f"{case.model} {case.precision} {case.method} left out: {err}", file=sys.stderr, flush=True)
            failed.add(i)
        if device.type == "cuda" and case.method.endswith("_graph"):
            # A replay allocates nothing: the graph's memory pool, sized during the capture, is held throughout.
            capture_peaks[case] = torch.cuda.max_memory_allocated(device)
    cases = [c for i, c in enumerate(cases) if i not in failed]
    states = [s for i, s in enumerate(states) if i not in failed]
    _sync(device)
    times: list[list[float]] = [[] for _ in cases]
    peaks = [capture_peaks.get(case, 0) for case in cases]
    losses = [float("nan")] * len(cases)
    for _ in range(first.repeats):
        for i, state in enumerate(states):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            loss = train_step(*state)
            _sync(device)
            times[i].append(1e3 * (time.perf_counter() - start))
            losses[i] = float(loss)
            if device.type == "cuda":
                peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(device))
    if device.type != "cuda":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
        peaks = [rss if len(cases) == 1 else float("nan")] * len(cases)
    return [
        {
            **dataclasses.asdict(case),
            "median_ms": statistics.median(t),
            "min_ms": min(t),
            "times_ms": t,
            "peak_bytes": peak,
            "final_loss": loss,
        }
        for case, t, peak, loss in zip(cases, times, peaks, losses, strict=True)
    ]


def run_isolated(case: Case) -> dict:
    """Run one case alone in a fresh process, so that the CPU peak-RSS figure belongs to this case."""
    with mp.get_context("spawn").Pool(processes=1, maxtasksperchild=1) as pool:
        return pool.apply(run_group, ([case],))[0]


def _gib(n: float) -> str:
    return "n/a" if n != n else f"{n / 2**30:.2f}"


def _cell(by_method: dict[str, dict], method: str, key: str) -> str:
    if method not in by_method:
        return "-"
    value = by_method[method][key]
    return _gib(value) if key == "peak_bytes" else f"{value:.1f}"


def markdown_table(results: list[dict]) -> str:
    """One row per (model, batch, precision): median ms per method, ratios to energy-OE, peak memory."""
    memory = "peak GiB" if results and results[0]["device"].startswith("cuda") else "step RSS GiB"
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    ratios = [m for m in methods if m in CONVERTED]
    header = ["model", "ID + OOD", "input", "precision", *(f"{LABELS[m]} ms" for m in methods)]
    header += [f"{LABELS[m]} / {LABELS[baseline(m)]}" for m in ratios]
    header.append(f"{memory} ({' / '.join(LABELS[m] for m in methods)})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["n_in"], r["n_out"], r["size"], r["precision"]), {})[r["method"]] = r
    for (model, n_in, n_out, size, precision), by_method in groups.items():
        cells = [model, f"{n_in} + {n_out}", f"{size}x{size}", precision]
        cells += [_cell(by_method, m, "median_ms") for m in methods]
        cells += [
            f"{by_method[m]['median_ms'] / by_method[baseline(m)]['median_ms']:.2f}x"
            if m in by_method and baseline(m) in by_method
            else "-"
            for m in ratios
        ]
        cells.append(" / ".join(_cell(by_method, m, "peak_bytes") for m in methods))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_line(device: str, threads: int, channels_last: bool) -> str:
    """Where the numbers come from."""
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {threads or torch.get_num_threads()} threads)"
    return (
        f"{where}; torch {torch.__version__}; channels_last={channels_last}; "
        f"median of the timed steps, train mode, SGD (nesterov, momentum 0.9)"
    )


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run every (model, precision, method) case, print and optionally write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model",
        action="append",
        type=parse_model_spec,
        help="name:n_in:n_out:size, repeatable (default: wrn40_2:128:256:32 and resnet50:64:128:224)",
    )
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA")
    parser.add_argument(
        "--isolate",
        choices=["on", "off"],
        default="off",
        help="on: one process per case, for CPU memory figures; off: methods interleaved step by step in one process",
    )
    parser.add_argument("--out", type=Path, help="write the markdown table (and the environment line) here")
    parser.add_argument("--json", type=Path, help="write all raw results here")
    parser.add_argument("--profile", type=Path, help="write torch.profiler tables of one step per method here")
    args = parser.parse_args(argv)
    require_device(args.device)

    models = args.model or [("wrn40_2", 128, 256, 32), ("resnet50", 64, 128, 224)]
    is_cuda = args.device.startswith("cuda")
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and is_cuda)
    results = []
    for name, n_in, n_out, size in models:
        for precision in args.precision:
            cases = [
                Case(
                    name,
                    n_in,
                    n_out,
                    size,
                    method,
                    precision,
                    args.device,
                    channels_last,
                    num_classes=args.num_classes,
                    warmup=args.warmup,
                    repeats=args.repeats,
                    threads=args.threads,
                )
                for method in args.methods
            ]
            group = [run_isolated(case) for case in cases] if args.isolate == "on" else run_group(cases)
            for result in group:
                print(
                    f"{name} {n_in}+{n_out} {size}px {precision} {result['method']}: {result['median_ms']:.1f} ms "
                    f"(min {result['min_ms']:.1f}), peak {_gib(result['peak_bytes'])} GiB",
                    file=sys.stderr,
                    flush=True,
                )
            results.extend(group)
            # Written after every group: a run cut short (a device time limit) keeps what it measured.
            env, table = environment_line(args.device, args.threads, channels_last), markdown_table(results)
            if args.out:
                args.out.write_text(f"{env}\n\n{table}\n")
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    print(f"{env}\n\n{table}")
    if args.profile:
        first = [Case(*models[0], m, args.precision[0], args.device, channels_last) for m in args.methods]
        args.profile.write_text(profile_tables(first))
    if torch.distributed.is_initialized():  # greg_sync's group of one (NCCL warns at exit otherwise)
        torch.distributed.destroy_process_group()


def profile_tables(cases: list[Case]) -> str:
    """``torch.profiler`` operator tables of one warmed-up step of each case: the top 25 by device time, then (on
    CUDA, where a launch-bound step hides behind its device time) the top 15 by the host's own time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cases[0].device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "cuda_time_total" if len(activities) == 2 else "cpu_time_total"
    tables = []
    for case in cases:
        state = _setup(case)
        for _ in range(case.warmup):
            train_step(*state)
        _sync(torch.device(case.device))
        with torch.profiler.profile(activities=activities) as prof:
            train_step(*state)
            _sync(torch.device(case.device))
        tables.append(f"## {case.model} {case.n_in}+{case.n_out} {case.precision} {case.method}\n")
        tables.append(prof.key_averages().table(sort_by=sort, row_limit=25))
        if sort != "cpu_time_total":
            tables.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return "\n".join(tables)


if __name__ == "__main__":
    main()
