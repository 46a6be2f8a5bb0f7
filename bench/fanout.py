"""Fan-out to many webhook integrations, some of them failing (issue 6).

Target: "100 integrations, 10 of them failing: healthy ones keep >= 90% of their
single-integration throughput."

Three runs in one invocation, each against a fresh daemon (a subprocess, its own
tempdir) and the same webhook receiver process(es), which count distinct envelope ids
per path (/hook/NAME: one path per integration):

  A. one       ONE healthy webhook integration; --base-events events (default 20000,
               as bench/deliver.py) pre-loaded over HTTP in batches of 1000; rate =
               events / (receiver's last new arrival - first 202).
  B. failing   90 healthy integrations + 10 failing ones, all observing order.paid;
               --events N events pre-loaded the same way -> 90 x N healthy deliveries.
               Failing targets, a mix of what breaks in production:
                 4 connection refused (a port where nothing listens),
                 3 answer 500 (/fail500/NAME),
                 3 answer only after the delivery timeout (/hang/NAME; these
                   integrations get delivery.timeout 2s, the others the default 10s).
               Measured: the aggregate healthy rate (90 x N / (last healthy arrival -
               first 202)), each healthy integration's own rate (N / (its last
               arrival - first 202)): min / median / max, and what the failing
               integrations did (attempts per the daemon's /metrics and per the
               receiver, circuit-breaker transitions).
  C. healthy   the same 90 healthy integrations, no failing ones, same N.

What the target can honestly mean here.  The daemon is one CPU-bound Python process:
90 integrations share the CPU that one integration had to itself, so an integration's
own rate in B is about 1/90 of A whatever the daemon does.  The literal reading (B
per-integration rate / A) is printed, but as information.  The two verdicts are:

  isolation = B aggregate healthy rate / C aggregate rate    target >= 90%
      The 10 failing integrations must not slow the healthy ones: what failing targets
      cost (their job rows at ingest, attempts, timeouts, retries, breaker probes, log
      lines) must stay under 10% of the healthy throughput.  C, not "100 healthy", is
      the comparison: it is what the 90 get when the 10 do not exist at all.
  scale = C aggregate rate / A rate                          target >= 90%
      Many integrations must not cost throughput by themselves: 90 integrations should
      get at least as many deliveries per second, together, as one does alone
      (per-integration sessions, claims, wake-ups and connections are the overhead).

Also reported: the per-integration spread (min/median/max rate, when the first and
last healthy integration finished: a starved integration shows as a low min), the
CPU% of the daemon and of the receiver(s) (a receiver near 100% would cap the numbers:
use --receivers 2), the daemon's RSS, its warning lines (those of the failing
integrations are expected and counted by message; any other is reported).

All timestamps are time.monotonic(), one system-wide clock on Linux, so times taken in
different processes compare directly.  Every wait is bounded (--timeout per run).

    .venv/bin/python bench/fanout.py [--events 2000] [--base-events 20000] [--receivers 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import urllib.request
from typing import Any

from benchlib import (
    BUSY_OTHER_PCT,
    ChildCall,
    CpuMeter,
    Daemon,
    Receiver,
    daemon_problems,
    environment,
    free_port,
    log,
    other_cpu_pct,
    preload,
    print_header,
)

BATCH = 1000  # pre-load batch size (the contract's maximum)
CONCURRENCY = 8  # delivery.concurrency of every integration (the default), as in bench/deliver.py
HANG_TIMEOUT = 2.0  # delivery.timeout of the integrations whose target hangs
HANG_SECONDS = 3 * HANG_TIMEOUT  # how long /hang/NAME holds an answer back
POLL = 0.25  # receiver polling interval while a run is under way


# --------------------------------------------------------------------------- integrations


def hook(name: str, url: str, delivery: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "integration_type": "webhook",
        "observes": ["order.paid"],
        "configuration": {"url": url},
    }
    if delivery:
        out["delivery"] = delivery
    return out


def healthy_integrations(receivers: list[Receiver], n: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """`n` healthy integrations spread round-robin over the receivers; also name -> (receiver base, path)."""
    specs, where = [], {}
    for i in range(n):
        name = f"ok-{i:03d}"
        r = receivers[i % len(receivers)]
        specs.append(hook(name, f"{r.base}/hook/{name}"))
        where[name] = r.base
    return specs, where


def failing_integrations(receivers: list[Receiver], n: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """`n` failing integrations: 40% connection refused, 30% HTTP 500, 30% hang past the timeout."""
    refused = round(n * 0.4)
    err500 = round(n * 0.3)
    specs, modes = [], {}
    dead_port = free_port()  # closed again at once: nothing listens there
    for i in range(n):
        r = receivers[i % len(receivers)]
        if i < refused:
            name, mode = f"refused-{i}", "refused"
            specs.append(hook(name, f"http://127.0.0.1:{dead_port}/hook/{name}"))
        elif i < refused + err500:
            name, mode = f"err500-{i}", "500"
            specs.append(hook(name, f"{r.base}/fail500/{name}"))
        else:
            name, mode = f"hang-{i}", "hang"
            specs.append(hook(name, f"{r.base}/hang/{name}", {"timeout": f"{HANG_TIMEOUT:g}s"}))
        modes[name] = mode
    return specs, modes


# --------------------------------------------------------------------------- daemon side


_METRIC = re.compile(r'^(eventrelay_[a-z_]+)\{([^}]*)\}\s+([0-9.eE+-]+|NaN)$')
_LABEL = re.compile(r'([a-z_]+)="([^"]*)"')


def scrape_metrics(d: Daemon) -> dict[str, dict[str, float]]:
    """The per-integration series of /metrics: {integration: {series[:label]: value}}."""
    with urllib.request.urlopen(f"{d.http_url}/metrics", timeout=30) as resp:  # noqa: S310 (loopback)
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2)))
        name = labels.pop("integration", None)
        if name is None:
            continue
        key = m.group(1) + "".join(f":{v}" for k, v in sorted(labels.items()) if k != "le")
        if "le" in labels:
            continue  # histogram buckets: not needed
        out.setdefault(name, {})[key] = float(m.group(3))
    return out


def split_log(d: Daemon, failing: set[str]) -> tuple[dict[str, int], int]:
    """Count the warning lines of the failing integrations by message; return (counts, total lines)."""
    counts: dict[str, int] = {}
    total = 0
    try:
        lines = d.log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return counts, 0
    for ln in lines:
        if not ln.strip():
            continue
        total += 1
        if expected_line(ln, failing):
            msg = json.loads(ln).get("event", "?")
            counts[msg] = counts.get(msg, 0) + 1
    return counts, total


def expected_line(line: str, failing: set[str]) -> bool:
    """A warning the benchmark provoked: level warning, from one of the failing integrations."""
    try:
        rec = json.loads(line)
    except ValueError:
        return False
    return isinstance(rec, dict) and rec.get("level") == "warning" and rec.get("integration") in failing


# --------------------------------------------------------------------------- one run


def wait_total(receivers: list[Receiver], n: int, timeout: float) -> tuple[int, bool]:
    """Poll until the receivers saw `n` distinct (path, id) pairs in all, or `timeout` s passed."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = sum(r.stats()["unique"] for r in receivers)
        if seen >= n:
            return seen, True
        time.sleep(POLL)
    return seen, False


