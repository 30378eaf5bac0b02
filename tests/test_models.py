"""Contract tests for every registered classifier, plus checkpoint loading (CPU, no downloads)."""

from __future__ import annotations

import logging
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from gradreg.models import (
    MODELS,
    Classifier,
    ResNet50,
    SplitHead,
    _replace_input_conv,
    add_absent_head,
    create_classifier,
    eval_mode,
    load_pretrained,
)

TORCHVISION = {"resnet50", "densenet121"}
FEATURE_DIM = {
    "small_cnn": 128,
    "wrn40_2": 128,
    "resnet18_cifar": 512,
    "densenet_bc_100": 342,
    "resnet50": 2048,
    "densenet121": 1024,
}


def image_size(name: str, small: bool = False) -> int:
    if name in TORCHVISION:
        return 32 if small else 64
    return 16 if small else 32


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("in_channels", [3, 1])
def test_features_and_logits_shapes(name: str, in_channels: int) -> None:
    model = create_classifier(name, 5, in_channels=in_channels).eval()
    assert isinstance(model, Classifier)
    x = torch.randn(2, in_channels, image_size(name), image_size(name))
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (2, model.fc.in_features)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, model.fc(feats))
    assert model.input_mean.shape == (in_channels,)
    if name in FEATURE_DIM:
        assert feats.shape[1] == FEATURE_DIM[name]


@pytest.mark.parametrize("name", MODELS.names())
def test_no_inplace_modules(name: str) -> None:
    model = create_classifier(name, 3)
    inplace = [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    assert not inplace, f"in-place modules break GAIA's gradient hooks: {inplace}"


@pytest.mark.parametrize("name", MODELS.names())
def test_double_backward_through_model_in_train_mode(name: str) -> None:
    model = create_classifier(name, 4).train()
    size = image_size(name, small=True)
    x = torch.randn(2, model.input_mean.numel(), size, size, requires_grad=True)
    logits = model(x)
    (grad_x,) = torch.autograd.grad(torch.logsumexp(logits, dim=1).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()
    weights = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in weights)
    assert weights[0].grad.abs().sum() > 0  # the stem gets a second-order gradient


def _save(tmp_path: Path, state: dict, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.mark.parametrize("name", MODELS.names())
def test_load_pretrained_round_trips_and_rejects_mismatch(name: str, tmp_path: Path) -> None:
    source = create_classifier(name, 4)
    target = create_classifier(name, 4)
    path = _save(tmp_path, source.state_dict())
    assert load_pretrained(target, path) == []
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)

    state = source.state_dict()
    first_key = next(k for k in state if not k.startswith("fc."))
    state.pop(first_key)
    state["not_a_layer.weight"] = torch.zeros(1)
    bad = _save(tmp_path, state, "bad.pt")
    with pytest.raises(ValueError, match="does not match") as err:
        load_pretrained(target, bad)
    message = str(err.value)
    assert "\n" not in message
    assert "bad.pt" in message
    assert first_key in message
    assert "not_a_layer.weight" in message
    assert message.endswith("pass a checkpoint of the same model.arch and model.arch_kwargs (only the head may differ)")


@pytest.mark.parametrize("width", [4, 32])
@pytest.mark.parametrize("kept", [0.5, 0.99])
def test_load_pretrained_says_why_a_truncated_file_fails_in_one_sentence(
    width: int, kept: float, tmp_path: Path
) -> None:
    # torch said "failed finding central directory" and a paragraph of advice; for a file of 13 kB, "[Errno 22]"
    model = create_classifier("small_cnn", 4, width=width)
    path = _save(tmp_path, model.state_dict())
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * kept)])
    with pytest.raises(ValueError, match="cannot load as a weights-only checkpoint") as err:
        load_pretrained(model, path)
    message = str(err.value)
    assert "(cut short: the zip archive ends before its central directory);" in message
    assert message.endswith("pass a .ckpt, .pt or .pth file of the model's weights")


@pytest.mark.parametrize("entry", [{"trunk.1.num_batches_tracked": 7}, {1: torch.zeros(1)}], ids=["int", "key"])
def test_load_pretrained_names_entries_that_are_no_named_tensors(entry: dict, tmp_path: Path) -> None:
    # weights_only reads them; an int value or key failed inside the shape checks with an AttributeError
    model = create_classifier("small_cnn", 4)
    path = _save(tmp_path, {**model.state_dict(), **entry})
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: holds entries that are no named tensors ({next(iter(entry))!r})")
    ):
        load_pretrained(model, path)


