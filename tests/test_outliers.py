import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader, rank_zero_only
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from gradreg.data import outliers  # noqa: F401  (registers the pools)
from gradreg.data.datasets import (
    DATASETS,
    ID_SPECS,
    ArrayDataset,
    DatasetFileError,
    DatasetNotFoundError,
    ImageSpec,
    ToChannels,
    Transformed,
    _split_indices,
    build_dataset,
    build_transform,
    resizes,
)
from gradreg.data.outliers import ImageArray, ImageFolderDataset, OutlierStream, read_class_list


def _pool(n: int) -> Transformed:
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return Transformed(ArrayDataset(images, torch.zeros(n)), lambda x: x, return_index=True)


# --------------------------------------------------------------------------------------------- pools
def test_tinyimages_reader_memory_maps_the_npy_layout(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "tinyimages300k").mkdir()
    np.save(tmp_path / "tinyimages300k" / "300K_random_images.npy", images)

    ds = build_dataset("tinyimages300k", tmp_path, "train")
    assert len(ds) == 20
    assert isinstance(ds._array, np.memmap)
    image, label = ds[7]
    np.testing.assert_array_equal(image, images[7])
    assert label == -1
    assert image.flags.writeable
    assert len(pickle.dumps(ds)) < 2000  # workers get the path, not the array
    assert np.array_equal(pickle.loads(pickle.dumps(ds))[3][0], images[3])

    x = build_transform(_cifar_like_spec(), "crop_flip")(image)
    assert x.shape == (3, 32, 32)
    assert x.dtype == torch.float32
    # Also by folder or file path, absolute or relative to the data root.
    assert len(build_dataset({"name": "tinyimages300k", "path": "tinyimages300k"}, tmp_path, "train")) == 20
    file = str(tmp_path / "tinyimages300k" / "300K_random_images.npy")
    assert len(build_dataset({"name": "tinyimages300k", "path": file}, "/nonexistent", "train")) == 20


