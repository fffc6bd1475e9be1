"""Typed, validated configuration for one data-parallel SGD run.

A run config is four small dataclasses, one per concern (data, mechanism, train,
tracking), each validated in ``__post_init__`` so a bad value fails before any Ray
work starts. Configs load from YAML (safe loader) with ``--set section.field=value`` (or nested,
``--set train.network.bandwidth_gbps=1``) overrides, and flatten to ``{"train.step_size": 0.05, ...}``
for MLflow params.

    cfg = load_run_config("configs/quickstart.yaml", ["train.step_size=0.1"])

The package: ``fields`` (allowed values and checks), ``sections`` (data, mechanism, network, batch policy,
tracking), ``train``, ``run`` (``RunConfig`` and the rules across sections), ``load`` (YAML, overrides). Import
from ``raygd.config``; the submodules import only one another, from ``fields`` up.
"""

from raygd.config.fields import (
    CHECKPOINT_AT_EVALUATIONS,
    DATASETS,
    DEVICES,
    DIVERSITY_ESTIMATORS,
    DROPCONNECT_GRANULARITY,
    IMPORT_STRING,
    MECHANISMS,
    MODELS,
    SAMPLING,
    is_import_string,
)
from raygd.config.load import (
    TRACKING_SCHEMES,
    absolute_tracking_uri,
    apply_overrides,
    load_run_config,
    parse_override,
    read_yaml,
)
from raygd.config.run import RunConfig
from raygd.config.sections import (
    BATCH_POLICIES,
    NETWORK_TOPOLOGIES,
    STEP_SIZE_RULES,
    BatchScheduleConfig,
    DataConfig,
    MechanismConfig,
    NetworkConfig,
    TrackingConfig,
)
from raygd.config.train import TrainConfig
from raygd.errors import ConfigError, ResumeError

__all__ = [
    "BATCH_POLICIES",
    "CHECKPOINT_AT_EVALUATIONS",
    "DATASETS",
    "DEVICES",
    "DIVERSITY_ESTIMATORS",
    "DROPCONNECT_GRANULARITY",
    "IMPORT_STRING",
    "MECHANISMS",
    "MODELS",
    "NETWORK_TOPOLOGIES",
    "SAMPLING",
    "STEP_SIZE_RULES",
    "TRACKING_SCHEMES",
    "BatchScheduleConfig",
    "ConfigError",
    "DataConfig",
    "MechanismConfig",
    "NetworkConfig",
    "ResumeError",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "absolute_tracking_uri",
    "apply_overrides",
    "is_import_string",
    "load_run_config",
    "parse_override",
    "read_yaml",
]
