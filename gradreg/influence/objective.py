"""The training objective of an influence computation: the parameter subset, functional wrappers, GReg's loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

from gradreg.losses import RegScaling, gated_energy_functional
from gradreg.models import functional_call

Batch = tuple[Tensor | None, Tensor | None, Tensor | None]
"""``(x_in, y_in, x_out)``: ID images with labels, then auxiliary outliers; a missing part is ``None``."""

TrainLoss = Callable[[nn.Module, Batch], Tensor]
"""``train_loss(model, batch) -> scalar``: the training objective on one batch."""

_HEAD = "fc"


# ---------------------------------------------------------------------------------------------------------------
# Parameter subset and functional wrappers


def select_parameters(model: nn.Module, params: Sequence[str] | None = None) -> list[str]:
    """Resolve the names of the parameters that influence is computed for.

    Args:
        model: a :class:`~gradreg.models.Classifier` (any module with a linear head named ``fc``).
        params: module-name prefixes (``"fc"``, ``"trunk.7"``, ``"block3"``): a parameter is chosen if its name equals
            a prefix or starts with ``prefix + "."``. ``None`` selects "last block + head": the head ``fc``, the
            last leaf module of the trunk holding a weight with >= 2 dims (the last conv / linear layer, in
            registration order) and every parametrized leaf registered after it (its BatchNorm, a final norm); frozen
            parameters (``requires_grad=False``) are skipped.

    Returns:
        Parameter names in ``model.named_parameters()`` order.

    Example:
        >>> from gradreg.models import SmallCNN
        >>> select_parameters(SmallCNN(3, width=4), ["fc"])
        ['fc.weight', 'fc.bias']
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        # frozen layers are no candidates: a fine-tuned model's frozen trunk would match no trainable name below
        trainable = lambda m: [p for p in m.parameters(recurse=False) if p.requires_grad]  # noqa: E731
        leaves = [
            (n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children()) and trainable(m)
        ]
        trunk = [(n, m) for n, m in leaves if n != _HEAD and not n.startswith(_HEAD + ".")]
        weighted = [i for i, (_, m) in enumerate(trunk) if any(p.dim() >= 2 for p in trainable(m))]
        params = [_HEAD] + ([n for n, _ in trunk[weighted[-1] :]] if weighted else [])
    chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in params)]
    unmatched = [p for p in params if not any(n == p or n.startswith(p + ".") for n in names)]
    if unmatched:
        top = sorted({n.split(".")[0] for n in names})
        raise KeyError(f"no trainable parameter matches {unmatched}; top-level modules: {', '.join(top)}")
    return chosen


class _Bound(nn.Module):
    """Wraps ``fn(model, *args)`` so that ``functional_call`` can swap the model's parameters for the call."""

    def __init__(self, model: nn.Module, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any) -> Tensor:
        return self.fn(self.model, *args)


