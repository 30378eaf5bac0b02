"""Classifiers with one interface: ``features(x) -> (N, D)``, a linear head ``fc``, ``forward = fc(features)``.

Every scorer, loss and sampler in gradreg talks to a model only through this interface, so any
``nn.Module`` that exposes ``features`` and ``fc`` works (see :class:`Classifier`).

Input normalization belongs to the data pipeline (as in the official GReg code), so input gradients
are taken with respect to the *normalized* input. The model carries the normalization constants as
buffers (``input_mean``, ``input_std``) only so that scorers and attacks that work in pixel units
(ODIN's epsilon, adversarial epsilons, DeepFool margins) can convert; they are saved in checkpoints.

Model zoo (registry name: architecture, feature size D):

- ``small_cnn``: three conv-BN-ReLU blocks, for 8x8 digits and 28x28 Fashion-MNIST (D = 4 * width).
- ``wrn40_2``: WideResNet-40-2, Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016,
  arXiv:1605.07146, in the pre-activation form of the Outlier Exposure / energy-OOD code
  (github.com/hendrycks/outlier-exposure, github.com/wetliu/energy_ood) (D = 128).
- ``resnet18_cifar``: ResNet-18, He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
  arXiv:1512.03385, with the usual CIFAR stem (3x3 conv, no max-pool) (D = 512).
- ``densenet_bc_100``: DenseNet-BC (L = 100, k = 12), Huang et al., "Densely Connected Convolutional
  Networks", CVPR 2017, arXiv:1608.06993, as used by the ODIN/energy/DOS/GReg code ("densenet101") (D = 342).
- ``resnet50``, ``densenet121``: the torchvision ImageNet models (optionally with torchvision weights)
  wrapped into :class:`Classifier` (D = 2048 and 1024).

Any other classifier whose forward ends in an ``nn.Linear`` (every torchvision family) gets the interface from
:class:`SplitHead`.

torchvision's in-place ReLUs are switched to out-of-place ones (same outputs). The scorers would not need
this: GAIA and purview read gradients through tensor hooks on the values layers return, which in-place ops
later on do not affect (tested in ``tests/test_scorers.py``); the training benchmarks were measured this way.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from torchvision.models import densenet as tv_densenet
from torchvision.models import resnet as tv_resnet

from gradreg.registry import Registry

MODELS: Registry[Classifier] = Registry("model")

logger = logging.getLogger(__name__)


class Classifier(nn.Module):
    """Base class: subclasses build their trunk and implement :meth:`features`.

    Args:
        num_classes: number of logits of the head.
        feature_dim: size of the penultimate (pooled) feature vector, the input of ``fc``.
        in_channels: number of input channels (size of the normalization buffers).
    """

    def __init__(self, num_classes: int, feature_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(feature_dim, num_classes)
        self.register_buffer("input_mean", torch.zeros(in_channels))
        self.register_buffer("input_std", torch.ones(in_channels))

    def features(self, x: Tensor) -> Tensor:
        """Return the pooled penultimate feature vector, shape (N, D)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Return logits, shape (N, num_classes)."""
        return self.fc(self.features(x))

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Record the per-channel normalization the data pipeline applies to inputs."""
        if not len(mean) == len(std) == self.input_mean.numel():
            raise ValueError(
                f"the data has {len(mean)} input channel(s) but the model takes {self.input_mean.numel()}; set the "
                f"model's in_channels (model.arch_kwargs) to {len(mean)}"
            )
        self.input_mean.copy_(torch.as_tensor(mean, dtype=self.input_mean.dtype))
        self.input_std.copy_(torch.as_tensor(std, dtype=self.input_std.dtype))


