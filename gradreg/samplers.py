"""Outlier samplers: which auxiliary outliers of a candidate batch a training step uses.

A sampler gets the model and the step's candidate batch (drawn by :class:`gradreg.data.outliers.OutlierStream`)
and returns indices into the candidates; the LightningModule forwards ``cat([x_id, candidates[idx]])`` once.

- ``random`` (GReg, ``--noCluster``): every candidate, i.e. the next random outlier batch.
- ``energy_cluster`` (GReg+; Sharifi, Entesari, Safaei, Patel, Fazlyab, "Gradient-Regularized Out-of-Distribution
  Detection", ECCV 2024, arXiv:2404.12368; ``clusterAndChooseSamples`` in ``train_sea.py`` of
  github.com/o4lc/Greg-OOD): eval-mode forward of the candidates, energy ``-logsumexp(f)`` per candidate,
  optional trimming to the ``[keep_start:keep_end]`` slice of the energy-sorted candidates, k-means on the
  L2-normalized penultimate features with ``k = min(num_clusters, n_id)``, per cluster the lowest-energy member
  (most ID-like) and, two-way, also the highest-energy one, then a uniformly random fill up to ``n_id``
  (two-way: ``2 * n_id``) outliers.
- ``dos`` (Jiang, Han, Liu, Zhang, Zhu, "Diversified Outlier Exposure ...", ICLR 2024, arXiv:2306.02031;
  ``train_diverse.py`` of github.com/lygjwy/DOS): the same clustering, per cluster the member with the lowest
  absent-class probability (energy for K-way models), random fill to ``n_id``.
- ``ntom`` (Chen, Li, Wu, Liang, Jha, "ATOM: Robustifying Out-of-distribution Detection Using Outlier Mining",
  ECML-PKDD 2021, arXiv:2006.15207; github.com/jfc43/informative-outlier-mining): once per epoch, score a
  random window of ``pool_factor x keep`` pool images, sort by absent-class probability (low = hard), skip the
  hardest ``quantile`` of the window and keep the next ``keep = keep_factor x |ID train|``; the stream then
  draws only from those, and every candidate is used.

k-means (:func:`kmeans`) is Lloyd's algorithm with greedy k-means++ seeding (Arthur & Vassilvitskii, "k-means++:
The Advantages of Careful Seeding", SODA 2007; ``2 + ln k`` local trials per center as in scikit-learn), best of
``n_init`` restarts by inertia, all restarts batched in torch on the features' device, deterministic (one-hot
matmuls, no atomics) given the generator. scikit-learn's ``KMeans`` per step would copy the features to the
CPU and cost more than the step's forward (``bench/sampler.py``).

Deviations from the official GReg code: the forward pass that scores the candidates runs in eval mode under
``no_grad`` and restores each module's train/eval flag afterwards (the official code also ends in train mode);
``max_iter`` defaults to 100 (scikit-learn: 300; the clusterings of 384 points converge long before).
DOS's random fill and k-means seeds come from the sampler's generator, not from numpy's global state.

Determinism: the randomness of a selection (k-means seeding, random fill) comes from a generator on the
candidates' device seeded from ``(seed, number of select calls so far)``; the call counter is the sampler's
:meth:`~OutlierSampler.state_dict` (save it to resume exactly). ``select(..., generator=g)`` overrides it.
The stream (:mod:`gradreg.data.outliers`), not the sampler, guarantees that a resumed run sees the same
candidates; the candidates' pixels also depend on the augmentation RNG of the loader workers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from gradreg.losses import energy
from gradreg.registry import Registry

if TYPE_CHECKING:
    from gradreg.data.outliers import OutlierStream

__all__ = [
    "SAMPLERS",
    "DOSSampler",
    "EnergyClusterSampler",
    "NTOMSampler",
    "OutlierSampler",
    "RandomOutliers",
    "cluster_extremes",
    "cluster_select",
    "eval_mode",
    "kmeans",
    "kmeans_plusplus",
]

logger = logging.getLogger(__name__)

Score = Literal["auto", "absent", "energy"]
PAIRWISE_MAX = 4096  # k-means++ precomputes the N x N distances up to this many points (64 MiB in float32)


# ---------------------------------------------------------------------------------------------------------------
# k-means
def _sq_dists(x: Tensor, x_sq: Tensor, centers: Tensor) -> Tensor:
    """Squared distances ``(R, N, k)`` from points ``x`` (N, D) (squared norms ``x_sq``) to centers (R, k, D)."""
    c_sq = (centers * centers).sum(-1).unsqueeze(1)  # (R, 1, k)
    prod = torch.baddbmm(c_sq, x.expand(centers.shape[0], -1, -1), centers.transpose(1, 2), alpha=-2.0)
    return (prod + x_sq[None, :, None]).clamp_min_(0.0)


def _local_trials(k: int) -> int:
    return 2 + int(math.log(k))  # scikit-learn's default number of greedy k-means++ candidates


def _seed_centers(x: Tensor, uniforms: Tensor) -> Tensor:
    """Greedy k-means++ seeding of R restarts driven by ``uniforms`` (R, k, L) in [0, 1); no host syncs.

    The first center of restart r is point ``floor(u[r, 0, 0] * N)``; center c > 0 is the best (lowest resulting
    inertia) of L points drawn by inverse-CDF sampling (``searchsorted``) with probability proportional to the
    squared distance to the nearest chosen center. Once every point coincides with a center (duplicate points,
    ``k`` > distinct points) the draw falls on the last point; Lloyd's empty-cluster rule repairs that.
    """
    n = x.shape[0]
    r, k, trials = uniforms.shape
    x_sq = (x * x).sum(1)
    pairwise = _sq_dists(x, x_sq, x.unsqueeze(0))[0] if n <= PAIRWISE_MAX else None  # (N, N)

    def dists_to(idx: Tensor) -> Tensor:  # (R, L) point indices -> (R, L, N) squared distances
        return pairwise[idx] if pairwise is not None else _sq_dists(x, x_sq, x[idx]).transpose(1, 2)

    chosen = torch.empty(r, k, dtype=torch.long, device=x.device)
    chosen[:, 0] = (uniforms[:, 0, 0] * n).long().clamp_max(n - 1)
    closest = dists_to(chosen[:, :1]).squeeze(1)  # (R, N)
    for c in range(1, k):
        cdf = closest.cumsum(1)
        cand = torch.searchsorted(cdf, uniforms[:, c] * cdf[:, -1:], right=True).clamp_max_(n - 1)  # (R, L)
        dist = torch.minimum(dists_to(cand), closest.unsqueeze(1))  # (R, L, N)
        best = dist.sum(2).argmin(1, keepdim=True)  # (R, 1)
        closest = dist.gather(1, best.unsqueeze(2).expand(-1, 1, n)).squeeze(1)
        chosen[:, c : c + 1] = cand.gather(1, best)
    return x[chosen]


def kmeans_plusplus(
    x: Tensor, k: int, n_init: int = 1, generator: torch.Generator | None = None, local_trials: int | None = None
) -> Tensor:
    """Greedy k-means++ seeding of ``n_init`` independent restarts at once.

    Each new center is the best (lowest resulting inertia) of ``local_trials`` points drawn with probability
    proportional to the squared distance to the nearest chosen center (``local_trials = 1`` is plain k-means++).
    Up to ``PAIRWISE_MAX`` points the pairwise distances are computed once, so each of the ``k - 1`` sequential
    steps is a handful of small kernels; the random numbers are drawn up front, so the loop never waits for the
    device.

    Args:
        x: points (N, D).
        k: number of centers, ``1 <= k <= N``.
        n_init: number of independent seedings R.
        generator: random generator on ``x``'s device.
        local_trials: candidates per center; default ``2 + floor(ln k)`` (scikit-learn's default).

    Returns:
        Initial centers, shape (R, k, D).
    """
    trials = local_trials if local_trials is not None else _local_trials(k)
    uniforms = torch.rand(n_init, k, trials, generator=generator, device=x.device, dtype=torch.float64)
    return _seed_centers(x, uniforms.to(x.dtype))


def _lloyd(
    x: Tensor, threshold: Tensor, centers: Tensor, labels: Tensor, done: Tensor, steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` Lloyd iterations of R restarts; a restart that has converged (``done``) stays as it is.

    Converged (scikit-learn's rule): no label changed, or the squared center shift is at most ``threshold``.
    An empty cluster moves to the point farthest from its own center (the j-th empty cluster of a restart to its
    j-th farthest point). Only tensor operations: no host syncs, so the loop can be captured in a CUDA graph.
    """
    k = centers.shape[1]
    x_sq = (x * x).sum(1)
    slots = torch.arange(k, device=x.device)
    for _ in range(steps):
        dist = _sq_dists(x, x_sq, centers)
        new_labels = dist.argmin(2)  # (R, N)
        onehot = (new_labels.unsqueeze(2) == slots).to(x.dtype)  # (R, N, k); matmuls are deterministic, atomics not
        counts = onehot.sum(1)  # (R, k)
        new_centers = torch.bmm(onehot.transpose(1, 2), x.expand(len(centers), -1, -1)) / counts.clamp_min(1)[..., None]
        empty = counts == 0
        far = dist.gather(2, new_labels.unsqueeze(2)).squeeze(2).argsort(1, descending=True)  # (R, N)
        farthest = x[far.gather(1, (empty.long().cumsum(1) - 1).clamp_(0, x.shape[0] - 1))]  # (R, k, D)
        new_centers = torch.where(empty.unsqueeze(2), farthest, new_centers)
        shift = (new_centers - centers).pow(2).sum((1, 2))
        converged = (new_labels == labels).all(1) | (shift <= threshold)
        centers = torch.where(done[:, None, None], centers, new_centers)
        labels = torch.where(done[:, None], labels, new_labels)
        done = done | converged
    return centers, labels, done


def _kmeans_start(x: Tensor, uniforms: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Seeded state ``(threshold, centers, labels, done)`` of R restarts."""
    threshold = tol * x.var(0, unbiased=False).mean()
    centers = _seed_centers(x, uniforms)
    r, n = centers.shape[0], x.shape[0]
    labels = torch.full((r, n), -1, dtype=torch.long, device=x.device)
    return threshold, centers, labels, torch.zeros(r, dtype=torch.bool, device=x.device)


@functools.lru_cache(maxsize=8)
def _kmeans_graphs(
    device: torch.device, dtype: torch.dtype, n: int, d: int, k: int, r: int, trials: int, chunk: int, tol: float
) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph, Tensor, Tensor, tuple[Tensor, ...]]:
    """Two CUDA graphs for one problem shape: seeding into static state, and ``chunk`` Lloyd steps on it in place.

    A k-means of a few hundred points is hundreds of tiny kernels; eager launches cost far more than the work.
    Returns ``(seed_graph, step_graph, static_x, static_uniforms, (threshold, centers, labels, done))``.
    """
    static_x = torch.randn(n, d, device=device, dtype=dtype)
    static_u = torch.rand(r, k, trials, device=device, dtype=dtype)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside capture: lazy cuBLAS/allocator initialization
        _lloyd(static_x, *_kmeans_start(static_x, static_u, tol), steps=1)
    torch.cuda.current_stream(device).wait_stream(side)
    seed_graph, step_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(seed_graph):
        state = _kmeans_start(static_x, static_u, tol)
    with torch.cuda.graph(step_graph, pool=seed_graph.pool()):
        for old, new in zip(state[1:], _lloyd(static_x, *state, steps=chunk), strict=True):
            old.copy_(new)
    return seed_graph, step_graph, static_x, static_u, state


def kmeans(
    x: Tensor,
    k: int,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    check_every: int = 5,
) -> tuple[Tensor, Tensor]:
    """k-means (Lloyd) with k-means++ seeding; the best of ``n_init`` restarts (run together) by inertia.

    Each restart stops when no label changes or when its squared center shift is at most
    ``tol * mean feature variance`` (scikit-learn's convention); the host checks whether all have stopped every
    ``check_every`` iterations (a converged restart is frozen, so the result does not depend on it). An empty
    cluster is moved to the point farthest from its center. Runs on ``x``'s device in float32 (float64 stays
    float64), autocast off. On CUDA the seeding and the Lloyd iterations replay CUDA graphs captured once per
    problem shape (``cuda_graph=None``: on for CUDA tensors; same numbers as the eager path).

    Args:
        x: points (N, D).
        k: number of clusters, ``1 <= k <= N``.
        n_init: number of restarts.
        max_iter: maximum number of Lloyd iterations.
        tol: relative tolerance on the center shift.
        generator: random generator on ``x``'s device (``None`` = torch's default).
        cuda_graph: replay CUDA graphs (``None`` = when ``x`` is on a CUDA device).
        check_every: Lloyd iterations between convergence checks on the host.

    Returns:
        ``(labels, centers)``: LongTensor (N,) in ``[0, k)`` and the centers (k, D).

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.0, 5.1]])
        >>> labels, centers = kmeans(x, 2, generator=torch.Generator().manual_seed(0))
        >>> bool(labels[0] == labels[1] != labels[2] == labels[3])
        True
    """
    if x.ndim != 2 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans needs points (N, D) and 1 <= k <= N, got shape {tuple(x.shape)} and k={k}")
    if n_init < 1 or max_iter < 1 or check_every < 1:
        raise ValueError(f"kmeans needs n_init, max_iter, check_every >= 1, got {n_init}, {max_iter}, {check_every}")
    graph = x.is_cuda if cuda_graph is None else cuda_graph
    with torch.autocast(x.device.type, enabled=False), torch.inference_mode(False), torch.no_grad():
        x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        uniforms = torch.rand(n_init, k, _local_trials(k), generator=generator, device=x.device, dtype=torch.float64)
        uniforms = uniforms.to(x.dtype)
        chunk = min(check_every, max_iter)
        if graph:
            seed_graph, step_graph, static_x, static_u, state = _kmeans_graphs(
                x.device, x.dtype, *x.shape, k, n_init, uniforms.shape[2], chunk, tol
            )
            static_x.copy_(x)
            static_u.copy_(uniforms)
            seed_graph.replay()
        else:
            state = _kmeans_start(x, uniforms, tol)
        for it in range(0, max_iter, chunk):
            if graph and it + chunk <= max_iter:
                step_graph.replay()
            else:
                state = (state[0], *_lloyd(x, *state, steps=min(chunk, max_iter - it)))
            if bool(state[3].all()):
                break
        centers = state[1].clone()
        best_dist, labels = _sq_dists(x, (x * x).sum(1), centers).min(2)
        best = int(best_dist.sum(1).argmin())
        return labels[best], centers[best]


# ---------------------------------------------------------------------------------------------------------------
# Selection
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
) -> Tensor:
    """GReg+'s cluster-based selection (``clusterAndChooseSamples``) on precomputed features and scores.

    1. Keep the ``[keep_start:keep_end]`` slice of the candidates sorted by ascending score.
    2. L2-normalize their features; k-means with ``k = min(num_clusters, n_id, kept)``.
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

    Returns:
        LongTensor of distinct indices into the candidates: the per-cluster picks (ascending) then the fill.
    """
    keep = torch.argsort(scores, stable=True)[keep_start:keep_end]
    m = keep.shape[0]
    n_out = min(m, n_id * (2 if two_way else 1))
    if n_out == 0:
        return keep[:0]
    k = min(num_clusters, n_id, m)
    feats = F.normalize(features[keep].float(), dim=1)
    labels, _ = kmeans(feats, k, n_init=n_init, max_iter=max_iter, generator=generator)
    chosen = cluster_extremes(scores[keep], labels, per_cluster=max(1, n_id // k), two_way=two_way)[:n_out]
    if chosen.shape[0] < n_out:
        free = torch.ones(m, dtype=torch.bool, device=keep.device)
        free[chosen] = False
        rest = free.nonzero().flatten()
        fill = rest[torch.randperm(rest.shape[0], generator=generator, device=rest.device)[: n_out - chosen.shape[0]]]
        chosen = torch.cat([chosen, fill])
    return keep[chosen]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode and restore each one's own flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def forward_candidates(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(features, logits)`` of ``x`` in eval mode without gradients (BatchNorm statistics untouched)."""
    with eval_mode(model), torch.no_grad():
        feats = model.features(x)
        return feats, model.fc(feats)


