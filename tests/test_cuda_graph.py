"""gradreg.cuda_graph: a replayed training step gives the gradients of the eager step; the module's cuda_graph mode
trains like the default one (CPU: the same code path without a graph; CUDA: with it) and refuses what it cannot do."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from torch import Tensor, nn

from gradreg.cuda_graph import CapturedStep, _signature
from gradreg.data import OODDataModule
from gradreg.double_backward import use_double_backward
from gradreg.losses import energy, energy_margin_loss, grad_norm_penalty
from gradreg.module import GradRegModule, UnsupportedSettingError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip
    return use_double_backward(net)


def greg_step(model: nn.Module, x_in: Tensor, y: Tensor, x_out: Tensor) -> dict[str, Tensor]:
    """CE + energy margin loss + GReg's penalty from one forward, and its backward."""
    x = torch.cat([x_in, x_out]).requires_grad_(True)
    logits = model(x)
    e = energy(logits)
    n = len(x_in)
    loss = F.cross_entropy(logits[:n].float(), y) + 0.1 * energy_margin_loss(e[:n], e[n:], -1.0, -3.0)
    loss = loss + grad_norm_penalty(x, e[:n], e[n:], -1.0, -3.0).value
    loss.backward()
    return {"loss": loss.detach()}


def batches(steps: int, device: str, n_in: int = 6, n_out: int = 10) -> list[tuple[Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n_in, 3, 8, 8, generator=g), torch.randint(0, 5, (n_in,), generator=g),
         3 * torch.randn(n_out, 3, 8, 8, generator=g))
        for _ in range(steps)
    ]  # fmt: skip


def train_both(device: str, bf16: bool, steps: int = 7) -> tuple[nn.Module, nn.Module, CapturedStep, list]:
    """The same steps eagerly and through CapturedStep, comparing gradients and losses at every step."""
    eager = small_net().to(device).train()
    graphed = copy.deepcopy(eager)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (eager, graphed)]
    captured = CapturedStep(lambda *b: greg_step(graphed, *b), graphed.parameters())
    log = []
    for batch in batches(steps, device):
        batch = [t.to(device) for t in batch]
        # As in Lightning: one autocast region around the whole step, in which something else may have run the
        # model first (here a probe forward that fills autocast's weight cache; an outlier sampler in training).
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            for model in (eager, graphed):
                with torch.no_grad():
                    model.eval()(batch[0])
                model.train()
            opts[0].zero_grad(set_to_none=True)
            expected = greg_step(eager, *batch)
            got = captured(*batch)
        pairs = zip(eager.parameters(), graphed.parameters(), strict=True)
        grads = [(p.grad.clone(), q.grad.clone()) for p, q in pairs]
        log.append((expected["loss"], got["loss"], grads))
        for opt in opts:
            opt.step()
    return eager, graphed, captured, log


