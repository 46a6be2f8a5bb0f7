"""What happens after an attempt: delivered, due again after a backoff, or dead."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import RetryConfig
from ..jobs import AttemptRecord, Job, JobState, Outcome


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by the event's age.

    The n-th retry waits a random time between `initial` and min(initial·2ⁿ⁻¹, max_interval): full jitter
    spreads the retries of a burst that failed together, and the floor of `initial` keeps a failing target
    from being hit again at once. After `max_age` since the event was accepted the job is dead; the last retry
    is scheduled at that deadline, so every job gets a final attempt there instead of dying early.
    """

    initial: float
    max_interval: float
    max_age: float

    @classmethod
    def from_config(cls, retry: RetryConfig) -> RetryPolicy:
        return cls(retry.initial, retry.max_interval, retry.max_age)

    def delay(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        step = min(self.max_interval, self.initial * 2.0 ** min(failed_attempts - 1, 64))
        return (rng or random).uniform(self.initial, step) if step > self.initial else step

    def decide(self, job: Job, outcome: Outcome, started_at: float, now: float) -> AttemptRecord:
        if outcome.succeeded:
            return AttemptRecord(job, outcome, started_at, JobState.DELIVERED, None)
        deadline = job.age_from + self.max_age
        if not outcome.retryable or now >= deadline:
            return AttemptRecord(job, outcome, started_at, JobState.DEAD, None)
        next_at = min(now + self.delay(job.attempt), deadline)
        return AttemptRecord(job, outcome, started_at, JobState.PENDING, next_at)