def absent_probability(logits: Tensor) -> Tensor:
    """Softmax probability of the last ("absent") class, shape (N,)."""
    return torch.softmax(logits.float(), dim=1)[:, -1]


def _outlier_scores(logits: Tensor, score: Score, num_classes: int | None) -> Tensor:
    """Scores with lower = more ID-like: the absent-class probability (K+1 outputs) or the energy."""
    if score == "auto":
        if num_classes is None:
            raise ValueError(
                "score='auto' needs num_classes (the number of ID classes) to tell a K+1-way model from a K-way one; "
                "call sampler.setup(num_classes=...) or set score: absent / energy"
            )
        score = "absent" if logits.shape[1] == num_classes + 1 else "energy"
    return absent_probability(logits) if score == "absent" else energy(logits)


# ---------------------------------------------------------------------------------------------------------------
# Samplers
class OutlierSampler:
    """Base class: choose which candidates of a step are used as outliers.

    Subclasses are dataclasses whose fields are their settings (the registry checks config keys against them).
    """

    per_epoch: ClassVar[bool] = False  #: whether :meth:`on_train_epoch_start` does work (NTOM)

    def select(self, model: nn.Module, candidates: Tensor, n_id: int) -> Tensor:
        """LongTensor of indices into ``candidates`` (on its device); the model's modes are left as found."""
        raise NotImplementedError

    def num_selected(self, n_id: int, n_candidates: int) -> int:
        """Outliers per training step for ``n_id`` ID images and ``n_candidates`` candidates."""
        return n_candidates

    def on_train_epoch_start(self, model: nn.Module, pool: Dataset, stream: OutlierStream, batch_size: int) -> None:
        """Per-epoch work (scan ``pool``, then ``stream.restrict(...)``); only ``per_epoch`` samplers do any."""

    def setup(self, num_classes: int | None = None, id_train_size: int | None = None) -> None:
        """Learn the number of ID classes and ID training images (DOS/NTOM use them; settings given win)."""
        for name, value in (("num_classes", num_classes), ("id_train_size", id_train_size)):
            if value is not None and getattr(self, name, False) is None:
                setattr(self, name, value)

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint for an exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


