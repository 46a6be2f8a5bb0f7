"""Hostile or broken clients against the daemon as it runs in production (a subprocess, on uvloop, JSON log).

None of them may hold a connection slot for longer than the listen timeouts, nor make the daemon log more than
one line per request, nor get an answer that is not our JSON: slow requests (408), clients idle at the
connection cap (closed to make room), malformed HTTP (400), producers on the Unix socket that hang up without
reading their answers, and a handler that fails (500).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path

import pytest

from ..conftest import DaemonProcess, webhook
from ..store.sqlite_faults import damage

pytestmark = pytest.mark.timeout(60)

EVENT = json.dumps({"type": "order.paid", "data": {}}).encode()
POST = (b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(EVENT)) + EVENT


def start(daemon_process, **listen) -> DaemonProcess:
    d = daemon_process([webhook("erp", "http://127.0.0.1:9/", ["customer.created"])], listen=listen,
                       log={"level": "info", "format": "json"}, shutdown_grace="1s")
    d.start()
    return d


def socket_path(d: DaemonProcess) -> Path:
    return d.config.parent / "er.sock"


def log_lines(d: DaemonProcess) -> list[str]:
    return d.log_path.read_text(errors="replace").splitlines()


def assert_json_lines(lines: list[str]) -> None:
    for line in lines:
        assert isinstance(json.loads(line), dict), line  # one JSON object per line: no traceback, no plain text


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    return int(status_line.split(" ")[1]), dict(line.split(": ", 1) for line in lines if ": " in line), body


def json_error(raw: bytes, status: int) -> str:
    """The detail of our JSON error answer with `status` (fails on anything else)."""
    got, headers, body = parse(raw)
    assert got == status and headers.get("Content-Type", "").startswith("application/json"), raw[:500]
    (error,) = json.loads(body)["errors"]
    assert error["status"] == str(status), error
    return error["detail"]


async def produce(d: DaemonProcess, timeout: float = 5.0) -> int:
    """One event on a new connection: the answer's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    try:
        writer.write(POST.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
        return parse(await asyncio.wait_for(reader.read(), timeout))[0]
    except ConnectionError:
        return 0  # refused at the cap while sending: the 503 raced a reset
    finally:
        writer.close()


# -- the Unix socket ------------------------------------------------------------------------------------------------

async def test_socket_producers_that_hang_up_without_reading_free_their_slots(daemon_process) -> None:
    # uvloop raises on a write to a closed transport where asyncio only warns: each answer the daemon then
    # tried to write escaped before the slot was freed, and SIGTERM waited out the drain with tracebacks.
    d = start(daemon_process, max_connections=4)
    for i in range(8):
        reader, writer = await asyncio.open_unix_connection(str(socket_path(d)))
        writer.write(b"".join(json.dumps({"id": f"rude-{i}-{n}", "type": "order.paid", "data": {}}).encode() + b"\n"
                              for n in range(2000)))
        try:
            await writer.drain()
        except ConnectionError:
            pass  # refused at the cap while the earlier rude producers still held their slots: that is allowed
        if i % 2:
            writer.transport.abort()
        else:
            writer.close()
    await asyncio.sleep(0.5)

    async def accepted() -> bool:
        reader, writer = await asyncio.open_unix_connection(str(socket_path(d)))
        try:
            writer.write(EVENT + b"\n")
            return json.loads(await asyncio.wait_for(reader.readline(), 5))["ok"] is True
        except ConnectionError:
            return False
        finally:
            writer.close()

    deadline = time.monotonic() + 5
    while not await accepted():
        assert time.monotonic() < deadline, "the socket still refuses producers: slots leaked"
        await asyncio.sleep(0.1)
    stopping = time.monotonic()
    d.signal(signal.SIGTERM)
    assert await asyncio.to_thread(d.wait, 10) == 0
    assert time.monotonic() - stopping < 3.0
    lines = log_lines(d)
    assert_json_lines(lines)
    assert not [line for line in lines if json.loads(line)["level"] == "error"], lines


# -- HTTP: slow clients and the connection cap ----------------------------------------------------------------------

async def test_slow_clients_at_the_cap_do_not_lock_producers_out(daemon_process) -> None:
    # Scaled down from 1,100 clients against 1,024 slots: each sends its headers or its body a byte at a time.
    cap, timeout = 12, 1.0
    d = start(daemon_process, max_connections=cap, request_timeout=f"{timeout:g}s")
    body_head = (b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n")

    async def slow(request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)

        async def trickle() -> None:
            for i in range(len(request)):
                writer.write(request[i:i + 1])
                await asyncio.sleep(0.2)

        sending = asyncio.create_task(trickle())
        try:
            return await asyncio.wait_for(reader.read(), 15)
        finally:
            sending.cancel()
            writer.close()

    slow_clients = [asyncio.create_task(slow(POST if i % 2 else body_head + b"[" * 1000)) for i in range(cap)]
    await asyncio.sleep(0.3)  # all inside, holding every slot
    started = time.monotonic()
    statuses = []
    while (status := await produce(d)) != 202:
        statuses.append(status)
        assert time.monotonic() - started < timeout + 3.0, f"no producer got in: {statuses}"
        await asyncio.sleep(0.1)
    assert set(statuses) <= {503, 0} and statuses, statuses  # refused at first: every slot was taken
    answers = await asyncio.gather(*slow_clients)
    for raw in answers:
        assert "listen.request_timeout" in json_error(raw, 408)
    assert_json_lines(log_lines(d))


async def test_idle_keep_alive_connections_make_room_at_the_cap(daemon_process) -> None:
    cap, timeout = 8, 0.5
    d = start(daemon_process, max_connections=cap, request_timeout=f"{timeout:g}s")
    idle = []
    for _ in range(cap):  # each makes a request, reads the answer, and keeps the connection open
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b'{"status": "ok"}'), 5)
        idle.append((reader, writer))
    # Idle for less than a request may take: a client between two requests keeps its connection.
    assert await produce(d) == 503
    await asyncio.sleep(2 * timeout)
    producers = []
    for n in range(3):  # each new producer gets in at once, in the place of the connection idle the longest
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        writer.write(POST)  # and keeps its connection open, as the idle ones did
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 202")
        assert time.monotonic() - started < 1.0
        producers.append(writer)
        assert await asyncio.wait_for(idle[n][0].read(), 5) == b""
    # The others were left alone and still work.
    reader, writer = idle[-1]
    writer.write(POST)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 202")
    for writer in producers + [w for _, w in idle]:
        writer.close()


