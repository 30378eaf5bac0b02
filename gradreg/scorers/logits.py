"""Classic output scores: maximum softmax probability, maximum logit, and the (negative) energy.

- MSP: Hendrycks and Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
  Examples in Neural Networks", ICLR 2017, arXiv:1610.02136.
- MaxLogit: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
  ICML 2022, arXiv:1911.11132.
- Energy: Liu, Wang, Owens, Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020,
  arXiv:2010.03759; reference code github.com/wetliu/energy_ood. The score is ``-E(x) = T * logsumexp(f/T)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from gradreg.scorers.base import OutputScorer
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
