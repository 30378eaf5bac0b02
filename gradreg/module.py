"""GradRegModule: a LightningModule that trains a classifier with CE, OE, energy or GReg losses.

GReg: Sharifi, Entesari, Safaei, Patel, Fazlyab, "Gradient-Regularized Out-of-Distribution
Detection", ECCV 2024, arXiv:2404.12368 (github.com/o4lc/Greg-OOD). The loss is
``CE + energy_weight * L_energy + reg_weight * L_grad`` computed from ONE forward pass of the
concatenated ID + outlier batch (see ``gradreg.losses`` for the deviation from the official second
forward: BatchNorm statistics are updated once per step). With the regularizer on, the model's
BatchNorm and convolution layers use ``gradreg.double_backward`` (same gradients, cheaper double backward).
With ``cuda_graph`` the forward and both backwards of each step replay from one CUDA graph (``gradreg.cuda_graph``).

Methods: ``ce`` (ID cross-entropy only; outliers are not forwarded), ``oe`` (Outlier Exposure),
``energy`` (energy margin loss), ``greg`` (energy + the gradient-norm regularizer), ``absent``
(K+1-way classifier with an "absent" class for outliers, the DOS/NTOM baseline; the (K+1)-th logit comes from a
head of its own, ``model.absent_fc`` (:func:`gradreg.models.add_absent_head`): training uses all K+1 logits,
``model(x)`` and the scorers the K ID classes, and the ``absent`` scorer 1 - p(absent)).
"""

from __future__ import annotations

import math
import numbers
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from gradreg.cuda_graph import CapturedStep
from gradreg.double_backward import use_double_backward
from gradreg.losses import (
    RegScaling,
    absent_class_loss,
    energy,
    energy_margin_loss,
    grad_norm_penalty,
    outlier_exposure_loss,
    upcast,
)
from gradreg.models import (
    MODELS,
    add_absent_head,
    create_classifier,
    load_pretrained,
    logits_with_absent,
    read_weights,
)
from gradreg.provenance import environment
from gradreg.registry import Bounds, SettingError, check_settings, numeric_bounds, plain_hints
from gradreg.samplers import SAMPLERS, RandomOutliers

Method = Literal["ce", "oe", "energy", "greg", "absent"]
ABSENT_HEAD_HINT = (
    "a method-absent checkpoint from before the absent class had a head of its own (model.absent_fc; it was the last "
    "row of model.fc): retrain it, or start from it with model.pretrained (its trunk is kept)"
)
OUTLIERS_HINT = (
    "model.method={method!r} trains on auxiliary outliers, and the training batches have none (data.outliers is "
    "null, or the loader gives (x, y) batches, not {{'id': (x, y), 'outliers': (x, index)}}): set data.outliers, e.g. "
    "digits_outliers, or use model.method='ce'"
)
BOUNDS: Bounds = {
    "num_classes": (">=", 1), "energy_weight": (">=", 0.0), "oe_weight": (">=", 0.0), "absent_weight": (">=", 0.0),
    "reg_weight": (">=", 0.0), "lr": (">", 0.0), "momentum": (">=", 0.0), "weight_decay": (">=", 0.0),
    "gamma": (">", 0.0), "min_lr": (">=", 0.0),
}  # fmt: skip
ARCH_BOUNDS: Bounds = {"in_channels": (">=", 1), "width": (">=", 1), "dropout": (">=", 0.0)}  # model.arch_kwargs


