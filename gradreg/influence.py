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
``-I / n``.

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
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from gradreg.losses import RegScaling, gated_energy_functional
from gradreg.scorers.base import Scorer

Batch = tuple[Tensor | None, Tensor | None, Tensor | None]
"""``(x_in, y_in, x_out)``: ID images with labels, then auxiliary outliers; a missing part is ``None``."""

TrainLoss = Callable[[nn.Module, Batch], Tensor]
"""``train_loss(model, batch) -> scalar``: the training objective on one batch."""

HVP = Callable[[Tensor], Tensor]
"""A flat Hessian-vector product ``v (P,) -> H v (P,)``."""

_HEAD = "fc"


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# Parameter subset and functional wrappers


def select_parameters(model: nn.Module, params: Sequence[str] | None = None) -> list[str]:
    """Resolve the names of the parameters that influence is computed for.

    Args:
        model: a :class:`~gradreg.models.Classifier` (any module with a linear head named ``fc``).
        params: module-name prefixes (``"fc"``, ``"trunk.7"``, ``"block3"``): a parameter is chosen if its name equals
            a prefix or starts with ``prefix + "."``. ``None`` selects "last block + head": the head ``fc``, the
            last leaf module of the trunk holding a weight with >= 2 dims (the last conv / linear layer, in
            registration order) and every parametrized leaf registered after it (its BatchNorm, a final norm).

    Returns:
        Parameter names in ``model.named_parameters()`` order.

    Example:
        >>> from gradreg.models import SmallCNN
        >>> select_parameters(SmallCNN(3, width=4), ["fc"])
        ['fc.weight', 'fc.bias']
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        leaves = [
            (n, m)
            for n, m in model.named_modules()
            if n and not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False))
        ]
        trunk = [(n, m) for n, m in leaves if n != _HEAD and not n.startswith(_HEAD + ".")]
        weighted = [i for i, (_, m) in enumerate(trunk) if any(p.dim() >= 2 for p in m.parameters(recurse=False))]
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
        return functional_call(self.bound, full, args)

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


# ---------------------------------------------------------------------------------------------------------------
# Gradients and Hessian-vector products


def make_hvp(model: nn.Module, train_loss: TrainLoss, batches: Sequence[Batch], param_names: Sequence[str]) -> HVP:
    """Hessian-vector product of the training objective averaged over ``batches``, w.r.t. ``param_names``.

    ``H v`` by double backward (reverse over reverse), so objectives that contain an input gradient (GReg) work.
    Each call recomputes the forward pass (no graph is kept between calls). Runs the model in eval mode.

    Args:
        model: the classifier; its parameters are the expansion point.
        train_loss: the training objective.
        batches: the batches whose mean objective defines ``H``.
        param_names: the chosen parameters (:func:`select_parameters`).

    Returns:
        ``hvp(v)`` mapping a flat vector of size P = number of chosen scalars to ``H v``.
    """
    fn = _Functional(model, train_loss, param_names)

    def hvp(v: Tensor) -> Tensor:
        vs = fn.unflatten(v)
        total = torch.zeros_like(v)
        with _eval_mode(model), torch.enable_grad():
            for batch in batches:
                params = {n: p.requires_grad_() for n, p in fn.params().items()}
                loss = fn(params, batch)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
                dot = sum((g * u).sum() for g, u in zip(grads, vs, strict=True) if g is not None and g.requires_grad)
                if not isinstance(dot, Tensor):  # objective is linear in the chosen parameters
                    continue
                total += fn.flat_grad(dot, params)
        return total / len(batches)

    return hvp


def score_gradients(
    model: nn.Module, scorer: Scorer, x_test: Tensor, param_names: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """Gradient of the OOD score of each test image w.r.t. the chosen parameters.

    The scorer's ``score(model, x)`` is differentiated directly (eval mode), so it must be differentiable w.r.t.
    the parameters: every :class:`~gradreg.scorers.OutputScorer` (energy, msp, maxlogit, closed-form gradnorm) is;
    a scorer that detaches or takes ``torch.autograd.grad`` without ``create_graph=True`` is rejected.

    Shape:
        x_test (T, ...) -> scores (T,), gradients (T, P)
    """
    fn = _Functional(model, lambda m, x: scorer.score(m, x).sum(), param_names)
    scores, rows = [], []
    with _eval_mode(model), torch.enable_grad():
        for x in x_test:
            params = {n: p.requires_grad_() for n, p in fn.params().items()}
            score = fn(params, x[None])
            if not score.requires_grad:
                raise ValueError(f"scorer {scorer!r} is not differentiable w.r.t. the parameters {param_names}")
            rows.append(fn.flat_grad(score, params))
            scores.append(score.detach())
    return torch.stack(scores), torch.stack(rows)


def per_sample_gradients(
    model: nn.Module,
    train_loss: TrainLoss,
    x: Tensor,
    y: Tensor | None,
    param_names: Sequence[str],
    part: Literal["id", "outlier"],
    mode: Literal["auto", "vmap", "loop"] = "auto",
) -> Tensor:
    """Gradient of the training objective on each single point: ``(x_i, y_i, None)`` or ``(None, None, x_i)``.

    Batched with ``torch.func.vmap``; ``mode="auto"`` falls back to a Python loop (with a warning) when the
    objective cannot be vmapped (e.g. it calls ``torch.autograd.grad``).

    Shape:
        x (N, ...), y (N,) or None -> (N, P)
    """
    fn = _Functional(model, train_loss, param_names)
    params = fn.params()

    def single(p: dict[str, Tensor], xi: Tensor, yi: Tensor | None) -> Tensor:
        batch = (xi[None], yi[None], None) if part == "id" else (None, None, xi[None])
        return fn(p, batch)

    with _eval_mode(model), torch.enable_grad():
        if mode in ("auto", "vmap"):
            try:
                out = vmap(grad(single), in_dims=(None, 0, 0 if part == "id" else None))(params, x, y)
                return fn.flatten([out[n] for n in fn.names], batch_dims=1)
            except (RuntimeError, NotImplementedError) as err:
                if mode == "vmap":
                    raise
                warnings.warn(f"per-sample gradients fall back to a loop (vmap failed: {err})", stacklevel=2)
        rows = []
        for i in range(x.shape[0]):
            p = {n: t.requires_grad_() for n, t in fn.params().items()}
            loss = single(p, x[i], None if y is None else y[i])
            rows.append(fn.flat_grad(loss, p))
        return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------------
# Inverse Hessian-vector products


def top_eigenvalue(hvp_fn: HVP, dim: int, iters: int = 20, like: Tensor | None = None) -> float:
    """Largest-magnitude eigenvalue of ``H`` by power iteration (seeded), ``|lambda|_max``."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(dim, generator=gen, dtype=torch.float64)
    if like is not None:
        v = v.to(like)
    v = v / v.norm()
    value = 0.0
    for _ in range(iters):
        hv = hvp_fn(v)
        value = float(hv.norm())
        if value == 0.0:
            return 0.0
        v = hv / value
    return value


