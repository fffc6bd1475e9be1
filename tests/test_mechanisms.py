"""Tests for raygd.mechanisms: QSGD statistics, DropConnect masks and gradients, SGLD noise, the DDP hook."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from raygd.config import MechanismConfig
from raygd.mechanisms import SGLD, DropConnect, Quantize, Vanilla, build_mechanism
from raygd.mechanisms.dropconnect_linear import DropConnectLinear, dropconnect_masks
from raygd.mechanisms.qsgd import qsgd_decode, qsgd_encode, qsgd_quantize, qsgd_rounding_variance
from raygd.mechanisms.sgld import sgld_noise_like
from tests.dist import run_group

CPU = torch.device("cpu")


def _setup(mech, model: nn.Module, rank: int = 0, world_size: int = 1, seed: int = 3, batch: int = 16) -> nn.Module:
    return mech.setup(model, seed=seed, rank=rank, world_size=world_size, global_batch_size=batch, device=CPU)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qsgd_moments(v: torch.Tensor, s: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force, float64: per-coordinate variance of Q(v) and each bucket's norm per coordinate."""
    var, norm_of = torch.zeros(v.numel(), dtype=torch.float64), torch.zeros(v.numel(), dtype=torch.float64)
    for start in range(0, v.numel(), d):
        b = v[start : start + d].double()
        norm = float(b.norm())
        for j in range(b.numel()):
            r = abs(float(b[j])) * s / norm if norm > 0 else 0.0
            frac = r - math.floor(r)
            var[start + j] = (norm / s) ** 2 * frac * (1 - frac)
            norm_of[start + j] = norm
    return var, norm_of


def _test_vector(kind: str, n: int) -> torch.Tensor:
    v = torch.randn(n, generator=_gen(11))
    if kind == "ones":
        return torch.ones(n)
    if kind == "sparse":
        v[torch.rand(n, generator=_gen(12)) < 0.8] = 0.0
    return v


# --------------------------------------------------------------------------- QSGD


@pytest.mark.parametrize("kind", ["gauss", "ones", "sparse"])
@pytest.mark.parametrize("s,d,n", [(1, 8, 20), (4, 16, 48), (127, 32, 70)])
def test_qsgd_rounding_variance_is_the_sum_of_the_per_coordinate_variances(kind: str, s: int, d: int, n: int) -> None:
    # What the online estimator subtracts from a quantized reduced gradient: E‖Q(v) − v‖², against the
    # coordinate-by-coordinate brute force (float64), whose agreement with Monte Carlo draws is tested below.
    v = _test_vector(kind, n)
    var, _ = _qsgd_moments(v, s, d)
    assert qsgd_rounding_variance(v, s, d) == pytest.approx(float(var.sum()), rel=1e-5, abs=1e-9)
    assert qsgd_rounding_variance(torch.zeros(n), s, d) == 0.0


@pytest.mark.parametrize("s,d", [(1, 8), (4, 16), (16, 64), (127, 32)])
def test_qsgd_is_unbiased(s: int, d: int) -> None:
    v = _test_vector("gauss", int(2.5 * d))  # the last bucket is shorter
    draws = 3000
    g = _gen(0)
    total = torch.zeros(v.numel(), dtype=torch.float64)
    for _ in range(draws):
        total += qsgd_quantize(v, s, d, g).double()
    mean = total / draws
    var, _ = _qsgd_moments(v, s, d)
    err = mean - v.double()
    assert torch.all(err.abs() <= 5 * (var / draws).sqrt() + 1e-6)
    random_coords = var > 1e-12
    k = int(random_coords.sum())
    chi2 = float((err[random_coords] ** 2 / (var[random_coords] / draws)).sum())
    assert chi2 <= k + 5 * math.sqrt(2 * k)


