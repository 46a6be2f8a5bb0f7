"""Every read of the SQLite engine, through connections of its own, which WAL lets run beside the writer:
the dispatchers' claims through one on the event loop's thread (see `claim`), everything else (status, the
admin API) through aiosqlite's thread."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from ...jobs import Job, JobState
from .. import search
from ..api import (WATCHED_STATES, AttemptView, AuditEntry, JobSearch, JobView, LastAttempts, OutcomeCounts,
                   SearchPage, StoredEvent, StoreError)
from ..rows import (ATTEMPT_COLUMNS, AUDIT_COLUMNS, EVENT_COLUMNS, JOB_COLUMNS, TAIL_COLUMNS, attempt_view,
                    audit_entry, job_view)
from .errors import read_failure

# The claims' connection runs on the event loop's thread, so how long a busy database may stall it is
# bounded: a WAL reader waits only in rare moments (another connection recovering the WAL), and a claim
# that times out is retried by its dispatcher a second later.
_CLAIMS_BUSY_TIMEOUT_MS = 200
# Only the head of each ordering key: no earlier job of the same key is still pending.
_HEADS_ONLY = ("AND (j.ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM jobs k WHERE "
               "k.integration = j.integration AND k.ordering_key = j.ordering_key AND k.state = 'pending' "
               "AND k.id < j.id)) ")
_TAIL = (f"SELECT {TAIL_COLUMNS} FROM attempts a JOIN jobs j ON j.id = a.job_id "
         "JOIN events e ON e.seq = j.event_seq")
_NO_CURSOR = 2**63 - 1  # a search without a cursor starts below the largest id there can be



class Reads:
    def __init__(self, path: Path, reader: aiosqlite.Connection, claims: sqlite3.Connection):
        self.path = path
        self._reader = reader
        self._claims = claims  # used only on the event loop's thread

    @classmethod
    async def open(cls, path: Path) -> Reads:
        """Connections to a database the writer has prepared (WAL mode, the schema)."""
        reader = await aiosqlite.connect(path, isolation_level=None)
        try:
            await reader.execute("PRAGMA busy_timeout=5000")
            claims = sqlite3.connect(path, isolation_level=None)
        except BaseException:
            await _close_quietly(reader)
            raise
        try:
            claims.execute(f"PRAGMA busy_timeout={_CLAIMS_BUSY_TIMEOUT_MS}")
            claims.execute("PRAGMA query_only=ON")
        except BaseException:
            claims.close()
            await _close_quietly(reader)
            raise
        return cls(path, reader, claims)

    async def close(self) -> None:
        await _close_quietly(self._reader)
        self._claims.close()

    # -- claims, on the event loop's thread ---------------------------------------------------------------

    def claim(self, integration: str, now: float, limit: int, exclude: Iterable[int], ordered: bool,
              only: Iterable[int] | None) -> list[Job]:
        """Store.claim. On the event loop's thread, not aiosqlite's: a claim is a walk of the `jobs_due`
        index bounded by `limit`, whatever the backlog, while in another thread each row fetched cost a
        hand-over of the GIL, waiting for a turn of the busy loop, and claims came so late that a
        dispatcher's buffer of ready jobs ran dry."""
        excluded = _padded(exclude)
        chosen = _padded(only) if only is not None else []
        heads_only = _HEADS_ONLY if ordered else ""
        rows = self._read_claims(
            "SELECT j.id, j.attempts, e.id, e.type, e.payload, e.accepted_at, coalesce(j.requeued_at, e.accepted_at), "
            "e.traceparent, e.tracestate "
            "FROM jobs j "
            "JOIN events e ON e.seq = j.event_seq "
            "WHERE j.integration = ? AND j.state = 'pending' AND j.next_at <= ? "
            f"{_not_in('j.id', excluded)} {_in('j.id', chosen, only is not None)} {heads_only}"
            "ORDER BY j.next_at, j.id LIMIT ?",
            (integration, now, *excluded, *chosen, limit))
        return [Job(id=r[0], integration=integration, attempt=r[1] + 1, event_id=r[2], event_type=r[3],
                    payload=r[4], accepted_at=r[5], age_from=r[6], traceparent=r[7], tracestate=r[8]) for r in rows]

    def next_due(self, integration: str, exclude: Iterable[int], ordered: bool = False) -> float | None:
        """Store.next_due; on the event loop's thread, as `claim`: a walk down the `jobs_due` index."""
        excluded = _padded(exclude)
        rows = self._read_claims(
            "SELECT next_at FROM jobs j WHERE integration = ? AND state = 'pending' "
            f"{_not_in('id', excluded)} {_HEADS_ONLY if ordered else ''}ORDER BY next_at LIMIT 1",
            (integration, *excluded))
        return rows[0][0] if rows else None

    def _read_claims(self, sql: str, params: Sequence[Any]) -> list[Any]:
        # fetchall() steps the statement to its end, which resets it: no read transaction stays open to hold
        # back the writer's checkpoints.
        try:
            return self._claims.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read due jobs from {self.path}: {e}") from e

    # -- status and the admin API, in aiosqlite's thread ------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read; a failure is a StoreError that says what to do."""
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as e:
            raise StoreError(read_failure(self.path, e)) from e

    async def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await self._fetch(sql, params)
        return rows[0][0] if rows else None

    async def ping(self) -> bool:
        try:
            return await self._scalar("SELECT 1") == 1
        except (StoreError, ValueError):
            return False

    async def disabled(self) -> dict[str, tuple[float, str]]:
        rows = await self._fetch(
            "SELECT name, disabled_at, disabled_reason FROM integration_state WHERE disabled_at IS NOT NULL")
        return {r[0]: (r[1], r[2]) for r in rows}

    async def paused(self) -> dict[str, float]:
        rows = await self._fetch("SELECT name, paused_at FROM integration_state WHERE paused_at IS NOT NULL")
        return {r[0]: r[1] for r in rows}

    async def job_counts(self, states: Iterable[JobState]) -> dict[tuple[str, JobState], int]:
        wanted = [JobState(s).value for s in states]
        rows = await self._fetch(
            f"SELECT integration, state, count(*) FROM jobs WHERE state IN ({_marks(wanted)}) "
            "GROUP BY integration, state", wanted)
        return {(r[0], JobState(r[1])): r[2] for r in rows}

    async def backlog(self, integrations: Sequence[str], cap: int) -> dict[tuple[str, JobState], int]:
        counts = {}
        for name in integrations:
            for state in WATCHED_STATES:
                counts[(name, state)] = await self._scalar(
                    "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE integration = ? AND state = ? LIMIT ?)",
                    (name, state.value, cap + 1))
        return counts

    async def oldest_pending(self) -> dict[str, float]:
        rows = await self._fetch(
            "SELECT integration, min(created_at) FROM jobs WHERE state = 'pending' GROUP BY integration")
        return {r[0]: r[1] for r in rows}

    async def outcomes_since(self, since: float) -> dict[str, OutcomeCounts]:
        rows = await self._fetch(
            "SELECT integration, sum(delivered), sum(failed), sum(dead) FROM outcome_minutes WHERE minute >= ? "
            "GROUP BY integration", (int(since // 60),))
        return {r[0]: OutcomeCounts(r[1], r[2], r[3]) for r in rows}

    async def outcomes_by_minute(self, integration: str, since: float) -> list[tuple[float, OutcomeCounts]]:
        rows = await self._fetch(
            "SELECT minute, delivered, failed, dead FROM outcome_minutes WHERE integration = ? AND minute >= ? "
            "ORDER BY minute", (integration, int(since // 60)))
        return [(r[0] * 60.0, OutcomeCounts(r[1], r[2], r[3])) for r in rows]

    async def last_attempts(self, integration: str) -> LastAttempts:
        latest: dict[int, tuple[float, str | None] | None] = {}
        for succeeded in (1, 0):
            rows = await self._fetch(
                "SELECT created_at, error_detail FROM attempts WHERE integration = ? AND succeeded = ? "
                "ORDER BY id DESC LIMIT 1", (integration, succeeded))
            latest[succeeded] = (rows[0][0], rows[0][1]) if rows else None
        success, failure = latest[1], latest[0]
        return LastAttempts(success_at=success[0] if success else None, failure_at=failure[0] if failure else None,
                            failure_error=failure[1] if failure else None)

    async def jobs(self, integration: str | None, state: JobState | None, limit: int, offset: int,
                   event_id: str | None) -> tuple[list[JobView], int]:
        clauses, params = _where(("j.integration = ?", integration),
                                 ("j.state = ?", JobState(state).value if state else None),
                                 ("j.event_seq IN (SELECT seq FROM events WHERE id = ?)", event_id))
        rows = await self._fetch(
            f"SELECT {JOB_COLUMNS} FROM jobs j JOIN events e ON e.seq = j.event_seq {clauses} "
            "ORDER BY j.id DESC LIMIT ? OFFSET ?", (*params, limit, offset))
        total = await self._scalar(f"SELECT count(*) FROM jobs j {clauses}", params)
        return [job_view(r) for r in rows], total

    async def job(self, integration: str, job_id: int) -> JobView | None:
        rows = await self._fetch(
            f"SELECT {JOB_COLUMNS} FROM jobs j JOIN events e ON e.seq = j.event_seq "
            "WHERE j.integration = ? AND j.id = ?", (integration, job_id))
        return job_view(rows[0]) if rows else None

    async def logs(self, integration: str | None, job_id: int | None, limit: int, offset: int
                   ) -> tuple[list[AttemptView], int]:
        clauses, params = _where(("integration = ?", integration), ("job_id = ?", job_id))
        rows = await self._fetch(
            f"SELECT {ATTEMPT_COLUMNS} FROM attempts {clauses} ORDER BY id DESC LIMIT ? OFFSET ?",
            (*params, limit, offset))
        total = await self._scalar(f"SELECT count(*) FROM attempts {clauses}", params)
        return [attempt_view(r) for r in rows], total

    async def attempts_after(self, after: int, limit: int) -> list[AttemptView]:
        rows = await self._fetch(f"{_TAIL} WHERE a.id > ? ORDER BY a.id LIMIT ?", (after, limit))
        return [attempt_view(r) for r in rows]

    async def attempts_before(self, integration: str | None, before: int | None, limit: int) -> list[AttemptView]:
        clauses, params = _where(("a.integration = ?", integration), ("a.id < ?", before))
        rows = await self._fetch(f"{_TAIL} {clauses} ORDER BY a.id DESC LIMIT ?", (*params, limit))
        return [attempt_view(r) for r in rows]

    async def audit_log(self, before: int | None, limit: int) -> list[AuditEntry]:
        clauses, params = _where(("id < ?", before))
        rows = await self._fetch(f"SELECT {AUDIT_COLUMNS} FROM audit {clauses} ORDER BY id DESC LIMIT ?",
                                 (*params, limit))
        return [audit_entry(r) for r in rows]

    async def durations(self, integration: str, since: float, limit: int) -> list[float]:
        rows = await self._fetch(
            "SELECT duration FROM (SELECT duration, created_at FROM attempts WHERE integration = ? "
            "ORDER BY id DESC LIMIT ?) WHERE created_at >= ?", (integration, limit, since))
        return [r[0] for r in rows]

    async def search(self, query: JobSearch, limit: int, scan_bound: int) -> SearchPage:
        before = query.before
        if query.until is not None:
            # Two subqueries: SQLite finds a lone min() or max() in the index, not both in one scan.
            bounds = (await self._fetch("SELECT (SELECT min(id) FROM jobs), (SELECT max(id) FROM jobs)"))[0]
            start = await search.scan_start(query.until, None if bounds[0] is None else bounds, self._created_from)
            before = start if before is None else min(before, start)
        scan, scan_params = _scan(query, before, scan_bound)
        n, floor, created = (await self._fetch(
            f"SELECT s.n, s.floor, j.created_at FROM (SELECT count(*) n, min(id) floor FROM ({scan})) s "
            "LEFT JOIN jobs j ON j.id = s.floor", scan_params))[0]
        if not n:
            return SearchPage([], None)
        clauses, params = _where(("e.type = ?", query.event_type), ("j.created_at >= ?", query.since),
                                 ("j.created_at < ?", query.until), ("j.state = ?", _state(query)),
                                 ("j.integration = ?", query.integration))
        if query.integration is None or query.state is not None:
            # The examined ids are one range of an index (the primary key, or jobs_state's for an integration
            # and a state): read it newest first and stop at the page, rather than join and sort it all.
            window = f"{'AND' if clauses else 'WHERE'} j.id >= ? AND j.id < ?"
            rows = await self._fetch(
                f"SELECT {JOB_COLUMNS} FROM jobs j JOIN events e ON e.seq = j.event_seq {clauses} {window} "
                "ORDER BY j.id DESC LIMIT ?", (*params, floor, before if before is not None else _NO_CURSOR,
                                                limit + 1))
        else:
            rows = await self._fetch(
                f"SELECT {JOB_COLUMNS} FROM ({scan}) s JOIN jobs j ON j.id = s.id JOIN events e ON e.seq = j.event_seq "
                f"{clauses} ORDER BY j.id DESC LIMIT ?", (*scan_params, *params, limit + 1))
        return search.page([job_view(r) for r in rows], limit, query, scan_bound, (n, floor, created))

    async def _created_from(self, job_id: int) -> float | None:
        return await self._scalar("SELECT created_at FROM jobs WHERE id >= ? ORDER BY id LIMIT 1", (job_id,))

    async def events(self, limit: int, offset: int) -> tuple[list[StoredEvent], int]:
        rows = await self._fetch(f"SELECT {EVENT_COLUMNS} FROM events ORDER BY seq DESC LIMIT ? OFFSET ?",
                                 (limit, offset))
        total = await self._scalar("SELECT count(*) FROM events")
        return [StoredEvent(*r) for r in rows], total

    async def event(self, event_id: str) -> StoredEvent | None:
        rows = await self._fetch(f"SELECT {EVENT_COLUMNS} FROM events WHERE id = ?", (event_id,))
        return StoredEvent(*rows[0]) if rows else None




def _scan(query: JobSearch, before: int | None, bound: int) -> tuple[str, list[Any]]:
    """The ids a search page examines, newest first and at most `bound` of them, through an index: an
    integration's jobs in a state (jobs_state), an integration's jobs in any state (jobs_state once per
    state), or else the latest jobs (the primary key), the other filters applied to these."""
    below = before if before is not None else _NO_CURSOR
    if query.integration is None:
        return "SELECT id FROM jobs WHERE id < ? ORDER BY id DESC LIMIT ?", [below, bound]
    states = [query.state] if query.state is not None else list(JobState)
    one = "SELECT id FROM (SELECT id FROM jobs WHERE integration = ? AND state = ? AND id < ? ORDER BY id DESC LIMIT ?)"
    params: list[Any] = []
    for state in states:
        params += [query.integration, JobState(state).value, below, bound]
    return f"SELECT id FROM ({' UNION ALL '.join([one] * len(states))}) ORDER BY id DESC LIMIT ?", [*params, bound]


def _state(query: JobSearch) -> str | None:
    return JobState(query.state).value if query.state is not None else None


def _where(*filters: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause of the filters whose value is not None, and their parameters."""
    chosen = [(clause, value) for clause, value in filters if value is not None]
    if not chosen:
        return "", []
    return "WHERE " + " AND ".join(clause for clause, _ in chosen), [value for _, value in chosen]


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def _not_in(column: str, values: list[int]) -> str:
    return f"AND {column} NOT IN ({_marks(values)})" if values else ""


def _in(column: str, values: list[int], filtered: bool) -> str:
    if not filtered:
        return ""
    return f"AND {column} IN ({_marks(values)})" if values else "AND 0"


def _padded(ids: Iterable[int]) -> list[int]:
    """Ids to exclude, padded with -1 (never a job id) to a power of two: a handful of distinct statement
    texts, which the sqlite3 module's statement cache keeps prepared (a claim excludes a different number of
    jobs each time, and preparing the statement anew cost more than running it)."""
    values = list(ids)
    if values:
        values += [-1] * ((1 << (len(values) - 1).bit_length()) - len(values))
    return values


async def _close_quietly(reader: aiosqlite.Connection) -> None:
    try:
        await reader.close()
    except Exception:  # noqa: BLE001 - closing what may be half-open; nothing to do about it
        pass
