"""Benchmark readers on small files written here in each set's real on-disk format (no downloads)."""

from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tvd

from gradreg.data import benchmarks
from gradreg.data.benchmarks import IMAGENET_WNIDS, imagenet_subset_wnids, read_idx, read_list_file
from gradreg.data.datasets import (
    DATASETS,
    ID_SPECS,
    DatasetFileError,
    DatasetNotFoundError,
    Transformed,
    UnreadableImageError,
    build_dataset,
    build_transform,
)
from gradreg.registry import SettingError

# ALGORITHMS.md 1.4: GReg's 10 ImageNet ID classes, labels 0..9 in this order.
GREG_IMAGENET10 = [
    "n02396427", "n04141975", "n02834397", "n02111277", "n03534580",
    "n01877812", "n02837789", "n01443537", "n02114367", "n03857828",
]  # fmt: skip

OUR_SETS = [name for name in DATASETS.names() if DATASETS.get(name).__module__ == benchmarks.__name__]


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks MD5 sums of the real files; the small files written here only need to exist."""
    import torchvision.datasets.cifar
    import torchvision.datasets.places365
    import torchvision.datasets.svhn
    import torchvision.datasets.utils

    def exists(fpath: str, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    modules = (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.places365)
    for module in (*modules, torchvision.datasets.utils):  # the last one: gradreg's own checks before reading
        monkeypatch.setattr(module, "check_integrity", exists)


def write_image(path: Path, size: int = 8, value: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def write_cifar10(base: Path, per_batch: int = 3) -> Path:
    folder = base / "cifar-10-batches-py"
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", {"data": cifar_rows(per_batch, i), "labels": [i % 10] * per_batch})
    write_pickle(folder / "test_batch", {"data": cifar_rows(4, 0), "labels": [0, 1, 2, 3]})
    write_pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return folder


def write_cifar100(base: Path) -> Path:
    folder = base / "cifar-100-python"
    write_pickle(folder / "train", {"data": cifar_rows(5, 1), "fine_labels": [0, 1, 2, 3, 99]})
    write_pickle(folder / "test", {"data": cifar_rows(2, 2), "fine_labels": [5, 6]})
    write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return folder


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train: int = 6, n_test: int = 3, gz: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data = idx_bytes(array)
        (folder / (f"{stem}.gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)
    return arrays


# ---------------------------------------------------------------------------------------------------------------
def test_id_specs_registered_for_every_id_reader() -> None:
    for name in ("cifar10", "cifar100", "fashion_mnist", "mnist", "imagenet1k", "imagenet10", "imagenet100"):
        assert name in ID_SPECS
        assert name in DATASETS
    assert ID_SPECS["cifar10"].mean == (0.4914, 0.4822, 0.4465)
    assert ID_SPECS["cifar100"].std == (0.2673, 0.2564, 0.2762)
    assert ID_SPECS["imagenet10"].num_classes == 10
    assert (ID_SPECS["imagenet1k"].size, ID_SPECS["imagenet1k"].resize) == (224, 256)
    assert ID_SPECS["fashion_mnist"].channels == 1


@pytest.mark.parametrize("name", OUR_SETS)
def test_locate_takes_the_factory_settings(name: str) -> None:
    factory = DATASETS.get(name)
    assert list(inspect.signature(factory.locate).parameters) == list(inspect.signature(factory).parameters)


@pytest.mark.parametrize("name", OUR_SETS)
def test_missing_data_names_where_it_belongs(name: str, tmp_path: Path) -> None:
    settings = {"list_file": "lists/x.txt"} if name == "imagelist" else {}
    split = "train" if name in ID_SPECS else "test"
    with pytest.raises(DatasetNotFoundError) as err:
        DATASETS.get(name)(tmp_path, split, **settings)
    assert str(tmp_path) in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("skip_md5")
def test_cifar10_reads_python_pickles(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    train = DATASETS.get("cifar10")(tmp_path, "train")
    test = DATASETS.get("cifar10")(tmp_path, "test")
    assert (len(train), len(test)) == (15, 4)
    image, label = test[1]
    assert label == 1
    expected = cifar_rows(4, 0)[1].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(image), expected)
    # path may name the torchvision root or the extracted folder itself
    assert len(DATASETS.get("cifar10")(tmp_path, "test", path=str(folder))) == 4


@pytest.mark.usefixtures("skip_md5")
def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "elsewhere")
    train = DATASETS.get("cifar100")(tmp_path, "train", path="elsewhere")
    assert len(train) == 5
    assert train[4][1] == 99


def test_id_sets_have_no_val_split_so_the_datamodule_holds_out(tmp_path: Path) -> None:
    for name in ("cifar10", "cifar100", "fashion_mnist", "mnist", "imagenet1k", "imagenet10"):
        with pytest.raises(ValueError, match="no 'val' split"):
            DATASETS.get(name)(tmp_path, "val")


@pytest.mark.usefixtures("skip_md5")
def test_cifar_missing_file_is_listed(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    for split in ("train", "test"):  # torchvision wants every file for either split
        with pytest.raises(DatasetNotFoundError, match="missing data_batch_3"):
            DATASETS.get("cifar10")(tmp_path, split)


def test_cifar_corrupt_file_is_a_dataset_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path)  # real MD5 checks stay on: the small files fail them
    with pytest.raises(DatasetNotFoundError, match="corrupt"):
        DATASETS.get("cifar10")(tmp_path, "test")


def test_locate_checks_published_md5_sums(tmp_path: Path) -> None:
    """The up-front check (locate) catches a corrupt file, not only reading it (for an OOD set: after training)."""
    write_cifar10(tmp_path)  # small files: every MD5 differs from the published one
    with pytest.raises(DatasetFileError, match=r"is unusable: corrupt or partial: data_batch_1, .* and 3 more \(MD5"):
        DATASETS.get("cifar10").locate(tmp_path, "test")
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"half a file")
    with pytest.raises(DatasetFileError, match=r"svhn is unusable: corrupt or partial: test_32x32\.mat"):
        DATASETS.get("svhn").locate(tmp_path, "test")
    file = tmp_path / "f.bin"  # and a file whose sum matches passes
    file.write_bytes(b"gradreg")
    digest = hashlib.md5(b"gradreg").hexdigest()
    assert benchmarks._require("x", tmp_path, [file], "how", md5={"f.bin": digest}).path == tmp_path
    with pytest.raises(DatasetNotFoundError, match=r"f\.bin"):
        benchmarks._require("x", tmp_path, [file], "how", md5={"f.bin": digest[::-1]})


def test_idx_check_reads_multi_member_gzip_files(tmp_path: Path) -> None:
    """The gzip trailer gives the size of the last member only: such a file is whole, not truncated."""
    data = idx_bytes(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
    (tmp_path / "a.gz").write_bytes(gzip.compress(data[:10]) + gzip.compress(data[10:]))
    benchmarks.check_idx(tmp_path / "a.gz")
    (tmp_path / "b.gz").write_bytes(gzip.compress(data[:10]) + gzip.compress(data[10:-1]))
    with pytest.raises(ValueError, match="truncated"):
        benchmarks.check_idx(tmp_path / "b.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_locate_checks_idx_sizes_without_reading(tmp_path: Path, gz: bool) -> None:
    folder = tmp_path / "FashionMNIST" / "raw"
    write_idx_set(folder, gz=gz)
    DATASETS.get("fashion_mnist").locate(tmp_path, "test")
    images = folder / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    images.write_bytes(images.read_bytes()[: -(20 if gz else 1)])  # a cut gzip loses its size trailer
    with pytest.raises(DatasetFileError, match=r"is unusable: corrupt file: .*t10k-images-idx3-ubyte.*truncated"):
        DATASETS.get("fashion_mnist").locate(tmp_path, "test")
    DATASETS.get("fashion_mnist").locate(tmp_path, "train")  # the other split's files are whole


def test_download_is_only_announced_by_locate(tmp_path: Path) -> None:
    loc = DATASETS.get("cifar10").locate(tmp_path, "train", download=True)
    assert loc.path == (tmp_path / "cifar-10-batches-py").absolute()
    assert "download" in loc.note
    loc = DATASETS.get("fashion_mnist").locate(tmp_path, "test", download=True)
    assert loc.path == (tmp_path / "FashionMNIST" / "raw").absolute()


# ---------------------------------------------------------------------------------------------------------------
def test_read_idx_roundtrip_and_truncation(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "b").write_bytes(idx_bytes(array)[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "b")
    (tmp_path / "c.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="decompress"):
        read_idx(tmp_path / "c.gz")


def test_fashion_mnist_debian_flat_layout(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path / "usr/share/datasets/fashion-mnist")
    data = DATASETS.get("fashion_mnist")(tmp_path, "test", path=str(tmp_path / "usr/share/datasets/fashion-mnist"))
    assert len(data) == 3
    image, label = data[2]
    assert image.shape == (28, 28, 1)
    assert image.dtype == np.uint8
    assert label == 2
    np.testing.assert_array_equal(image[..., 0], arrays["t10k-images-idx3-ubyte"][2])


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_torchvision_layout(tmp_path: Path, gz: bool) -> None:
    write_idx_set(tmp_path / "FashionMNIST" / "raw", gz=gz)
    data = DATASETS.get("fashion_mnist")(tmp_path, "train")  # default: data_root is torchvision's root
    assert len(data) == 6
    assert data[5][1] == 5


def test_mnist_torchvision_layout(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "MNIST" / "raw", gz=False)
    assert len(DATASETS.get("mnist")(tmp_path, "test")) == 3


def test_mnist_split_all_is_openoods_far_set_train_then_test(tmp_path: Path) -> None:
    # OpenOOD's test_mnist.txt lists all 70,000 images; the test split alone is 10,000
    arrays = write_idx_set(tmp_path / "MNIST" / "raw")
    data = build_dataset({"name": "mnist", "split": "all"}, tmp_path, "test")
    assert len(data) == 9
    np.testing.assert_array_equal(data[5][0][..., 0], arrays["train-images-idx3-ubyte"][5])
    np.testing.assert_array_equal(data[6][0][..., 0], arrays["t10k-images-idx3-ubyte"][0])
    assert [data[i][1] for i in range(9)] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError):
        build_dataset({"name": "mnist", "split": "all"}, tmp_path, "test")


def test_fashion_mnist_corrupt_file_is_a_dataset_error(tmp_path: Path) -> None:
    folder = tmp_path / "fm"
    write_idx_set(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09"))
    with pytest.raises(DatasetNotFoundError, match="corrupt"):
        DATASETS.get("fashion_mnist")(tmp_path, "test", path="fm")


def test_fashion_mnist_through_the_id_transform(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "FashionMNIST" / "raw")
    spec = ID_SPECS["fashion_mnist"]
    data = Transformed(build_dataset("fashion_mnist", tmp_path, "train"), build_transform(spec, "crop_flip"))
    x, y = data[0]
    assert x.shape == (1, 28, 28)
    assert x.dtype == torch.float32
    assert y == 0


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("skip_md5")
def test_svhn_reads_the_mat_file(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    scipy_io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3]])})
    data = DATASETS.get("svhn")(tmp_path, "test")
    assert len(data) == 4
    image, label = data[0]
    assert label == 0  # SVHN stores the digit 0 as 10
    np.testing.assert_array_equal(np.asarray(image), x[..., 0])


def write_dtd(base: Path) -> int:
    folder = base / "dtd" / "dtd"
    names = {c: [f"{c}_{i:04d}.jpg" for i in range(3)] for c in ("banded", "zigzagged")}
    for c, files in names.items():
        for i, f in enumerate(files):
            write_image(folder / "images" / c / f, value=i)
    lines = {"train": [], "val": [], "test": []}
    for c, files in names.items():
        for split, f in zip(lines, files, strict=True):
            lines[split].append(f"{c}/{f}")
    (folder / "labels").mkdir()
    for split, entries in lines.items():
        for p in range(1, 11):
            (folder / "labels" / f"{split}{p}.txt").write_text("\n".join(entries) + "\n")
    return sum(len(v) for v in names.values())


def test_textures_uses_every_dtd_image(tmp_path: Path) -> None:
    total = write_dtd(tmp_path)
    data = DATASETS.get("textures")(tmp_path, "test")
    assert len(data) == total == 6
    assert isinstance(data[0][0], Image.Image)
    # The images and the order of torchvision's DTD over its partition-1 train, val and test lists.
    reference = [image for s in ("train", "val", "test") for image, _ in tvd.DTD(str(tmp_path), split=s)]
    assert [np.asarray(image).tolist() for image, _ in data] == [np.asarray(image).tolist() for image in reference]
    assert {label for _, label in data} == {-1}  # an OOD set: no class labels, as every other one


def test_textures_from_a_plain_image_folder(tmp_path: Path) -> None:
    write_dtd(tmp_path / "tarball")
    data = DATASETS.get("textures")(tmp_path, "test", path="tarball/dtd/dtd/images")
    assert len(data) == 6
    assert data[0][1] == -1


@pytest.mark.parametrize(
    ("extract_into", "path", "fix"),
    [
        ("", None, "set path: {root}/dtd/images"),  # the tarball extracted into the data root, not into dtd/
        ("dtd/dtd", None, "set path: {root}/dtd"),  # one level too deep
        ("dtd", "dtd", "leave path: out"),  # path: naming the default place's dtd/, which holds the right layout
        ("", ".", "set path: {root}/dtd/images"),
    ],
)
def test_textures_one_level_off_names_the_folder_and_the_fix(
    extract_into: str, path: str | None, fix: str, tmp_path: Path
) -> None:
    write_dtd(tmp_path / "tarball")
    (tmp_path / extract_into).mkdir(parents=True, exist_ok=True)
    (tmp_path / "tarball" / "dtd" / "dtd").rename(tmp_path / extract_into / "dtd")  # the tarball's one folder, dtd/
    with pytest.raises(DatasetNotFoundError) as err:
        DATASETS.get("textures")(tmp_path, "test", path=path)
    message = str(err.value)
    assert "dtd/dtd/dtd" not in message.replace(str(tmp_path / extract_into / "dtd"), "<found>")
    assert (
        f"DTD's files are at {tmp_path / extract_into / 'dtd'}/" in message or "tarball's dtd/ folder is at" in message
    )
    assert fix.format(root=tmp_path) in message
    new_path = re.search(r"set path: (\S+)", message).group(1).rstrip(",")  # the first fix given works
    if "leave path: out" in message:
        new_path = None
    assert len(DATASETS.get("textures")(tmp_path, "test", path=new_path)) == 6


@pytest.mark.parametrize("path", ["dtd", "missing/dtd", "/no/such/folder/dtd"])
def test_textures_path_that_does_not_exist_is_named_as_such(path: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        DATASETS.get("textures")(tmp_path, "test", path=path)
    message = str(err.value)
    assert "dtd/dtd/dtd" not in message
    assert "dtd/dtd/images" in message  # the layout path: may name
    expected = path if path.startswith("/") else str(tmp_path / path)
    assert message.startswith(f"dataset 'textures' not found at {expected}; path: {path} does not exist;")
    assert f"leave path: out to read {tmp_path}/dtd/dtd/images/" in message


def test_textures_missing_names_the_default_place(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        DATASETS.get("textures")(tmp_path, "test")
    message = str(err.value)
    assert f"extract it into {tmp_path}/dtd/ (giving {tmp_path}/dtd/dtd/images/)" in message
    assert "dtd/dtd/dtd" not in message
    assert "(e.g. dtd/images)" not in message


@pytest.mark.parametrize("source_split", ["val", "test"])
def test_places365_small_layout(source_split: str, tmp_path: Path, skip_md5: None) -> None:
    folder = tmp_path / "places365"
    folder.mkdir()
    (folder / "categories_places365.txt").write_text("/a/airfield 0\n/b/bakery/shop 1\n")
    names = [f"Places365_{source_split}_{i:08d}.jpg" for i in range(1, 4)]
    labels = [f" {i % 2}" if source_split == "val" else "" for i in range(3)]  # the test list has no labels
    (folder / f"places365_{source_split}.txt").write_text(
        "".join(f"{n}{y}\n" for n, y in zip(names, labels, strict=True))
    )
    for i, n in enumerate(names):
        write_image(folder / f"{source_split}_256" / n, value=i)
    data = DATASETS.get("places365")(tmp_path, "test", source_split=source_split)
    assert len(data) == 3
    assert [data[i][1] for i in range(3)] == [-1, -1, -1]  # an OOD set (torchvision gave None for test)
    assert torch.utils.data.default_collate([data[0][1], data[1][1]]).tolist() == [-1, -1]
    (folder / f"{source_split}_256" / names[-1]).unlink()  # a partial extract: the check names the first gap
    with pytest.raises(DatasetNotFoundError, match=f"missing {source_split}_256/{names[-1]}"):
        DATASETS.get("places365")(tmp_path, "test", source_split=source_split)
    other = "test" if source_split == "val" else "val"
    with pytest.raises(DatasetNotFoundError, match=f"{other}_256"):
        DATASETS.get("places365")(tmp_path, "test", source_split=other)


def test_textures_partial_extract_is_missing_data(tmp_path: Path) -> None:
    write_dtd(tmp_path)
    (tmp_path / "dtd" / "dtd" / "images" / "zigzagged" / "zigzagged_0002.jpg").unlink()  # the last of test1.txt
    with pytest.raises(DatasetNotFoundError, match=r"zigzagged_0002\.jpg"):
        DATASETS.get("textures")(tmp_path, "test")


def test_unreadable_image_names_its_file(tmp_path: Path) -> None:
    write_image(tmp_path / "isun" / "a.jpg", value=0)
    good = (tmp_path / "isun" / "a.jpg").read_bytes()
    (tmp_path / "isun" / "b.jpg").write_bytes(good[: len(good) // 2])  # a truncated download
    (tmp_path / "isun" / "c.jpg").write_bytes(b"")
    data = DATASETS.get("isun")(tmp_path, "test")
    with pytest.raises(UnreadableImageError, match=r"cannot read image '.*b\.jpg' \(Truncated File Read"):
        data[1]
    with pytest.raises(UnreadableImageError, match=r"cannot read image '.*c\.jpg' \(an empty file\); replace or"):
        data[2]


# ---------------------------------------------------------------------------------------------------------------
def test_folder_sets_read_every_image_at_any_depth(tmp_path: Path) -> None:
    write_image(tmp_path / "lsun_c" / "test" / "b.jpg", value=1)
    write_image(tmp_path / "lsun_c" / "test" / "a.png", value=2, mode="L")
    write_image(tmp_path / "lsun_c" / "c.JPEG", value=3)
    write_image(tmp_path / "lsun_c" / ".hidden" / "d.png")
    (tmp_path / "lsun_c" / "._e.jpg").write_bytes(b"macOS resource fork")
    (tmp_path / "lsun_c" / "README.txt").write_text("not an image")
    data = DATASETS.get("lsun_c")(tmp_path, "test")
    assert [p.name for p in data.files] == ["c.JPEG", "a.png", "b.jpg"]
    image, label = data[1]
    assert image.mode == "RGB"
    assert label == -1


def test_folder_readers_do_not_follow_a_link_back_up(tmp_path: Path) -> None:
    """os.walk(followlinks=True) would list every image below such a link dozens of times (until ELOOP)."""
    from gradreg.data.outliers import ImageFolderDataset

    write_image(tmp_path / "isun" / "test" / "a.png", value=0)
    write_image(tmp_path / "elsewhere" / "b.png", value=1)
    (tmp_path / "isun" / "test" / "up").symlink_to("..")  # a loop
    (tmp_path / "isun" / "linked").symlink_to(tmp_path / "elsewhere")  # an ordinary linked folder: read
    data = DATASETS.get("isun")(tmp_path, "test")
    assert [f.relative_to(tmp_path / "isun").as_posix() for f in data.files] == ["linked/b.png", "test/a.png"]
    write_image(tmp_path / "tree" / "c1" / "x.png", value=2)
    (tmp_path / "tree" / "c1" / "loop").symlink_to(tmp_path / "tree")
    assert len(ImageFolderDataset(tmp_path / "tree")) == 1


def test_folder_readers_do_not_follow_a_link_above_where_they_start(tmp_path: Path) -> None:
    # A class folder's link to its dataset's root listed another class's images under this class's label, and an OOD
    # set's link to the data root read another dataset's images as OOD test images.
    from gradreg.data.outliers import ImageFolderDataset

    write_image(tmp_path / "tree" / "a" / "x.png", value=0)
    write_image(tmp_path / "tree" / "b" / "z.png", value=1)
    (tmp_path / "tree" / "a" / "sub").mkdir()
    (tmp_path / "tree" / "a" / "sub" / "up").symlink_to("../..")
    data = ImageFolderDataset(tmp_path / "tree")
    listed = [(data.file(i).relative_to(tmp_path / "tree").as_posix(), int(data.labels[i])) for i in range(len(data))]
    assert listed == [("a/x.png", 0), ("b/z.png", 1)]  # was also ("a/sub/up/b/z.png", 0)
    write_image(tmp_path / "lsun_c" / "test" / "a.jpg", value=2)
    write_image(tmp_path / "other" / "secret.png", value=3)
    (tmp_path / "lsun_c" / "test" / "up").symlink_to("../..")
    assert [f.name for f in DATASETS.get("lsun_c")(tmp_path, "test").files] == ["a.jpg"]


def test_an_image_too_large_to_decode_names_its_file(tmp_path: Path) -> None:
    path = tmp_path / "isun" / "huge.png"
    path.parent.mkdir()
    Image.new("1", (30000, 30000)).save(path)  # 900 million pixels in a few kB: PIL refuses to decode it
    with pytest.raises(
        UnreadableImageError, match=r"cannot read image '.*huge\.png' \(Image size \(900000000 pixels\)"
    ):
        benchmarks.read_image(path)


def test_a_path_of_an_unknown_users_home_names_itself(tmp_path: Path) -> None:
    # Was "RuntimeError: Could not determine home directory.", naming neither the path nor the fix.
    with pytest.raises(ValueError, match=r"path '~no_such_user_gradreg/data': its user has no home directory"):
        benchmarks.resolve_path(tmp_path, "~no_such_user_gradreg/data", ".")


def test_read_list_file_takes_tabs_and_names_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("a.jpg\t3\nb.jpg  4\n")
    files, labels = read_list_file(tmp_path / "l.txt", tmp_path)
    assert ([f.name for f in files], labels) == (["a.jpg", "b.jpg"], [3, 4])  # was the path 'a.jpg\t3', label -1
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.jpg 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text .*; save the list as UTF-8"):
        read_list_file(tmp_path / "latin1.txt", tmp_path)


def test_a_broken_link_is_named_by_the_check_and_by_every_folder_reader(tmp_path: Path) -> None:
    """It counted as an image: the check said ok, and reading it raised a FileNotFoundError later (after training)."""
    from gradreg.data.check import check_dataset

    name = "isun"
    write_image(tmp_path / name / "test" / "a.png")
    link, target = tmp_path / name / "test" / "b.png", tmp_path / "moved.png"
    link.symlink_to(target)
    (tmp_path / name / "notes.txt").symlink_to(tmp_path / "moved.txt")  # not an image: not looked at
    why = f"it is a broken link (to {target}, which does not exist); fix or delete it"
    assert check_dataset(name, tmp_path, ["test"]) == (False, f"not found at {link}; {why}")
    with pytest.raises(DatasetNotFoundError, match=f"^{re.escape(f'dataset {name!r} not found at {link}; {why}')}$"):
        DATASETS.get(name)(tmp_path, "test")
    write_image(target)  # the link is whole again
    assert len(DATASETS.get(name)(tmp_path, "test")) == 2
    # the class trees: ImageNet (its val set is read after training) and the imagefolder pools
    for wnid in GREG_IMAGENET10:
        write_image(tmp_path / "imagenet" / "val" / wnid / "a.JPEG")
    link = tmp_path / "imagenet" / "val" / GREG_IMAGENET10[4] / "b.JPEG"
    link.symlink_to("../../gone.JPEG")
    why = "it is a broken link (to ../../gone.JPEG, which does not exist); fix or delete it"
    for spec in ("imagenet10", {"name": "imagefolder", "path": "imagenet/val"}):
        assert check_dataset(spec, tmp_path, ["test"]) == (False, f"not found at {link}; {why}")
        with pytest.raises(DatasetNotFoundError, match=re.escape(f"not found at {link}; {why}")):
            build_dataset(spec, tmp_path, "test")


@pytest.mark.parametrize("name", ["lsun_r", "isun", "inaturalist", "sun", "places", "ssb_hard", "ninco", "openimage_o"])
def test_every_folder_set_reads_its_folder(tmp_path: Path, name: str) -> None:
    write_image(tmp_path / name / "x" / "1.jpg")
    assert len(DATASETS.get(name)(tmp_path, "test")) == 1
    with pytest.raises(ValueError, match="list_file"):
        DATASETS.get(name)(tmp_path, "val")


def test_list_files_pin_a_subset_with_labels(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "images_largescale" / "ninco" / f"{i}.jpg", value=i)
    lists = tmp_path / "lists" / "imagenet"
    lists.mkdir(parents=True)
    (lists / "test_ninco.txt").write_text("# OpenOOD list\nninco/0.jpg -1\n\nninco/3.jpg {'label': 7}\nninco/2.jpg\n")
    data = DATASETS.get("ninco")(
        tmp_path, "test", list_file="lists/imagenet/test_ninco.txt", list_root="images_largescale"
    )
    assert [p.name for p in data.files] == ["0.jpg", "3.jpg", "2.jpg"]
    assert data.labels == [-1, 7, -1]
    # a list also serves as an OOD validation set
    assert (
        len(
            DATASETS.get("ninco")(
                tmp_path, "val", list_file="lists/imagenet/test_ninco.txt", list_root="images_largescale"
            )
        )
        == 3
    )


def test_list_file_with_missing_images_says_how_many(tmp_path: Path) -> None:
    write_image(tmp_path / "sun" / "a.jpg")
    (tmp_path / "l.txt").write_text("sun/a.jpg\nsun/b.jpg\nsun/c.jpg\n")
    with pytest.raises(DatasetNotFoundError, match="2 of 3 listed images are missing"):
        DATASETS.get("sun")(tmp_path, "test", list_file="l.txt")


def test_split_template_list_files_give_id_splits(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            write_image(tmp_path / "imagenet_1k" / split / f"{i}.JPEG", value=i)
        lines = "".join(f"imagenet_1k/{split}/{i}.JPEG {i}\n" for i in range(n))
        (tmp_path / f"{split}_imagenet.txt").write_text(lines)
    factory = DATASETS.get("imagenet1k")
    assert len(factory(tmp_path, "train", list_file="{split}_imagenet.txt")) == 3
    assert factory(tmp_path, "test", list_file="{split}_imagenet.txt").labels == [0, 1]
    with pytest.raises(ValueError, match="no val list"):  # the datamodule then holds out part of train
        factory(tmp_path, "val", list_file="{split}_imagenet.txt")


def test_read_list_file_rejects_bad_labels(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("a.jpg 1\nb.jpg one\n")
    with pytest.raises(ValueError, match=r"l\.txt:2"):
        read_list_file(tmp_path / "l.txt", tmp_path)


@pytest.mark.parametrize("extras", ["{'label': None}", "{'label': 1.7}", "{'label': '3'}", "{'label': True}"])
def test_read_list_file_rejects_labels_that_are_no_integers(extras: str, tmp_path: Path) -> None:
    """OpenOOD's extras dict must hold an int label: None was a TypeError naming no line, 1.7 silently became 1."""
    (tmp_path / "l.txt").write_text(f"a.jpg {{'label': 0}}\nb.jpg {extras}\n")
    with pytest.raises(ValueError, match=r"l\.txt:2: cannot read a label"):
        read_list_file(tmp_path / "l.txt", tmp_path)


