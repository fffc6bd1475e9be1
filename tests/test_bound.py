"""B_D at a trial's initial weights (raygd.bound): the recorded value against gradient_diversity on the
same sample (in-process and on a 2-process gloo group, read back from a real SQLite MLflow store),
DropConnect at its mask granularity against a brute-force loop and its standard error, the online
estimate's default and its median."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn
from torch.func import functional_call

from raygd import diversity as D
from raygd.bound import ONLINE_ESTIMATOR_TAG, bound_indices, initial_bound, log_initial_bound
from raygd.config import RunConfig, load_run_config
from raygd.data import load_data
from raygd.diversity.online import Moments
from raygd.loop import build_state, run_loop
from raygd.mechanisms import build_mechanism, make_generator
from raygd.mechanisms.dropconnect_linear import dropconnect_masks
from raygd.models import MnistCNN, build_model
from raygd.records import BOUND_MEDIAN_METRIC, BOUND_OF_TAG, BOUND_W0_METRIC, BOUND_W0_SE_METRIC
from raygd.tracking import Tracker, create_run
from tests.dist import run_group

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(idx_dir, uri: str = "sqlite:///unused.db", *overrides: str) -> RunConfig:
    return load_run_config(
        None,
        [
            f"data.data_dir={idx_dir}",
            "data.eval_size=300",
            "train.num_workers=1",
            "train.model=logreg",
            "train.global_batch_size=32",
            f"tracking.tracking_uri={uri}",
            *overrides,
        ],
    )


def _reference(cfg: RunConfig) -> float:
    """gradient_diversity at the trial's initial weights on ``bound_indices``, from scratch."""
    data = load_data(cfg.data, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.train.model, data.input_shape, data.num_classes)
    idx = bound_indices(data.n, cfg.data.eval_size, cfg.train.seed, cfg.train.bound_sample)
    return D.gradient_diversity(model, data.x_train[idx], data.y_train[idx]).batch_bound


def _recorded(uri: str, run_id: str) -> tuple[dict[str, float], dict[str, str]]:
    run = MlflowClient(uri).get_run(run_id)
    return run.data.metrics, run.data.tags


# --------------------------------------------------------------------------- recorded = gradient_diversity


@pytest.mark.parametrize(
    "model, sample",
    [("logreg", 1024), ("logreg", 101), ("mnist_cnn", 48)],  # 1024 > the 300-example evaluation sample
)
def test_recorded_bound_equals_gradient_diversity_on_the_same_sample(idx_dir, sqlite_uri, model, sample):
    cfg = _cfg(idx_dir, sqlite_uri, f"train.model={model}", f"train.bound_sample={sample}")
    run_id = create_run(sqlite_uri, "bound", "w0", cfg.flat(), {})
    state = build_state(cfg, load_data(cfg.data, cfg.train.seed))
    log_initial_bound(state, Tracker(sqlite_uri, run_id, enabled=True))
    metrics, tags = _recorded(sqlite_uri, run_id)
    expected = _reference(cfg)
    assert metrics[BOUND_W0_METRIC] == pytest.approx(expected, rel=1e-6)
    assert metrics["diversity/batch_bound"] == metrics[BOUND_W0_METRIC]
    assert metrics[BOUND_W0_SE_METRIC] == 0.0 and metrics["time/bound_s"] > 0
    assert tags[BOUND_OF_TAG] == "gradient" and tags[ONLINE_ESTIMATOR_TAG] == "in_step"
    assert all(p.grad is None for p in state.model.parameters())  # nothing left for the first step


def _rank_bound(rank: int, world_size: int, cfg_dict: dict, run_id: str) -> dict[str, float]:
    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(cfg_dict)
    state = build_state(cfg, load_data(cfg.data, cfg.train.seed), rank, world_size)
    return log_initial_bound(state, Tracker(cfg.tracking.tracking_uri, run_id, enabled=rank == 0))


def test_two_ranks_record_the_bound_of_the_whole_sample(idx_dir, sqlite_uri):
    """101 examples over 2 ranks (51 + 50): one all-reduce gives gradient_diversity on all 101."""
    cfg = _cfg(idx_dir, sqlite_uri, "train.num_workers=2", "train.bound_sample=101")
    run_id = create_run(sqlite_uri, "bound", "w0-p2", cfg.flat(), {})
    ranks = run_group(_rank_bound, 2, cfg.to_dict(), run_id)
    metrics, tags = _recorded(sqlite_uri, run_id)
    assert ranks[0][BOUND_W0_METRIC] == ranks[1][BOUND_W0_METRIC] == metrics[BOUND_W0_METRIC]
    assert metrics[BOUND_W0_METRIC] == pytest.approx(_reference(cfg), rel=1e-6)
    assert tags[ONLINE_ESTIMATOR_TAG] == "free"


