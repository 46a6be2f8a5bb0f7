"""SQLite: the schema and its migrations, the group-commit writer, claims and outcomes.

All SQL lives in this module. One writer task owns every write: ingest and outcome operations queue up
while the previous transaction commits, and the next transaction takes all of them at once (group commit),
so a thousand concurrent producers cost one fsync, not a thousand. Reads (claims, status) go through a
second connection, which WAL lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from . import codec
from .events import Event
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
)

_WRITER_BATCH = 4096  # operations per transaction at most: bounds the time one commit can take


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
    kind: str  # "ingest" | "record"
    items: Any
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Store:
    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection, lock_fd: int):
        self.path = path
        self._db = writer
        self._reader = reader
        self._lock_fd = lock_fd
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._next_event_seq = 1
        self._next_job_id = 1
        self._ingest_sync = "FULL"
        self._sync = ""  # the writer connection's current PRAGMA synchronous
        self.commits = 0  # transactions committed by the writer, and the operations they carried:
        self.committed_ops = 0  # their ratio is the group-commit batch size
        # Called after each commit with the integrations that got new jobs, so their dispatchers wake at once.
        self.on_jobs_added: Callable[[set[str]], None] = lambda names: None

    # -- opening and closing ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, synchronous: str = "full") -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path)
        try:
            writer = await aiosqlite.connect(path, isolation_level=None)
            reader = await aiosqlite.connect(path, isolation_level=None)
        except (sqlite3.Error, OSError) as e:
            os.close(lock_fd)
            raise StoreError(f"cannot open the database {path}: {e}") from e
        store = cls(path, writer, reader, lock_fd)
        try:
            await store._prepare(synchronous)
        except BaseException:
            await store.close()
            raise
        return store

    async def _prepare(self, synchronous: str) -> None:
        try:
            mode = await self._scalar(self._db, "PRAGMA journal_mode=WAL")
            if mode != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode}); is it on a network filesystem?")
            for db in (self._db, self._reader):
                await db.execute("PRAGMA busy_timeout=5000")
            self._ingest_sync = "FULL" if synchronous == "full" else "NORMAL"
            await self._set_sync(self._ingest_sync)
            await self._migrate()
            self._next_event_seq = await self._scalar(self._db, "SELECT coalesce(max(seq), 0) + 1 FROM events")
            self._next_job_id = await self._scalar(self._db, "SELECT coalesce(max(id), 0) + 1 FROM jobs")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot use the database {self.path}: {e}") from e

    async def _migrate(self) -> None:
        version = await self._scalar(self._db, "PRAGMA user_version")
        if version > len(MIGRATIONS):
            raise StoreError(f"{self.path} has schema version {version}, newer than this eventrelay "
                             f"understands ({len(MIGRATIONS)}): upgrade eventrelay or use another file")
        for target in range(version + 1, len(MIGRATIONS) + 1):
            # executescript commits on its own; user_version is set inside the same script to stay atomic.
            await self._db.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATIONS[target - 1]}\nPRAGMA user_version={target};\nCOMMIT;")
            log.info("schema migrated", path=str(self.path), version=target)

    async def close(self) -> None:
        for db in (self._db, self._reader):
            try:
                await db.close()
            except Exception:  # noqa: BLE001 - closing what may be half-open; nothing to do about it
                pass
        os.close(self._lock_fd)

    @staticmethod
    async def _scalar(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await db.execute_fetchall(sql, params)
        return rows[0][0] if rows else None

    # -- the writer ---------------------------------------------------------------------------------------

    async def ingest(self, events: Sequence[Event], routes: Sequence[Sequence[str]]) -> list[Accepted]:
        """Store events and one job per routed integration; returns once committed. All or none."""
        return await self._submit(_Op("ingest", (events, routes)))

    async def record(self, records: Sequence[AttemptRecord]) -> None:
        """Write delivery outcomes: the job's new state and one attempt-log row each."""
        await self._submit(_Op("record", records))

    async def _submit(self, op: _Op) -> Any:
        self._queue.put_nowait(op)
        return await op.future

    async def run_writer(self) -> None:
        """Drain queued operations into shared transactions until `stop_writer`; then finish the queue."""
        while True:
            op = await self._queue.get()
            if op is None:
                return
            batch = [op]
            stop = False
            while len(batch) < _WRITER_BATCH and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            await self._commit_batch(batch)
            if stop:
                return

    def stop_writer(self) -> None:
        """Ask the writer to exit once everything queued so far is committed."""
        self._queue.put_nowait(None)

    async def _commit_batch(self, batch: list[_Op]) -> None:
        try:
            results, woken = await self._transaction(batch)
        except Exception as e:  # noqa: BLE001 - every failure must reach the waiting producers
            if len(batch) > 1 and not _is_storage_failure(e):
                # One bad operation must not fail its neighbours: retry them one transaction each.
                for op in batch:
                    await self._commit_batch([op])
                return
            error = StoreError(_explain(e))
            log.error("write failed; nothing from this transaction was stored", error=str(e), operations=len(batch))
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(error)
            return
        self.commits += 1
        self.committed_ops += len(batch)
        for op, result in zip(batch, results):
            if not op.future.done():
                op.future.set_result(result)
        if woken:
            self.on_jobs_added(woken)

    async def _set_sync(self, mode: str) -> None:
        if mode != self._sync:
            await self._db.execute(f"PRAGMA synchronous={mode}")
            self._sync = mode

    async def _transaction(self, batch: list[_Op]) -> tuple[list[Any], set[str]]:
        seq0, job0 = self._next_event_seq, self._next_job_id
        # Only acknowledgements need the fsync. A transaction of delivery outcomes alone commits without it:
        # WAL keeps commits in order, so power loss can only forget the last outcomes, and a forgotten
        # "delivered" means one more delivery (at least once), never a lost event. The next ingest commit
        # syncs them along with itself.
        await self._set_sync(self._ingest_sync if any(op.kind == "ingest" for op in batch) else "NORMAL")
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            now = time.time()
            results: list[Any] = []
            woken: set[str] = set()
            event_rows: list[tuple[Any, ...]] = []
            job_rows: list[tuple[Any, ...]] = []
            ingests = [op for op in batch if op.kind == "ingest"]
            known = await self._known_events(e.id for op in ingests for e in op.items[0] if e.id_given)
            for op in batch:
                if op.kind == "ingest":
                    results.append(self._plan_ingest(*op.items, now, known, event_rows, job_rows, woken))
                else:
                    results.append(None)
            if event_rows:
                await self._db.executemany(
                    "INSERT INTO events (seq, id, type, payload, accepted_at) VALUES (?, ?, ?, ?, ?)", event_rows)
            if job_rows:
                await self._db.executemany(
                    "INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)", job_rows)
            records = [r for op in batch if op.kind == "record" for r in op.items]
            if records:
                await self._write_records(records, now)
            await self._db.execute("COMMIT")
        except BaseException:
            self._next_event_seq, self._next_job_id = seq0, job0
            try:
                await self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite already rolled back (e.g. on SQLITE_FULL); the transaction is gone either way
            raise
        return results, woken

    async def _known_events(self, ids: Iterable[str]) -> dict[str, int]:
        """Producer-given ids already stored, with how many jobs each got: they are answered as duplicates."""
        wanted = list(dict.fromkeys(ids))
        known: dict[str, int] = {}
        for i in range(0, len(wanted), 500):  # stay under SQLite's bound-parameter limit
            chunk = wanted[i:i + 500]
            rows = await self._db.execute_fetchall(
                f"SELECT e.id, (SELECT count(*) FROM jobs WHERE event_seq = e.seq) FROM events e "
                f"WHERE e.id IN ({','.join('?' * len(chunk))})", chunk)
            known.update((r[0], r[1]) for r in rows)
        return known

    def _plan_ingest(self, events: Sequence[Event], routes: Sequence[Sequence[str]], now: float,
                     known: dict[str, int], event_rows: list[tuple[Any, ...]], job_rows: list[tuple[Any, ...]],
                     woken: set[str]) -> list[Accepted]:
        accepted = []
        for event, integrations in zip(events, routes):
            if event.id in known:
                accepted.append(Accepted(event.id, known[event.id], duplicate=True))
                continue
            seq = self._next_event_seq
            self._next_event_seq += 1
            payload = {"data": event.data}
            if event.included is not None:
                payload["included"] = event.included
            event_rows.append((seq, event.id, event.type, codec.dumps(payload), now))
            for name in integrations:
                job_rows.append((self._next_job_id, seq, name, now, now, now))
                self._next_job_id += 1
                woken.add(name)
            known[event.id] = len(integrations)  # a repeat later in the same transaction is a duplicate too
            accepted.append(Accepted(event.id, len(integrations), duplicate=False))
        return accepted

    async def _write_records(self, records: Sequence[AttemptRecord], now: float) -> None:
        await self._db.executemany(
            "UPDATE jobs SET state = ?, attempts = ?, next_at = coalesce(?, next_at), updated_at = ?, "
            "last_error = ? WHERE id = ?",
            [(r.state.value, r.job.attempt, r.next_at, now, r.outcome.error, r.job.id) for r in records])
        await self._db.executemany(
            "INSERT INTO attempts (job_id, integration, attempt, succeeded, created_at, duration, status_code, "
            "error_detail, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.job.id, r.job.integration, r.job.attempt, int(r.outcome.succeeded), r.started_at,
              r.outcome.duration, r.outcome.status_code, r.outcome.error, r.outcome.body) for r in records])

    # -- reads --------------------------------------------------------------------------------------------

    async def claim(self, integration: str, now: float, limit: int, exclude: Iterable[int] = ()) -> list[Job]:
        """Up to `limit` due jobs of one integration, oldest due first, skipping those already in flight."""
        excluded = list(exclude)
        rows = await self._reader.execute_fetchall(
            "SELECT j.id, j.attempts, e.id, e.type, e.payload, e.accepted_at FROM jobs j "
            "JOIN events e ON e.seq = j.event_seq "
            "WHERE j.integration = ? AND j.state = 'pending' AND j.next_at <= ? "
            f"{_not_in('j.id', excluded)} ORDER BY j.next_at, j.id LIMIT ?",
            (integration, now, *excluded, limit))
        return [Job(id=r[0], integration=integration, attempt=r[1] + 1, event_id=r[2], event_type=r[3],
                    payload=r[4], accepted_at=r[5]) for r in rows]

    async def next_due(self, integration: str, exclude: Iterable[int] = ()) -> float | None:
        """When the earliest pending job of an integration (not in flight) falls due, or None."""
        excluded = list(exclude)
        return await self._scalar(
            self._reader,
            "SELECT next_at FROM jobs WHERE integration = ? AND state = 'pending' "
            f"{_not_in('id', excluded)} ORDER BY next_at LIMIT 1", (integration, *excluded))

    async def job_counts(self) -> dict[tuple[str, str], int]:
        """(integration, state) → number of jobs."""
        rows = await self._reader.execute_fetchall(
            "SELECT integration, state, count(*) FROM jobs GROUP BY integration, state")
        return {(r[0], r[1]): r[2] for r in rows}

    async def attempts(self, job_id: int) -> list[dict[str, Any]]:
        rows = await self._reader.execute_fetchall(
            "SELECT id, attempt, succeeded, created_at, duration, status_code, error_detail, body "
            "FROM attempts WHERE job_id = ? ORDER BY id", (job_id,))
        keys = ("id", "attempt", "succeeded", "created_at", "duration", "status_code", "error_detail", "body")
        return [dict(zip(keys, r)) | {"succeeded": bool(r[2])} for r in rows]

    async def ping(self) -> bool:
        try:
            return await self._scalar(self._reader, "SELECT 1") == 1
        except (sqlite3.Error, ValueError):
            return False


def _not_in(column: str, values: list[int]) -> str:
    return f"AND {column} NOT IN ({','.join('?' * len(values))})" if values else ""


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
