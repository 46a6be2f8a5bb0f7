"""What receivers written for Elastic Path get: the envelope they parse, checked by one written like theirs.

The receiver is a Node.js program (tests/receivers/elastic_path_receiver.js) that reads deliveries the
way Elastic Path's public example receivers do: `JSON.parse(body.resources)` for an order or a product,
`resources.id` for a deleted resource, and a 500 for anything else.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Receiver, wait_for, wait_until, webhook

NODE_RECEIVER = Path(__file__).parent / "receivers" / "elastic_path_receiver.js"
SECRET = "secret_squirrel"


class NodeReceiver:
    def __init__(self, process: asyncio.subprocess.Process, port: int):
        self.process = process
        self.url = f"http://127.0.0.1:{port}/hooks"
        self.lines: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(json.loads(line))


@pytest.fixture
async def node_receiver() -> AsyncIterator[NodeReceiver]:
    node = shutil.which("node")
    assert node, "Node.js is needed for this test (Debian: apt install nodejs)"
    process = await asyncio.create_subprocess_exec(node, str(NODE_RECEIVER), stdout=asyncio.subprocess.PIPE,
                                                   env={"MOLTIN_WEBHOOK_SECRET": SECRET})
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), 10)
    receiver = NodeReceiver(process, json.loads(first)["port"])
    yield receiver
    process.terminate()
    await process.wait()
    receiver._reader.cancel()


def order(n: int) -> dict[str, Any]:
    return {"id": f"evt-order-{n}", "type": "order.paid",
            "data": {"type": "order", "id": f"o-{n}", "status": "complete", "payment": "paid",
                     "customer": {"name": "Ron Swanson", "email": f"ron{n}@example.com"},
                     "meta": {"display_price": {"with_tax": {"amount": 10000, "currency": "GBP",
                                                             "formatted": "£100.00"}}}},
            "included": {"items": [{"type": "order_item", "id": f"item-{n}-{i}", "quantity": 1}
                                   for i in range(2)]}}


def product(n: int, action: str) -> dict[str, Any]:
    data = {"type": "product", "id": f"p-{n}"}
    if action != "deleted":
        data["name"] = f"Spam Fritters {n} 🍳"
    return {"id": f"evt-product-{action}-{n}", "type": f"product.{action}", "data": data}


async def test_receivers_written_for_elastic_path_read_every_delivery(start_daemon, node_receiver) -> None:
    events = [order(n) for n in range(10)] + [product(n, "updated") for n in range(5)] + \
             [product(n, "deleted") for n in range(5)]
    d = await start_daemon([webhook("shop", node_receiver.url, ["order.paid", "product.*"],
                                    configuration={"url": node_receiver.url, "secret_key": SECRET})])
    status, answer = await d.post(events)
    assert status == 202, answer
    await wait_until(lambda: len(node_receiver.lines) >= len(events), timeout=20)
    assert all(line["ok"] for line in node_receiver.lines), node_receiver.lines
    read = {line["event"]: line["read"] for line in node_receiver.lines}
    for n in range(10):
        assert read[f"evt-order-{n}"] == {"type": "order", "trigger": "paid", "id": f"o-{n}",
                                          "email": f"ron{n}@example.com", "total": "£100.00",
                                          "items": [f"item-{n}-0", f"item-{n}-1"]}
    for n in range(5):
        assert read[f"evt-product-updated-{n}"] == {"type": "product", "trigger": "updated", "id": f"p-{n}",
                                                    "name": f"Spam Fritters {n} 🍳"}
        assert read[f"evt-product-deleted-{n}"] == {"type": "product", "trigger": "deleted", "id": f"p-{n}",
                                                    "resourceType": "product"}
    # Every one of them on the first attempt: none was answered 500 and retried.
    await wait_for(d.attempts, lambda attempts: len(attempts) == 20)
    attempts = await d.attempts()
    assert (len(attempts), sum(a.succeeded for a in attempts)) == (20, 20)


async def test_the_envelope_has_elastic_paths_documented_shapes(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([webhook("shop", receiver.url, ["order.paid", "product.*"])])
    sent = order(1)
    assert (await d.post([sent, product(2, "deleted")]))[0] == 202
    await wait_until(lambda: len(receiver.requests) == 2)
    bodies = {r.json["triggered_by"]: r.json for r in receiver.requests}

    paid = bodies["order.paid"]
    assert list(paid) == ["id", "triggered_by", "attempt", "integration", "resources", "payload"]
    assert isinstance(paid["resources"], str)
    assert json.loads(paid["resources"]) == paid["payload"] == {"data": sent["data"], "included": sent["included"]}

    # A deleted resource: the bare identifier in both, and `resources` an object, not a string.
    deleted = bodies["product.deleted"]
    assert deleted["payload"] == deleted["resources"] == {"type": "product", "id": "p-2"}


async def test_resources_can_be_turned_off_to_halve_the_body(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([webhook("shop", receiver.url, configuration={"url": receiver.url,
                                                                          "send_resources": False})])
    assert (await d.post(order(3)))[0] == 202
    await wait_until(lambda: receiver.requests)
    body = receiver.requests[0].json
    assert "resources" not in body
    assert body["payload"]["data"]["id"] == "o-3"
