"""Compare the two asyncio PostgreSQL drivers (asyncpg, psycopg 3 + psycopg_pool) on the
PostgreSQL engine's hot paths, to choose one by measurement (issue 23).

    .venv/bin/python bench/pg_drivers.py                 # the full matrix, 3 rounds
    .venv/bin/python bench/pg_drivers.py --facts         # also the behaviour checks (URLs, errors, NOTIFY, restart)
    .venv/bin/python bench/pg_drivers.py --rounds 1 --seconds 0.5 --shapes claim   # a quick look

The script makes its own throwaway PostgreSQL 15 cluster (Debian's binaries, initdb in a temp dir,
run as the `postgres` user because PostgreSQL refuses root, 127.0.0.1 on a free port, fsync on,
scram-sha-256 password login for a role it creates) and removes it at the end.

Shapes (each one operation = what the engine would do in one call):
  ingest1      one transaction: 1 event + its job, ON CONFLICT (id) DO NOTHING, answers "new or duplicate"
  ingest100    the same for 100 events (10 of them re-sent ids, so duplicates are exercised)
  claim        UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 32) RETURNING, joined with the
               ~1.5 KB payload, against 100k pending jobs
  outcomes     one transaction: 64 jobs marked delivered (unnest of ids/states) + 64 attempt rows
Each shape has variants (how the statements are sent); every driver gets the best way it has.

Measured per (driver, variant, concurrency): operations/s, client CPU µs per operation
(time.process_time of this process) and server CPU µs per operation (utime+stime of the postmaster
and its children, plus what it has reaped, from /proc). Drivers alternate inside each round and the
report shows medians over rounds. Client and server share the machine's cores, so client CPU per
operation is the figure that decides how much of the machine a daemon leaves to the database.

Every loop is bounded in time and count; the cluster is stopped in a `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pwd
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import asyncpg
import psycopg
import psycopg_pool
import uvloop

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER, PASSWORD, DBNAME = "bench", "bench-secret-pw", "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
POOL_SIZE = 8
CLAIM_JOBS = 100_000
OUTCOME_JOBS = 20_000
BATCH = 100
CLAIM_LIMIT = 32
OUTCOME_BATCH = 64

# --------------------------------------------------------------------------------------------- cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A private PostgreSQL 15 cluster in a temp dir, run as `postgres` when we are root."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="pg-drivers-"))
        self.data = self.base / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = (["runuser", "-u", "postgres", "--"] if self.as_root else []) + list(args)
        return subprocess.run(cmd, cwd=self.base, check=check, timeout=timeout, capture_output=True, text=True)

    def dsn(self, user: str = USER, password: str | None = PASSWORD, db: str = DBNAME) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                  "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.base}'\nfsync = on\nsynchronous_commit = on\n"
                    "password_encryption = 'scram-sha-256'\nshared_buffers = 256MB\nmax_connections = 60\n")
        self.start()
        self.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"CREATE DATABASE {DBNAME} OWNER {USER}")

    def start(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def psql(self, sql: str) -> str:
        return self._run(str(PG_BIN / "psql"), "-h", str(self.base), "-p", str(self.port), "-U", "postgres",
                         "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-Atc", sql).stdout

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def cpu_seconds(self) -> float:
        """CPU of the whole cluster: live postgres processes plus what the postmaster has reaped."""
        pm = self.postmaster_pid()
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            f = raw[raw.rfind(")") + 2:].split()
            ppid, utime, stime, cutime, cstime = int(f[1]), int(f[11]), int(f[12]), int(f[13]), int(f[14])
            if int(entry) == pm:
                total += utime + stime + cutime + cstime
            elif ppid == pm:
                total += utime + stime
        return total / CLK_TCK

    def cleanup(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- schema

SCHEMA = """
DROP TABLE IF EXISTS attempts, jobs, events;
CREATE TABLE events (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    type text NOT NULL,
    payload text NOT NULL,
    accepted_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    event_seq bigint NOT NULL,
    integration text NOT NULL,
    state smallint NOT NULL DEFAULT 0,
    due_at double precision NOT NULL,
    attempts int NOT NULL DEFAULT 0,
    ordering_key text,
    lease_owner text,
    lease_until double precision,
    finished_at double precision
);
CREATE INDEX jobs_pending ON jobs (integration, due_at, id) WHERE state = 0;
CREATE TABLE attempts (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL,
    attempt int NOT NULL,
    at double precision NOT NULL,
    status int,
    duration_ms double precision,
    error text
);
"""


def make_payload(i: int) -> str:
    """~1.5 KB of JSON, varied enough that it is not one repeated string."""
    rnd = random.Random(i)
    items = [{"sku": f"SKU-{rnd.randrange(10**6):06d}", "qty": rnd.randrange(1, 9),
              "price": round(rnd.random() * 100, 2), "name": "item " + "x" * rnd.randrange(20, 40)}
             for _ in range(12)]
    doc = {"order_id": i, "customer": {"id": rnd.randrange(10**9), "email": f"user{i}@example.com"},
           "items": items, "note": "n" * 40}
    return json.dumps(doc, separators=(",", ":"))


PAYLOADS = [make_payload(i) for i in range(256)]


async def seed(dsn: str) -> None:
    """Schema, 100k pending jobs for `claim`, 20k jobs for `outcomes` (all with ~1.5 KB payloads)."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(SCHEMA)
        now = time.time()
        for start in range(0, CLAIM_JOBS + OUTCOME_JOBS, 10_000):
            ids = [f"seed-{n}" for n in range(start, start + 10_000)]
            await con.copy_records_to_table(
                "events", records=[(i, "order.created", PAYLOADS[n % len(PAYLOADS)]) for n, i in enumerate(ids)],
                columns=["id", "type", "payload"])
        await con.execute(
            "INSERT INTO jobs (event_seq, integration, due_at) "
            "SELECT seq, CASE WHEN seq <= $1 THEN 'claim' ELSE 'outcome' END, $2 - 3600 + random() * 3000 "
            "FROM events ORDER BY seq", CLAIM_JOBS, now)
        for t in ("events", "jobs", "attempts"):
            await con.execute(f"VACUUM ANALYZE {t}")
    finally:
        await con.close()


