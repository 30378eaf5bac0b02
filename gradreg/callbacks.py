"""OODEvalCallback: score the ID validation set and every OOD validation set after each validation.

Runs in ``fit`` (after the validation loop), ``validate`` and ``test``. Lightning runs evaluation under
``torch.inference_mode`` by default, where gradients can never be enabled (Lightning #13948); the
scoring engine leaves inference mode and clones its inputs, so gradient scorers (GAIA, ODIN, purview,
DeepFool margins) work in all three.

Under DDP every rank scores a disjoint, unpadded shard of each set (no duplicated samples) and the
shards are gathered, so the numbers equal those of a single device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gradreg.data.module import Strided
from gradreg.evaluation import ScoredSet, ScorerSpec, build_scorers, mean_metrics, sample, score_loader, set_metrics
from gradreg.registry import SettingError
from gradreg.scorers.base import require_head, require_running_stats

METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")
DATAMODULE_API = ("id_dataset_for", "ood_datasets", "eval_batch_size", "num_workers")  # what the callback reads


class OODEvalCallback(Callback):
    """Log OOD detection metrics of several scorers every ``every_n_epochs`` epochs.

    Keys: ``ood/{set}/{scorer}/{metric}`` and ``ood/mean/{scorer}/{metric}`` with metric in
    ``auroc, fpr95, aupr_in, aupr_out`` (``fpr95``: FPR on OOD at 95% ID TPR, the GReg/energy papers'
    convention). With a wandb or TensorBoard logger, score histograms (and on wandb a per-set table)
    are logged too.

    Args:
        scorers: scorer specs (names or ``{name: ..., **settings}``), see ``gradreg.scorers``.
        every_n_epochs: during ``fit``, evaluate after the validation of epochs n, 2n, 3n, ... (counting from 1;
            with ``check_val_every_n_epoch`` > 1, only where both fall on the same epoch).
        max_samples: score at most this many images per set, a fixed random sample (keeps big sets cheap).
        histograms: log score histograms when the logger supports them.
        cache_mb: keep the transformed evaluation images (deterministic: no augmentation) in memory up to this
            many MiB, so later epochs skip decoding and transforms; 0 disables the cache.
    """

    def __init__(
        self,
        scorers: Sequence[ScorerSpec] = ("msp", "energy", "gradnorm"),
        every_n_epochs: int = 1,
        max_samples: int | None = 2000,
        histograms: bool = True,
        cache_mb: int = 512,
    ) -> None:
        for name, value, least in (
            ("every_n_epochs", every_n_epochs, 1), ("max_samples", max_samples, 1), ("cache_mb", cache_mb, 0)
        ):  # fmt: skip
            if (value is not None or name == "cache_mb") and (
                not isinstance(value, int) or isinstance(value, bool) or value < least
            ):
                raise SettingError(f"OODEvalCallback: {name}={value!r} must be an integer >= {least}")
        if not isinstance(histograms, bool):  # a string such as "false" is truthy
            raise SettingError(f"OODEvalCallback: histograms={histograms!r} must be true or false")
        self.scorer_specs = list(scorers)
        self.scorers = build_scorers(self.scorer_specs)  # fail at construction on a bad name or setting
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.histograms = histograms
        self.cache_mb = cache_mb
        self._cache: dict[tuple[str, str], list[tuple[Tensor, Tensor]]] = {}
        self._cached_for: tuple[object, int, int] | None = None  # the cache holds (datamodule, world, rank)'s shards
        self._warned_no_ood: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callback into each process: not the cached images (up to cache_mb, another shard)
        return {**self.__dict__, "_cache": {}, "_cached_for": None}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Stop before the first epoch if the module, the datamodule or the model lacks what scoring needs.

        The callback scores ``pl_module.model`` (which needs ``features`` and ``fc`` whatever the scorers: one shared
        forward gives the predictions and the output scores) on the sets of ``trainer.datamodule``, an
        :class:`~gradreg.data.OODDataModule` or any datamodule with its ``id_dataset_for``, ``ood_datasets``,
        ``eval_batch_size`` and ``num_workers``; and a scorer may need more (absent: a model of method absent).
        """
        model = getattr(pl_module, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise SettingError(
                f"OODEvalCallback scores pl_module.model, the classifier, and {type(pl_module).__name__} has no "
                "nn.Module attribute 'model': keep your network there (gradreg.module.GradRegModule does)"
            )
        dm = trainer.datamodule
        missing = [name for name in DATAMODULE_API if not hasattr(dm, name)]
        if missing:
            lacks = "there is none" if dm is None else f"{type(dm).__name__} has no {', '.join(missing)}"
            raise SettingError(
                f"OODEvalCallback reads its ID and OOD sets from trainer.datamodule, and {lacks}: pass a "
                f"gradreg.data.OODDataModule as the datamodule, or one with {', '.join(DATAMODULE_API)}"
            )
        try:
            require_head(model)
            require_running_stats(model)
        except (TypeError, ValueError) as err:
            raise SettingError(f"OODEvalCallback: {err}") from None
        for key, scorer in self.scorers.items():
            try:
                scorer.require(model)
            except TypeError as err:
                raise SettingError(f"OODEvalCallback scorer '{key}': {err}") from None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        self.evaluate(trainer, pl_module, "test")

    # ----------------------------------------------------------------------------------------------------------
    def _score(self, trainer: Trainer, pl_module: LightningModule, dataset: Dataset, key: tuple[str, str]) -> ScoredSet:
        chosen = sample(dataset, self.max_samples)  # the same images every epoch
        batches = self._cache.get(key)
        if batches is None:
            dm = trainer.datamodule
            # A loader draws its base seed from the global generator when it starts: give it its own, so that a
            # run with this callback shuffles and augments exactly as a run without it.
            loader = DataLoader(
                chosen,
                batch_size=dm.eval_batch_size,
                sampler=Strided(chosen, trainer.world_size, trainer.global_rank),
                num_workers=dm.num_workers,
                generator=torch.Generator(),
            )
            batches = self._remember(key, loader)
        local = score_loader(pl_module.model, batches, self.scorers, pl_module.device)
        return local if trainer.world_size == 1 else _gather(trainer, local, len(chosen))

    def _remember(self, key: tuple[str, str], loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the loader's batches and cache them if they fit in what is left of ``cache_mb``."""
        used = sum(x.nbytes for batches in self._cache.values() for x, _ in batches)
        kept: list[tuple[Tensor, Tensor]] | None = []
        for x, y in loader:
            if kept is not None:
                used += x.nbytes
                if used <= self.cache_mb * 2**20:  # a copy: a worker's tensor keeps a file descriptor open while alive
                    kept.append((x.clone(), y.clone()))
                else:
                    kept = None
            yield x, y
        if kept is not None:
            self._cache[key] = kept

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, split: str) -> dict[str, Any]:
        """Score ID ``split`` and every OOD set of that split; log and return the metrics."""
        dm = trainer.datamodule
        # The cache is keyed by set name and holds this rank's shard: another datamodule or process group starts afresh
        shard = (trainer.world_size, trainer.global_rank)
        if self._cached_for is None or self._cached_for[0] is not dm or self._cached_for[1:] != shard:
            self._cache.clear()
            self._cached_for = (dm, *shard)
        id_scores = self._score(trainer, pl_module, dm.id_dataset_for(split), (split, "id"))
        per_set: dict[str, dict[str, dict[str, float]]] = {}
        ood_scores: dict[str, ScoredSet] = {}
        for name, dataset in dm.ood_datasets(split).items():
            ood_scores[name] = self._score(trainer, pl_module, dataset, (split, name))
            per_set[name] = set_metrics(id_scores, ood_scores[name])
        if not per_set and split not in self._warned_no_ood:
            self._warned_no_ood.add(split)
            rank_zero_warn(
                f"OODEvalCallback: the datamodule has no OOD {split} sets "
                f"({'data.ood_val_sets' if split == 'val' else 'data.ood_sets'} is empty), so no ood/* metrics are "
                "logged; list some there to monitor OOD detection"
            )
        per_set_and_mean = {**per_set, "mean": mean_metrics(per_set)} if per_set else {}
        logged = {
            f"ood/{name}/{scorer}/{metric}": values[metric]
            for name, by_scorer in per_set_and_mean.items()
            for scorer, values in by_scorer.items()
            for metric in METRICS
        }
        # Every rank holds the same gathered numbers: a max all-reduce keeps them exact (a mean could round) and
        # tells Lightning they are synced (one warning per key otherwise).
        pl_module.log_dict(logged, sync_dist=True, reduce_fx="max")
        if self.histograms and trainer.is_global_zero:
            self._log_media(trainer, id_scores, ood_scores, per_set)
        return per_set_and_mean

    def _log_media(
        self, trainer: Trainer, id_scores: ScoredSet, ood_scores: dict[str, ScoredSet], per_set: dict[str, Any]
    ) -> None:
        # The step Lightning logs this epoch's metrics at (as its LearningRateMonitor does): the ood/* values, the
        # histograms and the table then share one trainer/global_step (trainer.global_step is one ahead of it)
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        step = getattr(loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            kind = type(logger).__name__
            if kind == "WandbLogger":
                import wandb

                media: dict[str, Any] = {
                    f"hist/{name}/{scorer}": wandb.Histogram(values)
                    for name, scorer, values in _histograms(self.scorers, {"id": id_scores, **ood_scores})
                }
                rows = [[n, s, *(v[m] for m in METRICS)] for n, by in per_set.items() for s, v in by.items()]
                media["ood/table"] = wandb.Table(columns=["set", "scorer", *METRICS], data=rows)
                logger.experiment.log({**media, "trainer/global_step": step, "epoch": trainer.current_epoch})
            elif kind == "TensorBoardLogger":
                for name, scorer, values in _histograms(self.scorers, {"id": id_scores, **ood_scores}):
                    logger.experiment.add_histogram(f"hist/{name}/{scorer}", values, step)


def _histograms(scorers: list[str], sets: dict[str, ScoredSet]) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(set, scorer, finite scores)`` of each histogram that can be drawn.

    A scorer's NaN/inf scores are left out (its metrics already say NaN), and a histogram is skipped where numpy
    cannot cut the range into 64 bins: a diverged model gives every image the same huge score (e.g. energy 5e14).
    """
    for name, scored in sets.items():
        for scorer in scorers:
            values = scored.scores[scorer]
            values = values[np.isfinite(values)]
            try:
                np.histogram(values, bins=64)  # wandb.Histogram's default bins
            except ValueError:
                continue
            if values.size:
                yield name, scorer, values


def _gather(trainer: Trainer, local: ScoredSet, n: int) -> ScoredSet:
    """Reassemble per-rank strided shards (rank r holds items r, r + W, ...) into dataset order."""
    world = trainer.world_size
    width = -(-n // world)  # ceil: shards differ in length by at most one; pad to gather, then drop the padding

    def gather(values: np.ndarray) -> np.ndarray:
        padded = torch.zeros(width, dtype=torch.float64)
        padded[: len(values)] = torch.from_numpy(values.astype(np.float64))
        stacked = trainer.strategy.all_gather(padded.to(trainer.strategy.root_device)).cpu()  # (world, width)
        return stacked.T.reshape(-1)[:n].numpy()  # interleave: position j*world + r holds rank r's j-th item

    return ScoredSet(
        {k: gather(v) for k, v in local.scores.items()},
        gather(local.preds).astype(np.int64),
        gather(local.labels).astype(np.int64),
    )
