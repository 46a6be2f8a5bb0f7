"""Webhook delivery in parts, each beside the raw-client baseline in the same invocation.

bench/deliver.py measures the daemon whole. This script takes its delivery path apart, so
that a gap between the daemon and the baseline can be attributed to a part:

  1. baseline        a raw aiohttp ClientSession posts N envelope-sized bodies to a local
                     receiver with concurrency 8 (bench/deliver.py's webhook_baseline):
                     what one asyncio process can push through aiohttp's client here.
  2. sender alone    the daemon's own WebhookSender (built from a parsed config, as the
                     daemon builds it), driven by 8 coroutines that post N jobs, one
                     deliver() call each: the envelope, headers and answer handling on
                     top of the raw client.  No dispatcher, no store.
  3. sender beside   the same as 2, while a second thread of that process commits 20
     a committing    single-row INSERTs per transaction into a throwaway SQLite file (WAL,
     thread          synchronous=NORMAL) and sleeps 3 ms, until the posting ends: what a
                     second Python thread doing SQLite work (as the store's writer thread did
                     before it became a process) costs the event-loop thread in GIL hand-overs.
  4. dispatcher and  N events stored through Store.ingest (batches of 1000), then a real
     store alone     Dispatcher delivers them to an instant sender (no HTTP), outcomes
                     written behind by the store's writer process; measured from the start
                     of dispatcher.run() until N outcomes were returned.  The main
                     thread's CPU share shows what claiming, gating, deciding and
                     recording cost the event loop per delivery.  The Dispatcher gets no
                     Metrics: the daemon's per-outcome Prometheus counter and histogram
                     are left out (a few µs per delivery).

Parts 2-4 run in a child process set up as the daemon sets itself up (its log setup at
level warning, its GC thresholds) on the daemon's event loop (uvloop when installed); the
baseline runs exactly as in bench/deliver.py.  Each HTTP part's rate is N over the child's
own posting time; the receiver (its own process) confirms that N distinct ids arrived.

Derived: the main-thread CPU per delivery of part 4 plus the CPU per post of part 2 is
what one delivery is expected to cost the daemon's event-loop thread.

Every loop is bounded in count and in time (--timeout per part); network only to 127.0.0.1.

    .venv/bin/python bench/parts.py [--events 20000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from benchlib import (
    BUSY_OTHER_PCT,
    Receiver,
    cpu_seconds,
    daemon_config,
    environment,
    log,
    machine_busy_seconds,
    order_data,
    print_header,
    run_in_child,
    run_on_daemon_loop,
    webhook_integration,
)
from deliver import webhook_baseline

from eventrelay import config as config_module
from eventrelay import log as log_setup
from eventrelay.cli import tune_gc  # the daemon's own thresholds, not a copy that would drift
from eventrelay.delivery.dispatcher import Dispatcher
from eventrelay.delivery.targets.webhook import WebhookSender
from eventrelay.events import parse_event
from eventrelay.jobs import Job, Outcome
from eventrelay.service import USER_AGENT
from eventrelay.store import open_store

CONCURRENCY = 8  # delivery.concurrency, and the baseline client's concurrency
INTEGRATION = "bench-hook"
INGEST_BATCH = 1000  # events per Store.ingest call in part 4 (the HTTP contract's maximum batch)
BG_ROWS = 20  # single-row INSERTs per transaction of the committing thread (part 3)
BG_PAUSE = 0.003  # seconds it sleeps between transactions
BG_MAX_COMMITS = 1_000_000  # a bound on its loop besides the deadline
ERROR_SAMPLES = 3


# --------------------------------------------------------------------------- child set-up


def config_text(hook_url: str) -> str:
    """The daemon's YAML for one webhook integration; parsed in the child, as the daemon would parse it."""
    integration = webhook_integration(hook_url, INTEGRATION)
    integration["delivery"] = {"concurrency": CONCURRENCY}
    # The paths and the port are never opened: only the integration and the log settings are used.
    workdir = Path(tempfile.gettempdir()) / "eventrelay-parts-unused"
    return yaml.safe_dump(daemon_config(workdir, 1, "full", [integration], CONCURRENCY), sort_keys=False)