# --------------------------------------------------------------------------------------------------- SQL

INGEST_CTE = """
WITH new AS (
    INSERT INTO events (id, type, payload)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
    ON CONFLICT (id) DO NOTHING
    RETURNING seq, id
), j AS (
    INSERT INTO jobs (event_seq, integration, due_at)
    SELECT seq, 'ingest', $4::float8 FROM new
)
SELECT id FROM new
"""

INGEST_ONE_CTE = """
WITH new AS (
    INSERT INTO events (id, type, payload) VALUES ($1, $2, $3)
    ON CONFLICT (id) DO NOTHING
    RETURNING seq, id
), j AS (
    INSERT INTO jobs (event_seq, integration, due_at)
    SELECT seq, 'ingest', $4::float8 FROM new
)
SELECT id FROM new
"""

INSERT_EVENT = "INSERT INTO events (id, type, payload) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING RETURNING seq"
INSERT_JOB = "INSERT INTO jobs (event_seq, integration, due_at) VALUES ($1, 'ingest', $2)"

STAGE_DDL = "CREATE TEMP TABLE IF NOT EXISTS stage (id text, type text, payload text) ON COMMIT DELETE ROWS"
INGEST_FROM_STAGE = """
WITH new AS (
    INSERT INTO events (id, type, payload)
    SELECT id, type, payload FROM stage
    ON CONFLICT (id) DO NOTHING
    RETURNING seq, id
), j AS (
    INSERT INTO jobs (event_seq, integration, due_at)
    SELECT seq, 'ingest', $1::float8 FROM new
)
SELECT id FROM new
"""

# $5 is "leases that ended before": the bench passes a time in the future, so every claim takes the
# head of the queue again. That is the steady state of a running daemon (claimed jobs finish and leave
# the pending set quickly) rather than an ever-growing run of leased rows the index scan must skip.
CLAIM = """
WITH c AS (
    UPDATE jobs SET lease_owner = $1, lease_until = $2
    WHERE id IN (
        SELECT id FROM jobs
        WHERE integration = $3 AND state = 0 AND due_at <= $4 AND (lease_until IS NULL OR lease_until < $5)
        ORDER BY due_at, id
        LIMIT 32
        FOR UPDATE SKIP LOCKED)
    RETURNING id, event_seq, attempts, ordering_key
)
SELECT c.id, c.event_seq, c.attempts, c.ordering_key, e.id, e.type, e.payload, e.accepted_at
FROM c JOIN events e ON e.seq = c.event_seq
"""

