"""The PostgreSQL the tests run against (bench.services.PostgresCluster and the conftest fixtures) is what the
PostgreSQL engine's tests need: password logins over TCP only with the right password, a fresh database per
test, data that survives restarts and crashes, and the server's own CPU time for the benchmark."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.parse
from typing import Any

import pytest

import bench.services
from bench.services import PostgresCluster, ServiceError

WAIT = 15.0  # every client call here is bounded by this many seconds


def psql_url(cluster: PostgresCluster, dsn: str, sql: str) -> subprocess.CompletedProcess[str]:
    """`psql` as a client would connect: over TCP with the URL's role and password, never prompting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "5"
    return subprocess.run(
        [str(cluster.bindir / "psql"), "-X", "-w", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT,
    )


def query(cluster: PostgresCluster, dsn: str, sql: str) -> str:
    done = psql_url(cluster, dsn, sql)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def database_of(dsn: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(dsn).path.lstrip("/"))


def test_the_role_logs_in_over_tcp_with_its_password_and_only_with_it(postgres_cluster: PostgresCluster,
                                                                        postgres_dsn: str) -> None:
    pg = postgres_cluster
    assert postgres_dsn.startswith(f"postgresql://eventrelay:{pg.password}@127.0.0.1:{pg.port}/")
    who = query(pg, postgres_dsn, "SELECT current_user, current_database(), inet_server_addr()")
    assert who == f"eventrelay|{database_of(postgres_dsn)}|127.0.0.1"

    database = database_of(postgres_dsn)
    for refused in (pg.dsn(database, password="not-the-password"), pg.dsn(database, password=""),
                    pg.dsn(database, username="postgres", password="")):  # the superuser: no TCP login
        done = psql_url(pg, refused, "SELECT 1")
        assert done.returncode != 0, refused
        assert "password" in done.stderr, done.stderr  # refused by authentication, not for another reason


def test_the_role_owns_its_database(postgres_cluster: PostgresCluster, postgres_dsn: str) -> None:
    owner = query(postgres_cluster, postgres_dsn,
                  "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
    assert owner == "eventrelay"
    # the engine makes its own schema in it
    query(postgres_cluster, postgres_dsn, "CREATE SCHEMA eventrelay; CREATE TABLE eventrelay.t (x int)")


_databases_seen: list[str] = []


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_fresh_database_dropped_after_it(postgres_cluster: PostgresCluster, postgres_dsn: str,
                                                          run: int) -> None:
    pg = postgres_cluster
    mine = database_of(postgres_dsn)
    assert mine not in _databases_seen
    tables = "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
    assert query(pg, postgres_dsn, tables) == "0"  # the earlier run's table is not here
    query(pg, postgres_dsn, "CREATE TABLE marker (run int); INSERT INTO marker VALUES (1)")

    existing = set(pg.psql("SELECT datname FROM pg_database").split())
    assert mine in existing
    assert not existing & set(_databases_seen), "an earlier test's database was not dropped"
    _databases_seen.append(mine)


def test_restart_and_crashes_keep_committed_data(postgres_cluster: PostgresCluster, postgres_dsn: str) -> None:
    pg = postgres_cluster
    query(pg, postgres_dsn, "CREATE TABLE kept (n int)")
    port = pg.port
    for n, interrupt in enumerate([pg.restart, lambda: pg.restart(mode="immediate"), pg.kill], start=1):
        query(pg, postgres_dsn, f"INSERT INTO kept VALUES ({n})")
        interrupt()
        if not pg.running:
            assert psql_url(pg, postgres_dsn, "SELECT 1").returncode != 0  # really down
            pg.start()
        assert pg.port == port
        assert query(pg, postgres_dsn, "SELECT string_agg(n::text, ',' ORDER BY n) FROM kept") == ",".join(
            str(i) for i in range(1, n + 1))


def test_server_cpu_seconds_counts_the_work_of_finished_backends(postgres_cluster: PostgresCluster,
                                                                 postgres_dsn: str) -> None:
    pg = postgres_cluster
    before = pg.server_cpu_seconds()
    # a backend that burns CPU and exits with its connection: the postmaster's reaped children count too
    query(pg, postgres_dsn, "SELECT count(*) FROM generate_series(1, 3000000)")
    # The backend's CPU moves to the postmaster's account only once the postmaster has reaped it, a moment
    # after psql has its answer: read again for up to two seconds.
    deadline = time.monotonic() + 2.0
    while (after := pg.server_cpu_seconds()) - before < 0.1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after - before >= 0.1, (before, after)
    pg.restart()
    assert pg.server_cpu_seconds() >= after  # earlier runs of the server stay counted


def test_missing_binaries_say_how_to_install_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(bench.services, "POSTGRES_BINDIR", str(tmp_path))
    with pytest.raises(ServiceError, match=r"make test.*install-services\.sh"):
        PostgresCluster()
