"""Reading a run config: YAML with the safe loader, ``--set section.field[.key]=value`` overrides, the tracking URI
made absolute, then ``RunConfig.from_dict`` (``raygd.config``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from raygd.config.run import RunConfig
from raygd.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.field=value`` or a nested ``section.field.key=value`` (``train.network.bandwidth_gbps=1``,
    ``train.batch_schedule.policy=diversity``); the value is read as YAML (``0.1``, ``[0, 1]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} is invalid: write it as section.field=value, e.g. train.step_size=0.1.")
    key, _, raw_value = text.partition("=")
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(
            f"--set {text!r} is invalid: the key must be section.field (or section.field.key for a nested "
            "field), e.g. train.step_size or train.network.bandwidth_gbps."
        )
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r} is invalid: the value is not valid YAML ({err}).") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested ``raw`` dict with ``section.field[.key...]=value`` overrides applied.

    A nested key walks into the mapping at each level, starting one where it is missing or null
    (``train.network: null`` then ``--set train.network.bandwidth_gbps=1`` gives the link's defaults but that).
    """
    merged = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        target = merged
        for depth, part in enumerate(path[:-1]):
            sub = target.get(part)
            if sub is None:
                sub = target[part] = {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{'.'.join(path[: depth + 1])} must be a mapping of fields, got {sub!r}.")
            target = sub
        target[path[-1]] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass the path of a YAML file.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping with sections data/mechanism/train/tracking.")
    return raw


def absolute_tracking_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative ``sqlite:///file.db`` or plain path absolute (Ray workers run elsewhere)."""
    base = base or Path.cwd()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if not path.startswith("/"):
            return "sqlite:///" + str((base / path).resolve())
        return uri
    if "://" not in uri:
        raise ConfigError(
            f"tracking.tracking_uri = {uri!r} is invalid: use sqlite:///path/to/mlflow.db or http://host:port "
            "(plain file stores are not supported by MLflow 3 without opting in)."
        )
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            f"tracking.tracking_uri = {uri!r} is invalid: the scheme {scheme!r} is not an MLflow tracking store; "
            f"allowed schemes are {', '.join(TRACKING_SCHEMES)} (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)."
        )
    return uri


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load, override and validate a run config; the tracking URI comes back absolute."""
    raw = read_yaml(path) if path is not None else {}
    cfg = RunConfig.from_dict(apply_overrides(raw, overrides or []))
    cfg.tracking.tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri)
    return cfg
