"""Building the LightningCLI for ``train.py`` and running ``fit`` in a fresh run directory."""

from __future__ import annotations

import argparse
import ast
import difflib
import itertools
import json
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.logger import _convert_params
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerStatus

from gradreg.callbacks import METRICS, OODEvalCallback
from gradreg.cli import (
    NEGATIVE_NUMBER,
    Interrupted,
    UserError,
    check_wandb_mode,
    next_run_dir,
    point_latest,
    read_config_file,
    wandb_failure,
)
from gradreg.data import OODDataModule
from gradreg.data.check import planned_reads, require_datasets
from gradreg.data.datasets import dataset_name
from gradreg.evaluation import scorer_key
from gradreg.module import ABSENT_HEAD_HINT, GradRegModule, NonFiniteLossError
from gradreg.registry import RegistryError

RUN_DIR_ENV = "GRADREG_RUN_DIR"
MISSING_MONITOR = "could not find the monitored key"  # Lightning's ModelCheckpoint, when run.monitor is not logged
# run.monitor names where lower is better (the last part of the key, without Lightning's _step/_epoch suffix)
LOWER_IS_BETTER = {"loss", "ce", "oe", "absent", "energy", "reg", "fpr95", "fpr95_oodpos"}
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
E = TypeVar("E", bound=BaseException)
OOD_CALLBACK = f"{OODEvalCallback.__module__}.{OODEvalCallback.__name__}"


