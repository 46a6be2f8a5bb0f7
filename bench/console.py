"""The operator console's reads on a store of a million jobs, beside the same reads on a store of 1,000.

    .venv/bin/python bench/console.py [--jobs 1000000] [--engine sqlite|postgresql|both] [--pg-jobs N]
                                      [--mid-jobs 100000] [--baseline-jobs 1000] [--calls 20] [--dsn URL]

The issue's requirement: the console stays fast with a million jobs, every list a bounded, indexed query and
the overview's figures from counters or bounded aggregates. So every read a console page makes is timed
(median and p95 of --calls calls, after two unmeasured ones) on a store of N jobs and on a store of 1,000 jobs
in the same invocation, and the table prints the ratio. A bounded read stays near 1x; one that grows with the
store shows it. Reads that examine a bounded number of rows (a search page examines at most 20,000 jobs)
cost more at N than at 1,000 when 1,000 is below their bound: their ratio is the bound's cost, not the
store's. A middle store (--mid-jobs, 100,000) tells the two apart: a read that still doubles from there to N
grows with the store. The `rows` columns show what each answer held.

The stores are filled through the storage API (open_store, Store.ingest, claim, record, set_paused), in big
batches, before the daemon starts on them:

* 3 webhook integrations (erp, crm, warehouse) and 6 event types (order.paid goes to two integrations,
  product.updated too, order.refunded is rare: one event in 10,000, to erp and crm), ~1.5 jobs an event;
* spread evenly over the last 24 hours, filled in time order: each integration's newest jobs pending and
  never attempted (erp's and crm's last half hour, a backlog; warehouse's last 3 hours, its target down
  since, so its latest attempts lie behind hours of the others'); of the older jobs 1 % pending after a
  failed attempt (due in an hour), 0.3 % dead after three failed attempts, the rest delivered at the first
  attempt, with realistic durations (so p50/p99 mean something). Each integration's claims and records
  take turns, so the attempt log interleaves them as a daemon's would;
* the store's clock is the wall clock, so after the fill one UPDATE per table moves events' and jobs' times
  back to the plan's (accepted_at, created_at, updated_at, next_at of the never-attempted); attempts get
  their past start times from `record` itself, so the per-minute counts and charts match. Nothing else is
  written outside the storage API;
* every integration paused (Store.set_paused), so the daemon delivers nothing while it is measured: the
  backlog stays as filled, and the reads measure the store, not the store plus deliveries. The script checks
  that no attempt was logged while measuring.

The tail (GET /v1/tail, Server-Sent Events) is timed from sending the request to the first `event:` line
received (its first lines are the latest 20 attempts). aiohttp does not cancel a handler when its client
goes away, so each closed tail keeps polling until its next write; the tail is measured last for that.

After the daemon stops, the store reads behind /v1/status are timed one by one through the storage API, so
a growing /v1/status can be traced to its query.

PostgreSQL: a throwaway cluster of bench/services.py (or --dsn), one schema per store, dropped after it.
Filling it costs more than SQLite; --pg-jobs (default: --jobs) sets its N apart.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import sqlite3
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from benchlib import Daemon, daemon_problems, environment, log, percentile, print_header

from eventrelay.clock import iso_time
from eventrelay.config import LogConfig, PostgresConfig, StorageConfig
from eventrelay.events import Event
from eventrelay.jobs import AttemptRecord, Job, JobState, Outcome
from eventrelay.log import setup as setup_logging
from eventrelay.store import JobSearch, Store, open_store

INTEGRATIONS = ("erp", "crm", "warehouse")
# (type, share of events in percent, integrations it goes to)
TYPES = (
    ("order.paid", 40, ("erp", "warehouse")),
    ("order.created", 20, ("erp",)),
    ("customer.created", 15, ("crm",)),
    ("customer.updated", 15, ("crm",)),
    ("product.updated", 10, ("warehouse", "erp")),
)
RARE_TYPE, RARE_ROUTES, RARE_EVERY = "order.refunded", ("erp", "crm"), 10_000
OBSERVES = {"erp": ["order.*", "product.updated"], "crm": ["customer.*", "order.refunded"],
            "warehouse": ["order.paid", "product.updated"]}

SPAN = 24 * 3600.0  # the stored history: inside the default retention (7 days), so nothing is pruned
# Each integration's newest jobs are pending and were never attempted: a backlog of the last half hour, and
# for warehouse the last 3 hours (its target down since), an integration whose latest attempts lie behind
# hours of the others' attempts.
UNATTEMPTED = {"erp": 1800.0, "crm": 1800.0, "warehouse": 3 * 3600.0}
DEAD_PER_10K, RETRYING_PER_10K = 30, 100  # of the other jobs
DEAD_AFTER = 3  # attempts

INGEST_BATCH = 2000  # events per Store.ingest call
INGEST_IN_FLIGHT = 4  # ingest calls awaited together: the writer commits them as one group
CLAIM_PAGE = 2000
WARMUP_CALLS = 2
TAIL_TIMEOUT = 10.0
GROWTH_FLOOR_MS = 5.0  # differences below this are within a run's noise on a 2-core VM


# --------------------------------------------------------------------------- the store's contents


@dataclass
class Plan:
    """What a store of `jobs` jobs holds: event i's type and integrations, each job's fate, and when event i
    was accepted (evenly over SPAN up to `end`)."""

    jobs: int
    end: float
    types: list[int] = field(default_factory=list)  # per event: index into TYPES, or -1 for the rare type

    @classmethod
    def make(cls, jobs: int, end: float) -> Plan:
        plan = cls(jobs, end)
        wheel = [t for t, (_, share, _) in enumerate(TYPES) for _ in range(share)]  # 100 slots
        total, i = 0, 0
        while total < jobs:
            # 37 is prime to 100: consecutive events walk the wheel in a scattered order.
            t = -1 if i % RARE_EVERY == 357 else wheel[(i * 37) % 100]
            plan.types.append(t)
            total += len(plan.routes(i))
            i += 1
        return plan

    @property
    def events(self) -> int:
        return len(self.types)

    def type(self, i: int) -> str:
        t = self.types[i]
        return RARE_TYPE if t < 0 else TYPES[t][0]

    def routes(self, i: int) -> tuple[str, ...]:
        t = self.types[i]
        return RARE_ROUTES if t < 0 else TYPES[t][2]

    def at(self, i: int) -> float:
        return self.end - SPAN + (i + 0.5) * self.step

    @property
    def step(self) -> float:
        return SPAN / len(self.types)

    def cut(self, integration: str) -> int:
        """The first event whose job for this integration was never attempted."""
        return max(0, min(self.events, int((SPAN - UNATTEMPTED[integration]) / self.step)))

    def phases(self) -> list[tuple[int, list[str]]]:
        """(events up to here, integrations attempted up to there), in time order: ingest, then attempt."""
        cuts = sorted({self.cut(name) for name in INTEGRATIONS})
        return [(cut, [n for n in INTEGRATIONS if self.cut(n) >= cut]) for cut in cuts] + [(self.events, [])]

    def fate(self, i: int, integration: str) -> str:
        """delivered, dead or retrying: a hash of the event and the integration, so fates are scattered."""
        h = (i * 2654435761 + INTEGRATIONS.index(integration) * 40503) % 10007
        return "dead" if h < DEAD_PER_10K else "retrying" if h < DEAD_PER_10K + RETRYING_PER_10K else "delivered"

    def sample_event(self, fate: str) -> int:
        """An event in the attempted part of the history with a job of this fate (for the event page)."""
        last = min(self.cut(name) for name in INTEGRATIONS)
        for i in range(last // 2, last):
            if any(self.fate(i, name) == fate for name in self.routes(i)):
                return i
        return 0


def event_id(i: int) -> str:
    return f"ev-{i:09d}"  # back-dating reads the number back from the 4th character on


def event_index(eid: str) -> int:
    return int(eid[3:])


def make_event(plan: Plan, i: int) -> Event:
    data = {"type": "order", "id": f"9b3a1e4c-5d2f-4a6b-8c7d-{i:012d}", "status": "complete", "payment": "paid",
            "customer": {"name": "Ron Swanson", "email": f"ron{i % 977}@swanson.com"},
            "meta": {"display_price": {"with_tax": {"amount": 100 + i % 90000, "currency": "USD"}},
                     "timestamps": {"created_at": "2026-12-01T10:00:00Z"}}}
    payload = json.dumps({"data": data}, separators=(",", ":"))
    return Event(event_id(i), plan.type(i), data, None, True, payload)


# --------------------------------------------------------------------------- filling a store


async def fill(storage: StorageConfig, plan: Plan) -> dict[str, float]:
    """Ingest, claim and record through the storage API, in time order; returns seconds per phase."""
    store = await open_store(storage)
    runner = asyncio.create_task(store.run())
    took = {"ingest": 0.0, "record": 0.0}
    try:
        rng = random.Random(7)
        done = 0
        for upto, attempted in plan.phases():
            t0 = time.monotonic()
            await ingest(store, plan, done, upto)
            took["ingest"] += time.monotonic() - t0
            t0 = time.monotonic()
            await settle(store, plan, attempted, rng)
            took["record"] += time.monotonic() - t0
            done = upto
        for name in INTEGRATIONS:
            await store.set_paused(name, True)
    finally:
        store.stop()
        try:
            await asyncio.wait_for(runner, 600)
        finally:
            await store.close()
    return took


async def ingest(store: Store, plan: Plan, start: int, stop: int) -> None:
    in_flight: list[Any] = []
    for first in range(start, stop, INGEST_BATCH):
        idx = range(first, min(stop, first + INGEST_BATCH))
        in_flight.append(store.ingest([make_event(plan, i) for i in idx],
                                      [[(name, None) for name in plan.routes(i)] for i in idx]))
        if len(in_flight) == INGEST_IN_FLIGHT:
            await asyncio.gather(*in_flight)
            in_flight = []
    await asyncio.gather(*in_flight)


async def settle(store: Store, plan: Plan, names: list[str], rng: random.Random) -> None:
    """Attempt every due job of these integrations, a claim page of each in turn (so their attempts
    interleave in the log, as a daemon's do), until none is due: delivered at the first attempt, or failed
    and due again in an hour, or failed until dead (due again at once in between)."""
    claim_now = time.time()
    retry_at = claim_now + 3600
    busy = list(names)
    for _ in range(10 * plan.jobs // CLAIM_PAGE + 10):  # bounded: each pass records every job it claims
        if not busy:
            return
        for name in list(busy):
            jobs = await store.claim(name, claim_now, CLAIM_PAGE)
            if not jobs:
                busy.remove(name)
                continue
            await store.record([attempt(plan, job, rng, retry_at) for job in jobs])
    raise RuntimeError(f"{busy}: jobs still due after the bounded number of claims")


def attempt(plan: Plan, job: Job, rng: random.Random, retry_at: float) -> AttemptRecord:
    i = event_index(job.event_id)
    fate = plan.fate(i, job.integration)
    # Retries of a dying job start two minutes apart: the per-minute counts then see the failures spread.
    started = plan.at(i) + 0.02 + 120 * (job.attempt - 1)
    duration = min(10.0, rng.lognormvariate(-3.0, 0.7))  # median 50 ms, a long tail
    if fate == "delivered":
        return AttemptRecord(job, Outcome(job.id, True, duration, 200, None, '{"ok":true}'), started,
                             JobState.DELIVERED, None)
    failed = Outcome(job.id, False, duration, 500, "HTTP 500 Internal Server Error",
                     '{"error":"upstream database timeout"}')
    if fate == "retrying":
        return AttemptRecord(job, failed, started, JobState.PENDING, retry_at)
    if job.attempt < DEAD_AFTER:
        return AttemptRecord(job, failed, started, JobState.PENDING, 0.0)  # due again in this fill
    return AttemptRecord(job, failed, started, JobState.DEAD, None)


# The store's clock is the wall clock: move events and jobs back to the times the plan gives them. Jobs take
# their event's time, as ingest gave it them; updated_at follows the attempts as `attempt` timed them.
_JOB_TIMES = """
    created_at = e.accepted_at,
    updated_at = CASE WHEN jobs.attempts = 0 THEN e.accepted_at
                      ELSE e.accepted_at + 0.1 + 120 * (jobs.attempts - 1) END,
    next_at = CASE WHEN jobs.state = 'pending' AND jobs.attempts = 0 THEN e.accepted_at ELSE jobs.next_at END"""


def backdate_sqlite(path: Path, plan: Plan) -> float:
    t0 = time.monotonic()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        db.execute("UPDATE events SET accepted_at = ? + (CAST(substr(id, 4) AS INTEGER) + 0.5) * ?",
                   (plan.end - SPAN, plan.step))
        db.execute(f"UPDATE jobs SET {_JOB_TIMES} FROM events e WHERE e.seq = jobs.event_seq")
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return time.monotonic() - t0


async def backdate_postgres(dsn: str, schema: str, plan: Plan) -> float:
    import asyncpg

    t0 = time.monotonic()
    db = await asyncpg.connect(dsn, timeout=10)
    try:
        async with db.transaction():
            await db.execute(f"UPDATE {schema}.events SET accepted_at = $1 + (substr(id, 4)::bigint + 0.5) * $2",
                             plan.end - SPAN, plan.step)
            await db.execute(f"UPDATE {schema}.jobs SET {_JOB_TIMES} FROM {schema}.events e "
                             "WHERE e.seq = jobs.event_seq")
        # What autovacuum would have done by the time an operator looks: no dead row versions, fresh statistics.
        for table in ("events", "jobs", "attempts", "outcome_minutes"):
            await db.execute(f"VACUUM ANALYZE {schema}.{table}")
    finally:
        await db.close()
    return time.monotonic() - t0


# --------------------------------------------------------------------------- the engines


class SqliteEngine:
    name = "sqlite"

    def __init__(self) -> None:
        self.daemon: Daemon | None = None

    def daemon_for(self, integrations: list[dict[str, Any]]) -> Daemon:
        self.daemon = Daemon(integrations=integrations, ready_timeout=120)
        return self.daemon

    def storage(self) -> StorageConfig:
        assert self.daemon is not None and self.daemon.db_path is not None
        return StorageConfig(self.daemon.db_path)

    def backdate(self, plan: Plan) -> float:
        assert self.daemon is not None and self.daemon.db_path is not None
        return backdate_sqlite(self.daemon.db_path, plan)

    def size_mib(self) -> float:
        assert self.daemon is not None and self.daemon.db_path is not None
        path = self.daemon.db_path
        return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists()) / 2**20

    def explain(self) -> list[str]:
        """SQLite's plan of the status page's job counts, the one read there that is not bounded by design."""
        assert self.daemon is not None and self.daemon.db_path is not None
        with sqlite3.connect(f"file:{self.daemon.db_path}?mode=ro", uri=True) as db:
            rows = db.execute("EXPLAIN QUERY PLAN SELECT integration, state, count(*) FROM jobs "
                              "WHERE state IN ('pending', 'dead') GROUP BY integration, state").fetchall()
        return [r[-1] for r in rows]

    def finish(self) -> None:
        if self.daemon is not None:
            self.daemon.cleanup()
            self.daemon = None


class PostgresEngine:
    name = "postgresql"

    def __init__(self, db: Any) -> None:
        self.db = db  # bench/postgres.py's Database: a throwaway cluster or --dsn
        self.schema = ""
        self.daemon: Daemon | None = None

    def daemon_for(self, integrations: list[dict[str, Any]]) -> Daemon:
        self.schema = f"console_{uuid.uuid4().hex[:10]}"
        self.daemon = Daemon(integrations=integrations, ready_timeout=120, storage=self.db.storage(self.schema, 10))
        return self.daemon

    def storage(self) -> StorageConfig:
        return StorageConfig(Path("unused.db"), backend="postgresql",
                             postgresql=PostgresConfig(dsn=self.db.dsn, schema=self.schema, pool=4))

    def backdate(self, plan: Plan) -> float:
        return asyncio.run(backdate_postgres(self.db.dsn, self.schema, plan))

    def size_mib(self) -> float:
        async def read(db: Any) -> int:
            return await db.fetchval("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                                     "JOIN pg_namespace n ON n.oid = c.relnamespace "
                                     "WHERE n.nspname = $1 AND c.relkind = 'r'", self.schema)

        return self.db._sql(read) / 2**20

    def explain(self) -> list[str]:
        async def read(db: Any) -> list[str]:
            rows = await db.fetch(f"EXPLAIN (ANALYZE, BUFFERS) SELECT integration, state, count(*) FROM "
                                  f"{self.schema}.jobs WHERE state = ANY($1::text[]) GROUP BY integration, state",
                                  ["pending", "dead"])
            return [r[0] for r in rows]

        return self.db._sql(read)

    def finish(self) -> None:
        if self.daemon is not None:
            self.daemon.cleanup()
            self.daemon = None
        if self.schema:
            self.db.drop(self.schema)
            self.schema = ""


def integrations_config() -> list[dict[str, Any]]:
    # Nothing listens on port 9 (discard): were an integration not paused, its attempts would fail and show
    # in the check after the measurements.
    return [{"name": name, "integration_type": "webhook", "observes": OBSERVES[name],
             "configuration": {"url": f"http://127.0.0.1:9/{name}"}} for name in INTEGRATIONS]


# --------------------------------------------------------------------------- the reads


@dataclass
class Read:
    key: str
    label: str
    path: str  # filled in per store by `reads` (cursors and ids differ)


@dataclass
class Timing:
    p50_ms: float
    p95_ms: float
    rows: int | None  # what the answer held (jobs, attempts, minutes, integrations)
    error: str | None = None


class Client:
    """One keep-alive connection to the daemon, as a browser tab holds one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            self.conn.request("GET", path)
            resp = self.conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            raise

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    def close(self) -> None:
        self.conn.close()


def rows_of(doc: Any) -> int | None:
    data = doc.get("data") if isinstance(doc, dict) else None
    if isinstance(data, list):
        return len(data)
    if isinstance(data, dict):
        for key in ("integrations", "jobs"):
            if isinstance(data.get(key), list):
                return len(data[key])
    return None


def time_get(client: Client, path: str, calls: int) -> Timing:
    seconds: list[float] = []
    rows = None
    for n in range(WARMUP_CALLS + calls):
        t0 = time.perf_counter()
        status, body = client.get(path)
        took = time.perf_counter() - t0
        if status != 200:
            return Timing(float("nan"), float("nan"), None, f"HTTP {status}: {body[:200]!r}")
        if n >= WARMUP_CALLS:
            seconds.append(took)
        rows = rows_of(json.loads(body))
    seconds.sort()
    return Timing(statistics.median(seconds) * 1e3, percentile(seconds, 95) * 1e3, rows)


def time_tail(port: int, calls: int) -> Timing:
    """From sending GET /v1/tail to the first `event:` line: the latest attempts a new tail starts with."""
    seconds: list[float] = []
    for n in range(WARMUP_CALLS + calls):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TAIL_TIMEOUT)
        try:
            t0 = time.perf_counter()
            conn.request("GET", "/v1/tail")
            resp = conn.getresponse()
            if resp.status != 200:
                return Timing(float("nan"), float("nan"), None, f"HTTP {resp.status}")
            deadline = t0 + TAIL_TIMEOUT
            while time.perf_counter() < deadline:
                line = resp.readline()
                if not line:
                    return Timing(float("nan"), float("nan"), None, "the tail ended before its first event")
                if line.startswith(b"event:"):
                    break
            else:
                return Timing(float("nan"), float("nan"), None, f"no event within {TAIL_TIMEOUT:.0f}s")
            took = time.perf_counter() - t0
        finally:
            conn.close()
        if n >= WARMUP_CALLS:
            seconds.append(took)
    seconds.sort()
    return Timing(statistics.median(seconds) * 1e3, percentile(seconds, 95) * 1e3, None)


