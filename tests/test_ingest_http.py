"""POST /v1/events against the running daemon: answers, durability, and bad input that stores nothing."""

from __future__ import annotations

import asyncio
import gzip
import json
import time

import pytest

from .conftest import Receiver, webhook
from .store.sqlite_faults import damage, failing_inserts


async def count(d, what: str) -> int:
    """How many events or jobs are stored."""
    return len(await (d.events() if what == "events" else d.jobs()))


async def test_one_event_is_stored_with_its_jobs_before_the_answer(start_daemon, receiver: Receiver) -> None:
    receiver.respond = lambda r: asyncio.sleep(3600)  # hold deliveries so the job stays pending
    d = await start_daemon([webhook("erp", receiver.url, ["order.paid"]),
                            webhook("crm", receiver.url, ["order.*"]),
                            webhook("other", receiver.url, ["customer.created"])],
                           delivery={"timeout": "30s"})
    status, body = await d.post({"id": "evt-1", "type": "order.paid", "data": {"id": "o1"}})
    assert status == 202
    assert body == {"data": [{"id": "evt-1", "jobs": 2, "duplicate": False}]}
    # The answer came after the commit: another connection sees the event and both jobs at once.
    assert [(e.id, e.type) for e in await d.events()] == [("evt-1", "order.paid")]
    assert sorted(j.integration for j in await d.jobs()) == ["crm", "erp"]


