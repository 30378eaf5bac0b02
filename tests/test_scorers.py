"""Post-hoc OOD scorers: registry contract, per-sample references in float64, sign on real digits."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import re
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from gradreg.double_backward import use_double_backward
from gradreg.evaluation import score_batch
from gradreg.losses import energy
from gradreg.models import MODELS, Classifier, SmallCNN, SplitHead, add_absent_head
from gradreg.registry import Registry, RegistryError, SettingError, check_settings, numeric_bounds, plain_hints
from gradreg.scorers import SCORERS, build, purview
from gradreg.scorers.gaia import _nonzero_fraction, gaia_a_score, gaia_layers, gaia_z_score
from gradreg.scorers.gradnorm import exgrad_score, gradnorm_score
from gradreg.scorers.logits import absent_score, energy_score, msp_score
from gradreg.scorers.margin import dct_projector, deepfool_margin
from gradreg.scorers.odin import odin_score
from gradreg.scorers.purview import purview_layer_names, purview_layer_norms, purview_score

ROOT = Path(__file__).resolve().parents[1]
TIGHT = {"rtol": 1e-8, "atol": 1e-10}  # float64: batched vs per-sample differ only by summation order
REF = {"rtol": 1e-6, "atol": 1e-9}  # vs an independent per-sample reference


class TinyCNN(Classifier):
    """conv-BN-ReLU twice (the second strided), global average pool, fc; two input channels."""

    def __init__(self, num_classes: int = 5, in_channels: int = 2, width: int = 4) -> None:
        super().__init__(num_classes, feature_dim=2 * width, in_channels=in_channels)
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)


class Scale(nn.Module):
    """A parameterized layer of a type purview has no closed form for (exercises the torch.func path)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain.reshape(1, -1, 1, 1)


