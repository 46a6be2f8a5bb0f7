"""Delivery policy against real receivers: breaker, Retry-After, 410, rate limit, ordering, dead letter."""

from __future__ import annotations

import asyncio
import itertools
import time
from email.utils import formatdate

import pytest
from aiohttp import web

from eventrelay.config import BreakerConfig
from eventrelay.delivery.policy import CircuitBreaker, RetryPolicy, TokenBucket
from eventrelay.jobs import Job, JobState, Outcome

from .conftest import Receiver, wait_for, wait_until, webhook

# Behaviour that must hold on either storage engine (tests/conftest.py).
pytestmark = pytest.mark.engines("sqlite", "postgresql")


# -- units ----------------------------------------------------------------------------------------------------

def test_breaker_opens_probes_and_backs_off() -> None:
    b = CircuitBreaker(BreakerConfig(failures=3, failure_rate=1.0, window=100, cooldown=1.0, max_cooldown=3.0))
    for _ in range(2):
        assert b.record(False, 0.0) is None
    assert b.record(False, 0.0) == "open" and b.wait(0.5) == 0.5
    assert b.wait(1.0) == 0.0 and b.state == "half_open"
    b.started()
    assert b.wait(1.0) is None  # one probe at a time
    assert b.record(False, 1.0) == "open" and b.wait(1.0) == 2.0  # cool-down doubled
    assert b.wait(3.0) == 0.0
    b.started()
    assert b.record(False, 3.0) == "open" and b.wait(3.0) == 3.0  # capped at max_cooldown
    assert b.wait(6.0) == 0.0
    b.started()
    assert b.record(True, 6.0) == "closed" and b.wait(6.0) == 0.0


def test_breaker_opens_on_failure_rate() -> None:
    b = CircuitBreaker(BreakerConfig(failures=100, failure_rate=0.5, window=10, cooldown=1.0))
    changes = [b.record(i % 2 == 0, 0.0) for i in range(10)]  # alternate: never 100 in a row
    assert changes[:-1] == [None] * 9 and changes[-1] == "open"


def test_retry_after_is_clamped() -> None:
    policy = RetryPolicy(initial=1.0, max_interval=10.0, max_age=3600.0)
    job = Job(1, "x", 3, "e", "order.paid", "{}", 1000.0)
    asked = lambda s: policy.decide(job, Outcome(1, False, 0.1, retry_after=s), 1000.0, 1000.0).next_at  # noqa
    assert asked(7) == 1007.0
    assert asked(0) == 1004.0  # not sooner than the backoff step (attempt 3: 4 s)
    assert asked(10_000) == 1040.0  # not later than 4 x max_interval


def test_max_attempts_and_token_bucket() -> None:
    policy = RetryPolicy(initial=1.0, max_interval=10.0, max_age=3600.0, max_attempts=3)
    decide = lambda n: policy.decide(Job(1, "x", n, "e", "t.x", "{}", 0.0), Outcome(1, False, 0.1), 0.0, 1.0)  # noqa
    assert decide(2).state is JobState.PENDING and decide(3).state is JobState.DEAD
    bucket = TokenBucket(10.0)
    for _ in range(10):
        assert bucket.wait(100.0) == 0.0
        bucket.take(100.0)
    assert abs(bucket.wait(100.0) - 0.1) < 1e-9
    assert bucket.wait(100.1) < 1e-9


# -- against real receivers ---------------------------------------------------------------------------------------

async def test_a_receiver_down_for_a_while_sees_only_probes(start_daemon, receiver: Receiver) -> None:
    down = True
    receiver.respond = lambda r: web.Response(status=503 if down else 204)
    d = await start_daemon([webhook("erp", receiver.url, delivery={
        "concurrency": 4, "retry": {"initial": "50ms", "max_interval": "100ms", "max_age": "1h"},
        "breaker": {"failures": 5, "cooldown": "200ms", "max_cooldown": "400ms"}})])
    await d.post([{"id": f"b{i}", "type": "order.paid", "data": {}} for i in range(50)])
    await asyncio.sleep(2.0)
    while_down = len(receiver.requests)
    # 5 failures open the circuit (a few more may have been in flight), then one probe per cool-down
    # (200 ms, then 400 ms): about 5 in 2 s. Without the breaker: 50 jobs retried every ~100 ms, ~1000.
    assert while_down <= 5 + 4 + 2.0 / 0.2 + 1, while_down
    status = await (await d.http.get(d.url + "/v1/status")).json()
    assert status["data"]["integrations"][0]["circuit"] in ("open", "half_open")
    attempts = len(await d.attempts())
    assert attempts == while_down  # held-back jobs burnt no attempts and piled up no logs
    down = False
    await wait_for(d.states, {"delivered": 50}, timeout=15)
    metrics = await (await d.http.get(d.url + "/metrics")).text()
    assert 'eventrelay_circuit_transitions_total{integration="erp",to="open"}' in metrics
    assert 'eventrelay_circuit_state{integration="erp"} 0.0' in metrics


