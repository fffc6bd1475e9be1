"""Shared fixtures: small idx data, an MLflow SQLite store, one local Ray per session; the ``ray`` marker.

Tests that start Ray are marked ``ray`` here, from what they use: ``make test-fast`` runs
``pytest -m "not ray"`` (the maths and loop-body tests, minutes) and ``make test`` runs everything.
Under ``-m "not ray"`` Ray refuses to start in the tests' processes and in every Python process they
start (``tests/noray/sitecustomize.py``), so a test that starts Ray unmarked fails loudly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.idx import write_idx_dataset

RAY_FIXTURES = {"ray_session", "cluster"}
"""Fixtures that start Ray: the session's local Ray, test_submit.py's local multi-node cluster."""
STARTS_RAY_IN_A_SUBPROCESS = {
    ("test_sweep.py", "test_resume_after_the_sweep_process_is_killed_makes_no_duplicate_children"),  # raygd sweep
}
"""Tests that start Ray without a fixture: (file, test function)."""
NO_RAY_GUARD = Path(__file__).parent / "noray"


def _without_ray(config: pytest.Config) -> bool:
    return "not ray" in (config.getoption("markexpr") or "")


def pytest_configure(config: pytest.Config) -> None:
    if _without_ray(config):
        import tests.noray.sitecustomize  # noqa: F401  (this process: ray.init and a Ray node raise)

        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NO_RAY_GUARD), os.environ.get("PYTHONPATH")]))


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or (
            (item.path.name, getattr(item, "originalname", item.name)) in STARTS_RAY_IN_A_SUBPROCESS
        ):
            item.add_marker(pytest.mark.ray)


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
