"""Input-space margin: the DeepFool distance to the decision boundary, optionally inside a DCT subspace.

Ortiz-Jiménez, Modas, Moosavi-Dezfooli, Frossard, "Hold me tight! Influence of discriminative
features on deep network boundaries", NeurIPS 2020, arXiv:2002.06349. Reference code:
github.com/LTS4/hold-me-tight (``utils.py::subspace_deepfool``, ``generate_subspace_list``). DeepFool
itself: Moosavi-Dezfooli, Fawzi, Frossard, CVPR 2016, arXiv:1511.04599.

Algorithm (per sample, as in the reference): rank the classes once by the clean logits and keep the
top ``top_k``; ``ŷ`` is the first. At the current point x + r, for every other kept class k,
``w_k = P ∇(f_k − f_ŷ)`` with ``P`` the orthogonal projector on the subspace, and pick the class with
the smallest ``|f_k − f_ŷ| / ‖w_k‖``; step ``r_i = max(that ratio, 1e-4) · w_k / ‖w_k‖``. Stop when
x + (1 + overshoot)·r is classified differently from ``ŷ`` or after ``max_iter`` steps; the margin is
``(1 + overshoot)·‖r‖₂``. Everything is in [0, 1]-pixel units: gradients w.r.t. the normalized input
are divided by ``model.input_std`` and steps are divided by it again before they are added.

Subspaces use the orthonormal 2-D DCT-II basis per channel: ``"low"`` is the block of the
``block_size × block_size`` lowest frequencies (the reference's first diagonal subspace), ``"high"``
the block of the highest frequencies (its last), ``"full"`` the whole input space.

Sign: ID inputs sit farther from the decision boundary than uniform noise in our checks, so the
score is **+margin** (higher = more in-distribution); see ``docs/scorers.md`` and the sign test.

Deviations: batched over samples (a sample stops moving once its label flips; rows are independent
in eval mode, so results equal the per-sample loop, which is tested); ``max_iter`` defaults to 20
instead of 100 for speed (a sample that has not flipped by then reports ``(1 + overshoot)·‖r‖₂`` of the steps
taken, which bounds its margin in neither direction: more iterations can end shorter or longer, as in the
reference at 100); ``block_size`` defaults to the reference scripts' blocks (16 at 224 px, 8 at 28 and 32 px;
:func:`default_block_size`) and to a quarter of the side below 28 px, so that small images still have distinct low
and high blocks. Using the margin as an OOD score is our proposal (ALGORITHMS.md §7); the paper measures margins, it
does not detect OOD inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from gradreg.registry import SettingError
from gradreg.scorers.base import Scorer, checked, input_grad
from gradreg.scorers.odin import channel_std
from gradreg.scorers.registry import SCORERS

Subspace = Literal["full", "low", "high"]


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Orthonormal DCT-II matrix ``D`` (n, n): coefficients of a signal ``v`` are ``D @ v``.

    Example:
        >>> d = dct_matrix(4, torch.float64)
        >>> torch.allclose(d @ d.T, torch.eye(4, dtype=torch.float64))
        True
    """
    k = torch.arange(n, dtype=dtype, device=device).unsqueeze(1)
    i = torch.arange(n, dtype=dtype, device=device).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def default_block_size(height: int, width: int) -> int:
    """The reference scripts' block: 16 from 224 px up (ImageNet), 8 from 28 px up (MNIST, CIFAR), else ``side // 4``.

    Below 28 px a quarter of the shorter side (at least 1) keeps the low and high blocks distinct: 2 for 8x8 digits.
    """
    side = min(height, width)
    if side >= 224:
        return 16
    return 8 if side >= 28 else max(1, side // 4)


def dct_projector(
    subspace: Subspace,
    height: int,
    width: int,
    block_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Callable[[Tensor], Tensor] | None:
    """Orthogonal projector on a DCT block, applied per channel to tensors (..., H, W); None for "full".

    Args:
        subspace: ``"full"``, ``"low"`` (top-left block of the DCT coefficients) or ``"high"``
            (bottom-right block).
        height: image height H.
        width: image width W.
        block_size: side of the square block; default :func:`default_block_size`.
        dtype: dtype of the basis.
        device: device of the basis.

    Returns:
        ``v -> D_Hᵀ (M ⊙ (D_H v D_Wᵀ)) D_W`` with the block mask ``M``, or None for the full space.
    """
    if subspace == "full":
        return None
    if subspace not in ("low", "high"):
        raise ValueError(f"unknown subspace '{subspace}'; valid: full, low, high")
    b = default_block_size(height, width) if block_size is None else block_size
    if not 1 <= b <= min(height, width):
        raise ValueError(f"block_size must be in [1, {min(height, width)}], got {b}")
    dh, dw = dct_matrix(height, dtype, device), dct_matrix(width, dtype, device)
    mask = torch.zeros(height, width, dtype=dtype, device=device)
    if subspace == "low":
        mask[:b, :b] = 1.0
    else:
        mask[height - b :, width - b :] = 1.0

    def project(v: Tensor) -> Tensor:
        return dh.T @ (mask * (dh @ v @ dw.T)) @ dw

    return project


def _expand(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _deepfool_step(
    model: nn.Module,
    x: Tensor,
    label: Tensor,
    others: Tensor,
    std: Tensor,
    project: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """One DeepFool step in pixel units for a batch at (normalized) points ``x``; zero rows if stuck."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        f_label = logits.gather(1, label.unsqueeze(1)).squeeze(1)
        best = torch.full_like(f_label, math.inf).detach()
        best_dir = torch.zeros_like(x)
        for j in range(others.shape[1]):  # loop over candidate classes (top_k - 1 backward passes)
            gap = logits.gather(1, others[:, j : j + 1]).squeeze(1) - f_label
            grad = input_grad(model, gap.sum(), x, retain_graph=j < others.shape[1] - 1)
            w = grad / std  # d/d(pixel) = d/d(normalized) / std
            if project is not None:
                w = project(w)
            ratio = gap.detach().abs() / w.flatten(1).norm(dim=1)
            better = ratio < best  # strict, first class wins ties as in the reference; NaN (0/0) never wins
            best = torch.where(better, ratio, best)
            best_dir = torch.where(_expand(better, x), w, best_dir)
    length = best.clamp_min(1e-4) / best_dir.flatten(1).norm(dim=1)
    # A row with no usable direction (all projected gradients zero) does not move.
    length = torch.where(torch.isfinite(best), length, torch.zeros_like(length))
    return _expand(length, x) * best_dir


def deepfool_margin(
    model: nn.Module,
    x: Tensor,
    subspace: Subspace = "full",
    block_size: int | None = None,
    top_k: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 20,
) -> Tensor:
    """L2 norm of the (subspace) DeepFool perturbation in [0, 1]-pixel units, shape (N,).

    Args:
        model: classifier with normalized inputs (``input_std`` buffer, std 1 if absent), eval mode.
        x: normalized images, shape (N, C, H, W) (any shape (N, ...) for ``"full"``).
        subspace: ``"full"``, ``"low"`` or ``"high"`` DCT block (see :func:`dct_projector`); the blocks need
            images (N, C, H, W), other inputs are refused.
        block_size: DCT block side; default :func:`default_block_size`.
        top_k: number of top-ranked classes searched (10 in the reference).
        overshoot: final overshoot factor (0.02 in the reference).
        max_iter: maximum DeepFool iterations (100 in the reference; 20 here for speed).

    Returns:
        Margins, shape (N,).
    """
    x = x.detach()
    if subspace != "full" and x.dim() != 4:
        # The DCT runs over the last two dimensions: on (N, D) vectors those would be the batch and the features,
        # and the projection would mix the rows of the batch.
        raise ValueError(
            f"margin subspace '{subspace}' projects on a 2-D DCT block of images (N, C, H, W), got an input of shape "
            f"{tuple(x.shape)}; use subspace='full' for other inputs"
        )
    std = channel_std(model, x)
    project = dct_projector(subspace, x.shape[-2], x.shape[-1], block_size, x.dtype, x.device)
    with torch.no_grad():
        clean = checked(model, model(x))
    if clean.shape[1] < 2:
        raise ValueError("a margin needs at least two classes")
    ranked = clean.argsort(dim=1, descending=True)[:, : min(top_k, clean.shape[1])]
    label, others = ranked[:, 0], ranked[:, 1:]
    r = torch.zeros_like(x)  # accumulated perturbation, pixel units
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(max_iter):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        r[idx] = r[idx] + _deepfool_step(model, x[idx] + r[idx] / std, label[idx], others[idx], std, project)
        with torch.no_grad():
            flipped = model(x[idx] + (1 + overshoot) * r[idx] / std).argmax(dim=1) != label[idx]
        active[idx[flipped]] = False
    return (1 + overshoot) * torch.linalg.vector_norm(
        r.flatten(1), dim=1, dtype=torch.promote_types(r.dtype, torch.float32)
    )


@SCORERS.register("margin")
@dataclass(frozen=True)
class Margin(Scorer):
    """DeepFool margin (pixel units) in the full space or a low/high-frequency DCT block; higher = ID."""

    subspace: Subspace = "full"
    block_size: int | None = None
    top_k: int = 10
    overshoot: float = 0.02
    max_iter: int = 20
    needs_grad: ClassVar[bool] = True
    lower_bounds: ClassVar[dict[str, tuple[str, float]]] = {
        "block_size": (">=", 1),
        "top_k": (">=", 2),  # the predicted class and at least one to cross to
        "overshoot": (">=", 0.0),
        "max_iter": (">=", 1),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.subspace == "full" and self.block_size is not None:  # it would be ignored: say so
            raise SettingError(f"block_size={self.block_size} applies to subspace 'low' or 'high' only, not 'full'")

    def settings_for(self, input_shape: Sequence[int]) -> dict[str, Any]:  # noqa: D102
        settings = self.settings()
        if self.subspace != "full" and self.block_size is None:  # dct_projector resolves it from the image size
            settings["block_size"] = default_block_size(*input_shape[-2:])
        return settings

    def score(self, model: nn.Module, x: Tensor) -> Tensor:  # noqa: D102
        return deepfool_margin(model, x, self.subspace, self.block_size, self.top_k, self.overshoot, self.max_iter)
