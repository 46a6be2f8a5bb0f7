"""kill -9 of the daemon at random moments under mixed load, with a webhook, an SQS queue and a STOMP broker.

The README: "`kill -9` at any moment loses nothing: after a restart, every job not recorded as delivered is due
again. Deliveries in flight at the moment of a crash may be delivered twice". The dispatcher bounds what is in
flight (sent, outcome not yet committed) to UNRECORDED_FACTOR × concurrency deliveries per integration; a delivery is one job
for webhooks and STOMP, and a SendMessageBatch of up to 10 jobs for SQS.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid

import aiohttp
import boto3
import pytest
from aiohttp import web

from eventrelay.delivery.dispatcher import UNRECORDED_FACTOR

from ..conftest import Receiver, wait_until, webhook
from ..test_sqs import CREDS, sqs_integration
from ..test_stomp import stomp_integration
from ..store.sqlite_faults import integrity
from ._load import Load, SqsConsumer, StompConsumer, duplicates, nothing_pending, read_stored, spawn

CYCLES = 20
CONCURRENCY = 4
BUDGET = 40  # events per producer per cycle at most: 4 producers, so at most 160 a cycle
# The SQS queue observes a quarter of the events: moto's every call walks all the messages a queue holds
# (quadratic receives), so a backlog of thousands would measure moto, not eventrelay.
OBSERVES = {"hook": ["*"], "queue": ["order.paid"], "broker": ["order.*", "customer.*"]}
BATCH = {"hook": 1, "queue": 10, "broker": 1}  # jobs per delivery (SendMessageBatch takes 10)


def observers(event_type: str) -> set[str]:
    return {name for name, keys in OBSERVES.items()
            if "*" in keys or event_type in keys or f"{event_type.split('.')[0]}.*" in keys}


@pytest.mark.timeout(300)
async def test_kill_9_at_random_moments_loses_nothing_acknowledged(daemon_process, receiver: Receiver,
                                                                    moto_server, activemq) -> None:
    seed = int(os.environ.get("FAULTS_SEED", time.time_ns() % 2**32))
    print(f"\nseed {seed} (FAULTS_SEED={seed} to replay the same moments)")
    rng = random.Random(seed)

    async def slowish(r):
        await asyncio.sleep(rng.uniform(0, 0.004))  # keeps deliveries in flight when a kill lands
        return web.Response(status=204)

    receiver.respond = slowish
    sqs = boto3.client("sqs", region_name="eu-west-1", endpoint_url=moto_server.endpoint_url, **CREDS)
    queue_url = sqs.create_queue(QueueName=f"crash-{uuid.uuid4().hex[:10]}")["QueueUrl"]
    destination = f"/queue/crash.{uuid.uuid4().hex[:10]}"
    queue = sqs_integration("queue", queue_url, moto_server.endpoint_url)
    broker = stomp_integration("broker", activemq, destination)
    queue["observes"], broker["observes"] = OBSERVES["queue"], OBSERVES["broker"]
    d = daemon_process(
        [webhook("hook", receiver.url, OBSERVES["hook"]), queue, broker],
        delivery={"concurrency": CONCURRENCY, "timeout": "5s",
                  "breaker": {"failures": 5, "cooldown": "300ms", "max_cooldown": "1s"}})
    db = d.config.parent / "er.db"
    socket_path = d.config.parent / "er.sock"
    load = Load(rng, expected_jobs=lambda t: len(observers(t)))
    early = set(rng.sample(range(1, CYCLES), 3))  # cycles killed during start-up (recovery, backlog re-sent)
    kills = 0
    started = time.monotonic()
    # Independent consumers read the queue and the broker all along, as real ones would.
    with SqsConsumer(sqs, queue_url) as sqs_consumer, StompConsumer(activemq, destination) as stomp_consumer:
        async with aiohttp.ClientSession() as session:
            for cycle in range(CYCLES):
                if cycle in early:
                    spawn(d)
                    await asyncio.sleep(rng.uniform(0.05, 0.5))
                    await asyncio.to_thread(d.kill9)
                    kills += 1
                    continue
                await asyncio.to_thread(d.start)
                stop = asyncio.Event()
                producers = load.start(session, d.url, socket_path, stop, f"c{cycle}", budget=BUDGET)
                await asyncio.sleep(rng.uniform(0.05, 1.0))
                await asyncio.to_thread(d.kill9)
                kills += 1
                stop.set()
                await asyncio.wait_for(asyncio.gather(*producers), 30)
            crash_phase = time.monotonic() - started

            await asyncio.to_thread(d.start)
            # A producer sends again every request whose answer it never got: the ids make that safe.
            unknown = await load.resubmit(session, d.url)
            await wait_until(lambda: nothing_pending(session, d.url), timeout=120, interval=0.2)
        recovery = time.monotonic() - started - crash_phase
        expected = {name: {i for i, t in load.acked.items() if name in observers(t)} for name in OBSERVES}
        received = {
            "hook": [r.json["id"] for r in receiver.requests],
            "queue": await asyncio.to_thread(sqs_consumer.wait_for, expected["queue"], 60),
            "broker": await asyncio.to_thread(stomp_consumer.wait_for, expected["broker"], 60),
        }

    # The database, read once the daemon has stopped (it holds the file alone while it runs).
    await asyncio.to_thread(d.stop)
    kept = await read_stored(db)
    failed_attempts = kept.failed_attempts
    print(f"{CYCLES} kill -9 ({len(early)} during start-up) in {crash_phase:.1f}s, recovery {recovery:.1f}s; "
          f"{len(load.acked)} events acknowledged ({len(load.sent)} written, {unknown} without an answer were "
          f"sent again, {len(load.duplicates)} of them already stored)")
    report = {}
    for name in OBSERVES:
        dup = duplicates(received[name])
        # A failed attempt whose message did arrive (a timeout, say) is retried too: one more copy each.
        bound = kills * UNRECORDED_FACTOR * CONCURRENCY * BATCH[name] + failed_attempts.get(name, 0)
        report[name] = (len(expected[name]), len(received[name]), sum(dup.values()), len(dup), bound)
        print(f"  {name:7s} expected {len(expected[name]):5d}  received {len(received[name]):5d}  "
              f"duplicates {sum(dup.values()):4d} ({len(dup)} events; bound {bound})  "
              f"failed attempts {failed_attempts.get(name, 0)}  e.g. {sorted(dup.items())[:5]}")
    assert not load.problems, load.problems[:10]
    assert len(load.acked) > 1000, f"the load was too light to prove anything ({len(load.acked)} acknowledged)"

    # The database: every acknowledged event has exactly one job per observing integration, all delivered.
    jobs = kept.jobs
    wrong = {i: jobs.get(i) for i, t in load.acked.items()
             if sorted(jobs.get(i, [])) != sorted((name, "delivered") for name in observers(t))}
    assert not wrong, f"{len(wrong)} acknowledged events without exactly one delivered job per integration: " \
                      f"{list(wrong.items())[:5]}"
    assert kept.states == {"delivered": sum(len(v) for v in jobs.values())}
    assert integrity(db) == [("ok",)]

    for name in OBSERVES:
        missing = expected[name] - set(received[name])
        assert not missing, f"{name}: {len(missing)} acknowledged events never arrived, e.g. {sorted(missing)[:10]}"
        stray = set(received[name]) - set(load.sent)
        assert not stray, f"{name}: messages for events nobody sent: {sorted(stray)[:10]}"
        refused = set(received[name]) & set(load.refused)
        assert not refused, f"{name}: got events whose producer was told they were not stored: {sorted(refused)[:10]}"
        unobserved = {i for i in received[name] if name not in observers(load.sent[i]["type"])}
        assert not unobserved, f"{name}: got events it does not observe: {sorted(unobserved)[:10]}"
        _, _, dup_total, _, bound = report[name]
        assert dup_total <= bound, (f"{name}: {dup_total} duplicates for {kills} crashes and "
                                    f"{failed_attempts.get(name, 0)} failed attempts (bound {bound})")
