"""k-means in torch on the features' device: greedy k-means++ seeding and Lloyd iterations, restarts batched.

Lloyd's algorithm with greedy k-means++ seeding (Arthur & Vassilvitskii, "k-means++: The Advantages of Careful
Seeding", SODA 2007; ``2 + ln k`` local trials per center as in scikit-learn), best of ``n_init`` restarts by
inertia, all restarts batched, deterministic given the generator (one-hot matmuls, no atomics). GReg+ clusters a
few hundred candidates every training step (:mod:`gradreg.samplers`): that is hundreds of tiny kernels, so on CUDA
the seeding and chunks of Lloyd iterations replay CUDA graphs captured once per problem shape (same numbers as the
eager path). scikit-learn's ``KMeans`` per step would copy the features to the CPU and cost 17x more on an H100
machine (``bench/sampler.py``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["kmeans", "kmeans_plusplus"]

PAIRWISE_MAX = 4096  # k-means++ precomputes the N x N distances up to this many points (64 MiB in float32)


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
    ``k`` > distinct points) the draw picks a duplicate: the last point when the distances are exactly 0, else the one
    the expansion's rounding favours (float32, many dimensions); Lloyd's empty-cluster rule repairs that.
    """
    n = x.shape[0]
    r, k = uniforms.shape[:2]
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
    return _seed_centers(x, _uniforms(x, k, n_init, generator, local_trials))


def _uniforms(x: Tensor, k: int, n_init: int, generator: torch.Generator | None, trials: int | None = None) -> Tensor:
    """The seeding's random numbers (R, k, L) in ``x``'s dtype, drawn in float64 so every dtype sees the same draw."""
    trials = trials if trials is not None else _local_trials(k)
    u = torch.rand(n_init, k, trials, generator=generator, device=x.device, dtype=torch.float64)
    return u.to(x.dtype)


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
    static_x = torch.zeros(n, d, device=device, dtype=dtype)  # filled before every replay; no global RNG draw
    static_u = torch.zeros(r, k, trials, device=device, dtype=dtype)
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
        uniforms = _uniforms(x, k, n_init, generator)
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
