"""Tests for gradreg.anomalies: L-inf attacks, the energy attack on the detector, and common corruptions."""

from __future__ import annotations

import colorsys
import copy
import importlib
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from sklearn.datasets import load_digits

from gradreg import anomalies
from gradreg.anomalies import CORRUPTIONS, corrupt, energy_attack, fgsm, pgd, severity_table
from gradreg.losses import energy
from gradreg.models import SmallCNN

EPS = 0.1  # pixel units; large enough to hurt an 8x8 digits model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Real UCI digits as normalized (N, 1, 8, 8) tensors with labels, and the normalization constants."""
    data = load_digits()
    pixels = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    mean, std = pixels.mean().item(), pixels.std().item()
    return (pixels - mean) / std, torch.tensor(data.target), mean, std


@pytest.fixture(scope="module")
def trained(digits: tuple[torch.Tensor, torch.Tensor, float, float]) -> SmallCNN:
    """A SmallCNN trained for a few Adam steps (about 90% test accuracy); returned in train mode."""
    x, y, mean, std = digits
    torch.manual_seed(0)
    model = SmallCNN(10, in_channels=1, width=8)
    model.set_normalization([mean], [std])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, 1500, (64,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model


@pytest.fixture
def test_batch(digits: tuple[torch.Tensor, torch.Tensor, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = digits
    return x[1500:1564], y[1500:1564]


def _loss(model: SmallCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _pixels(model: SmallCNN, x: torch.Tensor) -> torch.Tensor:
    return x * model.input_std.view(1, -1, 1, 1) + model.input_mean.view(1, -1, 1, 1)


def _attacks(model: SmallCNN, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "fgsm": fgsm(model, x, y, EPS),
        "pgd": pgd(model, x, y, EPS, generator=torch.Generator().manual_seed(0)),
        "pgd_no_random_start": pgd(model, x, y, EPS, steps=5, random_start=False),
    }


# Adversarial attacks.


def test_attacks_raise_the_loss_of_a_trained_model(trained: SmallCNN, test_batch: tuple) -> None:
    x, y = test_batch
    clean = _loss(trained, x, y)
    losses = {name: _loss(trained, x_adv, y) for name, x_adv in _attacks(trained, x, y).items()}
    for name, value in losses.items():
        assert value > clean + 0.5, (name, clean, value)
    assert losses["pgd"] > losses["fgsm"]  # the iterative attack is stronger at the same budget


def test_attacks_without_labels_use_the_predictions(trained: SmallCNN, test_batch: tuple) -> None:
    x, y = test_batch
    assert _loss(trained, fgsm(trained, x, None, EPS), y) > _loss(trained, x, y) + 0.5


def test_adversarial_inputs_stay_in_the_budget_and_valid_range(trained: SmallCNN, test_batch: tuple) -> None:
    x, y = test_batch
    clean = _pixels(trained, x)
    for name, x_adv in _attacks(trained, x, y).items():
        adv = _pixels(trained, x_adv)
        assert adv.shape == x.shape, name
        assert adv.dtype == x.dtype, name
        assert (adv - clean).abs().max() <= EPS + 1e-5, name
        assert adv.min() >= -1e-6, name
        assert adv.max() <= 1 + 1e-6, name
        assert (adv - clean).abs().max() > EPS / 2, name  # it actually moved


def test_attacks_restore_mode_and_leave_parameter_grads_alone(trained: SmallCNN, test_batch: tuple) -> None:
    x, y = test_batch
    trained.train()
    marker = {name: torch.full_like(p, 7.0) for name, p in trained.named_parameters()}
    for name, p in trained.named_parameters():
        p.grad = marker[name].clone()
    running_mean = trained.trunk[1].running_mean.clone()
    try:
        _attacks(trained, x, y)
        energy_attack(trained, x, EPS, steps=2)
        assert trained.training
        for name, p in trained.named_parameters():
            torch.testing.assert_close(p.grad, marker[name], rtol=0, atol=0)
        # eval mode during the attack: BatchNorm statistics untouched
        torch.testing.assert_close(trained.trunk[1].running_mean, running_mean, rtol=0, atol=0)
    finally:
        trained.zero_grad(set_to_none=True)
    trained.eval()
    fgsm(trained, x, y, EPS)
    assert not trained.training


def test_pgd_is_deterministic_under_a_seeded_generator(trained: SmallCNN, test_batch: tuple) -> None:
    x, y = test_batch
    first = pgd(trained, x, y, EPS, steps=3, generator=torch.Generator().manual_seed(1))
    second = pgd(trained, x, y, EPS, steps=3, generator=torch.Generator().manual_seed(1))
    other = pgd(trained, x, y, EPS, steps=3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_attacks_work_under_inference_mode(trained: SmallCNN, test_batch: tuple) -> None:
    x, y = test_batch
    expected = _attacks(trained, x, y)
    expected["energy"] = energy_attack(trained, x, EPS, steps=3)
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()  # inference tensors, as Lightning's test loop hands them over
        got = _attacks(trained, x_inf, y_inf)
        got["energy"] = energy_attack(trained, x_inf, EPS, steps=3)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_a_model_loaded_under_inference_mode_is_named_with_the_fix(trained: SmallCNN, test_batch: tuple) -> None:
    # Its weights are inference tensors: autograd's "Inference tensors cannot be saved for backward" named neither the
    # model nor the fix.
    x, y = test_batch
    with torch.inference_mode():
        model = _copy(trained, torch.float32)
    message = (
        r"^SmallCNN's parameters are inference tensors \(created under torch.inference_mode\(\), e.g. '[\w.]+'\), "
        r"which the attack cannot differentiate through; load the model outside inference_mode, or pass "
        r"copy.deepcopy\(model\) made outside it$"
    )
    for attack in (
        lambda m: fgsm(m, x, y, EPS),
        lambda m: pgd(m, x, y, EPS, steps=1),
        lambda m: energy_attack(m, x, EPS),
    ):
        with pytest.raises(ValueError, match=message):
            attack(model)
    torch.testing.assert_close(fgsm(copy.deepcopy(model), x, y, EPS), fgsm(trained, x, y, EPS), rtol=0, atol=0)


def test_fgsm_rows_are_independent_of_the_batch(trained: SmallCNN, test_batch: tuple) -> None:
    model = SmallCNN(10, in_channels=1, width=8).double()
    model.load_state_dict(trained.state_dict())
    x, y = test_batch
    x, y = x[:6].double(), y[:6]
    batched = fgsm(model, x, y, EPS)
    single = torch.cat([fgsm(model, x[i : i + 1], y[i : i + 1], EPS) for i in range(len(x))])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-12)


def _copy(trained: SmallCNN, dtype: torch.dtype) -> SmallCNN:
    model = SmallCNN(10, in_channels=1, width=8)
    model.load_state_dict(trained.state_dict())
    return model.to(dtype).eval()


def test_fgsm_steps_where_the_cross_entropy_gradient_underflows(trained: SmallCNN, test_batch: tuple) -> None:
    # Logits scaled by 1e5: softmax(f)_y rounds to 1, so the cross-entropy's input gradient is exactly 0 and its
    # sign left the images unattacked. The steps must follow sign(grad (f_k - f_y)), k the strongest wrong class: the
    # limit of the log-odds gradient as the scale grows, computed here on the unscaled model.
    model = _copy(trained, torch.float64)
    x, y = test_batch
    x = x.double()
    x.requires_grad_(True)
    logits = model(x)
    wrong = logits.scatter(1, y[:, None], -torch.inf).argmax(1)
    (grad,) = torch.autograd.grad((logits.gather(1, wrong[:, None]) - logits.gather(1, y[:, None])).sum(), x)
    x = x.detach()
    with torch.no_grad():
        model.fc.weight.mul_(1e5)
        model.fc.bias.mul_(1e5)
        confident = model(x).softmax(1).gather(1, y[:, None]).squeeze(1) == 1.0
    assert confident.sum() >= 10  # the cross-entropy's gradient vanishes on these rows
    clean = _pixels(model, x)
    expected = (clean + EPS * grad.sign()).clamp(0, 1)
    adv = _pixels(model, fgsm(model, x, y, EPS))
    torch.testing.assert_close(adv[confident], expected[confident], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_attacks_take_float32_images_for_a_model_of_another_dtype(
    trained: SmallCNN, test_batch: tuple, dtype: torch.dtype
) -> None:
    # A model trained with precision "64-true" or "bf16-true" and the float32 images of a loader: the attacks raised
    # a dtype mismatch. The pixels stay float32 (a bfloat16 pixel near 1 moves in steps of 1/128 > 2/255).
    model = _copy(trained, dtype)
    x, y = test_batch
    eps = 2 / 255
    results = {
        "fgsm": fgsm(model, x, y, eps),
        "pgd": pgd(model, x, y, eps, steps=2, generator=torch.Generator().manual_seed(0)),
        "energy": energy_attack(model, x, eps, steps=2),
    }
    # A bfloat16 model's constants put pixels up to 0.002 outside [0, 1]: clamping them to [0, 1] before the attack
    # moved saturated pixels by more than the budget counted (2.26/255 for a budget of 2/255 on CIFAR constants).
    clean = _pixels(model, x)
    for name, x_adv in results.items():
        assert x_adv.dtype == torch.float32, name
        change = (_pixels(model, x_adv) - clean).abs()
        assert change.max() <= eps + 1e-6, name
        assert change.max() > eps / 2, name
    assert _loss(model, results["fgsm"].to(dtype), y) > _loss(model, x.to(dtype), y)


@pytest.mark.parametrize("eps", [2 / 255, 0.0], ids=["2-255", "zero"])
def test_attacks_keep_the_budget_of_a_bfloat16_model_on_saturated_pixels(eps: float) -> None:
    # CIFAR-10's constants in bfloat16 and images with black and white regions, as in the report. The constants put
    # saturated pixels up to ~0.002 outside [0, 1]; the bounds keep a clean pixel where it is, above 1 as well as
    # below 0 (clamping it to 1 would move it although the budget is 0).
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    model = SmallCNN(10, in_channels=3, width=8)
    model.set_normalization(mean.tolist(), std.tolist())
    model = model.to(torch.bfloat16)
    pixels = (torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 - 1).clamp(0, 1)
    x = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # a float32 loader's normalization
    clean = _pixels(model, x)
    assert clean.max() > 1 + 5e-4  # the case has white pixels that the bfloat16 constants put above 1
    for x_adv in (fgsm(model, x, None, eps), pgd(model, x, None, eps, steps=2), energy_attack(model, x, eps, steps=2)):
        assert (_pixels(model, x_adv) - clean).abs().max() <= eps + 1e-6


def test_attacks_take_bfloat16_images(trained: SmallCNN, test_batch: tuple) -> None:
    # A bfloat16 image holds its normalized value to 2^-8 of its size: the check refused normalized images.
    x, y = test_batch
    x = x.bfloat16()
    for x_adv in (fgsm(trained, x, y, EPS), pgd(trained, x, y, EPS, steps=2), energy_attack(trained, x, EPS, steps=2)):
        assert x_adv.dtype == torch.bfloat16
        assert (_pixels(trained, x_adv.float()) - _pixels(trained, x.float())).abs().max() <= EPS + 0.02


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (lambda y: torch.full_like(y, -1), "pass y=None to attack the model's own predictions"),
        (
            lambda y: y[:, None],
            r"labels must be 64 class indices >= 0, shape \(64,\), got torch.int64 of shape \(64, 1\)",
        ),
        (lambda y: y[:10], "labels must be 64 class indices"),
        (lambda y: y.float(), "labels must be 64 class indices"),
        (lambda y: y + 10, "label 19 is out of range for a model of 10 classes"),
    ],
)
def test_attacks_refuse_bad_labels_in_one_line(trained: SmallCNN, test_batch: tuple, labels, match: str) -> None:
    x, y = test_batch
    for attack in (fgsm, pgd):
        with pytest.raises(ValueError, match=match):
            attack(trained, x, labels(y), EPS)


def test_attacks_check_the_input_shape_before_running_the_model(trained: SmallCNN, test_batch: tuple) -> None:
    x, _ = test_batch
    for bad in (x.expand(-1, 3, -1, -1), x[:, 0]):
        with pytest.raises(ValueError, match=r"expected images \(N, 1, H, W\)"):
            fgsm(trained, bad, None, EPS)


def test_anomalies_refuse_integer_images(trained: SmallCNN, test_batch: tuple) -> None:
    # uint8 images cast the normalization constants to integers (std 0): the result was NaN, not an error.
    raw = (_pixels(trained, test_batch[0]) * 255).round().to(torch.uint8)
    for call in (
        lambda: fgsm(trained, raw, None, EPS),
        lambda: corrupt(raw, "contrast", 1, trained.input_mean, trained.input_std),
    ):
        with pytest.raises(ValueError, match=r"expected float images, got dtype torch.uint8; convert uint8 images"):
            call()
    with pytest.raises(ValueError, match=r"std must be positive and finite, got \[0.0\]"):
        corrupt(test_batch[0], "contrast", 1, [0.5], [0.0])


def test_attacks_refuse_a_fractional_step_count(trained: SmallCNN, test_batch: tuple) -> None:
    with pytest.raises(ValueError, match=r"steps must be >= 0 and an integer, got 2\.5"):
        pgd(trained, *test_batch, EPS, steps=2.5)


def test_pgd_start_of_an_image_does_not_depend_on_its_batch(trained: SmallCNN, test_batch: tuple) -> None:
    x, y = test_batch
    x, y = x[:8], y[:8]

    def start(rows: slice) -> torch.Tensor:  # no step: the random start alone
        generators = [torch.Generator().manual_seed(i) for i in range(8)][rows]
        return pgd(trained, x[rows], y[rows], EPS, steps=0, generator=generators)

    whole = start(slice(0, 8))
    torch.testing.assert_close(torch.cat([start(slice(0, 3)), start(slice(3, 8))]), whole, rtol=0, atol=0)
    assert (_pixels(trained, whole) - _pixels(trained, x)).abs().max() > EPS / 2
    with pytest.raises(ValueError, match="got 3 generators for 8 images"):
        pgd(trained, x, y, EPS, generator=[torch.Generator() for _ in range(3)])


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: fgsm(m, x, y, EPS),
        lambda m, x, y: pgd(m, x, y, EPS),
        lambda m, x, y: energy_attack(m, x, EPS),
        lambda m, x, y: corrupt(x, "contrast", 1, m.input_mean, m.input_std),
    ],
)
def test_anomalies_refuse_inputs_that_are_not_normalized_images(trained: SmallCNN, test_batch: tuple, call) -> None:
    # Pixels at 0..16 (the raw digits scale): the budget, the clamps and the corruptions would mean something else.
    x, y = test_batch
    raw = _pixels(trained, x) * 16
    with pytest.raises(
        ValueError, match=r"^the inputs are not images in \[0, 1\] once the normalization is undone \(pixels span \["
    ):
        call(trained, raw, y)


def test_energy_attack_lowers_the_energy_of_ood_inputs(trained: SmallCNN, digits: tuple) -> None:
    _, _, mean, std = digits
    noise = (torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) - mean) / std
    x_adv = energy_attack(trained, noise, epsilon=8 / 255)
    trained.eval()
    with torch.no_grad():
        before, after = energy(trained(noise)), energy(trained(x_adv))
    assert after.mean() < before.mean() - 0.1
    assert (after <= before + 1e-4).float().mean() > 0.9  # almost every sample moved towards "in-distribution"
    assert (_pixels(trained, x_adv) - _pixels(trained, noise)).abs().max() <= 8 / 255 + 1e-5


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: fgsm(m, x, y, -0.1),
        lambda m, x, y: pgd(m, x, y, 0.1, steps=-1),
        # NaN passed ``epsilon < 0`` and returned NaN images; inf (default step inf) gave NaN where the gradient is 0
        lambda m, x, y: fgsm(m, x, y, float("nan")),
        lambda m, x, y: pgd(m, x, y, float("inf")),
        lambda m, x, y: energy_attack(m, x, float("nan")),
        # a negative step descends the loss: the "attack" made the inputs easier
        lambda m, x, y: pgd(m, x, y, 0.1, step_size=-0.01),
        lambda m, x, y: energy_attack(m, x, 0.1, step_size=float("nan")),
    ],
)
def test_attacks_reject_bad_budgets(trained: SmallCNN, test_batch: tuple, call) -> None:
    x, y = test_batch
    with pytest.raises(ValueError, match="must be >= 0"):
        call(trained, x, y)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_energy_attack_rejects_a_bad_temperature(trained: SmallCNN, test_batch: tuple, temperature: float) -> None:
    x, _ = test_batch
    with pytest.raises(ValueError, match=f"^temperature must be > 0 and finite, got {temperature}$"):
        energy_attack(trained, x, 0.1, temperature=temperature)


