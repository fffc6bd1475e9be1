"""Tests for tuning/edges.py (which values bracket a winner on a grid edge) and the edge marks of the tables."""

from __future__ import annotations

import itertools
import math

import pytest

from raygd.records import EXTEND_PHASE
from tests.trials import rec, seeds
from tuning.edges import describe_extensions, extended_values, next_trials
from tuning.stats import EDGE_HIGH, EDGE_LOW, best_per_mechanism
from tuning.tables import summary_markdown

BOTH = {"step_size": 2, "global_batch_size": 2}


def grid(mech: str, times: dict[tuple[float, int], float | None], **kw) -> list[dict]:
    return [rec(mech, g, b, time=t, **kw) for (g, b), t in times.items()]


def test_winner_on_the_top_step_size_at_the_smallest_batch_is_marked_on_both_axes():
    records = grid("vanilla", {(0.1, 64): 9.0, (0.2, 64): 5.0, (0.1, 256): 12.0, (0.2, 256): 8.0})
    (row,) = best_per_mechanism(records)
    assert (row.step_size, row.global_batch_size) == (0.2, 64)
    assert (row.step_edge, row.batch_edge) == (EDGE_HIGH, EDGE_LOW)
    md = summary_markdown([row])
    assert "| 0.2↑ | 64↓ |" in md and "↑/↓" in md


def test_interior_winner_has_no_mark_and_an_axis_of_one_value_is_never_an_edge():
    records = grid("vanilla", {(0.1, 64): 9.0, (0.2, 64): 4.0, (0.4, 64): 6.0})
    (row,) = best_per_mechanism(records)
    assert (row.step_edge, row.batch_edge) == (None, None)
    assert "↑" not in summary_markdown([row]) and "↓" not in summary_markdown([row])
    assert next_trials(records, searched={"step_size": 3, "global_batch_size": 1}) == []


def test_next_trials_doubles_the_top_step_and_halves_the_smallest_batch_with_its_step_grid():
    records = grid("vanilla", {(0.1, 64): 9.0, (0.2, 64): 5.0, (0.1, 256): 12.0, (0.2, 256): 8.0})
    got = [(p.step_size, p.global_batch_size, p.axis) for p in next_trials(records, searched=BOTH)]
    # γ is bracketed at B* = 64 and at its neighbour 256, so that B* beats 256 at 256's own best γ
    assert got == [
        (0.1, 32, "global_batch_size"),
        (0.2, 32, "global_batch_size"),
        (0.4, 64, "step_size"),
        (0.4, 256, "step_size"),
    ]
    # a batch size the limit forbids is not proposed
    got = next_trials(records, searched=BOTH, valid_batch=lambda b: b >= 64)
    assert [(p.step_size, p.global_batch_size) for p in got] == [(0.4, 64), (0.4, 256)]


def test_unreached_batch_moves_down_when_all_diverged_and_up_when_none_did():
    div = [rec("m", g, 512, status="diverged", loss=math.nan) for g in (0.2, 0.4)]
    slow = [rec("m", g, 64, status="max_passes") for g in (0.2, 0.4)]
    winner = [rec("m", 0.1, 128, time=5.0), rec("m", 0.2, 128, time=4.0), rec("m", 0.4, 128, time=6.0)]
    got = next_trials(div + slow + winner, searched=BOTH, scope="every_batch")
    assert sorted((p.step_size, p.global_batch_size) for p in got) == [(0.1, 512), (0.8, 64)]
    with pytest.raises(ValueError, match="extend_edges_scope"):
        next_trials(winner, searched=BOTH, scope="nowhere")


def test_unreached_batch_follows_final_accuracy_and_stops_once_it_falls_to_chance():
    """B = 1024 of the batch-scaling re-run: none of 0.05..1.6 reached; 0.8 sat at chance but did not diverge."""
    climb = [rec("m", 0.05, 1024, acc=0.70), rec("m", 0.2, 1024, acc=0.80)]
    assert [p.step_size for p in next_trials(climb, searched=BOTH)] == [0.4]
    climb += [rec("m", 0.4, 1024, acc=0.82, phase=EXTEND_PHASE)]
    assert [p.step_size for p in next_trials(climb, searched=BOTH)] == [0.8]
    climb += [rec("m", 0.8, 1024, acc=0.10, phase=EXTEND_PHASE)]  # stuck at chance: the peak 0.4 is interior
    assert next_trials(climb, searched=BOTH) == []
    # the smallest γ stable but slow, the larger one diverged: a smaller γ would be slower still
    slow_then_div = [rec("m", 0.05, 1024, acc=0.7), rec("m", 0.2, 1024, status="diverged", loss=math.nan, acc=0.1)]
    assert next_trials(slow_then_div, searched=BOTH) == []
    # ... but when a seed of the smallest γ diverged too, γ moves down
    shaky = [*seeds("m", 0.05, 1024, [None, None]), rec("m", 0.05, 1024, seed=2, status="diverged", loss=math.nan)]
    shaky += seeds("m", 0.2, 1024, [None], status="diverged", loss=math.nan)
    assert [p.step_size for p in next_trials(shaky, searched=BOTH)] == [0.025]


