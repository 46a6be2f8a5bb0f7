"""The operator commands (status, reload, jobs, logs, retry, replay, send) against a fake admin API, then the real
daemon.

The fake is a real aiohttp server on 127.0.0.1 that answers as the admin API is specified: it pins table
formatting, the requests the commands make and their exit codes. The end-to-end tests at the bottom run the
same commands against the daemon itself: found by its runtime file with no --config or --url, reloaded, and
the README's Quick start as typed. Commands call asyncio.run, so async tests run them in a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from aiohttp import web

import eventrelay
import eventrelay.service
from eventrelay.admin import client as admin_client
from eventrelay.admin import commands as admin_commands
from eventrelay.admin.client import Target, UsageError, target_from
from eventrelay.admin.commands import add_commands

from .conftest import REPO, Receiver, free_port, wait_for, wait_ready, wait_until, webhook

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=timezone.utc)


def iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ago(**delta: float) -> str:
    return iso(NOW - timedelta(**delta))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eventrelay")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


async def run(*argv: str) -> int:
    args = parse(*argv)
    return await asyncio.to_thread(args.func, args)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never read the host's /etc/eventrelay/config.yaml or an operator's token.
    monkeypatch.setenv("EVENTRELAY_CONFIG", str(tmp_path / "no-such-config.yaml"))
    monkeypatch.delenv("EVENTRELAY_TOKEN", raising=False)


# -- the fake admin API ---------------------------------------------------------------------------------------

def job(job_id: str, state: str, attempts: int, error: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "type": "job", "integration": "erp", "event_id": f"evt-{job_id}",
            "event_type": "order.paid", "state": state, "attempts": attempts, "created_at": ago(hours=1),
            "updated_at": ago(minutes=5), "next_attempt_at": None, "last_error": error, **extra}


def log_entry(log_id: str, job_id: str, attempt: int, status: int | None, error: str | None,
              body: str | None = None, seconds: float = 0.0123) -> dict[str, Any]:
    return {"id": log_id, "type": "integration-log", "succeeded": error is None, "attempt": attempt,
            "processing_time": seconds, "status_code": status, "body": body, "error_detail": error,
            "relationships": {"integration": {"data": {"type": "integration", "id": "erp"}},
                              "job": {"data": {"type": "job", "id": job_id}}},
            "meta": {"timestamps": {"created_at": ago(minutes=int(log_id))}}}


LONG_ERROR = "Received a status code outside of 2xx range (500): <html><body>\n  Internal Server Error, see the logs"


# What holds deliveries back, in a status row: nothing (running), or not running at all (enabled: false).
RUNNING = {"circuit": "closed", "circuit_open_until": None, "paused_until": None, "disabled": None}
NOT_RUNNING = {"circuit": None, "circuit_open_until": None, "paused_until": None, "disabled": None}


def status_data() -> dict[str, Any]:
    return {
        "version": "1.2.3", "started_at": ago(hours=4, minutes=12), "uptime_s": 4 * 3600 + 12 * 60 + 7.5,
        "config": {"path": "/etc/eventrelay/config.yaml", "last_reload": {
            "at": ago(minutes=3), "ok": False,
            "errors": ["integrations[0].configuration.url: not an http(s) URL", "listen.token: must be a string"]}},
        "integrations": [
            {"name": "erp-orders", "integration_type": "webhook", "enabled": True, "pending": 12, "in_flight": 3,
             "dead": 0, "delivered_last_hour": 1520, "last_success_at": ago(seconds=4), "last_failure_at": None,
             "last_error": None, **RUNNING},
            {"name": "inventory", "integration_type": "aws_sqs", "enabled": False, "pending": 0, "in_flight": 0,
             "dead": 140, "delivered_last_hour": 0, "last_success_at": None,
             "last_failure_at": ago(hours=2, minutes=1), "last_error": LONG_ERROR, **NOT_RUNNING},
        ],
    }


@dataclass
class FakeApi:
    url: str = ""
    token: str | None = None
    status: dict[str, Any] = field(default_factory=status_data)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    dead: int = 0
    fail_replay_after: int | None = None  # answer 500 to replay calls after this many
    replay_window: dict[str, str] | None = None  # `meta.replay` of the 409 to a delivered job's retry
    requests: list[tuple[str, str, dict[str, str], Any, dict[str, str]]] = field(default_factory=list)

    def bodies(self, path_end: str) -> list[Any]:
        return [body for _, path, _, body, _ in self.requests if path.endswith(path_end)]


def api_error(status: int, detail: str, meta: dict[str, Any] | None = None) -> web.Response:
    document: dict[str, Any] = {"errors": [{"status": str(status), "title": "Error", "detail": detail}]}
    return web.json_response({**document, "meta": meta} if meta is not None else document, status=status)


def paged(items: list[Any], request: web.Request) -> web.Response:
    limit, offset = int(request.query.get("page[limit]", 25)), int(request.query.get("page[offset]", 0))
    return web.json_response({"data": items[offset:offset + limit], "meta": {
        "page": {"limit": limit, "offset": offset, "current": offset // limit + 1, "total": -(-len(items) // limit)},
        "results": {"total": len(items)}}, "links": {}})


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeApi]:
    monkeypatch.setattr(admin_commands, "_now", lambda: NOW)
    api = FakeApi()

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        api.requests.append((request.method, request.path, dict(request.query), body, dict(request.headers)))
        if api.token and request.headers.get("Authorization") != f"Bearer {api.token}":
            return api_error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        if request.match_info.get("name", "erp") != "erp":
            return api_error(404, f"no integration named {request.match_info['name']!r} in the configuration")
        return await handler(request)

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"data": api.status})

    async def jobs(request: web.Request) -> web.Response:
        state = request.query.get("state")
        return paged([j for j in api.jobs if state in (None, j["state"])], request)

    async def logs(request: web.Request) -> web.Response:
        job_id = request.match_info.get("job")
        return paged([e for e in api.logs if job_id in (None, e["relationships"]["job"]["data"]["id"])], request)

    async def retry(request: web.Request) -> web.Response:
        found = next((j for j in api.jobs if j["id"] == request.match_info["job"]), None)
        if found is None:
            return api_error(404, f"integration 'erp' has no job {request.match_info['job']!r}")
        if found["state"] == "delivered":
            meta = {"replay": api.replay_window} if api.replay_window else None  # None: an older daemon
            return api_error(409, "the job was delivered; to send it again, replay its time range", meta)
        found.update(state="pending", next_attempt_at=iso(NOW))
        return web.json_response({"data": found})

    async def replay(request: web.Request) -> web.Response:
        calls = len(api.bodies("/replay"))
        if api.fail_replay_after is not None and calls > api.fail_replay_after:
            return api_error(500, "database is locked")
        body = await request.json()
        queued = min(body["limit"], api.dead)
        api.dead -= queued
        return web.json_response({"data": {"queued": queued}})

    async def events(request: web.Request) -> web.Response:
        body = await request.json()
        if body["type"] != body["type"].lower():
            return api_error(400, "type: 'Order.Paid' is not an event key (resource.action, lower case)")
        return web.json_response({"data": [{"id": body.get("id", "0190-made-up"), "jobs": 2,
                                            "duplicate": body.get("id") == "seen"}]}, status=202)

    app = web.Application(middlewares=[record])
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/integrations/{name}/jobs", jobs)
    app.router.add_get("/v1/integrations/{name}/logs", logs)
    app.router.add_get("/v1/integrations/{name}/jobs/{job}/logs", logs)
    app.router.add_post("/v1/integrations/{name}/jobs/{job}/retry", retry)
    app.router.add_post("/v1/integrations/{name}/replay", replay)
    app.router.add_post("/v1/events", events)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield api
    await runner.cleanup()


# -- status ---------------------------------------------------------------------------------------------------

async def test_status_shows_the_header_the_failed_reload_and_one_aligned_row_per_integration(fake, capsys) -> None:
    assert await run("status", "--url", fake.url) == 0  # dead jobs and a failed reload: reported, still 0
    out = capsys.readouterr().out
    assert out == (
        "eventrelay 1.2.3, up 4h 12m (since 2026-11-27 07:48:00Z)\n"
        "config /etc/eventrelay/config.yaml: reload 3m ago FAILED; the daemon still runs the previous "
        "configuration. Fix these, check with `eventrelay check-config --config /etc/eventrelay/config.yaml`, "
        "reload again:\n"
        "  integrations[0].configuration.url: not an http(s) URL\n"
        "  listen.token: must be a string\n"
        "\n"
        "NAME        TYPE     ENABLED  STATE  PENDING  IN FLIGHT  DEAD  DELIVERED/H  LAST SUCCESS  LAST ERROR\n"
        "erp-orders  webhook  yes      ok          12          3     0         1520  4s ago        -\n"
        "inventory   aws_sqs  no       -            0          0   140            0  never         "
        "2h 1m ago: Received a status code outside of 2xx range (500): <html><b…\n")
    assert "\n  Internal" not in out  # an error's newlines never break the table
    assert fake.requests[0][:2] == ("GET", "/v1/status")


@pytest.mark.parametrize("reload, line", [
    (None, "config /etc/eventrelay/config.yaml: as loaded at start, not reloaded since"),
    ({"at": ago(hours=1, minutes=30), "ok": True, "errors": []},
     "config /etc/eventrelay/config.yaml: reloaded 1h 30m ago, OK"),
])
async def test_status_says_when_the_config_was_last_reloaded(fake, capsys, reload, line) -> None:
    fake.status["config"]["last_reload"] = reload
    fake.status["integrations"] = []
    assert await run("status", "--url", fake.url) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [line, "", "no integrations configured"]


async def test_status_json_prints_the_servers_data_for_scripts(fake, capsys) -> None:
    assert await run("status", "--url", fake.url, "--json") == 0
    assert json.loads(capsys.readouterr().out) == fake.status


GONE = {"at": ago(minutes=20), "reason": "the target answered 410 Gone: Received a status code outside of 2xx "
                                           "range (410)"}


@pytest.mark.parametrize("held, state", [
    ({}, "ok"),
    ({"circuit": "open", "circuit_open_until": iso(NOW + timedelta(seconds=18))}, "circuit open, probe in 18s"),
    ({"circuit": "open", "circuit_open_until": ago(seconds=1)}, "circuit open, probe due"),
    ({"circuit": "half_open"}, "circuit half-open"),
    ({"paused_until": iso(NOW + timedelta(seconds=40))}, "paused until 12:00:40Z (in 40s)"),
    ({"paused_until": ago(seconds=1)}, "ok"),  # a pause that has run out holds nothing
    ({"disabled": GONE}, "disabled (410): the target answered 410 Gone: Received …"),
    ({"paused": {"at": ago(minutes=3)}}, "paused by an operator 3m ago"),
    ({"circuit": "open", "circuit_open_until": iso(NOW + timedelta(minutes=4, seconds=10)),
      "paused_until": iso(NOW + timedelta(seconds=5))},
     "circuit open, probe in 4m 10s; paused until 12:00:05Z (in 5s)"),
])
async def test_status_shows_what_holds_each_integrations_deliveries(fake, capsys, held, state) -> None:
    fake.status["integrations"][0].update(held)
    assert await run("status", "--url", fake.url) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = lines[-3], lines[-2]
    column = header.index("STATE")
    assert row[column:].startswith(f"{state}  ") and row[:column].split() == ["erp-orders", "webhook", "yes"]


# -- jobs and logs ---------------------------------------------------------------------------------------------

async def test_jobs_passes_state_and_page_and_prints_a_table_with_the_next_page(fake, capsys) -> None:
    fake.jobs = [job("9", "dead", 7, "Received a status code outside of 2xx range (503)"),
                 job("8", "pending", 2, "no complete answer within the timeout (10s)",
                     next_attempt_at=iso(NOW + timedelta(seconds=95))),
                 job("7", "delivered", 1),
                 job("6", "pending", 0, next_attempt_at=ago(seconds=1)),
                 job("5", "dead", 9, "connection refused")]
    assert await run("jobs", "erp", "--limit", "3", "--url", fake.url) == 0
    assert capsys.readouterr().out == (
        "ID  STATE      ATTEMPTS  EVENT TYPE  EVENT ID  CREATED               NEXT ATTEMPT  LAST ERROR\n"
        " 9  dead              7  order.paid  evt-9     2026-11-27 11:00:00Z  -             "
        "Received a status code outside of 2xx range (503)\n"
        " 8  pending           2  order.paid  evt-8     2026-11-27 11:00:00Z  in 1m 35s     "
        "no complete answer within the timeout (10s)\n"
        " 7  delivered         1  order.paid  evt-7     2026-11-27 11:00:00Z  -             -\n"
        "jobs of erp 1-3 of 5, newest first; next page: --offset 3\n")
    assert fake.requests[-1][2] == {"page[limit]": "3", "page[offset]": "0"}  # no state: every job

    assert await run("jobs", "erp", "--state", "dead", "--offset", "1", "--url", fake.url) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["5", "dead"] and out[-1] == "dead jobs of erp 2-2 of 2, newest first"
    assert fake.requests[-1][2] == {"state": "dead", "page[limit]": "25", "page[offset]": "1"}

    assert await run("jobs", "erp", "--state", "dead", "--json", "--url", fake.url) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == ["9", "5"]


@pytest.mark.parametrize("row, next_attempt", [
    ({**RUNNING, "circuit": "open", "circuit_open_until": iso(NOW + timedelta(seconds=18))},
     "held (circuit open, probe in 18s)"),
    ({**RUNNING, "paused_until": iso(NOW + timedelta(seconds=40))}, "held (paused until 12:00:40Z (in 40s))"),
    ({**RUNNING, "disabled": GONE}, "held (disabled (410))"),
    ({**NOT_RUNNING, "enabled": False}, "held (enabled: false)"),
    (None, "held (not in the config)"),  # its jobs wait for an integration of that name to return
    (RUNNING, "due"),
])
async def test_due_jobs_say_what_holds_them(fake, capsys, row, next_attempt) -> None:
    if row is not None:
        fake.status["integrations"].append({**fake.status["integrations"][0], "name": "erp", "enabled": True, **row})
    fake.jobs = [job("8", "pending", 2, "connection refused", next_attempt_at=iso(NOW + timedelta(seconds=95))),
                 job("6", "pending", 0, next_attempt_at=ago(seconds=1)),
                 job("5", "dead", 9, "connection refused")]
    assert await run("jobs", "erp", "--url", fake.url) == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].index("NEXT ATTEMPT")
    assert [line[column:].split("  ")[0] for line in lines[1:4]] == ["in 1m 35s", next_attempt, "-"]
    # One request more than the listing, for the integration's state.
    assert [path for _, path, *_ in fake.requests] == ["/v1/integrations/erp/jobs", "/v1/status"]


async def test_jobs_without_a_due_one_do_not_ask_for_the_state(fake, capsys) -> None:
    fake.jobs = [job("8", "pending", 2, next_attempt_at=iso(NOW + timedelta(seconds=95))), job("7", "delivered", 1)]
    assert await run("jobs", "erp", "--url", fake.url) == 0
    assert [path for _, path, *_ in fake.requests] == ["/v1/integrations/erp/jobs"]


async def test_no_jobs_is_said_in_words(fake, capsys) -> None:
    assert await run("jobs", "erp", "--state", "dead", "--url", fake.url) == 0
    assert capsys.readouterr().out == "no dead jobs of erp\n"


async def test_unknown_integration_exits_1_with_the_servers_detail(fake, capsys) -> None:
    assert await run("jobs", "nope", "--url", fake.url) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "eventrelay: no integration named 'nope' in the configuration\n"


async def test_logs_of_an_integration_cut_answers_and_of_a_job_show_them_whole(fake, capsys) -> None:
    fake.logs = [log_entry("3", "8", 2, None, None, body="thanks", seconds=0.004),
                 log_entry("2", "8", 1, 500, LONG_ERROR, seconds=12.5),
                 log_entry("1", "5", 1, None, "no complete answer within the timeout (10s)", seconds=10.0)]
    assert await run("logs", "erp", "--url", fake.url) == 0
    assert capsys.readouterr().out == (
        "TIME                  JOB  ATTEMPT  RESULT  STATUS  DURATION  DETAIL\n"
        "2026-11-27 11:57:00Z    8        2  ok      -            4ms  thanks\n"
        "2026-11-27 11:58:00Z    8        1  failed  500        12.5s  "
        "Received a status code outside of 2xx range (500): <html><b…\n"
        "2026-11-27 11:59:00Z    5        1  failed  -          10.0s  no complete answer within the timeout (10s)\n"
        "attempts of erp 1-3 of 3, newest first\n")
    assert fake.requests[-1][1:3] == ("/v1/integrations/erp/logs", {"page[limit]": "25", "page[offset]": "0"})

    assert await run("logs", "erp", "--job", "8", "--limit", "1", "--url", fake.url) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1].endswith("thanks")
    assert out[2] == "attempts of job 8 of erp 1-1 of 2, newest first; next page: --offset 1"
    assert fake.requests[-1][1:3] == ("/v1/integrations/erp/jobs/8/logs", {"page[limit]": "1", "page[offset]": "0"})

    assert await run("logs", "erp", "--job", "8", "--offset", "1", "--url", fake.url) == 0
    assert " ".join(LONG_ERROR.split()) in capsys.readouterr().out  # one job's answers are shown whole


async def test_a_reader_that_stops_early_ends_the_command_quietly(fake) -> None:
    """`eventrelay logs erp | head -4`: head exits after four lines, and the command must stop there without a
    BrokenPipeError traceback. The output is larger than a pipe holds, so the command is still writing when
    the reader goes."""
    fake.logs = [log_entry(str(n), "8", n, 500, f"error {n}: " + "x" * 3000) for n in range(1, 101)]
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "eventrelay", "logs", "erp", "--job", "8", "--limit", "100",
                             "--url", fake.url], stdout=write_end, stderr=subprocess.PIPE, cwd=REPO)
    os.close(write_end)

    def head() -> bytes:
        seen = b""
        while b"\n" not in seen:  # ends at the first line, or at EOF if the command wrote nothing
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            seen += chunk
        os.close(read_end)  # the reader is gone
        return seen

    try:
        first = await asyncio.to_thread(head)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert first.startswith(b"TIME ")
    assert proc.returncode == 1 and err == b"", err.decode()


# -- retry ----------------------------------------------------------------------------------------------------

async def test_retry_requeues_and_says_how_to_follow_the_job(fake, capsys) -> None:
    fake.jobs = [job("5", "dead", 9, "connection refused"), job("7", "delivered", 1)]
    assert await run("retry", "erp", "5", "--url", fake.url) == 0
    assert capsys.readouterr().out == (
        "job 5 of erp re-queued (pending, 9 attempt(s) so far); it goes now; follow it with "
        "`eventrelay logs erp --job 5`\n")
    assert fake.requests[-1][:2] == ("POST", "/v1/integrations/erp/jobs/5/retry")


@pytest.mark.parametrize("job_id, detail", [
    ("7", "the job was delivered; to send it again, replay its time range"),  # 409
    ("404", "integration 'erp' has no job '404'"),
])
async def test_retry_that_the_server_refuses_exits_1_with_its_detail(fake, capsys, job_id, detail) -> None:
    fake.jobs = [job("7", "delivered", 1)]
    assert await run("retry", "erp", job_id, "--url", fake.url) == 1
    assert capsys.readouterr() == ("", f"eventrelay: {detail}\n")


@pytest.mark.parametrize("where, echoed", [
    (["--url", "{url}"], " --url {url}"),
    (["--url", "{url}", "--config", "/etc/my eventrelay.yaml", "--token", "t0ken"],
     " --config '/etc/my eventrelay.yaml' --url {url}"),  # the token is never printed
])
async def test_retry_of_a_delivered_job_prints_the_replay_that_sends_it_again(fake, capsys, where, echoed) -> None:
    fake.jobs = [job("7", "delivered", 1)]
    fake.replay_window = {"since": "2026-11-27T11:00:00.122Z", "until": "2026-11-27T11:00:00.124Z"}
    assert await run("retry", "erp", "7", *(w.format(url=fake.url) for w in where)) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "eventrelay: job 7 of erp was delivered, and retry only sends pending or dead jobs. To send it again, "
        "replay the moment it was created (with any other job of erp created in those milliseconds):\n"
        "  eventrelay replay erp --since 2026-11-27T11:00:00.122Z --until 2026-11-27T11:00:00.124Z"
        + echoed.format(url=fake.url) + "\n")


# -- replay ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dead, calls", [(5, 3), (4, 3), (0, 1)])
async def test_replay_dead_loops_in_batches_until_the_server_has_no_more(fake, capsys, dead, calls) -> None:
    fake.dead = dead
    assert await run("replay", "erp", "--dead", "--batch", "2", "--url", fake.url) == 0
    # A short batch ends the loop.
    assert fake.bodies("/replay") == [{"state": "dead", "not_requeued_since": "2026-11-27T12:00:00.000Z",
                                       "limit": 2}] * calls
    out, err = capsys.readouterr()
    if dead:
        assert out == f"re-queued {dead} dead job(s) of erp\n"
        done = [min(2 * i, dead) for i in range(1, calls + 1)]
        expected = [f"replay erp: {n} dead job(s) re-queued so far" for n in dict.fromkeys(done) if n]
        assert err.splitlines() == expected
    else:
        assert (out, err) == ("nothing to replay: no dead job(s) of erp\n", "")
    assert fake.dead == 0


async def test_replay_default_batch_and_json(fake, capsys) -> None:
    fake.dead = 3
    assert await run("replay", "erp", "--dead", "--json", "--url", fake.url) == 0
    assert fake.bodies("/replay") == [{"state": "dead", "not_requeued_since": "2026-11-27T12:00:00.000Z",
                                       "limit": 5000}]
    assert capsys.readouterr() == ('{\n  "queued": 3\n}\n', "")


@pytest.mark.parametrize("since, until, body", [
    ("2h", None, {"since": "2026-11-27T10:00:00.000Z", "until": "2026-11-27T12:00:00.000Z"}),
    ("1d 6h", "90m", {"since": "2026-11-26T06:00:00.000Z", "until": "2026-11-27T10:30:00.000Z"}),
    ("2026-11-27T09:15:00Z", "2026-11-27T11:00:00+02:00",
     {"since": "2026-11-27T09:15:00.000Z", "until": "2026-11-27T09:00:00.000Z"}),
])
async def test_replay_window_accepts_durations_ago_and_iso_times(fake, capsys, since, until, body) -> None:
    argv = ["replay", "erp", "--since", since, "--url", fake.url] + (["--until", until] if until else [])
    code = await run(*argv)
    if body["since"] >= body["until"]:
        assert code == 2 and fake.requests == []
        assert "must be before --until" in capsys.readouterr().err
        return
    assert code == 0
    # not_requeued_since is the command's start: its later batches skip what its earlier ones re-queued.
    assert fake.bodies("/replay") == [{**body, "not_requeued_since": "2026-11-27T12:00:00.000Z", "limit": 5000}]
    assert capsys.readouterr().out == (
        f"nothing to replay: no job(s) created from {body['since']} to {body['until']} of erp\n")


def test_a_time_without_zone_is_local_time() -> None:
    local = datetime(2026, 11, 27, 9, 0).astimezone()
    assert admin_commands.parse_time_arg("2026-11-27 09:00", NOW) == local.astimezone(timezone.utc)


@pytest.mark.parametrize("argv, message", [
    (["--dead", "--until", "1h"], "--until goes with --since"),
    ([], "say what to replay: --dead, --since TIME [--until TIME], or both"),
    (["--since", "yesterday"], "--since 'yesterday' is neither a time"),
    (["--since", "1h", "--until", "2h"], "must be before --until"),
])
async def test_replay_usage_errors_exit_2_before_asking_the_server(fake, capsys, argv, message) -> None:
    assert await run("replay", "erp", *argv, "--url", fake.url) == 2
    assert message in capsys.readouterr().err and fake.requests == []


async def test_replay_dead_of_a_time_range(fake, capsys) -> None:
    fake.dead = 1
    assert await run("replay", "erp", "--dead", "--since", "2h", "--until", "1h", "--url", fake.url) == 0
    assert fake.bodies("/replay") == [{"state": "dead", "since": "2026-11-27T10:00:00.000Z",
                                       "until": "2026-11-27T11:00:00.000Z",
                                       "not_requeued_since": "2026-11-27T12:00:00.000Z", "limit": 5000}]
    assert "re-queued 1 dead job(s) created from 2026-11-27T10:00:00.000Z" in capsys.readouterr().out


async def test_replay_failing_midway_says_how_many_were_requeued(fake, capsys) -> None:
    fake.dead, fake.fail_replay_after = 10, 2
    assert await run("replay", "erp", "--dead", "--batch", "3", "--url", fake.url) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-2:] == [
        "eventrelay: database is locked",
        "eventrelay: 6 job(s) had been re-queued before that; running the same command again continues where "
        "it stopped"]


# -- send -----------------------------------------------------------------------------------------------------

async def test_send_posts_one_event_and_reports_its_jobs(fake, capsys) -> None:
    assert await run("send", "order.paid", "--data", '{"type": "order", "id": "o1"}', "--id", "evt-1",
                     "--url", fake.url) == 0
    assert capsys.readouterr().out == "event evt-1 accepted: 2 job(s) queued\n"
    assert fake.bodies("/v1/events") == [{"type": "order.paid", "data": {"type": "order", "id": "o1"},
                                          "id": "evt-1"}]

    assert await run("send", "order.paid", "--id", "seen", "--url", fake.url) == 0
    assert capsys.readouterr().out == "event seen was accepted before (same id): nothing new queued\n"
    assert fake.bodies("/v1/events")[-1] == {"type": "order.paid", "data": {}, "id": "seen"}


async def test_send_reads_data_from_stdin(fake, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"id": "o2", "status": "complete"}\n'))
    assert await run("send", "order.fulfilled", "--data", "-", "--json", "--url", fake.url) == 0
    assert json.loads(capsys.readouterr().out) == [{"id": "0190-made-up", "jobs": 2, "duplicate": False}]
    assert fake.bodies("/v1/events") == [{"type": "order.fulfilled", "data": {"id": "o2", "status": "complete"}}]


@pytest.mark.parametrize("data, message", [
    ("{'id': 1}", "--data is not JSON"),
    ("[1, 2]", "must be a JSON object"),
])
async def test_send_bad_data_is_a_usage_error(fake, capsys, data, message) -> None:
    assert await run("send", "order.paid", "--data", data, "--url", fake.url) == 2
    assert message in capsys.readouterr().err and fake.requests == []


async def test_send_rejected_by_the_server_exits_1(fake, capsys) -> None:
    assert await run("send", "Order.Paid", "--url", fake.url) == 1
    assert capsys.readouterr().err == (
        "eventrelay: type: 'Order.Paid' is not an event key (resource.action, lower case)\n")


# -- reaching the daemon ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["status"], ["jobs", "erp"], ["replay", "erp", "--dead"], ["send", "a.b"]])
async def test_unreachable_daemon_exits_3_and_says_what_was_tried(capsys, command) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert await run(*command, "--url", url) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"eventrelay: cannot reach the daemon (Connection refused): is eventrelay running? tried {url}\n"


async def test_token_from_option_environment_or_config(fake, capsys, monkeypatch, tmp_path) -> None:
    fake.token = "t0ken"
    assert await run("status", "--url", fake.url) == 1
    err = capsys.readouterr().err
    assert "eventrelay: missing or wrong bearer token" in err and "listen.token" in err
    assert "Authorization" not in fake.requests[-1][4]

    assert await run("status", "--url", fake.url, "--token", "t0ken") == 0
    assert fake.requests[-1][4]["Authorization"] == "Bearer t0ken"

    monkeypatch.setenv("EVENTRELAY_TOKEN", "t0ken")
    assert await run("status", "--url", fake.url) == 0

    monkeypatch.delenv("EVENTRELAY_TOKEN")
    host, port = fake.url.removeprefix("http://").split(":")
    path = write_listen(tmp_path, {"http": f"0.0.0.0:{port}", "token": "t0ken"})
    assert await run("status", "--config", str(path)) == 0  # the address and the token from the daemon's file
    monkeypatch.setenv("EVENTRELAY_CONFIG", str(path))
    assert await run("status") == 0


async def test_something_else_on_the_port_is_not_taken_for_the_daemon(capsys) -> None:
    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", html)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        assert await run("status", "--url", f"127.0.0.1:{runner.addresses[0][1]}") == 1
    finally:
        await runner.cleanup()
    assert "without a JSON `data` member: is that eventrelay" in capsys.readouterr().err


# -- target_from --------------------------------------------------------------------------------------------

def write_listen(tmp_path: Path, listen: dict[str, Any], integrations: list[Any] | None = None) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"listen": listen, "storage": {"path": str(tmp_path / "er.db")},
                                    "integrations": integrations or []}))
    return path


@pytest.mark.parametrize("http, url", [
    ("127.0.0.1:8787", "http://127.0.0.1:8787"),
    ("0.0.0.0:8787", "http://127.0.0.1:8787"),  # every address: call loopback
    ("[::]:8787", "http://[::1]:8787"),
    ("[::1]:9000", "http://[::1]:9000"),
    ("[fd00::5]:9000", "http://[fd00::5]:9000"),
    ("relay.internal:80", "http://relay.internal:80"),
])
def test_target_from_the_config(tmp_path, http, url) -> None:
    path = write_listen(tmp_path, {"http": http, "token": "s3cret"})
    assert target_from(str(path), None, None) == Target(url, "s3cret")


def test_options_override_the_config_and_empty_token_means_none(tmp_path, monkeypatch) -> None:
    path = write_listen(tmp_path, {"http": "127.0.0.1:8787", "token": "s3cret"})
    assert target_from(str(path), "http://10.0.0.5:1234/", None) == Target("http://10.0.0.5:1234", "s3cret")
    assert target_from(str(path), None, "other") == Target("http://127.0.0.1:8787", "other")
    assert target_from(str(path), None, "") == Target("http://127.0.0.1:8787", None)
    monkeypatch.setenv("EVENTRELAY_TOKEN", "from-env")
    assert target_from(str(path), None, None) == Target("http://127.0.0.1:8787", "from-env")
    # --url and a token together need no file at all
    assert target_from("/nonexistent.yaml", "127.0.0.1:1", "x") == Target("http://127.0.0.1:1", "x")


def test_config_path_from_the_environment(tmp_path, monkeypatch) -> None:
    path = write_listen(tmp_path, {"http": "127.0.0.1:8788"})
    monkeypatch.setenv("EVENTRELAY_CONFIG", str(path))
    assert target_from(None, None, None) == Target("http://127.0.0.1:8788", None)


def test_url_alone_does_not_need_the_default_config(tmp_path) -> None:
    assert target_from(None, "http://127.0.0.1:8787", None) == Target("http://127.0.0.1:8787", None)
    with pytest.raises(UsageError, match="cannot read the file"):  # but a file named on purpose must work
        target_from(str(tmp_path / "typo.yaml"), "http://127.0.0.1:8787", None)


def test_secrets_of_integrations_missing_from_the_shell_do_not_matter(tmp_path, monkeypatch) -> None:
    # Under systemd they come from an EnvironmentFile that the operator's shell does not load.
    monkeypatch.delenv("ERP_SECRET", raising=False)
    hook = webhook("erp", "https://erp.example.com/hook", configuration={
        "url": "https://erp.example.com/hook", "secret_key": "${ERP_SECRET}"})
    path = write_listen(tmp_path, {"http": "127.0.0.1:8787", "token": "${RELAY_TOKEN:-t0ken}"}, [hook])
    assert target_from(str(path), None, None) == Target("http://127.0.0.1:8787", "t0ken")


@pytest.mark.parametrize("listen, message", [
    ({"http": None, "socket": "/run/er.sock"}, "listen.http is null"),
    ({"http": "127.0.0.1:0"}, "port 0"),
    ({"http": "127.0.0.1:8787", "token": "${RELAY_TOKEN}"}, "listen.token: environment variable RELAY_TOKEN"),
    ({"htp": "127.0.0.1:8787"}, "listen.htp: unknown key"),
])
def test_config_that_cannot_tell_where_the_daemon_is(tmp_path, monkeypatch, listen, message) -> None:
    monkeypatch.delenv("RELAY_TOKEN", raising=False)
    path = write_listen(tmp_path, listen)
    with pytest.raises(UsageError, match=message):
        target_from(str(path), None, None)


async def test_a_missing_config_is_a_usage_error_that_says_what_to_do(capsys) -> None:
    assert await run("status") == 2
    err = capsys.readouterr().err
    assert "cannot find the daemon from" in err and "no-such-config.yaml" in err and "--url" in err


def test_bad_url_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not an http"):
        target_from(None, "ftp://127.0.0.1:21", "")


def test_every_command_is_registered_with_the_common_options() -> None:
    cases = {"status": [], "jobs": ["erp"], "logs": ["erp"], "retry": ["erp", "5"], "replay": ["erp", "--dead"],
             "send": ["order.paid"], "reload": []}
    for name, extra in cases.items():
        args = parse(name, *extra, "-c", "/x.yaml", "--url", "http://h:1", "--token", "t", "--json")
        assert args.func is getattr(admin_commands, f"cmd_{name}")
        assert (args.config, args.url, args.token, args.json) == ("/x.yaml", "http://h:1", "t", True)
    for bad in (["jobs", "erp", "--state", "gone"], ["jobs", "erp", "--limit", "0"], ["retry", "erp"]):
        with pytest.raises(SystemExit):
            parse(*bad)


# -- end to end, against the real daemon ------------------------------------------------------------------

needs_admin_api = pytest.mark.skipif(not hasattr(eventrelay.service.Service, "reload"),
                                     reason="the daemon has no admin API yet (Service.reload is missing)")

@pytest.fixture
def quiet_daemon() -> Any:
    # The daemon runs in this process and logs to stdout, where the commands' output is checked: keep its
    # log records out of the way.
    with structlog.testing.capture_logs() as records:
        yield records


# The receiver fails on purpose: a breaker that never opens keeps this about the CLI (it is tested on its own).
DIES_FAST = {"retry": {"initial": "50ms", "max_interval": "100ms", "max_age": "400ms"},
             "breaker": {"failures": 1000, "window": 1000}}


async def cli_json(*argv: str) -> Any:
    """Run a command with --json in a thread; its stdout, decoded (capsys is read by the caller)."""
    args = parse(*argv, "--json")
    out = io.StringIO()

    def call() -> int:
        saved, sys.stdout = sys.stdout, out
        try:
            return args.func(args)
        finally:
            sys.stdout = saved

    assert await asyncio.to_thread(call) == 0
    return json.loads(out.getvalue())


@needs_admin_api
async def test_e2e_a_dead_job_is_listed_logged_retried_and_replayed(start_daemon, receiver: Receiver,
                                                                  capsys, quiet_daemon) -> None:
    from aiohttp import web as aioweb

    receiver.respond = lambda r: aioweb.Response(status=500, text="database down")
    d = await start_daemon([webhook("erp", receiver.url, delivery=DIES_FAST)])
    url = d.url

    assert await run("send", "order.paid", "--data", '{"id": "o1"}', "--id", "evt-1", "--url", url) == 0
    assert capsys.readouterr().out == "event evt-1 accepted: 1 job(s) queued\n"

    async def dead_jobs() -> list[dict[str, Any]]:
        return await cli_json("jobs", "erp", "--state", "dead", "--url", url)

    await wait_until(dead_jobs, timeout=10)
    (dead,) = await dead_jobs()
    assert (dead["event_id"], dead["event_type"], dead["state"]) == ("evt-1", "order.paid", "dead")
    assert dead["last_error"] == "Received a status code outside of 2xx range (500)"

    assert await run("jobs", "erp", "--state", "dead", "--url", url) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["ID", "STATE", "ATTEMPTS"]
    assert out[1].split()[:2] == [dead["id"], "dead"] and "evt-1" in out[1]
    assert out[-1] == "dead jobs of erp 1-1 of 1, newest first"

    assert await run("logs", "erp", "--job", dead["id"], "--url", url) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 + dead["attempts"]
    assert all(" failed  500 " in line and line.endswith("Received a status code outside of 2xx range (500)")
               for line in out[1:-1])

    assert await run("status", "--url", url) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("erp ")]
    assert rows and rows[0][:7] == ["erp", "webhook", "yes", "ok", "0", "0", "1"]  # state, pending, in flight, dead

    receiver.respond = None  # the receiver is fixed: 204 from now on
    assert await run("retry", "erp", dead["id"], "--url", url) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {dead['id']} of erp re-queued (pending, ") and "; it goes now; " in out
    await wait_for(d.jobs, lambda jobs: [job.state for job in jobs] == ["delivered"])
    assert await run("retry", "erp", dead["id"], "--url", url) == 1  # delivered: 409
    assert "delivered" in capsys.readouterr().err
    assert await run("retry", "erp", "999", "--url", url) == 1
    assert await run("logs", "erp", "--job", dead["id"], "--url", url) == 0
    assert " ok " in capsys.readouterr().out.splitlines()[1]  # newest first: the successful attempt

    # Two more die; replay --dead brings both back, in batches of one to exercise the loop.
    receiver.respond = lambda r: aioweb.Response(status=500)
    for i in (2, 3):
        assert await run("send", "order.paid", "--id", f"evt-{i}", "--url", url) == 0
    await wait_for(d.states, lambda states: states.get("dead") == 2, timeout=10)
    receiver.respond = None
    capsys.readouterr()
    assert await run("replay", "erp", "--dead", "--batch", "1", "--url", url) == 0
    out, err = capsys.readouterr()
    assert out == "re-queued 2 dead job(s) of erp\n"
    assert err.splitlines() == [f"replay erp: {n} dead job(s) re-queued so far" for n in (1, 2)]
    await wait_for(d.states, lambda states: states.get("delivered") == 3)
    assert await run("replay", "erp", "--dead", "--url", url) == 0
    assert capsys.readouterr().out == "nothing to replay: no dead job(s) of erp\n"

    # A time range re-sends what was delivered in it.
    assert await run("replay", "erp", "--since", "1h", "--url", url) == 0
    assert capsys.readouterr().out.startswith("re-queued 3 job(s) created from ")
    await wait_until(lambda: len([r for r in receiver.requests if r.json["id"] == "evt-1"]) >= 2 + dead["attempts"])


@needs_admin_api
async def test_e2e_the_replay_a_delivered_jobs_retry_prints_sends_that_job_again(start_daemon, receiver: Receiver,
                                                                               capsys, quiet_daemon) -> None:
    d = await start_daemon([webhook("erp", receiver.url)])
    for event_id in ("evt-1", "evt-2"):
        assert await run("send", "order.paid", "--id", event_id, "--url", d.url) == 0
        await asyncio.sleep(0.02)  # the next one is created outside the first one's replay range
    await wait_for(d.states, lambda states: states.get("delivered") == 2)
    (first,) = [j for j in await cli_json("jobs", "erp", "--url", d.url) if j["event_id"] == "evt-1"]
    capsys.readouterr()

    assert await run("retry", "erp", first["id"], "--url", d.url) == 1
    err = capsys.readouterr().err
    command = err.splitlines()[-1].strip()
    assert command.startswith("eventrelay replay erp --since ") and command.endswith(f" --url {d.url}"), err
    assert await run(*shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out.startswith("re-queued 1 job(s) created from ")
    await wait_until(lambda: sorted(r.json["id"] for r in receiver.requests) == ["evt-1", "evt-1", "evt-2"])


@needs_admin_api
async def test_e2e_address_and_token_from_the_daemons_config(start_daemon, tmp_path, capsys,
                                                             quiet_daemon) -> None:
    port = free_port()
    await start_daemon([webhook("erp", "http://127.0.0.1:9/")],
                       listen={"http": f"0.0.0.0:{port}", "token": "t0ken"})
    config = str(tmp_path / "config.yaml")  # the file start_daemon wrote and the daemon runs on
    assert await run("status", "--config", config) == 0
    out = capsys.readouterr().out
    assert out.startswith("eventrelay ") and f"config {config}: as loaded at start" in out
    assert await run("status", "--config", config, "--token", "wrong") == 1
    assert "bearer token" in capsys.readouterr().err
    assert await run("jobs", "nope", "--config", config) == 1
    assert "nope" in capsys.readouterr().err


# -- finding the running daemon without being told, and `reload` --------------------------------------------

@pytest.fixture
def nothing_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No --config, no $EVENTRELAY_CONFIG, and a default config file that does not exist: what an operator's
    shell has in the README's Quick start. Returns the default's path."""
    monkeypatch.delenv("EVENTRELAY_CONFIG")
    default = tmp_path / "etc" / "config.yaml"
    monkeypatch.setattr(admin_client, "DEFAULT_CONFIG", str(default))
    return default


