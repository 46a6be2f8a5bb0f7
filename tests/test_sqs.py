"""Amazon SQS delivery against a real SQS API (moto in server mode), read back with a plain boto3 consumer."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web

from eventrelay import config as cfg
from eventrelay.delivery.targets.sqs import SqsSender
from eventrelay.formats import integration_id
from eventrelay.jobs import Job

from .conftest import wait_for

CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture
def sqs(moto_server):
    """A boto3 client on the moto server, and a fresh queue per call of make_queue."""
    client = boto3.client("sqs", region_name="eu-west-1", endpoint_url=moto_server.endpoint_url, **CREDS)

    def make_queue(fifo: bool = False, **attributes: str) -> str:
        name = f"q-{uuid.uuid4().hex[:12]}" + (".fifo" if fifo else "")
        if fifo:
            attributes.setdefault("FifoQueue", "true")
        return client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]

    client.make_queue = make_queue  # type: ignore[attr-defined]
    return client


def drain(client, url: str, expect: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Receive (and delete) until `expect` messages came, or fail after `timeout`."""
    import time

    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(messages) < expect and time.monotonic() < deadline:
        got = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                     MessageAttributeNames=["All"], AttributeNames=["All"]).get("Messages", [])
        for m in got:
            client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        messages += got
        if not got:
            time.sleep(0.05)
    return messages


def sqs_integration(name: str, url: str, endpoint: str, **conf: Any) -> dict[str, Any]:
    return {"name": name, "integration_type": "aws_sqs", "observes": ["order.*"],
            "configuration": {"url": url, "region": "eu-west-1", "endpoint_url": endpoint, **CREDS, **conf}}


async def test_events_arrive_as_cloudevents_with_attributes(start_daemon, moto_server, sqs) -> None:
    url = sqs.make_queue()
    d = await start_daemon([sqs_integration("inventory", url, moto_server.endpoint_url)],
                           event_source="eventrelay://shop-1")
    events = [{"id": f"e{i}", "type": "order.paid", "data": {"type": "order", "id": f"o{i}"},
               "included": {"items": [{"id": i}]}} for i in range(25)]
    assert (await d.post(events))[0] == 202
    await wait_for(d.states, lambda states: states.get("delivered") == 25)
    messages = await asyncio.to_thread(drain, sqs, url, 25)
    bodies = {json.loads(m["Body"])["id"]: (json.loads(m["Body"]), m) for m in messages}
    assert sorted(bodies) == sorted(f"e{i}" for i in range(25))
    body, message = bodies["e7"]
    assert body == {"specversion": "1.0", "id": "e7", "type": "order.paid", "source": "eventrelay://shop-1",
                    "datacontenttype": "application/json", "integrationid": integration_id("inventory"),
                    "time": body["time"], "data": {"type": "order", "id": "o7"}, "included": {"items": [{"id": 7}]}}
    assert body["time"].endswith("Z") and len(body["time"]) == len("2026-11-27T22:00:00.000Z")
    assert message["MessageAttributes"] == {"type": {"DataType": "String", "StringValue": "order.paid"},
                                            "id": {"DataType": "String", "StringValue": "e7"}}
    # Ten jobs per SendMessageBatch: 25 jobs take 3 calls, and each attempt logs the message id SQS gave.
    (attempt,) = await d.store.attempts((await d.job("e7")).id)
    assert attempt.succeeded and attempt.status_code == 200 and attempt.body == message["MessageId"]


async def test_fifo_group_ids_come_from_the_template(start_daemon, moto_server, sqs) -> None:
    url = sqs.make_queue(fifo=True)
    d = await start_daemon([sqs_integration("fifo", url, moto_server.endpoint_url,
                                            message_group_id="order-{data.relationships.order.id}")])
    events = [{"id": f"f{i}", "type": "order.updated",
               "data": {"id": f"x{i}", "relationships": {"order": {"id": f"o{i % 2}"}}}} for i in range(4)]
    events.append({"id": "f-nogroup", "type": "order.updated", "data": {"id": "y"}})
    await d.post(events)
    messages = await asyncio.to_thread(drain, sqs, url, 5)
    groups = {json.loads(m["Body"])["id"]: m["Attributes"]["MessageGroupId"] for m in messages}
    assert groups == {"f0": "order-o0", "f1": "order-o1", "f2": "order-o0", "f3": "order-o1",
                      "f-nogroup": "f-nogroup"}  # a missing field falls back to the event id
    assert all(len(m["Attributes"]["MessageDeduplicationId"]) == 64 for m in messages)


