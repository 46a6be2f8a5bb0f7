"""`eventrelay migrate-store`: a stopped daemon's SQLite store copied into PostgreSQL answers every read of the
storage API as the SQLite store did, and a daemon on PostgreSQL carries on from it; refused, with nothing
copied, while a daemon holds the file, when the schema holds data, or when the copy fails halfway."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import pytest
from aiohttp import web

from eventrelay import config as config_module
from eventrelay.config import PostgresConfig, StorageConfig
from eventrelay.events import parse_event
from eventrelay.jobs import JobState
from eventrelay.migrate import Progress, migrate_store
from eventrelay.service import Service
from eventrelay.store import Store, open_store
from eventrelay.store.sqlite.schema import MIGRATIONS

from .conftest import REPO, Received, Receiver, RunningDaemon, stored, wait_for, wait_until, webhook, write_config

FAR = 10**10  # a `now` at which every pending job is due
ALL = 10**9  # a page that holds everything


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eventrelay", "migrate-store", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


async def migrate_in_thread(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(migrate, *args)


def password_of(dsn: str) -> str:
    password = urlsplit(dsn).password
    assert password and len(password) > 8, "the suite's cluster gives its role a long password"
    return unquote(password)


def assert_no_password(done: subprocess.CompletedProcess[str], dsn: str) -> None:
    assert password_of(dsn) not in done.stdout + done.stderr


def postgres(dsn: str, schema: str = "eventrelay") -> StorageConfig:
    return StorageConfig(Path("unused.db"), backend="postgresql", postgresql=PostgresConfig(dsn=dsn, schema=schema,
                                                                                           pool=2))


@pytest.fixture
async def open_stores() -> AsyncIterator[list[Store]]:
    """Stores a test opens to read; closed after it."""
    opened: list[Store] = []
    yield opened
    for store in opened:
        await store.close()


async def opened(stores: list[Store], storage: StorageConfig) -> Store:
    store = await open_store(storage)
    stores.append(store)
    return store


async def start(tmp_path: Path, engine: dict[str, Any], integrations: list[dict[str, Any]],
                session: aiohttp.ClientSession, running: list[RunningDaemon]) -> RunningDaemon:
    """A daemon in this event loop on `engine`, as tests/conftest.py's start_daemon starts one (that fixture's
    engine is one per test; these tests need SQLite and then PostgreSQL)."""
    # No circuit breaker: the test's failures are on purpose, and holding deliveries would only slow it.
    never = {"failures": 1_000_000, "failure_rate": 1.0}
    config = config_module.load(write_config(tmp_path, integrations, engine=engine, delivery={"breaker": never}))
    service = Service(config)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(service.serve(stop, ready.set))
    await asyncio.wait([task, asyncio.create_task(ready.wait())], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert ready.is_set(), "the daemon did not become ready within 30s"
    daemon = RunningDaemon(service, stop, task, session, config.storage.path, config.listen.socket)
    running.append(daemon)
    return daemon


@pytest.fixture
async def daemons() -> AsyncIterator[tuple[aiohttp.ClientSession, list[RunningDaemon]]]:
    session = aiohttp.ClientSession()
    running: list[RunningDaemon] = []
    yield session, running
    for daemon in running:
        if not daemon.task.done():
            await daemon.shutdown()
    await session.close()


# -- what a store answers, through the storage API -------------------------------------------------------------

async def snapshot(store: Store, integrations: list[str]) -> dict[str, Any]:
    """Every read of the storage API over everything `store` holds. Claims come last: on PostgreSQL they take
    leases, which closing the store gives back."""
    jobs, jobs_total = await store.jobs(limit=ALL)
    events, events_total = await store.events(limit=ALL)
    logs, logs_total = await store.logs(limit=ALL)
    seen: dict[str, Any] = {
        "jobs": (jobs, jobs_total), "events": (events, events_total), "logs": (logs, logs_total),
        "job": [await store.job(j.integration, j.id) for j in jobs],
        "attempts": {j.id: await store.attempts(j.id) for j in jobs},
        "event": [await store.event(e.id) for e in events],
        "jobs of an event": [await store.jobs(event_id=e.id, limit=ALL) for e in events],
        "disabled": await store.disabled(),
        "paused": await store.paused(),
        "outcomes": await store.outcomes_since(0),
        "counts": await store.job_counts(tuple(JobState)),
        "oldest pending": await store.oldest_pending(),
    }
    for name in integrations:
        seen[f"{name}: jobs by state"] = [await store.jobs(name, state, limit=ALL) for state in JobState]
        seen[f"{name}: logs"] = await store.logs(name, limit=ALL)
        seen[f"{name}: last attempts"] = await store.last_attempts(name)
        seen[f"{name}: next due"] = await store.next_due(name)
        seen[f"{name}: due"] = await store.claim(name, FAR, 1000)  # requeued_at shows as the jobs' age_from
        seen[f"{name}: due in order"] = await store.claim(name, FAR, 1000, ordered=True)  # ordering keys show
    return seen


# -- the copy ------------------------------------------------------------------------------------------------

def events(numbers: range) -> list[dict[str, Any]]:
    """Events, every fifth with a producer's trace context (it moves with the store)."""
    return [{"id": f"evt-{n}", "type": "order.paid", "data": {"id": f"o{n}", "customer": f"c{n % 3}", "n": n},
             **({"traceparent": f"00-{n + 1:032x}-{n + 1:016x}-01", "tracestate": "shop=1"} if n % 5 == 0 else {})}
            for n in numbers]


