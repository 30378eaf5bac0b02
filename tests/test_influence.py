"""Cross-loss influence functions: exact-Hessian reference, convex leave-one-out, GReg end to end."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from gradreg import scorers
from gradreg.influence import (
    InfluenceResult,
    exact_inverse_hvp,
    explain,
    greg_objective,
    hardest_examples,
    inverse_hvp,
    make_hvp,
    per_sample_gradients,
    save_explanation_grid,
    score_gradients,
    select_parameters,
)
from gradreg.losses import energy, energy_margin_loss, grad_norm_penalty
from gradreg.models import Classifier, SmallCNN
from gradreg.scorers.base import Scorer


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only add contention on a shared CPU (10x slower third-order HVPs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(Classifier):
    """tanh MLP small enough to form its Hessian (27 parameters)."""

    def __init__(self, d_in: int = 4, hidden: int = 3, num_classes: int = 3) -> None:
        super().__init__(num_classes, hidden, in_channels=1)
        self.body = nn.Linear(d_in, hidden)

    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.body(x))


class FixedFeatures(Classifier):
    """Multinomial logistic regression: the head on fixed (identity) features."""

    def features(self, x: Tensor) -> Tensor:
        return x


def ce_loss(l2: float = 0.0):
    def loss(model: nn.Module, batch) -> Tensor:
        x_in, y_in, _ = batch
        reg = sum(p.pow(2).sum() for p in model.parameters())
        return F.cross_entropy(model(x_in), y_in) + 0.5 * l2 * reg

    return loss


def flat_objective(model: nn.Module, loss, batch):
    """The objective as a function of one flat vector of all parameters (for autograd.functional)."""
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()], strict=True)
    sizes = [math.prod(s) for s in shapes]

    def f(theta: Tensor) -> Tensor:
        params = {n: c.view(s) for n, c, s in zip(names, theta.split(sizes), shapes, strict=True)}
        return functional_call(_Call(model, loss), {f"model.{n}": p for n, p in params.items()}, (batch,))

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    return f, theta


class _Call(nn.Module):
    def __init__(self, model: nn.Module, loss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch):
        return self.loss(self.model, batch)


def tiny_cnn_setup(dtype: torch.dtype = torch.float32, n: int = 8):
    model = SmallCNN(num_classes=3, in_channels=1, width=4).to(dtype).eval()
    x_in = torch.randn(n, 1, 8, 8, dtype=dtype)
    y_in = torch.randint(0, 3, (n,))
    x_out = 2.0 * torch.randn(n, 1, 8, 8, dtype=dtype) + 1.0
    with torch.no_grad():
        e_in, e_out = energy(model(x_in)), energy(model(x_out))
    # margins halfway between the two middle energies: every hinge (energy and penalty) is active on some rows,
    # and no row sits on a kink (the penalty's gate is a jump, finite differences across it are meaningless)
    m_in, m_out = float(e_in.quantile(0.5)), float(e_out.quantile(0.5))
    return model, (x_in, y_in, x_out), m_in, m_out


# ------------------------------------------------------------------------------------------------- parameters


def test_default_parameters_are_last_weight_layer_its_norm_and_head() -> None:
    names = select_parameters(SmallCNN(3, width=4))
    assert names == ["fc.weight", "fc.bias", "trunk.7.weight", "trunk.8.weight", "trunk.8.bias"]
    assert select_parameters(SmallCNN(3, width=4), ["fc", "trunk.8"]) == [
        "fc.weight",
        "fc.bias",
        "trunk.8.weight",
        "trunk.8.bias",
    ]
    assert select_parameters(FixedFeatures(3, 5, in_channels=1)) == ["fc.weight", "fc.bias"]


def test_default_parameters_skip_frozen_layers() -> None:
    model = SmallCNN(3, width=4)
    model.trunk[7].requires_grad_(False)  # the last conv frozen: the conv before it is the last trainable one
    assert select_parameters(model) == ["fc.weight", "fc.bias", "trunk.3.weight", "trunk.4.weight", "trunk.4.bias",
                                        "trunk.8.weight", "trunk.8.bias"]  # fmt: skip
    model.trunk.requires_grad_(False)  # a frozen trunk (a linear probe): the head alone
    assert select_parameters(model) == ["fc.weight", "fc.bias"]


def test_unknown_parameter_prefix_lists_modules() -> None:
    with pytest.raises(KeyError, match="top-level modules: fc, trunk"):
        select_parameters(SmallCNN(3, width=4), ["trunk.99"])


# ------------------------------------------------------------------------------------------------- exact case


def test_hvp_cg_and_lissa_match_the_exact_inverse_hessian_product() -> None:
    model = TinyNet().double().eval()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    batch = (x, y, None)
    loss = ce_loss()
    names = select_parameters(model)
    assert len(names) == 4  # the whole network: it has one hidden layer

    f, theta = flat_objective(model, loss, batch)
    hessian = torch.autograd.functional.hessian(f, theta)
    order = [n for n, _ in model.named_parameters()]
    assert order == names  # same flattening order as the library's
    hvp = make_hvp(model, loss, [batch], names)
    v = torch.randn(theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(hvp(v), hessian @ v, rtol=1e-10, atol=1e-12)

    eigenvalues = torch.linalg.eigvalsh(hessian)
    damping = max(0.0, -float(eigenvalues.min())) + 0.2  # the tanh net is non-convex: make H + damping I PD
    eye = torch.eye(theta.numel(), dtype=torch.float64)
    expected = torch.linalg.solve(hessian + damping * eye, v)

    torch.testing.assert_close(exact_inverse_hvp(hvp, v, damping), expected, rtol=1e-8, atol=1e-10)
    cg = inverse_hvp(hvp, v, "cg", damping=damping, tol=1e-12, max_iter=200)
    torch.testing.assert_close(cg, expected, rtol=1e-7, atol=1e-9)
    lissa = inverse_hvp(hvp, v, "lissa", damping=damping, depth=1000, tol=1e-12)
    torch.testing.assert_close(lissa, expected, rtol=1e-5, atol=1e-7)


def test_lissa_reports_divergence() -> None:
    def hvp(v: Tensor) -> Tensor:
        return torch.tensor([1.0, -1.0], dtype=v.dtype) * v

    with pytest.raises(FloatingPointError, match="diverged"):
        inverse_hvp(hvp, torch.ones(2), "lissa", damping=0.0, scale=2.0, depth=10_000)


def test_lissa_reports_a_slow_divergence_that_stays_finite() -> None:
    def hvp(v: Tensor) -> Tensor:
        return torch.tensor([1.0, 10.0], dtype=v.dtype) * v

    # scale 4.9 < (lambda_max + damping) / 2 = 5: the series grows by 1.04 a step and stays finite for 1000 steps
    # in float32 (it used to return 2e16 where the answer is 0.1)
    with pytest.raises(FloatingPointError, match="diverged"):
        inverse_hvp(hvp, torch.ones(2), "lissa", damping=0.0, scale=4.9)
    converged = inverse_hvp(hvp, torch.ones(2), "lissa", damping=0.0, scale=5.5, tol=1e-7)
    torch.testing.assert_close(converged, torch.tensor([1.0, 0.1]))


def test_lissa_over_mini_batch_hessians_converges_where_single_updates_outgrow_v() -> None:
    # Three PSD Hessians, cycled, each step a contraction (scale above every one's lambda_max): the series converges,
    # yet single updates grow to ~3 ||v||; the one-Hessian test "update longer than v" called it diverged.
    gen = torch.Generator().manual_seed(3)
    hessians = []
    for _ in range(3):
        q = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
        hessians.append(q @ torch.diag(torch.rand(3, generator=gen, dtype=torch.float64) ** 4) @ q.T)
    v = torch.randn(3, generator=gen, dtype=torch.float64)
    damping = 0.01
    scale = 1.1 * max(float(torch.linalg.eigvalsh(h).max()) for h in hessians) + damping
    exact = torch.linalg.solve(sum(hessians) / 3 + damping * torch.eye(3, dtype=torch.float64), v)

    def cycled(scale: float, stochastic: bool) -> Tensor:
        calls = itertools.count()
        return inverse_hvp(
            lambda u: hessians[next(calls) % 3] @ u, v, "lissa", damping, scale, depth=5000, stochastic=stochastic
        )

    with pytest.raises(FloatingPointError, match="diverged"):
        cycled(scale, stochastic=False)
    torch.testing.assert_close(cycled(scale, stochastic=True), exact, rtol=0.02, atol=0)
    with pytest.raises(FloatingPointError, match="diverged"):  # scale < lambda_max / 2 of two: their steps expand
        cycled(0.1 * scale, stochastic=True)


def test_explain_lissa_over_several_hessian_batches_agrees_with_cg() -> None:
    # Logistic regression, 16 Hessian batches of 4 points: explain's LiSSA stopped with "LiSSA diverged" (one batch's
    # Hessian per step: updates outgrow v while the series converges). Cycling such small batches leaves LiSSA's
    # usual error in the magnitude; the direction is CG's.
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64) * torch.tensor([3, 2, 1, 1, 0.5, 0.2], dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    model = FixedFeatures(4, 6, in_channels=1).double().eval()
    common = {"damping": 0.1, "max_train": 8, "hessian_points": 64, "batch_size": 4}
    data = TensorDataset(x, y)
    lissa = explain(model, x[:1], "energy", ce_loss(), data, method="lissa", depth=200, **common)
    cg = explain(model, x[:1], "energy", ce_loss(), data, method="cg", **common)
    assert lissa.settings["relative_residual"][0] < 0.5
    assert F.cosine_similarity(lissa.id_influence.flatten(), cg.id_influence.flatten(), dim=0) > 0.95


def test_cg_warns_with_the_residual_it_reached_when_max_iter_stops_it() -> None:
    # Eigenvalues 1e-6 .. 1 (condition number 1e6): in floating point CG needs far more than P = 60 iterations (about
    # 400), so the default cap min(P, 200) stops it far from the solution; it used to return that silently. (At 1e4
    # the residual left after 60 iterations is a matter of rounding: 0.45 with AVX2 kernels, 0.08 with AVX-512.)
    eigenvalues = torch.logspace(-6, 0, 60, dtype=torch.float64)

    def hvp(v: Tensor) -> Tensor:
        return eigenvalues * v

    v = torch.ones(60, dtype=torch.float64)
    for max_iter, iterations in ((3, 3), (None, 60)):
        with pytest.warns(UserWarning, match="CG did not converge") as caught:
            x = inverse_hvp(hvp, v, "cg", damping=0.0, tol=1e-8, max_iter=max_iter)
        reached = float((v - hvp(x)).norm() / v.norm())
        assert reached > 0.1
        message = str(caught[0].message)
        assert f"relative residual {reached:.3g} > tol 1e-08 after {iterations} iterations" in message
        assert "raise max_iter or damping (now 0," in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: silent
        x = inverse_hvp(hvp, v, "cg", damping=0.0, tol=1e-8, max_iter=1000)
    assert float((v - hvp(x)).norm() / v.norm()) <= 1e-8


def test_cg_stops_once_the_residual_meets_the_tolerance() -> None:
    # H = I is solved in one step; iterating on hit a zero direction and warned "not positive definite"
    calls = []

    def identity(v: Tensor) -> Tensor:
        calls.append(v)
        return v

    v = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = inverse_hvp(identity, v, "cg", damping=0.0, tol=1e-10)
    torch.testing.assert_close(x, v)
    assert len(calls) == 1


@pytest.mark.parametrize("max_iter", [0, -5])
def test_cg_refuses_a_cap_below_one_iteration(max_iter: int, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=f"max_iter={max_iter}: CG needs at least 1 iteration"):
        inverse_hvp(lambda v: v, torch.ones(3, dtype=torch.float64), "cg", max_iter=max_iter)
    model, (x_in, y_in, _), _, _ = tiny_cnn_setup()

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("explain computed gradients before it checked max_iter")

    # the package's name `explain` is the function: the module from sys.modules
    monkeypatch.setattr(importlib.import_module("gradreg.influence.explain"), "score_gradients", never)
    with pytest.raises(ValueError, match=f"max_iter={max_iter}: CG needs at least 1 iteration"):
        explain(model, x_in[:1], "energy", ce_loss(), TensorDataset(x_in, y_in), max_iter=max_iter)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"method": "CG"}, "method='CG' is not one of cg, lissa"),
        ({"per_sample": "vmapp"}, "per_sample='vmapp' is not one of auto, vmap, loop"),  # ran the loop
        ({"hessian_points": 0}, "hessian_points=0 must be >= 1"),  # a TypeError from F.linear(None)
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),  # ZeroDivisionError
        ({"max_train": -1}, "max_train=-1 must be >= 1 (or None: all)"),  # one point left out without a word
        ({"damping": -5.0}, "damping=-5.0 must be >= 0 and finite, or 'auto'"),  # garbage influences
        ({"damping": math.nan}, "damping=nan must be >= 0 and finite"),
        ({"test": 0}, "at least one test image and one ID training point"),  # torch.stack of an empty list
        ({"train": 0}, "at least one test image and one ID training point"),
    ],
)
def test_explain_refuses_bad_settings_before_any_work(
    setting: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, (x_in, y_in, _), _, _ = tiny_cnn_setup()
    tests, train = setting.pop("test", 1), setting.pop("train", len(x_in))

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("explain computed gradients before it checked its settings")

    monkeypatch.setattr(importlib.import_module("gradreg.influence.explain"), "score_gradients", never)
    data = TensorDataset(x_in[:train], y_in[:train])
    with pytest.raises(ValueError, match=re.escape(message)):
        explain(model, x_in[:tests], "energy", ce_loss(), data, **setting)


def test_per_sample_gradients_refuse_an_unknown_mode() -> None:
    model, (x_in, y_in, _), _, _ = tiny_cnn_setup()
    with pytest.raises(ValueError, match="mode='vmapp' is not one of auto, vmap, loop"):
        per_sample_gradients(model, ce_loss(), x_in, y_in, ["fc.weight"], "id", "vmapp")


def test_explain_records_the_residual_of_an_unconverged_cg_solve(tmp_path) -> None:
    model = TinyNet().double().eval()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    common = {"damping": 1.0, "max_train": 4, "hessian_points": 32, "batch_size": 32, "tol": 1e-12}
    with pytest.warns(UserWarning, match="CG did not converge") as caught:
        result = explain(model, x[:2], "energy", ce_loss(), TensorDataset(x, y), max_iter=1, **common)
    assert len([w for w in caught if "CG did not converge" in str(w.message)]) == 2  # one per test image
    residuals = result.settings["relative_residual"]
    assert min(residuals) > 1e-3
    result.to_json(tmp_path / "influence.json")
    doc = json.loads((tmp_path / "influence.json").read_text())
    assert doc["settings"]["relative_residual"] == residuals
    assert doc["settings"]["max_iter"] == 1
    result = explain(model, x[:2], "energy", ce_loss(), TensorDataset(x, y), **common)
    assert result.settings["max_iter"] == sum(p.numel() for p in model.parameters()) < 200  # the cap applied


# ------------------------------------------------------------------------------------------------- convex case


def newton(model: nn.Module, loss, batch, iters: int = 50) -> None:
    """Minimize ``loss`` over all parameters of ``model`` in place (strictly convex objective)."""
    f, theta = flat_objective(model, loss, batch)
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(f, theta)
        if g.norm() < 1e-13:
            break
        theta = theta - torch.linalg.solve(torch.autograd.functional.hessian(f, theta), g)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, model.parameters())


def test_predicted_leave_one_out_effects_correlate_with_retraining() -> None:
    n, d, c, l2 = 100, 5, 3, 0.02
    x = torch.randn(n, d, dtype=torch.float64)
    y = (x @ torch.randn(d, c, dtype=torch.float64) + 0.8 * torch.randn(n, c, dtype=torch.float64)).argmax(1)
    model = FixedFeatures(c, d, in_channels=1).double().eval()
    loss = ce_loss(l2)
    newton(model, loss, (x, y, None))
    x_test = 2.0 * torch.randn(1, d, dtype=torch.float64)
    scorer = scorers.build("energy")

    result = explain(
        model,
        x_test,
        scorer,
        loss,
        TensorDataset(x, y),
        damping=0.0,
        tol=1e-12,
        max_train=None,
        hessian_points=n,
        batch_size=n,
    )
    assert result.settings["relative_residual"][0] < 1e-8
    influence = result.id_influence[0]
    top = torch.argsort(influence.abs(), descending=True)[:20]

    base = scorer(model, x_test)[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    predicted, actual = [], []
    for i in top.tolist():
        keep = torch.arange(n) != i
        newton(model, loss, (x[keep], y[keep], None))
        actual.append(float(scorer(model, x_test)[0] - base))
        predicted.append(float(-influence[i] / n))  # removal = up-weighting by -1/n
        model.load_state_dict(state)
    pearson = torch.corrcoef(torch.tensor([predicted, actual]))[0, 1]
    assert pearson > 0.9


def test_hessian_batches_average_to_the_mean_objective_when_the_sets_differ_in_size() -> None:
    # make_hvp averages mean_in + mean_out over the Hessian batches: with 64 ID images, 4 outliers and batch_size 8
    # (8 batches) half of the batches had no outlier, so the outlier term of H carried half its weight.
    torch.manual_seed(0)
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    x_out = torch.randn(4, 4, dtype=torch.float64) + 1.0
    model = FixedFeatures(3, 4, in_channels=1).double().eval()

    def loss(model: nn.Module, batch) -> Tensor:  # per-row terms: CE on ID images, a squared LSE on outliers
        x_in, y_in, x_o = batch
        total = x.new_zeros(())
        if x_in is not None:
            total = total + F.cross_entropy(model(x_in), y_in)
        if x_o is not None:
            total = total + torch.logsumexp(model(x_o), 1).pow(2).mean()
        return total

    sets = (TensorDataset(x, y), TensorDataset(x_out, torch.zeros(4)))
    common = {"damping": 0.1, "tol": 1e-12, "max_iter": 100, "max_train": None, "hessian_points": 64}
    chunked = explain(model, x[:2], "energy", loss, *sets, batch_size=8, **common)
    whole = explain(model, x[:2], "energy", loss, *sets, batch_size=64, **common)
    assert chunked.settings["hessian_points"] == [64, 4]
    torch.testing.assert_close(chunked.id_influence, whole.id_influence, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(chunked.outlier_influence, whole.outlier_influence, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------------------- GReg objective


@pytest.mark.parametrize("scaling", ["code", "paper"])
def test_greg_objective_equals_the_training_loss_of_gradreg_losses(scaling: str) -> None:
    model, (x_in, y_in, x_out), m_in, m_out = tiny_cnn_setup()
    objective = greg_objective(m_in, m_out, energy_weight=0.1, reg_weight=1.0, scaling=scaling, train_rows=16)
    inputs = torch.cat([x_in, x_out]).requires_grad_()
    logits = model(inputs)
    e = energy(logits)
    penalty = grad_norm_penalty(inputs, e[:8], e[8:], m_in, m_out, scaling)
    assert 0 < int(penalty.active.sum()) < 16
    expected = F.cross_entropy(logits[:8], y_in) + 0.1 * energy_margin_loss(e[:8], e[8:], m_in, m_out) + penalty.value
    torch.testing.assert_close(objective(model, (x_in, y_in, x_out)), expected, rtol=1e-5, atol=1e-6)


def test_greg_code_scaling_needs_train_rows() -> None:
    with pytest.raises(ValueError, match="train_rows"):
        greg_objective(scaling="code")
    greg_objective(reg_weight=0.0, scaling="code")  # no penalty, nothing to scale


def test_greg_hessian_vector_product_matches_finite_differences() -> None:
    model, batch, m_in, m_out = tiny_cnn_setup(torch.float64)
    objective = greg_objective(m_in, m_out, energy_weight=0.1, reg_weight=1.0, scaling="paper")
    names = select_parameters(model)
    params = dict(model.named_parameters())
    hvp = make_hvp(model, objective, [batch], names)
    v = torch.randn(sum(params[n].numel() for n in names), dtype=torch.float64)

    def flat_grad() -> Tensor:
        return torch.cat(
            [g.flatten() for g in torch.autograd.grad(objective(model, batch), [params[n] for n in names])]
        )

    def shift(step: float) -> None:
        with torch.no_grad():
            offset = 0
            for n in names:
                size = params[n].numel()
                params[n].add_(step * v[offset : offset + size].view_as(params[n]))
                offset += size

    h = 1e-5
    shift(h)
    plus = flat_grad()
    shift(-2 * h)
    minus = flat_grad()
    shift(h)
    finite_difference = (plus - minus) / (2 * h)
    torch.testing.assert_close(hvp(v), finite_difference, rtol=1e-5, atol=1e-7)


def test_per_sample_gradients_vmap_equals_loop_with_penalty() -> None:
    model, (x_in, y_in, x_out), m_in, m_out = tiny_cnn_setup(torch.float64, n=4)
    objective = greg_objective(m_in, m_out, energy_weight=0.1, reg_weight=1.0, scaling="code", train_rows=8)
    names = select_parameters(model)
    for part, x, y in (("id", x_in, y_in), ("outlier", x_out, None)):
        batched = per_sample_gradients(model, objective, x, y, names, part, mode="vmap")
        looped = per_sample_gradients(model, objective, x, y, names, part, mode="loop")
        assert batched.shape == (4, looped.shape[1])
        torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)


class _Wrapper(nn.Module):
    """A user's wrapper that registers the head under a second name (``self.fc = inner.fc``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.fc = inner, inner.fc

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def test_per_sample_gradients_leave_a_module_registered_twice_intact() -> None:
    # torch's functional_call did not restore the head's second name: its weights stayed replaced by detached copies
    # (functorch wrappers under vmap), so that training or scoring the model afterwards went wrong.
    model, (x_in, y_in, _), m_in, m_out = tiny_cnn_setup(torch.float64, n=4)
    wrapped = _Wrapper(model)
    before = dict(wrapped.named_parameters(remove_duplicate=False))
    objective = greg_objective(m_in, m_out, train_rows=8)
    names = select_parameters(model)
    expected = per_sample_gradients(model, objective, x_in, y_in, names, "id", mode="vmap")
    got = per_sample_gradients(wrapped, objective, x_in, y_in, [f"inner.{n}" for n in names], "id", mode="vmap")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    after = dict(wrapped.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(after[n] is p for n, p in before.items())


def test_per_sample_gradients_fall_back_to_a_loop_for_autograd_grad_objectives() -> None:
    model, (x_in, y_in, _), m_in, m_out = tiny_cnn_setup(torch.float64, n=4)

    def official(model: nn.Module, batch) -> Tensor:  # gradreg.losses' penalty calls torch.autograd.grad
        x = batch[0].requires_grad_()
        logits = model(x)
        e = energy(logits)
        return F.cross_entropy(logits, batch[1]) + grad_norm_penalty(x, e, e[:0], m_in, m_out, "paper").value

    names = select_parameters(model)
    with pytest.warns(UserWarning, match="fall back to a loop"):
        looped = per_sample_gradients(model, official, x_in, y_in, names, "id")
    ours = greg_objective(m_in, m_out, energy_weight=0.0, reg_weight=1.0, scaling="paper")
    torch.testing.assert_close(looped, per_sample_gradients(model, ours, x_in, y_in, names, "id", mode="vmap"))


# ------------------------------------------------------------------------------------------------- scorers


@pytest.mark.parametrize("name", ["energy", "msp", "maxlogit", "gradnorm"])
def test_score_gradients_of_output_scorers_match_plain_autograd(name: str) -> None:
    model = SmallCNN(num_classes=3, in_channels=1, width=4).double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    scorer = scorers.build(name)
    names = select_parameters(model)
    scores, grads = score_gradients(model, scorer, x, names)
    params = dict(model.named_parameters())
    for t in range(2):
        score = scorer.score(model, x[t : t + 1]).sum()
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(score, [params[n] for n in names])])
        torch.testing.assert_close(grads[t], expected)
        torch.testing.assert_close(scores[t], score.detach())