OUTCOME_UPDATE = """
UPDATE jobs j SET state = v.state, attempts = j.attempts + 1, lease_owner = NULL, lease_until = NULL,
                  finished_at = $1
FROM unnest($2::bigint[], $3::smallint[]) AS v(id, state)
WHERE j.id = v.id
"""
OUTCOME_INSERT = """
INSERT INTO attempts (job_id, attempt, at, status, duration_ms, error)
SELECT * FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::int[], $5::float8[], $6::text[])
"""
OUTCOME_CTE = """
WITH u AS (
    UPDATE jobs j SET state = v.state, attempts = j.attempts + 1, lease_owner = NULL, lease_until = NULL,
                      finished_at = $1
    FROM unnest($2::bigint[], $3::smallint[]) AS v(id, state)
    WHERE j.id = v.id
)
INSERT INTO attempts (job_id, attempt, at, status, duration_ms, error)
SELECT * FROM unnest($2::bigint[], $4::int[], $5::float8[], $6::int[], $7::float8[], $8::text[])
"""


def to_psycopg(sql: str, binary: bool = False) -> str:
    """$n placeholders -> psycopg's %(pn)s (named, so a parameter may be used twice)."""
    return re.sub(r"\$(\d+)", (lambda m: f"%(p{m.group(1)})b") if binary else (lambda m: f"%(p{m.group(1)})s"), sql)


def pargs(*args: Any) -> dict[str, Any]:
    return {f"p{i}": a for i, a in enumerate(args, 1)}


# ------------------------------------------------------------------------------------------- workloads


class Work:
    """Per-run generators of arguments: unique event ids (with deliberate re-sends), outcome job ids."""

    def __init__(self, tag: str, outcome_first_id: int) -> None:
        self.tag = tag
        self.n = 0
        self.prev: dict[int, list[str]] = {}
        self.outcome_first_id = outcome_first_id
        self.outcome_next = 0

    def batch(self, task: int, size: int) -> tuple[list[str], list[str], list[str]]:
        """`size` events; 10 % carry an id this task sent in its previous batch (duplicates)."""
        dup = self.prev.get(task, [])[: size // 10]
        fresh = [f"{self.tag}-{task}-{self.n + k}" for k in range(size - len(dup))]
        self.n += size
        ids = fresh + dup
        self.prev[task] = fresh
        return ids, ["order.created"] * size, [PAYLOADS[(self.n + k) % len(PAYLOADS)] for k in range(size)]

    def one(self, task: int) -> tuple[str, str, str]:
        """One event; every 10th re-sends the previous id of this task."""
        self.n += 1
        if self.n % 10 == 0 and task in self.prev:
            eid = self.prev[task][0]
        else:
            eid = f"{self.tag}-{task}-{self.n}"
            self.prev[task] = [eid]
        return eid, "order.created", PAYLOADS[self.n % len(PAYLOADS)]

    def outcome_ids(self) -> list[int]:
        start = self.outcome_next
        self.outcome_next = (self.outcome_next + OUTCOME_BATCH) % (OUTCOME_JOBS - OUTCOME_BATCH)
        return list(range(self.outcome_first_id + start, self.outcome_first_id + start + OUTCOME_BATCH))


def outcome_rows(ids: list[int]) -> tuple:
    now = time.time()
    n = len(ids)
    states = [1] * n  # delivered
    return now, ids, states, [1] * n, [now] * n, [200] * n, [12.5] * n, [None] * n


def check_new(ids: list[str], new: set[str]) -> list[bool]:
    """What the engine answers per event: True = stored now, False = duplicate."""
    return [i in new for i in ids]


# asyncpg ---------------------------------------------------------------------------------------------


async def _noop_reset(con: Any) -> None:
    return None


async def asyncpg_pool(dsn: str, reset_off: bool) -> Any:
    async def init(con: Any) -> None:
        await con.execute(STAGE_DDL)
    kw = {"reset": _noop_reset} if reset_off else {}
    return await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, init=init, **kw)


