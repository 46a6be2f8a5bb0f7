"""Shared by the fault-injection tests: producers on both listeners, read-back of every target, a raw HTTP server.

`Load` runs producers the way the README describes them: HTTP batches (`202` = acknowledged) and pipelined
NDJSON lines on the Unix socket (an `"ok": true` answer line = acknowledged). It remembers every event it
wrote, which were acknowledged, which were refused (with the answer), and which got no answer at all (the
daemon died or stopped mid-request): those are the ones a real producer retries, which the ids make safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ..conftest import REPO, DaemonProcess, free_port, states_of, stored

TYPES = ("order.paid", "order.fulfilled", "customer.updated", "cart.updated")
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)


# -- producers ------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """Producers over HTTP and the Unix socket, and what happened to every event they wrote."""

    rng: random.Random
    expected_jobs: Callable[[str], int] | None = None  # event type → jobs the answer must report
    types: tuple[str, ...] = TYPES
    pad: int = 0  # `included` padding: each event gets 16 bytes or `pad` bytes, at random (fills a disk faster)
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)  # every event written to a listener
    acked: dict[str, str] = field(default_factory=dict)  # event id → type: 202 / "ok": true
    refused: dict[str, str] = field(default_factory=dict)  # event id → the error it was answered with
    duplicates: set[str] = field(default_factory=set)  # acknowledged as "duplicate": true
    problems: list[str] = field(default_factory=list)  # answers that break the contract; tests assert none
    statuses: list[int] = field(default_factory=list)  # HTTP statuses other than 202, in order
    _n: int = 0

    def event(self, tag: str) -> dict[str, Any]:
        self._n += 1
        event_id = f"{tag}-{self._n}"
        event: dict[str, Any] = {"id": event_id, "type": self.rng.choice(self.types),
                                 "data": {"type": "order", "id": f"o-{self._n}", "n": self._n}}
        if self.pad:
            event["included"] = {"pad": "x" * self.rng.choice((16, self.pad))}
        self.sent[event_id] = event
        return event

    def unanswered(self) -> list[dict[str, Any]]:
        """Events written but neither acknowledged nor refused: their outcome is unknown to the producer."""
        return [e for i, e in self.sent.items() if i not in self.acked and i not in self.refused]

    def _accepted(self, event_id: str, answer: dict[str, Any], event_type: str) -> None:
        if self.expected_jobs is not None and answer.get("jobs") != self.expected_jobs(event_type):
            self.problems.append(f"{event_id}: answered jobs={answer.get('jobs')}, "
                                 f"expected {self.expected_jobs(event_type)}")
        if answer.get("duplicate"):
            self.duplicates.add(event_id)
        self.acked[event_id] = event_type
        self.refused.pop(event_id, None)

    # HTTP: batches; a batch is acknowledged as a whole (202) or not at all.
    async def http(self, session: aiohttp.ClientSession, url: str, stop: asyncio.Event, budget: int, tag: str,
                   sizes: Iterable[int] = (1, 3, 10, 25), keep_going: bool = False, pause: float = 0.0) -> None:
        """`pause`: at most that many seconds (at random) between requests."""
        sizes = tuple(sizes)
        n = 0
        while not stop.is_set() and n < budget:
            batch = [self.event(tag) for _ in range(min(self.rng.choice(sizes), budget - n))]
            n += len(batch)
            try:
                async with session.post(f"{url}/v1/events", json=batch, timeout=REQUEST_TIMEOUT) as resp:
                    status, text = resp.status, await resp.text()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                if not keep_going:
                    return  # the daemon went away mid-request: this batch has no answer
                await asyncio.sleep(0.05)
                continue
            if status == 202:
                data = json.loads(text)["data"]
                if [item["id"] for item in data] != [e["id"] for e in batch]:
                    self.problems.append(f"202 answer ids {[i['id'] for i in data]} != sent {[e['id'] for e in batch]}")
                for event, item in zip(batch, data):
                    self._accepted(event["id"], item, event["type"])
                if pause:
                    await asyncio.sleep(self.rng.uniform(0, pause))
            else:
                self.statuses.append(status)
                for event in batch:
                    self.refused[event["id"]] = f"{status} {text}"
                if not keep_going:
                    return
                await asyncio.sleep(0.05)

    # Unix socket: lines written ahead of the answers (pipelining); one answer line per event, in order.
    async def socket(self, path: Path, stop: asyncio.Event, budget: int, tag: str,
                     chunks: Iterable[int] = (1, 5, 20, 40), drain_timeout: float = 15.0, pause: float = 0.01) -> None:
        chunks = tuple(chunks)
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError:
            return
        waiting: deque[dict[str, Any]] = deque()  # written, answer not read yet

        async def answers() -> None:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    return  # end of stream, or a line cut short by a crash: not an answer
                if not waiting:
                    self.problems.append(f"socket: an answer for no line: {line!r}")
                    return
                event = waiting.popleft()
                answer = json.loads(line)
                if answer.get("ok") is True:
                    if answer.get("id") != event["id"]:
                        self.problems.append(f"socket: answer for {answer.get('id')} where {event['id']} was due")
                    self._accepted(event["id"], answer, event["type"])
                else:
                    self.refused[event["id"]] = str(answer.get("error"))

        reading = asyncio.create_task(answers())
        n = 0
        try:
            while not stop.is_set() and n < budget and not reading.done():
                lines = []
                for _ in range(min(self.rng.choice(chunks), budget - n)):
                    event = self.event(tag)
                    waiting.append(event)
                    lines.append(json.dumps(event).encode() + b"\n")
                n += len(lines)
                writer.write(b"".join(lines))
                await writer.drain()
                await asyncio.sleep(self.rng.uniform(0, pause))
            if not reading.done():
                writer.write_eof()  # no more lines: the daemon answers the rest, then closes
        except (ConnectionError, OSError):
            pass
        try:
            await asyncio.wait_for(asyncio.shield(reading), drain_timeout)
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def start(self, session: aiohttp.ClientSession, url: str, socket_path: Path, stop: asyncio.Event, tag: str,
              http: int = 2, sockets: int = 2, budget: int = 100, pause: float | None = None,
              chunks: Iterable[int] = (1, 5, 20, 40)) -> list[asyncio.Task[None]]:
        """`http` + `sockets` producers, each writing at most `budget` events, until `stop` or the daemon dies;
        `pause`: at most that many seconds between two requests (or two writes of lines)."""
        tasks = [asyncio.create_task(self.http(session, url, stop, budget, f"{tag}h{i}", pause=pause or 0.0))
                 for i in range(http)]
        tasks += [asyncio.create_task(self.socket(socket_path, stop, budget, f"{tag}s{i}", chunks, pause=pause or 0.01))
                  for i in range(sockets)]
        return tasks

    async def resubmit(self, session: aiohttp.ClientSession, url: str) -> int:
        """Send again every event whose answer never came, as a producer would; returns how many."""
        todo = self.unanswered()
        for i in range(0, len(todo), 200):
            batch = todo[i:i + 200]
            async with session.post(f"{url}/v1/events", json=batch, timeout=REQUEST_TIMEOUT) as resp:
                assert resp.status == 202, await resp.text()
                for event, item in zip(batch, (await resp.json())["data"]):
                    assert item["id"] == event["id"]
                    self._accepted(event["id"], item, event["type"])
        return len(todo)


# -- the daemon -----------------------------------------------------------------------------------------------


def spawn(d: DaemonProcess) -> None:
    """Start the daemon subprocess without waiting for it to be ready (to kill it during start-up)."""
    d.log = open(d.log_path, "ab")  # closed by d.wait(), as with d.start()
    d.proc = subprocess.Popen([sys.executable, "-m", "eventrelay", "run", "--config", str(d.config)],
                              stdout=d.log, stderr=subprocess.STDOUT, cwd=REPO)


async def nothing_pending(session: aiohttp.ClientSession, url: str) -> bool:
    """The running daemon has no pending job left, by its own account (GET /v1/status)."""
    async with session.get(f"{url}/v1/status", timeout=REQUEST_TIMEOUT) as resp:
        status = await resp.json()
    return sum(integration["pending"] for integration in status["data"]["integrations"]) == 0


@dataclass
class Stored:
    """What a stopped daemon left in its store, read through the storage API."""

    jobs: dict[str, list[tuple[str, str]]]  # event id -> [(integration, state)] of its jobs
    states: dict[str, int]  # jobs by state
    failed_attempts: dict[str, int]  # integration -> attempts that failed
    events: set[str]  # the ids of the stored events


async def read_stored(path: Path) -> Stored:
    everything = 10**9
    async with stored(path) as store:
        jobs, _ = await store.jobs(limit=everything)
        attempts, _ = await store.logs(limit=everything)
        events, _ = await store.events(limit=everything)
        states = await states_of(store)
    by_event: dict[str, list[tuple[str, str]]] = {}
    for job in reversed(jobs):
        by_event.setdefault(job.event_id, []).append((job.integration, job.state.value))
    failed: dict[str, int] = {}
    for attempt in attempts:
        if not attempt.succeeded:
            failed[attempt.integration] = failed.get(attempt.integration, 0) + 1
    return Stored(by_event, states, failed, {e.id for e in events})


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (stdout), skipping anything else."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


# -- reading the targets back ------------------------------------------------------------------------------


class _Consumer:
    """An independent consumer in a thread of its own, running for the whole test: what it got, in order."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()
        self.last = time.monotonic()  # when the last message came
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _got(self, ids: list[str]) -> None:
        with self.lock:
            self.ids += ids
            self.last = time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name=type(self).__name__)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def wait_for(self, want: set[str], timeout: float = 60.0, quiet: float = 1.0) -> list[str]:
        """Block until every id in `want` came and nothing more for `quiet` seconds (or `timeout`); then stop.
        Returns every id received, duplicates included."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if want <= set(self.ids) and time.monotonic() - self.last >= quiet:
                    break
            time.sleep(0.05)
        self.stop()
        with self.lock:
            return list(self.ids)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SqsConsumer(_Consumer):
    """Receives and deletes (boto3) all along: moto slows down with every message a queue holds (each call
    walks them all), so the queue is kept short, as a real consumer would."""

    def __init__(self, client: Any, url: str) -> None:
        super().__init__()
        self.client, self.url = client, url

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # No long polling: moto's holds the queue for the whole wait.
                messages = self.client.receive_message(QueueUrl=self.url, MaxNumberOfMessages=10,
                                                       WaitTimeSeconds=0, VisibilityTimeout=300).get("Messages", [])
                if messages:
                    self.client.delete_message_batch(QueueUrl=self.url, Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])
                    self._got([json.loads(m["Body"])["id"] for m in messages])
                    continue
            except Exception as e:  # noqa: BLE001 - moto restarting, say: note it and go on
                self.errors.append(repr(e))
            self._stop.wait(0.05)


class StompConsumer(_Consumer):
    """Subscribed (stomp.py, auto ack) all along; reconnects if the broker goes away."""

    def __init__(self, broker: Any, destination: str) -> None:
        super().__init__()
        self.broker, self.destination = broker, destination

    def on_message(self, frame: Any) -> None:
        self._got([json.loads(frame.body)["id"]])

    def _run(self) -> None:
        import stomp

        conn = None
        while not self._stop.is_set():
            if conn is None or not conn.is_connected():
                try:
                    conn = stomp.Connection([("127.0.0.1", self.broker.port)], heartbeats=(0, 0))
                    conn.set_listener("consumer", self)
                    conn.connect(self.broker.username, self.broker.password, wait=True)
                    conn.subscribe(self.destination, id="1", ack="auto")
                except Exception as e:  # noqa: BLE001 - the broker is down: try again shortly
                    self.errors.append(repr(e))
                    conn = None
            self._stop.wait(0.2)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()


def duplicates(ids: list[str]) -> dict[str, int]:
    """event id → copies beyond the first."""
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    return {i: n - 1 for i, n in counts.items() if n > 1}


# -- a receiver that can misbehave in any way ---------------------------------------------------------------


@dataclass
class RawRequest:
    head: bytes
    body: bytes
    at: float
    outcome: str = ""  # what the server did with it: "204", "junk", "cut", ...
    sent: int = 0  # body bytes written before the client went away (big_body)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


Behaviour = Callable[[RawRequest, asyncio.StreamWriter], Any]  # async; returns True to keep the connection


class RawHttpServer:
    """A hand-written HTTP/1.1 server on a fixed 127.0.0.1 port. `behaviour` decides each answer and may write
    anything at all (junk, half a response, a huge body); `stop()` takes the port down, connections included,
    and `start()` brings it back on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[RawRequest] = []
        self.behaviour: Behaviour = answer(204)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def ids(self) -> list[str]:
        return [r.json["id"] for r in self.requests]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections.values()):
            writer.transport.abort()  # the connection drops: its handler sees the end and returns
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                request = RawRequest(head, await reader.readexactly(length), time.time())
                self.requests.append(request)
                if not await self.behaviour(request, writer):
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError, OSError):
            pass
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)