def rewrite(path: Path, change: Any) -> None:
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))


async def test_status_finds_a_daemon_on_any_port_and_shows_its_pid_and_config(start_daemon, tmp_path, capsys,
                                                                              nothing_named, quiet_daemon) -> None:
    # The config says port 0 (any free port) and no command is told where the config is.
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/")], listen={"token": "t0ken"})
    assert await run("status") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"eventrelay {eventrelay.__version__}, pid {os.getpid()}, up ")
    assert out[1] == f"config {(tmp_path / 'config.yaml').resolve()}: as loaded at start, not reloaded since"
    assert target_from(None, None, None) == Target(d.url, "t0ken")  # the token: from the file it runs on

    await d.shutdown()
    assert await run("status") == 2  # stopped cleanly: its record went with it, and the default file is absent
    err = capsys.readouterr().err
    assert f"cannot find the daemon from {nothing_named}" in err
    assert f"no running daemon recorded in {os.environ['EVENTRELAY_RUNTIME_DIR']}" in err


async def test_reload_applies_a_good_edit_and_refuses_a_broken_file(start_daemon, receiver: Receiver, tmp_path,
                                                                    capsys, nothing_named, quiet_daemon) -> None:
    d = await start_daemon([webhook("erp", receiver.url)], listen={"token": "t0ken"})
    config = tmp_path / "config.yaml"
    assert await run("reload") == 0
    assert capsys.readouterr().out == "configuration reloaded: no changes\n"

    rewrite(config, lambda raw: raw["integrations"].append(webhook("crm", receiver.url + "/crm")))
    assert await run("reload") == 0
    assert capsys.readouterr().out == "configuration reloaded, 1 change(s):\n  added crm\n"
    assert sorted(d.service.dispatchers) == ["crm", "erp"]

    # A typo the daemon refuses: every error is printed, and it keeps running what it had.
    config.write_text(config.read_text().replace("integration_type: webhook", "integration_type: webhok", 1))
    assert await run("reload") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("eventrelay: reload refused: the daemon still runs the previous configuration. Fix these, check "
                   f"with `eventrelay check-config --config {config.resolve()}`, reload again:\n"
                   "  integrations[0].integration_type: 'webhok' is not one of webhook, aws_sqs, stomp\n")
    assert sorted(d.service.dispatchers) == ["crm", "erp"] and not d.task.done()  # still running the old one
    assert await d.post({"id": "after-refusal", "type": "order.paid", "data": {}},
                        {"Authorization": "Bearer t0ken"}) == (
        202, {"data": [{"id": "after-refusal", "jobs": 2, "duplicate": False}]})

    # `status` still finds the daemon (and its token) after the failed reload, and says it failed.
    assert await run("status") == 0
    out = capsys.readouterr().out
    assert "reload just now FAILED" in out and "'webhok' is not one of" in out