def asyncpg_ops(pool: Any, w: Work) -> dict[str, Callable[[int], Awaitable[Any]]]:
    async def ingest1_cte(t: int) -> Any:
        eid, typ, payload = w.one(t)
        async with pool.acquire() as con:
            rows = await con.fetch(INGEST_ONE_CTE, eid, typ, payload, time.time())
        return bool(rows)

    async def ingest1_tx2(t: int) -> Any:
        eid, typ, payload = w.one(t)
        async with pool.acquire() as con:
            async with con.transaction():
                seq = await con.fetchval(INSERT_EVENT, eid, typ, payload)
                if seq is not None:
                    await con.execute(INSERT_JOB, seq, time.time())
        return seq is not None

    async def ingest100_unnest(t: int) -> Any:
        ids, types, payloads = w.batch(t, BATCH)
        async with pool.acquire() as con:
            rows = await con.fetch(INGEST_CTE, ids, types, payloads, time.time())
        return check_new(ids, {r[0] for r in rows})

    async def ingest100_many(t: int) -> Any:
        ids, types, payloads = w.batch(t, BATCH)
        now = time.time()
        async with pool.acquire() as con:
            async with con.transaction():
                rows = await con.fetchmany(INGEST_ONE_CTE, [(i, ty, p, now) for i, ty, p in zip(ids, types, payloads)])
        return check_new(ids, {r[0] for r in rows})

    async def ingest100_copy(t: int) -> Any:
        ids, types, payloads = w.batch(t, BATCH)
        async with pool.acquire() as con:
            async with con.transaction():
                await con.copy_records_to_table("stage", records=list(zip(ids, types, payloads)))
                rows = await con.fetch(INGEST_FROM_STAGE, time.time())
        return check_new(ids, {r[0] for r in rows})

    async def claim(t: int) -> Any:
        now = time.time()
        async with pool.acquire() as con:
            rows = await con.fetch(CLAIM, f"daemon-{t}", now + 30, "claim", now, now + 3600)
        return [(r[0], r[1], r[2], r[6]) for r in rows]

    async def outcomes_cte(t: int) -> Any:
        a = outcome_rows(w.outcome_ids())
        async with pool.acquire() as con:
            await con.execute(OUTCOME_CTE, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7])

    async def outcomes_tx2(t: int) -> Any:
        a = outcome_rows(w.outcome_ids())
        async with pool.acquire() as con:
            async with con.transaction():
                await con.execute(OUTCOME_UPDATE, a[0], a[1], a[2])
                await con.execute(OUTCOME_INSERT, a[1], a[3], a[4], a[5], a[6], a[7])

    return {"ingest1/cte": ingest1_cte, "ingest1/tx2": ingest1_tx2,
            "ingest100/unnest": ingest100_unnest, "ingest100/executemany": ingest100_many,
            "ingest100/copy": ingest100_copy, "claim/cte": claim,
            "outcomes/cte": outcomes_cte, "outcomes/tx2": outcomes_tx2}


# psycopg ---------------------------------------------------------------------------------------------


async def psycopg_pool_open(dsn: str) -> Any:
    async def configure(con: Any) -> None:
        await con.execute(STAGE_DDL)
    pool = psycopg_pool.AsyncConnectionPool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, open=False,
                                            kwargs={"autocommit": True}, configure=configure)
    await pool.open(wait=True, timeout=30)
    return pool