@pytest.mark.parametrize("kind", ["gauss", "ones", "sparse"])
@pytest.mark.parametrize("s,d", [(1, 16), (2, 64), (8, 64), (127, 128)])
def test_qsgd_variance_bound(kind: str, s: int, d: int) -> None:
    v = _test_vector(kind, 3 * d)
    var, _ = _qsgd_moments(v, s, d)
    draws = 400
    g = _gen(1)
    sq_err = torch.zeros(3, dtype=torch.float64)  # per bucket, summed over draws
    sq_err_sq = torch.zeros(3, dtype=torch.float64)
    for _ in range(draws):
        e = ((qsgd_quantize(v, s, d, g).double() - v.double()) ** 2).view(3, d).sum(1)
        sq_err, sq_err_sq = sq_err + e, sq_err_sq + e**2
    mc_mean = sq_err / draws
    mc_se = (sq_err_sq / draws - mc_mean**2).clamp_min(0).sqrt() / math.sqrt(draws)
    exact = var.view(3, d).sum(1)
    bound = min(d / s**2, math.sqrt(d) / s) * (v.double().view(3, d) ** 2).sum(1)
    assert torch.all(exact <= bound * (1 + 1e-9))
    assert torch.all(mc_mean <= bound + 5 * mc_se + 1e-9)
    assert torch.all((mc_mean - exact).abs() <= 5 * mc_se + 1e-6 * bound + 1e-12)


@pytest.mark.parametrize("s,d,n", [(1, 4, 10), (16, 32, 100), (127, 512, 1500), (127, 1, 7)])
def test_qsgd_encode_levels_and_roundtrip(s: int, d: int, n: int) -> None:
    v = torch.randn(n, generator=_gen(5))
    v[: min(d, n)] = 0.0  # a zero-norm bucket
    state = _gen(9).get_state()
    q, norms = qsgd_encode(v, s, d, torch.Generator().set_state(state))
    assert q.dtype == torch.int8 and q.shape == (n,)
    assert norms.dtype == torch.float32 and norms.numel() == math.ceil(n / d)
    assert int(q.abs().max()) <= s and torch.all(q[: min(d, n)] == 0)
    assert torch.all((q == 0) | (torch.sign(q.float()) == torch.sign(v)))
    _, norm_of = _qsgd_moments(v, s, d)
    r = v.double().abs() * s / norm_of.clamp_min(1e-300)
    assert torch.all((q.double().abs() - r.floor()).abs() <= 1 + 1e-6)
    assert torch.all(q.double().abs() >= r.floor() - 1e-6)
    decoded = qsgd_decode(q, norms, s, d)
    assert torch.equal(decoded, qsgd_quantize(v, s, d, torch.Generator().set_state(state)))


@pytest.mark.parametrize("s", [1, 127])
def test_qsgd_one_hot_hits_top_level_without_overflow(s: int) -> None:
    v = torch.zeros(64)
    v[7] = -3.5
    q, norms = qsgd_encode(v, s, 64, _gen(0))
    assert int(q[7]) == -s and int(q.abs().sum()) == s
    assert torch.allclose(qsgd_decode(q, norms, s, 64), v)