def daemon_like_process(text: str) -> config_module.Config:
    """Set the child up as `eventrelay run` sets itself up, so the parts cost what they cost in the daemon:
    at log level warning every per-delivery info line is a no-op, and the GC runs as rarely as there."""
    config = config_module.parse(text)
    log_setup.setup(config.log)
    tune_gc()
    return config


def bench_integration(config: config_module.Config) -> config_module.Integration:
    integration = config.integration(INTEGRATION)
    assert integration is not None, "the bench config has no bench-hook integration"
    return integration


def payload_text() -> str:
    return json.dumps({"data": order_data(0), "included": None}, separators=(",", ":"))


# --------------------------------------------------------------------------- parts 2 and 3: the sender


class CommittingThread(threading.Thread):
    """Small transactions into a throwaway SQLite file until stopped: Python work in a second thread that
    takes the GIL between its SQLite calls, as the store's writer thread did."""

    def __init__(self, path: Path, deadline: float) -> None:
        super().__init__(name="bench-committer", daemon=True)
        self._path = path
        self._deadline = deadline
        self.halt = threading.Event()
        self.commits = 0
        self.cpu_seconds = 0.0
        self.error: str | None = None

    def run(self) -> None:
        cpu0 = time.thread_time()
        try:
            db = sqlite3.connect(self._path, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("CREATE TABLE attempts (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL, "
                           "created_at REAL NOT NULL, status_code INTEGER, body TEXT)")
                job_id = 0
                while not self.halt.is_set() and time.monotonic() < self._deadline and self.commits < BG_MAX_COMMITS:
                    db.execute("BEGIN IMMEDIATE")
                    for _ in range(BG_ROWS):
                        job_id += 1
                        db.execute("INSERT INTO attempts (job_id, created_at, status_code, body) VALUES (?, ?, ?, ?)",
                                   (job_id, time.time(), 204, ""))
                    db.execute("COMMIT")
                    self.commits += 1
                    self.halt.wait(BG_PAUSE)
            finally:
                db.close()
        except Exception as exc:  # noqa: BLE001 - reported with the part's result
            self.error = repr(exc)
        self.cpu_seconds = time.thread_time() - cpu0


def sender_alone(text: str, n: int, with_thread: bool, timeout: float) -> dict[str, Any]:
    """Child entry: post `n` jobs through the daemon's WebhookSender with CONCURRENCY coroutines."""
    config = daemon_like_process(text)
    return run_on_daemon_loop(_sender_alone(config, n, with_thread, timeout))


async def _sender_alone(config: config_module.Config, n: int, with_thread: bool, timeout: float) -> dict[str, Any]:
    sender = WebhookSender(bench_integration(config), USER_AGENT)
    payload, now = payload_text(), time.time()
    # Made up front: the store makes jobs when it claims them, which is part 4's cost, not the sender's.
    jobs = [Job(i + 1, INTEGRATION, 1, f"id-{i:08d}", "order.paid", payload, now) for i in range(n)]
    state = {"next": 0, "failed": 0}
    samples: list[str] = []
    deadline = time.monotonic() + timeout

    async def worker() -> None:
        while state["next"] < n and time.monotonic() < deadline:
            job = jobs[state["next"]]
            state["next"] += 1
            # Each post is bounded by the sender's own delivery.timeout (10 s).
            for outcome in await sender.deliver([job]):
                if not outcome.succeeded:
                    state["failed"] += 1
                    if len(samples) < ERROR_SAMPLES:
                        samples.append(f"{outcome.status_code}: {outcome.error}")

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="eventrelay-parts-") as tmp:
        thread = CommittingThread(Path(tmp) / "bg.db", deadline + 5) if with_thread else None
        await sender.start()
        try:
            if thread is not None:
                thread.start()
            t_start, cpu_start, main_start = time.monotonic(), time.process_time(), time.thread_time()
            try:
                await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), timeout + 15)
            finally:
                t_done, cpu_done, main_done = time.monotonic(), time.process_time(), time.thread_time()
                if thread is not None:
                    thread.halt.set()
                    # The thread runs blocking SQLite calls: joined off the loop, bounded.
                    await asyncio.to_thread(thread.join, 10)
        finally:
            await sender.close()
    seconds = max(t_done - t_start, 1e-9)
    out.update(
        sent=state["next"],
        failed=state["failed"],
        error_samples=samples,
        seconds=seconds,
        rate=state["next"] / seconds,
        cpu_s=cpu_done - cpu_start,
        cpu_pct=100.0 * (cpu_done - cpu_start) / seconds,
        main_cpu_s=main_done - main_start,
        main_cpu_pct=100.0 * (main_done - main_start) / seconds,
    )
    if thread is not None:
        out["bg_thread"] = {
            "commits": thread.commits,
            "rows": thread.commits * BG_ROWS,
            "commits_per_s": thread.commits / seconds,
            "cpu_pct": 100.0 * thread.cpu_seconds / seconds,
            "error": thread.error,
            "still_running": thread.is_alive(),
        }
    return out


