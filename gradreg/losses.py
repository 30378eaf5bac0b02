"""Training losses for OOD-aware classifiers (pure torch, no Lightning).

- Outlier Exposure: Hendrycks, Mazeika, Dietterich, "Deep Anomaly Detection with Outlier Exposure",
  ICLR 2019, arXiv:1812.04606.
- Energy margin loss: Liu, Wang, Owens, Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020,
  arXiv:2010.03759 (github.com/wetliu/energy_ood). Margins used there: CIFAR-10 m_in=-23, m_out=-5;
  CIFAR-100 m_in=-27, m_out=-5; the argparse defaults -25/-7 are what GReg uses.
- GReg gradient-norm regularizer: Sharifi et al., "Gradient-Regularized Out-of-Distribution
  Detection", ECCV 2024, arXiv:2404.12368 (github.com/o4lc/Greg-OOD, ``train_sea.py``).
- Absent-class loss (K+1-way): Chen et al. (NTOM/ATOM), ECML-PKDD 2021, arXiv:2006.15207; Jiang et al.
  (DOS), ICLR 2024, arXiv:2306.02031.

Energy convention: ``E(x) = -T * logsumexp(f(x) / T)`` with T = 1; ID samples are pushed *below*
``m_in`` and outliers *above* ``m_out``. Energies and losses are computed in at least float32 (float32
under bf16 autocast, float64 for float64 models). An empty ID or outlier part contributes zero (a mean
over an empty set would be NaN and poison the step).

Deviation from the official GReg code: the regularizer is computed from the *same* forward pass as
the classification and energy losses (``torch.autograd.grad(..., create_graph=True)`` on the input
that already went through the network) instead of a second forward inside
``torch.autograd.functional.jacobian``. The gradient value is identical without dropout, as in the official models
(with dropout the official second forward draws new masks for Phi; here Phi reuses the loss's); BatchNorm running
statistics are updated once per step instead of twice.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

RegScaling = Literal["code", "paper"]


def upcast(x: Tensor) -> Tensor:
    """Cast half/bfloat16 to float32; keep float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _mean(x: Tensor) -> Tensor:
    """Mean that is 0 (still differentiable) for an empty tensor instead of NaN."""
    return x.sum() / max(x.numel(), 1)


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``-T * logsumexp(logits / T)`` in at least float32, shape (N,).

    Example:
        >>> energy(torch.zeros(2, 4))
        tensor([-1.3863, -1.3863])
    """
    return -temperature * torch.logsumexp(upcast(logits) / temperature, dim=1)


def energy_margin_loss(energy_in: Tensor, energy_out: Tensor, m_in: float = -25.0, m_out: float = -7.0) -> Tensor:
    """Squared hinge ``mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2`` (Liu et al. 2020, eq. 5)."""
    return _mean(F.relu(energy_in - m_in).pow(2)) + _mean(F.relu(m_out - energy_out).pow(2))


def outlier_exposure_loss(logits_out: Tensor) -> Tensor:
    """Cross-entropy from the softmax to the uniform distribution: ``mean[logsumexp(f) - mean_k f_k]``."""
    logits_out = upcast(logits_out)
    return _mean(torch.logsumexp(logits_out, dim=1) - logits_out.mean(dim=1))


def absent_class_loss(logits_out: Tensor) -> Tensor:
    """Cross-entropy of outliers towards the extra (K+1)-th "absent" class, the last logit."""
    target = torch.full((logits_out.shape[0],), logits_out.shape[1] - 1, device=logits_out.device)
    return _mean(F.cross_entropy(upcast(logits_out), target, reduction="none"))


class GradPenalty(NamedTuple):
    """Value of the GReg regularizer and its per-row ingredients (for logging)."""

    value: Tensor  #: scalar penalty to add to the loss (times its weight)
    row_norms: Tensor  #: (N_in + N_out,) L2 norm of the gated functional's input gradient per row
    active: Tensor  #: (N_in + N_out,) bool, rows whose hinge is active (E_in < m_in, E_out > m_out)


def gated_energy_functional(
    energy_in: Tensor, energy_out: Tensor, m_in: float, m_out: float, scaling: RegScaling = "code"
) -> Tensor:
    """The scalar Phi whose input gradient GReg penalizes.

    ``Phi = -mean_in relu(m_in - E_in) + mean_out relu(E_out - m_out)`` (``scaling="code"``, as in
    ``train_sea.py``): a *plain* hinge that is active only on samples that already satisfy their
    margin. With ``scaling="paper"`` the means become sums, so row i's input gradient is exactly
    ``+-1[active_i] * dE_i/dx_i`` (the paper's per-sample term).
    """
    hinge_in = F.relu(m_in - energy_in)
    hinge_out = F.relu(energy_out - m_out)
    if scaling == "code":
        return _mean(hinge_out) - _mean(hinge_in)
    return hinge_out.sum() - hinge_in.sum()


def grad_norm_penalty(
    inputs: Tensor,
    energy_in: Tensor,
    energy_out: Tensor,
    m_in: float = -25.0,
    m_out: float = -7.0,
    scaling: RegScaling = "code",
) -> GradPenalty:
    """GReg's loss-gradient-norm regularizer, differentiable (double backprop).

    ``inputs`` is the concatenated (ID first, then outliers) normalized batch with ``requires_grad``
    that produced ``energy_in`` and ``energy_out`` in one forward pass.

    - ``scaling="code"`` (default, the official code): per-row L2 norm of ``d Phi / d X`` with the
      mean-based Phi, averaged over **all** N_in + N_out rows. Row i carries a 1/N_in or 1/N_out
      factor from the means, so this equals the paper's value divided by N_in + N_out (for any
      N_in, N_out); copy it to reproduce the published numbers.
    - ``scaling="paper"``: ``E_in ||1[E <= m_in] dE/dx|| + E_aux ||1[E >= m_out] dE/dx||``: the
      mean gated gradient norm over ID rows plus the mean over outlier rows.

    Inactive rows contribute zero gradient (exactly, for models whose rows are independent, e.g. in
    eval mode; BatchNorm in train mode couples rows through the batch statistics, as in the
    official code). Shapes: inputs (N, ...), energy_in (N_in,), energy_out (N_out,).
    """
    phi = gated_energy_functional(energy_in, energy_out, m_in, m_out, scaling)
    (grad,) = torch.autograd.grad(phi, inputs, create_graph=True)
    # The norm's backward is defined as 0 at a zero row (inactive rows), so no NaN reaches the weights.
    row_norms = upcast(grad).flatten(1).norm(dim=1)
    n_in = energy_in.shape[0]
    value = _mean(row_norms) if scaling == "code" else _mean(row_norms[:n_in]) + _mean(row_norms[n_in:])
    # Strict inequalities: relu'(0) = 0 in PyTorch, so a sample exactly at its margin contributes nothing.
    active = torch.cat([energy_in < m_in, energy_out > m_out]).detach()
    return GradPenalty(value, row_norms.detach(), active)
