"""The config's vocabulary: the allowed values of its choice fields, and the checks that fail with a ``ConfigError``
naming the field, its value and what is allowed (``raygd.config``)."""

from __future__ import annotations

import math
from typing import Any

from raygd.errors import ConfigError
from raygd.mechanisms.names import NAMES

DATASETS = ("fashion_mnist", "mnist", "cifar10", "synthetic")
MODELS = ("logreg", "logreg_binary", "mnist_cnn", "convnet", "resnet")
IMPORT_STRING = "an import string module.path:callable (e.g. mypkg.nets:build)"
"""How the errors name the plug-in form of ``train.model`` and ``data.name`` (``raygd.plugins``)."""
MECHANISMS = NAMES
"""Registered mechanism names (``raygd.mechanisms.names``; ``raygd.mechanisms.REGISTRY`` holds their classes)."""
SAMPLING = ("shuffle", "with_replacement")
DROPCONNECT_GRANULARITY = ("per_example", "per_group", "per_worker")
DEVICES = ("auto", "cpu", "cuda")
DIVERSITY_ESTIMATORS = ("auto", "none", "in_step", "free")


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name} = {value!r} is invalid: {allowed}.")


def _choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    _require(value in choices, field_name, value, "allowed values are " + ", ".join(choices))


def is_import_string(value: Any) -> bool:
    """Whether ``value`` has the form of Ray's ``import_attr`` strings: ``module.path:attr`` (one colon)."""
    if not isinstance(value, str) or value.count(":") != 1:
        return False
    module, attr = value.split(":")
    return all(part.isidentifier() for part in module.split(".")) and all(a.isidentifier() for a in attr.split("."))


def _builtin_or_import(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    """A built-in name, or a ``module.path:callable`` import string (checked for form only; importing it
    is ``raygd.plugins.check_workload``'s job, which the CLI calls before Ray starts)."""
    if value in choices or is_import_string(value):
        return
    _require(False, field_name, value, "allowed values are " + ", ".join(choices) + ", or " + IMPORT_STRING)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


CHECKPOINT_AT_EVALUATIONS = -1
"""``TrainConfig.checkpoint_interval`` when checkpoints fall at the pass-based schedule's evaluations."""
