"""Readers for the real benchmarks, from CIFAR and Fashion-MNIST to ImageNet and the OOD test sets.

Covered: CIFAR-10/100, (Fashion-)MNIST, SVHN, Textures, Places365, the ODIN / MOS / OpenOOD image folders,
TinyImageNet, ImageNet-1K and GReg's ImageNet class subsets. Every set lives in one folder under ``data_root``
(``docs/data.md`` gives each layout and where to get the files). Two settings work on most sets:

- ``path``: where the set is instead (absolute, or relative to ``data_root``).
- ``list_file``: an OpenOOD-style image list that pins an exact subset, one ``relative/path [label]`` per line with
  paths relative to ``list_root`` (default ``data_root``); the list file itself is relative to ``data_root``. A
  ``{split}`` in its name is replaced by the split (``lists/imagenet/{split}_imagenet.txt``).

Sets that torchvision ships (CIFAR-10/100, SVHN, DTD, Places365, MNIST, Fashion-MNIST) keep torchvision's on-disk
layout, are read with torchvision's classes (MD5 checks included) and are downloaded only when the spec says
``download: true``. (Fashion-)MNIST is parsed here because torchvision reads neither the gzipped idx files nor
the flat folder of Debian's ``dataset-fashion-mnist``. Nothing else is ever downloaded.

Splits: ID sets read ``"train"`` and ``"test"`` and raise ``ValueError`` for ``"val"``, so the datamodule holds out
``val_fraction`` of the training set (unless a ``{split}`` list file has a val list). OOD sets read ``"test"`` (the
whole published set); ``"val"`` works only with a ``list_file`` (e.g. OpenOOD's ``val_*.txt``), else ``ValueError``.

Each registered factory carries a ``locate`` attribute with the same signature: it checks that the files are
there (and whole: the published MD5 sums of torchvision's files, the idx headers of (Fashion-)MNIST against their
sizes; image folders are listed, not read, so that a broken link is named) and returns a :class:`Located`, or
raises :class:`DatasetNotFoundError` naming the expected path and how to get the data. ``gradreg.data.check`` calls
it; every factory calls it first (a class tree's reader lists the tree itself, once), so both say the same thing.
"""

from __future__ import annotations

import ast
import gzip
import math
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.datasets import utils as tv_utils

from gradreg.data._imagenet_wnids import IMAGENET_WNIDS
from gradreg.data.datasets import (
    DATASETS,
    ID_SPECS,
    DatasetFileError,
    DatasetNotFoundError,
    ImageSpec,
    UnreadableImageError,
)

__all__ = [
    "IMAGENET_SUBSET_SEED",
    "IMAGENET_WNIDS",
    "ArrayImages",
    "ImageFiles",
    "Located",
    "imagenet_subset_wnids",
    "read_idx",
    "read_list_file",
    "scan_images",
]

F = TypeVar("F", bound=Callable[..., Dataset])

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SUBSET_SEED = 1993  # np.random.seed(1993) in GReg's ImageNet code (o4lc/Greg-OOD)
IMAGENET_SUBSETS = (10, 20, 50, 100)  # the N of GReg's imagenetIdClassAndIndex{N}.pth files
IMAGE_EXTENSIONS = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"})

