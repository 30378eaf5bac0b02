"""Building the LightningCLI for ``train.py`` and running ``fit`` in a fresh run directory."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from gradreg.callbacks import METRICS, OODEvalCallback
from gradreg.cli import UserError, next_run_dir, point_latest
from gradreg.data import OODDataModule
from gradreg.data.check import require_datasets
from gradreg.data.datasets import DatasetNotFoundError, dataset_name
from gradreg.evaluation import scorer_key
from gradreg.module import GradRegModule
from gradreg.registry import RegistryError

RUN_DIR_ENV = "GRADREG_RUN_DIR"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
OOD_CALLBACK = f"{OODEvalCallback.__module__}.{OODEvalCallback.__name__}"
DEFAULT_LOGGERS = [
    {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "gradreg"}},
    {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
]


class GradRegCLI(LightningCLI):
    """LightningCLI with linked data -> model arguments and a ``run`` section (run directory, checkpointing)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:  # noqa: D102
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_mean", "model.input_mean", apply_on="instantiate")
        parser.link_arguments("data.input_std", "model.input_std", apply_on="instantiate")
        parser.add_argument("--run.root", type=str, default="runs", help="folder holding one sub-folder per run")
        parser.add_argument("--run.name", type=str | None, default=None, help="run name prefix (default: config stem)")
        parser.add_argument("--run.monitor", type=str, default="val/acc", help="metric that selects best.ckpt")
        parser.add_argument("--run.mode", type=Literal["max", "min"], default="max", help="max or min for run.monitor")
        parser.add_argument("--run.resume", type=str | None, default=None, help="checkpoint to resume training from")

    def before_instantiate_classes(self) -> None:
        """Check the checkpoint settings, create the run directory and point loggers and checkpoints into it."""
        config = self.config
        best_every_n_epochs = _monitor_every_n_epochs(config)
        config_files = config.get("config") or []
        config.run.name = config.run.name or (Path(str(config_files[-1])).stem if config_files else "run")
        # DDP re-executes this script on the other ranks: they inherit rank 0's run directory.
        inherited = os.environ.get(RUN_DIR_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None
        run_dir = Path(inherited) if inherited else next_run_dir(Path(config.run.root), config.run.name)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        self.run_dir = run_dir
        if not inherited:  # the config as given, before this run's paths go in: `--config` on it starts a new run
            (run_dir / "config.yaml").write_text(self.parser.dump(config, skip_none=False))
        config.trainer.default_root_dir = str(run_dir)
        loggers = config.trainer.logger
        if isinstance(loggers, Namespace):
            loggers = [loggers]
        for logger in loggers if isinstance(loggers, list) else []:
            kind = logger.class_path.rsplit(".", 1)[-1]
            logger.init_args.save_dir = str(run_dir)
            if kind == "WandbLogger":
                logger.init_args.name = logger.init_args.get("name") or run_dir.name
            elif kind == "CSVLogger":
                logger.init_args.name, logger.init_args.version = "", ""  # metrics.csv directly in the run dir
        # best.ckpt is saved only on epochs that log run.monitor; last.ckpt after every validation.
        best = {"filename": "best", "monitor": config.run.monitor, "mode": config.run.mode}
        checkpoints = [{**best, "every_n_epochs": best_every_n_epochs}, {"save_last": True, "save_top_k": 0}]
        config.trainer.callbacks = [
            *(config.trainer.callbacks or []),
            *(Namespace(class_path=CHECKPOINT, init_args=Namespace(dirpath=str(run_dir), **c)) for c in checkpoints),
        ]


def _monitor_every_n_epochs(config: Namespace) -> int:
    """Check ``run.monitor``; return every how many epochs the monitored metric is logged.

    ``val/acc`` and ``val/loss`` come with every validation; ``ood/{set}/{scorer}/{metric}`` every
    ``every_n_epochs`` epochs of the :class:`OODEvalCallback` that logs it. Training metrics are refused: they
    are measured on augmented images (and outliers) while the weights change, not a model selection criterion.
    """
    callbacks = config.trainer.callbacks or []
    if any(c.class_path == CHECKPOINT for c in callbacks):
        raise UserError(
            "trainer.callbacks lists a ModelCheckpoint; remove it: train.py saves best.ckpt (by run.monitor) and "
            "last.ckpt itself"
        )
    monitor = config.run.monitor
    if monitor in ("val/acc", "val/loss"):
        return 1
    logged: dict[tuple[str, str, str], int] = {}  # (set, scorer, metric) -> every_n_epochs of its callback
    sets = config.data.ood_sets if config.data.ood_val_sets is None else config.data.ood_val_sets
    for callback in callbacks:
        if callback.class_path == OOD_CALLBACK and sets:
            for name in [*map(dataset_name, sets), "mean"]:
                for scorer in map(scorer_key, callback.init_args.scorers):
                    logged |= {(name, scorer, m): callback.init_args.every_n_epochs for m in METRICS}
    parts = tuple(monitor.split("/"))
    if parts[0] == "ood" and parts[1:] in logged:
        return logged[parts[1:]]
    if not logged:
        raise UserError(
            f"run.monitor '{monitor}' is not logged by this run; choose val/acc or val/loss (ood/* metrics need an "
            "OODEvalCallback in trainer.callbacks and sets in data.ood_val_sets)"
        )
    choices = ["SET in " + ", ".join(dict.fromkeys(k[0] for k in logged))]
    choices += ["SCORER in " + ", ".join(dict.fromkeys(k[1] for k in logged)), "METRIC in " + ", ".join(METRICS)]
    raise UserError(
        f"run.monitor '{monitor}' is not logged by this run; choose val/acc, val/loss or ood/SET/SCORER/METRIC with "
        + "; ".join(choices)
    )


def build_cli(args: Sequence[str] | None = None) -> GradRegCLI:
    """Parse the command line (``--config FILE`` and dotted overrides) and instantiate every object."""
    argv = list(sys.argv[1:] if args is None else args)
    for i, arg in enumerate(argv):  # a missing config file is the most common mistake: say so in one line
        value = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is not None and not Path(value).is_file():
            raise UserError(f"config file '{value}' does not exist; see configs/ for the shipped configs")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        os.environ.pop(RUN_DIR_ENV, None)
    try:
        return GradRegCLI(
            GradRegModule,
            OODDataModule,
            run=False,
            args=None if args is None else argv,
            save_config_callback=None,  # the resolved config is written to the run dir by before_instantiate_classes
            trainer_defaults={"logger": DEFAULT_LOGGERS, "inference_mode": False},
            seed_everything_default=0,
            parser_kwargs={"exit_on_error": False},
        )
    except (argparse.ArgumentError, ValueError, TypeError, KeyError) as err:
        discard_unused_run_dir()
        raise UserError(_one_line(err)) from None


def _registry_error(err: BaseException) -> RegistryError | None:
    """The outermost :class:`RegistryError` behind ``err`` (jsonargparse wraps what a constructor raises)."""
    queue, seen = [err], set()
    while queue:
        e = queue.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RegistryError):
            return e
        queue += [e.__cause__, e.__context__]
    return None