class Zoo(Classifier):
    """Awkward layers: reflect-padded strided conv, grouped dilated 'same' conv, GroupNorm, in-place residual
    and ReLU on a BatchNorm output, a custom parameter, a Linear reused on 3-D tokens, LayerNorm."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__(num_classes=3, feature_dim=6, in_channels=2)
        self.inplace = inplace
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, groups=2, dilation=2, padding="same", bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.scale = Scale(4)
        self.mix = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 6)

    def features(self, x: Tensor) -> Tensor:
        h = torch.relu(self.gn(self.conv1(x)))
        y = self.bn(self.conv2(h))
        if self.inplace:  # torchvision residual blocks do exactly this to a BatchNorm output
            y += h
            y = torch.relu_(y)
        else:
            y = torch.relu(y + h)
        tokens = self.scale(y).flatten(2).transpose(1, 2)  # (N, H*W, 4)
        tokens = self.ln(self.mix(torch.tanh(self.mix(tokens))))
        return self.proj(tokens.mean(dim=1))


def _randomize_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def make_tiny(seed: int = 0) -> TinyCNN:
    """TinyCNN in float64 with random norm layers and an absent-class head (which every scorer but absent ignores)."""
    torch.manual_seed(seed)
    model = TinyCNN()
    add_absent_head(model)
    model = _randomize_norms(model.double())
    model.set_normalization([0.4, 0.5], [0.25, 0.5])
    return model.eval()


def make_zoo(inplace: bool = True, seed: int = 0) -> Zoo:
    torch.manual_seed(seed)
    model = Zoo(inplace)
    add_absent_head(model)
    model = _randomize_norms(model.double())
    model.set_normalization([0.4, 0.5], [0.25, 0.5])
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    # These models are tiny: intra-op threads only add overhead, and on a shared 2-core box they make
    # the module ~10x slower through oversubscription. Restored for the rest of the session.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny() -> TinyCNN:
    return make_tiny()


@pytest.fixture
def batch() -> Tensor:
    torch.manual_seed(1)
    return torch.randn(5, 2, 8, 8, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Registry-driven contract: every registered scorer, default settings.

ALL = SCORERS.names()
# The contract does not depend on iteration counts: keep iterative scorers short there.
CHEAP = {"margin": {"max_iter": 4}}


def build_cheap(name: str):
    return build({"name": name, **CHEAP.get(name, {})})


@pytest.mark.parametrize("name", ALL)
def test_scorer_shape_finite_and_rows_independent(name: str, tiny: TinyCNN, batch: Tensor) -> None:
    scorer = build_cheap(name)
    scores = scorer(tiny, batch)
    assert scores.shape == (batch.shape[0],)
    assert scores.dtype == batch.dtype
    assert torch.isfinite(scores).all()
    assert not scores.requires_grad
    alone = torch.cat([scorer(tiny, batch[i : i + 1]) for i in (0, 3)])
    torch.testing.assert_close(alone, scores[[0, 3]], **TIGHT)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(scorer(tiny, batch[perm]), scores[perm], **TIGHT)
    assert scorer(tiny, batch[:0]).shape == (0,)  # e.g. the last, filtered batch of a set


@pytest.mark.parametrize("name", ALL)
def test_scorer_leaves_grads_mode_and_buffers_alone(name: str, tiny: TinyCNN, batch: Tensor) -> None:
    scorer = build_cheap(name)
    expected = scorer(tiny, batch)
    known = {n: torch.full_like(p, 0.125) for n, p in tiny.named_parameters()}
    for n, p in tiny.named_parameters():
        p.grad = known[n].clone()
    buffers = {n: b.clone() for n, b in tiny.named_buffers()}
    tiny.train()
    tiny.trunk[1].eval()  # a frozen BatchNorm in a training model stays frozen
    torch.testing.assert_close(scorer(tiny, batch), expected, **TIGHT)  # scored in eval mode
    assert [m.training for m in tiny.modules()] == [m is not tiny.trunk[1] for m in tiny.modules()]
    for n, p in tiny.named_parameters():
        torch.testing.assert_close(p.grad, known[n], rtol=0, atol=0)
    for n, b in tiny.named_buffers():  # eval mode: BatchNorm running statistics untouched
        torch.testing.assert_close(b, buffers[n], rtol=0, atol=0)
    tiny.eval()
    scorer(tiny, batch)
    assert not any(m.training for m in tiny.modules())


@pytest.mark.parametrize("name", ALL)
def test_scorer_works_under_inference_mode(name: str, tiny: TinyCNN, batch: Tensor) -> None:
    scorer = build_cheap(name)
    expected = scorer(tiny, batch)
    with torch.inference_mode():
        x = batch.clone()  # an inference tensor, as Lightning's test loop produces
        scores = scorer(tiny, x)
    torch.testing.assert_close(scores, expected, **TIGHT)


@pytest.mark.parametrize("name", ALL)
def test_a_model_loaded_under_inference_mode_is_named_with_the_fix(name: str, batch: Tensor) -> None:
    # Gradient scorers failed with autograd's "Inference tensors cannot be saved for backward", naming neither the
    # model nor the fix; the others need no autograd and score it as any model.
    with torch.inference_mode():
        model = make_tiny().eval()  # e.g. a checkpoint loaded inside the caller's inference_mode block
    scorer = build_cheap(name)
    expected = scorer(make_tiny().eval(), batch)
    if name in ("odin", "gaia_z", "gaia_a", "margin", "purview"):
        message = (
            r"^TinyCNN's parameters are inference tensors \(created under torch.inference_mode\(\), e.g. "
            r"'fc.weight'\), which this scorer cannot differentiate through; load the model outside inference_mode, "
            r"or pass copy.deepcopy\(model\) made outside it$"
        )
        with pytest.raises(ValueError, match=message):
            scorer(model, batch)
        model = copy.deepcopy(model)  # the fix it gives
    torch.testing.assert_close(scorer(model, batch), expected, **TIGHT)


@pytest.mark.parametrize("name", ALL)
def test_scorer_refuses_batchnorm_without_running_statistics(name: str, tiny: TinyCNN, batch: Tensor) -> None:
    # In eval mode such a BatchNorm still normalizes with the batch's statistics: a row's score would change with
    # the other rows (checked here first, so that the refusal is not a false alarm).
    tiny.trunk[4] = nn.BatchNorm2d(8, track_running_stats=False).double()
    with torch.no_grad():
        coupled = tiny.eval()(batch)[0] - tiny(batch[:1])[0]
    assert coupled.abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"BatchNorm2d 'trunk.4' has no running statistics"):
        build_cheap(name)(tiny, batch)
    with pytest.raises(ValueError, match=r"BatchNorm2d 'trunk.4' has no running statistics"):
        score_batch(tiny, batch, {name: build_cheap(name)})


@pytest.mark.parametrize("name", ALL)
def test_scorer_on_a_model_without_features_and_fc(name: str, tiny: TinyCNN, batch: Tensor) -> None:
    # A plain classifier: scorers that need the penultimate features say so; the others use forward(x).
    plain = nn.Sequential(tiny.trunk, tiny.fc)
    for buffer in ("input_mean", "input_std"):  # what odin and margin read
        plain.register_buffer(buffer, getattr(tiny, buffer))
    scorer = build_cheap(name)
    if scorer.needs_head:
        with pytest.raises(TypeError, match=r"Sequential has no features and no fc: .* wrap the model"):
            scorer(plain, batch)
    else:
        torch.testing.assert_close(scorer(plain, batch), scorer(tiny, batch), **TIGHT)
    with pytest.raises(TypeError, match=r"Sequential has no features and no fc"):
        score_batch(plain, batch, {name: scorer})


class TupleForward(nn.Module):
    """A user's model whose forward returns ``(logits, features)``; ``features`` and ``fc`` are as required."""

    def __init__(self, inner: TinyCNN) -> None:
        super().__init__()
        self.inner, self.fc, self.absent_fc = inner, inner.fc, inner.absent_fc
        self.register_buffer("input_std", inner.input_std)

    def features(self, x: Tensor) -> Tensor:
        return self.inner.features(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.inner(x), self.inner.features(x)


@pytest.mark.parametrize("name", ALL)
def test_scorer_names_a_forward_that_does_not_return_logits(name: str, tiny: TinyCNN, batch: Tensor) -> None:
    # Scorers that call forward(x) said "'tuple' object has no attribute 'amax'" (gaia_z) and the like.
    model, scorer = TupleForward(make_tiny()).eval(), build_cheap(name)
    if scorer.needs_head:  # features and fc only: unaffected
        torch.testing.assert_close(scorer(model, batch), scorer(make_tiny(), batch), **TIGHT)
    else:
        with pytest.raises(TypeError, match=r"TupleForward.forward\(x\) returned tuple: scorers need the logits"):
            scorer(model, batch)


@pytest.mark.parametrize("name", [name for name in ALL if SCORERS.get(name).needs_head])
def test_scorer_names_features_that_are_not_pooled(name: str, batch: Tensor) -> None:
    # features(x) as a feature map (the common `self.features = nn.Sequential(...)` idiom): energy returned an
    # (N, 8, ...) array instead of (N,) where the map's last dimension matched fc's input, else a matmul error.
    model = make_tiny()
    model.trunk = model.trunk[:-2]  # no pooling, no flatten: (N, 8, 4, 4)
    message = r"TinyCNN.features\(x\) returned a 4-D tensor of shape \(5, 8, 4, 4\): scorers need the pooled"
    with pytest.raises(TypeError, match=message):
        build_cheap(name)(model, batch)
    with pytest.raises(TypeError, match=message):
        score_batch(model, batch, {name: build_cheap(name)})


def test_scorer_names_an_fc_that_does_not_return_logits(batch: Tensor) -> None:
    model = make_tiny()
    model.fc = nn.Sequential(model.fc, nn.Unflatten(1, (-1, 1)))  # (N, C, 1)
    with pytest.raises(
        TypeError, match=r"TinyCNN.fc\(features\(x\)\) returned a 3-D tensor .*: scorers need the logits"
    ):
        build("energy")(model, batch)


@pytest.mark.parametrize("name", ["gradnorm", "exgrad"])
def test_last_layer_scorers_need_a_linear_fc(name: str, batch: Tensor) -> None:
    # With an MLP head as fc, gradnorm's closed form silently differed from the official last-layer gradient.
    model = make_tiny()
    model.fc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    assert not build(name).supports(model)
    assert build("energy").supports(model)
    with pytest.raises(TypeError, match=r"TinyCNN.fc is a Sequential, not an nn.Linear"):
        build(name)(model, batch)
    with pytest.raises(TypeError, match=r"TinyCNN.fc is a Sequential, not an nn.Linear"):
        score_batch(model, batch, {name: build(name)})


class CutBackbone(nn.Module):
    """A user's frozen-backbone model that computes the features under ``torch.no_grad()`` or ``.detach()``-es them,
    with a trainable ``fc`` after the cut."""

    def __init__(self, inner: TinyCNN, cut: str) -> None:
        super().__init__()
        self.inner, self.fc, self.cut = inner, inner.fc, cut
        self.register_buffer("input_std", inner.input_std)

    def features(self, x: Tensor) -> Tensor:
        if self.cut == "no_grad":
            with torch.no_grad():
                return self.inner.features(x)
        return self.inner.features(x).detach()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@pytest.mark.parametrize("cut", ["no_grad", "detach"])
@pytest.mark.parametrize("name", [name for name in ALL if SCORERS.get(name).needs_grad and name != "purview"])
def test_input_gradient_scorers_name_a_model_that_cuts_the_input_off_its_graph(
    name: str, cut: str, batch: Tensor
) -> None:
    # They failed deep inside autograd ("The differentiated Tensor at index 0 appears to not have been used in the
    # graph", "One of the differentiated Tensors does not require grad"), which named neither the model nor the fix.
    model = CutBackbone(make_tiny(), cut).eval()
    what = "features" if name == "gaia_a" else "forward"
    message = rf"CutBackbone.{what}\(x\) does not depend on x through autograd .*requires_grad_\(False\) instead"
    with pytest.raises(TypeError, match=message):
        build_cheap(name)(model, batch)
    model.fc.requires_grad_(False)  # nothing after the cut requires grad either
    with pytest.raises(TypeError, match=message):
        build_cheap(name)(model, batch)
    # The fix the message gives: the same scores as the model with nothing frozen.
    frozen = make_tiny().requires_grad_(False)
    torch.testing.assert_close(build_cheap(name)(frozen, batch), build_cheap(name)(make_tiny(), batch), **TIGHT)


@pytest.mark.parametrize("cut", ["no_grad", "detach"])
def test_purview_on_a_model_that_cuts_the_input_off_its_graph(cut: str, batch: Tensor) -> None:
    # The hooks route failed in autograd (its backward ran to the input, which such a model does not use); the layers
    # after the cut have their gradients, those before it none (what per-sample autograd gives).
    model = CutBackbone(make_tiny(), cut).eval()
    expected = _purview_loop(model, batch)
    assert expected[:, purview_layer_names(model).index("inner.fc")].min() > 0
    assert expected[:, purview_layer_names(model).index("inner.trunk.0")].abs().max() == 0
    for method in ("hooks", "vmap"):
        torch.testing.assert_close(purview_layer_norms(model, batch, method), expected, **REF)
    torch.testing.assert_close(build("purview")(model, batch), expected.sum(dim=1), **REF)
    model.requires_grad_(False)  # nothing in the graph at all; frozen weights are differentiated all the same
    for method in ("hooks", "vmap"):
        torch.testing.assert_close(purview_layer_norms(model, batch, method), expected, **REF)


class _TiedAcrossLayers(nn.Module):
    """A weight shared by two Linear layers (``c.weight = a.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (
            nn.Linear(2 * 8 * 8, 2 * 8 * 8),
            nn.Linear(2 * 8 * 8, 4),
            nn.Linear(2 * 8 * 8, 2 * 8 * 8),
        )
        self.c.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x.flatten(1))))))


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_purview_leaves_shared_and_tied_modules_intact(method: str, batch: Tensor) -> None:
    # torch.func.functional_call refused a weight tied across layers ("got multiple values for keys") and did not
    # restore a module registered under two names (a wrapper's self.fc = inner.fc): its weights stayed functorch
    # wrappers after the call.
    torch.manual_seed(0)
    for model in (CutBackbone(make_tiny(), "detach").eval(), _TiedAcrossLayers().double()):
        before = dict(model.named_parameters(remove_duplicate=False))
        expected = _purview_loop(model, batch)
        torch.testing.assert_close(purview_layer_norms(model, batch, method), expected, **REF)
        after = dict(model.named_parameters(remove_duplicate=False))
        assert after.keys() == before.keys()
        assert all(after[n] is p for n, p in before.items()), type(model).__name__


class _DetachedProbe(TinyCNN):
    """TinyCNN plus a trainable probe on the detached features (a stop-gradient branch): the probe's output reaches the
    loss, but not on the input's path."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        return self.fc(h) + self.probe(h.detach())


def test_purview_on_a_model_that_cuts_some_layers_off_the_inputs_path(batch: Tensor) -> None:
    # The backward to the input never ran the probe's part of the graph: its column was silently zero.
    torch.manual_seed(0)
    model = _randomize_norms(_DetachedProbe().double()).eval()
    expected = _purview_loop(model, batch)
    assert expected[:, purview_layer_names(model).index("probe")].min() > 0
    torch.testing.assert_close(purview_layer_norms(model, batch), expected, **REF)
    torch.testing.assert_close(purview_layer_norms(model, batch, method="vmap"), expected, **REF)


class _DetachedNormProbe(TinyCNN):
    """TinyCNN whose features add a BatchNorm probe of the detached last feature map (a stop-gradient branch, under
    ``.detach()`` or ``torch.no_grad()``): the probe's BatchNorm output reaches the objectives, off the input's path."""

    def __init__(self, cut: str) -> None:
        super().__init__()
        self.cut = cut
        self.probe = nn.Sequential(nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def features(self, x: Tensor) -> Tensor:
        maps = self.trunk[:6](x)
        if self.cut == "no_grad":
            with torch.no_grad():
                probed = self.probe[0](maps)
            return self.trunk[6:](maps) + self.probe[1:](probed)
        return self.trunk[6:](maps) + self.probe(maps.detach())


def _gaia_by_autograd(model: Classifier, x: Tensor, variant: str) -> Tensor:
    """Per sample, GAIA from plain ``torch.autograd.grad`` of the objective w.r.t. every BatchNorm output."""
    bns = _batchnorms(model)
    scores = []
    for xi in x:
        outputs: list[Tensor] = []
        handles = [m.register_forward_hook(lambda m, i, o, outputs=outputs: outputs.append(o)) for m in bns]
        try:
            h = model.features(xi.unsqueeze(0).requires_grad_(True))
        finally:
            for handle in handles:
                handle.remove()
        logits = model.fc(h)
        objective = logits.max(dim=1).values.sum() if variant == "z" else h.sum()
        grads = torch.autograd.grad(objective, outputs, retain_graph=True)
        if variant == "z":
            ratios = torch.cat([(g != 0).double().mean(dim=(-1, -2)) for g in grads], dim=1)
            scores.append(-ratios.square().mean())
        else:
            (d,) = torch.autograd.grad(F.log_softmax(logits, dim=1).sum(), h)
            means = torch.cat([g.mean(dim=(-1, -2)) for g in grads], dim=1)
            scores.append(-(means.square() / d.abs().mean()).mean())
    return torch.stack(scores).detach()


@pytest.mark.parametrize("cut", ["detach", "no_grad"])
@pytest.mark.parametrize("variant", ["z", "a"])
def test_gaia_on_a_model_that_cuts_a_hooked_layer_off_the_inputs_path(cut: str, variant: str, batch: Tensor) -> None:
    # The backward to the input never ran the probe's part of the graph: its BatchNorm's gradient was silently zero.
    torch.manual_seed(0)
    model = _randomize_norms(_DetachedNormProbe("detach").double()).eval()
    expected = _gaia_by_autograd(model, batch, variant)
    model.cut = cut
    scorer = build(f"gaia_{variant}")
    torch.testing.assert_close(scorer(model, batch), expected, **REF)
    model.probe.requires_grad_(False)  # frozen weights on a cut-off input: no autograd path at all, same gradients
    torch.testing.assert_close(scorer(model, batch), expected, **REF)


def test_gaia_hooks_syncbatchnorm_and_supports_says_what_it_can_hook(tiny: TinyCNN, batch: Tensor) -> None:
    # DDP with sync_batchnorm leaves SyncBatchNorm layers, which GAIA's default did not hook ("found no layers").
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(make_tiny()).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in synced.modules())
    for name in ("gaia_z", "gaia_a", "purview"):
        torch.testing.assert_close(build(name)(synced, batch), build(name)(tiny, batch), **TIGHT)
    plain = make_tiny()
    plain.trunk[1], plain.trunk[4] = nn.Identity(), nn.Identity()  # nothing to hook
    for name in ("gaia_z", "gaia_a"):
        assert not build(name).supports(plain)  # was True, then the call raised
        with pytest.raises(TypeError, match=r"GAIA found no layers to hook in TinyCNN: define gaia_layers"):
            build(name)(plain, batch)


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_purview_under_a_callers_autocast(method: str) -> None:
    # A caller's autocast made the grouped-convolution route (>= 256 output positions) and torch.func fail with a
    # backend error ("could not create a primitive descriptor", "expected scalar type BFloat16 but found Float").
    torch.manual_seed(0)
    model = _randomize_norms(TinyCNN()).eval()
    x = torch.randn(2, 2, 32, 32)
    scorer = build({"name": "purview", "method": method})
    expected = scorer(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = scorer(model, x)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("make", [make_tiny, make_zoo], ids=["tiny", "zoo"])
def test_scorer_is_the_same_on_a_channels_last_model(name: str, make, batch: Tensor) -> None:
    # model.channels_last trains and evaluates in this layout (the CIFAR and ImageNet configs).
    expected = build_cheap(name)(make(), batch)
    model = make().to(memory_format=torch.channels_last)
    scores = build_cheap(name)(model, batch.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(scores, expected, **TIGHT)


@pytest.mark.parametrize("name", ALL)
def test_scorer_is_unaffected_by_in_place_ops_after_hooked_layers(name: str, batch: Tensor) -> None:
    # Zoo(inplace=True) modifies BatchNorm outputs in place (``y += h; relu_``) like torchvision ResNets.
    inplace = build_cheap(name)(make_zoo(inplace=True), batch)
    torch.testing.assert_close(inplace, build_cheap(name)(make_zoo(inplace=False), batch), **TIGHT)


@pytest.mark.parametrize("name", ALL)
def test_a_bfloat16_model_is_scored_in_float32(name: str) -> None:
    # bfloat16 softmaxes and reductions tied the scores of 64 inputs: ODIN's (T = 1000) to 1 value, MSP's to 5,
    # energy's to 6, GAIA-A's to 17, purview's to 29
    model = make_tiny()
    x = torch.randn(64, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = build_cheap(name)(model, x)
    scores = build_cheap(name)(copy.deepcopy(model).to(torch.bfloat16), x.to(torch.bfloat16))
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    if name not in ("maxlogit", "margin"):  # a bfloat16 logit; DeepFool's bfloat16 steps
        assert len(torch.unique(scores)) >= 48
        assert torch.corrcoef(torch.stack([scores.double(), expected]))[0, 1] > 0.99


def test_scorers_name_an_input_that_is_not_float() -> None:
    images = torch.randint(0, 256, (2, 2, 8, 8), dtype=torch.uint8)  # e.g. torchvision.io.read_image's
    for name in ("energy", "odin"):
        with pytest.raises(TypeError, match=re.escape("x has dtype torch.uint8: scorers take float images normalized")):
            build(name)(make_tiny(), images)


def test_build_rejects_unknown_names_and_settings() -> None:
    with pytest.raises(KeyError, match=r"unknown scorer 'gradnrom'.*known:.*gradnorm"):
        build("gradnrom")
    with pytest.raises(KeyError, match=r"unknown setting\(s\) temp for scorer 'odin'; valid: temperature, epsilon"):
        build({"name": "odin", "temp": 10.0})
    with pytest.raises(KeyError, match="valid: subspace, block_size, top_k, overshoot, max_iter"):
        build({"name": "margin", "iters": 3})
    with pytest.raises(KeyError, match=r"unknown scorer '\['odin'\]'; known: absent, energy"):
        build({"name": ["odin"]})  # unhashable: a bare TypeError before
    assert build({"name": "odin", "temperature": 10.0}).temperature == 10.0
    assert {"odin", "gradnorm", "exgrad", "gaia_z", "gaia_a", "purview", "margin"} <= set(ALL)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "odin", "temperature": "abc"}, "temperature='abc' is not a number"),
        ({"name": "odin", "temperature": "1e3"}, "temperature='1e3' is not a number (YAML reads it as text"),
        ({"name": "odin", "temperature": 0}, "temperature=0 must be > 0"),
        ({"name": "msp", "temperature": math.nan}, "temperature=nan must be finite"),
        ({"name": "odin", "temperature": math.inf}, "temperature=inf must be finite"),
        ({"name": "odin", "epsilon": math.inf}, "epsilon=inf must be finite"),
        ({"name": "odin", "epsilon": -0.5}, "epsilon=-0.5 must be >= 0"),
        ({"name": "gradnorm", "temperature": True}, "temperature=True is not a number"),
        ({"name": "margin", "top_k": 1}, "top_k=1 must be >= 2"),
        ({"name": "margin", "max_iter": 2.5}, "max_iter=2.5 is not an integer"),
        ({"name": "margin", "block_size": 0}, "block_size=0 must be >= 1"),
        (
            {"name": "margin", "block_size": "None"},
            "block_size='None' is not an integer or None (YAML reads None as text: write null)",
        ),
        ({"name": "margin", "subspace": "mid"}, "subspace='mid' is not one of full, low, high"),
        ({"name": "margin", "block_size": 4}, "block_size=4 applies to subspace 'low' or 'high' only"),
        ({"name": "purview", "method": "Hooks"}, "method='Hooks' is not one of hooks, vmap"),
    ],
)
def test_build_rejects_bad_setting_values(spec: dict, message: str) -> None:
    with pytest.raises(SettingError, match=rf"^scorer '{spec['name']}': {re.escape(message)}"):
        build(spec)


