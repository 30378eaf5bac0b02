"""End-to-end: train.py then evaluate.py as subprocesses on the shrunk quickstart, and every bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gradreg.cli import (
    Interrupted,
    UserError,
    configure_wandb_env,
    evaluate_main,
    next_run_dir,
    point_latest,
    read_config_file,
    run_user_errors,
    train_main,
    wandb_failure,
)
from gradreg.module import GradRegModule
from gradreg.provenance import PACKAGES, environment, git_revision
from gradreg.report import parse_scorer
from gradreg.training import _optimizer_change, build_cli, default_loggers

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"]


def run(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def train(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    config = str(ROOT / "configs" / "quickstart.yaml")
    return run("train.py", "--config", config, "--run.root", str(tmp / "runs"), *FAST, *extra, cwd=tmp, env=env)


def run_inprocess(main, args: list[str], capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess:
    """Call an entry point in this process (no interpreter start-up); same exit code and stderr as a subprocess."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_info.value.code, captured.out, captured.err)


def train_inprocess(tmp: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> subprocess.CompletedProcess:
    config = str(ROOT / "configs" / "quickstart.yaml")
    args = ["--config", config, "--run.root", str(tmp / "runs"), *FAST, "--trainer.logger", "false", *extra]
    return run_inprocess(train_main, args, capsys)


def callback_config(path: Path, init_args: str) -> Path:
    """A config file with one OODEvalCallback whose ``init_args`` hold the YAML line ``init_args``."""
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: gradreg.callbacks.OODEvalCallback\n"
        f"      init_args:\n        {init_args}\n"
    )
    return path


