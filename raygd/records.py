"""The MLflow schema of raygd's runs in one place: tag names, how a run ended, reading a sweep back.

A run of ``raygd train`` is one MLflow run; a sweep is one parent run (``KIND_TAG`` = ``sweep``)
with one child run per trial, nested by MLflow's own ``mlflow.parentRunId`` tag. Every run
ends with a ``Status`` in ``STATUS_TAG``; ``TrialRecord.from_run`` turns a child run back into
the record that ``tuning.stats`` ranks. No Ray here, and MLflow is imported only by the
functions that read runs: the Train controller and every trial import this module.

Tests: ``pytest tests/test_records.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from raygd.errors import ConfigError

PARENT_TAG = "mlflow.parentRunId"
"""MLflow's nesting tag: a trial's child run names its sweep's parent run."""
KIND_TAG = "raygd.kind"
"""What a run without a parent is: ``SWEEP_KIND`` (a sweep's parent run) or ``DIVERSITY_KIND`` (raygd diversity)."""
SWEEP_KIND = "sweep"
DIVERSITY_KIND = "diversity"
STATUS_TAG = "raygd.status"
"""How the run ended: a ``Status`` value."""
ATTEMPT_TAG = "raygd.attempt"
"""Starts of the training loop in this run (1, then one more per restart from a checkpoint)."""
STOPPED_STEP_TAG = "raygd.stopped_at_step"
"""The step at which a scheduler (ASHA) stopped the trial."""
TRIAL_TAG = "raygd.trial_id"
"""The Tune trial id of a sweep's child run."""
KEY_TAG = "raygd.trial_key"
"""A hash of the trial's parameters and phase: a resumed sweep finds its earlier child run by it."""
PHASE_TAG = "raygd.phase"
"""``SEARCH_PHASE``, ``EXTEND_PHASE`` (values added beyond a grid edge) or ``CONFIRM_PHASE`` (the winners
re-run with fresh seeds)."""
SEARCH_PHASE = "search"
EXTEND_PHASE = "extend"
CONFIRM_PHASE = "confirm"
EXTEND_ROUND_TAG = "raygd.extend_round"
"""On an extension trial's run: the round (1, 2, ...) of ``sweep.extend_edges`` that proposed it. A resumed
sweep plans round k again from the trials of the rounds before it (``tuning.rounds``)."""
MECHANISM_LABEL_TAG = "raygd.mechanism_label"
"""The mechanism's display label, e.g. ``dropconnect(p=0.4)``: what the sweep's tables group by."""
TUNE_DIR_TAG = "raygd.tune_dir"
"""On a sweep's parent run: the Tune experiment folder that ``--resume`` restores."""
EXTEND_INLINE_TAG = "raygd.extend_inline"
"""On a sweep's parent run (``"1"``): its edge-extension rounds run inside the grid's Tune experiment
(``tuning.rounds``). Without it (sweeps started before), each round is a Tune experiment of its own."""
BOUND_OF_TAG = "raygd.bound_of"
"""Whose diversity a trial's B_D measures: ``gradient`` (vanilla), ``surrogate`` (the mechanism's
gradient as trained, e.g. DropConnect at its mask granularity) or ``plain_gradient`` (the mechanism's
surrogate diversity is not estimated; the value is the plain gradient's)."""
INTERRUPTED_TAG = "raygd.interrupted"
"""The signal that interrupted the run (``SIGINT``, ``SIGTERM``). A ``raygd train`` run ends KILLED with it; a sweep's
parent run stays RUNNING, for ``raygd sweep --resume`` (which removes the tag), with ``TRIALS_FINISHED_TAG`` of
``TRIALS_TOTAL_TAG``. A SIGKILL or a lost driver node leaves no tag, and the parent RUNNING all the same."""
TRIALS_FINISHED_TAG = "raygd.trials_finished"
"""On an interrupted sweep's parent run: its trials that had ended for good, which ``--resume`` does not train again."""
TRIALS_TOTAL_TAG = "raygd.trials_total"
"""On an interrupted sweep's parent run: the trials it had planned (the search, and the edge-round and confirm trials
planned by then)."""
BATCH_POLICY_TAG = "raygd.batch_policy"
"""A sweep trial's batch policy as its ``space.batch_schedule`` entry labels it
(``raygd.batch_schedule.schedule_label``: ``fixed``, ``diversity``, ``goodput(delta=2)``, ...); tables give each
adaptive policy a row of its own (``arm_label``)."""
FIXED_POLICY = "fixed"
ARM_SEPARATOR = ": "
"""Between a mechanism's label and an adaptive batch policy's in a table row: ``vanilla: diversity``."""
VERSION_TAG = "raygd.version"
GIT_COMMIT_TAG = "raygd.git_commit"


