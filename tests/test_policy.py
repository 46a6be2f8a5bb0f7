"""Backoff and the dead-line."""

from __future__ import annotations

import random

from eventrelay.delivery.policy import RetryPolicy
from eventrelay.jobs import Job, JobState, Outcome

POLICY = RetryPolicy(initial=1.0, max_interval=60.0, max_age=3600.0)


def job(attempt: int, accepted_at: float = 1000.0) -> Job:
    return Job(id=1, integration="x", attempt=attempt, event_id="e", event_type="order.paid", payload="{}",
               accepted_at=accepted_at)


def test_backoff_doubles_within_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    for attempt in range(1, 30):
        step = min(60.0, 2.0 ** (attempt - 1))
        delays = [POLICY.delay(attempt, rng) for _ in range(200)]
        assert all(1.0 <= d <= step for d in delays), attempt
        if step > 2:  # jitter really spreads the retries of a burst
            assert max(delays) - min(delays) > step / 4
    assert POLICY.delay(1) == 1.0
    assert POLICY.delay(10_000) <= 60.0  # no overflow on absurd attempt counts


def test_success_failure_and_death() -> None:
    ok = POLICY.decide(job(1), Outcome(1, True, 0.01, status_code=200), 1000.0, 1000.0)
    assert ok.state is JobState.DELIVERED and ok.next_at is None

    retry = POLICY.decide(job(3), Outcome(1, False, 0.01, status_code=500), 1000.0, 1010.0)
    assert retry.state is JobState.PENDING and 1011.0 <= retry.next_at <= 1014.0

    # The last retry lands on the deadline rather than past it...
    late = POLICY.decide(job(20), Outcome(1, False, 0.01), 1000.0, 1000.0 + 3590.0)
    assert late.state is JobState.PENDING and late.next_at <= 1000.0 + 3600.0
    # ...and a failure at the deadline is final.
    dead = POLICY.decide(job(21), Outcome(1, False, 0.01), 1000.0, 1000.0 + 3600.0)
    assert dead.state is JobState.DEAD

    never = POLICY.decide(job(1), Outcome(1, False, 0.01, retryable=False), 1000.0, 1000.0)
    assert never.state is JobState.DEAD
