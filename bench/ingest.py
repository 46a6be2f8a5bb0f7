"""Ingest throughput and latency of eventrelay, against a bare-handler baseline.

Scenarios (each run for a fixed window after a short warm-up, load generator in its
own process):

  (a) HTTP, 1 event per request, 32 connections      target >= 75% of the bare handler
  (b) HTTP, 100 events per request, 32 connections   target >= 50,000 events/s
  (c) Unix socket NDJSON, 4 connections pipelining
      with a window of 1000 unanswered lines each     target >= 40,000 events/s

The baseline is a bare aiohttp app (and a bare asyncio NDJSON socket server) in a
separate process that parses every event and answers in the contract's shape without
storing anything: the floor cost of "an asyncio JSON API" on this machine.  It is hit
by the same load generator with the same settings, in the same invocation, so the
ratio is meaningful even though absolute numbers vary between machines.

Each daemon scenario gets a fresh daemon (fresh database, integrations: [] unless
--with-hook) so one scenario's database growth does not slow the next; baseline and
daemon runs alternate per scenario so drifting background load hits both alike.

A second table shows where the CPU went (server, load generator, everything else): a
load generator near 100% means the run measured the client, and "other" above 25%
means something outside the benchmark competed for the two cores.  With the default
aiohttp client, scenario (a)'s bare baseline is usually client-bound on 2 cores;
--client raw swaps in a minimal HTTP/1.1 client that is not.

    .venv/bin/python bench/ingest.py [--seconds 8] [--synchronous full|normal] [--rounds 1]
                                     [--client aiohttp|raw] [--scenarios abc] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import uuid
from typing import Any

from benchlib import (
    INGEST_SCENARIOS as SCENARIOS,
    run_on_daemon_loop,
    BUSY_OTHER_PCT,
    Daemon,
    IngestScenario as Scenario,
    LoadResult,
    Receiver,
    ServerChild,
    daemon_problems,
    environment,
    free_port,
    install_stop_signals,
    log,
    lower_median,
    print_header,
    run_ingest_load as run_load,
    wait_http_ok,
    webhook_integration,
)


# --------------------------------------------------------------------------- bare baseline


def serve_bare(port: int, socket_path: str) -> None:
    """Child entry: the bare baseline (HTTP on `port`, NDJSON on `socket_path`)."""
    run_on_daemon_loop(_serve_bare(port, socket_path))


async def _serve_bare(port: int, socket_path: str) -> None:
    from aiohttp import web

    async def ingest(request: web.Request) -> web.Response:
        # Parse the whole body and answer in the contract's shape (one entry per event
        # with an id): that work is unavoidable for the daemon too.  No storage.
        doc = json.loads(await request.read())
        items = doc if isinstance(doc, list) else [doc]
        data = [{"id": ev.get("id") or uuid.uuid4().hex, "jobs": 0, "duplicate": False} for ev in items]
        return web.json_response({"data": data}, status=202)

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ndjson(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Chunked reads + one write per chunk: the cheapest correct way to serve a
        # pipelined line protocol in asyncio.
        buf = b""
        try:
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    break
                lines = (buf + data).split(b"\n")
                buf = lines.pop()
                out = []
                for line in lines:
                    ev = json.loads(line)
                    out.append(
                        json.dumps({"id": ev.get("id") or uuid.uuid4().hex, "ok": True, "jobs": 0, "duplicate": False})
                    )
                if out:
                    writer.write(("\n".join(out) + "\n").encode())
                    await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/v1/events", ingest)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    sock_server = await asyncio.start_unix_server(ndjson, path=socket_path, limit=1 << 22)
    stop = asyncio.Event()
    install_stop_signals(stop)
    await stop.wait()
    sock_server.close()
    await runner.cleanup()


# --------------------------------------------------------------------------- running


class BareServer(ServerChild):
    """The bare baseline in its own process, on a free port and a private socket path."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="erbench-bare-")
        self.port = free_port()
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.socket_path = f"{self._tmp.name}/bare.sock"
        super().__init__("bare", serve_bare, self.port, self.socket_path)
        try:
            wait_http_ok(f"{self.http_url}/readyz", 20, self.alive)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        self._tmp.cleanup()


