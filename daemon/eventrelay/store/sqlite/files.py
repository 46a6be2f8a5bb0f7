"""The database file: one daemon at a time (a lock beside it), and who may read it (its mode)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from pathlib import Path

from ..api import StoreError

# At start-up the lock may still be held, for a moment, by the writer of a daemon that was just killed (the
# kernel kills it with its parent, but not in the same instant).
_LOCK_WAIT = 3.0


async def lock(path: Path) -> int:
    """Hold an exclusive lock beside the database: two daemons on one file would deliver everything twice.
    Returns the lock's descriptor; the lock is held until every process holding it has closed it."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                continue
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(f"{path} is in use by another eventrelay process (pid {holder}); stop it first, "
                             "or give this one its own storage.path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def restrict(path: Path, mode: int) -> None:
    """Create the database file with `mode` whatever the umask, or bring an existing one (and its WAL and
    shared memory) to it. SQLite gives the WAL and shared-memory files it creates the database file's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                if file.stat().st_mode & 0o777 != mode:
                    file.chmod(mode)
    else:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits off
        finally:
            os.close(fd)
