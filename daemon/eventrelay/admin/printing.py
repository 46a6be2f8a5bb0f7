"""How the commands print the daemon's answers for people: aligned tables, times in UTC and ages, and cut
error texts. `--json` prints the server's `data` instead (`print_json`), for scripts."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import datetime, timezone
from typing import Any

from ..clock import parse_datetime
from ..text import one_line as _flatten
from ..units import format_duration

ERROR_WIDTH = 60  # error texts are cut to this in tables; `--json` or `logs --job` show them whole


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


# -- the commands' tables -----------------------------------------------------------------------------------

def format_status(data: dict[str, Any], now: datetime, pid: int | None = None) -> str:
    lines = [f"eventrelay {data.get('version', '?')}{f', pid {pid}' if pid is not None else ''}, "
             f"up {_span(data.get('uptime_s'))} (since {_when(data.get('started_at'))})"]
    config = data.get("config") or {}
    path = config.get("path") or "(no file)"
    reload = config.get("last_reload")
    if reload is None:
        lines.append(f"config {path}: as loaded at start, not reloaded since")
    elif reload.get("ok"):
        lines.append(f"config {path}: reloaded {_ago(reload.get('at'), now)}, OK")
    else:
        check = f"eventrelay check-config --config {path}" if config.get("path") else "eventrelay check-config"
        lines.append(f"config {path}: reload {_ago(reload.get('at'), now)} FAILED; the daemon still runs the "
                     f"previous configuration. Fix these, check with `{check}`, reload again:")
        lines.extend(f"  {error}" for error in reload.get("errors") or [])
    lines.extend(_daemons(data.get("daemons") or [], now))
    lines.append("")
    integrations = data.get("integrations") or []
    if not integrations:
        lines.append("no integrations configured")
        return "\n".join(lines)
    rows = []
    for i in integrations:
        error = one_line(i.get("last_error"), ERROR_WIDTH)
        if i.get("last_error") and i.get("last_failure_at"):
            error = f"{_ago(i['last_failure_at'], now)}: {error}"  # how old it is tells if it still matters
        rows.append([str(i.get("name", "?")), str(i.get("integration_type", "?")),
                     "yes" if i.get("enabled") else "no", delivery_state(i, now),
                     num(i.get("pending")), num(i.get("in_flight")), num(i.get("dead")),
                     num(i.get("delivered_last_hour")), _ago(i.get("last_success_at"), now),
                     error])
    headers = ["NAME", "TYPE", "ENABLED", "STATE", "PENDING", "IN FLIGHT", "DEAD", "DELIVERED/H", "LAST SUCCESS",
               "LAST ERROR"]
    lines.append(table(headers, rows, right={4, 5, 6, 7}))
    return "\n".join(lines)


def _daemons(daemons: list[dict[str, Any]], now: datetime) -> list[str]:
    """The daemons sharing the database, when there are others than this one; a configuration that differs
    from this daemon's is flagged: daemons that disagree deliver differently depending on who claims a job."""
    if len(daemons) < 2:
        return []
    lines = [f"{len(daemons)} daemons share the database:"]
    for d in daemons:
        notes = [" (this one)" if d.get("this") else "",
                 " CONFIGURATION DIFFERS from this one's: make the files agree and reload"
                 if d.get("config_differs") else ""]
        lines.append(f"  {d.get('host', '?')} pid {d.get('pid', '?')}, eventrelay {d.get('version', '?')}, "
                     f"config {d.get('config_hash', '?')}, seen {_ago(d.get('last_seen'), now)}{''.join(notes)}")
    return lines


