"""Tests for gradreg.metrics: sklearn reference values, hand-worked cases and hypothesis properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from gradreg.metrics import (
    accuracy,
    as_scores,
    aupr_in,
    aupr_out,
    auroc,
    fpr95,
    fpr95_oodpos,
    fpr_at_tpr,
    ood_metrics,
    roc_curve,
)

PROPERTY = settings(max_examples=40, deadline=None)


def sklearn_reference(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """The same metrics from sklearn, ID labelled 1; FPR at the first ROC point with TPR >= 0.95."""
    scores = np.concatenate([id_scores, ood_scores])
    labels = np.concatenate([np.ones(len(id_scores)), np.zeros(len(ood_scores))])

    def fpr_at_95(y: np.ndarray, s: np.ndarray) -> float:
        fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
        return float(fpr[np.argmax(tpr >= 0.95)])

    return {
        "auroc": skm.roc_auc_score(labels, scores),
        "fpr95": fpr_at_95(labels, scores),
        "fpr95_oodpos": fpr_at_95(1 - labels, -scores),
        "aupr_in": skm.average_precision_score(labels, scores),
        "aupr_out": skm.average_precision_score(1 - labels, -scores),
    }


def _seeded_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        ("gaussian", rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 200)),
        ("heavy_ties", rng.integers(0, 4, 257).astype(float), rng.integers(0, 3, 143).astype(float)),
        ("integer_valued", rng.integers(-50, 50, 100).astype(float), rng.integers(-60, 40, 1000).astype(float)),
        ("energy_range", rng.normal(-12.0, 3.0, 500), rng.normal(-7.0, 2.0, 500)),
        ("gradnorm_range", rng.exponential(300.0, 400), rng.exponential(120.0, 350)),
        ("all_tied", np.full(20, 3.0), np.full(30, 3.0)),
        ("tiny", np.array([0.2]), np.array([0.1, 0.3])),
        ("single_each", np.array([1.0]), np.array([1.0])),
        ("id_below_ood", rng.normal(-5.0, 1.0, 50), rng.normal(5.0, 1.0, 40)),
    ]


@pytest.mark.parametrize(("name", "id_scores", "ood_scores"), _seeded_cases(), ids=[c[0] for c in _seeded_cases()])
def test_metrics_match_sklearn(name: str, id_scores: np.ndarray, ood_scores: np.ndarray) -> None:
    ours = ood_metrics(id_scores, ood_scores)
    ref = sklearn_reference(id_scores, ood_scores)
    assert set(ours) == {"auroc", "fpr95", "fpr95_oodpos", "aupr_in", "aupr_out"}
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_roc_curve_matches_sklearn_without_dropped_points() -> None:
    rng = np.random.default_rng(1)
    id_scores, ood_scores = rng.integers(0, 10, 80).astype(float), rng.integers(0, 8, 60).astype(float)
    fpr, tpr, thr = roc_curve(id_scores, ood_scores)
    labels = np.r_[np.ones(80), np.zeros(60)]
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(labels, np.r_[id_scores, ood_scores], drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thr[1:], ref_thr[1:])
    assert thr[0] == np.inf


def test_torch_float32_input_is_converted_to_float64_once() -> None:
    rng = np.random.default_rng(2)
    id_np, ood_np = rng.normal(1.0, 1.0, 100).astype(np.float32), rng.normal(0.0, 1.0, 90).astype(np.float32)
    from_torch = ood_metrics(torch.from_numpy(id_np), torch.from_numpy(ood_np))
    assert from_torch == ood_metrics(id_np.astype(np.float64), ood_np.astype(np.float64))
    assert as_scores(torch.from_numpy(id_np)).dtype == np.float64


# Hand-worked cases.


def test_auroc_hand_worked_with_ties() -> None:
    # pairs (id, ood): (2,1) win, (2,2) tie, (1,1) tie, (1,2) loss -> (1 + 0.5 + 0.5 + 0) / 4
    assert auroc([2.0, 1.0], [1.0, 2.0]) == 0.5
    # (3 > 1, 3 > 2, 2 > 1, 2 = 2) -> 3.5 / 4
    assert auroc([3.0, 2.0], [1.0, 2.0]) == 0.875


def test_fpr_at_tpr_hand_worked() -> None:
    id_scores = np.arange(1, 21, dtype=float)  # 20 ID scores 1..20
    # Keeping 19/20 = 95% of ID means accepting scores >= 2: of the OOD scores only 10.5 is accepted.
    assert fpr95(id_scores, [0.5, 1.5, 10.5]) == pytest.approx(1 / 3)
    # 90% of ID: accept >= 3, OOD 10.5 only; 100% of ID: accept >= 1, OOD 1.5 and 10.5.
    assert fpr_at_tpr(id_scores, [0.5, 1.5, 10.5], tpr=0.9) == pytest.approx(1 / 3)
    assert fpr_at_tpr(id_scores, [0.5, 1.5, 10.5], tpr=1.0) == pytest.approx(2 / 3)


def test_fpr95_counts_tied_scores_as_one_threshold() -> None:
    # Ten ID scores; the lowest two tie with an OOD score at 1. 95% TPR needs all 10 ID (9/10 < 0.95), so the
    # threshold is 1 and the tied OOD sample is accepted with them.
    id_scores = [1.0, 1.0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert fpr95(id_scores, [1.0, 0.0]) == 0.5
    # At 80% TPR the threshold 2 is enough, rejecting the tie.
    assert fpr_at_tpr(id_scores, [1.0, 0.0], tpr=0.8) == 0.0


def test_fpr95_oodpos_differs_from_fpr95() -> None:
    # 3 ID, 2 OOD. ID positive: keep all ID (>= 1) -> accepts OOD 2.5 -> 1/2.
    # OOD positive: catch both OOD (score <= 2.5) -> flags ID 1 and 2 -> 2/3.
    assert fpr95([1.0, 2.0, 3.0], [0.0, 2.5]) == 0.5
    assert fpr95_oodpos([1.0, 2.0, 3.0], [0.0, 2.5]) == pytest.approx(2 / 3)


def test_average_precision_hand_worked() -> None:
    # Ranking 0.9 (ID), 0.6 (OOD), 0.4 (ID): AP_in = 1/2 * 1 + 1/2 * 2/3; AP_out: the OOD sample is second of 3
    # when ranked by -score: precision 1/2.
    assert aupr_in([0.9, 0.4], [0.6]) == pytest.approx(5 / 6)
    assert aupr_out([0.9, 0.4], [0.6]) == pytest.approx(0.5)
    # Step-wise AP, not the trapezoid (OpenOOD): all tied gives the positive rate, not 0.5 + rate / 2.
    assert aupr_in([1.0], [1.0, 1.0, 1.0]) == pytest.approx(0.25)


def test_accuracy_from_logits_and_from_labels() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 1, 0])
    assert accuracy(logits, targets) == 0.75
    assert accuracy(logits.argmax(1), targets) == 0.75
    assert accuracy(np.array([1, 2]), [1, 2]) == 1.0


@pytest.mark.parametrize(
    ("logits", "targets", "message"),
    [
        (torch.zeros(3, 2), torch.zeros(2), "3 predictions but 2 targets"),
        (torch.zeros(2, 2, 2), torch.zeros(2), "expected logits"),
        (torch.zeros(0), torch.zeros(0), "empty"),
    ],
)
def test_accuracy_rejects_bad_shapes(logits: torch.Tensor, targets: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        accuracy(logits, targets)


@pytest.mark.parametrize("preds", [[0.7, 1.2], torch.tensor([0.0, math.nan]), np.array([1.0, np.inf])])
def test_accuracy_refuses_float_predictions_that_are_not_labels(preds: object) -> None:
    # 1-D floats were truncated to labels: [0.7, 1.2] scored as [0, 1], a perfect accuracy.
    with pytest.raises(ValueError, match=r"non-integral values such as .*; pass logits \(N, C\) or integer labels"):
        accuracy(preds, [0, 1])
    assert accuracy(torch.tensor([0.0, 1.0]), [0, 0]) == 0.5  # integral floats are labels
    with pytest.raises(
        ValueError, match=r"targets hold non-integral values such as 0.5, not labels; pass integer labels"
    ):
        accuracy([0, 1], [0.5, 1.0])
    assert accuracy([0, 1], torch.tensor([0.0, 0.0])) == 0.5


# Errors.


def test_non_finite_scores_raise_with_count() -> None:
    with pytest.raises(ValueError, match=r"ood_scores contains 3 non-finite value\(s\) out of 5 \(2 NaN, 1 inf\)"):
        auroc([1.0, 2.0], [np.nan, np.nan, np.inf, 0.0, 1.0])
    with pytest.raises(ValueError, match="id_scores contains 1 non-finite"):
        ood_metrics(torch.tensor([1.0, -float("inf")]), torch.tensor([0.0]))


@pytest.mark.parametrize("fn", [auroc, fpr95, fpr95_oodpos, aupr_in, aupr_out, ood_metrics])
def test_empty_or_2d_scores_raise(fn) -> None:
    with pytest.raises(ValueError, match="empty"):
        fn([], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        fn(np.zeros((3, 2)), [1.0])


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5])
def test_fpr_at_tpr_rejects_bad_tpr(tpr: float) -> None:
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr([1.0], [0.0], tpr=tpr)


# Properties.

# Multiples of 1/8 in [-12.5, 12.5]: exactly representable and spaced widely enough that exp, 3x + 7 and x**3
# stay strictly increasing in float64 (no two distinct values collapse), with plenty of ties.
grid_scores = st.lists(st.integers(-100, 100).map(lambda k: k / 8.0), min_size=1, max_size=40)
strictly_increasing_maps = [math.exp, lambda s: 3.0 * s + 7.0, lambda s: s**3, lambda s: math.atan(s / 20.0)]


@PROPERTY
@given(id_scores=grid_scores, ood_scores=grid_scores, map_index=st.integers(0, len(strictly_increasing_maps) - 1))
def test_metrics_invariant_to_strictly_increasing_maps(
    id_scores: list[float], ood_scores: list[float], map_index: int
) -> None:
    fn = strictly_increasing_maps[map_index]
    mapped = ood_metrics([fn(s) for s in id_scores], [fn(s) for s in ood_scores])
    assert mapped == ood_metrics(id_scores, ood_scores)


@PROPERTY
@given(id_scores=grid_scores, ood_scores=grid_scores)
def test_swapping_id_and_ood_gives_one_minus_auroc(id_scores: list[float], ood_scores: list[float]) -> None:
    assert auroc(ood_scores, id_scores) == pytest.approx(1.0 - auroc(id_scores, ood_scores), abs=1e-12)


@PROPERTY
@given(id_scores=grid_scores, ood_scores=grid_scores, gap=st.floats(0.125, 100.0))
def test_perfect_separation_gives_auroc_one_and_fpr95_zero(
    id_scores: list[float], ood_scores: list[float], gap: float
) -> None:
    shift = max(ood_scores) - min(id_scores) + gap  # every ID score now exceeds every OOD score
    separated = [s + shift for s in id_scores]
    result = ood_metrics(separated, ood_scores)
    assert result == {"auroc": 1.0, "fpr95": 0.0, "fpr95_oodpos": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}


@PROPERTY
@given(id_scores=grid_scores, ood_scores=grid_scores)
def test_metrics_match_sklearn_on_random_tied_grids(id_scores: list[float], ood_scores: list[float]) -> None:
    ours, ref = ood_metrics(id_scores, ood_scores), sklearn_reference(np.array(id_scores), np.array(ood_scores))
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


@PROPERTY
@given(
    id_offsets=st.lists(st.integers(-2000, 2000), min_size=2, max_size=30),
    ood_offsets=st.lists(st.integers(-3000, 1000), min_size=2, max_size=30),
)
def test_scores_near_100_in_batches_of_one_match_full_set_and_rescaled(
    id_offsets: list[int], ood_offsets: list[int]
) -> None:
    """The torchmetrics auto-sigmoid trap (TM#2195, #2819): float32 scores around 100, fed one per batch."""
    id_full = torch.tensor([100.0 + k / 100.0 for k in id_offsets], dtype=torch.float32)
    ood_full = torch.tensor([100.0 + k / 100.0 for k in ood_offsets], dtype=torch.float32)
    # Accumulate batch-of-one outputs by concatenation, as an evaluation loop with batch size 1 would.
    id_batches = torch.cat([id_full[i : i + 1] for i in range(len(id_full))])
    ood_batches = torch.cat([ood_full[i : i + 1] for i in range(len(ood_full))])
    full = ood_metrics(id_full, ood_full)
    assert ood_metrics(id_batches, ood_batches) == full
    # A global monotone rescale into [0, 1] (what torchmetrics would need) gives the same numbers.
    low = float(torch.cat([id_full, ood_full]).double().min())
    rescaled = ood_metrics((id_full.double() - low) / 100.0, (ood_full.double() - low) / 100.0)
    assert rescaled == full
    # And a sigmoid applied to these saturates in float32: exactly the collapse our metrics avoid.
    assert torch.sigmoid(id_full).eq(1.0).all()


def test_set_metrics_gives_nan_to_a_scorer_with_non_finite_scores_only() -> None:
    from gradreg.evaluation import ScoredSet, set_metrics

    rng = np.random.default_rng(0)
    id_set = ScoredSet({"msp": rng.normal(1, 1, 20), "broken": np.r_[np.nan, rng.normal(size=19)]})
    ood_set = ScoredSet({"msp": rng.normal(0, 1, 30), "broken": rng.normal(size=30)})
    with pytest.warns(UserWarning, match=r"scorer 'broken': id_scores contains 1 non-finite value"):
        result = set_metrics(id_set, ood_set)
    assert result["msp"] == ood_metrics(id_set.scores["msp"], ood_set.scores["msp"])
    assert set(result["broken"]) == set(result["msp"])
    assert all(math.isnan(v) for v in result["broken"].values())


def test_sample_is_a_fixed_random_subset_that_spans_a_class_sorted_set() -> None:
    from torch.utils.data import TensorDataset

    from gradreg.evaluation import sample

    labels = torch.arange(1000) // 100  # ten classes, listed class by class as in a folder dataset
    dataset = TensorDataset(torch.zeros(1000, 1), labels)
    chosen = sample(dataset, 200)
    assert len(chosen) == 200
    assert chosen.indices == sorted(set(chosen.indices))
    assert chosen.indices == sample(dataset, 200).indices  # the same every call
    assert chosen.indices != sample(dataset, 200, seed=1).indices
    counts = torch.bincount(labels[chosen.indices], minlength=10)
    assert counts.min() >= 8  # the first 200 would be classes 0 and 1 only
    assert list(sample(dataset, None).indices) == list(range(1000)) == list(sample(dataset, 5000).indices)


def test_torch_float64_scores_keep_their_precision() -> None:
    # Scores 1e-9 apart (e.g. a float64 scorer near 1): a float32 detour would tie them all.
    id_t = torch.tensor([1.0 + 2e-9, 1.0 + 3e-9], dtype=torch.float64)
    ood_t = torch.tensor([1.0, 1.0 + 1e-9], dtype=torch.float64)
    np.testing.assert_array_equal(as_scores(id_t), id_t.numpy())
    assert auroc(id_t, ood_t) == 1.0
    assert fpr95(id_t, ood_t) == 0.0
    assert ood_metrics(id_t, ood_t) == ood_metrics(id_t.numpy(), ood_t.numpy())