# --------------------------------------------------------------------------- part 4: dispatcher and store


class InstantSender:
    """A sender whose target answers 204 at once: what remains is the dispatcher's and the store's work."""

    max_batch = 1

    def __init__(self, target: int) -> None:
        self.target = target
        self.delivered = 0
        self.done = asyncio.Event()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def deliver(self, jobs: Sequence[Job]) -> list[Outcome]:
        # One turn of the loop, as a real answer takes at least one.
        await asyncio.sleep(0)
        self.delivered += len(jobs)
        if self.delivered >= self.target:
            self.done.set()
        return [Outcome(j.id, True, 0.0001, status_code=204, body="") for j in jobs]


def dispatcher_and_store(text: str, n: int, timeout: float) -> dict[str, Any]:
    """Child entry: store `n` events, then deliver them through a real Dispatcher to an InstantSender."""
    config = daemon_like_process(text)
    return run_on_daemon_loop(_dispatcher_and_store(config, n, timeout))


async def _dispatcher_and_store(config: config_module.Config, n: int, timeout: float) -> dict[str, Any]:
    integration = bench_integration(config)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="eventrelay-parts-") as tmp:
        store = await open_store(config_module.StorageConfig(Path(tmp) / "er.db", "full"))
        writer = asyncio.create_task(store.run(), name="store-writer")
        try:
            sender = InstantSender(n)
            dispatcher = Dispatcher(integration, store, sender)

            def wake(names: set[str]) -> None:  # as Service._wake does
                if dispatcher.name in names:
                    dispatcher.wake()

            store.on_jobs_added = wake
            t_ingest = time.monotonic()
            for start in range(0, n, INGEST_BATCH):
                events = [parse_event({"type": "order.paid", "data": order_data(i)})
                          for i in range(start, min(start + INGEST_BATCH, n))]
                await asyncio.wait_for(store.ingest(events, [[(INTEGRATION, None)] for _ in events]), timeout)
            out["ingest_seconds"] = time.monotonic() - t_ingest

            t_start, cpu_start, main_start = time.monotonic(), time.process_time(), time.thread_time()
            run = asyncio.create_task(dispatcher.run(), name=f"dispatcher:{INTEGRATION}")
            try:
                await asyncio.wait_for(sender.done.wait(), timeout)
            except TimeoutError:
                out["error"] = f"only {sender.delivered}/{n} delivered within {timeout:g}s"
            t_done, cpu_done, main_done = time.monotonic(), time.process_time(), time.thread_time()
            dispatcher.stop()
            # run() returns once the outcomes in flight are committed; wait_for cancels it if it does not.
            await asyncio.wait_for(run, 30)
            # Counts pending and dead jobs only: none left means every outcome was committed as delivered.
            counts = await store.job_counts()
            out["left"] = {state.value: k for (name, state), k in counts.items() if name == INTEGRATION}
        finally:
            store.stop()
            try:
                await asyncio.wait_for(writer, 30)
            finally:
                await store.close()
    seconds = max(t_done - t_start, 1e-9)
    out.update(
        delivered=sender.delivered,
        seconds=seconds,
        rate=sender.delivered / seconds,
        cpu_s=cpu_done - cpu_start,
        cpu_pct=100.0 * (cpu_done - cpu_start) / seconds,
        main_cpu_s=main_done - main_start,
        main_cpu_pct=100.0 * (main_done - main_start) / seconds,
    )
    return out


