"""One dispatcher per integration: claims due jobs from the store, runs the sender, records outcomes."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog

from ..aio import Backoff, wait_event
from ..config import Integration
from ..jobs import AttemptRecord, Job, JobState, Outcome
from ..metrics import Metrics
from ..store import Store, StoreError
from .gate import NO_CHANGES, Gate
from .policy import CircuitBreaker, RetryPolicy, SharedBucket
from .targets import Sender

if TYPE_CHECKING:
    from ..tracing import AttemptSpans

_IDLE_RECHECK = 30.0  # seconds; a safety net, since the writer wakes us for new jobs and we know retry times
_STORE_ERROR_PAUSE = 1.0
_TOKENS_IDLE_CHECK = 1.0  # seconds between looks at `stopping` while no start waits for the rate limit
_TOKENS_MIN_WAIT = 0.01  # seconds at least between two fetches the shared rate limit turned down
_RECORD_RETRY_MAX = 30.0  # seconds between attempts to write outcomes the database refused, at most
_SENDER_RESTART_MAX = 60.0  # seconds between attempts to start a sender that failed to, at most
# Outcomes are written behind: a slot is free once the target answers. The room for unwritten outcomes, as a
# multiple of concurrency, lets one commit carry many outcomes while the slots stay busy (measurements in
# docs/performance-notes.md); it is also the most deliveries a kill -9 can repeat per integration.
UNRECORDED_FACTOR = 16


class Dispatcher:
    """Keeps up to `concurrency` deliveries in flight for one integration.

    Memory is only a window on the database: a small buffer of claimed jobs (`_ready`, 4 × `concurrency`
    deliveries: enough to last through a claim), those in flight and those whose outcome is being written,
    so a backlog of millions costs disk, not RAM, and a freed slot starts its next job without waiting for
    a query. A job stays in `_claimed` from its claim until its outcome is committed, so no claim can hand it
    out twice. A slot is freed as soon as the target answers; the outcome is written in the background,
    batched with others by the store's writer.

    Before each start, the gate (gate.py) decides whether the integration may send at all: not while disabled
    (410 Gone), not while outcomes cannot be written, not while paused (the target asked us to slow down), not
    while its circuit is open, and no faster than its rate limit. Held-back jobs wait without an attempt.
    """

    def __init__(self, integration: Integration, store: Store, sender: Sender, metrics: Metrics | None = None,
                 disabled: tuple[float, str] | None = None, paused_at: float | None = None,
                 spans: AttemptSpans | None = None):
        self.integration = integration
        self._spans = spans  # OpenTelemetry spans of the attempts, when tracing is on
        self.name = integration.name
        self._store = store
        self._sender = sender
        delivery = integration.delivery
        self._policy = RetryPolicy.from_config(delivery)
        self._ordered = delivery.ordering == "per_resource"
        self._slots = delivery.concurrency
        self._batch = sender.max_batch
        self._page = 4 * self._slots * self._batch  # jobs held ready at most
        self._ready: collections.deque[Job] = collections.deque()
        self._more_due = False  # the last claim filled its page: more jobs may be due (a backlog)
        self._claimed: set[int] = set()  # ready, in flight, or outcome not yet committed
        self._running = 0  # deliver() calls in flight
        # Answered but outcome not yet committed. Bounded, since a crash delivers these again: in flight plus
        # unrecorded stay under UNRECORDED_FACTOR × concurrency, the most a crash can duplicate per integration.
        self._recording = 0
        self._unrecorded_limit = UNRECORDED_FACTOR * self._slots
        self.gate = Gate(delivery, burst=self._batch, disabled=disabled, shared=store.shared, paused_at=paused_at)
        self._expedite: set[int] = set()  # jobs an operator asked to send now, to be claimed first
        # When the store had this integration's disabled state, as far as this daemon knows (0: not yet): a
        # read of the store begun later that lacks it means an operator enabled it on another daemon.
        self.disabled_recorded_at = time.time() if disabled is not None else 0.0
        self._settling: dict[int, asyncio.Future[None]] = {}  # jobs someone waits to see recorded
        self._finished = False  # `run` has returned: outcomes still unwritten are given up
        self._loop = asyncio.get_running_loop()  # made by the service, on its loop
        self._wake = asyncio.Event()
        self._deliveries: asyncio.TaskGroup | None = None  # set while `run` runs
        self._all_recorded = asyncio.Event()  # no outcome waiting for the writer
        self._all_recorded.set()
        # Outcomes of this turn of the event loop not yet handed to the store: one operation per turn.
        self._unsent: tuple[list[Job], list[AttemptRecord]] = ([], [])
        self._unsent_chunks = 0
        self._stopping = False
        self.refresh_logger()
        self._metrics = metrics
        self._counts = metrics.deliveries(self.name) if metrics is not None else None
        self._report_breaker()

    # -- the loop ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until stopped: claim due jobs, start what the gate and the slots allow, sleep until woken.

        Each delivery task then sends, reacts to the outcomes (`_attempt`), writes them behind
        (`_write_behind`) and takes the next ready jobs itself (`_deliver`); the loop only tops up the buffer
        and sleeps until a slot frees, new jobs are committed, the gate opens or a retry falls due.
        """
        if not await self._start_sender():
            return
        try:
            async with asyncio.TaskGroup() as deliveries:
                self._deliveries = deliveries
                if isinstance(self.gate.bucket, SharedBucket) and self.gate.bucket.rate is not None:
                    deliveries.create_task(self._fetch_tokens(self.gate.bucket), name=f"rate-limit:{self.name}")
                while not self._stopping:
                    self._wake.clear()
                    try:
                        sleep = await self._claim_and_start(deliveries)
                    except StoreError as e:
                        self._log.error("cannot claim jobs", error=str(e))
                        sleep = _STORE_ERROR_PAUSE
                    if self._stopping:
                        break
                    await wait_event(self._wake, sleep)
            # Deliveries have ended; their outcomes may still be on their way to the database.
            await self._all_recorded.wait()
        finally:
            self._finished = True
            await self._release_claims()
            await self._sender.close()

    async def _release_claims(self) -> None:
        """Hand back the jobs still claimed: never sent, or abandoned at the grace's end, or whose outcome could
        not be written (they go again, at least once), so another daemon sharing the store may take them now."""
        unsent, self._ready = list(self._claimed), collections.deque()
        if unsent:
            try:
                await self._store.release(unsent)
            except StoreError as e:
                self._log.warning("cannot release claimed jobs; they are claimable again when their leases "
                                  "run out", error=str(e), jobs=len(unsent))

    async def _fetch_tokens(self, bucket: SharedBucket) -> None:
        """Fetch starts from the rate limit the daemons sharing the store share, whenever the gate is short
        of them, and wake the loop when some come."""
        assert bucket.rate is not None
        while not self._stopping:
            if not bucket.short:
                await wait_event(bucket.wanted, _TOKENS_IDLE_CHECK)
                continue
            try:
                granted, retry_in = await self._store.take_tokens(self.name, bucket.rate, bucket.capacity,
                                                                  bucket.fetch)
            except StoreError as e:
                self._log.warning("cannot take from the shared rate limit", error=str(e))
                granted, retry_in = 0, _STORE_ERROR_PAUSE
            bucket.grant(granted, retry_in)
            if granted:
                self._wake.set()
            else:
                await asyncio.sleep(min(max(retry_in, _TOKENS_MIN_WAIT), _TOKENS_IDLE_CHECK))

    async def _start_sender(self) -> bool:
        """Open the sender's connection; a failure is retried with backoff, never fatal to the daemon."""
        backoff = Backoff(1.0, _SENDER_RESTART_MAX)
        while not self._stopping:
            try:
                await self._sender.start()
                return True
            except Exception as e:  # noqa: BLE001 - whatever the library raises, the operator needs to see it
                delay = backoff.next()
                self._log.error("cannot start the sender; retrying", error=str(e), retry_in_s=delay)
                await wait_event(self._wake, delay)
                self._wake.clear()
        return False

    async def _claim_and_start(self, deliveries: asyncio.TaskGroup) -> float | None:
        """Start deliveries while the gate and the slots allow, claiming more when the buffer runs low.

        Returns how long to sleep: None until woken (a slot frees, new jobs are committed, the operator
        enables the integration), else until the gate opens or the earliest retry falls due.
        """
        while not self._stopping:
            if self._expedite:
                await self._claim_expedited()
            gate = self._start_ready(deliveries)
            want = self._page - len(self._ready)
            if want < self._page // 2 or (gate != 0.0 and self._ready):
                return gate or None  # enough held, or held back by the gate: sleep until it opens
            if not await self._claim(want):
                if self._ready or self._running >= self._slots:
                    return gate or None
                return await self._until_due()
        return None

    async def _claim(self, want: int) -> int:
        """Claim up to `want` due jobs into the ready buffer; how many."""
        jobs = await self._store.claim(self.name, time.time(), want, self._claimed, self._ordered)
        self._more_due = len(jobs) == want
        self._claimed.update(job.id for job in jobs)
        self._ready.extend(jobs)
        return len(jobs)

    async def _claim_expedited(self) -> None:
        """Put the jobs an operator asked for at the front of the ready buffer, claiming those not held yet."""
        wanted, self._expedite = self._expedite, set()
        held = [job for job in self._ready if job.id in wanted]
        for job in held:
            self._ready.remove(job)
        unclaimed = wanted - self._claimed
        jobs = await self._store.claim(self.name, time.time(), len(unclaimed), self._claimed, self._ordered,
                                       only=unclaimed) if unclaimed else []
        self._claimed.update(job.id for job in jobs)
        self._ready.extendleft(reversed(held + jobs))

    async def _until_due(self) -> float:
        """Nothing ready and nothing due: seconds until the earliest retry falls due (new jobs wake us)."""
        due = await self._store.next_due(self.name, self._claimed, self._ordered)
        return _IDLE_RECHECK if due is None else max(0.0, min(due - time.time(), _IDLE_RECHECK))

    # -- starting deliveries -------------------------------------------------------------------------------

    def _start_ready(self, deliveries: asyncio.TaskGroup) -> float | None:
        """Start what the slots and the gate allow; returns the gate's wait (0 open, None until woken)."""
        while True:
            chunk = self._take()
            if not isinstance(chunk, list):
                return chunk
            deliveries.create_task(self._deliver(chunk), name=f"deliver:{self.name}")

    def _take(self) -> list[Job] | float | None:
        """The next jobs to send, taking a slot, if the slots, the write-behind window and the gate allow;
        else the gate's wait (0.0: nothing ready or no slot free, None: until woken)."""
        if not (self._ready and self._running < self._slots and not self._stopping
                and self._running + self._recording < self._unrecorded_limit):
            return 0.0
        now = time.time()
        size = min(self._batch, len(self._ready))
        gate = self.gate.wait(now, size)
        if gate != 0.0:
            return gate
        chunk = [self._ready.popleft() for _ in range(size)]
        if self._more_due and len(self._ready) < self._page // 2:
            # Through a backlog, the loop claims more while the rest of the buffer lasts. Otherwise new jobs
            # and due retries wake it anyway, and a claim per take would find nothing.
            self._wake.set()
        self.gate.started(now, size)
        self._running += 1
        return chunk

    def _start_next(self) -> None:
        """A slot freed: start the next ready job now, and wake the loop if it has work: claiming more, or
        re-arming its timer for a closed gate or the next retry.

        Starting here, not only in the loop, keeps the slots busy while the loop awaits a claim; waking it
        only when needed spares a turn of the loop per delivery.
        """
        gate = 0.0
        if self._deliveries is not None and not self._stopping:
            gate = self._start_ready(self._deliveries)
        if gate != 0.0 or len(self._ready) < self._page // 2 or self._stopping:
            self._wake.set()

    # -- one delivery --------------------------------------------------------------------------------------

    async def _deliver(self, jobs: list[Job]) -> None:
        """Send a chunk, then the next ones while work is ready and the gate allows, in this same task: the
        next request starts the moment an answer is in, not one event-loop turn later in a new task."""
        chunk: list[Job] | float | None = jobs
        while isinstance(chunk, list):
            self._write_behind(chunk, await self._attempt(chunk))
            chunk = self._take()
        self._wake.set()  # the loop claims more, or re-arms its timer for the gate

    async def _attempt(self, jobs: list[Job]) -> list[AttemptRecord]:
        """One attempt at a chunk: send, decide each job's fate, react as an integration; the records."""
        started_at = time.time()
        spans = self._spans.start(jobs) if self._spans is not None else None
        try:
            try:
                outcomes = await self._sender.deliver(jobs)
            except Exception as e:  # noqa: BLE001 - a sender bug fails the attempt, never the dispatcher
                self._log.exception("sender failed unexpectedly", jobs=len(jobs))
                outcomes = [Outcome(j.id, False, time.time() - started_at, error=f"internal error: {e!r}")
                            for j in jobs]
        finally:
            self._running -= 1
            self._recording += 1
            self._all_recorded.clear()
        try:
            now = time.time()
            by_id = {o.job_id: o for o in outcomes}
            records = [self._policy.decide(job, by_id.get(job.id) or _missing(job), started_at, now)
                       for job in jobs]
            if spans is not None:
                self._spans.end(spans, records)
            # Before anything else starts: a 410, a slow-down or an opened circuit holds back what comes next.
            await self._react(records, now)
        except BaseException:
            self._release(jobs)
            raise
        return records

    async def _react(self, records: list[AttemptRecord], now: float) -> None:
        """What this batch's outcomes mean for the whole integration (the gate decides): log, report and
        persist it."""
        changes = self.gate.react(records, now)
        if changes is NO_CHANGES:
            return
        if changes.circuit is not None:
            self._on_breaker_change(changes.circuit, records)
        for record in changes.paused:
            self._log.warning("target asks to slow down: pausing the integration",
                              status=record.outcome.status_code, pause_s=round((record.next_at or now) - now, 2))
        if changes.gone is not None:
            self._log.error("target is gone (410): integration disabled; its jobs stay pending. Fix the "
                            "URL and reload, or run `eventrelay enable`", integration=self.name)
            self._report_disabled()
            try:
                await self._store.set_disabled(self.name, changes.gone)
                self.disabled_recorded_at = time.time()
            except StoreError as e:
                self._log.error("cannot persist the disabled state", error=str(e))

    # -- writing outcomes behind ---------------------------------------------------------------------------

    def _write_behind(self, jobs: list[Job], records: list[AttemptRecord]) -> None:
        """Queue the outcomes for the writer; the jobs stay claimed until they are committed.

        The outcomes of the deliveries that end in one turn of the event loop go to the store as one
        operation at its end: one future, one callback and one release for them all, not one each.
        """
        if not self._unsent_chunks:
            self._loop.call_soon(self._send_outcomes)
        self._unsent[0].extend(jobs)
        self._unsent[1].extend(records)
        self._unsent_chunks += 1

    def _send_outcomes(self) -> None:
        (jobs, records), chunks = self._unsent, self._unsent_chunks
        self._unsent, self._unsent_chunks = ([], []), 0
        self._store.record_later(records).add_done_callback(
            functools.partial(self._recorded, jobs, records, chunks))

    def _recorded(self, jobs: list[Job], records: list[AttemptRecord], chunks: int,
                  written: asyncio.Future[None], delay: float = _STORE_ERROR_PAUSE) -> None:
        error = written.exception() if not written.cancelled() else StoreError("the writer stopped")
        if error is None:
            if self.gate.unwritable:
                self.gate.unwritable = False
                self._log.info("delivery outcomes are written again; deliveries resume")
            self._log_outcomes(records)
            self._release(jobs, chunks)
            return
        # What was delivered must be recorded, not sent again: the outcomes are kept and written again later,
        # the jobs stay claimed, and nothing new is sent until a write succeeds. Releasing them instead would
        # re-send every job about once a second while the disk is full.
        if not self.gate.unwritable:
            self.gate.unwritable = True
            self._log.error("cannot record delivery outcomes; holding deliveries until they can be written",
                            error=str(error))
        self._loop.call_later(delay, self._record_again, jobs, records, chunks, min(delay * 2, _RECORD_RETRY_MAX))

    def _record_again(self, jobs: list[Job], records: list[AttemptRecord], chunks: int, delay: float) -> None:
        if self._finished:
            # The dispatcher is gone (a shutdown while the database refused writes): the jobs are still
            # pending in the database and are delivered again after the restart.
            self._release(jobs, chunks)
            return
        self._store.record_later(records).add_done_callback(
            functools.partial(self._recorded, jobs, records, chunks, delay=delay))

    def _release(self, jobs: list[Job], chunks: int = 1) -> None:
        self._recording -= chunks
        self._claimed.difference_update(job.id for job in jobs)
        if self._settling:
            for job in jobs:
                waiter = self._settling.pop(job.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        if self._recording == 0:
            self._all_recorded.set()
        self._start_next()  # a send may have waited for this; a retry may now be the earliest due job

    # -- operators' actions and the service's calls ---------------------------------------------------------

    def refresh_logger(self) -> None:
        """Bind this dispatcher's logger to the logging configuration in force (again after a reload that
        changed it): a bound logger keeps the level it was made with, and one per delivery must be cheap."""
        self._log = structlog.get_logger(component="delivery").bind(integration=self.name)
        # At level warning a delivery builds no log fields: one per delivery adds up.
        self._log_delivered = self._log.is_enabled_for(logging.INFO)

    def wake(self) -> None:
        """New jobs were committed for this integration."""
        self._wake.set()

    def stop(self) -> None:
        """Claim nothing more; `run` returns once the deliveries in flight have finished."""
        self._stopping = True
        self._wake.set()
        if isinstance(self.gate.bucket, SharedBucket):
            self.gate.bucket.wanted.set()  # its fetch task sees the stop

    @property
    def in_flight(self) -> int:
        return self._running * self._batch

    def pause(self, since: float) -> None:
        """An operator paused the integration: nothing new is sent (deliveries under way finish)."""
        self.gate.paused_at = since
        self._report_disabled()

    def resume(self) -> None:
        """An operator resumed the integration: its due jobs go now."""
        self.gate.paused_at = None
        self._report_disabled()
        self._wake.set()

    def disable(self, disabled: tuple[float, str]) -> None:
        """Another daemon sharing the store got a 410 from the target: (when, why)."""
        self.gate.disabled = disabled
        self.disabled_recorded_at = time.time()
        self._report_disabled()

    def enable(self) -> None:
        """An operator turned the integration back on after a 410."""
        self.gate.enable()
        self._report_disabled()
        self._wake.set()

    def send_now(self, job_ids: Iterable[int] = ()) -> None:
        """An operator retried or replayed jobs: they go now, ahead of the rest, whatever the slow-down pause
        or an open circuit's cool-down (they are the probe). A 410's disabled state still holds."""
        self.gate.send_now(time.time())
        self._expedite.update(job_ids)
        self._wake.set()

    def close_circuit(self) -> str:
        """An operator says the target is fixed: close the circuit now. Returns the state it had."""
        was = self.gate.close_circuit()
        if was != CircuitBreaker.CLOSED:
            self._on_breaker_change(CircuitBreaker.CLOSED, [], by_operator=True)
            self._wake.set()
        return was

    async def settled(self, job_id: int) -> None:
        """Return once `job_id` is not being delivered and its last outcome is written: an operator's retry
        written before that outcome would be overwritten by it."""
        if job_id not in self._claimed or any(job.id == job_id for job in self._ready):
            return
        waiter = self._settling.get(job_id)
        if waiter is None:
            waiter = self._settling[job_id] = self._loop.create_future()
        await asyncio.shield(waiter)

    # -- logs and metrics ----------------------------------------------------------------------------------

    def _on_breaker_change(self, state: str, records: list[AttemptRecord], by_operator: bool = False) -> None:
        if state == CircuitBreaker.OPEN:
            self._log.warning("circuit open: the target keeps failing; holding deliveries",
                              cooldown_s=round(self.gate.breaker.opened_until - time.time(), 2),
                              last_error=records[-1].outcome.error)
        elif by_operator:
            self._log.info("circuit closed by an operator")
        else:
            self._log.info("circuit closed: the target answers again")
        if self._metrics is not None:
            self._metrics.breaker_transitions.labels(self.name, state).inc()
        self._report_breaker()

    def _report_breaker(self) -> None:
        if self._metrics is not None:
            self._metrics.breaker_state.labels(self.name).set(_CIRCUIT_GAUGE[self.gate.breaker.state])
            self._report_disabled()

    def _report_disabled(self) -> None:
        if self._metrics is not None:
            self._metrics.disabled.labels(self.name).set(1 if self.gate.disabled else 0)
            self._metrics.paused.labels(self.name).set(1 if self.gate.paused_at is not None else 0)

    def _log_outcomes(self, records: list[AttemptRecord]) -> None:
        """Count and log committed outcomes."""
        for record in records:
            o = record.outcome
            if self._counts is not None:
                self._counts.add(_RESULT[record.state], o.duration)
            if record.state is JobState.DELIVERED:
                if self._log_delivered:
                    self._log.info("delivered", **_fields(record))
            elif record.state is JobState.PENDING:
                self._log.warning("delivery failed; will retry", error=o.error,
                                  retry_in_s=round((record.next_at or 0) - time.time(), 2), **_fields(record))
            else:
                self._log.error("delivery failed; job is dead", error=o.error, dead_letter=record.dead_letter,
                                **_fields(record))


_CIRCUIT_GAUGE = {CircuitBreaker.CLOSED: 0, CircuitBreaker.HALF_OPEN: 1, CircuitBreaker.OPEN: 2}
_RESULT = {JobState.DELIVERED: "delivered", JobState.PENDING: "failed", JobState.DEAD: "dead"}


def _fields(record: AttemptRecord) -> dict[str, Any]:
    job, o = record.job, record.outcome
    return dict(event_id=job.event_id, event_type=job.event_type, job_id=job.id, attempt=job.attempt,
                status=o.status_code, duration_ms=round(o.duration * 1000, 1))


def _missing(job: Job) -> Outcome:
    return Outcome(job.id, False, 0.0, error="internal error: the sender reported no outcome for this job")
