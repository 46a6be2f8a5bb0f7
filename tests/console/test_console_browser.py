"""The console in a real browser (Debian's headless Chromium): what an operator on call does with it.

The daemon and the receiver run on the test's event loop; Selenium's calls block, so each browser scenario
runs in a thread (`in_browser`) while the loop serves the page.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from selenium.webdriver.common.by import By

from ..conftest import REPO, Receiver, wait_for, webhook
from .browser import Browser, browser  # noqa: F401 (the fixture)

TOKEN = "night-shift-token-4711"
SCREENSHOTS = REPO / "docs" / "img"
NEVER_AGAIN_SOON = {"retry": {"initial": "1h", "max_interval": "1h"}, "breaker": {"failures": 1000, "window": 1000}}


async def in_browser(scenario: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(scenario, *args)


def post_event(url: str, event: dict[str, Any]) -> None:
    """A producer's POST from the browser's thread (the daemon's loop is busy serving)."""
    request = urllib.request.Request(f"{url}/v1/events", data=json.dumps(event).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 202


def log_in(b: Browser, url: str) -> None:
    b.driver.get(f"{url}/ui/")
    b.wait_for("#token").send_keys(TOKEN)
    b.wait_for("#login").click()
    b.wait_for("#integrations")


def confirm(b: Browser, button: str) -> None:
    """Click an action's button and say yes in its confirmation dialog."""
    b.wait_for(button).click()
    b.wait_until(lambda: b.driver.find_element(By.ID, "confirm").get_attribute("open") is not None)
    b.wait_for("#confirm-ok").click()


def row_state(b: Browser, name: str) -> str:
    return b.wait_for(f'tr[data-integration="{name}"] td.state').text


@pytest.mark.engines("sqlite", "postgresql")  # the console reads through the storage API: either engine
async def test_an_operator_finds_a_failed_delivery_retries_it_pauses_and_watches_the_live_tail(
        start_daemon, receiver: Receiver, browser: Browser) -> None:  # noqa: F811
    crm_down = {"down": True}

    def answer(r):
        if r.path.endswith("/crm") and crm_down["down"]:
            return web.Response(status=500, text="CRM database unavailable")
        return web.Response(status=204)

    receiver.respond = answer
    d = await start_daemon([webhook("erp", receiver.url, configuration={"url": receiver.url,
                                                                        "secret_key": "whsec-never-shown-9876"}),
                            webhook("crm", receiver.url + "/crm", delivery=NEVER_AGAIN_SOON)],
                           listen={"token": TOKEN})
    await d.post([{"id": "order-1001", "type": "order.paid", "data": {"id": "1001", "total": 129.5}},
                  {"id": "order-1002", "type": "order.paid", "data": {"id": "1002", "total": 12.0}}],
                 headers={"Authorization": f"Bearer {TOKEN}"})
    await wait_for(lambda: d.states(), {"delivered": 2, "pending": 2}, timeout=10)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def overview_and_event(b: Browser) -> None:
        log_in(b, d.url)
        # A healthy and a failing integration, side by side; the secret is masked.
        b.wait_until(lambda: row_state(b, "erp") == "ok" and row_state(b, "crm") == "failing")
        crm_error = b.wait_for('tr[data-integration="crm"] td.last-error').text
        assert "500" in crm_error
        assert "whsec-never-shown" not in b.driver.page_source
        b.wait_for('#tail tr[data-event="order-1002"]')  # the live tail starts with the latest attempts
        b.screenshot(SCREENSHOTS / "console-overview.png")
        # The search box finds an event by its id; its failed attempt shows the target's status code.
        search = b.wait_for("#search")
        search.send_keys("order-1001\n")
        b.wait_text("#event-id", "order-1001")
        b.wait_text("#job-crm .attempts .status-code", "500")
        assert '"total": 129.5' in b.wait_for("#payload").text
        b.screenshot(SCREENSHOTS / "console-event.png")

    await in_browser(overview_and_event, browser)

    crm_down["down"] = False

    def retry_and_pause(b: Browser) -> None:
        confirm(b, "#retry-crm")
        b.wait_until(lambda: b.wait_for("#job-crm").get_attribute("data-state") == "delivered")
        b.wait_text("#job-crm .attempts tbody tr:last-child .status-code", "204")
        # Pause and resume the integration from its page.
        b.driver.get(f"{d.url}/ui/#/integration/crm")
        confirm(b, "#action-pause")
        b.wait_text("#integration-state", "paused")

    await in_browser(retry_and_pause, browser)
    status = (await (await d.http.get(d.url + "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})).json())
    assert [i["paused"] is not None for i in status["data"]["integrations"]] == [False, True]

    def resume_and_tail(b: Browser) -> None:
        confirm(b, "#action-resume")
        b.wait_until(lambda: "paused" not in b.wait_for("#integration-state").text)
        assert b.driver.find_elements(By.ID, "action-pause")
        # The live tail shows a delivery that happens while the page is open, without a reload.
        b.driver.find_element(By.ID, "nav-overview").click()
        b.wait_for('#tail tr[data-event="order-1002"]')
        post_event(d.url, {"id": "order-1003", "type": "order.paid", "data": {"id": "1003"}})
        b.wait_for('#tail tr[data-event="order-1003"]')
        b.wait_until(lambda: "on" in b.wait_for("#live").get_attribute("class"))
        # The audit log names what was done from the console, and by which kind of caller.
        b.driver.find_element(By.ID, "nav-audit").click()
        b.wait_text('#audit tr[data-action="pause"]', "admin (console)")
        b.wait_for('#audit tr[data-action="retry"]')

    await in_browser(resume_and_tail, browser)
    status = (await (await d.http.get(d.url + "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})).json())
    assert all(i["paused"] is None for i in status["data"]["integrations"])

    errors = await in_browser(browser.console_errors)
    assert errors == []
    # Nothing left the daemon's origin (data: URLs are the browser's own icons, drawn without a request).
    requested = [u for u in await in_browser(browser.requests) if not u.startswith("data:")]
    assert requested and [u for u in requested if not u.startswith(d.url + "/")] == []


async def test_search_filters_and_retries_the_dead_jobs_it_lists(start_daemon, receiver: Receiver,
                                                                 browser: Browser) -> None:  # noqa: F811
    down = {"down": True}
    receiver.respond = lambda r: web.Response(status=503 if down["down"] else 204)
    d = await start_daemon([webhook("erp", receiver.url, delivery={"retry": {"max_attempts": 1},
                                                                  "breaker": {"failures": 1000, "window": 1000}})])
    await d.post([{"id": f"o-{i}", "type": "order.paid", "data": {}} for i in range(3)])
    await wait_for(lambda: d.states(), {"dead": 3}, timeout=10)
    down["down"] = False

    def search_and_retry(b: Browser) -> None:
        b.driver.get(f"{d.url}/ui/#/search")  # no token configured: no login
        b.wait_for("#filters select[name=integration] option[value=erp]").click()
        b.wait_for("#filters select[name=state] option[value=dead]").click()
        b.wait_for("#search-submit").click()
        b.wait_until(lambda: len(b.driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == 3)
        confirm(b, "#retry-matching")
        b.wait_text("#flash", "3 dead job(s) of erp re-queued")

    await in_browser(search_and_retry, browser)
    await wait_for(lambda: d.states(), {"delivered": 3}, timeout=10)
    assert await in_browser(browser.console_errors) == []