ID_SPECS.update(
    {
        "cifar10": ImageSpec(10, 3, 32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
        "cifar100": ImageSpec(100, 3, 32, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
        # Pixel mean / std of the 60,000 training images (computed from the original idx files).
        "fashion_mnist": ImageSpec(10, 1, 28, mean=(0.2860,), std=(0.3530,)),
        "mnist": ImageSpec(10, 1, 28, mean=(0.1307,), std=(0.3081,)),
        "imagenet1k": ImageSpec(1000, 3, 224, IMAGENET_MEAN, IMAGENET_STD, resize=256),
        **{f"imagenet{n}": ImageSpec(n, 3, 224, IMAGENET_MEAN, IMAGENET_STD, resize=256) for n in IMAGENET_SUBSETS},
    }
)

_PLAIN_FOLDER = "a plain folder of images"  # Located.note of textures read from a folder, not torchvision's layout
_OOD_SPLIT_HINT = (
    "; an OOD set has one split, 'test' (the whole set): give it a list_file to pin a validation subset, "
    "or list a different set under data.ood_val_sets"
)


# ---------------------------------------------------------------------------------------------------------------
# Generic pieces: locations, image lists, folder scans, array images
@dataclass(frozen=True)
class Located:
    """Where a dataset's files are (or will be downloaded to, with a ``note`` saying so).

    ``images``: for a plain image folder, its images as the check listed them (the reader takes them as they are).
    """

    path: Path
    note: str = ""
    images: tuple[Path, ...] = ()


def _register(name: str, locate: Callable[..., Located]) -> Callable[[F], F]:
    """Register ``factory`` under ``name`` with its ``locate`` function attached."""

    def deco(factory: F) -> F:
        factory.locate = locate  # type: ignore[attr-defined]
        DATASETS.register(name)(factory)
        return factory

    return deco


def resolve_path(root: Path, path: str | os.PathLike[str] | None, default: str) -> Path:
    """``path`` (absolute, ``~``, or relative to ``root``), else ``root / default``; made absolute for messages."""
    try:
        chosen = Path(path).expanduser() if path is not None else Path(default)
    except RuntimeError:  # ~name of no user here
        raise ValueError(f"path '{path}': its user has no home directory on this machine; give the full path") from None
    return (chosen if chosen.is_absolute() else Path(root) / chosen).absolute()


def _check_split(name: str, split: str, allowed: Sequence[str], hint: str = "") -> None:
    if split not in allowed:
        raise ValueError(f"dataset '{name}' has no '{split}' split (it has: {', '.join(allowed)}){hint}")


def _require(
    name: str,
    folder: Path,
    needed: Sequence[Path],
    how: str,
    download: bool = False,
    md5: Mapping[str, str] | None = None,
) -> Located:
    """``Located(folder)`` if every path in ``needed`` exists; with ``download`` a note instead of an error.

    ``md5`` maps file names in ``folder`` to their published MD5 sums: a file that differs is corrupt or partial,
    which torchvision would otherwise report only when the set is read (for an OOD test set, after training).
    """
    missing = [p for p in needed if not p.exists()]
    if not missing:
        sums = (md5 or {}).items()
        corrupt = [file for file, digest in sums if not tv_utils.check_integrity(str(folder / file), digest)]
        if corrupt:
            what = f"corrupt or partial: {_listed(corrupt)} (MD5 differs from the published sum)"
            raise DatasetFileError(name, folder, f"{what}; delete and fetch again: {how}")
        return Located(folder)
    if download:
        return Located(folder, "not there yet: torchvision downloads it there (download: true)")
    names = [str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p) for p in missing]
    raise DatasetNotFoundError(name, folder, f"missing {_listed(names)}; {how}")


def _listed(names: Sequence[str]) -> str:
    """The first four names, and how many more."""
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return ", ".join(names[:4]) + more


def _first_and_last(listing: Path, images: Path) -> list[Path]:
    """The first and last image a list file names (its first column, under ``images``), to catch partial extracts."""
    if not listing.is_file():
        return []
    lines = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    return [images / lines[0], images / lines[-1]] if lines else []


def scan_images(folder: Path, name: str = "images") -> list[Path]:
    """Every image file under ``folder`` (recursively, as :func:`walk_images` lists them), sorted.

    ``name`` is the dataset named in the error for a broken link.
    """
    return sorted(_walk_images(folder, name))


def walk_images(
    folder: str | os.PathLike[str], name: str = "images", extensions: Collection[str] = IMAGE_EXTENSIONS
) -> Iterator[tuple[str, list[str]]]:
    """``(dirpath, image names)`` for every folder under ``folder``, as ``os.walk(folder, followlinks=True)``.

    Sorted (file names, and the sub-folders depth first), without hidden files and folders and without loops: a link
    to a folder the walk is already inside of (``a/b/up -> ../..``), or to one above ``folder``, is not entered:
    ``os.walk`` would follow it until the path is too long, listing every image below it dozens of times (and the
    images of other classes or datasets). An image that is a link to nothing (its
    target moved or deleted) raises :class:`DatasetNotFoundError` naming it (``name``: the dataset): read after the
    check, it would stop a run later, an OOD test set after training.
    """
    suffixes = {e.lower() for e in extensions}
    # A folder and the real folders on the way to it, from the file system's root: a link back to any of them (above
    # the start too: another class's folder, or the data root) is not entered.
    start = Path(os.path.realpath(folder))
    pending = [(os.fspath(folder), tuple(map(str, (*reversed(start.parents), start))))]
    while pending:
        dirpath, chain = pending.pop()
        try:
            with os.scandir(dirpath) as listing:
                entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:  # as os.walk: a folder that cannot be listed is left out
            continue
        images: list[str] = []
        folders: list[tuple[str, tuple[str, ...]]] = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:  # as os.walk: e.g. a link to itself
                is_dir = False
            if is_dir:
                real = os.path.realpath(entry.path)
                if real not in chain:
                    folders.append((entry.path, (*chain, real)))
            elif os.path.splitext(entry.name)[1].lower() in suffixes:
                if entry.is_symlink() and not os.path.exists(entry.path):
                    how = f"it is a broken link (to {os.readlink(entry.path)}, which does not exist); fix or delete it"
                    raise DatasetNotFoundError(name, entry.path, how)
                images.append(entry.name)
        yield dirpath, images
        pending += reversed(folders)


def _walk_images(folder: Path, name: str) -> Iterator[Path]:
    for dirpath, images in walk_images(folder, name):
        for f in images:
            yield Path(dirpath, f)


def _images_in(folder: Path, name: str) -> tuple[Path, ...]:
    """The images under ``folder`` (none if it is no folder); all are listed, so that the check names a broken link."""
    return tuple(scan_images(folder, name)) if folder.is_dir() else ()


def _parse_label(text: str) -> int:
    """The label field of a list line: an int, an OpenOOD extras dict with a ``label`` key, or absent (-1)."""
    text = text.strip()
    if not text:
        return -1
    try:
        return int(text)
    except ValueError:
        pass
    try:
        extras = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        extras = None
    if isinstance(extras, dict) and "label" in extras:
        label = extras["label"]
        if isinstance(label, int) and not isinstance(label, bool):  # int() would cut 1.7 to 1 and fail on None
            return label
    raise ValueError(f"cannot read a label from {text!r}")


def read_list_file(list_file: Path, list_root: Path) -> tuple[list[Path], list[int]]:
    """Parse an OpenOOD-style image list: one ``relative/path [label]`` per line (``#`` comments, blank lines skip).

    Args:
        list_file: the list file.
        list_root: the folder the listed paths are relative to (absolute listed paths are kept).

    Returns:
        The image paths and their labels (-1 where a line has none).
    """
    files, labels = [], []
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{list_file} is not UTF-8 text ({err.reason} at byte {err.start}); save the list as UTF-8"
        ) from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rel, *rest = line.split(None, 1)  # a space or a tab, as _first_and_last reads it
        rest = rest[0] if rest else ""
        try:
            labels.append(_parse_label(rest))
        except ValueError as err:
            raise ValueError(f"{list_file}:{number}: {err}") from None
        files.append(Path(list_root, rel))
    return files, labels