def delivery_state(integration: dict[str, Any], now: datetime, *, reasons: bool = True) -> str:
    """What holds a running integration's deliveries back, from its /v1/status row: `ok` when nothing does,
    `-` when it is not running. `reasons=False` leaves out the why of a 410, for narrow columns."""
    held = []
    paused_by = integration.get("paused")
    if isinstance(paused_by, dict):
        held.append(f"paused by an operator {_ago(paused_by.get('at'), now)}" if reasons else "paused by an operator")
    disabled = integration.get("disabled")
    if isinstance(disabled, dict):
        held.append(f"disabled (410): {one_line(disabled.get('reason'), 40)}" if reasons else "disabled (410)")
    circuit = integration.get("circuit")
    if circuit == "open":
        probe = _parse_time(integration.get("circuit_open_until"))
        held.append(f"circuit open, probe in {_span((probe - now).total_seconds())}"
                    if probe is not None and probe > now else "circuit open, probe due")
    elif circuit == "half_open":
        held.append("circuit half-open")
    paused = _parse_time(integration.get("paused_until"))
    if paused is not None and paused > now:
        held.append(f"paused until {paused.astimezone(timezone.utc):%H:%M:%S}Z "
                    f"(in {_span((paused - now).total_seconds())})")
    if held:
        return "; ".join(held)
    return "ok" if circuit else "-"


def held_by(integration: dict[str, Any] | None, now: datetime) -> str | None:
    """Why an integration's due jobs do not go now, in a few words (its /v1/status row, None when it is not
    configured); None when they go."""
    if integration is None:
        return "not in the config"
    if not integration.get("enabled"):
        return "enabled: false"
    state = delivery_state(integration, now, reasons=False)
    return None if state in ("ok", "-") else state


def format_reload(data: dict[str, Any]) -> str:
    changes = data.get("changes") or []
    if not changes:
        return "configuration reloaded: no changes"
    return "\n".join([f"configuration reloaded, {len(changes)} change(s):", *(f"  {c}" for c in changes)])


def format_jobs(document: dict[str, Any], now: datetime, *, what: str = "jobs", integration: str = "",
                offset: int = 0, held: str | None = None) -> str:
    """`held`: what keeps the integration's due jobs waiting (see `held_by`), shown instead of `due`."""
    jobs = document.get("data") or []
    rows = [[str(j.get("id", "?")), str(j.get("state", "?")), num(j.get("attempts")),
             str(j.get("event_type", "")), str(j.get("event_id", "")), _when(j.get("created_at")),
             _next_attempt(j, now, held), one_line(j.get("last_error"), ERROR_WIDTH)] for j in jobs]
    headers = ["ID", "STATE", "ATTEMPTS", "EVENT TYPE", "EVENT ID", "CREATED", "NEXT ATTEMPT", "LAST ERROR"]
    body = [table(headers, rows, right={0, 2})] if rows else []
    return "\n".join(body + [_footer(document, len(rows), offset, f"{what} of {integration}")])


def any_due(document: dict[str, Any], now: datetime) -> bool:
    """Whether a listed job is pending and due: only then does what may hold it matter."""
    return any(_next_attempt(j, now) == "due" for j in document.get("data") or [])


def _next_attempt(job: dict[str, Any], now: datetime, held: str | None = None) -> str:
    if job.get("state") != "pending" or not job.get("next_attempt_at"):
        return "-"
    at = _parse_time(job["next_attempt_at"])
    if at is None:
        return str(job["next_attempt_at"])
    if at <= now:
        return f"held ({held})" if held else "due"
    return f"in {_span((at - now).total_seconds())}"


def format_logs(document: dict[str, Any], *, what: str = "attempts", integration: str = "", offset: int = 0,
                width: int | None = ERROR_WIDTH) -> str:
    entries = document.get("data") or []
    body = [_attempts_table(entries, width)] if entries else []
    return "\n".join(body + [_footer(document, len(entries), offset, f"{what} of {integration}")])


