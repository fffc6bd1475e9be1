"""bench/paper/results.py: the paper's loss ratio, tuned step, batch scaling and bound-vs-best, against brute force."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import statistics

import pytest

from bench.paper import results
from raygd.records import TrialRecord
from tuning import stats


def _interp_loop(xs: list[float], ys: list[float], x: float) -> float:
    """Linear interpolation by a plain search (clamped at the ends), the brute-force reference."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _random_curve(rng: random.Random, n: int, spacing: float) -> results.Curve:
    passes = tuple(spacing * k for k in range(n + 1))
    return results.Curve(passes, tuple(rng.uniform(0.2, 2.0) for _ in passes))


@pytest.mark.parametrize("seed", range(5))
def test_mean_loss_ratio_matches_brute_force_interpolation(seed):
    rng = random.Random(seed)
    small, large = _random_curve(rng, 96, 1 / 32), _random_curve(rng, 12, 0.25)
    expected = [
        v / _interp_loop(list(small.passes), list(small.loss), p)
        for p, v in zip(large.passes, large.loss, strict=True)
        if 0 < p <= small.passes[-1]
    ]
    assert results.mean_loss_ratio(small, large) == pytest.approx(sum(expected) / len(expected), rel=1e-12)


def test_mean_loss_ratio_of_a_diverged_curve_is_none():
    ok = results.Curve((0.0, 1.0), (1.0, 0.5))
    assert results.mean_loss_ratio(ok, results.Curve((0.0, 1.0), (1.0, math.nan))) is None
    assert results.mean_loss_ratio(ok, ok) == pytest.approx(1.0)


def test_tuned_step_prefers_lowest_average_loss_and_ranks_divergence_last():
    good = results.Curve((0.0, 1.0, 2.0), (1.0, 0.4, 0.3))
    better = results.Curve((0.0, 1.0, 2.0), (1.0, 0.2, 0.1))
    diverged = results.Curve((0.0, 1.0), (1.0, math.inf))
    assert results.tuned_step({0.1: [good, good], 0.4: [better, better]}) == 0.4
    assert results.tuned_step({0.1: [good, good], 0.4: [better, diverged]}) == 0.1  # one seed diverged
    assert results.tuned_step({0.4: [diverged]}) is None


def test_fig3a_rows_use_each_batch_sizes_tuned_step_and_pair_seeds():
    rng = random.Random(0)
    runs = []
    for b, spacing, n in ((16, 1 / 32, 96), (512, 0.25, 12)):
        for step in (0.05, 0.2):
            for seed in range(3):
                runs.append(
                    {
                        "replication": 2,
                        "mechanism": "vanilla",
                        "global_batch_size": b,
                        "step_size": step,
                        "seed": seed,
                        "curve": _random_curve(rng, n, spacing),
                    }
                )
    (row,) = results.fig3a_rows(runs, 16, 512)

    def avg(b, step):
        return sum(r["curve"].mean_loss() for r in runs if (r["global_batch_size"], r["step_size"]) == (b, step)) / 3

    best = {b: min((0.05, 0.2), key=lambda s: avg(b, s)) for b in (16, 512)}
    curves = {
        (r["global_batch_size"], r["seed"]): r["curve"] for r in runs if r["step_size"] == best[r["global_batch_size"]]
    }
    ratios = [results.mean_loss_ratio(curves[(16, s)], curves[(512, s)]) for s in range(3)]
    assert (row.small_step, row.large_step) == (best[16], best[512])
    assert row.ratio_mean == pytest.approx(sum(ratios) / 3)
    assert row.n_seeds == 3 and row.ratio_std is not None
    assert row.edge_steps  # a grid of two: whichever step wins is at an edge