def reads(client: Client, plan: Plan) -> list[Read]:
    """The console's reads, with this store's cursors and ids. The deep page is a `links.next` followed from
    a page of jobs in the middle of the store's history."""
    newest = client.json("/v1/jobs?limit=1")["data"]
    top = int(newest[0]["id"]) if newest else 1
    mid_page = client.json(f"/v1/jobs?{urlencode({'integration': 'erp', 'limit': 100, 'before': top // 2})}")
    deep = mid_page["links"]["next"] or f"/v1/jobs?integration=erp&limit=100&before={top // 2}"
    hour_ago = plan.end - 3600
    sample = event_id(plan.sample_event("dead"))

    def jobs(**query: Any) -> str:
        return f"/v1/jobs?{urlencode(query)}"

    return [
        Read("status", "GET /v1/status (overview)", "/v1/status"),
        Read("integrations", "GET /v1/integrations (overview)", "/v1/integrations"),
        Read("chart", "GET /v1/integrations/erp/chart?hours=6", "/v1/integrations/erp/chart?hours=6"),
        Read("attempts", "GET /v1/attempts?integration=erp&limit=25", "/v1/attempts?integration=erp&limit=25"),
        Read("attempts_quiet", "/v1/attempts integration=warehouse (quiet 3 h)",
             "/v1/attempts?integration=warehouse&limit=25"),
        Read("attempts_all", "GET /v1/attempts?limit=25 (all)", "/v1/attempts?limit=25"),
        Read("event", "GET /v1/events/{id} (3 attempts, dead)", f"/v1/events/{sample}"),
        # The search page asks for 50 a page, the integration page for 25 (console.js).
        Read("jobs", "GET /v1/jobs?limit=50 (no filter)", jobs(limit=50)),
        Read("jobs_dead", "/v1/jobs integration=erp state=dead", jobs(integration="erp", state="dead", limit=25)),
        Read("jobs_pending", "/v1/jobs integration=erp state=pending",
             jobs(integration="erp", state="pending", limit=25)),
        Read("jobs_dead_any", "/v1/jobs state=dead (any integration)", jobs(state="dead", limit=50)),
        Read("jobs_rare", f"/v1/jobs type={RARE_TYPE} (rare, all)", jobs(type=RARE_TYPE, limit=50)),
        Read("jobs_range", "/v1/jobs since/until: 2h..1h ago",
             jobs(since=iso_time(hour_ago - 3600), until=iso_time(hour_ago), limit=50)),
        Read("jobs_deep", "/v1/jobs deep page (links.next, mid-store)", deep),
    ]


