"""Brokers failing under the daemon: ActiveMQ killed (kill -9) and restarted while events flow; moto (SQS) restarted,
coming back without its queue (moto keeps its state in memory), then the queue recreated.

What must hold (README): a STOMP job is delivered only when the broker's RECEIPT arrives, so every job marked
delivered is on the broker even after its crash (persistent messages); failed attempts are retried until the
target is back; nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid

import aiohttp
import boto3

from eventrelay.jobs import JobState

from ..conftest import wait_for
from ..test_sqs import CREDS, sqs_integration
from ..test_stomp import stomp_integration
from ._load import Load, SqsConsumer, StompConsumer, duplicates

DELIVERY = {"timeout": "2s", "concurrency": 4,
            "retry": {"initial": "100ms", "max_interval": "500ms", "max_age": "1h"},
            "breaker": {"failures": 5, "cooldown": "300ms", "max_cooldown": "1s"}}


async def errors(d) -> list[str]:
    """The errors of the failed attempts, oldest first."""
    return [a.error_detail for a in await d.attempts() if not a.succeeded]


async def produce(d, load: Load, stop: asyncio.Event, tag: str) -> None:
    """One HTTP producer, a small batch every 20 ms, until `stop` (the daemon itself never goes away here)."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            await load.http(session, d.url, stop, 5, tag, sizes=(5,))
            await asyncio.sleep(0.02)


async def test_activemq_killed_and_restarted_while_events_flow(start_daemon, activemq) -> None:
    destination = f"/queue/kill.{uuid.uuid4().hex[:10]}"
    d = await start_daemon([stomp_integration("crm", activemq, destination)], delivery=DELIVERY)
    load = Load(random.Random(1), expected_jobs=lambda t: 1, types=("order.paid", "customer.updated"))
    stop = asyncio.Event()
    producer = asyncio.create_task(produce(d, load, stop, "amq"))
    timeline = {}
    await asyncio.sleep(1.0)
    started = time.monotonic()
    await asyncio.to_thread(activemq.kill)  # SIGKILL: no goodbye, sends and receipts in flight are cut off
    timeline["killed"] = len(load.acked)
    await asyncio.sleep(2.0)
    assert "pending" in await d.states(), "nothing waited while the broker was down"
    await asyncio.to_thread(activemq.start)  # same port, same KahaDB: persistent messages survive
    timeline["restarted"] = len(load.acked)
    restart_s = time.monotonic() - started
    await asyncio.sleep(1.0)
    stop.set()
    await producer
    assert not load.problems, load.problems[:5]
    assert not load.refused, "ingest refused events while the broker was down: it must not depend on it"

    await wait_for(d.states, lambda states: set(states) == {"delivered"}, timeout=60, interval=0.1)
    marked = {job.event_id for job in await d.jobs("crm", JobState.DELIVERED)}
    with StompConsumer(activemq, destination) as consumer:
        received = await asyncio.to_thread(consumer.wait_for, set(load.acked) | marked, 30)
    dup = duplicates(received)
    failed = await errors(d)
    print(f"\nActiveMQ kill -9 after {timeline['killed']} events, back after {restart_s:.1f}s; {len(load.acked)} "
          f"acknowledged, {len(received)} consumed, {sum(dup.values())} duplicates; {len(failed)} failed attempts: "
          f"{sorted(set(failed))}")

    assert set(load.acked) <= set(received), f"lost: {sorted(set(load.acked) - set(received))[:10]}"
    # Marked delivered = the broker sent a RECEIPT: it must have the message, kill -9 or not.
    assert marked <= set(received), f"marked delivered, not on the broker: {sorted(marked - set(received))[:10]}"
    assert set(received) <= set(load.sent)
    assert failed, "no attempt failed while the broker was down"
    pattern = re.compile(r"broker|receipt")
    assert all(pattern.search(e) for e in failed), sorted(set(failed))
    # Duplicates come only from sends whose receipt the kill cut off (retried): at most `concurrency` of them.
    assert sum(dup.values()) <= len(failed)


async def test_moto_restarted_without_the_queue_then_queue_recreated(start_daemon, moto_server) -> None:
    sqs = boto3.client("sqs", region_name="eu-west-1", endpoint_url=moto_server.endpoint_url, **CREDS)
    name = f"restart-{uuid.uuid4().hex[:10]}"
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    d = await start_daemon([sqs_integration("inventory", url, moto_server.endpoint_url)], delivery=DELIVERY)

    async def post(ids: list[str]) -> None:
        status, body = await d.post([{"id": i, "type": "order.paid", "data": {"id": i}} for i in ids])
        assert status == 202, body

    before = [f"before-{i}" for i in range(20)]
    await post(before)
    await wait_for(d.states, {"delivered": 20}, timeout=20)
    with SqsConsumer(sqs, url) as consumer:
        assert set(await asyncio.to_thread(consumer.wait_for, set(before), 20, 0.2)) == set(before)

    await asyncio.to_thread(moto_server.kill)  # crashes; it comes back empty
    down = [f"down-{i}" for i in range(20)]
    await post(down)
    await wait_for(lambda: errors(d), lambda errors: errors, timeout=10)
    await asyncio.to_thread(moto_server.start)
    missing = [f"missing-{i}" for i in range(20)]
    await post(missing)
    await wait_for(lambda: errors(d), lambda errors: any(re.search(r"NonExistentQueue|QueueDoesNotExist", e)
                                                         for e in errors), timeout=15)
    await asyncio.sleep(1.0)  # the queue stays missing a while: attempts keep failing, nothing is delivered
    assert await d.states() == {"delivered": 20, "pending": 40}
    failed = set(await errors(d))
    print(f"\nSQS errors while moto was down, then without the queue: {sorted(failed)}")
    assert all(re.search(r"^cannot reach SQS: .*(connect|endpoint)|^SQS error [\w.]*(NonExistentQueue|"
                         r"QueueDoesNotExist): .*does not exist", e, re.I) for e in failed), failed

    assert sqs.create_queue(QueueName=name)["QueueUrl"] == url
    await wait_for(d.states, {"delivered": 60}, timeout=30)
    with SqsConsumer(sqs, url) as consumer:
        received = await asyncio.to_thread(consumer.wait_for, set(down + missing), 30, 0.5)
    assert set(received) == set(down + missing)  # what moto held before its crash is gone with it
    print(f"after the queue came back: {len(received)} messages, {sum(duplicates(received).values())} duplicates")