def _list_path(name: str, root: Path, split: str, list_file: str) -> Path:
    """The list file for ``split``: ``{split}`` in the name is replaced; without it the list is one OOD set."""
    if "{split}" not in list_file:
        _check_split(name, split, ("val", "test"))
    lst = resolve_path(root, list_file.replace("{split}", split), "")
    if split == "val" and "{split}" in list_file and not lst.is_file():
        raise ValueError(f"dataset '{name}' has no val list ({lst})")  # the datamodule then holds out train images
    return lst


def _locate_list(name: str, root: Path, split: str, list_file: str, list_root: str | None) -> Located:
    lst = _list_path(name, root, split, list_file)
    if not lst.is_file():
        raise DatasetNotFoundError(name, lst, "the list_file does not exist (it is relative to data_root)")
    base = resolve_path(root, list_root, ".")
    files, _ = read_list_file(lst, base)
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        detail = f"{len(missing)} of {len(files)} listed images are missing, e.g. {missing[0]}" if missing else "empty"
        raise DatasetNotFoundError(name, base, f"{lst.name}: {detail}; listed paths are relative to list_root")
    return Located(lst)


def _list_dataset(name: str, root: Path, split: str, list_file: str, list_root: str | None) -> ImageFiles:
    lst = _locate_list(name, root, split, list_file, list_root).path
    return ImageFiles(*read_list_file(lst, resolve_path(root, list_root, ".")))


def read_image(path: Path, mode: str = "RGB") -> Image.Image:
    """The image at ``path`` in ``mode``; a truncated or unreadable file is an :class:`UnreadableImageError`."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # PIL: truncated data, unidentified formats,
        # broken headers, and images too large to decode safely
        reason = "an empty file" if os.path.getsize(path) == 0 else str(err).replace(f" '{path}'", "")
        raise UnreadableImageError(f"cannot read image '{path}' ({reason}){UnreadableImageError.FIX}") from err


class ImageFiles(Dataset):
    """Images read from files (PIL, converted to RGB) with integer labels (-1 = unlabelled / OOD).

    Args:
        files: image paths.
        labels: one label per file; ``None`` = all -1.
    """

    def __init__(self, files: Sequence[Path], labels: Sequence[int] | None = None) -> None:
        self.files = list(files)
        self.labels = list(labels) if labels is not None else [-1] * len(self.files)
        if len(self.labels) != len(self.files):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.files)

    def file(self, i: int) -> Path:
        """Path of image ``i``."""
        return Path(self.files[i])

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return read_image(self.file(i)), self.labels[i]


class ArrayImages(Dataset):
    """In-memory uint8 images (N, H, W, C) with integer labels; items are HWC arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"expected images (N, H, W, C) and N labels, got {images.shape} and {len(labels)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def _tv_open(name: str, folder: Path, build: Callable[[], Dataset]) -> Dataset:
    """Run a torchvision constructor; its 'not found or corrupted' RuntimeError becomes a DatasetNotFoundError."""
    try:
        return build()
    except RuntimeError as err:
        how = f"torchvision rejected the files ({err}); they may be corrupt or partial: delete and fetch them again"
        raise DatasetNotFoundError(name, folder, how) from err


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision layout: <path>/cifar-10-batches-py/, <path>/cifar-100-python/)
# torchvision checks every file of both splits, whichever split is read.
_CIFAR: dict[str, tuple[type[tvd.CIFAR10], str]] = {
    "cifar10": (tvd.CIFAR10, "cifar-10-batches-py"),
    "cifar100": (tvd.CIFAR100, "cifar-100-python"),
}


