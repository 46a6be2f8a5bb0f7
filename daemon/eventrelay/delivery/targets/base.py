"""What a target type is: the Sender interface, and the TargetType record the registry holds for each type."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ...config_yaml import Reader
    from ...jobs import Job, Outcome


class Integration(Protocol):
    """What a target reads of the integration it delivers for (config.Integration has it): declared here, so
    that neither the targets nor the bodies they send import the configuration that imports them."""

    @property
    def name(self) -> str: ...
    @property
    def integration_type(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def configuration(self) -> Any: ...
    @property
    def delivery(self) -> Any: ...  # config.DeliveryConfig


class Sender(Protocol):
    """Knows one protocol and nothing else: no scheduling, no retries, no logging of outcomes.

    A sender owns its long-lived connection (an HTTP session, a queue client, a broker connection), opened
    in `start` and closed in `close`. `deliver` takes up to `max_batch` jobs (1 for webhooks, 10 for an SQS
    batch) and returns one Outcome per job, in any order; it raises only for bugs, never for a target's
    failure, which is an Outcome like any other. The dispatcher runs up to `concurrency` `deliver` calls at once.
    """

    max_batch: int

    async def start(self) -> None: ...

    async def deliver(self, jobs: Sequence[Job]) -> list[Outcome]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SenderContext:
    """What a sender may take from the service, besides its own integration."""

    user_agent: str  # the HTTP User-Agent, `eventrelay/<version>`
    event_source: str  # the CloudEvents `source` of queue messages (the config's top-level event_source)
    store_id: str | None = None  # Elastic Path's `storeid` on queue messages, when the config sets one


@dataclass(frozen=True, slots=True)
class SpanShape:
    """How a target's delivery attempts look in a trace, after OpenTelemetry's semantic conventions."""

    name: str  # e.g. "POST", "send orders"
    kind: str  # "client" (a request that is answered) or "producer" (a message handed to a broker)
    attributes: Mapping[str, str | int]  # the same for every attempt (no secrets: URLs masked)
    status_attribute: str | None = None  # where an attempt's status code goes (http.response.status_code)


@dataclass(frozen=True, slots=True)
class TargetType:
    """One kind of target, as `integration_type` names it in the YAML.

    `parse(reader, raw, path)` turns the integration's `configuration` section into an instance of
    `config_class`, or reports every problem through `reader.error` and returns None. `sender(integration,
    context)` makes the integration's sender; it is called only when a dispatcher starts, so a target's
    client library is imported there, not when the module is (a daemon without such targets never loads it).
    `span_shape(integration)` says how its attempts show in a trace.
    """

    name: str
    config_class: type
    parse: Callable[[Reader, Any, str], Any]
    sender: Callable[[Integration, SenderContext], Sender]
    span_shape: Callable[[Integration], SpanShape]  # its attempts' spans, when tracing is on
    # Fields shown masked (`****PSYQ`; each item of a tuple), and URLs whose credentials are masked.
    secret_fields: tuple[str, ...] = ()
    url_fields: tuple[str, ...] = ()
    # Fields the YAML names differently, shown under the YAML's name, and only when set.
    shown_as: Mapping[str, str] = field(default_factory=dict)
    # Fields the type shows in a form of its own (secrets inside them masked): `shown(config)` gives what
    # stands in their place, {key: shown value}.
    shown_fields: tuple[str, ...] = ()
    shown: Callable[[Any], dict[str, Any]] | None = None
    # Its messages carry the context's event_source and store_id: a reload that changes either restarts
    # its dispatchers, so the messages sent afterwards carry the new values.
    uses_event_source: bool = False
