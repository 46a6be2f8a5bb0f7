"""Amazon SQS: CloudEvents bodies sent with SendMessageBatch, ten jobs a call, through one long-lived client."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Sequence
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ...config import Integration, SqsConfig
from ...formats import CloudEvent, event_fields, render_template
from ...jobs import Job, Outcome

MAX_BATCH = 10  # SQS's limit of entries per SendMessageBatch


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

    async def start(self) -> None:
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
        except (ClientError, BotoCoreError, TimeoutError) as e:
            duration = time.monotonic() - started
            error, status = _describe(e, self._timeout)
            return [Outcome(job.id, False, duration, status_code=status, error=error) for job, _ in batch]
        duration = time.monotonic() - started
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        outcomes = [Outcome(int(ok["Id"]), True, duration, status_code=status, body=ok.get("MessageId"))
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


def _describe(e: Exception, timeout: float) -> tuple[str, int | None]:
    if isinstance(e, TimeoutError):
        return f"no answer from SQS within the timeout ({timeout:g}s)", None
    if isinstance(e, NoCredentialsError):
        return ("no AWS credentials: set aws_access_key_id and aws_secret_access_key, or provide them through "
                "the environment, a profile or an instance role"), None
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"SQS error {err.get('Code', '?')}: {err.get('Message', '')}", status
    return f"cannot reach SQS: {e}", None