def failing(request: Received) -> web.Response:
    """erp fails every 4th event from the 2nd (the head of each customer's queue, so the rest wait behind
    it); crm every 3rd; gone is gone (410)."""
    n = request.json["payload"]["data"]["n"]
    if request.path.endswith("/gone"):
        return web.Response(status=410)
    if request.path.endswith("/erp") and n % 4 == 1 or request.path.endswith("/crm") and n % 3 == 0:
        return web.Response(status=500, text=f"no {n}")
    return web.Response(status=204)


async def test_a_copied_store_reads_the_same_and_a_daemon_on_postgresql_carries_on(
        tmp_path: Path, postgres_dsn: str, receiver: Receiver, daemons: Any, open_stores: list[Store]) -> None:
    session, running = daemons
    names = ["erp", "crm", "gone"]
    integrations = [
        webhook("erp", receiver.url + "/erp", delivery={"ordering": "per_resource", "ordering_key": "{data.customer}",
                                                        "retry": {"initial": "1s", "max_interval": "1s"}}),
        webhook("crm", receiver.url + "/crm", delivery={"retry": {"max_attempts": 1}}),
        webhook("gone", receiver.url + "/gone")]
    receiver.respond = failing
    sqlite_path = tmp_path / "single.db"
    d = await start(tmp_path, {"path": str(sqlite_path)}, integrations, session, running)
    status, _ = await d.post(events(range(30)))
    assert status == 202
    # erp: per customer, what comes before its first failure is delivered and the rest waits: c0 0,3,6 | 9
    # failing; c1 1 failing; c2 2 | 5 failing.
    await wait_for(lambda: d.states("erp"), {"delivered": 4, "pending": 26})
    await wait_for(lambda: d.states("crm"), {"delivered": 20, "dead": 10})
    await wait_until(lambda: d.store.disabled(), timeout=10)
    # Dead jobs sent again (requeued_at set) die again: max_attempts is 1.
    assert await d.store.replay("crm", dead=True) == 10
    await wait_for(lambda: d.jobs("crm", JobState.DEAD), lambda jobs: len(jobs) == 10 and
                   all(j.attempts == 2 for j in jobs), timeout=15)
    await wait_for(lambda: d.jobs("erp", JobState.PENDING),
                   lambda jobs: sum(j.attempts >= 1 for j in jobs) == 3)  # the three failing heads
    await d.store.set_paused("gone", True)  # an operator's pause moves too
    await d.shutdown()

    async with stored(sqlite_path) as single:
        before = await snapshot(single, names)
    assert before["disabled"].keys() == {"gone"} and before["paused"].keys() == {"gone"}
    assert sum(j.traceparent is not None for j in before["erp: due"]) > 0
    assert before["outcomes"]["crm"].dead == 20

    done = await migrate_in_thread("--from", f"sqlite:{sqlite_path}", "--to", postgres_dsn)
    assert done.returncode == 0, done.stderr
    assert_no_password(done, postgres_dsn)
    copied = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in done.stdout.splitlines()[2:9]}
    assert copied.keys() == {"events", "jobs", "attempts", "integration_state", "outcome_minutes", "audit", "total"}
    assert (copied["events"], copied["jobs"], copied["attempts"], copied["integration_state"]) == (
        30, 90, before["logs"][1], 1)
    assert copied["total"] == sum(n for table, n in copied.items() if table != "total")
    assert "jobs: 90 of 90 rows copied" in done.stderr

    shared = await opened(open_stores, postgres(postgres_dsn))
    after = await snapshot(shared, names)
    for what in before:
        assert after[what] == before[what], what
    await shared.close()
    open_stores.remove(shared)

    # A daemon on PostgreSQL delivers what was pending, except to the integration still disabled, and what is
    # new gets ids past the copied ones.
    receiver.requests.clear()
    receiver.respond = None
    old_jobs = max(j.id for j in before["jobs"][0])
    old_attempts = max(a.id for a in before["logs"][0])
    d = await start(tmp_path, {"backend": "postgresql", "dsn": postgres_dsn, "pool": 4, "lease": "5s"},
                    integrations, session, running)
    await wait_for(lambda: d.states("erp"), {"delivered": 30}, timeout=20)
    assert sorted(r.json["id"] for r in receiver.requests) == sorted(
        f"evt-{n}" for n in range(30) if n not in {0, 3, 6, 2})  # erp's pending jobs, once each
    status, answer = await d.post(events(range(100, 105)))
    assert status == 202 and [a["duplicate"] for a in answer["data"]] == [False] * 5
    status, answer = await d.post(events(range(0, 2)))  # copied ids are still known: duplicates
    assert status == 202 and [a["duplicate"] for a in answer["data"]] == [True] * 2
    await wait_for(lambda: d.states("erp"), {"delivered": 35})
    await wait_for(lambda: d.states("crm"), {"delivered": 25, "dead": 10})
    new_jobs = [j for j in await d.jobs() if j.event_id in {f"evt-{n}" for n in range(100, 105)}]
    assert len(new_jobs) == 15 and min(j.id for j in new_jobs) > old_jobs
    assert min(a.id for a in await d.attempts() if a.job_id in {j.id for j in new_jobs}) > old_attempts
    assert await d.states("gone") == {"pending": 35}
    assert not [r for r in receiver.requests if r.path.endswith("/gone")]


