"""The writer process: the one connection that writes the database, in a process of its own.

`Store` (store.py) starts it with `python -m eventrelay.writer` and talks to it over a Unix socket pair:
one frame (`wire_dumps`) per turn of the event loop carries every operation queued in that turn (sent sooner
when 500 rows wait, or 32 events and the writer is idle), and one frame comes back per transaction. The
writer takes all that has arrived, commits it as one transaction (group commit: a thousand concurrent
producers cost one fsync), and answers.

Why a process and not a thread: a writer thread needs the GIL around every call into SQLite, and the event
loop's thread, busy with requests or deliveries, held it for up to the 5 ms switch interval each time.
Instrumented under single-event HTTP ingest, the writer thread's statement took 1.5-1.7 ms and it waited
7.5 ms between two commits, while SQLite alone commits such a batch in 0.35 ms on the same host. Here SQLite
and all the Python around it run on the other core, and the event loop pays a socket write per turn and a
read per transaction. Single-event HTTP ingest went from a median of 62-64 % of a bare aiohttp handler to
82-92 % (bench/ingest.py; docs/performance-notes.md has the runs).

The writer exits when the socket reaches end of file (after committing and answering what it got), and
with its parent: if the daemon is killed, the kernel kills the writer too (PR_SET_PDEATHSIG), so a restarted
daemon never meets a writer left over from the last one. It ignores SIGTERM, SIGINT and SIGHUP: systemd and
a terminal send those to the whole group, and shutting down is the daemon's to order (it drains first).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import marshal
import os
import select
import signal
import socket
import sqlite3
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import codec
from .events import new_event_id

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
    """
    -- Attempts by integration and minute: status and charts read these, not the attempt log, and they
    -- survive reloads and restarts. Pruned with the attempts they count.
    CREATE TABLE outcome_minutes (
        integration TEXT    NOT NULL,
        minute      INTEGER NOT NULL,  -- unix time // 60 of the attempts' start
        delivered   INTEGER NOT NULL DEFAULT 0,
        failed      INTEGER NOT NULL DEFAULT 0,  -- failed, to be retried
        dead        INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (minute, integration)  -- the last hour of every integration is one range
    ) WITHOUT ROWID;
    """,
)

_INTEGRITY_BUDGET = 5.0  # seconds the start-up check of the database may take before it is cut short
_WRITER_BATCH = 4096  # operations per transaction at most: bounds the time one commit can take
# Outcomes wait for no one (they are written behind), so a small batch of them lingers up to 20 ms for more:
# every transaction costs the event loop a write and a read, costs an fsync-less commit here, and writes
# each page it touches (nine indexes and tables) once more to the WAL and later to the database. With a
# writer thread, 3 ms was the best of 0, 1, 3, 5 and 8 ms (at 8 ms the write-behind windows, 8 x concurrency
# then, filled). With the writer a process and windows of 16 x concurrency, 20 ms against 3 ms, alternating
# runs: STOMP to a broker on the same disk took a median 1.84 s against 1.92 s for 3,000 messages (12 rounds
# each), webhook delivery 9,238 against 8,918 deliveries/s (6 rounds); fast targets reach 64 outcomes first.
# Any other operation (an ingest, an admin write: someone waits for it) ends the wait at once.
_RECORD_LINGER = 0.02
_COUNTS_LINGER = 1.0  # seconds attempt counts may wait for a transaction to go with (Writer.write_counts)
_RECORD_LINGER_BELOW = 64  # outcomes: a batch this large already shares its commit widely
_RECEIVE_AT_ONCE = 8 << 20  # bytes read from the socket before the next commit, at most
_ROWS_PER_STATEMENT = 500  # x at most 12 columns: well under SQLite's 32,766 bound parameters
DEAD_LETTER_TYPE = "eventrelay.dead_letter"

# A delivery outcome on the wire: the `outcome` view's first 11 columns, then what a dead letter needs.
RECORD_FIELDS = ("job_id", "integration", "state", "attempt", "next_at", "error", "succeeded", "started_at",
                 "duration", "status_code", "body", "dead_letter", "event_id", "event_type")
_INTEGRATION, _STATE, _STARTED_AT, _DEAD_LETTER, _EVENT_ID, _EVENT_TYPE = map(
    RECORD_FIELDS.index, ("integration", "state", "started_at", "dead_letter", "event_id", "event_type"))
_COUNTED = {"delivered": 0, "pending": 1, "dead": 2}  # a record's state -> its column in outcome_minutes


# -- the wire -------------------------------------------------------------------------------------------------

_FRAME_LENGTH = struct.Struct("<I")


def wire_dumps(value: Any) -> bytes:
    """One frame: the length of the value in marshal's format, then the value.

    marshal, not JSON: both ends run the same interpreter (the writer is `sys.executable`), it keeps every str
    (lone surrogates too) and int as they are, and the event payloads, JSON text themselves, travel without
    escaping. A batch of 100 events was encoded in 0.18 µs per event instead of 0.86 (orjson), and decoded
    in 0.28 instead of 0.64: the encoding is the event loop's, which HTTP ingest of 100-event batches keeps
    saturated."""
    body = marshal.dumps(value)
    return _FRAME_LENGTH.pack(len(body)) + body


class WireReader:
    """The values of a stream of frames, as each completes."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        values, start, end = [], 0, len(buffer)
        with memoryview(buffer) as view:
            while end - start >= _FRAME_LENGTH.size:
                (size,) = _FRAME_LENGTH.unpack_from(view, start)
                stop = start + _FRAME_LENGTH.size + size
                if stop > end:
                    break  # the rest of this frame has not arrived yet
                with view[start + _FRAME_LENGTH.size:stop] as frame:
                    values.append(marshal.loads(frame))
                start = stop
        del buffer[:start]
        return values


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


