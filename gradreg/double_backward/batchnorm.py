"""Training-mode BatchNorm with a cheap double backward, for GReg's penalty (double backprop).

GReg's regularizer differentiates an input gradient w.r.t. the weights, so every layer is
back-propagated twice. For BatchNorm with batch statistics PyTorch derives that second backward from
its generic formula (``batchnorm_double_backward``), about 30 reductions and as many elementwise
kernels per layer; on an H100 it was 31-46 % of a WRN-40-2 GReg step (``docs/benchmarks.md``). The
closed form below needs three per-channel reductions and eight elementwise kernels (two products, six
``addcmul``), plus a few on per-channel vectors: 2.8x less GPU time for these layers, and a GReg step
1.14x (WRN-40-2) to 1.33x (ResNet-50) faster on an H100 in float32.

Notation per channel, over its M = N·H·W elements: ``x̂ = (x − μ)·r`` with ``r = (σ² + ε)^-½``,
``y = γ·x̂ + β``. The first backward (PyTorch's kernel) gives ``gβ = S₁ = Σ gy``, ``gγ = S₂ = Σ gy·x̂`` and
``gx = (γr/M)(M·gy − S₁ − x̂·S₂)``. For the upstream gradients ``(ggx, ggγ, ggβ)`` of ``(gx, gγ, gβ)`` let
``T₁ = Σ ggx``, ``T₂ = Σ ggx·x̂``, ``T₃ = Σ ggx·gy``, ``C = M·T₃ − S₁T₁ − S₂T₂``, ``a = γr/M``. Then

- ``∂/∂gy = a(M·ggx − T₁ − x̂·T₂) + ggγ·x̂ + ggβ``
- ``∂/∂γ = r·C/M``
- ``∂/∂x = −r(v − mean(v) − x̂·mean(v·x̂)) − (γr²C/M²)·x̂`` with ``v = a·S₂·ggx + (a·T₂ − ggγ)·gy``,
  ``mean(v) = (a·S₂·T₁ + (a·T₂ − ggγ)·S₁)/M``, ``mean(v·x̂) = (a·S₂·T₂ + (a·T₂ − ggγ)·S₂)/M``

(the x-derivative goes through x̂, r and S₂; μ and σ² are functions of x). Checked against autograd's
own double backward and by ``gradgradcheck`` in ``tests/test_double_backward.py``; third derivatives are not
supported. Eval mode is untouched (``nn.BatchNorm*d.forward``).

The forward and every first backward run one of two sets of kernels (``kernels``, per layer): ``pytorch``, the
ones ``nn.BatchNorm`` runs (``aten._batch_norm_impl_index``: cuDNN on CUDA where it applies, else ATen's), or
``composite``: ``torch.var_mean`` and an ``addcmul`` forward, and a backward from ``x − μ``, two ``torch.sum``
reductions and two ``addcmul`` passes. ``auto`` (the default) takes the composite kernels for CUDA tensors in
the (N, C, ...) layout with at most 128 channels. Reason (deviation from PyTorch's kernels, same results): in
the H100 profile of a WRN-40-2 GReg step the NCHW BatchNorm kernels were far from the memory bound, ATen's
backward took 339 us per call on average and cuDNN's 562 us per 384x32x32x32 call (ten times the time to move
its data); ATen's kernel reduces each channel in one thread block, and these layers have 32-128 channels, while
generic ``torch.sum`` reductions split each channel over many blocks (about 20 us per call on the same
activations, in the profile of PyTorch's double backward). Channels-last tensors keep cuDNN's NHWC kernels,
which were fast, and so do wider layers (ResNet-50's 256-2048 channels), for which there is no measurement yet.
The composite kernels move about 2.5 times the bytes of an ideal fused kernel; step-level H100 numbers:
``docs/benchmarks.md``. Both are as accurate as PyTorch's in float64 and bf16, also with a mean far from zero
(the backward centers x first, as ATen does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

KERNELS = ("auto", "composite", "pytorch")
AUTO_MAX_CHANNELS = 128  # the widest BatchNorm measured slow with PyTorch's NCHW kernels (WRN-40-2, H100)
_COMPOSITE = -1  # ctx.impl of the composite kernels (PyTorch's implementations are 0 native, 1 cuDNN, 2 MIOpen)


def check_kernels(kernels: str) -> None:
    """A ValueError that lists ``KERNELS`` unless ``kernels`` is one of them."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown BatchNorm kernels {kernels!r}; choose one of {', '.join(KERNELS)}")


def _dims(x: Tensor) -> list[int]:
    """The dimensions a per-channel statistic reduces: all but the channels (dim 1)."""
    return [0, *range(2, x.dim())]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector, broadcast against ``x`` (N, C, ...)."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _acc_dtype(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16 activations, else x's dtype: statistics and products are accumulated in it."""
    return torch.promote_types(x.dtype, torch.float32)


