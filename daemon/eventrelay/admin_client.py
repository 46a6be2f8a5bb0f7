"""Operator commands that talk to a running daemon over its admin API: status, reload, jobs, logs, retry, replay,
send.

Each command finds the daemon by itself, so on the daemon's host `eventrelay status` needs no arguments: first
from the runtime file every running daemon writes (daemon/runtime.py: its pid, its admin address as bound, its
config file), the one for `--config`/$EVENTRELAY_CONFIG or, without either, the only daemon running; then,
when no daemon recorded one, from the YAML file it runs on (`listen.http`). The token is `listen.token` of that
file. `--url` and `--token` override both. Output is an aligned table for people; `--json` prints the `data`
member of the server's answer instead, for scripts.

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
import asyncio
import json
import os
import sys
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

from . import config as config_module
from . import runtime
from .clock import iso_time, parse_datetime
from .text import one_line
from .units import format_duration, http_url, parse_duration

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

DEFAULT_CONFIG = "/etc/eventrelay/config.yaml"
CONFIG_ENV = "EVENTRELAY_CONFIG"
# A token on the command line is visible to every local user in `ps`; the environment is not.
TOKEN_ENV = "EVENTRELAY_TOKEN"

REPLAY_BATCH = 5000  # jobs re-queued per request: small enough to show progress, large enough to be quick
DEFAULT_PAGE = 25  # rows of `jobs` and `logs`; the server takes at most 100 per page
_ERROR_WIDTH = 60  # error texts are cut to this in tables; `--json` or `logs --job` show them whole
# Connecting is local and instant when the daemon runs; reading may wait behind a large replay batch.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)


# -- errors, each with its exit code -------------------------------------------------------------------------

class AdminError(Exception):
    exit_code = EXIT_SERVER_ERROR


class UsageError(AdminError):
    exit_code = EXIT_USAGE


class Unreachable(AdminError):
    exit_code = EXIT_UNREACHABLE


class ServerError(AdminError):
    """The daemon answered 4xx/5xx. `details` are the `detail` (or `title`) of each of its errors."""

    def __init__(self, status: int, details: list[str], hint: str = ""):
        self.status = status
        self.details = details
        self.hint = hint
        super().__init__("; ".join(details))


# -- finding the daemon ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Target:
    url: str  # base URL without a trailing slash, e.g. http://127.0.0.1:8787
    token: str | None
    config: str | None = field(default=None, compare=False)  # the daemon's config file, when known
    # Why listen.token could not be read from that file: said if the daemon then wants a token.
    token_problem: str | None = field(default=None, compare=False)


def target_from(config_path: str | None, url: str | None, token: str | None) -> Target:
    """Where the daemon listens and the token it wants.

    The address: `url` if given; else the runtime file of the running daemon (see daemon/runtime.py): the one
    for `config_path` (else $EVENTRELAY_CONFIG), or with neither the only daemon running; else the config
    file's `listen.http` (`config_path`, else $EVENTRELAY_CONFIG, else /etc/eventrelay/config.yaml). The
    token is `token`, else $EVENTRELAY_TOKEN, else `listen.token` of that config; an empty token means "send
    none". Raises UsageError with what to do when none of this tells.
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if url is not None and token is not None:
        return Target(_normalise_url(url), token or None)
    named = config_path or os.environ.get(CONFIG_ENV) or None
    lookup = None
    if url is None:
        lookup = runtime.find(named)
        if lookup.live:
            return _target_of(_one_daemon(lookup.live), token)
    return _target_from_config(config_path, url, token, lookup)


def _one_daemon(live: list[runtime.Record]) -> runtime.Record:
    if len(live) == 1:
        return live[0]
    rows = [[r.config, r.url or "(no HTTP listener)", f"pid {r.pid}"] for r in live]
    raise UsageError(f"{len(live)} eventrelay daemons run on this host; say which with --config FILE "
                     f"(or ${CONFIG_ENV}):\n" + _indent(_table(["CONFIG", "ADMIN URL", "PID"], rows)))


