"""The target types, by the `integration_type` the YAML names them with.

A new target type is a module beside these (its configuration, parser, secret fields and sender: see
base.TargetType) and one line here. config.py and service.py ask this registry and know no type by name.
"""

from __future__ import annotations

from . import sqs, stomp, webhook
from .base import Sender, SenderContext, SpanShape, TargetType

REGISTRY: dict[str, TargetType] = {}


def register(target: TargetType) -> TargetType:
    if target.name in REGISTRY:
        raise ValueError(f"a target type named {target.name!r} is registered already")
    REGISTRY[target.name] = target
    return target


register(webhook.TARGET)
register(sqs.TARGET)
register(stomp.TARGET)


def get(name: str) -> TargetType:
    """The target type named `name`; KeyError if there is none (config.py validated every name it accepts)."""
    return REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


__all__ = ["REGISTRY", "Sender", "SenderContext", "SpanShape", "TargetType", "get", "names", "register"]
