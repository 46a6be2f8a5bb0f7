"""STOMP (ActiveMQ, Amazon MQ, RabbitMQ): CloudEvents bodies, each SEND confirmed by the broker's RECEIPT.

One connection per integration, kept by a supervisor task: it tries the configured addresses in order,
keeps the first that answers, watches its heart-beats, and rebuilds it with backoff when it dies. stompman's
own reconnection gives up after a few attempts and ends its client; a broker down for minutes is normal, so
the supervisor, not the library, decides that we keep trying.

stompman is imported when a sender is made, not with this module: a daemon without STOMP targets never
loads it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from ...aio import Backoff, cancel, wait_event
from ...config_yaml import Reader, default
from ...formats import CloudEvent
from ...jobs import Job, Outcome
from ...text import first_line, shorten
from ...units import positive_duration, string
from .base import SenderContext, SpanShape, TargetType

if TYPE_CHECKING:
    import stompman
    from stompman.connection import Connection
    from stompman.frames import AnyClientFrame, AnyServerFrame, ErrorFrame

    from .base import Integration

SCHEMES = {"stomp": False, "tcp": False, "stomp+ssl": True, "stomp+tls": True, "ssl": True}  # scheme -> TLS
_RECONNECT_MAX = 30.0  # seconds between connection attempts at most
_CLOSE_WAIT = 5.0  # seconds the supervisor gets to disconnect cleanly before it is cancelled


@dataclass(frozen=True, slots=True)
class StompAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'stomp+ssl' if self.tls else 'stomp'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StompConfig:
    addresses: tuple[StompAddress, ...]  # tried in order: the first that answers is used (failover)
    destination: str
    username: str | None = None
    password: str | None = None
    vhost: str | None = None  # the STOMP `host` header; RabbitMQ reads it as the virtual host
    heartbeat: float = 10.0
    ca_file: Path | None = None  # for brokers whose certificate a private CA signed


def parse(reader: Reader, raw: Any, path: str) -> StompConfig | None:
    if raw is None:
        reader.error(path, "required for stomp: at least addresses and destination")
        return None
    s = reader.section(raw, path, ("addresses", "destination", "username", "password", "vhost", "heartbeat",
                                   "ca_file"))
    addresses = s.get("addresses")
    if isinstance(addresses, str):
        addresses = [addresses]
    parsed: list[StompAddress] = []
    if not isinstance(addresses, list) or not addresses:
        reader.error(f"{path}.addresses", "required: a list of broker URIs, e.g. [stomp+ssl://b-1.mq.example:61614]")
    else:
        for i, address in enumerate(addresses):
            try:
                parsed.append(broker_address(address))
            except ValueError as e:
                reader.error(f"{path}.addresses[{i}]", str(e))
    destination = reader.value(s, "destination", path, string, None)
    if not destination:
        reader.error(f"{path}.destination", "required, e.g. /queue/orders")
    config = StompConfig(
        addresses=tuple(parsed), destination=destination or "",
        username=reader.value(s, "username", path, string, None, nullable=True) or None,
        password=reader.value(s, "password", path, string, None, nullable=True) or None,
        vhost=reader.value(s, "vhost", path, string, None, nullable=True) or None,
        heartbeat=reader.value(s, "heartbeat", path, positive_duration, default(StompConfig, "heartbeat")),
        ca_file=reader.value(s, "ca_file", path, reader.existing_file, None, nullable=True),
    )
    return config if parsed and destination and len(parsed) == len(addresses) else None


def broker_address(value: Any) -> StompAddress:
    hint = "is not a broker URI (e.g. stomp+ssl://b-1.mq.eu-west-1.amazonaws.com:61614 or stomp://127.0.0.1:61613)"
    try:
        parts = urlsplit(value if isinstance(value, str) else "")
        port = parts.port
    except ValueError:
        raise ValueError(f"{value!r} {hint}") from None
    if parts.scheme not in SCHEMES or not parts.hostname or port is None:
        raise ValueError(f"{value!r} {hint}")
    return StompAddress(parts.hostname, port, SCHEMES[parts.scheme])


def make_sender(integration: Integration, context: SenderContext) -> StompSender:
    return StompSender(integration, context.event_source, context.store_id)


def span_shape(integration: Any) -> SpanShape:
    """Messaging producer spans; the broker is the first address (the one normally used)."""
    conf = integration.configuration
    first = conf.addresses[0]
    return SpanShape(f"send {conf.destination}", "producer", {
        "messaging.system": "stomp", "messaging.destination.name": conf.destination,
        "messaging.operation.type": "send", "messaging.operation.name": "SEND",
        "server.address": first.host, "server.port": first.port})


TARGET = TargetType(
    name="stomp", config_class=StompConfig, parse=parse, sender=make_sender, span_shape=span_shape,
    secret_fields=("password",), uses_event_source=True,
)


class StompSender:
    max_batch = 1  # STOMP has no batch SEND; throughput comes from many receipts awaited at once

    def __init__(self, integration: Integration, source: str, store_id: str | None = None):
        import stompman
        from stompman.errors import ConnectionLostError, FailedAllConnectAttemptsError, FailedAllWriteAttemptsError

        conf = integration.configuration
        assert isinstance(conf, StompConfig)
        self._conf = conf
        self._timeout = integration.delivery.timeout
        self._cloudevent = CloudEvent(integration, source, store_id)
        self._store_headers = {"storeid": store_id} if store_id else {}
        self._receipt_failure = stompman.SendReceiptError
        self._connection_lost = (ConnectionLostError, FailedAllConnectAttemptsError, FailedAllWriteAttemptsError)
        self._client: stompman.Client | None = None
        self._connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._last_error = "not connected yet"
        self._refusal: str | None = None  # the ERROR frame that answered our last CONNECT, if one did
        self._supervisor: asyncio.Task[None] | None = None
        self._name = integration.name
        # Not bound: a lazy logger reads the logging configuration at each call, so a reload's level applies.
        self._log = structlog.get_logger(component="stomp", integration=integration.name)

    async def start(self) -> None:
        # Not awaited: a broker that is down must not hold up the daemon; sends wait for the connection.
        self._supervisor = asyncio.create_task(self._supervise(), name=f"stomp:{self._name}")

    async def close(self) -> None:
        self._closing.set()
        if self._supervisor is not None:
            # asyncio.wait neither cancels the supervisor when the time is up nor swallows our cancellation.
            await asyncio.wait([self._supervisor], timeout=_CLOSE_WAIT)
            await cancel(self._supervisor)

    async def deliver(self, jobs: Sequence[Job]) -> list[Outcome]:
        return [await self._send(job) for job in jobs]

    async def _send(self, job: Job) -> Outcome:
        started = time.monotonic()
        headers = {"persistent": "true", "type": job.event_type, "id": job.event_id, **self._store_headers}
        if job.traceparent is not None:  # a JMS consumer reads these as string properties
            headers["traceparent"] = job.traceparent
            if job.tracestate:
                headers["tracestate"] = job.tracestate
        try:
            async with asyncio.timeout(self._timeout):
                # The library's receipt timeout does not cover waiting for a reconnection: this one does.
                client = await self._connected_client()
                # Without content-length ActiveMQ hands JMS consumers a TextMessage; JSON holds no NUL byte.
                await client.send(_jms_safe(self._cloudevent.encode(job)), self._conf.destination,
                                  content_type="application/json", headers=headers, add_content_length=False,
                                  receipt_timeout=self._timeout)
        except TimeoutError:
            error = (f"no receipt from the broker within the timeout ({self._timeout:g}s)" if self._client else
                     f"not connected to any broker: {self._last_error}")
            return Outcome(job.id, False, time.monotonic() - started, error=error)
        except self._receipt_failure as e:
            return Outcome(job.id, False, time.monotonic() - started, error=_receipt_error(e))
        except self._connection_lost as e:
            return Outcome(job.id, False, time.monotonic() - started,
                           error=f"connection to the broker lost before the receipt: {type(e).__name__}")
        # The broker's own message-id is given to consumers only; the message's `id` header is the event's.
        return Outcome(job.id, True, time.monotonic() - started, message_id=job.event_id)

    async def _connected_client(self) -> stompman.Client:
        while True:
            await self._connected.wait()
            if self._client is not None:
                return self._client

    async def _supervise(self) -> None:
        backoff = Backoff(1.0, _RECONNECT_MAX)
        while not self._closing.is_set():
            for address in self._conf.addresses:
                if self._closing.is_set():
                    return
                try:
                    await self._hold(address)
                    backoff.reset()  # we were connected: start the backoff anew
                except Exception as e:  # noqa: BLE001 - any failure of one connection is logged and retried
                    error = _describe(e, self._refusal)
                    self._last_error = f"{address}: {error}"
                    self._log.warning("broker connection failed", address=str(address), error=error)
            await wait_event(self._closing, backoff.next())

    async def _hold(self, address: StompAddress) -> None:
        """Connect to one broker and keep the connection until it dies or we close."""
        import stompman

        conf = self._conf
        heartbeat_ms = int(conf.heartbeat * 1000)
        self._refusal = None
        client = stompman.Client(
            servers=[stompman.ConnectionParameters(host=address.host, port=address.port,
                                                   login=conf.username or "", passcode=conf.password or "")],
            heartbeat=stompman.Heartbeat(heartbeat_ms, heartbeat_ms),
            ssl=self._tls_context() if address.tls else None,
            connect_retry_attempts=1,
            connect_timeout=max(1, int(self._timeout)),
            connection_confirmation_timeout=max(1, int(self._timeout)),
            on_error_frame=lambda frame: self._log.error("ERROR frame from the broker",
                                                         message=frame.headers.get("message"),
                                                         detail=frame.body.decode(errors="replace")[:500]),
            connection_class=_connection_class(conf.vhost, self._refused),
            # Its default reconnects every hour when no MESSAGE arrives, which for a publisher is always.
            no_message_restart_interval=None,
        )
        async with client:
            self._client = client
            self._connected.set()
            self._log.info("connected to broker", address=str(address))
            try:
                # A dead broker (or a cut network) is noticed through missing heart-beats, not by the library.
                check = max(0.2, conf.heartbeat / 2) if conf.heartbeat else 1.0
                while client.is_alive() and not self._closing.is_set():
                    await wait_event(self._closing, check)
            finally:
                self._connected.clear()
                self._client = None
            if not self._closing.is_set():
                self._last_error = f"{address}: heart-beats stopped"
                self._log.warning("broker connection lost; reconnecting", address=str(address))

    def _refused(self, frame: ErrorFrame) -> None:
        self._refusal = _error_text(frame)

    def _tls_context(self) -> ssl.SSLContext:
        # Certificates are verified: against the system's CAs, or the operator's private CA.
        return ssl.create_default_context(cafile=str(self._conf.ca_file) if self._conf.ca_file else None)


def _connection_class(vhost: str | None, refused: Callable[[ErrorFrame], None]) -> type[Connection]:
    from stompman.connection import Connection
    from stompman.errors import ConnectionLostError
    from stompman.frames import ConnectFrame, ErrorFrame

    class SenderConnection(Connection):
        """Hands an ERROR frame that answers CONNECT to `refused` and ends the attempt there. stompman drops
        such a frame when the broker closes (leaving only ConnectionLostOnLifespanEnter) and never passes
        handshake frames to on_error_frame, so the operator would not learn why a login was refused."""

        __slots__ = ()

        def read_frames(self) -> AsyncGenerator[AnyServerFrame, None]:
            if self.last_read_time is not None:
                return super().read_frames()  # after CONNECTED: the receipts' path, left as it is
            return self._handshake_frames()  # nothing read yet: this is the reader awaiting CONNECTED

        async def _handshake_frames(self) -> AsyncGenerator[AnyServerFrame, None]:
            async for frame in super().read_frames():
                if isinstance(frame, ErrorFrame):
                    refused(frame)
                    # A STOMP server closes after an ERROR frame; RabbitMQ takes its time, and waiting for it
                    # would let the connection timeout, not the broker's answer, decide the attempt's error.
                    raise ConnectionLostError(reason="ERROR frame in answer to CONNECT")
                yield frame

        if vhost is not None:
            async def write_frame(self, frame: AnyClientFrame) -> None:
                # stompman puts the TCP host in CONNECT's `host` header; RabbitMQ reads it as the vhost.
                if isinstance(frame, ConnectFrame):
                    frame.headers["host"] = vhost
                await super().write_frame(frame)

    return SenderConnection


# A UTF-8 lead byte of a 4-byte sequence: a character outside the Basic Multilingual Plane.
_ASTRAL_LEAD_BYTES = tuple(bytes([b]) for b in range(0xF0, 0xF5))
_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")


def _jms_safe(body: bytes) -> bytes:
    """The body with every character outside the BMP written as a JSON surrogate-pair escape.

    ActiveMQ 5.x turns a STOMP body into a JMS TextMessage whose getText() throws UTFDataFormatException
    when the text holds such a character (AMQ-8398). In a JSON body they can only be inside strings, where
    the escape is the same value. isascii() and memchr-speed `in` keep the common body's cost negligible.
    """
    if body.isascii() or not any(lead in body for lead in _ASTRAL_LEAD_BYTES):
        return body
    return _ASTRAL.sub(_surrogate_pair, body.decode()).encode()


def _surrogate_pair(match: re.Match[str]) -> str:
    offset = ord(match.group()) - 0x10000
    return f"\\u{0xD800 | (offset >> 10):04x}\\u{0xDC00 | (offset & 0x3FF):04x}"


def _error_text(frame: ErrorFrame) -> str:
    """An ERROR frame's `message` header and the first line of its body (RabbitMQ says why only there)."""
    message = frame.headers.get("message", "").strip()
    detail = first_line(frame.body.decode(errors="replace"), 300)
    if detail and detail != message:
        return f"{message}: {detail}" if message else detail
    return message or "(no message)"


def _receipt_error(e: stompman.SendReceiptError) -> str:
    if e.reason == "rejected" and e.frame is not None:
        message = e.frame.headers.get("message", "")
        detail = shorten(e.frame.body.decode(errors="replace").strip(), 500)
        return f"the broker refused the message (ERROR frame): {message}" + (f": {detail}" if detail else "")
    if e.reason == "timeout":
        return "no receipt from the broker within the timeout"
    return "connection to the broker lost before the receipt"


def _describe(e: BaseException, refusal: str | None = None) -> str:
    """One line for the operator; `refusal` is the ERROR frame's text if the broker answered CONNECT with one."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_describe(inner, refusal) for inner in e.exceptions)
    from stompman.errors import FailedAllConnectAttemptsError  # loaded already: a sender was made

    if isinstance(e, FailedAllConnectAttemptsError):
        if refusal is not None:
            return f"the broker refused the connection (ERROR frame): {refusal}"
        issues = ", ".join(type(issue).__name__ for issue in e.issues) or "no answer"
        return f"cannot connect ({issues})"
    if isinstance(e, ssl.SSLError):
        return f"TLS failed: {e.reason or e}"
    return f"{type(e).__name__}: {e}"
