"""The mechanisms' names and the online estimators each excludes: the facts ``raygd.config`` validates a config
by, in a module that imports nothing, so that the config sits below the registry (``raygd.mechanisms.REGISTRY``
holds the classes; its keys are ``NAMES``, which ``raygd.mechanisms`` checks on import).

Adding a mechanism adds its name here and its class to the registry (docs/USER_GUIDE.md, "Adding a mechanism").
"""

from __future__ import annotations

from collections.abc import Mapping

NAMES = ("vanilla", "dropconnect", "sgld", "quantize")
"""Every ``mechanism.name``, in the order the errors list them."""

EXCLUDED_ESTIMATORS: Mapping[str, Mapping[str, str]] = {
    "vanilla": {},
    "dropconnect": {"in_step": "in_step needs deterministic per-example gradients; with dropconnect use free"},
    "sgld": {},
    "quantize": {
        "free": "free's measured updates all-reduce the exact gradient by hand, bypassing "
        "quantize's DDP communication hook; use in_step"
    },
}
"""Mechanism name -> online estimator (``train.diversity_estimator``) -> why it cannot run with it."""
