"""SQS and STOMP delivery throughput of eventrelay, each beside a raw client loop on the same broker.

Two targets, each measured twice in the same invocation against the same local service:

  SQS    moto in server mode (tests/services.py's MotoServer), one standard queue per run.
         baseline  one aiobotocore client sends N CloudEvents-sized bodies (~600 B) with
                   SendMessageBatch of 10 entries, `concurrency` batch calls in flight (the
                   daemon's delivery.concurrency, 8).
         daemon    an aws_sqs integration on a fresh queue; N events pre-loaded over HTTP in
                   batches of 1000; measured from the first 202 until the daemon reports every
                   job delivered (GET /v1/status: delivered == N, pending == 0, in_flight == 0).
  STOMP  ActiveMQ (tests/services.py's ActiveMQ, KahaDB persistence, user eventrelay).
         baseline  one stompman.Client sends N bodies to /queue/bench, persistent, a window of
                   8 sends awaiting their RECEIPT at once.
         daemon    a stomp integration on /queue/bench2; N events pre-loaded and measured as above.

Target: the daemon delivers at >= 80% of its raw loop's rate.  Before each baseline a short,
unmeasured warm-up (its own client, its own queue) warms the service (moto's handlers, the
JVM), so the baseline, which runs first, is not measured against a cold broker.

The daemon's time includes everything it does meanwhile: ingesting the pre-load (which
overlaps delivery, as in production), storing jobs, claiming them and recording outcomes.
The end is seen by polling /v1/status (every 20-200 ms, faster near the end), so it is late
by at most one poll interval, against the daemon.  All times are time.monotonic(), one
system-wide clock on Linux, so times taken in different processes compare.

Every load generator runs in its own process; the service (moto / the JVM) and the daemon are
processes too.  On 2 cores they compete: the CPU columns show who was busy.

    .venv/bin/python bench/queues.py [--messages 20000] [--stomp-messages 5000]
                                     [--only sqs|stomp] [--budget 170] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    BUSY_OTHER_PCT,
    ChildCall,
    CpuMeter,
    Daemon,
    daemon_problems,
    environment,
    event_obj,
    http_get_json,
    log,
    order_data,
    other_cpu_pct,
    print_header,
    run_in_child,
)

from tests.services import ActiveMQ, MotoServer  # noqa: E402

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
    head = (
        '{"specversion":"1.0","id":"' + marker + '","type":"order.paid","source":"eventrelay://localhost",'
        '"datacontenttype":"application/json","integrationid":"' + str(uuid.UUID(int=1)) + '",'
        '"time":"2024-05-01T10:00:05.123Z",'
    )
    body = head + '"data":' + json.dumps(order_data(0), separators=(",", ":")) + ',"included":null}'
    prefix, suffix = body.split(marker)
    return prefix, suffix


def message_id(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


# --------------------------------------------------------------------------- child entry points: SQS


def sqs_baseline(endpoint: str, queue_url: str, warmup_url: str, n: int, warmup: int, concurrency: int,
                 timeout: float) -> dict[str, Any]:
    """Child entry: warm moto up (own client, own queue), then send `n` messages to `queue_url`."""
    return asyncio.run(_sqs_baseline(endpoint, queue_url, warmup_url, n, warmup, concurrency, timeout))


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

    # The daemon's client settings (daemon/delivery/senders/sqs.py): no botocore retries, a pool of
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
    return asyncio.run(_stomp_baseline(port, destination, warmup_destination, n, warmup, window, timeout))


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
                # The daemon's SEND (daemon/delivery/senders/stomp.py), headers included.
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


def preload(events_url: str, n: int, batch: int, timeout: float) -> dict[str, Any]:
    """Child entry: post `n` events (no ids: the daemon assigns them) in batches of `batch`."""
    return asyncio.run(_preload(events_url, n, batch, timeout))


async def _preload(events_url: str, n: int, batch: int, timeout: float) -> dict[str, Any]:
    import aiohttp

    # Bodies built up front, so the loader spends as little CPU as possible while the daemon delivers.
    bodies = [json.dumps([event_obj(s + k) for k in range(min(batch, n - s))]).encode() for s in range(0, n, batch)]
    out: dict[str, Any] = {"accepted": 0, "jobs": 0, "duplicates": 0, "errors": [], "t_first_accept": None}
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        out["t_first_send"] = time.monotonic()
        for body in bodies:
            if time.monotonic() >= deadline:
                out["errors"].append("pre-load deadline reached")
                break
            try:
                async with session.post(events_url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    raw = await resp.read()
                    status = resp.status
            except Exception as exc:  # noqa: BLE001
                out["errors"].append(repr(exc))
                continue
            now = time.monotonic()
            if status != 202:
                out["errors"].append(f"HTTP {status}: {raw[:200]!r}")
                continue
            if out["t_first_accept"] is None:
                out["t_first_accept"] = now
            out["t_last_accept"] = now
            for item in json.loads(raw)["data"]:
                out["accepted"] += 1
                out["jobs"] += int(item.get("jobs", 0))
                out["duplicates"] += bool(item.get("duplicate"))
    out["errors"] = out["errors"][:5] + ([f"... {len(out['errors']) - 5} more"] if len(out["errors"]) > 5 else [])
    out["client_cpu_s"] = time.process_time()
    return out


# --------------------------------------------------------------------------- the daemon runs


def status_row(d: Daemon, name: str) -> dict[str, Any]:
    doc = http_get_json(f"{d.http_url}/v1/status", timeout=5.0)
    for row in doc["data"]["integrations"]:
        if row["name"] == name:
            return dict(row)
    raise RuntimeError(f"integration {name!r} not in /v1/status")


def wait_delivered(d: Daemon, name: str, n: int, timeout: float) -> dict[str, Any]:
    """Poll /v1/status until `n` jobs are delivered and nothing is pending or in flight (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    out: dict[str, Any] = {"t_done": None, "polls": 0, "poll_errors": 0, "row": None, "stopped": None}
    t_prev = None
    while time.monotonic() < deadline:
        if not d.alive():
            out["stopped"] = "the daemon exited"
            break
        try:
            row = status_row(d, name)
        except Exception as exc:  # noqa: BLE001 - a slow answer under load: note it, keep polling (bounded)
            out["poll_errors"] += 1
            out["last_poll_error"] = repr(exc)[:200]
            time.sleep(0.1)
            continue
        now = time.monotonic()
        out["polls"] += 1
        out["row"] = row
        delivered, pending, in_flight, dead = row["delivered_last_hour"], row["pending"], row["in_flight"], row["dead"]
        if delivered >= n and pending == 0 and in_flight == 0:
            out["t_done"] = now
            out["resolution_s"] = now - t_prev if t_prev is not None else None
            break
        if dead and pending == 0 and in_flight == 0 and delivered + dead >= n:
            out["stopped"] = f"{dead} job(s) dead"
            break
        t_prev = now
        left = n - delivered
        time.sleep(0.02 if left < 500 else 0.05 if left < 3000 else 0.2)
    else:
        out["stopped"] = f"not all delivered within {timeout:.0f}s"
    return out


def delivered_total(d: Daemon, name: str) -> int | None:
    try:
        doc = http_get_json(f"{d.http_url}/v1/integrations/{name}/jobs?state=delivered&page[limit]=1", timeout=10)
        return int(doc["meta"]["results"]["total"])
    except Exception:  # noqa: BLE001
        return None


def run_daemon(integration: dict[str, Any], n: int, service_pid: int | None, args: argparse.Namespace,
               timeout: float) -> dict[str, Any]:
    """One daemon with one integration: pre-load `n` events and wait until all are delivered."""
    name = integration["name"]
    out: dict[str, Any] = {}
    with Daemon(synchronous=args.synchronous, integrations=[integration], concurrency=CONCURRENCY) as d:
        # Let the sender open its connection first (STOMP connects in the background at start-up).
        time.sleep(0.5)
        machine, d_meter, s_meter = CpuMeter(None), CpuMeter(d.pid), CpuMeter(service_pid)
        loader = ChildCall(preload, d.events_url, n, BATCH, timeout)
        wait = wait_delivered(d, name, n, timeout)
        out["daemon_cpu_pct"], out["service_cpu_pct"] = d_meter.percent(), s_meter.percent()
        d_cpu, s_cpu = d_meter.seconds(), s_meter.seconds()
        out["daemon_rss_kib"] = d.rss()
        out["load"] = load = loader.result(timeout=max(timeout, 10) + 30)
        # The loader usually finished long before delivery did, so its CPU is all inside the window.
        out["other_cpu_pct"] = other_cpu_pct(machine, [d_cpu, s_cpu, load["client_cpu_s"]])
        out["wait"] = wait
        out["status"] = wait["row"]
        out["delivered_jobs"] = delivered_total(d, name)
        d.stop()  # SIGTERM now, so its log can be read before the tempdir goes
        out["daemon_notes"] = daemon_problems(d)
        if wait["t_done"] is None:
            out["daemon_notes"].append("log tail: " + d.log_tail(8).replace("\n", " | ")[:800])
    t_first = load.get("t_first_accept")
    row = wait["row"] or {}
    out["delivered"] = row.get("delivered_last_hour", 0)
    if wait["t_done"] is not None and t_first is not None:
        out["seconds"] = wait["t_done"] - t_first
        out["rate"] = n / out["seconds"]
    elif t_first is not None:
        out["partial_rate"] = out["delivered"] / max(time.monotonic() - t_first, 1e-9)
    if "t_last_accept" in load:
        out["ingest_seconds"] = load["t_last_accept"] - load["t_first_send"]
    return out


# --------------------------------------------------------------------------- SQS


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


def run_sqs(args: argparse.Namespace, budget: "Budget") -> dict[str, Any]:
    import boto3

    res: dict[str, Any] = {"n": args.messages}
    log("sqs: starting moto server ...")
    moto = MotoServer()
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
        machine, s_meter = CpuMeter(None), CpuMeter(moto.pid)
        base = run_in_child(sqs_baseline, moto.endpoint_url, base_url, warm_url, args.messages, args.warmup,
                            CONCURRENCY, timeout, timeout=timeout + 60)
        base["service_cpu_pct"] = s_meter.percent()
        base["other_cpu_pct"] = other_cpu_pct(machine, [s_meter.seconds(), base["client_cpu_s"]])
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
            dm = run_daemon(integration, args.messages, moto.pid, args, timeout)
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
    res: dict[str, Any] = {"n": args.stomp_messages}
    log("stomp: starting ActiveMQ ...")
    broker = ActiveMQ(username=STOMP_USER, password=STOMP_PASSWORD,
                      startup_timeout=max(10.0, min(90.0, budget.left() - 30)))
    try:
        broker.start()
        res["service_start_s"] = broker.startup_time
        timeout = budget.run_timeout(args.timeout)
        log(f"stomp baseline: raw stompman loop, {args.stomp_messages} persistent messages, window {CONCURRENCY} "
            f"(timeout {timeout:.0f}s) ...")
        machine, s_meter = CpuMeter(None), CpuMeter(broker.pid)
        base = run_in_child(stomp_baseline, broker.port, "/queue/bench", "/queue/bench-warmup", args.stomp_messages,
                            args.warmup, CONCURRENCY, timeout, timeout=timeout + 60)
        base["service_cpu_pct"] = s_meter.percent()
        base["other_cpu_pct"] = other_cpu_pct(machine, [s_meter.seconds(), base["client_cpu_s"]])
        res["baseline"] = base

        if budget.left() < 15:
            res["daemon"] = "skipped: out of time budget"
            return res
        integration = {
            "name": "bench-stomp",
            "integration_type": "stomp",
            "observes": ["order.paid"],
            "configuration": {"addresses": [f"stomp://127.0.0.1:{broker.port}"], "destination": "/queue/bench2",
                              "username": STOMP_USER, "password": STOMP_PASSWORD},
        }
        timeout = budget.run_timeout(args.timeout)
        log(f"stomp daemon: {args.stomp_messages} events pre-loaded in batches of {BATCH} (timeout {timeout:.0f}s) ...")
        try:
            res["daemon"] = run_daemon(integration, args.stomp_messages, broker.pid, args, timeout)
        except Exception as exc:  # noqa: BLE001
            res["daemon"] = f"failed: {exc}"
        return res
    except Exception as exc:  # noqa: BLE001
        res.setdefault("baseline", f"failed: {exc}")
        res.setdefault("daemon", "not run")
        return res
    finally:
        log("stomp: stopping ActiveMQ ...")
        broker.close()


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
        name = f"{label} (N={res['n']})"
        print(f"{name:<22} {fmt_rate(d_rate):>14} {fmt_rate(b_rate):>16} "
              f"{(f'{ratio:.0%}' if ratio is not None else 'n/a'):>6}  {f'>= {TARGET:.0%}':<8} {result:<7} "
              f"{cpu:>10} {rss:>18}")
    print()
    print("details")
    for label, res in results.items():
        service = "moto" if label == "SQS" else "activemq"
        print(f"  {label}: {service} started in {res.get('service_start_s') or float('nan'):.1f}s")
        b = res.get("baseline")
        if isinstance(b, dict):
            print(
                f"    raw loop: {b['ok']}/{res['n']} sent in {b['seconds']:.2f}s"
                + ("" if b.get("rate") else f" (partial rate {b['partial_rate']:,.0f}/s)")
                + f", refused {b['failed']}, call errors {b['errors']}, avg body {b['avg_body_bytes']:.0f} B"
                + (f", queue depth after {b['queue_depth']}" if b.get("queue_depth") is not None else "")
                + f"; warm-up {b.get('warmup_ok')} sent ({b.get('warmup_errors')} errors)"
            )
            print(
                f"              cpu: client {fmt_pct(b.get('client_cpu_pct'))}, {service} "
                f"{fmt_pct(b.get('service_cpu_pct'))}, other {fmt_pct(b.get('other_cpu_pct'))}"
            )
            if b["error_samples"]:
                print(f"              errors: {b['error_samples']}")
        else:
            print(f"    raw loop: {b}")
        d = res.get("daemon")
        if isinstance(d, dict):
            ld, w, st = d["load"], d["wait"], d.get("status") or {}
            print(
                f"    daemon:   {d['delivered']}/{res['n']} delivered"
                + (f" in {d['seconds']:.2f}s from the first 202" if "seconds" in d else "")
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
                f"              status at end: pending {st.get('pending')}, in_flight {st.get('in_flight')}, "
                f"dead {st.get('dead')}, circuit {st.get('circuit')}, delivered jobs (GET jobs) "
                f"{d.get('delivered_jobs')}" + (", " + ", ".join(extra) if extra else "")
            )
            res_s = w.get("resolution_s")
            print(
                f"              end seen by {w['polls']} status polls"
                + (f" (last interval {res_s * 1e3:.0f} ms)" if res_s else "")
                + (f", {w['poll_errors']} poll errors ({w.get('last_poll_error')})" if w["poll_errors"] else "")
                + (f"; stopped: {w['stopped']}" if w["stopped"] else "")
            )
            print(
                f"              cpu: daemon {fmt_pct(d.get('daemon_cpu_pct'))}, {service} "
                f"{fmt_pct(d.get('service_cpu_pct'))}, other {fmt_pct(d.get('other_cpu_pct'))} "
                f"(pre-load client and status polls included in other); daemon rss {fmt_kib(d.get('daemon_rss_kib', {}))}"
            )
            if st.get("last_error"):
                print(f"              last error: {st['last_error']}")
            if ld.get("errors"):
                print(f"              pre-load errors: {ld['errors']}")
            for note in d.get("daemon_notes", []):
                print(f"              daemon: {note}")
        else:
            print(f"    daemon:   {d}")
    busy = [
        f"{label} {part}"
        for label, res in results.items()
        for part in ("baseline", "daemon")
        if isinstance(res.get(part), dict) and (res[part].get("other_cpu_pct") or 0) > BUSY_OTHER_PCT
    ]
    if busy:
        print(
            f"WARNING: {', '.join(busy)} shared the machine with other work (other cpu > {BUSY_OTHER_PCT:.0f}%); "
            "those numbers are low and noisy, rerun on a quiet machine"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000, help="SQS messages per run (default 20000)")
    ap.add_argument("--stomp-messages", type=int, default=5_000, help="STOMP messages per run (default 5000)")
    ap.add_argument("--warmup", type=int, default=500, help="unmeasured messages before each baseline (default 500)")
    ap.add_argument("--timeout", type=float, default=45.0, help="max seconds for each measured run (default 45)")
    ap.add_argument("--budget", type=float, default=170.0,
                    help="max seconds for the whole invocation; runs are cut or skipped to fit (default 170)")
    ap.add_argument("--only", choices=("sqs", "stomp"), help="run one target only")
    ap.add_argument("--synchronous", choices=("full", "normal"), default="full", help="storage.synchronous")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    if not 0 < args.messages <= 200_000 or not 0 < args.stomp_messages <= 100_000 or not 0 <= args.warmup <= 10_000:
        ap.error("bounds: 0 < --messages <= 200000, 0 < --stomp-messages <= 100000, 0 <= --warmup <= 10000")
    if not 1 <= args.timeout <= 600 or not 30 <= args.budget <= 1800:
        ap.error("bounds: 1 <= --timeout <= 600, 30 <= --budget <= 1800")

    budget = Budget(args.budget)
    env = environment()
    settings = {
        "sqs_messages": args.messages,
        "stomp_messages": args.stomp_messages,
        "preload_batch": BATCH,
        "sqs_batch": SQS_BATCH,
        "concurrency": CONCURRENCY,
        "warmup": args.warmup,
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
        not isinstance(r.get(part), dict) or not r[part].get("rate") for r in results.values()
        for part in ("baseline", "daemon")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
