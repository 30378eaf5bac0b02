"""Tests for gradreg.plots: PNGs are written and readable, and the ROC down-sampling keeps the curve."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

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
