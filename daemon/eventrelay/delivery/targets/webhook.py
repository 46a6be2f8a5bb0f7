"""HTTP webhooks: POST the Elastic Path envelope; any 2xx is delivered."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from ...config_yaml import Reader, default
from ...formats import WebhookEnvelope
from ...jobs import Job, Outcome
from ...text import first_line
from ...masking import mask
from ...units import boolean, header_pairs, header_value, http_url, string, tls_problem
from ..deadlines import Deadlines
from .base import SenderContext, SpanShape, TargetType

if TYPE_CHECKING:
    from .base import Integration

RESPONSE_BODY_LIMIT = 4096  # bytes of the receiver's answer kept in the attempt log


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """A private CA to trust, and a client certificate to present (mutual TLS)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None  # None: the key is in cert_file


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    secret_key: str | None = None
    signing_secrets: tuple[str, ...] = ()  # Standard Webhooks `whsec_…` secrets; several while rotating
    # Elastic Path's deprecated `resources` (the payload again, as a JSON string): every receiver written for
    # Elastic Path reads it, so it is sent unless turned off.
    send_resources: bool = True
    headers: tuple[tuple[str, str], ...] = ()  # static extra headers, in order
    basic: tuple[str, str] | None = None  # (user, password) of auth.basic (a URL's own userinfo works too)
    bearer: str | None = None
    tls: TlsConfig | None = None


# Headers eventrelay sets itself: a static header may not replace them (signatures and traces would lie).
OWN_HEADERS = frozenset({"content-type", "content-length", "content-encoding", "transfer-encoding", "host",
                         "user-agent", "connection", "x-moltin-integration-trigger", "x-moltin-secret-key",
                         "webhook-id", "webhook-timestamp", "webhook-signature", "traceparent", "tracestate"})
# Header names that say their value is a credential: shown masked.
_SECRET_HEADER = re.compile(r"(?i)(proxy-)?authorization|cookie|.*-(token|key|secret|signature|password|auth)")


def parse(reader: Reader, raw: Any, path: str) -> WebhookConfig | None:
    if raw is None:
        reader.error(path, "required for a webhook: at least url")
        return None
    s = reader.section(raw, path, ("url", "secret_key", "signing_secret", "send_resources", "headers", "auth",
                                   "tls"))
    url = reader.value(s, "url", path, http_url, None)
    if "url" not in s:
        reader.error(f"{path}.url", "required")
    secret = reader.value(s, "secret_key", path, string, None) or None
    signing = reader.value(s, "signing_secret", path, signing_secrets, (), nullable=True) or ()
    resources = reader.value(s, "send_resources", path, boolean, default(WebhookConfig, "send_resources"))
    headers = reader.value(s, "headers", path, header_pairs, (), nullable=True) or ()
    for name, _ in headers:
        if name.lower() in OWN_HEADERS:
            reader.error(f"{path}.headers.{name}", "is set by eventrelay itself and cannot be replaced")
    basic, bearer = _auth(reader, s.get("auth"), f"{path}.auth")
    in_url = bool(url) and URL(url).user is not None  # aiohttp sends it as Basic auth
    if in_url and (basic is not None or bearer is not None):
        reader.error(f"{path}.url", "has a user and password, and auth is set too: keep one of them")
    if (basic is not None or bearer is not None or in_url) and any(n.lower() == "authorization" for n, _ in headers):
        reader.error(f"{path}.headers.Authorization", "auth sets Authorization already: keep one of them")
    tls = _tls(reader, s.get("tls"), f"{path}.tls")
    if tls is not None and url and not url.startswith("https://"):
        reader.error(f"{path}.tls", "applies to https:// URLs only")
    return WebhookConfig(url=url, secret_key=secret, signing_secrets=signing, send_resources=resources,
                         headers=headers, basic=basic, bearer=bearer, tls=tls) if url else None


def _auth(reader: Reader, raw: Any, path: str) -> tuple[tuple[str, str] | None, str | None]:
    """auth: {basic: {username, password}} or {bearer: TOKEN}."""
    if raw is None:
        return None, None
    s = reader.section(raw, path, ("basic", "bearer"))
    if len(s) != 1:
        reader.error(path, "set one of basic: {username, password} or bearer: TOKEN")
        return None, None
    if "bearer" in s:
        token = reader.value(s, "bearer", path, header_value, None)
        return None, token or None
    b = reader.section(s["basic"], f"{path}.basic", ("username", "password"))
    username = reader.value(b, "username", f"{path}.basic", string, None)
    password = reader.value(b, "password", f"{path}.basic", string, "")
    if not username or ":" in username:
        reader.error(f"{path}.basic.username", "required, without a colon")
        return None, None
    return (username, password), None