def _use_composite(kernels: str, x: Tensor) -> bool:
    """``auto``: composite kernels for CUDA (N, C, ...) tensors with C <= ``AUTO_MAX_CHANNELS``, else PyTorch's.

    The H100 profile (module docstring) showed PyTorch's NCHW kernels slow on 32-128 channels (ATen's reduces a
    channel in one thread block); wider layers and channels-last inputs (cuDNN's NHWC kernels were fast) keep them
    until a measurement says otherwise (``bench/batchnorm_kernels.py``).
    """
    if kernels == "auto":
        return x.is_cuda and x.is_contiguous() and x.shape[1] <= AUTO_MAX_CHANNELS
    return kernels == "composite"


def _composite_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
    momentum: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(y, μ, r) from ``torch.var_mean`` and one ``addcmul``; running statistics updated as ATen does."""
    var, mean = torch.var_mean(x.to(_acc_dtype(x)), _dims(x), correction=0)  # Welford, as ATen's kernels
    invstd = torch.rsqrt(var + eps)
    if running_mean is not None:
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    if running_var is not None:
        m = x.numel() // x.shape[1]
        running_var.lerp_((var * (m / (m - 1))).to(running_var.dtype), momentum)  # unbiased, as ATen stores it
    scale = invstd if weight is None else weight * invstd
    shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
    return torch.addcmul(_per_channel(shift, x), x, _per_channel(scale, x)).to(x.dtype), mean, invstd


def _composite_backward(
    gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, mask: list[bool]
) -> tuple[Tensor | None, Tensor, Tensor]:
    """(gx, gγ, gβ) from the centered input, two reductions and two elementwise passes.

    ``S₁ = Σ gy``, ``S₂ = r·Σ gy·(x − μ)``, ``gx = γr·gy − (γr²S₂/M)·(x − μ) − γr·S₁/M``. ``x − μ`` is formed
    first, as ATen does: ``Σ gy·x − μS₁`` loses float32 digits to cancellation when |μ| is large against σ.
    """
    m = x.numel() // x.shape[1]
    centered = x - _per_channel(mean, x)  # in the accumulation dtype (μ is float32 for bf16 x)
    s1 = gy.sum(_dims(x), dtype=centered.dtype)
    s2 = (gy * centered).sum(_dims(x)).mul_(invstd)  # the product in float32 too
    gx = None
    if mask[0]:
        a = invstd if weight is None else weight * invstd  # γr
        k = a / -m
        gx = torch.addcmul(_per_channel(k * s1, x), centered, _per_channel(k * invstd * s2, x))
        gx = gx.addcmul_(gy, _per_channel(a, x)).to(x.dtype)
    if weight is not None:
        s2, s1 = s2.to(weight.dtype), s1.to(weight.dtype)
    return gx, s2, s1


def _first_backward(
    impl: int, gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, reserve: Tensor,
    eps: float, mask: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """(gx, gγ, gβ) by the kernels of the forward's implementation (``impl``: composite, native, cuDNN, MIOpen)."""
    if impl == _COMPOSITE:
        return _composite_backward(gy, x, weight, mean, invstd, mask)
    # gy in x's memory format, as PyTorch's own BatchNorm backward passes it to cuDNN
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    gy = gy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.ops.aten._batch_norm_impl_index_backward(
        impl, x, gy, weight, None, None, mean, invstd, True, eps, mask, reserve
    )


