"""Gradients, Hessian-vector products and inverse-HVP solvers (CG, LiSSA, exact) for influence functions."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from gradreg.influence.objective import Batch, TrainLoss, _Functional
from gradreg.models import eval_mode
from gradreg.scorers.base import Scorer

HVP = Callable[[Tensor], Tensor]
"""A flat Hessian-vector product ``v (P,) -> H v (P,)``."""

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
        with eval_mode(model), torch.enable_grad():
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
    with eval_mode(model), torch.enable_grad():
        for x in x_test:
            params = {n: p.requires_grad_() for n, p in fn.params().items()}
            score = fn(params, x[None])
            if not score.requires_grad:
                raise ValueError(f"scorer {scorer!r} is not differentiable w.r.t. the parameters {param_names}")
            rows.append(fn.flat_grad(score, params))
            scores.append(score.detach())
    return torch.stack(scores), torch.stack(rows)


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Refuse a setting that is not one of ``choices`` (a typo would otherwise take another branch silently)."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


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
    check_choice("mode", mode, ("auto", "vmap", "loop"))
    fn = _Functional(model, train_loss, param_names)
    params = fn.params()

    def single(p: dict[str, Tensor], xi: Tensor, yi: Tensor | None) -> Tensor:
        batch = (xi[None], yi[None], None) if part == "id" else (None, None, xi[None])
        return fn(p, batch)

    with eval_mode(model), torch.enable_grad():
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


class IndefiniteError(ArithmeticError):
    """Conjugate gradients met a direction of non-positive curvature: ``H + damping I`` is not positive definite."""


def top_eigenvalue(hvp_fn: HVP, dim: int, iters: int = 20, like: Tensor | None = None) -> float:
    """Largest-magnitude eigenvalue of ``H`` by power iteration (seeded), ``|lambda|_max``; a lower bound of it."""
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


def cg_iterations(max_iter: int | None, size: int) -> int:
    """Conjugate gradients' iteration cap for ``size`` unknowns: ``max_iter``, by default ``min(size, 200)``."""
    if max_iter is not None and max_iter < 1:  # 0 would otherwise read as "default"
        raise ValueError(f"max_iter={max_iter}: CG needs at least 1 iteration; pass None for min(P, 200)")
    return max_iter or min(size, 200)


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
    strict: bool = False,
    stochastic: bool = False,
) -> Tensor:
    """Approximate ``(H + damping I)^-1 v`` from Hessian-vector products.

    - ``"cg"``: conjugate gradients; needs a deterministic ``hvp_fn`` and ``H + damping I`` positive definite
      (on a direction of non-positive curvature it stops with a warning, or raises :class:`IndefiniteError` if
      ``strict``). Stops when
      ``||residual|| <= tol ||v||`` or after ``max_iter`` (default ``min(P, 200)``) iterations; stopped by the
      cap, it warns with the relative residual ``||residual|| / ||v||`` it reached (the solution is returned).
    - ``"lissa"``: truncated Neumann series ``h_j = v + h_{j-1} - (H + damping I) h_{j-1} / scale``,
      ``h_0 = v``, result ``h_depth / scale`` averaged over ``repeats``. Converges when
      ``scale > (lambda_max + damping) / 2`` and ``H + damping I`` is positive definite; ``scale=None`` uses
      ``1.1 |lambda|_max + damping`` from 20 power iterations. Stops early when an update is below ``tol`` relative
      to ``h``. The ``j``-th update is ``(I - (H + damping I) / scale)^j v``, no longer than ``v`` while the series
      converges: a longer one (or a non-finite value) raises :class:`FloatingPointError`. A ``stochastic`` ``hvp_fn``
      (another mini-batch per call) has no such updates, and single ones may be longer than ``v`` while the series
      converges; while every call's ``H`` meets the condition no step expands, so ``||h_j|| <= (j + 1) ||v||``, and
      a longer ``h`` raises (a slow divergence may then only show in the residual).

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
        strict: CG raises :class:`IndefiniteError` instead of warning.
        stochastic: LiSSA: ``hvp_fn`` uses another Hessian per call (see above).

    Returns:
        The solution, shape (P,).
    """
    if method == "cg":
        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rs = r.dot(r)
        target = tol * v.norm()
        iterations = cg_iterations(max_iter, v.numel())
        for _ in range(iterations):
            if rs.sqrt() <= target:
                break
            ap = hvp_fn(p) + damping * p
            curvature = p.dot(ap)
            if curvature <= 0:
                message = f"CG met non-positive curvature: H + {damping:.3g} I is not positive definite"
                if strict:
                    raise IndefiniteError(message)
                warnings.warn(f"{message}; increase damping", stacklevel=2)
                return x
            alpha = rs / curvature
            x = x + alpha * p
            r = r - alpha * ap
            rs_new = r.dot(r)
            p = r + (rs_new / rs) * p
            rs = rs_new
        if not rs.sqrt() <= target:  # the cap, not the tolerance, ended the solve (also catches NaN)
            reached = float(rs.sqrt() / v.norm())
            warnings.warn(
                f"CG did not converge: relative residual {reached:.3g} > tol {tol:.3g} after {iterations} iterations; "
                f"raise max_iter or damping (now {damping:.3g}, which improves the conditioning of H + damping I)",
                stacklevel=2,
            )
        return x
    if method == "lissa":
        if scale is None:
            scale = 1.1 * top_eigenvalue(hvp_fn, v.numel(), like=v) + damping
        estimate = torch.zeros_like(v)
        bound = v.norm() * (1 + 1e-4)  # rounding: an update of a convergent series can equal v's length
        for _ in range(repeats):
            h = v.clone()
            for j in range(1, depth + 1):
                update = v - (hvp_fn(h) + damping * h) / scale
                h = h + update
                step, size = update.norm(), h.norm()
                # a slowly growing series stays finite for thousands of steps: its updates outgrow v long before
                grows = size > bound * (j + 1) if stochastic else step > bound
                if not (torch.isfinite(step) and torch.isfinite(size)) or grows:
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
