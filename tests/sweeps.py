"""A small real sweep spec for the tests: logistic regression on the tests' idx data, 2 workers, B=32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

BASE_TRAIN = {
    "model": "logreg",
    "num_workers": 2,
    "target_accuracy": 0.9,
    "max_passes": 3,
    "eval_every_steps": 4,
    "global_batch_size": 32,
}


def write_sweep_spec(
    folder: Path, idx_dir: Path, uri: str, name: str, space: dict, train: dict | None = None, **extra: Any
) -> Path:
    """Write ``folder/<name>.yaml`` (Tune storage under ``folder/ray_results``); ``train`` overrides
    ``BASE_TRAIN``, ``extra`` sets sweep fields. Returns the path."""
    spec = {
        "name": name,
        "base": {
            "data": {"data_dir": str(idx_dir), "eval_size": 600},
            "train": {**BASE_TRAIN, **(train or {})},
            "tracking": {"tracking_uri": uri},
        },
        "space": space,
        "storage_path": str(folder / "ray_results"),
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
