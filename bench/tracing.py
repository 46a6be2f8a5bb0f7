"""What OpenTelemetry tracing costs: the same workloads with tracing off (the baseline), on at sampling 1.0 and
on at sampling_ratio 0.1, in one invocation, the daemon a subprocess as an operator runs it.

Workloads (a fresh daemon, fresh database, for every run):

  ingest-1    HTTP ingest, 1 event per request, 32 connections (raw client), integrations: []
  ingest-100  HTTP ingest, 100 events per request, 32 connections, integrations: []
  backlog     delivery of a stored backlog of N events to a local webhook receiver (held by a rate limit
              while stored, released by a reload, measured from the SIGHUP to the last new arrival)
  latency     accept -> delivered p50/p99 of single events posted at a fixed rate, and the daemon's CPU

Modes (--modes):

  off     tracing off, the default configuration: the baseline
  on      tracing.enabled, sampling_ratio 1.0, exporting to a local OTLP/HTTP sink
  on10    tracing.enabled, sampling_ratio 0.1
  off-tp  tracing off, with the producers' traceparent headers (what passing them through costs)

In on, on10 and off-tp, half of the producers' requests carry a `traceparent` header with a fresh trace id,
its sampled flag set in the share the mode samples (all of them in `on`, one in ten in `on10`): a producer
that traces at the same rate. The sink (its own process) answers 200 to POST /v1/traces and decodes every
export with opentelemetry-proto, so the table can say how many spans arrived.

Rounds alternate the order of the modes (off, on, on10, then on10, on, off, ...) so that the host's drift
hits every mode alike. The table shows each mode's median over the rounds and the median of the per-round
ratios to the baseline (the first mode).

--compare-tree DIR (repeatable) adds another checkout's daemon with tracing off, the first one given as the
baseline (e.g. a git worktree of the commit before tracing). Each tree's daemon runs with
PYTHONPATH=DIR/daemon; the header prints which eventrelay each tree imports, and the report says whether
each mode's database had a traceparent column (only a tree with tracing has one).

    .venv/bin/python bench/tracing.py [--rounds 3] [--quick] [--modes off,on,on10] [--workloads ...]
                                      [--tree DIR] [--compare-tree DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from benchlib import (
    BUSY_OTHER_PCT,
    JSON_HEADERS,
    ROOT,
    CpuMeter,
    Daemon,
    Receiver,
    ServerChild,
    _Counters,
    _raw_request_bytes,
    _RawPoster,
    daemon_problems,
    drive_http_load,
    delivery_latency,
    environment,
    event_obj,
    free_port,
    held_webhook,
    http_body,
    http_get_json,
    http_post,
    log,
    other_cpu_pct,
    print_header,
    run_in_child,
    serve_until_stopped,
    wait_http_ok,
    webhook_integration,
)

CONNECTIONS = 32  # ingest load generator, as bench/ingest.py
CONCURRENCY = 8  # delivery.concurrency, as bench/deliver.py
PRELOAD_BATCH = 100  # backlog pre-load: enough requests that one in ten being sampled is close to 10 %
HEADER_SHARE = 0.5  # of the producers' requests that carry a traceparent, in the modes that send them
PAYLOADS = 256  # distinct pre-built requests a load generator cycles through (distinct trace ids)


@dataclass(frozen=True)
class Mode:
    key: str
    tree: Path  # the checkout whose daemon/ is run
    sampling: float | None  # None: tracing off
    header_share: float  # of requests with a traceparent header
    label: str = ""

    @property
    def sampled_share(self) -> float:
        """Of the producers' traceparents, those with the sampled flag: the mode's own ratio."""
        return 1.0 if self.sampling is None else self.sampling


def make_modes(keys: list[str], tree: Path, compare: list[Path]) -> list[Mode]:
    known = {
        "off": Mode("off", tree, None, 0.0, "tracing off"),
        "on": Mode("on", tree, 1.0, HEADER_SHARE, "on, sampling 1.0"),
        "on10": Mode("on10", tree, 0.1, HEADER_SHARE, "on, sampling 0.1"),
        "off-tp": Mode("off-tp", tree, None, HEADER_SHARE, "off, traceparent sent"),
    }
    modes = [known[k] for k in keys]
    if compare:
        here = tree_commit(tree)
        others = [Mode(f"off@{tree_commit(t)}", t, None, 0.0, f"off @{tree_commit(t)}") for t in compare]
        modes = [*others, *(replace(m, label=f"{m.label} @{here}") for m in modes)]
    return modes


# --------------------------------------------------------------------------- the daemon from a chosen tree


def tree_commit(tree: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "daemon"], cwd=tree, capture_output=True,
                               text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def tree_env(tree: Path) -> list[str]:
    """`env` before the daemon's command: its PYTHONPATH comes before the venv's editable install of this
    checkout, so the daemon and its writer process (a child with the same environment) import `tree`'s code."""
    return ["env", f"PYTHONPATH={tree / 'daemon'}"]


