"""One sender per protocol, all with the same small interface (see base.Sender)."""

from __future__ import annotations

from ...config import Integration
from .base import Sender
from .webhook import WebhookSender


def make_sender(integration: Integration, user_agent: str) -> Sender:
    if integration.integration_type == "webhook":
        return WebhookSender(integration, user_agent)
    raise ValueError(f"no sender for integration_type {integration.integration_type!r}")


__all__ = ["Sender", "WebhookSender", "make_sender"]