class SplitHead(nn.Module):
    """Any classifier whose forward ends in an ``nn.Linear``, with the interface the scorers read.

    The head layer becomes ``fc`` and is replaced inside ``net`` by ``nn.Identity``, so ``features(x) = net(x)`` is
    the head's input and ``forward`` computes what ``net`` did. This holds when the head is the last operation of
    ``net``'s forward, as in every torchvision classifier (ResNet, MobileNet, EfficientNet, ConvNeXt, Swin, ViT, ...).
    Load ``net``'s weights before wrapping: the state-dict keys change (``trunk.``, ``fc.``).

    Args:
        net: the classifier; modified in place (its head is moved out).
        head: dotted name of the head inside ``net``, e.g. ``"heads.head"``; default: the last ``nn.Linear`` that
            ``net`` registers.
    """

    def __init__(self, net: nn.Module, head: str | None = None) -> None:
        super().__init__()
        if head is None:
            linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(
                    f"{type(net).__name__} has no nn.Linear to use as the head; odin, margin, purview and (given "
                    "BatchNorm or GroupNorm layers) gaia_z score the model as it is, the others need a linear head"
                )
            head = linears[-1]
        layer = net.get_submodule(head)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"head '{head}' is a {type(layer).__name__}, not an nn.Linear; pass the last linear layer")
        parent, _, name = head.rpartition(".")
        setattr(net.get_submodule(parent), name, nn.Identity())
        self.fc = layer
        self.trunk = net

    def features(self, x: Tensor) -> Tensor:
        """The input of the head, shape (N, D)."""
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits, shape (N, num_classes)."""
        return self.fc(self.features(x))


def add_absent_head(model: Classifier) -> None:
    """Give ``model`` the extra "absent" class of DOS/NTOM as a head of its own, ``model.absent_fc``.

    Chen et al., "ATOM: Robustifying Out-of-distribution Detection Using Outlier Mining", ECML-PKDD 2021; Jiang et
    al., "Diverse Outlier Sampling", ICLR 2024. ``model.fc`` keeps the K ID classes, so ``model(x)``, every scorer
    and every attack see a K-way classifier (energy-style scores use the K ID logits); training and the samplers
    append the (K+1)-th logit (:func:`logits_with_absent`) and the ``absent`` scorer reads it.
    """
    fc = model.fc
    model.absent_fc = nn.Linear(fc.in_features, 1, device=fc.weight.device, dtype=fc.weight.dtype)
    nn.init.zeros_(model.absent_fc.bias)  # as _init_weights does for every linear bias


def logits_with_absent(model: nn.Module, features: Tensor) -> Tensor:
    """``model.fc(features)``, with the absent logit as an extra last column when the model has that head."""
    logits = model.fc(features)
    head = getattr(model, "absent_fc", None)
    return logits if head is None else torch.cat([logits, head(features)], dim=1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Put every module of ``model`` in eval mode and restore each one's own flag afterwards; yields the modules.

    ``model.train(was_training)`` would not do: it sets every submodule, so a BatchNorm frozen in eval mode
    inside a training model would come back training (and update its statistics at the next step).
    """
    modules = list(model.modules())
    modes = [m.training for m in modules]
    # Setting a flag costs ~2 us per module (nn.Module.__setattr__): skip what is already right, which for a
    # model in eval mode (evaluate.py, the benchmarks) is everything.
    if any(modes):
        model.eval()
    try:
        yield modules
    finally:
        for m, mode in zip(modules, modes, strict=True):
            if m.training != mode:
                m.training = mode


def inference_weights_error(model: nn.Module, err: RuntimeError, user: str) -> Exception:
    """A one-line ValueError for autograd's refusal of a model loaded under ``torch.inference_mode()``, else ``err``.

    Its parameters and buffers are then inference tensors, which autograd can never use (unlike an input, they cannot
    be cloned without changing the model); autograd's own message names neither the model nor the fix. ``user``: who
    differentiates, e.g. ``"this scorer"``.
    """
    if "Inference tensors cannot be saved for backward" not in str(err):
        return err
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    name = next((name for name, t in tensors if t.is_inference()), None)
    if name is None:
        return err
    return ValueError(
        f"{type(model).__name__}'s parameters are inference tensors (created under torch.inference_mode(), e.g. "
        f"'{name}'), which {user} cannot differentiate through; load the model outside inference_mode, or pass "
        "copy.deepcopy(model) made outside it"
    )