# Corruptions.


@pytest.fixture(autouse=True)
def _frost(frost_photos: Path) -> None:
    """Every test here finds (made-up) frost photographs, so that frost runs the corruption tests with the rest."""


def _smooth_images(channels: int, size: int = 16, n: int = 8, seed: int = 0) -> torch.Tensor:
    """Natural-ish test images in [0.05, 0.95]: smoothed noise plus a gradient, so no corruption is a no-op."""
    generator = torch.Generator().manual_seed(seed)
    noise = F.avg_pool2d(torch.rand(n, channels, size, size, generator=generator), 3, stride=1, padding=1)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
    return (0.05 + 0.9 * (0.6 * noise + 0.4 * ramp)).clamp(0, 1)


ALL = CORRUPTIONS.names()
STOCHASTIC = [
    "gaussian_noise",
    "impulse_noise",
    "shot_noise",
    "speckle_noise",
    "fog",
    "elastic_transform",
    "glass_blur",
    "motion_blur",
    "snow",
    "spatter",
    "frost",
]
# Pixelate is not monotone in mean change for small images (int(size * c) maps severities to few sizes); nor are the
# reference's elastic table (its affine shift shrinks from 8 % to 3 % of the side while the displacement grows),
# glass table (its blur drops from sigma 0.4 to 0.25 between severities 3 and 4), saturate table (severities 1-2
# desaturate, 3-5 saturate), motion blur table (severities 3 and 4 differ in the radius only, 6 and 8 px, whose extra
# weights are below 1e-9 at sigma 2), snow table (severity 3 has more but fainter flakes than 2) and spatter table
# (severities 1-3 are water, 4-5 mud).
MONOTONE = [
    name
    for name in ALL
    if name not in ("pixelate", "elastic_transform", "glass_blur", "saturate", "motion_blur", "snow", "spatter")
    and name != "frost"  # its table trades the image's weight for the photograph's: the change peaks at severity 3
]
RGB_ONLY = ("saturate", "spatter", "frost")