def test_a_resumed_round_is_planned_again_from_the_trials_before_it():
    """--resume finds some of round k's trials recorded: round k must get the same proposals (not round k+1's)."""
    records = grid("vanilla", {(0.1, 64): 9.0, (0.2, 64): 5.0})
    round1 = next_trials(records, searched=BOTH, extend_round=1)
    assert [(p.step_size, p.global_batch_size) for p in round1] == [(0.4, 64)]
    records += [rec("vanilla", 0.4, 64, time=4.0, phase=EXTEND_PHASE, extend_round=1)]
    assert next_trials(records, searched=BOTH, extend_round=1) == round1
    assert [p.step_size for p in next_trials(records, searched=BOTH, extend_round=2)] == [0.8]
    records += [rec("vanilla", 0.8, 64, time=4.5, phase=EXTEND_PHASE, extend_round=2)]
    assert next_trials(records, searched=BOTH, extend_round=2) == next_trials(records[:-1], searched=BOTH)
    assert next_trials(records, searched=BOTH, extend_round=3) == []  # 0.4 is interior now
    # a sweep recorded before rounds were tagged keeps the old behaviour: every record counts
    untagged = [*records[:2], rec("vanilla", 0.4, 64, time=4.0, phase=EXTEND_PHASE)]
    assert [p.step_size for p in next_trials(untagged, searched=BOTH, extend_round=1)] == [0.8]


def _true_time(step: float, batch: int) -> float:
    """A smooth landscape whose optimum (γ = 1.6 at B = 512) lies beyond the initial grid's top corner."""
    return 10.0 + (math.log2(step / 1.6)) ** 2 + (math.log2(batch / 512)) ** 2


def test_extension_rounds_stop_at_an_interior_winner():
    """Run the planner as the sweep does, round after round, against a known landscape."""
    records = [rec("vanilla", g, b, time=_true_time(g, b)) for g, b in itertools.product((0.1, 0.2), (64, 128))]
    for _round in range(10):
        proposals = next_trials(records, searched=BOTH, valid_batch=lambda b: b <= 4096)
        if not proposals:
            break
        records += [
            rec(
                "vanilla",
                p.step_size,
                p.global_batch_size,
                time=_true_time(p.step_size, p.global_batch_size),
                phase=EXTEND_PHASE,
            )
            for p in proposals
        ]
    else:
        pytest.fail("the extension never stopped")
    (row,) = best_per_mechanism(records)
    assert (row.step_size, row.global_batch_size) == (1.6, 512)
    assert (row.step_edge, row.batch_edge) == (None, None)
    added = extended_values(records)["vanilla"]
    assert added["step_size"][-1] == 3.2 and added["global_batch_size"] == [256.0, 512.0, 1024.0]
    assert describe_extensions(records).startswith("vanilla: γ + 0.4, 0.8")
    assert "Grid edges extended: vanilla: γ + 0.4" in summary_markdown([row], extensions=describe_extensions(records))


def test_stated_limit_leaves_the_mark():
    records = grid("vanilla", {(0.1, 64): 9.0, (0.2, 64): 5.0})
    records += [rec("vanilla", 0.4, 64, time=4.0, phase=EXTEND_PHASE)]
    (row,) = best_per_mechanism(records)
    assert row.step_edge == EDGE_HIGH  # still on the edge: the table keeps the mark
    assert [p.step_size for p in next_trials(records, searched=BOTH)] == [0.8]


def test_speedup_interval_and_significance_from_search_seeds():
    fast = seeds("vanilla", 0.1, 64, [10.0, 10.5, 9.5]) + seeds("dc", 0.1, 64, [5.0, 5.2, 4.8])
    same = seeds("vanilla", 0.1, 64, [10.0, 12.0, 8.0]) + seeds("dc", 0.1, 64, [9.0, 11.0, 13.0])
    base, dc = best_per_mechanism(fast)
    assert base.speedup == 1.0 and base.significant is None  # no interval for the baseline against itself
    assert dc.significant is True and dc.speedup_lo > 1.0
    md = summary_markdown([base, dc])
    assert f"[{dc.speedup_lo:.2f}–{dc.speedup_hi:.2f}]" in md and "n.s." not in md
    _, dc2 = best_per_mechanism(same)
    assert dc2.significant is False and dc2.speedup_lo <= 1.0 <= dc2.speedup_hi
    assert "n.s." in summary_markdown([dc2])
    (single,) = best_per_mechanism(seeds("dc", 0.1, 64, [5.0]))
    assert single.speedup_lo is None and single.significant is None


def test_every_batch_also_brackets_the_step_of_fewest_updates():
    """At B = 64 the fastest γ (0.2) is interior but γ = 0.4 needs the fewest updates to target, on the top edge: the
    critical batch size is fitted at that γ, so every_batch proposes 0.8 there; winner scope looks at time only."""
    records = [
        {**r, "updates_to_accuracy": u}
        for (g, t, u) in ((0.1, 9.0, 300), (0.2, 4.0, 200), (0.4, 6.0, 150))
        for r in seeds("vanilla", g, 64, [t, t + 0.5])
    ]
    got = next_trials(records, searched={"step_size": 3, "global_batch_size": 1}, scope="every_batch")
    assert [(p.step_size, p.global_batch_size) for p in got] == [(0.8, 64)]
    assert next_trials(records, searched={"step_size": 3, "global_batch_size": 1}, scope="winner") == []
    tied = [{**r, "updates_to_accuracy": 150 if r["step_size"] > 0.1 else 300} for r in records]
    assert next_trials(tied, searched={"step_size": 3, "global_batch_size": 1}, scope="every_batch") == []
