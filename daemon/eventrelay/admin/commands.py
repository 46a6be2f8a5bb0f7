"""Operator commands that talk to a running daemon over its admin API: status, reload, jobs, logs, retry,
replay, enable, pause, resume, close-circuit, send.

Each finds the daemon by itself (client.py). Output is an aligned table for people (printing.py); `--json`
prints the `data` member of the server's answer instead, for scripts.

Exit codes (the same for every command):

    0  done (`status` exits 0 even with dead jobs or a failed reload: it reports, it does not judge)
    1  the daemon answered with an error (unknown integration or job, job already delivered, bad token, a
       `reload` it refused, ...); its detail is printed on stderr
    2  usage error: bad arguments, no usable config to find the daemon from, or several daemons running and
       no --config to choose
    3  the daemon cannot be reached (not running, wrong address, no answer in time)
  130  interrupted (Ctrl-C); `replay` says how many jobs it had re-queued by then
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

from .. import runtime
from ..clock import iso_time, parse_datetime
from ..units import parse_duration
from .client import (CONFIG_ENV, DEFAULT_CONFIG, EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE, TOKEN_ENV, Client,
                     ServerError, UsageError, with_daemon)
from .printing import (ERROR_WIDTH, any_due, format_event, format_jobs, format_logs, format_reload, format_status,
                       held_by, num, print_json, table)

REPLAY_BATCH = 5000  # jobs re-queued per request: small enough to show progress, large enough to be quick
DEFAULT_PAGE = 25  # rows of `jobs` and `logs`; the server takes at most 100 per page


def _integration_path(name: str) -> str:
    return f"/v1/integrations/{quote(name, safe='')}"


# -- status ---------------------------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    return with_daemon(args, _status)


async def _status(client: Client, args: argparse.Namespace) -> int:
    data = (await client.get("/v1/status"))["data"]
    if args.json:
        print_json(data)
        return EXIT_OK
    print(format_status(data, _now(), _pid_of(data)))
    return EXIT_OK


def _pid_of(data: dict[str, Any]) -> int | None:
    """The daemon's pid, from the runtime file of the config it runs on; None when it is not this host's (--url).

    The start time must match too: the same config path on another host, or a daemon restarted since, is not
    the one that answered.
    """
    path = (data.get("config") or {}).get("path")
    if not isinstance(path, str):
        return None
    for record in runtime.find(path).live:
        if record.config == path and record.started_at == data.get("started_at"):
            return record.pid
    return None


# -- reload -------------------------------------------------------------------------------------------------

def cmd_reload(args: argparse.Namespace) -> int:
    return with_daemon(args, _reload)


async def _reload(client: Client, args: argparse.Namespace) -> int:
    data = (await client.post("/v1/reload", {}))["data"]
    ok = bool(data.get("ok"))
    if args.json:
        print_json(data)
    elif ok:
        print(format_reload(data))
    else:
        # Refused: the daemon answered, and what it said is an error for the operator to fix.
        config = client.target.config and str(runtime.resolve(client.target.config))
        check = f"eventrelay check-config --config {config}" if config else "eventrelay check-config"
        print("eventrelay: reload refused: the daemon still runs the previous configuration. Fix these, check "
              f"with `{check}`, reload again:", file=sys.stderr)
        for error in data.get("errors") or []:
            print(f"  {error}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_SERVER_ERROR


# -- jobs ---------------------------------------------------------------------------------------------------

def cmd_jobs(args: argparse.Namespace) -> int:
    return with_daemon(args, _jobs)


async def _jobs(client: Client, args: argparse.Namespace) -> int:
    if args.orphaned:
        return await _orphaned(client, args)
    if not args.integration:
        raise UsageError("name an integration, or ask for --orphaned")
    params = {"page[limit]": str(args.limit), "page[offset]": str(args.offset)}
    if args.state:
        params["state"] = args.state
    document = await client.get(f"{_integration_path(args.integration)}/jobs", params)
    if args.json:
        print_json(document["data"])
        return EXIT_OK
    what = f"{args.state} jobs" if args.state else "jobs"
    now = _now()
    held = await _held_by(client, args.integration, now) if any_due(document, now) else None
    print(format_jobs(document, now, what=what, integration=args.integration, offset=args.offset, held=held))
    return EXIT_OK


async def _held_by(client: Client, integration: str, now: datetime) -> str | None:
    """What keeps the integration's due jobs from going (an open circuit, a pause, a 410), from its status row:
    without it a job the circuit holds reads `due` for minutes."""
    rows = (await client.get("/v1/status"))["data"].get("integrations") or []
    return held_by(next((row for row in rows if row.get("name") == integration), None), now)


async def _orphaned(client: Client, args: argparse.Namespace) -> int:
    document = await client.get("/v1/jobs/orphaned", {})
    if args.json:
        print_json(document["data"])
        return EXIT_OK
    rows = [[o["integration"], num(o["pending"]), num(o["dead"])] for o in document["data"]]
    if rows:
        print(table(["INTEGRATION (not configured)", "PENDING", "DEAD"], rows, right={1, 2}))
        print("these jobs resume if an integration of that name is configured again")
    else:
        print("no orphaned jobs: every job belongs to a configured integration")
    return EXIT_OK


# -- logs ---------------------------------------------------------------------------------------------------

def cmd_logs(args: argparse.Namespace) -> int:
    return with_daemon(args, _logs)


async def _logs(client: Client, args: argparse.Namespace) -> int:
    path = _integration_path(args.integration)
    if args.job is not None:
        path += f"/jobs/{quote(args.job, safe='')}"
    document = await client.get(f"{path}/logs", {"page[limit]": str(args.limit), "page[offset]": str(args.offset)})
    if args.json:
        print_json(document["data"])
        return EXIT_OK
    what = f"attempts of job {args.job}" if args.job is not None else "attempts"
    # One job's log is read to find out why it fails: show its answers whole, not cut to fit a column.
    width = None if args.job is not None else ERROR_WIDTH
    print(format_logs(document, what=what, integration=args.integration, offset=args.offset, width=width))
    return EXIT_OK


# -- retry --------------------------------------------------------------------------------------------------

def cmd_retry(args: argparse.Namespace) -> int:
    return with_daemon(args, _retry)


async def _retry(client: Client, args: argparse.Namespace) -> int:
    path = f"{_integration_path(args.integration)}/jobs/{quote(args.job, safe='')}/retry"
    try:
        answer = await client.post(path, {})
    except ServerError as e:
        window = e.meta.get("replay") if e.status == 409 else None
        if not isinstance(window, dict):
            raise
        # Delivered: the operator wants it sent again, and the command that does it is better than advice.
        print(f"eventrelay: job {args.job} of {args.integration} was delivered, and retry only sends pending or "
              "dead jobs. To send it again, replay the moment it was created (with any other job of "
              f"{args.integration} created in those milliseconds):\n  {_replay_command(args, window)}",
              file=sys.stderr)
        return EXIT_SERVER_ERROR
    job = answer["data"]
    if args.json:
        print_json(job)
        return EXIT_OK
    held_by = (answer.get("meta") or {}).get("held_by")
    when = f"held: {held_by}" if held_by else "it goes now"
    print(f"job {job.get('id', args.job)} of {args.integration} re-queued ({job.get('state', 'pending')}, "
          f"{num(job.get('attempts'))} attempt(s) so far); {when}; follow it with "
          f"`eventrelay logs {args.integration} --job {job.get('id', args.job)}`")
    return EXIT_OK


def _replay_command(args: argparse.Namespace, window: dict[str, Any]) -> str:
    """`eventrelay replay` for `window`, reaching the daemon as this command did (the token excepted: it stays
    out of what is printed)."""
    argv = ["eventrelay", "replay", args.integration, "--since", str(window.get("since")),
            "--until", str(window.get("until"))]
    for option in ("config", "url"):
        if getattr(args, option, None):
            argv += [f"--{option}", getattr(args, option)]
    return shlex.join(argv)


def cmd_event(args: argparse.Namespace) -> int:
    async def show(client: Client, args: argparse.Namespace) -> int:
        event = (await client.get(f"/v1/events/{quote(args.id, safe='')}"))["data"]
        if args.json:
            print_json(event)
        else:
            print(format_event(event, _now()))
        return EXIT_OK

    return with_daemon(args, show)


def cmd_events(args: argparse.Namespace) -> int:
    """The event catalogue and which integrations observe each type."""
    async def show(client: Client, args: argparse.Namespace) -> int:
        types = (await client.get("/v1/event-types"))["data"]
        if args.json:
            print_json(types)
        else:
            shown = [t for t in types if t["observed_by"] or args.all]
            rows = [[t["type"], t["source"], ", ".join(t["observed_by"]) or "-"] for t in shown]
            print(table(["TYPE", "FROM", "OBSERVED BY"], rows))
            if not args.all:
                print(f"({len(types) - len(shown)} more known types that no integration observes: --all lists them)")
        return EXIT_OK

    return with_daemon(args, show)


def cmd_audit(args: argparse.Namespace) -> int:
    """Operators' actions, newest first."""
    async def show(client: Client, args: argparse.Namespace) -> int:
        entries = (await client.get("/v1/audit", {"limit": str(args.limit)}))["data"]
        if args.json:
            print_json(entries)
        elif not entries:
            print("no operator action recorded (within the retention of the attempt log)")
        else:
            rows = [[e["at"], e["action"], e["target"] or "-", e["scope"], e["token"] or "-", e["address"] or "-",
                     e["detail"] or ""] for e in entries]
            print(table(["AT", "ACTION", "TARGET", "SCOPE", "TOKEN", "FROM", "DETAIL"], rows))
        return EXIT_OK

    return with_daemon(args, show)


