"""Scoring engine shared by the per-epoch callback and ``evaluate.py``.

:func:`score_loader` runs every scorer over a loader with one shared forward pass for the
:class:`~gradreg.scorers.OutputScorer` ones (MSP, energy, GradNorm, ...), in eval mode, outside
Lightning's ``inference_mode`` so that gradient scorers work, and restores the model's mode.
Metrics are computed once over the raw scores of a whole set (``gradreg.metrics``), never per batch.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from gradreg import metrics, scorers
from gradreg.registry import SettingError
from gradreg.scorers import OutputScorer, Scorer
from gradreg.scorers.base import head_outputs, require_head, scoring

ScorerSpec = str | Mapping[str, Any]


def scorer_key(spec: ScorerSpec) -> str:
    """Display name of a scorer spec: its ``alias`` if given, else its registry name."""
    if isinstance(spec, str):
        return spec
    part = "alias" if "alias" in spec else "name"
    key = spec.get(part)
    if key is None and part == "name":
        first, settings = next(iter(spec.items()), (None, None))
        if len(spec) == 1 and isinstance(first, str) and isinstance(settings, Mapping | None):  # {odin: {...}}
            written = ", ".join(f"{k}: {v}" for k, v in {"name": first, **(settings or {})}.items())
            raise SettingError(f"scorer {dict(spec)} has no name key; write {{{written}}}")
        raise SettingError(f"scorer {dict(spec)} has no name key; write e.g. {{name: odin, temperature: 1000}}")
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", key):  # it names files and keys
        raise SettingError(
            f"a scorer's {part} must be a letter or digit followed by letters, digits, '_', '-' or '.', got {key!r} "
            f"in {dict(spec)}"
        )
    return key


def build_scorers(specs: Sequence[ScorerSpec]) -> dict[str, Scorer]:
    """Build scorers by display name; two specs with the same name need distinct ``alias`` keys."""
    built: dict[str, Scorer] = {}
    for spec in specs:
        key = scorer_key(spec)
        if key in built:
            raise SettingError(
                f"two scorers are named '{key}'; give them distinct aliases "
                f"(evaluate.py: NAME:alias={key}_2; configs: alias: {key}_2)"
            )
        built[key] = scorers.build(spec if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "alias"})
    return built


@dataclass
class ScoredSet:
    """Raw scores of one dataset: ``scores[scorer]`` (N,), plus predictions and labels."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)
    preds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.preds)


def score_batch(model: nn.Module, x: Tensor, scorer_map: Mapping[str, Scorer]) -> tuple[dict, Tensor]:
    """Scores of one batch by scorer name and the predicted classes; one forward feeds every OutputScorer."""
    require_head(model)  # one forward of features and logits feeds every OutputScorer and the predictions
    for scorer in scorer_map.values():
        if isinstance(scorer, OutputScorer):  # called below through score_outputs, which skips Scorer.__call__'s check
            scorer.require(model)
    with scoring(model), torch.no_grad():
        x = x.clone()
        features, logits = head_outputs(model, x)
        out = {k: s.score_outputs(features, logits) for k, s in scorer_map.items() if isinstance(s, OutputScorer)}
    for key, scorer in scorer_map.items():
        if key not in out:
            out[key] = scorer(model, x)
    return out, logits.argmax(1)


def score_loader(
    model: nn.Module,
    batches: Iterable[Any],
    scorer_map: Mapping[str, Scorer],
    device: torch.device | str | None = None,
) -> ScoredSet:
    """Run every scorer over ``batches`` of ``(x, label)``, the inputs cast to the model's device and dtype."""
    param = next(model.parameters())
    device = device or param.device
    parts: dict[str, list[Tensor]] = {k: [] for k in scorer_map}
    preds, labels = [], []
    for x, y in batches:
        # a model trained with precision "64-true" or "bf16-true" has float64 / bfloat16 weights; loaders give float32
        scores, pred = score_batch(model, x.to(device, param.dtype), scorer_map)
        for k, v in scores.items():
            parts[k].append(v.detach().double().cpu())
        preds.append(pred.cpu())
        labels.append(torch.as_tensor(y).cpu())
    cat = lambda ts: torch.cat(ts).numpy() if ts else np.zeros(0)  # noqa: E731
    return ScoredSet({k: cat(v) for k, v in parts.items()}, cat(preds).astype(np.int64), cat(labels).astype(np.int64))


def sample(dataset: Dataset, max_samples: int | None, seed: int = 0) -> Subset:
    """The whole ``dataset``, or ``max_samples`` of its items drawn at random (the same for a given ``seed``).

    A random sample, not the first items: folder datasets list their images class by class (ImageNet's validation
    set, Textures, Places365), so their first thousand images cover a few classes only. ``.indices`` holds the
    items' positions in ``dataset``, in increasing order.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if max_samples is None or n <= max_samples:
        return Subset(dataset, range(n))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
    return Subset(dataset, chosen.sort().values.tolist())


def set_metrics(id_set: ScoredSet, ood_set: ScoredSet) -> dict[str, dict[str, float]]:
    """``{scorer: {auroc, fpr95, fpr95_oodpos, aupr_in, aupr_out}}`` of an ID set against one OOD set.

    A scorer whose scores are not all finite gets NaN metrics and a warning that names it; the others keep theirs.
    """
    out = {}
    for key in id_set.scores:
        try:
            out[key] = metrics.ood_metrics(id_set.scores[key], ood_set.scores[key])
        except ValueError as err:
            warnings.warn(f"scorer '{key}': {err}; its metrics are NaN", stacklevel=2)
            out[key] = dict.fromkeys(metrics.OOD_METRICS, math.nan)
    return out


def mean_metrics(per_set: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Average ``{set: {scorer: {metric: value}}}`` over sets, per scorer and metric."""
    out: dict[str, dict[str, float]] = {}
    for by_scorer in per_set.values():
        for scorer, values in by_scorer.items():
            for metric, value in values.items():
                out.setdefault(scorer, {}).setdefault(metric, 0.0)
                out[scorer][metric] += value / len(per_set)
    return out
