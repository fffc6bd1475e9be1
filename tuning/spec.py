"""A sweep spec: a base run config plus a search space, validated before Ray starts.

    name: quickstart                 # MLflow experiment and Tune experiment name
    base: {data: {...}, train: {...}}   # a raygd run config (see configs/quickstart.yaml)
    space:
      step_size: [0.05, 0.2]         # or, for random/optuna, a range: {low: 0.01, high: 1.0, log: true}
      global_batch_size: [64, 256]
      mechanism: [{name: vanilla}, {name: dropconnect, drop_prob: 0.4}]
      seed: [0]
      replication: [1]               # optional
      batch_schedule:                # optional: fixed B against batch policies that set B while training
        - {policy: fixed}
        - {policy: diversity}        # each adaptive entry runs once per (γ, seed, ...), starting at the
        - {policy: goodput}          # smallest global_batch_size of the space: it has no B to tune
    search: grid                     # grid | random | optuna (both need num_samples draws)
    num_samples: 16                  # random/optuna: trials drawn (required for optuna)
    search_seed: 0                   # seeds random draws, Optuna's TPE sampler and a shuffled grid
    trial_order: grid                # grid | shuffled (grid only: the same trials in a seeded random order)
    scheduler: none                  # none | asha (stops trials that lag in train accuracy)

Every combination in the space (for a range: both ends) is checked as a full ``RunConfig``
up front, so a typo fails with the field's name before any trial runs. A ``batch_schedule`` entry is a
partial ``train.batch_schedule`` laid over the base's; a grid crosses the fixed entries with every B and
the adaptive ones (``raygd.batch_schedule``) with the smallest B only (``SweepSpec.redundant``).

The objective (``tuning.objective``): search and ranking minimise ``time_to_accuracy_s``.
A trial that does not reach the target still gives the searcher a finite value worse than
any reached one: ``UNREACHED_PENALTY_S * (2 - train accuracy)`` for max_passes and
stopped_early (so nearer misses rank first), ``3 * UNREACHED_PENALTY_S`` for diverged.

Optuna (``search: optuna``) runs Ray Tune's ``OptunaSearch`` with a TPE sampler seeded by
``search_seed``; the first draws are reproducible exactly, later ones given the same
results (times are wall-clock, so equal results are not guaranteed). It needs a range to
search (a space of lists only is a grid), and ``seed`` and ``replication`` must have one
value each: they are conditions of the experiment, not hyperparameters to optimise
(``confirm_seeds`` gives the spread over seeds).

ASHA (``scheduler: asha``) compares trials on ``train/accuracy`` at rungs of
``asha_time_attr``: ``time/train_s`` (the time-to-accuracy clock, the default) or
``progress/passes`` (machine-independent decisions). Rungs are at
``asha_grace_period * asha_reduction_factor**k``; a trial that reaches the target before
the first rung is never compared, so keep the grace period below typical times to accuracy.
A stopped trial's MLflow run ends KILLED with ``raygd.status = stopped_early``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeGuard

from raygd.batch_schedule import schedule_label
from raygd.config import ConfigError, RunConfig, absolute_tracking_uri, apply_overrides, parse_override, read_yaml
from raygd.mechanisms import mechanism_label

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha")
SPACE_KEYS = ("step_size", "global_batch_size", "mechanism", "seed", "replication", "batch_schedule")
RANGE_KEYS = ("step_size",)
"""Space keys that may be a range {low, high, log} (random and optuna search) instead of a list."""
CONDITION_KEYS = ("seed", "replication")
"""Space keys that describe the experiment rather than tune it: one value each under optuna."""
ASHA_TIME_ATTRS = ("time/train_s", "progress/passes")
EXTEND_SCOPES = ("winner", "every_batch")
"""``extend_edges_scope`` values (``tuning.edges.SCOPES``)."""
TRIAL_ORDERS = ("grid", "shuffled")
"""``trial_order`` values."""


STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")
"""URI schemes ``storage_path`` may use: the pyarrow filesystems through which Ray Train and Tune write."""
BUCKET_NAME = r"[a-z0-9][a-z0-9._-]*[a-z0-9]"
"""S3 and GCS bucket names: lowercase (so the configs' placeholder ``YOUR-BUCKET`` fails here, not in Ray)."""
STORAGE_ENV = "RAYGD_STORAGE_PATH"
"""The default of ``sweep.storage_path`` where a spec and ``--set`` leave it out: the cluster configs set it
on the head (a shared mount or a bucket), so every sweep submitted there checkpoints where all nodes read."""


def check_storage_path(value: Any, source: str = "sweep.storage_path") -> None:
    """``sweep.storage_path``: None (``~/ray_results``), an absolute path (on a cluster: a folder every node
    mounts, e.g. NFS) or a URI of one of ``STORAGE_SCHEMES`` naming its bucket. Checked offline: no
    credentials in it (the nodes' own, e.g. an instance role, are used), nothing is contacted."""
    from urllib.parse import urlsplit

    if value is None:
        return
    problem = None
    if not isinstance(value, str) or not value.strip():
        problem = "it is not a non-empty string"
    elif "://" in value:
        parts = urlsplit(value)
        if parts.scheme.lower() not in STORAGE_SCHEMES:
            problem = f"Ray's storage does not read {parts.scheme!r} URIs"
        elif parts.password is not None or parts.username is not None:
            problem = "it holds credentials; the nodes' own are used (instance role, environment)"
        elif parts.scheme.lower() == "file" and not parts.path.startswith("/"):
            problem = "a file:// URI needs an absolute path (file:///path)"
        elif parts.scheme.lower() != "file" and not parts.netloc:
            problem = "it names no bucket (or host)"
        elif parts.scheme.lower() in ("s3", "gs", "gcs") and not re.fullmatch(BUCKET_NAME, parts.netloc):
            problem = f"{parts.netloc!r} is no bucket name (lowercase letters, digits, '.', '-', '_'); set yours"
    elif not Path(value).expanduser().is_absolute():
        problem = "it is relative; every node and a resumed sweep must find the same folder"
    if problem:
        raise ConfigError(
            f"{source} = {value!r} is invalid: {problem}. Use an absolute path (on a cluster, a "
            "shared mount every node sees, e.g. /mnt/shared/ray_results) or a URI such as s3://bucket/path or "
            f"gs://bucket/path (schemes: {', '.join(STORAGE_SCHEMES)})."
        )


def storage_root(storage_path: str | None) -> str:
    """``sweep.storage_path`` as Ray Train and Tune take it: a URI (``s3://``, ``gs://``, ...) as given, a path
    made absolute here on the driver; ``~/ray_results`` by default."""
    if storage_path and "://" in storage_path:
        return storage_path.rstrip("/")
    return str(Path(storage_path or Path.home() / "ray_results").expanduser().resolve())


def _is_number(value: Any) -> TypeGuard[float]:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SweepSpec:
    """What a sweep searches and how."""

    name: str
    """Sweep name: the MLflow experiment and the Tune experiment folder."""
    base: dict[str, Any]
    """The run config every trial starts from (sections data/mechanism/train/tracking)."""
    space: dict[str, Any]
    """Values per key (step_size, global_batch_size, mechanism (dicts), seed, replication, batch_schedule (dicts)):
    a list, or for step_size under random/optuna search a range {low, high, log}."""
    search: str = "grid"
    """grid (every combination), random (num_samples draws) or optuna (num_samples TPE suggestions)."""
    num_samples: int | None = None
    """random/optuna: number of trials (random: default 1; optuna: required)."""
    search_seed: int = 0
    """Seed of random search's draws and of Optuna's TPE sampler."""
    scheduler: str = "none"
    """none, or asha: successive halving on train accuracy at rungs of asha_time_attr."""
    asha_time_attr: str = "time/train_s"
    """ASHA's budget axis: time/train_s (training seconds) or progress/passes."""
    asha_grace_period: float = 0.5
    """ASHA's first rung, in units of asha_time_attr; no trial is stopped before it."""
    asha_reduction_factor: float = 2.0
    """ASHA keeps the best 1/reduction_factor of the trials recorded at each rung."""
    max_concurrent_trials: int = 1
    """Trials at once; each takes num_workers CPUs (+1 for the trial driver)."""
    storage_path: str | None = None
    """Tune experiment and checkpoint storage (default ~/ray_results): an absolute path, on a cluster a shared
    mount, or an s3:// / gs:// URI (``check_storage_path``), so a trial restarted on another node resumes;
    --resume reads it."""
    confirm_seeds: list[int] = field(default_factory=list)
    """After the search, re-run each mechanism's fastest pair with these new seeds (>= 3 for a spread)."""
    extend_edges: bool = False
    """After a grid search, where a mechanism's winner is the smallest or largest step size or batch size
    searched, add the next value beyond it (×2 or ÷2) and run it in the same sweep, round after round,
    until the winner is interior or ``extend_edges_rounds`` is reached (``tuning.edges``). Grid search only:
    random and Optuna draws have no grid edge, and the sweep says it skips the extension."""
    extend_edges_rounds: int = 3
    """The stated limit of ``extend_edges``: rounds of added values."""
    extend_edges_scope: str = "winner"
    """winner: bracket γ at the winner's B; every_batch: at every B (for time-vs-B curves)."""
    trial_order: str = "grid"
    """grid: a grid's trials in Tune's order (the last key varies slowest); shuffled: the same trials in an order
    drawn with ``search_seed``, so a machine whose speed drifts over a long sweep slows every arm alike instead of
    the values that run last (the §4 re-run's last 45 trials ran 1.6× faster per pass than its first). Grid search
    only; each extension round is shuffled too (``tuning.rounds.ordered_round``: seeded by ``search_seed`` and the
    round), else it runs mechanism by mechanism as planned."""
    trial_pool: bool = True
    """Run trials in warm worker groups (``raygd.pool``: max_concurrent_trials pools kept across trials);
    false: one TorchTrainer per trial."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name:
            raise ConfigError(f"sweep name = {self.name!r} is invalid: a non-empty name without '/'.")
        if self.search not in SEARCHES:
            raise ConfigError(f"search = {self.search!r} is invalid: allowed values are {', '.join(SEARCHES)}.")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler = {self.scheduler!r} is invalid: allowed values are {', '.join(SCHEDULERS)}.")
        self._check_numbers()
        check_storage_path(self.storage_path)
        unknown = sorted(set(self.space) - set(SPACE_KEYS))
        if unknown:
            raise ConfigError(f"space keys {unknown} are unknown: allowed keys are {', '.join(SPACE_KEYS)}.")
        for key, values in self.space.items():
            self._check_space_entry(key, values)
        if self.search == "optuna":
            self._check_optuna()
        labels = [mechanism_label(m) for m in self.space.get("mechanism", []) if isinstance(m, dict)]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"space.mechanism has duplicate entries {labels}: each mechanism setting once.")
        self._check_batch_schedules()
        if not isinstance(self.confirm_seeds, list) or not all(
            isinstance(s, int) and s >= 0 for s in self.confirm_seeds
        ):
            raise ConfigError(f"confirm_seeds = {self.confirm_seeds!r} is invalid: a list of integers >= 0.")
        for params in self.trial_params():
            self.run_config(params)  # every combination (each range's ends) must be a valid run config

    def _check_batch_schedules(self) -> None:
        entries = self.space.get("batch_schedule")
        if entries is None:
            return
        if not all(isinstance(e, dict) and "policy" in e for e in entries):
            raise ConfigError(
                f"space.batch_schedule = {entries!r} is invalid: a list of mappings with at least 'policy' "
                "(fields of train.batch_schedule), e.g. [{policy: fixed}, {policy: diversity}]."
            )
        labels = [schedule_label(e) for e in entries]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"space.batch_schedule has duplicate entries {labels}: each policy setting once.")
        if self.search == "optuna" and len(entries) > 1:
            raise ConfigError(
                f"space.batch_schedule = {entries!r} is invalid with search = 'optuna': the batch policies are arms "
                "to compare, not a hyperparameter; use search grid or random."
            )

    def redundant(self, params: dict[str, Any]) -> bool:
        """Whether a grid combination repeats another: an adaptive batch policy sets B itself, so it runs at the
        space's smallest global_batch_size only (where it starts)."""
        entry = params.get("batch_schedule")
        if not isinstance(entry, dict) or entry.get("policy", "fixed") == "fixed" or "global_batch_size" not in params:
            return False
        return params["global_batch_size"] != min(self._values("global_batch_size"))

    def _check_numbers(self) -> None:
        def positive_int(name: str, value: Any, optional: bool = False) -> None:
            if not (optional and value is None) and (type(value) is not int or value < 1):
                raise ConfigError(f"{name} = {value!r} is invalid: an integer >= 1.")

        positive_int("num_samples", self.num_samples, optional=True)
        positive_int("max_concurrent_trials", self.max_concurrent_trials)
        positive_int("extend_edges_rounds", self.extend_edges_rounds)
        if not isinstance(self.extend_edges, bool):
            raise ConfigError(f"extend_edges = {self.extend_edges!r} is invalid: true or false.")
        if self.trial_order not in TRIAL_ORDERS:
            raise ConfigError(
                f"trial_order = {self.trial_order!r} is invalid: allowed values are {', '.join(TRIAL_ORDERS)}."
            )
        if self.trial_order != "grid" and self.search != "grid":
            raise ConfigError(
                f"trial_order = {self.trial_order!r} needs search = 'grid': {self.search} draws its own order."
            )
        if self.extend_edges_scope not in EXTEND_SCOPES:
            raise ConfigError(
                f"extend_edges_scope = {self.extend_edges_scope!r} is invalid: allowed values are "
                f"{', '.join(EXTEND_SCOPES)}."
            )
        if not isinstance(self.trial_pool, bool):
            raise ConfigError(f"trial_pool = {self.trial_pool!r} is invalid: true or false.")
        if type(self.search_seed) is not int or self.search_seed < 0:
            raise ConfigError(f"search_seed = {self.search_seed!r} is invalid: an integer >= 0.")
        if self.asha_time_attr not in ASHA_TIME_ATTRS:
            raise ConfigError(
                f"asha_time_attr = {self.asha_time_attr!r} is invalid: allowed values are {', '.join(ASHA_TIME_ATTRS)}."
            )
        if not isinstance(self.asha_grace_period, (int, float)) or not 0 < self.asha_grace_period < 1e6:
            raise ConfigError(
                f"asha_grace_period = {self.asha_grace_period!r} is invalid: a number > 0 (units of asha_time_attr)."
            )
        if not isinstance(self.asha_reduction_factor, (int, float)) or not 1 < self.asha_reduction_factor < 1e3:
            raise ConfigError(f"asha_reduction_factor = {self.asha_reduction_factor!r} is invalid: a number > 1.")

    def _check_space_entry(self, key: str, values: Any) -> None:
        if isinstance(values, dict) and key in RANGE_KEYS:
            if self.search == "grid":
                raise ConfigError(
                    f"space.{key} = {values!r} is a range: ranges need search random or optuna; "
                    f"with search = 'grid' give a list of values."
                )
            extra = sorted(set(values) - {"low", "high", "log"})
            low, high, log = values.get("low"), values.get("high"), values.get("log", False)
            if extra or not (_is_number(low) and _is_number(high)) or not 0 < low < high or not isinstance(log, bool):
                raise ConfigError(
                    f"space.{key} = {values!r} is invalid: a range is {{low: a, high: b, log: "
                    f"true|false}} with 0 < a < b."
                )
        elif not isinstance(values, list) or not values:
            ranges = f", or a range {{low, high, log}} for {', '.join(RANGE_KEYS)}" if self.search != "grid" else ""
            raise ConfigError(f"space.{key} = {values!r} is invalid: a non-empty list of values{ranges}.")

    def _check_optuna(self) -> None:
        if self.num_samples is None:
            raise ConfigError(
                "num_samples is required with search = 'optuna': the number of trials Optuna "
                "suggests (an integer >= 1)."
            )
        if not any(isinstance(self.space.get(k), dict) for k in RANGE_KEYS):
            raise ConfigError(
                "search = 'optuna' needs a range to search, e.g. space.step_size = {low: 0.01, high: "
                "1.0, log: true}; a space of lists only is a grid: allowed searches for it are grid "
                "and random."
            )
        for key in CONDITION_KEYS:
            if len(self.space.get(key, [None])) > 1:
                raise ConfigError(
                    f"space.{key} = {self.space[key]!r} is invalid with search = 'optuna': "
                    f"{' and '.join(CONDITION_KEYS)} are conditions, not hyperparameters; give one "
                    f"value (confirm_seeds re-runs the winners with more seeds)."
                )

    def _values(self, key: str) -> list[Any]:
        """The listed values of a key, or a range's two ends."""
        values = self.space[key]
        return [values["low"], values["high"]] if isinstance(values, dict) else values

    def trial_params(self) -> list[dict[str, Any]]:
        """Every combination of the space, as the dicts Tune's grid search will produce
        (a range contributes its two ends: what random and optuna search are validated with)."""
        keys = list(self.space)
        combos = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self._values(k) for k in keys))]
        return [c for c in combos if not self.redundant(c)]

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        """Trial params as Tune gives them to a trial, mechanism labels (random/optuna) turned back into dicts."""
        mech = params.get("mechanism")
        if isinstance(mech, str):
            by_label = {mechanism_label(m): m for m in self.space.get("mechanism", [])}
            if mech not in by_label:
                raise ConfigError(
                    f"trial mechanism {mech!r} is not in space.mechanism: allowed are {', '.join(by_label)}."
                )
            params = {**params, "mechanism": dict(by_label[mech])}
        return params

    def run_config(self, params: dict[str, Any]) -> RunConfig:
        """The validated run config of one trial."""
        raw = apply_overrides(self.base, [])
        train, data = dict(raw.get("train") or {}), dict(raw.get("data") or {})
        for key in ("step_size", "global_batch_size", "seed"):
            if key in params:
                train[key] = params[key]
        if "replication" in params:
            data["replication"] = params["replication"]
        if "batch_schedule" in params:
            entry = params["batch_schedule"]
            if not isinstance(entry, dict):
                raise ConfigError(f"space.batch_schedule entry {entry!r} is invalid: a mapping with at least 'policy'.")
            train["batch_schedule"] = {**(train.get("batch_schedule") or {}), **entry}
        raw["train"], raw["data"] = train, data
        if "mechanism" in params:
            mech = params["mechanism"]
            if not isinstance(mech, dict) or "name" not in mech:
                raise ConfigError(f"space.mechanism entry {mech!r} is invalid: a mapping with at least 'name'.")
            raw["mechanism"] = dict(mech)
        try:
            cfg = RunConfig.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"sweep {self.name!r}, trial {params}: {err}") from None
        cfg.tracking.experiment_name = self.name
        cfg.tracking.tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri)
        return cfg

    @property
    def tracking_uri(self) -> str:
        return self.run_config(self.trial_params()[0]).tracking.tracking_uri