# --------------------------------------------------------------------------- runs


def _own_and_children() -> float:
    """CPU seconds of this process and of its children that have exited and been waited for (part 4's
    database writer process, which the store waits for when it closes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def accounted(watch_pid: int | None, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Child entry: `fn(*args)`, plus where the machine's CPU went meanwhile: this process, the receiver
    (`watch_pid`) and anything else.  On two cores the client and the receiver can fill the machine, so a
    busy receiver or other work on the box (a test suite) shows beside the number it lowered."""
    t0, machine0, own0 = time.monotonic(), machine_busy_seconds(), _own_and_children()
    watched0 = cpu_seconds(watch_pid) if watch_pid is not None else 0.0
    res = fn(*args)
    wall = max(time.monotonic() - t0, 1e-9)
    machine, own = machine_busy_seconds() - machine0, _own_and_children() - own0
    watched1 = cpu_seconds(watch_pid) if watch_pid is not None else 0.0
    watched = (watched1 - watched0) if watched0 is not None and watched1 is not None else None
    if watch_pid is not None:
        res["receiver_cpu_pct"] = None if watched is None else 100.0 * watched / wall
    # Clamped at 0: per-process and machine-wide tick accounting round differently.
    res["other_cpu_pct"] = None if watched is None else max(0.0, 100.0 * (machine - own - watched) / wall)
    return res


