"""SQLite: the store the daemon talks to. Writes go to the writer process, reads are done here.

One writer owns every write: ingest and outcome operations queue up while the previous transaction commits,
and the next transaction takes all of them at once (group commit), so a thousand concurrent producers cost
one fsync, not a thousand. The writer is a process of its own (daemon/writer.py says why, and holds the
schema and every write statement). Operations queued in one turn of the event loop go to it as one frame on
a Unix socket pair (sooner when many rows wait, see `_enqueue`), and its answers come back the same way,
so the event loop never waits for the GIL of a thread that writes.

Reads go through connections of their own, which WAL lets run beside the writer: the dispatchers' claims
through one on the event loop's thread (see `claim`), everything else (status, the admin API) through
aiosqlite's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite
import structlog

from .events import Event
from .jobs import AttemptRecord, Job, JobState
from .writer import DEAD_LETTER_TYPE, MIGRATIONS, WireReader, damaged, wire_dumps

__all__ = ["DEAD_LETTER_TYPE", "MIGRATIONS", "Accepted", "Route", "Store", "StoreError"]

log = structlog.get_logger(component="store")

# The claims' connection runs on the event loop's thread, so how long a busy database may stall it is
# bounded: a WAL reader waits only in rare moments (another connection recovering the WAL), and a claim
# that times out is retried by its dispatcher a second later.
_CLAIMS_BUSY_TIMEOUT_MS = 200
# At start-up the lock may still be held, for a moment, by the writer of a daemon that was just killed (the
# kernel kills it with its parent, but not in the same instant).
_LOCK_WAIT = 3.0
_FLUSH_ROWS = 500  # events or outcomes waiting in the outbox that go to the writer without waiting for the turn's end
# Events that go to an idle writer at once rather than at the end of the turn. Sending every request to an
# idle writer at once made commits of one event followed by one of the rest of the turn: at 32 connections of
# one event per request, 9.5 events per commit against 10.2 when held, the event loop 82 against 74 µs of CPU
# per request, and requests per second 10 % lower (medians of eight alternating pairs), as each commit wakes
# the writer, which takes a vCPU from the event loop. Batches of 100 events: no difference.
_EARLY_ROWS = 32
# Delivery outcomes held back while the writer commits, at most: more go at the end of the turn, so a writer
# that is the bottleneck finds its next transaction waiting. Holding all of them halved the rate of a
# dispatcher with an instant sender (25,000 outcomes/s against 50,000); holding 32, 40-46,000.
_HOLD_ROWS = 32
_WRITER_EXIT_WAIT = 30.0  # seconds for the writer to commit what it has and exit, once asked to

Route = tuple[str, str | None]  # an integration to queue an event for, and the job's ordering key


class StoreError(Exception):
    """The store could not do what was asked; nothing of that operation was written."""


class Accepted(NamedTuple):
    """What ingest answers for one event. A named tuple, as `Event` is: made in half the time of a frozen
    dataclass, once per event."""

    id: str
    jobs: int
    duplicate: bool


class _WriterProtocol(asyncio.Protocol):
    """The daemon's end of the socket to the writer: one frame per message (writer.wire_dumps)."""

    def __init__(self, store: Store):
        self._store = store
        self._reader = WireReader()

    def data_received(self, data: bytes) -> None:
        for message in self._reader.feed(data):
            self._store._on_message(message)

    def eof_received(self) -> bool:
        return False  # close: the writer has said all it will

    def connection_lost(self, exc: Exception | None) -> None:
        self._store._on_writer_gone()


