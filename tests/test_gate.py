"""The gate in front of a dispatcher: each reason it holds deliveries back, what an attempt's outcomes change,
and the operator's actions. Plain objects and explicit times; the daemon-level behaviour is in
test_policy_delivery.py."""

from __future__ import annotations

import pytest

from eventrelay.config import BreakerConfig, DeliveryConfig
from eventrelay.delivery.gate import NO_CHANGES, Gate
from eventrelay.jobs import AttemptRecord, Job, JobState, Outcome

BREAKER = BreakerConfig(failures=2, failure_rate=1.0, window=100, cooldown=10.0, max_cooldown=40.0)
NOW = 1_000.0


def gate(rate_limit: float | None = None, burst: int = 1, disabled: tuple[float, str] | None = None) -> Gate:
    return Gate(DeliveryConfig(breaker=BREAKER, rate_limit=rate_limit), burst=burst, disabled=disabled)


def record(job_id: int = 1, *, succeeded: bool = False, status: int | None = 500, next_at: float | None = None,
           slow_down: bool = False, gone: bool = False, error: str | None = "boom") -> AttemptRecord:
    job = Job(job_id, "erp", 1, f"e{job_id}", "order.paid", "{}", NOW)
    outcome = Outcome(job_id, succeeded, 0.01, status_code=status, error=None if succeeded else error,
                      slow_down=slow_down, gone=gone)
    state = JobState.DELIVERED if succeeded else JobState.PENDING if next_at is not None else JobState.DEAD
    return AttemptRecord(job, outcome, NOW, state, next_at)


def fail(g: Gate, now: float = NOW) -> str | None:
    """One failed request through the gate; the circuit's new state, if it moved."""
    assert g.wait(now, 1) == 0.0
    g.started(now, 1)
    return g.react([record(next_at=now + 1)], now).circuit


def open_circuit(g: Gate) -> None:
    fail(g)
    assert fail(g) == "open"


# -- what holds ---------------------------------------------------------------------------------------------

def test_an_untroubled_integration_may_send_at_once() -> None:
    g = gate()
    assert g.wait(NOW, 1) == 0.0
    g.started(NOW, 1)
    assert g.react([record(succeeded=True, status=204)], NOW) is NO_CHANGES
    assert g.wait(NOW, 1) == 0.0


def test_disabled_holds_until_woken() -> None:
    g = gate(disabled=(NOW - 60, "the target answered 410 Gone: bye"))
    assert g.wait(NOW, 1) is None
    assert g.wait(NOW + 86_400, 1) is None  # no time lifts it


def test_unwritable_outcomes_hold_until_woken() -> None:
    g = gate()
    g.unwritable = True
    assert g.wait(NOW, 1) is None
    g.unwritable = False
    assert g.wait(NOW, 1) == 0.0


def test_a_slow_down_pauses_until_the_time_the_target_gave() -> None:
    g = gate()
    g.started(NOW, 1)
    slow = record(status=429, slow_down=True, next_at=NOW + 30)
    changes = g.react([slow], NOW)
    assert changes.paused == (slow,) and changes.circuit is None and changes.gone is None
    assert g.paused_until == NOW + 30
    assert g.wait(NOW + 10, 1) == pytest.approx(20.0)
    assert g.wait(NOW + 30, 1) == 0.0


def test_a_pause_only_grows() -> None:
    g = gate()
    first, shorter, longer = (record(i, status=429, slow_down=True, next_at=NOW + s)
                              for i, s in ((1, 30), (2, 5), (3, 60)))
    assert g.react([first, shorter, longer], NOW).paused == (first, longer)  # the shorter one changed nothing
    assert g.paused_until == NOW + 60
    assert g.react([record(4, status=502, slow_down=True, next_at=NOW + 40)], NOW).paused == ()
    assert g.paused_until == NOW + 60


def test_an_open_circuit_holds_for_its_cooldown_then_lets_one_probe_through() -> None:
    g = gate()
    assert fail(g) is None
    assert fail(g) == "open"
    assert g.wait(NOW + 4, 1) == pytest.approx(6.0)
    assert g.wait(NOW + 10, 1) == 0.0 and g.breaker.state == "half_open"
    g.started(NOW + 10, 1)
    assert g.wait(NOW + 10, 1) is None  # the probe's outcome decides
    assert g.react([record(succeeded=True, status=204)], NOW + 11).circuit == "closed"
    assert g.wait(NOW + 11, 1) == 0.0


def test_a_failed_probe_opens_the_circuit_again_for_longer() -> None:
    g = gate()
    open_circuit(g)
    g.wait(NOW + 10, 1)
    g.started(NOW + 10, 1)
    assert g.react([record(next_at=NOW + 20)], NOW + 10).circuit == "open"
    assert g.wait(NOW + 10, 1) == pytest.approx(20.0)  # the cool-down doubled


