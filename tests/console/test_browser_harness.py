"""The browser harness itself: pages served on 127.0.0.1 load under a strict CSP, violations and requests are
reported, and anything beyond loopback fails at once without reaching the network."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from .browser import Browser, BrowserMissing, browser, start_browser  # noqa: F401 (browser is a fixture)

CSP = "default-src 'none'; script-src 'self'"

STRICT_PAGE = """<!doctype html><html><head><title>strict</title></head><body>
<p id="out">nothing ran</p>
<script src="/app.js"></script>
<script>document.getElementById("out").textContent += " / inline script ran";</script>
</body></html>"""

APP_JS = 'document.getElementById("out").textContent = "same-origin script ran";'

# No CSP here: the browser itself must keep the request from leaving, not the page's policy.
OUTSIDE_PAGE = """<!doctype html><html><body><p id="out">waiting</p>
<script src="http://example.com/x.js"
        onerror="document.getElementById('out').textContent = 'outside script failed'"></script>
</body></html>"""


def _app() -> web.Application:
    async def strict(_: web.Request) -> web.Response:
        return web.Response(text=STRICT_PAGE, content_type="text/html", headers={"Content-Security-Policy": CSP})

    async def app_js(_: web.Request) -> web.Response:
        return web.Response(text=APP_JS, content_type="text/javascript")

    async def outside(_: web.Request) -> web.Response:
        return web.Response(text=OUTSIDE_PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", strict)
    app.router.add_get("/app.js", app_js)
    app.router.add_get("/outside", outside)
    return app


@pytest.fixture
def site() -> Iterator[str]:
    """The pages above on 127.0.0.1, served from a thread of their own: the browser calls block the test's thread."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(_app(), shutdown_timeout=0.5)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, name="console-test-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def test_strict_csp_page_runs_its_own_script_and_reports_the_inline_one(browser: Browser, site: str,
                                                                        tmp_path: Path) -> None:
    browser.driver.get(f"{site}/")

    assert browser.wait_text("#out", "same-origin script ran").text == "same-origin script ran"
    errors = browser.wait_until(
        lambda: [e for e in browser.console_errors() if "Content Security Policy" in e and "inline script" in e])
    assert "script-src 'self'" in errors[0]
    requested = browser.requests()
    assert f"{site}/" in requested and f"{site}/app.js" in requested
    assert all(url.startswith("http://127.0.0.1:") for url in requested), requested

    assert browser.driver.get_window_size() == {"width": 1400, "height": 1000}
    assert browser.screenshot(tmp_path / "shots" / "strict.png").read_bytes().startswith(b"\x89PNG")


def test_requests_beyond_loopback_fail_at_once(browser: Browser, site: str) -> None:
    started = time.monotonic()
    browser.driver.get(f"{site}/outside")
    browser.wait_text("#out", "outside script failed", timeout=5)
    assert time.monotonic() - started < 5

    assert "http://example.com/x.js" in browser.requests()  # asked for, so the failure below is the browser's
    failed = [e for e in browser.console_errors() if e.startswith("http://example.com/x.js")]
    assert failed and "net::ERR_PROXY_CONNECTION_FAILED" in failed[0], browser.console_errors()


def test_missing_browser_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrowserMissing, match=r"chromium and chromedriver not found.*make test"):
        start_browser()