def run_baseline(receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    receiver.reset()
    res = run_in_child(accounted, receiver.pid, webhook_baseline, receiver.hook_url, args.events, CONCURRENCY,
                       args.timeout, timeout=args.timeout + 30)
    # Waits only for what was posted: a part cut short by --timeout need not wait out the poll.
    res["delivered"] = receiver.wait_unique(res["sent"], timeout=10)["unique"]
    seconds = max(res["t_done"] - res["t_start"], 1e-9)
    # The same definition as the other HTTP parts: posts over the client's own posting time.
    res.update(seconds=seconds, rate=res["sent"] / seconds, cpu_pct=res["client_cpu_pct"], failed=res["errors"])
    return res


def run_sender(receiver: Receiver, args: argparse.Namespace, with_thread: bool) -> dict[str, Any]:
    receiver.reset()
    res = run_in_child(accounted, receiver.pid, sender_alone, config_text(receiver.hook_url), args.events,
                       with_thread, args.timeout, timeout=args.timeout + 45)
    # Waits only for what was posted: a part cut short by --timeout need not wait out the poll.
    res["delivered"] = receiver.wait_unique(res["sent"], timeout=10)["unique"]
    return res


def run_dispatcher(args: argparse.Namespace) -> dict[str, Any]:
    # The integration's URL is never contacted: the sender is the instant one.
    return run_in_child(accounted, None, dispatcher_and_store, config_text("http://127.0.0.1:9/unused"), args.events,
                        args.timeout, timeout=2 * args.timeout + 60)


def problems(name: str, part: dict[str, Any] | str, n: int) -> list[str]:
    """Why a part failed or is incomplete, if it is: these make the exit status 1."""
    if isinstance(part, str):
        return [f"{name}: {part}"]
    notes = []
    if part.get("error"):
        notes.append(f"{name}: {part['error']}")
    if part.get("failed"):
        notes.append(f"{name}: {part['failed']} posts failed, e.g. {part.get('error_samples')}")
    if "delivered" in part and part["delivered"] < n:
        notes.append(f"{name}: {part['delivered']}/{n} delivered")
    bg = part.get("bg_thread")
    if bg and (bg["error"] or bg["still_running"]):
        notes.append(f"{name}: committing thread {bg['error'] or 'did not stop'}")
    if part.get("left"):
        notes.append(f"{name}: jobs not recorded as delivered after the stop: {part['left']}")
    return notes


def derive(sender: dict[str, Any] | str, disp: dict[str, Any] | str) -> dict[str, float] | None:
    """Per-delivery CPU from parts 2 and 4; over what they did, which is N unless --timeout cut them short."""
    if not isinstance(sender, dict) or not isinstance(disp, dict) or not sender["sent"] or not disp["delivered"]:
        return None
    post_us = sender["cpu_s"] / sender["sent"] * 1e6
    dispatch_us = disp["main_cpu_s"] / disp["delivered"] * 1e6
    return {
        "dispatcher_store_main_us": dispatch_us,
        "sender_us_per_post": post_us,
        "expected_main_us_per_delivery": dispatch_us + post_us,
        "expected_rate_if_main_thread_bound": 1e6 / (dispatch_us + post_us),
    }


# --------------------------------------------------------------------------- output

PARTS = (
    ("baseline", "1 baseline: raw aiohttp",
     "what one asyncio process posts through aiohttp here"),
    ("sender", "2 sender alone",
     "WebhookSender (envelope, headers, answer) on aiohttp"),
    ("sender_bg", "3 sender + committing thread",
     "vs 2: a 2nd thread's commits cost the loop (GIL)"),
    ("dispatcher", "4 dispatcher + store alone",
     "claim, gate, decide, write-behind; no HTTP"),
)


def fmt_pct(v: float | None) -> str:
    return f"{v:.0f}%" if v is not None else "n/a"


def print_report(results: dict[str, dict[str, Any] | str], derived: dict[str, float] | None,
                 args: argparse.Namespace) -> None:
    base = results["baseline"]
    b_rate = base.get("rate") if isinstance(base, dict) else None
    head = f"{'part':<31} {'rate/s':>7} {'vs base':>7} {'CPU % (main)':>12} {'other':>5}  what it shows"
    print(head)
    print("-" * (len(head) + 40))
    for key, label, shows in PARTS:
        part = results[key]
        if not isinstance(part, dict):
            print(f"{label:<31} {'n/a':>7} {'':>7} {'':>12} {'':>5}  {part}")
            continue
        rate = part.get("rate")
        ratio = f"{rate / b_rate:.0%}" if rate and b_rate else "n/a"
        main = part.get("main_cpu_pct")
        cpu = fmt_pct(part.get("cpu_pct")) + (f" ({main:.0f}%)" if main is not None else "")
        print(f"{label:<31} {(f'{rate:,.0f}' if rate else 'n/a'):>7} {ratio:>7} {cpu:>12} "
              f"{fmt_pct(part.get('other_cpu_pct')):>5}  {shows}")
    print("  CPU %: the part's process over its measured time (100% = one core); (main): its event-loop thread;")
    print("  other: CPU used on the machine by neither that process nor the receiver (noise from other work)")
    print()

    print("details")
    for key, label, _ in PARTS[:3]:
        part = results[key]
        if isinstance(part, dict):
            print(f"  {label.split(':')[0]}: {part.get('delivered')}/{args.events} distinct ids at the receiver "
                  f"in {part['seconds']:.2f}s, failed {part.get('failed')}, receiver cpu "
                  f"{fmt_pct(part.get('receiver_cpu_pct'))}")
    alone, beside = results["sender"], results["sender_bg"]
    bg = beside.get("bg_thread") if isinstance(beside, dict) else None
    if bg:
        cost = (f"; part 3 ran at {beside['rate'] / alone['rate']:.0%} of part 2's rate"
                if isinstance(alone, dict) and alone.get("rate") else "")
        print(f"  committing thread: {bg['commits']} commits of {BG_ROWS} rows ({bg['commits_per_s']:,.0f}/s), "
              f"its own cpu {fmt_pct(bg['cpu_pct'])}{cost}")
    disp = results["dispatcher"]
    if isinstance(disp, dict):
        print(f"  4 dispatcher + store: ingest of {args.events} events took {disp['ingest_seconds']:.2f}s (not "
              f"measured); {disp['delivered']} delivered in {disp['seconds']:.2f}s; main thread "
              f"{fmt_pct(disp['main_cpu_pct'])}, process {fmt_pct(disp['cpu_pct'])} (reader thread included, writer "
              f"process not: it is not counted as other work either); jobs left pending or dead: "
              f"{sum(disp.get('left', {}).values())}")
    print()

    if derived is not None:
        print("derived: event-loop-thread CPU per delivery")
        print(f"  dispatcher + store (4): main-thread cpu / N  {derived['dispatcher_store_main_us']:8.1f} µs")
        print(f"  sender (2):             process cpu / N      {derived['sender_us_per_post']:8.1f} µs")
        print(f"  expected per delivery:  sum                  {derived['expected_main_us_per_delivery']:8.1f} µs"
              f"  (a main-thread-bound daemon: at most "
              f"{derived['expected_rate_if_main_thread_bound']:,.0f}/s)")
    else:
        print("derived: n/a (part 2 or 4 failed)")
    for note in [note for key, _, _ in PARTS for note in problems(key, results[key], args.events)]:
        print(f"WARNING: {note}")
    busy = [key for key, _, _ in PARTS
            if isinstance(results[key], dict) and (results[key].get("other_cpu_pct") or 0) > BUSY_OTHER_PCT]
    if busy:
        print(f"WARNING: {', '.join(busy)} shared the machine with other work (other cpu > {BUSY_OTHER_PCT:.0f}%); "
              "those numbers are low and noisy, rerun on a quiet machine")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000, help="deliveries per part (default 20000)")
    ap.add_argument("--timeout", type=float, default=60.0, help="max seconds of each part's measured run (default 60)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    if not 1 <= args.events <= 200_000 or not 0 < args.timeout <= 600:
        ap.error("bounds: 1 <= --events <= 200000, 0 < --timeout <= 600")

    env = environment()
    settings = {
        "events": args.events,
        "concurrency": CONCURRENCY,
        "ingest_batch": INGEST_BATCH,
        "bg_thread": f"{BG_ROWS}-row-commits+{BG_PAUSE * 1e3:g}ms-sleep",
        "store_synchronous": "full",
        "timeout": args.timeout,
    }
    if not args.json:
        print_header("eventrelay webhook delivery, in parts", env, settings)

    results: dict[str, dict[str, Any] | str] = {}
    with Receiver() as receiver:
        log(f"1 baseline: raw aiohttp client, {args.events} posts, concurrency {CONCURRENCY} ...")
        try:
            results["baseline"] = run_baseline(receiver, args)
        except Exception as exc:  # noqa: BLE001 - report, run the other parts
            results["baseline"] = f"failed: {exc}"
        for key, with_thread, what in (("sender", False, "2 sender alone"),
                                       ("sender_bg", True, "3 sender beside a committing thread")):
            log(f"{what}: {args.events} jobs, {CONCURRENCY} coroutines ...")
            try:
                results[key] = run_sender(receiver, args, with_thread)
            except Exception as exc:  # noqa: BLE001
                results[key] = f"failed: {exc}"
    log(f"4 dispatcher + store alone: {args.events} stored events, instant sender ...")
    try:
        results["dispatcher"] = run_dispatcher(args)
    except Exception as exc:  # noqa: BLE001
        results["dispatcher"] = f"failed: {exc}"

    derived = derive(results["sender"], results["dispatcher"])
    if args.json:
        doc = {"benchmark": "parts", "env": env, "settings": settings, "parts": results, "derived": derived}
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_report(results, derived, args)
    notes = [note for key, _, _ in PARTS for note in problems(key, results[key], args.events)]
    return 1 if notes or derived is None else 0


if __name__ == "__main__":
    sys.exit(main())
