"""evaluate.py's results files: the adversarial sets' success rate and successful-attack protocol."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import Tensor
from torch.utils.data import Subset

from gradreg.anomalies import fgsm
from gradreg.evaluation import ScoredSet, build_scorers, score_loader
from gradreg.metrics import OOD_METRICS
from gradreg.models import Classifier
from gradreg.report import ResultWriter, add_set, print_table, save_scores, successful_attacks

# One-pixel images: class 0 when the pixel is above 1/2. FGSM with budget 1/8 moves the pixel 1/8 towards the other
# class, so it fools a correctly classified image exactly when the pixel lies within 1/8 of 1/2. Dyadic pixels keep
# the arithmetic exact: the scores (functions of |p - 1/2|) tie where the distances are equal.
PIXELS = [0.875, 0.75, 0.5625, 0.53125, 0.25, 0.40625, 0.625, 0.125]
LABELS = [0, 0, 0, 0, 1, 1, 1, 0]  # the last two are misclassified: no attack on them counts
FOOLED = [2, 3, 5]  # 18/32 -> 14/32, 17/32 -> 13/32, 13/32 -> 17/32; the other three correct images stay correct


class Threshold(Classifier):
    """logits ``(p - 0.5, 0.5 - p)`` of the pixel ``p`` (normalization: mean 0, std 1)."""

    def __init__(self) -> None:
        super().__init__(num_classes=2, feature_dim=1, in_channels=1)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc.bias.copy_(torch.tensor([-0.5, 0.5]))

    def features(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def test_adversarial_sets_report_success_rate_and_successful_attacks_against_their_clean_images(
    tmp_path: Path,
) -> None:
    model = Threshold().eval()
    x, y = torch.tensor(PIXELS).reshape(-1, 1, 1, 1), torch.tensor(LABELS)
    scorer_map = build_scorers(["energy", "msp"])
    clean = score_loader(model, [(x, y)], scorer_map)
    attacked = score_loader(model, [(fgsm(model, x, y, 0.125), y)], scorer_map)
    assert clean.preds.tolist() == [0, 0, 0, 0, 1, 1, 0, 1]
    assert attacked.preds.tolist() == [0, 0, 1, 1, 1, 0, 0, 1]

    writer = ResultWriter(tmp_path, {"id": {"dataset": "pixels", "n": 8, "accuracy": 0.75}})
    add_set(writer, "fgsm_eps31.9", "adversarial", clean, attacked)
    doc = json.loads((tmp_path / "results.json").read_text())
    entry, successful = doc["sets"]["fgsm_eps31.9"], doc["sets"]["fgsm_eps31.9/successful"]
    assert entry["attack"] == {"correct": 6, "successful": 3, "success_rate": 0.5}
    assert (entry["n"], successful["n"], successful["group"]) == (8, 3, "adversarial/successful")
    assert list(doc["means"]) == ["adversarial", "adversarial/successful"]
    for key in scorer_map:
        # all images: every attacked image against every clean one (ID positive: higher score = more ID)
        expected = roc_auc_score([1] * 8 + [0] * 8, np.concatenate([clean.scores[key], attacked.scores[key]]))
        assert entry["metrics"][key]["auroc"] == pytest.approx(expected, abs=1e-12)
        # successful: the fooled images only, against the same images before the attack
        id_side, adv_side = clean.scores[key][FOOLED], attacked.scores[key][FOOLED]
        expected = roc_auc_score([1] * 3 + [0] * 3, np.concatenate([id_side, adv_side]))
        assert successful["metrics"][key]["auroc"] == pytest.approx(expected, abs=1e-12)
        # by hand: |p - 1/2| is (2, 1, 3)/32 before and (2, 3, 1)/32 after: 3 wins and 3 ties of 9 pairs
        assert successful["metrics"][key]["auroc"] == 0.5
        # against every correctly classified clean image, (12, 8, 2, 1, 8, 3)/32, it would be 13.5 / 18
        everyone = clean.scores[key][clean.preds == clean.labels]
        assert roc_auc_score([1] * 6 + [0] * 3, np.concatenate([everyone, adv_side])) == 0.75
    markdown = (tmp_path / "results.md").read_text()
    assert "| fgsm_eps31.9/successful | adversarial/successful | energy |" in markdown
    assert "- fgsm_eps31.9: 50.00% (3 of 6)" in markdown
    csv_sets = {line.split(",")[0] for line in (tmp_path / "results.csv").read_text().splitlines()}
    assert {"fgsm_eps31.9", "fgsm_eps31.9/successful", "mean/adversarial/successful"} <= csv_sets


def test_no_successful_attack_gives_null_metrics_and_no_correct_image_a_null_rate(tmp_path: Path) -> None:
    scores = {"energy": np.array([1.0, 2.0, 3.0])}
    clean = ScoredSet(scores, preds=np.array([0, 1, 1]), labels=np.array([0, 1, 0]))
    writer = ResultWriter(tmp_path, {"id": {"dataset": "d", "n": 3, "accuracy": 2 / 3}})
    add_set(writer, "pgd_eps8", "adversarial", clean, clean)  # nothing changed
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["sets"]["pgd_eps8"]["attack"] == {"correct": 2, "successful": 0, "success_rate": 0.0}
    assert doc["sets"]["pgd_eps8/successful"]["metrics"]["energy"]["auroc"] is None
    wrong = ScoredSet(scores, preds=np.array([1, 0, 1]), labels=np.array([0, 1, 0]))
    assert math.isnan(successful_attacks(wrong, clean)[2]["success_rate"])  # no image classified correctly
    with pytest.raises(ValueError, match="row for row"):
        successful_attacks(clean, ScoredSet(scores, preds=np.array([0, 1, 1]), labels=np.array([1, 1, 0])))


def test_a_group_with_a_failed_set_has_null_means(tmp_path: Path) -> None:
    # The mean over the sets that finished was reported as the group's: compared with other runs' means over all sets.
    clean = ScoredSet({"energy": np.array([3.0, 4.0])}, preds=np.array([0, 1]), labels=np.array([0, 1]))
    ood = ScoredSet({"energy": np.array([1.0, 3.5])}, preds=np.array([0, 0]), labels=np.array([-1, -1]))
    writer = ResultWriter(tmp_path, {"id": {"dataset": "d", "n": 2, "accuracy": 1.0}, "scorers": ["energy"]})
    add_set(writer, "svhn", "far", clean, ood)
    add_set(writer, "cifar100", "near", clean, ood)
    writer.fail("places", "far", "OSError: image file is truncated")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["sets"]["svhn"]["metrics"]["energy"]["auroc"] == 0.75
    assert doc["means"]["near"]["energy"]["auroc"] == 0.75  # complete
    for group in ("far", "ood"):
        assert doc["means"][group]["energy"] == dict.fromkeys(OOD_METRICS)
    fooled = ScoredSet({"energy": np.array([2.0, 1.0])}, preds=np.array([1, 1]), labels=clean.labels)  # row 0 flips
    add_set(writer, "fgsm_eps8", "adversarial", clean, fooled)
    assert (
        json.loads((tmp_path / "results.json").read_text())["means"]["adversarial/successful"]["energy"]["auroc"] == 1
    )
    writer.fail("pgd_eps8", "adversarial", "RuntimeError: out of memory")  # its successful row is missing too
    means = json.loads((tmp_path / "results.json").read_text())["means"]
    assert means["adversarial"]["energy"] == means["adversarial/successful"]["energy"] == dict.fromkeys(OOD_METRICS)
    assert "mean/far,far,energy,nan" in (tmp_path / "results.csv").read_text()
    assert "The means of the groups with a failed set are nan" in (tmp_path / "results.md").read_text()


class _CtrlC:
    """An array that a Ctrl-C interrupts as np.savez converts it (after the arrays before it are written)."""

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        raise KeyboardInterrupt


def test_raw_scores_interrupted_while_written_leave_the_previous_file_or_none(tmp_path: Path) -> None:
    path = tmp_path / "scores" / "svhn.npz"
    source = Subset(list(range(3)), [0, 2, 1])
    done = ScoredSet({"energy": np.array([1.0, 2.0, 3.0])}, preds=np.array([0, 1, 1]), labels=np.array([0, 1, 0]))
    cut = ScoredSet({"energy": np.zeros(3), "msp": _CtrlC()}, preds=done.preds, labels=done.labels)  # type: ignore[dict-item]
    with pytest.raises(KeyboardInterrupt):
        save_scores(path, cut, source)
    assert not path.exists()  # not half an archive
    save_scores(path, done, source)
    with pytest.raises(KeyboardInterrupt):
        save_scores(path, cut, source)
    with np.load(path) as saved:  # the previous version, whole
        assert saved["score_energy"].tolist() == [1.0, 2.0, 3.0]
        assert saved["index"].tolist() == [0, 2, 1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["svhn.npz"]  # no partial file left


def test_score_loader_runs_a_float64_model_on_float32_batches_in_order() -> None:
    model = Threshold().double().eval()  # a model trained with precision "64-true"
    x, y = torch.tensor(PIXELS).reshape(-1, 1, 1, 1), torch.tensor(LABELS)
    scored = score_loader(model, [(x[:5], y[:5]), (x[5:], y[5:])], build_scorers(["energy"]))
    assert scored.preds.tolist() == [0, 0, 0, 0, 1, 1, 0, 1]
    assert scored.labels.tolist() == LABELS
    p = np.array(PIXELS, dtype=np.float64)
    np.testing.assert_allclose(scored.scores["energy"], np.logaddexp(p - 0.5, 0.5 - p), rtol=1e-12)


def test_set_metrics_treat_the_id_set_as_positive_and_mean_metrics_average_over_sets() -> None:
    from gradreg.evaluation import mean_metrics, set_metrics

    id_set = ScoredSet({"energy": np.array([3.0, 4.0, 5.0])})
    ood_set = ScoredSet({"energy": np.array([1.0, 2.0, 3.5])})
    result = set_metrics(id_set, ood_set)
    assert result["energy"]["auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0, 0], [3, 4, 5, 1, 2, 3.5]))
    assert result["energy"]["auroc"] > 0.5  # ID scores higher: better than chance, not its mirror image
    per_set = {"a": {"s": {"auroc": 0.9}}, "b": {"s": {"auroc": 0.6}}, "c": {"s": {"auroc": 0.3}}}
    assert mean_metrics(per_set) == {"s": {"auroc": pytest.approx(0.6)}}


def _two_set_writer(tmp_path: Path) -> ResultWriter:
    """Two far sets against four ID scores; their five metrics all differ, by hand and by sklearn."""
    clean = ScoredSet({"energy": np.array([3.0, 4.0, 5.0, 6.0])}, preds=np.zeros(4), labels=np.zeros(4))
    writer = ResultWriter(tmp_path, {"id": {"dataset": "d", "n": 4, "accuracy": 1.0}, "scorers": ["energy"]})
    for name, ood in (("a", [1.0, 2.0, 3.5, 7.0]), ("b", [0.0, 1.0, 2.0, 4.5])):
        add_set(writer, name, "far", clean, ScoredSet({"energy": np.array(ood)}, preds=np.zeros(4), labels=-np.ones(4)))
    return writer


def _expected_metrics(ood: list[float]) -> dict[str, float]:
    id_scores, ood_scores = np.array([3.0, 4.0, 5.0, 6.0]), np.array(ood)
    y, s = [1] * 4 + [0] * 4, np.concatenate([id_scores, ood_scores])
    return {
        "auroc": roc_auc_score(y, s),
        "fpr95": float(np.mean(ood_scores >= id_scores.min())),  # 95% of 4 ID images: all of them
        "fpr95_oodpos": float(np.mean(id_scores <= ood_scores.max())),  # 95% of 4 OOD images: all of them
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score([0] * 4 + [1] * 4, -s),
    }


def test_csv_and_markdown_columns_hold_the_metrics_they_name_for_sets_and_means(tmp_path: Path) -> None:
    _two_set_writer(tmp_path)
    a, b = _expected_metrics([1.0, 2.0, 3.5, 7.0]), _expected_metrics([0.0, 1.0, 2.0, 4.5])
    assert (a["auroc"], b["auroc"]) == (11 / 16, 14 / 16)  # by hand: ID scores above each OOD score
    assert (a["fpr95"], a["fpr95_oodpos"], b["fpr95"], b["fpr95_oodpos"]) == (0.5, 1.0, 0.25, 0.5)
    expected = {"a": a, "b": b, "mean/far": {m: (a[m] + b[m]) / 2 for m in OOD_METRICS}}
    rows = {r["set"]: r for r in csv.DictReader((tmp_path / "results.csv").read_text().splitlines())}
    assert set(rows) == {"a", "b", "mean/far", "mean/ood"}
    for name, metrics in {**expected, "mean/ood": expected["mean/far"]}.items():
        for metric, value in metrics.items():
            assert float(rows[name][metric]) == pytest.approx(value, abs=1e-12), (name, metric)
    lines = (tmp_path / "results.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| set |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    named = {"AUROC": "auroc", "FPR95": "fpr95", "FPR95 (OOD pos.)": "fpr95_oodpos", "AUPR-In": "aupr_in",
             "AUPR-Out": "aupr_out"}  # fmt: skip
    for name, metrics in expected.items():
        (line,) = [line for line in lines if line.startswith(f"| {name} |")]
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for title, metric in named.items():
            assert float(cells[title]) == pytest.approx(100 * metrics[metric], abs=0.005), (name, title)


def test_console_table_columns_hold_the_metrics_they_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    print_table(_two_set_writer(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    header = next(line.split() for line in lines if line.startswith("set "))
    assert header == ["set", "scorer", "AUROC", "FPR95", "AUPR-In", "AUPR-Out"]
    named = {"AUROC": "auroc", "FPR95": "fpr95", "AUPR-In": "aupr_in", "AUPR-Out": "aupr_out"}
    for name, ood in (("a", [1.0, 2.0, 3.5, 7.0]), ("b", [0.0, 1.0, 2.0, 4.5])):
        (line,) = [line.split() for line in lines if line.startswith(f"{name} ")]
        cells = dict(zip(header, line, strict=True))
        for title, metric in named.items():
            assert float(cells[title]) == pytest.approx(100 * _expected_metrics(ood)[metric], abs=0.005), title
