"""A sweep spec: a base run config plus a search space, validated before Ray starts.

    name: quickstart                 # MLflow experiment and Tune experiment name
    base: {data: {...}, train: {...}}   # a raygd run config (see configs/quickstart.yaml)
    space:
      step_size: [0.05, 0.2]
      global_batch_size: [64, 256]
      mechanism: [{name: vanilla}, {name: dropconnect, drop_prob: 0.4}]
      seed: [0]
      replication: [1]               # optional
    search: grid                     # grid | random (num_samples draws)
    scheduler: none                  # none | asha (stops trials that lag in train accuracy)

Every combination in the space is checked as a full ``RunConfig`` up front, so a typo
fails with the field's name before any trial runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygd.config import ConfigError, RunConfig, absolute_tracking_uri, apply_overrides, parse_override, read_yaml

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
SEARCHES = ("grid", "random")
SCHEDULERS = ("none", "asha")
SPACE_KEYS = ("step_size", "global_batch_size", "mechanism", "seed", "replication")


@dataclass
class SweepSpec:
    """What a sweep searches and how."""

    name: str
    """Sweep name: the MLflow experiment and the Tune experiment folder."""
    base: dict[str, Any]
    """The run config every trial starts from (sections data/mechanism/train/tracking)."""
    space: dict[str, list[Any]]
    """Values per key: step_size, global_batch_size, mechanism (dicts), seed, replication."""
    search: str = "grid"
    """grid (every combination) or random (num_samples draws from the lists)."""
    num_samples: int = 1
    """random search: number of trials drawn."""
    scheduler: str = "none"
    """none, or asha: successive halving on train accuracy per evaluation."""
    max_concurrent_trials: int = 1
    """Trials at once; each takes num_workers CPUs (+1 for the trial driver)."""
    storage_path: str | None = None
    """Tune experiment storage (default ~/ray_results); --resume reads it."""
    confirm_seeds: list[int] = field(default_factory=list)
    """After the search, re-run each mechanism's fastest pair with these new seeds (>= 3 for a spread)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name:
            raise ConfigError(f"sweep name = {self.name!r} is invalid: a non-empty name without '/'.")
        if self.search not in SEARCHES:
            raise ConfigError(f"search = {self.search!r} is invalid: allowed values are {', '.join(SEARCHES)}.")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler = {self.scheduler!r} is invalid: allowed values are {', '.join(SCHEDULERS)}.")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ConfigError(f"num_samples = {self.num_samples!r} is invalid: an integer >= 1.")
        if not isinstance(self.max_concurrent_trials, int) or self.max_concurrent_trials < 1:
            raise ConfigError(f"max_concurrent_trials = {self.max_concurrent_trials!r} is invalid: an integer >= 1.")
        unknown = sorted(set(self.space) - set(SPACE_KEYS))
        if unknown:
            raise ConfigError(f"space keys {unknown} are unknown: allowed keys are {', '.join(SPACE_KEYS)}.")
        for key, values in self.space.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"space.{key} = {values!r} is invalid: a non-empty list of values.")
        if not isinstance(self.confirm_seeds, list) or not all(isinstance(s, int) and s >= 0
                                                               for s in self.confirm_seeds):
            raise ConfigError(f"confirm_seeds = {self.confirm_seeds!r} is invalid: a list of integers >= 0.")
        for params in self.trial_params():
            self.run_config(params)  # every combination must be a valid run config

    def trial_params(self) -> list[dict[str, Any]]:
        """Every combination of the space, as the dicts Tune's grid search will produce."""
        keys = list(self.space)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.space[k] for k in keys))]

    def run_config(self, params: dict[str, Any]) -> RunConfig:
        """The validated run config of one trial."""
        raw = apply_overrides(self.base, [])
        train, data = dict(raw.get("train") or {}), dict(raw.get("data") or {})
        for key in ("step_size", "global_batch_size", "seed"):
            if key in params:
                train[key] = params[key]
        if "replication" in params:
            data["replication"] = params["replication"]
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


def mechanism_label(mech: dict[str, Any]) -> str:
    """A short display label: ``vanilla``, ``dropconnect(p=0.4)``, ``sgld(sigma=0.01)``, ``quantize(s=16)``."""
    name = mech.get("name", "vanilla")
    detail = {"dropconnect": ("drop_prob", "p"), "sgld": ("sgld_sigma", "sigma"), "quantize": ("quant_levels", "s")}
    if name in detail:
        key, short = detail[name]
        defaults = {"drop_prob": 0.5, "sgld_sigma": 0.01, "quant_levels": 16}
        label = f"{name}({short}={mech.get(key, defaults[key]):g})"
        if name == "dropconnect" and mech.get("dropconnect_granularity", "per_example") != "per_example":
            label = label[:-1] + f", {mech['dropconnect_granularity']})"
        return label
    return name


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
            key, _, value = text[len("sweep."):].partition("=")
            (_, parsed) = parse_override(f"x.y={value}")
            parts = key.split(".")
            target = raw
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = parsed
        else:
            base_overrides.append(text)
    raw["base"] = apply_overrides(raw.get("base") or {}, base_overrides)
    # Made absolute here, in the driver's working directory: Tune runs trials in their own folders.
    tracking = raw["base"].setdefault("tracking", {})
    if isinstance(tracking, dict):
        tracking["tracking_uri"] = absolute_tracking_uri(tracking.get("tracking_uri", "sqlite:///mlflow.db"))
    known = {"name", "base", "space", "search", "num_samples", "scheduler", "max_concurrent_trials", "storage_path",
             "confirm_seeds"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown sweep field(s) {unknown}: allowed fields are {', '.join(sorted(known))}.")
    if "name" not in raw or "space" not in raw:
        raise ConfigError("a sweep spec needs 'name' and 'space' (and usually 'base').")
    return SweepSpec(**raw)