def psycopg_ops(pool: Any, w: Work) -> dict[str, Callable[[int], Awaitable[Any]]]:
    q_one = to_psycopg(INGEST_ONE_CTE)
    q_event, q_job = to_psycopg(INSERT_EVENT), to_psycopg(INSERT_JOB)
    q_batch, q_batch_b = to_psycopg(INGEST_CTE), to_psycopg(INGEST_CTE, binary=True)
    q_stage = to_psycopg(INGEST_FROM_STAGE)
    q_claim = to_psycopg(CLAIM)
    q_out_cte, q_out_cte_b = to_psycopg(OUTCOME_CTE), to_psycopg(OUTCOME_CTE, binary=True)
    q_out_upd, q_out_ins = to_psycopg(OUTCOME_UPDATE), to_psycopg(OUTCOME_INSERT)

    async def ingest1_cte(t: int) -> Any:
        eid, typ, payload = w.one(t)
        async with pool.connection() as con:
            cur = await con.execute(q_one, pargs(eid, typ, payload, time.time()))
            rows = await cur.fetchall()
        return bool(rows)

    async def ingest1_tx2(t: int) -> Any:
        eid, typ, payload = w.one(t)
        async with pool.connection() as con:
            async with con.transaction():
                cur = await con.execute(q_event, pargs(eid, typ, payload))
                row = await cur.fetchone()
                if row is not None:
                    await con.execute(q_job, pargs(row[0], time.time()))
        return row is not None

    async def ingest100_unnest(t: int) -> Any:
        ids, types, payloads = w.batch(t, BATCH)
        async with pool.connection() as con:
            cur = await con.execute(q_batch, pargs(ids, types, payloads, time.time()))
            rows = await cur.fetchall()
        return check_new(ids, {r[0] for r in rows})

    async def ingest100_unnest_binary(t: int) -> Any:
        ids, types, payloads = w.batch(t, BATCH)
        async with pool.connection() as con:
            cur = await con.execute(q_batch_b, pargs(ids, types, payloads, time.time()), binary=True)
            rows = await cur.fetchall()
        return check_new(ids, {r[0] for r in rows})

    async def ingest100_many(t: int) -> Any:
        # executemany runs in pipeline mode: all 100 statements go out before the first result is read.
        ids, types, payloads = w.batch(t, BATCH)
        now = time.time()
        new: set[str] = set()
        async with pool.connection() as con:
            async with con.transaction():
                cur = con.cursor()
                await cur.executemany(q_one, [pargs(i, ty, p, now) for i, ty, p in zip(ids, types, payloads)],
                                      returning=True)
                while True:
                    row = await cur.fetchone()
                    if row is not None:
                        new.add(row[0])
                    if not cur.nextset():
                        break
        return check_new(ids, new)

    async def ingest100_copy(t: int) -> Any:
        ids, types, payloads = w.batch(t, BATCH)
        async with pool.connection() as con:
            async with con.transaction():
                cur = con.cursor()
                async with cur.copy("COPY stage (id, type, payload) FROM STDIN") as cp:
                    for row in zip(ids, types, payloads):
                        await cp.write_row(row)
                await cur.execute(q_stage, pargs(time.time()))
                rows = await cur.fetchall()
        return check_new(ids, {r[0] for r in rows})

    async def claim(t: int) -> Any:
        now = time.time()
        async with pool.connection() as con:
            cur = await con.execute(q_claim, pargs(f"daemon-{t}", now + 30, "claim", now, now + 3600))
            rows = await cur.fetchall()
        return [(r[0], r[1], r[2], r[6]) for r in rows]

    async def claim_binary(t: int) -> Any:
        now = time.time()
        async with pool.connection() as con:
            cur = await con.execute(q_claim, pargs(f"daemon-{t}", now + 30, "claim", now, now + 3600), binary=True)
            rows = await cur.fetchall()
        return [(r[0], r[1], r[2], r[6]) for r in rows]

    async def outcomes_cte(t: int) -> Any:
        a = outcome_rows(w.outcome_ids())
        async with pool.connection() as con:
            await con.execute(q_out_cte, pargs(*a))

    async def outcomes_cte_binary(t: int) -> Any:
        a = outcome_rows(w.outcome_ids())
        async with pool.connection() as con:
            await con.execute(q_out_cte_b, pargs(*a))

    async def outcomes_tx2(t: int) -> Any:
        # Pipeline mode: BEGIN, both statements and COMMIT in one round trip.
        a = outcome_rows(w.outcome_ids())
        async with pool.connection() as con:
            async with con.pipeline():
                async with con.transaction():
                    await con.execute(q_out_upd, pargs(a[0], a[1], a[2]))
                    await con.execute(q_out_ins, pargs(a[1], a[3], a[4], a[5], a[6], a[7]))

    return {"ingest1/cte": ingest1_cte, "ingest1/tx2": ingest1_tx2,
            "ingest100/unnest": ingest100_unnest, "ingest100/unnest-binary": ingest100_unnest_binary,
            "ingest100/executemany": ingest100_many, "ingest100/copy": ingest100_copy,
            "claim/cte": claim, "claim/cte-binary": claim_binary,
            "outcomes/cte": outcomes_cte, "outcomes/cte-binary": outcomes_cte_binary,
            "outcomes/tx2": outcomes_tx2}


# ----------------------------------------------------------------------------------------------- runner


@dataclass
class Result:
    ops: int
    seconds: float
    client_cpu: float
    server_cpu: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    @property
    def client_us(self) -> float:
        return self.client_cpu / self.ops * 1e6

    @property
    def server_us(self) -> float:
        return self.server_cpu / self.ops * 1e6


async def measure(cluster: Cluster, op: Callable[[int], Awaitable[Any]], tasks: int, seconds: float,
                  warmup: float, max_ops: int = 200_000) -> Result:
    async def loop(t: int, until: float, counts: list[int]) -> None:
        while time.monotonic() < until and counts[t] < max_ops:
            await op(t)
            counts[t] += 1

    # Warm-up: fills statement caches (psycopg prepares a statement on its 5th use on a connection).
    warm = [0] * tasks
    await asyncio.gather(*(loop(t, time.monotonic() + warmup, warm) for t in range(tasks)))
    counts = [0] * tasks
    c0, s0, t0 = time.process_time(), cluster.cpu_seconds(), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(loop(t, time.monotonic() + seconds, counts) for t in range(tasks))),
                           timeout=seconds + 60)
    t1, c1, s1 = time.perf_counter(), time.process_time(), cluster.cpu_seconds()
    return Result(sum(counts), t1 - t0, c1 - c0, s1 - s0)


