"""The SQLite store on its own: schema, group commit, duplicates, claims, outcomes, the lock."""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventrelay.events import Event, parse_event
from eventrelay.jobs import AttemptRecord, JobState, Outcome
from eventrelay.store import MIGRATIONS, Store, StoreError
from eventrelay.writer import WireReader, wire_dumps


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "s.db")
    writer = asyncio.create_task(s.run_writer())
    yield s
    s.stop_writer()
    await writer
    await s.close()


def R(*names: str) -> tuple[tuple[str, None], ...]:
    """Routes to these integrations, without ordering keys."""
    return tuple((name, None) for name in names)


def ev(i: int | str | None = None, type_: str = "order.paid"):
    obj = {"type": type_, "data": {"id": str(i)}}
    if i is not None:
        obj["id"] = f"evt-{i}"
    return parse_event(obj)


async def test_schema_is_versioned_and_reopening_is_harmless(tmp_path: Path) -> None:
    s = await Store.open(tmp_path / "v.db")
    await s.close()
    s = await Store.open(tmp_path / "v.db")
    await s.close()
    with sqlite3.connect(tmp_path / "v.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this eventrelay understands"):
        await Store.open(tmp_path / "v.db")


async def test_statements_sqlite_cannot_compile_stop_the_start_up(tmp_path: Path) -> None:
    # What a SQLite without the JSON functions sees (its trigger calls a function it does not have): the
    # start-up must say so, not accept the first event and fail it.
    s = await Store.open(tmp_path / "v.db")
    await s.close()
    with sqlite3.connect(tmp_path / "v.db") as db:
        db.executescript("DROP TRIGGER ingest_insert; CREATE TRIGGER ingest_insert INSTEAD OF INSERT ON ingest "
                         "BEGIN INSERT INTO events (id) SELECT no_such_function(NEW.routes); END;")
    with pytest.raises(StoreError, match="cannot run eventrelay's statements: no such function: no_such_function"):
        await Store.open(tmp_path / "v.db")
    with sqlite3.connect(tmp_path / "v.db") as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)
    with open(tmp_path / "v.db.lock", "rb") as lock:  # the refused store let go of its lock
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


async def test_a_second_process_cannot_open_the_same_database(store: Store) -> None:
    with pytest.raises(StoreError, match="in use by another eventrelay process"):
        await Store.open(store.path)


async def test_concurrent_ingests_share_commits(store: Store) -> None:
    results = await asyncio.gather(*(store.ingest([ev(i)], [R("a", "b")]) for i in range(300)))
    assert [r[0].id for r in results] == [f"evt-{i}" for i in range(300)]
    assert all(r[0].jobs == 2 and not r[0].duplicate for r in results)
    assert store.commits < 300 / 5, f"{store.commits} commits for 300 concurrent ingests: no group commit"
    counts = await store.job_counts()
    assert counts == {("a", "pending"): 300, ("b", "pending"): 300}


class _CountingTransport:
    """The store's transport to its writer, counting the frames written through it."""

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self._transport.write(data)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


async def test_single_events_queued_in_one_turn_go_to_an_idle_writer_in_one_frame(store: Store) -> None:
    """Not the first alone and the rest after it: a commit of one event costs the writer a wake-up and an
    fsync, which single-event producers would pay for every few events (store._EARLY_ROWS)."""
    counting = store._transport = _CountingTransport(store._transport)
    results = await asyncio.gather(*(store.ingest([ev(i)], [R("a")]) for i in range(10)))
    assert [r[0].id for r in results] == [f"evt-{i}" for i in range(10)]
    assert counting.writes == 1


async def test_duplicates_across_and_within_transactions(store: Store) -> None:
    first = await store.ingest([ev(1), ev(2)], [R("a"), R("a", "b")])
    assert [(a.jobs, a.duplicate) for a in first] == [(1, False), (2, False)]
    again = await store.ingest([ev(2), ev(3), ev(3)], [R("a"), R("a"), R("a")])
    assert [(a.id, a.jobs, a.duplicate) for a in again] == [("evt-2", 2, True), ("evt-3", 1, False),
                                                             ("evt-3", 1, True)]
    assert sum((await store.job_counts()).values()) == 4
    # Events without a producer id are never duplicates of one another.
    anon = await store.ingest([ev(None), ev(None)], [R(), R()])
    assert anon[0].id != anon[1].id and not any(a.duplicate for a in anon)


