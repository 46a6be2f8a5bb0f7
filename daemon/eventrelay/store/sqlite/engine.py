"""SqliteStore: the SQLite engine as the daemon sees it. Writes go to the writer process, reads to reads.py.

One writer owns every write: ingest and outcome operations queue up while the previous transaction commits,
and the next transaction takes all of them at once (group commit), so a thousand concurrent producers cost
one fsync, not a thousand. The writer is a process of its own (writer.py says why). Operations queued in one
turn of the event loop go to it as one frame on a Unix socket pair (sooner when many rows wait, see
`_enqueue`), and its answers come back the same way, so the event loop never waits for the GIL of a thread
that writes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog

from ...events import Event
from ...jobs import AttemptRecord, Job, JobState
from ..api import (DURATIONS_SAMPLE, SEARCH_SCAN, WATCHED_STATES, Accepted, AttemptView, AuditEntry, DaemonView,
                   JobSearch, JobView, LastAttempts, OutcomeCounts, Route, SearchPage, StoredEvent, StoreError)
from ..identity import Identity
from ..rows import event_rows
from . import files
from .reads import Reads
from .wire import ROW_OPS, Audit, Done, FrameReader, Op, Prune, Replay, Reply, Retry, SetDisabled, SetPaused, dumps, \
    outcome_rows

log = structlog.get_logger(component="store")

_SOURCE_ROOT = Path(__file__).resolve().parents[3]  # the folder the eventrelay package is in
_FLUSH_ROWS = 500  # events or outcomes waiting in the outbox that go to the writer without waiting for the turn's end
# Events that go to an idle writer at once rather than at the end of the turn: a commit of a few events (a
# wake-up of the writer, which takes a core from the event loop, and an fsync) costs more than waiting for
# the turn's end, so single-event requests are held and share a commit.
_EARLY_ROWS = 32
# Delivery outcomes held back while the writer commits, at most: more go at the end of the turn, so a writer
# that is the bottleneck finds its next transaction waiting, while holding every outcome back would leave it
# idle between transactions.
_HOLD_ROWS = 32
_WRITER_EXIT_WAIT = 30.0  # seconds for the writer to commit what it has and exit, once asked to


class _WriterProtocol(asyncio.Protocol):
    """The daemon's end of the socket to the writer: one frame per message (wire.dumps)."""

    def __init__(self, store: SqliteStore):
        self._store = store
        self._reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        for message in self._reader.feed(data):
            self._store._on_message(message)

    def eof_received(self) -> bool:
        return False  # close: the writer has said all it will

    def connection_lost(self, exc: Exception | None) -> None:
        self._store._on_writer_gone()