def run(label: str, receivers: list[Receiver], n_events: int, n_healthy: int, n_failing: int,
        args: argparse.Namespace) -> dict[str, Any]:
    for r in receivers:
        r.reset()
    healthy, where = healthy_integrations(receivers, n_healthy)
    failing, modes = failing_integrations(receivers, n_failing)
    expected_total = n_healthy * n_events
    out: dict[str, Any] = {"label": label, "events": n_events, "healthy": n_healthy, "failing": n_failing,
                           "expected_deliveries": expected_total}
    with Daemon(synchronous=args.synchronous, integrations=healthy + failing, concurrency=CONCURRENCY,
                ready_timeout=60) as d:
        out["ready_seconds"] = d.ready_seconds
        machine, d_meter = CpuMeter(None), CpuMeter(d.pid)
        r_meters = [CpuMeter(r.pid) for r in receivers]
        loader = ChildCall(preload, d.events_url, n_events, BATCH, args.timeout)
        # Delivery starts as soon as the first batch commits: pre-load and delivery overlap.
        seen, complete = wait_total(receivers, expected_total, args.timeout)
        out["daemon_cpu_pct"] = d_meter.percent()
        out["receiver_cpu_pct"] = [m.percent() for m in r_meters]
        d_cpu, r_cpu = d_meter.seconds(), [m.seconds() for m in r_meters]
        out["wall_seconds"] = d_meter.elapsed()
        out["daemon_rss_kib"] = d.rss()
        out["load"] = loader.result(timeout=args.timeout + 60)
        out["other_cpu_pct"] = other_cpu_pct(machine, [d_cpu, *r_cpu, out["load"]["client_cpu_s"]])
        time.sleep(0.5)  # late duplicates, if any, show up in the counters
        paths: dict[str, dict[str, Any]] = {}
        for r in receivers:
            paths.update(r.paths())
        try:
            out["metrics"] = {k: v for k, v in scrape_metrics(d).items() if k in modes}
        except Exception as exc:  # noqa: BLE001 - report it, the rates stand without it
            out["metrics"] = {}
            out["metrics_error"] = repr(exc)
        d.stop()  # SIGTERM now, so that its log can be read before the tempdir goes
        names = set(modes)
        out["daemon_notes"] = daemon_problems(d, expected=lambda ln: expected_line(ln, names))
        out["expected_log"], out["log_lines"] = split_log(d, names)
        if not complete:
            out["daemon_notes"].append("log tail: " + d.log_tail(8).replace("\n", " | ")[:800])
    out["delivered"] = seen
    out["complete"] = complete

    t0 = out["load"].get("t_first_accept")
    if t0 is None:
        return out
    if "t_last_accept" in out["load"]:
        out["ingest_seconds"] = out["load"]["t_last_accept"] - out["load"]["t_first_send"]

    # Healthy integrations: each one's own rate, and the aggregate.
    per: dict[str, dict[str, Any]] = {}
    for spec in healthy:
        name = spec["name"]
        st = paths.get(f"/hook/{name}", {})
        got = st.get("unique", 0)
        t_last = st.get("t_last_new")
        per[name] = {
            "unique": got,
            "duplicates": st.get("duplicates", 0),
            "retries": st.get("retries", 0),
            "start_s": (st["t_first"] - t0) if st.get("t_first") is not None else None,
            "done_s": (t_last - t0) if t_last is not None else None,
            "rate": (got / (t_last - t0)) if t_last is not None and t_last > t0 else None,
        }
    out["per_integration"] = per
    lasts = [p["done_s"] for p in per.values() if p["done_s"] is not None]
    total = sum(p["unique"] for p in per.values())
    if lasts:
        key = "rate" if complete else "partial_rate"
        out[key] = total / max(lasts)
        out["seconds"] = max(lasts)
    rates = sorted(p["rate"] for p in per.values() if p["rate"] is not None and p["unique"] >= n_events)
    if rates and len(rates) == n_healthy:
        out["per_rate"] = {"min": rates[0], "median": statistics.median(rates), "max": rates[-1]}
        dones = sorted(p["done_s"] for p in per.values())
        starts = sorted(p["start_s"] for p in per.values())
        out["finish_s"] = {"first": dones[0], "last": dones[-1]}
        out["start_s"] = {"first": starts[0], "last": starts[-1]}
    out["healthy_duplicates"] = sum(p["duplicates"] for p in per.values())
    out["healthy_retries"] = sum(p["retries"] for p in per.values())

    # Failing integrations: what they did.
    fail: dict[str, dict[str, Any]] = {}
    for name, mode in modes.items():
        m = out["metrics"].get(name, {})
        prefix = {"refused": None, "500": "/fail500/", "hang": "/hang/"}[mode]
        recv = paths.get(f"{prefix}{name}", {}) if prefix else {}
        row = fail.setdefault(mode, {"integrations": 0, "attempts": 0, "received": 0, "opened": 0,
                                     "closed": 0, "open_at_end": 0, "pending": 0})
        row["integrations"] += 1
        row["attempts"] += int(sum(v for k, v in m.items() if k.startswith("eventrelay_delivery_attempts_total")))
        row["received"] += int(recv.get("posts", 0))
        row["opened"] += int(m.get("eventrelay_circuit_transitions_total:open", 0))
        row["closed"] += int(m.get("eventrelay_circuit_transitions_total:closed", 0))
        row["open_at_end"] += int(m.get("eventrelay_circuit_state", 0) == 2)
        row["pending"] += int(m.get("eventrelay_jobs_pending", 0))
    out["failing_modes"] = fail
    return out