def run_baseline(sc: Scenario, bare: BareServer, args: argparse.Namespace) -> LoadResult | str:
    log(f"bare       {sc.title} ...")
    try:
        return run_load(sc, bare.http_url, bare.socket_path, bare.pid, args)
    except Exception as exc:  # noqa: BLE001 - report and go on
        return f"baseline failed: {exc}"


def run_daemon(sc: Scenario, args: argparse.Namespace, hook_url: str | None) -> tuple[LoadResult | str, list[str]]:
    integrations = [webhook_integration(hook_url)] if hook_url else []
    log(f"eventrelay {sc.title} ...")
    daemon = Daemon(synchronous=args.synchronous, integrations=integrations)
    try:
        daemon.start()
    except Exception as exc:  # noqa: BLE001
        daemon.cleanup()
        return f"daemon failed to start: {exc}", []
    try:
        result: LoadResult | str = run_load(sc, daemon.http_url, daemon.socket_path, daemon.pid, args)
    except Exception as exc:  # noqa: BLE001
        result = f"load failed: {exc}"
    finally:
        daemon.stop()
    notes = daemon_problems(daemon)
    if isinstance(result, str) or result.errors:
        notes.append("daemon log tail: " + daemon.log_tail(8).replace("\n", " | ")[:800])
    daemon.cleanup()
    return result, notes


# --------------------------------------------------------------------------- output


def fmt_rate(r: LoadResult | str | None) -> str:
    return f"{r.events_per_s:,.0f}" if isinstance(r, LoadResult) else "n/a"


def fmt_ms(r: LoadResult | str | None, key: str) -> str:
    return f"{r.latency[key]:.2f}" if isinstance(r, LoadResult) and r.latency["n"] else "n/a"


def fmt_pct(v: float | None) -> str:
    return f"{v:.0f}%" if v is not None else "n/a"


