"""`eventrelay migrate-store`: a stopped single-host install's SQLite store copied into a PostgreSQL schema,
from which several daemons can then run.

Everything goes: events, pending and finished jobs (their state, attempts, due time, errors, ordering key),
the attempt log, integrations a 410 disabled, and the per-minute outcome counts behind status. Ids are kept,
so that job and attempt ids an operator noted still name the same things. The SQLite side is read by
store/sqlite/export.py, the PostgreSQL side written by store/postgresql/load.py; this module runs the two and
talks to the operator.

Exit codes: 0 copied; 1 refused or failed (one sentence on stderr says why and what to do; nothing was
copied); 2 usage; 130 interrupted (nothing was copied, unless it says otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import unquote, urlsplit

from . import config as config_module
from .admin.client import EXIT_INTERRUPTED, EXIT_OK, EXIT_SERVER_ERROR
from .admin.printing import table
from .store import StoreError

if TYPE_CHECKING:
    from .store.postgresql.load import Target
    from .store.sqlite.export import Source

_PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "migrate-store", help="copy a stopped daemon's SQLite store into PostgreSQL, to run several daemons on it",
        description="Copy everything a stopped eventrelay stored in SQLite (events, pending and finished jobs, "
                    "attempts, disabled integrations, outcome counts) into an empty PostgreSQL schema, in one "
                    "transaction: on any failure the schema stays empty.",
        epilog="The daemon must be stopped: its lock is held for the copy, so that none starts on the file "
               "meanwhile. Keep the password out of the command line (and `ps`): leave it out of the URL and "
               "set PGPASSWORD, or use ~/.pgpass. Exit 0 copied, 1 refused or failed (nothing copied), 2 usage.")
    parser.add_argument("--from", dest="source", required=True, type=_sqlite_source, metavar="sqlite:PATH",
                        help="the storage.path of the stopped daemon")
    parser.add_argument("--to", dest="dsn", required=True, type=_postgres_target, metavar="postgresql://…",
                        help="the database, as a libpq URL (postgresql://USER@HOST:PORT/DATABASE); `postgresql:` "
                             "alone takes everything from the PG* environment variables")
    parser.add_argument("--schema", metavar="NAME", type=_schema_name,
                        default=config_module.PostgresConfig().schema,
                        help="the schema to fill, created if missing; it must hold no data (default %(default)s, "
                             "as storage.schema)")
    parser.set_defaults(func=cmd_migrate_store)


def cmd_migrate_store(args: argparse.Namespace) -> int:
    target = config_module.PostgresConfig(dsn=args.dsn, schema=args.schema)
    progress = Progress(sys.stderr)
    print(f"copying {args.source} into the schema {target.schema} of {target.shown_dsn}", file=sys.stderr)
    started = time.monotonic()
    try:
        copied = asyncio.run(migrate_store(args.source, target, progress))
    except StoreError as e:
        progress.interrupted()
        print(f"eventrelay: migrate-store: {_scrub(str(e), args.dsn)}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except KeyboardInterrupt:
        progress.interrupted()
        what = ("after the copy was committed: it is complete" if progress.committed
                else "before the copy was committed: nothing was copied")
        print(f"eventrelay: migrate-store interrupted {what}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary(copied, time.monotonic() - started, args.source, target))
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class Copied:
    table: str
    rows: int
    seconds: float


async def migrate_store(path: Path, target_config: config_module.PostgresConfig, progress: Progress) -> list[Copied]:
    """Copy the store at `path` into the schema of `target_config`; raises StoreError, nothing copied, if it
    cannot. The engines are imported here: the other commands need neither."""
    from .store.postgresql.load import Target
    from .store.sqlite.export import TABLES, Source

    source = await Source.open(path)
    try:
        if source.migrated:
            progress.note(f"{source.path}: schema brought to version {source.migrated[-1]}, as a daemon does "
                          "at start")
        target = await Target.connect(target_config)
        try:
            async with target.transaction():
                await target.claim_empty()
                copied = [await _copy(source, target, name, columns, progress)
                          for name, columns in TABLES.items()]
                await target.restart_identities()
                progress.note("committing")
            progress.committed = True
            await target.analyze()
        finally:
            await target.close()
    finally:
        source.close()
    return copied


async def _copy(source: Source, target: Target, name: str, columns: tuple[str, ...], progress: Progress) -> Copied:
    started = time.monotonic()
    progress.start(name, source.count(name))
    rows = await target.copy(name, columns, _rows(source.rows(name), progress.advance))
    progress.done(rows, time.monotonic() - started)
    return Copied(name, rows, time.monotonic() - started)


async def _rows(batches: Iterator[list[tuple[Any, ...]]], advance: Callable[[int], None]
                ) -> AsyncIterator[tuple[Any, ...]]:
    """The rows of `batches` as COPY takes them. Read on the event loop: nothing else runs on it here, and
    PostgreSQL, not reading SQLite, sets the pace."""
    for batch in batches:
        for row in batch:
            yield row
        advance(len(batch))


class Progress:
    """Rows copied so far, per table, on `stream`: a line rewritten in place on a terminal, else a line per
    table and one every few seconds for a long one."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._live = stream.isatty()
        self._table = ""
        self._total = 0
        self._rows = 0
        self._shown = 0.0
        self._open_line = False
        self.committed = False  # the copy is in PostgreSQL for good

    def note(self, text: str) -> None:
        self._end_line()
        print(text, file=self._stream, flush=True)

    def start(self, table: str, total: int) -> None:
        self._table, self._total, self._rows = table, total, 0
        self._shown = time.monotonic()
        if self._live:
            self._show()

    def advance(self, rows: int) -> None:
        self._rows += rows
        if self._live or time.monotonic() - self._shown >= _PROGRESS_EVERY:
            self._show()

    def done(self, rows: int, seconds: float) -> None:
        self._rows = rows
        self._show(f" in {seconds:.1f} s")
        self._end_line()

    def interrupted(self) -> None:
        self._end_line()

    def _show(self, end: str = "") -> None:
        text = f"{self._table}: {self._rows:,} of {self._total:,} rows copied{end}"
        if self._live:
            print(f"\r{text}\x1b[K", end="", file=self._stream, flush=True)
            self._open_line = True
        else:
            print(text, file=self._stream, flush=True)
        self._shown = time.monotonic()

    def _end_line(self) -> None:
        if self._open_line:
            print(file=self._stream, flush=True)
            self._open_line = False


