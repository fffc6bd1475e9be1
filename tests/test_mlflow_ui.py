"""The MLflow UI as a user sees it: headless Chromium on a real ``mlflow server`` holding a real 2-trial sweep.

The page checked is the one at the link ``raygd sweep`` prints (``raygd.cli.runs_page_url``): MLflow's
model-training runs table (not its GenAI overview) listing each trial by its descriptive name with its data
set; and the sweep's parent run page, whose description shows the result table. MLflow's UI is a React app:
Chromium's ``--dump-dom`` after a virtual-time budget gives the rendered DOM, which is what is asserted on.
Each page is opened in a fresh browser profile, so nothing the UI remembers (its view choice, its sort)
carries from one page to the next.

Chromium is Debian's ``chromium`` (installed with apt when missing and this runs as root; skipped otherwise).
Set ``RAYGD_UI_SCREENSHOTS=docs`` to also write the two screenshots there (``docs/mlflow-runs.png``,
``docs/mlflow-parent-run.png``)::

    RAYGD_UI_SCREENSHOTS=docs .venv/bin/python -m pytest tests/test_mlflow_ui.py
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from raygd.cli import runs_page_url
from raygd.records import child_runs
from tests.localray import MlflowServer
from tests.sweeps import write_sweep_spec
from tuning.spec import load_sweep_spec
from tuning.sweep import run_sweep

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
)
WINDOW = (1600, 1000)
GENAI_OVERVIEW = ("Detect Issues", "Token Usage", "Observability")
"""Text of MLflow 3's GenAI overview (its charts and its sidebar), absent from the model-training view."""
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def _chromium() -> str:
    """Debian's chromium: found, or installed with apt when root; else the test is skipped, saying why."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            "chromium is not installed and cannot be installed here (needs root and apt-get): apt-get install chromium"
        )
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        )
        if done.returncode != 0:
            pytest.skip(f"chromium is not installed and `{' '.join(cmd)}` failed: {done.stderr[-500:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


def _browse(chromium: str, url: str, *args: str, timeout_s: float = 90) -> str:
    """Run headless Chromium on ``url`` in a fresh profile; returns its stdout. Chromium and the processes it
    starts (its own session) are ended by process group, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"chromium exited with {proc.returncode} on {url}"
    return out


class Page(HTMLParser):
    """What a rendered page shows: its text, its links, the text of each ag-grid row by row id (a run id,
    the row's cells in all of the grid's column containers), its table headers."""

    def __init__(self, dom: str):
        super().__init__()
        self.text: list[str] = []
        self.links: dict[str, str] = {}
        self.rows: dict[str, list[str]] = {}
        self.headers: list[str] = []
        self.has_grid = False
        self._stack: list[tuple[str, str | None, str | None]] = []  # (tag, row id, href) of open elements
        self.feed(dom)
        self.close()

    def _inside(self, field: int) -> str | None:
        """The row id (``field`` 1) or link (2) of the innermost open element that has one."""
        return next((entry[field] for entry in reversed(self._stack) if entry[field] is not None), None)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.has_grid |= a.get("role") == "grid"
        if a.get("title") and (row := self._inside(1)):
            self.rows[row].append(a["title"])
        if tag in VOID:
            return
        if a.get("row-id"):
            self.rows.setdefault(a["row-id"], [])
        self._stack.append((tag, a.get("row-id"), a.get("href") if tag == "a" else None))

    def handle_endtag(self, tag):
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    def handle_data(self, data):
        text = data.strip()
        if not text or any(t in ("script", "style") for t, _, _ in self._stack):
            return
        self.text.append(text)
        if row := self._inside(1):
            self.rows[row].append(text)
        if href := self._inside(2):
            self.links[href] = (self.links.get(href, "") + " " + text).strip()
        if any(t == "th" for t, _, _ in self._stack):
            self.headers.append(text)

    def shows(self, text: str) -> bool:
        return text in " | ".join(self.text)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def ui_sweep(ray_session, tmp_path_factory, idx_dir):
    """A real 2-trial sweep tracked by a real ``mlflow server``: (server, sweep outcome, chromium)."""
    chromium = _chromium()
    root = tmp_path_factory.mktemp("mlflow-ui")
    server = MlflowServer(root / "mlflow")
    try:
        server.wait_ready()
        path = write_sweep_spec(root, idx_dir, server.url, "ui-sweep", {"step_size": [0.05, 0.1]})
        yield server, run_sweep(load_sweep_spec(str(path))), chromium
    finally:
        server.stop()


