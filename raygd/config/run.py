"""``RunConfig``: the four sections of one run, the rules across them, and how a nested mapping (a YAML file after
its overrides) becomes one, each value checked against its field's type hint (``raygd.config``).

Why by hand: the checks and their messages (field, value, allowed values) are the product's bad-input contract;
pydantic would generate the type checks but word them its own way, and the cross-field rules stay hand-written
either way. ``raygd schema`` gets the JSON Schema from these dataclasses through pydantic's ``TypeAdapter``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

from raygd.config.fields import _require
from raygd.config.sections import DataConfig, MechanismConfig, TrackingConfig
from raygd.config.train import TrainConfig
from raygd.errors import ConfigError
from raygd.mechanisms.names import EXCLUDED_ESTIMATORS


@dataclass
class RunConfig:
    """One data-parallel SGD run: data, mechanism, training schedule and tracking."""

    data: DataConfig = field(default_factory=DataConfig)
    mechanism: MechanismConfig = field(default_factory=MechanismConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.train.model == "logreg_binary":
            _require(
                self.data.num_classes == 2,
                "train.model",
                self.train.model,
                "logreg_binary needs exactly two classes: set data.classes, e.g. [0, 1]",
            )
        est = self.train.diversity_estimator
        excluded = EXCLUDED_ESTIMATORS[self.mechanism.name].get(est)
        _require(excluded is None, "train.diversity_estimator", est, excluded or "")
        _require(
            self.train.batch_schedule.policy == "fixed" or self.online_estimator != "none",
            "train.batch_schedule.policy",
            self.train.batch_schedule.policy,
            "an adaptive policy reads the online B_D estimate: it needs train.diversity_estimator != none "
            f"(and one the mechanism allows; {self.mechanism.name} with {self.train.num_workers} worker(s) has none)",
        )
        if self.data.name == "synthetic":
            _require(
                self.train.model in ("logreg", "logreg_binary"),
                "train.model",
                self.train.model,
                "synthetic data is a flat feature vector: use logreg or logreg_binary",
            )

    @property
    def online_estimator(self) -> str:
        """``train.diversity_estimator`` with auto resolved: free at P > 1 (no extra backward), else
        in_step, skipping an estimator the mechanism excludes (quantize at P > 1: in_step); none when
        both are excluded (dropconnect at P = 1)."""
        est = self.train.diversity_estimator
        if est != "auto":
            return est
        excluded = EXCLUDED_ESTIMATORS[self.mechanism.name]
        preferred = ("free", "in_step") if self.train.num_workers > 1 else ("in_step",)
        return next((e for e in preferred if e not in excluded), "none")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flatten to ``{"section.field": value}`` (MLflow params, Tune search keys)."""
        flat = {f"{s}.{k}": v for s, sub in self.to_dict().items() for k, v in sub.items()}
        for nested in (
            "train.network",
            "train.batch_schedule",
            "train.model_args",
            "data.args",
        ):  # mappings flatten one level further
            if isinstance(flat.get(nested), dict):
                flat.update({f"{nested}.{k}": v for k, v in flat.pop(nested).items()})
        return flat

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> RunConfig:
        raw = dict(raw or {})
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}: allowed sections are {', '.join(sections)}.")
        train = raw.get("train")
        if isinstance(train, dict) and train.get("target_loss") is not None and "target_accuracy" not in train:
            raw["train"] = {**train, "target_accuracy": None}  # a loss target alone replaces the default one
        built = {}
        for name in sections:
            sub_cls = get_type_hints(cls)[name]
            value = raw.get(name) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping of fields, got {value!r}.")
            built[name] = _build_section(name, sub_cls, value)
        return cls(**built)


def _build_section(section: str, sub_cls: type, values: dict[str, Any]) -> Any:
    hints = get_type_hints(sub_cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(f'{section}.{u}' for u in unknown)}: "
            f"allowed fields are {', '.join(f'{section}.{h}' for h in hints)}."
        )
    kwargs = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()}
    return sub_cls(**kwargs)


def _coerce(field_name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type hint; ints are accepted for floats."""
    args = get_args(hint)
    if get_origin(hint) is Union or type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):  # a nested section, e.g. train.network
        if not isinstance(value, dict):
            raise ConfigError(f"{field_name} = {value!r} is invalid: must be a mapping of fields or null.")
        return _build_section(field_name, hint, value)
    origin = get_origin(hint)
    if origin is dict or hint is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{field_name} = {value!r} is invalid: must be a mapping of names to values.")
        return dict(value)
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{field_name} = {value!r} is invalid: must be a list of {item.__name__}.")
        return [_coerce(f"{field_name}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{field_name} = {value!r} is invalid: must be of type {hint.__name__}.")
    return value