# Summary metrics of a trial's child run that the sweep's tables read (besides the RunSummary fields).
BOUND_W0_METRIC = "diversity/batch_bound_w0"
"""B_D = nΔ_D at the initial weights, on the trial's evaluation sample, for the mechanism as trained."""
BOUND_W0_SE_METRIC = "diversity/batch_bound_w0_se"
"""Its Monte Carlo standard error (0 where the value is exact)."""
BOUND_MEDIAN_METRIC = "diversity/batch_bound_median"
"""Median of the online estimate ``diversity/batch_bound`` along training."""
GAP_AT_TARGET_METRIC = "generalization_gap_at_target"
"""Training minus test accuracy at the evaluation that reached the target (Theorem 5's side)."""
EVAL_RESOLUTION_METRIC = "eval_resolution_passes"
"""Passes between evaluations: the resolution of passes- and time-to-target."""
MEAN_BATCH_METRIC = "train/mean_global_batch_size"
"""The run's mean B: examples consumed over updates made (B itself at a fixed policy)."""
FINAL_BATCH_METRIC = "train/final_global_batch_size"
"""The B of the run's last update."""


def arm_label(mechanism: str, batch_policy: str = FIXED_POLICY) -> str:
    """What a sweep's tables group by: the mechanism's label, joined by ``ARM_SEPARATOR`` to an adaptive batch
    policy's (a fixed B is the mechanism's own row)."""
    return mechanism if batch_policy == FIXED_POLICY else f"{mechanism}{ARM_SEPARATOR}{batch_policy}"


def split_arm(label: str) -> tuple[str, str]:
    """(mechanism label, batch policy label) of an ``arm_label``."""
    mechanism, _, policy = label.partition(ARM_SEPARATOR)
    return mechanism, policy or FIXED_POLICY


class Status(str, Enum):
    """How a run or trial ended; a ``str`` whose value is the plain string stored in MLflow and in CSVs.

    Listed in ranking order: reached first, failures last.
    """

    REACHED_TARGET = "reached_target"
    MAX_PASSES = "max_passes"
    STOPPED_EARLY = "stopped_early"
    """Stopped by the scheduler (ASHA) for lagging."""
    DIVERGED = "diverged"
    FAILED = "failed"
    """An error ended the run; records written before raygd settled on ``failed`` say ``error``."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def _missing_(cls, value: object) -> Status | None:
        return cls.FAILED if value == LEGACY_FAILED else None

    @property
    def run_status(self) -> str:
        """The MLflow run status a run with this outcome ends with: FAILED, KILLED (stopped early) or FINISHED."""
        return {Status.FAILED: "FAILED", Status.STOPPED_EARLY: "KILLED"}.get(self, "FINISHED")


LEGACY_FAILED = "error"
"""The failure status of records and objective calls before ``Status.FAILED``; still read as it."""
STATUS_ORDER = tuple(Status)
"""Ranking order of trial outcomes: reached first, failures last."""


def end_run(client, run_id: str, status: Status, tags: Mapping[str, str] | None = None) -> None:
    """Tag a run with ``status`` (and ``tags``) and end it with the matching MLflow run status.

    Args:
        client: an ``MlflowClient``.
        run_id: the run to end.
        status: how it ended.
        tags: more tags to set first.
    """
    for key, value in {**(tags or {}), STATUS_TAG: status.value}.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status.run_status)


# --------------------------------------------------------------------------- reading runs


def mlflow_client(tracking_uri: str):
    """An ``MlflowClient`` on ``tracking_uri`` (MLflow imported here, not at module import)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def child_runs(tracking_uri: str, parent_run_id: str, trial_id: str | None = None, running_only: bool = False) -> list:
    """The child runs of a sweep's parent run (any status unless ``running_only``), optionally of one trial."""
    client = mlflow_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
    if running_only:
        query += " and attributes.status = 'RUNNING'"
    return client.search_runs([parent.info.experiment_id], filter_string=query, max_results=10000)


