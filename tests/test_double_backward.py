"""gradreg.double_backward: BatchNorm's closed form checked numerically, and GReg with the converted layers
equal to PyTorch's own (gradients, running statistics, bf16 and CUDA accuracy, purview).

Convolution-specific checks: ``test_double_backward_conv.py``."""

from __future__ import annotations

import copy
import functools
import itertools
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradreg.double_backward import original_type, use_double_backward
from gradreg.double_backward.batchnorm import (
    DoubleBackwardBatchNorm2d,
    _closed_form,
    _closed_form_fn,
    _compiled_closed_form,
    batch_norm_train,
    sync_batch_norm_train,
)
from gradreg.double_backward.conv import DoubleBackwardConv2d
from gradreg.losses import energy, energy_margin_loss, grad_norm_penalty
from gradreg.module import GradRegModule
from gradreg.scorers.purview import purview_layer_norms


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(5, 3, 4, 3), (7, 3), (4, 3, 6)], ids=["2d", "1d-vectors", "1d-sequences"])
def test_first_and_second_derivatives_match_finite_differences(affine: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(*shape, dtype=torch.float64) + 2).requires_grad_(True)  # a mean away from 0
    params = (torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)) if affine else ()
    params = tuple(p.requires_grad_(True) for p in params)

    def bn(x: Tensor, *wb: Tensor) -> Tensor:
        return batch_norm_train(x, None, None, *(wb or (None, None)), momentum=0.1, eps=1e-3)

    assert torch.autograd.gradcheck(bn, (x, *params), atol=1e-8, rtol=1e-6)
    # Differentiates the vector-Jacobian product (gx, gγ, gβ) w.r.t. x, γ, β and the upstream gradient.
    assert torch.autograd.gradgradcheck(bn, (x, *params), atol=1e-8, rtol=1e-6)


