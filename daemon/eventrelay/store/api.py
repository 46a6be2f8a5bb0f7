"""The storage API: the one interface the service, the dispatchers, ingest, the admin API and behaviour tests
use. An engine (store/sqlite/ today) implements `Store`; nothing above this package knows SQL or which engine
runs. In the spirit of huey's BaseStorage: every operation the daemon needs, documented here once.

What every engine guarantees (DESIGN rules 1, 3, 4 and 8):

* `ingest` returns only once its events and their jobs are durable, and stores a batch all or none.
* A producer-given event id is stored once across the whole store; a repeat is answered as a duplicate and
  queues nothing.
* The database is the queue: `claim` hands out due jobs in bounded pages, never one its caller holds
  (`exclude`: claimed and not yet recorded), nor one another daemon sharing the store holds. After a crash,
  whatever was claimed and not recorded is due again (at least once, never lost): at once for an engine
  owned by one daemon, once the claim's lease runs out for a shared one.
* Outcomes may be written behind and in batches (`record_later`); `record` waits for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ..jobs import JobState

if TYPE_CHECKING:  # the writer process imports this module too, and needs none of these
    import asyncio

    from ..events import Event
    from ..jobs import AttemptRecord, Job

__all__ = ["DEAD_LETTER_TYPE", "SEARCH_SCAN", "Accepted", "AttemptView", "AuditEntry", "DaemonView", "JobSearch",
           "JobState", "JobView", "LastAttempts", "OutcomeCounts", "Route", "SearchPage", "Store", "StoreError",
           "StoredEvent", "WATCHED_STATES"]

Route = tuple[str, str | None]  # an integration to queue an event for, and the job's ordering key (or None)

# The type of the event a job becomes when it dies and its integration names a dead-letter integration.
DEAD_LETTER_TYPE = "eventrelay.dead_letter"

# The states an operator watches: `job_counts` counts these unless asked for others.
WATCHED_STATES = (JobState.PENDING, JobState.DEAD)


class StoreError(Exception):
    """The store could not do what was asked; nothing of that operation was written. The message says what
    to do about it."""


class Accepted(NamedTuple):
    """What ingest answers for one event. A named tuple, as `Event` is: one is made per event."""

    id: str
    jobs: int  # jobs queued for it (for a duplicate: those queued when it was first stored)
    duplicate: bool


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as the admin API and the CLI show it."""

    id: int
    integration: str
    event_id: str
    event_type: str
    state: JobState
    attempts: int  # attempts made so far
    created_at: float  # unix seconds
    updated_at: float
    next_attempt_at: float | None  # when a pending job is due; None in the other states
    last_error: str | None


@dataclass(frozen=True, slots=True)
class AttemptView:
    """One line of the attempt log."""

    id: int
    job_id: int
    integration: str
    attempt: int  # 1 for the first attempt of the job
    succeeded: bool
    created_at: float  # when the attempt started, unix seconds
    duration: float  # seconds
    status_code: int | None
    error_detail: str | None
    body: str | None  # the target's answer, truncated
    event_id: str | None = None  # the job's event: given by `attempts_after` and `attempts_before`, else None
    event_type: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored."""

    id: str
    type: str
    payload: str  # JSON text of {"data": …, "included": …}, as sent to targets
    accepted_at: float  # unix seconds


@dataclass(frozen=True, slots=True)
class LastAttempts:
    """An integration's latest successful and latest failed attempt."""

    success_at: float | None
    failure_at: float | None
    failure_error: str | None  # the latest failure's error, still shown after a success follows it


@dataclass(frozen=True, slots=True)
class OutcomeCounts:
    """Attempts of an integration over a span of time, by what they came to."""

    delivered: int = 0
    failed: int = 0  # failed attempts whose job is retried
    dead: int = 0  # attempts that left their job dead


@dataclass(frozen=True, slots=True)
class JobSearch:
    """Which jobs a search lists, newest first. None means any."""

    integration: str | None = None
    state: JobState | None = None
    event_type: str | None = None
    since: float | None = None  # created at or after (unix seconds)
    until: float | None = None  # created before
    before: int | None = None  # the page's cursor: only jobs with a smaller id (a previous page's `next`)


class SearchPage(NamedTuple):
    jobs: list[JobView]
    # The cursor of the next page (JobSearch.before), None when no older job can match. A page may hold
    # fewer jobs than asked and still have a next one: each page examines a bounded number of jobs.
    next: int | None


# The most jobs one search page examines: a search stays a bounded query whatever the store holds.
SEARCH_SCAN = 20_000
# The most attempts `durations` reads: latency percentiles come from a bounded sample.
DURATIONS_SAMPLE = 1000


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An operator's state-changing action, as the audit log keeps it."""

    at: float  # unix seconds
    action: str  # retry, replay, enable, pause, resume, close-circuit, test, reload
    target: str  # the integration (and job) acted on, or "" for the whole daemon
    scope: str  # of the caller: admin, or open (no token is configured)
    fingerprint: str | None  # of the caller's token (access.fingerprint), never the token
    address: str | None  # the caller's address
    detail: str | None = None  # what was asked and what came of it, in a line
    id: int = 0  # given by the store


