"""What produced a checkpoint or a results file: code revision, package versions, device.

Every checkpoint of ``train.py`` stores :func:`environment` under ``"environment"``; ``evaluate.py`` writes its own
and the checkpoint's into ``results.json``. A number can then be traced to the commit and the versions behind it,
which is what reproductions of OOD papers most often lack (a run "with the README's settings" on other code).
"""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

import gradreg

PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "numpy", "wandb")


def environment(device: torch.device) -> dict[str, Any]:
    """The gradreg version and git revision, Python, :data:`PACKAGES` versions, and the name of ``device``."""
    return {
        "gradreg": gradreg.__version__,
        "git": git_revision(Path(gradreg.__file__).resolve().parent.parent),
        "python": platform.python_version(),
        "packages": _package_versions(),
        "cuda_build": torch.version.cuda,  # the CUDA version torch was built with (None: a CPU build)
        "device": _device_name(device),
    }


@functools.cache  # platform.processor() runs `uname -p`, and checkpoints are saved every epoch
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {platform.processor() or platform.machine() or 'unknown'}"


@functools.cache
def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    # With its build tag (2.14.1+cu130), which the wheel's metadata lacks; str(): torch's own type for it is a str
    # subclass, which weights_only checkpoint loading refuses.
    versions["torch"] = str(torch.__version__)
    return versions


@functools.cache
def git_revision(root: Path) -> str | None:
    """The commit checked out at ``root``, with ``-dirty`` if tracked files differ from it; None outside a checkout.

    Only a checkout whose top level is ``root`` counts: an installed package inside some other repository (a
    virtual environment in a project folder) must not report that repository's commit. Read once per process:
    checkpoints are saved every epoch.
    """
    if not (root / ".git").exists():
        return None
    try:
        git = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=10, check=True)
        commit = git(["git", "rev-parse", "HEAD"]).stdout.strip()
        changed = git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git executable, not a repository after all, a slow disk
        return None
    return commit + ("-dirty" if changed else "")