class _BatchNormGrad(torch.autograd.Function):
    """(gy, x, γ) -> (gx, gγ, gβ) of training-mode BatchNorm, with the closed-form backward above."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
        reserve: Tensor, impl: int, eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        # The forward node's plain backward may run later with the same reserve: cuDNN gets a copy, as in PyTorch.
        gx, gw, gb = _first_backward(impl, gy, x, weight, mean, invstd, reserve.clone(), eps, [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, invstd, gw, gb)
        ctx.set_materialize_grads(False)  # gγ, gβ are usually unused: no zero tensors for their gradients
        return gx, gw, gb

    @staticmethod
    def backward(ctx: Any, ggx: Tensor | None, ggw: Tensor | None, ggb: Tensor | None) -> tuple:
        gy, x, weight, mean, invstd, s2, s1 = ctx.saved_tensors
        f32 = _acc_dtype(x)
        m = x.numel() // x.shape[1]
        r, mean, s1, s2 = invstd.to(f32), mean.to(f32), s1.to(f32), s2.to(f32)
        # bf16 activations as float32 copies: mixed-dtype kernels were slower on the CPU (1.3x on ResNet-50's layers)
        xf, gyf = x.to(f32), gy.to(f32)
        ggx = torch.zeros_like(xf) if ggx is None else ggx.to(f32)

        def view(t: Tensor) -> Tensor:
            return _per_channel(t, x)

        # Per-channel terms with as few kernels as possible: each is a launch, and there are ~20 per layer.
        dims = _dims(x)
        gamma_r = r if weight is None else weight.to(f32) * r  # γr = a·M
        r_m, a = r / m, gamma_r / m
        x_hat = torch.addcmul(view((mean * r).neg_()), xf, view(r))
        t1, t2, t3 = ggx.sum(dims), (ggx * x_hat).sum(dims), (ggx * gyf).sum(dims)
        c = torch.addcmul(torch.addcmul(t3 * m, s1, t1, value=-1), s2, t2, value=-1)
        q = a * t2 if ggw is None else a * t2 - ggw.to(f32)  # v = p·ggx + q·gy
        grad_gy = grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # a(M·ggx − T₁ − x̂·T₂) + ggγ·x̂ + ggβ = γr·ggx − q·x̂ + (ggβ − a·T₁)
            shift = (a * t1).neg_() if ggb is None else torch.addcmul(ggb.to(f32), a, t1, value=-1)
            grad_gy = torch.addcmul(view(shift), x_hat, view(q), value=-1).addcmul_(ggx, view(gamma_r))
            grad_gy = grad_gy.to(gy.dtype)
        if ctx.needs_input_grad[1]:  # −r(v − mean(v) − x̂·mean(v·x̂)) − (γr²C/M²)·x̂
            p = a * s2
            r_mean_v = torch.addcmul(p * t1, q, s1).mul_(r_m)
            x_hat_coef = torch.addcmul(torch.addcmul(p * t2, q, s2), a, c, value=-1).mul_(r_m)
            grad_x = torch.addcmul(view(r_mean_v), x_hat, view(x_hat_coef))
            grad_x = grad_x.addcmul_(ggx, view(r * p), value=-1).addcmul_(gyf, view(r * q), value=-1).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_w = (c * r_m).to(weight.dtype)
        return grad_gy, grad_x, grad_w, None, None, None, None, None


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode BatchNorm; under ``create_graph`` its backward is ``_BatchNormGrad``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        kernels: str,
    ) -> Tensor:
        if _use_composite(kernels, x):
            out, mean, invstd = _composite_forward(x, weight, bias, running_mean, running_var, momentum, eps)
            reserve, ctx.impl = x.new_empty(0), _COMPOSITE
        else:  # the implementation F.batch_norm would pick (cuDNN where it applies; its saved variance is invstd too)
            out, mean, invstd, reserve, ctx.impl = torch.ops.aten._batch_norm_impl_index(
                x, weight, bias, running_mean, running_var, True, momentum, eps, torch.backends.cudnn.enabled
            )
        ctx.save_for_backward(x, weight, mean, invstd, reserve)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple:
        x, weight, mean, invstd, reserve = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: make the backward cheap to differentiate
            gx, gw, gb = _BatchNormGrad.apply(gy, x, weight, mean, invstd, reserve, ctx.impl, ctx.eps)
        else:
            mask = list(ctx.needs_input_grad[:3])
            gx, gw, gb = _first_backward(ctx.impl, gy, x, weight, mean, invstd, reserve, ctx.eps, mask)
        if weight is None:
            gw = gb = None
        return gx, gw, gb, None, None, None, None, None


def batch_norm_train(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    kernels: str = "auto",
) -> Tensor:
    """``F.batch_norm(..., training=True)`` with the cheap double backward (running stats updated in place).

    ``kernels`` picks the forward and first-backward kernels (``KERNELS``; see ``_use_composite``); the double
    backward is the closed form either way.
    """
    check_kernels(kernels)
    if x.numel() == x.shape[1]:  # as F.batch_norm: the batch variance of one value is undefined
        raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel, got input {tuple(x.shape)}")
    return _BatchNormTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps, kernels)


class DoubleBackwardBatchNorm:
    """Mixin for ``nn.BatchNorm*d``: training mode goes through :func:`batch_norm_train`.

    ``kernels`` (class attribute, settable per layer): which forward and first-backward kernels it runs.
    """

    kernels: str = "auto"

    def forward(self, x: Tensor) -> Tensor:
        """Training mode: :func:`batch_norm_train` with this layer's kernels; eval mode: ``nn.BatchNorm``'s."""
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        # Running-statistics bookkeeping exactly as nn.modules.batchnorm._BatchNorm.forward does it.
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        return batch_norm_train(
            x, self.running_mean, self.running_var, self.weight, self.bias, momentum, self.eps, self.kernels
        )


class DoubleBackwardBatchNorm1d(DoubleBackwardBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with the cheap double backward in training mode."""


class DoubleBackwardBatchNorm2d(DoubleBackwardBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the cheap double backward in training mode."""


class DoubleBackwardBatchNorm3d(DoubleBackwardBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with the cheap double backward in training mode."""


CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: DoubleBackwardBatchNorm1d,
    nn.BatchNorm2d: DoubleBackwardBatchNorm2d,
    nn.BatchNorm3d: DoubleBackwardBatchNorm3d,
}