def test_scaling_rows_per_pass_speedup_against_smallest_batch():
    recs = []
    for b, t_pass, passes in ((64, 4.0, 2.0), (256, 2.0, 3.0), (1024, 1.0, 6.0)):
        for seed in range(2):
            recs.append(
                TrialRecord(
                    trial_id=f"{b}-{seed}",
                    mechanism="vanilla",
                    step_size=0.1,
                    global_batch_size=b,
                    seed=seed,
                    status="reached_target",
                    time_to_accuracy_s=t_pass * passes,
                    passes_to_accuracy=passes,
                    passes=passes,
                    train_time_s=t_pass * passes,
                )
            )
    rows = results.scaling_rows(stats.pair_stats(recs))
    assert [r.global_batch_size for r in rows] == [64, 256, 1024]
    assert [r.pass_speedup for r in rows] == pytest.approx([1.0, 2.0, 4.0])
    assert [r.passes_mean for r in rows] == pytest.approx([2.0, 3.0, 6.0])


def _trial(mech, step, b, seed, passes_to_acc, passes, speed, reached=True):
    """A trial that trained ``passes`` passes at ``speed`` s per pass; reached at ``passes_to_acc``."""
    return TrialRecord(
        trial_id=f"{mech}-{step}-{b}-{seed}",
        mechanism=mech,
        step_size=step,
        global_batch_size=b,
        seed=seed,
        status="reached_target" if reached else "max_passes",
        time_to_accuracy_s=passes_to_acc * speed if reached else None,
        passes_to_accuracy=passes_to_acc if reached else None,
        passes=passes,
        train_time_s=passes * speed,
    )


