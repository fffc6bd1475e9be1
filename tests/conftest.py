"""Shared fixtures: small idx data, an MLflow SQLite store, one local Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.idx import write_idx_dataset


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the decompressed-idx cache and Ray Train storage out of the user's home."""
    os.environ["RAYGD_CACHE_DIR"] = str(tmp_path_factory.mktemp("raygd-cache"))
    os.environ.pop("RAYGD_DATA_DIR", None)
    yield


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    return write_idx_dataset(tmp_path_factory.mktemp("fmnist"), n_train=600, n_test=200)


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session (each start costs ~5 s)."""
    import ray

    from raygd.ray_env import ensure_ray

    ensure_ray(2, num_cpus=2, log_to_driver=False)  # also lets Ray Train clean up trials Tune stops early
    yield ray
    ray.shutdown()