async def test_retry_after_and_429_pause_the_whole_integration(start_daemon, receiver: Receiver) -> None:
    first = True

    def answer(r):
        nonlocal first
        if first:
            first = False
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=204)

    receiver.respond = answer
    d = await start_daemon([webhook("erp", receiver.url, delivery={"concurrency": 1, "retry": {
        "initial": "50ms", "max_interval": "10s", "max_age": "1h"}})])
    await d.post({"id": "first", "type": "order.paid", "data": {}})
    await wait_until(lambda: len(receiver.requests) == 1)
    sent_at = receiver.requests[0].at
    await d.post({"id": "second", "type": "order.paid", "data": {}})  # another job: paused as well
    await wait_for(d.states, {"delivered": 2}, timeout=10)
    assert all(r.at - sent_at >= 0.9 for r in receiver.requests[1:]), [r.at - sent_at for r in receiver.requests]
    assert {r.json["id"] for r in receiver.requests[1:]} == {"first", "second"}


async def test_retry_after_as_an_http_date(start_daemon, receiver: Receiver) -> None:
    calls = itertools.count()

    def respond(r: web.Request) -> web.Response:
        # The date is made when the answer is, not when the test starts (the daemon takes a while to start).
        if next(calls) == 0:
            return web.Response(status=503, headers={"Retry-After": formatdate(time.time() + 2, usegmt=True)})
        return web.Response(status=204)

    receiver.respond = respond
    d = await start_daemon([webhook("erp", receiver.url, delivery={"retry": {
        "initial": "50ms", "max_interval": "10s", "max_age": "1h"}})])
    await d.post({"id": "x", "type": "order.paid", "data": {}})
    await wait_for(d.states, {"delivered": 1}, timeout=10)
    first, second = receiver.requests
    assert second.at - first.at >= 1.0  # the date was honoured (to the second it is given in)


async def test_410_disables_the_integration_until_enabled(start_daemon, receiver: Receiver, tmp_path) -> None:
    gone = True
    receiver.respond = lambda r: web.Response(status=410 if gone else 204, text="endpoint removed")
    integration = webhook("erp", receiver.url, delivery={"retry": {"initial": "50ms", "max_interval": "50ms"}})
    d = await start_daemon([integration])
    await d.post([{"id": f"g{i}", "type": "order.paid", "data": {}} for i in range(5)])
    await wait_for(lambda: d.store.disabled(), lambda disabled: len(disabled) == 1)
    await asyncio.sleep(0.5)
    assert len(receiver.requests) <= 4  # only what was already in flight when the 410 came
    assert await d.states() == {"pending": 5}  # jobs stay pending, nothing dead
    status = await (await d.http.get(d.url + "/v1/status")).json()
    disabled = status["data"]["integrations"][0]["disabled"]
    assert disabled["reason"].startswith("the target answered 410 Gone") and disabled["at"].endswith("Z")
    metrics = await (await d.http.get(d.url + "/metrics")).text()
    assert 'eventrelay_integration_disabled{integration="erp"} 1.0' in metrics

    # It survives a restart.
    await d.shutdown()
    d = await start_daemon([integration])
    await asyncio.sleep(0.3)
    assert await d.states() == {"pending": 5}
    gone = False
    from eventrelay.cli import main as cli_main

    assert await asyncio.to_thread(cli_main, ["enable", "erp", "--url", d.url]) == 0
    await wait_for(d.states, {"delivered": 5})