def test_non_differentiable_scorer_is_rejected() -> None:
    class Detached(Scorer):
        def score(self, model: nn.Module, x: Tensor) -> Tensor:
            return model(x).amax(1).detach()

    model = SmallCNN(num_classes=3, in_channels=1, width=4).eval()
    with pytest.raises(ValueError, match="not differentiable"):
        score_gradients(model, Detached(), torch.randn(1, 1, 8, 8), select_parameters(model, ["fc"]))


# ------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["cg", "lissa"])
def test_explain_greg_end_to_end_writes_grid_and_json(method: str, tmp_path) -> None:
    model, (x_in, y_in, x_out), m_in, m_out = tiny_cnn_setup(n=16)
    model.train()
    objective = greg_objective(m_in, m_out, energy_weight=0.1, reg_weight=1.0, scaling="code", train_rows=16)
    id_data = TensorDataset(x_in, y_in)
    outlier_data = TensorDataset(x_out, torch.zeros(16, dtype=torch.long))
    x_test = torch.cat([x_in[:1] + 0.1, x_out[:1] + 0.1])
    result = explain(
        model,
        x_test,
        "energy",
        objective,
        id_data,
        outlier_data,
        method=method,
        damping=1.0,
        depth=40,
        max_train=12,
        hessian_points=16,
        batch_size=8,
        test_is_id=[True, False],
        test_ids=[7, 9],
    )
    assert model.training  # mode restored
    assert isinstance(result, InfluenceResult)
    assert result.id_influence.shape == (2, 12)
    assert result.outlier_influence.shape == (2, 12)
    assert torch.isfinite(result.id_influence).all()
    assert torch.isfinite(result.outlier_influence).all()
    assert result.outlier_influence.abs().sum() > 0
    if method == "cg":
        assert max(result.settings["relative_residual"]) < 1e-4

    # helpful for the ID test image = raises its score; for the OOD one = lowers it
    idx, val = result.top(0, 3, "outlier", "helpful")
    assert val[0] == result.outlier_influence[0].max()
    idx, val = result.top(1, 3, "outlier", "helpful")
    assert val[0] == result.outlier_influence[1].min()
    assert idx.tolist()[0] in result.outlier_indices.tolist()

    data = json.loads(result.to_json(tmp_path / "explain.json", k=3))
    assert (tmp_path / "explain.json").exists()
    assert [t["test_id"] for t in data["tests"]] == [7, 9]
    assert len(data["tests"][1]["outlier"]["harmful"]) == 3
    assert data["tests"][1]["is_id"] is False

    png = result.save_grid(
        1, x_test[1], tmp_path / "grid" / "ood_9.png", id_data, outlier_data, k=3, mean=[0.5], std=[0.25]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_helpful_and_harmful_lists_hold_only_points_that_push_the_score_that_way(tmp_path) -> None:
    influence = torch.tensor([[0.5, -0.2, 0.0, 0.3], [0.5, -0.2, 0.0, 0.3]])
    result = InfluenceResult(
        test_scores=torch.zeros(2),
        id_indices=torch.tensor([10, 11, 12, 13]),
        id_influence=influence,
        outlier_indices=torch.tensor([20, 21, 22, 23]),
        outlier_influence=-influence.abs(),  # no outlier raises the score
        test_is_id=[True, False],
        test_ids=[0, 1],
        param_names=["fc.weight"],
    )
    # ID test image: helpful = raises its score, harmful = lowers it; a zero influence is neither
    assert result.top(0, 3, "id", "helpful")[0].tolist() == [10, 13]
    assert result.top(0, 3, "id", "harmful")[0].tolist() == [11]
    # OOD test image: the other way round
    assert result.top(1, 3, "id", "helpful")[0].tolist() == [11]
    assert result.top(1, 3, "id", "harmful")[0].tolist() == [10, 13]
    assert result.top(1, 3, "outlier", "helpful")[0].tolist() == [20, 23, 21]
    assert result.top(1, 3, "outlier", "harmful")[0].tolist() == []
    # a misspelt kind gave the harmful list, an unknown subset the outliers
    with pytest.raises(ValueError, match="kind='Helpful' is not one of helpful, harmful"):
        result.top(0, 3, "id", "Helpful")
    with pytest.raises(ValueError, match="subset='ood' is not one of id, outlier"):
        result.top(0, 3, "ood", "helpful")
    with pytest.raises(ValueError, match="k=-1 must be >= 0"):  # all but the last
        result.top(0, -1, "id", "helpful")
    entry = result.to_dict(k=3)["tests"][1]
    assert [e["index"] for e in entry["outlier"]["harmful"]] == []
    assert [e["influence"] for e in entry["id"]["harmful"]] == pytest.approx([0.5, 0.3])
    data = TensorDataset(torch.randn(30, 1, 4, 4), torch.zeros(30, dtype=torch.long))
    assert list(result.grid_rows(1, 3, data, data)) == ["ID helpful", "ID harmful", "outlier helpful"]
    assert result.save_grid(1, torch.randn(1, 4, 4), tmp_path / "g.png", data, data, k=3).stat().st_size > 0


def test_ground_truth_and_ids_given_as_numpy_or_torch_values_mean_the_same(tmp_path) -> None:
    # numpy's False is not `False`: its OOD test image read as ID (helpful and harmful swapped); JSON refused it
    import numpy as np

    influence = torch.tensor([[0.5, -0.2]])
    common = {
        "test_scores": torch.zeros(1), "id_indices": torch.tensor([10, 11]), "id_influence": influence,
        "outlier_indices": torch.tensor([20, 21]), "outlier_influence": influence, "param_names": ["fc.weight"],
    }  # fmt: skip
    plain = InfluenceResult(**common, test_is_id=[False], test_ids=[7])
    for is_id, test_id in [(list(np.array([False])), np.int64(7)), (list(torch.tensor([False])), torch.tensor(7))]:
        result = InfluenceResult(**common, test_is_id=is_id, test_ids=[test_id])
        assert result.top(0, 2, "id", "helpful")[0].tolist() == plain.top(0, 2, "id", "helpful")[0].tolist() == [11]
        assert result.to_json(tmp_path / "r.json") == plain.to_json(tmp_path / "p.json")


def test_explanation_grid_handles_rgb_images(tmp_path) -> None:
    rows = {"ID helpful": (torch.randn(2, 3, 8, 8), [4, 5], [0.1, 0.05])}
    path = save_explanation_grid(torch.randn(3, 8, 8), rows, tmp_path / "g.png", [0.5] * 3, [0.2] * 3)
    assert path.stat().st_size > 0


def test_hardest_examples_are_low_id_and_high_ood_scores() -> None:
    id_idx, ood_idx = hardest_examples(torch.tensor([0.5, -2.0, 1.0]), torch.tensor([-1.0, 3.0, 0.0]), 2)
    assert id_idx.tolist() == [1, 0]
    assert ood_idx.tolist() == [1, 2]


def test_auto_damping_doubles_until_cg_meets_no_negative_curvature(monkeypatch: pytest.MonkeyPatch) -> None:
    explain_module = importlib.import_module("gradreg.influence.explain")  # the package exports a function of that name
    model = TinyNet().double().eval()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    loss = ce_loss()
    f, theta = flat_objective(model, loss, (x, y, None))
    lowest = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, theta)).min())
    assert lowest < -1e-3  # the tanh net's Hessian is indefinite
    # An under-estimate of |lambda|_max, as 20 power iterations give when the top eigenvalues are close.
    monkeypatch.setattr(explain_module, "top_eigenvalue", lambda *args, **kw: 1e-4)
    common = {"max_train": 8, "hessian_points": 32, "batch_size": 32, "tol": 1e-12}
    with pytest.warns(UserWarning, match="non-positive curvature"):  # that damping itself fails
        explain(model, x[:2], "energy", loss, TensorDataset(x, y), damping=1.01e-4, **common)
    result = explain(model, x[:2], "energy", loss, TensorDataset(x, y), damping="auto", **common)
    used = result.settings["damping"]
    assert used > -lowest
    assert math.log2(used / 1.01e-4) == pytest.approx(round(math.log2(used / 1.01e-4)))  # 1.01e-4 doubled k times
    assert max(result.settings["relative_residual"]) < 1e-8


