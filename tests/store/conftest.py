"""The engines the contract suite runs against, and a store of each, opened and closed for a test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from eventrelay.config import PostgresConfig, StorageConfig
from eventrelay.events import Event, parse_event
from eventrelay.jobs import AttemptRecord, Job, JobState, Outcome
from eventrelay.store import Store, open_store

FAR = 10**10  # a `now` at which everything stored is due

# Engine name -> the storage configuration of a fresh, empty store for one test: SQLite in its tmp_path,
# PostgreSQL in a database of its own on the suite's cluster (tests/conftest.py).
ENGINES: dict[str, Callable[[pytest.FixtureRequest, Path], StorageConfig]] = {
    "sqlite": lambda request, tmp_path: StorageConfig(tmp_path / "contract.db"),
    "postgresql": lambda request, tmp_path: StorageConfig(
        tmp_path / "unused.db", backend="postgresql",
        postgresql=PostgresConfig(dsn=request.getfixturevalue("postgres_dsn"), pool=4, lease=5.0)),
}


class Stores:
    """Opens stores on one storage, as the daemon does (open, then run beside it), and closes them all."""

    def __init__(self, storage: StorageConfig):
        self.storage = storage
        self._open: list[tuple[Store, asyncio.Task[None]]] = []

    async def open(self) -> Store:
        store = await open_store(self.storage)
        self._open.append((store, asyncio.create_task(store.run())))
        return store

    async def close(self, store: Store) -> None:
        """What the daemon does at its end: stop, wait for what was queued to be written, close."""
        (task,) = [t for s, t in self._open if s is store]
        self._open.remove((store, task))
        store.stop()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await store.close()

    async def reopen(self, store: Store) -> Store:
        await self.close(store)
        return await self.open()

    async def close_all(self) -> None:
        while self._open:
            await self.close(self._open[-1][0])


@pytest.fixture(params=sorted(ENGINES))
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    opened = Stores(ENGINES[request.param](request, tmp_path))
    yield opened
    await opened.close_all()


@pytest.fixture
async def store(stores: Stores) -> Store:
    return await stores.open()


def R(*names: str) -> tuple[tuple[str, None], ...]:
    """Routes to these integrations, without ordering keys."""
    return tuple((name, None) for name in names)


def ev(i: int | str | None = None, type_: str = "order.paid") -> Event:
    """An event with the id evt-{i} (none, for a daemon-made id)."""
    obj = {"type": type_, "data": {"id": str(i)}}
    if i is not None:
        obj["id"] = f"evt-{i}"
    return parse_event(obj)


def delivered(job: Job) -> AttemptRecord:
    return AttemptRecord(job, Outcome(job.id, True, 0.01), time.time(), JobState.DELIVERED, None)


@pytest.fixture
async def daemons(postgres_dsn: str, tmp_path: Path) -> AsyncIterator[Stores]:
    """Stores on one PostgreSQL database, as the daemons sharing it would open them; closed after the test."""
    shared = Stores(StorageConfig(tmp_path / "unused.db", backend="postgresql",
                                  postgresql=PostgresConfig(dsn=postgres_dsn, pool=4, lease=5.0)))
    yield shared
    await shared.close_all()
