"""The grid and its edge rounds in one Tune experiment (tuning/rounds.py): the searcher's logic without Ray."""

from __future__ import annotations

import pickle

import pytest
from ray.tune.search import BasicVariantGenerator, Searcher

from tuning.rounds import EdgeSearcher, RoundPlanner, extension_params, grid_configs, ordered_grid, ordered_round
from tuning.spec import load_sweep_spec
from tuning.trial import EXTEND_PARAM, EXTEND_ROUND_PARAM, EXTEND_SIZE_PARAM

SPACE = {
    "step_size": [0.1, 0.4],
    "global_batch_size": [64, 256],
    "mechanism": [{"name": "vanilla"}, {"name": "dropconnect", "drop_prob": 0.4}],
    "seed": [0],
}


def test_grid_configs_are_tunes_grid_in_tunes_order():
    from ray import tune

    gen = BasicVariantGenerator()
    space = {key: tune.grid_search(values) for key, values in SPACE.items()}
    gen.add_configurations({"x": {"run": lambda config: None, "config": space, "num_samples": 1}})
    tunes = [t.config for t in iter(lambda: gen.next_trial(), None)]
    assert len(tunes) == 8 and grid_configs(SPACE) == tunes


def test_a_shuffled_grid_is_the_same_trials_in_a_seeded_order():
    grid = load_sweep_spec("paper-dropconnect", ["sweep.trial_order=grid"])
    tunes = ordered_grid(grid)
    assert tunes == grid_configs(grid.space) and len(tunes) == 120
    shuffled = [ordered_grid(load_sweep_spec("paper-dropconnect", [f"sweep.search_seed={s}"])) for s in (0, 0, 1)]
    key = repr  # configs hold dicts (mechanisms): compare them as their reprs
    assert sorted(map(key, shuffled[0])) == sorted(map(key, tunes))  # the same trials
    assert shuffled[0] == shuffled[1]  # the seed fixes the order
    assert shuffled[0] != tunes and shuffled[0] != shuffled[2]
    # Tune's order runs each step size's trials together; a shuffle spreads them over the run
    first_half = [c["step_size"] for c in shuffled[0][:60]]
    assert 20 <= first_half.count(0.2) <= 40


def test_a_shuffled_sweep_runs_each_round_in_a_seeded_order():
    """A round is planned mechanism by mechanism; shuffled, its trials are a permutation fixed by the seed and k."""
    from tuning.edges import Proposal

    spec = load_sweep_spec("paper-dropconnect")
    labels = ["vanilla", "dropconnect(p=0.4, per_group)", "dropconnect(p=0.5, per_group)"]
    planned = extension_params(spec, [Proposal(m, 0.1, 64, "step_size") for m in labels])
    assert [p["mechanism"].get("drop_prob") for p in planned[:3]] == [None] * 3  # mechanism by mechanism
    rounds = [ordered_round(spec, k, planned) for k in (1, 1, 2)]
    assert sorted(map(repr, rounds[0])) == sorted(map(repr, planned)) and rounds[0] == rounds[1]
    assert rounds[0] != planned and rounds[0] != rounds[2]
    as_grid = load_sweep_spec("paper-dropconnect", ["sweep.trial_order=grid"])
    assert ordered_round(as_grid, 1, planned) == planned


class Planner:
    """Round k's params from ``rounds[k - 1]`` (empty past the end), recording each call."""

    def __init__(self, rounds: list[list[dict]]):
        self.rounds, self.calls = rounds, []

    def __call__(self, k: int) -> list[dict]:
        self.calls.append(k)
        return self.rounds[k - 1] if k <= len(self.rounds) else []


def _round(k: int, params: list[dict]) -> list[dict]:
    return [{EXTEND_PARAM: p, EXTEND_ROUND_PARAM: k, EXTEND_SIZE_PARAM: len(params)} for p in params]


