"""gradreg.double_backward.conv: derivatives of every order against finite differences, the kernels its
double backward runs, parameter gradients skipped when unused, paddings, autocast and eval mode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from gradreg.double_backward import use_double_backward
from gradreg.double_backward.conv import DoubleBackwardConv2d

F64 = torch.float64

CONVS = {
    "2d-stride-bias": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (3, 4, 7, 6)),
    "2d-dilation-groups": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False), (3, 4, 6, 6)),
    "2d-reflect-uncovered": (
        lambda: nn.Conv2d(4, 3, (3, 2), stride=2, padding=1, padding_mode="reflect"), (2, 4, 6, 7)
    ),
    "2d-circular": (lambda: nn.Conv2d(4, 3, 3, padding=1, padding_mode="circular"), (2, 4, 5, 5)),
    "1d": (lambda: nn.Conv1d(4, 3, 3, stride=2, padding=1), (3, 4, 9)),
    "3d": (lambda: nn.Conv3d(4, 2, 2, padding=1, bias=False), (2, 4, 3, 3, 3)),
}  # fmt: skip


def converted(name: str) -> tuple[nn.Module, nn.Module, Tensor]:
    """(PyTorch's layer, its converted copy, an input), float64, train mode."""
    torch.manual_seed(0)
    build, shape = CONVS[name]
    native = build().to(F64).train()
    return native, use_double_backward(copy.deepcopy(native)), torch.randn(*shape, dtype=F64)


def as_function(layer: nn.Module) -> tuple:
    names = [n for n, _ in layer.named_parameters()]

    def f(x: Tensor, *params: Tensor) -> Tensor:
        return functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    return f, [p.detach().clone().requires_grad_(True) for p in layer.parameters()]


@pytest.mark.parametrize("name", CONVS)
def test_first_second_and_third_derivatives_match_finite_differences(name: str) -> None:
    _, layer, x = converted(name)
    f, params = as_function(layer)
    inputs = (x.requires_grad_(True), *params)
    assert torch.autograd.gradcheck(f, inputs, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(f, inputs, atol=1e-8, rtol=1e-6)

    def input_grad(x: Tensor, gy: Tensor, *params: Tensor) -> Tensor:  # the differentiated backward itself
        return torch.autograd.grad(f(x, *params), x, gy, create_graph=True)[0]

    gy = torch.randn_like(f(x, *params)).requires_grad_(True)
    assert torch.autograd.gradgradcheck(input_grad, (x, gy, *params), atol=1e-8, rtol=1e-6)


def penalty_step(layer: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """A GReg-like objective (output energy + input-gradient norm) and its parameter gradients."""
    x = x.clone().requires_grad_(True)
    e = layer(x).flatten(1).logsumexp(dim=1)
    (g,) = torch.autograd.grad(e.sum(), x, create_graph=True)
    loss = e.mean() + g.flatten(1).norm(dim=1).mean()
    return loss, list(torch.autograd.grad(loss, list(layer.parameters())))


@pytest.mark.parametrize("name", CONVS)
def test_penalty_gradients_equal_pytorch(name: str) -> None:
    native, fast, x = converted(name)
    assert type(fast) is not type(native)
    assert isinstance(fast, type(native))
    loss_native, grads_native = penalty_step(native, x)
    loss_fast, grads_fast = penalty_step(fast, x)
    torch.testing.assert_close(loss_fast, loss_native, rtol=1e-13, atol=0)
    for g_fast, g_native in zip(grads_fast, grads_native, strict=True):
        torch.testing.assert_close(g_fast, g_native, rtol=1e-10, atol=1e-13)


class ConvCalls(TorchDispatchMode):
    """Records the weight shape and output mask of every ATen convolution / convolution backward."""

    def __init__(self) -> None:
        super().__init__()
        self.forward: list[tuple[int, ...]] = []
        self.backward: list[list[bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.forward.append(tuple(args[1].shape))
        elif func is torch.ops.aten.convolution_backward.default:
            self.backward.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("convert", [True, False], ids=["ours", "pytorch"])
def test_double_backward_runs_ordinary_kernels_and_skips_unused_weight_gradients(convert: bool) -> None:
    native, fast, x = converted("2d-stride-bias")
    layer = fast if convert else native
    x.requires_grad_(True)
    y = layer(x)
    with ConvCalls() as first:
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert first.backward == [[True, False, False]]  # input gradient only, as PyTorch's own node
    with ConvCalls() as second:
        g.square().sum().backward()
    weight_shape = tuple(layer.weight.shape)
    if convert:  # a forward convolution with the layer's weight and ordinary weight gradients
        assert second.forward == [weight_shape]
        assert all(mask[1] for mask in second.backward)
    else:  # PyTorch: the weight term as a convolution whose filter is the output gradient
        assert any(shape != weight_shape for shape in second.forward)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_parameter_gradients_under_create_graph_when_asked_for() -> None:
    native, fast, x = converted("2d-stride-bias")
    for how in ("grad", "backward"):
        results = []
        for layer in (native, fast):
            xx = x.clone().requires_grad_(True)
            params = list(layer.parameters())
            if how == "grad":  # PyTorch refuses to say whether a captured leaf is used: we must assume it is
                grads = torch.autograd.grad(layer(xx).square().sum(), [xx, *params], create_graph=True)
            else:
                layer(xx).square().sum().backward(create_graph=True, inputs=[xx, *params])
                grads = [xx.grad, *(p.grad for p in params)]
                layer.zero_grad(set_to_none=True)
            # differentiate them again, so that any error in the weight path shows
            results.append(torch.autograd.grad(sum(g.square().sum() for g in grads), [xx, *params]))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_string_padding_and_eval_mode_use_pytorch_forward() -> None:
    torch.manual_seed(0)
    same = use_double_backward(nn.Conv2d(2, 2, 3, padding="same")).train()
    assert isinstance(same, DoubleBackwardConv2d)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    assert type(same(x).grad_fn).__name__ == "ConvolutionBackward0"
    _, fast, x = converted("2d-stride-bias")
    x.requires_grad_(True)
    assert type(fast(x).grad_fn).__name__ == "_ConvolutionBackward"
    assert type(fast.eval()(x).grad_fn).__name__ == "ConvolutionBackward0"


def test_bf16_autocast_keeps_dtypes_and_matches_pytorch() -> None:
    native, fast, x = converted("2d-stride-bias")
    native, fast, x = native.float(), fast.float(), x.float()
    results = []
    for layer in (native, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            loss, grads = penalty_step(layer, x)
        assert y.dtype == torch.bfloat16
        assert [g.dtype for g in grads] == [torch.float32] * len(grads)
        results.append((loss, grads))
    (loss_native, grads_native), (loss_fast, grads_fast) = results
    # same bf16 kernels on the same bf16 values: equal up to the order of float32 accumulation
    torch.testing.assert_close(loss_fast, loss_native, rtol=1e-2, atol=0)
    for g_fast, g_native in zip(grads_fast, grads_native, strict=True):
        assert float((g_fast - g_native).norm() / g_native.norm()) < 2e-2


def test_autocast_leaves_float64_layers_alone_as_pytorch() -> None:
    # Autocast casts no float64 tensor (nor does PyTorch's convolution under it): same dtype, same values.
    native, fast, x = converted("2d-stride-bias")
    results = []
    for layer in (native, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == F64
            results.append(penalty_step(layer, x))
    (loss_native, grads_native), (loss_fast, grads_fast) = results
    torch.testing.assert_close(loss_fast, loss_native, rtol=1e-13, atol=0)
    for g_fast, g_native in zip(grads_fast, grads_native, strict=True):
        torch.testing.assert_close(g_fast, g_native, rtol=1e-10, atol=1e-13)
