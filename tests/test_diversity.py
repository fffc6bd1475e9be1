"""Gradient diversity: exact Δ_D (ghost norms + torch.func) against a per-example loop, known
cases, mechanisms, differential diversity and the online estimators."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from raygd import diversity as D
from raygd.config import MODELS, DataConfig, MechanismConfig
from raygd.data import GlobalBatchSampler, load_data, replicate
from raygd.diversity import per_example as per_example_module
from raygd.diversity import rules as rules_module
from raygd.loss import summed_loss
from raygd.mechanisms import build_mechanism
from raygd.mechanisms.dropconnect_linear import DropConnectLinear, dropconnect_masks
from raygd.mechanisms.qsgd import qsgd_quantize
from raygd.models import MnistCNN, build_model
from tests.dist import run_group

SHAPES = {
    "logreg": (1, 28, 28),
    "logreg_binary": (1, 28, 28),
    "mnist_cnn": (1, 28, 28),
    "convnet": (3, 32, 32),
    "resnet": (3, 32, 32),
}
F64 = torch.float64


# --------------------------------------------------------------------------- references


def brute_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """(N, d) float64 per-example gradients: one forward and backward per example."""
    if params is None:
        params = {n: p.detach().to(F64).requires_grad_() for n, p in model.named_parameters()}
    buffers = {n: b.to(F64) if b.is_floating_point() else b for n, b in model.named_buffers()}
    rows = []
    for i in range(x.shape[0]):
        logits = functional_call(model, (params, buffers), (x[i : i + 1].to(F64),))
        grads = torch.autograd.grad(summed_loss(logits, y[i : i + 1]), list(params.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def brute_diversity(g: torch.Tensor) -> float:
    """Δ = Σ‖g_i‖² / ‖Σ g_i‖² from (N, d) per-example gradients."""
    return float(g.square().sum() / g.sum(0).square().sum())


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def small_model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    k = 2 if name == "logreg_binary" else 10
    n = 12 if name == "resnet" else 16
    return build_model(name, SHAPES[name], k), torch.randn(n, *SHAPES[name]), torch.randint(k, (n,))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many tiny ops: one thread is faster, and steady when other processes load the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(idx_dir):
    return load_data(DataConfig(name="fashion_mnist", data_dir=str(idx_dir), eval_size=100), seed=0)


@pytest.fixture(scope="module")
def logreg_at(data):
    """{"untrained": model, "trained": model}: logistic regression before/after 300 SGD steps."""
    torch.manual_seed(0)
    untrained = build_model("logreg", data.input_shape, data.num_classes)
    trained = build_model("logreg", data.input_shape, data.num_classes)
    trained.load_state_dict(untrained.state_dict())
    opt = torch.optim.SGD(trained.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(data.n, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(trained(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    return {"untrained": untrained, "trained": trained}


# --------------------------------------------------------------------------- exact Δ_D


@pytest.mark.parametrize("method", ["ghost", "func"])
@pytest.mark.parametrize("name", MODELS)
def test_exact_diversity_matches_a_per_example_loop(name, method):
    model, x, y = small_model(name)
    g = brute_grads(model, x, y)
    got = D.gradient_diversity(model, x, y, batch_size=5, dtype=F64, method=method)  # 3-4 batches
    assert got.n == x.shape[0]
    assert rel(got.delta, brute_diversity(g)) < 1e-5
    assert rel(got.batch_bound, x.shape[0] * brute_diversity(g)) < 1e-5
    params, buffers = D.functional_state(model, F64)
    sq, summed = D.per_example_sq_norms(model, x.to(F64), y, params=params, buffers=buffers, method=method)
    assert torch.allclose(sq, g.square().sum(1), rtol=1e-5, atol=0)
    assert torch.allclose(torch.cat([s.reshape(-1) for s in summed]), g.sum(0), rtol=1e-7, atol=1e-10)


def test_resnet_groupnorm_goes_to_the_fallback_and_convs_to_the_ghost_path():
    ghost = D.GhostNorms(build_model("resnet", SHAPES["resnet"], 10))
    assert ghost.uncovered and all(".norm" in n or "stem.1" in n or "shortcut.1" in n for n in ghost.uncovered)
    assert any("conv" in n for n in ghost.covered) and "head.2.weight" in ghost.covered


class SeqNet(nn.Module):
    """Linear on (N, T, p) sequence input, then a classifier on the flattened sequence."""

    def __init__(self, t: int, p: int, q: int):
        super().__init__()
        self.seq, self.out = nn.Linear(p, q), nn.Linear(t * q, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.seq(x)).flatten(1))


def conv_net(conv: nn.Conv2d, side: int) -> nn.Module:
    with torch.no_grad():
        out = conv(torch.zeros(1, conv.in_channels, side, side)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out, 3))


# (case, builder, input shape, expected route of the layer under test or None for the fallback)
ROUTE_CASES = [
    ("linear_seq_gram", lambda: SeqNet(3, 16, 16), (3, 16), ("gram", 3, 16, 16, "linear")),
    ("linear_seq_per_example", lambda: SeqNet(20, 4, 4), (20, 4), ("per_example", 20, 4, 4, "linear")),
    (
        "conv_per_example_stride_dilation",
        lambda: conv_net(nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2), 9),
        (2, 9, 9),
        ("per_example", 25, 18, 4),
    ),
    ("conv_gram", lambda: conv_net(nn.Conv2d(16, 32, 3), 4), (16, 4, 4), ("gram", 4, 144, 32)),
    (
        "conv_reflect_padding",
        lambda: conv_net(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), 6),
        (2, 6, 6),
        ("per_example", 36, 18, 3),
    ),
    ("conv_groups_fallback", lambda: conv_net(nn.Conv2d(4, 4, 3, groups=2), 5), (4, 5, 5), None),
    (
        "dropconnect_linear_eval",
        lambda: nn.Sequential(nn.Flatten(), DropConnectLinear(12, 3, p=0.5).eval()),
        (3, 4),
        None,
    ),
]


@pytest.mark.parametrize("case,build,shape,route", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_ghost_routes_match_a_per_example_loop(case, build, shape, route, monkeypatch):
    torch.manual_seed(1)
    model = build()
    x, y = torch.randn(10, *shape), torch.randint(3, (10,))
    gram_calls = []
    gram = rules_module._gram_sq_norms
    monkeypatch.setattr(rules_module, "_gram_sq_norms", lambda a, d: gram_calls.append(a.shape) or gram(a, d))
    ghost = D.GhostNorms(model)
    assert bool(ghost.uncovered) == (case == "conv_groups_fallback")
    g = brute_grads(model, x, y)
    got = D.gradient_diversity(model, x, y, batch_size=4, dtype=F64)
    assert rel(got.delta, brute_diversity(g)) < 1e-5
    if route is not None:  # the layer under test took the route its FLOPs choose
        assert D.ghost_route(*route[1:]) == route[0]
        assert bool(gram_calls) == (route[0] == "gram")
    params, buffers = D.functional_state(model, F64)
    sq, _ = D.per_example_sq_norms(model, x.to(F64), y, params=params, buffers=buffers)
    assert torch.allclose(sq, g.square().sum(1), rtol=1e-5, atol=0)


def test_ghost_norms_leave_the_gradients_unchanged_and_scale_with_the_mean_loss():
    torch.manual_seed(0)
    model = MnistCNN(widths=(8, 16, 32)).to(F64)
    x, y = torch.randn(12, 1, 28, 28, dtype=F64), torch.randint(10, (12,))
    F.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with D.GhostNorms(model) as ghost:
        F.cross_entropy(model(x), y).backward()  # mean loss: example i contributes g_i / N
    for p, expected in zip(model.parameters(), plain, strict=True):
        assert torch.allclose(p.grad, expected, rtol=1e-10, atol=1e-14)
    g = brute_grads(model, x, y)
    assert torch.allclose(ghost.sq_norms() * 12**2, g.square().sum(1), rtol=1e-9, atol=0)
    assert "forward" not in vars(model.features[0])  # the patch is undone on exit


# --------------------------------------------------------------------------- closed form: logistic regression


def _frozen(model: nn.Module, name: str) -> nn.Module:
    model.get_parameter(name).requires_grad_(False)
    return model


# (case, builder, input shape, classes): each is a linear softmax model the closed form must take
CLOSED_FORM_CASES = [
    ("logreg", lambda: build_model("logreg", (1, 6, 5), 4), (1, 6, 5), 4),
    ("logreg_binary", lambda: build_model("logreg_binary", (1, 6, 5), 2), (1, 6, 5), 2),
    ("linear_no_bias", lambda: nn.Linear(30, 4, bias=False), (30,), 4),
    ("flatten_linear", lambda: nn.Sequential(nn.Flatten(), nn.Linear(30, 3)), (5, 6), 3),
    ("logreg_frozen_bias", lambda: _frozen(build_model("logreg", (30,), 4), "linear.bias"), (30,), 4),
    ("binary_frozen_weight", lambda: _frozen(build_model("logreg_binary", (30,), 2), "linear.weight"), (30,), 2),
]


def trainable_brute_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``brute_grads`` restricted to the trainable parameters (frozen ones held fixed)."""
    trainable = [p.requires_grad for p in model.parameters()]
    g = brute_grads(model, x, y)
    sizes = [p.numel() for p in model.parameters()]
    return torch.cat([part for part, keep in zip(g.split(sizes, 1), trainable, strict=True) if keep], 1)


