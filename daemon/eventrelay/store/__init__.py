"""Storage: the API everything above it uses (api.py), and `open_store`, which picks the engine behind it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .api import (DEAD_LETTER_TYPE, WATCHED_STATES, Accepted, AttemptView, AuditEntry, DaemonView, JobSearch, JobState,
                  JobView, LastAttempts, OutcomeCounts, Route, SearchPage, Store, StoredEvent, StoreError)

if TYPE_CHECKING:
    from ..config import StorageConfig

__all__ = ["DEAD_LETTER_TYPE", "WATCHED_STATES", "Accepted", "AttemptView", "AuditEntry", "DaemonView", "JobSearch",
           "JobState", "JobView", "LastAttempts", "OutcomeCounts", "Route", "SearchPage", "Store", "StoreError",
           "StoredEvent", "open_store"]


async def open_store(storage: StorageConfig, on_wait: Callable[[str, float], None] | None = None) -> Store:
    """Open the store `storage` describes, ready for use; the caller runs `run()` beside it and `close()`s it.
    The one place an engine is chosen; each is imported only when chosen. A database server that cannot be
    reached yet is waited for: `on_wait(why, seconds until the next try)` is called before each wait."""
    if storage.backend == "postgresql":
        from .postgresql.engine import PostgresStore

        assert storage.postgresql is not None
        return await PostgresStore.open(storage.postgresql, on_wait)
    from .sqlite.engine import SqliteStore

    return await SqliteStore.open(storage.path, storage.synchronous, storage.file_mode)
