"""The Unix socket listener: NDJSON, one event per line in, one answer per line out, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from pathlib import Path

import structlog

from ..events import EventError, parse_event
from ..store import StoreError
from . import Ingestor
from .http import decode_json

_PIPELINE_DEPTH = 4096  # answers owed on one connection before we stop reading its input (backpressure)

log = structlog.get_logger(component="ingest.socket")


def _answer(payload: dict[str, object]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class SocketIngest:
    def __init__(self, ingestor: Ingestor, path: Path, mode: int, max_line: int):
        self._ingestor = ingestor
        self.path = path
        self._mode = mode
        self._max_line = max_line
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = bind_unix_socket(self.path, self._mode)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=self._max_line + 1)

    async def stop(self, grace: float) -> None:
        """Stop accepting; give open connections `grace` seconds to finish the lines they have sent."""
        if self._server is None:
            return
        self._server.close()
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
        self._connections.add(task)
        answers: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue(_PIPELINE_DEPTH)
        responder = asyncio.create_task(self._respond(answers, writer))
        try:
            await self._read(reader, answers)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            await answers.put(None)
            await responder
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._connections.discard(task)

    async def _read(self, reader: asyncio.StreamReader, answers: asyncio.Queue[asyncio.Future[bytes] | None]
                    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as e:
                line = e.partial  # the last line may lack its newline
                if not line.strip():
                    return
            except asyncio.LimitOverrunError:
                await _skip_line(reader)
                await answers.put(_done(loop, _answer(
                    {"ok": False, "error": f"line longer than listen.max_body_size ({self._max_line} bytes)"})))
                continue
            if line.strip():
                await answers.put(self._handle(loop, line))
            if reader.at_eof():
                return

    def _handle(self, loop: asyncio.AbstractEventLoop, line: bytes) -> asyncio.Future[bytes]:
        try:
            event = parse_event(decode_json(line))
        except (ValueError, EventError) as e:
            return _done(loop, _answer({"ok": False, "error": str(e)}))
        return asyncio.ensure_future(self._store(event))

    async def _store(self, event: object) -> bytes:
        try:
            (accepted,) = await self._ingestor.accept([event])  # type: ignore[list-item]
        except StoreError as e:
            return _answer({"ok": False, "error": f"the event was not stored: {e}"})
        return _answer({"id": accepted.id, "ok": True, "jobs": accepted.jobs, "duplicate": accepted.duplicate})

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


def _done(loop: asyncio.AbstractEventLoop, value: bytes) -> asyncio.Future[bytes]:
    future: asyncio.Future[bytes] = loop.create_future()
    future.set_result(value)
    return future


async def _skip_line(reader: asyncio.StreamReader) -> None:
    """Discard the rest of an over-long line, up to and including its newline."""
    while True:
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as e:
            await reader.readexactly(e.consumed)
        except asyncio.IncompleteReadError:
            return


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
