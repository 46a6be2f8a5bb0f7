"""What only the SQLite engine does: the file (schema versions, migrations, the lock, WAL, vacuum), the writer
process and the wire to it, group commit's batching, and failures injected into the database."""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import marshal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventrelay.events import Event, parse_event
from eventrelay.jobs import AttemptRecord, Job, JobState, Outcome
from eventrelay.store import Store, StoreError
from eventrelay.store.sqlite import wire
from eventrelay.store.sqlite.engine import SqliteStore
from eventrelay.store.sqlite.schema import MIGRATIONS
from eventrelay.store.rows import EventRow, event_rows
from eventrelay.store.sqlite.wire import FrameReader, Op, OutcomeRow, Replay, dumps

from .conftest import FAR, R, ev

@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "s.db")
    writer = asyncio.create_task(s.run())
    yield s
    s.stop()
    await writer
    await s.close()


def delivered(job: Job) -> AttemptRecord:
    return AttemptRecord(job, Outcome(job.id, True, 0.01), 1.0, JobState.DELIVERED, None)


def test_the_engine_implements_every_operation_of_the_api_as_documented() -> None:
    operations = {name: member for name, member in vars(Store).items() if inspect.isfunction(member)
                  and not name.startswith("_")}
    assert {"ingest", "claim", "record_later", "retry", "replay", "prune", "run", "stop"} <= set(operations)
    for name, documented in operations.items():
        implemented = getattr(SqliteStore, name)
        assert inspect.iscoroutinefunction(implemented) == inspect.iscoroutinefunction(documented), name
        assert [(p.name, p.kind, p.default) for p in inspect.signature(implemented).parameters.values()] == [
            (p.name, p.kind, p.default) for p in inspect.signature(documented).parameters.values()], name
    loop = asyncio.new_event_loop()
    try:
        unopened = SqliteStore(Path("unused.db"), -1, loop)
        assert all(hasattr(unopened, attribute) for attribute in Store.__annotations__), Store.__annotations__
    finally:
        loop.close()


# -- the file --------------------------------------------------------------------------------------------------

async def test_schema_is_versioned_and_reopening_is_harmless(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "v.db")
    await s.close()
    s = await SqliteStore.open(tmp_path / "v.db")
    await s.close()
    with sqlite3.connect(tmp_path / "v.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this eventrelay understands"):
        await SqliteStore.open(tmp_path / "v.db")


async def test_statements_sqlite_cannot_compile_stop_the_start_up(tmp_path: Path) -> None:
    # What a SQLite without the JSON functions sees (its trigger calls a function it does not have): the
    # start-up must say so, not accept the first event and fail it.
    s = await SqliteStore.open(tmp_path / "v.db")
    await s.close()
    with sqlite3.connect(tmp_path / "v.db") as db:
        db.executescript("DROP TRIGGER ingest_insert; CREATE TRIGGER ingest_insert INSTEAD OF INSERT ON ingest "
                         "BEGIN INSERT INTO events (id) SELECT no_such_function(NEW.routes); END;")
    with pytest.raises(StoreError, match="cannot run eventrelay's statements: no such function: no_such_function"):
        await SqliteStore.open(tmp_path / "v.db")
    with sqlite3.connect(tmp_path / "v.db") as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)
    with open(tmp_path / "v.db.lock", "rb") as lock:  # the refused store let go of its lock
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


async def test_a_second_process_cannot_open_the_same_database(store: SqliteStore) -> None:
    with pytest.raises(StoreError, match="in use by another eventrelay process"):
        await SqliteStore.open(store.path)


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0] + "\nPRAGMA user_version=1;")
        db.execute("INSERT INTO events VALUES (1, 'old', 'order.paid', '{\"data\":{}}', 1.0)")
        db.execute("INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at) "
                   "VALUES (1, 1, 'a', 1.0, 1.0, 1.0)")
    s = await SqliteStore.open(path)
    try:
        (job,) = await s.claim("a", 10.0, limit=5)
        assert (job.event_id, job.age_from) == ("old", 1.0)
    finally:
        await s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


