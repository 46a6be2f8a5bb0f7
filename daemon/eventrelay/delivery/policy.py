"""What happens after an attempt (delivered, due again, dead), and when an integration may send at all."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass

from ..config import BreakerConfig, DeliveryConfig
from ..jobs import AttemptRecord, Job, JobState, Outcome


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by the job's age and (optionally) its attempts.

    The n-th retry waits a random time between `initial` and min(initial·2ⁿ⁻¹, max_interval): full jitter
    spreads the retries of a burst that failed together, and the floor of `initial` keeps a failing target
    from being hit again at once. A target's Retry-After (429, 503) is honoured, clamped to
    [that step, 4 × max_interval] so it can neither make us hammer nor park a job for days. After `max_age`
    since the event was accepted (or the job re-queued) the job is dead; the last retry is scheduled at that
    deadline, so every job gets a final attempt there instead of dying early.
    """

    initial: float
    max_interval: float
    max_age: float
    max_attempts: int | None = None
    dead_letter: str | None = None

    @classmethod
    def from_config(cls, delivery: DeliveryConfig) -> RetryPolicy:
        r = delivery.retry
        return cls(r.initial, r.max_interval, r.max_age, r.max_attempts, delivery.dead_letter)

    def step(self, failed_attempts: int) -> float:
        return min(self.max_interval, self.initial * 2.0 ** min(failed_attempts - 1, 64))

    def delay(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        step = self.step(failed_attempts)
        return (rng or random).uniform(self.initial, step) if step > self.initial else step

    def decide(self, job: Job, outcome: Outcome, started_at: float, now: float) -> AttemptRecord:
        if outcome.succeeded:
            return AttemptRecord(job, outcome, started_at, JobState.DELIVERED, None)
        deadline = job.age_from + self.max_age
        out_of_attempts = self.max_attempts is not None and job.attempt >= self.max_attempts
        if not outcome.retryable or now >= deadline or out_of_attempts:
            return AttemptRecord(job, outcome, started_at, JobState.DEAD, None, dead_letter=self.dead_letter)
        delay = self.delay(job.attempt)
        if outcome.retry_after is not None:
            delay = min(max(outcome.retry_after, self.step(job.attempt)), 4 * self.max_interval)
        return AttemptRecord(job, outcome, started_at, JobState.PENDING, min(now + delay, deadline))


class CircuitBreaker:
    """Stops sending to a target that keeps failing, then probes it with one delivery at a time.

    closed → open after `failures` consecutive failed attempts, or when the failure share of the last
    `window` attempts reaches `failure_rate`. open → half-open after the cool-down: one probe goes out.
    The probe's success closes the circuit; its failure opens it again for twice as long (up to
    `max_cooldown`). While open, jobs wait in the database: no attempts burnt, no logs piled up, and a dead
    broker or a host that is down costs one failure per cool-down instead of one per job.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, config: BreakerConfig):
        self._config = config
        self.state = self.CLOSED
        self.opened_until = 0.0
        self._cooldown = config.cooldown
        self._consecutive = 0
        self._recent: deque[bool] = deque(maxlen=config.window)  # True = failed
        self._probing = False

    def wait(self, now: float) -> float | None:
        """Seconds until a delivery may start: 0 now; None while a probe is out (its outcome decides)."""
        if self.state == self.CLOSED:
            return 0.0
        if self.state == self.OPEN:
            if now < self.opened_until:
                return self.opened_until - now
            self.state = self.HALF_OPEN
        return None if self._probing else 0.0

    def started(self) -> None:
        if self.state == self.HALF_OPEN:
            self._probing = True

    def record(self, succeeded: bool, now: float) -> str | None:
        """Feed one attempt's outcome; returns the new state when it changed."""
        if self.state == self.HALF_OPEN and self._probing:
            self._probing = False
            if succeeded:
                return self._close()
            self._cooldown = min(self._cooldown * 2, self._config.max_cooldown)
            return self._open(now)
        if self.state != self.CLOSED:
            return None  # stragglers sent before the circuit opened do not move it
        self._recent.append(not succeeded)
        self._consecutive = 0 if succeeded else self._consecutive + 1
        failures = sum(self._recent)
        if self._consecutive >= self._config.failures or (
                len(self._recent) == self._recent.maxlen and failures / len(self._recent) >= self._config.failure_rate):
            return self._open(now)
        return None

    def probe_now(self, now: float) -> None:
        """End an open circuit's cool-down: the next delivery is the probe (an operator's retry)."""
        if self.state == self.OPEN:
            self.opened_until = now

    def close(self) -> str:
        """Close the circuit whatever its state (an operator says the target is fixed)."""
        self._probing = False
        return self._close()

    def _open(self, now: float) -> str:
        self.state, self.opened_until = self.OPEN, now + self._cooldown
        return self.state

    def _close(self) -> str:
        self.state, self._cooldown, self._consecutive = self.CLOSED, self._config.cooldown, 0
        self._recent.clear()
        return self.state


class TokenBucket:
    """At most `rate` starts per second on average, with bursts of up to one second's worth."""

    def __init__(self, rate: float | None, burst: float = 1.0):
        self._rate = rate
        self._capacity = max(burst, rate or 0.0)
        self._tokens = self._capacity
        self._at = 0.0

    def wait(self, now: float, tokens: float = 1.0) -> float:
        """Seconds until `tokens` are available (0: now)."""
        if self._rate is None:
            return 0.0
        self._refill(now)
        return 0.0 if self._tokens >= tokens else (tokens - self._tokens) / self._rate

    def take(self, now: float, tokens: float = 1.0) -> None:
        if self._rate is not None:
            self._refill(now)
            self._tokens -= tokens

    def _refill(self, now: float) -> None:
        if self._at:
            self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._rate)  # type: ignore[operator]
        self._at = now


class SharedBucket:
    """The rate limit of daemons sharing a store: the bucket lives in the database (Store.take_tokens), and
    this daemon starts deliveries with the tokens granted to it, fetched a tenth of a second's worth at a
    time, so that the target sees at most `rate` starts per second from all the daemons together.

    `wait` and `take` are those of TokenBucket; the dispatcher's refill task fetches tokens when `short`
    says some are wanted, and adds them with `grant`.
    """

    FETCH_SECONDS = 0.1  # how much of the rate one fetch asks for: more tokens idle here, fewer round trips

    def __init__(self, rate: float | None, burst: float = 1.0):
        self.rate = rate
        self.capacity = max(burst, rate or 0.0)
        self.short = 0  # tokens wanted and not held: the refill task fetches while this is above 0
        self.wanted = asyncio.Event()  # set when `short` becomes more than 0
        self.retry_in = 0.0  # seconds until the database's bucket has tokens again, after a fetch came short
        self._tokens = 0.0

    @property
    def fetch(self) -> int:
        """Tokens to ask for in one fetch."""
        return max(self.short, int(min(self.capacity, (self.rate or 0.0) * self.FETCH_SECONDS)), 1)

    def wait(self, now: float, tokens: float = 1.0) -> float:
        if self.rate is None or self._tokens >= tokens:
            return 0.0
        self.short = max(self.short, int(tokens - self._tokens + 0.999))
        self.wanted.set()
        return max(self.retry_in, 1.0 / self.rate if self.rate < 20 else 0.05)

    def take(self, now: float, tokens: float = 1.0) -> None:
        if self.rate is not None:
            self._tokens -= tokens

    def grant(self, tokens: int, retry_in: float) -> None:
        self._tokens += tokens
        self.retry_in = retry_in
        self.short = max(0, int(self.short - tokens))
        if not self.short:
            self.wanted.clear()