SAMPLERS: Registry[OutlierSampler] = Registry("sampler")


class _SeededSampler(OutlierSampler):
    """A sampler whose per-call randomness comes from ``(seed, call count)``."""

    seed: int
    _calls: int

    def _next_generator(self, device: torch.device) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self._calls]).generate_state(1, np.uint64)[0]
        self._calls += 1
        return torch.Generator(device=device).manual_seed(int(state) & (2**63 - 1))

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._calls = int(state.get("calls", 0))


@SAMPLERS.register("random")
@dataclass
class RandomOutliers(OutlierSampler):
    """GReg: use every candidate (the stream already drew them at random)."""

    def select(self, model: nn.Module, candidates: Tensor, n_id: int) -> Tensor:  # noqa: D102
        return torch.arange(candidates.shape[0], device=candidates.device)


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
        seed: seed of the per-call generators.
    """

    num_clusters: int = 64
    n_init: int = 3
    two_way: bool = True
    max_iter: int = 100
    keep_start: int = 0
    keep_end: int | None = None
    seed: int = 0
    _calls: int = field(default=0, init=False, repr=False)

    def num_selected(self, n_id: int, n_candidates: int) -> int:  # noqa: D102
        return min(n_candidates, n_id * (2 if self.two_way else 1))

    def select(  # noqa: D102
        self, model: nn.Module, candidates: Tensor, n_id: int, generator: torch.Generator | None = None
    ) -> Tensor:
        feats, logits = forward_candidates(model, candidates)
        gen = generator if generator is not None else self._next_generator(candidates.device)
        return cluster_select(
            feats, energy(logits), n_id, self.num_clusters, self.n_init, self.two_way, self.max_iter,
            self.keep_start, self.keep_end, gen,
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
            (``absent`` iff the model has ``num_classes + 1`` outputs).
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

    def num_selected(self, n_id: int, n_candidates: int) -> int:  # noqa: D102
        return min(n_candidates, n_id)

    def select(  # noqa: D102
        self, model: nn.Module, candidates: Tensor, n_id: int, generator: torch.Generator | None = None
    ) -> Tensor:
        feats, logits = forward_candidates(model, candidates)
        scores = _outlier_scores(logits, self.score, self.num_classes)
        gen = generator if generator is not None else self._next_generator(candidates.device)
        return cluster_select(feats, scores, n_id, self.num_clusters, self.n_init, False, self.max_iter, generator=gen)


@SAMPLERS.register("ntom")
@dataclass
class NTOMSampler(OutlierSampler):
    """NTOM: each epoch keep a block of hard (but not the hardest) outliers from a scanned pool window.

    At the start of each epoch: scan ``pool_factor * keep`` pool images (a contiguous window at a random offset,
    wrapping around), sort them by ascending score (absent-class probability; low = hard), skip the lowest
    ``quantile`` of the window and keep the next ``keep = keep_factor * id_train_size`` images; the stream then
    draws only from them and :meth:`select` uses every candidate. NTOM's OOD batch is twice the ID batch.

    The scan is deterministic: its augmentation RNG is seeded from ``(seed, stream.position)`` (the global RNG
    is left untouched). Under DDP every rank scans the same window and rank 0's choice is broadcast.

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
    per_epoch: ClassVar[bool] = True

    def select(self, model: nn.Module, candidates: Tensor, n_id: int) -> Tensor:  # noqa: D102
        return torch.arange(candidates.shape[0], device=candidates.device)

    def mine(self, model: nn.Module, pool: Dataset, position: int = 0) -> Tensor:
        """Pool indices NTOM keeps for the next epoch (sorted by ascending score, hardest first)."""
        n_pool = len(pool)  # type: ignore[arg-type]
        if self.id_train_size is not None:
            n_keep = max(1, round(self.keep_factor * self.id_train_size))
        else:
            n_keep = max(1, int(n_pool / self.pool_factor))
        n_scan = min(n_pool, math.ceil(self.pool_factor * n_keep))
        seed = int(np.random.SeedSequence([self.seed, position]).generate_state(1, np.uint64)[0] & (2**63 - 1))
        offset = int(torch.randint(n_pool, (1,), generator=torch.Generator().manual_seed(seed)))
        window = (offset + torch.arange(n_scan)) % n_pool
        device = next(model.parameters()).device
        loader = DataLoader(
            Subset(pool, window.tolist()),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(seed),  # worker seeds
        )
        scores = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # augmentation in this process (num_workers=0)
            for x, _ in loader:
                _, logits = forward_candidates(model, x.to(device, non_blocking=True))
                scores.append(_outlier_scores(logits, self.score, self.num_classes).float().cpu())
        order = torch.argsort(torch.cat(scores), stable=True)
        skip = int(self.quantile * n_scan)
        kept = window[order[skip : skip + n_keep]]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            kept = kept.to(device)
            torch.distributed.broadcast(kept, src=0)  # float ties may order differently across ranks
            kept = kept.cpu()
        return kept

    def on_train_epoch_start(  # noqa: D102
        self, model: nn.Module, pool: Dataset, stream: OutlierStream, batch_size: int
    ) -> None:
        stream.restrict(self.mine(model, pool, stream.position))
