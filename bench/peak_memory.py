"""Peak memory of one scorer call next to the forward + input-backward floor, each in a fresh process.

On CUDA ``bench/scorers.py`` already reports ``torch.cuda.max_memory_allocated`` per case; on the CPU the only
honest measure is the process's peak resident set (``ru_maxrss``), which cannot be reset, so every case runs in
a process of its own: build the model and batch, one warm-up call, one measured call.

Example:
    python bench/peak_memory.py --model resnet50:16:224 --model wrn40_2:128:32 --cases floor purview
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scorers import input_backward_floor, parse_model_spec

from gradreg.models import MODELS
from gradreg.scorers import SCORERS, build


def measure(name: str, batch: int, size: int, case: str) -> float:
    """Peak resident GiB of this process after building the model and calling ``case`` twice."""
    torch.manual_seed(0)
    model = MODELS.build(name, num_classes=1000 if size >= 224 else 10, in_channels=3).eval()
    x = torch.randn(batch, 3, size, size)
    call = (lambda: input_backward_floor(model, x)) if case == "floor" else (lambda: build(case)(model, x))
    for _ in range(2):
        call()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    """Run every (model, case) in a child process and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", type=parse_model_spec, help="name:batch:size, repeatable")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["floor", "purview"],
        choices=["floor", *SCORERS.names()],
        metavar="CASE",
        help="floor (forward + input backward) and/or registered scorer names",
    )
    parser.add_argument("--child", nargs=4, metavar=("NAME", "BATCH", "SIZE", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, batch, size, case = args.child
        print(measure(name, int(batch), int(size), case))
        return
    print("| model | batch | input | case | peak resident GiB |\n|---|---|---|---|---|")
    for name, batch, size in args.model or [("wrn40_2", 128, 32)]:
        for case in args.cases:
            child = [sys.executable, __file__, "--child", name, str(batch), str(size), case]
            peak = float(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
            print(f"| {name} | {batch} | {size}x{size} | {case} | {peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
