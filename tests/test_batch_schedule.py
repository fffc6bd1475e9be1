"""The batch controller (``raygd.batch_schedule``): its rules on synthetic estimates, the sampler at a
changing B, exact resume, and a fixed-policy run that is bit for bit today's. In-process, no Ray."""

from __future__ import annotations

import math

import pytest
import torch

from raygd import batch_schedule as bs
from raygd.config import BatchScheduleConfig, ConfigError, load_run_config
from raygd.data import Cursor, GlobalBatchSampler, load_data
from raygd.loop import build_state, run_loop
from raygd.models import build_model
from tests.dist import run_group

# --------------------------------------------------------------------------- the rules


def _controller(policy: str = "diversity", base: int = 32, workers: int = 2, n: int = 4096, **settings):
    cfg = BatchScheduleConfig(policy=policy, **settings)
    ctl = bs.BatchController(cfg, base, 0.1, workers, n)
    ctl.observe_step(1.0)  # the first update at a B is not observed
    ctl.observe_step(0.01)
    return ctl


def test_diversity_grows_to_delta_times_the_bound_as_a_multiple_of_p():
    ctl = _controller(workers=4, delta=1.0)
    d = ctl.decide(bound=101.0, measurements=10)
    assert d.changed and d.batch == 100 and d.batch % 4 == 0
    assert _controller(workers=4, delta=2.0).decide(101.0, 10).batch == 200


def test_diversity_shrinks_below_the_start():
    ctl = _controller(base=256)
    d = ctl.decide(bound=40.0, measurements=10)
    assert d.changed and d.batch == 40


@pytest.mark.parametrize("bound, moves", [(41.0, False), (40.0, False), (42.0, True), (26.0, False), (24.0, True)])
def test_diversity_moves_only_past_the_hysteresis(bound, moves):
    ctl = _controller(base=32, hysteresis=0.3)  # moves at >= 1.3x either way: B' >= 41.6 or B' <= 24.6
    d = ctl.decide(bound, measurements=10)
    assert d.changed is moves and d.batch == (bs.round_to_workers(bound, 2) if moves else 32)


def test_diversity_is_clipped_to_its_bounds():
    assert _controller(min_batch_size=16, max_batch_size=128).decide(1e6, 10).batch == 128
    assert _controller(min_batch_size=16, max_batch_size=128).decide(1.5, 10).batch == 16
    assert _controller(n=100).decide(1e9, 10).batch == 100  # never above n (a multiple of P)
    assert _controller(n=101, workers=2).decide(1e9, 10).batch == 100


@pytest.mark.parametrize("bound", [math.nan, math.inf])
def test_no_move_without_a_finite_estimate_or_before_the_warmup(bound):
    assert not _controller().decide(bound, 10).changed
    assert not _controller(warmup_measurements=5).decide(100.0, measurements=4).changed
    assert _controller(warmup_measurements=5).decide(100.0, measurements=5).changed


@pytest.mark.parametrize(
    "rule, scale, noise, expected",
    [
        ("adascale", 1.0, 50.0, 1.0),
        ("adascale", 4.0, 0.0, 1.0),  # no noise: a larger batch gives the same gradient, the same step
        ("adascale", 4.0, 1e9, 4.0),  # all noise: linear scaling
        ("adascale", 4.0, 32.0, (32 + 32) / (32 / 4 + 32)),
        ("adascale", 0.5, 32.0, (32 + 32) / (32 / 0.5 + 32)),  # shrinking lowers the step
        ("linear", 4.0, 32.0, 4.0),
        ("sqrt", 4.0, 32.0, 2.0),
    ],
)
def test_step_size_rules(rule, scale, noise, expected):
    assert bs.step_size_gain(rule, int(32 * scale), 32, noise) == pytest.approx(expected, rel=1e-6)


def test_adascale_gain_is_the_efficiency_times_the_scale():
    for b in (16, 32, 64, 512):
        assert bs.step_size_gain("adascale", b, 32, 40.0) == pytest.approx(b / 32 * bs.efficiency(b, 32, 40.0))


def test_the_step_size_follows_b():
    ctl = _controller(base=32, step_size_rule="linear")
    d = ctl.decide(bound=129.0, measurements=10)
    assert d.batch == 128 and d.step_size == pytest.approx(0.1 * 4)


