"""The grid and its edge-extension rounds as one Ray Tune experiment: a Tune ``Searcher``.

``sweep.extend_edges`` adds trials beyond a grid winner's edge (``tuning.edges``) once the trials
before them have finished. Run as a Tune experiment of its own, each round started a cold trial
actor (its imports of torch, Ray Train and MLflow, the data loaded again) after Tune's own start:
~15 s from the quickstart's last grid trial to its round's first training step, in a 131 s sweep
whose trials take 1.5-4 s each. ``EdgeSearcher`` hands Tune the grid (in the order Tune's grid search
would, or shuffled: ``sweep.trial_order``, which shuffles each round too) and then the rounds, in the same
experiment: once every trial
it handed out has ended it plans the next round from the MLflow records
(``RoundPlanner``: ``tuning.edges.next_trials`` on the search and earlier rounds), until a round plans
nothing or ``extend_edges_rounds`` is reached. While it waits (``suggest`` returns None) Tune keeps
the warm trial actor for the next trial.

Tune's ``Searcher`` is the library's hook for a search that adapts to results; only what it hands
out (the edge rules) is raygd's. Its state (trials not yet handed out, trials out, the round) is saved
with Tune's experiment state, so ``raygd sweep --resume`` continues a round with the trials it had
planned; the Tune trial that was running is run again by Tune (``tuning.trial`` reuses its MLflow run).

Sweeps started before this module record their rounds as separate Tune experiments
(``tuning.sweep._extend_edges``) and resume that way (``raygd.records.EXTEND_INLINE_TAG`` tells them
apart). Tests: ``pytest tests/test_rounds.py`` (the searcher without Ray), ``tests/test_sweep.py``.
"""

from __future__ import annotations

import collections
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune.search import Searcher

from raygd.batch_schedule import schedule_label
from raygd.records import split_arm
from tuning.spec import SweepSpec, mechanism_label
from tuning.trial import EXTEND_PARAM, EXTEND_ROUND_PARAM, EXTEND_SIZE_PARAM