class ConvBN(nn.Module):
    """conv-BN-ReLU twice and a linear head; energies from its logits."""

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4, momentum=momentum),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2),
            nn.BatchNorm2d(6, momentum=momentum),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.BatchNorm1d(6, momentum=momentum),
            nn.Linear(6, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def greg_step_grads(model: nn.Module, x: Tensor, n_in: int) -> tuple[Tensor, list[Tensor]]:
    """Loss and parameter gradients of one GReg objective (energy margin loss + penalty), margins chosen so
    that both hinges are active for some rows."""
    x = x.clone().requires_grad_(True)
    e = energy(model(x))
    m_in, m_out = float(e[:n_in].detach().median()), float(e[n_in:].detach().median())
    loss = energy_margin_loss(e[:n_in], e[n_in:], m_in, m_out)
    loss = loss + grad_norm_penalty(x, e[:n_in], e[n_in:], m_in, m_out).value
    return loss, list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize(
    ("layers", "compile_setting"),
    [(("batchnorm",), "off"), (("batchnorm",), "on"), (("conv",), "auto"), (("batchnorm", "conv"), "auto")],
    ids=["batchnorm", "batchnorm-compiled", "conv", "batchnorm+conv"],
)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_greg_gradients_and_running_stats_equal_pytorch(
    layers: tuple[str, ...], compile_setting: str, momentum: float | None
) -> None:
    torch.manual_seed(0)
    native = ConvBN(momentum).double().train()
    fast = use_double_backward(copy.deepcopy(native), layers, batchnorm_compile=compile_setting)
    assert isinstance(fast.body[1], DoubleBackwardBatchNorm2d) == ("batchnorm" in layers)
    assert isinstance(fast.body[0], DoubleBackwardConv2d) == ("conv" in layers)
    assert isinstance(fast.body[1], nn.BatchNorm2d)
    assert isinstance(fast.body[0], nn.Conv2d)
    x = torch.randn(10, 2, 7, 7, dtype=torch.float64)
    for _ in range(2):  # the second step also checks the cumulative-average bookkeeping
        loss_native, grads_native = greg_step_grads(native, x, n_in=4)
        loss_fast, grads_fast = greg_step_grads(fast, x, n_in=4)
        torch.testing.assert_close(loss_fast, loss_native, rtol=1e-12, atol=0)
        for g_fast, g_native in zip(grads_fast, grads_native, strict=True):
            torch.testing.assert_close(g_fast, g_native, rtol=1e-9, atol=1e-12)
        for b_fast, b_native in zip(fast.buffers(), native.buffers(), strict=True):
            torch.testing.assert_close(b_fast, b_native, rtol=0, atol=0)  # the same kernels
    native.eval(), fast.eval()
    torch.testing.assert_close(fast(x), native(x), rtol=0, atol=0)


def errors_vs_float64(device: str, dtype: torch.dtype, channels_last: bool = False) -> tuple[float, float]:
    """Relative error of all GReg parameter gradients (PyTorch's layers, ours) against float64 on the CPU."""
    torch.manual_seed(0)
    native = ConvBN().train()
    x = torch.randn(10, 2, 7, 7)
    _, exact = greg_step_grads(copy.deepcopy(native).double(), x.double(), n_in=4)
    native, x = native.to(device), x.to(device)
    if channels_last:
        native, x = native.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    fast = use_double_backward(copy.deepcopy(native))
    errors = []
    for model in (native, fast):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            _, grads = greg_step_grads(model, x, n_in=4)
        assert [g.dtype for g in grads] == [p.dtype for p in model.parameters()]
        flat, ref = torch.cat([g.cpu().double().flatten() for g in grads]), torch.cat([g.flatten() for g in exact])
        errors.append(float((flat - ref).norm() / ref.norm()))
    return errors[0], errors[1]


def test_bf16_autocast_is_as_accurate_as_pytorch() -> None:
    native, fast = errors_vs_float64("cpu", torch.bfloat16)
    # bf16 activations are coarse on a model this small (native: ~25 % error); ours must not be worse.
    assert fast <= 1.25 * native


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_cuda_is_as_accurate_as_pytorch(dtype: torch.dtype, channels_last: bool) -> None:
    # No TF32: the two paths run different convolution kernels for the weight term, and cuDNN's default TF32
    # would compare its algorithm choices (FFT in float32 for PyTorch's) rather than the formulas.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        native, fast = errors_vs_float64("cuda", dtype, channels_last)
    assert fast <= 1.25 * native + 1e-6  # + 1e-6: float32 can be exact to rounding on both


def test_conversion_keeps_state_and_skips_subclasses() -> None:
    class MyNorm(nn.BatchNorm2d):
        pass

    class MyConv(nn.Conv2d):
        pass

    def build() -> nn.Sequential:
        return nn.Sequential(
            nn.BatchNorm2d(3), MyNorm(3), nn.BatchNorm1d(3), nn.SyncBatchNorm(3),
            nn.Conv2d(3, 3, 1), MyConv(3, 3, 1), nn.Conv1d(3, 3, 1), nn.ConvTranspose2d(3, 3, 1),
        )  # fmt: skip

    model = build()
    keys = list(model.state_dict())
    use_double_backward(model)
    assert [type(m).__name__ for m in model] == [
        "DoubleBackwardBatchNorm2d",
        "MyNorm",
        "DoubleBackwardBatchNorm1d",
        "DoubleBackwardSyncBatchNorm",
        "DoubleBackwardConv2d",
        "MyConv",
        "DoubleBackwardConv1d",
        "ConvTranspose2d",
    ]
    assert list(model.state_dict()) == keys
    assert [type(m).__name__ for m in use_double_backward(build(), ["conv"])][:5] == [
        "BatchNorm2d", "MyNorm", "BatchNorm1d", "SyncBatchNorm", "DoubleBackwardConv2d",
    ]  # fmt: skip


def test_converting_again_converts_new_layers_and_keeps_earlier_settings() -> None:
    # GradRegModule converts again at fit start, after DDP's sync_batchnorm replaced its BatchNorm layers.
    model = use_double_backward(nn.Sequential(nn.BatchNorm2d(3)), batchnorm_compile="off")
    model.append(nn.SyncBatchNorm(3))
    use_double_backward(model)
    assert [type(m).__name__ for m in model] == ["DoubleBackwardBatchNorm2d", "DoubleBackwardSyncBatchNorm"]
    assert [m.compile_setting for m in model] == ["off", "auto"]


def test_module_converts_only_when_the_penalty_is_on() -> None:
    def layer_types(module: GradRegModule) -> set[str]:
        kinds = (nn.modules.batchnorm._BatchNorm, nn.Conv2d)
        return {type(m).__name__ for m in module.model.modules() if isinstance(m, kinds)}

    assert layer_types(GradRegModule("wrn40_2", method="greg")) == {"DoubleBackwardBatchNorm2d", "DoubleBackwardConv2d"}
    assert layer_types(GradRegModule("wrn40_2", method="greg", reg_weight=0.0)) == {"BatchNorm2d", "Conv2d"}
    assert layer_types(GradRegModule("wrn40_2", method="energy")) == {"BatchNorm2d", "Conv2d"}


def test_purview_treats_converted_layers_like_the_originals() -> None:
    torch.manual_seed(0)
    native = ConvBN().double().eval()
    fast = use_double_backward(copy.deepcopy(native))
    x = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(purview_layer_norms(fast, x), purview_layer_norms(native, x), rtol=1e-12, atol=0)


def test_running_stats_off_and_eval_mode() -> None:
    torch.manual_seed(0)
    native = nn.BatchNorm2d(3, track_running_stats=False).double()
    fast = use_double_backward(copy.deepcopy(native))
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(fast(x), F.batch_norm(x, None, None, native.weight, native.bias, True, 0.1, 1e-5))
    native.eval(), fast.eval()
    torch.testing.assert_close(fast(x), native(x), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [nn.BatchNorm2d(3), nn.SyncBatchNorm(3)])
def test_running_stats_switched_off_on_a_layer_that_has_them_stay_put(layer: nn.Module) -> None:
    # Switching track_running_stats off normalizes with batch statistics and leaves the running ones alone in
    # nn.BatchNorm; the converted layer kept blending each batch into them.
    torch.manual_seed(0)
    native = layer.double()
    native.track_running_stats = False
    fast = use_double_backward(copy.deepcopy(native))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) + 5
    torch.testing.assert_close(fast(x), native(x))
    for name, value in native.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_bad_compile_setting_and_single_values_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown BatchNorm compile setting 'yes'; choose one of auto, on, off"):
        use_double_backward(nn.BatchNorm2d(3), batchnorm_compile="yes")
    layer = use_double_backward(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match=r"more than 1 value per channel, got input \(1, 3, 1, 1\)"):
        layer(torch.randn(1, 3, 1, 1))