def test_common_speed_times_passes_by_the_median_pass_time_of_every_trial_at_that_batch():
    rng = random.Random(3)
    recs = []
    for mech, base_speed in (("vanilla", 1.0), ("dropconnect(p=0.5)", 1.2)):
        for b in (64, 256):
            for step, passes_to_acc in ((0.2, 2.0), (0.4, 1.5), (0.8, 1.8)):
                for seed in range(3):
                    p = passes_to_acc + 0.1 * seed + (0.5 if mech != "vanilla" else 0.0)
                    drift = rng.uniform(0.6, 1.2)  # each trial at its own hour's speed
                    recs.append(_trial(mech, step, b, seed, p, p + 0.3, base_speed * b / 64 * drift))
    recs.append(_trial("vanilla", 1.6, 64, 0, None, 10.0, 0.5, reached=False))  # timed, never reached
    rows = results.common_speed_rows(iter(recs))  # an iterator is read once
    assert [(r.mechanism, r.global_batch_size) for r in rows] == [
        ("vanilla", 64),
        ("vanilla", 256),
        ("dropconnect(p=0.5)", 64),
        ("dropconnect(p=0.5)", 256),
    ]
    for r in rows:
        mine = [t for t in recs if t.mechanism == r.mechanism and t.global_batch_size == r.global_batch_size]
        brute = sorted(t.train_time_s / t.passes for t in mine)
        assert r.pass_time_s == pytest.approx(
            brute[len(brute) // 2] if len(brute) % 2 else (brute[len(brute) // 2 - 1] + brute[len(brute) // 2]) / 2
        )
        assert r.n_timed == len(mine)
        assert r.step_size == 0.4 and not r.step_edge  # fewest passes; 0.2 and 1.6/0.8 bracket it
        assert r.times_s == pytest.approx([p * r.pass_time_s for p in r.passes])
        assert r.raw_times_s == tuple(t.time_to_accuracy_s for t in mine if t.step_size == 0.4)
    best = results.common_speed_best(rows)
    v, d = best
    assert v.row.global_batch_size == 64 and v.speedup == pytest.approx(1.0)
    assert d.speedup == pytest.approx(statistics.fmean(v.row.times_s) / statistics.fmean(d.row.times_s))
    assert d.speedup < 1.0 and d.significant  # slower per pass and more passes: significantly slower
    table = results.common_speed_markdown(rows, 0.85)
    assert "1 (baseline)" in table.splitlines()[4] and v.significant is None
    assert f"{d.speedup:.2f}× ({d.low:.2f}–{d.high:.2f})" in table.splitlines()[5]
    one_seed = results.common_speed_best(
        [dataclasses.replace(r, passes=r.passes[:1], raw_times_s=r.raw_times_s[:1], n_seeds=1) for r in rows]
    )
    assert one_seed[1].significant is None  # one seed per arm: no interval, never called significant


def test_common_speed_prefers_a_step_whose_every_seed_reached():
    recs = [_trial("vanilla", 0.4, 64, s, 1.0, 1.0, 1.0, reached=s < 2) for s in range(3)]
    recs += [_trial("vanilla", 0.2, 64, s, 3.0, 3.0, 1.0) for s in range(3)]
    (row,) = results.common_speed_rows(recs)
    assert row.step_size == 0.2 and row.all_reached and row.step_edge
    # among steps whose every seed reached, fewer passes wins however many seeds each ran
    recs += [_trial("vanilla", 0.8, 64, 0, 2.0, 2.0, 1.0)]
    (row,) = results.common_speed_rows(recs)
    assert row.step_size == 0.8 and row.passes == (2.0,)


def test_bound_vs_best_ratio_and_sweeps_not_run():
    rows = results.bound_vs_best(
        {"vanilla": 128.0, "dropconnect(p=0.4)": 300.0},
        {"vanilla": 40.0},
        {"vanilla": (256, "paper-dropconnect sweep")},
    )
    by = {r.setting: r for r in rows}
    assert by["vanilla"].ratio_best_to_bound == pytest.approx(2.0)
    assert by["vanilla"].bound_min_along == 40.0
    assert by["dropconnect(p=0.4)"].best_batch is None and by["dropconnect(p=0.4)"].best_source == "not run"
    assert "not run yet" in results.bound_markdown(rows)


def test_fig3a_evaluates_on_the_grid_of_the_committed_results():
    # docs/RESULTS.md: every 4 updates of B=512 (2048 examples, 0.25 passes of n=8192) at both B.
    import dataclasses

    from bench.paper.run import grid_examples
    from tuning.spec import load_sweep_spec

    spec = load_sweep_spec("paper-fig3a")
    cfg = spec.run_config(spec.trial_params()[0])
    assert cfg.train.eval_every_steps is None and grid_examples(cfg, 8192, 512) == 2048
    explicit = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every_steps=4))
    assert grid_examples(explicit, 8192, 512) == 4 * 512
    assert grid_examples(cfg, 10000, 512) == 2560  # 0.25 passes = 2500 examples, up to a multiple of 512


def test_fig3a_control_rows_pair_with_their_replicated_rows_by_seed():
    rng = random.Random(1)
    runs = [
        {
            "replication": r,
            "control": ctrl,
            "mechanism": "vanilla",
            "global_batch_size": b,
            "step_size": 0.1,
            "seed": seed,
            "curve": _random_curve(rng, n, spacing),
        }
        for r, ctrl in ((1, False), (4, False), (4, True))
        for b, spacing, n in ((16, 1 / 32, 96), (512, 0.25, 12))
        for seed in range(4 if ctrl else 3)  # the control has a seed the replicated arm lacks
    ]
    rows = results.fig3a_rows(runs, 16, 512)
    arms = [(r.replication, r.arm, r.n_seeds) for r in rows]
    assert arms == [(1, "full data", 3), (4, "replicated", 3), (4, "control", 4)]
    (pair,) = results.control_pairs(rows)

    def rho(r, ctrl, seed):
        small, large = (
            next(x["curve"] for x in runs if (x["replication"], x["control"], x["global_batch_size"], x["seed"]) == key)
            for key in ((r, ctrl, 16, seed), (r, ctrl, 512, seed))
        )
        return results.mean_loss_ratio(small, large)

    diffs = [rho(4, False, s) - rho(4, True, s) for s in range(3)]
    assert pair.n_paired == 3 and pair.replication == 4
    assert pair.diff_mean == pytest.approx(sum(diffs) / 3)
    assert pair.diff_std == pytest.approx((sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2) ** 0.5)
    md = results.fig3a_control_markdown(rows)
    assert "| vanilla | 4 |" in md and md.rstrip().endswith("| 3 |")