def summary(copied: list[Copied], seconds: float, source: Path, target: config_module.PostgresConfig) -> str:
    rows = [[c.table, f"{c.rows:,}", f"{c.seconds:.1f}"] for c in copied]
    rows.append(["total", f"{sum(c.rows for c in copied):,}", f"{seconds:.1f}"])
    return "\n".join([
        f"copied {source} into the schema {target.schema} of {target.shown_dsn}:",
        table(["TABLE", "ROWS", "SECONDS"], rows, right={1, 2}),
        f"next: in the config, set storage.backend: postgresql, storage.dsn and storage.schema: {target.schema} "
        "(storage.path goes), then start the daemons.",
        f"keep {source} as a backup, but start no daemon on it again: it would deliver its pending jobs a "
        "second time."])


# -- arguments ------------------------------------------------------------------------------------------------

def _sqlite_source(text: str) -> Path:
    kind, colon, path = text.partition(":")
    if kind != "sqlite" or not colon or not path:
        raise argparse.ArgumentTypeError("write sqlite:PATH, PATH being the storage.path of the stopped daemon")
    return Path(path)


def _postgres_target(text: str) -> str:
    """The DSN of `--to`: a postgresql:// URL, which is already of the form postgresql:DSN, or postgresql: and a
    URL after it, or nothing (the PG* environment variables). No error shows the text: it may hold a password."""
    dsn = text
    for prefix in ("postgresql:", "postgres:"):
        if text.startswith(prefix) and not text.startswith(prefix + "//"):
            dsn = text[len(prefix):]
            break
    else:
        if not text.startswith(("postgresql://", "postgres://")):
            raise argparse.ArgumentTypeError("write postgresql://USER@HOST:PORT/DATABASE (a libpq URL), or "
                                             "postgresql: alone to take it all from the PG* environment variables")
    if dsn:
        try:
            config_module.postgres_dsn(dsn)  # as storage.dsn is checked
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return dsn


def _schema_name(text: str) -> str:
    try:
        return config_module.sql_identifier(text)  # as storage.schema is checked
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _scrub(text: str, dsn: str) -> str:
    """`text` without the password of `dsn`, should a driver's message ever quote it."""
    try:
        password = urlsplit(dsn).password if dsn else None
    except ValueError:
        return text
    if not password or len(password) < 4:  # a shorter one would mask ordinary letters of the text
        return text
    for form in {password, unquote(password)}:
        text = text.replace(form, config_module.mask(unquote(password)))
    return text
