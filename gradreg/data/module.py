"""OODDataModule: ID train/val/test, the auxiliary outlier stream, and the OOD evaluation sets.

One training batch is a dict ``{"id": (x, y), "outliers": (x, pool_index)}`` built by Lightning's
``CombinedLoader`` in ``max_size_cycle`` mode, so the ID loader sets the epoch length and the module
concatenates both parts into a single forward pass (separate forwards break BatchNorm statistics,
OpenOOD issue #138). Every image, ID or not, goes through the ID normalization; outliers also get the
ID training augmentation, as in the official GReg/energy code.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from gradreg.data.check import check_specs
from gradreg.data.datasets import (
    DEFAULT_OOD_SETS,
    ID_SPECS,
    ImageSpec,
    Transformed,
    augmentation_seeds,
    build_dataset,
    build_transform,
    dataset_name,
    resizes,
)
from gradreg.data.outliers import OutlierStream, TrainingLoader
from gradreg.registry import Bounds, SettingError, check_settings

DatasetSpec = str | dict[str, Any]
BOUNDS: Bounds = {
    "batch_size": (">=", 1), "outlier_batch_size": (">=", 1), "eval_batch_size": (">=", 1), "num_workers": (">=", 0),
    "image_size": (">=", 1), "val_fraction": (">=", 0.0), "candidates_per_epoch": (">=", 1), "seed": (">=", 0),
}  # fmt: skip


def check_data_settings(data: Mapping[str, Any]) -> None:
    """Raise :class:`~gradreg.registry.RegistryError` at the first wrong setting of a ``data`` section.

    What :class:`OODDataModule` checks on construction (types, bounds, dataset specs), on the section of a config as
    written (the unset keys take the datamodule's defaults): ``python -m gradreg.data check`` refuses what train.py
    refuses.
    """
    defaults = {
        n: p.default for n, p in inspect.signature(OODDataModule).parameters.items() if p.default is not p.empty
    }
    data = {**defaults, **data}
    check_specs(data)  # first: a set list that is no list gets its own line ("write it as one: [svhn]")
    check_settings(data, typing.get_type_hints(OODDataModule.__init__), BOUNDS, prefix="data.")
    id_name = data["id_dataset"] if isinstance(data["id_dataset"], str) else data["id_dataset"]["name"]
    channels = ID_SPECS[id_name].channels
    for key in ("mean", "std"):  # else Normalize broadcasts a 1-channel image to 3 channels, or flips its sign
        value = data[key]
        if value is not None and len(value) != channels:
            raise SettingError(
                f"data.{key}={value} has {len(value)} values, and the ID set '{id_name}' has {channels} channel(s): "
                "give one per channel"
            )
    if data["std"] is not None and not all(s > 0 for s in data["std"]):
        raise SettingError(f"data.std={data['std']} must be > 0 in every channel")
    if not data["val_fraction"] < 1:
        raise SettingError(f"data.val_fraction={data['val_fraction']} must be < 1 (the rest of the ID data trains)")
    candidates, outlier_batch_size = data["candidates_per_epoch"], data["outlier_batch_size"]
    if candidates is not None and candidates < outlier_batch_size:
        raise SettingError(
            f"data.candidates_per_epoch={candidates} is fewer than one outlier batch "
            f"(data.outlier_batch_size={outlier_batch_size}); raise it or lower data.outlier_batch_size"
        )


class EpochShuffle(DistributedSampler):
    """The ID training order: a new permutation each epoch, a pure function of the seeds, the epoch and the rank.

    ``RandomSampler`` draws its order from the global generator, which a resumed run seeds afresh, so the first
    epoch after a resume would replay epoch 0's order. This sampler starts at the epoch the run is about to train:
    with worker processes the loader reads the first indices as soon as its iterator exists, before Lightning's
    ``set_epoch`` of that epoch (which moves it on later epochs). It shards by rank itself (a ``DistributedSampler``,
    which Lightning leaves in place under DDP); on one device it is a plain permutation. It yields ``(index, seed)``:
    :class:`~gradreg.data.datasets.Transformed` augments image ``index`` of an epoch with the seed drawn for it from
    the seed and the epoch, whichever process or rank reads it. A run resumed inside ``epoch`` passes ``drawn``, the
    items of that epoch its checkpoint had already trained on (this rank's), and goes on from there.
    """

    def __init__(
        self, dataset: Dataset, seed: int, epoch: int, num_replicas: int = 1, rank: int = 0, drawn: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.epoch = epoch
        self._resumed = (epoch, drawn)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        seeds = augmentation_seeds(self.seed, self.epoch, n=len(self.dataset))  # type: ignore[arg-type]
        skip = self._resumed[1] if self.epoch == self._resumed[0] else 0
        for i in itertools.islice(super().__iter__(), skip, None):
            yield i, int(seeds[i])


class Strided(DistributedSampler):
    """An evaluation shard: rank ``r`` of ``W`` reads items ``r, r + W, r + 2W, ...``, every item once over the ranks.

    Lightning's own ``DistributedSampler`` pads the shards to equal length with repeated items, which would count
    twice in ``val/*`` and ``test/*``; it leaves a ``DistributedSampler`` subclass in place.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]


def _on_every_rank(message: str, rank: int) -> SettingError:
    """A setting error that every DDP rank raises alike: rank 0 says it (``silent`` elsewhere)."""
    err = SettingError(message)
    err.silent = rank != 0  # type: ignore[attr-defined]
    return err


class CarvedSplit(Subset):
    """The validation hold-out, or the rest, of a dataset's train split, where the dataset has no validation split.

    ``indices`` are the images' indices in that train split (the names ``evaluate.py --explain`` gives them).
    """


class OODDataModule(LightningDataModule):
    """Data for OOD-aware training and evaluation.

    Args:
        id_dataset: the in-distribution dataset (a registry name or a spec mapping).
        outliers: the auxiliary outlier pool, or ``None`` for methods that use no outliers.
        ood_sets: OOD test sets (names or specs; ``alias`` sets the display name).
        near_ood: display names of the sets in ``ood_sets`` that count as near-OOD (the rest are far).
        ood_val_sets: OOD sets for the per-epoch callback; ``None`` = ``ood_sets`` with ``split="val"``.
        data_root: folder holding one sub-folder per dataset.
        batch_size: ID images per training step.
        outlier_batch_size: candidate outliers drawn per step (the sampler keeps some or all of them).
        eval_batch_size: batch size of every evaluation loader.
        num_workers: loader worker processes.
        augment: ID/outlier training augmentation (see :func:`build_transform`).
        image_size: override of the ID spec's input size.
        mean: override of the ID spec's normalization mean.
        std: override of the ID spec's normalization std.
        val_fraction: share of the ID training set held out for validation when the dataset has no val split.
        seed: seed of the validation split, of the ID training order (with seed_everything's) and of the outlier stream.
        candidates_per_epoch: outlier candidates drawn per epoch (GReg's ``size_candidate_ood``); ``None`` = the
            whole pool.
    """

    def __init__(
        self,
        id_dataset: DatasetSpec = "digits",
        outliers: DatasetSpec | None = "digits_outliers",
        ood_sets: list[DatasetSpec] | None = None,
        near_ood: list[str] | None = None,
        ood_val_sets: list[DatasetSpec] | None = None,
        data_root: str | Path = "data",
        batch_size: int = 64,
        outlier_batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        augment: Literal["none", "crop", "crop_flip", "imagenet"] = "crop",
        image_size: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        candidates_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_data_settings(self.hparams)
        self.id_dataset = id_dataset
        self.outliers = outliers
        self.ood_sets = list(ood_sets if ood_sets is not None else DEFAULT_OOD_SETS)
        self.near_ood = list(near_ood or [])
        self.ood_val_sets = ood_val_sets
        self.data_root = Path(data_root)
        self.batch_size, self.outlier_batch_size, self.eval_batch_size = batch_size, outlier_batch_size, eval_batch_size
        self.num_workers, self.augment, self.val_fraction, self.seed = num_workers, augment, val_fraction, seed
        self.candidates_per_epoch = candidates_per_epoch
        base = ID_SPECS[id_dataset if isinstance(id_dataset, str) else id_dataset["name"]]
        overrides = {"size": image_size, "mean": tuple(mean) if mean else None, "std": tuple(std) if std else None}
        if image_size is not None and base.resize is not None:  # keep the crop ratio: 256 -> 224 is 128 -> 146
            overrides["resize"] = round(base.resize * image_size / base.size)
        self.spec: ImageSpec = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
        self.outlier_stream: OutlierStream | None = None
        self._stream_state: dict | None = None
        self._restored_epoch = 0  # the epoch a run resumed from a checkpoint trains first
        self._restored_batches = 0  # and the training batches of that epoch it had taken (0: at an epoch's end)
        # The stream position where an epoch starts that has not drawn yet (None: the run stands inside an epoch).
        self.epoch_start_position: int | None = 0
        self._sets: dict[str, Dataset] = {}

    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of ID classes."""
        return self.spec.num_classes

    @property
    def input_mean(self) -> list[float]:
        """Per-channel normalization mean applied to every image."""
        return list(self.spec.mean)

    @property
    def input_std(self) -> list[float]:
        """Per-channel normalization std applied to every image."""
        return list(self.spec.std)

    def _build(self, spec: DatasetSpec, split: str) -> Dataset:
        return build_dataset(spec, self.data_root, split, size=self.spec.size, channels=self.spec.channels)

    def _id_split(self, split: str) -> Dataset:
        """ID train/val/test; without a native val split, a seeded ``val_fraction`` of train is held out of it."""
        if split == "test":
            return self._build(self.id_dataset, "test")
        try:
            native_val = self._build(self.id_dataset, "val")
        except ValueError:  # the factory has no val split: carve one out of train, disjoint from what we train on
            full = self._build(self.id_dataset, "train")
            perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed)).tolist()  # type: ignore[arg-type]
            n_val = round(self.val_fraction * len(perm))
            return CarvedSplit(full, sorted(perm[:n_val] if split == "val" else perm[n_val:]))
        return native_val if split == "val" else self._build(self.id_dataset, "train")

    def setup(self, stage: str | None = None) -> None:
        """Index the training data and the outlier stream (cheap: no images are decoded here)."""
        if stage in (None, "fit") and self.outliers is not None and self.outlier_stream is None:
            pool = self._build(self.outliers, "train")
            size = len(pool)  # type: ignore[arg-type]
            if size < self.outlier_batch_size:
                raise SettingError(
                    f"data.outliers: '{dataset_name(self.outliers)}' holds {size} images, fewer than one outlier "
                    f"batch (data.outlier_batch_size={self.outlier_batch_size}); add images or lower the batch size"
                )
            pool = Transformed(pool, build_transform(self.spec, self.augment), return_index=True)
            self.outlier_stream = OutlierStream(pool, self.outlier_batch_size, self.seed, self.candidates_per_epoch)
            if self._stream_state is not None:
                self.outlier_stream.load_state_dict(self._stream_state)

    def id_dataset_for(self, split: Literal["train", "val", "test"]) -> Dataset:
        """The transformed ID dataset of a split (``train`` is augmented); built on first use."""
        if split not in self._sets:
            transform = build_transform(self.spec, self.augment if split == "train" else "none")
            self._sets[split] = Transformed(self._id_split(split), transform)
        return self._sets[split]

    def unaugmented_train_sets(self) -> tuple[Dataset, Dataset | None]:
        """The ID training set and the outlier pool with the evaluation transform.

        Influence functions need the training points themselves, not random augmentations of them.
        """
        eval_tf = build_transform(self.spec, "none")
        pool = None if self.outliers is None else Transformed(self._build(self.outliers, "train"), eval_tf)
        return Transformed(self._id_split("train"), eval_tf), pool

    def ood_datasets(self, split: Literal["val", "test"] = "test") -> dict[str, Dataset]:
        """Transformed OOD sets by display name; ``split="val"`` gives the sets the per-epoch callback uses."""
        specs = self.ood_sets if split == "test" or self.ood_val_sets is None else self.ood_val_sets
        return {
            dataset_name(s): Transformed(self._build(s, split), build_transform(self.spec, "none", resize=resizes(s)))
            for s in specs
        }

    # ----------------------------------------------------------------------------------------------------------
    def _loader(
        self, dataset: Dataset, batch_size: int | None = None, loader: type[DataLoader] = DataLoader, **kw: Any
    ) -> DataLoader:
        return loader(
            dataset,
            batch_size=batch_size or self.eval_batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # Its own generator: a loader draws its workers' base seed when an iterator starts, from the global RNG
            # otherwise, once per epoch without workers and once per fit with persistent ones (dropout would differ).
            generator=torch.Generator(),
            **kw,
        )

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        """An ordered, unshuffled evaluation loader over ``dataset``."""
        return self._loader(dataset)

    def train_dataloader(self) -> CombinedLoader | DataLoader:  # noqa: D102
        self.setup("fit")
        dataset = self.id_dataset_for("train")
        world, rank = self._world_and_rank()
        global_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # seed_everything's
        seed = int(np.random.SeedSequence([global_seed, self.seed]).generate_state(1)[0])
        epoch = max(self._epoch(), self._restored_epoch)  # Lightning may build the loader before restoring its loop
        drawn = self._restored_batches if epoch == self._restored_epoch else 0
        sampler = EpochShuffle(dataset, seed, epoch, num_replicas=world, rank=rank, drawn=drawn * self.batch_size)
        id_loader = self._loader(dataset, self.batch_size, TrainingLoader, sampler=sampler, drop_last=True)
        if len(id_loader) == 0:  # else an epoch of no step, and "this run trained no step" blames the limits
            raise _on_every_rank(
                f"data.batch_size={self.batch_size} is more than the ID training set's {len(sampler)} images per "
                f"process ({len(dataset)} on {world}); lower data.batch_size",  # type: ignore[arg-type]
                rank,
            )
        if self.outlier_stream is None:
            return id_loader
        if self.outlier_stream.batches_per_pass(world) == 0:  # setup() checked one batch, not one per process
            raise _on_every_rank(
                f"the outlier stream draws {self.outlier_stream.pass_size()} candidates per pass (data.outliers' "
                f"images or data.candidates_per_epoch, the fewer), fewer than one batch of data.outlier_batch_size="
                f"{self.outlier_batch_size} for each of {world} processes; lower data.outlier_batch_size or raise "
                "data.candidates_per_epoch",
                rank,
            )
        # The ID loader (this rank's share) sets the epoch length (GReg: iterations = #ID batches).
        outliers = self.outlier_stream.dataloader(self.num_workers, max_batches=max(1, len(id_loader)), drawn=drawn)
        return CombinedLoader({"id": id_loader, "outliers": outliers}, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._eval_shard(self.id_dataset_for("val"))

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._eval_shard(self.id_dataset_for("test"))

    def _eval_shard(self, dataset: Dataset) -> DataLoader:
        """This rank's unpadded share of ``dataset`` (the whole of it on one device)."""
        world, rank = self._world_and_rank()
        if 0 < len(dataset) < world:  # type: ignore[arg-type]  # (an empty set: no batches on any rank)
            raise ValueError(f"the ID evaluation set has {len(dataset)} images, fewer than the {world} processes")  # type: ignore[arg-type]
        return self._loader(dataset, sampler=Strided(dataset, world, rank))

    def _world_and_rank(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count consumed outlier batches so a checkpoint resumes the stream exactly where it was."""
        if self.trainer is not None and self.trainer.training and self.outlier_stream is not None:
            self.outlier_stream.advance()
        return batch

    def _epoch(self) -> int:
        """The fit loop's count of epochs (0 without a trainer)."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0

    def state_dict(self) -> dict[str, Any]:
        """The outlier stream's position, the epoch to train next and its batches taken: where a resumed run goes on.

        The datamodule's state is restored before the model's optimizers are set up, and a cosine schedule asks for
        the number of steps there, which builds the training loader (and its workers read their first indices)
        before Lightning restores its own loops.
        """
        epoch, batches = self._resume_point()
        state: dict[str, Any] = {"epoch": epoch, "epoch_batches": batches}
        if self.outlier_stream is not None:
            state["outlier_stream"] = self.outlier_stream.state_dict()
            state["epoch_start"] = self.outlier_stream.position if batches == 0 else None
        return state

    def _resume_point(self) -> tuple[int, int]:
        """The epoch a run resumed from a checkpoint taken now trains first, and the batches of it already trained.

        Lightning resumes inside an epoch that it started and did not finish (a periodic ``every_n_train_steps``
        checkpoint, a validation inside the epoch), after the batches it processed. A checkpoint after an epoch's
        last batch (``on_train_batch_end``, or the validation that follows it) goes on with the next epoch, which
        Lightning counts only once it has restored its loops: its number is recorded here, since a loader with workers
        reads its first indices as soon as its iterator exists, before ``set_epoch``. At an epoch's end, and for a run
        stopped by ``max_steps`` (Lightning counts its epoch as finished), the fit loop's count is that next epoch.
        """
        if self.trainer is None:
            return 0, 0
        epochs = self.trainer.fit_loop.epoch_progress.total
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        inside = epochs.started == epochs.ready and epochs.processed == epochs.started - 1
        if not inside:
            return self._epoch(), 0
        if batches < self.trainer.num_training_batches:
            return self._epoch(), batches
        return self._epoch() + 1, 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        self._restored_epoch = state_dict.get("epoch", 0)
        self._restored_batches = state_dict.get("epoch_batches", 0)  # checkpoints of earlier versions: none
        self._stream_state = state_dict.get("outlier_stream")
        self.epoch_start_position = state_dict.get("epoch_start")
        if self.outlier_stream is not None and self._stream_state is not None:
            self.outlier_stream.load_state_dict(self._stream_state)
