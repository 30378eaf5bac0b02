"""Dataset registry, the embedded default data (scikit-learn digits) and the image transforms.

Every registered factory has the signature ``factory(root: Path, split: str, **settings) -> Dataset``
where ``split`` is ``"train"``, ``"val"`` or ``"test"`` and items are ``(image, label)`` with the image
as a PIL image, an HWC uint8 array or a CHW float tensor in [0, 1]. Transforms (channel conversion,
resizing, augmentation, normalization) are applied by :class:`Transformed`, never by the factory.
A factory whose files are missing raises :class:`DatasetNotFoundError` naming where to put them.

The embedded quickstart data split the 1,797 real 8x8 handwritten digits of
``sklearn.datasets.load_digits`` (UCI, no download) **by class**:

============  ==========  ===========================================================
role          classes     split
============  ==========  ===========================================================
ID            0 1 2 3 4 5  stratified 60 / 20 / 20 % train / val / test (seed 0)
outliers      6 7          auxiliary outlier pool for training (all images)
OOD (near)    8 9          held out: half for per-epoch validation, half for test
OOD (far)     noise        uniform noise images, 256 per split (seed 1 val / 2 test)
============  ==========  ===========================================================
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from gradreg.registry import Bounds, Registry, RegistryError, SettingError, check_settings, numeric_bounds, plain_hints

DATASETS: Registry[Dataset] = Registry("dataset")

DIGITS_ID_CLASSES = (0, 1, 2, 3, 4, 5)
DIGITS_OUTLIER_CLASSES = (6, 7)
DIGITS_OOD_CLASSES = (8, 9)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where they were expected and how to get them."""

    def __init__(self, name: str, expected: Path | str, how: str = "") -> None:
        self.name, self.expected = name, str(expected)
        super().__init__(f"dataset '{name}' not found at {expected}" + (f"; {how}" if how else ""))


class DatasetFileError(DatasetNotFoundError):
    """A dataset's file is there but unusable (not the format, corrupt, truncated); the message says what and the fix.

    A :class:`DatasetNotFoundError`, so that whatever stops on missing data (``check``, ``require_datasets``) stops on
    it too.
    """

    def __init__(self, name: str, path: Path | str, problem: str) -> None:
        FileNotFoundError.__init__(self, f"dataset '{name}' at {path} is unusable: {problem}")
        self.name, self.expected = name, str(path)


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (empty, truncated, not an image); the message names it and the fix.

    Constructed from the message alone, so that a DataLoader worker re-raises it as itself in the main process.
    """

    FIX = "; replace or delete the file (python -m gradreg.data check CONFIG --read-images finds every such file)"


class DatasetSpecError(SettingError):
    """A mistake in the config's dataset specs, not in the files: one line naming the value and the valid ones."""


@dataclass(frozen=True)
class ImageSpec:
    """What an ID dataset implies for the whole pipeline (model input shape and normalization).

    Args:
        num_classes: number of ID classes.
        channels: input channels of the model.
        size: square input size of the model.
        mean: per-channel normalization mean (in [0, 1] pixel units).
        std: per-channel normalization std.
        resize: test-time resize before the center crop (ImageNet: 256 for 224); ``None`` = ``size``.
    """

    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None


# ID datasets register their spec here; the digits statistics are those of the ID training split.
ID_SPECS: dict[str, ImageSpec] = {
    "digits": ImageSpec(num_classes=6, channels=1, size=8, mean=(0.3034,), std=(0.3767,)),
}