# -- HTTP: malformed requests and failing handlers --------------------------------------------------------------------

MALFORMED = {
    "garbage request line": b"this is not http\r\n\r\n",
    "TLS on the plain port": bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40 + b"\r\n\r\n",
    "bad version": b"GET /healthz HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "64 KB header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
    "NUL in the path": b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad Content-Length": b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "bad chunk size": b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "header without colon": b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
}


async def test_malformed_requests_get_our_json_400_and_one_json_log_line_at_most(daemon_process) -> None:
    d = start(daemon_process, token="t0ken")  # refused before any token check
    before = len(log_lines(d))
    kinds = list(MALFORMED) + ["chunk broken after the headers"]
    rng = random.Random(5)
    sent = [rng.choice(kinds) for _ in range(50)]

    async def send(kind: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        try:
            if kind == "chunk broken after the headers":
                writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n"
                             b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[1,2]\r\n")
                await asyncio.sleep(0.3)
                writer.write(b"zz\r\n")
            else:
                writer.write(MALFORMED[kind])
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    answers = await asyncio.gather(*(send(kind) for kind in sent))
    for kind, raw in zip(sent, answers):
        detail = json_error(raw, 400)
        assert detail and "\n" not in detail, (kind, detail)
    await asyncio.sleep(0.5)
    grown = log_lines(d)[before:]
    assert len(grown) <= len(sent), "\n".join(grown)
    assert_json_lines(grown)
    # The daemon serves on.
    assert await produce(d) == 401


async def test_a_failing_handler_answers_json_500_and_logs_one_json_line(daemon_process) -> None:
    d = start(daemon_process)
    batch = json.dumps([{"type": "customer.created", "data": {"n": "x" * 300}}] * 1000).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(batch) + batch)
    assert parse(await asyncio.wait_for(reader.read(), 10))[0] == 202
    writer.close()
    db = d.config.parent / "er.db"
    damage(db)  # what a failing disk does to the file under a running daemon
    before = len(log_lines(d))
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    detail = json_error(await asyncio.wait_for(reader.read(), 10), 500)
    writer.close()
    assert detail.startswith(f"the database {db} is damaged") and "restore a backup" in detail, detail
    await asyncio.sleep(0.3)
    grown = log_lines(d)[before:]
    assert_json_lines(grown)
    # (The dispatcher's writes fail on the damage too, and say so: only the listener's lines count here.)
    (line,) = [json.loads(line) for line in grown if json.loads(line)["component"] == "ingest.http"]
    assert line["level"] == "error"
    assert line["event"] == "request failed" and line["path"] == "/v1/status" and line["error"] == detail, line

