"""What SQLite's errors mean for an operator: one sentence each, saying what to do."""

from __future__ import annotations

import sqlite3
from pathlib import Path


class Failed(Exception):
    """The writer cannot go on (at start-up) or a transaction failed; the text is what the daemon tells the
    producers and the operator."""


def damaged(path: str | Path, detail: str) -> str:
    """What an operator does about a damaged database, in one sentence."""
    return (f"the database {path} is damaged ({detail}): eventrelay will not serve it. Stop eventrelay, move "
            f"{path} and its -wal and -shm files aside, then restore a backup, or start with an empty database "
            "(the events pending in the damaged one are then not delivered)")


def looks_damaged(e: BaseException) -> bool:
    return isinstance(e, sqlite3.DatabaseError) and _damage_in(str(e))


def _damage_in(text: str) -> bool:
    return any(s in text for s in ("malformed", "not a database", "corrupt"))


def is_storage_failure(e: BaseException) -> bool:
    """Failures of the disk or the file, which retrying operation by operation cannot cure."""
    return looks_damaged(e) or isinstance(e, sqlite3.OperationalError) and any(
        s in str(e) for s in ("disk is full", "disk I/O", "readonly", "unable to open", "locked"))


def explain(e: BaseException) -> str:
    """Why a write failed, for the producers that wait for it."""
    text = str(e)
    if "disk is full" in text:
        return "the disk holding the database is full: free space, then retry"
    if "readonly" in text:
        return "the database is not writable: check the permissions of storage.path and its directory"
    if looks_damaged(e):
        return f"the database is damaged ({text}): restore a backup (the eventrelay README says how)"
    return f"database error: {text}"


def read_failure(path: Path, e: sqlite3.Error) -> str:
    """Why a read failed, for the admin API and the status."""
    if _damage_in(str(e)):
        return damaged(str(path), f"SQLite: {e}")
    return f"the database {path} could not be read: {e}"