class ArrayDataset(Dataset):
    """In-memory images (N, C, H, W) float in [0, 1] with integer labels."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def _digits_subset(classes: Sequence[int], relabel: bool) -> tuple[Tensor, Tensor]:
    images, targets = _digits()
    keep = np.isin(targets, classes)
    labels = targets[keep]
    if relabel:
        labels = np.searchsorted(np.asarray(classes), labels)
    return torch.from_numpy(images[keep]).unsqueeze(1), torch.from_numpy(labels)


def _split_indices(labels: Tensor, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Stratified split of ``range(len(labels))`` into parts of the given fractions."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in fractions]
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        bounds = np.round(np.cumsum([0.0, *fractions]) * len(idx)).astype(int)
        for p, (a, b) in enumerate(itertools.pairwise(bounds)):
            parts[p].append(idx[a:b])
    return [torch.sort(torch.cat(p)).values for p in parts]


@DATASETS.register("digits")
def digits(root: Path, split: str) -> Dataset:
    """ID digits 0-5, relabelled 0..5, stratified 60/20/20 train/val/test."""
    images, labels = _digits_subset(DIGITS_ID_CLASSES, relabel=True)
    train, val, test = _split_indices(labels, (0.6, 0.2, 0.2), seed=0)
    idx = {"train": train, "val": val, "test": test}[split]
    return ArrayDataset(images[idx], labels[idx])


@DATASETS.register("digits_outliers")
def digits_outliers(root: Path, split: str) -> Dataset:
    """Auxiliary outliers: every image of digits 6 and 7 (the split is ignored)."""
    return ArrayDataset(*_digits_subset(DIGITS_OUTLIER_CLASSES, relabel=False))


@DATASETS.register("digits_heldout")
def digits_heldout(root: Path, split: str) -> Dataset:
    """Held-out OOD digits 8 and 9: a stratified half for ``val``, the other half for ``test``."""
    images, labels = _digits_subset(DIGITS_OOD_CLASSES, relabel=False)
    val, test = _split_indices(labels, (0.5, 0.5), seed=0)
    idx = val if split == "val" else test
    return ArrayDataset(images[idx], labels[idx])


@DATASETS.register("noise")
def noise(
    root: Path,
    split: str,
    num: int = 256,
    size: int = 32,
    channels: int = 3,
    kind: Literal["uniform", "gaussian"] = "uniform",
) -> Dataset:
    """Synthetic far-OOD set: ``uniform`` noise in [0, 1] or ``gaussian`` noise (mean 0.5, std 0.25, clipped)."""
    gen = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
    shape = (num, channels, size, size)
    if kind == "uniform":
        images = torch.rand(shape, generator=gen)
    elif kind == "gaussian":
        images = (0.5 + 0.25 * torch.randn(shape, generator=gen)).clamp(0, 1)
    else:
        raise ValueError(f"unknown noise kind '{kind}'; known: gaussian, uniform")
    return ArrayDataset(images, torch.full((num,), -1))


# scikit-image's bundled photographs and textures (no download): natural-image outliers for small ID sets.
PHOTO_NAMES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "horse",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket",
)  # fmt: skip


class PhotoPatches(Dataset):
    """Random square crops of scikit-image's bundled photographs; item ``i`` is a deterministic function of ``i``.

    Args:
        images: the source images (HW or HWC uint8 arrays).
        num: number of patches.
        min_size: smallest crop side in pixels (the largest is the image's short side).
        seed: seed of the crop positions (the ``test`` split uses another seed, so its patches differ).
    """

    def __init__(self, images: Sequence[np.ndarray], num: int, min_size: int, seed: int) -> None:
        self.images, self.num, self.min_size, self.seed = list(images), num, min_size, seed

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, i])
        k = int(rng.integers(len(self.images)))
        image = self.images[k]
        h, w = image.shape[:2]
        side = int(rng.integers(min(self.min_size, h, w), min(h, w) + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = image[top : top + side, left : left + side]
        return np.ascontiguousarray(crop[..., :3] if crop.ndim == 3 else crop[..., None]), k


@DATASETS.register("photo_patches")
def photo_patches(root: Path, split: str, num: int = 50000, min_size: int = 16, seed: int = 0) -> Dataset:
    """Crops of the 16 photographs and textures bundled with scikit-image: offline auxiliary outliers.

    Needs ``pip install scikit-image`` (the ``photos`` extra). Train and test use different crop seeds.
    """
    try:
        import skimage.data
    except ImportError:
        raise DatasetNotFoundError("photo_patches", "the scikit-image package", "pip install scikit-image") from None
    images = [getattr(skimage.data, name)() for name in PHOTO_NAMES]
    return PhotoPatches(images, num, min_size, seed + (0 if split == "train" else 1_000_003))


class ToChannels(torch.nn.Module):
    """Convert a CHW image to ``channels`` channels (RGB -> luma, or grayscale repeated)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if x.shape[-3] == self.channels:
            return x
        if self.channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype)[: x.shape[-3]]
            return (x * (weights / weights.sum()).view(-1, 1, 1)).sum(-3, keepdim=True)
        return x[..., :1, :, :].expand(*x.shape[:-3], self.channels, *x.shape[-2:]).clone()