# --------------------------------------------------------------------------- DropConnect


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropconnect_masks_rate_values_and_mean(p: float) -> None:
    masks = dropconnect_masks((400, 30, 20), p, _gen(2))
    kept = masks != 0
    n = masks.numel()
    assert abs(float(kept.float().mean()) - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    assert torch.all(masks[kept] == torch.tensor(1 / (1 - p), dtype=torch.float32))
    w = torch.randn(30, 20, generator=_gen(3))
    mean_masked = (masks * w).mean(0)
    tol = 5 * w.abs() * math.sqrt(p / (1 - p) / masks.shape[0]) + 1e-6
    assert torch.all((mean_masked - w).abs() <= tol)


def _dc_layer(group_size: int | None, p: float = 0.5, budget: int = 2**26, bias: bool = True) -> DropConnectLinear:
    torch.manual_seed(0)
    return DropConnectLinear.from_linear(
        nn.Linear(12, 9, bias=bias), p=p, group_size=group_size, generator=_gen(4), mask_budget_bytes=budget
    )


def _row_groups(layer: DropConnectLinear, x: torch.Tensor) -> list[list[int]]:
    """Rows of the output that are equal to each other (for identical input rows)."""
    y = layer(x)
    groups: list[list[int]] = []
    for i in range(y.shape[0]):
        for grp in groups:
            if torch.allclose(y[i], y[grp[0]], rtol=1e-5, atol=1e-6):
                grp.append(i)
                break
        else:
            groups.append([i])
    return groups


@pytest.mark.parametrize(
    "group_size,expected",
    [
        (1, [[i] for i in range(10)]),
        (4, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),
        (None, [list(range(10))]),
    ],
)
def test_dropconnect_mask_sharing_by_granularity(group_size: int | None, expected: list[list[int]]) -> None:
    layer = _dc_layer(group_size)
    x = torch.randn(1, 12, generator=_gen(6)).expand(10, 12)
    assert _row_groups(layer, x) == expected


def test_dropconnect_eval_mode_is_plain_linear() -> None:
    torch.manual_seed(1)
    plain = nn.Linear(12, 9)
    layer = DropConnectLinear.from_linear(copy.deepcopy(plain), p=0.5, group_size=1, generator=_gen(0)).eval()
    x = torch.randn(7, 12)
    assert torch.equal(layer(x), plain(x))
    assert not torch.allclose(layer.train()(x), plain(x))


@pytest.mark.parametrize("group_size", [1, 3, None])
@pytest.mark.parametrize("budget", [2**26, 2 * 12 * 9 * 4])  # default; two masks per chunk
@pytest.mark.parametrize("bias", [True, False])
def test_dropconnect_matches_per_example_loop(group_size: int | None, budget: int, bias: bool) -> None:
    n = 11  # groups of 3 leave a shorter last group; two-mask chunks leave a shorter last chunk
    layer = _dc_layer(group_size, p=0.4, budget=budget, bias=bias)
    x = torch.randn(n, 12, generator=_gen(7), requires_grad=True)
    c = torch.randn(n, 9, generator=_gen(8))
    state = layer.generator.get_state()
    y = layer(x)
    (y * c).sum().backward()
    masks = layer.example_masks(n, torch.Generator().set_state(state))
    w = layer.weight.detach().double().requires_grad_()
    b = layer.bias.detach().double().requires_grad_() if bias else None
    xd = x.detach().double().requires_grad_()
    ys = []
    for i in range(n):
        yi = (masks[i].double() * w) @ xd[i]
        ys.append(yi + b if bias else yi)
    y_ref = torch.stack(ys)
    (y_ref * c.double()).sum().backward()
    assert torch.allclose(y.double(), y_ref, atol=1e-5)
    assert torch.allclose(layer.weight.grad.double(), w.grad, atol=1e-5)
    assert torch.allclose(x.grad.double(), xd.grad, atol=1e-5)
    if bias:
        assert torch.allclose(layer.bias.grad.double(), b.grad, atol=1e-5)


def test_dropconnect_extra_leading_dims_share_the_example_mask() -> None:
    layer = _dc_layer(1)
    x = torch.randn(1, 1, 12, generator=_gen(1)).expand(5, 3, 12)
    y = layer(x)
    assert y.shape == (5, 3, 9)
    assert torch.allclose(y[:, 0], y[:, 2]) and not torch.allclose(y[0, 0], y[1, 0])


def test_dropconnect_setup_replaces_linears_and_keeps_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 3)))
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mech = DropConnect(0.5, "per_group", 4)
    out = _setup(mech, model)
    assert isinstance(out[2], DropConnectLinear) and isinstance(out[4][0], DropConnectLinear)
    assert type(out[0]) is nn.Conv2d
    assert out[2].group_size == 4 and out[2].generator is mech.generator
    assert all(a is b for a, b in zip(out.parameters(), params, strict=True))
    assert list(out.state_dict()) == list(state) and all(torch.equal(out.state_dict()[k], state[k]) for k in state)
    bare = _setup(DropConnect(0.5, "per_worker"), nn.Linear(4, 2))
    assert isinstance(bare, DropConnectLinear) and bare.group_size is None


