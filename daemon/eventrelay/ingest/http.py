"""The HTTP listener: POST /v1/events, /healthz, /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from .. import aio, codec
from ..access import INGEST, LOOPBACK_NAMES, Access
from ..config import Config
from ..events import EventError, parse_event
from ..store import StoreError
from ..text import one_line, shorten
from ..tracecontext import from_headers
from . import Ingestor
from .errors import error_response

if TYPE_CHECKING:
    from ..tracing import IngestSpan, Tracing

MAX_EVENTS_PER_REQUEST = 1000
CONSOLE_PREFIX = "/ui"  # the console's pages and assets: it checks access itself
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/favicon.ico", "/openapi.json"})  # to anyone: no data in them
_MAX_ERRORS_SHOWN = 20

log = structlog.get_logger(component="ingest.http")


class ConnectionCap:
    """aiohttp's protocol factory behind a cap on open connections, which aiohttp itself does not have, and one
    check, about once a second, that times out requests arriving too slowly (aiohttp has no read timeout).

    Past `limit`, the connection idle the longest is closed to make room, if one has been idle for longer than
    a request may take (request_timeout: a client between two requests keeps its connection); else the new
    client gets a 503 that says which setting to raise, then the connection closes: better than a silent
    reset, and the cap keeps a flood of clients from taking every file descriptor (the database and the Unix
    socket need some too). `limit` and `request_timeout` may change on reload.
    """

    def __init__(self, server: web.Server, limit: int, request_timeout: float,
                 on_refused: Callable[[], None] = lambda: None):
        self._server = server
        self.limit = limit
        self.request_timeout = request_timeout
        self._on_refused = on_refused
        # Connections accepted in this turn of the loop. The loop accepts a burst of connections, making their
        # protocols, before it runs their connection_made (where aiohttp counts a connection), so a count of
        # aiohttp's alone would let a burst overshoot. Those calls and the reset below are scheduled in the same
        # turn, so all have run before the loop accepts again.
        self._burst = 0
        # No connection was idle enough to close at the last look: refusals skip the scan until the next check,
        # so that a flood of refused clients costs no scan of every connection each.
        self._none_idle = False
        self._work = asyncio.Event()  # set while connections are open: the check runs only then
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="http-request-timeouts")

    async def close(self) -> None:
        await aio.cancel(self._watcher)
        self._watcher = None

    def __call__(self) -> asyncio.BaseProtocol:
        server = self._server
        if len(server._connections) + self._burst >= self.limit and not self._make_room():
            self._on_refused()
            return _Refusal(self.limit)
        if not self._burst:
            asyncio.get_running_loop().call_soon(self._end_burst)
        self._burst += 1
        self._work.set()
        # What aiohttp's Server.__call__ does, with our protocol class.
        return _Connection(server, loop=server._loop, **server._kwargs)

    def _end_burst(self) -> None:
        self._burst = 0

    def _make_room(self) -> bool:
        """At the cap: True if there is room after all (connections closing count as gone) or after closing
        the connection idle the longest, if one has been idle for longer than request_timeout."""
        if self._none_idle:
            return False
        latest = asyncio.get_running_loop().time() - self.request_timeout  # idle since then or before
        open_, oldest, oldest_since = 0, None, latest
        for connection in self._server._connections:  # oldest connection first: it wins a tie
            if connection.transport is None:
                continue  # closing already
            open_ += 1
            since = cast(_Connection, connection).idle_since()
            if since is not None and since <= latest and (oldest is None or since < oldest_since):
                oldest, oldest_since = connection, since
        if open_ + self._burst < self.limit:
            return True
        if oldest is None:
            self._none_idle = True
            return False
        oldest.force_close()  # what aiohttp's keep-alive timeout does to it, only sooner
        return True

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._server._connections:
                self._work.clear()
                await self._work.wait()
            await asyncio.sleep(min(1.0, self.request_timeout / 4))
            self._none_idle = False
            now, timeout = loop.time(), self.request_timeout
            for connection in list(self._server._connections):
                cast(_Connection, connection).check(now, timeout)


class _SlowRequest(Exception):
    """Set on a request's body when the request took longer than listen.request_timeout to arrive."""


def _too_slow(timeout: float) -> str:
    return (f"the request did not arrive within listen.request_timeout ({timeout:g} s); send it at once, "
            f"or raise listen.request_timeout")


