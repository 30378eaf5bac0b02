"""GAIA: gradient abnormality of intermediate layers (zero-deflation GAIA-Z, channel-average GAIA-A).

Chen, Li, Qu, Wang, Wan, Xiao, "GAIA: Delving into Gradient-based Attribution Abnormality for
Out-of-distribution Detection", NeurIPS 2023, arXiv:2311.09620. Reference code:
github.com/JGEthanChen/GAIA-OOD (``cal_method.py::cal_zero`` and ``cal_grad_value``, ``hook.py``).

Both scores use the gradients of an objective w.r.t. the **outputs** of a set of hooked layers, taken
in eval mode for a whole batch at once (eval-mode BatchNorm keeps rows independent, and the backward
of a sum over the batch gives every row its own gradient). The final ID score is −abnormality.

Hooked layers (``hook.py``): ``model.gaia_layers(variant)`` when the model defines it, with variant ``"z"`` or
``"a"`` (or ``model.gaia_layers()`` for both), otherwise every ``BatchNorm2d``, ``SyncBatchNorm`` (what DDP
training with ``sync_batchnorm`` leaves in a model) and ``GroupNorm`` module for both. The reference hooks
differ by variant and network: GAIA-Z runs with ``-hook bn`` on CIFAR (every BatchNorm) and with
``-hook before_head`` on ImageNet; GAIA-A always with ``-hook before_head`` (WRN: every BatchNorm + the average pool;
ResNets: the BatchNorms of ``layer3`` and ``layer4`` + the ``layer4`` output). In GAIA-Z the last "before
head" hook is one more layer; in GAIA-A it only gives the denominator, a role the pooled feature vector
``model.features(x)`` plays here, so a model's GAIA-A list holds intermediate layers only.
:class:`~gradreg.models.CifarResNet18` and :class:`~gradreg.models.ResNet50` define the reference choices;
WRN's is the default.

Deviation (GAIA-A): the reference takes the denominator from the spatial-mean gradient of the last
hooked feature map (ResNet: ``layer4`` output; WRN: the average-pool output). Here it is the gradient
w.r.t. the pooled penultimate vector ``h = features(x)``. When ``h`` is the global average pool of a
feature map ``F`` of spatial size H×W, ∂/∂F = (∂/∂h) / (H·W) at every position, so ``d²`` is H·W times the
reference's and the abnormality is the reference's divided by the constant H·W: the ranking is unchanged
(for WRN, whose reference hook *is* the pooled vector, the values are identical).

Deviation (both): a hooked module that runs several times in one forward contributes one set of
channels per call (the reference keeps one gradient per module, that of the first call, whose tensor hook
fires last in the backward). A hooked layer off the input's path (a norm layer in a ``.detach()``-ed probe
branch whose output reaches the logits) gets the gradient of the objective w.r.t. its output, as per-sample
autograd gives it; the reference's backward to the input never runs that branch (zero gradients).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradreg.scorers.base import Scorer, checked, cut_off_input, input_grad
from gradreg.scorers.registry import SCORERS

GaiaVariant = Literal["z", "a"]


def gaia_layers(model: nn.Module, variant: GaiaVariant) -> list[nn.Module]:
    """The layers whose output gradients GAIA-Z (``"z"``) or GAIA-A (``"a"``) inspects (module docstring).

    Raises:
        ValueError: when the model has neither ``gaia_layers(variant)`` nor any BatchNorm2d/GroupNorm.
    """
    method = getattr(model, "gaia_layers", None)
    if callable(method):
        # A gaia_layers() without a parameter serves both variants.
        layers = list(method(variant) if inspect.signature(method).parameters else method())
    else:
        layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm | nn.GroupNorm)]
    if not layers:
        raise ValueError(
            f"GAIA found no layers to hook in {type(model).__name__}: define gaia_layers(variant) -> "
            "list[nn.Module] or use BatchNorm2d/SyncBatchNorm/GroupNorm layers"
        )
    return layers


class OutputGrads(list):
    """What :func:`record_output_grads` yields: after :meth:`backward`, the gradient w.r.t. each recorded output."""

    def __init__(self) -> None:
        super().__init__()
        self.edges: list[GradientEdge] = []

    def backward(self, model: nn.Module, objective: Tensor, x: Tensor, what: str = "forward(x)") -> None:
        """Fill the entries with the gradients of ``objective`` w.r.t. the recorded outputs, from one backward.

        Asking autograd for them (with the gradient w.r.t. ``x``) runs the backward through every recorded output
        that reaches the objective, also one off the input's path: a layer in a ``.detach()``-ed or
        ``torch.no_grad()`` branch (a probe on the detached features), which a backward to the input alone skips.
        """
        if not objective.requires_grad:
            raise cut_off_input(model, what)
        x_grad, *grads = torch.autograd.grad(objective, [x, *self.edges], allow_unused=True)
        if x_grad is None:  # a model that cuts x off its graph: one line, not zeros
            raise cut_off_input(model, what)
        for slot, grad in enumerate(grads):
            if grad is not None:
                self[slot] = grad


@contextmanager
def record_output_grads(layers: Sequence[nn.Module]) -> Iterator[OutputGrads]:
    """Record the output of every call of ``layers`` made inside the ``with`` block, to take gradients w.r.t. it.

    The yielded list holds one zero placeholder per call, in call order; its :meth:`OutputGrads.backward` fills in
    the gradients, without touching any parameter ``.grad``. Each is the gradient w.r.t. the value the layer returned,
    also when a later op modifies it in place (``out += identity`` in torchvision ResNets): autograd is asked for the
    gradient at the layer's output edge, taken as the layer returns. Entries stay zero for calls whose output does not
    influence the objective. An output that does not require grad (frozen weights on a cut-off input) is replaced by
    a copy that does, so that its gradient is taken all the same.
    """
    grads = OutputGrads()

    def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        grads.append(output.new_zeros(()).expand_as(output))  # zero placeholder, no memory
        replaced = None
        if not output.requires_grad:
            with torch.enable_grad():  # a copy, not the tensor itself: later in-place ops on it stay legal
                output = replaced = output.detach().requires_grad_(True).clone()
        grads.edges.append(get_gradient_edge(output))
        return replaced

    handles = [layer.register_forward_hook(forward_hook) for layer in layers]
    try:
        yield grads
    finally:
        for handle in handles:
            handle.remove()


def _per_channel(grad: Tensor) -> Tensor:
    """(N, C, *spatial) -> (N, C, S) with the spatial positions flattened (S = 1 for (N, C))."""
    return grad.flatten(2) if grad.dim() > 2 else grad.unsqueeze(2)


def _nonzero_fraction(grad: Tensor) -> Tensor:
    """(N, C, S) -> (N, C): the fraction of the S entries that are not exactly zero.

    On CUDA the L0 "norm" is one reduction pass; ``(g != 0).to(dtype).mean()`` is three passes over two
    full-size temporaries and made GAIA-Z cost 1.18-1.22x its forward + input-backward floor instead of 1.08-1.11x
    (WRN-40-2, H200: ``bench/results/h200_gaia_z_reduction.md``). On the CPU the L0 kernel is the slower
    one (``bench/results/gaia_z_reduction_cpu.md``). Both count exactly: the scores are identical.
    """
    dtype = torch.promote_types(grad.dtype, torch.float32)  # half precision counts exactly only up to 2,048
    if grad.is_cuda:
        return torch.linalg.vector_norm(grad, ord=0, dim=2, dtype=dtype) / grad.shape[2]
    return (grad != 0).to(dtype).mean(dim=2)


def gaia_z_score(model: nn.Module, x: Tensor, layers: Sequence[nn.Module] | None = None) -> Tensor:
    """GAIA-Z (zero deflation): −mean over hooked channels of r², r = non-zero fraction of the gradient.

    Objective Σ_batch max_c f_c(x). For each hooked channel, ``r`` is the fraction of spatial
    positions where the gradient w.r.t. the layer output is not exactly zero (no epsilon, as in the
    reference). ``model`` must be in eval mode (the Scorer does this).

    Args:
        model: classifier with normalized inputs.
        x: inputs, shape (N, ...).
        layers: layers to hook; default :func:`gaia_layers` for ``"z"``.

    Returns:
        Scores, shape (N,); higher = more in-distribution.
    """
    layers = gaia_layers(model, "z") if layers is None else layers
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        with record_output_grads(layers) as grads:
            logits = checked(model, model(x))
        # max, not amax: on exactly tied top logits the reference's gradient goes to one class, amax would split it.
        grads.backward(model, logits.max(dim=1).values.sum(), x)
    ratios = torch.cat([_nonzero_fraction(_per_channel(g)) for g in grads], dim=1)
    return -ratios.square().mean(dim=1)


def gaia_a_score(model: nn.Module, x: Tensor, layers: Sequence[nn.Module] | None = None) -> Tensor:
    """GAIA-A (channel-wise average): −mean over hooked channels of (|ā| / d)².

    Two backward passes on one forward, with ``h = model.features(x)``:

    1. objective Σ_batch Σ_c log softmax_c(f(x)); ``d(x) = sqrt(mean_j |∂/∂h_j|)``;
    2. objective Σ_batch Σ_j h_j; ``ā`` = spatial mean of the gradient w.r.t. each hooked layer output.

    Args:
        model: classifier exposing ``features`` and ``fc``; must be in eval mode.
        x: inputs, shape (N, ...).
        layers: intermediate layers to hook; default :func:`gaia_layers` for ``"a"``.

    Returns:
        Scores, shape (N,); higher = more in-distribution. ``d²`` is clamped to the smallest normal
        float, so an exactly uniform softmax (d = 0) gives a huge abnormality instead of 0/0.
    """
    layers = gaia_layers(model, "a") if layers is None else layers
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        with record_output_grads(layers) as grads:
            features = checked(model, model.features(x), "features(x)")
        logits = checked(model, model.fc(features), "fc(features(x))")
        if not features.requires_grad:  # a model that cuts x off its graph: input_grad says so in one line
            input_grad(model, features, x, "features(x)")
        # Backward 1 stops at the features, so it reaches none of the hooked layers.
        (feature_grad,) = torch.autograd.grad(torch.log_softmax(logits, dim=1).sum(), features, retain_graph=True)
        grads.backward(model, features.sum(), x, "features(x)")
    dtype = torch.promote_types(x.dtype, torch.float32)  # means of a half-precision model's gradients, in float32
    denom_sq = feature_grad.abs().mean(dim=1, dtype=dtype).clamp_min(torch.finfo(dtype).tiny)  # d(x)², not 0/0
    channel_means = torch.cat([_per_channel(g).mean(dim=2, dtype=dtype) for g in grads], dim=1)
    return -(channel_means.square() / denom_sq.unsqueeze(1)).mean(dim=1)


def _require_layers(model: nn.Module, variant: GaiaVariant) -> None:
    """:meth:`Scorer.require` of GAIA: a TypeError (so that ``supports`` says False) when there is nothing to hook."""
    try:
        gaia_layers(model, variant)
    except ValueError as err:
        raise TypeError(str(err)) from None


@SCORERS.register("gaia_z")
@dataclass(frozen=True)
class GaiaZ(Scorer):
    """GAIA-Z on ``model.gaia_layers("z")`` or every BatchNorm2d/SyncBatchNorm/GroupNorm."""

    needs_grad: ClassVar[bool] = True

    def require(self, model: nn.Module) -> None:  # noqa: D102
        super().require(model)
        _require_layers(model, "z")

    def score(self, model: nn.Module, x: Tensor) -> Tensor:  # noqa: D102
        return gaia_z_score(model, x)


@SCORERS.register("gaia_a")
@dataclass(frozen=True)
class GaiaA(Scorer):
    """GAIA-A on ``model.gaia_layers("a")`` or every BatchNorm2d/SyncBatchNorm/GroupNorm."""

    needs_grad: ClassVar[bool] = True
    needs_head: ClassVar[bool] = True

    def require(self, model: nn.Module) -> None:  # noqa: D102
        super().require(model)
        _require_layers(model, "a")

    def score(self, model: nn.Module, x: Tensor) -> Tensor:  # noqa: D102
        return gaia_a_score(model, x)