# --------------------------------------------------------------------------- output


def verdict(ok: bool | None) -> str:
    return {True: "MET", False: "MISSED", None: "n/a"}[ok]


def fmt_pct(v: float | None) -> str:
    return f"{v:.0f}%" if v is not None else "n/a"


def fmt_rate(v: float | None) -> str:
    return f"{v:,.0f}/s" if v else "n/a"


def rate_of(part: dict[str, Any] | str | None) -> float | None:
    return part.get("rate") if isinstance(part, dict) else None


def ratios(a: Any, b: Any, c: Any) -> dict[str, float | None]:
    ra, rb, rc = rate_of(a), rate_of(b), rate_of(c)
    med_b = b["per_rate"]["median"] if isinstance(b, dict) and "per_rate" in b else None
    med_c = c["per_rate"]["median"] if isinstance(c, dict) and "per_rate" in c else None
    min_b = b["per_rate"]["min"] if isinstance(b, dict) and "per_rate" in b else None
    return {
        "isolation": rb / rc if rb and rc else None,
        "scale": rc / ra if rc and ra else None,
        "isolation_median": med_b / med_c if med_b and med_c else None,
        "isolation_min": min_b / med_c if min_b and med_c else None,
        "literal": med_b / ra if med_b and ra else None,
    }