async def test_claim_pages_oldest_first_and_skips_in_flight(store: Store) -> None:
    await store.ingest([ev(i) for i in range(10)], [R("a")] * 10)
    await store.ingest([ev(99)], [R("b")])
    now = 10**10
    page = await store.claim("a", now, limit=4)
    assert [j.event_id for j in page] == [f"evt-{i}" for i in range(4)]
    assert all(j.attempt == 1 and j.integration == "a" for j in page)
    nxt = await store.claim("a", now, limit=4, exclude=[j.id for j in page])
    assert [j.event_id for j in nxt] == [f"evt-{i}" for i in range(4, 8)]
    assert await store.claim("a", 0, limit=4) == []  # nothing is due before it was accepted


async def test_claims_hold_no_read_open_and_a_failed_one_says_why(store: Store, tmp_path: Path) -> None:
    # Claims read through a connection of the event loop's own: a read left open there would hold back
    # every checkpoint, and the write-ahead log would grow without end.
    await store.ingest([ev(i) for i in range(10)], [R("a")] * 10)
    assert len(await store.claim("a", 10**10, limit=4)) == 4  # fewer than are due
    assert await store.next_due("a") is not None
    raw = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    busy, _, _ = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0
    # A read that fails must reach the dispatcher as a StoreError (it pauses and retries), not as whatever
    # sqlite3 raised, which would end it.
    raw.execute("ALTER TABLE jobs RENAME TO jobs_elsewhere")
    raw.close()
    with pytest.raises(StoreError, match=r"cannot read due jobs from .*s\.db: no such table: jobs"):
        await store.claim("a", 10**10, limit=4)
    with pytest.raises(StoreError, match="no such table: jobs"):
        await store.next_due("a")


async def test_a_claimed_job_carries_what_was_stored_exactly(store: Store, tmp_path: Path) -> None:
    # Strings with quotes, escapes, NULs and non-ASCII, big integers, and the acceptance time must come back
    # from a claim unchanged.
    data = {"id": "1", "note": 'quote " backslash \\ nul \u0000 tab \t é 😀', "big": 2**70, "neg": -1.5e-300}
    await store.ingest([parse_event({"id": "odd", "type": "order.paid", "data": data})], [R("a")])
    await store.ingest([ev(2), ev(3)], [R("a"), R("a")])
    raw = sqlite3.connect(tmp_path / "s.db")
    stored = dict(raw.execute("SELECT id, accepted_at FROM events").fetchall())
    payload = raw.execute("SELECT payload FROM events WHERE id = 'odd'").fetchone()[0]
    raw.execute("UPDATE jobs SET next_at = next_at - 100 WHERE event_seq = (SELECT seq FROM events WHERE id = 'evt-3')")
    raw.commit()
    raw.close()
    page = await store.claim("a", 10**10, limit=10)
    assert [j.event_id for j in page] == ["evt-3", "odd", "evt-2"]  # due first, then by job id
    odd = page[1]
    assert odd.payload == payload and odd.event_type == "order.paid"
    assert all(j.accepted_at == j.age_from == stored[j.event_id] for j in page)


def test_the_wire_to_the_writer_keeps_every_value_and_frames_split_anywhere() -> None:
    # What the socket to the writer carries: event payloads (JSON text), a receiver's answer with a lone
    # surrogate, integers beyond 64 bits, floats, None, nested lists. Sent in one piece, byte by byte, and
    # cut at every place of a two-frame stream, each frame comes out once, whole and equal.
    values = [
        [[1, "ingest", [["evt-1", "order.paid", '{"data":{"q":"\\"x\\""}}', True, [("a", None), ("b", "k")]]]]],
        ["done", [1, 2], [None, 7], ["a"], 0.00125, None, None],
        ["done", [3], None, [], 1e-300, "bad \udcff body", str(2**70)],
        [2**70, -(2**80), "", "é 😀 \x00", [[], [[]]]],
    ]
    stream = b"".join(wire_dumps(v) for v in values)
    assert WireReader().feed(stream) == values
    reader = WireReader()
    assert [v for byte in range(len(stream)) for v in reader.feed(stream[byte:byte + 1])] == values
    two = wire_dumps(values[0]) + wire_dumps(values[2])
    for cut in range(len(two) + 1):
        reader = WireReader()
        assert reader.feed(two[:cut]) + reader.feed(two[cut:]) == [values[0], values[2]]
    assert WireReader().feed(two[:-1]) == [values[0]]  # an unfinished frame waits for its end