@pytest.mark.parametrize("name, bound_of", [("sgld", "surrogate"), ("quantize", "plain_gradient")])
def test_sgld_records_its_surrogate_and_quantize_labels_the_plain_gradient(idx_dir, name, bound_of):
    cfg = _cfg(idx_dir, "sqlite:///unused.db", f"mechanism.name={name}", "mechanism.sgld_sigma=0.05")
    data = load_data(cfg.data, cfg.train.seed)
    state = build_state(cfg, data)
    got = initial_bound(state)[BOUND_W0_METRIC]
    idx = bound_indices(data.n, cfg.data.eval_size, cfg.train.seed, cfg.train.bound_sample)
    base = D.gradient_diversity(state.model, data.x_train[idx], data.y_train[idx])
    d = sum(p.numel() for p in state.model.parameters())
    want = D.sgld_diversity(base, 0.05, d).batch_bound if name == "sgld" else base.batch_bound
    assert got == pytest.approx(want, rel=1e-6) and state.mechanism.bound_of == bound_of
    assert (got > 1.01 * base.batch_bound) == (name == "sgld")


# --------------------------------------------------------------------------- DropConnect at its granularity


def _brute_draw(model: nn.Module, x, y, p: float, group: int, generator) -> tuple[float, torch.Tensor]:
    """Σ‖g_i^DC‖², Σ g_i^DC by a plain loop: one backward per example at M_k ∘ W, masks drawn in the order
    ``dropconnect_draw`` documents (every group in one chunk: one (groups, *shape) draw per weight)."""
    params = {n: t.detach().to(F64) for n, t in model.named_parameters()}
    masked = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    total, summed = 0.0, None
    groups = -(-x.shape[0] // group)  # every group in one chunk: one (groups, *shape) draw per weight
    drawn = {n: dropconnect_masks((groups, *params[n].shape), p, generator, F64) for n in masked}
    for i in range(x.shape[0]):
        masks = {n: m[i // group] for n, m in drawn.items()}
        leaves = {n: t.clone().requires_grad_() for n, t in params.items()}
        at = {n: leaves[n] * masks[n] if n in masks else leaves[n] for n in leaves}
        loss = F.cross_entropy(functional_call(model, at, (x[i : i + 1].to(F64),)), y[i : i + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(leaves.values()))])
        total += float(g @ g)
        summed = g if summed is None else summed + g
    assert summed is not None
    return total, summed


@pytest.mark.parametrize("group", [1, 4, 7, 40])
@pytest.mark.parametrize("arch", ["logreg", "cnn"])
def test_grouped_dropconnect_draw_matches_a_per_example_loop(arch, group):
    torch.manual_seed(0)
    model = build_model("logreg", (1, 28, 28), 10) if arch == "logreg" else MnistCNN(widths=(4, 8, 16))
    x, y = torch.randn(30, 1, 28, 28), torch.randint(10, (30,))
    got = D.dropconnect_draw(model, x, y, 0.4, group, torch.Generator().manual_seed(3), dtype=F64)
    want = _brute_draw(model, x, y, 0.4, group, torch.Generator().manual_seed(3))
    assert got[0] == pytest.approx(want[0], rel=1e-9)
    assert torch.allclose(got[1], want[1], rtol=1e-9, atol=1e-12)


def test_the_trial_measures_dropconnect_at_the_granularity_it_trains_with(idx_dir):
    """per_group 16 and per_worker (B/P = 32) share masks; p = 0 is the exact gradient's bound."""
    common = ("mechanism.name=dropconnect", "train.bound_sample=128", "train.bound_draws=4")
    data = None
    values = {}
    for granularity in ("per_example", "per_group", "per_worker"):
        cfg = _cfg(idx_dir, "sqlite:///unused.db", *common, f"mechanism.dropconnect_granularity={granularity}")
        data = data or load_data(cfg.data, cfg.train.seed)
        state = build_state(cfg, data)
        values[granularity] = initial_bound(state)
        group = {"per_example": 1, "per_group": 8, "per_worker": 32}[granularity]
        idx = bound_indices(data.n, cfg.data.eval_size, cfg.train.seed, 128)
        state.model.eval()
        generator = make_generator("cpu", cfg.train.seed, "bound", 0)  # the bound's own: (seed, "bound", rank)
        x, y = data.x_train[idx], data.y_train[idx]
        want = D.dropconnect_diversity(
            state.model, x, y, 0.5, num_draws=4, examples_per_mask=group, generator=generator
        )
        assert values[granularity][BOUND_W0_METRIC] == pytest.approx(want.batch_bound, rel=1e-6)
        assert values[granularity][BOUND_W0_SE_METRIC] == pytest.approx(want.batch_bound_se, rel=1e-6)
        assert values[granularity][BOUND_W0_SE_METRIC] > 0
    # shared masks correlate a group's surrogates: a lower bound than per-example masks
    assert values["per_worker"][BOUND_W0_METRIC] < values["per_example"][BOUND_W0_METRIC]
    cfg = _cfg(idx_dir, "sqlite:///unused.db", *common, "mechanism.drop_prob=0", "train.bound_sample=128")
    exact = initial_bound(build_state(cfg, data))
    assert exact[BOUND_W0_METRIC] == pytest.approx(_reference(cfg), rel=1e-6) and exact[BOUND_W0_SE_METRIC] < 1e-9


def test_per_group_standard_error_shrinks_as_one_over_sqrt_draws_and_is_honest(idx_dir):
    cfg = _cfg(idx_dir)
    data = load_data(cfg.data, 0)
    torch.manual_seed(0)
    model = build_model("logreg", data.input_shape, data.num_classes)
    x, y = data.x_train[:160], data.y_train[:160]

    def estimate(draws: int, seed: int) -> D.Diversity:
        generator = torch.Generator().manual_seed(seed)
        return D.dropconnect_diversity(model, x, y, 0.5, num_draws=draws, examples_per_mask=16, generator=generator)

    ratios = [estimate(8, s).batch_bound_se / estimate(32, s).batch_bound_se for s in range(6)]
    assert 1.6 < statistics.median(ratios) < 2.5  # sqrt(32 / 8) = 2
    repeats = [estimate(8, 100 + s) for s in range(24)]
    spread = statistics.stdev(r.batch_bound for r in repeats)
    mean_se = statistics.mean(r.batch_bound_se for r in repeats)
    assert 0.6 < spread / mean_se < 1.6  # the stated error is the estimate's actual spread


# --------------------------------------------------------------------------- the online estimate


@pytest.mark.parametrize(
    "mechanism, workers, expected",
    [
        ("vanilla", 1, "in_step"),
        ("vanilla", 2, "free"),
        ("sgld", 2, "free"),
        ("quantize", 2, "in_step"),  # free bypasses quantize's communication hook
        ("quantize", 1, "in_step"),
        ("dropconnect", 2, "free"),
        ("dropconnect", 1, "none"),  # in_step needs deterministic per-example gradients
    ],
)
def test_the_online_estimate_is_on_by_default_where_the_mechanism_allows(mechanism, workers, expected):
    cfg = load_run_config(None, [f"mechanism.name={mechanism}", f"train.num_workers={workers}"])
    assert cfg.train.diversity_estimator == "auto" and cfg.online_estimator == expected
    explicit = load_run_config(None, [f"mechanism.name={mechanism}", "train.diversity_estimator=none"])
    assert explicit.online_estimator == "none"


def test_sgld_online_moments_are_the_closed_form_surrogate(idx_dir):
    data = load_data(_cfg(idx_dir).data, 0)
    torch.manual_seed(0)
    model = build_model("logreg", data.input_shape, data.num_classes)
    base = D.gradient_diversity(model, data.x_train[:200], data.y_train[:200], dtype=F64)
    n, d = base.n, sum(p.numel() for p in model.parameters())
    sgld = build_mechanism(load_run_config(None, ["mechanism.name=sgld", "mechanism.sgld_sigma=0.05"]).mechanism)
    moments = sgld.surrogate_moments(base.sum_sq_norms / n, base.sum_grad_sq_norm / n**2, n=n, num_params=d)
    assert Moments(*moments).batch_bound == pytest.approx(D.sgld_diversity(base, 0.05, d).batch_bound, rel=1e-12)


def test_run_summary_carries_the_median_of_the_online_estimate(idx_dir):
    cfg = _cfg(idx_dir, "sqlite:///unused.db", "train.max_passes=1", "train.target_accuracy=1.0")
    state = build_state(cfg, load_data(cfg.data, 0))
    summary = run_loop(state)
    assert state.estimator is not None and state.estimator.kind == "in_step"
    history = state.estimator.ema.history
    assert len(history) == state.estimator.ema.steps == -(-summary.steps // cfg.train.diversity_every_steps)
    assert summary.extra[BOUND_MEDIAN_METRIC] == statistics.median(history)
    restored = D.MomentsEMA(0.9)
    restored.load_state_dict(state.estimator.ema.state_dict())
    assert restored.history == history