@pytest.mark.parametrize("case,build,shape,k", CLOSED_FORM_CASES, ids=[c[0] for c in CLOSED_FORM_CASES])
def test_closed_form_matches_a_per_example_loop(case, build, shape, k, monkeypatch):
    torch.manual_seed(3)
    model = build()
    x, y = 2 * torch.randn(9, *shape), torch.randint(k, (9,))
    assert D.linear_softmax(model) is not None
    calls = []
    closed_form = per_example_module.linear_softmax_sq_norms
    monkeypatch.setattr(per_example_module, "linear_softmax_sq_norms", lambda *a: calls.append(1) or closed_form(*a))
    g = trainable_brute_grads(model, x, y)
    got = D.gradient_diversity(model, x, y, batch_size=4, dtype=F64)
    assert len(calls) == 3  # every batch took the closed form, no backward
    assert rel(got.delta, brute_diversity(g)) < 1e-10
    params, buffers = D.functional_state(model, F64)
    sq, summed = D.per_example_sq_norms(model, x.to(F64), y, params=params, buffers=buffers)
    assert torch.allclose(sq, g.square().sum(1), rtol=1e-10, atol=0)
    assert torch.allclose(torch.cat([s.reshape(-1) for s in summed]), g.sum(0), rtol=1e-10, atol=1e-12)
    # In a training step (mean loss, float32): the light GhostNorms route, same gradients as without it.
    F.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    with D.GhostNorms(model) as ghost:
        F.cross_entropy(model(x), y).backward()
    assert ghost._logits is not None  # the light route kept the logits (no autograd.Function ran)
    assert torch.allclose(ghost.sq_norms() * 9**2, g.square().sum(1), rtol=1e-5, atol=0)
    assert all(
        torch.equal(p.grad, e) for p, e in zip([p for p in model.parameters() if p.requires_grad], plain, strict=True)
    )


