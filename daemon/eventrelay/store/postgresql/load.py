"""Loading a whole store into an empty schema, for `eventrelay migrate-store` (migrate.py): in one
transaction, so that a failure leaves the schema as empty as it was; ids kept, since jobs name their event by
its seq and attempts their job by its id; the identity sequences moved past them afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Any

import asyncpg

from ...config import PostgresConfig
from ..api import StoreError
from . import schema
from .connect import split_timeout
from .engine import LIVE_WITHIN
from .writes import Statements

# Every table of the store, as a daemon writes them, in the order they are loaded, with the column the
# database numbers (GENERATED ALWAYS AS IDENTITY) where there is one.
_TABLES: dict[str, str | None] = {"events": "seq", "jobs": "id", "attempts": "id", "integration_state": None,
                                  "outcome_minutes": None, "audit": "id"}
_LOCK_TIMEOUT = "10s"  # for the tables, which a daemon using the schema may hold for a moment
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class Target:
    """One connection to the database, for one load into the schema of `config`."""

    def __init__(self, db: asyncpg.Connection, config: PostgresConfig):
        self._db = db
        self._config = config
        self._s = config.schema

    @classmethod
    async def connect(cls, config: PostgresConfig) -> Target:
        """Connect and bring the schema to the current version (created if need be). Raises StoreError."""
        try:
            dsn, timeout = split_timeout(config.dsn)
            db = await asyncpg.connect(dsn, timeout=timeout,
                                       server_settings={"application_name": "eventrelay migrate-store"})
        except _ERRORS as e:
            raise StoreError(f"cannot connect to PostgreSQL at {config.shown_dsn}: {_reason(e)}; check the "
                             "address, user, password and database") from None
        target = cls(db, config)
        try:
            await target._migrate()
        except BaseException:
            await target.close()
            raise
        return target

    async def _migrate(self) -> None:
        try:
            await schema.migrate(self._db, self._s)
        except schema.SchemaTooNew as e:
            raise StoreError(f"the schema {self._s} in {self._config.shown_dsn} is at version {e.found}, newer "
                             f"than this eventrelay understands ({e.known}): run the eventrelay of the daemons "
                             "that use it") from None
        except _ERRORS as e:
            raise StoreError(f"cannot prepare the schema {self._s} in {self._config.shown_dsn}: "
                             f"{_reason(e)}") from None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """The one transaction of the load: everything in it, or nothing. Raises StoreError if the commit
        fails, saying whether the copy is in or not."""
        transaction = self._db.transaction()
        try:
            await transaction.start()
        except _ERRORS as e:
            raise StoreError(f"cannot start a transaction in {self._config.shown_dsn}: {_reason(e)}") from None
        try:
            yield
        except BaseException:
            with contextlib.suppress(*_ERRORS):  # a connection broken or mid-COPY: closing it rolls back
                await transaction.rollback()
            raise
        try:
            await transaction.commit()
        except asyncpg.PostgresError as e:
            raise StoreError(f"PostgreSQL refused to commit the copy, so nothing was stored: {_reason(e)}") from None
        except _ERRORS as e:
            raise StoreError(f"the connection failed during the commit ({_reason(e)}), so it is not known whether "
                             f"the copy was stored: if the schema {self._s} holds events now, it was, whole; if "
                             "not, run this again") from None

    async def claim_empty(self) -> None:
        """In the transaction: refuse, in one sentence, while daemons use the schema or if any table holds a
        row (a load is into an empty schema only), and keep the tables from everyone else until it ends."""
        await self._refuse_live_daemons()
        try:
            await self._db.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            await self._db.execute(f"LOCK TABLE {', '.join(self._name(t) for t in _TABLES)} IN EXCLUSIVE MODE")
            held = [t for t in _TABLES if await self._db.fetchval(f"SELECT EXISTS (SELECT 1 FROM {self._name(t)})")]
        except asyncpg.LockNotAvailableError:
            raise StoreError(f"the schema {self._s} in {self._config.shown_dsn} is busy (eventrelay daemons "
                             "write to it): stop them, or choose another schema with --schema NAME") from None
        except _ERRORS as e:
            raise StoreError(f"cannot read the schema {self._s}: {_reason(e)}") from None
        if held:
            raise StoreError(
                f"the schema {self._s} in {self._config.shown_dsn} already holds data ({_listed(held)}): "
                f"migrate-store copies into an empty schema only. Name a new one with --schema NAME (and "
                f"storage.schema in the config), or, if its data is not needed, empty it with `DROP SCHEMA "
                f"{self._s} CASCADE` and run this again")

    async def _refuse_live_daemons(self) -> None:
        try:
            live = await self._db.fetch(Statements(self._s).daemons, LIVE_WITHIN)
        except _ERRORS as e:
            raise StoreError(f"cannot read the schema {self._s}: {_reason(e)}") from None
        if live:
            raise StoreError(
                f"eventrelay daemons use the schema {self._s} in {self._config.shown_dsn} "
                f"({', '.join(f'{r[1]} pid {r[2]}' for r in live)}): migrate-store fills a schema no daemon "
                "uses. Stop them, or name another schema with --schema NAME")

    async def copy(self, table: str, columns: Sequence[str], rows: AsyncIterable[tuple[Any, ...]]) -> int:
        """In the transaction: add `rows` to `table` with one COPY; returns how many. COPY writes identity
        columns as given (what OVERRIDING SYSTEM VALUE does for an INSERT)."""
        if table not in _TABLES:
            raise ValueError(f"not a table of the store: {table!r}")
        try:
            status = await self._db.copy_records_to_table(table, schema_name=self._s, columns=list(columns),
                                                          records=rows)
        except _ERRORS as e:
            raise StoreError(f"copying {table} failed, so nothing was stored in the schema {self._s}: "
                             f"{_reason(e)}") from None
        return int(status.split()[-1])

    async def restart_identities(self) -> None:
        """In the transaction: new rows get ids past those loaded, as in the store they came from."""
        try:
            for table, column in _TABLES.items():
                if column is not None:
                    await self._db.execute(
                        f"SELECT setval(pg_get_serial_sequence($1, $2), coalesce(max({column}), 0) + 1, false) "
                        f"FROM {self._name(table)}", self._name(table), column)
        except _ERRORS as e:
            raise StoreError(f"cannot set the next ids of the schema {self._s}, so nothing was stored: "
                             f"{_reason(e)}") from None

    async def analyze(self) -> None:
        """After the commit: statistics for the planner, which has none for tables filled in one go."""
        try:
            await self._db.execute(f"ANALYZE {', '.join(self._name(t) for t in _TABLES)}")
        except _ERRORS:
            pass  # autovacuum gathers them too, a little later

    async def close(self) -> None:
        try:
            await self._db.close(timeout=5)
        except _ERRORS:
            self._db.terminate()

    def _name(self, table: str) -> str:
        return f"{self._s}.{table}"


def _listed(tables: list[str]) -> str:
    return ", ".join(tables[:-1]) + (" and " if len(tables) > 1 else "") + tables[-1]


def _reason(e: BaseException) -> str:
    """The error on one line: PostgreSQL's message, with its detail (the row at fault) after it."""
    if isinstance(e, asyncpg.PostgresError):
        text = "; ".join(filter(None, (e.message, getattr(e, "detail", None))))
    else:
        text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