def test_a_round_is_planned_once_every_trial_before_it_has_ended_and_the_search_ends_when_one_plans_nothing():
    grid = [{"step_size": 0.1}, {"step_size": 0.4}]
    round1 = [{"step_size": 0.8}, {"step_size": 0.05}]
    planner, said = Planner([round1]), []
    s = EdgeSearcher(grid, planner, rounds=3, say=said.append)
    assert [s.suggest("a"), s.suggest("b")] == grid
    assert s.suggest("c") is None and planner.calls == []  # a and b still out: round 1 needs their results
    s.on_trial_complete("a", {"objective_s": 1.0})
    assert s.suggest("c") is None and planner.calls == []
    s.on_trial_complete("b", error=True)  # an errored trial has ended too
    assert [s.suggest("c"), s.suggest("d")] == _round(1, round1) and planner.calls == [1]
    assert said == ["grid edges, round 1/3: 2 trials beyond the winners' edges"]
    assert s.suggest("e") is None
    s.on_trial_complete("c")
    s.on_trial_complete("d")
    assert s.suggest("e") == Searcher.FINISHED and planner.calls == [1, 2]  # round 2 planned nothing
    assert s.suggest("f") == Searcher.FINISHED and planner.calls == [1, 2] and len(said) == 1


def test_the_stated_number_of_rounds_is_the_limit():
    planner = Planner([[{"step_size": 0.8}], [{"step_size": 1.6}], [{"step_size": 3.2}]])
    s = EdgeSearcher([{"step_size": 0.4}], planner, rounds=2, say=lambda line: None)
    got = []
    for i in range(5):
        config = s.suggest(f"t{i}")
        got.append(config)
        s.on_trial_complete(f"t{i}")
    assert got[:3] == [{"step_size": 0.4}, *_round(1, [{"step_size": 0.8}]), *_round(2, [{"step_size": 1.6}])]
    assert got[3:] == [Searcher.FINISHED] * 2 and planner.calls == [1, 2]


def test_a_restored_searcher_continues_its_round_without_planning_it_again(tmp_path):
    round1 = [{"step_size": 0.8}, {"step_size": 0.05}]
    s = EdgeSearcher([{"step_size": 0.1}], Planner([round1]), rounds=3, say=lambda line: None)
    s.suggest("a")
    s.on_trial_complete("a")
    assert s.suggest("b") == _round(1, round1)[0]
    s.save(str(tmp_path / "searcher.pkl"))  # what Tune saves with its experiment state

    def no_plan(k):
        raise AssertionError(f"round {k} planned again")

    restored = EdgeSearcher([{"step_size": 0.1}], no_plan, rounds=3, say=lambda line: None)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("c") == _round(1, round1)[1]  # round 1's second trial: not the grid again
    assert restored.suggest("d") is None  # b (run again by Tune after the resume) and c are out
    restored.on_trial_complete("b")
    restored.on_trial_complete("c")
    restored.plan = planner = Planner([round1, []])
    assert restored.suggest("d") == Searcher.FINISHED and planner.calls == [2] and restored.round == 2


def test_a_restored_shuffled_searcher_reshuffles_what_is_left(tmp_path):
    """A resume may run on another machine: the trials not yet handed out come back in a new seeded order."""
    round1 = [{"step_size": 0.1 * k} for k in range(1, 13)]
    s = EdgeSearcher([{"step_size": 0.05}], Planner([round1]), rounds=1, say=lambda line: None)
    s.suggest("a")
    s.on_trial_complete("a")
    s.suggest("b")
    s.save(str(tmp_path / "searcher.pkl"))
    left = list(s.queue)

    def restored(plan):
        # Tune restores the searcher it pickled, then calls restore(): the order comes from the planner's spec
        r = pickle.loads(pickle.dumps(EdgeSearcher([], plan, rounds=1, say=print)))
        r.restore(str(tmp_path / "searcher.pkl"))
        return list(r.queue)

    def planner(order):
        return RoundPlanner(load_sweep_spec("paper-dropconnect", [f"sweep.trial_order={order}"]), "parent")

    assert restored(planner("grid")) == left and restored(Planner([])) == left  # as planned
    again = restored(planner("shuffled"))
    assert again != left and sorted(map(repr, again)) == sorted(map(repr, left))
    assert again == restored(planner("shuffled"))  # seeded


@pytest.mark.parametrize("rounds", [0, 1])
def test_the_grid_alone_when_no_round_is_allowed_or_planned(rounds):
    planner = Planner([])
    s = EdgeSearcher([{"step_size": 0.1}], planner, rounds=rounds, say=lambda line: None)
    assert s.suggest("a") == {"step_size": 0.1}
    s.on_trial_complete("a")
    assert s.suggest("b") == Searcher.FINISHED and planner.calls == ([1] if rounds else [])