class _Functional:
    """``fn(model, *args)`` as a function of a dict of the chosen parameters; the others are detached constants."""

    def __init__(self, model: nn.Module, fn: Callable[..., Tensor], names: Sequence[str]) -> None:
        self.bound = _Bound(model, fn)
        self.names = list(names)
        named = dict(model.named_parameters())
        self.frozen = {f"model.{n}": p.detach() for n, p in named.items() if n not in self.names}
        self.shapes = [named[n].shape for n in self.names]

    def params(self) -> dict[str, Tensor]:
        named = dict(self.bound.model.named_parameters())
        return {n: named[n].detach() for n in self.names}

    def __call__(self, params: Mapping[str, Tensor], *args: Any) -> Tensor:
        full = {**self.frozen, **{f"model.{n}": p for n, p in params.items()}}
        return functional_call(self.bound, full, args)  # every slot of each parameter (a module under two names)

    def flat_grad(self, output: Tensor, params: Mapping[str, Tensor], **kwargs: Any) -> Tensor:
        """Flat gradient of ``output`` w.r.t. ``params``; parameters it does not use get zeros."""
        grads = torch.autograd.grad(output, list(params.values()), allow_unused=True, **kwargs)
        return self.flatten(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values(), strict=True)]
        )

    def flatten(self, tensors: Sequence[Tensor], batch_dims: int = 0) -> Tensor:
        lead = tensors[0].shape[:batch_dims]
        return torch.cat([t.reshape(*lead, -1) for t in tensors], dim=-1)

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        sizes = [math.prod(s) for s in self.shapes]
        return [c.view(s) for c, s in zip(vec.split(sizes), self.shapes, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# Training objective


def greg_objective(
    m_in: float = -25.0,
    m_out: float = -7.0,
    energy_weight: float = 0.1,
    reg_weight: float = 1.0,
    scaling: RegScaling = "code",
    train_rows: int | None = None,
) -> TrainLoss:
    """GReg's training objective ``CE + energy_weight * L_S + reg_weight * L_grad`` as a ``train_loss`` callable.

    Written as a sum of per-row terms so that it is well defined on any batch, including a single ID image or a
    single outlier (as influence needs)::

        L = mean_in [CE_i + beta relu(E_i - m_in)^2 + lam' ||1[E_i <= m_in] dE_i/dx_i||]
          + mean_out[      beta relu(m_out - E_j)^2 + lam' ||1[E_j >= m_out] dE_j/dx_j||]

    with ``E = -logsumexp(logits)``, ``beta = energy_weight`` and ``lam' = reg_weight`` (``scaling="paper"``) or
    ``reg_weight / train_rows`` (``scaling="code"``: the official code averages the penalty over all N_in + N_out
    rows of a step and its functional carries 1/N_in, 1/N_out factors, which equals the paper value divided by
    N_in + N_out). On a batch of ``train_rows`` rows this equals ``CE + energy_weight * energy_margin_loss +
    reg_weight * grad_norm_penalty`` of :mod:`gradreg.losses` (checked in the tests). The input gradient is taken
    with ``torch.func.grad`` so the objective works under ``vmap`` (per-sample gradients) and under double backward
    (its Hessian-vector product is third-order autograd). Energies stay in the model dtype (no float32 cast), since
    influence runs in eval mode without autocast. Assumes rows are independent (eval mode).

    Args:
        m_in: ID energy margin (GReg: -25).
        m_out: outlier energy margin (GReg: -7).
        energy_weight: ``lambda_S`` / ``--beta`` (GReg: 0.1).
        reg_weight: ``lambda_grad S`` / ``--jacobianLoss`` (GReg: 1.0); 0 drops the penalty (one forward, no
            double backward).
        scaling: ``"code"`` or ``"paper"``, as in :func:`gradreg.losses.grad_norm_penalty`.
        train_rows: N_in + N_out of one training step (e.g. 128 for 64 + 64); required with ``scaling="code"``.

    Returns:
        ``train_loss(model, (x_in, y_in, x_out)) -> scalar``; either part may be ``None``.
    """
    if scaling not in ("code", "paper"):
        raise ValueError(f"unknown scaling '{scaling}'; known: code, paper")
    if scaling == "code" and reg_weight > 0 and train_rows is None:
        raise ValueError("scaling='code' needs train_rows = N_in + N_out of a training step (e.g. 128 for 64 + 64)")
    reg = reg_weight if scaling == "paper" else reg_weight / (train_rows or 1)

    def objective(model: nn.Module, batch: Batch) -> Tensor:
        x_in, y_in, x_out = batch
        parts = [x for x in (x_in, x_out) if x is not None]
        if not parts:
            raise ValueError("empty batch: x_in and x_out are both None")
        x = torch.cat(parts)
        n_in = 0 if x_in is None else x_in.shape[0]

        def energies(inputs: Tensor) -> tuple[Tensor, Tensor]:
            logits = model(inputs)
            return -torch.logsumexp(logits, dim=1), logits

        if reg > 0:

            def phi(inputs: Tensor) -> tuple[Tensor, Tensor]:
                e, logits = energies(inputs)
                # paper scaling = sums, so row i's input gradient is exactly +-1[active_i] dE_i/dx_i
                return gated_energy_functional(e[:n_in], e[n_in:], m_in, m_out, "paper"), logits

            input_grad, logits = grad(phi, has_aux=True)(x)
            e = -torch.logsumexp(logits, dim=1)
            sq = input_grad.flatten(1).pow(2).sum(1)
            nonzero = sq > 0  # inactive rows have an exactly zero gradient; keep sqrt's derivative finite there
            row_penalty = reg * torch.sqrt(torch.where(nonzero, sq, torch.ones_like(sq))) * nonzero
        else:
            e, logits = energies(x)
            row_penalty = torch.zeros_like(e)

        loss = e.new_zeros(())
        if x_in is not None:
            hinge = F.relu(e[:n_in] - m_in).pow(2)
            loss = loss + (F.cross_entropy(logits[:n_in], y_in, reduction="none") + energy_weight * hinge).mean()
            loss = loss + row_penalty[:n_in].mean()
        if x_out is not None:
            hinge = F.relu(m_out - e[n_in:]).pow(2)
            loss = loss + (energy_weight * hinge + row_penalty[n_in:]).mean()
        return loss

    return objective