def measure(daemon: Daemon, plan: Plan, calls: int) -> tuple[dict[str, Timing], dict[str, Any]]:
    client = Client(daemon.http_port)
    try:
        chosen = reads(client, plan)
        latest_before = client.json("/v1/attempts?limit=1")["data"]
        out: dict[str, Timing] = {}
        labels: dict[str, str] = {}
        for read in chosen:
            out[read.key] = time_get(client, read.path, calls)
            labels[read.key] = read.label
        out["tail"] = time_tail(daemon.http_port, calls)
        labels["tail"] = "GET /v1/tail: to the first event"
        latest_after = client.json("/v1/attempts?limit=1")["data"]
    finally:
        client.close()
    moved = (latest_before[0]["id"] if latest_before else None) != (latest_after[0]["id"] if latest_after else None)
    return out, {"labels": labels, "attempts_logged_while_measuring": moved}


async def status_parts(storage: StorageConfig, calls: int) -> dict[str, float]:
    """The store reads behind /v1/status, each timed (median ms) through the storage API."""
    store = await open_store(storage)
    runner = asyncio.create_task(store.run())
    try:
        since = time.time() - 3600
        parts: dict[str, Any] = {
            "job_counts (pending, dead)": lambda: store.job_counts(),
            "outcomes_since (last hour)": lambda: store.outcomes_since(since),
            "last_attempts(erp)": lambda: store.last_attempts("erp"),
            "last_attempts(warehouse: quiet 3 h)": lambda: store.last_attempts("warehouse"),
            "durations(erp) (latest 1,000)": lambda: store.durations("erp", since),
            "durations(warehouse: quiet 3 h)": lambda: store.durations("warehouse", since),
            "oldest_pending (/metrics only)": lambda: store.oldest_pending(),
            "search: rare type, one page": lambda: store.search(JobSearch(event_type=RARE_TYPE), 50),
        }
        out = {}
        for name, call in parts.items():
            seconds = []
            for n in range(WARMUP_CALLS + calls):
                t0 = time.perf_counter()
                await call()
                if n >= WARMUP_CALLS:
                    seconds.append(time.perf_counter() - t0)
            out[name] = statistics.median(seconds) * 1e3
        return out
    finally:
        store.stop()
        try:
            await asyncio.wait_for(runner, 60)
        finally:
            await store.close()


