"""The tracking load bench at a bounded size: 64 concurrent trials (processes) log through raygd's tracker to a
real ``mlflow server`` backed by a real PostgreSQL server, and to one backed by SQLite, all on 127.0.0.1;
both servers answer and every point is read back. The full size (64 × 200 steps × 10 metrics) is
``bench/tracking_load.py``'s default; cluster/README.md has its figures.
"""

from __future__ import annotations

import pytest

from bench import tracking_load as load
from tests.pgserver import PostgresServer, PostgresUnavailable, pid_alive

WRITERS, STEPS, METRICS = 64, 10, 10  # all 64 writers at once; 10 steps keep it near a minute on 2 cores


def test_64_concurrent_trials_lose_no_point_on_postgresql_or_sqlite(tmp_path):
    try:
        results = load.bench(("postgresql", "sqlite"), WRITERS, STEPS, METRICS, workers=2, root=tmp_path)
    except PostgresUnavailable as err:
        pytest.skip(f"no PostgreSQL server to test against: {err}")
    print(load.table(results))
    assert [r.backend for r in results] == ["postgresql", "sqlite"]
    for r in results:
        assert r.runs_found == WRITERS, r.backend
        assert r.requests >= WRITERS * STEPS, r.backend  # the server answered every step (its access log)
        assert (r.read_back, r.lost) == (WRITERS * STEPS * METRICS, 0), r.backend
        assert len(r.latencies_s) == WRITERS * STEPS


def test_throwaway_postgres_listens_on_loopback_only_and_asks_for_the_password():
    psycopg = pytest.importorskip("psycopg")
    try:
        server = PostgresServer()
    except PostgresUnavailable as err:
        pytest.skip(str(err))
    with server as pg:
        uri = pg.create_database("probe").replace("+psycopg", "")
        with psycopg.connect(uri) as conn:
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(uri.replace(pg.password, "wrong"), connect_timeout=5).close()
        pid = pg.pid
    assert not pid_alive(pid) and not pg.root.exists()