def _target_of(daemon: runtime.Record, token: str | None) -> Target:
    if daemon.url is None:
        raise UsageError(f"the daemon of {daemon.config} (pid {daemon.pid}) serves no HTTP, and the admin API "
                         "with it: set listen.http (e.g. 127.0.0.1:8787) and reload or restart it")
    problem = None
    if token is None:
        # The file the daemon runs on, which may have been edited since: only `listen` matters, so a broken
        # integration (the reason a reload failed, say) does not stop the command.
        try:
            token = _listen_section(daemon.config).token
        except config_module.ConfigError as e:
            problem = f"listen.token could not be read from {e.source}: {'; '.join(e.errors)}"
    return Target(daemon.url, token or None, daemon.config, problem)


def _target_from_config(config_path: str | None, url: str | None, token: str | None,
                        lookup: runtime.Lookup | None) -> Target:
    """No daemon recorded a runtime file (an older one, another user's, or none running): the config file."""
    explicit = config_path is not None
    path = config_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    tried = f"\n{lookup.tried()}" if lookup is not None else ""
    try:
        listen = _listen_section(path)
    except config_module.ConfigError as e:
        if url is not None and not explicit:
            # --url alone: the file was only consulted for a token, and this host may not have one.
            return Target(_normalise_url(url), None)
        problems = "\n".join(f"  {error}" for error in e.errors)
        raise UsageError(f"cannot find the daemon from {e.source}:\n{problems}{tried}\n"
                         f"start it with `eventrelay run --config FILE`; if it runs, give its file with --config "
                         f"(or ${CONFIG_ENV}), or its address with --url") from None
    if token is None:
        token = listen.token
    if url is not None:
        return Target(_normalise_url(url), token or None, path)
    if listen.http is None:
        raise UsageError(f"{path}: listen.http is null, so the daemon serves no HTTP and the admin API with it; "
                         "set listen.http (e.g. 127.0.0.1:8787) and restart it")
    host, port = listen.http
    if port == 0:
        raise UsageError(f"{path}: listen.http has port 0 (any free port) and no running daemon recorded the port "
                         f"it took{tried}\npass --url with the port the daemon logged when it became ready")
    # A daemon listening on every address is reached on loopback: the wildcard is not an address to call.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return Target(f"http://{_bracket(host)}:{port}", token or None, path)


def _listen_section(path: str) -> config_module.ListenConfig:
    try:
        return config_module.load(path).listen
    except config_module.ConfigError as e:
        full_error = e
    # The daemon runs with secrets from its unit's EnvironmentFile, which an operator's shell lacks: an
    # integration's ${AWS_SECRET} must not stop `eventrelay status`. Only `listen` matters here, so judge
    # that section alone (with the same validation and ${VAR} expansion) before giving up.
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        listen = raw.get("listen") if isinstance(raw, dict) else None
        return config_module.parse(yaml.safe_dump({"listen": listen}), source=Path(path)).listen
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise full_error from None
    except config_module.ConfigError as e:
        raise config_module.ConfigError(full_error.source, e.errors) from None


def _normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"  # `--url 127.0.0.1:8787` is what people type
    try:
        return http_url(url)
    except ValueError:
        raise UsageError(f"--url {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8787)") from None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- the HTTP client ---------------------------------------------------------------------------------------------

