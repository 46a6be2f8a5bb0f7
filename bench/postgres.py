"""The PostgreSQL engine beside the SQLite engine, in one invocation (issue 23).

Every figure has its SQLite counterpart measured in the same run, on the same machine, with the same load
generators (benchlib: ingest.py's scenarios, deliver.py's stored backlog and paced events):

  (a) HTTP ingest, 1 event per request, 32 connections      one daemon on each engine
  (b) HTTP ingest, 100 events per request, 32 connections   target: PostgreSQL >= 50 % of SQLite
  (c) webhook delivery of a stored backlog of N events (held by a rate limit of 1/s, lifted by a reload,
      the drain timed): SQLite, then PostgreSQL with 1, 2 and 3 daemons on one database (separate
      processes, each with its own port and socket, one shared receiver; the rate is the aggregate)
                                                             target: 1 daemon >= 70 % of SQLite
  (d) accept -> delivered at a fixed rate (default 500 events/s), events posted round-robin to 2 daemons
      on PostgreSQL and delivered by whichever claims them; one SQLite daemon beside it for reference
                                                             target: p50 < 20 ms
  (e) CPU: PostgreSQL's own (every server process, from /proc) per 1,000 deliveries and per 1,000
      ingested events, and each daemon's (its writer process included) per 1,000 deliveries

Ingest runs route every event to one webhook integration held back by a rate limit of 1/s, so each event
also writes its job, as in production, and nothing is delivered while ingesting. Per-1,000 CPU figures of
ingest count every event stored, warm-up included, against the CPU of the whole load.

By default the script makes a throwaway cluster (bench/services.py PostgresCluster: fsync on,
synchronous_commit on, the default) and removes it at the end; --dsn measures against an existing server
instead (each run in a schema of its own, dropped after it; PostgreSQL's CPU is then not measured). On a
small machine the database, the daemons, the receiver and the load generators share the cores: with 2 or
3 daemons the aggregate is bound by the cores, not by the engine.

    .venv/bin/python bench/postgres.py [--rounds 3] [--events 20000] [--rate 500] [--dsn URL] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time
import uuid
from typing import Any, Callable

from benchlib import (
    BUSY_OTHER_PCT,
    INGEST_SCENARIOS,
    CpuMeter,
    Daemon,
    IngestScenario,
    LoadResult,
    Receiver,
    daemon_problems,
    delivery_latency,
    environment,
    held_webhook,
    log,
    lower_median,
    other_cpu_pct,
    paced,
    print_header,
    release_backlog,
    run_in_child,
    run_ingest_load,
    webhook_integration,
)

CONCURRENCY = 8  # delivery.concurrency of every daemon, as in deliver.py
BATCH = 1000  # pre-load batch size (the contract's maximum)
INGEST_TARGET = 0.50  # PostgreSQL's 100-per-request ingest rate against SQLite's, one daemon each
DELIVERY_TARGET = 0.70  # PostgreSQL's delivery rate against SQLite's, one daemon each
LATENCY_P50_MS = 20.0  # accept -> delivered across daemons
LATENCY_DAEMONS = 2


# --------------------------------------------------------------------------- the database


class Database:
    """Where the PostgreSQL daemons keep their data: a throwaway cluster of our own, or an existing server
    (--dsn). Each run gets a schema of its own, dropped after it, so one run's tables never slow the next."""

    def __init__(self, dsn: str | None) -> None:
        self.cluster: Any = None
        if dsn is None:
            from services import PostgresCluster

            self.cluster = PostgresCluster(fsync=True)
            self.cluster.start()
            try:
                dsn = self.cluster.create_database("bench")
            except BaseException:
                self.cluster.close()
                raise
        self.dsn = dsn

    def cpu(self) -> float | None:
        """CPU seconds of every server process so far; None for a server that is not ours."""
        return self.cluster.server_cpu_seconds() if self.cluster is not None else None

    def storage(self, schema: str, pool: int) -> dict[str, Any]:
        return {"backend": "postgresql", "dsn": self.dsn, "schema": schema, "pool": pool, "lease": "30s"}

    def _sql(self, fn: Callable[[Any], Any]) -> Any:
        async def run() -> Any:
            import asyncpg

            db = await asyncpg.connect(self.dsn, timeout=10)
            try:
                return await fn(db)
            finally:
                await db.close()

        return asyncio.run(run())

    def facts(self) -> dict[str, str]:
        async def read(db: Any) -> dict[str, str]:
            return {name: await db.fetchval(f"SHOW {name}") for name in
                    ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections")}

        return self._sql(read)

    def count(self, schema: str, table: str) -> int:
        return self._sql(lambda db: db.fetchval(f"SELECT count(*) FROM {schema}.{table}"))

    def drop(self, schema: str) -> None:
        self._sql(lambda db: db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()


def new_schema() -> str:
    return f"bench_{uuid.uuid4().hex[:10]}"


def per_thousand(seconds: float | None, count: int | None) -> float | None:
    return None if seconds is None or not count else 1000.0 * seconds / count


class Engine:
    """One storage engine's daemons: SQLite (each daemon its own file) or PostgreSQL (all on one schema)."""

    def __init__(self, name: str, db: Database | None, pool: int) -> None:
        self.name, self.db, self.pool = name, db, pool
        self.schema: str | None = None

    def daemons(self, n: int, integrations: list[dict[str, Any]]) -> list[Daemon]:
        """n daemons started one after the other (each with its own port, socket and folder)."""
        storage = None
        if self.db is not None:
            self.schema = new_schema()
            storage = self.db.storage(self.schema, self.pool)
        started: list[Daemon] = []
        try:
            for _ in range(n):
                d = Daemon(integrations=integrations, concurrency=CONCURRENCY, storage=storage)
                started.append(d)
                d.start()
        except BaseException:
            self.finish(started)
            raise
        return started

    def server_cpu(self) -> float | None:
        return self.db.cpu() if self.db is not None else None

    def stored_events(self, d: Daemon) -> int | None:
        """Events the engine stored (after the daemons stopped)."""
        if self.db is not None and self.schema is not None:
            return self.db.count(self.schema, "events")
        if d.db_path is None:
            return None
        with sqlite3.connect(f"file:{d.db_path}?mode=ro", uri=True, timeout=10) as db:
            return int(db.execute("SELECT count(*) FROM events").fetchone()[0])

    def finish(self, daemons: list[Daemon]) -> list[str]:
        """Stop the daemons (SIGTERM), collect what looked wrong, clean up; the schema goes later (drop())."""
        notes: list[str] = []
        for i, d in enumerate(daemons):
            d.stop()
            notes += [f"daemon {i}: {n}" for n in daemon_problems(d)]
        for d in daemons:
            d.cleanup()
        return notes

    def drop(self) -> None:
        if self.db is not None and self.schema is not None:
            self.db.drop(self.schema)
            self.schema = None


# --------------------------------------------------------------------------- runs


def run_ingest(engine: Engine, sc: IngestScenario, receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    log(f"{engine.name:<10} {sc.title} ...")
    out: dict[str, Any] = {"engine": engine.name}
    daemons = engine.daemons(1, [held_webhook(receiver.hook_url)])
    d = daemons[0]
    try:
        server0, d_meter = engine.server_cpu(), CpuMeter(d.pid)
        result: LoadResult = run_ingest_load(sc, d.http_url, d.socket_path, d.pid, args)
        server1, d_cpu, elapsed = engine.server_cpu(), d_meter.seconds(), d_meter.elapsed()
    except Exception as exc:  # noqa: BLE001 - report and go on
        out["error"] = f"load failed: {exc}"
        out["notes"] = engine.finish(daemons) + ["log tail: " + d.log_tail(8).replace("\n", " | ")[:800]]
        engine.drop()
        return out
    d.stop()
    try:
        stored = engine.stored_events(d)  # before finish(): SQLite's file goes with the daemon's folder
    finally:
        out["notes"] = engine.finish(daemons)
        engine.drop()
    out.update(result=result.to_dict(), rate=result.events_per_s, errors=result.errors, stored=stored,
               daemon_cpu_s=d_cpu, daemon_cpu_per_1000=per_thousand(d_cpu, stored))
    out["other_cpu_pct"] = result.other_cpu_pct
    if server0 is not None and server1 is not None:
        out["server_cpu_s"] = server1 - server0
        out["server_cpu_per_1000"] = per_thousand(server1 - server0, stored)
        # The load generator's "other" includes PostgreSQL's processes: take out their average over the load.
        if result.other_cpu_pct is not None:
            out["other_cpu_pct"] = max(0.0, result.other_cpu_pct - 100.0 * out["server_cpu_s"] / elapsed)
    return out


def run_backlog(engine: Engine, n: int, receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    log(f"{engine.name:<10} delivery of a stored backlog of {args.events}, {n} daemon(s) ...")
    receiver.reset()
    daemons = engine.daemons(n, [held_webhook(receiver.hook_url)])
    try:
        out = release_backlog(daemons, receiver, args.events, args.timeout, batch=BATCH,
                              server_cpu=engine.server_cpu if engine.db is not None and engine.db.cluster else None)
    except Exception as exc:  # noqa: BLE001
        out = {"error": f"failed: {exc}"}
    finally:
        notes = engine.finish(daemons)
        engine.drop()
    out.update(engine=engine.name, daemons=n, notes=notes)
    delivered = out.get("delivered")
    out["daemon_cpu_per_1000"] = per_thousand(sum(out["daemon_cpu_s"]) if None not in out.get("daemon_cpu_s", [None])
                                              else None, delivered)
    out["server_cpu_per_1000"] = per_thousand(out.get("server_cpu_s"), delivered)
    out["receiver_cpu_per_1000"] = per_thousand(out.get("receiver_cpu_s"), delivered)
    return out


def run_latency(engine: Engine, n: int, receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    log(f"{engine.name:<10} accept->delivered at {args.rate:g}/s, {n} daemon(s) ...")
    receiver.reset()
    out: dict[str, Any] = {"engine": engine.name, "daemons": n}
    daemons = engine.daemons(n, [webhook_integration(receiver.hook_url)])
    try:
        machine, r_meter = CpuMeter(None), CpuMeter(receiver.pid)
        d_meters = [CpuMeter(d.pid) for d in daemons]
        server0 = engine.server_cpu()
        res = run_in_child(paced, [d.events_url for d in daemons], args.rate, args.lat_warmup, args.lat_seconds, 64,
                           timeout=args.lat_warmup + args.lat_seconds + 90)
        expected = int(args.rate * args.lat_warmup) + int(args.rate * args.lat_seconds)
        st = receiver.wait_unique(expected, timeout=15)
        server1 = engine.server_cpu()
        d_cpu = [m.seconds() for m in d_meters]
        arrivals = receiver.arrivals()
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"failed: {exc}"
        out["notes"] = engine.finish(daemons)
        engine.drop()
        return out
    out["notes"] = engine.finish(daemons)
    engine.drop()
    server = [server1 - server0] if server0 is not None and server1 is not None else []
    out.update(delivery_latency(res, arrivals), receiver=st, client_errors=res["error_count"],
               client_error_samples=res["errors"], achieved_rate=res["achieved_rate"],
               max_schedule_lag_ms=res["max_schedule_lag_ms"], daemon_cpu_s=d_cpu,
               other_cpu_pct=other_cpu_pct(machine, [*d_cpu, r_meter.seconds(), res["client_cpu_s"], *server]))
    events = st["unique"]
    if None not in d_cpu:
        out["daemon_cpu_per_1000"] = per_thousand(sum(d_cpu), events)  # type: ignore[arg-type]
    if server:
        out["server_cpu_s"] = server[0]
        out["server_cpu_per_1000"] = per_thousand(server[0], events)
    return out


# --------------------------------------------------------------------------- output


def verdict(ok: bool | None) -> str:
    return {True: "MET", False: "MISSED", None: "n/a"}[ok]


def _rate(run: dict[str, Any] | None) -> float | None:
    return run.get("rate") if run else None


def _ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> float | None:
    a, b = _rate(num), _rate(den)
    return a / b if a and b else None


def fmt(v: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def median_pair(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    return lower_median(pairs, lambda p: _ratio(p[1], p[0]))


def summarize(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The median round of each comparison, and the targets' verdicts."""
    s: dict[str, Any] = {"ingest": {}, "backlog": {}, "latency": None}
    for sc in scenarios(args):
        pairs = [(r["ingest"][sc.key]["sqlite"], r["ingest"][sc.key]["postgresql"]) for r in rounds]
        s["ingest"][sc.key] = median_pair(pairs)
    pairs = [(r["backlog"]["sqlite"], r["backlog"]["postgresql"][0]) for r in rounds]
    s["backlog"]["sqlite"], s["backlog"][1] = median_pair(pairs)
    for i, n in enumerate(args.daemons[1:], 1):
        s["backlog"][n] = lower_median([r["backlog"]["postgresql"][i] for r in rounds], _rate)
    if args.rate:
        s["latency"] = lower_median([(r["latency"]["sqlite"], r["latency"]["postgresql"]) for r in rounds],
                                    lambda p: _p(p[1], "p50_ms"))
    return s


def _p(run: dict[str, Any] | None, key: str) -> float | None:
    if not run or "accept_to_delivered" not in run or not run["accept_to_delivered"]["n"]:
        return None
    return run["accept_to_delivered"][key]


def print_report(s: dict[str, Any], rounds: list[dict[str, Any]], args: argparse.Namespace) -> None:
    head = f"{'figure':<52} {'sqlite':>13} {'postgresql':>13} {'ratio':>6}  {'target':<18} {'result':<6}"
    print(head)
    print("-" * len(head))
    for sc in scenarios(args):
        b, p = s["ingest"][sc.key]
        ratio = _ratio(p, b)
        target, ok = "", None
        if sc.batch == 100:
            target = f">= {INGEST_TARGET:.0%} of sqlite"
            ok = (ratio is not None and ratio >= INGEST_TARGET and not p.get("errors")) if ratio else False
        print(f"{'ingest ' + sc.title[4:] + ' (ev/s)':<52} {fmt(_rate(b)):>13} {fmt(_rate(p)):>13} "
              f"{fmt(ratio, '.0%'):>6}  {target:<18} {verdict(ok) if target else '':<6}")
    b, p1 = s["backlog"]["sqlite"], s["backlog"][1]
    ratio = _ratio(p1, b)
    ok = ratio >= DELIVERY_TARGET if ratio is not None else False
    print(f"{f'delivery, stored backlog N={args.events}, 1 daemon (/s)':<52} {fmt(_rate(b)):>13} {fmt(_rate(p1)):>13} "
          f"{fmt(ratio, '.0%'):>6}  {f'>= {DELIVERY_TARGET:.0%} of sqlite':<18} {verdict(ok)}")
    for n in args.daemons[1:]:
        run = s["backlog"][n]
        label = f"delivery, stored backlog, {n} daemons, aggregate (/s)"
        print(f"{label:<52} {'':>13} {fmt(_rate(run)):>13} {fmt(_ratio(run, b), '.0%'):>6}  "
              f"{'(' + fmt(_ratio(run, p1), '.2f') + 'x of 1 daemon)':<18}")
    if s["latency"] is not None:
        lb, lp = s["latency"]
        for key in ("p50_ms", "p99_ms"):
            label = f"accept->delivered {key[:3]} @{args.rate:g}/s (ms; pg: {LATENCY_DAEMONS} daemons)"
            target = f"< {LATENCY_P50_MS:g} ms" if key == "p50_ms" else ""
            ok = None
            if key == "p50_ms":
                v = _p(lp, key)
                ok = v is not None and v < LATENCY_P50_MS and lp.get("missing") == 0
            print(f"{label:<52} {fmt(_p(lb, key), '.2f'):>13} {fmt(_p(lp, key), '.2f'):>13} {'':>6}  {target:<18} "
                  f"{verdict(ok) if target else ''}")
    print()

    # (e) where the CPU went, per 1,000 events: PostgreSQL's own processes, and the daemons'
    head = (f"{'run (median round)':<44} {'rate /s':>9} {'pg cpu s':>9} {'daemon cpu s':>13} {'receiver':>9} "
            f"{'other':>6} {'dupl.':>6}")
    print("CPU per 1,000 events (seconds of one core; pg = every PostgreSQL process)")
    print(head)
    print("-" * len(head))
    for sc in scenarios(args):
        for run in s["ingest"][sc.key]:
            print(f"{'ingest ' + sc.title[4:] + ', ' + run['engine']:<44} {fmt(_rate(run)):>9} "
                  f"{fmt(run.get('server_cpu_per_1000'), '.3f'):>9} {fmt(run.get('daemon_cpu_per_1000'), '.3f'):>13} "
                  f"{'':>9} {fmt(run.get('other_cpu_pct'), '.0f', '%'):>6} {'':>6}")
    backlog_runs = [s["backlog"]["sqlite"]] + [s["backlog"][n] for n in args.daemons]
    for run in backlog_runs:
        rs = run.get("receiver") or {}
        print(f"{'delivery, ' + run['engine'] + ', ' + str(run['daemons']) + ' daemon(s)':<44} {fmt(_rate(run)):>9} "
              f"{fmt(run.get('server_cpu_per_1000'), '.3f'):>9} {fmt(run.get('daemon_cpu_per_1000'), '.3f'):>13} "
              f"{fmt(run.get('receiver_cpu_per_1000'), '.3f'):>9} {fmt(run.get('other_cpu_pct'), '.0f', '%'):>6} "
              f"{fmt(rs.get('duplicates'), 'd'):>6}")
    if s["latency"] is not None:
        for run in s["latency"]:
            rs = run.get("receiver") or {}
            print(f"{f'ingest+delivery @{args.rate:g}/s, ' + run['engine'] + ', ' + str(run['daemons']) + ' daemon(s)':<44} "
                  f"{fmt(run.get('achieved_rate')):>9} {fmt(run.get('server_cpu_per_1000'), '.3f'):>9} "
                  f"{fmt(run.get('daemon_cpu_per_1000'), '.3f'):>13} {'':>9} "
                  f"{fmt(run.get('other_cpu_pct'), '.0f', '%'):>6} {fmt(rs.get('duplicates'), 'd'):>6}")
    print()
    if len(rounds) > 1:
        for sc in scenarios(args):
            print(f"ingest {sc.title[4:]}, {len(rounds)} rounds (postgresql / sqlite ev/s, ratio): " + "; ".join(
                f"{fmt(_rate(r['ingest'][sc.key]['postgresql']))} / {fmt(_rate(r['ingest'][sc.key]['sqlite']))} "
                f"{fmt(_ratio(r['ingest'][sc.key]['postgresql'], r['ingest'][sc.key]['sqlite']), '.0%')}"
                for r in rounds))
        print(f"delivery, {len(rounds)} rounds (sqlite / postgresql with {', '.join(map(str, args.daemons))} "
              "daemon(s), /s): " + "; ".join(
                  " / ".join(fmt(_rate(x)) for x in [r["backlog"]["sqlite"], *r["backlog"]["postgresql"]])
                  for r in rounds))
        if args.rate:
            print(f"accept->delivered p50/p99, {len(rounds)} rounds (sqlite; postgresql, ms): " + "; ".join(
                f"{fmt(_p(r['latency']['sqlite'], 'p50_ms'), '.1f')}/{fmt(_p(r['latency']['sqlite'], 'p99_ms'), '.1f')}"
                f" {fmt(_p(r['latency']['postgresql'], 'p50_ms'), '.1f')}/"
                f"{fmt(_p(r['latency']['postgresql'], 'p99_ms'), '.1f')}" for r in rounds))
        print()
    problems = []
    busy = 0
    for r in rounds:
        runs = [x for pair in r["ingest"].values() for x in pair.values()] + [r["backlog"]["sqlite"],
                                                                             *r["backlog"]["postgresql"]]
        if r.get("latency"):
            runs += list(r["latency"].values())
        for run in runs:
            busy += (run.get("other_cpu_pct") or 0) > BUSY_OTHER_PCT
            what = f"{run.get('engine')} {run.get('daemons', 1)} daemon(s)"
            if run.get("error"):
                problems.append(f"{what}: {run['error']}")
            if run.get("errors"):
                problems.append(f"{what}: {run['errors']} request errors: {run['result']['error_samples'][:2]}")
            if run.get("missing"):
                problems.append(f"{what}: {run['missing']} events never delivered")
            if (run.get("receiver") or {}).get("duplicates"):
                problems.append(f"{what}: {run['receiver']['duplicates']} duplicate deliveries")
            problems += [f"{what}: {n}" for n in run.get("notes", [])]
    for p in dict.fromkeys(problems):
        print(p)
    if busy:
        print(f"WARNING: {busy} run(s) shared the machine with other work (other cpu > {BUSY_OTHER_PCT:.0f}%, "
              "which here includes nothing of PostgreSQL's): their numbers are low and noisy")
    print(f"NOTE: PostgreSQL, the daemons, the receiver and the load generators share {_cpus()} cores: the 2- and "
          "3-daemon aggregates are bound by the cores, not by the engine or the database.")


def _cpus() -> int:
    return os.cpu_count() or 0


def scenarios(args: argparse.Namespace) -> list[IngestScenario]:
    return [sc for sc in INGEST_SCENARIOS if sc.transport == "http" and sc.key in args.ingest]


# --------------------------------------------------------------------------- main


def one_round(n: int, sqlite: Engine, pg: Engine, receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    """Each comparison alternates SQLite and PostgreSQL, so a change in the machine's speed hits both."""
    log(f"round {n}")
    out: dict[str, Any] = {"ingest": {}, "backlog": {}, "latency": None}
    for sc in scenarios(args):
        out["ingest"][sc.key] = {e.name: run_ingest(e, sc, receiver, args) for e in (sqlite, pg)}
    out["backlog"]["sqlite"] = run_backlog(sqlite, 1, receiver, args)
    out["backlog"]["postgresql"] = [run_backlog(pg, k, receiver, args) for k in args.daemons]
    if args.rate:
        out["latency"] = {"sqlite": run_latency(sqlite, 1, receiver, args),
                          "postgresql": run_latency(pg, LATENCY_DAEMONS, receiver, args)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", help="an existing PostgreSQL server's libpq URL (default: a throwaway cluster)")
    ap.add_argument("--pool", type=int, default=10, help="storage.pool of each PostgreSQL daemon (default 10)")
    ap.add_argument("--rounds", type=int, default=1, help="SQLite/PostgreSQL alternations; the table shows the "
                    "median round of each comparison and lists every round's")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window of each ingest run (default 8)")
    ap.add_argument("--warmup", type=float, default=1.5, help="unmeasured warm-up of each ingest run (default 1.5)")
    ap.add_argument("--client", choices=("aiohttp", "raw"), default="raw", help="ingest load client (default raw)")
    ap.add_argument("--ingest", default="ab", help="ingest scenarios: a (1 ev/req), b (100 ev/req); '' for none")
    ap.add_argument("--events", type=int, default=20_000, help="stored backlog to deliver (default 20000)")
    ap.add_argument("--daemons", default="1,2,3", help="PostgreSQL daemon counts for the backlog (default 1,2,3)")
    ap.add_argument("--timeout", type=float, default=60.0, help="max seconds of each backlog drain (default 60)")
    ap.add_argument("--rate", type=float, default=500.0, help="events/s of the latency runs; 0 skips them")
    ap.add_argument("--lat-seconds", type=float, default=5.0, help="measured seconds of a latency run (default 5)")
    ap.add_argument("--lat-warmup", type=float, default=1.0, help="warm-up of a latency run (default 1)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    args.synchronous = "full"
    try:
        args.daemons = sorted({int(x) for x in args.daemons.split(",")})
    except ValueError:
        ap.error("--daemons is a comma-separated list of counts, e.g. 1,2,3")
    if args.daemons[0] != 1 or args.daemons[-1] > 8 or not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 60 \
            or not 0 < args.events <= 200_000 or not 0 <= args.rate <= 5000 or set(args.ingest) - {"a", "b"}:
        ap.error("bounds: --daemons starts at 1, at most 8; 1 <= --rounds <= 20; 0 < --seconds <= 60; "
                 "0 < --events <= 200000; 0 <= --rate <= 5000; --ingest of a and b")

    env = environment()
    db = Database(args.dsn)
    try:
        env["postgresql"] = db.facts()
        env["postgresql"]["server"] = "throwaway cluster (bench/services.py)" if db.cluster else "--dsn"
        settings = {"rounds": args.rounds, "seconds": args.seconds, "warmup": args.warmup, "client": args.client,
                    "events": args.events, "daemons": ",".join(map(str, args.daemons)), "concurrency": CONCURRENCY,
                    "rate": args.rate, "pool": args.pool, "sqlite.synchronous": "full"}
        if not args.json:
            print_header("eventrelay: the PostgreSQL engine beside the SQLite engine", env, settings)
            pgf = env["postgresql"]
            print(f"postgresql {pgf['server_version']} ({pgf['server']}) | fsync {pgf['fsync']} | synchronous_commit "
                  f"{pgf['synchronous_commit']} | shared_buffers {pgf['shared_buffers']} | max_connections "
                  f"{pgf['max_connections']}\n", flush=True)
        sqlite, pg = Engine("sqlite", None, args.pool), Engine("postgresql", db, args.pool)
        rounds = []
        t0 = time.monotonic()
        with Receiver() as receiver:
            for n in range(1, args.rounds + 1):
                rounds.append(one_round(n, sqlite, pg, receiver, args))
        log(f"done in {time.monotonic() - t0:.0f}s")
    finally:
        db.close()

    summary = summarize(rounds, args)
    if args.json:
        json.dump({"benchmark": "postgres", "env": env, "settings": settings, "rounds": rounds,
                   "median": {"ingest": summary["ingest"], "backlog": {str(k): v for k, v in summary["backlog"].items()},
                              "latency": summary["latency"]}}, sys.stdout, indent=2, default=str)
        print()
    else:
        print_report(summary, rounds, args)
    failed = any(run.get("error") for r in rounds for run in
                 [*(x for pair in r["ingest"].values() for x in pair.values()), r["backlog"]["sqlite"],
                  *r["backlog"]["postgresql"], *((r["latency"] or {}).values())])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