def _restored_on_resume(hp: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a resumed run takes from the checkpoint's optimizer and scheduler states, whatever its config says.

    ``milestones`` (None: none) and ``gamma`` count only for a ``multistep`` schedule, the one that reads them.
    """
    keys = ["lr", "momentum", "weight_decay", "nesterov", "schedule"]
    keys += ["milestones", "gamma"] if hp.get("schedule") == "multistep" else []
    return {k: hp[k] or [] if k == "milestones" else hp[k] for k in keys if k in hp}


def _same(a: Any, b: Any) -> bool:
    """Equal settings: numbers to float32's precision (a numpy float32 from Python), sequences item by item.

    A resume's lr from the YAML against the checkpoint's numpy float32, a tuple of milestones against a list.
    """
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _cosine_factor(step: int, total: int, floor: float) -> float:
    """The per-step cosine from 1 to ``floor`` over ``total`` steps (times ``lr``), as in energy_ood's fine-tuning."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class UnsupportedSettingError(ValueError):
    """A combination of settings the module cannot train with."""


class GradRegModule(LightningModule):
    """Train a classifier for OOD detection.

    Args:
        arch: model registry name (``small_cnn``, ``wrn40_2``, ``resnet18_cifar``, ``densenet_bc_100``,
            ``resnet50``, ``densenet121``).
        num_classes: number of ID classes (linked from the datamodule by the CLI; a Trainer's datamodule with
            another ``num_classes`` is refused when the run starts).
        arch_kwargs: extra model settings (e.g. ``{dropout: 0.3}`` or ``{weights: IMAGENET1K_V2}``).
        method: training objective, see the module docstring.
        m_in: energy margin for ID samples (pushed below it).
        m_out: energy margin for outliers (pushed above it).
        energy_weight: weight of the squared-hinge energy loss (lambda_S = 0.1 in the papers).
        oe_weight: weight of the Outlier Exposure loss (0.5 in Hendrycks et al.).
        absent_weight: weight of the absent-class loss (beta = 1 in DOS/NTOM).
        reg_weight: weight of GReg's gradient-norm regularizer (lambda_gradS = 1); 0 computes no extra backward.
        reg_scaling: ``code`` (official code's scaling, the default) or ``paper`` (see ``grad_norm_penalty``).
        sampler: outlier sampler spec: ``random`` (GReg) or ``{name: energy_cluster, ...}`` (GReg+), ``dos``, ``ntom``,
            ``poem``; ``ce`` takes only ``random`` (it trains on no outliers).
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        nesterov: Nesterov momentum.
        schedule: ``multistep`` (epoch milestones), ``cosine`` (per step, down to ``min_lr``) or ``constant``.
        milestones: epochs at which ``multistep`` multiplies the learning rate by ``gamma``.
        gamma: multistep decay factor.
        min_lr: final learning rate of the cosine schedule.
        pretrained: a checkpoint path to fine-tune from (the head is re-initialized if its shape differs) or a
            torchvision weights name for the torchvision architectures (e.g. ``IMAGENET1K_V2``).
        input_mean: per-channel normalization mean of the data pipeline (linked from the datamodule by the CLI;
            left out with ``input_std``, the Trainer's datamodule's is taken when the run starts, and a different
            one given is refused).
        input_std: per-channel normalization std of the data pipeline (see ``input_mean``).
        channels_last: keep the model's 4-D weights and the training batch in channels-last memory format (same
            results). On an H100 it makes WRN-40-2's GReg step with ``cuda_graph`` 1.6x (fp32) / 2.3x (bf16) faster,
            its eager CE and energy-OE steps up to 1.5x faster (its eager bf16 GReg step slower) and ResNet-50's GReg
            step 1.16-1.19x faster (``docs/benchmarks.md``); on a CPU it is usually slower.
        cuda_graph: on CUDA, record the step's forward and backwards in a CUDA graph after 3 eager steps and replay
            it (``gradreg.cuda_graph.CapturedStep``; same gradients, far fewer kernel launches). Needs a fixed batch
            (``drop_last``; a smaller batch runs eagerly), one device, no gradient accumulation and no float16 loss
            scaling. Ignored on the CPU; should a capture fail, one warning and the step runs eagerly.
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        num_classes: int = 10,
        arch_kwargs: dict[str, Any] | None = None,
        method: Method = "greg",
        m_in: float = -25.0,
        m_out: float = -7.0,
        energy_weight: float = 0.1,
        oe_weight: float = 0.5,
        absent_weight: float = 1.0,
        reg_weight: float = 1.0,
        reg_scaling: RegScaling = "code",
        sampler: str | dict[str, Any] = "random",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = True,
        schedule: Literal["multistep", "cosine", "constant"] = "multistep",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        min_lr: float = 1e-6,
        pretrained: str | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        channels_last: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_settings(self.hparams, typing.get_type_hints(GradRegModule.__init__), BOUNDS, prefix="model.")
        if method in ("energy", "greg") and m_in > m_out:
            raise SettingError(f"model.m_in={m_in} must be <= model.m_out={m_out} (ID energies go below m_in)")
        if not momentum < 1:  # a momentum of 1 never forgets an update, above it the updates grow without bound
            raise SettingError(
                f"model.momentum={momentum} must be < 1 (the share of the last update kept; 0.9 is usual)"
            )
        if nesterov and momentum == 0:  # else torch.optim.SGD's error, naming neither setting, when training starts
            raise SettingError("model.nesterov=true needs a momentum, and model.momentum=0; set model.nesterov=false")
        if schedule == "cosine" and min_lr > lr:
            raise SettingError(
                f"model.min_lr={min_lr} is above model.lr={lr}: the cosine schedule would raise the learning rate; "
                "set model.min_lr <= model.lr"
            )
        self.sampler = SAMPLERS.build(sampler)  # before the model: its settings fail before any weights load
        if method == "ce" and not isinstance(self.sampler, RandomOutliers):  # ce forwards no outliers to select
            raise SettingError(
                f"model.sampler={sampler!r} selects outliers, and model.method='ce' trains on none; leave "
                "model.sampler out (or set it to random), or use a method that trains on outliers (oe, energy, greg, "
                "absent)"
            )
        kwargs = dict(arch_kwargs or {})
        from_file = pretrained is not None and (  # a file or folder that exists is no weights name (a run's folder)
            "/" in pretrained or Path(pretrained).suffix in (".ckpt", ".pt", ".pth") or Path(pretrained).exists()
        )
        if from_file and not Path(pretrained).is_file():  # else torch.load's "[Errno 2] ..." inside a longer line
            found = "is a folder, not a file" if Path(pretrained).is_dir() else "does not exist"
            inside = [Path(pretrained, n) for n in ("best.ckpt", "last.ckpt") if Path(pretrained, n).is_file()]
            example = f" (e.g. {inside[0]})" if inside else ""
            raise SettingError(
                f"model.pretrained '{pretrained}' {found}; pass an existing .ckpt, .pt or .pth file{example}"
            )
        if pretrained and not from_file:
            if arch in MODELS and "weights" not in MODELS.settings(arch):
                raise SettingError(
                    f"model.pretrained={pretrained!r} is not a checkpoint path, and '{arch}' has no torchvision "
                    "weights to name; pass a .ckpt file"
                )
            kwargs["weights"] = pretrained  # a torchvision weights name, e.g. IMAGENET1K_V2
        if "num_classes" in kwargs:  # else "got multiple values for argument 'num_classes'"
            raise SettingError(
                "model.arch_kwargs.num_classes: the number of logits is model.num_classes; move it there"
            )
        if arch in MODELS:  # the architecture's settings as a config gives them (width: -3 failed inside torch)
            hints = plain_hints(MODELS.get(arch))
            check_settings(kwargs, hints, numeric_bounds(ARCH_BOUNDS, hints), prefix="model.arch_kwargs.")
        self.model = create_classifier(arch, num_classes, **kwargs)
        if method == "absent":
            add_absent_head(self.model)
        # The training run behind a gradreg checkpoint's weights (evaluate.py CONFIG records it as trained_with).
        self.pretrained_environment: dict[str, Any] | None = None
        if from_file:
            checkpoint = read_weights(pretrained)  # read once: the weights, and the environment of their run
            load_pretrained(self.model, pretrained, checkpoint)
            if "state_dict" in checkpoint:
                self.pretrained_environment = checkpoint.get("environment")
        if input_mean is not None and input_std is not None:
            self.model.set_normalization(input_mean, input_std)
        if self.regularizes:
            # Same gradients, cheaper double backward through BatchNorm and convolutions (gradreg.double_backward).
            use_double_backward(self.model)
        if channels_last:  # convolutions then run channels-last whatever their input's layout
            self.model.to(memory_format=torch.channels_last)
        self.sampler.setup(num_classes=num_classes)
        self.num_classes = num_classes
        self.method = method
        # The step computes its gradients itself (backward() inside training_step), so that it can be captured.
        self.captured_step = CapturedStep(self._forward_backward, self.parameters()) if cuda_graph else None
        self._resumed_rng: dict[str, Tensor | None] | None = None  # a checkpoint's generator states, until training
        self._cosine_steps: int | None = None  # the length of the cosine schedule configure_optimizers built
        self._resumed_cosine_steps: int | None = None  # that of the checkpoint's run, until training
        self._resumed_hparams: dict[str, Any] | None = None  # the checkpoint's, until configure_optimizers

    @property
    def uses_outliers(self) -> bool:
        """Whether the objective needs auxiliary outliers."""
        return self.method != "ce"

    @property
    def regularizes(self) -> bool:
        """Whether the step adds GReg's gradient-norm penalty (``greg`` with a positive ``reg_weight``)."""
        return self.hparams.method == "greg" and self.hparams.reg_weight > 0

    def predates_absent_head(self, state: Mapping[str, Tensor]) -> bool:
        """Whether ``state`` is a ``method: absent`` checkpoint from before ``model.absent_fc`` (K+1 rows in ``fc``)."""
        fc = state.get("model.fc.weight")
        return (
            self.method == "absent"
            and "model.absent_fc.weight" not in state
            and fc is not None
            and fc.shape[0] == self.num_classes + 1
        )

    def state_mismatch(self, state: Mapping[str, Tensor]) -> str | None:
        """The first way ``state`` does not fit this module (a key it lacks or has extra, a shape), else None."""
        expected = self.state_dict()
        extra = sorted(set(state) - set(expected))
        if extra:
            return f"it has {extra[0]}, which the model has not"
        for key, value in expected.items():
            if key not in state or state[key].shape != value.shape:
                found = "missing" if key not in state else f"of shape {tuple(state[key].shape)}"
                return f"{key} is {found}, the model's is {tuple(value.shape)}"
        return None

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.model(x)

    # ----------------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:  # noqa: D102
        x_id, y = batch["id"] if isinstance(batch, dict) else batch
        n_id = len(x_id)
        x_out = x_id[:0]
        if self.uses_outliers:
            if not isinstance(batch, dict) or "outliers" not in batch:  # e.g. a user's own loader of (x, y) batches
                raise SettingError(OUTLIERS_HINT.format(method=self.method))
            candidates, _ = batch["outliers"]
            x_out = candidates[self.sampler.select(self.model, candidates, n_id)]
        # Lightning calls backward on out["loss"], unless the captured step computed the gradients (self.backward).
        step = self._forward_losses if self.captured_step is None else self.captured_step
        out = step(x_id, y, x_out)
        if self.sampler.needs_features:  # POEM fits its posterior to the training features
            self.sampler.observe(out.pop("feats_id"), out.pop("feats_out"))

        loss = out.pop("loss")
        losses = {k.removeprefix("loss/"): v for k, v in out.items() if k.startswith("loss/")}
        self._stop_on_non_finite(loss, losses)
        # sync_dist: under DDP the logged values (and a train/* run.monitor) are the mean over all ranks, not rank 0's.
        kw = {"on_epoch": True, "batch_size": n_id, "sync_dist": True}
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, on_step=True, **kw)
        stats = {f"train/{k}": v for k, v in out.items() if not k.startswith("loss/")}
        self.log_dict(stats, on_step=False, **kw)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, **kw)
        return loss

    def _stop_on_non_finite(self, loss: Tensor, losses: dict[str, Tensor]) -> None:
        """Raise :class:`NonFiniteLossError` on every rank if the loss is NaN or infinite on any of them.

        Under DDP a rank that stopped alone would leave the others waiting in the next collective (or failing in it
        with a long gloo/NCCL traceback): the loss and its terms are gathered, so every rank stops at the same step
        with the same message, naming the rank whose loss broke; only rank 0 prints it (``silent`` elsewhere).
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1 and torch.isfinite(loss):  # the common case: one check, no gather
            return
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        values = torch.stack([loss.detach(), *(v.detach() for v in losses.values())]).to(dtype)
        rows = self.all_gather(values).reshape(-1, len(values)) if world > 1 else values[None]
        bad = (~torch.isfinite(rows[:, 0])).nonzero().flatten().tolist()
        if not bad:
            return
        terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, rows[bad[0], 1:].tolist(), strict=True))
        where = f" on rank {', '.join(map(str, bad))}" if world > 1 else ""
        err = NonFiniteLossError(
            f"non-finite training loss{where} ({terms}) at epoch {self.current_epoch}, step {self.global_step}; "
            f"lower the learning rate (model.lr={self.hparams.lr}) or check the input data"
        )
        err.silent = world > 1 and self.global_rank != 0  # type: ignore[attr-defined]
        raise err

    def _forward_losses(self, x_id: Tensor, y: Tensor, x_out: Tensor) -> dict[str, Tensor]:
        """One forward of ID + outliers: ``loss``, its terms ``loss/<name>``, statistics and (for POEM) features."""
        # The input must require grad *before* the forward for GReg's penalty.
        n_id = len(x_id)
        regularize = self.regularizes
        x = torch.cat([x_id, x_out])
        if self.hparams.channels_last:  # torch.cat drops the format when a part is empty
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(regularize)
        feats = self.model.features(x)  # = self.model(x) in two halves (every Classifier)
        logits = logits_with_absent(self.model, feats)  # K ID logits, and the absent one for method absent
        logits_id, logits_out = logits[:n_id], logits[n_id:]

        out = {"loss/ce": F.cross_entropy(upcast(logits_id), y)}
        if self.method == "oe":
            out["loss/oe"] = self.hparams.oe_weight * outlier_exposure_loss(logits_out)
        if self.method == "absent":
            out["loss/absent"] = self.hparams.absent_weight * absent_class_loss(logits_out)
        if self.method in ("energy", "greg"):
            m_in, m_out = self.hparams.m_in, self.hparams.m_out
            e_in, e_out = energy(logits_id), energy(logits_out)
            out["loss/energy"] = self.hparams.energy_weight * energy_margin_loss(e_in, e_out, m_in, m_out)
            out["energy_id"], out["energy_out"] = e_in.mean().detach(), e_out.mean().detach()
            out["hinge_active"] = torch.cat([e_in < m_in, e_out > m_out]).float().mean()
        if regularize:
            penalty = grad_norm_penalty(x, e_in, e_out, m_in, m_out, self.hparams.reg_scaling)
            out["loss/reg"] = self.hparams.reg_weight * penalty.value
            out["grad_norm_id"] = penalty.row_norms[:n_id].mean()
            out["grad_norm_out"] = penalty.row_norms[n_id:].mean()
        out["loss"] = sum(v for k, v in out.items() if k.startswith("loss/"))
        out["acc"] = (logits_id[:, : self.num_classes].argmax(1) == y).float().mean()
        if self.sampler.needs_features:
            out["feats_id"], out["feats_out"] = feats[:n_id].detach(), feats[n_id:].detach()
        return out

    def _forward_backward(self, x_id: Tensor, y: Tensor, x_out: Tensor) -> dict[str, Tensor]:
        """The step that ``cuda_graph`` captures: :meth:`_forward_losses` and the backward of its loss."""
        out = self._forward_losses(x_id, y, x_out)
        out["loss"].backward()
        return {k: v.detach() for k, v in out.items()}

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward, unless the captured step computed the gradients already."""
        if self.captured_step is None:
            super().backward(loss, *args, **kwargs)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Lightning calls this *after* ``training_step``; a captured step's gradients must survive it."""
        if self.captured_step is None:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def _eval_step(self, batch: Any) -> None:
        """Add a batch's summed loss, correct predictions and size to the epoch's sums (float64; MPS: float32)."""
        x, y = batch
        logits = upcast(self.model(x))
        loss, correct = F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()
        sums = self._eval_sums
        sums += torch.stack([loss.to(sums.dtype), correct.to(sums.dtype), sums.new_full((), len(y))])

    def _log_eval(self, prefix: str) -> None:
        """``{prefix}/loss`` and ``{prefix}/acc`` over the whole set: the sums of every rank's shard.

        Means of per-batch or per-rank means would weigh a short last batch or a short shard like a full one.
        """
        sums = self._eval_sums
        if self.trainer.world_size > 1:
            sums = self.all_gather(sums).reshape(-1, 3).sum(0)
        loss, correct, n = sums.tolist()
        if n:  # identical on every rank: sync_dist only keeps Lightning's epoch-level logging check quiet
            self.log(f"{prefix}/loss", loss / n, sync_dist=True)
            self.log(f"{prefix}/acc", correct / n, prog_bar=True, sync_dist=True)

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        self._eval_sums = torch.zeros(3, dtype=dtype, device=self.device)

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """``Trainer.predict``: the logits of a batch of images, or of ``(images, labels, ...)`` batches."""
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:  # noqa: D102
        self._log_eval("test")

    def setup(self, stage: str) -> None:
        """Before the training loader exists: the per-epoch samplers' ID size and their hook on the outlier loader.

        First, in every stage, the datamodule's classes and normalization are matched (:meth:`_match_datamodule`).
        NTOM and POEM size their kept block by the number of ID training images, and mine the pool when the outlier
        loader starts an epoch (:meth:`_mine_at_epoch_start`).
        """
        # A checkpoint restored before this fit (Tuner.lr_find's own) is no resume: one restored after this is
        self._resumed_rng = self._resumed_cosine_steps = self._resumed_hparams = None
        dm = self.trainer.datamodule
        if dm is None:
            return
        self._match_datamodule(dm)
        if stage != "fit":
            return
        if self.uses_outliers and hasattr(dm, "outliers") and dm.outliers is None:
            raise SettingError(OUTLIERS_HINT.format(method=self.method))
        n_id, n_candidates = getattr(dm, "batch_size", None), getattr(dm, "outlier_batch_size", None)
        sizes = isinstance(n_id, int) and isinstance(n_candidates, int)
        if self.uses_outliers and sizes and self.sampler.num_selected(n_id, n_candidates) == 0:
            raise SettingError(  # else every step would train on ID images only
                f"model.sampler={self.hparams.sampler!r} keeps no outlier of the "
                f"data.outlier_batch_size={n_candidates} candidates of a step; raise data.outlier_batch_size "
                "or change the sampler's settings"
            )
        if hasattr(dm, "id_dataset_for"):
            self.sampler.setup(id_train_size=len(dm.id_dataset_for("train")))
        stream = getattr(dm, "outlier_stream", None)
        if self.sampler.per_epoch and stream is not None:
            stream.on_iteration_start = self._mine_at_epoch_start

    def _match_datamodule(self, dm: Any) -> None:
        """Check ``num_classes`` against the datamodule's, and take its normalization if none was given.

        ``train.py`` links both from the datamodule; in a user's own ``Trainer`` a module built without them had the
        default 10 classes (a 6-class set then trained 4 logits that no label reaches, skewing energy and MSP) and
        normalization buffers of mean 0, std 1 (ODIN's and the attacks' epsilons then in the wrong units).
        """
        n = getattr(dm, "num_classes", None)
        if isinstance(n, int) and n != self.num_classes:
            raise SettingError(
                f"GradRegModule has num_classes={self.num_classes} but the datamodule's ID data has {n} classes; "
                "build it with num_classes=datamodule.num_classes"
            )
        mean, std = getattr(dm, "input_mean", None), getattr(dm, "input_std", None)
        if mean is None or std is None:
            return
        hp = self.hparams
        if hp.input_mean is None and hp.input_std is None:
            self.model.set_normalization(mean, std)  # a channel mismatch is one line naming model.arch_kwargs
            hp.input_mean, hp.input_std = list(mean), list(std)  # so that the checkpoint's hyperparameters say it
            return
        if not (_same(hp.input_mean, list(mean)) and _same(hp.input_std, list(std))):
            raise SettingError(
                f"GradRegModule has input_mean={hp.input_mean}, input_std={hp.input_std} but the datamodule normalizes "
                f"with mean {list(mean)}, std {list(std)}; build it with input_mean=datamodule.input_mean, "
                "input_std=datamodule.input_std (or leave both out to take the datamodule's)"
            )

    def on_fit_start(self) -> None:
        """The trainer's settings; a double backward for the SyncBatchNorm layers ``sync_batchnorm`` has made by now.

        GReg's penalty differentiates the backward, and PyTorch's SyncBatchNorm has none
        (:mod:`gradreg.double_backward.batchnorm`).
        """
        self.check_trainer(self.trainer)
        if self.regularizes:
            use_double_backward(self.model)

    def check_trainer(self, trainer: Any) -> None:
        """Raise :class:`UnsupportedSettingError` if ``trainer``'s settings rule out GReg's penalty or ``cuda_graph``.

        ``train.py`` calls it before ``fit`` too: the loggers (wandb's folder) start before any hook of the module,
        and under DDP before the other ranks exist, so the line is said once and the run leaves no folder.
        """
        if self.regularizes and trainer.precision.startswith("16"):
            # Lightning's GradScaler scales the outer backward only: the penalty's inner input gradient would run
            # unscaled in float16 and underflow (ECOSYSTEM: prefer bf16-mixed; PyTorch's AMP notes, gradient penalty).
            raise UnsupportedSettingError(
                f"model.method=greg does not support trainer.precision={trainer.precision} (the gradient penalty's "
                "inner backward would run in float16 without loss scaling and underflow); use "
                "trainer.precision=bf16-mixed or 32-true"
            )
        if self.captured_step is None:
            return
        problems = {
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}": trainer.accumulate_grad_batches > 1,
            f"{trainer.world_size} processes": trainer.world_size > 1,
            f"trainer.precision={trainer.precision}": trainer.precision.startswith("16"),
        }
        for setting, unsupported in problems.items():
            if unsupported:
                raise UnsupportedSettingError(
                    f"model.cuda_graph=true does not support {setting} (a captured step writes fresh gradients on "
                    "one device, without loss scaling); use one device, no accumulation and 32-true or bf16-mixed, "
                    "or set model.cuda_graph=false"
                )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the sampler's and the global generators' states (outlier selection, dropout masks), and the versions.

        A resumed run then selects the same outliers and draws the same dropout masks; the data's order and
        augmentations are seeded by the datamodule's samplers.
        """
        checkpoint["sampler_state"] = self.sampler.state_dict()
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        checkpoint["rng_state"] = {"cpu": torch.get_rng_state(), "cuda": cuda}
        checkpoint["environment"] = environment(self.device)
        if self._cosine_steps is not None:
            checkpoint["cosine_steps"] = self._cosine_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        self.sampler.load_state_dict(checkpoint.get("sampler_state", {}))
        # Set when a fit resumes and starts training; not for load_from_checkpoint or validate/test(ckpt_path=...),
        # whose module a later fresh fit would otherwise start from the old run's generators.
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        self._resumed_rng = checkpoint.get("rng_state") if fitting else None
        self._resumed_cosine_steps = checkpoint.get("cosine_steps") if fitting else None
        self._resumed_hparams = checkpoint.get("hyper_parameters") if fitting else None

    def on_train_start(self) -> None:
        """A resumed run continues the global generators where the checkpoint left them; a changed cosine warns."""
        self._warn_of_a_changed_cosine()
        if self._resumed_rng is None:
            return
        torch.set_rng_state(self._resumed_rng["cpu"])
        if self._resumed_rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(self._resumed_rng["cuda"], self.device)
        self._resumed_rng = None

    def _warn_of_a_changed_cosine(self) -> None:
        """Say so if a resumed cosine schedule has another length than the checkpoint's run (``max_epochs`` changed).

        The schedule then follows the new length from the checkpoint's step on: its learning rate jumps there.
        """
        old, new, self._resumed_cosine_steps = self._resumed_cosine_steps, self._cosine_steps, None
        if old is None or new is None or old == new:  # not resumed, a checkpoint without it, or another optimizer
            return
        floor, step = self.hparams.min_lr / self.hparams.lr, self.global_step
        lr = lambda total: self.hparams.lr * _cosine_factor(step, total, floor)  # noqa: E731
        rank_zero_warn(
            f"model.schedule=cosine now spans {new} optimizer steps, the checkpoint's run {old} (trainer.max_epochs, "
            "max_steps, limit_train_batches, accumulate_grad_batches or the number of devices changed): from step "
            f"{step} on, its learning rate follows the new cosine ({lr(new):.4g} there instead of {lr(old):.4g})",
            category=UserWarning,
        )

    def _check_resumed_optimizer(self) -> None:
        old, self._resumed_hparams = self._resumed_hparams, None
        self.check_resumed_settings(old)

    def check_resumed_settings(self, old: Mapping[str, Any] | None) -> None:
        """Refuse to resume with other optimizer or schedule settings than the checkpoint's run.

        ``old``: the checkpoint's hyperparameters. ``train.py`` checks before the run starts (and its loggers write),
        ``configure_optimizers`` for any Trainer. Lightning restores the optimizer's and the scheduler's states after
        ``configure_optimizers``: the checkpoint's learning rate, momentum, milestones, ... would silently win over the
        new values (which the run's ``config.yaml`` and hyperparameters record), and a changed schedule type fails in
        that restore. A changed cosine length (``max_epochs``) is fine: its factor is no state
        (:meth:`_warn_of_a_changed_cosine`).
        """
        before, now = _restored_on_resume(old or {}), _restored_on_resume(self.hparams)
        for key in now:
            if key in before and not _same(before[key], now[key]):
                raise SettingError(
                    f"model.{key}={self.hparams[key]!r} differs from the resumed checkpoint's run ({old[key]!r}), "
                    "whose optimizer and schedule state a resumed run continues; resume with its value, or start a "
                    "new run from its weights (model.pretrained=CHECKPOINT)"
                )

    def on_train_epoch_start(self) -> None:  # noqa: D102
        self._mine_at_epoch_start(known_start=True)

    def on_train_epoch_end(self) -> None:  # noqa: D102
        dm = self.trainer.datamodule
        if getattr(dm, "outlier_stream", None) is not None:
            dm.epoch_start_position = dm.outlier_stream.position

    def _mine_at_epoch_start(self, known_start: bool = False) -> None:
        """Per-epoch samplers (NTOM, POEM) scan the outlier pool and restrict the candidate stream, once an epoch.

        Called by :meth:`on_train_epoch_start` and when the outlier loader starts an iteration, whichever comes first:
        a loader with workers reads its first indices when its iterator is created, which Lightning does before
        ``on_train_epoch_start`` in a fit's first epoch (and, with a cosine schedule, before it restores its loops).
        The loader's call mines only at a position where an epoch starts (not when a run resumes inside an epoch,
        whose restriction the checkpoint holds).
        """
        dm = self.trainer.datamodule
        stream = getattr(dm, "outlier_stream", None)
        if not self.sampler.per_epoch or stream is None or stream.restricted_at == stream.position:
            return
        if known_start or stream.position == getattr(dm, "epoch_start_position", None):
            self.sampler.on_train_epoch_start(self.model, stream.pool, stream, dm.batch_size)

    # ----------------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:  # noqa: D102
        self._check_resumed_optimizer()
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        if hp.schedule != "multistep" and hp.milestones:  # (here: only a run that trains says so)
            rank_zero_warn(
                f"model.milestones={hp.milestones} are ignored: model.schedule={hp.schedule!r} (not multistep)"
            )
        if hp.schedule == "constant":
            return optimizer
        if hp.schedule == "multistep":
            milestones = hp.milestones if hp.milestones is not None else []
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, hp.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise SettingError(
                "model.schedule=cosine needs the run's length, and trainer.max_epochs=-1 sets no end: set "
                "trainer.max_epochs or trainer.max_steps, or use model.schedule=multistep or constant"
            )
        total = self._cosine_steps = max(1, int(steps))
        floor = hp.min_lr / hp.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine_factor(step, total, floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