def test_greg_objective_energy_hinges_point_the_right_way() -> None:
    # tiny_cnn_setup's energies spread by ~0.02 around the margins: its squared hinges (~1e-5) hide under the
    # tolerance of the equality test, so flipping the ID hinge to relu(m_in - E)^2 went unnoticed. Here every row
    # is a full unit past (or short of) its margin. reg_weight=1 with every gate closed runs the penalty branch.
    model, (x_in, y_in, x_out), _, _ = tiny_cnn_setup(torch.float64)
    with torch.no_grad():
        e_in, e_out = energy(model(x_in)), energy(model(x_out))
        ce = F.cross_entropy(model(x_in), y_in)
    batch = (x_in, y_in, x_out)
    # ID energies above m_in and outlier energies below m_out: both squared hinges active on every row
    m_in, m_out = float(e_in.min()) - 1.0, float(e_out.max()) + 1.0
    expected = ce + (e_in - m_in).pow(2).mean() + (m_out - e_out).pow(2).mean()
    for reg_weight in (0.0, 1.0):  # penalty gates all closed: the same value through both branches
        objective = greg_objective(m_in, m_out, energy_weight=1.0, reg_weight=reg_weight, scaling="paper")
        torch.testing.assert_close(objective(model, batch).detach(), expected, rtol=1e-12, atol=1e-12)
    # every row on the right side of its margin: the hinges are silent (only CE and the penalty remain)
    m_in, m_out = float(e_in.max()) + 1.0, float(e_out.min()) - 1.0
    objective = greg_objective(m_in, m_out, energy_weight=1.0, reg_weight=0.0, scaling="paper")
    torch.testing.assert_close(objective(model, batch).detach(), ce, rtol=1e-12, atol=1e-12)