def bn_derivatives(x: Tensor, weight: Tensor, gy: Tensor, ggx: Tensor, compile_setting: str | None) -> list[Tensor]:
    """y, (gx, gγ, gβ) for the upstream gy, and the (x, γ, gy)-gradients of <ggx, gx> (None: F.batch_norm)."""
    x, weight, bias, gy = (t.detach().requires_grad_() for t in (x, weight, torch.zeros_like(weight), gy))
    if compile_setting is None:
        y = F.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)
    else:
        y = batch_norm_train(x, None, None, weight, bias, 0.1, 1e-5, compile_setting)
    first = torch.autograd.grad(y, (x, weight, bias), gy, create_graph=True)
    second = torch.autograd.grad(first[0], (x, weight, gy), ggx)
    return [t.detach() for t in (y, *first, *second)]


@pytest.mark.parametrize("mean", [0.0, 20.0], ids=["centered", "mean-20-sigma"])
def test_closed_form_in_bf16_eager_and_compiled_is_as_accurate_as_pytorchs(mean: float) -> None:
    torch.manual_seed(0)
    x, gy, ggx = torch.randn(3, 64, 3, 8, 8).unbind()
    x, gy = (x + mean).bfloat16(), gy.bfloat16()
    weight = torch.rand(3) + 0.5
    exact = bn_derivatives(x.double(), weight.double(), gy.double(), ggx.double(), None)
    errors = {}
    for setting in (None, "off", "on"):
        got = bn_derivatives(x, weight, gy, ggx.bfloat16(), setting)
        bf16, f32 = torch.bfloat16, torch.float32
        assert [g.dtype for g in got] == [bf16, bf16, f32, f32, bf16, f32, bf16]  # activations bf16, γ and β f32
        errors[setting] = [float((g.double() - e).norm() / e.norm()) for g, e in zip(got, exact, strict=True)]
    # All differ from float64 by bf16 rounding; the closed form (float32 arithmetic on x - mu) must not add error.
    for setting in ("off", "on"):
        for ours, pytorch in zip(errors[setting], errors[None], strict=True):
            assert ours <= 1.25 * pytorch + 1e-6


