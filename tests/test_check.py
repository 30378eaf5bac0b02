"""The data check (``python -m gradreg.data check CONFIG``) and the shipped configs."""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from gradreg.cli import run_user_errors, train_main
from gradreg.data import OODDataModule
from gradreg.data.__main__ import main
from gradreg.data.check import MissingDatasetsError, check_datasets, check_specs, format_checks, require_datasets
from gradreg.data.datasets import DATASETS, ID_SPECS, DatasetNotFoundError, DatasetSpecError, check_spec
from gradreg.registry import SettingError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)


def write_fashion_mnist(folder: Path, train: bool = True) -> None:
    """Fashion-MNIST's gzipped idx files (4 training, 2 test images); ``train=False``: the t10k files alone."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"t10k-images-idx3-ubyte": (2, 28, 28), "t10k-labels-idx1-ubyte": (2,)}
    if train:
        files |= {"train-images-idx3-ubyte": (4, 28, 28), "train-labels-idx1-ubyte": (4,)}
    for stem, shape in files.items():
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


SPEC_MISTAKES = [
    ({"id_dataset": "digitz"}, ["data.id_dataset: 'digitz' is not an ID dataset", "cifar10, cifar100, digits,"]),
    ({"id_dataset": "lsun_c"}, ["data.id_dataset: 'lsun_c' is not an ID dataset", "fashion_mnist"]),
    (
        {"outliers": {"name": "tinyimages300k", "pth": "x.npy"}},
        [
            "data.outliers: unknown key(s) pth in the spec of dataset 'tinyimages300k'",
            "valid: name, alias, split, resize, path",
        ],
    ),
    (  # every valid key: the spec's own and the reader's settings
        {"ood_sets": [{"name": "noise", "bogus": 1}]},
        ["dataset 'noise'; valid: name, alias, split, resize, num, size, channels, kind\n"],
    ),
    (  # download: true is documented for torchvision's sets
        {"ood_sets": [{"name": "lsun_c", "download": True}]},
        ["unknown key(s) download", "download works for cifar10, cifar100, fashion_mnist, mnist, places365, svhn, "],
    ),
    (  # not Python's "missing 1 required positional argument: 'list_file'"
        {"ood_sets": [{"name": "imagelist", "alias": "tin"}]},
        ["data.ood_sets: dataset 'imagelist' needs list_file, e.g. {name: imagelist, list_file: ...}\n"],
    ),
    ({"ood_sets": ["lsnu_c"]}, ["data.ood_sets: unknown dataset 'lsnu_c'", "lsun_c, lsun_r"]),
    ({"ood_sets": [{"nmae": "svhn"}]}, ["data.ood_sets: {'nmae': 'svhn'} is not a dataset spec", "'name'"]),
    (
        {"ood_sets": ["noise", {"name": "noise", "kind": "gaussian"}]},
        ["data.ood_sets: two sets are named 'noise'", "alias"],
    ),
    ({"ood_val_sets": ["noise", "noise"]}, ["data.ood_val_sets: two sets are named 'noise'", "alias"]),
    (
        {"near_ood": ["svhn"]},
        ["data.near_ood: 'svhn' is not the name of an OOD set", "choose from lsun_c", "--data near_ood=[...]"],
    ),
    ({"ood_sets": [{"name": "lsun_c", "resize": "no"}]}, ["data.ood_sets: lsun_c: resize='no' is not true or false"]),
    (  # train, val and test all read that one split: test metrics on the training images
        {"id_dataset": {"name": "digits", "split": "test"}},
        ["data.id_dataset: 'split' does not apply to the ID set", "leave it out of the spec of 'digits'"],
    ),
    # the readers' settings: torch's "negative dimension -3"; a bare string read letter by letter
    ({"ood_sets": [{"name": "noise", "num": -3}]}, ["data.ood_sets: dataset 'noise': num=-3 must be >= 1\n"]),
    (
        {"ood_sets": [{"name": "noise", "kind": "gauss"}]},
        ["dataset 'noise': kind='gauss' is not one of uniform, gaussian\n"],
    ),
    (
        {"outliers": {"name": "imagefolder_complement", "path": "x", "id_classes": "n01"}},
        ["data.outliers: dataset 'imagefolder_complement': id_classes='n01' is not a list of strings or None"],
    ),
]


@pytest.mark.parametrize(("mistake", "fragments"), SPEC_MISTAKES, ids=[str(m) for m, _ in SPEC_MISTAKES])
def test_spec_mistakes_are_one_error_line(tmp_path: Path, mistake: dict[str, Any], fragments: list[str]) -> None:
    # A wrong config is no listing of what is missing on disk: one error line names the value and the choices.
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data(**mistake)))
    code, out, err = run_main("check", str(config), "--data-root", str(tmp_path))
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: data."), err
    for fragment in fragments:
        assert fragment in err, err
    with pytest.raises(DatasetSpecError) as raised:
        require_datasets(config, data_root=tmp_path)
    assert f"error: {raised.value}\n" == err  # the same line from train.py and evaluate.py (gradreg.cli prints it)
    with pytest.raises(DatasetSpecError, match=re.escape(str(raised.value))):
        OODDataModule(**data(**mistake)["data"])  # a datamodule in the user's own Trainer says the same


def test_spec_check_leaves_what_it_cannot_judge_to_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A user's reader may take a Path or a tuple, or annotate with a name imported only for type checkers; a Path
    # passed from Python is text to a built-in reader. The check refused or crashed on each.
    def with_paths(root: Path, split: str, folder: Path | None = None, size: tuple[int, int] = (8, 8), num: int = 4):
        raise NotImplementedError

    def undefined_names(root: Path, split: str, folder: Undefined = None):  # noqa: F821
        raise NotImplementedError

    monkeypatch.setitem(DATASETS._items, "with_paths", with_paths)
    monkeypatch.setitem(DATASETS._items, "undefined_names", undefined_names)
    monkeypatch.setitem(DATASETS._items, "partial", functools.partial(with_paths, size=(4, 4)))  # a TypeError
    check_spec({"name": "with_paths", "folder": "extra/imgs", "size": [16, 16]})
    check_spec({"name": "undefined_names", "folder": "x"})
    check_spec({"name": "partial", "folder": "x"})
    check_spec({"name": "textures", "path": tmp_path})
    for name in ("with_paths", "partial"):  # what it can judge, it still does
        with pytest.raises(DatasetSpecError, match=re.escape(f"dataset '{name}': num=-1 must be >= 1")):
            check_spec({"name": name, "num": -1})


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"ood_sets": "svhn"}, "data.ood_sets='svhn' is not a list; write it as one: [svhn]"),
        (
            {"ood_val_sets": {"name": "noise"}},
            "data.ood_val_sets={'name': 'noise'} is not a list; write it as one: [{name: noise}]",
        ),
        ({"near_ood": "noise"}, "data.near_ood='noise' is not a list; write it as one: [noise]"),
    ],
)
def test_a_set_list_that_is_no_list_is_one_error_line(tmp_path: Path, mistake: dict[str, Any], message: str) -> None:
    # A bare name was read letter by letter by the check: "unknown dataset 's'" (train.py's parser refuses it first).
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data(**mistake)))
    assert run_main("check", str(config), "--data-root", str(tmp_path)) == (1, "", f"error: {message}\n")


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_spec_mistakes_stop_train_py_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--run.root", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as exit_info:
        train_main([*args, "--data.id_dataset", "digitz"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert [line for line in err.splitlines() if "digitz" in line or "error" in line] == [
        f"error: data.id_dataset: 'digitz' is not an ID dataset; known: {', '.join(sorted(ID_SPECS))}"
    ], err
    assert not (tmp_path / "runs").exists()


def test_every_key_the_error_lists_is_valid(tmp_path: Path) -> None:
    # The keys an unknown-key error lists (test above) are the ones a spec may have: all of them at once pass.
    spec = {"name": "noise", "alias": "n", "split": "test", "resize": False, "num": 4, "size": 8, "channels": 1}
    checks = check_datasets(data(id_dataset="digits", ood_sets=[{**spec, "kind": "gaussian"}]), tmp_path)
    assert all(c.found for c in checks), format_checks(checks, tmp_path)


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
    """``python -m gradreg.data ARGS`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        run_user_errors(lambda: main(list(args)))()
    return exit_info.value.code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check"], "the following arguments are required: config; see python -m gradreg.data check --help"),
        (["check", "c.yaml", "--stage", "train"], "argument --stage: invalid choice: 'train'"),
        (["imagenet-classes", "1000"], "num_classes must be between 1 and 999"),
        (["imagenet-classes", "0"], "num_classes must be between 1 and 999"),
        (["check", "c.yaml", "--workers", "-1"], "--workers must be 0 (read in this process) or more, got -1"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["check", "c.yaml", "--bogus"], "unrecognized arguments: --bogus; see python -m gradreg.data check --help"),
        (["check", "c.yaml", "--read"], "unrecognized arguments: --read"),  # a prefix of --read-images
    ],
)
def test_command_line_mistakes_are_one_line(args: list[str], message: str) -> None:
    code, out, err = run_main(*args)
    assert (code, out) == (1, "")
    assert err.startswith("error: ")
    assert err.count("\n") == 1, err
    assert message in err


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


def test_check_command_names_a_broken_link(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data()))
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    write_image(tmp_path / "lsun_c" / "a.png")
    (tmp_path / "lsun_c" / "b.png").symlink_to("nowhere/b.png")
    code, out, _ = run_main("check", str(config), "--data-root", str(tmp_path))
    assert code == 1
    assert out.startswith("1 of 3 datasets are missing or invalid")
    line = f"  MISSING  ood       lsun_c           not found at {tmp_path / 'lsun_c' / 'b.png'}; it is a broken link"
    assert [x for x in out.splitlines() if "MISSING" in x] == [
        f"{line} (to nowhere/b.png, which does not exist); fix or delete it"
    ]


def test_check_command_reads_every_image_and_names_the_unreadable(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data(ood_sets=["lsun_c", {"name": "isun", "path": "lsun_c"}])))
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    for i in range(70):  # more than one loader batch
        write_image(tmp_path / "lsun_c" / f"{i:02d}.png")
    code, out, _ = run_main("check", str(config), "--data-root", str(tmp_path), "--read-images", "--workers", "0")
    assert code == 0
    assert "  ok          lsun_c test: 70 images read" in out.splitlines()

    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # compresses little
    Image.fromarray(noise).save(tmp_path / "lsun_c" / "05.png")
    good = (tmp_path / "lsun_c" / "05.png").read_bytes()
    (tmp_path / "lsun_c" / "05.png").write_bytes(good[: len(good) // 2])  # a cut download
    (tmp_path / "lsun_c" / "07.png").write_bytes(b"")
    (tmp_path / "lsun_c" / "69.png").write_text("not an image")
    code, out, _ = run_main("check", str(config), "--data-root", str(tmp_path), "--read-images", "--workers", "1")
    assert code == 1
    lines = out.splitlines()
    start = lines.index("  UNREADABLE  lsun_c test: 3 of 70")  # the listing found all (it reads no image)
    assert lines[start + 1 : start + 4] == [
        f"      cannot read image '{tmp_path / 'lsun_c' / '05.png'}' (image file is truncated)",
        f"      cannot read image '{tmp_path / 'lsun_c' / '07.png'}' (an empty file)",
        f"      cannot read image '{tmp_path / 'lsun_c' / '69.png'}' (cannot identify image file)",
    ]
    assert "  UNREADABLE  isun test: 3 of 70" in lines  # each set of a config is read, under its own name
    assert "  ok          fashion_mnist train: 4 images read" in lines
    assert lines[-1] == "3 unreadable images: replace or delete each file (or re-extract its dataset)"  # 3 files


def test_check_command_reports_unreadable_configs(tmp_path: Path) -> None:
    code, _, err = run_main("check", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert "does not exist" in err
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    code, _, err = run_main("check", str(tmp_path / "bad.yaml"))
    assert code == 1
    assert err.startswith("error:")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data:\n  id_datset: digits\n", "unknown key 'id_datset' in data; valid: id_dataset,"),
        ("dta:\n  id_dataset: digits\n", "unknown section 'dta'"),
        ("# nothing yet\n", "is empty"),
        (None, "is a folder, not a file"),
        # the datamodule's own checks of its settings, the unset ones at their defaults (outlier_batch_size=64)
        ("data:\n  batch_size: many\n", "data.batch_size='many' is not an integer"),
        ("data:\n  num_workers: -1\n", "data.num_workers=-1 must be >= 0"),
        ("data:\n  augment: flip\n", "data.augment='flip' is not one of none, crop, crop_flip, imagenet"),
        ("data:\n  val_fraction: 1.0\n", "data.val_fraction=1.0 must be < 1"),
        ("data:\n  candidates_per_epoch: 4\n", "data.candidates_per_epoch=4 is fewer than one outlier batch"),
        # Normalize broadcast a 1-channel digit to 3 channels (train.py then blamed the model's in_channels)
        ("data:\n  mean: [0.5, 0.5, 0.5]\n", "data.mean=[0.5, 0.5, 0.5] has 3 values, and the ID set 'digits' has 1"),
        ("data:\n  std: [-0.3]\n", "data.std=[-0.3] must be > 0 in every channel"),
    ],
)
def test_check_command_refuses_what_train_py_refuses(text: str | None, message: str, tmp_path: Path) -> None:
    # Else the check would report the default datasets as found, for a config train.py cannot run.
    config = tmp_path / "c.yaml"
    config.mkdir() if text is None else config.write_text(text)
    code, out, err = run_main("check", str(config))
    assert (code, out) == (1, "")
    assert err.startswith("error: ")
    assert message in err


def test_imagenet_classes_command() -> None:
    code, out, _ = run_main("imagenet-classes", "3")
    assert code == 0
    assert out.split() == ["n02396427", "n04141975", "n02834397"]


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_names_only_registered_parts(path: Path) -> None:
    from gradreg.evaluation import build_scorers
    from gradreg.models import MODELS
    from gradreg.samplers import SAMPLERS

    config = yaml.safe_load(path.read_text())
    model, data_section = config["model"], config["data"]
    assert model["arch"] in MODELS
    SAMPLERS.build(model.get("sampler", "random"))
    check_specs(data_section)  # registered datasets and settings, distinct names, near_ood among the OOD sets
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
    # Without ood_val_sets the OOD sets are read for validation too: a missing list is one line, not two.
    spec = {"name": "imagelist", "alias": "tin", "list_file": "lists/tin.txt"}
    checks = check_datasets(data(id_dataset="digits", outliers=None, ood_sets=[spec], ood_val_sets=None), tmp_path)
    assert [(c.role, c.name) for c in checks] == [("id", "digits"), ("ood", "tin"), ("ood_val", "tin")]
    text = format_checks(checks, tmp_path)
    assert text.startswith("1 of 2 datasets are missing")
    assert len([line for line in text.splitlines() if "tin" in line]) == 1
    assert re.search(r"MISSING  ood,ood_val  tin +not found at .*tin.txt; the list_file does not exist", text), text


def test_unset_ood_sets_mean_the_datamodule_default(tmp_path: Path) -> None:
    # The datamodule evaluates digits_heldout and noise when data.ood_sets is unset; near_ood may name them.
    config = data(id_dataset="digits", outliers=None, ood_sets=None, ood_val_sets=None, near_ood=["digits_heldout"])
    checks = check_datasets(config, data_root=tmp_path)
    assert all(c.found for c in checks), format_checks(checks, tmp_path)
    assert [(c.role, c.name) for c in checks if c.role == "ood"] == [("ood", "digits_heldout"), ("ood", "noise")]


def test_datamodule_settings_at_their_bounds() -> None:
    OODDataModule(candidates_per_epoch=64, outlier_batch_size=64)  # exactly one outlier batch per epoch: enough
    OODDataModule(val_fraction=0.0)  # no hold-out (the official CIFAR runs train on all 50,000 images)
    dm = OODDataModule(outlier_batch_size=360)  # digits_outliers: the 181 sixes and 179 sevens, one batch
    dm.setup("fit")
    assert dm.outlier_stream is not None
    with pytest.raises(SettingError, match=re.escape("holds 360 images, fewer than one outlier batch")):
        OODDataModule(outlier_batch_size=361).setup("fit")
    with pytest.raises(SettingError, match=re.escape("data.std=[0.0] must be > 0 in every channel")):
        OODDataModule(std=[0.0])  # Normalize would divide by zero
    with pytest.raises(SettingError, match=re.escape("data.std=[0.5, 0.5, 0.5] has 3 values, and the ID set 'digits'")):
        OODDataModule(std=[0.5, 0.5, 0.5])  # Normalize would broadcast a 1-channel digit to 3 channels


def test_resize_is_refused_for_the_outlier_pool_too() -> None:
    check_spec({"name": "lsun_c", "resize": False}, role="ood")
    for role in ("id", "outliers"):  # the pool gets the training augmentation, not the evaluation resize
        with pytest.raises(DatasetSpecError, match=r"^'resize' applies to OOD sets only"):
            check_spec({"name": "digits_outliers" if role == "outliers" else "digits", "resize": False}, role=role)


# ---------------------------------------------------------------------------------------------------------------
def test_test_stage_reads_only_the_id_test_split(tmp_path: Path) -> None:
    # Evaluation reads the ID test split alone: a copy holding only Fashion-MNIST's t10k files is enough for it.
    folder = tmp_path / "FashionMNIST" / "raw"
    write_fashion_mnist(folder, train=False)
    config = data(ood_sets=[], data_root=str(tmp_path))
    assert [(c.role, c.name, c.found) for c in check_datasets(config, stage="test")] == [("id", "fashion_mnist", True)]
    fit = check_datasets(config, stage="fit")  # training reads train too
    assert [(c.role, c.name, c.found) for c in fit] == [
        ("id", "fashion_mnist", False),
        ("outliers", "digits_outliers", True),
    ]
    assert fit[0].message.startswith(f"not found at {folder};")


def test_an_empty_config_checks_the_datamodule_defaults(tmp_path: Path) -> None:
    # No data section: the datamodule's defaults, the embedded digits sets (OOD sets read for validation too).
    config = tmp_path / "c.yaml"
    config.write_text("# nothing yet\n")
    checks = check_datasets(config, data_root=tmp_path)
    assert [(c.role, c.name, c.found) for c in checks] == [
        ("id", "digits", True),
        ("outliers", "digits_outliers", True),
        ("ood", "digits_heldout", True),
        ("ood", "noise", True),
        ("ood_val", "digits_heldout", True),
        ("ood_val", "noise", True),
    ]


def test_a_reader_that_cannot_read_its_files_is_a_missing_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An OSError of a user's reader (no permission, a stale mount) is a MISSING line, not a traceback of the check.
    def unreachable(root: Path, split: str):
        raise PermissionError(13, "Permission denied", str(root / "mount"))

    monkeypatch.setitem(DATASETS._items, "unreachable", unreachable)
    checks = by_name(check_datasets(data(id_dataset="digits", ood_sets=["unreachable"]), data_root=tmp_path))
    assert not checks["ood", "unreachable"].found
    assert (
        checks["ood", "unreachable"].message == f"cannot read it: [Errno 13] Permission denied: '{tmp_path / 'mount'}'"
    )


def test_an_id_set_in_two_folders_names_both(tmp_path: Path) -> None:
    # ImageNet's train/ and val/ (its test split) are two places: one message, "; " between them.
    from gradreg.data.benchmarks import imagenet_subset_wnids

    for split in ("train", "val"):
        for wnid in imagenet_subset_wnids(10):
            write_image(tmp_path / "imagenet" / split / wnid / "a.JPEG")
    checks = check_datasets(data(id_dataset="imagenet10", outliers=None, ood_sets=[]), data_root=tmp_path)
    assert [(c.role, c.name, c.found) for c in checks] == [("id", "imagenet10", True)]
    assert checks[0].message == f"{tmp_path / 'imagenet' / 'train'}; {tmp_path / 'imagenet' / 'val'}"


def test_set_lists_may_be_tuples(tmp_path: Path) -> None:
    # The datamodule takes tuples from Python code; only a bare name or mapping is no list of sets.
    config = data(id_dataset="digits", outliers=None, ood_sets=("noise",), ood_val_sets=(), near_ood=("noise",))
    check_specs(config["data"])
    checks = check_datasets(config, data_root=tmp_path)
    assert [(c.role, c.name, c.found) for c in checks] == [("id", "digits", True), ("ood", "noise", True)]


def test_format_checks_keeps_one_set_read_from_two_places_on_two_lines(tmp_path: Path) -> None:
    # With {split} in its list_file an OOD set reads test.txt for testing and val.txt for validation: two places.
    write_image(tmp_path / "a.png")
    for split in ("test", "val"):
        (tmp_path / f"{split}.txt").write_text("a.png\n")
    spec = {"name": "imagelist", "alias": "tin", "list_file": "{split}.txt"}
    checks = check_datasets(data(id_dataset="digits", outliers=None, ood_sets=[spec], ood_val_sets=None), tmp_path)
    assert [(c.role, c.name, c.found) for c in checks] == [
        ("id", "digits", True),
        ("ood", "tin", True),
        ("ood_val", "tin", True),
    ]
    lines = format_checks(checks, tmp_path).splitlines()
    assert lines[0] == f"all 3 datasets found (data_root: {tmp_path}):"
    assert [line for line in lines if "tin" in line] == [
        f"  ok       ood      tin     {tmp_path / 'test.txt'}",
        f"  ok       ood_val  tin     {tmp_path / 'val.txt'}",
    ]


def test_require_datasets_report_lines_up_the_missing_sets_under_the_config_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The report names the config's data_root (relative to the working directory) and pads only the lines it shows.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingDatasetsError) as err:
        require_datasets(data(data_root="here"))
    lines = str(err.value).splitlines()
    assert lines[0] == f"2 of 3 datasets are missing or invalid (data_root: {tmp_path / 'here'}):"
    assert lines[1].startswith(
        f"  MISSING  id   fashion_mnist  not found at {tmp_path / 'here' / 'FashionMNIST' / 'raw'}"
    )
    assert lines[2].startswith(f"  MISSING  ood  lsun_c         not found at {tmp_path / 'here' / 'lsun_c'}")
    assert err.value.name == "fashion_mnist, lsun_c"


def test_check_command_test_stage_reads_only_what_evaluation_reads(tmp_path: Path) -> None:
    # --stage test: the ID test split and the OOD sets; no training file is looked for or read.
    folder = tmp_path / "FashionMNIST" / "raw"
    write_fashion_mnist(folder, train=False)
    write_image(tmp_path / "lsun_c" / "a.png")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data(data_root=str(tmp_path))))  # the config's data_root: no --data-root
    args = ["check", str(config)]
    code, out, _ = run_main(*args, "--stage", "test")
    assert code == 0
    assert out.splitlines()[0] == f"all 2 datasets found (data_root: {tmp_path}):"
    assert len(out.splitlines()) == 3  # the report alone: no image is read without --read-images
    code, out, _ = run_main(*args, "--stage", "test", "--read-images", "--workers", "0")
    assert code == 0
    assert out.startswith("all 2 datasets found")
    assert [line for line in out.splitlines() if line.startswith("  ok          ")] == [
        "  ok          fashion_mnist test: 2 images read",
        "  ok          lsun_c test: 1 image read",
    ]
    code, out, _ = run_main(*args)  # training reads train too
    assert code == 1
    assert "MISSING  id        fashion_mnist" in out


def test_check_command_lists_at_most_twenty_unreadable_files_per_set(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data()))
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    (tmp_path / "lsun_c").mkdir()
    for i in range(21):  # one more than the listing shows
        (tmp_path / "lsun_c" / f"{i:02d}.png").write_bytes(b"")
    code, out, _ = run_main("check", str(config), "--data-root", str(tmp_path), "--read-images", "--workers", "0")
    assert code == 1
    lines = out.splitlines()
    start = lines.index("  UNREADABLE  lsun_c test: 21 of 21")
    listed = [f"      cannot read image '{tmp_path / 'lsun_c' / f'{i:02d}.png'}' (an empty file)" for i in range(20)]
    assert lines[start + 1 : start + 22] == [*listed, "      ... and 1 more"]
    assert lines[-1] == "21 unreadable images: replace or delete each file (or re-extract its dataset)"


def test_check_command_reads_a_set_in_two_roles_once(tmp_path: Path) -> None:
    # ood_val_sets unset: an OOD set with its own split is read for validation from the same files; read once.
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data(ood_sets=[{"name": "lsun_c", "split": "test"}], ood_val_sets=None)))
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    write_image(tmp_path / "lsun_c" / "a.png")
    code, out, _ = run_main("check", str(config), "--data-root", str(tmp_path), "--read-images", "--workers", "0")
    assert code == 0
    assert [line for line in out.splitlines() if "lsun_c test:" in line] == ["  ok          lsun_c test: 1 image read"]


@pytest.mark.parametrize(
    "config",
    [
        {"data": {"class_path": "gradreg.data.OODDataModule", "init_args": {"ood_sets": ["noise"], "outliers": None}}},
        {"ood_sets": ["noise"], "outliers": None},  # the data section itself
    ],
    ids=["class_path", "data_section"],
)
def test_the_check_reads_every_form_of_the_data_section(tmp_path: Path, config: dict[str, Any]) -> None:
    checks = check_datasets(config, data_root=tmp_path)
    assert [(c.role, c.name, c.found) for c in checks] == [
        ("id", "digits", True),
        ("ood", "noise", True),
        ("ood_val", "noise", True),
    ]
