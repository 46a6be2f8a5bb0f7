"""Webhook delivery throughput and accept->delivered latency of eventrelay.

Four runs, each with its load generator in a separate process and a local aiohttp
webhook receiver (its own process) that counts POSTs, answers 204 and records the
first arrival time of every envelope id:

  1. baseline    a raw aiohttp ClientSession posts N envelope-sized bodies to the
                 receiver with concurrency 8 (the daemon's delivery.concurrency): what
                 one asyncio process can push through aiohttp's client on this box.
  2. backlog     delivery alone, as the baseline does it: N events are pre-loaded over
                 HTTP in batches of 1000 while the integration's rate limit (1/s) holds
                 them back; a reload (SIGHUP) lifts the limit, and the run is measured
                 from the SIGHUP until the receiver has seen every id still waiting.
                 target >= 60% of the baseline rate.
  3. throughput  the same, without the hold: delivery starts with the first committed
                 batch and overlaps the pre-load (ingest and delivery share the process);
                 measured from the first 202 until the receiver has seen N distinct ids.
                 Shown for comparison, against the same target.
  4. latency     single events over HTTP at a fixed rate (default 1000/s for 5 s, after
                 1 s of warm-up at the same rate), each with an id set by the bench;
                 latency = receiver's arrival time - client's receipt of the 202.
                 target p50 < 5 ms, p99 < 50 ms.

All timestamps are time.monotonic(), which on Linux is one system-wide clock, so times
taken in different processes compare directly.

    .venv/bin/python bench/deliver.py [--events 20000] [--rate 1000] [--seconds 5] [--rounds 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

from benchlib import (
    run_on_daemon_loop,
    TRIGGER_HEADER,
    ChildCall,
    BUSY_OTHER_PCT,
    CpuMeter,
    Daemon,
    preload,
    Receiver,
    daemon_problems,
    delivery_latency,
    environment,
    held_webhook,
    log,
    lower_median,
    order_data,
    other_cpu_pct,
    paced,
    print_header,
    release_backlog,
    run_in_child,
    webhook_integration,
)

BATCH = 1000  # pre-load batch size (the contract's maximum)
CONCURRENCY = 8  # delivery.concurrency, and the baseline client's concurrency


# --------------------------------------------------------------------------- child entry points


def envelope_template() -> tuple[bytes, bytes]:
    """An envelope shaped like the daemon's, split around the id for cheap per-request ids."""
    marker = "@@ID@@"
    payload = {"data": order_data(0)}
    env = {
        "id": marker,
        "triggered_by": "order.paid",
        "attempt": 1,
        "integration": {"id": str(uuid.UUID(int=1)), "integration_type": "webhook", "name": "bench-hook", "description": None},
        # Elastic Path's `resources`, the payload as a JSON string, which the daemon sends by default.
        "resources": json.dumps(payload, separators=(",", ":")),
        "payload": payload,
    }
    # Compact separators: a delivery daemon has no reason to send pretty JSON.
    prefix, suffix = json.dumps(env, separators=(",", ":")).split(marker)
    return prefix.encode(), suffix.encode()


def webhook_baseline(hook_url: str, n: int, concurrency: int, timeout: float) -> dict[str, Any]:
    """Child entry: post `n` envelopes with `concurrency` workers on one ClientSession."""
    return run_on_daemon_loop(_webhook_baseline(hook_url, n, concurrency, timeout))


async def _webhook_baseline(hook_url: str, n: int, concurrency: int, timeout: float) -> dict[str, Any]:
    import aiohttp

    prefix, suffix = envelope_template()
    headers = {"Content-Type": "application/json", TRIGGER_HEADER: "order.paid"}
    state = {"next": 0, "errors": 0, "bytes": 0}
    samples: list[str] = []
    deadline = time.monotonic() + timeout

    async def worker(session: aiohttp.ClientSession) -> None:
        while state["next"] < n and time.monotonic() < deadline:
            i = state["next"]
            state["next"] += 1
            body = prefix + f"base-{i:08d}".encode() + suffix
            state["bytes"] += len(body)
            try:
                async with session.post(hook_url, data=body, headers=headers) as resp:
                    await resp.read()
                    if not 200 <= resp.status < 300:
                        state["errors"] += 1
            except Exception as exc:  # noqa: BLE001 - count, keep going (bounded)
                state["errors"] += 1
                if len(samples) < 3:
                    samples.append(repr(exc))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        t_start, cpu_start = time.monotonic(), time.process_time()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        t_done, cpu_done = time.monotonic(), time.process_time()
    return {
        "t_start": t_start,
        "t_done": t_done,
        "sent": state["next"],
        "errors": state["errors"],
        "error_samples": samples,
        "avg_body_bytes": state["bytes"] / max(state["next"], 1),
        "client_cpu_s": time.process_time(),  # whole process, for the "other cpu" sum
        # The posting itself: near 100% means this baseline is what aiohttp's client can
        # do on one core, which is also the ceiling of a single-process delivery daemon.
        "client_cpu_pct": 100.0 * (cpu_done - cpu_start) / max(t_done - t_start, 1e-9),
    }