def test_load_pretrained_refuses_a_file_whose_bytes_fail_their_checksum(
    tmp_path: Path, damage_checkpoint: Callable[[Path, Path], str]
) -> None:
    good = _save(tmp_path, create_classifier("small_cnn", 4).state_dict())
    damaged = tmp_path / "damaged.pt"
    member = damage_checkpoint(good, damaged)
    # torch itself loads it: one weight silently differs
    loaded, saved = (torch.load(p, weights_only=True) for p in (damaged, good))
    assert sum(not torch.equal(loaded[k], saved[k]) for k in saved) == 1
    with pytest.raises(ValueError, match="fails its CRC check") as err:
        load_pretrained(create_classifier("small_cnn", 4), damaged)
    assert str(err.value) == (
        f"{damaged}: cannot load as a weights-only checkpoint (damaged: {member} fails its CRC check); pass a .ckpt, "
        ".pt or .pth file of the model's weights"
    )


@pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"), reason="torch >= 2.5 writes no-CRC files")
def test_load_pretrained_reads_a_file_saved_without_checksums(tmp_path: Path) -> None:
    source = create_classifier("small_cnn", 4)
    torch.serialization.set_crc32_options(False)
    try:
        path = _save(tmp_path, source.state_dict())
    finally:
        torch.serialization.set_crc32_options(True)
    target = create_classifier("small_cnn", 4)
    assert load_pretrained(target, path) == []
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())


def test_load_pretrained_refuses_a_plain_pickle_in_one_line_without_torch_warning(tmp_path: Path) -> None:
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps(create_classifier("small_cnn", 4).state_dict(), protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns of the pickle protocol before it fails
        with pytest.raises(ValueError, match="cannot load as a weights-only checkpoint") as err:
            load_pretrained(create_classifier("small_cnn", 4), path)
    assert "pickle protocol" not in str(err.value)


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"hello world\n", b""], ids=["bytes", "text", "empty"])
def test_load_pretrained_names_a_file_that_is_no_checkpoint_in_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot load as a weights-only checkpoint") as err:
        load_pretrained(create_classifier("small_cnn", 4), path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert "weights_only" not in message  # torch's advice to load it unsafely does not apply to random bytes
    assert ("(EOFError)" if not content else "(not a torch file)") in message
    assert message.endswith("pass a .ckpt, .pt or .pth file of the model's weights")


def test_load_pretrained_reads_lightning_checkpoints(tmp_path: Path) -> None:
    source = create_classifier("wrn40_2", 10)
    ckpt = {
        "epoch": 3,
        "state_dict": {**{f"model.{k}": v for k, v in source.state_dict().items()}, "ema.step": torch.tensor(1)},
    }
    target = create_classifier("wrn40_2", 10)
    load_pretrained(target, _save(tmp_path, ckpt))
    torch.testing.assert_close(target.fc.weight, source.fc.weight, rtol=0, atol=0)
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight, rtol=0, atol=0)


def test_load_pretrained_skips_a_head_of_another_size_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = create_classifier("wrn40_2", 10)
    target = create_classifier("wrn40_2", 100)
    head_before = target.fc.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="gradreg.models"):
        skipped = load_pretrained(target, _save(tmp_path, source.state_dict()))
    assert skipped == ["fc.weight", "fc.bias"]
    assert "fc.weight" in caplog.text
    torch.testing.assert_close(target.fc.weight, head_before, rtol=0, atol=0)
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight, rtol=0, atol=0)


