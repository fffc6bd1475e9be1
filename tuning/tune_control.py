"""How the sweep driver holds Ray Tune: its stop on a signal, its restore failures, its console.

Three context managers around ``Tuner.fit`` (``tuning.sweep._fit_tuner``), each for a behaviour of Tune that a
sweep must change and Tune has no option for: a stop signal saves the experiment and raises
``raygd.train.Interrupted`` (Tune's own Ctrl-C handler returns as if done), a state that cannot be restored is
fatal (Tune starts afresh), and its header and INFO lines are dropped when raygd prints its own console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from raygd.errors import ResumeError

TUNE_STOP_LOGS = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete")
"""What Ray Tune logs when a signal stops it; its advice (``Tuner.restore``) is not how a sweep resumes."""


@contextlib.contextmanager
def stop_tune_on_signal(stopping=None):
    """While Tune runs an experiment: the first SIGINT or SIGTERM stops it as its own Ctrl-C does (it saves the
    experiment's state, ends the running trials and returns), then ``Interrupted`` is raised; a second signal raises
    it at once. Tune's SIGINT handler is switched off (``TUNE_DISABLE_SIGINT_HANDLER``): the handler it installs for
    SIGUSR1 in every run does the same, and is what stops it. Before Tune has installed it, a signal raises at once.

    ``stopping`` runs at the first signal, in a thread (a handler must not wait on MLflow, which the main thread may
    be in): the parent is tagged before the stop, which a job's SIGKILL or a Ray killed with the driver can cut short.
    """
    from raygd.train import RECEIVED, STOP_SIGNALS, interrupted
    from tuning.console import notice

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, signal.SIGUSR1)}
    received = RECEIVED  # shared with stop_signals' handler: any signal before ends the sweep
    received.clear()
    tagging: list[threading.Thread] = []

    def on_signal(signum: int, frame) -> None:
        received.append(signum)
        stop_tune = signal.getsignal(signal.SIGUSR1)
        if len(received) > 1 or not callable(stop_tune) or stop_tune is saved[signal.SIGUSR1]:
            raise interrupted()
        if stopping is not None:
            tagging.append(threading.Thread(target=stopping, args=(signal.Signals(signum).name,), daemon=True))
            tagging[0].start()
        notice(
            f"raygd sweep: {signal.Signals(signum).name}: stopping once Ray Tune has saved the sweep's state "
            "(again to stop at once) ..."
        )
        stop_tune(signal.SIGUSR1, frame)

    def drop(record: logging.LogRecord) -> bool:
        return not (received and record.getMessage().startswith(TUNE_STOP_LOGS))

    for s in STOP_SIGNALS:
        if saved[s] is not signal.SIG_IGN:
            signal.signal(s, on_signal)
    logger, switch = logging.getLogger("ray.tune.tune"), os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    logger.addFilter(drop)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:  # whatever Tune raised on its way out of a stop, a stop it was
        if not received and not isinstance(err, KeyboardInterrupt):
            raise
        stop = interrupted(err)
        if stop is err:
            raise
        raise stop from err
    finally:  # Tune leaves its SIGUSR1 handler behind
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        logger.removeFilter(drop)
        if switch is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = switch
        for thread in tagging:  # done before the final tags
            thread.join(timeout=30)
    if received:
        raise interrupted()


TUNE_RESTORE_FAILED = "Failed to restore the run state"
"""What Tune logs when it cannot restore an experiment's state; it then starts the experiment afresh."""


@contextlib.contextmanager
def fail_on_lost_state(tune_dir: str):
    """Make Tune's failure to restore an experiment fatal. Tune logs it and starts the experiment afresh with
    an empty state; a resumed sweep would then end at once and be closed as finished (the §4 re-run was, once,
    when its pickled searcher lacked an attribute of the new code). Tune's own ``fail_fast`` cannot be set on a
    restored tuner (its run config is the pickled one), so a filter on the controller's logger raises instead,
    before a trial runs and before the sweep is closed; ``--resume`` works again once the cause is fixed."""

    def fail(record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(TUNE_RESTORE_FAILED):
            cause = record.exc_info[1] if record.exc_info else None
            raise ResumeError(
                f"Ray Tune could not restore the sweep's experiment state in {tune_dir} ({cause!r}); nothing was "
                "run and the parent run stays RUNNING: fix the cause and run --resume again."
            )
        return True

    logger = logging.getLogger("ray.tune.execution.tune_controller")
    logger.addFilter(fail)
    try:
        yield
    finally:
        logger.removeFilter(fail)


@contextlib.contextmanager
def quiet_tune(quiet: bool):
    """Tune's new output engine prints an experiment header even at verbose 0; its legacy engine at
    verbosity 0 prints nothing, and its INFO log lines (result files written) are dropped."""
    if not quiet:
        yield
        return
    logger, engine = logging.getLogger("ray.tune"), os.environ.get("RAY_AIR_NEW_OUTPUT")
    level = logger.level
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        if engine is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = engine
