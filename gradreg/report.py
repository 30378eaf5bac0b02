"""``evaluate.py CHECKPOINT``: the full OOD benchmark of a checkpoint, written to files as it goes.

Rebuilds the model and the data from what the checkpoint stores (``hyper_parameters`` and
``datamodule_hyper_parameters``), scores the ID test set and every set below with every scorer, and
writes ``results.json``, ``results.csv``, ``results.md``, raw scores (``scores/<set>.npz``) and PNG
histograms and ROC curves. Groups of sets:

- ``near`` / ``far``: the OOD test sets (``data.near_ood`` names the near ones);
- ``adversarial``: FGSM and PGD inputs generated from the ID test set against the evaluated model, each attacked
  image against the whole ID test set; each set also reports its attack success rate (the share of correctly
  classified ID images whose prediction the attack changed) and, in group ``adversarial/successful``, a row
  ``<set>/successful`` that scores only the successful attacks against the same images before the attack (the
  protocol of adversarial-example detection, e.g. Lee et al., NeurIPS 2018, arXiv:1807.03888, whose code keeps the
  correctly classified images whose attack succeeded);
- ``corruption``: ID test images under common corruptions at severities 1-5;
- ``robustness``: OOD inputs perturbed within epsilon to look in-distribution to the energy score
  (``attacked/<set>``; compare with ``<set>`` for the AUROC before and after).

Each group gets a mean row; ``ood`` is the mean over near + far. A set that fails is reported with its
reason and the run goes on; finished sets are already on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import json
import math
import os
import pickle
import shutil
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch import seed_everything
from torch import Tensor
from torch.utils.data import Dataset, Subset

from gradreg import anomalies, plots
from gradreg.cli import (
    CONFIG_SECTIONS,
    ArgumentParser,
    Interrupted,
    UserError,
    check_wandb_mode,
    configure_wandb_env,
    error_message,
    next_run_dir,
    read_config_file,
    require_file,
    wandb_failure,
)
from gradreg.data import OODDataModule
from gradreg.data.check import require_datasets
from gradreg.data.corrupted import CorruptionFiles
from gradreg.data.datasets import Transformed, build_transform, dataset_name
from gradreg.data.module import CarvedSplit
from gradreg.evaluation import (
    ScoredSet,
    ScorerSpec,
    build_scorers,
    mean_metrics,
    sample,
    score_loader,
    scorer_key,
    set_metrics,
)
from gradreg.metrics import OOD_METRICS, accuracy
from gradreg.models import load_error_reason, load_weights_only, non_finite
from gradreg.module import ABSENT_HEAD_HINT, GradRegModule
from gradreg.provenance import environment
from gradreg.registry import RegistryError
from gradreg.scorers import SCORERS, Scorer

SUITES = ("ood", "adversarial", "corruption", "robustness")
DEFAULT_CORRUPTIONS = ("gaussian_noise", "shot_noise", "gaussian_blur", "contrast", "jpeg", "brightness")
SUITE_OPTIONS = {  # option -> the suites it sets
    "sets": ("ood", "robustness"),
    "epsilons": ("adversarial", "robustness"),
    "pgd_steps": ("adversarial", "robustness"),
    "corruptions": ("corruption",),
    "corruption_files": ("corruption",),
    "severities": ("corruption",),
    "corruption_table": ("corruption",),
}


def parse_args(args: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options of ``evaluate.py``."""
    p = ArgumentParser(prog="python evaluate.py", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument(
        "checkpoint",
        help="a .ckpt file, a run directory (uses best.ckpt, else last.ckpt), or a config .yaml for post-hoc "
        "evaluation of the model it describes (e.g. pretrained torchvision weights)",
    )
    p.add_argument("--out", help="output folder (new or empty); default: <run dir>/eval-NNN")
    p.add_argument("--scorers", nargs="+", help="scorer specs: name or name:key=value,... (default: all)")
    p.add_argument("--sets", nargs="+", help="OOD test sets to evaluate (default: all of the checkpoint's config)")
    p.add_argument(
        "--suites",
        nargs="+",
        default=list(SUITES),
        choices=SUITES,
        help="which groups of sets to run (default: all four)",
    )
    p.add_argument("--data-root", "--data_root", help="override the data root the checkpoint was trained with")
    p.add_argument("--data", nargs="+", default=[], metavar="KEY=VALUE", help="override datamodule settings")
    p.add_argument(
        "--max-samples", type=_positive_int, help="score at most this many images per set (a fixed random sample)"
    )
    p.add_argument(
        "--epsilons",
        type=_number_or_fraction,
        nargs="+",
        default=[2 / 255, 8 / 255],
        help="L-inf attack budgets in [0, 1] pixel units, 0 < EPS <= 1; fractions are accepted (default: 2/255 8/255)",
    )
    p.add_argument("--pgd-steps", type=_positive_int, default=10, help="PGD iterations (default: 10)")
    p.add_argument(
        "--corruptions",
        nargs="+",
        help=f"corruptions of the ID test set, of: {', '.join(anomalies.CORRUPTIONS.names())} (default: "
        f"{' '.join(DEFAULT_CORRUPTIONS)}); with --corruption-files, file names there (default: all)",
    )
    p.add_argument(
        "--corruption-files",
        metavar="DIR",
        help="score the released corrupted images of DIR instead of generating them: CIFAR-10-C / CIFAR-100-C "
        "(labels.npy, <corruption>.npy) or ImageNet-C (<corruption>/<severity>/<class>/<image>)",
    )
    p.add_argument(
        "--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="corruption severities 1-5 (default: all)"
    )
    p.add_argument(
        "--corruption-table",
        choices=("auto", *anomalies.SEVERITY_TABLES),
        default="auto",
        help="the corruption parameters of each severity: ImageNet-C's (imagenetc) or CIFAR-10-C's (cifar10c); auto: "
        "ImageNet-C's for images of 224 px or more (default: auto)",
    )
    p.add_argument(
        "--explain", type=int, default=0, metavar="K", help="explain the K worst OOD and ID images (default: 0, none)"
    )
    p.add_argument(
        "--explain-scorer",
        default="energy",
        help="differentiable scorer whose value --explain traces (default: energy)",
    )
    p.add_argument("--explain-set", help="OOD set whose highest-scored images --explain takes (default: the first)")
    p.add_argument(
        "--explain-train",
        type=int,
        default=1000,
        help="training images and outliers scanned by --explain (default: 1000)",
    )
    p.add_argument(
        "--explain-hessian", type=int, default=512, help="training images (and outliers) in the Hessian (default: 512)"
    )
    p.add_argument(
        "--explain-damping",
        type=_damping,
        default="auto",
        help="damping of the training Hessian, or 'auto' (its largest-magnitude eigenvalue: always positive "
        "definite; default: auto)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto = cuda if available)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG histograms and ROC curves")
    p.add_argument(
        "--wandb",
        choices=("auto", "on", "off"),
        default="auto",
        help="log the table, the plots and the metrics to a wandb run in OUT/wandb, named and grouped after the "
        "training run (offline unless wandb is configured); auto: on if the checkpoint's run folder holds wandb/",
    )
    opts = p.parse_args(args)
    for key, suites in SUITE_OPTIONS.items():  # an option of suites that do not run would be ignored
        if getattr(opts, key) != p.get_default(key) and not set(suites) & set(opts.suites):
            p.error(
                f"--{key.replace('_', '-')} sets the {' and '.join(suites)} suite{'s' if len(suites) > 1 else ''}, "
                f"which --suites {' '.join(opts.suites)} leaves out: add {suites[0]} to --suites or drop the option"
            )
    if not opts.explain:  # --explain-* settings alone would be ignored
        given = [k for k in vars(opts) if k.startswith("explain_") and getattr(opts, k) != p.get_default(k)]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            p.error(f"{flags} {'needs' if len(given) == 1 else 'need'} --explain K (the number of images to explain)")
    return opts


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer >= 1")
    return value


def _damping(text: str) -> float | str:
    """``auto`` or a number (checked to be > 0 by :func:`check_options`)."""
    try:
        return text if text == "auto" else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number or 'auto'") from None


def _number_or_fraction(text: str) -> float:
    """``"0.03"`` or ``"8/255"``: budgets are usually given in steps of one 8-bit level."""
    numerator, slash, denominator = text.partition("/")
    try:
        return float(numerator) / float(denominator) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number in (0, 1] or a fraction such as 8/255") from None


def epsilon_tag(eps: float) -> str:
    """The budget's part of an adversarial set's name, in 8-bit levels: 8/255 -> ``eps8``."""
    return f"eps{eps * 255:.3g}"


def check_options(opts: argparse.Namespace) -> None:
    """Refuse option values that would fail only after the ID set was scored (or never fail, like ``--epsilons 8``)."""
    if opts.corruption_files is None:
        opts.corruptions = opts.corruptions or list(DEFAULT_CORRUPTIONS)
        for name in opts.corruptions:
            try:
                anomalies.CORRUPTIONS.get(name)
            except RegistryError as err:
                raise UserError(f"--corruptions: {err}") from None
    elif opts.corruption_table != "auto":
        raise UserError(
            "--corruption-table sets the parameters of generated corruptions; --corruption-files reads images "
            "corrupted already: give one of the two"
        )
    for severity in opts.severities:
        if severity not in anomalies.SEVERITIES:
            raise UserError(f"--severities {severity} is not a corruption severity; use 1 (mild) to 5 (strong)")
    for eps in opts.epsilons:
        if not 0 < eps <= 1:  # also catches nan
            hint = f"{eps:g}/255 = {eps / 255:.4f}" if 1 < eps < math.inf else "8/255 = 0.0314"
            raise UserError(f"--epsilons {eps:g} is not in (0, 1]: budgets are in [0, 1] pixel units, e.g. {hint}")
    seen: dict[str, float] = {}
    for eps in opts.epsilons:  # the budget names the adversarial sets: two budgets of one name would overwrite
        tag = epsilon_tag(eps)
        if seen.setdefault(tag, eps) != eps:
            raise UserError(
                f"--epsilons {seen[tag]:g} and {eps:g} both name the sets fgsm_{tag} and pgd_{tag}; give budgets "
                "whose 8-bit levels differ in their first three digits"
            )
    # a repeated value runs once
    opts.epsilons, opts.corruptions, opts.severities = (
        v if v is None else list(dict.fromkeys(v)) for v in (opts.epsilons, opts.corruptions, opts.severities)
    )
    if opts.explain < 0:
        raise UserError(f"--explain {opts.explain} must be >= 0 (the number of worst OOD and ID images to explain)")
    for option in ("explain_train", "explain_hessian"):
        if getattr(opts, option) < 1:
            flag = "--" + option.replace("_", "-")
            raise UserError(f"{flag} {getattr(opts, option)} must be >= 1 (images used by --explain)")
    if opts.explain_damping != "auto" and not 0 < opts.explain_damping < math.inf:
        raise UserError(
            f"--explain-damping {opts.explain_damping:g} must be > 0 (or 'auto'): the damped Hessian must be positive "
            "definite"
        )
    if opts.out:
        out = Path(opts.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out '{out}' is a file; choose a new folder (nothing is overwritten)")
        if out.is_dir() and any(out.iterdir()):
            raise folder_taken(out)


def open_corruption_files(opts: argparse.Namespace) -> CorruptionFiles | None:
    """The released corrupted images of ``--corruption-files`` (None without it or the corruption suite)."""
    if opts.corruption_files is None or "corruption" not in opts.suites:
        return None
    try:
        files = CorruptionFiles(opts.corruption_files, opts.corruptions, opts.severities)
    except ValueError as err:
        raise UserError(f"--corruption-files: {err}") from None
    opts.corruptions = files.names  # results.json records them
    return files


def check_corruption_files(files: CorruptionFiles, dm: OODDataModule, id_test: Subset) -> None:
    """The files must hold corrupted copies of the ID test images ``id_test`` scores (before any work is done)."""
    full = dm.id_dataset_for("test")
    base = full.dataset if isinstance(full, Transformed) else full  # labels and file names without the transform
    try:
        files.check(base, id_test.indices, dataset_name(dm.id_dataset))
    except ValueError as err:
        raise UserError(f"--corruption-files {files.folder}: {err}") from None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--data KEY=VALUE ...`` as a dict (values read as YAML)."""
    overrides, valid = {}, list(inspect.signature(OODDataModule).parameters)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--data '{item}' is not KEY=VALUE; e.g. --data eval_batch_size=128")
        if key not in valid:
            raise UserError(f"--data {key}: unknown data setting; valid: {', '.join(valid)}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def resolve_device(text: str) -> torch.device:
    """``auto`` (cuda if available, else cpu) or a device string, checked against the devices present here."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device '{text}' is not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        found = f"only {torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA GPU"
        raise UserError(f"--device '{text}': this machine has {found}; use --device cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device '{text}': MPS is not available on this machine; use --device cpu (or auto)")
    return device


def parse_scorer(text: str) -> str | dict[str, Any]:
    """``"odin:temperature=1000,epsilon=0.0014"`` -> ``{"name": "odin", "temperature": 1000, "epsilon": 0.0014}``."""
    name, _, rest = text.partition(":")
    if not rest:
        return name
    settings = {}
    for item in rest.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"scorer setting '{item}' in '{text}' is not key=value; e.g. odin:temperature=1000")
        settings[key] = _yaml_value(value)
    return {"name": name, **settings}


def _yaml_value(text: str) -> Any:
    """A command-line value read as YAML, except that ``1e3`` and ``1e-3`` are numbers and ``None`` is null.

    PyYAML follows YAML 1.1, which reads an exponent without a dot and a sign as a string.
    """
    value = yaml.safe_load(text)
    if value == "None":  # YAML's null is null, ~ or nothing; Python users write None
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# --------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's ``best.ckpt`` (else ``last.ckpt``)."""
    path = Path(path)
    if path.is_dir() and path.is_symlink():  # runs/latest: name the run itself in results.json and in wandb
        path = path.parent / path.readlink()
    elif path.parent.is_symlink():  # runs/latest/best.ckpt
        path = path.parent.parent / path.parent.readlink() / path.name
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"run directory '{path}' holds no best.ckpt or last.ckpt; pass a .ckpt file")
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist; pass a .ckpt file or a run directory")
    return path


def _json_null(value: Any) -> Any:
    """``value`` with NaN/inf floats as None: JSON has neither (strict parsers refuse the bare NaN Python writes)."""
    if isinstance(value, dict):
        return {k: _json_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_null(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (:func:`~gradreg.models.load_weights_only`) and check it is one of ours."""
    with open(path, "rb") as f:
        if f.read(64).startswith(b"version https://git-lfs"):
            raise UserError(f"checkpoint '{path}' is a Git LFS pointer, not the file; fetch it with: git lfs pull")
    try:
        ckpt = load_weights_only(path)
    except pickle.UnpicklingError as err:
        if "Unsupported operand" in str(err):  # not a pickle at all: a text file, a .npy, ...
            raise UserError(f"checkpoint '{path}' is unreadable (not a torch file); use another .ckpt") from None
        # weights_only refused an object: not a plain checkpoint of ours
        raise UserError(
            f"checkpoint '{path}' holds objects that safe loading (weights_only) refuses; it was not written by "
            "gradreg's train.py: use one of its .ckpt files"
        ) from None
    except Exception as err:  # torch.load fails in many ways on a foreign file (IndexError for a few bytes of text)
        reason = load_error_reason(err)
        raise UserError(f"checkpoint '{path}' is unreadable or truncated ({reason}); use another .ckpt") from None
    keys = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters")
    missing = [k for k in keys if k not in ckpt] if isinstance(ckpt, dict) else ["everything: it holds no dict"]
    if missing == ["datamodule_hyper_parameters"]:  # a GradRegModule fitted in a user's Trainer without a datamodule
        raise UserError(
            f"checkpoint '{path}' holds no datamodule settings (datamodule_hyper_parameters), which evaluate.py "
            "rebuilds the data from: it was fitted without a datamodule; fit with datamodule=gradreg.data."
            "OODDataModule(...), as train.py does"
        )
    if missing:
        raise UserError(f"checkpoint '{path}' was not written by gradreg's train.py (missing {', '.join(missing)})")
    arch_kwargs = ckpt["hyper_parameters"].get("arch_kwargs") if isinstance(ckpt["hyper_parameters"], dict) else None
    malformed = [k for k in keys if not isinstance(ckpt[k], dict) or not all(isinstance(n, str) for n in ckpt[k])]
    if malformed or not isinstance(arch_kwargs, dict | None):  # hand-edited, or another program's
        what = ", ".join(malformed) or "hyper_parameters.arch_kwargs"
        raise UserError(f"checkpoint '{path}' was not written by gradreg's train.py ({what}: not a mapping by name)")
    bad = non_finite(ckpt["state_dict"])
    if bad:
        raise UserError(
            f"checkpoint '{path}' holds non-finite weights ({bad}): training diverged; evaluate an earlier checkpoint "
            "or retrain with a lower model.lr"
        )
    return ckpt


def rebuild(ckpt: dict[str, Any], data_overrides: dict[str, Any]) -> tuple[GradRegModule, OODDataModule]:
    """Model and datamodule from the checkpoint's hyperparameters; the weights are loaded strictly."""
    # LightningCLI stores private entries (``_instantiator``, ``_class_path``) next to the init arguments.
    dm_hparams = {k: v for k, v in ckpt["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    dm = OODDataModule(**{**dm_hparams, **data_overrides})
    require_datasets({"data": dict(dm.hparams)}, stage="test")  # a missing dataset stops us before any work
    trained = OODDataModule(**dm_hparams).spec if data_overrides else dm.spec
    if dm.spec.size != trained.size:  # allowed (test-time resolution studies), but not the benchmark's protocol
        print(
            f"warning: the checkpoint was trained on {trained.size} px images and is evaluated on {dm.spec.size} px "
            "(--data image_size): its scores are not comparable with those at the training size",
            file=sys.stderr,
        )
    if (dm.spec.mean, dm.spec.std) != (trained.mean, trained.std):
        print(
            f"warning: the checkpoint was trained on images normalized with mean {list(trained.mean)}, std "
            f"{list(trained.std)} and is evaluated with mean {list(dm.spec.mean)}, std {list(dm.spec.std)} (--data "
            "mean/std): the model sees other inputs than in training",
            file=sys.stderr,
        )
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    arch_kwargs = {k: v for k, v in (hparams.get("arch_kwargs") or {}).items() if k != "weights"}
    if hparams.get("method") == "ce":  # ce ignored a sampler, refused since: a checkpoint from before may name one
        hparams["sampler"] = "random"
    # The weights come from the checkpoint: never re-download or re-read the pretraining source.
    module = GradRegModule(**{**hparams, "pretrained": None, "arch_kwargs": arch_kwargs})
    if module.predates_absent_head(ckpt["state_dict"]):
        raise UserError(f"the checkpoint is {ABSENT_HEAD_HINT}")
    head = ckpt["state_dict"].get("model.fc.weight")
    if head is not None and head.shape[0] != module.model.fc.out_features:
        raise UserError(
            f"checkpoint has {head.shape[0]} outputs but its config describes {module.model.fc.out_features}; "
            "the checkpoint and its hyperparameters do not belong together"
        )
    if module.num_classes != dm.num_classes:
        raise UserError(
            f"checkpoint was trained on {module.num_classes} classes but the data '{dm.id_dataset}' has "
            f"{dm.num_classes}; evaluate it with the ID dataset it was trained on"
        )
    mismatch = module.state_mismatch(ckpt["state_dict"])
    if mismatch:
        raise UserError(
            f"checkpoint weights do not fit the model its hyperparameters describe ({mismatch}): the checkpoint and "
            "its hyperparameters do not belong together; use a .ckpt written by train.py as it is"
        )
    module.load_state_dict(ckpt["state_dict"])
    # The attacks, corruptions, ODIN and the margin convert to pixels with these buffers: they must describe the
    # normalization of the images this evaluation feeds the model (--data mean/std can change it).
    module.model.set_normalization(dm.input_mean, dm.input_std)
    return module, dm


def from_config(path: Path, data_overrides: dict[str, Any]) -> tuple[GradRegModule, OODDataModule]:
    """Model and datamodule described by a train config (post-hoc evaluation of untrained or pretrained models)."""
    config = read_config(path)
    dm = OODDataModule(**{**config["data"], **data_overrides})
    require_datasets({"data": dict(dm.hparams)}, stage="test")  # before building the model (it may download weights)
    model_args = {**config["model"], "num_classes": dm.num_classes}
    if not model_args.get("pretrained") and not (model_args.get("arch_kwargs") or {}).get("weights"):
        # A run's config.yaml describes the model before training: its weights are in the run's checkpoints.
        run_dir = path.parent if any((path.parent / n).is_file() for n in ("best.ckpt", "last.ckpt")) else "RUN_DIR"
        print(
            f"warning: config file '{path}' has no model.pretrained: the model is evaluated with random initial "
            f"weights; to evaluate a trained run, pass its run directory (evaluate.py {run_dir})",
            file=sys.stderr,
        )
    seed = config.get("seed_everything")
    seed_everything(seed if type(seed) is int else 0, verbose=False)  # random initial weights: the same every run
    module = GradRegModule(**model_args, input_mean=dm.input_mean, input_std=dm.input_std)
    return module, dm


def read_config(path: Path) -> dict[str, Any]:
    """A train config with its ``model`` and ``data`` sections (empty if absent); typos are one-line errors.

    The valid ``model`` / ``data`` keys are the constructors' arguments; sections other than those two are
    not used here, but a misspelled one (``dataa:``) would silently evaluate the defaults.
    """
    config = read_config_file(path)
    unknown = [key for key in config if key not in CONFIG_SECTIONS]
    if unknown:
        raise UserError(f"config file '{path}' has unknown section '{unknown[0]}'; valid: {', '.join(CONFIG_SECTIONS)}")
    for section, cls in (("model", GradRegModule), ("data", OODDataModule)):
        config[section] = config.get(section) or {}
        if not isinstance(config[section], dict):
            raise UserError(f"config file '{path}': section '{section}' is not a mapping of settings")
        valid = list(inspect.signature(cls).parameters)
        unknown = [key for key in config[section] if key not in valid]
        if unknown:
            raise UserError(f"config file '{path}': unknown key '{unknown[0]}' in {section}; valid: {', '.join(valid)}")
    return config


# --------------------------------------------------------------------------------------------------------------
# (x, y, index) -> the inputs to score, index: the rows' positions in their dataset; None: x itself
Transform = Callable[[Tensor, Tensor, Tensor], Tensor] | None


def image_generators(set_name: str, index: Tensor) -> list[torch.Generator]:
    """One CPU generator per image, seeded with the set's name and the image's index in its dataset.

    A set's random draws (random corruptions, PGD's start) then do not depend on the batch size, on which other
    images ``--max-samples`` keeps, or on the device.
    """
    # One 32-bit hash of both: the CPU generator (mt19937) keeps only the low 32 bits of a seed.
    return [torch.Generator().manual_seed(zlib.crc32(f"{set_name}/{int(i)}".encode())) for i in index]


def transformed(
    batches: Iterable[tuple[Tensor, Tensor]],
    transform: Callable[[Tensor, Tensor, Tensor], Tensor],
    indices: Sequence[int],
    device: torch.device,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(transform(x, y, index), y)`` of each batch of an ordered loader over the items ``indices`` of a dataset."""
    start = 0
    for x, y in batches:
        index = torch.as_tensor(indices[start : start + len(x)], dtype=torch.int64)
        start += len(x)
        yield transform(x.to(device), y.to(device), index), y


def anomaly_sets(
    model: torch.nn.Module,
    id_test: Subset,
    ood_sets: dict[str, Subset],
    opts: argparse.Namespace,
    released: Callable[[str, int], Dataset] | None = None,
) -> Iterator[tuple[str, str, Subset, Transform]]:
    """(name, group, source set, transform) of the adversarial, corruption and robustness suites.

    ``released(name, severity)``: the released corrupted copy of the whole ID test set (``--corruption-files``),
    scored in place of the generated corruption.
    """
    mean, std = model.input_mean, model.input_std
    if "adversarial" in opts.suites:
        for eps in opts.epsilons:
            tag = epsilon_tag(eps)
            yield f"fgsm_{tag}", "adversarial", id_test, lambda x, y, i, e=eps: anomalies.fgsm(model, x, y, e)
            pgd = lambda x, y, i, e=eps, n=f"pgd_{tag}": anomalies.pgd(  # noqa: E731
                model, x, y, e, steps=opts.pgd_steps, generator=image_generators(n, i)
            )
            yield f"pgd_{tag}", "adversarial", id_test, pgd
    if "corruption" in opts.suites:
        table = None if opts.corruption_table == "auto" else opts.corruption_table  # None: by image size
        for name in opts.corruptions:
            for sev in opts.severities:
                if released is not None:  # its image j is ID test image j
                    yield f"{name}_s{sev}", "corruption", Subset(released(name, sev), id_test.indices), None
                    continue
                # Seeded per set: the noise corruptions of one severity would otherwise share their draws.
                fn = lambda x, y, i, n=name, s=sev: anomalies.corrupt(  # noqa: E731
                    x, n, s, mean, std, image_generators(f"{n}_s{s}", i), table
                )
                yield f"{name}_s{sev}", "corruption", id_test, fn
    if "robustness" in opts.suites:
        eps = max(opts.epsilons)
        for name, dataset in ood_sets.items():
            if opts.sets and name not in opts.sets:
                continue
            attack = lambda x, y, i, e=eps: anomalies.energy_attack(model, x, e, steps=opts.pgd_steps)  # noqa: E731
            yield f"attacked/{name}", "robustness", dataset, attack


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A temporary neighbour of ``path`` to write, renamed to ``path`` once the block ends without an error.

    Each file whole: a Ctrl-C (or an error) while one is written leaves the previous version, or none, not half of the
    new one, and no temporary file either.
    """
    part = path.with_name(f".{path.name}.part")
    try:
        yield part
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, path)


class ResultWriter:
    """Accumulates per-set metrics and rewrites the JSON/CSV/markdown files after every set."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out, self.header = out, header
        self.sets: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.failed_groups: dict[str, str] = {}

    def add(self, name: str, group: str, n: int, by_scorer: dict[str, dict[str, float]], **extra: Any) -> None:
        """Record a finished set (``extra``: more keys of its entry, e.g. ``attack``) and rewrite the files."""
        self.sets[name] = {"group": group, "n": n, "metrics": by_scorer, **extra}
        self.write()

    def fail(self, name: str, group: str, reason: str) -> None:
        """Record a failed set of ``group`` with its reason and rewrite the files."""
        self.failed[name], self.failed_groups[name] = reason, group
        if group == "adversarial":  # its successful-attack row is missing from that group too
            self.failed_groups[f"{name}/successful"] = "adversarial/successful"
        self.write()

    def means(self) -> dict[str, dict[str, dict[str, float]]]:
        """Mean metrics per group (and ``ood`` = near + far), per scorer; NaN for a group with a failed set.

        A mean over the sets that happened to finish would be compared with other runs' means over all of them.
        """
        groups: dict[str, dict[str, Any]] = {}
        members = [(name, e["group"], e["metrics"]) for name, e in self.sets.items()]
        for name, group, metrics in members + [(n, g, None) for n, g in self.failed_groups.items()]:
            groups.setdefault(group, {})[name] = metrics
            if group in ("near", "far"):
                groups.setdefault("ood", {})[name] = metrics
        first = ("near", "far", "ood")  # then the anomaly suites, in the order they ran
        ordered = sorted(groups, key=lambda g: first.index(g) if g in first else len(first))
        return {
            g: {s: dict.fromkeys(OOD_METRICS, math.nan) for s in self.header["scorers"]}
            if None in groups[g].values()
            else mean_metrics(groups[g])
            for g in ordered
        }

    def rows(self) -> list[list[Any]]:
        """Table rows: every set, then every group mean."""
        rows = [
            [name, e["group"], s, *(v[m] for m in OOD_METRICS)]
            for name, e in self.sets.items()
            for s, v in e["metrics"].items()
        ]
        rows += [
            [f"mean/{g}", g, s, *(v[m] for m in OOD_METRICS)] for g, by in self.means().items() for s, v in by.items()
        ]
        return rows

    def write(self) -> None:
        """Rewrite results.json, results.csv and results.md."""
        doc = {**self.header, "sets": self.sets, "means": self.means(), "failed": self.failed}
        table = io.StringIO(newline="")
        csv.writer(table).writerows([["set", "group", "scorer", *OOD_METRICS], *self.rows()])
        for name, text in (
            ("results.json", json.dumps(_json_null(doc), indent=2, allow_nan=False)),
            ("results.csv", table.getvalue()),
            ("results.md", self.markdown()),
        ):
            with written_whole(self.out / name) as part:
                part.write_text(text, newline="")

    def attack_success(self) -> dict[str, str]:
        """``{adversarial set: "93.10% (874 of 940)"}``: its attack success rate, for the tables."""
        return {
            name: f"{100 * a['success_rate']:.2f}% ({a['successful']} of {a['correct']})"
            for name, e in self.sets.items()
            if (a := e.get("attack")) is not None
        }

    def markdown(self) -> str:
        """The results as a markdown table (percentages)."""
        lines = [
            f"ID accuracy: {100 * self.header['id']['accuracy']:.2f}% on {self.header['id']['dataset']} "
            f"({self.header['id']['n']} images)",
            "",
            "| set | group | scorer | AUROC | FPR95 | FPR95 (OOD pos.) | AUPR-In | AUPR-Out |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, group, scorer, *values in self.rows():
            lines.append(f"| {name} | {group} | {scorer} | " + " | ".join(f"{100 * v:.2f}" for v in values) + " |")
        attacks = self.attack_success()
        if attacks:
            lines += [
                "",
                "Attack success rate: the share of the correctly classified ID images whose prediction the attack "
                "changed (`<set>/successful` scores those attacks against the same images before the attack):",
                "",
                *(f"- {name}: {text}" for name, text in attacks.items()),
            ]
        lines += [f"\nFAILED {name}: {reason}" for name, reason in self.failed.items()]
        if self.failed:
            lines.append("\nThe means of the groups with a failed set are nan (null in results.json).")
        return "\n".join(lines) + "\n"


def save_scores(path: Path, scored: ScoredSet, source: Subset) -> None:
    """Raw scores (one array per scorer), predictions, labels and each row's position in its dataset (``index``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = {f"score_{k}": v for k, v in scored.scores.items()}
    index = np.asarray(source.indices, np.int64)
    with written_whole(path) as part, part.open("wb") as file:  # a file object: np.savez would append .npz to a name
        np.savez(file, preds=scored.preds, labels=scored.labels, index=index, **scores)


def successful_attacks(id_set: ScoredSet, attacked: ScoredSet) -> tuple[ScoredSet, ScoredSet, dict[str, Any]]:
    """The successful-attack protocol: clean and attacked rows of the correctly classified images the attack fooled.

    Row ``i`` of ``attacked`` is the attack on row ``i`` of ``id_set`` (the adversarial sets are the ID test set,
    attacked in order). An attack succeeds when the clean image is classified correctly and the attacked one is not.

    Returns:
        The clean rows and the attacked rows of the successful attacks, and ``{"correct", "successful",
        "success_rate"}`` (``successful / correct``; NaN when no image was classified correctly).
    """
    if len(attacked) != len(id_set) or not np.array_equal(attacked.labels, id_set.labels):
        raise ValueError("the attacked set is not the ID test set row for row")
    correct = id_set.preds == id_set.labels
    hit = correct & (attacked.preds != attacked.labels)

    def rows(s: ScoredSet) -> ScoredSet:
        return ScoredSet({k: v[hit] for k, v in s.scores.items()}, s.preds[hit], s.labels[hit])

    n_correct, n_hit = int(correct.sum()), int(hit.sum())
    rate = n_hit / n_correct if n_correct else math.nan
    return rows(id_set), rows(attacked), {"correct": n_correct, "successful": n_hit, "success_rate": rate}


def add_set(writer: ResultWriter, name: str, group: str, id_scored: ScoredSet, scored: ScoredSet) -> None:
    """Record a scored set against the ID set; an adversarial set also gets its success rate and a successful row."""
    if group != "adversarial":
        writer.add(name, group, len(scored), set_metrics(id_scored, scored))
        return
    clean, fooled, attack = successful_attacks(id_scored, scored)
    writer.add(name, group, len(scored), set_metrics(id_scored, scored), attack=attack)
    if len(fooled):
        by_scorer = set_metrics(clean, fooled)
    else:  # no successful attack: nothing to detect (null in results.json)
        by_scorer = {key: dict.fromkeys(OOD_METRICS, math.nan) for key in id_scored.scores}
    writer.add(f"{name}/successful", "adversarial/successful", len(fooled), by_scorer)


def print_table(writer: ResultWriter) -> None:
    """The results as a fixed-width console table (percentages).

    Every OOD set and every group mean is printed; the (many) adversarial, corruption and robustness sets appear
    only through their group means here (and the attacks' success rates), and one by one in results.md / .csv / .json.
    """
    rows = [r for r in writer.rows() if r[1] in ("near", "far") or r[0].startswith("mean/")]
    width = max([len(str(r[0])) for r in rows] + [12])
    swidth = max([len(str(r[2])) for r in rows] + [6])
    print(f"\nID accuracy: {100 * writer.header['id']['accuracy']:.2f}%  ({writer.header['id']['dataset']})")
    print(f"{'set':<{width}}  {'scorer':<{swidth}}  {'AUROC':>7}  {'FPR95':>7}  {'AUPR-In':>7}  {'AUPR-Out':>8}")
    for name, _, scorer, auroc, fpr, _, aupr_in, aupr_out in rows:
        print(
            f"{name:<{width}}  {scorer:<{swidth}}  {100 * auroc:7.2f}  {100 * fpr:7.2f}  {100 * aupr_in:7.2f}"
            f"  {100 * aupr_out:8.2f}"
        )
    attacks = writer.attack_success()
    if attacks:
        print("attack success rate: " + ", ".join(f"{name} {text}" for name, text in attacks.items()))
    for name, reason in writer.failed.items():
        print(f"FAILED {name}: {reason}")


# --------------------------------------------------------------------------------------------------------------
def evaluate_main(args: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (1 if any set failed). Ctrl-C says what its folder keeps."""
    where: dict[str, Any] = {}
    try:
        return _evaluate(args, where)
    except BaseException as err:
        out, writer = where.get("out"), where.get("writer")
        if out is not None and writer is None and not where["created"]:
            (out / "results.json").unlink(missing_ok=True)  # the empty file that claimed --out: it can be used again
        if out is None or not isinstance(err, KeyboardInterrupt):  # gradreg.cli says it in one line
            raise
        if writer is None or not (writer.sets or writer.failed):  # at most the ID set's raw scores and the header
            if where["created"]:
                shutil.rmtree(out, ignore_errors=True)  # its own new eval-NNN folder
                raise Interrupted("evaluation stopped before its first result; nothing was kept") from None
            raise Interrupted(f"evaluation stopped before its first result; {out} holds no results") from None
        raise Interrupted(
            f"evaluation stopped; {out} keeps the sets finished so far (results.json, results.csv, results.md; the set "
            "in progress is not in them); evaluate again for every set"
        ) from None


def _evaluate(args: Sequence[str] | None, where: dict[str, Any]) -> int:
    """:func:`evaluate_main`'s work.

    ``where`` gets the output folder (``out``), whether it made it (``created``) and the :class:`ResultWriter`.
    """
    opts = parse_args(args)
    check_options(opts)
    files = open_corruption_files(opts)
    device = resolve_device(opts.device)
    overrides = parse_overrides(opts.data)
    if opts.data_root:
        overrides["data_root"] = opts.data_root
    source = Path(opts.checkpoint)
    post_hoc = source.suffix in (".yaml", ".yml")
    ckpt_path = (
        require_file(source, "config file", "pass an existing .yaml") if post_hoc else resolve_checkpoint(source)
    )
    ckpt = None if post_hoc else load_checkpoint(ckpt_path)
    try:
        module, dm = from_config(ckpt_path, overrides) if ckpt is None else rebuild(ckpt, overrides)
    except (TypeError, ValueError) as err:
        raise UserError(f"cannot build the model and data ({str(err).splitlines()[0]})") from None
    # checkpoints of older versions have none; a config's, its model.pretrained's if that is a gradreg checkpoint
    trained_with = module.pretrained_environment if ckpt is None else ckpt.get("environment")
    trained_run = ckpt.get("run") if ckpt is not None and isinstance(ckpt.get("run"), dict) else None  # RunRecord
    del ckpt  # the model holds copies of its tensors
    specs = [parse_scorer(s) for s in opts.scorers] if opts.scorers else SCORERS.names()
    scorer_map = build_scorers(specs)
    # Builds every set now (a missing dataset stops us before any work); --max-samples keeps a fixed random sample.
    ood_sets = {name: sample(d, opts.max_samples) for name, d in dm.ood_datasets("test").items()}
    unknown = sorted(set(opts.sets or []) - set(ood_sets))
    if unknown:
        raise UserError(f"unknown OOD set(s) {', '.join(unknown)}; this checkpoint's sets: {', '.join(ood_sets)}")
    id_test = sample(dm.id_dataset_for("test"), opts.max_samples)
    released = None
    if files is not None:
        check_corruption_files(files, dm, id_test)
        to_tensor = build_transform(dm.spec, "none", resize=False)  # released images have the ID size (ImageNet-C: 224)
        released = lambda name, sev: Transformed(files.severity(name, sev), to_tensor)  # noqa: E731
    elif "corruption" in opts.suites:
        channels = module.model.input_mean.numel()
        for name in opts.corruptions:
            if name in anomalies.RGB_ONLY and channels != 3:
                raise UserError(
                    f"--corruptions {name} needs RGB images, and the images of '{dm.id_dataset}' have {channels} "
                    "channel(s); drop it"
                )
        if "frost" in opts.corruptions:
            try:
                anomalies.frost_folder()
            except ValueError as err:
                raise UserError(f"--corruptions frost: {err}") from None
    model = module.model.to(device).eval()
    if not opts.scorers:  # every registered scorer that applies (absent: models trained with method absent)
        scorer_map = {key: scorer for key, scorer in scorer_map.items() if scorer.supports(model)}
    for key, scorer in scorer_map.items():
        try:
            scorer.require(model)
        except TypeError as err:
            raise UserError(
                f"scorer '{key}' does not apply to this checkpoint: {err}; drop it from --scorers"
            ) from None
    if opts.explain:
        evaluated = [name for name in ood_sets if not opts.sets or name in opts.sets] if "ood" in opts.suites else []
        if not evaluated:
            raise UserError("--explain explains OOD test images: run the ood suite on at least one OOD set")
        opts.explain_set = opts.explain_set or evaluated[0]  # recorded in results.json
        if opts.explain_set not in evaluated:
            raise UserError(f"--explain-set '{opts.explain_set}' is not an evaluated OOD set ({', '.join(evaluated)})")
        check_explainable(module, scorer_map, opts.explain_scorer, id_test[0][0][None].to(device))

    jobs: list[tuple[str, str, Subset, Transform]] = []
    if "ood" in opts.suites:
        for name, dataset in ood_sets.items():
            if not opts.sets or name in opts.sets:
                jobs.append((name, "near" if name in dm.near_ood else "far", dataset, None))
    jobs += list(anomaly_sets(model, id_test, ood_sets, opts, released))
    if not jobs:
        raise UserError(
            f"nothing to evaluate: the checkpoint's data has no OOD test sets for --suites {' '.join(opts.suites)}; "
            "add sets with --data ood_sets=[...], or run another suite"
        )
    check_set_names(jobs)

    use_wandb = opts.wandb == "on" or (opts.wandb == "auto" and (ckpt_path.parent / "wandb").is_dir())
    if use_wandb:
        check_wandb_mode()  # here, not after the benchmark
        configure_wandb_env()

    default_out = (Path("runs"), f"{ckpt_path.stem}-eval") if post_hoc else (ckpt_path.parent, "eval")
    out = Path(opts.out) if opts.out else next_run_dir(*default_out, option="--out")
    if opts.out:
        claim_folder(out)
    where.update(out=out, created=not opts.out)
    print(f"evaluating {ckpt_path} on {device}; writing to {out}")

    def run(source: Subset, transform: Transform, desc: str) -> ScoredSet:
        from tqdm.auto import tqdm

        batches: Iterable[tuple[Tensor, Tensor]] = dm.eval_loader(source)
        if transform is not None:
            batches = transformed(batches, transform, source.indices, device)
        return score_loader(model, tqdm(batches, desc=desc, leave=False), scorer_map, device)

    id_scored = run(id_test, None, "id")
    save_scores(out / "scores" / "id.npz", id_scored, id_test)
    given = {scorer_key(s): s for s in specs}
    shape = id_test[0][0].shape  # of every scored image (the OOD sets are resized to the ID size)
    if opts.corruption_table == "auto":  # results.json records the table used (none for released images)
        opts.corruption_table = None if files else anomalies.severity_table(*shape[-2:])
    header = {
        "checkpoint": str(ckpt_path),
        "options": {**vars(opts), "scorers": {k: scorer_record(given[k], s, shape) for k, s in scorer_map.items()}},
        "scorers": list(scorer_map),
        "id": {
            "dataset": dataset_name(dm.id_dataset),
            "n": len(id_scored),
            "accuracy": accuracy(id_scored.preds, id_scored.labels),
        },
        "environment": environment(device),  # the code and versions of this evaluation, and of the training run
        "trained_with": trained_with,
    }
    writer = where["writer"] = ResultWriter(out, header)
    writer.write()

    ood_scored: dict[str, ScoredSet] = {}
    for name, group, source, transform in jobs:
        try:
            scored = run(source, transform, name)
            if len(scored) == 0:
                raise ValueError("the set is empty")
            add_set(writer, name, group, id_scored, scored)
            save_scores(out / "scores" / f"{score_file_stem(name)}.npz", scored, source)
            if group in ("near", "far"):
                ood_scored[name] = scored
        except Exception as err:  # one bad set must not lose the others
            message = error_message(err)
            reason = f"{type(err).__name__}: {message.splitlines()[0] if message else ''}"
            print(f"error: set '{name}' failed: {reason}", file=sys.stderr)
            writer.fail(name, group, reason)

    if ood_scored and not opts.no_plots:
        for scorer in scorer_map:
            by_set = {n: s.scores[scorer] for n, s in ood_scored.items()}
            if not all(np.isfinite(v).all() for v in (id_scored.scores[scorer], *by_set.values())):
                print(
                    f"warning: scorer '{scorer}' gave non-finite scores (NaN metrics): no plots of it", file=sys.stderr
                )
                continue
            plots.score_histograms(id_scored.scores[scorer], by_set, scorer, out / "plots" / f"hist_{scorer}.png")
            plots.roc_curves(id_scored.scores[scorer], by_set, scorer, out / "plots" / f"roc_{scorer}.png")
    if opts.explain and opts.explain_set in ood_scored:  # else the set failed, and said so
        explainer = scorer_map[opts.explain_scorer]  # with its settings (check_explainable accepted it)
        explain_worst(module, dm, explainer, id_test, ood_sets, id_scored, ood_scored, opts, out / "explain", device)
    print_table(writer)
    try:  # after the table, as the results are written either way; their paths come last (before a wandb error)
        if use_wandb:
            log_to_wandb(writer, out, ckpt_path, None if post_hoc else (trained_run or {}))
    except Exception as err:
        wandb_error = wandb_failure(err, out / "wandb")
        if wandb_error is None:
            raise
        raise wandb_error from None
    finally:
        print(f"\nresults: {out / 'results.json'}, {out / 'results.csv'}, {out / 'results.md'}")
    return 1 if writer.failed else 0


def score_file_stem(name: str) -> str:
    """The file name (without ``.npz``) of a set's raw scores in ``scores/``."""
    return name.replace("/", "_")


def check_set_names(jobs: Sequence[tuple[str, str, Subset, Transform]]) -> None:
    """Refuse sets whose rows or score files would overwrite another's.

    An OOD set's alias ``id`` or ``fgsm_eps8``, or ``a/b`` beside ``a_b``. Names are compared case-folded, as the
    file systems of macOS and Windows do.
    """
    names = ["id", *(name for name, *_ in jobs)]  # each has a row and writes scores/<stem>.npz
    rows = names + [f"{name}/successful" for name, group, *_ in jobs if group == "adversarial"]
    hint = "give the OOD set another alias (data.ood_sets: [{name: ..., alias: ...}])"
    for what, listed, key in (("row", rows, str), ("score file", names, score_file_stem)):
        seen: dict[str, str] = {}
        for name in listed:
            other = seen.get(key(name).casefold())
            if other is not None:
                both = f"two sets named '{name}'" if other == name else f"the sets '{other}' and '{name}'"
                raise UserError(f"{both} would write to one {what}; {hint}")
            seen[key(name).casefold()] = name
    for name in rows:
        if name.startswith("mean/"):
            raise UserError(f"the set '{name}' would be read as a group mean (mean/<group>); {hint}")


def claim_folder(out: Path) -> None:
    """Make ``--out`` this evaluation's: a new or empty folder, claimed by creating its results.json first.

    ``check_options`` checked it before the model and data were loaded; another evaluation may have taken it since.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").open("x").close()  # exclusive: a second evaluation into the folder stops here
    except FileExistsError:
        raise folder_taken(out) from None
    except OSError as err:
        raise UserError(f"cannot create --out '{out}' ({err.strerror}); choose another folder") from None
    if any(path.name != "results.json" for path in out.iterdir()):
        (out / "results.json").unlink()
        raise folder_taken(out)


def folder_taken(out: Path) -> UserError:
    """The one line for an ``--out`` folder that holds files already."""
    return UserError(f"output folder '{out}' already holds files; choose a new --out (nothing is overwritten)")


def scorer_record(spec: ScorerSpec, scorer: Scorer, input_shape: Sequence[int]) -> dict[str, Any]:
    """``spec`` as a mapping with every setting the scorer ran with on ``input_shape``, defaults resolved."""
    return {**({"name": spec} if isinstance(spec, str) else spec), **scorer.settings_for(input_shape)}


def check_explainable(module: GradRegModule, scorer_map: dict[str, Scorer], key: str, x: Tensor) -> None:
    """Refuse an ``--explain`` that would fail after the whole benchmark: its objective and its scorer.

    A scorer is explainable when the influence code can differentiate it w.r.t. the parameters; that is
    decided by the same call that computes the test gradients (:func:`gradreg.influence.score_gradients`),
    here on one image ``x`` (1, C, H, W).
    """
    from gradreg.influence import score_gradients, select_parameters

    method = module.hparams.method
    if method not in ("ce", "energy", "greg"):
        raise UserError(f"--explain supports checkpoints trained with ce, energy or greg, not '{method}'")
    if key not in scorer_map:
        raise UserError(f"--explain-scorer '{key}' is not among the evaluated scorers ({', '.join(scorer_map)})")
    names = select_parameters(module.model)

    def differentiable(scorer: Scorer) -> bool:
        try:
            score_gradients(module.model, scorer, x, names)
        except ValueError:
            return False
        return True

    if not differentiable(scorer_map[key]):
        explainable = [k for k, scorer in scorer_map.items() if differentiable(scorer)]
        raise UserError(
            f"--explain-scorer '{key}' is not differentiable w.r.t. the model's parameters; of the evaluated "
            f"scorers these can be explained: {', '.join(explainable) or 'none (add energy to --scorers)'}"
        )


def explain_worst(
    module: GradRegModule,
    dm: OODDataModule,
    scorer: Scorer,
    id_test: Subset,
    ood_sets: dict[str, Subset],
    id_scored: ScoredSet,
    ood_scored: dict[str, ScoredSet],
    opts: argparse.Namespace,
    out: Path,
    device: torch.device,
) -> None:
    """Cross-loss influence of training images and outliers on the K worst ``--explain-set`` and ID test images.

    The test quantity is ``scorer``, the one ``--explain-scorer`` names (default energy); the training objective is the
    checkpoint's own (CE, energy or GReg, with its margins, weights and batch composition). Training images are named
    by their index in the ID dataset's train split, as test images are by theirs in its test split.
    """
    from gradreg.influence import explain, greg_objective, hardest_examples

    hp = module.hparams  # check_explainable accepted its method and --explain-scorer
    rows = dm.batch_size + module.sampler.num_selected(dm.batch_size, dm.outlier_batch_size)
    objective = greg_objective(
        m_in=hp.m_in,
        m_out=hp.m_out,
        energy_weight=hp.energy_weight if hp.method != "ce" else 0.0,
        reg_weight=hp.reg_weight if hp.method == "greg" else 0.0,
        scaling=hp.reg_scaling,
        train_rows=rows,
    )
    key = opts.explain_scorer
    ood_name = opts.explain_set
    ood_test = ood_sets[ood_name]
    id_worst, ood_worst = hardest_examples(
        torch.from_numpy(id_scored.scores[key]), torch.from_numpy(ood_scored[ood_name].scores[key]), opts.explain
    )
    x_test = torch.stack([ood_test[i][0] for i in ood_worst] + [id_test[i][0] for i in id_worst])
    id_train, outliers = dm.unaugmented_train_sets()
    model = module.model.to(device)
    print(  # the solve takes minutes on a CPU; K is clamped to the sets' sizes
        f"explaining the {len(ood_worst)} highest-scored {ood_name} images and the {len(id_worst)} lowest-scored ID "
        f"images ({key}) with up to {opts.explain_train} training images and outliers ..."
    )
    with warnings.catch_warnings():  # CG's own warnings (one per image) give way to the one on the residuals below
        warnings.filterwarnings("ignore", message="CG (did not converge|met non-positive curvature)")
        result = explain(
            model, x_test.to(device), scorer, objective, id_train, outliers, max_train=opts.explain_train,
            damping=opts.explain_damping, hessian_points=opts.explain_hessian,
            test_is_id=[False] * len(ood_worst) + [True] * len(id_worst),
            test_ids=[f"{ood_name}/{ood_test.indices[i]}" for i in ood_worst.tolist()]
            + [f"id/{id_test.indices[i]}" for i in id_worst.tolist()],
        )  # fmt: skip
    split = id_train.dataset
    if isinstance(split, CarvedSplit):  # part of the dataset's train split: name images by their index there
        result.id_indices = torch.as_tensor(split.indices)[result.id_indices]
        id_train = Transformed(split.dataset, id_train.transform)
    out.mkdir(parents=True, exist_ok=True)
    for t in range(len(x_test)):
        result.save_grid(t, x_test[t], out / f"{t:02d}.png", id_train, outliers, mean=model.input_mean,
                         std=model.input_std)  # fmt: skip
    result.to_json(out / "influence.json", k=10)
    print(f"explanations of {len(x_test)} test images: {out}")
    residual = max(result.settings["relative_residual"])
    if residual > 0.1:  # an indefinite Hessian (non-convex network) makes CG fail: more damping regularizes it
        print(f"warning: inverse-HVP relative residual up to {residual:.2g}; raise --explain-damping (now "
              f"{result.settings['damping']:.3g}) for trustworthy influence values", file=sys.stderr)  # fmt: skip


def log_to_wandb(writer: ResultWriter, out: Path, ckpt_path: Path, trained_run: dict[str, Any] | None) -> None:
    """Log the results table and the plots to a wandb run in ``out/wandb`` (after :func:`configure_wandb_env`).

    The run is named ``<training run>-<eval folder>`` (``quickstart-001-eval-001``) and joins the training run's wandb
    group with job type ``eval``. ``trained_run`` is the checkpoint's record of its training run (name, group, wandb
    id; ``{}`` for a checkpoint of an earlier version: its folder names the run), None for a config (post-hoc). The
    config holds the checkpoint, the options and the training run; the summary holds the ID accuracy and every
    metric of the table as ``eval/<set>/<scorer>/<metric>`` (sets ``mean/near``, ``mean/far``, ... included).
    """
    import wandb

    trained = None
    if trained_run is not None:
        trained = {"name": ckpt_path.parent.name, "group": None, "wandb_id": None, **trained_run}
        trained["group"] = trained["group"] or trained["name"]
    header = json.loads(json.dumps(_json_null(writer.header), default=str))  # results.json's header
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "gradreg"),
        dir=str(out),
        name=out.name if trained is None else f"{trained['name']}-{out.name}",
        group=None if trained is None else trained["group"],
        job_type="eval",
        config={"checkpoint": str(ckpt_path), "trained_run": trained, "options": header["options"]},
    )
    columns = ["set", "group", "scorer", *OOD_METRICS]
    rows = [[v if not isinstance(v, float) or math.isfinite(v) else None for v in r] for r in writer.rows()]
    images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted((out / "plots").glob("*.png"))}
    run.log({"results": wandb.Table(columns=columns, data=rows), **images})
    run.summary.update(
        {"eval/id/accuracy": header["id"]["accuracy"]}
        | {f"eval/{r[0]}/{r[2]}/{m}": v for r in rows for m, v in zip(OOD_METRICS, r[3:], strict=True)}
    )
    run.finish()
