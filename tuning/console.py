"""What a sweep prints while it runs: one line per trial start and end, with a live tally.

Tune's own console output (a status table after every trial, ~500 lines for 8 trials) is what
``raygd sweep -v`` shows; by default Tune is quiet (``verbose=0``) and this callback prints

    trial 3/8 start  dropconnect(p=0.4) γ=0.1 B=64 seed=0
    trial 3/8 end    reached_target  time to acc 1.94 s  passes 0.83  [3 done, 0 running, 5 pending;
                     best vanilla γ=0.4 B=256 0.71 s]   (one line)

or, when trials run one at a time (``sequential``), one line per trial: its start is written when it
starts and its end appended when it ends (``trial 3/8  dropconnect(p=0.4) γ=0.1 B=64 seed=0  ->
reached_target  time to acc 1.94 s ...``), so a 16-trial sweep still fits on one screen.

A stop signal's ``notice`` (from ``tuning.sweep``'s handler) goes on a line of its own; a trial whose start line it
broke has its end, if any, on a line of its own, and a line still open when the experiment ends says ``stopped``.

Imported only inside a sweep (it imports Ray Tune).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Any, TextIO

from ray.tune import Callback

from raygd.mechanisms import mechanism_label
from tuning.trial import EXTEND_ROUND_PARAM, EXTEND_SIZE_PARAM

_STDOUT = {"line_open": False}
"""Whether standard output's last line waits for its end (a sequential trial's start): a reporter printing there
learns from it that a ``notice`` ended its line."""


def notice(line: str) -> None:
    """Print ``line`` on a line of its own, from a signal handler: unbuffered, as the handler may run in the middle of
    a buffered write (which a second write would break), after a newline where a trial's line waits for its end."""
    text = ("\n" if _STDOUT["line_open"] else "") + line + "\n"
    _STDOUT["line_open"] = False
    with contextlib.suppress(RuntimeError, OSError, ValueError):  # the handler interrupted a write to it
        sys.stdout.flush()
    try:
        os.write(sys.stdout.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):  # a stream without a file descriptor (pytest's capture)
        sys.stdout.write(text)


def describe(config: dict[str, Any]) -> str:
    """A trial's parameters as one short phrase (the confirm and edge-extension phases' params sit under
    ``confirm`` and ``extend``)."""
    phase = next((key for key in ("confirm", "extend") if key in config), None)
    params = config[phase] if phase else config
    mech = params.get("mechanism", "vanilla")
    label = mechanism_label(mech) if isinstance(mech, dict) else str(mech)
    parts = [label]
    if "step_size" in params:
        parts.append(f"γ={params['step_size']:.3g}")
    if "global_batch_size" in params:
        parts.append(f"B={params['global_batch_size']}")
    for key in ("seed", "replication"):
        if key in params:
            parts.append(f"{'r' if key == 'replication' else key}={params[key]}")
    return (f"{phase} " if phase else "") + " ".join(parts)