async def test_reload_json_exit_code_follows_ok(start_daemon, tmp_path, capsys, nothing_named,
                                                quiet_daemon) -> None:
    await start_daemon([])
    args = parse("reload", "--json")
    assert await asyncio.to_thread(args.func, args) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    (tmp_path / "config.yaml").write_text("listen: [\n")
    assert await asyncio.to_thread(args.func, args) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False and "invalid YAML" in document["errors"][0]


async def test_reload_over_http_needs_the_token_and_coalesces_through_the_lock(start_daemon, tmp_path,
                                                                               quiet_daemon) -> None:
    d = await start_daemon([], listen={"token": "t0ken"})
    async with d.http.post(f"{d.url}/v1/reload") as resp:
        assert resp.status == 401
    auth = {"Authorization": "Bearer t0ken"}

    async def reload() -> dict[str, Any]:
        async with d.http.post(f"{d.url}/v1/reload", headers=auth) as resp:
            assert resp.status == 200
            return (await resp.json())["data"]

    answers = await asyncio.gather(*(reload() for _ in range(5)))  # one at a time behind the lock, each answered
    assert all(a["ok"] and a["errors"] == [] and a["changes"] == [] and a["at"].endswith("Z") for a in answers)
    (tmp_path / "config.yaml").write_text("listen: {http: nowhere}\n")
    refused = await reload()  # 200: the request worked; ok=false says the reload did not
    assert refused["ok"] is False and refused["errors"] and refused["changes"] == []