def test_per_sample_gradients_are_the_gradients_of_the_single_point_objective() -> None:
    # vmap-vs-loop compared the library with itself; an ID point's "single" batch that also fed the image in as an
    # outlier, (x_i, y_i, x_i), passed it. Reference: plain autograd on (x_i, y_i, None) and (None, None, x_i).
    model, (x_in, y_in, x_out), m_in, m_out = tiny_cnn_setup(torch.float64, n=4)
    objective = greg_objective(m_in, m_out, energy_weight=0.1, reg_weight=1.0, scaling="paper")
    names = select_parameters(model)
    params = dict(model.named_parameters())

    def reference(batch) -> Tensor:
        grads = torch.autograd.grad(objective(model, batch), [params[n] for n in names])
        return torch.cat([g.flatten() for g in grads])

    expected_id = torch.stack([reference((x_in[i : i + 1], y_in[i : i + 1], None)) for i in range(4)])
    expected_out = torch.stack([reference((None, None, x_out[i : i + 1])) for i in range(4)])
    for mode in ("vmap", "loop"):
        got_id = per_sample_gradients(model, objective, x_in, y_in, names, "id", mode=mode)
        got_out = per_sample_gradients(model, objective, x_out, None, names, "outlier", mode=mode)
        torch.testing.assert_close(got_id, expected_id, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_out, expected_out, rtol=1e-10, atol=1e-12)