class _Connection(RequestHandler):
    """aiohttp's HTTP protocol, with the request timeout, our JSON errors, and log lines through structlog.

    The timeout is enforced by ConnectionCap's check; all a request costs here is data_received noting when the
    first bytes of a request arrive (the first read while aiohttp waits for a request): no timer per request.
    """

    __slots__ = ("_began", "_began_on", "_began_count", "_timed", "_timed_since")

    def __init__(self, manager: web.Server, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._began_on: asyncio.Future[None] | None = None  # aiohttp's wait for a request, when bytes came in it
        self._began = 0.0  # when they came
        self._began_count = -1  # requests received on the connection before that one
        self._timed: web.BaseRequest | None = None  # the request whose body the check times
        self._timed_since = 0.0

    def data_received(self, data: bytes, _base: Callable[[RequestHandler, bytes], None] = RequestHandler.data_received
                      ) -> None:
        waiter = self._waiter
        if waiter is not None and waiter is not self._began_on:
            self._began_on = waiter
            self._began_count = self._request_count
            self._began = self._loop.time()
        _base(self, data)

    def idle_since(self) -> float | None:
        """When the connection began to wait for a request, if it still waits and nothing of one has come."""
        waiter = self._waiter
        if waiter is None or waiter.done() or waiter is self._began_on:
            return None
        # aiohttp's keep-alive deadline: the moment the connection became idle, plus the keep-alive timeout.
        return self._next_keepalive_close_time - self.keepalive_timeout

    def check(self, now: float, timeout: float) -> None:
        """Answer 408 and close if the request being received has taken `timeout` seconds."""
        if self.transport is None:
            return
        request = self._current_request
        if request is None:
            self._timed = None
            waiter = self._waiter
            if self._close and not self._request_in_progress:
                self.force_close()  # a 408 went out a check ago: the client had time to read it
            elif waiter is not None and waiter is self._began_on and not waiter.done() and \
                    now - self._began >= timeout:
                self._headers_too_slow(timeout)
            return
        payload = request.content
        if payload.is_eof():
            return  # the body is in: the request is being handled, not received
        if self._messages and isinstance(error := self._messages[0][0], _ErrInfo):
            # The body's framing broke after the handler started reading it (a bad chunk size): aiohttp
            # queues an error for after the request, which never ends, as the body is never complete.
            self._end_body(RequestPayloadError(error.message), "malformed HTTP request refused",
                           _first_line(error.message))
            return
        if self._timed is not request:
            self._timed = request
            # Its first bytes came while aiohttp waited for it, or (pipelined) with the request before it.
            current = self._request_count - len(self._messages)
            self._timed_since = self._began if current == self._began_count + 1 else now
        if now - self._timed_since >= timeout:
            self._end_body(_SlowRequest(_too_slow(timeout)), "request timed out", "body")

    def _end_body(self, error: Exception, event: str, detail: str) -> None:
        """Make the handler's read of the body fail with `error` (it answers), and close after the answer."""
        assert self._current_request is not None and self.transport is not None
        log.info(event, peer=_peer(self._current_request), detail=detail)
        self.close()  # ignore what else the client sends
        # The client is still sending: a plain close after the answer could reset the connection and discard
        # the answer before it is read. aiohttp closes through this attribute once the answer is out.
        self.transport = _LingeringClose(self.transport)
        self._current_request.content.set_exception(error)
        self._current_request.content.feed_eof()  # nothing to drain after the answer

    def _headers_too_slow(self, timeout: float) -> None:
        assert self.transport is not None
        log.info("request timed out", peer=_peer_of(self.transport), detail="headers")
        body = codec.dumps({"errors": [{"status": "408", "title": "Request Timeout", "detail": _too_slow(timeout)}]})
        self.transport.write((f"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body.encode())
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # Closing now, with the client still sending, could reset the connection before it reads the answer:
        # ignore what it sends, and let the next check close the connection.
        self.close()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (400) or whose handler raised (500, 504): ours in
        JSON, with one log line instead of a traceback through the standard library's logging."""
        if status == 500 and exc is not None:
            response = failure_response(request, exc)
        else:
            if status == 504:
                detail = "the request took too long to handle; see the eventrelay log"
                log.warning("request handler timed out", peer=_peer(request), method=request.method,
                            path=request.path)
            else:
                detail = _malformed(exc, message)
                log.info("malformed HTTP request refused", peer=_peer(request), detail=detail)
            response = error_response(status, detail)
        if request.writer.output_size > 0:
            # As aiohttp: part of an answer went out already, so the connection is broken.
            raise ConnectionError("an answer was under way; the connection cannot carry an error after it")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's other failures ("Unhandled exception", ...): one log line."""
        message = args[0] % args[1:] if len(args) > 1 else (args[0] if args else "HTTP connection failed")
        log.error(str(message), exc_info=kw.get("exc_info"))


def _peer(request: web.BaseRequest) -> str | None:
    return request.remote


def _peer_of(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else None


def _first_line(text: str) -> str:
    """What an aiohttp parser message says, on one line: the text before the quoted bytes and the caret."""
    return shorten(one_line(text.strip().split("\n\n", 1)[0]).rstrip(":"), 200)


def _malformed(exc: BaseException | None, message: str | None) -> str:
    if isinstance(exc, LineTooLong):
        return f"a line of the request head is longer than {exc.args[1]} bytes"
    return f"the request is not valid HTTP/1.1: {_first_line(message or str(exc or '')) or 'unreadable'}"


def failure_response(request: web.BaseRequest, exc: BaseException) -> web.Response:
    """A JSON 500 that says in a sentence what failed, for an exception no handler expected; one log line."""
    fields = {"method": request.method, "path": request.path}
    if isinstance(exc, ConnectionError) and (request.transport is None or request.transport.is_closing()):
        # The client hung up while its request was handled: nobody to answer, nothing for the operator to do.
        return error_response(500, "the client closed the connection")
    if isinstance(exc, StoreError):
        detail = str(exc)  # it says what failed and what to do
        log.error("request failed", error=detail, **fields)
    else:
        detail = (f"the request failed on an unexpected error ({type(exc).__name__}: {exc}); the eventrelay log "
                  f"has its traceback")
        log.error("request failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc, **fields)
    return error_response(500, detail)


class _LingeringClose:
    """A transport whose close() half-closes, drops what the client still sends, and closes a moment later."""

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        transport = self._transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(_Refusal.LINGER, transport.close)


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
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status


def _unreadable_body() -> _UnreadableBody:
    return _UnreadableBody(400, "the body cannot be read: its Content-Encoding or chunked framing is corrupt")


def _unreadable(e: _UnreadableBody) -> web.Response:
    # The rest of the body is unreadable or late: the connection cannot carry another request.
    response = error_response(e.status, str(e))
    response.force_close()
    return response


class HttpIngest:
    def __init__(self, ingestor: Ingestor, config: Config, ready: Callable[[], Awaitable[bool]],
                 tracing: Tracing | None = None):
        self._ingestor = ingestor
        self._ready = ready
        self._tracing = tracing
        self.access = Access()  # the admin API and the console answer to it too
        self.update(config)

    def update(self, config: Config) -> None:
        """Apply a reloaded configuration (listen and auth) without rebinding the socket."""
        listen = config.listen
        open_hosts = None if config.auth.allow_unauthenticated else \
            LOOPBACK_NAMES | ({listen.http[0].lower()} if listen.http else set())
        self.access.update(config.auth.ingest_tokens, config.admin_tokens, open_hosts)
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

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """The bearer token, and JSON errors everywhere (aiohttp's own 404/405/413 answers are text/plain).

        One middleware, not two: each costs a wrapper per request.
        """
        # Everything but the probes and the console needs the token: the admin API, /metrics, and events
        # (post_events checks it too, as serve_events_first brings it most requests without this middleware).
        # The console answers for its own pages: its login form is shown without one.
        # POST /v1/events checks its own scope (ingest tokens may send events); it arrives here when the client
        # asked for "100 Continue" (serve_events_first leaves those to the application).
        if (request.path not in _OPEN_PATHS and not request.path.startswith(CONSOLE_PREFIX)
                and not (request.path == "/v1/events" and request.method == "POST")
                and (denied := self.access.denied(request)) is not None):
            return denied
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, e.reason or e.text or "", headers={
                k: v for k, v in e.headers.items() if k in ("Allow", "WWW-Authenticate")})
        except (_SlowRequest, RequestPayloadError, ContentEncodingError) as e:  # reading the body of an admin POST
            return _unreadable(_UnreadableBody(408, str(e)) if isinstance(e, _SlowRequest) else _unreadable_body())
        except Exception as e:
            return failure_response(request, e)

    async def post_events(self, request: web.Request) -> web.Response:
        """Store the events of a request and answer 202 once committed, or answer why not.

        Reached without the middleware (serve_events_first), so it checks the token itself and answers every
        error as a response rather than raising aiohttp's HTTP exceptions.
        """
        if self._tracing is None:
            # The producer's trace context (W3C headers) is stored with the events that carry none of their own.
            headers = request.headers
            return await self._answer(request, from_headers(headers.get("traceparent"), headers.get("tracestate")))
        with self._tracing.ingest(request) as span:
            response = await self._answer(request, span.context, span)
            span.answered(response.status)
            return response

    async def _answer(self, request: web.Request, context: tuple[str, str | None] | None,
                      span: IngestSpan | None = None) -> web.Response:
        if (denied := self.access.denied(request, INGEST)) is not None:
            return denied
        if request.content_type != "application/json" and not request.content_type.endswith("+json"):
            return error_response(415, f"Content-Type must be application/json, got {request.content_type!r}")
        try:
            raw = await self._read_body(request)
        except _UnreadableBody as e:
            return _unreadable(e)
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
        if context is not None:
            events = [e if e.traceparent else e._replace(traceparent=context[0], tracestate=context[1])
                      for e in events]
        if span is not None:
            span.events = len(events)
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
            raise _unreadable_body() from None
        except _SlowRequest as e:  # set by ConnectionCap's check
            raise _UnreadableBody(408, str(e)) from None
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