DRIVERS = ["asyncpg", "asyncpg-noreset", "psycopg"]


async def bench(cluster: Cluster, args: argparse.Namespace) -> None:
    dsn = cluster.dsn()
    print("seeding ...", file=sys.stderr, flush=True)
    await seed(dsn)
    con = await asyncpg.connect(dsn)
    outcome_first = await con.fetchval("SELECT min(id) FROM jobs WHERE integration = 'outcome'")
    await con.close()

    results: dict[tuple[str, str, int], list[Result]] = {}
    for rnd in range(args.rounds):
        order = DRIVERS if rnd % 2 == 0 else list(reversed(DRIVERS))
        for drv in order:
            if drv not in args.drivers:
                continue
            w = Work(f"r{rnd}{drv}", outcome_first)
            if drv.startswith("asyncpg"):
                pool = await asyncpg_pool(dsn, reset_off=drv.endswith("noreset"))
                ops = asyncpg_ops(pool, w)
            else:
                pool = await psycopg_pool_open(dsn)
                ops = psycopg_ops(pool, w)
            try:
                for name, op in ops.items():
                    if name.split("/")[0] not in args.shapes:
                        continue
                    for tasks in (1, POOL_SIZE):
                        r = await measure(cluster, op, tasks, args.seconds, args.warmup)
                        results.setdefault((name, drv, tasks), []).append(r)
                        print(f"round {rnd} {drv:16} {name:24} x{tasks}: {r.rate:8.0f} op/s "
                              f"client {r.client_us:7.0f} µs/op server {r.server_us:7.0f} µs/op",
                              file=sys.stderr, flush=True)
            finally:
                await pool.close()
    report(results, args)


