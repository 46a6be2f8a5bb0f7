"""Who may use the HTTP listener: a request with the bearer token (`listen.token`), or a browser with a console
session made from it; and no browser page of another origin may make it change anything.

Sessions are signed, not stored: the cookie holds an expiry and a random nonce, signed with a key derived
from the token. So they survive a restart, are good on every daemon that shares the token, and all end when
the token changes. The CSRF token a session's state-changing requests must carry is derived the same way.
A logout is remembered (in memory) until the session would have expired.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from .ingest.errors import error_response

SESSION_COOKIE = "eventrelay_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL = 12 * 3600.0  # seconds a console login lasts: a night's shift
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_LOGGED_OUT = 10_000  # remembered logouts at most (a flood of logouts cannot grow memory without bound)


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    expires: float  # unix seconds
    csrf: str  # the token its state-changing requests carry in X-CSRF-Token


class Access:
    """The listener's access rules, updated on reload."""

    def __init__(self, token: str | None):
        self._logged_out: dict[str, float] = {}  # nonce -> when its session would have expired
        self.update(token)

    def update(self, token: str | None) -> None:
        self._token = token.encode() if token else None
        self._key = hmac.digest(self._token, b"eventrelay console session", "sha256") if self._token else b""

    @property
    def open(self) -> bool:
        """No token is configured: the listener is open to whoever reaches it (127.0.0.1 by default)."""
        return self._token is None

    def denied(self, request: web.BaseRequest) -> web.Response | None:
        """Why the request may not go on (a 401 or 403 answer), or None when it may."""
        if (refused := self.denied_origin(request)) is not None:
            return refused
        if self._token is None or self.bearer_ok(request):
            return None
        session = self.session(request)
        if session is None:
            return error_response(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                                  headers={"WWW-Authenticate": 'Bearer realm="eventrelay"'})
        if request.method not in _SAFE_METHODS and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, "").encode(), session.csrf.encode()):
            return error_response(403, f"missing or wrong {CSRF_HEADER} header: reload the console's page")
        return None

    def denied_origin(self, request: web.BaseRequest) -> web.Response | None:
        """A 403 for a state-changing request from another origin's page, else None: a page of another site
        open in the operator's browser must not drive the API, token or not."""
        if request.method in _SAFE_METHODS or _same_origin(request):
            return None
        return error_response(403, "a request from another origin's page may not change anything here")

    def bearer_ok(self, request: web.BaseRequest) -> bool:
        if self._token is None:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    def token_ok(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(given.encode(), self._token)

    # -- console sessions -------------------------------------------------------------------------------------

    def start_session(self, now: float | None = None) -> tuple[str, Session]:
        """A new session: the cookie's value, and the session."""
        expires = int((now if now is not None else time.time()) + SESSION_TTL)
        nonce = secrets.token_urlsafe(18)
        signed = f"{expires}.{nonce}"
        return f"{signed}.{self._sign(signed)}", Session(nonce, float(expires), self._csrf(nonce))

    def session(self, request: web.BaseRequest) -> Session | None:
        """The request's valid session, or None (no cookie, forged, expired, logged out, or no token set)."""
        value = request.cookies.get(SESSION_COOKIE)
        if self._token is None or not value or value.count(".") != 2:
            return None
        expires_text, nonce, signature = value.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{expires_text}.{nonce}")) or not expires_text.isdigit():
            return None
        expires = float(expires_text)
        if expires <= time.time() or nonce in self._logged_out:
            return None
        return Session(nonce, expires, self._csrf(nonce))

    def end_session(self, session: Session) -> None:
        now = time.time()
        self._logged_out = {n: at for n, at in self._logged_out.items() if at > now}
        if len(self._logged_out) < _MAX_LOGGED_OUT:
            self._logged_out[session.nonce] = session.expires

    def _sign(self, text: str) -> str:
        return _b64(hmac.digest(self._key, b"session." + text.encode(), "sha256"))

    def _csrf(self, nonce: str) -> str:
        return _b64(hmac.digest(self._key, b"csrf." + nonce.encode(), "sha256"))


def fingerprint(token: str) -> str:
    """A short, one-way name for a token, to tell tokens apart in logs without showing them."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def secure_request(request: web.BaseRequest) -> bool:
    """The browser reached us over TLS: directly, or through a proxy that says so."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def _same_origin(request: web.BaseRequest) -> bool:
    """The request does not come from another origin's page. Browsers send Origin (and Sec-Fetch-Site) with
    every cross-origin POST; clients that are not browsers (curl, the CLI, producers) send neither."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc.lower() == (request.host or "").lower()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