class Store:
    def __init__(self, path: Path, lock_fd: int, loop: asyncio.AbstractEventLoop):
        self.path = path
        self._lock_fd = lock_fd
        self._loop = loop
        self._proc: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self._reader: aiosqlite.Connection | None = None
        self._claims: sqlite3.Connection | None = None  # used only on the event loop's thread
        # Operations not yet sent: they go to the writer in one frame, at the end of this turn of the event
        # loop, sooner, or (delivery outcomes) once the writer has answered what it has (see _enqueue).
        self._outbox: list[list[Any]] = []
        self._flush_scheduled = False  # a flush at the end of this turn of the loop
        # operation id -> (kind, future, the events of an ingest: its answer is made from them)
        self._waiting: dict[int, tuple[str, asyncio.Future[Any], Any]] = {}
        self._next_op = 1
        self._outbox_rows = 0  # events and outcomes in the outbox
        self._writer_stopped = False
        self._started: asyncio.Future[None] = loop.create_future()
        self._gone: asyncio.Future[None] = loop.create_future()  # the socket to the writer closed
        self.commits = 0  # transactions committed by the writer (tests check that commits are shared)
        # Called after each commit with the integrations that got new jobs, so their dispatchers wake at once.
        self.on_jobs_added: Callable[[set[str]], None] = lambda names: None
        # Called after each commit with (operations, seconds): the group-commit metrics.
        self.on_commit: Callable[[int, float], None] = lambda operations, seconds: None

    # -- opening and closing ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, synchronous: str = "full", file_mode: int = 0o600) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The real file: a second daemon reaching it through a symlink must meet the same lock.
        path = path.resolve()
        lock_fd = await _lock(path)
        try:
            _restrict(path, file_mode)
        except OSError as e:
            os.close(lock_fd)
            raise StoreError(f"cannot set the permissions of {path}: {e.strerror or e}") from e
        store = cls(path, lock_fd, asyncio.get_running_loop())
        try:
            await store._start_writer(synchronous)
            # The writer has set WAL mode and migrated the schema: the readers can open now.
            store._reader = await aiosqlite.connect(path, isolation_level=None)
            await store._reader.execute("PRAGMA busy_timeout=5000")
            store._claims = sqlite3.connect(path, isolation_level=None)
            store._claims.execute(f"PRAGMA busy_timeout={_CLAIMS_BUSY_TIMEOUT_MS}")
            store._claims.execute("PRAGMA query_only=ON")
        except (sqlite3.Error, OSError) as e:
            await store.close()
            raise StoreError(f"cannot open the database {path}: {e}") from e
        except BaseException:
            await store.close()
            raise
        return store

    async def _start_writer(self, synchronous: str) -> None:
        ours, theirs = socket.socketpair()
        # The package may run from a source tree that is not installed: the writer imports it from there too.
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
        try:
            # The lock's descriptor goes along: the lock is held until the writer is gone too.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", f"{__package__}.writer", "--socket-fd", str(theirs.fileno()),
                 "--parent", str(os.getpid()), "--synchronous", synchronous, str(self.path)],
                pass_fds=(theirs.fileno(), self._lock_fd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env=env)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            self._transport, _ = await self._loop.connect_accepted_socket(lambda: _WriterProtocol(self), ours)
        except BaseException:
            ours.close()  # the writer sees the end of its socket and exits
            raise
        await self._started

    async def close(self) -> None:
        if self._transport is not None:
            self.stop_writer()
        if self._proc is not None:
            await self._wait_for_writer(_WRITER_EXIT_WAIT)
        if self._transport is not None:
            self._transport.close()
        if self._reader is not None:
            try:
                await self._reader.close()
            except Exception:  # noqa: BLE001 - closing what may be half-open; nothing to do about it
                pass
        if self._claims is not None:
            self._claims.close()
        os.close(self._lock_fd)

    async def _wait_for_writer(self, timeout: float) -> int:
        """The writer's exit code, once it has exited; killed if it takes longer than `timeout`."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while (code := self._proc.poll()) is None:
            if time.monotonic() > deadline:
                log.error("the database writer did not exit in time; killing it", pid=self._proc.pid,
                          waited_s=timeout)
                self._proc.kill()
                return self._proc.wait()
            await asyncio.sleep(0.01)
        return code

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read for status and the admin API; a failure is a StoreError that says what to do."""
        assert self._reader is not None
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as e:
            raise StoreError(_read_failure(self.path, e)) from e

    async def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await self._fetch(sql, params)
        return rows[0][0] if rows else None

    # -- the writer ---------------------------------------------------------------------------------------

    async def ingest(self, events: Sequence[Event], routes: Sequence[Sequence[Route]]) -> list[Accepted]:
        """Store events and one job per routed integration; returns once committed. All or none.

        `routes[i]` lists, for events[i], the integrations to queue it for with its ordering key (or None).
        """
        return await self._enqueue("ingest", [[e.id, e.type, e.payload, e.id_given, r]
                                              for e, r in zip(events, routes)])

    async def record(self, records: Sequence[AttemptRecord]) -> None:
        """Write delivery outcomes: the job's new state and one attempt-log row each."""
        await self.record_later(records)

    def record_later(self, records: Sequence[AttemptRecord]) -> asyncio.Future[None]:
        """Queue delivery outcomes for the writer's next transaction; the future resolves once committed."""
        # In the order of writer.RECORD_FIELDS.
        return self._enqueue("record", [
            [r.job.id, r.job.integration, r.state.value, r.job.attempt, r.next_at, r.outcome.error,
             int(r.outcome.succeeded), r.started_at, r.outcome.duration, r.outcome.status_code, r.outcome.body,
             r.dead_letter, r.job.event_id, r.job.event_type] for r in records])

    async def _call(self, name: str, *args: Any) -> Any:
        """Run the admin write `name` (a method of writer.Writer) inside the writer's next transaction."""
        return await self._enqueue("call", [name, args])

    def _enqueue(self, kind: str, items: Any) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        if self._writer_stopped or self._gone.done():
            future.set_exception(StoreError("the store is closing; nothing more is written" if self._writer_stopped
                                            else "the database writer process has ended; nothing more is written"))
            return future
        op_id = self._next_op
        self._next_op += 1
        busy = len(self._waiting) > len(self._outbox)  # the writer has operations of ours to commit
        self._waiting[op_id] = (kind, future, items if kind == "ingest" else None)
        self._outbox.append([op_id, kind, items])
        self._outbox_rows += len(items) if kind in ("ingest", "record") else 1
        if self._outbox_rows >= _FLUSH_ROWS or (not busy and kind != "record" and self._outbox_rows >= _EARLY_ROWS):
            # Do not hold an idle writer until the end of this turn of the loop, which may parse a burst of
            # requests first (32 requests of 100 events: tens of milliseconds): it commits this much now
            # while the loop parses the rest, and takes those in its next transaction. Not for a few events:
            # their own commit (a wake-up of the writer, an fsync) cost more than waiting for the turn's end.
            self._flush()
        elif kind != "record" or not busy or self._outbox_rows >= _HOLD_ROWS:
            self._flush_soon()
        # Else a delivery outcome waits until the writer answers (_settle), which then takes all that came
        # meanwhile in one transaction: nobody waits for an outcome, and sending each turn's outcomes cost
        # the loop a send and the writer a wake-up and a commit per few deliveries.
        return future

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_at_turn_end)

    def _flush_at_turn_end(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        if self._outbox and self._transport is not None and not self._transport.is_closing():
            self._transport.write(wire_dumps(self._outbox))
        self._outbox = []
        self._outbox_rows = 0

    async def run_writer(self) -> None:
        """Wait until the writer has exited: after `stop_writer`, once it has committed everything queued.

        If the writer dies on its own (killed, out of memory), this raises StoreError, which stops the
        daemon (its service manager restarts it): every operation still unanswered failed, so nothing
        unacknowledged is lost, and nothing more can be stored.
        """
        try:
            await asyncio.shield(self._gone)
        except asyncio.CancelledError:
            self.stop_writer()  # the writer commits what is queued, then exits: close() waits for it
            raise
        assert self._proc is not None
        code = await self._wait_for_writer(_WRITER_EXIT_WAIT)
        if not self._writer_stopped or code != 0:
            raise StoreError(f"the database writer process (pid {self._proc.pid}) {_exit_text(code)}; "
                             "events not yet answered were not stored. Restart eventrelay (systemd does)")

    def stop_writer(self) -> None:
        """Ask the writer to exit once everything queued so far is committed."""
        if not self._writer_stopped:
            self._writer_stopped = True
            self._flush()
            if self._transport is not None and not self._transport.is_closing() and self._transport.can_write_eof():
                self._transport.write_eof()

    def _on_message(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "done":
            self._settle(*message[1:])
        elif kind == "log":
            _, level, event, fields = message
            getattr(log, level)(event, **fields)
        elif kind == "ready":
            self._started.set_result(None)
        elif kind == "failed":
            self._started.set_exception(StoreError(message[1]))

    def _settle(self, ids: list[int], results: list[Any] | None, woken: list[str], seconds: float,
                error: str | None, detail: str | None) -> None:
        """Answer the producers of what one transaction of the writer committed (or failed to)."""
        waiting = self._waiting
        if len(waiting) - len(ids) == len(self._outbox):
            self._flush()  # the writer has nothing else of ours: send what waited for it (_enqueue)
        if error is not None:
            failure = StoreError(error)
            log.error("write failed; nothing from this transaction was stored", error=detail, operations=len(ids))
            for op_id in ids:
                _, future, _ = waiting.pop(op_id)
                if not future.done():
                    future.set_exception(failure)
            return
        self.commits += 1
        self.on_commit(len(ids), seconds)
        for op_id, result in zip(ids, results or ()):
            kind, future, events = waiting.pop(op_id)
            if not future.done():
                future.set_result(_accepted(events, result) if kind == "ingest" else result)
        if woken:
            self.on_jobs_added(set(woken))

    def _on_writer_gone(self) -> None:
        if not self._gone.done():
            self._gone.set_result(None)
        code = self._proc.poll() if self._proc is not None else None
        if not self._started.done():
            self._started.set_exception(StoreError(
                f"the database writer for {self.path} {_exit_text(code)} while starting; its error is above"))
        failure = StoreError("the database writer process ended before it committed this; nothing was stored")
        for _, future, _ in self._waiting.values():
            if not future.done():
                future.set_exception(failure)
        self._waiting.clear()

    # -- integration state --------------------------------------------------------------------------------

    async def disabled(self) -> dict[str, tuple[float, str]]:
        """Integrations disabled by their target (410 Gone): name → (when, why)."""
        assert self._reader is not None
        rows = await self._fetch(
            "SELECT name, disabled_at, disabled_reason FROM integration_state WHERE disabled_at IS NOT NULL")
        return {r[0]: (r[1], r[2]) for r in rows}

    async def set_disabled(self, name: str, reason: str | None) -> None:
        """Disable an integration with a reason, or (reason None) enable it again. Survives restarts."""
        await self._call("set_disabled", name, reason)

    # -- reads --------------------------------------------------------------------------------------------

    async def claim(self, integration: str, now: float, limit: int, exclude: Iterable[int] = (),
                    ordered: bool = False, only: Iterable[int] | None = None) -> list[Job]:
        """Up to `limit` due jobs of one integration, oldest due first, skipping those already in flight.

        `only`: among these jobs alone (those an operator asked to send now).

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
        chosen = _padded(only) if only is not None else []
        heads_only = ("AND (j.ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM jobs k WHERE "
                      "k.integration = j.integration AND k.ordering_key = j.ordering_key AND k.state = 'pending' "
                      "AND k.id < j.id)) ") if ordered else ""
        rows = self._read_claims(
            "SELECT j.id, j.attempts, e.id, e.type, e.payload, e.accepted_at, coalesce(j.requeued_at, e.accepted_at) "
            "FROM jobs j "
            "JOIN events e ON e.seq = j.event_seq "
            "WHERE j.integration = ? AND j.state = 'pending' AND j.next_at <= ? "
            f"{_not_in('j.id', excluded)} {_in('j.id', chosen, only is not None)} {heads_only}"
            "ORDER BY j.next_at, j.id LIMIT ?",
            (integration, now, *excluded, *chosen, limit))
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
        rows = await self._fetch(
            "SELECT integration, state, count(*) FROM jobs WHERE state IN ('pending', 'dead') "
            "GROUP BY integration, state")
        return {(r[0], r[1]): r[2] for r in rows}

    async def oldest_pending(self) -> dict[str, float]:
        """integration → when its oldest pending job was created."""
        rows = await self._fetch(
            "SELECT integration, min(created_at) FROM jobs WHERE state = 'pending' GROUP BY integration")
        return {r[0]: r[1] for r in rows}

    async def outcomes_since(self, since: float) -> dict[str, dict[str, int]]:
        """integration -> attempts delivered, failed (to be retried) and dead since `since` (to the minute)."""
        rows = await self._fetch(
            "SELECT integration, sum(delivered), sum(failed), sum(dead) FROM outcome_minutes WHERE minute >= ? "
            "GROUP BY integration", (int(since // 60),))
        return {r[0]: {"delivered": r[1], "failed": r[2], "dead": r[3]} for r in rows}

    async def last_attempts(self, integration: str) -> dict[str, tuple[float, str | None] | None]:
        """The latest successful and failed attempt of an integration: (time, error) each, or None."""
        result: dict[str, tuple[float, str | None] | None] = {}
        for key, succeeded in (("success", 1), ("failure", 0)):
            rows = await self._fetch(
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
        rows = await self._fetch(
            f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN events e ON e.seq = j.event_seq WHERE {where} "
            "ORDER BY j.id DESC LIMIT ? OFFSET ?", (*params, limit, offset))
        total = await self._scalar(f"SELECT count(*) FROM jobs j WHERE {where}", params)
        return [_job_row(r) for r in rows], total

    async def job(self, integration: str, job_id: int) -> dict[str, Any] | None:
        rows = await self._fetch(
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
        rows = await self._fetch(
            "SELECT id, job_id, integration, attempt, succeeded, created_at, duration, status_code, error_detail, "
            f"body FROM attempts {where} ORDER BY id DESC LIMIT ? OFFSET ?", (*params, limit, offset))
        total = await self._scalar(f"SELECT count(*) FROM attempts {where}", params)
        keys = ("id", "job_id", "integration", "attempt", "succeeded", "created_at", "duration", "status_code",
                "error_detail", "body")
        return [dict(zip(keys, r)) | {"succeeded": bool(r[4])} for r in rows], total

    async def attempts(self, job_id: int) -> list[dict[str, Any]]:
        """Every attempt of one job, oldest first."""
        rows, _ = await self.logs(None, job_id, limit=1_000_000, offset=0)
        return rows[::-1]


    async def retry(self, integration: str, job_id: int) -> str | None:
        """Make a pending or dead job due now. Returns the state it had (None: no such job)."""
        return await self._call("retry", integration, job_id)

    async def replay(self, integration: str, *, dead: bool = False, since: float | None = None,
                     until: float | None = None, not_requeued_since: float | None = None,
                     limit: int = 10_000) -> int:
        """Re-queue up to `limit` jobs: the dead ones, or those created in [since, until) whatever their state.

        Jobs already pending are left alone (they are on their way). Each replayed job gets a fresh max_age.
        `not_requeued_since` skips jobs re-queued since then, so a replay done in batches ends.
        """
        return await self._call("replay", integration, dead, since, until, not_requeued_since, limit)

    async def prune(self, delivered_before: float, dead_before: float, batch: int = 1000) -> int:
        """Delete one batch of finished jobs past their retention, their attempts, and events nothing needs.

        Small batches through the writer: each is one short transaction, so ingest never waits long.
        Returns how many rows went; call again until it returns 0.
        """
        deleted: int = await self._call("prune", delivered_before, dead_before, batch)
        if deleted:
            await self._enqueue("after", "incremental_vacuum")
        return deleted

    async def ping(self) -> bool:
        """The database answers a read, and the writer is running."""
        if self._reader is None or self._gone.done():
            return False
        try:
            return await self._scalar("SELECT 1") == 1
        except (StoreError, ValueError):
            return False


_JOB_COLUMNS = ("j.id, j.integration, e.id, e.type, j.state, j.attempts, j.created_at, j.updated_at, "
                "j.next_at, j.last_error")


def _job_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": r[0], "integration": r[1], "event_id": r[2], "event_type": r[3], "state": r[4],
            "attempts": r[5], "created_at": r[6], "updated_at": r[7],
            "next_attempt_at": r[8] if r[4] == JobState.PENDING else None, "last_error": r[9]}




def _not_in(column: str, values: list[int]) -> str:
    return f"AND {column} NOT IN ({','.join('?' * len(values))})" if values else ""


def _in(column: str, values: list[int], filtered: bool) -> str:
    if not filtered:
        return ""
    return f"AND {column} IN ({','.join('?' * len(values))})" if values else "AND 0"


def _padded(ids: Iterable[int]) -> list[int]:
    """Ids to exclude, padded with -1 (never a job id) to a power of two: a handful of distinct statement
    texts, which the sqlite3 module's statement cache keeps prepared (a claim excludes a different number of
    jobs each time, and preparing the statement anew cost more than running it)."""
    values = list(ids)
    if values:
        values += [-1] * ((1 << (len(values) - 1).bit_length()) - len(values))
    return values




def _accepted(events: list[list[Any]], duplicates: list[list[int]]) -> list[Accepted]:
    """The answer to an ingest: each event as sent to the writer ([id, type, payload, id given, routes]) with
    as many jobs as routes, except the duplicates the writer found ([index, jobs they got then]). Made here
    rather than sent back for every event: decoding [id, jobs, duplicate] for each was about 4 % of the event
    loop's samples at 100 events per request (py-spy)."""
    accepted = [Accepted(event[0], len(event[4]), False) for event in events]
    for i, jobs in duplicates:
        accepted[i] = Accepted(events[i][0], jobs, True)
    return accepted


async def _lock(path: Path) -> int:
    """Hold an exclusive lock beside the database: two daemons on one file would deliver everything twice."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                continue
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(f"{path} is in use by another eventrelay process (pid {holder}); stop it first, "
                             "or give this one its own storage.path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_failure(path: Path, e: sqlite3.Error) -> str:
    if any(s in str(e) for s in ("malformed", "not a database", "corrupt")):
        return damaged(str(path), f"SQLite: {e}")
    return f"the database {path} could not be read: {e}"


def _restrict(path: Path, mode: int) -> None:
    """Create the database file with `mode` whatever the umask, or bring an existing one (and its WAL and
    shared memory) to it. SQLite gives the WAL and shared-memory files it creates the database file's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                if file.stat().st_mode & 0o777 != mode:
                    file.chmod(mode)
    else:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits off
        finally:
            os.close(fd)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "closed its connection"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
