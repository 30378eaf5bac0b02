"""The data check (``python -m gradreg.data check CONFIG``) and the shipped configs."""

from __future__ import annotations

import contextlib
import gzip
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from gradreg.data.__main__ import main
from gradreg.data.check import MissingDatasetsError, check_datasets, format_checks, require_datasets
from gradreg.data.datasets import DATASETS, ID_SPECS, DatasetNotFoundError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)


def write_fashion_mnist(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, shape in {
        "train-images-idx3-ubyte": (4, 28, 28),
        "train-labels-idx1-ubyte": (4,),
        "t10k-images-idx3-ubyte": (2, 28, 28),
        "t10k-labels-idx1-ubyte": (2,),
    }.items():
        header = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(header + bytes(int(np.prod(shape)))))


def data(**kwargs: Any) -> dict[str, Any]:
    base = {"id_dataset": "fashion_mnist", "outliers": "digits_outliers", "ood_sets": ["lsun_c"], "ood_val_sets": []}
    return {"data": {**base, **kwargs}}


def by_name(checks: list) -> dict[str, Any]:
    return {(c.role, c.name): c for c in checks}


# ---------------------------------------------------------------------------------------------------------------
def test_every_found_set_says_where(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    write_image(tmp_path / "lsun_c" / "test" / "0.jpg")
    checks = check_datasets(data(data_root=str(tmp_path)))
    assert [(c.role, c.name, c.found) for c in checks] == [
        ("id", "fashion_mnist", True),
        ("outliers", "digits_outliers", True),
        ("ood", "lsun_c", True),
    ]
    assert str(tmp_path / "FashionMNIST" / "raw") in checks[0].message
    assert str(tmp_path / "lsun_c") in checks[2].message


def test_missing_sets_name_the_expected_path(tmp_path: Path) -> None:
    checks = by_name(check_datasets(data(ood_sets=["lsun_c", "svhn"]), data_root=tmp_path))
    assert not checks["id", "fashion_mnist"].found
    assert str(tmp_path / "FashionMNIST" / "raw") in checks["id", "fashion_mnist"].message
    assert "dataset-fashion-mnist" in checks["id", "fashion_mnist"].message  # how to get it
    assert str(tmp_path / "lsun_c") in checks["ood", "lsun_c"].message
    assert str(tmp_path / "svhn") in checks["ood", "svhn"].message
    assert "test_32x32.mat" in checks["ood", "svhn"].message
    assert checks["outliers", "digits_outliers"].found


def test_the_id_set_needs_no_val_split(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "fm")
    checks = check_datasets(data(id_dataset={"name": "fashion_mnist", "path": "fm"}), data_root=tmp_path)
    assert checks[0].found
    assert checks[0].message == str(tmp_path / "fm")


def test_unset_ood_val_sets_check_the_ood_sets_val_split(tmp_path: Path) -> None:
    write_image(tmp_path / "isun" / "a.png")
    config = {"data": {"id_dataset": "digits", "ood_sets": ["isun", "noise"]}}  # ood_val_sets unset
    checks = by_name(check_datasets(config, data_root=tmp_path))
    assert checks["ood", "isun"].found
    assert not checks["ood_val", "isun"].found
    assert "ood_val_sets" in checks["ood_val", "isun"].message
    assert checks["ood_val", "noise"].found


def test_spec_split_alias_and_settings_are_honoured(tmp_path: Path) -> None:
    write_image(tmp_path / "elsewhere" / "a.png")
    (tmp_path / "val.txt").write_text("elsewhere/a.png\n")
    config = data(
        ood_sets=[{"name": "sun", "alias": "sun_moved", "path": "elsewhere"}],
        ood_val_sets=[
            {"name": "imagelist", "alias": "val_list", "list_file": "val.txt"},
            {"name": "digits", "split": "test"},
        ],
    )
    checks = by_name(check_datasets(config, data_root=tmp_path))
    assert checks["ood", "sun_moved"].found
    assert checks["ood_val", "val_list"].found
    assert checks["ood_val", "val_list"].message.endswith("val.txt")
    assert checks["ood_val", "digits"].message == "built in (test 216 images)"


def test_config_mistakes_are_reported_not_raised(tmp_path: Path) -> None:
    config = data(
        id_dataset="lsun_c",  # not an ID dataset
        outliers={"name": "tinyimages300k", "pth": "x.npy"},  # typo in a setting
        ood_sets=["lsnu_c", "noise", {"name": "noise", "kind": "gaussian"}],  # typo, duplicate display name
        near_ood=["svhn"],  # not among the OOD sets
    )
    write_image(tmp_path / "lsun_c" / "a.png")
    checks = by_name(check_datasets(config, data_root=tmp_path))
    assert "not an ID dataset" in checks["id", "lsun_c"].message
    assert "unknown setting(s) pth" in checks["outliers", "tinyimages300k"].message
    assert "unknown dataset 'lsnu_c'" in checks["ood", "lsnu_c"].message
    assert "give one of them an alias" in checks["ood", "noise"].message
    assert not checks["near_ood", "svhn"].found


def test_download_true_passes_without_downloading(tmp_path: Path) -> None:
    checks = check_datasets(data(id_dataset={"name": "cifar10", "download": True}, ood_sets=[]), data_root=tmp_path)
    assert checks[0].found
    assert "download" in checks[0].message
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_test_stage_checks_only_what_evaluation_reads(tmp_path: Path) -> None:
    write_image(tmp_path / "lsun_c" / "a.png")
    checks = check_datasets(data(id_dataset="digits", ood_val_sets=None), data_root=tmp_path, stage="test")
    assert [(c.role, c.name, c.found) for c in checks] == [("id", "digits", True), ("ood", "lsun_c", True)]


def test_require_datasets_raises_the_report(tmp_path: Path) -> None:
    with pytest.raises(MissingDatasetsError) as err:
        require_datasets(data(data_root=str(tmp_path)))
    assert isinstance(err.value, DatasetNotFoundError)  # the CLI prints it as one user error
    text = str(err.value)
    assert text.startswith("2 of 3 datasets are missing")
    assert "MISSING" in text
    assert "digits_outliers" not in text


def test_format_checks_lists_every_set(tmp_path: Path) -> None:
    text = format_checks(check_datasets(data(), data_root=tmp_path), tmp_path)
    assert "  ok       outliers  digits_outliers" in text
    assert "MISSING  ood       lsun_c" in text
    assert text.splitlines()[-1].startswith("put each set where its line says")


# ---------------------------------------------------------------------------------------------------------------
def run_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_check_command_exit_codes(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data()))
    code, out, _ = run_main("check", str(config), "--data-root", str(tmp_path))
    assert code == 1
    assert "MISSING  id        fashion_mnist" in out
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    write_image(tmp_path / "lsun_c" / "a.png")
    code, out, _ = run_main("check", str(config), "--data_root", str(tmp_path))
    assert code == 0
    assert out.startswith("all 3 datasets found")


