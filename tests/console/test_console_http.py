"""The console's access rules over plain HTTP: nothing without a session when a token is set, sessions that
end, CSRF and cross-origin requests refused, a strict Content-Security-Policy on every page and asset."""

from __future__ import annotations

import re

import aiohttp
import pytest

from ..conftest import Receiver, webhook

TOKEN = "console-token-5150"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def cookie_of(response: aiohttp.ClientResponse) -> tuple[str, str]:
    """The session cookie's value and its Set-Cookie line."""
    line = next(v for k, v in response.headers.items() if k == "Set-Cookie" and v.startswith("eventrelay_session="))
    return line.split(";")[0].split("=", 1)[1], line


async def login(d, token: str = TOKEN, headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    return await d.http.post(d.url + "/ui/login", data={"token": token}, allow_redirects=False, headers=headers)


async def session_of(d) -> tuple[dict[str, str], str]:
    """Log in; the cookie header to send and the CSRF token."""
    answer = await login(d)
    assert answer.status == 303 and answer.headers["Location"] == "/ui/"
    value, _ = cookie_of(answer)
    cookie = {"Cookie": f"eventrelay_session={value}"}
    async with d.http.get(d.url + "/ui/session", headers=cookie) as r:
        assert r.status == 200
        return cookie, (await r.json())["data"]["csrf"]


@pytest.fixture
async def d(start_daemon, receiver: Receiver):
    # A client that keeps no cookies: each request says exactly what it carries.
    daemon = await start_daemon([webhook("erp", receiver.url)], listen={"token": TOKEN})
    shared = daemon.http
    daemon.http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    yield daemon
    await daemon.http.close()
    daemon.http = shared


async def test_without_a_session_only_the_login_form_and_the_assets_are_shown(d) -> None:
    async with d.http.get(d.url + "/ui/") as r:
        page = await r.text()
        assert r.status == 200 and 'action="/ui/login"' in page and 'type="password"' in page
        assert "console.js" not in page and "erp" not in page
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    for path in ("/ui/session", "/v1/status", "/v1/integrations", "/v1/jobs", "/v1/tail", "/v1/events/x", "/metrics"):
        async with d.http.get(d.url + path) as r:
            assert r.status == 401, path
    async with d.http.post(d.url + "/v1/integrations/erp/pause") as r:
        assert r.status == 401
    # The assets carry no data: the login page needs its style.
    async with d.http.get(d.url + "/ui/static/console.css") as r:
        assert r.status == 200 and r.content_type == "text/css" and r.headers["X-Content-Type-Options"] == "nosniff"
    async with d.http.get(d.url + "/ui/static/console.js") as r:
        assert r.status == 200 and r.content_type == "text/javascript"
    for name in ("index.html", "login.html", "..%2Fconsole%2F__init__.py", "nope.js"):
        async with d.http.get(d.url + "/ui/static/" + name) as r:
            assert r.status == 404, name
    async with d.http.get(d.url + "/ui", allow_redirects=False) as r:
        assert r.status == 308 and r.headers["Location"] == "/ui/"


async def test_a_wrong_token_is_refused_and_a_good_one_starts_a_session(d) -> None:
    answer = await login(d, "guess")
    assert answer.status == 401 and "not an admin token of the daemon" in await answer.text()
    assert "Set-Cookie" not in answer.headers
    answer = await login(d)
    assert answer.status == 303
    value, line = cookie_of(answer)
    attributes = {a.strip().split("=")[0].lower() for a in line.split(";")[1:]}
    assert {"httponly", "path", "max-age", "samesite"} <= attributes and "secure" not in attributes
    assert re.search(r"SameSite=Strict", line) and "Max-Age=43200" in line
    cookie = {"Cookie": f"eventrelay_session={value}"}
    async with d.http.get(d.url + "/ui/", headers=cookie) as r:
        assert r.status == 200 and "console.js" in await r.text()
    async with d.http.get(d.url + "/v1/status", headers=cookie) as r:
        assert r.status == 200
    # Behind a TLS proxy the cookie is Secure.
    _, line = cookie_of(await login(d, headers={"X-Forwarded-Proto": "https"}))
    assert "Secure" in line


async def test_state_changes_need_the_csrf_token_and_the_same_origin(d) -> None:
    cookie, csrf = await session_of(d)
    pause = d.url + "/v1/integrations/erp/pause"
    async with d.http.post(pause, headers=cookie) as r:
        assert r.status == 403 and "X-CSRF-Token" in (await r.json())["errors"][0]["detail"]
    async with d.http.post(pause, headers={**cookie, "X-CSRF-Token": csrf[:-2] + "xx"}) as r:
        assert r.status == 403
    async with d.http.get(d.url + "/v1/status", headers=BEARER) as r:
        assert (await r.json())["data"]["integrations"][0]["paused"] is None  # refused ones changed nothing
    # A page of another site, even with the session's cookie and a good CSRF token, is refused.
    async with d.http.post(pause, headers={**cookie, "X-CSRF-Token": csrf, "Origin": "http://evil.example"}) as r:
        assert r.status == 403 and "another origin" in (await r.json())["errors"][0]["detail"]
    async with d.http.post(pause, headers={**cookie, "X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"}) as r:
        assert r.status == 403
    async with d.http.post(pause, headers={**BEARER, "Origin": "http://evil.example"}) as r:
        assert r.status == 403
    async with d.http.post(pause, headers={**cookie, "X-CSRF-Token": csrf, "Origin": d.url}) as r:
        assert r.status == 200
    async with d.http.post(d.url + "/v1/integrations/erp/resume", headers=BEARER) as r:
        assert r.status == 200  # the bearer token needs no CSRF token: it is not sent by a browser on its own


async def test_sessions_end_on_logout_on_forgery_and_when_the_token_changes(d) -> None:
    cookie, _ = await session_of(d)
    value = cookie["Cookie"].split("=", 1)[1]
    expires, nonce, token, signature = value.split(".")
    for forged in (f"{int(expires) + 3600}.{nonce}.{token}.{signature}", f"{expires}.{nonce}x.{token}.{signature}",
                   f"{expires}.{nonce}.000000000000.{signature}", "1.2.3.4", "x"):
        async with d.http.get(d.url + "/v1/status", headers={"Cookie": f"eventrelay_session={forged}"}) as r:
            assert r.status == 401, forged
    async with d.http.post(d.url + "/ui/logout", headers=cookie, allow_redirects=False) as r:
        assert r.status == 303 and "eventrelay_session=" in r.headers["Set-Cookie"]
    async with d.http.get(d.url + "/v1/status", headers=cookie) as r:
        assert r.status == 401
    # A new token (by reload) ends every session made from the old one.
    cookie, _ = await session_of(d)
    path = d.service.config.source
    path.write_text(path.read_text().replace(TOKEN, "rotated-token-0001"))
    async with d.http.post(d.url + "/v1/reload", headers=BEARER) as r:
        assert (await r.json())["data"]["ok"] is True
    async with d.http.get(d.url + "/v1/status", headers=cookie) as r:
        assert r.status == 401


async def test_without_a_token_the_console_is_open_but_other_origins_still_cannot_act(start_daemon,
                                                                                      receiver: Receiver) -> None:
    daemon = await start_daemon([webhook("erp", receiver.url)])
    async with daemon.http.get(daemon.url + "/ui/") as r:
        assert r.status == 200 and "console.js" in await r.text()
    async with daemon.http.get(daemon.url + "/ui/session") as r:
        assert (await r.json())["data"] == {"login": False, "csrf": None, "expires_at": None,
                                            "csrf_header": "X-CSRF-Token"}
    async with daemon.http.post(daemon.url + "/v1/integrations/erp/pause", headers={"Origin": "http://evil.example"},
                                data="{}") as r:
        assert r.status == 403
    async with daemon.http.post(daemon.url + "/v1/integrations/erp/pause", headers={"Origin": daemon.url}) as r:
        assert r.status == 200
    async with daemon.http.post(daemon.url + "/ui/login", data={"token": "x"}, allow_redirects=False) as r:
        assert r.status == 303  # nothing to log in to
