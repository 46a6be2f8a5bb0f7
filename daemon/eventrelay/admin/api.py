"""The admin API: status, integrations, Elastic-Path-style jobs and logs, retry, replay, /metrics, and
/openapi.json, the listener's OpenAPI description (openapi.yaml beside this file; tests/test_openapi.py keeps it
true).

Served on the ingest listener, behind the same token. Pages follow the seed system's API:
`page[limit]` (at most 100) and `page[offset]`, with `meta.page`, `meta.results` and `links`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from importlib.resources import files
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import yaml
import structlog
from aiohttp import web

from .. import __version__, codec
from ..access import CALLER, OPEN, Access, Caller
from ..catalogue import ELASTIC_PATH
from ..clock import iso_time, parse_time
from ..events import EventError, parse_event
from ..ingest.errors import error_response
from ..jobs import JobState
from ..metrics import CONTENT_TYPE
from ..store import AttemptView, AuditEntry, JobSearch, JobView, OutcomeCounts, Store, StoreError
from ..text import one_line
from .view import IntegrationState, ServiceView

log = structlog.get_logger(component="admin")
Handler = Callable[[web.Request], Awaitable[web.Response]]

MAX_PAGE = 100
COUNT_CAP = 100_000  # status counts each integration's pending and dead jobs up to this many
DEFAULT_PAGE = 25

TEST_EVENT_TYPE = "eventrelay.test"  # the type of a test event sent to one integration
_CHART_HOURS_MAX = 48
_EVENT_JOBS_MAX = 1000  # an event's jobs shown at most: one per integration observing it
_EVENT_ATTEMPTS_MAX = 200  # a job's latest attempts shown at most
_TAIL_FIRST = 20  # attempts a new live tail starts with
_TAIL_BATCH = 200  # attempts read at a time by a live tail
_TAIL_POLL = 0.5  # seconds between a live tail's reads of the store
_TAIL_KEEPALIVE = 15.0
_TAIL_LOOKBACK = 500  # attempt ids a live tail on a shared store looks back for late commits
_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")  # unix seconds written out
_MAX_INTEGER = 2**63 - 1  # ids, offsets and limits past this are refused: the databases' integers stop there


def _counts(counts: OutcomeCounts) -> dict[str, int]:
    return {"delivered": counts.delivered, "failed": counts.failed, "dead": counts.dead}


class AdminApi:
    """The admin routes: they read the store and the service's view, and ask the view for operators' actions."""

    def __init__(self, view: ServiceView, store: Store, access: Access | None = None):
        self._view = view
        self._store = store
        self._access = access  # asked again during a live tail: a session may end, a token be removed
        self._closed = asyncio.Event()  # the listener is closing: live tails end, so shutdown does not wait
        self._openapi: bytes | None = None  # GET /openapi.json's answer, made at the first request

    async def _closing(self, app: web.Application) -> None:
        self._closed.set()

    def add_routes(self, app: web.Application) -> None:
        app.on_shutdown.append(self._closing)
        r = app.router
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/integrations", self.integrations)
        r.add_get("/v1/integrations/{name}", self.integration)
        r.add_get("/v1/integrations/{name}/jobs", self.jobs)
        r.add_get("/v1/integrations/{name}/logs", self.integration_logs)
        r.add_get("/v1/integrations/{name}/jobs/{job}/logs", self.job_logs)
        audited = self._audited
        r.add_post("/v1/integrations/{name}/jobs/{job}/retry", audited("retry", self.retry))
        r.add_post("/v1/integrations/{name}/replay", audited("replay", self.replay))
        r.add_post("/v1/integrations/{name}/enable", audited("enable", self.enable))
        r.add_post("/v1/integrations/{name}/test", audited("test", self.test_event))
        r.add_get("/v1/integrations/{name}/chart", self.chart)
        r.add_post("/v1/integrations/{name}/pause", audited("pause", self.pause))
        r.add_post("/v1/integrations/{name}/resume", audited("resume", self.resume))
        r.add_post("/v1/integrations/{name}/close-circuit", audited("close-circuit", self.close_circuit))
        r.add_get("/v1/audit", self.audit_log)
        r.add_get("/v1/events/{id}", self.event)
        r.add_get("/v1/jobs", self.search)
        r.add_get("/v1/event-types", self.event_types)
        r.add_get("/v1/tail", self.tail)
        r.add_get("/v1/attempts", self.attempt_log)
        r.add_get("/v1/logs", self.all_logs)
        r.add_get("/v1/jobs/orphaned", self.orphaned)
        r.add_post("/v1/reload", audited("reload", self.reload))
        r.add_get("/metrics", self.metrics)
        r.add_get("/openapi.json", self.openapi)  # ingest/http.py serves it without the token

    # -- the audit log ---------------------------------------------------------------------------------------

    def _audited(self, action: str, handler: Handler) -> Handler:
        """`handler`, its successful calls kept in the audit log: who (the token's scope and fingerprint, the
        address), what, on which integration or job, and what it came to."""
        async def handle(request: web.Request) -> web.Response:
            response = await handler(request)
            if response.status < 400:
                caller = request.get(CALLER) or Caller(OPEN, None)
                name, job = request.match_info.get("name", ""), request.match_info.get("job")
                entry = AuditEntry(at=time.time(), action=action, target=f"{name}/job {job}" if job else name,
                                   scope=f"{caller.scope} (console)" if caller.session else caller.scope,
                                   fingerprint=caller.fingerprint, address=request.remote,
                                   detail=_audit_detail(await request.read(), response))
                try:
                    await self._store.audit(entry)
                except StoreError as e:  # the action took place: say so, and that it went unrecorded
                    log.error("an operator's action could not be written to the audit log", action=action,
                              target=entry.target, error=str(e))
            return response
        return handle

    async def audit_log(self, request: web.Request) -> web.Response:
        """Operators' actions, newest first, a page at a time (`before`, `limit`)."""
        try:
            limit, before = _cursor_page(request)
        except ValueError as e:
            return error_response(400, str(e))
        entries = await self._store.audit_log(before, limit)
        following = entries[-1].id if len(entries) == limit else None
        return _json({"data": [{"id": str(e.id), "at": iso_time(e.at), "action": e.action, "target": e.target,
                                "scope": e.scope, "token": e.fingerprint, "address": e.address, "detail": e.detail}
                               for e in entries],
                      "meta": {"next": following}, "links": {"next": _next_link(request, following)}})

    # -- status and integrations ---------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        view = self._view
        counts = await self._store.backlog([i.name for i in view.config.integrations], COUNT_CAP)
        last_hour = await self._store.outcomes_since(time.time() - 3600)
        rows = []
        for integration in view.config.integrations:
            name = integration.name
            last = await self._store.last_attempts(name)
            state = view.integration_state(name)
            hour = last_hour.get(name, OutcomeCounts())
            rows.append({
                "name": name, "integration_type": integration.integration_type, "enabled": integration.enabled,
                "pending": min(pending := counts.get((name, JobState.PENDING), 0), COUNT_CAP),
                "dead": min(dead := counts.get((name, JobState.DEAD), 0), COUNT_CAP),
                # More than COUNT_CAP of either: the figure is that cap (counting further would scan the backlog).
                "counts_capped": pending > COUNT_CAP or dead > COUNT_CAP,
                "in_flight": state.in_flight if state else 0,
                "delivered_last_hour": hour.delivered,
                "failed_last_hour": hour.failed + hour.dead,
                # Of the attempts of the last hour, the share that delivered; None without any.
                "success_rate_last_hour": (round(hour.delivered / (hour.delivered + hour.failed + hour.dead), 4)
                                           if hour.delivered + hour.failed + hour.dead else None),
                "last_success_at": iso_time(last.success_at) if last.success_at is not None else None,
                # The last failure stays shown after a success: what went wrong is what an operator looks for.
                "last_failure_at": iso_time(last.failure_at) if last.failure_at is not None else None,
                "last_error": last.failure_error,
                "latency_last_hour": _latency(await self._store.durations(name, time.time() - 3600)),
                **_held(state),
            })
        reload = view.last_reload
        mine = view.config.fingerprint()
        daemons = [{"id": d.id, "host": d.host, "pid": d.pid, "version": d.version, "config_hash": d.config_hash,
                    "config_differs": d.config_hash != mine, "this": d.id == self._store.id,
                    "started_at": iso_time(d.started_at), "last_seen": iso_time(d.last_seen)}
                   for d in await self._store.daemons()]
        return _json({"data": {
            "version": __version__, "started_at": iso_time(view.started_at),
            "uptime_s": round(time.time() - view.started_at, 3),
            "config": {"path": str(view.config.source.resolve()) if view.config.source else None,
                       "last_reload": None if reload is None else {
                           "at": iso_time(reload.at), "ok": reload.ok, "errors": list(reload.errors)}},
            "integrations": rows,
            "daemons": daemons,
            # How many tokens of each scope, never the tokens; and whether the listener speaks TLS.
            "access": {"ingest_tokens": len(view.config.auth.ingest_tokens),
                       "admin_tokens": len(view.config.admin_tokens), "tls": view.config.listen.tls is not None},
        }})

    async def integrations(self, request: web.Request) -> web.Response:
        return _json({"data": [i.public() for i in self._view.config.integrations]})

    async def integration(self, request: web.Request) -> web.Response:
        integration = self._view.config.integration(request.match_info["name"])
        if integration is None:
            return _unknown(request.match_info["name"])
        return _json({"data": integration.public()})

    # -- jobs and logs -------------------------------------------------------------------------------------

    async def jobs(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        state = request.query.get("state") or request.query.get("filter[state]")
        if state is not None and state not in {s.value for s in JobState}:
            return error_response(400, f"state must be pending, delivered or dead, not {state!r}")
        page = _page(request)
        if isinstance(page, web.Response):
            return page
        rows, total = await self._store.jobs(name, JobState(state) if state else None, *page)
        if total == 0 and not self._known(name):
            return _unknown(name)
        return _json(_paged(request, [_job(r) for r in rows], total, *page))

    async def orphaned(self, request: web.Request) -> web.Response:
        """Integrations that are no longer configured but still have jobs: they resume if the name returns."""
        counts = await self._store.job_counts()
        names = sorted({name for name, _ in counts if not self._known(name)})
        return _json({"data": [{"integration": n, "pending": counts.get((n, JobState.PENDING), 0),
                                "dead": counts.get((n, JobState.DEAD), 0)} for n in names]})

    async def integration_logs(self, request: web.Request) -> web.Response:
        return await self._logs(request, request.match_info["name"], None)

    async def job_logs(self, request: web.Request) -> web.Response:
        job_id = _int(request.match_info["job"])
        if job_id is None:
            return error_response(404, f"no job {request.match_info['job']!r}")
        return await self._logs(request, request.match_info["name"], job_id)

    async def all_logs(self, request: web.Request) -> web.Response:
        return await self._logs(request, None, None)

    async def _logs(self, request: web.Request, name: str | None, job_id: int | None) -> web.Response:
        page = _page(request)
        if isinstance(page, web.Response):
            return page
        rows, total = await self._store.logs(name, job_id, *page)
        if total == 0 and name is not None and not self._known(name):
            return _unknown(name)
        return _json(_paged(request, [_log(r) for r in rows], total, *page))

    async def event(self, request: web.Request) -> web.Response:
        """One event by its id: its payload, and per integration its job with every attempt, oldest first."""
        event_id = request.match_info["id"]
        event = await self._store.event(event_id)
        if event is None:
            return error_response(404, f"no event {event_id!r} is stored (never accepted, or pruned by retention)")
        jobs, _ = await self._store.jobs(event_id=event_id, limit=_EVENT_JOBS_MAX)
        shown = []
        for job in sorted(jobs, key=lambda j: j.integration):
            attempts = await self._store.attempts(job.id)
            shown.append({**(_job(job) or {}), "log": [_log(a) for a in attempts[-_EVENT_ATTEMPTS_MAX:]]})
        return _json({"data": {"id": event.id, "type": event.type, "accepted_at": iso_time(event.accepted_at),
                               "payload": codec.loads(event.payload.encode()), "jobs": shown}})

    async def event_types(self, request: web.Request) -> web.Response:
        """The event catalogue (Elastic Path's types, eventrelay's own and the config's `event_types`), each with
        the integrations that observe it, enabled or not; alphabetical."""
        config = self._view.config
        catalogue = config.catalogue
        return _json({"data": [
            {"type": key, "source": _source(key),
             "observed_by": [i.name for i in config.integrations if i.matcher.matches(key)]}
            for key in sorted(catalogue.keys)]})

    async def search(self, request: web.Request) -> web.Response:
        """Jobs of every integration, newest first, filtered by `integration`, `state`, `type` and a time range
        (`since`, `until`), a page at a time: `links.next` goes on (a cursor, `before`), null at the end."""
        q = request.query
        try:
            state = q.get("state") or None
            if state is not None and state not in {s.value for s in JobState}:
                raise ValueError(f"state must be pending, delivered or dead, not {state!r}")
            limit, before = _cursor_page(request)
            query = JobSearch(integration=q.get("integration") or None, state=JobState(state) if state else None,
                              event_type=q.get("type") or None, since=_time(q.get("since") or None, "since"),
                              until=_time(q.get("until") or None, "until"), before=before)
        except ValueError as e:
            return error_response(400, str(e))
        page = await self._store.search(query, limit)
        return _json({"data": [_job(j) for j in page.jobs], "meta": {"next": page.next},
                      "links": {"next": _next_link(request, page.next)}})

    async def attempt_log(self, request: web.Request) -> web.Response:
        """The attempt log newest first, of one `integration` or all, with each attempt's event, a page at a
        time: `links.next` goes on (a cursor, `before`), null at the end."""
        try:
            limit, before = _cursor_page(request)
        except ValueError as e:
            return error_response(400, str(e))
        lines = await self._store.attempts_before(request.query.get("integration") or None, before, limit)
        following = lines[-1].id if len(lines) == limit else None
        return _json({"data": [_tail_line(a) for a in lines], "meta": {"next": following},
                      "links": {"next": _next_link(request, following)}})

    async def tail(self, request: web.Request) -> web.StreamResponse:
        """The attempt log as it grows, as Server-Sent Events (`event: attempt`, the id is the attempt's): the
        latest few first, or those after `Last-Event-ID` (or `?after=`) when a browser reconnects. Read from the
        store, so it shows every daemon's deliveries; a comment line every 15 s keeps proxies from closing it."""
        after_text = request.headers.get("Last-Event-ID") or request.query.get("after")
        if after_text is not None and not _whole(after_text):
            return error_response(400, "after (or Last-Event-ID) must be an attempt id")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        if after_text is not None:
            after = int(after_text)
        else:
            latest = await self._store.attempts_before(None, None, _TAIL_FIRST)  # newest first
            after = latest[0].id if latest else 0
            await response.write(_sse(latest[::-1]))
        quiet_since = time.monotonic()
        started = after  # what came before this stream is the browser's already (or was never asked for)
        sent: dict[int, None] = {}  # the latest ids written, oldest first (a shared store's late commits)
        while not self._closed.is_set():
            if self._access is not None and self._access.denied(request) is not None:
                break  # logged out, expired, or its token removed by a reload: the stream ends
            lines = await self._store.attempts_after(after, _TAIL_BATCH)
            if self._store.shared and after:
                # Daemons sharing a database take ids before they commit: an attempt with an id below the last
                # one shown may appear a moment later. Look back a little for those.
                window = await self._store.attempts_after(max(0, after - _TAIL_LOOKBACK), _TAIL_LOOKBACK)
                lines = [a for a in window if started < a.id <= after and a.id not in sent] + lines
            if lines:
                after = max(after, lines[-1].id)
                await response.write(_sse(lines))
                sent.update(dict.fromkeys(a.id for a in lines))
                while len(sent) > 4 * _TAIL_LOOKBACK:
                    del sent[next(iter(sent))]
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > _TAIL_KEEPALIVE:
                await response.write(b": still here\n\n")
                quiet_since = time.monotonic()
            if len(lines) < _TAIL_BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), _TAIL_POLL)
        return response

    def _known(self, name: str) -> bool:
        return self._view.config.integration(name) is not None

    # -- retry and replay ----------------------------------------------------------------------------------

    async def retry(self, request: web.Request) -> web.Response:
        name, job_id = request.match_info["name"], _int(request.match_info["job"])
        previous = await self._view.retry(name, job_id) if job_id is not None else None
        if previous is None:
            return error_response(404, f"integration {name!r} has no job {request.match_info['job']!r}")
        job = await self._store.job(name, job_id)
        if previous == JobState.DELIVERED:
            return error_response(409, "the job was delivered; to send it again, replay its time range",
                                  meta={"replay": _replay_window(job)})
        return _json({"data": _job(job), "meta": self._sending(name)})

    def _sending(self, name: str) -> dict[str, Any]:
        """When what an operator re-queued really goes: now, or held (and why)."""
        held_by = self._view.held_by(name)
        return {"sends_at": None if held_by else iso_time(time.time()), "held_by": held_by}

    async def replay(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not self._known(name):
            return _unknown(name)
        try:
            body = codec.loads(await request.read() or b"{}")
            if not isinstance(body, dict) or set(body) - {"state", "since", "until", "limit", "not_requeued_since"}:
                raise ValueError('send {"state": "dead"} or {"since": …, "until": …} (or both), and "limit" if need be')
            limit = body.get("limit", 1_000_000)
            if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= _MAX_INTEGER:
                raise ValueError("limit must be a positive whole number")
            fence = _time(body.get("not_requeued_since"), "not_requeued_since")
            dead = body.get("state") == "dead"
            if not dead and ("state" in body or ("since" not in body and "until" not in body)):
                raise ValueError('send {"state": "dead"} or {"since": …, "until": …} (or both)')
            since, until = _time(body.get("since"), "since"), _time(body.get("until"), "until")
            queued = await self._view.replay(name, dead=dead, since=since, until=until, not_requeued_since=fence,
                                             limit=limit)
        except ValueError as e:
            return error_response(400, str(e))
        return _json({"data": {"queued": queued}, "meta": self._sending(name)})

    async def close_circuit(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not self._known(name):
            return _unknown(name)
        was = self._view.close_circuit(name)
        if was is None:
            return error_response(409, f"{self._view.held_by(name)}: it has no circuit to close")
        return _json({"data": {"name": name, "circuit": "closed", "was": was}})

    async def enable(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not self._known(name):
            return _unknown(name)
        was_disabled = await self._view.enable(name)
        return _json({"data": {"name": name, "enabled": True, "was_disabled": was_disabled}})

    async def chart(self, request: web.Request) -> web.Response:
        """Attempts per minute over the last `hours` (default 6, at most 48), oldest first, every minute listed:
        the data of a chart of deliveries and failures."""
        name = request.match_info["name"]
        if not self._known(name):
            return _unknown(name)
        text = request.query.get("hours", "6")
        if not _whole(text) or not 1 <= int(text) <= _CHART_HOURS_MAX:
            return error_response(400, f"hours must be a whole number from 1 to {_CHART_HOURS_MAX}")
        first = (int(time.time()) // 60 - int(text) * 60 + 1) * 60
        counted = dict(await self._store.outcomes_by_minute(name, first))
        minutes = range(first, first + int(text) * 3600, 60)
        return _json({"data": [{"minute": iso_time(m), **_counts(counted.get(m, OutcomeCounts()))} for m in minutes]})

    async def test_event(self, request: web.Request) -> web.Response:
        """An event for this integration alone, whatever it observes, to check the way to its target; it goes
        now, as an operator's action. The body is an event (type, data, included, id), all optional."""
        name = request.match_info["name"]
        if not self._known(name):
            return _unknown(name)
        try:
            body = codec.loads(await request.read() or b"{}")
            if not isinstance(body, dict):
                raise EventError("must be a JSON object (an event: type, data, included, id), or nothing")
            event = parse_event({"type": TEST_EVENT_TYPE, "data": {"message": f"a test event for {name}"}, **body})
        except (ValueError, EventError) as e:
            return error_response(400, str(e))
        accepted = await self._view.send_test(name, event)
        return _json({"data": {"id": accepted.id, "jobs": accepted.jobs, "duplicate": accepted.duplicate},
                      "meta": self._sending(name)}, status=202)

    async def pause(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not self._known(name):
            return _unknown(name)
        changed = await self._view.pause(name)
        return _json({"data": {"name": name, "paused": True, "was_paused": not changed}})

    async def resume(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not self._known(name):
            return _unknown(name)
        changed = await self._view.resume(name)
        return _json({"data": {"name": name, "paused": False, "was_paused": changed}})

    async def reload(self, request: web.Request) -> web.Response:
        """Read the config file again now, as SIGHUP does, and answer how it went: 200 even when the file was
        refused (the request worked; `ok` says the reload did not). Concurrent requests queue on the service's
        reload lock, as SIGHUPs do."""
        result = await self._view.reload()
        return _json({"data": {"ok": result.ok, "errors": list(result.errors), "changes": list(result.changes),
                               "at": iso_time(result.at)}})

    async def metrics(self, request: web.Request) -> web.Response:
        await self._view.refresh_gauges()
        return web.Response(body=self._view.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI description of the listener, as JSON. Parsed off the event loop, once."""
        if self._openapi is None:
            self._openapi = await asyncio.to_thread(lambda: codec.dumps(openapi_document()).encode())
        return web.Response(body=self._openapi, content_type="application/json")


def openapi_document() -> dict[str, Any]:
    """openapi.yaml (beside this file, part of the package), its `info.version` the daemon's."""
    text = (files(__package__) / "openapi.yaml").read_text("utf-8")
    document: dict[str, Any] = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    document["info"]["version"] = __version__
    return document


def _held(state: IntegrationState | None) -> dict[str, Any]:
    """What may hold a running integration's deliveries back, as its status row shows it (all None when it is
    not running)."""
    if state is None:
        return {"circuit": None, "circuit_open_until": None, "paused_until": None, "paused": None, "disabled": None}
    disabled = state.disabled
    return {"circuit": state.circuit, "circuit_open_until": _iso_or_none(state.circuit_open_until),
            "paused_until": _iso_or_none(state.paused_until),
            "paused": {"at": iso_time(state.paused_at)} if state.paused_at is not None else None,
            "disabled": {"at": iso_time(disabled[0]), "reason": disabled[1]} if disabled else None}


def _audit_detail(body: bytes, response: web.Response) -> str | None:
    """What was asked (the request's body) and what came of it (the answer's data), in one short line."""
    asked = body.decode("utf-8", "replace").strip() if body else ""
    answered = ""
    if isinstance(response.body, bytes | bytearray):
        try:
            answered = codec.dumps(codec.loads(bytes(response.body)).get("data"))
        except (ValueError, AttributeError):
            answered = ""
    text = " → ".join(part for part in (one_line(asked, 300), one_line(answered, 300)) if part)
    return text or None


def _source(event_type: str) -> str:
    if event_type.startswith("eventrelay."):
        return "eventrelay"
    return "elastic-path" if event_type in ELASTIC_PATH else "config"


def _cursor_page(request: web.Request) -> tuple[int, int | None]:
    """A cursor page's `limit` (1 to MAX_PAGE) and `before` (a previous page's `next`, or None); ValueError
    says which is wrong."""
    limit, before = request.query.get("limit", str(DEFAULT_PAGE)), request.query.get("before")
    if not _whole(limit) or not 1 <= int(limit) <= MAX_PAGE:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_PAGE}")
    if before is not None and not _whole(before):
        raise ValueError("before must be the `next` cursor of a previous page")
    return int(limit), int(before) if before is not None else None


def _next_link(request: web.Request, cursor: int | None) -> str | None:
    """The link to the page after this one (its `before` cursor, the other parameters kept); None at the end."""
    if cursor is None:
        return None
    kept = {k: v for k, v in request.query.items() if k != "before"}
    return f"{request.path}?{urlencode({**kept, 'before': cursor})}"


def _latency(durations: list[float]) -> dict[str, Any] | None:
    """p50 and p99 of a sample of attempts' durations (seconds), and its size; None without any."""
    if not durations:
        return None
    ordered = sorted(durations)

    def rank(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 6)

    return {"p50": rank(0.5), "p99": rank(0.99), "sample": len(ordered)}


def _sse(attempts: list[AttemptView]) -> bytes:
    return b"".join(b"id: %d\nevent: attempt\ndata: %s\n\n" % (a.id, codec.dumps(_tail_line(a)).encode())
                    for a in attempts)


def _tail_line(a: AttemptView) -> dict[str, Any]:
    return {"id": str(a.id), "at": iso_time(a.created_at), "integration": a.integration, "job": str(a.job_id),
            "event_id": a.event_id, "event_type": a.event_type, "attempt": a.attempt, "succeeded": a.succeeded,
            "status_code": a.status_code, "processing_time": round(a.duration, 6), "error_detail": a.error_detail}


def _replay_window(job: JobView | None) -> dict[str, str] | None:
    """The narrowest `replay` range sure to hold the job: a millisecond either side of its creation, as times
    are shown to the millisecond. Other jobs created in those 2 ms (those of the same request) come along."""
    if job is None:
        return None
    return {"since": iso_time(job.created_at - 0.001), "until": iso_time(job.created_at + 0.001)}


def _iso_or_none(at: float | None) -> str | None:
    return None if at is None else iso_time(at)


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(text=codec.dumps(payload), status=status, content_type="application/json")


def _unknown(name: str) -> web.Response:
    return error_response(404, f"no integration named {name!r} in the configuration")


def _int(text: str) -> int | None:
    return int(text) if _whole(text) else None


def _whole(text: str) -> bool:
    """ASCII digits (str.isdigit alone takes '²', which int() refuses) of a number a database integer holds."""
    return text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= _MAX_INTEGER


def _time(value: Any, field: str) -> float | None:
    """Unix seconds or ISO 8601 with a zone (a trailing Z allowed); None when absent."""
    if value is None:
        return None
    if isinstance(value, str) and _SECONDS.fullmatch(value):
        value = float(value)  # unix seconds, as a query string carries them
    try:
        return parse_time(value)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


def _page(request: web.Request) -> tuple[int, int] | web.Response:
    limit, offset = request.query.get("page[limit]", str(DEFAULT_PAGE)), request.query.get("page[offset]", "0")
    if not _whole(limit) or not 1 <= int(limit) <= MAX_PAGE:
        return error_response(400, f"page[limit] must be a whole number from 1 to {MAX_PAGE}")
    if not _whole(offset):
        return error_response(400, "page[offset] must be a whole number, 0 or more")
    return int(limit), int(offset)


def _paged(request: web.Request, data: list[Any], total: int, limit: int, offset: int) -> dict[str, Any]:
    def link(at: int) -> str:
        query = {k: v for k, v in request.query.items() if not k.startswith("page[")}
        return f"{request.path}?{urlencode({**query, 'page[limit]': limit, 'page[offset]': at})}"

    last = max(0, (total - 1) // limit * limit)
    return {"data": data,
            "meta": {"page": {"limit": limit, "offset": offset, "current": offset // limit + 1,
                              "total": max(1, -(-total // limit))},
                     "results": {"total": total}},
            "links": {"current": link(offset), "first": link(0), "last": link(last),
                      "next": link(offset + limit) if offset + limit < total else None,
                      "prev": link(max(0, offset - limit)) if offset > 0 else None}}


def _job(job: JobView | None) -> dict[str, Any] | None:
    if job is None:
        return None
    return {"id": str(job.id), "type": "job", "integration": job.integration, "event_id": job.event_id,
            "event_type": job.event_type, "state": job.state.value, "attempts": job.attempts,
            "created_at": iso_time(job.created_at), "updated_at": iso_time(job.updated_at),
            "next_attempt_at": iso_time(job.next_attempt_at) if job.next_attempt_at else None,
            "last_error": job.last_error}


def _log(attempt: AttemptView) -> dict[str, Any]:
    return {"id": str(attempt.id), "type": "integration-log", "succeeded": attempt.succeeded,
            "attempt": attempt.attempt, "processing_time": round(attempt.duration, 6),
            "status_code": attempt.status_code, "body": attempt.body, "error_detail": attempt.error_detail,
            "relationships": {"integration": {"data": {"type": "integration", "id": attempt.integration}},
                              "job": {"data": {"type": "job", "id": str(attempt.job_id)}}},
            "meta": {"timestamps": {"created_at": iso_time(attempt.created_at)}}}
