"""Last-layer gradient-norm scores in closed form: GradNorm and ExGrad.

- GradNorm: Huang, Geng, Li, "On the Importance of Gradients for Detecting Distributional Shifts in
  the Wild", NeurIPS 2021, arXiv:2110.00218. Reference code: github.com/deeplearning-wisc/gradnorm_ood
  (``test_ood.py::iterate_data_gradnorm``): batch size 1, logits / T, all-ones target,
  loss −Σ_c log softmax_c, score = L1 norm of the gradient of the last-layer **weight** (bias excluded).
- ExGrad: Igoe, Chung, Char, Schneider, "How Useful are Gradients for OOD Detection Really?",
  arXiv:2205.10439. No reference code was consulted.

Both gradients are outer products ``(output-space vector) · hᵀ`` of the penultimate feature ``h``, so
their norms factorize and need only the forward pass (``OutputScorer``):

- GradNorm: ∂L/∂W = (C·p − 1)·hᵀ / T, hence ‖∂L/∂W‖₁ = (C/T)·‖p − u‖₁·‖h‖₁ with u = 1/C.
  The official all-ones target makes this exactly C times the paper's KL-to-uniform form.
- ExGrad: E_{k∼p}‖∇_W CE(f(x), k)‖₂ = Σ_k p_k‖(p − e_k)hᵀ‖_F = ‖h‖₂·Σ_k p_k‖p − e_k‖₂.

Deviation (GradNorm): closed form over the whole batch instead of one backward per image; equal to
the official loop up to float rounding (tested).

Deviation (ExGrad): the formula above is our reading of the paper's description (expectation of the
last-layer gradient norm over labels drawn from the model's own predictive distribution) and is
**unverified** against the paper's equations (ALGORITHMS.md §7). Sign: a confident prediction has a
small expected gradient (the sampled label almost always agrees with p), an uncertain one a large
gradient, so the ID score is **−ExGrad**; this ranks ID digits above uniform noise in the test suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from gradreg.scorers.base import OutputScorer
from gradreg.scorers.registry import SCORERS


def gradnorm_score(features: Tensor, logits: Tensor, temperature: float = 1.0) -> Tensor:
    """GradNorm ``(C/T)·‖softmax(f/T) − 1/C‖₁·‖h‖₁`` (official all-ones target, weight gradient only).

    Args:
        features: penultimate features ``h`` (the input of the last linear layer), shape (N, D).
        logits: logits ``f`` including the bias, shape (N, C).
        temperature: softmax temperature ``T`` (1 in the paper's main results).

    Returns:
        Scores, shape (N,); higher = more in-distribution.

    Example:
        >>> gradnorm_score(torch.ones(1, 4), torch.tensor([[0.0, 0.0]]))  # uniform softmax: zero gradient
        tensor([0.])
        >>> gradnorm_score(torch.ones(1, 4), torch.tensor([[100.0, 0.0]]))  # 2 * (0.5 + 0.5) * 4
        tensor([8.])
    """
    num_classes = logits.shape[1]
    probs = torch.softmax(logits / temperature, dim=1)
    output_term = (probs - 1.0 / num_classes).abs().sum(dim=1)
    return (num_classes / temperature) * output_term * features.abs().sum(dim=1)


def exgrad_score(features: Tensor, logits: Tensor) -> Tensor:
    """Negative ExGrad ``−‖h‖₂·Σ_k p_k‖p − e_k‖₂`` with ``p = softmax(f)``.

    ``‖p − e_k‖₂² = Σ_{j≠k} p_j² + (1 − p_k)²``, for all k at once without an (N, C, C) tensor. For the
    top class m, ``1 − p_m`` is the sum of the other probabilities: subtracting ``p_m ≈ 1`` from 1 cancels,
    and confident predictions, the ID ones, would lose most of their digits (0.43 relative error in
    float32 for a logit gap of 12). ``‖p − e_m‖`` is taken relative to ``1 − p_m``, whose square underflows in
    float32 beyond a gap of about 45.

    Args:
        features: penultimate features ``h``, shape (N, D).
        logits: logits ``f``, shape (N, C).

    Returns:
        Scores, shape (N,); higher = more in-distribution.

    Example:
        >>> exgrad_score(torch.ones(1, 4), torch.tensor([[100.0, -100.0]]))  # confident: zero gradient
        tensor([-0.])
    """
    probs = torch.softmax(logits, dim=1)
    top = probs.argmax(dim=1, keepdim=True)
    top_p = probs.gather(1, top)
    others = probs.scatter(1, top, 0.0)
    rest = others.sum(dim=1, keepdim=True)  # 1 − p_m
    # k ≠ m: Σ_{j≠k} p_j² + (1 − p_k)² = Σ_{j≠m} p_j² + p_m² − p_k² + (1 − p_k)², about p_m² + 1.
    sq_dist = others.square().sum(dim=1, keepdim=True) + (top_p.square() - probs.square()) + (1.0 - probs).square()
    # k = m: ‖p − e_m‖ = rest · sqrt(Σ_{j≠m} (p_j / rest)² + 1), scaled so that the squares of tiny probabilities
    # do not underflow (float32 lost half the score for a logit gap of 80).
    scaled = others / torch.where(rest > 0, rest, 1.0)  # a subnormal rest too (gaps of 88 and more in float32)
    top_dist = rest * (scaled.square().sum(dim=1, keepdim=True) + 1).sqrt()
    expected = (probs * sq_dist.sqrt().scatter(1, top, top_dist)).sum(dim=1)
    return -features.norm(dim=1) * expected


class LastLayerScorer(OutputScorer):
    """An :class:`OutputScorer` whose closed form is a gradient of ``fc``'s weight: ``fc`` must be one ``nn.Linear``."""

    def require(self, model: nn.Module) -> None:  # noqa: D102
        super().require(model)
        if not isinstance(model.fc, nn.Linear):
            raise TypeError(
                f"{type(model).__name__}.fc is a {type(model.fc).__name__}, not an nn.Linear: this scorer's closed "
                "form is the gradient of the last Linear layer's weight, so features(x) must be that layer's input and "
                "fc the layer (docs/scorers.md, 'What your model must expose')"
            )


@SCORERS.register("gradnorm")
@dataclass(frozen=True)
class GradNorm(LastLayerScorer):
    """GradNorm in closed form; ``temperature`` is the paper's ``T``."""

    temperature: float = 1.0
    lower_bounds: ClassVar[dict[str, tuple[str, float]]] = {"temperature": (">", 0.0)}

    def score_outputs(self, features: Tensor, logits: Tensor) -> Tensor:  # noqa: D102
        return gradnorm_score(features, logits, self.temperature)


@SCORERS.register("exgrad")
@dataclass(frozen=True)
class ExGrad(LastLayerScorer):
    """Negative expected last-layer gradient norm under the model's own predictive distribution."""

    def score_outputs(self, features: Tensor, logits: Tensor) -> Tensor:  # noqa: D102
        return exgrad_score(features, logits)
