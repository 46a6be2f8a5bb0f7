"""Connections to PostgreSQL: waiting for a database that cannot be reached yet, what a connection needs on
its way back to the pool, a transaction for the admin writes, and which failures mean "the database is away"
(and how to say so to an operator)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import structlog

from ...aio import Backoff
from ...config import PostgresConfig
from ..api import StoreError

if TYPE_CHECKING:
    from .engine import PostgresStore

log = structlog.get_logger(component="store")

CONNECT_TIMEOUT = 10.0  # seconds for one connection attempt, unless the DSN's connect_timeout says otherwise
# Seconds a statement may take: past it, a database host that vanished without a reset fails the operation
# (producers get 503) instead of holding it until TCP gives up, minutes later.
COMMAND_TIMEOUT = 15.0
RECONNECT_MAX = 30.0  # seconds between attempts to reach an unreachable database, at most
SERVER_SETTINGS = {"application_name": "eventrelay", "jit": "off"}  # JIT costs short queries milliseconds

# Failures of the database or the way to it, not of one operation's data: nothing in the batch can be stored.
UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError, asyncpg.OperatorInterventionError,
                asyncpg.InsufficientResourcesError, asyncpg.ReadOnlySQLTransactionError)


class Transaction:
    """A pool connection in a transaction, for the admin writes; failures become StoreErrors."""

    def __init__(self, store: PostgresStore, what: str):
        self._store, self._what = store, what
        self._connection: Any = None
        self._transaction: Any = None

    async def __aenter__(self) -> Any:
        if self._store._stopping:
            raise StoreError("the store is closing; nothing more is written")
        try:
            self._connection = await self._store._pool.acquire()
            self._transaction = self._connection.transaction()
            await self._transaction.start()
        except (asyncpg.PostgresError, *UNAVAILABLE) as e:
            await self._release()
            raise store_error(e, self._what, self._store.config) from e
        return self._connection

    async def __aexit__(self, kind: Any, error: BaseException | None, _tb: Any) -> None:
        try:
            if error is None:
                await self._transaction.commit()
            else:
                await self._transaction.rollback()
        except (asyncpg.PostgresError, *UNAVAILABLE) as e:
            if error is None:
                raise store_error(e, self._what, self._store.config) from e
        finally:
            await self._release()
        if isinstance(error, (asyncpg.PostgresError, *UNAVAILABLE)):
            raise store_error(error, self._what, self._store.config) from error

    async def _release(self) -> None:
        if self._connection is not None:
            await self._store._pool.release(self._connection)
            self._connection = None


async def wait_for_database(config: PostgresConfig, on_wait: Callable[[str, float], None] | None,
                   make: Callable[[], Any]) -> Any:
    """`make()` once the database can be reached: an unreachable one is waited for, with backoff; a refused
    login, a missing database or role is a StoreError at once (waiting would not fix it)."""
    backoff = Backoff(0.5, RECONNECT_MAX)
    while True:
        try:
            return await make()
        except UNAVAILABLE as e:
            delay = backoff.next()
            error = str(e) or type(e).__name__
            log.warning("cannot reach the database; retrying", dsn=config.shown_dsn, error=error,
                        retry_in_s=round(delay, 1))
            if on_wait is not None:
                on_wait(f"waiting for the database {config.shown_dsn}: {error}", delay)
            await asyncio.sleep(delay)
        except asyncpg.PostgresError as e:
            raise StoreError(f"PostgreSQL refused eventrelay ({config.shown_dsn}): {e}; check the user, password "
                             "and database of storage.dsn") from e


async def rollback_if_open(db: asyncpg.Connection) -> None:
    """What a connection needs on its way back to the pool. asyncpg's default reset (unlock advisory locks,
    CLOSE ALL, UNLISTEN *, RESET ALL) is a round trip on every release, and the engine leaves none of those
    behind: its advisory locks end with their transactions and it listens on a connection of its own."""
    if db.is_in_transaction():
        await db.execute("ROLLBACK")


def split_timeout(dsn: str) -> tuple[str | None, float]:
    """The DSN without libpq's `connect_timeout` parameter, and that timeout: asyncpg would pass it on to the
    server as a setting, which the server refuses."""
    parts = urlsplit(dsn)
    params = parse_qsl(parts.query, keep_blank_values=True)
    timeout = next((float(v) for k, v in params if k == "connect_timeout" and v), CONNECT_TIMEOUT)
    rest = urlencode([(k, v) for k, v in params if k != "connect_timeout"])
    return (urlunsplit(parts._replace(query=rest)) if dsn else None), timeout


def store_error(e: BaseException, what: str, config: PostgresConfig) -> StoreError:
    if isinstance(e, StoreError):
        return e
    if isinstance(e, UNAVAILABLE):
        return StoreError(f"{what}: the database cannot be reached ({type(e).__name__}: {e}); eventrelay keeps "
                          f"trying. Check PostgreSQL at {config.shown_dsn}")
    return StoreError(f"{what}: {type(e).__name__}: {e}")
