"""Plots of OOD scores: ID-vs-OOD score histograms and ROC curves, written as PNG files.

The figures are meant for ``WandbLogger.log_image`` or a results folder (``ECOSYSTEM.md`` §3.4); they use
matplotlib's object-oriented API with the Agg canvas (no pyplot, no global backend switch, safe in
headless and multi-threaded jobs). matplotlib is imported lazily so that ``import gradreg.plots`` costs nothing
and the rest of gradreg works without it.

Scores follow the scorer contract (higher = more in-distribution). ROC curves come from
:func:`gradreg.metrics.roc_curve` (ID positive, exact) and are down-sampled to at most ``max_points`` points by
:func:`roc_points`; the FPR95 marker and the legend numbers come from the exact, full-resolution metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gradreg.metrics import ArrayLike, as_scores, auroc, roc_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["roc_curves", "roc_points", "score_histograms"]

#: Quantiles that set the shared histogram range; scores outside are counted in the edge bins.
HIST_QUANTILES = (0.005, 0.995)
HIST_BINS = 60
#: Histogram range limit: matplotlib's tick arithmetic overflows on axes wider than about 1e308. Scores beyond it
#: (finite, but of no real scorer) fall in the edge bins.
HIST_LIMIT = 1e300


def roc_points(id_scores: ArrayLike, ood_scores: ArrayLike, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (ID positive) down-sampled to at most ``max_points`` points, for plots and wandb tables.

    Points are picked evenly along the curve's L1 arc length ``fpr + tpr`` (which runs from 0 to 2), so steep and
    flat parts keep the same resolution; the end points ``(0, 0)`` and ``(1, 1)`` are always kept.

    Args:
        id_scores: scores of in-distribution samples (higher = more ID), shape (N_id,).
        ood_scores: scores of OOD samples, shape (N_ood,).
        max_points: upper bound on the number of returned points (>= 2).

    Returns:
        ``(fpr, tpr)``, float64 arrays of equal length, both non-decreasing.

    Example:
        >>> fpr, tpr = roc_points([0.9, 0.4], [0.6])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0])
    """
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    fpr, tpr, _ = roc_curve(id_scores, ood_scores)
    if fpr.size > max_points:
        arc = fpr + tpr
        targets = np.linspace(0.0, arc[-1], max_points)
        idx = np.unique(np.clip(np.searchsorted(arc, targets, side="left"), 0, arc.size - 1))
        idx[0], idx[-1] = 0, arc.size - 1
        fpr, tpr = fpr[idx], tpr[idx]
    return fpr, tpr


def _new_figure(width: float = 6.4, height: float = 4.8) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _shared_bins(all_scores: list[np.ndarray]) -> np.ndarray:
    """Bin edges from robust quantiles of every set, so that a few extreme scores cannot squash the plot."""
    lows, highs = zip(*(np.quantile(s, HIST_QUANTILES) for s in all_scores), strict=True)
    low, high = np.clip([min(lows), max(highs)], -HIST_LIMIT, HIST_LIMIT).tolist()
    if not high > low:  # constant scores: a unit-wide window around the value
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, HIST_BINS + 1)


def _checked(
    id_scores: ArrayLike, ood_scores_by_set: Mapping[str, ArrayLike]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Validated float64 ID scores and OOD scores by set (at least one set)."""
    pos = as_scores(id_scores, "id_scores")
    sets = {name: as_scores(s, f"ood_scores_by_set[{name!r}]") for name, s in ood_scores_by_set.items()}
    if not sets:
        raise ValueError("ood_scores_by_set is empty")
    return pos, sets


def score_histograms(
    id_scores: ArrayLike,
    ood_scores_by_set: Mapping[str, ArrayLike],
    scorer_name: str,
    path: str | Path,
) -> Path:
    """Write one PNG with the score histogram of the ID set and of every OOD set (shared bins, densities).

    Bins span the 0.5%-99.5% quantiles over all sets (scores outside are clipped into the edge bins), which
    suits the very different ranges of MSP, energy and GradNorm scores. Legend entries show each set's AUROC.

    Args:
        id_scores: scores of in-distribution samples (higher = more ID), shape (N_id,).
        ood_scores_by_set: OOD set name -> scores of that set.
        scorer_name: shown in the title and on the x axis.
        path: output file (``.png``); parent folders are created.

    Returns:
        The path written.
    """
    pos, sets = _checked(id_scores, ood_scores_by_set)
    edges = _shared_bins([pos, *sets.values()])
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.hist(np.clip(pos, edges[0], edges[-1]), bins=edges, density=True, alpha=0.45, color="black", label="ID")
    for name, neg in sets.items():
        label = f"{name} (AUROC {auroc(pos, neg):.3f})"
        ax.hist(
            np.clip(neg, edges[0], edges[-1]), bins=edges, density=True, histtype="step", linewidth=1.5, label=label
        )
    ax.set_xlabel(f"{scorer_name} score (higher = more in-distribution)")
    ax.set_ylabel("density")
    ax.set_title(f"{scorer_name}: ID vs OOD scores")
    ax.legend(fontsize="small")
    return _save(fig, path)


def roc_curves(
    id_scores: ArrayLike,
    ood_scores_by_set: Mapping[str, ArrayLike],
    scorer_name: str,
    path: str | Path,
    max_points: int = 1000,
) -> Path:
    """Write one PNG with the ROC curve (ID positive) of every OOD set, FPR95 marked on each.

    Args:
        id_scores: scores of in-distribution samples (higher = more ID), shape (N_id,).
        ood_scores_by_set: OOD set name -> scores of that set.
        scorer_name: shown in the title.
        path: output file (``.png``); parent folders are created.
        max_points: points per drawn curve (see :func:`roc_points`).

    Returns:
        The path written.
    """
    pos, sets = _checked(id_scores, ood_scores_by_set)
    fig = _new_figure(5.6, 5.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=0.8)
    ax.axhline(0.95, color="gray", linestyle=":", linewidth=0.8)
    for name, neg in sets.items():
        fpr, tpr = roc_points(pos, neg, max_points)
        # The FPR95 operating point (first point with TPR >= 0.95), at full resolution so it lies on the curve.
        full_fpr, full_tpr, _ = roc_curve(pos, neg)
        i95 = int(np.searchsorted(full_tpr, 0.95, side="left"))
        label = f"{name} (AUROC {auroc(pos, neg):.3f}, FPR95 {full_fpr[i95]:.3f})"
        (line,) = ax.plot(fpr, tpr, linewidth=1.5, label=label)
        ax.plot([full_fpr[i95]], [full_tpr[i95]], marker="o", color=line.get_color())
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("FPR (OOD accepted as ID)")
    ax.set_ylabel("TPR (ID accepted)")
    ax.set_title(f"{scorer_name}: ROC, ID positive")
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)
