"""Reads of the PostgreSQL engine for status and the admin API: bounded, indexed queries through the pool."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from ...jobs import JobState
from .. import search
from ..api import (WATCHED_STATES, AttemptView, AuditEntry, JobSearch, JobView, LastAttempts, OutcomeCounts,
                   SearchPage, StoredEvent)
from ..rows import (ATTEMPT_COLUMNS, AUDIT_COLUMNS, EVENT_COLUMNS, JOB_COLUMNS, TAIL_COLUMNS, attempt_view,
                    audit_entry, job_view)

Fetch = Callable[..., Awaitable[list[Any]]]  # (sql, *args) -> rows, failures already StoreErrors



class Reads:
    def __init__(self, schema: str, fetch: Fetch):
        self._s = schema
        self._fetch = fetch

    async def _scalar(self, sql: str, *args: Any) -> Any:
        rows = await self._fetch(sql, *args)
        return rows[0][0] if rows else None

    async def disabled(self) -> dict[str, tuple[float, str]]:
        rows = await self._fetch(f"SELECT name, disabled_at, disabled_reason FROM {self._s}.integration_state "
                                 "WHERE disabled_at IS NOT NULL")
        return {r[0]: (r[1], r[2]) for r in rows}

    async def paused(self) -> dict[str, float]:
        rows = await self._fetch(f"SELECT name, paused_at FROM {self._s}.integration_state "
                                 "WHERE paused_at IS NOT NULL")
        return {r[0]: r[1] for r in rows}

    async def job_counts(self, states: Iterable[JobState]) -> dict[tuple[str, JobState], int]:
        wanted = [JobState(s).value for s in states]
        rows = await self._fetch(f"SELECT integration, state, count(*) FROM {self._s}.jobs "
                                 "WHERE state = ANY($1::text[]) GROUP BY integration, state", wanted)
        return {(r[0], JobState(r[1])): r[2] for r in rows}

    async def backlog(self, integrations: Sequence[str], cap: int) -> dict[tuple[str, JobState], int]:
        counts = {}
        for name in integrations:
            for state in WATCHED_STATES:
                counts[(name, state)] = await self._scalar(
                    f"SELECT count(*) FROM (SELECT 1 FROM {self._s}.jobs WHERE integration = $1 AND state = $2 "
                    "LIMIT $3) capped", name, state.value, cap + 1)
        return counts

    async def oldest_pending(self) -> dict[str, float]:
        rows = await self._fetch(f"SELECT integration, min(created_at) FROM {self._s}.jobs WHERE state = 'pending' "
                                 "GROUP BY integration")
        return {r[0]: r[1] for r in rows}

    async def outcomes_since(self, since: float) -> dict[str, OutcomeCounts]:
        rows = await self._fetch(
            f"SELECT integration, sum(delivered), sum(failed), sum(dead) FROM {self._s}.outcome_minutes "
            "WHERE minute >= $1 GROUP BY integration", int(since // 60))
        return {r[0]: OutcomeCounts(int(r[1]), int(r[2]), int(r[3])) for r in rows}

    async def outcomes_by_minute(self, integration: str, since: float) -> list[tuple[float, OutcomeCounts]]:
        rows = await self._fetch(
            f"SELECT minute, sum(delivered), sum(failed), sum(dead) FROM {self._s}.outcome_minutes "
            "WHERE minute >= $1 AND integration = $2 GROUP BY minute ORDER BY minute", int(since // 60), integration)
        return [(r[0] * 60.0, OutcomeCounts(int(r[1]), int(r[2]), int(r[3]))) for r in rows]

    async def last_attempts(self, integration: str) -> LastAttempts:
        rows = await self._fetch(
            f"""SELECT s.created_at, f.created_at, f.error_detail FROM
                (SELECT 1) one
                LEFT JOIN LATERAL (SELECT created_at FROM {self._s}.attempts WHERE id = (
                    SELECT max(id) FROM {self._s}.attempts WHERE integration = $1 AND succeeded)) s ON true
                LEFT JOIN LATERAL (SELECT created_at, error_detail FROM {self._s}.attempts WHERE id = (
                    SELECT max(id) FROM {self._s}.attempts WHERE integration = $1 AND NOT succeeded)) f ON true""",
            integration)
        success_at, failure_at, error = rows[0]
        return LastAttempts(success_at=success_at, failure_at=failure_at, failure_error=error)

    async def jobs(self, integration: str | None, state: JobState | None, limit: int, offset: int,
                   event_id: str | None) -> tuple[list[JobView], int]:
        clauses, args = _where(("j.integration = $", integration),
                               ("j.state = $", JobState(state).value if state else None),
                               (f"j.event_seq IN (SELECT seq FROM {self._s}.events WHERE id = $)", event_id))
        n = len(args)
        rows = await self._fetch(
            f"SELECT {JOB_COLUMNS} FROM {self._s}.jobs j JOIN {self._s}.events e ON e.seq = j.event_seq {clauses} "
            f"ORDER BY j.id DESC LIMIT ${n + 1} OFFSET ${n + 2}", *args, limit, offset)
        total = await self._scalar(f"SELECT count(*) FROM {self._s}.jobs j {clauses}", *args)
        return [job_view(r) for r in rows], total

    async def job(self, integration: str, job_id: int) -> JobView | None:
        rows = await self._fetch(
            f"SELECT {JOB_COLUMNS} FROM {self._s}.jobs j JOIN {self._s}.events e ON e.seq = j.event_seq "
            "WHERE j.integration = $1 AND j.id = $2", integration, job_id)
        return job_view(rows[0]) if rows else None

    async def logs(self, integration: str | None, job_id: int | None, limit: int, offset: int
                   ) -> tuple[list[AttemptView], int]:
        clauses, args = _where(("integration = $", integration), ("job_id = $", job_id))
        n = len(args)
        rows = await self._fetch(
            f"SELECT {ATTEMPT_COLUMNS} FROM {self._s}.attempts {clauses} ORDER BY id DESC "
            f"LIMIT ${n + 1} OFFSET ${n + 2}", *args, limit, offset)
        total = await self._scalar(f"SELECT count(*) FROM {self._s}.attempts {clauses}", *args)
        return [attempt_view(r) for r in rows], total

    async def attempts(self, job_id: int) -> list[AttemptView]:
        rows = await self._fetch(f"SELECT {ATTEMPT_COLUMNS} FROM {self._s}.attempts WHERE job_id = $1 ORDER BY id",
                                 job_id)
        return [attempt_view(r) for r in rows]

    async def attempts_after(self, after: int, limit: int) -> list[AttemptView]:
        rows = await self._fetch(f"{self._tail()} WHERE a.id > $1 ORDER BY a.id LIMIT $2", after, limit)
        return [attempt_view(r) for r in rows]

    async def attempts_before(self, integration: str | None, before: int | None, limit: int) -> list[AttemptView]:
        if integration is None:
            clauses, args = _where(("a.id < $", before))
            rows = await self._fetch(f"{self._tail()} {clauses} ORDER BY a.id DESC LIMIT ${len(args) + 1}",
                                     *args, limit)
        else:
            # The ids first, from attempts_integration alone: walking the primary key back and skipping other
            # integrations' attempts takes long for an integration that has been quiet for hours.
            rows = await self._fetch(
                f"{self._tail()} WHERE a.id IN (SELECT id FROM {self._s}.attempts WHERE integration = $1 "
                f"AND id < $2 ORDER BY id DESC LIMIT $3) ORDER BY a.id DESC", integration,
                before if before is not None else _NO_CURSOR, limit)
        return [attempt_view(r) for r in rows]

    def _tail(self) -> str:
        return (f"SELECT {TAIL_COLUMNS} FROM {self._s}.attempts a JOIN {self._s}.jobs j ON j.id = a.job_id "
                f"JOIN {self._s}.events e ON e.seq = j.event_seq")

    async def audit_log(self, before: int | None, limit: int) -> list[AuditEntry]:
        clauses, args = _where(("id < $", before))
        rows = await self._fetch(f"SELECT {AUDIT_COLUMNS} FROM {self._s}.audit {clauses} ORDER BY id DESC "
                                 f"LIMIT ${len(args) + 1}", *args, limit)
        return [audit_entry(r) for r in rows]

    async def durations(self, integration: str, since: float, limit: int) -> list[float]:
        rows = await self._fetch(
            f"SELECT duration FROM {self._s}.attempts WHERE id IN (SELECT id FROM {self._s}.attempts "
            "WHERE integration = $1 ORDER BY id DESC LIMIT $2) AND created_at >= $3", integration, limit, since)
        return [r[0] for r in rows]

    async def search(self, query: JobSearch, limit: int, scan_bound: int) -> SearchPage:
        before = query.before
        if query.until is not None:
            bounds = (await self._fetch(f"SELECT min(id), max(id) FROM {self._s}.jobs"))[0]
            start = await search.scan_start(query.until, None if bounds[0] is None else tuple(bounds),
                                            self._created_from)
            before = start if before is None else min(before, start)
        args: list[Any] = []
        scan = self._scan(query, before, scan_bound, args)
        n, floor, created = (await self._fetch(
            f"SELECT s.n, s.floor, j.created_at FROM (SELECT count(*) n, min(id) floor FROM ({scan}) ids) s "
            f"LEFT JOIN {self._s}.jobs j ON j.id = s.floor", *args))[0]
        if not n:
            return SearchPage([], None)
        args = []
        filters = [(f"e.type = {_arg(args, query.event_type)}", query.event_type),
                   (f"j.created_at >= {_arg(args, query.since)}", query.since),
                   (f"j.created_at < {_arg(args, query.until)}", query.until),
                   (f"j.state = {_arg(args, _state(query))}", query.state),
                   (f"j.integration = {_arg(args, query.integration)}", query.integration)]
        clauses = " ".join(f"AND {clause}" for clause, value in filters if value is not None)
        if query.integration is None or query.state is not None:
            # The examined ids are one range of an index: read it newest first and stop at the page. Each
            # job's event is looked up on its own (LATERAL … OFFSET 0), or the planner hashes every event.
            low, high = _arg(args, floor), _arg(args, before if before is not None else _NO_CURSOR)
            rows = await self._fetch(
                f"SELECT {JOB_COLUMNS} FROM {self._s}.jobs j CROSS JOIN LATERAL (SELECT ev.id, ev.type FROM "
                f"{self._s}.events ev WHERE ev.seq = j.event_seq OFFSET 0) e "
                f"WHERE j.id >= {low} AND j.id < {high} {clauses} ORDER BY j.id DESC LIMIT {_arg(args, limit + 1)}",
                *args)
        else:
            scan = self._scan(query, before, scan_bound, args)
            rows = await self._fetch(
                f"SELECT {JOB_COLUMNS} FROM ({scan}) s JOIN {self._s}.jobs j ON j.id = s.id "
                f"JOIN {self._s}.events e ON e.seq = j.event_seq WHERE true {clauses} "
                f"ORDER BY j.id DESC LIMIT {_arg(args, limit + 1)}", *args)
        return search.page([job_view(r) for r in rows], limit, query, scan_bound, (n, floor, created))

    def _scan(self, query: JobSearch, before: int | None, most: int, args: list[Any]) -> str:
        """The ids a search page examines, as the SQLite engine's `_scan` (the same indexes)."""
        below = _arg(args, before if before is not None else _NO_CURSOR)
        bound = _arg(args, most)
        if query.integration is None:
            return f"SELECT id FROM {self._s}.jobs WHERE id < {below} ORDER BY id DESC LIMIT {bound}"
        name = _arg(args, query.integration)
        states = [query.state] if query.state is not None else list(JobState)
        ones = [f"(SELECT id FROM {self._s}.jobs WHERE integration = {name} AND state = "
                f"{_arg(args, JobState(state).value)} AND id < {below} ORDER BY id DESC LIMIT {bound})"
                for state in states]
        return f"SELECT id FROM ({' UNION ALL '.join(ones)}) per_state ORDER BY id DESC LIMIT {bound}"

    async def _created_from(self, job_id: int) -> float | None:
        return await self._scalar(f"SELECT created_at FROM {self._s}.jobs WHERE id >= $1 ORDER BY id LIMIT 1",
                                  job_id)

    async def events(self, limit: int, offset: int) -> tuple[list[StoredEvent], int]:
        rows = await self._fetch(f"SELECT {EVENT_COLUMNS} FROM {self._s}.events ORDER BY seq DESC "
                                 "LIMIT $1 OFFSET $2", limit, offset)
        total = await self._scalar(f"SELECT count(*) FROM {self._s}.events")
        return [StoredEvent(*r) for r in rows], total

    async def event(self, event_id: str) -> StoredEvent | None:
        rows = await self._fetch(f"SELECT {EVENT_COLUMNS} FROM {self._s}.events WHERE id = $1", event_id)
        return StoredEvent(*rows[0]) if rows else None




_NO_CURSOR = 2**63 - 1  # a search without a cursor starts below the largest id there can be


def _arg(args: list[Any], value: Any) -> str:
    """`value` as the next numbered parameter; a None filter takes no number (its clause is left out)."""
    if value is None:
        return "NULL"
    args.append(value)
    return f"${len(args)}"


def _state(query: JobSearch) -> str | None:
    return JobState(query.state).value if query.state is not None else None


def _where(*filters: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause of the filters whose value is not None (each `$` numbered in turn), and their arguments."""
    chosen = [(clause, value) for clause, value in filters if value is not None]
    if not chosen:
        return "", []
    return ("WHERE " + " AND ".join(clause.replace("$", f"${i}") for i, (clause, _) in enumerate(chosen, 1)),
            [value for _, value in chosen])
