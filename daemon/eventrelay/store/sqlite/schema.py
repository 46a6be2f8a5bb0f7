"""The SQLite schema: tables, indexes, the views that make a group commit one statement, their migrations,
and the checks a database passes before the writer serves it."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

from .errors import Failed, damaged
from .wire import OUTCOME_VIEW_COLUMNS

Log = Callable[[str, str, dict[str, Any]], None]  # (level, event, fields): the writer's way to the daemon's log

# Each entry migrates the schema from version i to i+1; PRAGMA user_version records where a file stands.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY,
        id          TEXT    NOT NULL UNIQUE,
        type        TEXT    NOT NULL,
        payload     TEXT    NOT NULL,
        accepted_at REAL    NOT NULL
    );
    CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY,
        event_seq   INTEGER NOT NULL REFERENCES events(seq),
        integration TEXT    NOT NULL,
        state       TEXT    NOT NULL DEFAULT 'pending',
        attempts    INTEGER NOT NULL DEFAULT 0,
        next_at     REAL    NOT NULL,
        created_at  REAL    NOT NULL,
        updated_at  REAL    NOT NULL,
        last_error  TEXT
    );
    -- The dispatcher's claim walks this index from its start: cost depends on the page, not the backlog.
    CREATE INDEX jobs_due ON jobs (integration, next_at, id) WHERE state = 'pending';
    CREATE INDEX jobs_event ON jobs (event_seq);
    CREATE TABLE attempts (
        id           INTEGER PRIMARY KEY,
        job_id       INTEGER NOT NULL REFERENCES jobs(id),
        integration  TEXT    NOT NULL,
        attempt      INTEGER NOT NULL,
        succeeded    INTEGER NOT NULL,
        created_at   REAL    NOT NULL,
        duration     REAL    NOT NULL,
        status_code  INTEGER,
        error_detail TEXT,
        body         TEXT
    );
    CREATE INDEX attempts_job ON attempts (job_id);
    CREATE INDEX attempts_integration ON attempts (integration, id);
    """,
    """
    -- A replayed job gets a new max_age window, counted from its re-queueing.
    ALTER TABLE jobs ADD COLUMN requeued_at REAL;
    -- Listing and counting one integration's jobs by state, newest first.
    CREATE INDEX jobs_state ON jobs (integration, state, id);
    -- Replay of a time range.
    CREATE INDEX jobs_created ON jobs (integration, created_at);
    -- Retention: finished jobs by age.
    CREATE INDEX jobs_finished ON jobs (state, updated_at) WHERE state <> 'pending';
    -- Last success and last failure of an integration.
    CREATE INDEX attempts_outcome ON attempts (integration, succeeded, id);
    """,
    """
    -- Per-resource ordering: jobs of one key go one at a time, in acceptance order.
    ALTER TABLE jobs ADD COLUMN ordering_key TEXT;
    CREATE INDEX jobs_ordered ON jobs (integration, ordering_key, id)
        WHERE state = 'pending' AND ordering_key IS NOT NULL;
    -- What outlives a restart about an integration itself: disabled by a 410 Gone, and why.
    CREATE TABLE integration_state (
        name            TEXT PRIMARY KEY,
        disabled_at     REAL,
        disabled_reason TEXT
    );
    """,
    """
    -- Ingest writes each event and its jobs through this view, so that a whole group commit of events is one
    -- statement (writes.Writer.transaction says why). `routes` is a JSON array of [integration, ordering key]; the
    -- jobs get the ids first_job, first_job + 1, ... in that order.
    CREATE VIEW ingest (seq, id, type, payload, accepted_at, first_job, routes) AS
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0;
    CREATE TRIGGER ingest_insert INSTEAD OF INSERT ON ingest BEGIN
        INSERT INTO events (seq, id, type, payload, accepted_at)
            VALUES (NEW.seq, NEW.id, NEW.type, NEW.payload, NEW.accepted_at);
        INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at, ordering_key)
            SELECT NEW.first_job + r.key, NEW.seq, json_extract(r.value, '$[0]'), NEW.accepted_at,
                   NEW.accepted_at, NEW.accepted_at, json_extract(r.value, '$[1]')
            FROM json_each(NEW.routes) r;
    END;
    -- Delivery outcomes likewise: each row is a job's new state and its line in the attempt log.
    CREATE VIEW outcome (job_id, integration, state, attempt, next_at, error, succeeded, started_at, duration,
                         status_code, body, updated_at) AS
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0;
    CREATE TRIGGER outcome_insert INSTEAD OF INSERT ON outcome BEGIN
        UPDATE jobs SET state = NEW.state, attempts = NEW.attempt, next_at = coalesce(NEW.next_at, next_at),
                        updated_at = NEW.updated_at, last_error = NEW.error
            WHERE id = NEW.job_id;
        INSERT INTO attempts (job_id, integration, attempt, succeeded, created_at, duration, status_code,
                              error_detail, body)
            VALUES (NEW.job_id, NEW.integration, NEW.attempt, NEW.succeeded, NEW.started_at, NEW.duration,
                    NEW.status_code, NEW.error, NEW.body);
    END;
    """,
    """
    -- Attempts by integration and minute: status and charts read these, not the attempt log, and they
    -- survive reloads and restarts. Pruned with the attempts they count.
    CREATE TABLE outcome_minutes (
        integration TEXT    NOT NULL,
        minute      INTEGER NOT NULL,  -- unix time // 60 of the attempts' start
        delivered   INTEGER NOT NULL DEFAULT 0,
        failed      INTEGER NOT NULL DEFAULT 0,  -- failed, to be retried
        dead        INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (minute, integration)  -- the last hour of every integration is one range
    ) WITHOUT ROWID;
    """,
    """
    -- An operator paused the integration: it keeps its jobs and sends nothing until resumed.
    ALTER TABLE integration_state ADD COLUMN paused_at REAL;
    """,
    """
    -- The producer's W3C trace context, passed on to targets; ingest's view carries it.
    ALTER TABLE events ADD COLUMN traceparent TEXT;
    ALTER TABLE events ADD COLUMN tracestate TEXT;
    DROP TRIGGER ingest_insert;
    DROP VIEW ingest;
    CREATE VIEW ingest (seq, id, type, payload, accepted_at, first_job, routes, traceparent, tracestate) AS
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0;
    CREATE TRIGGER ingest_insert INSTEAD OF INSERT ON ingest BEGIN
        INSERT INTO events (seq, id, type, payload, accepted_at, traceparent, tracestate)
            VALUES (NEW.seq, NEW.id, NEW.type, NEW.payload, NEW.accepted_at, NEW.traceparent, NEW.tracestate);
        INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at, ordering_key)
            SELECT NEW.first_job + r.key, NEW.seq, json_extract(r.value, '$[0]'), NEW.accepted_at,
                   NEW.accepted_at, NEW.accepted_at, json_extract(r.value, '$[1]')
            FROM json_each(NEW.routes) r;
    END;
    """,
    """
    -- Operators' state-changing actions: who (a token's scope and fingerprint, an address), what, when.
    CREATE TABLE audit (
        id          INTEGER PRIMARY KEY,
        at          REAL    NOT NULL,
        action      TEXT    NOT NULL,
        target      TEXT    NOT NULL,
        scope       TEXT    NOT NULL,
        fingerprint TEXT,
        address     TEXT,
        detail      TEXT
    );
    CREATE INDEX audit_at ON audit (at);
    """,
)