def test_binary_closed_form_is_the_logistic_loss_derivative():
    """Logits [0, z]: ‖g_i‖² = (σ(z_i) − y_i)²(‖x_i‖² + 1), half of ‖p_i − e_{y_i}‖²(‖x_i‖² + 1)."""
    torch.manual_seed(0)
    model = build_model("logreg_binary", (7,), 2).to(F64)
    x, y = torch.randn(6, 7, dtype=F64), torch.tensor([0, 1, 1, 0, 1, 0])
    z = model.linear(x).detach().squeeze(1)
    expected = (torch.sigmoid(z) - y).square() * (x.square().sum(1) + 1)
    p = torch.softmax(model(x).detach(), 1)
    assert torch.allclose(expected, 0.5 * (p - F.one_hot(y, 2)).square().sum(1) * (x.square().sum(1) + 1))
    assert torch.allclose(D.per_example_sq_norms(model, x, y)[0], expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"labels in \{0, 1\}"):
        D.per_example_sq_norms(model, x, torch.tensor([0, 1, 2, 0, 1, 0]))


class ShiftedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


class LogRegWithTemperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.temperature = nn.Linear(12, 3), nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) * self.temperature


NOT_CLOSED_FORM = [
    ("linear_relu", lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.ReLU())),
    ("linear_subclass", lambda: nn.Sequential(nn.Flatten(), ShiftedLinear(12, 3))),
    ("extra_parameter", LogRegWithTemperature),
    ("flatten_from_dim_2", lambda: nn.Sequential(nn.Flatten(2), nn.Linear(4, 3))),
    ("dropconnect_eval", lambda: nn.Sequential(nn.Flatten(), DropConnectLinear(12, 3, p=0.5)).eval()),
]


