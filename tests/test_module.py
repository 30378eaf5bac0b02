"""GradRegModule: every method lowers its loss on the quickstart data; bf16 works; DDP with 2 CPU processes runs."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import pickle
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.tuner import Tuner

from gradreg.callbacks import OODEvalCallback, _gather
from gradreg.data import OODDataModule
from gradreg.data.datasets import build_dataset
from gradreg.data.module import EpochShuffle, Strided
from gradreg.double_backward.batchnorm import DoubleBackwardSyncBatchNorm
from gradreg.evaluation import ScoredSet
from gradreg.models import MODELS, SmallCNN
from gradreg.module import GradRegModule, NonFiniteLossError, UnsupportedSettingError
from gradreg.registry import SettingError
from gradreg.training import is_rank_zero

ROOT = Path(__file__).resolve().parents[1]


def make(method: str, **kw) -> tuple[GradRegModule, OODDataModule]:
    seed_everything(0)
    dm = OODDataModule(batch_size=32, outlier_batch_size=32, augment="none")
    model = GradRegModule(
        arch="small_cnn", arch_kwargs={"in_channels": 1, "width": 8}, num_classes=dm.num_classes, method=method,
        input_mean=dm.input_mean, input_std=dm.input_std, **{"lr": 0.05, "schedule": "constant", **kw},
    )  # fmt: skip
    return model, dm


def epoch_losses(model: GradRegModule, dm: OODDataModule, tmp_path: Path, epochs: int = 3, **trainer_kw) -> list[float]:
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="", version=""),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        **trainer_kw,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    rows = [line.split(",") for line in (tmp_path / "metrics.csv").read_text().splitlines()]
    col = rows[0].index("train/loss_epoch")
    return [float(r[col]) for r in rows[1:] if r[col]]


@pytest.mark.parametrize("method", ["ce", "oe", "energy", "greg", "absent"])
def test_each_method_lowers_its_loss(method: str, tmp_path: Path) -> None:
    model, dm = make(method)
    losses = epoch_losses(model, dm, tmp_path)
    assert len(losses) == 3
    assert losses[-1] < losses[0], losses


def test_absent_method_trains_on_k_plus_one_logits_and_predicts_among_k() -> None:
    # DOS/NTOM: cross-entropy over K+1 classes for ID images, label K (absent) for outliers; model(x) stays K-way.
    model, _ = make("absent")
    torch.manual_seed(0)
    x_id, y, x_out = torch.randn(5, 1, 8, 8), torch.randint(0, 6, (5,)), torch.randn(3, 1, 8, 8)
    out = model._forward_losses(x_id, y, x_out)
    head = model.model
    weight, bias = torch.cat([head.fc.weight, head.absent_fc.weight]), torch.cat([head.fc.bias, head.absent_fc.bias])
    logits = F.linear(head.features(torch.cat([x_id, x_out])), weight, bias)  # one (K+1)-way layer
    torch.testing.assert_close(out["loss/ce"], F.cross_entropy(logits[:5], y))
    torch.testing.assert_close(out["loss/absent"], F.cross_entropy(logits[5:], torch.full((3,), 6)))
    assert head(x_id).shape == (5, 6)


def test_trainer_predict_gives_the_eval_mode_logits_of_each_batch(tmp_path: Path) -> None:
    model, dm = make("greg")
    dm.setup("test")
    loader = torch.utils.data.DataLoader(dm.id_dataset_for("test"), batch_size=64)  # (images, labels) batches
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    batches = trainer.predict(model, dataloaders=loader)
    images = [x for x, _ in loader]
    assert len(batches) == len(images) > 1
    model.eval()  # BatchNorm's running statistics, as in the prediction
    with torch.no_grad():
        for got, x in zip(batches, images, strict=True):
            torch.testing.assert_close(got, model(x))
        bare = torch.utils.data.DataLoader(images[0], batch_size=64)  # batches of images alone
        assert torch.equal(trainer.predict(model, dataloaders=bare)[0], batches[0])


def test_float64_model_keeps_float64_cross_entropy() -> None:
    # "64-true" training: the loss must not be rounded to float32 (relative error ~1e-8) on the way
    model, _ = make("greg", m_in=-3.0, m_out=-1.0)
    model.double().eval()  # BatchNorm's running statistics: the rows do not depend on the outliers beside them
    torch.manual_seed(0)
    x_id, y, x_out = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 6, (5,)), torch.randn(3, 1, 8, 8)
    out = model._forward_losses(x_id, y, x_out.double())
    assert out["loss/ce"].dtype == out["loss"].dtype == torch.float64
    torch.testing.assert_close(out["loss/ce"], F.cross_entropy(model.model(x_id), y), rtol=1e-15, atol=0)


def test_greg_logs_every_loss_term_and_statistic(tmp_path: Path) -> None:
    model, dm = make("greg")
    epoch_losses(model, dm, tmp_path, epochs=1)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/ce_epoch", "train/energy_epoch", "train/reg_epoch", "train/grad_norm_id", "train/grad_norm_out",
                "train/hinge_active", "train/acc"):  # fmt: skip
        assert key in header, header


def test_zero_reg_weight_skips_the_double_backward(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import gradreg.module

    def fail(*args, **kwargs):
        raise AssertionError("grad_norm_penalty must not run with reg_weight=0")

    monkeypatch.setattr(gradreg.module, "grad_norm_penalty", fail)
    model, dm = make("greg", reg_weight=0.0)
    epoch_losses(model, dm, tmp_path, epochs=1)


def test_bf16_mixed_trains(tmp_path: Path) -> None:
    model, dm = make("greg", m_in=-3.0, m_out=-1.0)
    losses = epoch_losses(model, dm, tmp_path, epochs=2, precision="bf16-mixed")
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
@pytest.mark.parametrize("sampler", ["ntom", "poem"])
def test_pool_miners_scan_with_a_model_of_another_dtype(sampler: str, precision: str, tmp_path: Path) -> None:
    # The per-epoch scan fed the pool's float32 images to float64 / bfloat16 weights ("Input type ... should be the
    # same")
    model, dm = make("absent" if sampler == "ntom" else "energy", sampler=sampler)
    losses = epoch_losses(model, dm, tmp_path, epochs=1, precision=precision, limit_train_batches=2)
    assert len(losses) == 1
    assert math.isfinite(losses[0])


def test_arch_kwargs_bounds_judge_only_numeric_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # A user's model whose width is a list per stage: the bound width >= 1 gave "'>=' not supported between ..."
    class StagedCNN(SmallCNN):
        def __init__(self, num_classes: int = 10, in_channels: int = 1, width: list[int] | None = None) -> None:
            super().__init__(num_classes, in_channels, (width or [8])[0])

    monkeypatch.setitem(MODELS._items, "staged_cnn", StagedCNN)
    module = GradRegModule(arch="staged_cnn", num_classes=6, arch_kwargs={"in_channels": 1, "width": [4, 8]})
    assert module.model.trunk[0].out_channels == 4
    with pytest.raises(SettingError, match=re.escape("model.arch_kwargs.width=[0.5, 8] is not a list of integers")):
        GradRegModule(arch="staged_cnn", num_classes=6, arch_kwargs={"width": [0.5, 8]})


def test_settings_that_could_not_train_stop_in_one_line(tmp_path: Path) -> None:
    for settings, message in [
        ({"momentum": 0.0}, "model.nesterov=true needs a momentum, and model.momentum=0; set model.nesterov=false"),
        ({"schedule": "cosine", "lr": 1e-7}, "model.min_lr=1e-06 is above model.lr=1e-07: the cosine schedule would"),
        ({"milestones": [5.5]}, "model.milestones=[5.5] is not a list of integers or None"),
        ({"momentum": 9.0}, "model.momentum=9.0 must be < 1"),  # a typo of 0.9 diverged, and the NaN line blamed lr
        (
            {"sampler": {"name": "energy_cluster", "keep_start": 10, "keep_end": 5}},
            "keep_end=5 must be > keep_start=10",
        ),
        ({"sampler": {"name": "ntom", "quantile": 1.0}}, "quantile=1.0 skips the whole scanned window; it must be < 1"),
    ]:
        with pytest.raises(SettingError, match=re.escape(message)):
            GradRegModule(**settings)
    GradRegModule(momentum=0.0, nesterov=False)
    ignored = GradRegModule(schedule="constant", milestones=[3])  # evaluate.py rebuilds such a model without a word
    with pytest.warns(UserWarning, match=re.escape("model.milestones=[3] are ignored: model.schedule='constant'")):
        ignored.configure_optimizers()
    model, dm = make("energy")
    model.hparams.schedule = "cosine"
    with pytest.raises(SettingError, match=re.escape("model.schedule=cosine needs the run's length, and trainer.max")):
        epoch_losses(model, dm, tmp_path, epochs=-1)  # was OverflowError: cannot convert float infinity to integer


def _fit(tmp_path: Path, epochs: int, ckpt_path: Path | None = None, **settings) -> Trainer:
    model, dm = make("energy", **settings)
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, limit_train_batches=2, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_a_resume_compares_only_the_settings_the_checkpoint_restores(tmp_path: Path) -> None:
    # Lightning restores the optimizer's and scheduler's states: other values there were silently ignored
    _fit(tmp_path, 1, schedule="multistep", milestones=(1,)).save_checkpoint(tmp_path / "multistep.ckpt")
    with pytest.raises(
        SettingError, match=re.escape("model.gamma=0.5 differs from the resumed checkpoint's run (0.1)")
    ):
        _fit(tmp_path, 2, tmp_path / "multistep.ckpt", schedule="multistep", milestones=[1], gamma=0.5)
    _fit(tmp_path, 2, tmp_path / "multistep.ckpt", schedule="multistep", milestones=[1])  # a list as the tuple was
    # cosine reads neither milestones nor gamma; an lr of float32 precision is the same lr
    _fit(tmp_path, 1, schedule="cosine").save_checkpoint(tmp_path / "cosine.ckpt")
    _fit(tmp_path, 2, tmp_path / "cosine.ckpt", schedule="cosine", gamma=0.5, milestones=[], lr=np.float32(0.05))


def test_a_fit_after_lr_find_is_no_resume(tmp_path: Path) -> None:
    # lr_find restores its own checkpoint after configure_optimizers: the next fit took it for a resume and refused
    # the tuned learning rate ("model.lr=0.0464 differs from the resumed checkpoint's run (0.05)")
    model, dm = make("energy")
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    Tuner(trainer).lr_find(model, datamodule=dm, num_training=30, min_lr=1e-4, max_lr=1.0, early_stop_threshold=None)
    assert model.hparams.lr != 0.05
    trainer.fit(model, datamodule=dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == model.hparams.lr


def test_a_sampler_that_would_keep_no_outliers_stops_in_one_line(tmp_path: Path) -> None:
    # keep_start at the candidate count: every step trained on ID images only (train/energy_out nan), silently
    model, dm = make("greg", sampler={"name": "energy_cluster", "keep_start": 32})
    with pytest.raises(SettingError, match=re.escape("keeps no outlier of the data.outlier_batch_size=32 candidates")):
        epoch_losses(model, dm, tmp_path, epochs=1)
    # NTOM skipping nearly all of its window: the stream's restrict() error named no setting
    model, dm = make("absent", sampler={"name": "ntom", "quantile": 0.99})
    with pytest.raises(SettingError, match=r"model.sampler \(NTOMSampler\) kept \d+ pool images for this epoch, fewer"):
        epoch_losses(model, dm, tmp_path, epochs=1)


def test_channels_last_trains_like_contiguous(tmp_path: Path) -> None:
    # float64, so that the two layouts' different summation orders stay far below the tolerance
    expected = epoch_losses(*make("greg", m_in=-3.0, m_out=-1.0), tmp_path / "contiguous", 2, precision="64-true")
    model, dm = make("greg", m_in=-3.0, m_out=-1.0, channels_last=True)
    losses = epoch_losses(model, dm, tmp_path / "channels_last", 2, precision="64-true")
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # the first has one input channel
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-9, atol=0)


class _Drawn(Callback):
    """Per epoch, each training batch's ID labels and the sums of its augmented ID and outlier pixels."""

    def __init__(self) -> None:
        self.batches: dict[int, list[tuple]] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: GradRegModule, batch: dict, batch_idx: int) -> None:
        drawn = (batch["id"][1].tolist(), batch["id"][0].sum().item(), batch["outliers"][0].sum().item())
        self.batches.setdefault(trainer.current_epoch, []).append(drawn)