def test_build_accepts_integers_for_numbers_and_none_where_optional() -> None:
    assert build({"name": "odin", "temperature": 1000}).temperature == 1000
    assert build({"name": "margin", "block_size": None, "max_iter": 1}).block_size is None


def test_scorers_are_frozen_dataclasses() -> None:
    scorer = build("gradnorm")
    with pytest.raises(AttributeError):
        scorer.temperature = 2.0  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------------
# References: each batched implementation against a naive per-sample loop with plain autograd.


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_matches_official_batch_size_one_loop(temperature: float, tiny: TinyCNN, batch: Tensor) -> None:
    features = tiny.features(batch).detach()
    fc = nn.Linear(features.shape[1], tiny.num_classes).double()
    fc.load_state_dict(tiny.fc.state_dict())
    expected = []
    for h in features:  # gradnorm_ood/test_ood.py: batch 1, all-ones target, L1 of the weight gradient
        fc.zero_grad()
        logits = fc(h.unsqueeze(0)) / temperature
        loss = torch.sum(-torch.ones_like(logits) * F.log_softmax(logits, dim=-1), dim=-1).mean()
        loss.backward()
        expected.append(fc.weight.grad.abs().sum())
    scores = gradnorm_score(features, tiny.fc(features), temperature)
    torch.testing.assert_close(scores, torch.stack(expected), **REF)
    torch.testing.assert_close(build({"name": "gradnorm", "temperature": temperature})(tiny, batch), scores, **TIGHT)


def test_exgrad_matches_expected_gradient_norm_loop(tiny: TinyCNN, batch: Tensor) -> None:
    features = tiny.features(batch).detach()
    expected = []
    for h in features:
        logits = tiny.fc(h.unsqueeze(0))
        probs = logits.softmax(dim=1)[0].detach()
        norms = [
            torch.autograd.grad(F.cross_entropy(logits, torch.tensor([k])), tiny.fc.weight, retain_graph=True)[0].norm()
            for k in range(tiny.num_classes)
        ]
        expected.append(-(probs * torch.stack(norms)).sum())
    torch.testing.assert_close(exgrad_score(features, tiny.fc(features)), torch.stack(expected), **REF)
    torch.testing.assert_close(build("exgrad")(tiny, batch), torch.stack(expected), **REF)  # the registered scorer


@pytest.mark.parametrize(
    "gap", [8.0, 12.0, 16.0, 24.0, 40.0, 80.0, 90.0]
)  # 80: p_j² underflows; 90: 1 - p_top subnormal
def test_exgrad_keeps_its_precision_in_float32_for_confident_predictions(gap: float) -> None:
    """ID inputs are the confident ones: ``1 − p_top`` must not be computed as a difference of floats near 1."""
    logits = torch.zeros(2, 10)
    logits[:, 3] = gap
    logits[1, 5] = gap / 2
    features = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    probs = logits.double().softmax(dim=1)
    expected = []
    for h, p in zip(features.double(), probs, strict=True):
        norms = []
        for k in range(len(p)):
            diff = p.clone()
            diff[k] = -torch.cat([p[:k], p[k + 1 :]]).sum()  # p_k − 1, exact in float64 here
            norms.append(diff.norm())
        expected.append(-h.norm() * (p * torch.stack(norms)).sum())
    scores = exgrad_score(features, logits)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), torch.stack(expected), rtol=1e-5, atol=0.0)


def test_temperature_scaled_msp_and_energy_by_hand() -> None:
    logits = torch.tensor([[1.0, 3.0, 0.0]], dtype=torch.float64)  # / 2: [0.5, 1.5, 0], exp sum 7.1304
    total = math.exp(0.5) + math.exp(1.5) + 1.0
    assert msp_score(logits, 2.0).item() == pytest.approx(math.exp(1.5) / total, rel=1e-12)  # 0.6285
    assert energy_score(logits, 2.0).item() == pytest.approx(2.0 * math.log(total), rel=1e-12)  # 3.9287
    torch.testing.assert_close(energy_score(logits, 2.0), -energy(logits, 2.0))  # the training loss's energy


@pytest.mark.parametrize(
    ("temperature", "epsilon", "sharpen"),
    [(1000.0, 0.0014, 1.0), (1.0, 0.05, 1.0), (10.0, 0.05, 30.0)],  # sharpened: the input gradient's T counts
)
def test_odin_matches_per_sample_loop(
    temperature: float, epsilon: float, sharpen: float, tiny: TinyCNN, batch: Tensor
) -> None:
    with torch.no_grad():  # confident logits: a near-uniform softmax gives the same sign map with or without T
        tiny.fc.weight.mul_(sharpen)
    std = tiny.input_std.reshape(-1, 1, 1)
    expected = []
    for x in batch:
        x = x.unsqueeze(0).requires_grad_(True)
        logits = tiny(x) / temperature
        F.cross_entropy(logits, logits.argmax(dim=1)).backward()
        sign = (torch.ge(x.grad, 0).double() - 0.5) * 2  # the reference code's sign map
        x_tilde = x.detach() - epsilon * sign / std
        expected.append(torch.softmax(tiny(x_tilde) / temperature, dim=1).max())
    scores = odin_score(tiny, batch, temperature, epsilon)
    torch.testing.assert_close(scores, torch.stack(expected).detach(), **REF)
    registered = build(
        {"name": "odin", "temperature": temperature, "epsilon": epsilon}
    )  # its settings reach odin_score
    torch.testing.assert_close(registered(tiny, batch), torch.stack(expected).detach(), **REF)
    unperturbed = torch.softmax(tiny(batch) / temperature, dim=1).amax(dim=1)
    assert (scores > unperturbed).all()  # the step raises the predicted-class score


