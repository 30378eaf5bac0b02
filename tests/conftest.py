"""Shared fixtures: seeded RNGs, offline wandb, and the repository root."""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
# Tiny models: one thread avoids oversubscribing CI's 2 cores (also inherited by the subprocess tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Property tests draw the same examples on every run (the suite must be deterministic) and keep no database.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def damage_checkpoint() -> Callable[[Path, Path], str]:
    """``damage(source, target)``: a copy of checkpoint ``source`` with one bit of its largest tensor flipped.

    The file keeps its size and its zip structure (as after a bad disk or copy); returns the damaged member's name.
    """

    def damage(source: Path, target: Path) -> str:
        with zipfile.ZipFile(source) as archive:
            member = max(archive.infolist(), key=lambda info: info.file_size)
        data = bytearray(source.read_bytes())
        # the data follow the 30-byte local header, the name and the extra field (torch pads it to align the tensor)
        name_length, extra_length = struct.unpack_from("<HH", data, member.header_offset + 26)
        data[member.header_offset + 30 + name_length + extra_length + member.file_size // 2] ^= 0x01
        target.write_bytes(data)
        return member.filename

    return damage


@pytest.fixture(scope="session")
def frost_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding an ``imagecorruptions/frost/`` of five made-up "photographs" (PNG with alpha, and JPEG).

    Their sizes shrink 5 times to 60x90, 32x56, 32x56, 35x52 and 50x66 (CIFAR-10-C's scale): 32 px images just fit
    some; 224 px images need them enlarged.
    """
    from PIL import Image

    root = tmp_path_factory.mktemp("site")
    folder = root / "imagecorruptions" / "frost"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"frost1.png": (300, 450), "frost2.png": (160, 280), "frost3.png": (160, 280), "frost4.jpg": (175, 260),
             "frost5.jpg": (250, 330)}  # fmt: skip
    for name, (rows, cols) in sizes.items():
        channels = 4 if name.endswith(".png") else 3  # RGBA or RGB
        Image.fromarray(rng.integers(0, 256, (rows, cols, channels), dtype=np.uint8)).save(folder / name)
    return root


@pytest.fixture
def frost_photos(frost_package: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The made-up frost photographs where ``gradreg.anomalies.frost_folder`` looks: an importable package's folder."""
    monkeypatch.syspath_prepend(str(frost_package))
    return frost_package / "imagecorruptions" / "frost"