def test_on_the_cpu_the_step_runs_eagerly_with_fresh_gradients() -> None:
    _, _, captured, log = train_both("cpu", bf16=False, steps=3)
    assert captured.graph is None
    for expected, got, grads in log:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for e, g in grads:  # fresh gradients each call, not accumulated
            torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_failed_capture_warns_once_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Capture needs CUDA; the failure path is the same on any device, so pretend these inputs are capturable.
    model = small_net()
    batch = batches(1, "cpu")[0]
    expected = greg_step(copy.deepcopy(model), *batch)["loss"]
    captured = CapturedStep(lambda *b: greg_step(model, *b), model.parameters(), warmup=0)
    captured._signature = _signature(tuple(batch))

    def fail(inputs: tuple) -> None:
        for p in model.parameters():  # a half-done capture may have left gradients behind
            p.grad = torch.full_like(p, float("nan"))
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(captured, "_capture", fail)
    with pytest.warns(RuntimeWarning, match="capture failed, the training step runs eagerly: operation not permitted"):
        got = captured(*batch)["loss"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        captured(*batch)  # eager from now on, without another attempt or warning
    assert captured.graph is None


def test_a_failed_capture_of_a_step_without_inputs_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    # The marker of a failed capture was the empty signature, which a step without inputs has: every call retried.
    captured = CapturedStep(lambda: {}, [], warmup=0)
    captured._signature = ()
    attempts = []

    def fail(inputs: tuple) -> None:
        attempts.append(inputs)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(captured, "_capture", fail)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        captured()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        captured()
    assert len(attempts) == 1


@pytest.mark.parametrize("warmup", [-1, 1.5, True])
def test_a_bad_warmup_count_is_refused(warmup: object) -> None:
    with pytest.raises(ValueError, match="warmup must be an integer >= 0"):
        CapturedStep(lambda: {}, [], warmup=warmup)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_replayed_greg_step_equals_the_eager_step(bf16: bool) -> None:
    eager, graphed, captured, log = train_both("cuda", bf16)
    assert captured.graph is not None  # 3 eager calls, then capture and 3 replays
    rtol, atol = (1e-2, 1e-3) if bf16 else (1e-4, 1e-5)  # only the order of atomic additions differs
    for expected, got, grads in log:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
        for e, g in grads:
            torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
    # Running statistics included:
    for p, q in zip(eager.state_dict().values(), graphed.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol)
    # Another batch size runs eagerly, with the same result as the eager step.
    x_in, y, x_out = (t.cuda() for t in batches(1, "cuda", n_in=4, n_out=4)[0])
    got = captured(x_in, y, x_out)["loss"]
    graphed_grads = [p.grad.clone() for p in graphed.parameters()]
    eager.load_state_dict(graphed.state_dict())
    for p in eager.parameters():
        p.grad = None
    torch.testing.assert_close(got, greg_step(eager, x_in, y, x_out)["loss"], rtol=1e-5, atol=1e-6)
    for e, g in zip(eager.parameters(), graphed_grads, strict=True):
        torch.testing.assert_close(g, e.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
def fit(
    tmp_path: Path, cuda_graph: bool, accelerator: str = "cpu", sampler: str | dict = "random", **trainer_kw
) -> GradRegModule:
    seed_everything(0)
    dm = OODDataModule(batch_size=32, outlier_batch_size=32, augment="none")
    module = GradRegModule(
        arch="small_cnn", arch_kwargs={"in_channels": 1, "width": 8}, num_classes=dm.num_classes, method="greg",
        m_in=-3.0, m_out=-1.0, lr=0.05, schedule="constant", input_mean=dm.input_mean, input_std=dm.input_std,
        cuda_graph=cuda_graph, sampler=sampler,
    )  # fmt: skip
    trainer = Trainer(
        max_steps=8, accelerator=accelerator, devices=1, logger=False, default_root_dir=tmp_path,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        **trainer_kw,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return module


def test_cuda_graph_mode_on_the_cpu_trains_like_the_default(tmp_path: Path) -> None:
    # On the CPU the step is not captured, but training_step computes the gradients itself (the captured code path).
    expected = fit(tmp_path, cuda_graph=False).state_dict()
    got = fit(tmp_path, cuda_graph=True).state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)


def test_cuda_graph_mode_refuses_gradient_accumulation(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSettingError, match=r"trainer\.accumulate_grad_batches=2.*model\.cuda_graph=false"):
        fit(tmp_path, cuda_graph=True, accumulate_grad_batches=2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_training_with_a_cuda_graph_matches_eager(tmp_path: Path, precision: str) -> None:
    expected = fit(tmp_path, cuda_graph=False, accelerator="gpu", precision=precision).state_dict()
    module = fit(tmp_path, cuda_graph=True, accelerator="gpu", precision=precision)
    assert module.captured_step.graph is not None
    rtol, atol = (2e-2, 2e-3) if precision == "bf16-mixed" else (1e-4, 1e-5)
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.gpu
@cuda
def test_greg_plus_under_bf16_captures_after_the_sampler_ran_the_model(tmp_path: Path) -> None:
    # The energy-cluster sampler runs the model under Lightning's autocast before every step, which leaves cached
    # casts (with autograd nodes) behind; the capture must not trip over them (gradreg.cuda_graph docstring).
    sampler = {"name": "energy_cluster", "num_clusters": 4}
    module = fit(tmp_path, cuda_graph=True, accelerator="gpu", sampler=sampler, precision="bf16-mixed")
    assert module.captured_step.graph is not None
    assert all(torch.isfinite(p).all() for p in module.parameters())