async def test_pruning_gives_the_freed_pages_back_to_the_file_system(store: SqliteStore) -> None:
    big = [Event(f"big-{i}", "order.paid", {"blob": "x" * 4000}, None, True, '{"data":{"blob":"' + "x" * 4000 + '"}}')
           for i in range(600)]
    await store.ingest(big, [R()] * len(big))  # observed by nobody: pruned by age alone
    with sqlite3.connect(store.path) as db:
        pages_before = db.execute("PRAGMA page_count").fetchone()[0]
    while await store.prune(delivered_before=FAR, dead_before=FAR, batch=1000) > 0:
        pass
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0
        pages_after = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    # 600 events of 4 KB took some 600+ pages; the file shrinks back rather than keeping them on a free list.
    assert pages_before > 600 and pages_after < 100 and free < 50, (pages_before, pages_after, free)


# -- reads beside the writer ---------------------------------------------------------------------------------------

async def test_claims_hold_no_read_open_and_a_failed_one_says_why(store: SqliteStore, tmp_path: Path) -> None:
    # Claims read through a connection of the event loop's own: a read left open there would hold back
    # every checkpoint, and the write-ahead log would grow without end.
    await store.ingest([ev(i) for i in range(10)], [R("a")] * 10)
    assert len(await store.claim("a", FAR, limit=4)) == 4  # fewer than are due
    assert await store.next_due("a") is not None
    raw = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    busy, _, _ = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0
    # A read that fails must reach the dispatcher as a StoreError (it pauses and retries), not as whatever
    # sqlite3 raised, which would end it.
    raw.execute("ALTER TABLE jobs RENAME TO jobs_elsewhere")
    raw.close()
    with pytest.raises(StoreError, match=r"cannot read due jobs from .*s\.db: no such table: jobs"):
        await store.claim("a", FAR, limit=4)
    with pytest.raises(StoreError, match="no such table: jobs"):
        await store.next_due("a")
    with pytest.raises(StoreError, match=r"the database .*s\.db could not be read: no such table"):
        await store.jobs("a")


async def test_a_failed_write_stores_nothing_and_says_why(store: SqliteStore) -> None:
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
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT seq, id FROM events ORDER BY seq").fetchall() == [(1, "evt-1"), (2, "evt-2")]


# -- group commit: how operations reach the writer --------------------------------------------------------------

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


async def test_single_events_queued_in_one_turn_go_to_an_idle_writer_in_one_frame(store: SqliteStore) -> None:
    """Not the first alone and the rest after it: a commit of one event costs the writer a wake-up and an
    fsync, which single-event producers would pay for every few events (engine._EARLY_ROWS)."""
    counting = store._transport = _CountingTransport(store._transport)
    results = await asyncio.gather(*(store.ingest([ev(i)], [R("a")]) for i in range(10)))
    assert [r[0].id for r in results] == [f"evt-{i}" for i in range(10)]
    assert counting.writes == 1


async def test_outcomes_queued_while_the_writer_commits_all_go_in_its_next_transactions(store: SqliteStore) -> None:
    await store.ingest([ev(i) for i in range(200)], [R("a")] * 200)
    jobs = await store.claim("a", FAR, limit=200)
    busy = store.ingest([ev(1000)], [R("b")])  # the writer has something of ours to commit
    written = []
    for job in jobs:  # one outcome per turn of the loop, as deliveries end
        written.append(store.record_later([delivered(job)]))
        await asyncio.sleep(0)
    commits = store.commits
    async with asyncio.timeout(10):  # nothing else happens: the writer's answers alone must send them all
        await asyncio.gather(busy, *written)
    assert await store.job_counts() == {("b", "pending"): 1}
    # Grouped into the writer's transactions, not committed one per turn.
    assert store.commits - commits < 200 / 5, f"{store.commits - commits} commits for 200 outcomes"


# -- the wire -------------------------------------------------------------------------------------------------------