def _action(path: str, changed: Callable[[dict[str, Any]], bool], when_changed: str,
            unchanged: str) -> Callable[[argparse.Namespace], int]:
    """A command that POSTs an operator's action on one integration and says what it did: `when_changed` or
    `unchanged` (formatted with the integration's `name` and the answer's `was`), as `changed` tells."""
    async def act(client: Client, args: argparse.Namespace) -> int:
        data = (await client.post(f"{_integration_path(args.integration)}/{path}", {}))["data"]
        if args.json:
            print_json(data)
        else:
            text = when_changed if changed(data) else unchanged
            print(text.format(name=args.integration, was=data.get("was")))
        return EXIT_OK

    return lambda args: with_daemon(args, act)


cmd_enable = _action("enable", lambda data: bool(data.get("was_disabled")),
                     "{name} enabled again: its pending jobs are being delivered",
                     "{name} was not disabled: nothing to do")
cmd_pause = _action("pause", lambda data: not data.get("was_paused"),
                    "{name} paused: its jobs wait, nothing is sent (deliveries under way finish); "
                    "`eventrelay resume {name}` lets it deliver again",
                    "{name} was paused already")
cmd_resume = _action("resume", lambda data: bool(data.get("was_paused")),
                     "{name} resumed: its pending jobs are being delivered",
                     "{name} was not paused: nothing to do")