class _Client:
    def __init__(self, target: Target):
        self.target = target
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> _Client:
        headers = {"Accept": "application/json"}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        # trust_env stays off: the daemon is local, and an HTTP proxy from the environment must not see the token.
        self._session = aiohttp.ClientSession(timeout=_TIMEOUT, headers=headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        return await self._request("GET", path, params=params)

    async def post(self, path: str, body: Any) -> dict[str, Any]:
        return await self._request("POST", path, body=body)

    async def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                       body: Any = None) -> dict[str, Any]:
        assert self._session is not None
        url = self.target.url + path
        try:
            async with self._session.request(method, url, params=params,
                                             json=body if method == "POST" else None) as resp:
                text = await resp.text(errors="replace")
                status = resp.status
        except aiohttp.ClientConnectorError as e:
            raise Unreachable(_unreachable(self.target.url, _reason(e.os_error) or str(e))) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise Unreachable(_unreachable(self.target.url, str(e) or type(e).__name__)) from None
        except TimeoutError:
            raise Unreachable(_unreachable(self.target.url, "no answer in time")) from None
        try:
            document = json.loads(text) if text else None
        except ValueError:
            document = None
        if status >= 400:
            raise self._error(status, document, text)
        if not isinstance(document, dict) or "data" not in document:
            raise ServerError(status, [f"{method} {url} answered {status} without a JSON `data` member: "
                                       "is that eventrelay, and recent enough to have the admin API?"])
        return document

    def _error(self, status: int, document: Any, text: str) -> ServerError:
        errors = document.get("errors") if isinstance(document, dict) else None
        if not isinstance(errors, list):
            errors = []
        details = [str(e.get("detail") or e.get("title") or status) for e in errors if isinstance(e, dict)]
        if not details:
            details = [f"HTTP {status}: {_one_line(text, 200) or 'no details'}"]
        hint = ""
        if status == 401:
            hint = (f"the token comes from --token, ${TOKEN_ENV} or listen.token in the config; "
                    "it must equal the running daemon's listen.token")
            if self.target.token_problem:
                hint += f" ({self.target.token_problem})"
        elif status == 404 and details == ["Not Found"]:
            hint = "the daemon does not know this path: is it older than this eventrelay command?"
        return ServerError(status, details, hint)


def _reason(error: OSError | None) -> str | None:
    # asyncio's strerror is "Connect call failed ('127.0.0.1', 8787)"; the errno's text says why it failed.
    if error is None:
        return None
    if isinstance(error.errno, int) and error.errno > 0:
        return os.strerror(error.errno)
    return error.strerror or None


def _unreachable(url: str, reason: str) -> str:
    return f"cannot reach the daemon ({reason}): is eventrelay running? tried {url}"


# -- running a command ----------------------------------------------------------------------------------------

