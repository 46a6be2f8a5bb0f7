"""SQLite: the schema and its migrations, the group-commit writer, claims and outcomes.

All SQL lives in this module. One writer thread owns every write: ingest and outcome operations queue up
while the previous transaction commits, and the next transaction takes all of them at once (group commit),
so a thousand concurrent producers cost one fsync, not a thousand. Reads go through connections of their
own, which WAL lets run beside the writer: the dispatchers' claims through one on the event loop's thread
(see `claim`), everything else (status, the admin API) through aiosqlite's thread.

The writer's connection lives in its own thread, which takes each batch from a thread-safe queue, runs the
whole transaction as one function, and hands the results back to the event loop in one call. Issued
statement by statement (as aiosqlite does), a transaction cost six hand-overs, each waiting for a turn of a
busy event loop: outcome commits took 2.7 ms, of which SQLite needed 0.4, and the dispatchers' write-behind
window was full most of the time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import functools
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from . import codec
from .events import Event, new_event_id
from .jobs import AttemptRecord, Job, JobState

log = structlog.get_logger(component="store")

# Each entry migrates the schema from version i to i+1; PRAGMA user_version records where a file stands.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY,
        id          TEXT    NOT NULL UNIQUE,
        type        TEXT    NOT NULL,
        payload     TEXT    NOT NULL,
        accepted_at REAL    NOT NULL
    );
    CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY,
        event_seq   INTEGER NOT NULL REFERENCES events(seq),
        integration TEXT    NOT NULL,
        state       TEXT    NOT NULL DEFAULT 'pending',
        attempts    INTEGER NOT NULL DEFAULT 0,
        next_at     REAL    NOT NULL,
        created_at  REAL    NOT NULL,
        updated_at  REAL    NOT NULL,
        last_error  TEXT
    );
    -- The dispatcher's claim walks this index from its start: cost depends on the page, not the backlog.
    CREATE INDEX jobs_due ON jobs (integration, next_at, id) WHERE state = 'pending';
    CREATE INDEX jobs_event ON jobs (event_seq);
    CREATE TABLE attempts (
        id           INTEGER PRIMARY KEY,
        job_id       INTEGER NOT NULL REFERENCES jobs(id),
        integration  TEXT    NOT NULL,
        attempt      INTEGER NOT NULL,
        succeeded    INTEGER NOT NULL,
        created_at   REAL    NOT NULL,
        duration     REAL    NOT NULL,
        status_code  INTEGER,
        error_detail TEXT,
        body         TEXT
    );
    CREATE INDEX attempts_job ON attempts (job_id);
    CREATE INDEX attempts_integration ON attempts (integration, id);
    """,
    """
    -- A replayed job gets a new max_age window, counted from its re-queueing.
    ALTER TABLE jobs ADD COLUMN requeued_at REAL;
    -- Listing and counting one integration's jobs by state, newest first.
    CREATE INDEX jobs_state ON jobs (integration, state, id);
    -- Replay of a time range.
    CREATE INDEX jobs_created ON jobs (integration, created_at);
    -- Retention: finished jobs by age.
    CREATE INDEX jobs_finished ON jobs (state, updated_at) WHERE state <> 'pending';
    -- Last success and last failure of an integration.
    CREATE INDEX attempts_outcome ON attempts (integration, succeeded, id);
    """,
    """
    -- Per-resource ordering: jobs of one key go one at a time, in acceptance order.
    ALTER TABLE jobs ADD COLUMN ordering_key TEXT;
    CREATE INDEX jobs_ordered ON jobs (integration, ordering_key, id)
        WHERE state = 'pending' AND ordering_key IS NOT NULL;
    -- What outlives a restart about an integration itself: disabled by a 410 Gone, and why.
    CREATE TABLE integration_state (
        name            TEXT PRIMARY KEY,
        disabled_at     REAL,
        disabled_reason TEXT
    );
    """,
    """
    -- Ingest writes each event and its jobs through this view, so that a whole group commit of events is one
    -- statement (Store._transaction says why). `routes` is a JSON array of [integration, ordering key]; the
    -- jobs get the ids first_job, first_job + 1, ... in that order.
    CREATE VIEW ingest (seq, id, type, payload, accepted_at, first_job, routes) AS
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0;
    CREATE TRIGGER ingest_insert INSTEAD OF INSERT ON ingest BEGIN
        INSERT INTO events (seq, id, type, payload, accepted_at)
            VALUES (NEW.seq, NEW.id, NEW.type, NEW.payload, NEW.accepted_at);
        INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at, ordering_key)
            SELECT NEW.first_job + r.key, NEW.seq, json_extract(r.value, '$[0]'), NEW.accepted_at,
                   NEW.accepted_at, NEW.accepted_at, json_extract(r.value, '$[1]')
            FROM json_each(NEW.routes) r;
    END;
    -- Delivery outcomes likewise: each row is a job's new state and its line in the attempt log.
    CREATE VIEW outcome (job_id, integration, state, attempt, next_at, error, succeeded, started_at, duration,
                         status_code, body, updated_at) AS
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0;
    CREATE TRIGGER outcome_insert INSTEAD OF INSERT ON outcome BEGIN
        UPDATE jobs SET state = NEW.state, attempts = NEW.attempt, next_at = coalesce(NEW.next_at, next_at),
                        updated_at = NEW.updated_at, last_error = NEW.error
            WHERE id = NEW.job_id;
        INSERT INTO attempts (job_id, integration, attempt, succeeded, created_at, duration, status_code,
                              error_detail, body)
            VALUES (NEW.job_id, NEW.integration, NEW.attempt, NEW.succeeded, NEW.started_at, NEW.duration,
                    NEW.status_code, NEW.error, NEW.body);
    END;
    """,
)