class _Op:
    __slots__ = ("id", "kind", "items")

    def __init__(self, op_id: int, kind: str, items: Any):
        # kind: "ingest" | "record" | "call" (an admin write, by name, inside the transaction) | "after" (by
        # name, once the transaction has committed, outside any: what SQLite will not do inside one)
        self.id, self.kind, self.items = op_id, kind, items


class _Failed(Exception):
    """A transaction failed; `text` is what the daemon tells the producers and the operator."""


class Writer:
    """The writer's connection and the transactions it runs."""

    def __init__(self, db: sqlite3.Connection, path: str, synchronous: str,
                 log: Callable[[str, str, dict[str, Any]], None]):
        self._db = db
        self.path = path
        self._ingest_sync = "FULL" if synchronous == "full" else "NORMAL"
        self._sync = ""
        self._log = log
        self._next_event_seq = 1
        self._next_job_id = 1
        self._minutes: dict[tuple[str, int], list[int]] = {}  # (integration, minute) -> attempts not yet written
        self._counts_written = 0.0
        self._counts_failing = False
        self._calls: dict[str, Callable[..., tuple[Any, Iterable[str]]]] = {
            "set_disabled": self._set_disabled, "retry": self._retry, "replay": self._replay, "prune": self._prune}
        self._afters: dict[str, Callable[[], None]] = {"incremental_vacuum": self._incremental_vacuum}

    # -- start-up -----------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """WAL, the schema, and the next ids. Raises _Failed with what the operator should do."""
        try:
            mode = _value(self._db, "PRAGMA journal_mode=WAL")
            if mode != "wal":
                raise _Failed(f"{self.path}: SQLite refused WAL mode (got {mode}); is it on a network filesystem?")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._set_sync(self._ingest_sync)
            self._check_integrity()
            self._migrate()
            self._check_statements()
            self._enable_incremental_vacuum()
            self._next_event_seq = _value(self._db, "SELECT coalesce(max(seq), 0) + 1 FROM events")
            self._next_job_id = _value(self._db, "SELECT coalesce(max(id), 0) + 1 FROM jobs")
        except sqlite3.DatabaseError as e:
            if _looks_damaged(e):
                raise _Failed(damaged(self.path, f"SQLite: {e}")) from e
            raise _Failed(f"cannot use the database {self.path}: {e}") from e

    def _check_integrity(self) -> None:
        """Refuse a damaged database before serving it: its reads would fail at random later, in the middle
        of deliveries and admin requests. SQLite's quick check reads every page (a fraction of a second
        for hundreds of MB when cached); it is cut short, with a warning, on a disk too slow for it."""
        deadline = time.monotonic() + _INTEGRITY_BUDGET
        self._db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        try:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(3)").fetchall()]
        except sqlite3.OperationalError as e:
            if "interrupted" not in str(e):
                raise
            self._log("warning", "database check cut short: the database is larger than can be checked quickly "
                      "at start-up; run `sqlite3 FILE 'PRAGMA quick_check'` while eventrelay is stopped to check it",
                      {"path": self.path, "budget_s": _INTEGRITY_BUDGET})
            return
        finally:
            self._db.set_progress_handler(None, 0)
        if problems != ["ok"]:
            lines = [line.strip() for p in problems for line in p.splitlines()]
            found = [line for line in lines if line and not line.startswith("***")]
            raise _Failed(damaged(self.path, "quick_check: " + "; ".join(found[:3])))

    def _migrate(self) -> None:
        version = _value(self._db, "PRAGMA user_version")
        if version > len(MIGRATIONS):
            raise _Failed(f"{self.path} has schema version {version}, newer than this eventrelay "
                          f"understands ({len(MIGRATIONS)}): upgrade eventrelay or use another file")
        for target in range(version + 1, len(MIGRATIONS) + 1):
            # executescript commits on its own; user_version is set inside the same script to stay atomic.
            self._db.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATIONS[target - 1]}\nPRAGMA user_version={target};\nCOMMIT;")
            self._log("info", "schema migrated", {"path": self.path, "version": target})

    def _check_statements(self) -> None:
        """Compile the one-statement commits now (EXPLAIN writes nothing): their triggers use SQLite's JSON
        functions, and a library built without them must stop the start-up, not fail every event."""
        for insert in (_INGEST, _OUTCOME):
            try:
                self._db.execute("EXPLAIN " + insert.statement(1), [None] * insert.width)
            except sqlite3.OperationalError as e:
                raise _Failed(f"this SQLite ({sqlite3.sqlite_version}) cannot run eventrelay's statements: {e}. "
                              "eventrelay needs SQLite's JSON functions (built in since 3.38; earlier "
                              "builds need JSON1 compiled in)") from e

    def _enable_incremental_vacuum(self) -> None:
        """Let pruning hand pages back to the file system, so the file stops growing under steady load."""
        if _value(self._db, "PRAGMA auto_vacuum") == 2:
            return
        # Only VACUUM can change auto_vacuum on a database that has tables: a one-time rewrite.
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("VACUUM")
        self._log("info", "database set to incremental vacuum", {"path": self.path})

    # -- transactions -------------------------------------------------------------------------------------

    def commit(self, batch: list[_Op]) -> list[list[Any]]:
        """One transaction for the batch, or, if one operation in it is bad, one each. Returns the answers:
        [operation ids, results, integrations with new jobs, seconds, error text or None] per transaction."""
        started = time.monotonic()
        try:
            results, woken = self._transaction(batch)
        except Exception as e:  # noqa: BLE001 - every failure must reach the waiting producers
            if len(batch) > 1 and not _is_storage_failure(e):
                # One bad operation must not fail its neighbours: retry them one transaction each.
                return [done for op in batch for done in self.commit([op])]
            return [[[op.id for op in batch], None, [], time.monotonic() - started, _explain(e), str(e)]]
        return [[[op.id for op in batch], results, sorted(woken), time.monotonic() - started, None, None]]

    def _set_sync(self, mode: str) -> None:
        if mode != self._sync:
            self._db.execute(f"PRAGMA synchronous={mode}")
            self._sync = mode

    def _transaction(self, batch: list[_Op]) -> tuple[list[Any], set[str]]:
        """One group commit.

        A batch of ingests alone is one INSERT statement, committed on its own (autocommit), not BEGIN,
        INSERT events, INSERT jobs, COMMIT; so is a batch of delivery outcomes alone: fewer statements to
        step. A statement is atomic: its rows are all written, or none.
        """
        seq0, job0 = self._next_event_seq, self._next_job_id
        minutes0 = {key: counts[:] for key, counts in self._minutes.items()}
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
            known = self._known_events(e[0] for op in batch if op.kind == "ingest" for e in op.items if e[3])
            for i, op in enumerate(batch):
                if op.kind == "ingest":
                    results[i] = self._plan_ingest(op.items, now, known, rows, woken)
            records = [r for op in batch if op.kind == "record" for r in op.items]
            kinds = {op.kind for op in batch}
            if kinds == {"record"} and len(records) <= _ROWS_PER_STATEMENT and not _dead_letters(records):
                self._write_records(records, now)
                if time.monotonic() - self._counts_written >= _COUNTS_LINGER:
                    self.write_counts()
                return results, woken
            # One statement commits itself (autocommit).
            if kinds == {"ingest"} and len(rows) <= _ROWS_PER_STATEMENT:
                _many(self._db, _INGEST, rows)  # no rows at all if every event was a duplicate
                return results, woken
            self._db.execute("BEGIN IMMEDIATE")
            for i, op in enumerate(batch):
                if op.kind == "call":
                    name, args = op.items
                    results[i], also_woken = self._calls[name](now, *args)
                    woken.update(also_woken)
            _many(self._db, _INGEST, rows)
            if records:
                self._write_records(records, now)
                self._forward_dead(records, now, woken)
            self.write_counts()
            self._db.execute("COMMIT")
        except BaseException:
            self._next_event_seq, self._next_job_id = seq0, job0
            self._minutes = minutes0
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
                    self._afters[op.items]()
                except sqlite3.Error as e:
                    self._log("warning", "housekeeping after a commit failed", {"error": str(e)})
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

    def _plan_ingest(self, events: list[list[Any]], now: float, known: dict[str, int],
                     rows: list[tuple[Any, ...]], woken: set[str]) -> list[list[int]]:
        """Rows for the `ingest` view: the event, and its jobs as a JSON array of routes. Each event on the
        wire is [id, type, payload, id given, routes]. The answer names only the duplicates, as [index, jobs
        they got then]: every other event got one job per route (store._accepted)."""
        duplicates = []
        for i, (event_id, event_type, payload, _, routes) in enumerate(events):
            if event_id in known:
                duplicates.append([i, known[event_id]])
                continue
            rows.append((self._next_event_seq, event_id, event_type, payload, now, self._next_job_id,
                         codec.dumps(routes) if routes else "[]"))
            self._next_event_seq += 1
            self._next_job_id += len(routes)
            woken.update(name for name, _ in routes)
            known[event_id] = len(routes)  # a repeat later in the same transaction is a duplicate too
        return duplicates

    def _write_records(self, records: Sequence[list[Any]], now: float) -> None:
        _many(self._db, _OUTCOME, [(*r[:_DEAD_LETTER], now) for r in records])
        minutes = self._minutes
        for r in records:
            counts = minutes.get(key := (r[_INTEGRATION], int(r[_STARTED_AT] // 60)))
            if counts is None:
                counts = minutes[key] = [0, 0, 0]
            counts[_COUNTED[r[_STATE]]] += 1

    def write_counts(self) -> None:
        """Add the attempts counted since the last call to outcome_minutes. They wait for a transaction that
        is open anyway, or a second at most: a statement of their own in every commit of outcomes cost
        that commit its single-statement form. A crash loses at most that second of counts, not outcomes."""
        if self._minutes:
            rows = [(name, minute, *counts) for (name, minute), counts in self._minutes.items()]
            alone = not self._db.in_transaction
            if alone:
                self._set_sync("NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO outcome_minutes (integration, minute, delivered, failed, dead) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (minute, integration) DO UPDATE SET delivered = delivered + excluded.delivered, "
                "failed = failed + excluded.failed, dead = dead + excluded.dead", rows)
            if alone:
                self._db.execute("COMMIT")
            self._minutes = {}
        self._counts_written = time.monotonic()
        self._counts_failing = False

    @property
    def counts_waiting(self) -> bool:
        return bool(self._minutes)

    def counts_failed(self, e: sqlite3.Error) -> None:
        """Counts that could not be written alone (a full disk): kept for the next try."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        if not self._counts_failing:
            self._log("warning", "attempt counts not written yet; will try again", {"error": str(e)})
        self._counts_failing = True
        self._counts_written = time.monotonic()

    def _forward_dead(self, records: Sequence[list[Any]], now: float, woken: set[str]) -> None:
        """A job that died here becomes an event for its dead-letter integration, in the same transaction."""
        for r in _dead_letters(records):
            job_id, integration, _, attempt, _, error, _, _, _, status_code = r[:10]
            rows = self._db.execute("SELECT payload FROM events WHERE id = ?", (r[_EVENT_ID],)).fetchall()
            original = codec.loads(rows[0][0].encode()) if rows else {}
            data = {"type": "dead_letter", "integration": integration, "job_id": str(job_id),
                    "attempts": attempt, "error": error, "status_code": status_code,
                    "event": {"id": r[_EVENT_ID], "type": r[_EVENT_TYPE], **original}}
            seq, new_job = self._next_event_seq, self._next_job_id
            self._next_event_seq += 1
            self._next_job_id += 1
            self._db.execute("INSERT INTO events (seq, id, type, payload, accepted_at) VALUES (?, ?, ?, ?, ?)",
                             (seq, new_event_id(), DEAD_LETTER_TYPE, codec.dumps({"data": data}), now))
            self._db.execute("INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (new_job, seq, r[_DEAD_LETTER], now, now, now))
            woken.add(r[_DEAD_LETTER])

    # -- admin writes: (result, integrations whose dispatchers should look again) ------------------------------

    def _set_disabled(self, now: float, name: str, reason: str | None) -> tuple[None, tuple[str, ...]]:
        self._db.execute(
            "INSERT INTO integration_state (name, disabled_at, disabled_reason) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET disabled_at = excluded.disabled_at, "
            "disabled_reason = excluded.disabled_reason",
            (name, now if reason is not None else None, reason))
        return None, ()

    def _retry(self, now: float, integration: str, job_id: int) -> tuple[str | None, tuple[str, ...]]:
        rows = self._db.execute("SELECT state FROM jobs WHERE id = ? AND integration = ?",
                                (job_id, integration)).fetchall()
        if not rows:
            return None, ()
        if rows[0][0] != "delivered":
            self._db.execute("UPDATE jobs SET state = 'pending', next_at = ?, requeued_at = ?, updated_at = ? "
                             "WHERE id = ?", (now, now, now, job_id))
        return rows[0][0], (integration,)

    def _replay(self, now: float, integration: str, dead: bool, since: float | None, until: float | None,
                not_requeued_since: float | None, limit: int) -> tuple[int, tuple[str, ...]]:
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
        cursor = self._db.execute(
            f"UPDATE jobs SET state = 'pending', next_at = ?, requeued_at = ?, updated_at = ? "
            f"WHERE id IN ({select})", (now, now, now, *params, limit))
        return cursor.rowcount, (integration,)

    def _prune(self, now: float, delivered_before: float, dead_before: float, batch: int
               ) -> tuple[int, tuple[str, ...]]:
        db = self._db
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
        deleted += db.execute(
            "DELETE FROM outcome_minutes WHERE (minute, integration) IN (SELECT minute, integration "
            "FROM outcome_minutes WHERE minute < ? LIMIT ?)", (int(delivered_before // 60), batch)).rowcount
        # Events no integration observed have no job to lead us to them: oldest first, by age.
        deleted += db.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events e WHERE accepted_at < ? AND NOT EXISTS "
            "(SELECT 1 FROM jobs WHERE event_seq = e.seq) ORDER BY seq LIMIT ?)",
            (delivered_before, batch)).rowcount
        return deleted, ()

    def _incremental_vacuum(self) -> None:
        # The pragma frees one page per step, and the sqlite3 module's execute() steps a statement that returns
        # no columns only once: one page per call. executescript() steps it to the end, but commits whatever
        # transaction is open first, hence an "after" operation.
        self._db.executescript("PRAGMA incremental_vacuum(2000);")


# -- the process --------------------------------------------------------------------------------------------

class _Channel:
    """The socket to the daemon: operations in, answers out."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._reader = WireReader()
        self.pending: deque[_Op] = deque()
        self.closed = False  # the daemon has sent all it will (end of file)

    def receive(self, timeout: float | None) -> None:
        """Wait up to `timeout` (None: for ever) for operations, then take all that has arrived."""
        if self.closed:
            return
        readable, _, _ = select.select([self._sock], [], [], timeout)
        if not readable:
            return
        size = 0
        while size < _RECEIVE_AT_ONCE:  # a daemon that never stops sending must not keep us from committing
            try:
                data = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                break
            # An incomplete frame waits in the reader for its end (at end of file, it is dropped).
            for ops in self._reader.feed(data):
                self.pending.extend(_Op(*op) for op in ops)
            size += len(data)

    def send(self, message: Any) -> None:
        self._sock.sendall(wire_dumps(message))


def _next_batch(channel: _Channel, writer: Writer) -> list[_Op] | None:
    """The operations for the next transaction: all that has arrived, up to _WRITER_BATCH, lingering a
    little if they are only a few delivery outcomes. None once the daemon is done and nothing is left.
    Attempt counts still in memory are written when nothing comes for a while (Writer.write_counts)."""
    while not channel.pending:
        if channel.closed:
            return None
        channel.receive(_COUNTS_LINGER if writer.counts_waiting else None)
        if not channel.pending and writer.counts_waiting:
            try:
                writer.write_counts()
            except sqlite3.Error as e:
                writer.counts_failed(e)
    channel.receive(0)
    deadline = time.monotonic() + _RECORD_LINGER
    while (sum(len(op.items) for op in channel.pending) < _RECORD_LINGER_BELOW and not channel.closed
           and all(op.kind == "record" for op in channel.pending)):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        channel.receive(left)
    take = min(len(channel.pending), _WRITER_BATCH)
    return [channel.pending.popleft() for _ in range(take)]


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when the daemon dies (Linux only; elsewhere, end of file on the
    socket still ends it once its last transaction is done)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the daemon died before the request took effect
        sys.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eventrelay.writer", description="eventrelay's database writer "
                                 "(started by the daemon; not to be run by hand)")
    ap.add_argument("--socket-fd", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--synchronous", choices=("full", "normal"), required=True)
    ap.add_argument("path")
    args = ap.parse_args(argv)
    _die_with_parent(args.parent)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    channel = _Channel(socket.socket(fileno=args.socket_fd))

    def log(level: str, event: str, fields: dict[str, Any]) -> None:
        channel.send(["log", level, event, fields])  # the daemon logs it, in its format

    try:
        db = sqlite3.connect(args.path, isolation_level=None)
        writer = Writer(db, args.path, args.synchronous, log)
        writer.prepare()
    except _Failed as e:
        channel.send(["failed", str(e)])
        return 1
    except (sqlite3.Error, OSError) as e:
        channel.send(["failed", f"cannot open the database {args.path}: {e}"])
        return 1
    # As in the daemon (cli._tune_gc): batches make no reference cycles, and start-up objects need no scans.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    channel.send(["ready"])
    try:
        while (batch := _next_batch(channel, writer)) is not None:
            for answer in writer.commit(batch):
                channel.send(["done", *answer])
        with contextlib.suppress(sqlite3.Error):
            writer.write_counts()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon is gone: nobody is waiting for these answers
    finally:
        db.close()
    return 0


def _value(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    row = db.execute(sql, params).fetchone()
    return row[0] if row else None


def _many(db: sqlite3.Connection, insert: _Insert, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert `rows`, up to _ROWS_PER_STATEMENT of them per statement: one statement for many rows, not
    executemany's one step per row."""
    for chunk in _chunks(list(rows), _ROWS_PER_STATEMENT):
        db.execute(insert.statement(len(chunk)), [value for row in chunk for value in row])


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _dead_letters(records: Sequence[list[Any]]) -> list[list[Any]]:
    """Records of jobs that died with a dead-letter integration to forward them to."""
    return [r for r in records if r[_STATE] == "dead" and r[_DEAD_LETTER]]


def damaged(path: str, detail: str) -> str:
    """What an operator does about a damaged database, in one sentence."""
    return (f"the database {path} is damaged ({detail}): eventrelay will not serve it. Stop eventrelay, move "
            f"{path} and its -wal and -shm files aside, then restore a backup, or start with an empty database "
            "(the events pending in the damaged one are then not delivered)")


def _is_storage_failure(e: BaseException) -> bool:
    """Failures of the disk or the file, which retrying operation by operation cannot cure."""
    return _looks_damaged(e) or isinstance(e, sqlite3.OperationalError) and any(
        s in str(e) for s in ("disk is full", "disk I/O", "readonly", "unable to open", "locked"))


def _looks_damaged(e: BaseException) -> bool:
    return isinstance(e, sqlite3.DatabaseError) and any(
        s in str(e) for s in ("malformed", "not a database", "corrupt"))


def _explain(e: BaseException) -> str:
    text = str(e)
    if "disk is full" in text:
        return "the disk holding the database is full: free space, then retry"
    if "readonly" in text:
        return "the database is not writable: check the permissions of storage.path and its directory"
    if _looks_damaged(e):
        return f"the database is damaged ({text}): restore a backup (the eventrelay README says how)"
    return f"database error: {text}"


if __name__ == "__main__":
    sys.exit(main())
