"""The gate in front of a dispatcher's slots: whether its integration may start a delivery now, and if not,
for how long it is held back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import DeliveryConfig
from ..jobs import AttemptRecord
from .policy import CircuitBreaker, SharedBucket, TokenBucket


@dataclass(frozen=True, slots=True)
class Changes:
    """What one attempt's outcomes changed for the whole integration, for the dispatcher to log, persist and
    report."""

    circuit: str | None = None  # the circuit's new state, when it moved
    paused: tuple[AttemptRecord, ...] = ()  # the outcomes that made the slow-down pause longer, in order
    gone: str | None = None  # why the integration was disabled just now (its target answered 410 Gone)


NO_CHANGES = Changes()


class Gate:
    """Everything that decides whether an integration may send now, held in one place.

    Held back, a job waits in the database without an attempt. What holds (first match wins):

    - `disabled` (when, why): the target answered 410 Gone. Until an operator enables the integration again.
    - `paused_at` (since when): an operator paused the integration. Until an operator resumes it.
    - `unwritable`: delivery outcomes cannot be written. What was delivered must be recorded before anything
      new goes, or a full disk would have every job sent again and again.
    - `paused_until`: the target asked us to slow down (429, 502, 504, honouring Retry-After).
    - the circuit breaker: the target keeps failing; one probe per cool-down.
    - the rate limit: no more starts per second than configured.

    The gate decides and remembers; the dispatcher logs, persists and reports what changed.
    """

    def __init__(self, delivery: DeliveryConfig, burst: int, disabled: tuple[float, str] | None = None,
                 shared: bool = False, paused_at: float | None = None):
        self.breaker = CircuitBreaker(delivery.breaker)
        # Daemons sharing a store share the target's rate limit too: its bucket is in the database.
        self.bucket: TokenBucket | SharedBucket = (SharedBucket if shared else TokenBucket)(
            delivery.rate_limit, burst=burst)
        self.disabled = disabled
        self.paused_at = paused_at
        self.unwritable = False
        self.paused_until = 0.0  # wall time

    def wait(self, now: float, size: int) -> float | None:
        """Seconds until `size` jobs may start: 0.0 now; None until something else changes it (an operator,
        outcomes written again, a probe's outcome)."""
        if self.disabled is not None or self.paused_at is not None or self.unwritable:
            return None
        if self.paused_until > now:
            return self.paused_until - now
        breaker = self.breaker.wait(now)
        if breaker != 0.0:
            return breaker
        return self.bucket.wait(now, size)

    def started(self, now: float, size: int) -> None:
        """`size` jobs start now, as one request (`wait` said they may)."""
        self.bucket.take(now, size)
        self.breaker.started()

    def react(self, records: Sequence[AttemptRecord], now: float) -> Changes:
        """Take in the outcomes of one request: a failure may open the circuit, a slow-down pause, a 410
        disable the integration. Returns what changed (NO_CHANGES, mostly)."""
        # A batch is one request to the target: it counts once for the breaker.
        circuit = self.breaker.record(any(r.outcome.succeeded for r in records), now)
        paused: list[AttemptRecord] = []
        gone = None
        for record in records:
            outcome = record.outcome
            if outcome.slow_down and record.next_at is not None and record.next_at > self.paused_until:
                self.paused_until = record.next_at
                paused.append(record)
            if outcome.gone and self.disabled is None:
                gone = f"the target answered {outcome.status_code} Gone: {outcome.error}"
                self.disabled = (now, gone)
        if circuit is None and not paused and gone is None:
            return NO_CHANGES
        return Changes(circuit, tuple(paused), gone)

    # -- an operator's actions -----------------------------------------------------------------------------

    def send_now(self, now: float) -> None:
        """An operator's retry or replay goes now, whatever the slow-down pause or an open circuit's cool-down
        (it is the probe). A 410's disabled state still holds: `enable` lifts it."""
        self.paused_until = 0.0
        self.breaker.probe_now(now)

    def close_circuit(self) -> str:
        """An operator says the target is fixed: close the circuit. Returns the state it had."""
        was = self.breaker.state
        if was != CircuitBreaker.CLOSED:
            self.breaker.close()
        return was

    def enable(self) -> None:
        """An operator turned the integration back on after a 410."""
        self.disabled = None
