"""HTTP webhooks: POST the Elastic Path envelope; any 2xx is delivered."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from ...config_yaml import Reader, default
from ...formats import WebhookEnvelope
from ...jobs import Job, Outcome
from ...text import first_line
from ...units import boolean, http_url, string
from ..deadlines import Deadlines
from .base import SenderContext, SpanShape, TargetType

if TYPE_CHECKING:
    from .base import Integration

RESPONSE_BODY_LIMIT = 4096  # bytes of the receiver's answer kept in the attempt log


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    secret_key: str | None = None
    signing_secrets: tuple[str, ...] = ()  # Standard Webhooks `whsec_…` secrets; several while rotating
    # Elastic Path's deprecated `resources` (the payload again, as a JSON string): every receiver written for
    # Elastic Path reads it, so it is sent unless turned off.
    send_resources: bool = True


def parse(reader: Reader, raw: Any, path: str) -> WebhookConfig | None:
    if raw is None:
        reader.error(path, "required for a webhook: at least url")
        return None
    s = reader.section(raw, path, ("url", "secret_key", "signing_secret", "send_resources"))
    url = reader.value(s, "url", path, http_url, None)
    if "url" not in s:
        reader.error(f"{path}.url", "required")
    secret = reader.value(s, "secret_key", path, string, None) or None
    signing = reader.value(s, "signing_secret", path, signing_secrets, (), nullable=True) or ()
    resources = reader.value(s, "send_resources", path, boolean, default(WebhookConfig, "send_resources"))
    return WebhookConfig(url=url, secret_key=secret, signing_secrets=signing,
                         send_resources=resources) if url else None


def signing_secrets(value: Any) -> tuple[str, ...]:
    """Standard Webhooks secrets: `whsec_` + base64; a list signs with each (key rotation)."""
    values = value if isinstance(value, list) else [value]
    for secret in values:
        if not isinstance(secret, str) or not secret.startswith("whsec_"):
            raise ValueError("must be a Standard Webhooks secret, whsec_ followed by base64 (or a list of them)")
        try:
            if len(base64.b64decode(secret[6:], validate=True)) < 16:
                raise ValueError("too short")
        except (binascii.Error, ValueError):
            raise ValueError("must be whsec_ followed by the base64 of at least 16 random bytes") from None
    return tuple(values)


def make_sender(integration: Integration, context: SenderContext) -> WebhookSender:
    return WebhookSender(integration, context.user_agent)


def span_shape(integration: Any) -> SpanShape:
    """HTTP client spans: `url.full` without credentials, and every query value redacted (webhook URLs carry
    tokens there)."""
    url = URL(integration.configuration.url)
    shown = url.with_user(None).with_query({key: "REDACTED" for key in url.query}) if url.query else \
        url.with_user(None)
    return SpanShape("POST", "client", {"http.request.method": "POST", "url.full": str(shown),
                                        "server.address": url.host or "", "server.port": url.port or 0},
                     status_attribute="http.response.status_code")


TARGET = TargetType(
    name="webhook", config_class=WebhookConfig, parse=parse, sender=make_sender, span_shape=span_shape,
    secret_fields=("secret_key", "signing_secrets"), url_fields=("url",),
    shown_as={"signing_secrets": "signing_secret"},
)


class WebhookSender:
    max_batch = 1

    def __init__(self, integration: Integration, user_agent: str):
        conf = integration.configuration
        assert isinstance(conf, WebhookConfig)
        self._url = URL(conf.url)  # parsed once, not per delivery
        self._timeout = integration.delivery.timeout
        self._envelope = WebhookEnvelope(integration, conf.send_resources)
        self._headers = {"Content-Type": "application/json", "User-Agent": user_agent}
        if conf.secret_key:
            self._headers["X-MOLTIN-SECRET-KEY"] = conf.secret_key
        self._concurrency = integration.delivery.concurrency
        self._connect_timeout = integration.delivery.connect_timeout
        # Standard Webhooks: the key is the base64 after `whsec_`; every configured secret signs (rotation).
        self._signing_keys = [base64.b64decode(secret[6:]) for secret in conf.signing_secrets]
        self._session: aiohttp.ClientSession | None = None
        # The whole request, answer included, must end within the timeout: enforced by one periodic check
        # for all requests in flight (see Deadlines), at most 5 % (and 1 s) late, cheaper than aiohttp's
        # timer per request.
        self._deadlines = Deadlines(resolution=min(1.0, max(0.01, self._timeout / 20)))
        self._name = integration.name

    async def start(self) -> None:
        # One session per integration: its connection pool is sized to the integration's concurrency, so
        # connections are reused across deliveries and a slow target cannot take sockets from another.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._concurrency),
            headers=self._headers,  # merged into each request's own by aiohttp
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            # The envelope is already JSON text; keep aiohttp from touching cookies between deliveries.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._deadlines.start(name=f"deadlines:{self._name}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._deadlines.close()

    async def deliver(self, jobs: Sequence[Job]) -> list[Outcome]:
        return [await self._post(job) for job in jobs]

    async def _post(self, job: Job) -> Outcome:
        assert self._session is not None, "start() first"
        headers = {"X-MOLTIN-INTEGRATION-TRIGGER": job.event_type}
        if job.traceparent is not None:  # the receiver's OpenTelemetry SDK continues the trace from these
            headers["traceparent"] = job.traceparent
            if job.tracestate:
                headers["tracestate"] = job.tracestate
        body = self._envelope.encode(job)
        if self._signing_keys:
            headers.update(self._signature(job.event_id, body))
        started = time.monotonic()
        deadline = self._deadlines.arm(self._timeout)
        try:
            # Redirects are failures: following one would POST the event somewhere nobody configured.
            async with self._session.post(self._url, data=body, headers=headers, allow_redirects=False) as resp:
                answer = await _read_prefix(resp.content, RESPONSE_BODY_LIMIT)
                status = resp.status
                location = resp.headers.get("Location")
                retry_after = resp.headers.get("Retry-After")
        except aiohttp.ConnectionTimeoutError:
            return Outcome(job.id, False, time.monotonic() - started,
                           error=f"no connection within connect_timeout ({self._connect_timeout:g}s)")
        except asyncio.CancelledError:
            if not self._deadlines.expired(deadline):
                raise
            return Outcome(job.id, False, time.monotonic() - started,
                           error=f"no complete answer within the timeout ({self._timeout:g}s)")
        except aiohttp.ClientError as e:
            return Outcome(job.id, False, time.monotonic() - started, error=_describe(e))
        finally:
            self._deadlines.disarm(deadline)
        duration = time.monotonic() - started
        text = answer.decode("utf-8", errors="replace")
        if 200 <= status < 300:
            return Outcome(job.id, True, duration, status_code=status, body=text)
        if 300 <= status < 400:
            error = f"redirect ({status}) not followed: point the integration at {location or 'the new URL'}"
        else:
            error = f"Received a status code outside of 2xx range ({status})"
        return Outcome(job.id, False, duration, status_code=status, error=error, body=text,
                       retry_after=_retry_after(retry_after) if status in (429, 503) else None,
                       slow_down=status in (429, 502, 504), gone=status == 410)

    def _signature(self, message_id: str, body: bytes) -> dict[str, str]:
        """Standard Webhooks headers: v1 = base64 HMAC-SHA256 of "{id}.{timestamp}.{body}"."""
        timestamp = str(int(time.time()))
        signed = f"{message_id}.{timestamp}.".encode() + body
        signatures = " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
                              for key in self._signing_keys)
        return {"webhook-id": message_id, "webhook-timestamp": timestamp, "webhook-signature": signatures}


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


async def _read_prefix(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The first `limit` bytes of a body; the rest is dropped (aiohttp then closes, not reuses, the socket)."""
    data = b""
    while len(data) < limit:
        chunk = await stream.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _describe(e: aiohttp.ClientError) -> str:
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect to {e.host}:{e.port}: {e.os_error.strerror or e.os_error}"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the server closed the connection before answering"
    # aiohttp reports its own parse errors with the code 400, which would read as if the receiver had
    # answered 400: say what happened instead, without echoing the junk at length.
    if isinstance(e, aiohttp.ClientResponseError) and not isinstance(e, aiohttp.ContentTypeError):
        return f"the answer is not valid HTTP ({first_line(e.message)})"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "the answer's body was cut short or malformed (the connection closed before its end)"
    return f"{type(e).__name__}: {first_line(str(e))}"