def inverse_hvp(
    hvp_fn: HVP,
    v: Tensor,
    method: Literal["cg", "lissa"] = "cg",
    damping: float = 0.01,
    scale: float | None = None,
    depth: int = 1000,
    repeats: int = 1,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> Tensor:
    """Approximate ``(H + damping I)^-1 v`` from Hessian-vector products.

    - ``"cg"``: conjugate gradients; needs a deterministic ``hvp_fn`` and ``H + damping I`` positive definite
      (stops with a warning on a direction of non-positive curvature). Stops when
      ``||residual|| <= tol ||v||`` or after ``max_iter`` (default ``min(P, 200)``) iterations.
    - ``"lissa"``: truncated Neumann series ``h_j = v + h_{j-1} - (H + damping I) h_{j-1} / scale``,
      ``h_0 = v``, result ``h_depth / scale`` averaged over ``repeats`` (``hvp_fn`` may be stochastic, e.g. a new
      mini-batch per call). Converges when ``scale > (lambda_max + damping) / 2`` and ``H + damping I`` is positive
      definite; ``scale=None`` uses ``1.1 |lambda|_max + damping`` from 20 power iterations. Stops early when an
      update is below ``tol`` relative to ``h``.

    Args:
        hvp_fn: ``v -> H v`` on flat vectors.
        v: the right-hand side, shape (P,).
        method: ``"cg"`` or ``"lissa"``.
        damping: added to the diagonal of ``H`` (Hessian units for both methods).
        scale: LiSSA scale (see above).
        depth: LiSSA recursion depth.
        repeats: LiSSA repeats averaged.
        tol: relative stopping tolerance.
        max_iter: CG iteration cap.

    Returns:
        The solution, shape (P,).
    """
    if method == "cg":
        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rs = r.dot(r)
        target = tol * v.norm()
        for _ in range(max_iter or min(v.numel(), 200)):
            if rs.sqrt() <= target:
                break
            ap = hvp_fn(p) + damping * p
            curvature = p.dot(ap)
            if curvature <= 0:
                warnings.warn("CG met non-positive curvature; increase damping", stacklevel=2)
                break
            alpha = rs / curvature
            x = x + alpha * p
            r = r - alpha * ap
            rs_new = r.dot(r)
            p = r + (rs_new / rs) * p
            rs = rs_new
        return x
    if method == "lissa":
        if scale is None:
            scale = 1.1 * top_eigenvalue(hvp_fn, v.numel(), like=v) + damping
        estimate = torch.zeros_like(v)
        for _ in range(repeats):
            h = v.clone()
            for _ in range(depth):
                update = v - (hvp_fn(h) + damping * h) / scale
                h = h + update
                step, size = update.norm(), h.norm()
                if not (torch.isfinite(step) and torch.isfinite(size)):
                    raise FloatingPointError("LiSSA diverged; raise scale or damping")
                if step <= tol * size:
                    break
            estimate += h / scale
        return estimate / repeats
    raise ValueError(f"unknown method '{method}'; known: cg, lissa")


def exact_inverse_hvp(hvp_fn: HVP, v: Tensor, damping: float = 0.0) -> Tensor:
    """``(H + damping I)^-1 v`` with ``H`` materialized column by column from ``hvp_fn`` (small P only, for tests)."""
    dim = v.numel()
    if dim > 5000:
        raise ValueError(f"exact_inverse_hvp forms a {dim}x{dim} Hessian; use inverse_hvp for P > 5000")
    eye = torch.eye(dim, dtype=v.dtype, device=v.device)
    hessian = torch.stack([hvp_fn(e) for e in eye], dim=1)
    hessian = (hessian + hessian.T) / 2
    return torch.linalg.solve(hessian + damping * eye, v)


# ---------------------------------------------------------------------------------------------------------------
# Explanation


@dataclass
class InfluenceResult:
    """Influences of scanned training points on the scores of T test images.

    ``*_influence[t, j]`` is the influence of the training point ``*_indices[j]`` (a dataset index) on test image
    ``t``: positive = up-weighting the point would raise the test image's ID-score. "Helpful" points push the score
    towards the test image's true side (up for ID images, down for OOD images; up when unknown), "harmful" the
    other way.
    """

    test_scores: Tensor  #: (T,) the score of each test image
    id_indices: Tensor  #: (N_id,) dataset indices of the scanned ID training images
    id_influence: Tensor  #: (T, N_id)
    outlier_indices: Tensor  #: (N_out,) dataset indices of the scanned auxiliary outliers
    outlier_influence: Tensor  #: (T, N_out)
    test_is_id: list[bool | None]  #: ground truth of each test image, when known
    test_ids: list[int]  #: caller's identifiers of the test images (e.g. test-set indices)
    param_names: list[str]  #: the parameters theta
    settings: dict[str, Any] = field(default_factory=dict)  #: solver settings and diagnostics

    def top(
        self,
        test: int,
        k: int,
        subset: Literal["id", "outlier"] = "id",
        kind: Literal["helpful", "harmful"] = "helpful",
    ) -> tuple[Tensor, Tensor]:
        """Dataset indices and influences of the ``k`` most helpful or harmful points for test image ``test``."""
        indices, influence = (
            (self.id_indices, self.id_influence) if subset == "id" else (self.outlier_indices, self.outlier_influence)
        )
        values = influence[test]
        raise_score = (self.test_is_id[test] is not False) == (kind == "helpful")
        order = torch.argsort(values, descending=raise_score)[:k]
        return indices[order], values[order]

    def to_dict(self, k: int = 10, full: bool = False) -> dict[str, Any]:
        """JSON-ready summary: per test image the top-``k`` helpful / harmful ID images and outliers."""
        tests = []
        for t, test_id in enumerate(self.test_ids):
            entry: dict[str, Any] = {
                "test_id": test_id,
                "score": float(self.test_scores[t]),
                "is_id": self.test_is_id[t],
            }
            for subset in ("id", "outlier"):
                entry[subset] = {}
                for kind in ("helpful", "harmful"):
                    idx, val = self.top(t, k, subset, kind)
                    entry[subset][kind] = [
                        {"index": int(i), "influence": float(v)}
                        for i, v in zip(idx.tolist(), val.tolist(), strict=True)
                    ]
            if full:
                entry["id_influence"] = self.id_influence[t].tolist()
                entry["outlier_influence"] = self.outlier_influence[t].tolist()
            tests.append(entry)
        out: dict[str, Any] = {
            "sign": "positive = up-weighting the training point raises the test ID-score",
            "params": self.param_names,
            "settings": self.settings,
            "tests": tests,
        }
        if full:
            out["id_indices"] = self.id_indices.tolist()
            out["outlier_indices"] = self.outlier_indices.tolist()
        return out

    def to_json(self, path: str | Path | None = None, k: int = 10, full: bool = False) -> str:
        """Serialize :meth:`to_dict` (``full`` adds every influence); also write it to ``path`` if given."""
        text = json.dumps(self.to_dict(k, full), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    def grid_rows(
        self, test: int, k: int, id_dataset: Dataset, outlier_dataset: Dataset | None = None
    ) -> dict[str, tuple[Tensor, list[int], list[float]]]:
        """Rows for :func:`save_explanation_grid`: label -> (images (k, C, H, W), dataset indices, influences)."""
        rows = {}
        for subset, data in (("ID", id_dataset), ("outlier", outlier_dataset)):
            if data is None or (subset == "outlier" and self.outlier_indices.numel() == 0):
                continue
            for kind in ("helpful", "harmful"):
                idx, val = self.top(test, k, "id" if subset == "ID" else "outlier", kind)
                images = torch.stack([torch.as_tensor(data[i][0]) for i in idx.tolist()])
                rows[f"{subset} {kind}"] = (images, idx.tolist(), val.tolist())
        return rows

    def save_grid(
        self,
        test: int,
        test_image: Tensor,
        path: str | Path,
        id_dataset: Dataset,
        outlier_dataset: Dataset | None = None,
        k: int = 8,
        mean: Sequence[float] | Tensor | None = None,
        std: Sequence[float] | Tensor | None = None,
    ) -> Path:
        """Write the PNG grid for test image ``test`` (see :func:`save_explanation_grid`)."""
        is_id = self.test_is_id[test]
        label = "" if is_id is None else (" (ID)" if is_id else " (OOD)")
        title = f"test {self.test_ids[test]}{label}\nscore {float(self.test_scores[test]):.3g}"
        rows = self.grid_rows(test, k, id_dataset, outlier_dataset)
        return save_explanation_grid(test_image, rows, path, mean, std, title)


def _load(dataset: Dataset, indices: Sequence[int], like: Tensor, labels: bool = True) -> tuple[Tensor, Tensor | None]:
    items = [dataset[i] for i in indices]
    # clone: tensors made under inference_mode (e.g. in a Lightning test loop) cannot join autograd
    x = torch.stack([torch.as_tensor(item[0]) for item in items]).to(like).clone()
    y = torch.as_tensor([int(item[1]) for item in items], device=like.device) if labels else None
    return x, y


def _subset(n: int, cap: int | None, gen: torch.Generator) -> list[int]:
    if cap is None or cap >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=gen)[:cap].tolist())


