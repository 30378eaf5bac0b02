"""Anomaly suites for robustness checks: L-inf adversarial attacks, common corruptions, and an attack on the detector.

Inputs are **normalized** float tensors (N, C, H, W), as the data pipeline feeds the model. Budgets, clamps and
corruptions work in [0, 1] pixel units through the model's ``input_mean`` / ``input_std`` buffers
(``gradreg.models.Classifier``): ``pixels = x * std + mean`` and the valid normalized range is
``[(0 - mean) / std, (1 - mean) / std]`` per channel. Inputs whose pixels leave [0, 1] by more than float error
(unnormalized images, another normalization) and integer images are refused with a ``ValueError``: the budget and
the clamps would silently mean something else. Pixels, random draws and steps are computed in float32 at least
(bfloat16 cannot hold a 2/255 step near 1) and the results come back in the inputs' dtype; the model gets its own
(a float64 or bfloat16 model attacks the float32 images of a loader).

Attacks follow the scorer contract (``gradreg.scorers.base``): the model is put in eval mode and its previous
mode restored, parameter ``.grad`` is never touched (``torch.autograd.grad`` w.r.t. the input only), calls work
under ``torch.inference_mode()`` (the input is cloned inside ``torch.inference_mode(False)``), and everything is
batched (rows are independent in eval mode).

- FGSM: Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015,
  arXiv:1412.6572. FGSM and PGD step along the sign of the input gradient of the cross-entropy, taken through the
  log-odds ``logsumexp_{j != y} f_j - f_y`` (deviation, same steps): ``CE = softplus(log-odds)`` row by row, so
  both gradients have the same sign, but the cross-entropy's vanishes in floating point on a confident model
  (``p_y`` rounds to 1), which would leave such images unattacked and the model looking robust.
- PGD: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018, arXiv:1706.06083. Default step size ``2.5 * epsilon / steps``, a common heuristic (the
  paper itself fixed its steps: 7 of 2/255 at 8/255 on CIFAR-10, 40 of 0.01 at 0.3 on MNIST).
- Energy attack: PGD that *lowers* the free energy ``E = -T * logsumexp(f / T)`` of OOD inputs so that the
  energy score (``-E``) takes them for in-distribution data; the robustness setting of GReg (Sharifi et al.,
  ECCV 2024, arXiv:2404.12368), where detectors are evaluated under small L-inf perturbations of OOD inputs.
- Corruptions: Hendrycks, Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
  Perturbations", ICLR 2019, arXiv:1903.12261 (github.com/hendrycks/robustness). Severity parameters are
  ``SEVERITY_TABLES``: by default the **ImageNet-C** table (``make_imagenet_c.py``, 224x224) for images of 224 px
  or more and the **CIFAR-10-C** table (``make_cifar_c.py``, 32x32) below, used unchanged for 8x8 and 28x28 inputs
  (there is no table for the sizes in between; Tiny-ImageNet-C's 64x64 one is not included); ``table=`` chooses.
  All 19 corruptions of the benchmark: the noises (gaussian, shot, impulse, speckle), the blurs (gaussian, defocus,
  glass, motion, zoom), snow, frost, fog, spatter, brightness, contrast, saturate, elastic_transform, pixelate and
  JPEG. Frost blends in the references' photographs of frost, read from the ``imagecorruptions`` package (``pip
  install --no-deps imagecorruptions``, :func:`frost_folder`); frost, spatter and saturate need RGB images.

Deviations from the reference corruption code (which works on one PIL/numpy HWC image at a time): batched torch
implementations on (N, C, H, W) in [0, 1]; any channel count (grayscale included) but for frost, saturate and
spatter (RGB); random numbers come from ``torch.Generator`` so results differ from the numpy originals but are
reproducible, from one generator for the batch or one per image (then an image's noise does not depend on the batch
it comes in); gaussian blur uses a separable kernel truncated at ``4 sigma`` with edge replication (scipy's
``mode="nearest"``, as ``skimage.filters.gaussian``); brightness adds to the HSV value channel exactly, written as a
per-pixel rescale of RGB (hue and saturation are unchanged by construction); pixelate applies PIL's BOX filter both
ways as two resampling matrices (equal to PIL's float resize to 1e-7) with at least one pixel per side; JPEG goes
through PIL's save and open, as the references (4:2:0 chroma subsampling for RGB), channel counts other than 1 and 3
channel by channel as grayscale; defocus_blur, glass_blur, zoom_blur, fog and elastic_transform agree with the
reference code (OpenCV 5.0, scipy, scikit-image) given the same random numbers to 1e-6 or better
(tests/test_anomalies.py against scipy transcriptions); motion_blur and snow reproduce ImageMagick's
``MotionBlurImage`` (its output on the 8-bit image, Q16, is our value quantized: checked against ImageMagick 6.9.11
at every pixel), without the PNG round trips around it; spatter reproduces OpenCV's Canny, 5x5 distance transform,
box blurs, equalizeHist and filter2D with their 8-bit steps (equal at every stage to OpenCV 5.0 with IPP off; with
IPP, its float distance transform moves 0.014 % of the 8-bit distances) and the references' float32 mud mask;
zoom_blur zooms each axis by its own crop (the reference assumes square images), and fog's fractal has the next
power of two of the longer side; the corrupted images stay float (CIFAR-10-C stores them as uint8, truncated, about
-0.5/255 on average), and only JPEG's output is quantized (glass_blur and snow keep the references' 8-bit rounding
of an intermediate image). ``evaluate.py`` draws each image's random numbers (and PGD's random start) from a CPU
generator seeded with the set's name and the image's index in its dataset: the same images whatever the batch size,
``--max-samples`` or device.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradreg.losses import energy
from gradreg.models import eval_mode, inference_weights_error
from gradreg.registry import Registry

__all__ = [
    "CORRUPTIONS",
    "corrupt",
    "energy_attack",
    "fgsm",
    "frost_folder",
    "pgd",
]

CORRUPTIONS: Registry[Tensor] = Registry("corruption")

# One generator for the batch, or one per image: row i then comes from generator[i] alone, whatever the batch.
Generators = torch.Generator | Sequence[torch.Generator] | None
PIXEL_TOLERANCE = 1e-3  # normalizing and back costs ~1e-6; one 8-bit level is 3.9e-3


def _random(draw: Callable[[Tensor, torch.Generator | None], Tensor], x: Tensor, generator: Generators) -> Tensor:
    """``draw(x, generator)`` on the generator's device, moved to ``x``'s; row by row with one generator per image."""
    if generator is None or isinstance(generator, torch.Generator):
        device = x.device if generator is None else generator.device
        return draw(x.to(device), generator).to(x.device)
    if len(generator) != len(x):
        raise ValueError(f"got {len(generator)} generators for {len(x)} images; give one generator, or one per image")
    rows = [draw(row.to(g.device), g).to(x.device) for row, g in zip(x, generator, strict=True)]
    return torch.stack(rows) if rows else torch.empty_like(x)


def _rand(x: Tensor, generator: Generators) -> Tensor:
    """Uniform [0, 1) noise shaped like ``x``."""
    return _random(lambda t, g: torch.rand(t.shape, generator=g, device=t.device, dtype=t.dtype), x, generator)


def _randn(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like ``x``."""
    return _random(lambda t, g: torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype), x, generator)


def _check_pixels(x: Tensor, channels: int | None = None) -> None:
    """Refuse what is not a float image batch (N, C, H, W), ``channels`` channels if given."""
    if not x.is_floating_point():  # uint8 images (torchvision.io) would cast the normalization constants to 0
        raise ValueError(
            f"expected float images, got dtype {x.dtype}; convert uint8 images with x.float() / 255 and normalize them"
        )
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        raise ValueError(f"expected images (N, {channels or 'C'}, H, W), got shape {tuple(x.shape)}")