cmd_close_circuit = _action(
    "close-circuit", lambda data: data.get("was") != "closed",
    "the circuit of {name} is closed (it was {was}): deliveries resume now; if the target still fails, it opens "
    "again after `breaker.failures` failures in a row (5 by default)",
    "the circuit of {name} was not open: nothing to do")


# -- replay -------------------------------------------------------------------------------------------------

@dataclass
class _ReplayProgress:
    queued: int = 0


def cmd_replay(args: argparse.Namespace) -> int:
    try:
        selector, described = _replay_selector(args, _now())
    except UsageError as e:
        print(f"eventrelay: {e}", file=sys.stderr)
        return EXIT_USAGE
    progress = _ReplayProgress()

    async def body(client: Client, args: argparse.Namespace) -> int:
        return await _replay(client, args, selector, described, progress)

    code = with_daemon(args, body)
    if code not in (EXIT_OK, EXIT_USAGE) and progress.queued:
        # Whatever stopped the loop, the batches before it were re-queued: the operator must know how many.
        print(f"eventrelay: {progress.queued} job(s) had been re-queued before that; running the same command "
              "again continues where it stopped", file=sys.stderr)
    return code


def _replay_selector(args: argparse.Namespace, now: datetime) -> tuple[dict[str, Any], str]:
    if args.since is None:
        if args.until is not None:
            raise UsageError("--until goes with --since")
        if not args.dead:
            raise UsageError("say what to replay: --dead, --since TIME [--until TIME], or both")
        return {"state": "dead", "not_requeued_since": _iso(now)}, "dead job(s)"
    since = parse_time_arg(args.since, now, "--since")
    # `until` is fixed when the command starts: events arriving while it loops are not swept into the replay.
    until = parse_time_arg(args.until, now, "--until") if args.until is not None else now
    if since >= until:
        raise UsageError(f"--since ({_iso(since)}) must be before --until ({_iso(until)})")
    # not_requeued_since: the batches of this command skip what its earlier batches re-queued, so the loop ends
    # even while deliveries keep up with it.
    selector = {"since": _iso(since), "until": _iso(until), "not_requeued_since": _iso(now)}
    what = f"job(s) created from {_iso(since)} to {_iso(until)}"
    return ({**selector, "state": "dead"}, f"dead {what}") if args.dead else (selector, what)