def _one_line(err: BaseException) -> str:
    """Condense a (possibly nested, multi-line) jsonargparse error into its most specific line."""
    registry = _registry_error(err)
    if registry is not None:  # an unknown scorer, sampler, dataset or setting, a bad value: its message names the fix
        return str(registry)
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip(" -")] or [type(err).__name__]
    if lines[0].startswith("Parser key") and len(lines) > 1:  # 'Parser key "model.method":' + 'Expected ...'
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def discard_unused_run_dir() -> None:
    """Remove a run directory this process created if it holds nothing but its config (the run never started)."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    if os.environ.get("LOCAL_RANK", "0") != "0" or not run_dir:
        return
    path = Path(run_dir)
    if path.is_dir() and {p.name for p in path.iterdir()} <= {"config.yaml"}:
        shutil.rmtree(path)


def fit(cli: GradRegCLI) -> int:
    """Check the data, then train; print where the run's files are."""
    try:  # every dataset the run will read, before any work (the report of `python -m gradreg.data check`)
        require_datasets(cli.config, stage="fit")
    except DatasetNotFoundError:
        discard_unused_run_dir()
        raise
    ckpt_path: Any = cli.config.run.resume
    if ckpt_path is not None and not os.path.isfile(ckpt_path):
        raise UserError(f"run.resume checkpoint '{ckpt_path}' does not exist; pass a path to a .ckpt file")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    point_latest(cli.run_dir)
    print(f"run directory: {cli.run_dir}  (evaluate with: python evaluate.py {cli.run_dir})")
    return 0