# -- refusals ------------------------------------------------------------------------------------------------

async def fill(path: Path, numbers: range = range(3)) -> None:
    """A store with a few events and jobs, through the storage API, closed again."""
    store = await open_store(StorageConfig(path))
    running = asyncio.create_task(store.run())
    await store.ingest([parse_event(e) for e in events(numbers)], [(("erp", None),)] * len(numbers))
    store.stop()
    await running
    await store.close()


async def test_refused_while_a_daemon_runs_on_the_file(tmp_path: Path, postgres_dsn: str, daemons: Any,
                                                       open_stores: list[Store]) -> None:
    session, running = daemons
    path = tmp_path / "busy.db"
    await fill(path)
    d = await start(tmp_path, {"path": str(path)}, [webhook("erp", "http://127.0.0.1:9/")], session, running)
    done = await migrate_in_thread("--from", f"sqlite:{path}", "--to", postgres_dsn)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"eventrelay: migrate-store: {path} is in use by a running eventrelay (pid {os.getpid()}): stop it first; "
        "migrate-store copies a stopped store, so that nothing changes in it meanwhile")
    assert done.stdout == ""
    assert_no_password(done, postgres_dsn)
    assert await d.states() == {"pending": 3}  # the daemon is untouched
    # Nothing reached PostgreSQL.
    shared = await opened(open_stores, postgres(postgres_dsn))
    assert await shared.events() == ([], 0)