async def _replay(client: Client, args: argparse.Namespace, selector: dict[str, Any], described: str,
                  progress: _ReplayProgress) -> int:
    path = f"{_integration_path(args.integration)}/replay"
    live = sys.stderr.isatty()
    while True:
        queued = int((await client.post(path, {**selector, "limit": args.batch}))["data"]["queued"])
        progress.queued += queued
        if queued and not args.json:
            message = f"replay {args.integration}: {progress.queued} {described} re-queued so far"
            print(f"\r{message}" if live else message, end="" if live else "\n", file=sys.stderr, flush=True)
        # A short batch means the server found no more: stop without asking again. The spec's `queued == 0`
        # end alone would also re-queue jobs the first batches already delivered again meanwhile.
        if queued < args.batch:
            break
    if live and progress.queued and not args.json:
        print(file=sys.stderr)
    if args.json:
        print_json({"queued": progress.queued})
    elif progress.queued:
        print(f"re-queued {progress.queued} {described} of {args.integration}")
    else:
        print(f"nothing to replay: no {described} of {args.integration}")
    return EXIT_OK


def parse_time_arg(text: str, now: datetime, option: str = "time") -> datetime:
    """ISO 8601 (no zone: local time), `now`, or a duration meaning that long ago: 90s, 30m, 2h, 7d, 1w, 1h30m."""
    text = text.strip()
    if text == "now":
        return now
    try:
        return now - timedelta(seconds=parse_duration(text))
    except (ValueError, OverflowError):
        pass  # not a duration: a time, then
    try:
        # Without a zone: the operator's local time, as they read it on their clock.
        return parse_datetime(text, naive="local")
    except (ValueError, OverflowError):
        raise UsageError(f"{option} {text!r} is neither a time (2026-11-27T14:00:00Z, 2026-11-27 14:00) nor a "
                         "duration ago (30m, 2h, 7d)") from None


# -- send ---------------------------------------------------------------------------------------------------

def cmd_send(args: argparse.Namespace) -> int:
    try:
        event = _event_from(args)
    except UsageError as e:
        print(f"eventrelay: {e}", file=sys.stderr)
        return EXIT_USAGE

    async def body(client: Client, args: argparse.Namespace) -> int:
        if args.to:  # a test event for one integration, whatever it observes
            accepted = [(await client.post(f"{_integration_path(args.to)}/test", event))["data"]]
        else:
            accepted = (await client.post("/v1/events", event))["data"]
        if args.json:
            print_json(accepted)
            return EXIT_OK
        for a in accepted:
            if a.get("duplicate"):
                print(f"event {a.get('id')} was accepted before (same id): nothing new queued")
            else:
                print(f"event {a.get('id')} accepted: {num(a.get('jobs'))} job(s) queued")
        return EXIT_OK

    return with_daemon(args, body)


def _event_from(args: argparse.Namespace) -> dict[str, Any]:
    text = sys.stdin.read() if args.data == "-" else args.data
    try:
        data = json.loads(text) if text is not None else {}
    except ValueError as e:
        source = "stdin" if args.data == "-" else "--data"
        raise UsageError(f"{source} is not JSON ({e}); write e.g. --data '{{\"type\": \"order\", \"id\": \"o1\"}}'")\
            from None
    if not isinstance(data, dict):
        raise UsageError("the event's data must be a JSON object, e.g. {\"type\": \"order\", \"id\": \"o1\"}")
    event: dict[str, Any] = {"type": args.type, "data": data}
    if args.id is not None:
        event["id"] = args.id
    return event


# -- argument parsing ---------------------------------------------------------------------------------------

