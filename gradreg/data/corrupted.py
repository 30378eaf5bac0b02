"""The released corrupted test sets of Hendrycks and Dietterich: CIFAR-10-C and CIFAR-100-C, read from their files.

"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019, arXiv:1903.12261;
CIFAR-10-C at zenodo.org/record/2535967, CIFAR-100-C at zenodo.org/record/3555552. Their folder holds
``labels.npy`` and one ``<corruption>.npy`` per corruption (19 in CIFAR-10-C: the 15 of the benchmark and 4 extra),
uint8 images ``(5 N, H, W, C)``: severities 1 to 5 one after another, row ``(s - 1) N + j`` being image ``j`` of the
clean test set at severity ``s``. ``evaluate.py --corruption-files DIR`` scores them in place of the corruptions it
generates (:mod:`gradreg.anomalies`, 9 of the 19). Every file is memory-mapped with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from gradreg.data.datasets import DatasetNotFoundError
from gradreg.data.outliers import ImageArray

__all__ = ["CorruptionFiles"]

LABELS = "labels.npy"
HOW = (
    "download and extract CIFAR-10-C (zenodo.org/record/2535967) or CIFAR-100-C (zenodo.org/record/3555552): a folder "
    "of labels.npy and <corruption>.npy files"
)
NAME = "corruption files"


class CorruptionFiles:
    """A CIFAR-10-C style folder: the named corruptions' image arrays and the labels of their rows.

    Args:
        folder: the folder of ``labels.npy`` and ``<corruption>.npy``.
        names: the corruptions to read (file stems); default every ``.npy`` file there but the labels.

    Raises:
        DatasetNotFoundError: a missing folder or file, or one that is not such an array (one line with the fix).
        ValueError: a name with no file (the line lists the files there).
    """

    def __init__(self, folder: str | os.PathLike[str], names: Sequence[str] | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetNotFoundError(NAME, self.folder, HOW)
        available = sorted(p.stem for p in self.folder.glob("*.npy") if p.name != LABELS)
        self.names = list(names) if names else available
        unknown = [name for name in self.names if name not in available]
        if unknown:
            raise ValueError(f"no file {unknown[0]}.npy in {self.folder}; its corruptions: {', '.join(available)}")
        self.labels = _read_labels(self.folder / LABELS)
        if len(self.labels) % 5:
            raise DatasetNotFoundError(
                NAME, self.folder / LABELS, f"{len(self.labels)} labels are not 5 severities of one test set; {HOW}"
            )
        self.arrays = {name: ImageArray(self.folder / f"{name}.npy", NAME, HOW) for name in self.names}
        for images in self.arrays.values():
            if len(images) != len(self.labels):
                raise DatasetNotFoundError(
                    NAME, images.path, f"it holds {len(images)} images for the {len(self.labels)} labels of {LABELS}"
                )

    @property
    def size(self) -> int:
        """Images per severity: the size of the clean test set the files were made from."""
        return len(self.labels) // 5

    def severity(self, name: str, severity: int) -> Dataset:
        """Corruption ``name`` at ``severity`` (1 to 5): item ``j`` is test image ``j`` corrupted, with its label."""
        return _Severity(self.arrays[name], self.labels, (severity - 1) * self.size, self.size)


def _read_labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetNotFoundError(NAME, path, f"the labels of every row are missing; {HOW}")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:  # not a .npy file, or a pickled (object) array
        raise DatasetNotFoundError(NAME, path, f"not a .npy array of integer labels ({err}); {HOW}") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetNotFoundError(NAME, path, f"expected integer labels (N,), got {labels.dtype} {labels.shape}")
    return labels


class _Severity(Dataset):
    """``count`` rows of an image array from ``start``, with their labels."""

    def __init__(self, images: ImageArray, labels: np.ndarray, start: int, count: int) -> None:
        self.images, self.labels, self.start, self.count = images, labels, start, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, j: int) -> tuple[np.ndarray, int]:
        if not 0 <= j < self.count:
            raise IndexError(f"image {j} of {self.count}")
        return self.images[self.start + j][0], int(self.labels[self.start + j])
