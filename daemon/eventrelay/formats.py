"""The bodies eventrelay sends.

The stored payload is JSON text already; bodies are assembled around it so a large order is encoded once,
at ingest, and never again per attempt.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import TYPE_CHECKING, Any

from .clock import iso_time
from .codec import dumps
from .jobs import Job

if TYPE_CHECKING:
    from .delivery.targets.base import Integration

# Integration ids are derived from the name, so a receiver sees the same id across restarts and reloads.
_INTEGRATION_NAMESPACE = uuid.UUID("5b0c5f4e-8f7a-4c55-9a43-2f7f3f1d0e61")


def integration_id(name: str) -> str:
    return str(uuid.uuid5(_INTEGRATION_NAMESPACE, name))


class WebhookEnvelope:
    """Elastic Path's webhook body: {id, triggered_by, attempt, integration, resources, payload}.

    `payload` is {"data", "included"}, and `resources` the same as a JSON string, which Elastic Path calls
    deprecated and still sends (receivers written for it parse it). For a `*.deleted` event both are the
    bare resource identifier, `data` itself ({"type", "id"}), and `resources` is that object, not a string.
    Unlike the seed system, the integration's configuration (which holds the secret) is not echoed.
    """

    def __init__(self, integration: Integration, send_resources: bool = True):
        self._integration = dumps({"id": integration_id(integration.name),
                                    "integration_type": integration.integration_type,
                                    "name": integration.name, "description": integration.description})
        self._resources = send_resources

    def encode(self, job: Job) -> bytes:
        head = (f'{{"id":{dumps(job.event_id)},"triggered_by":{dumps(job.event_type)},'
                f'"attempt":{job.attempt},"integration":{self._integration},')
        if job.event_type.endswith(".deleted"):
            payload = dumps(json.loads(job.payload)["data"])
            resources = payload
        else:
            payload = job.payload
            resources = dumps(payload)  # the stored JSON text, as a JSON string
        if not self._resources:
            return f'{head}"payload":{payload}}}'.encode()
        return f'{head}"resources":{resources},"payload":{payload}}}'.encode()


class CloudEvent:
    """The CloudEvents 1.0 structured JSON body that queue targets (SQS, STOMP) receive."""

    def __init__(self, integration: Integration, source: str, store_id: str | None = None):
        self._integration_id = integration_id(integration.name)
        self._source = dumps(source)
        self._store = f'"storeid":{dumps(store_id)},' if store_id else ""

    def _head(self, job: Job) -> str:
        return (f'{{"specversion":"1.0","id":{dumps(job.event_id)},"type":{dumps(job.event_type)},'
                f'"source":{self._source},"datacontenttype":"application/json",'
                f'"integrationid":"{self._integration_id}",{self._store}"time":"{iso_time(job.accepted_at)}",'
                f'{_trace_extension(job)}')

    def encode(self, job: Job) -> bytes:
        # The stored payload is {"data": …, "included": …}: its members become the event's, without re-encoding.
        return (self._head(job) + job.payload[1:]).encode()

    def encode_elided(self, job: Job) -> bytes:
        """The body without `included`, marked as the seed system marks it, for targets with a size limit."""
        data = json.loads(job.payload)["data"]
        return (self._head(job) + f'"data":{dumps(data)},"included":{{"meta":{{"includes_elided":true}}}}}}'
                ).encode()


def _trace_extension(job: Job) -> str:
    """CloudEvents' distributed tracing extension: the trace context as attributes of the event itself, so
    it survives whatever carries the message."""
    if job.traceparent is None:
        return ""
    state = f'"tracestate":{dumps(job.tracestate)},' if job.tracestate else ""
    return f'"traceparent":{dumps(job.traceparent)},{state}'


def event_fields(job: Job) -> dict[str, Any]:
    """The fields a template can name, from a stored job: id, type, data, included."""
    return {"id": job.event_id, "type": job.event_type, **json.loads(job.payload)}


def render_template(template: str, fields: dict[str, Any]) -> str | None:
    """Fill `{data.id}`-style fields; None when a field is missing or not a scalar."""
    def lookup(match: re.Match[str]) -> str:
        value: object = fields
        for part in match.group(1).split("."):
            if not isinstance(value, dict) or part not in value:
                raise LookupError(match.group(1))
            value = value[part]
        if isinstance(value, (dict, list)) or value is None:
            raise LookupError(match.group(1))
        return str(value)

    try:
        return re.sub(r"\{([^{}]*)\}", lookup, template)
    except LookupError:
        return None
