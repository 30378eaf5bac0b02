"""Tests for gradreg.plots: PNGs are written and readable, and the ROC down-sampling keeps the curve."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gradreg.metrics import roc_curve
from gradreg.plots import roc_curves, roc_points, score_histograms

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _sets(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng.normal(2.0, 1.0, 2000), {"svhn": rng.normal(0.0, 1.0, 1500), "textures": rng.normal(1.0, 2.0, 500)}


@pytest.mark.parametrize("plot", [score_histograms, roc_curves])
def test_plots_write_valid_pngs(plot, tmp_path: Path) -> None:
    id_scores, ood = _sets()
    path = plot(id_scores, ood, "energy", tmp_path / "sub" / "plot.png")
    assert path == tmp_path / "sub" / "plot.png"
    width, height = _png_size(path)
    assert width > 100
    assert height > 100


@pytest.mark.parametrize("plot", [score_histograms, roc_curves])
def test_plots_work_with_one_ood_set_and_torch_inputs(plot, tmp_path: Path) -> None:
    import torch

    id_scores, ood = _sets(1)
    path = plot(torch.from_numpy(id_scores).float(), {"svhn": torch.from_numpy(ood["svhn"])}, "msp", tmp_path / "a.png")
    assert _png_size(path)[0] > 100


@pytest.mark.parametrize("plot", [score_histograms, roc_curves])
def test_plots_work_with_huge_and_degenerate_score_ranges(plot, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    id_scores = rng.exponential(1e12, 1000)  # GradNorm-like magnitudes
    ood = {
        "far": -rng.exponential(1e-3, 800),
        "outliers": np.r_[rng.normal(0, 1, 100), [1e300, -1e300]],  # near the float64 limit
        "constant": np.full(50, 7.0),
    }
    assert _png_size(plot(id_scores, ood, "gradnorm", tmp_path / "huge.png"))[0] > 100
    constant = plot(np.full(10, 1.0), {"same": np.full(10, 1.0)}, "constant", tmp_path / "const.png")
    assert _png_size(constant)[0] > 100
    extreme = np.array([-1.7e308, 0.0, 1.7e308])  # the whole float64 range, by quantile too
    assert _png_size(plot(extreme, {"x": extreme / 2}, "extreme", tmp_path / "extreme.png"))[0] > 100


@pytest.mark.parametrize("plot", [score_histograms, roc_curves])
def test_plots_reject_non_finite_and_empty_inputs(plot, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        plot(np.array([1.0, np.nan]), {"x": np.zeros(3)}, "s", tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plot(np.ones(3), {}, "s", tmp_path / "x.png")


def test_roc_points_downsamples_and_keeps_the_curve() -> None:
    id_scores, ood = _sets(3)
    full_fpr, full_tpr, _ = roc_curve(id_scores, ood["svhn"])
    assert full_fpr.size > 1000
    fpr, tpr = roc_points(id_scores, ood["svhn"], max_points=200)
    assert 100 <= fpr.size <= 200
    assert fpr.shape == tpr.shape
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0)
    assert np.all(np.diff(tpr) >= 0)
    # Every kept point is an exact point of the full curve, and the area barely changes.
    full = set(zip(full_fpr.tolist(), full_tpr.tolist(), strict=True))
    assert all(p in full for p in zip(fpr.tolist(), tpr.tolist(), strict=True))
    assert _trapezoid(fpr, tpr) == pytest.approx(_trapezoid(full_fpr, full_tpr), abs=2e-3)


def test_roc_points_keeps_short_curves_whole() -> None:
    fpr, tpr = roc_points([3.0, 2.0, 2.0], [1.0, 2.0])
    full_fpr, full_tpr, _ = roc_curve([3.0, 2.0, 2.0], [1.0, 2.0])
    np.testing.assert_array_equal(fpr, full_fpr)
    np.testing.assert_array_equal(tpr, full_tpr)
    with pytest.raises(ValueError, match="max_points"):
        roc_points([1.0], [0.0], max_points=1)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The matplotlib figures the plot functions save (matplotlib's savefig, wrapped to keep the figure)."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _bars(fig) -> list:
    from matplotlib.patches import Rectangle

    return [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]  # the ID histogram's bars


def test_roc_legend_gives_the_sets_auroc_and_fpr95(drawn: list, tmp_path: Path) -> None:
    # 20 ID scores 1..20: TPR moves in steps of 0.05 and reaches 0.95 exactly at the threshold 2 (19 of 20 kept);
    # the OOD scores 0.5, 1.5, 2.5, 3.5, 25: at that threshold 3.5, 2.5 and 25 are accepted, FPR95 = 3/5.
    id_scores = np.arange(1.0, 21.0)
    ood = np.array([0.5, 1.5, 2.5, 3.5, 25.0])
    roc_curves(id_scores, {"svhn": ood}, "energy", tmp_path / "roc.png")
    (fig,) = drawn
    (text,) = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    expected_auroc = roc_auc_score([1] * 20 + [0] * 5, np.r_[id_scores, ood])
    assert text == f"svhn (AUROC {expected_auroc:.3f}, FPR95 {3 / 5:.3f})"


def test_histogram_legend_gives_each_sets_auroc_and_the_bins_cover_every_set(drawn: list, tmp_path: Path) -> None:
    id_scores, ood = _sets(4)
    score_histograms(id_scores, ood, "energy", tmp_path / "hist.png")
    (fig,) = drawn
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    expected = [
        f"{name} (AUROC {roc_auc_score([1] * len(id_scores) + [0] * len(s), np.r_[id_scores, s]):.3f})"
        for name, s in ood.items()
    ]
    assert texts == ["ID", *expected]
    # the shared bins run from the lowest 0.5% quantile to the highest 99.5% quantile over all sets
    low = min(np.quantile(s, 0.005) for s in (id_scores, *ood.values()))
    high = max(np.quantile(s, 0.995) for s in (id_scores, *ood.values()))
    bars = _bars(fig)
    left = min(p.get_x() for p in bars)
    assert left == pytest.approx(low, rel=1e-9)
    right = max(p.get_x() + p.get_width() for p in bars)
    assert right == pytest.approx(high, rel=1e-9)


def test_histogram_of_constant_scores_spans_a_unit_window_around_the_value(drawn: list, tmp_path: Path) -> None:
    score_histograms(np.full(10, 1.0), {"same": np.full(10, 1.0)}, "constant", tmp_path / "const.png")
    (fig,) = drawn
    bars = _bars(fig)
    assert min(p.get_x() for p in bars) == pytest.approx(0.5)
    assert max(p.get_x() + p.get_width() for p in bars) == pytest.approx(1.5)
    assert all(p.get_width() > 0 for p in bars)


def test_histogram_counts_scores_beyond_the_range_in_the_edge_bins(drawn: list, tmp_path: Path) -> None:
    # 3 of 1000 ID scores far below the 0.5% quantile: drawn in the first bin, not dropped
    id_scores = np.r_[np.linspace(0.0, 1.0, 997), [-100.0, -100.0, -100.0]]
    score_histograms(id_scores, {"ood": np.linspace(0.0, 1.0, 500)}, "energy", tmp_path / "hist.png")
    (fig,) = drawn
    bars = sorted(_bars(fig), key=lambda p: p.get_x())
    first = bars[0]
    below = np.sum(id_scores < first.get_x() + first.get_width())  # in the bin, or below the range (-100 included)
    assert below > 3
    # density: height * width is the bin's share of all 1000 ID scores
    assert first.get_height() * first.get_width() * 1000 == pytest.approx(below)


def test_roc_points_keeps_a_curve_of_exactly_max_points_whole() -> None:
    rng = np.random.default_rng(5)
    id_scores, ood_scores = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 1.0, 30)
    full_fpr, full_tpr, _ = roc_curve(id_scores, ood_scores)
    fpr, tpr = roc_points(id_scores, ood_scores, max_points=full_fpr.size)
    np.testing.assert_array_equal(fpr, full_fpr)
    np.testing.assert_array_equal(tpr, full_tpr)