def _tls(reader: Reader, raw: Any, path: str) -> TlsConfig | None:
    if raw is None:
        return None
    s = reader.section(raw, path, ("ca_file", "cert_file", "key_file"))
    tls = TlsConfig(ca_file=reader.value(s, "ca_file", path, reader.existing_file, None),
                    cert_file=reader.value(s, "cert_file", path, reader.existing_file, None),
                    key_file=reader.value(s, "key_file", path, reader.existing_file, None))
    if tls.key_file is not None and tls.cert_file is None:
        reader.error(f"{path}.key_file", "goes with cert_file (the client certificate)")
        return None
    if problem := tls_problem(lambda: ssl_context(tls)):
        reader.error(path, problem)
        return None
    return tls


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return context


def show(conf: WebhookConfig) -> dict[str, Any]:
    """Headers with credential-like values masked, auth with its secret masked, TLS files as paths."""
    shown: dict[str, Any] = {"headers": {name: mask(value) if _SECRET_HEADER.fullmatch(name) else value
                                         for name, value in conf.headers}}
    if conf.basic is not None:
        shown["auth"] = {"basic": {"username": conf.basic[0], "password": mask(conf.basic[1])}}
    elif conf.bearer is not None:
        shown["auth"] = {"bearer": mask(conf.bearer)}
    else:
        shown["auth"] = None
    shown["tls"] = None if conf.tls is None else {k: str(v) if v else None for k, v in (
        ("ca_file", conf.tls.ca_file), ("cert_file", conf.tls.cert_file), ("key_file", conf.tls.key_file))}
    return shown


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
    shown_as={"signing_secrets": "signing_secret"}, shown_fields=("headers", "basic", "bearer", "tls"), shown=show,
)


class WebhookSender:
    max_batch = 1

    def __init__(self, integration: Integration, user_agent: str):
        conf = integration.configuration
        assert isinstance(conf, WebhookConfig)
        self._url = URL(conf.url)  # parsed once, not per delivery
        self._timeout = integration.delivery.timeout
        self._envelope = WebhookEnvelope(integration, conf.send_resources)
        self._headers = {**dict(conf.headers), "Content-Type": "application/json", "User-Agent": user_agent}
        if conf.secret_key:
            self._headers["X-MOLTIN-SECRET-KEY"] = conf.secret_key
        if conf.basic is not None:
            credentials = base64.b64encode(f"{conf.basic[0]}:{conf.basic[1]}".encode()).decode()  # RFC 7617, UTF-8
            self._headers["Authorization"] = f"Basic {credentials}"
        elif conf.bearer is not None:
            self._headers["Authorization"] = f"Bearer {conf.bearer}"
        self._ssl = ssl_context(conf.tls) if conf.tls is not None else None
        self._tls_hint = (" (TLS: the receiver may not trust the client certificate in configuration.tls.cert_file)"
                          if conf.tls is not None and conf.tls.cert_file is not None else
                          " (TLS: if the receiver requires a client certificate, set configuration.tls.cert_file "
                          "and key_file)")
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
            connector=aiohttp.TCPConnector(limit=self._concurrency, ssl=self._ssl if self._ssl is not None else True),
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
            error = _describe(e)
            if self._url.scheme == "https" and isinstance(e, (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
                # With TLS 1.3 a receiver refuses a client certificate after the handshake, by closing: say so.
                error += self._tls_hint
            return Outcome(job.id, False, time.monotonic() - started, error=error)
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
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return (f"TLS: the certificate of {e.host} is not trusted ({first_line(str(e.certificate_error))}): "
                "for a private CA, set configuration.tls.ca_file")
    if isinstance(e, aiohttp.ClientConnectorSSLError):
        return (f"TLS handshake with {e.host}:{e.port} failed ({_tls_reason(e.os_error)}): if the receiver "
                "requires a client certificate, set configuration.tls.cert_file (and key_file) to one it trusts")
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


def _tls_reason(error: OSError) -> str:
    reason = getattr(error, "reason", None)  # ssl.SSLError's short name, e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED
    return str(reason).lower().replace("_", " ") if reason else first_line(str(error))