def job(event_id: str, payload: dict[str, Any], job_id: int = 1, attempt: int = 1) -> Job:
    return Job(id=job_id, integration="q", attempt=attempt, event_id=event_id, event_type="order.paid",
               payload=json.dumps(payload), accepted_at=1_790_000_000.0)


def sender_for(url: str, endpoint: str, **conf: Any) -> SqsSender:
    config = cfg.parse(json.dumps({"integrations": [sqs_integration("q", url, endpoint, **conf)]}), environ={})
    return SqsSender(config.integrations[0], "eventrelay://test")


async def test_a_retry_after_an_unknown_outcome_is_deduplicated_by_fifo_sqs(moto_server, sqs) -> None:
    url = sqs.make_queue(fifo=True)
    sender = sender_for(url, moto_server.endpoint_url)
    await sender.start()
    try:
        first = await sender.deliver([job("dup-1", {"data": {"id": "o1"}})])
        again = await sender.deliver([job("dup-1", {"data": {"id": "o1"}}, attempt=2)])
    finally:
        await sender.close()
    assert first[0].succeeded and again[0].succeeded
    messages = await asyncio.to_thread(drain, sqs, url, 2, 1.5)
    assert len(messages) == 1


async def test_oversized_events_lose_included_then_die(moto_server, sqs) -> None:
    url = sqs.make_queue()
    sender = sender_for(url, moto_server.endpoint_url)
    await sender.start()
    try:
        big_included = job("big-inc", {"data": {"id": "o1"}, "included": {"blob": "x" * 300_000}}, job_id=1)
        big_data = job("big-data", {"data": {"blob": "y" * 300_000}}, job_id=2)
        small = job("small", {"data": {"id": "o3"}}, job_id=3)
        outcomes = {o.job_id: o for o in await sender.deliver([big_included, big_data, small])}
    finally:
        await sender.close()
    assert outcomes[1].succeeded and outcomes[3].succeeded
    assert not outcomes[2].succeeded and not outcomes[2].retryable
    assert "too large for SQS even without `included`" in outcomes[2].error
    messages = {json.loads(m["Body"])["id"]: json.loads(m["Body"])
                for m in await asyncio.to_thread(drain, sqs, url, 2)}
    assert messages["big-inc"]["included"] == {"meta": {"includes_elided": True}}
    assert messages["big-inc"]["data"] == {"id": "o1"}
    assert "included" not in messages["small"]


async def test_batches_are_split_to_respect_the_size_limit(moto_server, sqs) -> None:
    url = sqs.make_queue()
    sender = sender_for(url, moto_server.endpoint_url)
    await sender.start()
    try:  # ten 60 KB messages: one batch of ten would exceed 256 KiB, so SQS would refuse it whole
        outcomes = await sender.deliver([job(f"m{i}", {"data": {"b": "z" * 60_000}}, job_id=i) for i in range(10)])
    finally:
        await sender.close()
    assert all(o.succeeded for o in outcomes) and len(outcomes) == 10
    assert len(await asyncio.to_thread(drain, sqs, url, 10)) == 10


