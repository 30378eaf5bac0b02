"""OOD detection metrics computed once over whole score sets (pure numpy, float64, exact).

Convention: scores are **higher = more in-distribution** (the scorer contract, ``gradreg.scorers.base``).
Inputs are 1-D torch tensors, numpy arrays or sequences of raw scores in any range; they are converted to
float64 once and never squashed. Accumulate raw scores over a whole evaluation set (e.g. by concatenation) and
call these functions once: unlike ``torchmetrics`` (issues #2195, #2819), there is no per-batch auto-sigmoid,
so energy or GradNorm scores in the hundreds fed in batches of one give the same numbers as the full set.

Metrics and conventions (``ECOSYSTEM.md`` §3.5):

- ``auroc``: area under the ROC curve with ID as the positive class, exact and rank based
  (Mann-Whitney U with average ranks, so a tied ID/OOD pair counts 1/2). Equal to
  ``sklearn.metrics.roc_auc_score``.
- ``fpr95`` / ``fpr_at_tpr``: the false positive rate of the energy/OE/GReg papers (Liu et al., NeurIPS 2020,
  arXiv:2010.03759; Sharifi et al., ECCV 2024, arXiv:2404.12368): ID is positive, and the value is the fraction
  of OOD samples accepted as ID at the threshold that keeps 95% of ID samples.
- ``fpr95_oodpos``: the OpenOOD / pytorch-ood convention (OOD positive, score negated): the fraction of ID
  samples flagged as OOD at the threshold that catches 95% of OOD samples. It is *not* the same number
  (OpenOOD issues #206, #308); the metric key says which one is reported.
- ``aupr_in`` / ``aupr_out``: average precision with ID (resp. OOD, scores negated) as the positive class,
  step-wise ``AP = sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds, as ``sklearn.metrics.
  average_precision_score`` and torchmetrics' ``BinaryAveragePrecision``. OpenOOD instead integrates the
  precision-recall curve with the trapezoid rule (``sklearn.metrics.auc``), which gives slightly larger values.

Threshold rule for ``fpr_at_tpr`` (the ``sklearn.metrics.roc_curve`` convention): every distinct score value
is one candidate threshold ``t`` (a sample is accepted as ID iff ``score >= t``), so tied scores are always
accepted or rejected together. Among the operating points whose TPR (fraction of ID accepted, computed as a
float64 ratio) is ``>= tpr``, the smallest FPR is returned; with TPR and FPR both non-increasing in ``t`` this is
the point with the largest such threshold. This equals ``fpr[np.searchsorted(tpr_arr, tpr)]`` on
``roc_curve(..., drop_intermediate=False)``. The energy_ood / GReg scripts (``fpr_and_fdr_at_recall``) differ in
two ways: they pick the recall *nearest* to 0.95 (``argmin |recall - 0.95|``, which can sit slightly below 95% TPR),
and among the thresholds with that recall the *lowest*, so they also count the OOD samples scored between the last
accepted ID sample and the next ID sample. Where some threshold gives exactly 95% TPR their value is never below
ours; on continuous scores the gap is those few OOD samples (under 0.1 percentage point in simulated normal
scores of 10,000 ID vs 26,032 OOD samples). ``fpr95_oodpos`` likewise uses every ROC point; OpenOOD calls
``roc_curve`` with its default ``drop_intermediate=True``, which can drop points inside runs of tied scores and
then report a larger value (never without ties).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray | Sequence[float]

__all__ = [
    "accuracy",
    "as_scores",
    "aupr_in",
    "aupr_out",
    "auroc",
    "fpr95",
    "fpr95_oodpos",
    "fpr_at_tpr",
    "ood_metrics",
    "roc_curve",
]


def as_scores(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a finite, non-empty 1-D float64 numpy array, or raise ``ValueError``.

    Example:
        >>> as_scores(torch.tensor([1.0, 2.0])).dtype
        dtype('float64')
    """
    if isinstance(scores, Tensor):
        arr = scores.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per sample), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) out of {arr.size} ({n_nan} NaN, {bad - n_nan} inf); "
            "scores must be finite"
        )
    return arr


