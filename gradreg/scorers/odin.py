"""ODIN: temperature scaling plus a small input perturbation that raises the predicted-class score.

Liang, Li, Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in Neural
Networks", ICLR 2018, arXiv:1706.02690. Reference code: github.com/facebookresearch/odin (the same
recipe is in OpenOOD's ``odin_postprocessor.py`` and GReg's ``detect.py``).

The perturbation step ``epsilon`` is in [0, 1]-pixel units while the model sees normalized inputs,
so the sign map is divided by the per-channel normalization std (``model.input_std``), exactly as
the reference code divides by its hard-coded CIFAR std.

Deviation: the cross-entropy is summed over the batch instead of averaged; this only rescales the
gradient, so the sign map (and hence the score) is unchanged and each row's gradient does not
depend on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradreg.scorers.base import Scorer, checked, input_grad
from gradreg.scorers.registry import SCORERS


def channel_std(model: nn.Module, x: Tensor) -> Tensor:
    """Per-channel input normalization std of ``model`` shaped to broadcast against ``x``.

    Models that do not carry an ``input_std`` buffer are assumed to see un-normalized inputs (std 1).

    Shape:
        x (N, C, ...) -> (1, C, 1, ...)
    """
    std = getattr(model, "input_std", None)
    if std is None:
        return torch.ones((), dtype=x.dtype, device=x.device)
    return std.to(dtype=x.dtype, device=x.device).reshape(1, -1, *([1] * (x.dim() - 2)))


def odin_score(model: nn.Module, x: Tensor, temperature: float = 1000.0, epsilon: float = 0.0014) -> Tensor:
    """ODIN score: max softmax(f(x̃)/T) with x̃ = x − ε·sign(∇ₓ CE(f(x)/T, ŷ)) / std.

    ``ŷ`` is the predicted class. Following the reference code, the sign map is ``+1`` where the
    gradient is ``>= 0`` and ``-1`` elsewhere. ``model`` must be in eval mode (the Scorer does this).

    Args:
        model: classifier mapping normalized inputs to logits.
        x: normalized inputs.
        temperature: softmax temperature ``T`` (1000 in the paper).
        epsilon: perturbation size ``ε`` in [0, 1]-pixel units (0.0014 in the paper).

    Returns:
        Scores, shape (N,); higher = more in-distribution.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = checked(model, model(x)) / temperature
        loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
        grad = input_grad(model, loss, x)
    sign = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype)
    x_tilde = x.detach() - epsilon * sign / channel_std(model, x)
    with torch.no_grad():
        return torch.softmax(checked(model, model(x_tilde)) / temperature, dim=1).amax(dim=1)


@SCORERS.register("odin")
@dataclass(frozen=True)
class ODIN(Scorer):
    """ODIN with temperature ``T`` and perturbation ``ε`` (paper defaults T=1000, ε=0.0014)."""

    temperature: float = 1000.0
    epsilon: float = 0.0014
    needs_grad: ClassVar[bool] = True
    lower_bounds: ClassVar[dict[str, tuple[str, float]]] = {"temperature": (">", 0.0), "epsilon": (">=", 0.0)}

    def score(self, model: nn.Module, x: Tensor) -> Tensor:  # noqa: D102
        return odin_score(model, x, self.temperature, self.epsilon)
