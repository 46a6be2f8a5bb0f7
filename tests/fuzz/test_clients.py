"""Fuzzing clients that misbehave in time: slow senders, thousands of idle connections, and max_depth.

Part of the fuzzing of what strangers can send; tests/fuzz/oracle.py holds the oracle written from the README's
ingest contract, the strategies and the bridge between hypothesis and the daemon's loop.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ..conftest import Receiver, wait_until
from .oracle import (
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT,
    Bridge,
    check_error_shape,
    counts,
    depth,
    encode,
    examples,
    exchange_lines,
    expected_jobs,
    integrations,
    post_body,
    run_property,
)

# -- property 3: slow and idle clients ----------------------------------------------------------------------------

def http_request(body: bytes, host: str = "127.0.0.1") -> bytes:
    return (f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def parse_http_answer(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def test_slow_senders_do_not_hold_up_other_clients(receiver: Receiver, start_daemon) -> None:
    d = await start_daemon(integrations(receiver.url))
    host, port = d.service.http_address
    done = asyncio.Event()
    latencies: list[float] = []

    async def trickle(writer: asyncio.StreamWriter, data: bytes, gap: float) -> None:
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await writer.drain()
            await asyncio.sleep(gap)

    async def slow_http(i: int) -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection(host, port)
        await trickle(writer, http_request(json.dumps({"id": f"slow-http-{i}", "type": "order.paid",
                                                       "data": {"i": i}}).encode()), 0.004)
        answer = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
        writer.close()
        return parse_http_answer(answer)

    async def slow_socket(i: int) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
        line = json.dumps({"id": f"slow-sock-{i}", "type": "order.paid", "data": {"i": i}}).encode()
        await trickle(writer, line + b"\n", 0.02)
        answer = json.loads(await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT))
        writer.close()
        return answer

    async def fast_clients() -> int:
        n = 0
        while not done.is_set():
            started = time.monotonic()
            status, _ = await asyncio.wait_for(d.post({"id": f"fast-{n}", "type": "order.paid", "data": {}}), 5)
            assert status == 202
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(d.socket_path)), 5)
            writer.write(json.dumps({"id": f"fast-sock-{n}", "type": "customer.updated", "data": {}}).encode() + b"\n")
            answer = json.loads(await asyncio.wait_for(reader.readline(), 5))
            writer.close()
            assert answer["ok"] is True, answer
            latencies.append(time.monotonic() - started)
            n += 1
            await asyncio.sleep(0.01)
        return n

    # Stalled for the whole test: half the headers; all the headers and part of the body; half a socket line.
    stalled = []
    for partial in (http_request(b'{"type": "order.paid", "data": {}}')[:40],
                    http_request(b'{"type": "order.paid", "data": {}}')[:-10]):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(partial)
        stalled.append((reader, writer))
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    writer.write(b'{"id": "stalled-sock", "type": "order.paid", "da')
    stalled.append((reader, writer))

    fast = asyncio.create_task(fast_clients())
    slow = await asyncio.gather(*(slow_http(i) for i in range(20)), *(slow_socket(i) for i in range(20)))
    done.set()
    served = await fast

    assert [s[0] for s in slow[:20]] == [202] * 20, slow[:20]
    assert all(a["ok"] is True for a in slow[20:]), slow[20:]
    assert served >= 10, f"only {served} fast round trips while the slow clients trickled"
    assert max(latencies) < 2.0, f"a fast client waited {max(latencies):.2f}s behind the slow ones"
    # The stalled socket line is finished and ended without a newline: it is still answered.
    stalled[2][1].write(b'ta": {}}')
    stalled[2][1].write_eof()
    assert json.loads(await asyncio.wait_for(stalled[2][0].readline(), REQUEST_TIMEOUT))["id"] == "stalled-sock"
    for _, writer in stalled:
        writer.close()
    assert len(await d.events()) == 20 + 20 + 2 * served + 1
    assert not d.task.done()
    async with d.http.get(f"{d.url}/healthz") as resp:
        assert resp.status == 200


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


IDLE = 2000  # idle connections to each listener


async def _open_many(connect: Callable[[], Awaitable[Any]], n: int) -> list[Any]:
    opened: list[Any] = []
    for start in range(0, n, 50):  # in batches: the listen backlogs are ~100-128 deep
        opened += await asyncio.gather(*(connect() for _ in range(start, min(n, start + 50))))
    return opened


async def open_unix(path: Path, timeout: float = 10.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio.open_unix_connection, but waiting while the listen backlog is full.

    On AF_UNIX a full backlog makes connect() fail with EAGAIN, which asyncio's non-blocking connect takes for
    "in progress": it hands back a socket that was never connected (recv then fails with EINVAL).
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not accept a connection on {path} within {timeout}s") from None
            await asyncio.sleep(0.01)
            continue
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_unix_connection(sock=sock)


async def test_thousands_of_idle_connections(receiver: Receiver, daemon_process) -> None:
    # This process holds one end of every connection (2 per idle pair) and the daemon inherits its limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = hard if hard != resource.RLIM_INFINITY else 2 * IDLE + 1000
    idle = min(IDLE, (ceiling - 1000) // 2)
    if idle < 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} leaves room for only {idle} idle connections per listener")
    if soft < 2 * idle + 1000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2 * idle + 1000, hard))
    d = daemon_process(integrations(receiver.url))
    d.start()
    socket_path = Path(yaml.safe_load(d.config.read_text())["listen"]["socket"])
    pid = d.proc.pid
    async with aiohttp.ClientSession() as http:

        async def post_timed(eid: str) -> float:
            started = time.monotonic()
            async with http.post(f"{d.url}/v1/events", json={"id": eid, "type": "order.paid", "data": {}}) as resp:
                assert resp.status == 202, await resp.text()
            return time.monotonic() - started

        async def socket_accepts() -> bool:
            """One event over the Unix socket, answered ok within 2s (False if refused or reset)."""
            reader, writer = await open_unix(socket_path)
            try:
                writer.write(b'{"type": "order.paid", "data": {}}\n')
                return json.loads(await asyncio.wait_for(reader.readline(), 2)).get("ok") is True
            except (ConnectionError, TimeoutError, ValueError):
                return False
            finally:
                writer.close()

        await post_timed("warm-up")
        rss_before = vm_rss_kib(pid)
        tcp = await _open_many(lambda: asyncio.open_connection("127.0.0.1", d.port), idle)

        # Refused connections get an answer saying why, then the end of the stream; the rest stay silent.
        async def first_line(reader: asyncio.StreamReader) -> bytes | None:
            try:
                return await asyncio.wait_for(reader.readline(), 3)
            except TimeoutError:
                return None

        # HTTP: past the cap, a 503 (the warm-up request's keep-alive connection holds one slot).
        http_lines = await asyncio.gather(*(first_line(r) for r, _ in tcp))
        refused_http = [line for line in http_lines if line]
        assert set(refused_http) <= {b"HTTP/1.1 503 Service Unavailable\r\n"}, set(refused_http)
        assert len(refused_http) == max(0, idle - (MAX_CONNECTIONS - 1)), len(refused_http)
        # Idle HTTP connections hold up neither the client already connected nor the other listener.
        assert await post_timed("beside idle tcp") < 2.0
        assert await socket_accepts()
        unix = await _open_many(lambda: open_unix(socket_path), idle)

        lines = await asyncio.gather(*(first_line(r) for r, _ in unix))
        refused = [json.loads(line) for line in lines if line]
        assert len(refused) == max(0, idle - MAX_CONNECTIONS)
        assert all(r == {"ok": False, "error": f"too many connections (listen.max_connections = "
                                               f"{MAX_CONNECTIONS}); try again later"} for r in refused)

        # Other clients are still served promptly, and the daemon's memory stayed bounded.
        assert await post_timed("during") < 2.0
        rss_during = vm_rss_kib(pid)
        assert d.proc.poll() is None
        print(f"daemon VmRSS: {rss_before} KiB before, {rss_during} KiB with {2 * idle} idle connections")
        assert rss_during - rss_before < 48 * 1024, f"RSS grew by {rss_during - rss_before} KiB"

        # Everything hangs up at once: the daemon survives and the Unix socket takes producers again.
        for _, writer in tcp + unix:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in tcp + unix), return_exceptions=True)
        del tcp, unix

        await wait_until(socket_accepts, timeout=15, interval=0.2)
        assert await post_timed("after") < 2.0
        async with http.get(f"{d.url}/healthz") as resp:
            assert resp.status == 200
        assert d.proc.poll() is None
    d.stop()
    assert d.proc.returncode == 0, d.log_path.read_text()[-3000:]


# -- the new limits, directly -------------------------------------------------------------------------------------

async def test_max_depth_is_exact_whatever_the_shape(receiver: Receiver, start_daemon) -> None:
    """Objects and arrays both count, brackets inside strings do not, wide is not deep: HTTP and socket alike."""
    limit = 10
    d = await start_daemon(integrations(receiver.url), listen={"max_depth": limit})
    bridge, seen = Bridge(asyncio.get_running_loop()), Counter[int]()
    leaves = st.integers(0, 9) | st.text("[]{}x", max_size=8)  # brackets in strings are not nesting

    @st.composite
    def trees(draw: st.DrawFn) -> Any:
        """A chain of `levels` arrays/objects, each with shallow siblings around the deep child."""
        node = draw(leaves)
        for _ in range(draw(st.integers(0, 14))):
            siblings = draw(st.lists(leaves | st.just([]) | st.just({}), max_size=2))
            if draw(st.booleans()):
                siblings.insert(draw(st.integers(0, len(siblings))), node)
                node = siblings
            else:
                node = {**{f"s{i}": v for i, v in enumerate(siblings)}, draw(st.text("[{a", max_size=2)): node}
        return node

    def chain(levels: int) -> Any:
        node: Any = 1
        for i in range(levels):
            node = [node] if i % 2 else {"k": node}
        return node

    @settings(max_examples=examples(150))
    @given(tree=trees(), wide=st.integers(0, 40))
    @example(tree=chain(limit - 2), wide=0)  # event and data are the first two levels: exactly the limit
    @example(tree=chain(limit - 1), wide=0)  # one more
    def prop(tree: Any, wide: int) -> None:
        ev = {"type": "order.paid", "data": {"d": tree, "wide": [[]] * wide}}
        line = encode(ev, True, True)
        seen[depth(ev)] += 1
        accepted = depth(ev) <= limit
        before = counts(d, bridge)
        status, ctype, body = bridge(lambda: post_body(d, line, "application/json", False))
        assert status == (202 if accepted else 400), (depth(ev), status, body)
        answers = bridge(lambda: exchange_lines(d.socket_path, [line + b"\n"], 0))
        assert len(answers) == 1 and json.loads(answers[0])["ok"] is accepted, (depth(ev), answers)
        if accepted:
            assert counts(d, bridge) == (before[0] + 2, before[1] + 2 * expected_jobs("order.paid"))
        else:
            check_error_shape(status, ctype, body)
            assert "listen.max_depth" in json.loads(body)["errors"][0]["detail"]
            assert "listen.max_depth" in json.loads(answers[0])["error"]
            assert counts(d, bridge) == before

    await run_property(prop)
    print(f"max_depth {limit}: depths tried {dict(sorted(seen.items()))}")
    assert {limit, limit + 1} <= set(seen), "the generator no longer reaches the boundary"
