"""raygd's tests, a package so that their shared helpers import as ``tests.idx``, ``tests.dist``,
``tests.localray``, ``tests.pgserver`` and ``tests.trials`` (from the repository root, as
``python -m pytest tests`` and the benches under ``bench/`` run)."""
