"""Classic output scores: maximum softmax probability, maximum logit, and the (negative) energy.

- MSP: Hendrycks and Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
  Examples in Neural Networks", ICLR 2017, arXiv:1610.02136.
- MaxLogit: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
  ICML 2022, arXiv:1911.11132.
- Energy: Liu, Wang, Owens, Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020,
  arXiv:2010.03759; reference code github.com/wetliu/energy_ood. The score is ``-E(x) = T * logsumexp(f/T)``.
- Absent class: Chen et al. (ATOM/NTOM), ECML-PKDD 2021, arXiv:2006.15207, and Jiang et al. (DOS), ICLR 2024,
  arXiv:2306.02031, score a (K+1)-way model with ``1 - p(absent)``. Deviation: the score here is
  ``-log p(absent)``, a strictly increasing function of ``1 - p(absent)`` (same ranking, same AUROC/FPR95), computed
  as ``softplus(logsumexp(ID logits) - absent logit)`` so that it saturates at neither end: in float32
  ``1 - p(absent)`` is exactly 1 for every ID image with ``p(absent)`` below about 3e-8, which ties them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradreg.scorers.base import OutputScorer, Scorer, checked
from gradreg.scorers.registry import SCORERS


def msp_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Maximum softmax probability of ``logits / temperature``, shape (N,).

    Example:
        >>> msp_score(torch.tensor([[0.0, 0.0]]))
        tensor([0.5000])
    """
    return torch.softmax(logits / temperature, dim=1).amax(dim=1)


def maxlogit_score(logits: Tensor) -> Tensor:
    """Largest logit, shape (N,)."""
    return logits.amax(dim=1)


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative energy ``T * logsumexp(logits / T)``, shape (N,); higher = more in-distribution.

    Example:
        >>> energy_score(torch.zeros(1, 4))  # log(4)
        tensor([1.3863])
    """
    return temperature * torch.logsumexp(logits / temperature, dim=1)


@SCORERS.register("msp")
@dataclass(frozen=True)
class MSP(OutputScorer):
    """Maximum softmax probability (optionally temperature-scaled)."""

    temperature: float = 1.0
    lower_bounds: ClassVar[dict[str, tuple[str, float]]] = {"temperature": (">", 0.0)}

    def score_outputs(self, features: Tensor, logits: Tensor) -> Tensor:  # noqa: D102
        return msp_score(logits, self.temperature)


@SCORERS.register("maxlogit")
@dataclass(frozen=True)
class MaxLogit(OutputScorer):
    """Maximum logit."""

    def score_outputs(self, features: Tensor, logits: Tensor) -> Tensor:  # noqa: D102
        return maxlogit_score(logits)


@SCORERS.register("energy")
@dataclass(frozen=True)
class Energy(OutputScorer):
    """Negative free energy with temperature ``T`` (default 1, as in the energy and GReg papers)."""

    temperature: float = 1.0
    lower_bounds: ClassVar[dict[str, tuple[str, float]]] = {"temperature": (">", 0.0)}

    def score_outputs(self, features: Tensor, logits: Tensor) -> Tensor:  # noqa: D102
        return energy_score(logits, self.temperature)


def absent_score(logits: Tensor, absent_logit: Tensor) -> Tensor:
    """``-log p(absent)`` from the K ID logits (N, K) and the absent logit (N, 1), shape (N,).

    Example:
        >>> absent_score(torch.zeros(1, 3), torch.zeros(1, 1))  # p(absent) = 1/4
        tensor([1.3863])
    """
    return F.softplus(torch.logsumexp(logits, dim=1) - absent_logit.squeeze(1))


@SCORERS.register("absent")
@dataclass(frozen=True)
class Absent(Scorer):
    """DOS/NTOM's score for models trained with ``method: absent``: ``-log p(absent)`` (module docstring)."""

    needs_head: ClassVar[bool] = True

    def require(self, model: nn.Module) -> None:  # noqa: D102
        super().require(model)
        if not isinstance(getattr(model, "absent_fc", None), nn.Module):
            raise TypeError(
                f"{type(model).__name__} has no absent_fc head: the absent scorer needs a model trained with "
                "model.method=absent (DOS/NTOM's extra class)"
            )

    def score(self, model: nn.Module, x: Tensor) -> Tensor:  # noqa: D102
        features = checked(model, model.features(x), "features(x)")
        return absent_score(checked(model, model.fc(features), "fc(features(x))"), model.absent_fc(features))
