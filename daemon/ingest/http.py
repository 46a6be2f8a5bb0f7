"""The HTTP listener: POST /v1/events, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import cast

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.http_exceptions import ContentEncodingError

from .. import codec
from ..config import ListenConfig
from ..events import EventError, parse_event
from ..store import StoreError
from . import Ingestor

MAX_EVENTS_PER_REQUEST = 1000
_MAX_ERRORS_SHOWN = 20

log = structlog.get_logger(component="ingest.http")


def error_response(status: int, detail: str | list[str], headers: dict[str, str] | None = None) -> web.Response:
    """JSON:API-style errors, as the seed system answers them."""
    from http import HTTPStatus

    details = [detail] if isinstance(detail, str) else detail
    title = HTTPStatus(status).phrase
    return web.json_response({"errors": [{"status": str(status), "title": title, "detail": d} for d in details]},
                             status=status, headers=headers)


class ConnectionCap:
    """aiohttp's protocol factory behind a cap on open connections, which aiohttp itself does not have.

    Past `limit`, a client gets a 503 that says which setting to raise, then the connection closes: better
    than a silent reset, and the cap keeps a flood of idle clients from taking every file descriptor (the
    database and the Unix socket need some too). `limit` may change on reload.
    """

    def __init__(self, server: web.Server, limit: int, on_refused: Callable[[], None] = lambda: None):
        self._server = server
        self.limit = limit
        self._on_refused = on_refused
        # Connections accepted in this turn of the loop. The loop accepts a burst of connections, making their
        # protocols, before it runs their connection_made (where aiohttp counts a connection), so a count of
        # aiohttp's alone would let a burst overshoot. Those calls and the reset below are scheduled in the same
        # turn, so all have run before the loop accepts again.
        self._burst = 0

    def __call__(self) -> asyncio.BaseProtocol:
        # `connections` copies a list: a few microseconds per accept at the default cap, and accepts are rare
        # next to requests, which reuse their connection.
        if len(self._server.connections) + self._burst < self.limit:
            if not self._burst:
                asyncio.get_running_loop().call_soon(self._end_burst)
            self._burst += 1
            return self._server()
        self._on_refused()
        return _Refusal(self.limit)

    def _end_burst(self) -> None:
        self._burst = 0


class _Refusal(asyncio.Protocol):
    """Answers 503 at once, whatever the client sends, and closes."""

    LINGER = 1.0  # seconds to wait for the client to finish sending before the close

    def __init__(self, limit: int):
        body = codec.dumps({"errors": [{"status": "503", "title": "Service Unavailable", "detail":
                                        f"too many connections (listen.max_connections = {limit}); try again later"}]})
        self._answer = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
                        ).encode() + body.encode()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: no isinstance check.
        transport = cast(asyncio.Transport, transport)
        transport.write(self._answer)
        # Closing with the client's request still unread would reset the connection, and a reset can discard
        # the answer before the client reads it: half-close, read and drop what comes, then close.
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(self.LINGER, transport.close)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self._transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _UnreadableBody(Exception):
    pass


class HttpIngest:
    def __init__(self, ingestor: Ingestor, listen: ListenConfig, ready: Callable[[], Awaitable[bool]]):
        self._ingestor = ingestor
        self._ready = ready
        self.update(listen)

    def update(self, listen: ListenConfig) -> None:
        """Apply a reloaded listen section without rebinding the socket."""
        self._token = listen.token.encode() if listen.token else None
        self._max_body_size = listen.max_body_size
        self._max_depth = listen.max_depth

    def app(self, extra: Callable[[web.Application], None] = lambda app: None) -> web.Application:
        # The body limit is enforced while reading (see _read_body), so a reload can change it.
        app = web.Application(client_max_size=2**40, middlewares=[self._guard])
        app.router.add_post("/v1/events", self.post_events)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        extra(app)
        return app

    def serve_events_first(self, server: web.Server) -> None:
        """Have `server` (the application's, set up by its runner) hand POST /v1/events to post_events
        directly, and every other request to the application as before.

        The application's routing and middleware chain (Application._handle with its get_event_loop, which
        on Python 3.11 is a getpid() system call, the router, and two wrappers per middleware) took about a
        tenth of the event loop's time per single-event request; the event route needs none of it, so it
        goes first. The route stays registered in the application, which answers its other methods (405),
        and takes the requests that ask for a "100 Continue" first (curl does for bodies over 1 KiB).
        """
        app_handler = server.request_handler
        post_events = self.post_events

        def handle(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            if request.method == "POST" and request.path == "/v1/events" and "Expect" not in request.headers:
                return post_events(cast(web.Request, request))
            return app_handler(request)

        server.request_handler = handle

    def _denied(self, request: web.BaseRequest) -> web.Response | None:
        """The 401 answer to a request without the bearer token (when one is configured), else None."""
        if self._token is None:
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
            return None
        return error_response(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": 'Bearer realm="eventrelay"'})

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """The bearer token, and JSON errors everywhere (aiohttp's own 404/405/413 answers are text/plain).

        One middleware, not two: each costs a wrapper per request.
        """
        # Everything but the probes needs the token: the admin API, /metrics, and events (post_events checks it
        # too, as serve_events_first brings it most requests without this middleware).
        if request.path not in ("/healthz", "/readyz") and (denied := self._denied(request)) is not None:
            return denied
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, e.reason or e.text or "", headers={
                k: v for k, v in e.headers.items() if k in ("Allow", "WWW-Authenticate")})

    async def post_events(self, request: web.Request) -> web.Response:
        """Store the events of a request and answer 202 once committed, or answer why not.

        Reached without the middleware (serve_events_first), so it checks the token itself and answers every
        error as a response rather than raising aiohttp's HTTP exceptions.
        """
        if (denied := self._denied(request)) is not None:
            return denied
        if request.content_type != "application/json" and not request.content_type.endswith("+json"):
            return error_response(415, f"Content-Type must be application/json, got {request.content_type!r}")
        try:
            raw = await self._read_body(request)
        except _UnreadableBody as e:
            return error_response(400, str(e))
        if raw is None:
            return self._too_large()
        try:
            # The events of a batch are depth-checked one by one, as they are parsed.
            decoded = codec.loads(raw, self._max_depth, objects_in_array=False)
        except ValueError as e:
            return error_response(400, str(e))
        items = decoded if isinstance(decoded, list) else [decoded]
        if not items:
            return error_response(400, "empty array: send at least one event")
        if len(items) > MAX_EVENTS_PER_REQUEST:
            return error_response(400, f"{len(items)} events in one request; at most {MAX_EVENTS_PER_REQUEST}")
        events, errors = [], []
        for i, item in enumerate(items):
            try:
                events.append(parse_event(item, self._max_depth, 1) if isinstance(decoded, list) else
                              parse_event(item))
            except EventError as e:
                errors.append(f"[{i}].{e}" if isinstance(decoded, list) else str(e))
        if errors:
            # All or none: one bad event rejects the request, so a producer's retry cannot half-duplicate it.
            shown = errors[:_MAX_ERRORS_SHOWN]
            if len(errors) > len(shown):
                shown.append(f"... and {len(errors) - len(shown)} more invalid events")
            return error_response(400, shown)
        try:
            accepted = await self._ingestor.accept(events, "http")
        except StoreError as e:
            return error_response(503, f"the event was not stored: {e}", headers={"Retry-After": "5"})
        return web.json_response(
            {"data": [{"id": a.id, "jobs": a.jobs, "duplicate": a.duplicate} for a in accepted]}, status=202,
            dumps=codec.dumps)

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The body, or None as soon as it is larger than the limit (without reading the rest into memory)."""
        limit = self._max_body_size
        if request.content_length is not None and request.content_length > limit:
            return None
        chunks, size = [], 0
        try:
            if request.content_length is not None and "Content-Encoding" not in request.headers:
                # Known length within the limit, nothing to inflate (a gzip body is counted as it inflates,
                # below): aiohttp reads exactly that much, in one call.
                return await request.read()
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
        except (RequestPayloadError, ContentEncodingError):
            # e.g. a Content-Encoding: gzip body that does not decompress, or a broken chunked encoding
            raise _UnreadableBody("the body cannot be read: its Content-Encoding or chunked framing is corrupt") \
                from None
        return b"".join(chunks)

    def _too_large(self) -> web.Response:
        return error_response(413, f"body larger than listen.max_body_size ({self._max_body_size} bytes); "
                                   "send fewer events per request")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if await self._ready():
            return web.json_response({"status": "ready"})
        return error_response(503, "not ready: starting, stopping, or the database is unavailable")
