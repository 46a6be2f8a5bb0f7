"""What crosses the socket between the daemon (engine.py) and its writer process (writer.py).

Each message is a frame: its length, then the value in marshal's format. marshal, not JSON: both ends run
the same interpreter (the writer is `sys.executable`), it keeps every str (lone surrogates too) and int as
they are, event payloads (JSON text themselves) travel without escaping, and it is the cheapest encoding
for the event loop, which HTTP ingest of large batches keeps saturated.

marshal takes exact built-in types only (it refuses a NamedTuple or an IntEnum member), so every record
travels as a plain tuple in the order of the NamedTuple below that names it, and every kind as its int. The
functions here build those tuples, so the order lives in this file alone.

Daemon → writer: one frame per turn of the event loop, a list of `Operation`s.
Writer → daemon: one frame per message, `(Reply, *fields)`; for DONE the fields are a `Done`.
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ...jobs import AttemptRecord

_FRAME_LENGTH = struct.Struct("<I")


def dumps(value: Any) -> bytes:
    """One frame: the length of the value in marshal's format, then the value."""
    body = marshal.dumps(value)
    return _FRAME_LENGTH.pack(len(body)) + body


class FrameReader:
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


# -- daemon → writer --------------------------------------------------------------------------------------

class Op(IntEnum):
    """What an operation asks of the writer, and what its `items` are."""

    INGEST = 1  # items: a list of store.rows.EventRow; result: the duplicates, [(index, jobs they got then)]
    RECORD = 2  # items: a list of OutcomeRow; result: None
    SET_DISABLED = 3  # items: SetDisabled; result: None
    RETRY = 4  # items: Retry; result: the state the job had, or None
    REPLAY = 5  # items: Replay; result: how many jobs were re-queued
    PRUNE = 6  # items: Prune; result: how many rows went
    VACUUM = 7  # items: None; run once the transaction has committed, outside any (what SQLite will not do
    #             inside one): hand the pages pruning freed back to the file system
    SET_PAUSED = 8  # items: SetPaused; result: None
    AUDIT = 9  # items: Audit; result: None


ROW_OPS = frozenset((Op.INGEST, Op.RECORD))  # operations whose items are rows (the rest count as one row)


class Operation(NamedTuple):
    id: int  # the daemon's number for it; the answer names it
    kind: Op
    items: Any



class OutcomeRow(NamedTuple):
    """A delivery outcome: the `outcome` view's columns (up to `dead_letter`), then what a dead letter needs."""

    job_id: int
    integration: str
    state: str  # a JobState's value
    attempt: int
    next_at: float | None
    error: str | None
    succeeded: int  # 0 or 1, as stored
    started_at: float
    duration: float
    status_code: int | None
    body: str | None
    dead_letter: str | None  # the integration a dead job is forwarded to
    event_id: str
    event_type: str


OUTCOME_VIEW_COLUMNS = OutcomeRow._fields[:OutcomeRow._fields.index("dead_letter")]


def outcome_rows(records: Sequence[AttemptRecord]) -> list[tuple[Any, ...]]:
    """Record's items, as OutcomeRows travel."""
    return [(r.job.id, r.job.integration, r.state.value, r.job.attempt, r.next_at, r.outcome.error,
             int(r.outcome.succeeded), r.started_at, r.outcome.duration, r.outcome.status_code, r.outcome.body,
             r.dead_letter, r.job.event_id, r.job.event_type) for r in records]


class SetDisabled(NamedTuple):
    name: str
    reason: str | None  # None: enabled again


class SetPaused(NamedTuple):
    name: str
    paused: bool  # False: resumed


class Audit(NamedTuple):
    at: float
    action: str
    target: str
    scope: str
    fingerprint: str | None
    address: str | None
    detail: str | None


class Retry(NamedTuple):
    integration: str
    job_id: int


class Replay(NamedTuple):
    integration: str
    dead: bool
    since: float | None
    until: float | None
    not_requeued_since: float | None
    limit: int


class Prune(NamedTuple):
    delivered_before: float
    dead_before: float
    batch: int


ADMIN_WRITES: dict[Op, type[tuple[Any, ...]]] = {
    Op.SET_DISABLED: SetDisabled, Op.SET_PAUSED: SetPaused, Op.RETRY: Retry, Op.REPLAY: Replay, Op.PRUNE: Prune,
    Op.AUDIT: Audit}


def operation(value: Sequence[Any]) -> Operation:
    """An operation as the writer receives it, its kind and an admin write's arguments named again."""
    op_id, kind, items = value
    kind = Op(kind)
    args = ADMIN_WRITES.get(kind)
    return Operation(op_id, kind, args._make(items) if args is not None else items)  # type: ignore[attr-defined]


# -- writer → daemon --------------------------------------------------------------------------------------

class Reply(IntEnum):
    READY = 1  # (): the database is prepared; operations may come
    FAILED = 2  # (text): it cannot be used; the writer exits
    LOG = 3  # (level, event, fields): a line for the daemon's log
    DONE = 4  # Done: one transaction ended


class Done(NamedTuple):
    """What one transaction came to."""

    ids: list[int]  # the operations in it
    results: list[Any] | None  # theirs, in the same order (None when it failed)
    woken: list[str]  # integrations that got new jobs
    seconds: float  # how long it took
    error: str | None  # None, or why it failed, for the producers (errors.explain)
    detail: str | None  # the database's own error, for the log


def reply(kind: Reply, *fields: Any) -> bytes:
    return dumps((kind.value, *fields))
