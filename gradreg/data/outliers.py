"""Auxiliary outlier pools and the deterministic, resumable candidate stream that feeds the outlier samplers.

Pools, registered in :data:`gradreg.data.datasets.DATASETS` (items are ``(image, label)``; the datamodule applies
the ID training transform, i.e. the ID normalization and the augmentation of the papers):

- ``tinyimages300k``: the 300,000 "random images" of Outlier Exposure (Hendrycks et al., ICLR 2019), the file
  ``300K_random_images.npy`` (uint8, N x 32 x 32 x 3) used as the auxiliary set by energy-OOD, POEM, DOS and GReg
  (GReg: Sharifi et al., ECCV 2024, arXiv:2404.12368; DOS: Jiang et al., ICLR 2024, arXiv:2306.02031). The file
  is memory-mapped (``allow_pickle=False``), never loaded whole, and re-opened in every worker process.
- ``imagefolder``: every image of a ``root/<class>/**/<image>`` tree (label = index of the class).
- ``imagefolder_complement``: every image of such a tree whose class is NOT in a class list, i.e. the rest of
  ImageNet-1K when the ID set is a class subset, as GReg's ImageNet experiments do (``datasets/imagenetUtil.py``
  of github.com/o4lc/Greg-OOD).
- ``digits_outliers`` (the quickstart's digits 6 and 7) lives in :mod:`gradreg.data.datasets`.

:class:`ImageFolderDataset` is the reusable reader behind the two folder pools (also fit for OOD test folders).

Candidate stream (:class:`OutlierStream`). GReg/DOS draw, per epoch, a random subset of ``size_candidate_ood``
pool images and consume it in order, one candidate batch per training step. Here the stream is an endless
sequence of candidate batches indexed by **position** = the number of training batches consumed before it:

- Positions are grouped into *passes*. A pass is a fresh random ordering (seeded by ``(seed, segment, pass)``)
  of ``candidates_per_epoch`` images of the pool (all of it by default), cut into ``batch_size`` blocks; the
  remainder of a pass is dropped. Under DDP each pass is split between the ranks: block ``b * world + rank`` goes
  to ``rank``, so ranks draw disjoint candidates. When ``candidates_per_epoch = outlier batch size x ID batches
  per epoch`` (GReg's sizing), a pass is exactly a training epoch.
- The batch at a position is a pure function of ``(seed, position, rank, world size, candidates_per_epoch,
  restriction)``. Nothing depends on Lightning's epoch counter, on how Lightning chops the stream into loader
  iterations, on prefetching or on worker processes. ``advance()`` (called by the datamodule once per consumed
  training batch) moves the position; ``state_dict()`` saves it, so a run resumed from a mid-epoch checkpoint
  draws exactly the candidates the uninterrupted run drew.
- Each drawn candidate also gets an augmentation seed, drawn per pass from ``(seed, segment, pass)``: the loader's
  items are ``(pool index, seed)`` and :class:`~gradreg.data.datasets.Transformed` augments with that seed, so
  the augmented pixels are as deterministic as the indices.
- :meth:`OutlierStream.restrict` (NTOM's per-epoch mining) starts a new *segment* at the current position:
  later positions draw only from the given pool indices (with new pass orderings); the segment is saved too.

Why a sampler and not an ``IterableDataset``: the DataLoader's dataset is the pool itself (map-style), and
:meth:`OutlierStream.dataloader` gives it a sampler that runs in the main process and yields, batch by batch,
the pool indices of positions ``p, p + 1, ...`` starting at the stream's position when the loader is
(re-)iterated (Lightning's ``max_size_cycle`` re-iterates a shorter loader within an epoch). Worker processes
only load images by index, so they hold no stream state (persistent workers are fine) and cannot break
determinism. An ``IterableDataset`` would have to run the stream inside the workers, where a persistent worker's
copy never sees the main process's position or restriction. The sampler subclasses ``DistributedSampler`` (it
shards by rank itself): under DDP with ``use_distributed_sampler=True`` Lightning leaves a ``DistributedSampler``
alone (``DataConnector._requires_distributed_sampler``, lightning 2.6), whereas any other sampler would be
wrapped in a ``DistributedSamplerWrapper`` that re-shuffles and re-shards it. Lightning's ``set_epoch`` calls
are recorded but not needed.

Lightning facts this relies on (checked in lightning 2.6.6): a sized ``CombinedLoader`` fetches no batch ahead
(``_PrefetchDataFetcher`` prefetches only when the length is unknown), so when a loader is (re-)iterated every
earlier batch has been consumed and the position is exact. ``max_size_cycle`` runs until *every* loader is
exhausted once, so the outlier loader must not be longer than the ID loader: pass ``max_batches`` (per rank)
to :meth:`OutlierStream.dataloader`, or size ``candidates_per_epoch``, so that the ID loader sets the epoch.
With ``num_workers > 0`` a DataLoader draws ``2 * num_workers`` batches of indices as soon as it is iterated, and
Lightning creates the first epoch's iterator before ``on_train_epoch_start``: a per-epoch restriction (NTOM, POEM)
is therefore made in :attr:`OutlierStream.on_iteration_start` when the iteration starts an epoch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gradreg.data.benchmarks import IMAGE_EXTENSIONS, Located, read_image, resolve_path, walk_images
from gradreg.data.datasets import DATASETS, DatasetFileError, DatasetNotFoundError, augmentation_seeds

__all__ = ["ImageArray", "ImageFolderDataset", "OutlierStream", "read_class_list"]

logger = logging.getLogger(__name__)

TINYIMAGES_FILE = "300K_random_images.npy"
TINYIMAGES_HOW = (
    "download 300K_random_images.npy (the Outlier Exposure release, "
    "https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy) and put it there, or set path"
)


def check_image_array(path: Path, name: str, how: str = TINYIMAGES_HOW) -> tuple[int, ...]:
    """The shape of the uint8 ``(N, H, W, C)`` array in the ``.npy`` file ``path``, read from its header only.

    A missing file raises :class:`DatasetNotFoundError`; another layout and a truncated download (the header promises
    more bytes than the file holds) its :class:`DatasetFileError`, so ``python -m gradreg.data check`` reports them
    before a run. ``how`` says how to get the file.
    """
    if not path.is_file():
        raise DatasetNotFoundError(name, path, how)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            data_start = f.tell()
    except ValueError as err:
        raise DatasetFileError(name, path, f"not a .npy file ({err}); {how}") from None
    except OSError as err:  # e.g. no read permission
        raise DatasetFileError(name, path, f"cannot be read ({err.strerror})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or 0 in shape[1:3]:
        raise DatasetFileError(
            name, path, f"expected a uint8 array (N, H, W, C) of images, C in (1, 3), got {dtype} {shape}"
        )
    size, expected = path.stat().st_size, data_start + int(np.prod(shape))
    if size < expected:
        raise DatasetFileError(name, path, f"the file is truncated ({size} of {expected} bytes); download it again")
    return tuple(shape)


# ---------------------------------------------------------------------------------------------------------------
# Pools
class ImageArray(Dataset):
    """A uint8 image array ``(N, H, W, C)`` in a ``.npy`` file, memory-mapped; items are ``(HWC array, -1)``.

    The map is opened lazily in each process (a pickled memory map would carry the whole array to every
    DataLoader worker), with ``allow_pickle=False``.

    Args:
        path: the ``.npy`` file (TinyImages-300K: ``300K_random_images.npy``, 300,000 x 32 x 32 x 3).
        name: dataset name for error messages.
        how: how to get the file, for error messages.
    """

    def __init__(self, path: str | os.PathLike[str], name: str = "tinyimages300k", how: str = TINYIMAGES_HOW) -> None:
        self.path = Path(path)
        self.shape: tuple[int, ...] = check_image_array(self.path, name, how)
        self._array: np.ndarray | None = self._open()

    def _open(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if self._array is None:
            self._array = self._open()
        return np.array(self._array[i]), -1  # a copy: torch cannot wrap a read-only memory map


def _tinyimages_locate(root: Path, split: str, path: str | None = None) -> Located:
    file = resolve_path(root, path, f"tinyimages300k/{TINYIMAGES_FILE}")
    file = file / TINYIMAGES_FILE if file.is_dir() else file
    check_image_array(file, "tinyimages300k")
    return Located(file)


@DATASETS.register("tinyimages300k")
def tinyimages300k(root: Path, split: str, path: str | None = None) -> Dataset:
    """TinyImages-300K (the split is ignored): ``path`` = the ``.npy`` file or its folder.

    Default ``<data_root>/tinyimages300k/300K_random_images.npy``; a relative ``path`` is relative to the data root.
    """
    return ImageArray(_tinyimages_locate(root, split, path).path)


tinyimages300k.locate = _tinyimages_locate  # type: ignore[attr-defined]


def read_class_list(file: str | os.PathLike[str]) -> list[str]:
    """Class names / wnids from a text file: the first word of each line; blank lines and ``#`` comments skip."""
    names = []
    for raw in Path(file).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    return names