def test_load_pretrained_between_k_way_and_absent_class_models(tmp_path: Path) -> None:
    # Fine-tuning a CE checkpoint as the DOS/NTOM baseline keeps its trained K-way head and adds a fresh absent head;
    # an absent-class checkpoint loads into a K-way model without its absent head.
    k_way = create_classifier("small_cnn", 4, in_channels=1)
    absent = create_classifier("small_cnn", 4, in_channels=1)
    add_absent_head(absent)
    fresh = absent.absent_fc.weight.detach().clone()
    assert load_pretrained(absent, _save(tmp_path, k_way.state_dict(), "k.pt")) == [
        "absent_fc.weight",
        "absent_fc.bias",
    ]
    torch.testing.assert_close(absent.fc.weight, k_way.fc.weight, rtol=0, atol=0)
    torch.testing.assert_close(absent.absent_fc.weight, fresh, rtol=0, atol=0)
    target = create_classifier("small_cnn", 4, in_channels=1)
    assert load_pretrained(target, _save(tmp_path, absent.state_dict(), "a.pt")) == [
        "absent_fc.weight",
        "absent_fc.bias",
    ]
    assert not hasattr(target, "absent_fc")
    torch.testing.assert_close(target.fc.weight, absent.fc.weight, rtol=0, atol=0)


def test_load_pretrained_rejects_a_trunk_shape_mismatch(tmp_path: Path) -> None:
    path = _save(tmp_path, create_classifier("wrn40_2", 10, in_channels=1).state_dict())
    with pytest.raises(ValueError, match=r"shape mismatch .*conv1\.weight \(16, 1, 3, 3\) vs \(16, 3, 3, 3\)"):
        load_pretrained(create_classifier("wrn40_2", 10), path)


def test_load_pretrained_rejects_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt: cannot load") as err:
        load_pretrained(create_classifier("small_cnn", 3), path)
    assert "\n" not in str(err.value)


def test_unknown_torchvision_weights_name_fails_before_download() -> None:
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET9K'.*IMAGENET1K_V2"):
        create_classifier("resnet50", 10, weights="IMAGENET9K")


@pytest.mark.parametrize(("name", "head"), [("resnet50", "fc"), ("densenet121", "classifier")])
def test_torchvision_weights_load_trunk_and_recreate_head(
    name: str, head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    reference = getattr(torchvision.models, name)()  # random 1000-class net standing in for the download
    fake_state = reference.state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: dict(fake_state))

    pretrained = create_classifier(name, 1000, weights="DEFAULT")
    torch.testing.assert_close(pretrained.fc.weight, getattr(reference, head).weight, rtol=0, atol=0)
    finetune = create_classifier(name, 7, weights="DEFAULT")
    assert finetune.fc.out_features == 7
    stem = "conv1.weight" if name == "resnet50" else "conv0.weight"
    trunk_state = finetune.trunk.state_dict()
    src_key = stem if name == "resnet50" else f"features.{stem}"
    torch.testing.assert_close(trunk_state[stem], fake_state[src_key], rtol=0, atol=0)

    gray = create_classifier(name, 7, in_channels=1, weights="DEFAULT")
    torch.testing.assert_close(gray.trunk.state_dict()[stem], fake_state[src_key].sum(1, keepdim=True))
    x = torch.rand(2, 1, 64, 64)
    gray.eval()
    finetune.eval()
    with torch.no_grad():  # a gray image gives the same features through the adapted stem
        torch.testing.assert_close(gray.features(x), finetune.features(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_resnet50_gaia_layers_are_the_batchnorms_of_layer3_and_layer4() -> None:
    model = create_classifier("resnet50", 10)
    assert isinstance(model, ResNet50)
    layers = model.gaia_layers("a")
    names = {n for n, m in model.named_modules() if any(m is layer for layer in layers)}
    assert all(isinstance(m, nn.BatchNorm2d) for m in layers)
    assert all(n.startswith(("trunk.layer3.", "trunk.layer4.")) for n in names)
    # 6 + 3 bottlenecks with 3 BN each, plus the downsample BN of each stage
    assert len(layers) == (6 + 3) * 3 + 2
    assert model.gaia_layers("z") == [*layers, model.trunk.layer4]  # GAIA-Z: the "before head" hook too


def test_wrn_dropout_is_active_only_in_train_mode() -> None:
    model = create_classifier("wrn40_2", 10, dropout=0.3)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))


def test_eval_mode_restores_each_modules_own_mode_even_on_error() -> None:
    model = create_classifier("small_cnn", 3, width=4).train()
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in frozen:  # fine-tuning with frozen BatchNorm statistics
        bn.eval()
    before = [m.training for m in model.modules()]

    def fail() -> None:
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail()
    assert frozen
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_torchvision_weights_offline_is_one_clear_error(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    import torchvision.models._api

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)  # what WeightsEnum calls
    with pytest.raises(ValueError, match=r"cannot fetch the torchvision weights .*name resolution.*\.ckpt file"):
        create_classifier(name, 10, weights="DEFAULT")