def test_fig3a_jobs_add_a_control_per_replicated_run_with_equal_updates():
    from bench.paper.run import control_config, fig3a_jobs
    from tuning.spec import load_sweep_spec

    spec = load_sweep_spec("paper-fig3a")
    jobs = fig3a_jobs(spec)
    assert len(jobs) == 800 + 600 and spec.space["seed"] == list(range(10))
    assert [p["seed"] for p, _ in jobs] == sorted(p["seed"] for p, _ in jobs)  # whole seeds first
    replicated = [p for p, ctrl in jobs if not ctrl and p["replication"] > 1]
    assert sorted(map(str, replicated)) == sorted(str(p) for p, ctrl in jobs if ctrl)
    assert len(fig3a_jobs(spec, control=False)) == 800
    cfg = spec.run_config(replicated[0])
    ctl = control_config(cfg)
    assert ctl.data.replication_control and ctl.data.replication == cfg.data.replication
    n, n_ctl = cfg.data.train_size, cfg.data.train_size // cfg.data.replication
    assert ctl.train.max_passes * n_ctl == cfg.train.max_passes * n  # equal examples processed, equal updates


def test_fig3a_extra_counts_control_runs_identical_to_their_replicated_twin():
    from bench.paper.fig3a_extra import control_identity, losses_by_batch

    a, b = results.Curve((0.0, 1.0), (0.7, 0.5)), results.Curve((0.0, 1.0), (0.7, 0.4))
    base = {"replication": 2, "mechanism": "vanilla", "global_batch_size": 16, "step_size": 0.1}
    runs = [
        {**base, "seed": 0, "control": False, "curve": a},
        {**base, "seed": 0, "control": True, "curve": a},
        {**base, "seed": 1, "control": False, "curve": a},
        {**base, "seed": 1, "control": True, "curve": b},
    ]
    assert control_identity(runs).startswith("control runs with a replicated twin: 2; identical loss curves: 1;")
    assert "max |ΔL| 0.1" in control_identity(runs)
    table = losses_by_batch(runs)
    assert "| vanilla | 2 | replicated | 16 | 0.1 | 2 | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 |" in table


@pytest.mark.parametrize(
    "argv", [["fig3a", "--resume"], ["bound", "--resume"], ["dropconnect", "--resume", "--report-only"]]
)
def test_resume_is_refused_where_there_is_no_sweep_to_resume(argv, capsys):
    from bench.paper.run import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--resume is for the Ray Tune sweeps dropconnect and batch-scaling" in err and argv[0] in err


def _measured(mech, step, batch, seed, time=None, updates=None):
    status = "reached_target" if time is not None else "max_passes"
    return TrialRecord.from_dict(
        {
            "trial_id": f"{mech}-{step}-{batch}-{seed}",
            "mechanism": mech,
            "step_size": step,
            "global_batch_size": batch,
            "seed": seed,
            "status": status,
            "time_to_accuracy_s": time,
            "updates_to_accuracy": updates,
        }
    )


def _projected(mech, step, batch, seed, tta, updates, workers=2):
    return {
        "mechanism": mech,
        "step_size": step,
        "global_batch_size": batch,
        "seed": seed,
        "workers": workers,
        "projected_time_to_accuracy_s": tta,
        "updates_to_accuracy": updates,
    }


