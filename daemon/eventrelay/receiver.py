"""`eventrelay receive`: a local webhook receiver for people wiring up an integration.

It prints each delivery and checks what a real receiver should check, so a misconfigured secret or
event filter shows up on the first try rather than in production. With `--secret whsec_…` it verifies
Standard Webhooks signatures as docs/verify-webhooks.md tells receivers to.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TextIO

from aiohttp import web

TOLERANCE = 5 * 60  # seconds a webhook-timestamp may be from this clock, either way (the Standard's default)


class SigningSecretError(ValueError):
    """The --secret given is not a Standard Webhooks secret."""


def signing_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret: the base64 after the prefix, decoded (not the text itself)."""
    if not secret.startswith("whsec_"):
        raise SigningSecretError("must be the integration's signing_secret: whsec_ followed by base64")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise SigningSecretError("is not whsec_ followed by base64: copy the integration's signing_secret whole")
    return key


def signature_problem(key: bytes, body: bytes, headers: Mapping[str, str], now: float) -> str | None:
    """Why this request's Standard Webhooks signature does not verify, or None when it does."""
    msg_id, timestamp = headers.get("webhook-id"), headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    missing = [name for name, value in (("webhook-id", msg_id), ("webhook-timestamp", timestamp),
                                        ("webhook-signature", signatures)) if not value]
    if missing:
        return (f"{', '.join(missing)} missing: the integration has no signing_secret, or something on the way "
                "dropped the header")
    assert msg_id is not None and timestamp is not None and signatures is not None
    if not (timestamp.isascii() and timestamp.isdigit()):
        return f"webhook-timestamp {timestamp!r} is not unix seconds"
    skew = now - int(timestamp)
    if abs(skew) > TOLERANCE:
        when = "old" if skew > 0 else "in the future"
        return (f"webhook-timestamp is {abs(skew):.0f}s {when} (more than {TOLERANCE // 60} minutes): a request "
                "sent again later, or a clock out of sync (use NTP)")
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    given = [value for version, _, value in (s.partition(",") for s in signatures.split(" ")) if version == "v1"]
    if not given:
        return f"webhook-signature has no v1 signature: {signatures[:80]!r}"
    if any(hmac.compare_digest(value.encode(), expected) for value in given):
        return None
    return ("webhook-signature does not match: the integration signs with another signing_secret than --secret, "
            "or the body was changed on the way")


class DebugReceiver:
    def __init__(self, secret_key: str | None, status: int, out: TextIO = sys.stdout,
                 signing_secret: str | None = None, clock: Callable[[], float] = time.time):
        self._secret = secret_key
        self._status = status
        self._out = out
        self._signing_key = signing_key(signing_secret) if signing_secret is not None else None
        self._clock = clock
        self.received = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.received += 1
        body = await request.read()  # the raw bytes: the signature covers them, not a re-encoding of the JSON
        problems = []
        # A request that fails authentication is answered 401, like a real receiver would, so the daemon
        # records a failed attempt and retries: the operator sees the mistake in `eventrelay logs` too.
        unauthorized = []
        if request.content_type != "application/json":
            problems.append(f"Content-Type is {request.content_type!r}, expected application/json")
        try:
            envelope = json.loads(body)
        except ValueError as e:
            envelope = {}
            problems.append(f"body is not JSON: {e}")
        if not isinstance(envelope, dict):
            envelope = {}
            problems.append("body is not a JSON object")
        trigger = request.headers.get("X-MOLTIN-INTEGRATION-TRIGGER")
        if trigger != envelope.get("triggered_by"):
            problems.append(f"X-MOLTIN-INTEGRATION-TRIGGER {trigger!r} differs from triggered_by "
                            f"{envelope.get('triggered_by')!r}")
        given = request.headers.get("X-MOLTIN-SECRET-KEY")
        if self._secret is not None and not hmac.compare_digest((given or "").encode(), self._secret.encode()):
            unauthorized.append("X-MOLTIN-SECRET-KEY missing" if given is None else "X-MOLTIN-SECRET-KEY is wrong")
        if self._signing_key is not None:
            problem = signature_problem(self._signing_key, body, request.headers, self._clock())
            if problem is not None:
                unauthorized.append(problem)
        stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
        integration = envelope.get("integration")
        print(f"{stamp} POST {request.path} {envelope.get('triggered_by')} id={envelope.get('id')} "
              f"attempt={envelope.get('attempt')} "
              f"integration={integration.get('name') if isinstance(integration, dict) else None} "
              f"{len(body)} bytes", file=self._out)
        print("  " + json.dumps(envelope.get("payload"), ensure_ascii=False)[:500], file=self._out)
        for problem in problems + unauthorized:
            print(f"  PROBLEM: {problem}", file=self._out)
        if self._signing_key is not None and not unauthorized:
            print("  signature verified", file=self._out)
        self._out.flush()
        if unauthorized:
            return web.Response(status=401, text="; ".join(unauthorized))
        return web.Response(status=self._status)


def serve(host: str, port: int, secret_key: str | None, status: int, signing_secret: str | None = None) -> None:
    receiver = DebugReceiver(secret_key, status, signing_secret=signing_secret)  # a bad secret: before listening
    checks = " and verifying signatures" if signing_secret is not None else ""
    print(f"eventrelay test receiver on http://{host}:{port}/ (answering {status}{checks}); Ctrl-C to stop",
          flush=True)
    web.run_app(receiver.app(), host=host, port=port, print=None, access_log=None)
