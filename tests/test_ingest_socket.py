"""The Unix socket: NDJSON in, one answer per line in order, pipelining, bad lines that don't end the talk."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time

from .conftest import wait_until, webhook


async def talk(path, payload: bytes, answers: int, timeout: float = 10.0) -> list[dict]:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=2**22)
    writer.write(payload)
    await writer.drain()
    lines = [json.loads(await asyncio.wait_for(reader.readline(), timeout)) for _ in range(answers)]
    writer.close()
    await writer.wait_closed()
    return lines


async def test_pipelined_lines_are_answered_in_order_after_commit(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.*"])])
    n = 3000
    payload = b"".join(json.dumps({"id": f"s-{i}", "type": "order.paid", "data": {"i": i}}).encode() + b"\n"
                       for i in range(n))
    answers = await talk(d.socket_path, payload, n)
    assert answers == [{"id": f"s-{i}", "ok": True, "jobs": 1, "duplicate": False} for i in range(n)]
    assert len(await d.events()) == n
    assert d.store.commits < n / 10  # pipelined lines share commits


async def test_bad_lines_get_errors_and_the_connection_goes_on(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])],
                           listen={"max_body_size": "1KiB"})
    lines = [
        b'{"id": "a", "type": "order.paid", "data": {}}',
        b'{"type": "order.paid", "data": ',                       # truncated JSON
        b'{"id": "b", "type": "nope", "data": {}}',                # bad type
        b'x' * 5000,                                               # longer than the limit
        b'{"id": "zz", "data": "' + b'y' * 200_000 + b'"}',         # longer than a read chunk too
        b'\xff\xfe\x00',                                           # not UTF-8, with a NUL
        b'   ',                                                     # blank: ignored, no answer
        b'{"id": "a", "type": "order.paid", "data": {}}',          # duplicate
        b'{"id": "c", "type": "order.paid", "data": {}}',
    ]
    answers = await talk(d.socket_path, b"\n".join(lines) + b"\n", 8)
    assert answers[0] == {"id": "a", "ok": True, "jobs": 1, "duplicate": False}
    assert answers[1]["ok"] is False and "malformed JSON" in answers[1]["error"]
    assert answers[2]["ok"] is False and answers[2]["error"].startswith("type: 'nope' is not an event key")
    assert answers[3] == {"ok": False, "error": "line longer than listen.max_body_size (1024 bytes)"}
    assert answers[4] == answers[3]
    assert answers[5]["ok"] is False and "UTF-8" in answers[5]["error"]
    assert answers[6] == {"id": "a", "ok": True, "jobs": 1, "duplicate": True}
    assert answers[7] == {"id": "c", "ok": True, "jobs": 1, "duplicate": False}
    assert sorted(e.id for e in await d.events()) == ["a", "c"]


async def test_last_line_without_newline_is_still_answered(start_daemon) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/", ["order.paid"])])
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    writer.write(b'{"id": "z", "type": "order.paid", "data": {}}')
    writer.write_eof()
    answer = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert answer == {"id": "z", "ok": True, "jobs": 1, "duplicate": False}
    writer.close()


async def test_socket_file_mode_and_stale_socket_replaced(start_daemon, tmp_path) -> None:
    import socket as socketlib

    stale = tmp_path / "er.sock"
    s = socketlib.socket(socketlib.AF_UNIX)
    s.bind(str(stale))  # a socket file nobody listens on, as a kill -9 leaves behind
    s.close()
    d = await start_daemon([], listen={"socket_mode": "0600"})
    assert stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o600
    answers = await talk(d.socket_path, b'{"type": "order.paid", "data": {}}\n', 1)
    assert answers[0]["ok"] is True and answers[0]["jobs"] == 0
    await d.shutdown()
    assert not d.socket_path.exists()  # removed on a clean stop


async def test_connections_beyond_the_limit_are_refused_with_a_reason(start_daemon) -> None:
    d = await start_daemon([], listen={"max_connections": 2})
    held = [await asyncio.open_unix_connection(str(d.socket_path)) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    refusal = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert refusal == {"ok": False, "error": "too many connections (listen.max_connections = 2); try again later"}
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and closed
    for _, w in held:
        w.close()
    await asyncio.sleep(0.05)
    answers = await talk(d.socket_path, b'{"type": "order.paid", "data": {}}\n', 1)  # room again
    assert answers[0]["ok"] is True


def lines(n: int, tag: str) -> bytes:
    return b"".join(json.dumps({"id": f"{tag}-{i}", "type": "order.paid", "data": {}}).encode() + b"\n"
                    for i in range(n))


async def test_producers_that_hang_up_without_reading_free_their_slots(start_daemon) -> None:
    # Each writes lines and goes (half of them with a reset) before reading a single answer: writing those
    # answers fails, and each failure must still free the connection's slot.
    d = await start_daemon([], listen={"max_connections": 4})
    for i in range(8):
        reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
        writer.write(lines(2000, f"rude{i}"))
        await writer.drain()
        if i % 2:
            writer.transport.abort()
        else:
            writer.close()
    await asyncio.sleep(0.3)  # their events committing, their answers failing
    await wait_until(lambda: answered_ok(d.socket_path), timeout=5)
    await wait_until(lambda: not d.service._socket._connections, timeout=5)
    started = time.monotonic()
    await d.shutdown()
    assert time.monotonic() - started < 2.0  # nothing left waiting out the drain


async def test_idle_connections_are_closed_after_idle_timeout(start_daemon) -> None:
    d = await start_daemon([], listen={"idle_timeout": "300ms"})

    async def closed_after(reader: asyncio.StreamReader) -> tuple[bytes, float]:
        started = time.monotonic()
        return await asyncio.wait_for(reader.read(), 5), time.monotonic() - started

    # Connected, never sends.
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    assert (await closed_after(reader))[0] == b""
    writer.close()
    # Trickles a line that never ends: bytes come, but no line.
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    trickle = asyncio.create_task(_trickle(writer, b'{"type": "order.paid", "data": {"x": "' + b"y" * 100))
    assert (await closed_after(reader))[0] == b""
    trickle.cancel()
    writer.close()
    # Sends a line, then nothing, and reads only later: its answer is written before the close.
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    writer.write(b'{"id": "late-reader", "type": "order.paid", "data": {}}\n')
    await asyncio.sleep(1.0)
    rest, _ = await closed_after(reader)
    assert [json.loads(line)["id"] for line in rest.splitlines()] == ["late-reader"]
    writer.close()
    # A producer that keeps sending lines is not idle.
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    for i in range(8):
        writer.write(json.dumps({"id": f"busy-{i}", "type": "order.paid", "data": {}}).encode() + b"\n")
        assert json.loads(await asyncio.wait_for(reader.readline(), 5))["ok"] is True
        await asyncio.sleep(0.1)
    writer.close()


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    for i in range(len(data)):
        writer.write(data[i:i + 1])
        await asyncio.sleep(0.05)


async def test_a_producer_that_reads_no_answers_is_let_go_after_idle_timeout(start_daemon) -> None:
    # It keeps its connection open and reads nothing: the answers fill the socket buffers, the daemon stops
    # reading (backpressure), and only the idle timeout can free the slot.
    d = await start_daemon([], listen={"idle_timeout": "500ms", "max_connections": 1})
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    writer.write(lines(40_000, "deaf"))  # about 3 MB of answers; the transport sends what the daemon takes
    await asyncio.sleep(0.2)
    assert not await answered_ok(d.socket_path)  # its slot is taken
    await wait_until(lambda: answered_ok(d.socket_path), timeout=10)
    writer.transport.abort()


async def answered_ok(path) -> bool:
    """One line sent on a new connection is answered ok (False if refused, or reset after the refusal)."""
    try:
        answers = await talk(path, b'{"type": "order.paid", "data": {}}\n', 1)
    except ConnectionError:
        return False
    return answers[0]["ok"] is True