class _OfficialWideBlock(nn.Module):
    """BasicBlock of the official WRN code (github.com/xternalz/WideResNet-pytorch, used by OE and energy-OOD)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.equal_in_out:
            x = F.relu(self.bn1(x))
            out = F.relu(self.bn2(self.conv1(x)))
        else:
            out = F.relu(self.bn2(self.conv1(F.relu(self.bn1(x)))))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equal_in_out else self.conv_shortcut(x), out)


class _OfficialWideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        blocks = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                cin = channels[g] if i == 0 else channels[g + 1]
                blocks.append(_OfficialWideBlock(cin, channels[g + 1], stride if i == 0 else 1, drop_rate))
        self.blocks = nn.Sequential(*blocks)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))  # the official avg_pool2d(out, 8) at 32x32


def _load_by_order(reference: nn.Module, model: nn.Module, head: str) -> None:
    """Copy ``model``'s weights and statistics into ``reference``, pairing the trunk's tensors in registration order."""

    def split(state: dict, head: str) -> tuple[dict, dict]:
        body = {k: v for k, v in state.items() if not k.startswith((f"{head}.", "input_"))}
        return body, {k.removeprefix(f"{head}."): v for k, v in state.items() if k.startswith(f"{head}.")}

    body, fc = split(model.state_dict(), "fc")
    ref_body, _ = split(reference.state_dict(), head)
    assert [tuple(v.shape) for v in body.values()] == [tuple(v.shape) for v in ref_body.values()]
    state = dict(zip(ref_body, body.values(), strict=True))
    reference.load_state_dict({**state, **{f"{head}.{k}": v for k, v in fc.items()}})


def _assert_same_network(model: nn.Module, reference: nn.Module, head: str, size: int = 16) -> None:
    """Same logits and penultimate features in train and eval mode, same running statistics after a training forward;
    the input is not normalized inside the model (the data pipeline does that)."""
    torch.manual_seed(0)
    model.double()
    reference.double()
    with torch.no_grad():  # non-trivial statistics, so that eval mode and the BN momentum are checked too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.set_normalization([0.4, 0.5, 0.6], [0.2, 0.3, 0.4])
    _load_by_order(reference, model, head)
    seen = []
    getattr(reference, head).register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    for training in (True, False):
        model.train(training)
        reference.train(training)
        torch.manual_seed(1)
        features = model.features(x)
        torch.manual_seed(1)
        expected = reference(x)
        torch.testing.assert_close(model.fc(features), expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(features, seen[-1], rtol=1e-9, atol=1e-9)
        if training:  # running statistics (momentum 0.1) and num_batches_tracked
            ours = [v for k, v in model.state_dict().items() if not k.startswith(("fc.", "input_"))]
            theirs = [v for k, v in reference.state_dict().items() if not k.startswith(f"{head}.")]
            for a, b in zip(ours, theirs, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)  # forward = fc(features), no normalization


def test_wrn40_2_is_the_official_wide_resnet_with_dropout_between_the_convolutions() -> None:
    model = create_classifier("wrn40_2", 10, dropout=0.3)
    assert sum(p.numel() for p in model.parameters()) == 2_243_546  # WRN-40-2 for CIFAR-10 (OE / energy-OOD code)
    _assert_same_network(model, _OfficialWideResNet(40, 2, 10, 0.3), "fc")


def test_resnet18_cifar_is_torchvision_resnet18_with_the_cifar_stem() -> None:
    from torchvision.models import resnet18

    reference = resnet18(num_classes=10)
    reference.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    model = create_classifier("resnet18_cifar", 10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    _assert_same_network(model, reference, "fc")


def test_densenet_bc_100_is_torchvision_densenet_with_the_cifar_stem() -> None:
    from torchvision.models.densenet import DenseNet

    reference = DenseNet(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, bn_size=4, num_classes=10)
    reference.features.conv0 = nn.Conv2d(3, 24, 3, padding=1, bias=False)
    reference.features.norm0 = reference.features.relu0 = reference.features.pool0 = nn.Identity()
    model = create_classifier("densenet_bc_100", 10)
    assert sum(p.numel() for p in model.parameters()) == 769_162
    _assert_same_network(model, reference, "classifier")


@pytest.mark.parametrize(("name", "head"), [("resnet50", "fc"), ("densenet121", "classifier")])
def test_torchvision_wrappers_compute_torchvision_features(name: str, head: str) -> None:
    import torchvision

    reference = getattr(torchvision.models, name)(num_classes=10)
    _assert_same_network(create_classifier(name, 10), reference, head, size=32)


def test_convolutions_are_he_normal_with_fan_out_and_heads_start_with_zero_bias() -> None:
    torch.manual_seed(0)
    model = create_classifier("wrn40_2", 10)
    add_absent_head(model)
    conv = model.block2[0].conv1  # 32 -> 64 channels: fan-out 64 * 9 = 576, fan-in 288
    std = conv.weight.std().item()
    assert abs(std - (2 / 576) ** 0.5) < 0.1 * (2 / 576) ** 0.5
    assert torch.equal(model.fc.bias, torch.zeros(10))
    assert torch.equal(model.absent_fc.bias, torch.zeros(1))


def test_set_normalization_records_mean_and_std() -> None:
    model = create_classifier("small_cnn", 3, in_channels=2)
    model.set_normalization([0.4, 0.5], [0.25, 0.75])
    torch.testing.assert_close(model.input_mean, torch.tensor([0.4, 0.5]), rtol=0, atol=0)
    torch.testing.assert_close(model.input_std, torch.tensor([0.25, 0.75]), rtol=0, atol=0)


@pytest.mark.parametrize("in_channels", [1, 2, 6])
def test_pretrained_stem_for_other_channel_counts_sums_or_cycles_and_rescales_the_filters(in_channels: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 7, stride=2, padding=3)
    new = _replace_input_conv(conv, in_channels, pretrained=True)
    x = torch.rand(2, 3, 16, 16)
    if in_channels == 1:  # summed filters: a gray image responds as in RGB
        gray = x[:, :1]
        torch.testing.assert_close(new(gray), conv(gray.expand(-1, 3, -1, -1)))
    else:  # cycled filters, rescaled by 3 / C
        idx = torch.arange(in_channels) % 3
        torch.testing.assert_close(new.weight, conv.weight[:, idx] * (3 / in_channels))
        if in_channels == 6:  # the RGB image given twice responds as the RGB stem to it once
            torch.testing.assert_close(new(torch.cat([x, x], dim=1)), conv(x))
    torch.testing.assert_close(new.bias, conv.bias, rtol=0, atol=0)


def _small_torchvision(name: str) -> tuple[nn.Module, str]:
    """A small torchvision classifier and the dotted name of its head."""
    from torchvision.models import mobilenet_v3_small, resnet18, vision_transformer

    torch.manual_seed(0)
    if name == "resnet18":
        return resnet18(num_classes=5), "fc"
    if name == "mobilenet_v3":  # a hidden Linear before the head, inside the same Sequential
        return mobilenet_v3_small(num_classes=5), "classifier.3"
    # ViT: every MultiheadAttention's out_proj is an nn.Linear registered before the head
    return vision_transformer.VisionTransformer(16, 4, 2, 2, 8, 16, num_classes=5), "heads.head"


@pytest.mark.parametrize("given", [False, True], ids=["default head", "named head"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3", "vit"])
def test_split_head_finds_the_head_and_computes_what_the_classifier_did(name: str, given: bool) -> None:
    net, head = _small_torchvision(name)
    net.eval()
    layer = net.get_submodule(head)
    nn.init.normal_(layer.weight)  # ViT's head starts at zero
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
        model = SplitHead(net, head if given else None)
        features = model.features(x)
        logits = model(x)
    assert model.fc is layer
    assert features.shape == (3, layer.in_features)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_split_head_refuses_a_model_without_a_linear_head() -> None:
    with pytest.raises(
        ValueError,
        match=r"Sequential has no nn\.Linear to use as the head; odin, margin, purview and",
    ):
        SplitHead(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    with pytest.raises(ValueError, match=r"head '0' is a Conv2d, not an nn\.Linear"):
        SplitHead(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), head="0")
