"""The Unix socket listener: NDJSON, one event per line in, one answer per line out, in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections import deque
from pathlib import Path

import structlog

from .. import aio, codec
from ..config import ListenConfig
from ..events import Event, EventError, parse_event
from ..store import StoreError
from . import Ingestor

_CHUNK = 64 * 1024
_PIPELINE_DEPTH = 64  # chunks read but not yet answered on one connection before we stop reading (backpressure)

log = structlog.get_logger(component="ingest.socket")


def _answer(payload: dict[str, object]) -> bytes:
    return codec.dumps(payload).encode() + b"\n"


class SocketIngest:
    def __init__(self, ingestor: Ingestor, listen: ListenConfig):
        assert listen.socket is not None
        self._ingestor = ingestor
        self.path = listen.socket
        self._mode = listen.socket_mode
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._work = asyncio.Event()  # set while connections are open: the idle check runs only then
        self.update(listen)

    def update(self, listen: ListenConfig) -> None:
        """Apply a reloaded listen section to this open socket."""
        self.max_line = listen.max_body_size
        self._max_depth = listen.max_depth
        self._max_connections = listen.max_connections
        self.idle_timeout = listen.idle_timeout

    def _too_long(self) -> str:
        return f"line longer than listen.max_body_size ({self.max_line} bytes)"

    async def start(self) -> None:
        sock = bind_unix_socket(self.path, self._mode)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        self._watcher = asyncio.create_task(self._watch(), name=f"socket-idle:{self.path}")

    async def stop(self, grace: float) -> None:
        """Stop accepting: no new connections, no new lines on open ones; answer what was read, for `grace` s."""
        if self._server is None:
            return
        self._server.close()
        for connection in self._connections:
            connection.end_input()
        if self._connections:
            _, late = await asyncio.wait([c.task for c in self._connections], timeout=grace)
            for connection in list(self._connections):
                connection.abort()  # its producer did not take its answers within the grace period
            if late:
                await asyncio.wait(late)  # abort() ends them at once
        await aio.cancel(self._watcher)
        self._watcher = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max_connections:
            self._ingestor.refused_connection("socket")
            # Refuse with a reason rather than a silent close: the producer's operator sees what to change.
            if not writer.transport.is_closing():  # uvloop raises on a write to a transport already closed
                writer.write(_answer({"ok": False, "error": f"too many connections (listen.max_connections = "
                                                            f"{self._max_connections}); try again later"}))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
            writer.close()
            return
        connection = _Connection(self, reader, writer)
        self._connections.add(connection)
        self._work.set()
        try:
            await connection.serve()
        finally:
            self._connections.discard(connection)

    async def _watch(self) -> None:
        """One check for every connection, about four times per idle_timeout (at most a second apart), instead
        of a timer per connection re-armed at each line."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._connections:
                self._work.clear()
                await self._work.wait()
            await asyncio.sleep(min(1.0, self.idle_timeout / 4))
            now = loop.time()
            for connection in list(self._connections):
                connection.check(now, self.idle_timeout)

    def _handle(self, items: list[bytes | str]) -> asyncio.Future[bytes]:
        answers: list[bytes | None] = []
        events: list[Event] = []
        for item in items:
            if isinstance(item, str):
                answers.append(_answer({"ok": False, "error": item}))
                continue
            try:
                events.append(parse_event(codec.loads(item, self._max_depth)))
                answers.append(None)  # filled in once stored
            except (ValueError, EventError) as e:
                answers.append(_answer({"ok": False, "error": str(e)}))
        return asyncio.ensure_future(self._store(events, answers))

    async def _store(self, events: list[Event], answers: list[bytes | None]) -> bytes:
        if events:
            try:
                accepted = iter(await self._ingestor.accept(events, "socket"))
                # Formatted by hand: the one answer written per event, at tens of thousands a second.
                stored = [f'{{"id":{codec.dumps(a.id)},"ok":true,"jobs":{a.jobs},'
                          f'"duplicate":{"true" if a.duplicate else "false"}}}\n'.encode() for a in accepted]
            except StoreError as e:
                stored = [_answer({"ok": False, "error": f"the event was not stored: {e}"})] * len(events)
            results = iter(stored)
            answers = [a if a is not None else next(results) for a in answers]
        return b"".join(answers)  # type: ignore[arg-type]


