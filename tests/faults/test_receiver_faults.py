"""A webhook receiver that misbehaves: down, slow, answering junk, hanging up mid-answer, answering a huge body.

The daemon runs in-process; the receiver is a hand-written HTTP server (tests/faults/_load.py) on a fixed
port, so it can go down and come back, and write any bytes at all. The README's contract, for each fault:
any 2xx is delivered, everything else (connection errors, no complete answer within `delivery.timeout`) is a
failed attempt, recorded with a clear error detail and retried until the receiver behaves; nothing is lost.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from ..conftest import wait_for, webhook
from ._load import RawHttpServer, answer, big_body, junk, trickle

TIMEOUT = 1.0
DELIVERY = {"timeout": f"{TIMEOUT:g}s", "concurrency": 4,
            "retry": {"initial": "50ms", "max_interval": "300ms", "max_age": "1h"},
            "breaker": {"failures": 5, "cooldown": "200ms", "max_cooldown": "500ms"}}


@pytest.fixture
async def server():
    s = RawHttpServer()
    yield s
    await s.stop()


async def attempts(d) -> list[dict[str, Any]]:
    """The attempt log, oldest first, with each attempt's event id."""
    event_of = {job.id: job.event_id for job in await d.jobs()}
    return [{"event_id": event_of[a.job_id], "attempt": a.attempt, "succeeded": a.succeeded,
             "status_code": a.status_code, "error_detail": a.error_detail, "body": a.body, "duration": a.duration}
            for a in await d.attempts()]


async def post(d, ids: list[str]) -> None:
    status, body = await d.post([{"id": i, "type": "order.paid", "data": {"id": i}} for i in ids])
    assert status == 202, body