def _with_channels(*channels: int) -> list[tuple[str, int]]:
    """(name, channels) for every corruption, RGB-only ones with 3 channels only."""
    return [(n, c) for n in ALL for c in channels if n not in RGB_ONLY or c == 3]


def test_registry_has_the_required_corruptions() -> None:
    assert {"gaussian_noise", "shot_noise", "gaussian_blur", "contrast", "jpeg", "brightness"} <= set(ALL)
    benchmark = {"impulse_noise", "defocus_blur", "zoom_blur", "fog", "elastic_transform", "pixelate", "motion_blur"}
    assert benchmark | {"snow", "frost", "speckle_noise", "saturate", "spatter"} <= set(ALL)  # all 19


@pytest.mark.parametrize(("name", "channels"), _with_channels(1, 3))
def test_corruption_changes_image_keeps_shape_and_range(name: str, channels: int) -> None:
    images = _smooth_images(channels)
    for severity in range(1, 6):
        out = CORRUPTIONS.get(name)(images, severity, torch.Generator().manual_seed(0))
        assert out.shape == images.shape
        assert out.dtype == images.dtype
        assert out.min() >= 0
        assert out.max() <= 1
        assert (out - images).abs().mean() > 1e-3, severity


@pytest.mark.parametrize("name", MONOTONE)
def test_higher_severity_changes_the_image_more(name: str) -> None:
    images = _smooth_images(3, size=32, n=16)
    change = [
        (CORRUPTIONS.get(name)(images, s, torch.Generator().manual_seed(0)) - images).abs().mean().item()
        for s in range(1, 6)
    ]
    assert all(a < b for a, b in itertools.pairwise(change)), change


def test_pixelate_strongest_severity_changes_most() -> None:
    images = _smooth_images(3, size=32)
    change = [(CORRUPTIONS.get("pixelate")(images, s) - images).abs().mean().item() for s in (1, 5)]
    assert change[1] > change[0]


@pytest.mark.parametrize("name", ALL)
def test_corruptions_are_deterministic_under_a_seeded_generator(name: str) -> None:
    images = _smooth_images(3)
    fn = CORRUPTIONS.get(name)
    first = fn(images, 3, torch.Generator().manual_seed(5))
    torch.testing.assert_close(fn(images, 3, torch.Generator().manual_seed(5)), first, rtol=0, atol=0)
    if name in STOCHASTIC:
        assert not torch.equal(fn(images, 3, torch.Generator().manual_seed(6)), first)


@pytest.mark.parametrize(("name", "channels"), _with_channels(1, 2, 3))
def test_corruptions_keep_an_empty_batch(name: str, channels: int) -> None:
    """jpeg stacked the list of compressed images, which an empty batch leaves empty (torch.stack raised)."""
    images = _smooth_images(channels)[:0]
    out = CORRUPTIONS.get(name)(images, 3, torch.Generator().manual_seed(0))
    assert (out.shape, out.dtype) == (images.shape, images.dtype)
    assert corrupt(images, name, 3, [0.5] * channels, [0.25] * channels).shape == images.shape


@pytest.mark.parametrize("severity", [0, 6, 2.5, True])
def test_corruptions_reject_bad_severity(severity: object) -> None:
    with pytest.raises(ValueError, match="severity"):
        CORRUPTIONS.get("contrast")(_smooth_images(1), severity, None)


def test_corruptions_take_numpy_integer_severities() -> None:
    images = _smooth_images(1)
    expected = CORRUPTIONS.get("contrast")(images, 3, None)
    torch.testing.assert_close(CORRUPTIONS.get("contrast")(images, np.int64(3), None), expected, rtol=0, atol=0)


def test_elastic_transform_refuses_images_under_three_pixels() -> None:
    # The affine warp of a 2-pixel side was singular: a LinAlgError traceback.
    with pytest.raises(ValueError, match="elastic_transform needs images of at least 3x3 pixels, got 2x40"):
        CORRUPTIONS.get("elastic_transform")(torch.rand(1, 1, 2, 40), 1, None)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_corrupt_draws_the_noise_of_bfloat16_images_in_float32(name: str) -> None:
    # bfloat16 draws were coarse (impulse noise hit 1.19% of the pixels at a rate of 1%), and the normalization
    # check refused normalized bfloat16 images. They are now corrupted as float32 images, then rounded.
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = ((_smooth_images(3) - m) / s).bfloat16()
    out = corrupt(x, name, 3, mean, std, torch.Generator().manual_seed(0))
    expected = corrupt(x.float(), name, 3, mean, std, torch.Generator().manual_seed(0)).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_unknown_corruption_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="gaussian_noise"):
        corrupt(_smooth_images(1), "gaussian_nosie", 1, [0.5], [0.25])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_corruptions_on_cuda_equal_the_cpu(name: str) -> None:
    # evaluate.py draws on CPU generators, one per image: the device must not change the corrupted images.
    images = _smooth_images(3, size=40, n=4).double()  # float64: no TF32 convolutions or matrix products

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(4)]

    for table in ("cifar10c", "imagenetc"):
        for severity in (1, 5):
            cpu = CORRUPTIONS.get(name)(images, severity, generators(), table)
            cuda = CORRUPTIONS.get(name)(images.cuda(), severity, generators(), table)
            assert cuda.device.type == "cuda"
            torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-6)


def test_gaussian_blur_matches_scipy_nearest_mode() -> None:
    images = _smooth_images(2, size=12, n=2).double()
    out = CORRUPTIONS.get("gaussian_blur")(images, 5, None)  # sigma = 1.0
    ref = np.stack(
        [[ndimage.gaussian_filter(ch, sigma=1.0, mode="nearest", truncate=4.0) for ch in im] for im in images.numpy()]
    )
    np.testing.assert_allclose(out.numpy(), np.clip(ref, 0, 1), atol=1e-12)


def test_pad_index_pads_as_numpy_for_any_axis_and_pad() -> None:
    # scipy's nearest, mirror and reflect are numpy's edge, reflect and symmetric, also for a 1-pixel axis and pads
    # longer than the axis.
    cpu = torch.device("cpu")
    for n, pad in itertools.product(range(1, 6), range(12)):
        for mode, numpy_mode in [("nearest", "edge"), ("mirror", "reflect"), ("reflect", "symmetric")]:
            expected = np.pad(np.arange(n), pad, mode=numpy_mode)
            np.testing.assert_array_equal(anomalies._pad_index(n, pad, mode, cpu).numpy(), expected, (n, pad, mode))


@pytest.mark.parametrize("mode", ["mirror", "reflect"])
def test_gaussian_filter_of_one_pixel_rows_and_columns_matches_scipy(mode: str) -> None:
    for shape in [(1, 9), (9, 1), (1, 1)]:
        image = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out = anomalies._gaussian_filter(image, 2.0, 3.0, mode)
        ref = ndimage.gaussian_filter(image[0, 0].numpy(), 2.0, mode=mode, truncate=3.0)
        np.testing.assert_allclose(out[0, 0].numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(32, 32), (8, 8), (28, 20)])