def test_compiled_only_where_asked() -> None:
    x = torch.randn(4, 3, 5, 5)
    assert _closed_form_fn("auto", x) is _closed_form  # CPU: eager (Inductor's C++ kernels are not the point)
    assert _closed_form_fn("off", x) is _closed_form
    assert _closed_form_fn("on", x) is _compiled_closed_form()


@pytest.mark.parametrize("sync", [False, True], ids=["per-rank", "sync-group-of-one"])
def test_a_third_derivative_raises_as_pytorchs_instead_of_coming_out_wrong(sync: bool) -> None:
    # μ and r are saved as constants: autograd through the closed form gave third derivatives 0.75 % off. Second
    # derivatives taken under create_graph (a Hessian-vector product of GReg's loss, say) still equal PyTorch's.
    import torch.distributed as dist

    if sync:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x = (2 * torch.randn(8, 3, 5, 5, dtype=torch.float64) + 1).requires_grad_()
        head = torch.randn(3, 5, 5, dtype=torch.float64)
        weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
        ours = sync_batch_norm_train if sync else batch_norm_train
        second = []
        for bn in (functools.partial(F.batch_norm, training=True), ours):
            y = bn(x, None, None, weight, bias, momentum=0.1, eps=1e-5)
            (gx,) = torch.autograd.grad((y.tanh() * head).sum().square(), x, create_graph=True)
            (ggx,) = torch.autograd.grad(gx.square().sum(), x, create_graph=True)
            second.append(ggx)
            with pytest.raises(RuntimeError, match=r"3rd\+ order derivatives|has no third derivative"):
                torch.autograd.grad(ggx.pow(3).sum(), x)
        torch.testing.assert_close(second[1], second[0], rtol=1e-10, atol=1e-12)
    finally:
        if sync:
            dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_compiles_on_cuda() -> None:
    with torch.no_grad():
        assert _closed_form_fn("auto", torch.randn(4, 3, 5, 5, device="cuda")) is _compiled_closed_form()


def test_compiled_closed_form_needs_one_graph_for_all_layer_widths() -> None:
    # Ten BatchNorm widths: a graph per width (Dynamo's static shapes for parameters) would pass the limit.
    widths = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    layers = [m for a, b in itertools.pairwise(widths) for m in (nn.Conv2d(a, b, 1), nn.BatchNorm2d(b))]
    torch.manual_seed(0)
    native = nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    native(x)  # materializes the lazy head
    expected = greg_step_grads(use_double_backward(copy.deepcopy(native), batchnorm_compile="off"), x, n_in=3)[1]
    torch._dynamo.reset()  # no graphs of earlier tests: this test counts its own
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        got = greg_step_grads(use_double_backward(native, batchnorm_compile="on"), x, n_in=3)[1]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_a_failing_compiler_falls_back_to_the_eager_closed_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    native = ConvBN().double().train()
    x = torch.randn(10, 2, 7, 7, dtype=torch.float64)
    expected = greg_step_grads(use_double_backward(copy.deepcopy(native), batchnorm_compile="off"), x, n_in=4)[1]
    # No cached kernels and no working C++ compiler: Inductor cannot build the graph.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()  # no graphs of earlier tests
    fast = use_double_backward(native, batchnorm_compile="on")
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-compiler",), "fx_graph_cache": False}):
        with pytest.warns(RuntimeWarning, match="torch.compile failed for BatchNorm's double backward .*eagerly"):
            got = greg_step_grads(fast, x, n_in=4)[1]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second attempt, no second warning
            got_again = greg_step_grads(fast, x, n_in=4)[1]
    _compiled_closed_form.cache_clear()  # later tests get a working compiled function
    for g, g2, e in zip(got, got_again, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g2, e, rtol=1e-9, atol=1e-12)


