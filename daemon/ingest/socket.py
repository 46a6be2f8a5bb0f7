"""The Unix socket listener: NDJSON, one event per line in, one answer per line out, in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from pathlib import Path

import structlog

from .. import codec
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
        self._connections: set[asyncio.Task[None]] = set()
        self._reading: dict[asyncio.Task[None], asyncio.Task[None]] = {}  # connection → its input reader
        self.update(listen)

    def update(self, listen: ListenConfig) -> None:
        """Apply a reloaded listen section to this open socket."""
        self.max_line = listen.max_body_size
        self._max_depth = listen.max_depth
        self._max_connections = listen.max_connections

    def _too_long(self) -> str:
        return f"line longer than listen.max_body_size ({self.max_line} bytes)"

    async def start(self) -> None:
        sock = bind_unix_socket(self.path, self._mode)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def stop(self, grace: float) -> None:
        """Stop accepting: no new connections, no new lines on open ones; answer what was read, for `grace` s."""
        if self._server is None:
            return
        self._server.close()
        for reading in self._reading.values():
            reading.cancel()
        if self._connections:
            _, pending = await asyncio.wait(self._connections, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self._max_connections:
            self._ingestor.refused_connection("socket")
            # Refuse with a reason rather than a silent close: the producer's operator sees what to change.
            writer.write(_answer({"ok": False, "error": f"too many connections (listen.max_connections = "
                                                        f"{self._max_connections}); try again later"}))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        self._connections.add(task)
        answers: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue(_PIPELINE_DEPTH)
        responder = asyncio.create_task(self._respond(answers, writer))
        # Reading is a task of its own so that stop() can end it (no new lines) while answers still go out.
        reading = self._reading[task] = asyncio.create_task(self._read(reader, answers))
        try:
            await asyncio.wait([reading])
            if not reading.cancelled() and reading.exception() is not None and not isinstance(
                    reading.exception(), (ConnectionError, asyncio.IncompleteReadError)):
                log.error("socket connection failed", error=repr(reading.exception()))
        finally:
            reading.cancel()
            self._reading.pop(task, None)
            await answers.put(None)
            await responder
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._connections.discard(task)

    async def _read(self, reader: asyncio.StreamReader, answers: asyncio.Queue[asyncio.Future[bytes] | None]
                    ) -> None:
        """Read whole chunks and split them into lines ourselves.

        All the lines that arrived together are validated together and stored in one operation, with one
        future for their answers: a producer pipelining thousands of lines costs a few operations per chunk,
        not one per line. Lines stay independent: a bad one is answered with its error, the others stored.
        """
        pending = b""
        skipping = False  # inside a line longer than the limit: discard up to its newline
        while True:
            chunk = await reader.read(_CHUNK)
            items: list[bytes | str] = []  # in input order: a line to store, or an error to answer
            if not chunk:
                if skipping:
                    items.append(self._too_long())
                elif pending.strip():
                    items.append(pending)  # the last line may lack its newline
                if items:
                    await answers.put(self._handle(items))
                return
            parts = chunk.split(b"\n")
            if skipping:
                if len(parts) == 1:
                    continue
                items.append(self._too_long())
                parts[0] = b""
                skipping = False
            parts[0] = pending + parts[0]
            pending = parts.pop()
            if len(pending) > self.max_line:
                pending, skipping = b"", True
            for line in parts:
                if len(line) > self.max_line:
                    items.append(self._too_long())
                elif line.strip():
                    items.append(line)
            if items:
                await answers.put(self._handle(items))

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

    @staticmethod
    async def _respond(answers: asyncio.Queue[asyncio.Future[bytes] | None], writer: asyncio.StreamWriter) -> None:
        # Answers go out in input order; each waits for its own commit, and the commits themselves are shared.
        try:
            while (future := await answers.get()) is not None:
                writer.write(await future)
                if answers.empty():
                    await writer.drain()
            await writer.drain()
        except ConnectionError:
            # The producer hung up: its events are still committed; keep taking answers so the reader
            # never blocks on a full queue.
            while await answers.get() is not None:
                pass


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