def test_pixelate_matches_pil_box_resize(size: tuple[int, int]) -> None:
    # CIFAR-10-C: img.resize((int(w * c), int(h * c)), BOX).resize((w, h), BOX); PIL's float mode "F" avoids rounding
    height, width = size
    images = torch.rand(2, 1, height, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for severity, c in enumerate([0.95, 0.9, 0.85, 0.75, 0.65], start=1):
        out = CORRUPTIONS.get("pixelate")(images, severity, None)
        for image, result in zip(images[:, 0].numpy().astype(np.float32), out[:, 0].numpy(), strict=True):
            pil = Image.fromarray(image, mode="F").resize((int(width * c), int(height * c)), Image.BOX)
            ref = np.asarray(pil.resize((width, height), Image.BOX), dtype=np.float64)
            np.testing.assert_allclose(result, ref, rtol=0, atol=1e-6)


def test_pixelate_keeps_a_side_of_one_pixel() -> None:
    # int(1 * c) is 0: the side stays one pixel (PIL cannot resize to 0), the other side is pixelated as PIL does.
    rows = torch.rand(2, 1, 1, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for images in (rows, rows.transpose(-2, -1)):
        height, width = images.shape[-2:]
        for severity, c in enumerate([0.95, 0.9, 0.85, 0.75, 0.65], start=1):
            out = CORRUPTIONS.get("pixelate")(images, severity, None)
            small = (max(1, int(width * c)), max(1, int(height * c)))
            for image, result in zip(images[:, 0].numpy().astype(np.float32), out[:, 0].numpy(), strict=True):
                pil = Image.fromarray(image, mode="F").resize(small, Image.BOX).resize((width, height), Image.BOX)
                np.testing.assert_allclose(result, np.asarray(pil, dtype=np.float64), rtol=0, atol=1e-6)
    pixel = rows[..., :1]
    torch.testing.assert_close(CORRUPTIONS.get("pixelate")(pixel, 5, None), pixel, rtol=0, atol=1e-12)


def test_brightness_matches_an_hsv_round_trip() -> None:
    images = _smooth_images(3, size=6, n=2).double()
    images[0, :, 0, 0] = 0.0  # a black pixel becomes gray
    images[1, :, 0, 0] = torch.tensor([0.95, 0.2, 0.1])  # a pixel whose value clips at 1
    out = CORRUPTIONS.get("brightness")(images, 5, None)  # c = 0.3
    flat = images.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    ref = []
    for rgb in flat:
        h, s, v = colorsys.rgb_to_hsv(*rgb)
        ref.append(colorsys.hsv_to_rgb(h, s, min(v + 0.3, 1.0)))
    ref_t = torch.tensor(ref, dtype=torch.float64).reshape(2, 6, 6, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, ref_t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("table", ["cifar10c", "imagenetc"])
def test_saturate_matches_an_hsv_round_trip(table: str) -> None:
    levels = {"cifar10c": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
              "imagenetc": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)]}[table]  # fmt: skip
    images = _smooth_images(3, size=6, n=2).double()
    images[0, :, 0, 0] = 0.0  # black stays black
    images[0, :, 0, 1] = 0.4  # gray: hue 0, so a shift tints it red
    images[1, :, 0, 0] = torch.tensor([0.9, 0.1, 0.5])  # a saturation that clips at 1 from severity 3
    flat = images.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    for severity, (factor, shift) in enumerate(levels, start=1):
        out = CORRUPTIONS.get("saturate")(images, severity, None, table)
        ref = []
        for rgb in flat:
            h, s, v = colorsys.rgb_to_hsv(*rgb)
            ref.append(colorsys.hsv_to_rgb(h, min(max(s * factor + shift, 0.0), 1.0), v))
        ref_t = torch.tensor(ref, dtype=torch.float64).reshape(2, 6, 6, 3).permute(0, 3, 1, 2)
        torch.testing.assert_close(out, ref_t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels", [1, 2, 4])
@pytest.mark.parametrize(("name", "what"), [("saturate", "changes the HSV saturation of"),
                                            ("spatter", "adds water or mud colours to"),
                                            ("frost", "blends colour photographs of frost into")])  # fmt: skip
def test_rgb_corruptions_refuse_other_images(channels: int, name: str, what: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} {what} RGB images; these images have {channels} channel"):
        corrupt(_smooth_images(channels), name, 1, [0.5] * channels, [0.25] * channels)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_jpeg_handles_any_channel_count(channels: int) -> None:
    images = _smooth_images(channels)
    out = CORRUPTIONS.get("jpeg")(images, 5, None)
    assert out.shape == images.shape
    assert 1e-3 < (out - images).abs().mean() < 0.2


@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 32), (3, 224), (2, 20)])
def test_jpeg_equals_libjpeg_through_torchvision(channels: int, size: int) -> None:
    # An independent codec path: torchvision's libjpeg bindings (deprecated, so skipped once they are gone).
    io = pytest.importorskip("torchvision.io")
    if not hasattr(io, "encode_jpeg"):
        pytest.skip("torchvision no longer has encode_jpeg")
    images = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    images = anomalies._gaussian_blur(images, 1.0)  # smooth content, as photos
    for severity in anomalies.SEVERITIES:
        quality = anomalies._level("jpeg", images, severity, None)
        raw = (images * 255).round().to(torch.uint8)
        planes = [img for img in raw] if channels == 3 else [img[c : c + 1] for img in raw for c in range(channels)]
        expected = torch.stack([io.decode_jpeg(io.encode_jpeg(p.contiguous(), quality=quality)) for p in planes])
        out = CORRUPTIONS.get("jpeg")(images, severity, None)
        torch.testing.assert_close(out, expected.reshape(raw.shape).float() / 255, rtol=0, atol=0)


def test_contrast_keeps_the_channel_means() -> None:
    images = _smooth_images(3)
    out = CORRUPTIONS.get("contrast")(images, 5, None)
    torch.testing.assert_close(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), rtol=0, atol=1e-6)


def test_corrupt_works_on_normalized_inputs() -> None:
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    pixels = _smooth_images(3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (pixels - m) / s
    out = corrupt(x, "gaussian_noise", 2, mean, std, torch.Generator().manual_seed(0))
    expected = (CORRUPTIONS.get("gaussian_noise")(pixels, 2, torch.Generator().manual_seed(0)) - m) / s
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    with torch.inference_mode():
        out_inf = corrupt(x.clone(), "jpeg", 1, torch.tensor(mean), torch.tensor(std))
    assert out_inf.shape == x.shape
    with pytest.raises(ValueError, match="channels"):
        corrupt(x, "contrast", 1, [0.5], [0.25, 0.25])


def test_corrupt_checks_the_std_on_its_own() -> None:
    # A std of 1 value must not broadcast over 3 channels; an infinite one is refused as such, not as inputs that are
    # "not images in [0, 1]" (x * inf).
    mean = [0.5, 0.5, 0.5]
    x = (_smooth_images(3) - 0.5) / 0.25
    with pytest.raises(ValueError, match=r"^mean/std need 3 channels, got 3 and 1$"):
        corrupt(x, "contrast", 1, mean, [0.25])
    with pytest.raises(ValueError, match=r"^mean/std need 3 channels, got 1 and 3$"):
        corrupt(x, "contrast", 1, [0.5], [0.25] * 3)
    with pytest.raises(ValueError, match=r"^std must be positive and finite, got \[0.25, inf, 0.25\]$"):
        corrupt(x, "contrast", 1, mean, [0.25, math.inf, 0.25])


@pytest.mark.parametrize("name", STOCHASTIC)
def test_noise_of_an_image_does_not_depend_on_its_batch(name: str) -> None:
    # evaluate.py gives each image its own generator: the same noise whatever the batch size or --max-samples.
    images, fn = _smooth_images(3), CORRUPTIONS.get(name)

    def noisy(rows: slice) -> torch.Tensor:
        return fn(images[rows], 3, [torch.Generator().manual_seed(100 + i) for i in range(8)][rows])

    whole = noisy(slice(0, 8))
    torch.testing.assert_close(torch.cat([noisy(slice(0, 3)), noisy(slice(3, 8))]), whole, rtol=0, atol=0)
    assert not torch.equal(whole[:3], fn(images[:3], 3, [torch.Generator().manual_seed(i) for i in range(3)]))
    with pytest.raises(ValueError, match="got 2 generators for 8 images"):
        fn(images, 3, [torch.Generator(), torch.Generator()])


@pytest.mark.parametrize(
    ("size", "table", "c"),
    [  # severity 4 of make_cifar_c.py (below 224 px by default) and make_imagenet_c.py (from 224 px)
        (16, None, (0.09, 0.16, 75, 0.05)),
        (224, None, (0.26, 0.45, 5, 0.17)),
        (16, "imagenetc", (0.26, 0.45, 5, 0.17)),
        (224, "cifar10c", (0.09, 0.16, 75, 0.05)),
    ],
)
def test_noise_corruptions_follow_the_reference_formulas(size: int, table: str | None, c: tuple) -> None:
    # x + N(0, c0^2); x + x * N(0, c1^2); poisson(x * c2) / c2; salt and pepper on a fraction c3 of the values; each
    # image's draws from its own generator.
    gauss, speckle, photons, amount = c
    images = _smooth_images(3, size=size, n=2).double()
    shape = images.shape[1:]

    def draws(sample):
        return torch.stack([sample(torch.Generator().manual_seed(i)) for i in range(len(images))])

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(len(images))]

    normal = draws(lambda g: torch.randn(shape, generator=g, dtype=torch.float64))
    expected = {
        "gaussian_noise": (images + gauss * normal).clamp(0, 1),
        "speckle_noise": (images + images * speckle * normal).clamp(0, 1),
    }
    counts = [torch.poisson(image.float() * photons, generator=g) for image, g in zip(images, gens(), strict=True)]
    expected["shot_noise"] = (torch.stack(counts).double() / photons).clamp(0, 1)
    hits, salts = [], []
    for g in gens():
        hits.append(torch.rand(shape, generator=g, dtype=torch.float64) < amount)
        salts.append(torch.rand(shape, generator=g, dtype=torch.float64) < 0.5)
    expected["impulse_noise"] = torch.where(torch.stack(hits), torch.stack(salts).double(), images)
    for name, reference in expected.items():
        torch.testing.assert_close(CORRUPTIONS.get(name)(images, 4, gens(), table), reference, rtol=0, atol=1e-12)


