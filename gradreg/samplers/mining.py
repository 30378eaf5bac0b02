"""Per-epoch pool mining: NTOM and POEM (see :mod:`gradreg.samplers`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from gradreg.data.datasets import augmentation_seeds
from gradreg.registry import Bounds, SettingError
from gradreg.samplers.base import SAMPLERS, OutlierSampler, Score, _outlier_scores, _seed_from, forward_candidates

if TYPE_CHECKING:
    from gradreg.data.outliers import OutlierStream


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_over_ranks(t: Tensor) -> Tensor:
    """``t`` summed over the DDP ranks (a collective; may reduce ``t`` in place), on ``t``'s device."""
    if not _distributed():
        return t
    nccl = torch.distributed.get_backend() == "nccl"  # needs this rank's GPU, wherever a checkpoint put ``t``
    summed = t.to(torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
    torch.distributed.all_reduce(summed)
    return summed.to(t.device)


MINER_BOUNDS: Bounds = {
    "pool_factor": (">=", 1.0), "keep_factor": (">", 0.0), "id_train_size": (">=", 1), "batch_size": (">=", 1),
    "num_workers": (">=", 0),
}  # fmt: skip


class _PoolMiner(OutlierSampler):
    """A per-epoch sampler: score a window of the pool, restrict the stream to a block of it, use every candidate.

    Subclasses declare the fields ``pool_factor``, ``keep_factor``, ``id_train_size``, ``batch_size``,
    ``num_workers`` and ``seed``, and implement :meth:`mine`.
    """

    pool_factor: float
    keep_factor: float
    id_train_size: int | None
    batch_size: int
    num_workers: int
    seed: int
    per_epoch: ClassVar[bool] = True

    def select(self, model: nn.Module, candidates: Tensor, n_id: int) -> Tensor:
        return torch.arange(candidates.shape[0], device=candidates.device)

    def mine(self, model: nn.Module, pool: Dataset, position: int = 0) -> Tensor:
        """Pool indices to keep for the epoch that starts at stream ``position``.

        ``pool`` is asked for ``(index, augmentation seed)`` items, as the outlier stream asks it (the datamodule's
        pool is a :class:`~gradreg.data.datasets.Transformed`).
        """
        raise NotImplementedError

    def on_train_epoch_start(self, model: nn.Module, pool: Dataset, stream: OutlierStream, batch_size: int) -> None:
        kept = self.mine(model, pool, stream.position)
        if len(kept) < stream.batch_size:  # else the stream's restrict() error, which names no setting
            raise SettingError(
                f"model.sampler ({type(self).__name__}) kept {len(kept)} pool images for this epoch, fewer than one "
                f"outlier batch (data.outlier_batch_size={stream.batch_size}); raise its keep_factor (NTOM: or lower "
                "its quantile), or lower data.outlier_batch_size"
            )
        stream.restrict(kept)

    def _keep_size(self, n_pool: int) -> int:
        """``keep_factor * id_train_size`` images, or ``n_pool / pool_factor`` if the ID size is unknown."""
        if self.id_train_size is not None:
            return max(1, round(self.keep_factor * self.id_train_size))
        return max(1, int(n_pool / self.pool_factor))

    def _scan(
        self, model: nn.Module, pool: Dataset, n_keep: int, position: int, score: Callable[[Tensor, Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Scores of a window of ``pool_factor * n_keep`` pool images: ``(window pool indices, scores)``.

        The window is contiguous from a random offset, wrapping around; the offset and each image's augmentation
        seed come from ``(seed, position)``: the pool is asked for ``(index, seed)`` items, as the outlier stream
        asks it (:class:`~gradreg.data.datasets.Transformed`), so the scan does not depend on ``num_workers``.
        ``score(features, logits)`` of an eval-mode, no-grad forward gives one score per image. Training then draws
        fresh augmentations of the kept images (the official code trains on the scored tensors; ``docs/training.md``).
        """
        n_pool = len(pool)  # type: ignore[arg-type]
        n_scan = min(n_pool, math.ceil(self.pool_factor * n_keep))
        seed = _seed_from(self.seed, position)
        offset = int(torch.randint(n_pool, (1,), generator=torch.Generator().manual_seed(seed)))
        window = (offset + torch.arange(n_scan)) % n_pool
        items = list(zip(window.tolist(), augmentation_seeds(seed, n=n_scan).tolist(), strict=True))
        weight = next(model.parameters())  # the pool's float32 images in the model's dtype (64-true, bf16-true)
        loader = DataLoader(  # with a generator of its own: a DataLoader draws its base seed from the global RNG
            Subset(pool, items), self.batch_size, num_workers=self.num_workers, generator=torch.Generator()
        )
        batches = (x.to(weight.device, weight.dtype, non_blocking=True) for x, _ in loader)
        scores = [score(*forward_candidates(model, x)).cpu() for x in batches]
        return window, torch.cat(scores)

    @staticmethod
    def _from_rank0(kept: Tensor, model: nn.Module) -> Tensor:
        """Rank 0's choice on every rank under DDP (float ties may order differently across ranks)."""
        if _distributed():
            kept = kept.to(next(model.parameters()).device)
            torch.distributed.broadcast(kept, src=0)
            kept = kept.cpu()
        return kept


@SAMPLERS.register("ntom")
@dataclass
class NTOMSampler(_PoolMiner):
    """NTOM: each epoch keep a block of hard (but not the hardest) outliers from a scanned pool window.

    At the start of each epoch: scan ``pool_factor * keep`` pool images (a contiguous window at a random offset,
    wrapping around), sort them by ascending score (absent-class probability; low = hard), skip the lowest
    ``quantile`` of the window and keep the next ``keep = keep_factor * id_train_size`` images; the stream then
    draws only from them and :meth:`select` uses every candidate. NTOM's OOD batch is twice the ID batch.

    The scan is deterministic: its window and augmentations are seeded from ``(seed, stream.position)`` (the global
    RNG is left untouched). Under DDP every rank scans the same window and rank 0's choice is broadcast.

    Args:
        quantile: share of the scanned window skipped at the hard end (q = 0.125).
        pool_factor: scanned images per kept image (4).
        keep_factor: kept images per ID training image (2).
        id_train_size: number of ID training images (also set by :meth:`setup`); ``None`` = keep
            ``len(pool) // pool_factor`` (scan the whole pool).
        batch_size: scan batch size.
        num_workers: scan loader workers.
        score: ``absent``, ``energy`` or ``auto`` (see :class:`DOSSampler`).
        num_classes: number of ID classes, for ``auto``.
        seed: seed of the window offsets and the scan augmentation.
    """

    quantile: float = 0.125
    pool_factor: float = 4.0
    keep_factor: float = 2.0
    id_train_size: int | None = None
    batch_size: int = 256
    num_workers: int = 0
    score: Score = "auto"
    num_classes: int | None = None
    seed: int = 0
    lower_bounds: ClassVar[Bounds] = {**MINER_BOUNDS, "quantile": (">=", 0.0)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantile >= 1:
            raise SettingError(f"quantile={self.quantile} skips the whole scanned window; it must be < 1 (NTOM: 0.125)")

    def mine(self, model: nn.Module, pool: Dataset, position: int = 0) -> Tensor:
        """Pool indices NTOM keeps for the next epoch (sorted by ascending score, hardest first)."""
        n_keep = self._keep_size(len(pool))  # type: ignore[arg-type]
        window, scores = self._scan(
            model,
            pool,
            n_keep,
            position,
            lambda _, logits: _outlier_scores(model, logits, self.score, self.num_classes),
        )
        skip = int(self.quantile * len(window))
        return self._from_rank0(window[torch.argsort(scores, stable=True)[skip : skip + n_keep]], model)


def blr_posterior(gram: Tensor, zty: Tensor, sigma: float, sigma_n: float) -> tuple[Tensor, Tensor]:
    """Posterior of Bayesian linear regression ``y = beta . z + noise`` as in POEM's ``update_bays_reg_BDQN``.

    ``A = Z^T Z / sigma_n + I / sigma``, ``mu = A^-1 Z^T y / sigma_n`` and ``Sigma = sigma A^-1`` (POEM scales
    the textbook covariance ``A^-1`` by the prior variance ``sigma``). Computed in float64.

    Args:
        gram: ``Z^T Z``, shape (D, D).
        zty: ``Z^T y``, shape (D,).
        sigma: prior variance of ``beta``.
        sigma_n: noise variance.

    Returns:
        ``(mu, Sigma)``, shapes (D,) and (D, D). Without data (zeros) the extra factor gives ``(0, sigma^2 I)``,
        not the prior ``(0, sigma I)`` that POEM starts from.

    Example:
        >>> mu, cov = blr_posterior(torch.eye(2), torch.tensor([1.0, -1.0]), sigma=1.0, sigma_n=1.0)
        >>> mu.tolist(), cov.diagonal().tolist()
        ([0.5, -0.5], [0.5, 0.5])
    """
    gram, zty = gram.double(), zty.double()
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    inv = torch.linalg.inv(gram / sigma_n + eye / sigma)
    inv = (inv + inv.T) / 2  # exactly symmetric
    return inv @ zty / sigma_n, sigma * inv


def thompson_sample(mu: Tensor, cov: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw ``beta = mu + cov^(1/2) eps ~ N(mu, cov)``, ``eps ~ N(0, I)``, via the eigendecomposition of ``cov``.

    Negative eigenvalues (round-off) are replaced by their absolute values, POEM's fix for a covariance that is
    not positive semi-definite. ``eps`` comes from ``generator`` on the CPU and the root is the symmetric one,
    ``V diag(sqrt|lambda|) V^T``, which is unique: POEM's ``V diag(sqrt|lambda|)`` (the same distribution) turns one
    ``eps`` into a draw that depends on the signs ``eigh`` gives the eigenvectors, which differ between LAPACK and
    cuSOLVER, so a seeded run drew other outliers on a GPU. Computed in float64.
    """
    evals, evecs = torch.linalg.eigh(cov.double())
    eps = torch.randn(mu.shape[0], generator=generator, dtype=torch.float64).to(mu.device)
    return mu.double() + evecs @ (evals.abs().sqrt() * (evecs.T @ eps))


@SAMPLERS.register("poem")
@dataclass
class POEMSampler(_PoolMiner):
    """POEM: each epoch keep the pool images closest to a Thompson-sampled Bayesian linear boundary.

    A Bayesian linear regression on the penultimate features ``z`` fits the target ``-conf + noise`` for ID rows
    and ``+conf + noise`` for outlier rows (``noise ~ N(0, sigma_n)`` drawn once per run) under the prior
    ``beta ~ N(0, sigma I)`` (:func:`blr_posterior`). At the start of each epoch: draw one ``beta`` from the
    posterior of the last ``buffer_epochs`` epochs' training rows (the first epoch: from the prior), scan a
    window of ``pool_factor * keep`` pool images as :class:`NTOMSampler` does, and keep the
    ``keep = keep_factor * id_train_size`` images with the smallest ``|beta . z|`` (eval-mode features), i.e.
    nearest the sampled decision boundary. The stream then draws only from them; :meth:`select` uses every
    candidate. POEM trains with the energy loss (``method: energy``) and OOD batch = ID batch.

    The posterior needs only ``Z^T Z`` and ``Z^T y``: :meth:`observe` adds each training step's rows to the
    current epoch's ``Z^T Z`` and per-kind feature sums (a step's products in float32, or float64 for float64
    features, summed in float64 on the features' device), so memory and the checkpointed state are
    ``(buffer_epochs + 1) x D^2`` floats however many rows an epoch has (about 4.7 MB
    for DenseNet-BC-100's D = 342, 168 MB for ResNet-50's D = 2048). Under DDP each epoch's statistics are
    summed over the ranks (all-reduce) when the epoch is closed and when they are checkpointed (so
    :meth:`state_dict` must run on every rank, as Lightning's ``on_save_checkpoint`` does); rank 0's choice
    of pool indices is broadcast. The Thompson draw and the scan are seeded from ``(seed, stream.position)``,
    the label noise from ``seed``; a resumed run continues exactly.

    Deviations from the official code (``train_poem.py``, ``neural_linear_opt.py``):

    - Posterior data: the features of each training step's ID and outlier rows from the training forward
      (train mode, the weights of that step, the augmented images the step used). The official code stores the
      images (ID: the first epoch's augmented ID images, repeated ``min(epoch + 1, BUF_SIZE)`` times; outliers:
      the last ``BUF_SIZE`` epochs' selected images) and recomputes their features with the end-of-epoch model
      in eval mode before each update; that costs a forward over up to 5 x |ID train| images per epoch and
      keeps images, which does not scale to ImageNet.
    - Before any data ``mu = 0`` (official: ``mu ~ N(0, 0.01^2)`` per weight, negligible against the prior
      standard deviation ``sqrt(20)``).
    - The draw always goes through the eigendecomposition with absolute eigenvalues, as ``mu`` plus the symmetric
      root of the covariance times ``N(0, I)``, the same on every device (official: ``symeig`` with the
      absolute-value fix only if an eigenvalue is negative, and a ``N(0, I)`` draw if sampling fails).
    - The window offset is uniform over the pool and the window wraps around (official: offsets below 10,000
      are redrawn, and an exhausted loader restarts at a new random offset).
    - The kept images reach the steps through the candidate stream's pass orderings (as for NTOM), not through a
      shuffled loader of the kept images.

    Args:
        conf: regression target magnitude, ``-conf`` for ID and ``+conf`` for outliers (3.0).
        sigma: prior variance of ``beta`` (20).
        sigma_n: noise variance of the regression, also the variance of the label noise draw (0.5).
        buffer_epochs: number of most recent epochs whose training rows the posterior uses (``BUF_SIZE`` = 4).
        pool_factor: scanned images per kept image (8 = 200 x 2000 scanned / 50,000 kept on CIFAR).
        keep_factor: kept images per ID training image (``ood_factor`` = 1).
        id_train_size: number of ID training images (also set by :meth:`setup`); ``None`` = keep
            ``len(pool) // pool_factor`` (scan the whole pool).
        batch_size: scan batch size.
        num_workers: scan loader workers.
        seed: seed of the label noise, the Thompson draws, the window offsets and the scan augmentation.
    """

    conf: float = 3.0
    sigma: float = 20.0
    sigma_n: float = 0.5
    buffer_epochs: int = 4
    pool_factor: float = 8.0
    keep_factor: float = 1.0
    id_train_size: int | None = None
    batch_size: int = 256
    num_workers: int = 0
    seed: int = 0
    needs_features: ClassVar[bool] = True
    lower_bounds: ClassVar[Bounds] = {
        **MINER_BOUNDS,
        "sigma": (">", 0.0),
        "sigma_n": (">", 0.0),
        "buffer_epochs": (">=", 1),
    }
    _closed: list[dict[str, Tensor]] = field(default_factory=list, init=False, repr=False)  # oldest first
    _open: dict[str, Tensor] | None = field(default=None, init=False, repr=False)  # the epoch being observed

    @property
    def label_noise(self) -> float:
        """The run's one draw ``N(0, sigma_n)`` added to every regression target."""
        gen = torch.Generator().manual_seed(_seed_from(self.seed))
        return float(torch.randn((), generator=gen, dtype=torch.float64)) * math.sqrt(self.sigma_n)

    def observe(self, features_id: Tensor, features_out: Tensor) -> None:
        """Add a step's ID and outlier features (N, D) to the current epoch's ``Z^T Z`` and feature sums."""
        with torch.autocast(features_id.device.type, enabled=False):
            z_id, z_out = (z.detach().flatten(1) for z in (features_id, features_out))
            z_id, z_out = (z.to(torch.float64 if z.dtype == torch.float64 else torch.float32) for z in (z_id, z_out))
            z = torch.cat([z_id, z_out])
            if self._open is None:
                d, f64 = z.shape[1], torch.float64
                self._open = {"gram": z.new_zeros(d, d, dtype=f64), "sums": z.new_zeros(2, d, dtype=f64),
                              "counts": z.new_zeros(2, dtype=f64)}  # fmt: skip
            stats = self._open = {k: v.to(z.device) for k, v in self._open.items()}  # a checkpoint may be on the CPU
            stats["gram"] += (z.T @ z).double()
            stats["sums"] += torch.stack([z_id.sum(0), z_out.sum(0)]).double()
            stats["counts"] += torch.tensor([len(z_id), len(z_out)], dtype=torch.float64, device=z.device)

    def close_epoch(self) -> None:
        """Move the current epoch's statistics (summed over DDP ranks) into the buffer of the last epochs."""
        if self._open is None:
            return
        self._open = {k: _sum_over_ranks(v) for k, v in self._open.items()}
        self._closed = [*self._closed, self._open][-self.buffer_epochs :]
        self._open = None

    def posterior(self, dim: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(mu, Sigma)`` of ``beta`` given the buffered epochs (the prior without any), float64 on ``device``."""
        if not self._closed:  # the official code's initial cov_w (its formula would give sigma^2 I)
            eye = torch.eye(dim, dtype=torch.float64, device=device)
            return torch.zeros(dim, dtype=torch.float64, device=device), self.sigma * eye
        gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        zty = torch.zeros(dim, dtype=torch.float64, device=device)
        noise = self.label_noise
        for stats in self._closed:
            sums = stats["sums"].to(device)
            gram += stats["gram"].to(device)
            zty += (noise - self.conf) * sums[0] + (noise + self.conf) * sums[1]
        return blr_posterior(gram, zty, self.sigma, self.sigma_n)

    def sample_beta(self, dim: int, position: int = 0, device: torch.device | str = "cpu") -> Tensor:
        """The Thompson draw of ``beta`` (float64, (D,)) for the epoch that starts at stream ``position``."""
        generator = torch.Generator().manual_seed(_seed_from(self.seed, position, 1))
        return thompson_sample(*self.posterior(dim, device), generator=generator)

    def mine(self, model: nn.Module, pool: Dataset, position: int = 0) -> Tensor:
        """Pool indices POEM keeps for the next epoch (sorted by ascending ``|beta . z|``)."""
        n_keep = self._keep_size(len(pool))  # type: ignore[arg-type]
        beta = self.sample_beta(model.fc.in_features, position, next(model.parameters()).device)
        window, scores = self._scan(model, pool, n_keep, position, lambda feats, _: (feats.double() @ beta).abs())
        return self._from_rank0(window[torch.argsort(scores, stable=True)[:n_keep]], model)

    def on_train_epoch_start(  # noqa: D102
        self, model: nn.Module, pool: Dataset, stream: OutlierStream, batch_size: int
    ) -> None:
        self.close_epoch()  # the posterior update after the previous epoch
        super().on_train_epoch_start(model, pool, stream, batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The buffered epochs' statistics (stacked, oldest first) and the current epoch's, all tensors.

        Under DDP the current epoch's statistics are summed over the ranks (a collective: call on every rank).
        """
        state: dict[str, Any] = {"version": 1}
        if self._closed:
            state["closed"] = {k: torch.stack([s[k] for s in self._closed]) for k in self._closed[0]}
        if self._open is not None:
            state["open"] = {k: _sum_over_ranks(v.clone()) for k, v in self._open.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output onto the CPU (:meth:`observe` moves the statistics to the features).

        Under DDP only rank 0 keeps the current epoch's statistics (they are already the sum over the ranks).
        """
        closed = state.get("closed")
        n = 0 if closed is None else len(closed["gram"])
        self._closed = [{k: v[i].cpu() for k, v in closed.items()} for i in range(n)][-self.buffer_epochs :]
        self._open = None if state.get("open") is None else {k: v.cpu() for k, v in state["open"].items()}
        if self._open is not None and _distributed() and torch.distributed.get_rank() != 0:
            self._open = {k: torch.zeros_like(v) for k, v in self._open.items()}