def _head(status: int, headers: dict[str, str]) -> bytes:
    reason = {200: "OK", 204: "No Content", 500: "Internal Server Error"}.get(status, "Status")
    return (f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n").encode()


def answer(status: int = 204, body: bytes = b"", delay: float = 0.0) -> Behaviour:
    """A well-formed answer (after `delay` seconds), connection kept alive."""
    async def behave(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if delay:
            request.outcome = "waiting"
            await asyncio.sleep(delay)
        writer.write(_head(status, {"Content-Length": str(len(body)), "Content-Type": "text/plain"}) + body)
        await writer.drain()
        request.outcome = str(status)
        return True
    return behave


def trickle(status: int, size: int, interval: float) -> Behaviour:
    """The status line and headers at once, then the body one byte every `interval` seconds."""
    async def behave(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        request.outcome = "trickling"
        writer.write(_head(status, {"Content-Length": str(size), "Content-Type": "text/plain"}))
        for _ in range(size):
            await writer.drain()
            await asyncio.sleep(interval)
            writer.write(b".")
            request.sent += 1
        await writer.drain()
        request.outcome = f"{status} trickled"
        return True
    return behave


def junk(data: bytes, outcome: str = "junk") -> Behaviour:
    """`data` (bytes that are not HTTP, or the start of a response), then close the connection."""
    async def behave(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        request.outcome = outcome
        return False
    return behave


def big_body(status: int, size: int | None, chunk: int = 256 * 1024, limit_s: float = 30.0) -> Behaviour:
    """`status` with a body of `size` bytes (Content-Length), or endless (chunked) with size=None; stops when
    the client goes away (or after `limit_s`, a bound for the test itself)."""
    async def behave(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        endless = size is None
        headers = {"Content-Type": "text/html"}
        headers.update({"Transfer-Encoding": "chunked"} if endless else {"Content-Length": str(size)})
        writer.write(_head(status, headers))
        request.outcome = f"{status} big"
        block = (b"<p>" + b"A" * (chunk - 7) + b"</p>\n")[:chunk]
        sent, deadline = 0, time.monotonic() + limit_s
        while (endless or sent < size) and time.monotonic() < deadline:  # type: ignore[operator]
            piece = block if endless else block[:size - sent]  # type: ignore[operator]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if endless else piece)
            sent += len(piece)
            request.sent = sent
            await asyncio.wait_for(writer.drain(), limit_s)
        request.outcome = f"{status} big, all sent"
        return False
    return behave