def default_loggers() -> list[dict]:
    """The loggers of a run: wandb (its project from ``WANDB_PROJECT``, read as the CLI is built) and a CSV file."""
    return [
        {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": os.environ.get("WANDB_PROJECT", "gradreg")},
        },
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
    ]


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every epoch.

    Since lightning 2.6 ``save_last`` writes ``last.ckpt`` only when the same callback has just saved a top-k
    checkpoint, so it would stay at ``best.ckpt``'s epoch. A class of its own also gives it a state key that no
    ``ModelCheckpoint`` of the user's (a periodic snapshot: ``monitor`` None too) can share.
    """

    def __init__(self, dirpath: str) -> None:
        # at every training epoch's end: on validation's end only, it would skip the epochs without validation
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, save_on_train_epoch_end=True)


class BestCheckpoint(ModelCheckpoint):
    """``best.ckpt``: a ``ModelCheckpoint`` on ``run.monitor`` that waits for the run's first validation.

    ``trainer.max_steps`` inside an epoch ends training before that epoch's validation. Before any validation has run,
    a ``val/*`` or ``ood/*`` monitor has no value yet: no mistake, only no ``best.ckpt`` (``last.ckpt`` is written).
    A ``train/*`` key (logged by every epoch, cut short or not) or a run without validation keeps Lightning's check
    of a missing monitor, which :func:`fit` turns into an error.

    Each new best goes to the wandb run's summary (``best/<run.monitor>`` and ``best/epoch``): wandb keeps
    the last logged value of every metric there, which for ``val/acc`` need not be the checkpoint's.
    """

    @property
    def state_key(self) -> str:  # noqa: D102
        # ModelCheckpoint's key: checkpoints of earlier versions resume this state, and a user's ModelCheckpoint with
        # the same settings still collides with it (build_cli says so)
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        waiting = trainer.enable_validation and not self.monitor.startswith("train/")
        if not waiting or self.monitor in trainer.callback_metrics:
            best = self.best_model_score
            super().on_train_epoch_end(trainer, pl_module)
            self._summarize_best(trainer, best)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        best = self.best_model_score
        super().on_validation_end(trainer, pl_module)
        self._summarize_best(trainer, best)

    def _summarize_best(self, trainer: Trainer, before: Any) -> None:
        score = self.best_model_score
        if score is None or score is before or not trainer.is_global_zero:
            return
        best = {f"best/{self.monitor}": score.item(), "best/epoch": trainer.current_epoch}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(best)


class RunRecord(Callback):
    """Write ``checkpoint["run"]`` into every checkpoint: this run's name, group, wandb run id and optimizer settings.

    The optimizer settings are LightningCLI's ``--optimizer`` / ``--lr_scheduler`` (:func:`optimizer_settings`).

    The group is the name of the first run of a chain of resumed runs (a fresh run's own name): a run that resumes
    the checkpoint takes it over (:func:`_link_wandb_runs`), and ``evaluate.py`` names and groups its wandb run
    after it. Nothing goes into the callback states, so checkpoints of earlier versions resume as before.
    """

    def __init__(self, name: str) -> None:
        self.name = self.group = name
        self.optimizer: dict[str, Any] | None = None  # fit() sets it

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        wandb_ids = [  # a run that WANDB_MODE=disabled turns off has a made-up id
            logger.version
            for logger in trainer.loggers
            if isinstance(logger, WandbLogger) and not getattr(logger._experiment, "disabled", False)
        ]
        checkpoint["run"] = {
            "name": self.name,
            "group": self.group,
            "wandb_id": next(iter(wandb_ids), None),
            "optimizer": self.optimizer,
        }


def optimizer_settings(config: Namespace) -> dict[str, Any] | None:
    """LightningCLI's ``--optimizer`` and ``--lr_scheduler`` settings as plain values; None: the model's own SGD."""
    if config.get("optimizer") is None:  # (fit refuses an --lr_scheduler without it, which Lightning would ignore)
        return None
    chosen = {key: config.get(key) for key in ("optimizer", "lr_scheduler")}
    plain = {key: None if value is None else value.as_dict() for key, value in chosen.items()}
    return json.loads(json.dumps(plain, default=str))  # betas (0.9, 0.999) as a list: weights_only loads it


# Settings that choose a kernel, not the optimization: a run may change them (its checkpoint's torch may lack some)
_IMPLEMENTATION = {"foreach", "fused", "capturable", "differentiable"}


def _optimizer_change(now: dict[str, Any] | None, old: dict[str, Any] | None) -> str:
    """What differs between two :func:`optimizer_settings`, in command-line terms ("" if nothing).

    Settings only one side has (a torch version without that setting) and kernel choices do not count.
    """

    def classes(settings: dict[str, Any] | None) -> str:
        if settings is None:
            return "the model's own SGD (model.lr, momentum, ...)"
        return " ".join(f"--{key} {value['class_path']}" for key, value in settings.items() if value)

    if now is None and old is None:
        return ""
    if now is None or old is None or classes(now) != classes(old):
        return f"{classes(now)} here, {classes(old)} in the checkpoint's run"

    def flat(settings: dict[str, Any]) -> dict[str, Any]:
        return {
            f"--{key}.{name}": v for key, value in settings.items() if value
            for name, v in (value.get("init_args") or {}).items() if name not in _IMPLEMENTATION
        }  # fmt: skip

    a, b = flat(now), flat(old)
    changed = (key for key in sorted(a.keys() & b.keys()) if a[key] != b[key])
    return ", ".join(f"{key} {a[key]} here, {b[key]} in the checkpoint's run" for key in changed)


class GradRegCLI(LightningCLI):
    """LightningCLI with linked data -> model arguments and a ``run`` section (run directory, checkpointing)."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:  # noqa: D102
        parser = super().init_parser(**kwargs)
        parser._negative_number_matcher = NEGATIVE_NUMBER  # --model.m_in -2.5e1: "expected one argument" otherwise
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:  # noqa: D102
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_mean", "model.input_mean", apply_on="instantiate")
        parser.link_arguments("data.input_std", "model.input_std", apply_on="instantiate")
        parser.add_argument("--run.root", type=str, default="runs", help="folder holding one sub-folder per run")
        parser.add_argument("--run.name", type=str | None, default=None, help="run name prefix (default: config stem)")
        parser.add_argument("--run.monitor", type=str, default="val/acc", help="metric that selects best.ckpt")
        parser.add_argument(
            "--run.mode", type=Literal["max", "min"] | None, default=None,
            help="max or min for run.monitor (default: min for loss and fpr95 keys, else max)",
        )  # fmt: skip
        parser.add_argument(
            "--run.resume", type=str | None, default=None, help="checkpoint (or run directory: its last.ckpt) to resume"
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Sequence[str] | None) -> None:
        """Parse as LightningCLI does; an unknown key (a typo) gets the valid keys it may have meant."""
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            hint = _unknown_key_hint(str(err), list(parser.get_defaults().keys()))
            if hint is None:
                raise
            raise UserError(f"{_one_line(err)}; {hint}") from None

    def before_instantiate_classes(self) -> None:
        """Check datasets and checkpoint settings, create the run directory, point loggers and checkpoints there."""
        config = self.config
        trainer = config.trainer
        endless = trainer.max_epochs is None and trainer.max_steps in (None, -1) and trainer.get("max_time") is None
        if endless and not config.get("config"):  # a bare `python train.py`: Lightning would train 1000 epochs
            raise UserError(
                "train.py got no --config and no trainer.max_epochs or max_steps: it would train the defaults for "
                "Lightning's 1000 epochs; pass --config configs/quickstart.yaml (or another), or --trainer.max_epochs"
            )
        if trainer.get("enable_checkpointing") is False:  # else Lightning's "... but found ModelCheckpoint"
            raise UserError(
                "trainer.enable_checkpointing=false: train.py always writes best.ckpt and last.ckpt (evaluate.py and "
                "run.resume read them); leave it on (trainer.fast_dev_run=true is a smoke test without checkpoints)"
            )
        # Every dataset the run reads (`python -m gradreg.data check`), before the model is built (it may download
        # weights) and before anything is written.
        require_datasets(config, stage="fit")
        best_every_n_epochs = _monitor_every_n_epochs(config)
        if config.run.resume is not None:
            # config.yaml must name this checkpoint, not runs/latest (which then points at this run); as given
            # otherwise: a relative path stays relative, as data_root and run.root, so a moved project still resumes
            config.run.resume = str(_without_latest(_resume_file(Path(config.run.resume))))
        config_files = config.get("config") or []
        config.run.name = config.run.name or (Path(str(config_files[-1])).stem if config_files else "run")
        # Read now: Lightning's launcher removes WORLD_SIZE again when training ends (LightningEnvironment.teardown).
        self.rank_zero = is_rank_zero()
        if self.rank_zero:
            run_dir = next_run_dir(Path(config.run.root), config.run.name, option="run.root")
            os.environ[RUN_DIR_ENV] = str(run_dir)  # Lightning's DDP launcher re-executes this script: ranks inherit it
        elif RUN_DIR_ENV in os.environ:
            run_dir = Path(os.environ[RUN_DIR_ENV])
        else:  # started by torchrun or srun: rank 0 creates the run directory; ModelCheckpoint broadcasts its path
            # and only rank 0 logs, so nothing is written to this one (it is never created).
            run_dir = Path(config.run.root) / f"{config.run.name}-rank-{os.environ.get('RANK', 'other')}"
        self.run_dir = run_dir
        # The run directory is new; it holds only config.yaml: Lightning's "not empty" warnings are false alarms.
        alarm = rf"(Experiment logs|Checkpoint) directory \S*{re.escape(run_dir.name)}/? exists and is not empty"
        warnings.filterwarnings("ignore", message=alarm)
        # A resumed run writes to a new directory by design (README: its best.ckpt is the best of its own epochs), which
        # Lightning's ModelCheckpoint warns about on every resume.
        warnings.filterwarnings("ignore", message="The dirpath has changed from")
        dumped = self.parser.dump(config, skip_none=False)
        self.resolved_config = yaml.safe_load(dumped)  # what the wandb run's config shows (_log_config_to_wandb)
        if self.rank_zero:  # the config as given, before this run's paths go in: `--config` on it starts a new run
            (run_dir / "config.yaml").write_text(dumped)
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
        name = config.run.monitor.rsplit("/", 1)[-1].removesuffix("_step").removesuffix("_epoch")
        best = {"filename": "best", "monitor": config.run.monitor}
        best["mode"] = config.run.mode or ("min" if name in LOWER_IS_BETTER else "max")
        for callback in config.trainer.callbacks or []:  # the user's own: in the run, apart from best.ckpt/last.ckpt
            if callback.class_path == CHECKPOINT and not callback.init_args.get("dirpath"):
                callback.init_args.dirpath = str(run_dir / "checkpoints")
        # best.ckpt on the epochs that log run.monitor
        best_ckpt = Namespace(dirpath=str(run_dir), every_n_epochs=best_every_n_epochs, **best)
        config.trainer.callbacks = [
            *(config.trainer.callbacks or []),
            Namespace(class_path=f"{__name__}.BestCheckpoint", init_args=best_ckpt),
            Namespace(class_path=f"{__name__}.LastCheckpoint", init_args=Namespace(dirpath=str(run_dir))),
            Namespace(class_path=f"{__name__}.RunRecord", init_args=Namespace(name=run_dir.name)),
        ]


def _monitor_every_n_epochs(config: Namespace) -> int:
    """Check ``run.monitor``; return every how many epochs the monitored metric is logged.

    ``val/acc`` and ``val/loss`` come with every validation; ``ood/{set}/{scorer}/{metric}`` every
    ``every_n_epochs`` epochs of the :class:`OODEvalCallback` that logs it. ``train/*`` keys depend on the method
    (e.g. ``train/loss_epoch`` for a run without validation): :func:`fit` names a missing one at the first checkpoint.
    """
    callbacks = config.trainer.callbacks or []
    monitor = config.run.monitor
    if monitor in ("val/acc", "val/loss") or monitor.startswith("train/"):
        return 1
    logged: dict[tuple[str, str, str], int] = {}  # (set, scorer, metric) -> every_n_epochs of its callback
    sets = [spec for role, spec, _ in planned_reads(config.data) if role == "ood_val"]  # what the callback scores
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
            f"run.monitor '{monitor}' is not logged by this run; choose val/acc, val/loss or a train/* key (ood/* "
            "metrics need an OODEvalCallback in trainer.callbacks and sets in data.ood_val_sets)"
        )
    choices = ["SET in " + ", ".join(dict.fromkeys(k[0] for k in logged))]
    choices += ["SCORER in " + ", ".join(dict.fromkeys(k[1] for k in logged)), "METRIC in " + ", ".join(METRICS)]
    raise UserError(
        f"run.monitor '{monitor}' is not logged by this run; choose val/acc, val/loss, a train/* key or "
        "ood/SET/SCORER/METRIC with " + "; ".join(choices)
    )


def _batch_limits_int_first() -> None:
    """Make ``--trainer.limit_train_batches 1`` one batch, as the ``Trainer`` documents, not 1.0 (the whole epoch).

    The ``Trainer`` declares its ``limit_*_batches`` ``Optional[Union[int, float]]``, but CPython caches unions by
    equality, and ``Union[float, int] == Union[int, float]``: the ``Optional[Union[float, int]]`` built first (by
    ``lightning.fabric``) comes back, and jsonargparse, trying float first, reads 1 as 1.0
    (Lightning-AI/pytorch-lightning#21259). A ``|`` union keeps its order. A type another Lightning version changes
    is left alone.
    """
    annotations = Trainer.__init__.__annotations__
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        if set(get_args(annotations.get(name))) == {int, float, type(None)}:
            annotations[name] = int | float | None


def _not_a_litlogger_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip: For seamless cloud logging")


def _silence_lightning_noise() -> None:
    """Drop two lines Lightning prints on every run that no setting of a run can act on.

    Its advertisement for its own cloud logger, and a deprecation warning of its pytree helper under torch >= 2.9
    (a Lightning-internal call: Lightning-AI/pytorch-lightning#21326). Both filters are added once per process.
    """
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_litlogger_tip)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def build_cli(args: Sequence[str] | None = None) -> GradRegCLI:
    """Parse the command line (``--config FILE`` and dotted overrides) and instantiate every object."""
    _batch_limits_int_first()  # before jsonargparse reads (and caches) the Trainer's signature
    _silence_lightning_noise()
    argv = list(sys.argv[1:] if args is None else args)
    for i, arg in enumerate(argv):  # a missing config file is the most common mistake: say so in one line
        value = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        read_config_file(value)  # else jsonargparse's words for an empty file or a list ("Unexpected config: - a")
    rank_zero = is_rank_zero()
    if rank_zero:
        os.environ.pop(RUN_DIR_ENV, None)
    try:
        return GradRegCLI(
            GradRegModule,
            OODDataModule,
            run=False,
            args=None if args is None else argv,
            save_config_callback=None,  # the resolved config is written to the run dir by before_instantiate_classes
            trainer_defaults={"logger": default_loggers(), "inference_mode": False},
            seed_everything_default=0,
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False},  # --trainer.max_epoch is a typo
        )
    except BaseException as err:
        discard_unused_run_dir(rank_zero)
        if isinstance(err, MisconfigurationException) and "No supported gpu backend" in str(err):
            raise UserError(
                "trainer.accelerator=gpu, but PyTorch finds no GPU here (torch.cuda.is_available() is False); use "
                "--trainer.accelerator auto or cpu, or install a CUDA build of torch"
            ) from None
        if isinstance(err, argparse.ArgumentError | ValueError | TypeError | KeyError | MisconfigurationException):
            raise UserError(_one_line(err)) from None
        if isinstance(err, ModuleNotFoundError):  # trainer.accelerator=tpu without torch_xla, a logger's package, ...
            raise UserError(f"the settings need a package that is not installed: {_one_line(err)}") from None
        if isinstance(err, RuntimeError) and "more than one stateful callback" in str(err):
            raise UserError(
                "trainer.callbacks holds a ModelCheckpoint with the monitor, mode and every_n_epochs of train.py's "
                "own best.ckpt callback (run.monitor, run.mode): change one of them, or remove it (a config.yaml of an "
                "older version stored train.py's own)"
            ) from None
        raise


def _unknown_key_hint(message: str, keys: list[str]) -> str | None:
    """The valid keys a mistyped one may have meant, from jsonargparse's message (command line or config file)."""
    found = (
        re.search(r"unrecognized arguments: --([\w.]+)", message)
        or re.search(r"Group '(\w+)' does not accept option '([\w.]+)'", message)
        or re.match(r"Option '([\w.]+)' is not accepted", message)
    )
    if found is None:
        return None
    key = ".".join(found.groups()).replace("init_args.", "")
    leaf, group = key.rsplit(".", 1)[-1], key.split(".", 1)[0]
    # A key in the wrong section (--data_root, --max_epochs), else a misspelling.
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
    if close:
        return f"did you mean {' or '.join(close)}?"
    section = [k.removeprefix(f"{group}.") for k in keys if k.startswith(f"{group}.")]
    if "." in key and section:
        return f"{group} takes {', '.join(section)}"
    return None


def _behind(err: BaseException, kind: type[E]) -> E | None:
    """The outermost exception of type ``kind`` behind ``err`` (jsonargparse wraps what constructors and YAML raise)."""
    queue, seen = [err], set()
    while queue:
        e = queue.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        queue += [e.__cause__, e.__context__]
    return None


def _one_line(err: BaseException) -> str:
    """Condense a (possibly nested, multi-line) jsonargparse error into its most specific line."""
    registry = _behind(err, RegistryError)
    if registry is not None:  # an unknown scorer, sampler, dataset or setting, a bad value: its message names the fix
        return str(registry)
    syntax = _behind(err, yaml.MarkedYAMLError)
    if syntax is not None and syntax.problem_mark is not None:
        mark = syntax.problem_mark
        problem = syntax.problem or syntax.context
        return f"a config is not valid YAML: {problem} at line {mark.line + 1}, column {mark.column + 1}"
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip(" -")] or [type(err).__name__]
    if not lines[0].startswith("Parser key") or len(lines) == 1:
        return lines[0]
    choice = _literal_choice(lines)
    if choice is not None:
        return choice
    if "Union subtypes" not in lines[1]:  # 'Parser key "model.method":' + 'Expected ...'
        return f"{lines[0]} {lines[1]}"
    # A union (callbacks, loggers, precision): the useful line is the class's own complaint or the allowed values.
    given = next((line.removeprefix("Given value: ") for line in lines if line.startswith("Given value:")), "?")
    if given.startswith("NestedArg"):  # --trainer.logger.init_args.project X on the default list of loggers
        project = " (the wandb project: WANDB_PROJECT=NAME)" if "project" in given else ""
        key = lines[0].removesuffix(":")
        return f"{key} holds a list, so a dotted option cannot set one of its items{project}; use a config file"
    for line, reason in itertools.pairwise(lines):
        if line.startswith("Problem with given class_path"):
            return f"{lines[0]} {line} {reason}"
    allowed = next((line.removeprefix("Subtypes: ") for line in lines if line.startswith("Subtypes:")), "")
    return f"{lines[0]} {given} is not valid; expected one of the types {allowed}"


def _literal_choice(lines: list[str]) -> str | None:
    """The line for a value outside a setting's choices (a ``Literal``, or a union of them and None), else None.

    jsonargparse says 'Parser key "model.method": Expected a typing.Literal['ce', ...]. Got value: gerg', or for a
    union 'Subtypes: [typing.Literal[...], <class 'NoneType'>]' and 'Given value: maxx'. Any other subtype (a number,
    a class) in the union keeps the general message.
    """
    key = re.match(r'Parser key "([^"]+)"', lines[0])
    single = re.fullmatch(r"Expected a (typing\.Literal\[.*\])\. Got value: (.*)", lines[1])
    union = next((line.removeprefix("Subtypes: ") for line in lines if line.startswith("Subtypes: [")), None)
    if key is None or (single is None and union is None):
        return None
    if single is not None:
        types_text, given = single.group(1), single.group(2)
    else:
        types_text = union.removeprefix("[").removesuffix("]")
        given = next((line.removeprefix("Given value: ") for line in lines if line.startswith("Given value: ")), "?")
    literal = r"typing\.Literal\[(.*?)\]"
    nullable = "<class 'NoneType'>" in types_text
    if re.sub(rf"{literal}|<class 'NoneType'>|, ", "", types_text):  # another type in the union
        return None
    try:
        values = [v for found in re.findall(literal, types_text) for v in ast.literal_eval(f"[{found}]")]
    except (ValueError, SyntaxError):
        return None
    choices = list(dict.fromkeys(map(str, values))) + (["null"] if nullable else [])
    if given == "None":  # null, as check_settings says it (the module refuses a null from a config file)
        return f"{key.group(1)}=None is not one of {', '.join(choices)}"
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(given.lower(), list(by_lower), n=1, cutoff=0.6)
    hint = f"; did you mean {by_lower[close[0]]}?" if close else ""
    return f"{key.group(1)}='{given}' is not one of {', '.join(choices)}{hint}"


def discard_unused_run_dir(rank_zero: bool, logs: bool = False) -> None:
    """Remove the run directory rank 0 created if it holds only its config files (the run never started).

    With ``logs`` its ``metrics.csv`` may be there too: a run stopped before its first checkpoint by a mistake in its
    settings has nothing to resume or evaluate. A checkpoint keeps the folder, and so does a wandb run (wandb names
    the folder as the process exits).
    """
    run_dir = os.environ.get(RUN_DIR_ENV)
    if not rank_zero or not run_dir:
        return
    path = Path(run_dir)
    unused = {"config.yaml", "hparams.yaml", *(["metrics.csv"] if logs else [])}
    if path.is_dir() and {p.name for p in path.iterdir()} <= unused:
        shutil.rmtree(path)


def fit(cli: GradRegCLI) -> int:
    """Check the checkpoint to resume, then train; print where the run's files are."""
    try:
        resumed = None
        if cli.config.get("lr_scheduler") is not None and cli.config.get("optimizer") is None:
            raise UserError(  # LightningCLI then keeps the model's configure_optimizers: the scheduler is ignored
                "--lr_scheduler needs an --optimizer (LightningCLI ignores it without one); the model's own SGD "
                "has model.schedule (multistep, cosine or constant), model.milestones and model.gamma"
            )
        chosen = optimizer_settings(cli.config)
        if cli.config.run.resume is not None:
            resumed = _require_fitting_checkpoint(cli.model, Path(cli.config.run.resume), chosen is None)
            # Lightning restores the checkpoint's optimizer and scheduler states into the new ones: other settings
            # would be overwritten without a word, another optimizer class fail with a KeyError in the restore.
            change = _optimizer_change(chosen, resumed["optimizer"]) if "optimizer" in resumed else ""  # (older: none)
            if change:
                raise UserError(
                    f"the optimizer differs from the resumed checkpoint's run ({change}), whose optimizer and schedule "
                    "state a resumed run continues; resume with its settings, or start a new run from its weights "
                    "(model.pretrained=CHECKPOINT)"
                )
        for record in (c for c in cli.trainer.callbacks if isinstance(c, RunRecord)):
            record.optimizer = chosen
        cli.model.check_trainer(cli.trainer)  # before the loggers and the other DDP ranks start
        # DDP refuses SyncBatchNorm on the CPU with one process too (strategy=ddp, devices=1)
        cpu_ddp = isinstance(cli.trainer.strategy, DDPStrategy) and cli.trainer.strategy.root_device.type == "cpu"
        if cli.config.trainer.get("sync_batchnorm") and cpu_ddp:
            raise UserError(  # else each rank's DDP fails with a traceback
                "trainer.sync_batchnorm=true needs GPUs (PyTorch's DDP accepts SyncBatchNorm layers on GPU modules "
                "only); set trainer.sync_batchnorm=false on the CPU"
            )
        if any(isinstance(logger, WandbLogger) for logger in cli.trainer.loggers):
            check_wandb_mode()
        for logger in cli.trainer.loggers:  # Lightning passes wandb.init(anonymous=None), which wandb warns about
            if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous", False) is None:
                del logger._wandb_init["anonymous"]
        _log_config_to_wandb(cli)
        _link_wandb_runs(cli, resumed)
        with warnings.catch_warnings():
            # Without validation Lightning only warns about a monitor it cannot find, and best.ckpt never appears.
            warnings.filterwarnings("error", message=f".*{MISSING_MONITOR}")
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.run.resume)
    except BaseException as err:
        _end_progress_line(cli)
        # Lightning ends its graceful shutdown after Ctrl-C with sys.exit(1); a Ctrl-C before fit started is raised
        interrupted = isinstance(err, KeyboardInterrupt) or (
            isinstance(err, SystemExit) and cli.trainer.state.status == TrainerStatus.INTERRUPTED
        )
        if interrupted:
            discard_unused_run_dir(cli.rank_zero)  # only if it holds nothing but its config files
            raise _interrupted(cli) from None
        missing_monitor = isinstance(err, MisconfigurationException | UserWarning) and MISSING_MONITOR in str(err)
        # A run that failed before writing anything leaves no folder behind, nor does one a run.monitor it does not
        # log stopped at its first checkpoint (its metrics.csv is of no use).
        discard_unused_run_dir(cli.rank_zero, logs=missing_monitor)
        if missing_monitor:
            # A train/* run.monitor is checked only here: its keys depend on the method (_monitor_every_n_epochs).
            logged = sorted(k for k in cli.trainer.callback_metrics if k.startswith("train/"))
            raise UserError(
                f"run.monitor '{cli.config.run.monitor}' is not logged by this run (stopped at its first checkpoint, "
                f"without saving it); its train/* keys there: {', '.join(logged)}"
            ) from None
        wandb_error = wandb_failure(err, cli.run_dir / "wandb")  # its folder is gone if the run wrote nothing else
        if wandb_error is not None:
            raise wandb_error from None
        if isinstance(err, MisconfigurationException):  # e.g. run.resume past trainer.max_epochs: Lightning says which
            raise UserError(_one_line(err)) from None
        if isinstance(err, NonFiniteLossError) and cli.rank_zero and cli.run_dir.is_dir():  # a checkpoint, wandb's run
            raise NonFiniteLossError(f"{err}; what the run wrote stays in {cli.run_dir}") from None
        raise
    if cli.trainer.fast_dev_run:  # Lightning's smoke test: a few batches without loggers or checkpoints
        discard_unused_run_dir(cli.rank_zero, logs=True)
        if cli.rank_zero:
            print(
                f"fast_dev_run: trained {cli.trainer.global_step} step(s) and validated; Lightning writes no "
                "checkpoint in this mode"
            )
        return 0
    if cli.rank_zero:
        if not (cli.run_dir / "last.ckpt").is_file():  # Lightning returns quietly when there is nothing to train
            _end_progress_line(cli)
            discard_unused_run_dir(cli.rank_zero, logs=True)
            kept = f" (its wandb run stays in {cli.run_dir})" if cli.run_dir.is_dir() else ""
            raise UserError(
                "this run trained no step (trainer.max_epochs, max_steps or limit_train_batches is 0, or run.resume "
                f"names a run that already reached them); no checkpoint written{kept}: raise the limit"
            )
        point_latest(cli.run_dir)
        if not (cli.run_dir / "best.ckpt").is_file():  # e.g. trainer.max_steps within the first validated epoch
            print(
                f"no best.ckpt: training ended before run.monitor '{cli.config.run.monitor}' was first logged "
                "(evaluate.py takes last.ckpt)"
            )
        print(f"run directory: {cli.run_dir}  (evaluate with: python evaluate.py {cli.run_dir})")
    return 0


def _log_config_to_wandb(cli: GradRegCLI) -> None:
    """Give each wandb run the whole resolved config, nested as in ``config.yaml``, instead of Lightning's flat keys.

    Lightning logs the model's and the datamodule's init arguments as one flat mapping (``lr``, ``batch_size``, ...,
    and LightningCLI's ``_instantiator``), without the trainer settings, the callbacks, the seed or ``run``. The
    wandb config gets ``config.yaml``'s sections instead (``model.lr``, ``trainer.max_epochs``, ``seed_everything``,
    ...), the model's with the values linked from the data (``num_classes``, ``input_mean``, ``input_std``); a
    hyperparameter outside those sections (the user's own ``log_hyperparams``) is kept at the top level. Other loggers
    (``metrics.csv``'s ``hparams.yaml``) keep Lightning's flat copy.
    """
    config = dict(cli.resolved_config)
    linked = {k: v for k, v in cli.model.hparams_initial.items() if not k.startswith("_")}
    config["model"] = {**(config.get("model") or {}), **linked}
    known = {k for section in ("model", "data") for k in (config.get(section) or {})}
    for logger in cli.trainer.loggers:
        if isinstance(logger, WandbLogger):
            original = logger.log_hyperparams

            @rank_zero_only
            def log_hyperparams(params: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
                params = _convert_params(params)
                rest = {k: v for k, v in params.items() if k not in known and not k.startswith("_")}
                _original({**config, **rest}, *args, **kwargs)

            logger.log_hyperparams = log_hyperparams  # type: ignore[method-assign]


def _link_wandb_runs(cli: GradRegCLI, resumed: dict[str, Any] | None) -> None:
    """Group this run's wandb run with the runs it continues; a resumed run says which run it resumes.

    A resumed run is a new run (its own folder, wandb run and ``best.ckpt``) in the group of the run it resumes, the
    name of the first run of the chain: ``quickstart-002`` resuming ``quickstart-001`` is in group ``quickstart-001``,
    and so is ``quickstart-001`` itself. Its notes name the checkpoint and the wandb run it continues. A checkpoint of
    an earlier version (no ``run`` record) gives its folder's name. A group or notes set in the logger's settings win.
    """
    record = next((c for c in cli.trainer.callbacks if isinstance(c, RunRecord)), None)
    group = cli.run_dir.name
    if resumed is not None:
        path = Path(cli.config.run.resume)
        group = resumed.get("group") or path.parent.name
        wandb_id = resumed.get("wandb_id")
        notes = f"resumes {path}" + (f" (wandb run {wandb_id})" if wandb_id else "")
    for logger in cli.trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger._wandb_init["group"] = logger._wandb_init.get("group") or group
            logger._wandb_init["job_type"] = logger._wandb_init.get("job_type") or "train"  # evaluate.py's: eval
            if resumed is not None:
                logger._wandb_init["notes"] = logger._wandb_init.get("notes") or notes
            group = logger._wandb_init["group"]
    if record is not None:
        record.group = group


def _interrupted(cli: GradRegCLI) -> Interrupted:
    """The line for a run stopped by Ctrl-C: where its files are and how to resume it (``runs/latest`` points there).

    Checkpoints are written whole (Lightning saves to a temporary file and renames it). The newer of ``last.ckpt``
    (end of each epoch) and ``best.ckpt`` (end of a validation, just before ``last.ckpt``) is the one to resume.
    """
    run_dir = cli.run_dir
    saved = [p for p in (run_dir / "last.ckpt", run_dir / "best.ckpt") if p.is_file()]
    if saved:
        newest = max(saved, key=lambda p: p.stat().st_mtime_ns)  # last.ckpt on a tie
        if cli.rank_zero:
            point_latest(run_dir)
        resume = run_dir if newest.name == "last.ckpt" else newest  # a run directory resumes its last.ckpt
        message = (
            f"training stopped; its files stay in {run_dir} ({newest.name} is the newest checkpoint, the steps after "
            f"it are lost); resume with: python train.py --config {run_dir / 'config.yaml'} --run.resume {resume}"
        )
    elif run_dir.is_dir():
        message = (
            "training stopped before its first checkpoint (written at the end of the first epoch), so there is "
            f"nothing to resume; its logs stay in {run_dir}; start again with: python train.py --config "
            f"{run_dir / 'config.yaml'}"
        )
    else:
        message = "training stopped before its first checkpoint; nothing was kept: start again with the same command"
    err = Interrupted(message)
    err.silent = not cli.rank_zero  # type: ignore[attr-defined]
    return err


def _end_progress_line(cli: GradRegCLI) -> None:
    """End the line a progress bar left the cursor on (rank 0): an error that follows gets a line of its own."""
    started = cli.trainer.state.status != TrainerStatus.INITIALIZING
    if cli.rank_zero and started and cli.trainer.progress_bar_callback is not None:
        print(file=sys.stderr, flush=True)


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or the only process), read before any process group exists.

    Launchers of several processes set a world size: Lightning's DDP launcher re-executes this script with
    ``WORLD_SIZE``, ``LOCAL_RANK`` and ``NODE_RANK``, torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``, srun
    ``SLURM_NTASKS`` and ``SLURM_PROCID``. Rank 0 is the process whose rank variables all read 0 (an exported
    ``RANK=0`` does not make Lightning's local rank 1 a rank 0); without a world size above 1 the process is alone
    and rank 0, whatever variables it inherited from another job.
    """
    if os.environ.get("WORLD_SIZE", "1") == "1" and os.environ.get("SLURM_NTASKS", "1") == "1":
        return True
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


def _resume_file(path: Path) -> Path:
    """``run.resume`` as a file: a checkpoint, or a run directory's ``last.ckpt``.

    A run directory without ``last.ckpt`` whose ``best.ckpt`` is there (e.g. ``last.ckpt`` deleted to save space)
    gets that file suggested.
    """
    if path.is_dir():
        path = path / "last.ckpt"
    if not path.is_file():
        best = path.with_name("best.ckpt")
        if path.name == "last.ckpt" and best.is_file():
            fix = f"its folder holds best.ckpt: pass --run.resume {best}"
        else:
            fix = "pass a .ckpt file or a run directory"
        raise UserError(f"run.resume checkpoint '{path}' does not exist; {fix}")
    return path


def _without_latest(path: Path) -> Path:
    """``path`` with every link to a neighbour (``runs/latest -> quickstart-001``) replaced by its target.

    Other links and the rest of the path stay as given (``resolve`` would make a relative path absolute).
    """
    kept = Path(path.anchor)
    for part in path.parts[1:] if path.anchor else path.parts:
        step = kept / part
        for _ in range(40):  # a chain of links, as the OS follows (at most 40 on Linux)
            target = Path(os.readlink(step)) if step.is_symlink() else None
            if target is None or target.is_absolute() or len(target.parts) != 1 or target.name in (".", ".."):
                break
            step = step.parent / target
        kept = step
    return kept


def _require_fitting_checkpoint(module: GradRegModule, path: Path, settings: bool) -> dict[str, Any]:
    """Stop with one line if the checkpoint to resume is unreadable, not ours, or does not fit the model.

    ``settings``: also if the model's optimizer or schedule settings differ from the checkpoint's run
    (:meth:`GradRegModule.check_resumed_settings`; not with LightningCLI's ``--optimizer``, which replaces them).

    Returns the checkpoint's :class:`RunRecord` (empty for checkpoints of earlier versions).
    """
    from gradreg.report import load_checkpoint

    ckpt = load_checkpoint(path)
    state = ckpt["state_dict"]
    if module.predates_absent_head(state):
        raise UserError(f"run.resume checkpoint '{path}' is {ABSENT_HEAD_HINT}")
    mismatch = module.state_mismatch(state)
    if mismatch:
        raise UserError(
            f"run.resume checkpoint '{path}' does not fit this model: {mismatch}; resume with the config of the run "
            "that wrote it"
        )
    if settings:  # before the loggers make the run's folder theirs
        module.check_resumed_settings(ckpt.get("hyper_parameters"))
    run = ckpt.get("run")
    return run if isinstance(run, dict) else {}
