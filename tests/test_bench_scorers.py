"""bench/: the scorer baselines compute what they claim; tiny runs write tables; results_table.py reads results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradreg.models import MODELS
from gradreg.scorers import build
from gradreg.scorers.purview import purview_layer_norms

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scorers", ROOT / "bench" / "scorers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_per_sample_loops_equal_the_batched_scorers(bench) -> None:
    torch.manual_seed(0)
    model = MODELS.build("small_cnn", num_classes=4, in_channels=3, width=4).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(bench.all_layer_norms_loop(model, x), purview_layer_norms(model, x), rtol=1e-9, atol=0)
    loop = torch.tensor(bench.gradnorm_official_loop(model, x), dtype=torch.float64)
    assert all(p.grad is None for p in model.parameters())  # the loop leaves no gradients behind
    torch.testing.assert_close(loop, build("gradnorm")(model, x), rtol=1e-9, atol=0)


def test_tiny_run_writes_one_table_row_per_model_configuration(bench, tmp_path: Path) -> None:
    out, raw = tmp_path / "table.md", tmp_path / "rows.json"
    bench.main([
        "--device", "cpu", "--model", "small_cnn:2:8", "--model", "small_cnn:3:8",
        "--scorers", "energy", "odin", "absent", "--warmup", "0", "--repeats", "1", "--loop-samples", "1",
        "--out", str(out), "--json", str(raw),
    ])  # fmt: skip
    table = out.read_text()
    assert "| absent |" not in table  # skipped: these models have no absent-class head
    for batch in (2, 3):
        for case in ("forward + input backward + forward", "odin"):
            assert f"| small_cnn | {batch} | 8x8 | {case} |" in table
    rows = json.loads(raw.read_text())  # strict JSON: CPU peaks are null, not NaN
    assert {r["batch"] for r in rows} == {2, 3}
    assert all(r["peak_bytes"] is None for r in rows)


def test_torchvision_models_run_with_their_head_split_off_and_unknown_names_are_skipped(
    bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "table.md"
    bench.main([
        "--device", "cpu", "--model", "torchvision.mobilenet_v3_small:2:32", "--model", "torchvision.nope:2:32",
        "--model", "nope:2:32", "--scorers", "energy", "purview", "--warmup", "0", "--repeats", "1",
        "--loop-samples", "1", "--out", str(out),
    ])  # fmt: skip
    table = out.read_text()
    for case in ("energy", "purview"):
        assert f"| torchvision.mobilenet_v3_small | 2 | 32x32 | {case} |" in table
    assert "| torchvision.mobilenet_v3_small | all-layer norms, batch-1 loop |" in table
    assert "| nope" not in table
    assert "| torchvision.nope" not in table
    err = capsys.readouterr().err
    assert "skipping 'torchvision.nope': not registered" in err
    assert "skipping 'nope': not registered" in err


def test_gaia_reduction_variants_equal_the_scorer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # it imports its helpers from bench/scorers.py
    spec = importlib.util.spec_from_file_location("bench_gaia_reduction", ROOT / "bench" / "gaia_reduction.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = MODELS.build("small_cnn", num_classes=4, in_channels=3, width=4).eval()
    x = torch.randn(3, 3, 8, 8)
    expected = build("gaia_z")(model, x)
    for label, reduce in module.REDUCTIONS.items():
        if reduce is not None:
            torch.testing.assert_close(module.gaia_z_with(model, x, reduce), expected, rtol=0, atol=0, msg=label)
    out = tmp_path / "table.md"
    module.main(["--device", "cpu", "--model", "small_cnn:2:8", "--warmup", "0", "--repeats", "1", "--out", str(out)])
    table = out.read_text()
    for layout in ("contiguous", "channels-last"):
        assert all(f"| small_cnn | 2 | {layout} | {label} |" in table for label in module.REDUCTIONS)


def test_results_table_reads_evaluate_results(tmp_path: Path) -> None:
    doc = {
        "scorers": ["energy", "msp"],
        "id": {"accuracy": 0.95},
        "means": {"ood": {"energy": {"auroc": 0.9, "fpr95": 0.25}, "msp": {"auroc": None, "fpr95": None}}},
        "sets": {"noise": {"metrics": {"energy": {"auroc": 0.8}}}},
    }
    (tmp_path / "results.json").write_text(json.dumps(doc))
    script = [sys.executable, str(ROOT / "bench" / "results_table.py")]
    out = subprocess.run([*script, f"m={tmp_path}"], capture_output=True, text=True, check=True).stdout
    assert "| m | 95.0 | 90.0 / 25.0 | - / - |" in out  # null (non-finite scores) as "-"
    assert "| m | 80.0 |" in out
    # Two seeds: mean ± sample std (n - 1); AUROC 0.9 and 0.8: 85.0 ± 7.1, ID accuracy 0.95 and 0.85: 90.0 ± 7.1
    second = tmp_path / "seed1"
    second.mkdir()
    doc["id"]["accuracy"], doc["means"]["ood"]["energy"] = 0.85, {"auroc": 0.8, "fpr95": 0.35}
    (second / "results.json").write_text(json.dumps(doc))
    out = subprocess.run([*script, f"m={tmp_path},{second}"], capture_output=True, text=True, check=True).stdout
    assert "| m | 90.0 ± 7.1 | 85.0 ± 7.1 / 30.0 ± 7.1 | - / - |" in out
    assert "| m | 80.0 ± 0.0 |" in out
    assert "over 2 runs" in out
    # An evaluation with other scorers (and no energy): its missing cells are "-"
    other = tmp_path / "other"
    other.mkdir()
    means = {"ood": {"gradnorm": {"auroc": 0.7, "fpr95": 0.5}}}
    (other / "results.json").write_text(json.dumps({**doc, "scorers": ["gradnorm"], "sets": {}, "means": means}))
    out = subprocess.run([*script, f"m={tmp_path}", f"g={other}"], capture_output=True, text=True, check=True).stdout
    assert "| method | ID acc | energy | msp | gradnorm |" in out
    assert "| g | 85.0 | - / - | - / - | 70.0 / 50.0 |" in out
    assert "| g | - |" in out
    help_ = subprocess.run([*script, "--help"], capture_output=True, text=True, check=True).stdout
    assert help_.startswith("usage:")
    for args, message in [([], "usage:"), (["-x"], "usage:"), ([f"m={tmp_path / 'x'}"], "no results.json in")]:
        proc = subprocess.run([*script, *args], capture_output=True, text=True)
        assert proc.returncode == 1
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_run_without_cuda_stops_in_one_line(bench) -> None:
    # Each --device cuda command gave a driver traceback on a CPU machine.
    with pytest.raises(SystemExit, match=r"^--device cuda: this machine has no CUDA device; run with --device cpu$"):
        bench.main(["--device", "cuda", "--model", "small_cnn:2:8", "--repeats", "1"])
