"""Amazon SQS: CloudEvents bodies sent with SendMessageBatch, ten jobs a call, through one long-lived client.

aiobotocore and botocore are imported when a sender starts, not with this module: they take long to load,
and a daemon without SQS targets never needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...config_yaml import Reader, default
from ...formats import CloudEvent, event_fields, render_template
from ...jobs import Job, Outcome
from ...units import http_url, parse_size, string, template
from .base import SenderContext, SpanShape, TargetType

if TYPE_CHECKING:
    from .base import Integration

MAX_BATCH = 10  # SQS's limit of entries per SendMessageBatch
MAX_MESSAGE_SIZE = 1024 * 1024  # SQS's limit for one message, whatever the queue is set to


@dataclass(frozen=True, slots=True)
class SqsConfig:
    url: str
    region: str
    aws_access_key_id: str | None = None  # both keys or neither: without them, the default AWS chain
    aws_secret_access_key: str | None = None
    endpoint_url: str | None = None
    message_group_id: str = "{data.id}"  # FIFO queues only: a template over the event's fields
    max_message_size: int = 256 * 1024  # the seed system's limit; queues made since 2025 may take 1 MiB

    @property
    def fifo(self) -> bool:
        return self.url.endswith(".fifo")


def parse(reader: Reader, raw: Any, path: str) -> SqsConfig | None:
    if raw is None:
        reader.error(path, "required for aws_sqs: at least url")
        return None
    s = reader.section(raw, path, ("url", "region", "aws_access_key_id", "aws_secret_access_key", "endpoint_url",
                                   "message_group_id", "max_message_size"))
    if "url" not in s:
        reader.error(f"{path}.url", "required: the queue URL")
    url = reader.value(s, "url", path, http_url, None)
    endpoint = reader.value(s, "endpoint_url", path, http_url, None, nullable=True)
    key_id = reader.value(s, "aws_access_key_id", path, string, None, nullable=True) or None
    secret = reader.value(s, "aws_secret_access_key", path, string, None, nullable=True) or None
    if (key_id is None) != (secret is None):
        reader.error(path, "give both aws_access_key_id and aws_secret_access_key, or neither "
                           "(then the default AWS credential chain is used)")
    region = reader.value(s, "region", path, string, None, nullable=True) or (url and _region_of(url))
    if url and not region:
        reader.error(f"{path}.region", "required: the queue URL does not name a region")
    group = reader.value(s, "message_group_id", path, template, default(SqsConfig, "message_group_id"))
    max_size = reader.value(s, "max_message_size", path, parse_size, default(SqsConfig, "max_message_size"))
    if max_size > MAX_MESSAGE_SIZE:
        reader.error(f"{path}.max_message_size", "SQS takes at most 1MiB per message")
    if not url or not region:
        return None
    return SqsConfig(url=url, region=region, aws_access_key_id=key_id, aws_secret_access_key=secret,
                     endpoint_url=endpoint, message_group_id=group, max_message_size=max_size)


def _region_of(url: str) -> str | None:
    m = re.match(r"https://sqs[.-]([a-z0-9-]+)\.amazonaws\.com", url)
    return m.group(1) if m else None


def make_sender(integration: Integration, context: SenderContext) -> SqsSender:
    return SqsSender(integration, context.event_source, context.store_id)


def span_shape(integration: Any) -> SpanShape:
    """Messaging producer spans: the queue's name is the last part of its URL."""
    queue = integration.configuration.url.rstrip("/").rsplit("/", 1)[-1]
    return SpanShape(f"send {queue}", "producer", {
        "messaging.system": "aws_sqs", "messaging.destination.name": queue, "messaging.operation.type": "send",
        "messaging.operation.name": "SendMessageBatch", "cloud.region": integration.configuration.region})


TARGET = TargetType(
    name="aws_sqs", config_class=SqsConfig, parse=parse, sender=make_sender, span_shape=span_shape,
    secret_fields=("aws_secret_access_key",), url_fields=("url", "endpoint_url"), uses_event_source=True,
)


