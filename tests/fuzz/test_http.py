"""Fuzzing HTTP ingest: arbitrary bodies, the connection cap, and the bugs fuzzing found there.

Part of the fuzzing of what strangers can send; tests/fuzz/oracle.py holds the oracle written from the README's
ingest contract, the strategies and the bridge between hypothesis and the daemon's loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import aiohttp
from hypothesis import given, note, settings
from hypothesis import strategies as st

from ..conftest import Receiver, wait_until, webhook
from .oracle import (
    CONTENT_TYPES,
    HTTP_LIMIT,
    Bridge,
    Model,
    assert_alive,
    bug,
    check_error_shape,
    check_stored,
    counts,
    decode_strict,
    examples,
    expected_http,
    http_bodies,
    integrations,
    post_body,
    refused_connections,
    run_property,
)

# -- property 1: HTTP ingest --------------------------------------------------------------------------------------

async def test_http_ingest_answers_202_or_a_json_4xx_and_stores_exactly_what_it_answers(
        receiver: Receiver, start_daemon) -> None:
    d = await start_daemon(integrations(receiver.url), listen={"max_body_size": HTTP_LIMIT})
    bridge, model, seen = Bridge(asyncio.get_running_loop()), Model(), Counter[Any]()

    @settings(max_examples=examples(600))
    @given(body=http_bodies(), content_type=st.sampled_from(CONTENT_TYPES), chunked=st.booleans())
    def prop(body: bytes, content_type: str | None, chunked: bool) -> None:
        want, items = expected_http(content_type, body)
        seen[want] += 1
        seen["chunked" if chunked else "content-length"] += 1
        before = counts(d, bridge)
        status, ctype, answer = bridge(lambda: post_body(d, body, content_type, chunked))
        note(f"answer: {status} {answer[:500]!r}")
        assert status == want, f"expected {want}, got {status}: {answer[:500]!r}"
        if status != 202:
            check_error_shape(status, ctype, answer)
            assert counts(d, bridge) == before, "a rejected request stored something"
        else:
            assert items is not None
            data = json.loads(answer)["data"]
            assert len(data) == len(items)
            new: dict[str, dict[str, Any]] = {}
            for item, one in zip(items, data):
                model.check_answer(item, one, new)
            jobs = sum(one["jobs"] for one in data if not one["duplicate"])
            assert counts(d, bridge) == (before[0] + len(new), before[1] + jobs), "stored events/jobs differ from the answer"
            check_stored(d, bridge, new)
        assert_alive(d, bridge)

    started = time.monotonic()
    await run_property(prop)
    print(f"HTTP fuzz: {sum(seen[k] for k in (202, 400, 413, 415))} requests in {time.monotonic() - started:.1f}s, "
          f"{dict(seen)}, {len(model.events)} producer ids, {model.duplicates} duplicates")
    assert {202, 400, 413, 415} <= set(seen), f"the generators no longer reach every answer: {seen}"


async def test_http_max_connections_answers_503_and_frees_slots(start_daemon) -> None:
    d = await start_daemon([], listen={"max_connections": 3})
    host, port = d.service.http_address
    held = [await asyncio.open_connection(host, port) for _ in range(3)]
    await asyncio.sleep(0.1)  # the three are inside (their handlers registered) before the next knocks

    async def refused(send: bytes) -> None:
        """Each extra connection: a complete 503 that names the setting, then the end of the stream."""
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(send)
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 503 Service Unavailable", raw
        assert "Retry-After: 1" in lines and "Connection: close" in lines, raw
        assert json.loads(body) == {"errors": [{
            "status": "503", "title": "Service Unavailable",
            "detail": "too many connections (listen.max_connections = 3); try again later"}]}

    await refused(b"")  # a client that waits for the server to speak first
    # A client that sends its request first reads the same answer: the request is drained, not reset.
    await refused(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 34\r\n\r\n{\"type\": \"order.paid\", \"data\": {}}")
    assert await d.events() == [], "a refused request must store nothing"

    held[0][1].close()
    await held[0][1].wait_closed()

    async def accepted() -> bool:
        async with aiohttp.ClientSession() as fresh:
            async with fresh.post(f"{d.url}/v1/events", json={"type": "order.paid", "data": {}}) as resp:
                return resp.status == 202

    await wait_until(accepted, timeout=5)
    # Two refusals above, and maybe more while the freed slot was being released.
    assert await refused_connections(d, "http") >= 2
    for _, writer in held[1:]:
        writer.close()


async def test_http_idle_connection_is_closed_after_idle_timeout(start_daemon) -> None:
    d = await start_daemon([], listen={"idle_timeout": "300ms"})
    host, port = d.service.http_address
    reader, writer = await asyncio.open_connection(host, port)  # connects, never sends a request
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert 0.2 < time.monotonic() - started < 3.0
    writer.close()


@bug("a lone surrogate escape (\\ud800) in data/included decodes fine, then fails to encode for SQLite; the "
     "store calls it a database error: 503 + Retry-After (producers retry a poison request forever) instead of a "
     "400")
async def test_bug_http_lone_surrogate_is_a_storage_failure(start_daemon) -> None:
    d = await start_daemon([])
    status, body = await d.post(None, raw=b'{"type": "order.paid", "data": {"a": "\\ud800"}}')
    assert status == 400, (status, body)


@bug("a body with Content-Encoding gzip/deflate that does not decompress makes aiohttp raise RequestPayloadError "
     "inside _read_body; it is not an HTTPException, so the answer is aiohttp's text/plain 500 (and a traceback "
     "in the log), not a JSON 400")
async def test_bug_corrupt_compressed_body_is_a_500(start_daemon) -> None:
    d = await start_daemon([])
    async with d.http.post(f"{d.url}/v1/events", data=b"not gzip at all",
                           headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}) as resp:
        status, ctype, body = resp.status, resp.headers.get("Content-Type", ""), await resp.read()
    assert status == 400, (status, body)
    check_error_shape(status, ctype, body)


@bug(raises=ValueError, reason=("1e400 is JSON but decodes to float('inf'); the store re-encodes it as "
                                "`Infinity`, which is not JSON, and the webhook body (built around the stored "
                                "text) cannot be parsed by receivers; the event should be refused with a 400 or "
                                "its number kept exactly"))
async def test_bug_out_of_range_number_is_delivered_as_invalid_json(receiver: Receiver, start_daemon) -> None:
    d = await start_daemon([webhook("erp", receiver.url)])
    status, _ = await d.post(None, raw=b'{"type": "order.paid", "data": {"amount": 1e400}}')
    if status == 400:
        return
    assert status == 202
    await wait_until(lambda: receiver.requests)
    decode_strict(receiver.requests[0].body)  # ValueError: Infinity
