"""SQS and STOMP delivery throughput of eventrelay, each beside a raw client loop on the same broker.

Two targets, each measured with and without the daemon in one invocation, on one local service:

  SQS    moto in server mode (bench/services.py's MotoServer), a fresh standard queue per run.
         baseline  one aiobotocore client (the daemon's client settings) sends N bodies shaped
                   and sized like the daemon's CloudEvents messages (818 B for benchlib's
                   order.paid event), with the same two message attributes, by SendMessageBatch
                   of 10 entries, 8 batch calls in flight (the daemon's delivery.concurrency).
         daemon    an aws_sqs integration on a fresh queue; N events pre-loaded over HTTP in
                   batches of 1000; measured from the first event stored to the end of the last
                   successful attempt, both read from the daemon's database once all N jobs are
                   delivered.
         During both runs the queue is purged every 50 ms: moto's SendMessage costs O(queue
         length), so a filling queue would make both runs measure moto (see Purger).
  STOMP  ActiveMQ (bench/services.py's ActiveMQ, KahaDB persistence, user eventrelay).
         baseline  one stompman.Client sends N of the same bodies to /queue/bench as the daemon
                   sends them (persistent, application/json, no content-length, `type` and `id`
                   headers), a window of 8 sends awaiting their RECEIPT at once.
         daemon    a stomp integration on /queue/bench2; N events pre-loaded and measured as above.
         A STOMP run lasts seconds, so one pair is at the mercy of whatever else the box does
         meanwhile: --stomp-rounds pairs (default 3) alternate which goes first, and the table
         shows the round with the median ratio (every round is in the details).

Target: the daemon delivers at >= 80% of its raw loop's rate.  Before each baseline a short,
unmeasured warm-up (its own client, its own queue) warms the service (moto's handlers, the
JVM), so the baseline, which runs first, is not measured against a cold broker.

The daemon's time includes everything it does meanwhile: ingesting the pre-load (which
overlaps delivery, as in production), storing jobs, claiming them and recording outcomes.
The daemon's window comes from its own records (events.accepted_at, attempts.created_at +
duration; one wall clock), so it is not late by a poll interval. This process watches for the
end by reading the daemon's database every 20 ms (read-only), not through /v1/status: a status
call runs SQL on the daemon's reader thread, whose hand-overs of the interpreter lock held up
the event loop while it delivered. The polled end, from the first 202, is printed beside it.

Every load generator runs in its own process; the service (moto / the JVM) and the daemon are
processes too.  On 2 cores they compete: the CPU columns show who was busy.

    .venv/bin/python bench/queues.py [--messages 20000] [--stomp-messages 5000] [--stomp-rounds 3]
                                     [--warmup 500]
                                     [--timeout 60] [--budget 170] [--purge-every 0.05]
                                     [--only sqs|stomp] [--synchronous full|normal] [--json]

--budget bounds the whole invocation: each run's timeout is cut to what is left, and STOMP is
skipped if too little is left after SQS.  Exit status 1 if any run did not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sqlite3
import sys
import threading
import time
import uuid
from typing import Any

from benchlib import (
    run_on_daemon_loop,
    BUSY_OTHER_PCT,
    ChildCall,
    CpuMeter,
    Daemon,
    preload,
    daemon_problems,
    environment,
    http_get_json,
    log,
    order_data,
    other_cpu_pct,
    print_header,
    run_in_child,
)

from services import ActiveMQ, MotoServer

BATCH = 1000  # pre-load batch size (the contract's maximum)
CONCURRENCY = 8  # delivery.concurrency: the daemon's deliveries in flight, and the baselines' window
SQS_BATCH = 10  # entries per SendMessageBatch (SQS's maximum, what the daemon sends)
TARGET = 0.80  # daemon rate / raw loop rate
REGION = "us-east-1"
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
STOMP_USER, STOMP_PASSWORD = "eventrelay", "secret"
SEND_TIMEOUT = 10.0  # per call, as the daemon's delivery.timeout


# --------------------------------------------------------------------------- message bodies


def cloudevent_template() -> tuple[str, str]:
    """A body shaped like the daemon's CloudEvents message (daemon/formats.py), split around the id."""
    marker = "@@ID@@"
    # The daemon's default CloudEvents source is eventrelay://<hostname>; an event without `included`
    # has none in the body either (818 bytes for benchlib's order_data on a host named "vm").
    head = (
        '{"specversion":"1.0","id":"' + marker + '","type":"order.paid",'
        '"source":' + json.dumps(f"eventrelay://{socket.gethostname()}") + ','
        '"datacontenttype":"application/json","integrationid":"' + str(uuid.UUID(int=1)) + '",'
        '"time":"2024-05-01T10:00:05.123Z",'
    )
    body = head + '"data":' + json.dumps(order_data(0), separators=(",", ":")) + "}"
    prefix, suffix = body.split(marker)
    return prefix, suffix


