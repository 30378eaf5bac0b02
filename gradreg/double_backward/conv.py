"""Convolutions whose double backward uses the kernels of an ordinary backward, for GReg's penalty.

A convolution's input gradient is ``gx = convᵀ(gy, W)``. Double backprop differentiates it: for an
upstream gradient ``ggx`` of ``gx``, ``∂/∂gy = conv(ggx, W)`` (a forward convolution) and ``∂/∂W`` is
the weight gradient of a convolution whose input is ``ggx`` and whose output gradient is ``gy``.
PyTorch (``_convolution_double_backward``) computes that weight term as a *forward* convolution with
batch and channels swapped and ``gy`` as the filter: a C_in-image batch with N channels and an
H_out x W_out filter. cuDNN has no fast kernel for that shape; on an H100 it took an FFT algorithm
(1 ms per 32x32 WRN-40-2 layer at batch 384) plus transposing copies, about 32 of the 36 ms that
the convolution double backward took in a 108 ms GReg step (``bench/results/h100_profile.txt``),
while an ordinary backward computed the input *and* weight gradients of all 40 convolutions in
10.6 ms. Here the weight term is ``convolution_backward``'s weight gradient, the kernel every
training step already runs (same value: a sum over the same products, tested in float64).

The first backward of :class:`_Convolution` under ``create_graph`` returns ``gx`` from
:class:`_InputGrad`, whose backward is the two terms above, written with differentiable ops (higher
derivatives stay correct). Parameter gradients that the running backward does not use (GReg's
``autograd.grad(E, x)``) are skipped, as PyTorch's own convolution node does; without
``create_graph`` the backward is one ``convolution_backward`` call, exactly PyTorch's. Eval mode and
string paddings (``"same"``, ``"valid"``) keep ``nn.Conv*d.forward``; under autocast the inputs are
cast before the custom function, so its backward sees the forward's dtypes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.autograd.graph import get_gradient_edge

# (stride, padding, dilation, groups) of a convolution, as lists for the ATen calls
ConvParams = tuple[list[int], list[int], list[int], int]


def _used(t: Tensor | None) -> bool:
    """Whether the running backward pass uses the gradient of ``t`` (the engine's own bookkeeping)."""
    if t is None or not t.requires_grad:
        return False
    try:  # a private function (torch.autograd.graph's multi-grad hooks use it); any doubt means "used"
        return torch._C._will_engine_execute_node(get_gradient_edge(t).node)
    except (AttributeError, RuntimeError):  # gone from torch, or a leaf that autograd.grad captures
        return True


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, conv: ConvParams) -> Tensor:
    """``conv(x, W) + b`` by ATen's ``convolution`` (what ``nn.Conv*d`` runs)."""
    stride, padding, dilation, groups = conv
    return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)


def _backward(gy: Tensor, x: Tensor, weight: Tensor, conv: ConvParams, mask: list[bool]) -> tuple:
    """(gx, gW, gb) of ``conv(x, W) + b`` by ATen's ``convolution_backward`` (what ``nn.Conv*d`` runs)."""
    stride, padding, dilation, groups = conv
    bias_sizes = [weight.shape[0]] if mask[2] else None
    return torch.ops.aten.convolution_backward(
        gy, x, weight, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups, mask
    )


class _InputGrad(torch.autograd.Function):
    """(gy, W) -> gx = convᵀ(gy, W), differentiated by a convolution and an ordinary weight gradient."""

    @staticmethod
    def forward(ctx: FunctionCtx, gy: Tensor, weight: Tensor, x: Tensor, conv: ConvParams) -> Tensor:
        # x (detached) only tells the kernel the input's shape and memory format.
        ctx.save_for_backward(gy, weight)
        ctx.conv = conv
        return _backward(gy, x, weight, conv, [True, False, False])[0]

    @staticmethod
    def backward(ctx: Any, ggx: Tensor) -> tuple:
        gy, weight = ctx.saved_tensors
        grad_gy = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_gy = _forward(ggx, weight, None, ctx.conv)
        if ctx.needs_input_grad[1]:
            grad_w = _backward(gy, ggx, weight, ctx.conv, [False, True, False])[1]
        return grad_gy, grad_w, None, None


class _Convolution(torch.autograd.Function):
    """``conv(x, W) + b`` by PyTorch's kernels; under ``create_graph`` its input gradient is ``_InputGrad``."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, conv: ConvParams) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.conv = conv
        return _forward(x, weight, bias, conv)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple:
        x, weight, bias = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and _used(weight), _used(bias)]
        if not torch.is_grad_enabled():
            return (*_backward(gy, x, weight, ctx.conv, mask), None)
        # create_graph=True: make the backward cheap to differentiate
        gx = _InputGrad.apply(gy, weight, x.detach(), ctx.conv) if mask[0] else None
        gw = _backward(gy, x, weight, ctx.conv, [False, True, False])[1] if mask[1] else None
        gb = gy.sum([0, *range(2, gy.dim())]) if mask[2] else None
        return gx, gw, gb, None


class _DoubleBackwardConv:
    """Mixin for ``nn.Conv*d``: training mode goes through :class:`_Convolution`."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or isinstance(self.padding, str):  # "same"/"valid": left to nn.Conv*d
            return super().forward(x)
        padding = list(self.padding)
        if self.padding_mode != "zeros":  # as nn.Conv*d: pad explicitly, then convolve without padding
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = [0] * len(padding)
        weight, bias = self.weight, self.bias
        device = x.device.type
        if torch.is_autocast_enabled(device):  # the cast autocast would do inside, done where autograd sees it
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = (t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in (x, weight, bias))
        conv = (list(self.stride), padding, list(self.dilation), self.groups)
        return _Convolution.apply(x, weight, bias, conv)


class DoubleBackwardConv1d(_DoubleBackwardConv, nn.Conv1d):
    """``nn.Conv1d`` with the cheaper double backward in training mode."""


class DoubleBackwardConv2d(_DoubleBackwardConv, nn.Conv2d):
    """``nn.Conv2d`` with the cheaper double backward in training mode."""


class DoubleBackwardConv3d(_DoubleBackwardConv, nn.Conv3d):
    """``nn.Conv3d`` with the cheaper double backward in training mode."""


CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: DoubleBackwardConv1d,
    nn.Conv2d: DoubleBackwardConv2d,
    nn.Conv3d: DoubleBackwardConv3d,
}
