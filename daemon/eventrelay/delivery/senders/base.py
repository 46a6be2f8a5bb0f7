"""The interface every sender implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ...jobs import Job, Outcome


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