def build_rows(scenarios: list[Scenario], base: dict[str, Any], dmn: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for sc in scenarios:
        b, d = base.get(sc.key), dmn.get(sc.key)
        ratio = None
        if isinstance(b, LoadResult) and isinstance(d, LoadResult) and b.events_per_s > 0:
            ratio = d.events_per_s / b.events_per_s
        met: bool | None
        if d is None:  # --baseline-only
            met = None
        else:
            # Failed requests never count as met, however fast the successful ones were.
            met = sc.met(d.events_per_s, ratio) and d.errors == 0 if isinstance(d, LoadResult) else False
        # A saturated load generator caps the baseline: the ratio is then an upper bound.
        client_bound = isinstance(b, LoadResult) and (b.client_cpu_pct or 0) >= 90
        rows.append({"scenario": sc, "baseline": b, "daemon": d, "ratio": ratio, "met": met, "client_bound": client_bound})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'scenario':<36} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'bare ev/s':>10} {'ratio':>6}  {'target':<18} {'result':<6}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        sc, b, d = row["scenario"], row["baseline"], row["daemon"]
        ratio = f"{row['ratio']:.0%}" if row["ratio"] is not None else "n/a"
        result = {True: "MET", False: "MISSED", None: "n/a"}[row["met"]]
        print(
            f"{sc.title:<36} {fmt_rate(d):>10} {fmt_ms(d, 'p50_ms'):>8} {fmt_ms(d, 'p99_ms'):>8} "
            f"{fmt_rate(b):>10} {ratio:>6}  {sc.target_text():<18} {result:<6}"
        )
    print()
    # Where the CPU went (100% = one core): tells a daemon bottleneck from a load-generator
    # bottleneck, and "other" shows work from outside the benchmark skewing the run.
    head2 = (
        f"{'run':<48} {'server cpu':>10} {'client cpu':>10} {'other cpu':>9} "
        f"{'server rss MiB':>15} {'p50/p99 ms':>14} {'errors':>6}"
    )
    print(head2)
    print("-" * len(head2))
    for row in rows:
        sc = row["scenario"]
        for label, r in (("eventrelay", row["daemon"]), ("bare", row["baseline"])):
            if not isinstance(r, LoadResult):
                continue
            rss = f"{r.server_rss_kib.get('vmrss', 0) / 1024:.0f} (peak {r.server_rss_kib.get('vmhwm', 0) / 1024:.0f})"
            lat = f"{fmt_ms(r, 'p50_ms')}/{fmt_ms(r, 'p99_ms')}"
            print(
                f"{sc.title + ' ' + label:<48} {fmt_pct(r.server_cpu_pct):>10} {fmt_pct(r.client_cpu_pct):>10} "
                f"{fmt_pct(r.other_cpu_pct):>9} {rss:>15} {lat:>14} {r.errors:>6}"
            )
    print()
    busy = [
        r
        for row in rows
        for r in (row["daemon"], row["baseline"])
        if isinstance(r, LoadResult) and (r.other_cpu_pct or 0) > BUSY_OTHER_PCT
    ]
    if busy:
        print(
            f"WARNING: {len(busy)} run(s) shared the machine with other work (other cpu > {BUSY_OTHER_PCT:.0f}%); "
            "their numbers are low and noisy, rerun on a quiet machine"
        )
    for row in rows:
        sc, b, d = row["scenario"], row["baseline"], row["daemon"]
        for label, r in (("eventrelay", d), ("bare", b)):
            if isinstance(r, str):
                print(f"{sc.title}: {label}: {r}")
            elif isinstance(r, LoadResult) and r.errors:
                print(f"{sc.title}: {label}: {r.errors} errors, e.g. {r.error_samples[:2]}")
        if row["client_bound"]:
            print(
                f"{sc.title}: note: the load generator was CPU-bound on the baseline "
                "(>= 90% of a core), so 'bare ev/s' is a lower bound and the ratio an upper bound; "
                "rerun with --client raw for a tighter baseline"
            )


def _rate(r: LoadResult | str | None) -> float | None:
    return r.events_per_s if isinstance(r, LoadResult) else None


def round_summary(b: LoadResult | str, d: LoadResult | str | None) -> dict[str, Any]:
    rb, rd = _rate(b), _rate(d)
    return {"bare_events_per_s": rb, "events_per_s": rd, "ratio": rd / rb if rb and rd is not None else None}


def median_round(pairs: list[tuple[LoadResult | str, LoadResult | str | None]]
                 ) -> tuple[LoadResult | str, LoadResult | str | None]:
    """The round with the median ratio (without daemon runs: the median baseline rate)."""
    def key(pair: tuple[LoadResult | str, LoadResult | str | None]) -> float | None:
        summary = round_summary(*pair)
        return summary["ratio"] if pair[1] is not None else summary["bare_events_per_s"]

    return lower_median(pairs, key)