def _drawn(tmp_path: Path, epochs: int, num_workers: int, schedule: str, ckpt_path: Path | None = None) -> dict:
    model, dm = make("energy")  # seeds everything, as train.py does before a resumed run too
    dm.num_workers, dm.augment, model.hparams.schedule = num_workers, "crop", schedule
    drawn = _Drawn()
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[drawn],
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    trainer.save_checkpoint(tmp_path / f"{epochs}.ckpt")
    return drawn.batches


# A worker reads the first indices before Lightning's set_epoch; a cosine schedule builds the loader before the
# fit loop's epoch count is restored. The augmented pixels must match too, ID images and outliers.
@pytest.mark.parametrize(("schedule", "num_workers"), [("constant", 0), ("constant", 1), ("cosine", 1)])
def test_resumed_run_draws_the_id_batches_of_the_uninterrupted_run(
    schedule: str, num_workers: int, tmp_path: Path
) -> None:
    straight = _drawn(tmp_path, 3, num_workers, schedule)
    assert straight[0] != straight[1] != straight[2]  # a new order every epoch
    _drawn(tmp_path, 2, num_workers, schedule)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _drawn(tmp_path, 3, num_workers, schedule, tmp_path / "2.ckpt") == {2: straight[2]}
    # 2 -> 3 epochs: a cosine schedule is stretched (from the 2-epoch run's final lr, min_lr, back up)
    changed = [str(w.message) for w in caught if "model.schedule=cosine now spans" in str(w.message)]
    assert len(changed) == (schedule == "cosine")
    if changed:  # 20 steps an epoch; lr 0.05, min_lr 1e-6: the 2-epoch run ended at min_lr, 3 epochs give a quarter
        assert changed[0].startswith("model.schedule=cosine now spans 60 optimizer steps, the checkpoint's run 40 (")
        assert changed[0].endswith(
            "from step 40 on, its learning rate follows the new cosine (0.0125 there instead of 1e-06)"
        )