# The claims' connection runs on the event loop's thread, so how long a busy database may stall it is
# bounded: a WAL reader waits only in rare moments (another connection recovering the WAL), and a claim
# that times out is retried by its dispatcher a second later.
_CLAIMS_BUSY_TIMEOUT_MS = 200

_WRITER_BATCH = 4096  # operations per transaction at most: bounds the time one commit can take
# Outcomes wait for no one (they are written behind), so a small batch of them lingers up to 3 ms for more:
# every transaction costs the event loop's thread GIL hand-overs, whatever its size. 3 ms was the best of
# 0, 1, 3, 5 and 8 ms: STOMP 79 -> 95-99 % of the raw loop (median of 5 rounds); at 8 ms the dispatchers'
# write-behind windows filled. An operation someone waits for (ingest, an
# admin write) ends the wait at once. (Waking every millisecond to look instead cost the whole gain.)
_RECORD_LINGER = 0.003
_RECORD_LINGER_BELOW = 64  # operations: a batch this large already shares its commit widely


class StoreError(Exception):
    """The store could not do what was asked; nothing of that operation was written."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """What ingest answers for one event."""

    id: str
    jobs: int
    duplicate: bool


@dataclass(slots=True)
class _Op:
    # "ingest" | "record" | "call" (an admin write: a function run inside the transaction) | "after" (a
    # function run once the transaction has committed, outside any: what SQLite will not do inside one)
    kind: str
    items: Any
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(slots=True)
class _Committed:
    """What one transaction of the writer thread came to, for the event loop to settle."""

    ops: list[_Op]
    results: list[Any] | None
    woken: set[str]
    seconds: float
    error: Exception | None = None


class Store:
    def __init__(self, path: Path, writer: sqlite3.Connection, writer_thread: concurrent.futures.Executor,
                 reader: aiosqlite.Connection, claims: sqlite3.Connection, lock_fd: int):
        self.path = path
        self._db = writer  # used only in writer_thread
        self._writer_thread = writer_thread
        self._reader = reader
        self._claims = claims  # used only on the event loop's thread
        self._lock_fd = lock_fd
        # Fed by the event loop, drained by the writer thread (SimpleQueue: thread-safe, and put() never blocks).
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._writer_stopped = False
        self._lingering = False  # the writer thread waits for more outcomes (see _RECORD_LINGER)
        self._urgent = threading.Event()
        self._next_event_seq = 1
        self._next_job_id = 1
        self._ingest_sync = "FULL"
        self._sync = ""  # the writer connection's current PRAGMA synchronous
        self.commits = 0  # transactions committed by the writer (tests check that commits are shared)
        # Called after each commit with the integrations that got new jobs, so their dispatchers wake at once.
        self.on_jobs_added: Callable[[set[str]], None] = lambda names: None
        # Called after each commit with (operations, seconds): the group-commit metrics.
        self.on_commit: Callable[[int, float], None] = lambda operations, seconds: None

    # -- opening and closing ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, synchronous: str = "full") -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path)
        writer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eventrelay-writer")
        loop = asyncio.get_running_loop()
        try:
            writer = await loop.run_in_executor(writer_thread, functools.partial(
                sqlite3.connect, path, isolation_level=None, check_same_thread=False))
            reader = await aiosqlite.connect(path, isolation_level=None)
            claims = sqlite3.connect(path, isolation_level=None)
        except (sqlite3.Error, OSError) as e:
            writer_thread.shutdown(wait=False)
            os.close(lock_fd)
            raise StoreError(f"cannot open the database {path}: {e}") from e
        store = cls(path, writer, writer_thread, reader, claims, lock_fd)
        try:
            await store._in_writer(store._prepare, synchronous)
            await reader.execute("PRAGMA busy_timeout=5000")
            claims.execute(f"PRAGMA busy_timeout={_CLAIMS_BUSY_TIMEOUT_MS}")
            claims.execute("PRAGMA query_only=ON")
        except BaseException:
            await store.close()
            raise
        return store

    async def _in_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in the writer's thread, where its connection lives."""
        return await asyncio.get_running_loop().run_in_executor(self._writer_thread, fn, *args)

    def _prepare(self, synchronous: str) -> None:
        try:
            mode = _value(self._db, "PRAGMA journal_mode=WAL")
            if mode != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode}); is it on a network filesystem?")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._ingest_sync = "FULL" if synchronous == "full" else "NORMAL"
            self._set_sync(self._ingest_sync)
            self._migrate()
            self._check_statements()
            self._enable_incremental_vacuum()
            self._next_event_seq = _value(self._db, "SELECT coalesce(max(seq), 0) + 1 FROM events")
            self._next_job_id = _value(self._db, "SELECT coalesce(max(id), 0) + 1 FROM jobs")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot use the database {self.path}: {e}") from e

    def _migrate(self) -> None:
        version = _value(self._db, "PRAGMA user_version")
        if version > len(MIGRATIONS):
            raise StoreError(f"{self.path} has schema version {version}, newer than this eventrelay "
                             f"understands ({len(MIGRATIONS)}): upgrade eventrelay or use another file")
        for target in range(version + 1, len(MIGRATIONS) + 1):
            # executescript commits on its own; user_version is set inside the same script to stay atomic.
            self._db.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATIONS[target - 1]}\nPRAGMA user_version={target};\nCOMMIT;")
            log.info("schema migrated", path=str(self.path), version=target)

    def _check_statements(self) -> None:
        """Compile the writer's one-statement commits now (EXPLAIN writes nothing): their triggers use SQLite's
        JSON functions, and a library built without them must stop the start-up, not fail every event."""
        for insert in (_INGEST, _OUTCOME):
            try:
                self._db.execute("EXPLAIN " + insert.statement(1), [None] * insert.width)
            except sqlite3.OperationalError as e:
                raise StoreError(f"this SQLite ({sqlite3.sqlite_version}) cannot run eventrelay's statements: {e}. "
                                 "eventrelay needs SQLite's JSON functions (built in since 3.38; earlier "
                                 "builds need JSON1 compiled in)") from e

    def _enable_incremental_vacuum(self) -> None:
        """Let pruning hand pages back to the file system, so the file stops growing under steady load."""
        if _value(self._db, "PRAGMA auto_vacuum") == 2:
            return
        # Only VACUUM can change auto_vacuum on a database that has tables: a one-time rewrite.
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("VACUUM")
        log.info("database set to incremental vacuum", path=str(self.path))

    async def close(self) -> None:
        try:
            await self._in_writer(self._db.close)
        except Exception:  # noqa: BLE001 - closing what may be half-open; nothing to do about it
            pass
        self._writer_thread.shutdown(wait=True)
        try:
            await self._reader.close()
        except Exception:  # noqa: BLE001
            pass
        self._claims.close()
        os.close(self._lock_fd)

    @staticmethod
    async def _scalar(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await db.execute_fetchall(sql, params)
        return rows[0][0] if rows else None

    # -- the writer ---------------------------------------------------------------------------------------

    async def ingest(self, events: Sequence[Event], routes: Sequence[Sequence[Route]]) -> list[Accepted]:
        """Store events and one job per routed integration; returns once committed. All or none.

        `routes[i]` lists, for events[i], the integrations to queue it for with its ordering key (or None).
        """
        return await self._enqueue(_Op("ingest", (events, routes)))

    async def record(self, records: Sequence[AttemptRecord]) -> None:
        """Write delivery outcomes: the job's new state and one attempt-log row each."""
        await self.record_later(records)

    def record_later(self, records: Sequence[AttemptRecord]) -> asyncio.Future[None]:
        """Queue delivery outcomes for the writer's next transaction; the future resolves once committed."""
        return self._enqueue(_Op("record", records))

    async def _call(self, fn: Callable[[sqlite3.Connection, float], Any]) -> Any:
        """Run `fn(writer_connection, now)` inside the writer's next transaction (in its thread); returns its
        result."""
        return await self._enqueue(_Op("call", fn))

    def _enqueue(self, op: _Op) -> asyncio.Future[Any]:
        if self._writer_stopped:
            op.future.set_exception(StoreError("the store is closing; nothing more is written"))
        else:
            self._ops.put(op)
            if self._lingering and op.kind != "record":
                self._urgent.set()  # someone waits for this one: the writer stops lingering over outcomes
        return op.future

    async def run_writer(self) -> None:
        """Commit queued operations in shared transactions until `stop_writer`; then finish the queue.

        The loop runs in the writer's thread, which takes the next batch itself the moment a commit ends.
        Driven from the event loop, each commit first waited for a turn of a busy loop to hand over the next
        batch: between two commits the writer sat idle 1.2 ms, longer than the 0.9 ms a commit took
        (single-event HTTP ingest, 32 connections).
        """
        loop = asyncio.get_running_loop()
        try:
            await asyncio.shield(loop.run_in_executor(self._writer_thread, self._write_forever, loop))
        except asyncio.CancelledError:
            self.stop_writer()  # the thread commits what is queued, then ends: close() can run after it
            raise

    def stop_writer(self) -> None:
        """Ask the writer to exit once everything queued so far is committed."""
        if not self._writer_stopped:
            self._writer_stopped = True
            self._ops.put(None)
            self._urgent.set()

    def _write_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        """The writer thread: take all that is queued, commit it, hand the results to the event loop; again."""
        while True:
            op = self._ops.get()
            if op is None:
                return
            batch = [op]
            stop = self._take_queued(batch)
            if not stop and len(batch) < _RECORD_LINGER_BELOW and all(o.kind == "record" for o in batch):
                stop = self._linger(batch)
            committed = self._commit(batch)
            try:
                loop.call_soon_threadsafe(self._settle, committed)
            except RuntimeError:  # the event loop is closed: nobody is waiting for these answers any more
                return
            if stop:
                return

    def _linger(self, batch: list[_Op]) -> bool:
        """Wait up to _RECORD_LINGER for more outcomes, or less if an urgent operation comes; then take all
        that is queued into `batch`. True if the stop marker came."""
        self._urgent.clear()
        self._lingering = True
        try:
            stop = self._take_queued(batch)  # one may have come before the flag was up
            if not stop and all(o.kind == "record" for o in batch):
                self._urgent.wait(_RECORD_LINGER)  # releases the GIL: the event loop runs on meanwhile
                stop = self._take_queued(batch)
        finally:
            self._lingering = False
        return stop

    def _take_queued(self, batch: list[_Op]) -> bool:
        """Add what is queued to `batch` (up to _WRITER_BATCH); True if the stop marker came."""
        while len(batch) < _WRITER_BATCH:
            try:
                nxt = self._ops.get_nowait()
            except queue.Empty:
                return False
            if nxt is None:
                return True
            batch.append(nxt)
        return False

    def _commit(self, batch: list[_Op]) -> list[_Committed]:
        """One transaction for the batch, or, if one operation in it is bad, one each (in the writer thread)."""
        started = time.monotonic()
        try:
            results, woken = self._transaction(batch)
        except Exception as e:  # noqa: BLE001 - every failure must reach the waiting producers
            if len(batch) > 1 and not _is_storage_failure(e):
                # One bad operation must not fail its neighbours: retry them one transaction each.
                return [done for op in batch for done in self._commit([op])]
            return [_Committed(batch, None, set(), time.monotonic() - started, e)]
        return [_Committed(batch, results, woken, time.monotonic() - started)]

    def _settle(self, transactions: list[_Committed]) -> None:
        """On the event loop: answer the producers of what the writer thread committed (or failed to)."""
        for tx in transactions:
            if tx.error is not None:
                error = StoreError(_explain(tx.error))
                log.error("write failed; nothing from this transaction was stored", error=str(tx.error),
                          operations=len(tx.ops))
                for op in tx.ops:
                    if not op.future.done():
                        op.future.set_exception(error)
                continue
            self.commits += 1
            self.on_commit(len(tx.ops), tx.seconds)
            for op, result in zip(tx.ops, tx.results or ()):
                if not op.future.done():
                    op.future.set_result(result)
            if tx.woken:
                self.on_jobs_added(tx.woken)

    def _set_sync(self, mode: str) -> None:
        if mode != self._sync:
            self._db.execute(f"PRAGMA synchronous={mode}")
            self._sync = mode

    def _transaction(self, batch: list[_Op]) -> tuple[list[Any], set[str]]:
        """One group commit, in the writer's thread. Futures are left to the event loop.

        A batch of ingests alone is one INSERT statement, committed on its own (autocommit), not BEGIN,
        INSERT events, INSERT jobs, COMMIT; so is a batch of delivery outcomes alone. The sqlite3 module
        lets go of the GIL around every step and reset of a statement, and each time the event loop, busy
        with requests, may take it and keep it for a whole turn: the writer's commit cycle was 2.3-2.7 ms
        of which SQLite needed 0.5 ms (instrumented, single-event HTTP ingest, 32 connections). A statement
        is atomic: its rows are all written, or none.
        """
        seq0, job0 = self._next_event_seq, self._next_job_id
        # Only acknowledgements need the fsync. A transaction of delivery outcomes alone commits without it:
        # WAL keeps commits in order, so power loss can only forget the last outcomes, and a forgotten
        # "delivered" means one more delivery (at least once), never a lost event. The next ingest commit
        # syncs them along with itself.
        self._set_sync(self._ingest_sync if any(op.kind == "ingest" for op in batch) else "NORMAL")
        now = time.time()
        results: list[Any] = [None] * len(batch)
        woken: set[str] = set()
        rows: list[tuple[Any, ...]] = []
        try:
            # A read outside the transaction is safe: this connection is the database's only writer.
            known = self._known_events(e.id for op in batch if op.kind == "ingest" for e in op.items[0]
                                       if e.id_given)
            for i, op in enumerate(batch):
                if op.kind == "ingest":
                    results[i] = self._plan_ingest(*op.items, now, known, rows, woken)
            records = [r for op in batch if op.kind == "record" for r in op.items]
            kinds = {op.kind for op in batch}
            # One statement commits itself (autocommit).
            if kinds == {"ingest"} and len(rows) <= _ROWS_PER_STATEMENT:
                _many(self._db, _INGEST, rows)  # no rows at all if every event was a duplicate
                return results, woken
            if kinds == {"record"} and len(records) <= _ROWS_PER_STATEMENT and not _dead_letters(records):
                self._write_records(records, now)
                return results, woken
            self._db.execute("BEGIN IMMEDIATE")
            for i, op in enumerate(batch):
                if op.kind == "call":
                    results[i] = op.items(self._db, now)
                    woken.update(getattr(results[i], "woken", ()))
            _many(self._db, _INGEST, rows)
            if records:
                self._write_records(records, now)
                self._forward_dead(records, now, woken)
            self._db.execute("COMMIT")
        except BaseException:
            self._next_event_seq, self._next_job_id = seq0, job0
            if self._db.in_transaction:  # a failed single statement has rolled itself back
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (e.g. on SQLITE_FULL); the transaction is gone either way
            raise
        for op in batch:
            if op.kind == "after":
                # The transaction is committed: a failure here must not fail (and so repeat) its operations.
                try:
                    op.items(self._db)
                except sqlite3.Error as e:
                    log.warning("housekeeping after a commit failed", error=str(e))
        return results, woken

    def _known_events(self, ids: Iterable[str]) -> dict[str, int]:
        """Producer-given ids already stored, with how many jobs each got: they are answered as duplicates."""
        wanted = list(dict.fromkeys(ids))
        known: dict[str, int] = {}
        for i in range(0, len(wanted), 500):  # stay under SQLite's bound-parameter limit
            chunk = wanted[i:i + 500]
            rows = self._db.execute(
                f"SELECT e.id, (SELECT count(*) FROM jobs WHERE event_seq = e.seq) FROM events e "
                f"WHERE e.id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
            known.update((r[0], r[1]) for r in rows)
        return known

    def _plan_ingest(self, events: Sequence[Event], routes: Sequence[Sequence[Route]], now: float,
                     known: dict[str, int], rows: list[tuple[Any, ...]], woken: set[str]) -> list[Accepted]:
        """Rows for the `ingest` view: the event, and its jobs as a JSON array of routes."""
        accepted = []
        for event, integrations in zip(events, routes):
            if event.id in known:
                accepted.append(Accepted(event.id, known[event.id], duplicate=True))
                continue
            rows.append((self._next_event_seq, event.id, event.type, event.payload, now, self._next_job_id,
                         codec.dumps(integrations) if integrations else "[]"))
            self._next_event_seq += 1
            self._next_job_id += len(integrations)
            woken.update(name for name, _ in integrations)
            known[event.id] = len(integrations)  # a repeat later in the same transaction is a duplicate too
            accepted.append(Accepted(event.id, len(integrations), duplicate=False))
        return accepted

    def _write_records(self, records: Sequence[AttemptRecord], now: float) -> None:
        _many(self._db, _OUTCOME,
              [(r.job.id, r.job.integration, r.state.value, r.job.attempt, r.next_at, r.outcome.error,
                int(r.outcome.succeeded), r.started_at, r.outcome.duration, r.outcome.status_code, r.outcome.body,
                now) for r in records])

    def _forward_dead(self, records: Sequence[AttemptRecord], now: float, woken: set[str]) -> None:
        """A job that died here becomes an event for its dead-letter integration, in the same transaction."""
        for r in _dead_letters(records):
            rows = self._db.execute("SELECT payload FROM events WHERE id = ?", (r.job.event_id,)).fetchall()
            original = codec.loads(rows[0][0].encode()) if rows else {}
            data = {"type": "dead_letter", "integration": r.job.integration, "job_id": str(r.job.id),
                    "attempts": r.job.attempt, "error": r.outcome.error, "status_code": r.outcome.status_code,
                    "event": {"id": r.job.event_id, "type": r.job.event_type, **original}}
            seq, job_id = self._next_event_seq, self._next_job_id
            self._next_event_seq += 1
            self._next_job_id += 1
            self._db.execute("INSERT INTO events (seq, id, type, payload, accepted_at) VALUES (?, ?, ?, ?, ?)",
                             (seq, new_event_id(), DEAD_LETTER_TYPE, codec.dumps({"data": data}), now))
            self._db.execute("INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (job_id, seq, r.dead_letter, now, now, now))
            woken.add(r.dead_letter)

    # -- integration state --------------------------------------------------------------------------------

    async def disabled(self) -> dict[str, tuple[float, str]]:
        """Integrations disabled by their target (410 Gone): name → (when, why)."""
        rows = await self._reader.execute_fetchall(
            "SELECT name, disabled_at, disabled_reason FROM integration_state WHERE disabled_at IS NOT NULL")
        return {r[0]: (r[1], r[2]) for r in rows}

    async def set_disabled(self, name: str, reason: str | None) -> None:
        """Disable an integration with a reason, or (reason None) enable it again. Survives restarts."""
        def run(db: sqlite3.Connection, now: float) -> None:
            db.execute(
                "INSERT INTO integration_state (name, disabled_at, disabled_reason) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET disabled_at = excluded.disabled_at, "
                "disabled_reason = excluded.disabled_reason",
                (name, now if reason is not None else None, reason))

        await self._call(run)

    # -- reads --------------------------------------------------------------------------------------------

    async def claim(self, integration: str, now: float, limit: int, exclude: Iterable[int] = (),
                    ordered: bool = False) -> list[Job]:
        """Up to `limit` due jobs of one integration, oldest due first, skipping those already in flight.

        `ordered`: only the head of each ordering key, i.e. no earlier job of the same key is still pending
        (in flight, waiting for a retry, or not yet tried): a key's jobs go one at a time, in order.

        Runs on the event loop's thread, not aiosqlite's: a claim is a walk of the `jobs_due` index bounded
        by `limit` (about 130 µs for 32 jobs, with a million pending as with a thousand: bench/backlog.py), while
        in another thread each fetched row cost a hand-over of the GIL, waiting for a turn of the busy
        loop. Claims came so late that a dispatcher's buffer of ready jobs ran dry about once every two
        deliveries (webhook, stored backlog); on this thread, about once every ten, and once in several
        hundred since a take that leaves the buffer half empty wakes the claim (Dispatcher._take).
        """
        excluded = _padded(exclude)
        heads_only = ("AND (j.ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM jobs k WHERE "
                      "k.integration = j.integration AND k.ordering_key = j.ordering_key AND k.state = 'pending' "
                      "AND k.id < j.id)) ") if ordered else ""
        rows = self._read_claims(
            "SELECT j.id, j.attempts, e.id, e.type, e.payload, e.accepted_at, coalesce(j.requeued_at, e.accepted_at) "
            "FROM jobs j "
            "JOIN events e ON e.seq = j.event_seq "
            "WHERE j.integration = ? AND j.state = 'pending' AND j.next_at <= ? "
            f"{_not_in('j.id', excluded)} {heads_only}ORDER BY j.next_at, j.id LIMIT ?",
            (integration, now, *excluded, limit))
        return [Job(id=r[0], integration=integration, attempt=r[1] + 1, event_id=r[2], event_type=r[3],
                    payload=r[4], accepted_at=r[5], age_from=r[6]) for r in rows]

    async def next_due(self, integration: str, exclude: Iterable[int] = ()) -> float | None:
        """When the earliest pending job of an integration (not in flight) falls due, or None.

        On the event loop's thread, as `claim`: one step down the `jobs_due` index."""
        excluded = _padded(exclude)
        rows = self._read_claims(
            "SELECT next_at FROM jobs WHERE integration = ? AND state = 'pending' "
            f"{_not_in('id', excluded)} ORDER BY next_at LIMIT 1", (integration, *excluded))
        return rows[0][0] if rows else None

    def _read_claims(self, sql: str, params: Sequence[Any]) -> list[Any]:
        # fetchall() steps the statement to its end, which resets it: no read transaction stays open to hold
        # back the writer's checkpoints.
        try:
            return self._claims.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read due jobs from {self.path}: {e}") from e

    async def job_counts(self) -> dict[tuple[str, str], int]:
        """(integration, state) → number of jobs, for the states an operator watches (pending, dead)."""
        rows = await self._reader.execute_fetchall(
            "SELECT integration, state, count(*) FROM jobs WHERE state IN ('pending', 'dead') "
            "GROUP BY integration, state")
        return {(r[0], r[1]): r[2] for r in rows}

    async def oldest_pending(self) -> dict[str, float]:
        """integration → when its oldest pending job was created."""
        rows = await self._reader.execute_fetchall(
            "SELECT integration, min(created_at) FROM jobs WHERE state = 'pending' GROUP BY integration")
        return {r[0]: r[1] for r in rows}

    async def last_attempts(self, integration: str) -> dict[str, tuple[float, str | None] | None]:
        """The latest successful and failed attempt of an integration: (time, error) each, or None."""
        result: dict[str, tuple[float, str | None] | None] = {}
        for key, succeeded in (("success", 1), ("failure", 0)):
            rows = await self._reader.execute_fetchall(
                "SELECT created_at, error_detail FROM attempts WHERE integration = ? AND succeeded = ? "
                "ORDER BY id DESC LIMIT 1", (integration, succeeded))
            result[key] = (rows[0][0], rows[0][1]) if rows else None
        return result

    async def jobs(self, integration: str, state: str | None, limit: int, offset: int
                   ) -> tuple[list[dict[str, Any]], int]:
        """A page of an integration's jobs, newest first, and how many there are in all."""
        where, params = "j.integration = ?", [integration]
        if state:
            where, params = where + " AND j.state = ?", params + [state]
        rows = await self._reader.execute_fetchall(
            f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN events e ON e.seq = j.event_seq WHERE {where} "
            "ORDER BY j.id DESC LIMIT ? OFFSET ?", (*params, limit, offset))
        total = await self._scalar(self._reader, f"SELECT count(*) FROM jobs j WHERE {where}", params)
        return [_job_row(r) for r in rows], total

    async def job(self, integration: str, job_id: int) -> dict[str, Any] | None:
        rows = await self._reader.execute_fetchall(
            f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN events e ON e.seq = j.event_seq "
            "WHERE j.integration = ? AND j.id = ?", (integration, job_id))
        return _job_row(rows[0]) if rows else None

    async def logs(self, integration: str | None, job_id: int | None, limit: int, offset: int
                   ) -> tuple[list[dict[str, Any]], int]:
        """A page of attempt-log entries, newest first, filtered by integration and job."""
        clauses, params = [], []
        if integration is not None:
            clauses, params = clauses + ["integration = ?"], params + [integration]
        if job_id is not None:
            clauses, params = clauses + ["job_id = ?"], params + [job_id]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._reader.execute_fetchall(
            "SELECT id, job_id, integration, attempt, succeeded, created_at, duration, status_code, error_detail, "
            f"body FROM attempts {where} ORDER BY id DESC LIMIT ? OFFSET ?", (*params, limit, offset))
        total = await self._scalar(self._reader, f"SELECT count(*) FROM attempts {where}", params)
        keys = ("id", "job_id", "integration", "attempt", "succeeded", "created_at", "duration", "status_code",
                "error_detail", "body")
        return [dict(zip(keys, r)) | {"succeeded": bool(r[4])} for r in rows], total

    async def attempts(self, job_id: int) -> list[dict[str, Any]]:
        """Every attempt of one job, oldest first."""
        rows, _ = await self.logs(None, job_id, limit=1_000_000, offset=0)
        return rows[::-1]

    async def retry(self, integration: str, job_id: int) -> str | None:
        """Make a pending or dead job due now. Returns the state it had (None: no such job)."""
        def run(db: sqlite3.Connection, now: float) -> _Requeued:
            rows = db.execute("SELECT state FROM jobs WHERE id = ? AND integration = ?",
                              (job_id, integration)).fetchall()
            if not rows:
                return _Requeued(None)
            if rows[0][0] != JobState.DELIVERED:
                db.execute("UPDATE jobs SET state = 'pending', next_at = ?, requeued_at = ?, updated_at = ? "
                           "WHERE id = ?", (now, now, now, job_id))
            return _Requeued(rows[0][0], woken=(integration,))

        return (await self._call(run)).previous

    async def replay(self, integration: str, *, dead: bool = False, since: float | None = None,
                     until: float | None = None, not_requeued_since: float | None = None,
                     limit: int = 10_000) -> int:
        """Re-queue up to `limit` jobs: the dead ones, or those created in [since, until) whatever their state.

        Jobs already pending are left alone (they are on their way). Each replayed job gets a fresh max_age.
        `not_requeued_since` skips jobs re-queued since then, so a replay done in batches ends.
        """
        skip = "AND (requeued_at IS NULL OR requeued_at < ?)"
        fence = [not_requeued_since if not_requeued_since is not None else 1e18]
        if dead:
            select = f"SELECT id FROM jobs WHERE integration = ? AND state = 'dead' {skip} LIMIT ?"
            params = [integration, *fence]
        else:
            select = ("SELECT id FROM jobs WHERE integration = ? AND created_at >= ? AND created_at < ? "
                      f"AND state <> 'pending' {skip} LIMIT ?")
            params = [integration, since if since is not None else 0.0, until if until is not None else 1e18,
                      *fence]

        def run(db: sqlite3.Connection, now: float) -> _Requeued:
            cursor = db.execute(
                f"UPDATE jobs SET state = 'pending', next_at = ?, requeued_at = ?, updated_at = ? "
                f"WHERE id IN ({select})", (now, now, now, *params, limit))
            return _Requeued(cursor.rowcount, woken=(integration,))

        return (await self._call(run)).previous

    async def prune(self, delivered_before: float, dead_before: float, batch: int = 1000) -> int:
        """Delete one batch of finished jobs past their retention, their attempts, and events nothing needs.

        Small batches through the writer: each is one short transaction, so ingest never waits long.
        Returns how many rows went; call again until it returns 0.
        """
        def run(db: sqlite3.Connection, now: float) -> int:
            rows = db.execute(
                "SELECT id, event_seq FROM jobs WHERE state = 'delivered' AND updated_at < ? "
                "UNION ALL SELECT id, event_seq FROM (SELECT id, event_seq FROM jobs "
                "WHERE state = 'dead' AND updated_at < ? LIMIT ?) LIMIT ?",
                (delivered_before, dead_before, batch, batch)).fetchall()
            job_ids = [r[0] for r in rows]
            seqs = sorted({r[1] for r in rows})
            deleted = 0
            for chunk in _chunks(job_ids, 500):
                marks = ",".join("?" * len(chunk))
                deleted += db.execute(f"DELETE FROM attempts WHERE job_id IN ({marks})", chunk).rowcount
                deleted += db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", chunk).rowcount
            for chunk in _chunks(seqs, 500):
                deleted += db.execute(
                    f"DELETE FROM events WHERE seq IN ({','.join('?' * len(chunk))}) "
                    "AND NOT EXISTS (SELECT 1 FROM jobs WHERE event_seq = events.seq)", chunk).rowcount
            # Events no integration observed have no job to lead us to them: oldest first, by age.
            deleted += db.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events e WHERE accepted_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM jobs WHERE event_seq = e.seq) ORDER BY seq LIMIT ?)",
                (delivered_before, batch)).rowcount
            return deleted

        deleted = await self._call(run)
        if deleted:
            await self._enqueue(_Op("after", _incremental_vacuum))
        return deleted

    async def ping(self) -> bool:
        try:
            return await self._scalar(self._reader, "SELECT 1") == 1
        except (sqlite3.Error, ValueError):
            return False


