"""POST /v1/events against the running daemon: answers, durability, and bad input that stores nothing."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

from .conftest import Receiver, webhook


def count(d, table: str) -> int:
    return d.rows(f"SELECT count(*) FROM {table}")[0][0]


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
    assert d.rows("SELECT id, type FROM events") == [("evt-1", "order.paid")]
    assert sorted(d.rows("SELECT integration FROM jobs")) == [("crm",), ("erp",)]


async def test_batch_answers_in_order_and_generates_ids(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    events = [{"type": "order.paid", "data": {"n": i}} for i in range(1000)]
    status, body = await d.post(events)
    assert status == 202 and len(body["data"]) == 1000
    ids = [item["id"] for item in body["data"]]
    assert len(set(ids)) == 1000
    stored = dict(d.rows("SELECT id, payload FROM events"))
    assert all(json.loads(stored[ids[i]]) == {"data": {"n": i}} for i in (0, 500, 999))


async def test_same_id_again_is_a_duplicate_and_queues_nothing(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    event = {"id": "evt-7", "type": "order.paid", "data": {"id": "o7"}}
    assert (await d.post(event))[1]["data"] == [{"id": "evt-7", "jobs": 1, "duplicate": False}]
    results = await asyncio.gather(*(d.post(event) for _ in range(20)))
    assert all(r == (202, {"data": [{"id": "evt-7", "jobs": 1, "duplicate": True}]}) for r in results)
    assert (await d.post([event, {"id": "evt-8", "type": "order.paid", "data": {}}]))[1]["data"] == [
        {"id": "evt-7", "jobs": 1, "duplicate": True}, {"id": "evt-8", "jobs": 1, "duplicate": False}]
    assert count(d, "events") == 2 and count(d, "jobs") == 2


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
    assert count(d, "events") == 0 and count(d, "jobs") == 0


async def test_all_or_none_reports_every_bad_item(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    events = [{"type": "order.paid", "data": {}}] * 5 + [{"type": "order.paid"}, {"type": 1, "data": {}}]
    status, body = await d.post(events)
    assert status == 400
    assert [e["detail"] for e in body["errors"]] == ["[5].data: required, must be a JSON object",
                                                     "[6].type: 1 is not an event key (resource.action, "
                                                     "lower case, e.g. order.paid)"]
    assert count(d, "events") == 0


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
    assert count(d, "events") == 1  # the small gzip body only


async def test_token(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])], listen={"token": "t0ken"})
    event = {"type": "order.paid", "data": {}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic t0ken"}):
        status, body = await d.post(event, headers=headers)
        assert status == 401 and "bearer token" in body["errors"][0]["detail"]
    assert count(d, "events") == 0
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
    assert d.rows("SELECT id FROM events") == [("big",)]


async def test_health_and_readiness(start_daemon) -> None:
    d = await start_daemon([])
    async with d.http.get(f"{d.url}/healthz") as r:
        assert r.status == 200 and await r.json() == {"status": "ok"}
    async with d.http.get(f"{d.url}/readyz") as r:
        assert r.status == 200 and await r.json() == {"status": "ready"}


async def test_storage_failure_answers_503_and_acknowledges_nothing(start_daemon) -> None:
    import sqlite3

    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    with sqlite3.connect(d.db_path) as db:
        db.execute("CREATE TRIGGER full BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
    status, body = await d.post({"id": "lost?", "type": "order.paid", "data": {}})
    assert status == 503 and "not stored" in body["errors"][0]["detail"]
    with sqlite3.connect(d.db_path) as db:
        db.execute("DROP TRIGGER full")
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
    assert d.rows("SELECT count(*) FROM events") == [(1,)]


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
    assert count(d, "events") == 3
