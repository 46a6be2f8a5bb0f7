"""The writer process: the one connection that writes the database, in a process of its own.

`SqliteStore` (engine.py) starts it with `python -m eventrelay.store.sqlite.writer` and talks to it over a
Unix socket pair (wire.py): operations come in a frame per turn of the daemon's event loop; the writer takes
all that has arrived, commits it as one transaction (group commit: a thousand concurrent producers cost one
fsync, not a thousand), and answers with a frame per transaction.

Why a process and not a thread: a writer thread needs the GIL around every call into SQLite, and the event
loop's thread, busy with requests or deliveries, held it for up to the switch interval each time, so the
writer spent most of its time waiting. Here SQLite and all the Python around it run on another core, and
the event loop pays a socket write per turn and a read per transaction.

The writer exits when the socket reaches end of file (after committing and answering what it got), and
with its parent: if the daemon is killed, the kernel kills the writer too (PR_SET_PDEATHSIG), so a restarted
daemon never meets a writer left over from the last one. It ignores SIGTERM, SIGINT and SIGHUP: systemd and
a terminal send those to the whole group, and shutting down is the daemon's to order (it drains first).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import select
import signal
import socket
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from .errors import Failed
from .wire import FrameReader, Op, Operation, Reply, operation, reply
from .writes import COUNTS_LINGER, Writer

# Outcomes wait for no one (they are written behind), so a small batch of them lingers a little for more:
# every transaction costs the event loop a write and a read, and writes each page it touches (nine indexes
# and tables) to the WAL once more. Any other operation (someone waits for it) ends the wait at once.
_RECORD_LINGER = 0.02
_RECORD_LINGER_BELOW = 64  # outcomes: a batch this large already shares its commit widely
_WRITER_BATCH = 4096  # operations per transaction at most: bounds the time one commit can take
_RECEIVE_AT_ONCE = 8 << 20  # bytes read from the socket before the next commit, at most


class _Channel:
    """The socket to the daemon: operations in, answers out."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._reader = FrameReader()
        self.pending: deque[Operation] = deque()
        self.closed = False  # the daemon has sent all it will (end of file)

    def receive(self, timeout: float | None) -> None:
        """Wait up to `timeout` (None: for ever) for operations, then take all that has arrived."""
        if self.closed:
            return
        readable, _, _ = select.select([self._sock], [], [], timeout)
        if not readable:
            return
        size = 0
        while size < _RECEIVE_AT_ONCE:  # a daemon that never stops sending must not keep us from committing
            try:
                data = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                break
            # An incomplete frame waits in the reader for its end (at end of file, it is dropped).
            for ops in self._reader.feed(data):
                self.pending.extend(map(operation, ops))
            size += len(data)

    def send(self, kind: Reply, *fields: Any) -> None:
        self._sock.sendall(reply(kind, *fields))


def _next_batch(channel: _Channel, writer: Writer) -> list[Operation] | None:
    """The operations for the next transaction: all that has arrived, up to _WRITER_BATCH, lingering a
    little if they are only a few delivery outcomes. None once the daemon is done and nothing is left.
    Attempt counts still in memory are written when nothing comes for a while (Writer.write_counts)."""
    while not channel.pending:
        if channel.closed:
            return None
        channel.receive(COUNTS_LINGER if writer.counts_waiting else None)
        if not channel.pending and writer.counts_waiting:
            try:
                writer.write_counts()
            except sqlite3.Error as e:
                writer.counts_failed(e)
    channel.receive(0)
    deadline = time.monotonic() + _RECORD_LINGER
    while (all(op.kind is Op.RECORD for op in channel.pending) and not channel.closed
           and sum(len(op.items) for op in channel.pending) < _RECORD_LINGER_BELOW):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        channel.receive(left)
    take = min(len(channel.pending), _WRITER_BATCH)
    return [channel.pending.popleft() for _ in range(take)]


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when the daemon dies (Linux only; elsewhere, end of file on the
    socket still ends it once its last transaction is done)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the daemon died before the request took effect
        sys.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eventrelay.store.sqlite.writer", description="eventrelay's "
                                 "database writer (started by the daemon; not to be run by hand)")
    ap.add_argument("--socket-fd", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--synchronous", choices=("full", "normal"), required=True)
    ap.add_argument("path")
    args = ap.parse_args(argv)
    _die_with_parent(args.parent)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    channel = _Channel(socket.socket(fileno=args.socket_fd))

    def log(level: str, event: str, fields: dict[str, Any]) -> None:
        channel.send(Reply.LOG, level, event, fields)  # the daemon logs it, in its format

    try:
        db = sqlite3.connect(args.path, isolation_level=None)
        writer = Writer(db, args.path, args.synchronous, log)
        writer.prepare()
    except Failed as e:
        channel.send(Reply.FAILED, str(e))
        return 1
    except (sqlite3.Error, OSError) as e:
        channel.send(Reply.FAILED, f"cannot open the database {args.path}: {e}")
        return 1
    # As in the daemon (cli._tune_gc): batches make no reference cycles, and start-up objects need no scans.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    channel.send(Reply.READY)
    try:
        while (batch := _next_batch(channel, writer)) is not None:
            for done in writer.commit(batch):
                channel.send(Reply.DONE, *done)
        with contextlib.suppress(sqlite3.Error):
            writer.write_counts()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon is gone: nobody is waiting for these answers
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