async def test_batch_answers_in_order_and_generates_ids(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    events = [{"type": "order.paid", "data": {"n": i}} for i in range(1000)]
    status, body = await d.post(events)
    assert status == 202 and len(body["data"]) == 1000
    ids = [item["id"] for item in body["data"]]
    assert len(set(ids)) == 1000
    stored = {e.id: e.payload for e in await d.events()}
    assert all(json.loads(stored[ids[i]]) == {"data": {"n": i}} for i in (0, 500, 999))


async def test_same_id_again_is_a_duplicate_and_queues_nothing(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    event = {"id": "evt-7", "type": "order.paid", "data": {"id": "o7"}}
    assert (await d.post(event))[1]["data"] == [{"id": "evt-7", "jobs": 1, "duplicate": False}]
    results = await asyncio.gather(*(d.post(event) for _ in range(20)))
    assert all(r == (202, {"data": [{"id": "evt-7", "jobs": 1, "duplicate": True}]}) for r in results)
    assert (await d.post([event, {"id": "evt-8", "type": "order.paid", "data": {}}]))[1]["data"] == [
        {"id": "evt-7", "jobs": 1, "duplicate": True}, {"id": "evt-8", "jobs": 1, "duplicate": False}]
    assert await count(d, "events") == 2 and await count(d, "jobs") == 2


BAD_BODIES = [
    (b'{"type": "order.paid", "data": {}', 400, "malformed JSON"),
    (b'', 400, "malformed JSON"),
    (b'[]', 400, "empty array"),
    (b'"order.paid"', 400, "must be a JSON object"),
    (b'{"type": "order.paid", "data": {"x": NaN}}', 400, "NaN is not valid JSON"),
    (b'{"type": "order.paid", "data": {"x": "\xff\xfe"}}', 400, "not UTF-8"),
    (b'[' * 100_000 + b']' * 100_000, 400, "nested too deeply"),
    (json.dumps([{"type": "order.paid", "data": {}}] * 1001).encode(), 400, "1001 events in one request"),
    (json.dumps([{"type": "order.paid", "data": {}}, {"type": "Order", "data": {}}]).encode(), 400,
     "[1].type: 'Order' is not an event key"),
    (json.dumps({"type": "order.paid", "data": {}, "extra": 1}).encode(), 400, "extra: unknown field"),
]


@pytest.mark.parametrize("raw,status,detail", BAD_BODIES)
async def test_bad_input_gets_a_clear_error_and_stores_nothing(start_daemon, raw: bytes, status: int,
                                                                detail: str) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    got_status, body = await d.post(None, raw=raw)
    assert got_status == status
    (error,) = body["errors"][:1]
    assert error["status"] == str(status) and detail in error["detail"], body
    assert await count(d, "events") == 0 and await count(d, "jobs") == 0


async def test_all_or_none_reports_every_bad_item(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    events = [{"type": "order.paid", "data": {}}] * 5 + [{"type": "order.paid"}, {"type": 1, "data": {}}]
    status, body = await d.post(events)
    assert status == 400
    assert [e["detail"] for e in body["errors"]] == ["[5].data: required, must be a JSON object",
                                                     "[6].type: 1 is not an event key (resource.action, "
                                                     "lower case, e.g. order.paid)"]
    assert await count(d, "events") == 0


async def test_size_content_type_and_method(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])],
                           listen={"max_body_size": "2KiB"})
    big = {"type": "order.paid", "data": {"blob": "x" * 4000}}
    status, body = await d.post(big)
    assert status == 413 and "max_body_size (2048 bytes)" in body["errors"][0]["detail"]

    async def chunks():  # no Content-Length: the limit must hold for a streamed body too
        for _ in range(10):
            yield b"x" * 1000

    async with d.http.post(f"{d.url}/v1/events", data=chunks(), headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413 and (await r.json())["errors"][0]["status"] == "413"

    # A gzip body is small on the wire: the limit holds for what it inflates to, and a small one is fine.
    for blob, want in (("x" * 100, 202), ("x" * 100_000, 413)):
        raw = gzip.compress(json.dumps({"type": "order.paid", "data": {"blob": blob}}).encode())
        assert len(raw) < 2048
        async with d.http.post(f"{d.url}/v1/events", data=raw, headers={
                "Content-Type": "application/json", "Content-Encoding": "gzip"}) as r:
            assert r.status == want, await r.text()

    async with d.http.post(f"{d.url}/v1/events", data="type=order.paid",
                           headers={"Content-Type": "application/x-www-form-urlencoded"}) as r:
        assert r.status == 415 and "application/json" in (await r.json())["errors"][0]["detail"]
    async with d.http.get(f"{d.url}/v1/events") as r:
        assert r.status == 405 and (await r.json())["errors"][0]["status"] == "405"
    async with d.http.get(f"{d.url}/nope") as r:
        assert r.status == 404 and (await r.json())["errors"][0]["title"] == "Not Found"
    assert await count(d, "events") == 1  # the small gzip body only


async def test_token(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])], listen={"token": "t0ken"})
    event = {"type": "order.paid", "data": {}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic t0ken"}):
        status, body = await d.post(event, headers=headers)
        assert status == 401 and "bearer token" in body["errors"][0]["detail"]
    assert await count(d, "events") == 0
    assert (await d.post(event, headers={"Authorization": "Bearer t0ken"}))[0] == 202
    async with d.http.get(f"{d.url}/healthz") as r:  # probes need no token
        assert r.status == 200


async def test_expect_100_continue(start_daemon) -> None:
    # curl asks for a "100 Continue" before sending a body over 1 KiB; without it, it waits a second first.
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])], listen={"token": "t0ken"})
    body = json.dumps({"id": "big", "type": "order.paid", "data": {"blob": "x" * 4000}})
    for token, want in (("wrong", 401), ("t0ken", 202)):
        async with d.http.post(f"{d.url}/v1/events", data=body, expect100=True, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {token}"}) as r:
            assert r.status == want, await r.text()
    assert [e.id for e in await d.events()] == ["big"]


async def test_health_and_readiness(start_daemon) -> None:
    d = await start_daemon([])
    async with d.http.get(f"{d.url}/healthz") as r:
        assert r.status == 200 and await r.json() == {"status": "ok"}
    async with d.http.get(f"{d.url}/readyz") as r:
        assert r.status == 200 and await r.json() == {"status": "ready"}


async def test_storage_failure_answers_503_and_acknowledges_nothing(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    with failing_inserts(d.db_path, "events", "disk is full"):
        status, body = await d.post({"id": "lost?", "type": "order.paid", "data": {}})
        assert status == 503 and "not stored" in body["errors"][0]["detail"]
    status, body = await d.post({"id": "lost?", "type": "order.paid", "data": {}})
    assert status == 202 and body["data"][0]["duplicate"] is False  # the failed attempt stored nothing


async def test_nesting_depth_limit(start_daemon) -> None:
    d = await start_daemon([], listen={"max_depth": 8})

    def nested(levels: int) -> dict:
        data: dict = {}
        for _ in range(levels):
            data = {"x": data}
        return data

    # The event object and `data` count as two levels.
    assert (await d.post({"type": "order.paid", "data": nested(6)}))[0] == 202
    status, body = await d.post({"type": "order.paid", "data": nested(7)})
    assert status == 400 and body["errors"][0]["detail"] == "JSON nested deeper than listen.max_depth (8 levels)"
    assert await count(d, "events") == 1


async def test_max_depth_counts_the_batch_array_and_each_event(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])], listen={"max_depth": 5})

    def event(levels: int, brackets_in_strings: bool = False) -> dict:
        data: dict = {"note": "[[[[{{{{" if brackets_in_strings else "x"}
        for _ in range(levels - 2):  # the event and its data are two levels
            data = {"n": data}
        return {"type": "order.paid", "data": data}

    status, body = await d.post([event(4, brackets_in_strings=True), event(4)])  # 1 + 4 = 5 levels
    assert status == 202, body
    status, body = await d.post([event(4), event(5)])  # 1 + 5 = 6
    assert status == 400 and body["errors"][0]["detail"] == "[1].JSON nested deeper than listen.max_depth (5 levels)"
    status, body = await d.post(event(5))  # alone, 5 levels
    assert status == 202, body
    status, body = await d.post([[[[[[1]]]]]])  # not events at all, and too deep
    assert status == 400 and "listen.max_depth" in body["errors"][0]["detail"]
    assert await count(d, "events") == 3


