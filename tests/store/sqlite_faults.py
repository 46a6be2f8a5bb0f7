"""Faults injected into a running daemon's SQLite database, and checks of the file on disk: the one place
behaviour tests reach under the storage API, because these faults are the SQLite engine's own."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path


def _execute(path: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db, db:
        return db.execute(sql).fetchall()


@contextlib.contextmanager
def failing_inserts(path: Path, table: str, message: str) -> Iterator[None]:
    """Every insert into `table` fails with `message` (as SQLite reports a full disk, say) until the end."""
    _execute(path, f"CREATE TRIGGER failing BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, '{message}'); END")
    try:
        yield
    finally:
        _execute(path, "DROP TRIGGER failing")


@contextlib.contextmanager
def table_away(path: Path, table: str) -> Iterator[None]:
    """`table` is gone (renamed) until the end: every read of it fails."""
    _execute(path, f"ALTER TABLE {table} RENAME TO {table}_away")
    try:
        yield
    finally:
        _execute(path, f"ALTER TABLE {table}_away RENAME TO {table}")


def damage(path: Path) -> None:
    """What a failing disk does to the file under a running daemon, once the WAL is checkpointed into it:
    everything past the first pages turns to noise."""
    _execute(path, "PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(3 * 4096)
        f.write(random.Random(7).randbytes(size - 4 * 4096))


def integrity(path: Path) -> list[tuple]:
    """SQLite's full integrity check of the file: [("ok",)] when sound."""
    return _execute(path, "PRAGMA integrity_check")
