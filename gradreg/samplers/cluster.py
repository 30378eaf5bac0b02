"""Per-step clustering samplers: GReg+'s ``energy_cluster`` and DOS (see :mod:`gradreg.samplers`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradreg.kmeans import kmeans
from gradreg.registry import Bounds, SettingError
from gradreg.samplers.base import SAMPLERS, Score, _outlier_scores, _SeededSampler, forward_candidates, id_energy

Representation = Literal["norm", "norm_feature", "norm_batch"]


def cluster_representation(features: Tensor, representation: Representation = "norm") -> Tensor:
    """The points k-means clusters: GReg's ``--repr`` choices, computed over the whole candidate batch.

    - ``norm``: each candidate's feature vector scaled to unit L2 norm (the default of every official run).
    - ``norm_feature``: each feature dimension scaled to unit L2 norm over the candidates (``normFeature``, the
      official CIFAR-100 WRN-40-2 run).
    - ``norm_batch``: the features divided by the candidates' mean L2 norm (``normBatch``, the official CIFAR-100
      ResNet-18 run; k-means is scale-invariant, so this clusters the raw features).

    Example:
        >>> cluster_representation(torch.tensor([[3.0, 0.0], [4.0, 1.0]]), "norm_feature")
        tensor([[0.6000, 0.0000],
                [0.8000, 1.0000]])
    """
    features = features.float()
    if representation == "norm":
        return F.normalize(features, dim=1)
    if representation == "norm_feature":
        return F.normalize(features, dim=0)
    return features / features.norm(dim=1).mean().clamp_min(1e-12)  # the clamp: all-zero features stay zero


def cluster_extremes(scores: Tensor, labels: Tensor, per_cluster: int = 1, two_way: bool = False) -> Tensor:
    """Per cluster the ``per_cluster`` lowest-score members (and, two-way, also the highest), without repeats.

    A cluster with at most ``per_cluster`` members is taken whole, once.

    Args:
        scores: (N,) scores (energy: lower = more ID-like).
        labels: (N,) cluster labels (any integers).
        per_cluster: members taken from each end of each cluster.
        two_way: also take the highest-score members.

    Returns:
        Sorted LongTensor of indices into ``scores``.

    Example:
        >>> cluster_extremes(torch.tensor([3.0, 1.0, 2.0, 0.0]), torch.tensor([0, 0, 0, 1]), two_way=True)
        tensor([0, 1, 3])
    """
    n = scores.shape[0]
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]  # grouped by cluster, ascending score within
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    group = torch.repeat_interleave(torch.arange(len(counts), device=scores.device), counts)
    rank = torch.arange(n, device=scores.device) - starts[group]
    take = rank < per_cluster
    if two_way:
        take |= rank >= counts[group] - per_cluster
    return order[take].sort().values


def cluster_select(
    features: Tensor,
    scores: Tensor,
    n_id: int,
    num_clusters: int = 64,
    n_init: int = 3,
    two_way: bool = True,
    max_iter: int = 100,
    keep_start: int = 0,
    keep_end: int | None = None,
    generator: torch.Generator | None = None,
    representation: Representation = "norm",
) -> Tensor:
    """GReg+'s cluster-based selection (``clusterAndChooseSamples``) on precomputed features and scores.

    1. Keep the ``[keep_start:keep_end]`` slice of the candidates sorted by ascending score.
    2. Their :func:`cluster_representation` (computed over all candidates, as in the official code); k-means with
       ``k = min(num_clusters, n_id, kept)``.
    3. Per cluster the ``s = max(1, n_id // k)`` lowest-score members, two-way also the ``s`` highest.
    4. Fill with uniformly random unselected kept candidates up to ``n_out = n_id`` (two-way ``2 * n_id``),
       at most the number kept.

    Args:
        features: (N, D) penultimate features of the candidates.
        scores: (N,) selection scores, lower = more ID-like (energy; DOS: absent-class probability).
        n_id: ID samples in the step.
        num_clusters: maximum number of clusters.
        n_init: k-means restarts.
        two_way: also take the highest-score member of each cluster and return twice as many outliers.
        max_iter: k-means iterations.
        keep_start: start of the kept slice of the score-sorted candidates.
        keep_end: end of that slice (``None`` = all).
        generator: random generator on the features' device.
        representation: what k-means clusters (:func:`cluster_representation`).

    Returns:
        LongTensor of distinct indices into the candidates: the per-cluster picks (ascending) then the fill.
    """
    keep = torch.argsort(scores, stable=True)[keep_start:keep_end]
    m = keep.shape[0]
    n_out = min(m, n_id * (2 if two_way else 1))
    if n_out == 0:
        return keep[:0]
    k = min(num_clusters, n_id, m)
    feats = cluster_representation(features, representation)[keep]
    labels, _ = kmeans(feats, k, n_init=n_init, max_iter=max_iter, generator=generator)
    chosen = cluster_extremes(scores[keep], labels, per_cluster=max(1, n_id // k), two_way=two_way)[:n_out]
    if chosen.shape[0] < n_out:
        free = torch.ones(m, dtype=torch.bool, device=keep.device)
        free[chosen] = False
        rest = free.nonzero().flatten()
        fill = rest[torch.randperm(rest.shape[0], generator=generator, device=rest.device)[: n_out - chosen.shape[0]]]
        chosen = torch.cat([chosen, fill])
    return keep[chosen]


KMEANS_BOUNDS: Bounds = {"num_clusters": (">=", 1), "n_init": (">=", 1), "max_iter": (">=", 1)}


@SAMPLERS.register("energy_cluster")
@dataclass
class EnergyClusterSampler(_SeededSampler):
    """GReg+: per cluster of normalized features the lowest- (and, two-way, highest-) energy candidate.

    Args:
        num_clusters: maximum number of k-means clusters (``--num_cluster``, 64; the CIFAR script uses the batch
            size).
        n_init: k-means restarts (3 in GReg, 5 in DOS).
        two_way: also take the highest-energy member per cluster; the step then gets ``2 * n_id`` outliers.
        max_iter: k-means iterations.
        keep_start: drop the ``keep_start`` lowest-energy candidates first (``--spt``; 0 in GReg+).
        keep_end: keep candidates up to this rank in the energy order (``--ept``; ``None`` = all).
        representation: what k-means clusters (``--repr``): ``norm`` (each candidate's features L2-normalized,
            the default), ``norm_feature`` (each feature dimension normalized over the candidates) or
            ``norm_batch`` (features over their mean norm); see :func:`cluster_representation`.
        seed: seed of the per-call generators.

    The energy is that of the K ID logits: a ``method: absent`` model's absent logit is left out, as in the scorers.
    """

    num_clusters: int = 64
    n_init: int = 3
    two_way: bool = True
    max_iter: int = 100
    keep_start: int = 0
    keep_end: int | None = None
    representation: Representation = "norm"
    seed: int = 0
    _calls: int = field(default=0, init=False, repr=False)
    lower_bounds: ClassVar[Bounds] = {**KMEANS_BOUNDS, "keep_start": (">=", 0), "keep_end": (">=", 1)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_end is not None and self.keep_end <= self.keep_start:
            raise SettingError(
                f"keep_end={self.keep_end} must be > keep_start={self.keep_start}: the kept slice "
                "[keep_start:keep_end] of the energy-sorted candidates would be empty"
            )

    def num_selected(self, n_id: int, n_candidates: int) -> int:  # noqa: D102
        kept = len(range(n_candidates)[self.keep_start : self.keep_end])  # the [keep_start:keep_end] slice
        return min(kept, n_id * (2 if self.two_way else 1))

    def select(  # noqa: D102
        self, model: nn.Module, candidates: Tensor, n_id: int, generator: torch.Generator | None = None
    ) -> Tensor:
        feats, logits = forward_candidates(model, candidates)
        gen = generator if generator is not None else self._next_generator(candidates.device)
        return cluster_select(
            feats, id_energy(model, logits), n_id, self.num_clusters, self.n_init, self.two_way, self.max_iter,
            self.keep_start, self.keep_end, gen, self.representation,
        )  # fmt: skip


@SAMPLERS.register("dos")
@dataclass
class DOSSampler(_SeededSampler):
    """DOS: per cluster the candidate with the lowest absent-class probability, random fill to ``n_id``.

    Args:
        num_clusters: maximum number of k-means clusters (64).
        n_init: k-means restarts (5 in the DOS code).
        max_iter: k-means iterations.
        score: ``absent`` (probability of the extra K+1-th class), ``energy`` (K-way models) or ``auto``
            (``absent`` iff the model has an absent-class head, so that its candidates get ``num_classes + 1``
            logits: ``method: absent``).
        num_classes: number of ID classes, for ``auto`` (also set by :meth:`setup`).
        seed: seed of the per-call generators.
    """

    num_clusters: int = 64
    n_init: int = 5
    max_iter: int = 100
    score: Score = "auto"
    num_classes: int | None = None
    seed: int = 0
    _calls: int = field(default=0, init=False, repr=False)
    lower_bounds: ClassVar[Bounds] = KMEANS_BOUNDS

    def num_selected(self, n_id: int, n_candidates: int) -> int:  # noqa: D102
        return min(n_candidates, n_id)

    def select(  # noqa: D102
        self, model: nn.Module, candidates: Tensor, n_id: int, generator: torch.Generator | None = None
    ) -> Tensor:
        feats, logits = forward_candidates(model, candidates)
        scores = _outlier_scores(model, logits, self.score, self.num_classes)
        gen = generator if generator is not None else self._next_generator(candidates.device)
        return cluster_select(feats, scores, n_id, self.num_clusters, self.n_init, False, self.max_iter, generator=gen)