async def test_a_token_the_broken_file_no_longer_gives_is_named_in_the_401_hint(start_daemon, tmp_path, capsys,
                                                                               nothing_named, quiet_daemon) -> None:
    await start_daemon([], listen={"token": "t0ken"})
    (tmp_path / "config.yaml").write_text("listen: {http: '127.0.0.1:0', token: t0ken\n")  # unclosed mapping
    assert await run("status") == 1
    err = capsys.readouterr().err
    assert "missing or wrong bearer token" in err
    assert f"the admin token could not be read from {(tmp_path / 'config.yaml').resolve()}" in err
    assert await run("status", "--token", "t0ken") == 0


async def test_the_fake_reload_answer_is_printed_in_words(fake, capsys) -> None:
    async def reload(request: web.Request) -> web.Response:
        return web.json_response({"data": {"ok": True, "errors": [], "at": iso(NOW),
                                           "changes": ["added crm", "changed erp-orders", "log settings"]}})

    # The fake has no /v1/reload, like a daemon older than the command: an error answer, exit 1.
    assert await run("reload", "--url", fake.url) == 1
    assert "404" in capsys.readouterr().err
    app = web.Application()
    app.router.add_post("/v1/reload", reload)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        assert await run("reload", "--url", f"127.0.0.1:{runner.addresses[0][1]}") == 0
    finally:
        await runner.cleanup()
    assert capsys.readouterr().out == ("configuration reloaded, 3 change(s):\n  added crm\n  changed erp-orders\n"
                                       "  log settings\n")