class ImageFolderDataset(Dataset):
    """Images of a ``root/<class>/**/<image>`` tree, read with PIL and converted to ``mode`` (RGB by default).

    Classes are the sub-folders of ``root`` in sorted order; labels are indices into :attr:`classes` (the sorted
    included classes). Hidden files and folders are skipped; links are followed, except one back to a folder above
    it; an image that is a broken link, and a class folder without images, raise :class:`DatasetNotFoundError`
    naming them. File names are kept in one numpy byte array, so an ImageNet-sized tree costs tens of MB and does not
    grow in forked workers.

    Args:
        root: the tree's root folder.
        classes: the class folders to read (``None`` = all of them); every one must exist.
        exclude: class folders to leave out (applied after ``classes``); every one must exist.
        extensions: image file extensions (lower case, with the dot).
        mode: PIL mode of the returned images.
        name: dataset name for error messages.

    Example:
        >>> ds = ImageFolderDataset("/data/imagenet/train", exclude=["n01443537"])  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        classes: Sequence[str] | None = None,
        exclude: Collection[str] = (),
        extensions: Collection[str] = IMAGE_EXTENSIONS,
        mode: str = "RGB",
        name: str = "imagefolder",
    ) -> None:
        self.root, self.mode = Path(root), mode
        available = _class_folders(self.root, name)
        known = set(available)
        unknown = [c for c in [*(classes or []), *exclude] if c not in known]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ValueError(
                f"dataset '{name}': class folder(s) {', '.join(unknown[:5])}{more} not found under {self.root} "
                f"(it has {len(available)} class folders, e.g. {', '.join(available[:3])})"
            )
        excluded = set(exclude)
        self.classes = [c for c in (classes if classes is not None else available) if c not in excluded]
        files: list[bytes] = []
        labels: list[int] = []
        suffixes = {e.lower() for e in extensions}
        empty: list[str] = []  # class folders without images
        for label, cls in enumerate(self.classes):
            before = len(files)
            for dirpath, images in walk_images(self.root / cls, name, suffixes):
                rel = os.path.relpath(dirpath, self.root)
                files += [os.fsencode(os.path.join(rel, f)) for f in images]
                labels += [label] * len(images)
            if len(files) == before:
                empty.append(cls)
        if not files:
            raise DatasetNotFoundError(
                name, self.root, f"no images ({', '.join(sorted(suffixes))}) in the {len(self.classes)} class folders"
            )
        if empty:  # e.g. ImageNet's val/ after a failed valprep.sh: a class the test would never see
            more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
            how = f"{len(empty)} of its {len(self.classes)} class folders hold no images: {', '.join(empty[:5])}{more}"
            raise DatasetNotFoundError(name, self.root, f"{how}; extract them again (ImageNet's val/: sort it again)")
        self._files = np.array(files, dtype=np.bytes_)
        self.labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._files)

    def file(self, i: int) -> Path:
        """Path of image ``i``."""
        return self.root / os.fsdecode(self._files[i])

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return read_image(self.file(i), self.mode), int(self.labels[i])


def _class_folders(root: Path, name: str) -> list[str]:
    if not root.is_dir():
        how = "expected a folder with one sub-folder of images per class (ImageNet: ILSVRC-2012's train/, docs/data.md)"
        raise DatasetNotFoundError(name, root, how)
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DatasetNotFoundError(name, root, "the folder has no class sub-folders (root/<class>/<image>)")
    return folders


def _imagefolder_path(root: Path, split: str, path: str | None) -> Path:
    if path is None:
        raise ValueError("dataset 'imagefolder' needs path: the folder holding one sub-folder per class")
    return resolve_path(root, path.replace("{split}", split), "")


def _imagefolder_locate(root: Path, split: str, path: str | None = None) -> Located:
    folder = _imagefolder_path(root, split, path)
    ImageFolderDataset(folder)  # lists the tree (images are not read): a broken link is reported as the reader does
    return Located(folder)


@DATASETS.register("imagefolder")
def imagefolder(root: Path, split: str, path: str | None = None) -> Dataset:
    """Every image of ``path/<class>/**`` (labels = sorted class index); a ``{split}`` in ``path`` becomes the split."""
    return ImageFolderDataset(_imagefolder_path(root, split, path))


imagefolder.locate = _imagefolder_locate  # type: ignore[attr-defined]


def _complement_classes(
    root: Path, path: str | None, id_classes_file: str | None, id_classes: Sequence[str] | None
) -> tuple[Path, list[str]]:
    """The tree and its ID classes to leave out (from the list file and/or the inline list)."""
    name = "imagefolder_complement"
    folder = resolve_path(root, path, "imagenet/train")
    listed = list(id_classes or [])
    if id_classes_file is not None:
        file = Path(id_classes_file).expanduser()
        if not file.is_absolute():
            file = file if file.is_file() else resolve_path(root, id_classes_file, "")
        if not file.is_file():
            raise DatasetNotFoundError(name, file, "the id_classes_file does not exist (relative to data_root or cwd)")
        listed += read_class_list(file)
    if not listed:
        raise ValueError(f"dataset '{name}' needs id_classes_file (one ID class folder / wnid per line) or id_classes")
    available = _class_folders(folder, name)
    unknown = sorted(set(listed) - set(available))
    if unknown:
        raise ValueError(
            f"dataset '{name}': {len(unknown)} listed ID class(es) are not folders of {folder}, e.g. "
            f"{', '.join(unknown[:5])}; the class list must name the tree's class folders"
        )
    if len(set(listed)) == len(available):
        raise ValueError(f"dataset '{name}': the class list covers every class of {folder}; nothing is left")
    return folder, listed


def _complement_locate(
    root: Path,
    split: str,
    path: str | None = None,
    id_classes_file: str | None = None,
    id_classes: list[str] | None = None,
) -> Located:
    folder, listed = _complement_classes(root, path, id_classes_file, id_classes)
    ImageFolderDataset(folder, exclude=sorted(set(listed)), name="imagefolder_complement")  # as the reader lists it
    return Located(folder, f"all classes but the {len(set(listed))} ID classes")


@DATASETS.register("imagefolder_complement")
def imagefolder_complement(
    root: Path,
    split: str,
    path: str | None = None,
    id_classes_file: str | None = None,
    id_classes: list[str] | None = None,
) -> Dataset:
    """Every image of an ImageFolder tree whose class is not an ID class (GReg's ImageNet auxiliary set).

    Args:
        root: the data root.
        split: ignored (the pool is the whole tree).
        path: the tree (default ``<data_root>/imagenet/train``; relative = relative to the data root).
        id_classes_file: text file with one ID class folder name (ImageNet: wnid) per line (first word; ``#``
            comments); relative = the working directory if it exists there, else the data root.
        id_classes: the ID classes inline (added to the file's).
    """
    folder, listed = _complement_classes(root, path, id_classes_file, id_classes)
    return ImageFolderDataset(folder, exclude=sorted(set(listed)), name="imagefolder_complement")


imagefolder_complement.locate = _complement_locate  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# Candidate stream
def _dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class OutlierStream:
    """Deterministic, resumable, DDP-disjoint stream of candidate outlier batches (see the module docstring).

    Args:
        pool: the outlier pool, asked for ``(pool index, augmentation seed)`` items; the datamodule wraps it with
            ``Transformed(..., return_index=True)`` so the loader yields ``(x, pool_index)``.
        batch_size: candidates per training step and rank (GReg+: 6 x the ID batch).
        seed: seed of the pass orderings.
        candidates_per_epoch: images per pass over all ranks (GReg's ``size_candidate_ood``): each pass is a fresh
            random subset of this size in random order; ``None`` = the whole pool (or the whole restriction).

    Example:
        >>> from gradreg.data.datasets import ArrayDataset, Transformed
        >>> pool = Transformed(ArrayDataset(torch.zeros(10, 1, 2, 2), torch.zeros(10)), lambda x: x, True)
        >>> stream = OutlierStream(pool, batch_size=4, seed=0)
        >>> [len(idx) for _, idx in stream.dataloader()]
        [4, 4]
    """

    def __init__(self, pool: Dataset, batch_size: int, seed: int = 0, candidates_per_epoch: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if candidates_per_epoch is not None and candidates_per_epoch < batch_size:
            raise ValueError(f"candidates_per_epoch ({candidates_per_epoch}) is smaller than batch_size ({batch_size})")
        self.pool = pool
        self.pool_size = len(pool)  # type: ignore[arg-type]
        if self.pool_size < batch_size:
            raise ValueError(f"the outlier pool has {self.pool_size} images, fewer than one batch ({batch_size})")
        self.batch_size, self.seed, self.candidates_per_epoch = batch_size, seed, candidates_per_epoch
        self._position = 0
        self._segment = 0  # number of restrict() calls
        self._segment_start = 0  # position where the current segment began
        self._indices: Tensor | None = None  # the restriction (sorted unique pool indices), None = whole pool
        self._order_cache: tuple[tuple[int, int], Tensor, np.ndarray] | None = None
        # Called when a loader iteration starts, before its first indices: a loader with workers reads them as soon
        # as its iterator exists, which Lightning creates before on_train_epoch_start in a fit's first epoch.
        self.on_iteration_start: Callable[[], None] | None = None

    # ------------------------------------------------------------------ positions and passes
    @property
    def position(self) -> int:
        """Training batches consumed so far: the position of the next batch."""
        return self._position

    @property
    def restricted_at(self) -> int | None:
        """The position of the last :meth:`restrict` (``None`` before any)."""
        return self._segment_start if self._segment > 0 else None

    @property
    def num_candidates(self) -> int:
        """Size of the set the stream currently draws from (the pool or the restriction)."""
        return self.pool_size if self._indices is None else len(self._indices)

    def pass_size(self) -> int:
        """Images per pass over all ranks."""
        n = self.num_candidates
        return n if self.candidates_per_epoch is None else min(n, self.candidates_per_epoch)

    def batches_per_pass(self, world_size: int | None = None) -> int:
        """Candidate batches per pass on each rank."""
        world = _dist_info()[1] if world_size is None else world_size
        return self.pass_size() // (self.batch_size * world)

    def _pass_order(self, pass_index: int) -> tuple[Tensor, np.ndarray]:
        """The pool indices of one pass in drawing order and their augmentation seeds (cached: drawn from often)."""
        key = (self._segment, pass_index)
        if self._order_cache is None or self._order_cache[0] != key:
            rng = np.random.default_rng([self.seed, self._segment, pass_index])
            order = torch.from_numpy(rng.permutation(self.num_candidates)[: self.pass_size()])
            seeds = augmentation_seeds(self.seed, self._segment, pass_index, n=len(order))
            self._order_cache = (key, order if self._indices is None else self._indices[order], seeds)
        return self._order_cache[1:]

    def batch_indices(self, position: int, rank: int | None = None, world_size: int | None = None) -> Tensor:
        """Pool indices (LongTensor, ``(batch_size,)``) of the candidate batch at ``position`` on ``rank``.

        ``rank`` / ``world_size`` default to the process group's. Positions before the current segment (before
        the last :meth:`restrict`) are no longer defined.
        """
        order, _, where = self._batch(position, rank, world_size)
        return order[where].clone()

    def batch_items(
        self, position: int, rank: int | None = None, world_size: int | None = None
    ) -> list[tuple[int, int]]:
        """``(pool index, augmentation seed)`` of each candidate of :meth:`batch_indices`: the loader's items."""
        order, seeds, where = self._batch(position, rank, world_size)
        return list(zip(order[where].tolist(), seeds[where].tolist(), strict=True))

    def _batch(self, position: int, rank: int | None, world_size: int | None) -> tuple[Tensor, np.ndarray, slice]:
        """The pass of the batch at ``position`` on ``rank`` (its order and seeds) and the batch's slice of it."""
        default_rank, default_world = _dist_info()
        rank = default_rank if rank is None else rank
        world = default_world if world_size is None else world_size
        per_pass = self.batches_per_pass(world)
        if per_pass == 0:
            raise ValueError(
                f"the outlier stream draws from {self.pass_size()} images per pass, fewer than one batch of "
                f"{self.batch_size} for each of {world} rank(s); lower outlier_batch_size or use a larger pool"
            )
        offset = position - self._segment_start
        if offset < 0 or not 0 <= rank < world:
            raise ValueError(f"position {position} / rank {rank} of {world} is outside the current segment")
        pass_index, block = divmod(offset, per_pass)
        start = (block * world + rank) * self.batch_size
        return *self._pass_order(pass_index), slice(start, start + self.batch_size)

    # ------------------------------------------------------------------ the API the datamodule uses
    def dataloader(
        self,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_batches: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        drawn: int = 0,
    ) -> DataLoader:
        """A loader of ``(x, pool_index)`` batches of ``batch_size`` (drop_last) from the current position on.

        Every iteration starts where the stream stands when it starts (re-iterating continues the stream).

        Args:
            num_workers: loader worker processes (persistent: they only read images by index).
            pin_memory: pin batches in page-locked memory.
            max_batches: batches per iteration on each rank (default: one pass). Keep it at most the per-rank ID
                batches per epoch so that Lightning's ``max_size_cycle`` keeps the ID loader's epoch length.
            rank: this process's rank (default: the process group's; for tests and non-Lightning use).
            world_size: number of ranks (default: the process group's).
            drawn: batches of the first iteration already drawn before a checkpoint (a run resumed inside an epoch):
                the iteration that starts at the current position yields only the rest of ``max_batches``.
        """
        sampler = _StreamSampler(self, max_batches, rank, world_size, drawn)
        self.batch_indices(self._position, sampler.rank, sampler.num_replicas)  # fail now if a pass is too small
        return TrainingLoader(
            self.pool,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            generator=torch.Generator(),  # not the global RNG (see OODDataModule._loader)
        )

    def advance(self) -> None:
        """Count one consumed training batch (the datamodule calls this once per training step)."""
        self._position += 1

    def restrict(self, indices: Tensor | None) -> None:
        """Draw only from these pool indices from the current position on (``None`` = the whole pool again).

        Starts a new segment (new pass orderings); duplicates are dropped.
        """
        if indices is not None:
            indices = torch.as_tensor(indices).detach().to("cpu", torch.int64).flatten().unique()
            if len(indices) and (indices[0] < 0 or indices[-1] >= self.pool_size):
                raise ValueError(f"restrict(): indices must lie in [0, {self.pool_size}), the pool's size")
            if len(indices) < self.batch_size:
                raise ValueError(f"restrict(): {len(indices)} indices are fewer than one batch ({self.batch_size})")
        self._indices = indices
        self._segment += 1
        self._segment_start = self._position
        self._order_cache = None

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to draw the same candidates (tensors and ints only)."""
        return {
            "version": 1,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "candidates_per_epoch": self.candidates_per_epoch,
            "pool_size": self.pool_size,
            "position": self._position,
            "segment": self._segment,
            "segment_start": self._segment_start,
            "indices": None if self._indices is None else self._indices.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a changed pool size is an error, other changed settings a warning."""
        if state.get("pool_size", self.pool_size) != self.pool_size:
            raise ValueError(
                f"the checkpoint's outlier stream drew from a pool of {state['pool_size']} images, this pool has "
                f"{self.pool_size}: the same outliers cannot be drawn"
            )
        changed = [
            k for k in ("seed", "batch_size", "candidates_per_epoch") if k in state and state[k] != getattr(self, k)
        ]
        if changed:
            logger.warning(
                "outlier stream settings changed since the checkpoint (%s): the resumed run draws different outliers",
                ", ".join(changed),
            )
        indices = state.get("indices")
        self._indices = None if indices is None else torch.as_tensor(indices, dtype=torch.int64).clone()
        self._position = int(state["position"])
        self._segment = int(state.get("segment", 0))
        self._segment_start = int(state.get("segment_start", 0))
        self._order_cache = None


class TrainingLoader(DataLoader):
    """A training loader that tells Lightning it resumes inside an epoch (``state_dict``/``load_state_dict``).

    Where it stands is the datamodule's state, not its own: :class:`~gradreg.data.OODDataModule` checkpoints the
    epoch, the batches taken and the outlier stream's position, and builds its loaders from them. Lightning hands a
    loader its own state only if it restores its loops before it builds the loader, which it does not when a cosine
    schedule asks for the number of steps first. Without these methods Lightning warns that a run resumed inside an
    epoch does not resume exactly, which here it does.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class _StreamSampler(DistributedSampler):
    """Yields, batch by batch, the pool indices of the stream's next positions on this rank.

    A ``DistributedSampler`` only so that Lightning does not wrap it (it shards by rank itself);
    ``DistributedSampler.__init__`` is deliberately not called.
    """

    def __init__(
        self, stream: OutlierStream, max_batches: int | None, rank: int | None, world_size: int | None, drawn: int
    ) -> None:
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be positive, got {max_batches}")
        self.stream, self.max_batches = stream, max_batches
        self._resumed = (stream.position, drawn)  # the resumed iteration starts where the stream stands now
        self._rank, self._world = rank, world_size
        self.epoch, self.seed, self.shuffle, self.drop_last = 0, stream.seed, True, True

    @property
    def rank(self) -> int:  # type: ignore[override]
        return _dist_info()[0] if self._rank is None else self._rank

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return _dist_info()[1] if self._world is None else self._world

    def set_epoch(self, epoch: int) -> None:
        """Record Lightning's epoch (the stream is indexed by position, not by epoch)."""
        self.epoch = epoch

    def num_batches(self) -> int:
        """Batches one iteration yields on this rank."""
        return self.max_batches if self.max_batches is not None else self.stream.batches_per_pass(self.num_replicas)

    def __len__(self) -> int:
        return self.num_batches() * self.stream.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        if self.stream.on_iteration_start is not None:
            self.stream.on_iteration_start()
        start, rank, world = self.stream.position, self.rank, self.num_replicas
        skip = self._resumed[1] if start == self._resumed[0] else 0
        for j in range(self.num_batches() - skip):
            # Computed lazily, batch by batch, so that a restrict() made meanwhile applies to later positions.
            yield from self.stream.batch_items(start + j, rank, world)