def explain(
    model: nn.Module,
    x_test: Tensor,
    scorer: Scorer | str | Mapping[str, Any],
    train_loss: TrainLoss,
    id_dataset: Dataset,
    outlier_dataset: Dataset | None = None,
    *,
    params: Sequence[str] | None = None,
    method: Literal["cg", "lissa"] = "cg",
    damping: float | Literal["auto"] = 0.01,
    scale: float | None = None,
    depth: int = 1000,
    repeats: int = 1,
    tol: float = 1e-6,
    max_iter: int | None = None,
    max_train: int | None = 1000,
    hessian_points: int = 512,
    batch_size: int = 64,
    test_is_id: bool | Sequence[bool | None] | None = None,
    test_ids: Sequence[int] | None = None,
    per_sample: Literal["auto", "vmap", "loop"] = "auto",
    hessian_loss: TrainLoss | None = None,
    seed: int = 0,
) -> InfluenceResult:
    """Rank training ID images and auxiliary outliers by their cross-loss influence on test images' OOD scores.

    ``I(z, x_test) = -grad S(x_test)^T (H + damping I)^-1 grad L_train(z)``, with ``S`` the scorer's ID-score,
    ``L_train(z)`` the training objective on the single point ``z`` and ``H`` the Hessian of the mean objective
    over ``hessian_points`` ID images and ``hessian_points`` outliers (seeded random subsets, batched in pairs of
    ``batch_size`` ID + ``batch_size`` outliers). One inverse-HVP per test image; the per-sample training gradients
    are computed once and shared by all test images. The model runs in eval mode and is restored afterwards.

    Args:
        model: trained classifier (``features``, ``fc``).
        x_test: test images, shape (T, C, H, W), normalized like the training data.
        scorer: a scorer or a spec for :func:`gradreg.scorers.build` (e.g. ``"energy"``).
        train_loss: training objective ``train_loss(model, (x_in, y_in, x_out))``, e.g. :func:`greg_objective`.
        id_dataset: map-style ID training set yielding ``(x, y)``.
        outlier_dataset: map-style auxiliary set yielding ``(x, _)``; ``None`` for ID-only objectives.
        params: parameter prefixes (:func:`select_parameters`); ``None`` = last block + head.
        method: inverse-HVP solver, ``"cg"`` (on the full Hessian subset) or ``"lissa"`` (one Hessian batch per
            recursion step, cycling).
        damping: see :func:`inverse_hvp`; ``"auto"`` uses 1.01 times the largest-magnitude Hessian eigenvalue
            (20 power iterations), which makes ``H + damping I`` positive definite for the indefinite Hessians of
            non-convex networks, at the price of shrinking the influence towards a gradient similarity.
        scale: LiSSA scale; ``None`` estimates it by power iteration on the full Hessian subset.
        depth: LiSSA depth.
        repeats: LiSSA repeats.
        tol: solver tolerance.
        max_iter: CG iteration cap.
        max_train: number of points scored per dataset (seeded random subset); ``None`` = all.
        hessian_points: points per dataset used for the Hessian.
        batch_size: chunk size for Hessian batches and per-sample gradients.
        test_is_id: ground truth of the test images (decides "helpful" vs "harmful"); ``None`` = unknown.
        test_ids: identifiers stored in the result (default ``0..T-1``).
        per_sample: see :func:`per_sample_gradients`.
        hessian_loss: objective whose Hessian is inverted, if not ``train_loss`` (an approximation, e.g.
            ``greg_objective(..., reg_weight=0)`` to skip the third-order penalty HVP on large models).
        seed: seed of the subsets.

    Returns:
        An :class:`InfluenceResult`; ``settings["relative_residual"]`` holds ``||(H + damping I) s - g|| / ||g||``
        per test image, a solver-independent accuracy check.
    """
    if not isinstance(scorer, Scorer):
        from gradreg.scorers import build

        scorer = build(scorer)
    num_tests = x_test.shape[0]
    if isinstance(test_is_id, bool) or test_is_id is None:
        test_is_id = [test_is_id] * num_tests
    test_ids = list(range(num_tests)) if test_ids is None else list(test_ids)
    if len(test_is_id) != num_tests or len(test_ids) != num_tests:
        raise ValueError(f"test_is_id and test_ids need one entry per test image ({num_tests})")

    names = select_parameters(model, params)
    like = dict(model.named_parameters())[names[0]].detach()
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), _eval_mode(model):
        scores, test_grads = score_gradients(model, scorer, x_test.to(like).clone(), names)

        hess_in = _subset(len(id_dataset), hessian_points, gen)
        hess_out = [] if outlier_dataset is None else _subset(len(outlier_dataset), hessian_points, gen)
        chunks = max(1, math.ceil(max(len(hess_in), len(hess_out)) / batch_size))
        batches: list[Batch] = []
        for idx_in, idx_out in zip(
            torch.tensor_split(torch.tensor(hess_in), chunks),
            torch.tensor_split(torch.tensor(hess_out), chunks),
            strict=True,
        ):
            x_in, y_in = _load(id_dataset, idx_in.tolist(), like) if len(idx_in) else (None, None)
            x_out = _load(outlier_dataset, idx_out.tolist(), like, labels=False)[0] if len(idx_out) else None
            batches.append((x_in, y_in, x_out))
        hessian_loss = train_loss if hessian_loss is None else hessian_loss
        full_hvp = make_hvp(model, hessian_loss, batches, names)
        solver_hvp = full_hvp
        if damping == "auto":  # |lambda|_max makes H + damping I positive definite even where H is indefinite
            damping = 1.01 * top_eigenvalue(full_hvp, test_grads.shape[1], like=like)
        if method == "lissa":
            if scale is None:
                scale = 1.1 * top_eigenvalue(full_hvp, test_grads.shape[1], like=like) + damping
            cycle = itertools.cycle([make_hvp(model, hessian_loss, [b], names) for b in batches])

            def solver_hvp(v: Tensor) -> Tensor:
                return next(cycle)(v)

        solutions, residuals = [], []
        for g in test_grads:
            s = inverse_hvp(solver_hvp, g, method, damping, scale, depth, repeats, tol, max_iter)
            residual = full_hvp(s) + damping * s - g
            residuals.append(float(residual.norm() / g.norm().clamp_min(torch.finfo(g.dtype).tiny)))
            solutions.append(s)
        s_test = torch.stack(solutions, dim=1)  # (P, T)

        influences = {}
        scanned = {}
        for part, data in (("id", id_dataset), ("outlier", outlier_dataset)):
            indices = [] if data is None else _subset(len(data), max_train, gen)
            blocks = []
            for start in range(0, len(indices), batch_size):
                x, y = _load(data, indices[start : start + batch_size], like, labels=part == "id")
                g = per_sample_gradients(model, train_loss, x, y, names, part, per_sample)
                blocks.append(-(g @ s_test).T)
            influences[part] = torch.cat(blocks, dim=1) if blocks else like.new_zeros(num_tests, 0)
            scanned[part] = torch.tensor(indices, dtype=torch.long)

    settings = {
        "method": method,
        "damping": damping,
        "scale": scale,
        "depth": depth,
        "repeats": repeats,
        "tol": tol,
        "max_iter": max_iter,
        "hessian_points": [len(hess_in), len(hess_out)],
        "num_params": int(test_grads.shape[1]),
        "scorer": repr(scorer),
        "hessian_loss": "train_loss" if hessian_loss is train_loss else getattr(hessian_loss, "__qualname__", "custom"),
        "relative_residual": residuals,
    }
    return InfluenceResult(
        test_scores=scores.cpu(),
        id_indices=scanned["id"],
        id_influence=influences["id"].detach().cpu(),
        outlier_indices=scanned["outlier"],
        outlier_influence=influences["outlier"].detach().cpu(),
        test_is_id=list(test_is_id),
        test_ids=test_ids,
        param_names=names,
        settings=settings,
    )