def test_check_config_and_run_default_to_the_environment_then_etc(tmp_path, monkeypatch, capsys,
                                                                   nothing_named) -> None:
    from eventrelay.cli import main as cli_main

    assert cli_main(["check-config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{nothing_named}: invalid configuration:\n  cannot read the file")
    assert "the default, as neither --config nor $EVENTRELAY_CONFIG is set; name another file with --config" in err

    good = write_listen(tmp_path, {"http": "127.0.0.1:8787"})
    monkeypatch.setenv("EVENTRELAY_CONFIG", str(good))
    assert cli_main(["check-config"]) == 0
    assert capsys.readouterr().out == f"{good}: OK, 0 integration(s), 0 enabled\n"

    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: {htp: x}\n")
    monkeypatch.setenv("EVENTRELAY_CONFIG", str(broken))
    assert cli_main(["run"]) == 78  # refused before anything starts
    err = capsys.readouterr().err
    assert err.startswith(f"{broken}: invalid configuration, not starting:\n  listen.htp: unknown key")
    assert f"(read {broken}: named by $EVENTRELAY_CONFIG" in err
    assert cli_main(["check-config", "--config", str(good)]) == 0  # --config wins over the environment


# -- the README's Quick start, as an operator types it ----------------------------------------------------------

EVENTRELAY = Path(sys.executable).with_name("eventrelay")  # the command `make` installs into .venv/bin


@pytest.mark.skipif(not EVENTRELAY.exists(), reason="the eventrelay command is not installed next to this Python")
def test_quick_start_commands_work_as_written(tmp_path) -> None:
    """`make run` in one terminal; `.venv/bin/eventrelay receive`, `status`, `jobs erp-orders` and `reload` in
    others, from the same directory and with no --config or --url. Only the example's two ports are changed,
    to free ones, so that this test runs beside anything else on the host."""
    clone = tmp_path / "clone"
    (clone / "var").mkdir(parents=True)  # what `make run` does first
    api_port, hook_port = free_port(), free_port()
    example = (REPO / "config.example.yaml").read_text()
    assert example.count("127.0.0.1:8787") == 1 and example.count("127.0.0.1:9000") == 1
    config = clone / "config.example.yaml"
    config.write_text(example.replace("127.0.0.1:8787", f"127.0.0.1:{api_port}")
                      .replace("127.0.0.1:9000", f"127.0.0.1:{hook_port}"))
    env = {k: v for k, v in os.environ.items() if k not in ("EVENTRELAY_CONFIG", "EVENTRELAY_TOKEN")}
    assert env["EVENTRELAY_RUNTIME_DIR"]  # from conftest: this test's own, away from the host's /run/eventrelay

    def command(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(EVENTRELAY), *argv], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=60)

    with open(tmp_path / "daemon.log", "wb") as daemon_log, open(tmp_path / "receiver.log", "wb") as receiver_log:
        daemon_proc = subprocess.Popen([str(EVENTRELAY), "run", "--config", "config.example.yaml"], cwd=clone,
                                       env=env, stdout=daemon_log, stderr=subprocess.STDOUT)
        receiver_proc = subprocess.Popen([str(EVENTRELAY), "receive", "--port", str(hook_port)], cwd=clone,
                                         env=env, stdout=receiver_log, stderr=subprocess.STDOUT)
        try:
            wait_ready(api_port, daemon_proc, tmp_path / "daemon.log", timeout=20)

            status = command("status")
            assert status.returncode == 0, status.stderr
            lines = status.stdout.splitlines()
            assert lines[0].startswith(f"eventrelay {eventrelay.__version__}, pid {daemon_proc.pid}, up ")
            assert lines[1] == f"config {config.resolve()}: as loaded at start, not reloaded since"
            assert lines[4].split()[:3] == ["erp-orders", "webhook", "yes"]

            sent = command("send", "order.paid", "--id", "evt-1001", "--data", '{"type": "order", "id": "o-1001"}')
            assert (sent.returncode, sent.stdout) == (0, "event evt-1001 accepted: 1 job(s) queued\n"), sent.stderr
            _wait_for(lambda: b"order.paid id=evt-1001 attempt=1 integration=erp-orders" in
                      (tmp_path / "receiver.log").read_bytes(), "the receiver printing the delivery")

            jobs = command("jobs", "erp-orders")
            assert jobs.returncode == 0, jobs.stderr
            assert "evt-1001" in jobs.stdout and jobs.stdout.endswith("jobs of erp-orders 1-1 of 1, newest first\n")

            reload = command("reload")
            assert (reload.returncode, reload.stdout) == (0, "configuration reloaded: no changes\n"), reload.stderr
            config.write_text(config.read_text().replace("      timeout: 10s", "      timeout: 5s"))
            reload = command("reload")
            assert (reload.returncode, reload.stdout) == (0, "configuration reloaded, 1 change(s):\n"
                                                             "  changed erp-orders\n"), reload.stderr

            config.write_text(config.read_text().replace("integration_type: webhook", "integration_type: webhok"))
            reload = command("reload")
            assert reload.returncode == 1 and reload.stdout == ""
            assert "reload refused: the daemon still runs the previous configuration" in reload.stderr
            assert "integrations[0].integration_type: 'webhok' is not one of" in reload.stderr
            assert daemon_proc.poll() is None
            status = command("status")
            assert status.returncode == 0, status.stderr
            assert f"pid {daemon_proc.pid}" in status.stdout and "FAILED" in status.stdout
            check = command("check-config", "--config", "config.example.yaml")
            assert check.returncode == 1 and "'webhok' is not one of" in check.stderr
        finally:
            for proc in (daemon_proc, receiver_proc):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            assert daemon_proc.wait(30) == 0, (tmp_path / "daemon.log").read_text()
            receiver_proc.wait(30)
    assert list(Path(env["EVENTRELAY_RUNTIME_DIR"]).iterdir()) == []  # a clean stop takes its record away