def resolve_spec_path(name_or_path: str) -> Path:
    """A preset name (``quickstart``) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"sweep file {name_or_path!r} does not exist.")
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"sweep preset {name_or_path!r} is unknown: allowed presets are {names}, or a YAML path.")
    return preset


def load_sweep_spec(name_or_path: str, overrides: list[str] | None = None) -> SweepSpec:
    """Load a preset or file; ``--set`` overrides go to the base run config (section.field=value)
    or, with the ``sweep.`` prefix, to the spec (``sweep.search=random``, ``sweep.space.seed=[0,1]``)."""
    raw = read_yaml(resolve_spec_path(name_or_path))
    base_overrides = []
    for text in overrides or []:
        if text.startswith("sweep."):
            key, _, value = text[len("sweep.") :].partition("=")
            (_, parsed) = parse_override(f"x.y={value}")
            parts = key.split(".")
            target = raw
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = parsed
        else:
            base_overrides.append(text)
    raw["base"] = apply_overrides(raw.get("base") or {}, base_overrides)
    if raw.get("storage_path") is None and os.environ.get(STORAGE_ENV):  # the cluster's shared storage
        check_storage_path(os.environ[STORAGE_ENV], f"sweep.storage_path (from ${STORAGE_ENV})")
        raw["storage_path"] = os.environ[STORAGE_ENV]
    # Made absolute here, in the driver's working directory: Tune runs trials in their own folders.
    tracking = raw["base"].setdefault("tracking", {})
    if isinstance(tracking, dict):
        tracking["tracking_uri"] = absolute_tracking_uri(tracking.get("tracking_uri", "sqlite:///mlflow.db"))
    known = {f.name for f in fields(SweepSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown sweep field(s) {unknown}: allowed fields are {', '.join(sorted(known))}.")
    if "name" not in raw or "space" not in raw:
        raise ConfigError("a sweep spec needs 'name' and 'space' (and usually 'base').")
    return SweepSpec(**raw)