def newest_sweep(tracking_uri: str, experiment: str, running_only: bool = False):
    """The newest sweep parent run in ``experiment`` (only an unfinished one with ``running_only``), or None."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.`{KIND_TAG}` = '{SWEEP_KIND}'" + (" and attributes.status = 'RUNNING'" if running_only else "")
    runs = (
        []
        if exp is None
        else client.search_runs(
            [exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1
        )
    )
    return runs[0] if runs else None


def latest_sweep(tracking_uri: str, experiment: str) -> str:
    """The run id of the newest sweep parent run in ``experiment``.

    Raises:
        ConfigError: when the experiment holds no sweep.
    """
    run = newest_sweep(tracking_uri, experiment)
    if run is None:
        raise ConfigError(f"experiment {experiment!r} has no raygd sweep in {tracking_uri}.")
    return run.info.run_id


def run_outcome(run) -> Status:
    """How a sweep's child run ended, also for runs that nothing tagged.

    A run a scheduler stopped (``STOPPED_STEP_TAG``, or KILLED without a status tag: by an
    older raygd) is stopped_early even if its dying trial marked it failed since; an untagged
    or FAILED run failed.
    """
    status, ended = run.data.tags.get(STATUS_TAG), run.info.status
    if ended != "FINISHED" and (STOPPED_STEP_TAG in run.data.tags or (status is None and ended == "KILLED")):
        return Status.STOPPED_EARLY
    if status is None or ended == "FAILED":
        return Status.FAILED
    return Status(status)


# --------------------------------------------------------------------------- trial records


def _opt_float(value: Any) -> float | None:
    """None/'' → None, anything else → float (so CSV strings such as 'nan' parse too)."""
    return None if value is None or value == "" else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None or value == "" else int(float(value))


@dataclass(frozen=True)
class TrialRecord:
    """What one trial of a sweep produced (the dict a trial reports at its end)."""

    trial_id: str
    """Tune trial id; unique within a sweep."""
    mechanism: str
    """Display label, e.g. 'vanilla' or 'dropconnect(p=0.4)'."""
    step_size: float
    """Constant step size γ."""
    global_batch_size: int
    """B, summed over workers."""
    status: Status
    """How the trial ended; a plain string is converted (a legacy 'error' reads as ``Status.FAILED``)."""
    seed: int = 0
    """Seed of this trial."""
    replication: int = 1
    """r of r-replicated data (1: the data set as is)."""
    run_id: str | None = None
    """MLflow run id of the trial's nested run."""
    time_to_accuracy_s: float | None = None
    """Training wall-clock seconds until the target accuracy; None when not reached."""
    passes_to_accuracy: float | None = None
    """Passes over the data until the target accuracy."""
    updates_to_accuracy: int | None = None
    """SGD updates until the target accuracy."""
    final_train_loss: float | None = None
    """Training loss at the end of the run (nan/None when diverged)."""
    final_train_accuracy: float | None = None
    """Training accuracy at the end of the run."""
    passes: float | None = None
    """Passes over the data the run made."""
    train_time_s: float | None = None
    """Training wall-clock seconds of the whole run."""
    batch_bound_w0: float | None = None
    """B_D at the initial weights (``BOUND_W0_METRIC``)."""
    batch_bound_w0_se: float | None = None
    """Its standard error (0: exact)."""
    batch_bound_median: float | None = None
    """Median online B_D along training (``BOUND_MEDIAN_METRIC``)."""
    generalization_gap_at_target: float | None = None
    """Train − test accuracy when the target was reached."""
    eval_resolution_passes: float | None = None
    """Passes between evaluations."""
    phase: str = SEARCH_PHASE
    """``PHASE_TAG``: search, extend (beyond a grid edge) or confirm."""
    bound_of: str | None = None
    """``BOUND_OF_TAG``: whose diversity ``batch_bound_w0`` is (gradient, surrogate, plain_gradient)."""
    extend_round: int | None = None
    """``EXTEND_ROUND_TAG``: the extension round of an extend-phase trial (None: another phase, or a run
    recorded before the tag existed)."""
    batch_policy: str = FIXED_POLICY
    """``BATCH_POLICY_TAG``: the batch policy's label (fixed: B = ``global_batch_size`` throughout; otherwise
    ``global_batch_size`` is where B started)."""
    mean_batch_size: float | None = None
    """``MEAN_BATCH_METRIC``: examples over updates (None for runs recorded before it)."""

    def __post_init__(self) -> None:
        try:
            status = Status(self.status)
        except ValueError:
            raise ValueError(
                f"trial {self.trial_id}: status {self.status!r} not in {tuple(s.value for s in STATUS_ORDER)}"
            ) from None
        object.__setattr__(self, "status", status)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialRecord:
        """Build from a record dict (or a CSV row of strings); optional keys may be missing, extras are ignored."""
        return cls(
            trial_id=str(d["trial_id"]),
            mechanism=str(d["mechanism"]),
            step_size=float(d["step_size"]),
            global_batch_size=int(float(d["global_batch_size"])),
            status=cast(Status, str(d["status"])),  # __post_init__ checks and converts the string
            seed=_opt_int(d.get("seed")) or 0,
            replication=_opt_int(d.get("replication")) or 1,
            run_id=d.get("run_id") or None,
            time_to_accuracy_s=_opt_float(d.get("time_to_accuracy_s")),
            passes_to_accuracy=_opt_float(d.get("passes_to_accuracy")),
            updates_to_accuracy=_opt_int(d.get("updates_to_accuracy")),
            final_train_loss=_opt_float(d.get("final_train_loss")),
            final_train_accuracy=_opt_float(d.get("final_train_accuracy")),
            passes=_opt_float(d.get("passes")),
            train_time_s=_opt_float(d.get("train_time_s")),
            batch_bound_w0=_opt_float(d.get("batch_bound_w0")),
            batch_bound_w0_se=_opt_float(d.get("batch_bound_w0_se")),
            batch_bound_median=_opt_float(d.get("batch_bound_median")),
            generalization_gap_at_target=_opt_float(d.get("generalization_gap_at_target")),
            eval_resolution_passes=_opt_float(d.get("eval_resolution_passes")),
            phase=str(d.get("phase") or SEARCH_PHASE),
            bound_of=d.get("bound_of") or None,
            extend_round=_opt_int(d.get("extend_round")),
            batch_policy=str(d.get("batch_policy") or FIXED_POLICY),
            mean_batch_size=_opt_float(d.get("mean_batch_size")),
        )

    @classmethod
    def from_run(cls, run) -> TrialRecord:
        """The record of an MLflow child run of a sweep: its params, summary metrics and tags (``run_outcome``)."""
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        return cls.from_dict(
            {
                "trial_id": t.get(TRIAL_TAG, run.info.run_id),
                "run_id": run.info.run_id,
                "mechanism": t.get(MECHANISM_LABEL_TAG, p.get("mechanism.name", "vanilla")),
                "step_size": float(p.get("train.step_size", "nan")),
                "global_batch_size": int(p.get("train.global_batch_size", 0)),
                "seed": int(p.get("train.seed", 0)),
                "replication": int(p.get("data.replication", 1)),
                "status": run_outcome(run),
                "time_to_accuracy_s": m.get("time_to_accuracy_s"),
                "passes_to_accuracy": m.get("passes_to_accuracy"),
                "updates_to_accuracy": m.get("updates_to_accuracy"),
                "final_train_loss": m.get("final_train_loss"),
                "final_train_accuracy": m.get("final_train_accuracy"),
                "passes": m.get("passes"),
                "train_time_s": m.get("train_time_s"),
                "batch_bound_w0": m.get(BOUND_W0_METRIC),
                "batch_bound_w0_se": m.get(BOUND_W0_SE_METRIC),
                "batch_bound_median": m.get(BOUND_MEDIAN_METRIC),
                "generalization_gap_at_target": m.get(GAP_AT_TARGET_METRIC),
                "eval_resolution_passes": m.get(EVAL_RESOLUTION_METRIC),
                "phase": t.get(PHASE_TAG, SEARCH_PHASE),
                "bound_of": t.get(BOUND_OF_TAG),
                "extend_round": t.get(EXTEND_ROUND_TAG),
                "batch_policy": t.get(BATCH_POLICY_TAG, p.get("train.batch_schedule.policy", FIXED_POLICY)),
                "mean_batch_size": m.get(MEAN_BATCH_METRIC),
            }
        )

    @property
    def reached(self) -> bool:
        """status is reached_target and the time to accuracy is a finite number."""
        t = self.time_to_accuracy_s
        return self.status == Status.REACHED_TARGET and t is not None and math.isfinite(t)

    @property
    def arm(self) -> str:
        """The row a sweep's tables put this trial in: the mechanism, or it with an adaptive batch policy."""
        return arm_label(self.mechanism, self.batch_policy)

    @property
    def pair(self) -> tuple[str, float, int]:
        """(arm, step_size, global_batch_size): the mechanism's label (with an adaptive batch policy's, whose B is
        where it started) and the pair's two settings."""
        return self.arm, self.step_size, self.global_batch_size


def target_label(target_accuracy: Any, target_loss: Any) -> str | None:
    """A run's target as tables print it, ``train loss <= 1.5`` or ``train accuracy >= 0.8``, from the config's
    values or their MLflow params (None and the string "None" are unset); None when neither is set."""
    if target_loss not in (None, "None"):
        return f"train loss <= {float(target_loss):.4g}"
    if target_accuracy not in (None, "None"):
        return f"train accuracy >= {float(target_accuracy):.4g}"
    return None


def params_target(params: Mapping[str, Any]) -> str | None:
    """``target_label`` of a run from its params (``train.target_accuracy``, ``train.target_loss``)."""
    return target_label(params.get("train.target_accuracy"), params.get("train.target_loss"))