class ConsoleReporter(Callback):
    """Prints a line when a trial starts and when it ends, with done/running/pending and the best so far.

    Args:
        total: the number of trials the search will run (None when unknown).
        out: where to print (standard output).
        sequential: one trial at a time: one line per trial.
        best: the fastest trial of an earlier phase (time, description). A restored experiment's own finished
            trials count as they are found in Tune's trial list.
    """

    def __init__(
        self,
        total: int | None = None,
        out: TextIO | None = None,
        sequential: bool = False,
        best: tuple[float, str] | None = None,
    ) -> None:
        self.total, self._out = total, out  # the stream is looked up when printing: Tune pickles callbacks
        self.sequential = sequential
        self.numbers: dict[str, int] = {}
        self.best: tuple[float, str] | None = best
        self._open: str | None = None
        """The trial whose start line waits for its end (sequential trials: one line per trial)."""

    def _group(self, trial, trials: list) -> tuple[list, int | None]:
        """The trials counted with this one, and their number: the grid, or its edge round (``tuning.rounds``
        hands a round's trials out in the grid's experiment, each config with the round and its size)."""
        size = trial.config.get(EXTEND_SIZE_PARAM)
        if size is None:
            return [t for t in trials if EXTEND_SIZE_PARAM not in t.config], self.total
        k = trial.config.get(EXTEND_ROUND_PARAM)
        return [t for t in trials if t.config.get(EXTEND_ROUND_PARAM) == k and EXTEND_SIZE_PARAM in t.config], size

    def _number(self, trial, trials: list) -> str:
        """The trial's place in its group (a resumed experiment counts its finished trials too)."""
        group, total = self._group(trial, trials)
        if trial.trial_id not in self.numbers:
            place = next((i for i, t in enumerate(group, 1) if t.trial_id == trial.trial_id), None)
            self.numbers[trial.trial_id] = place or len(group)
        n = self.numbers[trial.trial_id]
        return f"{n}/{total}" if total else str(n)

    def _write(self, text: str) -> None:
        out = self._out or sys.stdout
        out.write(text)
        out.flush()
        if self._out is None:
            _STDOUT["line_open"] = not text.endswith("\n")

    def _line_open(self) -> bool:
        """Whether a start line waits for its trial's end (and is still the last line: no ``notice`` ended it)."""
        if self._open is not None and self._out is None and not _STDOUT["line_open"]:
            self._open = None
        return self._open is not None

    def _say(self, text: str) -> None:
        if self._line_open():  # another trial's line while a start line waits: close it first
            self._write("\n")
            self._open = None
        self._write(text + "\n")

    def _appends(self, trial) -> bool:
        return self._line_open() and self._open == trial.trial_id

    def _finish(self, trial, what: str, trials: list) -> None:
        """The end of a trial: on its own start line (sequential), else a line of its own."""
        tally = self._tally(trials, trial)
        if self._appends(trial):
            self._open = None
            self._write(f" {what}  [{tally}]\n")
        else:
            self._say(f"trial {self._number(trial, trials)} {what}  [{tally}]")

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if self.sequential:  # one line per trial: its start now, its end appended when it ends
            if self._line_open():
                self._write("\n")
            self._write(f"trial {self._number(trial, trials)}  {describe(trial.config)}  ->")
            self._open = trial.trial_id
            return
        self._say(f"trial {self._number(trial, trials)} start  {describe(trial.config)}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        what = result.get("status", "stopped_early")
        tta = result.get("time_to_accuracy_s")
        if isinstance(tta, (int, float)) and math.isfinite(tta):
            what += f"  time to acc {tta:.3g} s  passes {result.get('passes_to_accuracy', float('nan')):.3g}"
            if self.best is None or tta < self.best[0]:
                self.best = (tta, describe(trial.config))
        elif "passes" in result:
            what += f"  after {result['passes']:.3g} passes, train acc {result.get('final_train_accuracy', 0):.3f}"
        self._finish(trial, what if self._appends(trial) else f"end    {what}", trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial, "error" if self._appends(trial) else f"error  {describe(trial.config)}", trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        if self._line_open():  # the experiment ended with this trial running: a stop
            self._write(" stopped\n")
            self._open = None

    def _tally(self, trials: list, ended) -> str:
        group, total = self._group(ended, trials)
        done = sum(t.status in ("TERMINATED", "ERROR") or t is ended for t in group)
        running = sum(t.status == "RUNNING" and t is not ended for t in group)
        pending = (total - done - running) if total else sum(t.status == "PENDING" for t in group)
        for t in trials:  # a restored experiment's finished trials (Tune restores this callback as pickled)
            tta = (t.last_result or {}).get("time_to_accuracy_s") if t.status == "TERMINATED" else None
            if isinstance(tta, (int, float)) and math.isfinite(tta) and (self.best is None or tta < self.best[0]):
                self.best = (tta, describe(t.config))
        best = f"; best {self.best[1]} {self.best[0]:.3g} s" if self.best else ""
        return f"{done} done, {running} running, {max(pending, 0)} pending{best}"