def build_transform(spec: ImageSpec, augment: str = "none", resize: bool = True) -> Callable[[Any], Tensor]:
    """Image -> normalized float tensor of shape (channels, size, size).

    Args:
        spec: the ID image spec (every set, ID or OOD, goes through the ID normalization).
        augment: ``"none"`` (evaluation: resize + center crop), ``"crop"`` (random crop with
            ``size // 8`` padding), ``"crop_flip"`` (plus horizontal flip: the CIFAR recipe of the
            energy/GReg code), or ``"imagenet"`` (random resized crop + flip).
        resize: ``False`` skips the resize before the center crop (an OOD set's ``resize: false``, e.g. GReg's
            ``CenterCrop(32)`` of the 36x36 LSUN-C images).
    """
    ops: list[Callable] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), ToChannels(spec.channels)]
    if augment == "imagenet":
        ops += [v2.RandomResizedCrop(spec.size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        if resize:
            ops.append(v2.Resize(spec.resize or spec.size, antialias=True))
        ops.append(v2.CenterCrop(spec.size))
        if augment in ("crop", "crop_flip"):
            ops.append(v2.RandomCrop(spec.size, padding=max(1, spec.size // 8)))
        if augment == "crop_flip":
            ops.append(v2.RandomHorizontalFlip())
        elif augment not in ("none", "crop"):
            raise ValueError(f"unknown augment '{augment}'; known: crop, crop_flip, imagenet, none")
    ops.append(v2.Normalize(list(spec.mean), list(spec.std)))
    return v2.Compose(ops)


class Transformed(Dataset):
    """Apply ``transform`` to the images of ``dataset``; with ``return_index`` yield ``(x, index)``.

    An item may be asked for as ``(index, seed)``: the transform's random draws (crops, flips) then come from a
    generator seeded with ``seed``, not from the reading process's, so the training samplers make each augmentation
    a function of the run's seeds and the sample's place in the run (the same with or without worker processes,
    on any number of ranks, and after a resume).
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Tensor], return_index: bool = False) -> None:
        self.dataset, self.transform, self.return_index = dataset, transform, return_index

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.dataset[i]
        target = i if self.return_index else label
        if seed is None:
            return self.transform(image), target
        # torchvision's transforms draw from the global CPU generator: seed it for this item and put its state back
        # (torch.fork_rng and torch.manual_seed cost ~100 us an item, these calls ~3 us).
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.transform(image), target
        finally:
            torch.set_rng_state(state)


def augmentation_seeds(*key: int, n: int) -> np.ndarray:
    """``n`` per-sample augmentation seeds (for :class:`Transformed`), a pure function of the ints ``key``.

    The spawn key keeps them apart from other draws from the same key (the outlier stream orders a pass with
    ``default_rng(key)``); 32 bits, because torch's CPU generator keeps only a seed's low 32 bits.
    """
    return np.random.default_rng(np.random.SeedSequence(list(key), spawn_key=(1,))).integers(2**32, size=n)


DEFAULT_OOD_SETS = ["digits_heldout", "noise"]  # OOD sets of a datamodule without data.ood_sets: the embedded ones
SIZES: Bounds = {"num": (">=", 1), "size": (">=", 1), "channels": (">=", 1), "min_size": (">=", 1)}  # of readers
SPEC_KEYS = ("name", "alias", "split", "resize")  # the keys of every spec; build_dataset keeps them from the reader
_READER_ARGS = ("root", "split")  # every reader's first arguments: the datamodule passes them, not the spec


def spec_keys(name: str) -> list[str]:
    """Every key a spec of dataset ``name`` may have: :data:`SPEC_KEYS`, then its reader's settings."""
    return [*SPEC_KEYS, *(s for s in DATASETS.settings(name) if s not in _READER_ARGS)]


def required_settings(name: str) -> list[str]:
    """The settings of dataset ``name`` that a spec must give (its reader's arguments without a default)."""
    params = inspect.signature(DATASETS.get(name)).parameters
    return [
        s for s in DATASETS.settings(name) if s not in _READER_ARGS and params[s].default is inspect.Parameter.empty
    ]


def check_spec(spec: Any, role: str = "ood") -> None:
    """Raise :class:`DatasetSpecError` if ``spec`` is no valid spec of a set of ``role`` (``id``, ``outliers``...).

    Only the spec is read, no file: what it finds is a mistake of the config itself.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise DatasetSpecError(f"{spec!r} is not a dataset spec: give a registry name or a mapping with 'name'")
    name = spec["name"]
    if role == "id" and name not in ID_SPECS:  # also a typo: the ID datasets are the choices
        raise DatasetSpecError(f"'{name}' is not an ID dataset; known: {', '.join(sorted(ID_SPECS))}")
    try:
        valid = spec_keys(name)
    except RegistryError as err:  # an unknown name: the registry's message lists the known ones
        raise DatasetSpecError(str(err)) from None
    unknown = [str(key) for key in spec if key not in valid]
    if unknown:
        hint = ""
        if "download" in unknown:  # docs/data.md offers download: true, but only torchvision's sets can fetch
            hint = f"; download works for {', '.join(n for n in DATASETS.names() if 'download' in spec_keys(n))} only"
        raise DatasetSpecError(
            f"unknown key(s) {', '.join(unknown)} in the spec of dataset '{name}'; valid: {', '.join(valid)}{hint}"
        )
    missing = [setting for setting in required_settings(name) if setting not in spec]
    if missing:  # the reader would fail with Python's "missing 1 required positional argument"
        example = ", ".join(f"{setting}: ..." for setting in missing)
        raise DatasetSpecError(f"dataset '{name}' needs {', '.join(missing)}, e.g. {{name: {name}, {example}}}")
    if "resize" in spec and role in ("id", "outliers"):
        raise DatasetSpecError("'resize' applies to OOD sets only (ood_sets, ood_val_sets)")
    if "split" in spec and role == "id":  # else train, val and test would all read that one split
        raise DatasetSpecError(
            f"'split' does not apply to the ID set: the datamodule reads its train, val and test splits (a set "
            f"without val gives data.val_fraction of train); leave it out of the spec of '{name}'"
        )
    if not isinstance(spec.get("resize", True), bool):
        raise DatasetSpecError(
            f"{dataset_name(spec)}: resize={spec['resize']!r} is not true or false (false: center crop only)"
        )
    # The reader's settings as a config gives them (a path as text): a bare `id_classes: n01` would be read letter by
    # letter, a noise `num: -3` fail inside torch
    settings = {k: _text(v) for k, v in spec.items() if k != "resize"}
    hints = {**plain_hints(DATASETS.get(name)), "name": str, "alias": str, "split": str}
    sizes = numeric_bounds(SIZES, hints)
    try:
        check_settings(settings, hints, sizes)
    except SettingError as err:
        raise DatasetSpecError(f"dataset '{name}': {err}") from None


def _text(value: Any) -> Any:
    """A path (or a list of them) as the text a config would give."""
    if isinstance(value, list | tuple):
        return [_text(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def resizes(spec: str | dict[str, Any]) -> bool:
    """Whether a set's images are resized before the center crop (``resize: false`` in its spec: crop only)."""
    return isinstance(spec, str) or spec.get("resize", True) is not False


def dataset_name(spec: str | Mapping[str, Any]) -> str:
    """Display name of a dataset spec: its ``alias`` if given, else its registry name."""
    return spec if isinstance(spec, str) else str(spec.get("alias", spec["name"]))


def build_dataset(spec: str | dict[str, Any], root: str | Path, split: str, **extra: Any) -> Dataset:
    """Build a dataset from a spec (a name or ``{"name": ..., "split"?, "alias"?, **settings}``).

    ``extra`` settings (e.g. ``size``/``channels`` for synthetic sets) are passed only to factories
    that accept them; a ``split`` key in the spec overrides ``split``.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    split = spec.get("split", split)
    settings = {k: v for k, v in spec.items() if k not in SPEC_KEYS}  # the reader's own (resize: the transform's)
    accepted = DATASETS.settings(spec["name"])
    extra = {k: v for k, v in extra.items() if k in accepted and k not in settings}
    return DATASETS.build({"name": spec["name"], **settings}, root=Path(root), split=split, **extra)