def _working(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the pixel arithmetic: float32 at least (bfloat16 cannot hold a 2/255 step near 1)."""
    return torch.promote_types(dtype, torch.float32)


def _to_pixels(x: Tensor, mean: Tensor, std: Tensor, constants: torch.dtype) -> Tensor:
    """Pixels ``x * std + mean`` of normalized inputs, in the working dtype; un-normalized inputs are refused.

    ``mean`` / ``std``: (1, C, 1, 1) in the working dtype. ``constants``: the dtype the normalization constants
    were held in. Inputs whose pixels leave [0, 1] by more than float error are refused: a bfloat16 model's buffers
    hold the constants to 2^-9 (the images a float32 loader normalized come back up to ~0.002 outside [0, 1]), and
    bfloat16 inputs hold the normalized values to 2^-8 of their size.
    """
    pixels = x.to(mean.dtype) * std + mean
    if not pixels.numel():
        return pixels
    rounding = torch.finfo(x.dtype).eps * x.detach().abs().amax().nan_to_num() * std.amax()
    tolerance = PIXEL_TOLERANCE + torch.finfo(constants).eps + rounding
    if not -tolerance <= pixels.min() <= pixels.max() <= 1 + tolerance:
        raise ValueError(
            f"the inputs are not images in [0, 1] once the normalization is undone (pixels span "
            f"[{pixels.min():.4g}, {pixels.max():.4g}]); pass normalized images, (pixels - mean) / std, with the "
            "mean and std of the model's input_mean / input_std"
        )
    return pixels


def _pixel_stats(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the model's input normalization, (1, C, 1, 1) in ``x``'s working dtype."""
    mean, std = getattr(model, "input_mean", None), getattr(model, "input_std", None)
    if mean is None or std is None:
        raise AttributeError("the model needs 'input_mean' and 'input_std' buffers (see gradreg.models.Classifier)")
    _check_pixels(x, mean.numel())
    like = {"dtype": _working(x.dtype), "device": x.device}
    return mean.to(**like).clone().reshape(1, -1, 1, 1), std.to(**like).clone().reshape(1, -1, 1, 1)


@contextmanager
def _attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and autograd on, even under ``torch.inference_mode()``; the previous mode is restored.

    Tensors that autograd saves for backward must be created inside this context: an inference tensor
    (created under ``torch.inference_mode()``) can never join autograd, so inputs and labels are cloned here. A model
    whose weights are inference tensors cannot be: that is one line.
    """
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        try:
            yield
        except RuntimeError as err:
            raise inference_weights_error(model, err, "the attack") from None


def _check_budget(epsilon: float, steps: int = 1, step_size: float | None = None) -> None:
    if not 0 <= epsilon < math.inf:  # also refuses NaN, which passed ``epsilon < 0`` and gave NaN images
        raise ValueError(
            f"epsilon must be >= 0 and finite (pixel units, e.g. 8/255; 1 already allows any image), got {epsilon}"
        )
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be >= 0 and an integer, got {steps!r}")
    if step_size is not None and not 0 <= step_size < math.inf:  # a negative step would descend the objective
        raise ValueError(f"step_size must be >= 0 and finite (pixel units), got {step_size}")


def _linf_ascent(
    model: nn.Module,
    x: Tensor,
    objective: Callable[[Tensor], Tensor],
    epsilon: float,
    steps: int,
    step_size: float,
    init: Tensor | None = None,
) -> Tensor:
    """Projected signed-gradient *ascent* on the scalar ``objective(logits)`` in pixel space.

    Call inside :func:`_attack_mode`. ``init`` is an optional starting offset in pixel units. Each iterate is
    projected onto the intersection of the L-inf ball around the clean pixels and [0, 1].
    Returns normalized, detached inputs.
    """
    mean, std = _pixel_stats(model, x)
    clean = _to_pixels(x.detach(), mean, std, model.input_mean.dtype)
    # Clean pixels a hair outside [0, 1] (the round trip's float error) stay where they are: clamping them would
    # move them by more than the budget counts.
    lower = torch.min((clean - epsilon).clamp(min=0.0), clean)
    upper = torch.max((clean + epsilon).clamp(max=1.0), clean)
    pixels = clean if init is None else torch.min(torch.max(clean + init, lower), upper)
    for _ in range(steps):
        pixels = pixels.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(_logits(model, (pixels - mean) / std)), pixels)
        pixels = torch.min(torch.max(pixels.detach() + step_size * grad.sign(), lower), upper)
    return ((pixels - mean) / std).detach().to(x.dtype)


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` with ``x`` cast to the dtype of the model's weights (float64 and bfloat16 models included)."""
    param = next(model.parameters(), None)
    return model(x if param is None else x.to(param.dtype))


def _log_odds(model: nn.Module, x: Tensor, y: Tensor | None) -> Callable[[Tensor], Tensor]:
    """Summed log-odds of a wrong class, ``logsumexp_{j != y} f_j - f_y``; call inside :func:`_attack_mode`.

    Its input gradient has the sign of the cross-entropy's row by row (``CE = softplus(log-odds)``) but does not
    vanish when ``softmax(f)_y`` rounds to 1.
    """
    _pixel_stats(model, x)  # a wrong shape fails here, not inside the model
    if y is None:  # attack the model's own predictions (no label leaking)
        with torch.no_grad():
            y = _logits(model, x.clone()).argmax(dim=1)
    y = torch.as_tensor(y)
    if y.shape != (len(x),) or y.is_floating_point() or y.is_complex() or (y.numel() and y.min() < 0):
        raise ValueError(
            f"labels must be {len(x)} class indices >= 0, shape ({len(x)},), got {y.dtype} of shape "
            f"{tuple(y.shape)}; pass y=None to attack the model's own predictions (e.g. OOD images labelled -1)"
        )
    target = y.to(x.device).long().clone()

    def objective(logits: Tensor) -> Tensor:
        if target.numel() and target.max() >= logits.shape[1]:
            raise ValueError(f"label {int(target.max())} is out of range for a model of {logits.shape[1]} classes")
        true = logits.gather(1, target[:, None])
        wrong = logits.scatter(1, target[:, None], -math.inf).logsumexp(dim=1, keepdim=True)
        return (wrong - true).sum()  # sum, not mean: each row's gradient is independent of the batch size

    return objective


def fgsm(model: nn.Module, x: Tensor, y: Tensor | None, epsilon: float) -> Tensor:
    """Fast gradient sign method: one L-inf step of size ``epsilon`` that increases the cross-entropy.

    ``x_adv = clip(x + epsilon * sign(grad_x CE(f(x), y)), 0, 1)`` in pixel units.

    Args:
        model: a classifier with ``input_mean`` / ``input_std`` buffers.
        x: normalized inputs, shape (N, C, H, W).
        y: integer labels (N,); ``None`` attacks the model's own predictions.
        epsilon: L-inf budget in [0, 1] pixel units (e.g. 8/255).

    Returns:
        Normalized adversarial inputs, same shape and dtype as ``x``, detached.
    """
    _check_budget(epsilon)
    with _attack_mode(model):
        x = x.clone()
        return _linf_ascent(model, x, _log_odds(model, x, y), epsilon, 1, epsilon)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    epsilon: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: Generators = None,
) -> Tensor:
    """Projected gradient descent (Madry et al. 2018): L-inf untargeted attack maximizing the cross-entropy.

    Args:
        model: a classifier with ``input_mean`` / ``input_std`` buffers.
        x: normalized inputs, shape (N, C, H, W).
        y: integer labels (N,); ``None`` attacks the model's own predictions.
        epsilon: L-inf budget in [0, 1] pixel units (e.g. 8/255).
        steps: number of signed-gradient steps.
        step_size: step in pixel units; default ``2.5 * epsilon / steps``.
        random_start: start from a uniform point of the epsilon ball (clipped to [0, 1]).
        generator: random generator for the start (reproducible attacks), or one per image (an image's start then
            does not depend on its batch).

    Returns:
        Normalized adversarial inputs, same shape and dtype as ``x``, detached.
    """
    _check_budget(epsilon, steps, step_size)
    step = 2.5 * epsilon / max(steps, 1) if step_size is None else step_size
    with _attack_mode(model):
        x = x.clone()
        init = (2 * _rand(x.to(_working(x.dtype)), generator) - 1) * epsilon if random_start else None
        return _linf_ascent(model, x, _log_odds(model, x, y), epsilon, steps, step, init)