def imported_from(tree: Path) -> str:
    """Where `import eventrelay` resolves for a daemon started from `tree`: the same interpreter, environment
    and working directory as the daemon's command."""
    python = Daemon.command(Path("x"))[0]
    done = subprocess.run([*tree_env(tree), python, "-c", "import eventrelay; print(eventrelay.__file__)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    return (done.stdout.strip() or done.stderr.strip()[-200:])


class TreeDaemon(Daemon):
    """benchlib's Daemon, run from a chosen checkout, with a `tracing` section when the mode traces."""

    def __init__(self, mode: Mode, sink_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = mode
        if mode.sampling is not None:
            config = yaml.safe_load(self.config_path.read_text())
            config["tracing"] = {"enabled": True, "endpoint": sink_url, "sampling_ratio": mode.sampling}
            self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def command(self, config_path: Path) -> list[str]:  # type: ignore[override]
        return [*tree_env(self.mode.tree), *Daemon.command(config_path)]

    def traceparent_column(self) -> bool | None:
        """Whether the run's database has events.traceparent: which schema (which tree) really ran."""
        if self.db_path is None or not self.db_path.exists():
            return None
        with sqlite3.connect(self.db_path) as db:
            return any(row[1] == "traceparent" for row in db.execute("PRAGMA table_info(events)"))

    def queue_full_lines(self) -> int:
        """The SDK's batch processor logs a warning for every span it drops (its queue full)."""
        try:
            return self.log_path.read_text(errors="replace").count("Queue full")
        except FileNotFoundError:
            return 0


# --------------------------------------------------------------------------- the OTLP/HTTP sink


def serve_sink(port: int) -> None:
    """Child entry: an OTLP/HTTP traces endpoint that decodes each export and counts its spans by kind."""
    asyncio.run(_serve_sink(port))


async def _serve_sink(port: int) -> None:
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    kinds = {Span.SPAN_KIND_SERVER: "server", Span.SPAN_KIND_CLIENT: "client", Span.SPAN_KIND_PRODUCER: "producer"}
    stats: dict[str, Any] = {}

    def reset() -> None:
        stats.clear()
        stats.update({"requests": 0, "bytes": 0, "spans": 0, "bad": 0, "kinds": {}})

    async def traces(request: web.Request) -> web.Response:
        raw = await request.read()
        stats["requests"] += 1
        stats["bytes"] += len(raw)
        try:
            export = ExportTraceServiceRequest.FromString(raw)
        except Exception:  # noqa: BLE001 - count it, answer 200 anyway: the daemon must not retry
            stats["bad"] += 1
            return web.Response(status=200, content_type="application/x-protobuf")
        for resource_spans in export.resource_spans:
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    kind = kinds.get(span.kind, str(span.kind))
                    stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
                    stats["spans"] += 1
        return web.Response(status=200, content_type="application/x-protobuf")

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response(stats)

    async def post_reset(_: web.Request) -> web.Response:
        reset()
        return web.Response(status=204)

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    reset()
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/reset", post_reset)
    app.router.add_get("/readyz", readyz)
    await serve_until_stopped(app, port)


class Sink(ServerChild):
    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1/traces"
        super().__init__("otlp-sink", serve_sink, self.port)
        try:
            wait_http_ok(f"{self.base}/readyz", 20, self.alive)
        except BaseException:
            self.stop()
            raise

    def stats(self) -> dict[str, Any]:
        return dict(http_get_json(f"{self.base}/stats"))

    def reset(self) -> None:
        http_post(f"{self.base}/reset")


# --------------------------------------------------------------------------- producers' trace contexts


def traceparents(n: int, share: float, sampled: float, seed: int) -> list[str | None]:
    """`n` request headers: a `share` of them a fresh traceparent (sampled flag in the `sampled` share), the
    rest None, spread evenly so every connection sends both kinds."""
    rnd = random.Random(seed)
    every = round(1 / share) if share > 0 else 0
    out: list[str | None] = []
    for i in range(n):
        if every and i % every == 0:
            flags = "01" if rnd.random() < sampled else "00"
            out.append(f"00-{rnd.getrandbits(128):032x}-{rnd.getrandbits(64) or 1:016x}-{flags}")
        else:
            out.append(None)
    return out


def headers_for(traceparent: str | None) -> dict[str, str]:
    return {**JSON_HEADERS, "traceparent": traceparent} if traceparent else dict(JSON_HEADERS)


# --------------------------------------------------------------------------- ingest load (closed loop)


@dataclass
class IngestSpec:
    url: str
    batch: int
    warmup: float
    seconds: float
    server_pid: int
    header_share: float
    sampled_share: float
    connections: int = CONNECTIONS
    max_requests: int = 5_000_000
    request_timeout: float = 30.0
    validate_every: int = 64


class _CyclingPoster(_RawPoster):
    """benchlib's raw HTTP/1.1 client, sending the next of several pre-built requests each time."""

    def __init__(self, url: str, payloads: list[bytes], start: int, timeout: float) -> None:
        super().__init__(url, b"", timeout)
        self.payloads, self.next = payloads, start

    async def post(self) -> tuple[int, bytes]:
        self.payload = self.payloads[self.next % len(self.payloads)]
        self.next += 1
        return await super().post()


def ingest_load(spec: IngestSpec) -> dict[str, Any]:
    """Child entry: `connections` workers posting back to back; what bench/ingest.py's raw client does, with
    the producers' traceparent headers on a share of the requests."""
    return asyncio.run(_ingest_load(spec))


async def _ingest_load(spec: IngestSpec) -> dict[str, Any]:
    body = http_body(spec.batch)
    contexts = traceparents(PAYLOADS, spec.header_share, spec.sampled_share, seed=spec.batch)
    payloads = [_raw_request_bytes(spec.url, body, {"traceparent": tp} if tp else None)[2] for tp in contexts]
    c = _Counters()
    cpu: dict[str, float | None] = {"client_cpu_pct": None, "server_cpu_pct": None, "other_cpu_pct": None}
    posters = [_CyclingPoster(spec.url, payloads, k * 7, spec.request_timeout) for k in range(spec.connections)]
    try:
        await drive_http_load(spec, posters, c, cpu)
    finally:
        for p in posters:
            await p.close()
    result = c.result(spec.seconds, spec.server_pid, cpu, {"body_bytes": len(body)})
    return {"rate": result.events_per_s, "requests": c.total_requests, "events": result.events,
            "latency": result.latency, "errors": result.errors, "error_samples": result.error_samples,
            "server_cpu_pct": result.server_cpu_pct, "client_cpu_pct": result.client_cpu_pct,
            "other_cpu_pct": result.other_cpu_pct}


# --------------------------------------------------------------------------- pre-load and paced producers


def preload_traced(events_url: str, n: int, batch: int, timeout: float, share: float, sampled: float
                   ) -> dict[str, Any]:
    """Child entry: post `n` events in batches of `batch`, a share of the requests with a traceparent."""
    return asyncio.run(_preload_traced(events_url, n, batch, timeout, share, sampled))


async def _preload_traced(events_url: str, n: int, batch: int, timeout: float, share: float, sampled: float
                          ) -> dict[str, Any]:
    import aiohttp

    bodies = [json.dumps([event_obj(s + k) for k in range(min(batch, n - s))]).encode() for s in range(0, n, batch)]
    contexts = traceparents(len(bodies), share, sampled, seed=n)
    out: dict[str, Any] = {"accepted": 0, "errors": []}
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for body, tp in zip(bodies, contexts):
            if time.monotonic() >= deadline:
                out["errors"].append("pre-load deadline reached")
                break
            try:
                async with session.post(events_url, data=body, headers=headers_for(tp)) as resp:
                    raw, status = await resp.read(), resp.status
            except Exception as exc:  # noqa: BLE001
                out["errors"].append(repr(exc))
                continue
            if status != 202:
                out["errors"].append(f"HTTP {status}: {raw[:200]!r}")
                continue
            out["accepted"] += len(json.loads(raw)["data"])
    out["errors"] = out["errors"][:5]
    return out


def paced_traced(events_url: str, rate: float, warmup: float, seconds: float, max_inflight: int, share: float,
                 sampled: float) -> dict[str, Any]:
    """Child entry: benchlib.paced()'s open loop (single events with bench-chosen ids at `rate`/s), a share of
    the requests with a traceparent."""
    return asyncio.run(_paced_traced(events_url, rate, warmup, seconds, max_inflight, share, sampled))


async def _paced_traced(events_url: str, rate: float, warmup: float, seconds: float, max_inflight: int,
                        share: float, sampled: float) -> dict[str, Any]:
    import aiohttp

    n_warm = int(rate * warmup)
    n_total = n_warm + int(rate * seconds)
    ids = [str(uuid.uuid4()) for _ in range(n_total)]
    bodies = [json.dumps(event_obj(i, ids[i])).encode() for i in range(n_total)]
    headers = [headers_for(tp) for tp in traceparents(n_total, share, sampled, seed=n_total)]
    records: dict[str, tuple[float, float]] = {}
    errors: list[str] = []
    state = {"max_lag": 0.0}
    inflight = asyncio.Semaphore(max_inflight)

    async def send(session: aiohttp.ClientSession, i: int) -> None:
        async with inflight:
            t_send = time.monotonic()
            try:
                async with session.post(events_url, data=bodies[i], headers=headers[i]) as resp:
                    raw, status = await resp.read(), resp.status
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
                return
            t_acc = time.monotonic()
        if status != 202:
            errors.append(f"HTTP {status}: {raw[:200]!r}")
        elif i >= n_warm:
            records[ids[i]] = (t_send, t_acc)

    connector = aiohttp.TCPConnector(limit=max_inflight)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks = []
        t0 = time.monotonic()
        for i in range(n_total):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                state["max_lag"] = max(state["max_lag"], -delay)
            tasks.append(asyncio.create_task(send(session, i)))
        t_paced_end = time.monotonic()
        await asyncio.wait(tasks, timeout=60)
    return {"records": records, "measured_ids": ids[n_warm:], "errors": errors[:5], "error_count": len(errors),
            "max_schedule_lag_ms": state["max_lag"] * 1e3, "achieved_rate": n_total / max(t_paced_end - t0, 1e-9),
            "client_cpu_s": time.process_time()}


# --------------------------------------------------------------------------- runs


@dataclass
class Bench:
    args: argparse.Namespace
    receiver: Receiver
    sink: Sink
    schema_seen: dict[str, bool | None] = field(default_factory=dict)  # mode key -> traceparent column

    def daemon(self, mode: Mode, integrations: list[dict[str, Any]]) -> TreeDaemon:
        return TreeDaemon(mode, self.sink.url, synchronous="full", integrations=integrations,
                          concurrency=CONCURRENCY)

    def finish(self, d: TreeDaemon, out: dict[str, Any]) -> dict[str, Any]:
        """Stop the daemon (its last spans are exported at the stop), then read what it left behind."""
        d.stop()
        self.schema_seen.setdefault(d.mode.key, d.traceparent_column())
        out["daemon_notes"] = daemon_problems(d, lambda line: "Queue full" in line)  # counted apart
        out["spans_dropped_lines"] = d.queue_full_lines()
        out["spans"] = self.sink.stats()
        return out

    def ingest(self, mode: Mode, batch: int) -> dict[str, Any]:
        self.sink.reset()
        with self.daemon(mode, []) as d:
            spec = IngestSpec(d.events_url, batch, self.args.warmup, self.args.seconds, d.pid, mode.header_share,
                              mode.sampled_share)
            out = run_in_child(ingest_load, spec, timeout=self.args.warmup + self.args.seconds + 60)
            out["cpu_ms_per_1k"] = (out["server_cpu_pct"] * 10 * self.args.seconds / out["events"] * 1000
                                    if out["events"] and out["server_cpu_pct"] is not None else None)
            return self.finish(d, out)

    def backlog(self, mode: Mode) -> dict[str, Any]:
        """bench/deliver.py's stored backlog (benchlib.release_backlog), with the producers' headers."""
        a, receiver = self.args, self.receiver
        receiver.reset()
        self.sink.reset()
        with self.daemon(mode, [held_webhook(receiver.hook_url)]) as d:
            out: dict[str, Any] = {"load": run_in_child(preload_traced, d.events_url, a.events, PRELOAD_BATCH,
                                                        a.timeout, mode.header_share, mode.sampled_share,
                                                        timeout=a.timeout + 30)}
            config = yaml.safe_load(d.config_path.read_text())
            for integration in config["integrations"]:
                integration.pop("delivery", None)
            d.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            time.sleep(1.2)  # a delivery the rate limit let through just now has finished
            # No reset of the receiver here: a delivery the rate limit lets through between reading the count
            # and a reset would be counted nowhere, and the run would wait for it until --timeout.
            before = receiver.stats()["unique"]
            machine, d_meter, r_meter = CpuMeter(None), CpuMeter(d.pid), CpuMeter(receiver.pid)
            t_release = time.monotonic()
            os.kill(d.pid, signal.SIGHUP)
            st = receiver.wait_unique(a.events, timeout=a.timeout)
            d_cpu, r_cpu = d_meter.seconds(), r_meter.seconds()
            out["other_cpu_pct"] = other_cpu_pct(machine, [d_cpu, r_cpu])
            out["delivered"], out["expected"] = st["unique"] - before, a.events - before
            out["receiver"] = st
            if st["unique"] >= a.events and st["t_last_new"] is not None:
                out["seconds"] = st["t_last_new"] - t_release
                out["rate"] = out["delivered"] / out["seconds"]
                out["cpu_ms_per_1k"] = d_cpu / out["delivered"] * 1e6 if d_cpu is not None else None
            return self.finish(d, out)

    def latency(self, mode: Mode) -> dict[str, Any]:
        a, receiver = self.args, self.receiver
        receiver.reset()
        self.sink.reset()
        with self.daemon(mode, [webhook_integration(receiver.hook_url)]) as d:
            machine, d_meter, r_meter = CpuMeter(None), CpuMeter(d.pid), CpuMeter(receiver.pid)
            res = run_in_child(paced_traced, d.events_url, a.rate, a.lat_warmup, a.lat_seconds, 64,
                               mode.header_share, mode.sampled_share, timeout=a.lat_warmup + a.lat_seconds + 90)
            out: dict[str, Any] = {"daemon_cpu_pct": d_meter.percent()}
            out["other_cpu_pct"] = other_cpu_pct(machine, [d_meter.seconds(), r_meter.seconds(), res["client_cpu_s"]])
            expected = int(a.rate * a.lat_warmup) + int(a.rate * a.lat_seconds)
            receiver.wait_unique(expected, timeout=15)
            out.update(delivery_latency(res, receiver.arrivals()), client_errors=res["error_count"],
                       client_error_samples=res["errors"], achieved_rate=res["achieved_rate"])
            a2d = out["accept_to_delivered"]
            out["p50_ms"], out["p99_ms"] = (a2d["p50_ms"], a2d["p99_ms"]) if a2d["n"] else (None, None)
            return self.finish(d, out)


WORKLOADS = ("ingest-1", "ingest-100", "backlog", "latency")


def run_one(bench: Bench, workload: str, mode: Mode) -> dict[str, Any] | str:
    try:
        if workload == "ingest-1":
            return bench.ingest(mode, 1)
        if workload == "ingest-100":
            return bench.ingest(mode, 100)
        if workload == "backlog":
            return bench.backlog(mode)
        return bench.latency(mode)
    except Exception as exc:  # noqa: BLE001 - report, then go on with the other runs
        return f"failed: {exc}"


# --------------------------------------------------------------------------- report


# (workload, key in the run's result, row title, format)
ROWS = (
    ("ingest-1", "rate", "ingest, 1 ev/req x32: events/s", "{:,.0f}"),
    ("ingest-1", "cpu_ms_per_1k", "  daemon CPU ms per 1,000 events", "{:.0f}"),
    ("ingest-100", "rate", "ingest, 100 ev/req x32: events/s", "{:,.0f}"),
    ("ingest-100", "cpu_ms_per_1k", "  daemon CPU ms per 1,000 events", "{:.0f}"),
    ("backlog", "rate", "stored backlog: deliveries/s", "{:,.0f}"),
    ("backlog", "cpu_ms_per_1k", "  daemon CPU ms per 1,000 deliveries", "{:.0f}"),
    ("latency", "p50_ms", "accept->delivered p50 ms", "{:.2f}"),
    ("latency", "p99_ms", "accept->delivered p99 ms", "{:.2f}"),
    ("latency", "daemon_cpu_pct", "  daemon CPU % at the fixed rate", "{:.0f}"),
)


def value(run: dict[str, Any] | str | None, key: str) -> float | None:
    v = run.get(key) if isinstance(run, dict) else None
    return float(v) if isinstance(v, (int, float)) else None


def median_or_none(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def summarize(results: dict[tuple[str, str], list[dict[str, Any] | str]], modes: list[Mode], workload: str,
              key: str) -> dict[str, Any]:
    """Per mode: the median value over the rounds, the median of the per-round ratios to the baseline, and
    every round's value."""
    base_runs = results.get((workload, modes[0].key), [])
    out: dict[str, Any] = {}
    for m in modes:
        runs = results.get((workload, m.key), [])
        vals = [value(r, key) for r in runs]
        ratios = [v / b if v is not None and b else None for v, b in zip(vals, (value(r, key) for r in base_runs))]
        out[m.key] = {"median": median_or_none(vals), "ratio": median_or_none(ratios), "rounds": vals,
                      "ratios": ratios}
    return out


def fmt(v: float | None, pattern: str) -> str:
    return pattern.format(v) if v is not None else "n/a"


def print_table(results: dict[tuple[str, str], list[dict[str, Any] | str]], modes: list[Mode],
                workloads: list[str]) -> None:
    head = f"{'median of the rounds':<38}" + "".join(
        f"{m.label[:22]:>24}" + ("" if i == 0 else f"{'ratio':>10}") for i, m in enumerate(modes))
    print(head)
    print("-" * len(head))
    for workload, key, title, pattern in ROWS:
        if workload not in workloads:
            continue
        s = summarize(results, modes, workload, key)
        line = f"{title:<38}"
        for i, m in enumerate(modes):
            line += f"{fmt(s[m.key]['median'], pattern):>24}"
            if i:
                line += f"{fmt(s[m.key]['ratio'], '{:.1%}'):>10}"
        print(line)
    print()
    print("ratio: median of the per-round ratios to the first column (rates: above 100 % is faster; latency and")
    print("CPU: above 100 % is more)")
    print()


def print_rounds(results: dict[tuple[str, str], list[dict[str, Any] | str]], modes: list[Mode],
                 workloads: list[str]) -> None:
    print("every round (" + " / ".join(m.key for m in modes) + "):")
    for workload, key, title, pattern in ROWS:
        if workload not in workloads:
            continue
        s = summarize(results, modes, workload, key)
        n = max(len(s[m.key]["rounds"]) for m in modes)
        cells = [" / ".join(fmt(s[m.key]["rounds"][r] if r < len(s[m.key]["rounds"]) else None, pattern)
                            for m in modes) for r in range(n)]
        print(f"  {title.strip():<38} " + "; ".join(cells))
    print()


def print_details(results: dict[tuple[str, str], list[dict[str, Any] | str]], modes: list[Mode],
                  workloads: list[str]) -> None:
    print("spans received by the sink per run (median; server = ingest requests, client = delivery attempts),")
    print("and runs whose daemon logged the SDK's 'Queue full, dropping' (spans dropped, never events):")
    for workload in workloads:
        for m in modes:
            runs = [r for r in results.get((workload, m.key), []) if isinstance(r, dict)]
            if not runs or m.sampling is None:
                continue
            spans = median_or_none([r["spans"]["spans"] for r in runs])
            server = median_or_none([r["spans"]["kinds"].get("server", 0) for r in runs])
            client = median_or_none([r["spans"]["kinds"].get("client", 0) for r in runs])
            dropped = [r["spans_dropped_lines"] for r in runs]
            extra = ""
            if workload.startswith("ingest"):
                reqs = median_or_none([r["requests"] for r in runs])
                extra = f" of {reqs:,.0f} requests" if reqs else ""
            print(f"  {workload:<10} {m.key:<6} spans {fmt(spans, '{:,.0f}')} (server {fmt(server, '{:,.0f}')}"
                  f"{extra}, client {fmt(client, '{:,.0f}')}); 'Queue full' lines per run: {dropped}")
    print()
    busy, problems = [], []
    for (workload, key), runs in results.items():
        for n, r in enumerate(runs, 1):
            if isinstance(r, str):
                problems.append(f"{workload} {key} round {n}: {r[:400]}")
                continue
            if (r.get("other_cpu_pct") or 0) > BUSY_OTHER_PCT:
                busy.append(f"{workload}/{key}/{n} {r['other_cpu_pct']:.0f}%")
            for note in r.get("daemon_notes", []):
                problems.append(f"{workload} {key} round {n}: daemon: {note[:300]}")
            if r.get("errors") or r.get("client_errors"):
                problems.append(f"{workload} {key} round {n}: client errors {r.get('errors') or r.get('client_errors')}"
                                f", e.g. {(r.get('error_samples') or r.get('client_error_samples'))[:2]}")
            if r.get("expected") is not None and r.get("delivered", 0) < r["expected"]:
                rs = r.get("receiver", {})
                problems.append(f"{workload} {key} round {n}: {r['delivered']} of {r['expected']} delivered within "
                                f"--timeout (receiver: posts {rs.get('posts')}, retries {rs.get('retries')}, "
                                f"duplicates {rs.get('duplicates')}); pre-load {r['load']}")
            if r.get("missing"):
                problems.append(f"{workload} {key} round {n}: {r['missing']} accepted events never delivered")
    if busy:
        print(f"WARNING: {len(busy)} run(s) shared the machine with other work (other cpu > {BUSY_OTHER_PCT:.0f}%):"
              f" {', '.join(busy[:12])}{' ...' if len(busy) > 12 else ''}")
    for p in problems[:20]:
        print(p)
    if busy or problems:
        print()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each running every mode once (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 round, shorter windows, a smaller backlog (~2 min)")
    ap.add_argument("--modes", default="off,on,on10", help="comma-separated: off, on, on10, off-tp; the first is "
                    "the baseline (default off,on,on10)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured window of each ingest run (default 4)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured warm-up of each ingest run (default 1)")
    ap.add_argument("--events", type=int, default=10_000, help="stored backlog size (default 10000)")
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s of the latency run (default 1000)")
    ap.add_argument("--lat-seconds", type=float, default=4.0, help="measured seconds of the latency run (default 4)")
    ap.add_argument("--lat-warmup", type=float, default=1.0, help="warm-up of the latency run (default 1)")
    ap.add_argument("--timeout", type=float, default=40.0, help="max seconds of a pre-load or a drain (default 40)")
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose daemon/ is measured (default: this one)")
    ap.add_argument("--compare-tree", type=Path, action="append", default=[],
                    help="another checkout (e.g. a worktree of the commit before tracing) run with tracing off; "
                    "the first one given is the baseline, first column (repeatable)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.events, args.lat_seconds = 1, 2.0, 0.5, 3000, 2.0
    modes, workloads = args.modes.split(","), args.workloads.split(",")
    if not set(modes) <= {"off", "on", "on10", "off-tp"} or len(set(modes)) != len(modes):
        ap.error("--modes: distinct names among off, on, on10, off-tp")
    if not set(workloads) <= set(WORKLOADS):
        ap.error(f"--workloads: names among {', '.join(WORKLOADS)}")
    if not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 60 or not 0 < args.events <= 200_000 \
            or not 0 < args.rate <= 20_000 or not 0 < args.lat_seconds <= 60:
        ap.error("bounds: 1 <= --rounds <= 20, 0 < --seconds <= 60, 0 < --events <= 200000, 0 < --rate <= 20000")
    for tree in (args.tree, *args.compare_tree):
        if not (tree / "daemon" / "eventrelay" / "__init__.py").exists():
            ap.error(f"{tree} has no daemon/eventrelay: give the root of an eventrelay checkout")
    args.mode_keys, args.workload_keys = modes, [w for w in WORKLOADS if w in workloads]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tree, compare = args.tree.resolve(), [t.resolve() for t in args.compare_tree]
    modes = make_modes(args.mode_keys, tree, compare)
    env = environment()
    settings = {"rounds": args.rounds, "modes": ",".join(m.key for m in modes), "workloads": ",".join(args.workload_keys),
                "seconds": args.seconds, "warmup": args.warmup, "events": args.events, "rate": args.rate,
                "lat_seconds": args.lat_seconds, "connections": CONNECTIONS, "concurrency": CONCURRENCY,
                "header_share": HEADER_SHARE}
    trees = {str(t): {"commit": tree_commit(t), "imports": imported_from(t)} for t in {m.tree for m in modes}}
    if not args.json:
        print_header("eventrelay tracing cost benchmark", env, settings)
        for t, info in trees.items():
            print(f"tree {t} at {info['commit']}: the daemon imports {info['imports']}")
        print(flush=True)

    results: dict[tuple[str, str], list[dict[str, Any] | str]] = {}
    loads: list[float] = []
    with Receiver() as receiver, Sink() as sink:
        bench = Bench(args, receiver, sink)
        for n in range(1, args.rounds + 1):
            order = modes if n % 2 else modes[::-1]  # alternate the order: linear drift hits every mode alike
            loads.append(os.getloadavg()[0])
            for workload in args.workload_keys:
                for m in order:
                    log(f"round {n}/{args.rounds}: {workload} {m.key} ({m.label}) ...")
                    results.setdefault((workload, m.key), []).append(run_one(bench, workload, m))
        schema = dict(bench.schema_seen)
    if args.json:
        doc = {"benchmark": "tracing", "env": env, "settings": settings, "trees": trees, "schema_traceparent": schema,
               "loadavg_1m_per_round": loads,
               "modes": [{"key": m.key, "label": m.label, "tree": str(m.tree), "sampling": m.sampling,
                          "header_share": m.header_share} for m in modes],
               "summary": {f"{w}:{k}": summarize(results, modes, w, k) for w, k, _, _ in ROWS
                           if w in args.workload_keys},
               "runs": {f"{w}:{k}": [_slim(r) for r in runs] for (w, k), runs in results.items()}}
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(f"loadavg(1m) at the start of each round: {', '.join(f'{x:.2f}' for x in loads)}")
        print("events.traceparent column in each mode's database (which schema ran): " +
              ", ".join(f"{k} {'yes' if v else 'no' if v is not None else '?'}" for k, v in schema.items()))
        print()
        print_table(results, modes, args.workload_keys)
        print_rounds(results, modes, args.workload_keys)
        print_details(results, modes, args.workload_keys)
    failed = any(isinstance(r, str) for runs in results.values() for r in runs)
    return 1 if failed else 0


def _slim(run: dict[str, Any] | str) -> dict[str, Any] | str:
    """A run's result without the per-event records (large, and already summarized)."""
    if isinstance(run, str):
        return run
    return {k: v for k, v in run.items() if k not in ("records", "measured_ids")}


if __name__ == "__main__":
    sys.exit(main())