SYNC_BN = """
import os
import sys
import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_reduce
from gradreg.double_backward.batchnorm import DoubleBackwardSyncBatchNorm, sync_batch_norm_train

dist.init_process_group("gloo")
rank, world, out = dist.get_rank(), dist.get_world_size(), sys.argv[1]
torch.set_default_dtype(torch.float64)
gen = torch.Generator().manual_seed(0)
x_all, head = 2 * torch.randn(4 * world, 3, 4, 4, generator=gen) + 1, torch.randn(3, 4, 4, generator=gen)
weight, bias = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
bn = DoubleBackwardSyncBatchNorm(3, momentum=0.3)
with torch.no_grad():
    bn.weight.copy_(weight)
    bn.bias.copy_(bias)
x = x_all.chunk(world)[rank].clone().requires_grad_()
loss = (bn(x).tanh() * head).sum((1, 2, 3)).pow(2).mean()  # this rank's mean, as under DDP
(gx,) = torch.autograd.grad(loss, x, create_graph=True)
(loss + gx.flatten(1).norm(dim=1).mean()).backward()  # GReg's shape: the mean per-sample input-gradient norm
grads = torch.stack([bn.weight.grad, bn.bias.grad])
dist.all_reduce(grads)  # DDP's gradient average
saved = {"gx": gx.detach(), "grads": grads / world, "running": torch.stack([bn.running_mean, bn.running_var])}


def autograd_bn(x, w, b):  # BatchNorm over the ranks in plain ops and differentiable all_reduces: exact to any order
    total = lambda t: all_reduce(t, "sum", dist.group.WORLD)
    view = lambda t: t.view(1, -1, 1, 1)
    count = total(x.new_full((1,), x.numel() // x.shape[1]))
    centered = x - view(total(x.sum((0, 2, 3))) / count)
    var = total(centered.square().sum((0, 2, 3))) / count
    return centered * view(torch.rsqrt(var + 1e-5) * w) + view(b)


for name, norm in [("closed_form", lambda x, w, b: sync_batch_norm_train(x, None, None, w, b, 0.1, 1e-5)),
                   ("autograd", autograd_bn)]:  # the penalty differentiates gx, gγ and gβ (upstream ggx, ggγ, ggβ)
    w, b = (t.clone().requires_grad_() for t in (weight, bias))
    loss = (norm(x, w, b).tanh() * head).sum((1, 2, 3)).pow(2).mean()
    gx, gw, gb = torch.autograd.grad(loss, [x, w, b], create_graph=True)
    penalty = gx.flatten(1).norm(dim=1).mean() + gw.square().sum() + (gw * gb).sum()  # ggγ differs between ranks
    saved[name] = [t.detach() for t in (gx, gw, gb, *torch.autograd.grad(loss + penalty, [x, w, b]))]
    for grad in saved[name][4:]:  # DDP sums the ranks' weight gradients: only the sum is defined, not the shares
        dist.all_reduce(grad)
    del loss, gx, gw, gb, penalty  # their graphs hold the process group: alive past destroy, gloo aborts at exit

# Unequal batches (rank 0 holds a single vector, as a last batch may): the statistics of all 6 rows, output and
# input gradient against BatchNorm1d over them.
rows = 2 * torch.randn(6, 3, generator=gen) + 1
mine = rows[:1] if rank == 0 else rows[1:]
mine = mine.clone().requires_grad_()
running = [torch.zeros(3), torch.ones(3)]
y = sync_batch_norm_train(mine, *running, weight, bias, 0.3, 1e-5)
(gx_rows,) = torch.autograd.grad((y.tanh() * torch.arange(1.0, 4.0)).sum(), mine)
saved["rows"] = {"rows": rows, "y": y.detach(), "gx": gx_rows, "running": torch.stack(running)}
del y
if rank == 0:
    saved.update(x_all=x_all, head=head, weight=weight, bias=bias)
torch.save(saved, f"{out}/rank{rank}.pt")
dist.barrier()  # both ranks have saved their results
# No teardown: once (in CI, not in 39 local runs) gloo's threads aborted the exit ("terminate called without an
# active exception", SIGABRT) after everything was saved; what this test checks is in the files.
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sync_batchnorm_double_backward_over_two_ranks_equals_one_batchnorm_over_their_batch(tmp_path: Path) -> None:
    # Reference: one process, PyTorch's BatchNorm2d over both ranks' images; each rank's loss is its own mean, the
    # input gradient is that of their sum (the statistics couple the ranks), DDP averages the weight gradients.
    import subprocess
    import sys

    script = tmp_path / "sync_bn.py"
    script.write_text(SYNC_BN)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, str(script), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    r0 = ranks[0]
    bn = nn.BatchNorm2d(3, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(r0["weight"])
        bn.bias.copy_(r0["bias"])
    x = r0["x_all"].clone().requires_grad_()
    per_image = (bn(x).tanh() * r0["head"]).sum((1, 2, 3)).pow(2)
    losses = [part.mean() for part in per_image.chunk(2)]
    (gx,) = torch.autograd.grad(sum(losses), x, create_graph=True)
    total = sum(loss + g.flatten(1).norm(dim=1).mean() for loss, g in zip(losses, gx.chunk(2), strict=True)) / 2
    total.backward()

    for rank, g in zip(ranks, gx.detach().chunk(2), strict=True):
        torch.testing.assert_close(rank["gx"], g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["grads"], torch.stack([bn.weight.grad, bn.bias.grad]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["running"], torch.stack([bn.running_mean, bn.running_var]), rtol=1e-12, atol=0)
        # with upstream gradients of gγ and gβ as well, against autograd through plain ops and all_reduces
        for got, expected in zip(rank["closed_form"], rank["autograd"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)

    bn1d = nn.BatchNorm1d(3, momentum=0.3).double()
    with torch.no_grad():
        bn1d.weight.copy_(r0["weight"])
        bn1d.bias.copy_(r0["bias"])
    rows = r0["rows"]["rows"].clone().requires_grad_()
    y = bn1d(rows)
    (gx_rows,) = torch.autograd.grad((y.tanh() * torch.arange(1.0, 4.0)).sum(), rows)
    for rank, part in zip(ranks, (slice(0, 1), slice(1, 6)), strict=True):
        torch.testing.assert_close(rank["rows"]["y"], y[part].detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["rows"]["gx"], gx_rows[part], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["rows"]["running"], torch.stack([bn1d.running_mean, bn1d.running_var]))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
def test_sync_statistics_in_a_group_of_one_equal_batchnorm_to_the_second_derivative(device: str) -> None:
    # DDP's sync_batchnorm on GPUs runs sync_batch_norm_train with NCCL's all_reduce. A group of one checks its
    # arithmetic and the collective's autograd on each device against PyTorch's BatchNorm (the sums over ranks: the
    # two-process test above).
    import torch.distributed as dist

    group = {"backend": "nccl", "device_id": torch.device("cuda", 0)} if device == "cuda" else {"backend": "gloo"}
    dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **group)
    try:
        gen = torch.Generator(device).manual_seed(0)
        x = (2 * torch.randn(8, 3, 5, 5, generator=gen, device=device, dtype=torch.float64) + 1).requires_grad_()
        head = torch.randn(3, 5, 5, generator=gen, device=device, dtype=torch.float64)
        native = nn.BatchNorm2d(3, momentum=0.3).to(device, torch.float64)
        with torch.no_grad():
            native.weight.uniform_(0.5, 1.5, generator=gen)
            native.bias.normal_(generator=gen)
        running = [native.running_mean.clone(), native.running_var.clone()]
        params = [p.detach().clone().requires_grad_() for p in (native.weight, native.bias)]
        synced = functools.partial(sync_batch_norm_train, running_mean=running[0], running_var=running[1],
                                   weight=params[0], bias=params[1], momentum=0.3, eps=native.eps)  # fmt: skip
        results = []
        for bn, wb in ((native, [native.weight, native.bias]), (synced, params)):
            loss = (bn(x).tanh() * head).sum((1, 2, 3)).pow(2).mean()
            gx, gw, gb = torch.autograd.grad(loss, [x, *wb], create_graph=True)
            penalty = gx.flatten(1).norm(dim=1).mean() + gw.square().sum() + (gw * gb).sum()  # ggx, ggγ and ggβ
            results.append([gx, gw, gb, *torch.autograd.grad(loss + penalty, [x, *wb])])
        for got, expected in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.stack(running), torch.stack([native.running_mean, native.running_var]))
    finally:
        dist.destroy_process_group()


def test_a_single_image_with_several_values_per_channel_is_fine() -> None:
    # Only one value per channel is undefined (F.batch_norm's rule): a batch of one image is normalized over its pixels.
    torch.manual_seed(0)
    x, gy, ggx = torch.randn(3, 1, 3, 4, 5, dtype=torch.float64).unbind()
    weight = torch.rand(3, dtype=torch.float64) + 0.5
    for got, expected in zip(
        bn_derivatives(x + 2, weight, gy, ggx, "off"), bn_derivatives(x + 2, weight, gy, ggx, None), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_converted_layer_checks_the_input_dimensions_as_pytorchs() -> None:
    layer = use_double_backward(nn.BatchNorm2d(3)).train()
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(torch.randn(4, 3, 5))


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: nn.BatchNorm1d(3, eps=0.3, momentum=None), (6, 3, 5)),
        (lambda: nn.BatchNorm2d(3, eps=0.3, affine=False), (4, 3, 3, 2)),
        (lambda: nn.BatchNorm3d(3, eps=0.3, momentum=0.2), (2, 3, 2, 3, 2)),
    ],
    ids=["1d-cumulative", "2d-plain", "3d"],
)
def test_every_converted_kind_with_its_own_eps_equals_pytorch(build, shape: tuple[int, ...]) -> None:
    # The GReg test above covers BatchNorm1d/2d with the default eps only; BatchNorm3d is converted nowhere else.
    torch.manual_seed(0)
    native = build().double().train()
    with torch.no_grad():
        for p in native.parameters():
            p.uniform_(0.5, 1.5)
    fast = use_double_backward(copy.deepcopy(native))
    assert type(fast).__name__ == f"DoubleBackward{type(native).__name__}"
    head = torch.randn(shape[1:], dtype=torch.float64)
    for step in range(2):  # the second step checks the running statistics' bookkeeping
        x = 2 * torch.randn(shape, dtype=torch.float64) + 1
        results = []
        for layer in (native, fast):
            xx = x.clone().requires_grad_()
            loss = (layer(xx).tanh() * head).sum()
            (gx,) = torch.autograd.grad(loss, xx, create_graph=True)
            results.append([gx, *torch.autograd.grad(loss + gx.square().sum(), [xx, *layer.parameters()])])
        for got, expected in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        for (name, got), expected in zip(fast.state_dict().items(), native.state_dict().values(), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{name} after step {step}")


class _ThreadRanks:
    """Ranks as threads of this process: a stand-in process group whose all_reduce is a barrier-synchronized sum."""

    def __init__(self, world: int) -> None:
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def all_reduce(self, t: Tensor, rank: int) -> None:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        total = functools.reduce(torch.add, self.slots)  # the same order on every rank
        self.barrier.wait()
        t.copy_(total)

    def run(self, fn, monkeypatch: pytest.MonkeyPatch) -> list:
        """``fn(rank, group)`` on every rank at once; torch.distributed's calls for ``group`` answered by this."""

        class Group:  # what sync_batch_norm_train hands back to torch.distributed
            def __init__(self, ranks: _ThreadRanks, rank: int) -> None:
                self.ranks, self.rank = ranks, rank

        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: group.ranks.world)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: group.rank)
        monkeypatch.setattr(
            torch.distributed, "all_reduce", lambda t, group=None, **_: group.ranks.all_reduce(t, group.rank)
        )
        results, errors = [None] * self.world, []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, Group(self, rank))
            except BaseException as err:  # raised below; aborting the barrier frees the other ranks
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        if errors:
            raise errors[0]
        return results


