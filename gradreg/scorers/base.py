"""The scorer contract shared by every post-hoc OOD score.

A scorer maps ``(model, x) -> Tensor[N]``, **higher = more in-distribution** (the ID-positive
convention of the energy/GReg papers). Calling a scorer:

- puts the model in eval mode and restores each module's previous mode afterwards; a BatchNorm without
  running statistics is refused (it couples the rows of a batch);
- leaves parameter ``.grad`` untouched (gradients come from ``torch.autograd.grad`` or ``torch.func``);
- works when the caller runs under ``torch.inference_mode()`` (Lightning's test loop): the input is
  cloned outside inference mode, because inference tensors can never join autograd
  (Lightning issue #13948). A model whose weights are inference tensors (loaded under ``torch.inference_mode()``)
  cannot be cloned here; a scorer that differentiates through it says so in one line.

Settings are checked when a scorer is built: each value must match its annotation, and numeric settings
their ``lower_bounds`` (a temperature of ``"1e3"``, a string to PyYAML, or of 0 fails there, not mid-run).

Subclasses implement :meth:`Scorer.score`. Scorers that only need the penultimate features and the
logits subclass :class:`OutputScorer` so that callers can share one forward pass among them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradreg.losses import upcast
from gradreg.models import eval_mode, inference_weights_error
from gradreg.registry import Settings


def require_head(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` has ``features(x)`` and ``fc`` (docs/scorers.md lists what uses them)."""
    missing = [name for name in ("features", "fc") if not callable(getattr(model, name, None))]
    if missing:
        raise TypeError(
            f"{type(model).__name__} has no {' and no '.join(missing)}: this needs features(x) -> (N, D), the input "
            "of the last layer, and fc, that layer (forward(x) = fc(features(x))); wrap the model to expose them "
            "(docs/scorers.md, 'What your model must expose')"
        )


def checked(model: nn.Module, value: object, what: str = "forward(x)") -> Tensor:
    """``value`` if it is a 2-D tensor, else a TypeError naming what ``model`` returned and what scorers need.

    ``what`` names the call: ``forward(x)`` must give the logits (N, C), ``features(x)`` the pooled vector (N, D).
    A model returning a tuple or dict, or an unpooled feature map, would otherwise fail deep inside a scorer (or, for
    the logit scores, return an (N, ...) array of the wrong shape). Logits come back in float32 from a half-precision
    model (:func:`~gradreg.losses.upcast`, as autocast runs softmax and cross-entropy: in bfloat16, ODIN's softmax at
    T = 1000, every probability near 1/C, tied 600 images to three scores); features stay in the model's dtype, for
    its ``fc``.
    """
    if isinstance(value, Tensor) and value.dim() == 2:
        return value if what == "features(x)" else upcast(value)
    got = type(value).__name__
    if isinstance(value, Tensor):
        got = f"a {value.dim()}-D tensor of shape {tuple(value.shape)}"
    need = "the pooled penultimate vector (N, D)" if what == "features(x)" else "the logits (N, C)"
    raise TypeError(
        f"{type(model).__name__}.{what} returned {got}: scorers need {need}; wrap the model so that it returns them "
        "(docs/scorers.md, 'What your model must expose')"
    )


def input_grad(model: nn.Module, output: Tensor, x: Tensor, what: str = "forward(x)", **kwargs: Any) -> Tensor:
    """``torch.autograd.grad(output, x, **kwargs)[0]``, or a TypeError naming a model that cuts ``x`` off its graph.

    A model that computes its features under ``torch.no_grad()`` or ``.detach()``-es them (a way to freeze a backbone)
    has no gradient w.r.t. its input, which ODIN, GAIA and DeepFool need; autograd's own error would not say why.
    """
    grad = torch.autograd.grad(output, x, allow_unused=True, **kwargs)[0] if output.requires_grad else None
    if grad is None:
        raise cut_off_input(model, what)
    return grad