def test_severity_table_follows_the_image_size() -> None:
    assert severity_table(224, 224) == severity_table(256, 300) == "imagenetc"
    assert severity_table(223, 500) == severity_table(32, 32) == severity_table(8, 8) == "cifar10c"
    with pytest.raises(ValueError, match=r"^unknown severity table 'imagenet'; valid: cifar10c, imagenetc$"):
        CORRUPTIONS.get("contrast")(_smooth_images(1), 1, None, "imagenet")


def test_deterministic_corruptions_follow_the_imagenet_c_table() -> None:
    # make_imagenet_c.py at severity 5: contrast 0.05, brightness + 0.5, gaussian blur sigma 6, pixelate 0.25.
    images = _smooth_images(3, size=224, n=1).double()
    means = images.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(CORRUPTIONS.get("contrast")(images, 5), (images - means) * 0.05 + means)
    value = images.amax(1, keepdim=True)  # no black pixel: the HSV rescale of test_brightness_matches_an_hsv_round_trip
    expected = (images * (value + 0.5).clamp(max=1) / value).clamp(0, 1)
    torch.testing.assert_close(CORRUPTIONS.get("brightness")(images, 5), expected)
    blurred = CORRUPTIONS.get("gaussian_blur")(images, 5)
    ref = ndimage.gaussian_filter(images[0, 0].numpy(), sigma=6.0, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(blurred[0, 0].numpy(), np.clip(ref, 0, 1), atol=1e-12)
    pixelated = CORRUPTIONS.get("pixelate")(images, 5)[0, 0].numpy()
    small = Image.fromarray(images[0, 0].numpy().astype(np.float32), mode="F").resize((56, 56), Image.BOX)
    np.testing.assert_allclose(pixelated, np.asarray(small.resize((224, 224), Image.BOX)), rtol=0, atol=1e-6)
    jpeg = CORRUPTIONS.get("jpeg")
    assert (jpeg(images, 5) - images).abs().mean() > (jpeg(images, 5, None, "cifar10c") - images).abs().mean()


# The corruptions below are checked against transcriptions of make_cifar_c.py / make_imagenet_c.py that take the
# same random numbers, with scipy in place of OpenCV: OpenCV's GaussianBlur and filter2D are correlations with
# BORDER_REFLECT_101 (scipy's "mirror"), and its warpAffine with INTER_LINEAR is affine_transform(order=1). Checked
# once against OpenCV 5.0 itself (opencv-python-headless, not a dependency): defocus_blur to 4e-8, elastic_transform
# to 2e-6.


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


def _clipped_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """The references' clipped_zoom, crop and trim about the centre, (H, W, C) images: each axis on its own."""
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    img = ndimage.zoom(img[top : top + ch, left : left + cw], (factor, factor, 1), order=1)
    trim_top, trim_left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[trim_top : trim_top + h, trim_left : trim_left + w]


def _magick_motion_blur(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick 6's MotionBlurImage (effect.c) pixel by pixel, (H, W, C), edge virtual pixels."""
    width = int(2 * np.ceil(radius) + 1)  # GetOptimalKernelWidth1D with a radius
    kernel = [np.exp(-(i * i) / (2 * sigma * sigma)) / (np.sqrt(2 * np.pi) * sigma) for i in range(width)]
    kernel = np.array(kernel) / sum(kernel)  # GetMotionBlurKernel
    point_x = width * np.sin(np.pi * angle / 180)
    point_y = width * np.cos(np.pi * angle / 180)
    offsets = [
        (int(np.ceil(i * point_y / np.hypot(point_x, point_y) - 0.5)),
         int(np.ceil(i * point_x / np.hypot(point_x, point_y) - 0.5)))
        for i in range(width)
    ]  # fmt: skip
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            for k, (dx, dy) in zip(kernel, offsets, strict=True):
                out[y, x] += k * img[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)]
    return out


def _table_cases() -> list[tuple[int, str, int]]:
    return [(32, "cifar10c", s) for s in range(1, 6)] + [
        (8, "cifar10c", 5),
        (224, "imagenetc", 1),
        (224, "imagenetc", 5),
    ]


@pytest.mark.parametrize(("size", "table", "severity"), _table_cases())
def test_zoom_blur_matches_the_reference_clipped_zoom(size: int, table: str, severity: int) -> None:
    images = _smooth_images(3, size=size, n=2).double()
    factors = {"cifar10c": [0.01 * k for k in (6, 11, 16, 21, 26)], "imagenetc": None}[table]
    stops = factors or [0.11, 0.16, 0.21, 0.26, 0.31]
    steps = [0.01] * 5 if factors else [0.01, 0.01, 0.02, 0.02, 0.03]
    zooms = np.arange(1, 1 + stops[severity - 1], steps[severity - 1])
    out = CORRUPTIONS.get("zoom_blur")(images, severity, None, table)
    for image, result in zip(images, out, strict=True):
        x = _hwc(image)
        ref = np.clip((x + sum(_clipped_zoom(x, z) for z in zooms)) / (len(zooms) + 1), 0, 1)
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("table", "severity"), [("cifar10c", 5), ("imagenetc", 5)])
@pytest.mark.parametrize("shape", [(20, 28), (28, 20)])
def test_zoom_blur_of_non_square_images_zooms_each_axis(shape: tuple[int, int], table: str, severity: int) -> None:
    height, width = shape
    zooms = np.arange(*{"cifar10c": (1, 1.26, 0.01), "imagenetc": (1, 1.31, 0.03)}[table])
    images = _smooth_images(3, size=28, n=2).double()[..., :height, :width]
    out = CORRUPTIONS.get("zoom_blur")(images, severity, None, table)
    assert out.shape == images.shape
    for image, result in zip(images, out, strict=True):
        x = _hwc(image)
        ref = np.clip((x + sum(_clipped_zoom(x, z) for z in zooms)) / (len(zooms) + 1), 0, 1)
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)


# radius 8 (ImageNet-C's severity 4): the largest disk on the 17x17 grid with the 3x3 anti-aliasing blur
@pytest.mark.parametrize(("size", "table", "severity"), [*_table_cases(), (24, "imagenetc", 4)])
def test_defocus_blur_matches_the_reference_disk_filter(size: int, table: str, severity: int) -> None:
    radius, alias = {
        "cifar10c": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "imagenetc": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    }[table][severity - 1]
    grid = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    k = 1 if radius <= 8 else 2  # GaussianBlur's ksize 3 or 5: getGaussianKernel's normalized exp weights
    g = np.exp(-0.5 * (np.arange(-k, k + 1) / alias) ** 2)
    kernel = ndimage.correlate1d(ndimage.correlate1d(disk / disk.sum(), g / g.sum(), 1, mode="mirror"), g / g.sum(), 0,
                                 mode="mirror")  # fmt: skip
    images = _smooth_images(3, size=size, n=2).double()
    out = CORRUPTIONS.get("defocus_blur")(images, severity, None, table)
    ref = np.stack([[ndimage.correlate(ch, kernel, mode="mirror") for ch in im] for im in images.numpy()])
    np.testing.assert_allclose(out.numpy(), np.clip(ref, 0, 1), rtol=0, atol=1e-12)


_FOG = {
    "cifar10c": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "imagenetc": [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],
}


def _plasma_fractal(mapsize: int, decay: float, generator: torch.Generator) -> np.ndarray:
    """The references' plasma_fractal, np.random.uniform drawn from ``generator``."""
    maparray = np.zeros((mapsize, mapsize))
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        u = torch.rand(array.shape, generator=generator, dtype=torch.float64).numpy()
        return array / 4 + wibble * (-wibble + 2 * wibble * u)

    while stepsize >= 2:
        half = stepsize // 2
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= decay
    maparray -= maparray.min()
    return maparray / maparray.max()


@pytest.mark.parametrize(("size", "table", "severity"), _table_cases())
def test_fog_matches_the_reference_plasma_fractal(size: int, table: str, severity: int) -> None:
    strength, decay = _FOG[table][severity - 1]
    images = _smooth_images(3, size=size, n=2).double()
    out = CORRUPTIONS.get("fog")(images, severity, [torch.Generator().manual_seed(i) for i in range(2)], table)
    mapsize = {8: 8, 32: 32, 224: 256}[size]  # make_cifar_c.py: 32, make_imagenet_c.py: 256, cropped to the image
    for i, (image, result) in enumerate(zip(images, out, strict=True)):
        x = _hwc(image)
        plasma = _plasma_fractal(mapsize, decay, torch.Generator().manual_seed(i))[:size, :size, None]
        ref = np.clip((x + strength * plasma) * x.max() / (x.max() + strength), 0, 1)
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(20, 40), (40, 20), (33, 16)])
def test_fog_of_non_square_images_crops_the_fractal_of_the_longer_side(shape: tuple[int, int]) -> None:
    height, width = shape
    strength, decay = _FOG["cifar10c"][2]
    images = _smooth_images(3, size=max(shape), n=2).double()[..., :height, :width]
    out = CORRUPTIONS.get("fog")(images, 3, [torch.Generator().manual_seed(i) for i in range(2)], "cifar10c")
    for i, (image, result) in enumerate(zip(images, out, strict=True)):
        x = _hwc(image)
        plasma = _plasma_fractal(64, decay, torch.Generator().manual_seed(i))[:height, :width, None]  # 40, 33 -> 64
        ref = np.clip((x + strength * plasma) * x.max() / (x.max() + strength), 0, 1)
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)


