"""OpenTelemetry traces, checked at a real OTLP/HTTP endpoint (an aiohttp server decoding the protobuf export
requests with opentelemetry-proto), and the trace context each target receives, read with OpenTelemetry's own
propagator as a receiver's SDK would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.trace import get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .conftest import Receiver, wait_for, wait_until, webhook
from .test_sqs import drain, sqs, sqs_integration  # noqa: F401 (sqs: the fixture)
from .test_stomp import consume, queue, stomp_integration

PRODUCER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01"
KINDS = {ProtoSpan.SPAN_KIND_SERVER: "server", ProtoSpan.SPAN_KIND_CLIENT: "client",
         ProtoSpan.SPAN_KIND_PRODUCER: "producer"}


@dataclass
class Exported:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    error: bool
    events: list[str]
    service: str


@dataclass
class Collector:
    """An OTLP/HTTP traces endpoint: every span exported to it."""

    url: str = ""
    spans: list[Exported] = field(default_factory=list)
    requests: int = 0

    def named(self, name: str) -> list[Exported]:
        return [s for s in self.spans if s.name == name]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    got = Collector()

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(await request.read())
        got.requests += 1
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    got.spans.append(Exported(
                        s.name, KINDS.get(s.kind, str(s.kind)), s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        {a.key: _value(a.value) for a in s.attributes}, s.status.code == s.status.STATUS_CODE_ERROR,
                        [e.name for e in s.events], resource.get("service.name")))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    got.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/traces"
    yield got
    await runner.cleanup()


def continued(carrier: dict[str, str]) -> tuple[str, str]:
    """(trace id, parent span id) as a receiver's OpenTelemetry SDK reads them from what it was given."""
    context = get_current_span(TraceContextTextMapPropagator().extract(carrier)).get_span_context()
    assert context.is_valid, carrier
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def tracing(collector: Collector, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "endpoint": collector.url, "service_name": "relay-under-test", **extra}


@pytest.fixture(autouse=True)
def _fast_export(monkeypatch: pytest.MonkeyPatch) -> None:
    # A short export delay (a standard variable the SDK reads): the tests wait for a batch, not five seconds.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")


async def test_one_trace_from_the_producer_through_ingest_to_webhook_sqs_and_stomp(
        start_daemon, receiver: Receiver, collector: Collector, moto_server, sqs, activemq) -> None:
    queue_url, destination = sqs.make_queue(), queue()
    d = await start_daemon([webhook("erp", receiver.url + "?token=s3cret", observes=["order.paid"]),
                            sqs_integration("inventory", queue_url, moto_server.endpoint_url),
                            stomp_integration("crm", activemq, destination)],
                           tracing=tracing(collector))
    status, _ = await d.post({"id": "o-1", "type": "order.paid", "data": {"id": "1"}},
                             headers={"traceparent": TRACEPARENT, "tracestate": "shop=7"})
    assert status == 202
    await wait_for(d.states, {"delivered": 3}, timeout=20)
    await wait_until(lambda: len(collector.spans) >= 4, timeout=15)

    (ingest,) = collector.named("POST /v1/events")
    assert (ingest.kind, ingest.trace_id, ingest.parent_id) == ("server", PRODUCER_TRACE, PRODUCER_SPAN)
    assert ingest.attributes["http.response.status_code"] == 202 and ingest.attributes["eventrelay.events"] == 1
    assert ingest.service == "relay-under-test"
    spans = {s.attributes.get("eventrelay.integration"): s for s in collector.spans if s is not ingest}
    assert set(spans) == {"erp", "inventory", "crm"}
    for s in spans.values():  # each attempt is a child of the ingest span, in the producer's trace
        assert (s.trace_id, s.parent_id) == (PRODUCER_TRACE, ingest.span_id)
        assert s.attributes["eventrelay.attempt"] == 1 and s.attributes["eventrelay.event_type"] == "order.paid"
        assert s.attributes["eventrelay.job.state"] == "delivered" and not s.error
    erp, inventory, crm = spans["erp"], spans["inventory"], spans["crm"]
    assert (erp.name, erp.kind, erp.attributes["http.request.method"]) == ("POST", "client", "POST")
    assert erp.attributes["http.response.status_code"] == 204
    assert erp.attributes["url.full"] == receiver.url + "?token=REDACTED"  # no secret in a trace
    assert (inventory.kind, inventory.attributes["messaging.system"]) == ("producer", "aws_sqs")
    assert inventory.attributes["messaging.destination.name"] == queue_url.rsplit("/", 1)[-1]
    assert inventory.attributes["messaging.operation.type"] == "send" and inventory.attributes["messaging.message.id"]
    assert (crm.kind, crm.name, crm.attributes["messaging.destination.name"]) == (
        "producer", f"send {destination}", destination)

    # What each target got continues the trace at its attempt's span.
    (request,) = receiver.requests
    assert continued(request.headers) == (PRODUCER_TRACE, erp.span_id)
    assert request.headers["tracestate"] == "shop=7"
    (message,) = await asyncio.to_thread(drain, sqs, queue_url, 1)
    attributes = {k: v["StringValue"] for k, v in message["MessageAttributes"].items()}
    body = json.loads(message["Body"])
    assert continued(attributes) == continued({"traceparent": body["traceparent"]}) == (PRODUCER_TRACE,
                                                                                          inventory.span_id)
    assert body["tracestate"] == attributes["tracestate"] == "shop=7"
    assert inventory.attributes["messaging.message.id"] == message["MessageId"]
    ((headers, body),) = await asyncio.to_thread(consume, activemq, destination, 1)
    assert continued(headers) == continued({"traceparent": body["traceparent"]}) == (PRODUCER_TRACE, crm.span_id)