def test_imagelist_reads_any_list(tmp_path: Path) -> None:
    write_image(tmp_path / "tin" / "x.png")
    (tmp_path / "val_tin.txt").write_text("tin/x.png 0\n")
    assert len(DATASETS.get("imagelist")(tmp_path, "val", list_file="val_tin.txt")) == 1


def test_tinyimagenet_zip_layout(tmp_path: Path) -> None:
    tin = tmp_path / "tinyimagenet" / "tiny-imagenet-200"
    write_image(tin / "val" / "images" / "val_0.JPEG", size=64)
    write_image(tin / "val" / "images" / "val_1.JPEG", size=64)
    write_image(tin / "train" / "n01443537" / "images" / "n01443537_0.JPEG", size=64)
    (tin / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01443537\t0\t0\t63\t63\n")
    assert len(DATASETS.get("tinyimagenet")(tmp_path, "test")) == 2
    assert len(DATASETS.get("tinyimagenet")(tmp_path, "train")) == 1


# ---------------------------------------------------------------------------------------------------------------
def test_imagenet_wnids_are_the_sorted_ilsvrc_classes() -> None:
    assert len(IMAGENET_WNIDS) == 1000 == len(set(IMAGENET_WNIDS))
    assert list(IMAGENET_WNIDS) == sorted(IMAGENET_WNIDS)
    assert IMAGENET_WNIDS[0] == "n01440764"
    assert IMAGENET_WNIDS[-1] == "n15075141"


def test_imagenet_subset_reproduces_the_official_greg_classes() -> None:
    assert imagenet_subset_wnids(10) == GREG_IMAGENET10
    # the official code's global-RNG form: class i is ID iff perm[i] < N, with label perm[i]
    state = np.random.get_state()
    try:
        np.random.seed(1993)
        perm = np.random.permutation(1000)
    finally:
        np.random.set_state(state)
    official = {IMAGENET_WNIDS[i]: int(perm[i]) for i in range(1000) if perm[i] < 50}
    assert {w: label for label, w in enumerate(imagenet_subset_wnids(50))} == official
    assert imagenet_subset_wnids(20)[:10] == GREG_IMAGENET10  # nested subsets


def test_imagenet10_reads_its_classes_in_label_order(tmp_path: Path) -> None:
    train = tmp_path / "imagenet" / "train"
    for k, wnid in enumerate(GREG_IMAGENET10):
        write_image(train / wnid / f"{wnid}_{k}.JPEG", value=k)
    write_image(train / GREG_IMAGENET10[3] / "extra.JPEG")
    for other in ("n01440764", "n15075141"):  # non-ID classes are ignored
        write_image(train / other / f"{other}_0.JPEG")
    data = DATASETS.get("imagenet10")(tmp_path, "train")
    assert len(data) == 11
    labels = {data.file(i).parent.name: int(y) for i, y in enumerate(data.labels)}
    assert labels == {w: k for k, w in enumerate(GREG_IMAGENET10)}
    x, y = Transformed(data, build_transform(ID_SPECS["imagenet10"]))[0]
    assert x.shape == (3, 224, 224)
    assert y == 0


def test_imagenet_missing_class_folders_are_named(tmp_path: Path) -> None:
    for wnid in GREG_IMAGENET10[:7]:
        write_image(tmp_path / "imagenet" / "val" / wnid / "a.JPEG")
    with pytest.raises(DatasetNotFoundError, match=r"3 of its 10 class folders are missing \(e\.g\. n01443537"):
        DATASETS.get("imagenet10")(tmp_path, "test")
    with pytest.raises(DatasetNotFoundError, match="993 of its 1000 class folders"):
        DATASETS.get("imagenet1k")(tmp_path, "test")


def test_imagenet_empty_class_folders_are_named(tmp_path: Path) -> None:
    """A failed valprep.sh leaves class folders empty: the check said ok, and a class had no test images."""
    from gradreg.data.check import check_dataset

    val = tmp_path / "imagenet" / "val"
    for wnid in GREG_IMAGENET10:
        (val / wnid).mkdir(parents=True)
    for wnid in GREG_IMAGENET10[:8]:
        write_image(val / wnid / "a.JPEG")
    write_image(val / "n01440764" / "a.JPEG")  # not an ID class
    empty = f"class folders hold no images: {GREG_IMAGENET10[8]}, {GREG_IMAGENET10[9]}; extract them again"
    why = f"2 of its 10 {empty} (ImageNet's val/: sort it again)"
    assert check_dataset("imagenet10", tmp_path, ["test"]) == (False, f"not found at {val}; {why}")
    with pytest.raises(DatasetNotFoundError, match=re.escape(why)):
        DATASETS.get("imagenet10")(tmp_path, "test")
    complement = {"name": "imagefolder_complement", "path": "imagenet/val", "id_classes": GREG_IMAGENET10[:1]}
    for spec, read in (({"name": "imagefolder", "path": "imagenet/val"}, 11), (complement, 10)):
        why = f"2 of its {read} {empty}"
        found, message = check_dataset(spec, tmp_path, ["train"], role="outliers")
        assert (found, message.startswith(f"not found at {val}; {why}")) == (False, True), message
        with pytest.raises(DatasetNotFoundError, match=re.escape(why)):
            build_dataset(spec, tmp_path, "train")


def test_imagenet1k_labels_follow_the_sorted_wnids(tmp_path: Path) -> None:
    val = tmp_path / "imagenet" / "val"
    image = write_image(tmp_path / "a.JPEG").read_bytes()
    for i, wnid in enumerate(IMAGENET_WNIDS):  # every class folder needs an image
        (val / wnid).mkdir(parents=True)
        (val / wnid / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(image)
    data = DATASETS.get("imagenet1k")(tmp_path, "test")
    assert data.labels.tolist() == list(range(1000))
    assert [data.file(i).parent.name for i in (1, 999)] == ["n01443537", "n15075141"]


def test_benchmarks_module_exports_exist() -> None:
    for name in benchmarks.__all__:
        assert hasattr(benchmarks, name)


@pytest.mark.usefixtures("skip_md5")
def test_datamodule_reads_benchmark_sets(tmp_path: Path) -> None:
    from gradreg.data import OODDataModule

    write_cifar10(tmp_path, per_batch=4)
    write_image(tmp_path / "lsun_c" / "test" / "0.jpg", size=36)
    dm = OODDataModule(
        id_dataset="cifar10",
        outliers=None,
        ood_sets=["lsun_c"],
        ood_val_sets=[],
        data_root=str(tmp_path),
        val_fraction=0.1,
    )
    assert len(dm.id_dataset_for("train")) == 18  # 2 of the 20 training images held out for val
    assert len(dm.id_dataset_for("val")) == 2
    x, y = dm.id_dataset_for("test")[3]
    assert x.shape == (3, 32, 32)
    assert y == 3
    ood = dm.ood_datasets("test")
    assert list(ood) == ["lsun_c"]
    assert ood["lsun_c"][0][0].shape == (3, 32, 32)
    assert dm.ood_datasets("val") == {}


@pytest.mark.usefixtures("skip_md5")
def test_ood_set_with_resize_false_is_center_cropped_only(tmp_path: Path) -> None:
    """GReg's detect.py reads LSUN-C with CenterCrop(32) alone: {name: lsun_c, resize: false} does the same."""
    from gradreg.data import OODDataModule
    from gradreg.data.check import check_dataset

    write_cifar10(tmp_path, per_batch=4)
    image = write_image(tmp_path / "lsun_c" / "0.png", size=36, value=7)
    specs = ["lsun_c", {"name": "lsun_c", "alias": "lsun_c_crop", "resize": False}]
    dm = OODDataModule(id_dataset="cifar10", outliers=None, ood_sets=specs, ood_val_sets=[], data_root=str(tmp_path))
    ood = dm.ood_datasets("test")
    pixels = torch.from_numpy(np.array(Image.open(image))[2:34, 2:34]).permute(2, 0, 1).float() / 255
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (dm.input_mean, dm.input_std))
    torch.testing.assert_close(ood["lsun_c_crop"][0][0], (pixels - mean) / std)
    assert not torch.allclose(ood["lsun_c"][0][0], (pixels - mean) / std, atol=1e-3)  # resized 36 -> 32
    assert check_dataset(specs[1], tmp_path, ["test"])[0]
    with pytest.raises(SettingError, match=r"^lsun_c_crop: resize='no' is not true or false"):
        check_dataset({**specs[1], "resize": "no"}, tmp_path, ["test"])
    with pytest.raises(SettingError, match=r"lsun_c_crop: resize='no' is not true or false"):
        OODDataModule(ood_sets=[{**specs[1], "resize": "no"}])
    with pytest.raises(SettingError, match=r"data.ood_val_sets: lsun_c_crop: resize='no' is not true or false"):
        OODDataModule(ood_val_sets=[{**specs[1], "resize": "no"}])
    with pytest.raises(SettingError, match=r"data.id_dataset: 'resize' applies to OOD sets only"):
        OODDataModule(id_dataset={"name": "cifar10", "resize": False})
    with pytest.raises(SettingError, match=r"^'resize' applies to OOD sets only \(ood_sets, ood_val_sets\)$"):
        check_dataset({"name": "cifar10", "resize": False}, tmp_path, ["test"], role="id")


@pytest.mark.parametrize(("image_size", "resize"), [(None, 256), (128, 146), (448, 512)])
def test_image_size_keeps_the_center_crop_ratio(image_size: int | None, resize: int) -> None:
    from gradreg.data import OODDataModule

    spec = OODDataModule(id_dataset="imagenet10", image_size=image_size).spec
    assert (spec.size, spec.resize) == (image_size or 224, resize)  # evaluation: Resize(resize) + CenterCrop(size)


@pytest.mark.usefixtures("skip_md5")
def test_validation_hold_out_is_a_seeded_subset_of_the_train_split(tmp_path: Path) -> None:
    from gradreg.data import OODDataModule

    write_cifar10(tmp_path, per_batch=4)  # 20 training images, no val split

    def carved(seed: int) -> tuple[list[int], list[int]]:
        dm = OODDataModule(
            id_dataset="cifar10", outliers=None, ood_sets=["lsun_c"], ood_val_sets=[], data_root=str(tmp_path),
            val_fraction=0.25, seed=seed,
        )  # fmt: skip
        return list(dm.id_dataset_for("val").dataset.indices), list(dm.id_dataset_for("train").dataset.indices)

    val, train = carved(0)
    assert len(val) == 5
    assert sorted(val + train) == list(range(20))  # disjoint, and together the whole train split
    assert val == sorted(val)
    assert train == sorted(train)
    assert carved(0) == (val, train)
    assert carved(1)[0] != val  # data.seed draws the hold-out


def test_imagenet_evaluation_resizes_to_256_then_takes_the_central_224() -> None:
    # The ImageNet protocol: Resize(256) + CenterCrop(224); a 256 x 256 image is only cropped, 16 px off each side.
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x = build_transform(ID_SPECS["imagenet10"])(Image.fromarray(pixels))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (benchmarks.IMAGENET_MEAN, benchmarks.IMAGENET_STD))
    expected = torch.from_numpy(pixels[16:240, 16:240]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(x * std + mean, expected, atol=1e-5, rtol=0)


def test_listed_counts_only_names_beyond_the_fourth() -> None:
    assert benchmarks._listed(["a", "b", "c", "d"]) == "a, b, c, d"
    assert benchmarks._listed(["a", "b", "c", "d", "e", "f"]) == "a, b, c, d and 2 more"


def test_read_idx_refuses_extra_data_and_other_element_types(tmp_path: Path) -> None:
    array = np.arange(2 * 3, dtype=np.uint8).reshape(2, 3)
    (tmp_path / "long").write_bytes(idx_bytes(array) + b"\x00")  # one byte more than the header's 2 x 3
    with pytest.raises(ValueError, match=re.escape("header says (2, 3) but the file holds a different amount")):
        read_idx(tmp_path / "long")
    floats = bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + np.float32(0.5).tobytes()  # type 0x0D: float32
    (tmp_path / "floats").write_bytes(floats)
    with pytest.raises(ValueError, match="is not a uint8 idx file"):
        read_idx(tmp_path / "floats")