@pytest.mark.parametrize("case,build", NOT_CLOSED_FORM, ids=[c[0] for c in NOT_CLOSED_FORM])
def test_other_models_keep_the_ghost_path_and_stay_exact(case, build):
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(7, 3, 4), torch.randint(3, (7,))
    if case == "flatten_from_dim_2":
        y = torch.randint(3, (7, 3))  # logits (N, 3 positions, 3 classes): a sequence model
    assert D.linear_softmax(model) is None
    assert rel(D.gradient_diversity(model, x, y, dtype=F64).delta, brute_diversity(brute_grads(model, x, y))) < 1e-5


def test_batchnorm_in_train_mode_is_a_clear_error_and_eval_mode_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(3, (8,))
    for call in (
        lambda: D.gradient_diversity(model, x, y),
        lambda: D.GhostNorms(model).__enter__(),
        lambda: D.per_example_sq_norms(model, x, y, method="func"),
    ):
        with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\) is in train mode.*model\.eval\(\)"):
            call()
    model.eval()
    assert rel(D.gradient_diversity(model, x, y, dtype=F64).delta, brute_diversity(brute_grads(model, x, y))) < 1e-5


def test_dropconnect_in_train_mode_is_an_error_and_a_layer_called_twice_falls_back():
    dc = nn.Sequential(nn.Flatten(), DropConnectLinear(12, 3, p=0.5))
    x, y = torch.randn(4, 3, 4), torch.randint(3, (4,))
    with pytest.raises(ValueError, match=r"DropConnectLinear.*model\.eval\(\).*dropconnect_diversity"):
        D.gradient_diversity(dc, x, y)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model, x, y = Twice(), torch.randn(4, 3), torch.randint(3, (4,))
    twice = r"'lin' \(Linear\) is called twice.*method='func'"
    with pytest.raises(D.GhostUnsupported, match=twice), D.GhostNorms(model):
        model(x)
    # The exact path measures such a layer with torch.func (the runtime fallback), exactly.
    got = D.gradient_diversity(model, x, y, dtype=F64)
    assert rel(got.delta, brute_diversity(brute_grads(model, x, y))) < 1e-9
    assert rel(D.gradient_diversity(model, x, y, method="func").delta, got.delta) < 1e-4


# --------------------------------------------------------------------------- known cases


@pytest.mark.parametrize("name", ["logreg", "mnist_cnn"])
def test_identical_examples_give_batch_bound_one(name):
    model, x, y = small_model(name)
    n = 9
    got = D.gradient_diversity(model, x[:1].expand(n, *x.shape[1:]), y[:1].expand(n), dtype=F64)
    assert abs(got.delta - 1 / n) < 1e-9 and abs(got.batch_bound - 1) < 1e-8