class Hinge(nn.Module):
    """logits [10 relu(-x0) + x1, 0] of x (N, 1, 2): at x0 = 0 the gradient in x0 is exactly zero."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([10 * F.relu(-x[:, 0, 0]) + x[:, 0, 1], torch.zeros_like(x[:, 0, 0])], dim=1)


def test_odin_steps_a_pixel_of_zero_gradient_as_the_reference_code() -> None:
    # torch.ge(grad, 0) in the reference: a zero gradient counts as positive, so x0 falls by epsilon (and x1, whose
    # gradient is negative, rises by it): logit 1 + 0.01 + 10 * 0.01 against 0.
    score = odin_score(Hinge(), torch.tensor([[[0.0, 1.0]]], dtype=torch.float64), temperature=1.0, epsilon=0.01)
    assert score.item() == pytest.approx(1 / (1 + math.exp(-1.11)), rel=1e-12)


def _bn_output_grads(model: nn.Module, objective_fn, x: Tensor) -> list[Tensor]:
    """Per-sample gradients w.r.t. BatchNorm outputs via full backward hooks (a different mechanism)."""
    grads: list[Tensor] = []
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0])) for m in bns]
    try:
        x = x.unsqueeze(0).requires_grad_(True)
        torch.autograd.grad(objective_fn(model(x)), x)
    finally:
        for h in handles:
            h.remove()
    return grads[::-1]  # hooks fire in backward order


def test_absent_is_minus_log_p_absent_and_ranks_as_one_minus_p(tiny: TinyCNN, batch: Tensor) -> None:
    with torch.no_grad():
        tiny.absent_fc.bias.fill_(3.0)  # make p(absent) large for some rows and small for others
        tiny.absent_fc.weight.mul_(20.0)
    features = tiny.features(batch).detach()
    p_absent = torch.softmax(torch.cat([tiny.fc(features), tiny.absent_fc(features)], dim=1), dim=1)[:, -1].detach()
    scores = build("absent")(tiny, batch)
    torch.testing.assert_close(scores, -torch.log(p_absent), **REF)
    assert 0.01 < p_absent.min() < p_absent.max() < 0.99  # both ends exercised
    assert torch.equal(scores.argsort(), (1 - p_absent).argsort())  # DOS/NTOM's 1 - p(absent), same order
    # No saturation where 1 - p(absent) rounds to 1 in float32: the ranking of very confident rows survives.
    far = absent_score(torch.tensor([[30.0, 0.0], [31.0, 0.0]]), torch.tensor([[0.0], [0.0]]))
    assert far[1] > far[0]


def test_k_way_scorers_ignore_the_absent_head(batch: Tensor) -> None:
    # "Energy methods use K logits": making the absent logit dominate changes the absent score only.
    model = make_tiny()
    before = {name: build_cheap(name)(model, batch) for name in ALL}
    with torch.no_grad():
        model.absent_fc.bias.fill_(50.0)
    for name in ALL:
        changed = not torch.allclose(build_cheap(name)(model, batch), before[name], rtol=1e-12, atol=0)
        assert changed == (name == "absent"), name
    scores, preds = score_batch(model, batch, {"energy": build("energy")})
    logits = model.fc(model.features(batch))
    torch.testing.assert_close(scores["energy"], torch.logsumexp(logits, dim=1), **TIGHT)
    assert torch.equal(preds, logits.argmax(dim=1))  # among the K ID classes


def test_absent_needs_the_absent_head(batch: Tensor) -> None:
    model = TinyCNN().double().eval()
    with pytest.raises(TypeError, match=r"TinyCNN has no absent_fc head: .* model.method=absent"):
        build("absent")(model, batch)
    assert not build("absent").supports(model)
    assert build("absent").supports(make_tiny())
    assert all(build(name).supports(model) for name in ALL if name != "absent")


def test_gaia_z_matches_per_sample_loop(tiny: TinyCNN, batch: Tensor) -> None:
    expected = []
    for x in batch:
        grads = _bn_output_grads(tiny, lambda logits: logits.max(dim=1).values.sum(), x)
        ratios = torch.cat([torch.where(g != 0, 1.0, 0.0).double().mean(dim=(-1, -2)) for g in grads], dim=1)
        expected.append(-ratios.square().mean())
    scores = gaia_z_score(tiny, batch)
    torch.testing.assert_close(scores, torch.stack(expected), **REF)
    assert ((-scores > 0) & (-scores < 1)).all()  # some, not all, gradient entries are exactly zero


def test_gaia_z_sends_a_tied_maximum_to_one_class_as_the_reference() -> None:
    # Two equal channels feed two classes through the identity: the top logits tie exactly. The reference backpropagates
    # max(dim=1).values, so only one channel gets a gradient: ratios (1, 0) on positive inputs, score -(1² + 0²)/2.
    # Splitting the tie (amax) gave both channels a gradient: -1.
    model = (
        nn.Sequential(
            nn.Conv2d(1, 2, 1, bias=False),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2, 2, bias=False),
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[5].weight.copy_(torch.eye(2))
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) + 0.1
    assert torch.equal(model(x)[:, 0], model(x)[:, 1])
    torch.testing.assert_close(gaia_z_score(model, x, [model[1]]), torch.full((3,), -0.5, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gaia_z_nonzero_fraction_cuda_equals_cpu(dtype: torch.dtype) -> None:
    """The CUDA route (an L0 norm) counts exactly like the CPU one, also past half precision's 2,048."""
    g = torch.randn(3, 4, 3000, generator=torch.Generator().manual_seed(0)).relu().to(dtype)
    expected = (g != 0).double().mean(dim=2)
    for device in ("cpu", "cuda"):
        result = _nonzero_fraction(g.to(device))
        assert result.dtype == torch.float32
        torch.testing.assert_close(result.double().cpu(), expected, rtol=1e-7, atol=0)


