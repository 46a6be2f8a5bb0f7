"""Who may use the HTTP listener, and for what: tokens with a scope (auth.ingest_tokens may send events,
auth.admin_tokens and listen.token everything), or a browser with a console session made from an admin token;
and no browser page of another origin may make it change anything.

Sessions are signed, not stored: the cookie holds an expiry, a random nonce and the fingerprint of the admin
token it was made from, signed with a key derived from that token. So they survive a restart, are good on
every daemon that has the token, and end when the token is removed (rotation ends only the old token's).
The CSRF token a session's state-changing requests must carry is derived the same way. A logout is
remembered (in memory) until the session would have expired.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

from aiohttp import web

from .ingest.errors import error_response

ADMIN, INGEST, OPEN = "admin", "ingest", "open"  # OPEN: no token is configured at all
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
    fingerprint: str  # of the admin token it was made from


class Caller(NamedTuple):
    """Who a granted request is: the scope it was granted with and the token's fingerprint (None without one)."""

    scope: str
    fingerprint: str | None
    session: bool = False  # through the console's session cookie


CALLER = web.RequestKey("caller", Caller)  # who a request is, once access is granted


class Access:
    """The listener's access rules, updated on reload."""

    def __init__(self, ingest_tokens: Sequence[str] = (), admin_tokens: Sequence[str] = (),
                 open_hosts: frozenset[str] | None = None):
        self._logged_out: dict[str, float] = {}  # nonce -> when its session would have expired
        self.update(ingest_tokens, admin_tokens, open_hosts)

    def update(self, ingest_tokens: Sequence[str], admin_tokens: Sequence[str],
               open_hosts: frozenset[str] | None = None) -> None:
        """`open_hosts`: without tokens, the host names a request may name (loopback's, the listen address);
        None lets any through (auth.allow_unauthenticated said so)."""
        self._open_hosts = open_hosts
        self._tokens = [(t.encode(), INGEST) for t in ingest_tokens] + [(t.encode(), ADMIN) for t in admin_tokens]
        self._keys = {fingerprint(t): hmac.digest(t.encode(), b"eventrelay console session", "sha256")
                      for t in admin_tokens}  # fingerprint -> session key, per admin token

    @property
    def open(self) -> bool:
        """No token is configured: the listener is open to whoever reaches it (127.0.0.1 by default)."""
        return not self._tokens

    def denied(self, request: web.BaseRequest, need: str = ADMIN) -> web.Response | None:
        """Why the request may not go on (a 401 or 403 answer), or None when it may; then request[CALLER]
        says who it is. `need`: the scope the route needs (ADMIN, or INGEST for sending events)."""
        if (refused := self.denied_origin(request)) is not None:
            return refused
        if not self._tokens:
            if self._open_hosts is not None and _from_browser(request) and \
                    _host_name(request) not in self._open_hosts:
                # A page whose name was re-pointed at 127.0.0.1 (DNS rebinding) would pass the origin check.
                # Only browsers are asked: producers may call the daemon by any name their hosts file gives it.
                return error_response(403, f"Host {request.host!r} does not name this listener: call it by its "
                                           "address or localhost (or set a token)")
            request[CALLER] = Caller(OPEN, None)
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given.strip():
            matched = self._match(given.strip())
            if matched is not None:
                scope, token = matched
                if scope == INGEST and need == ADMIN:
                    return error_response(403, "this token may only send events (an ingest token): this needs an "
                                               "admin token (auth.admin_tokens)")
                request[CALLER] = Caller(scope, fingerprint(token))
                return None
        session = self.session(request) if need == ADMIN else None
        if session is None:
            return error_response(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                                  headers={"WWW-Authenticate": 'Bearer realm="eventrelay"'})
        if request.method not in _SAFE_METHODS and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, "").encode(), session.csrf.encode()):
            return error_response(403, f"missing or wrong {CSRF_HEADER} header: reload the console's page")
        request[CALLER] = Caller(ADMIN, session.fingerprint, session=True)
        return None

    def denied_origin(self, request: web.BaseRequest) -> web.Response | None:
        """A 403 for a state-changing request from another origin's page, else None: a page of another site
        open in the operator's browser must not drive the API, token or not."""
        if request.method in _SAFE_METHODS or _same_origin(request):
            return None
        return error_response(403, "a request from another origin's page may not change anything here")

    def _match(self, given: str) -> tuple[str, str] | None:
        """The scope and token `given` is, comparing it with every token in constant time (no early exit: how
        long it takes says nothing of which token, if any, came close)."""
        raw, found = given.encode(), None
        for token, scope in self._tokens:
            if hmac.compare_digest(raw, token):
                found = (scope, token.decode())
        return found

    def admin_token(self, given: str) -> str | None:
        """`given`, if it is an admin token (the console's login)."""
        matched = self._match(given)
        return matched[1] if matched is not None and matched[0] == ADMIN else None

    # -- console sessions -------------------------------------------------------------------------------------

    def start_session(self, token: str, now: float | None = None) -> tuple[str, Session]:
        """A new session made from admin token `token`: the cookie's value, and the session."""
        expires = int((now if now is not None else time.time()) + SESSION_TTL)
        nonce, print_ = secrets.token_urlsafe(18), fingerprint(token)
        signed = f"{expires}.{nonce}.{print_}"
        key = self._keys[print_]
        return f"{signed}.{_sign(key, signed)}", Session(nonce, float(expires), _csrf(key, nonce), print_)

    def session(self, request: web.BaseRequest) -> Session | None:
        """The request's valid session, or None (no cookie, forged, expired, logged out, or its token gone)."""
        value = request.cookies.get(SESSION_COOKIE)
        if not value or value.count(".") != 3:
            return None
        expires_text, nonce, print_, signature = value.split(".")
        key = self._keys.get(print_)
        if key is None or not hmac.compare_digest(signature, _sign(key, f"{expires_text}.{nonce}.{print_}")):
            return None
        if not expires_text.isdigit() or float(expires_text) <= time.time() or nonce in self._logged_out:
            return None
        return Session(nonce, float(expires_text), _csrf(key, nonce), print_)

    def end_session(self, session: Session) -> None:
        now = time.time()
        self._logged_out = {n: at for n, at in self._logged_out.items() if at > now}
        if len(self._logged_out) < _MAX_LOGGED_OUT:
            self._logged_out[session.nonce] = session.expires


def _sign(key: bytes, text: str) -> str:
    return _b64(hmac.digest(key, b"session." + text.encode(), "sha256"))


def _csrf(key: bytes, nonce: str) -> str:
    return _b64(hmac.digest(key, b"csrf." + nonce.encode(), "sha256"))


def fingerprint(token: str) -> str:
    """A short, one-way name for a token, to tell tokens apart (in the audit log) without showing them."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


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


def _from_browser(request: web.BaseRequest) -> bool:
    """Browsers send Sec-Fetch-Site with every request (and Origin with the cross-origin and POST ones);
    clients that are not browsers send neither."""
    headers = request.headers
    return "Sec-Fetch-Site" in headers or "Origin" in headers


def _host_name(request: web.BaseRequest) -> str:
    host = (request.host or "").lower()
    if host.startswith("["):  # [::1]:8787
        return host[1:host.find("]")]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


LOOPBACK_NAMES = frozenset({"127.0.0.1", "::1", "localhost"})


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