def _goodput_controller(step_time, base=32, workers=2, **settings):
    ctl = bs.BatchController(BatchScheduleConfig(policy="goodput", **settings), base, 0.1, workers, 1 << 16)
    ctl.observe_step(1.0)
    for b in (base, 2 * base):  # two batch sizes observed: the line is fitted exactly
        ctl.batch = b
        for _ in range(3):
            ctl.observe_step(step_time(b))
    ctl.batch = base
    return ctl


def test_goodput_takes_pollux_optimum_on_a_communication_bound_step():
    # T(B) = t0 + c B/P: goodput ∝ B/(t0 + cB/P) · (φ + B0)/(φ + B), maximal at B* = sqrt(φ t0 P / c).
    t0, c, noise = 0.1, 1e-4, 99.0
    ctl = _goodput_controller(lambda b: t0 + c * b / 2, max_batch_size=8192)
    d = ctl.decide(bound=noise + 1, measurements=10)
    optimum = math.sqrt(noise * t0 * 2 / c)  # ~ 445
    assert d.changed and abs(math.log(d.batch / optimum)) < math.log(1.1)
    assert d.metrics["batch_schedule/predicted_gain"] >= 1.05


def test_goodput_stays_when_the_gain_is_under_its_threshold_and_never_goes_below_b0():
    compute_bound = _goodput_controller(lambda b: 1e-3 * b / 2)  # no fixed cost: every larger B loses
    d = compute_bound.decide(bound=11.0, measurements=10)
    assert not d.changed and d.batch == 32
    big = _goodput_controller(lambda b: 0.1 + 1e-4 * b / 2, base=64)
    assert big.decide(bound=2.0, measurements=10).batch >= 64  # noise 1: Pollux would go lower, the floor holds
    flat = _goodput_controller(lambda b: 0.1 + 1e-4 * b / 2, goodput_gain=1e6)
    assert not flat.decide(100.0, 10).changed


def test_step_time_model_fits_the_line_and_takes_adaptdls_prior_with_one_batch():
    model = bs.StepTimeModel(workers=2)
    for b in (32, 128):
        for _ in range(4):
            model.observe(b, 0.02 + 1e-4 * b / 2)
    compute = model.compute()
    assert compute is not None
    assert compute.fixed_s == pytest.approx(0.02) and compute.per_example_s == pytest.approx(1e-4)
    one = bs.StepTimeModel(workers=2)
    one.observe(64, 0.04)
    assert one.predict(64) == pytest.approx(0.04) and one.predict(128) == pytest.approx(0.06)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("compute_s", [0.001, 0.05])
def test_compute_time_is_recovered_from_a_step_on_the_emulated_link(overlap, compute_s):
    comm = 0.01
    step = compute_s + bs.costmodel.exposed_comm(comm, compute_s, overlap)
    if overlap == 1.0 and compute_s < comm:  # the step is t_comm whatever the compute below it: not invertible
        assert bs.compute_from_step(step, comm, overlap) <= comm * (1 + 1e-9)
    else:
        assert bs.compute_from_step(step, comm, overlap) == pytest.approx(compute_s)


def test_candidates_are_geometric_multiples_of_p():
    got = bs.candidates(32, 4096, 4)
    assert got[0] == 32 and got[-1] == 4096 and all(b % 4 == 0 for b in got) and got == sorted(set(got))


def test_a_restored_controller_decides_as_the_original():
    a = _goodput_controller(lambda b: 0.1 + 1e-4 * b / 2, max_batch_size=8192)
    b = bs.BatchController(BatchScheduleConfig(policy="goodput", max_batch_size=8192), 32, 0.1, 2, 1 << 16)
    b.load_state_dict(a.state_dict())
    assert a.decide(100.0, 10) == b.decide(100.0, 10)


def test_schedule_config_is_validated():
    for overrides, name in [
        (["train.batch_schedule.policy=adaptive"], "train.batch_schedule.policy"),
        (["train.batch_schedule.delta=0"], "train.batch_schedule.delta"),
        (["train.batch_schedule.step_size_rule=cubic"], "train.batch_schedule.step_size_rule"),
        (["train.batch_schedule.min_batch_size=33", "train.global_batch_size=64"], "train.batch_schedule.min"),
        (["train.batch_schedule.max_batch_size=32", "train.global_batch_size=64"], "train.batch_schedule.max"),
        (["train.batch_schedule.hysteresis=-1"], "train.batch_schedule.hysteresis"),
        (["train.batch_schedule.policy=diversity", "train.diversity_estimator=none"], "train.batch_schedule.policy"),
        (["train.batch_schedule={policy: diversity, speed: 2}"], "train.batch_schedule.speed"),
    ]:
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            load_run_config(None, overrides)


