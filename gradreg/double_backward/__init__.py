"""Layers with a cheaper double backward, for GReg's penalty (double backprop).

GReg's regularizer is the norm of an input gradient (Sharifi et al., 2024, arXiv:2404.12368;
``ALGORITHMS.md`` 1.2); training differentiates it w.r.t. the weights, so every layer is
back-propagated twice. For two layer types PyTorch's derivative of the backward costs far more than an
ordinary backward: training-mode BatchNorm (a generic formula with about 30 reductions per layer;
:mod:`.batchnorm` has a closed form) and convolutions (the weight term as a convolution with the output
gradient as the filter; :mod:`.conv` uses an ordinary weight gradient instead). Both compute the same
gradients. PyTorch's SyncBatchNorm has no double backward at all; :mod:`.batchnorm` gives it one.
:func:`use_double_backward` switches a model's layers to them by changing their class only:
parameters, buffers, hooks, the state dict and ``isinstance`` checks stay as they were, and eval mode
runs the original ``forward``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from gradreg.double_backward import batchnorm, conv

LAYERS: dict[str, dict[type[nn.Module], type[nn.Module]]] = {
    "batchnorm": batchnorm.CONVERSIONS,
    "conv": conv.CONVERSIONS,
}
_ORIGINALS = {new: old for table in LAYERS.values() for old, new in table.items()}


def use_double_backward(
    model: nn.Module, layers: Iterable[str] = tuple(LAYERS), batchnorm_compile: str = "auto"
) -> nn.Module:
    """Switch ``model``'s plain layers of the given kinds (``LAYERS``) to their double-backward variants, in place.

    Only exact types are converted: a subclass may override ``forward``. ``batchnorm_compile``: whether the
    double backward of the BatchNorm layers it converts runs compiled (``batchnorm.COMPILE``: ``auto``, ``on``,
    ``off``; see ``batchnorm._closed_form_fn``); layers converted before keep theirs (the module converts again the
    SyncBatchNorm layers DDP's ``sync_batchnorm`` makes).
    """
    batchnorm.check_compile(batchnorm_compile)
    table = {old: new for kind in layers for old, new in LAYERS[kind].items()}
    for module in model.modules():
        converted = table.get(type(module))
        if converted is None:
            continue
        module.__class__ = converted
        if isinstance(module, batchnorm.DoubleBackwardBatchNorm):
            module.compile_setting = batchnorm_compile
    return model


def original_type(module: nn.Module) -> type[nn.Module]:
    """The ``torch.nn`` class a converted layer came from (the layer's own class otherwise)."""
    return _ORIGINALS.get(type(module), type(module))