def _binary_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positive counts at each distinct threshold, thresholds decreasing.

    Sample ``i`` is predicted positive at threshold ``t`` iff ``score_i >= t``. Returns ``(tps, fps, thresholds)``
    with one entry per distinct score value (no leading ``(0, 0)`` point).
    """
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    # Index of the last sample of each group of tied scores: tied scores form one threshold.
    last = np.flatnonzero(np.diff(scores)) if scores.size > 1 else np.empty(0, dtype=np.int64)
    last = np.append(last, scores.size - 1)
    tps = np.cumsum(labels)[last]
    fps = (last + 1) - tps
    return tps, fps, scores[last]


def roc_curve(id_scores: ArrayLike, ood_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with ID as the positive class, one point per distinct score plus the origin.

    Args:
        id_scores: scores of in-distribution samples (higher = more ID), shape (N_id,).
        ood_scores: scores of OOD samples, shape (N_ood,).

    Returns:
        ``(fpr, tpr, thresholds)`` as float64 arrays of equal length, thresholds decreasing; the first point is
        ``(0, 0)`` with threshold ``+inf`` and the last is ``(1, 1)`` (as ``sklearn.metrics.roc_curve`` with
        ``drop_intermediate=False``).

    Example:
        >>> fpr, tpr, thr = roc_curve([0.9, 0.4], [0.6])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0])
    """
    pos, neg = as_scores(id_scores, "id_scores"), as_scores(ood_scores, "ood_scores")
    tps, fps, thresholds = _binary_counts(pos, neg)
    fpr = np.concatenate([[0.0], fps / neg.size])
    tpr = np.concatenate([[0.0], tps / pos.size])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def auroc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the ROC curve, ID positive: ``P(s_id > s_ood) + 0.5 * P(s_id = s_ood)``.

    Computed exactly from average ranks (Mann-Whitney U), so it is invariant to any strictly increasing map
    of the scores and needs no binning.

    Args:
        id_scores: scores of in-distribution samples (higher = more ID), shape (N_id,).
        ood_scores: scores of OOD samples, shape (N_ood,).

    Returns:
        AUROC in [0, 1]; 0.5 for indistinguishable sets.

    Example:
        >>> auroc([3.0, 2.0], [1.0, 0.0])
        1.0
        >>> auroc([1.0, 0.0], [1.0])  # one tie (1/2) and one loss
        0.25
    """
    pos, neg = as_scores(id_scores, "id_scores"), as_scores(ood_scores, "ood_scores")
    scores = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: the ranks of a tied group are first..first+count-1.
    first = np.cumsum(counts) - counts + 1
    avg_rank = first + (counts - 1) / 2.0
    rank_sum = avg_rank[inverse.reshape(-1)[: pos.size]].sum()
    u = rank_sum - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def fpr_at_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted at the threshold that keeps ``tpr`` of the ID samples (ID positive).

    Threshold rule: see the module docstring (smallest FPR among the operating points with TPR >= ``tpr``;
    tied scores form a single threshold).

    Args:
        id_scores: scores of in-distribution samples (higher = more ID), shape (N_id,).
        ood_scores: scores of OOD samples, shape (N_ood,).
        tpr: required true positive rate (ID recall), in (0, 1].

    Returns:
        The false positive rate in [0, 1] (lower is better).

    Example:
        >>> fpr_at_tpr(list(range(1, 21)), [0.5, 1.5, 10.5])  # keep 19/20 ID: accept >= 2
        0.3333333333333333
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    fpr_arr, tpr_arr, _ = roc_curve(id_scores, ood_scores)
    return float(fpr_arr[np.searchsorted(tpr_arr, tpr, side="left")])


def fpr95(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """FPR of OOD at 95% TPR of ID (ID positive; the GReg / energy papers' FPR95).

    Example:
        >>> fpr95([1.0, 2.0, 3.0], [0.0, 2.5])  # keep all 3 ID: accept >= 1
        0.5
    """
    return fpr_at_tpr(id_scores, ood_scores, 0.95)


def fpr95_oodpos(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """FPR95 in the OpenOOD / pytorch-ood convention: OOD positive, scores negated.

    The fraction of ID samples flagged as OOD at the threshold that catches 95% of the OOD samples.

    Example:
        >>> fpr95_oodpos([1.0, 2.0, 3.0], [0.0, 2.5])
        0.6666666666666666
    """
    neg_ood = -as_scores(ood_scores, "ood_scores")
    neg_id = -as_scores(id_scores, "id_scores")
    return fpr_at_tpr(neg_ood, neg_id, 0.95)


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    tps, fps, _ = _binary_counts(pos, neg)
    precision = tps / (tps + fps)
    new_positives = np.diff(tps, prepend=0)  # recall gain times N_pos; one division at the end keeps AP = 1 exact
    return float(np.sum(new_positives * precision) / pos.size)


def aupr_in(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with ID as the positive class (step-wise, as ``sklearn.metrics.average_precision_score``).

    Example:
        >>> round(aupr_in([0.9, 0.4], [0.6]), 4)  # 0.5 * 1 + 0.5 * 2/3
        0.8333
    """
    return _average_precision(as_scores(id_scores, "id_scores"), as_scores(ood_scores, "ood_scores"))


def aupr_out(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with OOD as the positive class and scores negated (step-wise).

    Example:
        >>> aupr_out([0.9, 0.4], [0.6])
        0.5
    """
    return _average_precision(-as_scores(ood_scores, "ood_scores"), -as_scores(id_scores, "id_scores"))


OOD_METRICS = ("auroc", "fpr95", "fpr95_oodpos", "aupr_in", "aupr_out")


def ood_metrics(id_scores: ArrayLike, ood_scores: ArrayLike) -> dict[str, float]:
    """All OOD metrics of one (ID set, OOD set, scorer) triple.

    Args:
        id_scores: scores of in-distribution samples (higher = more ID), shape (N_id,).
        ood_scores: scores of OOD samples, shape (N_ood,).

    Returns:
        ``{"auroc", "fpr95", "fpr95_oodpos", "aupr_in", "aupr_out"}``, each a float in [0, 1].

    Example:
        >>> ood_metrics([2.0, 3.0], [0.0, 1.0])
        {'auroc': 1.0, 'fpr95': 0.0, 'fpr95_oodpos': 0.0, 'aupr_in': 1.0, 'aupr_out': 1.0}
    """
    pos, neg = as_scores(id_scores, "id_scores"), as_scores(ood_scores, "ood_scores")
    return {
        "auroc": auroc(pos, neg),
        "fpr95": fpr95(pos, neg),
        "fpr95_oodpos": fpr95_oodpos(pos, neg),
        "aupr_in": aupr_in(pos, neg),
        "aupr_out": aupr_out(pos, neg),
    }


def accuracy(logits_or_preds: ArrayLike, targets: ArrayLike) -> float:
    """Top-1 accuracy from logits (N, C) (argmax over classes) or predicted labels (N,), integers or integral floats.

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        0.5
        >>> accuracy([1, 2, 3], [1, 2, 0])
        0.6666666666666666
    """
    preds = torch.as_tensor(logits_or_preds).detach().cpu()
    target = _labels(torch.as_tensor(targets).detach().cpu().reshape(-1), "targets", "integer labels")
    if preds.ndim == 2:
        preds = preds.argmax(dim=1)
    elif preds.ndim != 1:
        raise ValueError(f"expected logits (N, C) or labels (N,), got shape {tuple(preds.shape)}")
    else:
        preds = _labels(preds, "predictions (N,)", "logits (N, C) or integer labels (N,)")
    if preds.shape[0] != target.shape[0]:
        raise ValueError(f"{preds.shape[0]} predictions but {target.shape[0]} targets")
    if target.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((preds == target).double().mean())


def _labels(values: Tensor, what: str, expected: str) -> Tensor:
    """``values`` as int64 labels; floats with a fractional part (inf and NaN too) are refused, not truncated."""
    if values.is_floating_point():
        fractional = values[values.frac() != 0]  # the frac of inf and NaN is NaN
        if fractional.numel():
            raise ValueError(
                f"{what} hold non-integral values such as {fractional[0].item():g}, not labels; pass {expected}"
            )
    return values.long()