def _gaia_official_style(model: Classifier, x: Tensor, modules: list[nn.Module], variant: str) -> Tensor:
    """Per sample, GAIA-OOD's structure (``hook.py``, ``cal_method.py``): one gradient slot per hooked module,
    filled by a tensor hook on its output; ``modules[-1]`` is the "before head" hook."""
    scores = []
    for xi in x:
        store: dict[int, Tensor] = {}

        def make_hook(k: int, store: dict[int, Tensor] = store):
            def forward_hook(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
                out.register_hook(lambda g: store.__setitem__(k, g))

            return forward_hook

        handles = [m.register_forward_hook(make_hook(k)) for k, m in enumerate(modules)]
        try:
            xi = xi.unsqueeze(0).requires_grad_(True)
            before_head_data = model.features(xi)
            logits = model.fc(before_head_data)
            if variant == "z":  # cal_zero: every hook, the last one included
                torch.autograd.grad(logits.max(dim=1).values.sum(), xi)
                ratios = [(store[k] != 0).double().mean(dim=(-1, -2)) for k in range(len(modules))]
                scores.append(-torch.cat(ratios, dim=1).square().mean())
            else:  # cal_grad_value: the last hook gives the denominator only
                torch.autograd.grad(F.log_softmax(logits, dim=-1).sum(), xi, retain_graph=True)
                output_component = torch.sqrt(store[len(modules) - 1].mean(dim=(-1, -2)).abs().mean(dim=1))
                torch.autograd.grad(before_head_data.sum(), xi)
                inner = torch.cat([store[k].mean(dim=(-1, -2)) for k in range(len(modules) - 1)], dim=1).abs()
                scores.append(-((inner / output_component) ** 2).mean())
        finally:
            for h in handles:
                h.remove()
    return torch.stack(scores).detach()


def _batchnorms(*modules: nn.Module) -> list[nn.Module]:
    return [m for module in modules for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_gaia_a_matches_per_sample_loop_with_pooled_head(tiny: TinyCNN, batch: Tensor) -> None:
    # WRN-style: the reference's last hook is the average-pool output, i.e. the features themselves.
    expected = _gaia_official_style(tiny, batch, [*_batchnorms(tiny), tiny.trunk[6]], "a")
    torch.testing.assert_close(gaia_a_score(tiny, batch), expected, **REF)


def test_gaia_a_with_feature_map_head_differs_by_the_constant_hw(tiny: TinyCNN, batch: Tensor) -> None:
    # ResNet-style: the reference's last hook is the last feature map (4x4 here), so d² is 16x smaller.
    expected = _gaia_official_style(tiny, batch, [*_batchnorms(tiny), tiny.trunk[5]], "a")
    torch.testing.assert_close(16.0 * gaia_a_score(tiny, batch), expected, **REF)


@pytest.mark.parametrize(("name", "size"), [("resnet18_cifar", 16), ("resnet50", 64)])
def test_gaia_on_resnets_uses_the_official_hooks(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = _randomize_norms(MODELS.build(name, num_classes=5).double()).eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    trunk = getattr(model, "trunk", model)
    before_head = [*_batchnorms(trunk.layer3, trunk.layer4), trunk.layer4]  # hook.py, get_beforehead_hooks
    # GAIA's README: GAIA-Z with "-hook bn" (every BatchNorm) on CIFAR, "-hook before_head" on ImageNet.
    z_hooks = _batchnorms(model) if name == "resnet18_cifar" else before_head
    torch.testing.assert_close(build("gaia_z")(model, x), _gaia_official_style(model, x, z_hooks, "z"), **REF)
    # GAIA-A: "-hook before_head"; layer4's map is 2x2, so the pooled-feature denominator divides by H·W = 4.
    expected_a = _gaia_official_style(model, x, before_head, "a")
    torch.testing.assert_close(4.0 * build("gaia_a")(model, x), expected_a, **REF)


def test_gaia_hooks_groupnorm_outputs_by_default(batch: Tensor) -> None:
    # A model without gaia_layers(): every normalization output, GroupNorm as BatchNorm (the official "-hook bn").
    model = make_tiny()
    model.trunk[1], model.trunk[4] = nn.GroupNorm(2, 4).double(), nn.GroupNorm(4, 8).double()
    _randomize_norms(model)
    norms = [model.trunk[1], model.trunk[4]]
    torch.testing.assert_close(build("gaia_z")(model, batch), _gaia_official_style(model, batch, norms, "z"), **REF)
    expected_a = _gaia_official_style(model, batch, [*norms, model.trunk[6]], "a")  # pooled head, as WRN
    torch.testing.assert_close(build("gaia_a")(model, batch), expected_a, **REF)


def test_gaia_uses_model_gaia_layers_when_defined(batch: Tensor) -> None:
    model = make_tiny()
    first_bn, last_bn = model.trunk[1], model.trunk[4]
    model.gaia_layers = lambda variant: [last_bn] if variant == "z" else [first_bn]  # type: ignore[method-assign]
    assert gaia_layers(model, "z") == [last_bn]
    reference = make_tiny()
    torch.testing.assert_close(build("gaia_z")(model, batch), gaia_z_score(reference, batch, [reference.trunk[4]]))
    torch.testing.assert_close(build("gaia_a")(model, batch), gaia_a_score(reference, batch, [reference.trunk[1]]))
    model.gaia_layers = lambda: [last_bn]  # type: ignore[method-assign]
    assert gaia_layers(model, "z") == gaia_layers(model, "a") == [last_bn]
    with pytest.raises(ValueError, match="gaia_layers"):
        gaia_layers(nn.Sequential(nn.Linear(2, 2)), "z")


def _purview_loop(model: nn.Module, x: Tensor) -> Tensor:
    """(N, L) squared per-sample, per-layer gradient norms of the all-ones BCE loss, one sample at a time."""
    modules = [m for _, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    rows = []
    for xi in x:
        logits = model(xi.unsqueeze(0))
        loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="sum")
        row = []
        for m in modules:
            params = list(m.parameters(recurse=False))
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            row.append(sum((g.square().sum() for g in grads if g is not None), x.new_zeros(())))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def make_tokens(seed: int = 0) -> nn.Module:
    """Linear layers on (N, T, C) tokens (T = 2 channels of 64 pixels), each called once: ghost norms, T > 1."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(2), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 3, bias=False), nn.Flatten()).double()


# Per-sample Linear/Conv2d weight-gradient norms: the default per-layer choice, or one engine everywhere
# (unfold + bmm, grouped convolution, ghost norms from Gram matrices).
ENGINES = {
    "auto": {},
    "unfold": {"GROUPED_CONV_MIN_POSITIONS": 10**9, "GHOST_MAX_COST_RATIO": 0.0},
    "grouped": {"GROUPED_CONV_MIN_POSITIONS": 1, "GROUPED_CONV_MIN_KERNEL": 1, "GHOST_MAX_COST_RATIO": 0.0},
    "ghost": {"GHOST_MAX_COST_RATIO": math.inf},
}


@pytest.mark.parametrize("make", [make_tiny, make_zoo, make_tokens], ids=["tiny", "zoo", "tokens"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
def test_purview_matches_per_sample_loop(
    make, engine: str, chunked: bool, batch: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    for constant, value in ENGINES[engine].items():
        monkeypatch.setattr(purview, constant, value)
    if chunked:  # a few samples per chunk, for the conv gradients and the torch.func fallback alike
        monkeypatch.setattr(purview, "MAX_CHUNK_ELEMENTS", 1000)
    model = make()
    expected = _purview_loop(model, batch)
    norms = purview_layer_norms(model, batch)
    assert norms.shape == (batch.shape[0], len(purview_layer_names(model)))
    torch.testing.assert_close(norms, expected, **REF)
    torch.testing.assert_close(purview_layer_norms(model, batch, method="vmap"), expected, **REF)
    torch.testing.assert_close(purview_score(model, batch), expected.sum(dim=1), **REF)


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels-last"])
def test_purview_hooks_equal_vmap_on_every_registered_model(
    name: str, layout: torch.memory_format, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The closed forms on the real architectures (in-place residual additions, concatenations, strided 1x1
    # shortcuts, the ImageNet stems), in both layouts, with running statistics away from 0 and 1 so that
    # BatchNorm's centering matters. torch.func differentiates the same loss one sample at a time.
    torch.manual_seed(0)
    model = MODELS.build(name, num_classes=10, in_channels=3).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    expected = purview_layer_norms(model, x, method="vmap")
    if layout == torch.channels_last:  # and with GReg's double-backward layers, as a GReg-trained model has them
        use_double_backward(model, batchnorm_compile="off")

    def no_fallback(model: nn.Module, x: Tensor, layers: list, everywhere: bool = True) -> Tensor:
        raise AssertionError(f"closed-form layers took the torch.func route: {[n for n, _ in layers]}")

    monkeypatch.setattr(purview, "_vmap_sq_norms", no_fallback)  # every layer of these models has a closed form
    got = purview_layer_norms(model.to(memory_format=layout), x.contiguous(memory_format=layout))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0.0)


def _torchvision_model(name: str) -> SplitHead:
    from torchvision.models import convnext, mobilenet_v3_small, swin_transformer, vision_transformer

    torch.manual_seed(0)
    if name == "mobilenet_v3":  # depthwise convs, squeeze-excitation, Hardswish, a hidden head layer
        net = mobilenet_v3_small(num_classes=5)
    elif name == "convnext":  # LayerNorm2d, depthwise 7x7, a layer-scale parameter on the block itself
        blocks = [convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)]
        net = convnext.ConvNeXt(blocks, layer_scale=0.5, num_classes=5)
    elif name == "swin":  # windowed attention with a relative-position bias table, patch merging
        net = swin_transformer.SwinTransformer([4, 4], 8, [1, 1], [1, 2], [2, 2], num_classes=5)
    else:  # ViT: class token, position embedding and nn.MultiheadAttention's own parameters
        net = vision_transformer.VisionTransformer(16, 4, 2, 2, 8, 16, num_classes=5)
    model = _randomize_norms(SplitHead(net).double()).eval()
    nn.init.normal_(model.fc.weight)  # ViT's head starts at zero, which would leave every other gradient zero
    return model


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap's per-sample fallback
@pytest.mark.parametrize("name", ["mobilenet_v3", "convnext", "swin", "vit"])
def test_scorers_on_torchvision_architectures_the_registry_does_not_build(name: str) -> None:
    # A user's own model: every scorer that supports it keeps the contract; purview's layers (closed forms and the
    # torch.func fallback for attention, layer scale and bias tables) and GAIA's BatchNorm gradients equal
    # plain autograd one sample at a time.
    model = _torchvision_model(name)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    supported = [n for n in ALL if build(n).supports(model)]
    assert set(ALL) - set(supported) == ({"absent"} if name == "mobilenet_v3" else {"absent", "gaia_z", "gaia_a"})
    for scorer_name in supported:
        scorer = build_cheap(scorer_name)
        scores = scorer(model, x)
        assert scores.shape == (3,), scorer_name
        assert torch.isfinite(scores).all(), scorer_name
        torch.testing.assert_close(scorer(model, x[1:2]), scores[1:2], **TIGHT)
    expected = _purview_loop(model, x)
    assert (expected > 0).all()  # every layer's parameters get a gradient
    torch.testing.assert_close(purview_layer_norms(model, x), expected, **REF)
    if name == "mobilenet_v3":  # its Hardswish(inplace=True) overwrites BatchNorm outputs: the reference has none
        reference = copy.deepcopy(model)
        for m in reference.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
        for variant in ("z", "a"):
            expected = _gaia_by_autograd(reference, x, variant)
            torch.testing.assert_close(build(f"gaia_{variant}")(model, x), expected, **REF)


def test_purview_picks_ghost_norms_only_where_they_are_cheaper() -> None:
    # WRN-40-2 shapes: 3x3 conv 128->128 on 8x8 maps (T=64: 64·(1152+128) < 1152·128) vs 32->32 on 32x32.
    late, early = nn.Conv2d(128, 128, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
    assert purview._ghost_is_cheaper(late, torch.empty(1, 128, 8, 8))
    assert not purview._ghost_is_cheaper(early, torch.empty(1, 32, 32, 32))
    assert purview._ghost_is_cheaper(nn.Linear(4, 3), torch.empty(2, 3))  # vectors: T = 1
    assert not purview._ghost_is_cheaper(nn.LayerNorm(3), torch.empty(2, 3))


def test_purview_uses_grouped_convolutions_only_for_spatial_kernels_on_large_maps() -> None:
    big = torch.empty(1, 64, 32, 32)
    assert purview._uses_grouped_conv(nn.Conv2d(64, 64, 3, padding=1), big)
    assert not purview._uses_grouped_conv(nn.Conv2d(64, 64, 1), big)  # 1x1: unfolding copies nothing
    assert not purview._uses_grouped_conv(nn.Conv2d(64, 64, 3, padding=1), torch.empty(1, 64, 8, 8))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 6, 1, stride=2),
        nn.Conv2d(4, 6, (3, 2), stride=(1, 2), dilation=(2, 1), padding=(2, 0)),
        nn.Conv2d(4, 6, 4, padding="same"),  # asymmetric padding
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2),
    ],
    ids=["3x3", "1x1-strided", "dilated", "same-even", "reflect-grouped"],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels-last", "batch-slice"])
def test_im2col_equals_unfold(conv: nn.Conv2d, layout: str) -> None:
    torch.manual_seed(0)
    a = torch.randn(5, 4, 9, 8, dtype=torch.float64)
    if layout == "channels-last":
        a = a.to(memory_format=torch.channels_last)
    elif layout == "batch-slice":  # a chunk of samples: a view with a storage offset
        a = a[2:4]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(a, conv._reversed_padding_repeated_twice, mode=mode)
    expected = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    assert torch.equal(purview._im2col(conv.double(), a), expected)


def test_purview_layer_names_follow_module_order() -> None:
    names = ["fc", "conv1", "gn", "conv2", "bn", "scale", "mix", "ln", "proj", "absent_fc"]
    assert purview_layer_names(make_zoo()) == names


def test_purview_frees_each_output_gradient_during_the_backward(
    tiny: TinyCNN, batch: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Single-call layers are reduced inside the backward: when the next layer (in backward order) is
    # reduced, the previous one's output gradient must be gone. Keeping them all doubles peak memory.
    seen: list = []
    alive_at_call: list[int] = []
    reduce = purview._layer_sq_norm

    def watch(m: nn.Module, calls: list) -> Tensor:
        alive_at_call.append(sum(ref() is not None for ref in seen))
        seen.extend(weakref.ref(d) for _, d in calls)
        return reduce(m, calls)

    monkeypatch.setattr(purview, "_layer_sq_norm", watch)
    purview_layer_norms(tiny, batch)
    assert len(alive_at_call) == len(purview_layer_names(tiny)) - 1 > 3  # absent_fc is not called by forward
    assert max(alive_at_call) == 0


class _EditsLayerInputLater(nn.Module):
    """A frozen Linear whose input is changed in place after it ran. Autograd keeps no copy of that input
    (a frozen weight needs none), so only purview's own check can see that its weight gradient would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2 * 8 * 8, 4), nn.Linear(4, 3)
        self.fc2.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x.flatten(1)) * 2.0
        y = self.fc2(h)
        h.add_(1.0)
        return y


def test_purview_refuses_a_layer_input_modified_in_place_later(batch: Tensor) -> None:
    with pytest.raises(RuntimeError, match="input of layer 'fc2' was modified in place"):
        purview_layer_norms(_EditsLayerInputLater().double(), batch)


class _CallsNotPerSample(nn.Module):
    """Layer calls that the closed forms cannot take, each falling back to torch.func: a Linear on rows that are
    samples x pixels, a frozen Linear on a constant (no gradient reaches its output), and a Linear whose output is
    never used (its per-sample gradients are zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.pixels, self.unused = nn.Linear(2 * 8 * 8, 4), nn.Linear(2, 4), nn.Linear(4, 4)
        self.offset = nn.Linear(3, 4).requires_grad_(False)
        self.register_buffer("code", torch.randn(1, 3))

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        pixels = self.pixels(x.flatten(2).mT.reshape(-1, 2)).reshape(n, -1, 4).mean(dim=1)
        h = self.fc(x.flatten(1))
        self.unused(h)
        return torch.tanh(h + pixels) + self.offset(self.code.expand(n, -1))


def test_purview_falls_back_for_layer_calls_that_are_not_per_sample(batch: Tensor) -> None:
    torch.manual_seed(0)
    model = _CallsNotPerSample().double()
    # Purview differentiates every layer's parameters, frozen ones too; the loop needs them to require grad.
    expected = _purview_loop(copy.deepcopy(model).requires_grad_(True), batch)
    norms = purview_layer_norms(model, batch)
    assert not norms.requires_grad  # the torch.func fallback stays off the graph of the other parameters
    torch.testing.assert_close(norms, expected, **REF)
    assert expected[:, purview_layer_names(model).index("offset")].min() > 0
    assert torch.all(norms[:, purview_layer_names(model).index("unused")] == 0)


class _ConstantRowsAsManyAsTheSamples(nn.Module):
    """Closed-form layers on inputs that are the same for every sample but have as many rows as the batch (5):
    class prototypes of a cosine head (a parameter), a view of them, and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.proj, self.view, self.fixed = (
            nn.Linear(2 * 8 * 8, 6),
            nn.Linear(6, 6),
            nn.Linear(3, 6),
            nn.Linear(6, 6),
        )
        self.prototypes = nn.Parameter(torch.randn(5, 6))
        self.register_buffer("anchors", torch.randn(5, 6))

    def forward(self, x: Tensor) -> Tensor:
        h = F.normalize(torch.tanh(self.trunk(x.flatten(1))), dim=1)
        classes = self.proj(self.prototypes) + self.view(self.prototypes.detach()[:, :3]) + self.fixed(self.anchors)
        return 10 * h @ F.normalize(classes, dim=1).T


def test_purview_falls_back_for_constant_inputs_with_one_row_per_sample(batch: Tensor) -> None:
    # The rows were taken for samples because there were as many: a score depended on the batch it came in.
    torch.manual_seed(0)
    model = _ConstantRowsAsManyAsTheSamples().double()
    expected = _purview_loop(model, batch)
    assert expected.shape == (5, 5)
    torch.testing.assert_close(purview_layer_norms(model, batch), expected, **REF)
    torch.testing.assert_close(purview_layer_norms(model, batch[:1]), expected[:1], **REF)


class _NeckOnAFrozenTrunk(nn.Module):
    """A trainable LayerNorm neck and head on a trunk cut off by ``.detach()``, a data-dependent check (which
    ``torch.func.vmap`` cannot run) and a sparse buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.neck, self.fc = nn.Linear(2 * 8 * 8, 6), nn.LayerNorm(6), nn.Linear(6, 4)
        self.register_buffer("adjacency", torch.eye(3).to_sparse())

    def forward(self, x: Tensor) -> Tensor:
        h = self.neck(torch.tanh(self.trunk(x.flatten(1))).detach())
        if not torch.isfinite(h).all():
            raise ValueError("non-finite features")
        return self.fc(h)


def test_purview_keeps_a_neck_on_a_detached_trunk_on_the_closed_forms(batch: Tensor) -> None:
    # A rule that took inputs without a path to x for constants sent the neck and head to torch.func, where the
    # data-dependent check failed; the sparse buffer crashed the lookup of the model's own storage.
    torch.manual_seed(0)
    model = _NeckOnAFrozenTrunk().double()
    torch.testing.assert_close(purview_layer_norms(model, batch), _purview_loop(model, batch), **REF)


class _WeightsUsedElsewhere(nn.Module):
    """Closed-form layers the hooks cannot see whole: a convolution whose weight a functional call reuses, a
    Linear tied (transposed) to a decoder, and a Linear called with its input as a keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.enc, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, 3), nn.Linear(2, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x))
        h = torch.tanh(F.conv2d(h, self.conv.weight, self.conv.bias, padding=1)).mean(dim=(2, 3))
        h = h + F.linear(torch.tanh(self.enc(h)), self.enc.weight.T)
        return self.head(input=h)