def wandb_records(folder: Path) -> list:
    """The records of the one offline wandb run in ``folder/wandb`` (wandb's LevelDB-style log, which wandb sync reads).

    The file starts with a 7-byte header; records are cut into chunks of 32 KiB blocks, each chunk with a 7-byte
    header (CRC, length, type: 1 whole, 2 first, 3 middle, 4 last).
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, chunks, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def wandb_run(folder: Path) -> SimpleNamespace:
    """The offline wandb run in ``folder/wandb``: its run record, config, history rows and summary."""
    records = wandb_records(folder)
    items = lambda update: {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}  # noqa: E731
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = items(run.config.update)  # wandb.init(config=...), then config.update(...)
    config |= {
        k: v for r in records if r.WhichOneof("record_type") == "config" for k, v in items(r.config.update).items()
    }
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    summary = {
        k: v for r in records if r.WhichOneof("record_type") == "summary" for k, v in items(r.summary.update).items()
    }
    return SimpleNamespace(run=run, config=config, history=history, summary=summary)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 1, no traceback, one ``error:`` line (a missing-data report may list one line per dataset)."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    report = proc.stderr[proc.stderr.index(errors[0]) :]
    for fragment in fragments:
        assert fragment in report, report


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    proc = train(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp / "train.output").write_text(proc.stdout + proc.stderr)
    return tmp


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_train_writes_run_directory(trained: Path) -> None:
    run_dir = trained / "runs" / "quickstart-001"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "last.ckpt").is_file()
    assert (run_dir / "best.ckpt").is_file()
    assert (trained / "runs" / "latest").resolve() == run_dir.resolve()
    stderr = trained.joinpath("train.output").read_text()  # stdout and stderr
    assert "exists and is not empty" not in stderr  # Lightning's false alarm
    assert "anonymous" not in stderr  # wandb's deprecation warning for the setting Lightning passes
    for noise in ("LeafSpec", "litlogger"):  # Lightning's lines that no setting of a run acts on
        assert noise not in stderr
    rows = list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))
    keys = set(rows[0])
    for key in (
        "train/loss_epoch",
        "train/reg_epoch",
        "val/acc",
        "ood/digits_heldout/energy/auroc",
        "ood/mean/msp/fpr95",
    ):
        assert key in keys, sorted(keys)
    (offline,) = run_dir.glob("wandb/offline-run-*")  # wandb ran offline without a key, in the run directory
    records = next(offline.glob("*.wandb")).read_bytes()
    for key in (b"ood/digits_heldout/energy/auroc", b"ood/mean/msp/fpr95", b"hist/noise/gradnorm", b"val/acc"):
        assert key in records, key
    tables = list(offline.glob("files/media/table/ood/table_*.table.json"))
    assert len(tables) == 2  # one per-set table per epoch
    assert "digits_heldout" in tables[0].read_text()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_wandb_config_is_the_whole_nested_config(trained: Path) -> None:
    run_dir = trained / "runs" / "quickstart-001"
    config = wandb_run(run_dir).config
    # config.yaml's sections (was Lightning's flat model + data init arguments only: no trainer, seed or callbacks)
    assert config["seed_everything"] == 0
    assert (config["trainer"]["max_epochs"], config["trainer"]["limit_train_batches"]) == (2, 3)
    assert config["trainer"]["callbacks"][0]["init_args"]["scorers"] == ["msp", "maxlogit", "energy", "gradnorm"]
    assert (config["model"]["method"], config["model"]["lr"]) == ("greg", 0.05)
    assert config["model"]["num_classes"] == 6  # linked from the data, as in hparams.yaml
    assert (config["data"]["id_dataset"], config["run"]["monitor"]) == ("digits", "val/acc")
    assert not {"lr", "method", "batch_size", "_instantiator"} & set(config), sorted(config)  # no flat second copy
    assert "lr" in yaml.safe_load((run_dir / "hparams.yaml").read_text())  # Lightning's copy for metrics.csv stays


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_wandb_media_share_the_step_of_the_epoch_metrics(trained: Path) -> None:
    history = wandb_run(trained / "runs" / "quickstart-001").history
    steps = [row["trainer/global_step"] for row in history]
    assert steps == sorted(steps), steps  # the callback's histograms were one step ahead of the metrics that follow
    for epoch in (0, 1):
        ood = [r for r in history if r.get("epoch") == epoch and "ood/mean/energy/auroc" in r]
        media = [r for r in history if r.get("epoch") == epoch and "hist/id/energy/_type" in r]
        assert len(ood) == len(media) == 1, history
        assert media[0]["trainer/global_step"] == ood[0]["trainer/global_step"]
    csv_steps = {row["step"] for row in csv.DictReader((trained / "runs/quickstart-001/metrics.csv").open())}
    assert {str(s) for s in steps} <= csv_steps  # wandb and metrics.csv put each value at the same step


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_wandb_run_is_named_and_grouped_after_the_run_directory(trained: Path) -> None:
    run_dir = trained / "runs" / "quickstart-001"
    run = wandb_run(run_dir).run
    assert (run.display_name, run.run_group, run.job_type) == ("quickstart-001", "quickstart-001", "train")
    record = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["run"]
    assert record == {"name": "quickstart-001", "group": "quickstart-001", "wandb_id": run.run_id, "optimizer": None}
    assert not (trained / "wandb").exists()  # wandb writes in the run directory only, never in the working directory


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_wandb_summary_holds_the_best_value_of_the_monitored_metric(trained: Path) -> None:
    logged = wandb_run(trained / "runs" / "quickstart-001")
    validations = [r for r in logged.history if "val/acc" in r]
    best = max(validations, key=lambda r: r["val/acc"])  # the first of equal values, as ModelCheckpoint keeps it
    assert logged.summary["best/val/acc"] == pytest.approx(best["val/acc"])
    assert logged.summary["best/epoch"] == best["epoch"]
    assert logged.summary["val/acc"] == validations[-1]["val/acc"]  # the last value, as wandb keeps it


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resumed_run_and_its_evaluation_join_the_wandb_group_of_the_first_run(trained: Path, tmp_path: Path) -> None:
    first = trained / "runs" / "quickstart-001"
    first_id = wandb_run(first).run.run_id
    proc = train(tmp_path, "--run.name", "resumed", "--run.resume", str(first), "--trainer.max_epochs", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed_dir = tmp_path / "runs" / "resumed-001"
    resumed = wandb_run(resumed_dir)
    assert resumed.run.display_name == "resumed-001"  # a new wandb run, as the run is a new folder
    assert resumed.run.run_id != first_id
    assert resumed.run.run_group == "quickstart-001"  # the group of the run it resumes (was none)
    assert resumed.run.notes == f"resumes {first / 'last.ckpt'} (wandb run {first_id})"
    assert resumed.config["run"]["resume"] == str(first / "last.ckpt")
    assert [r["trainer/global_step"] for r in resumed.history if "val/acc" in r] == [8]  # goes on after step 5
    record = torch.load(resumed_dir / "last.ckpt", map_location="cpu", weights_only=True)["run"]
    assert record["group"] == "quickstart-001"  # so a run resuming this one joins the same group
    args = ["--suites", "ood", "--scorers", "energy", "--max-samples", "32", "--no-plots"]
    proc = run("evaluate.py", str(resumed_dir), "--out", str(tmp_path / "ev"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = wandb_run(tmp_path / "ev")
    assert (evaluation.run.display_name, evaluation.run.run_group) == ("resumed-001-ev", "quickstart-001")
    assert evaluation.run.job_type == "eval"
    assert evaluation.config["trained_run"] == {**record, "name": "resumed-001", "wandb_id": resumed.run.run_id}
    assert evaluation.config["options"]["scorers"] == {"energy": {"name": "energy", "temperature": 1.0}}
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert evaluation.summary["eval/id/accuracy"] == results["id"]["accuracy"]
    auroc = results["means"]["ood"]["energy"]["auroc"]
    assert evaluation.summary["eval/mean/ood/energy/auroc"] == pytest.approx(auroc)
    assert not (tmp_path / "wandb").exists()


NO_SERVER = {  # a login but no network: wandb retries until its init timeout
    "WANDB_API_KEY": "0123456789" * 4,
    "WANDB_BASE_URL": "http://127.0.0.1:9",
    "WANDB_INIT_TIMEOUT": "3",
    "WANDB_MODE": "online",
}


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("login", [True, False], ids=["no-server", "no-login"])
def test_wandb_without_its_server_or_a_login_is_one_line(login: bool, tmp_path: Path) -> None:
    # The run stops in one line (was a traceback); without a login wandb.init fails at once.
    env = NO_SERVER if login else {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path)}
    proc = train(tmp_path, "--trainer.max_epochs", "1", env=env)
    assert_one_line_error(proc, "wandb failed", "WANDB_MODE=offline")
    assert not list(tmp_path.glob("runs/*/*.ckpt"))
    logs = re.findall(r"wandb's logs: ([^)]+)\)", proc.stderr)  # it named the run's folder after deleting it
    assert all((tmp_path / path).is_dir() for path in logs), proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_evaluate_prints_and_keeps_its_results_when_wandb_fails(trained: Path, tmp_path: Path) -> None:
    # The whole benchmark ran, then wandb.init's error was a traceback before the table was printed.
    out = tmp_path / "ev"
    args = ["--out", str(out), "--wandb", "on", "--suites", "ood", "--scorers", "energy"]
    proc = run("evaluate.py", str(trained / "runs" / "quickstart-001"), *args, cwd=tmp_path, env=NO_SERVER)
    assert_one_line_error(proc, "wandb failed", "WANDB_MODE=offline")
    assert "energy" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith(f"results: {out / 'results.json'}")
    assert json.loads((out / "results.json").read_text())["id"]["accuracy"] is not None


@pytest.mark.parametrize("mode", ["", "ofline"])
def test_a_bad_wandb_mode_is_one_line_before_any_work(
    mode: str, trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # wandb.init raised a pydantic traceback: at train.py's start, and after evaluate.py's whole benchmark.
    monkeypatch.setenv("WANDB_MODE", mode)
    message = f"WANDB_MODE={mode!r} is not a wandb mode (online, offline, disabled"
    config = str(ROOT / "configs" / "quickstart.yaml")
    proc = run_inprocess(train_main, ["--config", config, "--run.root", str(tmp_path / "runs"), *FAST], capsys)
    assert_one_line_error(proc, message, "fix it or unset it")
    assert not list(tmp_path.glob("runs/*"))
    out = tmp_path / "ev"
    args = [str(trained / "runs" / "quickstart-001"), "--out", str(out), "--wandb", "on", "--suites", "ood"]
    assert_one_line_error(run_inprocess(evaluate_main, args, capsys), message)
    assert not out.exists()
    # Without wandb the variable does not matter.
    assert train_inprocess(tmp_path, capsys, "--trainer.max_epochs", "1").returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_rerun_never_overwrites(trained: Path) -> None:
    first = trained / "runs" / "quickstart-001" / "last.ckpt"
    before = first.read_bytes()
    proc = train(trained, "--trainer.max_epochs", "1", env={"WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (trained / "runs" / "quickstart-002" / "last.ckpt").is_file()
    assert first.read_bytes() == before
    assert not list((trained / "runs" / "quickstart-002").glob("wandb")), "WANDB_MODE=disabled writes nothing"
    record = torch.load(trained / "runs" / "quickstart-002" / "last.ckpt", map_location="cpu", weights_only=True)
    assert record["run"]["wandb_id"] is None  # not the made-up id of wandb's disabled run


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_evaluate_writes_consistent_results(trained: Path) -> None:
    out, latest = trained / "eval", trained / "runs" / "latest"
    proc = run(
        "evaluate.py", str(latest), "--out", str(out),
        "--corruptions", "jpeg", "--severities", "5", "--epsilons", str(8 / 255), cwd=trained,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"] == str(latest.parent / latest.readlink() / "best.ckpt")  # the run, not "latest"
    assert results["options"]["epsilons"] == [8 / 255]
    assert results["options"]["corruption_table"] == "cifar10c"  # auto, resolved for 8x8 images
    assert list(results["options"]["scorers"]) == results["scorers"]
    assert 0.0 <= results["id"]["accuracy"] <= 1.0
    trained_with = torch.load(latest / "best.ckpt", weights_only=True)["environment"]  # written by the training run
    assert results["trained_with"] == trained_with
    for env in (trained_with, results["environment"]):
        assert env["packages"]["torch"] == torch.__version__
        assert env["git"] == git_revision(ROOT)  # the checkout that ran the tests (None in an installed copy)
    sets = results["sets"]
    assert {"digits_heldout", "noise", "fgsm_eps8", "pgd_eps8", "jpeg_s5", "attacked/noise"} <= set(sets)
    assert {"fgsm_eps8/successful", "pgd_eps8/successful"} <= set(sets)
    attack = sets["fgsm_eps8"]["attack"]
    assert sets["fgsm_eps8/successful"]["n"] == attack["successful"] <= attack["correct"]
    assert sets["digits_heldout"]["group"] == "near"
    assert sets["noise"]["group"] == "far"
    groups = ["near", "far", "ood", "adversarial", "adversarial/successful", "corruption", "robustness"]
    assert list(results["means"]) == groups
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    for row in rows:
        if row["set"] in sets:
            expected = sets[row["set"]]["metrics"][row["scorer"]]
            for metric in ("auroc", "fpr95"):  # null: no successful attack at that budget
                value = math.nan if expected[metric] is None else expected[metric]
                assert float(row[metric]) == pytest.approx(value, nan_ok=True)
    mean_energy = results["means"]["ood"]["energy"]["auroc"]
    per_set = [sets[s]["metrics"]["energy"]["auroc"] for s in ("digits_heldout", "noise")]
    assert mean_energy == pytest.approx(sum(per_set) / 2)
    for text in ("AUROC", "digits_heldout", "ID accuracy", "mean/ood"):
        assert text in proc.stdout
    assert (out / "results.md").read_text().count("|") > 20
    scores = dict(__import__("numpy").load(out / "scores" / "noise.npz"))
    assert len(scores["score_energy"]) == sets["noise"]["n"]
    assert scores["index"].tolist() == list(range(sets["noise"]["n"]))  # no --max-samples: every image, in order
    assert (out / "plots" / "hist_energy.png").stat().st_size > 1000
    assert (out / "plots" / "roc_gradnorm.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_evaluate_max_samples_scores_a_fixed_random_sample(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    indices, scores = {}, {}
    for out in (trained / "sampled", trained / "sampled_again"):
        args = [str(trained / "runs" / "quickstart-001"), "--out", str(out), "--max-samples", "40", "--no-plots"]
        args += ["--suites", "ood", "adversarial", "--epsilons", "0.03", "--scorers", "energy", "msp"]
        proc = run_inprocess(evaluate_main, args, capsys)
        assert proc.returncode == 0, proc.stderr[-3000:]
        indices[out.name] = {f.stem: np.load(f, allow_pickle=False)["index"] for f in (out / "scores").glob("*.npz")}
        scores[out.name] = {
            f.stem: np.load(f, allow_pickle=False)["score_energy"] for f in (out / "scores").glob("*.npz")
        }
    for name, values in scores["sampled"].items():  # PGD's random start included
        np.testing.assert_array_equal(values, scores["sampled_again"][name], err_msg=name)
    first, again = indices["sampled"], indices["sampled_again"]
    assert first.keys() == again.keys() == {"id", "digits_heldout", "noise", "fgsm_eps7.65", "pgd_eps7.65"}
    for name, index in first.items():
        assert index.tolist() == again[name].tolist()
        assert len(index) == 40
        assert (np.diff(index) > 0).all()
    assert first["fgsm_eps7.65"].tolist() == first["id"].tolist()  # attacks perturb the sampled ID images
    assert first["id"].max() >= 40  # a random sample, not the first 40
    results = json.loads((trained / "sampled" / "results.json").read_text())
    assert results["id"]["n"] == 40


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_evaluate_refuses_to_overwrite(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = trained / "eval_taken"
    out.mkdir()
    (out / "results.json").write_text("{}")
    proc = run_inprocess(evaluate_main, [str(trained / "runs" / "quickstart-001"), "--out", str(out)], capsys)
    assert_one_line_error(proc, "already holds files")
    assert (out / "results.json").read_text() == "{}"


@pytest.mark.parametrize("option", ["--model.lrr", "--trainer.max_epoch"])  # a prefix of max_epochs is a typo too
def test_unknown_config_key(option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = train_inprocess(tmp_path, capsys, option, "1")
    assert_one_line_error(proc, option)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("model:\n  lr: [1, 2\n", "line 3, column 1: did not find expected ',' or ']'"),
        ("model:\n  lr: 0.1\ndata:\n  batch_size: 8\n seed: 3\n", "line 5, column 2: did not find expected key"),
    ],
)
def test_yaml_syntax_error_says_what_and_where(
    text: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    proc = train_inprocess(tmp_path, capsys, "--config", str(config))
    assert_one_line_error(proc, f"config file '{config}' is not valid YAML ({problem}); fix the file")
    proc = train_inprocess(tmp_path, capsys, "--data", "{id_dataset: [")  # a value on the command line: no file
    assert_one_line_error(proc, "a config is not valid YAML: did not find expected node content at line 2, column 1")


@pytest.mark.parametrize("name", ["a/b", "../escape", ".."])
def test_run_name_must_be_a_folder_name(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = train_inprocess(tmp_path, capsys, "--run.name", name)
    assert_one_line_error(proc, f"run name '{name}' must be a plain folder name")
    assert not list(tmp_path.rglob("*-001"))


def test_missing_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    proc = run_inprocess(train_main, ["--config", "configs/nope.yaml"], capsys)
    assert_one_line_error(proc, "configs/nope.yaml", "does not exist")


def test_config_files_are_read_as_train_py_reads_them(tmp_path: Path) -> None:
    # evaluate.py and the data check read train configs with this reader: 1e-3 is the number train.py takes
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  lr: 1e-3\n  min_lr: 1.0e-6\n  arch: small_cnn\n")
    assert read_config_file(config) == {"model": {"lr": 0.001, "min_lr": 1e-6, "arch": "small_cnn"}}
    config.write_text("model:\n  lr: \x07\n")
    with pytest.raises(UserError, match=r"is not valid YAML \(character 14: control characters are not allowed\)"):
        read_config_file(config)


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("folder", "is a folder, not a file"),
        ("empty.yaml", "is empty"),
        ("comments.yaml", "is empty"),
        ("binary.yaml", "cannot be read as text"),
        ("list.yaml", "is not a mapping of sections"),  # jsonargparse said "Unexpected config: - model"
    ],
)
def test_config_that_is_a_folder_or_empty(name: str, what: str, tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.yaml").write_text("\n")
    (tmp_path / "comments.yaml").write_text("# model:\n#   lr: 0.1\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    with pytest.raises(UserError, match=f"config file '.*{name}' {what}"):
        build_cli(["--config", str(tmp_path / name)])


def test_unknown_scorer_in_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = ["--trainer.callbacks+=gradreg.callbacks.OODEvalCallback", "--trainer.callbacks.scorers=[gradnrom]"]
    proc = train_inprocess(tmp_path, capsys, *callback)
    assert_one_line_error(proc, "gradnrom")


def test_missing_dataset_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = '{"name": "tinyimages300k"}'
    proc = train_inprocess(tmp_path, capsys, "--data.outliers", spec, "--data.data_root", str(tmp_path / "nowhere"))
    assert_one_line_error(proc, "tinyimages300k", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_unreadable_image_stops_with_one_line(
    workers: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # With loader workers, PyTorch re-raises the worker's error with its traceback as the message: one line still.
    pool = tmp_path / "pool" / "a"
    pool.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(pool / "good.png")
    for name in ("empty0.png", "empty1.png", "empty2.png"):
        (pool / name).write_bytes(b"")
    spec = f"{{name: imagefolder, path: {tmp_path / 'pool'}}}"
    args = ["--data.outliers", spec, "--data.outlier_batch_size", "4", "--data.num_workers", workers]
    proc = train_inprocess(tmp_path, capsys, *args)
    assert_one_line_error(proc, f"cannot read image '{pool}", "(an empty file); replace or delete the file")


def test_nan_loss_stops_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = train_inprocess(tmp_path, capsys, "--model.lr", "1e30", "--model.schedule", "constant")
    assert_one_line_error(proc, "non-finite training loss", "model.lr")
    assert not any((tmp_path / "runs").iterdir()), "a run that wrote nothing leaves no folder"


def test_nan_loss_after_a_checkpoint_names_the_folder_that_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    every_step = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1"]
    proc = train_inprocess(tmp_path, capsys, "--model.lr", "1e30", "--model.schedule", "constant", *every_step)
    (run,) = (tmp_path / "runs").iterdir()
    assert_one_line_error(proc, "non-finite training loss", "model.lr", f"; what the run wrote stays in {run}")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch=0-step=1.ckpt"]  # the step before the NaN


def test_greg_in_float16_stops_before_the_run_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The penalty's inner backward would underflow in float16 (16-mixed too on a GPU; on a CPU Lightning makes it bf16).
    proc = train_inprocess(tmp_path, capsys, "--trainer.precision", "16-true")
    assert_one_line_error(proc, "model.method=greg does not support trainer.precision=16-true", "bf16-mixed")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cuda_graph_with_ddp_stops_before_the_run_starts(tmp_path: Path) -> None:
    """Said once, before wandb or the other rank start, and the run leaves no folder behind."""
    proc = train(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.cuda_graph", "true")
    assert_one_line_error(proc, "model.cuda_graph=true does not support 2 processes")
    assert not any((tmp_path / "runs").iterdir()), "a run that wrote nothing leaves no folder"


@pytest.mark.parametrize("devices", ["2", "1"])
def test_sync_batchnorm_on_cpu_processes_stops_before_the_run_starts(devices: str, tmp_path: Path) -> None:
    args = ["--trainer.devices", devices, "--trainer.strategy", "ddp", "--trainer.sync_batchnorm", "true"]
    proc = train(tmp_path, *args)
    assert_one_line_error(proc, "trainer.sync_batchnorm=true needs GPUs")
    assert not any((tmp_path / "runs").iterdir()), "a run that wrote nothing leaves no folder"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--model.lr", "-0.1"], ["model.lr=-0.1 must be > 0"]),
        (["--data.batch_size", "0"], ["data.batch_size=0 must be >= 1"]),
        (["--data.seed", "-1"], ["data.seed=-1 must be >= 0"]),
        (["--data.candidates_per_epoch", "4"], ["data.candidates_per_epoch=4 is fewer than one outlier batch (data."]),
        (
            ["--data.outliers", "{name: imagefolder, path: {tmp}/nowhere}"],
            ["data.outliers: 'imagefolder' holds 2 images, fewer than one outlier batch", "outlier_batch_size=32"],
        ),
        (["--model.sampler", "{name: energy_cluster, num_clusters: -3}"], ["energy_cluster", "num_clusters=-3"]),
        (["--model.sampler", "{name:dos}"], ["unknown sampler '{name:dos}'", "a space after each ':'"]),
        (["--model.sampler", "{name: null}"], ["unknown sampler 'None'; known:"]),
        (["--model.m_in", "0", "--model.m_out", "-30"], ["model.m_in=0.0 must be <= model.m_out=-30.0"]),
        (["--model.method", "ce", "--model.sampler", "dos"], ["model.sampler='dos' selects outliers", "ce"]),
        (["--model.arch_kwargs", "{in_channels: 3, width: 8}"], ["1 input channel(s) but the model takes 3"]),
        # a traceback inside torch, a traceback at the sanity check, a run without dropout, "multiple values for ..."
        (["--model.arch_kwargs", "{in_channels: 1, width: -3}"], ["model.arch_kwargs.width=-3 must be >= 1"]),
        (["--model.arch_kwargs", "{in_channels: 1, width: 0}"], ["model.arch_kwargs.width=0 must be >= 1"]),
        (
            ["--model.arch", "wrn40_2", "--model.arch_kwargs", "{in_channels: 1, dropout: -0.5}"],
            ["model.arch_kwargs.dropout=-0.5 must be >= 0.0"],
        ),
        (
            ["--model.arch_kwargs", "{in_channels: 1, num_classes: 3}"],
            ["model.arch_kwargs.num_classes", "model.num_classes; move it there"],
        ),
        (["--run.resume", "{tmp}/nowhere"], ["run.resume checkpoint '{tmp}/nowhere/last.ckpt' does not exist"]),
        (
            ["--model.pretrained", "{tmp}/no.ckpt"],
            ["model.pretrained '{tmp}/no.ckpt' does not exist", "pass an existing"],
        ),
        (["--model.pretrained", "{tmp}/nowhere"], ["model.pretrained '{tmp}/nowhere' is a folder, not a file"]),
        (["--trainer.logger.init_args.project", "x"], ['"trainer.logger" holds a list', "WANDB_PROJECT"]),
        (["--trainer.precision", "15"], ["trainer.precision='15' is not one of 64, 32, 16,", "bf16-mixed"]),
        (["--trainer.enable_checkpointing", "false"], ["trainer.enable_checkpointing=false: train.py always writes"]),
        (  # LightningCLI trains the model's own SGD and schedule then, without a word
            ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1"],
            ["--lr_scheduler needs an --optimizer (LightningCLI ignores it without one)", "model.schedule"],
        ),
        (
            ["--model.pretrained", "IMAGENET1K_V2"],
            ["model.pretrained='IMAGENET1K_V2'", "'small_cnn' has no torchvision"],
        ),
    ],
)
def test_bad_values_stop_before_training(
    args: list[str], fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a/1.png", "a/2.png"):  # a folder without last.ckpt, an image folder of two images
        (tmp_path / "nowhere" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "nowhere" / name)
    proc = train_inprocess(tmp_path, capsys, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert_one_line_error(proc, *(f.replace("{tmp}", str(tmp_path)) for f in fragments))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("given", ["folder", "last.ckpt"])
def test_resume_of_a_run_folder_without_last_ckpt_suggests_its_best_ckpt(
    given: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "old-001"
    run_dir.mkdir()
    (run_dir / "best.ckpt").write_bytes(b"")  # last.ckpt deleted, e.g. to save space
    resume = run_dir if given == "folder" else run_dir / "last.ckpt"
    proc = train_inprocess(tmp_path, capsys, "--run.resume", str(resume))
    assert_one_line_error(
        proc,
        f"'{run_dir / 'last.ckpt'}' does not exist",
        f"its folder holds best.ckpt: pass --run.resume {run_dir}/best",
    )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("model.method", "gerg", "model.method='gerg' is not one of ce, oe, energy, greg, absent; did you mean greg?"),
        ("model.method", "GREG", "; did you mean greg?"),
        ("model.method", "null", "model.method=None is not one of ce, oe, energy, greg, absent"),
        ("model.schedule", "cosin", "model.schedule='cosin' is not one of multistep, cosine, constant; did you mean"),
        ("model.reg_scaling", "papr", "model.reg_scaling='papr' is not one of code, paper; did you mean paper?"),
        ("data.augment", "flip", "data.augment='flip' is not one of none, crop, crop_flip, imagenet; did you mean"),
        ("run.mode", "maxx", "run.mode='maxx' is not one of max, min, null; did you mean max?"),
        ("trainer.precision", "bf16mixed", "16-true, 16-mixed, bf16-true, bf16-mixed, 32-true, 64-true, bf16, null;"),
    ],
)
def test_a_value_outside_a_settings_choices_names_them(
    key: str, value: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the command line and in a config file: the value, the choices and the one it may have meant."""
    assert_one_line_error(train_inprocess(tmp_path, capsys, f"--{key}", value), expected)
    section, leaf = key.split(".")
    (tmp_path / "bad.yaml").write_text(f"{section}:\n  {leaf}: {value}\n")
    assert_one_line_error(train_inprocess(tmp_path, capsys, "--config", str(tmp_path / "bad.yaml")), expected)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_pretrained_run_folder_without_a_slash_is_named_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # was taken for a torchvision weights name: "'small_cnn' has no torchvision weights to name"
    monkeypatch.chdir(tmp_path)
    Path("quickstart-001").mkdir()
    Path("quickstart-001", "best.ckpt").write_bytes(b"")
    proc = train_inprocess(tmp_path, capsys, "--model.pretrained", "quickstart-001")
    assert_one_line_error(
        proc, "model.pretrained 'quickstart-001' is a folder, not a file", "(e.g. quickstart-001/best.ckpt)"
    )