class SqliteStore:
    """The `Store` (store/api.py) on an SQLite file, which this daemon holds alone."""

    def __init__(self, path: Path, lock_fd: int, loop: asyncio.AbstractEventLoop):
        self.path = path
        self._lock_fd = lock_fd
        self._loop = loop
        self._proc: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self._reads: Reads | None = None
        # Operations not yet sent: they go to the writer in one frame, at the end of this turn of the event
        # loop, sooner, or (delivery outcomes) once the writer has answered what it has (see _enqueue).
        self._outbox: list[tuple[int, int, Any]] = []
        self._flush_scheduled = False  # a flush at the end of this turn of the loop
        # operation id -> (kind, future, the events of an ingest: its answer is made from them)
        self._waiting: dict[int, tuple[Op, asyncio.Future[Any], Any]] = {}
        self._next_op = 1
        self._outbox_rows = 0  # events and outcomes in the outbox
        self._writer_stopped = False
        self._started: asyncio.Future[None] = loop.create_future()
        self._gone: asyncio.Future[None] = loop.create_future()  # the socket to the writer closed
        self.commits = 0
        self._identity = Identity()
        self.id = self._identity.id
        self.shared = False
        self.on_jobs_added: Callable[[set[str]], None] = lambda names: None
        self.on_commit: Callable[[int, float], None] = lambda operations, seconds: None

    # -- opening and closing ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, synchronous: str = "full", file_mode: int = 0o600) -> SqliteStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The real file: a second daemon reaching it through a symlink must meet the same lock.
        path = path.resolve()
        lock_fd = await files.lock(path)
        try:
            files.restrict(path, file_mode)
        except OSError as e:
            os.close(lock_fd)
            raise StoreError(f"cannot set the permissions of {path}: {e.strerror or e}") from e
        store = cls(path, lock_fd, asyncio.get_running_loop())
        try:
            await store._start_writer(synchronous)
            # The writer has set WAL mode and migrated the schema: the readers can open now.
            store._reads = await Reads.open(path)
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
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(_SOURCE_ROOT),
                                                                        os.environ.get("PYTHONPATH")))))
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
            self.stop()
        if self._proc is not None:
            await self._wait_for_writer(_WRITER_EXIT_WAIT)
        if self._transport is not None:
            self._transport.close()
        if self._reads is not None:
            await self._reads.close()
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

    async def run(self) -> None:
        """Wait until the writer has exited: after `stop`, once it has committed everything queued.

        If the writer dies on its own (killed, out of memory), this raises StoreError, which stops the
        daemon (its service manager restarts it): every operation still unanswered failed, so nothing
        unacknowledged is lost, and nothing more can be stored.
        """
        try:
            await asyncio.shield(self._gone)
        except asyncio.CancelledError:
            self.stop()  # the writer commits what is queued, then exits: close() waits for it
            raise
        assert self._proc is not None
        code = await self._wait_for_writer(_WRITER_EXIT_WAIT)
        if not self._writer_stopped or code != 0:
            raise StoreError(f"the database writer process (pid {self._proc.pid}) {_exit_text(code)}; "
                             "events not yet answered were not stored. Restart eventrelay (systemd does)")

    def stop(self) -> None:
        """Ask the writer to exit once everything queued so far is committed."""
        if not self._writer_stopped:
            self._writer_stopped = True
            self._flush()
            if self._transport is not None and not self._transport.is_closing() and self._transport.can_write_eof():
                self._transport.write_eof()

    def announce(self, version: str, config_hash: str) -> None:
        self._identity.announce(version, config_hash)

    async def take_tokens(self, integration: str, rate: float, burst: float, want: int) -> tuple[int, float]:
        """Not asked: the store is this daemon's alone, so its dispatchers keep their rate limits themselves."""
        return want, 0.0

    async def daemons(self) -> list[DaemonView]:
        """This daemon alone: the file's lock keeps any other away."""
        return [self._identity.view(time.time())]

    async def ping(self) -> bool:
        """The database answers a read, and the writer is running."""
        if self._reads is None or self._gone.done():
            return False
        return await self._reads.ping()

    # -- writes: through the writer -------------------------------------------------------------------------

    async def ingest(self, events: Sequence[Event], routes: Sequence[Sequence[Route]]) -> list[Accepted]:
        return await self._enqueue(Op.INGEST, event_rows(events, routes))

    async def record(self, records: Sequence[AttemptRecord]) -> None:
        await self.record_later(records)

    def record_later(self, records: Sequence[AttemptRecord]) -> asyncio.Future[None]:
        return self._enqueue(Op.RECORD, outcome_rows(records))

    async def set_disabled(self, name: str, reason: str | None) -> None:
        await self._enqueue(Op.SET_DISABLED, tuple(SetDisabled(name, reason)))

    async def set_paused(self, name: str, paused: bool) -> None:
        await self._enqueue(Op.SET_PAUSED, tuple(SetPaused(name, paused)))

    async def audit(self, entry: AuditEntry) -> None:
        await self._enqueue(Op.AUDIT, tuple(Audit(entry.at, entry.action, entry.target, entry.scope,
                                                  entry.fingerprint, entry.address, entry.detail)))

    async def audit_log(self, before: int | None, limit: int) -> list[AuditEntry]:
        return await self._reader.audit_log(before, limit)

    async def paused(self) -> dict[str, float]:
        return await self._reader.paused()

    async def retry(self, integration: str, job_id: int) -> JobState | None:
        state = await self._enqueue(Op.RETRY, tuple(Retry(integration, job_id)))
        return JobState(state) if state is not None else None

    async def replay(self, integration: str, *, dead: bool = False, since: float | None = None,
                     until: float | None = None, not_requeued_since: float | None = None,
                     limit: int = 10_000) -> int:
        return await self._enqueue(Op.REPLAY, tuple(Replay(integration, dead, since, until, not_requeued_since,
                                                           limit)))

    async def prune(self, delivered_before: float, dead_before: float, batch: int = 1000) -> int:
        # Small batches through the writer: each is one short transaction, so ingest never waits long.
        deleted: int = await self._enqueue(Op.PRUNE, tuple(Prune(delivered_before, dead_before, batch)))
        if deleted:
            await self._enqueue(Op.VACUUM, ())
        return deleted

    def _enqueue(self, kind: Op, items: Any) -> asyncio.Future[Any]:
        """Queue an operation for the writer (marshal takes plain tuples only: `items` is one, or a list of
        them); the future resolves with its result once committed."""
        future = self._loop.create_future()
        if self._writer_stopped or self._gone.done():
            future.set_exception(StoreError("the store is closing; nothing more is written" if self._writer_stopped
                                            else "the database writer process has ended; nothing more is written"))
            return future
        op_id = self._next_op
        self._next_op += 1
        busy = len(self._waiting) > len(self._outbox)  # the writer has operations of ours to commit
        self._waiting[op_id] = (kind, future, items if kind is Op.INGEST else None)
        self._outbox.append((op_id, kind.value, items))
        self._outbox_rows += len(items) if kind in ROW_OPS else 1
        if self._outbox_rows >= _FLUSH_ROWS or (not busy and kind is not Op.RECORD
                                                 and self._outbox_rows >= _EARLY_ROWS):
            # Do not hold an idle writer until the end of this turn of the loop, which may parse a burst of
            # requests first: it commits this much now while the loop parses the rest, and takes those in its
            # next transaction. Not for a few events: their own commit would cost more than the wait.
            self._flush()
        elif kind is not Op.RECORD or not busy or self._outbox_rows >= _HOLD_ROWS:
            self._flush_soon()
        # Else a delivery outcome waits until the writer answers (_settle), which then takes all that came
        # meanwhile in one transaction: nobody waits for an outcome, and sending each turn's outcomes would
        # cost the loop a send and the writer a wake-up and a commit per few deliveries.
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
            self._transport.write(dumps(self._outbox))
        self._outbox = []
        self._outbox_rows = 0

    # -- what the writer says ---------------------------------------------------------------------------------

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == Reply.DONE:
            self._settle(Done._make(message[1:]))
        elif kind == Reply.LOG:
            _, level, event, fields = message
            getattr(log, level)(event, **fields)
        elif kind == Reply.READY:
            self._started.set_result(None)
        elif kind == Reply.FAILED:
            self._started.set_exception(StoreError(message[1]))

    def _settle(self, done: Done) -> None:
        """Answer the producers of what one transaction of the writer committed (or failed to)."""
        waiting = self._waiting
        if len(waiting) - len(done.ids) == len(self._outbox):
            self._flush()  # the writer has nothing else of ours: send what waited for it (_enqueue)
        if done.error is not None:
            failure = StoreError(done.error)
            log.error("write failed; nothing from this transaction was stored", error=done.detail,
                      operations=len(done.ids))
            for op_id in done.ids:
                _, future, _ = waiting.pop(op_id)
                if not future.done():
                    future.set_exception(failure)
            return
        self.commits += 1
        self.on_commit(len(done.ids), done.seconds)
        for op_id, result in zip(done.ids, done.results or ()):
            kind, future, events = waiting.pop(op_id)
            if not future.done():
                future.set_result(_accepted(events, result) if kind is Op.INGEST else result)
        if done.woken:
            self.on_jobs_added(set(done.woken))

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

    # -- reads (reads.py) ---------------------------------------------------------------------------------------

    @property
    def _reader(self) -> Reads:
        assert self._reads is not None, "the store is not open"
        return self._reads

    async def claim(self, integration: str, now: float, limit: int, exclude: Iterable[int] = (),
                    ordered: bool = False, only: Iterable[int] | None = None) -> list[Job]:
        return self._reader.claim(integration, now, limit, exclude, ordered, only)

    async def next_due(self, integration: str, exclude: Iterable[int] = (), ordered: bool = False) -> float | None:
        return self._reader.next_due(integration, exclude, ordered)

    async def release(self, job_ids: Iterable[int]) -> None:
        """Nothing to do: claims are held in the daemon's memory only, and this daemon is the database's one."""

    async def disabled(self) -> dict[str, tuple[float, str]]:
        return await self._reader.disabled()

    async def job_counts(self, states: Iterable[JobState] = WATCHED_STATES) -> dict[tuple[str, JobState], int]:
        return await self._reader.job_counts(states)

    async def backlog(self, integrations: Sequence[str], cap: int) -> dict[tuple[str, JobState], int]:
        return await self._reader.backlog(integrations, cap)

    async def oldest_pending(self) -> dict[str, float]:
        return await self._reader.oldest_pending()

    async def outcomes_since(self, since: float) -> dict[str, OutcomeCounts]:
        return await self._reader.outcomes_since(since)

    async def outcomes_by_minute(self, integration: str, since: float) -> list[tuple[float, OutcomeCounts]]:
        return await self._reader.outcomes_by_minute(integration, since)

    async def last_attempts(self, integration: str) -> LastAttempts:
        return await self._reader.last_attempts(integration)

    async def jobs(self, integration: str | None = None, state: JobState | None = None, limit: int = 25,
                   offset: int = 0, event_id: str | None = None) -> tuple[list[JobView], int]:
        return await self._reader.jobs(integration, state, limit, offset, event_id)

    async def job(self, integration: str, job_id: int) -> JobView | None:
        return await self._reader.job(integration, job_id)

    async def logs(self, integration: str | None = None, job_id: int | None = None, limit: int = 25,
                   offset: int = 0) -> tuple[list[AttemptView], int]:
        return await self._reader.logs(integration, job_id, limit, offset)

    async def attempts(self, job_id: int) -> list[AttemptView]:
        rows, _ = await self._reader.logs(None, job_id, limit=1_000_000, offset=0)
        return rows[::-1]

    async def attempts_after(self, after: int, limit: int) -> list[AttemptView]:
        return await self._reader.attempts_after(after, limit)

    async def attempts_before(self, integration: str | None, before: int | None, limit: int) -> list[AttemptView]:
        return await self._reader.attempts_before(integration, before, limit)

    async def durations(self, integration: str, since: float, limit: int = DURATIONS_SAMPLE) -> list[float]:
        return await self._reader.durations(integration, since, limit)

    async def search(self, query: JobSearch, limit: int, scan: int = SEARCH_SCAN) -> SearchPage:
        return await self._reader.search(query, limit, scan)

    async def events(self, limit: int = 25, offset: int = 0) -> tuple[list[StoredEvent], int]:
        return await self._reader.events(limit, offset)

    async def event(self, event_id: str) -> StoredEvent | None:
        return await self._reader.event(event_id)


def _accepted(events: list[tuple[Any, ...]], duplicates: list[tuple[int, int]]) -> list[Accepted]:
    """The answer to an ingest: each event as sent to the writer (an EventRow) with as many jobs as routes,
    except the duplicates the writer found, as (index, jobs they got then). Made here rather than sent back
    for every event: decoding an answer per event cost the event loop more than this."""
    accepted = [Accepted(event[0], len(event[4]), False) for event in events]
    for i, jobs in duplicates:
        accepted[i] = Accepted(events[i][0], jobs, True)
    return accepted


def _exit_text(code: int | None) -> str:
    if code is None:
        return "closed its connection"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