class _TriesToStartADaemon(Progress):
    """Progress that, as each table starts, checks whether a daemon could take the file's lock now."""

    def __init__(self, path: Path):
        super().__init__(io.StringIO())
        self.path = path
        self.lock_free: list[bool] = []

    def start(self, table: str, total: int) -> None:
        super().start(table, total)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a starting daemon does (store/sqlite/files.py)
            self.lock_free.append(True)
        except BlockingIOError:
            self.lock_free.append(False)
        finally:
            os.close(fd)


async def test_no_daemon_can_start_on_the_file_during_the_copy(tmp_path: Path, postgres_dsn: str,
                                                               open_stores: list[Store]) -> None:
    path = tmp_path / "single.db"
    await fill(path)
    progress = _TriesToStartADaemon(path)
    copied = await migrate_store(path, postgres(postgres_dsn).postgresql, progress)
    assert progress.lock_free == [False] * 6  # after each table
    assert [(c.table, c.rows) for c in copied] == [("events", 3), ("jobs", 3), ("attempts", 0),
                                                   ("integration_state", 0), ("outcome_minutes", 0), ("audit", 0)]
    store = await opened(open_stores, StorageConfig(path))  # free again once done
    assert await store.job_counts() == {("erp", JobState.PENDING): 3}


async def test_refused_when_the_schema_holds_data(tmp_path: Path, postgres_dsn: str,
                                                  open_stores: list[Store]) -> None:
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    await fill(first, range(3))
    await fill(second, range(10, 12))
    assert (await migrate_in_thread("--from", f"sqlite:{first}", "--to", postgres_dsn)).returncode == 0

    done = await migrate_in_thread("--from", f"sqlite:{second}", "--to", postgres_dsn)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith(
        "eventrelay: migrate-store: the schema eventrelay in postgresql://eventrelay:****")
    assert done.stderr.splitlines()[-1].endswith(
        "already holds data (events and jobs): migrate-store copies into an empty schema only. Name a new one "
        "with --schema NAME (and storage.schema in the config), or, if its data is not needed, empty it with "
        "`DROP SCHEMA eventrelay CASCADE` and run this again")
    assert_no_password(done, postgres_dsn)
    shared = await opened(open_stores, postgres(postgres_dsn))
    assert [e.id for e in (await shared.events())[0]] == ["evt-2", "evt-1", "evt-0"]  # as it was

    done = await migrate_in_thread("--from", f"sqlite:{second}", "--to", postgres_dsn, "--schema", "second")
    assert done.returncode == 0, done.stderr
    other = await opened(open_stores, postgres(postgres_dsn, "second"))
    assert [e.id for e in (await other.events())[0]] == ["evt-11", "evt-10"]


async def test_refused_while_daemons_use_the_schema(tmp_path: Path, postgres_dsn: str, daemons: Any) -> None:
    session, running = daemons
    path = tmp_path / "single.db"
    await fill(path)
    d = await start(tmp_path, {"backend": "postgresql", "dsn": postgres_dsn, "pool": 2},
                    [webhook("erp", "http://127.0.0.1:9/")], session, running)
    await wait_until(d.store.daemons)  # its first heartbeat
    done = await migrate_in_thread("--from", f"sqlite:{path}", "--to", postgres_dsn)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].endswith(
        f"({socket.gethostname()} pid {os.getpid()}): migrate-store fills a schema no daemon uses. Stop them, or "
        "name another schema with --schema NAME")
    assert_no_password(done, postgres_dsn)
    assert await d.store.events() == ([], 0)


