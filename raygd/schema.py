"""JSON Schema of a run config, for the editors users write raygd's YAML files in (``raygd schema``).

pydantic's ``TypeAdapter`` reads the config dataclasses (their types, defaults and field docstrings, which
become each field's ``description``); this module adds what the types alone do not say: the allowed values of
each choice field (the same tuples the config's checks use, ``raygd.config.fields``), the import-string form a
user's model or data factory may take instead, and that unknown keys are refused, as the loader refuses them.
Validation itself stays ``raygd.config``'s: its messages name the field, the value and the allowed values, and
the cross-field rules (one target, a policy that needs an estimator, ...) are there, not here.

    raygd schema run > raygd-run.schema.json      # then, first line of a YAML file:
    # yaml-language-server: $schema=raygd-run.schema.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

from raygd.config import (
    BATCH_POLICIES,
    DATASETS,
    DEVICES,
    DIVERSITY_ESTIMATORS,
    DROPCONNECT_GRANULARITY,
    MECHANISMS,
    MODELS,
    NETWORK_TOPOLOGIES,
    SAMPLING,
    STEP_SIZE_RULES,
    RunConfig,
)

DRAFT = "https://json-schema.org/draft/2020-12/schema"
IMPORT_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"
"""``module.path:callable``, the form ``raygd.config.is_import_string`` accepts."""
CHOICES: dict[tuple[str, str], tuple[tuple[str, ...], bool]] = {
    ("DataConfig", "name"): (DATASETS, True),
    ("DataConfig", "sampling"): (SAMPLING, False),
    ("MechanismConfig", "name"): (MECHANISMS, False),
    ("MechanismConfig", "dropconnect_granularity"): (DROPCONNECT_GRANULARITY, False),
    ("NetworkConfig", "topology"): (NETWORK_TOPOLOGIES, False),
    ("BatchScheduleConfig", "policy"): (BATCH_POLICIES, False),
    ("BatchScheduleConfig", "step_size_rule"): (STEP_SIZE_RULES, False),
    ("TrainConfig", "model"): (MODELS, True),
    ("TrainConfig", "device"): (DEVICES, False),
    ("TrainConfig", "diversity_estimator"): (DIVERSITY_ESTIMATORS, False),
}
"""(dataclass, field) -> (allowed values, whether an import string is allowed too)."""


def dataclasses_under(root: type) -> list[type]:
    """``root`` and every dataclass its fields hold (through ``X | None``, lists and dicts), each once."""
    found: list[type] = []

    def walk(cls: type) -> None:
        if cls in found:
            return
        found.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            stack = [hints[f.name]]
            while stack:
                t = stack.pop()
                if dataclasses.is_dataclass(t) and isinstance(t, type):
                    walk(t)
                stack.extend(typing.get_args(t))

    walk(root)
    return found


@contextlib.contextmanager
def _docstrings_as_descriptions(classes: list[type]) -> Iterator[None]:
    """pydantic reads a stdlib dataclass's config from ``__pydantic_config__``; set only while the schema is built."""
    from pydantic import ConfigDict

    for cls in classes:
        cls.__pydantic_config__ = ConfigDict(use_attribute_docstrings=True)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for cls in classes:
            del cls.__pydantic_config__  # type: ignore[attr-defined]


def dataclass_schema(root: type, choices: dict[tuple[str, str], tuple[tuple[str, ...], bool]]) -> dict[str, Any]:
    """The JSON Schema of dataclass ``root`` (its nested dataclasses under ``$defs``), with ``choices`` as enums
    (or an enum beside an import-string pattern) and no unknown key allowed in any of them."""
    from pydantic import TypeAdapter

    classes = dataclasses_under(root)
    with _docstrings_as_descriptions(classes):
        schema = TypeAdapter(root).json_schema()
    defs = schema.setdefault("$defs", {})
    for obj in (schema, *defs.values()):
        obj["additionalProperties"] = False
    for (cls, name), (allowed, imports) in choices.items():
        target = schema if cls == root.__name__ else defs.get(cls)
        if target is None or name not in target.get("properties", {}):
            raise KeyError(f"schema choice {cls}.{name}: no such field in {root.__name__}'s dataclasses")
        prop = target["properties"][name]
        keep = {k: prop[k] for k in ("default", "description", "title") if k in prop}
        enum: dict[str, Any] = {"type": "string", "enum": list(allowed)}
        options = [enum, {"type": "string", "pattern": IMPORT_PATTERN}] if imports else [enum]
        if {"type": "null"} in prop.get("anyOf", []):
            options.append({"type": "null"})
        target["properties"][name] = {**keep, **(options[0] if len(options) == 1 else {"anyOf": options})}
    return schema


def run_config_schema() -> dict[str, Any]:
    """The JSON Schema of a run config file (``raygd train CONFIG``, and a sweep file's ``base``)."""
    schema = dataclass_schema(RunConfig, CHOICES)
    return {
        "$schema": DRAFT,
        "title": "raygd run config",
        **{k: v for k, v in schema.items() if k != "title"},
        "description": "A raygd run config (raygd train CONFIG; a sweep file's base). Every section and field is "
        "optional; raygd.config checks the values again when it loads the file, with the cross-field rules.",
    }