def test_dropconnect_ranks_draw_different_masks_and_runs_repeat() -> None:
    x = torch.randn(1, 12).expand(2, 12)

    def out(rank: int) -> torch.Tensor:
        torch.manual_seed(0)
        return _setup(DropConnect(0.5, "per_example"), nn.Linear(12, 9), rank=rank)(x)

    assert torch.equal(out(0), out(0)) and not torch.allclose(out(0), out(1))


# --------------------------------------------------------------------------- SGLD


@pytest.mark.parametrize("sigma,batch", [(0.3, 64), (2.0, 1), (0.01, 1000)])
def test_sgld_noise_variance(sigma: float, batch: int) -> None:
    tensors = [torch.zeros(300, 200), torch.zeros(50), torch.zeros(7, 3, 3, 3)]
    noise = sgld_noise_like(tensors, sigma, batch, _gen(0))
    assert [n.shape for n in noise] == [t.shape for t in tensors]
    flat = torch.cat([n.reshape(-1) for n in noise]).double()
    k, target = flat.numel(), sigma**2 / batch
    assert abs(float(flat.mean())) <= 5 * math.sqrt(target / k)
    assert abs(float((flat**2).mean()) / target - 1) <= 5 * math.sqrt(2 / k)


def _grad_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    model(torch.randn(3, 5)).square().mean().backward()
    return model