def test_resumed_greg_plus_run_ends_with_the_uninterrupted_runs_weights(tmp_path: Path) -> None:
    # Batches, augmentations, the sampler's k-means draws, dropout masks and the optimizer all resume: bitwise the
    # same weights.
    def fit(epochs: int, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
        model, dm = make("greg", sampler={"name": "energy_cluster", "num_clusters": 4})
        model.model.trunk.insert(3, torch.nn.Dropout(0.2))  # after the first conv-BN-ReLU block
        dm.num_workers, dm.augment = 1, "crop"
        trainer = Trainer(
            max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        trainer.save_checkpoint(tmp_path / f"{epochs}.ckpt")
        return model.state_dict()

    straight = fit(3)
    fit(2)
    resumed = fit(3, tmp_path / "2.ckpt")
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


# Periodic checkpoints (every_n_train_steps) in epoch 1, or after epoch 0's last batch, where Lightning goes on with
# epoch 1 (a loader with workers reads its first ID indices before set_epoch): the resumed run trains epoch 1 on the
# uninterrupted run's batches, with no "dataloader is not resumable" warning. NTOM must not mine again.
@pytest.mark.parametrize(
    ("method", "sampler", "schedule", "num_workers", "step"),
    [
        ("greg", "energy_cluster", "cosine", 1, 23),
        ("absent", "ntom", "constant", 0, 23),
        ("energy", "random", "constant", 1, 20),
    ],
)
def test_run_resumed_from_a_step_checkpoint_ends_with_the_uninterrupted_runs_weights(
    method: str, sampler: str, schedule: str, num_workers: int, step: int, tmp_path: Path
) -> None:
    def fit(ckpt_path: Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        model, dm = make(method, sampler={"name": sampler})
        model.hparams.schedule = schedule
        model.model.trunk.insert(3, torch.nn.Dropout(0.2))
        dm.num_workers, dm.augment = num_workers, "crop"
        drawn = _Drawn()
        snapshots = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=step, save_top_k=-1)
        trainer = Trainer(
            max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, callbacks=[drawn, snapshots],
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        assert not [w for w in caught if "not resumable" in str(w.message)]
        assert not [w for w in caught if "model.schedule=cosine now spans" in str(w.message)]  # the same length
        assert trainer.num_training_batches == 20  # so the step is in epoch 1 or at epoch 0's end
        return model.state_dict(), drawn.batches

    straight, straight_drawn = fit()
    resumed, resumed_drawn = fit(tmp_path / f"step={step}.ckpt")
    assert resumed_drawn == {1: straight_drawn[1][step - 20 :]}
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_loaders_leave_the_global_generator_alone(num_workers: int) -> None:
    # A loader draws its workers' base seed when an iterator starts: every epoch without workers, once per fit with
    # persistent ones. From the global generator, dropout would then depend on num_workers.
    dm = OODDataModule(batch_size=32, outlier_batch_size=32, augment="crop", num_workers=num_workers)
    loader = dm.train_dataloader()
    state = torch.get_rng_state()
    batch, *_ = next(iter(loader))
    assert set(batch) == {"id", "outliers"}
    assert torch.equal(torch.get_rng_state(), state)


def test_worker_processes_do_not_change_the_augmented_batches(tmp_path: Path) -> None:
    assert _drawn(tmp_path, 1, 2, "constant") == _drawn(tmp_path, 1, 0, "constant")


def test_id_augmentations_do_not_depend_on_the_number_of_ranks() -> None:
    dataset = range(23)
    alone = sorted(EpochShuffle(dataset, seed=5, epoch=2))
    shards = [list(EpochShuffle(dataset, seed=5, epoch=2, num_replicas=2, rank=r)) for r in range(2)]
    assert set(shards[0] + shards[1]) == set(alone)  # (index, seed): the padding repeats one pair
    assert [i for i, _ in alone] == list(range(23))
    assert len({seed for _, seed in alone}) == 23
    assert sorted(EpochShuffle(dataset, seed=5, epoch=3)) != alone  # fresh augmentations each epoch


def test_id_order_resumed_inside_an_epoch_goes_on_from_there() -> None:
    dataset = range(23)
    shard = list(EpochShuffle(dataset, seed=5, epoch=2, num_replicas=2, rank=1))
    resumed = EpochShuffle(dataset, seed=5, epoch=2, num_replicas=2, rank=1, drawn=4)
    assert list(resumed) == shard[4:]
    resumed.set_epoch(3)  # the next epoch is whole
    assert list(resumed) == list(EpochShuffle(dataset, seed=5, epoch=3, num_replicas=2, rank=1))


def test_greg_gives_sync_batchnorm_layers_a_double_backward(tmp_path: Path) -> None:
    # What sync_batchnorm leaves in the model under DDP; in one process SyncBatchNorm normalizes like BatchNorm.
    model, dm = make("greg")
    model.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.model)
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(layers) == 3
    assert all(type(m) is DoubleBackwardSyncBatchNorm for m in layers)
    assert trainer.global_step == 2


def test_cosine_schedule_decays_to_min_lr(tmp_path: Path) -> None:
    model, dm = make("energy")
    model.hparams.schedule, model.hparams.min_lr = "cosine", 1e-4
    epoch_losses(model, dm, tmp_path, epochs=1)
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_ddp_two_cpu_processes_train(tmp_path: Path, launcher: str) -> None:
    """Lightning's launcher re-executes train.py per rank, torchrun starts each rank itself: one run folder each way."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    start = [sys.executable, *(torchrun if launcher == "torchrun" else [])]
    args = [
        *start, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--run.root", str(tmp_path / "runs"), "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["latest", "quickstart-001"], "all ranks must share one run directory"
    assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / "runs" / "quickstart-001").resolve()
    assert (tmp_path / "runs" / "quickstart-001" / "last.ckpt").is_file()
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports it
    assert "sync_dist" not in proc.stderr  # train/* values are reduced over the ranks
    dm = OODDataModule()  # the quickstart's ID data
    n_val = len(dm.id_dataset_for("val"))
    with open(tmp_path / "runs" / "quickstart-001" / "metrics.csv") as f:
        (acc,) = [float(row["val/acc"]) for row in csv.DictReader(f) if row.get("val/acc")]
    assert acc * n_val == pytest.approx(round(acc * n_val), abs=1e-6)  # correct / 217, not / 218 with a padded shard


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_ddp_with_sync_batchnorm_trains_greg_on_a_gpu(tmp_path: Path, precision: str) -> None:
    """GReg's double backward through DDP's reducer (NCCL) and its SyncBatchNorm layers: a whole train.py run."""
    args = [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--run.root", str(tmp_path / "runs"), "--trainer.accelerator", "gpu", "--trainer.strategy", "ddp",
        "--trainer.devices", "1", "--trainer.sync_batchnorm", "true", "--trainer.precision", precision,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.logger", "false",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "runs" / "quickstart-001" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_an_empty_eval_set_gives_an_empty_loader() -> None:
    # val_fraction 0 on a set without a val split (CIFAR, as the official code trains on all 50,000 images)
    assert len(OODDataModule()._eval_shard(torch.utils.data.Subset(range(5), []))) == 0


@pytest.mark.parametrize(("n", "world"), [(217, 2), (217, 3), (2, 3)])
def test_eval_shards_hold_every_item_once(n: int, world: int) -> None:
    shards = [list(Strided(range(n), world, rank)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))  # no padding duplicates
    assert [len(Strided(range(n), world, rank)) for rank in range(world)] == [len(shard) for shard in shards]


POISON = """
from lightning.pytorch import Callback


class Poison(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:  # a NaN loss on rank 1 only
            batch["id"][0].fill_(float("nan"))
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_ddp_nan_loss_on_one_rank_stops_every_rank_in_one_line(tmp_path: Path, launcher: str) -> None:
    """Every rank stops at the same step (no rank waits in a collective) and only rank 0 prints the error line."""
    (tmp_path / "poison.py").write_text(POISON)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [
        sys.executable, *(torchrun if launcher == "torchrun" else []), str(ROOT / "train.py"),
        "--config", str(ROOT / "configs" / "quickstart.yaml"), "--run.root", str(tmp_path / "runs"),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "4", "--trainer.logger", "false", "--trainer.callbacks+=poison.Poison",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]  # rank 0 says it; rank 1 stops silently
    assert "non-finite training loss on rank 1" in errors[0], errors
    assert "Connection closed by peer" not in proc.stderr, proc.stderr[-3000:]  # rank 0 stopped too, not in gloo
    assert not (tmp_path / "runs" / "latest").exists()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, True),
        ({"RANK": "1"}, True),  # left over from another job: a process alone is rank 0
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, False),
        ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, False),  # torchrun, second node
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "NODE_RANK": "0"}, True),  # Lightning's launcher
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "NODE_RANK": "0"}, False),
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # Lightning's launcher, second node
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "0"}, False),  # Lightning's launcher with RANK=0 exported
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}, False),  # inside one SLURM task
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, True),  # srun
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}, False),
    ],
)
def test_is_rank_zero_reads_the_launchers_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: bool
) -> None:
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_rank_zero() is expected


