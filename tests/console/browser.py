"""Browser tests of the web console: Debian's Chromium driven by Selenium, headless, reaching 127.0.0.1 only.

A test takes the `browser` fixture (import it from here) and gets a `Browser`: the WebDriver, the page's console
errors (CSP violations included), every URL the page requested, and bounded waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

WINDOW = (1400, 1000)
PAGE_LOAD_TIMEOUT = 20.0  # seconds: driver.get() fails instead of hanging the test on a page that never loads
T = TypeVar("T")

# Polling hits transient DOM states: an element not there yet, or replaced between finding and reading it.
_TRANSIENT = (NoSuchElementException, StaleElementReferenceException)


class BrowserMissing(RuntimeError):
    """Chromium or its WebDriver is not installed."""


class Browser:
    """A started Chromium; `quit()` (or the `browser` fixture) ends it."""

    def __init__(self, driver: webdriver.Chrome, dead_proxy: socket.socket,
                 scratch: tempfile.TemporaryDirectory[str]) -> None:
        self.driver = driver
        self._dead_proxy = dead_proxy
        self._scratch = scratch
        # get_log() drains the driver's buffers, so what each call returns is kept here.
        self._console: list[dict[str, Any]] = []
        self._requests: list[str] = []

    def console_errors(self) -> list[str]:
        """Console messages at level SEVERE since the start: script errors, failed loads, CSP violations."""
        self._console.extend(self.driver.get_log("browser"))
        return [entry["message"] for entry in self._console if entry["level"] == "SEVERE"]

    def requests(self) -> list[str]:
        """Every URL the browser's pages asked for since the start, in order (blocked or failed ones too)."""
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self._requests.append(message["params"]["request"]["url"])
        return list(self._requests)

    def wait_for(self, css: str, timeout: float = 10.0) -> WebElement:
        """The first element matching `css`, once there is one."""
        return self.wait_until(lambda: self.driver.find_element(By.CSS_SELECTOR, css), timeout,
                               what=f"an element matching {css!r}")

    def wait_text(self, css: str, text: str, timeout: float = 10.0) -> WebElement:
        """The first element matching `css`, once its visible text contains `text`."""
        last: list[str] = []

        def has_text() -> WebElement | None:
            element = self.driver.find_element(By.CSS_SELECTOR, css)
            last[:] = [element.text]
            return element if text in element.text else None

        return self.wait_until(has_text, timeout,
                               what=lambda: f"{text!r} in {css!r} (last text: {last[0] if last else None!r})")

    def wait_until(self, predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
                   what: str | Callable[[], str] = "the condition") -> T:
        """Poll `predicate()` until it returns something truthy, and return that; fail the test after `timeout`
        seconds, showing the console errors (the usual reason a page never gets there)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(*_TRANSIENT):
                if result := predicate():
                    return result
            if time.monotonic() > deadline:
                described = what() if callable(what) else what
                raise AssertionError(f"{described} not met within {timeout}s; "
                                     f"console errors: {self.console_errors()!r}")
            time.sleep(interval)

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            raise AssertionError(f"the browser could not write a screenshot to {path}")
        return path

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            self._dead_proxy.close()
            self._scratch.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()


def _dead_proxy() -> socket.socket:
    """A port on 127.0.0.1 bound but never listening: every connection to it is refused at once. A fixed port
    such as 9 could have a listener (inetd's discard), and requests to it would then hang instead of failing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _options(proxy_port: int, chromium: str) -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs the tests as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",  # containers' /dev/shm is small; Chromium crashes when it fills
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        # Every request goes to a proxy that refuses connections, so nothing reaches the network (and no host
        # name is resolved). Chromium never proxies loopback (localhost, 127.0.0.0/8, [::1]), so the console
        # under test stays reachable. Do not add `--proxy-bypass-list=<-loopback>`: it sends loopback to the proxy.
        f"--proxy-server=127.0.0.1:{proxy_port}",
    ):
        options.add_argument(argument)
    # WebRTC sends STUN over UDP straight to any address a page names, whatever the proxy; this keeps it off.
    options.add_experimental_option("prefs", {"webrtc.ip_handling_policy": "disable_non_proxied_udp"})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return options


def missing_browser() -> str | None:
    """What to install when Chromium or its WebDriver is not on PATH; None when both are."""
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    if not missing:
        return None
    return (f"{' and '.join(missing)} not found on PATH: the console's browser tests need Debian's chromium and "
            "chromium-driver; run `make test` (which installs them) or `sudo sh .ci/install-services.sh`")


def start_browser() -> Browser:
    """Start headless Chromium. Both paths are given explicitly: Selenium then skips Selenium Manager, which would
    otherwise try to download a driver and a browser (and report usage to its telemetry)."""
    if problem := missing_browser():
        raise BrowserMissing(problem)
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver  # for the type checker: missing_browser() found both
    # The browser's profile and the singleton socket directory Chromium leaves behind on every quit go here,
    # removed with it, rather than piling up in /tmp.
    scratch = tempfile.TemporaryDirectory(prefix="eventrelay-browser-", ignore_cleanup_errors=True)
    proxy = _dead_proxy()
    try:
        service = Service(executable_path=chromedriver, env={**os.environ, "TMPDIR": scratch.name})
        driver = webdriver.Chrome(options=_options(proxy.getsockname()[1], chromium), service=service)
    except BaseException:
        proxy.close()
        scratch.cleanup()
        raise
    started = Browser(driver, proxy, scratch)
    try:
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)
        driver.set_script_timeout(PAGE_LOAD_TIMEOUT)
    except BaseException:
        started.quit()
        raise
    return started


@pytest.fixture
def browser() -> Iterator[Browser]:
    if problem := missing_browser():
        pytest.fail(problem, pytrace=False)
    with start_browser() as started:
        yield started
