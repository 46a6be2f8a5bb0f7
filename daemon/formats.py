"""The bodies eventrelay sends.

The stored payload is JSON text already; bodies are assembled around it so a large order is encoded once,
at ingest, and never again per attempt.
"""

from __future__ import annotations

import json
import uuid

from .config import Integration
from .jobs import Job

# Integration ids are derived from the name, so a receiver sees the same id across restarts and reloads.
_INTEGRATION_NAMESPACE = uuid.UUID("5b0c5f4e-8f7a-4c55-9a43-2f7f3f1d0e61")


def integration_id(name: str) -> str:
    return str(uuid.uuid5(_INTEGRATION_NAMESPACE, name))


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class WebhookEnvelope:
    """Elastic Path's webhook body: {id, triggered_by, attempt, integration, payload}.

    Unlike the seed system, the integration's configuration (which holds the secret) is not echoed.
    """

    def __init__(self, integration: Integration):
        self._integration = _dumps({"id": integration_id(integration.name),
                                    "integration_type": integration.integration_type,
                                    "name": integration.name, "description": integration.description})

    def encode(self, job: Job) -> bytes:
        return (f'{{"id":{_dumps(job.event_id)},"triggered_by":{_dumps(job.event_type)},'
                f'"attempt":{job.attempt},"integration":{self._integration},"payload":{job.payload}}}'
                ).encode()
