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
