"""The rows both engines write and read: events to store as plain tuples (EventRow names their fields), and
how rows read become the API's value types, the same columns in the same order on either engine, so the
engines differ only in their SQL dialect."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..jobs import JobState
from .api import AttemptView, AuditEntry, JobView, Route

if TYPE_CHECKING:
    from ..events import Event


class EventRow(NamedTuple):
    """An event to store, with its routes. Travels as a plain tuple in this order (the SQLite engine's wire
    takes exact built-in types only)."""

    id: str
    type: str
    payload: str
    id_given: bool  # False: the daemon made the id, so it cannot be a duplicate
    routes: Sequence[Route]
    traceparent: str | None
    tracestate: str | None


def event_rows(events: Sequence[Event], routes: Sequence[Sequence[Route]]) -> list[tuple[Any, ...]]:
    """Ingest's items, as EventRows."""
    return [(e.id, e.type, e.payload, e.id_given, r, e.traceparent, e.tracestate) for e, r in zip(events, routes)]

JOB_COLUMNS = ("j.id, j.integration, e.id, e.type, j.state, j.attempts, j.created_at, j.updated_at, j.next_at, "
               "j.last_error")  # of `jobs j JOIN events e`
ATTEMPT_COLUMNS = "id, job_id, integration, attempt, succeeded, created_at, duration, status_code, error_detail, body"
# An attempt with its event's id and type, of `attempts a JOIN jobs j JOIN events e`: a live tail's line.
TAIL_COLUMNS = ", ".join(f"a.{c}" for c in ATTEMPT_COLUMNS.split(", ")) + ", e.id, e.type"
EVENT_COLUMNS = "id, type, payload, accepted_at"
AUDIT_COLUMNS = "id, at, action, target, scope, fingerprint, address, detail"  # a StoredEvent's fields, in order


def job_view(r: Sequence[Any]) -> JobView:
    state = JobState(r[4])
    return JobView(id=r[0], integration=r[1], event_id=r[2], event_type=r[3], state=state, attempts=r[5],
                   created_at=r[6], updated_at=r[7], next_attempt_at=r[8] if state is JobState.PENDING else None,
                   last_error=r[9])


def attempt_view(r: Sequence[Any]) -> AttemptView:
    return AttemptView(id=r[0], job_id=r[1], integration=r[2], attempt=r[3], succeeded=bool(r[4]), created_at=r[5],
                       duration=r[6], status_code=r[7], error_detail=r[8], body=r[9],
                       event_id=r[10] if len(r) > 10 else None, event_type=r[11] if len(r) > 11 else None)


def audit_entry(r: Sequence[Any]) -> AuditEntry:
    return AuditEntry(id=r[0], at=r[1], action=r[2], target=r[3], scope=r[4], fingerprint=r[5], address=r[6],
                      detail=r[7])
