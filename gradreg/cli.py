"""Command-line entry points: ``train.py`` (LightningCLI, instantiation only) and ``evaluate.py``.

``python train.py --config configs/quickstart.yaml [--section.key value ...]`` parses the config with
LightningCLI (``run=False``: no subcommand), creates a fresh run directory ``runs/<config>-NNN`` (never
reused, so nothing is overwritten), writes the resolved ``config.yaml`` there, checks that every
dataset exists, and calls ``trainer.fit``. ``runs/latest`` points at the newest run.

User mistakes (a missing config, a typo in a key, an unknown scorer, a bad checkpoint, a NaN loss, a mistyped
option) end with one ``error: ...`` line on stderr and exit code 1; missing datasets with the ``error:`` line, one
``MISSING`` line per set (where it was looked for and how to get it) and a hint (``docs/data.md``).
Ctrl-C ends with one ``interrupted: ...`` line (for a training run: its folder and how to resume it) and exit
code 130.
"""

from __future__ import annotations

import argparse
import netrc
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import get_loader

from gradreg.data.datasets import DatasetNotFoundError, UnreadableImageError
from gradreg.module import NonFiniteLossError, UnsupportedSettingError
from gradreg.registry import RegistryError


class UserError(Exception):
    """A problem the user can fix; reported as one line without a traceback."""


class Interrupted(UserError):
    """Ctrl-C (SIGINT): one ``interrupted:`` line saying what was kept and how to go on, exit code 130."""

    label = "interrupted"
    exit_code = 130  # 128 + SIGINT: what a shell reports for a process that SIGINT ended


_NUMBER = r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
# What argparse should read as a value, not an option: -1e-3 and -8/255 as well as its own -1 and -0.5
NEGATIVE_NUMBER = re.compile(rf"^-{_NUMBER}(/{_NUMBER})?$")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose mistakes end like every other bad input: a :class:`UserError` (one line, exit code 1).

    Values such as ``-8/255`` and ``-1e-3`` are read as values, as ``-1`` and ``-0.5`` are, so that the option's
    own check names them (argparse took them for unknown options: "expected at least one argument"). Prefixes of
    options are refused, as train.py refuses them: ``--epsilon`` is a typo of ``--epsilons``, not a spelling of it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str) -> NoReturn:
        """Raise the mistake (argparse's own prints the usage block and exits with 2)."""
        raise UserError(f"{message}; see {self.prog} --help")


USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    DatasetNotFoundError,
    UnreadableImageError,
    RegistryError,
    NonFiniteLossError,
    UnsupportedSettingError,
)


def wandb_failure(err: BaseException, logs: Path) -> UserError | None:
    """The one line for a wandb error (no network, a wrong key, ... after wandb's own retries); None for any other."""
    if not type(err).__module__.startswith("wandb.errors"):
        return None
    first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    where = f" (wandb's logs: {logs})" if logs.is_dir() else ""
    return UserError(
        f"wandb failed ({first.strip()}); check the network and the login, or set WANDB_MODE=offline to log to disk "
        f"and `wandb sync` later{where}"
    )


WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def check_wandb_mode() -> None:
    """Refuse a ``WANDB_MODE`` that wandb does not know (empty, a typo): ``wandb.init`` raises a pydantic traceback."""
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise UserError(f"WANDB_MODE={mode!r} is not a wandb mode ({', '.join(WANDB_MODES)}); fix it or unset it")


def configure_wandb_env() -> None:
    """Run wandb offline unless the user configured it (``WANDB_MODE``, ``WANDB_API_KEY`` or a netrc login).

    Offline mode never prompts and never waits on the network (wandb issues #592, #7063, #7671);
    ``wandb sync <run>/wandb/offline-run-*`` uploads later.
    """
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    try:
        has_login = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        has_login = False
    if not has_login:
        os.environ["WANDB_MODE"] = "offline"