def orthogonal_case(n: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Linear without bias on one-hot inputs e_i: g_i = δ_i e_iᵀ occupy disjoint columns."""
    torch.manual_seed(0)
    return nn.Linear(n + 2, 3, bias=False), torch.eye(n + 2)[:n] * 2.0, torch.randint(3, (n,))


def test_orthogonal_per_example_gradients_give_batch_bound_n():
    model, x, y = orthogonal_case()
    got = D.gradient_diversity(model, x, y, dtype=F64)
    assert abs(got.delta - 1) < 1e-12 and abs(got.batch_bound - x.shape[0]) < 1e-10


def test_replication_lowers_the_batch_bound(data, logreg_at):
    model = logreg_at["trained"]
    bounds = {}
    for r in (1, 4, 16):
        per_seed = []
        for seed in range(3):
            idx = replicate(data.n, r, torch.Generator().manual_seed(seed))
            per_seed.append(D.gradient_diversity(model, data.x_train[idx], data.y_train[idx], dtype=F64).batch_bound)
        bounds[r] = sum(per_seed) / 3
        if r > 1:
            assert max(per_seed) < bounds[1]
    print("B_D by replication factor:", bounds)
    assert bounds[1] > bounds[4] > bounds[16]


# --------------------------------------------------------------------------- mechanisms


def test_sgld_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    g = torch.randn(5, 40, dtype=F64) + 0.5
    base = D.Diversity(5, float(g.square().sum()), float(g.sum(0).square().sum()))
    got = D.sgld_diversity(base, 0.3, 40)
    noisy = g + 0.3 * torch.randn(20000, 5, 40, dtype=F64)
    assert rel(got.sum_sq_norms, float(noisy.square().sum((1, 2)).mean())) < 0.01
    assert rel(got.sum_grad_sq_norm, float(noisy.sum(1).square().sum(1).mean())) < 0.02


def test_qsgd_variance_matches_the_mechanism_by_monte_carlo():
    torch.manual_seed(0)
    v = torch.randn(3, 50)
    v[2, :16] = 0.0  # a zero bucket
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([torch.stack([qsgd_quantize(r, 4, 16, gen) for r in v]) for _ in range(3000)])
    mc = (draws.to(F64) - v.to(F64)).square().sum(2).mean(0)
    exact = D.qsgd_variance(v.to(F64), 4, 16)
    assert torch.allclose(exact, mc, rtol=0.03)


def test_dropconnect_masked_per_example_gradients_match_a_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x, y = torch.randn(4, 6, dtype=F64), torch.randint(3, (4,))
    params, buffers = D.functional_state(model, None)
    gen = torch.Generator().manual_seed(0)
    masks = {n: dropconnect_masks((4, *params[n].shape), 0.5, gen, F64) for n in ("0.weight", "2.weight")}
    got = torch.cat(
        [g.reshape(4, -1) for g in D.per_example_grads(model, x, y, params, buffers, weight_masks=masks).values()], 1
    )
    for i in range(4):
        masked = {n: (t * masks[n][i] if n in masks else t).detach().requires_grad_() for n, t in params.items()}
        g = brute_grads(model, x[i : i + 1], y[i : i + 1], masked)[0]
        mask_flat = torch.cat(
            [masks[n][i].reshape(-1) if n in masks else torch.ones(t.numel(), dtype=F64) for n, t in params.items()]
        )
        assert torch.allclose(got[i], g * mask_flat, rtol=1e-10, atol=1e-14)
    exact = D.gradient_diversity(model, x, y)
    assert rel(D.dropconnect_diversity(model, x, y, 0.0, num_draws=2).delta, exact.delta) < 1e-9


@pytest.mark.parametrize("state", ["untrained", "trained"])
@pytest.mark.parametrize(
    "mechanism",
    [
        MechanismConfig(name="dropconnect", drop_prob=0.5),
        MechanismConfig(name="sgld", sgld_sigma=0.01),
        MechanismConfig(name="quantize", quant_levels=4, quant_bucket_size=512),
    ],
    ids=["dropconnect", "sgld", "quantize"],
)
def test_mechanisms_do_not_lower_the_batch_bound(data, logreg_at, mechanism, state):
    model = logreg_at[state]
    x, y = data.x_train[:128], data.y_train[:128]
    base = D.gradient_diversity(model, x, y, dtype=F64)
    assert base.batch_bound <= base.n  # the paper's condition for B^DIM >= B_D
    got = build_mechanism(mechanism).surrogate_diversity(
        model, x, y, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    print(f"{mechanism.name} at {state} w: B_D = {base.batch_bound:.2f}, B_D^DIM = {got.batch_bound:.2f}")
    assert base.batch_bound < got.batch_bound <= base.n


# --------------------------------------------------------------------------- differential diversity


def test_differential_diversity_matches_a_per_example_loop():
    torch.manual_seed(0)
    model, other = MnistCNN(widths=(4, 8, 16)), MnistCNN(widths=(4, 8, 16))
    x, y = torch.randn(10, 1, 28, 28), torch.randint(10, (10,))
    diff = brute_grads(model, x, y) - brute_grads(other, x, y)
    got = D.differential_diversity(model, other, x, y, chunk_size=4, dtype=F64)
    assert rel(got.delta, brute_diversity(diff)) < 1e-5 and got.n == 10
    by_dict = D.differential_diversity(model, dict(other.named_parameters()), x, y, dtype=F64)
    assert rel(by_dict.batch_bound, got.batch_bound) < 1e-12


@pytest.mark.parametrize("name, k", [("logreg", 10), ("logreg_binary", 2)])
def test_logistic_regression_differential_diversity_closed_form_matches_a_per_example_loop(name, k):
    torch.manual_seed(0)
    model, other = build_model(name, (1, 28, 28), k), build_model(name, (1, 28, 28), k)
    x, y = torch.randn(20, 1, 28, 28), torch.randint(k, (20,))
    assert D.linear_softmax(model) is not None  # the closed-form route
    diff = brute_grads(model, x, y) - brute_grads(other, x, y)
    got = D.differential_diversity(model, other, x, y, dtype=F64)
    assert rel(got.delta, brute_diversity(diff)) < 1e-9 and got.n == 20


def test_differential_diversity_known_cases():
    model, x, y = orthogonal_case()
    other = nn.Linear(x.shape[1], 3, bias=False)
    assert abs(D.differential_diversity(model, other, x, y, dtype=F64).batch_bound - x.shape[0]) < 1e-9
    logreg, other_logreg = build_model("logreg", (8,), 3), build_model("logreg", (8,), 3)
    same_x, same_y = torch.randn(1, 8).expand(7, 8), torch.tensor([1]).expand(7)
    got = D.differential_diversity(logreg, other_logreg, same_x, same_y, dtype=F64)
    assert abs(got.delta - 1 / 7) < 1e-12 and abs(got.batch_bound - 1) < 1e-10


# --------------------------------------------------------------------------- online estimators


def exact_moments(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> D.Moments:
    exact = D.gradient_diversity(model, x, y, dtype=F64)
    return D.Moments(exact.sum_sq_norms / exact.n, exact.sum_grad_sq_norm / exact.n**2)


def ghost_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """What the training loop sees: (Σ_i‖g_i‖², ‖Σ_i g_i‖²) from one mean-loss backward."""
    model.zero_grad()
    with D.GhostNorms(model) as ghost:
        F.cross_entropy(model(x), y).backward()
    b = x.shape[0]
    return float(ghost.sq_norms().sum()) * b**2, D.grad_sq_norm(model) * b**2


@pytest.mark.parametrize("sampling", ["with_replacement", "shuffle"])
def test_in_step_estimates_are_unbiased(data, logreg_at, sampling):
    model, b, steps = logreg_at["trained"], 128, 400
    exact = exact_moments(model, data.x_train, data.y_train)
    sampler = GlobalBatchSampler(data.n, b, sampling, seed=0)
    population = data.n if sampling == "shuffle" else None  # without replacement: corrected
    est = [
        D.in_step_moments(*ghost_step(model, data.x_train[i], data.y_train[i]), b, population)
        for i in map(sampler.global_batch, range(steps))
    ]
    mean = [sum(e[k] for e in est) / steps for k in range(2)]
    print(f"in-step ({sampling}): exact {exact}, mean of {steps} batches {mean}")
    assert rel(mean[0], exact.expected_sq_norm) < 0.05
    assert rel(mean[1], exact.sq_norm_of_mean) < 0.05


def test_in_step_and_two_batch_estimators_are_exact_on_the_whole_population():
    torch.manual_seed(0)
    g = torch.randn(10, 7, dtype=F64) + 0.3
    s, total = g.square().sum(1), g.sum(0)
    truth = D.Moments(float(s.mean()), float(g.mean(0).square().sum()))
    got = D.in_step_moments(float(s.sum()), float(total.square().sum()), 10, population_size=10)
    assert all(abs(a - b) < 1e-12 for a, b in zip(got, truth, strict=True))
    uncorrected = D.in_step_moments(float(s.sum()), float(total.square().sum()), 10)
    assert abs(uncorrected.sq_norm_of_mean - truth.sq_norm_of_mean) > 1e-3
    # B = n without replacement: the big batch is the population, so v_B = 0 and ‖μ‖² = ‖G_B‖².
    halves = [float(g[:5].mean(0).square().sum()), float(g[5:].mean(0).square().sum())]
    two = D.two_batch_moments(sum(halves) / 2, 5, truth.sq_norm_of_mean, 10, population_size=10)
    assert abs(two.sq_norm_of_mean - truth.sq_norm_of_mean) < 1e-12
    assert math.isnan(D.two_batch_moments(1.0, 8, 1.0, 8).batch_bound)
    assert math.isnan(D.in_step_moments(1.0, 1.0, 1).expected_sq_norm)


@pytest.mark.parametrize("replacement", [True, False])
def test_online_estimators_average_to_the_truth_over_every_possible_batch(replacement):
    """Unbiasedness, exactly: n = 5 per-example gradients, B = 4 on P = 2 workers (b = 2); the
    mean of each estimate over all ordered batches (with or without replacement) is the truth."""
    torch.manual_seed(0)
    g = torch.randn(5, 3, dtype=F64) + 0.4
    truth = D.Moments(float(g.square().sum(1).mean()), float(g.mean(0).square().sum()))
    batches = list(itertools.product(range(5), repeat=4) if replacement else itertools.permutations(range(5), 4))
    population = None if replacement else 5
    in_step, two = [], []
    for batch in batches:
        rows = g[list(batch)]
        in_step.append(D.in_step_moments(float(rows.square().sum()), float(rows.sum(0).square().sum()), 4, population))
        small = (float(rows[:2].mean(0).square().sum()) + float(rows[2:].mean(0).square().sum())) / 2
        two.append(D.two_batch_moments(small, 2, float(rows.mean(0).square().sum()), 4, population))
    for estimates in (in_step, two):
        mean = [sum(e[k] for e in estimates) / len(batches) for k in range(2)]
        assert mean == pytest.approx(list(truth), rel=1e-12)


def test_two_batch_estimate_under_one_mask_per_worker_grows_with_the_worker_batch():
    """DropConnect ``per_worker``: one mask m per worker batch, surrogate g_i ⊙ m / (1 − p). Enumerating every
    batch (with replacement) and every pair of masks, the two-batch estimate of tr Σ averages to b·Var(Ḡ), the
    worker mean's variance times b, which is σ²/(1 − p) + b·p/(1 − p)·‖μ‖²: the mask noise does not shrink with
    the batch, so the online B_D grows affinely in b = B/P (docs/RESULTS.md §2), unlike B_D(w0)."""
    torch.manual_seed(1)
    n, d, p = 4, 3, 0.5
    g = torch.randn(n, d, dtype=F64) + 0.5
    masks = [torch.tensor(m, dtype=F64) / (1 - p) for m in itertools.product((0.0, 1.0), repeat=d)]
    mu = g.mean(0)
    sigma2 = float(g.square().sum(1).mean() - mu.square().sum())
    for b in (1, 2):
        traces, var_mean = [], []
        for batch in itertools.product(range(n), repeat=2 * b):
            means = [g[list(batch[k * b : (k + 1) * b])].mean(0) for k in range(2)]
            for m0, m1 in itertools.product(masks, repeat=2):
                worker = [means[0] * m0, means[1] * m1]
                small = sum(float(w.square().sum()) for w in worker) / 2
                est = D.two_batch_moments(small, b, float(((worker[0] + worker[1]) / 2).square().sum()), 2 * b)
                traces.append(est.expected_sq_norm - est.sq_norm_of_mean)
                var_mean.append(float((worker[0] - mu).square().sum()))
        mean_trace = sum(traces) / len(traces)
        assert mean_trace == pytest.approx(b * sum(var_mean) / len(var_mean), rel=1e-12)  # brute force
        assert mean_trace == pytest.approx(sigma2 / (1 - p) + b * p / (1 - p) * float(mu.square().sum()), rel=1e-12)


def test_two_batch_estimator_with_two_workers_is_unbiased(data, logreg_at):
    """P = 2 workers of b = 64 (B = 128), with replacement. B_D is a ratio of the two averaged
    moments; the tolerance is 4 standard errors of that ratio (delta method over batches)."""
    model, steps, big = logreg_at["trained"], 300, 128
    exact = exact_moments(model, data.x_train, data.y_train)
    sampler = GlobalBatchSampler(data.n, big, "with_replacement", seed=1)
    est = []
    for step in range(steps):
        idx = sampler.global_batch(step)
        grads = []
        for part in idx.chunk(2):
            model.zero_grad()
            F.cross_entropy(model(data.x_train[part]), data.y_train[part]).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).to(F64))
        small = sum(float(g.square().sum()) for g in grads) / 2
        est.append(D.two_batch_moments(small, big // 2, float(((grads[0] + grads[1]) / 2).square().sum()), big))
    m2, mu2 = torch.tensor([e.expected_sq_norm for e in est]), torch.tensor([e.sq_norm_of_mean for e in est])
    ratio = float(m2.mean() / mu2.mean())
    cov = torch.cov(torch.stack([m2 / m2.mean(), mu2 / mu2.mean()]))
    se = ratio * math.sqrt(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]) / steps)
    per_step = torch.tensor([e.batch_bound for e in est])
    print(
        f"two-batch P=2: exact B_D {exact.batch_bound:.2f}, ratio of means {ratio:.2f} ± {se:.2f} (se); "
        f"per-step B_D median {per_step.median():.2f}, std {per_step.std():.2f}"
    )
    assert math.isfinite(se) and se > 0
    assert abs(ratio - exact.batch_bound) < 4 * se
    assert rel(float(mu2.mean()), exact.sq_norm_of_mean) < 0.1


def test_moments_ema_is_a_ratio_of_means():
    ema = D.MomentsEMA(decay=0.5)
    assert math.isnan(ema.value.batch_bound)
    ema.update(D.Moments(4.0, 2.0))
    assert ema.value == D.Moments(4.0, 2.0)  # bias-corrected: one step gives the step itself
    ema.update(D.Moments(math.nan, 1.0))  # skipped
    got = ema.update(D.Moments(8.0, -1.0))
    num, den = (0.25 * 4 + 0.5 * 8) / 0.75, (0.25 * 2 - 0.5) / 0.75
    assert got == pytest.approx(D.Moments(num, den))
    assert got.batch_bound == math.inf  # ‖μ‖² estimate <= 0
    with pytest.raises(ValueError):
        D.MomentsEMA(decay=1.0)


def test_moments_ema_state_dict_round_trip_continues_exactly():
    ema = D.MomentsEMA(decay=0.7)
    for m in [D.Moments(4.0, 2.0), D.Moments(5.0, 1.5), D.Moments(math.nan, 1.0)]:
        ema.update(m)
    state = ema.state_dict()
    history = state.pop("history")  # plain numbers: torch.save/load as is
    assert all(isinstance(v, (int, float)) for v in [*state.values(), *history])
    assert history == [4.0 / 2.0, ema.value.batch_bound]  # the smoothed B_D after each folded-in step
    restored = D.MomentsEMA()
    restored.load_state_dict({**state, "history": history})
    assert restored.value == ema.value and restored.steps == ema.steps == 2
    assert restored.update(D.Moments(6.0, 0.5)) == ema.update(D.Moments(6.0, 0.5))
    assert restored.history == ema.history and len(ema.history) == 3
    old = D.MomentsEMA()
    old.load_state_dict(state)  # a checkpoint from before the history: none, and no error
    assert old.history == []


# --------------------------------------------------------------------------- under DDP


def _ddp_estimators(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model = build_model("logreg", (20,), 3)
    ddp = nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 20, generator=g), torch.randint(3, (16,), generator=g)
    mine = slice(rank * 8, (rank + 1) * 8)
    with D.GhostNorms(model) as ghost, ddp.no_sync():
        F.cross_entropy(ddp(x[mine]), y[mine]).backward()
    local = D.grad_sq_norm(model)  # DDP skipped its all-reduce: this rank's own gradient
    small, big = D.reduce_gradients(model, world_size)
    sum_sq = D.mean_over_workers(float(ghost.sq_norms().sum()) * 8**2, world_size) * world_size
    with_ddp = copy.deepcopy(model)  # the same step through DDP's own all-reduce, for comparison
    ddp2 = nn.parallel.DistributedDataParallel(with_ddp)
    with_ddp.zero_grad(set_to_none=True)
    F.cross_entropy(ddp2(x[mine]), y[mine]).backward()
    return {
        "local": local,
        "small": small,
        "big": big,
        "big_after": D.grad_sq_norm(model),
        "sum_sq": sum_sq,
        "grad": torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
        "ddp_grad": torch.cat([p.grad.reshape(-1) for p in with_ddp.parameters()]),
    }


def test_no_sync_reads_local_norms_and_reduce_gradients_does_what_ddp_does():
    out = run_group(_ddp_estimators, 2)
    torch.manual_seed(0)
    model = build_model("logreg", (20,), 3)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 20, generator=g), torch.randint(3, (16,), generator=g)
    per_example = brute_grads(model, x, y)
    halves = [per_example[r * 8 : (r + 1) * 8].mean(0) for r in range(2)]
    for rank in range(2):
        assert out[rank]["local"] == pytest.approx(float(halves[rank].square().sum()), rel=1e-5)
        assert torch.allclose(out[rank]["grad"].to(F64), per_example.mean(0), atol=1e-6)
        torch.testing.assert_close(out[rank]["grad"], out[rank]["ddp_grad"], rtol=1e-6, atol=1e-7)
        assert out[rank]["big"] == pytest.approx(float(per_example.mean(0).square().sum()), rel=1e-5)
        assert out[rank]["big_after"] == pytest.approx(out[rank]["big"], rel=1e-6)  # the reduced .grad
        assert out[rank]["sum_sq"] == pytest.approx(float(per_example.square().sum()), rel=1e-5)
    small = sum(float(h.square().sum()) for h in halves) / 2
    assert out[0]["small"] == pytest.approx(small, rel=1e-5) and out[1]["small"] == pytest.approx(small, rel=1e-5)