def message_id(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


# --------------------------------------------------------------------------- child entry points: SQS


def sqs_baseline(endpoint: str, queue_url: str, warmup_url: str, n: int, warmup: int, concurrency: int,
                 timeout: float) -> dict[str, Any]:
    """Child entry: warm moto up (own client, own queue), then send `n` messages to `queue_url`."""
    return run_on_daemon_loop(_sqs_baseline(endpoint, queue_url, warmup_url, n, warmup, concurrency, timeout))


async def _sqs_send_loop(client: Any, queue_url: str, n: int, concurrency: int, deadline: float,
                         state: dict[str, Any]) -> None:
    prefix, suffix = cloudevent_template()
    state.update(next=0, ok=0, failed=0, errors=0, bytes=0, samples=[])

    async def worker() -> None:
        while state["next"] < n and time.monotonic() < deadline:
            first = state["next"]
            size = min(SQS_BATCH, n - first)
            state["next"] += size
            entries = []
            for i in range(first, first + size):
                eid = message_id(i)
                body = prefix + eid + suffix
                state["bytes"] += len(body)
                # The same two attributes the daemon sets on every message.
                entries.append({
                    "Id": str(i),
                    "MessageBody": body,
                    "MessageAttributes": {"type": {"DataType": "String", "StringValue": "order.paid"},
                                          "id": {"DataType": "String", "StringValue": eid}},
                })
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    resp = await client.send_message_batch(QueueUrl=queue_url, Entries=entries)
            except Exception as exc:  # noqa: BLE001 - count, keep going (bounded by n and deadline)
                state["errors"] += 1
                if len(state["samples"]) < 3:
                    state["samples"].append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.05)
                continue
            state["ok"] += len(resp.get("Successful", []))
            state["failed"] += len(resp.get("Failed", []))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _sqs_client(endpoint: str, concurrency: int) -> Any:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    # The daemon's client settings (daemon/eventrelay/delivery/targets/sqs.py): no botocore retries, a pool of
    # `concurrency` connections.
    config = AioConfig(connect_timeout=SEND_TIMEOUT, read_timeout=SEND_TIMEOUT, max_pool_connections=concurrency,
                       retries={"max_attempts": 1, "mode": "standard"})
    return get_session().create_client("sqs", region_name=REGION, endpoint_url=endpoint, config=config, **CREDS)


