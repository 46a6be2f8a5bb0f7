"""A store shared by several daemons (PostgreSQL): each test opens several stores on one database, as several
daemons would, and checks what sharing must guarantee: exclusive claims, leases that run out when a daemon
dies, idempotency across daemons, wake-ups from one daemon to the others, and migrations run once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from eventrelay.config import PostgresConfig, StorageConfig
from eventrelay.jobs import AttemptRecord, Job, JobState, Outcome
from eventrelay.store import StoreError, open_store
from eventrelay.store.postgresql.schema import MIGRATIONS

from ..conftest import wait_for, wait_until
from .conftest import FAR, R, Stores, delivered, ev


def failed(job: Job, next_at: float) -> AttemptRecord:
    return AttemptRecord(job, Outcome(job.id, False, 0.01, error="boom"), time.time(), JobState.PENDING, next_at)


def with_lease(stores: Stores, lease: float) -> Stores:
    storage = stores.storage
    assert storage.postgresql is not None
    return Stores(replace(storage, postgresql=replace(storage.postgresql, lease=lease)))


async def test_claims_are_exclusive_across_daemons(daemons: Stores) -> None:
    a, b, c = [await daemons.open() for _ in range(3)]
    await a.ingest([ev(i) for i in range(30)], [R("x")] * 30)
    pages = await asyncio.gather(a.claim("x", FAR, 12), b.claim("x", FAR, 12), c.claim("x", FAR, 12))
    ids = [job.id for page in pages for job in page]
    assert len(ids) == 30 and len(set(ids)) == 30, [len(p) for p in pages]
    # A daemon's own claims stay claimable by it (its dispatcher excludes what it holds), never by another.
    for store, page in zip((a, b, c), pages):
        assert {j.id for j in await store.claim("x", FAR, 50)} == {j.id for j in page}


async def test_an_event_sent_to_two_daemons_at_once_is_stored_once(daemons: Stores) -> None:
    a, b = await daemons.open(), await daemons.open()
    for i in range(20):
        first, second = await asyncio.gather(a.ingest([ev(i)], [R("x")]), b.ingest([ev(i)], [R("x")]))
        assert sorted([first[0].duplicate, second[0].duplicate]) == [False, True], i
        assert first[0].jobs == second[0].jobs == 1
    assert await a.job_counts() == {("x", JobState.PENDING): 20}


async def test_new_jobs_wake_the_other_daemons(daemons: Stores) -> None:
    a, b = await daemons.open(), await daemons.open()
    woken: list[set[str]] = []
    b.on_jobs_added = woken.append
    await b.claim("x", FAR, 1)  # b knows of x; the wake-up comes by NOTIFY all the same
    await asyncio.sleep(0.2)  # b's listener is connected
    await a.ingest([ev(1)], [R("x", "y")])
    await wait_until(lambda: any({"x", "y"} <= names for names in woken), timeout=5)


async def test_a_dead_daemons_jobs_go_to_another_when_its_lease_runs_out(daemons: Stores) -> None:
    short = with_lease(daemons, 1.0)
    a, b = await short.open(), await short.open()
    try:
        await a.ingest([ev(i) for i in range(5)], [R("x")] * 5)
        held = await a.claim("x", FAR, 5)
        assert len(held) == 5 and await b.claim("x", FAR, 5) == []
        # b knows when a's leases run out: it sleeps until then, not until its idle recheck.
        due = await b.next_due("x")
        assert due is not None and time.time() < due < time.time() + 1.5
        a._pool.terminate()  # a dies: no release, no renewal  # noqa: SLF001
        await asyncio.sleep(max(0.0, due - time.time()) + 0.1)
        taken = await b.claim("x", FAR, 5)
        assert sorted(j.id for j in taken) == sorted(j.id for j in held)
        await b.record([delivered(j) for j in taken])
        assert await b.job_counts() == {}
    finally:
        await short.close_all()


async def test_leases_are_renewed_while_a_daemon_holds_jobs(daemons: Stores) -> None:
    short = with_lease(daemons, 1.0)
    a, b = await short.open(), await short.open()
    try:
        await a.ingest([ev(1)], [R("x")])
        (job,) = await a.claim("x", FAR, 1)
        await asyncio.sleep(2.5)  # more than two leases: a renews every third of one
        assert await b.claim("x", FAR, 1) == []
        await a.record([delivered(job)])
        assert (await b.job("x", job.id)).state is JobState.DELIVERED
    finally:
        await short.close_all()


async def test_released_jobs_are_claimable_by_others_at_once(daemons: Stores) -> None:
    a, b = await daemons.open(), await daemons.open()
    await a.ingest([ev(i) for i in range(4)], [R("x")] * 4)
    held = await a.claim("x", FAR, 4)
    await a.release([j.id for j in held[2:]])
    assert sorted(j.id for j in await b.claim("x", FAR, 4)) == sorted(j.id for j in held[2:])


async def test_a_late_outcome_does_not_overwrite_the_daemon_that_took_over(daemons: Stores) -> None:
    short = with_lease(daemons, 1.0)
    a, b = await short.open(), await short.open()
    try:
        await a.ingest([ev(1)], [R("x")])
        (job,) = await a.claim("x", FAR, 1)
        a._held.clear()  # a stalls: it stops renewing  # noqa: SLF001
        await asyncio.sleep(1.2)
        (again,) = await b.claim("x", FAR, 1)
        await b.record([delivered(again)])
        await a.record([failed(job, FAR)])  # a's answer comes late
        view = await b.job("x", job.id)
        assert view is not None and view.state is JobState.DELIVERED
        assert len(await b.attempts(job.id)) == 2  # both attempts are in the log
    finally:
        await short.close_all()


async def test_retry_on_one_daemon_wakes_the_others(daemons: Stores) -> None:
    a, b = await daemons.open(), await daemons.open()
    await a.ingest([ev(1)], [R("x")])
    (job,) = await a.claim("x", FAR, 1)
    await a.record([AttemptRecord(job, Outcome(job.id, False, 0.01, error="no"), time.time(), JobState.DEAD,
                                  None)])
    woken: list[set[str]] = []
    b.on_jobs_added = woken.append
    await asyncio.sleep(0.2)
    assert await a.retry("x", job.id) is JobState.DEAD
    await wait_until(lambda: any("x" in names for names in woken), timeout=5)
    assert [j.id for j in await b.claim("x", time.time() + 1, 1)] == [job.id]


async def test_daemons_starting_together_migrate_once(daemons: Stores) -> None:
    stores = await asyncio.gather(*(daemons.open() for _ in range(4)))
    versions = await stores[0]._pool.fetch("SELECT version FROM eventrelay.schema_version")  # noqa: SLF001
    assert sorted(r[0] for r in versions) == list(range(1, len(MIGRATIONS) + 1))


async def test_a_schema_newer_than_this_eventrelay_is_refused(daemons: Stores) -> None:
    store = await daemons.open()
    await store._pool.execute("INSERT INTO eventrelay.schema_version VALUES (999)")  # noqa: SLF001
    with pytest.raises(StoreError, match="version 999, newer than this eventrelay understands"):
        await open_store(daemons.storage)


async def test_a_refused_login_is_a_clear_error_without_the_password(postgres_cluster, tmp_path) -> None:
    dsn = postgres_cluster.dsn(password="wrong-Secret-123")
    storage = StorageConfig(tmp_path / "x", backend="postgresql", postgresql=PostgresConfig(dsn=dsn))
    with pytest.raises(StoreError) as refused:
        await asyncio.wait_for(open_store(storage), 20)
    assert "password" in str(refused.value) and "wrong-Secret-123" not in str(refused.value)
    missing = StorageConfig(tmp_path / "x", backend="postgresql",
                            postgresql=PostgresConfig(dsn=postgres_cluster.dsn(database="no_such_db")))
    with pytest.raises(StoreError, match="no_such_db"):
        await asyncio.wait_for(open_store(missing), 20)
    assert postgres_cluster.password not in str(refused.value)


async def test_an_unreachable_database_is_waited_for(postgres_cluster, tmp_path, caplog) -> None:
    from bench.services import free_port

    dsn = postgres_cluster.dsn().replace(f":{postgres_cluster.port}/", f":{free_port()}/")
    storage = StorageConfig(tmp_path / "x", backend="postgresql", postgresql=PostgresConfig(dsn=dsn))
    opening = asyncio.ensure_future(open_store(storage))
    await asyncio.sleep(2.0)
    assert not opening.done()  # still trying, not failed
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening


async def test_each_daemon_sees_the_live_daemons_and_what_they_run(daemons: Stores) -> None:
    a, b = await daemons.open(), await daemons.open()
    a.announce("1.0", "aaaa")
    b.announce("1.0", "bbbb")
    seen = await wait_for(lambda: a.daemons(), lambda views: len(views) == 2, timeout=10)
    assert [v.id for v in seen] == [a.id, b.id] and {v.config_hash for v in seen} == {"aaaa", "bbbb"}
    assert all(v.version == "1.0" and v.last_seen > time.time() - 10 for v in seen)
    b.announce("1.0", "aaaa")  # a reload: the news goes at once, not at the next heartbeat
    await wait_for(lambda: a.daemons(), lambda views: {v.config_hash for v in views} == {"aaaa"}, timeout=3)
    await daemons.close(b)  # a daemon that stops says so
    assert [v.id for v in await a.daemons()] == [a.id]