_INTEGRITY_BUDGET = 5.0  # seconds the start-up check of the database may take before it is cut short


class Insert:
    """A multi-row INSERT into one of the views: the same text for the same number of rows, so the sqlite3
    module's statement cache keeps it prepared."""

    def __init__(self, view: str, columns: tuple[str, ...]):
        self.width = len(columns)
        self._head = f"INSERT INTO {view} ({', '.join(columns)}) VALUES "
        self._group = "(" + ",".join("?" * self.width) + ")"

    def statement(self, rows: int) -> str:
        return self._head + ",".join([self._group] * rows)


INGEST = Insert("ingest", ("seq", "id", "type", "payload", "accepted_at", "first_job", "routes", "traceparent",
                           "tracestate"))
OUTCOME = Insert("outcome", (*OUTCOME_VIEW_COLUMNS, "updated_at"))


def value(db: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row, or None."""
    row = db.execute(sql, params).fetchone()
    return row[0] if row else None


def use_wal(db: sqlite3.Connection, path: str) -> None:
    mode = value(db, "PRAGMA journal_mode=WAL")
    if mode != "wal":
        raise Failed(f"{path}: SQLite refused WAL mode (got {mode}); is it on a network filesystem?")
    db.execute("PRAGMA busy_timeout=5000")


def check_integrity(db: sqlite3.Connection, path: str, log: Log) -> None:
    """Refuse a damaged database before serving it: its reads would fail at random later, in the middle
    of deliveries and admin requests. SQLite's quick check reads every page; it is cut short, with a
    warning, on a database too large or a disk too slow for it."""
    deadline = time.monotonic() + _INTEGRITY_BUDGET
    db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        problems = [row[0] for row in db.execute("PRAGMA quick_check(3)").fetchall()]
    except sqlite3.OperationalError as e:
        if "interrupted" not in str(e):
            raise
        log("warning", "database check cut short: the database is larger than can be checked quickly "
            "at start-up; run `sqlite3 FILE 'PRAGMA quick_check'` while eventrelay is stopped to check it",
            {"path": path, "budget_s": _INTEGRITY_BUDGET})
        return
    finally:
        db.set_progress_handler(None, 0)
    if problems != ["ok"]:
        lines = [line.strip() for p in problems for line in p.splitlines()]
        found = [line for line in lines if line and not line.startswith("***")]
        raise Failed(damaged(path, "quick_check: " + "; ".join(found[:3])))


def migrate(db: sqlite3.Connection, path: str, log: Log) -> None:
    version = value(db, "PRAGMA user_version")
    if version > len(MIGRATIONS):
        raise Failed(f"{path} has schema version {version}, newer than this eventrelay "
                     f"understands ({len(MIGRATIONS)}): upgrade eventrelay or use another file")
    for target in range(version + 1, len(MIGRATIONS) + 1):
        # executescript commits on its own; user_version is set inside the same script to stay atomic.
        db.executescript(f"BEGIN IMMEDIATE;\n{MIGRATIONS[target - 1]}\nPRAGMA user_version={target};\nCOMMIT;")
        log("info", "schema migrated", {"path": path, "version": target})


def check_statements(db: sqlite3.Connection) -> None:
    """Compile the one-statement commits now (EXPLAIN writes nothing): their triggers use SQLite's JSON
    functions, and a library built without them must stop the start-up, not fail every event."""
    for insert in (INGEST, OUTCOME):
        try:
            db.execute("EXPLAIN " + insert.statement(1), [None] * insert.width)
        except sqlite3.OperationalError as e:
            raise Failed(f"this SQLite ({sqlite3.sqlite_version}) cannot run eventrelay's statements: {e}. "
                         "eventrelay needs SQLite's JSON functions (built in since 3.38; earlier "
                         "builds need JSON1 compiled in)") from e


def enable_incremental_vacuum(db: sqlite3.Connection, path: str, log: Log) -> None:
    """Let pruning hand pages back to the file system, so the file stops growing under steady load."""
    if value(db, "PRAGMA auto_vacuum") == 2:
        return
    # Only VACUUM can change auto_vacuum on a database that has tables: a one-time rewrite.
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("VACUUM")
    log("info", "database set to incremental vacuum", {"path": path})