def cut_off_input(model: nn.Module, what: str = "forward(x)") -> TypeError:
    """The error of :func:`input_grad` for a model whose ``what`` does not depend on its input through autograd."""
    return TypeError(
        f"{type(model).__name__}.{what} does not depend on x through autograd (a torch.no_grad() or .detach() "
        "inside the model?): this scorer differentiates it w.r.t. the input; freeze weights with "
        "requires_grad_(False) instead (docs/scorers.md, 'What your model must expose')"
    )


def _batch_statistics(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None


def require_running_stats(model: nn.Module) -> None:
    """Raise a ValueError naming a BatchNorm without running statistics, which would make scores depend on the batch.

    Such a layer (``track_running_stats=False``) normalizes with the statistics of the batch even in eval mode.
    """
    for name, m in model.named_modules():
        if _batch_statistics(m):
            raise ValueError(
                f"{type(m).__name__} '{name}' has no running statistics (track_running_stats=False): it normalizes "
                "with the batch's statistics in eval mode, so scores would depend on the other inputs; scorers need "
                "running statistics (or a per-sample norm such as GroupNorm)"
            )


@contextmanager
def scoring(model: nn.Module) -> Iterator[None]:
    """Eval mode (each module's own flag restored afterwards) outside ``inference_mode``, for a per-sample model.

    A BatchNorm without running statistics is refused (:func:`require_running_stats`).
    """
    with eval_mode(model) as modules, torch.inference_mode(False):
        # Checked on the list eval_mode walks anyway: a second walk of the modules costs ~0.1 ms per call (CPU).
        if any(map(_batch_statistics, modules)):
            require_running_stats(model)
        yield


class Scorer(Settings):
    """Base class of all scorers; see the module docstring for the contract."""

    needs_grad: ClassVar[bool] = False
    needs_head: ClassVar[bool] = False  #: whether it calls ``model.features`` and ``model.fc`` (else ``model(x)``)

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        """Return one score per row of ``x`` (higher = more in-distribution), shape (N,)."""
        raise NotImplementedError

    def settings_for(self, input_shape: Sequence[int]) -> dict[str, Any]:
        """:meth:`settings` as the scorer computes with on inputs of ``input_shape`` (C, H, W): defaults resolved."""
        return self.settings()

    def require(self, model: nn.Module) -> None:
        """Raise a TypeError naming what ``model`` lacks for this scorer (``features`` and ``fc`` if ``needs_head``)."""
        if self.needs_head:
            require_head(model)

    def supports(self, model: nn.Module) -> bool:
        """Whether ``model`` has what this scorer needs (:meth:`require`); ``evaluate.py`` runs those by default."""
        try:
            self.require(model)
        except TypeError:
            return False
        return True

    def __call__(self, model: nn.Module, x: Tensor) -> Tensor:
        """Score ``x`` under the contract of the module docstring; shape (N,)."""
        self.require(model)
        if not x.is_floating_point():  # e.g. torchvision.io.read_image's uint8: else a backend error deep inside
            raise TypeError(
                f"x has dtype {x.dtype}: scorers take float images normalized as the model's training data "
                "(e.g. torchvision's v2.ToDtype(torch.float32, scale=True), then v2.Normalize)"
            )
        with scoring(model):
            x = x.clone()  # an inference tensor cannot be used in autograd; a clone made here can
            with torch.set_grad_enabled(self.needs_grad):
                try:
                    return upcast(self.score(model, x).detach())
                except RuntimeError as err:
                    raise inference_weights_error(model, err, "this scorer") from None


class OutputScorer(Scorer):
    """A scorer that is a function of the penultimate features and the logits only."""

    needs_head: ClassVar[bool] = True

    def score_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        """Score from features (N, D) and logits (N, C); shape (N,)."""
        raise NotImplementedError

    def score(self, model: nn.Module, x: Tensor) -> Tensor:  # noqa: D102
        return self.score_outputs(*head_outputs(model, x))


def head_outputs(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`checked` ``(features(x), fc(features(x)))``, both at least float32: the arguments of ``score_outputs``."""
    features = checked(model, model.features(x), "features(x)")
    return upcast(features), checked(model, model.fc(features), "fc(features(x))")