async def _sqs_baseline(endpoint: str, queue_url: str, warmup_url: str, n: int, warmup: int, concurrency: int,
                        timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    warm: dict[str, Any] = {}
    if warmup:
        async with _sqs_client(endpoint, concurrency) as client:
            await _sqs_send_loop(client, warmup_url, warmup, concurrency, deadline, warm)
    state: dict[str, Any] = {}
    async with _sqs_client(endpoint, concurrency) as client:
        t_start, cpu_start = time.monotonic(), time.process_time()
        await _sqs_send_loop(client, queue_url, n, concurrency, deadline, state)
        t_done, cpu_done = time.monotonic(), time.process_time()
    return _loop_result(state, n, t_start, t_done, cpu_start, cpu_done, warm)


def _loop_result(state: dict[str, Any], n: int, t_start: float, t_done: float, cpu_start: float, cpu_done: float,
                 warm: dict[str, Any]) -> dict[str, Any]:
    seconds = max(t_done - t_start, 1e-9)
    return {
        "t_start": t_start,
        "t_done": t_done,
        "seconds": seconds,
        "sent": state["next"],
        "ok": state["ok"],
        "failed": state["failed"],
        "errors": state["errors"],
        "error_samples": state["samples"],
        "avg_body_bytes": state["bytes"] / max(state["next"], 1),
        "rate": state["ok"] / seconds if state["ok"] >= n else None,
        "partial_rate": state["ok"] / seconds,
        "warmup_ok": warm.get("ok"),
        "warmup_errors": warm.get("errors"),
        # Near 100%: the raw loop itself is CPU-bound on one core, so it measured the client.
        "client_cpu_pct": 100.0 * (cpu_done - cpu_start) / seconds,
        "client_cpu_s": time.process_time(),  # the whole process, for the "other cpu" sum
    }


# --------------------------------------------------------------------------- child entry points: STOMP


def stomp_baseline(port: int, destination: str, warmup_destination: str, n: int, warmup: int, window: int,
                   timeout: float) -> dict[str, Any]:
    """Child entry: warm the broker up (own connection), then send `n` persistent messages with receipts."""
    return run_on_daemon_loop(_stomp_baseline(port, destination, warmup_destination, n, warmup, window, timeout))


def _stomp_client(port: int) -> Any:
    import stompman

    return stompman.Client(
        servers=[stompman.ConnectionParameters(host="127.0.0.1", port=port, login=STOMP_USER, passcode=STOMP_PASSWORD)],
        no_message_restart_interval=None,
    )


async def _stomp_send_loop(client: Any, destination: str, n: int, window: int, deadline: float,
                           state: dict[str, Any]) -> None:
    prefix, suffix = cloudevent_template()
    state.update(next=0, ok=0, failed=0, errors=0, bytes=0, samples=[])

    async def worker() -> None:
        while state["next"] < n and time.monotonic() < deadline:
            i = state["next"]
            state["next"] += 1
            eid = message_id(i)
            body = (prefix + eid + suffix).encode()
            state["bytes"] += len(body)
            try:
                # The daemon's SEND (daemon/eventrelay/delivery/targets/stomp.py), headers included.
                await client.send(body, destination, content_type="application/json",
                                  headers={"persistent": "true", "type": "order.paid", "id": eid},
                                  add_content_length=False, receipt_timeout=SEND_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - count, keep going (bounded by n and deadline)
                state["errors"] += 1
                if len(state["samples"]) < 3:
                    state["samples"].append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.05)
                continue
            state["ok"] += 1

    await asyncio.gather(*(worker() for _ in range(window)))


async def _stomp_baseline(port: int, destination: str, warmup_destination: str, n: int, warmup: int, window: int,
                          timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    warm: dict[str, Any] = {}
    if warmup:
        async with asyncio.timeout(timeout), _stomp_client(port) as client:
            await _stomp_send_loop(client, warmup_destination, warmup, window, deadline, warm)
    state: dict[str, Any] = {}
    async with asyncio.timeout(max(deadline - time.monotonic(), 1.0) + 10), _stomp_client(port) as client:
        t_start, cpu_start = time.monotonic(), time.process_time()
        await _stomp_send_loop(client, destination, n, window, deadline, state)
        t_done, cpu_done = time.monotonic(), time.process_time()
    return _loop_result(state, n, t_start, t_done, cpu_start, cpu_done, warm)


# --------------------------------------------------------------------------- child entry point: pre-load




# --------------------------------------------------------------------------- the daemon runs


def status_row(d: Daemon, name: str) -> dict[str, Any]:
    doc = http_get_json(f"{d.http_url}/v1/status", timeout=5.0)
    for row in doc["data"]["integrations"]:
        if row["name"] == name:
            return dict(row)
    raise RuntimeError(f"integration {name!r} not in /v1/status")


def wait_delivered(d: Daemon, name: str, n: int, timeout: float) -> dict[str, Any]:
    """Wait until `n` of `name`'s jobs are delivered, reading the daemon's database from this process.

    Not through the daemon's API while it delivers: a /v1/status call runs its SQL on the daemon's reader
    thread, whose hand-overs of the interpreter lock hold up the event loop, so polling it every 20-200 ms
    slowed the delivery it timed. A read-only connection here costs the daemon nothing but a moment's read
    lock on its WAL. One status call once it is over gives the report its row.
    """
    deadline = time.monotonic() + timeout
    out: dict[str, Any] = {"t_done": None, "polls": 0, "poll_errors": 0, "row": None, "stopped": None}
    db: sqlite3.Connection | None = None
    try:
        while True:
            if time.monotonic() >= deadline:
                out["stopped"] = f"not all delivered within {timeout:.0f}s"
                break
            if not d.alive():
                out["stopped"] = "the daemon exited"
                break
            try:
                if db is None:
                    db = read_only(d, timeout=1.0)
                delivered, dead = (db.execute("SELECT count(*) FROM jobs WHERE integration = ? AND state = ?",
                                              (name, state)).fetchone()[0] for state in ("delivered", "dead"))
            except sqlite3.Error as exc:  # e.g. the schema not there yet: keep polling (bounded)
                out["poll_errors"] += 1
                out["last_poll_error"] = repr(exc)[:200]
                time.sleep(0.1)
                continue
            out["polls"] += 1
            if delivered >= n:
                out["t_done"] = time.monotonic()
                break
            if dead and delivered + dead >= n:
                out["stopped"] = f"{dead} job(s) dead"
                break
            time.sleep(0.02)
    finally:
        if db is not None:
            db.close()
    try:
        out["row"] = status_row(d, name)
    except Exception as exc:  # noqa: BLE001 - the report can do without it
        out["poll_errors"] += 1
        out["last_poll_error"] = repr(exc)[:200]
    return out


def read_only(d: Daemon, timeout: float) -> sqlite3.Connection:
    """A connection to the daemon's database that cannot write to it."""
    return sqlite3.connect(f"file:{d.db_path}?mode=ro", uri=True, timeout=timeout)


def attempt_log_window(d: Daemon, name: str) -> tuple[float, float] | None:
    """(the first event stored, the end of the last successful attempt) in the daemon's own clock, from its
    database: when delivery ran, without the lag of whoever watched for its end."""
    with contextlib.closing(read_only(d, timeout=5.0)) as db:
        first = db.execute("SELECT min(accepted_at) FROM events").fetchone()[0]
        last = db.execute("SELECT max(created_at + duration) FROM attempts WHERE integration = ? AND succeeded = 1",
                          (name,)).fetchone()[0]
    return (first, last) if first is not None and last is not None else None


def delivered_total(d: Daemon, name: str) -> int | None:
    try:
        doc = http_get_json(f"{d.http_url}/v1/integrations/{name}/jobs?state=delivered&page[limit]=1", timeout=10)
        return int(doc["meta"]["results"]["total"])
    except Exception:  # noqa: BLE001
        return None


def run_daemon(integration: dict[str, Any], n: int, service_pid: int | None, args: argparse.Namespace,
               timeout: float, purger: "Purger | None" = None) -> dict[str, Any]:
    """One daemon with one integration: pre-load `n` events and wait until all are delivered."""
    name = integration["name"]
    out: dict[str, Any] = {}
    with Daemon(synchronous=args.synchronous, integrations=[integration], concurrency=CONCURRENCY) as d:
        # Let the sender open its connection first (STOMP connects in the background at start-up).
        time.sleep(0.5)
        if purger is not None:
            purger.start()
        machine, d_meter, s_meter, b_meter = CpuMeter(None), CpuMeter(d.pid), CpuMeter(service_pid), BenchCpu()
        try:
            loader = ChildCall(preload, d.events_url, n, BATCH, timeout)
            wait = wait_delivered(d, name, n, timeout)
        finally:
            if purger is not None:
                out["purger"] = purger.stop()
        out["daemon_cpu_pct"], out["service_cpu_pct"] = d_meter.percent(), s_meter.percent()
        out["bench_cpu_pct"] = b_meter.percent()
        d_cpu, s_cpu, b_cpu = d_meter.seconds(), s_meter.seconds(), b_meter.seconds()
        out["daemon_rss_kib"] = d.rss()
        out["load"] = load = loader.result(timeout=max(timeout, 10) + 30)
        # The loader usually finished long before delivery did, so its CPU is all inside the window.
        out["other_cpu_pct"] = other_cpu_pct(machine, [d_cpu, s_cpu, b_cpu, load["client_cpu_s"]])
        out["wait"] = wait
        out["status"] = wait["row"]
        out["delivered_jobs"] = delivered_total(d, name)
        window = attempt_log_window(d, name) if wait["t_done"] is not None else None
        d.stop()  # SIGTERM now, so its log can be read before the tempdir goes
        out["daemon_notes"] = daemon_problems(d)
        tail = d.log_tail(8).strip()
        if wait["t_done"] is None and tail:
            out["daemon_notes"].append("log tail: " + tail.replace("\n", " | ")[:800])
    t_first = load.get("t_first_accept")
    row = wait["row"] or {}
    out["delivered"] = row.get("delivered_last_hour", 0)
    if window is not None:
        out["seconds"] = window[1] - window[0]
        out["rate"] = n / out["seconds"]
    if wait["t_done"] is not None and t_first is not None:
        out["seconds_seen"] = wait["t_done"] - t_first  # from the first 202 until a poll saw the end
    elif t_first is not None:
        out["partial_rate"] = out["delivered"] / max(time.monotonic() - t_first, 1e-9)
    if "t_last_accept" in load:
        out["ingest_seconds"] = load["t_last_accept"] - load["t_first_send"]
    return out


# --------------------------------------------------------------------------- SQS


class BenchCpu:
    """CPU of this (orchestrating) process: status polls and the purger thread."""

    def __init__(self) -> None:
        self._cpu0, self._t0 = time.process_time(), time.monotonic()

    def seconds(self) -> float:
        return time.process_time() - self._cpu0

    def percent(self) -> float:
        return 100.0 * self.seconds() / max(time.monotonic() - self._t0, 1e-9)


class Purger:
    """Empties one SQS queue every `interval` seconds from a background thread, during a measured run.

    Why: moto's SendMessage computes every queue attribute for every message it stores, among them
    ApproximateNumberOfMessages, which walks the whole queue (moto/sqs/models.py, Queue.attributes), so
    a send costs O(queue length): on this 2-core box a raw loop that let its queue fill managed ~40
    messages/s by the time 2,000 were queued, against ~500/s on a queue kept short.  A run that lets the
    queue fill measures that quadratic slowdown, not the client.  PurgeQueue is O(1) in moto (which does not enforce SQS's one purge per 60 s by default), so
    purging every 50 ms keeps the queue at a few dozen messages for both the raw loop and the daemon.
    The price: the queue cannot be used to count deliveries, so the counts come from the SendMessageBatch
    answers (raw loop) and the daemon's own delivered count (only Successful entries count there).
    """

    def __init__(self, client_kwargs: dict[str, str], url: str, interval: float, max_seconds: float) -> None:
        import boto3

        self._client = boto3.client("sqs", **client_kwargs)
        self.url, self.interval, self.max_seconds = url, interval, max_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats: dict[str, Any] = {"purges": 0, "errors": 0, "error_samples": []}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="purger", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.wait(self.interval) and time.monotonic() < deadline:
            try:
                self._client.purge_queue(QueueUrl=self.url)
                self.stats["purges"] += 1
            except Exception as exc:  # noqa: BLE001 - count it, keep going (bounded by max_seconds)
                self.stats["errors"] += 1
                if len(self.stats["error_samples"]) < 3:
                    self.stats["error_samples"].append(f"{type(exc).__name__}: {exc}"[:300])

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        return dict(self.stats)


def sqs_queue(client: Any, prefix: str) -> str:
    return client.create_queue(QueueName=f"{prefix}-{uuid.uuid4().hex[:8]}")["QueueUrl"]


def queue_depth(client: Any, url: str) -> int | None:
    try:
        attrs = client.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
        return int(attrs["Attributes"]["ApproximateNumberOfMessages"])
    except Exception:  # noqa: BLE001
        return None


def sample_body_bytes(client: Any, url: str) -> int | None:
    """Size of one message the daemon put on the queue (left in flight; the queue is deleted afterwards)."""
    try:
        msgs = client.receive_message(QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=0).get("Messages", [])
        return len(msgs[0]["Body"].encode()) if msgs else None
    except Exception:  # noqa: BLE001
        return None


class BenchMoto(MotoServer):
    """bench/services.py's MotoServer, with PurgeQueue allowed more than once a minute (see Purger)."""

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR"] = "false"
        return env


def make_purger(moto: MotoServer, url: str, args: argparse.Namespace, timeout: float) -> Purger | None:
    if not args.purge_every:
        return None
    return Purger(moto.client_kwargs(), url, args.purge_every, timeout + 70)


def run_sqs(args: argparse.Namespace, budget: "Budget") -> dict[str, Any]:
    import boto3

    res: dict[str, Any] = {"n": args.messages}
    log("sqs: starting moto server ...")
    moto = BenchMoto()
    try:
        moto.start()
        res["service_start_s"] = moto.startup_time
        client = boto3.client("sqs", **moto.client_kwargs())
        warm_url = sqs_queue(client, "bench-warmup")

        # Baseline on a fresh queue.
        base_url = sqs_queue(client, "bench-raw")
        timeout = budget.run_timeout(args.timeout)
        log(f"sqs baseline: raw aiobotocore loop, {args.messages} messages, batches of {SQS_BATCH}, "
            f"{CONCURRENCY} calls in flight (timeout {timeout:.0f}s) ...")
        purger = make_purger(moto, base_url, args, timeout)
        machine, s_meter, b_meter = CpuMeter(None), CpuMeter(moto.pid), BenchCpu()
        if purger is not None:
            purger.start()
        try:
            base = run_in_child(sqs_baseline, moto.endpoint_url, base_url, warm_url, args.messages, args.warmup,
                                CONCURRENCY, timeout, timeout=timeout + 60)
        finally:
            purge_stats = purger.stop() if purger is not None else None
        base["service_cpu_pct"], base["bench_cpu_pct"] = s_meter.percent(), b_meter.percent()
        base["other_cpu_pct"] = other_cpu_pct(machine, [s_meter.seconds(), b_meter.seconds(), base["client_cpu_s"]])
        if purge_stats is not None:
            base["purger"] = purge_stats
        else:
            base["queue_depth"] = queue_depth(client, base_url)
        res["baseline"] = base
        # "Purge": a fresh queue for the daemon, the baseline's deleted so moto holds no more than it must.
        client.delete_queue(QueueUrl=base_url)
        client.delete_queue(QueueUrl=warm_url)

        if budget.left() < 15:
            res["daemon"] = "skipped: out of time budget"
            return res
        daemon_url = sqs_queue(client, "bench-daemon")
        integration = {
            "name": "bench-sqs",
            "integration_type": "aws_sqs",
            "observes": ["order.paid"],
            "configuration": {"url": daemon_url, "region": REGION, "endpoint_url": moto.endpoint_url, **CREDS},
        }
        timeout = budget.run_timeout(args.timeout)
        log(f"sqs daemon: {args.messages} events pre-loaded in batches of {BATCH} (timeout {timeout:.0f}s) ...")
        try:
            purger = make_purger(moto, daemon_url, args, timeout)
            dm = run_daemon(integration, args.messages, moto.pid, args, timeout, purger)
            if purger is None:
                dm["queue_depth"] = queue_depth(client, daemon_url)
            dm["avg_body_bytes"] = sample_body_bytes(client, daemon_url)
            res["daemon"] = dm
        except Exception as exc:  # noqa: BLE001 - report it
            res["daemon"] = f"failed: {exc}"
        return res
    except Exception as exc:  # noqa: BLE001
        res.setdefault("baseline", f"failed: {exc}")
        res.setdefault("daemon", "not run")
        return res
    finally:
        log("sqs: stopping moto ...")
        moto.close()


# --------------------------------------------------------------------------- STOMP


def run_stomp(args: argparse.Namespace, budget: "Budget") -> dict[str, Any]:
    """`--stomp-rounds` pairs of (raw loop, daemon) on one broker, alternating which goes first.

    One STOMP run takes a few seconds, so one pair is at the mercy of whatever else the box does in
    those seconds; the table shows the round with the median ratio, the details every round.
    """
    res: dict[str, Any] = {"n": args.stomp_messages, "rounds": []}
    log("stomp: starting ActiveMQ ...")
    broker = ActiveMQ(username=STOMP_USER, password=STOMP_PASSWORD,
                      startup_timeout=max(10.0, min(90.0, budget.left() - 30)))
    try:
        broker.start()
        res["service_start_s"] = broker.startup_time
        integration = {
            "name": "bench-stomp",
            "integration_type": "stomp",
            "observes": ["order.paid"],
            "configuration": {"addresses": [f"stomp://127.0.0.1:{broker.port}"], "destination": "/queue/bench2",
                              "username": STOMP_USER, "password": STOMP_PASSWORD},
        }
        for k in range(args.stomp_rounds):
            if k and budget.left() < 30:
                res["rounds_skipped"] = args.stomp_rounds - k
                log(f"stomp: {args.stomp_rounds - k} round(s) skipped: out of time budget")
                break
            rnd: dict[str, Any] = {}
            order = ("baseline", "daemon") if k % 2 == 0 else ("daemon", "baseline")
            for part in order:
                timeout = budget.run_timeout(args.timeout)
                tag = f"stomp round {k + 1}/{args.stomp_rounds}"
                try:
                    if part == "baseline":
                        log(f"{tag} baseline: raw stompman loop, {args.stomp_messages} persistent messages, "
                            f"window {CONCURRENCY} (timeout {timeout:.0f}s) ...")
                        rnd["baseline"] = stomp_baseline_run(broker, args, timeout, warmup=args.warmup if k == 0 else 0)
                    else:
                        log(f"{tag} daemon: {args.stomp_messages} events pre-loaded in batches of {BATCH} "
                            f"(timeout {timeout:.0f}s) ...")
                        rnd["daemon"] = run_daemon(integration, args.stomp_messages, broker.pid, args, timeout)
                except Exception as exc:  # noqa: BLE001 - report it, go on
                    rnd[part] = f"failed: {exc}"
            res["rounds"].append(rnd)
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"failed: {exc}"
    finally:
        log("stomp: stopping ActiveMQ ...")
        broker.close()
    # The representative round: the median ratio (a round without a rate counts as the lowest).
    rounds = res["rounds"]
    if rounds:
        ranked = sorted(rounds, key=lambda r: ratio_of(r) if ratio_of(r) is not None else -1.0)
        median = ranked[(len(ranked) - 1) // 2]
        res["baseline"], res["daemon"] = median.get("baseline", "not run"), median.get("daemon", "not run")
        res["median_round"] = rounds.index(median) + 1
    else:
        res["baseline"] = res["daemon"] = res.get("error", "not run")
    return res


def stomp_baseline_run(broker: ActiveMQ, args: argparse.Namespace, timeout: float, warmup: int) -> dict[str, Any]:
    machine, s_meter, b_meter = CpuMeter(None), CpuMeter(broker.pid), BenchCpu()
    base = run_in_child(stomp_baseline, broker.port, "/queue/bench", "/queue/bench-warmup", args.stomp_messages,
                        warmup, CONCURRENCY, timeout, timeout=timeout + 60)
    base["service_cpu_pct"], base["bench_cpu_pct"] = s_meter.percent(), b_meter.percent()
    base["other_cpu_pct"] = other_cpu_pct(machine, [s_meter.seconds(), b_meter.seconds(), base["client_cpu_s"]])
    return base


# --------------------------------------------------------------------------- budget and output


class Budget:
    """One wall-clock budget for the whole invocation: every run's timeout is cut to what is left."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run_timeout(self, wanted: float) -> float:
        return max(5.0, min(wanted, self.left() - 10))


def fmt_rate(v: float | None) -> str:
    return f"{v:,.0f}" if v else "n/a"


def fmt_pct(v: float | None) -> str:
    return f"{v:.0f}%" if v is not None else "n/a"


def fmt_kib(rss: dict[str, int]) -> str:
    if not rss:
        return "n/a"
    return f"{rss.get('vmrss', 0) / 1024:.0f} MiB (peak {rss.get('vmhwm', 0) / 1024:.0f})"


def purge_note(stats: dict[str, Any] | None) -> str:
    if not stats:
        return ""
    note = f"; queue purged {stats['purges']} times"
    if stats["errors"]:
        note += f" ({stats['errors']} purge errors: {stats['error_samples']})"
    return note


def fmt_ratio(v: float | None) -> str:
    return f"{v:.0%}" if v is not None else "n/a"


def ratio_of(res: dict[str, Any]) -> float | None:
    b, d = res.get("baseline"), res.get("daemon")
    if isinstance(b, dict) and isinstance(d, dict) and b.get("rate") and d.get("rate"):
        return d["rate"] / b["rate"]
    return None


def print_report(results: dict[str, dict[str, Any]]) -> None:
    head = (f"{'target':<22} {'daemon msgs/s':>14} {'raw loop msgs/s':>16} {'ratio':>6}  {'target':<8} "
            f"{'result':<7} {'daemon cpu':>10} {'daemon rss':>18}")
    print(head)
    print("-" * len(head))
    for label, res in results.items():
        b, d = res.get("baseline"), res.get("daemon")
        d_rate = d.get("rate") if isinstance(d, dict) else None
        b_rate = b.get("rate") if isinstance(b, dict) else None
        ratio = ratio_of(res)
        result = "met" if ratio is not None and ratio >= TARGET else "MISSED" if ratio is not None else "n/a"
        if ratio is None and isinstance(d, dict) and b_rate:
            result = "MISSED"  # the daemon did not finish: no rate to compare
        rss = fmt_kib(d.get("daemon_rss_kib", {})) if isinstance(d, dict) else "n/a"
        cpu = fmt_pct(d.get("daemon_cpu_pct")) if isinstance(d, dict) else "n/a"
        name = f"{label} (N={res['n']}" + (f", med/{len(res['rounds'])})" if res.get("rounds") else ")")
        print(f"{name:<22} {fmt_rate(d_rate):>14} {fmt_rate(b_rate):>16} "
              f"{(f'{ratio:.0%}' if ratio is not None else 'n/a'):>6}  {f'>= {TARGET:.0%}':<8} {result:<7} "
              f"{cpu:>10} {rss:>18}")
    print()
    print("details")
    for label, res in results.items():
        service = "moto" if label == "SQS" else "activemq"
        print(f"  {label}: {service} started in {res.get('service_start_s') or float('nan'):.1f}s")
        if res.get("rounds"):
            ratios = ", ".join(fmt_ratio(ratio_of(r)) for r in res["rounds"])
            print(f"    {len(res['rounds'])} round(s), ratios {ratios}; the table shows round {res['median_round']} "
                  "(the median ratio)" + (f"; {res['rounds_skipped']} skipped (time budget)"
                                          if res.get("rounds_skipped") else ""))
            for k, rnd in enumerate(res["rounds"], 1):
                first = "raw loop" if k % 2 else "daemon"
                print(f"    round {k} ({first} first): ratio {fmt_ratio(ratio_of(rnd))}")
                print_pair(res["n"], service, rnd.get("baseline", "not run"), rnd.get("daemon", "not run"), "  ")
        else:
            print_pair(res["n"], service, res.get("baseline"), res.get("daemon"), "")
    busy = [
        f"{label}{f' round {k}' if k else ''} {part}"
        for label, res in results.items()
        for k, rnd in (enumerate(res["rounds"], 1) if res.get("rounds") else [(0, res)])
        for part in ("baseline", "daemon")
        if isinstance(rnd.get(part), dict) and (rnd[part].get("other_cpu_pct") or 0) > BUSY_OTHER_PCT
    ]
    if busy:
        print(
            f"WARNING: {', '.join(busy)} shared the machine with other work (other cpu > {BUSY_OTHER_PCT:.0f}%); "
            "those numbers are low and noisy, rerun on a quiet machine"
        )


def print_pair(n: int, service: str, b: Any, d: Any, ind: str) -> None:
    """The details of one raw-loop run and one daemon run, indented by `ind`."""
    p1, p2 = f"{ind}    ", f"{ind}              "
    if isinstance(b, dict):
        print(
            f"{p1}raw loop: {b['ok']}/{n} sent in {b['seconds']:.2f}s"
            + ("" if b.get("rate") else f" (partial rate {b['partial_rate']:,.0f}/s)")
            + f", refused {b['failed']}, call errors {b['errors']}, avg body {b['avg_body_bytes']:.0f} B"
            + (f", queue depth after {b['queue_depth']}" if b.get("queue_depth") is not None else "")
            + (f"; warm-up {b['warmup_ok']} sent ({b['warmup_errors']} errors)" if b.get("warmup_ok") is not None
               else "; no warm-up")
        )
        print(
            f"{p2}cpu: client {fmt_pct(b.get('client_cpu_pct'))}, {service} "
            f"{fmt_pct(b.get('service_cpu_pct'))}, bench {fmt_pct(b.get('bench_cpu_pct'))}, "
            f"other {fmt_pct(b.get('other_cpu_pct'))}" + purge_note(b.get("purger"))
        )
        if b["error_samples"]:
            print(f"{p2}errors: {b['error_samples']}")
    else:
        print(f"{p1}raw loop: {b}")
    if isinstance(d, dict):
        ld, w, st = d["load"], d["wait"], d.get("status") or {}
        print(
            f"{p1}daemon:   {d['delivered']}/{n} delivered"
            + (f" in {d['seconds']:.2f}s from the first event stored to the last answer (attempt log)"
               if "seconds" in d else "")
            + (f", {d['seconds_seen']:.2f}s from the first 202 until seen" if "seconds_seen" in d else "")
            + (f" (partial rate {d['partial_rate']:,.0f}/s)" if "partial_rate" in d else "")
            + f"; pre-load accepted {ld.get('accepted')} events, {ld.get('jobs')} jobs, "
            f"in {d.get('ingest_seconds', float('nan')):.2f}s"
        )
        extra = []
        if d.get("queue_depth") is not None:
            extra.append(f"queue depth after {d['queue_depth']}")
        if d.get("avg_body_bytes") is not None:
            extra.append(f"body {d['avg_body_bytes']} B")
        print(
            f"{p2}status at end: pending {st.get('pending')}, in_flight {st.get('in_flight')}, "
            f"dead {st.get('dead')}, circuit {st.get('circuit')}, delivered jobs (GET jobs) "
            f"{d.get('delivered_jobs')}" + (", " + ", ".join(extra) if extra else "")
        )
        print(
            f"{p2}end seen by {w['polls']} polls of its database"
            + (f", {w['poll_errors']} poll errors ({w.get('last_poll_error')})" if w["poll_errors"] else "")
            + (f"; stopped: {w['stopped']}" if w["stopped"] else "")
        )
        print(
            f"{p2}cpu: daemon {fmt_pct(d.get('daemon_cpu_pct'))}, {service} "
            f"{fmt_pct(d.get('service_cpu_pct'))}, bench {fmt_pct(d.get('bench_cpu_pct'))}, "
            f"other {fmt_pct(d.get('other_cpu_pct'))}" + purge_note(d.get("purger"))
            + f"; daemon rss {fmt_kib(d.get('daemon_rss_kib', {}))}"
        )
        if st.get("last_error"):
            print(f"{p2}last error: {st['last_error']}")
        if ld.get("errors"):
            print(f"{p2}pre-load errors: {ld['errors']}")
        for note in d.get("daemon_notes", []):
            print(f"{p2}daemon: {note}")
    else:
        print(f"{p1}daemon:   {d}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000, help="SQS messages per run (default 20000)")
    ap.add_argument("--stomp-messages", type=int, default=5_000, help="STOMP messages per run (default 5000)")
    ap.add_argument("--stomp-rounds", type=int, default=3,
                    help="STOMP (raw loop, daemon) pairs, alternating order; the median ratio is shown (default 3)")
    ap.add_argument("--warmup", type=int, default=500, help="unmeasured messages before each baseline (default 500)")
    ap.add_argument("--timeout", type=float, default=60.0, help="max seconds for each measured run (default 60)")
    ap.add_argument("--budget", type=float, default=170.0,
                    help="max seconds for the whole invocation; runs are cut or skipped to fit (default 170)")
    ap.add_argument("--purge-every", type=float, default=0.05,
                    help="SQS: purge the queue every this many seconds during each run, 0 = never (default 0.05; "
                    "moto's SendMessage slows down with every message queued, see Purger)")
    ap.add_argument("--only", choices=("sqs", "stomp"), help="run one target only")
    ap.add_argument("--synchronous", choices=("full", "normal"), default="full", help="storage.synchronous")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    if not 0 < args.messages <= 200_000 or not 0 < args.stomp_messages <= 100_000 or not 0 <= args.warmup <= 10_000:
        ap.error("bounds: 0 < --messages <= 200000, 0 < --stomp-messages <= 100000, 0 <= --warmup <= 10000")
    if not 1 <= args.stomp_rounds <= 9:
        ap.error("bounds: 1 <= --stomp-rounds <= 9")
    if not 1 <= args.timeout <= 600 or not 30 <= args.budget <= 1800 or not 0 <= args.purge_every <= 60:
        ap.error("bounds: 1 <= --timeout <= 600, 30 <= --budget <= 1800, 0 <= --purge-every <= 60")
    if 0 < args.purge_every < 0.01:
        ap.error("--purge-every: at least 0.01 s (or 0 to never purge)")

    budget = Budget(args.budget)
    env = environment()
    settings = {
        "sqs_messages": args.messages,
        "stomp_messages": args.stomp_messages,
        "stomp_rounds": args.stomp_rounds,
        "preload_batch": BATCH,
        "sqs_batch": SQS_BATCH,
        "concurrency": CONCURRENCY,
        "warmup": args.warmup,
        "sqs_purge_every_s": args.purge_every,
        "synchronous": args.synchronous,
        "budget_s": args.budget,
    }
    if not args.json:
        print_header("eventrelay SQS and STOMP delivery benchmark", env, settings)

    results: dict[str, dict[str, Any]] = {}
    if args.only in (None, "sqs"):
        results["SQS"] = run_sqs(args, budget)
    if args.only in (None, "stomp"):
        if budget.left() < 40:
            results["STOMP"] = {"n": args.stomp_messages, "baseline": "skipped: out of time budget",
                                "daemon": "skipped: out of time budget"}
        else:
            results["STOMP"] = run_stomp(args, budget)

    if args.json:
        doc = {"benchmark": "queues", "env": env, "settings": settings, "results": results,
               "ratios": {k: ratio_of(v) for k, v in results.items()}}
        json.dump(doc, sys.stdout, indent=2, default=str)
        print()
    else:
        print_report(results)
    failed = any(
        not isinstance(rnd.get(part), dict) or not rnd[part].get("rate")
        for r in results.values()
        for rnd in (r.get("rounds") or [r])
        for part in ("baseline", "daemon")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