def _attempts_table(entries: list[dict[str, Any]], width: int | None = ERROR_WIDTH) -> str:
    rows = []
    for e in entries:
        job = (((e.get("relationships") or {}).get("job") or {}).get("data") or {}).get("id", "-")
        created = ((e.get("meta") or {}).get("timestamps") or {}).get("created_at")
        status = e.get("status_code")
        detail = e.get("error_detail") or e.get("body")
        rows.append([_when(created), str(job), num(e.get("attempt")), "ok" if e.get("succeeded") else "failed",
                     "-" if status is None else str(status), _seconds(e.get("processing_time")),
                     one_line(detail, width)])
    headers = ["TIME", "JOB", "ATTEMPT", "RESULT", "STATUS", "DURATION", "DETAIL"]
    return table(headers, rows, right={1, 2, 5})


def format_event(event: dict[str, Any], now: datetime) -> str:
    """One event as `GET /v1/events/{id}` answers it: what it was, then per integration its job and every
    attempt, so an operator sees at once where it went and what each target answered."""
    lines = [f"event {event.get('id')} ({event.get('type')}), accepted {_when(event.get('accepted_at'))} "
             f"({_ago(event.get('accepted_at'), now)})",
             indent(json.dumps(event.get("payload"), indent=2, ensure_ascii=False)), ""]
    jobs = event.get("jobs") or []
    if not jobs:
        lines.append("no integration observed it: nothing was queued")
    for job in jobs:
        nxt = f", next attempt {_ago(job.get('next_attempt_at'), now)}" if job.get("next_attempt_at") else ""
        lines.append(f"{job.get('integration')}: job {job.get('id')}, {job.get('state')} after "
                     f"{num(job.get('attempts'))} attempt(s){nxt}")
        if job.get("log"):
            lines.append(indent(_attempts_table(job["log"])))
            # What a failing target said, beside the error: the first line of its answer.
            lines.extend(f"  attempt {a.get('attempt')} answered: {one_line(a['body'], ERROR_WIDTH)}"
                         for a in job["log"] if not a.get("succeeded") and a.get("body"))
        lines.append("")
    return "\n".join(lines).rstrip()


# -- formatting ---------------------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> str:
    """Columns padded to their widest cell, numbers (the `right` columns) aligned right."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def _footer(document: dict[str, Any], shown: int, offset: int, what: str) -> str:
    total = ((document.get("meta") or {}).get("results") or {}).get("total")
    if shown == 0:
        if total and offset:
            return f"no {what} at offset {offset} ({total} in all)"
        return f"no {what}"
    if total is None:
        return f"{what} {offset + 1}-{offset + shown}"
    footer = f"{what} {offset + 1}-{offset + shown} of {total}, newest first"
    if offset + shown < total:
        footer += f"; next page: --offset {offset + shown}"
    return footer


def _parse_time(value: Any) -> datetime | None:
    """A time the daemon sent (ISO 8601 in UTC), or None when it is absent or not one."""
    if not isinstance(value, str):
        return None
    try:
        return parse_datetime(value, naive="utc")
    except (ValueError, OverflowError):
        return None


def _when(value: Any) -> str:
    """An absolute time, to the second, in UTC like the daemon's logs."""
    at = _parse_time(value)
    if at is None:
        return "-" if value is None else str(value)
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _ago(value: Any, now: datetime) -> str:
    at = _parse_time(value)
    if at is None:
        return "never" if value is None else str(value)
    seconds = (now - at).total_seconds()
    return "just now" if 0 <= seconds < 1 else f"{_span(seconds)} ago" if seconds > 0 else f"in {_span(-seconds)}"


def _span(seconds: Any) -> str:
    """A duration in its two largest units: 45s, 2m 5s, 4h 12m, 3d 4h."""
    return format_duration(seconds) if isinstance(seconds, (int, float)) else "?"


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value * 1000:.0f}ms" if value < 10 else f"{value:.1f}s"


def num(value: Any) -> str:
    return "-" if value is None else str(value)


def one_line(text: Any, width: int | None) -> str:
    """Whitespace (newlines of an HTML error page, say) collapsed; cut to `width` with an ellipsis."""
    return "-" if text is None or text == "" else _flatten(str(text), width, ellipsis="…")