# -- slow, broken and failing requests --------------------------------------------------------------------------

async def exchange(d, parts: list[bytes], gap: float = 0.0, timeout: float = 10.0) -> tuple[int, dict, dict | None]:
    """Send `parts` on a new connection, `gap` seconds apart, while reading: (status, headers, JSON body) of the
    answer, which must come within `timeout` s and end with the connection closed."""
    host, port = d.service.http_address
    reader, writer = await asyncio.open_connection(host, port)

    async def send() -> None:
        for part in parts:
            if writer.is_closing():
                return
            writer.write(part)
            await asyncio.sleep(gap)

    sending = asyncio.create_task(send())
    try:
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        sending.cancel()
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split(" ")[1]), headers, json.loads(body) if body else None


POST_HEAD = (b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")


async def test_a_request_slower_than_request_timeout_is_answered_408(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["customer.created"])],
                           listen={"request_timeout": "500ms"})
    body = json.dumps({"type": "order.paid", "data": {}}).encode()
    request = POST_HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    slow = [
        [request[i:i + 1] for i in range(60)],  # the headers, a byte at a time
        [request[:-len(body)]] + [body[i:i + 1] for i in range(len(body))],  # then the body
        # An admin route reading its body (the replay of an integration)
        [b"POST /v1/integrations/erp/replay HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"] + [b" "] * 100,
    ]
    for parts in slow:
        started = time.monotonic()
        status, headers, answer = await exchange(d, parts, gap=0.1)
        assert status == 408 and headers.get("Connection") == "close", (status, headers, answer)
        assert answer["errors"][0]["status"] == "408" and "listen.request_timeout (0.5 s)" in \
            answer["errors"][0]["detail"], answer
        assert 0.4 < time.monotonic() - started < 3.0
    assert await count(d, "events") == 0
    # A request sent at once is not affected, nor a keep-alive connection idle for longer between requests.
    host, port = d.service.http_address
    reader, writer = await asyncio.open_connection(host, port)
    for _ in range(2):
        writer.write(request)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 202")
        await asyncio.wait_for(reader.readuntil(b"}]}"), 5)
        await asyncio.sleep(1.0)
    writer.close()


async def test_a_chunk_broken_after_the_headers_is_answered_at_once(start_daemon) -> None:
    # aiohttp's parser fails on the broken chunk, but leaves the handler waiting for the rest of the body.
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    for head in (POST_HEAD, b"POST /v1/integrations/erp/replay HTTP/1.1\r\nHost: x\r\n"):
        status, headers, answer = await exchange(
            d, [head + b"Transfer-Encoding: chunked\r\n\r\n5\r\n[1,2]\r\n", b"zz\r\nabc\r\n0\r\n\r\n"], gap=0.3,
            timeout=5)
        assert status == 400 and answer["errors"][0]["detail"] == (
            "the body cannot be read: its Content-Encoding or chunked framing is corrupt"), answer


async def test_an_unexpected_failure_of_a_handler_is_a_json_500(start_daemon, tmp_path) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    assert (await d.post([{"type": "order.paid", "data": {"n": "x" * 300}}] * 1000))[0] == 202
    damage(d.db_path)  # what a failing disk does to the file under a running daemon
    for path in ("/v1/status", "/v1/integrations/erp/jobs", "/metrics"):
        async with d.http.get(d.url + path) as resp:
            assert resp.status == 500 and resp.content_type == "application/json", await resp.text()
            (error,) = (await resp.json())["errors"]
        assert error["title"] == "Internal Server Error"
        assert error["detail"].startswith(f"the database {d.db_path} is damaged (SQLite: database disk image "
                                          "is malformed)") and "restore a backup" in error["detail"], error


async def test_a_repeated_key_is_refused_on_both_listeners_and_nothing_is_stored(start_daemon, receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url)])
    # A proxy keeping the first `type` would route this as order.paid; we would have kept order.cancelled.
    raw = b'{"id": "twice", "type": "order.paid", "data": {"id": "o1"}, "type": "order.cancelled"}'
    status, body = await d.post(None, raw=raw)
    assert status == 400
    assert body["errors"][0]["detail"] == 'duplicate key "type" in an object: each key may appear once'
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    writer.write(raw.replace(b"twice", b"twice-socket") + b"\n")
    answer = json.loads(await reader.readline())
    writer.close()
    assert answer == {"ok": False, "error": 'duplicate key "type" in an object: each key may appear once'}
    assert (await d.store.job_counts()) == {}