def test_lissa_repeats_are_averaged() -> None:
    # with a deterministic hvp every repeat gives the same estimate: their mean is the solution, their sum is not
    h = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    v = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    exact = v / (h + 0.5)
    for repeats in (1, 3):
        solution = inverse_hvp(
            lambda u: h * u, v, "lissa", damping=0.5, scale=5.0, depth=500, repeats=repeats, tol=1e-14
        )
        torch.testing.assert_close(solution, exact, rtol=1e-10, atol=1e-12)


def test_unknown_ground_truth_reads_helpful_as_raising_the_score() -> None:
    # test_is_id=None (unknown): "helpful" = raises the ID-score, as for an ID image (the class docstring)
    influence = torch.tensor([[0.5, -0.2, 0.3]])
    result = InfluenceResult(
        test_scores=torch.zeros(1),
        id_indices=torch.tensor([10, 11, 12]),
        id_influence=influence,
        outlier_indices=torch.tensor([20, 21, 22]),
        outlier_influence=influence,
        test_is_id=[None],
        test_ids=[0],
        param_names=["fc.weight"],
    )
    assert result.top(0, 3, "id", "helpful")[0].tolist() == [10, 12]
    assert result.top(0, 3, "id", "harmful")[0].tolist() == [11]
    assert result.to_dict(k=3)["tests"][0]["is_id"] is None


