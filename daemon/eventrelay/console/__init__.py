"""The operator's console: pages served at /ui/ from the daemon itself, which read and act through the admin
API in the browser (the same routes, the same storage API behind them). No CDN and no third-party code: stores
run offline, and a strict Content-Security-Policy allows nothing but this origin's own files.

When `listen.token` is set, the console first asks for it and starts a session (access.py); its pages and
assets carry no data, so the login form and the assets are served to anyone, the console page only to a
session. Every data request then goes to the admin API, which checks the session and its CSRF token.
"""

from __future__ import annotations

import asyncio
import html
from importlib.resources import files
from string import Template

from aiohttp import web

from ..access import CSRF_HEADER, SESSION_COOKIE, SESSION_TTL, Access, secure_request
from ..clock import iso_time
from ..ingest.errors import error_response

PREFIX = "/ui"
# Nothing but this origin's own scripts, styles and requests; no frames, no plugins, no inline code.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_LOGIN_BODY_MAX = 4096  # bytes of a login form at most
_WRONG_TOKEN_DELAY = 0.5  # seconds before a wrong token is answered: guessing by the form is slow


class Console:
    def __init__(self, access: Access):
        self._access = access
        static = files(__package__) / "static"
        # Read once: the assets are part of the installed package and small.
        self._assets = {f.name: f.read_bytes() for f in static.iterdir() if f.suffix in _TYPES}
        self._login = Template(self._assets.pop("login.html").decode())

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get(PREFIX, self.to_console)
        r.add_get(PREFIX + "/", self.page)
        r.add_post(PREFIX + "/login", self.login)
        r.add_post(PREFIX + "/logout", self.logout)
        r.add_get(PREFIX + "/session", self.session)
        r.add_get(PREFIX + "/static/{name}", self.asset)
        r.add_get("/favicon.ico", self.icon)  # browsers ask for it whatever the page says

    async def to_console(self, request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect(PREFIX + "/")

    async def page(self, request: web.Request) -> web.Response:
        """The console to a session (or to anyone without a token); otherwise the login form."""
        if not self._access.open and self._access.session(request) is None:
            return self._login_page(None)
        return _secured(web.Response(body=self._assets["index.html"], content_type="text/html", charset="utf-8"))

    async def login(self, request: web.Request) -> web.Response:
        if (denied := self._access.denied_origin(request)) is not None:
            return denied
        if self._access.open:
            return _to_console()
        # Read before anyone logged in: a token fits in far less (the listener's own limit is for events).
        if request.content_length is None or request.content_length > _LOGIN_BODY_MAX:
            return self._login_page("The login form sends a token of a few hundred characters at most.", status=413)
        form = await request.post()
        given = form.get("token")
        token = self._access.admin_token(given.strip()) if isinstance(given, str) else None
        if token is None:
            await asyncio.sleep(_WRONG_TOKEN_DELAY)
            return self._login_page("That is not an admin token of the daemon's configuration (auth.admin_tokens "
                                    "or listen.token).", status=401)
        cookie, _ = self._access.start_session(token)
        response = _to_console()
        response.set_cookie(SESSION_COOKIE, cookie, max_age=int(SESSION_TTL), path="/", httponly=True,
                            samesite="Strict", secure=secure_request(request))
        return response

    async def logout(self, request: web.Request) -> web.Response:
        if (denied := self._access.denied_origin(request)) is not None:
            return denied
        session = self._access.session(request)
        if session is not None:
            self._access.end_session(session)
        response = _to_console()
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def session(self, request: web.Request) -> web.Response:
        """What the console's script needs to act: the CSRF token its state-changing requests carry."""
        if self._access.open:
            return _secured(web.json_response({"data": {"login": False, "csrf": None, "expires_at": None,
                                                        "csrf_header": CSRF_HEADER}}))
        session = self._access.session(request)
        if session is None:
            return error_response(401, "log in to the console first")
        return _secured(web.json_response({"data": {"login": True, "csrf": session.csrf,
                                                    "expires_at": iso_time(session.expires),
                                                    "csrf_header": CSRF_HEADER}}))

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = self._assets.get(name)
        if body is None or name.endswith(".html"):
            return error_response(404, f"no console asset {name!r}")
        response = web.Response(body=body, content_type=_TYPES["." + name.rsplit(".", 1)[-1]], charset="utf-8")
        # Revalidated each time (the daemon may have been upgraded), and never sniffed as another type.
        response.headers["Cache-Control"] = "no-cache"
        return _secured(response)

    async def icon(self, request: web.Request) -> web.Response:
        return _secured(web.Response(body=self._assets["icon.svg"], content_type=_TYPES[".svg"],
                                     headers={"Cache-Control": "max-age=86400"}))

    def _login_page(self, message: str | None, status: int = 200) -> web.Response:
        text = self._login.substitute(message=html.escape(message) if message else "",
                                      shown="error" if message else "hidden")
        return _secured(web.Response(text=text, status=status, content_type="text/html"))


def _to_console() -> web.Response:
    return _secured(web.Response(status=303, headers={"Location": PREFIX + "/"}))


def _secured(response: web.Response) -> web.Response:
    headers = response.headers
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    # Not "no-referrer": with it, browsers send `Origin: null` on form posts, which the origin check refuses.
    headers["Referrer-Policy"] = "same-origin"
    headers.setdefault("Cache-Control", "no-store")
    return response
