"""The released corrupted test sets of Hendrycks and Dietterich (CIFAR-10-C, CIFAR-100-C, ImageNet-C), from their files.

"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019, arXiv:1903.12261;
CIFAR-10-C at zenodo.org/record/2535967, CIFAR-100-C at zenodo.org/record/3555552, ImageNet-C at
zenodo.org/record/2235448. Two layouts, told apart by ``labels.npy``:

- arrays (CIFAR-10-C, CIFAR-100-C): ``labels.npy`` and one ``<corruption>.npy`` per corruption, uint8 images
  ``(5 N, H, W, C)``: severities 1 to 5 one after another, row ``(s - 1) N + j`` being image ``j`` of the clean test
  set at severity ``s``. Memory-mapped with ``allow_pickle=False``.
- folders (ImageNet-C; Tiny-ImageNet-C has the same layout): ``<corruption>/<severity>/<class>/<image>``, each
  image the corrupted copy of the clean test image of the same file name (ImageNet's
  ``ILSVRC2012_val_00000293.JPEG``) in the class folder of the same name (checked where the ID images are in class
  folders). They are center-cropped to the ID image size, not resized (ImageNet-C: 224 px crops).

``evaluate.py --corruption-files DIR`` scores them in place of the corruptions it generates
(:mod:`gradreg.anomalies`, all 19): :meth:`CorruptionFiles.check` first makes sure that they are the ID test
set, image for image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from gradreg.data.benchmarks import read_image, walk_images
from gradreg.data.datasets import DatasetFileError, DatasetNotFoundError
from gradreg.data.outliers import ImageArray

__all__ = ["CorruptionFiles"]

LABELS = "labels.npy"
HOW = (
    "download and extract CIFAR-10-C (zenodo.org/record/2535967), CIFAR-100-C (zenodo.org/record/3555552) or "
    "ImageNet-C (zenodo.org/record/2235448): labels.npy and <corruption>.npy files, or <corruption>/<severity>/ folders"
)
NAME = "corruption files"
SEVERITIES = range(1, 6)


class CorruptionFiles:
    """A folder of released corrupted test images: the named corruptions, by severity.

    Args:
        folder: the folder of ``labels.npy`` and ``<corruption>.npy``, or of ``<corruption>/<severity>/`` folders.
        names: the corruptions to read (file stems or folder names); default every one there.
        severities: the severities to read (folders: only these need to be there).

    Raises:
        DatasetNotFoundError: a missing folder or file, or (:class:`DatasetFileError`) one that is not such an array
            (one line with the fix).
        ValueError: a name that is not there (the line lists those that are).
    """

    def __init__(
        self, folder: str | os.PathLike[str], names: Sequence[str] | None = None, severities: Sequence[int] = SEVERITIES
    ) -> None:
        self.folder, self.severities = Path(folder), list(severities)
        if not self.folder.is_dir():
            raise DatasetNotFoundError(NAME, self.folder, HOW)
        self.arrays = (self.folder / LABELS).is_file()
        entries = [p for p in self.folder.iterdir() if not p.name.startswith(".")]  # e.g. macOS tar's ._fog.npy
        arrays = [p for p in entries if p.suffix.lower() == ".npy"]
        if self.arrays:
            odd = next((p for p in arrays if p.suffix != ".npy"), None)
            if odd is not None:  # left out, it would go unnoticed on a case-sensitive file system
                raise DatasetFileError(NAME, odd, f"rename it to {odd.stem}.npy, as the released files are named")
            available = sorted(p.stem for p in arrays if p.name != LABELS)
        else:
            available = sorted(d.name for d in entries if any((d / str(s)).is_dir() for s in SEVERITIES))
            if not available and arrays:
                raise DatasetNotFoundError(NAME, self.folder / LABELS, f"the labels of every row are missing; {HOW}")
            if not available:
                raise DatasetNotFoundError(
                    NAME, self.folder, f"neither {LABELS} nor <corruption>/<severity>/ folders; {HOW}"
                )
        self.names = list(names) if names else available
        unknown = [name for name in self.names if name not in available]
        if unknown:
            what = f"file {unknown[0]}.npy" if self.arrays else f"folder {unknown[0]}/"
            raise ValueError(f"no {what} in {self.folder}; its corruptions: {', '.join(available)}")
        self._images: dict[tuple[str, int], Dataset] = {}
        if self.arrays:
            self.labels = _read_labels(self.folder / LABELS)
            size = len(self.labels) // 5  # images per severity
            for name in self.names:
                images = ImageArray(self.folder / f"{name}.npy", NAME, HOW)
                if len(images) != len(self.labels):
                    raise DatasetFileError(
                        NAME,
                        images.path,
                        f"it holds {len(images)} images for the {len(self.labels)} labels of {LABELS}",
                    )
                for s in SEVERITIES:
                    self._images[name, s] = _Rows(images, self.labels, (s - 1) * size, size)

    def check(self, id_test: Dataset, indices: Sequence[int], id_name: str) -> None:
        """Make sure that the files hold corrupted copies of the items ``indices`` of the (untransformed) ID test set.

        Arrays: the same size and labels, row for row. Folders: an image of the same file name for each of them, in
        a class folder of the same name. Raises ValueError saying what differs.
        """
        if self.arrays:
            self._check_rows(id_test, indices, id_name)
            return
        file = getattr(id_test, "file", None)  # ImageFolderDataset, ImageFiles
        if file is None:
            raise ValueError(
                f"its images are matched to the ID test set by file name, but {id_name}'s test images are not read "
                "from files"
            )
        wanted = {i: Path(file(i)) for i in indices}
        for name in self.names:
            for s in self.severities:
                self._images[name, s] = _Files(self._match(name, s, wanted), id_test)

    def severity(self, name: str, severity: int) -> Dataset:
        """Corruption ``name`` at ``severity`` (1 to 5): item ``i`` is ID test image ``i`` corrupted, with its label.

        With folders, only the items passed to :meth:`check` exist.
        """
        return self._images[name, severity]

    def _check_rows(self, id_test: Dataset, indices: Sequence[int], id_name: str) -> None:
        size, n = len(self.labels) // 5, len(id_test)  # type: ignore[arg-type]
        if size != n:
            raise ValueError(
                f"it holds {size} images per severity, but the ID test set ({id_name}) has {n}; give the corrupted "
                "copies of this test set (CIFAR-10-C for cifar10, CIFAR-100-C for cifar100)"
            )
        index = np.asarray(indices, dtype=np.int64)
        labels = np.array([id_test[i][1] for i in indices], dtype=np.int64)
        for s in self.severities:
            differ = np.flatnonzero(self.labels[(s - 1) * size + index] != labels)
            if differ.size:
                j = int(index[differ[0]])
                given = self.labels[(s - 1) * size + j]
                raise ValueError(
                    f"{LABELS} gives test image {j} at severity {s} the label {given}, the ID test set ({id_name}) "
                    f"{labels[differ[0]]}: the files are not this test set in its order"
                )

    def _match(self, name: str, severity: int, wanted: dict[int, Path]) -> dict[int, Path]:
        """The images of ``<name>/<severity>/`` that stand for the ID test images ``wanted`` (index: file)."""
        folder = self.folder / name / str(severity)
        if not folder.is_dir():
            raise ValueError(f"{folder} is missing; extract it, or give --severities those that are there")
        found: dict[str, Path] = {}
        for dirpath, images in walk_images(folder, NAME):
            found.update((image, Path(dirpath, image)) for image in images)
        classes = {image.parent.name for image in found.values()}
        matched = {}
        for i, file in wanted.items():
            image = found.get(file.name)
            if image is None:
                raise ValueError(
                    f"{folder} has no {file.name} (ID test image {i}): the folders must hold the corrupted copies of "
                    "the ID test images under their file names"
                )
            # ID images in class folders (not a flat list) must be in the class folder of the same name
            if file.parent.name in classes and image.parent.name != file.parent.name:
                raise ValueError(
                    f"{image} is in class folder {image.parent.name}, but ID test image {i} of that name is in "
                    f"{file.parent.name}: the files are not this test set"
                )
            matched[i] = image
        return matched


def _read_labels(path: Path) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:  # not a .npy file, or a pickled (object) array
        raise DatasetFileError(NAME, path, f"not a .npy array of integer labels ({err}); {HOW}") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) % 5:
        raise DatasetFileError(
            NAME, path, f"expected integer labels of 5 severities x N images, got {labels.dtype} {labels.shape}"
        )
    return labels


class _Rows(Dataset):
    """``count`` rows of an image array from ``start``, with their labels."""

    def __init__(self, images: ImageArray, labels: np.ndarray, start: int, count: int) -> None:
        self.images, self.labels, self.start, self.count = images, labels, start, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, j: int) -> tuple[np.ndarray, int]:
        if not 0 <= j < self.count:
            raise IndexError(f"image {j} of {self.count}")
        return self.images[self.start + j][0], int(self.labels[self.start + j])


class _Files(Dataset):
    """Corrupted copies of some ID test images, by ID index, with the ID images' labels."""

    def __init__(self, files: dict[int, Path], id_test: Dataset) -> None:
        self.files = files
        self.labels = {i: int(id_test.labels[i]) for i in files}  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[object, int]:
        return read_image(self.files[i]), self.labels[i]
