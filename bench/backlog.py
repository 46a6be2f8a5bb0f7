"""A million pending jobs: start-up time, memory while draining, and whether a claim costs more with a backlog.

    .venv/bin/python bench/backlog.py [--jobs 1000000] [--drain-seconds 20]

Builds a database with N pending webhook jobs (through the daemon's own schema and migrations, then a bulk
insert), measures the daemon's claim query on it beside the same query on a database of 1,000 jobs (the
baseline: a claim must not cost more because the backlog is larger), starts the daemon on it and measures
the time to /readyz, then lets it drain to a local receiver (in its own process) and samples its RSS.
Targets (issue 6): ready < 3 s, RSS < 150 MB while draining, claim cost flat.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import time
from pathlib import Path

from benchlib import Daemon, Receiver, environment, print_header, webhook_integration

from eventrelay.config import StorageConfig
from eventrelay.store import open_store

PAYLOAD = '{"data":{"type":"order","id":"o-1","status":"complete","payment":"paid"}}'


def build(path: Path, jobs: int, integration: str) -> float:
    """A database with `jobs` pending jobs of one integration; returns the seconds it took."""
    started = time.monotonic()

    async def schema() -> None:
        store = await open_store(StorageConfig(path))
        await store.close()

    asyncio.run(schema())
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    now = time.time()
    with db:
        for start in range(0, jobs, 100_000):
            rows = range(start + 1, min(jobs, start + 100_000) + 1)
            db.executemany("INSERT INTO events (seq, id, type, payload, accepted_at) VALUES (?, ?, ?, ?, ?)",
                           ((i, f"bench-{i}", "order.paid", PAYLOAD, now) for i in rows))
            db.executemany("INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at) "
                           "VALUES (?, ?, ?, ?, ?, ?)", ((i, i, integration, now, now, now) for i in rows))
    db.close()
    return time.monotonic() - started


def claim_cost(path: Path, integration: str, rounds: int = 200) -> float:
    """Median seconds of one claim of a page (32 jobs, 16 excluded as in flight) through the daemon's store."""
    async def measure() -> float:
        store = await open_store(StorageConfig(path))
        try:
            times = []
            in_flight = [j.id for j in await store.claim(integration, time.time(), 16)]
            for _ in range(rounds):
                t0 = time.perf_counter()
                await store.claim(integration, time.time(), 32, in_flight)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        finally:
            await store.close()

    return asyncio.run(measure())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--drain-seconds", type=float, default=20.0)
    args = parser.parse_args()
    print_header("eventrelay backlog benchmark", environment(), {"jobs": args.jobs, "drain_seconds": args.drain_seconds})

    with Receiver() as receiver:
        integration = webhook_integration(receiver.hook_url)
        small = Daemon(integrations=[integration])
        build(small.db_path, 1_000, integration["name"])
        small_claim = claim_cost(small.db_path, integration["name"])
        small.cleanup()

        daemon = Daemon(integrations=[integration], ready_timeout=60)
        db_path = daemon.db_path
        built = build(db_path, args.jobs, integration["name"])
        big_claim = claim_cost(db_path, integration["name"])
        size_mb = db_path.stat().st_size / 2**20
        print(f"built {args.jobs:,} pending jobs in {built:.1f}s ({size_mb:,.0f} MiB)", flush=True)
        try:
            daemon.start()
            ready = daemon.ready_seconds or 0.0
            before = receiver.stats()["unique"]
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.drain_seconds:
                time.sleep(0.5)
            delivered = receiver.stats()["unique"] - before
            elapsed = time.monotonic() - t0
            peak = daemon.rss().get("vmhwm", 0) / 1024  # the kernel's high-water mark: no sample can miss it
        finally:
            info = daemon.stop()
            daemon.cleanup()

    ratio = big_claim / small_claim if small_claim else float("nan")
    print()
    print(f"{'measurement':<44}{'value':>14}{'baseline':>14}  target          result")
    print("-" * 100)
    print(f"{'start-up to ready with the backlog':<44}{ready:>13.2f}s{'':>14}  < 3 s           "
          f"{'met' if ready < 3 else 'MISSED'}")
    print(f"{'RSS while draining (peak)':<44}{peak:>11.0f} MiB{'':>14}  < 150 MB        "
          f"{'met' if peak < 150 else 'MISSED'}")
    print(f"{'claim of a page, 1M backlog vs 1k (median)':<44}{big_claim * 1e6:>12.0f}us"
          f"{small_claim * 1e6:>12.0f}us  flat (ratio {ratio:.2f}) {'met' if ratio < 2 else 'MISSED'}")
    print(f"{'drain rate while measuring':<44}{delivered / elapsed:>12,.0f}/s")
    print(f"\ndaemon stopped with exit code {info.exit_code} in {info.stop_seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