def _wait_for(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@needs_admin_api
async def test_e2e_close_circuit_and_a_retry_held_by_a_410(start_daemon, receiver: Receiver, capsys,
                                                          quiet_daemon) -> None:
    from aiohttp import web as aioweb

    receiver.respond = lambda r: aioweb.Response(status=503)
    d = await start_daemon([webhook("erp", receiver.url, delivery={
        "retry": {"initial": "1h", "max_interval": "1h", "max_age": "1h"},
        "breaker": {"failures": 2, "cooldown": "5m", "max_cooldown": "5m"}})])
    for i in range(3):
        assert await run("send", "order.paid", "--id", f"c{i}", "--url", d.url) == 0
    await wait_until(lambda: d.service.dispatchers["erp"].gate.breaker.state == "open")
    # While it is open, status says so and the job of a new event, due but not sent, says what holds it.
    assert await run("send", "order.paid", "--id", "held", "--url", d.url) == 0
    capsys.readouterr()
    assert await run("status", "--url", d.url) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("erp ")]
    assert "  circuit open, probe in 4m " in row  # the cool-down is 5m
    assert await run("jobs", "erp", "--url", d.url) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if " held  " in line]  # the event id
    assert "  held (circuit open, probe in 4m " in row
    receiver.respond = None
    assert await run("close-circuit", "erp", "--url", d.url) == 0
    assert capsys.readouterr().out == (
        "the circuit of erp is closed (it was open): deliveries resume now; if the target still fails, it opens "
        "again after `breaker.failures` failures in a row (5 by default)\n")
    assert await run("close-circuit", "erp", "--url", d.url) == 0
    assert capsys.readouterr().out == "the circuit of erp was not open: nothing to do\n"

    # A 410 disables the integration: a retry then says what holds it, and how to lift it.
    receiver.respond = lambda r: aioweb.Response(status=410)
    assert await run("send", "order.paid", "--id", "gone", "--url", d.url) == 0
    await wait_until(lambda: d.service.dispatchers["erp"].gate.disabled is not None)
    gone = next(j for j in await cli_json("jobs", "erp", "--state", "pending", "--url", d.url)
                if j["event_id"] == "gone")
    capsys.readouterr()
    assert await run("retry", "erp", gone["id"], "--url", d.url) == 0
    assert "held: the integration is disabled: the target answered 410 Gone" in capsys.readouterr().out


