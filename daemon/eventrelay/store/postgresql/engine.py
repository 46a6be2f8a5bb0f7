"""PostgresStore: the storage API on a PostgreSQL database that several daemons share.

Writes queue up while the previous commit of their kind is in flight and the next commit takes all of them
(group commit): one statement for a batch of ingests, one for a batch of outcomes. Claims mark jobs with this
daemon's id and a lease, renewed while the jobs are held; a daemon that dies leaves leases that run out, and
the others claim the jobs then. New jobs are announced with NOTIFY, so every daemon's dispatchers wake.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import asyncpg
import structlog

from ...aio import Backoff, cancel, wait_event
from ...config import PostgresConfig
from ...events import Event
from ...jobs import AttemptRecord, Job, JobState
from ..api import (DURATIONS_SAMPLE, SEARCH_SCAN, WATCHED_STATES, Accepted, AttemptView, AuditEntry, DaemonView,
                   JobSearch, JobView, LastAttempts, OutcomeCounts, Route, SearchPage, StoredEvent, StoreError)
from ..identity import Identity
from ..rows import EventRow, event_rows
from . import schema
from .connect import (COMMAND_TIMEOUT, CONNECT_TIMEOUT, RECONNECT_MAX, SERVER_SETTINGS, UNAVAILABLE, Transaction,
                      rollback_if_open, split_timeout, store_error, wait_for_database)
from .reads import Reads
from .writes import WAKE_ALL, Statements, dead_letter_rows, forward_dead, ingest_arguments, \
    job_from_row, record_arguments

log = structlog.get_logger(component="store")

_LISTENER_CHECK = 1.0  # seconds between checks that the connection receiving wake-ups is alive
_HEARTBEAT = 5.0  # seconds between a daemon's heartbeats
LIVE_WITHIN = 3 * _HEARTBEAT  # seconds: a daemon silent for longer is no longer listed among the live ones



_CONFLICTS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


class _Lane:
    """Operations of one kind waiting for the next commit of their kind."""

    def __init__(self) -> None:
        self.queue: list[tuple[Any, asyncio.Future[Any]]] = []
        self.ready = asyncio.Event()

    def put(self, items: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        future = loop.create_future()
        self.queue.append((items, future))
        self.ready.set()
        return future


class PostgresStore:
    """The `Store` (store/api.py) on a PostgreSQL schema shared by every daemon that names it."""

    def __init__(self, config: PostgresConfig, pool: asyncpg.Pool, loop: asyncio.AbstractEventLoop):
        self.config = config
        self._identity = Identity()
        self.id = self.me = self._identity.id  # this daemon, in leases and among the daemons
        self.shared = True
        self._pool = pool
        self._loop = loop
        self._sql = Statements(config.schema)
        self._reads = Reads(config.schema, self._fetch)
        self._ingests = _Lane()
        self._records = _Lane()
        self._held: dict[int, None] = {}  # jobs this daemon claimed and has not recorded or released
        self._seen: set[str] = set()  # integrations this daemon has claimed for: woken after a missed NOTIFY
        self._stopping = False
        self._announced = asyncio.Event()  # set by announce(): a heartbeat with the news goes at once
        self.commits = 0
        self.on_jobs_added: Callable[[set[str]], None] = lambda names: None
        self.on_commit: Callable[[int, float], None] = lambda operations, seconds: None

    # -- opening and closing ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, config: PostgresConfig, on_wait: Callable[[str, float], None] | None = None
                   ) -> PostgresStore:
        """Connect (waiting for a database that cannot be reached yet), migrate the schema, and return."""
        dsn, timeout = split_timeout(config.dsn)
        pool = await wait_for_database(config, on_wait, lambda: asyncpg.create_pool(
            dsn, min_size=1, max_size=config.pool, timeout=timeout, server_settings=SERVER_SETTINGS,
            reset=rollback_if_open, command_timeout=COMMAND_TIMEOUT))
        try:
            async with pool.acquire() as db:
                applied = await schema.migrate(db, config.schema)
        except schema.SchemaTooNew as e:
            await pool.close()
            raise StoreError(f"the schema {config.schema} in {config.shown_dsn} is at version {e.found}, newer than "
                             f"this eventrelay understands ({e.known}): upgrade eventrelay on this host") from None
        except BaseException as e:
            await pool.close()
            if isinstance(e, (asyncpg.PostgresError, *UNAVAILABLE)):
                raise StoreError(f"cannot prepare the schema {config.schema} in {config.shown_dsn}: {e}") from e
            raise
        for version in applied:
            log.info("schema migrated", schema=config.schema, version=version)
        return cls(config, pool, asyncio.get_running_loop())

    async def run(self) -> None:
        """Commit queued writes, renew leases and receive wake-ups until `stop`; returns once what was
        queued before it is written."""
        async with asyncio.TaskGroup() as tasks:
            lanes = [tasks.create_task(self._drain(self._ingests, self._commit_ingests), name="store-ingests"),
                     tasks.create_task(self._drain(self._records, self._commit_records), name="store-outcomes")]
            helpers = [tasks.create_task(self._renew_leases(), name="store-leases"),
                       tasks.create_task(self._listen(), name="store-wakeups"),
                       tasks.create_task(self._heartbeat(), name="store-heartbeat")]
            try:
                await asyncio.gather(*lanes)
            finally:
                for task in helpers:
                    await cancel(task)

    def stop(self) -> None:
        self._stopping = True
        self._ingests.ready.set()
        self._records.ready.set()

    async def close(self) -> None:
        self.stop()
        try:
            await self._pool.execute(self._sql.forget_daemons, self.id, timeout=5.0)
        except (asyncpg.PostgresError, *UNAVAILABLE):
            pass  # the row ages out of status on its own
        if self._held:
            try:
                await self.release(list(self._held))
            except StoreError as e:
                log.warning("cannot release the jobs this daemon held; other daemons take them when their "
                            "leases run out", error=str(e), jobs=len(self._held))
        await self._pool.close()

    async def ping(self) -> bool:
        try:
            return await self._pool.fetchval("SELECT 1", timeout=5.0) == 1
        except (asyncpg.PostgresError, *UNAVAILABLE):
            return False

    # -- group commits ------------------------------------------------------------------------------------

    def _put(self, lane: _Lane, items: Any) -> asyncio.Future[Any]:
        if self._stopping:
            future = self._loop.create_future()
            future.set_exception(StoreError("the store is closing; nothing more is written"))
            return future
        return lane.put(items, self._loop)

    async def _drain(self, lane: _Lane, commit: Callable[[list[tuple[Any, asyncio.Future[Any]]]], Any]) -> None:
        while True:
            if not lane.queue:
                if self._stopping:
                    return
                lane.ready.clear()
                await lane.ready.wait()
                continue
            batch, lane.queue = lane.queue, []
            await commit(batch)

    async def _commit(self, batch: list[tuple[Any, asyncio.Future[Any]]], write: Callable[[list[Any]], Any],
                      what: str) -> None:
        """Run `write` on the batch's items in one transaction and settle the futures with its results; if one
        operation's data is at fault, each operation alone, so it fails none of its neighbours."""
        started = time.monotonic()
        try:
            try:
                results = await write([items for items, _ in batch])
            except _CONFLICTS:
                # Two transactions waited on each other (two daemons storing the same event ids in other orders,
                # say) and PostgreSQL chose this one to give way: nothing of it was written. Once more.
                results = await write([items for items, _ in batch])
        except Exception as e:  # noqa: BLE001 - every failure must reach the waiting callers
            if len(batch) > 1 and not isinstance(e, UNAVAILABLE):
                for one in batch:
                    await self._commit([one], write, what)
                return
            failure = store_error(e, what, self.config)
            log.error("write failed; nothing from this transaction was stored", error=str(failure),
                      operations=len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            return
        self.commits += 1
        self.on_commit(len(batch), time.monotonic() - started)
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    # -- ingest ---------------------------------------------------------------------------------------------

    async def ingest(self, events: Sequence[Event], routes: Sequence[Sequence[Route]]) -> list[Accepted]:
        return await self._put(self._ingests, event_rows(events, routes))

    async def _commit_ingests(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        await self._commit(batch, self._write_ingests, "events were not stored")

    async def _write_ingests(self, operations: list[list[EventRow]]) -> list[list[Accepted]]:
        first: dict[str, EventRow] = {}  # each producer-given id's first appearance in the batch
        fresh: list[EventRow] = []
        for rows in operations:
            for row in rows:
                if not row[3]:
                    fresh.append(row)
                elif row[0] not in first:
                    first[row[0]] = row
                    fresh.append(row)
        new_ids, _ = await self._pool.fetchrow(self._sql.ingest, *ingest_arguments(fresh, time.time()))
        inserted = set(new_ids or ())
        stored = [i for i in first if i not in inserted]
        known = dict(await self._pool.fetch(self._sql.known_jobs, stored)) if stored else {}
        answers, woken, taken = [], set(), set()
        for rows in operations:
            accepted = []
            for event_id, _, _, given, routes, _, _ in rows:
                if given and (event_id not in inserted or event_id in taken):
                    accepted.append(Accepted(event_id, known.get(event_id, len(first[event_id][4])), True))
                    continue
                if given:
                    taken.add(event_id)
                accepted.append(Accepted(event_id, len(routes), False))
                woken.update(name for name, _ in routes)
            answers.append(accepted)
        if woken:
            self._loop.call_soon(self.on_jobs_added, woken)  # this daemon's dispatchers, before the NOTIFY
        return answers

    # -- delivery -------------------------------------------------------------------------------------------

    async def claim(self, integration: str, now: float, limit: int, exclude: Iterable[int] = (),
                    ordered: bool = False, only: Iterable[int] | None = None) -> list[Job]:
        self._seen.add(integration)
        args: list[Any] = [integration, now, self.me, limit, list(exclude), self.config.lease]
        if only is not None:
            args.append(list(only))
        rows = await self._run("cannot claim due jobs", self._pool.fetch,
                               self._sql.claim(ordered, only is not None), *args)
        rows.sort(key=lambda r: (r[7], r[0]))
        self._held.update(dict.fromkeys(r[0] for r in rows))
        return [job_from_row(integration, r) for r in rows]

    async def next_due(self, integration: str, exclude: Iterable[int] = (), ordered: bool = False) -> float | None:
        self._seen.add(integration)
        return await self._run("cannot read due jobs", self._pool.fetchval, self._sql.next_due, integration,
                               list(exclude), self.me, ordered)

    async def release(self, job_ids: Iterable[int]) -> None:
        ids = list(job_ids)
        for job_id in ids:
            self._held.pop(job_id, None)
        if ids:
            await self._run("cannot release claimed jobs", self._pool.execute, self._sql.release, ids, self.me)

    def record_later(self, records: Sequence[AttemptRecord]) -> asyncio.Future[None]:
        return self._put(self._records, records)

    async def record(self, records: Sequence[AttemptRecord]) -> None:
        await self.record_later(records)

    async def _commit_records(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        await self._commit(batch, self._write_records, "delivery outcomes were not written")

    async def _write_records(self, operations: list[Sequence[AttemptRecord]]) -> list[None]:
        records = [r for rows in operations for r in rows]
        now = time.time()
        dead = dead_letter_rows(records)
        if not dead:
            await self._pool.execute(self._sql.record, *record_arguments(records, now, self.me))
        else:
            async with self._pool.acquire() as db, db.transaction():
                # Only the deaths this daemon's claim still stands for: a late outcome changes nothing.
                ours = {r[0] for r in await db.fetch(self._sql.still_claimed, [r.job.id for r in dead], self.me)}
                await db.execute(self._sql.record, *record_arguments(records, now, self.me))
                for record in dead:
                    if record.job.id in ours:
                        await forward_dead(db, self._sql, record, now)
                await db.execute("SELECT pg_notify($1, $2)", self._sql.channel,
                                 ",".join({r.dead_letter for r in dead if r.dead_letter}))
            self._loop.call_soon(self.on_jobs_added, {r.dead_letter for r in dead if r.dead_letter})
        for r in records:
            self._held.pop(r.job.id, None)
        return [None] * len(operations)

    async def _renew_leases(self) -> None:
        """Keep the leases of the jobs this daemon holds from running out while it delivers them."""
        while True:
            await asyncio.sleep(self.config.lease / 3)
            if self._held:
                try:
                    await self._pool.execute(self._sql.renew, list(self._held), self.me, self.config.lease)
                except (asyncpg.PostgresError, *UNAVAILABLE) as e:
                    log.warning("cannot renew the leases of the jobs being delivered; other daemons may take "
                                "them when the leases run out", error=str(e), jobs=len(self._held))

    def announce(self, version: str, config_hash: str) -> None:
        self._identity.announce(version, config_hash)
        self._announced.set()

    async def daemons(self) -> list[DaemonView]:
        rows = await self._fetch(self._sql.daemons, LIVE_WITHIN)
        views = [DaemonView(*r) for r in rows]
        return sorted(views, key=lambda v: v.id != self.id)  # this one first

    async def _heartbeat(self) -> None:
        """Tell the others this daemon is alive, as it described itself, every few seconds."""
        await self._announced.wait()
        self._announced.clear()
        failing = False
        while True:
            me = self._identity
            try:
                await self._pool.execute(self._sql.heartbeat, me.id, me.host, me.pid, me.version, me.config_hash,
                                         me.started_at)
                failing = False
            except (asyncpg.PostgresError, *UNAVAILABLE) as e:
                if not failing:
                    log.warning("cannot record this daemon's heartbeat; other daemons' status will not list it "
                                "until the database answers", error=str(e))
                failing = True
            await wait_event(self._announced, _HEARTBEAT)
            self._announced.clear()

    async def _listen(self) -> None:
        """Receive other daemons' NOTIFY of new jobs on a connection of its own, reconnecting when it drops;
        after a gap every dispatcher looks again, since announcements may have been missed."""
        backoff = Backoff(0.5, RECONNECT_MAX)
        while True:
            try:
                dsn, timeout = split_timeout(self.config.dsn)
                db = await asyncpg.connect(dsn, timeout=timeout, server_settings=SERVER_SETTINGS)
            except (asyncpg.PostgresError, *UNAVAILABLE) as e:
                delay = backoff.next()
                log.warning("cannot listen for new jobs; retrying", error=str(e), retry_in_s=delay)
                await asyncio.sleep(delay)
                continue
            try:
                try:
                    await db.add_listener(self._sql.channel, self._on_notify)
                except (asyncpg.PostgresError, *UNAVAILABLE) as e:  # dropped at once, or a standby's refusal
                    delay = backoff.next()
                    log.warning("cannot listen for new jobs; retrying", error=str(e), retry_in_s=delay)
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                if self._seen:
                    self.on_jobs_added(set(self._seen))
                while not db.is_closed():
                    await asyncio.sleep(_LISTENER_CHECK)
                    try:
                        await db.execute("SELECT 1", timeout=CONNECT_TIMEOUT)
                    except (asyncpg.PostgresError, *UNAVAILABLE):
                        break
            finally:
                db.terminate()

    def _on_notify(self, _db: Any, _pid: int, _channel: str, payload: str) -> None:
        names = set(self._seen) if payload == WAKE_ALL else set(filter(None, payload.split(",")))
        if names:
            self.on_jobs_added(names)

    async def take_tokens(self, integration: str, rate: float, burst: float, want: int) -> tuple[int, float]:
        granted, left = await self._run("cannot take from the rate limit", self._pool.fetchrow,
                                        self._sql.take_tokens, integration, rate, burst, want)
        return granted, 0.0 if granted >= want else max(0.0, (want - granted - left) / rate)

    # -- integration state and admin writes -------------------------------------------------------------------

    async def disabled(self) -> dict[str, tuple[float, str]]:
        return await self._reads.disabled()

    async def set_disabled(self, name: str, reason: str | None) -> None:
        await self._run("cannot write the integration's state", self._pool.execute, self._sql.set_disabled,
                        name, time.time() if reason is not None else None, reason)

    async def set_paused(self, name: str, paused: bool) -> None:
        await self._run("cannot write the integration's state", self._pool.execute, self._sql.set_paused,
                        name, time.time() if paused else None)
        if not paused:
            self.on_jobs_added({name})

    async def paused(self) -> dict[str, float]:
        return await self._reads.paused()

    async def audit(self, entry: AuditEntry) -> None:
        await self._run("cannot write the audit log", self._pool.execute, self._sql.audit, entry.at, entry.action,
                        entry.target, entry.scope, entry.fingerprint, entry.address, entry.detail)

    async def audit_log(self, before: int | None, limit: int) -> list[AuditEntry]:
        return await self._reads.audit_log(before, limit)

    async def retry(self, integration: str, job_id: int) -> JobState | None:
        async with self._write("cannot retry the job") as db:
            state = await db.fetchval(self._sql.retry, job_id, integration, time.time())
            if state is not None:
                await db.execute("SELECT pg_notify($1, $2)", self._sql.channel, integration)
        if state is not None:
            self.on_jobs_added({integration})
        return JobState(state) if state is not None else None

    async def replay(self, integration: str, *, dead: bool = False, since: float | None = None,
                     until: float | None = None, not_requeued_since: float | None = None,
                     limit: int = 10_000) -> int:
        fence = not_requeued_since if not_requeued_since is not None else 1e18
        now = time.time()
        async with self._write("cannot replay jobs") as db:
            status = await db.execute(self._sql.replay_dead if dead else self._sql.replay_range, integration, now,
                                      fence, limit, since if since is not None else 0.0,
                                      until if until is not None else 1e18)
            count = int(status.split()[-1])
            if count:
                await db.execute("SELECT pg_notify($1, $2)", self._sql.channel, integration)
        if count:
            self.on_jobs_added({integration})
        return count

    async def prune(self, delivered_before: float, dead_before: float, batch: int = 1000) -> int:
        """One daemon prunes at a time (an advisory lock): the others' turns find it taken and do nothing."""
        async with self._write("cannot prune old jobs") as db:
            if not await db.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))",
                                     schema.lock_key(self.config.schema) + ":prune"):
                return 0
            deleted, seqs = await db.fetchrow(self._sql.prune_jobs, delivered_before, dead_before, batch)
            if seqs:
                deleted += int((await db.execute(self._sql.prune_events, seqs)).split()[-1])
            deleted += int((await db.execute(self._sql.prune_minutes, int(delivered_before // 60), batch)).split()[-1])
            deleted += int((await db.execute(self._sql.prune_audit, delivered_before, batch)).split()[-1])
            deleted += int((await db.execute(self._sql.prune_unobserved, delivered_before, batch)).split()[-1])
        return deleted

    def _write(self, what: str) -> Transaction:
        return Transaction(self, what)

    # -- reads ----------------------------------------------------------------------------------------------

    async def _run(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return await call(*args)
        except (asyncpg.PostgresError, *UNAVAILABLE) as e:
            raise store_error(e, what, self.config) from e

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self._run("cannot read from the database", self._pool.fetch, sql, *args)

    async def job_counts(self, states: Iterable[JobState] = WATCHED_STATES) -> dict[tuple[str, JobState], int]:
        return await self._reads.job_counts(states)

    async def backlog(self, integrations: Sequence[str], cap: int) -> dict[tuple[str, JobState], int]:
        return await self._reads.backlog(integrations, cap)

    async def oldest_pending(self) -> dict[str, float]:
        return await self._reads.oldest_pending()

    async def outcomes_since(self, since: float) -> dict[str, OutcomeCounts]:
        return await self._reads.outcomes_since(since)

    async def outcomes_by_minute(self, integration: str, since: float) -> list[tuple[float, OutcomeCounts]]:
        return await self._reads.outcomes_by_minute(integration, since)

    async def last_attempts(self, integration: str) -> LastAttempts:
        return await self._reads.last_attempts(integration)

    async def jobs(self, integration: str | None = None, state: JobState | None = None, limit: int = 25,
                   offset: int = 0, event_id: str | None = None) -> tuple[list[JobView], int]:
        return await self._reads.jobs(integration, state, limit, offset, event_id)

    async def job(self, integration: str, job_id: int) -> JobView | None:
        return await self._reads.job(integration, job_id)

    async def logs(self, integration: str | None = None, job_id: int | None = None, limit: int = 25,
                   offset: int = 0) -> tuple[list[AttemptView], int]:
        return await self._reads.logs(integration, job_id, limit, offset)

    async def attempts(self, job_id: int) -> list[AttemptView]:
        return await self._reads.attempts(job_id)

    async def attempts_after(self, after: int, limit: int) -> list[AttemptView]:
        return await self._reads.attempts_after(after, limit)

    async def attempts_before(self, integration: str | None, before: int | None, limit: int) -> list[AttemptView]:
        return await self._reads.attempts_before(integration, before, limit)

    async def durations(self, integration: str, since: float, limit: int = DURATIONS_SAMPLE) -> list[float]:
        return await self._reads.durations(integration, since, limit)

    async def search(self, query: JobSearch, limit: int, scan: int = SEARCH_SCAN) -> SearchPage:
        return await self._reads.search(query, limit, scan)

    async def events(self, limit: int = 25, offset: int = 0) -> tuple[list[StoredEvent], int]:
        return await self._reads.events(limit, offset)

    async def event(self, event_id: str) -> StoredEvent | None:
        return await self._reads.event(event_id)
