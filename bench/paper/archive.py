"""Keep the paper experiments' state in the repository: their MLflow store and their unfinished sweeps' Tune folders.

A session can start on a new machine where only what was committed is left: the MLflow store that ``--resume``
and ``--report-only`` read (``bench/paper/out/mlflow.db``) and the Tune folder that ``--resume`` restores
(``~/ray_results/...``) are gone. The first #14 §4 re-run lost its 137 finished trials (~10 h) that way.
``save`` packs, while no sweep runs, a consistent copy of the SQLite store (SQLite's online backup) and the
Tune folder of every sweep in it that is still marked running (one that ``--resume`` continues), without
checkpoints (the trial that was running starts again from step 0 on resume, as after any stop), into
``bench/paper/out/state.tar.gz``; ``restore`` unpacks the store to this checkout's store path (``--tracking-uri``)
and the Tune folders to the paths they came from (the parent runs name them), and refuses to replace a store
that is already there (``--force`` replaces it).

    .venv/bin/python -m bench.paper.archive save
    .venv/bin/python -m bench.paper.archive restore

Written with the standard library (``sqlite3``, ``tarfile``): MLflow's own export tools
(mlflow-export-import) import runs under new run ids, and a resumed sweep needs its own.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sqlite3
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.paper.run import DEFAULT_URI, OUT

ARCHIVE = OUT / "state.tar.gz"
MANIFEST = "manifest.json"
STORE = "mlflow.db"
SKIPPED_DIRS = ("checkpoint_",)
"""Folders left out of a Tune folder: trial checkpoints (a resumed trial starts again from step 0)."""


def store_path(tracking_uri: str) -> Path:
    """The file of a ``sqlite:///`` tracking URI; anything else is refused by name."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        raise SystemExit(f"--tracking-uri = {tracking_uri!r}: only a sqlite:/// store can be archived.")
    return Path(tracking_uri[len(prefix) :])  # sqlite:////abs/path: absolute, sqlite:///rel: relative


def running_tune_dirs(tracking_uri: str) -> list[Path]:
    """The Tune folders of the store's sweeps whose parent run is still RUNNING (interrupted: resumable)."""
    from raygd.records import KIND_TAG, SWEEP_KIND, TUNE_DIR_TAG, mlflow_client

    client = mlflow_client(tracking_uri)
    dirs = []
    for exp in client.search_experiments():
        runs = client.search_runs(
            [exp.experiment_id], f"tags.`{KIND_TAG}` = '{SWEEP_KIND}' and attributes.status = 'RUNNING'"
        )
        dirs += [Path(r.data.tags[TUNE_DIR_TAG]) for r in runs if TUNE_DIR_TAG in r.data.tags]
    return sorted({d for d in dirs if d.is_dir()})


def _skip_checkpoints(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if any(part.startswith(SKIPPED_DIRS) for part in Path(info.name).parts) else info


def save(tracking_uri: str, archive: Path = ARCHIVE) -> dict:
    """Pack the store and the running sweeps' Tune folders into ``archive``; returns the manifest."""
    store = store_path(tracking_uri)
    if not store.is_file():
        raise SystemExit(f"no MLflow store at {store}: nothing to save.")
    tune_dirs = running_tune_dirs(tracking_uri)
    manifest = {"store": str(store.resolve()), "tune_dirs": {f"tune/{d.name}": str(d) for d in tune_dirs}}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / STORE
        with sqlite3.connect(store) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)  # consistent even if a reader has it open
        archive.parent.mkdir(parents=True, exist_ok=True)
        partial = archive.with_suffix(".partial")
        with tarfile.open(partial, "w:gz") as tar:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            tar.add(copy, arcname=STORE)
            for name, path in manifest["tune_dirs"].items():
                tar.add(path, arcname=name, filter=_skip_checkpoints)
        partial.replace(archive)
    return manifest


def restore(store: Path, archive: Path = ARCHIVE, force: bool = False) -> dict:
    """Unpack ``archive``'s store to ``store`` and its Tune folders to the paths they came from (kept where one
    is already there); refuses to replace an existing store unless ``force``."""
    if not archive.is_file():
        raise SystemExit(f"no archive at {archive}: nothing to restore.")
    with tarfile.open(archive, "r:gz") as tar:
        member = tar.extractfile(MANIFEST)
        assert member is not None
        manifest = json.loads(member.read())
        if store.exists() and not force:
            raise SystemExit(f"{store} exists: restore would replace it; move it away or pass --force.")
        with tempfile.TemporaryDirectory() as tmp:
            tar.extractall(tmp, filter="data")
            store.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / STORE, store)
            for name, path in manifest["tune_dirs"].items():
                target = Path(path)
                if target.exists():
                    print(f"{target} exists: kept as it is", file=sys.stderr)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(Path(tmp) / name, target)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.paper.archive", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("--tracking-uri", default=DEFAULT_URI, help="the SQLite store to save or restore to")
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--force", action="store_true", help="restore: replace an existing store")
    args = parser.parse_args(argv)
    if args.action == "save":
        manifest = save(args.tracking_uri, args.archive)
    else:
        manifest = restore(store_path(args.tracking_uri), args.archive, args.force)
    size = args.archive.stat().st_size / 2**20
    print(
        f"{args.action}: {store_path(args.tracking_uri)} and {len(manifest['tune_dirs'])} Tune folder(s) "
        f"{'into' if args.action == 'save' else 'from'} {args.archive} ({size:.1f} MiB)"
    )
    for path in manifest["tune_dirs"].values():
        print(f"  {path}")


if __name__ == "__main__":
    main()