def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register status, reload, jobs, logs, retry, enable, pause, resume, close-circuit, replay and send; each
    sets `func` to its cmd_* function."""
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("reaching the daemon")
    where.add_argument("--config", "-c", metavar="FILE",
                       help=f"the daemon's config: the running daemon of this file, else its listen.http; and "
                            f"listen.token (default: ${CONFIG_ENV}; without either, the only daemon running, "
                            f"else {DEFAULT_CONFIG})")
    where.add_argument("--url", help="the daemon's HTTP address, e.g. http://127.0.0.1:8787 (overrides the config)")
    where.add_argument("--token", help=f"bearer token (overrides the config; ${TOKEN_ENV} keeps it out of `ps`)")
    common.add_argument("--json", action="store_true", help="print the server's JSON data instead of a table")

    def page(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--limit", type=_positive_int, default=DEFAULT_PAGE,
                            help=f"rows to show, newest first (default {DEFAULT_PAGE}, at most 100)")
        parser.add_argument("--offset", type=_non_negative_int, default=0, help="rows to skip (next pages)")

    status = subparsers.add_parser("status", parents=[common],
                                   help="the daemon's version, pid, uptime, config file and integrations")
    status.set_defaults(func=cmd_status)

    reload = subparsers.add_parser(
        "reload", parents=[common], help="read the daemon's config file again now; print what changed, or why not",
        epilog="Exit 0 when the new file was applied, 1 when the daemon refused it (it then keeps running the "
               "previous configuration).")
    reload.set_defaults(func=cmd_reload)

    jobs = subparsers.add_parser("jobs", parents=[common], help="list an integration's jobs")
    jobs.add_argument("integration", nargs="?", help="its name, as in the config")
    jobs.add_argument("--orphaned", action="store_true",
                      help="instead: jobs of integrations no longer in the config (they wait for its return)")
    jobs.add_argument("--state", choices=("pending", "delivered", "dead"), help="only jobs in this state")
    page(jobs)
    jobs.set_defaults(func=cmd_jobs)

    logs = subparsers.add_parser("logs", parents=[common], help="the delivery attempts of an integration or a job")
    logs.add_argument("integration", help="its name, as in the config")
    logs.add_argument("--job", help="only this job's attempts, with answers shown whole")
    page(logs)
    logs.set_defaults(func=cmd_logs)

    events = subparsers.add_parser("events", parents=[common],
                                   help="the event types the daemon knows, and which integrations observe each")
    events.add_argument("--all", action="store_true", help="also the types no integration observes")
    events.set_defaults(func=cmd_events)

    audit = subparsers.add_parser("audit", parents=[common],
                                  help="operators' actions (retry, replay, pause, …): who, what, when")
    audit.add_argument("--limit", type=_positive_int, default=25, help="entries shown, newest first (at most 100)")
    audit.set_defaults(func=cmd_audit)

    event = subparsers.add_parser("event", parents=[common],
                                  help="one event by its id: its payload, and where it went, attempt by attempt")
    event.add_argument("id", help="the event's id, as the producer gave it or the daemon answered")
    event.set_defaults(func=cmd_event)

    retry = subparsers.add_parser("retry", parents=[common], help="deliver a pending or dead job again now")
    retry.add_argument("integration", help="its name, as in the config")
    retry.add_argument("job", help="the job's id, as `eventrelay jobs` lists it")
    retry.set_defaults(func=cmd_retry)

    for name, func, what in (
            ("enable", cmd_enable, "turn an integration back on after its target answered 410 Gone"),
            ("pause", cmd_pause, "hold an integration's deliveries (its jobs wait) until resumed"),
            ("resume", cmd_resume, "let a paused integration deliver again"),
            ("close-circuit", cmd_close_circuit, "close an integration's open circuit now (its target is fixed)")):
        command = subparsers.add_parser(name, parents=[common], help=what)
        command.add_argument("integration", help="its name, as in the config")
        command.set_defaults(func=func)

    replay = subparsers.add_parser(
        "replay", parents=[common],
        help="re-queue an integration's dead jobs, its jobs of a time range, or its dead jobs of one",
        epilog="TIME is ISO 8601 (2026-11-27T14:00:00Z; without a zone, local time) or a duration meaning that "
               "long ago (30m, 2h, 7d). Jobs already pending are left alone.")
    replay.add_argument("integration", help="its name, as in the config")
    replay.add_argument("--dead", action="store_true", help="re-queue dead jobs (all, or those of --since/--until)")
    replay.add_argument("--since", metavar="TIME", help="re-queue jobs created at or after TIME")
    replay.add_argument("--until", metavar="TIME", help="...and before TIME (default: now)")
    replay.add_argument("--batch", type=_positive_int, default=REPLAY_BATCH,
                        help=f"jobs re-queued per request (default {REPLAY_BATCH})")
    replay.set_defaults(func=cmd_replay)

    send = subparsers.add_parser("send", parents=[common], help="send one event, as a producer would")
    send.add_argument("type", help="the event key, e.g. order.paid")
    send.add_argument("--data", help="the event's data as a JSON object, or - to read it from stdin (default {})")
    send.add_argument("--id", help="the event's id (idempotency key); without it the daemon makes one")
    send.add_argument("--to", metavar="INTEGRATION",
                      help="a test event for this integration alone, whatever it observes; it goes now")
    send.set_defaults(func=cmd_send)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return int(text)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(at: datetime) -> str:
    return iso_time(at.timestamp())