async def test_a_copy_that_fails_halfway_leaves_the_schema_empty(tmp_path: Path, postgres_dsn: str,
                                                                 open_stores: list[Store]) -> None:
    path = tmp_path / "broken.db"
    await fill(path, range(5))
    with sqlite3.connect(path) as db:  # a job whose event is gone: PostgreSQL refuses it, after the events
        db.execute("DELETE FROM events WHERE id = 'evt-3'")
    done = await migrate_in_thread("--from", f"sqlite:{path}", "--to", postgres_dsn)
    assert done.returncode == 1
    assert "events: 4 of 4 rows copied" in done.stderr
    assert "copying jobs failed, so nothing was stored in the schema eventrelay" in done.stderr.splitlines()[-1]
    assert_no_password(done, postgres_dsn)
    shared = await opened(open_stores, postgres(postgres_dsn))
    assert await shared.events() == ([], 0)
    assert await shared.jobs() == ([], 0)


async def test_an_older_store_is_brought_up_to_date_and_a_newer_one_refused(tmp_path: Path, postgres_dsn: str,
                                                                            open_stores: list[Store]) -> None:
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as db:  # a file of an eventrelay before per-resource ordering and outcome counts
        for version, migration in enumerate(MIGRATIONS[:2], 1):
            db.executescript(migration)
            db.execute(f"PRAGMA user_version={version}")
        db.execute("INSERT INTO events VALUES (7, 'evt-7', 'order.paid', '{\"data\": {}}', 1.5)")
        db.execute("INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at) "
                   "VALUES (70, 7, 'erp', 1.5, 1.5, 1.5)")
    done = await migrate_in_thread("--from", f"sqlite:{old}", "--to", postgres_dsn)
    assert done.returncode == 0, done.stderr
    assert f"{old}: schema brought to version {len(MIGRATIONS)}, as a daemon does at start" in done.stderr
    shared = await opened(open_stores, postgres(postgres_dsn))
    (job,), _ = await shared.jobs()
    assert (job.id, job.integration, job.event_id, job.state) == (70, "erp", "evt-7", JobState.PENDING)

    new = tmp_path / "new.db"
    await fill(new)
    with sqlite3.connect(new) as db:
        db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    done = await migrate_in_thread("--from", f"sqlite:{new}", "--to", postgres_dsn, "--schema", "other")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"eventrelay: migrate-store: {new} has schema version {len(MIGRATIONS) + 1}, newer than this eventrelay "
        f"understands ({len(MIGRATIONS)}): upgrade eventrelay or use another file")


async def test_usage_and_connection_errors_never_show_the_password(tmp_path: Path, postgres_dsn: str) -> None:
    path = tmp_path / "single.db"
    await fill(path)
    wrong = postgres_dsn.replace(f":{urlsplit(postgres_dsn).password}@", ":not-the-password-at-all@")
    done = await migrate_in_thread("--from", f"sqlite:{path}", "--to", wrong)
    assert done.returncode == 1
    assert "password authentication failed" in done.stderr
    assert "not-the-password-at-all" not in done.stdout + done.stderr
    for args, complaint in [(("--from", str(path), "--to", postgres_dsn), "write sqlite:PATH"),
                            (("--from", f"sqlite:{path}", "--to", postgres_dsn.replace("postgresql", "mysql")),
                             "write postgresql://"),
                            (("--from", f"sqlite:{path}", "--to", postgres_dsn, "--schema", "Relay"),
                             "must be a lower-case SQL name")]:
        done = await migrate_in_thread(*args)
        assert done.returncode == 2, args
        assert complaint in done.stderr
        assert_no_password(done, postgres_dsn)
    done = await migrate_in_thread("--from", f"sqlite:{tmp_path / 'missing.db'}", "--to", postgres_dsn)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (f"eventrelay: migrate-store: {tmp_path / 'missing.db'} does not exist: "
                                            "give the storage.path of the stopped daemon")
    assert not (tmp_path / "missing.db").exists()