def test_sgld_noise_identical_across_ranks_and_new_each_step() -> None:
    grads = {}
    for rank in (0, 1):
        for step in (5, 6):
            model = _grad_model()
            before = [p.grad.clone() for p in model.parameters()]
            mech = SGLD(0.5)
            _setup(mech, model, rank=rank, world_size=2, batch=32)
            mech.after_backward(model, step)
            grads[rank, step] = [p.grad - b for p, b in zip(model.parameters(), before, strict=True)]
    for a, b in zip(grads[0, 5], grads[1, 5], strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(grads[0, 5][0], grads[0, 6][0])


# --------------------------------------------------------------------------- Quantize


def test_quantize_single_worker_quantizes_concatenated_grads() -> None:
    model = _grad_model()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    mech = Quantize(4, 16)
    _setup(mech, model)
    reference = Quantize(4, 16)
    _setup(reference, _grad_model())
    mech.after_backward(model, 0)
    assert torch.equal(
        torch.cat([p.grad.reshape(-1) for p in model.parameters()]), qsgd_quantize(flat, 4, 16, reference.generator)
    )
    n = flat.numel()
    assert mech.metrics()["comm/bytes_ratio"] == pytest.approx((n + 4 * math.ceil(n / 16)) / (4 * n))


def test_quantize_without_hook_on_many_workers_fails_loudly() -> None:
    mech = Quantize(4, 16)
    model = _grad_model()
    _setup(mech, model, world_size=2)
    with pytest.raises(RuntimeError, match="attach_ddp"):
        mech.after_backward(model, 0)


def _rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(100 * step + rank)
    return torch.randn(6, 20, generator=g), torch.randn(6, 30, generator=g)


def _local_grad(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    model.zero_grad()
    x, y = _rank_batch(rank, step)
    nn.functional.mse_loss(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _check_single_parameter(rank: int, levels: int, bucket: int) -> dict:
    """One parameter, so the bucket buffer is its flattened grad and the hook can be recomputed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30, bias=False))
    plain = copy.deepcopy(model)
    mech = Quantize(levels, bucket)
    ddp = nn.parallel.DistributedDataParallel(_setup(mech, model, rank=rank, world_size=2, seed=5))
    mech.attach_ddp(ddp)
    refs = [Quantize(levels, bucket) for _ in range(2)]
    for r, ref in enumerate(refs):
        _setup(ref, copy.deepcopy(plain), rank=r, world_size=2, seed=5)
    grads, expected = [], []
    for step in range(2):
        _local_grad(ddp, rank, step)
        grads.append(model[0].weight.grad.reshape(-1).clone())
        local = [qsgd_quantize(_local_grad(plain, r, step), levels, bucket, refs[r].generator) for r in range(2)]
        expected.append((local[0] + local[1]) / 2)
    return {"grads": grads, "expected": expected, "metrics": mech.metrics(), "numel": 600}


def _check_two_layers(rank: int, levels: int, bucket: int) -> dict:
    """Several parameters in one bucket: the decoded average stays within QSGD's error bound."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 30))
    plain = copy.deepcopy(model)
    mech = Quantize(levels, bucket)
    ddp = nn.parallel.DistributedDataParallel(_setup(mech, model, rank=rank, world_size=2, seed=5))
    mech.attach_ddp(ddp)
    _local_grad(ddp, rank, 0)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    local = [_local_grad(plain, r, 0) for r in range(2)]
    err2 = float(((got - (local[0] + local[1]) / 2) ** 2).sum())
    rel = min(bucket / levels**2, math.sqrt(bucket) / levels)
    bound = rel * sum(float((g**2).sum()) for g in local) / 4  # E||(Q0+Q1)/2 - mean||^2
    return {"grads": [got], "err2": err2, "bound": bound}


def _ddp_worker(rank: int, world_size: int, configs: list[tuple[int, int]]) -> dict:
    torch.set_num_threads(1)
    return {cfg: (_check_single_parameter(rank, *cfg), _check_two_layers(rank, *cfg)) for cfg in configs}


DDP_CONFIGS = [(4, 64), (127, 128)]


@pytest.fixture(scope="module")
def ddp_results() -> list[dict]:
    """Run a real two-process gloo group once (spawn costs seconds) for all hook configs."""
    return run_group(_ddp_worker, 2, DDP_CONFIGS)


@pytest.mark.parametrize("levels,bucket", DDP_CONFIGS)
def test_quantize_ddp_hook_averages_quantized_local_gradients(ddp_results, levels: int, bucket: int) -> None:
    single = [res[levels, bucket][0] for res in ddp_results]
    for step in range(2):
        assert torch.equal(single[0]["grads"][step], single[1]["grads"][step])
        for res in single:
            assert torch.allclose(res["grads"][step], res["expected"][step], rtol=1e-6, atol=1e-7)
    n = single[0]["numel"]
    for res in single:
        ratio = res["metrics"]["comm/bytes_ratio"]
        assert ratio == pytest.approx((n + 4 * math.ceil(n / bucket)) / (4 * n)) and ratio < 0.3


@pytest.mark.parametrize("levels,bucket", DDP_CONFIGS)
def test_quantize_ddp_hook_many_parameters_equal_on_ranks_and_within_bound(
    ddp_results, levels: int, bucket: int
) -> None:
    two = [res[levels, bucket][1] for res in ddp_results]
    assert torch.equal(two[0]["grads"][0], two[1]["grads"][0])
    assert 0 < two[0]["err2"] <= 10 * two[0]["bound"]


def test_quantize_ranks_draw_independent_roundings() -> None:
    v = torch.randn(1000, generator=_gen(0))
    out = []
    for rank in (0, 1):
        mech = Quantize(4, 64)
        _setup(mech, _grad_model(), rank=rank, world_size=2)
        out.append(qsgd_quantize(v, 4, 64, mech.generator))
    assert not torch.equal(out[0], out[1])


# --------------------------------------------------------------------------- factory


@pytest.mark.parametrize(
    "cfg,cls,granularity",
    [
        (MechanismConfig(name="vanilla"), Vanilla, "none"),
        (MechanismConfig(name="dropconnect", dropconnect_granularity="per_group"), DropConnect, "per_group"),
        (MechanismConfig(name="dropconnect", dropconnect_granularity="per_worker"), DropConnect, "per_worker"),
        (MechanismConfig(name="sgld"), SGLD, "per_example"),
        (MechanismConfig(name="quantize"), Quantize, "per_worker"),
    ],
)
def test_build_mechanism_class_and_logged_granularity(cfg: MechanismConfig, cls: type, granularity: str) -> None:
    mech = build_mechanism(cfg)
    assert type(mech) is cls and mech.name == cfg.name and mech.granularity == granularity
    params = mech.log_params()
    assert params["mechanism.granularity"] == granularity
    assert all(isinstance(v, (str, int, float)) for v in params.values())