def functional_call(module: nn.Module, params: Mapping[str, Tensor], args: tuple) -> Tensor:
    """``module(*args)`` with ``params`` (names of ``module.named_parameters()``) in place of those parameters.

    ``torch.func.functional_call`` with every attribute that holds one of them replaced once: a weight tied to
    another module's attribute is replaced there too, and a module registered under two names (a wrapper's
    ``self.fc = backbone.fc``) is replaced once. torch's own ``tie_weights`` does not restore such a module's second
    name (torch 2.14): its weights stayed replaced after the call (``functorch`` wrappers under ``vmap``).
    """
    named = dict(module.named_parameters())
    wanted = {id(named[name]): name for name in params}
    replaced: dict[str, Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for attr, p in owner.named_parameters(recurse=False):
            if id(p) in wanted and (id(owner), attr) not in seen:
                seen.add((id(owner), attr))
                replaced[f"{prefix}.{attr}" if prefix else attr] = params[wanted[id(p)]]
    return torch.func.functional_call(module, replaced, args, strict=False, tie_weights=False)


def _init_weights(module: nn.Module) -> None:
    """He-normal convolutions (fan-out), unit BatchNorm, zero linear bias (as in the WRN/DenseNet code)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _batchnorms(*modules: nn.Module) -> list[nn.Module]:
    """Every BatchNorm2d (or SyncBatchNorm: DDP's ``sync_batchnorm``) inside ``modules``, in module order."""
    return [m for module in modules for m in module.modules() if isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm)]


def _disable_inplace(module: nn.Module) -> None:
    """Switch every in-place activation (torchvision uses ``ReLU(inplace=True)``) to out-of-place."""
    for m in module.modules():
        if getattr(m, "inplace", False):
            m.inplace = False


@MODELS.register("small_cnn")
class SmallCNN(Classifier):
    """Three conv-BN-ReLU blocks and global average pooling; for 8x8 digits and 28x28 Fashion-MNIST.

    Args:
        num_classes: number of logits.
        in_channels: input channels (1 for grayscale).
        width: channels of the first block (doubled in each following block).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__(num_classes, feature_dim=4 * width, in_channels=in_channels)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.trunk = nn.Sequential(
            *block(in_channels, width),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def features(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.trunk(x)


class _WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus the shortcut.

    When the shape changes, the 1x1 shortcut convolution sees the *pre-activated* input (BN-ReLU(x)),
    as in the WRN code; otherwise the shortcut is the raw input.
    """

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(Classifier):
    """WideResNet-depth-k for 32x32 inputs (any size works; pooling is global).

    A 3x3 stem, three groups of pre-activation blocks (16k, 32k, 64k channels; strides 1, 2, 2), then
    BN-ReLU-global-average-pool gives the 64k-d feature.

    Args:
        depth: total depth, ``6n + 4``.
        widen_factor: width multiplier k.
        num_classes: number of logits.
        in_channels: input channels.
        dropout: dropout between the two convolutions of each block (0.3 in the energy-OOD WRN).
    """

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        super().__init__(num_classes, feature_dim=widths[3], in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            cin, cout = widths[g], widths[g + 1]
            blocks = [_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout) for i in range(n)]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        _init_weights(self)

    def features(self, x: Tensor) -> Tensor:  # noqa: D102
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)


