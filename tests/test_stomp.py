"""STOMP delivery against real brokers (ActiveMQ, RabbitMQ), read back with an independent client (stomp.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

import pytest
import stomp

from .conftest import free_port, wait_for


class Collector(stomp.ConnectionListener):
    def __init__(self) -> None:
        self.messages: list[tuple[dict[str, str], str]] = []
        self.lock = threading.Lock()

    def on_message(self, frame: Any) -> None:
        with self.lock:
            self.messages.append((dict(frame.headers), frame.body))


def consume(broker: Any, destination: str, expect: int, timeout: float = 15.0, settle: float = 0.0,
            vhost: str | None = None) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """Subscribe with stomp.py, wait for `expect` messages (and `settle` seconds more for extras), return them."""
    conn = stomp.Connection([("127.0.0.1", broker.port)], vhost=vhost or "localhost", heartbeats=(0, 0))
    collector = Collector()
    conn.set_listener("collector", collector)
    conn.connect(broker.username, broker.password, wait=True)
    conn.subscribe(destination, id="1", ack="auto")
    deadline = time.monotonic() + timeout
    while len(collector.messages) < expect and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(settle)
    conn.disconnect()
    return [(h, json.loads(b)) for h, b in collector.messages]


def stomp_integration(name: str, broker: Any, destination: str, *, addresses: list[str] | None = None,
                      **conf: Any) -> dict[str, Any]:
    return {"name": name, "integration_type": "stomp", "observes": ["order.*", "customer.*"],
            "configuration": {"addresses": addresses or [f"stomp://127.0.0.1:{broker.port}"],
                              "destination": destination, "username": broker.username,
                              "password": broker.password, "heartbeat": "1s", **conf}}


FAST = {"timeout": "3s", "retry": {"initial": "200ms", "max_interval": "1s", "max_age": "1h"}}


def queue() -> str:
    return f"/queue/er.{uuid.uuid4().hex[:10]}"


async def test_events_arrive_persistent_with_headers(start_daemon, activemq) -> None:
    dest = queue()
    d = await start_daemon([stomp_integration("crm", activemq, dest)], delivery=FAST,
                           event_source="eventrelay://shop-1")
    await d.post([{"id": f"s{i}", "type": "customer.updated", "data": {"type": "customer", "id": f"c{i}"}}
                  for i in range(20)])
    await wait_for(d.states, {"delivered": 20}, timeout=20)
    messages = await asyncio.to_thread(consume, activemq, dest, 20)
    assert sorted(body["id"] for _, body in messages) == sorted(f"s{i}" for i in range(20))
    headers, body = next(m for m in messages if m[1]["id"] == "s3")
    assert body["specversion"] == "1.0" and body["type"] == "customer.updated"
    assert body["source"] == "eventrelay://shop-1" and body["data"] == {"type": "customer", "id": "c3"}
    assert headers["persistent"] == "true" and headers["content-type"].startswith("application/json")
    assert headers["type"] == "customer.updated" and headers["id"] == "s3"
    assert "storeid" not in body and "storeid" not in headers  # only when store_id is configured


async def test_store_id_travels_as_storeid_in_body_and_header(start_daemon, activemq) -> None:
    dest = queue()
    d = await start_daemon([stomp_integration("crm", activemq, dest)], delivery=FAST, store_id="store-42")
    await d.post({"id": "st1", "type": "customer.updated", "data": {"type": "customer", "id": "c1"}})
    ((headers, body),) = await asyncio.to_thread(consume, activemq, dest, 1)
    assert body["storeid"] == headers["storeid"] == "store-42"


async def test_broker_down_then_back_loses_nothing(start_daemon, activemq) -> None:
    dest = queue()
    d = await start_daemon([stomp_integration("crm", activemq, dest)], delivery=FAST)
    await d.post([{"id": f"before{i}", "type": "order.paid", "data": {}} for i in range(5)])
    await wait_for(d.states, {"delivered": 5}, timeout=20)
    await asyncio.to_thread(activemq.stop)
    await d.post([{"id": f"during{i}", "type": "order.paid", "data": {}} for i in range(10)])
    await asyncio.sleep(10)  # the broker stays down for 10 s: attempts fail, nothing is marked delivered
    assert await d.states() == {"delivered": 5, "pending": 10}
    errors = {a.error_detail for a in await d.attempts() if not a.succeeded}
    assert errors and all("broker" in e for e in errors), errors
    await asyncio.to_thread(activemq.start)
    await wait_for(d.states, {"delivered": 15}, timeout=40)
    # Every job marked delivered is on the broker (persistent: the 5 from before survived the restart too).
    received = {body["id"] for _, body in await asyncio.to_thread(consume, activemq, dest, 15, 20, 0.5)}
    assert received == {f"before{i}" for i in range(5)} | {f"during{i}" for i in range(10)}


async def test_error_frame_fails_the_attempt_with_the_brokers_message(start_daemon, rabbitmq) -> None:
    # RabbitMQ answers a SEND to an exchange that does not exist with an ERROR frame (and closes).
    d = await start_daemon([stomp_integration("bad-dest", rabbitmq, "/exchange/no-such-exchange",
                                              vhost=rabbitmq.vhost)], delivery=FAST)
    await d.post({"id": "e1", "type": "order.paid", "data": {}})
    await wait_for(d.attempts, lambda attempts: len(attempts) >= 1, timeout=20)
    error = (await d.attempts())[0].error_detail
    assert error.startswith("the broker refused the message (ERROR frame): not_found"), error
    assert await d.states() == {"pending": 1}


async def test_bad_credentials_are_reported_and_nothing_is_delivered(start_daemon, activemq) -> None:
    d = await start_daemon([stomp_integration("crm", activemq, queue(), password="wrong")], delivery=FAST)
    await d.post({"id": "e1", "type": "order.paid", "data": {}})
    await wait_for(d.attempts, lambda attempts: len(attempts) >= 1, timeout=20)
    error = (await d.attempts())[0].error_detail
    assert error.startswith("not connected to any broker"), error
    assert await d.states() == {"pending": 1}
    # What the broker said in its ERROR frame, not stompman's ConnectionLostOnLifespanEnter.
    assert "User name [eventrelay] or password is invalid." in error, error
    assert "ConnectionLostOnLifespanEnter" not in error
    last_error = (await d.jobs())[0].last_error
    assert "User name [eventrelay] or password is invalid." in last_error, last_error


async def test_rabbitmq_refusing_the_login_says_why(start_daemon, rabbitmq) -> None:
    d = await start_daemon([stomp_integration("crm", rabbitmq, queue(), vhost=rabbitmq.vhost, password="wrong")],
                           delivery=FAST)
    await d.post({"id": "e1", "type": "order.paid", "data": {}})
    await wait_for(d.attempts, lambda attempts: len(attempts) >= 1, timeout=20)
    error = (await d.attempts())[0].error_detail
    assert error.startswith("not connected to any broker"), error
    assert "the broker refused the connection (ERROR frame)" in error, error
    assert "Access refused for user 'eventrelay'" in error and "ConnectionLostOnLifespanEnter" not in error, error
    last_error = (await d.jobs())[0].last_error
    assert "Access refused for user 'eventrelay'" in last_error, last_error
    assert await d.states() == {"pending": 1}


async def test_failover_to_the_next_address(start_daemon, activemq) -> None:
    dest = queue()
    dead = f"stomp://127.0.0.1:{free_port()}"
    d = await start_daemon([stomp_integration("crm", activemq, dest,
                                              addresses=[dead, f"stomp://127.0.0.1:{activemq.port}"])],
                           delivery=FAST)
    await d.post({"id": "fo", "type": "order.paid", "data": {}})
    await wait_for(d.states, {"delivered": 1}, timeout=20)
    assert [b["id"] for _, b in await asyncio.to_thread(consume, activemq, dest, 1)] == ["fo"]


async def test_tls_with_a_private_ca(start_daemon, activemq_tls) -> None:
    dest = queue()
    tls_address = [f"stomp+ssl://127.0.0.1:{activemq_tls.tls_port}"]
    d = await start_daemon([
        stomp_integration("trusted", activemq_tls, dest, addresses=tls_address, ca_file=str(activemq_tls.ca_file)),
        stomp_integration("untrusted", activemq_tls, queue(), addresses=tls_address),
    ], delivery=FAST)
    await d.post({"id": "t1", "type": "order.paid", "data": {}})
    await wait_for(lambda: d.states("trusted"), {"delivered": 1}, timeout=20)
    await wait_for(lambda: d.attempts("untrusted"), lambda attempts: len(attempts) >= 1, timeout=20)
    error = (await d.attempts("untrusted"))[0].error_detail
    assert "CERTIFICATE_VERIFY_FAILED" in error, error
    assert [b["id"] for _, b in await asyncio.to_thread(consume, activemq_tls, dest, 1)] == ["t1"]


async def test_rabbitmq_with_a_vhost(start_daemon, rabbitmq) -> None:
    dest = queue()
    d = await start_daemon([stomp_integration("crm", rabbitmq, dest, vhost=rabbitmq.vhost)], delivery=FAST)
    await d.post([{"id": f"r{i}", "type": "order.paid", "data": {}} for i in range(5)])
    await wait_for(d.states, {"delivered": 5}, timeout=20)
    received = await asyncio.to_thread(consume, rabbitmq, dest, 5, 15, 0, rabbitmq.vhost)
    assert sorted(b["id"] for _, b in received) == [f"r{i}" for i in range(5)]


@pytest.mark.parametrize("heartbeat", ["1s"])
async def test_a_silent_broker_is_noticed_by_heartbeats(start_daemon, activemq, heartbeat: str) -> None:
    """kill -9 of the broker: no FIN may reach us in real networks; heart-beats must notice and reconnect."""
    dest = queue()
    d = await start_daemon([stomp_integration("crm", activemq, dest, heartbeat=heartbeat)], delivery=FAST)
    await d.post({"id": "k0", "type": "order.paid", "data": {}})
    await wait_for(d.states, {"delivered": 1}, timeout=20)
    await asyncio.to_thread(activemq.kill)
    await d.post({"id": "k1", "type": "order.paid", "data": {}})
    await asyncio.sleep(3)
    assert await d.states() == {"delivered": 1, "pending": 1}
    await asyncio.to_thread(activemq.start)
    await wait_for(d.states, {"delivered": 2}, timeout=40)
    ids = {b["id"] for _, b in await asyncio.to_thread(consume, activemq, dest, 2)}
    assert "k1" in ids


async def test_a_dead_broker_is_a_few_failures_not_one_per_job(start_daemon, activemq) -> None:
    dest = queue()
    d = await start_daemon([stomp_integration("crm", activemq, dest)], delivery={
        **FAST, "timeout": "1s", "concurrency": 4, "breaker": {"failures": 4, "cooldown": "1s"}})
    await asyncio.to_thread(activemq.stop)
    await d.post([{"id": f"x{i}", "type": "order.paid", "data": {}} for i in range(30)])
    await asyncio.sleep(4)
    attempts = len(await d.attempts())
    # The circuit opens after 4 failures (4 were in flight together); then one probe per cool-down
    # (1 s, 2 s): not 30 jobs retried every second.
    assert 4 <= attempts <= 4 + 4, attempts
    await asyncio.to_thread(activemq.start)
    await wait_for(d.states, {"delivered": 30}, timeout=40)
