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

(the x-derivative goes through x̂, r and S₂; μ and σ² are functions of x). Checked against autograd's own double
backward and by ``gradgradcheck`` in ``tests/test_double_backward.py``. A third derivative raises an error, as
through PyTorch's own BatchNorm (μ and r are saved as constants, so it would come out wrong). Eval mode is untouched
(``nn.BatchNorm*d.forward``).

The forward and every first backward run the kernels ``nn.BatchNorm`` runs (``aten._batch_norm_impl_index``:
cuDNN on CUDA where it applies, else ATen's). Composite kernels for them (``torch.var_mean``, ``torch.sum`` and
``addcmul``) were faster per layer on 32-channel NCHW maps on an H100 but made the WRN-40-2 GReg step slower
(95.5 vs 83.7 ms: more kernel launches than the GPU time they saved) and were removed.

The closed form is elementwise work and per-channel sums, 30-odd kernels per layer in eager mode, most of them on
per-channel vectors: launch-bound on a GPU. ``compile_setting`` (per layer; ``auto`` by default) runs it through
``torch.compile`` on CUDA where Triton is installed (``on`` forces it, also on the CPU; ``off`` keeps it eager),
which fuses it into a few kernels: on an H100 3.2 instead of 12.8 ms of GPU time per WRN-40-2 GReg step. Deviation
from the reference code (which has neither): same values up to float32 rounding order, tested against the eager
form. The first GReg step compiles it (seconds, once per dtype and memory layout; Inductor caches the kernels on
disk); if compiling fails (say, no C compiler for Triton), a warning says so and the eager form runs from then on.