@dataclass(frozen=True, slots=True)
class DaemonView:
    """A daemon using the store, as it last said of itself."""

    id: str
    host: str
    pid: int
    version: str
    config_hash: str  # of what must agree across daemons: integrations and delivery (Service says what)
    started_at: float  # unix seconds
    last_seen: float  # its last heartbeat (for a store of one daemon: now)


class Store(Protocol):
    """Everything the daemon asks of its storage. Every method may raise StoreError."""

    # Called after each commit with the integrations that got new jobs, so their dispatchers wake at once.
    on_jobs_added: Callable[[set[str]], None]
    # Called after each commit with (operations in it, seconds it took): the group-commit metrics.
    on_commit: Callable[[int, float], None]
    commits: int  # transactions committed so far: concurrent operations share them (group commit)

    # -- life -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Own the engine's background work until `stop`, and return once what was queued is written.
        Raises StoreError if the engine fails for good: nothing more can be stored, and every operation
        still unanswered has failed (so nothing unacknowledged is lost); the daemon stops."""

    def stop(self) -> None:
        """Write what is queued so far, then end `run`. Later writes fail with StoreError."""

    async def close(self) -> None:
        """Release everything (waits for `run`'s work to end); the store cannot be used after."""

    async def ping(self) -> bool:
        """The store can read and write: for readiness and the watchdog."""

    id: str  # this daemon, among those sharing the store
    # Other daemons may use the store too: what they share beyond jobs (a target's rate limit, a 410) must
    # be read from it, not kept in this daemon alone.
    shared: bool

    def announce(self, version: str, config_hash: str) -> None:
        """What this daemon tells the others about itself, from its start and again after each reload."""

    async def daemons(self) -> list[DaemonView]:
        """The daemons using the store now (heartbeats not older than a few seconds), this one first."""

    # -- ingest ---------------------------------------------------------------------------------------------

    async def ingest(self, events: Sequence[Event], routes: Sequence[Sequence[Route]]) -> list[Accepted]:
        """Store events and one job per route, all or none; returns once committed. `routes[i]` lists, for
        events[i], the integrations to queue it for with the job's ordering key (or None). An event whose
        producer-given id is already stored (or repeated in the same call) is a duplicate: acknowledged, and
        nothing is queued for it. Events without a producer-given id (`id_given` False) never are."""

    # -- delivery -------------------------------------------------------------------------------------------

    async def claim(self, integration: str, now: float, limit: int, exclude: Iterable[int] = (),
                    ordered: bool = False, only: Iterable[int] | None = None) -> list[Job]:
        """Up to `limit` pending jobs of one integration due at `now`, earliest due first (then oldest first),
        skipping `exclude` (those in flight). `only`: among these jobs alone. `ordered`: only the head of each
        ordering key, i.e. no earlier job of the same key is still pending, so a key's jobs go one at a time,
        in order. Claims are cheap and bounded by `limit`, whatever the backlog."""

    async def next_due(self, integration: str, exclude: Iterable[int] = (), ordered: bool = False) -> float | None:
        """When the earliest pending job of an integration (outside `exclude`) falls due; None if none.
        `ordered`: as for `claim`, only the head of each ordering key counts."""

    async def release(self, job_ids: Iterable[int]) -> None:
        """Claimed jobs that will not be attempted now (a dispatcher stopping with jobs in hand): another
        daemon sharing the store may claim them at once, rather than when their lease runs out."""

    def record_later(self, records: Sequence[AttemptRecord]) -> asyncio.Future[None]:
        """Queue delivery outcomes (the job's new state, a line in the attempt log, a dead letter if the job
        died and its integration names one) for a coming commit; the future resolves once committed."""

    async def record(self, records: Sequence[AttemptRecord]) -> None:
        """`record_later`, waiting for the commit."""

    async def take_tokens(self, integration: str, rate: float, burst: float, want: int) -> tuple[int, float]:
        """For a shared store: up to `want` starts from the integration's rate-limit bucket, which all the
        daemons draw from (`rate` per second, holding at most `burst`). Returns (granted, seconds until the
        rest could be granted)."""

    # -- integration state ----------------------------------------------------------------------------------

    async def disabled(self) -> dict[str, tuple[float, str]]:
        """Integrations disabled by their target (410 Gone): name → (when, why)."""

    async def set_disabled(self, name: str, reason: str | None) -> None:
        """Disable an integration with a reason, or (reason None) enable it again. Survives restarts."""

    async def paused(self) -> dict[str, float]:
        """Integrations an operator paused: name → since when."""

    async def set_paused(self, name: str, paused: bool) -> None:
        """Pause an integration (it keeps its jobs and sends nothing) or resume it. Survives restarts."""

    # -- reads for status and the admin API -------------------------------------------------------------------

    async def job_counts(self, states: Iterable[JobState] = WATCHED_STATES) -> dict[tuple[str, JobState], int]:
        """(integration, state) → number of jobs, for the states asked (by default pending and dead); pairs
        without jobs are left out."""

    async def backlog(self, integrations: Sequence[str], cap: int) -> dict[tuple[str, JobState], int]:
        """(integration, state) → pending and dead jobs of these integrations, each counted up to `cap` + 1 at
        most (a bounded walk of an index, whatever the backlog): more than `cap` reads as `cap` + 1."""

    async def oldest_pending(self) -> dict[str, float]:
        """integration → when its oldest pending job was created."""

    async def outcomes_since(self, since: float) -> dict[str, OutcomeCounts]:
        """integration → its attempts started since `since` (to the minute), by outcome. These counts outlive
        reloads and restarts, are pruned with the attempt log, and may lag the latest outcomes by a second."""

    async def outcomes_by_minute(self, integration: str, since: float) -> list[tuple[float, OutcomeCounts]]:
        """An integration's attempts per minute since `since` (a minute's start, unix seconds, and its counts),
        oldest first; minutes without attempts are left out. At most one row per minute: a chart's data."""

    async def last_attempts(self, integration: str) -> LastAttempts:
        """The latest successful and failed attempt of an integration."""

    async def jobs(self, integration: str | None = None, state: JobState | None = None, limit: int = 25,
                   offset: int = 0, event_id: str | None = None) -> tuple[list[JobView], int]:
        """A page of jobs, newest first, and how many match in all. None means any integration or state."""

    async def job(self, integration: str, job_id: int) -> JobView | None:
        """One job of an integration; None if it has no such job."""

    async def logs(self, integration: str | None = None, job_id: int | None = None, limit: int = 25,
                   offset: int = 0) -> tuple[list[AttemptView], int]:
        """A page of the attempt log, newest first, and how many entries match in all."""

    async def attempts(self, job_id: int) -> list[AttemptView]:
        """Every attempt of one job, oldest first."""

    async def attempts_after(self, after: int, limit: int) -> list[AttemptView]:
        """Attempts of any integration logged after the attempt `after`, oldest first, at most `limit`, with
        their event's id and type: a live tail's next lines."""

    async def attempts_before(self, integration: str | None, before: int | None, limit: int) -> list[AttemptView]:
        """A page of the attempt log (of one integration, or all) newest first, before the attempt `before`
        (None: the latest), with each event's id and type; through an index, whatever the log holds."""

    async def durations(self, integration: str, since: float, limit: int = DURATIONS_SAMPLE) -> list[float]:
        """How long (seconds) the integration's latest attempts took, at most `limit`, those started since
        `since` only: a bounded sample for latency percentiles."""

    async def search(self, query: JobSearch, limit: int, scan: int = SEARCH_SCAN) -> SearchPage:
        """A page of at most `limit` jobs matching `query`, newest first, with the next page's cursor. Bounded
        work whatever the store holds: at most `scan` jobs examined, found through indexes."""

    async def events(self, limit: int = 25, offset: int = 0) -> tuple[list[StoredEvent], int]:
        """A page of the stored events, newest first, and how many there are in all (those no integration
        observes included, until retention removes them)."""

    async def event(self, event_id: str) -> StoredEvent | None:
        """One stored event by its id; None if it is not stored."""

    # -- admin writes -----------------------------------------------------------------------------------------

    async def audit(self, entry: AuditEntry) -> None:
        """Keep an operator's action in the audit log (pruned with the attempt log's retention)."""

    async def audit_log(self, before: int | None, limit: int) -> list[AuditEntry]:
        """The audit log newest first, before the entry `before` (None: the latest); at most `limit`."""

    async def retry(self, integration: str, job_id: int) -> JobState | None:
        """Make a pending or dead job due now, with a fresh max_age window. Returns the state the job had
        (a delivered job is left alone: replay is for that); None if the integration has no such job."""

    async def replay(self, integration: str, *, dead: bool = False, since: float | None = None,
                     until: float | None = None, not_requeued_since: float | None = None,
                     limit: int = 10_000) -> int:
        """Re-queue up to `limit` jobs created in [since, until) (by default: ever), due now: the dead ones
        (`dead`), or else the delivered and the dead. Jobs already pending are left alone (on their way). Each
        replayed job gets a fresh max_age window. `not_requeued_since` skips jobs re-queued since then, so a replay done
        in batches ends. Returns how many were re-queued."""

    async def prune(self, delivered_before: float, dead_before: float, batch: int = 1000) -> int:
        """Delete one batch of finished jobs past their retention (delivered ones last updated before
        `delivered_before`, dead ones before `dead_before`), their attempts, the events nothing needs any
        more, and outcome counts and audit entries older than `delivered_before`. A short operation, so
        ingest never waits long: call again until it returns 0. Returns how many rows went."""