def print_rounds(scenarios: list[Scenario], rounds: dict[str, list[tuple[LoadResult | str, LoadResult | str | None]]]
                 ) -> None:
    for sc in scenarios:
        pairs = rounds.get(sc.key, [])
        if len(pairs) < 2:
            continue
        parts = []
        for b, d in pairs:
            summary = round_summary(b, d)
            ratio = f" {summary['ratio']:.0%}" if summary["ratio"] is not None else ""
            parts.append(f"{fmt_rate(d)} / {fmt_rate(b)}{ratio}")
        print(f"{sc.title}: {len(pairs)} rounds (eventrelay / bare ev/s, ratio): " + "; ".join(parts))
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per run (default 8)")
    ap.add_argument("--warmup", type=float, default=1.5, help="unmeasured warm-up per run (default 1.5)")
    ap.add_argument("--synchronous", choices=("full", "normal"), default="full", help="storage.synchronous")
    ap.add_argument("--scenarios", default="abc", help="subset of scenarios to run, e.g. 'ac' (default abc)")
    ap.add_argument(
        "--with-hook",
        action="store_true",
        help="configure one webhook integration (to a local 204 receiver) so every event also creates "
        "a job and is delivered while ingesting; default: integrations: [] (pure ingest)",
    )
    ap.add_argument(
        "--client",
        choices=("aiohttp", "raw"),
        default="aiohttp",
        help="HTTP load-generator client: aiohttp's ClientSession (default) or a minimal raw HTTP/1.1 "
        "keep-alive client that needs far less CPU per request (use it when the table says the "
        "load generator was CPU-bound)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="baseline/daemon pairs per scenario, alternating; the table shows the round with the median "
        "ratio (or rate) and lists every round's: this machine's speed drifts by tens of percent within minutes",
    )
    ap.add_argument("--baseline-only", action="store_true", help="run only the bare baseline")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= 60 or not 0 <= args.warmup <= 30 or not 1 <= args.rounds <= 20:
        ap.error("--seconds must be in (0, 60], --warmup in [0, 30] and --rounds in [1, 20]")
    unknown = set(args.scenarios) - {s.key for s in SCENARIOS}
    if unknown:
        ap.error(f"unknown scenario(s): {''.join(sorted(unknown))}")
    scenarios = [s for s in SCENARIOS if s.key in args.scenarios]

    env = environment()
    settings = {
        "seconds": args.seconds,
        "warmup": args.warmup,
        "synchronous": args.synchronous,
        "client": args.client,
        "rounds": args.rounds,
        "integrations": "webhook->local receiver" if args.with_hook else "none",
    }
    if not args.json:
        print_header("eventrelay ingest benchmark", env, settings)

    base: dict[str, LoadResult | str] = {}
    dmn: dict[str, LoadResult | str] = {}
    notes: dict[str, list[str]] = {}
    rounds: dict[str, list[tuple[LoadResult | str, LoadResult | str | None]]] = {}
    receiver_stats: dict[str, Any] | None = None
    receiver = Receiver() if args.with_hook and not args.baseline_only else None
    try:
        with BareServer() as bare:
            # Baseline and daemon alternate per scenario, so a change in background load
            # during the run hits both sides of each ratio alike.
            for sc in scenarios:
                pairs: list[tuple[LoadResult | str, LoadResult | str | None]] = []
                for _ in range(args.rounds):
                    b = run_baseline(sc, bare, args)
                    d: LoadResult | str | None = None
                    if not args.baseline_only:
                        d, notes[sc.key] = run_daemon(sc, args, receiver.hook_url if receiver else None)
                    pairs.append((b, d))
                base[sc.key], median_d = median_round(pairs)
                if median_d is not None:
                    dmn[sc.key] = median_d
                rounds[sc.key] = pairs
        receiver_stats = receiver.stats() if receiver else None
    finally:
        if receiver:
            receiver.stop()

    rows = build_rows(scenarios, base, dmn)
    if args.json:
        doc = {
            "benchmark": "ingest",
            "env": env,
            "settings": settings,
            "scenarios": [
                {
                    "key": r["scenario"].key,
                    "title": r["scenario"].title,
                    "target": r["scenario"].target_text(),
                    "met": r["met"],
                    "ratio": r["ratio"],
                    "client_bound_baseline": r["client_bound"],
                    "daemon": r["daemon"].to_dict() if isinstance(r["daemon"], LoadResult) else r["daemon"],
                    "baseline": r["baseline"].to_dict() if isinstance(r["baseline"], LoadResult) else r["baseline"],
                    "daemon_notes": notes.get(r["scenario"].key, []),
                    "rounds": [round_summary(b, d) for b, d in rounds.get(r["scenario"].key, [])],
                }
                for r in rows
            ],
            "receiver": receiver_stats,
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_table(rows)
        print_rounds(scenarios, rounds)
        for key, ns in notes.items():
            for n in ns:
                print(f"daemon ({key}): {n}")
        if receiver_stats:
            print(f"receiver (--with-hook): {receiver_stats}")
    failed = any(isinstance(v, str) for pairs in rounds.values() for pair in pairs for v in pair)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
