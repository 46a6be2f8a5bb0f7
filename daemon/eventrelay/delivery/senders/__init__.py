"""One sender per protocol, all with the same small interface (see base.Sender)."""

from __future__ import annotations

from ...config import Integration
from .base import Sender


def make_sender(integration: Integration, user_agent: str, event_source: str, store_id: str | None = None
                ) -> Sender:
    # Imported on demand: a daemon with webhooks only never loads botocore or the STOMP client.
    if integration.integration_type == "webhook":
        from .webhook import WebhookSender

        return WebhookSender(integration, user_agent)
    if integration.integration_type == "aws_sqs":
        from .sqs import SqsSender

        return SqsSender(integration, event_source, store_id)
    if integration.integration_type == "stomp":
        from .stomp import StompSender

        return StompSender(integration, event_source, store_id)
    raise ValueError(f"no sender for integration_type {integration.integration_type!r}")


__all__ = ["Sender", "make_sender"]
