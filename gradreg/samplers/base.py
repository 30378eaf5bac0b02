"""Sampler base class, the ``SAMPLERS`` registry, the eval-mode candidate forward and the ``random`` sampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from gradreg.losses import energy
from gradreg.models import eval_mode, logits_with_absent
from gradreg.registry import Registry, Settings

if TYPE_CHECKING:
    from gradreg.data.outliers import OutlierStream

Score = Literal["auto", "absent", "energy"]


def forward_candidates(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(features, logits)`` of ``x`` in eval mode without gradients (BatchNorm statistics untouched).

    The logits end with the absent class's for a model that has one (``method: absent``).
    """
    with eval_mode(model), torch.no_grad():
        feats = model.features(x)
        return feats, logits_with_absent(model, feats)


def absent_probability(logits: Tensor) -> Tensor:
    """Softmax probability of the last ("absent") class, shape (N,)."""
    return torch.softmax(logits.float(), dim=1)[:, -1]


def id_energy(model: nn.Module, logits: Tensor) -> Tensor:
    """The energy of :func:`forward_candidates`' logits over the K ID classes (an absent class is none of them)."""
    return energy(logits if getattr(model, "absent_fc", None) is None else logits[:, :-1])


def _outlier_scores(model: nn.Module, logits: Tensor, score: Score, num_classes: int | None) -> Tensor:
    """Scores with lower = more ID-like: the absent-class probability (K+1 outputs) or the energy (K ID logits)."""
    if score == "auto":
        if num_classes is None:
            raise ValueError(
                "score='auto' needs num_classes (the number of ID classes) to tell a K+1-way model from a K-way one; "
                "call sampler.setup(num_classes=...) or set score: absent / energy"
            )
        score = "absent" if logits.shape[1] == num_classes + 1 else "energy"
    return absent_probability(logits) if score == "absent" else id_energy(model, logits)


# ---------------------------------------------------------------------------------------------------------------
# Samplers
class OutlierSampler(Settings):
    """Base class: choose which candidates of a step are used as outliers.

    Subclasses are dataclasses whose fields are their settings (the registry checks config keys against them).
    """

    per_epoch: ClassVar[bool] = False  #: whether :meth:`on_train_epoch_start` does work (NTOM, POEM)
    needs_features: ClassVar[bool] = False  #: whether :meth:`observe` wants each training step's features (POEM)

    def select(self, model: nn.Module, candidates: Tensor, n_id: int) -> Tensor:
        """LongTensor of indices into ``candidates`` (on its device); the model's modes are left as found."""
        raise NotImplementedError

    def num_selected(self, n_id: int, n_candidates: int) -> int:
        """Outliers per training step for ``n_id`` ID images and ``n_candidates`` candidates."""
        return n_candidates

    def on_train_epoch_start(self, model: nn.Module, pool: Dataset, stream: OutlierStream, batch_size: int) -> None:
        """Per-epoch work (scan ``pool``, then ``stream.restrict(...)``); only ``per_epoch`` samplers do any."""

    def observe(self, features_id: Tensor, features_out: Tensor) -> None:
        """See a training step's detached penultimate features of its ID and outlier rows (``needs_features``)."""

    def setup(self, num_classes: int | None = None, id_train_size: int | None = None) -> None:
        """Learn the number of ID classes and ID training images (DOS/NTOM use them; settings given win)."""
        for name, value in (("num_classes", num_classes), ("id_train_size", id_train_size)):
            if value is not None and getattr(self, name, False) is None:
                setattr(self, name, value)

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint for an exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


SAMPLERS: Registry[OutlierSampler] = Registry("sampler")


def _seed_from(*words: int) -> int:
    """A 63-bit seed from a tuple of integers (``np.random.SeedSequence``)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] & (2**63 - 1))


class _SeededSampler(OutlierSampler):
    """A sampler whose per-call randomness comes from ``(seed, call count)``."""

    seed: int
    _calls: int

    def _next_generator(self, device: torch.device) -> torch.Generator:
        seed = _seed_from(self.seed, self._calls)
        self._calls += 1
        return torch.Generator(device=device).manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._calls = int(state.get("calls", 0))


@SAMPLERS.register("random")
@dataclass
class RandomOutliers(OutlierSampler):
    """GReg: use every candidate (the stream already drew them at random)."""

    def select(self, model: nn.Module, candidates: Tensor, n_id: int) -> Tensor:  # noqa: D102
        return torch.arange(candidates.shape[0], device=candidates.device)
