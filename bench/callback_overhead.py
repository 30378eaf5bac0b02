"""Cost of OODEvalCallback's default settings relative to a quickstart training epoch (issue 6 target: <= 10%).

Trains the quickstart model twice per repeat, alternating, with and without the callback (its default scorers
``msp, energy, gradnorm``), and reports the median fit time per epoch of each and their ratio.

    python bench/callback_overhead.py --epochs 3 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gradreg.callbacks import OODEvalCallback
from gradreg.data import OODDataModule
from gradreg.module import GradRegModule


def fit_seconds(epochs: int, with_callback: bool) -> float:
    """Wall time of one quickstart fit (validation included), with or without the OOD callback."""
    seed_everything(0)
    dm = OODDataModule(batch_size=32, outlier_batch_size=32)
    model = GradRegModule(arch_kwargs={"in_channels": 1, "width": 32}, num_classes=dm.num_classes, lr=0.05,
                          schedule="cosine", input_mean=dm.input_mean, input_std=dm.input_std)  # fmt: skip
    callbacks = [OODEvalCallback()] if with_callback else []
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start


def main() -> None:
    """Parse flags, time both variants alternately, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for with_callback in (False, True):
            times[with_callback].append(fit_seconds(args.epochs, with_callback) / args.epochs)
    plain, with_cb = statistics.median(times[False]), statistics.median(times[True])
    print(f"| variant | s/epoch (median of {args.repeats}) |\n|---|---|")
    print(f"| quickstart epoch, no callback | {plain:.3f} |\n| with OODEvalCallback defaults | {with_cb:.3f} |")
    print(f"\ncallback overhead: {100 * (with_cb / plain - 1):.1f}% of an epoch ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