@needs_admin_api
async def test_e2e_pause_and_resume(start_daemon, receiver: Receiver, capsys, quiet_daemon) -> None:
    d = await start_daemon([webhook("erp", receiver.url)])
    assert await run("pause", "erp", "--url", d.url) == 0
    assert capsys.readouterr().out.startswith("erp paused: its jobs wait, nothing is sent")
    assert await run("send", "order.paid", "--id", "waits", "--url", d.url) == 0
    await asyncio.sleep(0.3)
    assert receiver.requests == []
    capsys.readouterr()
    assert await run("status", "--url", d.url) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("erp ")]
    assert "  paused by an operator " in row
    assert await run("jobs", "erp", "--url", d.url) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if " waits  " in line]
    assert "  held (paused by an operator" in row
    assert await run("pause", "erp", "--url", d.url) == 0
    assert capsys.readouterr().out == "erp was paused already\n"
    assert await run("resume", "erp", "--url", d.url) == 0
    assert capsys.readouterr().out == "erp resumed: its pending jobs are being delivered\n"
    await wait_until(lambda: receiver.ids() == ["waits"])
    assert await run("resume", "erp", "--url", d.url) == 0
    assert capsys.readouterr().out == "erp was not paused: nothing to do\n"


@needs_admin_api
async def test_e2e_send_to_one_integration(start_daemon, receiver: Receiver, capsys, quiet_daemon) -> None:
    d = await start_daemon([webhook("erp", receiver.url, ["order.paid"])])
    assert await run("send", "customer.updated", "--data", '{"id": "c-1"}', "--to", "erp", "--url", d.url) == 0
    assert capsys.readouterr().out.endswith("accepted: 1 job(s) queued\n")
    await wait_until(lambda: [r.json["triggered_by"] for r in receiver.requests] == ["customer.updated"])
    assert await run("send", "order.paid", "--to", "nope", "--url", d.url) == 1  # unknown: the API's 404