def test_a_batch_is_one_request_for_the_breaker() -> None:
    g = gate()
    g.started(NOW, 3)
    # Two failures and a success in one answer: the request worked, and nothing opens.
    assert g.react([record(1, next_at=NOW + 1), record(2, next_at=NOW + 1),
                    record(3, succeeded=True, status=204)], NOW) is NO_CHANGES
    assert g.react([record(1, next_at=NOW + 1), record(2, next_at=NOW + 1)], NOW) is NO_CHANGES  # 1 failure
    assert g.react([record(3, next_at=NOW + 1)], NOW).circuit == "open"  # 2 in a row


def test_the_rate_limit_spaces_starts() -> None:
    g = gate(rate_limit=2.0, burst=2)
    assert g.wait(NOW, 2) == 0.0
    g.started(NOW, 2)
    assert g.wait(NOW, 1) == pytest.approx(0.5)
    assert g.wait(NOW + 0.5, 1) == 0.0


def test_what_holds_first() -> None:
    g = gate(rate_limit=1.0)
    fail(g, NOW)
    assert fail(g, NOW + 1) == "open"  # open until NOW + 11, and the bucket empty until NOW + 2
    g.react([record(status=429, slow_down=True, next_at=NOW + 100)], NOW + 1)
    assert g.wait(NOW + 1, 1) == pytest.approx(99.0)  # the pause, which outlasts the cool-down
    g.paused_until = 0.0
    assert g.wait(NOW + 1, 1) == pytest.approx(10.0)  # then the circuit, before the rate limit
    g.unwritable = True
    assert g.wait(NOW + 1, 1) is None


# -- a 410 ----------------------------------------------------------------------------------------------------

def test_gone_disables_the_integration_once_with_the_reason_and_time() -> None:
    g = gate()
    g.started(NOW, 2)
    changes = g.react([record(1, status=410, gone=True, error="no such hook"),
                       record(2, status=410, gone=True, error="later")], NOW)
    assert changes.gone == "the target answered 410 Gone: no such hook"
    assert g.disabled == (NOW, "the target answered 410 Gone: no such hook")
    assert g.wait(NOW, 1) is None
    # Already disabled: a straggler's 410 changes nothing, not even the time.
    assert g.react([record(3, status=410, gone=True)], NOW + 5).gone is None
    assert g.disabled == (NOW, "the target answered 410 Gone: no such hook")


# -- an operator's actions ------------------------------------------------------------------------------------

def test_send_now_ends_a_pause_and_an_open_circuits_cooldown() -> None:
    g = gate()
    open_circuit(g)
    g.react([record(status=429, slow_down=True, next_at=NOW + 600)], NOW)
    g.send_now(NOW + 1)
    assert g.paused_until == 0.0
    assert g.wait(NOW + 1, 1) == 0.0 and g.breaker.state == "half_open"  # the operator's job is the probe
    g.started(NOW + 1, 1)
    assert g.wait(NOW + 1, 1) is None  # one probe, as after a cool-down
    assert g.react([record(succeeded=True, status=204)], NOW + 2).circuit == "closed"


def test_send_now_does_not_lift_a_410() -> None:
    g = gate(disabled=(NOW, "the target answered 410 Gone: bye"))
    g.send_now(NOW)
    assert g.wait(NOW, 1) is None


def test_close_circuit_closes_and_says_what_it_was() -> None:
    g = gate()
    open_circuit(g)
    assert g.close_circuit() == "open"
    assert g.breaker.state == "closed" and g.wait(NOW, 1) == 0.0
    # The failures before it are forgotten: it takes two new ones to open again.
    assert fail(g) is None
    assert fail(g) == "open"


def test_close_circuit_on_a_closed_circuit_changes_nothing() -> None:
    g = gate()
    assert fail(g) is None  # one failure counted
    assert g.close_circuit() == "closed"
    assert fail(g) == "open"  # still counted: closing a closed circuit did not reset it


def test_close_circuit_while_a_probe_is_out() -> None:
    g = gate()
    open_circuit(g)
    g.wait(NOW + 10, 1)
    g.started(NOW + 10, 1)
    assert g.close_circuit() == "half_open"
    assert g.wait(NOW + 10, 1) == 0.0  # no longer one at a time


def test_enable_lifts_a_410() -> None:
    g = gate(disabled=(NOW, "the target answered 410 Gone: bye"))
    g.enable()
    assert g.disabled is None and g.wait(NOW, 1) == 0.0
