"""Which integrations an event reaches, in a running daemon: filters at ingest, a filter changed by reload,
events no integration wants (stored, counted), and the catalogue the admin API lists."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from .conftest import Receiver, wait_for, webhook
from .test_reload import rewrite

pytestmark = pytest.mark.engines("sqlite", "postgresql")


def metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


async def test_filters_choose_at_ingest_and_a_reload_changes_them_for_new_events(
        start_daemon, receiver: Receiver, tmp_path: Path) -> None:
    receiver.respond = lambda r: web.Response(status=204)
    d = await start_daemon([webhook("erp", receiver.url + "/erp", filter={"data.total": {"$gte": 100}}),
                            webhook("all", receiver.url + "/all", observes=["customer.updated"])],
                           event_types=["loyalty-points.created"])
    await d.post([{"id": "small", "type": "order.paid", "data": {"total": 50}},
                  {"id": "big", "type": "order.paid", "data": {"total": 150}},
                  {"id": "no-total", "type": "order.paid", "data": {}},
                  {"id": "points", "type": "loyalty-points.created", "data": {}},
                  {"id": "new-kind", "type": "wishlist.created", "data": {}}])  # undeclared: accepted anyway
    await wait_for(lambda: d.states(), {"delivered": 1}, timeout=10)
    assert [r.json["id"] for r in receiver.requests] == ["big"]
    assert (await d.store.event("small")) is not None  # stored all the same, with no job
    text = await (await d.http.get(d.url + "/metrics")).text()
    assert metric(text, 'eventrelay_events_unrouted_total{listener="http",type="order.paid"}') == 2
    assert metric(text, 'eventrelay_events_unrouted_total{listener="http",type="wishlist.created"}') == 1
    assert metric(text, 'eventrelay_events_accepted_total{listener="http",type="order.paid"}') == 3

    # The admin API shows the filter; a reload that changes it applies to the events that come next.
    body = await (await d.http.get(d.url + "/v1/integrations/erp")).json()
    assert body["data"]["filter"] == {"data.total": {"$gte": 100}}
    rewrite(tmp_path / "config.yaml",
            lambda raw: raw["integrations"][0].update(filter={"data.total": {"$lt": 100}}))
    assert (await d.service.reload()).ok
    await d.post([{"id": "small-2", "type": "order.paid", "data": {"total": 50}},
                  {"id": "big-2", "type": "order.paid", "data": {"total": 150}}])
    await wait_for(lambda: d.states(), {"delivered": 2}, timeout=10)
    assert [r.json["id"] for r in receiver.requests] == ["big", "small-2"]


async def test_the_catalogue_lists_every_type_and_who_observes_it(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url, observes=["order.*"]),
                            webhook("crm", receiver.url, observes=["customer.updated", "loyalty-points.created"])],
                           event_types=["loyalty-points.created"])
    body = await (await d.http.get(d.url + "/v1/event-types")).json()
    types = {t["type"]: t for t in body["data"]}
    assert types["order.paid"] == {"type": "order.paid", "source": "elastic-path", "observed_by": ["erp"]}
    assert types["customer.updated"]["observed_by"] == ["crm"]
    assert types["loyalty-points.created"] == {"type": "loyalty-points.created", "source": "config",
                                               "observed_by": ["crm"]}
    assert types["cart.deleted"]["observed_by"] == []
    assert list(types) == sorted(types)


def test_check_config_explains_where_an_event_would_go(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from .conftest import REPO, write_config

    config = write_config(tmp_path, [webhook("big-orders", "http://127.0.0.1:9/a", filter={"data.total": {"$gte": 100}}),
                                     webhook("all-orders", "http://127.0.0.1:9/b", observes=["order.*"]),
                                     webhook("customers", "http://127.0.0.1:9/c", observes=["customer.*"]),
                                     webhook("off", "http://127.0.0.1:9/d", enabled=False)])
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"type": "order.paid", "data": {"total": 20}}))
    done = subprocess.run([sys.executable, "-m", "eventrelay", "check-config", "--config", str(config), "--explain",
                           str(event)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [
        "order.paid:",
        '  big-orders: no: its filter refuses it ({"data.total":{"$gte":100}})',
        "  all-orders: yes",
        "  customers: no: observes customer.*",
        "  off: no: disabled in the configuration",
        "reaches 1 integration(s)"]
    event.write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "eventrelay", "check-config", "--config", str(config), "--explain",
                           str(event)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1 and str(event) in done.stderr


async def test_the_cli_lists_the_catalogue_and_the_audit_log(start_daemon, receiver: Receiver, tmp_path: Path) -> None:
    import asyncio
    import subprocess
    import sys

    from .conftest import REPO

    d = await start_daemon([webhook("erp", receiver.url, observes=["order.paid"])])
    async with d.http.post(d.url + "/v1/integrations/erp/pause") as r:
        assert r.status == 200

    def run(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-m", "eventrelay", *argv, "--url", d.url], capture_output=True,
                              text=True, timeout=60, cwd=REPO, env={**__import__("os").environ, "EVENTRELAY_TOKEN": ""})
        assert done.returncode == 0, done.stderr
        return done.stdout

    events = await asyncio.to_thread(run, "events")
    assert "order.paid" in events and "erp" in events and "cart.updated" not in events
    assert "cart.updated" in await asyncio.to_thread(run, "events", "--all")
    audit = await asyncio.to_thread(run, "audit")
    assert "pause" in audit and "erp" in audit and "open" in audit