def test_the_wire_to_the_writer_keeps_every_value_and_frames_split_anywhere() -> None:
    # What the socket to the writer carries: event payloads (JSON text), a receiver's answer with a lone
    # surrogate, integers beyond 64 bits, floats, None, nested tuples and lists. Sent in one piece, byte by
    # byte, and cut at every place of a two-frame stream, each frame comes out once, whole and equal.
    values = [
        [(1, Op.INGEST.value, [("evt-1", "order.paid", '{"data":{"q":"\\"x\\""}}', True, [("a", None), ("b", "k")])])],
        (4, [1, 2], [None, 7], ["a"], 0.00125, None, None),
        (4, [3], None, [], 1e-300, "bad \udcff body", str(2**70)),
        [2**70, -(2**80), "", "é 😀 \x00", [[], [[]]]],
    ]
    stream = b"".join(dumps(v) for v in values)
    assert FrameReader().feed(stream) == values
    reader = FrameReader()
    assert [v for byte in range(len(stream)) for v in reader.feed(stream[byte:byte + 1])] == values
    two = dumps(values[0]) + dumps(values[2])
    for cut in range(len(two) + 1):
        reader = FrameReader()
        assert reader.feed(two[:cut]) + reader.feed(two[cut:]) == [values[0], values[2]]
    assert FrameReader().feed(two[:-1]) == [values[0]]  # an unfinished frame waits for its end


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_records_cross_as_plain_tuples_and_get_their_names_back() -> None:
    # marshal refuses NamedTuples and enum members: the wire carries plain tuples and ints, in the order of
    # the NamedTuples that name them.
    with pytest.raises(ValueError):
        marshal.dumps(Replay("a", True, None, None, None, 10))
    with pytest.raises(ValueError):
        marshal.dumps(Op.RETRY)
    event = parse_event({"id": "e1", "type": "order.paid", "data": {}, "traceparent": TRACEPARENT})
    (row,) = event_rows([event], [[("a", "k")]])
    assert type(row) is tuple and EventRow._make(row) == EventRow("e1", "order.paid", event.payload, True,
                                                                   [("a", "k")], TRACEPARENT, None)
    job = Job(7, "a", 2, "e1", "order.paid", event.payload, 1.0)
    record = AttemptRecord(job, Outcome(7, False, 0.5, 503, "busy", "later"), 3.0, JobState.DEAD, None, "dlq")
    (row,) = wire.outcome_rows([record])
    assert type(row) is tuple and OutcomeRow._make(row) == OutcomeRow(
        job_id=7, integration="a", state="dead", attempt=2, next_at=None, error="busy", succeeded=0,
        started_at=3.0, duration=0.5, status_code=503, body="later", dead_letter="dlq", event_id="e1",
        event_type="order.paid")
    sent = [(1, Op.INGEST.value, [row]), (2, Op.REPLAY.value, tuple(Replay("a", True, None, None, 5.0, 10))),
            (3, Op.VACUUM.value, ())]
    (frame,) = FrameReader().feed(dumps(sent))
    received = [wire.operation(op) for op in frame]
    assert [(op.id, op.kind) for op in received] == [(1, Op.INGEST), (2, Op.REPLAY), (3, Op.VACUUM)]
    assert received[1].items == Replay("a", True, None, None, 5.0, 10) and received[1].items.limit == 10


# -- the writer process -----------------------------------------------------------------------------------------------

async def test_the_writer_is_a_process_of_its_own_and_its_death_fails_what_waits(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "w.db")
    run = asyncio.create_task(s.run())
    try:
        assert s._proc is not None
        cmdline = Path(f"/proc/{s._proc.pid}/cmdline").read_bytes()
        assert b"eventrelay.store.sqlite.writer" in cmdline
        await s.ingest([ev(1)], [R("a")])
        s._proc.kill()
        with pytest.raises(StoreError, match=r"the database writer process \(pid \d+\) was killed by SIGKILL"):
            await asyncio.wait_for(run, 10)
        assert not await s.ping()
        with pytest.raises(StoreError, match="writer process has ended"):
            await s.ingest([ev(2)], [R("a")])
    finally:
        await s.close()
    # What was committed before is there.
    s = await SqliteStore.open(tmp_path / "w.db")
    try:
        assert (await s.event("evt-1")) is not None and await s.event("evt-2") is None
    finally:
        await s.close()