async def test_a_reload_that_changes_the_integration_enables_it(start_daemon, receiver: Receiver, tmp_path) -> None:
    import yaml

    receiver.respond = lambda r: web.Response(status=410 if r.path == "/hook/old" else 204)
    d = await start_daemon([webhook("erp", receiver.url + "/old")])
    await d.post({"id": "m", "type": "order.paid", "data": {}})
    await wait_until(lambda: d.service.dispatchers["erp"].gate.disabled is not None)
    config = tmp_path / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["integrations"][0]["configuration"]["url"] = receiver.url + "/new"
    config.write_text(yaml.safe_dump(raw))
    assert (await d.service.reload()).changes == ("changed erp",)
    await wait_for(d.states, {"delivered": 1})
    assert receiver.requests[-1].path == "/hook/new"


async def test_rate_limit(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url, delivery={"rate_limit": "20/s", "concurrency": 8})])
    await d.post([{"type": "order.paid", "data": {"n": i}} for i in range(60)])
    await wait_until(lambda: len(receiver.requests) == 60, timeout=15)
    times = sorted(r.at for r in receiver.requests)
    # A burst of 20, then 20 per second: the last of 60 cannot come before 2 s after the first.
    assert times[-1] - times[0] >= 1.8
    for i, start in enumerate(times):  # and no second holds more than the burst plus a second's worth
        assert sum(1 for t in times[i:] if t < start + 1.0) <= 41


async def test_per_resource_ordering(start_daemon, receiver: Receiver) -> None:
    failures = {"o1-a": 2}  # the head of o1 fails twice

    def answer(r):
        event = r.json["id"]
        if failures.get(event, 0) > 0:
            failures[event] -= 1
            return web.Response(status=500)
        return web.Response(status=204)

    receiver.respond = answer
    d = await start_daemon([webhook("erp", receiver.url, ["order.*"], delivery={
        "ordering": "per_resource", "concurrency": 8,
        "retry": {"initial": "200ms", "max_interval": "200ms", "max_age": "1h"}})])
    events = [{"id": f"{order}-{step}", "type": "order.updated", "data": {"id": order}}
              for step in "abcd" for order in ("o1", "o2", "o3")]
    await d.post(events)
    await wait_for(d.states, {"delivered": 12}, timeout=15)
    delivered = [r.json["id"] for r in receiver.requests]
    for order in ("o1", "o2", "o3"):  # each key in acceptance order, retries included
        sequence = [e for e in delivered if e.startswith(order)]
        assert sequence == sorted(sequence) and sequence[-1] == f"{order}-d", sequence
    # ...and o1's failing head held back only o1: o2 and o3 were all delivered before o1-b.
    assert delivered.index("o1-b") > max(delivered.index("o2-d"), delivered.index("o3-d"))


async def test_dead_jobs_go_to_the_dead_letter_integration(start_daemon, receiver: Receiver) -> None:
    receiver.respond = lambda r: web.Response(status=500 if r.path == "/hook/erp" else 204, text="boom")
    d = await start_daemon([
        webhook("erp", receiver.url + "/erp", delivery={
            "dead_letter": "ops", "retry": {"initial": "50ms", "max_interval": "50ms", "max_attempts": 2}}),
        webhook("ops", receiver.url + "/ops", ["eventrelay.dead_letter"]),  # its only events
    ])
    await d.post({"id": "lost-order", "type": "order.paid", "data": {"id": "o9"}, "included": {"items": []}})
    await wait_until(lambda: any(r.path == "/hook/ops" for r in receiver.requests))
    (letter,) = [r for r in receiver.requests if r.path == "/hook/ops"]
    envelope = letter.json
    assert envelope["triggered_by"] == "eventrelay.dead_letter"
    data = envelope["payload"]["data"]
    assert (data["integration"], data["attempts"], data["status_code"]) == ("erp", 2, 500)
    assert data["error"] == "Received a status code outside of 2xx range (500)"
    assert data["event"] == {"id": "lost-order", "type": "order.paid", "data": {"id": "o9"},
                             "included": {"items": []}}
    # Outcomes are written behind the answer: the database catches up with the receiver a moment later.
    await wait_for(d.jobs, lambda jobs: {job.integration: job.state for job in jobs} == {
        "erp": "dead", "ops": "delivered"})