def test_train_py_without_a_config_or_a_length_stops_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It trained the built-in defaults for Lightning's 1000 epochs, with no word of a missing --config.
    args = ["--run.root", str(tmp_path / "runs"), "--trainer.logger", "false"]
    proc = run_inprocess(train_main, args, capsys)
    assert_one_line_error(proc, "train.py got no --config and no trainer.max_epochs", "--config configs/quickstart")
    assert not (tmp_path / "runs").exists()
    proc = run_inprocess(train_main, [*args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_pretrained_weights_that_are_not_finite_stop_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # was "non-finite training loss ... lower the learning rate" at step 0, and evaluate.py gave NaN metrics, exit 0
    module = GradRegModule(arch_kwargs={"in_channels": 1, "width": 32}, num_classes=6)
    state = {f"model.{k}": v.clone() for k, v in module.model.state_dict().items()}
    state["model.fc.weight"][0, 0] = float("nan")
    weights = tmp_path / "diverged.ckpt"
    torch.save({"state_dict": state}, weights)
    proc = train_inprocess(tmp_path, capsys, "--model.pretrained", str(weights))
    assert_one_line_error(proc, f"{weights}: holds non-finite weights (fc.weight): its run diverged")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("args", "yaml_text", "hint"),
    [
        (["--model.reg_wieght", "1"], "model:\n  reg_wieght: 1\n", "did you mean model.reg_weight?"),
        (["--data_root", "x"], "data_root: x\n", "did you mean data.data_root?"),
        (["--trainer.max_epoch", "1"], "trainer:\n  max_epoch: 1\n", "did you mean trainer.max_epochs?"),
        (["--data.batch_sise", "4"], "data:\n  init_args:\n    batch_sise: 4\n", "did you mean data.batch_size?"),
        (["--run.zzz", "1"], "run:\n  zzz: 1\n", "run takes root, name, monitor, mode, resume"),
    ],
)
def test_mistyped_keys_name_the_key_meant(
    args: list[str], yaml_text: str, hint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the command line and in a config file: the typo, then the valid key(s) it may have meant."""
    assert_one_line_error(train_inprocess(tmp_path, capsys, *args), args[0].removeprefix("--"), hint)
    (tmp_path / "typo.yaml").write_text(yaml_text)
    assert_one_line_error(train_inprocess(tmp_path, capsys, "--config", str(tmp_path / "typo.yaml")), hint)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_run_root_that_is_a_file_and_a_callback_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    proc = run_inprocess(
        train_main,
        ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--run.root", str(tmp_path / "file")],
        capsys,
    )
    assert_one_line_error(proc, str(tmp_path / "file"), "a file is in the way")
    config = callback_config(tmp_path / "typo.yaml", "every_n_epoch: 1")
    proc = train_inprocess(tmp_path, capsys, "--config", str(config))
    assert_one_line_error(proc, "OODEvalCallback", "Option 'every_n_epoch' is not accepted")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = train_inprocess(tmp_path, capsys, "--trainer.accelerator", "gpu")
    assert_one_line_error(proc, "trainer.accelerator=gpu, but PyTorch finds no GPU here", "auto or cpu")
    assert not any((tmp_path / "runs").iterdir())


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="needs a machine without torch_xla")
def test_tpu_accelerator_without_torch_xla(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = train_inprocess(tmp_path, capsys, "--trainer.accelerator", "tpu")
    assert_one_line_error(proc, "the settings need a package that is not installed: Requirement 'torch_xla")
    assert not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bad_checkpoints(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = trained / "runs" / "quickstart-001" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_one_line_error(run_inprocess(evaluate_main, [str(truncated)], capsys), "truncated")

    assert_one_line_error(run_inprocess(evaluate_main, [str(tmp_path / "no.ckpt")], capsys), "does not exist")

    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["num_classes"] = 10
    mismatched = tmp_path / "mismatched.ckpt"
    torch.save(ckpt, mismatched)
    assert_one_line_error(run_inprocess(evaluate_main, [str(mismatched)], capsys), "6 outputs", "10")

    proc = run_inprocess(evaluate_main, [str(good), "--scorers", "gradnrom"], capsys)
    assert_one_line_error(proc, "gradnrom", "gradnorm")

    # Bad scorer settings stop before any output folder is made.
    before = sorted(good.parent.iterdir())
    proc = run_inprocess(evaluate_main, [str(good), "--scorers", "odin:temperature=abc"], capsys)
    assert_one_line_error(proc, "scorer 'odin'", "temperature='abc' is not a number")
    proc = run_inprocess(evaluate_main, [str(good), "--scorers", "odin", "odin:temperature=10"], capsys)
    assert_one_line_error(proc, "two scorers are named 'odin'", "alias")
    proc = run_inprocess(evaluate_main, [str(good), "--scorers", "msp:alias=../../escaped"], capsys)  # names files
    assert_one_line_error(proc, "scorer's alias must be a letter or digit followed by", "'../../escaped'")
    proc = run_inprocess(evaluate_main, [str(good), "--scorers", ":temperature=1"], capsys)
    assert_one_line_error(proc, "scorer's name must be")
    assert sorted(good.parent.iterdir()) == before


def test_scorer_settings_on_the_command_line_read_exponents_as_numbers_and_none_as_null() -> None:
    # PyYAML (YAML 1.1) alone reads 1e3, 1e-3 and None as strings.
    assert parse_scorer("odin:temperature=1e3,epsilon=1e-3") == {"name": "odin", "temperature": 1e3, "epsilon": 1e-3}
    for null in ("None", "null", "~"):
        assert parse_scorer(f"margin:block_size={null}") == {"name": "margin", "block_size": None}
    assert parse_scorer("margin:subspace=low,block_size=4") == {"name": "margin", "subspace": "low", "block_size": 4}
    assert parse_scorer("energy") == "energy"


def test_bad_scorer_setting_in_config_stops_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = callback_config(tmp_path / "bad_scorer.yaml", "scorers: [msp, {name: odin, temperature: 0}]")
    proc = train_inprocess(tmp_path, capsys, "--config", str(config))
    assert_one_line_error(proc, "scorer 'odin'", "temperature=0 must be > 0")
    config.write_text(config.read_text().replace("{name: odin, temperature: 0}", "msp"))
    proc = train_inprocess(tmp_path, capsys, "--config", str(config))
    assert_one_line_error(proc, "two scorers are named 'msp'", "alias")
    assert not list(tmp_path.glob("runs/*/*.ckpt"))


@pytest.mark.parametrize(
    ("scorers", "fix"),
    [
        ("[msp, odin: {temperature: 1000}]", "write {name: odin, temperature: 1000}"),  # YAML: [msp, {odin: {...}}]
        ("[{odin: null}]", "write {name: odin}"),
        ("[{temperature: 1000}]", "write e.g. {name: odin, temperature: 1000}"),
    ],
)
def test_scorer_mapping_without_a_name_says_how_to_write_it(
    scorers: str, fix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # was "a scorer's name must be a letter or digit followed by ..., got None in {...}"
    config = callback_config(tmp_path / "scorers.yaml", f"scorers: {scorers}")
    assert_one_line_error(train_inprocess(tmp_path, capsys, "--config", str(config)), "has no name key; " + fix)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_evaluate_explain_writes_grids_and_json(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = trained / "explained"
    args = [
        str(trained / "runs" / "quickstart-001"), "--out", str(out), "--suites", "ood", "--scorers", "energy", "msp",
        "--explain", "1", "--explain-set", "noise", "--explain-train", "32", "--explain-hessian", "64", "--no-plots",
    ]  # fmt: skip
    proc = run_inprocess(evaluate_main, args, capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "explaining the 1 highest-scored noise images and the 1 lowest-scored ID images" in proc.stdout
    doc = json.loads((out / "explain" / "influence.json").read_text())
    assert [t["is_id"] for t in doc["tests"]] == [False, True]
    outliers = doc["tests"][0]["outlier"]  # of the noise image: the outliers were trained to lower OOD scores
    assert len(outliers["helpful"]) > 0  # (no outlier raises this image's score: the harmful list may be empty)
    assert all(e["influence"] < 0 for e in outliers["helpful"])
    assert all(e["influence"] > 0 for e in outliers["harmful"])
    assert max(doc["settings"]["relative_residual"]) < 1e-3
    assert (out / "explain" / "00.png").stat().st_size > 1000
    assert (out / "explain" / "01.png").stat().st_size > 1000


def test_bad_monitor_stops_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = train_inprocess(tmp_path, capsys, "--run.monitor", "val/accuracy")
    assert_one_line_error(proc, "run.monitor 'val/accuracy'", "val/acc", "SET in digits_heldout, noise, mean")
    proc = train_inprocess(tmp_path, capsys, "--run.monitor", "ood/noise/energy/auroc", "--trainer.callbacks", "[]")
    assert_one_line_error(proc, "run.monitor 'ood/noise/energy/auroc'", "OODEvalCallback")
    # One with the settings of train.py's own (e.g. in a config.yaml of an older version) collides with it.
    twin = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "val/acc"]
    proc = train_inprocess(tmp_path, capsys, *twin, "--trainer.callbacks.mode", "max")
    assert_one_line_error(proc, "holds a ModelCheckpoint with the monitor, mode and every_n_epochs of train.py's own")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_ood_monitor_with_the_default_sets(tmp_path: Path) -> None:
    # data.ood_sets unset: the datamodule's default sets are evaluated, so their keys may be monitored.
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--run.root", str(tmp_path), "--trainer.logger"]
    cli = build_cli([*args, "false", "--data.ood_sets", "null", "--run.monitor", "ood/noise/msp/fpr95"])
    assert cli.trainer.checkpoint_callback.monitor == "ood/noise/msp/fpr95"
    assert cli.trainer.checkpoint_callback.mode == "min"


def test_negative_numbers_in_exponent_notation_are_values(tmp_path: Path) -> None:
    # argparse took -2.5e1 for an option: "argument --model.m_in: expected one argument"
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--run.root", str(tmp_path), "--trainer.logger"]
    cli = build_cli([*args, "false", "--model.m_in", "-2.5e1", "--model.m_out", "-7E0"])
    assert (cli.model.hparams.m_in, cli.model.hparams.m_out) == (-25.0, -7.0)


@pytest.mark.parametrize(("value", "limit"), [("1", 1), ("1.0", 1.0), ("0.5", 0.5), ("3", 3)])
def test_batch_limit_1_is_one_batch(value: str, limit: float, tmp_path: Path) -> None:
    # The Trainer reads an int as a number of batches and a float as a fraction: 1 is one batch, 1.0 the whole epoch.
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--run.root", str(tmp_path), "--trainer.logger"]
    cli = build_cli([*args, "false", "--trainer.limit_train_batches", value, "--trainer.limit_val_batches", value])
    for got in (cli.trainer.limit_train_batches, cli.trainer.limit_val_batches):
        assert (got, type(got)) == (limit, type(limit))
    saved = yaml.safe_load((tmp_path / "quickstart-001" / "config.yaml").read_text())["trainer"]  # --config on it
    assert (saved["limit_train_batches"], type(saved["limit_train_batches"])) == (limit, type(limit))


def test_train_monitor_without_validation_and_an_extra_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--trainer.callbacks+=ModelCheckpoint"]  # without a dirpath: in the run's checkpoints/, with its last
    extra += ["--trainer.callbacks.filename", "{epoch}", "--trainer.callbacks.save_top_k", "-1"]
    extra += ["--trainer.callbacks.save_last", "true"]
    no_val = ["--trainer.limit_val_batches", "0", "--run.monitor", "train/loss_epoch"]
    proc = train_inprocess(tmp_path, capsys, *no_val, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quickstart-001"
    assert sorted(p.name for p in run_dir.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]
    best = torch.load(tmp_path / "runs" / "quickstart-001" / "best.ckpt", map_location="cpu", weights_only=True)
    (key,) = [k for k in best["callbacks"] if "train/loss_epoch" in k]
    assert "'mode': 'min'" in key


def test_last_checkpoint_follows_epochs_without_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = train_inprocess(tmp_path, capsys, "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = torch.load(tmp_path / "runs" / "quickstart-001" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 9)  # epoch 2 has no validation


def test_max_steps_within_the_first_epoch_writes_last_ckpt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Training stops before the epoch's validation: val/acc has no value yet, which is no mistake.
    proc = train_inprocess(tmp_path, capsys, "--trainer.max_steps", "2")  # 3 batches an epoch
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no best.ckpt: training ended before run.monitor 'val/acc' was first logged" in proc.stdout
    run_dir = tmp_path / "runs" / "quickstart-001"
    assert sorted(p.name for p in run_dir.glob("*.ckpt")) == ["last.ckpt"]
    assert torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    # Without validation val/acc never comes: still one line, at the same checkpoint.
    proc = train_inprocess(tmp_path, capsys, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    assert_one_line_error(proc, "run.monitor 'val/acc' is not logged")


@pytest.mark.parametrize("limit", [["--trainer.max_steps", "0"], ["--trainer.limit_train_batches", "0"], "resume"])
def test_a_run_that_trains_no_step_is_an_error(
    limit: list[str] | str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Lightning returns without training, and evaluate.py would find no checkpoint in the folder.
    if limit == "resume":  # a finished run resumed with the same max_epochs
        assert train_inprocess(tmp_path, capsys).returncode == 0
        limit = ["--run.resume", str(tmp_path / "runs" / "latest")]
    proc = train_inprocess(tmp_path, capsys, *limit)
    assert_one_line_error(proc, "this run trained no step", "no checkpoint written: raise the limit")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == (
        ["latest", "quickstart-001"] if "--run.resume" in limit else []
    )


@pytest.mark.slow
def test_a_run_that_trains_no_step_with_wandb_says_where_its_wandb_run_stays(tmp_path: Path) -> None:
    proc = train(tmp_path, "--trainer.max_steps", "0")  # wandb offline: its run is named as the process exits
    run_dir = tmp_path / "runs" / "quickstart-001"
    assert_one_line_error(proc, "this run trained no step", f"no checkpoint written (its wandb run stays in {run_dir})")
    assert (run_dir / "wandb").is_dir()
    assert not list(run_dir.glob("*.ckpt"))


def test_resume_through_latest_records_the_checkpoint_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # runs/latest moves to the resumed run: its config.yaml must name the first run's checkpoint, not the link.
    assert train_inprocess(tmp_path, capsys).returncode == 0
    resume = ["--run.resume", str(tmp_path / "runs" / "latest"), "--trainer.max_epochs", "3"]
    assert train_inprocess(tmp_path, capsys, *resume).returncode == 0
    config = yaml.safe_load((tmp_path / "runs" / "quickstart-002" / "config.yaml").read_text())
    assert config["run"]["resume"] == str(tmp_path / "runs" / "quickstart-001" / "last.ckpt")


def test_resumed_config_resumes_again_after_the_project_moved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative run.resume stays relative in config.yaml (only runs/latest is replaced by its target), as data_root
    # and run.root do: the project copied or moved elsewhere resumes from its own checkpoint (it named the old path).
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    config = str(ROOT / "configs" / "quickstart.yaml")
    args = ["--config", config, "--run.root", "runs", *FAST, "--trainer.logger", "false"]
    assert run_inprocess(train_main, args, capsys).returncode == 0
    resumed = run_inprocess(train_main, [*args, "--run.resume", "runs/latest", "--trainer.max_epochs", "3"], capsys)
    assert resumed.returncode == 0, resumed.err[-2000:]
    saved = yaml.safe_load(Path("runs/quickstart-002/config.yaml").read_text())
    assert saved["run"]["resume"] == "runs/quickstart-001/last.ckpt"
    (tmp_path / "project").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    again = ["--config", "runs/quickstart-002/config.yaml", "--trainer.max_epochs", "4"]
    proc = run_inprocess(train_main, again, capsys)
    assert proc.returncode == 0, proc.err[-2000:]
    third = yaml.safe_load(Path("runs/quickstart-003/config.yaml").read_text())
    assert third["run"]["resume"] == "runs/quickstart-001/last.ckpt"
    assert torch.load("runs/quickstart-003/last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 3


def test_a_run_with_the_clis_own_optimizer_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --optimizer replaces configure_optimizers: no cosine schedule of ours to compare with the checkpoint's
    adam = ["--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.001"]
    assert train_inprocess(tmp_path, capsys, *adam).returncode == 0
    longer = ["--run.resume", str(tmp_path / "runs" / "latest"), "--trainer.max_epochs", "3"]
    # Lightning restores the optimizer's state: a new --optimizer.lr was silently ignored, another optimizer (here
    # the model's own SGD, or SGD through the CLI) failed in the restore with KeyError: 'momentum'.
    last = tmp_path / "runs" / "quickstart-001" / "last.ckpt"
    written = last.read_bytes()
    own = "the model's own SGD (model.lr, momentum, ...) here, --optimizer torch.optim.Adam in the checkpoint's run"
    step = ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1"]
    for change, what in [
        ([*adam, "--optimizer.lr", "0.5"], "(--optimizer.lr 0.5 here, 0.001 in the checkpoint's run)"),
        ([], f"({own})"),
        (["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.001"], "(--optimizer torch.optim.SGD here, "),
        ([*adam, *step], "(--optimizer torch.optim.Adam --lr_scheduler torch.optim.lr_scheduler.StepLR here, "),
    ]:
        proc = train_inprocess(tmp_path, capsys, *change, *longer)
        assert_one_line_error(proc, "the optimizer differs from the resumed checkpoint's run " + what)
        assert last.read_bytes() == written
    proc = train_inprocess(tmp_path, capsys, *adam, *longer)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.schedule=cosine" not in proc.stderr


def test_an_optimizer_record_differs_only_in_settings_of_the_optimization() -> None:
    adam = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001, "foreach": None, "fused": None}}
    record = {"optimizer": adam, "lr_scheduler": None}
    # a torch without decoupled_weight_decay wrote the checkpoint; a kernel choice changed: the same optimization
    newer = {**adam, "init_args": {**adam["init_args"], "decoupled_weight_decay": False, "foreach": True}}
    assert _optimizer_change({"optimizer": newer, "lr_scheduler": None}, record) == ""
    assert _optimizer_change(None, None) == ""
    faster = {**adam, "init_args": {**adam["init_args"], "lr": 0.01}}
    change = _optimizer_change({"optimizer": faster, "lr_scheduler": None}, record)
    assert change == "--optimizer.lr 0.01 here, 0.001 in the checkpoint's run"


def test_a_resume_with_other_optimizer_settings_stops_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Lightning restores the optimizer's and the scheduler's states: a new lr or milestones were silently ignored
    # (while config.yaml recorded them), a new schedule type failed with KeyError: 'lr_lambdas'.
    assert train_inprocess(tmp_path, capsys, "--model.schedule", "multistep").returncode == 0
    last = tmp_path / "runs" / "quickstart-001" / "last.ckpt"
    written = last.read_bytes()
    resume = ["--run.resume", str(tmp_path / "runs" / "latest"), "--trainer.max_epochs", "3"]
    for change, old in [
        (["--model.schedule", "multistep", "--model.milestones", "[1]"], "(None)"),
        (["--model.schedule", "multistep", "--model.lr", "0.01"], "(0.05)"),
        (["--model.schedule", "cosine"], "('multistep')"),
    ]:
        proc = train_inprocess(tmp_path, capsys, *resume, *change)
        assert_one_line_error(proc, f"model.{change[-2][8:]}=", f"differs from the resumed checkpoint's run {old}")
        assert last.read_bytes() == written
    # With wandb (the default logger) the refused run left a folder with config.yaml and wandb/ behind.
    config = str(ROOT / "configs" / "quickstart.yaml")
    args = ["--config", config, "--run.root", str(tmp_path / "runs"), *FAST, *resume, "--model.lr", "0.01"]
    assert_one_line_error(run_inprocess(train_main, args, capsys), "model.lr=0.01 differs")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest", "quickstart-001"]
    proc = train_inprocess(tmp_path, capsys, *resume, "--model.schedule", "multistep")  # only a longer run
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_fast_dev_run_is_a_smoke_test_not_a_failed_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Lightning writes no checkpoint then: train.py said "this run trained no step ..." and exited 1.
    proc = train_inprocess(tmp_path, capsys, "--trainer.fast_dev_run", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fast_dev_run: trained 1 step(s) and validated; Lightning writes no checkpoint" in proc.stdout
    assert not any((tmp_path / "runs").iterdir())  # the run folder held only its config


@pytest.mark.parametrize("validation", [True, False])
def test_unknown_train_monitor_fails_in_one_line_at_the_first_checkpoint(
    validation: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # train/* keys depend on the method, so a typo is found at the first checkpoint. Without validation Lightning
    # itself only warns (and never writes best.ckpt).
    csv = ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    no_val = [] if validation else ["--trainer.limit_val_batches", "0"]
    proc = train_inprocess(tmp_path, capsys, "--run.monitor", "train/lss", "--trainer.max_epochs", "1", *csv, *no_val)
    assert_one_line_error(proc, "run.monitor 'train/lss' is not logged", "without saving it", "train/reg")
    # Nothing to resume or evaluate: no folder is left, also where validation had written the epoch's metrics.csv.
    assert not (tmp_path / "runs" / "quickstart-001").exists()


def test_unknown_train_monitor_keeps_a_folder_that_holds_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshots = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1"]
    proc = train_inprocess(tmp_path, capsys, "--run.monitor", "train/lss", "--trainer.max_epochs", "1", *snapshots)
    assert_one_line_error(proc, "run.monitor 'train/lss' is not logged")
    assert list((tmp_path / "runs" / "quickstart-001" / "checkpoints").glob("*.ckpt"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_monitor_ood_metric_resume_and_rerun_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An ood/* metric logged every other epoch selects best.ckpt on those epochs only; last.ckpt follows every epoch.
    csv_logger = [
        "--trainer.logger",
        '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}}',
    ]
    monitor = ["--run.monitor", "ood/mean/energy/auroc", "--trainer.callbacks.every_n_epochs", "2"]
    proc = train_inprocess(tmp_path, capsys, "--trainer.max_epochs", "3", *monitor, *csv_logger)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = tmp_path / "runs" / "quickstart-001"
    best = torch.load(first / "best.ckpt", map_location="cpu", weights_only=True)
    rows = list(csv.DictReader((first / "metrics.csv").read_text().splitlines()))
    logged = [(int(r["epoch"]), float(r["ood/mean/energy/auroc"])) for r in rows if r["ood/mean/energy/auroc"]]
    assert [epoch for epoch, _ in logged] == [1]
    assert best["epoch"] == 1
    last = torch.load(first / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 9)  # the end of the last epoch, not of best.ckpt's
    (state,) = [s for key, s in best["callbacks"].items() if "ood/mean/energy/auroc" in key]
    assert float(state["best_model_score"]) == pytest.approx(logged[0][1])

    # Resuming continues with both checkpoint callbacks' states.
    resume = ["--run.resume", str(first), "--trainer.max_epochs", "4", *monitor]  # a run directory: its last.ckpt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proc = train_inprocess(tmp_path, capsys, *resume)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]  # a new run directory is no news
    resumed = torch.load(tmp_path / "runs" / "quickstart-002" / "best.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 3
    last = torch.load(tmp_path / "runs" / "quickstart-002" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (3, 12)

    proc = train_inprocess(tmp_path, capsys, "--run.resume", str(first), "--trainer.max_epochs", "1")
    assert_one_line_error(proc, "current_epoch=2", "max_epochs=1")
    proc = train_inprocess(tmp_path, capsys, "--run.resume", str(first), "--model.method", "absent")
    assert_one_line_error(proc, "does not fit this model", "model.absent_fc.weight is missing")
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint")
    assert_one_line_error(train_inprocess(tmp_path, capsys, "--run.resume", str(text)), "text.ckpt")

    # A run's config.yaml starts a new run of the same name and leaves the old one alone.
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    args = ["--config", str(first / "config.yaml"), "--trainer.max_epochs", "1", "--run.resume", "null"]
    proc = run_inprocess(train_main, [*args, "--run.monitor", "val/loss"], capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "quickstart-003" / "last.ckpt").is_file()
    best = torch.load(tmp_path / "runs" / "quickstart-003" / "best.ckpt", map_location="cpu", weights_only=True)
    assert [s.get("best_model_score") is not None for s in best["callbacks"].values()] == [True, False]  # best, last
    assert "'mode': 'min'" in next(iter(best["callbacks"]))  # lower is better for a loss
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before


def test_wandb_project_comes_from_wandb_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "my-ood-runs")
    (wandb, _) = default_loggers()
    assert (wandb["class_path"], wandb["init_args"]["project"]) == (
        "lightning.pytorch.loggers.WandbLogger",
        "my-ood-runs",
    )
    monkeypatch.delenv("WANDB_PROJECT")
    assert default_loggers()[0]["init_args"]["project"] == "gradreg"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")
def test_git_revision_names_the_commit_and_uncommitted_changes(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull}  # fmt: skip

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (repo / "code.py").write_text("a = 1\n")
    (repo / "sub").mkdir()
    git("add", "code.py")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "HEAD").strip()
    assert git_revision.__wrapped__(repo) == commit
    (repo / "notes.txt").write_text("untracked files are not code changes")
    assert git_revision.__wrapped__(repo) == commit
    (repo / "code.py").write_text("a = 2\n")
    assert git_revision.__wrapped__(repo) == commit + "-dirty"
    # A package installed inside another repository (a venv in a project folder) is not that repository's code.
    assert git_revision.__wrapped__(repo / "sub") is None
    assert git_revision.__wrapped__(tmp_path) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")
def test_git_revision_of_a_broken_checkout_is_none(tmp_path: Path) -> None:
    # A .git that git refuses (a worktree whose repository was deleted) records no commit rather than crashing.
    (tmp_path / ".git").write_text(f"gitdir: {tmp_path / 'deleted'}\n")
    assert git_revision.__wrapped__(tmp_path) is None


def test_environment_names_the_checkout_the_versions_and_the_device(tmp_path: Path) -> None:
    env = environment(torch.device("cpu"))
    assert env["git"] == git_revision(ROOT)  # the checkout holding this gradreg (None in an installed copy)
    assert set(env["packages"]) == set(PACKAGES)  # a package that is not installed is there, as None
    assert env["packages"]["torch"] == torch.__version__
    assert env["device"].startswith("cpu: ")
    assert environment(torch.device("mps"))["device"].startswith("mps: ")  # only CUDA devices are asked for a name
    torch.save({"environment": env}, tmp_path / "env.ckpt")  # as in every checkpoint: weights_only loading reads it
    assert torch.load(tmp_path / "env.ckpt", weights_only=True)["environment"] == env


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_readme_training_in_your_own_code_runs_and_evaluates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's plain-Trainer example, as written, then evaluate.py on the checkpoint it says to take."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Training in your own code") :]
    code = section[
        section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python"))
    ]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # our own README's example, nothing a data file holds
    (ckpt,) = tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    capsys.readouterr()
    args = [str(ckpt), "--suites", "ood", "--scorers", "energy", "--max-samples", "32", "--no-plots", "--wandb", "off"]
    proc = run_inprocess(evaluate_main, args, capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((ckpt.parent / "eval-001" / "results.json").read_text())
    assert doc["id"]["accuracy"] > 1 / 6  # two epochs of GReg+ on the six digit classes beat chance


@pytest.mark.timeout(120)
def test_ctrl_c_says_where_the_run_is_and_how_to_resume_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(ROOT / "configs" / "quickstart.yaml")
    args = ["--config", config, "--run.root", str(tmp_path / "runs"), *FAST, "--trainer.max_epochs", "1000"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, "--trainer.logger", "false"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "runs" / "quickstart-001"
    deadline = time.monotonic() + 90
    while not (run_dir / "last.ckpt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # training has started: Ctrl-C
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1, stderr[-3000:]
    resume = f"python train.py --config {run_dir / 'config.yaml'} --run.resume "
    assert f"its files stay in {run_dir} " in lines[0]
    assert resume in lines[0]
    assert (run_dir / "last.ckpt").is_file()
    assert (tmp_path / "runs" / "latest").resolve() == run_dir.resolve()
    # the command it gives resumes the run (a few epochs more)
    checkpoint = lines[0].split(" --run.resume ")[1]
    epoch = torch.load(Path(checkpoint, "last.ckpt") if Path(checkpoint).is_dir() else checkpoint)["epoch"]
    extra = ["--trainer.max_epochs", str(epoch + 2), "--trainer.logger", "false"]
    done = run_inprocess(
        train_main, ["--config", str(run_dir / "config.yaml"), "--run.resume", checkpoint, *extra], capsys
    )
    assert done.returncode == 0, done.err[-3000:]
    assert (tmp_path / "runs" / "quickstart-002" / "last.ckpt").is_file()


def test_ctrl_c_before_the_first_checkpoint_and_after_best_ckpt(tmp_path: Path) -> None:
    from gradreg.training import _interrupted

    run_dir = tmp_path / "runs" / "quickstart-001"
    cli = SimpleNamespace(run_dir=run_dir, rank_zero=True)
    assert "nothing was kept" in str(_interrupted(cli))  # its folder held only its config: removed
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}")
    (run_dir / "metrics.csv").write_text("epoch\n")
    err = _interrupted(cli)
    assert f"nothing to resume; its logs stay in {run_dir}" in str(err)
    assert err.exit_code == 130
    (run_dir / "last.ckpt").write_bytes(b"epoch 1")
    time.sleep(0.01)
    (run_dir / "best.ckpt").write_bytes(b"epoch 2")  # validation's best.ckpt comes just before last.ckpt
    assert str(_interrupted(cli)).endswith(f"--run.resume {run_dir / 'best.ckpt'}")
    (run_dir / "last.ckpt").write_bytes(b"epoch 2")
    assert str(_interrupted(cli)).endswith(f"--run.resume {run_dir}")


@pytest.mark.parametrize("raised", [KeyboardInterrupt(), Interrupted("training stopped; ...")])
def test_ctrl_c_is_one_line_and_exit_code_130(raised: BaseException, capsys: pytest.CaptureFixture[str]) -> None:
    def main() -> int:
        raise raised

    with pytest.raises(SystemExit) as exit_info:
        run_user_errors(main)()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().startswith("interrupted: ")


def test_ctrl_c_during_evaluation_says_what_its_folder_keeps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradreg.report

    assert train_inprocess(tmp_path, capsys).returncode == 0
    run_dir = tmp_path / "runs" / "quickstart-001"
    scored = []

    def interrupted_at(n: int):
        def set_metrics(*args: object):
            if len(scored) == n:
                raise KeyboardInterrupt
            scored.append(real(*args))
            return scored[-1]

        return set_metrics

    real = gradreg.report.set_metrics
    monkeypatch.setattr(gradreg.report, "set_metrics", interrupted_at(0))  # during the first OOD set
    proc = run_inprocess(evaluate_main, [str(run_dir), "--scorers", "msp", "energy", "--suites", "ood"], capsys)
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines()[-1] == (
        "interrupted: evaluation stopped before its first result; nothing was kept"
    )
    assert not (run_dir / "eval-001").exists()  # its own new folder held nothing but the ID set's raw scores
    monkeypatch.setattr(gradreg.report, "set_metrics", interrupted_at(1))  # during the second
    proc = run_inprocess(evaluate_main, [str(run_dir), "--scorers", "msp", "energy", "--suites", "ood"], capsys)
    assert proc.returncode == 130
    assert "Traceback" not in proc.stderr
    out = run_dir / "eval-001"
    assert f"interrupted: evaluation stopped; {out} keeps the sets finished so far" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["sets"]) == ["digits_heldout"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no partial files left


def test_a_new_run_is_numbered_after_the_highest_run_even_when_earlier_ones_were_deleted(tmp_path: Path) -> None:
    # runs/quickstart-001 and -002 deleted, -003 kept: the next run is -004 (numbers follow the order of the runs)
    (tmp_path / "quickstart-003").mkdir()
    (tmp_path / "quickstart-notes").mkdir()  # not a run number
    assert next_run_dir(tmp_path, "quickstart", option="run.root") == tmp_path / "quickstart-004"
    assert next_run_dir(tmp_path, "quickstart", option="run.root") == tmp_path / "quickstart-005"
    assert (tmp_path / "quickstart-004").is_dir()
    assert not (tmp_path / "quickstart-001").exists()


def test_wandb_goes_offline_only_without_an_api_key_or_a_netrc_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789" * 4)
    configure_wandb_env()
    assert "WANDB_MODE" not in os.environ  # a key: the user's wandb setup decides
    monkeypatch.setenv("WANDB_API_KEY", "")
    configure_wandb_env()
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text(f"machine api.wandb.ai\n  login user\n  password {'0123456789' * 4}\n")
    netrc_file.chmod(0o600)
    configure_wandb_env()
    assert "WANDB_MODE" not in os.environ  # a `wandb login`


def test_a_chain_of_resumed_runs_stays_in_the_group_of_its_first_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # quickstart-003 resumes quickstart-002, which resumed quickstart-001: all three are in group quickstart-001
    assert train_inprocess(tmp_path, capsys).returncode == 0
    runs = tmp_path / "runs"
    for epochs, resumed in (("3", "quickstart-001"), ("4", "quickstart-002")):
        proc = train_inprocess(tmp_path, capsys, "--run.resume", str(runs / resumed), "--trainer.max_epochs", epochs)
        assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("quickstart-001", "quickstart-002", "quickstart-003"):
        record = torch.load(runs / name / "last.ckpt", map_location="cpu", weights_only=True)["run"]
        assert (record["name"], record["group"]) == (name, "quickstart-001")


def test_the_last_of_several_config_files_names_the_run(tmp_path: Path) -> None:
    # --config base --config variant: the variant (the more specific config, given last) names runs/<config>-NNN
    variant = tmp_path / "short.yaml"
    variant.write_text("trainer:\n  max_epochs: 1\n")
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(variant)]
    cli = build_cli([*args, "--run.root", str(tmp_path / "runs"), "--trainer.logger", "false"])
    assert cli.run_dir == tmp_path / "runs" / "short-001"
    assert cli.trainer.max_epochs == 1


def test_latest_moves_to_each_new_run(tmp_path: Path) -> None:
    # README: train.py "points runs/latest at" the fresh run directory, also when an earlier run holds the link
    for name in ("quickstart-001", "quickstart-002"):
        (tmp_path / name).mkdir()
        point_latest(tmp_path / name)
        assert (tmp_path / "latest").resolve() == (tmp_path / name).resolve()
    assert os.readlink(tmp_path / "latest") == "quickstart-002"  # relative: the runs folder may move


def test_only_wandbs_own_errors_become_the_one_wandb_line(tmp_path: Path) -> None:
    # wandb.errors (network, login, ...) say what failed and how to go on; any other exception, also one raised
    # inside another wandb module (a bug), stays an error of its own (a traceback), not a network hint.
    from wandb.docker.names import InvalidRepositoryError
    from wandb.errors import CommError

    line = wandb_failure(CommError("\nNetwork error (ConnectionError), entering retry loop.\nmore"), tmp_path)
    assert isinstance(line, UserError)
    assert str(line).startswith("wandb failed (Network error (ConnectionError), entering retry loop.); check")
    assert str(line).endswith(f"(wandb's logs: {tmp_path})")
    assert wandb_failure(InvalidRepositoryError("not a repository"), tmp_path) is None
    assert wandb_failure(ValueError("x"), tmp_path) is None