# --------------------------------------------------------------------------- one store


def one_store(engine: Any, jobs: int, calls: int) -> dict[str, Any]:
    """Fill a store of `jobs` jobs, start the daemon on it, time the reads, stop it, time /v1/status's parts."""
    plan = Plan.make(jobs, time.time())
    out: dict[str, Any] = {"engine": engine.name, "jobs": jobs, "events": plan.events}
    daemon = engine.daemon_for(integrations_config())
    try:
        log(f"{engine.name}: filling a store of {jobs:,} jobs ({plan.events:,} events) ...")
        t0 = time.monotonic()
        out["fill"] = asyncio.run(fill(engine.storage(), plan))
        out["fill"]["backdate"] = engine.backdate(plan)
        out["fill_s"] = time.monotonic() - t0
        out["size_mib"] = engine.size_mib()
        log(f"{engine.name}: filled in {out['fill_s']:.0f}s ({out['size_mib']:,.0f} MiB); starting the daemon")
        daemon.start()
        out["ready_s"] = daemon.ready_seconds
        out["timings"], out["meta"] = measure(daemon, plan, calls)
        daemon.stop()
        out["notes"] = daemon_problems(daemon, expected=lambda line: "database check cut short" in line)
        out["status_parts"] = asyncio.run(status_parts(engine.storage(), calls))
        out["explain"] = engine.explain()
    finally:
        daemon.stop()
        engine.finish()
    return out