def _run(args: argparse.Namespace, body: Callable[[_Client, argparse.Namespace], Coroutine[Any, Any, int]]) -> int:
    """Find the daemon, run `body` against it, and turn every failure into its message and exit code."""
    try:
        target = target_from(args.config, args.url, args.token)

        async def main() -> int:
            async with _Client(target) as client:
                return await body(client, args)

        return asyncio.run(main())
    except ServerError as e:
        for detail in e.details:
            print(f"eventrelay: {detail}", file=sys.stderr)
        if e.hint:
            print(f"eventrelay: {e.hint}", file=sys.stderr)
        return e.exit_code
    except AdminError as e:
        print(f"eventrelay: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("eventrelay: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _integration_path(name: str) -> str:
    return f"/v1/integrations/{quote(name, safe='')}"


# -- status ---------------------------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    return _run(args, _status)


async def _status(client: _Client, args: argparse.Namespace) -> int:
    data = (await client.get("/v1/status"))["data"]
    if args.json:
        _print_json(data)
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
    lines.append("")
    integrations = data.get("integrations") or []
    if not integrations:
        lines.append("no integrations configured")
        return "\n".join(lines)
    rows = []
    for i in integrations:
        error = _one_line(i.get("last_error"), _ERROR_WIDTH)
        if i.get("last_error") and i.get("last_failure_at"):
            error = f"{_ago(i['last_failure_at'], now)}: {error}"  # how old it is tells if it still matters
        rows.append([str(i.get("name", "?")), str(i.get("integration_type", "?")),
                     "yes" if i.get("enabled") else "no",
                     _num(i.get("pending")), _num(i.get("in_flight")), _num(i.get("dead")),
                     _num(i.get("delivered_last_hour")), _ago(i.get("last_success_at"), now),
                     error])
    headers = ["NAME", "TYPE", "ENABLED", "PENDING", "IN FLIGHT", "DEAD", "DELIVERED/H", "LAST SUCCESS",
               "LAST ERROR"]
    lines.append(_table(headers, rows, right={3, 4, 5, 6}))
    return "\n".join(lines)


# -- reload -------------------------------------------------------------------------------------------------

def cmd_reload(args: argparse.Namespace) -> int:
    return _run(args, _reload)


async def _reload(client: _Client, args: argparse.Namespace) -> int:
    data = (await client.post("/v1/reload", {}))["data"]
    ok = bool(data.get("ok"))
    if args.json:
        _print_json(data)
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


def format_reload(data: dict[str, Any]) -> str:
    changes = data.get("changes") or []
    if not changes:
        return "configuration reloaded: no changes"
    return "\n".join([f"configuration reloaded, {len(changes)} change(s):", *(f"  {c}" for c in changes)])


# -- jobs ---------------------------------------------------------------------------------------------------

def cmd_jobs(args: argparse.Namespace) -> int:
    return _run(args, _jobs)


async def _jobs(client: _Client, args: argparse.Namespace) -> int:
    if args.orphaned:
        return await _orphaned(client, args)
    if not args.integration:
        raise UsageError("name an integration, or ask for --orphaned")
    params = {"page[limit]": str(args.limit), "page[offset]": str(args.offset)}
    if args.state:
        params["state"] = args.state
    document = await client.get(f"{_integration_path(args.integration)}/jobs", params)
    if args.json:
        _print_json(document["data"])
        return EXIT_OK
    what = f"{args.state} jobs" if args.state else "jobs"
    print(format_jobs(document, _now(), what=what, integration=args.integration, offset=args.offset))
    return EXIT_OK


async def _orphaned(client: _Client, args: argparse.Namespace) -> int:
    document = await client.get("/v1/jobs/orphaned", {})
    if args.json:
        _print_json(document["data"])
        return EXIT_OK
    rows = [[o["integration"], _num(o["pending"]), _num(o["dead"])] for o in document["data"]]
    if rows:
        print(_table(["INTEGRATION (not configured)", "PENDING", "DEAD"], rows, right={1, 2}))
        print("these jobs resume if an integration of that name is configured again")
    else:
        print("no orphaned jobs: every job belongs to a configured integration")
    return EXIT_OK


def format_jobs(document: dict[str, Any], now: datetime, *, what: str = "jobs", integration: str = "",
                offset: int = 0) -> str:
    jobs = document.get("data") or []
    rows = [[str(j.get("id", "?")), str(j.get("state", "?")), _num(j.get("attempts")),
             str(j.get("event_type", "")), str(j.get("event_id", "")), _when(j.get("created_at")),
             _next_attempt(j, now), _one_line(j.get("last_error"), _ERROR_WIDTH)] for j in jobs]
    headers = ["ID", "STATE", "ATTEMPTS", "EVENT TYPE", "EVENT ID", "CREATED", "NEXT ATTEMPT", "LAST ERROR"]
    body = [_table(headers, rows, right={0, 2})] if rows else []
    return "\n".join(body + [_footer(document, len(rows), offset, f"{what} of {integration}")])


def _next_attempt(job: dict[str, Any], now: datetime) -> str:
    if job.get("state") != "pending" or not job.get("next_attempt_at"):
        return "-"
    at = _parse_time(job["next_attempt_at"])
    if at is None:
        return str(job["next_attempt_at"])
    return "due" if at <= now else f"in {_span((at - now).total_seconds())}"


# -- logs ---------------------------------------------------------------------------------------------------

def cmd_logs(args: argparse.Namespace) -> int:
    return _run(args, _logs)


async def _logs(client: _Client, args: argparse.Namespace) -> int:
    path = _integration_path(args.integration)
    if args.job is not None:
        path += f"/jobs/{quote(args.job, safe='')}"
    document = await client.get(f"{path}/logs", {"page[limit]": str(args.limit), "page[offset]": str(args.offset)})
    if args.json:
        _print_json(document["data"])
        return EXIT_OK
    what = f"attempts of job {args.job}" if args.job is not None else "attempts"
    # One job's log is read to find out why it fails: show its answers whole, not cut to fit a column.
    width = None if args.job is not None else _ERROR_WIDTH
    print(format_logs(document, what=what, integration=args.integration, offset=args.offset, width=width))
    return EXIT_OK


def format_logs(document: dict[str, Any], *, what: str = "attempts", integration: str = "", offset: int = 0,
                width: int | None = _ERROR_WIDTH) -> str:
    entries = document.get("data") or []
    rows = []
    for e in entries:
        job = (((e.get("relationships") or {}).get("job") or {}).get("data") or {}).get("id", "-")
        created = ((e.get("meta") or {}).get("timestamps") or {}).get("created_at")
        status = e.get("status_code")
        detail = e.get("error_detail") or e.get("body")
        rows.append([_when(created), str(job), _num(e.get("attempt")), "ok" if e.get("succeeded") else "failed",
                     "-" if status is None else str(status), _seconds(e.get("processing_time")),
                     _one_line(detail, width)])
    headers = ["TIME", "JOB", "ATTEMPT", "RESULT", "STATUS", "DURATION", "DETAIL"]
    body = [_table(headers, rows, right={1, 2, 5})] if rows else []
    return "\n".join(body + [_footer(document, len(rows), offset, f"{what} of {integration}")])


# -- retry --------------------------------------------------------------------------------------------------

def cmd_retry(args: argparse.Namespace) -> int:
    return _run(args, _retry)


async def _retry(client: _Client, args: argparse.Namespace) -> int:
    path = f"{_integration_path(args.integration)}/jobs/{quote(args.job, safe='')}/retry"
    answer = await client.post(path, {})
    job = answer["data"]
    if args.json:
        _print_json(job)
        return EXIT_OK
    held_by = (answer.get("meta") or {}).get("held_by")
    when = f"held: {held_by}" if held_by else "it goes now"
    print(f"job {job.get('id', args.job)} of {args.integration} re-queued ({job.get('state', 'pending')}, "
          f"{_num(job.get('attempts'))} attempt(s) so far); {when}; follow it with "
          f"`eventrelay logs {args.integration} --job {job.get('id', args.job)}`")
    return EXIT_OK


def cmd_enable(args: argparse.Namespace) -> int:
    return _run(args, _enable)


async def _enable(client: _Client, args: argparse.Namespace) -> int:
    data = (await client.post(f"{_integration_path(args.integration)}/enable", {}))["data"]
    if args.json:
        _print_json(data)
    elif data.get("was_disabled"):
        print(f"{args.integration} enabled again: its pending jobs are being delivered")
    else:
        print(f"{args.integration} was not disabled: nothing to do")
    return EXIT_OK


def cmd_close_circuit(args: argparse.Namespace) -> int:
    return _run(args, _close_circuit)


async def _close_circuit(client: _Client, args: argparse.Namespace) -> int:
    data = (await client.post(f"{_integration_path(args.integration)}/close-circuit", {}))["data"]
    if args.json:
        _print_json(data)
    elif data.get("was") == "closed":
        print(f"the circuit of {args.integration} was not open: nothing to do")
    else:
        print(f"the circuit of {args.integration} is closed (it was {data.get('was')}): deliveries resume now")
    return EXIT_OK


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

    async def body(client: _Client, args: argparse.Namespace) -> int:
        return await _replay(client, args, selector, described, progress)

    code = _run(args, body)
    if code not in (EXIT_OK, EXIT_USAGE) and progress.queued:
        # Whatever stopped the loop, the batches before it were re-queued: the operator must know how many.
        print(f"eventrelay: {progress.queued} job(s) had been re-queued before that; running the same command "
              "again continues where it stopped", file=sys.stderr)
    return code


def _replay_selector(args: argparse.Namespace, now: datetime) -> tuple[dict[str, Any], str]:
    if args.dead:
        if args.until is not None:
            raise UsageError("--until goes with --since, not with --dead")
        return {"state": "dead", "not_requeued_since": _iso(now)}, "dead job(s)"
    if args.since is None:
        raise UsageError("say what to replay: --dead, or --since TIME [--until TIME]")
    since = parse_time_arg(args.since, now, "--since")
    # `until` is fixed when the command starts: events arriving while it loops are not swept into the replay.
    until = parse_time_arg(args.until, now, "--until") if args.until is not None else now
    if since >= until:
        raise UsageError(f"--since ({_iso(since)}) must be before --until ({_iso(until)})")
    # not_requeued_since: the batches of this command skip what its earlier batches re-queued, so the loop ends
    # even while deliveries keep up with it.
    return ({"since": _iso(since), "until": _iso(until), "not_requeued_since": _iso(now)},
            f"job(s) created from {_iso(since)} to {_iso(until)}")


async def _replay(client: _Client, args: argparse.Namespace, selector: dict[str, Any], described: str,
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
        _print_json({"queued": progress.queued})
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

    async def body(client: _Client, args: argparse.Namespace) -> int:
        accepted = (await client.post("/v1/events", event))["data"]
        if args.json:
            _print_json(accepted)
            return EXIT_OK
        for a in accepted:
            if a.get("duplicate"):
                print(f"event {a.get('id')} was accepted before (same id): nothing new queued")
            else:
                print(f"event {a.get('id')} accepted: {_num(a.get('jobs'))} job(s) queued")
        return EXIT_OK

    return _run(args, body)


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
    """Register status, reload, jobs, logs, retry, replay and send; each sets `func` to its cmd_* function."""
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

    retry = subparsers.add_parser("retry", parents=[common], help="deliver a pending or dead job again now")
    retry.add_argument("integration", help="its name, as in the config")
    retry.add_argument("job", help="the job's id, as `eventrelay jobs` lists it")
    retry.set_defaults(func=cmd_retry)

    enable = subparsers.add_parser("enable", parents=[common],
                                   help="turn an integration back on after its target answered 410 Gone")
    enable.add_argument("integration", help="its name, as in the config")
    enable.set_defaults(func=cmd_enable)

    close = subparsers.add_parser("close-circuit", parents=[common],
                                  help="close an integration's open circuit now (its target is fixed)")
    close.add_argument("integration", help="its name, as in the config")
    close.set_defaults(func=cmd_close_circuit)

    replay = subparsers.add_parser(
        "replay", parents=[common], help="re-queue an integration's dead jobs, or its jobs of a time range",
        epilog="TIME is ISO 8601 (2026-11-27T14:00:00Z; without a zone, local time) or a duration meaning that "
               "long ago (30m, 2h, 7d). Jobs already pending are left alone.")
    replay.add_argument("integration", help="its name, as in the config")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--dead", action="store_true", help="re-queue every dead job")
    which.add_argument("--since", metavar="TIME", help="re-queue jobs created at or after TIME")
    replay.add_argument("--until", metavar="TIME", help="...and before TIME (default: now)")
    replay.add_argument("--batch", type=_positive_int, default=REPLAY_BATCH,
                        help=f"jobs re-queued per request (default {REPLAY_BATCH})")
    replay.set_defaults(func=cmd_replay)

    send = subparsers.add_parser("send", parents=[common], help="send one event, as a producer would")
    send.add_argument("type", help="the event key, e.g. order.paid")
    send.add_argument("--data", help="the event's data as a JSON object, or - to read it from stdin (default {})")
    send.add_argument("--id", help="the event's id (idempotency key); without it the daemon makes one")
    send.set_defaults(func=cmd_send)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return int(text)


# -- formatting ---------------------------------------------------------------------------------------------

def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> str:
    """Columns padded to their widest cell, numbers (the `right` columns) aligned right."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def _indent(text: str, by: str = "  ") -> str:
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


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _parse_time(value: Any) -> datetime | None:
    """A time the daemon sent (ISO 8601 in UTC), or None when it is absent or not one."""
    if not isinstance(value, str):
        return None
    try:
        return parse_datetime(value, naive="utc")
    except (ValueError, OverflowError):
        return None


def _iso(at: datetime) -> str:
    return iso_time(at.timestamp())


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


def _num(value: Any) -> str:
    return "-" if value is None else str(value)


def _one_line(text: Any, width: int | None) -> str:
    """Whitespace (newlines of an HTML error page, say) collapsed; cut to `width` with an ellipsis."""
    return "-" if text is None or text == "" else one_line(str(text), width, ellipsis="…")