SyncBatchNorm (DDP's ``sync_batchnorm``): PyTorch's has no double backward at all (its backward kernels have no
derivative, pytorch/pytorch#61222). :class:`DoubleBackwardSyncBatchNorm` normalizes with the statistics of all ranks
(one collective per forward: each rank's count, mean and sum of squared deviations) and takes the closed form above
over the ranks: a rank's first backward and its derivatives need, besides its own values, only the per-channel sums
S₁, S₂, T₁, T₂, T₃ (and Σ ggγ·S₁, Σ ggγ·S₂) of all ranks, one ``all_reduce`` of a few vectors per backward. A
rank's input gradient then includes what its images contribute, through the shared statistics, to the other ranks'
losses, as autograd through one BatchNorm over the ranks' whole batch would; its γ gradient is its share of the total,
which DDP's gradient average completes. Its closed form runs eagerly, whatever ``compile_setting`` says (the sum over
the ranks sits in the middle of it). The first version let autograd differentiate plain tensor ops and
differentiable ``all_reduce`` calls: on an H200 a GReg step with it took 3.9-6.3x a plain GReg step, now 2.0-4.2x
(``docs/benchmarks.md``, communication excluded). In one process the layer is the one above.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

COMPILE = ("auto", "on", "off")


def check_compile(setting: str) -> None:
    """A ValueError that lists ``COMPILE`` unless ``setting`` is one of them."""
    if setting not in COMPILE:
        raise ValueError(f"unknown BatchNorm compile setting {setting!r}; choose one of {', '.join(COMPILE)}")


def _dims(x: Tensor) -> list[int]:
    """The dimensions a per-channel statistic reduces: all but the channels (dim 1)."""
    return [0, *range(2, x.dim())]


def _acc_dtype(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16 activations, else x's dtype: statistics and products are accumulated in it."""
    return torch.promote_types(x.dtype, torch.float32)


def _first_backward(
    impl: int, gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, reserve: Tensor,
    eps: float, mask: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """(gx, gγ, gβ) by the kernels of the forward's implementation (``impl``: native, cuDNN, MIOpen)."""
    # gy in x's memory format, as PyTorch's own BatchNorm backward passes it to cuDNN
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    gy = gy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.ops.aten._batch_norm_impl_index_backward(
        impl, x, gy, weight, None, None, mean, invstd, True, eps, mask, reserve
    )


def _closed_form(
    gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, s1: Tensor, s2: Tensor,
    ggx: Tensor | None, ggw: Tensor | None, ggb: Tensor | None, needs: tuple[bool, bool, bool],
    count: Tensor | None = None, reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """(∂/∂gy, ∂/∂x, ∂/∂γ) of the first backward for the upstream (ggx, ggγ, ggβ): the formulas above.

    ``needs``: which of the three to compute. Pure tensor code, so that ``torch.compile`` can fuse it. Over several
    ranks (:func:`sync_batch_norm_train`): ``count`` is M of all ranks, ``reduce`` sums a stack of per-channel
    vectors over the ranks, and ``s1``, ``s2`` (as ``gy``, ``x``, ``ggx``, ``ggγ``, ``ggβ``) are this rank's.
    """
    f32 = _acc_dtype(x)
    m = x.numel() // x.shape[1] if count is None else count
    r, mean, s1, s2 = invstd.to(f32), mean.to(f32), s1.to(f32), s2.to(f32)
    # bf16 activations as float32 copies: mixed-dtype kernels were slower on the CPU (1.3x on ResNet-50's layers)
    xf, gyf = x.to(f32), gy.to(f32)
    ggx = torch.zeros_like(xf) if ggx is None else ggx.to(f32)

    def view(t: Tensor) -> Tensor:  # a per-channel vector, broadcast against x (N, C, ...)
        return t.reshape(1, -1, *([1] * (x.dim() - 2)))

    # Per-channel terms with as few kernels as possible: eager, each is a launch, and there are ~20 per layer.
    dims = _dims(x)
    gamma_r = r if weight is None else weight.to(f32) * r  # γr = a·M
    r_m, a = r / m, gamma_r / m
    x_hat = torch.addcmul(view((mean * r).neg_()), xf, view(r))
    t1, t2, t3 = ggx.sum(dims), (ggx * x_hat).sum(dims), (ggx * gyf).sum(dims)
    ggw = None if ggw is None else ggw.to(f32)
    # Σ over all ranks of ggγ·S₁ and ggγ·S₂ (ggγ may differ between ranks): the terms of mean(v) and mean(v·x̂)
    u1, u2 = (0, 0) if ggw is None else (ggw * s1, ggw * s2)
    g1, g2, g_t1, g_t2, g_t3 = s1, s2, t1, t2, t3  # the sums over all ranks
    if reduce is not None:
        g1, g2, g_t1, g_t2, g_t3, *u = reduce(torch.stack([s1, s2, t1, t2, t3, *([u1, u2] if ggw is not None else [])]))
        u1, u2 = u or (0, 0)

    def m_t3_s1_t1_s2_t2(t1: Tensor, t2: Tensor, t3: Tensor) -> Tensor:  # C = M·T₃ − S₁T₁ − S₂T₂
        return torch.addcmul(torch.addcmul(t3 * m, g1, t1, value=-1), g2, t2, value=-1)

    c = m_t3_s1_t1_s2_t2(g_t1, g_t2, g_t3)
    q = a * g_t2 if ggw is None else a * g_t2 - ggw  # v = p·ggx + q·gy
    grad_gy = grad_x = grad_w = None
    if needs[0]:  # a(M·ggx − T₁ − x̂·T₂) + ggγ·x̂ + ggβ = γr·ggx − q·x̂ + (ggβ − a·T₁)
        shift = (a * g_t1).neg_() if ggb is None else torch.addcmul(ggb.to(f32), a, g_t1, value=-1)
        grad_gy = torch.addcmul(view(shift), x_hat, view(q), value=-1).addcmul_(ggx, view(gamma_r))
        grad_gy = grad_gy.to(gy.dtype)
    if needs[1]:  # −r(v − mean(v) − x̂·mean(v·x̂)) − (γr²C/M²)·x̂
        p, aq = a * g2, a * g_t2
        r_mean_v = (torch.addcmul(p * g_t1, aq, g1) - u1).mul_(r_m)
        x_hat_coef = (torch.addcmul(torch.addcmul(p * g_t2, aq, g2), a, c, value=-1) - u2).mul_(r_m)
        grad_x = torch.addcmul(view(r_mean_v), x_hat, view(x_hat_coef))
        grad_x = grad_x.addcmul_(ggx, view(r * p), value=-1).addcmul_(gyf, view(r * q), value=-1).to(x.dtype)
    if weight is not None and needs[2]:  # this rank's share of r·C/M: the shares of all ranks add up to it
        c_here = c if reduce is None else m_t3_s1_t1_s2_t2(t1, t2, t3)
        grad_w = (c_here * r_m).to(weight.dtype)
    return grad_gy, grad_x, grad_w


@functools.cache
def _compiled_closed_form() -> Callable[..., tuple]:
    # Built on first use: importing the compiler costs a second or two that eager users should not pay. Dynamic
    # shapes from the start: one graph per dtype and memory layout instead of one per layer shape, well under
    # Dynamo's recompile limit (past it Dynamo runs the function eagerly, so a model with many kinds still works).
    from torch._dynamo.exc import BackendCompilerFailed

    compiled = torch.compile(_closed_form, dynamic=True)

    def closed_form(gy: Tensor, x: Tensor, weight: Tensor | None, *rest: Any) -> tuple:
        nonlocal compiled
        try:
            # Dynamo gives parameters static shapes (a graph per channel count, past the limit at ResNet-50's 6th
            # width): γ goes in as a plain tensor (nothing differentiates this call).
            return compiled(gy, x, None if weight is None else weight.detach(), *rest)
        except BackendCompilerFailed as err:  # e.g. no C compiler for Triton's or Inductor's kernels
            compiled = _closed_form
            reason = str(err).strip().splitlines()[0]
            warnings.warn(
                f"torch.compile failed for BatchNorm's double backward ({reason}); it runs eagerly from now on "
                "(same values; use_double_backward(..., batchnorm_compile='off') skips the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
            return _closed_form(gy, x, weight, *rest)

    return closed_form


def _closed_form_fn(setting: str, x: Tensor) -> Callable[..., tuple]:
    """:func:`_closed_form`, compiled for ``on``, and for ``auto`` where Inductor fuses it (CUDA with Triton)."""
    if setting == "off":
        return _closed_form
    if setting == "on" or (x.is_cuda and _has_triton()):
        return _compiled_closed_form()
    return _closed_form


@functools.cache
def _has_triton() -> bool:
    # Once: without Triton installed, find_spec would search sys.path on every layer of every step.
    return importlib.util.find_spec("triton") is not None


class _NoDerivative(torch.autograd.Function):
    """Passes on the first ``n`` tensors (the rest only tie them to the graph); differentiating them raises."""

    @staticmethod
    def forward(ctx: FunctionCtx, n: int, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
        return tuple(None if t is None else t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple:
        raise RuntimeError(
            "gradreg's training-mode BatchNorm has no third derivative (nor has PyTorch's): differentiate it at most "
            "twice, or put the layer in eval mode"
        )


def _no_third_derivative(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """A double backward's ``backward`` without grad mode; under ``create_graph`` differentiating its results raises.

    Left to autograd, a third derivative would come out wrong: μ and r are saved as constants
    (``torch.autograd.function.once_differentiable`` misses the dependence through the saved tensors).
    """

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Tensor | None) -> tuple:
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return results
        return _NoDerivative.apply(len(results), *results, *grads, *ctx.saved_tensors)

    return wrapper


class _BatchNormGrad(torch.autograd.Function):
    """(gy, x, γ) -> (gx, gγ, gβ) of training-mode BatchNorm, with the closed-form backward above."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
        reserve: Tensor, impl: int, eps: float, compile_setting: str,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        # The forward node's plain backward may run later with the same reserve: cuDNN gets a copy, as in PyTorch.
        gx, gw, gb = _first_backward(impl, gy, x, weight, mean, invstd, reserve.clone(), eps, [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, invstd, gw, gb)
        ctx.compile_setting = compile_setting
        ctx.set_materialize_grads(False)  # gγ, gβ are usually unused: no zero tensors for their gradients
        return gx, gw, gb

    @staticmethod
    @_no_third_derivative
    def backward(ctx: Any, ggx: Tensor | None, ggw: Tensor | None, ggb: Tensor | None) -> tuple:
        gy, x, weight, mean, invstd, s2, s1 = ctx.saved_tensors
        closed_form = _closed_form_fn(ctx.compile_setting, x)
        needs = tuple(ctx.needs_input_grad[:3])
        grads = closed_form(gy, x, weight, mean, invstd, s1, s2, ggx, ggw, ggb, needs)
        return *grads, None, None, None, None, None, None


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
        compile_setting: str,
    ) -> Tensor:
        # The implementation F.batch_norm would pick (cuDNN where it applies; its saved variance is invstd too).
        out, mean, invstd, reserve, ctx.impl = torch.ops.aten._batch_norm_impl_index(
            x, weight, bias, running_mean, running_var, True, momentum, eps, torch.backends.cudnn.enabled
        )
        ctx.save_for_backward(x, weight, mean, invstd, reserve)
        ctx.eps, ctx.compile_setting = eps, compile_setting
        return out

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple:
        x, weight, mean, invstd, reserve = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: make the backward cheap to differentiate
            args = (gy, x, weight, mean, invstd, reserve, ctx.impl, ctx.eps, ctx.compile_setting)
            gx, gw, gb = _BatchNormGrad.apply(*args)
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
    compile_setting: str = "auto",
) -> Tensor:
    """``F.batch_norm(..., training=True)`` with the cheap double backward (running stats updated in place).

    ``compile_setting`` (``COMPILE``): whether the double backward runs compiled (see ``_closed_form_fn``).
    """
    check_compile(compile_setting)
    if x.numel() == x.shape[1]:  # as F.batch_norm: the batch variance of one value is undefined
        raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel, got input {tuple(x.shape)}")
    return _BatchNormTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps, compile_setting)


def _all_reduce(group: Any) -> Callable[[Tensor], Tensor]:
    """Sum over the ranks of ``group`` of a freshly stacked tensor, in place (nothing differentiates it).

    Not PyTorch's functional collective: its result is a tensor subclass that sends every later op through Python,
    76 of the 271 ms of host time of a WRN-40-2 GReg step with synchronized statistics on an H100
    (``docs/benchmarks.md``).
    """

    def reduce(t: Tensor) -> Tensor:
        torch.distributed.all_reduce(t, group=group)
        return t

    return reduce


def _sync_first_backward(
    gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, count: Tensor, group: Any,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(gx, S₂, S₁) of BatchNorm over all ranks: gx from the sums of all ranks; S₁ = Σ gy, S₂ = Σ gy·x̂ this rank's.

    S₂ and S₁ are this rank's gγ and gβ: DDP averages them over the ranks, as after PyTorch's SyncBatchNorm.
    """
    f32, dims, shape = _acc_dtype(x), _dims(x), (1, -1) + (1,) * (x.dim() - 2)
    gyf, r = gy.to(f32), invstd.view(shape)
    x_hat = (x.to(f32) - mean.view(shape)) * r
    s1, s2 = gyf.sum(dims), (gyf * x_hat).sum(dims)
    g1, g2 = _all_reduce(group)(torch.stack([s1, s2]))
    gamma_r = r if weight is None else weight.to(f32).view(shape) * r  # gx = γr·(gy − S₁/M − x̂·S₂/M)
    gx = torch.addcmul(-g1.view(shape) / count, x_hat, -g2.view(shape) / count).add_(gyf).mul_(gamma_r)
    return gx.to(x.dtype), s2, s1


class _SyncBatchNormGrad(torch.autograd.Function):
    """(gy, x, γ) -> (gx, gγ, gβ) of training-mode BatchNorm over all ranks, with the closed-form backward above."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, count: Tensor,
        group: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        gx, s2, s1 = _sync_first_backward(gy, x, weight, mean, invstd, count, group)
        ctx.save_for_backward(gy, x, weight, mean, invstd, s2, s1, count)
        ctx.group = group
        ctx.set_materialize_grads(False)
        return gx, s2, s1

    @staticmethod
    @_no_third_derivative
    def backward(ctx: Any, ggx: Tensor | None, ggw: Tensor | None, ggb: Tensor | None) -> tuple:
        gy, x, weight, mean, invstd, s2, s1, count = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        grads = _closed_form(gy, x, weight, mean, invstd, s1, s2, ggx, ggw, ggb, needs, count, _all_reduce(ctx.group))
        return *grads, None, None, None, None


class _SyncBatchNormTrain(torch.autograd.Function):
    """Training-mode BatchNorm with the statistics of all ranks; under ``create_graph``: ``_SyncBatchNormGrad``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
        running_var: Tensor | None, momentum: float, eps: float, group: Any,
    ) -> Tensor:  # fmt: skip
        f32, dims, shape = _acc_dtype(x), _dims(x), (1, -1) + (1,) * (x.dim() - 2)
        # One collective: every rank's count, mean and sum of squared deviations (its row of a sum over the ranks,
        # an all_gather on every backend), combined as Chan et al. do: as stable as two passes over all values.
        var, mean = (t.nan_to_num() for t in torch.var_mean(x.to(f32), dims, correction=0))  # NaN for no values
        n = var.new_full((1,), x.numel() // x.shape[1])
        stats = var.new_zeros(torch.distributed.get_world_size(group), 1 + 2 * x.shape[1])
        torch.cat([n, mean, var * n], out=stats[torch.distributed.get_rank(group)])
        torch.distributed.all_reduce(stats, group=group)
        counts, means, m2 = stats[:, :1], stats[:, 1 : 1 + x.shape[1]], stats[:, 1 + x.shape[1] :]
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        var = (m2 + counts * (means - mean).square()).sum(0) / count
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * count / (count - 1)).to(running_var.dtype), momentum)
        scale = invstd if weight is None else weight.to(f32) * invstd  # y = x·γr + (β − μ·γr)
        shift = -mean * scale if bias is None else torch.addcmul(bias.to(f32), mean, scale, value=-1)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple:
        x, weight, mean, invstd, count = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: make the backward cheap to differentiate
            gx, gw, gb = _SyncBatchNormGrad.apply(gy, x, weight, mean, invstd, count, ctx.group)
        else:
            gx, gw, gb = _sync_first_backward(gy, x, weight, mean, invstd, count, ctx.group)
        if weight is None:
            gw = gb = None
        return gx, gw, gb, None, None, None, None, None


def sync_batch_norm_train(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    group: Any = None,
) -> Tensor:
    """Training-mode BatchNorm over the batches of all ranks of ``group``, with the cheap double backward.

    The statistics (float32 for bf16/fp16 activations) come from one collective of each rank's count, mean and sum
    of squared deviations; the running statistics are updated in place with the unbiased variance of all ranks'
    values, as SyncBatchNorm does. Each backward sums two (first backward) or up to seven (double backward)
    per-channel vectors over the ranks. Every rank must call it, with the same number of channels.
    """
    group = torch.distributed.group.WORLD if group is None else group
    if x.numel() == x.shape[1] and torch.distributed.get_world_size(group) < 2:  # as PyTorch's SyncBatchNorm
        raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel, got input {tuple(x.shape)}")
    return _SyncBatchNormTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps, group)


class DoubleBackwardBatchNorm:
    """Mixin for ``nn.BatchNorm*d``: training mode goes through :func:`batch_norm_train`.

    ``compile_setting`` (class attribute, settable per layer): whether its double backward runs compiled.
    """

    compile_setting: str = "auto"

    def forward(self, x: Tensor) -> Tensor:
        """Training mode: :func:`batch_norm_train` with this layer's compile setting; eval mode: ``nn.BatchNorm``'s."""
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        return batch_norm_train(
            x, *self._running(), self.weight, self.bias, self._momentum(), self.eps, self.compile_setting
        )

    def _running(self) -> tuple[Tensor | None, Tensor | None]:
        """The running statistics this training step updates.

        None once ``track_running_stats`` is switched off on a layer that has them, as in ``nn.BatchNorm``'s forward.
        """
        return (self.running_mean, self.running_var) if self.track_running_stats else (None, None)

    def _momentum(self) -> float:
        """This step's running-statistics momentum; counts the batch, as ``nn.BatchNorm``'s forward does."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        return momentum


class DoubleBackwardBatchNorm1d(DoubleBackwardBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with the cheap double backward in training mode."""


class DoubleBackwardBatchNorm2d(DoubleBackwardBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the cheap double backward in training mode."""


class DoubleBackwardBatchNorm3d(DoubleBackwardBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with the cheap double backward in training mode."""


class DoubleBackwardSyncBatchNorm(DoubleBackwardBatchNorm, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that GReg's penalty can differentiate.

    Training mode over several ranks: :func:`sync_batch_norm_train`; in one process: the cheap double backward of
    :class:`DoubleBackwardBatchNorm`; eval mode: ``nn.SyncBatchNorm``'s.
    """

    def across_ranks(self) -> bool:
        """Whether this forward normalizes with the statistics of every rank (training, several ranks)."""
        group = self.process_group
        return self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if not self.across_ranks():
            return super().forward(x)
        self._check_input_dim(x)
        args = (*self._running(), self.weight, self.bias, self._momentum(), self.eps)
        return sync_batch_norm_train(x, *args, self.process_group)


CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: DoubleBackwardBatchNorm1d,
    nn.BatchNorm2d: DoubleBackwardBatchNorm2d,
    nn.BatchNorm3d: DoubleBackwardBatchNorm3d,
    nn.SyncBatchNorm: DoubleBackwardSyncBatchNorm,
}