@needs_admin_api
async def test_e2e_event_shows_where_an_event_went(start_daemon, receiver: Receiver, capsys, quiet_daemon) -> None:
    from aiohttp import web as aioweb

    answers = iter([aioweb.Response(status=503, text="down for maintenance")])
    receiver.respond = lambda r: next(answers, aioweb.Response(status=204))
    d = await start_daemon([webhook("erp", receiver.url, delivery={
        "retry": {"initial": "50ms", "max_interval": "50ms", "max_age": "1h"}})])
    assert await run("send", "order.paid", "--id", "o/1 x", "--data", '{"id": "1"}', "--url", d.url) == 0
    await wait_for(d.states, {"delivered": 1})
    capsys.readouterr()
    assert await run("event", "o/1 x", "--url", d.url) == 0
    out = capsys.readouterr().out
    assert out.startswith("event o/1 x (order.paid), accepted ")
    assert '"id": "1"' in out and "erp: job 1, delivered after 2 attempt(s)" in out
    (failed,) = [line for line in out.splitlines() if " failed " in line]
    assert " 503 " in failed and "outside of 2xx range (503)" in failed
    assert "  attempt 1 answered: down for maintenance" in out.splitlines()
    assert await run("event", "never", "--url", d.url) == 1  # the API's 404, printed
    assert "no event 'never' is stored" in capsys.readouterr().err