@pytest.mark.filterwarnings("ignore:var_mean\\(\\). degrees of freedom")
def test_sync_statistics_over_unequal_and_empty_rank_batches_equal_one_batchnorm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three ranks as threads (rank 0 without images, as a last batch may leave it): output gradient, its derivatives
    # (upstream ggx, and ggγ, ggβ equal on all ranks so that the shares add up) and the running statistics against
    # one BatchNorm over all images. Seconds instead of torchrun's, and it reaches the sums over the ranks that a
    # group of one cannot.
    torch.manual_seed(0)
    x = 2 * torch.randn(6, 3, 4, 4, dtype=torch.float64) + 1
    head, u, v = torch.randn(3, 4, 4, dtype=torch.float64), *torch.randn(2, 3, dtype=torch.float64)
    weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    parts = [slice(0, 0), slice(0, 2), slice(2, 6)]

    def step(bn, x: Tensor, w: Tensor, b: Tensor) -> list[Tensor]:
        loss = (bn(x, weight=w, bias=b).tanh() * head).sum()
        gx, gw, gb = torch.autograd.grad(loss, [x, w, b], create_graph=True)
        penalty = gx.square().sum() + (gw * u).sum() + (gb * v).sum()  # linear in gγ, gβ: the ranks' shares add up
        return [t.detach() for t in (gx, gw, gb, *torch.autograd.grad(loss + penalty, [x, w, b]))]

    def on_rank(rank: int, group) -> tuple[list[Tensor], list[Tensor]]:
        running = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
        bn = functools.partial(sync_batch_norm_train, running_mean=running[0], running_var=running[1], momentum=0.3,
                               eps=1e-5, group=group)  # fmt: skip
        return step(bn, *(t.clone().requires_grad_() for t in (x[parts[rank]], weight, bias))), running

    ranks = _ThreadRanks(3).run(on_rank, monkeypatch)
    running = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    native = functools.partial(F.batch_norm, running_mean=running[0], running_var=running[1], training=True,
                               momentum=0.3, eps=1e-5)  # fmt: skip
    expected = step(native, *(t.clone().requires_grad_() for t in (x, weight, bias)))
    for i in (0, 3):  # gx and its gradient: each rank holds its images' rows
        torch.testing.assert_close(torch.cat([got[i] for got, _ in ranks]), expected[i], rtol=1e-10, atol=1e-12)
    for i in (1, 2, 4, 5):  # gγ, gβ and their gradients: the ranks' shares add up to the whole (DDP's sum)
        torch.testing.assert_close(sum(got[i] for got, _ in ranks), expected[i], rtol=1e-10, atol=1e-12)
    for _, got in ranks:
        torch.testing.assert_close(torch.stack(got), torch.stack(running), rtol=1e-12, atol=1e-15)


def test_original_type_names_the_torch_class_a_converted_layer_came_from() -> None:
    model = use_double_backward(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2, 2), nn.ReLU()))
    assert type(model[0]) is not nn.Conv2d
    assert type(model[1]) is not nn.BatchNorm2d
    assert [original_type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU]