def test_purview_falls_back_for_weights_used_outside_their_layer(batch: Tensor) -> None:
    torch.manual_seed(0)
    model = _WeightsUsedElsewhere().double()
    expected = _purview_loop(model, batch)
    torch.testing.assert_close(purview_layer_norms(model, batch), expected, **REF)


def test_purview_is_exact_with_a_users_forward_hook_that_replaces_an_output(tiny: TinyCNN, batch: Tensor) -> None:
    # The closed forms need the gradient w.r.t. the layer's own output, not w.r.t. what a user's hook returns.
    tiny.trunk[3].register_forward_hook(lambda module, inputs, output: 2.0 * output)
    tiny.trunk[4].register_forward_pre_hook(lambda module, inputs: (inputs[0] - 0.5,))
    expected = _purview_loop(tiny, batch)
    torch.testing.assert_close(purview_layer_norms(tiny, batch), expected, **REF)
    torch.testing.assert_close(purview_layer_norms(tiny, batch, method="vmap"), expected, **REF)


class _ScalarScale(TinyCNN):
    """TinyCNN whose logits are multiplied by a learnable 0-dim parameter of the root module (torch.func route)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * super().forward(x)


def test_purview_scores_a_layer_never_called_without_torch_func(
    tiny: TinyCNN, batch: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The absent head of a method=absent model: forward(x) never calls it, so its gradient is zero.
    add_absent_head(tiny)
    tiny.double()
    expected = _purview_loop(tiny, batch)
    assert expected[:, -1].abs().max() == 0
    fell_back: list[list[str]] = []
    vmap_sq_norms = purview._vmap_sq_norms

    def recorded(model: nn.Module, x: Tensor, layers: list, everywhere: bool = True) -> Tensor:
        fell_back.append([name for name, _ in layers])
        return vmap_sq_norms(model, x, layers, everywhere)

    monkeypatch.setattr(purview, "_vmap_sq_norms", recorded)
    torch.testing.assert_close(purview_layer_norms(tiny, batch), expected, **REF)
    assert fell_back == []
    # Frozen, its weights are in no graph: a use outside its calls would go unseen, so torch.func decides.
    tiny.absent_fc.requires_grad_(False)
    torch.testing.assert_close(purview_layer_norms(tiny, batch), expected, **REF)
    assert fell_back == [["absent_fc"]]
    # Trainable and used outside its calls (its bias added to the logits): torch.func, and the use counts.
    tiny.absent_fc.requires_grad_(True)
    forward = tiny.forward
    monkeypatch.setattr(tiny, "forward", lambda x: forward(x) + tiny.absent_fc.bias)
    torch.testing.assert_close(purview_layer_norms(tiny, batch), _purview_loop(tiny, batch), **REF)
    assert fell_back[-1] == ["absent_fc"]


def test_purview_takes_a_scalar_parameter(batch: Tensor) -> None:
    torch.manual_seed(0)
    model = _ScalarScale().double().eval()
    assert purview_layer_names(model)[0] == ""
    expected = _purview_loop(model, batch)
    torch.testing.assert_close(purview_layer_norms(model, batch), expected, **REF)
    torch.testing.assert_close(purview_layer_norms(model, batch, method="vmap"), expected, **REF)


def test_purview_names_full_backward_hooks_that_torch_func_cannot_run_through(batch: Tensor) -> None:
    torch.manual_seed(0)
    tiny = TinyCNN().double().eval()  # no absent head: its layers all have closed forms, and all are called
    tiny.fc.register_full_backward_hook(lambda module, grad_input, grad_output: None)
    expected = _purview_loop(tiny, batch)
    torch.testing.assert_close(purview_layer_norms(tiny, batch), expected, **REF)  # closed forms: no torch.func
    with pytest.raises(ValueError, match=r"method='vmap'.*full backward hooks.*remove them while scoring, or use"):
        purview_layer_norms(tiny, batch, method="vmap")
    tiny.trunk[1] = Scale(4).double()  # no closed form: the hooks route sends it to torch.func
    tiny.trunk[0].register_full_backward_pre_hook(lambda module, grad_output: None)
    with pytest.raises(ValueError, match=r"method='hooks' sends it trunk.1\).*full backward hooks.*while scoring$"):
        build("purview")(tiny, batch)


class Checkpointed(TinyCNN):
    """TinyCNN whose trunk runs under non-reentrant activation checkpointing (saved-tensor hooks)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.utils.checkpoint.checkpoint(self.trunk, x, use_reentrant=False))


def test_purview_names_activation_checkpointing_that_torch_func_cannot_run_through(batch: Tensor) -> None:
    # torch.func's own error said nothing of the fix (a DenseNet with memory_efficient=True checkpoints).
    torch.manual_seed(0)
    model = Checkpointed().double().eval()
    expected = _purview_loop(model, batch)
    torch.testing.assert_close(purview_layer_norms(model, batch), expected, **REF)  # closed forms: no torch.func
    with pytest.raises(
        ValueError, match=r"method='vmap'.*saved-tensor hooks.*use_reentrant=False.*or use method=hooks"
    ):
        purview_layer_norms(model, batch, method="vmap")
    model.trunk[1] = Scale(4).double()  # no closed form: the hooks route sends it to torch.func
    with pytest.raises(ValueError, match=r"method='hooks' sends it trunk.1\).*saved-tensor hooks.*while scoring$"):
        build("purview")(model, batch)


def test_purview_refuses_train_mode_batchnorm(tiny: TinyCNN, batch: Tensor) -> None:
    tiny.train()
    state = copy.deepcopy(tiny.state_dict())
    with pytest.raises(ValueError, match="eval-mode BatchNorm2d"):
        purview_layer_norms(tiny, batch)
    for key, value in tiny.state_dict().items():  # refused before a forward could update the running statistics
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    affine_free = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, affine=False), nn.Flatten(), nn.Linear(108, 4))
    with pytest.raises(ValueError, match="eval-mode BatchNorm2d"):  # no parameters, but it couples the samples
        purview_layer_norms(affine_free.double().train(), batch)
    with pytest.raises(ValueError, match="unknown purview method"):
        purview_layer_norms(tiny.eval(), batch, method="loop")  # type: ignore[arg-type]


def _dct_basis(subspace: str, channels: int, size: int | tuple[int, int], block: int) -> Tensor | None:
    """Explicit orthonormal basis (C*H*W, C*b*b) of a DCT block of (H, W) = ``size`` images, built with scipy as in
    hold-me-tight."""
    if subspace == "full":
        return None
    height, width = (size, size) if isinstance(size, int) else size
    rows = range(block) if subspace == "low" else range(height - block, height)
    cols = range(block) if subspace == "low" else range(width - block, width)
    columns = []
    for i in rows:
        for j in cols:
            dirac = np.zeros((height, width))
            dirac[i, j] = 1.0
            columns.append(scipy.fft.idctn(dirac, norm="ortho").reshape(-1))
    basis = torch.tensor(np.stack(columns, axis=1))
    return torch.kron(torch.eye(channels, dtype=torch.float64), basis)


