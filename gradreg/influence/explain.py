"""``explain``: cross-loss influence of training images and outliers on test scores, and its plot."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from gradreg.influence.objective import Batch, TrainLoss, select_parameters
from gradreg.influence.solvers import (
    IndefiniteError,
    cg_iterations,
    check_choice,
    inverse_hvp,
    make_hvp,
    per_sample_gradients,
    score_gradients,
    top_eigenvalue,
)
from gradreg.models import eval_mode
from gradreg.scorers.base import Scorer

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
    test_ids: list[int | str]  #: caller's identifiers of the test images (e.g. test-set indices)
    param_names: list[str]  #: the parameters theta
    settings: dict[str, Any] = field(default_factory=dict)  #: solver settings and diagnostics

    def __post_init__(self) -> None:
        # Python values: numpy's False is not `False` (its image read as ID), and JSON takes no numpy or torch scalar
        self.test_is_id = [None if t is None else bool(t) for t in self.test_is_id]
        self.test_ids = [_python(i) for i in self.test_ids]

    def top(
        self,
        test: int,
        k: int,
        subset: Literal["id", "outlier"] = "id",
        kind: Literal["helpful", "harmful"] = "helpful",
    ) -> tuple[Tensor, Tensor]:
        """Dataset indices and influences of the ``k`` most helpful or harmful points for test image ``test``.

        Only points that push the score that way (an influence of that sign, not 0) are listed: maybe fewer than ``k``.
        """
        check_choice("subset", subset, ("id", "outlier"))
        if k < 0:
            raise ValueError(f"k={k} must be >= 0")
        check_choice("kind", kind, ("helpful", "harmful"))
        indices, influence = (
            (self.id_indices, self.id_influence) if subset == "id" else (self.outlier_indices, self.outlier_influence)
        )
        values = influence[test]
        raise_score = (self.test_is_id[test] is not False) == (kind == "helpful")
        order = torch.argsort(values, descending=raise_score)
        order = order[(values[order] > 0 if raise_score else values[order] < 0)][:k]
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
                if idx.numel():  # no point pushes the score that way: no row
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


def _python(value: Any) -> Any:
    """A numpy or torch scalar as the Python value it holds (JSON takes only those); anything else as it is."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


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
    test_ids: Sequence[int | str] | None = None,
    per_sample: Literal["auto", "vmap", "loop"] = "auto",
    hessian_loss: TrainLoss | None = None,
    seed: int = 0,
) -> InfluenceResult:
    """Rank training ID images and auxiliary outliers by their cross-loss influence on test images' OOD scores.

    ``I(z, x_test) = -grad S(x_test)^T (H + damping I)^-1 grad L_train(z)``, with ``S`` the scorer's ID-score,
    ``L_train(z)`` the training objective on the single point ``z`` and ``H`` the Hessian of the mean objective
    over ``hessian_points`` ID images and ``hessian_points`` outliers (seeded random subsets, batched in pairs of
    about ``batch_size`` ID + ``batch_size`` outliers; all pairs hold equally many points of each set, so a set is cut
    to a multiple of the number of pairs, and a set smaller than that number lowers it: ``settings["hessian_points"]``
    holds the numbers used). One inverse-HVP per test image; the per-sample training gradients are computed once and
    shared by all test images. The model runs in eval mode and is restored afterwards.

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
            non-convex networks, at the price of shrinking the influence towards a gradient similarity. The
            estimate is a lower bound: where CG still meets non-positive curvature, the damping is doubled and
            every solve restarts (``settings["damping"]`` holds the value used).
        scale: LiSSA scale; ``None`` estimates it by power iteration on each Hessian batch (the largest).
        depth: LiSSA depth.
        repeats: LiSSA repeats.
        tol: solver tolerance.
        max_iter: CG iteration cap (a solve it stops warns with its residual).
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
    check_choice("method", method, ("cg", "lissa"))
    check_choice("per_sample", per_sample, ("auto", "vmap", "loop"))
    for name, value in (("hessian_points", hessian_points), ("batch_size", batch_size), ("max_train", max_train)):
        if value is not None and value < 1:  # max_train=-1 left one point out, 0 scanned none
            raise ValueError(f"{name}={value} must be >= 1" + (" (or None: all)" if name == "max_train" else ""))
    if damping != "auto" and not 0 <= damping < math.inf:
        raise ValueError(f"damping={damping} must be >= 0 and finite, or 'auto'")
    if x_test.shape[0] == 0 or len(id_dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("explain needs at least one test image and one ID training point")
    if not isinstance(scorer, Scorer):
        from gradreg.scorers import build

        scorer = build(scorer)
    num_tests = x_test.shape[0]
    if isinstance(test_is_id, bool) or test_is_id is None:
        test_is_id = [test_is_id] * num_tests
    test_ids = list(range(num_tests)) if test_ids is None else list(test_ids)
    if len(test_is_id) != num_tests or len(test_ids) != num_tests:
        raise ValueError(f"test_is_id and test_ids need one entry per test image ({num_tests})")
    if method == "cg":
        cg_iterations(max_iter, 1)  # a cap below 1 is refused before the gradients and the Hessian batches

    names = select_parameters(model, params)
    like = dict(model.named_parameters())[names[0]].detach()
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), eval_mode(model):
        scores, test_grads = score_gradients(model, scorer, x_test.to(like).clone(), names)

        hess_in = _subset(len(id_dataset), hessian_points, gen)
        hess_out = [] if outlier_dataset is None else _subset(len(outlier_dataset), hessian_points, gen)
        chunks = max(1, math.ceil(max(len(hess_in), len(hess_out)) / batch_size))
        # make_hvp averages the per-batch objectives mean_in + mean_out: that is the mean objective only if every
        # batch holds as many points of each set as the others (a set left out of a batch loses that batch's weight)
        chunks = min([chunks, *(len(h) for h in (hess_in, hess_out) if h)])
        hess_in, hess_out = (h[: len(h) // chunks * chunks] for h in (hess_in, hess_out))
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
        auto = damping == "auto"
        stochastic = len(batches) > 1  # LiSSA: one batch's Hessian per step (cycling)
        if auto:  # |lambda|_max makes H + damping I positive definite even where H is indefinite
            damping = 1.01 * top_eigenvalue(full_hvp, test_grads.shape[1], like=like)
        if method == "lissa":
            batch_hvps = [make_hvp(model, hessian_loss, [b], names) for b in batches]
            if scale is None:  # every batch's Hessian, not only their mean, must meet LiSSA's condition
                scale = 1.1 * max(top_eigenvalue(f, test_grads.shape[1], like=like) for f in batch_hvps) + damping
            cycle = itertools.cycle(batch_hvps)

            def solver_hvp(v: Tensor) -> Tensor:
                return next(cycle)(v)

        for _ in range(64):
            try:
                solutions = [
                    inverse_hvp(solver_hvp, g, method, damping, scale, depth, repeats, tol, max_iter, auto, stochastic)
                    for g in test_grads
                ]
                break
            except IndefiniteError:  # power iteration under-estimates |lambda|_max: double until CG succeeds
                damping = max(2 * damping, 1e-8)
        else:
            raise IndefiniteError(f"H + {damping:.3g} I is still not positive definite; pass a damping")
        residuals = []
        for g, s in zip(test_grads, solutions, strict=True):
            residual = full_hvp(s) + damping * s - g
            residuals.append(float(residual.norm() / g.norm().clamp_min(torch.finfo(g.dtype).tiny)))
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
        "max_iter": cg_iterations(max_iter, int(test_grads.shape[1])) if method == "cg" else max_iter,
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