# --------------------------------------------------------------------------- output


def fmt_rows(t: Timing | None) -> str:
    return "" if t is None or t.rows is None else str(t.rows)


def verdict(base: float, mid: float | None, big: float, mid_jobs: int | None, big_jobs: int) -> str:
    """"grows" when the large store's time rises with its size beyond the middle one's (at least twice the
    time for 4x the jobs or more, and by more than the noise of a few milliseconds); "bounded" when it costs
    more than at the baseline but not more than at the middle size."""
    if mid is not None and mid_jobs and big_jobs >= 4 * mid_jobs:
        if big >= 2 * mid and big - mid >= GROWTH_FLOOR_MS:
            return "<-- grows with the store"
        if big >= 3 * base and big - base >= GROWTH_FLOOR_MS:
            return "bounded (above the baseline)"
        return ""
    return "<-- grows?" if big >= 3 * base and big - base >= GROWTH_FLOOR_MS else ""


def print_table(runs: list[dict[str, Any]]) -> None:
    big = runs[-1]
    mid = runs[1] if len(runs) == 3 else None
    print(f"{big['engine']}: " + "; ".join(
        f"{r['jobs']:,} jobs: {r['size_mib']:,.1f} MiB, filled in {r['fill_s']:.0f}s ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in r["fill"].items()) + f"), daemon ready in {r['ready_s']:.2f}s"
        for r in runs))
    cols = "".join(f"  {format(r['jobs'], ',') + ' jobs':>24}" for r in runs)
    print(f"{'':<46}{cols}")
    head = f"{'read':<46}" + f"  {'p50 ms':>8} {'p95 ms':>8} {'rows':>6}" * len(runs) + f"  {'ratio':>7}"
    print(head + "  (p50, largest / smallest)")
    print("-" * (len(head) + 28))
    for key, label in big["meta"]["labels"].items():
        timings = [r["timings"].get(key) for r in runs]
        bad = [t.error for t in timings if t is None or t.error]
        if bad:
            print(f"{label:<46}  error: {bad[0]}")
            continue
        cells = "".join(f"  {t.p50_ms:>8.2f} {t.p95_ms:>8.2f} {fmt_rows(t):>6}" for t in timings)
        ratio = timings[-1].p50_ms / timings[0].p50_ms
        note = verdict(timings[0].p50_ms, timings[1].p50_ms if mid else None, timings[-1].p50_ms,
                       mid["jobs"] if mid else None, big["jobs"])
        print(f"{label:<46}{cells}  {ratio:>6.1f}x  {note}")
    print()
    print("the store reads behind /v1/status (and a search page), through the storage API, median ms, daemon stopped")
    for name in big["status_parts"]:
        values = [r["status_parts"][name] for r in runs]
        cells = "".join(f"  {v:>8.2f} {'':>15}" for v in values)
        print(f"  {name:<44}{cells}  {values[-1] / values[0]:>6.1f}x")
    print()
    print(f"plan of the job counts (GET /v1/status, /metrics) at {big['jobs']:,} jobs:")
    for line in big["explain"]:
        print(f"  {line}")
    for run in runs:
        if run["meta"]["attempts_logged_while_measuring"]:
            print(f"WARNING: attempts were logged while measuring {run['jobs']:,} jobs: the daemon delivered")
        for note in run.get("notes", []):
            print(f"{run['jobs']:,} jobs: {note}")
    print(flush=True)