def _deepfool_reference(
    model: Classifier, x: Tensor, basis: Tensor | None, top_k: int, overshoot: float, max_iter: int
) -> tuple[Tensor, list[int]]:
    """Per-sample subspace DeepFool in [0, 1] pixel space, structured like hold-me-tight's utils.py."""
    mean, std = model.input_mean.reshape(1, -1, 1, 1), model.input_std.reshape(1, -1, 1, 1)

    def f(z: Tensor) -> Tensor:
        return model((z - mean) / std)[0]

    margins, steps = [], []
    for xi in x:
        image = xi.unsqueeze(0) * std + mean
        ranked = f(image).detach().argsort(descending=True)[:top_k]
        r = torch.zeros_like(image)
        pert_image, label_pert, loop_i = image.clone(), ranked[0], 0
        while label_pert == ranked[0] and loop_i < max_iter:
            z = pert_image.clone().requires_grad_(True)
            fs = f(z)
            grad_orig = torch.autograd.grad(fs[ranked[0]], z, retain_graph=True)[0]
            pert, w = torch.tensor(math.inf, dtype=torch.float64), None
            for k in range(1, len(ranked)):
                w_k = torch.autograd.grad(fs[ranked[k]], z, retain_graph=True)[0] - grad_orig
                f_k = (fs[ranked[k]] - fs[ranked[0]]).detach()
                denom = w_k.norm() if basis is None else (basis.T @ w_k.reshape(-1)).norm()
                if f_k.abs() / denom < pert:
                    pert, w = f_k.abs() / denom, w_k
            if basis is not None:
                w = (basis @ (basis.T @ w.reshape(-1))).reshape(w.shape)
            r_i = torch.clamp(pert, min=1e-4) * w / w.norm()
            r, pert_image = r + r_i, pert_image + r_i
            label_pert = f(image + (1 + overshoot) * r).argmax()
            loop_i += 1
        margins.append(((1 + overshoot) * r).norm())
        steps.append(loop_i)
    return torch.stack(margins).detach(), steps


@pytest.mark.parametrize("subspace", ["full", "low", "high"])
def test_margin_matches_per_sample_deepfool_without_flips(subspace: str, tiny: TinyCNN, batch: Tensor) -> None:
    # The random tiny model is so non-linear at its (large) margins that no sample flips in 8 steps.
    basis = _dct_basis(subspace, 2, 8, 2)
    expected, _ = _deepfool_reference(tiny, batch, basis, top_k=4, overshoot=0.02, max_iter=8)
    margins = deepfool_margin(tiny, batch, subspace, block_size=2, top_k=4, max_iter=8)
    torch.testing.assert_close(margins, expected, **REF)
    assert (margins > 0).all()


@pytest.mark.parametrize("subspace", ["full", "low", "high"])
def test_margin_matches_per_sample_deepfool_with_flips(subspace: str, digits_model: tuple) -> None:
    # The trained digits model flips samples after different numbers of steps: exercises the freezing.
    model, x_id, x_noise = digits_model
    model = copy.deepcopy(model).double()
    x = torch.cat([x_id[:4], x_noise[:4]]).double()
    expected, steps = _deepfool_reference(model, x, _dct_basis(subspace, 1, 8, 2), top_k=6, overshoot=0.02, max_iter=20)
    assert len(set(steps)) > 1  # samples flip after different numbers of steps
    torch.testing.assert_close(deepfool_margin(model, x, subspace, block_size=2, top_k=6, max_iter=20), expected, **REF)


def test_margin_scorer_passes_every_setting_on(tiny: TinyCNN, batch: Tensor) -> None:
    # None of these is a default (the default block is 2 on 8x8 images).
    spec = {"name": "margin", "subspace": "low", "block_size": 4, "top_k": 3, "overshoot": 0.05, "max_iter": 5}
    expected, _ = _deepfool_reference(tiny, batch, _dct_basis("low", 2, 8, 4), top_k=3, overshoot=0.05, max_iter=5)
    torch.testing.assert_close(build(spec)(tiny, batch), expected, **REF)


def test_margin_default_block_is_the_quarter_image(tiny: TinyCNN, batch: Tensor) -> None:
    explicit = build({"name": "margin", "subspace": "low", "block_size": 2, "max_iter": 3})(tiny, batch)
    implicit = build({"name": "margin", "subspace": "low", "max_iter": 3})(tiny, batch)
    torch.testing.assert_close(implicit, explicit, **TIGHT)
    project = dct_projector("high", 8, 8, 2, torch.float64)
    v = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(project(project(v)), project(v))  # an orthogonal projector is idempotent...
    torch.testing.assert_close((project(v) * v).sum(), project(v).square().sum())  # ...and self-adjoint


def test_margin_settings_for_an_image_size_resolve_the_default_block() -> None:
    # results.json records these: block_size null said nothing of the block the scores were computed with.
    assert build({"name": "margin", "subspace": "low"}).settings_for((1, 8, 8))["block_size"] == 2
    # The reference scripts' blocks: 8 for MNIST (28 px) and CIFAR (32 px), 16 for ImageNet (224 px).
    assert [
        build({"name": "margin", "subspace": "high"}).settings_for((3, n, n))["block_size"] for n in (28, 32, 224)
    ] == [
        8,
        8,
        16,
    ]
    assert build({"name": "margin", "subspace": "low", "block_size": 3}).settings_for((1, 8, 8))["block_size"] == 3
    assert build("margin").settings_for((1, 8, 8))["block_size"] is None  # the full space has no block
    assert build("odin").settings_for((1, 8, 8)) == build("odin").settings()