def report(results: dict[tuple[str, str, int], list[Result]], args: argparse.Namespace) -> None:
    print()
    print(f"# PostgreSQL drivers, medians of {args.rounds} rounds, {args.seconds}s per cell, pool of {POOL_SIZE}")
    print(f"# asyncpg {asyncpg.__version__}, psycopg {psycopg.__version__} (impl {psycopg.pq.__impl__}, "
          f"libpq {psycopg.pq.version()}), psycopg_pool {psycopg_pool.__version__}, uvloop {uvloop.__version__}, "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs")
    print()
    print("| shape/variant | driver | op/s x1 | op/s x8 | client µs/op x1 | client µs/op x8 | server µs/op x1 | server µs/op x8 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    names = sorted({k[0] for k in results}, key=lambda n: (["ingest1", "ingest100", "claim", "outcomes"].index(n.split("/")[0]), n))
    for name in names:
        for drv in DRIVERS:
            one, eight = results.get((name, drv, 1)), results.get((name, drv, POOL_SIZE))
            if not one or not eight:
                continue
            med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
            print(f"| {name} | {drv} | {med(one, lambda r: r.rate):,.0f} | {med(eight, lambda r: r.rate):,.0f} "
                  f"| {med(one, lambda r: r.client_us):,.0f} | {med(eight, lambda r: r.client_us):,.0f} "
                  f"| {med(one, lambda r: r.server_us):,.0f} | {med(eight, lambda r: r.server_us):,.0f} |")


# ------------------------------------------------------------------------------------------------ facts


def _describe(e: BaseException) -> str:
    msg = " ".join(str(e).split())[:150]
    return f"{type(e).__module__}.{type(e).__qualname__}: {msg}"


async def _try(label: str, coro: Awaitable[Any]) -> None:
    try:
        res = await asyncio.wait_for(coro, timeout=15)
        print(f"- {label}: OK {res!r}"[:300])
    except Exception as e:  # the exception class is what we are reporting
        text = _describe(e)
        leak = " [PASSWORD IN MESSAGE]" if PASSWORD in str(e) or "wrongpw" in str(e) else ""
        print(f"- {label}: {text}{leak}")


async def _apg_q(dsn: str | None = None, **kw: Any) -> Any:
    con = await asyncpg.connect(dsn, **kw)
    try:
        return await con.fetchval("SELECT current_user || '@' || current_database() || ' app=' || current_setting('application_name') || ' sp=' || current_setting('search_path')")
    finally:
        await con.close()


async def _pg_q(dsn: str = "", **kw: Any) -> Any:
    con = await psycopg.AsyncConnection.connect(dsn, **kw)
    try:
        cur = await con.execute("SELECT current_user || '@' || current_database() || ' app=' || current_setting('application_name') || ' sp=' || current_setting('search_path')")
        return (await cur.fetchone())[0]
    finally:
        await con.close()


async def _without_env(q: Callable[..., Awaitable[Any]], dsn: str) -> Any:
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PG")}
    try:
        return await q(dsn)
    finally:
        os.environ.update(saved)


async def facts(cluster: Cluster) -> None:
    """Behaviour the issue needs: libpq URLs, PG* variables, .pgpass, error classes, NOTIFY, restarts."""
    p = cluster.port
    print("\n# Behaviour checks against the private cluster\n")
    saved = {k: os.environ.get(k) for k in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE",
                                             "PGPASSFILE", "PGAPPNAME", "PGCONNECT_TIMEOUT", "PGOPTIONS",
                                             "PGSERVICEFILE", "PGSERVICE", "HOME")}
    home = Path(tempfile.mkdtemp(prefix="pg-drivers-home-"))
    try:
        url = (f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{p}/{DBNAME}"
               "?application_name=relay&connect_timeout=5&options=-csearch_path%3Deventrelay")
        url2 = url.replace("&connect_timeout=5", "")
        for drv, q in (("asyncpg", _apg_q), ("psycopg", _pg_q)):
            await _try(f"{drv} URL with application_name, connect_timeout, options", q(url))
            await _try(f"{drv} URL with application_name, options", q(url2))
            await _try(f"{drv} multi-host URL (first host dead)",
                       q(f"postgresql://{USER}:{PASSWORD}@127.0.0.1:1,127.0.0.1:{p}/{DBNAME}"))
            await _try(f"{drv} keyword/value conninfo string",
                       q(f"host=127.0.0.1 port={p} user={USER} password={PASSWORD} dbname={DBNAME}"))
        # PG* variables only.
        os.environ.update(PGHOST="127.0.0.1", PGPORT=str(p), PGUSER=USER, PGPASSWORD=PASSWORD,
                          PGDATABASE=DBNAME, PGAPPNAME="from-env", PGOPTIONS="-csearch_path=fromenv")
        await _try("asyncpg PG* variables, empty DSN", _apg_q())
        await _try("psycopg PG* variables, empty DSN", _pg_q(""))
        # ~/.pgpass with the password, URL without one.
        os.environ.pop("PGPASSWORD")
        os.environ["HOME"] = str(home)
        pgpass = home / ".pgpass"
        pgpass.write_text(f"127.0.0.1:{p}:{DBNAME}:{USER}:{PASSWORD}\n")
        pgpass.chmod(0o600)
        nopw = f"postgresql://{USER}@127.0.0.1:{p}/{DBNAME}"
        await _try("asyncpg ~/.pgpass, URL without password", _apg_q(nopw))
        await _try("psycopg ~/.pgpass, URL without password", _pg_q(nopw))
        # pg_service.conf
        svc = home / ".pg_service.conf"
        svc.write_text(f"[relay]\nhost=127.0.0.1\nport={p}\ndbname={DBNAME}\nuser={USER}\n")
        await _try("asyncpg service=relay (pg_service.conf)", _apg_q(f"postgresql:///?service=relay"))
        await _try("psycopg service=relay (pg_service.conf)", _pg_q("service=relay"))
        svc.write_text(f"[relay]\nhost=127.0.0.1\nport={p}\ndbname={DBNAME}\nuser={USER}\npassword={PASSWORD}\n")
        await _try("asyncpg service=relay, password in pg_service.conf", _apg_q(f"postgresql:///?service=relay"))
        await _try("asyncpg service=relay, password in pg_service.conf, no PG* vars",
                   _without_env(_apg_q, f"postgresql:///?service=relay"))
        for k in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGAPPNAME", "PGOPTIONS"):
            os.environ.pop(k, None)
        pgpass.unlink()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(home, ignore_errors=True)

    print()
    dead = _free_port()
    for drv, q in (("asyncpg", _apg_q), ("psycopg", _pg_q)):
        await _try(f"{drv} wrong password", q(f"postgresql://{USER}:wrongpw@127.0.0.1:{p}/{DBNAME}"))
        await _try(f"{drv} unknown role", q(f"postgresql://nosuch:wrongpw@127.0.0.1:{p}/{DBNAME}"))
        await _try(f"{drv} missing database", q(f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{p}/nosuchdb"))
        await _try(f"{drv} nothing listening", q(f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{dead}/{DBNAME}"))

    # LISTEN/NOTIFY in async mode.
    print()
    dsn = cluster.dsn()
    got: list[str] = []
    lcon = await asyncpg.connect(dsn)
    await lcon.add_listener("wake", lambda c, pid, ch, payload: got.append(payload))
    other = await asyncpg.connect(dsn)
    t0 = time.perf_counter()
    await other.execute("SELECT pg_notify('wake', 'from-asyncpg')")
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    print(f"- asyncpg LISTEN via add_listener callback: received {got} in {1000 * (time.perf_counter() - t0):.1f} ms")
    await other.close()
    await lcon.close()

    pcon = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await pcon.execute("LISTEN wake")
    sender = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    gen = pcon.notifies(timeout=2.0, stop_after=1)
    t0 = time.perf_counter()
    await sender.execute("SELECT pg_notify('wake', 'from-psycopg')")
    received = [n.payload async for n in gen]
    print(f"- psycopg LISTEN via conn.notifies() async generator: received {received} "
          f"in {1000 * (time.perf_counter() - t0):.1f} ms")
    await sender.close()
    await pcon.close()

    # Pools across a server restart.
    print()
    apool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
    ppool = psycopg_pool.AsyncConnectionPool(dsn, min_size=2, max_size=2, open=False, kwargs={"autocommit": True})
    await ppool.open(wait=True)
    ppool_chk = psycopg_pool.AsyncConnectionPool(dsn, min_size=2, max_size=2, open=False, kwargs={"autocommit": True},
                                                 check=psycopg_pool.AsyncConnectionPool.check_connection)
    await ppool_chk.open(wait=True)
    # Touch every connection so all are idle in the pool.
    await asyncio.gather(*(apool.fetchval("SELECT pg_sleep(0.05)") for _ in range(2)))
    cluster.stop("fast")
    cluster.start()
    await asyncio.sleep(0.2)

    async def apg_use() -> Any:
        return await apool.fetchval("SELECT 1")

    async def pg_use(pool: Any) -> Any:
        async with pool.connection() as c:
            return await (await c.execute("SELECT 1")).fetchone()

    for i in range(3):
        await _try(f"asyncpg pool after restart, query {i + 1}", apg_use())
    for i in range(3):
        await _try(f"psycopg pool (no check) after restart, query {i + 1}", pg_use(ppool))
    for i in range(3):
        await _try(f"psycopg pool check=check_connection after restart, query {i + 1}", pg_use(ppool_chk))

    # Server down: how long does each pool's getconn wait, what does it raise?
    cluster.stop("fast")
    await asyncio.sleep(0.5)
    for i in range(2):
        t0 = time.perf_counter()
        await _try(f"asyncpg pool, server stopped, query {i + 1}", apg_use())
        print(f"  (after {time.perf_counter() - t0:.2f} s)")
    for i in range(3):
        t0 = time.perf_counter()
        await _try(f"psycopg pool (no check), server stopped, timeout=3, query {i + 1}", pg_use_timeout(ppool))
        print(f"  (after {time.perf_counter() - t0:.2f} s)")
    t0 = time.perf_counter()
    await _try("psycopg pool (check), server stopped, timeout=3", pg_use_timeout(ppool_chk))
    print(f"  (after {time.perf_counter() - t0:.2f} s)")
    cluster.start()
    await asyncio.sleep(0.5)
    for i in range(3):
        await _try(f"psycopg pool (no check) after the server came back, query {i + 1}", pg_use(ppool))
    await _try("psycopg pool (check) after the server came back", pg_use(ppool_chk))
    for i in range(2):
        await _try(f"asyncpg pool after the server came back, query {i + 1}", apg_use())
    await apool.close()
    await ppool.close()
    await ppool_chk.close()


async def pg_use_timeout(pool: Any) -> Any:
    async with pool.connection(timeout=3) as c:
        return await (await c.execute("SELECT 1")).fetchone()


# ------------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=0.3)
    ap.add_argument("--shapes", nargs="+", default=["ingest1", "ingest100", "claim", "outcomes"])
    ap.add_argument("--drivers", nargs="+", default=DRIVERS, choices=DRIVERS)
    ap.add_argument("--facts", action="store_true", help="also run the behaviour checks")
    ap.add_argument("--facts-only", action="store_true")
    args = ap.parse_args()

    cluster = Cluster()
    try:
        cluster.init()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            if not args.facts_only:
                runner.run(bench(cluster, args))
            if args.facts or args.facts_only:
                runner.run(facts(cluster))
    finally:
        cluster.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