# --------------------------------------------------------------------------- main


def sizes(baseline: int, mid: int, big: int) -> list[int]:
    return [baseline] + ([mid] if baseline < mid < big else []) + [big]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1_000_000, help="jobs in the large store (default 1,000,000)")
    ap.add_argument("--pg-jobs", type=int, default=None, help="jobs in PostgreSQL's large store (default: --jobs)")
    ap.add_argument("--baseline-jobs", type=int, default=1_000, help="jobs in the baseline store (default 1,000)")
    ap.add_argument("--mid-jobs", type=int, default=100_000,
                    help="jobs in a middle store, to tell a read bounded above the baseline's size from one that "
                         "grows with the store (default 100,000; 0: none)")
    ap.add_argument("--engine", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--calls", type=int, default=20, help="timed calls of each read (default 20)")
    ap.add_argument("--dsn", help="an existing PostgreSQL server's libpq URL (default: a throwaway cluster)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    pg_jobs = args.pg_jobs or args.jobs
    if not 100 <= args.baseline_jobs <= min(args.jobs, pg_jobs) or max(args.jobs, pg_jobs) > 5_000_000 \
            or not 1 <= args.calls <= 1000 or args.mid_jobs < 0:
        ap.error("bounds: 100 <= --baseline-jobs <= --jobs, --pg-jobs <= 5,000,000; 1 <= --calls <= 1000")
    # The fill opens stores in this process: their info lines would bury the tables.
    setup_logging(LogConfig(level="warning"))

    env = environment()
    settings = {"jobs": args.jobs, "pg_jobs": pg_jobs, "mid_jobs": args.mid_jobs, "baseline_jobs": args.baseline_jobs,
                "engine": args.engine, "calls": args.calls, "integrations": len(INTEGRATIONS),
                "history_h": SPAN / 3600}
    if not args.json:
        print_header("eventrelay: the console's reads with a large store", env, settings)
    results: list[list[dict[str, Any]]] = []
    t0 = time.monotonic()
    if args.engine in ("sqlite", "both"):
        engine = SqliteEngine()
        results.append([one_store(engine, n, args.calls) for n in sizes(args.baseline_jobs, args.mid_jobs, args.jobs)])
        if not args.json:
            print_table(results[-1])
    if args.engine in ("postgresql", "both"):
        from postgres import Database

        db = Database(args.dsn)
        try:
            if not args.json:
                f = db.facts()
                print(f"postgresql {f['server_version']} | fsync {f['fsync']} | shared_buffers {f['shared_buffers']}"
                      f" | {'throwaway cluster (bench/services.py)' if db.cluster else '--dsn'}\n", flush=True)
            engine_pg = PostgresEngine(db)
            results.append([one_store(engine_pg, n, args.calls)
                            for n in sizes(args.baseline_jobs, args.mid_jobs, pg_jobs)])
            if not args.json:
                print_table(results[-1])
        finally:
            db.close()
    log(f"done in {time.monotonic() - t0:.0f}s")
    if args.json:
        def plain(run: dict[str, Any]) -> dict[str, Any]:
            return {**run, "timings": {k: vars(v) for k, v in run["timings"].items()}}

        json.dump({"benchmark": "console", "env": env, "settings": settings,
                   "runs": [[plain(r) for r in runs] for runs in results]}, sys.stdout, indent=2, default=str)
        print()
    failed = any(t.error for runs in results for run in runs for t in run["timings"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