@pytest.mark.parametrize("subspace", ["low", "high"])
def test_margin_subspaces_refuse_inputs_that_are_not_images(subspace: str) -> None:
    # On (N, D) vectors the 2-D DCT would run over (batch, features): with N == D it mixed the rows silently.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"images \(N, C, H, W\), got an input of shape \(6, 6\); use subspace='full'"):
        build({"name": "margin", "subspace": subspace, "max_iter": 1})(model, x)
    full = build({"name": "margin", "max_iter": 3})
    alone = torch.cat([full(model, x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(full(model, x), alone, **TIGHT)


# ----------------------------------------------------------------------------------------------------------
# Sign convention on a model trained on real data: ID digits 0-5 vs uniform noise, trained as the DOS/NTOM baseline
# (so that the absent scorer has its head); the recipe is bench/sign_check.py's, which prints the docs' table.


@pytest.fixture(scope="module")
def sign_check():
    spec = importlib.util.spec_from_file_location("bench_sign_check", ROOT / "bench" / "sign_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits_model(sign_check) -> tuple[SmallCNN, Tensor, Tensor]:
    model, x_id, x_noise, _ = sign_check.train_digits_model(test_images=80)
    return model, x_id, x_noise


SIGN_SPECS = [{"name": n} for n in ALL] + [{"name": "margin", "subspace": s} for s in ("low", "high")]


@pytest.mark.parametrize("spec", SIGN_SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_scorer_ranks_id_digits_above_noise(spec: dict, digits_model: tuple[SmallCNN, Tensor, Tensor]) -> None:
    model, x_id, x_noise = digits_model
    scorer = build(spec)
    scores_id, scores_noise = scorer(model, x_id), scorer(model, x_noise)
    truth = np.r_[np.ones(len(scores_id)), np.zeros(len(scores_noise))]
    auroc = roc_auc_score(truth, torch.cat([scores_id, scores_noise]).numpy())
    assert auroc > 0.5, f"{spec}: AUROC {auroc:.3f} (ID positive) - the score sign looks inverted"


# --------------------------------------------------------------------------------------------- the registry itself
def test_registry_refuses_duplicates_unknown_names_and_unknown_settings() -> None:
    toys: Registry = Registry("toy")

    @toys.register("one")
    def one(scale: float = 1.0, offset: int = 0) -> tuple[float, int]:
        return scale, offset

    @toys.register("kept")
    @dataclasses.dataclass
    class Kept:
        width: int = 1
        _calls: int = dataclasses.field(default=0, init=False)  # state, not a setting

    with pytest.raises(RegistryError, match=r"^toy 'one' is already registered$"):
        toys.register("one")(lambda: None)
    assert toys.build("one") == (1.0, 0)
    assert toys.build({"name": "one", "offset": 3}, offset=1, scale=2.0) == (2.0, 3)  # the spec's own settings win
    with pytest.raises(RegistryError, match=re.escape("unknown setting(s) bogus for toy 'one'; valid: scale, offset")):
        toys.build({"name": "one", "bogus": 1})
    with pytest.raises(RegistryError, match=re.escape("unknown toy '['one']'; known: kept, one")):
        toys.get(["one"])  # a YAML list where a name belongs: unhashable
    assert toys.settings("kept") == ["width"]
    with pytest.raises(RegistryError, match=re.escape("unknown setting(s) _calls for toy 'kept'; valid: width")):
        toys.build({"name": "kept", "_calls": 5})


def test_check_settings_types_and_bounds() -> None:
    hints = {"t": float, "n": int, "k": int | None, "m": list[int]}
    bounds = {"t": (">", 0.0), "n": (">=", 1), "k": (">=", 1)}
    check_settings({"t": 1e-9, "n": 1, "k": None, "m": (1, 2)}, hints, bounds)  # None: unset; a tuple is a list
    check_settings({"t": 1, "n": np.int64(2), "m": [10**400]}, hints, bounds)  # an int is a float and finite
    for values, message in [
        ({"t": 0.0}, "t=0.0 must be > 0.0"),
        ({"n": 0}, "n=0 must be >= 1"),
        ({"k": 0}, "k=0 must be >= 1"),
        ({"n": True}, "n=True is not an integer"),  # a YAML yes is no batch size
        ({"n": 2.0}, "n=2.0 is not an integer"),
        ({"n": "None"}, "n='None' is not an integer"),  # no "write null": n may not be null
        ({"k": "None"}, "k='None' is not an integer or None (YAML reads None as text: write null)"),
        ({"t": float("nan")}, "t=nan must be finite"),
    ]:
        with pytest.raises(SettingError, match=f"^{re.escape(message)}$"):
            check_settings(values, hints, bounds)


def test_bounds_judge_only_the_plain_numeric_settings() -> None:
    def reader(root: Path, name: str, width: int | str = 1, size: int | None = None, mode: str = "a") -> None: ...

    hints = plain_hints(reader)
    assert hints == {"name": str, "width": int | str, "size": int | None, "mode": str}  # not the Path
    assert numeric_bounds({"width": (">=", 1), "size": (">=", 1), "other": (">=", 0)}, hints) == {"size": (">=", 1)}


# ----------------------------------------------------------------------------------------------------------
# Non-square DCT blocks, DeepFool's floor and stuck rows, 2-D GAIA hooks, closed forms
# of BatchNorm1d/3d and multi-dimensional LayerNorm.


def _linear_image_model(channels: int, height: int, width: int, classes: int = 2, seed: int = 0) -> nn.Module:
    """A linear classifier on (N, C, H, W) images with a per-channel ``input_std`` buffer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, classes)).double().eval()
    model.register_buffer("input_std", torch.linspace(0.25, 0.75, channels, dtype=torch.float64))
    return model


@pytest.mark.parametrize(("subspace", "block"), [("full", None), ("low", 2), ("high", 2), ("high", 4), ("low", 4)])
def test_margin_of_a_linear_model_on_non_square_images_is_the_projected_distance(subspace: str, block: int) -> None:
    # On a linear two-class model one DeepFool step lands on the boundary: the margin is (1 + overshoot)·|gap| / ‖P w‖
    # with w the pixel-space gradient of the logit gap and P the projector on the DCT block (4x6 images: the rows and
    # columns of the block differ; block 4 is the whole height).
    channels, height, width = 2, 4, 6
    model = _linear_image_model(channels, height, width)
    x = torch.randn(5, channels, height, width, dtype=torch.float64)
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    logits = x.flatten(1) @ weight.T + bias
    label = logits.argmax(dim=1)
    gap = (logits[:, 1] - logits[:, 0]).abs()
    w = (weight[1] - weight[0]).reshape(channels, height, width) / model.input_std.reshape(-1, 1, 1)
    basis = _dct_basis(subspace, channels, (height, width), block)
    w_norm = w.norm() if basis is None else (basis.T @ w.reshape(-1)).norm()
    expected = 1.02 * gap / w_norm
    assert label.unique().numel() == 2  # both directions
    margins = deepfool_margin(model, x, subspace, block_size=block, overshoot=0.02, max_iter=3)
    torch.testing.assert_close(margins, expected, **REF)


def test_margin_default_block_is_a_quarter_of_the_shorter_side() -> None:
    # The docstring's rule: 16 from 224 px up, 8 from 28 px up, else a quarter of the shorter side, at least 1.
    from gradreg.scorers.margin import default_block_size

    sides = [(8, 16), (16, 8), (28, 300), (300, 30), (224, 500), (3, 3), (2, 224)]
    assert [default_block_size(*hw) for hw in sides] == [2, 2, 8, 8, 16, 1, 1]
    low = build({"name": "margin", "subspace": "low"})
    assert [low.settings_for((1, *hw))["block_size"] for hw in [(8, 16), (16, 8), (28, 300)]] == [2, 2, 8]


def test_margin_takes_the_1e4_floor_step_on_a_tied_boundary() -> None:
    # Tied top logits: the DeepFool ratio is 0, the step is the reference's floor max(0, 1e-4) along w/‖w‖, which flips
    # the label: the margin is (1 + overshoot)·1e-4 exactly.
    model = _linear_image_model(1, 2, 2)
    with torch.no_grad():
        model[1].bias.zero_()
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    margins = deepfool_margin(model, x, overshoot=0.02, max_iter=5)
    torch.testing.assert_close(margins, torch.full((3,), 1.02e-4, dtype=torch.float64), **REF)


@pytest.mark.parametrize("subspace", ["full", "low", "high"])
def test_margin_rows_without_a_direction_do_not_move(subspace: str) -> None:
    # A saturated model (every hidden ReLU off): the gradient of every logit gap is exactly zero, so DeepFool has no
    # direction to step in. Such rows do not move: margin 0, not NaN from 0 · (inf / 0).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 4)).double().eval()
    with torch.no_grad():
        model[1].bias.fill_(-100.0)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    margins = deepfool_margin(model, x, subspace, block_size=None if subspace == "full" else 2, max_iter=3)
    assert torch.equal(margins, torch.zeros(3, dtype=torch.float64))


def test_margin_refuses_a_single_class_model() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 1)).double().eval()
    with pytest.raises(ValueError, match="at least two classes"):
        deepfool_margin(model, torch.randn(2, 1, 2, 2, dtype=torch.float64))


class _VectorHead(Classifier):
    """A per-sample vector neck (Linear-BatchNorm1d-ReLU) between a flattened image and the head: 2-D hooked outputs."""

    def __init__(self) -> None:
        super().__init__(num_classes=3, feature_dim=6, in_channels=2)
        self.lin = nn.Linear(2 * 8 * 8, 6)
        self.bn = nn.BatchNorm1d(6)

    def features(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.lin(x.flatten(1))))


def _make_vector_head() -> _VectorHead:
    torch.manual_seed(0)
    model = _VectorHead().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_gaia_on_vector_outputs_takes_each_feature_as_a_channel(batch: Tensor) -> None:
    # Hooked outputs of shape (N, C): one position per channel. Per sample with plain autograd: GAIA-Z's r_c is 1 where
    # the gradient is non-zero (the ReLU zeroes some), GAIA-A's ā_c is the gradient itself over d² = mean_j |∂/∂h_j|.
    model = _make_vector_head()
    layers = [model.lin, model.bn]
    expected_z, expected_a = [], []
    for xi in batch:
        xi = xi.unsqueeze(0)
        pre = model.lin(xi.flatten(1))
        post = model.bn(pre)
        h = torch.relu(post)
        logits = model.fc(h)
        g_pre, g_post = torch.autograd.grad(logits.max(), [pre, post], retain_graph=True)
        ratios = torch.cat([g_pre != 0, g_post != 0], dim=1).double()
        expected_z.append(-ratios.square().mean())
        (g_h,) = torch.autograd.grad(torch.log_softmax(logits, dim=1).sum(), h, retain_graph=True)
        a_pre, a_post = torch.autograd.grad(h.sum(), [pre, post])
        expected_a.append(-(torch.cat([a_pre, a_post], dim=1).square() / g_h.abs().mean()).mean())
    z = gaia_z_score(model, batch, layers)
    assert ((-z > 0) & (-z < 1)).all()  # some, not all, entries are zero
    torch.testing.assert_close(z, torch.stack(expected_z).detach(), **REF)
    torch.testing.assert_close(gaia_a_score(model, batch, layers), torch.stack(expected_a).detach(), **REF)


def test_gaia_a_on_a_uniform_softmax_is_huge_not_infinite(tiny: TinyCNN, batch: Tensor) -> None:
    # A zero head gives a uniform softmax: Σ_c log p_c has zero gradient at the features, d = 0. The docstring's
    # contract: d² is clamped to the smallest normal float, a huge finite abnormality instead of inf or NaN.
    with torch.no_grad():
        tiny.fc.weight.zero_()
        tiny.fc.bias.zero_()
    scores = gaia_a_score(tiny, batch)
    assert torch.isfinite(scores).all()
    assert (scores < -1e250).all()


class _NormZoo(nn.Module):
    """BatchNorm1d on vectors and sequences, BatchNorm3d, GroupNorm and a LayerNorm over two dimensions (eps 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn3 = nn.BatchNorm3d(2)
        self.ln = nn.LayerNorm((2, 8 * 8), eps=0.5)
        self.gn = nn.GroupNorm(1, 2, eps=0.5)
        self.bn_seq = nn.BatchNorm1d(2)
        self.lin = nn.Linear(2 * 8 * 8, 5)
        self.bn_vec = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.bn3(x.unsqueeze(2))).squeeze(2)  # (N, 2, 1, 8, 8) through BatchNorm3d
        h = self.bn_seq(torch.tanh(self.ln(self.gn(h.flatten(2)))))  # (N, 2, 64): GroupNorm, LayerNorm over (2, 64)
        return self.fc(torch.tanh(self.bn_vec(self.lin(h.flatten(1)))))


def test_purview_closed_forms_of_batchnorm1d_3d_and_multi_dim_layernorm(
    batch: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = _NormZoo().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.eval()
    expected = _purview_loop(model, batch)

    def no_fallback(model: nn.Module, x: Tensor, layers: list, everywhere: bool = True) -> Tensor:
        raise AssertionError(f"closed-form layers took the torch.func route: {[n for n, _ in layers]}")

    monkeypatch.setattr(purview, "_vmap_sq_norms", no_fallback)  # every layer here has a closed form
    torch.testing.assert_close(purview_layer_norms(model, batch), expected, **REF)


def test_purview_sends_a_linear_with_an_extra_parameter_to_torch_func(batch: Tensor) -> None:
    # A Linear that owns a third parameter (used by a forward hook, as some adapters do): the closed form covers weight
    # and bias only, so the layer must take the torch.func route, which sees the extra parameter's gradient too.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    model[1].register_parameter("gain", nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64)))
    model[1].register_forward_hook(lambda m, inputs, out: out * m.gain)
    torch.testing.assert_close(purview_layer_norms(model, batch), _purview_loop(model, batch), **REF)


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet50"])
def test_gaia_layers_of_resnets_follow_their_batchnorms_into_syncbatchnorm(name: str) -> None:
    # DDP's sync_batchnorm turns every BatchNorm2d into a SyncBatchNorm: the official hooks are the same modules.
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(MODELS.build(name, num_classes=5))
    prefix = "trunk." if hasattr(model, "trunk") else ""
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    late = [m for n, m in norms if n.startswith((f"{prefix}layer3.", f"{prefix}layer4."))]
    assert late
    assert model.gaia_layers("a") == late
    z_hooks = [m for _, m in norms] if name == "resnet18_cifar" else [*late, getattr(model, "trunk", model).layer4]
    assert model.gaia_layers("z") == z_hooks


class _TiedRatios(nn.Module):
    """Three logits on 2-D inputs: f_0 = 0, f_1 = x_0 − 1 (linear), f_2 = 2·tanh(x_1) − 2 (saturating)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([0.0 * x[:, 0], x[:, 0] - 1.0, 2.0 * torch.tanh(x[:, 1]) - 2.0], dim=1)


def test_margin_first_ranked_class_wins_a_tied_deepfool_ratio() -> None:
    # At x = 0 both other classes have the ratio |gap| / ‖∇gap‖ = 1/1 = 2/2 = 1 exactly. The reference (strict <)
    # takes the first ranked one, class 1, whose linear boundary one step of length 1 reaches: margin (1 + 0.02) · 1.
    # Class 2's saturating boundary would need more (and longer) steps.
    x = torch.zeros(2, 2, dtype=torch.float64)
    margins = deepfool_margin(_TiedRatios(), x, overshoot=0.02, max_iter=10)
    torch.testing.assert_close(margins, torch.full((2,), 1.02, dtype=torch.float64), **REF)


def test_purview_ghost_cost_counts_tokens_and_groups() -> None:
    # Ghost norms cost T²·(K + O) per group against T·K·O for the gradient (module constants' docstring).
    # Linear(4, 3) on 100 tokens: 100·7 > 12; Linear(64, 64) on 4 tokens: 4·128 <= 4096.
    assert not purview._ghost_is_cheaper(nn.Linear(4, 3), torch.empty(2, 100, 3))
    assert purview._ghost_is_cheaper(nn.Linear(64, 64), torch.empty(2, 4, 64))
    # Depthwise 3x3 conv on 2x2 maps: K = 9, O = 1 per group, T = 4: 4·10 > 9.
    assert not purview._ghost_is_cheaper(nn.Conv2d(64, 64, 3, padding=1, groups=64), torch.empty(2, 64, 2, 2))