class _Insert:
    """A multi-row INSERT into one of the views: the same text for the same number of rows, so the sqlite3
    module's statement cache keeps it prepared."""

    def __init__(self, view: str, columns: tuple[str, ...]):
        self.width = len(columns)
        self._head = f"INSERT INTO {view} ({', '.join(columns)}) VALUES "
        self._group = "(" + ",".join("?" * self.width) + ")"

    def statement(self, rows: int) -> str:
        return self._head + ",".join([self._group] * rows)


_INGEST = _Insert("ingest", ("seq", "id", "type", "payload", "accepted_at", "first_job", "routes"))
_OUTCOME = _Insert("outcome", ("job_id", "integration", "state", "attempt", "next_at", "error", "succeeded",
                               "started_at", "duration", "status_code", "body", "updated_at"))
Route = tuple[str, str | None]  # an integration to queue an event for, and the job's ordering key
DEAD_LETTER_TYPE = "eventrelay.dead_letter"


@dataclass(frozen=True, slots=True)
class _Requeued:
    previous: Any
    woken: tuple[str, ...] = ()  # integrations whose dispatchers should look again


_JOB_COLUMNS = ("j.id, j.integration, e.id, e.type, j.state, j.attempts, j.created_at, j.updated_at, "
                "j.next_at, j.last_error")


