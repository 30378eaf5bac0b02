"""Purview: per-sample, per-layer gradient norms of a confounding-label loss over all parameters.

Lee, Lehman, Prabhushankar, AlRegib, "Probing the Purview of Neural Networks via Gradient Analysis",
IEEE Access 11:32716-32732, 2023, arXiv:2304.02834 (DOI 10.1109/ACCESS.2023.3263210). No public
reference code exists (ALGORITHMS.md §5), so the construction below is our reading of the paper:

- **Confounding label.** The abstract defines it as a label "formed by combining multiple categorical
  labels". We combine *all* C classes into one multi-hot target, the all-ones vector, and score it with
  the multi-label loss that accepts such a target: BCE-with-logits summed over classes,
  ``L(x) = Σ_c softplus(−f_c(x))``. It needs no ground truth, and no input is fully consistent with it,
  so every input produces a gradient, whose size measures how much the model would have to change to
  characterize the input that way. (Softmax cross-entropy with this target would reproduce GradNorm's
  loss, gradient ``C·p − 1``; BCE treats every class as a separate yes/no decision.)
- **Parameters and statistic.** The per-sample gradient of ``L`` w.r.t. the parameters of **every
  layer** (a layer = a module that owns parameters; weight and bias together), reduced to its
  squared L2 norm: :func:`purview_layer_norms` returns this (N, L) matrix, columns named by
  :func:`purview_layer_names`.
- **Score.** The sum over layers of the squared norms (= the squared norm of the full per-sample
  gradient), used **as is**: a larger gradient means *more* in-distribution (see the deviation below).

Implementation: one forward and one batched backward of ``Σ_i L(x_i)``, down to the input (down to every weight
where a ``.detach()`` or ``torch.no_grad()`` inside the model cuts a layer off the input's path: autograd runs only
what the requested gradients need). In eval mode the rows of the
batch are independent, so the gradient w.r.t. each layer's output (captured with tensor hooks) is
the per-sample output gradient δ_i. With the layer input a_i (forward hook), per-sample parameter
gradients follow in closed form: Linear ``δ_i a_iᵀ`` and Conv2d ``δ_i · unfold(a_i)ᵀ`` (both
``D_i U_iᵀ``, a sum over T tokens or output pixels), BatchNorm/GroupNorm/LayerNorm
``γ: Σ δ_i ⊙ x̂_i, β: Σ δ_i``. For Linear/Conv2d only the norm is needed, and it is computed the cheaper
of two exact ways per layer (mixed ghost clipping, Bu et al., "Scalable and Efficient Training of Large
Convolutional Neural Networks with Differential Privacy", NeurIPS 2022): materialize ``D_i U_iᵀ``
(T·O·K multiply-adds; a grouped convolution for large maps, in chunks of samples), or the "ghost norm"
``⟨D_iᵀD_i, U_iᵀU_i⟩`` from two T x T Gram matrices (T²·(O+K); small late feature maps, and
``‖δ_i‖²‖a_i‖²`` for a Linear on vectors). Each layer's norm is taken inside the backward, when its output
gradient arrives, so that neither δ nor the layer input outlives the layer's own backward (peak memory
close to that of a plain forward + input backward). Layers of any other type, layers whose weights are also
used outside their own calls (tied weights, functional calls; found by counting each trainable parameter's
uses in the autograd graph before the backward), and layers called with their input as a keyword, on rows
that are not the samples (samples x tokens folded into rows; a constant: the model's own parameter or buffer, as
class prototypes, even with as many rows as the batch) or whose output no gradient reaches (frozen weights on a
constant) fall back to ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``). Limitation: a layer on a tensor
*computed* from parameters only that has as many rows as the batch is taken as per sample (to autograd it looks like
a detached per-sample input through a trainable op); ``method="vmap"`` scores such a model. A weight tied across
layers counts whole in each of them. ``method="vmap"`` uses the fallback for every layer (a cross-check and a
baseline).

Deviation (sign): ALGORITHMS.md §5 expects large gradients for OOD inputs (ID score = −norm). With
this confounding label we measured the opposite: on a SmallCNN trained on digits 0-5, −norm gives
AUROC 0.34 against uniform noise and 0.37 against the held-out digits 6-9 (the last layer alone 0.11
and 0.04). The reason is structural: ∂L/∂f_c = σ(f_c) − 1 is close to −1 for every confidently
rejected class, so a confident ID input needs the *largest* change to agree with the all-ones label,
and its features are larger too (the same effect that makes GradNorm work). The score is therefore
+norm, which the sign test checks on every run. The sign depends on the training: on the README quickstart's
GReg model, whose energy margin pushes every logit of the outliers down, +norm gives AUROC 0.24 against uniform
noise and 0.46 against the held-out digits (−norm 0.76 and 0.54).

Deviations (unverified choices): the layer grouping, the squared norm and the sum aggregation are not
checked against the paper (it may fit a detector on the per-layer vector instead; the vector is
exposed for that).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradreg.double_backward import original_type
from gradreg.models import functional_call
from gradreg.scorers.base import Scorer, checked
from gradreg.scorers.registry import SCORERS

PurviewMethod = Literal["hooks", "vmap"]

# Cap on the elements of one materialized block (per-sample conv grads, unfolded inputs, vmap grads):
# 2**27 float32 = 512 MiB. Larger batches are processed in chunks of samples.
MAX_CHUNK_ELEMENTS = 2**27
# Conv2d per-sample weight gradients: a grouped-convolution weight gradient for kernels of at least
# GROUPED_CONV_MIN_KERNEL elements on maps of at least GROUPED_CONV_MIN_POSITIONS output positions, else
# unfold + batched matmul (for a 1x1 kernel the unfolded input is the input itself, no expansion).
# Measured per layer on an H100 (bench/purview_engines.py, WRN-40-2 batch 512, ResNet-50 batch 128):
# for 3x3 and 7x7 kernels on maps of >= 256 positions grouped is up to 2.4x faster (at most 10 % slower on
# two small layers), for 1x1 kernels unfold is 1.3-4.9x faster; on CPU (WRN-40-2, batch 32) grouped is ~3x
# faster on 32x32 maps and ~2x slower on 8x8 maps.
GROUPED_CONV_MIN_POSITIONS = 256
GROUPED_CONV_MIN_KERNEL = 2
# Single-call Linear/Conv2d layers use ghost norms when their cost T²(K+O) is at most this fraction of the
# materialized gradient's T·O·K (1: whichever needs fewer multiply-adds, also far less memory). With T = 1,
# a Linear on vectors, the ghost norm is ‖δ‖²‖a‖².
GHOST_MAX_COST_RATIO = 1.0


def confounding_loss(logits: Tensor) -> Tensor:
    """Per-sample BCE-with-logits against the all-ones confounding label, summed over classes.

    Example:
        >>> confounding_loss(torch.zeros(1, 3))  # 3 * log 2
        tensor([2.0794])
    """
    return F.softplus(-logits).sum(dim=1)


def purview_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every module that owns parameters, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]


def purview_layer_names(model: nn.Module) -> list[str]:
    """Column names of :func:`purview_layer_norms` (module names; ``""`` for parameters of the root).

    Example:
        >>> purview_layer_names(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)))
        ['0', '2']
    """
    return [name for name, _ in purview_layers(model)]


# ----- closed-form per-sample gradients of one layer call, from its input a and output gradient d -----
# Linear and Conv2d weight gradients are sums over T positions (tokens, output pixels) of outer products:
# grad_w[i] = Σ_t d_it u_itᵀ = D_i U_iᵀ per sample i and channel group, with U the (unfolded) input.


def _pad(m: nn.Conv2d, a: Tensor) -> Tensor:
    """``a`` padded explicitly as ``m.forward`` pads it (any padding mode, "same" included)."""
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return F.pad(a, m._reversed_padding_repeated_twice, mode=mode)


def _conv2d_padded(m: nn.Conv2d, a: Tensor) -> tuple[Tensor, tuple[int, int] | int]:
    """Input and padding such that ``conv(a, padding)`` equals ``m(a)`` with zero padding."""
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        return _pad(m, a), 0  # "same"/"valid" and non-zero padding modes, as Conv2d.forward does
    return a, m.padding


def _im2col(m: nn.Conv2d, a: Tensor) -> Tensor:
    """``F.unfold(a, ...)`` for ``m`` as one strided copy: (n, C_in·kh·kw, T), channel-major rows.

    CUDA's ``F.unfold`` launches one kernel per sample (3 ms for 512 CIFAR images on an H100, whatever the
    layer's size); a strided view of the padded input copied once is a single kernel.
    """
    if any(m._reversed_padding_repeated_twice):
        a = _pad(m, a)
    (kh, kw), (dh, dw), (sh, sw) = m.kernel_size, m.dilation, m.stride
    n, c, h, w = a.shape
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = a.stride()
    windows = a.as_strided(
        (n, c, kh, kw, out_h, out_w), (s_n, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w), a.storage_offset()
    )
    return windows.reshape(n, c * kh * kw, out_h * out_w)


def _weight_factors(m: nn.Linear | nn.Conv2d, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """D (n, g, O, T) and U (n, g, K, T) with per-sample weight gradient ``D @ Uᵀ`` for each of g groups."""
    n = a.shape[0]
    if isinstance(m, nn.Linear):
        return d.reshape(n, 1, -1, m.out_features).mT, a.reshape(n, 1, -1, m.in_features).mT
    positions = d.shape[2] * d.shape[3]
    # Channel-major columns, so each group's rows are contiguous.
    return d.reshape(n, m.groups, -1, positions), _im2col(m, a).reshape(n, m.groups, -1, positions)


def _linear_grads(m: nn.Linear, a: Tensor, d: Tensor) -> list[Tensor]:
    factor_d, factor_u = _weight_factors(m, a, d)
    grads = [(factor_d @ factor_u.mT).squeeze(1)]
    if m.bias is not None:
        grads.append(factor_d.sum(dim=3).squeeze(1))
    return grads


def _uses_grouped_conv(m: nn.Conv2d, d: Tensor) -> bool:
    """Whether :func:`_conv2d_grads` takes the grouped-convolution route (else unfold + matmul)."""
    kh, kw = m.kernel_size
    return kh * kw >= GROUPED_CONV_MIN_KERNEL and d.shape[2] * d.shape[3] >= GROUPED_CONV_MIN_POSITIONS


def _conv2d_grads(m: nn.Conv2d, a: Tensor, d: Tensor) -> list[Tensor]:
    n = a.shape[0]
    if _uses_grouped_conv(m, d):
        # N samples x g groups = one convolution with N·g groups over the batch folded into channels:
        # its weight gradient is the stack of the per-sample weight gradients (no unfolded copy).
        a, padding = _conv2d_padded(m, a)
        grad_w = torch.nn.grad.conv2d_weight(
            a.reshape(1, -1, *a.shape[2:]),
            (n * m.out_channels, *m.weight.shape[1:]),
            d.reshape(1, -1, *d.shape[2:]),
            m.stride,
            padding,
            m.dilation,
            n * m.groups,
        )
    else:
        factor_d, factor_u = _weight_factors(m, a, d)
        grad_w = factor_d @ factor_u.mT
    grads = [grad_w.reshape(n, *m.weight.shape)]
    if m.bias is not None:
        grads.append(d.sum(dim=(2, 3)))
    return grads


def _ghost_sq_norm(m: nn.Linear | nn.Conv2d, a: Tensor, d: Tensor) -> Tensor:
    """Squared norm of the per-sample weight (and bias) gradient without forming it.

    ``‖D Uᵀ‖²_F = ⟨DᵀD, UᵀU⟩_F``: two T x T Gram matrices per sample and group instead of the O x K
    gradient ("ghost norm", Goodfellow 2015; Li et al., ICLR 2022; Bu et al., 2022).
    """
    factor_d, factor_u = _weight_factors(m, a, d)
    sq = ((factor_d.mT @ factor_d) * (factor_u.mT @ factor_u)).sum(dim=(1, 2, 3))
    if m.bias is not None:
        sq = sq + factor_d.sum(dim=3).square().sum(dim=(1, 2))
    return sq


def _factor_shape(m: nn.Module, d: Tensor) -> tuple[int, int, int, int] | None:
    """(g, T, K, O) of :func:`_weight_factors` for a Linear/Conv2d layer (exact types), else None."""
    kind = original_type(m)
    if kind is nn.Linear:
        return 1, math.prod(d.shape[1:]) // m.out_features, m.in_features, m.out_features
    if kind is nn.Conv2d:
        return m.groups, d.shape[2] * d.shape[3], math.prod(m.weight.shape[1:]), m.out_channels // m.groups
    return None


def _ghost_is_cheaper(m: nn.Module, d: Tensor) -> bool:
    """Whether Gram matrices (T²·(K + O) per group) cost less than the gradient (T·O·K per group)."""
    shape = _factor_shape(m, d)
    if shape is None:
        return False
    _, positions, k, o = shape
    return positions * (k + o) <= GHOST_MAX_COST_RATIO * k * o


def _affine_grads(m: nn.Module, normalized: Tensor, d: Tensor, channel_first: bool) -> list[Tensor]:
    """Per-sample γ and β gradients of ``y = γ·x̂ + β`` (δ ⊙ x̂ and δ summed over the shared positions)."""
    n = d.shape[0]
    # BatchNorm/GroupNorm: one (γ, β) per channel (dim 1); LayerNorm: over the trailing normalized shape.
    shape = (n, d.shape[1], -1) if channel_first else (n, -1, *m.normalized_shape)
    reduce_dim = 2 if channel_first else 1
    grads = []
    if m.weight is not None:
        grads.append((d * normalized).reshape(shape).sum(dim=reduce_dim))
    if m.bias is not None:
        grads.append(d.reshape(shape).sum(dim=reduce_dim))
    return grads


def _require_running_statistics(model: nn.Module) -> None:
    """Refuse BatchNorm layers that normalize with batch statistics, before any forward updates them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            raise ValueError(
                f"purview needs eval-mode {type(m).__name__} with running statistics: batch statistics couple the "
                "samples, so per-sample gradients are undefined"
            )