def energy_attack(
    model: nn.Module,
    x_ood: Tensor,
    epsilon: float,
    steps: int = 10,
    step_size: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """PGD inside an L-inf ball that lowers the energy of OOD inputs so that they look in-distribution.

    Minimizes ``sum_i E(x_i)`` with ``E = -T * logsumexp(f(x) / T)`` (``gradreg.losses.energy``) by signed
    gradient steps, starting from the clean input (deterministic). A detector is robust when its AUROC stays
    high on the returned inputs.

    Args:
        model: a classifier with ``input_mean`` / ``input_std`` buffers.
        x_ood: normalized OOD inputs, shape (N, C, H, W).
        epsilon: L-inf budget in [0, 1] pixel units (e.g. 8/255).
        steps: number of signed-gradient steps.
        step_size: step in pixel units; default ``2.5 * epsilon / steps``.
        temperature: energy temperature ``T`` (> 0 and finite).

    Returns:
        Normalized perturbed inputs, same shape and dtype as ``x_ood``, detached.
    """
    _check_budget(epsilon, steps, step_size)
    if not 0 < temperature < math.inf:  # 0, NaN and inf give NaN gradients; a negative T is another objective
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
    step = 2.5 * epsilon / max(steps, 1) if step_size is None else step_size
    with _attack_mode(model):
        # Ascent on -E (= T * logsumexp(f / T)) is descent on the energy.
        return _linf_ascent(
            model, x_ood.clone(), lambda logits: -energy(logits, temperature).sum(), epsilon, steps, step
        )


# Corruptions: fn(pixels (N, C, H, W) in [0, 1], severity 1..5, generator, table) -> same shape in [0, 1].


SEVERITIES = range(1, 6)  # 1 (mild) to 5 (strong), as in ImageNet-C
# The parameter ``c`` of severities 1..5 in make_cifar_c.py (CIFAR-10-C, 32x32 images) and make_imagenet_c.py
# (ImageNet-C, 224x224 images) of github.com/hendrycks/robustness.
SEVERITY_TABLES = ("cifar10c", "imagenetc")
TABLE_SIDES = (32, 224)  # the image side each table was made for


def _times(k: float, *levels: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(k * v for v in level) for level in levels)


_LEVELS: dict[str, tuple[tuple, tuple]] = {  # name: (CIFAR-10-C's, ImageNet-C's)
    "gaussian_noise": ((0.04, 0.06, 0.08, 0.09, 0.10), (0.08, 0.12, 0.18, 0.26, 0.38)),
    "shot_noise": ((500, 250, 100, 75, 50), (60, 25, 12, 5, 3)),
    "impulse_noise": ((0.01, 0.02, 0.03, 0.05, 0.07), (0.03, 0.06, 0.09, 0.17, 0.27)),
    "speckle_noise": ((0.06, 0.10, 0.12, 0.16, 0.20), (0.15, 0.20, 0.35, 0.45, 0.60)),
    "gaussian_blur": ((0.4, 0.6, 0.7, 0.8, 1.0), (1, 2, 3, 4, 6)),
    "contrast": ((0.75, 0.5, 0.4, 0.3, 0.15), (0.4, 0.3, 0.2, 0.1, 0.05)),
    "brightness": ((0.05, 0.1, 0.15, 0.2, 0.3), (0.1, 0.2, 0.3, 0.4, 0.5)),
    "jpeg": ((80, 65, 58, 50, 40), (25, 18, 15, 10, 7)),
    "pixelate": ((0.95, 0.9, 0.85, 0.75, 0.65), (0.6, 0.5, 0.4, 0.3, 0.25)),
    "defocus_blur": (  # (disk radius, alias blur sigma) in pixels
        ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    ),
    "glass_blur": (  # (blur sigma, largest pixel offset + 1, rounds of pixel moves)
        ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    ),
    "zoom_blur": (  # zoom factors np.arange(start, stop, step), as written there
        ((1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)),
        ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)),
    ),
    "fog": (  # (fog strength, wibble decay of the plasma fractal)
        ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
        ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
    ),
    "saturate": (  # (factor, shift) of the HSV saturation
        ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
        ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
    ),
    "motion_blur": (  # ImageMagick's (radius, sigma) in pixels
        ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    ),
    "snow": (  # (layer mean, layer std, layer zoom, threshold, blur radius, blur sigma, weight of the image)
        (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
        (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
    ),
    "spatter": (  # (liquid mean, liquid std, its blur sigma, threshold, strength or mud blur sigma, 1: mud)
        (
            (0.62, 0.1, 0.7, 0.7, 0.5, 0),
            (0.65, 0.1, 0.8, 0.7, 0.5, 0),
            (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1),
            (0.65, 0.1, 0.5, 0.68, 0.6, 1),
        ),
        (
            (0.65, 0.3, 4, 0.69, 0.6, 0),
            (0.65, 0.3, 3, 0.68, 0.6, 0),
            (0.65, 0.3, 2, 0.68, 0.5, 0),
            (0.65, 0.3, 1, 0.65, 1.5, 1),
            (0.67, 0.4, 1, 0.65, 1.5, 1),
        ),
    ),
    "frost": (  # (weight of the image, weight of the frost photograph)
        ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
        ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    ),
    "elastic_transform": (  # (displacement alpha, its smoothing sigma, affine shift) in pixels at TABLE_SIDES
        _times(32, (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
        _times(244, (2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02)),
    ),
}


def severity_table(height: int, width: int) -> str:
    """The severity table for images of this size: ImageNet-C's from its 224 px, CIFAR-10-C's below."""
    return "imagenetc" if min(height, width) >= 224 else "cifar10c"


def _table(x: Tensor, table: str | None) -> int:
    """The index of ``table`` in ``SEVERITY_TABLES`` (``None``: :func:`severity_table` of ``x``)."""
    table = severity_table(*x.shape[-2:]) if table is None else table
    if table not in SEVERITY_TABLES:
        raise ValueError(f"unknown severity table {table!r}; valid: {', '.join(SEVERITY_TABLES)}")
    return SEVERITY_TABLES.index(table)


def _level(name: str, x: Tensor, severity: int, table: str | None) -> Any:
    """Corruption ``name``'s parameter at ``severity`` in ``table`` (``None``: :func:`severity_table` of ``x``)."""
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    return _LEVELS[name][_table(x, table)][int(severity) - 1]


RGB_ONLY = {
    "saturate": "changes the HSV saturation of",
    "spatter": "adds water or mud colours to",
    "frost": "blends colour photographs of frost into",
}


def _require_rgb(name: str, x: Tensor) -> None:
    if x.shape[1] != 3:
        raise ValueError(f"{name} {RGB_ONLY[name]} RGB images; these images have {x.shape[1]} channel(s)")


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Additive gaussian noise ``x + N(0, c^2)``."""
    _check_pixels(x)
    sigma = _level("gaussian_noise", x, severity, table)
    return (x + sigma * _randn(x, generator)).clamp(0.0, 1.0)


@CORRUPTIONS.register("shot_noise")
def shot_noise(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Poisson noise ``Poisson(x * c) / c``, ``c`` photons at full intensity."""
    _check_pixels(x)
    c = _level("shot_noise", x, severity, table)
    counts = _random(lambda rates, g: torch.poisson(rates, generator=g), x.float() * c, generator)
    return (counts.to(x.dtype) / c).clamp(0.0, 1.0)


@CORRUPTIONS.register("impulse_noise")
def impulse_noise(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Salt-and-pepper noise on a fraction ``c`` of the values (as ``skimage.util.random_noise(mode="s&p")``)."""
    _check_pixels(x)
    amount = _level("impulse_noise", x, severity, table)
    hit = _rand(x, generator) < amount
    salt = (_rand(x, generator) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


@CORRUPTIONS.register("speckle_noise")
def speckle_noise(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Multiplicative gaussian noise ``x + x * N(0, c^2)``."""
    _check_pixels(x)
    sigma = _level("speckle_noise", x, severity, table)
    return (x + x * sigma * _randn(x, generator)).clamp(0.0, 1.0)


def _pad_index(n: int, pad: int, mode: str, device: torch.device) -> Tensor:
    """Where each of the ``n + 2 pad`` positions of a padded axis reads from, for scipy.ndimage's boundary modes.

    ``nearest``: a a | a b c | c c; ``mirror``: c b | a b c | b a (OpenCV's BORDER_REFLECT_101); ``reflect``:
    b a | a b c | c b. Any ``pad``, longer than the axis included (reflected again and again).
    """
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "nearest" or n == 1:
        return i.clamp(0, n - 1)
    period = 2 * (n - 1) if mode == "mirror" else 2 * n
    i = i.remainder(period)
    return torch.where(i < n, i, period - i - int(mode == "reflect"))


def _correlate(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Each channel of ``x`` (N, C, H, W) correlated with ``kernel`` (kh, kw), odd sides, ``mode`` at the borders."""
    kh, kw = kernel.shape
    h, w = x.shape[-2:]
    padded = x.index_select(-2, _pad_index(h, kh // 2, mode, x.device))
    padded = padded.index_select(-1, _pad_index(w, kw // 2, mode, x.device))
    weight = kernel.to(x).expand(x.shape[1], 1, kh, kw)
    return F.conv2d(padded, weight, groups=x.shape[1])


def _gaussian_kernel(sigma: float, radius: int) -> Tensor:
    """Normalized gaussian weights at offsets ``-radius..radius`` (scipy's and OpenCV's), float64."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _gaussian_filter(x: Tensor, sigma: float, truncate: float, mode: str, store: torch.dtype | None = None) -> Tensor:
    """As scipy's ``gaussian_filter``: separable, radius ``int(truncate sigma + 0.5)``; sigma 0 leaves ``x`` alone.

    ``store``: the dtype of scipy's output array (the image's), which rounds each axis' pass, rows first.
    """
    if sigma == 0:
        return x
    kernel = _gaussian_kernel(sigma, int(truncate * sigma + 0.5))
    stored = (lambda t: t) if store is None else (lambda t: t.to(store).to(x.dtype))
    rows, cols = (_band_matrix(n, kernel, mode).to(x) for n in x.shape[-2:])
    return stored(stored(rows @ x) @ cols.T)


def _band_matrix(n: int, kernel: Tensor, mode: str) -> Tensor:
    """(n, n) matrix of the correlation of an axis of ``n`` pixels with ``kernel`` (odd length), ``mode`` at borders.

    The padded axis folded back onto the pixels it reads (:func:`_pad_index`). A matrix product per axis is an order
    of magnitude faster than a depthwise convolution on the CPU (224 px, batch 32: 0.04 s against 0.45 s).
    """
    radius = len(kernel) // 2
    band = torch.zeros(n, n + 2 * radius, dtype=kernel.dtype)
    band[torch.arange(n)[:, None], torch.arange(n)[:, None] + torch.arange(2 * radius + 1)] = kernel
    return torch.zeros(n, n, dtype=kernel.dtype).index_add_(1, _pad_index(n, radius, mode, band.device), band)


def _gaussian_blur(x: Tensor, sigma: float, store: torch.dtype | None = None) -> Tensor:
    """Gaussian blur as ``skimage.filters.gaussian``: truncated at ``4 sigma``, edge replication (``nearest``)."""
    return _gaussian_filter(x, sigma, 4.0, "nearest", store)


@CORRUPTIONS.register("gaussian_blur")
def gaussian_blur(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Gaussian blur with sigma ``c`` pixels; deterministic."""
    _check_pixels(x)
    return _gaussian_blur(x, _level("gaussian_blur", x, severity, table)).clamp(0.0, 1.0)


@CORRUPTIONS.register("contrast")
def contrast(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Shrink towards the per-image, per-channel mean by a factor ``c``."""
    _check_pixels(x)
    c = _level("contrast", x, severity, table)
    means = x.mean(dim=(2, 3), keepdim=True)
    return ((x - means) * c + means).clamp(0.0, 1.0)


@CORRUPTIONS.register("brightness")
def brightness(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Add ``c`` to the HSV value channel, clipped to 1.

    With hue and saturation fixed every channel is proportional to V = max over channels, so the HSV round trip
    is the rescale ``x * V' / V`` (black pixels, V = 0, become gray V'). Grayscale: ``min(x + c, 1)``.
    """
    _check_pixels(x)
    c = _level("brightness", x, severity, table)
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + c).clamp(max=1.0)
    scaled = x * (new_value / value.clamp(min=torch.finfo(x.dtype).tiny))
    return torch.where(value > 0, scaled, new_value.expand_as(x)).clamp(0.0, 1.0)


@CORRUPTIONS.register("saturate")
def saturate(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Scale the HSV saturation by ``c[0]`` and add ``c[1]``, clipped to [0, 1]; RGB images only (``RGB_ONLY``).

    With hue and value fixed every channel is ``V - S V k`` with ``k`` in [0, 1] set by the hue, so the HSV round
    trip is ``V - S' (V - x) V / (V - min)``. Gray pixels have hue 0 (red), as in scikit-image: a shift ``c[1] > 0``
    tints them red, ``(V, V (1 - S'), V (1 - S'))``, as in the references.
    """
    _check_pixels(x)
    _require_rgb("saturate", x)
    factor, shift = _level("saturate", x, severity, table)
    value = x.amax(dim=1, keepdim=True)
    spread = value - x.amin(dim=1, keepdim=True)
    tiny = torch.finfo(x.dtype).tiny
    saturation = (spread / value.clamp(min=tiny) * factor + shift).clamp(0.0, 1.0)
    gray = torch.tensor([0.0, 1.0, 1.0], dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    fraction = torch.where(spread > 0, (value - x) / spread.clamp(min=tiny), gray)
    return (value * (1 - saturation * fraction)).clamp(0.0, 1.0)


@CORRUPTIONS.register("jpeg")
def jpeg(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """JPEG compression at quality ``c`` (``jpeg_compression`` of the references); deterministic.

    Pixels are rounded to uint8 first (the JPEG input format); runs on the CPU.
    """
    from PIL import Image

    _check_pixels(x)
    quality = int(_level("jpeg", x, severity, table))
    images = (x.detach() * 255.0).round().clamp(0, 255).to("cpu", torch.uint8)
    rgb = images.shape[1] == 3
    # JPEG has no 2- or 4+-channel mode: other images are compressed channel by channel as grayscale
    groups = [img.permute(1, 2, 0) for img in images] if rgb else [channel for img in images for channel in img]
    decoded = []
    for group in groups:  # PIL's save and open, as the references (torchvision's JPEG codec is deprecated)
        buffer = io.BytesIO()
        Image.fromarray(group.contiguous().numpy()).save(buffer, "JPEG", quality=quality)
        decoded.append(torch.from_numpy(np.array(Image.open(buffer))))
    if not decoded:  # an empty batch stays empty
        out = images
    else:
        out = torch.stack(decoded).permute(0, 3, 1, 2) if rgb else torch.stack(decoded).reshape(images.shape)
    return (out.to(x.device, x.dtype) / 255.0).clamp(0.0, 1.0)


def _box_resize_matrix(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """(n_out, n_in) weights of PIL's BOX resampling along one axis (the coefficients of ``ImagingResample``).

    Downsampling averages, with equal weights, the input pixels whose centres fall in each output pixel's box (at
    32 -> 30 mostly a single pixel, not the 2-3 of an area average); upsampling is nearest-neighbour on pixel centres.
    """
    scale = n_in / n_out
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    center = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    first = (center - support + 0.5).floor().clamp(min=0)  # PIL's window of candidate inputs, [first, last)
    last = (center + support + 0.5).floor().clamp(max=n_in)
    i = torch.arange(n_in, dtype=torch.float64)
    u = (i - center[:, None] + 0.5) / filter_scale
    w = ((u > -0.5) & (u <= 0.5) & (i >= first[:, None]) & (i < last[:, None])).double()
    return (w / w.sum(1, keepdim=True)).to(like.device, like.dtype)


@CORRUPTIONS.register("pixelate")
def pixelate(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Downsample by a factor ``c`` and back with PIL's BOX filter, as the references; deterministic."""
    _check_pixels(x)
    c = _level("pixelate", x, severity, table)
    height, width = x.shape[-2:]
    small_h, small_w = max(1, int(height * c)), max(1, int(width * c))
    rows = _box_resize_matrix(small_h, height, x) @ _box_resize_matrix(height, small_h, x)
    cols = _box_resize_matrix(small_w, width, x) @ _box_resize_matrix(width, small_w, x)
    return (rows @ x @ cols.T).clamp(0.0, 1.0)


@CORRUPTIONS.register("defocus_blur")
def defocus_blur(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Convolution with an anti-aliased disk of radius ``c[0]`` (``c[1]``: the sigma of its anti-aliasing blur).

    As the references: the disk ``x^2 + y^2 <= r^2`` on a 17x17 grid (``2 r + 1`` for r > 8), normalized, blurred by
    OpenCV's ``GaussianBlur`` (3x3, 5x5 for r > 8) and applied by ``filter2D``, both with BORDER_REFLECT_101;
    deterministic.
    """
    _check_pixels(x)
    radius, alias_blur = _level("defocus_blur", x, severity, table)
    half = 8 if radius <= 8 else int(radius)
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius**2).double()
    alias = _gaussian_kernel(alias_blur, 1 if radius <= 8 else 2)
    disk = _correlate(_correlate((disk / disk.sum())[None, None], alias[None, :], "mirror"), alias[:, None], "mirror")
    return _correlate(x, disk[0, 0], "mirror").clamp(0.0, 1.0)


@CORRUPTIONS.register("glass_blur")
def glass_blur(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Gaussian blur (sigma ``c[0]``), pixels moved ``c[2]`` times by random offsets in ``[-c[1], c[1])``, blur again.

    As the references, with their 8-bit rounding down after the first blur and their "swap" of pixel ``(h, w)`` with
    ``(h + dy, w + dx)``, which numpy's views make a copy: the pixel takes its neighbour's value, the neighbour keeps
    its own. The references visit the pixels one at a time (rows, then columns, from the bottom right, ``c[1]`` away
    from the borders), and a pixel's value changes only at its visit: a visit copies the new value of a pixel visited
    before it, or else the value the round started with. Here all the visits of a round run at once, each following
    its links to pixels visited before to the end of the chain (pointer doubling): the same result in ``O(log
    visits)`` steps.
    """
    _check_pixels(x)
    sigma, delta, rounds = _level("glass_blur", x, severity, table)
    n, _, h, w = x.shape
    out = (_gaussian_blur(x, sigma) * 255).floor() / 255  # np.uint8(blurred * 255)
    # visited in this order, then these in each row; none in images of 2 delta pixels or less
    rows = torch.tensor(range(h - delta, delta, -1), dtype=torch.long, device=x.device)[:, None]
    cols = torch.tensor(range(w - delta, delta, -1), dtype=torch.long, device=x.device)
    like = torch.empty(n, rounds, len(rows), len(cols), 2, dtype=torch.long, device=x.device)
    offsets = _random(lambda t, g: torch.randint(-delta, delta, t.shape, generator=g, device=t.device), like, generator)
    images = torch.arange(n, device=x.device)[:, None, None]
    visit = torch.arange(rows.numel() * cols.numel(), device=x.device).expand(n, -1)  # (N, visits)
    for r in range(rounds):
        dx, dy = offsets[:, r].unbind(-1)  # (N, rows, columns)
        source_rows, source_cols = rows + dy, cols + dx
        taken = out[images, :, source_rows, source_cols].flatten(1, 2)  # (N, visits, C), as the round started
        inside = (source_rows > delta) & (source_rows <= h - delta) & (source_cols > delta) & (source_cols <= w - delta)
        source_visit = ((h - delta - source_rows) * len(cols) + (w - delta - source_cols)).flatten(1)
        link = torch.where(inside.flatten(1) & (source_visit < visit), source_visit, visit)
        while not torch.equal(link, hop := link.gather(1, link)):
            link = hop
        moved = taken.gather(1, link[..., None].expand_as(taken))
        out[images, :, rows, cols] = moved.view(n, len(rows), len(cols), x.shape[1])
    return _gaussian_blur(out, sigma).clamp(0.0, 1.0)


def _clipped_zoom(x: Tensor, factor: float) -> Tensor:
    """The references' ``clipped_zoom``: the centre crop zoomed by ``factor`` and cut back to the centre, per axis.

    The crop's side is ``ceil(side / factor)``; the zoom is scipy's ``zoom`` of order 1 with corners aligned
    (``align_corners=True``).
    """
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    size = (round(ch * factor), round(cw * factor))  # scipy: the output side is round(input side * zoom)
    zoomed = F.interpolate(x[..., top : top + ch, left : left + cw], size=size, mode="bilinear", align_corners=True)
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    return zoomed[..., top : top + h, left : left + w]


@CORRUPTIONS.register("zoom_blur")
def zoom_blur(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """The mean of the image and its centre zooms by the factors ``np.arange(*c)``; deterministic.

    A zoom that adds less than half a pixel is the identity, as in the references: CIFAR-10-C's mildest severity
    (at most 1.06) leaves images of 8 px or less as they are.
    """
    _check_pixels(x)
    factors = np.arange(*_level("zoom_blur", x, severity, table))
    if not len(x):
        return x.clone()
    total = x.clone()
    for factor in factors:
        total += _clipped_zoom(x, float(factor))
    return (total / (len(factors) + 1)).clamp(0.0, 1.0)


def _motion_blur(x: Tensor, radius: float, sigma: float, angles: Tensor) -> Tensor:
    """ImageMagick's ``MotionBlurImage(radius, sigma, angle)`` with one angle (degrees) per image.

    Each pixel is the weighted sum of the ``2 ceil(radius) + 1`` pixels from itself towards ``angle``: pixel ``i``
    of that line is ``ceil(i cos(angle) - 0.5)`` columns and ``ceil(i sin(angle) - 0.5)`` rows away (rows down),
    weighted ``exp(-i^2 / (2 sigma^2))``, normalized; pixels beyond the border repeat the edge (the default virtual
    pixel method). The offsets are computed as ImageMagick does, in float64.
    """
    width = 2 * math.ceil(radius) + 1
    steps = torch.arange(width, dtype=torch.float64, device=x.device)
    kernel = torch.exp(-(steps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).tolist()
    radians = math.pi * angles.to(x.device, torch.float64) / 180  # DegreesToRadians
    point_x, point_y = width * torch.sin(radians), width * torch.cos(radians)
    length = torch.hypot(point_x, point_y)[:, None]
    n, c, h, w = x.shape
    rows = torch.ceil(steps * point_x[:, None] / length - 0.5).long()[..., None] + torch.arange(h, device=x.device)
    cols = torch.ceil(steps * point_y[:, None] / length - 0.5).long()[..., None] + torch.arange(w, device=x.device)
    reads = rows.clamp(0, h - 1)[..., None] * w + cols.clamp(0, w - 1)[:, :, None, :]  # (N, width, H, W) flat
    flat = x.flatten(2)
    out = torch.zeros_like(flat)
    for i, weight in enumerate(kernel):
        out += weight * flat.gather(2, reads[:, i, None].flatten(2).expand(n, c, h * w))
    return out.view_as(x)


def _uniform(low: float, high: float, n: int, like: Tensor, generator: Generators) -> Tensor:
    """``n`` float64 draws from U[low, high) on ``like``'s device, one per image with one generator per image."""
    draws = _rand(torch.empty(n, dtype=torch.float64, device=like.device), generator)
    return low + (high - low) * draws


@CORRUPTIONS.register("motion_blur")
def motion_blur(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """ImageMagick's motion blur (radius ``c[0]``, sigma ``c[1]``) at an angle drawn from U(-45, 45) degrees.

    As the references' ``MagickMotionBlurImage`` (:func:`_motion_blur`), without the 8-bit PNG round trip around it.
    """
    _check_pixels(x)
    radius, sigma = _level("motion_blur", x, severity, table)
    angles = _uniform(-45, 45, len(x), x, generator)
    return _motion_blur(x, radius, sigma, angles).clamp(0.0, 1.0)


@CORRUPTIONS.register("snow")
def snow(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Motion-blurred snowflakes on a paler image, as the references.

    The snow layer is gaussian noise ``N(c[0], c[1]^2)`` per pixel, zoomed by ``c[2]`` (``clipped_zoom``), zero below
    ``c[3]``, clipped and truncated to 8 bits (``astype(np.uint8)`` there), then motion-blurred (radius ``c[4]``,
    sigma ``c[5]``) at an angle drawn from U(-135, -45) degrees, without the references' 8-bit PNG round trip. The
    image becomes ``c[6] x + (1 - c[6]) max(x, 1.5 gray + 0.5)`` (``gray``: OpenCV's RGB luma, the channel mean
    for other channel counts, the image itself for one), and the layer and its 180-degree rotation are added.
    """
    _check_pixels(x)
    mean, std, zoom, threshold, radius, sigma, keep = _level("snow", x, severity, table)
    n, c, h, w = x.shape
    layer = mean + std * _randn(torch.empty(n, 1, h, w, dtype=torch.float64, device=x.device), generator)
    layer = _clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, 0.0, layer).clamp(0.0, 1.0)
    layer = (layer * 255).floor() / 255
    layer = _motion_blur(layer, radius, sigma, _uniform(-135, -45, n, x, generator)).to(x.dtype)
    luma = torch.tensor([0.299, 0.587, 0.114] if c == 3 else [1 / c] * c, dtype=x.dtype, device=x.device)
    gray = (x * luma.reshape(1, c, 1, 1)).sum(dim=1, keepdim=True)
    x = keep * x + (1 - keep) * torch.maximum(x, 1.5 * gray + 0.5)
    return (x + layer + layer.flip(-2, -1)).clamp(0.0, 1.0)


def _shifts(x: Tensor, pad: int, fill: float) -> Callable[[int, int], Tensor]:
    """``x`` (N, H, W) padded by ``pad`` with ``fill``; ``at(dy, dx)`` reads it at ``(i + dy, j + dx)``."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    return lambda dy, dx: padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def _canny(image: Tensor, low: int, high: int) -> Tensor:
    """OpenCV's ``Canny(image, low, high)`` (aperture 3, L1 gradient) of 8-bit images (N, H, W): the edge mask.

    Sobel gradients with replicated borders; non-maximum suppression along the gradient's sector as OpenCV decides it
    in fixed point (``tan 22.5`` as 13573 / 2^15), strict towards the left / top neighbour and not towards the other,
    zero magnitude beyond the border; hysteresis keeps the candidates above ``low`` 8-connected to one above ``high``.
    """
    padded = F.pad(image[:, None].double(), (1, 1, 1, 1), mode="replicate")
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    dx = F.conv2d(padded, sobel.to(image.device)[None, None])[:, 0].long()
    dy = F.conv2d(padded, sobel.T.to(image.device)[None, None])[:, 0].long()
    magnitude = dx.abs() + dy.abs()
    at = _shifts(magnitude, 1, 0)
    tg22x = dx.abs() * 13573  # the tangent compares with |dy| << 15
    ys = dy.abs() << 15
    same_sign = (dx < 0) == (dy < 0)
    diagonal = torch.where(
        same_sign, (magnitude > at(-1, -1)) & (magnitude > at(1, 1)), (magnitude > at(-1, 1)) & (magnitude > at(1, -1))
    )
    vertical = torch.where(ys > tg22x + (dx.abs() << 16), (magnitude > at(-1, 0)) & (magnitude >= at(1, 0)), diagonal)
    peak = torch.where(ys < tg22x, (magnitude > at(0, -1)) & (magnitude >= at(0, 1)), vertical)
    candidates = peak & (magnitude > low)
    edges = candidates & (magnitude > high)
    while True:
        grown = candidates & (F.max_pool2d(edges[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def _chamfer_distance(sources: Tensor, cap: float) -> Tensor:
    """OpenCV's ``distanceTransform(DIST_L2, 5)`` to the ``sources`` (N, H, W), as float32, up to ``cap`` pixels.

    The 5x5 chamfer metric (steps 1, 1.4 and 2.1969 in 16-bit fixed point, as OpenCV): the cheapest path of such
    steps, found by relaxing every step at once until nothing changes, where OpenCV makes two raster passes (the
    same distances; tested). Distances beyond ``cap`` come back as more than ``cap``; without a source, all are.
    """
    one = 1 << 16
    steps = {(0, 1): one, (1, 1): round(float(np.float32(1.4)) * one), (1, 2): round(float(np.float32(2.1969)) * one)}
    moves = [(a * sy, b * sx, cost) for (a, b), cost in steps.items() for sy in (-1, 1) for sx in (-1, 1)]
    moves += [(b, a, cost) for a, b, cost in moves if a != b]  # transposed steps: both axes of the knight move
    moves = list({(dy, dx): c for dy, dx, c in moves}.items())  # (0, 1)'s signs repeat
    limit = (math.floor(cap) + 2) * one  # anything above cap stays above it
    distance = torch.where(sources, 0, limit).int()  # below 2^31: at most (cap + 2) 2^16
    while True:
        at = _shifts(distance, 2, limit)
        nearer = distance
        for (dy, dx), cost in moves:
            nearer = torch.minimum(nearer, at(dy, dx) + cost)
        if torch.equal(nearer, distance):
            return (distance.double() / one).float()
        distance = nearer


def _equalize_histogram(image: Tensor) -> Tensor:
    """OpenCV's ``equalizeHist`` of 8-bit images (N, H, W), integer-valued: its lookup table, float32 rounding."""
    n = len(image)
    flat = image.flatten(1).long()
    hist = torch.zeros(n, 256, dtype=torch.long, device=image.device).scatter_add_(1, flat, torch.ones_like(flat))
    first = (hist > 0).long().argmax(dim=1, keepdim=True)  # the darkest value present
    below = hist.gather(1, first)
    scale = torch.tensor(255.0, dtype=torch.float32) / (flat.shape[1] - below).float()
    lut = ((hist.cumsum(1) - below).float() * scale).round().clamp(0, 255)
    lut = torch.where((below == flat.shape[1]).expand_as(lut), first.float(), lut)  # one value: it stays
    return lut.gather(1, flat).reshape(image.shape).to(image.dtype)


def _box3(x: Tensor) -> Tensor:
    """OpenCV's ``blur(x, (3, 3))`` of (N, H, W) before its rounding: the sum of the 3x3 box (exact) times 1/9."""
    return _correlate(x[:, None], torch.ones(3, 3, dtype=torch.float64), "mirror")[:, 0] * (1 / 9)


@CORRUPTIONS.register("spatter")
def spatter(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Water drops (``c[5] = 0``) or mud (``c[5] = 1``) on the image, as the references; RGB images only.

    A liquid layer ``N(c[0], c[1]^2)`` per pixel, blurred (sigma ``c[2]``), zero below ``c[3]``. Mud: the pixels
    above ``c[3]``, blurred (sigma ``c[4]``), zero below 0.8, paint the image brown. Water: the layer in 8 bits; the
    distance to its Canny edges (50, 150), truncated at 20 px, box-blurred, equalized, embossed and box-blurred again
    through OpenCV's 8-bit steps (:func:`_canny`, :func:`_chamfer_distance`, :func:`_equalize_histogram`); times the
    layer, scaled to a peak of ``c[4]``, it adds pale turquoise. One deviation: a water layer that comes out all
    zero leaves the image as it is, where the references divide 0 by 0.
    """
    _check_pixels(x)
    _require_rgb("spatter", x)
    mean, std, blur, threshold, strength, mud = _level("spatter", x, severity, table)
    n, _, h, w = x.shape
    liquid = mean + std * _randn(torch.empty(n, 1, h, w, dtype=torch.float64, device=x.device), generator)
    liquid = _gaussian_blur(liquid, blur)[:, 0]
    liquid = torch.where(liquid < threshold, 0.0, liquid)
    if mud:
        # the references blur a float32 mask: its float32 rounding decides pixels at the 0.8 cut
        mask = _gaussian_blur((liquid > threshold).double()[:, None], strength, torch.float32)
        mask = torch.where(mask < 0.8, 0.0, mask).to(x.dtype)
        brown = torch.tensor([63, 42, 20], dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1) / 255
        return (x * (1 - mask) + brown * mask).clamp(0.0, 1.0)
    layer = (liquid * 255).floor().remainder(256)  # astype(np.uint8): a rare value above 1 wraps around, as there
    distance = _chamfer_distance(_canny(layer, 50, 150), 20).clamp(max=20).double()
    distance = _box3(distance).float().floor().double()  # astype(np.uint8)
    distance = _equalize_histogram(distance)
    emboss = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    distance = _correlate(distance[:, None], emboss, "mirror")[:, 0].clamp(0, 255)  # filter2D to CV_8U
    distance = _box3(distance).round()  # blur of an 8-bit image, rounded
    wet = layer * distance
    peak = wet.amax(dim=(1, 2), keepdim=True)
    wet = torch.where(peak > 0, wet / peak.clamp(min=1), 0.0) * strength
    turquoise = torch.tensor([175, 238, 238], dtype=torch.float64, device=x.device).reshape(1, 3, 1, 1) / 255
    return (x + (wet[:, None] * turquoise).to(x.dtype)).clamp(0.0, 1.0)


FROST_PHOTOS = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # the references draw of these
FROST_SCALES = (0.2, 1.0)  # the photographs' scale in each severity table (CIFAR-10-C shrinks them 5 times)


def frost_folder() -> Path:
    """Where the frost photographs of ImageNet-C are: the ``frost/`` folder of the ``imagecorruptions`` package.

    Found without importing the package (only its photographs are read); a ValueError says how to install it.
    """
    spec = importlib.util.find_spec("imagecorruptions")
    folders = [Path(p) / "frost" for p in (spec.submodule_search_locations or [])] if spec else []
    found = [f for f in folders if all((f / name).is_file() for name in FROST_PHOTOS)]
    if not found:
        raise ValueError(
            "frost blends in the photographs of frost of ImageNet-C, which are not installed: "
            "pip install --no-deps imagecorruptions (2 MB; gradreg reads its frost/ photographs, nothing else)"
        )
    return found[0]


@functools.lru_cache(maxsize=4)
def _frost_photos(folder: Path) -> tuple[Tensor, ...]:
    """The photographs, RGB (C, H, W) float64 in [0, 1] (an alpha channel is dropped, as ``cv2.imread`` does)."""
    from PIL import Image

    photos = []
    for name in FROST_PHOTOS:
        with Image.open(folder / name) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
        photos.append(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
    return tuple(photos)


def _resize_linear_matrix(n_in: int, scale: float, n_out: int) -> Tensor:
    """(n_out, n_in) weights of OpenCV's ``resize(fx=scale)`` with INTER_LINEAR along one axis, in float.

    Output pixel ``d`` reads the input at ``(d + 0.5) / scale - 0.5`` (``1 / scale`` computed first, as OpenCV),
    between its two neighbours, clamped to the first and last pixel.
    """
    position = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (1.0 / scale) - 0.5).float().double()
    low = position.floor()
    frac = position - low
    frac = torch.where((low < 0) | (low >= n_in - 1), 0.0, frac)
    low = low.clamp(0, n_in - 1).long()
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    weights[torch.arange(n_out), low] = 1 - frac
    weights[torch.arange(n_out), (low + 1).clamp(max=n_in - 1)] += frac
    return weights


def _frost_layer(photo: Tensor, scale: float, height: int, width: int) -> Tensor:
    """The photograph at ``scale`` (OpenCV's linear resize, size rounded), or larger until it covers the image."""
    rows, cols = photo.shape[-2:]
    scale = max(scale, height / rows, width / cols)
    if scale == 1:
        return photo
    out_rows, out_cols = max(height, round(rows * scale)), max(width, round(cols * scale))
    return _resize_linear_matrix(rows, scale, out_rows) @ photo @ _resize_linear_matrix(cols, scale, out_cols).T


@CORRUPTIONS.register("frost")
def frost(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """``c[0] x + c[1] frost``: a random crop of one of five photographs of frost, as the references; RGB only.

    The photographs are ImageNet-C's (:func:`frost_folder`); CIFAR-10-C's table shrinks them 5 times first, with
    OpenCV's linear resize (which at that scale picks every fifth pixel: equal to ``cv2.resize`` on the real
    photographs). A photograph smaller than the image is enlarged until it covers it (the references' images always
    fit). The photograph and the crop's corner are drawn uniformly, one draw each per image.
    """
    _check_pixels(x)
    _require_rgb("frost", x)
    image_weight, frost_weight = _level("frost", x, severity, table)
    n, _, h, w = x.shape
    photos = _frost_photos(frost_folder())
    scale = FROST_SCALES[_table(x, table)]
    layers = [_frost_layer(photo, scale, h, w) for photo in photos]
    draws = _rand(torch.empty(n, 3, dtype=torch.float64, device=x.device), generator).cpu()
    crops = []
    for choice, down, right in draws.tolist():
        layer = layers[int(choice * len(layers))]
        top = int(down * max(layer.shape[1] - h, 1))  # np.random.randint(0, rows - h): at most rows - h - 1
        left = int(right * max(layer.shape[2] - w, 1))
        crops.append(layer[:, top : top + h, left : left + w])
    layer = torch.stack(crops).to(x) if crops else torch.empty_like(x)
    return (image_weight * x + frost_weight * layer).clamp(0.0, 1.0)


def _plasma_fractal(like: Tensor, size: int, decay: float, generator: Generators) -> Tensor:
    """One diamond-square height map in [0, 1] per image, (N, size, size) float64, ``size`` a power of two.

    The references' ``plasma_fractal`` (after FLHerne/mapgen), batched; its wibble draws ``uniform(-w, w)`` are
    scaled by ``w`` once more, as there.
    """
    maps = torch.zeros(len(like), size, size, dtype=torch.float64, device=like.device)
    step, wibble = size, 100.0

    def wibbled(total: Tensor) -> Tensor:
        return total / 4 + wibble * (wibble * (2 * _rand(total, generator) - 1))

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]  # squares: their centres from their four corners
        total = corners + corners.roll(-1, 1)
        maps[:, half::step, half::step] = wibbled(total + total.roll(-1, 2))
        centres, corners = maps[:, half::step, half::step], maps[:, 0::step, 0::step]  # diamonds
        maps[:, 0::step, half::step] = wibbled(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        maps[:, half::step, 0::step] = wibbled(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / decay
    maps -= maps.amin(dim=(1, 2), keepdim=True)
    return maps / maps.amax(dim=(1, 2), keepdim=True)


@CORRUPTIONS.register("fog")
def fog(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """Adds ``c[0]`` times a plasma fractal (wibble decay ``c[1]``), rescaled by ``max / (max + c[0])``.

    The fractal is ``mapsize`` = the next power of two of the longer side (the references: 32 and 256), cropped.
    """
    _check_pixels(x)
    strength, decay = _level("fog", x, severity, table)
    h, w = x.shape[-2:]
    plasma = _plasma_fractal(x, max(2, 1 << (max(h, w) - 1).bit_length()), decay, generator)[:, None, :h, :w]
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x + strength * plasma.to(x)) * peak / (peak + strength)).clamp(0.0, 1.0)


@CORRUPTIONS.register("elastic_transform")
def elastic_transform(x: Tensor, severity: int, generator: Generators = None, table: str | None = None) -> Tensor:
    """A random affine warp, then a smooth random displacement field (Simard et al. 2003), as the references.

    Affine: three points about the centre moved by ``uniform(-c[2], c[2])`` each (OpenCV's ``getAffineTransform`` /
    ``warpAffine``, bilinear, BORDER_REFLECT_101). Displacement: ``c[0]`` times ``uniform(-1, 1)`` fields smoothed by
    a gaussian of sigma ``c[1]`` (truncated at 3 sigma, ``reflect``), applied by ``map_coordinates`` (order 1,
    ``reflect``). Parameters are in pixels at the table's image side (the references write them as multiples of
    it) and scale with the shorter side.
    """
    _check_pixels(x)
    alpha, sigma, shift = (
        v * min(x.shape[-2:]) / TABLE_SIDES[_table(x, table)] for v in _level("elastic_transform", x, severity, table)
    )
    n, _, h, w = x.shape
    if min(h, w) < 3:  # the affine warp moves three points a third of the side from the centre
        raise ValueError(f"elastic_transform needs images of at least 3x3 pixels, got {h}x{w}")
    f64 = {"dtype": torch.float64, "device": x.device}
    a, b, side = float(h // 2), float(w // 2), float(min(h, w) // 3)
    source = torch.tensor([[a + side, b + side], [a + side, b - side], [a - side, b - side]], **f64)  # (x, y) points
    target = source + shift * (2 * _rand(torch.empty(n, 3, 2, **f64), generator) - 1)
    # [x', y'] = [x, y, 1] @ affine; each output pixel reads the input at the inverse map of its position
    affine = torch.linalg.solve(torch.cat([source, torch.ones(3, 1, **f64)], 1), target)
    rows, cols = torch.meshgrid(torch.arange(h, **f64), torch.arange(w, **f64), indexing="ij")
    points = torch.stack([cols, rows], -1).reshape(1, -1, 2) - affine[:, 2:]
    inverse = torch.linalg.inv(affine[:, :2])
    read = (points @ inverse).reshape(n, h, w, 2)
    grid = torch.stack([2 * read[..., 0] / max(w - 1, 1) - 1, 2 * read[..., 1] / max(h - 1, 1) - 1], -1)
    warped = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=True)
    shifts = [
        alpha * _gaussian_filter(2 * _rand(torch.empty(n, 1, h, w, **f64), generator) - 1, sigma, 3.0, "reflect")
        for _ in range(2)
    ]
    cols, rows = cols + shifts[0][:, 0], rows + shifts[1][:, 0]  # dx moves columns, dy rows
    grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], -1)
    out = F.grid_sample(warped, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp(0.0, 1.0)


def corrupt(
    x: Tensor,
    name: str,
    severity: int,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    generator: Generators = None,
    table: str | None = None,
) -> Tensor:
    """Apply a registered corruption to **normalized** inputs and return normalized inputs.

    Args:
        x: normalized inputs, shape (N, C, H, W).
        name: a name in ``CORRUPTIONS.names()`` (e.g. ``"gaussian_noise"``).
        severity: 1 (mild) to 5 (strong).
        mean: per-channel normalization mean (length C), e.g. ``model.input_mean``.
        std: per-channel normalization std (length C), e.g. ``model.input_std``.
        generator: random generator for the noise corruptions, or one per image (an image's noise then does not
            depend on its batch).
        table: severity table, ``"cifar10c"`` or ``"imagenetc"`` (``SEVERITY_TABLES``); default by image size
            (:func:`severity_table`).

    Returns:
        Normalized corrupted inputs, same shape and dtype as ``x``.
    """
    fn = CORRUPTIONS.get(name)
    _check_pixels(x)
    mean_t, std_t = torch.as_tensor(mean), torch.as_tensor(std)
    constants = mean_t.dtype if mean_t.is_floating_point() else x.dtype
    like = {"dtype": _working(x.dtype), "device": x.device}
    mean_t, std_t = mean_t.to(**like).reshape(1, -1, 1, 1), std_t.to(**like).reshape(1, -1, 1, 1)
    if mean_t.shape[1] != x.shape[1] or std_t.shape[1] != x.shape[1]:
        raise ValueError(f"mean/std need {x.shape[1]} channels, got {mean_t.shape[1]} and {std_t.shape[1]}")
    if not ((std_t > 0) & std_t.isfinite()).all():
        raise ValueError(f"std must be positive and finite, got {std_t.flatten().tolist()}")
    pixels = _to_pixels(x, mean_t, std_t, constants).clamp(0.0, 1.0)  # the float error of the round trip
    return ((fn(pixels, severity, generator, table) - mean_t) / std_t).to(x.dtype)
