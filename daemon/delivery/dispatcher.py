"""One dispatcher per integration: claims due jobs from the store, runs the sender, records outcomes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Sequence

import structlog

from ..config import Integration
from ..jobs import AttemptRecord, Job, JobState, Outcome
from ..metrics import Metrics
from ..store import Store, StoreError
from .policy import RetryPolicy
from .senders import Sender

_IDLE_RECHECK = 30.0  # seconds; a safety net, since the writer wakes us for new jobs and we know retry times
_STORE_ERROR_PAUSE = 1.0


class Dispatcher:
    """Keeps up to `concurrency` deliveries in flight for one integration.

    Memory is only a window on the database: a small buffer of claimed jobs (`_ready`, two pages of
    `concurrency` deliveries) and those in flight, so a backlog of millions costs disk, not RAM, and a freed
    slot starts its next job without waiting for a query. A job stays in `_claimed` from its claim until its
    outcome is committed, so no claim can hand it out twice. A slot is freed as soon as the target answers;
    the outcome is written in the background, batched with others by the store's writer.
    """

    def __init__(self, integration: Integration, store: Store, sender: Sender, metrics: Metrics | None = None):
        self.integration = integration
        self.name = integration.name
        self._store = store
        self._sender = sender
        self._policy = RetryPolicy.from_config(integration.delivery.retry)
        self._slots = integration.delivery.concurrency
        self._batch = sender.max_batch
        self._page = 2 * self._slots * self._batch  # jobs held ready at most
        self._ready: collections.deque[Job] = collections.deque()
        self._claimed: set[int] = set()  # ready, in flight, or outcome not yet committed
        self._running = 0  # deliver() calls in flight
        # Answered but outcome not yet committed. Bounded by `concurrency` too, since a crash delivers these
        # again: at most 2 × concurrency duplicates per integration per crash.
        self._recording = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._log = structlog.get_logger(component="delivery").bind(integration=self.name)
        self._metrics = metrics
        self._delivered_by_minute: collections.deque[list[int]] = collections.deque(maxlen=61)  # [minute, n]

    def wake(self) -> None:
        """New jobs were committed for this integration."""
        self._wake.set()

    def stop(self) -> None:
        """Claim nothing more; `run` returns once the deliveries in flight have finished."""
        self._stopping = True
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return self._running * self._batch

    def delivered_last_hour(self) -> int:
        """Deliveries this dispatcher made in the last 60 minutes (it counts since it started)."""
        now = int(time.time() // 60)
        return sum(n for minute, n in self._delivered_by_minute if minute > now - 60)

    def _count_delivered(self) -> None:
        minute = int(time.time() // 60)
        if self._delivered_by_minute and self._delivered_by_minute[-1][0] == minute:
            self._delivered_by_minute[-1][1] += 1
        else:
            self._delivered_by_minute.append([minute, 1])

    async def run(self) -> None:
        if not await self._start_sender():
            return
        try:
            async with asyncio.TaskGroup() as deliveries:
                while not self._stopping:
                    self._wake.clear()
                    try:
                        timeout = await self._fill(deliveries)
                    except StoreError as e:
                        self._log.error("cannot claim jobs", error=str(e))
                        timeout = _STORE_ERROR_PAUSE
                    if self._stopping:
                        break
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except TimeoutError:
                        pass
        finally:
            await self._sender.close()

    async def _start_sender(self) -> bool:
        """Open the sender's connection; a failure is retried with backoff, never fatal to the daemon."""
        delay = 1.0
        while not self._stopping:
            try:
                await self._sender.start()
                return True
            except Exception as e:  # noqa: BLE001 - whatever the library raises, the operator needs to see it
                self._log.error("cannot start the sender; retrying", error=str(e), retry_in_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                self._wake.clear()
                delay = min(delay * 2, 60.0)
        return False

    async def _fill(self, deliveries: asyncio.TaskGroup) -> float | None:
        """Start deliveries while slots are free, claiming more when the buffer runs low.

        Returns how long to sleep: None until woken (a slot frees, or new jobs are committed), else until
        the earliest retry falls due.
        """
        while not self._stopping:
            self._start_ready(deliveries)
            want = self._page - len(self._ready)
            if want < self._page // 2:
                return None  # enough held; a finishing delivery wakes us
            jobs = await self._store.claim(self.name, time.time(), want, self._claimed)
            self._claimed.update(job.id for job in jobs)
            self._ready.extend(jobs)
            if not jobs:
                if self._ready or self._running >= self._slots:
                    return None
                due = await self._store.next_due(self.name, self._claimed)
                return _IDLE_RECHECK if due is None else max(0.0, min(due - time.time(), _IDLE_RECHECK))
        return None

    def _start_ready(self, deliveries: asyncio.TaskGroup) -> None:
        while self._ready and self._running < self._slots and self._running + self._recording < 2 * self._slots:
            chunk = [self._ready.popleft() for _ in range(min(self._batch, len(self._ready)))]
            self._running += 1
            deliveries.create_task(self._deliver(chunk), name=f"deliver:{self.name}")

    async def _deliver(self, jobs: Sequence[Job]) -> None:
        started_at = time.time()
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
            self._wake.set()
        try:
            now = time.time()
            by_id = {o.job_id: o for o in outcomes}
            records = [self._policy.decide(job, by_id.get(job.id) or _missing(job), started_at, now)
                       for job in jobs]
            try:
                await self._store.record(records)
            except StoreError as e:
                # The jobs stay pending in the database and will be delivered again: at least once.
                self._log.error("cannot record delivery outcomes; they will be retried", error=str(e))
                await asyncio.sleep(_STORE_ERROR_PAUSE)
                return
            for record in records:
                self._log_outcome(record)
        finally:
            self._recording -= 1
            self._claimed.difference_update(job.id for job in jobs)
            self._wake.set()  # a retry may now be the earliest due job, or a send was waiting for this

    def _log_outcome(self, record: AttemptRecord) -> None:
        o, job = record.outcome, record.job
        fields = dict(event_id=job.event_id, event_type=job.event_type, job_id=job.id, attempt=job.attempt,
                      status=o.status_code, duration_ms=round(o.duration * 1000, 1))
        if self._metrics is not None:
            self._metrics.deliveries.labels(self.name, _RESULT[record.state]).inc()
            self._metrics.delivery_seconds.labels(self.name).observe(o.duration)
        if record.state is JobState.DELIVERED:
            self._count_delivered()
            self._log.info("delivered", **fields)
        elif record.state is JobState.PENDING:
            self._log.warning("delivery failed; will retry", error=o.error,
                              retry_in_s=round((record.next_at or 0) - time.time(), 2), **fields)
        else:
            self._log.error("delivery failed; job is dead", error=o.error, **fields)


_RESULT = {JobState.DELIVERED: "delivered", JobState.PENDING: "failed", JobState.DEAD: "dead"}


def _missing(job: Job) -> Outcome:
    return Outcome(job.id, False, 0.0, error="internal error: the sender reported no outcome for this job")