def test_check_command_reports_unreadable_configs(tmp_path: Path) -> None:
    code, _, err = run_main("check", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert "does not exist" in err
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    code, _, err = run_main("check", str(tmp_path / "bad.yaml"))
    assert code == 1
    assert err.startswith("error:")


def test_imagenet_classes_command() -> None:
    code, out, _ = run_main("imagenet-classes", "3")
    assert code == 0
    assert out.split() == ["n02396427", "n04141975", "n02834397"]


# ---------------------------------------------------------------------------------------------------------------
def dataset_specs(data_section: dict[str, Any]) -> list[Any]:
    specs = [data_section["id_dataset"], data_section.get("outliers")]
    specs += list(data_section.get("ood_sets") or []) + list(data_section.get("ood_val_sets") or [])
    return [s for s in specs if s is not None]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_names_only_registered_parts(path: Path) -> None:
    from gradreg.evaluation import build_scorers
    from gradreg.models import MODELS
    from gradreg.samplers import SAMPLERS

    config = yaml.safe_load(path.read_text())
    model, data_section = config["model"], config["data"]
    assert model["arch"] in MODELS
    SAMPLERS.build(model.get("sampler", "random"))
    id_spec = data_section["id_dataset"]
    assert (id_spec if isinstance(id_spec, str) else id_spec["name"]) in ID_SPECS
    for spec in dataset_specs(data_section):
        settings = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = settings.pop("name")
        assert name in DATASETS, f"{path.name}: unknown dataset {name}"
        assert set(settings) - {"alias", "split", "resize"} <= set(DATASETS.settings(name)), f"{path.name}: {spec}"
    display = [s if isinstance(s, str) else s.get("alias", s["name"]) for s in data_section.get("ood_sets") or []]
    assert len(display) == len(set(display))
    assert set(data_section.get("near_ood") or []) <= set(display)
    for callback in config.get("trainer", {}).get("callbacks") or []:
        build_scorers(callback["init_args"].get("scorers", []))


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_with_the_training_cli(path: Path) -> None:
    from gradreg.training import build_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(out.getvalue())
    assert printed["data"]["id_dataset"] == yaml.safe_load(path.read_text())["data"]["id_dataset"]


def test_the_check_runs_on_every_config(tmp_path: Path) -> None:
    for path in CONFIGS:
        checks = check_datasets(path, data_root=tmp_path)
        assert checks, path.name
        assert all(c.message for c in checks), path.name
        if path.name == "quickstart.yaml":  # the embedded data
            assert all(c.found for c in checks)
        for c in checks:
            assert c.found or "not found at" in c.message, (path.name, c)


def test_imagenet_config_leaves_out_exactly_the_id_classes() -> None:
    from gradreg.data.benchmarks import imagenet_subset_wnids

    data_section = yaml.safe_load((ROOT / "configs" / "imagenet.yaml").read_text())["data"]
    n = int(data_section["id_dataset"].removeprefix("imagenet"))
    assert data_section["outliers"]["name"] == "imagefolder_complement"
    assert data_section["outliers"]["id_classes"] == imagenet_subset_wnids(n)


def test_format_checks_merges_one_set_in_two_roles(tmp_path: Path) -> None:
    # Without ood_val_sets the OOD sets are read for validation too: a typo is one line, not two.
    checks = check_datasets(data(id_dataset="digits", outliers=None, ood_sets=["noize"], ood_val_sets=None), tmp_path)
    assert [(c.role, c.name) for c in checks] == [("id", "digits"), ("ood", "noize"), ("ood_val", "noize")]
    text = format_checks(checks, tmp_path)
    assert text.startswith("1 of 2 datasets are missing")
    assert len([line for line in text.splitlines() if "noize" in line]) == 1
    assert re.search(r"MISSING  ood,ood_val  noize +unknown dataset 'noize'", text), text


def test_unset_ood_sets_mean_the_datamodule_default(tmp_path: Path) -> None:
    # The datamodule evaluates digits_heldout and noise when data.ood_sets is unset; near_ood may name them.
    config = data(id_dataset="digits", outliers=None, ood_sets=None, ood_val_sets=None, near_ood=["digits_heldout"])
    checks = check_datasets(config, data_root=tmp_path)
    assert all(c.found for c in checks), format_checks(checks, tmp_path)
    assert [(c.role, c.name) for c in checks if c.role == "ood"] == [("ood", "digits_heldout"), ("ood", "noise")]
