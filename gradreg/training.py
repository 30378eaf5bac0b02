"""Building the LightningCLI for ``train.py`` and running ``fit`` in a fresh run directory."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from gradreg.cli import UserError, next_run_dir, point_latest
from gradreg.data import OODDataModule
from gradreg.data.check import require_datasets
from gradreg.data.datasets import DatasetNotFoundError
from gradreg.module import GradRegModule
from gradreg.registry import RegistryError

RUN_DIR_ENV = "GRADREG_RUN_DIR"
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
        parser.add_argument("--run.mode", type=str, default="max", help="max or min for run.monitor")
        parser.add_argument("--run.resume", type=str | None, default=None, help="checkpoint to resume training from")

    def before_instantiate_classes(self) -> None:
        """Create the run directory and point loggers and checkpoints into it."""
        config = self.config
        config_files = config.get("config") or []
        stem = Path(str(config_files[-1])).stem if config_files else "run"
        # DDP re-executes this script on the other ranks: they inherit rank 0's run directory.
        inherited = os.environ.get(RUN_DIR_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None
        run_dir = Path(inherited) if inherited else next_run_dir(Path(config.run.root), config.run.name or stem)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        self.run_dir = run_dir
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
        checkpoint = Namespace(
            class_path="lightning.pytorch.callbacks.ModelCheckpoint",
            init_args=Namespace(
                dirpath=str(run_dir), filename="best", monitor=config.run.monitor, mode=config.run.mode, save_last=True
            ),
        )
        config.trainer.callbacks = [*(config.trainer.callbacks or []), checkpoint]
        if not inherited:
            (run_dir / "config.yaml").write_text(self.parser.dump(config, skip_none=False))


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