_ELASTIC = {
    "cifar10c": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    "imagenetc": [(2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02)],
}


def _reference_elastic(x: np.ndarray, table: str, severity: int, generator: torch.Generator) -> np.ndarray:
    """The references' elastic_transform of ``x`` (H, W, C), its np.random.uniform draws from ``generator``.

    The references' constants are multiples of IMSIZE = 32 (CIFAR-10-C) and of 244 (ImageNet-C, for 224 px images);
    gradreg scales them with the shorter side. As there, the centre ``shape[:2] // 2`` is taken as (x, y).
    """
    h, w = x.shape[:2]
    unit, side = {"cifar10c": (32, 32), "imagenetc": (244, 224)}[table]
    alpha, sigma, shift = (unit * v * min(h, w) / side for v in _ELASTIC[table][severity - 1])
    centre, square = np.float64([h, w]) // 2, min(h, w) // 3
    pts1 = np.array([centre + square, [centre[0] + square, centre[1] - square], centre - square])  # (x, y)
    pts2 = pts1 + shift * (2 * torch.rand((3, 2), generator=generator, dtype=torch.float64).numpy() - 1)
    forward = np.linalg.solve(np.c_[pts1, np.ones(3)], pts2).T  # getAffineTransform: 2x3, pts2 = M [pts1; 1]
    inverse = np.linalg.inv(forward[:, :2])
    swap = np.array([[0, 1], [1, 0]])  # (x, y) <-> (row, col)
    matrix, offset = swap @ inverse @ swap, -(swap @ inverse @ forward[:, 2])
    channels = range(x.shape[2])
    warped = np.stack(
        [ndimage.affine_transform(x[..., c], matrix, offset, order=1, mode="mirror") for c in channels], -1
    )
    fields = [torch.rand((h, w), generator=generator, dtype=torch.float64).numpy() * 2 - 1 for _ in range(2)]
    dx, dy = (alpha * ndimage.gaussian_filter(f, sigma, mode="reflect", truncate=3) for f in fields)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ref = np.stack(
        [ndimage.map_coordinates(warped[..., c], [yy + dy, xx + dx], order=1, mode="reflect") for c in channels], -1
    )
    return np.clip(ref, 0, 1)


@pytest.mark.parametrize(("size", "table", "severity"), _table_cases())
def test_elastic_transform_matches_the_reference(size: int, table: str, severity: int) -> None:
    images = _smooth_images(3, size=size, n=2).double()
    out = CORRUPTIONS.get("elastic_transform")(images, severity, [torch.Generator().manual_seed(i) for i in range(2)],
                                               table)  # fmt: skip
    for i, (image, result) in enumerate(zip(images, out, strict=True)):
        ref = _reference_elastic(_hwc(image), table, severity, torch.Generator().manual_seed(i))
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("table", "severity"), [("cifar10c", 2), ("imagenetc", 1)])
@pytest.mark.parametrize("shape", [(24, 36), (36, 24)])
def test_elastic_transform_of_non_square_images_matches_the_reference(shape: tuple, table: str, severity: int) -> None:
    height, width = shape
    images = _smooth_images(3, size=36, n=2).double()[..., :height, :width]
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    out = CORRUPTIONS.get("elastic_transform")(images, severity, generators, table)
    for i, (image, result) in enumerate(zip(images, out, strict=True)):
        ref = _reference_elastic(_hwc(image), table, severity, torch.Generator().manual_seed(i))
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-10)


def _reference_glass(x: np.ndarray, table: str, severity: int, generator: torch.Generator) -> np.ndarray:
    """The references' glass_blur of ``x`` (H, W, C), its np.random.randint draws from ``generator``.

    Over the rows and columns of the image (imagecorruptions' version; make_*_c.py's are for square images).
    """
    sigma, delta, rounds = {
        "cifar10c": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "imagenetc": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    }[table][severity - 1]

    def gaussian(img: np.ndarray) -> np.ndarray:  # skimage.filters.gaussian(img, sigma, multichannel=True)
        return np.stack(
            [ndimage.gaussian_filter(img[..., c], sigma, mode="nearest", truncate=4.0) for c in range(3)], -1
        )

    height, width = x.shape[:2]
    visits = len(range(height - delta, delta, -1)) * len(range(width - delta, delta, -1))  # none at 6 px and delta 4
    moves = torch.randint(-delta, delta, (rounds, visits, 2), generator=generator).numpy()
    x = np.uint8(gaussian(x) * 255)
    for r in range(rounds):
        v = 0
        for h in range(height - delta, delta, -1):
            for w in range(width - delta, delta, -1):
                dx, dy = moves[r, v]
                v += 1
                h_prime, w_prime = h + dy, w + dx
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]  # the reference's line, views and all
    return np.clip(gaussian(x / 255.0), 0, 1)


@pytest.mark.parametrize(
    ("size", "table", "severity"),
    # ImageNet-C's larger offsets reach pixels of the row visited before, in chains (64 px: some of three and more)
    [(32, "cifar10c", s) for s in range(1, 6)] + [(12, "imagenetc", 4), (64, "imagenetc", 5), (6, "imagenetc", 5)],
)
def test_glass_blur_matches_the_reference_pixel_moves(size: int, table: str, severity: int) -> None:
    images = _smooth_images(3, size=size, n=2).double()
    out = CORRUPTIONS.get("glass_blur")(images, severity, [torch.Generator().manual_seed(i) for i in range(2)], table)
    for i, (image, result) in enumerate(zip(images, out, strict=True)):
        ref = _reference_glass(_hwc(image), table, severity, torch.Generator().manual_seed(i))
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_glass_blur_of_non_square_images_moves_the_pixels_of_every_row_and_column(shape: tuple[int, int]) -> None:
    height, width = shape
    images = _smooth_images(3, size=max(shape), n=2).double()[..., :height, :width]
    out = CORRUPTIONS.get("glass_blur")(images, 4, [torch.Generator().manual_seed(i) for i in range(2)], "imagenetc")
    for i, (image, result) in enumerate(zip(images, out, strict=True)):
        ref = _reference_glass(_hwc(image), "imagenetc", 4, torch.Generator().manual_seed(i))
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)


# The motion blur of make_cifar_c.py / make_imagenet_c.py is ImageMagick's (through Wand), on 8-bit PNGs. Checked once
# against ImageMagick 6.9.11 Q16 itself (Debian's, not a dependency; `convert -motion-blur RxS+A` at 32 and 224 px,
# all five severities of both tables, a gray image included): every output pixel is floor(round(257 v) / 257) of
# gradreg's 255 v, the Q16 and 8-bit quantizations of the same value; snow through that pipeline is within 2/255.
_MOTION = {
    "cifar10c": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "imagenetc": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
}
_MOTION_CASES = [(32, "cifar10c", s) for s in range(1, 6)] + [(12, "cifar10c", 5), (40, "imagenetc", 1),
                                                              (40, "imagenetc", 5)]  # fmt: skip