# --------------------------------------------------------------------------- the sampler


class TodaysSampler:
    """``raygd.data.GlobalBatchSampler`` as it was before the batch controller (commit cd63017): the reference."""

    def __init__(self, n: int, global_batch_size: int, sampling: str, seed: int):
        self.n, self.batch, self.sampling, self.seed = n, global_batch_size, sampling, seed
        self.steps_per_epoch = n // global_batch_size

    def global_batch(self, step: int) -> torch.Tensor:
        g = torch.Generator()
        if self.sampling == "with_replacement":
            g.manual_seed(self.seed * 1_000_003 + step)
            return torch.randint(self.n, (self.batch,), generator=g)
        epoch, pos = divmod(step, self.steps_per_epoch)
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)[pos * self.batch : (pos + 1) * self.batch]


@pytest.mark.parametrize("sampling", ["shuffle", "with_replacement"])
@pytest.mark.parametrize("n, batch", [(100, 16), (100, 100), (97, 8), (4096, 64)])
def test_at_a_fixed_b_the_cursor_gives_todays_batches(sampling, n, batch):
    new, old = GlobalBatchSampler(n, batch, sampling, seed=3), TodaysSampler(n, batch, sampling, seed=3)
    cursor = Cursor()
    for step in range(3 * (n // batch) + 2):
        idx, cursor = new.take(cursor, step, batch)
        assert torch.equal(idx, old.global_batch(step))
        assert torch.equal(new.global_batch(step), old.global_batch(step))
        assert cursor == Cursor.at_step(step + 1, n, batch, sampling)


def test_at_a_changing_b_each_example_is_taken_at_most_once_per_epoch():
    n, sampler, cursor = 1000, GlobalBatchSampler(1000, 8, "shuffle", seed=1), Cursor()
    sizes = torch.randint(1, 200, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    epochs: dict[int, list[int]] = {}
    for step, b in enumerate(sizes):
        before = cursor
        idx, cursor = sampler.take(cursor, step, b)
        assert len(idx) == b and cursor.examples == before.examples + b
        if cursor.epoch != before.epoch:  # a new epoch starts only when the rest could not hold the batch
            assert before.position + b > n and cursor.position == b
        epochs.setdefault(cursor.epoch, []).extend(idx.tolist())
    assert len(epochs) > 5
    for taken in epochs.values():
        assert len(taken) == len(set(taken)) and set(taken) <= set(range(n))
    for e in list(epochs)[:-1]:  # a finished epoch drops fewer examples than the batch that did not fit
        assert n - len(epochs[e]) < 200


# --------------------------------------------------------------------------- runs


def _cfg(idx_dir, *overrides):
    return load_run_config(
        None,
        [
            f"data.data_dir={idx_dir}",
            "train.num_workers=1",
            "train.model=logreg",
            "train.global_batch_size=16",
            "train.step_size=0.05",
            "train.eval_every_passes=0.1",
            "train.target_accuracy=null",
            "train.target_loss=1e-9",  # never reached: the runs go to max_passes
            *overrides,
        ],
    )


def test_a_fixed_policy_run_is_plain_sgd_on_todays_batches(idx_dir):
    """Same indices at every step as the sampler before the controller, the same updates (bitwise), and
    max_passes and the evaluations where step·B put them."""
    cfg = _cfg(idx_dir, "train.max_passes=1.3", "train.diversity_estimator=none")
    data = load_data(cfg.data, 0)
    evals = []
    summary = run_loop(state := build_state(cfg, data), report=lambda m: evals.append(int(m["step"])))
    torch.manual_seed(cfg.train.seed)
    model = build_model("logreg", data.input_shape, data.num_classes)
    opt, old = torch.optim.SGD(model.parameters(), lr=0.05), TodaysSampler(data.n, 16, "shuffle", cfg.train.seed)
    steps = math.ceil(1.3 * data.n / 16)
    for step in range(steps):
        idx = old.global_batch(step)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    assert summary.steps == steps and summary.passes == pytest.approx(steps * 16 / data.n)
    for name, w in model.state_dict().items():
        assert torch.equal(w, state.model.state_dict()[name])
    every = round(0.1 * data.n)
    expected = [s for s in range(1, steps + 1) if s * 16 // every > (s - 1) * 16 // every or s == steps]
    assert evals[:-1] == expected[:-1] and summary.extra[bs.MEAN_BATCH_METRIC] == 16


def _straight_and_resumed(rank, world_size, cfg, data, folder, resume_at):
    from raygd.checkpoint import load_checkpoint, save_checkpoint

    saved, batches = [], []

    def checkpoint(metrics, state):
        saved.append(state["step"])
        batches.append(metrics[bs.BATCH_METRIC])
        if state["step"] == resume_at:
            save_checkpoint(folder, state)

    w = build_state(cfg, data, rank, world_size)
    straight = run_loop(w, checkpoint=checkpoint)
    if resume_at is None:  # the first pass only finds where B moved
        return saved, batches
    if world_size > 1:
        torch.distributed.barrier()
    w2 = build_state(cfg, data, rank, world_size)
    resumed = run_loop(w2, resume={**load_checkpoint(folder, rank), "restarts": 1})
    weights = [{k: v.detach().clone() for k, v in m.model.state_dict().items()} for m in (w, w2)]
    return saved, batches, straight, resumed, weights, (w.cursor, w2.cursor)


@pytest.mark.parametrize("world_size, estimator", [(1, "in_step"), (2, "free")])
def test_a_run_whose_b_moves_resumes_to_the_same_weights(idx_dir, tmp_path, world_size, estimator):
    cfg = _cfg(
        idx_dir,
        f"train.num_workers={world_size}",
        f"train.diversity_estimator={estimator}",
        "train.diversity_every_steps=2",
        "train.batch_schedule.policy=diversity",
        "train.batch_schedule.delta=4",
        "train.batch_schedule.hysteresis=0.1",
        "train.batch_schedule.warmup_measurements=2",
        "train.max_passes=2",
        "train.max_failures=1",
    )
    data = load_data(cfg.data, 0)
    args = (cfg, data, tmp_path, None)
    first = (
        run_group(_straight_and_resumed, world_size, *args) if world_size > 1 else [_straight_and_resumed(0, 1, *args)]
    )
    saved, batches = first[0][0], first[0][1]
    moved = [s for s, b in zip(saved, batches, strict=True) if b != 16]
    assert moved, f"B never moved: {batches}"
    resume_at = moved[len(moved) // 2]  # a checkpoint after B has moved, before the run ends
    args = (cfg, data, tmp_path, resume_at)
    results = (
        run_group(_straight_and_resumed, world_size, *args) if world_size > 1 else [_straight_and_resumed(0, 1, *args)]
    )
    for _, _, straight, resumed, (w_straight, w_resumed), (c1, c2) in results:
        assert resumed.steps == straight.steps and c1 == c2
        assert resumed.passes == straight.passes
        assert resumed.extra[bs.MEAN_BATCH_METRIC] == straight.extra[bs.MEAN_BATCH_METRIC]
        for name in w_straight:
            torch.testing.assert_close(w_resumed[name], w_straight[name], rtol=0, atol=0)


def test_an_adaptive_run_counts_passes_in_examples_and_records_its_batch(idx_dir):
    cfg = _cfg(
        idx_dir,
        "train.diversity_estimator=in_step",
        "train.diversity_every_steps=1",
        "train.batch_schedule.policy=diversity",
        "train.batch_schedule.delta=3",
        "train.max_passes=3",
    )
    data, reports = load_data(cfg.data, 0), []
    summary = run_loop(build_state(cfg, data), report=reports.append)
    mean_b = summary.extra[bs.MEAN_BATCH_METRIC]
    assert summary.passes >= 3 and summary.passes == pytest.approx(mean_b * summary.steps / data.n)
    assert mean_b != 16 and {r[bs.BATCH_METRIC] for r in reports} != {16.0}
    assert all(math.isfinite(r[bs.STEP_SIZE_METRIC]) for r in reports)
    assert any("batch_schedule/bound" in r for r in reports)
    passes = [r["progress/passes"] for r in reports]
    crossed = [math.floor(p / 0.1 + 1e-9) for p in passes]  # one evaluation per 0.1 pass crossed (or more per update)
    assert crossed == sorted(set(crossed))


# --------------------------------------------------------------------------- sweeps


def _spec(**space):
    from tuning.spec import SweepSpec

    return SweepSpec(
        name="adaptive",
        base={"data": {"name": "synthetic"}, "train": {"batch_schedule": {"max_batch_size": 512}}},
        space={"step_size": [0.1, 0.2], "global_batch_size": [32, 128], "seed": [0, 1], **space},
    )


def test_a_sweep_runs_each_adaptive_policy_once_per_step_size_and_seed_at_the_smallest_b():
    from tuning.rounds import ordered_grid

    spec = _spec(batch_schedule=[{"policy": "fixed"}, {"policy": "diversity"}, {"policy": "goodput", "delta": 2}])
    params = spec.trial_params()
    fixed = [p for p in params if p["batch_schedule"]["policy"] == "fixed"]
    adaptive = [p for p in params if p["batch_schedule"]["policy"] != "fixed"]
    assert len(fixed) == 2 * 2 * 2 and len(adaptive) == 2 * 2 * 2  # two policies × γ × seed, at B = 32 only
    assert {p["global_batch_size"] for p in adaptive} == {32}
    assert len(ordered_grid(spec)) == len(params)
    cfg = spec.run_config(adaptive[-1])
    assert cfg.train.batch_schedule.policy == "goodput" and cfg.train.batch_schedule.max_batch_size == 512
    with pytest.raises(ConfigError, match="duplicate"):
        _spec(batch_schedule=[{"policy": "diversity"}, {"policy": "diversity"}])
    with pytest.raises(ConfigError, match=r"space\.batch_schedule"):
        _spec(batch_schedule=["diversity"])


def test_the_table_shows_each_policy_beside_the_best_fixed_b_with_its_interval():
    from tuning.rounds import pair_params
    from tuning.stats import best_per_mechanism
    from tuning.tables import summary_markdown

    def rec(i, policy, batch, time, mean_b):
        return {
            "trial_id": f"t{i}",
            "mechanism": "vanilla",
            "step_size": 0.1,
            "global_batch_size": batch,
            "status": "reached_target",
            "seed": i % 3,
            "time_to_accuracy_s": time,
            "batch_policy": policy,
            "mean_batch_size": mean_b,
        }

    records = [rec(i, "fixed", 64, 10.0 + i % 3, 64) for i in range(3)]
    records += [rec(3 + i, "fixed", 256, 20.0 + i % 3, 256) for i in range(3)]
    records += [rec(6 + i, "diversity", 64, 8.0 + i % 3, 140.0) for i in range(3)]
    rows = {r.mechanism: r for r in best_per_mechanism(records)}
    assert set(rows) == {"vanilla", "vanilla: diversity"}
    adaptive = rows["vanilla: diversity"]
    assert adaptive.speedup == pytest.approx(11.0 / 9.0) and adaptive.speedup_lo is not None
    assert adaptive.mean_batch_size == pytest.approx(140.0) and rows["vanilla"].global_batch_size == 64
    text = summary_markdown(list(rows.values()))
    assert "| vanilla: diversity | 0.1 | B̄ 140 (from 64) |" in text and "no B to tune" in text
    spec = _spec(batch_schedule=[{"policy": "fixed"}, {"policy": "diversity"}])
    (again,) = pair_params(spec, "vanilla: diversity", 0.1, 32, [5])  # a confirm or edge trial of that row
    assert again["batch_schedule"] == {"policy": "diversity"} and again["seed"] == 5


def _goodput_run(rank, world_size, cfg, data):
    reports: list[dict] = []
    summary = run_loop(build_state(cfg, data, rank, world_size), report=reports.append)
    return summary.steps, [r[bs.BATCH_METRIC] for r in reports], [r[bs.STEP_SIZE_METRIC] for r in reports]


def test_goodput_ranks_agree_on_b_from_their_own_clocks(idx_dir):
    # Each rank times its own updates; a B that differed between ranks would pair different collectives.
    cfg = _cfg(
        idx_dir,
        "train.num_workers=2",
        "train.batch_schedule.policy=goodput",
        "train.batch_schedule.warmup_measurements=1",
        "train.batch_schedule.goodput_gain=1.0",  # any predicted gain moves B, however loaded the machine is
        "train.diversity_every_steps=1",
        "train.network.latency_us=20000",  # ~40 ms a collective: a larger B pays
        "train.max_passes=1",
    )
    (steps0, b0, lr0), (steps1, b1, lr1) = run_group(_goodput_run, 2, cfg, load_data(cfg.data, 0))
    assert steps0 == steps1 and b0 == b1 and lr0 == lr1
    assert max(b0) > 16, f"goodput never grew B on a slow link: {b0}"