async def test_connect_timeout_is_separate_from_the_total(start_daemon) -> None:
    import socket

    # A listener whose accept queue is full and never drained: the kernel drops further SYNs, so a connect
    # hangs, as with a host that is down, without leaving 127.0.0.1.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        d = await start_daemon([webhook("erp", f"http://127.0.0.1:{port}/hook", delivery={
            "timeout": "5s", "connect_timeout": "300ms",
            "retry": {"initial": "10s", "max_interval": "10s", "max_age": "1h"}})])
        await d.post({"id": "c1", "type": "order.paid", "data": {}})
        await wait_for(d.attempts, lambda attempts: len(attempts) == 1, timeout=10)
        ((error, duration),) = [(a.error_detail, a.duration) for a in await d.attempts()]
        assert error == "no connection within connect_timeout (0.3s)", error
        assert 0.25 < duration < 3.0  # the connect timeout, not the 5 s total
    finally:
        for s in fillers:
            s.close()
        server.close()


async def test_an_operators_retry_goes_now_as_the_probe_of_an_open_circuit(start_daemon, receiver: Receiver) -> None:
    down = True
    receiver.respond = lambda r: web.Response(status=503 if down else 204)
    d = await start_daemon([webhook("erp", receiver.url, delivery={
        "concurrency": 1, "retry": {"initial": "1h", "max_interval": "1h", "max_age": "1h", "max_attempts": 1},
        "breaker": {"failures": 3, "cooldown": "5m", "max_cooldown": "5m"}})])
    await d.post([{"id": f"dead{i}", "type": "order.paid", "data": {}} for i in range(3)])
    await wait_for(d.states, {"dead": 3})
    assert d.service.dispatchers["erp"].gate.breaker.state == "open"  # for the next five minutes
    down = False
    job_id = (await d.job("dead1")).id
    async with d.http.post(f"{d.url}/v1/integrations/erp/jobs/{job_id}/retry") as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["meta"]["held_by"] is None and answer["meta"]["sends_at"].endswith("Z")
    # Delivered at once, ahead of nothing else and without waiting out the cool-down; it closed the circuit.
    await wait_until(lambda: [r.json["id"] for r in receiver.requests[3:]] == ["dead1"], timeout=5)
    await wait_until(lambda: d.service.dispatchers["erp"].gate.breaker.state == "closed")

    # A replay likewise: the two other dead jobs go now.
    async with d.http.post(f"{d.url}/v1/integrations/erp/replay", json={"state": "dead"}) as resp:
        assert (await resp.json())["data"] == {"queued": 2}
    await wait_for(d.states, {"delivered": 3}, timeout=5)


async def test_a_retry_during_a_slow_down_pause_goes_now(start_daemon, receiver: Receiver) -> None:
    answers = iter([web.Response(status=429, headers={"Retry-After": "600"})])
    receiver.respond = lambda r: next(answers, web.Response(status=204))
    d = await start_daemon([webhook("erp", receiver.url, delivery={"concurrency": 1, "retry": {
        "initial": "1s", "max_interval": "10m", "max_age": "1h"}})])
    await d.post({"id": "slow", "type": "order.paid", "data": {}})
    await wait_until(lambda: d.service.dispatchers["erp"].gate.paused_until > time.time() + 60)
    job_id = (await d.jobs())[0].id
    async with d.http.post(f"{d.url}/v1/integrations/erp/jobs/{job_id}/retry") as resp:
        assert resp.status == 200
    await wait_for(d.states, {"delivered": 1}, timeout=5)


async def test_an_operator_closes_a_circuit_by_hand(start_daemon, receiver: Receiver) -> None:
    down = True
    receiver.respond = lambda r: web.Response(status=503 if down else 204)
    d = await start_daemon([webhook("erp", receiver.url, delivery={
        "concurrency": 1, "retry": {"initial": "50ms", "max_interval": "100ms", "max_age": "1h"},
        "breaker": {"failures": 3, "cooldown": "5m", "max_cooldown": "5m"}})])
    await d.post([{"id": f"c{i}", "type": "order.paid", "data": {}} for i in range(5)])
    await wait_until(lambda: d.service.dispatchers["erp"].gate.breaker.state == "open")
    down = False
    async with d.http.post(f"{d.url}/v1/integrations/erp/close-circuit") as resp:
        assert (await resp.json())["data"] == {"name": "erp", "circuit": "closed", "was": "open"}
    await wait_for(d.states, {"delivered": 5}, timeout=5)
    metrics = await (await d.http.get(d.url + "/metrics")).text()
    assert 'eventrelay_circuit_transitions_total{integration="erp",to="closed"} 1.0' in metrics
    async with d.http.post(f"{d.url}/v1/integrations/nope/close-circuit") as resp:
        assert resp.status == 404