def _job_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": r[0], "integration": r[1], "event_id": r[2], "event_type": r[3], "state": r[4],
            "attempts": r[5], "created_at": r[6], "updated_at": r[7],
            "next_attempt_at": r[8] if r[4] == JobState.PENDING else None, "last_error": r[9]}


def _incremental_vacuum(db: sqlite3.Connection) -> None:
    # The pragma frees one page per step, and the sqlite3 module's execute() steps a statement that returns
    # no columns only once: one page per call. executescript() steps it to the end, but commits whatever
    # transaction is open first, hence an "after" operation.
    db.executescript("PRAGMA incremental_vacuum(2000);")


def _dead_letters(records: Sequence[AttemptRecord]) -> list[AttemptRecord]:
    """Records of jobs that died with a dead-letter integration to forward them to."""
    return [r for r in records if r.state is JobState.DEAD and r.dead_letter]


def _value(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    row = db.execute(sql, params).fetchone()
    return row[0] if row else None


def _many(db: sqlite3.Connection, insert: _Insert, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert `rows`, up to _ROWS_PER_STATEMENT of them per statement.

    One statement for many rows, not executemany's one step per row: the sqlite3 module lets go of the GIL
    around every step, and taking it back from a busy event loop cost ~100 µs a row (measured: 17,000
    outcome UPDATEs took 1.7 s of the writer thread's time under delivery load).
    """
    for chunk in _chunks(list(rows), _ROWS_PER_STATEMENT):
        db.execute(insert.statement(len(chunk)), [value for row in chunk for value in row])


_ROWS_PER_STATEMENT = 500  # x at most 12 columns: well under SQLite's 32,766 bound parameters


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _not_in(column: str, values: list[int]) -> str:
    return f"AND {column} NOT IN ({','.join('?' * len(values))})" if values else ""


def _padded(ids: Iterable[int]) -> list[int]:
    """Ids to exclude, padded with -1 (never a job id) to a power of two: a handful of distinct statement
    texts, which the sqlite3 module's statement cache keeps prepared (a claim excludes a different number of
    jobs each time, and preparing the statement anew cost more than running it)."""
    values = list(ids)
    if values:
        values += [-1] * ((1 << (len(values) - 1).bit_length()) - len(values))
    return values


def _lock(path: Path) -> int:
    """Hold an exclusive lock beside the database: two daemons on one file would deliver everything twice."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(f"{path} is in use by another eventrelay process (pid {holder}); stop it first, "
                         "or give this one its own storage.path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _is_storage_failure(e: BaseException) -> bool:
    """Failures of the disk or the file, which retrying operation by operation cannot cure."""
    return isinstance(e, sqlite3.OperationalError) and any(
        s in str(e) for s in ("disk is full", "disk I/O", "readonly", "unable to open", "locked"))


def _explain(e: BaseException) -> str:
    text = str(e)
    if "disk is full" in text:
        return "the disk holding the database is full: free space, then retry"
    if "readonly" in text:
        return "the database is not writable: check the permissions of storage.path and its directory"
    return f"database error: {text}"