# --------------------------------------------------------------------------- runs


def run_baseline(receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    receiver.reset()
    machine, r_meter = CpuMeter(None), CpuMeter(receiver.pid)
    res = run_in_child(webhook_baseline, receiver.hook_url, args.events, CONCURRENCY, args.timeout, timeout=args.timeout + 30)
    st = receiver.wait_unique(args.events, timeout=10)
    res["receiver_cpu_pct"] = r_meter.percent()
    res["other_cpu_pct"] = other_cpu_pct(machine, [r_meter.seconds(), res["client_cpu_s"]])
    res["receiver"] = st
    res["delivered"] = st["unique"]
    if st["unique"] >= args.events:
        res["rate"] = args.events / (st["t_last_new"] - res["t_start"])
    return res


def run_throughput(receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    receiver.reset()
    out: dict[str, Any] = {}
    with Daemon(synchronous=args.synchronous, integrations=[webhook_integration(receiver.hook_url)], concurrency=CONCURRENCY) as d:
        machine, d_meter, r_meter = CpuMeter(None), CpuMeter(d.pid), CpuMeter(receiver.pid)
        loader = ChildCall(preload, d.events_url, args.events, BATCH, args.timeout)
        # Poll the receiver while the pre-load runs: delivery starts as soon as the
        # first batch commits, so the two overlap as they would in production.
        st = receiver.wait_unique(args.events, timeout=args.timeout)
        out["daemon_cpu_pct"], out["receiver_cpu_pct"] = d_meter.percent(), r_meter.percent()
        d_cpu, r_cpu = d_meter.seconds(), r_meter.seconds()
        out["daemon_rss_kib"] = d.rss()
        out["load"] = loader.result(timeout=args.timeout + 30)
        # The loader usually finished long before delivery did, so its CPU is all inside.
        out["other_cpu_pct"] = other_cpu_pct(machine, [d_cpu, r_cpu, out["load"]["client_cpu_s"]])
        time.sleep(0.5)  # let late duplicates (if any) show up in the counters
        out["receiver"] = receiver.stats()
        d.stop()  # SIGTERM now, so its log can be inspected before the tempdir goes
        out["daemon_notes"] = daemon_problems(d)
        if st["unique"] < args.events:
            out["daemon_notes"].append("log tail: " + d.log_tail(8).replace("\n", " | ")[:800])
    out["delivered"] = st["unique"]
    t_first = out["load"].get("t_first_accept")
    if st["unique"] >= args.events and t_first is not None:
        out["seconds"] = st["t_last_new"] - t_first
        out["rate"] = args.events / out["seconds"]
    elif t_first is not None and st["t_last_new"] is not None:
        out["partial_rate"] = st["unique"] / max(st["t_last_new"] - t_first, 1e-9)
    if "t_last_accept" in out["load"]:
        out["ingest_seconds"] = out["load"]["t_last_accept"] - out["load"]["t_first_send"]
    return out


def run_backlog(receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    """Delivery alone, as the baseline does it: N events are stored first, held back by a rate limit of
    1/s, and released by a reload (SIGHUP) that lifts the limit; measured from the SIGHUP until the
    receiver has seen every id that was still waiting."""
    receiver.reset()
    with Daemon(synchronous=args.synchronous, integrations=[held_webhook(receiver.hook_url)],
                concurrency=CONCURRENCY) as d:
        out = release_backlog([d], receiver, args.events, args.timeout, batch=BATCH)
        d.stop()
        out["daemon_notes"] = daemon_problems(d)
    return out


def run_latency(receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    receiver.reset()
    out: dict[str, Any] = {}
    with Daemon(synchronous=args.synchronous, integrations=[webhook_integration(receiver.hook_url)], concurrency=CONCURRENCY) as d:
        budget = args.warmup + args.seconds + 90
        machine, d_meter, r_meter = CpuMeter(None), CpuMeter(d.pid), CpuMeter(receiver.pid)
        res = run_in_child(paced, d.events_url, args.rate, args.warmup, args.seconds, 64, timeout=budget)
        out["daemon_cpu_pct"] = d_meter.percent()
        out["other_cpu_pct"] = other_cpu_pct(machine, [d_meter.seconds(), r_meter.seconds(), res["client_cpu_s"]])
        expected = int(args.rate * args.warmup) + int(args.rate * args.seconds)
        st = receiver.wait_unique(expected, timeout=args.drain_timeout)
        arrivals = receiver.arrivals()
        out["daemon_rss_kib"] = d.rss()
        d.stop()
        out["daemon_notes"] = daemon_problems(d)
    out.update(
        delivery_latency(res, arrivals),
        client_errors=res["error_count"],
        client_error_samples=res["errors"],
        achieved_rate=res["achieved_rate"],
        max_schedule_lag_ms=res["max_schedule_lag_ms"],
        receiver=st,
    )
    return out


# --------------------------------------------------------------------------- output


def verdict(ok: bool | None) -> str:
    return {True: "MET", False: "MISSED", None: "n/a"}[ok]


def _ratio(base: dict[str, Any], run: dict[str, Any] | str | None) -> float | None:
    rate = run.get("rate") if isinstance(run, dict) else None
    return rate / base["rate"] if rate and base.get("rate") else None


def _rate_text(run: dict[str, Any] | str | None) -> str:
    return f"{run['rate']:,.0f}/s" if isinstance(run, dict) and run.get("rate") else "n/a"


def _ratio_text(base: dict[str, Any], run: dict[str, Any] | str | None) -> str:
    ratio = _ratio(base, run)
    return f"{ratio:.0%}" if ratio is not None else "n/a"


def median_round(rounds: list[tuple[dict[str, Any], dict[str, Any] | str | None]]
                 ) -> tuple[dict[str, Any], dict[str, Any] | str | None]:
    """The round with the median ratio (without daemon runs: the median baseline rate)."""
    return lower_median(rounds, lambda pair: _ratio(*pair) if pair[1] is not None else pair[0].get("rate"))


def print_report(
    base: dict[str, Any], thr: dict[str, Any] | str | None, backlog: dict[str, Any] | str | None,
    lat: dict[str, Any] | str | None, args: argparse.Namespace
) -> None:
    b_rate = base.get("rate")
    head = f"{'measurement':<40} {'value':>14} {'baseline':>14} {'ratio':>6}  {'target':<14} {'result':<6}"
    print(head)
    print("-" * len(head))
    # The target's figure is delivery alone, as the baseline does it (a stored backlog); the same N delivered
    # while the daemon is also ingesting it is shown beside it.
    for label, run in ((f"delivery, stored backlog (N={args.events})", backlog),
                       (f"delivery while ingesting (N={args.events})", thr)):
        t_rate = run.get("rate") if isinstance(run, dict) else None
        ratio = t_rate / b_rate if t_rate and b_rate else None
        print(
            f"{label:<40} "
            f"{(f'{t_rate:,.0f}/s' if t_rate else 'n/a'):>14} {(f'{b_rate:,.0f}/s' if b_rate else 'n/a'):>14} "
            f"{(f'{ratio:.0%}' if ratio is not None else 'n/a'):>6}  {'>= 60% of base':<14} "
            f"{verdict(ratio >= 0.60 if ratio is not None else (None if run is None else False))}"
        )
    if isinstance(lat, dict):
        a = lat["accept_to_delivered"]
        has = a["n"] > 0
        p50 = f"{a['p50_ms']:.2f} ms" if has else "n/a"
        p99 = f"{a['p99_ms']:.2f} ms" if has else "n/a"
        label = f"accept->delivered p50 @{args.rate:g}/s"
        print(f"{label:<40} {p50:>14} {'':>14} {'':>6}  {'< 5 ms':<14} {verdict(a['p50_ms'] < 5 if has else False)}")
        label = f"accept->delivered p99 @{args.rate:g}/s"
        ok99 = a["p99_ms"] < 50 and lat["missing"] == 0 if has else False
        print(f"{label:<40} {p99:>14} {'':>14} {'':>6}  {'< 50 ms':<14} {verdict(ok99)}")
    else:
        print(f"{'accept->delivered latency':<40} {'n/a':>14}   {lat or 'not run'}")
    print()

    print("details")
    print(
        f"  baseline: {base.get('delivered', 0)}/{args.events} delivered, errors {base.get('errors')}, "
        f"avg body {base.get('avg_body_bytes', 0):.0f} B, client cpu {fmt_pct(base.get('client_cpu_pct'))}, "
        f"receiver cpu {fmt_pct(base.get('receiver_cpu_pct'))}, "
        f"other cpu {fmt_pct(base.get('other_cpu_pct'))}"
    )
    if isinstance(thr, dict):
        rs, ld = thr.get("receiver", {}), thr.get("load", {})
        avg = rs.get("bytes", 0) / max(rs.get("posts", 0), 1)
        print(
            f"  throughput: {thr.get('delivered')}/{args.events} delivered"
            + (f" in {thr['seconds']:.2f}s" if "seconds" in thr else "")
            + (f" (partial rate {thr['partial_rate']:,.0f}/s)" if "partial_rate" in thr else "")
            + f"; pre-load accepted {ld.get('accepted')} events, jobs {ld.get('jobs')}, "
            f"in {thr.get('ingest_seconds', float('nan')):.2f}s"
        )
        print(
            f"              receiver: posts {rs.get('posts')}, duplicates {rs.get('duplicates')}, "
            f"retries {rs.get('retries')}, missing {TRIGGER_HEADER} {rs.get('missing_header')}, "
            f"bad {rs.get('bad')}, avg body {avg:.0f} B"
        )
        rss = thr.get("daemon_rss_kib", {})
        print(
            f"              daemon cpu {fmt_pct(thr.get('daemon_cpu_pct'))}, receiver cpu "
            f"{fmt_pct(thr.get('receiver_cpu_pct'))}, other cpu {fmt_pct(thr.get('other_cpu_pct'))}, "
            f"daemon rss {rss.get('vmrss', 0) / 1024:.0f} MiB (peak {rss.get('vmhwm', 0) / 1024:.0f})"
        )
        if ld.get("errors"):
            print(f"              pre-load errors: {ld['errors']}")
    if isinstance(backlog, dict):
        print(
            f"  backlog: {backlog.get('delivered')} delivered"
            + (f" in {backlog['seconds']:.2f}s after the SIGHUP" if "seconds" in backlog else "")
            + f" ({backlog.get('before')} let through by the rate limit before it); daemon cpu "
            f"{fmt_pct(backlog.get('daemon_cpu_pct'))}, receiver cpu {fmt_pct(backlog.get('receiver_cpu_pct'))}"
        )
    elif backlog is not None:
        print(f"  backlog: {backlog}")
    elif thr is not None:
        print(f"  throughput: {thr}")
    if isinstance(lat, dict):
        e, a = lat["send_to_delivered"], lat["accept_to_delivered"]
        rs = lat["receiver"]
        print(
            f"  latency: {lat['accepted']}/{lat['measured']} accepted, {lat['missing']} not delivered, "
            f"client errors {lat['client_errors']}, achieved rate {lat['achieved_rate']:,.0f}/s, "
            f"max schedule lag {lat['max_schedule_lag_ms']:.1f} ms"
        )
        print(
            f"           accept->delivered p90 {a['p90_ms']:.2f} max {a['max_ms']:.2f} ms "
            f"({lat['negative']} deliveries arrived before the client saw the 202); "
            f"send->delivered p50 {e['p50_ms']:.2f} p99 {e['p99_ms']:.2f} max {e['max_ms']:.2f} ms"
        )
        print(
            f"           receiver: posts {rs.get('posts')}, duplicates {rs.get('duplicates')}, "
            f"retries {rs.get('retries')}; daemon cpu {fmt_pct(lat.get('daemon_cpu_pct'))}, "
            f"other cpu {fmt_pct(lat.get('other_cpu_pct'))}"
        )
        if lat["client_error_samples"]:
            print(f"           client errors: {lat['client_error_samples']}")
    for name, part in (("throughput", thr), ("backlog", backlog), ("latency", lat)):
        if isinstance(part, dict):
            for note in part.get("daemon_notes", []):
                print(f"daemon ({name}): {note}")
    busy = [
        name
        for name, part in (("baseline", base), ("throughput", thr), ("latency", lat))
        if isinstance(part, dict) and (part.get("other_cpu_pct") or 0) > BUSY_OTHER_PCT
    ]
    if busy:
        print(
            f"WARNING: {', '.join(busy)} shared the machine with other work (other cpu > {BUSY_OTHER_PCT:.0f}%); "
            "those numbers are low and noisy, rerun on a quiet machine"
        )


def fmt_pct(v: float | None) -> str:
    return f"{v:.0f}%" if v is not None else "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000, help="events for the throughput runs (default 20000)")
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s for the latency run (default 1000)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds of the latency run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured warm-up of the latency run (default 1)")
    ap.add_argument("--timeout", type=float, default=40.0, help="max seconds for each throughput run (default 40)")
    ap.add_argument("--drain-timeout", type=float, default=15.0, help="max wait for late deliveries (default 15)")
    ap.add_argument("--synchronous", choices=("full", "normal"), default="full", help="storage.synchronous")
    ap.add_argument("--rounds", type=int, default=1,
                    help="raw-client / stored-backlog pairs, alternating; the table shows the median round")
    ap.add_argument("--baseline-only", action="store_true", help="run only the raw-client baseline")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    if not 0 < args.events <= 200_000 or not 0 < args.rate <= 20_000 or not 0 < args.seconds <= 60 \
            or not 1 <= args.rounds <= 20:
        ap.error("bounds: 0 < --events <= 200000, 0 < --rate <= 20000, 0 < --seconds <= 60, 1 <= --rounds <= 20")

    env = environment()
    settings = {
        "events": args.events,
        "batch": BATCH,
        "concurrency": CONCURRENCY,
        "rate": args.rate,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "synchronous": args.synchronous,
        "rounds": args.rounds,
    }
    if not args.json:
        print_header("eventrelay webhook delivery benchmark", env, settings)

    thr: dict[str, Any] | str | None = None  # None: not run (--baseline-only)
    backlog: dict[str, Any] | str | None = None
    lat: dict[str, Any] | str | None = None
    rounds: list[tuple[dict[str, Any], dict[str, Any] | str | None]] = []
    with Receiver() as receiver:
        # The target's pair (raw client, stored backlog) alternates --rounds times; the run while ingesting
        # and the latency run come once, after.
        for n in range(1, args.rounds + 1):
            log(f"round {n}: baseline: raw aiohttp client, {args.events} posts, concurrency {CONCURRENCY} ...")
            b = run_baseline(receiver, args)
            bl: dict[str, Any] | str | None = None
            if not args.baseline_only:
                log(f"round {n}: eventrelay backlog: {args.events} stored events released by a reload ...")
                try:
                    bl = run_backlog(receiver, args)
                except Exception as exc:  # noqa: BLE001 - report, then go on
                    bl = f"failed: {exc}"
            rounds.append((b, bl))
        base, backlog = median_round(rounds)
        if not args.baseline_only:
            log(f"eventrelay throughput: {args.events} events in batches of {BATCH} ...")
            try:
                thr = run_throughput(receiver, args)
            except Exception as exc:  # noqa: BLE001 - report, then try the latency run
                thr = f"failed: {exc}"
            log(f"eventrelay latency: {args.rate:g} events/s for {args.warmup:g}+{args.seconds:g}s ...")
            try:
                lat = run_latency(receiver, args)
            except Exception as exc:  # noqa: BLE001
                lat = f"failed: {exc}"

    if args.json:
        doc = {"benchmark": "deliver", "env": env, "settings": settings, "baseline": base, "throughput": thr,
               "backlog": backlog, "latency": lat,
               "rounds": [{"baseline": b, "backlog": bl, "ratio": _ratio(b, bl)} for b, bl in rounds]}
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_report(base, thr, backlog, lat, args)
        if len(rounds) > 1:
            print(f"stored backlog, {len(rounds)} rounds (eventrelay / raw client, ratio): " + "; ".join(
                f"{_rate_text(bl)} / {_rate_text(b)} {_ratio_text(b, bl)}" for b, bl in rounds))
    failed = (isinstance(thr, str) or isinstance(lat, str) or any(isinstance(bl, str) for _, bl in rounds)
              or any("rate" not in b for b, _ in rounds))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