def test_hessian_loss_sets_the_hessian_and_train_loss_the_training_gradients() -> None:
    # ce_loss(l2)'s Hessian is ce_loss()'s plus l2 * I: inverting it with damping d is inverting ce_loss()'s with
    # damping d + l2. The per-sample gradients stay those of train_loss (ce_loss(l2)'s would add l2 * theta).
    # A hessian_loss that explain ignored (or used for the training gradients) passed every other test.
    torch.manual_seed(0)
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = FixedFeatures(3, 4, in_channels=1).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # theta far from 0: l2 * theta in a gradient would show
    common = {"tol": 1e-12, "max_train": None, "hessian_points": 40, "batch_size": 40}
    data = TensorDataset(x, y)
    split = explain(model, x[:2], "energy", ce_loss(), data, hessian_loss=ce_loss(l2=1.0), damping=0.1, **common)
    shifted = explain(model, x[:2], "energy", ce_loss(), data, damping=1.1, **common)
    assert split.settings["hessian_loss"] != "train_loss"
    torch.testing.assert_close(split.id_influence, shifted.id_influence, rtol=1e-8, atol=1e-12)
    plain = explain(model, x[:2], "energy", ce_loss(), data, damping=0.1, **common)
    assert (plain.id_influence - shifted.id_influence).abs().max() > 1e-3  # the Hessian made a difference


def test_lissa_default_scale_includes_the_damping() -> None:
    # scale=None is 1.1 |lambda|_max + damping: without the damping term a damping above ~1.2 lambda_max makes
    # scale < (lambda_max + damping) / 2 and the series diverges
    h = torch.tensor([0.1, 0.05, 0.02], dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    solution = inverse_hvp(lambda u: h * u, v, "lissa", damping=1.0, depth=200, tol=1e-14)
    torch.testing.assert_close(solution, v / (h + 1.0), rtol=1e-10, atol=1e-12)
