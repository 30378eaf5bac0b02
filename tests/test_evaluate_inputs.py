"""evaluate.py refuses bad input in one line, before it creates an output folder or scores anything."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradreg.anomalies import CORRUPTIONS, corrupt, energy_attack
from gradreg.cli import UserError, evaluate_main, point_latest, train_main
from gradreg.evaluation import sample
from gradreg.report import (
    anomaly_sets,
    check_options,
    claim_folder,
    load_checkpoint,
    parse_args,
    rebuild,
    resolve_checkpoint,
    resolve_device,
    transformed,
)

ROOT = Path(__file__).resolve().parents[1]
# Keeps a regression quick: code that accepted these inputs ran the whole benchmark first.
FAST = ["--max-samples", "16", "--no-plots"]


def run_inprocess(args: list[str], capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess:
    """Call evaluate.py's entry point in this process; exit code and output as a subprocess would give them."""
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_info.value.code, captured.out, captured.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 1, no traceback, exactly one ``error:`` line, holding every fragment."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch quickstart run (two training batches): a real checkpoint and the config.yaml train.py wrote."""
    return quick_run(tmp_path_factory.mktemp("train"))


def quick_run(tmp: Path, *extra: str) -> Path:
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--run.root", str(tmp / "runs")]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false"]
    with pytest.raises(SystemExit) as exit_info:
        train_main([*args, *extra])
    assert exit_info.value.code == 0
    return tmp / "runs" / "quickstart-001"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--corruptions", "jpeg", "gausian_noise"], ["'gausian_noise'", "gaussian_noise", "impulse_noise"]),
        (["--severities", "0", "6"], ["--severities 0", "1 (mild) to 5 (strong)"]),
        (["--corruptions", "snow", "saturate"], ["--corruptions saturate needs RGB images", "'digits' have 1 channel"]),
        (["--epsilons", "-0.01"], ["--epsilons -0.01", "pixel units"]),
        # argparse took these for options: "expected at least one argument" / "unrecognized arguments: -1e-3"
        (["--epsilons", "-8/255"], ["--epsilons -0.0313725 is not in (0, 1]", "pixel units"]),
        (["--epsilons", "8/255", "-1e-3"], ["--epsilons -0.001 is not in (0, 1]", "pixel units"]),
        (["--epsilons", "8"], ["--epsilons 8 ", "8/255 = 0.0314"]),
        (["--epsilons", "inf"], ["--epsilons inf ", "e.g. 8/255 = 0.0314"]),
        (["--explain", "-1"], ["--explain -1", ">= 0"]),
        (["--explain", "1", "--explain-train", "0"], ["--explain-train 0 must be >= 1"]),
        (["--explain", "1", "--explain-hessian", "0"], ["--explain-hessian 0 must be >= 1"]),
        (["--explain", "1", "--explain-damping", "-1"], ["--explain-damping -1 must be > 0 (or 'auto')"]),
        (["--epsilons", "0.03137", "8/255"], ["0.03137 and 0.0313725", "fgsm_eps8"]),
        (["--explain", "1", "--explain-scorer", "energie"], ["'energie'", "energy, exgrad, gaia_a"]),
        (["--explain", "1", "--explain-scorer", "odin"], ["'odin'", "not differentiable", "explained: energy, exgrad"]),
        (["--explain", "1", "--explain-set", "nois"], ["--explain-set 'nois'", "(digits_heldout, noise)"]),
        (["--explain", "1", "--sets", "noise", "--explain-set", "digits_heldout"], ["OOD set (noise)"]),
        (["--explain", "1", "--suites", "adversarial"], ["--explain explains OOD test images", "ood suite"]),
        (["--explain-set", "noise"], ["--explain-set needs --explain K"]),
        (["--explain-scorer", "msp", "--explain-train", "9"], ["--explain-scorer, --explain-train need --explain K"]),
        (["--device", "gpu"], ["--device 'gpu'", "cpu"]),
        (["--device", "cuda:99"], ["--device 'cuda:99'", "--device cpu"]),
        (["--data", "eval_batch_size"], ["--data 'eval_batch_size' is not KEY=VALUE"]),
        (["--data", "eval_batch_sise=8"], ["--data eval_batch_sise: unknown data setting", "eval_batch_size"]),
        (
            ["--scorers", "energy", "absent"],
            ["scorer 'absent' does not apply", "method=absent", "drop it from --scorers"],
        ),
    ],
)
def test_bad_option_stops_before_any_output(
    run_dir: Path, args: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(run_dir.iterdir())
    assert_one_line_error(run_inprocess([str(run_dir), *FAST, *args], capsys), *fragments)
    assert sorted(run_dir.iterdir()) == before  # no eval-NNN folder


@pytest.mark.parametrize(
    ("ood_sets", "extra", "fragments"),
    [
        ("[{name: noise, alias: id}]", [], ["two sets named 'id' would write to one row"]),
        ("[{name: noise, alias: ID}]", [], ["the sets 'id' and 'ID' would write to one row"]),
        ("[{name: noise, alias: fgsm_eps8}]", ["--suites", "ood", "adversarial"], ["two sets named 'fgsm_eps8'"]),
        ("[{name: noise, alias: x/y}, {name: digits_heldout, alias: x_y}]", [], ["'x/y' and 'x_y'", "score file"]),
        ("[{name: noise, alias: mean/far}]", [], ["'mean/far' would be read as a group mean"]),
    ],
)
def test_set_names_that_would_overwrite_each_others_results_are_refused(
    run_dir: Path, tmp_path: Path, ood_sets: str, extra: list[str], fragments: list[str], capsys
) -> None:
    # An alias "id" overwrote the ID set's raw scores, "fgsm_eps8" the near set's row and file: exit 0 all the same.
    out = tmp_path / "out"
    args = [str(run_dir), *FAST, "--scorers", "energy", "--out", str(out), "--data", f"ood_sets={ood_sets}"]
    proc = run_inprocess([*args, "near_ood=[]", *(extra or ["--suites", "ood"])], capsys)
    assert_one_line_error(proc, *fragments, "give the OOD set another alias")
    assert not out.exists()


def test_an_evaluation_with_nothing_to_score_is_refused(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(run_dir), *FAST, "--suites", "ood", "--data", "ood_sets=[]", "near_ood=[]"]
    assert_one_line_error(run_inprocess(args, capsys), "nothing to evaluate", "--data ood_sets=[...]")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--suites", "ood", "--epsilons", "4/255"], ["--epsilons sets the adversarial and robustness suites"]),
        (["--suites", "ood", "--pgd-steps", "3"], ["--pgd-steps", "add adversarial to --suites"]),
        (["--suites", "ood", "--corruption-files", "c"], ["--corruption-files sets the corruption suite"]),
        (["--suites", "adversarial", "--severities", "1"], ["--severities", "--suites adversarial leaves out"]),
        (["--suites", "ood", "--corruptions", "jpeg"], ["--corruptions"]),
        (["--suites", "ood", "--corruption-table", "cifar10c"], ["--corruption-table"]),
        (["--suites", "adversarial", "--sets", "noise"], ["--sets sets the ood and robustness suites"]),
    ],
)
def test_options_of_suites_that_do_not_run_are_refused(
    args: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # They were ignored: "--suites ood --corruption-files /nonexistent" ran and exited 0.
    assert_one_line_error(run_inprocess(["ckpt", *args], capsys), *fragments, "or drop the option")


def test_a_failed_evaluation_leaves_its_out_folder_usable(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The empty results.json that claims --out stayed behind when the ID set failed: the next run was refused.
    out = tmp_path / "out"
    args = [str(run_dir), *FAST, "--suites", "ood", "--scorers", "energy", "--out", str(out)]

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("gradreg.report.save_scores", full_disk)
        with pytest.raises(OSError, match="No space left on device"):
            evaluate_main(args)
    assert list(out.iterdir()) == []
    assert run_inprocess(args, capsys).returncode == 0
    assert (out / "results.json").is_file()
    assert not (out / "plots").exists()  # FAST holds --no-plots


def test_a_second_evaluation_into_a_claimed_folder_is_refused(tmp_path: Path) -> None:
    # Two evaluations into one new --out both passed the early check and wrote over each other's files.
    out = tmp_path / "out"
    claim_folder(out)
    assert [p.name for p in out.iterdir()] == ["results.json"]
    with pytest.raises(UserError, match="already holds files"):
        claim_folder(out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="already holds files"):
        claim_folder(other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_out_naming_a_file_is_refused(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert_one_line_error(run_inprocess([str(run_dir), *FAST, "--out", str(notes)], capsys), f"'{notes}' is a file")
    assert notes.read_text() == "keep me"


def test_checkpoint_with_non_finite_weights(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["state_dict"]["model.fc.weight"][0, 0] = float("nan")
    ckpt["state_dict"]["model.fc.bias"][0] = float("inf")
    diverged = tmp_path / "diverged.ckpt"
    torch.save(ckpt, diverged)
    proc = run_inprocess([str(diverged), *FAST, "--suites", "ood"], capsys)
    assert_one_line_error(proc, str(diverged), "non-finite", "model.fc.weight, model.fc.bias")
    assert sorted(tmp_path.iterdir()) == [diverged]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("model:\n  arch: small_cnn\n  lr: 0.1: 2\n", ["bad.yaml' is not valid YAML", "line 3"]),
        ("dataa:\n  batch_size: 8\n", ["unknown section 'dataa'", "seed_everything, model, data, trainer, run"]),
        ("model:\n  lrr: 0.1\n", ["unknown key 'lrr' in model", "lr, momentum"]),
        ("data:\n  batch_sise: 8\n", ["unknown key 'batch_sise' in data", "batch_size, outlier_batch_size"]),
        (
            "data:\n  id_dataset: digits\n  ood_sets: [noise]\nmodel:\n  pretrained: no.ckpt\n",
            ["model.pretrained 'no.ckpt' does not exist", "pass an existing .ckpt"],
        ),
    ],
)
def test_bad_config_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # post-hoc results would go to ./runs
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert_one_line_error(run_inprocess([str(config), *FAST, "--suites", "ood"], capsys), *fragments)
    assert sorted(tmp_path.iterdir()) == [config]


def test_config_without_weights_warns_once(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The config.yaml of a run (with the sections LightningCLI adds) is valid; it describes the untrained model.
    out = tmp_path / "out"
    args = [str(run_dir / "config.yaml"), *FAST, "--suites", "ood", "--scorers", "energy", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(args)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert exit_info.value.code == 0
    assert len(warnings) == 1, warnings
    assert "random initial weights" in warnings[0]
    assert f"evaluate.py {run_dir}" in warnings[0]
    assert json.loads((out / "results.json").read_text())["sets"].keys() == {"digits_heldout", "noise"}


def test_config_without_weights_scores_the_same_model_every_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "quickstart.yaml")
    scores = []
    for out in ("a", "b"):
        torch.manual_seed(len(out) + len(scores))  # whatever state the global generator is in
        proc = run_inprocess([config, *FAST, "--suites", "ood", "--scorers", "energy", "--out", out], capsys)
        assert proc.returncode == 0, proc.stderr[-2000:]
        scores.append(np.load(tmp_path / out / "scores" / "id.npz", allow_pickle=False)["score_energy"])
    np.testing.assert_array_equal(*scores)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--max-samples", "abc"], ["--max-samples: 'abc' is not an integer >= 1"]),
        (["--max-samples", "0"], ["--max-samples: '0' is not an integer >= 1"]),
        (["--pgd-steps", "0"], ["--pgd-steps: '0' is not an integer >= 1"]),
        (["--epsilons", "abc"], ["--epsilons: 'abc' is not a number in (0, 1] or a fraction such as 8/255"]),
        (["--suites", "foo"], ["--suites: invalid choice: 'foo'", "'ood', 'adversarial', 'corruption', 'robustness'"]),
        (["--explain-damping", "x"], ["--explain-damping: 'x' is not a number"]),
        (["--bogus"], ["unrecognized arguments: --bogus", "see python evaluate.py --help"]),
        (["--scorer", "energy"], ["unrecognized arguments: --scorer energy"]),  # a prefix of --scorers, as in train.py
    ],
)
def test_option_syntax_errors_are_one_line(
    tmp_path: Path, args: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Like every other bad input (and train.py): one error line, no usage block, exit code 1.
    proc = run_inprocess([str(tmp_path / "ckpt"), *args], capsys)
    assert_one_line_error(proc, *fragments)
    assert "usage:" not in proc.stderr


def test_help_still_prints_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_inprocess(["--help"], capsys)
    assert proc.returncode == 0
    assert "--max-samples" in proc.stdout


def test_latest_link_resolves_to_the_run(tmp_path: Path) -> None:
    run = tmp_path / "quickstart-003"
    run.mkdir()
    (run / "best.ckpt").write_bytes(b"")
    point_latest(run)
    expected = tmp_path / "quickstart-003" / "best.ckpt"
    assert resolve_checkpoint(tmp_path / "latest") == resolve_checkpoint(tmp_path / "latest" / "best.ckpt") == expected


def test_data_root_takes_both_spellings_of_the_data_check() -> None:
    # docs/data.md: `python -m gradreg.data check` takes --data-root and --data_root; so does evaluate.py.
    for option in ("--data-root", "--data_root"):
        assert parse_args(["ckpt", option, "/datasets"]).data_root == "/datasets"


def test_epsilons_accept_fractions_and_repeats_run_once() -> None:
    assert parse_args(["ckpt", "--epsilons", "8/255", "0.01"]).epsilons == [8 / 255, 0.01]
    opts = parse_args(
        ["ckpt", "--epsilons", "8/255", "8/255", "--corruptions", "jpeg", "jpeg", "--severities", "2", "2"]
    )
    check_options(opts)
    assert (opts.epsilons, opts.corruptions, opts.severities) == ([8 / 255], ["jpeg"], [2])
    with pytest.raises(UserError, match="'8/x' is not a number"):
        parse_args(["ckpt", "--epsilons", "8/x"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in read-only folders")
def test_read_only_checkpoint_folder(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(run_dir / "last.ckpt", shared / "last.ckpt")
    shared.chmod(0o555)
    try:
        proc = run_inprocess([str(shared / "last.ckpt"), *FAST, "--suites", "ood"], capsys)
        out = shared / "new" / "eval"  # a folder to create under the read-only one
        post_hoc = run_inprocess([str(ROOT / "configs" / "quickstart.yaml"), *FAST, "--out", str(out)], capsys)
        with pytest.raises(SystemExit) as train_exit:
            train_main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--run.root", str(shared / "runs")])
        train_err = capsys.readouterr().err
    finally:
        shared.chmod(0o755)
    assert_one_line_error(proc, f"cannot write in '{shared}'", "with --out")
    assert_one_line_error(post_hoc, f"cannot create --out '{out}'", "choose another folder")
    trained = subprocess.CompletedProcess([], train_exit.value.code, "", train_err)
    assert_one_line_error(trained, f"cannot create the folder '{shared / 'runs'}'", "choose another with run.root")


def test_files_that_are_not_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    names = ("notes.ckpt", "scores.npy", "abc.ckpt", "tensor.ckpt", "lfs.ckpt", "object.ckpt")
    text, array, short, tensor, lfs, pickled = (tmp_path / n for n in names)
    text.write_text("hi\n")  # torch.load raises a KeyError on it
    np.save(array, np.zeros(3))  # not a pickle at all
    short.write_text("abc")  # an IndexError inside torch's unpickler
    torch.save(torch.zeros(3), tensor)  # a torch file, but no dict
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 99\n")  # a clone without LFS
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, pickled)  # an object weights_only refuses
    assert_one_line_error(run_inprocess([str(text), *FAST], capsys), str(text), "not a torch file")
    assert_one_line_error(run_inprocess([str(array), *FAST], capsys), str(array), "not a torch file")
    assert_one_line_error(run_inprocess([str(short), *FAST], capsys), str(short), "not a torch file")
    assert_one_line_error(run_inprocess([str(tensor), *FAST], capsys), str(tensor), "holds no dict")
    assert_one_line_error(run_inprocess([str(lfs), *FAST], capsys), str(lfs), "Git LFS pointer", "git lfs pull")
    assert_one_line_error(run_inprocess([str(pickled), *FAST], capsys), str(pickled), "weights_only", "not written by")
    assert sorted(tmp_path.iterdir()) == sorted([text, array, short, tensor, lfs, pickled])


@pytest.mark.parametrize(
    ("entry", "value", "what"),
    [  # AttributeErrors: 'NoneType' object has no attribute 'items', 'int' object has no attribute 'startswith', ...
        ("hyper_parameters", None, "hyper_parameters"),
        ("state_dict", [], "state_dict"),
        ("datamodule_hyper_parameters", {1: 2}, "datamodule_hyper_parameters"),
        ("arch_kwargs", [1], "hyper_parameters.arch_kwargs"),
    ],
)
def test_checkpoint_entries_that_are_not_mappings_by_name(
    entry: str, value: object, what: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    if entry == "arch_kwargs":
        ckpt["hyper_parameters"]["arch_kwargs"] = value
    else:
        ckpt[entry] = value
    edited = tmp_path / "edited.ckpt"
    torch.save(ckpt, edited)
    proc = run_inprocess([str(edited), *FAST], capsys)
    assert_one_line_error(proc, f"'{edited}' was not written by gradreg's train.py ({what}: not a mapping by name)")
    assert sorted(tmp_path.iterdir()) == [edited]


def test_a_zip_that_is_no_torch_archive_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import zipfile

    archive = tmp_path / "weights.ckpt"
    with zipfile.ZipFile(archive, "w") as file:
        file.writestr("a.npy", b"0")
    proc = run_inprocess([str(archive), *FAST], capsys)  # the reason was torch's "[enforce fail at ...]" alone
    assert_one_line_error(proc, "(file in archive is not in a subdirectory: a.npy); use another .ckpt")


def test_truncated_checkpoint_says_why_in_a_whole_sentence(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = run_dir / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    proc = run_inprocess([str(truncated), *FAST], capsys)
    # not torch's sentence cut in the middle of the advice that follows it
    fragment = "(cut short: the zip archive ends before its central directory); use"
    assert_one_line_error(proc, f"'{truncated}' is unreadable or truncated ", fragment)
    assert sorted(tmp_path.iterdir()) == [truncated]


def test_checkpoint_damaged_on_disk_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage_checkpoint: Callable[[Path, Path], str]
) -> None:
    damaged = tmp_path / "damaged.ckpt"
    member = damage_checkpoint(run_dir / "last.ckpt", damaged)  # torch.load would read it without a word
    proc = run_inprocess([str(damaged), *FAST], capsys)
    assert_one_line_error(proc, f"'{damaged}' is unreadable or truncated (damaged: {member} fails its CRC check); use")
    assert sorted(tmp_path.iterdir()) == [damaged]


def test_checkpoint_whose_weights_do_not_fit_its_hyperparameters(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["arch_kwargs"]["width"] *= 2
    edited = tmp_path / "edited.ckpt"
    torch.save(ckpt, edited)
    proc = run_inprocess([str(edited), *FAST, "--suites", "ood"], capsys)
    assert_one_line_error(proc, "do not fit", "weight is of shape", "the model's is", "do not belong together")
    assert sorted(tmp_path.iterdir()) == [edited]


def test_non_finite_scorer_gets_null_metrics_and_no_plots(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = [str(run_dir), "--max-samples", "16", "--suites", "ood", "--out", str(out)]
    proc = run_inprocess([*args, "--scorers", "msp:temperature=1e-300,alias=broken", "energy"], capsys)  # NaN
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: scorer 'broken' gave non-finite scores" in proc.stderr
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["hist_energy.png", "roc_energy.png"]
    strict = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert strict["sets"]["noise"]["metrics"]["broken"]["auroc"] is None
    assert 0 <= strict["sets"]["noise"]["metrics"]["energy"]["auroc"] <= 1


def test_results_record_every_scorer_setting(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Defaults included: results.json says what was computed, whichever settings were given.
    out = tmp_path / "out"
    args = [str(run_dir), *FAST, "--suites", "ood", "--sets", "noise", "--out", str(out)]
    proc = run_inprocess([*args, "--scorers", "odin:epsilon=0.001", "msp:alias=msp_t2,temperature=2", "energy"], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["options"]["scorers"] == {
        "odin": {"name": "odin", "temperature": 1000.0, "epsilon": 0.001},
        "msp_t2": {"name": "msp", "alias": "msp_t2", "temperature": 2},
        "energy": {"name": "energy", "temperature": 1.0},
    }


def test_results_record_the_margin_block_the_image_size_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Was block_size null: the default is resolved from the image size when the scorer runs (8 px digits: 2).
    monkeypatch.chdir(tmp_path)
    args = [str(ROOT / "configs" / "quickstart.yaml"), *FAST, "--suites", "ood", "--sets", "noise", "--out", "out"]
    proc = run_inprocess([*args, "--scorers", "margin:subspace=low,max_iter=1", "energy"], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scorers = json.loads((tmp_path / "out" / "results.json").read_text())["options"]["scorers"]
    assert scorers["margin"] == {"name": "margin", "subspace": "low", "block_size": 2, "top_k": 10, "overshoot": 0.02,
                                 "max_iter": 1}  # fmt: skip
    assert scorers["energy"] == {"name": "energy", "temperature": 1.0}


def test_another_image_size_than_training_warns(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(run_dir), *FAST, "--suites", "ood", "--sets", "noise", "--scorers", "energy"]
    proc = run_inprocess([*args, "--out", str(tmp_path / "a"), "--data", "image_size=16"], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: the checkpoint was trained on 8 px images and is evaluated on 16 px" in proc.stderr
    proc = run_inprocess([*args, "--out", str(tmp_path / "b"), "--data", "image_size=8"], capsys)  # the same size
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning" not in proc.stderr
    proc = run_inprocess([*args, "--out", str(tmp_path / "c"), "--data", "mean=[0.5]", "std=[0.5]"], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: the checkpoint was trained on images normalized with mean" in proc.stderr
    assert "is evaluated with mean [0.5], std [0.5] (--data mean/std)" in proc.stderr


def test_attacks_and_corruptions_use_the_normalization_of_the_evaluated_data(run_dir: Path) -> None:
    # --data mean/std changes what the loader feeds the model; the budgets and clamps in pixel units must follow it
    # (they used the checkpoint's buffers: 8/255 became 10.6/255 and adversarial pixels reached 1.04).
    module, dm = rebuild(load_checkpoint(run_dir / "last.ckpt"), {"mean": [0.5], "std": [0.5]})
    model = module.model.eval()
    assert (model.input_mean.tolist(), model.input_std.tolist()) == ([0.5], [0.5])
    suites = ["--suites", "adversarial", "corruption", "--corruptions", "contrast", "--severities", "5"]
    opts = parse_args(["ckpt", *suites, "--epsilons", "8/255", "--pgd-steps", "2"])
    check_options(opts)
    id_test = sample(dm.id_dataset_for("test"), 32)
    x, y = next(iter(dm.eval_loader(id_test)))
    clean = x * 0.5 + 0.5
    for name, group, _, transform in anomaly_sets(model, id_test, {}, opts):
        out = transform(x, y, torch.arange(len(x))) * 0.5 + 0.5
        if group == "adversarial":
            assert (out - clean).abs().max() <= 8 / 255 + 1e-6, name
            assert out.min() >= 0, name
            assert out.max() <= 1 + 1e-6, name
        else:
            torch.testing.assert_close(out, CORRUPTIONS.get("contrast")(clean, 5), rtol=0, atol=1e-6)


def test_noise_corruptions_of_one_severity_draw_independent_noise(run_dir: Path) -> None:
    # Every set was seeded by its severity alone: gaussian and speckle noise drew the same normals (correlation 1.0).
    module, _ = rebuild(load_checkpoint(run_dir / "last.ckpt"), {})
    model = module.model.eval()
    opts = parse_args(["ckpt", "--suites", "corruption", "--corruptions", "gaussian_noise", "speckle_noise",
                       "--severities", "3"])  # fmt: skip
    check_options(opts)
    x = torch.full((64, 1, 8, 8), 0.5)  # mid-grey pixels: no clamping, speckle noise = 0.5 x gaussian's draws
    x = (x - model.input_mean.reshape(1, -1, 1, 1)) / model.input_std.reshape(1, -1, 1, 1)
    noise = [(t(x, None, torch.arange(64)) - x).flatten() for _, _, _, t in anomaly_sets(model, [], {}, opts)]
    assert len(noise) == 2
    assert torch.corrcoef(torch.stack(noise))[0, 1].abs() < 0.1


def test_corrupted_sets_do_not_depend_on_the_batch_size(run_dir: Path) -> None:
    # Each set drew its noise from one generator in loader order: an image's noise changed with eval_batch_size,
    # with the other images --max-samples kept, and with the device. Now it follows the image's index alone.
    module, dm = rebuild(load_checkpoint(run_dir / "last.ckpt"), {})
    model = module.model.eval()
    noise = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"]
    opts = parse_args(["ckpt", "--suites", "corruption", "--corruptions", *noise, "--severities", "2"])
    check_options(opts)
    id_test = sample(dm.id_dataset_for("test"), 24)
    x, y = (torch.cat(parts) for parts in zip(*dm.eval_loader(id_test), strict=True))

    def corrupted(transform, size: int, rows: slice = slice(None)) -> torch.Tensor:
        batches = [(x[rows][i : i + size], y[rows][i : i + size]) for i in range(0, len(x[rows]), size)]
        return torch.cat([b for b, _ in transformed(batches, transform, id_test.indices[rows], torch.device("cpu"))])

    sets = list(anomaly_sets(model, id_test, {}, opts))
    assert [name for name, *_ in sets] == [f"{n}_s2" for n in noise]
    for name, _, _, transform in sets:
        whole = corrupted(transform, 24)
        assert not torch.equal(whole, x), name
        torch.testing.assert_close(corrupted(transform, 5), whole, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(corrupted(transform, 4, slice(7, 19)), whole[7:19], rtol=0, atol=0, msg=name)


def test_default_scorers_follow_the_model(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Every registered scorer by default; absent only for a model trained with method absent (DOS/NTOM baseline).
    absent_run = quick_run(tmp_path, "--model.method", "absent", "--model.sampler", "{name: dos}")
    capsys.readouterr()
    for run, expected in ((run_dir, False), (absent_run, True)):
        out = tmp_path / f"eval-{expected}"
        args = [str(run), *FAST, "--suites", "ood", "--sets", "noise", "--out", str(out)]
        assert run_inprocess(args, capsys).returncode == 0
        doc = json.loads((out / "results.json").read_text())
        assert ("absent" in doc["scorers"]) is expected
        assert {"energy", "gradnorm", "purview"} <= set(doc["scorers"])


def test_absent_checkpoint_of_the_old_layout_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before model.absent_fc, a method-absent model kept the absent class as the last row of model.fc.
    ckpt_path = quick_run(tmp_path, "--model.method", "absent", "--model.sampler", "{name: dos}") / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    for name in ("weight", "bias"):
        state[f"model.fc.{name}"] = torch.cat([state[f"model.fc.{name}"], state.pop(f"model.absent_fc.{name}")])
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    capsys.readouterr()
    proc = run_inprocess([str(old), *FAST, "--suites", "ood"], capsys)
    assert_one_line_error(proc, "a method-absent checkpoint from before", "retrain it, or start from it")
    with pytest.raises(SystemExit):
        train_main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--run.root", str(tmp_path / "resumed"),
                    "--model.method", "absent", "--run.resume", str(old), "--trainer.logger", "false"])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert f"run.resume checkpoint '{old}' is a method-absent checkpoint from before" in errors[0]


def test_checkpoint_fitted_without_a_datamodule_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A GradRegModule fitted in a user's own Trainer on plain loaders: was "not written by gradreg's train.py".
    from lightning.pytorch import Trainer

    from gradreg.data import OODDataModule
    from gradreg.module import GradRegModule

    dm = OODDataModule(batch_size=32)
    model = GradRegModule(arch_kwargs={"in_channels": 1, "width": 8}, num_classes=dm.num_classes, method="ce")
    trainer = Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(dm.id_dataset_for("train"), batch_size=32))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    proc = run_inprocess([str(tmp_path / "plain.ckpt"), *FAST], capsys)
    assert_one_line_error(proc, "holds no datamodule settings", "datamodule=gradreg.data.OODDataModule(...)")


def test_ce_checkpoint_naming_an_outlier_sampler_still_evaluates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # ce ignored its sampler before GradRegModule refused one; such checkpoints stay evaluable.
    from gradreg.data import OODDataModule
    from gradreg.module import GradRegModule

    dm = OODDataModule(batch_size=32)
    model = GradRegModule(arch_kwargs={"in_channels": 1, "width": 8}, num_classes=dm.num_classes, method="ce")
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": {**model.hparams, "sampler": {"name": "dos"}},
        "datamodule_hyper_parameters": dict(dm.hparams),
    }
    torch.save(ckpt, tmp_path / "ce.ckpt")
    args = [str(tmp_path / "ce.ckpt"), *FAST, "--suites", "ood", "--sets", "noise", "--scorers", "energy"]
    proc = run_inprocess([*args, "--out", str(tmp_path / "out")], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_evaluation_records_the_run_behind_its_pretrained_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Was trained_with null: model.pretrained may be a gradreg checkpoint, whose environment says what trained it.
    from gradreg.module import GradRegModule
    from gradreg.provenance import environment

    monkeypatch.chdir(tmp_path)
    model = GradRegModule(arch_kwargs={"in_channels": 1, "width": 8}, num_classes=6, method="ce")
    trained_with = environment(torch.device("cpu"))
    torch.save({"state_dict": model.state_dict(), "environment": trained_with}, tmp_path / "gradreg.ckpt")
    torch.save(model.model.state_dict(), tmp_path / "plain.pt")  # a state dict says nothing of its training
    for weights, expected in (("gradreg.ckpt", trained_with), ("plain.pt", None)):
        config = tmp_path / f"{Path(weights).stem}.yaml"
        config.write_text(
            f"model:\n  arch_kwargs: {{in_channels: 1, width: 8}}\n  method: ce\n  pretrained: {tmp_path / weights}\n"
            "data:\n  id_dataset: digits\n  ood_sets: [noise]\n"
        )
        args = [str(config), *FAST, "--suites", "ood", "--scorers", "energy", "--out", config.stem]
        proc = run_inprocess(args, capsys)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((tmp_path / config.stem / "results.json").read_text())["trained_with"] == expected


def test_a_set_with_an_unreadable_image_fails_alone_with_its_file_named(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Read by a loader worker, whose error PyTorch re-raises with the worker's traceback as its message.
    folder = tmp_path / "isun"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"")
    sets = f"ood_sets=[{{name: isun, path: {folder}}}, noise]"
    args = [str(run_dir), *FAST, "--suites", "ood", "--scorers", "energy", "--out", str(tmp_path / "out")]
    proc = run_inprocess([*args, "--data", sets, "near_ood=[]", "num_workers=1"], capsys)
    assert proc.returncode == 1, proc.stderr[-2000:]  # a failed set fails the run, after the others are scored
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    reason = f"UnreadableImageError: cannot read image '{folder / '3.png'}' (an empty file); replace or delete the file"
    assert results["failed"]["isun"].startswith(reason)
    assert f"error: set 'isun' failed: {reason}" in proc.stderr
    assert "auroc" in results["sets"]["noise"]["metrics"]["energy"]  # the other set is scored


def test_successful_attack_rows_can_be_recomputed_from_the_saved_scores(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    out = tmp_path / "adv"
    # a one-epoch model: 8/255 fools none of its few correct images, 64/255 some
    args = [str(run_dir), "--max-samples", "64", "--no-plots", "--suites", "adversarial", "--epsilons", "64/255"]
    proc = run_inprocess([*args, "--pgd-steps", "2", "--scorers", "energy", "--out", str(out)], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    clean = np.load(out / "scores" / "id.npz")
    correct = clean["preds"] == clean["labels"]
    for name in ("fgsm_eps64", "pgd_eps64"):
        attacked = np.load(out / "scores" / f"{name}.npz")  # the successful rows have no file: they are rows of these
        assert attacked["index"].tolist() == clean["index"].tolist()
        hit = correct & (attacked["preds"] != attacked["labels"])
        assert 0 < hit.sum() < correct.sum(), name  # a case where the two protocols differ
        assert doc["sets"][name]["attack"] == {
            "correct": int(correct.sum()),
            "successful": int(hit.sum()),
            "success_rate": pytest.approx(hit.sum() / correct.sum()),
        }
        expected = roc_auc_score(
            [1] * int(hit.sum()) + [0] * int(hit.sum()),
            np.concatenate([clean["score_energy"][hit], attacked["score_energy"][hit]]),
        )
        assert doc["sets"][f"{name}/successful"]["metrics"]["energy"]["auroc"] == pytest.approx(expected, abs=1e-12)
    assert "attack success rate: fgsm_eps64 " in proc.stdout


def test_explain_says_once_that_the_solves_did_not_converge(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A small fixed damping leaves H + damping I indefinite: CG's warnings per image give way to one line.
    args = [str(run_dir), *FAST, "--suites", "ood", "--sets", "noise", "--scorers", "energy", "--out", str(tmp_path)]
    explain = ["--explain", "2", "--explain-train", "8", "--explain-hessian", "8", "--explain-damping", "0.001"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proc = run_inprocess([*args, *explain], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [w for w in caught if "CG " in str(w.message)]
    lines = [line for line in proc.stderr.splitlines() if "warning: inverse-HVP relative residual up to" in line]
    assert len(lines) == 1
    assert "raise --explain-damping (now 0.001)" in lines[0]
    residuals = json.loads((tmp_path / "explain" / "influence.json").read_text())["settings"]["relative_residual"]
    assert max(residuals) > 0.1


def test_explain_traces_the_evaluated_scorer_with_its_settings(run_dir: Path, tmp_path: Path, capsys) -> None:
    # explain rebuilt the scorer from its display key: energy at temperature 1 was explained in place of the evaluated
    # one at 1000, and an alias was "unknown scorer" after the whole benchmark, without the results table.
    scorers = ["--scorers", "msp", "energy:alias=hot,temperature=1000"]
    args = [str(run_dir), *FAST, "--suites", "ood", "--sets", "noise", *scorers, "--out", str(tmp_path)]
    explain = ["--explain", "1", "--explain-scorer", "hot", "--explain-train", "8", "--explain-hessian", "8"]
    proc = run_inprocess([*args, *explain], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "explain" / "influence.json").read_text())
    assert "temperature=1000" in doc["settings"]["scorer"]
    raw = np.load(tmp_path / "scores" / "noise.npz", allow_pickle=False)
    noise = raw["score_hot"]
    ood_test, _ = doc["tests"]
    assert ood_test["test_id"] == f"noise/{raw['index'][noise.argmax()]}"
    assert ood_test["score"] == pytest.approx(float(noise.max()), rel=1e-5)


def test_explain_names_training_images_by_their_index_in_the_train_split(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An ID dataset without a native val split (CIFAR) has one carved out of its train split: influence.json named
    # training images by their position among the images left, and the grids showed those positions.
    module = importlib.import_module("gradreg.data.module")
    build = module.build_dataset

    def no_val_split(spec, root, split, **kw):  # digits as CIFAR-10 has it: train and test only
        if split == "val":
            raise ValueError("no val split")
        return build(spec, root, split, **kw)

    monkeypatch.setattr(module, "build_dataset", no_val_split)
    args = [str(run_dir), *FAST, "--suites", "ood", "--sets", "noise", "--scorers", "energy", "--out", str(tmp_path)]
    carve = ["--data", "val_fraction=0.5"]  # half the images held out: a position names one of them at even odds
    proc = run_inprocess([*args, *carve, "--explain", "2", "--explain-train", "2000", "--explain-hessian", "8"], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, dm = rebuild(load_checkpoint(run_dir / "last.ckpt"), {"val_fraction": 0.5})
    train = dm.unaugmented_train_sets()[0].dataset  # Subset of digits' train split
    held_out = set(range(len(train.dataset))) - set(train.indices)
    doc = json.loads((tmp_path / "explain" / "influence.json").read_text())
    named = {e["index"] for test in doc["tests"] for kind in ("helpful", "harmful") for e in test["id"][kind]}
    assert len(named) >= 10
    assert not named & held_out  # every named image is one explain scanned, none of the validation images


def _released_files(run_dir: Path, folder: Path, drop: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10-C style folder made from the quickstart's ID test set (minus its last ``drop`` images): labels.npy,
    fog.npy (brighter with each severity) and pixel_noise.npy (noisier); returns the pixel_noise images and labels."""
    _, dm = rebuild(load_checkpoint(run_dir / "last.ckpt"), {})
    clean = dm.id_dataset_for("test").dataset  # ArrayDataset: (N, 1, 8, 8) in [0, 1]
    n = len(clean) - drop
    pixels = (clean.images[:n].permute(0, 2, 3, 1).numpy() * 255).astype(np.int64)
    rng = np.random.default_rng(0)
    severities = range(1, 6)
    fog = np.concatenate([np.clip(pixels + 20 * s, 0, 255) for s in severities]).astype(np.uint8)
    noisy = np.concatenate([np.clip(pixels + rng.normal(0, 15 * s, pixels.shape), 0, 255) for s in severities])
    folder.mkdir()
    np.save(folder / "fog.npy", fog)
    np.save(folder / "pixel_noise.npy", noisy.astype(np.uint8))
    labels = np.tile(clean.labels[:n].numpy(), 5).astype(np.uint8)  # as CIFAR-10-C's labels.npy
    np.save(folder / "labels.npy", labels)
    return noisy.astype(np.uint8), labels


def test_released_corruption_files_are_scored_row_for_row(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = _released_files(run_dir, tmp_path / "cifar10c")
    out = tmp_path / "out"
    args = [str(run_dir), "--suites", "corruption", "--corruption-files", str(tmp_path / "cifar10c"), "--no-plots"]
    args += ["--severities", "1", "4", "--scorers", "energy", "msp", "--max-samples", "40", "--out", str(out)]
    proc = run_inprocess(args, capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["options"]["corruptions"] == ["fog", "pixel_noise"]  # every file but the labels
    assert results["options"]["corruption_table"] is None
    assert set(results["sets"]) == {"fog_s1", "fog_s4", "pixel_noise_s1", "pixel_noise_s4"}
    id_scores = np.load(out / "scores" / "id.npz")
    scores = np.load(out / "scores" / "pixel_noise_s4.npz")
    index = id_scores["index"]
    assert len(index) == 40
    assert np.array_equal(scores["index"], index)  # the same sampled images
    n = len(labels) // 5
    rows = 3 * n + index  # severity 4
    assert np.array_equal(scores["labels"], labels[rows])
    # Reference: the rows' pixels, normalized as the model's inputs, through the model by hand.
    module, _ = rebuild(load_checkpoint(run_dir / "best.ckpt"), {})
    model = module.model.eval()
    x = torch.from_numpy(images[rows]).permute(0, 3, 1, 2).float() / 255
    x = (x - model.input_mean.view(1, -1, 1, 1)) / model.input_std.view(1, -1, 1, 1)
    with torch.no_grad():
        expected = torch.logsumexp(model(x), dim=1).double().numpy()
    np.testing.assert_allclose(scores["score_energy"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "extra", "fragments"),
    [
        (
            "none",
            ["--corruptions", "snow"],
            ["--corruption-files: no file snow.npy in", "corruptions: fog, pixel_noise"],
        ),
        ("missing", [], ["dataset 'corruption files' not found at", "zenodo.org/record/2535967"]),
        ("no labels", [], ["labels.npy; the labels of every row are missing"]),
        ("pickled labels", [], ["labels.npy is unusable: not a .npy array of integer labels"]),
        ("short file", [], ["fog.npy is unusable: it holds 10 images for the"]),
        ("other test set", [], ["images per severity, but the ID test set (digits) has", "CIFAR-10-C for cifar10"]),
        ("shuffled labels", [], ["labels.npy gives test image", "the files are not this test set in its order"]),
        ("none", ["--corruption-table", "cifar10c"], ["--corruption-table sets the parameters of generated"]),
        ("uppercase suffix", [], ["snow.NPY is unusable: rename it to snow.npy"]),  # was left out without a word
    ],
)
def test_bad_corruption_files_stop_before_any_output(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str, extra: list[str], fragments: list
) -> None:
    folder = tmp_path / "cifar10c"
    _released_files(run_dir, folder, drop=1 if change == "other test set" else 0)
    if change == "missing":
        shutil.rmtree(folder)
    elif change == "no labels":
        (folder / "labels.npy").unlink()
    elif change == "pickled labels":  # refused from its header: never unpickled
        np.save(folder / "labels.npy", np.array([{"label": 1}], dtype=object), allow_pickle=True)
    elif change == "short file":
        np.save(folder / "fog.npy", np.zeros((10, 8, 8, 1), dtype=np.uint8))
    elif change == "uppercase suffix":
        shutil.copy(folder / "fog.npy", folder / "snow.NPY")
    elif change == "shuffled labels":
        labels = np.load(folder / "labels.npy")
        np.save(folder / "labels.npy", labels[np.random.default_rng(0).permutation(len(labels))])
    before = sorted(run_dir.iterdir())
    args = [str(run_dir), *FAST, "--suites", "corruption", "--corruption-files", str(folder), *extra]
    assert_one_line_error(run_inprocess(args, capsys), *fragments)
    assert sorted(run_dir.iterdir()) == before  # no eval-NNN folder


def test_corruption_files_skip_hidden_files(run_dir: Path, tmp_path: Path) -> None:
    # macOS tar leaves ._fog.npy beside fog.npy: it stopped --corruption-files as "not a .npy file".
    from gradreg.data.corrupted import CorruptionFiles

    folder = tmp_path / "cifar10c"
    _released_files(run_dir, folder)
    (folder / "._fog.npy").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert CorruptionFiles(folder).names == ["fog", "pixel_noise"]


def _imagenet_c(tmp_path: Path) -> tuple[Path, Path]:
    """A post-hoc config on a fake ImageNet-10 val/ (2 images a class) and an ImageNet-C style folder for it:
    fog/<severity>/<wnid>/<the val file name>, 224 px images 20 x severity levels brighter than the val image."""
    from gradreg.data.benchmarks import imagenet_subset_wnids

    rng = np.random.default_rng(0)
    for wnid in imagenet_subset_wnids(10):
        val = tmp_path / "data" / "imagenet" / "val" / wnid
        val.mkdir(parents=True)
        for k in range(2):
            image = rng.integers(0, 200, (224, 224, 3), dtype=np.uint8)
            name = f"ILSVRC2012_val_{wnid[-4:]}{k}.png"
            Image.fromarray(image).save(val / name)
            for severity in range(1, 6):
                folder = tmp_path / "imagenet-c" / "fog" / str(severity) / wnid
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(image.astype(int) + 10 * severity, 0, 255).astype(np.uint8)).save(folder / name)
    config = tmp_path / "imagenet10.yaml"
    config.write_text(
        "seed_everything: 0\nmodel:\n  arch: small_cnn\n  arch_kwargs: {in_channels: 3, width: 8}\ndata:\n"
        "  id_dataset: imagenet10\n  ood_sets: []\n  near_ood: []\n  outliers: null\n"
        f"  data_root: {tmp_path / 'data'}\n  eval_batch_size: 8\n  num_workers: 0\n"
    )
    return config, tmp_path / "imagenet-c"


def test_imagenet_c_folders_are_matched_to_the_id_test_set_by_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, folder = _imagenet_c(tmp_path)
    for severity in (1, 3, 4, 5):  # only the severities asked for need to be there
        shutil.rmtree(folder / "fog" / str(severity))
    out = tmp_path / "out"
    args = [str(config), "--suites", "corruption", "--corruption-files", str(folder), "--severities", "2"]
    proc = run_inprocess([*args, "--scorers", "energy", "--no-plots", "--wandb", "off", "--out", str(out)], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["sets"]) == ["fog_s2"]
    id_scores, scores = np.load(out / "scores" / "id.npz"), np.load(out / "scores" / "fog_s2.npz")
    assert np.array_equal(scores["index"], id_scores["index"])
    assert np.array_equal(scores["labels"], id_scores["labels"])
    # Reference: the same model (the config's seeded initial weights) on the fog/2 images, normalized, by hand.
    from gradreg.report import from_config

    module, dm = from_config(config, {})
    model = module.model.eval()
    files = [dm.id_dataset_for("test").dataset.file(i) for i in scores["index"]]
    pixels = np.stack([np.asarray(Image.open(folder / "fog" / "2" / f.parent.name / f.name)) for f in files])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - model.input_mean.view(1, -1, 1, 1)) / model.input_std.view(1, -1, 1, 1)
    with torch.no_grad():
        expected = torch.logsumexp(model(x), dim=1).double().numpy()
    np.testing.assert_allclose(scores["score_energy"], expected, rtol=1e-5, atol=1e-5)


def test_rgb_corruptions_are_generated_on_imagenet_sized_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], frost_photos: Path
) -> None:
    config, _ = _imagenet_c(tmp_path)
    out = tmp_path / "out"
    names = ["motion_blur", "snow", "spatter", "saturate", "frost"]
    args = [str(config), "--suites", "corruption", "--corruptions", *names, "--severities", "2", "--max-samples", "6"]
    proc = run_inprocess([*args, "--scorers", "energy", "--no-plots", "--wandb", "off", "--out", str(out)], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["options"]["corruption_table"] == "imagenetc"  # auto, for 224 px images
    assert list(results["sets"]) == [f"{name}_s2" for name in names]
    # Reference: the sampled ID images corrupted by hand, each with its own generator, through the same model.
    from gradreg.report import from_config, image_generators

    module, dm = from_config(config, {})
    model = module.model.eval()
    index = np.load(out / "scores" / "id.npz")["index"]
    x = torch.stack([dm.id_dataset_for("test")[int(i)][0] for i in index])
    mean, std = model.input_mean, model.input_std
    for name in names:
        scores = np.load(out / "scores" / f"{name}_s2.npz")
        assert np.array_equal(scores["index"], index)
        corrupted = corrupt(x, name, 2, mean, std, image_generators(f"{name}_s2", torch.from_numpy(index)), "imagenetc")
        with torch.no_grad():
            expected = torch.logsumexp(model(corrupted), dim=1).double().numpy()
        np.testing.assert_allclose(scores["score_energy"], expected, rtol=1e-5, atol=1e-5)


def test_frost_without_its_photographs_stops_before_any_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "imagecorruptions").exists()])
    importlib.invalidate_caches()
    config, _ = _imagenet_c(tmp_path)
    args = [str(config), "--suites", "corruption", "--corruptions", "fog", "frost", "--out", str(tmp_path / "out")]
    fragments = ["--corruptions frost: frost blends in the photographs", "pip install --no-deps imagecorruptions"]
    assert_one_line_error(run_inprocess(args, capsys), *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", ["missing image", "other class folder", "missing severity"])
def test_imagenet_c_folders_that_are_not_the_id_test_set_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str
) -> None:
    config, folder = _imagenet_c(tmp_path)
    image = next((folder / "fog" / "3").glob("*/*.png"))
    if change == "missing image":
        image.unlink()
        fragment = f"{folder / 'fog' / '3'} has no {image.name}"
    elif change == "other class folder":
        other = next(p for p in (folder / "fog" / "3").iterdir() if p.name != image.parent.name)
        image.rename(other / image.name)
        fragment = f"is in class folder {other.name}, but ID test image"
    else:
        shutil.rmtree(folder / "fog" / "4")
        fragment = f"{folder / 'fog' / '4'} is missing; extract it, or give --severities those that are there"
    args = [str(config), "--suites", "corruption", "--corruption-files", str(folder), "--scorers", "energy"]
    assert_one_line_error(run_inprocess([*args, "--out", str(tmp_path / "out")], capsys), fragment)
    assert not (tmp_path / "out").exists()


def _c10c_files(folder: Path, n: int = 6, labels: np.ndarray | None = None) -> np.ndarray:
    """labels.npy (5 n rows) and fog.npy, pixel (row r) = r: row (s - 1) n + j is image j at severity s."""
    folder.mkdir()
    rows = np.arange(5 * n, dtype=np.uint8)
    np.save(folder / "fog.npy", np.broadcast_to(rows[:, None, None, None], (5 * n, 2, 2, 3)).copy())
    labels = np.tile(np.arange(n) % 3, 5).astype(np.uint8) if labels is None else labels
    np.save(folder / "labels.npy", labels)
    return labels


def test_corruption_file_rows_are_read_from_their_severitys_block(tmp_path: Path) -> None:
    from gradreg.data.corrupted import CorruptionFiles

    n = 6
    labels = np.arange(5 * n, dtype=np.uint8) % 7  # not tiled: a row's label must come from that row
    _c10c_files(tmp_path / "c", n, labels)
    files = CorruptionFiles(tmp_path / "c")
    for s in range(1, 6):
        rows = files.severity("fog", s)
        assert len(rows) == n
        for j in range(n):
            image, label = rows[j]
            assert image.shape == (2, 2, 3)
            assert image.dtype == np.uint8
            assert (image == (s - 1) * n + j).all()
            assert label == labels[(s - 1) * n + j]
        with pytest.raises(IndexError):
            rows[n]  # not image 0 of the next severity


@pytest.mark.parametrize("severity", [2, 3, 5])
def test_corruption_files_check_the_labels_of_every_severity_asked_for(tmp_path: Path, severity: int) -> None:
    from torch.utils.data import TensorDataset

    from gradreg.data.corrupted import CorruptionFiles

    n = 6
    labels = np.tile(np.arange(n) % 3, 5).astype(np.uint8)
    labels[(severity - 1) * n + 4] = (labels[(severity - 1) * n + 4] + 1) % 3  # image 4 wrong at this severity only
    _c10c_files(tmp_path / "c", n, labels)
    id_test = TensorDataset(torch.zeros(n, 1), torch.arange(n) % 3)
    CorruptionFiles(tmp_path / "c", severities=[s for s in range(1, 6) if s != severity]).check(id_test, range(n), "x")
    with pytest.raises(ValueError, match=f"gives test image 4 at severity {severity} the label"):
        CorruptionFiles(tmp_path / "c").check(id_test, range(n), "x")


def test_imagenet_c_files_get_the_labels_of_their_id_images_when_sampled(tmp_path: Path) -> None:
    from torch.utils.data import Dataset

    from gradreg.data.corrupted import CorruptionFiles

    class Folder(Dataset):  # an ImageFolderDataset's file() and labels
        def __init__(self, root: Path) -> None:
            self.paths = sorted(root.glob("*/*.png"))
            self.labels = torch.tensor([int(p.parent.name[1:]) for p in self.paths])

        def __len__(self) -> int:
            return len(self.paths)

        def file(self, i: int) -> str:
            return str(self.paths[i])

    for c in range(4):
        for k in range(2):
            name = f"img_{c}{k}.png"
            for root in (tmp_path / "val", tmp_path / "c" / "fog" / "2"):
                (root / f"n{c}").mkdir(parents=True, exist_ok=True)
                pixels = np.full((4, 4, 3), 10 * c + k + (root.name == "2"), np.uint8)
                Image.fromarray(pixels).save(root / f"n{c}" / name)
    id_test = Folder(tmp_path / "val")
    files = CorruptionFiles(tmp_path / "c", severities=[2])
    indices = [7, 2, 5]  # a sample, not the first items
    files.check(id_test, indices, "x")
    fog = files.severity("fog", 2)
    assert len(fog) == 3
    for i in indices:
        image, label = fog[i]
        assert label == int(id_test.labels[i])
        assert np.asarray(image)[0, 0, 0] == 10 * (i // 2) + i % 2 + 1  # the corrupted copy of ID image i


class _ImageFiles:
    """An ID test set of image files as CorruptionFiles.check reads one: ``labels``, ``len`` and ``file(i)``."""

    def __init__(self, files: list[Path], labels: list[int]) -> None:
        self.files, self.labels = files, torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.files)

    def file(self, i: int) -> str:
        return str(self.files[i])


def test_imagenet_c_images_in_another_class_folder_are_refused(tmp_path: Path) -> None:
    from gradreg.data.corrupted import CorruptionFiles

    id_test = _ImageFiles([tmp_path / "val" / "n0" / "a.png", tmp_path / "val" / "n1" / "b.png"], [0, 1])
    for cls, name in (("n0", "a.png"), ("n0", "b.png"), ("n1", "c.png")):  # b.png filed under n0 instead of n1
        (tmp_path / "c" / "fog" / "1" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "c" / "fog" / "1" / cls / name)
    with pytest.raises(ValueError, match="is in class folder n0, but ID test image 1"):
        CorruptionFiles(tmp_path / "c", severities=[1]).check(id_test, [0, 1], "x")  # type: ignore[arg-type]


def test_corruption_file_rows_refuse_negative_indices(tmp_path: Path) -> None:
    # Row -1 of severity 2 is not image n - 1 of severity 1 (the row before its block).
    from gradreg.data.corrupted import CorruptionFiles

    _c10c_files(tmp_path / "c")
    rows = CorruptionFiles(tmp_path / "c").severity("fog", 2)
    with pytest.raises(IndexError):
        rows[-1]


@pytest.mark.parametrize(
    ("labels", "rows"),
    [
        (np.tile(np.arange(6) % 3, 5).astype(np.uint8)[:, None], 30),  # a column, not a vector
        (np.tile(np.arange(6) % 3, 5).astype(np.float32), 30),  # not integers
        (np.arange(31) % 3, 31),  # not 5 severities of the same number of images
    ],
)
def test_corruption_files_refuse_labels_that_are_not_five_severities_of_integers(
    tmp_path: Path, labels: np.ndarray, rows: int
) -> None:
    from gradreg.data.corrupted import CorruptionFiles
    from gradreg.data.datasets import DatasetFileError

    folder = tmp_path / "c"
    folder.mkdir()
    np.save(folder / "fog.npy", np.zeros((rows, 2, 2, 3), np.uint8))  # as many images as labels
    np.save(folder / "labels.npy", labels)
    with pytest.raises(DatasetFileError, match="expected integer labels of 5 severities x N images"):
        CorruptionFiles(folder)


def test_corruption_files_refuse_more_images_than_labels(tmp_path: Path) -> None:
    from gradreg.data.corrupted import CorruptionFiles
    from gradreg.data.datasets import DatasetFileError

    _c10c_files(tmp_path / "c")  # 30 labels
    np.save(tmp_path / "c" / "fog.npy", np.zeros((35, 2, 2, 3), np.uint8))
    with pytest.raises(DatasetFileError, match=r"it holds 35 images for the 30 labels of labels\.npy"):
        CorruptionFiles(tmp_path / "c")


@pytest.mark.parametrize("n", [5, 7])
def test_corruption_files_of_another_test_set_size_are_refused(tmp_path: Path, n: int) -> None:
    # 6 images per severity are the copies of a test set of 6, neither of a smaller one nor of a larger one.
    from torch.utils.data import TensorDataset

    from gradreg.data.corrupted import CorruptionFiles

    _c10c_files(tmp_path / "c", 6)
    id_test = TensorDataset(torch.zeros(n, 1), torch.arange(n) % 3)
    with pytest.raises(ValueError, match=f"it holds 6 images per severity, but the ID test set \\(x\\) has {n}"):
        CorruptionFiles(tmp_path / "c").check(id_test, range(min(n, 6)), "x")


def test_corruption_files_name_the_sampled_test_image_whose_label_differs(tmp_path: Path) -> None:
    # Sampled indices (not 0..n-1, in no order): the one that differs is the last of them, named by its index in the
    # test set with both labels: labels.npy gives image 3 at severity 2 (row 6 + 3) the label 2, the test set 3 % 3 = 0.
    from torch.utils.data import TensorDataset

    from gradreg.data.corrupted import CorruptionFiles

    n = 6
    labels = np.tile(np.arange(n) % 3, 5).astype(np.uint8)
    labels[n + 3] = 2
    _c10c_files(tmp_path / "c", n, labels)
    id_test = TensorDataset(torch.zeros(n, 1), torch.arange(n) % 3)
    files = CorruptionFiles(tmp_path / "c")
    files.check(id_test, [5, 1, 4], "x")  # image 3 not sampled: nothing to refuse
    with pytest.raises(ValueError, match=r"gives test image 3 at severity 2 the label 2, the ID test set \(x\) 0:"):
        files.check(id_test, [5, 1, 3], "x")


def test_imagenet_c_folders_match_a_flat_id_test_set_by_file_name_alone(tmp_path: Path) -> None:
    # ID test images in one folder (no class folders): the corrupted copies' class folders cannot be checked against
    # theirs, so any class folder holds them.
    from gradreg.data.corrupted import CorruptionFiles

    id_test = _ImageFiles([tmp_path / "val" / "a.png", tmp_path / "val" / "b.png"], [4, 9])
    for k, (cls, name) in enumerate((("n0", "a.png"), ("n1", "b.png"))):
        (tmp_path / "c" / "fog" / "1" / cls).mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(tmp_path / "c" / "fog" / "1" / cls / name)
    files = CorruptionFiles(tmp_path / "c", severities=[1])
    files.check(id_test, [0, 1], "x")  # type: ignore[arg-type]
    fog = files.severity("fog", 1)
    for i in (0, 1):
        image, label = fog[i]
        assert (label, np.asarray(image)[0, 0, 0]) == (int(id_test.labels[i]), i)


def test_a_budget_of_one_whole_pixel_range_is_accepted() -> None:
    # (0, 1]: 1 is the largest budget, not outside the range
    opts = parse_args(["ckpt", "--epsilons", "1", "--suites", "adversarial"])
    check_options(opts)
    assert opts.epsilons == [1.0]


def test_a_cuda_device_beyond_the_ones_present_is_refused() -> None:
    # cuda:N with N = the number of GPUs (cuda:0 on a machine without one) names no device here
    count = torch.cuda.device_count()
    with pytest.raises(UserError, match=f"--device 'cuda:{count}': this machine has"):
        resolve_device(f"cuda:{count}")


def test_an_out_folder_that_holds_files_is_refused_before_the_checkpoint_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = run_inprocess([str(tmp_path / "missing.ckpt"), "--out", str(out)], capsys)
    assert_one_line_error(proc, f"output folder '{out}' already holds files")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_an_ood_set_named_like_a_successful_attack_row_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The adversarial set fgsm_eps8 writes the row fgsm_eps8/successful: an OOD set of that name would lose its row.
    out = tmp_path / "out"
    args = [str(run_dir), *FAST, "--scorers", "energy", "--out", str(out), "--suites", "ood", "adversarial"]
    sets = "ood_sets=[{name: noise, alias: fgsm_eps8/successful}]"
    proc = run_inprocess([*args, "--epsilons", "8/255", "--data", sets, "near_ood=[]"], capsys)
    assert_one_line_error(proc, "two sets named 'fgsm_eps8/successful' would write to one row")
    assert not out.exists()


def test_robustness_attacks_only_the_chosen_ood_sets_with_the_largest_budget(run_dir: Path) -> None:
    module, dm = rebuild(load_checkpoint(run_dir / "last.ckpt"), {})
    model = module.model.eval()
    opts = parse_args(["ckpt", "--suites", "robustness", "--epsilons", "16/255", "2/255", "--pgd-steps", "3",
                       "--sets", "noise"])  # fmt: skip
    check_options(opts)
    ood_sets = {name: sample(d, 16) for name, d in dm.ood_datasets("test").items()}
    assert set(ood_sets) == {"digits_heldout", "noise"}
    sets = list(anomaly_sets(model, sample(dm.id_dataset_for("test"), 16), ood_sets, opts))
    assert [(name, group) for name, group, *_ in sets] == [("attacked/noise", "robustness")]
    ((_, _, source, attack),) = sets
    x, y = next(iter(dm.eval_loader(source)))
    attacked = attack(x, y, torch.arange(len(x)))
    torch.testing.assert_close(attacked, energy_attack(model, x, 16 / 255, steps=3), rtol=0, atol=0)
    assert not torch.equal(attacked, energy_attack(model, x, 2 / 255, steps=3))


def test_an_option_of_one_of_its_suites_is_accepted_without_the_others() -> None:
    # --sets sets the ood and robustness suites: either one running is enough (likewise --epsilons)
    assert parse_args(["ckpt", "--suites", "ood", "--sets", "noise"]).sets == ["noise"]
    assert parse_args(["ckpt", "--suites", "robustness", "--sets", "noise"]).sets == ["noise"]
    assert parse_args(["ckpt", "--suites", "adversarial", "--epsilons", "4/255"]).epsilons == [4 / 255]