async def test_retries_are_spans_of_their_own_and_the_last_of_a_dead_job_says_so(
        start_daemon, receiver: Receiver, collector: Collector) -> None:
    receiver.respond = lambda r: web.Response(status=500, text="down")
    d = await start_daemon([webhook("erp", receiver.url, delivery={
        "retry": {"initial": "50ms", "max_interval": "50ms", "max_attempts": 2},
        "breaker": {"failures": 100, "window": 100}})], tracing=tracing(collector))
    # An event's own traceparent field wins over the request's header.
    own = f"00-{'a' * 32}-{'b' * 16}-01"
    await d.post([{"id": "o-2", "type": "order.paid", "data": {}, "traceparent": own}],
                 headers={"traceparent": TRACEPARENT})
    await wait_for(d.states, {"dead": 1}, timeout=10)
    await wait_until(lambda: len(collector.named("POST")) == 2, timeout=15)
    first, last = sorted(collector.named("POST"), key=lambda s: s.attributes["eventrelay.attempt"])
    for s in (first, last):
        assert (s.trace_id, s.parent_id) == ("a" * 32, "b" * 16)
        assert s.error and s.attributes["error.type"] == "500" and s.attributes["http.response.status_code"] == 500
    assert first.attributes["eventrelay.job.state"] == "pending" and first.events == []
    assert last.attributes["eventrelay.job.state"] == "dead" and last.events == ["job dead"]
    assert [continued(r.headers)[1] for r in receiver.requests] == [first.span_id, last.span_id]


async def test_socket_events_carry_their_own_trace_context(start_daemon, receiver: Receiver,
                                                          collector: Collector) -> None:
    d = await start_daemon([webhook("erp", receiver.url)], tracing=tracing(collector))
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    writer.write(json.dumps({"id": "s-1", "type": "order.paid", "data": {}, "traceparent": TRACEPARENT}).encode()
                 + b"\n")
    await writer.drain()
    assert json.loads(await reader.readline())["id"] == "s-1"
    writer.close()
    await wait_until(lambda: collector.named("POST"), timeout=15)
    (span,) = collector.named("POST")
    assert (span.trace_id, span.parent_id) == (PRODUCER_TRACE, PRODUCER_SPAN)  # no ingest span on the socket


async def test_with_tracing_off_the_producers_context_is_passed_on_unchanged(start_daemon, receiver: Receiver,
                                                                            collector: Collector) -> None:
    d = await start_daemon([webhook("erp", receiver.url)])
    await d.post({"id": "o-3", "type": "order.paid", "data": {}}, headers={"traceparent": TRACEPARENT})
    await d.post({"id": "o-4", "type": "order.paid", "data": {}}, headers={"traceparent": "not-a-traceparent"})
    await wait_for(d.states, {"delivered": 2}, timeout=10)
    by_id = {r.json["id"]: r.headers for r in receiver.requests}
    assert by_id["o-3"]["traceparent"] == TRACEPARENT
    assert "traceparent" not in by_id["o-4"]  # an invalid header is ignored, as the recommendation asks
    await asyncio.sleep(0.3)
    assert collector.requests == 0


async def test_sampled_out_traces_still_pass_their_context_on(start_daemon, receiver: Receiver,
                                                             collector: Collector) -> None:
    d = await start_daemon([webhook("erp", receiver.url)], tracing=tracing(collector, sampling_ratio=0))
    await d.post({"id": "o-5", "type": "order.paid", "data": {}})
    await wait_for(d.states, {"delivered": 1}, timeout=10)
    (request,) = receiver.requests
    traceparent = request.headers["traceparent"]
    assert int(traceparent[-2:], 16) & 1 == 0  # the sampled flag is off, and a receiver knows it
    await asyncio.sleep(0.5)
    assert collector.spans == []