@pytest.mark.parametrize(("size", "table", "severity"), _MOTION_CASES)
def test_motion_blur_matches_imagemagick_motion_blur(size: int, table: str, severity: int) -> None:
    radius, sigma = _MOTION[table][severity - 1]
    images = _smooth_images(3, size=size, n=3).double()
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    out = CORRUPTIONS.get("motion_blur")(images, severity, generators, table)
    for i, (image, result) in enumerate(zip(images, out, strict=True)):
        angle = -45 + 90 * torch.rand((), generator=torch.Generator().manual_seed(i), dtype=torch.float64).item()
        ref = np.clip(_magick_motion_blur(_hwc(image), radius, sigma, angle), 0, 1)
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("angle", [0.0, 90.0, -90.0, 180.0, 30.0, -150.0])
def test_motion_blur_streaks_towards_its_angle(angle: float) -> None:
    # One bright pixel: pixel p takes the weighted pixels p + i (cos a, sin a), so the streak runs the other way.
    image = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    image[0, 0, 10, 10] = 1.0
    out = anomalies._motion_blur(image, 6, 2.0, torch.tensor([angle]))
    ref = _magick_motion_blur(_hwc(image[0]), 6, 2.0, angle)
    np.testing.assert_allclose(_hwc(out[0]), ref, rtol=0, atol=1e-15)
    rows, cols = torch.nonzero(out[0, 0] > 1e-3, as_tuple=True)
    direction = torch.tensor([math.cos(math.radians(angle)), math.sin(math.radians(angle))], dtype=torch.float64)
    along = (cols - 10) * direction[0] + (rows - 10) * direction[1]
    assert along.max() <= 0.5, (angle, along)  # nothing ahead of the pixel
    assert along.min() < -3, (angle, along)  # a streak behind it


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_motion_blur_of_non_square_images_matches_imagemagick_motion_blur(shape: tuple[int, int]) -> None:
    height, width = shape
    radius, sigma = _MOTION["cifar10c"][4]  # streaks of 19 pixels: every edge pixel reads beyond the border
    images = _smooth_images(3, size=max(shape), n=3).double()[..., :height, :width]
    out = CORRUPTIONS.get("motion_blur")(images, 5, [torch.Generator().manual_seed(i) for i in range(3)], "cifar10c")
    for i, (image, result) in enumerate(zip(images, out, strict=True)):
        angle = -45 + 90 * torch.rand((), generator=torch.Generator().manual_seed(i), dtype=torch.float64).item()
        ref = np.clip(_magick_motion_blur(_hwc(image), radius, sigma, angle), 0, 1)
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("size", "table", "severity"), _MOTION_CASES)
def test_snow_matches_the_reference(size: int, table: str, severity: int) -> None:
    mean, std, zoom, threshold, radius, sigma, keep = {
        "cifar10c": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                     (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                     (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
        "imagenetc": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
                      (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
                      (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    }[table][severity - 1]  # fmt: skip
    images = _smooth_images(3, size=size, n=2).double()
    out = CORRUPTIONS.get("snow")(images, severity, [torch.Generator().manual_seed(i) for i in range(2)], table)
    for i, (image, result) in enumerate(zip(images, out, strict=True)):
        generator = torch.Generator().manual_seed(i)
        layer = mean + std * torch.randn((size, size), generator=generator, dtype=torch.float64).numpy()
        angle = -135 + 90 * torch.rand((), generator=generator, dtype=torch.float64).item()
        layer = _clipped_zoom(layer[..., None], zoom)
        layer[layer < threshold] = 0
        layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8) / 255  # the reference's PIL image of the layer
        layer = _magick_motion_blur(layer, radius, sigma, angle)
        x = _hwc(image)
        gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]  # cv2.COLOR_RGB2GRAY
        x = keep * x + (1 - keep) * np.maximum(x, gray * 1.5 + 0.5)
        ref = np.clip(x + layer + np.rot90(layer, k=2), 0, 1)
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)


def test_snow_whitens_a_gray_image_alike_whatever_its_channel_count() -> None:
    # The gray of C equal channels is their value (OpenCV's luma weights sum to 1, and so do the channel mean's), and
    # the snow layer is drawn once per image: every channel comes out as the 1-channel image does.
    gray = _smooth_images(1, size=16, n=2).double()
    for severity in (1, 5):
        expected = CORRUPTIONS.get("snow")(gray, severity, [torch.Generator().manual_seed(i) for i in range(2)])
        for channels in (2, 3, 4):
            images = gray.expand(-1, channels, -1, -1)
            out = CORRUPTIONS.get("snow")(images, severity, [torch.Generator().manual_seed(i) for i in range(2)])
            torch.testing.assert_close(out, expected.expand_as(out), rtol=0, atol=1e-12)
        assert (expected != gray).any()


# Spatter's water goes through OpenCV's Canny, distanceTransform, blur, equalizeHist and filter2D on 8-bit images. The
# transcriptions below port OpenCV's C++ (canny.cpp and distanceTransform_5x5 in distransform.cpp) pixel by pixel;
# gradreg's versions are vectorized (its distance relaxes every step at once instead of two raster passes). Checked
# once against opencv-python-headless 5.0 itself (not a dependency): every stage equal on 40 layers of 32 to 224 px and
# whole spatter within 1.1e-7, with IPP off; with IPP on (the wheels' default), its float distance transform differs
# by up to 5.3e-5 px, which moves 0.014 % of the truncated 8-bit distances.
_SPATTER = {
    "cifar10c": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                 (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
    "imagenetc": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                  (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],
}  # fmt: skip


def _opencv_canny(image: np.ndarray, low: int, high: int) -> np.ndarray:
    """cv::Canny(image, low, high), aperture 3, L1 gradient, as canny.cpp: its map (1 no, 0 maybe, 2 edge) and stack."""
    h, w = image.shape
    p = np.pad(image.astype(np.int64), 1, mode="edge").tolist()
    dx = [[p[i][j + 2] - p[i][j] + 2 * (p[i + 1][j + 2] - p[i + 1][j]) + p[i + 2][j + 2] - p[i + 2][j]
           for j in range(w)] for i in range(h)]  # fmt: skip
    dy = [[p[i + 2][j] - p[i][j] + 2 * (p[i + 2][j + 1] - p[i][j + 1]) + p[i + 2][j + 2] - p[i][j + 2]
           for j in range(w)] for i in range(h)]  # fmt: skip
    mag = [[0] * (w + 2) for _ in range(h + 2)]
    for i in range(h):
        for j in range(w):
            mag[i + 1][j + 1] = abs(dx[i][j]) + abs(dy[i][j])
    state = [[1] * (w + 2) for _ in range(h + 2)]
    stack = []
    tg22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)
    for i in range(1, h + 1):
        prev_flag = False
        for j in range(1, w + 1):
            m, xs, ys = mag[i][j], dx[i - 1][j - 1], dy[i - 1][j - 1]
            keep = False
            if m > low:
                x, y = abs(xs), abs(ys) << 15
                tg22x = x * tg22
                if y < tg22x:
                    keep = m > mag[i][j - 1] and m >= mag[i][j + 1]
                elif y > tg22x + (x << 16):
                    keep = m > mag[i - 1][j] and m >= mag[i + 1][j]
                else:
                    s = -1 if (xs ^ ys) < 0 else 1
                    keep = m > mag[i - 1][j - s] and m > mag[i + 1][j + s]
            if not keep:
                prev_flag = False
                state[i][j] = 1
            elif not prev_flag and m > high and state[i - 1][j] != 2:
                state[i][j] = 2
                stack.append((i, j))
                prev_flag = True
            else:
                state[i][j] = 0
    while stack:
        i, j = stack.pop()
        for di, dj in [(0, -1), (0, 1), (-1, -1), (-1, 0), (-1, 1), (1, -1), (1, 0), (1, 1)]:
            if state[i + di][j + dj] == 0:
                state[i + di][j + dj] = 2
                stack.append((i + di, j + dj))
    return np.array(state)[1:-1, 1:-1] == 2


def _opencv_distance(zero: np.ndarray) -> np.ndarray:
    """cv::distanceTransform(src, DIST_L2, 5) to the pixels where ``zero``: two raster passes in 16-bit fixed point."""
    hv, diag, knight = 65536, round(float(np.float32(1.4)) * 65536), round(float(np.float32(2.1969)) * 65536)
    h, w = zero.shape
    big = 1 << 40
    t = [[big] * (w + 4) for _ in range(h + 4)]
    for i in range(2, h + 2):
        for j in range(2, w + 2):
            if zero[i - 2, j - 2]:
                t[i][j] = 0
            else:
                t[i][j] = min(t[i - 2][j - 1] + knight, t[i - 2][j + 1] + knight, t[i - 1][j - 2] + knight,
                              t[i - 1][j - 1] + diag, t[i - 1][j] + hv, t[i - 1][j + 1] + diag,
                              t[i - 1][j + 2] + knight, t[i][j - 1] + hv)  # fmt: skip
    for i in range(h + 1, 1, -1):
        for j in range(w + 1, 1, -1):
            if t[i][j] > hv:
                t[i][j] = min(t[i][j], t[i + 2][j + 1] + knight, t[i + 2][j - 1] + knight, t[i + 1][j + 2] + knight,
                              t[i + 1][j + 1] + diag, t[i + 1][j] + hv, t[i + 1][j - 1] + diag,
                              t[i + 1][j - 2] + knight, t[i][j + 1] + hv)  # fmt: skip
    return (np.array(t, dtype=np.float64)[2:-2, 2:-2] / 65536).astype(np.float32)


def _opencv_equalize(image: np.ndarray) -> np.ndarray:
    """cv::equalizeHist: the cumulative histogram from the darkest value present, float32, rounded half to even."""
    hist = np.bincount(image.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    if hist[first] == image.size:
        return np.full_like(image, first)
    scale = np.float32(255) / np.float32(image.size - hist[first])
    lut, total = np.zeros(256, dtype=np.uint8), 0
    for k in range(first + 1, 256):
        total += int(hist[k])
        lut[k] = min(255, int(np.rint(np.float32(total) * scale)))
    return lut[image]


def _reference_spatter(x: np.ndarray, c: tuple, normal: np.ndarray) -> np.ndarray:
    """make_cifar_c.py's spatter given its normal draws, with the OpenCV transcriptions (x: HWC RGB in [0, 1])."""
    liquid = ndimage.gaussian_filter(c[0] + c[1] * normal, c[2], mode="nearest", truncate=4.0)
    liquid[liquid < c[3]] = 0
    if c[5] == 1:  # mud
        m = ndimage.gaussian_filter((liquid > c[3]).astype(np.float32), c[4], mode="nearest", truncate=4.0)
        m[m < 0.8] = 0
        brown = np.array([63, 42, 20]) / 255
        return np.clip(x * (1 - m[..., None]) + brown * m[..., None], 0, 1)
    layer = (liquid * 255).astype(np.uint8)
    dist = np.minimum(_opencv_distance(_opencv_canny(layer, 50, 150)), 20)  # THRESH_TRUNC
    box = np.ones((3, 3))
    dist = (ndimage.correlate(dist.astype(np.float64), box, mode="mirror") * (1 / 9)).astype(np.float32)
    dist = _opencv_equalize(dist.astype(np.uint8))
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    dist = np.clip(ndimage.correlate(dist.astype(np.int64), emboss, mode="mirror"), 0, 255)
    dist = np.rint(ndimage.correlate(dist, box, mode="mirror") / 9)
    m = layer * dist
    m = m / m.max() * c[4]
    return np.clip(x + m[..., None] * np.array([175, 238, 238]) / 255, 0, 1)


@pytest.mark.parametrize(
    ("size", "table", "severity", "seeds"),
    [(32, "cifar10c", s, (0, 1, 2)) for s in range(1, 6)]
    + [(48, "imagenetc", s, (0, 1, 2)) for s in (1, 4)]
    + [(32, "cifar10c", 3, (12, 14))],  # layers above 1, which astype(np.uint8) wraps around
)
def test_spatter_matches_the_reference(size: int, table: str, severity: int, seeds: tuple[int, ...]) -> None:
    images = _smooth_images(3, size=size, n=len(seeds)).double()
    generators = [torch.Generator().manual_seed(i) for i in seeds]
    out = CORRUPTIONS.get("spatter")(images, severity, generators, table)
    for i, image, result in zip(seeds, images, out, strict=True):
        normal = torch.randn((size, size), generator=torch.Generator().manual_seed(i), dtype=torch.float64).numpy()
        ref = _reference_spatter(_hwc(image), _SPATTER[table][severity - 1], normal)
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)
        assert (result != image).any()


def test_opencv_stages_match_their_transcriptions() -> None:
    # Layers as spatter makes them: blurred gaussian noise, zero below the threshold, in 8 bits.
    rng = np.random.default_rng(0)
    for size, sigma in [(24, 0.7), (40, 1.0), (40, 2.0), (33, 3.0)]:
        liquid = ndimage.gaussian_filter(rng.normal(0.65, 0.3, (size, size)), sigma, mode="nearest", truncate=4.0)
        layer = (np.clip(np.where(liquid < 0.68, 0, liquid), 0, 1) * 255).astype(np.uint8)
        edges = anomalies._canny(torch.from_numpy(layer).double()[None], 50, 150)[0].numpy()
        np.testing.assert_array_equal(edges, _opencv_canny(layer, 50, 150))
        assert edges.any()
        for sources in (edges, rng.random((size, size)) < 0.02, np.zeros((size, size), bool)):
            distance = anomalies._chamfer_distance(torch.from_numpy(sources)[None], 20)[0].numpy()
            ref = _opencv_distance(sources)
            np.testing.assert_array_equal(np.minimum(distance, 20), np.minimum(ref, 20))
        image = rng.integers(0, 256, (size, size))
        image[: size // 2] //= 4  # a skewed histogram
        np.testing.assert_array_equal(
            anomalies._equalize_histogram(torch.from_numpy(image).double()[None])[0].numpy(), _opencv_equalize(image)
        )
    flat = torch.full((1, 5, 5), 17.0)  # one value: equalizeHist leaves it
    assert torch.equal(anomalies._equalize_histogram(flat), flat)


_FROST = {
    "cifar10c": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "imagenetc": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
}


@pytest.mark.parametrize(
    ("size", "table", "severity"), [(32, "cifar10c", s) for s in (1, 3, 5)] + [(20, "imagenetc", 5)]
)
def test_frost_matches_the_reference(frost_photos: Path, size: int, table: str, severity: int) -> None:
    # make_cifar_c.py: cv2.resize(photo, (0, 0), fx=0.2, fy=0.2), whose linear interpolation at that scale reads pixel
    # 5 d + 2 exactly (checked on the real photographs against OpenCV 5.0: equal; gradreg's frost with them too).
    image_weight, frost_weight = _FROST[table][severity - 1]
    images = _smooth_images(3, size=size, n=6).double()
    out = CORRUPTIONS.get("frost")(images, severity, [torch.Generator().manual_seed(i) for i in range(6)], table)
    chosen = set()
    for i, (image, result) in enumerate(zip(images, out, strict=True)):
        choice, down, right = torch.rand(3, generator=torch.Generator().manual_seed(i), dtype=torch.float64).tolist()
        name = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"][int(choice * 5)]
        chosen.add(name)
        photo = np.asarray(Image.open(frost_photos / name).convert("RGB"), dtype=np.float64)
        if table == "cifar10c":
            rows, cols = round(photo.shape[0] * 0.2), round(photo.shape[1] * 0.2)
            photo = photo[2::5, 2::5][:rows, :cols]
        top, left = int(down * (photo.shape[0] - size)), int(right * (photo.shape[1] - size))
        crop = photo[top : top + size, left : left + size]
        ref = np.clip(image_weight * _hwc(image) * 255 + frost_weight * crop, 0, 255) / 255
        np.testing.assert_allclose(_hwc(result), ref, rtol=0, atol=1e-12)
    assert len(chosen) > 2


def test_frost_enlarges_photographs_smaller_than_the_image(frost_photos: Path) -> None:
    photo = anomalies._frost_photos(frost_photos)[1]  # 160 x 280
    layer = anomalies._frost_layer(photo, 0.2, 224, 224)  # enlarged 1.4 times to 224 x 392
    expected = F.interpolate(photo[None], size=(224, 392), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(layer, expected, rtol=0, atol=1e-4)  # OpenCV computes the positions in float32
    out = CORRUPTIONS.get("frost")(torch.zeros(2, 3, 224, 224), 5, torch.Generator().manual_seed(0), "cifar10c")
    assert out.shape == (2, 3, 224, 224)
    assert (out > 0).float().mean() > 0.9  # frost everywhere, no empty border


def test_frost_enlarges_photographs_just_enough_for_non_square_images(frost_photos: Path) -> None:
    # The smallest scale that covers both sides: 1.5 for 100 x 420 and for 240 x 100 (a 160 x 280 photograph).
    photo = anomalies._frost_photos(frost_photos)[1]
    for height, width in [(100, 420), (240, 100)]:
        layer = anomalies._frost_layer(photo, 0.2, height, width)
        assert layer.shape == (3, 240, 420)
        expected = F.interpolate(photo[None], size=(240, 420), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(layer, expected, rtol=0, atol=1e-4)
        images = _smooth_images(3, size=max(height, width), n=2)[..., :height, :width]
        out = CORRUPTIONS.get("frost")(images, 5, torch.Generator().manual_seed(0), "cifar10c")
        assert out.shape == images.shape


def test_frost_without_its_photographs_says_how_to_install_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "imagecorruptions").exists()])
    importlib.invalidate_caches()
    with pytest.raises(ValueError, match=r"not installed: pip install --no-deps imagecorruptions \(2 MB"):
        CORRUPTIONS.get("frost")(_smooth_images(3), 1)


def test_pgd_random_start_is_uniform_over_the_whole_ball_and_valid(trained: SmallCNN, test_batch: tuple) -> None:
    # steps=0: the start alone. Madry et al.: uniform in [-eps, eps] per pixel, projected onto the ball and [0, 1].
    x, y = test_batch
    clean = _pixels(trained, x)
    start = _pixels(trained, pgd(trained, x, y, EPS, steps=0, generator=torch.Generator().manual_seed(0)))
    assert start.min() >= -1e-6
    assert start.max() <= 1 + 1e-6
    assert (start - clean).abs().max() <= EPS + 1e-5
    delta = (start - clean)[(clean > EPS) & (clean < 1 - EPS)]  # pixels that no [0, 1] clamp can reach
    assert delta.numel() > 500
    assert delta.min() < -0.9 * EPS
    assert delta.max() > 0.9 * EPS
    assert delta.mean().abs() < 0.05 * EPS  # centred on the clean image


def test_energy_attack_steps_along_the_tempered_energy(trained: SmallCNN, test_batch: tuple) -> None:
    # One step of size eps descends E_T = -T logsumexp(f / T): x - eps * sign(grad_x E_T), clipped to [0, 1].
    model = _copy(trained, torch.float64)
    x = test_batch[0].double()
    temperature = 1000.0
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(model(x_req), temperature).sum(), x_req)  # std > 0: same sign as in pixels
    expected = (_pixels(model, x) - EPS * grad.sign()).clamp(0, 1)
    got = _pixels(model, energy_attack(model, x, EPS, steps=1, step_size=EPS, temperature=temperature))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    at_one = _pixels(model, energy_attack(model, x, EPS, steps=1, step_size=EPS))
    assert (at_one - got).abs().max() > EPS  # the case tells T = 1000 from T = 1


@pytest.mark.parametrize("attack", ["pgd", "energy"])
def test_default_step_is_two_and_a_half_budgets_over_the_steps(trained: SmallCNN, test_batch: tuple, attack) -> None:
    x, y = test_batch
    eps, steps = 8 / 255, 4

    def run(**step):
        if attack == "pgd":
            return pgd(trained, x, y, eps, steps=steps, random_start=False, **step)
        return energy_attack(trained, x, eps, steps=steps, **step)

    default = run()
    torch.testing.assert_close(default, run(step_size=2.5 * eps / steps), rtol=0, atol=0)
    assert not torch.equal(default, run(step_size=eps / steps))  # the case tells the step sizes apart
