"""Cross-loss influence functions: which training images and auxiliary outliers drive a test image's OOD score.

Silva, Chopra, Gombolay, "Using Cross-Loss Influence Functions to Explain Deep Network Representations",
AISTATS 2022, arXiv:2012.01685 (building on Koh and Liang, ICML 2017, arXiv:1703.04730; LiSSA: Agarwal, Bullins,
Hazan, JMLR 2017, arXiv:1602.03943). The influence of up-weighting a training point ``z`` (trained under
``L_train``) on a test quantity measured under a *different* loss ``L_test`` is::

    I(z, z_test) = -grad_theta L_test(z_test)^T  H_train^-1  grad_theta L_train(z)

Here ``L_train`` is the training objective (e.g. :func:`greg_objective`, GReg's CE + energy margin + input-gradient
penalty over ID / auxiliary-outlier pairs) and ``L_test`` is an OOD score of a test image (any differentiable
:mod:`gradreg.scorers` scorer; higher = more in-distribution).

**Sign convention**: ``I > 0`` means up-weighting ``z`` would *raise* the ID-score of the test image (make it look
more in-distribution). Removing ``z`` from a term that averages over ``n`` points changes the score by about
``-I / n`` when that term is the whole objective; with GReg's ID and outlier means, about ``-(I - Ī) / (n - 1)``
(``Ī`` the mean influence over ``z``'s set: docs/influence.md).

Deviations and choices (see ``docs/influence.md``):

- ``theta`` is a parameter subset (default: the head ``fc`` plus the last weight layer of the trunk and the
  parametrized layers after it, see :func:`select_parameters`); all other parameters are constants. The Hessian is
  the Hessian of the training objective w.r.t. that subset only (a diagonal block of the full Hessian).
- The model is evaluated in **eval mode** (BatchNorm uses running statistics, dropout off), so rows of a batch
  are independent and per-point gradients are well defined; the official GReg code trains in train mode.
- ``damping`` is in Hessian units for both solvers: CG and LiSSA both return ``(H + damping I)^-1 v``. (Koh and
  Liang's LiSSA damping equals ``damping / scale`` here.)
- The GReg penalty term is kept in the Hessian: its HVP is third-order autograd (input gradient via
  ``torch.func.grad`` inside the objective, then double backward), checked against finite differences in the tests.
- The Hessian is taken on a seeded random subset of the training data (``hessian_points`` per dataset) and only
  ``max_train`` points per dataset are scored.

Code: ``objective.py`` (parameter subset, :func:`greg_objective`), ``solvers.py`` (gradients, Hessian-vector
products, CG / LiSSA / exact inverse), ``explain.py`` (:func:`explain`, :class:`InfluenceResult`, the plot).
"""

from gradreg.influence.explain import InfluenceResult, explain, hardest_examples, save_explanation_grid
from gradreg.influence.objective import Batch, TrainLoss, greg_objective, select_parameters
from gradreg.influence.solvers import (
    HVP,
    exact_inverse_hvp,
    inverse_hvp,
    make_hvp,
    per_sample_gradients,
    score_gradients,
    top_eigenvalue,
)

__all__ = [
    "HVP",
    "Batch",
    "InfluenceResult",
    "TrainLoss",
    "exact_inverse_hvp",
    "explain",
    "greg_objective",
    "hardest_examples",
    "inverse_hvp",
    "make_hvp",
    "per_sample_gradients",
    "save_explanation_grid",
    "score_gradients",
    "select_parameters",
    "top_eigenvalue",
]
