"""Independent checks of gradreg.losses: hand-worked values and the GReg regularizer vs autograd references.

The regularizer references are built the way the official GReg code builds it (``train_sea.py``): the
Jacobian of a closure Phi(X) that re-runs the model on the whole batch, reshaped to one row per sample,
row-wise L2 norm, mean over all rows. The paper scaling is checked against per-sample energy gradients.
Everything runs on the CPU in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.autograd.functional import jacobian

from gradreg.losses import (
    absent_class_loss,
    energy,
    energy_margin_loss,
    grad_norm_penalty,
    outlier_exposure_loss,
)

DTYPE = torch.float64


class ToyNet(nn.Module):
    """conv3x3 -> [BatchNorm] -> softplus -> linear; smooth, so finite differences are reliable."""

    def __init__(self, batchnorm: bool, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.fc = nn.Linear(4 * 4 * 4, num_classes)
        with torch.no_grad():  # spread the energies so that hinges split the batch
            self.fc.weight.mul_(6.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.softplus(self.bn(self.conv(x))).flatten(1))


def ref_energy(logits: Tensor) -> Tensor:
    return -torch.logsumexp(logits, dim=1)


def official_phi(model: nn.Module, x: Tensor, n_in: int, m_in: float, m_out: float, reduce: str = "mean") -> Tensor:
    """Phi of train_sea.py, written from the spec: -mean_in relu(m_in - E) + mean_out relu(E - m_out)."""
    e = ref_energy(model(x))
    agg = torch.mean if reduce == "mean" else torch.sum
    return -agg(F.relu(m_in - e[:n_in])) + agg(F.relu(e[n_in:] - m_out))


def split_margins(e_in: Tensor, e_out: Tensor) -> tuple[float, float]:
    """Margins halfway between sorted energies, so that about half of each part is active, none at the kink."""
    s_in, s_out = e_in.detach().sort().values, e_out.detach().sort().values
    k_in, k_out = len(s_in) // 2, len(s_out) // 2
    return float(s_in[k_in - 1] + s_in[k_in]) / 2, float(s_out[k_out - 1] + s_out[k_out]) / 2


def make_case(batchnorm: bool, train: bool, n_in: int = 4, n_out: int = 6) -> tuple[ToyNet, Tensor, float, float]:
    model = ToyNet(batchnorm).to(DTYPE).train(train)
    x = torch.randn(n_in + n_out, 2, 4, 4, dtype=DTYPE)
    if batchnorm and not train:
        with torch.no_grad():  # non-trivial running statistics for eval mode
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        e = ref_energy(model(x))
    m_in, m_out = split_margins(e[:n_in], e[n_in:])
    return model, x, m_in, m_out


def penalty_from_one_forward(model: nn.Module, x: Tensor, n_in: int, m_in: float, m_out: float, scaling: str):
    x = x.clone().requires_grad_(True)
    e = energy(model(x))
    return grad_norm_penalty(x, e[:n_in], e[n_in:], m_in, m_out, scaling)


def reference_code_value(model: nn.Module, x: Tensor, n_in: int, m_in: float, m_out: float) -> Tensor:
    jac = jacobian(lambda inp: official_phi(model, inp, n_in, m_in, m_out), x, create_graph=True)
    return jac.reshape(x.shape[0], -1).norm(dim=1).mean()


def reference_paper_value(model: nn.Module, x: Tensor, n_in: int, m_in: float, m_out: float) -> Tensor:
    """E_in ||1[E <= m_in] dE/dx|| + E_out ||1[E >= m_out] dE/dx||, one sample at a time (needs independent rows)."""
    norms = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        with torch.no_grad():
            e_i = float(ref_energy(model(xi))[0])
        gate = (e_i < m_in) if i < n_in else (e_i > m_out)
        g = jacobian(lambda inp: ref_energy(model(inp))[0], xi, create_graph=True)
        norms.append(g.flatten().norm() * float(gate))
    norms = torch.stack(norms)
    return norms[:n_in].mean() + norms[n_in:].mean()


def assert_same_value_and_param_grads(model: nn.Module, value: Tensor, ref: Tensor) -> None:
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(value, params, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        g = torch.zeros(()) if g is None else g
        w = torch.zeros(()) if w is None else w
        torch.testing.assert_close(g.to(DTYPE), w.to(DTYPE), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("batchnorm", "train"), [(False, True), (True, False)])
def test_code_scaling_matches_official_jacobian_with_independent_rows(batchnorm: bool, train: bool) -> None:
    model, x, m_in, m_out = make_case(batchnorm, train)
    pen = penalty_from_one_forward(model, x, 4, m_in, m_out, "code")
    ref = reference_code_value(model, x, 4, m_in, m_out)
    assert_same_value_and_param_grads(model, pen.value, ref)


def test_code_scaling_matches_official_jacobian_with_train_mode_batchnorm() -> None:
    # Train-mode BN couples the rows through batch statistics; the official code differentiates the whole Phi
    # (re-running the model inside the Jacobian), which is what one forward + autograd.grad reproduces.
    model, x, m_in, m_out = make_case(batchnorm=True, train=True)
    pen = penalty_from_one_forward(model, x, 4, m_in, m_out, "code")
    ref = reference_code_value(model, x, 4, m_in, m_out)
    assert_same_value_and_param_grads(model, pen.value, ref)
    assert (pen.row_norms[~pen.active] > 0).all(), "BN coupling should give inactive rows a gradient"


@pytest.mark.parametrize(("batchnorm", "train"), [(False, True), (True, False)])
def test_paper_scaling_matches_per_sample_gated_energy_gradients(batchnorm: bool, train: bool) -> None:
    model, x, m_in, m_out = make_case(batchnorm, train)
    pen = penalty_from_one_forward(model, x, 4, m_in, m_out, "paper")
    ref = reference_paper_value(model, x, 4, m_in, m_out)
    assert_same_value_and_param_grads(model, pen.value, ref)


def test_paper_scaling_matches_sum_phi_jacobian_with_train_mode_batchnorm() -> None:
    model, x, m_in, m_out = make_case(batchnorm=True, train=True)
    pen = penalty_from_one_forward(model, x, 4, m_in, m_out, "paper")
    jac = jacobian(lambda inp: official_phi(model, inp, 4, m_in, m_out, reduce="sum"), x, create_graph=True)
    norms = jac.reshape(x.shape[0], -1).norm(dim=1)
    assert_same_value_and_param_grads(model, pen.value, norms[:4].mean() + norms[4:].mean())


@settings(max_examples=8, deadline=None)
@given(n_in=st.integers(1, 5), n_out=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_code_value_is_paper_value_over_batch_size(n_in: int, n_out: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = ToyNet(batchnorm=False).to(DTYPE)
    x = torch.randn(n_in + n_out, 2, 4, 4, dtype=DTYPE)
    with torch.no_grad():
        e = ref_energy(model(x))
    m_in, m_out = float(e[:n_in].median()), float(e[n_in:].median())
    code = penalty_from_one_forward(model, x, n_in, m_in, m_out, "code").value
    paper = penalty_from_one_forward(model, x, n_in, m_in, m_out, "paper").value
    torch.testing.assert_close(code * (n_in + n_out), paper, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scaling", ["code", "paper"])
def test_inactive_rows_contribute_exactly_zero_and_backward_is_finite(scaling: str) -> None:
    model, x, m_in, m_out = make_case(batchnorm=True, train=False)
    x.requires_grad_(True)
    e = energy(model(x))
    pen = grad_norm_penalty(x, e[:4], e[4:], m_in, m_out, scaling)
    expected_active = torch.cat([e[:4] < m_in, e[4:] > m_out])
    assert torch.equal(pen.active, expected_active)
    assert 0 < int(pen.active.sum()) < len(pen.active)
    assert torch.equal(pen.row_norms[~pen.active], torch.zeros_like(pen.row_norms[~pen.active]))
    assert (pen.row_norms[pen.active] > 0).all()
    pen.value.backward()
    for p in [*model.parameters(), x]:
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()


def test_a_sample_exactly_on_its_margin_is_inactive() -> None:
    # relu'(0) = 0: such a row contributes no gradient, so `active` (logged as the active share) must say so too
    model, x, _, _ = make_case(batchnorm=True, train=False)
    x.requires_grad_(True)
    e = energy(model(x))
    pen = grad_norm_penalty(x, e[:4], e[4:], m_in=float(e[0]), m_out=float(e[4]))
    assert not pen.active[[0, 4]].any()
    assert torch.equal(pen.active, pen.row_norms > 0)


def test_all_rows_inactive_gives_zero_penalty_and_zero_finite_gradients() -> None:
    model, x, _, _ = make_case(batchnorm=False, train=True)
    x.requires_grad_(True)
    e = energy(model(x))
    pen = grad_norm_penalty(x, e[:4], e[4:], m_in=-1e3, m_out=1e3)  # no sample satisfies its margin
    assert not pen.active.any()
    assert pen.value.item() == 0.0
    pen.value.backward()
    for p in [*model.parameters(), x]:
        assert torch.isfinite(p.grad).all()
        assert not p.grad.any()


@pytest.mark.parametrize("scaling", ["code", "paper"])
def test_empty_outlier_part_is_not_nan(scaling: str) -> None:
    model, x, m_in, _ = make_case(batchnorm=False, train=True)
    x = x[:4].requires_grad_(True)
    e = energy(model(x))
    pen = grad_norm_penalty(x, e, e[:0], m_in, -7.0, scaling)
    assert torch.isfinite(pen.value)
    assert torch.isfinite(energy_margin_loss(e, e[:0], m_in, -7.0))


def _functional_penalty(x: Tensor, w1: Tensor, w2: Tensor, n_in: int, m_in: float, m_out: float, scaling: str):
    with torch.enable_grad():  # gradcheck may evaluate the function without grad mode
        logits = 3.0 * torch.tanh(x @ w1) @ w2
        e = energy(logits)
        return grad_norm_penalty(x, e[:n_in], e[n_in:], m_in, m_out, scaling).value


@pytest.mark.parametrize("scaling", ["code", "paper"])
def test_gradcheck_penalty_wrt_inputs_and_weights(scaling: str) -> None:
    n_in, n_out, dim, hidden, classes = 3, 4, 5, 6, 3
    x = torch.randn(n_in + n_out, dim, dtype=DTYPE, requires_grad=True)
    w1 = torch.randn(dim, hidden, dtype=DTYPE, requires_grad=True)
    w2 = torch.randn(hidden, classes, dtype=DTYPE, requires_grad=True)
    with torch.no_grad():
        e = energy(3.0 * torch.tanh(x @ w1) @ w2)
    m_in, m_out = split_margins(e[:n_in], e[n_in:])
    fn = lambda *args: _functional_penalty(*args, n_in, m_in, m_out, scaling)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w1, w2), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_penalty_wrt_parameters_with_train_mode_batchnorm() -> None:
    model, x, m_in, m_out = make_case(batchnorm=True, train=True, n_in=2, n_out=3)
    names = ["conv.weight", "fc.weight"]
    params = tuple(dict(model.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)

    def fn(*ps: Tensor) -> Tensor:
        with torch.enable_grad():
            xin = x.clone().requires_grad_(True)
            logits = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (xin,))
            e = energy(logits)
            return grad_norm_penalty(xin, e[:2], e[2:], m_in, m_out, "code").value

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_energy_hand_values_and_temperature() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]], dtype=DTYPE)
    torch.testing.assert_close(energy(logits), torch.tensor([-math.log(4.0), -1.0 - math.log(2.0)], dtype=DTYPE))
    # E_T = -T * log(exp(0 / 2) + exp(log(3) / 2)) = -2 * log(1 + sqrt(3))
    torch.testing.assert_close(
        energy(logits[:1], temperature=2.0), torch.tensor([-2.0 * math.log(1.0 + math.sqrt(3.0))], dtype=DTYPE)
    )


def test_losses_keep_float64_and_upcast_bfloat16() -> None:
    logits = torch.randn(4, 5, dtype=DTYPE)
    assert energy(logits).dtype == DTYPE
    assert outlier_exposure_loss(logits).dtype == DTYPE
    assert absent_class_loss(logits).dtype == DTYPE
    assert energy(logits.bfloat16()).dtype == torch.float32
    assert outlier_exposure_loss(logits.bfloat16()).dtype == torch.float32


def test_energy_margin_loss_hand_value() -> None:
    e_in = torch.tensor([-30.0, -20.0], dtype=DTYPE)  # hinge relu(E - m_in): 0, 5 -> squares 0, 25 -> mean 12.5
    e_out = torch.tensor([-10.0, -3.0], dtype=DTYPE)  # hinge relu(m_out - E): 3, 0 -> squares 9, 0 -> mean 4.5
    loss = energy_margin_loss(e_in, e_out, m_in=-25.0, m_out=-7.0)
    torch.testing.assert_close(loss, torch.tensor(17.0, dtype=DTYPE))
    assert energy_margin_loss(e_in[:1], e_out[1:], -25.0, -7.0).item() == 0.0  # both margins satisfied


def test_outlier_exposure_loss_hand_value_and_uniform_cross_entropy() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=DTYPE)
    # row 1: log 2; row 2: log(3 + 1) - log(3) / 2
    expected = (math.log(2.0) + math.log(4.0) - math.log(3.0) / 2) / 2
    torch.testing.assert_close(outlier_exposure_loss(logits), torch.tensor(expected, dtype=DTYPE))
    logits = torch.randn(6, 7, dtype=DTYPE)
    uniform = torch.full_like(logits, 1 / 7)
    torch.testing.assert_close(outlier_exposure_loss(logits), F.cross_entropy(logits, uniform))


def test_absent_class_loss_hand_value_and_cross_entropy() -> None:
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)]], dtype=DTYPE)  # p(absent) = 2 / 4
    torch.testing.assert_close(absent_class_loss(logits), torch.tensor(math.log(2.0), dtype=DTYPE))
    logits = torch.randn(5, 4, dtype=DTYPE)
    target = torch.full((5,), 3)
    torch.testing.assert_close(absent_class_loss(logits), F.cross_entropy(logits, target))