async def failures(d, at_least: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    await wait_for(lambda: attempts(d), lambda log: sum(not a["succeeded"] for a in log) >= at_least,
                   timeout=timeout)
    return [a for a in await attempts(d) if not a["succeeded"]]


async def finally_delivered(d, server: RawHttpServer, ids: list[str], timeout: float = 20.0) -> None:
    """Every job delivered; for each event the receiver's last request got a 2xx; the attempt log tells the
    same story: attempts numbered 1..n, only the last one succeeded, and the envelope's `attempt` agrees."""
    await wait_for(d.states, lambda states: set(states) == {"delivered"}, timeout=timeout)
    log = await attempts(d)
    for event_id in ids:
        mine = [a for a in log if a["event_id"] == event_id]
        assert [a["attempt"] for a in mine] == list(range(1, len(mine) + 1)), mine
        assert [a["succeeded"] for a in mine] == [0] * (len(mine) - 1) + [1], mine
        assert mine[-1]["error_detail"] is None
        requests = [r for r in server.requests if r.json["id"] == event_id]
        assert requests and requests[-1].outcome.startswith("2"), [r.outcome for r in requests]
        assert requests[-1].json["attempt"] == len(mine)


async def test_receiver_down_for_a_while_then_back(start_daemon, server: RawHttpServer) -> None:
    await server.start()
    d = await start_daemon([webhook("erp", server.url)], delivery=DELIVERY)
    before = [f"before-{i}" for i in range(5)]
    await post(d, before)
    await wait_for(d.states, {"delivered": 5})

    await server.stop()  # the port refuses connections; the daemon's pooled keep-alive connections die too
    during = [f"down-{i}" for i in range(20)]
    await post(d, during)
    await failures(d, 5)
    await asyncio.sleep(1.5)  # down for a while: attempts keep failing (the breaker spaces them out)
    assert await d.states() == {"delivered": 5, "pending": 20}
    failed = [a for a in await attempts(d) if not a["succeeded"]]
    pattern = re.compile(rf"cannot connect to 127\.0\.0\.1:{server.port}: .*(refused|failed)", re.I)
    assert failed and all(pattern.search(a["error_detail"]) for a in failed), {a["error_detail"] for a in failed}
    assert all(a["status_code"] is None for a in failed)

    await server.start()
    await finally_delivered(d, server, during)
    assert set(server.ids()) == set(before + during)


@pytest.mark.parametrize("slowness", ["headers", "body"])
async def test_receiver_slower_than_the_timeout_then_fast(start_daemon, server: RawHttpServer,
                                                          slowness: str) -> None:
    # headers: the answer comes 2 × timeout late; body: 200 and its headers at once, then a byte every 300 ms.
    server.behaviour = answer(204, delay=2 * TIMEOUT) if slowness == "headers" else trickle(200, 20, 0.3)
    await server.start()
    d = await start_daemon([webhook("erp", server.url)], delivery=DELIVERY)
    ids = [f"slow-{i}" for i in range(6)]
    await post(d, ids)
    failed = await failures(d, 6)
    assert await d.states() == {"pending": 6}, "an answer that was not complete within the timeout counted as delivered"
    assert {a["error_detail"] for a in failed} == {f"no complete answer within the timeout ({TIMEOUT:g}s)"}
    # The timeout is enforced: the daemon neither waits for the late answer nor gives up early.
    assert all(TIMEOUT * 0.9 <= a["duration"] < TIMEOUT + 0.5 for a in failed), [a["duration"] for a in failed]

    server.behaviour = answer(204)
    await finally_delivered(d, server, ids)


JUNK = {
    "tls-handshake": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),
    "binary": bytes(range(256)) * 4,
    "text": b"220 smtp.example.com ESMTP ready\r\n\r\n",
    "bad-status": b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("kind", sorted(JUNK))
async def test_receiver_answering_junk_then_http(start_daemon, server: RawHttpServer, kind: str) -> None:
    server.behaviour = junk(JUNK[kind])
    await server.start()
    d = await start_daemon([webhook("erp", server.url)], delivery=DELIVERY)
    ids = [f"junk-{i}" for i in range(3)]
    await post(d, ids)
    failed = await failures(d, 3)
    assert await d.states() == {"pending": 3}
    for a in failed:
        assert a["status_code"] is None, a
        assert "Bad status line" in a["error_detail"], a["error_detail"]  # says the answer was not HTTP
    server.behaviour = answer(204)
    await finally_delivered(d, server, ids)


CUT = {
    "no-answer": b"",  # reads the request, closes without a byte
    "half-status-line": b"HTTP/1.1 20",
    "half-headers": b"HTTP/1.1 200 OK\r\nContent-Type: application/js",
    "headers-no-blank-line": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
    "half-body": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"received\": tr",
}


@pytest.mark.parametrize("kind", list(CUT))
async def test_receiver_closing_mid_answer_then_answering(start_daemon, server: RawHttpServer, kind: str) -> None:
    server.behaviour = junk(CUT[kind], outcome="cut")
    await server.start()
    d = await start_daemon([webhook("erp", server.url)], delivery=DELIVERY)
    ids = [f"cut-{i}" for i in range(3)]
    await post(d, ids)
    failed = await failures(d, 3)
    # Even a "200" whose answer was cut short is no complete answer: the job must not count as delivered.
    assert await d.states() == {"pending": 3}, f"{kind}: a cut-off answer counted as delivered"
    print(f"{kind}: {sorted({a['error_detail'] for a in failed})}")
    for a in failed:
        assert a["error_detail"] and re.search(r"closed|disconnect|incomplete|cut|not enough|payload|connection",
                                               a["error_detail"], re.I), a["error_detail"]
    server.behaviour = answer(204)
    await finally_delivered(d, server, ids)


@pytest.mark.parametrize("size", [64 * 2**20, None], ids=["64MiB", "endless"])
async def test_receiver_answering_a_huge_body(start_daemon, server: RawHttpServer, size: int | None) -> None:
    """A 500 with a huge error page fails, a 200 with a huge (or endless) body is delivered; either way only the
    first 4 KiB are kept and read: the daemon does not wait for, or hold, the rest."""
    server.behaviour = big_body(500, size)
    await server.start()
    d = await start_daemon([webhook("erp", server.url)], delivery=DELIVERY)
    ids = [f"huge-{i}" for i in range(3)]
    await post(d, ids)
    failed = await failures(d, 3)
    server.behaviour = big_body(200, size)
    await finally_delivered(d, server, ids)
    log = await attempts(d)
    assert {a["error_detail"] for a in failed} == {"Received a status code outside of 2xx range (500)"}
    assert all(a["status_code"] == 500 for a in failed)
    for a in log:
        assert 0 < len(a["body"].encode()) <= 4096 and a["body"].startswith("<p>AAAA"), a["body"][:40]
        assert a["duration"] < TIMEOUT, a  # read 4 KiB and hung up, not read to the end
    # The receiver was cut off long before the end: nobody read 64 MiB (or forever).
    assert all(r.sent < 32 * 2**20 for r in server.requests), [r.sent for r in server.requests]


@pytest.mark.parametrize("kind", ["junk", "half-body"])
async def test_an_unparsable_answer_is_not_reported_as_an_http_400(start_daemon, server: RawHttpServer,
                                                                   kind: str) -> None:
    server.behaviour = junk(JUNK["text"]) if kind == "junk" else junk(CUT["half-body"], outcome="cut")
    await server.start()
    d = await start_daemon([webhook("erp", server.url)], delivery=DELIVERY)
    await post(d, [f"{kind}-400"])
    (a, *_) = await failures(d, 1)
    assert a["status_code"] is None
    # An operator reading "400" looks for a Bad Request on the receiver's side, which never happened.
    assert not re.search(r"\b400\b", a["error_detail"]), a["error_detail"]