async def test_outcomes_move_jobs_and_log_attempts(store: Store) -> None:
    await store.ingest([ev(1), ev(2), ev(3)], [R("a")] * 3)
    j1, j2, j3 = await store.claim("a", 10**10, limit=3)
    await store.record([
        AttemptRecord(j1, Outcome(j1.id, True, 0.01, status_code=200, body="ok"), 1.0, JobState.DELIVERED, None),
        AttemptRecord(j2, Outcome(j2.id, False, 0.02, status_code=500, error="boom"), 1.0, JobState.PENDING,
                      10**9 * 5.0),
        AttemptRecord(j3, Outcome(j3.id, False, 0.03, error="never"), 1.0, JobState.DEAD, None),
    ])
    assert await store.job_counts() == {("a", "pending"): 1, ("a", "dead"): 1}  # delivered are not counted
    assert await store.claim("a", 10**9 * 4.0, limit=5) == []  # j2 is not due before its retry time
    (again,) = await store.claim("a", 10**10, limit=5)
    assert again.id == j2.id and again.attempt == 2
    assert await store.next_due("a") == 10**9 * 5.0
    log = await store.attempts(j2.id)
    assert [(a["attempt"], a["succeeded"], a["status_code"], a["error_detail"]) for a in log] == [
        (1, False, 500, "boom")]


async def test_outcomes_queued_while_the_writer_commits_all_go_in_its_next_transactions(store: Store) -> None:
    await store.ingest([ev(i) for i in range(200)], [R("a")] * 200)
    jobs = await store.claim("a", 10**10, limit=200)
    busy = store.ingest([ev(1000)], [R("b")])  # the writer has something of ours to commit
    written = []
    for job in jobs:  # one outcome per turn of the loop, as deliveries end
        written.append(store.record_later([AttemptRecord(job, Outcome(job.id, True, 0.01), 1.0,
                                                         JobState.DELIVERED, None)]))
        await asyncio.sleep(0)
    commits = store.commits
    async with asyncio.timeout(10):  # nothing else happens: the writer's answers alone must send them all
        await asyncio.gather(busy, *written)
    assert await store.job_counts() == {("b", "pending"): 1}
    # Grouped into the writer's transactions, not committed one per turn.
    assert store.commits - commits < 200 / 5, f"{store.commits - commits} commits for 200 outcomes"


async def test_a_failed_write_stores_nothing_and_says_why(store: Store, tmp_path: Path) -> None:
    await store.ingest([ev(1)], [R("a")])
    # Make the next write impossible: a trigger that aborts every insert into jobs.
    with sqlite3.connect(store.path) as db:
        db.execute("CREATE TRIGGER no_jobs BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'no room'); END")
    with pytest.raises(StoreError, match="no room"):
        await store.ingest([ev(2), ev(3)], [R("a"), R("a")])
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT id FROM events ORDER BY seq").fetchall() == [("evt-1",)]
        db.execute("DROP TRIGGER no_jobs")
    # The store carries on, and ids are not burnt by the failed attempt.
    (accepted,) = await store.ingest([ev(2)], [R("a")])
    assert accepted.jobs == 1 and not accepted.duplicate


async def finish(store: Store, state: JobState, n: int) -> list:
    jobs = await store.claim("a", 10**10, limit=n)
    await store.record([AttemptRecord(j, Outcome(j.id, state is JobState.DELIVERED, 0.01), 1.0, state, None)
                        for j in jobs])
    return jobs