def _batchnorm_grads(m: nn.modules.batchnorm._BatchNorm, a: Tensor, d: Tensor) -> list[Tensor]:
    n, c = d.shape[:2]
    centered = a - m.running_mean.reshape(1, -1, *([1] * (a.dim() - 2)))
    grads = []
    if m.weight is not None:
        # Σ δ ⊙ x̂ = rsqrt(var + eps) · Σ δ ⊙ (a − μ).
        if centered.is_contiguous() and d.is_contiguous():
            # A batched dot product over (N·C) rows: no δ ⊙ (a − μ) tensor.
            dot = torch.bmm(centered.reshape(n * c, 1, -1), d.reshape(n * c, -1, 1)).reshape(n, c)
        else:
            # Channels-last: those rows would copy both tensors, while one product tensor is a single pass.
            dot = _sum_over_positions(d * centered)
        grads.append(dot * torch.rsqrt(m.running_var + m.eps))
    if m.bias is not None:
        grads.append(_sum_over_positions(d))
    return grads


def _sum_over_positions(t: Tensor) -> Tensor:
    """Sum of an (N, C, *positions) tensor over its positions, in any memory layout without a copy."""
    return t.sum(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t


def _groupnorm_grads(m: nn.GroupNorm, a: Tensor, d: Tensor) -> list[Tensor]:
    return _affine_grads(m, F.group_norm(a, m.num_groups, eps=m.eps), d, channel_first=True)


def _layernorm_grads(m: nn.LayerNorm, a: Tensor, d: Tensor) -> list[Tensor]:
    return _affine_grads(m, F.layer_norm(a, m.normalized_shape, eps=m.eps), d, channel_first=False)


# Exact types only: a subclass may override forward, which would make the closed forms wrong. GReg
# training's layers (gradreg.double_backward) count as their originals: only their training-mode backward differs.
_GRAD_FNS: dict[type[nn.Module], Callable[..., list[Tensor]]] = {
    nn.Linear: _linear_grads,
    nn.Conv2d: _conv2d_grads,
    nn.BatchNorm1d: _batchnorm_grads,
    nn.BatchNorm2d: _batchnorm_grads,
    nn.BatchNorm3d: _batchnorm_grads,
    nn.SyncBatchNorm: _batchnorm_grads,  # eval mode: the running statistics, as BatchNorm (training mode is refused)
    nn.GroupNorm: _groupnorm_grads,
    nn.LayerNorm: _layernorm_grads,
}


def _has_closed_form(m: nn.Module) -> bool:
    own = {name for name, _ in m.named_parameters(recurse=False)}
    return original_type(m) in _GRAD_FNS and own <= {"weight", "bias"}


def _rows_per_chunk(m: nn.Module, a: Tensor, d: Tensor, ghost: bool) -> int:
    """Samples per chunk so that per-sample gradients, unfolded inputs and Gram matrices stay under the cap."""
    # Shape arithmetic, not a[0].numel(): indexing dispatches an operator, and the host cost of operators is what
    # bounds small models on a GPU.
    per_row = math.prod(a.shape[1:])
    if isinstance(m, nn.Conv2d):
        per_row += math.prod(m.weight.shape[1:]) * math.prod(d.shape[2:])  # unfolded input: C_in·kh·kw per position
    if ghost:
        groups, positions, _, _ = _factor_shape(m, d)
        per_row += 2 * groups * positions**2  # the two Gram matrices
    else:
        per_row += sum(p.numel() for p in m.parameters(recurse=False))
    return max(1, min(a.shape[0], MAX_CHUNK_ELEMENTS // per_row))


def _sq_norm(m: nn.Module, calls: list[tuple[Tensor, Tensor]], ghost: bool) -> Tensor:
    """:func:`_layer_sq_norm` of one chunk of samples."""
    if ghost:
        return _ghost_sq_norm(m, *calls[0])
    grad_fn = _GRAD_FNS[original_type(m)]
    total = grad_fn(m, *calls[0])
    for a, d in calls[1:]:
        total = [t + g for t, g in zip(total, grad_fn(m, a, d), strict=True)]
    return _summed_sq_norms(total)


def _summed_sq_norms(grads: list[Tensor]) -> Tensor:
    """Per-sample squared norms of (N, ...) per-sample gradients, summed over the list: shape (N,)."""
    # One pass over each gradient (square + sum would write and read it once more). reshape, not flatten(1): the
    # per-sample gradient of a 0-dim parameter (a learnable scale) is (N,).
    return functools.reduce(
        torch.add, [torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).square() for g in grads]
    )


def _layer_sq_norm(m: nn.Module, calls: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Squared norm of the per-sample gradient of ``m``'s parameters, summed over the calls of ``m``."""
    a, d = calls[0]
    ghost = len(calls) == 1 and _ghost_is_cheaper(m, d)
    rows, n = _rows_per_chunk(m, a, d, ghost), a.shape[0]
    if rows >= n:
        return _sq_norm(m, calls, ghost)
    chunks = [[(a_k[i : i + rows], d_k[i : i + rows]) for a_k, d_k in calls] for i in range(0, n, rows)]
    return torch.cat([_sq_norm(m, chunk, ghost) for chunk in chunks])


def _vmap_sq_norms(model: nn.Module, x: Tensor, layers: list[tuple[str, nn.Module]], everywhere: bool = True) -> Tensor:
    """(N, len(layers)) squared per-sample gradient norms with ``torch.func`` (any layer type).

    ``everywhere``: whether this is ``method="vmap"`` (else the fallback of ``"hooks"``), for the error message.
    """
    # A weight tied across layers is one input of the function: each of its layers gets its whole gradient.
    canonical = {id(p): name for name, p in model.named_parameters()}
    groups = [[canonical[id(p)] for p in m.parameters(recurse=False)] for _, m in layers]
    params = {canonical[id(p)]: p.detach() for _, m in layers for p in m.parameters(recurse=False)}

    def sample_loss(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return confounding_loss(checked(model, logits)).sum()

    per_sample_grad = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0))
    rows = max(1, MAX_CHUNK_ELEMENTS // max(sum(p.numel() for p in params.values()), 1))
    pieces = []
    for start in range(0, x.shape[0], rows):
        # torch.func.grad ignores an outer no_grad; here it keeps the result off the graph of the model's other
        # parameters, which the loss also depends on.
        try:
            with torch.no_grad():
                grads = per_sample_grad(params, x[start : start + rows].detach())
        except RuntimeError as err:
            # functorch refuses an autograd.Function without setup_context (full backward hooks wrap modules in one)
            # and saved-tensor hooks (installed by non-reentrant activation checkpointing).
            if "setup_context" in str(err):
                what = (
                    "full backward hooks (register_full_backward_hook, register_full_backward_pre_hook) or an "
                    "autograd.Function without setup_context"
                )
            elif "saved tensor hooks" in str(err):
                what = "saved-tensor hooks (torch.utils.checkpoint with use_reentrant=False, for one)"
            else:
                raise
            route = "method='vmap'" if everywhere else f"method='hooks' sends it {', '.join(n for n, _ in layers)}"
            raise ValueError(
                f"purview differentiates with torch.func here ({route}), which cannot run through {what}: remove them "
                f"while scoring{', or use method=hooks' if everywhere else ''}"
            ) from None
        pieces.append(torch.stack([_summed_sq_norms([grads[n] for n in names]) for names in groups], dim=1))
    return torch.cat(pieces)


def _strided(t: Tensor) -> bool:
    """A dense tensor with storage (a sparse one has none to compare)."""
    return t.layout == torch.strided and t.numel() > 0


def _walk_graph(loss: Tensor, x: Tensor) -> tuple[dict[Tensor, int], set, set]:
    """What the backward of ``loss`` must reach; three parts of its graph.

    How often each leaf that requires grad (parameters, ``x``) enters it, its other nodes, and those of them from
    which a path leads to ``x``.
    """
    uses: dict[Tensor, int] = {}
    callers: dict = {}  # node -> the nodes that pass their gradient to it
    frontier = []  # nodes with x among their inputs
    seen, stack = {loss.grad_fn}, [loss.grad_fn]
    while stack:
        caller = stack.pop()
        for node, _ in caller.next_functions:
            variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf, e.g. a parameter
            if variable is not None:
                uses[variable] = uses.get(variable, 0) + 1
                if variable is x:
                    frontier.append(caller)
            elif node is not None:
                callers.setdefault(node, []).append(caller)
                if node not in seen:
                    seen.add(node)
                    stack.append(node)
    to_x = set(frontier)
    while frontier:
        for caller in callers.get(frontier.pop(), ()):
            if caller not in to_x:
                to_x.add(caller)
                frontier.append(caller)
    return uses, seen, to_x


def _used_outside_their_calls(uses: dict[Tensor, int], layers: dict[str, nn.Module], calls: dict[str, int]) -> set[str]:
    """Names of ``layers`` with a parameter that enters the graph more often than the layer's calls (``uses``).

    Each call of a closed-form layer uses each of its parameters once. Any further use (a weight tied to
    another layer, or passed to a function outside the layer's ``forward``) adds a gradient that the layer's
    output gradient does not carry. Frozen parameters are not in the graph, so their extra uses go unseen.
    """
    return {
        name
        for name, m in layers.items()
        if any(uses.get(p, 0) > calls.get(name, 0) for p in m.parameters(recurse=False))
    }


def _closed_form_sq_norms(model: nn.Module, x: Tensor, layers: list[tuple[str, nn.Module]]) -> dict[str, Tensor]:
    """:func:`_layer_sq_norm` of every closed-form layer, from one forward and one backward to the input.

    A layer called once is reduced inside the backward, as soon as its output gradient arrives, so that
    the gradient and the layer's input are freed as the backward proceeds (keeping every output gradient
    until the end doubled ResNet-50's peak memory). A layer called more than once first sums the
    gradients of its calls, after the backward. Keyed by layer name; absent: layers without a closed form,
    never called with a frozen weight, with a call that is not per sample (see ``forward_hook``), or whose
    parameters are also used outside its calls.
    """
    closed = {name: m for name, m in layers if _has_closed_form(m)}
    records: dict[str, list[list]] = {}  # name -> one [input, its version, output gradient] per call
    num_calls: dict[str, int] = {}
    fallback: set[str] = set()  # layers left to torch.func
    output_nodes: list = []  # the autograd node of each recorded call's output
    norms: dict[str, Tensor] = {}

    def calls(name: str) -> list[tuple[Tensor, Tensor]]:
        if any(a._version != version for a, version, _ in records[name]):
            raise RuntimeError(f"the input of layer '{name}' was modified in place after the layer ran")
        # A call whose output never got a gradient (it does not reach the loss) contributes nothing.
        return [(a, d) for a, _, d in records[name] if d is not None]

    def on_output_grad(name: str, module: nn.Module, record: list, grad: Tensor) -> None:
        record[2] = grad
        # The forward is over, so the number of calls is final.
        if len(records[name]) == 1 and name not in fallback:
            norms[name] = _layer_sq_norm(module, calls(name))
            del records[name]
            record.clear()  # the hook outlives this call: drop its references to the tensors

    # Storage of the model's own tensors: a layer called on one of them (or a view) has a constant input.
    constants = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()) if _strided(t)}

    def constant(a: Tensor) -> bool:
        """Whether ``a`` is the model's own parameter or buffer (or a view of one): the same for every sample.

        Its rows may be as many as the samples (prototypes of a cosine head, one per class, in a batch of as many
        images). A tensor *computed* from parameters only looks to autograd like a detached per-sample input passed
        through a trainable op (a frozen trunk with a trainable neck), which is far more common: both are taken as
        per sample.
        """
        if a is x_in or not _strided(a):
            return False
        return (a.requires_grad and a.grad_fn is None) or a.untyped_storage().data_ptr() in constants

    def forward_hook(name: str, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        num_calls[name] = num_calls.get(name, 0) + 1
        if not inputs or inputs[0].shape[0] != x.shape[0] or not output.requires_grad or constant(inputs[0]):
            # Its input came as a keyword, its rows are not the samples (a constant, or samples x tokens folded
            # into rows), or no gradient reaches its output (frozen weights on a constant): torch.func handles it.
            fallback.add(name)
            return
        a = inputs[0].detach()
        record = [a, a._version, None]
        records.setdefault(name, []).append(record)
        output_nodes.append(output.grad_fn)  # before any in-place op on the output replaces it
        # A tensor hook sees the gradient w.r.t. the returned value even if a later op modifies it
        # in place (``out += identity``), unlike autograd.grad w.r.t. the output tensor itself.
        output.register_hook(functools.partial(on_output_grad, name, module, record))

    # Ahead of the caller's own forward hooks: one that returns a new output (``o * 2``) would otherwise hand us that
    # value, whose gradient is not the layer's output gradient.
    handles = [
        m.register_forward_hook(functools.partial(forward_hook, name), prepend=True) for name, m in closed.items()
    ]
    x_in = x.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            loss = confounding_loss(checked(model, model(x_in))).sum()
            if loss.requires_grad:  # else no layer output reaches the loss (frozen weights after a cut): all zero
                uses, reached, to_input = _walk_graph(loss, x_in)
                fallback.update(_used_outside_their_calls(uses, closed, num_calls))
                # The backward runs down to the input, which takes it through every layer output that reaches the
                # loss, unless the model cuts some of them off the input's path (torch.no_grad() or .detach() inside):
                # autograd runs only what the requested gradients need, so it then runs down to every weight.
                cut = x_in not in uses or any(node in reached and node not in to_input for node in output_nodes)
                torch.autograd.grad(loss, list(uses) if cut else x_in)
    finally:
        for handle in handles:
            handle.remove()
    # Layers called more than once, and layers whose output never got a gradient (zero).
    for name in records.keys() - fallback:
        used = calls(name)
        norms[name] = _layer_sq_norm(closed[name], used) if used else x.new_zeros(x.shape[0])
    # Never called, and no weight of it in the graph: zero (the absent head of method=absent models). A frozen
    # weight is in no graph, so its use elsewhere would go unseen: such layers stay with torch.func.
    for name in closed.keys() - num_calls.keys() - fallback:
        if all(p.requires_grad for p in closed[name].parameters(recurse=False)):
            norms[name] = x.new_zeros(x.shape[0])
    return norms


def purview_layer_norms(model: nn.Module, x: Tensor, method: PurviewMethod = "hooks") -> Tensor:
    """Per-sample squared L2 norm of each layer's gradient of the confounding loss.

    Args:
        model: classifier in eval mode (BatchNorm must use running statistics).
        x: inputs, shape (N, ...).
        method: ``"hooks"`` (one batched backward + closed forms, ``torch.func`` only for layer types
            without a closed form) or ``"vmap"`` (``torch.func`` for every layer).

    Returns:
        Tensor of shape (N, L); column ``l`` belongs to ``purview_layer_names(model)[l]``.

    A caller's autocast is switched off here: the closed forms would mix its half-precision output gradients with
    full-precision layer inputs, and ``torch.func`` fails on BatchNorm under it.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _purview_layer_norms(model, x, method)


def _purview_layer_norms(model: nn.Module, x: Tensor, method: PurviewMethod) -> Tensor:
    layers = purview_layers(model)
    if method not in ("hooks", "vmap"):
        raise ValueError(f"unknown purview method '{method}'; valid: hooks, vmap")
    _require_running_statistics(model)
    if x.shape[0] == 0:
        return x.new_zeros(0, len(layers))
    if method == "vmap":
        return _vmap_sq_norms(model, x, layers)

    norms = _closed_form_sq_norms(model, x, layers)
    columns: list[Tensor | None] = [norms.get(name) for name, _ in layers]
    # No closed form, a call that is not per sample, or weights also used outside the layer's calls: torch.func.
    fallback = [(name, m) for name, m in layers if name not in norms]
    if fallback:
        slow = _vmap_sq_norms(model, x, fallback, everywhere=False).unbind(dim=1)
        slow_iter = iter(slow)
        columns = [next(slow_iter) if c is None else c for c in columns]
    return torch.stack(columns, dim=1)


def purview_score(model: nn.Module, x: Tensor, method: PurviewMethod = "hooks") -> Tensor:
    """Squared norm of the per-sample gradient of the confounding loss w.r.t. all parameters.

    Args:
        model: classifier in eval mode.
        x: inputs, shape (N, ...).
        method: see :func:`purview_layer_norms`.

    Returns:
        Scores, shape (N,); higher = more in-distribution.
    """
    norms = purview_layer_norms(model, x, method)
    return norms.sum(dim=1, dtype=torch.promote_types(norms.dtype, torch.float32))


@SCORERS.register("purview")
@dataclass(frozen=True)
class Purview(Scorer):
    """Confounding-label gradient norm over every layer; ``method`` picks the per-sample engine."""

    method: PurviewMethod = "hooks"
    needs_grad: ClassVar[bool] = True

    def score(self, model: nn.Module, x: Tensor) -> Tensor:  # noqa: D102
        return purview_score(model, x, self.method)