@pytest.fixture
async def failing_proxy(moto_server):
    """An SQS endpoint in front of moto that fails chosen batch entries, as SQS does under partial failure.

    moto never fails part of a batch for the attributes we send; this proxy forwards the rest to it and
    answers the chosen entries as failed, so the real botocore parsing of `Failed` is exercised.
    """
    fail: dict[str, dict[str, Any]] = {}  # event id → the Failed entry to answer

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        failed = []
        if request.headers.get("X-Amz-Target", "").endswith("SendMessageBatch"):
            payload = json.loads(body)
            keep = []
            for entry in payload["Entries"]:
                event_id = json.loads(entry["MessageBody"])["id"]
                if event_id in fail:
                    failed.append({"Id": entry["Id"], **fail[event_id]})
                else:
                    keep.append(entry)
            payload["Entries"] = keep
            body = json.dumps(payload).encode()
        async with aiohttp.ClientSession() as s, s.post(moto_server.endpoint_url + request.path_qs, data=body,
                                                           headers=headers) as upstream:
            answer = await upstream.read()
            status = upstream.status
            content_type = upstream.headers.get("Content-Type", "application/x-amz-json-1.0")
        if failed and status == 200:
            decoded = json.loads(answer)
            decoded["Failed"] = decoded.get("Failed", []) + failed
            answer = json.dumps(decoded).encode()
        return web.Response(body=answer, status=status, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", fail
    await runner.cleanup()


async def test_partial_batch_failures_fail_only_those_jobs(start_daemon, failing_proxy, sqs) -> None:
    endpoint, fail = failing_proxy
    url = sqs.make_queue()
    fail["p3"] = {"SenderFault": False, "Code": "InternalError", "Message": "try again"}
    fail["p5"] = {"SenderFault": True, "Code": "InvalidParameterValue", "Message": "bad attribute"}
    d = await start_daemon([sqs_integration("q", url, endpoint,)], delivery={
        "retry": {"initial": "100ms", "max_interval": "200ms", "max_age": "1h"}})
    await d.post([{"id": f"p{i}", "type": "order.paid", "data": {}} for i in range(8)])

    async def states() -> dict[str, str]:
        """event id -> the state of its job."""
        return {job.event_id: job.state.value for job in await d.jobs()}

    await wait_for(states, lambda s: all(s.get(f"p{i}") == "delivered" for i in range(8) if i not in (3, 5)))
    await wait_for(states, lambda s: s.get("p5") == "dead")  # sender fault: sending it again cannot help
    await wait_for(lambda: d.job("p3"), lambda job: job.attempts >= 2)
    assert (await states())["p3"] == "pending"  # a server-side failure is retried
    del fail["p3"]
    await wait_for(states, lambda s: s["p3"] == "delivered")
    dead_error = (await d.job("p5")).last_error
    assert dead_error == "SQS refused the message: InvalidParameterValue: bad attribute"
    received = {json.loads(m["Body"])["id"] for m in await asyncio.to_thread(drain, sqs, url, 7)}
    assert received == {f"p{i}" for i in range(8)} - {"p5"}


async def test_unreachable_sqs_and_missing_queue_are_retried_with_a_clear_error(start_daemon, moto_server) -> None:
    missing = moto_server.endpoint_url + "/123456789012/does-not-exist"
    d = await start_daemon([sqs_integration("gone", missing, moto_server.endpoint_url),
                            sqs_integration("down", "https://sqs.eu-west-1.amazonaws.com/1/q",
                                            "http://127.0.0.1:9")])
    await d.post({"id": "u1", "type": "order.paid", "data": {}})
    await wait_for(d.attempts, lambda attempts: len({a.integration for a in attempts}) == 2)
    errors = {a.integration: a.error_detail for a in await d.attempts()}
    assert "NonExistentQueue" in errors["gone"] or "QueueDoesNotExist" in errors["gone"], errors
    assert errors["down"].startswith("cannot reach SQS"), errors
    assert {job.state for job in await d.jobs()} == {"pending"}


async def test_store_id_travels_as_storeid_in_body_and_attributes(start_daemon, moto_server, sqs) -> None:
    url = sqs.make_queue()
    d = await start_daemon([sqs_integration("inventory", url, moto_server.endpoint_url)], store_id="store-42")
    assert (await d.post({"id": "e-store", "type": "order.paid", "data": {"type": "order", "id": "o1"}}))[0] == 202
    (message,) = await asyncio.to_thread(drain, sqs, url, 1)
    assert json.loads(message["Body"])["storeid"] == "store-42"
    assert message["MessageAttributes"]["storeid"] == {"DataType": "String", "StringValue": "store-42"}


async def test_fifo_group_ids_sqs_would_refuse_are_hashed_the_same_way_every_time(
        start_daemon, moto_server, sqs) -> None:
    url = sqs.make_queue(fifo=True)
    d = await start_daemon([sqs_integration("inventory", url, moto_server.endpoint_url)])
    long_key, spaced_key = "x" * 300, "Müller & Söhne / order 7"
    events = [{"id": f"e{i}", "type": "order.paid", "data": {"type": "order", "id": key}}
              for i, key in enumerate([long_key, spaced_key, long_key, "o-plain_1:ok"])]
    assert (await d.post(events))[0] == 202
    messages = await asyncio.to_thread(drain, sqs, url, 4)
    groups = {json.loads(m["Body"])["id"]: m["Attributes"]["MessageGroupId"] for m in messages}
    assert groups["e3"] == "o-plain_1:ok"  # a key SQS accepts is kept as it is
    for event in ("e0", "e1"):
        assert groups[event].startswith("sha256:") and len(groups[event]) == 71
    assert groups["e0"] == groups["e2"] != groups["e1"]  # one key, one group: SQS keeps their order
