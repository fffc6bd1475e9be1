"""Shared fixtures: small idx data, an MLflow SQLite store, one local Ray per session; the ``ray`` marker.

Tests that start Ray are marked ``ray`` here, from what they use: ``make test-fast`` runs
``pytest -m "not ray"`` (the maths and loop-body tests, minutes) and ``make test`` runs everything.
Under ``-m "not ray"`` Ray refuses to start in the tests' processes and in every Python process they
start (``tests/noray/sitecustomize.py``), so a test that starts Ray unmarked fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

import pytest

from tests.idx import write_idx_dataset

RAY_FIXTURES = {"ray_session", "cluster"}
"""Fixtures that start Ray: the session's local Ray, test_submit.py's local multi-node cluster."""
STARTS_RAY_IN_A_SUBPROCESS = {
    ("test_sweep.py", "test_resume_after_the_sweep_process_is_killed_makes_no_duplicate_children"),  # raygd sweep
    ("test_examples.py", "test_charlm_raygd_train_cli_reaches_a_loss_target"),  # raygd train
    ("test_interrupt.py", "test_an_interrupted_sweep_stays_resumable_and_its_printed_command_finishes_it"),  # sweep
    ("test_interrupt.py", "test_an_interrupted_train_run_ends_killed_with_status_130"),  # raygd train
    ("test_attach.py", "test_the_example_runs_as_written_at_its_smoke_size"),  # examples/attach --smoke-test
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
    # Every test that starts Ray runs after all those that do not. With non-Ray tests (forked multiprocessing
    # Managers, gloo groups, in-process training) run in this process beside the session's Ray, a later Train
    # run hung at its start (controller up, CPUs free, no worker group); the Ray tests alone, in order, pass.
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)


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


def alive_actors(ray, class_name: str | None = None) -> list:
    """The alive actors of this session's Ray (whatever else runs on the machine), optionally of one class."""
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] + ([("class_name", "=", class_name)] if class_name else [])
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, limit=1000)


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, frozen first so that none starts another meanwhile.

    ``os.killpg`` on a driver's group is not enough: Ray puts each worker process in a process group
    of its own, and a worker killed only through its raylet goes on training for a few seconds, long
    enough to finish a short trial and end its MLflow run.
    """
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.suspend()
    procs = [root, *root.children(recursive=True)]  # including any started before its parent froze
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)


def ray_state(ray) -> str:
    """What holds the session Ray's CPUs: its free/total CPUs, alive actors and placement groups not removed."""
    actors = alive_actors(ray)
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    return (
        f"CPU {ray.available_resources().get('CPU', 0)}/{ray.cluster_resources().get('CPU', 0)} free; "
        f"actors {[(a.class_name, a.pid) for a in actors]}; "
        f"placement groups {[(g['placement_group_id'][:8], g['state'], g['bundles']) for g in groups]}"
    )


def _cpus_free(ray, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _clear_leftovers(ray) -> None:
    """End what a test left holding CPUs: the alive actors' processes (all on this node) and placement groups."""
    import signal

    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for actor in alive_actors(ray):
        if actor.pid:
            with contextlib.suppress(OSError):
                os.kill(actor.pid, signal.SIGKILL)
    for group_id, group in ray.util.placement_group_table().items():
        if group["state"] != "REMOVED":
            with contextlib.suppress(Exception):
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group_id))))


@pytest.fixture(autouse=True)
def _ray_left_clean(request):
    """After a test on the session's Ray, its CPUs are free again within 120 s; what a test leaves behind
    (a fit still running after a failure, a group never released) is ended and reported as a warning
    naming that test, so that it never stalls the tests after it."""
    yield
    if "ray_session" not in request.fixturenames:
        return
    ray = request.getfixturevalue("ray_session")
    if not ray.is_initialized() or _cpus_free(ray, 120):
        return
    state = ray_state(ray)
    _clear_leftovers(ray)
    freed = _cpus_free(ray, 60)
    warnings.warn(f"{request.node.nodeid} left the session Ray busy ({state}); ended it (freed: {freed})", stacklevel=1)


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session (each start costs ~5 s)."""
    import ray

    from raygd.ray_env import ensure_ray

    ensure_ray(2, num_cpus=2, log_to_driver=False)  # also lets Ray Train clean up trials Tune stops early
    yield ray
    ray.shutdown()