@MODELS.register("wrn40_2")
def wrn40_2(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WideResNet-40-2 (2.2M parameters, 128-d features), the energy-OOD / OE backbone."""
    return WideResNet(40, 2, num_classes=num_classes, in_channels=in_channels, dropout=dropout)


class _BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@MODELS.register("resnet18_cifar")
class CifarResNet18(Classifier):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool); 512-d features.

    Args:
        num_classes: number of logits.
        in_channels: input channels.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(num_classes, feature_dim=512, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        _init_weights(self)

    def features(self, x: Tensor) -> Tensor:  # noqa: D102
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def gaia_layers(self, variant: str) -> list[nn.Module]:
        """GAIA's official CIFAR hooks: every BatchNorm for GAIA-Z, those of layer3 and layer4 for GAIA-A."""
        return _batchnorms(self) if variant == "z" else _batchnorms(self.layer3, self.layer4)


class _DenseBottleneck(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); the k new maps are concatenated to the input."""

    def __init__(self, cin: int, growth_rate: int) -> None:
        super().__init__()
        inter = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class _Transition(nn.Module):
    """BN-ReLU-conv1x1 (compression) then 2x2 average pooling."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(Classifier):
    """DenseNet-BC for 32x32 inputs (any size works; pooling is global).

    A 3x3 stem to 2k maps, three dense blocks of bottleneck layers joined by compressing transitions,
    then BN-ReLU-global-average-pool.

    Args:
        depth: total depth, ``6n + 4`` (n bottleneck layers per block).
        growth_rate: k, maps added by each layer.
        reduction: compression factor of the transitions.
        num_classes: number of logits.
        in_channels: input channels.
    """

    def __init__(
        self,
        depth: int = 100,
        growth_rate: int = 12,
        reduction: float = 0.5,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        if (depth - 4) % 6 != 0:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        channels = 2 * growth_rate
        stages: list[nn.Module] = []
        for stage in range(3):
            layers = []
            for _ in range(n):
                layers.append(_DenseBottleneck(channels, growth_rate))
                channels += growth_rate
            stages.append(nn.Sequential(*layers))
            if stage < 2:
                compressed = int(channels * reduction)
                stages.append(_Transition(channels, compressed))
                channels = compressed
        super().__init__(num_classes, feature_dim=channels, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 2 * growth_rate, 3, padding=1, bias=False)
        self.block1, self.trans1, self.block2, self.trans2, self.block3 = stages
        self.bn = nn.BatchNorm2d(channels)
        _init_weights(self)

    def features(self, x: Tensor) -> Tensor:  # noqa: D102
        x = self.trans1(self.block1(self.conv1(x)))
        x = self.block3(self.trans2(self.block2(x)))
        return F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)


@MODELS.register("densenet_bc_100")
def densenet_bc_100(num_classes: int = 10, in_channels: int = 3) -> DenseNetBC:
    """DenseNet-BC-100 with k = 12 (0.8M parameters, 342-d features), the DOS/GReg CIFAR backbone."""
    return DenseNetBC(100, 12, 0.5, num_classes=num_classes, in_channels=in_channels)


def _verify_weights(enum: type[WeightsEnum], weights: str | None) -> WeightsEnum | None:
    """Turn a torchvision weights name ("IMAGENET1K_V2", "DEFAULT") into the enum member."""
    if weights is None:
        return None
    try:
        return enum.verify(weights)
    except KeyError:
        known = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ValueError(f"unknown weights '{weights}' for {enum.__name__}; known: {known}") from None


@contextlib.contextmanager
def _fetching(weights: WeightsEnum) -> Iterator[None]:
    """Loading torchvision weights (from its cache, or downloaded): offline without a cache, one clear line."""
    try:
        yield
    except OSError as err:  # urllib's URLError is an OSError
        raise ValueError(
            f"cannot fetch the torchvision weights {weights} ({getattr(err, 'reason', None) or err}); fetch them once "
            "where there is a network (torchvision caches them under TORCH_HOME) or give model.pretrained a .ckpt file"
        ) from None


def _replace_input_conv(conv: nn.Conv2d, in_channels: int, pretrained: bool) -> nn.Conv2d:
    """A copy of the stem convolution for ``in_channels`` inputs.

    Pretrained RGB filters are summed over channels for grayscale input (the response to a gray image
    is unchanged) and cycled and rescaled by 3 / in_channels otherwise; random ones are re-initialized.
    """
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    if not pretrained:
        _init_weights(new)
        return new
    with torch.no_grad():
        w = conv.weight
        if in_channels == 1:
            new.weight.copy_(w.sum(dim=1, keepdim=True))
        else:
            idx = torch.arange(in_channels) % w.shape[1]
            new.weight.copy_(w[:, idx] * (w.shape[1] / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class _Bottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with an out-of-place residual add.

    torchvision's ``out += identity`` would overwrite the output of ``bn3``, which GAIA hooks.
    """

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@MODELS.register("resnet50")
class ResNet50(Classifier):
    """torchvision ResNet-50 as a :class:`Classifier` (2048-d features).

    Args:
        num_classes: number of logits; with ``weights`` and 1000 classes the pretrained head is kept,
            otherwise the head is freshly initialized.
        in_channels: input channels (pretrained stems are adapted, see :func:`_replace_input_conv`).
        weights: a torchvision ``ResNet50_Weights`` name (e.g. ``"IMAGENET1K_V2"``), or None for random
            weights. Named weights come from torchvision's cache (downloaded on first use).
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, weights: str | None = None) -> None:
        super().__init__(num_classes, feature_dim=2048, in_channels=in_channels)
        w = _verify_weights(tv_resnet.ResNet50_Weights, weights)
        trunk = tv_resnet.ResNet(_Bottleneck, [3, 4, 6, 3])
        if w is not None:
            with _fetching(w):
                trunk.load_state_dict(w.get_state_dict(progress=False, check_hash=True))
            if num_classes == trunk.fc.out_features:
                self.fc.load_state_dict(trunk.fc.state_dict())
        if in_channels != 3:
            trunk.conv1 = _replace_input_conv(trunk.conv1, in_channels, pretrained=w is not None)
        trunk.fc = nn.Identity()
        _disable_inplace(trunk)
        self.trunk = trunk

    def features(self, x: Tensor) -> Tensor:  # noqa: D102
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        x = t.layer4(t.layer3(t.layer2(t.layer1(x))))
        return t.avgpool(x).flatten(1)

    def gaia_layers(self, variant: str) -> list[nn.Module]:
        """GAIA's official "before head" hooks for ResNets, which its ImageNet runs use for both variants.

        The BatchNorms of layer3 and layer4, plus the layer4 output for GAIA-Z; GAIA-A's last hook only
        gives its denominator, which the pooled features give here (``gradreg.scorers.gaia``).
        """
        layers = _batchnorms(self.trunk.layer3, self.trunk.layer4)
        return [*layers, self.trunk.layer4] if variant == "z" else layers


@MODELS.register("densenet121")
class DenseNet121(Classifier):
    """torchvision DenseNet-121 as a :class:`Classifier` (1024-d features).

    Args:
        num_classes: number of logits; with ``weights`` and 1000 classes the pretrained head is kept,
            otherwise the head is freshly initialized.
        in_channels: input channels (pretrained stems are adapted, see :func:`_replace_input_conv`).
        weights: a torchvision ``DenseNet121_Weights`` name (e.g. ``"IMAGENET1K_V1"``), or None.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, weights: str | None = None) -> None:
        super().__init__(num_classes, feature_dim=1024, in_channels=in_channels)
        w = _verify_weights(tv_densenet.DenseNet121_Weights, weights)
        with _fetching(w):
            net = tv_densenet.densenet121(weights=w, progress=False)
        if w is not None and num_classes == net.classifier.out_features:
            self.fc.load_state_dict(net.classifier.state_dict())
        trunk = net.features
        if in_channels != 3:
            trunk.conv0 = _replace_input_conv(trunk.conv0, in_channels, pretrained=w is not None)
        _disable_inplace(trunk)
        self.trunk = trunk

    def features(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.adaptive_avg_pool2d(F.relu(self.trunk(x)), 1).flatten(1)


def create_classifier(name: str, num_classes: int, **kwargs: object) -> Classifier:
    """Build a registered classifier by name, e.g. ``create_classifier("wrn40_2", 10)``."""
    return MODELS.build(name, num_classes=num_classes, **kwargs)


_HEAD_PREFIXES = ("fc.", "absent_fc.")  # heads a fine-tuning run may re-initialize (add_absent_head)


def _clip(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def non_finite(state: Mapping[str, object]) -> str:
    """The floating-point tensors of ``state`` that hold a NaN or an infinity, as :func:`_clip` lists them ("" if none).

    Weights of a diverged run: they score every image NaN, so every metric would be NaN (with exit code 0).
    """
    bad = [k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point() and not v.isfinite().all()]
    return _clip(bad)


def load_error_reason(err: BaseException) -> str:
    """What a failed ``torch.load`` says went wrong: its first sentence, or "not a torch file".

    Torch's own errors are cut to their first sentence (it follows them with advice); a truncated archive gives
    :func:`load_weights_only`'s "cut short: ...". A file that is no torch file at all (random bytes, text, a .npy)
    fails in many ways: an unknown pickle opcode ("Unsupported operand", which torch reports as "Weights only load
    failed" with advice to drop ``weights_only``), a ``KeyError``, ``ValueError`` or ``IndexError``.
    """
    if isinstance(err, KeyError | ValueError | IndexError) or "Unsupported operand" in str(err):
        return "not a torch file"
    # torch's archive reader prefixes its reason with "[enforce fail at inline_container.cc:180] . "
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(err).strip())
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(err).__name__


def load_weights_only(source: str | os.PathLike[str]) -> object:
    """``torch.load(source, weights_only=True)`` onto the CPU, after checking the archive's CRC-32 checksums.

    torch reads tensor bytes without checking them: a checkpoint damaged on disk or in a copy (same size, a few bytes
    changed) would load as silently wrong weights. Reading the file once more costs about as much as loading it.

    Raises:
        zipfile.BadZipFile: a member of the archive fails its checksum ("... fails its CRC check"), or the archive is
            truncated ("cut short: ...").
    """
    with open(source, "rb") as file:
        zip_start = file.read(4) == b"PK\x03\x04"
    if zip_start and not zipfile.is_zipfile(source):  # else "[Errno 22] Invalid argument" for a small file
        raise zipfile.BadZipFile("cut short: the zip archive ends before its central directory")
    if zip_start:  # torch's format; a legacy file goes on to torch.load's own errors
        with zipfile.ZipFile(source) as archive:
            # torch.serialization.set_crc32_options(False) writes 0 for every member: no checksums to check
            damaged = archive.testzip() if any(info.CRC for info in archive.infolist()) else None
        if damaged is not None:
            raise zipfile.BadZipFile(f"damaged: {damaged} fails its CRC check")
    with warnings.catch_warnings():  # a plain pickle (no torch file) warns before it fails: the caller's line says why
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(source, map_location="cpu", weights_only=True)


def read_weights(source: str | os.PathLike[str]) -> Mapping[str, object]:
    """A checkpoint file read safely (:func:`load_weights_only`): a state dict or a Lightning one.

    Raises:
        ValueError: the file cannot be read as a weights-only checkpoint, or holds no mapping (one line naming it).
    """
    try:
        ckpt = load_weights_only(source)
    except Exception as err:  # unpickling errors are long and multi-line
        raise ValueError(
            f"{source}: cannot load as a weights-only checkpoint ({load_error_reason(err)}); pass a .ckpt, .pt or .pth "
            "file of the model's weights"
        ) from err
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{source}: expected a state dict or a Lightning checkpoint, got {type(ckpt).__name__}")
    return ckpt


def load_pretrained(
    model: nn.Module, source: str | os.PathLike[str], checkpoint: Mapping[str, object] | None = None
) -> list[str]:
    """Load weights from a checkpoint file into ``model`` (in place); returns the skipped head keys.

    ``source`` is a Lightning checkpoint (its ``state_dict`` holds the model under the ``model.``
    prefix; other entries are ignored) or a plain state dict, read with :func:`read_weights`; a caller that reads
    other entries too passes the file as read there as ``checkpoint`` (it is then not read again).
    Head parameters (``fc.*``, ``absent_fc.*``) whose shape differs from the model's, or that only one side has,
    are skipped with a warning (the model keeps its own): that is how a model is fine-tuned to a new number of
    classes, or a K-way checkpoint to ``method: absent`` and back. Torchvision weight names are handled by the model
    constructors (``weights=...``), not here.

    Raises:
        ValueError: the file cannot be read as a weights-only checkpoint, or any other key is missing,
            unexpected or of a different shape (one line naming the file and the mismatch).
    """
    ckpt = read_weights(source) if checkpoint is None else checkpoint
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        if not state:
            raise ValueError(f"{source}: Lightning checkpoint has no 'model.'-prefixed keys in its state_dict")
    else:
        state = dict(ckpt)
    odd = [repr(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if odd:  # weights_only reads ints, floats and other keys, which the checks below would trip on
        raise ValueError(f"{source}: holds entries that are no named tensors ({_clip(odd)}); pass the model's weights")
    bad = non_finite(state)
    if bad:
        raise ValueError(f"{source}: holds non-finite weights ({bad}): its run diverged; pass an earlier checkpoint")

    own = model.state_dict()
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    skipped = [k for k in [*mismatched, *missing, *unexpected] if k.startswith(_HEAD_PREFIXES)]
    mismatched, missing, unexpected = (
        [k for k in keys if k not in skipped] for keys in (mismatched, missing, unexpected)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_clip(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_clip(unexpected)}")
        if mismatched:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
            parts.append(f"shape mismatch (checkpoint vs model): {_clip(shapes)}")
        raise ValueError(
            f"{source}: does not match {type(model).__name__}: {'; '.join(parts)}; pass a checkpoint of the same "
            "model.arch and model.arch_kwargs (only the head may differ)"
        )
    if skipped:
        shape = lambda d, k: tuple(d[k].shape) if k in d else "none"  # noqa: E731
        logger.warning(
            "%s: head %s differs (%s in the checkpoint, %s in the model); keeping the model's (fine-tuning)",
            source,
            _clip(skipped),
            shape(state, skipped[0]),
            shape(own, skipped[0]),
        )
    model.load_state_dict({k: (own[k] if k in skipped else state[k]) for k in own})
    return skipped