def grid_configs(space: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of a grid space, as and in the order that Tune's grid search produces them."""
    from ray.tune.search.variant_generator import generate_variants

    return [config for _, config in generate_variants({key: {"grid_search": list(v)} for key, v in space.items()})]


def ordered_grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """The grid's configs in the order the sweep runs them: Tune's, or with ``trial_order = shuffled`` a
    permutation drawn with ``search_seed`` (the same on every machine and on resume, which restores the queue)."""
    configs = [c for c in grid_configs(spec.space) if not spec.redundant(c)]  # adaptive batch policies: one B
    if spec.trial_order == "shuffled":
        random.Random(spec.search_seed).shuffle(configs)
    return configs


def ordered_round(spec: SweepSpec, k: int, params: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Round ``k``'s trials in the order the sweep runs them: as planned (mechanism by mechanism), or with
    ``trial_order = shuffled`` a permutation drawn with ``search_seed`` and ``k``, so that, as in the grid, a
    machine whose speed drifts during a round does not favour the mechanism planned last."""
    params = list(params)
    if spec.trial_order == "shuffled":
        random.Random(f"{spec.search_seed}/round {k}").shuffle(params)
    return params


def pair_params(
    spec: SweepSpec, mechanism: str, step_size: float, batch: int, seeds: list[int]
) -> list[dict[str, Any]]:
    """Trial params of one (mechanism label, γ, B) with each seed, on the space's smallest replication (an
    extension round's proposals, the confirm phase's winners). A label not in the space adds no mechanism."""
    mechs = {mechanism_label(m): m for m in spec.space.get("mechanism", [{"name": "vanilla"}])}
    policies = {schedule_label(e): e for e in spec.space.get("batch_schedule", [])}
    mechanism, policy = split_arm(mechanism)  # a table row of an adaptive batch policy: ``vanilla: diversity``
    out = []
    for seed in seeds:
        params: dict[str, Any] = {"step_size": step_size, "global_batch_size": batch, "seed": seed}
        if mechanism in mechs:
            params["mechanism"] = mechs[mechanism]
        if policy in policies:
            params["batch_schedule"] = policies[policy]
        if "replication" in spec.space:
            params["replication"] = min(spec.space["replication"])
        out.append(params)
    return out


def extension_params(spec: SweepSpec, proposals: list) -> list[dict[str, Any]]:
    """Trial params of an extension round: each proposal with every search seed."""
    seeds = spec.space.get("seed", [0])
    return [q for p in proposals for q in pair_params(spec, p.mechanism, p.step_size, p.global_batch_size, seeds)]


@dataclass
class RoundPlanner:
    """Round k's trial params from the sweep's MLflow records (search trials and rounds before k)."""

    spec: SweepSpec
    parent_run_id: str
    records: list | None = None
    """The records the last round was planned from (the separate-experiment path's console reads its best)."""

    def valid_batch(self, batch: int) -> bool:
        """Whether a batch size beyond the grid is a valid trial (divisible by the workers, within the data)."""
        from raygd.config import ConfigError

        try:
            cfg = self.spec.run_config({**self.spec.trial_params()[0], "global_batch_size": batch})
        except ConfigError:
            return False
        n = cfg.data.train_size  # None: the whole data set, which train.fit checks B against
        return n is None or batch <= n

    def __call__(self, k: int) -> list[dict[str, Any]]:
        from tuning.edges import next_trials
        from tuning.report import collect_sweep

        self.records = records = collect_sweep(self.spec.tracking_uri, self.parent_run_id).records
        proposals = next_trials(
            records,
            searched={key: len(self.spec.space.get(key, [])) for key in ("step_size", "global_batch_size")},
            scope=self.spec.extend_edges_scope,
            valid_batch=self.valid_batch,
            replication=min((r.replication for r in records), default=1),
            extend_round=k,
        )
        return ordered_round(self.spec, k, extension_params(self.spec, proposals))


class EdgeSearcher(Searcher):
    """The grid, then extension rounds planned once the trials before them have ended.

    Args:
        grid: the search trials' configs, handed out first (``ordered_grid``).
        plan: round k's trial params (``RoundPlanner``), called once per round; empty: no more rounds.
        rounds: at most this many rounds (``sweep.extend_edges_rounds``).
        say: prints the line that announces a round.

    With ``trial_order = shuffled`` in the planner's spec (``RoundPlanner.spec``) a restored searcher shuffles
    the trials it had not handed out yet, seeded by ``search_seed``: a resume may run hours later or on another
    machine (sessions here do), and what is left of a round planned mechanism by mechanism (before rounds were
    shuffled) would otherwise give that change of speed to the mechanisms planned last. The spec is read at
    restore time because Tune restores the searcher it pickled, not the one the resumed sweep builds.
    """

    def __init__(
        self,
        grid: list[dict[str, Any]],
        plan: Callable[[int], list[dict[str, Any]]],
        rounds: int,
        say: Callable[[str], None] = print,
    ) -> None:
        super().__init__()
        self.plan, self.rounds, self.say = plan, rounds, say
        self.queue: collections.deque[dict[str, Any]] = collections.deque(grid)
        self.out: set[str] = set()
        """The trials handed out that have not ended: a round is planned only when none is left."""
        self.round = 0
        self.finished = False

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self.queue and not self.finished:
            if self.out:
                return None  # the next round needs these trials' results: Tune asks again
            self._plan_round()
        if not self.queue:
            return Searcher.FINISHED
        self.out.add(trial_id)
        return self.queue.popleft()

    def _plan_round(self) -> None:
        if self.round >= self.rounds:
            self.finished = True
            return
        self.round += 1
        params = self.plan(self.round)
        if not params:
            self.finished = True
            return
        n = len(params)
        self.say(f"grid edges, round {self.round}/{self.rounds}: {n} trial{'s' * (n != 1)} beyond the winners' edges")
        self.queue.extend(
            {EXTEND_PARAM: p, EXTEND_ROUND_PARAM: self.round, EXTEND_SIZE_PARAM: len(params)} for p in params
        )

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.out.discard(trial_id)

    def _shuffle_seed(self) -> int | None:
        """The planner's ``search_seed`` when its spec shuffles the sweep, else None."""
        spec = getattr(self.plan, "spec", None)
        return spec.search_seed if spec is not None and spec.trial_order == "shuffled" else None

    def _state(self) -> dict[str, Any]:
        return {"queue": list(self.queue), "out": sorted(self.out), "round": self.round, "finished": self.finished}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self._state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        queue, self.out = list(state["queue"]), set(state["out"])
        self.round, self.finished = state["round"], state["finished"]
        seed = self._shuffle_seed()
        if seed is not None:
            random.Random(f"{seed}/resume in round {self.round}, {len(queue)} left").shuffle(queue)
        self.queue = collections.deque(queue)
