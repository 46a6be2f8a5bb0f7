"""Reading a stopped daemon's database, for `eventrelay migrate-store` (migrate.py): the file locked as a
daemon locks it, so that none starts on it meanwhile; brought to the current schema as the engine brings it;
each table's rows streamed in batches, in the order and with the values the PostgreSQL engine stores."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..api import StoreError
from . import files, schema
from .errors import Failed, damaged, looks_damaged

# What a store holds, table by table, in the order they are copied (jobs name events, attempts name jobs), each
# with the columns both engines have. The PostgreSQL engine's lease columns are not here: no daemon holds a
# job of a stopped store.
TABLES: dict[str, tuple[str, ...]] = {
    "events": ("seq", "id", "type", "payload", "accepted_at", "traceparent", "tracestate"),
    "jobs": ("id", "event_seq", "integration", "state", "attempts", "next_at", "created_at", "updated_at",
             "last_error", "requeued_at", "ordering_key"),
    "attempts": ("id", "job_id", "integration", "attempt", "succeeded", "created_at", "duration", "status_code",
                 "error_detail", "body"),
    "integration_state": ("name", "disabled_at", "disabled_reason", "paused_at"),
    "outcome_minutes": ("integration", "minute", "delivered", "failed", "dead"),
    "audit": ("id", "at", "action", "target", "scope", "fingerprint", "address", "detail"),
}
_ORDER = {"events": "seq", "jobs": "id", "attempts": "id", "integration_state": "name",
          "outcome_minutes": "minute, integration", "audit": "id"}
_SUCCEEDED = TABLES["attempts"].index("succeeded")  # 0 or 1 here, a boolean in PostgreSQL

BATCH = 5000  # rows per read: a few megabytes at most, whatever the size of the store


class Source:
    """An eventrelay SQLite database held as a daemon holds it, for reading; `close()` lets daemons at it."""

    def __init__(self, path: Path, db: sqlite3.Connection, lock_fd: int, migrated: list[int]):
        self.path = path
        self.migrated = migrated  # schema versions applied on opening, as a daemon would have at its start
        self._db = db
        self._lock_fd = lock_fd

    @classmethod
    async def open(cls, path: Path) -> Source:
        """Lock and open the database at `path`. Raises StoreError, in one sentence saying what to do, if it is
        missing, in use by a daemon, not eventrelay's, newer than this eventrelay, or damaged."""
        path = path.resolve()  # the lock is beside the real file, as the daemon takes it
        if not path.is_file():
            raise StoreError(f"{path} does not exist: give the storage.path of the stopped daemon")
        try:
            lock_fd = await files.lock(path)
        except StoreError:
            raise StoreError(f"{path} is in use by a running eventrelay (pid {_holder(path)}): stop it first; "
                             "migrate-store copies a stopped store, so that nothing changes in it meanwhile") \
                from None
        try:
            db, migrated = _connect(path)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, db, lock_fd, migrated)

    def count(self, table: str) -> int:
        return self._read(lambda: schema.value(self._db, f"SELECT count(*) FROM {_known(table)}"))

    def rows(self, table: str, batch: int = BATCH) -> Iterator[list[tuple[Any, ...]]]:
        """The table's rows, `batch` at a time, in the order of its key, as TABLES lists its columns."""
        cursor = self._read(lambda: self._db.execute(
            f"SELECT {', '.join(TABLES[table])} FROM {_known(table)} ORDER BY {_ORDER[table]}"))
        while rows := self._read(lambda: cursor.fetchmany(batch)):
            if table == "attempts":
                rows = [(*r[:_SUCCEEDED], bool(r[_SUCCEEDED]), *r[_SUCCEEDED + 1:]) for r in rows]
            yield rows

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            os.close(self._lock_fd)

    def _read(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except sqlite3.Error as e:
            raise StoreError(_explain(self.path, e)) from e


def _connect(path: Path) -> tuple[sqlite3.Connection, list[int]]:
    """A connection to the database, its schema brought up to date (as the daemon's writer does at start) and
    a read transaction open, so that every table is read as of one moment. Returns it and the versions applied."""
    migrated: list[int] = []

    def log(_level: str, _event: str, fields: dict[str, Any]) -> None:
        migrated.append(fields["version"])

    db = sqlite3.connect(path, isolation_level=None)
    try:
        if schema.value(db, "PRAGMA user_version") == 0:
            raise StoreError(f"{path} is not an eventrelay database (it has no eventrelay schema): give the "
                             "storage.path of the stopped daemon")
        schema.use_wal(db, str(path))
        schema.migrate(db, str(path), log)
        db.execute("BEGIN")
    except Failed as e:
        db.close()
        raise StoreError(str(e)) from None
    except sqlite3.Error as e:
        db.close()
        raise StoreError(_explain(path, e)) from e
    except BaseException:
        db.close()
        raise
    return db, migrated


def _known(table: str) -> str:
    if table not in TABLES:
        raise ValueError(f"not a table of the store: {table!r}")
    return table


def _holder(path: Path) -> str:
    """The pid a daemon wrote into the lock file it holds."""
    try:
        return path.with_name(path.name + ".lock").read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _explain(path: Path, e: sqlite3.Error) -> str:
    if looks_damaged(e):
        return damaged(path, f"SQLite: {e}")
    return f"cannot read {path}: {e}"