class _Connection:
    """One producer: a reader that turns lines into answers to come, a responder that writes them in input order.

    Whatever ends first, the input (end of stream, stop(), idle_timeout, a failure) or the output (the producer
    hung up or reads nothing), both end, the connection is closed and `serve` returns, which frees the slot.
    """

    def __init__(self, listener: SocketIngest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._listener = listener
        self._reader = reader
        self._writer = writer
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        # Answers to come, in input order: the reader appends a future per chunk, the responder takes them.
        self._answers: deque[asyncio.Future[bytes]] = deque()
        self._more = asyncio.Event()  # an answer was queued, or the input ended
        self._room = asyncio.Event()  # the responder took an answer
        self._input_ended = False
        self._stop_reading = False
        # What the idle check looks at: only a wait on the producer counts, never one on a commit.
        self._awaiting_input = False
        self._last_line = asyncio.get_running_loop().time()
        self._blocked_since: float | None = None  # the responder waits for the producer to read
        self._reading = asyncio.create_task(self._read())
        self._responding = asyncio.create_task(self._respond())

    async def serve(self) -> None:
        reading, responding = self._reading, self._responding
        try:
            await asyncio.wait([reading, responding], return_when=asyncio.FIRST_COMPLETED)
            if not responding.done():
                # The input is over: the answers still owed go out (the idle check ends a producer that reads
                # none of them). Had the responder ended first, the producer is gone: stop reading.
                await asyncio.wait([responding])
        finally:
            reading.cancel()
            responding.cancel()
            await asyncio.wait([reading, responding])
            for task in (reading, responding):
                if not task.cancelled() and (error := task.exception()) is not None:
                    log.error("socket connection failed", error=repr(error))
            if responding.cancelled() or responding.exception() is not None or not responding.result():
                self._writer.transport.abort()  # close() would wait to send answers nobody reads
            else:
                self._writer.close()

    def end_input(self) -> None:
        """Read no more lines; the answers to the lines read still go out."""
        self._stop_reading = True
        if self._awaiting_input:
            self._reading.cancel()  # nothing is lost: it waits for data that has not come

    def abort(self) -> None:
        """End now, answers owed or not."""
        self._writer.transport.abort()
        self._reading.cancel()
        self._responding.cancel()

    def check(self, now: float, idle_timeout: float) -> None:
        """The idle check: a producer that sent no line, or read no answer, for idle_timeout is let go."""
        if self._blocked_since is not None and now - self._blocked_since >= idle_timeout:
            self.abort()
        elif self._awaiting_input and not self._stop_reading and now - self._last_line >= idle_timeout:
            self.end_input()

    async def _read(self) -> None:
        """Read whole chunks and split them into lines ourselves.

        All the lines that arrived together are validated together and stored in one operation, with one
        future for their answers: a producer pipelining thousands of lines costs a few operations per chunk,
        not one per line. Lines stay independent: a bad one is answered with its error, the others stored.
        """
        listener, reader, loop = self._listener, self._reader, asyncio.get_running_loop()
        pending = b""
        skipping = False  # inside a line longer than the limit: discard up to its newline
        try:
            while not self._stop_reading:
                self._awaiting_input = True
                try:
                    chunk = await reader.read(_CHUNK)
                finally:
                    self._awaiting_input = False
                items: list[bytes | str] = []  # in input order: a line to store, or an error to answer
                if not chunk:
                    if skipping:
                        items.append(listener._too_long())
                    elif pending.strip():
                        items.append(pending)  # the last line may lack its newline
                    if items:
                        self._answers.append(listener._handle(items))
                    return
                parts = chunk.split(b"\n")
                if len(parts) > 1:
                    self._last_line = loop.time()
                if skipping:
                    if len(parts) == 1:
                        continue
                    items.append(listener._too_long())
                    parts[0] = b""
                    skipping = False
                parts[0] = pending + parts[0]
                pending = parts.pop()
                if len(pending) > listener.max_line:
                    pending, skipping = b"", True
                for line in parts:
                    if len(line) > listener.max_line:
                        items.append(listener._too_long())
                    elif line.strip():
                        items.append(line)
                if items:
                    # Queued before any wait: once a future exists its events are being stored, so its answer
                    # must stay owed whatever interrupts the reader.
                    self._answers.append(listener._handle(items))
                    self._more.set()
                    while len(self._answers) >= _PIPELINE_DEPTH:  # backpressure: stop reading until answered
                        self._room.clear()
                        await self._room.wait()
        finally:
            self._input_ended = True
            self._more.set()

    async def _respond(self) -> bool:
        """Write each answer once its commit is done, in order. True when all were written and the input is
        over; False when the producer hung up first (its events are committed all the same)."""
        answers, writer, loop = self._answers, self._writer, asyncio.get_running_loop()
        transport = writer.transport
        while True:
            if not answers:
                if self._input_ended:
                    return True
                self._more.clear()
                await self._more.wait()
                continue
            data = await answers[0]
            answers.popleft()
            self._room.set()
            if transport.is_closing():
                return False  # uvloop raises on a write to a closed transport, asyncio warns
            try:
                writer.write(data)
                if not answers:
                    self._blocked_since = loop.time()
                    await writer.drain()
                    self._blocked_since = None
            except (ConnectionError, RuntimeError):  # RuntimeError: uvloop's transport closed meanwhile
                return False


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """Bind a Unix stream socket at `path` with `mode`, replacing a stale socket file left by a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket: remove it or choose another listen.socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left behind by a crash
        else:
            raise OSError(f"another process is listening on {path}; stop it or choose another listen.socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the file with the process umask; narrow it so the socket never exists with wider rights.
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.setblocking(False)
    return sock