def test_link_check_pairs_each_seed_with_its_own_projection():
    projected = [_projected("vanilla", 0.2, 256, s, 10.0 + s, 100 + s) for s in range(3)]
    projected += [_projected("vanilla", 0.2, 256, 0, 99.0, 100, workers=8)]  # another P: ignored
    projected += [_projected("dc", 0.4, 512, s, 8.0, 50) for s in range(2)]
    projected += [_projected("dc", 0.4, 512, 2, "", "")]  # seed 2 did not reach without the link
    measured = [_measured("vanilla", 0.2, 256, s, 11.0 + s, 100 + s) for s in range(3)]
    measured += [_measured("dc", 0.4, 512, 0, 6.0, 50), _measured("dc", 0.4, 512, 1, 10.0, 51)]
    measured += [_measured("dc", 0.4, 512, 2, 7.0, 50)]  # no projection to compare with
    measured += [_measured("sgld", 0.1, 64, 0, 5.0, 10)]  # not in the projection at all
    van, dc = results.link_check_rows(projected, measured)
    assert (van.mechanism, van.seeds, van.same_updates) == ("vanilla", 3, 3)
    assert van.projected_mean_s == pytest.approx(11.0) and van.measured_mean_s == pytest.approx(12.0)
    assert van.errors == pytest.approx((11 / 10 - 1, 12 / 11 - 1, 13 / 12 - 1))
    assert (dc.seeds, dc.same_updates, dc.errors) == (2, 1, pytest.approx((-0.25, 0.25)))
    md = results.link_check_markdown([van, dc], "0.2 Gbit/s, 50 µs")
    errors = sorted(abs(e) for e in van.errors + dc.errors)  # five seeds: the median is the third
    assert f"over 5 measured seeds: median {errors[2]:.1%}, worst {errors[-1]:.1%}" in md
    assert "EMULATED" in md and "PROJECTION" in md and "| dc | 0.4 | 512 | 2 | 1/2 |" in md
    assert f"| dc | 0.4, 512 | {12.0 / 8.0:.2f}× | {11.0 / 8.0:.2f}× |" in md  # measured and projected speedups


def test_link_plan_picks_the_projected_winner_and_its_neighbours(sqlite_uri):
    from bench.paper.run import LINK_BATCH, LINK_LATENCY_US, link_plan
    from raygd import costmodel as cm
    from raygd import project
    from raygd.records import KIND_TAG, SWEEP_KIND
    from raygd.tracking import create_run
    from tests.test_project import FIXED, LOGREG_PARAMS, PER_EXAMPLE, _trial

    parent = create_run(sqlite_uri, "proj", "sweep-proj", {}, {KIND_TAG: SWEEP_KIND})
    updates = {(0.1, 64): 400, (0.2, 64): 300, (0.1, 256): 150, (0.2, 256): 200, (0.1, 1024): 90, (0.2, 1024): 80}
    for i, ((step, batch), n) in enumerate(updates.items()):
        _trial(sqlite_uri, parent, i, "vanilla", step, batch, n)
    trials = project.read_trials(sqlite_uri, parent)
    for rho in (0.1, 10.0):
        link, _, plan = link_plan(trials, rho, neighbours=False)
        compute = cm.Compute(PER_EXAMPLE, FIXED)
        payload = 4 * LOGREG_PARAMS
        assert cm.step_cost(LINK_BATCH, 2, compute, payload, link).rho == pytest.approx(rho, rel=1e-3)
        assert link.latency_s == pytest.approx(LINK_LATENCY_US * 1e-6)
        by_hand = {k: n * cm.step_cost(k[1], 2, compute, payload, link).total_s for k, n in updates.items()}
        step, batch = min(by_hand, key=by_hand.get)
        assert plan == [("vanilla", step, batch)]
        _, _, around = link_plan(trials, rho, neighbours=True)
        best_step = {
            b: min((s for s, bb in by_hand if bb == b), key=lambda s: by_hand[(s, b)]) for b in (64, 256, 1024)
        }
        i = [64, 256, 1024].index(batch)
        assert around == [("vanilla", best_step[b], b) for b in [64, 256, 1024][max(0, i - 1) : i + 2]]