def next_run_dir(root: Path, name: str, option: str) -> Path:
    """Create and return ``root/name-NNN`` with the first free number (atomic ``mkdir``, so never reused).

    ``option`` is the setting that chooses ``root`` (``run.root``, ``--out``), named in the error lines.
    """
    if not name or Path(name).name != name or name in (".", ".."):
        raise UserError(
            f"run name '{name}' must be a plain folder name, without '/'; set run.root for the parent folder"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot create the folder '{root}': a file is in the way; pass a folder ({option})") from None
    except PermissionError:
        raise UserError(
            f"cannot create the folder '{root}' (permission denied); choose another with {option}"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):  # e.g. a shared, read-only folder of checkpoints
        raise UserError(f"cannot write in '{root}' (permission denied); pass a folder you can write to with {option}")
    taken = [
        int(p.name.rsplit("-", 1)[1])
        for p in root.glob(f"{name}-[0-9][0-9][0-9]*")
        if p.name.rsplit("-", 1)[1].isdigit()
    ]
    number = max(taken, default=0) + 1
    while True:
        run_dir = root / f"{name}-{number:03d}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            number += 1


def point_latest(run_dir: Path) -> None:
    """Make ``<root>/latest`` a relative symlink to ``run_dir`` (best effort: skipped where links are unsupported)."""
    latest = run_dir.parent / "latest"
    try:
        if latest.is_symlink():
            latest.unlink()
        if not latest.exists():
            latest.symlink_to(run_dir.name)
    except OSError:
        pass


def error_message(err: BaseException) -> str:
    """The error's own message; for one a DataLoader worker re-raised, the worker's (not PyTorch's wrapper text).

    PyTorch re-raises a worker's exception as the same type with the message "Caught X in DataLoader worker process
    N." followed by the worker's traceback, whose last line is "module.X: <the original message>".
    """
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        text = text.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
    return text


def run_user_errors(main: Callable[[], int | None]) -> Callable[[], None]:
    """Wrap an entry point: user errors become one ``error:`` line and exit code 1.

    Ctrl-C becomes one ``interrupted:`` line and exit code 130: :class:`Interrupted` says what was kept (``train.py``:
    the run directory and how to resume it); a bare ``KeyboardInterrupt`` stopped the command before it wrote anything
    it keeps.
    """

    def wrapped() -> None:
        try:
            code = main()
        except USER_ERRORS as err:
            if not getattr(err, "silent", False):  # raised on every DDP rank alike: rank 0 says it
                start = "\n" if isinstance(err, Interrupted) else ""  # after the terminal's ^C and a progress bar
                print(f"{start}{getattr(err, 'label', 'error')}: {error_message(err)}", file=sys.stderr)
            raise SystemExit(getattr(err, "exit_code", 1)) from None
        except KeyboardInterrupt:
            print(f"\n{Interrupted.label}: stopped by Ctrl-C", file=sys.stderr)
            raise SystemExit(Interrupted.exit_code) from None
        raise SystemExit(code or 0)

    return wrapped


# --------------------------------------------------------------------------------------------------------------
def _train(args: Sequence[str] | None = None) -> int:
    configure_wandb_env()
    from gradreg.training import build_cli, fit

    cli = build_cli(args)
    return fit(cli)


def _evaluate(args: Sequence[str] | None = None) -> int:
    from gradreg.report import evaluate_main

    return evaluate_main(args)


def train_main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``train.py``."""
    run_user_errors(lambda: _train(args))()


def evaluate_main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``evaluate.py``."""
    run_user_errors(lambda: _evaluate(args))()


def require_file(path: str | Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is an existing file, else raise a one-line :class:`UserError` (missing, or a folder)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' {'is a folder, not a file' if path.is_dir() else 'does not exist'}; {fix}")
    return path


# Top-level sections of a train config: train.py's own, plus those LightningCLI writes into a run's config.yaml.
CONFIG_SECTIONS = ("seed_everything", "model", "data", "trainer", "run", "optimizer", "lr_scheduler", "ckpt_path")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of the config file ``path``: a YAML mapping, read as ``train.py`` reads it.

    jsonargparse's loader is PyYAML's safe loader that also reads ``1e-3`` as a number (YAML 1.1 reads it as text).

    Raises:
        UserError: the file is missing, not text, not valid YAML, empty (or comments only) or not a mapping (one line
            naming the file).
    """
    path = require_file(path, "config file", "see configs/ for the shipped configs")
    try:
        config = get_loader("yaml")(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        if isinstance(err, yaml.reader.ReaderError):  # a control character: no line, a position
            where = f"character {err.position + 1}: "
        reason = getattr(err, "problem", None) or getattr(err, "reason", None) or type(err).__name__
        raise UserError(f"config file '{path}' is not valid YAML ({where}{reason}); fix the file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"config file '{path}' cannot be read as text ({err}); pass a .yaml file") from None
    if config is None:
        raise UserError(f"config file '{path}' is empty; see configs/ for the shipped configs")
    if not isinstance(config, dict):
        raise UserError(f"config file '{path}' is not a mapping of sections ({', '.join(CONFIG_SECTIONS)})")
    return config