def _save(shot: Path, name: str) -> None:
    if folder := os.environ.get("RAYGD_UI_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(folder) / name)


def test_the_printed_link_shows_the_runs_table_with_each_trial_by_name_and_its_dataset(ui_sweep, tmp_path):
    server, outcome, chromium = ui_sweep
    url = runs_page_url(server.url, outcome.parent_run_id)
    assert url.startswith(f"{server.url}/#/experiments/"), url  # an http tracking URI is its own UI
    children = child_runs(server.url, outcome.parent_run_id)
    assert sorted(c.info.run_name for c in children) == ["vanilla B=32 γ=0.05 seed=0", "vanilla B=32 γ=0.1 seed=0"]
    experiment_id = children[0].info.experiment_id

    page = Page(_browse(chromium, url, "--dump-dom"))
    assert not [t for t in GENAI_OVERVIEW if page.shows(t)], f"{url} shows MLflow's GenAI view: {page.text[:60]}"
    assert page.has_grid and page.shows("Run Name") and page.shows("Dataset"), f"no runs table at {url}"
    assert {c.info.run_id for c in children} | {outcome.parent_run_id} <= set(page.rows), (url, sorted(page.rows))
    for child in children:
        link = f"#/experiments/{experiment_id}/runs/{child.info.run_id}"
        assert page.links.get(link) == child.info.run_name, (link, page.links)
        (dataset,) = [d.dataset for d in child.inputs.dataset_inputs]
        assert dataset.name == "fashion_mnist"
        assert f"{dataset.name} ({dataset.digest})" in page.rows[child.info.run_id], page.rows[child.info.run_id]

    # The same server's plain experiment link opens the GenAI overview: the check above can fail.
    plain = Page(_browse(chromium, f"{server.url}/#/experiments/{experiment_id}", "--dump-dom"))
    assert all(plain.shows(t) for t in GENAI_OVERVIEW) and not plain.rows, plain.text[:60]

    shot = tmp_path / "mlflow-runs.png"
    _browse(chromium, url, f"--screenshot={shot}", "--window-size={},{}".format(*WINDOW))
    assert _png_size(shot) == WINDOW and shot.stat().st_size > 20_000  # a blank page compresses to a few kB
    _save(shot, "mlflow-runs.png")


def test_the_parent_run_page_shows_the_result_table_and_the_trials(ui_sweep, tmp_path):
    server, outcome, chromium = ui_sweep
    (child, *_) = children = child_runs(server.url, outcome.parent_run_id)
    url = f"{server.url}/#/experiments/{child.info.experiment_id}/runs/{outcome.parent_run_id}"
    url += "?workflowType=machine_learning"

    page = Page(_browse(chromium, url, "--dump-dom"))
    assert not [t for t in GENAI_OVERVIEW if page.shows(t)], page.text[:60]
    assert page.shows("Description")
    assert page.headers[:4] == ["mechanism", "step size", "B", "time to target (s)"], page.headers
    assert page.shows(outcome.table.splitlines()[0])  # the table's caption line
    for child in children:
        assert child.info.run_name in page.links.values(), page.links

    shot = tmp_path / "mlflow-parent-run.png"
    _browse(chromium, url, f"--screenshot={shot}", "--window-size={},{}".format(*WINDOW))
    assert _png_size(shot) == WINDOW and shot.stat().st_size > 20_000
    _save(shot, "mlflow-parent-run.png")
