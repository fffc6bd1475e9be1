"""JSON Schema of a sweep file (``raygd schema sweep``): the sweep's own fields, its ``base`` as a run config
(``raygd.schema``) and its ``space`` key by key.

Built from ``SweepSpec`` by the same function as the run config's schema (pydantic reads the dataclass and its
field docstrings); the choice fields take the tuples ``tuning.spec`` checks them by. ``tuning.spec`` still
validates the file when it loads it, with the rules across fields (optuna needs ``num_samples``, a grid edge
needs a grid, ...).
"""

from __future__ import annotations

from typing import Any

from raygd.schema import DRAFT, dataclass_schema, run_config_schema
from tuning.spec import (
    ASHA_TIME_ATTRS,
    EXTEND_SCOPES,
    SCHEDULERS,
    SEARCHES,
    SPACE_KEYS,
    TRIAL_ORDERS,
    SweepSpec,
)

SWEEP_CHOICES: dict[tuple[str, str], tuple[tuple[str, ...], bool]] = {
    ("SweepSpec", "search"): (SEARCHES, False),
    ("SweepSpec", "scheduler"): (SCHEDULERS, False),
    ("SweepSpec", "asha_time_attr"): (ASHA_TIME_ATTRS, False),
    ("SweepSpec", "extend_edges_scope"): (EXTEND_SCOPES, False),
    ("SweepSpec", "trial_order"): (TRIAL_ORDERS, False),
}
"""(dataclass, field) -> (allowed values, whether an import string is allowed too), as ``raygd.schema.CHOICES``."""


def _space(defs: dict[str, Any]) -> dict[str, Any]:
    """``space``: a list of values per key; ``step_size`` may be a range {low, high, log} under random/optuna."""

    def values(items: dict[str, Any], description: str) -> dict[str, Any]:
        return {"type": "array", "items": items, "minItems": 1, "description": description}

    positive = {"type": "integer", "minimum": 1}
    step_range = {
        "type": "object",
        "properties": {"low": {"type": "number"}, "high": {"type": "number"}, "log": {"type": "boolean"}},
        "required": ["low", "high"],
        "additionalProperties": False,
    }
    props = {
        "step_size": {
            "anyOf": [values({"type": "number", "exclusiveMinimum": 0}, "step sizes γ"), step_range],
            "description": "step sizes γ, or a range {low, high, log} under random/optuna",
        },
        "global_batch_size": values(positive, "global batch sizes B (a multiple of train.num_workers)"),
        "mechanism": values(
            {"$ref": "#/$defs/MechanismConfig"}, "mechanisms, each a mechanism section ({name: dropconnect})"
        ),
        "seed": values({"type": "integer"}, "seeds"),
        "replication": values(positive, "r-fold data replication factors"),
        "batch_schedule": values(
            {"$ref": "#/$defs/BatchScheduleConfig"}, "batch policies, each a train.batch_schedule ({policy: diversity})"
        ),
    }
    if set(props) != set(SPACE_KEYS):
        raise KeyError(f"the schema's space keys {sorted(props)} differ from tuning.spec's {sorted(SPACE_KEYS)}")
    if not {"MechanismConfig", "BatchScheduleConfig"} <= set(defs):
        raise KeyError("the run config schema lacks MechanismConfig or BatchScheduleConfig")
    return {"type": "object", "properties": props, "additionalProperties": False}


def sweep_schema() -> dict[str, Any]:
    """The JSON Schema of a sweep file (``raygd sweep FILE``, the presets in ``tuning/presets/``)."""
    run = run_config_schema()
    sweep = dataclass_schema(SweepSpec, SWEEP_CHOICES)
    defs = {**run.pop("$defs"), **sweep.pop("$defs", {})}
    defs["RunConfig"] = {k: v for k, v in run.items() if k not in ("$schema", "title")} | {"title": "RunConfig"}
    props = sweep["properties"]
    props["base"] = {"$ref": "#/$defs/RunConfig", "description": props["base"].get("description", "")}
    space = _space(defs)
    props["space"] = space | {"description": props["space"].get("description", "")}
    return {
        "$schema": DRAFT,
        "title": "raygd sweep",
        **{k: v for k, v in sweep.items() if k != "title"},
        "required": ["name", "space"],
        "$defs": defs,
    }
