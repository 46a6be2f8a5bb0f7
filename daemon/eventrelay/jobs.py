"""The unit of delivery work and what happened to it, shared by the store, the dispatcher and the senders.

Three of these are made per delivery, so they are not frozen: a frozen dataclass sets each field through
object.__setattr__, several times slower. Nothing changes them once made.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class JobState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(slots=True)
class Job:
    """One event for one integration, as claimed for an attempt."""

    id: int
    integration: str
    attempt: int  # the number of the attempt about to be made, from 1
    event_id: str
    event_type: str
    payload: str  # JSON text of {"data": ..., "included": ...}, spliced into bodies without re-encoding
    accepted_at: float  # unix seconds
    age_from: float = 0.0  # max_age counts from here: acceptance, or the last replay of the job
    # The W3C trace context sent to the target: the producer's as stored, or this attempt's span's when
    # tracing is on (the dispatcher sets it before the attempt).
    traceparent: str | None = None
    tracestate: str | None = None

    def __post_init__(self) -> None:
        if not self.age_from:
            self.age_from = self.accepted_at


@dataclass(slots=True)
class Outcome:
    """What one attempt to deliver one job came to, as a sender reports it."""

    job_id: int
    succeeded: bool
    duration: float  # seconds
    status_code: int | None = None
    error: str | None = None  # error_detail in the attempt log
    body: str | None = None  # the receiver's answer, truncated
    retryable: bool = True  # False: the attempt can never succeed as it is, so the job goes dead at once
    retry_after: float | None = None  # seconds the target asked us to wait (Retry-After)
    slow_down: bool = False  # the target is overloaded (429, 502, 504): the whole integration backs off
    gone: bool = False  # the target says it is gone for good (410): the integration is disabled
    message_id: str | None = None  # the id the target gave the message (SQS's MessageId), for traces


@dataclass(slots=True)
class AttemptRecord:
    """An outcome with the decision taken on it, ready to be written."""

    job: Job
    outcome: Outcome
    started_at: float
    state: JobState
    next_at: float | None  # when the job is due again, for PENDING
    dead_letter: str | None = None  # for DEAD: the integration that gets it forwarded