DDP_EVAL = """
import json, sys
from lightning.pytorch import Trainer, seed_everything
from gradreg.callbacks import OODEvalCallback
from gradreg.data import OODDataModule
from gradreg.module import GradRegModule

seed_everything(0)
dm = OODDataModule(eval_batch_size=50)
model = GradRegModule(arch_kwargs={"in_channels": 1, "width": 8}, num_classes=6,
                      input_mean=dm.input_mean, input_std=dm.input_std)


def validate(devices, strategy, callback):
    trainer = Trainer(devices=devices, strategy=strategy, accelerator="cpu", logger=False, callbacks=[callback],
                      enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    return trainer.is_global_zero, {k: float(v) for k, v in metrics.items() if k.startswith("ood/")}


def callback(max_samples):
    return OODEvalCallback(scorers=["energy", "odin"], max_samples=max_samples)


out = sys.argv[1]
if sys.argv[2:] == ["ddp"]:  # Lightning's launcher runs this script again as rank 1
    is_zero, metrics = validate(2, "ddp", callback(151))
    if is_zero:
        json.dump({"ddp": metrics}, open(out, "w"))
else:
    cached = callback(151)
    results = {"one": validate(1, "auto", cached)[1], "whole": validate(1, "auto", callback(10_000))[1]}
    # the callback has cached one device's whole sets; the forked ranks inherit them
    results["reuse"] = validate(2, "ddp_fork", cached)[1]
    json.dump(results, open(out, "w"))
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_callback_under_ddp_matches_one_device(tmp_path: Path) -> None:
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_EVAL)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    results = {}
    # 151: odd, a random sample of each set; "reuse": the callback of the one-device run then runs on two processes
    for mode in ([], ["ddp"]):
        out = tmp_path / f"metrics{''.join(mode)}.json"
        args = [sys.executable, str(script), str(out), *mode]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "sync_dist" not in proc.stderr, proc.stderr[-3000:]  # no warning per ood/* key
        results |= json.loads(out.read_text())
    one = results["one"]
    assert one.keys() == results["ddp"].keys() == results["whole"].keys() == results["reuse"].keys()
    assert "ood/digits_heldout/odin/auroc" in one
    for key, value in one.items():
        assert results["ddp"][key] == pytest.approx(value, abs=1e-6), key
        assert results["reuse"][key] == pytest.approx(value, abs=1e-6), key  # each rank scored its shard, not the cache
    assert one != results["whole"]  # the sample is a part of each set


@pytest.mark.parametrize("method", ["greg", "absent"])
def test_callback_scores_absent_only_for_an_absent_class_model(method: str, tmp_path: Path) -> None:
    model, dm = make(method)
    trainer = Trainer(
        accelerator="cpu", logger=False, callbacks=[OODEvalCallback(scorers=["energy", "absent"], max_samples=32)],
        enable_progress_bar=False, limit_val_batches=1, default_root_dir=tmp_path,
    )  # fmt: skip
    if method == "greg":  # before any scoring, in one line naming the scorer and the fix
        with pytest.raises(SettingError, match=r"scorer 'absent': .* needs a model trained with model.method=absent"):
            trainer.validate(model, datamodule=dm, verbose=False)
    else:
        trainer.validate(model, datamodule=dm, verbose=False)
        assert 0 <= trainer.callback_metrics["ood/noise/absent/auroc"] <= 1


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_callback_scores_a_model_of_another_dtype(precision: str, tmp_path: Path) -> None:
    model, dm = make("ce")
    trainer = Trainer(
        accelerator="cpu", logger=False, callbacks=[OODEvalCallback(scorers=["energy", "gradnorm"], max_samples=32)],
        enable_progress_bar=False, limit_val_batches=1, default_root_dir=tmp_path, precision=precision,
    )  # fmt: skip
    trainer.validate(model, datamodule=dm, verbose=False)
    assert 0 <= trainer.callback_metrics["ood/noise/gradnorm/auroc"] <= 1


def test_callback_in_fit_validate_and_test_restores_train_mode(tmp_path: Path) -> None:
    model, dm = make("greg")
    callback = OODEvalCallback(scorers=["msp", "energy", "odin", "gaia_z"], max_samples=64)
    seen_modes = []

    class Spy(OODEvalCallback):
        def evaluate(self, trainer, pl_module, split):
            before = pl_module.model.training
            result = super().evaluate(trainer, pl_module, split)
            seen_modes.append((before, pl_module.model.training))
            return result

    spy = Spy(scorers=callback.scorer_specs, max_samples=64)
    trainer = Trainer(
        max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[spy], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert model.model.training, "fit must leave the model in train mode"
    assert trainer.callback_metrics["ood/digits_heldout/odin/auroc"] >= 0
    # Lightning's default inference_mode=True in validate/test: gradient scorers must still work.
    trainer_im = Trainer(accelerator="cpu", logger=False, callbacks=[spy], enable_progress_bar=False)
    trainer_im.validate(model, datamodule=dm, verbose=False)
    trainer_im.test(model, datamodule=dm, verbose=False)
    assert "ood/noise/gaia_z/auroc" in trainer_im.callback_metrics
    assert len(seen_modes) == 3
    assert all(before == after for before, after in seen_modes)


def _fake_trainer(dm: OODDataModule):
    class FakeTrainer:
        datamodule, global_rank, world_size, is_global_zero, loggers = dm, 0, 1, True, []
        global_step, current_epoch = 0, 0

    return FakeTrainer()


def _wandb_records(folder: Path, expected: bytes) -> bytes:
    """The offline run's records, once ``expected`` is among them or after 30 s.

    wandb's service process can still be writing the file when ``finish()`` returns (seen under load: only the
    8-byte header was there); the callback logs the table and the histograms in one record.
    """
    deadline = time.monotonic() + 30
    while True:
        records = next(folder.glob("wandb/offline-run-*/*.wandb")).read_bytes()
        if expected in records or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


@pytest.mark.parametrize("bias", [5e14, math.inf])
def test_callback_histograms_survive_a_diverged_model(bias: float, tmp_path: Path) -> None:
    # Every image gets the same huge energy (numpy cannot cut [E - 0.5, E + 0.5] into 64 bins at 5e14), or inf/NaN.
    model, dm = make("ce")
    model.log_dict = lambda values, **kw: None
    with torch.no_grad():
        model.model.fc.weight.zero_()
        model.model.fc.bias.zero_()
        model.model.fc.bias[0] = bias
    trainer = _fake_trainer(dm)
    trainer.loggers = [WandbLogger(save_dir=str(tmp_path), offline=True)]
    with pytest.warns(UserWarning, match="NaN") if math.isinf(bias) else contextlib.nullcontext():
        OODEvalCallback(scorers=["energy", "msp"], cache_mb=0).evaluate(trainer, model, "val")
    trainer.loggers[0].experiment.finish()
    records = _wandb_records(tmp_path, b"ood/table")
    assert b"ood/table" in records
    assert b"hist/id/energy" not in records
    assert (b"hist/id/msp" in records) == math.isfinite(bias)  # all 1.0, or all NaN


def test_callback_cache_gives_the_same_numbers_and_respects_its_cap() -> None:
    model, dm = make("ce")
    logged: list[dict] = []
    model.log_dict = lambda values, **kw: logged.append(dict(values))
    cached, uncached = (
        OODEvalCallback(scorers=["energy", "odin"]),
        OODEvalCallback(scorers=["energy", "odin"], cache_mb=0),
    )
    for callback in (cached, cached, uncached):
        callback.evaluate(_fake_trainer(dm), model, "val")
    assert logged[0] == logged[1] == logged[2]
    assert set(cached._cache) == {("val", "id"), ("val", "digits_heldout"), ("val", "noise")}
    assert not uncached._cache
    assert not pickle.loads(pickle.dumps(cached))._cache  # ddp_spawn pickles it into every process


def test_callback_cache_holds_no_tensor_a_loader_worker_shared() -> None:
    # Each tensor received from a worker keeps a file descriptor open (file_descriptor sharing): 500 cached batches
    # ran training into "Too many open files" under the usual limit of 1024.
    model, dm = make("ce")
    dm.num_workers = 1
    callback = OODEvalCallback(scorers=["energy"])
    callback.evaluate(_fake_trainer(dm), model, "val")
    cached = [t for batches in callback._cache.values() for batch in batches for t in batch]
    assert cached
    assert not any(t.is_shared() for t in cached)


def test_callback_leaves_the_global_rng_alone() -> None:
    # A loader draws its base seed from the global generator; drawing it would change the next epoch's shuffling.
    model, dm = make("ce")
    model.log_dict = lambda values, **kw: None
    state = torch.get_rng_state()
    OODEvalCallback(scorers=["energy", "odin"], cache_mb=0).evaluate(_fake_trainer(dm), model, "val")
    assert torch.equal(torch.get_rng_state(), state)


def test_callback_cache_starts_afresh_for_another_datamodule() -> None:
    model, _ = make("ce")
    logged: list[dict] = []
    model.log_dict = lambda values, **kw: logged.append(dict(values))
    uniform = OODDataModule(batch_size=32, augment="none")
    gaussian = OODDataModule(batch_size=32, augment="none", ood_val_sets=[{"name": "noise", "kind": "gaussian"}])
    callback = OODEvalCallback(scorers=["msp"])
    callback.evaluate(_fake_trainer(uniform), model, "val")
    callback.evaluate(_fake_trainer(gaussian), model, "val")
    fresh = OODEvalCallback(scorers=["msp"])
    fresh.evaluate(_fake_trainer(gaussian), model, "val")
    key = "ood/noise/msp/auroc"
    assert logged[1][key] == logged[2][key] != logged[0][key]


def test_callback_setup_names_what_a_users_own_module_or_datamodule_lacks() -> None:
    # In a user's own Trainer these failed with AttributeErrors ('...' object has no attribute 'model' /
    # 'id_dataset_for'), the datamodule and forward-only-model ones only after the first training epoch.
    from lightning.pytorch import LightningDataModule, LightningModule

    model, dm = make("ce")
    callback = OODEvalCallback(scorers=["odin", "gaia_z"])
    callback.setup(_fake_trainer(dm), model, "fit")  # gradreg's own module and datamodule

    class UserModule(LightningModule):
        def __init__(self, **modules: torch.nn.Module) -> None:
            super().__init__()
            for name, module in modules.items():
                setattr(self, name, module)

    with pytest.raises(SettingError, match=r"scores pl_module.model, .* UserModule has no nn.Module attribute 'model'"):
        callback.setup(_fake_trainer(dm), UserModule(net=model.model), "fit")
    with pytest.raises(SettingError, match=r"trainer.datamodule, and there is none: pass a gradreg.data.OODDataModule"):
        callback.setup(_fake_trainer(None), model, "fit")
    with pytest.raises(SettingError, match=r"and LightningDataModule has no id_dataset_for, ood_datasets, eval_batch"):
        callback.setup(_fake_trainer(LightningDataModule()), model, "fit")
    forward_only = torch.nn.Sequential(model.model.trunk, model.model.fc)  # enough for odin and gaia_z themselves
    with pytest.raises(SettingError, match=r"OODEvalCallback: Sequential has no features and no fc"):
        callback.setup(_fake_trainer(dm), UserModule(model=forward_only), "fit")
    batch_stats = make("ce")[0]
    batch_stats.model.trunk[1] = torch.nn.BatchNorm2d(
        batch_stats.model.trunk[1].num_features, track_running_stats=False
    )
    with pytest.raises(SettingError, match=r"OODEvalCallback: BatchNorm2d 'trunk.1' has no running statistics"):
        callback.setup(_fake_trainer(dm), batch_stats, "fit")  # was a ValueError at the first evaluation


@pytest.mark.parametrize(
    ("setting", "value", "least"),
    [("every_n_epochs", 0, 1), ("max_samples", 0, 1), ("every_n_epochs", 1.5, 1), ("cache_mb", -1, 0),
     ("cache_mb", None, 0), ("max_samples", True, 1)],
)  # fmt: skip
def test_callback_rejects_bad_settings(setting: str, value: object, least: int) -> None:
    # cache_mb=-1 silently cached nothing, cache_mb=None failed at the first evaluation (a TypeError)
    with pytest.raises(SettingError, match=rf"OODEvalCallback: {setting}={value} must be an integer >= {least}"):
        OODEvalCallback(**{setting: value})
    OODEvalCallback(cache_mb=0, max_samples=None)


def test_callback_rejects_a_histograms_setting_that_is_not_a_bool() -> None:
    with pytest.raises(SettingError, match=r"OODEvalCallback: histograms='false' must be true or false"):
        OODEvalCallback(histograms="false")  # was truthy: histograms were logged


def test_callback_warns_when_there_are_no_ood_sets() -> None:
    model, _ = make("ce")
    model.log_dict = lambda values, **kw: None
    dm = OODDataModule(batch_size=32, augment="none", ood_val_sets=[])
    callback = OODEvalCallback(scorers=["msp"])
    with pytest.warns(UserWarning, match=r"no OOD val sets \(data.ood_val_sets is empty\)"):
        callback.evaluate(_fake_trainer(dm), model, "val")


def test_constructors_check_values_but_accept_what_python_callers_pass() -> None:
    dm = OODDataModule(data_root=Path("data"), ood_sets=("noise",), batch_size=np.int64(8), mean=(0.5,), std=(0.5,))
    assert dm.batch_size == 8
    GradRegModule(
        lr=np.float32(0.1), milestones=(1, 2), arch_kwargs={"in_channels": 1}, input_mean=[0.3], input_std=[0.3]
    )
    GradRegModule(method="ce", m_in=0.0, m_out=-7.0, arch_kwargs={"in_channels": 1})  # margins unused by ce
    for bad, message in [
        ({"batch_size": True}, "data.batch_size=True is not an integer"),
        ({"batch_size": 0}, "data.batch_size=0 must be >= 1"),
        ({"augment": "cropp"}, "data.augment='cropp' is not one of none, crop, crop_flip, imagenet"),
    ]:
        with pytest.raises(SettingError, match=re.escape(message)):
            OODDataModule(**bad)
    with pytest.raises(
        SettingError, match=re.escape("model.lr='1e-3' is not a number (YAML reads it as text: write 0.001)")
    ):
        GradRegModule(lr="1e-3")
    with pytest.raises(
        SettingError, match=re.escape("model.milestones=5 is not a list of integers or None (write a list: [5])")
    ):
        GradRegModule(schedule="multistep", milestones=5)  # --model.milestones 5
    with pytest.raises(
        SettingError, match=re.escape("data.mean=0.5 is not a list of numbers or None (write a list: [0.5])")
    ):
        OODDataModule(mean=0.5)
    with pytest.raises(SettingError, match=re.escape("model.reg_weight=inf must be finite")):
        GradRegModule(reg_weight=float("inf"))  # YAML's .inf
    with pytest.raises(SettingError, match=re.escape("model.input_std=[0.3, nan] must be finite")):
        GradRegModule(input_std=[0.3, math.nan])
    GradRegModule(milestones=[10**400])  # an int is finite however large (math.isfinite would overflow)
    with pytest.raises(SettingError, match=re.escape("model.m_in=0.0 must be <= model.m_out=-7.0")):
        GradRegModule(method="greg", m_in=0.0, m_out=-7.0, arch_kwargs={"in_channels": 1})


@pytest.mark.parametrize("sampler", ["dos", {"name": "energy_cluster", "two_way": True}, "ntom", "poem"])
def test_ce_refuses_an_outlier_sampler_it_would_ignore(sampler: str | dict) -> None:
    # ce forwards no outliers: the sampler was built and silently never used.
    with pytest.raises(SettingError, match=re.escape(f"model.sampler={sampler!r} selects outliers, and model.method")):
        GradRegModule(method="ce", sampler=sampler, arch_kwargs={"in_channels": 1})
    for default in ("random", {"name": "random"}):
        assert GradRegModule(method="ce", sampler=default, arch_kwargs={"in_channels": 1}).method == "ce"
    GradRegModule(method="oe", sampler=sampler, arch_kwargs={"in_channels": 1})  # an outlier method uses it


def test_a_users_trainer_matches_the_datamodules_classes_and_normalization(tmp_path: Path) -> None:
    # train.py links num_classes, input_mean and input_std from the datamodule; in a user's own Trainer a module built
    # without them silently trained 10 logits on the 6 digit classes, with normalization buffers of mean 0, std 1.
    dm = OODDataModule(batch_size=32, outlier_batch_size=32, augment="none")
    trainer_kw = {
        "max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1, "accelerator": "cpu", "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
    }  # fmt: skip
    arch = {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 8}}
    with pytest.raises(SettingError, match=r"num_classes=10 but the datamodule's ID data has 6 classes; build it wit"):
        Trainer(**trainer_kw).fit(GradRegModule(**arch, method="ce"), datamodule=dm)
    model = GradRegModule(**arch, num_classes=dm.num_classes, method="ce")
    Trainer(**trainer_kw).fit(model, datamodule=dm)
    assert model.model.input_std.tolist() == pytest.approx(dm.input_std)
    assert model.model.input_mean.tolist() == pytest.approx(dm.input_mean)
    assert model.hparams.input_std == pytest.approx(dm.input_std)  # the checkpoint's hyperparameters say it too
    wrong = GradRegModule(**arch, num_classes=dm.num_classes, method="ce", input_mean=[0.0], input_std=[1.0])
    with pytest.raises(SettingError, match=r"input_std=\[1.0\] but the datamodule normalizes with mean"):
        Trainer(**trainer_kw).validate(wrong, datamodule=dm)
    three = GradRegModule(arch="small_cnn", arch_kwargs={"in_channels": 3, "width": 8}, num_classes=6, method="ce")
    with pytest.raises(ValueError, match=r"the data has 1 input channel\(s\) but the model takes 3"):
        Trainer(**trainer_kw).fit(three, datamodule=dm)


@pytest.mark.parametrize("method", ["oe", "greg"])
def test_an_outlier_method_without_outliers_stops_in_one_line(method: str) -> None:
    # Was a TypeError at the first step ("list indices must be integers or slices, not str"), train.py included.
    model, _ = make(method)
    trainer_kw = {
        "max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 0, "accelerator": "cpu", "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
    }  # fmt: skip
    hint = rf"model.method='{method}' trains on auxiliary outliers, and the training batches have none"
    with pytest.raises(SettingError, match=hint):
        Trainer(**trainer_kw).fit(model, datamodule=OODDataModule(batch_size=32, outliers=None))
    id_only = OODDataModule(batch_size=32).id_dataset_for("train")  # a user's own loader of (x, y) batches
    with pytest.raises(SettingError, match=hint):
        Trainer(**trainer_kw).fit(model, train_dataloaders=torch.utils.data.DataLoader(id_only, batch_size=32))


@pytest.mark.parametrize("method", ["greg", "energy"])
def test_only_a_regularizing_method_refuses_float16(method: str) -> None:
    module = GradRegModule(method=method)
    trainer = Trainer(precision="16-true", accelerator="cpu", logger=False, enable_checkpointing=False)
    if method == "greg":
        with pytest.raises(UnsupportedSettingError, match=r"trainer\.precision=16-true"):
            module.check_trainer(trainer)
    else:
        module.check_trainer(trainer)  # its losses take no input gradient
    GradRegModule(method="greg", reg_weight=0.0).check_trainer(trainer)
    for precision in ("bf16-mixed", "16-mixed"):  # on a CPU Lightning trains 16-mixed in bfloat16
        GradRegModule(method="greg").check_trainer(Trainer(precision=precision, accelerator="cpu", logger=False))


# ---------------------------------------------------------------------------------------------------- module
@pytest.mark.parametrize("scaling", ["code", "paper"])
def test_greg_step_is_the_weighted_sum_of_its_terms_by_plain_autograd(scaling: str) -> None:
    # CE + energy_weight * squared-hinge energy loss + reg_weight * the input-gradient norm of the plain-hinge Phi
    # (ALGORITHMS.md 1.2, checklist 2-3), from one train-mode forward; a float64 reference written with autograd alone.
    model, _ = make("greg", m_in=-1.69, m_out=-1.65, energy_weight=0.3, reg_weight=0.7, reg_scaling=scaling)
    model.double().train()
    g = torch.Generator().manual_seed(0)
    x_id = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (6,), generator=g)
    x_out = 2 * torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    net = copy.deepcopy(model.model)  # before the step: the same BatchNorm running statistics and train mode
    out = model._forward_losses(x_id, y, x_out)
    assert model.model.training  # the penalty's forward is the training forward (BatchNorm batch statistics)

    x = torch.cat([x_id, x_out]).requires_grad_(True)
    logits = net(x)
    e = -torch.logsumexp(logits, dim=1)
    e_in, e_out = e[:6], e[6:]
    assert [int((e_in < -1.69).sum()), int((e_out > -1.65).sum())] == [3, 3]  # of 6 and 4: some rows active, some not
    ce = F.cross_entropy(logits[:6], y)
    hinge2 = F.relu(e_in + 1.69).pow(2).mean() + F.relu(-1.65 - e_out).pow(2).mean()
    phi_in, phi_out = F.relu(-1.69 - e_in), F.relu(e_out + 1.65)
    phi = phi_out.mean() - phi_in.mean() if scaling == "code" else phi_out.sum() - phi_in.sum()
    (grad,) = torch.autograd.grad(phi, x, create_graph=True)
    norms = grad.flatten(1).norm(dim=1)
    reg = norms.mean() if scaling == "code" else norms[:6].mean() + norms[6:].mean()
    expected = ce + 0.3 * hinge2 + 0.7 * reg

    close = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(out["loss/ce"], ce, **close)
    torch.testing.assert_close(out["loss/energy"], 0.3 * hinge2, **close)
    torch.testing.assert_close(out["loss/reg"], 0.7 * reg, **close)
    torch.testing.assert_close(out["loss"], expected, **close)
    torch.testing.assert_close(out["energy_id"], e_in.mean(), **close)
    torch.testing.assert_close(out["energy_out"], e_out.mean(), **close)
    torch.testing.assert_close(out["grad_norm_id"], norms[:6].mean(), **close)
    torch.testing.assert_close(out["grad_norm_out"], norms[6:].mean(), **close)
    active = torch.cat([e_in < -1.69, e_out > -1.65]).double().mean()
    assert out["hinge_active"].item() == pytest.approx(active.item(), rel=1e-6)  # a float32 fraction: 6 of 10
    # The penalty trains the weights: the step's weight gradients are those of the reference loss.
    got = torch.autograd.grad(out["loss"], list(model.model.parameters()))
    want = torch.autograd.grad(expected, list(net.parameters()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **close)


def test_oe_and_absent_steps_weigh_their_outlier_terms() -> None:
    g = torch.Generator().manual_seed(0)
    x_id, y = torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 6, (5,), generator=g)
    x_out = torch.randn(3, 1, 8, 8, generator=g)
    model, _ = make("oe", oe_weight=0.3)
    model.eval()
    out = model._forward_losses(x_id, y, x_out)
    logits_out = model.model(x_out)
    oe = (torch.logsumexp(logits_out, 1) - logits_out.mean(1)).mean()  # CE to the uniform distribution
    torch.testing.assert_close(out["loss/oe"], 0.3 * oe)
    torch.testing.assert_close(out["loss"], out["loss/ce"] + 0.3 * oe)
    model, _ = make("absent", absent_weight=0.4)
    model.eval()
    with torch.no_grad():
        model.model.absent_fc.bias.fill_(100.0)  # the absent logit wins every row of the K+1
    y = model.model(x_id).argmax(1)  # every ID image right among the K classes
    out = model._forward_losses(x_id, y, x_out)
    assert out["acc"] == 1.0  # accuracy among the K ID classes, not the K+1 trained logits
    absent = F.cross_entropy(torch.cat([model.model(x_out), model.model.absent_fc(model.model.features(x_out))], 1),
                             torch.full((3,), 6))  # fmt: skip
    torch.testing.assert_close(out["loss/absent"], 0.4 * absent)


def test_optimizer_takes_the_configured_settings() -> None:
    model, _ = make("energy", weight_decay=5e-4, momentum=0.8, nesterov=False, lr=0.03)
    (group,) = model.configure_optimizers().param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.03, 0.8, 5e-4, False)
    assert len(group["params"]) == len(list(model.parameters()))  # BatchNorm and biases decay too, as in the code


class _LRs(Callback):
    def __init__(self) -> None:
        self.lrs: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append((trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]))


def test_multistep_schedule_decays_at_epoch_milestones(tmp_path: Path) -> None:
    model, dm = make("energy", schedule="multistep", milestones=[1, 2], gamma=0.1)
    lrs = _LRs()
    epoch_losses(model, dm, tmp_path, epochs=3, limit_train_batches=3, callbacks=[lrs])
    expected = [(epoch, 0.05 * 0.1**epoch) for epoch in range(3) for _ in range(3)]
    assert [e for e, _ in lrs.lrs] == [e for e, _ in expected]
    assert [lr for _, lr in lrs.lrs] == pytest.approx([lr for _, lr in expected], rel=1e-12)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_stops_a_single_device_run(value: float) -> None:
    model, _ = make("greg")
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(ce=1, energy=.*\) at epoch 0, step 0"):
        model._stop_on_non_finite(torch.tensor(value), {"ce": torch.tensor(1.0), "energy": torch.tensor(value)})
    model._stop_on_non_finite(torch.tensor(3.0), {"ce": torch.tensor(3.0)})


def test_training_step_trains_on_the_outliers_the_sampler_selects(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = make("greg", sampler={"name": "energy_cluster", "num_clusters": 4})
    g = torch.Generator().manual_seed(0)
    x_id, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 6, (8,), generator=g)
    candidates = torch.randn(32, 1, 8, 8, generator=g)
    expected = candidates[copy.deepcopy(model.sampler).select(model.model, candidates, 8)]  # its generator's state too
    seen = []
    forward = model._forward_losses
    monkeypatch.setattr(model, "_forward_losses", lambda *b: (seen.append(b[2]), forward(*b))[1])
    with pytest.warns(UserWarning, match="self.trainer"):  # self.log without a Trainer
        model.training_step({"id": (x_id, y), "outliers": (candidates, torch.arange(32))}, 0)
    assert len(expected) < 32
    assert torch.equal(seen[0], expected)


def test_poem_observes_the_id_features_first(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = make("energy", sampler="poem")
    model.eval()  # rows independent: the features of ID and outliers are those of each part alone
    g = torch.Generator().manual_seed(0)
    x_id, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 6, (8,), generator=g)
    x_out = torch.randn(8, 1, 8, 8, generator=g) + 3
    seen = []
    monkeypatch.setattr(model.sampler, "select", lambda model, candidates, n_id: torch.arange(len(candidates)))
    monkeypatch.setattr(model.sampler, "observe", lambda f_id, f_out: seen.append((f_id, f_out)))
    with pytest.warns(UserWarning, match="self.trainer"):
        model.training_step({"id": (x_id, y), "outliers": (x_out, torch.arange(8))}, 0)
    with torch.no_grad():
        torch.testing.assert_close(seen[0][0], model.model.features(x_id))
        torch.testing.assert_close(seen[0][1], model.model.features(x_out))


# ---------------------------------------------------------------------------------------------------- callback
class _Epochs(OODEvalCallback):
    def __init__(self, **kw) -> None:
        super().__init__(scorers=["msp"], max_samples=16, histograms=False, **kw)
        self.calls: list[tuple[int, bool]] = []

    def evaluate(self, trainer, pl_module, split):
        self.calls.append((trainer.current_epoch, trainer.sanity_checking))
        return super().evaluate(trainer, pl_module, split)


def test_callback_evaluates_every_nth_epoch_counting_from_one_and_not_in_the_sanity_check(tmp_path: Path) -> None:
    model, dm = make("ce")
    for every, epochs, expected in [(2, 4, [(1, False), (3, False)]), (1, 1, [(0, False)])]:
        callback = _Epochs(every_n_epochs=every)
        trainer = Trainer(
            max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=1,
            callbacks=[callback], default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model, datamodule=dm)
        assert callback.calls == expected


def test_callback_metrics_take_id_as_the_positive_class() -> None:
    # A scorer that ranks every ID image above every OOD image: AUROC 1, FPR95 0 (ALGORITHMS.md checklist 13).
    model, dm = make("ce")
    logged: list[dict] = []
    model.log_dict = lambda values, **kw: logged.append(dict(values))
    callback = OODEvalCallback(scorers=["msp"], histograms=False)
    rng = np.random.default_rng(0)

    def score(trainer, pl_module, dataset, key):
        scores = rng.uniform(2, 3, 50) if key[1] == "id" else rng.uniform(0, 1, 40)
        return ScoredSet({"msp": scores}, np.zeros(len(scores), np.int64), np.zeros(len(scores), np.int64))

    callback._score = score
    callback.evaluate(_fake_trainer(dm), model, "val")
    for name in (*dm.ood_datasets("val"), "mean"):
        assert logged[0][f"ood/{name}/msp/auroc"] == 1.0
        assert logged[0][f"ood/{name}/msp/fpr95"] == 0.0


def test_callback_test_split_scores_the_test_sets_after_a_cached_validation(tmp_path: Path) -> None:
    model, dm = make("ce")
    logged: list[dict] = []
    model.log_dict = lambda values, **kw: logged.append(dict(values))
    cached = OODEvalCallback(scorers=["energy"], max_samples=64, histograms=False)
    cached.evaluate(_fake_trainer(dm), model, "val")
    cached.evaluate(_fake_trainer(dm), model, "test")
    OODEvalCallback(scorers=["energy"], max_samples=64, histograms=False).evaluate(_fake_trainer(dm), model, "test")
    assert logged[1] == logged[2] != logged[0]
    # and Trainer.test logs those test-split numbers
    model, dm = make("ce")  # the same weights, its own log_dict
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_test_batches=1,
        callbacks=[OODEvalCallback(scorers=["energy"], max_samples=64, histograms=False)], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("ood/")}
    assert metrics == pytest.approx(logged[2], abs=1e-6)


@pytest.mark.parametrize(("n", "world"), [(7, 3), (151, 2), (2, 3)])
def test_gather_puts_strided_shards_back_in_dataset_order(n: int, world: int) -> None:
    width = -(-n // world)
    shards = [np.arange(r, n, world, dtype=np.float64) for r in range(world)]

    class Strategy:
        root_device = torch.device("cpu")

        @staticmethod
        def all_gather(padded: torch.Tensor) -> torch.Tensor:  # every rank's padded shard of the same field
            rows = torch.zeros(world, width, dtype=torch.float64)
            for r, shard in enumerate(shards):
                rows[r, : len(shard)] = torch.from_numpy(shard)
            return rows

    trainer = type("T", (), {"world_size": world, "strategy": Strategy})()
    local = ScoredSet({"s": shards[0]}, shards[0].astype(np.int64), shards[0].astype(np.int64))
    got = _gather(trainer, local, n)
    assert got.scores["s"].tolist() == list(range(n))
    assert got.preds.tolist() == got.labels.tolist() == list(range(n))


def test_datamodule_normalizes_with_the_given_statistics_and_augments_only_the_training_split() -> None:
    dm = OODDataModule(mean=[0.2], std=[0.5], augment="crop_flip")
    assert (dm.input_mean, dm.input_std) == ([0.2], [0.5])
    for split in ("val", "test"):
        raw = build_dataset("digits", Path("data"), split)  # (N, 1, 8, 8) in [0, 1]
        data = dm.id_dataset_for(split)
        for i in (0, 5, 17):
            for _ in range(3):  # no random crop or flip outside training
                x, y = data[i]
                torch.testing.assert_close(x, (raw[i][0] - 0.2) / 0.5)
                assert y == raw[i][1]
    train = dm.id_dataset_for("train")
    assert any(not torch.equal(train[i][0], train[i][0]) for i in range(20))  # augmented


def test_data_seed_orders_the_id_training_set() -> None:
    def order(seed: int) -> list[int]:
        loader = OODDataModule(batch_size=32, outliers=None, seed=seed).train_dataloader()
        return [i for i, _ in loader.sampler]

    first = order(0)
    assert sorted(first) == list(range(650))  # every training image once per epoch
    assert order(0) == first
    assert order(1) != first


def test_unaugmented_train_sets_are_the_training_images_and_the_pool_as_evaluated() -> None:
    dm = OODDataModule(augment="crop_flip")
    train, pool = dm.unaugmented_train_sets()
    mean, std = dm.input_mean[0], dm.input_std[0]
    for data, raw in ((train, build_dataset("digits", Path("data"), "train")),
                      (pool, build_dataset("digits_outliers", Path("data"), "train"))):  # fmt: skip
        assert len(data) == len(raw)
        for i in (0, 9, 300):
            x, y = data[i]
            torch.testing.assert_close(x, (raw[i][0] - mean) / std)  # normalized, neither cropped nor flipped
            assert y == raw[i][1]


def test_validation_batches_do_not_move_the_outlier_stream(tmp_path: Path) -> None:
    # The stream counts the outlier batches training consumed: a checkpoint resumes it there.
    model, dm = make("energy")
    trainer = Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=2, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert dm.outlier_stream.position == 3