def hardest_examples(id_scores: Tensor, ood_scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``k`` ID images with the lowest scores and the ``k`` OOD images with the highest.

    These are the test images the detector gets most wrong (scores are higher = more in-distribution).

    Example:
        >>> hardest_examples(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.0, 5.0]), 1)
        (tensor([1]), tensor([1]))
    """
    id_order = torch.argsort(id_scores)[:k]
    ood_order = torch.argsort(ood_scores, descending=True)[:k]
    return id_order, ood_order


# ---------------------------------------------------------------------------------------------------------------
# Plot


def _to_display(image: Tensor, mean: Tensor | None, std: Tensor | None) -> Tensor:
    image = image.detach().float().cpu()
    if std is not None:
        image = image * std.view(-1, 1, 1)
    if mean is not None:
        image = image + mean.view(-1, 1, 1)
    image = image.clamp(0, 1)
    return image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)


def save_explanation_grid(
    test_image: Tensor,
    rows: Mapping[str, tuple[Tensor, Sequence[int], Sequence[float]]],
    path: str | Path,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    title: str = "test image",
) -> Path:
    """Save a PNG grid: the test image in the top-left cell, then one row of training images per entry of ``rows``.

    Each cell is titled with the dataset index and the influence. Images are un-normalized with ``mean`` / ``std``
    (per channel; e.g. ``model.input_mean``, ``model.input_std``) and clipped to [0, 1]. Uses matplotlib's
    object-oriented API on an Agg canvas (no pyplot, no global backend switch), imported lazily.

    Args:
        test_image: the test image, shape (C, H, W), normalized.
        rows: row label -> (images (k, C, H, W), dataset indices, influences), e.g.
            :meth:`InfluenceResult.grid_rows`.
        path: output PNG path (parent folders are created).
        mean: per-channel normalization mean.
        std: per-channel normalization std.
        title: caption of the test image.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mean_t = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).cpu()
    std_t = None if std is None else torch.as_tensor(std, dtype=torch.float32).cpu()
    k = max([len(r[1]) for r in rows.values()], default=0)
    num_rows = max(1, len(rows))
    fig = Figure(figsize=(1.6 * (k + 1), 1.9 * num_rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(num_rows, k + 1, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    axes[0, 0].imshow(_to_display(test_image, mean_t, std_t), cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title(title, fontsize=7)
    for r, (label, (images, indices, values)) in enumerate(rows.items()):
        axes[r, 1].set_ylabel(label, fontsize=8)
        for c, (image, index, value) in enumerate(zip(images, indices, values, strict=True)):
            axes[r, c + 1].imshow(_to_display(image, mean_t, std_t), cmap="gray", vmin=0, vmax=1)
            axes[r, c + 1].set_title(f"#{index}\n{value:+.2e}", fontsize=6)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