def _cifar(name: str) -> None:
    cls, folder_name = _CIFAR[name]
    md5 = {file: digest for file, digest in (*cls.train_list, *cls.test_list)} | {cls.meta["filename"]: cls.meta["md5"]}
    archive = cls.url.rsplit("/", 1)[1]
    how = f"get {cls.url} and extract it into {{base}} (tar xzf {archive}), or set download: true"

    def locate(root: Path, split: str, path: str | None = None, download: bool = False) -> Located:
        _check_split(name, split, ("train", "test"))
        base = resolve_path(root, path, ".")
        if base.name == folder_name:  # path may name the extracted folder itself
            base = base.parent
        folder = base / folder_name
        return _require(name, folder, [folder / f for f in md5], how.format(base=base), download, md5)

    def factory(root: Path, split: str, path: str | None = None, download: bool = False) -> Dataset:
        folder = locate(root, split, path, download).path
        return _tv_open(name, folder, lambda: cls(str(folder.parent), train=split == "train", download=download))

    factory.__doc__ = f"{cls.__name__} (torchvision) in ``<path>/{folder_name}/``; ``path`` defaults to data_root."
    _register(name, locate)(factory)


_cifar("cifar10")
_cifar("cifar100")


# ---------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST: idx files, gzipped or not, flat (Debian) or in torchvision's <path>/<Class>/raw/
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read a uint8 idx file (LeCun's MNIST format), gzipped if the name ends in ``.gz``.

    Raises:
        ValueError: the file is not a complete uint8 idx file.
    """
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot decompress ({err})") from None
    shape, offset = _idx_header(data, path)
    _idx_size(path, shape, offset, len(data))
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()  # writable, as torch wants


def check_idx(path: Path) -> None:
    """Check an idx file's header against its size without reading the data (a gzip's size is in its trailer).

    A cut gzip whose last four bytes happen to spell the right size (odds about 2**-32) or a bad checksum pass
    here and fail when :func:`read_idx` decompresses the file.

    Raises:
        ValueError: the file is not a complete uint8 idx file.
    """
    try:
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as f:
            head = f.read(4)
            head += f.read(4 * head[3]) if len(head) == 4 else b""
        if path.suffix == ".gz":
            with path.open("rb") as f:  # ISIZE: the uncompressed size modulo 2**32, little-endian
                f.seek(-4, os.SEEK_END)
                size = int.from_bytes(f.read(4), "little")
        else:
            size = path.stat().st_size
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot decompress ({err})") from None
    shape, offset = _idx_header(head, path)
    if path.suffix == ".gz" and (offset + math.prod(shape)) % 2**32 != size:
        size = _gunzipped_size(path)  # the trailer describes only the last member of a multi-member file
    _idx_size(path, shape, offset, size)


def _gunzipped_size(path: Path) -> int:
    try:
        with gzip.open(path) as f:
            return sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
    except (OSError, EOFError) as err:  # a cut file ends before its end-of-stream marker
        raise ValueError(f"{path}: cannot decompress ({err}; truncated?)") from None


def _idx_header(head: bytes, path: Path) -> tuple[tuple[int, ...], int]:
    """The shape and data offset an idx header gives."""
    if len(head) < 4 or head[:3] != b"\x00\x00\x08":  # two zero bytes, then type 0x08 = unsigned byte
        raise ValueError(f"{path} is not a uint8 idx file")
    ndim = head[3]
    if len(head) < 4 + 4 * ndim:
        raise ValueError(f"{path}: the header is cut short (truncated?)")
    return tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)), 4 + 4 * ndim


def _idx_size(path: Path, shape: tuple[int, ...], offset: int, size: int) -> None:
    if offset + math.prod(shape) != size:
        raise ValueError(f"{path}: header says {shape} but the file holds a different amount of data (truncated?)")


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_parts(split: str) -> tuple[str, ...]:
    return ("train", "test") if split == "all" else (split,)


def _read_idx_pair(name: str, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, H, W) and labels (N,) of an MNIST-style split."""
    images_file, labels_file = (_idx_file(folder, stem) for stem in _IDX_FILES[split])
    if images_file is None or labels_file is None:  # locate found both: only a concurrent delete gets here
        raise DatasetNotFoundError(name, folder, "the idx files disappeared while reading")
    try:
        images, labels = read_idx(images_file), read_idx(labels_file)
    except ValueError as err:
        raise DatasetFileError(name, folder, f"corrupt file: {err}; delete and fetch again") from None
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DatasetFileError(name, folder, f"images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def _mnist_like(name: str, cls: type[tvd.MNIST], debian: str) -> None:
    how = (
        f"put the four idx files (*-ubyte or *-ubyte.gz) there, set path: to a flat folder holding them{debian}, "
        f"or set download: true (torchvision)"
    )

    def locate(root: Path, split: str, path: str | None = None, download: bool = False) -> Located:
        _check_split(name, split, ("train", "test", "all"))
        base = resolve_path(root, path, ".")
        raw = base / cls.__name__ / "raw"  # torchvision's raw_folder
        for folder in (base, raw):
            files = [_idx_file(folder, stem) for part in _idx_parts(split) for stem in _IDX_FILES[part]]
            if all(files):
                try:
                    for file in files:
                        check_idx(file)
                except ValueError as err:
                    raise DatasetFileError(name, folder, f"corrupt file: {err}; delete and fetch again") from None
                return Located(folder)
        if download:
            return Located(raw, "not there yet: torchvision downloads it there (download: true)")
        raise DatasetNotFoundError(name, raw if path is None else f"{base} (flat) or {raw}", how)

    def factory(root: Path, split: str, path: str | None = None, download: bool = False) -> Dataset:
        loc = locate(root, split, path, download)
        if loc.note:  # missing and download: true
            base = loc.path.parent.parent
            for part in _idx_parts(split):
                _tv_open(name, loc.path, lambda part=part: cls(str(base), train=part == "train", download=True))
            loc = locate(root, split, path, download=False)
        parts = [_read_idx_pair(name, loc.path, part) for part in _idx_parts(split)]
        images, labels = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        return ArrayImages(images[..., None], labels.astype(np.int64))

    factory.__doc__ = (
        f"{cls.__name__} idx files: flat in ``path`` or in ``<path>/{cls.__name__}/raw/``; split ``all`` = train then "
        "test (OpenOOD's 70,000-image MNIST far-OOD set)."
    )
    _register(name, locate)(factory)


_mnist_like(
    "fashion_mnist",
    tvd.FashionMNIST,
    " (Debian: apt-get install dataset-fashion-mnist, then path: /usr/share/datasets/fashion-mnist)",
)
_mnist_like("mnist", tvd.MNIST, "")


# ---------------------------------------------------------------------------------------------------------------
# SVHN: <data_root>/svhn/{train,test,extra}_32x32.mat (torchvision layout)
def _svhn_locate(root: Path, split: str, path: str | None = None, download: bool = False) -> Located:
    _check_split("svhn", split, ("train", "test", "extra"))
    folder = resolve_path(root, path, "svhn")
    url, file, digest = tvd.SVHN.split_list[split]
    return _require("svhn", folder, [folder / file], f"get {url}, or set download: true", download, {file: digest})


@_register("svhn", _svhn_locate)
def svhn(root: Path, split: str, path: str | None = None, download: bool = False) -> Dataset:
    """SVHN cropped digits (torchvision); the OOD benchmarks use the 26,032 test images."""
    folder = _svhn_locate(root, split, path, download).path
    return _tv_open("svhn", folder, lambda: tvd.SVHN(str(folder), split=split, download=download))


# ---------------------------------------------------------------------------------------------------------------
# Textures (DTD): torchvision layout <path>/dtd/dtd/{images,labels}/, or with path: any folder of images
_DTD_URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
_DTD_PLAIN = "or set path: to a plain folder of the images (the tarball's dtd/images/)"


def _textures_locate(
    root: Path,
    split: str,
    path: str | None = None,
    list_file: str | None = None,
    list_root: str | None = None,
    download: bool = False,
) -> Located:
    if list_file is not None:
        return _locate_list("textures", root, split, list_file, list_root)
    _check_split("textures", split, ("test",), _OOD_SPLIT_HINT)
    base = resolve_path(root, path, ".")
    folder = base / "dtd" / "dtd"
    labels = [folder / "labels" / f"{s}1.txt" for s in ("train", "val", "test")]
    if path is not None and not (base / "dtd").exists() and (images := _images_in(base, "textures")):
        return Located(base, _PLAIN_FOLDER, images)
    if not download and not (folder / "images").is_dir():
        where, how = _dtd_missing(Path(root).absolute(), base, path)
        raise DatasetNotFoundError("textures", where, how)
    listed = [p for listing in labels for p in _first_and_last(listing, folder / "images")]
    how = f"get {_DTD_URL} and extract it into {base / 'dtd'}/ (giving {folder}/images/), set download: true"
    how += f", {_DTD_PLAIN}"
    return _require("textures", folder, [folder / "images", *labels, *listed], how, download)


def _dtd_missing(root: Path, base: Path, path: str | None) -> tuple[Path, str]:
    """Where DTD was looked for and what to do, when ``base/dtd/dtd/images/`` (torchvision's layout) is not there.

    The tarball holds one folder, ``dtd/`` (``images/``, ``labels/``, ``imdb/``). Extracted into the data root instead
    of into ``dtd/`` under it, or into ``dtd/dtd/``, it is one level off; a ``path:`` naming the default place's
    ``dtd/`` is one level too deep. The line names the folder found and the ``path:`` that reads it.
    """
    expected = base / "dtd" / "dtd"
    where = base if path is not None else expected  # a path: of the user's is what was not found, not <path>/dtd/dtd
    if path is not None and not base.exists():
        return where, (
            f"path: {path} does not exist; set path: to the folder holding dtd/dtd/images/ or to a plain folder of "
            f"the images (the tarball's dtd/images/), or leave path: out to read {root}/dtd/dtd/images/"
        )
    for tree in (base / "dtd", base / "dtd" / "dtd" / "dtd"):
        if (tree / "images").is_dir():
            fixes = [f"set path: {tree / 'images'} (read as a plain folder of images)"]
            holder = tree.parent.parent
            if tree.name == tree.parent.name == "dtd" and holder != base:  # torchvision's layout under holder
                fixes.insert(0, "leave path: out" if holder == root else f"set path: {holder}")
            if path is None:
                fixes.append(f"move the folder so that {expected}/images/ exists")
                level = "above" if tree == base / "dtd" else "below"
                found = f"the tarball's dtd/ folder is at {tree}/, one level {level} {expected}/"
            else:  # not <path>/dtd/dtd/dtd, as the looked-for folder would say
                found = f"path: names the folder holding dtd/dtd/images/, but DTD's files are at {tree}/"
            return where, f"{found}; {', or '.join(fixes)}"
    found = f"no images in {base} and no {expected}/images/" if path is not None else f"missing {expected}/images/"
    return where, (
        f"{found}; get {_DTD_URL} and extract it into {base / 'dtd'}/ (giving {expected}/images/), "
        f"set download: true, {_DTD_PLAIN}"
    )


@_register("textures", _textures_locate)
def textures(
    root: Path,
    split: str,
    path: str | None = None,
    list_file: str | None = None,
    list_root: str | None = None,
    download: bool = False,
) -> Dataset:
    """Describable Textures (DTD): all 5,640 images (the OOD convention), in torchvision's ``DTD`` layout and order.

    DTD's own train/val/test lists of partition 1 together hold every image once. A ``path`` to a plain folder of
    images (the tarball's ``dtd/images``) is read as such.
    """
    if list_file is not None:
        return _list_dataset("textures", root, split, list_file, list_root)
    loc = _textures_locate(root, split, path, list_file, list_root, download)
    if loc.note == _PLAIN_FOLDER:
        return ImageFiles(loc.images)
    if download:  # torchvision fetches and extracts the archive where it is missing
        tvd.DTD(str(loc.path.parent.parent), partition=1, download=True)
    # The images are read here (not by torchvision's DTD) so that an unreadable one is named as in every other set.
    listed = [(loc.path / "labels" / f"{s}1.txt").read_text().split() for s in ("train", "val", "test")]
    return ImageFiles([loc.path / "images" / name for names in listed for name in names])


# ---------------------------------------------------------------------------------------------------------------
# Places365 (torchvision layout): <data_root>/places365/{categories_places365.txt, places365_val.txt, val_256/}
def _places365_locate(
    root: Path,
    split: str,
    path: str | None = None,
    source_split: str = "val",
    small: bool = True,
    list_file: str | None = None,
    list_root: str | None = None,
    download: bool = False,
) -> Located:
    if list_file is not None:
        return _locate_list("places365", root, split, list_file, list_root)
    _check_split("places365", split, ("test",), _OOD_SPLIT_HINT)
    if source_split not in ("val", "test"):
        raise ValueError(f"places365: source_split must be 'val' or 'test', got '{source_split}'")
    folder = resolve_path(root, path, "places365")
    images = f"{source_split}_{'256' if small else 'large'}"
    devkit = tvd.Places365._BASE_URL + tvd.Places365._DEVKIT_META["standard"][0]
    archive = tvd.Places365._BASE_URL + tvd.Places365._IMAGES_META[(source_split, small)][0]
    how = f"get {devkit} and {archive} and extract both there, or set download: true"
    lists = dict([tvd.Places365._CATEGORIES_META, tvd.Places365._FILE_LIST_META[source_split]])
    listing = folder / tvd.Places365._FILE_LIST_META[source_split][0]
    needed = [*(folder / f for f in lists), folder / images, *_first_and_last(listing, folder / images)]
    return _require("places365", folder, needed, how, download, lists)


@_register("places365", _places365_locate)
def places365(
    root: Path,
    split: str,
    path: str | None = None,
    source_split: str = "val",
    small: bool = True,
    list_file: str | None = None,
    list_root: str | None = None,
    download: bool = False,
) -> Dataset:
    """Places365 (torchvision): the 36,500 ``val`` images by default, or the 328,500 ``test`` ones.

    Most OOD papers use a fixed 10,000-image subset: pin it with ``list_file``.
    """
    if list_file is not None:
        return _list_dataset("places365", root, split, list_file, list_root)
    folder = _places365_locate(root, split, path, source_split, small, list_file, list_root, download).path
    dataset = _tv_open(
        "places365", folder, lambda: tvd.Places365(str(folder), split=source_split, small=small, download=download)
    )
    return ImageFiles([path for path, _ in dataset.imgs])  # OOD: labels -1 (the test list has none: None)


# ---------------------------------------------------------------------------------------------------------------
# Image-folder OOD sets: <data_root>/<name>/ holding the images at any depth
_ODIN = "github.com/facebookresearch/odin (the ODIN / energy-OOD release)"
_MOS = "github.com/deeplearning-wisc/large_scale_ood (MOS release, 10,000 images, classes disjoint from ImageNet-1K)"
_OPENOOD = (
    "OpenOOD v1.5's images_largescale/{src} (scripts/download/download.py of github.com/Jingkang50/OpenOOD); "
    "pin OpenOOD's subset with list_file: benchmark_imglist/imagenet/test_{src}.txt"
)
_FOLDER_SETS = {
    "lsun_c": f"extract LSUN.tar.gz (LSUN crop, 10,000 36x36 images) from {_ODIN} there",
    "lsun_r": f"extract LSUN_resize.tar.gz (LSUN resize, 10,000 32x32 images) from {_ODIN} there",
    "isun": f"extract iSUN.tar.gz (8,925 32x32 images) from {_ODIN} there",
    "inaturalist": f"extract iNaturalist.tar.gz from {_MOS} there",
    "sun": f"extract SUN.tar.gz from {_MOS} there",
    "places": f"extract Places.tar.gz from {_MOS} there",
    "ssb_hard": "put SSB-hard (Vaze et al., ICLR 2022, from ImageNet-21K) there: " + _OPENOOD.format(src="ssb_hard"),
    "ninco": "put NINCO (Bitterwolf et al., ICML 2023, github.com/j-cb/NINCO) there: " + _OPENOOD.format(src="ninco"),
    "openimage_o": "put OpenImage-O (Wang et al., ViM, CVPR 2022) there: " + _OPENOOD.format(src="openimage_o"),
}


def _folder_set(name: str, how: str) -> None:
    def locate(
        root: Path, split: str, path: str | None = None, list_file: str | None = None, list_root: str | None = None
    ) -> Located:
        if list_file is not None:
            return _locate_list(name, root, split, list_file, list_root)
        _check_split(name, split, ("test",), _OOD_SPLIT_HINT)
        folder = resolve_path(root, path, name)
        images = _images_in(folder, name)
        if not images:
            raise DatasetNotFoundError(name, folder, f"no images there; {how} (any sub-folder depth)")
        return Located(folder, images=images)

    def factory(
        root: Path, split: str, path: str | None = None, list_file: str | None = None, list_root: str | None = None
    ) -> Dataset:
        if list_file is not None:
            return _list_dataset(name, root, split, list_file, list_root)
        return ImageFiles(locate(root, split, path).images)

    factory.__doc__ = f"OOD image folder ``<data_root>/{name}/`` (every image below it, labels -1)."
    _register(name, locate)(factory)


for _name, _how in _FOLDER_SETS.items():
    _folder_set(_name, _how)


def _imagelist_locate(root: Path, split: str, list_file: str, list_root: str | None = None) -> Located:
    return _locate_list("imagelist", root, split, list_file, list_root)


@_register("imagelist", _imagelist_locate)
def imagelist(root: Path, split: str, list_file: str, list_root: str | None = None) -> Dataset:
    """Any OpenOOD-style image list (``path [label]`` per line), e.g. ``{name: imagelist, alias: tin_val, ...}``."""
    return _list_dataset("imagelist", root, split, list_file, list_root)


# ---------------------------------------------------------------------------------------------------------------
# TinyImageNet: <data_root>/tinyimagenet/ = the extracted tiny-imagenet-200/ (train/, val/, test/)
_TIN_HOW = (
    "get http://cs231n.stanford.edu/tiny-imagenet-200.zip and extract it there; OpenOOD's near-OOD subset "
    "(classes overlapping CIFAR removed) is pinned with list_file: benchmark_imglist/cifar10/test_tin.txt"
)


def _tinyimagenet_locate(
    root: Path, split: str, path: str | None = None, list_file: str | None = None, list_root: str | None = None
) -> Located:
    if list_file is not None:
        return _locate_list("tinyimagenet", root, split, list_file, list_root)
    _check_split("tinyimagenet", split, ("train", "test"), _OOD_SPLIT_HINT)
    folder = resolve_path(root, path, "tinyimagenet")
    if (folder / "tiny-imagenet-200").is_dir():  # the zip extracted into the folder
        folder = folder / "tiny-imagenet-200"
    sub = folder / ("train" if split == "train" else "val")
    images = _images_in(sub, "tinyimagenet")
    if not images:
        raise DatasetNotFoundError("tinyimagenet", sub, f"no images there; {_TIN_HOW}")
    return Located(sub, images=images)


@_register("tinyimagenet", _tinyimagenet_locate)
def tinyimagenet(
    root: Path, split: str, path: str | None = None, list_file: str | None = None, list_root: str | None = None
) -> Dataset:
    """TinyImageNet (200 ImageNet classes, 64x64): ``test`` = the 10,000 ``val/`` images, ``train`` = ``train/``."""
    if list_file is not None:
        return _list_dataset("tinyimagenet", root, split, list_file, list_root)
    return ImageFiles(_tinyimagenet_locate(root, split, path).images)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet: <data_root>/imagenet/{train,val}/<wnid>/*.JPEG (val sorted into class folders)
_IMAGENET_HOW = (
    "it needs ILSVRC-2012 train/ and val/ with one folder per wnid (sort val with the devkit's ground truth, "
    "e.g. the valprep.sh script of the PyTorch ImageNet example, or torchvision.datasets.ImageNet once)"
)


def imagenet_subset_wnids(num_classes: int, seed: int = IMAGENET_SUBSET_SEED) -> list[str]:
    """The ID classes of GReg's ImageNet protocol, in label order.

    The official code draws ``perm = np.random.permutation(1000)`` after ``np.random.seed(1993)``; class ``i`` of
    the sorted wnids is in-distribution iff ``perm[i] < num_classes``, with label ``perm[i]``. The remaining
    classes form the auxiliary outlier pool.

    Example:
        >>> imagenet_subset_wnids(3)
        ['n02396427', 'n04141975', 'n02834397']
    """
    perm = np.random.RandomState(seed).permutation(len(IMAGENET_WNIDS))  # same stream as np.random.seed(seed)
    return [IMAGENET_WNIDS[i] for i in np.argsort(perm)[:num_classes]]


def _imagenet_classes(name: str, root: Path, split: str, path: str | None, wnids: Sequence[str]) -> Located:
    """The locate of ImageNet: the class folders are there, and their images as the reader lists them (none read)."""
    folder = _imagenet_folder(name, root, split, path, wnids)
    _read_classes(name, folder, wnids)  # a broken link is named here, not when it is read (val: after training)
    return Located(folder)


def _imagenet_folder(name: str, root: Path, split: str, path: str | None, wnids: Sequence[str]) -> Path:
    _check_split(name, split, ("train", "test"))
    folder = resolve_path(root, path, "imagenet") / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DatasetNotFoundError(name, folder, _IMAGENET_HOW)
    missing = [w for w in wnids if not (folder / w).is_dir()]
    if missing:
        how = f"{len(missing)} of its {len(wnids)} class folders are missing (e.g. {', '.join(missing[:3])}); "
        raise DatasetNotFoundError(name, folder, how + _IMAGENET_HOW)
    return folder


def _read_classes(name: str, folder: Path, wnids: Sequence[str]) -> Dataset:
    """The images of the given class folders, labelled by their position in ``wnids``."""
    from gradreg.data.outliers import ImageFolderDataset  # outliers imports this module

    return ImageFolderDataset(folder, classes=list(wnids), name=name)


def _imagenet1k_locate(
    root: Path, split: str, path: str | None = None, list_file: str | None = None, list_root: str | None = None
) -> Located:
    if list_file is not None:
        return _locate_list("imagenet1k", root, split, list_file, list_root)
    return _imagenet_classes("imagenet1k", root, split, path, IMAGENET_WNIDS)


@_register("imagenet1k", _imagenet1k_locate)
def imagenet1k(
    root: Path, split: str, path: str | None = None, list_file: str | None = None, list_root: str | None = None
) -> Dataset:
    """ImageNet-1K (ILSVRC-2012): ``train`` = ``train/``, ``test`` = the 50,000 ``val/`` images.

    Labels are the indices of the sorted wnids (torchvision's class order). With ``list_file`` (e.g. OpenOOD's
    ``benchmark_imglist/imagenet/{split}_imagenet.txt``) the listed images and labels are used.
    """
    if list_file is not None:
        return _list_dataset("imagenet1k", root, split, list_file, list_root)
    return _read_classes(
        "imagenet1k", _imagenet_folder("imagenet1k", root, split, path, IMAGENET_WNIDS), IMAGENET_WNIDS
    )


def _imagenet_subset(n: int) -> None:
    name = f"imagenet{n}"

    def locate(root: Path, split: str, path: str | None = None) -> Located:
        return _imagenet_classes(name, root, split, path, imagenet_subset_wnids(n))

    def factory(root: Path, split: str, path: str | None = None) -> Dataset:
        wnids = imagenet_subset_wnids(n)
        return _read_classes(name, _imagenet_folder(name, root, split, path, wnids), wnids)

    factory.__doc__ = f"GReg's ImageNet-{n}: the {n} classes of :func:`imagenet_subset_wnids` (labels 0..{n - 1})."
    _register(name, locate)(factory)


for _n in IMAGENET_SUBSETS:
    _imagenet_subset(_n)
