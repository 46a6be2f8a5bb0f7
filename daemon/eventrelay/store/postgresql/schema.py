"""The PostgreSQL schema and its migrations, applied once however many daemons start together.

Times are unix seconds in double precision, as in the SQLite engine: the daemon computes due times, and
every lease is counted by the database's clock (`NOW` below), so the daemons' clocks need not agree on it.
"""

from __future__ import annotations

from typing import Any, Protocol

# The database's clock in unix seconds. clock_timestamp(), not now(): now() is the transaction's start.
NOW = "extract(epoch from clock_timestamp())"

# Each entry migrates the schema from version i to i+1, in the schema named by `{s}`.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE {s}.events (
        seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id          text NOT NULL UNIQUE,
        type        text NOT NULL,
        payload     text NOT NULL,  -- JSON text, spliced into bodies as stored
        accepted_at double precision NOT NULL
    );
    CREATE TABLE {s}.jobs (
        id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_seq    bigint NOT NULL REFERENCES {s}.events (seq),
        integration  text NOT NULL,
        state        text NOT NULL DEFAULT 'pending',
        attempts     integer NOT NULL DEFAULT 0,
        next_at      double precision NOT NULL,
        created_at   double precision NOT NULL,
        updated_at   double precision NOT NULL,
        last_error   text,
        requeued_at  double precision,  -- a replay starts a new max_age window
        ordering_key text,
        claimed_by   text,  -- the daemon delivering it, until lease_until (the database's clock)
        lease_until  double precision
    ) WITH (fillfactor = 80);
    -- No index covers claimed_by or lease_until, and pages keep room: a claim or a lease renewal then updates
    -- its rows in place (a HOT update), without new entries in every index of the table.
    -- A claim walks this index from its start: its cost depends on the page, not the backlog.
    CREATE INDEX jobs_due ON {s}.jobs (integration, next_at, id) WHERE state = 'pending';
    CREATE INDEX jobs_event ON {s}.jobs (event_seq);
    CREATE INDEX jobs_state ON {s}.jobs (integration, state, id);
    CREATE INDEX jobs_created ON {s}.jobs (integration, created_at);
    CREATE INDEX jobs_finished ON {s}.jobs (state, updated_at) WHERE state <> 'pending';
    CREATE INDEX jobs_ordered ON {s}.jobs (integration, ordering_key, id)
        WHERE state = 'pending' AND ordering_key IS NOT NULL;
    CREATE TABLE {s}.attempts (
        id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id       bigint NOT NULL,
        integration  text NOT NULL,
        attempt      integer NOT NULL,
        succeeded    boolean NOT NULL,
        created_at   double precision NOT NULL,
        duration     double precision NOT NULL,
        status_code  integer,
        error_detail text,
        body         text
    );
    CREATE INDEX attempts_job ON {s}.attempts (job_id);
    CREATE INDEX attempts_integration ON {s}.attempts (integration, id);
    CREATE INDEX attempts_outcome ON {s}.attempts (integration, succeeded, id);
    CREATE TABLE {s}.integration_state (
        name            text PRIMARY KEY,
        disabled_at     double precision,
        disabled_reason text
    );
    CREATE TABLE {s}.outcome_minutes (
        integration text NOT NULL,
        minute      bigint NOT NULL,  -- unix time // 60 of the attempts' start
        daemon      text NOT NULL DEFAULT '',  -- a row per daemon: their commits of outcomes never wait on one row
        delivered   bigint NOT NULL DEFAULT 0,
        failed      bigint NOT NULL DEFAULT 0,
        dead        bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (minute, integration, daemon)
    );
    """,
    """
    -- The daemons sharing the schema, each as it last said of itself: status shows the live ones.
    CREATE TABLE {s}.daemons (
        id          text PRIMARY KEY,
        host        text NOT NULL,
        pid         integer NOT NULL,
        version     text NOT NULL,
        config_hash text NOT NULL,
        started_at  double precision NOT NULL,
        last_seen   double precision NOT NULL  -- the database's clock
    );
    """,
    """
    -- Each integration's rate limit, one bucket for all the daemons (the target sees their sum).
    CREATE TABLE {s}.rate_limits (
        integration text PRIMARY KEY,
        tokens      double precision NOT NULL,
        granted     integer NOT NULL,  -- what the last take was given
        updated_at  double precision NOT NULL  -- the database's clock
    );
    """,
    """
    -- An operator paused the integration: it keeps its jobs and sends nothing until resumed.
    ALTER TABLE {s}.integration_state ADD COLUMN paused_at double precision;
    """,
    """
    -- The producer's W3C trace context, passed on to targets.
    ALTER TABLE {s}.events ADD COLUMN traceparent text, ADD COLUMN tracestate text;
    """,
    """
    -- Operators' state-changing actions: who (a token's scope and fingerprint, an address), what, when.
    CREATE TABLE {s}.audit (
        id          bigserial PRIMARY KEY,
        at          double precision NOT NULL,
        action      text NOT NULL,
        target      text NOT NULL,
        scope       text NOT NULL,
        fingerprint text,
        address     text,
        detail      text
    );
    CREATE INDEX audit_at ON {s}.audit (at);
    """,
)


class Connection(Protocol):
    async def execute(self, query: str, *args: Any) -> str: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    def transaction(self) -> Any: ...


def lock_key(schema: str) -> str:
    """The advisory lock's key text: one per schema, so two installations in one database do not wait on
    each other."""
    return f"eventrelay:{schema}"


async def migrate(db: Connection, schema: str) -> list[int]:
    """Bring `schema` up to date; returns the versions applied. Daemons starting together take turns on
    an advisory lock held for the transaction, so the migrations run once; the others find them done.
    Raises SchemaTooNew if the schema was made by a newer eventrelay."""
    applied: list[int] = []
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock_key(schema))
        await db.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await db.execute(f"CREATE TABLE IF NOT EXISTS {schema}.schema_version (version integer NOT NULL)")
        version = await db.fetchval(f"SELECT max(version) FROM {schema}.schema_version") or 0
        if version > len(MIGRATIONS):
            raise SchemaTooNew(version, len(MIGRATIONS))
        for target in range(version + 1, len(MIGRATIONS) + 1):
            await db.execute(MIGRATIONS[target - 1].format(s=schema))
            await db.execute(f"INSERT INTO {schema}.schema_version (version) VALUES ($1)", target)
            applied.append(target)
    return applied


class SchemaTooNew(Exception):
    def __init__(self, found: int, known: int):
        super().__init__(found, known)
        self.found, self.known = found, known
