"""OpenTelemetry traces, when `tracing.enabled` says so: a SERVER span per HTTP ingest request and one span per
delivery attempt (CLIENT for webhooks, PRODUCER for queues, as each target describes it), exported over
OTLP/HTTP. Off by default: then this module is not imported at all, and producers' trace contexts are only
passed through (tracecontext.py).

An attempt's span is a child of the context stored with its event: the ingest span's when tracing was on at
ingest (itself a child of the producer's), else the producer's own. The attempt's context then goes on to
the target, so a receiver with an OpenTelemetry SDK continues the same trace.

The SDK's BatchSpanProcessor exports from a thread of its own, in batches, dropping spans rather than
waiting when the collector cannot keep up: the event loop never waits on the collector. No global state: the
tracer provider is this daemon's, not OpenTelemetry's global one.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from . import __version__
from .jobs import JobState
from .tracecontext import from_headers

if TYPE_CHECKING:
    from aiohttp import web

    from .config import TracingConfig
    from .delivery.targets.base import SpanShape
    from .jobs import AttemptRecord, Job

log = structlog.get_logger(component="tracing")

_KINDS = {"client": SpanKind.CLIENT, "producer": SpanKind.PRODUCER}
_SHUTDOWN_TIMEOUT = 5.0  # seconds the last spans may take to reach the collector when the daemon stops
_EMPTY = Context()  # no parent: the span starts a trace (not the thread's current context: there is none here)

TraceContext = tuple[str, str | None]  # (traceparent, tracestate)


def _extract(traceparent: str | None, tracestate: str | None) -> Any:
    """The context a stored (already checked) traceparent names, read directly: the propagator's regular
    expressions and carrier dictionaries cost more than the rest of starting a span."""
    if not traceparent:
        return _EMPTY
    _, trace_id, span_id, flags = traceparent.split("-", 4)[:4]
    parent = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16)),
                         trace_state=TraceState.from_header([tracestate]) if tracestate else None)
    return trace.set_span_in_context(NonRecordingSpan(parent), _EMPTY)


def _context_of(span: trace.Span) -> TraceContext | None:
    context = span.get_span_context()
    if not context.is_valid:
        return None
    state = context.trace_state.to_header() if context.trace_state else ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}", state or None


class Tracing:
    """The daemon's tracer: made at start-up from the `tracing` section, shut down at the stop."""

    def __init__(self, config: TracingConfig):
        service = config.service_name or os.environ.get("OTEL_SERVICE_NAME") or "eventrelay"
        # Resource.create adds OTEL_RESOURCE_ATTRIBUTES; the sampler, when the config names no ratio, comes
        # from OTEL_TRACES_SAMPLER (parent-based, always on, by default).
        resource = Resource.create({"service.name": service, "service.version": __version__})
        sampler = ParentBased(TraceIdRatioBased(config.sampling_ratio)) if config.sampling_ratio is not None else None
        self._provider = TracerProvider(resource=resource, sampler=sampler)
        # Without an endpoint the exporter reads OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / _ENDPOINT, else
        # http://localhost:4318/v1/traces.
        exporter = OTLPSpanExporter(endpoint=config.endpoint, headers=dict(config.headers) or None,
                                    timeout=config.timeout)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("eventrelay", __version__)
        self.endpoint = config.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
            os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"

    @contextmanager
    def ingest(self, request: web.BaseRequest) -> Iterator[IngestSpan]:
        """The span of one HTTP ingest request, a child of the producer's context (its traceparent header)."""
        context = from_headers(request.headers.get("traceparent"), request.headers.get("tracestate"))
        parent = _extract(*context) if context is not None else _EMPTY
        host, _, port = (request.host or "").rpartition(":")
        span = self._tracer.start_span("POST /v1/events", context=parent, kind=SpanKind.SERVER, attributes={
            "http.request.method": "POST", "url.path": request.path, "http.route": "/v1/events",
            "url.scheme": request.scheme, "server.address": host or request.host or "",
            **({"server.port": int(port)} if port.isdigit() else {}),
            **({"client.address": request.remote} if request.remote else {})})
        ingest = IngestSpan(span)
        try:
            yield ingest
        finally:
            span.end()

    def attempts(self, integration: str, shape: SpanShape) -> AttemptSpans:
        return AttemptSpans(self._tracer, integration, shape)

    async def shutdown(self) -> None:
        """Export what is left, within a few seconds, off the event loop (the export is a blocking call)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self._provider.shutdown), _SHUTDOWN_TIMEOUT + 1)
        except TimeoutError:
            log.warning("the last spans did not reach the collector in time", endpoint=self.endpoint)


class IngestSpan:
    def __init__(self, span: trace.Span):
        self.span = span
        # What the request's events are stored with: this span's context, so deliveries follow it.
        self.context = _context_of(span)
        self.events = 0  # in the request, once they are valid

    def answered(self, status: int) -> None:
        span = self.span
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("eventrelay.events", self.events)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", str(status))


class AttemptSpans:
    """The spans of one integration's delivery attempts."""

    def __init__(self, tracer: trace.Tracer, integration: str, shape: SpanShape):
        self._tracer = tracer
        self._integration = integration
        self._shape = shape
        self._kind = _KINDS[shape.kind]

    def start(self, jobs: list[Job]) -> list[trace.Span]:
        """A span per job, started now; each job's trace context becomes its span's, to be sent on."""
        shape, spans = self._shape, []
        now = time.time_ns()
        for job in jobs:
            span = self._tracer.start_span(shape.name, context=_extract(job.traceparent, job.tracestate),
                                           kind=self._kind, start_time=now)
            if span.is_recording():  # an unsampled span carries the context on, and nothing else
                span.set_attributes({**shape.attributes, "eventrelay.integration": self._integration,
                                     "eventrelay.attempt": job.attempt, "eventrelay.event_type": job.event_type,
                                     "eventrelay.event_id": job.event_id, "eventrelay.job_id": job.id})
            context = _context_of(span)
            if context is not None:
                job.traceparent, job.tracestate = context
            spans.append(span)
        return spans

    def end(self, spans: list[trace.Span], records: list[AttemptRecord]) -> None:
        status_attribute = self._shape.status_attribute
        for span, record in zip(spans, records):
            if not span.is_recording():
                span.end()
                continue
            outcome = record.outcome
            if outcome.status_code is not None and status_attribute:
                span.set_attribute(status_attribute, outcome.status_code)
            if outcome.message_id:
                span.set_attribute("messaging.message.id", outcome.message_id)
            if not outcome.succeeded:
                span.set_status(Status(StatusCode.ERROR, outcome.error))
                span.set_attribute("error.type", _error_type(outcome.status_code, outcome.error))
            if record.state is JobState.DEAD:
                # The last attempt of a job that will not be tried again: what an operator searches traces for.
                span.set_attribute("eventrelay.job.state", "dead")
                span.add_event("job dead", {"eventrelay.dead_letter": record.dead_letter or ""})
            else:
                span.set_attribute("eventrelay.job.state", record.state.value)
            span.end()


def _error_type(status: int | None, error: str | None) -> str:
    """`error.type` as the HTTP conventions have it: the status code for an error answer, else a short kind."""
    if status is not None and status >= 400:
        return str(status)
    text = (error or "").lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    return "_OTHER"