async def test_retry_and_replay(store: Store) -> None:
    await store.ingest([ev(i) for i in range(6)], [R("a")] * 6)
    dead = await finish(store, JobState.DEAD, 2)
    delivered = await finish(store, JobState.DELIVERED, 2)
    assert await store.retry("a", dead[0].id) == "dead"
    assert await store.retry("a", delivered[0].id) == "delivered"  # refused: replay is for that
    assert await store.retry("b", dead[1].id) is None and await store.retry("a", 999) is None
    counts = await store.job_counts()
    assert counts == {("a", "pending"): 3, ("a", "dead"): 1}
    (again,) = [j for j in await store.claim("a", 10**10, limit=10) if j.id == dead[0].id]
    assert again.attempt == 2 and again.age_from > again.accepted_at - 1  # a fresh max_age window

    assert await store.replay("a", dead=True) == 1
    assert await store.replay("a", dead=True) == 0
    # A time range re-queues delivered jobs too; pending ones are left alone.
    assert await store.replay("a", since=0, until=10**10, limit=1) == 1
    assert await store.replay("a", since=0, until=10**10) == 1
    assert await store.job_counts() == {("a", "pending"): 6}


async def test_pruning_removes_only_what_retention_allows(store: Store) -> None:
    await store.ingest([ev(i) for i in range(5)], [R("a")] * 4 + [R()])
    await finish(store, JobState.DELIVERED, 2)
    await finish(store, JobState.DEAD, 1)
    # Nothing is old enough yet.
    assert await store.prune(delivered_before=0, dead_before=0) == 0
    total = 0
    while (n := await store.prune(delivered_before=10**10, dead_before=0, batch=1)) > 0:
        total += n
    with sqlite3.connect(store.path) as db:
        states = db.execute("SELECT state FROM jobs ORDER BY id").fetchall()
        events = {r[0] for r in db.execute("SELECT id FROM events")}
        attempts = db.execute("SELECT count(*) FROM attempts").fetchone()[0]
    assert states == [("dead",), ("pending",)]
    assert events == {"evt-2", "evt-3"}  # delivered ones and the event nobody observed are gone
    assert attempts == 1  # the dead job's attempt stays with it
    assert await store.prune(delivered_before=10**10, dead_before=10**10) > 0
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT state FROM jobs").fetchall() == [("pending",)]
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0] + "\nPRAGMA user_version=1;")
        db.execute("INSERT INTO events VALUES (1, 'old', 'order.paid', '{\"data\":{}}', 1.0)")
        db.execute("INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at) "
                   "VALUES (1, 1, 'a', 1.0, 1.0, 1.0)")
    s = await Store.open(path)
    try:
        (job,) = await s.claim("a", 10.0, limit=5)
        assert (job.event_id, job.age_from) == ("old", 1.0)
    finally:
        await s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


async def test_a_replay_in_batches_skips_what_it_already_requeued(store: Store) -> None:
    import time as _time

    await store.ingest([ev(i) for i in range(5)], [R("a")] * 5)
    await finish(store, JobState.DELIVERED, 5)
    started = _time.time()
    assert await store.replay("a", since=0, until=10**10, not_requeued_since=started, limit=3) == 3
    await finish(store, JobState.DELIVERED, 3)  # delivered again before the next batch
    assert await store.replay("a", since=0, until=10**10, not_requeued_since=started, limit=3) == 2
    await finish(store, JobState.DELIVERED, 2)
    assert await store.replay("a", since=0, until=10**10, not_requeued_since=started, limit=3) == 0


async def test_pruning_gives_the_freed_pages_back_to_the_file_system(store: Store) -> None:
    big = [Event(f"big-{i}", "order.paid", {"blob": "x" * 4000}, None, True, '{"data":{"blob":"' + "x" * 4000 + '"}}')
           for i in range(600)]
    await store.ingest(big, [R()] * len(big))  # observed by nobody: pruned by age alone
    with sqlite3.connect(store.path) as db:
        pages_before = db.execute("PRAGMA page_count").fetchone()[0]
    while await store.prune(delivered_before=10**10, dead_before=10**10, batch=1000) > 0:
        pass
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0
        pages_after = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
    # 600 events of 4 KB took some 600+ pages; the file shrinks back rather than keeping them on a free list.
    assert pages_before > 600 and pages_after < 100 and free < 50, (pages_before, pages_after, free)
