"""The two callbacks that join a trial's Train run, Ray Tune and MLflow.

- ``TrialReportCallback`` (Ray Train, runs in the Train controller): Tune's own
  ``TuneReportCallback`` plus ``objective_s``, the provisional objective of each evaluation,
  so a searcher (Optuna) has its metric in every result and a trial that a scheduler stops
  gives it a finite, worst-ranked value (``tuning.objective``).
- ``TrialRecorder`` (Ray Tune, runs in the sweep driver): when Tune stops a trial early
  (ASHA) its trial actor is killed inside ``TorchTrainer.fit``, so ``raygd.train.fit`` does not
  end the MLflow run as it should; the recorder ends it as KILLED with ``raygd.status =
  stopped_early``, the step it was stopped at (``raygd.stopped_at_step``) and its last metrics.
  As the trial actor dies, ``fit`` may still mark the run FAILED; the stopped-at tag survives
  that, and ``tuning.report.close_sweep`` restores KILLED/stopped_early at the end of the sweep.
  A trial actor that died otherwise is ended FAILED.

Imported only inside a sweep (it imports Ray Tune).
"""

from __future__ import annotations

import math
import time
from typing import Any

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from raygd.records import STATUS_TAG, STOPPED_STEP_TAG, Status, child_runs, end_run, mlflow_client
from tuning.objective import provisional_objective


class TrialReportCallback(TuneReportCallback):
    """Rank zero's evaluation metrics to Tune, with the provisional ``objective_s`` added."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            metrics = [dict(metrics[0], objective_s=provisional_objective(metrics[0])), *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


class TrialRecorder(Callback):
    """Ends the MLflow child run of a trial that Tune stopped or that died without ending it.

    Args:
        tracking_uri: the sweep's absolute MLflow tracking URI.
        parent_run_id: the sweep's parent run.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str):
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id

    def _running_child(self, trial_id: str):
        runs = child_runs(self.tracking_uri, self.parent_run_id, trial_id=trial_id, running_only=True)
        return mlflow_client(self.tracking_uri), (runs[0] if runs else None)

    def _cancel_in_pool(self, trial_id: str) -> None:
        """A warm pool (``raygd.pool``) still training this trial abandons it at its next evaluation."""
        from raygd.pool import cancel_trial

        for run in child_runs(self.tracking_uri, self.parent_run_id, trial_id=trial_id):
            cancel_trial(self.parent_run_id, run.info.run_id)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        if "status" in last:  # the trial reported its summary: raygd.train.fit ended its run
            return
        self._cancel_in_pool(trial.trial_id)
        client, run = self._running_child(trial.trial_id)
        if run is None:
            return
        from mlflow.entities import Metric, RunTag

        step = int(last.get("step", 0))
        summary = {
            "final_train_accuracy": last.get("train/accuracy"),
            "final_train_loss": last.get("train/loss"),
            "passes": last.get("progress/passes"),
            "train_time_s": last.get("time/train_s"),
            "steps": step,
            "reached_target": 0.0,
            "diverged": 0.0,
        }
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in summary.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        client.log_batch(
            run.info.run_id,
            metrics=metrics,
            tags=[RunTag(STATUS_TAG, Status.STOPPED_EARLY.value), RunTag(STOPPED_STEP_TAG, str(step))],
        )
        client.set_terminated(run.info.run_id, Status.STOPPED_EARLY.run_status)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._cancel_in_pool(trial.trial_id)
        client, run = self._running_child(trial.trial_id)
        if run is not None:  # fit() ends its run FAILED itself unless the trial actor died
            end_run(client, run.info.run_id, Status.FAILED)
