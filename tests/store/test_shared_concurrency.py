"""A store shared by several daemons, under concurrency: what a review of the PostgreSQL engine found, each
shown with the real database (pruning against a re-queue, lock order, the same ids from two daemons, ordering
within a request and behind another daemon's head, wake-ups, a lost listening connection)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

import asyncpg
import pytest

from eventrelay.jobs import AttemptRecord, JobState, Outcome

from ..conftest import wait_until
from .conftest import FAR, Stores, delivered, ev

_WAIT = 10.0  # seconds any wait for the database may take, at most


def dead(job):
    return AttemptRecord(job, Outcome(job.id, False, 0.01, error="no"), time.time(), JobState.DEAD, None)


def _dsn(stores: Stores) -> str:
    assert stores.storage.postgresql is not None
    return stores.storage.postgresql.dsn


async def _lock_waiters(db: asyncpg.Connection, at_least: int) -> None:
    """Wait until `at_least` other backends of this database wait on a lock."""
    async def waiting() -> bool:
        n = await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                              "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
        return n >= at_least
    await wait_until(waiting, timeout=_WAIT)


# -- retention pruning against a concurrent retry or replay -----------------------------------------------------

@pytest.mark.parametrize("action", ["retry", "replay"])
async def test_prune_does_not_delete_a_job_requeued_by_a_concurrent_retry_or_replay(daemons: Stores,
                                                                                      action: str) -> None:
    a = await daemons.open()
    await a.ingest([ev(1)], [[("x", None)]])
    (job,) = await a.claim("x", FAR, 1)
    await a.record([dead(job) if action == "retry" else delivered(job)])
    db = await asyncpg.connect(_dsn(daemons))
    try:
        # Another daemon's admin write, caught between its UPDATE and its COMMIT.
        tx = db.transaction()
        await tx.start()
        if action == "retry":
            assert await db.fetchval(a._sql.retry, job.id, "x", time.time()) == "dead"  # noqa: SLF001
        else:
            assert await db.execute(a._sql.replay_range, "x", time.time(), 1e18, 10,  # noqa: SLF001
                                    0.0, 1e18) == "UPDATE 1"
        later = time.time() + 3600  # everything finished is past retention
        pruning = asyncio.create_task(a.prune(later, later))
        await _lock_waiters(db, 1)  # the prune waits for the row
        await tx.commit()
        await asyncio.wait_for(pruning, _WAIT)
    finally:
        await db.close()
    view = await a.job("x", job.id)
    assert view is not None and view.state is JobState.PENDING, f"the re-queued job was pruned: {view}"


# -- lock order: the outcome statement against the lease renewal --------------------------------------------------

async def test_an_outcome_commit_and_a_lease_renewal_do_not_deadlock(daemons: Stores) -> None:
    a = await daemons.open()
    await a.ingest([ev(i) for i in range(3)], [[("x", None)]] * 3)
    jobs = sorted(await a.claim("x", FAR, 3), key=lambda j: j.id)
    ids = [j.id for j in jobs]
    # The renewal below stands for the store's own, every third of a lease; that one is kept out of the way
    # so that the order of events is the test's (left running, it deadlocks in the same way on its own).
    a._held.clear()  # noqa: SLF001
    db = await asyncpg.connect(_dsn(daemons))
    try:
        # Some other transaction (an operator's retry on another daemon: SELECT … FOR UPDATE) holds the middle job
        # for a moment, while this daemon commits outcomes (in the order they came: highest id first) and renews
        # its leases (in id order).
        tx = db.transaction()
        await tx.start()
        await db.execute("SELECT 1 FROM eventrelay.jobs WHERE id = $1 FOR UPDATE", ids[1])
        recording = asyncio.ensure_future(a.record([delivered(j) for j in reversed(jobs)]))
        await _lock_waiters(db, 1)
        renewing = asyncio.ensure_future(a._pool.execute(a._sql.renew, ids, a.me, 5.0))  # noqa: SLF001
        await asyncio.sleep(0.3)  # the renewal takes the first job and waits too
        await tx.commit()
        results = await asyncio.wait_for(asyncio.gather(recording, renewing, return_exceptions=True), _WAIT)
    finally:
        await db.close()
    assert not any(isinstance(r, BaseException) for r in results), results


# -- idempotency across daemons: the same events in another order -------------------------------------------------

async def test_two_daemons_ingesting_the_same_ids_in_different_orders_do_not_deadlock(daemons: Stores) -> None:
    a, b = await daemons.open(), await daemons.open()
    db = await asyncpg.connect(_dsn(daemons))
    try:
        # A third ingest holds evt-w uncommitted while a and b each insert their first event and wait for evt-w.
        tx = db.transaction()
        await tx.start()
        await db.execute("INSERT INTO eventrelay.events (id, type, payload, accepted_at) "
                         "VALUES ('evt-w', 't', '{}', 0)")
        first = asyncio.ensure_future(a.ingest([ev("x"), ev("w"), ev("y")], [[("q", None)]] * 3))
        await _lock_waiters(db, 1)
        second = asyncio.ensure_future(b.ingest([ev("y"), ev("w"), ev("x")], [[("q", None)]] * 3))
        await _lock_waiters(db, 2)
        await tx.rollback()  # that producer's request failed; a and b go on
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), _WAIT)
    finally:
        await db.close()
    assert not any(isinstance(r, BaseException) for r in results), results


# -- per-resource ordering: jobs are ordered as their events were accepted ------------------------------------------

async def test_ordered_jobs_of_one_request_go_in_the_order_sent(daemons: Stores) -> None:
    a = await daemons.open()
    # evt-9 is sent before evt-10; as text, "evt-10" < "evt-9".
    await a.ingest([ev(9), ev(10)], [[("x", "k")], [("x", "k")]])
    (head,) = await a.claim("x", FAR, 10, ordered=True)
    assert head.event_id == "evt-9", f"{head.event_id} is handed out first, before the event sent before it"


# -- a daemon waiting on a key's head that another daemon holds ---------------------------------------------------

async def test_a_key_blocked_behind_another_daemons_head_is_not_due_now(daemons: Stores) -> None:
    a, b = await daemons.open(), await daemons.open()
    await a.ingest([ev(1), ev(2)], [[("x", "k")], [("x", "k")]])
    (head,) = await a.claim("x", FAR, 10, ordered=True)
    assert await b.claim("x", time.time(), 10, ordered=True) == []
    due = await b.next_due("x", ordered=True)
    # The dispatcher sleeps max(0, due - now) before claiming again: a due time in the past makes it claim and
    # ask again without a pause for as long as a delivers its head.
    assert due is None or due > time.time(), f"b is told a job is due now ({due - time.time():.3f} s) it cannot claim"


# -- wake-ups ---------------------------------------------------------------------------------------------------

async def test_jobs_a_stopping_daemon_hands_back_wake_the_others(daemons: Stores) -> None:
    a, b = await daemons.open(), await daemons.open()
    assert await b.claim("x", FAR, 1) == []  # b delivers x and waits for news of it
    await a.ingest([ev(i) for i in range(3)], [[("x", None)]] * 3)
    held = await a.claim("x", FAR, 3)
    await asyncio.sleep(0.5)  # the NOTIFY of the ingest has come and gone
    woken: list[set[str]] = []
    b.on_jobs_added = woken.append
    await a.release([j.id for j in held])
    # Without news b sleeps until a's leases would have run out (up to `lease`) or its idle recheck (30 s).
    await asyncio.sleep(2.0)
    assert any("x" in names for names in woken), "b was not told that jobs are claimable again"


async def test_an_event_for_many_integrations_can_be_stored_and_wakes_the_others(daemons: Stores) -> None:
    a, b = await daemons.open(), await daemons.open()
    names = [f"integration-{i:03d}-" + "n" * 48 for i in range(140)]  # 64-character names, allowed by config
    assert await b.claim(names[-1], FAR, 1) == []  # b delivers that one
    woken: list[set[str]] = []
    b.on_jobs_added = woken.append
    await asyncio.sleep(0.3)  # b's listener is connected
    # The names of the integrations with new jobs are more than a NOTIFY can carry (8000 bytes).
    (accepted,) = await a.ingest([ev(1)], [[(n, None) for n in names]])
    assert accepted.jobs == 140
    await wait_until(lambda: any(names[-1] in w for w in woken), timeout=5)


# -- the wake-up listener --------------------------------------------------------------------------------------

class _CuttingProxy:
    """A TCP proxy on 127.0.0.1 to the database that drops any connection whose client sends `cut`."""

    def __init__(self, port: int, cut: bytes):
        self._port, self._cut = port, cut
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.cuts = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, inspect: bool) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    if inspect and self._cut in data:
                        self.cuts += 1
                        break
                    dst.write(data)
                    await dst.drain()
            writer.close()
            up_writer.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self._writers.difference_update((writer, up_writer))


async def test_a_connection_lost_while_starting_to_listen_does_not_stop_the_store(postgres_dsn, tmp_path) -> None:
    from eventrelay.config import PostgresConfig, StorageConfig

    parts = urlsplit(postgres_dsn)
    proxy = _CuttingProxy(parts.port, b"LISTEN")
    port = await proxy.start()
    dsn = postgres_dsn.replace(f":{parts.port}/", f":{port}/")
    stores = Stores(StorageConfig(tmp_path / "unused.db", backend="postgresql",
                                  postgresql=PostgresConfig(dsn=dsn, pool=2, lease=5.0)))
    try:
        store = await stores.open()
        ((_, running),) = stores._open  # noqa: SLF001
        await wait_until(lambda: proxy.cuts >= 1, timeout=_WAIT)
        await asyncio.sleep(1.0)
        assert not running.done(), f"the store stopped: {running.exception()!r}"
        await store.ingest([ev(1)], [[("x", None)]])  # and it still stores events
    finally:
        with contextlib.suppress(BaseException):
            await stores.close_all()
        for s, task in list(stores._open):  # noqa: SLF001
            task.cancel()
        await proxy.close()