def print_report(a: Any, b: Any, c: Any, args: argparse.Namespace) -> None:
    r = ratios(a, b, c)
    head = f"{'measurement':<46} {'value':>12} {'baseline':>12} {'ratio':>6}  {'target':<10} {'result':<6}"
    print(head)
    print("-" * len(head))

    def row(label: str, value: str, base: str, ratio: float | None, target: str, result: str) -> None:
        print(f"{label:<46} {value:>12} {base:>12} {(f'{ratio:.0%}' if ratio is not None else 'n/a'):>6}  "
              f"{target:<10} {result}")

    hb = f"B {args.healthy}+{args.failing} failing, healthy agg."
    row(f"isolation: {hb}", fmt_rate(rate_of(b)), fmt_rate(rate_of(c)), r["isolation"], ">= 90% C",
        verdict(r["isolation"] >= 0.9 if r["isolation"] is not None else None))
    row(f"scale: C {args.healthy} healthy, aggregate", fmt_rate(rate_of(c)), fmt_rate(rate_of(a)), r["scale"],
        ">= 90% A", verdict(r["scale"] >= 0.9 if r["scale"] is not None else None))
    for label, part in (("B", b), ("C", c)):
        if isinstance(part, dict) and "per_rate" in part:
            pr = part["per_rate"]
            row(f"  {label} per integration: median (min)", f"{pr['median']:,.1f}/s", f"({pr['min']:,.1f}/s)",
                None, "", "")
    row("  B median / C median per integration", "", "", r["isolation_median"], "", "info")
    row("  B slowest / C median per integration", "", "", r["isolation_min"], "", "info")
    row("  literal: B median per integration / A", "", "", r["literal"], ">= 90% A", "info (see doc)")
    print()

    print("details")
    for label, part in (("A one", a), ("B failing", b), ("C healthy", c)):
        if not isinstance(part, dict):
            print(f"  {label}: {part or 'not run'}")
            continue
        ld = part.get("load", {})
        rc = ", ".join(fmt_pct(x) for x in part.get("receiver_cpu_pct", []))
        rss = part.get("daemon_rss_kib", {})
        print(
            f"  {label}: {part['delivered']}/{part['expected_deliveries']} deliveries"
            + (f" in {part['seconds']:.1f}s" if "seconds" in part else "")
            + (f" (INCOMPLETE, partial rate {part['partial_rate']:,.0f}/s)" if "partial_rate" in part else "")
            + f"; {ld.get('accepted')} events accepted in {part.get('ingest_seconds', float('nan')):.1f}s"
            + f" ({ld.get('jobs')} jobs)"
        )
        print(
            f"      daemon cpu {fmt_pct(part.get('daemon_cpu_pct'))}, receiver cpu {rc}, "
            f"other cpu {fmt_pct(part.get('other_cpu_pct'))}, daemon rss {rss.get('vmrss', 0) / 1024:.0f} MiB "
            f"(peak {rss.get('vmhwm', 0) / 1024:.0f}), ready in {part.get('ready_seconds') or 0:.2f}s; "
            f"healthy duplicates {part.get('healthy_duplicates', 0)}, retries {part.get('healthy_retries', 0)}"
        )
        if "per_rate" in part and part["healthy"] > 1:
            pr, fs, ss = part["per_rate"], part["finish_s"], part["start_s"]
            print(
                f"      per integration: min {pr['min']:.1f} median {pr['median']:.1f} max {pr['max']:.1f}/s; "
                f"first delivery after {ss['first']:.2f}-{ss['last']:.2f}s, finished after "
                f"{fs['first']:.1f}-{fs['last']:.1f}s"
            )
        for mode, f in part.get("failing_modes", {}).items():
            print(
                f"      failing {mode:<7}: {f['integrations']} integrations, {f['attempts']} attempts "
                f"(receiver saw {f['received']}), circuit opened {f['opened']}x closed {f['closed']}x, "
                f"open at the end {f['open_at_end']}/{f['integrations']}, jobs pending {f['pending']}"
            )
        if part.get("expected_log"):
            print(f"      expected warnings of the failing integrations: {part['expected_log']}")
        if part.get("metrics_error"):
            print(f"      /metrics: {part['metrics_error']}")
        if ld.get("errors"):
            print(f"      pre-load errors: {ld['errors']}")
        for note in part.get("daemon_notes", []):
            print(f"      daemon: {note}")
    busy = [label for label, part in (("A", a), ("B", b), ("C", c))
            if isinstance(part, dict) and (part.get("other_cpu_pct") or 0) > BUSY_OTHER_PCT]
    hot = [label for label, part in (("A", a), ("B", b), ("C", c))
           if isinstance(part, dict) and any((x or 0) > 85 for x in part.get("receiver_cpu_pct", []))]
    if busy:
        print(f"WARNING: {', '.join(busy)} shared the machine with other work (other cpu > {BUSY_OTHER_PCT:.0f}%); "
              "those numbers are low and noisy, rerun on a quiet machine")
    if hot:
        print(f"WARNING: a receiver was near one full core in {', '.join(hot)}: it may be the limit "
              "(try --receivers 2)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=2000,
                    help="events for runs B and C; each goes to every integration (default 2000)")
    ap.add_argument("--base-events", type=int, default=20_000, help="events for run A (default 20000)")
    ap.add_argument("--healthy", type=int, default=90, help="healthy integrations in B and C (default 90)")
    ap.add_argument("--failing", type=int, default=10, help="failing integrations in B (default 10)")
    ap.add_argument("--receivers", type=int, default=1, choices=(1, 2, 3, 4),
                    help="receiver processes, integrations spread over them (default 1)")
    ap.add_argument("--timeout", type=float, default=300.0, help="max seconds for each run (default 300)")
    ap.add_argument("--synchronous", choices=("full", "normal"), default="full", help="storage.synchronous")
    ap.add_argument("--only", choices=("A", "B", "C"), action="append", help="run only these (repeatable)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    if not (0 < args.events <= 100_000 and 0 < args.base_events <= 200_000 and 1 <= args.healthy <= 500
            and 0 <= args.failing <= 100 and 0 < args.timeout <= 3600):
        ap.error("bounds: 0 < --events <= 100000, 0 < --base-events <= 200000, 1 <= --healthy <= 500, "
                 "0 <= --failing <= 100, 0 < --timeout <= 3600")
    which = set(args.only or ("A", "B", "C"))

    env = environment()
    settings = {
        "events": args.events,
        "base_events": args.base_events,
        "healthy": args.healthy,
        "failing": args.failing,
        "receivers": args.receivers,
        "batch": BATCH,
        "concurrency": CONCURRENCY,
        "hang_timeout": HANG_TIMEOUT,
        "synchronous": args.synchronous,
    }
    if not args.json:
        print_header("eventrelay fan-out benchmark: many integrations, some failing", env, settings)

    results: dict[str, Any] = {"A": None, "B": None, "C": None}
    plan = (
        ("A", f"A: 1 integration, {args.base_events} events", args.base_events, 1, 0),
        ("B", f"B: {args.healthy} healthy + {args.failing} failing, {args.events} events", args.events,
         args.healthy, args.failing),
        ("C", f"C: {args.healthy} healthy, {args.events} events", args.events, args.healthy, 0),
    )
    receivers: list[Receiver] = []
    try:
        for _ in range(args.receivers):
            receivers.append(Receiver(hang=HANG_SECONDS))
        for key, title, n_events, n_healthy, n_failing in plan:
            if key not in which:
                continue
            log(title + " ...")
            try:
                results[key] = run(key, receivers, n_events, n_healthy, n_failing, args)
            except Exception as exc:  # noqa: BLE001 - report it, go on with the next run
                results[key] = f"failed: {type(exc).__name__}: {exc}"
    finally:
        for r in receivers:
            r.stop()

    a, b, c = results["A"], results["B"], results["C"]
    if args.json:
        for part in (a, b, c):
            if isinstance(part, dict) and not args.healthy <= 10:
                part.pop("per_integration", None)  # 90 rows each: the summary fields carry the figures
        doc = {"benchmark": "fanout", "env": env, "settings": settings, "results": results,
               "ratios": ratios(a, b, c)}
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_report(a, b, c, args)
    failed = any(isinstance(results[k], str) or (isinstance(results[k], dict) and not results[k]["complete"])
                 for k in which)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