class SqsSender:
    max_batch = MAX_BATCH

    def __init__(self, integration: Integration, source: str, store_id: str | None = None):
        conf = integration.configuration
        assert isinstance(conf, SqsConfig)
        self._conf = conf
        self._name = integration.name
        self._timeout = integration.delivery.timeout
        self._concurrency = integration.delivery.concurrency
        self._cloudevent = CloudEvent(integration, source, store_id)
        self._store_id = store_id
        # With per-resource ordering the ordering key is the group: SQS then keeps the same order we do.
        delivery = integration.delivery
        self._group_template = delivery.ordering_key if delivery.ordering == "per_resource" else conf.message_group_id
        # SQS's limit for one message (body and attributes) holds for a whole batch too.
        self._max_bytes = conf.max_message_size
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._failures: tuple[type[BaseException], ...] = (TimeoutError,)  # and botocore's, once started

    async def start(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
        from botocore.exceptions import BotoCoreError, ClientError

        self._failures = (ClientError, BotoCoreError, TimeoutError)
        conf = self._conf
        # botocore's own retries are off: the dispatcher retries with backoff and records every attempt.
        config = AioConfig(connect_timeout=self._timeout, read_timeout=self._timeout,
                           max_pool_connections=self._concurrency, retries={"max_attempts": 1, "mode": "standard"})
        self._client = await self._stack.enter_async_context(get_session().create_client(
            "sqs", region_name=conf.region, endpoint_url=conf.endpoint_url, config=config,
            aws_access_key_id=conf.aws_access_key_id, aws_secret_access_key=conf.aws_secret_access_key))

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    async def deliver(self, jobs: Sequence[Job]) -> list[Outcome]:
        started = time.monotonic()
        outcomes: list[Outcome] = []
        batch: list[tuple[Job, dict[str, Any]]] = []
        batch_bytes = 0
        for job in jobs:
            entry, size, problem = self._entry(job)
            if problem:
                outcomes.append(Outcome(job.id, False, 0.0, error=problem, retryable=False))
                continue
            # The size limit holds for the whole batch too: split rather than have SQS refuse all ten.
            if batch and batch_bytes + size > self._max_bytes:
                outcomes += await self._send(batch, started)
                batch, batch_bytes = [], 0
            batch.append((job, entry))
            batch_bytes += size
        if batch:
            outcomes += await self._send(batch, started)
        return outcomes

    def _entry(self, job: Job) -> tuple[dict[str, Any], int, str | None]:
        attributes = {"type": {"DataType": "String", "StringValue": job.event_type},
                      "id": {"DataType": "String", "StringValue": job.event_id}}
        if self._store_id:
            attributes["storeid"] = {"DataType": "String", "StringValue": self._store_id}
        if job.traceparent is not None:  # as OpenTelemetry's SQS instrumentations read it
            attributes["traceparent"] = {"DataType": "String", "StringValue": job.traceparent}
            if job.tracestate:
                attributes["tracestate"] = {"DataType": "String", "StringValue": job.tracestate}
        attributes_size = sum(len(k) + len("String") + len(v["StringValue"].encode()) for k, v in attributes.items())
        body = self._cloudevent.encode(job)
        if len(body) + attributes_size > self._max_bytes:
            body = self._cloudevent.encode_elided(job)
            if len(body) + attributes_size > self._max_bytes:
                return {}, 0, (f"event too large for SQS even without `included`: {len(body)} bytes, the limit "
                               f"(max_message_size) is {self._max_bytes}")
        entry: dict[str, Any] = {"Id": str(job.id), "MessageBody": body.decode(), "MessageAttributes": attributes}
        if self._conf.fifo:
            entry["MessageGroupId"] = message_group_id(
                render_template(self._group_template, event_fields(job)) or job.event_id)
            # The same (event, integration) always gets the same id, so SQS drops the copy a retry after an
            # unknown outcome (a timeout) would otherwise deliver, within its five-minute window.
            entry["MessageDeduplicationId"] = hashlib.sha256(f"{job.event_id}\0{self._name}".encode()).hexdigest()
        return entry, len(body) + attributes_size, None

    async def _send(self, batch: list[tuple[Job, dict[str, Any]]], started: float) -> list[Outcome]:
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._client.send_message_batch(
                    QueueUrl=self._conf.url, Entries=[entry for _, entry in batch])
        except self._failures as e:
            duration = time.monotonic() - started
            error, status = _describe(e, self._timeout)
            return [Outcome(job.id, False, duration, status_code=status, error=error) for job, _ in batch]
        duration = time.monotonic() - started
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        outcomes = [Outcome(int(ok["Id"]), True, duration, status_code=status, body=ok.get("MessageId"),
                            message_id=ok.get("MessageId"))
                    for ok in response.get("Successful", [])]
        for failed in response.get("Failed", []):
            # SenderFault: the entry itself is wrong (an invalid attribute, …): sending it again cannot help.
            outcomes.append(Outcome(int(failed["Id"]), False, duration, status_code=status,
                                    error=f"SQS refused the message: {failed.get('Code')}: {failed.get('Message', '')}",
                                    retryable=not failed.get("SenderFault", False)))
        return outcomes


# What SQS accepts in a MessageGroupId: 1-128 characters, letters, digits and ASCII punctuation.
_GROUP_ID = re.compile(r"[A-Za-z0-9!-/:-@\[-`{-~]{1,128}")


def message_group_id(key: str) -> str:
    """The key itself when SQS accepts it, else a stable hash of it (`sha256:` and 64 hex digits), so every
    key still maps to one group and SQS keeps its messages in order."""
    if _GROUP_ID.fullmatch(key):
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _describe(e: BaseException, timeout: float) -> tuple[str, int | None]:
    if isinstance(e, TimeoutError):
        return f"no answer from SQS within the timeout ({timeout:g}s)", None
    from botocore.exceptions import ClientError, NoCredentialsError  # loaded already: the sender has started

    if isinstance(e, NoCredentialsError):
        return ("no AWS credentials: set aws_access_key_id and aws_secret_access_key, or provide them through "
                "the environment, a profile or an instance role"), None
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"SQS error {err.get('Code', '?')}: {err.get('Message', '')}", status
    return f"cannot reach SQS: {e}", None