def _cifar_like_spec() -> ImageSpec:
    return ImageSpec(10, 3, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_tinyimages_reader_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"not found at .*300K_random_images\.npy"):
        build_dataset("tinyimages300k", tmp_path, "train")
    np.save(tmp_path / "floats.npy", np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(DatasetFileError, match=r"floats\.npy is unusable: expected a uint8 array .* got float32"):
        ImageArray(tmp_path / "floats.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(
        DatasetFileError, match=r"objects\.npy is unusable: expected a uint8 array .* got object"
    ):  # the header only: no unpickling
        ImageArray(tmp_path / "objects.npy")
    np.save(tmp_path / "empty_images.npy", np.zeros((5, 0, 0, 3), dtype=np.uint8))  # was accepted
    with pytest.raises(DatasetFileError, match=r"empty_images\.npy is unusable: .* got uint8 \(5, 0, 0, 3\)"):
        ImageArray(tmp_path / "empty_images.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(DatasetFileError, match=r"text\.npy is unusable: not a \.npy file"):
        ImageArray(tmp_path / "text.npy")
    pool = tmp_path / "tinyimages300k" / "300K_random_images.npy"
    pool.parent.mkdir()
    np.save(pool, np.zeros((4, 32, 32, 3), dtype=np.uint8))
    pool.write_bytes(pool.read_bytes()[:-100])  # an interrupted download: found by the data check, before a run
    with pytest.raises(DatasetFileError, match=r"is unusable: the file is truncated \(12316 of 12416 bytes\)"):
        build_dataset("tinyimages300k", tmp_path, "train")


def _png_tree(root: Path, counts: dict[str, int]) -> None:
    for c, (cls, n) in enumerate(counts.items()):
        (root / cls / "sub").mkdir(parents=True)
        for i in range(n):
            folder = root / cls / ("sub" if i % 2 else "")
            Image.fromarray(np.full((6, 5, 3), 10 * c + i, dtype=np.uint8)).save(folder / f"img{i}.png")
    (root / "n00000001" / ".hidden.png").write_bytes(b"")  # hidden files are skipped
    (root / "n00000001" / "notes.txt").write_text("not an image")


def test_imagefolder_complement_keeps_only_non_id_classes(tmp_path):
    tree = tmp_path / "imagenet" / "train"
    _png_tree(tree, {"n00000001": 3, "n00000002": 2, "n00000003": 4})
    (tmp_path / "id.txt").write_text("# ID classes\nn00000002 some name\n\n")
    spec = {"name": "imagefolder_complement", "id_classes_file": str(tmp_path / "id.txt")}

    ds = build_dataset(spec, tmp_path, "train")
    assert len(ds) == 7
    assert ds.classes == ["n00000001", "n00000003"]
    image, label = ds[4]
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == (5, 6)
    assert label == 1
    assert [ds.file(i).relative_to(ds.root).as_posix() for i in range(3)] == [
        "n00000001/img0.png", "n00000001/img2.png", "n00000001/sub/img1.png",
    ]  # fmt: skip
    pixels = sorted(int(np.asarray(ds[i][0])[0, 0, 0]) for i in range(len(ds)))
    assert pixels == [0, 1, 2, 20, 21, 22, 23]
    assert read_class_list(tmp_path / "id.txt") == ["n00000002"]
    # A class file relative to the data root, inline classes, and the registered locate function.
    assert len(build_dataset({**spec, "id_classes_file": "id.txt"}, tmp_path, "train")) == 7
    inline = {"name": "imagefolder_complement", "id_classes": ["n00000001", "n00000003"]}
    assert len(build_dataset(inline, tmp_path, "train")) == 2
    loc = DATASETS.get("imagefolder_complement").locate(root=tmp_path, split="train", id_classes=["n00000002"])
    assert loc.path == tree.absolute()

    (tmp_path / "bad.txt").write_text("n00000002\nn09999999\n")
    with pytest.raises(ValueError, match="n09999999"):
        build_dataset({**spec, "id_classes_file": str(tmp_path / "bad.txt")}, tmp_path, "train")
    with pytest.raises(ValueError, match="id_classes_file"):
        build_dataset({"name": "imagefolder_complement"}, tmp_path, "train")
    with pytest.raises(DatasetNotFoundError):
        build_dataset({**spec, "path": "missing"}, tmp_path, "train")


def test_imagefolder_reads_every_class_and_substitutes_the_split(tmp_path):
    _png_tree(tmp_path / "set" / "test", {"n00000001": 2, "zebra": 1})
    ds = build_dataset({"name": "imagefolder", "path": "set/{split}"}, tmp_path, "test")
    assert len(ds) == 3
    assert [ds[i][1] for i in range(3)] == [0, 0, 1]
    assert ImageFolderDataset(tmp_path / "set" / "test", mode="L")[2][0].mode == "L"
    with pytest.raises(ValueError, match="needs path"):
        build_dataset("imagefolder", tmp_path, "test")


# --------------------------------------------------------------------------------------------- stream
def _consume(stream: OutlierStream, loader: DataLoader, steps: int) -> list[list[int]]:
    """Imitate Lightning's max_size_cycle: re-iterate the loader when exhausted; advance after each step."""
    seen: list[list[int]] = []
    it = iter(loader)
    while len(seen) < steps:
        try:
            _, idx = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen.append(idx.tolist())
        stream.advance()
    return seen


def test_same_seed_same_outliers_and_fresh_passes():
    a, b, c = OutlierStream(_pool(50), 8, seed=1), OutlierStream(_pool(50), 8, seed=1), OutlierStream(_pool(50), 8, 2)
    seq_a = _consume(a, a.dataloader(), 12)
    assert seq_a == _consume(b, b.dataloader(), 12)
    assert seq_a != _consume(c, c.dataloader(), 12)
    assert a.batches_per_pass() == 6
    first, second = seq_a[:6], seq_a[6:12]
    assert len({i for batch in first for i in batch}) == 48  # no repeats within a pass
    assert first != second  # each pass is a fresh ordering


def test_batches_carry_the_pool_indices_of_their_images():
    stream = OutlierStream(_pool(30), 4, seed=0)
    for x, idx in stream.dataloader():
        torch.testing.assert_close(x.flatten(), idx.float())


def test_candidates_per_epoch_draws_a_fresh_subset_each_pass():
    stream = OutlierStream(_pool(100), 5, seed=0, candidates_per_epoch=20)
    loader = stream.dataloader()
    assert len(loader) == 4
    seq = _consume(stream, loader, 8)
    passes = [{i for b in seq[p * 4 : (p + 1) * 4] for i in b} for p in range(2)]
    assert all(len(p) == 20 for p in passes)
    assert passes[0] != passes[1]


def test_ranks_draw_disjoint_candidates():
    stream = OutlierStream(_pool(97), 4, seed=3)
    assert stream.batches_per_pass(world_size=3) == 8
    for position in range(20):
        batches = [set(stream.batch_indices(position, rank=r, world_size=3).tolist()) for r in range(3)]
        assert sum(len(b) for b in batches) == len(set().union(*batches)) == 12
    for rank in range(3):  # the loader follows the same rule
        loader = stream.dataloader(rank=rank, world_size=3)
        assert isinstance(loader.sampler, DistributedSampler)  # Lightning leaves it unwrapped under DDP
        assert next(iter(loader))[1].tolist() == stream.batch_indices(0, rank, 3).tolist()


def test_resume_mid_pass_draws_the_same_sequence():
    full = OutlierStream(_pool(43), 4, seed=7)
    expected = _consume(full, full.dataloader(max_batches=3), 25)

    first = OutlierStream(_pool(43), 4, seed=7)
    seen = _consume(first, first.dataloader(max_batches=3), 13)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = OutlierStream(_pool(43), 4, seed=7)
    resumed.load_state_dict(state)
    seen += _consume(resumed, resumed.dataloader(max_batches=5), 12)  # different chopping, same stream
    assert seen == expected


def test_loader_resumed_inside_an_epoch_yields_the_rest_of_it_first():
    full = OutlierStream(_pool(43), 4, seed=7)
    expected = _consume(full, full.dataloader(max_batches=5), 10)
    resumed = OutlierStream(_pool(43), 4, seed=7)
    resumed.load_state_dict(full.state_dict() | {"position": 2})  # checkpointed after 2 batches of epoch 0
    loader = resumed.dataloader(max_batches=5, drawn=2)
    assert len(loader) == 5  # Lightning counts the epoch's batches from the checkpoint's count on
    sizes = []
    for _ in range(2):
        sizes.append(sum(1 for _ in loader))
        for _ in range(sizes[-1]):
            resumed.advance()
    assert sizes == [3, 5]  # the rest of epoch 0, then epoch 1
    resumed.load_state_dict(full.state_dict() | {"position": 2})
    assert _consume(resumed, loader, 8) == expected[2:]


def test_worker_processes_do_not_change_the_stream():
    a, b = OutlierStream(_pool(40), 4, seed=0), OutlierStream(_pool(40), 4, seed=0)
    assert _consume(a, a.dataloader(num_workers=2), 14) == _consume(b, b.dataloader(), 14)


def test_augmentations_are_seeded_per_candidate_not_per_process():
    spec = ImageSpec(num_classes=2, size=8, channels=1, mean=(0.5,), std=(0.5,))
    images = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pool = Transformed(ArrayDataset(images, torch.zeros(40)), build_transform(spec, "crop_flip"), return_index=True)

    def pixels(num_workers: int) -> list[Tensor]:
        stream = OutlierStream(pool, 4, seed=0)
        batches = []
        for x, _ in stream.dataloader(num_workers=num_workers, max_batches=12):
            batches.append(x)
            stream.advance()
        return batches

    torch.manual_seed(0)
    in_process = pixels(0)
    assert torch.equal(torch.cat(in_process), torch.cat(pixels(2)))  # workers have other generators
    torch.manual_seed(1)
    assert torch.equal(torch.cat(in_process), torch.cat(pixels(0)))  # and so has the main process
    # Each candidate of each pass has a seed of its own (12 batches = 1.2 passes of 40: 8 images come back). Not
    # the pixels: 3 x 3 crops x 2 flips of an 8 x 8 image repeat by chance.
    seeds = [seed for position in range(12) for _, seed in OutlierStream(pool, 4, seed=0).batch_items(position)]
    assert len(set(seeds)) == len(seeds) == 48


def test_transformed_seeded_items_leave_the_global_generator_alone():
    spec = ImageSpec(num_classes=2, size=8, channels=1, mean=(0.5,), std=(0.5,))
    data = Transformed(ArrayDataset(torch.rand(3, 1, 8, 8), torch.zeros(3)), build_transform(spec, "crop_flip"))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = data[(1, 123)][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(data[(1, 123)][0], first)
    assert any(not torch.equal(data[(1, seed)][0], first) for seed in range(124, 130))


def test_restrict_draws_only_from_the_indices_and_survives_a_resume():
    stream = OutlierStream(_pool(60), 4, seed=0)
    _consume(stream, stream.dataloader(), 3)
    keep = torch.tensor([5, 9, 9, 11, 20, 21, 33, 40, 41, 50, 58, 59])
    stream.restrict(keep)
    assert stream.num_candidates == 11
    assert stream.batches_per_pass() == 2
    after = _consume(stream, stream.dataloader(), 5)
    assert {i for b in after for i in b} <= set(keep.tolist())

    replay = OutlierStream(_pool(60), 4, seed=0)
    _consume(replay, replay.dataloader(), 3)
    replay.restrict(keep)
    _consume(replay, replay.dataloader(), 2)
    resumed = OutlierStream(_pool(60), 4, seed=0)
    resumed.load_state_dict(replay.state_dict())
    assert _consume(resumed, resumed.dataloader(), 3) == after[2:]
    with pytest.raises(ValueError, match="fewer than one batch"):
        stream.restrict(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="pool of 60"):
        OutlierStream(_pool(61), 4).load_state_dict(replay.state_dict())


def test_stream_rejects_pools_smaller_than_a_pass():
    with pytest.raises(ValueError, match="fewer than one batch"):
        OutlierStream(_pool(3), 4)
    with pytest.raises(ValueError, match="rank"):
        OutlierStream(_pool(10), 4).batch_indices(0, world_size=3)
    with pytest.raises(ValueError, match="for each of 3 rank"):
        OutlierStream(_pool(10), 4).dataloader(world_size=3)


# --------------------------------------------------------------------------------------------- with Lightning
class _StreamData(LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.stream = OutlierStream(_pool(30), 4, seed=5)  # 7 batches per pass: cycles within an epoch

    def train_dataloader(self):
        ids = ArrayDataset(torch.randn(40, 3), torch.zeros(40, dtype=torch.long))
        id_loader = DataLoader(ids, batch_size=4, shuffle=True, drop_last=True)  # 10 batches per epoch
        return CombinedLoader({"id": id_loader, "outliers": self.stream.dataloader()}, mode="max_size_cycle")

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            self.stream.advance()
        return batch

    def state_dict(self):
        return {"outlier_stream": self.stream.state_dict()}

    def load_state_dict(self, state_dict):
        self.stream.load_state_dict(state_dict["outlier_stream"])


class _Recorder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["outliers"][1].tolist())
        return self.lin(batch["id"][0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path: Path, **kw) -> Trainer:
    return Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **kw,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("settings", "message"),
    [  # an ID set smaller than a batch per process trained no step ("this run trained no step" blamed the limits)
        (
            {"batch_size": 400},
            "data.batch_size=400 is more than the ID training set's 325 images per process (650 on 2)",
        ),
        # the pool check counts one batch, not one per process: a traceback on every rank
        ({"candidates_per_epoch": 40, "outlier_batch_size": 32}, "draws 40 candidates per pass (data.outliers' images"),
    ],
)
@pytest.mark.parametrize("rank", [0, 1])
def test_training_loader_refuses_sizes_short_of_a_batch_per_process(
    settings: dict, message: str, rank: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradreg.data import OODDataModule
    from gradreg.registry import SettingError

    monkeypatch.setenv("LOCAL_RANK", str(rank))  # the second process of a launched pair (no process group is needed)
    # The Trainer also sets Lightning's global rank_zero_only.rank; left at 1, every later rank_zero_warn in this
    # process would be silent.
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    dm = OODDataModule(**settings)
    dm.trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert (dm.trainer.world_size, dm.trainer.global_rank) == (2, rank)
    with pytest.raises(SettingError, match=re.escape(message)) as err:
        dm.train_dataloader()
    assert getattr(err.value, "silent", False) == (rank == 1)  # every rank raises it; rank 0 says it


def test_lightning_resume_mid_epoch_draws_the_same_outliers(tmp_path):
    straight = _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=13, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, callbacks=[ckpt]).fit(straight, datamodule=_StreamData())
    assert len(straight.seen) == 30

    resumed = _Recorder()
    _trainer(tmp_path, enable_checkpointing=False).fit(
        resumed, datamodule=_StreamData(), ckpt_path=str(tmp_path / "step=13.ckpt")
    )
    assert resumed.seen == straight.seen[13:]


def test_ranks_take_interleaved_blocks_of_each_pass():
    # the documented layout: block b * world + rank of a pass goes to rank (a contiguous split per rank also drew
    # disjoint candidates and passed test_ranks_draw_disjoint_candidates)
    stream = OutlierStream(_pool(97), 4, seed=3)
    single = torch.cat([stream.batch_indices(p, rank=0, world_size=1) for p in range(24)])  # one pass, one rank
    for position in range(8):
        for rank in range(3):
            block = position * 3 + rank
            assert stream.batch_indices(position, rank, 3).tolist() == single[block * 4 : block * 4 + 4].tolist()


def test_restrict_starts_a_fresh_pass():
    # restrict() starts a segment: its first per-pass batches cover the restriction exactly once, wherever the
    # stream stood (a position not reset at the segment start began mid-pass, repeating and skipping candidates)
    stream = OutlierStream(_pool(60), 4, seed=0)
    _consume(stream, stream.dataloader(), 5)
    keep = torch.arange(0, 60, 5)  # 12 indices = 3 batches per pass
    stream.restrict(keep)
    assert stream.restricted_at == 5
    drawn = [i for batch in _consume(stream, stream.dataloader(), 3) for i in batch]
    assert sorted(drawn) == keep.tolist()


def test_restrict_refuses_an_index_equal_to_the_pool_size():
    stream = OutlierStream(_pool(60), 4, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 60\)"):
        stream.restrict(torch.tensor([1, 2, 3, 60]))
    with pytest.raises(ValueError, match=r"\[0, 60\)"):
        stream.restrict(torch.tensor([-1, 2, 3, 4]))
    stream.restrict(torch.tensor([1, 2, 3, 59]))  # the last index is fine


def test_a_new_segment_draws_new_augmentation_seeds():
    # seeds come from (seed, segment, pass): a restriction's first pass must not replay the seeds of the pool's
    # first pass position by position
    stream = OutlierStream(_pool(40), 4, seed=0)
    before = [s for p in range(10) for _, s in stream.batch_items(p)]
    stream.restrict(None)  # a new segment at position 0 over the whole pool
    after = [s for p in range(10) for _, s in stream.batch_items(p)]
    assert len(set(before) & set(after)) == 0


def test_complement_with_a_class_listed_twice_keeps_the_rest(tmp_path):
    # the "covers every class" check counts distinct classes: a class named in the file and inline again is one class
    tree = tmp_path / "imagenet" / "train"
    _png_tree(tree, {"n00000001": 3, "n00000002": 2, "n00000003": 4})
    (tmp_path / "id.txt").write_text("n00000002\n")
    spec = {"name": "imagefolder_complement", "id_classes_file": str(tmp_path / "id.txt")}
    ds = build_dataset({**spec, "id_classes": ["n00000002", "n00000001"]}, tmp_path, "train")  # 3 names, 2 classes
    assert ds.classes == ["n00000003"]
    assert len(ds) == 4


def test_tinyimages_reader_takes_single_channel_arrays(tmp_path):
    # check_image_array accepts C in (1, 3): a grayscale (N, H, W, 1) array is a valid pool
    file = tmp_path / "gray.npy"
    np.save(file, np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1))
    pool = ImageArray(file, name="gray")
    assert len(pool) == 2
    image, label = pool[1]
    assert image.shape == (4, 4, 1)
    assert label == -1
    assert int(image[0, 0, 0]) == 16


# --------------------------------------------------------------------------------------------- embedded digits
def _sklearn_digits(classes: tuple[int, ...]) -> Counter:
    """The reference: (pixels scaled to [0, 1], label) of every scikit-learn digit of ``classes``, counted."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    keep = np.isin(bunch.target, classes)
    pixels = (bunch.images[keep] / 16.0).astype(np.float32)  # 4-bit counts 0..16
    return Counter((image.tobytes(), int(label)) for image, label in zip(pixels, bunch.target[keep], strict=True))


def _items(dataset) -> Counter:
    return Counter((x.squeeze(0).numpy().tobytes(), y) for x, y in dataset)


def test_digits_splits_partition_the_id_classes_60_20_20() -> None:
    splits = {s: build_dataset("digits", Path("data"), s) for s in ("train", "val", "test")}
    # every image of digits 0-5 in exactly one split, with its label and its pixels scaled to [0, 1]
    reference = _sklearn_digits((0, 1, 2, 3, 4, 5))
    assert _items(splits["train"]) + _items(splits["val"]) + _items(splits["test"]) == reference
    per_class = Counter(label for _, label in reference.elements())
    for split, fraction in (("train", 0.6), ("val", 0.2), ("test", 0.2)):  # stratified: each class in proportion
        counts = Counter(y for _, y in splits[split])
        assert all(abs(counts[c] - fraction * n) <= 1 for c, n in per_class.items()), (split, counts)


def test_digits_split_is_a_seeded_shuffle_of_each_class() -> None:
    labels = torch.tensor([0] * 50 + [1] * 50)
    first = _split_indices(labels, (0.6, 0.4), seed=0)
    assert [p.tolist() for p in first] == [p.tolist() for p in _split_indices(labels, (0.6, 0.4), seed=0)]
    # not the first 60 % of each class in file order (scikit-learn's digits come writer by writer)
    assert first[0].tolist() != [*range(30), *range(50, 80)]
    assert [p.tolist() for p in first] != [p.tolist() for p in _split_indices(labels, (0.6, 0.4), seed=1)]


def test_digits_spec_holds_the_statistics_of_the_training_split() -> None:
    pixels = build_dataset("digits", Path("data"), "train").images.double().numpy()
    spec = ID_SPECS["digits"]
    assert spec.mean[0] == pytest.approx(pixels.mean(), abs=1e-4)
    assert spec.std[0] == pytest.approx(pixels.std(), abs=1e-4)


def test_digits_outliers_and_held_out_sets_take_their_own_classes() -> None:
    pool = build_dataset("digits_outliers", Path("data"), "train")
    assert _items(pool) == _sklearn_digits((6, 7))  # every 6 and 7, labels kept
    val, test = (build_dataset("digits_heldout", Path("data"), s) for s in ("val", "test"))
    assert _items(val) + _items(test) == _sklearn_digits((8, 9))  # halves of the 8s and 9s, none in both
    assert abs(len(val) - len(test)) <= 2


def test_noise_sets_differ_by_split_and_stay_in_the_unit_range() -> None:
    for kind in ("uniform", "gaussian"):
        val, test = (
            build_dataset({"name": "noise", "kind": kind}, Path("data"), s, size=8, channels=1) for s in ("val", "test")
        )
        assert not torch.equal(val.images, test.images)  # per-epoch validation must not see the test images
        assert torch.equal(
            val.images, build_dataset({"name": "noise", "kind": kind}, Path("data"), "val", size=8, channels=1).images
        )
        assert val.images.min() >= 0
        assert val.images.max() <= 1
        assert (val.labels == -1).all()  # OOD: no ID label
    gaussian = build_dataset(
        {"name": "noise", "kind": "gaussian", "num": 4096}, Path("data"), "test", size=8, channels=1
    )
    assert gaussian.images.mean().item() == pytest.approx(0.5, abs=0.01)


def test_photo_patches_of_train_and_test_differ() -> None:
    pytest.importorskip("skimage")
    train, test = (build_dataset({"name": "photo_patches", "num": 8}, Path("data"), s) for s in ("train", "test"))
    assert not all(np.array_equal(train[i][0], test[i][0]) for i in range(8))


# --------------------------------------------------------------------------------------------- transforms
def test_to_one_channel_takes_the_itu_r_601_luma_as_pil_does() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    luma = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255  # L = .299 R + .587 G + .114 B
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(ToChannels(1)(x)[0], torch.from_numpy(luma), atol=1 / 255, rtol=0)
    gray = torch.rand(1, 4, 4)
    assert torch.equal(ToChannels(3)(gray), gray.expand(3, 4, 4))


def test_crop_shifts_a_cifar_image_by_at_most_4_pixels() -> None:
    # The CIFAR recipe of the energy / GReg code: RandomCrop(32, padding=4)
    spec = ImageSpec(num_classes=10, channels=1, size=32, mean=(0.0,), std=(1.0,))
    image = torch.zeros(1, 32, 32)
    image[0, 16, 16] = 1.0
    transform = build_transform(spec, "crop")
    shifts = set()
    torch.manual_seed(0)
    for _ in range(300):
        (row, col), *_ = torch.nonzero(transform(image)[0] == 1).tolist()
        shifts.add((row - 16, col - 16))
    assert {abs(r) for r, _ in shifts} | {abs(c) for _, c in shifts} == {0, 1, 2, 3, 4}


def test_crop_flip_flips_left_right_only() -> None:
    spec = ImageSpec(num_classes=2, channels=1, size=8, mean=(0.0,), std=(1.0,))
    rows = torch.arange(1, 9, dtype=torch.float32).view(1, 8, 1).expand(1, 8, 8) / 10  # brighter downwards
    cols = torch.arange(1, 9, dtype=torch.float32).view(1, 1, 8).expand(1, 8, 8) / 10  # brighter rightwards
    transform = build_transform(spec, "crop_flip")
    torch.manual_seed(0)
    flipped = 0
    for _ in range(40):
        by_row = transform(rows)[0].amax(1)
        assert (by_row[by_row > 0].diff() > 0).all()  # never upside down (0: a padding row)
        by_col = transform(cols)[0].amax(0)
        flipped += bool((by_col[by_col > 0].diff() < 0).all())
    assert 5 < flipped < 35  # mirrored left-right about half the time


def test_build_transform_refuses_an_unknown_augmentation() -> None:
    spec = ImageSpec(num_classes=2, channels=1, size=8, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="unknown augment 'flip'"):
        build_transform(spec, "flip")


def test_a_spec_mapping_is_resized_unless_it_says_resize_false() -> None:
    assert resizes("lsun_c")
    assert resizes({"name": "lsun_c", "alias": "lsun"})
    assert not resizes({"name": "lsun_c", "resize": False})


def test_photo_patches_are_square_crops_up_to_the_short_side() -> None:
    from gradreg.data.datasets import PhotoPatches

    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    patches = PhotoPatches([image], num=6, min_size=5, seed=0)  # the only side possible: the short side, 5
    for i in range(6):
        crop, k = patches[i]
        assert (crop.shape, k) == ((5, 5, 3), 0)
        assert any(np.array_equal(crop, image[:, left : left + 5]) for left in range(3))
